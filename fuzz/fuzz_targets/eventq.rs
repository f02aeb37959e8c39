// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The eventq: fault records pushed with `backend.relay.send`, eventq
//! buffers posted by a well-behaved driver model, and the eventq worker's
//! `handle_event(.., 1)`, in any order, checked against a model FIFO.
//!
//! Input: queue size (1 << (b % 5)), FIFO bound (1 + b % 16), flags (bit 0
//! EVENT_IDX), then operations, one kind byte each (`b % 6`):
//! 0 send a record (reason, flags, endpoint bytes; the address is a
//! sequence number, so every record is unique); 1 post a buffer (size byte
//! `% 65`, shape byte, see `Shape`); 2 the eventq kick; 3 the records-pending
//! wakeup; 4 device reset; 5 toggle the vring's enabled flag.
//!
//! Checked: no panic, `handle_event` never fails; buffers are used in
//! posting order; a usable buffer (all in memory, >= 24 writable bytes) gets
//! exactly the next record in send order, with used length 24 and nothing
//! written past it; any other buffer (too small, outside memory, readable)
//! gets used length 0 and the record waits; a buffer is used only when a
//! record waits; nothing waits while a usable buffer is posted; `send`
//! refuses exactly when the bound is hit; the counters match the model and
//! delivered + queued + lost + discarded == sent.
#![no_main]

use std::collections::VecDeque;
use std::num::Wrapping;

use iommu_fuzz::{small_limits, Input, ENDPOINTS};
use libfuzzer_sys::fuzz_target;
use vhost_device_iommu::device::backend::{IommuBackend, EVENTS_PENDING};
use vhost_device_iommu::device::config::DeviceConfig;
use vhost_device_iommu::fault_queue::{
    EventCounters, EventRecord, FAULT_RECORD_LEN, MAX_RECORD_LEN,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const MEM_SIZE: u64 = 0x1_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const SLOTS: u64 = 0x4000;
const FILL: u8 = 0xee;
const MAX_OPS: usize = 256;

fn slot(idx: u16) -> u64 {
    SLOTS + u64::from(idx) * 0x100
}

/// How a posted buffer is laid out.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// One writable descriptor in memory.
    Plain,
    /// One writable descriptor entirely outside guest memory.
    Outside,
    /// One writable descriptor that runs past the end of guest memory.
    Straddle,
    /// One device-readable descriptor (nothing writable).
    Readable,
    /// Two writable descriptors splitting the size.
    Split,
    /// An 8-byte readable descriptor, then the writable one.
    ReadThenWrite,
}

struct Posted {
    head: u16,
    descs: Vec<u16>,
    /// Writable regions in chain order, all in memory when `usable`.
    writes: Vec<(u64, u32)>,
    usable: bool,
    shape: Shape,
    size: u32,
}

struct Driver {
    qsize: u16,
    free: Vec<u16>,
    avail_idx: Wrapping<u16>,
    posted: VecDeque<Posted>,
}

impl Driver {
    fn desc(mem: &GuestMemoryMmap, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = DESC + 16 * u64::from(idx);
        mem.write_obj(addr, GuestAddress(a)).unwrap();
        mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        mem.write_obj(next, GuestAddress(a + 14)).unwrap();
    }

    fn post(&mut self, mem: &GuestMemoryMmap, size: u32, shape: Shape) {
        let need = if matches!(shape, Shape::Split | Shape::ReadThenWrite) {
            2
        } else {
            1
        };
        if self.free.len() < need {
            return;
        }
        let descs: Vec<u16> = (0..need).map(|_| self.free.pop().unwrap()).collect();
        let head = descs[0];
        let w = VRING_DESC_F_WRITE as u16;
        let n = VRING_DESC_F_NEXT as u16;
        let mut writes = Vec::new();
        let usable;
        match shape {
            Shape::Plain => {
                Self::desc(mem, head, slot(head), size, w, 0);
                writes.push((slot(head), size));
                usable = size as usize >= FAULT_RECORD_LEN;
            }
            Shape::Outside => {
                Self::desc(mem, head, 0x2_0000 + slot(head), size, w, 0);
                usable = false;
            }
            Shape::Straddle => {
                Self::desc(mem, head, MEM_SIZE - 8, size, w, 0);
                // Fits only when it is too small for a record anyway.
                usable = false;
            }
            Shape::Readable => {
                Self::desc(mem, head, slot(head), size, 0, 0);
                usable = false;
            }
            Shape::Split => {
                let (a, b) = (size / 2, size - size / 2);
                Self::desc(mem, head, slot(head), a, w | n, descs[1]);
                Self::desc(mem, descs[1], slot(descs[1]), b, w, 0);
                writes.push((slot(head), a));
                writes.push((slot(descs[1]), b));
                usable = size as usize >= FAULT_RECORD_LEN;
            }
            Shape::ReadThenWrite => {
                Self::desc(mem, head, slot(head), 8, n, descs[1]);
                Self::desc(mem, descs[1], slot(descs[1]), size, w, 0);
                writes.push((slot(descs[1]), size));
                usable = size as usize >= FAULT_RECORD_LEN;
            }
        }
        for &(addr, len) in &writes {
            mem.write_slice(&vec![FILL; len as usize], GuestAddress(addr))
                .unwrap();
        }
        let ring_slot = u64::from(self.avail_idx.0 % self.qsize);
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * ring_slot))
            .unwrap();
        self.avail_idx += Wrapping(1);
        mem.write_obj(self.avail_idx.0, GuestAddress(AVAIL + 2))
            .unwrap();
        self.posted.push_back(Posted {
            head,
            descs,
            writes,
            usable,
            shape,
            size,
        });
    }
}

