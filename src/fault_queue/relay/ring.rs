// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The relay's io_uring side (`--fault-io io-uring`): opening the ring,
//! and relaying the reads it completed (`fault_queue::uring` owns the ring
//! itself; this is where its completions meet the relay).

use super::*;

impl FaultRelay {
    /// Serve the fault FDs as `mode` says (before the first connection).
    /// Returns the mode in force, and for `auto` that fell back to epoll,
    /// why.
    pub fn set_fault_io(&self, mode: FaultIo) -> Result<(FaultIo, Option<String>), RingError> {
        let (ring, why) = uring::open(mode)?;
        let mut r = self.ring.lock();
        *r = ring;
        match r.as_mut() {
            Some(ring) => {
                ring.set_source(SourceId::Virtual, self.virtual_source.fd());
                Ok((FaultIo::IoUring, why))
            }
            None => Ok((FaultIo::Epoll, why)),
        }
    }

    /// The mode in force: epoll or io-uring.
    pub fn fault_io(&self) -> FaultIo {
        if self.ring.lock().is_some() {
            FaultIo::IoUring
        } else {
            FaultIo::Epoll
        }
    }

    /// The ring's FD, which the eventq worker polls instead of the fault
    /// FDs (None: the epoll path).
    pub fn ring_fd(&self) -> Option<RawFd> {
        self.ring.lock().as_ref().map(FaultRing::fd)
    }

    /// What the ring did (None: the epoll path).
    pub fn ring_counters(&self) -> Option<RingCounters> {
        self.ring.lock().as_ref().map(|r| r.counters)
    }

    /// Wake the eventq worker (it posts the ring's reads at its next pass).
    pub fn kick(&self) {
        if let Err(e) = self.notify.write(1) {
            limited!(Level::Warn, "cannot wake the eventq worker: {e}");
        }
    }

    /// The ring is readable, or the eventq worker was woken: relay the
    /// reads that completed, post the next ones, and submit them together
    /// with the responses the relaying wrote (one io_uring_enter). The
    /// eventq worker's only (it posts the reads).
    pub fn ring_ready<G: FaultSink>(&self, session: &Ranked<G>) {
        // Bounded: reads that keep completing at once (a source at EOF)
        // must not hold the worker; it comes back after its other work.
        for _ in 0..64 {
            let done = {
                let mut r = self.ring.lock();
                let Some(ring) = r.as_mut() else {
                    return;
                };
                ring.in_pass = true;
                ring.reaped_elsewhere = false;
                ring.reap();
                [
                    ring.take_done(SourceId::Virtual),
                    ring.take_done(SourceId::Kernel),
                ]
            };
            for d in done.into_iter().flatten() {
                self.relay_ring_read(session, &d);
                if let Some(ring) = self.ring.lock().as_mut() {
                    ring.give_back(d);
                }
            }
            let mut r = self.ring.lock();
            let Some(ring) = r.as_mut() else {
                return;
            };
            // The next reads (into the other buffers), posted and
            // submitted in one lock hold: a read left queued would be
            // submitted by another thread's response write, and the kernel
            // would then complete it as that thread's task work,
            // interrupting it.
            ring.arm();
            ring.submit();
            // Reads completed during the pass (reaped by a response
            // write): relay them now.
            ring.reap();
            if !ring.has_done() {
                ring.in_pass = false;
                return;
            }
        }
        if let Some(ring) = self.ring.lock().as_mut() {
            ring.in_pass = false;
        }
        self.kick();
    }

    /// One completed read of the ring: its records relayed, or its error
    /// handled.
    pub(super) fn relay_ring_read<G: FaultSink>(&self, session: &Ranked<G>, d: &ReadDone) {
        match usize::try_from(d.result) {
            Ok(0) => {}
            Ok(n) if n % PGFAULT_LEN == 0 && n <= d.buf.len() => {
                let mut reader = self.fault_reader.lock();
                self.relay(session, d.source, &d.buf[..n], &mut reader.recs);
            }
            Ok(n) => {
                limited!(
                    Level::Warn,
                    "fault FD returned {n} bytes, not whole records: dropped"
                );
            }
            Err(_) if d.result == -libc::ECANCELED || d.result == -libc::EINTR => {}
            Err(_) if d.result == -libc::EINVAL && d.source == SourceId::Kernel => {
                // A group larger than the ring's buffer: the epoll path's
                // reader takes it (the cold path), then the ring reads on.
                self.source_readable(session, SourceId::Kernel);
            }
            Err(_) if d.source == SourceId::Kernel => {
                // ENOMEM, EBUSY (the kernel's cookie allocation): may pass.
                self.pause_kernel_reads(&io::Error::from_raw_os_error(-d.result));
            }
            Err(_) => {
                limited!(
                    Level::Error,
                    "fault FD read through io_uring: {}; no longer reading it",
                    io::Error::from_raw_os_error(-d.result)
                );
                if let Some(ring) = self.ring.lock().as_mut() {
                    ring.stop(d.source);
                }
            }
        }
    }
}
