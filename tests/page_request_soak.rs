// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Page-request soak (spec-notes/protocol.md 6.8): at least 100 000 page requests
//! (VIOMMU_SOAK_PAGE_REQUESTS to change it) from virtual endpoints, with
//! random driver delays and answers, `dma` timeouts, detaches and frontend
//! reconnects. Every request is counted and every completion too; none may
//! be missing or doubled. The seed (VIOMMU_SOAK_SEED to replay) and the
//! counts are printed.
// Test code with known small values (sizes, counts, timings): these casts
// cannot truncate or wrap.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::control::error_kind;
use support::mem::TablePages;
use support::wire::{self, S_INVAL, S_OK};
use support::{BackendProcess, ControlClient, Frontend, FrontendOptions, GuestMem};
use vhost_device_iommu::nested::walker::TableBuilder;

const EPS: [u32; 2] = [8, 0x10];
const CLIENTS: usize = 8;
const BUFFERS: usize = 128;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the `dma` clients saw.
#[derive(Default)]
struct Outcomes {
    /// Identity translations: the endpoint was not attached at that moment.
    unattached: AtomicU64,
    fault: AtomicU64,
    failed: AtomicU64,
    timeout: AtomicU64,
    blocked: AtomicU64,
}

fn guest(b: &BackendProcess) -> (Frontend, u64) {
    let mem = Arc::new(GuestMem::default_size().unwrap());
    let mut f = Frontend::connect(&b.socket, mem, FrontendOptions::default()).unwrap();
    let root = TableBuilder::new(48, TablePages(f.mem.clone())).root();
    for (d, &ep) in EPS.iter().enumerate() {
        attach(&mut f, d as u32 + 1, ep, root);
    }
    f.post_event_buffers(BUFFERS, 48).unwrap();
    (f, root)
}

fn attach(f: &mut Frontend, domain: u32, ep: u32, root: u64) {
    let req = wire::attach_table_vtd(domain, ep, wire::TABLE_F_PAGE_REQUESTS, 0, root, 48);
    assert_eq!(f.request_status(&req).unwrap(), S_OK);
}

