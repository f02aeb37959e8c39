// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! IOAS-path benchmark (kernel tier): MAP+UNMAP pairs through our device to
//! a selftest endpoint, against the same IOAS ioctls issued directly.
//!
//! Needs /dev/iommu with CONFIG_IOMMUFD_TEST, so `tests/vm/kernel-tier.sh`
//! builds it (`cargo bench --features selftest --bench ioas_path --no-run`)
//! and runs it inside the test guest:
//!
//!   VIOMMU_BIN=/bin/vhost-device-iommu /bin/ioas_path [--quick]
//!
//! ours: 256 requests per notification (128 MAP+UNMAP pairs of 4 KiB, one
//! indirect descriptor each, as Linux's driver sends them), wall time per
//! request. Every MAP is an IOAS_COPY from the guest-RAM IOAS into the
//! domain's IOAS and every UNMAP an IOAS_UNMAP, made by the backend.
//! raw: the same two ioctls on the same kind of objects (a RAM IOAS pinned
//! by a mock device, a domain IOAS with its own mock device), from one
//! thread with nothing else: the floor any implementation pays.
//! Prints `ioas-path ours_ns=<n> raw_ns=<n> ratio=<x>`.
// Test code with known small values (sizes, counts, timings): these casts
// cannot truncate or wrap.
#![allow(clippy::cast_possible_truncation)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::host::spawn_sharing_iommufd;
use support::process::proc_cpu_ns;
use support::virtq::BatchReplies;
use support::wire::{self, S_OK};
use support::{Frontend, FrontendOptions, GuestMem};
use vhost_device_iommu::iommufd_bridge::sys::{Iommufd, IOAS_MAP_READABLE, IOAS_MAP_WRITEABLE};

const BATCH: usize = 256;
const RW: u32 = wire::MAP_F_READ | wire::MAP_F_WRITE;
const MEM: usize = 16 << 20;
const TIMEOUT: Duration = Duration::from_secs(60);
/// Inside the mock's IOVA aperture [16 MiB, 2 GiB).
const IOVA: u64 = 0x4000_0000;
/// Guest RAM inside the aperture too (bypass reaches it at IOVA = GPA).
const RAM_BASE: u64 = 0x100_0000;

/// Wall time per request, and the backend's CPU time (user + system,
/// the ioctls included) per request.
fn ours(rounds: usize, extra: &[&str]) -> (f64, f64) {
    let fd = Iommufd::open("/dev/iommu".as_ref()).expect("/dev/iommu");
    let mut args = vec!["--endpoint", "1,selftest"];
    args.extend_from_slice(extra);
    let b = spawn_sharing_iommufd(&fd, &args).expect("backend starts");
    let mem = Arc::new(GuestMem::with_regions(&[(RAM_BASE, MEM)]).expect("guest memory"));
    let mut opts = FrontendOptions::default().queue_size(BATCH as u16);
    opts.queue.batch_indirect = true;
    let mut f = Frontend::connect(&b.socket, mem, opts).expect("frontend");
    assert_eq!(f.request_status(&wire::attach(1, 1, 0, 0)).unwrap(), S_OK);
    let mut reqs: Vec<(Vec<u8>, u32)> = Vec::with_capacity(BATCH);
    for i in 0..(BATCH / 2) as u64 {
        let iova = IOVA + i * 0x1000;
        let gpa = RAM_BASE + i * 0x1000;
        reqs.push((wire::map(1, iova, iova + 0xfff, gpa, RW).0.to_vec(), 4));
        reqs.push((wire::unmap(1, iova, iova + 0xfff).0.to_vec(), 4));
    }
    let q = f.requestq();
    let mut out = BatchReplies::default();
    let mut run = |n: usize| {
        for _ in 0..n {
            q.submit_batch_into(&reqs, &mut out, TIMEOUT).unwrap();
            for i in 0..out.len() {
                assert_eq!(out.status(i), Some(S_OK), "request {i}");
            }
        }
    };
    run(2);
    let cpu0 = proc_cpu_ns(b.pid()).unwrap();
    let t = Instant::now();
    run(rounds);
    let n = (rounds * BATCH) as f64;
    let wall = t.elapsed().as_nanos() as f64 / n;
    let cpu = (proc_cpu_ns(b.pid()).unwrap() - cpu0) as f64 / n;
    (wall, cpu)
}

fn raw(rounds: usize) -> f64 {
    let fd = Iommufd::open("/dev/iommu".as_ref()).expect("/dev/iommu");
    let mem = GuestMem::with_regions(&[(RAM_BASE, MEM)]).expect("guest memory");
    let ram = fd.ioas_alloc().unwrap();
    let flags = IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE;
    fd.ioas_map(ram, mem.uva(RAM_BASE).unwrap(), MEM as u64, RAM_BASE, flags)
        .unwrap();
    // A device on each IOAS, as in the backend: RAM pinned, domain HWPT.
    let _ram_dev = fd.mock_domain(ram).unwrap();
    let dom = fd.ioas_alloc().unwrap();
    let _dom_dev = fd.mock_domain(dom).unwrap();
    let run = |n: usize| {
        for _ in 0..n {
            for i in 0..(BATCH / 2) as u64 {
                let iova = IOVA + i * 0x1000;
                fd.ioas_copy(dom, iova, ram, RAM_BASE + i * 0x1000, 0x1000, flags)
                    .unwrap();
                fd.ioas_unmap(dom, iova, 0x1000).unwrap();
            }
        }
    };
    run(2);
    let t = Instant::now();
    run(rounds);
    t.elapsed().as_nanos() as f64 / (rounds * BATCH) as f64
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = match std::env::var("VIOMMU_BENCH_ROUNDS") {
        Ok(v) => v.parse().expect("VIOMMU_BENCH_ROUNDS is a number"),
        Err(_) if quick => 20,
        Err(_) => 100,
    };
    // Interleave the two so that drift in the guest affects both alike.
    let (mut o, mut c, mut r) = (Vec::new(), Vec::new(), Vec::new());
    let mut unfiltered = Vec::new();
    for _ in 0..3 {
        r.push(raw(rounds));
        let (wall, cpu) = ours(rounds, &[]);
        o.push(wall);
        c.push(cpu);
        // What the seccomp filters (on by default) cost per request.
        unfiltered.push(ours(rounds, &["--seccomp", "off"]).0);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (o, c, r) = (median(&mut o), median(&mut c), median(&mut r));
    let unfiltered = median(&mut unfiltered);
    // Where the time goes: the backend's own CPU per request (its ioctls
    // included) against the wall time, which also holds the test
    // frontend's work and the wakeups.
    println!(
        "ioas-path-detail ours_wall_ns={o:.0} ours_backend_cpu_ns={c:.0} raw_ns={r:.0} \
         seccomp_off_wall_ns={unfiltered:.0}"
    );
    println!(
        "ioas-path ours_ns={:.0} raw_ns={:.0} ratio={:.2}",
        o,
        r,
        o / r
    );
}
