// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fault-relay benchmark (kernel tier): an I/O page fault's round trip
//! through our device against two baselines measured in the same run.
//!
//! - ours: IOMMU_TEST_OP_TRIGGER_IOPF on a selftest endpoint attached to a
//!   table with PAGE_REQUESTS -> the page-request record on the eventq (the
//!   test driver sleeps on the eventq's call eventfd, an interrupt) ->
//!   PAGE_RESP on the requestq (the driver spins for the reply, as Linux's
//!   virtio-iommu driver does) -> answered, which our device does only
//!   after the response was written to the fault FD.
//! - raw: one thread: trigger -> read() the fault FD -> write() the response.
//! - floor: the least any cross-thread relay can cost: one thread triggers
//!   and sleeps on an eventfd; another sleeps in poll() on the fault FD,
//!   reads, writes the response and wakes the first.
//!
//! Single faults (p50/p99 over N) and batches of 64 (faults per second).
//! Needs /dev/iommu with CONFIG_IOMMUFD_TEST: `tests/vm/kernel-tier.sh`
//! runs it in the test guest:
//!
//!   VIOMMU_BIN=/bin/vhost-device-iommu /bin/fault_relay [--quick]
//!
//! Prints `fault-relay p50_ns=.. p99_ns=.. raw_p50_ns=.. floor_p50_ns=..
//! ratio=.. batch_faults_per_s=.. raw_batch_faults_per_s=..` (the default
//! `--fault-io epoll`), and the same figures of `--fault-io io-uring` on a
//! `fault-relay-detail fault_io=io-uring` line.
// Test code with known small values (sizes, counts, timings): these casts
// cannot truncate or wrap.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::host::HostRig;
use support::process::proc_cpu_ns;
use support::wire::{self, EventRecord, S_OK};
use vhost_device_iommu::iommufd_bridge::sys::{
    FaultQueue, Iommufd, HWPT_ALLOC_NEST_PARENT, HWPT_DATA_SELFTEST,
};
use vmm_sys_util::eventfd::EventFd;

const BATCH: usize = 64;
const RAM_BASE: u64 = 1 << 24;
const MEM: usize = 16 << 20;
/// IOMMU_PGFAULT_PERM_READ.
const READ: u32 = 1;

fn pct(v: &mut [u128], p: usize) -> f64 {
    v.sort_unstable();
    v[(v.len() * p / 100).min(v.len() - 1)] as f64
}

/// A mock device on a nested HWPT with a fault queue, without our device.
struct Direct {
    fd: Iommufd,
    dev_id: u32,
    fault: File,
}

fn direct() -> Direct {
    let fd = Iommufd::open("/dev/iommu".as_ref()).expect("/dev/iommu");
    let ioas = fd.ioas_alloc().unwrap();
    let dev = fd.mock_domain(ioas).unwrap();
    let parent = fd
        .hwpt_alloc(dev.dev_id, ioas, HWPT_ALLOC_NEST_PARENT, 0, &mut [], None)
        .unwrap();
    let FaultQueue {
        id: fault_id,
        file: fault,
    } = fd.fault_queue_alloc().unwrap();
    let mut data = 0u32.to_le_bytes();
    let nested = fd
        .hwpt_alloc(
            dev.dev_id,
            parent,
            0,
            HWPT_DATA_SELFTEST,
            &mut data,
            Some(fault_id),
        )
        .unwrap();
    fd.mock_domain_replace(dev.stdev_id, nested).unwrap();
    Direct {
        fd,
        dev_id: dev.dev_id,
        fault,
    }
}

/// Read whole records until `n` arrived; returns their cookies.
fn read_cookies(f: &mut File, n: usize, cookies: &mut Vec<u32>) {
    let mut buf = [0u8; 40 * BATCH];
    cookies.clear();
    while cookies.len() < n {
        let want = (n - cookies.len()).min(BATCH) * 40;
        let got = f.read(&mut buf[..want]).unwrap();
        for r in buf[..got].chunks_exact(40) {
            cookies.push(u32::from_le_bytes(r[36..40].try_into().unwrap()));
        }
    }
}

