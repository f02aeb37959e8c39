// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Socket tier, endpoint hot-plug (spec-notes/protocol.md 8.2): the control
//! socket's `add_endpoint` and `remove_endpoint` on virtual endpoints while
//! a guest runs. Removal while attached detaches the endpoint and
//! completes its outstanding page requests exactly once (the counters prove
//! it); requests naming a removed endpoint are NOENT; `--max-endpoints`
//! bounds the endpoints; hostile input (duplicate ids, ids beyond the
//! bound, file descriptors where none belong, bad ones where one does) is
//! answered with an error and leaks nothing. The VFIO form is tested on a
//! real kernel (tests/vfio_endpoints.rs, kernel tier).

mod support;

use std::os::fd::AsRawFd;
use std::thread::{self, JoinHandle};

use serde_json::{json, Value};
use support::control::{dma_ranges, error_kind, request_as, ForeignReply};
use support::fixtures::{backend, connect, control, status};
use support::mem::TablePages;
use support::wire::{self, S_NOENT, S_OK};
use support::{BackendProcess, ControlClient, Frontend};
use vhost_device_iommu::nested::walker::TableBuilder;

/// The endpoint the tests plug in (the fixture has 8 and 0x10).
const NEW: u32 = 0x18;
const SUCCESS: u16 = 0;

fn add(c: &mut ControlClient, ep: u32) -> Value {
    c.request(&json!({"op": "add_endpoint", "endpoint": ep}))
        .unwrap()
}

fn remove(c: &mut ControlClient, ep: u32) -> Value {
    c.request(&json!({"op": "remove_endpoint", "endpoint": ep}))
        .unwrap()
}

