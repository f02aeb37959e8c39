// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Nested-translation benchmark.
//!
//! - attach_ns: one ATTACH_TABLE round trip through our device (request
//!   posted, backend woken, reply seen) that moves a selftest endpoint to a
//!   new table domain: HWPT_ALLOC of a nested HWPT on the nesting parent,
//!   MOCK_DOMAIN_REPLACE, and IOMMU_DESTROY of the table left behind.
//! - invalidate_ns: one INVALIDATE (domain scope) round trip, which is one
//!   IOMMU_HWPT_INVALIDATE on the domain's nested HWPT.
//! - walks_per_s: the software walker translating random 4 KiB pages of a
//!   4-level VT-d table in guest memory (virtual endpoints), in-process.
//!
//! The first two need /dev/iommu with CONFIG_IOMMUFD_TEST, so
//! `tests/vm/kernel-tier.sh` runs this inside the test guest:
//!
//!   VIOMMU_BIN=/bin/vhost-device-iommu /bin/nested [--quick]
//!
//! and it prints `nested attach_ns=<n> invalidate_ns=<n> walks_per_s=<n>`
//! (medians of three runs). Elsewhere (`cargo bench --features selftest
//! --bench nested`) it prints the walker figure and says the kernel part
//! was SKIPPED.
// Test code with known small values (sizes, counts, timings): these casts
// cannot truncate or wrap.
#![allow(clippy::cast_possible_truncation)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::host::spawn_sharing_iommufd;
use support::wire::{self, Invalidate, S_NOENT, S_OK};
use support::{Frontend, FrontendOptions, GuestMem};
use vhost_device_iommu::iommufd_bridge::ids::NestId;
use vhost_device_iommu::iommufd_bridge::sys::{
    Iommufd, HWPT_ALLOC_NEST_PARENT, HWPT_DATA_SELFTEST, INVALIDATE_DATA_SELFTEST,
};
use vhost_device_iommu::nested::walker::{walk, MmapTableMemory, TableBuilder, PAGE_4K};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const RAM_BASE: u64 = 1 << 24;
const MEM: usize = 16 << 20;

/// Median wall time of `n` single requests made by `req(i)`, each
/// answered with `want`.
fn latency<R: AsRef<[u8]>>(
    f: &mut Frontend,
    n: usize,
    want: u8,
    req: impl Fn(usize) -> (R, u32),
) -> f64 {
    let mut t: Vec<u128> = (0..n)
        .map(|i| {
            let r = req(i);
            let start = Instant::now();
            let st = f.request_status(&r).unwrap();
            assert_eq!(st, want, "request {i}, type {:?}", r.0.as_ref().first());
            start.elapsed().as_nanos()
        })
        .collect();
    t.sort_unstable();
    t[n / 2] as f64
}

fn median(v: &mut [u128]) -> f64 {
    v.sort_unstable();
    v[v.len() / 2] as f64
}

/// The same kernel work without our device, from one thread: (attach_ns,
/// invalidate_ns) for HWPT_ALLOC + MOCK_DOMAIN_REPLACE + IOMMU_DESTROY, and
/// for one IOMMU_HWPT_INVALIDATE.
fn raw(n: usize) -> (f64, f64) {
    let fd = Iommufd::open("/dev/iommu".as_ref()).expect("/dev/iommu");
    let ioas = fd.ioas_alloc().unwrap();
    let dev = fd.mock_domain(ioas).unwrap();
    let parent = fd
        .hwpt_alloc(dev.dev_id, ioas, HWPT_ALLOC_NEST_PARENT, 0, &mut [], None)
        .unwrap();
    fd.mock_domain_replace(dev.stdev_id, parent).unwrap();
    let mut cur = parent;
    let mut attach: Vec<u128> = (0..n)
        .map(|i| {
            let start = Instant::now();
            let mut data = (i as u32).to_le_bytes();
            let h = fd
                .hwpt_alloc(dev.dev_id, parent, 0, HWPT_DATA_SELFTEST, &mut data, None)
                .unwrap();
            fd.mock_domain_replace(dev.stdev_id, h).unwrap();
            if cur != parent {
                fd.destroy(cur).unwrap();
            }
            cur = h;
            start.elapsed().as_nanos()
        })
        .collect();
    let mut inv: Vec<u128> = (0..n)
        .map(|_| {
            // struct iommu_hwpt_invalidate_selftest {flags = ALL, iotlb_id}.
            let mut entry = [1u8, 0, 0, 0, 0, 0, 0, 0];
            let start = Instant::now();
            fd.hwpt_invalidate(NestId::Hwpt(cur), INVALIDATE_DATA_SELFTEST, 8, &mut entry)
                .unwrap();
            start.elapsed().as_nanos()
        })
        .collect();
    fd.mock_domain_replace(dev.stdev_id, ioas).unwrap();
    fd.destroy(cur).unwrap();
    fd.destroy(parent).unwrap();
    fd.destroy(dev.stdev_id).unwrap();
    fd.destroy(ioas).unwrap();
    (median(&mut attach), median(&mut inv))
}

