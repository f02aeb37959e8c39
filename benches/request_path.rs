// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Request-path benchmark: MAP+UNMAP pairs through the real binary over the
//! vhost-user socket, with 1, 10^3 and 10^6 mappings already in the domain.
//!
//!   cargo bench --bench request_path            # all sizes
//!   cargo bench --bench request_path -- --quick # 1 and 10^3, fewer rounds
//!
//! Prints one line per size and, for 10^6, the summary line
//! `request-path rps=<n> p50_ns=<n> p99_ns=<n> bytes_per_mapping=<n>`.
//! Throughput: 256 requests per notification (one indirect descriptor each,
//! as Linux's driver sends them), queue size 256. Latency: one request per
//! notification, from adding it to seeing it used. RSS: the backend's VmRSS
//! growth while the mappings are added, divided by their number.
//! Then `request-path-polled p50_ns=<n> p99_ns=<n>`: single requests with
//! the backend polling (`--poll-us`) and the driver spinning, no wakeups.
//! Last, the costs that do not depend on the machine (spec-notes/
//! benchmarks.md): `request-cost instructions_per_request=<n>
//! syscalls_per_request=<x>`, a `request-cost-detail` line and a
//! `request-cost-crates` line (self instructions per request by crate), for
//! MAP+UNMAP pairs, 256 requests per notification, 10^3 mappings
//! (`-- --cost`: only these).
// Test code with known small values (sizes, counts, timings): these casts
// cannot truncate or wrap.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::cost;
use support::process::proc_cpu_ns;
use support::virtq::BatchReplies;
use support::wire::{self, S_OK};
use support::{BackendProcess, Frontend, FrontendOptions, GuestMem};

const BATCH: usize = 256;
const RW: u32 = wire::MAP_F_READ | wire::MAP_F_WRITE;
const TIMEOUT: Duration = Duration::from_secs(30);

struct Figures {
    rps: u64,
    rps_per_core: u64,
    p50_ns: u64,
    p99_ns: u64,
    bytes_per_mapping: u64,
}

/// Prefilled mappings sit on even 4 KiB pages; the measured pairs use odd
/// ones. Everything is above 4 GiB, clear of the reserved MSI window.
const BASE: u64 = 1 << 32;

fn even_page(i: u64) -> u64 {
    BASE + i * 0x2000
}

fn odd_page(i: u64) -> u64 {
    BASE + i * 0x2000 + 0x1000
}

fn check(out: &BatchReplies, what: &str) {
    for i in 0..out.len() {
        assert_eq!(out.status(i), Some(S_OK), "{what}: request {i} failed");
    }
}