fn page_resp(ep: u32, pasid: Option<u32>, group: u16, code: u16) -> ([u8; 28], u32) {
    let flags = if pasid.is_some() {
        wire::PAGE_RESP_F_PASID_VALID
    } else {
        0
    };
    wire::page_resp(ep, flags, pasid.unwrap_or(0), group, code)
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

/// A `dma` on its own control client and thread (it may wait for a page
/// request's answer).
fn dma_async(b: &BackendProcess, ep: u32, pasid: Option<u32>, iova: u64) -> JoinHandle<Value> {
    let mut ctl = control(b);
    thread::spawn(move || ctl.dma(ep, iova, 8, false, pasid, None).unwrap())
}

/// The backend's open file descriptors.
fn fds(b: &BackendProcess) -> usize {
    b.fd_count().unwrap()
}

#[test]
fn a_virtual_endpoint_is_added_used_removed_and_added_again() {
    let b = backend(&[]);
    let mut f = connect(&b);
    let mut c = control(&b);
    // Before: the guest knows no such endpoint.
    assert_eq!(status(&mut f, wire::attach(1, NEW, 0, 0)), S_NOENT);
    let r = add(&mut c, NEW);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["kind"], "virtual", "{r}");
    // Unattached with bypass on at boot: identity.
    assert_eq!(
        dma_ranges(&c.dma(NEW, 0x5000, 8, false, None, None).unwrap()).unwrap(),
        vec![(0x5000, 0x5000, 8)]
    );
    assert_eq!(f.probe(NEW).unwrap().status, S_OK);
    assert_eq!(status(&mut f, wire::attach(1, NEW, 0, 0)), S_OK);
    let gpa = f.mem.alloc(0x1000, 0x1000).unwrap();
    let rw = wire::MAP_F_READ | wire::MAP_F_WRITE;
    assert_eq!(
        status(&mut f, wire::map(1, 0x10_0000, 0x10_0fff, gpa, rw)),
        S_OK
    );
    assert_eq!(
        dma_ranges(&c.dma(NEW, 0x10_0010, 8, true, None, None).unwrap()).unwrap(),
        vec![(0x10_0010, gpa + 0x10, 8)]
    );
    // Endpoint 8 shares the domain, so it outlives the removal.
    assert_eq!(status(&mut f, wire::attach(1, 8, 0, 0)), S_OK);

    // Removed while attached: detached, and gone for every request.
    let r = remove(&mut c, NEW);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(status(&mut f, wire::attach(2, NEW, 0, 0)), S_NOENT);
    assert_eq!(status(&mut f, wire::detach(1, NEW)), S_NOENT);
    assert_eq!(f.probe(NEW).unwrap().status, S_NOENT);
    let d = c.dma(NEW, 0x10_0010, 8, false, None, None).unwrap();
    assert_eq!(error_kind(&d), Some("no-endpoint"), "{d}");
    assert_eq!(error_kind(&remove(&mut c, NEW)), Some("no-endpoint"));
    // The domain lives on with endpoint 8 and its mapping.
    assert_eq!(
        dma_ranges(&c.dma(8, 0x10_0010, 8, false, None, None).unwrap()).unwrap(),
        vec![(0x10_0010, gpa + 0x10, 8)]
    );
    // The last endpoint of a domain takes it along.
    assert_eq!(error_kind(&add(&mut c, NEW)), None);
    assert_eq!(status(&mut f, wire::attach(7, NEW, 0, 0)), S_OK);
    assert_eq!(
        status(&mut f, wire::map(7, 0x20_0000, 0x20_0fff, gpa, rw)),
        S_OK
    );
    assert_eq!(error_kind(&remove(&mut c, NEW)), None);
    assert_eq!(
        status(&mut f, wire::map(7, 0x30_0000, 0x30_0fff, gpa, rw)),
        S_NOENT,
        "domain 7 died with its only endpoint"
    );
    // Added again: a fresh, unattached endpoint.
    assert_eq!(error_kind(&add(&mut c, NEW)), None);
    assert_eq!(
        dma_ranges(&c.dma(NEW, 0x10_0010, 8, false, None, None).unwrap()).unwrap(),
        vec![(0x10_0010, 0x10_0010, 8)]
    );
    // Endpoints given on the command line can be removed too.
    assert_eq!(error_kind(&remove(&mut c, 0x10)), None);
    assert_eq!(status(&mut f, wire::attach(1, 0x10, 0, 0)), S_NOENT);
    // The next guest sees the endpoints as they are now.
    f.disconnect();
    let mut f = connect(&b);
    assert_eq!(status(&mut f, wire::attach(1, NEW, 0, 0)), S_OK);
    assert_eq!(status(&mut f, wire::attach(1, 0x10, 0, 0)), S_NOENT);
    let s = c.stats().unwrap();
    assert_eq!(s["endpoints_added"], 3, "{s}");
    assert_eq!(s["endpoints_removed"], 3, "{s}");
}

fn pasid_of(r: &wire::EventRecord) -> Option<u32> {
    (r.flags & wire::EVT_F_PASID != 0).then_some(r.pasid)
}

/// A guest table with PAGE_REQUESTS, nothing mapped: every `dma` misses.
fn attach_faulting_table(f: &mut Frontend, domain: u32, ep: u32, pasid: Option<u32>) -> u8 {
    let table = TableBuilder::new(48, TablePages(f.mem.clone()));
    let mut flags = wire::TABLE_F_PAGE_REQUESTS;
    if pasid.is_some() {
        flags |= wire::TABLE_F_PASID_VALID;
    }
    let req = wire::attach_table_vtd(domain, ep, flags, pasid.unwrap_or(0), table.root(), 48);
    status(f, req)
}