#[test]
fn every_page_request_completes_exactly_once() {
    let target: u64 = std::env::var("VIOMMU_SOAK_PAGE_REQUESTS")
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(100_000);
    let seed: u64 = std::env::var("VIOMMU_SOAK_SEED")
        .map(|v| v.parse().expect("a number"))
        .unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("page-request soak: seed {seed}, target {target}");
    let b = BackendProcess::spawn(&[
        "--endpoint",
        "8",
        "--endpoint",
        "0x10",
        "--max-page-requests",
        "64",
        "--max-control-clients",
        "32",
    ])
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let out = Arc::new(Outcomes::default());
    let (mut f, mut root) = guest(&b);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (stop, out) = (stop.clone(), out.clone());
            let mut ctl = ControlClient::connect(&b.control).unwrap();
            let mut rng = Rng(seed ^ (0x9e37_79b9 * (i as u64 + 1)));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let ep = EPS[rng.below(2) as usize];
                    let iova = rng.below(1 << 20) << 12;
                    // Some give up quickly: timeouts race the driver.
                    let t = if rng.below(8) == 0 {
                        1 + rng.below(20)
                    } else {
                        5000
                    };
                    let r = ctl
                        .dma(ep, iova, 8, rng.below(2) == 0, None, Some(t))
                        .unwrap();
                    let c = match error_kind(&r) {
                        None => &out.unattached,
                        // Unattached (detach, reconnect): identity, mostly
                        // beyond guest RAM.
                        Some("fault")
                            if r["detail"]
                                .as_str()
                                .is_some_and(|d| d.contains("outside guest RAM")) =>
                        {
                            &out.unattached
                        }
                        Some("fault") => &out.fault,
                        Some("page-request-failed") => &out.failed,
                        Some("timeout") => &out.timeout,
                        Some("blocked") => &out.blocked,
                        Some(k) => panic!("unexpected {k}: {r}"),
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let mut rng = Rng(seed);
    let (mut seen, mut answered_ok, mut success_ok, mut late) = (0u64, 0u64, 0u64, 0u64);
    let (mut detaches, mut reconnects) = (0u64, 0u64);
    let mut held: Vec<(u32, u16, u16)> = Vec::new();
    let start = Instant::now();
    let mut stopping_since: Option<Instant> = None;
    loop {
        let evs = f
            .collect_events_upto(BUFFERS, Duration::from_millis(2))
            .unwrap();
        if !evs.is_empty() {
            f.post_event_buffers(evs.len(), 48).unwrap();
        }
        let mut reqs = Vec::new();
        for e in &evs {
            let Ok(r) = e.record() else { continue };
            if !r.is_page_request() {
                continue;
            }
            seen += 1;
            let code = rng.below(3) as u16;
            if rng.below(4) == 0 && stopping_since.is_none() {
                held.push((r.endpoint, r.group_id, code)); // answer later
            } else {
                reqs.push((r.endpoint, r.group_id, code));
            }
        }
        // Some held answers go now, possibly after their dma timed out.
        if rng.below(3) == 0 || stopping_since.is_some() {
            reqs.append(&mut held);
        }
        if !reqs.is_empty() {
            let batch: Vec<_> = reqs
                .iter()
                .map(|&(ep, g, code)| wire::page_resp(ep, 0, 0, g, code))
                .collect();
            let st = f.submit_batch(&batch).unwrap();
            for (&(_, _, code), (used, w)) in reqs.iter().zip(st) {
                assert!(used > 0);
                match w[0] {
                    S_OK => {
                        answered_ok += 1;
                        if code == 0 {
                            success_ok += 1;
                        }
                    }
                    S_INVAL => late += 1,
                    s => panic!("PAGE_RESP status {s}"),
                }
            }
        }
        if stopping_since.is_none() && seen >= target {
            stop.store(true, Ordering::Relaxed);
            stopping_since = Some(Instant::now());
        }
        if let Some(t) = stopping_since {
            if clients.iter().all(|c| c.is_finished()) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "clients hang");
            continue;
        }
        match rng.below(4000) {
            0..=3 => {
                // Detach and re-attach one endpoint's table.
                let d = rng.below(2) as usize;
                assert_eq!(
                    f.request_status(&wire::detach(d as u32 + 1, EPS[d]))
                        .unwrap(),
                    S_OK
                );
                attach(&mut f, d as u32 + 1, EPS[d], root);
                detaches += 1;
            }
            4 => {
                // The frontend vanishes with groups outstanding.
                held.clear();
                f.disconnect();
                (f, root) = guest(&b);
                reconnects += 1;
            }
            _ => {}
        }
    }
    for c in clients {
        c.join().unwrap();
    }
    let s = ControlClient::connect(&b.control).unwrap().stats().unwrap();
    let n = |k: &str| s[k].as_u64().unwrap();
    let o = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "page-request soak: seed {seed}: {} s, records seen {seen}, raised {}, completed by driver {} \
         (SUCCESS {success_ok}), by device {}, late answers {late}, detaches {detaches}, \
         reconnects {reconnects}; dma fault {} failed {} timeout {} unattached {} blocked {}",
        start.elapsed().as_secs(),
        n("page_requests_raised"),
        n("page_requests_completed_by_driver"),
        n("page_requests_completed_by_device"),
        o(&out.fault),
        o(&out.failed),
        o(&out.timeout),
        o(&out.unattached),
        o(&out.blocked),
    );
    assert!(seen >= target);
    assert_eq!(n("page_requests_outstanding"), 0, "{s}");
    // Every group ended once: by the driver or by the device.
    assert_eq!(
        n("page_requests_raised"),
        n("page_requests_completed_by_driver") + n("page_requests_completed_by_device"),
        "{s}"
    );
    assert_eq!(n("page_requests_completed_by_kernel"), 0);
    assert_eq!(n("page_requests_completed_by_driver"), answered_ok, "{s}");
    // Each OK answer completed one group; a SUCCESS sent the dma walking
    // again: nothing is mapped, so a fault, unless a detach or reconnect
    // came first (then it translates unattached).
    assert!(o(&out.fault) <= success_ok, "{s}");
    assert!(success_ok - o(&out.fault) <= o(&out.unattached), "{s}");
    // Every raised group had one waiting dma, which ended one way: the
    // driver's SUCCESS (then ok or fault), its INVALID/FAILURE or the
    // device's completion (page-request-failed), or a timeout.
    assert_eq!(
        n("page_requests_raised"),
        success_ok + o(&out.failed) + o(&out.timeout),
        "{s}"
    );
    assert!(n("page_requests_raised") >= seen);
}
