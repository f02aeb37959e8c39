// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The whole request path through the public vhost-user-backend API, the
//! way cloud-hypervisor fuzzes its virtio-iommu: guest memory filled with
//! fuzz bytes, rings wherever the input says, `handle_event` on the requestq
//! worker interleaved with the eventq worker and fault records.
//!
//! Input layout (all integers little-endian; a short input reads zeros):
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 1 | region A at GPA 0: 64 KiB * (1 + b % 16) |
//! | 1 | 1 | 0: no region B; else region B (64 KiB) after a hole of ((b-1) % 16) * 4 KiB |
//! | 2 | 8 | features passed to `acked_features` |
//! | 10 | 1 | requestq size: b < 0x80: 1 << (b % 9); else b itself (mostly invalid: stays 256) |
//! | 11 | 1 | bit 0 requestq EVENT_IDX, bit 1 eventq EVENT_IDX, bit 2 eventq not ready |
//! | 12 | 24 | requestq desc table, avail ring, used ring addresses (see `place`) |
//! | 36 | 1 | eventq size, as at 10 |
//! | 37 | 24 | eventq desc table, avail ring, used ring addresses |
//! | 61 | 1 | device config bits (`config_from`) |
//! | 62 | 2 | requestq start index (next_avail = next_used), as after SET_VRING_BASE |
//! | 64 | 1 | number of operations n (at most 16) |
//! | 65 | 16 n | operations: kind byte, 15 operand bytes (see `op`) |
//! | .. | .. | memory image: region A from GPA 0, then region B |
//!
//! Checked after every operation: no panic, `check_invariants`, the event
//! counters add up, and, for the requestq, every new used entry names the
//! chain popped at that position and its length is 0 or 4..=516 and within
//! that chain's writable part (exactly predicted from the rings whenever the
//! device's own writes cannot change the rings it reads; otherwise only the
//! state invariants are checked). Hangs are caught by libFuzzer's -timeout.
#![no_main]

use iommu_fuzz::{
    avail_ring_len, config_from, desc_table_len, predict, small_limits, used_entries,
    used_ring_len, Input, ENDPOINTS,
};
use libfuzzer_sys::fuzz_target;
use vhost_device_iommu::device::backend::{IommuBackend, EVENTS_PENDING};
use vhost_device_iommu::device::dispatch::MAX_REPLY;
use vhost_device_iommu::fault_queue::EventRecord;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap,
    Permissions,
};
use vmm_sys_util::epoll::EventSet;

const MAX_OPS: usize = 16;

/// IOMMU_FUZZ_VERBOSE=1: trace each requestq call (to check seeds by eye).
fn verbose() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var_os("IOMMU_FUZZ_VERBOSE").is_some())
}
const OP_LEN: usize = 16;

fn queue_size(b: u8) -> u16 {
    if b < 0x80 {
        1 << (b % 9)
    } else {
        u16::from(b)
    }
}

/// The rings lie wholly in guest memory, as every frontend guarantees: QEMU
/// maps each ring's full length before it sends SET_VRING_ADDR, and the
/// library refuses an address it cannot translate. An address the input
/// puts (partly) outside memory or misaligned is folded into region A.
fn place(mem: &GuestMemoryMmap, a_size: usize, addr: u64, len: u64, align: u64) -> u64 {
    let aligned = addr & !(align - 1) == addr;
    if aligned && mem.check_range(GuestAddress(addr), len as usize, Permissions::Write) {
        return addr;
    }
    (addr % (a_size as u64 - len + 1)) & !(align - 1)
}

fn make_vring(
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    a_size: usize,
    size: u16,
    addrs: [u64; 3],
    event_idx: bool,
    ready: bool,
) -> VringRwLock {
    let vring = VringRwLock::new(mem.clone(), 256).expect("vring");
    // An invalid size is refused and the queue keeps its maximum, 256.
    vring.set_queue_size(size);
    let size = vring.get_ref().get_queue().size();
    let g = mem.memory();
    let desc = place(&g, a_size, addrs[0], desc_table_len(size), 16);
    let avail = place(&g, a_size, addrs[1], avail_ring_len(size), 2);
    let used = place(&g, a_size, addrs[2], used_ring_len(size), 4);
    vring
        .set_queue_info(desc, avail, used)
        .expect("aligned ring addresses");
    vring.set_queue_event_idx(event_idx);
    vring.set_queue_ready(ready);
    vring.set_enabled(true);
    vring
}

/// `handle_event` must never fail on guest input: the library's epoll
/// worker stops for good when it does, so the guest could kill its queue.
fn worker_result(r: std::io::Result<()>, what: &str) -> bool {
    if let Err(e) = r {
        panic!("{what} handle_event failed, the worker would stop: {e:?}");
    }
    true
}

struct Sent(u64);

fn check_counters(backend: &IommuBackend, sent: &Sent) {
    let fifo = backend.relay.fifo();
    let c = fifo.counters;
    let total = c.delivered + c.lost + c.discarded + fifo.len() as u64;
    assert_eq!(
        total,
        sent.0,
        "event counters {c:?} + {} queued != {} sent",
        fifo.len(),
        sent.0
    );
}

fn check_state(backend: &IommuBackend, what: &str) {
    if let Err(e) = backend.session().iommu.check_invariants() {
        panic!("invariant broken after {what}: {e}");
    }
}