struct Model {
    queued: VecDeque<EventRecord>,
    counters: EventCounters,
    sent: u64,
    capacity: usize,
}

fn check_counters(backend: &IommuBackend, m: &Model) {
    let fifo = backend.relay.fifo();
    assert_eq!(fifo.counters, m.counters, "event counters");
    assert_eq!(fifo.len(), m.queued.len(), "records queued");
    let c = fifo.counters;
    assert_eq!(
        c.delivered + c.lost + c.discarded + fifo.len() as u64,
        m.sent,
        "records sent"
    );
}

fn process(
    backend: &IommuBackend,
    evq: &VringRwLock,
    mem: &GuestMemoryMmap,
    d: &mut Driver,
    m: &mut Model,
    event: u16,
    enabled: bool,
) {
    let before = evq.get_ref().get_queue().next_used();
    backend
        .handle_event(event, EventSet::IN, std::slice::from_ref(evq), 1)
        .expect("eventq handle_event failed (the worker would stop)");
    let after = evq.get_ref().get_queue().next_used();
    let mut i = Wrapping(before);
    while i.0 != after {
        assert!(enabled, "a disabled eventq was used");
        let e = USED + 4 + 8 * u64::from(i.0 % d.qsize);
        let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
        let p = d
            .posted
            .pop_front()
            .expect("used entry for a buffer never posted");
        assert_eq!(id, u32::from(p.head), "buffers used out of posting order");
        let rec = m.queued.front().copied();
        assert!(
            rec.is_some(),
            "buffer (head {}) used with no record waiting",
            p.head
        );
        if p.usable {
            assert_eq!(
                len as usize, FAULT_RECORD_LEN,
                "usable {:?} buffer of {} bytes",
                p.shape, p.size
            );
            let mut got = Vec::new();
            for &(addr, l) in &p.writes {
                let mut b = vec![0u8; l as usize];
                mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                got.extend_from_slice(&b);
            }
            let mut want = [0u8; MAX_RECORD_LEN];
            let n = rec.unwrap().encode(&mut want);
            assert_eq!(
                &got[..n],
                &want[..n],
                "record delivered out of order or corrupted"
            );
            assert!(
                got[n..].iter().all(|&b| b == FILL),
                "bytes written past the record"
            );
            m.queued.pop_front();
            m.counters.delivered += 1;
        } else {
            assert_eq!(
                len, 0,
                "unusable {:?} buffer of {} bytes got used length {len}",
                p.shape, p.size
            );
            for &(addr, l) in &p.writes {
                let mut b = vec![0u8; l as usize];
                mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                assert!(b.iter().all(|&x| x == FILL), "unusable buffer written");
            }
        }
        d.free.extend_from_slice(&p.descs);
        i += Wrapping(1);
    }
    if enabled && !m.queued.is_empty() {
        assert!(
            d.posted.is_empty(),
            "{} records wait while {} buffers are posted",
            m.queued.len(),
            d.posted.len()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let qsize = 1u16 << (input.u8() % 5);
    let capacity = 1 + usize::from(input.u8() % 16);
    let event_idx = input.u8() & 1 != 0;

    let guest = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let mem = GuestMemoryAtomic::new(guest);
    let backend = IommuBackend::new(
        DeviceConfig::default(),
        small_limits(capacity),
        &ENDPOINTS,
        mem.clone(),
    )
    .unwrap();
    let evq = VringRwLock::new(mem.clone(), 256).unwrap();
    evq.set_queue_size(qsize);
    evq.set_queue_info(DESC, AVAIL, USED).unwrap();
    evq.set_queue_event_idx(event_idx);
    backend.set_event_idx(event_idx);
    evq.set_queue_ready(true);
    evq.set_enabled(true);
    let mut enabled = true;

    let mut d = Driver {
        qsize,
        free: (0..qsize).rev().collect(),
        avail_idx: Wrapping(0),
        posted: VecDeque::new(),
    };
    let mut m = Model {
        queued: VecDeque::new(),
        counters: EventCounters::default(),
        sent: 0,
        capacity,
    };
    let mut seq = 0u64;
    let g = mem.memory();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 6 {
            0 => {
                seq += 1;
                let rec = EventRecord::Fault {
                    reason: input.u8(),
                    flags: u32::from(input.u8()),
                    endpoint: u32::from(input.u8()),
                    address: seq,
                    pasid: None,
                };
                let want = m.queued.len() < m.capacity;
                let got = backend.relay.send(rec);
                assert_eq!(
                    got,
                    want,
                    "send with {} of {} queued",
                    m.queued.len(),
                    m.capacity
                );
                m.sent += 1;
                if got {
                    m.queued.push_back(rec);
                } else {
                    m.counters.lost += 1;
                }
            }
            1 => {
                let size = u32::from(input.u8() % 65);
                let shape = match input.u8() % 6 {
                    0 => Shape::Plain,
                    1 => Shape::Outside,
                    2 => Shape::Straddle,
                    3 => Shape::Readable,
                    4 => Shape::Split,
                    _ => Shape::ReadThenWrite,
                };
                d.post(&g, size, shape);
            }
            2 => process(&backend, &evq, &g, &mut d, &mut m, 0, enabled),
            3 => process(
                &backend,
                &evq,
                &g,
                &mut d,
                &mut m,
                EVENTS_PENDING as u16,
                enabled,
            ),
            4 => {
                backend.reset_device();
                m.counters.discarded += m.queued.len() as u64;
                m.queued.clear();
            }
            _ => {
                enabled = !enabled;
                evq.set_enabled(enabled);
            }
        }
        check_counters(&backend, &m);
    }
    // Finally the driver's kick: whatever can be delivered is.
    process(&backend, &evq, &g, &mut d, &mut m, 0, enabled);
    check_counters(&backend, &m);
});
