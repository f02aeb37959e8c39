// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Nested translation on the REAL /dev/iommu: ATTACH_TABLE with the
//! selftest mock's nested format becomes a nested HWPT on the nesting
//! parent of guest RAM, attached through MOCK_DOMAIN_REPLACE; INVALIDATE
//! becomes IOMMU_HWPT_INVALIDATE, and the kernel checks the mock IOTLB
//! (IOMMU_TEST_OP_MD_CHECK_IOTLB).
//!
//! Run inside a test guest by `tests/vm/kernel-tier.sh` (`--ignored`).
// Test code with known small values (sizes, counts, timings): these casts
// cannot truncate or wrap.
#![allow(clippy::cast_possible_truncation)]

mod support;

use serde_json::Value;
use support::host::HostRig;
use support::wire::{self, Invalidate, S_INVAL, S_NOENT, S_OK, S_UNSUPP};
use support::Frontend;

const EP: u32 = 0x10;
const EP2: u32 = 0x11;
const RAM_BASE: u64 = 1 << 24;
const MEM: usize = 16 << 20;
/// The value the kernel's own selftest seeds the mock IOTLB with.
const SEED: u32 = 0xbad_beef;
/// The selftest hw_info type and its test_reg.
const HW_INFO_SELFTEST: u32 = 0xfeed_beef;

fn rig() -> HostRig {
    HostRig::new(&["--endpoint", "0x10,selftest", "--endpoint", "0x11,selftest"])
}

fn connect(rig: &HostRig) -> Frontend {
    rig.connect_with(&[(RAM_BASE, MEM)])
}

fn status<R: AsRef<[u8]>>(f: &mut Frontend, req: (R, u32)) -> u8 {
    f.request_status(&req).expect("request answered")
}

fn u32_of(v: &Value) -> u32 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}")) as u32
}

fn table(domain: u32, ep: u32, iotlb: u32) -> ([u8; 124], u32) {
    wire::attach_table_selftest(domain, ep, 0, 0, iotlb)
}

fn inv(domain: u32, slot: Option<u64>) -> ([u8; 60], u32) {
    wire::invalidate(&Invalidate {
        scope: wire::INV_SCOPE_DOMAIN,
        caches: wire::INV_CACHE_TLB,
        flags: if slot.is_some() {
            wire::INV_F_ID_VALID
        } else {
            0
        },
        domain,
        id: slot.unwrap_or(0),
        ..Default::default()
    })
}

