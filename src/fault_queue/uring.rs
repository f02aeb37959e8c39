// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The io_uring fault path (`--fault-io io-uring`): reads of the fault FDs
//! (the virtual endpoints' pipe, the kernel's fault queue) are posted in
//! advance, each into one of two buffers per source, and the kernel's page
//! responses are queued as writes and submitted together with the re-armed
//! reads, one `io_uring_enter` for both. The eventq worker polls the ring's
//! FD in its epoll set (readable while completions wait).
//!
//! Only the eventq worker posts reads (`arm`): the kernel runs a read that
//! found nothing when the FD becomes readable, as task work of the thread
//! that submitted it. Any thread may write responses (`write_responses`),
//! waiting for their completions before it returns (they complete inline:
//! the fault FD is always writable), and completions of reads it comes
//! across are kept in their slot for the eventq worker.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring};
use log::Level;
use thiserror::Error;

use super::pages::{SourceId, PGFAULT_LEN};
use crate::log_limit::limited;

/// Records one posted read takes at most (as the epoll path's stack buffer).
pub(crate) const READ_RECORDS: usize = 64;
const READ_BYTES: usize = READ_RECORDS * PGFAULT_LEN;
/// Responses written per `io_uring_enter` at most (struct
/// iommu_hwpt_page_response, 8 bytes each, one write apiece: the kernel
/// then refuses a stale one alone, not the ones after it).
pub(crate) const WRITE_BATCH: usize = 64;
const RESPONSE_LEN: usize = 8;
const RESPONSE_LEN_U32: u32 = 8;
/// Submission entries: two reads, a cancel each, and a batch of writes.
const RING_ENTRIES: u32 = 128;

/// How the fault FDs are served (`--fault-io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultIo {
    /// The eventq worker's epoll set and read()/write() per batch.
    Epoll,
    /// An io_uring: reads posted in advance, responses through the ring.
    IoUring,
    /// io_uring where the kernel allows it (not disabled by
    /// `kernel.io_uring_disabled` or a seccomp policy), else epoll.
    Auto,
}

impl FaultIo {
    pub fn name(self) -> &'static str {
        match self {
            FaultIo::Epoll => "epoll",
            FaultIo::IoUring => "io-uring",
            FaultIo::Auto => "auto",
        }
    }
}

#[derive(Debug, Error)]
pub enum RingError {
    #[error("io_uring_setup: {0}")]
    Setup(io::Error),
}

/// What a completion is for (its user_data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tag {
    Read(SourceId),
    /// The poll a kernel read is linked behind (reports only failures).
    Poll,
    /// The `i`-th write of the current batch.
    Write(usize),
    Cancel,
}

const TAG_SHIFT: u32 = 56;

impl Tag {
    pub(crate) fn encode(self) -> u64 {
        match self {
            Tag::Read(SourceId::Virtual) => 1 << TAG_SHIFT,
            Tag::Read(SourceId::Kernel) => 2 << TAG_SHIFT,
            Tag::Write(i) => (3 << TAG_SHIFT) | i as u64,
            Tag::Cancel => 4 << TAG_SHIFT,
            Tag::Poll => 5 << TAG_SHIFT,
        }
    }

    pub(crate) fn decode(v: u64) -> Option<Tag> {
        let low = v & ((1 << TAG_SHIFT) - 1);
        match (v >> TAG_SHIFT, low) {
            (1, 0) => Some(Tag::Read(SourceId::Virtual)),
            (2, 0) => Some(Tag::Read(SourceId::Kernel)),
            (3, i) => usize::try_from(i)
                .ok()
                .filter(|&i| i < WRITE_BATCH)
                .map(Tag::Write),
            (4, 0) => Some(Tag::Cancel),
            (5, 0) => Some(Tag::Poll),
            _ => None,
        }
    }
}

/// Where a source's read is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// No FD, or no longer read (an error).
    Off,
    /// To be posted (`arm`).
    Idle,
    /// In the kernel, into `buf`.
    Posted,
    /// Completed with this result; `buf` holds the bytes.
    Done(i32),
}

/// One source's reads: two buffers, the one in the kernel (or holding a
/// result) and a free one, which the next read takes while the last one's
/// records are relayed. Allocated once.
struct ReadSlot {
    fd: RawFd,
    state: SlotState,
    buf: Option<Box<[u8]>>,
    free: Vec<Box<[u8]>>,
}

