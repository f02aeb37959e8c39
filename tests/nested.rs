// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Socket tier, nested translation on virtual endpoints: the harness builds
//! VT-d first-stage tables in guest memory, attaches them with ATTACH_TABLE,
//! and the control socket's `dma` op walks them in the backend.

mod support;

use support::fixtures::{backend, connect, connect_with, control, status};

use std::sync::Arc;

use serde_json::Value;
use support::control::{dma_ranges, error_kind};
use support::mem::TablePages;
use support::wire::{self, bit, EventRecord, Invalidate, S_INVAL, S_NOENT, S_OK, S_RANGE};
use support::wire::{S_NOMEM, S_UNSUPP};
use support::{ControlClient, Frontend, FrontendOptions, GuestMem};
use vhost_device_iommu::nested::walker::{TableBuilder, PAGE_1G, PAGE_2M, PAGE_4K, PTE_RW, PTE_US};

const EP: u32 = 8;
const EP2: u32 = 0x10;

fn tables(mem: &Arc<GuestMem>, addr_width: u32) -> TableBuilder<TablePages> {
    TableBuilder::new(addr_width, TablePages(mem.clone()))
}

fn vtd(domain: u32, ep: u32, root: u64) -> ([u8; 124], u32) {
    wire::attach_table_vtd(domain, ep, 0, 0, root, 48)
}

fn vtd_pasid(domain: u32, ep: u32, pasid: u32, root: u64) -> ([u8; 124], u32) {
    wire::attach_table_vtd(domain, ep, wire::TABLE_F_PASID_VALID, pasid, root, 48)
}

fn inv_domain(domain: u32) -> ([u8; 60], u32) {
    wire::invalidate(&Invalidate {
        scope: wire::INV_SCOPE_DOMAIN,
        caches: wire::INV_CACHE_TLB,
        domain,
        ..Default::default()
    })
}

/// (iova, gpa, len) pieces of a successful dma reply.
fn dma_ok(
    ctl: &mut ControlClient,
    ep: u32,
    iova: u64,
    len: u64,
    write: bool,
) -> Vec<(u64, u64, u64)> {
    dma_pasid_ok(ctl, ep, None, iova, len, write)
}

fn dma_pasid_ok(
    ctl: &mut ControlClient,
    ep: u32,
    pasid: Option<u32>,
    iova: u64,
    len: u64,
    write: bool,
) -> Vec<(u64, u64, u64)> {
    let r = ctl.dma(ep, iova, len, write, pasid, None).unwrap();
    dma_ranges(&r).unwrap_or_else(|e| panic!("dma {iova:#x}+{len:#x}: {e}: {r}"))
}

fn dma_err(ctl: &mut ControlClient, ep: u32, pasid: Option<u32>, iova: u64, write: bool) -> String {
    let r: Value = ctl.dma(ep, iova, 4, write, pasid, None).unwrap();
    error_kind(&r)
        .unwrap_or_else(|| panic!("dma {iova:#x} succeeded: {r}"))
        .to_string()
}

