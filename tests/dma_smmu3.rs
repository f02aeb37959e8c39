// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Real DMA through a stage-1 table the guest binds with ATTACH_TABLE
//! ARM_SMMU3: QEMU's `edu` device (`VIOMMU_EDU_CDEV`, bound to vfio-pci) as
//! a VFIO endpoint behind QEMU's emulated SMMUv3 in nested mode, its DMA
//! engine driven from BAR0 by the test (tests/support/edu.rs).
//!
//! Run by tests/vm/arm64-tier.sh. The test writes what a Linux SMMUv3 guest
//! builds in its RAM (the frontend's memfd): one context descriptor (ASID 1,
//! 4 KiB granule, 39-bit input: three levels) and its LPAE tables, and binds
//! it with a stage-1 STE. The emulated SMMU walks the CD and the tables at
//! their guest-physical addresses through stage 2 (the IOAS with the
//! frontend's RAM our backend maps), then the page the leaf names through
//! stage 2 again: the bytes must land in exactly that page of the memfd.
//! The SMMU caches translations in its IOTLB: after a PTE change the DMA
//! still reaches the old page until an INVALIDATE (TLBI_NH_VA on the
//! vIOMMU) reaches it. A DMA to an IOVA without a PTE is a translation
//! fault the SMMU records (CD.R); the kernel reports it on our vEVENTQ and
//! the backend relays a record to the eventq.
// Test code with known small values (offsets, lengths): these casts cannot
// truncate or wrap.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::time::Duration;

use support::edu::{all, note, page_with, pattern, DmaRig, BUF_SIZE, XFER};
use support::wire::{self, Invalidate, S_OK};

const EP: u32 = 0x10;
const FILL: u8 = 0x5a;
/// Where in the destination page the bytes go.
const DST_OFF: u64 = 0x400;
const ASID: u64 = 1;

// IOVAs below 256 MiB (the edu's DMA mask), in one last-level table.
const IOVA_A: u64 = 0x0100_0000;
const IOVA_B: u64 = 0x0100_1000;
const IOVA_UNMAPPED: u64 = 0x0100_8000;

// STE word 0: V, Config S1 (bits 3:1 = 0b101), S1ContextPtr (bits 51:6).
const STE_V: u64 = 1;
const STE_CFG_S1: u64 = 5 << 1;

// CD word 0 (Linux arm-smmu-v3.h CTXDESC_CD_0_*).
const T0SZ: u64 = 64 - 39;
const CD_IRGN0_WBWA: u64 = 1 << 8;
const CD_ORGN0_WBWA: u64 = 1 << 10;
const CD_SH0_IS: u64 = 3 << 12;
const CD_EPD1: u64 = 1 << 30;
const CD_V: u64 = 1 << 31;
const CD_IPS_48: u64 = 5 << 32;
const CD_AA64: u64 = 1 << 41;
/// Record faults: without it the SMMU reports no translation fault.
const CD_R: u64 = 1 << 45;
/// Abort (not stall) faulting transactions.
const CD_A: u64 = 1 << 46;
const CD_ASID_SHIFT: u32 = 48;
/// MAIR attribute 0: normal memory, write-back (what the PTEs index).
const MAIR: u64 = 0xff;

// LPAE descriptors.
const TABLE: u64 = 0b11;
const PAGE: u64 = 0b11;
const PTE_AP_UNPRIV: u64 = 1 << 6;
const PTE_SH_IS: u64 = 3 << 8;
const PTE_AF: u64 = 1 << 10;

/// The edu copies XFER bytes from `from` to `to` + DST_OFF.
fn copy(d: &DmaRig, from: u64, to: u64) {
    d.edu.read_from(from, 0, XFER).unwrap();
    d.edu.write_to(0, to + DST_OFF, XFER).unwrap();
}

/// A FILL page after copy() wrote the start of `pattern(seed)` into it.
fn copied(seed: u8) -> Vec<u8> {
    page_with(FILL, DST_OFF as usize, &pattern(seed)[..XFER])
}

fn ok<R: AsRef<[u8]>>(d: &mut DmaRig, req: (R, u32), what: &str) {
    assert_eq!(d.f.request_status(&req).expect("answered"), S_OK, "{what}");
}

