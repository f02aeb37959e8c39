// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Host endpoints on the REAL /dev/iommu: the socket-level harness drives
//! our binary, whose endpoints are the kernel's iommufd selftest mock
//! devices (`--endpoint ID,selftest`), and the kernel itself checks what
//! we did (IOMMU_TEST_OP_MD_CHECK_MAP, MD_CHECK_REFS).
//!
//! The test shares its iommufd with the backend (`--iommufd-fd`), so object
//! ids the backend reports on its control socket (`{"op":"host"}`) are valid
//! here too. Needs a kernel with CONFIG_IOMMUFD_TEST: `tests/vm/kernel-tier.sh`
//! builds this file static and runs it inside a test guest with `--ignored`.
// Test code with known small values (sizes, counts, timings): these casts
// cannot truncate or wrap.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::host::HostRig;
use support::wire::{self, S_FAULT, S_INVAL, S_NOENT, S_OK};
use support::{BackendProcess, Frontend};

const EP: u32 = 0x10;
const EP2: u32 = 0x11;
const VIRT: u32 = 0x20;
const RW: u32 = wire::MAP_F_READ | wire::MAP_F_WRITE;
/// The selftest mock's IOVA aperture.
const APERTURE: (u64, u64) = (1 << 24, (1 << 31) - 1);
/// Guest RAM sits inside the aperture, so bypass (IOVA = GPA) can reach it.
const RAM_BASE: u64 = APERTURE.0;
const MEM: usize = 16 << 20;

/// Two selftest mock devices and one virtual endpoint, on the test's iommufd.
fn rig() -> HostRig {
    HostRig::new(&[
        "--endpoint",
        "0x10,selftest",
        "--endpoint",
        "0x11,selftest",
        "--endpoint",
        "0x20",
    ])
}

/// A guest whose RAM the mock devices can reach at IOVA = GPA.
fn connect(rig: &HostRig) -> Frontend {
    rig.connect_with(&[(RAM_BASE, MEM)])
}

fn u32_of(v: &Value) -> u32 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}")) as u32
}

fn status<R: AsRef<[u8]>>(f: &mut Frontend, req: (R, u32)) -> u8 {
    f.request_status(&req).expect("request answered")
}