impl ReadSlot {
    fn new() -> Self {
        ReadSlot {
            fd: -1,
            state: SlotState::Off,
            buf: None,
            free: (0..2)
                .map(|_| vec![0u8; READ_BYTES].into_boxed_slice())
                .collect(),
        }
    }
}

/// A completed read, handed to the relay; `give_back` returns its buffer.
pub(crate) struct ReadDone {
    pub source: SourceId,
    /// The read's result: bytes, or a negative errno.
    pub result: i32,
    pub buf: Box<[u8]>,
}

/// What the ring did, for `stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RingCounters {
    /// io_uring_enter calls (submissions and waits).
    pub enters: u64,
    /// Reads completed with records.
    pub reads: u64,
    /// Responses the kernel took.
    pub responses_written: u64,
    /// Responses for groups the kernel had completed itself (EINVAL).
    pub responses_stale: u64,
    /// Responses that failed otherwise.
    pub responses_failed: u64,
}

/// The outcome of one response write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    Taken,
    /// The kernel had completed the group itself.
    Stale,
    Failed(i32),
}

pub(crate) struct FaultRing {
    ring: IoUring,
    slots: [ReadSlot; 2],
    /// The responses of the batch being written, and their results.
    responses: Box<[[u8; RESPONSE_LEN]; WRITE_BATCH]>,
    results: [Option<i32>; WRITE_BATCH],
    /// Entries pushed and not yet submitted.
    queued: usize,
    /// A read completion was reaped by a thread other than the eventq
    /// worker's pass: the worker must be woken to relay it.
    pub(crate) reaped_elsewhere: bool,
    /// The eventq worker is in its pass (it relays what is reaped).
    pub(crate) in_pass: bool,
    pub(crate) counters: RingCounters,
}

fn slot_of(s: SourceId) -> usize {
    match s {
        SourceId::Virtual => 0,
        SourceId::Kernel => 1,
    }
}

impl FaultRing {
    pub(crate) fn new() -> Result<Self, RingError> {
        let ring = IoUring::new(RING_ENTRIES).map_err(RingError::Setup)?;
        Ok(FaultRing {
            ring,
            slots: [ReadSlot::new(), ReadSlot::new()],
            responses: Box::new([[0; RESPONSE_LEN]; WRITE_BATCH]),
            results: [None; WRITE_BATCH],
            queued: 0,
            reaped_elsewhere: false,
            in_pass: false,
            counters: RingCounters::default(),
        })
    }

    /// The FD the eventq worker polls.
    pub(crate) fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Read `fd` for `source` from now on (posted at the next `arm`).
    pub(crate) fn set_source(&mut self, source: SourceId, fd: RawFd) {
        let s = &mut self.slots[slot_of(source)];
        s.fd = fd;
        if s.state == SlotState::Off {
            s.state = SlotState::Idle;
        }
    }

    /// Is `source`'s FD read through the ring?
    pub(crate) fn has_source(&self, source: SourceId) -> bool {
        self.slots[slot_of(source)].fd >= 0
    }

    /// Stop reading `source` (an error the ring cannot get past).
    pub(crate) fn stop(&mut self, source: SourceId) {
        let s = &mut self.slots[slot_of(source)];
        if s.state == SlotState::Idle {
            s.state = SlotState::Off;
        }
    }

    /// Forget `source`'s FD: a posted read is cancelled and waited for (its
    /// buffer and the FD must outlive it); returns the bytes it had read,
    /// which nobody relays (0 mostly).
    pub(crate) fn remove_source(&mut self, source: SourceId) -> usize {
        let i = slot_of(source);
        if self.slots[i].state == SlotState::Posted {
            // The read, or the poll it waits behind (which cancels both).
            for target in [Tag::Read(source), Tag::Poll] {
                if target == Tag::Poll && source != SourceId::Kernel {
                    continue;
                }
                let cancel = opcode::AsyncCancel::new(target.encode())
                    .build()
                    .user_data(Tag::Cancel.encode());
                self.push(&cancel);
            }
            // The cancel completes at once; a read that ran meanwhile has
            // completed too. Bounded (10 ms a wait, 1 s in all; the caller
            // may hold the session): a read that never ends leaves its
            // buffer to the kernel (leaked) rather than hang the device.
            let ts = types::Timespec::from(std::time::Duration::from_millis(10));
            for _ in 0..100 {
                self.counters.enters += 1;
                let args = types::SubmitArgs::new().timespec(&ts);
                match self.ring.submitter().submit_with_args(1, &args) {
                    Ok(_) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                    Err(e) => {
                        limited!(Level::Warn, "io_uring_enter: {e}");
                        break;
                    }
                }
                self.queued = self.ring.submission().len();
                self.reap();
                if self.slots[i].state != SlotState::Posted {
                    break;
                }
            }
            if self.slots[i].state == SlotState::Posted {
                limited!(
                    Level::Error,
                    "io_uring: a fault FD read did not end when cancelled; its buffer is left \
                     to the kernel"
                );
            }
        }
        let s = &mut self.slots[i];
        let lost = match s.state {
            SlotState::Done(n) => usize::try_from(n).unwrap_or(0),
            SlotState::Posted => {
                // Still the kernel's: never hand it out again.
                std::mem::forget(s.buf.take());
                0
            }
            _ => 0,
        };
        if let Some(b) = s.buf.take() {
            s.free.push(b);
        }
        s.state = SlotState::Off;
        s.fd = -1;
        lost
    }

