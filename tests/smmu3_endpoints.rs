// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! ARM_SMMU3 tables on a real SMMUv3: a VFIO endpoint (`VIOMMU_VFIO_CDEV`)
//! behind an Arm SMMUv3 with nesting. Run by tests/vm/arm64-tier.sh inside
//! an aarch64 guest whose QEMU emulates an SMMUv3 with both stages, with a
//! pci-testdev bound to vfio-pci; or on an Arm host with such a device.
//!
//! What it proves: the endpoint offers the ARM_SMMU3 format with the SMMU's
//! registers in PROBE; the backend made an SMMUv3 vIOMMU on the nesting
//! parent and a vDEVICE for the endpoint; ATTACH_TABLE with the guest's STE
//! becomes a nested HWPT the kernel attaches the device to (stage-1, abort
//! and bypass STEs), replaced and detached as the guest asks; INVALIDATE
//! becomes SMMUv3 commands the kernel accepts on the vIOMMU (one call per
//! run of requests); STEs the kernel would refuse are INVAL before any host
//! call. A pci-testdev does no DMA: translations are observed with QEMU's
//! edu device in tests/dma_smmu3.rs.

mod support;

use support::host::HostRig;
use support::wire::{self, Invalidate, S_INVAL, S_OK};
use support::Frontend;

const EP: u32 = 0x8;
const MEM: usize = 16 << 20;
const FORMAT_ARM_SMMU3: u8 = 1;
const HW_INFO_ARM_SMMUV3: u32 = 2;

// STE word 0: V, Config (bits 3:1), S1ContextPtr (bits 51:6).
const V: u64 = 1;
const CFG_ABORT: u64 = 0;
const CFG_BYPASS: u64 = 4 << 1;
const CFG_S1: u64 = 5 << 1;
const CFG_S2: u64 = 6 << 1;

fn cdev() -> String {
    std::env::var("VIOMMU_VFIO_CDEV")
        .expect("VIOMMU_VFIO_CDEV names the VFIO cdev (/dev/vfio/devices/vfioN) to use")
}

fn status<R: AsRef<[u8]>>(f: &mut Frontend, req: (R, u32)) -> u8 {
    f.request_status(&req).expect("request answered")
}

fn tlb(domain: u32, scope: u8, flags: u16, id: u64) -> ([u8; 60], u32) {
    wire::invalidate(&Invalidate {
        scope,
        caches: wire::INV_CACHE_TLB,
        flags,
        domain,
        id,
        ..Default::default()
    })
}

