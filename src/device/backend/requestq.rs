// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The requestq worker: each pass pops the available chains, serves them
//! (decode, state change, reply: `dispatch`), batches consecutive
//! INVALIDATEs of one domain into one host call, and with `--poll-us` keeps
//! polling for the driver's next request.

use std::io;
use std::ops::Deref;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::{Duration, Instant};

use log::{debug, Level};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{ByteValued, GuestAddressSpace};

use super::ring::{check_avail, pop_chains, suppress_kicks, UsedWriter, POP_BATCH};
use super::{IommuBackend, Session};
use crate::device::chain::{gather, scatter_gathered, Gathered};
use crate::device::dispatch::{
    complete_invalidates, deferrable_invalidate, handle_decoded, Reply, MAX_REPLY,
};
use crate::device::mem_view::{CachedMemory, OneRegion};
use crate::device::poll::{PollWindow, Verdict, WindowRun, CROWD_CHECK, STALL};
use crate::device::request::{decode, Decoded};
use crate::log_limit::limited;
use crate::nested::Invalidate;
use crate::wire::ReqTail;

/// What one pass over the requestq did.
#[derive(Debug, Default, Clone, Copy)]
struct Pass {
    /// Chains served.
    served: usize,
    /// The ring is broken: no polling, nothing more until the next kick.
    ring_stopped: bool,
}

/// The requestq's polling window, when its last request was served, and
/// what polling did (the control socket's `stats`).
pub(super) struct Polling {
    pub(super) window: PollWindow,
    last_served: Option<Instant>,
    pub(super) counters: PollCounters,
}

/// Requestq wakeups (kicks the worker was woken for) and requests served by
/// polling instead.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PollCounters {
    pub wakeups: u64,
    pub served_polling: u64,
    /// Polling stopped because the worker was descheduled while it polled
    /// (`device::poll::STALL`): the host's cores were taken.
    pub stalls: u64,
    /// Polling windows run, and their wall time in total.
    pub windows: u64,
    pub polled: Duration,
    /// Of that time, what the worker did not run (its thread's CPU time
    /// short of the wall time): taken by other threads.
    pub lost: Duration,
    /// Windows without a stall that lost too much of their time to other
    /// threads (`device::poll::LOST_SHARE`): backed off as a stall is.
    pub lost_windows: u64,
    /// Back-offs after `device::poll::IDLE_MAX` windows in a row that
    /// served nothing.
    pub idle_backoffs: u64,
    /// Kicks after which the window would have been open but polling was
    /// backed off.
    pub backed_off: u64,
    /// Windows cut (at their start, or while they polled) because the host
    /// had more runnable threads than CPUs (`device::poll::RunQueues`).
    pub crowded: u64,
    /// Reads of the run queues (/proc/loadavg) while polling.
    pub probe_reads: u64,
}

/// `IommuBackend::poll_stats`: the counters, the adaptive window and the
/// back-off in force.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PollStats {
    pub counters: PollCounters,
    pub window: Duration,
    pub backoff: Duration,
    /// Whether polling reads the run queues (`device::poll::RunQueues`).
    pub gate: bool,
}

impl Polling {
    pub(super) fn new(max: Duration) -> Self {
        Self {
            window: PollWindow::new(max),
            last_served: None,
            counters: PollCounters::default(),
        }
    }

    /// A kick arrived at `now`: learn from the gap since the last request
    /// was served, and say how long to poll after this pass.
    fn kicked(&mut self, now: Instant) -> Duration {
        self.counters.wakeups += 1;
        if let Some(last) = self.last_served.take() {
            self.window.observe(now.saturating_duration_since(last));
        }
        let window = self.window.at(now);
        if window.is_zero() && !self.window.current().is_zero() {
            self.counters.backed_off += 1;
        }
        window
    }
}