#[test]
fn guest_tables_translate_4k_2m_and_1g_pages_with_permissions() {
    let b = backend(&["--bypass", "off"]);
    let mut f = connect(&b);
    let mut ctl = control(&b);
    let data = f.mem.alloc(PAGE_2M * 2, PAGE_2M).unwrap();
    let (root, huge) = {
        let mut t = tables(&f.mem, 48);
        t.map(0x10_0000, data, PAGE_4K, true);
        t.map(0x10_1000, data + 0x1000, PAGE_4K, false);
        t.map(0x4000_0000, data, PAGE_2M, true);
        // A 1 GiB page at iova 2^39 onto guest-physical 0 (only its first
        // bytes are RAM-checked by the dma below).
        t.map(1 << 39, 0, PAGE_1G, true);
        (t.root(), data)
    };
    assert_eq!(status(&mut f, vtd(1, EP, root)), S_OK);
    // Two 4 KiB pages contiguous in guest RAM: one piece, offset kept.
    assert_eq!(
        dma_ok(&mut ctl, EP, 0x10_0800, 0x1000, false),
        vec![(0x10_0800, data + 0x800, 0x1000)]
    );
    // The second page is read-only: a write faults there and a MAPPING
    // record names the address.
    assert_eq!(dma_err(&mut ctl, EP, None, 0x10_1000, true), "fault");
    assert_eq!(
        dma_ok(&mut ctl, EP, 0x4000_0000 + 0x1_2340, 0x100, true),
        vec![(0x4000_0000 + 0x1_2340, huge + 0x1_2340, 0x100)]
    );
    assert_eq!(
        dma_ok(&mut ctl, EP, (1 << 39) + 0x3000, 0x10, true),
        vec![((1 << 39) + 0x3000, 0x3000, 0x10)]
    );
    // Not mapped at all.
    assert_eq!(dma_err(&mut ctl, EP, None, 0x20_0000, false), "fault");
    f.post_event_buffers(2, 24).unwrap();
    let ev = f.collect_events(2).unwrap();
    let recs: Vec<EventRecord> = ev
        .iter()
        .map(|(_, b)| EventRecord::parse(b).unwrap())
        .collect();
    assert_eq!(recs[0].reason, wire::EVT_REASON_MAPPING);
    assert_eq!(recs[0].address, 0x10_1000);
    assert_eq!(recs[0].flags, wire::EVT_F_WRITE | wire::EVT_F_ADDRESS);
    assert_eq!(recs[1].address, 0x20_0000);
}

#[test]
fn write_needs_rw_at_every_level() {
    let b = backend(&[]);
    let mut f = connect(&b);
    let mut ctl = control(&b);
    let data = f.mem.alloc(PAGE_4K, PAGE_4K).unwrap();
    let root = {
        let mut t = tables(&f.mem, 48);
        t.map(0x40_0000, data, PAGE_4K, true);
        // Clear R/W on the page directory entry above the leaf.
        let pde = t.entry(0x40_0000, 2).unwrap();
        t.set_entry(0x40_0000, 2, pde & !PTE_RW);
        t.root()
    };
    assert_eq!(status(&mut f, vtd(1, EP, root)), S_OK);
    assert_eq!(
        dma_ok(&mut ctl, EP, 0x40_0000, 8, false),
        vec![(0x40_0000, data, 8)]
    );
    assert_eq!(dma_err(&mut ctl, EP, None, 0x40_0000, true), "fault");
}

