// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Socket tier, page requests on virtual endpoints (spec-notes/protocol.md 6.4, 6.7, 6.8, 8):
//! a `dma` that misses in a table attached with PAGE_REQUESTS raises a page
//! request on the eventq and waits for the driver's PAGE_RESP. Every way a
//! group can end is exercised here, and the counters prove each group ended
//! exactly once.

mod support;

use support::fixtures::{backend, connect, connect_with, control, status};

use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::Value;
use support::control::{dma_ranges, error_kind};
use support::mem::TablePages;
use support::wire::{self, EventRecord, S_INVAL, S_NOENT, S_OK};
use support::{BackendProcess, Frontend, FrontendOptions};
use vhost_device_iommu::nested::walker::{TableBuilder, PAGE_4K};

const EP: u32 = 8;
const EP2: u32 = 0x10;
const SUCCESS: u16 = 0;
const INVALID: u16 = 1;
const FAILURE: u16 = 2;

fn page_resp(ep: u32, pasid: Option<u32>, group: u16, code: u16) -> ([u8; 28], u32) {
    let flags = if pasid.is_some() {
        wire::PAGE_RESP_F_PASID_VALID
    } else {
        0
    };
    wire::page_resp(ep, flags, pasid.unwrap_or(0), group, code)
}

/// A guest table with PAGE_REQUESTS on `ep` (at `pasid`) in `domain`:
/// nothing mapped yet. Returns the table (to fix faults) and a data page.
struct Guest {
    f: Frontend,
    table: TableBuilder<TablePages>,
    root: u64,
    data: u64,
}

impl Guest {
    fn new(b: &BackendProcess) -> Guest {
        let f = connect(b);
        let data = f.mem.alloc(PAGE_4K * 16, PAGE_4K).unwrap();
        let table = TableBuilder::new(48, TablePages(f.mem.clone()));
        let root = table.root();
        Guest {
            f,
            table,
            root,
            data,
        }
    }

    fn attach(&mut self, domain: u32, ep: u32, pasid: Option<u32>) -> u8 {
        let mut flags = wire::TABLE_F_PAGE_REQUESTS;
        if pasid.is_some() {
            flags |= wire::TABLE_F_PASID_VALID;
        }
        let req = wire::attach_table_vtd(domain, ep, flags, pasid.unwrap_or(0), self.root, 48);
        status(&mut self.f, req)
    }

    /// Post `n` 48-byte buffers and collect `n` page-request records.
    fn page_requests(&mut self, n: usize) -> Vec<EventRecord> {
        self.f.post_event_buffers(n, 48).unwrap();
        self.f
            .collect_events(n)
            .unwrap()
            .iter()
            .map(|(used, b)| {
                assert_eq!(*used, 48, "a page request fills a 48-byte buffer");
                let r = EventRecord::parse(b).unwrap();
                assert!(r.is_page_request(), "{r:?}");
                r
            })
            .collect()
    }
}

/// A `dma` on its own control client and thread: it blocks until the
/// page request is answered.
fn dma_async(
    b: &BackendProcess,
    ep: u32,
    pasid: Option<u32>,
    iova: u64,
    write: bool,
    timeout_ms: Option<u64>,
) -> JoinHandle<Value> {
    let mut ctl = control(b);
    thread::spawn(move || ctl.dma(ep, iova, 8, write, pasid, timeout_ms).unwrap())
}

fn stats(b: &BackendProcess) -> Value {
    control(b).stats().unwrap()
}

/// Every group raised ended exactly once, and `outstanding` remain.
fn assert_accounted(s: &Value, outstanding: u64) {
    let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("no {k} in {s}"));
    assert_eq!(n("page_requests_outstanding"), outstanding, "{s}");
    assert_eq!(
        n("page_requests_raised"),
        outstanding
            + n("page_requests_completed_by_driver")
            + n("page_requests_completed_by_device")
            + n("page_requests_completed_by_kernel"),
        "{s}"
    );
}

