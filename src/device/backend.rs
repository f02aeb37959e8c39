//! vhost-user glue: the `VhostUserBackend` implementation. Queue plumbing
//! only; the request semantics live in `dispatch` and `state`.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, Level};
use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, Permissions,
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
use crate::device::lock_order::{Rank, Ranked, RankedGuard};
use crate::device::poll::PollWindow;
use crate::device::state::{IommuState, NO_RESPONSE};
use crate::device::stats::Stats;
use crate::fault_queue::pages::{FaultRecord, SourceId, PGFAULT_LEN};
use crate::fault_queue::source::{Batch, GroupReader, VirtualSource, MAX_GROUP_RECORDS};
use crate::fault_queue::timer::PageTimer;
use crate::fault_queue::vevents::VEventCounters;
use crate::fault_queue::{purge_completed, EventFifo, EventRecord, MAX_RECORD_LEN, REASON_UNKNOWN};
use crate::iommufd_bridge::{EventQueue, HostIommu, RamRegion};
use crate::log_limit::limited;
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
/// epoll data of the page-response timer (`--page-response-timeout-ms`).
pub const PAGE_TIMER: u64 = NUM_QUEUES as u64 + 5;
/// Records read from a fault FD at once (a stack buffer: no allocation per
/// fault).
const FAULT_BATCH: usize = 64;

/// The guest-facing state, behind one lock with short critical sections.
pub struct Session {
    pub iommu: IommuState,
    pub stats: Stats,
    pub acked_features: u64,
    pub mem: GuestMemory,
    /// Fires when outstanding page requests may have timed out.
    page_timer: PageTimer,
    /// The memory table the host maps guest RAM from, kept until the host
    /// has unmapped its regions: vhost-user-backend drops a replaced table
    /// before telling us, and IOAS_MAP by address pins lazily (an IOAS
    /// without a domain), so an address must not be reused while mapped.
    host_ram: Option<Arc<GuestMemoryMmap>>,
}

/// Records for the eventq and the eventfd that wakes its worker.
pub struct EventChannel {
    fifo: Ranked<EventFifo>,
    notify: EventFd,
}

impl EventChannel {
    fn new(capacity: usize) -> io::Result<Self> {
        Ok(EventChannel {
            fifo: Ranked::new(Rank::EventFifo, EventFifo::new(capacity)),
            notify: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Queue a record and wake the eventq worker. False if it was lost
    /// (the bound was hit; counted and logged by the FIFO).
    pub fn send(&self, rec: EventRecord) -> bool {
        let queued = self.fifo.lock().push(rec);
        if queued {
            if let Err(e) = self.notify.write(1) {
                limited!(Level::Warn, "cannot wake the eventq worker: {e}");
            }
        }
        queued
    }

    pub fn fifo(&self) -> RankedGuard<'_, EventFifo> {
        self.fifo.lock()
    }

    pub fn notify_fd(&self) -> &EventFd {
        &self.notify
    }
}

pub struct IommuBackend {
    session: Ranked<Session>,
    /// Adaptive busy-polling of the requestq (`--poll-us`).
    poll: Ranked<Polling>,
    pub events: EventChannel,
    /// Page requests of virtual endpoints (the control socket's `dma`).
    pub virtual_faults: VirtualSource,
    /// This connection's kernel fault queue (host endpoints), for reading.
    kernel_faults: Ranked<Option<File>>,
    /// Whole-group reads of the kernel's fault FD (the eventq worker's; taken
    /// before `kernel_faults` and the session).
    fault_reader: Ranked<GroupReader>,
    /// Adds an FD to the eventq worker's epoll (set per connection).
    registrar: Ranked<Option<Registrar>>,
    /// Exit-event FDs the library leaks (see `exit_event`), closed at the
    /// end of their connection.
    exit_consumers: Ranked<Vec<RawFd>>,
    /// The vIOMMU's vEVENTQ (host endpoints), for reading; and what came
    /// through it.
    kernel_events: Ranked<Option<EventQueue>>,
    pub vevents: Ranked<VEventCounters>,
    /// The eventq's avail index was found broken: records wait for the
    /// driver's next kick of it rather than look at the ring again.
    eventq_stopped: AtomicBool,
}

/// Why a ring is not served until the driver's next kick. virtio-queue's
/// `pop_descriptor_chain` logs each of these at error level on every call
/// (and a poller calls it in a loop), so the rings are checked first and
/// popped with `iter`, which returns the error instead.
#[derive(Debug, Error)]
pub enum RingError {
    #[error(
        "avail index {avail} is more than the queue size ({size}) ahead of the device's {next}"
    )]
    AvailAhead { avail: u16, next: u16, size: u16 },
    #[error("avail ring at {addr:#x} is not in guest memory")]
    AvailUnreadable { addr: u64 },
    #[error("{0}")]
    Queue(virtio_queue::Error),
}

