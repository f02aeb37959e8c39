// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fault-relay cost: the backend's user-space instructions (callgrind) and
//! system calls (strace) per page request relayed end to end, in steady
//! state, on the native socket tier (no /dev/iommu needed).
//!
//!   cargo bench --bench fault_cost -- --quick
//!
//! Prints, for one fault at a time and for batches of 64,
//! `fault-cost instructions_per_fault=<n> syscalls_per_fault=<x> batch=<n>`
//! (then the same with ` fault_io=io-uring` for `--fault-io io-uring`)
//! and a `fault-cost-detail` line (per thread, per system call, and the
//! five functions with the most self instructions per fault).
//!
//! The source: a virtual endpoint's fault FD, the pipe the backend's eventq
//! worker reads exactly like the kernel's fault FD (40-byte
//! `iommu_hwpt_pgfault` records, whole-group reads, the same relay code).
//! Each page request is a control-socket `dma` that misses in a guest table
//! attached with PAGE_REQUESTS: the backend's control-client thread writes
//! the record to the pipe and waits; the eventq worker (`viommu-evtq`)
//! reads it and writes the record into an eventq buffer; the test driver
//! answers PAGE_RESP (INVALID: nothing to fix, so the `dma` ends without a
//! second walk); the requestq worker (`viommu-reqq`) hands the response
//! back to the source. The control-client thread plays the kernel: its
//! JSON parsing, walk and socket I/O are not counted; the relay is the two
//! queue workers, and only they are counted (callgrind per thread, strace
//! attached to those two threads only).
//!
//! Batches: 64 control clients each send one `dma`, the driver collects
//! the 64 records, answers them in one notification of 64 PAGE_RESPs, and
//! reposts 64 event buffers with one kick.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::control::error_kind;
use support::cost::{self, Role};
use support::mem::TablePages;
use support::wire::{self, EventRecord, S_OK};
use support::{BackendProcess, ControlClient, Frontend, FrontendOptions, GuestMem};
use vhost_device_iommu::nested::walker::TableBuilder;

const EP: u32 = 8;
const TIMEOUT: Duration = Duration::from_secs(60);
/// PAGE_RESP's INVALID.
const INVALID: u16 = 1;
/// Where the page requests land (nothing is mapped in the guest table).
const IOVA: u64 = 0x40_0000;

/// The backend with one virtual endpoint, a guest table attached with
/// PAGE_REQUESTS, event buffers posted, and `batch` control clients.
struct FaultRig {
    b: BackendProcess,
    f: Frontend,
    ctl: Vec<ControlClient>,
    // Owns the guest table's pages for the rig's lifetime.
    _table: TableBuilder<TablePages>,
    batch: usize,
    lines: Vec<String>,
    /// The queue workers' thread ids: requestq, eventq (`EVTQ`).
    workers: Vec<u32>,
    /// The fault FD, to see the batch's records arrive.
    pipe: Option<cost::FaultPipe>,
    /// Hold the eventq worker while a batch is raised, and the control
    /// clients while their page requests are answered.
    gate: bool,
    /// The backend's control-client threads (one per `ctl`).
    clients: Vec<u32>,
}

const EVTQ: usize = 1;
/// struct iommu_hwpt_pgfault.
const RECORD: usize = 40;

/// `--fault-io`: epoll, the default, and io-uring.
const MODES: [&str; 2] = ["epoll", "io-uring"];

fn backend_args(mode: &'static str) -> [&'static str; 6] {
    [
        "--endpoint",
        "8",
        "--max-control-clients",
        "65",
        "--fault-io",
        mode,
    ]
}