fn run(existing: u64, rounds: usize, samples: usize) -> Figures {
    let b = BackendProcess::spawn(&[
        "--endpoint",
        "1",
        "--max-mappings",
        "2000000",
        "--max-total-mappings",
        "2000000",
    ])
    .expect("backend starts");
    let mem = Arc::new(GuestMem::new(64 << 20).expect("guest memory"));
    let mut opts = FrontendOptions::default().queue_size(BATCH as u16);
    opts.queue.batch_indirect = true;
    let mut f = Frontend::connect(&b.socket, mem, opts).expect("frontend");
    assert_eq!(f.request_status(&wire::attach(1, 1, 0, 0)).unwrap(), S_OK);
    let q = f.requestq();
    let mut out = BatchReplies::default();

    // Requests are built once and rewritten in place: no allocation per round.
    let mut reqs: Vec<(Vec<u8>, u32)> = Vec::with_capacity(BATCH);
    let rss0 = b.rss_kib().unwrap();
    let mut next = 0u64;
    while next < existing {
        reqs.clear();
        while reqs.len() < BATCH && next < existing {
            let iova = even_page(next);
            reqs.push((wire::map(1, iova, iova + 0xfff, iova, RW).0.to_vec(), 4));
            next += 1;
        }
        q.submit_batch_into(&reqs, &mut out, TIMEOUT).unwrap();
        check(&out, "prefill");
    }
    let rss1 = b.rss_kib().unwrap();
    let bytes_per_mapping = (rss1.saturating_sub(rss0) * 1024) / existing.max(1);

    // Throughput: 128 MAP+UNMAP pairs per notification, spread over the
    // whole populated range so lookups really walk the tree.
    reqs.clear();
    for i in 0..BATCH / 2 {
        let iova = odd_page(i as u64);
        reqs.push((wire::map(1, iova, iova + 0xfff, iova, RW).0.to_vec(), 4));
        reqs.push((wire::unmap(1, iova, iova + 0xfff).0.to_vec(), 4));
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let span = existing.max(1);
    let cpu0 = proc_cpu_ns(b.pid()).unwrap();
    let start = Instant::now();
    for _ in 0..rounds {
        for pair in reqs.chunks_mut(2) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let iova = odd_page(seed % span);
            pair[0].0[8..16].copy_from_slice(&iova.to_le_bytes());
            pair[0].0[16..24].copy_from_slice(&(iova + 0xfff).to_le_bytes());
            pair[0].0[24..32].copy_from_slice(&iova.to_le_bytes());
            pair[1].0[8..16].copy_from_slice(&iova.to_le_bytes());
            pair[1].0[16..24].copy_from_slice(&(iova + 0xfff).to_le_bytes());
        }
        q.submit_batch_into(&reqs, &mut out, TIMEOUT).unwrap();
        check(&out, "pairs");
    }
    let elapsed = start.elapsed();
    let cpu = proc_cpu_ns(b.pid()).unwrap() - cpu0;
    let rps = (rounds * BATCH) as f64 / elapsed.as_secs_f64();
    // Requests per second of backend CPU: what one core would sustain.
    let rps_per_core = (rounds * BATCH) as f64 / (cpu.max(1) as f64 / 1e9);

    // Latency: one request per notification, alternating MAP and UNMAP.
    let iova = odd_page(span / 2);
    let one = [
        (wire::map(1, iova, iova + 0xfff, iova, RW).0.to_vec(), 4u32),
        (wire::unmap(1, iova, iova + 0xfff).0.to_vec(), 4u32),
    ];
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples {
        let r = &one[i % 2..i % 2 + 1];
        let t = Instant::now();
        q.submit_batch_into(r, &mut out, TIMEOUT).unwrap();
        lat.push(t.elapsed().as_nanos() as u64);
        check(&out, "single");
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Figures {
        rps: rps as u64,
        rps_per_core: rps_per_core as u64,
        p50_ns: pct(0.50),
        p99_ns: pct(0.99),
        bytes_per_mapping,
    }
}

/// Single-request latency with the backend busy-polling (`--poll-us`) and
/// the driver spinning on the used ring, as Linux's driver does: no wakeup
/// on either side, so this is the device's own service time plus the
/// cache-line transfers between the two cores.
fn polled(samples: usize) -> (u64, u64) {
    let b =
        BackendProcess::spawn(&["--endpoint", "1", "--poll-us", "100000"]).expect("backend starts");
    let mem = Arc::new(GuestMem::new(64 << 20).expect("guest memory"));
    let mut f = Frontend::connect(&b.socket, mem, FrontendOptions::default()).expect("frontend");
    assert_eq!(f.request_status(&wire::attach(1, 1, 0, 0)).unwrap(), S_OK);
    let q = f.requestq();
    q.set_spin(true);
    let mut out = BatchReplies::default();
    let iova = odd_page(7);
    let one = [
        (wire::map(1, iova, iova + 0xfff, iova, RW).0.to_vec(), 4u32),
        (wire::unmap(1, iova, iova + 0xfff).0.to_vec(), 4u32),
    ];
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples + 200 {
        let r = &one[i % 2..i % 2 + 1];
        let t = Instant::now();
        q.submit_batch_into(r, &mut out, TIMEOUT).unwrap();
        // The first 200 warm the caches and start the poller.
        if i >= 200 {
            lat.push(t.elapsed().as_nanos() as u64);
        }
        check(&out, "polled");
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    (pct(0.50), pct(0.99))
}

/// The request-cost workload: the backend `b`, one virtual endpoint
/// attached, 10^3 mappings, then rounds of 256 requests per notification
/// (128 MAP+UNMAP pairs at pseudo-random free pages, fixed seed).
struct CostRig {
    b: BackendProcess,
    f: Frontend,
    reqs: Vec<(Vec<u8>, u32)>,
    out: BatchReplies,
    seed: u64,
}

/// Mappings in the domain while the pairs are measured.
const COST_MAPPINGS: u64 = 1_000;
/// Rounds before anything is counted (caches, allocator, first-use paths).
const COST_WARMUP: usize = 4;
/// N of the difference method: 8 rounds of 256 requests (and then 16).
const COST_ROUNDS: usize = 8;

impl CostRig {
    fn new(b: BackendProcess) -> CostRig {
        let mem = Arc::new(GuestMem::new(64 << 20).expect("guest memory"));
        let mut opts = FrontendOptions::default().queue_size(BATCH as u16);
        opts.queue.batch_indirect = true;
        let mut f = Frontend::connect(&b.socket, mem, opts).expect("frontend");
        f.requestq().set_eager_used_event(true);
        assert_eq!(f.request_status(&wire::attach(1, 1, 0, 0)).unwrap(), S_OK);
        let mut rig = CostRig {
            b,
            f,
            reqs: Vec::with_capacity(BATCH),
            out: BatchReplies::default(),
            seed: 0x9e37_79b9_7f4a_7c15,
        };
        let mut next = 0u64;
        while next < COST_MAPPINGS {
            rig.reqs.clear();
            while rig.reqs.len() < BATCH && next < COST_MAPPINGS {
                let iova = even_page(next);
                rig.reqs
                    .push((wire::map(1, iova, iova + 0xfff, iova, RW).0.to_vec(), 4));
                next += 1;
            }
            let q = rig.f.requestq();
            q.submit_batch_into(&rig.reqs, &mut rig.out, TIMEOUT)
                .unwrap();
            check(&rig.out, "prefill");
        }
        rig.reqs.clear();
        for i in 0..BATCH / 2 {
            let iova = odd_page(i as u64);
            rig.reqs
                .push((wire::map(1, iova, iova + 0xfff, iova, RW).0.to_vec(), 4));
            rig.reqs
                .push((wire::unmap(1, iova, iova + 0xfff).0.to_vec(), 4));
        }
        rig.rounds(COST_WARMUP);
        rig
    }

    /// The worker idle, the start or end of the counted window.
    fn mark(&self) {
        let pid = self.b.pid();
        let workers: Vec<u32> = cost::workers(pid).unwrap().iter().map(|t| t.0).collect();
        cost::wait_idle(pid, &workers).unwrap();
        cost::mark(&self.b).expect("mark");
    }

    fn rounds(&mut self, n: usize) {
        let pid = self.b.pid();
        let workers: Vec<u32> = cost::workers(pid).unwrap().iter().map(|t| t.0).collect();
        for _ in 0..n {
            // The worker is asleep: each notification starts one pass.
            cost::wait_idle(pid, &workers).unwrap();
            for pair in self.reqs.chunks_mut(2) {
                self.seed ^= self.seed << 13;
                self.seed ^= self.seed >> 7;
                self.seed ^= self.seed << 17;
                let iova = odd_page(self.seed % COST_MAPPINGS);
                pair[0].0[8..16].copy_from_slice(&iova.to_le_bytes());
                pair[0].0[16..24].copy_from_slice(&(iova + 0xfff).to_le_bytes());
                pair[0].0[24..32].copy_from_slice(&iova.to_le_bytes());
                pair[1].0[8..16].copy_from_slice(&iova.to_le_bytes());
                pair[1].0[16..24].copy_from_slice(&(iova + 0xfff).to_le_bytes());
            }
            let q = self.f.requestq();
            q.submit_batch_into(&self.reqs, &mut self.out, TIMEOUT)
                .unwrap();
            check(&self.out, "pairs");
        }
    }
}

/// `request-cost instructions_per_request=<n> syscalls_per_request=<x>`:
/// the backend's user-space instructions (callgrind, all its threads) and
/// system calls (strace, all its threads) per request, by the difference
/// of 2N and N rounds (spec-notes/benchmarks.md).
fn request_cost(rounds: usize) {
    if let Some(why) = cost::missing_tools() {
        println!("request-cost: SKIPPED ({why})");
        eprintln!("request-cost: SKIPPED ({why})");
        return;
    }
    let args = ["--endpoint", "1"];
    let per = (rounds * BATCH) as u64;
    // Instructions and system calls: one process under callgrind per N,
    // every thread of the backend.
    let run = |n: usize| {
        let mut rig = CostRig::new(cost::spawn_callgrind(&args).expect("backend under callgrind"));
        // System calls are counted between the marks (the instructions by
        // the difference of the two runs).
        rig.mark();
        rig.rounds(n);
        rig.mark();
        // Stopped while connected: no thread ends in the counted runs.
        let CostRig { b, f, .. } = rig;
        let run = cost::finish_callgrind(b).expect("callgrind profiles");
        drop(f);
        run
    };
    let (r1, r2) = (run(rounds), run(2 * rounds));
    // Every thread but the marks' control clients.
    let all: Vec<cost::Role> = r2
        .profiles
        .keys()
        .copied()
        .filter(|r| *r != cost::Role::ControlClient)
        .collect();
    let (one, two) = (r1.profile(&all), r2.profile(&all));
    let instr = (two.total as f64 - one.total as f64) / per as f64;
    let (s1, s2) = (r1.syscalls(&all, false), r2.syscalls(&all, false));
    let sys = (s2.total as f64 - s1.total as f64) / per as f64;
    // Cross-check: strace on the native backend (seccomp on), all threads.
    let mut rig = CostRig::new(BackendProcess::spawn(&args).expect("backend starts"));
    let tids: Vec<u32> = cost::threads(rig.b.pid())
        .unwrap()
        .iter()
        .map(|t| t.0)
        .collect();
    let dir = rig.b.dir.clone();
    let native = cost::strace_per_op(&dir, &tids, rounds, per, |n| rig.rounds(n));
    println!("request-cost instructions_per_request={instr:.0} syscalls_per_request={sys:.4}");
    println!(
        "request-cost-detail requests={per} instructions_by_thread=[{}] syscalls=[{}] \
         strace_native_syscalls_per_request={native} top5_self=[{}]",
        cost::format_roles(&r1.profiles, &r2.profiles, per),
        cost::format_syscalls(&s1, &s2, per),
        cost::format_top(&cost::top_diff(&one, &two, per, 5)),
    );
    // Self instructions per request by crate (spec-notes/benchmarks.md:
    // what the crates of the field cost us, for the upstream proposals).
    println!(
        "request-cost-crates {}",
        cost::format_crates(&cost::crates_diff(&one, &two, per))
    );
}

fn main() {
    // `cargo bench` passes `--bench`; our own flag is --quick.
    let quick = std::env::args().any(|a| a == "--quick");
    // `--cost`: only the instruction and system-call counts.
    if std::env::args().any(|a| a == "--cost") {
        request_cost(COST_ROUNDS);
        return;
    }
    let sizes: &[u64] = if quick {
        &[1, 1_000]
    } else {
        &[1, 1_000, 1_000_000]
    };
    let (rounds, samples) = if quick { (400, 2_000) } else { (4_000, 20_000) };
    for &n in sizes {
        let f = run(n, rounds, samples);
        println!(
            "request-path mappings={n} rps={} rps_per_backend_core={} p50_ns={} p99_ns={} bytes_per_mapping={}",
            f.rps, f.rps_per_core, f.p50_ns, f.p99_ns, f.bytes_per_mapping
        );
        if n == 1_000_000 {
            println!(
                "request-path rps={} p50_ns={} p99_ns={} bytes_per_mapping={}",
                f.rps, f.p50_ns, f.p99_ns, f.bytes_per_mapping
            );
        }
    }
    let (p50, p99) = polled(samples);
    println!("request-path-polled p50_ns={p50} p99_ns={p99}");
    request_cost(COST_ROUNDS);
}