    /// Post the reads of the sources that have none in the kernel (queued;
    /// `submit` sends them).
    pub(crate) fn arm(&mut self) {
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if s.state != SlotState::Idle || s.fd < 0 {
                continue;
            }
            let Some(mut buf) = s.free.pop() else {
                continue;
            };
            let source = if i == 0 {
                SourceId::Virtual
            } else {
                SourceId::Kernel
            };
            let len = u32::try_from(buf.len()).expect("a 2560-byte buffer");
            let fd = s.fd;
            let read = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), len)
                .build()
                .user_data(Tag::Read(source).encode());
            s.buf = Some(buf);
            s.state = SlotState::Posted;
            if source == SourceId::Kernel {
                // The kernel's fault FD answers a read with 0 when nothing
                // is pending, never EAGAIN: the read waits behind a poll
                // for POLLIN (linked; both in one submission).
                let free = {
                    let sq = self.ring.submission();
                    sq.capacity() - sq.len()
                };
                if free < 2 {
                    self.enter(0);
                }
                let poll =
                    opcode::PollAdd::new(types::Fd(fd), u32::from(libc::POLLIN.cast_unsigned()))
                        .build()
                        .flags(
                            io_uring::squeue::Flags::IO_LINK
                                | io_uring::squeue::Flags::SKIP_SUCCESS,
                        )
                        .user_data(Tag::Poll.encode());
                self.push(&poll);
            }
            self.push(&read);
        }
    }

    /// Queue one entry, submitting first if the queue is full.
    fn push(&mut self, e: &io_uring::squeue::Entry) {
        loop {
            // SAFETY: every buffer an entry names (a slot's `buf`, a
            // response of `responses`) lives in this ring until its
            // completion is reaped: reads are taken out only once `Done`,
            // `remove_source` and Drop wait for cancelled ones, and
            // `write_responses` waits for all of its writes.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                self.queued += 1;
                return;
            }
            self.enter(0);
        }
    }

    /// Submit what is queued (none queued: no system call).
    pub(crate) fn submit(&mut self) {
        if self.queued > 0 {
            self.enter(0);
        }
    }

    /// One io_uring_enter: submit what is queued and wait for `want`
    /// completions.
    fn enter(&mut self, want: usize) {
        self.counters.enters += 1;
        match self.ring.submit_and_wait(want) {
            Ok(_) => self.queued = self.ring.submission().len(),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => limited!(Level::Warn, "io_uring_enter: {e}"),
        }
    }

    /// Take the completions off the ring into the slots and results.
    /// True if a read completed.
    pub(crate) fn reap(&mut self) -> bool {
        let mut read = false;
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            match Tag::decode(cqe.user_data()) {
                Some(Tag::Read(s)) => {
                    let slot = &mut self.slots[slot_of(s)];
                    if slot.state == SlotState::Posted {
                        slot.state = SlotState::Done(cqe.result());
                        read = true;
                    }
                }
                Some(Tag::Write(i)) => self.results[i] = Some(cqe.result()),
                // A failed poll: its linked read completes with the error.
                Some(Tag::Cancel | Tag::Poll) => {}
                None => limited!(
                    Level::Warn,
                    "io_uring: a completion we did not ask for ({:#x})",
                    cqe.user_data()
                ),
            }
        }
        if read && !self.in_pass {
            self.reaped_elsewhere = true;
        }
        read
    }

    /// A completed read of `source`, if there is one (its slot is ready to
    /// be armed again with the spare buffer).
    pub(crate) fn take_done(&mut self, source: SourceId) -> Option<ReadDone> {
        let s = &mut self.slots[slot_of(source)];
        let SlotState::Done(result) = s.state else {
            return None;
        };
        s.state = if s.fd >= 0 {
            SlotState::Idle
        } else {
            SlotState::Off
        };
        if result > 0 {
            self.counters.reads += 1;
        }
        Some(ReadDone {
            source,
            result,
            buf: s.buf.take()?,
        })
    }

    /// The relay is done with a read's buffer.
    pub(crate) fn give_back(&mut self, done: ReadDone) {
        let s = &mut self.slots[slot_of(done.source)];
        if s.free.len() < 2 {
            s.free.push(done.buf);
        }
    }

    /// Is a read of `source` completed and not yet taken?
    pub(crate) fn has_done(&self) -> bool {
        self.slots
            .iter()
            .any(|s| matches!(s.state, SlotState::Done(_)))
    }

    /// Write `responses` (struct iommu_hwpt_page_response, 8 bytes each) to
    /// the kernel's fault FD, with whatever is queued (re-armed reads), in
    /// one io_uring_enter per WRITE_BATCH; `each(i, outcome)` for every
    /// one once written. Waits for the writes: they are done on return.
    pub(crate) fn write_responses(
        &mut self,
        responses: &[[u8; RESPONSE_LEN]],
        each: &mut dyn FnMut(usize, Written),
    ) {
        let fd = self.slots[slot_of(SourceId::Kernel)].fd;
        for (base, chunk) in responses.chunks(WRITE_BATCH).enumerate() {
            let base = base * WRITE_BATCH;
            if fd < 0 {
                for i in 0..chunk.len() {
                    each(base + i, Written::Failed(libc::EBADF));
                }
                continue;
            }
            for (i, r) in chunk.iter().enumerate() {
                self.responses[i] = *r;
                self.results[i] = None;
                let w =
                    opcode::Write::new(types::Fd(fd), self.responses[i].as_ptr(), RESPONSE_LEN_U32)
                        .build()
                        .user_data(Tag::Write(i).encode());
                self.push(&w);
            }
            let mut missing = chunk.len();
            // They complete inline (the fault FD is always writable): one
            // enter. A kernel that defers them is waited for.
            let mut tries = 0;
            while missing > 0 {
                self.enter(missing);
                self.reap();
                missing = self.results[..chunk.len()]
                    .iter()
                    .filter(|r| r.is_none())
                    .count();
                tries += 1;
                if tries > 1000 {
                    // Never seen; the buffers stay (they are the ring's).
                    limited!(
                        Level::Error,
                        "io_uring: {missing} response writes never completed"
                    );
                    break;
                }
            }
            for i in 0..chunk.len() {
                let w = match self.results[i].take() {
                    Some(n) if usize::try_from(n) == Ok(RESPONSE_LEN) => Written::Taken,
                    Some(e) if e == -libc::EINVAL => Written::Stale,
                    Some(e) if e < 0 => Written::Failed(-e),
                    Some(_) | None => Written::Failed(libc::EIO),
                };
                match w {
                    Written::Taken => self.counters.responses_written += 1,
                    Written::Stale => self.counters.responses_stale += 1,
                    Written::Failed(_) => self.counters.responses_failed += 1,
                }
                each(base + i, w);
            }
        }
    }
}

