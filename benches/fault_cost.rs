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
//! The source behaves like the kernel's fault FD: the bench plays the
//! kernel on one end of a unix stream socket the backend serves as its
//! iommufd fault FD (`--test-fault-socket`, test only;
//! `support::fault_socket`), through the code the kernel's goes through
//! (`SourceId::Kernel`). Each page request: the bench writes an
//! `iommu_hwpt_pgfault` record (LAST_PAGE: a group of one) naming the
//! virtual endpoint, attached to a guest table with PAGE_REQUESTS; the
//! eventq worker (`viommu-evtq`) reads it and writes the page request into
//! an eventq buffer; the driver answers PAGE_RESP (INVALID; the relay's
//! path is the same for every code); the requestq worker (`viommu-reqq`)
//! serves it and writes the `iommu_hwpt_page_response` to the socket (one
//! write() per request pass); the bench reads it. Only the two queue
//! workers run in the backend: they are the relay, and what is counted
//! (callgrind per thread, strace attached to those two threads).
//!
//! Batches: the bench writes 64 records in one write() (the kernel had
//! queued 64 faults before the worker read), the driver answers them in
//! one notification of 64 PAGE_RESPs and reposts 64 event buffers with one
//! kick.
//!
//! The driver's requestq is Linux's: no callback, so it asks for no
//! interrupt (`used_event` is never moved) and spins on the used ring for
//! its answers; its eventq asks for an interrupt per notification.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use support::cost::{self, Role};
use support::fault_socket::{FaultSocketListener, KernelFaultFd, PageFault};
use support::mem::TablePages;
use support::wire::{self, EventRecord, S_OK};
use support::{BackendProcess, Frontend, FrontendOptions, GuestMem};
use vhost_device_iommu::nested::walker::TableBuilder;

const EP: u32 = 8;
const TIMEOUT: Duration = Duration::from_secs(60);
/// PAGE_RESP's INVALID.
const INVALID: u16 = 1;
/// IOMMUFD_PAGE_RESP_INVALID, what the backend writes for it.
const KERNEL_INVALID: u32 = 1;
/// Where the page requests land (nothing is mapped in the guest table).
const IOVA: u64 = 0x40_0000;

/// The backend with one virtual endpoint, a guest table attached with
/// PAGE_REQUESTS, event buffers posted, and its fault FD's other end.
struct FaultRig {
    b: BackendProcess,
    f: Frontend,
    kernel: KernelFaultFd,
    // Owns the guest table's pages for the rig's lifetime.
    _table: TableBuilder<TablePages>,
    batch: usize,
    /// The next group's cookie.
    cookie: u32,
    /// The queue workers' thread ids: requestq, eventq.
    workers: Vec<u32>,
}

/// `--fault-io`: epoll, the default, and io-uring.
const MODES: [&str; 2] = ["epoll", "io-uring"];

fn backend_args<'a>(mode: &'a str, fault: &'a [String; 2]) -> [&'a str; 6] {
    ["--endpoint", "8", "--fault-io", mode, &fault[0], &fault[1]]
}

impl FaultRig {
    fn new(b: BackendProcess, l: FaultSocketListener, batch: usize, warmup: usize) -> FaultRig {
        let pid = b.pid();
        let kernel = l.accept().expect("the backend connects to its fault FD");
        let mem = Arc::new(GuestMem::default_size().expect("guest memory"));
        let mut f =
            Frontend::connect(&b.socket, mem, FrontendOptions::default()).expect("frontend");
        // The requestq as Linux's driver has it: no callback (so no
        // interrupt asked for: `used_event` never moves), the driver spins
        // on the used ring. The eventq asks for its interrupt when it
        // kicks, so that the device's decision does not depend on timing.
        f.requestq().set_spin(true);
        f.eventq().set_eager_used_event(true);
        let table = TableBuilder::new(48, TablePages(f.mem.clone()));
        let req = wire::attach_table_vtd(1, EP, wire::TABLE_F_PAGE_REQUESTS, 0, table.root(), 48);
        assert_eq!(f.request_status(&req).unwrap(), S_OK);
        f.post_event_buffers(batch, 48).unwrap();
        // Both workers have served an event (the ATTACH_TABLE, the posted
        // buffers' kick): they are named once they get to it.
        let workers = support::retry(TIMEOUT, "both queue workers named", || {
            let w = cost::workers(pid).map_err(|e| e.to_string())?;
            let find = |r: Role| w.iter().find(|t| t.1 == r).map(|t| t.0);
            match (find(Role::RequestQueue), find(Role::EventQueue)) {
                (Some(r), Some(e)) => Ok(vec![r, e]),
                _ => Err(format!("{w:?}")),
            }
        })
        .unwrap();
        let mut rig = FaultRig {
            b,
            f,
            kernel,
            _table: table,
            batch,
            cookie: 1,
            workers,
        };
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
            let batch = u32::try_from(self.batch).expect("a batch of 1 or 64");
            let faults: Vec<PageFault> = (0..batch)
                .map(|i| PageFault {
                    dev_id: EP,
                    pasid: None,
                    addr: IOVA + u64::from(i) * 0x1000,
                    cookie: self.cookie + i,
                    last: true,
                })
                .collect();
            self.cookie += batch;
            self.kernel.raise(&faults).unwrap();
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
            for (used, w) in self.f.submit_batch(&resps).unwrap() {
                assert!(used > 0 && w[0] == S_OK, "PAGE_RESP refused");
            }
            let answers = self.kernel.answers(self.batch).unwrap();
            let mut cookies: Vec<u32> = answers
                .iter()
                .map(|a| {
                    assert_eq!(a.code, KERNEL_INVALID, "{a:?}");
                    a.cookie
                })
                .collect();
            cookies.sort_unstable();
            let want: Vec<u32> = faults.iter().map(|f| f.cookie).collect();
            assert_eq!(cookies, want, "each page request answered once");
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
        let l = FaultSocketListener::new().expect("the fault socket");
        let fault = l.args();
        let b =
            cost::spawn_callgrind(&backend_args(mode, &fault)).expect("backend under callgrind");
        let mut rig = FaultRig::new(b, l, batch, warmup);
        // System calls are counted between the marks (the instructions by
        // the difference of the two runs).
        rig.mark();
        rig.rounds(n);
        rig.mark();
        // Stopped while connected: no thread ends in the counted runs.
        let FaultRig { b, f, kernel, .. } = rig;
        let run = cost::finish_callgrind(b).expect("callgrind profiles");
        drop((kernel, f));
        run
    };
    let (r1, r2) = (run(rounds), run(2 * rounds));
    let (one, two) = (r1.profile(&RELAY), r2.profile(&RELAY));
    let instr = (two.total as f64 - one.total as f64) / faults as f64;
    let (s1, s2) = (r1.syscalls(&RELAY, true), r2.syscalls(&RELAY, true));
    let sys = (s2.total as f64 - s1.total as f64) / faults as f64;

    // Cross-check: strace on the native backend (seccomp on), the two
    // workers only.
    let l = FaultSocketListener::new().expect("the fault socket");
    let fault = l.args();
    let b = BackendProcess::spawn(&backend_args(mode, &fault)).expect("backend starts");
    let mut rig = FaultRig::new(b, l, batch, warmup);
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
