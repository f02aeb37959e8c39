// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where page requests come from. The kernel's fault FD
//! (IOMMU_FAULT_QUEUE_ALLOC) and the virtual endpoints' FD deliver the same
//! 40-byte records (struct iommu_hwpt_pgfault), read by one code path
//! (`read_records`) in the eventq worker's epoll. Responses go back by
//! cookie: to the kernel as struct iommu_hwpt_page_response writes, to a
//! virtual endpoint's waiting `dma` through `VirtualSource::respond`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

use log::debug;

use super::pages::{FaultRecord, PGFAULT_F_LAST_PAGE, PGFAULT_F_PASID_VALID, PGFAULT_LEN};
use crate::fast_map::FastMap;

/// Read whole records from a fault FD into `buf` (a multiple of 40 bytes);
/// returns how many. 0: nothing pending (the FD never blocks).
pub fn read_records(fd: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let want = buf.len() / PGFAULT_LEN * PGFAULT_LEN;
    match fd.read(&mut buf[..want]) {
        Ok(n) => {
            if n % PGFAULT_LEN != 0 {
                // Our writers write whole records atomically and the kernel
                // never splits one; a torn read would be a kernel bug.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("fault FD returned {n} bytes, not whole records"),
                ));
            }
            Ok(n / PGFAULT_LEN)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

/// The largest page-request group the reader grows its buffer for
/// (65536 records, 2.5 MiB). PCI PRI puts no limit on a group; the IOMMUs'
/// page-request queues hold a few hundred requests.
pub const MAX_GROUP_RECORDS: usize = 1 << 16;

/// What one read of the kernel's fault FD gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// `n` records in the caller's buffer.
    Small(usize),
    /// `n` records in the reader's own, grown, buffer (`GroupReader::big`).
    Big(usize),
    /// Nothing pending.
    Empty,
    /// A group larger than MAX_GROUP_RECORDS waits: it cannot be read.
    Stuck,
}

/// Reads whole groups from the kernel's fault FD. The kernel returns only
/// whole groups; when the first pending one is larger than the buffer its
/// read() fails with EINVAL (6.12 and 7.x) while the FD stays readable, and
/// a reader that just retries spins. Then a larger buffer (grown on that
/// cold path, kept for next time) takes the group. 0 bytes: nothing pending.
#[derive(Debug, Default)]
pub struct GroupReader {
    big: Vec<u8>,
}

impl GroupReader {
    /// Read from `fd` into `small` (the hot path: a stack buffer), or into
    /// the reader's own buffer when a group does not fit.
    pub fn read(&mut self, fd: &mut impl Read, small: &mut [u8]) -> io::Result<Batch> {
        match read_some(fd, small)? {
            Some(0) => return Ok(Batch::Empty),
            Some(n) => return Ok(Batch::Small(n)),
            None => {}
        }
        let mut size = self.big.len().max(small.len() * 4).max(PGFAULT_LEN);
        while size <= MAX_GROUP_RECORDS * PGFAULT_LEN {
            if self.big.len() < size {
                self.big.resize(size, 0);
            }
            match read_some(fd, &mut self.big[..size])? {
                Some(0) => return Ok(Batch::Empty),
                Some(n) => return Ok(Batch::Big(n)),
                None => size *= 2,
            }
        }
        Ok(Batch::Stuck)
    }

    /// The records of the last `Batch::Big(n)`.
    pub fn big(&self, n: usize) -> &[u8] {
        &self.big[..n * PGFAULT_LEN]
    }
}