/// One requestq notification, with the used ring checked against a
/// prediction made on the rings as they are before the call.
fn requestq(
    backend: &IommuBackend,
    vring: &VringRwLock,
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    device_event: u16,
) {
    let (size, desc, avail, used, next_avail, next_used, event_idx) = {
        let g = vring.get_ref();
        let q = g.get_queue();
        (
            q.size(),
            q.desc_table(),
            q.avail_ring(),
            q.used_ring(),
            q.next_avail(),
            q.next_used(),
            q.event_idx_enabled(),
        )
    };
    let m = mem.memory();
    let prediction = predict(&m, size, desc, avail, used, next_avail, event_idx);
    let ok = worker_result(
        backend.handle_event(device_event, EventSet::IN, std::slice::from_ref(vring), 0),
        "requestq",
    );
    let after = vring.get_ref().get_queue().next_used();
    if verbose() {
        eprintln!(
            "requestq: predicted {:?} (exact {}), used {:?}, stats {}",
            prediction.chains,
            prediction.exact(),
            used_entries(&m, used, size, next_used, after),
            backend.session().stats.to_json()
        );
    }
    if device_event != 0 {
        assert_eq!(
            after, next_used,
            "event {device_event} is not the requestq kick"
        );
        return;
    }
    if !ok || !prediction.exact() {
        return;
    }
    let entries = used_entries(&m, used, size, next_used, after);
    assert_eq!(
        entries.len(),
        prediction.chains.len(),
        "used {} chains, {} were available (heads {:?})",
        entries.len(),
        prediction.chains.len(),
        prediction.chains
    );
    for (i, (&(id, len), &(head, writable))) in entries.iter().zip(&prediction.chains).enumerate() {
        assert_eq!(id, u32::from(head), "used entry {i} names the wrong chain");
        assert!(
            u64::from(len) <= writable,
            "used entry {i} (head {head}): length {len} > writable part {writable}"
        );
        assert!(
            len == 0 || (4..=MAX_REPLY as u32).contains(&len),
            "used entry {i} (head {head}): length {len}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let a_size = 0x1_0000usize * (1 + usize::from(input.u8() % 16));
    let hole = input.u8();
    let acked = input.u64();
    let req_size = queue_size(input.u8());
    let flags = input.u8();
    let req_addrs = [input.u64(), input.u64(), input.u64()];
    let evq_size = queue_size(input.u8());
    let evq_addrs = [input.u64(), input.u64(), input.u64()];
    let config = config_from(input.u8());
    let base = input.u16();
    let nops = usize::from(input.u8()).min(MAX_OPS);
    let ops = input.bytes(nops * OP_LEN);
    let image = input.rest();

    let mut ranges = vec![(GuestAddress(0), a_size)];
    if hole != 0 {
        let start = a_size as u64 + u64::from((hole - 1) % 16) * 0x1000;
        ranges.push((GuestAddress(start), 0x1_0000));
    }
    let guest = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    let (img_a, img_b) = image.split_at(image.len().min(a_size));
    guest.write_slice(img_a, GuestAddress(0)).expect("image A");
    if let Some(&(b_start, _)) = ranges.get(1) {
        let n = img_b.len().min(0x1_0000);
        guest.write_slice(&img_b[..n], b_start).expect("image B");
    }
    let mem = GuestMemoryAtomic::new(guest);

    let backend =
        IommuBackend::new(config, small_limits(8), &ENDPOINTS, mem.clone()).expect("backend");
    backend.acked_features(acked);
    backend.set_event_idx(flags & 1 != 0);
    let reqq = make_vring(&mem, a_size, req_size, req_addrs, flags & 1 != 0, true);
    reqq.set_queue_next_avail(base);
    reqq.set_queue_next_used(base);
    let evq = make_vring(
        &mem,
        a_size,
        evq_size,
        evq_addrs,
        flags & 2 != 0,
        flags & 4 == 0,
    );
    let mut sent = Sent(0);

    // No operations: one requestq notification, the common case.
    let default_op = [0u8; OP_LEN];
    let ops: Vec<&[u8]> = if nops == 0 {
        vec![&default_op[..]]
    } else {
        ops.chunks(OP_LEN).collect()
    };
    for op in ops {
        let mut o = Input::new(op);
        let kind = o.u8() % 8;
        match kind {
            0 => requestq(&backend, &reqq, &mem, 0),
            1 => {
                let ev = if o.u8() & 1 != 0 {
                    EVENTS_PENDING as u16
                } else {
                    0
                };
                worker_result(
                    backend.handle_event(ev, EventSet::IN, std::slice::from_ref(&evq), 1),
                    "eventq",
                );
            }
            2 => {
                let rec = EventRecord::Fault {
                    reason: o.u8(),
                    flags: u32::from(o.u16()),
                    endpoint: o.u32(),
                    address: o.u64(),
                    pasid: None,
                };
                backend.relay.send(rec);
                sent.0 += 1;
            }
            3 => {
                // The driver writes more: a new chain, a bumped avail index.
                let gpa = u64::from(o.u32());
                let n = usize::from(o.u8() % 11);
                let bytes = o.bytes(n);
                let _ = mem.memory().write_slice(bytes, GuestAddress(gpa));
            }
            4 => backend.acked_features(o.u64()),
            5 => backend.reset_device(),
            6 => {
                let _ = backend.set_config(36, &[o.u8() & 3]);
                let (off, len) = (u32::from(o.u8()), u32::from(o.u8()));
                let got = backend.get_config(off, len);
                assert!(got.is_empty() || got.len() == len as usize);
            }
            _ => {
                // A wakeup for some other event on the requestq worker.
                let ev = o.u16() | 1;
                requestq(&backend, &reqq, &mem, ev);
            }
        }
        check_state(&backend, &format!("op {kind} {op:02x?}"));
        check_counters(&backend, &sent);
    }
});
