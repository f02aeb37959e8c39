// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user glue: the `VhostUserBackend` implementation. Queue plumbing
//! only; the request semantics live in `dispatch` and `state`.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, Level};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::config::{features, DeviceConfig, Limits};
use crate::device::state::{HotplugError, IommuState, NewEndpoint, Removed};
use crate::device::stats::Stats;
use crate::fault_queue::pages::{FaultRecord, PageRequests, Response, SourceId};
use crate::fault_queue::relay::{EventSource, FaultRelay, FaultSink, Watched};
use crate::fault_queue::EventFifo;
use crate::iommufd_bridge::{HostIommu, RamFile, RamRegion};
use crate::lock_order::{Rank, Ranked, RankedGuard};
use crate::log_limit::limited;
use crate::wire::{BYPASS_OFFSET, CONFIG_SIZE};

mod eventq;
mod requestq;
mod ring;

pub(crate) use requestq::PollStats;
use requestq::Polling;

pub(crate) type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

pub(crate) const REQUESTQ: u16 = 0;
pub(crate) const EVENTQ: u16 = 1;
const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: usize = 1024;
/// epoll data of the "records pending" eventfd in the eventq worker; values
/// up to NUM_QUEUES are the library's.
pub const EVENTS_PENDING: u64 = NUM_QUEUES as u64 + 1;
/// epoll data of the virtual endpoints' fault FD in the eventq worker.
pub(crate) const VIRTUAL_FAULTS: u64 = NUM_QUEUES as u64 + 2;
/// epoll data of the kernel's fault queue FD (host endpoints).
pub(crate) const KERNEL_FAULTS: u64 = NUM_QUEUES as u64 + 3;
/// epoll data of the vIOMMU's vEVENTQ FD (unrecoverable faults).
pub(crate) const KERNEL_EVENTS: u64 = NUM_QUEUES as u64 + 4;
/// epoll data of the page-response timer (`--page-response-timeout-ms`).
pub(crate) const PAGE_TIMER: u64 = NUM_QUEUES as u64 + 5;
/// epoll data of the fault FDs' io_uring (`--fault-io io-uring`), in
/// place of VIRTUAL_FAULTS and KERNEL_FAULTS.
pub(crate) const FAULT_RING: u64 = NUM_QUEUES as u64 + 6;

/// Memory regions a frontend may give us: SET_MEM_TABLE's limit (we never
/// offer CONFIGURE_MEM_SLOTS, but the vhost crate takes ADD_MEM_REG from a
/// frontend that acknowledges it anyway).
const MAX_MEM_REGIONS: usize = 8;

/// The eventq worker's epoll data for an FD the relay watches.
pub(crate) fn epoll_data(what: Watched) -> u64 {
    match what {
        Watched::KernelFaults => KERNEL_FAULTS,
        Watched::KernelEvents => KERNEL_EVENTS,
    }
}

/// The guest-facing state, behind one lock with short critical sections.
pub struct Session {
    pub iommu: IommuState,
    pub stats: Stats,
    pub acked_features: u64,
    pub mem: GuestMemory,
    /// The memory table the host maps guest RAM from, kept until the host
    /// has unmapped its regions: vhost-user-backend drops a replaced table
    /// before telling us, and IOAS_MAP by address pins lazily (an IOAS
    /// without a domain), so an address must not be reused while mapped.
    host_ram: Option<Arc<GuestMemoryMmap>>,
}

/// The relay routes page requests into the guest state and writes the
/// kernel's responses through it.
impl FaultSink for Session {
    fn pages(&mut self) -> &mut PageRequests {
        &mut self.iommu.pages
    }

    fn accept(
        &mut self,
        source: SourceId,
        recs: &[FaultRecord],
        fifo: &mut EventFifo,
        now: Instant,
    ) {
        let acked = self.acked_features;
        self.iommu
            .accept_page_requests(source, recs, acked, fifo, now);
    }

    fn respond_kernel(&mut self, rs: &[Response]) {
        self.iommu.respond_host_faults(rs);
    }

    fn has_endpoint(&self, id: u32) -> bool {
        self.iommu.has_endpoint(id)
    }

    fn fault_queue_reader(&self) -> Option<File> {
        self.iommu.fault_queue_reader()
    }

    fn event_queue_reader(&self) -> Option<EventSource> {
        self.iommu.event_queue_reader().map(|q| EventSource {
            file: q.file,
            kind: q.kind,
        })
    }
}

