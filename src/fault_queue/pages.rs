// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Page requests: the records sources deliver (the kernel's fault FD and the
//! virtual endpoints' FD share one format, struct iommu_hwpt_pgfault), and
//! the outstanding groups that must each be completed exactly once
//! (spec-notes/protocol.md 6.8).
//!
//! Pure bookkeeping: completions are queued as `Response`s in an outbox and
//! the glue writes them to their source; groups whose records must leave the
//! event FIFO are queued in `purged`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use iommufd_bindings::iommufd::{
    iommu_hwpt_pgfault, iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_LAST_PAGE,
    iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_PASID_VALID,
    iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_EXEC,
    iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_PRIV,
    iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_READ,
    iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_WRITE,
};
use log::{debug, Level};

use crate::log_limit::limited;

mod cookies;

use cookies::CookieIndex;

/// struct iommu_hwpt_pgfault, as read from a fault FD.
pub(crate) const PGFAULT_LEN: usize = std::mem::size_of::<iommu_hwpt_pgfault>();
pub const PGFAULT_F_PASID_VALID: u32 = iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_PASID_VALID;
pub const PGFAULT_F_LAST_PAGE: u32 = iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_LAST_PAGE;
pub const PERM_READ: u32 = iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_READ;
pub(crate) const PERM_WRITE: u32 = iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_WRITE;
pub(crate) const PERM_EXEC: u32 = iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_EXEC;
pub(crate) const PERM_PRIV: u32 = iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_PRIV;

/// PAGE_RESP codes (spec-notes/protocol.md 6.4).
pub(crate) const CODE_SUCCESS: u16 = 0;
pub(crate) const CODE_INVALID: u16 = 1;
pub(crate) const CODE_FAILURE: u16 = 2;

/// Where a group came from, and where its response goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceId {
    /// The kernel's fault FD (IOMMU_FAULT_QUEUE_ALLOC).
    Kernel,
    /// Virtual endpoints (the control socket's `dma`).
    Virtual,
}

/// One record of a fault FD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultRecord {
    pub flags: u32,
    pub dev_id: u32,
    pub pasid: u32,
    pub grpid: u32,
    pub perm: u32,
    pub addr: u64,
    pub length: u32,
    pub cookie: u32,
}

impl FaultRecord {
    /// A record as the kernel wrote it (native endianness, struct
    /// iommu_hwpt_pgfault of the bindings).
    pub(crate) fn parse(b: &[u8; PGFAULT_LEN]) -> Self {
        // SAFETY: `b` holds exactly size_of::<iommu_hwpt_pgfault>() bytes
        // (PGFAULT_LEN is that size); the struct is #[repr(C)] of u32/u64
        // fields, for which every bit pattern is valid; read_unaligned
        // needs no alignment of `b`.
        let r: iommu_hwpt_pgfault = unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) };
        FaultRecord {
            // The kernel copies internal flag bits too (VT-d): mask them.
            flags: r.flags & (PGFAULT_F_PASID_VALID | PGFAULT_F_LAST_PAGE),
            dev_id: r.dev_id,
            pasid: r.pasid,
            grpid: r.grpid,
            perm: r.perm & (PERM_READ | PERM_WRITE | PERM_EXEC | PERM_PRIV),
            addr: r.addr,
            length: r.length,
            cookie: r.cookie,
        }
    }

    /// The record as a source writes it (the virtual endpoints' pipe).
    pub(crate) fn encode(&self) -> [u8; PGFAULT_LEN] {
        let r = iommu_hwpt_pgfault {
            flags: self.flags,
            dev_id: self.dev_id,
            pasid: self.pasid,
            grpid: self.grpid,
            perm: self.perm,
            __reserved: 0,
            addr: self.addr,
            length: self.length,
            cookie: self.cookie,
        };
        let mut b = [0u8; PGFAULT_LEN];
        // SAFETY: writes size_of::<iommu_hwpt_pgfault>() == PGFAULT_LEN
        // bytes into `b`, unaligned; the struct has no padding (its fields
        // fill 40 bytes, asserted by the bindings), so every byte written is
        // initialised.
        unsafe { std::ptr::write_unaligned(b.as_mut_ptr().cast(), r) };
        b
    }

    pub(crate) fn pasid(&self) -> Option<u32> {
        (self.flags & PGFAULT_F_PASID_VALID != 0).then_some(self.pasid)
    }

    pub(crate) fn last(&self) -> bool {
        self.flags & PGFAULT_F_LAST_PAGE != 0
    }
}

