// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user frontend: connection, negotiation, memory table, vrings.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend as VuFrontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VringConfigData};

use super::mem::GuestMem;
use super::virtq::{QueueOptions, SplitQueue, Token};
use super::wire::{self, bit, EventBuf, IommuConfig, ProbeReply};
use super::{invalid, retry, Result, DEFAULT_TIMEOUT};

/// Protocol features the harness can drive with vhost's `Frontend`.
pub fn supported_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// How to set the device up.
#[derive(Clone, Debug)]
pub struct FrontendOptions {
    /// Accept `offered & feature_mask` (default: everything offered).
    pub feature_mask: u64,
    /// Send exactly these features instead (may include bits not offered).
    pub force_features: Option<u64>,
    /// Accept `offered & protocol_mask` (default: [`supported_protocol_features`]).
    pub protocol_mask: VhostUserProtocolFeatures,
    /// Number of queues to set up (requestq and eventq).
    pub num_queues: usize,
    /// Queue size and driver behaviour; `event_idx` is overridden by what
    /// was negotiated.
    pub queue: QueueOptions,
    /// How long to retry connecting while the backend starts.
    pub connect_timeout: Duration,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        FrontendOptions {
            feature_mask: u64::MAX,
            force_features: None,
            protocol_mask: supported_protocol_features(),
            num_queues: 2,
            queue: QueueOptions::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl FrontendOptions {
    /// Do not negotiate feature bit `b`.
    pub fn without(mut self, b: u32) -> Self {
        self.feature_mask &= !bit(b);
        self
    }
    /// Queue size for both queues.
    pub fn queue_size(mut self, size: u16) -> Self {
        self.queue.size = size;
        self
    }
}

/// Connect to a vhost-user socket, retrying while the backend starts.
pub fn connect_stream(path: &Path, timeout: Duration) -> Result<UnixStream> {
    retry(timeout, &format!("connect to {}", path.display()), || {
        UnixStream::connect(path)
    })
}

/// A configured vhost-user connection plus its two virtqueues.
pub struct Frontend {
    /// The vhost crate's frontend (for messages the harness does not wrap).
    pub vu: VuFrontend,
    /// Guest RAM.
    pub mem: Arc<GuestMem>,
    /// Options used.
    pub opts: FrontendOptions,
    /// Socket path connected to.
    pub path: PathBuf,
    /// Features offered by the backend.
    pub offered_features: u64,
    /// Features acknowledged with SET_FEATURES.
    pub acked_features: u64,
    /// Protocol features offered by the backend.
    pub offered_protocol: VhostUserProtocolFeatures,
    /// Protocol features acknowledged.
    pub acked_protocol: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM answer (0 if MQ was not negotiated).
    pub queue_num: u64,
    /// Queue 0 = requestq, queue 1 = eventq (after setup).
    pub queues: Vec<SplitQueue>,
}

impl Frontend {
    /// Connect and do the whole standard setup.
    pub fn connect(
        path: impl AsRef<Path>,
        mem: Arc<GuestMem>,
        opts: FrontendOptions,
    ) -> Result<Self> {
        let mut f = Self::connect_unconfigured(path, mem, opts)?;
        f.negotiate()?;
        f.setup_mem_table()?;
        f.setup_queues()?;
        Ok(f)
    }

    /// Connect with default options and fresh default-size guest RAM.
    pub fn connect_default(path: impl AsRef<Path>) -> Result<Self> {
        let mem = Arc::new(GuestMem::default_size()?);
        Self::connect(path, mem, FrontendOptions::default())
    }

    /// Only open the connection (for tests that drive the setup step by step).
    pub fn connect_unconfigured(
        path: impl AsRef<Path>,
        mem: Arc<GuestMem>,
        opts: FrontendOptions,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let stream = connect_stream(&path, opts.connect_timeout)?;
        let vu = VuFrontend::from_stream(stream, opts.num_queues as u64);
        Ok(Frontend {
            vu,
            mem,
            opts,
            path,
            offered_features: 0,
            acked_features: 0,
            offered_protocol: VhostUserProtocolFeatures::empty(),
            acked_protocol: VhostUserProtocolFeatures::empty(),
            queue_num: 0,
            queues: Vec::new(),
        })
    }

    /// SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
    /// SET_FEATURES. After REPLY_ACK is negotiated every message asks for an
    /// acknowledgement, so backend refusals surface as errors.
    pub fn negotiate(&mut self) -> Result<()> {
        self.vu.set_owner()?;
        self.offered_features = self.vu.get_features()?;
        let proto_bit = bit(wire::VHOST_USER_F_PROTOCOL_FEATURES);
        if self.offered_features & proto_bit != 0 {
            self.offered_protocol = self.vu.get_protocol_features()?;
            self.acked_protocol = self.offered_protocol & self.opts.protocol_mask;
            self.vu.set_protocol_features(self.acked_protocol)?;
            if self
                .acked_protocol
                .contains(VhostUserProtocolFeatures::REPLY_ACK)
            {
                self.vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if self.acked_protocol.contains(VhostUserProtocolFeatures::MQ) {
                self.queue_num = self.vu.get_queue_num()?;
            }
        }
        self.acked_features = self
            .opts
            .force_features
            .unwrap_or(self.offered_features & self.opts.feature_mask);
        self.vu.set_features(self.acked_features)?;
        Ok(())
    }

    /// SET_MEM_TABLE with every region of guest RAM (memfd + offset).
    pub fn setup_mem_table(&mut self) -> Result<()> {
        self.vu.set_mem_table(&self.mem.region_infos())?;
        Ok(())
    }

    /// Whether feature bit `b` was acknowledged.
    pub fn has_feature(&self, b: u32) -> bool {
        self.acked_features & bit(b) != 0
    }

    /// Create and register all queues with the negotiated EVENT_IDX.
    pub fn setup_queues(&mut self) -> Result<()> {
        let mut qopts = self.opts.queue.clone();
        qopts.event_idx = self.has_feature(wire::VIRTIO_RING_F_EVENT_IDX);
        self.queues.clear();
        for i in 0..self.opts.num_queues {
            let q = SplitQueue::new(self.mem.clone(), i as u16, &qopts)?;
            self.register_queue(&q)?;
            self.queues.push(q);
        }
        Ok(())
    }

    /// SET_VRING_NUM/ADDR/BASE(0)/CALL/KICK/ENABLE for `q`.
    pub fn register_queue(&mut self, q: &SplitQueue) -> Result<()> {
        let i = q.index() as usize;
        let l = q.layout();
        self.vu.set_vring_num(i, q.size())?;
        let cfg = VringConfigData {
            queue_max_size: q.size(),
            queue_size: q.size(),
            flags: 0,
            desc_table_addr: self.mem.uva(l.desc)?,
            used_ring_addr: self.mem.uva(l.used)?,
            avail_ring_addr: self.mem.uva(l.avail)?,
            log_addr: None,
        };
        self.vu.set_vring_addr(i, &cfg)?;
        self.vu.set_vring_base(i, 0)?;
        self.vu.set_vring_call(i, q.call_fd())?;
        self.vu.set_vring_kick(i, q.kick_fd())?;
        // Without PROTOCOL_FEATURES rings are enabled implicitly.
        if self.has_feature(wire::VHOST_USER_F_PROTOCOL_FEATURES) {
            self.vu.set_vring_enable(i, true)?;
        }
        Ok(())
    }

    /// The request queue.
    pub fn requestq(&mut self) -> &mut SplitQueue {
        &mut self.queues[0]
    }

    /// The event queue.
    pub fn eventq(&mut self) -> &mut SplitQueue {
        &mut self.queues[1]
    }

    /// GET_CONFIG of `size` bytes at `offset`.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; size as usize];
        let (_, payload) = self
            .vu
            .get_config(offset, size, VhostUserConfigFlags::empty(), &buf)?;
        Ok(payload)
    }

    /// SET_CONFIG of `data` at `offset` (flags 0, as QEMU sends).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        self.set_config_flags(offset, VhostUserConfigFlags::empty(), data)
    }

    /// SET_CONFIG with explicit flags.
    pub fn set_config_flags(
        &mut self,
        offset: u32,
        flags: VhostUserConfigFlags,
        data: &[u8],
    ) -> Result<()> {
        self.vu.set_config(offset, flags, data)?;
        Ok(())
    }

    /// The decoded 40-byte config space.
    pub fn config(&mut self) -> Result<IommuConfig> {
        let b = self.get_config(0, wire::CONFIG_SIZE)?;
        IommuConfig::parse(&b)
    }

    /// `probe_size` from config offset 32.
    pub fn probe_size(&mut self) -> Result<u32> {
        let b = self.get_config(wire::CONFIG_PROBE_SIZE_OFF, 4)?;
        Ok(u32::from_le_bytes(b[..4].try_into().expect("4 bytes")))
    }

    /// Write the `bypass` config byte.
    pub fn set_bypass(&mut self, on: bool) -> Result<()> {
        self.set_config(wire::CONFIG_BYPASS_OFF, &[u8::from(on)])
    }

    /// One request on the requestq: `(used_len, written bytes)`.
    pub fn request(&mut self, readable: &[u8], writable_len: u32) -> Result<(u32, Vec<u8>)> {
        self.queues[0].request(readable, writable_len)
    }

    /// One non-PROBE request, e.g. `f.request_status(&wire::attach(1, 8, 0, 0))`;
    /// returns its status (error if used length 0).
    pub fn request_status<R: AsRef<[u8]>>(&mut self, req: &(R, u32)) -> Result<u8> {
        let (used, w) = self.request(req.0.as_ref(), req.1)?;
        if used == 0 {
            return invalid("device returned used length 0");
        }
        Ok(w[0])
    }

    /// Many requests, one kick per queue-full; replies in request order.
    pub fn submit_batch<R: AsRef<[u8]>>(
        &mut self,
        reqs: &[(R, u32)],
    ) -> Result<Vec<(u32, Vec<u8>)>> {
        self.queues[0].submit_batch(reqs)
    }

    /// PROBE `endpoint` with the probe_size read from config space.
    pub fn probe(&mut self, endpoint: u32) -> Result<ProbeReply> {
        let ps = self.probe_size()?;
        let (r, w) = wire::probe(endpoint, ps);
        let (used, written) = self.request(&r, w)?;
        ProbeReply::parse(used, &written, ps)
    }

    /// Post `count` event buffers of `size` bytes and kick.
    pub fn post_event_buffers(&mut self, count: usize, size: u32) -> Result<Vec<Token>> {
        wire::post_event_buffers(&mut self.queues[1], count, size)
    }

    /// Up to `max` used event buffers within `timeout`, in used order.
    pub fn collect_events_upto(&mut self, max: usize, timeout: Duration) -> Result<Vec<EventBuf>> {
        wire::collect_events_upto(&mut self.queues[1], max, timeout)
    }

    /// Exactly `n` used event buffers as `(used_len, bytes)`.
    pub fn collect_events(&mut self, n: usize) -> Result<Vec<(u32, Vec<u8>)>> {
        wire::collect_events(&mut self.queues[1], n, DEFAULT_TIMEOUT)
    }

    /// GET_VRING_BASE (stops the ring in the backend).
    pub fn get_vring_base(&mut self, queue: usize) -> Result<u32> {
        Ok(self.vu.get_vring_base(queue)?)
    }

    /// Close the connection (the backend should drop this guest's state).
    pub fn disconnect(self) {
        drop(self);
    }

    /// Close this connection and open a fresh, fully set-up one to the same
    /// socket with the same options, reusing guest RAM (rings and buffers
    /// are allocated anew).
    pub fn reconnect(self) -> Result<Frontend> {
        let path = self.path.clone();
        let mem = self.mem.clone();
        let opts = self.opts.clone();
        drop(self);
        Frontend::connect(path, mem, opts)
    }
}