pub struct IommuBackend {
    session: Ranked<Session>,
    /// Adaptive busy-polling of the requestq (`--poll-us`).
    poll: Ranked<Polling>,
    /// The host's run queues, read while polling (None: unreadable; the
    /// other rules of `device::poll` only).
    run_queues: Option<crate::device::poll::RunQueues>,
    /// Bumped by each `set_poll_max`: an open window ends at its next look
    /// (back-to-back requests keep one from ever lapsing).
    poll_epoch: std::sync::atomic::AtomicU64,
    /// Faults and page requests from their sources to the eventq, and the
    /// driver's answers back.
    pub relay: FaultRelay,
    /// Exit-event FDs the library leaks (see `exit_event`), closed at the
    /// end of their connection.
    exit_consumers: Ranked<Vec<RawFd>>,
    /// The eventq's avail index was found broken: records wait for the
    /// driver's next kick of it rather than look at the ring again.
    eventq_stopped: AtomicBool,
}

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
pub(crate) const FRONTEND_THREAD: &str = "viommu-vhost";

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

/// The memory table's regions, as the host IOMMU maps them.
fn ram_regions(mem: &GuestMemory) -> Vec<RamRegion> {
    mem.memory()
        .iter()
        .map(|r| RamRegion {
            gpa: r.start_addr().0,
            len: r.len(),
            host_va: r.as_ptr() as u64,
            file: r.file_offset().map(|f| RamFile {
                fd: f.file().as_raw_fd(),
                offset: f.start(),
            }),
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
            run_queues: None,
            poll_epoch: std::sync::atomic::AtomicU64::new(0),
            session: Ranked::new(
                Rank::Session,
                Session {
                    iommu: IommuState::new(config, limits, endpoints),
                    stats: Stats::default(),
                    acked_features: 0,
                    mem,
                    host_ram: None,
                },
            ),
            relay: FaultRelay::new(limits.max_events)?,
            exit_consumers: Ranked::new(Rank::ExitConsumers, Vec::new()),
            eventq_stopped: AtomicBool::new(false),
        })
    }

    /// What polling of the requestq did, and its window and back-off now.
    pub(crate) fn poll_stats(&self) -> PollStats {
        let p = self.poll.lock();
        PollStats {
            counters: p.counters,
            window: p.window.current(),
            backoff: p.window.backoff(),
            gate: self.run_queues.is_some(),
        }
    }

    /// Change the requestq's polling bound at run time (the control
    /// socket's `poll`; zero: off). The window starts over; a back-off in
    /// force stays.
    pub(crate) fn set_poll_max(&self, max: Duration) {
        self.poll.lock().window.set_max(max);
        self.poll_epoch.fetch_add(1, AtomicOrdering::Release);
    }

    /// Busy-poll the requestq for up to `max` after serving it, adaptively
    /// (zero: never, unless the control socket's `poll` turns it on). The
    /// run queues are opened here, before the seccomp filter, whatever
    /// `max` is (`gate`: read them while polling).
    pub(crate) fn with_poll(mut self, max: Duration, gate: bool) -> Self {
        *self.poll.lock() = Polling::new(max);
        if !gate {
            if !max.is_zero() {
                log::info!("polling: also while the host is crowded (--poll-ignore-load)");
            }
            return self;
        }
        match crate::device::poll::RunQueues::open() {
            Ok(rq) => {
                if !max.is_zero() {
                    log::info!(
                        "polling: only while the host has a CPU for every runnable thread \
                         (/proc/loadavg, {} CPUs)",
                        rq.cpus()
                    );
                }
                self.run_queues = Some(rq);
            }
            Err(e) if !max.is_zero() => log::warn!(
                "polling: {e}; it cannot see a crowded host, only the stalls and time \
                 it loses (stats: poll_gate none)"
            ),
            Err(e) => log::debug!("polling (off): {e}"),
        }
        self
    }

    /// Serve the fault FDs as `mode` says: the mode in force, and why
    /// `auto` fell back to epoll. With the ring, PAGE_RESPs of a request
    /// pass are written to the kernel together at its end.
    pub(crate) fn with_fault_io(
        self,
        mode: crate::fault_queue::uring::FaultIo,
    ) -> Result<
        (Self, crate::fault_queue::uring::FaultIo, Option<String>),
        crate::fault_queue::uring::RingError,
    > {
        let (used, why) = self.relay.set_fault_io(mode)?;
        Ok((self, used, why))
    }

    /// Serve host endpoints (VFIO, selftest) through `host`.
    pub(crate) fn with_host(self, host: Box<dyn HostIommu>) -> Self {
        self.session().iommu.set_host(host);
        self
    }

    /// A virtual `dma` stopped waiting for page request `cookie`: true if
    /// the device completed it now (FAILURE), false if it was not read yet
    /// (dropped when it is) or was answered meanwhile.
    pub(crate) fn virtual_timed_out(&self, cookie: u32) -> bool {
        self.relay.virtual_timed_out(&self.session, cookie)
    }

    /// Can the control socket hot-plug VFIO devices (there is an iommufd
    /// serving VFIO)? Fixed from start-up on.
    pub(crate) fn takes_vfio(&self) -> bool {
        self.session().iommu.host().takes_vfio()
    }

    /// Hot-plug endpoint `id` (control socket): unattached from now on.
    pub(crate) fn add_endpoint(&self, id: u32, kind: NewEndpoint) -> Result<(), HotplugError> {
        let mut s = self.session();
        let added = s.iommu.add_endpoint(id, kind);
        match added {
            Ok(()) => s.stats.device.endpoints_added += 1,
            Err(_) => s.stats.device.endpoint_adds_refused += 1,
        }
        added
    }

    /// Hot-unplug endpoint `id` (control socket): detached from everything,
    /// its page requests completed (their `dma`s woken, their records out
    /// of the event FIFO), its host objects released.
    pub(crate) fn remove_endpoint(&self, id: u32) -> Result<Removed, HotplugError> {
        let mut s = self.session();
        let removed = s.iommu.remove_endpoint(id)?;
        s.stats.device.endpoints_removed += 1;
        self.relay.flush(&mut *s);
        Ok(removed)
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
        self.relay.flush(&mut *s);
    }

    /// The frontend went away: drop everything that guest made us hold.
    pub(crate) fn end_session(&self) {
        let mut s = self.session();
        // The relay's copies of the kernel's FDs first: the host destroys
        // the queues. With the registrar goes the last reference to the
        // connection's epoll handler; then the exit eventfds the library
        // leaked (its workers are joined).
        self.relay.close_sources();
        for fd in self.exit_consumers.lock().drain(..) {
            // SAFETY: the library gave this fd up with into_raw_fd() and
            // its epoll and workers are gone with the daemon: nothing else
            // refers to it, and it is closed exactly once (drained).
            unsafe { libc::close(fd) };
        }
        s.iommu.disconnect();
        s.stats.device.frontend_disconnections += 1;
        s.acked_features = 0;
        s.mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let old_ram = s.host_ram.take();
        self.relay.flush(&mut *s);
        drop(s);
        drop(old_ram);
        self.relay.drain_after_session(&self.session);
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
            self.relay.flush(&mut *s);
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
        self.relay.flush(&mut *s);
        drop(s);
        self.relay.fifo().discard_all();
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
        let regions = mem.memory().num_regions();
        if regions > MAX_MEM_REGIONS {
            // The library has mapped them already: ending the connection
            // (an error here does) is what lets them go.
            limited!(
                Level::Warn,
                "frontend: a memory table of {regions} regions (at most {MAX_MEM_REGIONS} \
                 without CONFIGURE_MEM_SLOTS, which we never offer): connection ended"
            );
            return Err(io::Error::other("too many memory regions"));
        }
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
                let _ = self.relay.notify_fd().read();
                // With the ring: post its reads, relay what another thread
                // reaped.
                self.relay.ring_ready(&self.session);
                self.process_eventq(&vrings[0], false)
            }
            (1, FAULT_RING) => {
                self.relay.ring_ready(&self.session);
                self.process_eventq(&vrings[0], false)
            }
            (1, VIRTUAL_FAULTS) => {
                self.relay.source_readable(&self.session, SourceId::Virtual);
                self.process_eventq(&vrings[0], false)
            }
            (1, KERNEL_FAULTS) => {
                self.relay.source_readable(&self.session, SourceId::Kernel);
                self.process_eventq(&vrings[0], false)
            }
            (1, KERNEL_EVENTS) => {
                self.relay.events_readable(&self.session);
                self.process_eventq(&vrings[0], false)
            }
            (1, PAGE_TIMER) => {
                self.relay.timer_fired(&self.session);
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
    use vhost_user_backend::VringT;

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
                        usize::try_from(r.len).expect("test region fits the address space"),
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