/// A response for a source: the group's cookie and a PAGE_RESP code (the
/// kernel writer turns FAILURE into INVALID, the only other code it takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub source: SourceId,
    pub cookie: u32,
    pub code: u16,
    /// The driver's answer (else the device's own).
    pub by_driver: bool,
}

/// Fills response batches (never sent).
pub(crate) const NO_RESPONSE: Response = Response {
    source: SourceId::Kernel,
    cookie: 0,
    code: 0,
    by_driver: false,
};

/// A page-request group as the guest names it (in its records and in
/// PAGE_RESP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupKey {
    pub endpoint: u32,
    pub pasid: Option<u32>,
    /// The device's group id (not the PCIe PRG index).
    pub group: u16,
}

/// Two words rather than the derive's four writes (endpoint, the Option's
/// tag, PASID, group): fewer hasher rounds per lookup, several lookups per
/// fault. Injective, so keys a guest chooses collide no more than by the
/// hasher's seed.
impl std::hash::Hash for GroupKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from(self.endpoint) << 32 | u64::from(self.pasid.unwrap_or(0)));
        state.write_u32(u32::from(self.group) | u32::from(self.pasid.is_some()) << 16);
    }
}

/// A source's cookie as one word (the `cookies` map's key).
fn cookie_key(source: SourceId, cookie: u32) -> u64 {
    let s: u64 = match source {
        SourceId::Kernel => 0,
        SourceId::Virtual => 1,
    };
    s << 32 | u64::from(cookie)
}

/// One outstanding group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Group {
    pub source: SourceId,
    pub cookie: u32,
    /// The attachment that handles it: the PASID it was attached at (None:
    /// the endpoint's default address space), and the table domain.
    pub slot: Option<u32>,
    pub domain: u32,
    /// Its records all reached the guest: only then may the driver answer.
    pub delivered: bool,
    /// When the device completes it itself (`--page-response-timeout-ms`).
    pub deadline: Option<Instant>,
}

/// How the groups ended, for `stats` and for the exactly-once tests:
/// raised == outstanding + by_driver + by_device + by_kernel always.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageCounters {
    pub raised: u64,
    pub completed_by_driver: u64,
    /// Completed with a code of our own (INVALID or FAILURE).
    pub completed_by_device: u64,
    /// Completed by the kernel itself (detach, replace): forgotten.
    pub completed_by_kernel: u64,
    /// Of those by the device: refused at once because the bound was hit.
    pub refused_full: u64,
    /// Of those by the device: the driver did not negotiate F_PAGE_REQUEST.
    pub refused_unnegotiated: u64,
    /// Of those by the device: no table attached with PAGE_REQUESTS handles
    /// it (unknown device, detached before the record was read).
    pub refused_no_handler: u64,
    /// Of those by the device: eventq buffers too small for the record.
    pub small_buffer: u64,
    /// Of those by the device: the driver did not answer in time
    /// (`--page-response-timeout-ms`), or a virtual `dma` stopped waiting.
    pub timed_out: u64,
    /// Of those by the device: the frontend set the features again without
    /// F_PAGE_REQUEST while they were outstanding.
    pub withdrawn: u64,
    /// Responses the kernel refused (written to its fault queue in vain).
    pub responses_failed: u64,
}

/// Why a group is completed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Full,
    Unnegotiated,
    NoHandler,
}

/// Why a driver's PAGE_RESP was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PageRespError {
    #[error("no outstanding group {group} of endpoint {endpoint} (pasid {pasid:?})")]
    NoGroup {
        endpoint: u32,
        pasid: Option<u32>,
        group: u16,
    },
}

/// An outstanding group in its slot: the key's endpoint and PASID (the
/// slot's `id` is its group id) and the group.
#[derive(Debug, Clone, Copy)]
struct Held {
    endpoint: u32,
    pasid: Option<u32>,
    group: Group,
}

/// One place of the slab.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// The group id of the group held, or, while free, the id the slot
    /// gives next: always the slot's index modulo the id stride.
    id: u16,
    held: Option<Held>,
    /// While free: the next free slot (NO_SLOT: none), oldest first.
    next_free: u32,
}

/// No slot (the free list's end).
const NO_SLOT: u32 = u32::MAX;

/// Where a completed group's response goes.
#[derive(Debug, Clone, Copy)]
struct Origin {
    source: SourceId,
    cookie: u32,
}