/// Check the avail ring of `q` before popping from it: readable, and its
/// index (read here, from guest memory) at most a queue size ahead of
/// where the device is (wrapping u16 arithmetic, as the spec counts).
fn check_avail<M: vm_memory::GuestMemory + ?Sized>(q: &Queue, mem: &M) -> Result<(), RingError> {
    let addr = q.avail_ring();
    // flags, idx, ring[size]; virtio-queue refuses a ring at 0 as not ready.
    let len = 4 + 2 * usize::from(q.size());
    if addr == 0 || !mem.check_range(GuestAddress(addr), len, Permissions::Read) {
        return Err(RingError::AvailUnreadable { addr });
    }
    let avail = q
        .avail_idx(mem, AtomicOrdering::Acquire)
        .map_err(RingError::Queue)?
        .0;
    let (next, size) = (q.next_avail(), q.size());
    if avail.wrapping_sub(next) > size {
        return Err(RingError::AvailAhead { avail, next, size });
    }
    Ok(())
}

/// `pop_descriptor_chain` without its error log: the error is returned
/// (the driver moved its avail index since `check_avail`).
fn pop_chain<'m, M>(q: &mut Queue, mem: &'m M) -> Result<Option<DescriptorChain<&'m M>>, RingError>
where
    M: vm_memory::GuestMemory,
{
    Ok(q.iter(mem).map_err(RingError::Queue)?.next())
}