#[test]
fn a_miss_becomes_a_page_request_and_success_walks_again() {
    let b = backend(&[]);
    let mut g = Guest::new(&b);
    assert_eq!(g.attach(1, EP, None), S_OK);
    let iova = 0x40_0000;
    let waiter = dma_async(&b, EP, None, iova + 0x10, true, None);
    let r = g.page_requests(1);
    assert_eq!(r[0].endpoint, EP);
    assert_eq!(r[0].address, iova, "the page's address");
    let want = wire::EVT_F_WRITE
        | wire::EVT_F_LAST
        | wire::EVT_F_PAGE_REQ
        | wire::EVT_F_ADDRESS
        | wire::EVT_F_GROUP_ID;
    assert_eq!(r[0].flags, want);
    // The driver fixes the table, then answers SUCCESS.
    g.table.map(iova, g.data, PAGE_4K, true);
    assert_eq!(
        status(&mut g.f, page_resp(EP, None, r[0].group_id, SUCCESS)),
        S_OK
    );
    let reply = waiter.join().unwrap();
    assert_eq!(
        dma_ranges(&reply).unwrap(),
        vec![(iova + 0x10, g.data + 0x10, 8)]
    );
    // Answered once: a second answer has no group.
    assert_eq!(
        status(&mut g.f, page_resp(EP, None, r[0].group_id, SUCCESS)),
        S_INVAL
    );
    let s = stats(&b);
    assert_eq!(s["page_requests_completed_by_driver"], 1);
    assert_accounted(&s, 0);
}

#[test]
fn invalid_failure_and_a_success_that_fixed_nothing() {
    let b = backend(&[]);
    let mut g = Guest::new(&b);
    assert_eq!(g.attach(1, EP, None), S_OK);
    for (i, code) in [INVALID, FAILURE].into_iter().enumerate() {
        let w = dma_async(&b, EP, None, 0x10_0000 * (i as u64 + 1), false, None);
        let r = g.page_requests(1);
        assert_eq!(
            status(&mut g.f, page_resp(EP, None, r[0].group_id, code)),
            S_OK
        );
        assert_eq!(error_kind(&w.join().unwrap()), Some("page-request-failed"));
    }
    // SUCCESS without a mapping: the second walk misses: fault, with a
    // MAPPING fault record.
    let w = dma_async(&b, EP, None, 0x50_0000, false, None);
    let r = g.page_requests(1);
    assert_eq!(
        status(&mut g.f, page_resp(EP, None, r[0].group_id, SUCCESS)),
        S_OK
    );
    assert_eq!(error_kind(&w.join().unwrap()), Some("fault"));
    g.f.post_event_buffers(1, 48).unwrap();
    let ev = g.f.collect_events(1).unwrap();
    let rec = EventRecord::parse(&ev[0].1).unwrap();
    assert_eq!(
        (rec.reason, rec.address),
        (wire::EVT_REASON_MAPPING, 0x50_0000)
    );
    assert!(!rec.is_page_request());
    assert_accounted(&stats(&b), 0);
}

#[test]
fn page_resp_refusals() {
    let b = backend(&[]);
    let mut g = Guest::new(&b);
    assert_eq!(g.attach(1, EP, None), S_OK);
    let w = dma_async(&b, EP, None, 0x1000, false, None);
    let r = g.page_requests(1);
    let id = r[0].group_id;
    assert_eq!(
        status(&mut g.f, page_resp(0x99, None, id, SUCCESS)),
        S_NOENT
    );
    assert_eq!(status(&mut g.f, page_resp(EP2, None, id, SUCCESS)), S_INVAL);
    assert_eq!(
        status(&mut g.f, page_resp(EP, Some(1), id, SUCCESS)),
        S_INVAL
    );
    assert_eq!(
        status(&mut g.f, page_resp(EP, None, id.wrapping_add(1), SUCCESS)),
        S_INVAL
    );
    assert_eq!(
        status(&mut g.f, page_resp(EP, None, id, 3)),
        S_INVAL,
        "code 3"
    );
    let (mut raw, wl) = page_resp(EP, None, id, SUCCESS);
    raw[25] = 1;
    assert_eq!(status(&mut g.f, (raw, wl)), S_INVAL, "reserved byte");
    // None of that completed the group: the real answer still does.
    assert_eq!(status(&mut g.f, page_resp(EP, None, id, INVALID)), S_OK);
    assert_eq!(error_kind(&w.join().unwrap()), Some("page-request-failed"));
    let s = stats(&b);
    assert_eq!(s["requests"]["page_resp"]["inval"], 5, "{s}");
    assert_accounted(&s, 0);
}