/// The outstanding groups live in a slab of at most `max` slots, and a
/// group's id names its slot: id = generation * stride + index, the stride
/// the power of two at or above `max`. PAGE_RESP and delivery find their
/// group by the id alone (no hash: three hash maps a group went through
/// cost ~690 instructions per fault, spec-notes/benchmarks.md). Ids are
/// unique among all outstanding groups (so per endpoint and PASID, what
/// protocol.md 6.8 asks). Free slots are reused oldest first, each with
/// its next generation, so an id comes back only after 65536 * max /
/// stride groups (65536 at the default bound; fewer while many stay
/// outstanding): a late PAGE_RESP meets INVAL, not a newer group.
#[derive(Debug)]
pub struct PageRequests {
    slots: Vec<Slot>,
    /// Free slots, oldest first, linked through the slots (the slab grows
    /// to `max` before any is reused): head, tail, count.
    free_head: u32,
    free_tail: u32,
    free_len: usize,
    /// `max` rounded up to a power of two (the id stride), minus 1.
    mask: u32,
    /// Groups held.
    len: usize,
    /// A source's cookie (`cookie_key`) to its group's slot: duplicates are
    /// refused, and a virtual `dma` that gives up finds its group.
    cookies: CookieIndex,
    max: usize,
    /// The device completes a group the driver has not answered after this.
    timeout: Option<Duration>,
    /// The deadline of groups raised at `deadline_of` (a read's groups
    /// share their `now`: one `checked_add` per read, not per group).
    deadline_of: Option<Instant>,
    deadline: Option<Instant>,
    pub counters: PageCounters,
    /// Allocated once (the bound), so completing allocates nothing.
    outbox: VecDeque<Response>,
    purged: VecDeque<GroupKey>,
}

impl PageRequests {
    /// At most `max` groups outstanding (beyond: FAILURE at once).
    pub(crate) fn new(max: usize) -> Self {
        let max = max.min(1 << 16);
        PageRequests {
            slots: Vec::with_capacity(max),
            free_head: NO_SLOT,
            free_tail: NO_SLOT,
            free_len: 0,
            mask: u32::try_from(max.max(1).next_power_of_two() - 1).unwrap_or(u32::MAX),
            len: 0,
            cookies: CookieIndex::new(max),
            max,
            timeout: None,
            deadline_of: None,
            deadline: None,
            counters: PageCounters::default(),
            outbox: VecDeque::with_capacity(max + 64),
            purged: VecDeque::with_capacity(max + 64),
        }
    }

