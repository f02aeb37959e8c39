// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests of the test harness itself, against rust-vmm's device-side
//! implementations running in this process:
//! - the split-queue driver against `virtio_queue::Queue` over the same memfd;
//! - the vhost-user frontend against a `vhost_user_backend` echo daemon.
// Test code with known small values (sizes, counts, timings): these casts
// cannot truncate or wrap.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::EventFd;

use support::control::{dma_ranges, error_kind, ControlClient};
use support::mem::GuestMem;
use support::process::{fresh_temp_dir, proc_fd_count, proc_rss_kib};
use support::virtq::{
    vring_need_event, write_raw_table, BatchReplies, QueueOptions, RawDesc, SplitQueue, Token,
    VRING_USED_F_NO_NOTIFY,
};
use support::wire::{self, *};
use support::{Error, Frontend, FrontendOptions};

const T: Duration = Duration::from_secs(5);

/// The reply both in-process devices write: byte j of the writable part is
/// `(sum of readable bytes + j) ^ 0x5a`.
fn expected_reply(readable: &[u8], wlen: usize) -> Vec<u8> {
    let sum = readable.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    (0..wlen)
        .map(|j| sum.wrapping_add(j as u8) ^ 0x5a)
        .collect()
}

/// What the device saw of one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    head: u16,
    readable: Vec<u8>,
    readable_lens: Vec<u32>,
    writable_lens: Vec<u32>,
}

fn guest_memory_mmap(mem: &GuestMem) -> GuestMemoryMmap<()> {
    GuestMemoryMmap::<()>::from_ranges_with_files(mem.regions().iter().map(|r| {
        (
            GuestAddress(r.gpa),
            r.size as usize,
            Some(FileOffset::new(
                mem.file().try_clone().expect("dup memfd"),
                r.file_offset,
            )),
        )
    }))
    .expect("GuestMemoryMmap over the harness memfd")
}

/// Serve one chain: read readable bytes, write the expected reply into the
/// writable buffers, report what was seen. Returns (head, used_len).
fn serve_chain<M>(
    chain: virtio_queue::DescriptorChain<M>,
    gm: &GuestMemoryMmap<()>,
    obs: Option<&Sender<Observed>>,
) -> (u16, u32)
where
    M: std::ops::Deref<Target = GuestMemoryMmap<()>>,
{
    let head = chain.head_index();
    let mut o = Observed {
        head,
        readable: Vec::new(),
        readable_lens: Vec::new(),
        writable_lens: Vec::new(),
    };
    let mut wbufs = Vec::new();
    for d in chain {
        if d.is_write_only() {
            o.writable_lens.push(d.len());
            wbufs.push((d.addr(), d.len()));
        } else {
            let mut b = vec![0u8; d.len() as usize];
            gm.read_slice(&mut b, d.addr())
                .expect("readable buffer in RAM");
            o.readable.extend_from_slice(&b);
            o.readable_lens.push(d.len());
        }
    }
    let total: u32 = wbufs.iter().map(|w| w.1).sum();
    let reply = expected_reply(&o.readable, total as usize);
    let mut off = 0usize;
    for (addr, len) in wbufs {
        gm.write_slice(&reply[off..off + len as usize], addr)
            .expect("writable buffer in RAM");
        off += len as usize;
    }
    if let Some(tx) = obs {
        let _ = tx.send(o);
    }
    (head, total)
}

/// A device thread driving a `virtio_queue::Queue` over the driver's rings.
struct InProcDevice {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    obs: Receiver<Observed>,
}

impl InProcDevice {
    /// `reverse`: complete each batch of popped chains in reverse order.
    fn start(mem: &GuestMem, q: &SplitQueue, reverse: bool) -> Self {
        let gm = guest_memory_mmap(mem);
        let l = q.layout();
        let mut queue = Queue::new(q.size()).expect("queue");
        queue.set_size(q.size());
        queue.set_desc_table_address(Some(l.desc as u32), Some((l.desc >> 32) as u32));
        queue.set_avail_ring_address(Some(l.avail as u32), Some((l.avail >> 32) as u32));
        queue.set_used_ring_address(Some(l.used as u32), Some((l.used >> 32) as u32));
        queue.set_event_idx(q.event_idx());
        queue.set_ready(true);
        assert!(queue.is_valid(&gm), "device-side queue rejects the layout");
        let kick = q.kick_fd().try_clone().expect("kick fd");
        let call = q.call_fd().try_clone().expect("call fd");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, obs) = channel();
        let stop2 = stop.clone();
        let handle =
            std::thread::spawn(move || device_loop(gm, queue, kick, call, stop2, tx, reverse));
        InProcDevice {
            stop,
            handle: Some(handle),
            obs,
        }
    }

    fn observed(&self) -> Observed {
        self.obs.recv_timeout(T).expect("device observation")
    }
}