#[test]
fn timeout_completes_with_failure_and_a_late_answer_is_inval() {
    let b = backend(&[]);
    let mut g = Guest::new(&b);
    assert_eq!(g.attach(1, EP, None), S_OK);
    let w = dma_async(&b, EP, None, 0x1000, false, Some(300));
    let r = g.page_requests(1);
    assert_eq!(error_kind(&w.join().unwrap()), Some("timeout"));
    assert_eq!(
        status(&mut g.f, page_resp(EP, None, r[0].group_id, SUCCESS)),
        S_INVAL
    );
    // Timed out before the driver posted any buffer: the record goes too.
    let w = dma_async(&b, EP, None, 0x2000, false, Some(200));
    assert_eq!(error_kind(&w.join().unwrap()), Some("timeout"));
    g.f.post_event_buffers(1, 48).unwrap();
    assert!(g
        .f
        .collect_events_upto(1, Duration::from_millis(300))
        .unwrap()
        .is_empty());
    let s = stats(&b);
    assert_eq!(s["page_requests_timed_out"], 2, "{s}");
    assert_accounted(&s, 0);
}

#[test]
fn detach_and_replace_complete_outstanding_groups() {
    let b = backend(&[]);
    let mut g = Guest::new(&b);
    assert_eq!(g.attach(1, EP, None), S_OK);
    let w = dma_async(&b, EP, None, 0x1000, false, None);
    let r = g.page_requests(1);
    assert_eq!(status(&mut g.f, wire::detach(1, EP)), S_OK);
    assert_eq!(error_kind(&w.join().unwrap()), Some("page-request-failed"));
    assert_eq!(
        status(&mut g.f, page_resp(EP, None, r[0].group_id, SUCCESS)),
        S_INVAL
    );
    // Replace by another table domain, then by a MAP/UNMAP domain.
    assert_eq!(g.attach(1, EP, None), S_OK);
    let w = dma_async(&b, EP, None, 0x2000, false, None);
    let r = g.page_requests(1);
    assert_eq!(g.attach(2, EP, None), S_OK);
    assert_eq!(error_kind(&w.join().unwrap()), Some("page-request-failed"));
    assert_eq!(
        status(&mut g.f, page_resp(EP, None, r[0].group_id, SUCCESS)),
        S_INVAL
    );
    let w = dma_async(&b, EP, None, 0x3000, false, None);
    g.page_requests(1);
    assert_eq!(status(&mut g.f, wire::attach(3, EP, 0, 0)), S_OK);
    assert_eq!(error_kind(&w.join().unwrap()), Some("page-request-failed"));
    // A PASID's detach completes only that PASID's groups.
    assert_eq!(g.attach(4, EP, Some(5)), S_OK);
    assert_eq!(g.attach(5, EP2, None), S_OK);
    let w5 = dma_async(&b, EP, Some(5), 0x4000, false, None);
    let w2 = dma_async(&b, EP2, None, 0x4000, false, None);
    let r = g.page_requests(2);
    assert_eq!(status(&mut g.f, wire::detach(4, EP)), S_OK);
    assert_eq!(error_kind(&w5.join().unwrap()), Some("page-request-failed"));
    let other = r.iter().find(|x| x.endpoint == EP2).unwrap();
    assert_eq!(
        status(&mut g.f, page_resp(EP2, None, other.group_id, INVALID)),
        S_OK
    );
    assert_eq!(error_kind(&w2.join().unwrap()), Some("page-request-failed"));
    let s = stats(&b);
    assert_eq!(s["page_requests_completed_by_device"], 4, "{s}");
    assert_eq!(s["page_requests_completed_by_driver"], 1, "{s}");
    assert_accounted(&s, 0);
}