/// VT-d first-stage semantics for virtual endpoints: an access is a user
/// request unless it asks for privilege, and a user request needs U/S at
/// every level (the kernel half of a process's page table, bound for SVA,
/// has U/S clear: a device bound to the process must not reach it); a
/// privileged request needs the attachment's SRE flag and ignores U/S.
#[test]
fn user_requests_need_us_at_every_level_and_privileged_ones_need_sre() {
    let b = backend(&[]);
    let mut f = connect(&b);
    let mut ctl = control(&b);
    let data = f.mem.alloc(2 * PAGE_4K, PAGE_4K).unwrap();
    let root = {
        let mut t = tables(&f.mem, 48);
        t.map(0x40_0000, data, PAGE_4K, true);
        t.map(0x80_0000, data + PAGE_4K, PAGE_4K, true);
        // A supervisor-only page directory above the second page.
        let pde = t.entry(0x80_0000, 2).unwrap();
        t.set_entry(0x80_0000, 2, pde & !PTE_US);
        t.root()
    };
    let dma = |ctl: &mut ControlClient, iova: u64, privileged: bool| {
        ctl.request(&serde_json::json!({
            "op": "dma", "endpoint": EP, "iova": iova, "len": 8, "privileged": privileged
        }))
        .unwrap()
    };
    // Without SRE.
    assert_eq!(status(&mut f, vtd(1, EP, root)), S_OK);
    assert_eq!(
        dma_ranges(&dma(&mut ctl, 0x40_0000, false)).unwrap(),
        vec![(0x40_0000, data, 8)]
    );
    let r = dma(&mut ctl, 0x80_0000, false);
    assert_eq!(
        error_kind(&r),
        Some("fault"),
        "a user request reached a supervisor page: {r}"
    );
    let r = dma(&mut ctl, 0x40_0000, true);
    assert_eq!(
        error_kind(&r),
        Some("fault"),
        "a privileged request without SRE: {r}"
    );
    // The fault records say which access faulted.
    f.post_event_buffers(2, 24).unwrap();
    let recs: Vec<EventRecord> = f
        .collect_events(2)
        .unwrap()
        .iter()
        .map(|(_, b)| EventRecord::parse(b).unwrap())
        .collect();
    assert_eq!(recs[0].address, 0x80_0000);
    assert_eq!(recs[0].flags, wire::EVT_F_READ | wire::EVT_F_ADDRESS);
    assert_eq!(recs[1].address, 0x40_0000);
    assert_eq!(
        recs[1].flags,
        wire::EVT_F_READ | wire::EVT_F_PRIV | wire::EVT_F_ADDRESS
    );
    // With SRE: privileged requests reach both pages; user ones still not
    // the supervisor page.
    let sre = wire::attach_table_vtd(2, EP, wire::TABLE_F_SRE, 0, root, 48);
    assert_eq!(status(&mut f, sre), S_OK);
    assert_eq!(
        dma_ranges(&dma(&mut ctl, 0x80_0000, true)).unwrap(),
        vec![(0x80_0000, data + PAGE_4K, 8)]
    );
    assert_eq!(error_kind(&dma(&mut ctl, 0x80_0000, false)), Some("fault"));
    let r = ctl
        .request(
            &serde_json::json!({"op": "dma", "endpoint": EP, "iova": 0, "len": 8, "privileged": 1}),
        )
        .unwrap();
    assert_eq!(error_kind(&r), Some("bad-request"), "{r}");
}

#[test]
fn five_level_tables() {
    let b = backend(&[]);
    let mut f = connect(&b);
    let mut ctl = control(&b);
    let data = f.mem.alloc(PAGE_4K, PAGE_4K).unwrap();
    let iova = 0x00ab_cdef_1234_5000u64 & ((1 << 56) - 1) & !0xfff;
    let root = {
        let mut t = tables(&f.mem, 57);
        t.map(iova, data, PAGE_4K, true);
        t.root()
    };
    assert_eq!(
        status(&mut f, wire::attach_table_vtd(1, EP, 0, 0, root, 57)),
        S_OK
    );
    assert_eq!(
        dma_ok(&mut ctl, EP, iova + 4, 4, true),
        vec![(iova + 4, data + 4, 4)]
    );
    // Beyond 48 bits: a 4-level table of the same domain kind would not reach.
    assert!(iova >> 48 != 0);
}

#[test]
fn table_outside_guest_ram_faults_instead_of_reading_it() {
    let b = backend(&[]);
    let mut f = connect(&b);
    let mut ctl = control(&b);
    let hole = f.mem.unmapped_gpa() & !0xfff;
    assert_eq!(status(&mut f, vtd(1, EP, hole)), S_OK);
    assert_eq!(dma_err(&mut ctl, EP, None, 0x1000, false), "fault");
}