/// What one pass over the requestq did.
#[derive(Debug, Default, Clone, Copy)]
struct Pass {
    /// Chains served.
    served: usize,
    /// The ring is broken: no polling, nothing more until the next kick.
    ring_stopped: bool,
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
            poll: Ranked::new(Rank::Poll, Polling::new(Duration::ZERO)),
            session: Ranked::new(
                Rank::Session,
                Session {
                    iommu: IommuState::new(config, limits, endpoints),
                    stats: Stats::default(),
                    acked_features: 0,
                    mem,
                    page_timer: PageTimer::new()?,
                    host_ram: None,
                },
            ),
            events: EventChannel::new(limits.max_events)?,
            virtual_faults: VirtualSource::new()?,
            kernel_faults: Ranked::new(Rank::KernelFaults, None),
            fault_reader: Ranked::new(Rank::FaultReader, GroupReader::default()),
            registrar: Ranked::new(Rank::Registrar, None),
            kernel_events: Ranked::new(Rank::KernelEvents, None),
            vevents: Ranked::new(Rank::VEvents, VEventCounters::default()),
            exit_consumers: Ranked::new(Rank::ExitConsumers, Vec::new()),
            eventq_stopped: AtomicBool::new(false),
        })
    }

    /// How to add FDs to this connection's eventq worker (None: no
    /// connection).
    pub fn set_registrar(&self, r: Option<Registrar>) {
        *self.registrar.lock() = r;
    }

    /// Poll the vIOMMU's vEVENTQ from now on, if there is one; what waited
    /// in it from before this guest is dropped first, so the eventq worker
    /// never relays it. Called with the session held: takes only locks
    /// ranked after it.
    fn watch_kernel_events(&self, s: &Session) {
        let mut ke = self.kernel_events.lock();
        if ke.is_some() {
            return;
        }
        let Some(queue) = s.iommu.event_queue_reader() else {
            return;
        };
        self.drop_stale_events(&queue);
        let registered = match self.registrar.lock().as_ref() {
            Some(reg) => reg(queue.file.as_raw_fd(), KERNEL_EVENTS, true),
            None => return,
        };
        match registered {
            // Level-triggered: events that came after the drain wake the
            // worker at once.
            Ok(()) => *ke = Some(queue),
            Err(e) => limited!(Level::Error, "cannot poll the vEVENTQ: {e}"),
        }
    }

    /// Read `queue` dry without relaying: its events belong to no guest
    /// (raised before this connection's watch or after its workers
    /// stopped). Counted in `vevents_stale`.
    fn drop_stale_events(&self, queue: &EventQueue) {
        let mut buf = [0u8; 4096];
        let mut stale = 0;
        loop {
            let n = match std::io::Read::read(&mut &queue.file, &mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    limited!(Level::Warn, "vEVENTQ read: {e}");
                    0
                }
            };
            if n == 0 {
                break;
            }
            stale += self.vevents.lock().drop_stale(&buf[..n], queue.data_len);
        }
        if stale > 0 {
            limited!(
                Level::Info,
                "vEVENTQ: {stale} events from before this guest dropped"
            );
        }
    }

    /// Read the vEVENTQ dry: each event becomes a fault record for the
    /// eventq (unrecoverable: reason UNKNOWN, the endpoint its vDEVICE
    /// names).
    fn relay_events(&self) {
        let mut buf = [0u8; 4096];
        loop {
            let (n, data_len, id_at) = {
                let mut ke = self.kernel_events.lock();
                let Some(q) = ke.as_mut() else {
                    return;
                };
                let n = match std::io::Read::read(&mut q.file, &mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => {
                        limited!(Level::Warn, "vEVENTQ read: {e}");
                        0
                    }
                };
                (n, q.data_len, q.id_at)
            };
            if n == 0 {
                return;
            }
            let s = self.session();
            let mut fifo = self.events.fifo();
            let mut c = self.vevents.lock();
            c.parse(&buf[..n], data_len, |data| {
                let virt_id = data
                    .get(id_at..id_at + 4)
                    .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()));
                if s.iommu.has_endpoint(virt_id) {
                    fifo.push(EventRecord::Fault {
                        reason: REASON_UNKNOWN,
                        flags: 0,
                        endpoint: virt_id,
                        address: 0,
                        pasid: None,
                    });
                }
            });
        }
    }

    /// A request made the host's fault queue: poll it from now on.
    fn watch_kernel_faults(&self, s: &Session) {
        let mut kf = self.kernel_faults.lock();
        if kf.is_some() {
            return;
        }
        let Some(file) = s.iommu.fault_queue_reader() else {
            return;
        };
        let registered = match self.registrar.lock().as_ref() {
            Some(reg) => reg(file.as_raw_fd(), KERNEL_FAULTS, true),
            None => Err(io::Error::other("no connection")),
        };
        match registered {
            Ok(()) => *kf = Some(file),
            Err(e) => limited!(Level::Error, "cannot poll the fault queue: {e}"),
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
        if s.iommu.pages.has_purged() {
            purge_completed(&mut s.iommu.pages, &mut self.events.fifo());
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
                        limited!(Level::Warn, "virtual fault FD: {e}");
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
        let mut reader = self.fault_reader.lock();
        let read = {
            let mut kf = self.kernel_faults.lock();
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
                limited!(
                    Level::Error,
                    "fault queue: a page-request group of more than {MAX_GROUP_RECORDS} records \
                     cannot be read; no longer polling the fault queue (the kernel completes \
                     the group when its device detaches)"
                );
                if let Some(f) = self.kernel_faults.lock().as_ref() {
                    if let Some(reg) = self.registrar.lock().as_ref() {
                        let _ = reg(f.as_raw_fd(), KERNEL_FAULTS, false);
                    }
                }
                None
            }
            Err(e) => {
                limited!(Level::Warn, "kernel fault FD: {e}");
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
        let now = Instant::now();
        let mut fifo = self.events.fifo();
        s.iommu
            .accept_page_requests(source, &recs[..kept], acked, &mut fifo, now);
        drop(fifo);
        self.flush_pages(&mut s);
        if let Some(t) = s.iommu.pages.timeout() {
            if s.iommu.pages.outstanding() > 0 {
                s.page_timer.group_raised(now, now + t);
            }
        }
    }

    /// The page-response timer fired: the device completes the groups the
    /// driver has not answered in time.
    fn expire_page_requests(&self) {
        let mut s = self.session();
        s.page_timer.fired();
        let Some(timeout) = s.iommu.pages.timeout() else {
            return;
        };
        let now = Instant::now();
        let next = s.iommu.pages.expire(now);
        self.flush_pages(&mut s);
        s.page_timer.rearm(now, next, timeout);
    }

    /// The page-response timer's FD, for the eventq worker's epoll.
    pub fn page_timer_fd(&self) -> RawFd {
        self.session().page_timer.fd()
    }

    /// Requestq wakeups and requests served by polling, and the current
    /// polling window.
    pub fn poll_stats(&self) -> (PollCounters, Duration) {
        let p = self.poll.lock();
        (p.counters, p.window.current())
    }

    /// Busy-poll the requestq for up to `max` after serving it, adaptively
    /// (zero: never).
    pub fn with_poll(self, max: Duration) -> Self {
        *self.poll.lock() = Polling::new(max);
        self
    }

    /// Serve host endpoints (VFIO, selftest) through `host`.
    pub fn with_host(self, host: Box<dyn HostIommu>) -> Self {
        self.session().iommu.set_host(host);
        self
    }

    pub fn session(&self) -> RankedGuard<'_, Session> {
        self.session.lock()
    }

    /// A new frontend connected: fresh guest memory, state as at power-on.
    pub fn begin_session(&self, mem: GuestMemory) {
        let mut s = self.session();
        self.eventq_stopped.store(false, AtomicOrdering::Release);
        s.iommu.begin_session();
        s.acked_features = 0;
        s.mem = mem;
        self.flush_pages(&mut s);
    }

    /// The frontend went away: drop everything that guest made us hold.
    pub fn end_session(&self) {
        let mut s = self.session();
        // Our copy of the fault queue FD first: the host destroys the queue.
        drop(self.kernel_faults.lock().take());
        // What the device raised after this guest's workers stopped is
        // nobody's: dropped and counted now, not at the next guest.
        if let Some(queue) = self.kernel_events.lock().take() {
            self.drop_stale_events(&queue);
        }
        // The last reference to the connection's epoll handler; then the
        // exit eventfds the library leaked (its workers are joined).
        self.set_registrar(None);
        for fd in self.exit_consumers.lock().drain(..) {
            // SAFETY: the library gave this fd up with into_raw_fd() and
            // its epoll and workers are gone with the daemon: nothing else
            // refers to it, and it is closed exactly once (drained).
            unsafe { libc::close(fd) };
        }
        s.iommu.disconnect();
        s.acked_features = 0;
        s.mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let old_ram = s.host_ram.take();
        self.flush_pages(&mut s);
        drop(s);
        drop(old_ram);
        // Page requests still on their way: no driver, completed at once.
        self.read_faults(SourceId::Virtual);
        self.events.fifo().discard_all();
    }

    /// Serve every available request. Errors of the guest's ring (bad
    /// addresses, indices) are logged and end this pass; they never reach
    /// the worker loop, which would stop serving the queue for good.
    fn process_requestq(&self, vring: &VringRwLock) -> io::Result<()> {
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
                self.poll_requestq(vring, window, first)
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
        self.poll.lock().counters.served_polling += polled;
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
        let mut g = Gathered::new();
        let mut out = [0u8; MAX_REPLY];
        let size = vr.get_queue().size();
        // INVALIDATEs waiting for the end of their run (one host call).
        let mut deferred: Deferred<_> = Vec::new();
        let mut broken = None;
        let result = (|| -> Result<(), virtio_queue::Error> {
            loop {
                vr.disable_notification()?;
                if let Err(e) = check_avail(vr.get_queue(), mem.deref()) {
                    broken = Some(e);
                    return Ok(());
                }
                let mut popped = 0usize;
                loop {
                    let chain = match pop_chain(vr.get_queue_mut(), mem.deref()) {
                        Ok(Some(chain)) => chain,
                        Ok(None) => break,
                        Err(e) => {
                            broken = Some(e);
                            break;
                        }
                    };
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
                served += popped;
                // "More available" with nothing poppable would spin: stop
                // until the next kick.
                if broken.is_some() || polling || !vr.enable_notification()? || popped == 0 {
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
        self.flush_pages(&mut session);
        self.watch_kernel_faults(&session);
        self.watch_kernel_events(&session);
        drop(session);
        if let Err(e) = result {
            debug!("requestq ring unusable: {e}");
        }
        signal_if_needed(&mut vr);
        Pass {
            served,
            ring_stopped: broken.is_some(),
        }
    }

    /// Move queued records into the driver's eventq buffers, in order.
    /// `kicked`: the driver kicked the eventq (it may have mended a ring
    /// found broken before; until it does, new records do not look at it).
    fn process_eventq(&self, vring: &VringRwLock, kicked: bool) -> io::Result<()> {
        if kicked {
            self.eventq_stopped.store(false, AtomicOrdering::Release);
        } else if self.eventq_stopped.load(AtomicOrdering::Acquire) {
            return Ok(());
        }
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
        let mut broken = None;
        let result = (|| -> Result<(), virtio_queue::Error> {
            let mut popped_since_enable = true;
            while let Some(rec) = fifo.front().copied() {
                let len = rec.encode(&mut buf);
                let popped = check_avail(vr.get_queue(), mem.deref())
                    .and_then(|()| pop_chain(vr.get_queue_mut(), mem.deref()));
                let chain = match popped {
                    Ok(c) => c,
                    Err(e) => {
                        broken = Some(e);
                        return Ok(());
                    }
                };
                let Some(chain) = chain else {
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
                            fifo.remove_group(&key);
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
        if let Some(e) = &broken {
            s.stats.device.eventq_bad_avail += 1;
            self.eventq_stopped.store(true, AtomicOrdering::Release);
            let _ = vr.enable_notification();
            limited!(Level::Warn, "eventq: {e}; records wait for the next kick");
        }
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
        let acked = s.iommu.config.internal_features(features);
        if s.acked_features & !acked & features::PAGE_REQUEST != 0 {
            // No driver can answer them any more.
            s.iommu.pages.withdraw_all();
            self.flush_pages(&mut s);
        }
        s.acked_features = acked;
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
        limited!(Level::Info, "device reset: all domains dropped");
        let mut s = self.session();
        s.stats.device.device_resets += 1;
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
        let mut s = self.session();
        let bytes = s.iommu.config.to_bytes(s.iommu.bypass);
        let (off, len) = (offset as usize, size as usize);
        match off.checked_add(len) {
            Some(end) if end <= CONFIG_SIZE => bytes[off..end].to_vec(),
            // An empty reply tells the frontend the read failed.
            _ => {
                s.stats.device.config_reads_refused += 1;
                limited!(
                    Level::Warn,
                    "GET_CONFIG {offset}+{size} is outside the {CONFIG_SIZE}-byte config"
                );
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
        let mut s = self.session();
        if !(off..end).contains(&BYPASS_OFFSET) {
            s.stats.device.config_writes_ignored += 1;
            return Ok(());
        }
        let value = buf[BYPASS_OFFSET - off];
        if s.acked_features & features::BYPASS_CONFIG == 0 {
            s.stats.device.config_writes_ignored += 1;
            debug!("bypass write without F_BYPASS_CONFIG ignored");
        } else if value > 1 {
            s.stats.device.config_writes_ignored += 1;
            debug!("bypass write of {value} ignored (only 0 or 1)");
        } else {
            // A guest can write it in a loop: changes are logged,
            // rate-limited; `stats` counts every write.
            s.stats.device.bypass_writes += 1;
            let was = s.iommu.bypass;
            match s.iommu.set_bypass(value == 1) {
                Ok(()) if was == (value == 1) => debug!("bypass {value}: unchanged"),
                Ok(()) => limited!(
                    Level::Info,
                    "bypass {}",
                    if value == 1 { "on" } else { "off" }
                ),
                Err(e) => {
                    s.stats.device.bypass_refused += 1;
                    limited!(Level::Error, "bypass {value}: the host refused: {e}");
                }
            }
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        narrow_frontend_thread();
        debug!("guest memory table updated");
        let table = mem.memory().into_inner();
        let regions = ram_regions(&mem);
        let mut s = self.session();
        s.mem = mem;
        if let Err(e) = s.iommu.set_guest_ram(&regions) {
            // Host endpoints' DMA to the regions that failed will fault;
            // the guest and the virtual endpoints are unaffected.
            limited!(Level::Error, "guest RAM for host endpoints: {e}");
        }
        // The host let go of the old regions: now they may be unmapped
        // (outside the lock).
        let old = s.host_ram.replace(table);
        drop(s);
        drop(old);
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
        self.exit_consumers.lock().push(consumer.as_raw_fd());
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
            limited!(
                Level::Warn,
                "unexpected event set {evset:?} on event {device_event}"
            );
            return Ok(());
        }
        // Each worker sees only its own vring, at index 0.
        match (thread_id, u64::from(device_event)) {
            (0, 0) => self.process_requestq(&vrings[0]),
            (1, 0) => self.process_eventq(&vrings[0], true),
            (1, EVENTS_PENDING) => {
                // Non-blocking: EAGAIN only means another wakeup drained it.
                let _ = self.events.notify_fd().read();
                self.process_eventq(&vrings[0], false)
            }
            (1, VIRTUAL_FAULTS) => {
                self.read_faults(SourceId::Virtual);
                self.process_eventq(&vrings[0], false)
            }
            (1, KERNEL_FAULTS) => {
                self.read_faults(SourceId::Kernel);
                self.process_eventq(&vrings[0], false)
            }
            (1, KERNEL_EVENTS) => {
                self.relay_events();
                self.process_eventq(&vrings[0], false)
            }
            (1, PAGE_TIMER) => {
                self.expire_page_requests();
                self.process_eventq(&vrings[0], false)
            }
            (t, e) => {
                limited!(Level::Warn, "unexpected event {e} on worker {t}");
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

    /// A host that notes, whenever guest RAM changes, which regions it
    /// stops mapping were no longer mapped in our address space by then.
    #[derive(Debug, Default)]
    struct RamWatch {
        mapped: Vec<RamRegion>,
        gone_before_unmap: Vec<u64>,
    }

    impl HostIommu for RamWatch {
        fn name(&self) -> &'static str {
            "ram-watch"
        }
        fn owns(&self, _: u32) -> bool {
            false
        }
        fn backs(&self, _: u32) -> bool {
            false
        }
        fn set_guest_ram(&mut self, regions: &[RamRegion]) -> crate::iommufd_bridge::Result<()> {
            for r in self.mapped.iter().filter(|r| !regions.contains(r)) {
                // SAFETY: msync only inspects the mapping (MS_ASYNC writes
                // nothing back for anonymous memory); ENOMEM: not mapped.
                let rc = unsafe {
                    libc::msync(
                        r.host_va as *mut libc::c_void,
                        r.len as usize,
                        libc::MS_ASYNC,
                    )
                };
                if rc != 0 {
                    self.gone_before_unmap.push(r.gpa);
                }
            }
            self.mapped = regions.to_vec();
            Ok(())
        }
        fn attach(
            &mut self,
            _: u32,
            _: crate::iommufd_bridge::Target,
            _: &mut dyn Iterator<Item = crate::iommufd_bridge::HostMapping>,
        ) -> crate::iommufd_bridge::Result<()> {
            Ok(())
        }
        fn map(
            &mut self,
            _: u32,
            _: crate::iommufd_bridge::HostMapping,
        ) -> crate::iommufd_bridge::Result<()> {
            Ok(())
        }
        fn unmap(&mut self, _: u32, _: u64, _: u64) -> crate::iommufd_bridge::Result<()> {
            Ok(())
        }
        fn set_bypass(&mut self, _: bool) -> crate::iommufd_bridge::Result<()> {
            Ok(())
        }
        fn reset(&mut self, _: bool) {}
        fn reserved(&self, _: u32) -> Option<&[crate::iommufd_bridge::IovaHole]> {
            None
        }
        fn describe(&self) -> serde_json::Value {
            serde_json::json!({ "gone_before_unmap": self.gone_before_unmap })
        }
    }

    /// vhost-user-backend replaces the memory table (dropping the old
    /// regions' mappings) before it calls update_memory. Without
    /// IOAS_MAP_FILE the RAM IOAS maps our virtual addresses, and with no
    /// domain on it the kernel pins them only when something needs the
    /// pages: so a removed region must stay mapped until the host has
    /// unmapped it, or a pin in between reads whatever is mapped there now.
    #[test]
    fn a_removed_region_stays_mapped_until_the_host_unmaps_it() {
        use vm_memory::GuestAddress;
        let b = backend();
        b.session().iommu.set_host(Box::new(RamWatch::default()));
        let table = |gpa: u64| GuestMemoryMmap::from_ranges(&[(GuestAddress(gpa), 0x10000)]);
        let mem = GuestMemoryAtomic::new(table(0).unwrap());
        b.update_memory(mem.clone()).unwrap();
        for gpa in [0x10_0000, 0x20_0000, 0x30_0000] {
            // What SET_MEM_TABLE does: the new table in, the old one out,
            // then update_memory.
            mem.lock().unwrap().replace(table(gpa).unwrap());
            b.update_memory(mem.clone()).unwrap();
        }
        b.end_session();
        let s = b.session();
        assert_eq!(
            s.iommu.host().describe()["gone_before_unmap"],
            serde_json::json!([]),
            "regions unmapped from our address space before the host let go of them"
        );
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