/// This thread's CPU time: one system call (the vDSO does not serve
/// thread clocks), made twice per polling window, never per look.
fn thread_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given, which
    // lives until it returns.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u32::try_from(ts.tv_nsec).ok()?;
    Some(Duration::new(secs, nanos))
}

impl IommuBackend {
    /// Serve every available request. Errors of the guest's ring (bad
    /// addresses, indices) are logged and end this pass; they never reach
    /// the worker loop, which would stop serving the queue for good.
    pub(super) fn process_requestq(&self, vring: &VringRwLock) -> io::Result<()> {
        // Read before the bound (set_poll_max sets the bound, then bumps
        // it): a `poll` op from here on ends the window.
        let epoch = self.poll_epoch.load(AtomicOrdering::Acquire);
        let window = self.poll.lock().kicked(Instant::now());
        let last = if window.is_zero() {
            (self.serve_requestq(vring, false).served > 0).then(Instant::now)
        } else {
            // Kicks stay off from this first pass on: the poll follows.
            let pass = self.serve_requestq(vring, true);
            let first = (pass.served > 0).then(Instant::now);
            if pass.ring_stopped {
                // Not polled: left alone until the next kick.
                first
            } else {
                self.poll_requestq(vring, window, epoch, first)
            }
        };
        if last.is_some() {
            self.poll.lock().last_served = last;
        }
        Ok(())
    }