impl FaultRig {
    fn new(b: BackendProcess, batch: usize, warmup: usize, gate: bool) -> FaultRig {
        let pid = b.pid();
        let mem = Arc::new(GuestMem::default_size().expect("guest memory"));
        let mut f =
            Frontend::connect(&b.socket, mem, FrontendOptions::default()).expect("frontend");
        f.requestq().set_eager_used_event(true);
        f.eventq().set_eager_used_event(true);
        let table = TableBuilder::new(48, TablePages(f.mem.clone()));
        let req = wire::attach_table_vtd(1, EP, wire::TABLE_F_PAGE_REQUESTS, 0, table.root(), 48);
        assert_eq!(f.request_status(&req).unwrap(), S_OK);
        f.post_event_buffers(batch, 48).unwrap();
        let ctl = (0..batch)
            .map(|_| {
                ControlClient::connect_timeout(&b.control, TIMEOUT, TIMEOUT)
                    .expect("control socket")
            })
            .collect();
        let lines = (0..batch)
            .map(|i| {
                json!({"op": "dma", "endpoint": EP, "iova": IOVA + i as u64 * 0x1000,
                       "len": 8, "write": false, "timeout_ms": 600_000})
                .to_string()
            })
            .collect();
        let mut rig = FaultRig {
            b,
            f,
            ctl,
            _table: table,
            batch,
            lines,
            workers: Vec::new(),
            pipe: None,
            gate: false,
            clients: Vec::new(),
        };
        // Both workers have served an event (the ATTACH_TABLE, the posted
        // buffers' kick): they are named once they get to it.
        let w = support::retry(TIMEOUT, "both queue workers named", || {
            let w = cost::workers(pid).map_err(|e| e.to_string())?;
            let find = |r: Role| w.iter().find(|t| t.1 == r).map(|t| t.0);
            match (find(Role::RequestQueue), find(Role::EventQueue)) {
                (Some(r), Some(e)) => Ok(vec![r, e]),
                _ => Err(format!("{w:?}")),
            }
        })
        .unwrap();
        rig.workers = w;
        // One thread per control client, once the backend accepted them.
        rig.clients = support::retry(TIMEOUT, "a thread per control client", || {
            let c: Vec<u32> = cost::threads(pid)
                .map_err(|e| e.to_string())?
                .iter()
                .filter(|t| t.1 == Role::ControlClient)
                .map(|t| t.0)
                .collect();
            if c.len() == batch {
                Ok(c)
            } else {
                Err(format!("{} threads", c.len()))
            }
        })
        .unwrap();
        rig.pipe = Some(cost::FaultPipe::open(pid).expect("the fault pipe"));
        rig.gate = gate;
        rig.rounds(warmup);
        rig
    }

    /// The workers idle, the start or end of the counted window.
    fn mark(&self) {
        cost::wait_idle(self.b.pid(), &self.workers).unwrap();
        cost::mark(&self.b).expect("mark");
    }

    /// `n` rounds of `batch` page requests each.
    fn rounds(&mut self, n: usize) {
        let pid = self.b.pid();
        for _ in 0..n {
            cost::wait_idle(pid, &self.workers).unwrap();
            let pipe = self.pipe.as_ref().filter(|_| self.gate && self.batch > 1);
            // A batch: the eventq worker is held until the batch's records
            // are all in the pipe, so that it reads them in one go.
            let held = pipe.map(|p| {
                let h = cost::Held::hold(self.workers[EVTQ]).expect("ptrace the eventq worker");
                (p, h)
            });
            for (c, line) in self.ctl.iter_mut().zip(&self.lines) {
                c.send_line(line).unwrap();
            }
            if let Some((p, h)) = held {
                p.wait_for(self.batch * RECORD).unwrap();
                drop(h);
            }
            let mut evs = Vec::with_capacity(self.batch);
            while evs.len() < self.batch {
                evs.extend(
                    self.f
                        .collect_events_upto(self.batch - evs.len(), TIMEOUT)
                        .unwrap(),
                );
            }
            let resps: Vec<_> = evs
                .iter()
                .map(|e| {
                    let r = EventRecord::parse(&e.bytes).unwrap();
                    assert!(r.is_page_request(), "{r:?}");
                    wire::page_resp(EP, 0, 0, r.group_id, INVALID)
                })
                .collect();
            cost::wait_idle(pid, &self.workers).unwrap();
            // The waiting `dma`s stay held until the relay has answered
            // them all: the kernel reads its responses later, and which of
            // the two threads frees a `dma`'s channel (the virtual source's
            // own, the kernel's has none) no longer depends on the timing.
            let held: Vec<cost::Held> = if self.gate {
                // Each one asleep until its answer, holding no lock.
                cost::wait_answer_pending(pid, &self.clients).unwrap();
                self.clients
                    .iter()
                    .map(|&t| cost::Held::hold(t).expect("ptrace a control client"))
                    .collect()
            } else {
                Vec::new()
            };
            for (used, w) in self.f.submit_batch(&resps).unwrap() {
                assert!(used > 0 && w[0] == S_OK, "PAGE_RESP refused");
            }
            cost::wait_idle(pid, &self.workers).unwrap();
            drop(held);
            for c in &mut self.ctl {
                let reply = c.read_reply().unwrap();
                assert_eq!(error_kind(&reply), Some("page-request-failed"), "{reply}");
            }
            cost::wait_idle(pid, &self.workers).unwrap();
            self.f.post_event_buffers(self.batch, 48).unwrap();
        }
    }
}