#[test]
fn removal_completes_outstanding_page_requests_exactly_once() {
    let b = backend(&[]);
    let mut f = connect(&b);
    let mut c = control(&b);
    assert_eq!(error_kind(&add(&mut c, NEW)), None);
    // NEW at its RID and at PASID 5, endpoint 8 in another table domain:
    // one page request outstanding on each.
    assert_eq!(attach_faulting_table(&mut f, 1, NEW, None), S_OK);
    assert_eq!(attach_faulting_table(&mut f, 2, NEW, Some(5)), S_OK);
    assert_eq!(attach_faulting_table(&mut f, 3, 8, None), S_OK);
    let w_rid = dma_async(&b, NEW, None, 0x1000);
    let w_pasid = dma_async(&b, NEW, Some(5), 0x2000);
    let w_other = dma_async(&b, 8, None, 0x3000);
    f.post_event_buffers(3, 48).unwrap();
    let recs: Vec<wire::EventRecord> = f
        .collect_events(3)
        .unwrap()
        .iter()
        .map(|(_, buf)| wire::EventRecord::parse(buf).unwrap())
        .collect();
    assert!(
        recs.iter().all(wire::EventRecord::is_page_request),
        "{recs:?}"
    );
    let s = c.stats().unwrap();
    assert_eq!(s["page_requests_outstanding"], 3, "{s}");

    let r = remove(&mut c, NEW);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["page_requests_completed"], 2, "{r}");
    // Both of NEW's waiters are answered (INVALID), once.
    for w in [w_rid, w_pasid] {
        assert_eq!(error_kind(&w.join().unwrap()), Some("page-request-failed"));
    }
    // The driver's late answers name an endpoint that is gone.
    for r in recs.iter().filter(|r| r.endpoint == NEW) {
        assert_eq!(
            status(&mut f, page_resp(NEW, pasid_of(r), r.group_id, SUCCESS)),
            S_NOENT
        );
    }
    let s = c.stats().unwrap();
    assert_eq!(s["page_requests_outstanding"], 1, "{s}");
    assert_eq!(s["page_requests_completed_by_device"], 2, "{s}");
    assert_eq!(s["page_requests_completed_by_driver"], 0, "{s}");
    assert_accounted(&s, 1);
    // Endpoint 8's group is untouched: the driver still answers it.
    let other = recs.iter().find(|r| r.endpoint == 8).unwrap();
    assert_eq!(
        status(&mut f, page_resp(8, None, other.group_id, SUCCESS)),
        S_OK
    );
    // SUCCESS, then the walk misses again: a fault.
    assert_eq!(error_kind(&w_other.join().unwrap()), Some("fault"));
    let s = c.stats().unwrap();
    assert_eq!(s["page_requests_completed_by_device"], 2, "{s}");
    assert_eq!(s["page_requests_completed_by_driver"], 1, "{s}");
    assert_accounted(&s, 0);
    // Its domains went with it: domain 1 can be made again with another
    // table kind.
    assert_eq!(status(&mut f, wire::attach(1, 0x10, 0, 0)), S_OK);
    assert_eq!(status(&mut f, wire::attach(2, 0x10, 0, 0)), S_OK);
}

#[test]
fn max_endpoints_bounds_added_endpoints() {
    let b = backend(&["--max-endpoints", "3"]);
    let mut c = control(&b);
    assert_eq!(error_kind(&add(&mut c, NEW)), None);
    let r = add(&mut c, 0x20);
    assert_eq!(error_kind(&r), Some("limit"), "{r}");
    assert!(r["detail"].as_str().unwrap().contains('3'), "{r}");
    assert_eq!(error_kind(&remove(&mut c, NEW)), None);
    assert_eq!(error_kind(&add(&mut c, 0x20)), None);
    // Adding and removing many distinct IDs holds nothing per ID.
    assert_eq!(error_kind(&remove(&mut c, 0x20)), None);
    let rss = b.rss_kib().unwrap();
    for id in 0x1000..0x1000 + 3000u32 {
        assert_eq!(error_kind(&add(&mut c, id)), None);
        assert_eq!(error_kind(&remove(&mut c, id)), None);
    }
    let grown = b.rss_kib().unwrap().saturating_sub(rss);
    assert!(
        grown < 1024,
        "RSS grew {grown} KiB over 3000 add/remove pairs"
    );
}