    /// Busy-poll (--poll-us): a driver that sends its next request at once
    /// (the next MAP, a PAGE_RESP after a page request) is served without a
    /// wakeup, and is asked not to notify meanwhile (no kick, no exit).
    /// Polls until `window` passes without a request after the last one
    /// served (`last`; none: nothing to wait for), or a `poll` op changed
    /// the bound (`epoch`: their count when the kick came), then turns
    /// kicks back on. Returns when the last request was served.
    fn poll_requestq(
        &self,
        vring: &VringRwLock,
        window: Duration,
        epoch: u64,
        mut last: Option<Instant>,
    ) -> Option<Instant> {
        let mem = self.session().mem.memory();
        let pending = |vring: &VringRwLock| {
            let vr = vring.get_ref();
            let q = vr.get_queue();
            q.ready()
                && q.avail_idx(mem.deref(), AtomicOrdering::Acquire)
                    .is_ok_and(|a| a.0 != q.next_avail())
        };
        let mut polled = 0u64;
        let mut stalled = false;
        let mut crowded = false;
        let mut probe_reads = 0u64;
        let run_queues = self.run_queues.as_ref();
        let polled_a_window = last.is_some();
        // The window's wall and CPU time, for the time it lost to others.
        let start = Instant::now();
        let cpu_start = if polled_a_window {
            thread_cpu_time()
        } else {
            None
        };
        if let Some(mut since) = last {
            suppress_kicks(vring, mem.deref());
            // When the worker last looked at the ring without serving.
            let mut looked = Instant::now();
            // When to read the run queues next: at once, then every
            // CROWD_CHECK.
            let mut check_at = looked;
            loop {
                let now = Instant::now();
                // First: a time slice lost is usually longer than the
                // window, and must not pass for its end.
                if now.saturating_duration_since(looked) >= STALL {
                    // Descheduled: the cores are taken and polling now
                    // costs the vCPU its time. Kicks from here on.
                    stalled = true;
                    break;
                }
                if now >= since + window || self.poll_epoch.load(AtomicOrdering::Relaxed) != epoch {
                    // Lapsed, or a new bound (`poll` op): kicks again.
                    break;
                }
                if let Some(rq) = run_queues.filter(|_| now >= check_at) {
                    // A thread waits for a CPU: this one must not spin on
                    // it (device::poll::RunQueues).
                    probe_reads += 1;
                    match rq.crowded() {
                        Some(true) => {
                            crowded = true;
                            break;
                        }
                        Some(false) => {}
                        // Read at start-up, so not expected: the other
                        // rules still hold.
                        None => limited!(Level::Warn, "polling: /proc/loadavg unreadable"),
                    }
                    check_at = now + CROWD_CHECK;
                }
                looked = now;
                let pass = if pending(vring) {
                    self.serve_requestq(vring, true)
                } else {
                    Pass::default()
                };
                let served = pass.served;
                if pass.ring_stopped {
                    // Kicks are back on (serve_requestq): wait for one.
                    self.poll.lock().counters.served_polling += polled + served as u64;
                    return if served > 0 {
                        Some(Instant::now())
                    } else {
                        last
                    };
                }
                if served > 0 {
                    suppress_kicks(vring, mem.deref());
                    polled += served as u64;
                    since = Instant::now();
                    last = Some(since);
                    // Serving (host calls included) is not a stall.
                    looked = since;
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        // Kicks on again (unless the ring was stopped meanwhile: the
        // frontend owns it then); a request that came in between is served
        // now.
        let mut vr = vring.get_mut();
        let q = vr.get_queue_mut();
        if q.ready() && q.enable_notification(mem.deref()).unwrap_or(true) {
            drop(vr);
            let served = self.serve_requestq(vring, false).served;
            if served > 0 {
                polled += served as u64;
                last = Some(Instant::now());
            }
        }
        let mut p = self.poll.lock();
        p.counters.served_polling += polled;
        if polled_a_window {
            let now = Instant::now();
            let wall = now.saturating_duration_since(start);
            let lost = cpu_start
                .zip(thread_cpu_time())
                .map(|(a, b)| wall.saturating_sub(b.saturating_sub(a)));
            let run = WindowRun {
                polled: wall,
                lost,
                stalled,
                crowded,
                served: polled,
            };
            let c = &mut p.counters;
            c.windows += 1;
            c.probe_reads += probe_reads;
            c.polled += wall;
            c.lost += lost.unwrap_or_default();
            if stalled {
                c.stalls += 1;
            }
            match p.window.ended(now, run) {
                Verdict::LostTime => p.counters.lost_windows += 1,
                Verdict::Idle => p.counters.idle_backoffs += 1,
                Verdict::Crowded => p.counters.crowded += 1,
                Verdict::Clean | Verdict::Stalled => {}
            }
        }
        last
    }

    /// One pass over the requestq. `polling`: the caller looks again at
    /// once, so kicks stay off (asking for one before returning would let a
    /// fast driver kick meanwhile). A broken avail ring (`check_avail`) is
    /// counted, logged (rate-limited) and left until the next kick, with
    /// kicks back on.
    fn serve_requestq(&self, vring: &VringRwLock, polling: bool) -> Pass {
        let mut vr = vring.get_mut();
        // Stopped (GET_VRING_BASE) while this worker polled: hands off.
        if !vr.get_queue().ready() {
            return Pass::default();
        }
        let mut served = 0usize;
        let mut session = self.session();
        let s = &mut *session;
        let mem = s.mem.memory();
        // Every ring and buffer access of this pass goes through the view
        // (vm-memory's own path costs a region search and an iterator per
        // access: device/mem_view.rs).
        let view = CachedMemory::new(&mem);
        let mut g = Gathered::new();
        let mut out = [0u8; MAX_REPLY];
        let size = vr.get_queue().size();
        // INVALIDATEs waiting for the end of their run (one host call).
        let mut deferred: Deferred<_> = Vec::new();
        let mut broken = None;
        let mut empty_drains = 0u32;
        // Popped a batch at a time: one read of the avail index per batch
        // (virtio-queue's `iter` reads it), not per request. A used ring
        // that cannot be written ends the pass (`?` below) with the rest of
        // the batch unanswered, as the chain being served always was: the
        // driver's ring is broken, nothing can be answered.
        let mut chains: [Option<DescriptorChain<&CachedMemory>>; POP_BATCH] =
            std::array::from_fn(|_| None);
        // Used entries written straight into the ring, the index stored
        // once per batch popped (virtio-queue's `add_used` writes through
        // the generic path and stores the index for every entry).
        let mut used_ring = UsedWriter::new(vr.get_queue(), &view);
        let result = (|| -> Result<(), virtio_queue::Error> {
            loop {
                vr.get_queue_mut().disable_notification(&view)?;
                if let Err(e) = check_avail(vr.get_queue(), &view) {
                    broken = Some(e);
                    return Ok(());
                }
                let mut popped = 0usize;
                loop {
                    let n = match pop_chains(vr.get_queue_mut(), &view, &mut chains) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) => {
                            broken = Some(e);
                            break;
                        }
                    };
                    // By reference: a chain is moved only when deferred.
                    for chain in chains[..n].iter().flatten() {
                        popped += 1;
                        if chain.head_index() >= size {
                            // No used-ring entry can name it: the entry is lost.
                            debug!(
                                "requestq: head index {} beyond the queue",
                                chain.head_index()
                            );
                            s.stats.count_unanswered(0);
                            continue;
                        }
                        if let Err(e) = gather(chain, &mut g) {
                            debug!("unusable request chain: {e}");
                            s.stats
                                .count_unanswered(g.bytes().first().copied().unwrap_or(0));
                            used_ring.add(vr.get_queue(), &view, chain.head_index(), 0)?;
                            continue;
                        }
                        let acked = s.acked_features;
                        // Decoded once, for the batching test and the request.
                        let decoded = decode(g.bytes(), acked);
                        match deferrable_invalidate(&s.iommu, &decoded, g.writable_len) {
                            Some(request)
                                if deferred
                                    .first()
                                    .is_none_or(|d| d.request.domain == request.domain) =>
                            {
                                deferred.push(DeferredInvalidate {
                                    chain: chain.clone(),
                                    gathered: g.clone(),
                                    request,
                                });
                                continue;
                            }
                            _ => flush_invalidates(
                                s,
                                &mut deferred,
                                &mut used_ring,
                                vr.get_queue(),
                                &view,
                            )?,
                        }
                        let used = serve_request(s, chain, &g, &decoded, &mut out);
                        // At most the reply buffer (MAX_REPLY bytes) was written.
                        #[allow(clippy::cast_possible_truncation)]
                        let used = used as u32;
                        used_ring.add(vr.get_queue(), &view, chain.head_index(), used)?;
                    }
                    // The batch's answers shown to the driver (it may be
                    // spinning on them) before the next batch is served.
                    used_ring.flush(vr.get_queue_mut(), &view)?;
                }
                flush_invalidates(s, &mut deferred, &mut used_ring, vr.get_queue(), &view)?;
                used_ring.flush(vr.get_queue_mut(), &view)?;
                served += popped;
                empty_drains = if popped == 0 { empty_drains + 1 } else { 0 };
                if broken.is_some() || polling {
                    return Ok(());
                }
                let more = vr.get_queue_mut().enable_notification(&view)?;
                if !drain_again(more, empty_drains) {
                    return Ok(());
                }
            }
        })();
        if let Some(e) = &broken {
            s.stats.device.requestq_bad_avail += 1;
            // Kicks on, so that the driver's next one wakes us.
            let _ = vr.enable_notification();
            limited!(Level::Warn, "requestq: {e}; not served until the next kick");
        }
        self.relay.flush(&mut *session);
        self.relay.watch(&*session);
        drop(session);
        if let Err(e) = result {
            debug!("requestq ring unusable: {e}");
        }
        // What the pass added is published whatever stopped it; a ring
        // whose used_event cannot be read gets the interrupt (the safe
        // side).
        if used_ring
            .publish(vr.get_queue_mut(), &view)
            .unwrap_or_else(|e| {
                debug!("requestq used ring unusable: {e}");
                true
            })
        {
            if let Err(e) = vr.signal_used_queue() {
                debug!("cannot signal the driver: {e}");
            }
        }
        Pass {
            served,
            ring_stopped: broken.is_some(),
        }
    }
}

/// After a drain of the requestq, with kicks turned back on: whether to
/// drain again. `more`: the driver posted meanwhile; it did not kick (kicks
/// were off), so the request must be served now, even when this drain found
/// nothing (a kick left over from a request an earlier drain served): ending
/// the pass then leaves the request waiting for a kick that never comes.
/// Two empty drains in a row while `more` would come only from a ring whose
/// entries cannot be read (`check_avail` stops those first): stop rather
/// than spin.
fn drain_again(more: bool, empty_drains: u32) -> bool {
    more && empty_drains < 2
}

/// An INVALIDATE waiting for the end of its run.
struct DeferredInvalidate<M> {
    chain: virtio_queue::DescriptorChain<M>,
    gathered: Gathered,
    request: Invalidate,
}

type Deferred<M> = Vec<DeferredInvalidate<M>>;

/// Send the deferred INVALIDATEs to the host in one call and answer each.
/// Called for every request that is not one (nearly always with nothing
/// deferred): the test is inlined, the work is not.
#[inline(always)]
fn flush_invalidates<M>(
    s: &mut Session,
    deferred: &mut Deferred<M>,
    used_ring: &mut UsedWriter<'_>,
    q: &Queue,
    mem: &CachedMemory<'_>,
) -> Result<(), virtio_queue::Error>
where
    M: Deref + Clone,
    M::Target: OneRegion,
{
    if deferred.is_empty() {
        return Ok(());
    }
    flush_deferred(s, deferred, used_ring, q, mem)
}

#[inline(never)]
fn flush_deferred<M>(
    s: &mut Session,
    deferred: &mut Deferred<M>,
    used_ring: &mut UsedWriter<'_>,
    q: &Queue,
    mem: &CachedMemory<'_>,
) -> Result<(), virtio_queue::Error>
where
    M: Deref + Clone,
    M::Target: OneRegion,
{
    let reqs: Vec<Invalidate> = deferred.iter().map(|d| d.request).collect();
    let mut statuses = Vec::with_capacity(reqs.len());
    complete_invalidates(&mut s.iommu, &mut s.stats, &reqs, &mut statuses);
    for (d, st) in deferred.drain(..).zip(statuses) {
        let tail = ReqTail::new(st as u8);
        let used = scatter_gathered(&d.chain, &d.gathered, tail.as_slice()).unwrap_or_else(|e| {
            debug!("INVALIDATE reply not written: {e}");
            0
        });
        // At most the 4-byte tail was written.
        #[allow(clippy::cast_possible_truncation)]
        let used = used as u32;
        used_ring.add(q, mem, d.chain.head_index(), used)?;
    }
    Ok(())
}

/// One gathered request chain: handle, scatter; returns the used length.
fn serve_request<M>(
    s: &mut Session,
    chain: &virtio_queue::DescriptorChain<M>,
    g: &Gathered,
    decoded: &Decoded,
    out: &mut [u8; MAX_REPLY],
) -> usize
where
    M: Deref + Clone,
    M::Target: OneRegion,
{
    match handle_decoded(
        &mut s.iommu,
        &mut s.stats,
        s.acked_features,
        decoded,
        g.writable_len,
        out,
    ) {
        Reply::None => 0,
        Reply::Write { len } => scatter_gathered(chain, g, &out[..len]).unwrap_or_else(|e| {
            debug!("request reply not written: {e}");
            0
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::drain_again;

    #[test]
    fn a_request_found_after_an_empty_drain_is_served() {
        // A stale kick: the first drain pops nothing, then the request
        // posted meanwhile shows up.
        assert!(drain_again(true, 1));
        assert!(drain_again(true, 0));
    }

    #[test]
    fn nothing_more_or_an_unreadable_ring_ends_the_pass() {
        assert!(!drain_again(false, 0));
        assert!(!drain_again(false, 1));
        assert!(!drain_again(true, 2));
    }
}
