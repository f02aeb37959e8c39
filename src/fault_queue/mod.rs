// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Event records waiting for eventq buffers: a bounded FIFO, allocated once,
//! and the counters that prove nothing is dropped silently; page requests
//! and their exactly-once completion (`pages`), and the sources that
//! deliver them (`source`).

pub mod pages;
pub(crate) mod relay;
pub(crate) mod source;
pub(crate) mod timer;
pub mod uring;
pub(crate) mod vevents;

use std::collections::VecDeque;

use log::Level;

use vm_memory::ByteValued;

use crate::log_limit::limited;
use crate::wire::{
    FaultEvent, PageRequestEvent, FLAG_ADDRESS, FLAG_GROUP_ID, FLAG_LAST, FLAG_PAGE_REQ, FLAG_PASID,
};
pub use crate::wire::{FAULT_RECORD_LEN, MAX_RECORD_LEN};

/// One record for the eventq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventRecord {
    /// Unrecoverable fault (ratified 24-byte record).
    Fault {
        reason: u8,
        flags: u32,
        endpoint: u32,
        address: u64,
        /// The PASID the access carried (sets FLAG_PASID).
        pasid: Option<u32>,
    },
    /// One record of a page-request group (extension, 48 bytes).
    PageRequest {
        endpoint: u32,
        pasid: Option<u32>,
        group: u16,
        address: u64,
        /// FLAG_READ | FLAG_WRITE | FLAG_EXEC | FLAG_PRIV of the access.
        access: u32,
        /// The group's last record.
        last: bool,
    },
}

impl EventRecord {
    /// Encode into `out`; returns the record's length.
    pub fn encode(&self, out: &mut [u8; MAX_RECORD_LEN]) -> usize {
        match *self {
            EventRecord::Fault {
                reason,
                flags,
                endpoint,
                address,
                pasid,
            } => {
                let flags = if pasid.is_some() {
                    flags | FLAG_PASID
                } else {
                    flags
                };
                let rec = FaultEvent {
                    reason,
                    reserved: [0; 3],
                    flags: flags.into(),
                    endpoint: endpoint.into(),
                    pasid: pasid.unwrap_or(0).into(),
                    address: address.into(),
                };
                copy_record(&rec, out)
            }
            EventRecord::PageRequest {
                endpoint,
                pasid,
                group,
                address,
                access,
                last,
            } => {
                let mut flags = access | FLAG_PAGE_REQ | FLAG_GROUP_ID | FLAG_ADDRESS;
                if last {
                    flags |= FLAG_LAST;
                }
                if pasid.is_some() {
                    flags |= FLAG_PASID;
                }
                let rec = PageRequestEvent {
                    reason: 0,
                    reserved: [0; 3],
                    flags: flags.into(),
                    endpoint: endpoint.into(),
                    pasid: pasid.unwrap_or(0).into(),
                    address: address.into(),
                    group_id: group.into(),
                    reserved2: [0; 6],
                    private_data: [0u64.into(); 2],
                };
                copy_record(&rec, out)
            }
        }
    }

    /// The page-request group this record belongs to.
    pub fn group(&self) -> Option<pages::GroupKey> {
        match *self {
            EventRecord::PageRequest {
                endpoint,
                pasid,
                group,
                ..
            } => Some(pages::GroupKey {
                endpoint,
                pasid,
                group,
            }),
            EventRecord::Fault { .. } => None,
        }
    }
}

/// Copy a record to the start of `out`; its length.
fn copy_record<T: ByteValued>(rec: &T, out: &mut [u8; MAX_RECORD_LEN]) -> usize {
    let b = rec.as_slice();
    out[..b.len()].copy_from_slice(b);
    b.len()
}

/// Counters of the event path, reported by `stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EventCounters {
    /// Records written to the eventq.
    pub delivered: u64,
    /// Records refused because the FIFO was full.
    pub lost: u64,
    /// Records discarded because their guest went away.
    pub discarded: u64,
}