#[test]
fn hostile_requests_are_refused_and_leak_nothing() {
    let b = backend(&[]);
    let _f = connect(&b);
    let mut c = control(&b);
    let bad = [
        json!({"op": "add_endpoint"}),
        json!({"op": "add_endpoint", "endpoint": -1}),
        json!({"op": "add_endpoint", "endpoint": 1u64 << 32}),
        json!({"op": "add_endpoint", "endpoint": "0x18"}),
        json!({"op": "add_endpoint", "endpoint": NEW, "vfio": 1}),
        json!({"op": "remove_endpoint"}),
        json!({"op": "remove_endpoint", "endpoint": 1u64 << 40}),
    ];
    for req in &bad {
        let r = c.request(req).unwrap();
        assert_eq!(error_kind(&r), Some("bad-request"), "{req} -> {r}");
    }
    // A duplicate: the one given on the command line, or one added.
    assert_eq!(error_kind(&add(&mut c, 8)), Some("exists"));
    assert_eq!(error_kind(&add(&mut c, NEW)), None);
    assert_eq!(error_kind(&add(&mut c, NEW)), Some("exists"));
    assert_eq!(error_kind(&remove(&mut c, 0x99)), Some("no-endpoint"));

    // File descriptors sent to a daemon that takes no VFIO devices never
    // reach it (its control clients do not receive fds: the kernel closes
    // them); a VFIO add is unsupported. (Where fds are received, their
    // checks are in tests/vfio_endpoints.rs, kernel tier.)
    let before = fds(&b);
    let file = std::fs::File::open("/dev/null").unwrap();
    let (p0, p1) = std::os::unix::net::UnixStream::pair().unwrap();
    let raw = [file.as_raw_fd(), p0.as_raw_fd(), p1.as_raw_fd()];
    for _ in 0..20 {
        let r = c
            .request_with_fds(&json!({"op": "stats"}), &raw[..1])
            .unwrap();
        assert_eq!(r["ok"], true, "{r}");
        let vfio = json!({"op": "add_endpoint", "endpoint": 0x30, "vfio": true});
        for n in [0, 1, 3] {
            let r = c.request_with_fds(&vfio, &raw[..n]).unwrap();
            assert_eq!(error_kind(&r), Some("unsupported"), "{r}");
        }
    }
    assert_eq!(fds(&b), before, "the backend kept file descriptors");
    // Nothing was added by the refused requests.
    assert_eq!(error_kind(&remove(&mut c, 0x30)), Some("no-endpoint"));
    // The connection still serves.
    assert_eq!(c.stats().unwrap()["ok"], true);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Only those the control socket serves may add or remove endpoints.
#[test]
fn other_users_cannot_add_or_remove_endpoints() {
    if !is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    const NOBODY: u32 = 65534;
    let b = backend(&[]);
    std::fs::set_permissions(
        &b.control,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    for line in [
        r#"{"op":"add_endpoint","endpoint":24}"#,
        r#"{"op":"remove_endpoint","endpoint":8}"#,
    ] {
        let ForeignReply::Line(l) = request_as(&b.control, NOBODY, NOBODY, &[], line).unwrap()
        else {
            panic!("not connected")
        };
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["error"], "forbidden", "{v}");
    }
    let mut c = control(&b);
    assert_eq!(error_kind(&remove(&mut c, NEW)), Some("no-endpoint"));
    assert_eq!(error_kind(&remove(&mut c, 8)), None);
}

#[test]
fn vfio_needs_an_iommufd() {
    let b = backend(&[]);
    let mut c = control(&b);
    let file = std::fs::File::open("/dev/null").unwrap();
    let r = c
        .request_with_fds(
            &json!({"op": "add_endpoint", "endpoint": NEW, "vfio": true}),
            &[file.as_raw_fd()],
        )
        .unwrap();
    assert_eq!(error_kind(&r), Some("unsupported"), "{r}");
    assert!(
        r["detail"].as_str().unwrap().contains("--vfio-hotplug"),
        "{r}"
    );
}