#[test]
#[ignore = "needs a VFIO cdev behind an SMMUv3 in VIOMMU_VFIO_CDEV: run by tests/vm/arm64-tier.sh"]
fn smmu3_tables_nest_on_the_vsmmu() {
    let ep = format!("{EP:#x},vfio={}", cdev());
    let mut rig = HostRig::new(&["--endpoint", &ep]);
    let h = rig.host();
    assert!(h["viommu"].is_u64(), "an SMMUv3 vIOMMU: {h}");
    let e = rig.endpoint(EP);
    assert!(e["vdevice"].is_u64(), "a vDEVICE for the endpoint: {e}");
    assert_eq!(e["table_formats"], serde_json::json!([FORMAT_ARM_SMMU3]));

    let mut f = rig.connect_with(&[(0, MEM)]);
    // PROBE: the TABLE property names ARM_SMMU3, HW_INFO the SMMU's type.
    let p = f.probe(EP).unwrap();
    assert_eq!(p.status, S_OK);
    let props = wire::parse_probe_props(&p.raw[..512]).unwrap();
    let t = props.iter().find(|p| p.ty() == 0x100).expect("TABLE");
    assert_eq!(t.value[2], 1, "one format: {:?}", t.value);
    assert_eq!(t.value[4], FORMAT_ARM_SMMU3);
    let hw = props.iter().find(|p| p.ty() == 0x101).expect("HW_INFO");
    assert_eq!(
        u32::from_le_bytes(hw.value[0..4].try_into().unwrap()),
        HW_INFO_ARM_SMMUV3
    );

    // A stage-1 STE naming a one-entry linear CD table in guest memory.
    let cd = f.mem.alloc(64, 64).unwrap();
    let s1 = V | CFG_S1 | cd;
    assert_eq!(status(&mut f, wire::attach_table_smmu3(9, EP, s1, 0)), S_OK);
    let d9 = rig.domain(9).expect("domain 9 has host objects");
    assert_eq!(d9["nested"], true);
    assert_eq!(rig.endpoint(EP)["pt_id"], d9["hwpt"], "attached to it");
    assert_eq!(rig.endpoint(EP)["target"], 9);

    // INVALIDATE: each is one IOMMU_HWPT_INVALIDATE on the vIOMMU that the
    // kernel accepted (a refusal would be a status other than OK).
    let calls = |rig: &mut HostRig| rig.host()["invalidate_calls"].as_u64().unwrap();
    let before = calls(&mut rig);
    let cfg = wire::invalidate(&Invalidate {
        scope: wire::INV_SCOPE_DOMAIN,
        caches: wire::INV_CACHE_CONFIG | wire::INV_CACHE_TLB,
        domain: 9,
        ..Default::default()
    });
    assert_eq!(status(&mut f, cfg), S_OK, "CFGI_CD_ALL + TLBI_NH_ALL");
    assert_eq!(
        status(
            &mut f,
            tlb(
                9,
                wire::INV_SCOPE_PASID,
                wire::INV_F_PASID_VALID | wire::INV_F_ID_VALID,
                1
            )
        ),
        S_OK,
        "TLBI_NH_ASID"
    );
    let va = wire::invalidate(&Invalidate {
        scope: wire::INV_SCOPE_ADDRESS,
        caches: wire::INV_CACHE_TLB,
        flags: wire::INV_F_ID_VALID | wire::INV_F_LEAF,
        domain: 9,
        id: 1,
        address: 0x10_0000,
        nr_pages: 2,
        page_size: 12,
        ..Default::default()
    });
    assert_eq!(status(&mut f, va), S_OK, "TLBI_NH_VA x2");
    let vaa = wire::invalidate(&Invalidate {
        scope: wire::INV_SCOPE_ADDRESS,
        caches: wire::INV_CACHE_TLB,
        domain: 9,
        address: 0x20_0000,
        nr_pages: 1,
        page_size: 21,
        ..Default::default()
    });
    assert_eq!(status(&mut f, vaa), S_OK, "2 MiB without ASID: TLBI_NH_ALL");
    assert_eq!(calls(&mut rig), before + 4);
    // A run of INVALIDATEs in one notification: one call.
    let run: Vec<_> = (0..8)
        .map(|i| {
            tlb(
                9,
                wire::INV_SCOPE_PASID,
                wire::INV_F_PASID_VALID | wire::INV_F_ID_VALID,
                i,
            )
        })
        .collect();
    for (used, w) in f.submit_batch(&run).unwrap() {
        assert!(used >= 4 && w[0] == S_OK, "{w:?}");
    }
    assert_eq!(calls(&mut rig), before + 5);

    // STEs the kernel refuses are INVAL here, before any host call: a
    // stage-2 Config (the host's), a field outside the guest's list.
    let domains = rig.host()["domains"].as_array().unwrap().len();
    assert_eq!(
        status(&mut f, wire::attach_table_smmu3(10, EP, V | CFG_S2 | cd, 0)),
        S_INVAL
    );
    assert_eq!(
        status(&mut f, wire::attach_table_smmu3(10, EP, s1, 1 << 40)),
        S_INVAL
    );
    // The same domain with another table: INVAL, nothing moves.
    assert_eq!(
        status(&mut f, wire::attach_table_smmu3(9, EP, V | CFG_BYPASS, 0)),
        S_INVAL
    );
    assert_eq!(rig.host()["domains"].as_array().unwrap().len(), domains);
    assert_eq!(rig.endpoint(EP)["target"], 9);

    // Replace: an abort STE, then a bypass STE; each old domain goes.
    assert_eq!(
        status(&mut f, wire::attach_table_smmu3(10, EP, V | CFG_ABORT, 0)),
        S_OK
    );
    assert!(rig.domain(9).is_none(), "the last endpoint left domain 9");
    let d10 = rig.domain(10).unwrap();
    assert_eq!(rig.endpoint(EP)["pt_id"], d10["hwpt"]);
    assert_eq!(
        status(&mut f, wire::attach_table_smmu3(11, EP, V | CFG_BYPASS, 0)),
        S_OK
    );
    assert!(rig.domain(10).is_none());
    // Back to a stage-1 table, then DETACH: the device leaves the nested
    // HWPT for bypass (boot default), and the domain goes.
    assert_eq!(
        status(&mut f, wire::attach_table_smmu3(12, EP, s1, 0)),
        S_OK
    );
    assert_eq!(status(&mut f, wire::detach(12, EP)), S_OK);
    assert!(rig.domain(12).is_none());
    let h = rig.host();
    assert_eq!(rig.endpoint(EP)["pt_id"], h["bypass_pt"], "{h}");

    // Disconnect: every domain goes; the vIOMMU and vDEVICE stay with the
    // device for the next guest, which can attach again.
    assert_eq!(
        status(&mut f, wire::attach_table_smmu3(13, EP, s1, 0)),
        S_OK
    );
    f.disconnect();
    let h = rig.wait_idle();
    assert!(h["domains"].as_array().unwrap().is_empty(), "{h}");
    let mut f = rig.connect_with(&[(0, MEM)]);
    let cd = f.mem.alloc(64, 64).unwrap();
    assert_eq!(
        status(&mut f, wire::attach_table_smmu3(1, EP, V | CFG_S1 | cd, 0)),
        S_OK
    );
}