fn respond(f: &mut File, cookies: &[u32]) {
    let mut out = Vec::with_capacity(cookies.len() * 8);
    for c in cookies {
        out.extend_from_slice(&c.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    assert_eq!(f.write(&out).unwrap(), out.len());
}

/// (p50 of single faults, batched faults per second).
fn raw(n: usize, rounds: usize) -> (f64, f64) {
    let mut d = direct();
    let mut cookies = Vec::with_capacity(BATCH);
    let mut t: Vec<u128> = (0..n)
        .map(|i| {
            let start = Instant::now();
            d.fd.trigger_iopf(d.dev_id, 0, i as u32 % 512, READ, 0x1000)
                .unwrap();
            read_cookies(&mut d.fault, 1, &mut cookies);
            respond(&mut d.fault, &cookies);
            start.elapsed().as_nanos()
        })
        .collect();
    let start = Instant::now();
    for _ in 0..rounds {
        for i in 0..BATCH {
            d.fd.trigger_iopf(d.dev_id, 0, i as u32, READ, 0x1000)
                .unwrap();
        }
        read_cookies(&mut d.fault, BATCH, &mut cookies);
        respond(&mut d.fault, &cookies);
    }
    let rate = (rounds * BATCH) as f64 / start.elapsed().as_secs_f64();
    (pct(&mut t, 50), rate)
}

/// p50 of the two-thread relay floor.
fn floor(n: usize) -> f64 {
    let d = direct();
    let done = Arc::new(EventFd::new(0).unwrap());
    let mut fault = d.fault;
    let relay_done = done.clone();
    let relay = std::thread::spawn(move || {
        let mut cookies = Vec::with_capacity(1);
        for _ in 0..n {
            let mut pfd = libc::pollfd {
                fd: fault.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the call.
            while unsafe { libc::poll(&mut pfd, 1, 10_000) } <= 0 {}
            read_cookies(&mut fault, 1, &mut cookies);
            respond(&mut fault, &cookies);
            relay_done.write(1).unwrap();
        }
    });
    let mut t: Vec<u128> = (0..n)
        .map(|i| {
            let start = Instant::now();
            d.fd.trigger_iopf(d.dev_id, 0, i as u32 % 512, READ, 0x1000)
                .unwrap();
            done.read().unwrap(); // blocks until the relay answered
            start.elapsed().as_nanos()
        })
        .collect();
    relay.join().unwrap();
    pct(&mut t, 50)
}

/// CPU time of the calling thread.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Our device's figures: single faults and batches.
struct Ours {
    p50: f64,
    p99: f64,
    batch_rate: f64,
    /// Per batched fault: the backend's CPU time (all its threads) and the
    /// test thread's (the trigger ioctl and the test driver's ring work).
    backend_cpu_ns: f64,
    driver_cpu_ns: f64,
}

/// Single faults and batches through our device started with `extra`.
fn ours(n: usize, rounds: usize, extra: &[&str]) -> Ours {
    let mut args = vec!["--endpoint", "1,selftest"];
    args.extend_from_slice(extra);
    let mut rig = HostRig::new(&args);
    let mut f = rig.connect_with(&[(RAM_BASE, MEM)]);
    f.requestq().set_spin(true);
    let table = wire::attach_table_selftest(1, 1, wire::TABLE_F_PAGE_REQUESTS, 0, 0);
    assert_eq!(f.request_status(&table).unwrap(), S_OK);
    let dev = rig.endpoint(1)["dev_id"].as_u64().unwrap() as u32;
    f.post_event_buffers(2 * BATCH, 48).unwrap();
    let timeout = Duration::from_secs(10);
    let resp = |g: u16| wire::page_resp(1, 0, 0, g, 0);
    let mut t: Vec<u128> = (0..n)
        .map(|i| {
            let start = Instant::now();
            rig.fd
                .trigger_iopf(dev, 0, i as u32 % 512, READ, 0x1000)
                .unwrap();
            let ev = f.collect_events_upto(1, timeout).unwrap();
            let r = EventRecord::parse(&ev[0].bytes).unwrap();
            assert_eq!(f.request_status(&resp(r.group_id)).unwrap(), S_OK);
            let el = start.elapsed().as_nanos();
            f.post_event_buffers(1, 48).unwrap();
            el
        })
        .collect();
    let pid = rig.backend.pid();
    let (cpu0, own0) = (proc_cpu_ns(pid).unwrap(), thread_cpu_ns());
    let start = Instant::now();
    for _ in 0..rounds {
        for i in 0..BATCH {
            rig.fd.trigger_iopf(dev, 0, i as u32, READ, 0x1000).unwrap();
        }
        let mut evs = Vec::with_capacity(BATCH);
        while evs.len() < BATCH {
            evs.extend(f.collect_events_upto(BATCH - evs.len(), timeout).unwrap());
        }
        let batch: Vec<_> = evs
            .iter()
            .map(|e| resp(EventRecord::parse(&e.bytes).unwrap().group_id))
            .collect();
        for (used, w) in f.submit_batch(&batch).unwrap() {
            assert!(used > 0 && w[0] == S_OK);
        }
        f.post_event_buffers(BATCH, 48).unwrap();
    }
    let rate = (rounds * BATCH) as f64 / start.elapsed().as_secs_f64();
    let faults = (rounds * BATCH) as f64;
    let backend_cpu_ns = (proc_cpu_ns(pid).unwrap() - cpu0) as f64 / faults;
    let driver_cpu_ns = (thread_cpu_ns() - own0) as f64 / faults;
    let s = rig.control.stats().unwrap();
    assert_eq!(s["page_requests_outstanding"], 0, "{s}");
    assert_eq!(
        s["page_requests_completed_by_driver"].as_u64().unwrap(),
        (n + rounds * BATCH) as u64,
        "{s}"
    );
    Ours {
        p50: pct(&mut t, 50),
        p99: pct(&mut t, 99),
        batch_rate: rate,
        backend_cpu_ns,
        driver_cpu_ns,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (n, rounds) = if quick { (100, 10) } else { (400, 40) };
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (mut o50, mut o99, mut ob, mut r50, mut rb, mut f50) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut p50, mut pb) = (vec![], vec![]);
    let (mut bcpu, mut dcpu) = (vec![], vec![]);
    let (mut u50, mut u99, mut ub, mut ucpu) = (vec![], vec![], vec![], vec![]);
    // Interleaved, so that drift in the guest affects all alike.
    for _ in 0..3 {
        let (a, b) = raw(n, rounds);
        r50.push(a);
        rb.push(b);
        f50.push(floor(n));
        let o = ours(n, rounds, &[]);
        o50.push(o.p50);
        o99.push(o.p99);
        ob.push(o.batch_rate);
        bcpu.push(o.backend_cpu_ns);
        dcpu.push(o.driver_cpu_ns);
        // The optional busy-poll of the requestq (--poll-us).
        let o = ours(n, rounds, &["--poll-us", "300"]);
        p50.push(o.p50);
        pb.push(o.batch_rate);
        // The io_uring fault path (--fault-io io-uring).
        let o = ours(n, rounds, &["--fault-io", "io-uring"]);
        u50.push(o.p50);
        u99.push(o.p99);
        ub.push(o.batch_rate);
        ucpu.push(o.backend_cpu_ns);
    }
    let (p50, pb) = (median(&mut p50), median(&mut pb));
    let (o50, o99, ob) = (median(&mut o50), median(&mut o99), median(&mut ob));
    let (r50, rb, f50) = (median(&mut r50), median(&mut rb), median(&mut f50));
    // Where a batched fault's time goes (CPU time, clock-tick granular).
    println!(
        "fault-relay-batch-detail backend_cpu_ns_per_fault={:.0} driver_cpu_ns_per_fault={:.0} \
         wall_ns_per_fault={:.0} raw_ns_per_fault={:.0}",
        median(&mut bcpu),
        median(&mut dcpu),
        1e9 / ob,
        1e9 / rb
    );
    let (u50, ub) = (median(&mut u50), median(&mut ub));
    println!(
        "fault-relay-detail fault_io=io-uring p50_ns={u50:.0} p99_ns={:.0} ratio={:.2} \
         batch_faults_per_s={ub:.0} backend_cpu_ns_per_fault={:.0}",
        median(&mut u99),
        u50 / f50,
        median(&mut ucpu)
    );
    println!(
        "fault-relay-detail poll_us=300 p50_ns={p50:.0} ratio={:.2} batch_faults_per_s={pb:.0}",
        p50 / f50
    );
    println!(
        "fault-relay p50_ns={o50:.0} p99_ns={o99:.0} raw_p50_ns={r50:.0} floor_p50_ns={f50:.0} \
         ratio={:.2} batch_faults_per_s={ob:.0} raw_batch_faults_per_s={rb:.0}",
        o50 / f50
    );
}