#[test]
fn reset_and_disconnect_complete_outstanding_groups() {
    let b = backend(&[]);
    let mut g = Guest::new(&b);
    assert_eq!(g.attach(1, EP, None), S_OK);
    let w = dma_async(&b, EP, None, 0x1000, false, None);
    g.page_requests(1);
    use vhost::vhost_user::VhostUserFrontend;
    g.f.vu.reset_device().unwrap();
    assert_eq!(error_kind(&w.join().unwrap()), Some("page-request-failed"));
    // A fresh guest, an outstanding group, then the frontend vanishes.
    drop(g);
    let mut g = Guest::new(&b);
    assert_eq!(g.attach(1, EP, None), S_OK);
    let w = dma_async(&b, EP, None, 0x1000, false, None);
    g.page_requests(1);
    g.f.disconnect();
    assert_eq!(error_kind(&w.join().unwrap()), Some("page-request-failed"));
    let s = stats(&b);
    assert_eq!(s["page_requests_completed_by_device"], 2, "{s}");
    assert_accounted(&s, 0);
}

#[test]
fn a_full_queue_fails_at_once_and_small_buffers_fail_the_group() {
    let b = backend(&["--max-page-requests", "2"]);
    let mut g = Guest::new(&b);
    assert_eq!(g.attach(1, EP, None), S_OK);
    // Two outstanding (no buffer posted yet), the third fails at once.
    let w1 = dma_async(&b, EP, None, 0x1000, false, None);
    let w2 = dma_async(&b, EP, None, 0x2000, false, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stats(&b)["page_requests_outstanding"] != 2 {
        assert!(std::time::Instant::now() < deadline, "{}", stats(&b));
        thread::sleep(Duration::from_millis(10));
    }
    let w3 = dma_async(&b, EP, None, 0x3000, false, None);
    assert_eq!(error_kind(&w3.join().unwrap()), Some("page-request-failed"));
    assert_eq!(stats(&b)["page_requests_refused_full"], 1);
    // 24-byte buffers cannot hold a page request: returned empty, and
    // the groups fail instead of stalling the device.
    g.f.post_event_buffers(2, 24).unwrap();
    let ev = g.f.collect_events(2).unwrap();
    assert!(ev.iter().all(|(used, _)| *used == 0), "{ev:?}");
    assert_eq!(error_kind(&w1.join().unwrap()), Some("page-request-failed"));
    assert_eq!(error_kind(&w2.join().unwrap()), Some("page-request-failed"));
    let s = stats(&b);
    assert_eq!(s["page_requests_small_buffer"], 2, "{s}");
    assert_accounted(&s, 0);
}

#[test]
fn without_page_requests_a_miss_is_a_fault() {
    let b = backend(&[]);
    let mut f = connect_with(
        &b,
        FrontendOptions::default().without(wire::VIRTIO_IOMMU_F_PAGE_REQUEST),
    );
    let root = TableBuilder::new(48, TablePages(f.mem.clone())).root();
    assert_eq!(
        status(&mut f, wire::attach_table_vtd(1, EP, 0, 0, root, 48)),
        S_OK
    );
    let mut ctl = control(&b);
    let r = ctl.dma(EP, 0x1000, 8, false, None, None).unwrap();
    assert_eq!(error_kind(&r), Some("fault"));
    // A table attached without PAGE_REQUESTS faults too, negotiated or not.
    f.disconnect();
    let mut g = Guest::new(&b);
    let req = wire::attach_table_vtd(1, EP, 0, 0, g.root, 48);
    assert_eq!(status(&mut g.f, req), S_OK);
    assert_eq!(
        error_kind(&ctl.dma(EP, 0x1000, 8, false, None, None).unwrap()),
        Some("fault")
    );
    assert_eq!(stats(&b)["page_requests_raised"], 0);
}

#[test]
fn groups_are_ordered_carry_their_pasid_and_are_answered_in_any_order() {
    let b = backend(&[]);
    let mut g = Guest::new(&b);
    assert_eq!(g.attach(1, EP, Some(3)), S_OK);
    assert_eq!(g.attach(1, EP, Some(4)), S_OK);
    assert_eq!(g.attach(1, EP2, None), S_OK);
    let iovas = [0x1000u64, 0x2000, 0x3000];
    let who = [(EP, Some(3)), (EP, Some(4)), (EP2, None)];
    let mut waiters = Vec::new();
    for (i, &(ep, pasid)) in who.iter().enumerate() {
        waiters.push(dma_async(&b, ep, pasid, iovas[i], i == 1, None));
        // One at a time, so that the order is known.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while stats(&b)["page_requests_outstanding"] != i as u64 + 1 {
            assert!(std::time::Instant::now() < deadline);
            thread::sleep(Duration::from_millis(5));
        }
    }
    let r = g.page_requests(3);
    for (i, rec) in r.iter().enumerate() {
        assert_eq!(rec.endpoint, who[i].0);
        assert_eq!(rec.address, iovas[i]);
        match who[i].1 {
            Some(p) => {
                assert_eq!(rec.flags & wire::EVT_F_PASID, wire::EVT_F_PASID);
                assert_eq!(rec.pasid, p);
            }
            None => assert_eq!(rec.flags & wire::EVT_F_PASID, 0),
        }
    }
    assert_ne!(r[0].group_id, r[1].group_id, "one endpoint, two groups");
    // Fix all three pages, answer in reverse order.
    for (i, &iova) in iovas.iter().enumerate() {
        g.table
            .map(iova, g.data + i as u64 * PAGE_4K, PAGE_4K, true);
    }
    for i in (0..3).rev() {
        let (ep, pasid) = who[i];
        assert_eq!(
            status(&mut g.f, page_resp(ep, pasid, r[i].group_id, SUCCESS)),
            S_OK
        );
    }
    for (i, w) in waiters.into_iter().enumerate() {
        let reply = w.join().unwrap();
        assert_eq!(
            dma_ranges(&reply).unwrap(),
            vec![(iovas[i], g.data + i as u64 * PAGE_4K, 8)],
            "{reply}"
        );
    }
    assert_accounted(&stats(&b), 0);
}

