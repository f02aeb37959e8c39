//! vhost-user glue: the `VhostUserBackend` implementation. Queue plumbing
//! only; the request semantics live in `dispatch` and `state`.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::chain::{gather, scatter_gathered, Gathered};
use crate::device::config::{features, DeviceConfig, Limits, BYPASS_OFFSET, CONFIG_SIZE};
use crate::device::dispatch::{
    complete_invalidates, deferrable_invalidate, handle, Reply, MAX_REPLY,
};
use crate::device::poll::PollWindow;
use crate::device::state::{IommuState, NO_RESPONSE};
use crate::device::stats::Stats;
use crate::fault_queue::pages::{FaultRecord, SourceId, PGFAULT_LEN};
use crate::fault_queue::source::{Batch, GroupReader, VirtualSource, MAX_GROUP_RECORDS};
use crate::fault_queue::vevents::VEventCounters;
use crate::fault_queue::{EventFifo, EventRecord, MAX_RECORD_LEN, REASON_UNKNOWN};
use crate::iommufd_bridge::{HostIommu, RamRegion};
use crate::nested::Invalidate;

pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

pub const REQUESTQ: u16 = 0;
pub const EVENTQ: u16 = 1;
const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: usize = 1024;
/// epoll data of the "records pending" eventfd in the eventq worker; values
/// up to NUM_QUEUES are the library's.
pub const EVENTS_PENDING: u64 = NUM_QUEUES as u64 + 1;
/// epoll data of the virtual endpoints' fault FD in the eventq worker.
pub const VIRTUAL_FAULTS: u64 = NUM_QUEUES as u64 + 2;
/// epoll data of the kernel's fault queue FD (host endpoints).
pub const KERNEL_FAULTS: u64 = NUM_QUEUES as u64 + 3;
/// epoll data of the vIOMMU's vEVENTQ FD (unrecoverable faults).
pub const KERNEL_EVENTS: u64 = NUM_QUEUES as u64 + 4;
/// Records read from a fault FD at once (a stack buffer: no allocation per
/// fault).
const FAULT_BATCH: usize = 64;

/// The guest-facing state, behind one lock with short critical sections.
pub struct Session {
    pub iommu: IommuState,
    pub stats: Stats,
    pub acked_features: u64,
    pub mem: GuestMemory,
}

/// Records for the eventq and the eventfd that wakes its worker.
pub struct EventChannel {
    fifo: Mutex<EventFifo>,
    notify: EventFd,
}