/// A stage-1 table in guest RAM: CD and the level 1, 2 and 3 tables.
struct Stage1 {
    cd: u64,
    l3: u64,
}

impl Stage1 {
    /// Build the CD and an empty three-level walk down to the level-3 table
    /// covering IOVA_A..IOVA_A + 2 MiB.
    fn build(d: &DmaRig) -> Stage1 {
        let m = &d.f.mem;
        let cd = m.alloc(64, 64).unwrap();
        let l1 = m.alloc(0x1000, 0x1000).unwrap();
        let l2 = m.alloc(0x1000, 0x1000).unwrap();
        let l3 = m.alloc(0x1000, 0x1000).unwrap();
        for t in [l1, l2, l3] {
            m.fill(t, 0x1000, 0).unwrap();
        }
        m.write_u64(l1 + 8 * ((IOVA_A >> 30) & 0x1ff), l2 | TABLE)
            .unwrap();
        m.write_u64(l2 + 8 * ((IOVA_A >> 21) & 0x1ff), l3 | TABLE)
            .unwrap();
        let w0 = T0SZ
            | CD_IRGN0_WBWA
            | CD_ORGN0_WBWA
            | CD_SH0_IS
            | CD_EPD1
            | CD_V
            | CD_IPS_48
            | CD_AA64
            | CD_R
            | CD_A
            | (ASID << CD_ASID_SHIFT);
        m.fill(cd, 64, 0).unwrap();
        m.write_u64(cd, w0).unwrap();
        m.write_u64(cd + 8, l1 & 0x000f_ffff_ffff_fff0).unwrap();
        m.write_u64(cd + 24, MAIR).unwrap();
        Stage1 { cd, l3 }
    }

    /// Point the level-3 entry of `iova` at `gpa` (read/write), or clear it.
    fn set(&self, d: &DmaRig, iova: u64, gpa: Option<u64>) {
        let pte = gpa.map_or(0, |g| g | PAGE | PTE_AP_UNPRIV | PTE_SH_IS | PTE_AF);
        d.f.mem
            .write_u64(self.l3 + 8 * ((iova >> 12) & 0x1ff), pte)
            .unwrap();
    }
}

/// A rig with the table bound as domain 1, and five pages filled with FILL.
fn setup() -> (DmaRig, Stage1, Vec<u64>) {
    let mut d = DmaRig::new(EP);
    let s1 = Stage1::build(&d);
    let p = d.pages(5, FILL);
    let ste = STE_V | STE_CFG_S1 | s1.cd;
    ok(
        &mut d,
        wire::attach_table_smmu3(1, EP, ste, 0),
        "ATTACH_TABLE",
    );
    (d, s1, p)
}

/// INVALIDATE one 4 KiB leaf of ASID 1 (TLBI_NH_VA).
fn invalidate(d: &mut DmaRig, iova: u64) {
    let inv = wire::invalidate(&Invalidate {
        scope: wire::INV_SCOPE_ADDRESS,
        caches: wire::INV_CACHE_TLB,
        flags: wire::INV_F_ID_VALID | wire::INV_F_LEAF,
        domain: 1,
        id: ASID,
        address: iova,
        nr_pages: 1,
        page_size: 12,
        ..Default::default()
    });
    ok(d, inv, "INVALIDATE");
}

#[test]
#[ignore = "needs QEMU's edu device behind an SMMUv3 in VIOMMU_EDU_CDEV: run by tests/vm/arm64-tier.sh"]
fn dma_lands_where_stage_1_then_stage_2_say() {
    let (mut d, s1, p) = setup();
    let nested = d.rig.domain(1).expect("domain 1 on the host");
    assert_eq!(nested["nested"], true, "{nested}");
    d.f.mem.write(p[1], &pattern(1)).unwrap();
    s1.set(&d, IOVA_A, Some(p[1]));
    s1.set(&d, IOVA_B, Some(p[3]));
    copy(&d, IOVA_A, IOVA_B);
    assert!(d.page(p[3]) == copied(1), "page 3 holds page 1's bytes");
    assert!(d.page(p[1]) == pattern(1), "page 1 untouched");
    for i in [0, 2, 4] {
        assert!(all(&d.page(p[i]), FILL), "page {i} untouched");
    }
}