/// (attach_ns, invalidate_ns, request_rtt_ns) through the backend on the
/// real kernel; the last is a request refused before any host work
/// (INVALIDATE of an unknown domain): the round trip alone.
fn kernel(n: usize) -> (f64, f64, f64) {
    let fd = Iommufd::open("/dev/iommu".as_ref()).expect("/dev/iommu");
    let b = spawn_sharing_iommufd(&fd, &["--endpoint", "1,selftest"]).expect("backend starts");
    let mem = Arc::new(GuestMem::with_regions(&[(RAM_BASE, MEM)]).expect("guest memory"));
    let mut f = Frontend::connect(&b.socket, mem, FrontendOptions::default()).expect("frontend");
    // Alternate between two domains: each attach makes a new nested HWPT
    // and destroys the one the endpoint leaves.
    let attach = latency(&mut f, n, S_OK, |i| {
        wire::attach_table_selftest(1 + (i % 2) as u32, 1, 0, 0, i as u32)
    });
    // The domain the last attach (i = n - 1) left the endpoint in.
    let domain = 1 + ((n - 1) % 2) as u32;
    let inv = Invalidate {
        scope: wire::INV_SCOPE_DOMAIN,
        caches: wire::INV_CACHE_TLB,
        domain,
        ..Default::default()
    };
    let invalidate = latency(&mut f, n, S_OK, |_| wire::invalidate(&inv));
    let unknown = Invalidate { domain: 999, ..inv };
    let rtt = latency(&mut f, n, S_NOENT, |_| wire::invalidate(&unknown));
    (attach, invalidate, rtt)
}

/// Walker translations per second over `pages` random 4 KiB pages.
fn walks_per_s(pages: usize, walks: usize) -> f64 {
    let size = 64 << 20;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    let mut t = TableBuilder::new(48, MmapTableMemory::new(&mem, 32 << 20, size as u64));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let iovas: Vec<u64> = (0..pages)
        .map(|i| {
            let iova = (next() & ((1 << 47) - 1)) & !(PAGE_4K - 1);
            t.map(iova, (i as u64 % 4096) * PAGE_4K, PAGE_4K, true);
            iova
        })
        .collect();
    let root = t.root();
    let start = Instant::now();
    let mut sum = 0u64;
    for i in 0..walks {
        let iova = iovas[i % pages] + (i as u64 & 0xff8);
        sum = sum.wrapping_add(walk(&mem, root, 48, iova, i & 1 == 0, true).unwrap().gpa);
    }
    let el = start.elapsed();
    std::hint::black_box(sum);
    walks as f64 / el.as_secs_f64().max(1e-9)
}

fn median_f(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (n, walks) = if quick {
        (50, 100_000)
    } else {
        (400, 1_000_000)
    };
    let mut w: Vec<f64> = (0..3).map(|_| walks_per_s(2048, walks)).collect();
    let w = median_f(&mut w);
    let selftest_kernel = Iommufd::open("/dev/iommu".as_ref())
        .map(|fd| fd.features().selftest)
        .unwrap_or(false);
    if !selftest_kernel {
        println!("nested-walk walks_per_s={w:.0}");
        println!(
            "nested: attach/invalidate SKIPPED (no /dev/iommu with CONFIG_IOMMUFD_TEST; \
             the kernel tier runs them)"
        );
        return;
    }
    let (mut a, mut i, mut rt, mut ra, mut ri) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Interleaved, so that drift in the guest affects both alike.
    for _ in 0..3 {
        let (x, y) = raw(n);
        ra.push(x);
        ri.push(y);
        let (x, y, z) = kernel(n);
        a.push(x);
        i.push(y);
        rt.push(z);
        std::thread::sleep(Duration::from_millis(10));
    }
    // Where the time goes: the kernel's own work and a bare round trip.
    println!(
        "nested-detail raw_attach_ns={:.0} raw_invalidate_ns={:.0} request_rtt_ns={:.0}",
        median_f(&mut ra),
        median_f(&mut ri),
        median_f(&mut rt)
    );
    println!(
        "nested attach_ns={:.0} invalidate_ns={:.0} walks_per_s={w:.0}",
        median_f(&mut a),
        median_f(&mut i)
    );
}
