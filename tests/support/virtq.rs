// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Driver side of a virtio 1.x split virtqueue laid out in [`GuestMem`].
//!
//! Chains are built from per-head "arenas" (guest buffers owned by the head
//! descriptor index) so that steady-state operation allocates nothing: the
//! arena of a head index is reused every time that index heads a chain.
//! Free descriptor indices are recycled FIFO, so a completed chain's
//! buffers stay readable (via [`SplitQueue::read_written`]) until the queue
//! has cycled through all other free descriptors.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mem::GuestMem;
use super::{invalid, Error, Result, DEFAULT_TIMEOUT};

/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// Used ring flag: the device does not want kicks (without EVENT_IDX).
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;
/// Avail ring flag: the driver does not want interrupts (without EVENT_IDX).
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Size of one split descriptor.
pub const DESC_SIZE: u64 = 16;

/// The virtio rule: notify if `event_idx` lies in `[old, new)`.
pub fn vring_need_event(event_idx: u16, new_idx: u16, old_idx: u16) -> bool {
    new_idx.wrapping_sub(event_idx).wrapping_sub(1) < new_idx.wrapping_sub(old_idx)
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// Identifies one submitted chain: its head index plus a sequence number
/// that tells reuses of the head index apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Token {
    /// Descriptor-table index of the chain's head.
    pub head: u16,
    /// Submission sequence number.
    pub seq: u32,
}

/// How the queue is built and driven.
#[derive(Clone, Debug)]
pub struct QueueOptions {
    /// Queue size (number of descriptors).
    pub size: u16,
    /// Drive notifications with VIRTIO_F_EVENT_IDX (`used_event`/`avail_event`).
    pub event_idx: bool,
    /// Fill device-writable buffers with this byte before submitting them, so
    /// that bytes the device did not write are recognisable.
    pub poison: Option<u8>,
    /// Initial per-head arena size in bytes (grows on demand).
    pub arena_bytes: u32,
    /// Make [`SplitQueue::submit_batch`] put each request in an indirect table.
    pub batch_indirect: bool,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            size: 256,
            event_idx: true,
            poison: Some(0xA5),
            arena_bytes: 256,
            batch_indirect: false,
        }
    }
}

/// Guest-physical addresses of the three ring parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Descriptor table (16 bytes per entry).
    pub desc: u64,
    /// Available ring: flags, idx, ring[size], used_event.
    pub avail: u64,
    /// Used ring: flags, idx, ring[size] of {id, len}, avail_event.
    pub used: u64,
}

/// Counters, for tests of the notification logic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Chains made available.
    pub added: u64,
    /// Chains returned in the used ring (known ids only).
    pub completed: u64,
    /// Kicks written to the kick eventfd.
    pub kicks: u64,
    /// Kicks skipped because the device did not ask for them.
    pub kicks_suppressed: u64,
    /// Times the call eventfd was found signalled.
    pub calls: u64,
}

/// Where `next` of a raw descriptor points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawNext {
    /// `next` = 0.
    None,
    /// The descriptor at this position of the same raw slice (mapped to the
    /// table index the harness allocated for it; in an indirect table, the
    /// position itself).
    Chain(usize),
    /// This literal `next` value (may be out of range on purpose).
    Abs(u16),
}

/// A descriptor exactly as the caller wants it (hostile tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// Buffer GPA.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// Descriptor flags, written as given.
    pub flags: u16,
    /// The `next` field.
    pub next: RawNext,
}