/// The four mock IOTLB slots of `hwpt`, as the kernel checks them.
fn iotlb_is(rig: &HostRig, hwpt: u32, want: [u32; 4]) -> bool {
    (0..4).all(|slot| {
        rig.fd
            .md_check_iotlb(hwpt, slot, want[slot as usize])
            .is_ok()
    })
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn attach_table_is_a_nested_hwpt_and_invalidate_reaches_the_mock_iotlb() {
    let mut rig = rig();
    let mut f = connect(&rig);
    assert_eq!(status(&mut f, table(1, EP, SEED)), S_OK);
    let d = rig.domain(1).expect("domain 1 on the host");
    assert_eq!(d["nested"], true, "{d}");
    let hwpt = u32_of(&d["hwpt"]);
    assert_eq!(rig.endpoint(EP)["pt_id"], hwpt, "attached by replace");
    assert!(
        iotlb_is(&rig, hwpt, [SEED; 4]),
        "the descriptor's iotlb reached the kernel"
    );
    // Negative control: the kernel does say no.
    assert!(rig.fd.md_check_iotlb(hwpt, 0, 0).is_err());
    // One slot by tag, then the whole domain.
    assert_eq!(status(&mut f, inv(1, Some(2))), S_OK);
    assert!(iotlb_is(&rig, hwpt, [SEED, SEED, 0, SEED]));
    assert_eq!(status(&mut f, inv(1, None)), S_OK);
    assert!(iotlb_is(&rig, hwpt, [0; 4]));
    // An ADDRESS-scope invalidation the mock cannot express by address is
    // widened to all slots, never narrowed.
    assert_eq!(status(&mut f, table(2, EP2, SEED)), S_OK);
    let hwpt2 = u32_of(&rig.domain(2).unwrap()["hwpt"]);
    let addr = Invalidate {
        scope: wire::INV_SCOPE_ADDRESS,
        caches: wire::INV_CACHE_TLB,
        domain: 2,
        address: 0x10_0000,
        nr_pages: 1,
        page_size: 12,
        ..Default::default()
    };
    assert_eq!(status(&mut f, wire::invalidate(&addr)), S_OK);
    assert!(iotlb_is(&rig, hwpt2, [0; 4]));
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn one_hwpt_per_domain_replace_and_detach_destroy_it() {
    let mut rig = rig();
    let mut f = connect(&rig);
    let bypass_pt = rig.host()["bypass_pt"].clone();
    assert_eq!(status(&mut f, table(1, EP, SEED)), S_OK);
    assert_eq!(status(&mut f, table(1, EP2, SEED)), S_OK);
    let d1 = rig.domain(1).unwrap();
    let hwpt1 = u32_of(&d1["hwpt"]);
    assert_eq!(d1["endpoints"], 2);
    assert_eq!(rig.endpoint(EP2)["pt_id"], hwpt1, "one HWPT, shared");
    // Another table in the same domain: refused, nothing moved.
    assert_eq!(status(&mut f, table(1, EP2, 5)), S_INVAL);
    assert_eq!(rig.endpoint(EP2)["pt_id"], hwpt1);
    // Replace EP's table with a new one (domain 2).
    assert_eq!(status(&mut f, table(2, EP, 7)), S_OK);
    let hwpt2 = u32_of(&rig.domain(2).unwrap()["hwpt"]);
    assert_ne!(hwpt1, hwpt2);
    assert_eq!(rig.endpoint(EP)["pt_id"], hwpt2);
    assert!(iotlb_is(&rig, hwpt2, [7; 4]));
    // Replace with a MAP/UNMAP domain, then DETACH EP2: domain 1 is gone
    // with its last endpoint, and so is its HWPT.
    assert_eq!(status(&mut f, wire::attach(3, EP2, 0, 0)), S_OK);
    assert!(rig.domain(1).is_none());
    assert_eq!(
        rig.fd.destroy(hwpt1).unwrap_err().errno(),
        Some(libc::ENOENT),
        "the nested HWPT of domain 1 was destroyed"
    );
    assert_eq!(status(&mut f, wire::detach(2, EP)), S_OK);
    assert_eq!(rig.endpoint(EP)["pt_id"], bypass_pt);
    assert_eq!(
        rig.fd.destroy(hwpt2).unwrap_err().errno(),
        Some(libc::ENOENT)
    );
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn refusals_of_the_device_and_of_the_kernel() {
    let mut rig = rig();
    let mut f = connect(&rig);
    // The mock takes its own format only.
    assert_eq!(
        status(&mut f, wire::attach_table_vtd(1, EP, 0, 0, RAM_BASE, 48)),
        S_UNSUPP
    );
    // PASIDs only where the kernel attaches them (6.15+), up to 20 bits.
    let pasid_mode = rig.host()["pasid_mode"] == true;
    let (want, pasid) = if pasid_mode {
        (wire::S_RANGE, 1 << 20)
    } else {
        (S_UNSUPP, 3)
    };
    assert_eq!(
        status(
            &mut f,
            wire::attach_table_selftest(1, EP, wire::TABLE_F_PASID_VALID, pasid, SEED)
        ),
        want
    );
    assert_eq!(status(&mut f, table(1, 0x99, SEED)), S_NOENT);
    assert!(rig.domain(1).is_none(), "no host object after refusals");
    assert_eq!(status(&mut f, table(1, EP, SEED)), S_OK);
    let hwpt = u32_of(&rig.domain(1).unwrap()["hwpt"]);
    // The kernel refuses IOTLB slot 9 (EINVAL): INVAL, nothing flushed.
    assert_eq!(status(&mut f, inv(1, Some(9))), S_INVAL);
    assert!(iotlb_is(&rig, hwpt, [SEED; 4]));
    let log = rig.backend.stderr();
    assert!(
        log.contains("IOMMU_HWPT_INVALIDATE failed: Invalid argument"),
        "{log}"
    );
    // A tag wider than 32 bits is widened to everything.
    assert_eq!(status(&mut f, inv(1, Some(1 << 40))), S_OK);
    assert!(iotlb_is(&rig, hwpt, [0; 4]));
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn consecutive_invalidations_of_a_batch_are_one_call() {
    let mut rig = rig();
    let mut f = connect(&rig);
    assert_eq!(status(&mut f, table(1, EP, SEED)), S_OK);
    assert_eq!(status(&mut f, table(2, EP2, SEED)), S_OK);
    let h1 = u32_of(&rig.domain(1).unwrap()["hwpt"]);
    let h2 = u32_of(&rig.domain(2).unwrap()["hwpt"]);
    let calls = |rig: &mut HostRig| rig.host()["invalidate_calls"].as_u64().unwrap();
    let c0 = calls(&mut rig);
    // One notification: slots 0 and 1 of domain 1, slot 3 of domain 2,
    // then slot 2 of domain 1 again: three runs, three calls.
    let batch = [
        inv(1, Some(0)),
        inv(1, Some(1)),
        inv(2, Some(3)),
        inv(1, Some(2)),
    ];
    let st: Vec<Option<u8>> = f
        .submit_batch(&batch)
        .unwrap()
        .into_iter()
        .map(|(used, w)| (used > 0).then(|| w[0]))
        .collect();
    assert_eq!(st, vec![Some(S_OK); 4]);
    assert_eq!(calls(&mut rig) - c0, 3);
    assert!(iotlb_is(&rig, h1, [0, 0, 0, SEED]));
    assert!(iotlb_is(&rig, h2, [SEED, SEED, SEED, 0]));
    // A run with one request the kernel refuses: every request still gets
    // its own status (the run is retried one by one).
    assert_eq!(status(&mut f, table(3, EP, SEED)), S_OK);
    let h3 = u32_of(&rig.domain(3).unwrap()["hwpt"]);
    let batch = [inv(3, Some(1)), inv(3, Some(9)), inv(3, Some(2))];
    let st: Vec<Option<u8>> = f
        .submit_batch(&batch)
        .unwrap()
        .into_iter()
        .map(|(used, w)| (used > 0).then(|| w[0]))
        .collect();
    assert_eq!(st, vec![Some(S_OK), Some(S_INVAL), Some(S_OK)]);
    assert!(iotlb_is(&rig, h3, [SEED, 0, 0, SEED]));
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn probe_passes_the_host_iommu_identification() {
    let mut rig = rig();
    let mut f = connect(&rig);
    let p = f.probe(EP).unwrap();
    assert_eq!(p.status, S_OK);
    let props = wire::parse_probe_props(&p.raw[..512]).unwrap();
    let t = props
        .iter()
        .find(|p| p.ty() == 0x100)
        .expect("TABLE property");
    // PASID width (20 where the kernel attaches PASIDs, else 0), page
    // requests (a fault queue, 6.11+), one format: HOST_SELFTEST.
    let bits = if rig.host()["pasid_mode"] == true {
        20
    } else {
        0
    };
    assert_eq!(&t.value[..5], &[bits, 1, 1, 0, 0xf0]);
    let h = props
        .iter()
        .find(|p| p.ty() == 0x101)
        .expect("HW_INFO property");
    let v = &h.value;
    assert_eq!(
        u32::from_le_bytes(v[0..4].try_into().unwrap()),
        HW_INFO_SELFTEST
    );
    let len = u32::from_le_bytes(v[16..20].try_into().unwrap()) as usize;
    assert!(len >= 8, "struct iommu_test_hw_info: {len}");
    // struct iommu_test_hw_info {flags, test_reg = 0xdeadbeef}.
    assert_eq!(
        u32::from_le_bytes(v[24..28].try_into().unwrap()),
        0xdead_beef
    );
}

fn pasid_table(domain: u32, ep: u32, pasid: u32, iotlb: u32) -> ([u8; 124], u32) {
    wire::attach_table_selftest(domain, ep, wire::TABLE_F_PASID_VALID, pasid, iotlb)
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn pasid_attach_replace_and_detach_on_the_kernel() {
    let mut rig = rig();
    let mut f = connect(&rig);
    // The mock's PASID ops and IOMMU_HWPT_ALLOC_PASID arrived in 6.15.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release
        .trim()
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    let has_pasid = (major, minor) >= (6, 15);
    assert_eq!(
        rig.host()["pasid_mode"] == true,
        has_pasid,
        "kernel {release}"
    );
    if !has_pasid {
        // 6.12: no PASID attach in the kernel; the device says so.
        assert_eq!(status(&mut f, pasid_table(1, EP, 5, SEED)), S_UNSUPP);
        assert!(rig.domain(1).is_none());
        return;
    }
    let stdev = u32_of(&rig.endpoint(EP)["device"]["stdev_id"]);
    let check =
        |rig: &HostRig, pasid, hwpt| rig.fd.mock_pasid_check_hwpt(stdev, pasid, hwpt).is_ok();
    assert!(check(&rig, 5, 0), "PASID 5 starts detached");
    assert_eq!(status(&mut f, pasid_table(1, EP, 5, SEED)), S_OK);
    let h1 = u32_of(&rig.domain(1).unwrap()["hwpt"]);
    assert!(
        check(&rig, 5, h1),
        "the kernel has PASID 5 on domain 1's HWPT"
    );
    assert!(!check(&rig, 5, 0), "negative control");
    assert!(check(&rig, 6, 0), "other PASIDs untouched");
    // The RID moves independently: a table, then back to bypass, then
    // blocked; PASID 5 stays.
    assert_eq!(status(&mut f, table(2, EP, SEED)), S_OK);
    assert_eq!(status(&mut f, wire::detach(2, EP)), S_OK);
    f.set_bypass(false).unwrap();
    let blocking = rig.host()["blocking_pt"].clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while rig.endpoint(EP)["pt_id"] != blocking {
        assert!(std::time::Instant::now() < deadline, "{}", rig.host());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(check(&rig, 5, h1));
    // INVALIDATE of a domain that holds a PASID only.
    assert_eq!(status(&mut f, inv(1, Some(0))), S_OK);
    assert!(iotlb_is(&rig, h1, [0, SEED, SEED, SEED]));
    // Replace PASID 5's table: domain 1 dies with its last attachment.
    assert_eq!(status(&mut f, pasid_table(3, EP, 5, 7)), S_OK);
    let h3 = u32_of(&rig.domain(3).unwrap()["hwpt"]);
    assert!(check(&rig, 5, h3));
    assert!(rig.domain(1).is_none());
    assert_eq!(rig.fd.destroy(h1).unwrap_err().errno(), Some(libc::ENOENT));
    // A second PASID and the RID in the same domain; DETACH takes all.
    assert_eq!(status(&mut f, pasid_table(3, EP, 6, 7)), S_OK);
    assert_eq!(status(&mut f, table(3, EP, 7)), S_OK);
    assert_eq!(rig.domain(3).unwrap()["endpoints"], 3);
    assert_eq!(status(&mut f, wire::detach(3, EP)), S_OK);
    assert!(check(&rig, 5, 0) && check(&rig, 6, 0));
    assert!(rig.domain(3).is_none());
    assert_eq!(rig.fd.destroy(h3).unwrap_err().errno(), Some(libc::ENOENT));
    // Attached PASIDs at disconnect: all torn down, nothing pinned.
    assert_eq!(status(&mut f, pasid_table(4, EP, 9, SEED)), S_OK);
    let h4 = u32_of(&rig.domain(4).unwrap()["hwpt"]);
    let mem = f.mem.clone();
    f.disconnect();
    rig.wait_idle();
    assert!(check(&rig, 9, 0));
    assert_eq!(rig.fd.destroy(h4).unwrap_err().errno(), Some(libc::ENOENT));
    rig.fd
        .md_check_refs(mem.uva(RAM_BASE).unwrap(), MEM as u64, 0)
        .expect("no pin left after disconnect");
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn disconnect_destroys_nested_hwpts() {
    let mut rig = rig();
    let mut hwpts = Vec::new();
    for _ in 0..3 {
        let mut f = connect(&rig);
        assert_eq!(status(&mut f, table(1, EP, SEED)), S_OK);
        assert_eq!(status(&mut f, table(1, EP2, SEED)), S_OK);
        hwpts.push(u32_of(&rig.domain(1).unwrap()["hwpt"]));
        let mem = f.mem.clone();
        f.disconnect();
        rig.wait_idle();
        rig.fd
            .md_check_refs(mem.uva(RAM_BASE).unwrap(), MEM as u64, 0)
            .expect("no pin left after disconnect");
    }
    for h in hwpts {
        assert_eq!(rig.fd.destroy(h).unwrap_err().errno(), Some(libc::ENOENT));
    }
}