impl Drop for FaultRing {
    fn drop(&mut self) {
        // The kernel must be done with our buffers before they go.
        self.remove_source(SourceId::Virtual);
        self.remove_source(SourceId::Kernel);
    }
}

/// Make `fd` non-blocking. The kernel's fault FD has only read() and
/// write() file operations, which io_uring calls with IOCB_NOWAIT only on a
/// file opened O_NONBLOCK: without it every read and write is handed to an
/// io-wq kernel thread (measured: 20x the backend's CPU per batched fault in
/// the kernel tier). The fault FD never blocks either way; its read answers
/// 0 when nothing is pending, so the ring's read waits behind a poll.
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL and F_SETFL only read and change the flags of an fd
    // the caller owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The ring `mode` asks for: Ok(None) for epoll; for `auto`, epoll when the
/// kernel refuses io_uring (the reason is returned for the start-up line).
pub(crate) fn open(mode: FaultIo) -> Result<(Option<FaultRing>, Option<String>), RingError> {
    match mode {
        FaultIo::Epoll => Ok((None, None)),
        FaultIo::IoUring => FaultRing::new().map(|r| (Some(r), None)),
        FaultIo::Auto => match FaultRing::new() {
            Ok(r) => Ok((Some(r), None)),
            Err(e) => Ok((None, Some(e.to_string()))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::FromRawFd;

    #[test]
    fn tags_round_trip_and_foreign_ones_are_refused() {
        for t in [
            Tag::Read(SourceId::Virtual),
            Tag::Read(SourceId::Kernel),
            Tag::Write(0),
            Tag::Write(WRITE_BATCH - 1),
            Tag::Cancel,
            Tag::Poll,
        ] {
            assert_eq!(Tag::decode(t.encode()), Some(t));
        }
        assert_eq!(Tag::decode(0), None);
        assert_eq!(Tag::decode((3 << TAG_SHIFT) | WRITE_BATCH as u64), None);
        assert_eq!(Tag::decode((1 << TAG_SHIFT) | 1), None);
        assert_eq!(Tag::decode(u64::MAX), None);
    }

    fn pipe() -> (std::fs::File, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we pass.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        assert_eq!(rc, 0);
        // SAFETY: both fds are new and ours alone.
        unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    /// A read posted before the records arrive completes with them; the
    /// next one goes into the other buffer while they are relayed; a
    /// posted read is cancelled and waited for when its source goes.
    #[test]
    fn reads_are_posted_in_advance_and_cancelled_when_the_source_goes() {
        let Ok(mut ring) = FaultRing::new() else {
            eprintln!("SKIPPED: no io_uring here");
            return;
        };
        let (r, mut w) = pipe();
        ring.set_source(SourceId::Virtual, r.as_raw_fd());
        ring.arm();
        ring.submit();
        assert!(!ring.reap(), "nothing written yet");
        w.write_all(&[7u8; PGFAULT_LEN * 3]).unwrap();
        let mut done = None;
        for _ in 0..1000 {
            // The read completes as task work of this thread: entering the
            // kernel runs it.
            ring.enter(0);
            ring.reap();
            done = ring.take_done(SourceId::Virtual);
            if done.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let done = done.expect("the posted read completed");
        assert_eq!(usize::try_from(done.result), Ok(PGFAULT_LEN * 3));
        assert!(done.buf[..PGFAULT_LEN * 3].iter().all(|&b| b == 7));
        // Re-armed into the spare buffer while `done` is still out.
        ring.arm();
        ring.submit();
        assert!(ring.slots[0].buf.is_some() && ring.slots[0].free.is_empty());
        ring.give_back(done);
        assert_eq!(ring.remove_source(SourceId::Virtual), 0);
        assert_eq!(ring.slots[0].state, SlotState::Off);
        assert_eq!(ring.slots[0].free.len(), 2, "both buffers came back");
        drop(w);
    }

    /// Responses go out one write each in one enter; a refused one is
    /// reported alone (a pipe stands in for the fault FD: a closed reader
    /// makes every write fail).
    #[test]
    fn responses_are_written_through_the_ring_and_waited_for() {
        let Ok(mut ring) = FaultRing::new() else {
            eprintln!("SKIPPED: no io_uring here");
            return;
        };
        let (r, w) = pipe();
        ring.slots[1].fd = w.as_raw_fd();
        let rs: Vec<[u8; 8]> = (0..70u8).map(|i| [i; 8]).collect();
        let mut got = Vec::new();
        let before = ring.counters.enters;
        ring.write_responses(&rs, &mut |i, o| got.push((i, o)));
        assert_eq!(got.len(), 70);
        assert!(got
            .iter()
            .enumerate()
            .all(|(n, g)| g.0 == n && g.1 == Written::Taken));
        assert_eq!(ring.counters.enters - before, 2, "one enter per 64");
        let mut back = vec![0u8; 70 * 8];
        assert_eq!(std::io::Read::read(&mut &r, &mut back).unwrap(), 560);
        assert_eq!(&back[8..16], &[1u8; 8]);
        drop(r);
        got.clear();
        ring.write_responses(&rs[..2], &mut |i, o| got.push((i, o)));
        assert_eq!(
            got,
            vec![
                (0, Written::Failed(libc::EPIPE)),
                (1, Written::Failed(libc::EPIPE))
            ]
        );
        ring.slots[1].fd = -1;
        drop(w);
    }
}