impl EventChannel {
    fn new(capacity: usize) -> io::Result<Self> {
        Ok(EventChannel {
            fifo: Mutex::new(EventFifo::new(capacity)),
            notify: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Queue a record and wake the eventq worker. False if it was lost
    /// (the bound was hit; counted and logged by the FIFO).
    pub fn send(&self, rec: EventRecord) -> bool {
        let queued = self.fifo.lock().unwrap().push(rec);
        if queued {
            if let Err(e) = self.notify.write(1) {
                warn!("cannot wake the eventq worker: {e}");
            }
        }
        queued
    }

    pub fn fifo(&self) -> MutexGuard<'_, EventFifo> {
        self.fifo.lock().unwrap()
    }

    pub fn notify_fd(&self) -> &EventFd {
        &self.notify
    }
}

pub struct IommuBackend {
    session: Mutex<Session>,
    /// Adaptive busy-polling of the requestq (`--poll-us`).
    poll: Mutex<Polling>,
    pub events: EventChannel,
    /// Page requests of virtual endpoints (the control socket's `dma`).
    pub virtual_faults: VirtualSource,
    /// This connection's kernel fault queue (host endpoints), for reading.
    kernel_faults: Mutex<Option<File>>,
    /// Whole-group reads of the kernel's fault FD (the eventq worker's; taken
    /// before `kernel_faults` and the session).
    fault_reader: Mutex<GroupReader>,
    /// Adds an FD to the eventq worker's epoll (set per connection).
    registrar: Mutex<Option<Registrar>>,
    /// Exit-event FDs the library leaks (see `exit_event`), closed at the
    /// end of their connection.
    exit_consumers: Mutex<Vec<RawFd>>,
    /// The vIOMMU's vEVENTQ (host endpoints), for reading: the FD and the
    /// size of each event's data; and what came through it.
    kernel_events: Mutex<Option<(File, usize, usize)>>,
    pub vevents: Mutex<VEventCounters>,
}

/// Registers (fd, epoll data) with the eventq worker (`true`), or removes
/// it (`false`).
pub type Registrar = Box<dyn Fn(RawFd, u64, bool) -> io::Result<()> + Send>;

thread_local! {
    static NAMED: Cell<bool> = const { Cell::new(false) };
}

/// The library names every worker "vring_worker"; give ours their role.
fn name_worker_thread(thread_id: usize) {
    if NAMED.with(|n| n.replace(true)) {
        return;
    }
    let name: &[u8] = if thread_id == 0 {
        b"viommu-reqq\0"
    } else {
        b"viommu-evtq\0"
    };
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes
    // from a valid pointer; it only renames the calling thread.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// The name vhost-user-backend gives the thread that handles the frontend's
/// messages (the daemon's name).
pub const FRONTEND_THREAD: &str = "viommu-vhost";

/// On the frontend handler's thread (the daemon calls some backend methods
/// from the main thread while setting up): its seccomp filter, once. The
/// thread already holds, from its start, the filter of the thread that
/// accepted the frontend (`Role::StartHandler`: this list plus accept and
/// threads); this drops those at the first callback.
fn narrow_frontend_thread() {
    if std::thread::current().name() == Some(FRONTEND_THREAD) {
        crate::sandbox::narrow_or_warn(crate::sandbox::Role::Frontend);
    }
}

/// The requestq's polling window, when its last request was served, and
/// what polling did (the control socket's `stats`).
struct Polling {
    window: PollWindow,
    last_served: Option<Instant>,
    counters: PollCounters,
}

/// Requestq wakeups (kicks the worker was woken for) and requests served by
/// polling instead.
#[derive(Debug, Default, Clone, Copy)]
pub struct PollCounters {
    pub wakeups: u64,
    pub served_polling: u64,
}

impl Polling {
    fn new(max: Duration) -> Self {
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
        self.window.current()
    }
}

/// The memory table's regions, as the host IOMMU maps them.
fn ram_regions(mem: &GuestMemory) -> Vec<RamRegion> {
    mem.memory()
        .iter()
        .map(|r| RamRegion {
            gpa: r.start_addr().0,
            len: r.len(),
            host_va: r.as_ptr() as u64,
            file: r.file_offset().map(|f| (f.file().as_raw_fd(), f.start())),
        })
        .collect()
}

impl IommuBackend {
    pub fn new(
        config: DeviceConfig,
        limits: Limits,
        endpoints: &[u32],
        mem: GuestMemory,
    ) -> io::Result<Self> {
        Ok(IommuBackend {
            poll: Mutex::new(Polling::new(Duration::ZERO)),
            session: Mutex::new(Session {
                iommu: IommuState::new(config, limits, endpoints),
                stats: Stats::default(),
                acked_features: 0,
                mem,
            }),
            events: EventChannel::new(limits.max_events)?,
            virtual_faults: VirtualSource::new()?,
            kernel_faults: Mutex::new(None),
            fault_reader: Mutex::new(GroupReader::default()),
            registrar: Mutex::new(None),
            kernel_events: Mutex::new(None),
            vevents: Mutex::new(VEventCounters::default()),
            exit_consumers: Mutex::new(Vec::new()),
        })
    }

    /// How to add FDs to this connection's eventq worker (None: no
    /// connection).
    pub fn set_registrar(&self, r: Option<Registrar>) {
        *self.registrar.lock().unwrap() = r;
    }

    /// Poll the vIOMMU's vEVENTQ from now on, if there is one; what waited
    /// in it from before this guest is dropped.
    fn watch_kernel_events(&self, s: &Session) {
        let mut ke = self.kernel_events.lock().unwrap();
        if ke.is_some() {
            return;
        }
        let Some((file, len, id_at)) = s.iommu.event_queue_reader() else {
            return;
        };
        let registered = match self.registrar.lock().unwrap().as_ref() {
            Some(reg) => reg(file.as_raw_fd(), KERNEL_EVENTS, true),
            None => return,
        };
        match registered {
            Ok(()) => {
                *ke = Some((file, len, id_at));
                drop(ke);
                let stale = self.read_events(false);
                if stale > 0 {
                    info!("vEVENTQ: {stale} events from before this guest dropped");
                }
            }
            Err(e) => error!("cannot poll the vEVENTQ: {e}"),
        }
    }

    /// Read the vEVENTQ dry; with `relay`, each event becomes a fault record
    /// for the eventq (unrecoverable: reason UNKNOWN, the endpoint its
    /// vDEVICE names). Returns how many events were read.
    fn read_events(&self, relay: bool) -> u64 {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        loop {
            let n = {
                let mut ke = self.kernel_events.lock().unwrap();
                let Some((file, ..)) = ke.as_mut() else {
                    return total;
                };
                match std::io::Read::read(file, &mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => {
                        warn!("vEVENTQ read: {e}");
                        0
                    }
                }
            };
            if n == 0 {
                return total;
            }
            let (len, id_at) = self
                .kernel_events
                .lock()
                .unwrap()
                .as_ref()
                .map_or((4, 0), |k| (k.1, k.2));
            let s = self.session();
            let mut fifo = self.events.fifo();
            let mut c = self.vevents.lock().unwrap();
            let before = c.received;
            c.parse(&buf[..n], len, |data| {
                let virt_id = data
                    .get(id_at..id_at + 4)
                    .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()));
                if relay && s.iommu.has_endpoint(virt_id) {
                    fifo.push(EventRecord::Fault {
                        reason: REASON_UNKNOWN,
                        flags: 0,
                        endpoint: virt_id,
                        address: 0,
                        pasid: None,
                    });
                }
            });
            total += c.received - before;
        }
    }

    /// A request made the host's fault queue: poll it from now on.
    fn watch_kernel_faults(&self, s: &Session) {
        let mut kf = self.kernel_faults.lock().unwrap();
        if kf.is_some() {
            return;
        }
        let Some(file) = s.iommu.fault_queue_reader() else {
            return;
        };
        let registered = match self.registrar.lock().unwrap().as_ref() {
            Some(reg) => reg(file.as_raw_fd(), KERNEL_FAULTS, true),
            None => Err(io::Error::other("no connection")),
        };
        match registered {
            Ok(()) => *kf = Some(file),
            Err(e) => error!("cannot poll the fault queue: {e}"),
        }
    }

    /// Carry out what the page-request bookkeeping decided: responses to
    /// their sources, and records of completed groups out of the FIFO.
    /// Called with the session lock held (so a `dma` that times out sees a
    /// consistent picture), before the FIFO lock.
    pub fn flush_pages(&self, s: &mut Session) {
        // The kernel's responses go in one write per 64 (its write() takes
        // many); a virtual one wakes its `dma` at once.
        let mut kernel = [NO_RESPONSE; 64];
        let mut n = 0;
        while let Some(r) = s.iommu.pages.pop_response() {
            match r.source {
                SourceId::Virtual => self.virtual_faults.respond(r.cookie, r.code),
                SourceId::Kernel => {
                    kernel[n] = r;
                    n += 1;
                    if n == kernel.len() {
                        s.iommu.respond_host_faults(&kernel);
                        n = 0;
                    }
                }
            }
        }
        if n > 0 {
            s.iommu.respond_host_faults(&kernel[..n]);
        }
        if let Some(first) = s.iommu.pages.pop_purged() {
            let mut fifo = self.events.fifo();
            fifo.remove_group(first.0, first.1);
            while let Some((ep, group)) = s.iommu.pages.pop_purged() {
                fifo.remove_group(ep, group);
            }
        }
    }

    /// Read a fault FD dry and relay its records: one path for the kernel's
    /// fault queue and the virtual endpoints'.
    fn read_faults(&self, source: SourceId) {
        let mut buf = [0u8; PGFAULT_LEN * FAULT_BATCH];
        loop {
            let n = match source {
                SourceId::Virtual => match self.virtual_faults.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        warn!("virtual fault FD: {e}");
                        return;
                    }
                },
                SourceId::Kernel => match self.read_kernel_faults(&mut buf) {
                    Some(n) => n,
                    None => return,
                },
            };
            if n == 0 {
                return;
            }
            self.relay_faults(source, &buf[..n * PGFAULT_LEN]);
            if n < FAULT_BATCH {
                return;
            }
        }
    }

    /// One read of the kernel's fault FD into `buf`: how many records are
    /// there, or None when there are none. A group too large for `buf` is
    /// read into the reader's own buffer and relayed from there (FAULT_BATCH
    /// is returned: read on). One that is too large for that too stops the
    /// watch on the FD rather than spin: the kernel completes it when the
    /// device detaches.
    fn read_kernel_faults(&self, buf: &mut [u8]) -> Option<usize> {
        let mut reader = self.fault_reader.lock().unwrap();
        let read = {
            let mut kf = self.kernel_faults.lock().unwrap();
            reader.read(kf.as_mut()?, buf)
        };
        match read {
            Ok(Batch::Small(n)) => Some(n),
            Ok(Batch::Empty) => None,
            Ok(Batch::Big(n)) => {
                debug!("fault queue: a read of {n} records (a group larger than {FAULT_BATCH})");
                self.relay_faults(SourceId::Kernel, reader.big(n));
                Some(FAULT_BATCH)
            }
            Ok(Batch::Stuck) => {
                error!(
                    "fault queue: a page-request group of more than {MAX_GROUP_RECORDS} records \
                     cannot be read; no longer polling the fault queue (the kernel completes \
                     the group when its device detaches)"
                );
                if let Some(f) = self.kernel_faults.lock().unwrap().as_ref() {
                    if let Some(reg) = self.registrar.lock().unwrap().as_ref() {
                        let _ = reg(f.as_raw_fd(), KERNEL_FAULTS, false);
                    }
                }
                None
            }
            Err(e) => {
                warn!("Kernel fault FD: {e}");
                None
            }
        }
    }

    /// Relay whole groups of records read from `source`.
    fn relay_faults(&self, source: SourceId, bytes: &[u8]) {
        let count = bytes.len() / PGFAULT_LEN;
        let mut stack = [FaultRecord::default(); FAULT_BATCH];
        // Only a group larger than a stack batch allocates (a cold path).
        let mut heap = Vec::new();
        let recs: &mut [FaultRecord] = if count <= FAULT_BATCH {
            &mut stack[..count]
        } else {
            heap.resize(count, FaultRecord::default());
            &mut heap
        };
        let mut kept = 0;
        let mut s = self.session();
        for chunk in bytes.chunks_exact(PGFAULT_LEN) {
            let r = FaultRecord::parse(chunk.try_into().expect("40-byte chunk"));
            if source == SourceId::Virtual && self.virtual_faults.take_cancelled(r.cookie) {
                // Its `dma` timed out before we got here.
                s.iommu.pages.note_cancelled();
                continue;
            }
            recs[kept] = r;
            kept += 1;
        }
        let acked = s.acked_features;
        let mut fifo = self.events.fifo();
        s.iommu
            .accept_page_requests(source, &recs[..kept], acked, &mut fifo);
        drop(fifo);
        self.flush_pages(&mut s);
    }

    /// Requestq wakeups and requests served by polling, and the current
    /// polling window.
    pub fn poll_stats(&self) -> (PollCounters, Duration) {
        let p = self.poll.lock().unwrap();
        (p.counters, p.window.current())
    }

    /// Busy-poll the requestq for up to `max` after serving it, adaptively
    /// (zero: never).
    pub fn with_poll(self, max: Duration) -> Self {
        *self.poll.lock().unwrap() = Polling::new(max);
        self
    }

    /// Serve host endpoints (VFIO, selftest) through `host`.
    pub fn with_host(self, host: Box<dyn HostIommu>) -> Self {
        self.session().iommu.set_host(host);
        self
    }

    pub fn session(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap()
    }

    /// A new frontend connected: fresh guest memory, state as at power-on.
    pub fn begin_session(&self, mem: GuestMemory) {
        let mut s = self.session();
        s.iommu.begin_session();
        s.acked_features = 0;
        s.mem = mem;
        self.flush_pages(&mut s);
    }

    /// The frontend went away: drop everything that guest made us hold.
    pub fn end_session(&self) {
        let mut s = self.session();
        // Our copy of the fault queue FD first: the host destroys the queue.
        drop(self.kernel_faults.lock().unwrap().take());
        drop(self.kernel_events.lock().unwrap().take());
        // The last reference to the connection's epoll handler; then the
        // exit eventfds the library leaked (its workers are joined).
        self.set_registrar(None);
        for fd in self.exit_consumers.lock().unwrap().drain(..) {
            // SAFETY: the library gave this fd up with into_raw_fd() and
            // its epoll and workers are gone with the daemon: nothing else
            // refers to it, and it is closed exactly once (drained).
            unsafe { libc::close(fd) };
        }
        s.iommu.disconnect();
        s.acked_features = 0;
        s.mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        self.flush_pages(&mut s);
        drop(s);
        // Page requests still on their way: no driver, completed at once.
        self.read_faults(SourceId::Virtual);
        self.events.fifo().discard_all();
    }

    /// Serve every available request. Errors of the guest's ring (bad
    /// addresses, indices) are logged and end this pass; they never reach
    /// the worker loop, which would stop serving the queue for good.
    fn process_requestq(&self, vring: &VringRwLock) -> io::Result<()> {
        let window = self.poll.lock().unwrap().kicked(Instant::now());
        let last = if window.is_zero() {
            (self.serve_requestq(vring, false) > 0).then(Instant::now)
        } else {
            // Kicks stay off from this first pass on: the poll follows.
            let first = (self.serve_requestq(vring, true) > 0).then(Instant::now);
            self.poll_requestq(vring, window, first)
        };
        if last.is_some() {
            self.poll.lock().unwrap().last_served = last;
        }
        Ok(())
    }

    /// Busy-poll (--poll-us): a driver that sends its next request at once
    /// (the next MAP, a PAGE_RESP after a page request) is served without a
    /// wakeup, and is asked not to notify meanwhile (no kick, no exit).
    /// Polls until `window` passes without a request after the last one
    /// served (`last`; none: nothing to wait for), then turns kicks back
    /// on. Returns when the last request was served.
    fn poll_requestq(
        &self,
        vring: &VringRwLock,
        window: Duration,
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
        if let Some(mut since) = last {
            suppress_kicks(vring, mem.deref());
            while Instant::now() < since + window {
                let served = if pending(vring) {
                    self.serve_requestq(vring, true)
                } else {
                    0
                };
                if served > 0 {
                    suppress_kicks(vring, mem.deref());
                    polled += served as u64;
                    since = Instant::now();
                    last = Some(since);
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
            let served = self.serve_requestq(vring, false);
            if served > 0 {
                polled += served as u64;
                last = Some(Instant::now());
            }
        }
        self.poll.lock().unwrap().counters.served_polling += polled;
        last
    }

    /// One pass over the requestq; returns how many chains it served.
    /// `polling`: the caller looks again at once, so kicks stay off (asking
    /// for one before returning would let a fast driver kick meanwhile).
    fn serve_requestq(&self, vring: &VringRwLock, polling: bool) -> usize {
        let mut vr = vring.get_mut();
        // Stopped (GET_VRING_BASE) while this worker polled: hands off.
        if !vr.get_queue().ready() {
            return 0;
        }
        let mut served = 0usize;
        let mut session = self.session();
        let s = &mut *session;
        let mem = s.mem.memory();
        let mut g = Gathered::new();
        let mut out = [0u8; MAX_REPLY];
        let size = vr.get_queue().size();
        // INVALIDATEs waiting for the end of their run (one host call).
        let mut deferred: Deferred<_> = Vec::new();
        let result = (|| -> Result<(), virtio_queue::Error> {
            loop {
                vr.disable_notification()?;
                let mut popped = 0usize;
                while let Some(chain) = vr.get_queue_mut().pop_descriptor_chain(mem.deref()) {
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
                    if let Err(e) = gather(&chain, &mut g) {
                        debug!("unusable request chain: {e}");
                        s.stats
                            .count_unanswered(g.bytes().first().copied().unwrap_or(0));
                        vr.add_used(chain.head_index(), 0)?;
                        continue;
                    }
                    let acked = s.acked_features;
                    match deferrable_invalidate(&s.iommu, acked, g.bytes(), g.writable_len) {
                        Some(inv) if deferred.first().is_none_or(|d| d.2.domain == inv.domain) => {
                            deferred.push((chain, g.clone(), inv));
                            continue;
                        }
                        _ => flush_invalidates(s, &mut deferred, &mut vr)?,
                    }
                    let used = serve_request(s, &chain, &g, &mut out);
                    vr.add_used(chain.head_index(), used as u32)?;
                }
                flush_invalidates(s, &mut deferred, &mut vr)?;
                // "More available" with nothing poppable means a broken avail
                // ring (index beyond the queue size): stop until the next kick
                // instead of spinning.
                served += popped;
                if polling || !vr.enable_notification()? || popped == 0 {
                    return Ok(());
                }
            }
        })();
        self.flush_pages(&mut session);
        self.watch_kernel_faults(&session);
        self.watch_kernel_events(&session);
        drop(session);
        if let Err(e) = result {
            debug!("requestq ring unusable: {e}");
        }
        signal_if_needed(&mut vr);
        served
    }

    /// Move queued records into the driver's eventq buffers, in order.
    fn process_eventq(&self, vring: &VringRwLock) -> io::Result<()> {
        let mut vr = vring.get_mut();
        if !vr.is_enabled() || !vr.get_queue().ready() {
            return Ok(());
        }
        // Session before FIFO, as everywhere.
        let mut session = self.session();
        let s = &mut *session;
        let mem = s.mem.memory();
        let mut fifo = self.events.fifo();
        let mut buf = [0u8; MAX_RECORD_LEN];
        let mut g = Gathered::new();
        let size = vr.get_queue().size();
        let result = (|| -> Result<(), virtio_queue::Error> {
            let mut popped_since_enable = true;
            while let Some(rec) = fifo.front().copied() {
                let len = rec.encode(&mut buf);
                let Some(chain) = vr.get_queue_mut().pop_descriptor_chain(mem.deref()) else {
                    // Out of buffers: ask to be kicked when the driver posts
                    // more. Retry once if some arrived meanwhile; never spin
                    // on a broken avail ring.
                    if popped_since_enable && vr.enable_notification()? {
                        popped_since_enable = false;
                        continue;
                    }
                    return Ok(());
                };
                popped_since_enable = true;
                if chain.head_index() >= size {
                    debug!("eventq: head index {} beyond the queue", chain.head_index());
                    continue;
                }
                let used = match gather(&chain, &mut g) {
                    Ok(()) if g.writable_len >= len as u64 => {
                        match scatter_gathered(&chain, &g, &buf[..len]) {
                            Ok(n) => {
                                fifo.delivered();
                                if let EventRecord::PageRequest { last: true, .. } = rec {
                                    let key = rec.group().expect("a page request");
                                    s.iommu.pages.mark_delivered(&key);
                                }
                                n
                            }
                            Err(e) => {
                                debug!("event buffer not written: {e}");
                                0
                            }
                        }
                    }
                    Ok(()) => {
                        debug!(
                            "eventq buffer of {} bytes is too small for a {len}-byte record",
                            g.writable_len
                        );
                        if let Some(key) = rec.group() {
                            // A driver that takes page requests posts 48-byte
                            // buffers; waiting would stall the device.
                            s.iommu.pages.small_buffer(&key);
                            fifo.remove_group(key.0, key.2);
                        }
                        0
                    }
                    Err(e) => {
                        debug!("unusable eventq buffer: {e}");
                        0
                    }
                };
                vr.add_used(chain.head_index(), used as u32)?;
            }
            Ok(())
        })();
        drop(fifo);
        self.flush_pages(s);
        drop(session);
        if let Err(e) = result {
            debug!("eventq ring unusable: {e}");
        }
        signal_if_needed(&mut vr);
        Ok(())
    }
}

/// Deferred INVALIDATEs: their chain, what was gathered, the request.
type Deferred<M> = Vec<(virtio_queue::DescriptorChain<M>, Gathered, Invalidate)>;

/// Send the deferred INVALIDATEs to the host in one call and answer each.
fn flush_invalidates<M>(
    s: &mut Session,
    deferred: &mut Deferred<M>,
    vr: &mut VringState<GuestMemory>,
) -> Result<(), virtio_queue::Error>
where
    M: Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    if deferred.is_empty() {
        return Ok(());
    }
    let reqs: Vec<Invalidate> = deferred.iter().map(|d| d.2).collect();
    let mut statuses = Vec::with_capacity(reqs.len());
    complete_invalidates(&mut s.iommu, &mut s.stats, &reqs, &mut statuses);
    for ((chain, g, _), st) in deferred.drain(..).zip(statuses) {
        let used = scatter_gathered(&chain, &g, &[st as u8, 0, 0, 0]).unwrap_or_else(|e| {
            debug!("INVALIDATE reply not written: {e}");
            0
        });
        vr.add_used(chain.head_index(), used as u32)?;
    }
    Ok(())
}