impl RawDesc {
    /// A device-readable descriptor with no successor.
    pub fn readable(addr: u64, len: u32) -> Self {
        RawDesc {
            addr,
            len,
            flags: 0,
            next: RawNext::None,
        }
    }
    /// A device-writable descriptor with no successor.
    pub fn writable(addr: u64, len: u32) -> Self {
        RawDesc {
            addr,
            len,
            flags: VRING_DESC_F_WRITE,
            next: RawNext::None,
        }
    }
    /// A descriptor pointing at an indirect table of `entries` descriptors.
    pub fn indirect(table: u64, entries: u32) -> Self {
        RawDesc {
            addr: table,
            len: entries * DESC_SIZE as u32,
            flags: VRING_DESC_F_INDIRECT,
            next: RawNext::None,
        }
    }
    /// Set NEXT and chain to slice position `i`.
    pub fn then(mut self, i: usize) -> Self {
        self.flags |= VRING_DESC_F_NEXT;
        self.next = RawNext::Chain(i);
        self
    }
    /// Set NEXT and a literal `next` value.
    pub fn then_abs(mut self, next: u16) -> Self {
        self.flags |= VRING_DESC_F_NEXT;
        self.next = RawNext::Abs(next);
        self
    }
    /// Replace the flags.
    pub fn with_flags(mut self, flags: u16) -> Self {
        self.flags = flags;
        self
    }

    fn encode(&self, next: u16) -> [u8; 16] {
        encode_desc(self.addr, self.len, self.flags, next)
    }
}

fn encode_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    b
}