impl Drop for InProcDevice {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let r = h.join();
            if !std::thread::panicking() {
                r.expect("device thread panicked");
            }
        }
    }
}

fn wait_readable(fd: &EventFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

fn device_loop(
    gm: GuestMemoryMmap<()>,
    mut queue: Queue,
    kick: EventFd,
    call: EventFd,
    stop: Arc<AtomicBool>,
    tx: Sender<Observed>,
    reverse: bool,
) {
    let mut done = Vec::new();
    while !stop.load(Ordering::Acquire) {
        if !wait_readable(&kick, 20) {
            continue;
        }
        let _ = kick.read();
        loop {
            queue
                .disable_notification(&gm)
                .expect("disable_notification");
            done.clear();
            while let Some(chain) = queue.pop_descriptor_chain(&gm) {
                done.push(serve_chain(chain, &gm, Some(&tx)));
            }
            if reverse {
                done.reverse();
            }
            for &(head, len) in &done {
                queue.add_used(&gm, head, len).expect("add_used");
            }
            if !done.is_empty() && queue.needs_notification(&gm).expect("needs_notification") {
                call.write(1).expect("signal call fd");
            }
            if !queue.enable_notification(&gm).expect("enable_notification") {
                break;
            }
        }
    }
}

fn setup(size: u16, event_idx: bool, reverse: bool) -> (Arc<GuestMem>, SplitQueue, InProcDevice) {
    let mem = Arc::new(GuestMem::new(16 << 20).expect("guest mem"));
    let opts = QueueOptions {
        size,
        event_idx,
        ..Default::default()
    };
    let q = SplitQueue::new(mem.clone(), 0, &opts).expect("queue");
    let dev = InProcDevice::start(&mem, &q, reverse);
    (mem, q, dev)
}

/// Submit one chain, wait for it, check what the device saw and what the
/// driver reads back.
fn roundtrip(
    q: &mut SplitQueue,
    dev: &InProcDevice,
    pieces: &[&[u8]],
    wlens: &[u32],
    indirect: bool,
) {
    let tok = if indirect {
        q.add_indirect(pieces, wlens)
    } else {
        q.add(pieces, wlens)
    }
    .expect("add");
    q.kick().expect("kick");
    let used = q.wait_used(T).expect("wait_used");
    assert_eq!(used.len(), 1, "one chain in flight, one used");
    let total: u32 = wlens.iter().sum();
    assert_eq!(used[0], (tok, total));
    let o = dev.observed();
    assert_eq!(o.head, tok.head);
    let all: Vec<u8> = pieces.concat();
    assert_eq!(o.readable, all, "readable bytes as the device saw them");
    let rl: Vec<u32> = pieces.iter().map(|p| p.len() as u32).collect();
    assert_eq!(o.readable_lens, rl, "readable split");
    assert_eq!(o.writable_lens, wlens, "writable split");
    assert_eq!(
        q.read_written(tok).expect("read_written"),
        expected_reply(&all, total as usize)
    );
    assert_eq!(q.used_len(tok).expect("used_len"), total);
}

fn chain_shapes(event_idx: bool, indirect: bool) {
    let (_mem, mut q, dev) = setup(256, event_idx, false);
    let (att, _) = wire::attach(7, 0x10, 0, 0);
    // An ATTACH split at odd offsets, tail split too.
    roundtrip(
        &mut q,
        &dev,
        &[&att[..3], &att[3..4], &att[4..]],
        &[1, 3],
        indirect,
    );
    // Whole.
    roundtrip(&mut q, &dev, &[&att], &[4], indirect);
    // Readable-only and writable-only chains.
    roundtrip(&mut q, &dev, &[&att], &[], indirect);
    roundtrip(&mut q, &dev, &[], &[24, 24], indirect);
    // Many descriptors: 40 readable pieces of 1..=40 bytes, 30 writable of 1..=30.
    let data: Vec<u8> = (0..820u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut pieces: Vec<&[u8]> = Vec::new();
    let mut off = 0;
    for n in 1..=40usize {
        pieces.push(&data[off..off + n]);
        off += n;
    }
    let wl: Vec<u32> = (1..=30).collect();
    roundtrip(&mut q, &dev, &pieces, &wl, indirect);
    // A large buffer grows the arena.
    let big = vec![0x33u8; 20000];
    roundtrip(&mut q, &dev, &[&big], &[9000], indirect);
    assert_eq!(q.in_flight(), 0);
    assert_eq!(q.free_descriptors(), 256);
}

#[test]
fn chains_event_idx() {
    chain_shapes(true, false);
}

#[test]
fn chains_no_event_idx() {
    chain_shapes(false, false);
}

#[test]
fn chains_indirect() {
    chain_shapes(true, true);
    chain_shapes(false, true);
}

#[test]
fn indirect_chain_longer_than_queue() {
    let (_mem, mut q, dev) = setup(16, true, false);
    let data: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
    let pieces: Vec<&[u8]> = data.chunks(2).collect();
    let wl = vec![3u32; 100];
    roundtrip(&mut q, &dev, &pieces, &wl, true);
    assert!(
        q.add(&pieces, &wl).is_err(),
        "direct 200-descriptor chain cannot fit"
    );
}

fn recycling(event_idx: bool, batch_indirect: bool) {
    let (_mem, mut q, dev) = setup(16, event_idx, false);
    q.set_batch_indirect(batch_indirect);
    let mut n = 0u32;
    let mut out = BatchReplies::default();
    // Batches of 1..=40 requests (more than fit: pipelined), 2 descriptors each.
    for round in 0..150u32 {
        let size = (round % 40 + 1) as usize;
        let reqs: Vec<([u8; 36], u32)> = (0..size as u32)
            .map(|i| wire::map(n + i, 0x1000 * u64::from(i), 0x1fff, 0x4000, MAP_F_READ))
            .collect();
        q.submit_batch_into(&reqs, &mut out, T).expect("batch");
        assert_eq!(out.len(), size);
        for (i, r) in reqs.iter().enumerate() {
            assert_eq!(out.used_len(i), 4);
            assert_eq!(
                out.written(i),
                expected_reply(&r.0, 4),
                "request {i} of round {round}"
            );
        }
        n += size as u32;
    }
    // Single requests, one at a time.
    for i in 0..500u32 {
        let (r, w) = wire::attach(i, i + 1, 0, 0);
        let (used, bytes) = q.request(&r, w).expect("request");
        assert_eq!(used, 4);
        assert_eq!(bytes, expected_reply(&r, 4));
        n += 1;
    }
    while dev.obs.try_recv().is_ok() {}
    assert!(n >= 3000, "{n} requests");
    assert_eq!(q.stats().completed, u64::from(n));
    assert_eq!(q.free_descriptors(), 16);
    assert!(q.take_bogus_used().is_empty());
}

#[test]
fn recycling_size16_event_idx() {
    recycling(true, false);
}

#[test]
fn recycling_size16_no_event_idx() {
    recycling(false, false);
}

#[test]
fn recycling_size16_batch_indirect() {
    recycling(true, true);
}

#[test]
fn batch_out_of_order_completion() {
    let (_mem, mut q, _dev) = setup(64, true, true);
    let reqs: Vec<(Vec<u8>, u32)> = (0..100u8)
        .map(|i| (vec![i; (i % 7 + 1) as usize], u32::from(i % 5 + 1)))
        .collect();
    let replies = q.submit_batch(&reqs).expect("batch");
    for (i, (r, w)) in reqs.iter().enumerate() {
        assert_eq!(
            replies[i],
            (*w, expected_reply(r, *w as usize)),
            "request {i}"
        );
    }
}

#[test]
fn many_in_flight_then_wait() {
    let (_mem, mut q, _dev) = setup(256, true, false);
    let mut toks: Vec<Token> = Vec::new();
    for i in 0..100u32 {
        let (r, w) = wire::detach(i, i);
        toks.push(q.add(&[&r], &[w]).expect("add"));
    }
    q.kick().expect("kick");
    let mut got = Vec::new();
    q.wait_used_into(&mut got, 100, T).expect("wait 100");
    assert_eq!(got.len(), 100);
    for (i, t) in toks.iter().enumerate() {
        let (r, _) = wire::detach(i as u32, i as u32);
        assert_eq!(q.read_written(*t).expect("read"), expected_reply(&r, 4));
    }
}

#[test]
fn raw_chain_mapping() {
    let (mem, mut q, dev) = setup(32, true, false);
    let a = mem.alloc_bytes(b"head-", 8).expect("alloc");
    let b = mem.alloc_bytes(b"tail", 8).expect("alloc");
    let w = mem.alloc(6, 8).expect("alloc");
    // Slice order: [R a -> 2], [W w], [R b -> 1]: chain order a, b, w.
    let descs = [
        RawDesc::readable(a, 5).then(2),
        RawDesc::writable(w, 6),
        RawDesc::readable(b, 4).then(1),
    ];
    let tok = q.add_raw(&descs).expect("add_raw");
    q.kick().expect("kick");
    let used = q.wait_used(T).expect("wait");
    assert_eq!(used, vec![(tok, 6)]);
    let o = dev.observed();
    assert_eq!(o.readable, b"head-tail");
    assert_eq!(o.writable_lens, vec![6]);
    assert_eq!(
        q.read_written(tok).expect("read"),
        expected_reply(b"head-tail", 6)
    );

    // A raw indirect table.
    let table = mem.alloc(3 * 16, 16).expect("alloc");
    write_raw_table(
        &mem,
        table,
        &[
            RawDesc::readable(a, 5).then(1),
            RawDesc::readable(b, 4).then(2),
            RawDesc::writable(w, 6),
        ],
    )
    .expect("table");
    let tok = q.add_raw(&[RawDesc::indirect(table, 3)]).expect("add_raw");
    q.kick().expect("kick");
    assert_eq!(q.wait_used(T).expect("wait"), vec![(tok, 6)]);
    assert_eq!(dev.observed().readable, b"head-tail");
    assert_eq!(
        mem.read_vec(w, 6).expect("read"),
        expected_reply(b"head-tail", 6)
    );
    assert!(q.add_raw(&[RawDesc::readable(a, 1).then(5)]).is_err());

    // Abandoning a chain the device never sees (avail.idx not advanced past it
    // for the device: stop the device first).
    drop(dev);
    let free = q.free_descriptors();
    let tok = q.add(&[b"lost"], &[4]).expect("add");
    assert_eq!(q.free_descriptors(), free - 2);
    q.abandon(tok).expect("abandon");
    assert_eq!((q.free_descriptors(), q.in_flight()), (free, 0));
    assert!(q.abandon(tok).is_err());
}

/// Driver-only checks of the notification rules and of device misbehaviour
/// detection (no device thread: the test plays the device).
#[test]
fn notification_rules_and_bogus_used() {
    let mem = Arc::new(GuestMem::new(4 << 20).expect("mem"));
    let opts = QueueOptions {
        size: 8,
        event_idx: false,
        ..Default::default()
    };
    let mut q = SplitQueue::new(mem.clone(), 0, &opts).expect("queue");
    let l = q.layout();
    q.add(&[b"x"], &[4]).expect("add");
    assert!(q.kick().expect("kick"), "no NO_NOTIFY: kick");
    assert!(!q.kick().expect("kick"), "nothing new: no kick");
    mem.write_u16(l.used, VRING_USED_F_NO_NOTIFY)
        .expect("flags");
    q.add(&[b"y"], &[4]).expect("add");
    assert!(!q.kick().expect("kick"), "NO_NOTIFY honoured");
    q.kick_forced().expect("forced");
    assert_eq!(q.kick_fd().read().expect("kick count"), 2);

    // EVENT_IDX: avail_event = 4 means "kick when avail.idx passes 4".
    let mut q = SplitQueue::new(
        mem.clone(),
        0,
        &QueueOptions {
            size: 8,
            ..Default::default()
        },
    )
    .expect("queue");
    let l = q.layout();
    let avail_event = l.used + 4 + 8 * 8;
    mem.write_u16(avail_event, 4).expect("avail_event");
    for _ in 0..3 {
        q.add(&[b"z"], &[]).expect("add");
    }
    assert!(!q.kick().expect("kick"), "idx 0->3 does not cross 4");
    q.add(&[b"z"], &[]).expect("add");
    q.add(&[b"z"], &[]).expect("add");
    assert!(q.kick().expect("kick"), "idx 3->5 crosses 4");
    assert!(vring_need_event(0xffff, 0, 0xfffe), "wraps");
    assert!(!vring_need_event(5, 5, 3));

    // Play the device: complete head 0 and a bogus id 99.
    let used_ring = l.used + 4;
    mem.write_u32(used_ring, 0).expect("id");
    mem.write_u32(used_ring + 4, 0).expect("len");
    mem.write_u32(used_ring + 8, 99).expect("id");
    mem.write_u32(used_ring + 12, 7).expect("len");
    mem.atomic_u16(l.used + 2)
        .expect("used idx")
        .store(2, Ordering::Release);
    let mut out = Vec::new();
    assert_eq!(q.poll_used_into(&mut out).expect("poll"), 1);
    assert_eq!(out[0].0.head, 0);
    assert_eq!(q.take_bogus_used(), vec![(99, 7)]);
    // Used event was requested for the next entry.
    let t0 = Instant::now();
    match q.wait_used(Duration::from_millis(200)) {
        Err(Error::Timeout(_)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(t0.elapsed() >= Duration::from_millis(190));
    mem.atomic_u16(l.used + 2)
        .expect("used idx")
        .store(200, Ordering::Release);
    assert!(
        q.poll_used_into(&mut out).is_err(),
        "used.idx jumping by more than the queue size is reported"
    );
}

#[test]
fn guest_memory_layout() {
    let mem = GuestMem::with_hole(1 << 20, 4 << 20, 1 << 20).expect("mem");
    assert!(mem.is_ram(0, 1 << 20));
    assert!(!mem.is_ram((1 << 20) - 1, 2));
    assert!(mem.is_ram(4 << 20, 1 << 20));
    assert_eq!(mem.unmapped_gpa(), 1 << 20);
    assert!(mem.write((2 << 20) as u64, b"x").is_err());
    let hi = mem.alloc_in(1, 100, 4096).expect("alloc high");
    assert_eq!(hi, 4 << 20);
    mem.write(hi + 3, b"hello").expect("write");
    assert_eq!(mem.read_vec(hi + 3, 5).expect("read"), b"hello");
    let infos = mem.region_infos();
    assert_eq!(infos.len(), 2);
    assert_eq!(infos[1].guest_phys_addr, 4 << 20);
    assert_eq!(infos[1].mmap_offset, 1 << 20);
    // Same bytes through the device-side view of the memfd.
    let gm = guest_memory_mmap(&mem);
    let mut b = [0u8; 5];
    gm.read_slice(&mut b, GuestAddress(hi + 3))
        .expect("vm-memory read");
    assert_eq!(&b, b"hello");
    let a1 = mem.alloc(10, 8).expect("a");
    let a2 = mem.alloc(10, 64).expect("b");
    assert!(a1 >= 0x1000 && a2.is_multiple_of(64) && a2 >= a1 + 10);
    assert!(mem.alloc(2 << 20, 8).is_err(), "exhaustion is an error");
}

#[test]
fn wire_layouts() {
    let (a, w) = wire::attach(0x01020304, 0x0a0b0c0d, ATTACH_F_BYPASS, 0);
    assert_eq!(w, 4);
    assert_eq!(
        a,
        [1, 0, 0, 0, 4, 3, 2, 1, 0xd, 0xc, 0xb, 0xa, 1, 0, 0, 0, 0, 0, 0, 0]
    );
    let (m, _) = wire::map(5, 0x1000, 0x1fff, 0x8000, MAP_F_READ | MAP_F_WRITE);
    assert_eq!(m.len(), 36);
    assert_eq!(m[0], T_MAP);
    assert_eq!(&m[8..16], &0x1000u64.to_le_bytes());
    assert_eq!(&m[16..24], &0x1fffu64.to_le_bytes());
    assert_eq!(&m[24..32], &0x8000u64.to_le_bytes());
    assert_eq!(&m[32..36], &3u32.to_le_bytes());
    assert_eq!(wire::unmap(1, 0, 9).0.len(), 28);
    assert_eq!(wire::detach(1, 2).0[0], T_DETACH);
    let (p, pw) = wire::probe(9, 512);
    assert_eq!((p.len(), pw, p[0], p[4]), (72, 516, T_PROBE, 9));
    let (t, _) = wire::attach_table_vtd(3, 4, TABLE_F_PAGE_REQUESTS, 7, 0xabc000, 48);
    assert_eq!(
        (t.len(), t[0], t[12]),
        (124, T_ATTACH_TABLE, TABLE_FMT_INTEL_VTD)
    );
    assert_eq!(&t[16..20], &(1u32 << 9).to_le_bytes());
    assert_eq!(&t[24..32], &0xabc000u64.to_le_bytes());
    assert_eq!(&t[32..36], &48u32.to_le_bytes());
    let (i, _) = wire::invalidate(&Invalidate {
        scope: INV_SCOPE_ADDRESS,
        caches: INV_CACHE_TLB,
        flags: INV_F_LEAF,
        domain: 2,
        nr_pages: 16,
        page_size: 12,
        ..Default::default()
    });
    assert_eq!(
        (i.len(), i[0], i[4], i[5], i[6], i[40]),
        (60, 7, 3, 2, 1, 12)
    );
    let (r, _) = wire::page_resp(4, PAGE_RESP_F_PASID_VALID, 1, 0x33, PAGE_RESP_FAILURE);
    assert_eq!((r.len(), r[0], r[16], r[18]), (28, T_PAGE_RESP, 0x33, 2));

    // PROBE reply: RESV_MEM MSI + RESV_MEM reserved, then zero padding.
    let mut props = vec![0u8; 64];
    props[0..4].copy_from_slice(&[1, 0, 20, 0]);
    props[4] = RESV_MEM_T_MSI;
    props[8..16].copy_from_slice(&0xfee0_0000u64.to_le_bytes());
    props[16..24].copy_from_slice(&0xfeef_ffffu64.to_le_bytes());
    props[24..28].copy_from_slice(&[1, 0, 20, 0]);
    props[32..40].copy_from_slice(&0x1000u64.to_le_bytes());
    props[40..48].copy_from_slice(&0x1fffu64.to_le_bytes());
    let mut written = props.clone();
    written.extend_from_slice(&[S_OK, 0, 0, 0]);
    let pr = ProbeReply::parse(68, &written, 64).expect("probe");
    assert_eq!(pr.status, S_OK);
    let rm = pr.resv_mem().expect("resv");
    assert_eq!(rm.len(), 2);
    assert_eq!(
        (rm[0].subtype, rm[0].start, rm[0].end),
        (1, 0xfee0_0000, 0xfeef_ffff)
    );
    assert_eq!((rm[1].subtype, rm[1].start, rm[1].end), (0, 0x1000, 0x1fff));
    props[26] = 200; // length runs past the end
    assert!(parse_probe_props(&props).is_err());
    assert_eq!(
        parse_tail(&[6, 0, 0, 0], 0).map(|t| t.status),
        Some(S_NOENT)
    );
    assert_eq!(status_name(S_RANGE), "RANGE");

    let mut cfg = [0u8; 40];
    cfg[0..8].copy_from_slice(&0xffff_f000u64.to_le_bytes());
    cfg[16..24].copy_from_slice(&((1u64 << 48) - 1).to_le_bytes());
    cfg[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
    cfg[32..36].copy_from_slice(&512u32.to_le_bytes());
    cfg[36] = 1;
    let c = IommuConfig::parse(&cfg).expect("cfg");
    assert_eq!(
        (
            c.granule(),
            c.input_end,
            c.domain_end,
            c.probe_size,
            c.bypass
        ),
        (4096, (1 << 48) - 1, u32::MAX, 512, 1)
    );

    let mut ev = [0u8; 48];
    ev[0] = EVT_REASON_MAPPING;
    ev[4..8].copy_from_slice(&(EVT_F_PAGE_REQ | EVT_F_GROUP_ID | EVT_F_LAST).to_le_bytes());
    ev[8..12].copy_from_slice(&8u32.to_le_bytes());
    ev[16..24].copy_from_slice(&0xdead_b000u64.to_le_bytes());
    ev[24..26].copy_from_slice(&0x42u16.to_le_bytes());
    ev[32..40].copy_from_slice(&7u64.to_le_bytes());
    let e = EventRecord::parse(&ev).expect("event");
    assert!(e.is_page_request());
    assert_eq!(
        (e.endpoint, e.address, e.group_id, e.private_data[0]),
        (8, 0xdead_b000, 0x42, 7)
    );
    let e24 = EventRecord::parse(&ev[..24]).expect("event24");
    assert_eq!((e24.group_id, e24.private_data), (0, [0, 0]));
}

#[test]
fn control_client_roundtrip() {
    use std::io::{BufRead, BufReader, Write};
    let dir = fresh_temp_dir("ctl").expect("dir");
    let path = dir.join("control.sock");
    let p2 = path.clone();
    let server = std::thread::spawn(move || {
        // Appear late, to exercise the connect retry.
        std::thread::sleep(Duration::from_millis(200));
        let l = std::os::unix::net::UnixListener::bind(&p2).expect("bind");
        let (s, _) = l.accept().expect("accept");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut s = s;
        let mut line = String::new();
        while r.read_line(&mut line).expect("read") > 0 {
            let v: serde_json::Value = serde_json::from_str(&line).expect("json");
            let reply = if v["op"] == "dma" {
                serde_json::json!({"ok": true, "ranges": [{"iova": v["iova"], "gpa": 0x5000, "len": v["len"]}]})
            } else {
                serde_json::json!({"ok": false, "error": "bad-request", "detail": "?"})
            };
            writeln!(s, "{reply}").expect("write");
            line.clear();
        }
    });
    let mut c = ControlClient::connect(&path).expect("connect");
    let r = c.dma(8, 0x1000, 0x20, true, Some(3), None).expect("dma");
    assert_eq!(
        dma_ranges(&r).expect("ranges"),
        vec![(0x1000, 0x5000, 0x20)]
    );
    let s = c.stats().expect("stats");
    assert_eq!(error_kind(&s), Some("bad-request"));
    drop(c);
    server.join().expect("server");
    let _ = std::fs::remove_dir_all(dir);
}

/// The cost benches tell a backend thread's role from the functions it
/// ran. A control client's `serve_client` is inlined into its thread's
/// closure in release builds (only what it calls shows): such a thread was
/// counted as `other`, and the request cost, which leaves the control
/// clients (the marks' and the idle checks' queries) out, counted it.
#[test]
fn cost_roles_from_what_a_thread_ran() {
    use support::cost::{Profile, Role};
    let ran = |fns: &[&str]| Profile {
        by_fn: fns.iter().map(|f| ((*f).to_string(), 1)).collect(),
        total: fns.len() as u64,
    };
    let backend = "<vhost_device_iommu::device::backend::IommuBackend as \
                   vhost_user_backend::backend::VhostUserBackend>::handle_event";
    let reqq = "vhost_device_iommu::device::backend::requestq::serve_requestq";
    let cases = [
        (ran(&[backend, reqq]), Role::RequestQueue),
        (
            ran(&[
                backend,
                "vhost_device_iommu::fault_queue::relay::FaultRelay::relay",
            ]),
            Role::EventQueue,
        ),
        (
            ran(&["vhost_device_iommu::control::serve_client"]),
            Role::ControlClient,
        ),
        // serve_client inlined: what it called names the thread.
        (
            ran(&[
                "std::sys::backtrace::__rust_begin_short_backtrace",
                "vhost_device_iommu::control::ops::stats",
            ]),
            Role::ControlClient,
        ),
        (
            ran(&["<vhost_device_iommu::control::Deadlined as std::io::Read>::read"]),
            Role::ControlClient,
        ),
        (ran(&["vhost_device_iommu::server::run"]), Role::Other),
    ];
    for (p, want) in cases {
        assert_eq!(p.role(), want, "{:?}", p.by_fn.keys().collect::<Vec<_>>());
    }
}

#[test]
fn proc_helpers() {
    let pid = std::process::id();
    assert!(proc_rss_kib(pid).expect("rss") > 0);
    assert!(proc_fd_count(pid).expect("fds") >= 3);
}

// ---- vhost-user frontend against an in-process vhost-user-backend daemon ----

mod echo_backend {
    use super::*;
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::event::{
        new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
    };

    type GM = GuestMemoryAtomic<GuestMemoryMmap<()>>;

    #[derive(Default)]
    pub struct State {
        pub mem: Option<GM>,
        pub event_idx: bool,
        pub config: Vec<u8>,
        pub acked: u64,
        pub events_sent: u32,
        /// Connections served so far (incremented before each `serve`).
        pub serving: u32,
    }

    #[derive(Clone)]
    pub struct Echo(pub Arc<Mutex<State>>);

    pub const FEATURES: u64 = (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28) | 0x77;

    impl Echo {
        pub fn new() -> Self {
            let mut config = vec![0u8; 40];
            config[0..8].copy_from_slice(&0xffff_f000u64.to_le_bytes());
            config[32..36].copy_from_slice(&64u32.to_le_bytes());
            config[36] = 1;
            Echo(Arc::new(Mutex::new(State {
                config,
                ..Default::default()
            })))
        }

        fn process(&self, vring: &VringRwLock, eventq: bool) -> std::io::Result<()> {
            let mem = self.0.lock().unwrap().mem.clone().expect("memory").memory();
            loop {
                let mut any = false;
                loop {
                    // Bind first: the vring lock must be released before add_used.
                    let next = vring
                        .get_mut()
                        .get_queue_mut()
                        .pop_descriptor_chain(mem.clone());
                    let Some(chain) = next else { break };
                    any = true;
                    let (head, len) = if eventq {
                        // Write a fake 24-byte fault record into the buffer.
                        let mut st = self.0.lock().unwrap();
                        st.events_sent += 1;
                        let n = st.events_sent;
                        let d = chain.clone().next().expect("one descriptor");
                        let mut rec = [0u8; 24];
                        rec[0] = EVT_REASON_MAPPING;
                        rec[4..8].copy_from_slice(&(EVT_F_READ | EVT_F_ADDRESS).to_le_bytes());
                        rec[8..12].copy_from_slice(&n.to_le_bytes());
                        rec[16..24].copy_from_slice(&(0x1000 * u64::from(n)).to_le_bytes());
                        mem.write_slice(&rec, d.addr()).expect("event write");
                        (chain.head_index(), 24)
                    } else {
                        serve_chain(chain, &mem, None)
                    };
                    vring.add_used(head, len).expect("add_used");
                }
                if any && vring.needs_notification().expect("needs_notification") {
                    vring.signal_used_queue()?;
                }
                if !self.0.lock().unwrap().event_idx
                    || !vring.enable_notification().expect("enable")
                {
                    break;
                }
                vring.disable_notification().expect("disable");
            }
            Ok(())
        }
    }

    impl VhostUserBackend for Echo {
        type Bitmap = ();
        type Vring = VringRwLock;

        fn num_queues(&self) -> usize {
            2
        }
        fn max_queue_size(&self) -> usize {
            1024
        }
        fn features(&self) -> u64 {
            FEATURES
        }
        fn acked_features(&self, features: u64) {
            self.0.lock().unwrap().acked = features;
        }
        fn protocol_features(&self) -> VhostUserProtocolFeatures {
            VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
        }
        fn set_event_idx(&self, enabled: bool) {
            self.0.lock().unwrap().event_idx = enabled;
        }
        fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
            let st = self.0.lock().unwrap();
            st.config
                .get(offset as usize..(offset + size) as usize)
                .map(|s| s.to_vec())
                .unwrap_or_default()
        }
        fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
            if offset != 36 || buf.len() != 1 || buf[0] > 1 {
                return Err(std::io::Error::other("only bypass (0/1) is writable"));
            }
            self.0.lock().unwrap().config[36] = buf[0];
            Ok(())
        }
        fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
            new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
        }
        fn update_memory(&self, mem: GM) -> std::io::Result<()> {
            self.0.lock().unwrap().mem = Some(mem);
            Ok(())
        }
        fn handle_event(
            &self,
            device_event: u16,
            _evset: EventSet,
            vrings: &[VringRwLock],
            _thread_id: usize,
        ) -> std::io::Result<()> {
            let q = device_event as usize;
            if q < vrings.len() {
                if self.0.lock().unwrap().event_idx {
                    vrings[q].disable_notification().expect("disable");
                }
                self.process(&vrings[q], q == 1)?;
            }
            Ok(())
        }
    }

    impl Echo {
        /// Wait until the daemon serves its `n`th connection: its previous
        /// listener (which would reset a connection queued in its backlog)
        /// is gone by then.
        pub fn wait_serving(&self, n: u32) {
            let deadline = Instant::now() + T;
            while self.0.lock().unwrap().serving < n {
                assert!(Instant::now() < deadline, "echo daemon not serving #{n}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Serve connections on `path` forever (one at a time).
    pub fn spawn(path: std::path::PathBuf) -> Echo {
        let echo = Echo::new();
        let e2 = echo.clone();
        std::thread::spawn(move || loop {
            // A fresh daemon per connection (the handler keeps "owned" state
            // across connections). Dropping it joins its vring workers,
            // which exit through `exit_event`.
            let mut d = VhostUserDaemon::new(
                "echo".into(),
                e2.clone(),
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
            .expect("daemon");
            // An error only ends this connection (e.g. a refused SET_CONFIG).
            e2.0.lock().unwrap().serving += 1;
            let _ = d.serve(&path);
        });
        echo
    }
}

fn frontend_roundtrips(f: &mut Frontend) {
    let mut out = BatchReplies::default();
    for round in 0..20u32 {
        let reqs: Vec<([u8; 20], u32)> =
            (0..300u32).map(|i| wire::attach(round, i, 0, 0)).collect();
        f.requestq()
            .submit_batch_into(&reqs, &mut out, T)
            .expect("batch");
        for (i, r) in reqs.iter().enumerate() {
            assert_eq!(
                (out.used_len(i), out.written(i)),
                (4, &expected_reply(&r.0, 4)[..])
            );
        }
    }
    let (p, w) = wire::probe(1, 64);
    let (used, bytes) = f.request(&p, w).expect("probe-shaped request");
    assert_eq!((used, bytes), (68, expected_reply(&p, 68)));
}

#[test]
fn frontend_against_vhost_user_backend() {
    let dir = fresh_temp_dir("echo").expect("dir");
    let sock = dir.join("vhost.sock");
    let echo = echo_backend::spawn(sock.clone());

    let mem = Arc::new(GuestMem::with_hole(32 << 20, 1 << 32, 4 << 20).expect("mem"));
    let mut f = Frontend::connect(&sock, mem.clone(), FrontendOptions::default()).expect("connect");
    assert_eq!(f.offered_features, echo_backend::FEATURES);
    assert_eq!(f.acked_features, echo_backend::FEATURES);
    assert_eq!(f.queue_num, 2);
    assert!(f.queues[0].event_idx());
    assert_eq!(echo.0.lock().unwrap().acked, echo_backend::FEATURES);
    let c = f.config().expect("config");
    assert_eq!((c.granule(), c.probe_size, c.bypass), (4096, 64, 1));
    assert_eq!(f.probe_size().expect("probe_size"), 64);
    f.set_bypass(false).expect("bypass off");
    assert_eq!(f.config().expect("config").bypass, 0);
    frontend_roundtrips(&mut f);

    // Event queue: post 4 buffers, the echo device fills each with a record.
    let toks = f.post_event_buffers(4, 24).expect("post");
    let evs = f.collect_events_upto(4, T).expect("events");
    assert_eq!(evs.len(), 4);
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e.token, toks[i], "buffers used in posting order");
        assert_eq!(e.used_len, 24);
        let r = e.record().expect("record");
        assert_eq!(
            (r.reason, r.flags),
            (EVT_REASON_MAPPING, EVT_F_READ | EVT_F_ADDRESS)
        );
        assert_eq!(r.address, 0x1000 * u64::from(r.endpoint));
    }

    // Refusals surface thanks to REPLY_ACK (vhost-user-backend then drops
    // the connection, so this comes last).
    assert!(f.set_config(36, &[2]).is_err(), "backend refusal surfaces");

    // A fresh connection without EVENT_IDX and with a small queue.
    f.disconnect();
    let opts = FrontendOptions::default()
        .without(VIRTIO_RING_F_EVENT_IDX)
        .queue_size(16);
    echo.wait_serving(2);
    let mut f = Frontend::connect(&sock, mem.clone(), opts).expect("reconnect");
    assert!(!f.queues[0].event_idx());
    assert!(!echo.0.lock().unwrap().event_idx);
    frontend_roundtrips(&mut f);
    f.disconnect();
    echo.wait_serving(3);
    let mut f = Frontend::connect(
        &sock,
        mem.clone(),
        FrontendOptions::default().queue_size(64),
    )
    .expect("third connection");
    frontend_roundtrips(&mut f);
    drop(f);
    let _ = std::fs::remove_dir_all(dir);
}