#[test]
#[ignore = "needs QEMU's edu device behind an SMMUv3 in VIOMMU_EDU_CDEV: run by tests/vm/arm64-tier.sh"]
fn after_a_pte_change_dma_follows_once_invalidated() {
    let (mut d, s1, p) = setup();
    s1.set(&d, IOVA_A, Some(p[0]));
    s1.set(&d, IOVA_B, Some(p[1]));
    d.f.mem.write(p[0], &pattern(1)).unwrap();
    copy(&d, IOVA_A, IOVA_B);
    assert!(
        d.page(p[1]) == copied(1),
        "the first DMA (the SMMU caches it)"
    );

    // The PTE now names page 3, with no INVALIDATE: the SMMU's IOTLB still
    // holds the old translation.
    s1.set(&d, IOVA_B, Some(p[3]));
    d.f.mem.write(p[0], &pattern(2)).unwrap();
    copy(&d, IOVA_A, IOVA_B);
    let (old, new) = (d.page(p[1]), d.page(p[3]));
    note(&format!(
        "smmu3: PTE changed, not invalidated: the DMA went to {}",
        if old == copied(2) {
            "the old page (cached translation)"
        } else if new == copied(2) {
            "the new page (no caching)"
        } else {
            "neither page"
        }
    ));
    assert!(
        old == copied(2) && all(&new, FILL),
        "without INVALIDATE the emulated SMMU uses its cached translation"
    );

    // INVALIDATE reaches the SMMU: the next DMA walks the new PTE.
    invalidate(&mut d, IOVA_B);
    d.f.mem.write(p[0], &pattern(3)).unwrap();
    copy(&d, IOVA_A, IOVA_B);
    assert!(d.page(p[3]) == copied(3), "the new page got the bytes");
    assert!(d.page(p[1]) == copied(2), "the old page kept its own");
    for i in [2, 4] {
        assert!(all(&d.page(p[i]), FILL), "page {i} untouched");
    }
}

#[test]
#[ignore = "needs QEMU's edu device behind an SMMUv3 in VIOMMU_EDU_CDEV: run by tests/vm/arm64-tier.sh"]
fn dma_to_an_unmapped_iova_raises_an_event_on_the_eventq() {
    let (mut d, s1, p) = setup();
    d.f.post_event_buffers(8, wire::EXT_RECORD_SIZE).unwrap();
    s1.set(&d, IOVA_A, Some(p[1]));
    d.f.mem.write(p[1], &pattern(1)).unwrap();
    d.edu.read_from(IOVA_A, 0, XFER).unwrap();
    // No PTE for this IOVA: a stage-1 translation fault. One 4-byte write
    // is one access, one SMMU event (QEMU raises one per access).
    d.edu.write_to(0, IOVA_UNMAPPED, 4).unwrap();
    let ev = d.f.collect_events_upto(8, Duration::from_secs(5)).unwrap();
    let h = d.rig.host();
    assert_eq!(ev.len(), 1, "one record on the eventq; host {h}");
    let r = ev[0].record().unwrap();
    note(&format!(
        "smmu3: unmapped IOVA {IOVA_UNMAPPED:#x}: eventq record {r:?} ({} bytes; vEVENTQ {})",
        ev[0].used_len, h["veventq"]
    ));
    assert_eq!(r.endpoint, EP, "{r:?}");
    assert!(!r.is_page_request(), "{r:?}");
    // Decoded (fault_queue::vevents): a stage-1 translation fault of a DMA
    // write is a MAPPING fault at the IOVA, with the access.
    assert_eq!(r.reason, wire::EVT_REASON_MAPPING, "{r:?}");
    assert_eq!(r.address, IOVA_UNMAPPED, "{r:?}");
    assert_eq!(
        r.flags & (wire::EVT_F_ADDRESS | wire::EVT_F_WRITE | wire::EVT_F_READ),
        wire::EVT_F_ADDRESS | wire::EVT_F_WRITE,
        "{r:?}"
    );
    for (i, &gpa) in p.iter().enumerate() {
        let want = if i == 1 {
            pattern(1)
        } else {
            vec![FILL; BUF_SIZE]
        };
        assert!(d.page(gpa) == want, "page {i} unchanged");
    }
}