#[test]
fn pasid_attachments_are_separate_address_spaces() {
    let b = backend(&[]);
    let mut f = connect(&b);
    let mut ctl = control(&b);
    let a = f.mem.alloc(PAGE_4K, PAGE_4K).unwrap();
    let c = f.mem.alloc(PAGE_4K, PAGE_4K).unwrap();
    let (root_a, root_c) = {
        let mut t = tables(&f.mem, 48);
        t.map(0x1_0000, a, PAGE_4K, true);
        let ra = t.root();
        let mut t2 = tables(&f.mem, 48);
        t2.map(0x1_0000, c, PAGE_4K, true);
        (ra, t2.root())
    };
    assert_eq!(status(&mut f, vtd_pasid(1, EP, 5, root_a)), S_OK);
    assert_eq!(status(&mut f, vtd_pasid(2, EP, 6, root_c)), S_OK);
    assert_eq!(
        dma_pasid_ok(&mut ctl, EP, Some(5), 0x1_0000, 4, false),
        vec![(0x1_0000, a, 4)]
    );
    assert_eq!(
        dma_pasid_ok(&mut ctl, EP, Some(6), 0x1_0000, 4, false),
        vec![(0x1_0000, c, 4)]
    );
    // Requests without PASID still bypass (not attached, bypass on); a
    // PASID with nothing attached is blocked.
    assert_eq!(
        dma_ok(&mut ctl, EP, 0x1_0000, 4, false),
        vec![(0x1_0000, 0x1_0000, 4)]
    );
    assert_eq!(dma_err(&mut ctl, EP, Some(7), 0x1_0000, false), "blocked");
    // A miss at a PASID: the record carries it.
    assert_eq!(dma_err(&mut ctl, EP, Some(5), 0x9_0000, false), "fault");
    f.post_event_buffers(2, 24).unwrap();
    let recs: Vec<EventRecord> = f
        .collect_events(2)
        .unwrap()
        .iter()
        .map(|(_, b)| EventRecord::parse(b).unwrap())
        .collect();
    assert_eq!(recs[0].reason, wire::EVT_REASON_DOMAIN);
    assert_eq!(
        (recs[0].flags & wire::EVT_F_PASID, recs[0].pasid),
        (wire::EVT_F_PASID, 7)
    );
    assert_eq!(recs[1].reason, wire::EVT_REASON_MAPPING);
    assert_eq!((recs[1].pasid, recs[1].address), (5, 0x9_0000));
    // Replace PASID 5's table with domain 2's, then DETACH domain 2 takes
    // both PASIDs of the endpoint.
    assert_eq!(status(&mut f, vtd_pasid(2, EP, 5, root_c)), S_OK);
    assert_eq!(
        dma_pasid_ok(&mut ctl, EP, Some(5), 0x1_0000, 4, false),
        vec![(0x1_0000, c, 4)]
    );
    assert_eq!(status(&mut f, wire::detach(2, EP)), S_OK);
    assert_eq!(dma_err(&mut ctl, EP, Some(5), 0x1_0000, false), "blocked");
    assert_eq!(dma_err(&mut ctl, EP, Some(6), 0x1_0000, false), "blocked");
    assert_eq!(status(&mut f, wire::detach(2, EP)), S_INVAL);
}