/// `--page-response-timeout-ms`: a group the driver never answers is
/// completed by the device (INVALID: the waiting `dma` fails), counted as
/// timed out, and the driver's late PAGE_RESP is INVAL like any unknown
/// group's.
#[test]
fn a_group_the_driver_never_answers_is_completed_by_the_device() {
    let b = backend(&["--page-response-timeout-ms", "300"]);
    let mut g = Guest::new(&b);
    assert_eq!(g.attach(1, EP, None), S_OK);
    let started = std::time::Instant::now();
    // The dma would wait 20 s: the device's timeout ends it first.
    let w = dma_async(&b, EP, None, 0x1000, false, Some(20_000));
    let r = g.page_requests(1);
    assert_eq!(error_kind(&w.join().unwrap()), Some("page-request-failed"));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        status(&mut g.f, page_resp(EP, None, r[0].group_id, SUCCESS)),
        S_INVAL
    );
    // Others keep working after it.
    let w = dma_async(&b, EP, None, 0x2000, false, None);
    let r = g.page_requests(1);
    assert_eq!(
        status(&mut g.f, page_resp(EP, None, r[0].group_id, INVALID)),
        S_OK
    );
    assert_eq!(error_kind(&w.join().unwrap()), Some("page-request-failed"));
    let s = stats(&b);
    assert_eq!(s["page_requests_timed_out"], 1, "{s}");
    assert_eq!(s["page_requests_completed_by_device"], 1, "{s}");
    assert_accounted(&s, 0);
}

/// A frontend that sends SET_FEATURES again without F_PAGE_REQUEST while
/// groups are outstanding: the driver can no longer answer them, so the
/// device completes them (INVALID) at once.
#[test]
fn features_without_page_requests_complete_outstanding_groups() {
    let b = backend(&[]);
    let mut g = Guest::new(&b);
    assert_eq!(g.attach(1, EP, None), S_OK);
    let w = dma_async(&b, EP, None, 0x1000, false, Some(20_000));
    g.page_requests(1);
    let started = std::time::Instant::now();
    {
        use vhost::VhostBackend;
        let without = g.f.acked_features & !(1 << wire::VIRTIO_IOMMU_F_PAGE_REQUEST);
        g.f.vu.set_features(without).unwrap();
    }
    assert_eq!(error_kind(&w.join().unwrap()), Some("page-request-failed"));
    assert!(started.elapsed() < Duration::from_secs(10));
    let s = stats(&b);
    assert_eq!(s["page_requests_withdrawn"], 1, "{s}");
    assert_eq!(s["page_requests_completed_by_device"], 1, "{s}");
    assert_accounted(&s, 0);
}