/// Records in posting order, waiting for the driver's buffers.
#[derive(Debug)]
pub struct EventFifo {
    queue: VecDeque<EventRecord>,
    capacity: usize,
    pub counters: EventCounters,
}

impl EventFifo {
    pub fn new(capacity: usize) -> Self {
        EventFifo {
            queue: VecDeque::with_capacity(capacity),
            capacity,
            counters: EventCounters::default(),
        }
    }

    /// Queue a record; when the bound is hit the record is counted as lost
    /// and logged (rate-limited: a guest can make records while it posts no
    /// buffer), and false is returned.
    pub(crate) fn push(&mut self, rec: EventRecord) -> bool {
        if self.queue.len() >= self.capacity {
            self.counters.lost += 1;
            limited!(
                Level::Warn,
                "event queue full ({} records): lost {rec:?} (lost so far: {})",
                self.capacity,
                self.counters.lost
            );
            return false;
        }
        self.queue.push_back(rec);
        true
    }

    pub fn front(&self) -> Option<&EventRecord> {
        self.queue.front()
    }

    /// The front record was written to a buffer.
    pub fn delivered(&mut self) {
        if self.queue.pop_front().is_some() {
            self.counters.delivered += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Room for `n` more records?
    pub(crate) fn has_room(&self, n: usize) -> bool {
        self.queue.len() + n <= self.capacity
    }

    /// Drop the queued records of page-request group `key`: it was
    /// completed before the driver saw all of it. Ids are unique per
    /// (endpoint, PASID), so the PASID is part of the key.
    pub fn remove_group(&mut self, key: &pages::GroupKey) -> usize {
        let before = self.queue.len();
        self.queue.retain(|r| r.group().as_ref() != Some(key));
        before - self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The guest went away: its records go with it, counted.
    pub(crate) fn discard_all(&mut self) -> usize {
        let n = self.queue.len();
        if n > 0 {
            limited!(
                Level::Warn,
                "discarding {n} undelivered event records of a departed guest"
            );
        }
        self.counters.discarded += n as u64;
        self.queue.clear();
        n
    }
}

/// Records of groups completed before the driver saw all of them leave
/// the FIFO with their group, so the driver never receives a request it
/// cannot answer.
pub fn purge_completed(pages: &mut pages::PageRequests, fifo: &mut EventFifo) {
    while let Some(key) = pages.pop_purged() {
        fifo.remove_group(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FLAG_READ, FLAG_WRITE, REASON_MAPPING};

    fn fault(addr: u64) -> EventRecord {
        EventRecord::Fault {
            reason: REASON_MAPPING,
            flags: FLAG_READ | FLAG_ADDRESS,
            endpoint: 7,
            address: addr,
            pasid: None,
        }
    }

    #[test]
    fn fault_record_layout() {
        let mut out = [0xffu8; MAX_RECORD_LEN];
        assert_eq!(fault(0x1122_3344_5566_7788).encode(&mut out), 24);
        assert_eq!(out[0], 2);
        assert_eq!(&out[1..4], &[0, 0, 0]);
        assert_eq!(u32::from_le_bytes(out[4..8].try_into().unwrap()), 0x101);
        assert_eq!(u32::from_le_bytes(out[8..12].try_into().unwrap()), 7);
        assert_eq!(&out[12..16], &[0, 0, 0, 0]);
        assert_eq!(
            u64::from_le_bytes(out[16..24].try_into().unwrap()),
            0x1122_3344_5566_7788
        );
    }

    #[test]
    fn page_request_record_layout() {
        let r = EventRecord::PageRequest {
            endpoint: 9,
            pasid: Some(5),
            group: 0x1234,
            address: 0xabc000,
            access: FLAG_READ | FLAG_WRITE,
            last: true,
        };
        let mut out = [0xffu8; MAX_RECORD_LEN];
        assert_eq!(r.encode(&mut out), 48);
        assert_eq!(out[0], 0);
        let flags = u32::from_le_bytes(out[4..8].try_into().unwrap());
        assert_eq!(
            flags,
            FLAG_READ
                | FLAG_WRITE
                | FLAG_LAST
                | FLAG_PAGE_REQ
                | FLAG_ADDRESS
                | FLAG_PASID
                | FLAG_GROUP_ID
        );
        assert_eq!(u32::from_le_bytes(out[8..12].try_into().unwrap()), 9);
        assert_eq!(u32::from_le_bytes(out[12..16].try_into().unwrap()), 5);
        assert_eq!(
            u64::from_le_bytes(out[16..24].try_into().unwrap()),
            0xabc000
        );
        assert_eq!(u16::from_le_bytes([out[24], out[25]]), 0x1234);
        assert!(out[26..48].iter().all(|&b| b == 0));
        let mut f = EventFifo::new(4);
        f.push(fault(1));
        f.push(r);
        f.push(fault(2));
        assert_eq!(
            f.remove_group(&pages::GroupKey {
                endpoint: 9,
                pasid: Some(5),
                group: 0x1234
            }),
            1
        );
        assert_eq!(f.len(), 2);
        assert!(f.has_room(2) && !f.has_room(3));
    }

    #[test]
    fn fifo_keeps_order_bounds_and_counts() {
        let mut f = EventFifo::new(2);
        assert!(f.push(fault(1)));
        assert!(f.push(fault(2)));
        assert!(!f.push(fault(3)));
        assert_eq!(f.counters.lost, 1);
        assert_eq!(f.front(), Some(&fault(1)));
        f.delivered();
        assert_eq!(f.front(), Some(&fault(2)));
        assert_eq!(f.discard_all(), 1);
        assert_eq!(
            f.counters,
            EventCounters {
                delivered: 1,
                lost: 1,
                discarded: 1
            }
        );
        assert!(f.is_empty());
    }

    #[test]
    fn fifo_never_grows_past_its_bound() {
        let mut f = EventFifo::new(8);
        let cap = f.queue.capacity();
        for i in 0..10_000 {
            f.push(fault(i));
        }
        assert_eq!(f.len(), 8);
        assert_eq!(f.queue.capacity(), cap);
        assert_eq!(f.counters.lost, 10_000 - 8);
    }

    /// Group ids are unique among all outstanding groups (the slab's): an
    /// endpoint's other PASID never gets an outstanding group's id, across
    /// every wrap of the 16-bit ids, and completing its groups leaves the
    /// outstanding one's record queued.
    #[test]
    fn other_pasids_groups_never_take_an_outstanding_id_and_purge_only_their_own() {
        use pages::{PageRequests, SourceId, CODE_FAILURE};
        let mut p = PageRequests::new(8);
        let mut fifo = EventFifo::new(8);
        let record = |pasid, group| EventRecord::PageRequest {
            endpoint: 1,
            pasid: Some(pasid),
            group,
            address: 0x1000,
            access: FLAG_READ,
            last: true,
        };
        let a = p
            .raise(
                1,
                Some(10),
                None,
                5,
                SourceId::Virtual,
                0,
                std::time::Instant::now(),
            )
            .unwrap();
        fifo.push(record(10, a));
        // PASID 20's groups come and go, twice round the 16-bit ids.
        for cookie in 1..=2 * 65_536 {
            let b = p
                .raise(
                    1,
                    Some(20),
                    None,
                    5,
                    SourceId::Virtual,
                    cookie,
                    std::time::Instant::now(),
                )
                .unwrap();
            assert_ne!(b, a, "an outstanding group's id given again");
            fifo.push(record(20, b));
            assert!(p.complete_cookie(SourceId::Virtual, cookie, CODE_FAILURE));
            purge_completed(&mut p, &mut fifo);
            assert_eq!(fifo.len(), 1, "PASID 10's group lost its record");
        }
        assert_eq!(fifo.front(), Some(&record(10, a)));
        let key = pages::GroupKey {
            endpoint: 1,
            pasid: Some(10),
            group: a,
        };
        assert!(p.group(&key).is_some());
    }
}