#[test]
fn shared_domains_replace_and_detach() {
    let b = backend(&["--bypass", "off"]);
    let mut f = connect(&b);
    let mut ctl = control(&b);
    let a = f.mem.alloc(PAGE_4K, PAGE_4K).unwrap();
    let c = f.mem.alloc(PAGE_4K, PAGE_4K).unwrap();
    let (root_a, root_c) = {
        let mut t = tables(&f.mem, 48);
        t.map(0x1_0000, a, PAGE_4K, true);
        let ra = t.root();
        let mut t2 = tables(&f.mem, 48);
        t2.map(0x1_0000, c, PAGE_4K, true);
        (ra, t2.root())
    };
    // Two endpoints share domain 1's table.
    assert_eq!(status(&mut f, vtd(1, EP, root_a)), S_OK);
    assert_eq!(status(&mut f, vtd(1, EP2, root_a)), S_OK);
    assert_eq!(
        dma_ok(&mut ctl, EP2, 0x1_0000, 4, true),
        vec![(0x1_0000, a, 4)]
    );
    // Joining with another table, or attaching a MAP/UNMAP endpoint: INVAL.
    assert_eq!(status(&mut f, vtd(1, EP2, root_c)), S_INVAL);
    assert_eq!(status(&mut f, wire::attach(1, EP2, 0, 0)), S_INVAL);
    assert_eq!(
        status(&mut f, wire::map(1, 0, 0xfff, 0, wire::MAP_F_READ)),
        S_INVAL
    );
    // Replace: EP moves to domain 2 (another table), EP2 stays.
    assert_eq!(status(&mut f, vtd(2, EP, root_c)), S_OK);
    assert_eq!(
        dma_ok(&mut ctl, EP, 0x1_0000, 4, true),
        vec![(0x1_0000, c, 4)]
    );
    assert_eq!(
        dma_ok(&mut ctl, EP2, 0x1_0000, 4, true),
        vec![(0x1_0000, a, 4)]
    );
    // Detach: with bypass off, blocked; the domain died with EP2.
    assert_eq!(status(&mut f, wire::detach(1, EP2)), S_OK);
    assert_eq!(dma_err(&mut ctl, EP2, None, 0x1_0000, false), "blocked");
    assert_eq!(status(&mut f, inv_domain(1)), S_NOENT);
    assert_eq!(status(&mut f, inv_domain(2)), S_OK);
}

#[test]
fn invalidate_validation_and_the_walker_has_no_stale_entries() {
    let b = backend(&[]);
    let mut f = connect(&b);
    let mut ctl = control(&b);
    let a = f.mem.alloc(PAGE_4K * 2, PAGE_4K).unwrap();
    let mem = f.mem.clone();
    let mut t = tables(&mem, 48);
    t.map(0x1_0000, a, PAGE_4K, true);
    let root = t.root();
    assert_eq!(status(&mut f, vtd(1, EP, root)), S_OK);
    assert_eq!(
        dma_ok(&mut ctl, EP, 0x1_0000, 4, false),
        vec![(0x1_0000, a, 4)]
    );
    // The guest changes its table: the walker caches nothing, so the new
    // entry is used at once, before and after INVALIDATE (no stale entry
    // can exist; spec-notes/nested.md).
    t.unmap(0x1_0000, PAGE_4K);
    t.map(0x1_0000, a + PAGE_4K, PAGE_4K, true);
    assert_eq!(
        dma_ok(&mut ctl, EP, 0x1_0000, 4, false),
        vec![(0x1_0000, a + PAGE_4K, 4)]
    );
    let addr = Invalidate {
        scope: wire::INV_SCOPE_ADDRESS,
        caches: wire::INV_CACHE_TLB,
        flags: wire::INV_F_LEAF,
        domain: 1,
        address: 0x1_0000,
        nr_pages: 1,
        page_size: 12,
        ..Default::default()
    };
    assert_eq!(status(&mut f, wire::invalidate(&addr)), S_OK);
    assert_eq!(
        dma_ok(&mut ctl, EP, 0x1_0000, 4, false),
        vec![(0x1_0000, a + PAGE_4K, 4)]
    );
    t.unmap(0x1_0000, PAGE_4K);
    assert_eq!(status(&mut f, inv_domain(1)), S_OK);
    assert_eq!(dma_err(&mut ctl, EP, None, 0x1_0000, false), "fault");
    // Refusals.
    let bad = |i: Invalidate| wire::invalidate(&i);
    assert_eq!(
        status(&mut f, bad(Invalidate { scope: 0, ..addr })),
        S_INVAL
    );
    assert_eq!(
        status(&mut f, bad(Invalidate { caches: 0, ..addr })),
        S_INVAL
    );
    assert_eq!(
        status(
            &mut f,
            bad(Invalidate {
                page_size: 11,
                ..addr
            })
        ),
        S_INVAL
    );
    assert_eq!(
        status(
            &mut f,
            bad(Invalidate {
                address: 0x1_0800,
                ..addr
            })
        ),
        S_INVAL
    );
    assert_eq!(
        status(
            &mut f,
            bad(Invalidate {
                address: !0xfff,
                nr_pages: 2,
                ..addr
            })
        ),
        S_RANGE
    );
    let mut r = addr;
    r.reserved[18] = 1;
    assert_eq!(status(&mut f, bad(r)), S_INVAL);
    assert_eq!(
        status(
            &mut f,
            bad(Invalidate {
                scope: wire::INV_SCOPE_PASID,
                address: 0,
                nr_pages: 0,
                page_size: 0,
                ..addr
            })
        ),
        S_INVAL,
        "PASID scope without PASID_VALID"
    );
    assert_eq!(
        status(&mut f, bad(Invalidate { domain: 9, ..addr })),
        S_NOENT
    );
    assert_eq!(status(&mut f, wire::attach(3, EP2, 0, 0)), S_OK);
    assert_eq!(
        status(&mut f, bad(Invalidate { domain: 3, ..addr })),
        S_INVAL
    );
}