/// `--fault-io auto` on a host that refuses io_uring (here a seccomp policy
/// returning EPERM for io_uring_setup, as a container's does): the device
/// starts in epoll mode, says why at start-up, and relays page requests;
/// `--fault-io io-uring` there refuses to start, saying why; `auto` where
/// io_uring works takes the ring.
#[test]
fn auto_fault_io_falls_back_to_epoll_where_io_uring_is_refused() {
    let denied = [libc::SYS_io_uring_setup];
    let b = BackendProcess::spawn_denying(&["--endpoint", "8", "--fault-io", "auto"], &denied)
        .expect("backend starts without io_uring");
    let mut g = Guest::new(&b);
    assert_eq!(g.attach(1, EP, None), S_OK);
    let w = dma_async(&b, EP, None, 0x40_0000, false, None);
    let got = g.page_requests(1);
    assert_eq!(got.len(), 1);
    assert_eq!(
        status(&mut g.f, page_resp(EP, None, got[0].group_id, INVALID)),
        S_OK
    );
    assert_eq!(error_kind(&w.join().unwrap()), Some("page-request-failed"));
    let s = stats(&b);
    assert_eq!(s["fault_io"]["mode"], "epoll", "{s}");
    assert!(s["fault_io"]["ring"].is_null(), "{s}");
    assert_eq!(s["page_requests_completed_by_driver"], 1, "{s}");
    assert_accounted(&s, 0);
    let said = "fault I/O: epoll (--fault-io auto: io_uring unavailable: ";
    assert!(b.stderr().contains(said), "{}", b.stderr());
    drop(g);
    drop(b);

    let refused =
        BackendProcess::spawn_denying(&["--endpoint", "8", "--fault-io", "io-uring"], &denied);
    match refused {
        Ok(mut p) => {
            let st = p.wait_exit(Duration::from_secs(10));
            panic!(
                "io-uring mode started without io_uring: {st:?}\n{}",
                p.stderr()
            );
        }
        Err(e) => assert!(e.to_string().contains("--fault-io io-uring: "), "{e}"),
    }

    if let Some(why) = support::process::io_uring_unavailable() {
        eprintln!("!! auto on a host with io_uring SKIPPED: this host makes no io_uring ({why})");
        return;
    }
    let b = backend(&["--fault-io", "auto"]);
    assert_eq!(stats(&b)["fault_io"]["mode"], "io-uring");
    assert!(
        b.stderr().contains("fault I/O: io-uring (--fault-io auto)"),
        "{}",
        b.stderr()
    );
}

/// The `--fault-io` modes this host can run, as (name, through the ring);
/// io-uring says SKIPPED, loudly, where the host makes no io_uring.
fn fault_io_modes() -> Vec<(&'static str, bool)> {
    let mut modes = vec![("epoll", false)];
    match support::process::io_uring_unavailable() {
        None => modes.push(("io-uring", true)),
        Some(why) => eprintln!("!! io-uring mode SKIPPED: this host makes no io_uring ({why})"),
    }
    modes
}