/// The relay: the two queue workers.
const RELAY: [Role; 2] = [Role::RequestQueue, Role::EventQueue];

fn fault_cost(mode: &'static str, batch: usize, rounds: usize, warmup: usize) {
    let faults = (rounds * batch) as u64;
    let run = |n: usize| {
        let b = cost::spawn_callgrind(&backend_args(mode)).expect("backend under callgrind");
        let mut rig = FaultRig::new(b, batch, warmup, true);
        // System calls are counted between the marks (the instructions by
        // the difference of the two runs).
        rig.mark();
        rig.rounds(n);
        rig.mark();
        // Stopped while connected: no thread ends in the counted runs.
        let FaultRig { b, f, ctl, .. } = rig;
        let run = cost::finish_callgrind(b).expect("callgrind profiles");
        drop((ctl, f));
        run
    };
    let (r1, r2) = (run(rounds), run(2 * rounds));
    let (one, two) = (r1.profile(&RELAY), r2.profile(&RELAY));
    let instr = (two.total as f64 - one.total as f64) / faults as f64;
    let (s1, s2) = (r1.syscalls(&RELAY, true), r2.syscalls(&RELAY, true));
    let sys = (s2.total as f64 - s1.total as f64) / faults as f64;

    // Cross-check: strace on the native backend (seccomp on), the two
    // workers only. Native threads interleave freely, so the batches the
    // relay reads vary from run to run: not the headline figure.
    let b = BackendProcess::spawn(&backend_args(mode)).expect("backend starts");
    // strace and the hold would both ptrace the eventq worker: no hold.
    let mut rig = FaultRig::new(b, batch, warmup, false);
    let (tids, dir) = (rig.workers.clone(), rig.b.dir.clone());
    let native = cost::strace_per_op(&dir, &tids, rounds, faults, |n| rig.rounds(n));

    // The default mode's lines keep their format; the other's say its mode.
    let tag = if mode == MODES[0] {
        String::new()
    } else {
        format!(" fault_io={mode}")
    };
    println!(
        "fault-cost instructions_per_fault={instr:.0} syscalls_per_fault={sys:.3} batch={batch}{tag}"
    );
    println!(
        "fault-cost-detail batch={batch}{tag} faults={faults} instructions_by_thread=[{}] \
         syscalls=[{}] strace_native_syscalls_per_fault={native} top5_self=[{}]",
        cost::format_roles(&r1.profiles, &r2.profiles, faults),
        cost::format_syscalls(&s1, &s2, faults),
        cost::format_top(&cost::top_diff(&one, &two, faults, 5)),
    );
}

fn main() {
    // `--quick` is what tests/run.sh passes; the counts are exact either
    // way (difference method), so it only halves N.
    let quick = std::env::args().any(|a| a == "--quick");
    if let Some(why) = cost::missing_tools() {
        println!("fault-cost: SKIPPED ({why})");
        eprintln!("fault-cost: SKIPPED ({why})");
        return;
    }
    let k = if quick { 1 } else { 2 };
    for mode in MODES {
        if mode == "io-uring" {
            if let Some(why) = support::process::io_uring_unavailable() {
                println!("fault-cost fault_io=io-uring: SKIPPED ({why})");
                eprintln!("fault-cost fault_io=io-uring: SKIPPED ({why})");
                continue;
            }
        }
        fault_cost(mode, 1, 100 * k, 20);
        fault_cost(mode, 64, 4 * k, 2);
    }
}