#[test]
fn bad_descriptors_are_refused_with_the_named_status() {
    let b = backend(&["--max-pasids", "2"]);
    let mut f = connect(&b);
    let root = f.mem.alloc(PAGE_4K, PAGE_4K).unwrap();
    let vtd_raw =
        |flags, pasid, root, width| wire::attach_table_vtd(1, EP, flags, pasid, root, width);
    assert_eq!(
        status(&mut f, wire::attach_table(1, EP, 0x33, &[])),
        S_INVAL
    );
    assert_eq!(status(&mut f, vtd(1, 0x99, root)), S_NOENT);
    assert_eq!(status(&mut f, vtd_raw(0, 0, root, 39)), S_INVAL);
    assert_eq!(status(&mut f, vtd_raw(0, 0, root + 8, 48)), S_INVAL);
    assert_eq!(status(&mut f, vtd_raw(1 << 5, 0, root, 48)), S_INVAL);
    assert_eq!(
        status(&mut f, vtd_raw(0, 4, root, 48)),
        S_INVAL,
        "pasid without PASID_VALID"
    );
    assert_eq!(
        status(
            &mut f,
            vtd_raw(wire::TABLE_F_PASID_VALID, 1 << 20, root, 48)
        ),
        S_RANGE
    );
    let (mut r, w) = vtd(1, EP, root);
    r[14] = 1;
    assert_eq!(status(&mut f, (r, w)), S_INVAL);
    let (mut r, w) = vtd(1, EP, root);
    r[100] = 1;
    assert_eq!(status(&mut f, (r, w)), S_INVAL);
    // Formats a virtual endpoint does not walk.
    assert_eq!(
        status(&mut f, wire::attach_table_selftest(1, EP, 0, 0, 7)),
        S_UNSUPP
    );
    assert_eq!(
        status(&mut f, wire::attach_table_smmu3(1, EP, 1, 0)),
        S_UNSUPP
    );
    // The PASID bound.
    assert_eq!(status(&mut f, vtd_pasid(1, EP, 1, root)), S_OK);
    assert_eq!(status(&mut f, vtd_pasid(1, EP, 2, root)), S_OK);
    assert_eq!(status(&mut f, vtd_pasid(1, EP, 3, root)), S_NOMEM);
    let stats = control(&b).stats().unwrap();
    assert_eq!(stats["requests"]["attach_table"]["ok"], 2, "{stats}");
    // Beyond it, memory stays flat: 12 800 more PASIDs, all NOMEM.
    let flood = |f: &mut Frontend, k: u32| {
        let reqs: Vec<_> = (0..64)
            .map(|i| {
                let (r, w) = vtd_pasid(1, EP, 3 + k * 64 + i, root);
                (r.to_vec(), w)
            })
            .collect();
        for (_, w) in f.submit_batch(&reqs).unwrap() {
            assert_eq!(w[0], S_NOMEM);
        }
    };
    for k in 0..20 {
        flood(&mut f, k);
    }
    let rss0 = b.rss_kib().unwrap();
    for k in 20..220 {
        flood(&mut f, k);
    }
    let rss1 = b.rss_kib().unwrap();
    eprintln!("pasid bound: rss {rss0} KiB -> {rss1} KiB over 12800 refused PASIDs");
    assert!(rss1 <= rss0 + 512, "RSS grew from {rss0} to {rss1} KiB");
    f.disconnect();
    // PAGE_REQUESTS needs F_PAGE_REQUEST.
    let mut g = connect_with(
        &b,
        FrontendOptions::default().without(wire::VIRTIO_IOMMU_F_PAGE_REQUEST),
    );
    assert_eq!(
        status(
            &mut g,
            wire::attach_table_vtd(1, EP, wire::TABLE_F_PAGE_REQUESTS, 0, root, 48)
        ),
        S_INVAL,
        "PAGE_REQUESTS without F_PAGE_REQUEST"
    );
}