/// One gathered request chain: handle, scatter; returns the used length.
fn serve_request<M>(
    s: &mut Session,
    chain: &virtio_queue::DescriptorChain<M>,
    g: &Gathered,
    out: &mut [u8; MAX_REPLY],
) -> usize
where
    M: Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    match handle(
        &mut s.iommu,
        &mut s.stats,
        s.acked_features,
        g.bytes(),
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

/// While the device polls the requestq, ask the driver not to notify it:
/// with EVENT_IDX, an avail_event one behind what was consumed (the driver
/// kicks only when its avail index passes it); without, VRING_USED_F_NO_NOTIFY.
fn suppress_kicks<M: vm_memory::GuestMemory>(vring: &VringRwLock, mem: &M) {
    use vm_memory::{Bytes, GuestAddress};
    let mut vr = vring.get_mut();
    let q = vr.get_queue_mut();
    if !q.ready() {
        // Stopped: no more writes to the ring.
        return;
    }
    if !q.event_idx_enabled() {
        let _ = q.disable_notification(mem);
        return;
    }
    // avail_event follows the used ring: flags, idx, ring[size].
    let at = q.used_ring() + 4 + 8 * u64::from(q.size());
    let behind = q.next_avail().wrapping_sub(1);
    let _ = mem.store(behind.to_le(), GuestAddress(at), AtomicOrdering::Relaxed);
}

/// Interrupt the driver if the ring's suppression rules ask for it. A ring
/// whose flags cannot be read gets the interrupt (the safe side).
fn signal_if_needed(vr: &mut VringState<GuestMemory>) {
    if vr.needs_notification().unwrap_or(true) {
        if let Err(e) = vr.signal_used_queue() {
            debug!("cannot signal the driver: {e}");
        }
    }
}

impl VhostUserBackend for IommuBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        narrow_frontend_thread();
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | self.session().iommu.config.offered_features()
    }

    fn acked_features(&self, features: u64) {
        narrow_frontend_thread();
        debug!("driver accepted features {features:#x}");
        let mut s = self.session();
        s.acked_features = s.iommu.config.internal_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        narrow_frontend_thread();
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        narrow_frontend_thread();
        info!("device reset: all domains dropped");
        let mut s = self.session();
        s.iommu.reset();
        self.flush_pages(&mut s);
        drop(s);
        self.events.fifo().discard_all();
    }

    // The library applies EVENT_IDX to each vring; the queue loops only use
    // the vrings' notification calls, so there is nothing to keep here.
    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        narrow_frontend_thread();
        let s = self.session();
        let bytes = s.iommu.config.to_bytes(s.iommu.bypass);
        let (off, len) = (offset as usize, size as usize);
        match off.checked_add(len) {
            Some(end) if end <= CONFIG_SIZE => bytes[off..end].to_vec(),
            // An empty reply tells the frontend the read failed.
            _ => {
                warn!("GET_CONFIG {offset}+{size} is outside the {CONFIG_SIZE}-byte config");
                Vec::new()
            }
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        narrow_frontend_thread();
        let off = offset as usize;
        let end = off.checked_add(buf.len()).filter(|&e| e <= CONFIG_SIZE);
        let Some(end) = end else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("SET_CONFIG {offset}+{} is outside the config", buf.len()),
            ));
        };
        if !(off..end).contains(&BYPASS_OFFSET) || end - off != 1 {
            // Guest writes to read-only fields are ignored, not fatal.
            debug!(
                "SET_CONFIG {offset}+{}: only the bypass byte is writable",
                buf.len()
            );
        }
        if !(off..end).contains(&BYPASS_OFFSET) {
            return Ok(());
        }
        let value = buf[BYPASS_OFFSET - off];
        let mut s = self.session();
        if s.acked_features & features::BYPASS_CONFIG == 0 {
            debug!("bypass write without F_BYPASS_CONFIG ignored");
        } else if value > 1 {
            debug!("bypass write of {value} ignored (only 0 or 1)");
        } else {
            match s.iommu.set_bypass(value == 1) {
                Ok(()) => info!("bypass {}", if value == 1 { "on" } else { "off" }),
                Err(e) => error!("bypass {value}: the host refused: {e}"),
            }
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        narrow_frontend_thread();
        debug!("guest memory table updated");
        let regions = ram_regions(&mem);
        let mut s = self.session();
        s.mem = mem;
        if let Err(e) = s.iommu.set_guest_ram(&regions) {
            // Host endpoints' DMA to the regions that failed will fault;
            // the guest and the virtual endpoints are unaffected.
            error!("guest RAM for host endpoints: {e}");
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker for the requestq, one for the eventq and its sources.
        vec![1 << REQUESTQ, 1 << EVENTQ]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        // vhost-user-backend 0.24 registers the consumer with into_raw_fd()
        // and never closes it: one eventfd per worker per connection. Keep
        // its number and close it when that connection's workers are gone.
        self.exit_consumers
            .lock()
            .unwrap()
            .push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        name_worker_thread(thread_id);
        crate::sandbox::narrow_or_warn(crate::sandbox::Role::Worker);
        if evset != EventSet::IN {
            warn!("unexpected event set {evset:?} on event {device_event}");
            return Ok(());
        }
        // Each worker sees only its own vring, at index 0.
        match (thread_id, u64::from(device_event)) {
            (0, 0) => self.process_requestq(&vrings[0]),
            (1, 0) => self.process_eventq(&vrings[0]),
            (1, EVENTS_PENDING) => {
                // Non-blocking: EAGAIN only means another wakeup drained it.
                let _ = self.events.notify_fd().read();
                self.process_eventq(&vrings[0])
            }
            (1, VIRTUAL_FAULTS) => {
                self.read_faults(SourceId::Virtual);
                self.process_eventq(&vrings[0])
            }
            (1, KERNEL_FAULTS) => {
                self.read_faults(SourceId::Kernel);
                self.process_eventq(&vrings[0])
            }
            (1, KERNEL_EVENTS) => {
                self.read_events(true);
                self.process_eventq(&vrings[0])
            }
            (t, e) => {
                warn!("unexpected event {e} on worker {t}");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> IommuBackend {
        IommuBackend::new(
            DeviceConfig::default(),
            Limits::default(),
            &[1],
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap()
    }

    /// Found by fuzzing: a head index beyond the queue must not make
    /// handle_event fail (the library then stops the worker for good).
    #[test]
    fn head_index_beyond_the_queue_is_dropped_not_fatal() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap(),
        );
        let b = IommuBackend::new(
            DeviceConfig::default(),
            Limits::default(),
            &[1],
            mem.clone(),
        )
        .unwrap();
        b.acked_features(features::DEVICE_FEATURES);
        let vring = VringRwLock::new(mem.clone(), 256).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_info(0x1000, 0x2000, 0x3000).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let m = mem.memory();
        // avail: flags 0, idx 1, ring[0] = 16 (== queue size).
        m.write_obj(0u16, GuestAddress(0x2000)).unwrap();
        m.write_obj(1u16, GuestAddress(0x2002)).unwrap();
        m.write_obj(16u16, GuestAddress(0x2004)).unwrap();
        assert!(b
            .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .is_ok());
        // A valid ATTACH at head 0 is still answered.
        let attach: [u8; 20] = [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        m.write_slice(&attach, GuestAddress(0x4000)).unwrap();
        m.write_obj(0x4000u64, GuestAddress(0x1000)).unwrap();
        m.write_obj(20u32, GuestAddress(0x1008)).unwrap();
        m.write_obj(1u16, GuestAddress(0x100c)).unwrap(); // NEXT
        m.write_obj(1u16, GuestAddress(0x100e)).unwrap();
        m.write_obj(0x5000u64, GuestAddress(0x1010)).unwrap();
        m.write_obj(4u32, GuestAddress(0x1018)).unwrap();
        m.write_obj(2u16, GuestAddress(0x101c)).unwrap(); // WRITE
        m.write_obj(0u16, GuestAddress(0x2006)).unwrap();
        m.write_obj(2u16, GuestAddress(0x2002)).unwrap();
        m.write_obj(0xffu8, GuestAddress(0x5000)).unwrap();
        assert!(b.handle_event(0, EventSet::IN, &[vring], 0).is_ok());
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x5000)).unwrap(),
            0,
            "ATTACH answered OK"
        );
        assert_eq!(b.session().iommu.endpoint(1).unwrap().domain, Some(1));
    }

    #[test]
    fn get_config_is_bounds_checked() {
        let b = backend();
        assert_eq!(b.get_config(0, 40).len(), 40);
        assert_eq!(b.get_config(36, 1), vec![1]);
        assert!(
            b.get_config(36, 8).is_empty(),
            "past the end: failure reply"
        );
        assert!(b.get_config(u32::MAX, 2).is_empty(), "no overflow");
    }

    #[test]
    fn set_config_changes_only_a_valid_bypass_byte() {
        let b = backend();
        b.acked_features(features::BYPASS_CONFIG);
        assert!(b.set_config(36, &[0]).is_ok());
        assert_eq!(b.get_config(36, 1), vec![0]);
        assert!(
            b.set_config(36, &[2]).is_ok(),
            "a guest value is ignored, not fatal"
        );
        assert_eq!(b.get_config(36, 1), vec![0]);
        assert!(b.set_config(0, &[0xff; 37]).is_ok());
        assert_eq!(b.get_config(0, 8), (!0xfffu64).to_le_bytes().to_vec());
        assert_eq!(b.get_config(36, 1), vec![0], "0xff is not 0 or 1: ignored");
        assert!(
            b.set_config(39, &[0, 0]).is_err(),
            "outside the config: frontend error"
        );
        b.acked_features(0);
        assert!(b.set_config(36, &[1]).is_ok());
        assert_eq!(b.get_config(36, 1), vec![0], "needs BYPASS_CONFIG");
    }
}