/// Write a raw descriptor table (e.g. a hostile indirect table) at `gpa`;
/// `RawNext::Chain(i)` becomes `i`.
pub fn write_raw_table(mem: &GuestMem, gpa: u64, descs: &[RawDesc]) -> Result<()> {
    for (i, d) in descs.iter().enumerate() {
        let next = match d.next {
            RawNext::None => 0,
            RawNext::Chain(j) => j as u16,
            RawNext::Abs(v) => v,
        };
        mem.write(gpa + i as u64 * DESC_SIZE, &d.encode(next))?;
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    InFlight,
    Done(u32),
}

struct Slot {
    seq: u32,
    state: SlotState,
    /// Descriptor-table indices owned by the chain (head first).
    descs: Vec<u16>,
    /// Device-writable buffers, in chain order.
    writable: Vec<(u64, u32)>,
    writable_total: usize,
    arena: u64,
    arena_cap: u64,
    /// Caller data (request index in a batch).
    user: usize,
}

/// Driver side of one split virtqueue.
pub struct SplitQueue {
    mem: Arc<GuestMem>,
    index: u16,
    size: u16,
    layout: RingLayout,
    event_idx: bool,
    poison: Option<u8>,
    arena_bytes: u32,
    batch_indirect: bool,
    kick: EventFd,
    call: EventFd,
    free: VecDeque<u16>,
    slots: Vec<Slot>,
    next_avail: u16,
    kicked_avail: u16,
    last_used: u16,
    in_flight: usize,
    seq: u32,
    stats: QueueStats,
    bogus_used: Vec<(u32, u32)>,
    scratch: Vec<(Token, u32)>,
    raw_map: Vec<u16>,
    poll_interval: Option<Duration>,
    spin: bool,
    eager_used_event: bool,
}

impl SplitQueue {
    /// Allocate rings in guest memory (page-aligned) and create the eventfds.
    pub fn new(mem: Arc<GuestMem>, index: u16, opts: &QueueOptions) -> Result<Self> {
        let size = u64::from(opts.size);
        let desc = mem.alloc(DESC_SIZE * size, 4096)?;
        let avail = mem.alloc(6 + 2 * size, 4096)?;
        let used = mem.alloc(6 + 8 * size, 4096)?;
        Self::new_at(mem, index, opts, RingLayout { desc, avail, used })
    }

    /// Use rings at caller-chosen GPAs (they are zeroed here).
    pub fn new_at(
        mem: Arc<GuestMem>,
        index: u16,
        opts: &QueueOptions,
        layout: RingLayout,
    ) -> Result<Self> {
        if opts.size == 0 {
            return invalid("queue size 0");
        }
        let size = u64::from(opts.size);
        mem.fill(layout.desc, (DESC_SIZE * size) as usize, 0)?;
        mem.fill(layout.avail, (6 + 2 * size) as usize, 0)?;
        mem.fill(layout.used, (6 + 8 * size) as usize, 0)?;
        // Validate alignment of the ring index fields up front.
        mem.atomic_u16(layout.avail + 2)?;
        mem.atomic_u16(layout.used + 2)?;
        let slots = (0..opts.size)
            .map(|_| Slot {
                seq: 0,
                state: SlotState::Free,
                descs: Vec::new(),
                writable: Vec::new(),
                writable_total: 0,
                arena: 0,
                arena_cap: 0,
                user: 0,
            })
            .collect();
        Ok(SplitQueue {
            mem,
            index,
            size: opts.size,
            layout,
            event_idx: opts.event_idx,
            poison: opts.poison,
            arena_bytes: opts.arena_bytes.max(16),
            batch_indirect: opts.batch_indirect,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            free: (0..opts.size).collect(),
            slots,
            next_avail: 0,
            kicked_avail: 0,
            last_used: 0,
            in_flight: 0,
            seq: 1,
            stats: QueueStats::default(),
            bogus_used: Vec::new(),
            scratch: Vec::with_capacity(opts.size as usize),
            raw_map: Vec::with_capacity(opts.size as usize),
            poll_interval: None,
            spin: false,
            eager_used_event: false,
        })
    }

    /// Queue index (0 requestq, 1 eventq).
    pub fn index(&self) -> u16 {
        self.index
    }
    /// Number of descriptors.
    pub fn size(&self) -> u16 {
        self.size
    }
    /// Ring GPAs.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }
    /// The guest memory the queue lives in.
    pub fn mem(&self) -> &Arc<GuestMem> {
        &self.mem
    }
    /// The eventfd the driver writes to notify the device.
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }
    /// The eventfd the device signals when it used buffers.
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }
    /// Whether EVENT_IDX drives notifications.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }
    /// Change the notification scheme (must match the negotiated features).
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }
    /// Change the poison byte for writable buffers.
    pub fn set_poison(&mut self, poison: Option<u8>) {
        self.poison = poison;
    }
    /// Use indirect tables in `submit_batch`.
    pub fn set_batch_indirect(&mut self, on: bool) {
        self.batch_indirect = on;
    }
    /// By default waits rely on the call eventfd only, so a device that
    /// fails to signal makes them time out. With `Some(d)` the used ring is
    /// also re-checked every `d` (for tests that bypass notifications).
    pub fn set_poll_interval(&mut self, interval: Option<Duration>) {
        self.poll_interval = interval;
    }
    /// EVENT_IDX: ask for the interrupt (`used_event` = the last chain in
    /// flight) when kicking, not only when a wait finds the chains not yet
    /// used: whether the device signals then no longer depends on which of
    /// the two got there first (the cost benches count its system calls).
    pub fn set_eager_used_event(&mut self, on: bool) {
        self.eager_used_event = on;
    }
    /// Busy-wait on the used ring instead of sleeping on the call eventfd,
    /// as Linux's virtio-iommu driver does for its requests.
    pub fn set_spin(&mut self, on: bool) {
        self.spin = on;
    }
    /// Free descriptor-table entries.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }
    /// Chains submitted and not yet used.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }
    /// Used entries whose id was not an in-flight head (device bugs or raw
    /// avail entries), as `(id, len)`; clears the list.
    pub fn take_bogus_used(&mut self) -> Vec<(u32, u32)> {
        std::mem::take(&mut self.bogus_used)
    }
    /// The driver's shadow of `avail.idx`.
    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }
    /// The driver's count of consumed used entries.
    pub fn last_used_idx(&self) -> u16 {
        self.last_used
    }

    fn used_event_gpa(&self) -> u64 {
        self.layout.avail + 4 + 2 * u64::from(self.size)
    }
    fn avail_event_gpa(&self) -> u64 {
        self.layout.used + 4 + 8 * u64::from(self.size)
    }
    /// `used.idx` as the device last published it.
    pub fn device_used_idx(&self) -> Result<u16> {
        Ok(self
            .mem
            .atomic_u16(self.layout.used + 2)?
            .load(Ordering::Acquire))
    }
    /// `used.flags`.
    pub fn used_flags(&self) -> Result<u16> {
        Ok(self
            .mem
            .atomic_u16(self.layout.used)?
            .load(Ordering::Acquire))
    }
    /// `avail_event` (written by the device under EVENT_IDX).
    pub fn avail_event(&self) -> Result<u16> {
        Ok(self
            .mem
            .atomic_u16(self.avail_event_gpa())?
            .load(Ordering::Acquire))
    }
    /// Set `avail.flags` (e.g. VRING_AVAIL_F_NO_INTERRUPT).
    pub fn set_avail_flags(&self, flags: u16) -> Result<()> {
        self.mem
            .atomic_u16(self.layout.avail)?
            .store(flags, Ordering::Release);
        Ok(())
    }
    /// Set `used_event`: under EVENT_IDX the device signals once `used.idx`
    /// moves past it.
    pub fn set_used_event(&self, v: u16) -> Result<()> {
        self.mem
            .atomic_u16(self.used_event_gpa())?
            .store(v, Ordering::Release);
        Ok(())
    }

    fn ensure_arena(&mut self, head: u16, need: u64) -> Result<()> {
        let slot = &mut self.slots[head as usize];
        if slot.arena_cap < need {
            let cap = need.max(u64::from(self.arena_bytes)).next_power_of_two();
            slot.arena = self.mem.alloc(cap, 64)?;
            slot.arena_cap = cap;
        }
        Ok(())
    }

    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) -> Result<()> {
        self.mem.write(
            self.layout.desc + u64::from(i) * DESC_SIZE,
            &encode_desc(addr, len, flags, next),
        )
    }

    fn no_room(&self, need: usize) -> Error {
        Error::Invalid(format!(
            "queue {}: chain needs {need} descriptors, {} free of {}",
            self.index,
            self.free.len(),
            self.size
        ))
    }

    /// Add a chain: each readable piece is one device-readable descriptor,
    /// then one device-writable descriptor per entry of `writable_lens`.
    /// Makes it available (no kick).
    pub fn add(&mut self, readable: &[&[u8]], writable_lens: &[u32]) -> Result<Token> {
        self.add_inner(readable, writable_lens, false, 0)
    }

    /// Same chain, but inside an indirect descriptor table referenced by a
    /// single VRING_DESC_F_INDIRECT descriptor.
    pub fn add_indirect(&mut self, readable: &[&[u8]], writable_lens: &[u32]) -> Result<Token> {
        self.add_inner(readable, writable_lens, true, 0)
    }

    fn add_inner(
        &mut self,
        readable: &[&[u8]],
        writable: &[u32],
        indirect: bool,
        user: usize,
    ) -> Result<Token> {
        let n = readable.len() + writable.len();
        if n == 0 {
            return invalid("a chain needs at least one descriptor");
        }
        if n > u16::MAX as usize + 1 {
            return invalid(format!("chain of {n} descriptors is too long"));
        }
        let ring_descs = if indirect { 1 } else { n };
        if ring_descs > self.free.len() {
            return Err(self.no_room(ring_descs));
        }
        let table_bytes = if indirect { n as u64 * DESC_SIZE } else { 0 };
        let mut need = table_bytes;
        for r in readable {
            need = align8(need) + r.len() as u64;
        }
        for &w in writable {
            need = align8(need) + u64::from(w);
        }
        let head = self.free.pop_front().expect("checked free count");
        if let Err(e) = self.ensure_arena(head, need) {
            self.free.push_front(head);
            return Err(e);
        }

        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut descs = std::mem::take(&mut self.slots[head as usize].descs);
        let mut wr = std::mem::take(&mut self.slots[head as usize].writable);
        descs.clear();
        wr.clear();
        descs.push(head);
        let base = self.slots[head as usize].arena;
        let mut off = table_bytes;
        let mut cur = head;
        let mut wtotal = 0usize;
        for k in 0..n {
            off = align8(off);
            let gpa = base + off;
            let (len, flags) = if k < readable.len() {
                let piece = readable[k];
                self.mem.write(gpa, piece)?;
                (piece.len() as u32, 0)
            } else {
                let len = writable[k - readable.len()];
                if let Some(p) = self.poison {
                    self.mem.fill(gpa, len as usize, p)?;
                }
                wr.push((gpa, len));
                wtotal += len as usize;
                (len, VRING_DESC_F_WRITE)
            };
            off += u64::from(len);
            let last = k + 1 == n;
            let flags = flags | if last { 0 } else { VRING_DESC_F_NEXT };
            if indirect {
                let next = if last { 0 } else { (k + 1) as u16 };
                self.mem.write(
                    base + k as u64 * DESC_SIZE,
                    &encode_desc(gpa, len, flags, next),
                )?;
            } else {
                let next = if last {
                    0
                } else {
                    let nx = self.free.pop_front().expect("checked free count");
                    descs.push(nx);
                    nx
                };
                self.write_desc(cur, gpa, len, flags, next)?;
                cur = next;
            }
        }
        if indirect {
            self.write_desc(head, base, table_bytes as u32, VRING_DESC_F_INDIRECT, 0)?;
        }
        let slot = &mut self.slots[head as usize];
        slot.descs = descs;
        slot.writable = wr;
        slot.writable_total = wtotal;
        slot.seq = seq;
        slot.state = SlotState::InFlight;
        slot.user = user;
        self.publish(head)?;
        Ok(Token { head, seq })
    }

    /// Add a chain of caller-supplied descriptors, written as given into
    /// freshly allocated table entries (the first one is the head).
    /// `RawNext::Chain(i)` is mapped to the entry allocated for `descs[i]`.
    /// Writable, non-indirect descriptors inside guest RAM are recorded for
    /// [`SplitQueue::read_written`].
    pub fn add_raw(&mut self, descs: &[RawDesc]) -> Result<Token> {
        let n = descs.len();
        if n == 0 {
            return invalid("add_raw needs at least one descriptor");
        }
        if n > self.free.len() {
            return Err(self.no_room(n));
        }
        for d in descs {
            if let RawNext::Chain(j) = d.next {
                if j >= n {
                    return invalid(format!("RawNext::Chain({j}) outside a {n}-entry chain"));
                }
            }
        }
        let mut map = std::mem::take(&mut self.raw_map);
        map.clear();
        for _ in 0..n {
            map.push(self.free.pop_front().expect("checked free count"));
        }
        let head = map[0];
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut wr = std::mem::take(&mut self.slots[head as usize].writable);
        wr.clear();
        let mut wtotal = 0usize;
        let mut res = Ok(());
        for (i, d) in descs.iter().enumerate() {
            let next = match d.next {
                RawNext::None => 0,
                RawNext::Chain(j) => map[j],
                RawNext::Abs(v) => v,
            };
            if let Err(e) = self.write_desc(map[i], d.addr, d.len, d.flags, next) {
                res = Err(e);
                break;
            }
            if d.flags & VRING_DESC_F_WRITE != 0
                && d.flags & VRING_DESC_F_INDIRECT == 0
                && self.mem.is_ram(d.addr, u64::from(d.len))
            {
                if let Some(p) = self.poison {
                    self.mem.fill(d.addr, d.len as usize, p)?;
                }
                wr.push((d.addr, d.len));
                wtotal += d.len as usize;
            }
        }
        let slot = &mut self.slots[head as usize];
        slot.descs.clear();
        slot.descs.extend_from_slice(&map);
        slot.writable = wr;
        slot.writable_total = wtotal;
        slot.seq = seq;
        slot.state = SlotState::InFlight;
        slot.user = 0;
        self.raw_map = map;
        res?;
        self.publish(head)?;
        Ok(Token { head, seq })
    }

    fn publish(&mut self, head: u16) -> Result<()> {
        self.push_avail_raw(head)?;
        self.in_flight += 1;
        self.stats.added += 1;
        Ok(())
    }

    /// Put an arbitrary head index into the avail ring (no tracking).
    pub fn push_avail_raw(&mut self, head: u16) -> Result<()> {
        let pos = self.next_avail % self.size;
        self.mem
            .write_u16(self.layout.avail + 4 + 2 * u64::from(pos), head)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .atomic_u16(self.layout.avail + 2)?
            .store(self.next_avail, Ordering::Release);
        Ok(())
    }

    /// Store an arbitrary `avail.idx` (hostile tests); the driver's shadow
    /// follows it.
    pub fn set_avail_idx_raw(&mut self, idx: u16) -> Result<()> {
        self.next_avail = idx;
        self.mem
            .atomic_u16(self.layout.avail + 2)?
            .store(idx, Ordering::Release);
        Ok(())
    }

    /// Notify the device if it asked for it (EVENT_IDX: `avail_event`;
    /// otherwise: VRING_USED_F_NO_NOTIFY clear). Returns whether it kicked.
    pub fn kick(&mut self) -> Result<bool> {
        if self.eager_used_event && self.event_idx && self.in_flight > 0 {
            self.set_used_event(self.last_used.wrapping_add(self.in_flight as u16 - 1))?;
        }
        fence(Ordering::SeqCst);
        let new = self.next_avail;
        let old = self.kicked_avail;
        self.kicked_avail = new;
        let need = if self.event_idx {
            vring_need_event(self.avail_event()?, new, old)
        } else {
            new != old && self.used_flags()? & VRING_USED_F_NO_NOTIFY == 0
        };
        if need {
            self.kick.write(1)?;
            self.stats.kicks += 1;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        Ok(need)
    }

    /// Notify the device unconditionally.
    pub fn kick_forced(&mut self) -> Result<()> {
        fence(Ordering::SeqCst);
        self.kicked_avail = self.next_avail;
        self.kick.write(1)?;
        self.stats.kicks += 1;
        Ok(())
    }

    /// Collect every used entry published so far (no waiting), appending
    /// `(token, used_len)` in used-ring order. Returns how many were added.
    pub fn poll_used_into(&mut self, out: &mut Vec<(Token, u32)>) -> Result<usize> {
        let used_idx = self.device_used_idx()?;
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending > self.size {
            return invalid(format!(
                "queue {}: device moved used.idx from {} to {used_idx} (more than the \
                 queue size {})",
                self.index, self.last_used, self.size
            ));
        }
        let mut count = 0;
        while self.last_used != used_idx {
            let e = self.layout.used + 4 + 8 * u64::from(self.last_used % self.size);
            let id = self.mem.read_u32(e)?;
            let len = self.mem.read_u32(e + 4)?;
            self.last_used = self.last_used.wrapping_add(1);
            match self.complete(id, len) {
                Some(t) => {
                    out.push((t, len));
                    count += 1;
                }
                None => self.bogus_used.push((id, len)),
            }
        }
        Ok(count)
    }

    fn complete(&mut self, id: u32, len: u32) -> Option<Token> {
        if id >= u32::from(self.size) {
            return None;
        }
        let slot = &mut self.slots[id as usize];
        if slot.state != SlotState::InFlight {
            return None;
        }
        slot.state = SlotState::Done(len);
        self.free.extend(slot.descs.iter().copied());
        self.in_flight -= 1;
        self.stats.completed += 1;
        Some(Token {
            head: id as u16,
            seq: slot.seq,
        })
    }

    /// Wait (poll on the call eventfd, bounded by `timeout`) until at least
    /// one used entry arrives; returns all collected, in used-ring order.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<Vec<(Token, u32)>> {
        let mut out = Vec::new();
        self.wait_used_into(&mut out, 1, timeout)?;
        Ok(out)
    }

    /// Wait until at least `min` used entries were appended to `out`.
    pub fn wait_used_into(
        &mut self,
        out: &mut Vec<(Token, u32)>,
        min: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut got = 0usize;
        loop {
            got += self.poll_used_into(out)?;
            if got >= min {
                return Ok(());
            }
            if self.spin {
                if Instant::now() >= deadline {
                    return Err(Error::Timeout(format!(
                        "queue {}: {got} of {min} used entries after {timeout:?} (spinning)",
                        self.index
                    )));
                }
                std::hint::spin_loop();
                continue;
            }
            if self.event_idx {
                // Ask for a signal when the last of the entries we wait for
                // is used (or the first one, if we wait for more than are
                // in flight).
                let want = (min - got).min(self.in_flight).max(1);
                self.set_used_event(self.last_used.wrapping_add(want as u16 - 1))?;
                fence(Ordering::SeqCst);
                got += self.poll_used_into(out)?;
                if got >= min {
                    return Ok(());
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(format!(
                    "queue {}: {got} of {min} used entries after {timeout:?} ({} in flight, \
                     avail.idx {}, used.idx {})",
                    self.index,
                    self.in_flight,
                    self.next_avail,
                    self.device_used_idx().unwrap_or(0)
                )));
            }
            let mut left = deadline - now;
            if let Some(p) = self.poll_interval {
                left = left.min(p);
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is a valid pollfd array of length 1 for the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Error::Io(e));
                }
            } else if r > 0 && self.call.read().is_ok() {
                self.stats.calls += 1;
            }
        }
    }

    /// Give up on an in-flight chain the device will never use (e.g. a
    /// hostile chain it rejected): its descriptors return to the free list.
    /// A later used entry for it is reported by [`SplitQueue::take_bogus_used`].
    pub fn abandon(&mut self, t: Token) -> Result<()> {
        let slot = match self.slots.get_mut(t.head as usize) {
            Some(s) if s.seq == t.seq && s.state == SlotState::InFlight => s,
            _ => return invalid(format!("token {t:?} is not in flight")),
        };
        slot.state = SlotState::Free;
        self.free.extend(slot.descs.iter().copied());
        self.in_flight -= 1;
        Ok(())
    }

    fn done_slot(&self, t: Token) -> Result<&Slot> {
        let slot = match self.slots.get(t.head as usize) {
            Some(s) => s,
            None => return invalid(format!("token {t:?}: head out of range")),
        };
        if slot.seq != t.seq {
            return invalid(format!(
                "token {t:?}: head {} was reused by a later chain; read replies before \
                 submitting {} more chains",
                t.head, self.size
            ));
        }
        match slot.state {
            SlotState::Done(_) => Ok(slot),
            SlotState::InFlight => invalid(format!("token {t:?}: not used by the device yet")),
            SlotState::Free => invalid(format!("token {t:?}: unknown")),
        }
    }

    /// The used length the device reported for a completed chain.
    pub fn used_len(&self, t: Token) -> Result<u32> {
        match self.done_slot(t)?.state {
            SlotState::Done(l) => Ok(l),
            _ => unreachable!("done_slot checks the state"),
        }
    }

    /// The device-writable buffers of a chain, as `(gpa, len)` in order.
    pub fn writable_buffers(&self, t: Token) -> Result<Vec<(u64, u32)>> {
        let slot = match self.slots.get(t.head as usize) {
            Some(s) if s.seq == t.seq => s,
            _ => return invalid(format!("token {t:?}: unknown or reused")),
        };
        Ok(slot.writable.clone())
    }

    /// Everything in the chain's writable buffers (all of them, regardless
    /// of the used length), concatenated in order.
    pub fn read_written(&self, t: Token) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.read_written_into(t, &mut v)?;
        Ok(v)
    }

    /// Append the chain's writable bytes to `out`.
    pub fn read_written_into(&self, t: Token, out: &mut Vec<u8>) -> Result<()> {
        let slot = self.done_slot(t)?;
        out.reserve(slot.writable_total);
        for &(gpa, len) in &slot.writable {
            self.mem.read_append(gpa, len as usize, out)?;
        }
        Ok(())
    }

    /// Submit one request (readable bytes, writable length), kick, wait for
    /// it, return `(used_len, written bytes)`.
    pub fn request(&mut self, readable: &[u8], writable_len: u32) -> Result<(u32, Vec<u8>)> {
        let mut r = self.submit_batch(&[(readable, writable_len)])?;
        Ok(r.pop().expect("one reply per request"))
    }

    /// [`SplitQueue::submit_batch_timeout`] with [`DEFAULT_TIMEOUT`].
    pub fn submit_batch<R: AsRef<[u8]>>(
        &mut self,
        reqs: &[(R, u32)],
    ) -> Result<Vec<(u32, Vec<u8>)>> {
        self.submit_batch_timeout(reqs, DEFAULT_TIMEOUT)
    }

    /// Submit many `(readable bytes, writable length)` requests with as few
    /// kicks as possible; returns `(used_len, written bytes)` per request,
    /// in request order.
    pub fn submit_batch_timeout<R: AsRef<[u8]>>(
        &mut self,
        reqs: &[(R, u32)],
        timeout: Duration,
    ) -> Result<Vec<(u32, Vec<u8>)>> {
        let mut out = BatchReplies::default();
        self.submit_batch_into(reqs, &mut out, timeout)?;
        Ok((0..out.len())
            .map(|i| (out.used_len(i), out.written(i).to_vec()))
            .collect())
    }

    /// Allocation-free batch: requests are added while descriptors last,
    /// then one kick, then a wait until all in flight are used; repeated
    /// until every request is answered. Replies land in `out` (reused).
    /// The queue must have nothing in flight when called.
    pub fn submit_batch_into<R: AsRef<[u8]>>(
        &mut self,
        reqs: &[(R, u32)],
        out: &mut BatchReplies,
        timeout: Duration,
    ) -> Result<()> {
        if self.in_flight != 0 {
            return invalid(format!(
                "submit_batch on queue {} with {} chains already in flight",
                self.index, self.in_flight
            ));
        }
        out.data.clear();
        out.entries.clear();
        out.entries.resize(reqs.len(), (0, 0, 0));
        let mut comps = std::mem::take(&mut self.scratch);
        let mut next = 0;
        let mut done = 0;
        let res = (|| {
            while done < reqs.len() {
                while next < reqs.len() {
                    let (r, w) = &reqs[next];
                    let r = r.as_ref();
                    let need = if self.batch_indirect {
                        1
                    } else {
                        usize::from(!r.is_empty()) + usize::from(*w > 0)
                    };
                    if need > self.free.len() {
                        break;
                    }
                    let ra = [r];
                    let wa = [*w];
                    let readable: &[&[u8]] = if r.is_empty() { &ra[..0] } else { &ra[..] };
                    let writable: &[u32] = if *w == 0 { &wa[..0] } else { &wa[..] };
                    self.add_inner(readable, writable, self.batch_indirect, next)?;
                    next += 1;
                }
                if self.in_flight == 0 {
                    return invalid(format!(
                        "request {next} does not fit in queue {} of size {}",
                        self.index, self.size
                    ));
                }
                self.kick()?;
                comps.clear();
                let n = self.in_flight;
                self.wait_used_into(&mut comps, n, timeout)?;
                for &(t, len) in comps.iter() {
                    let idx = self.slots[t.head as usize].user;
                    let start = out.data.len();
                    self.read_written_into(t, &mut out.data)?;
                    out.entries[idx] = (len, start, out.data.len() - start);
                    done += 1;
                }
            }
            Ok(())
        })();
        self.scratch = comps;
        res
    }
}

/// Replies of a batch, stored flat so that the buffers are reused.
#[derive(Default, Debug, Clone)]
pub struct BatchReplies {
    data: Vec<u8>,
    /// (used_len, start, len) per request.
    entries: Vec<(u32, usize, usize)>,
}

impl BatchReplies {
    /// Number of replies.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// Whether there are no replies.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Used length of reply `i`.
    pub fn used_len(&self, i: usize) -> u32 {
        self.entries[i].0
    }
    /// The writable bytes of request `i` after completion.
    pub fn written(&self, i: usize) -> &[u8] {
        let (_, s, l) = self.entries[i];
        &self.data[s..s + l]
    }
    /// Byte 0 of the writable part (the status for all requests but PROBE),
    /// or `None` if the device reported used length 0.
    pub fn status(&self, i: usize) -> Option<u8> {
        if self.used_len(i) == 0 {
            None
        } else {
            self.written(i).first().copied()
        }
    }
    /// `(used_len, written)` per request.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &[u8])> + '_ {
        (0..self.len()).map(move |i| (self.used_len(i), self.written(i)))
    }
}