#[test]
fn extension_is_off_or_moved_by_option() {
    let b = backend(&["--attach-table-bit", "off"]);
    let mut f = connect(&b);
    assert_eq!(
        f.offered_features & bit(wire::VIRTIO_IOMMU_F_ATTACH_TABLE),
        0
    );
    let (r, w) = vtd(1, EP, 0x1000);
    assert_eq!(f.request(&r, w).unwrap().0, 0, "ATTACH_TABLE is unknown");
    f.disconnect();
    let b = backend(&["--attach-table-bit", "8"]);
    let mut f = connect(&b);
    assert_eq!(
        f.offered_features & bit(wire::VIRTIO_IOMMU_F_ATTACH_TABLE),
        0
    );
    assert_ne!(f.offered_features & bit(8), 0);
    let root = f.mem.alloc(PAGE_4K, PAGE_4K).unwrap();
    assert_eq!(status(&mut f, vtd(1, EP, root)), S_OK);
    f.disconnect();
    // A driver that does not take bit 8 sees no extension.
    let mut g = connect_with(&b, FrontendOptions::default().without(8));
    let (r, w) = vtd(1, EP, root);
    assert_eq!(g.request(&r, w).unwrap().0, 0);
}

#[test]
fn probe_describes_what_attach_table_can_do() {
    let b = backend(&[]);
    let mut f = connect(&b);
    let p = f.probe(EP).unwrap();
    assert_eq!(p.status, S_OK);
    let props = wire::parse_probe_props(&p.raw[..512]).unwrap();
    let table = props
        .iter()
        .find(|p| p.ty() == 0x100)
        .expect("table property");
    // pasid_bits 20, page requests, one format: INTEL_VTD (2).
    assert_eq!(&table.value[..5], &[20, 1, 1, 0, 2]);
    assert!(
        props.iter().all(|p| p.ty() != 0x101),
        "no HW_INFO on a virtual endpoint"
    );
    // TABLE_INTEL_VTD: the walker's widths and leaf sizes.
    let vtd = props
        .iter()
        .find(|p| p.ty() == 0x102)
        .expect("TABLE_INTEL_VTD property");
    assert_eq!(&vtd.value[..4], &[57, 52, 0, 0]);
    assert_eq!(
        u64::from_le_bytes(vtd.value[4..12].try_into().unwrap()),
        (1 << 12) | (1 << 21) | (1 << 30)
    );
    f.disconnect();
    let mut g = connect_with(
        &b,
        FrontendOptions::default().without(wire::VIRTIO_IOMMU_F_ATTACH_TABLE),
    );
    let p = g.probe(EP).unwrap();
    let props = wire::parse_probe_props(&p.raw[..512]).unwrap();
    assert_eq!(props.len(), 1, "RESV_MEM only: {props:?}");
}