    /// Groups not answered `timeout` after they were raised are completed
    /// by the device (`expire`).
    pub(crate) fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self.deadline_of = None;
        self
    }

    pub(crate) fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    pub fn outstanding(&self) -> usize {
        self.len
    }

    /// The slot holding the group `key` names, if it is outstanding.
    fn find(&self, key: &GroupKey) -> Option<usize> {
        let i = usize::try_from(u32::from(key.group) & self.mask).ok()?;
        let slot = self.slots.get(i)?;
        match slot.held {
            Some(h)
                if slot.id == key.group && h.endpoint == key.endpoint && h.pasid == key.pasid =>
            {
                Some(i)
            }
            _ => None,
        }
    }

    /// The key of the group slot `i` holds.
    fn key_of(&self, i: usize) -> Option<GroupKey> {
        let slot = &self.slots[i];
        slot.held.map(|h| GroupKey {
            endpoint: h.endpoint,
            pasid: h.pasid,
            group: slot.id,
        })
    }

    #[cfg(test)]
    pub(crate) fn group(&self, key: &GroupKey) -> Option<&Group> {
        let i = self.find(key)?;
        self.slots[i].held.as_ref().map(|h| &h.group)
    }

    fn respond(&mut self, g: Origin, code: u16, by_driver: bool) {
        self.outbox.push_back(Response {
            source: g.source,
            cookie: g.cookie,
            code,
            by_driver,
        });
    }

    /// A group arrived that cannot be relayed: complete it at once.
    pub(crate) fn refuse(&mut self, source: SourceId, cookie: u32, code: u16, why: Refusal) {
        self.counters.raised += 1;
        self.counters.completed_by_device += 1;
        match why {
            Refusal::Full => self.counters.refused_full += 1,
            Refusal::Unnegotiated => self.counters.refused_unnegotiated += 1,
            Refusal::NoHandler => self.counters.refused_no_handler += 1,
        }
        self.outbox.push_back(Response {
            source,
            cookie,
            code,
            by_driver: false,
        });
    }

    /// A virtual `dma` gave up (timeout) before its record was read: the
    /// record is dropped when read, and counts as completed by the device.
    pub(crate) fn note_cancelled(&mut self) {
        self.counters.raised += 1;
        self.counters.completed_by_device += 1;
        self.counters.timed_out += 1;
    }

    /// A virtual `dma` gave up on its outstanding group: FAILURE.
    pub fn time_out(&mut self, source: SourceId, cookie: u32) -> bool {
        let done = self.complete_cookie(source, cookie, CODE_FAILURE);
        if done {
            self.counters.timed_out += 1;
        }
        done
    }

    /// The slot the next group takes: a new one while the slab is below
    /// the bound (so that every slot is used before any is reused), else
    /// the oldest freed. None when `max` groups are held.
    fn next_slot(&self) -> Option<usize> {
        if self.len >= self.max {
            return None;
        }
        if self.slots.len() < self.max {
            return Some(self.slots.len());
        }
        (self.free_head != NO_SLOT)
            .then(|| usize::try_from(self.free_head).ok())
            .flatten()
    }

    /// Take the slot `next_slot` named.
    fn take_slot(&mut self, i: usize) {
        if i == self.slots.len() {
            // Below the bound: within the capacity allocated at start.
            let id = u16::try_from(i).unwrap_or(u16::MAX);
            self.slots.push(Slot {
                id,
                held: None,
                next_free: NO_SLOT,
            });
        } else {
            // `i` is the head (`next_slot`).
            self.free_head = self.slots[i].next_free;
            if self.free_head == NO_SLOT {
                self.free_tail = NO_SLOT;
            }
            self.free_len -= 1;
        }
    }

    /// A group arrived for `endpoint` at `now`: its guest-visible group id,
    /// or None when the bound is hit (then it is completed with FAILURE at
    /// once).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn raise(
        &mut self,
        endpoint: u32,
        pasid: Option<u32>,
        slot: Option<u32>,
        domain: u32,
        source: SourceId,
        cookie: u32,
        now: Instant,
    ) -> Option<u16> {
        let next = self.next_slot();
        let indexed = next.is_some_and(|i| {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            self.cookies.insert(cookie_key(source, cookie), i)
        });
        let (Some(i), true) = (next, indexed) else {
            if next.is_none() {
                limited!(
                    Level::Warn,
                    "page requests: {} groups outstanding; group of endpoint {endpoint:#x} failed",
                    self.max
                );
            } else {
                limited!(
                    Level::Warn,
                    "page requests: cookie {cookie} of {source:?} is already outstanding"
                );
            }
            self.refuse(source, cookie, CODE_FAILURE, Refusal::Full);
            return None;
        };
        self.take_slot(i);
        if self.deadline_of != Some(now) {
            self.deadline_of = Some(now);
            self.deadline = self.timeout.and_then(|t| now.checked_add(t));
        }
        let deadline = self.deadline;
        let s = &mut self.slots[i];
        s.held = Some(Held {
            endpoint,
            pasid,
            group: Group {
                source,
                cookie,
                slot,
                domain,
                delivered: false,
                deadline,
            },
        });
        self.len += 1;
        self.counters.raised += 1;
        Some(s.id)
    }

    /// All of the group's records reached the guest.
    pub fn mark_delivered(&mut self, key: &GroupKey) {
        if let Some(i) = self.find(key) {
            if let Some(h) = self.slots[i].held.as_mut() {
                h.group.delivered = true;
            }
        }
    }

    /// Free slot `i`: where its group's response goes; the group leaves
    /// the cookie index, the slot goes to the back of the free list with
    /// its next id.
    fn remove_at(&mut self, i: usize) -> Option<Origin> {
        // The stride in the 16-bit id space (65536: 0, the same id).
        let stride = u16::try_from(self.mask + 1).unwrap_or(0);
        let s = &mut self.slots[i];
        let h = s.held.take()?;
        // The same index, the next generation.
        s.id = s.id.wrapping_add(stride);
        s.next_free = NO_SLOT;
        let me = u32::try_from(i).unwrap_or(NO_SLOT);
        match usize::try_from(self.free_tail)
            .ok()
            .filter(|_| self.free_tail != NO_SLOT)
        {
            Some(t) => self.slots[t].next_free = me,
            None => self.free_head = me,
        }
        self.free_tail = me;
        self.free_len += 1;
        self.len -= 1;
        let o = Origin {
            source: h.group.source,
            cookie: h.group.cookie,
        };
        self.cookies.remove(cookie_key(o.source, o.cookie));
        Some(o)
    }

    /// The driver's PAGE_RESP. Groups not (yet) delivered to it cannot be
    /// answered: it never saw them.
    pub(crate) fn driver_response(
        &mut self,
        endpoint: u32,
        pasid: Option<u32>,
        group: u16,
        code: u16,
    ) -> Result<(), PageRespError> {
        let key = GroupKey {
            endpoint,
            pasid,
            group,
        };
        let g = match self.find(&key) {
            Some(i) if self.slots[i].held.is_some_and(|h| h.group.delivered) => self.remove_at(i),
            _ => None,
        };
        let Some(g) = g else {
            return Err(PageRespError::NoGroup {
                endpoint,
                pasid,
                group,
            });
        };
        self.counters.completed_by_driver += 1;
        self.respond(g, code, true);
        Ok(())
    }

    /// Complete the group in slot `i` with a code of the device's own.
    fn complete_at(&mut self, i: usize, code: u16) -> bool {
        let Some(key) = self.key_of(i) else {
            return false;
        };
        let Some(g) = self.remove_at(i) else {
            return false;
        };
        self.counters.completed_by_device += 1;
        self.respond(g, code, false);
        self.purged.push_back(key);
        true
    }

    /// Complete one group with a code of the device's own.
    pub(crate) fn complete_by_device(&mut self, key: &GroupKey, code: u16) -> bool {
        match self.find(key) {
            Some(i) => self.complete_at(i, code),
            None => false,
        }
    }

    /// Its record met an eventq buffer smaller than 48 bytes: FAILURE.
    pub fn small_buffer(&mut self, key: &GroupKey) -> bool {
        let done = self.complete_by_device(key, CODE_FAILURE);
        if done {
            self.counters.small_buffer += 1;
        }
        done
    }

    /// Complete the group a source's cookie names: true if it was
    /// outstanding.
    pub(crate) fn complete_cookie(&mut self, source: SourceId, cookie: u32, code: u16) -> bool {
        match self.cookies.get(cookie_key(source, cookie)) {
            Some(i) => usize::try_from(i).is_ok_and(|i| self.complete_at(i, code)),
            None => false,
        }
    }

    /// `endpoint` left `domain` at `slot` (detach, replace): its groups
    /// there are complete. The kernel answers its own (forgotten here, no
    /// second response); the device answers virtual ones with INVALID.
    /// Scans the slab (at most the bound): not per fault.
    pub(crate) fn attachment_gone(&mut self, endpoint: u32, slot: Option<u32>, domain: u32) {
        for i in 0..self.slots.len() {
            let Some(h) = self.slots[i].held else {
                continue;
            };
            if h.endpoint != endpoint || h.group.slot != slot || h.group.domain != domain {
                continue;
            }
            let key = self.key_of(i).expect("held");
            let g = self.remove_at(i).expect("held");
            self.purged.push_back(key);
            match g.source {
                SourceId::Kernel => {
                    debug!("page request group {key:?}: completed by the kernel on detach");
                    self.counters.completed_by_kernel += 1;
                }
                SourceId::Virtual => {
                    self.counters.completed_by_device += 1;
                    self.respond(g, CODE_INVALID, false);
                }
            }
        }
    }

    /// `endpoint` is gone (hot-unplug), after `attachment_gone` for each of
    /// its attachments: nothing of it may stay. Groups left over (none
    /// while every group names a live attachment) are completed by the
    /// device. (Group ids are the slab's, not per endpoint: nothing else of
    /// it is kept.)
    pub(crate) fn forget_endpoint(&mut self, endpoint: u32) {
        for i in 0..self.slots.len() {
            if self.slots[i].held.is_some_and(|h| h.endpoint == endpoint) {
                self.complete_at(i, CODE_INVALID);
            }
        }
    }

    /// The driver did not answer in time: every group whose deadline is at
    /// or before `now` is completed by the device with INVALID (FAILURE
    /// would tell a PCIe function to stop issuing page requests until it
    /// is reset; the kernel takes INVALID only anyway). Returns the next
    /// deadline. Scans the slab (at most the bound): called when the timer
    /// fires, not per fault.
    pub fn expire(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for i in 0..self.slots.len() {
            match self.slots[i].held.and_then(|h| h.group.deadline) {
                Some(d) if d <= now => {
                    let key = self.key_of(i);
                    if self.complete_at(i, CODE_INVALID) {
                        debug!("page request group {key:?}: timed out");
                        self.counters.timed_out += 1;
                    }
                }
                Some(d) => next = Some(next.map_or(d, |n| n.min(d))),
                None => {}
            }
        }
        next
    }

    /// The frontend set the features again without F_PAGE_REQUEST: the
    /// driver can answer nothing any more, so the device completes every
    /// group (INVALID).
    pub(crate) fn withdraw_all(&mut self) {
        let n = self.len as u64;
        self.complete_all(CODE_INVALID);
        self.counters.withdrawn += n;
    }

    /// Reset, disconnect: every group completed by the device with `code`.
    pub(crate) fn complete_all(&mut self, code: u16) {
        for i in 0..self.slots.len() {
            self.complete_at(i, code);
        }
    }

    /// The next response to write, oldest first.
    pub fn pop_response(&mut self) -> Option<Response> {
        self.outbox.pop_front()
    }

    /// The next response for `source`, oldest first (others stay).
    pub fn pop_response_of(&mut self, source: SourceId) -> Option<Response> {
        let i = self.outbox.iter().position(|r| r.source == source)?;
        self.outbox.remove(i)
    }

    /// A response found the group already completed by the kernel (a
    /// detach raced its record): the kernel's completion, not this one.
    pub(crate) fn reclassify_as_kernel(&mut self, r: &Response) {
        let c = if r.by_driver {
            &mut self.counters.completed_by_driver
        } else {
            &mut self.counters.completed_by_device
        };
        if *c > 0 {
            *c -= 1;
            self.counters.completed_by_kernel += 1;
        }
    }

    /// Are there groups whose queued records must leave the event FIFO?
    pub(crate) fn has_purged(&self) -> bool {
        !self.purged.is_empty()
    }

    /// The next group whose queued records must leave the event FIFO.
    pub(crate) fn pop_purged(&mut self) -> Option<GroupKey> {
        self.purged.pop_front()
    }

    /// raised == outstanding + by_driver + by_device + by_kernel; the slab,
    /// its free list and the cookie index agree. Scans the slab.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let c = &self.counters;
        let ended = c.completed_by_driver + c.completed_by_device + c.completed_by_kernel;
        if c.raised != self.len as u64 + ended {
            return Err(format!(
                "page requests: raised {} != outstanding {} + completed {ended}",
                c.raised, self.len
            ));
        }
        let held = self.slots.iter().filter(|s| s.held.is_some()).count();
        if held != self.len
            || self.cookies.len() != self.len
            || self.len > self.max
            || self.slots.len() > self.max
            || self.slots.len() != self.len + self.free_len
        {
            return Err(format!(
                "page requests: {held} groups held, {} counted, {} cookies, {} slots, {} free, \
                 bound {}",
                self.len,
                self.cookies.len(),
                self.slots.len(),
                self.free_len,
                self.max
            ));
        }
        for (i, s) in self.slots.iter().enumerate() {
            if usize::try_from(u32::from(s.id) & self.mask).ok() != Some(i) {
                return Err(format!("page requests: slot {i} gives id {}", s.id));
            }
            if let Some(h) = s.held {
                let back = self.cookies.get(cookie_key(h.group.source, h.group.cookie));
                if back.and_then(|b| usize::try_from(b).ok()) != Some(i) {
                    return Err(format!(
                        "page requests: slot {i}'s cookie {} of {:?} indexes {back:?}",
                        h.group.cookie, h.group.source
                    ));
                }
            }
        }
        // The free list: free slots only, each once, ending at the tail.
        let (mut n, mut at, mut last) = (0, self.free_head, NO_SLOT);
        while at != NO_SLOT && n <= self.slots.len() {
            let Some(s) = usize::try_from(at).ok().and_then(|i| self.slots.get(i)) else {
                return Err(format!("page requests: free list names slot {at}"));
            };
            if s.held.is_some() {
                return Err(format!(
                    "page requests: slot {at} is held and on the free list"
                ));
            }
            (n, last, at) = (n + 1, at, s.next_free);
        }
        if n != self.free_len || last != self.free_tail {
            return Err(format!(
                "page requests: free list of {n} ending at {last}, {} counted ending at {}",
                self.free_len, self.free_tail
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(endpoint: u32, pasid: Option<u32>, group: u16) -> GroupKey {
        GroupKey {
            endpoint,
            pasid,
            group,
        }
    }

    fn responses(p: &mut PageRequests) -> Vec<Response> {
        std::iter::from_fn(|| p.pop_response()).collect()
    }

    #[test]
    fn record_round_trip_masks_internal_bits() {
        let r = FaultRecord {
            flags: PGFAULT_F_PASID_VALID | PGFAULT_F_LAST_PAGE,
            dev_id: 3,
            pasid: 7,
            grpid: 9,
            perm: PERM_READ | PERM_WRITE,
            addr: 0xdead_b000,
            length: 0,
            cookie: 42,
        };
        let mut b = r.encode();
        assert_eq!(FaultRecord::parse(&b), r);
        b[0] |= 1 << 2; // VT-d's response-needs-PASID
        b[16] |= 0x80;
        assert_eq!(FaultRecord::parse(&b), r);
        assert_eq!((r.pasid(), r.last()), (Some(7), true));
    }

    #[test]
    fn driver_answers_once_and_only_delivered_groups() {
        let mut p = PageRequests::new(8);
        let g = p
            .raise(1, None, None, 5, SourceId::Virtual, 100, Instant::now())
            .unwrap();
        assert_eq!(
            p.driver_response(1, None, g, CODE_SUCCESS),
            Err(PageRespError::NoGroup {
                endpoint: 1,
                pasid: None,
                group: g
            }),
            "not delivered yet"
        );
        p.mark_delivered(&key(1, None, g));
        assert!(p.driver_response(1, Some(0), g, CODE_SUCCESS).is_err());
        assert_eq!(p.driver_response(1, None, g, CODE_SUCCESS), Ok(()));
        assert!(
            p.driver_response(1, None, g, CODE_SUCCESS).is_err(),
            "twice"
        );
        assert_eq!(
            responses(&mut p),
            vec![Response {
                source: SourceId::Virtual,
                cookie: 100,
                code: CODE_SUCCESS,
                by_driver: true,
            }]
        );
        assert_eq!(p.counters.completed_by_driver, 1);
        assert_eq!(p.check_invariants(), Ok(()));
    }

    #[test]
    fn bound_and_duplicate_cookies_fail_at_once() {
        let mut p = PageRequests::new(2);
        assert!(p
            .raise(1, None, None, 5, SourceId::Kernel, 1, Instant::now())
            .is_some());
        assert!(
            p.raise(1, None, None, 5, SourceId::Kernel, 1, Instant::now())
                .is_none(),
            "dup"
        );
        assert!(p
            .raise(1, None, None, 5, SourceId::Kernel, 2, Instant::now())
            .is_some());
        assert!(
            p.raise(1, None, None, 5, SourceId::Kernel, 3, Instant::now())
                .is_none(),
            "full"
        );
        let r = responses(&mut p);
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|r| r.code == CODE_FAILURE));
        assert_eq!(p.counters.refused_full, 2);
        assert_eq!(p.check_invariants(), Ok(()));
    }

    #[test]
    fn group_ids_are_unique_per_endpoint_and_reused_after_completion() {
        let mut p = PageRequests::new(4);
        let a = p
            .raise(1, None, None, 5, SourceId::Virtual, 1, Instant::now())
            .unwrap();
        let b = p
            .raise(1, Some(3), Some(3), 6, SourceId::Virtual, 2, Instant::now())
            .unwrap();
        let c = p
            .raise(2, None, None, 5, SourceId::Virtual, 3, Instant::now())
            .unwrap();
        // Unique among all outstanding groups (so per endpoint and PASID).
        assert!(a != b && b != c && a != c, "{a} {b} {c}");
        assert!(p.complete_cookie(SourceId::Virtual, 1, CODE_FAILURE));
        assert!(!p.complete_cookie(SourceId::Virtual, 1, CODE_FAILURE));
        assert!(p.complete_cookie(SourceId::Virtual, 2, CODE_FAILURE));
        assert!(p.complete_cookie(SourceId::Virtual, 3, CODE_FAILURE));
        assert_eq!(p.check_invariants(), Ok(()));
        // A completed group's id comes back, but only after the others:
        // a late PAGE_RESP meets INVAL, not a newer group.
        let mut raised = 0u32;
        loop {
            let id = p
                .raise(1, None, None, 5, SourceId::Virtual, 10, Instant::now())
                .unwrap();
            raised += 1;
            p.mark_delivered(&key(1, None, id));
            assert_eq!(p.driver_response(1, None, id, CODE_SUCCESS), Ok(()));
            if id == a {
                break;
            }
            assert!(raised <= 1 << 16, "id {a} never reused");
        }
        assert!(raised > 65_000, "id {a} reused after {raised} groups");
        assert_eq!(p.check_invariants(), Ok(()));
    }

    /// PAGE_RESP finds its group by the id's slot: an id of a free slot, of
    /// a slot beyond the slab, of the slot's previous or next generation,
    /// or with another endpoint or PASID, finds nothing.
    #[test]
    fn a_page_resp_names_exactly_one_outstanding_group() {
        let mut p = PageRequests::new(3);
        let a = p
            .raise(1, Some(2), Some(2), 5, SourceId::Kernel, 7, Instant::now())
            .unwrap();
        p.mark_delivered(&key(1, Some(2), a));
        let stride = 4u16;
        for (ep, pasid, id) in [
            (1, Some(2), a.wrapping_add(stride)),
            (1, Some(2), a.wrapping_sub(stride)),
            (1, Some(2), a + 1),
            (1, Some(2), a + 3),
            (1, None, a),
            (1, Some(3), a),
            (2, Some(2), a),
            (1, Some(2), u16::MAX),
        ] {
            assert!(
                p.driver_response(ep, pasid, id, CODE_SUCCESS).is_err(),
                "{ep} {pasid:?} {id}"
            );
        }
        assert_eq!(p.outstanding(), 1);
        assert_eq!(p.driver_response(1, Some(2), a, CODE_SUCCESS), Ok(()));
        assert_eq!(p.check_invariants(), Ok(()));
    }

    #[test]
    fn detach_forgets_kernel_groups_and_answers_virtual_ones() {
        let mut p = PageRequests::new(8);
        let k = p
            .raise(1, None, None, 5, SourceId::Kernel, 10, Instant::now())
            .unwrap();
        let v = p
            .raise(1, None, None, 5, SourceId::Virtual, 11, Instant::now())
            .unwrap();
        let other = p
            .raise(1, Some(4), Some(4), 5, SourceId::Kernel, 12, Instant::now())
            .unwrap();
        p.attachment_gone(1, None, 5);
        assert_eq!(
            responses(&mut p),
            vec![Response {
                source: SourceId::Virtual,
                cookie: 11,
                code: CODE_INVALID,
                by_driver: false,
            }]
        );
        let mut purged: Vec<_> = std::iter::from_fn(|| p.pop_purged()).collect();
        purged.sort();
        let mut want = vec![key(1, None, k), key(1, None, v)];
        want.sort();
        assert_eq!(purged, want);
        assert!(
            p.group(&key(1, Some(4), other)).is_some(),
            "PASID 4 untouched"
        );
        assert_eq!(p.counters.completed_by_kernel, 1);
        p.complete_all(CODE_INVALID);
        assert_eq!(responses(&mut p).len(), 1);
        assert_eq!(p.outstanding(), 0);
        assert_eq!(p.check_invariants(), Ok(()));
    }

    #[test]
    fn groups_past_their_deadline_are_completed_by_the_device_once() {
        let t = Duration::from_secs(10);
        let mut p = PageRequests::new(8).with_timeout(Some(t));
        let t0 = Instant::now();
        let a = p.raise(1, None, None, 5, SourceId::Kernel, 1, t0).unwrap();
        let b = p
            .raise(
                1,
                None,
                None,
                5,
                SourceId::Virtual,
                2,
                t0 + Duration::from_secs(4),
            )
            .unwrap();
        // Nothing due yet: the next deadline is the older group's.
        assert_eq!(p.expire(t0 + Duration::from_secs(9)), Some(t0 + t));
        assert!(responses(&mut p).is_empty());
        // The first is due: INVALID to its source, counted; then the next.
        assert_eq!(p.expire(t0 + t), Some(t0 + Duration::from_secs(14)));
        assert_eq!(
            responses(&mut p),
            vec![Response {
                source: SourceId::Kernel,
                cookie: 1,
                code: CODE_INVALID,
                by_driver: false,
            }]
        );
        assert_eq!(p.pop_purged(), Some(key(1, None, a)));
        // A late answer finds no group; the other is answered in time.
        p.mark_delivered(&key(1, None, a));
        p.mark_delivered(&key(1, None, b));
        assert!(p.driver_response(1, None, a, CODE_SUCCESS).is_err());
        assert!(p.driver_response(1, None, b, CODE_SUCCESS).is_ok());
        assert_eq!(p.expire(t0 + Duration::from_secs(60)), None);
        assert_eq!(p.counters.timed_out, 1);
        assert_eq!(p.check_invariants(), Ok(()));
        // Without a timeout nothing ever expires.
        let mut p = PageRequests::new(8);
        p.raise(1, None, None, 5, SourceId::Kernel, 1, t0).unwrap();
        assert_eq!(p.expire(t0 + Duration::from_secs(1 << 20)), None);
        assert_eq!(p.outstanding(), 1);
        p.withdraw_all();
        assert_eq!((p.outstanding(), p.counters.withdrawn), (0, 1));
        assert_eq!(p.check_invariants(), Ok(()));
    }
}