/// Records read (0: nothing pending), or None when the first pending group
/// does not fit (EINVAL).
fn read_some(fd: &mut impl Read, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match read_records(fd, buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

enum Waiter {
    Waiting(SyncSender<u16>),
    /// The `dma` gave up before the device read its record.
    Cancelled,
}

struct VirtualState {
    next_cookie: u32,
    waiters: FastMap<u32, Waiter>,
}

/// The virtual endpoints' fault FD: a pipe whose records the eventq worker
/// reads like the kernel's, and the `dma` requests waiting for answers.
pub struct VirtualSource {
    reader: Mutex<File>,
    writer: Mutex<File>,
    read_fd: RawFd,
    state: Mutex<VirtualState>,
}

impl VirtualSource {
    pub fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we pass.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds are new and ours alone.
        let (r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        Ok(VirtualSource {
            read_fd: r.as_raw_fd(),
            reader: Mutex::new(r),
            writer: Mutex::new(w),
            state: Mutex::new(VirtualState {
                next_cookie: 1,
                waiters: FastMap::default(),
            }),
        })
    }

    /// The FD to watch for records.
    pub fn fd(&self) -> RawFd {
        self.read_fd
    }

    /// Read pending records (see `read_records`).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        read_records(&mut *self.reader.lock().unwrap(), buf)
    }

    /// A virtual endpoint's access missed: send one page request (a group
    /// of one record) and return its cookie and where the answer arrives.
    pub fn raise(
        &self,
        endpoint: u32,
        pasid: Option<u32>,
        addr: u64,
        perm: u32,
    ) -> io::Result<(u32, Receiver<u16>)> {
        let (tx, rx) = sync_channel(1);
        let cookie = {
            let mut st = self.state.lock().unwrap();
            // Cookies are never 0 and never two outstanding alike.
            let mut c = st.next_cookie;
            while c == 0 || st.waiters.contains_key(&c) {
                c = c.wrapping_add(1);
            }
            st.next_cookie = c.wrapping_add(1);
            st.waiters.insert(c, Waiter::Waiting(tx));
            c
        };
        let rec = FaultRecord {
            flags: PGFAULT_F_LAST_PAGE | pasid.map_or(0, |_| PGFAULT_F_PASID_VALID),
            dev_id: endpoint,
            pasid: pasid.unwrap_or(0),
            grpid: 0,
            perm,
            addr,
            length: 0,
            cookie,
        };
        // One write of 40 bytes to a pipe is atomic.
        if let Err(e) = self.writer.lock().unwrap().write_all(&rec.encode()) {
            self.state.lock().unwrap().waiters.remove(&cookie);
            return Err(e);
        }
        Ok((cookie, rx))
    }

    /// The answer for `cookie`: to its waiting `dma`, if it still waits.
    pub fn respond(&self, cookie: u32, code: u16) {
        match self.state.lock().unwrap().waiters.remove(&cookie) {
            Some(Waiter::Waiting(tx)) => {
                let _ = tx.try_send(code);
            }
            Some(Waiter::Cancelled) | None => debug!("virtual page request {cookie}: nobody waits"),
        }
    }

    /// The `dma` waiting on `cookie` gives up while its record is still on
    /// its way to the device: the record is dropped when it is read.
    pub fn cancel(&self, cookie: u32) {
        if let Some(w) = self.state.lock().unwrap().waiters.get_mut(&cookie) {
            *w = Waiter::Cancelled;
        }
    }

    /// Was this record's `dma` cancelled? (Forgets it if so.)
    pub fn take_cancelled(&self, cookie: u32) -> bool {
        let mut st = self.state.lock().unwrap();
        if matches!(st.waiters.get(&cookie), Some(Waiter::Cancelled)) {
            st.waiters.remove(&cookie);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault_queue::pages::PERM_WRITE;

    /// The kernel's fault FD as read() sees it: whole groups only; a group
    /// larger than the buffer gives EINVAL; nothing pending, 0.
    struct KernelLike {
        groups: std::collections::VecDeque<usize>,
        reads: usize,
    }

    impl Read for KernelLike {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            let mut done = 0;
            while let Some(&g) = self.groups.front() {
                if g * PGFAULT_LEN > buf.len() - done {
                    break;
                }
                self.groups.pop_front();
                done += g * PGFAULT_LEN;
            }
            if done == 0 && !self.groups.is_empty() {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            Ok(done)
        }
    }

    #[test]
    fn groups_larger_than_the_buffer_are_read_whole_not_spun_on() {
        let mut fd = KernelLike {
            groups: [3, 200, 1, 5000, 2].into_iter().collect(),
            reads: 0,
        };
        let mut r = GroupReader::default();
        let mut small = [0u8; PGFAULT_LEN * 64];
        let mut got = Vec::new();
        loop {
            match r.read(&mut fd, &mut small).unwrap() {
                Batch::Small(n) | Batch::Big(n) => got.push(n),
                Batch::Empty => break,
                Batch::Stuck => panic!("stuck"),
            }
        }
        // Whole groups, several to a read where they fit.
        assert_eq!(got, vec![3, 201, 5002]);
        assert!(fd.reads < 20, "{} reads", fd.reads);
        // The grown buffer is kept: the next large group costs one read.
        fd.groups.push_back(4000);
        fd.reads = 0;
        assert_eq!(r.read(&mut fd, &mut small).unwrap(), Batch::Big(4000));
        assert_eq!(fd.reads, 2);
        assert_eq!(r.big(4000).len(), 4000 * PGFAULT_LEN);
    }

    #[test]
    fn a_group_beyond_the_cap_is_reported_stuck() {
        let mut fd = KernelLike {
            groups: [MAX_GROUP_RECORDS + 1].into_iter().collect(),
            reads: 0,
        };
        let mut small = [0u8; PGFAULT_LEN * 64];
        let mut r = GroupReader::default();
        assert_eq!(r.read(&mut fd, &mut small).unwrap(), Batch::Stuck);
        let mut empty = KernelLike {
            groups: Default::default(),
            reads: 0,
        };
        assert_eq!(r.read(&mut empty, &mut small).unwrap(), Batch::Empty);
        assert_eq!(empty.reads, 1, "nothing pending: one read, no growth");
    }

    #[test]
    fn records_round_trip_through_the_pipe_and_answers_reach_the_waiter() {
        let v = VirtualSource::new().unwrap();
        let mut buf = [0u8; PGFAULT_LEN * 4];
        assert_eq!(v.read(&mut buf).unwrap(), 0, "nothing pending");
        let (c1, rx1) = v.raise(7, Some(3), 0x5000, PERM_WRITE).unwrap();
        let (c2, rx2) = v.raise(8, None, 0x6000, 0).unwrap();
        assert_ne!(c1, c2);
        assert_eq!(v.read(&mut buf).unwrap(), 2);
        let r = FaultRecord::parse(buf[..PGFAULT_LEN].try_into().unwrap());
        assert_eq!(
            (r.dev_id, r.pasid(), r.addr, r.cookie),
            (7, Some(3), 0x5000, c1)
        );
        assert!(r.last());
        v.respond(c1, 0);
        assert_eq!(rx1.try_recv(), Ok(0));
        v.cancel(c2);
        v.respond(c2, 1);
        assert!(rx2.try_recv().is_err(), "a cancelled waiter gets nothing");
        let (c3, _rx3) = v.raise(8, None, 0x7000, 0).unwrap();
        v.cancel(c3);
        assert!(v.take_cancelled(c3));
        assert!(!v.take_cancelled(c3));
    }
}