/// Does the kernel's page table of `hwpt` map [iova, +len) onto guest RAM
/// at `gpa`? (Our own mapping of the memfd is the same pages.)
fn kernel_maps(rig: &HostRig, f: &Frontend, hwpt: u32, iova: u64, gpa: u64, len: u64) -> bool {
    let uptr = f.mem.uva(gpa).unwrap();
    rig.fd.md_check_map(hwpt, iova, len, uptr).is_ok()
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn startup_reports_kernel_features_and_binds_mock_devices() {
    let mut rig = rig();
    let h = rig.host();
    assert_eq!(h["kind"], "iommufd");
    assert_eq!(h["features"]["selftest"], true, "{h}");
    assert!(h["nest_parent"].is_u64(), "mock supports NEST_PARENT: {h}");
    let eps = h["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2, "only the selftest endpoints are host ones");
    for e in eps {
        assert_eq!(e["device"]["kind"], "selftest");
        // No guest yet: blocked.
        assert_eq!(e["target"], "unattached");
        assert_eq!(e["pt_id"], h["blocking_pt"]);
    }
    // A guest's memory table arrives; bypass is on at boot, so unattached
    // endpoints now see guest RAM.
    let _f = connect(&rig);
    let h = rig.host();
    for e in h["endpoints"].as_array().unwrap() {
        assert_eq!(e["pt_id"], h["bypass_pt"], "{h}");
    }
    let log = rig.backend.stderr();
    assert!(log.contains("IOMMU_TEST_CMD yes"), "{log}");
    // The test kernels have seccomp: every kernel-tier test runs filtered.
    assert!(log.contains("seccomp filter: Kill"), "{log}");
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn map_and_unmap_reach_the_kernel_page_table() {
    let mut rig = rig();
    let mut f = connect(&rig);
    assert_eq!(status(&mut f, wire::attach(1, EP, 0, 0)), S_OK);
    let hwpt = u32_of(&rig.domain(1).expect("domain 1 is on the host")["hwpt"]);
    assert_eq!(rig.endpoint(EP)["pt_id"], hwpt);
    let gpa = f.mem.alloc(0x10000, 0x10000).unwrap();
    let iova = 0x100_0000;
    assert!(!kernel_maps(&rig, &f, hwpt, iova, gpa, 0x10000));
    assert_eq!(
        status(&mut f, wire::map(1, iova, iova + 0xffff, gpa, RW)),
        S_OK
    );
    assert!(kernel_maps(&rig, &f, hwpt, iova, gpa, 0x10000));
    // Negative control: the same IOVA is not mapped onto other pages.
    assert!(!kernel_maps(&rig, &f, hwpt, iova, gpa + 0x10000, 0x10000));
    // A second, adjacent mapping, then UNMAP of exactly the first.
    assert_eq!(
        status(
            &mut f,
            wire::map(1, iova + 0x10000, iova + 0x10fff, gpa, wire::MAP_F_READ)
        ),
        S_OK
    );
    assert!(kernel_maps(&rig, &f, hwpt, iova + 0x10000, gpa, 0x1000));
    assert_eq!(status(&mut f, wire::unmap(1, iova, iova + 0xffff)), S_OK);
    assert!(!kernel_maps(&rig, &f, hwpt, iova, gpa, 0x1000));
    assert!(kernel_maps(&rig, &f, hwpt, iova + 0x10000, gpa, 0x1000));
    // UNMAP that would split the remaining mapping: RANGE, still mapped.
    assert_eq!(
        status(&mut f, wire::unmap(1, iova + 0x10000, iova + 0x107ff)),
        wire::S_RANGE
    );
    assert!(kernel_maps(&rig, &f, hwpt, iova + 0x10000, gpa, 0x1000));
    // UNMAP of a range covering everything.
    assert_eq!(status(&mut f, wire::unmap(1, 0, u64::MAX)), S_OK);
    assert!(!kernel_maps(&rig, &f, hwpt, iova + 0x10000, gpa, 0x1000));
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn kernel_refusals_become_statuses_and_change_nothing() {
    let mut rig = rig();
    let mut f = connect(&rig);
    assert_eq!(status(&mut f, wire::attach(1, EP, 0, 0)), S_OK);
    let gpa = f.mem.alloc(0x2000, 0x1000).unwrap();
    // Below the mock's aperture: the kernel refuses (EINVAL) -> INVAL.
    assert_eq!(
        status(&mut f, wire::map(1, 0x1000, 0x1fff, gpa, RW)),
        S_INVAL
    );
    // Not guest RAM: FAULT, nothing mapped.
    assert_eq!(
        status(&mut f, wire::map(1, 0x200_0000, 0x200_0fff, 1 << 40, RW)),
        S_FAULT
    );
    // The refused MAPs left no mapping behind: the same range maps now.
    assert_eq!(
        status(&mut f, wire::map(1, 0x200_0000, 0x200_0fff, gpa, RW)),
        S_OK
    );
    let s = rig.control.stats().unwrap();
    assert_eq!(s["requests"]["map"]["inval"], 1, "{s}");
    assert_eq!(s["requests"]["map"]["fault"], 1, "{s}");
    // Unknown endpoint: refused by the device state before the host.
    assert_eq!(status(&mut f, wire::attach(2, 0x99, 0, 0)), S_NOENT);
    let log = rig.backend.stderr();
    // The request, its domain and the kernel's errno are in the log.
    assert!(
        log.contains("request MAP domain 1: host: IOMMU_IOAS_COPY failed: Invalid argument"),
        "{log}"
    );
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn probe_reports_the_holes_of_the_device_iova_ranges() {
    let rig = rig();
    let mut f = connect(&rig);
    let p = f.probe(EP).unwrap();
    assert_eq!(p.status, S_OK);
    let mut r: Vec<(u8, u64, u64)> = p
        .resv_mem()
        .unwrap()
        .iter()
        .map(|m| (m.subtype, m.start, m.end))
        .collect();
    r.sort_by_key(|x| x.1);
    let (msi_s, msi_e) = (0xfee0_0000, 0xfeef_ffff);
    assert_eq!(
        r,
        vec![
            (0, 0, APERTURE.0 - 1),
            (0, APERTURE.1 + 1, msi_s - 1),
            (1, msi_s, msi_e),
            (0, msi_e + 1, u64::MAX),
        ]
    );
    // A virtual endpoint keeps the platform's MSI window only.
    let v = f.probe(VIRT).unwrap().resv_mem().unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!((v[0].subtype, v[0].start), (1, msi_s));
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn attach_replace_share_and_detach() {
    let mut rig = rig();
    let mut f = connect(&rig);
    let bypass_pt = rig.host()["bypass_pt"].clone();
    let blocking = rig.host()["blocking_pt"].clone();
    assert_eq!(status(&mut f, wire::attach(1, EP, 0, 0)), S_OK);
    let d1 = rig.domain(1).unwrap();
    // Move (replace) to domain 2: domain 1's objects are destroyed.
    assert_eq!(status(&mut f, wire::attach(2, EP, 0, 0)), S_OK);
    let d2 = rig.domain(2).unwrap();
    assert_eq!(rig.endpoint(EP)["pt_id"], d2["hwpt"]);
    assert!(rig.domain(1).is_none());
    let gone = rig.fd.destroy(u32_of(&d1["ioas"])).unwrap_err();
    assert_eq!(gone.errno(), Some(libc::ENOENT), "domain 1's IOAS is gone");
    // A second device joins domain 2 with its mappings: the same HWPT.
    let gpa = f.mem.alloc(0x1000, 0x1000).unwrap();
    assert_eq!(
        status(&mut f, wire::map(2, 0x300_0000, 0x300_0fff, gpa, RW)),
        S_OK
    );
    assert_eq!(status(&mut f, wire::attach(2, EP2, 0, 0)), S_OK);
    assert_eq!(rig.endpoint(EP2)["pt_id"], d2["hwpt"]);
    assert_eq!(rig.domain(2).unwrap()["endpoints"], 2);
    // A virtual endpoint in the same domain does not count on the host.
    assert_eq!(status(&mut f, wire::attach(2, VIRT, 0, 0)), S_OK);
    assert_eq!(rig.domain(2).unwrap()["endpoints"], 2);
    // Detach: back to bypass (on at boot); the domain lives on with EP2.
    assert_eq!(status(&mut f, wire::detach(2, EP)), S_OK);
    assert_eq!(rig.endpoint(EP)["pt_id"], bypass_pt);
    assert_eq!(rig.endpoint(EP)["target"], "unattached");
    // Bypass off: unattached host endpoints are blocked.
    f.set_bypass(false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.endpoint(EP)["pt_id"] != blocking {
        assert!(Instant::now() < deadline, "{}", rig.host());
        std::thread::sleep(Duration::from_millis(10));
    }
    // A bypass domain: identity through the RAM page table.
    assert_eq!(
        status(&mut f, wire::attach(3, EP, wire::ATTACH_F_BYPASS, 0)),
        S_OK
    );
    assert_eq!(rig.endpoint(EP)["pt_id"], bypass_pt);
    assert_eq!(rig.endpoint(EP)["target"], "identity");
    // Last host endpoint leaves domain 2: its objects go.
    assert_eq!(status(&mut f, wire::detach(2, EP2)), S_OK);
    assert!(rig.domain(2).is_none());
    assert_eq!(
        rig.fd.destroy(u32_of(&d2["ioas"])).unwrap_err().errno(),
        Some(libc::ENOENT)
    );
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn guest_ram_is_stage_2_and_pinned_once() {
    let mut rig = rig();
    let mut f = connect(&rig);
    let h = rig.host();
    let ram = h["ram"].as_array().unwrap();
    assert_eq!(ram.len(), 1, "{h}");
    assert_eq!(
        (ram[0]["gpa"].as_u64(), ram[0]["len"].as_u64()),
        (Some(RAM_BASE), Some(MEM as u64))
    );
    // Bypass: IOVA = GPA in the nesting parent.
    let parent = u32_of(&h["nest_parent"]);
    let gpa = f.mem.alloc(0x4000, 0x1000).unwrap();
    assert!(kernel_maps(&rig, &f, parent, gpa, gpa, 0x4000));
    // Every page of guest RAM has exactly one pin ...
    let base = f.mem.uva(RAM_BASE).unwrap();
    rig.fd
        .md_check_refs(base, MEM as u64, 1)
        .expect("one pin per page");
    // ... and MAP copies from the RAM IOAS without pinning again.
    assert_eq!(status(&mut f, wire::attach(1, EP, 0, 0)), S_OK);
    assert_eq!(status(&mut f, wire::attach(1, EP2, 0, 0)), S_OK);
    for i in 0..16u64 {
        let iova = 0x400_0000 + i * 0x1_0000;
        assert_eq!(
            status(
                &mut f,
                wire::map(1, iova, iova + 0xffff, RAM_BASE + i * 0x1_0000, RW)
            ),
            S_OK
        );
    }
    rig.fd
        .md_check_refs(base, MEM as u64, 1)
        .expect("still one pin");
    f.disconnect();
    rig.wait_idle();
    // RAM partly below the aperture: only the reachable part is mapped; a
    // MAP of the rest answers FAULT.
    let mut f = rig.connect_with(&[(0, 2 * MEM)]);
    let h = rig.host();
    let ram = h["ram"].as_array().unwrap();
    assert_eq!(ram.len(), 1, "{h}");
    assert_eq!(
        (ram[0]["gpa"].as_u64(), ram[0]["len"].as_u64()),
        (Some(RAM_BASE), Some(MEM as u64))
    );
    assert_eq!(status(&mut f, wire::attach(1, EP, 0, 0)), S_OK);
    assert_eq!(
        status(&mut f, wire::map(1, 0x400_0000, 0x400_0fff, 0x1000, RW)),
        S_FAULT
    );
    assert_eq!(
        status(&mut f, wire::map(1, 0x400_0000, 0x400_0fff, RAM_BASE, RW)),
        S_OK
    );
    assert!(rig
        .backend
        .stderr()
        .contains("outside the devices' usable IOVA ranges"));
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn disconnect_and_reset_tear_down_everything() {
    let mut rig = rig();
    let mut ioases = Vec::new();
    for round in 0..3 {
        let mut f = connect(&rig);
        for (d, ep) in [(1, EP), (2, EP2)] {
            assert_eq!(
                status(&mut f, wire::attach(d, ep, 0, 0)),
                S_OK,
                "round {round}"
            );
            let gpa = f.mem.alloc(0x1000, 0x1000).unwrap();
            assert_eq!(
                status(&mut f, wire::map(d, 0x500_0000, 0x500_0fff, gpa, RW)),
                S_OK
            );
            ioases.push(u32_of(&rig.domain(d).unwrap()["ioas"]));
        }
        let base = f.mem.uva(RAM_BASE).unwrap();
        rig.fd.md_check_refs(base, MEM as u64, 1).unwrap();
        let mem = f.mem.clone();
        f.disconnect();
        let h = rig.wait_idle();
        // Devices are blocked between guests, and nothing stays pinned.
        for e in h["endpoints"].as_array().unwrap() {
            assert_eq!(e["pt_id"], h["blocking_pt"], "{h}");
        }
        rig.fd
            .md_check_refs(mem.uva(RAM_BASE).unwrap(), MEM as u64, 0)
            .expect("no pin left after disconnect");
    }
    for id in ioases {
        assert_eq!(rig.fd.destroy(id).unwrap_err().errno(), Some(libc::ENOENT));
    }
    // The backend serves the next guest normally.
    let mut f = connect(&rig);
    assert_eq!(status(&mut f, wire::attach(1, EP, 0, 0)), S_OK);
    assert!(rig.backend.child.try_wait().unwrap().is_none());
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by tests/vm/kernel-tier.sh"]
fn an_endpoint_that_cannot_be_opened_is_a_one_line_error() {
    let mut b = BackendProcess::spawn_raw(&[
        "--socket-path",
        "{dir}/s",
        "--endpoint",
        "0x10,vfio=/dev/vfio/devices/vfio99",
    ])
    .unwrap();
    let st = b.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(st.code(), Some(1));
    let err = b.stderr();
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("vhost-device-iommu: endpoint 0x10: open VFIO cdev failed"),
        "{err}"
    );
}