/// `--fault-io`: the mode in force is printed at start-up and in `stats`;
/// with the ring, page requests are read through it (posted reads) in
/// every connection, whoever posted the read (an earlier connection's
/// eventq worker, gone now, or this one's).
#[test]
fn both_fault_io_modes_relay_every_page_request_once_across_connections() {
    for (mode, ring) in fault_io_modes() {
        let b = backend(&["--fault-io", mode]);
        for round in 0..2u64 {
            let mut g = Guest::new(&b);
            assert_eq!(g.attach(1, EP, None), S_OK);
            let waiters: Vec<_> = (0..3)
                .map(|i| dma_async(&b, EP, None, 0x40_0000 + i * 0x1000, false, None))
                .collect();
            let mut got = Vec::new();
            while got.len() < 3 {
                got.extend(g.page_requests(1));
            }
            for r in &got {
                assert_eq!(
                    status(&mut g.f, page_resp(EP, None, r.group_id, INVALID)),
                    S_OK
                );
            }
            for w in waiters {
                assert_eq!(error_kind(&w.join().unwrap()), Some("page-request-failed"));
            }
            let s = stats(&b);
            assert_eq!(s["fault_io"]["mode"], mode, "{s}");
            assert_eq!(
                s["page_requests_completed_by_driver"],
                3 * (round + 1),
                "{s}"
            );
            assert_accounted(&s, 0);
            if ring {
                assert!(
                    s["fault_io"]["ring"]["reads"].as_u64().unwrap() > round,
                    "{s}"
                );
            } else {
                assert!(s["fault_io"]["ring"].is_null(), "{s}");
            }
            drop(g);
        }
        let said = format!("fault I/O: {mode} (--fault-io {mode})");
        assert!(b.stderr().contains(&said), "{}", b.stderr());
    }
}

/// `--test-fault-socket` (test only): the test plays the kernel's fault FD
/// and the backend serves it through the kernel's path: whole groups read,
/// routed by `dev_id`, each answered once with an iommu_hwpt_page_response
/// record, the answers of one request pass in one write().
#[test]
fn the_test_fault_socket_is_served_like_the_kernels_fault_fd() {
    use support::fault_socket::{Answer, FaultSocketListener, PageFault};
    for (mode, ring) in fault_io_modes() {
        let l = FaultSocketListener::new().unwrap();
        let [opt, path] = l.args();
        let b = backend(&[opt.as_str(), path.as_str(), "--fault-io", mode]);
        let mut k = l.accept().unwrap();
        let mut g = Guest::new(&b);
        assert_eq!(g.attach(1, EP, None), S_OK);
        let fault = |dev_id, addr, cookie, last| PageFault {
            dev_id,
            pasid: None,
            addr,
            cookie,
            last,
        };
        // A group of two, one of one, and one of an endpoint nobody has.
        k.raise(&[
            fault(EP, 0x40_0000, 100, false),
            fault(EP, 0x40_1000, 100, true),
            fault(EP, 0x40_2000, 101, true),
            fault(0x99, 0x40_3000, 102, true),
        ])
        .unwrap();
        let r = g.page_requests(3);
        assert_eq!(r[0].group_id, r[1].group_id, "{r:?}");
        assert_ne!(r[0].group_id, r[2].group_id, "{r:?}");
        assert_eq!(
            (r[0].address, r[1].address, r[2].address),
            (0x40_0000, 0x40_1000, 0x40_2000)
        );
        // Nobody handles 102: INVALID at once.
        assert_eq!(
            k.answers(1).unwrap(),
            vec![Answer {
                cookie: 102,
                code: 1
            }]
        );
        // Both answered in one notification: one write() carries both.
        let resps = [
            page_resp(EP, None, r[0].group_id, SUCCESS),
            page_resp(EP, None, r[2].group_id, INVALID),
        ];
        for (used, w) in g.f.submit_batch(&resps).unwrap() {
            assert!(used > 0 && w[0] == S_OK, "PAGE_RESP refused");
        }
        let mut got = k.answers(2).unwrap();
        got.sort_by_key(|a| a.cookie);
        assert_eq!(
            got,
            vec![
                Answer {
                    cookie: 100,
                    code: 0
                },
                Answer {
                    cookie: 101,
                    code: 1
                }
            ]
        );
        // Once each.
        assert_eq!(
            status(&mut g.f, page_resp(EP, None, r[0].group_id, SUCCESS)),
            S_INVAL
        );
        assert_eq!(k.pending().unwrap(), 0, "no answer twice");
        let s = stats(&b);
        assert_eq!(s["page_requests_completed_by_driver"], 2, "{s}");
        assert_accounted(&s, 0);
        let host = control(&b)
            .request(&serde_json::json!({"op": "host"}))
            .unwrap();
        assert_eq!(host["host"]["test_fault_socket"], true, "{host}");
        if !ring {
            // 102's answer, then the pass's two in one.
            assert_eq!(host["host"]["page_response_writes"], 2, "{host}");
        }
    }
}
