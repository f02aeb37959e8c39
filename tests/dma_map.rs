// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Real DMA through the mappings a guest makes with MAP/UNMAP: QEMU's `edu`
//! device (`VIOMMU_EDU_CDEV`, bound to vfio-pci) as a VFIO endpoint, its DMA
//! engine driven from BAR0 by the test (tests/support/edu.rs).
//!
//! Run by tests/vm/kernel-tier.sh inside an x86 guest whose IOMMU is QEMU's
//! virtio-iommu: our backend turns the frontend's MAP into IOMMU_IOAS_MAP of
//! the frontend's RAM (the memfd the test holds), the guest kernel's
//! virtio-iommu driver into a MAP on QEMU's device, which translates the
//! edu's DMA. So the bytes the edu moves must come from and land in the
//! exact page of the test's memfd that the MAP named, nowhere else; after
//! UNMAP the same DMA must fault (QEMU reports the fault; the guest kernel
//! logs it) and move nothing; after a remap it must follow the new page.
//! IOVAs stay below 256 MiB, the edu's default DMA mask.
// Test code with known small values (offsets, lengths): these casts cannot
// truncate or wrap.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::time::Duration;

use support::edu::{all, note, page_with, pattern, DmaRig, KernelLog, BUF_SIZE, XFER};
use support::wire::{self, S_OK};

const EP: u32 = 0x10;
const RW: u32 = wire::MAP_F_READ | wire::MAP_F_WRITE;
/// What every guest page holds before the DMA.
const FILL: u8 = 0x5a;
const IOVA_A: u64 = 0x0100_0000;
const IOVA_B: u64 = 0x0200_0000;
const IOVA_C: u64 = 0x0300_0000;
/// Where in the destination page the bytes go.
const DST_OFF: u64 = 0x400;

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

fn map(d: &mut DmaRig, iova: u64, gpa: u64) {
    ok(d, wire::map(1, iova, iova + 0xfff, gpa, RW), "MAP");
}

fn unmap(d: &mut DmaRig, iova: u64) {
    ok(d, wire::unmap(1, iova, iova + 0xfff), "UNMAP");
}

/// A rig with the endpoint attached to MAP domain 1 and five guest pages
/// filled with FILL.
fn setup() -> (DmaRig, Vec<u64>) {
    let mut d = DmaRig::new(EP);
    ok(&mut d, wire::attach(1, EP, 0, 0), "ATTACH");
    let p = d.pages(5, FILL);
    (d, p)
}

#[test]
#[ignore = "needs QEMU's edu device in VIOMMU_EDU_CDEV: run by tests/vm/kernel-tier.sh"]
fn dma_moves_bytes_from_and_to_the_mapped_pages() {
    let (mut d, p) = setup();
    d.f.mem.write(p[1], &pattern(1)).unwrap();
    map(&mut d, IOVA_A, p[1]);
    map(&mut d, IOVA_B, p[3]);
    // Read page 1 through IOVA A into the edu, write it out through IOVA B.
    copy(&d, IOVA_A, IOVA_B);
    assert!(d.page(p[3]) == copied(1), "page 3 holds page 1's bytes");
    assert!(d.page(p[1]) == pattern(1), "page 1 untouched");
    for i in [0, 2, 4] {
        assert!(all(&d.page(p[i]), FILL), "page {i} untouched");
    }
    // A part of a page: 64 bytes at offset 0x100 of IOVA C, page 4.
    map(&mut d, IOVA_C, p[4]);
    d.edu.write_to(0x40, IOVA_C + 0x100, 64).unwrap();
    let page = d.page(p[4]);
    assert!(all(&page[..0x100], FILL) && all(&page[0x140..], FILL));
    assert!(page[0x100..0x140] == pattern(1)[0x40..0x80]);
}

#[test]
#[ignore = "needs QEMU's edu device in VIOMMU_EDU_CDEV: run by tests/vm/kernel-tier.sh"]
fn after_unmap_dma_faults_and_moves_nothing() {
    let (mut d, p) = setup();
    d.f.mem.write(p[1], &pattern(2)).unwrap();
    map(&mut d, IOVA_A, p[1]);
    map(&mut d, IOVA_B, p[3]);
    copy(&d, IOVA_A, IOVA_B);
    assert!(d.page(p[3]) == copied(2), "mapped: the DMA worked");

    // IOVA B and A unmapped, page 3 refilled, page 1 now pattern 3. The
    // guest kernel logs at most 10 IOMMU faults per 5 s and QEMU reports one
    // per 4-byte access: first one 4-byte DMA each way, whose fault lines
    // must name the address, then the full-size ones.
    d.f.mem.fill(p[3], BUF_SIZE, FILL).unwrap();
    unmap(&mut d, IOVA_B);
    unmap(&mut d, IOVA_A);
    d.f.mem.write(p[1], &pattern(3)).unwrap();
    let mut log = KernelLog::from_now().unwrap();
    d.edu.write_to(0, IOVA_B + DST_OFF, 4).unwrap();
    let line = log
        .wait_for_fault(IOVA_B + DST_OFF, Duration::from_secs(5))
        .unwrap_or_else(|seen| panic!("a fault at IOVA B logged; logged: {seen:?}"));
    note(&format!("map: write fault logged: {line}"));
    d.edu.read_from(IOVA_A, 0, 4).unwrap();
    let line = log
        .wait_for_fault(IOVA_A, Duration::from_secs(5))
        .unwrap_or_else(|seen| panic!("a fault at IOVA A logged; logged: {seen:?}"));
    note(&format!("map: read fault logged: {line}"));
    d.edu.write_to(0, IOVA_B + DST_OFF, XFER).unwrap();
    d.edu.read_from(IOVA_A, 0, XFER).unwrap();
    for (i, &gpa) in p.iter().enumerate() {
        let want = if i == 1 {
            pattern(3)
        } else {
            vec![FILL; BUF_SIZE]
        };
        assert!(d.page(gpa) == want, "page {i} unchanged");
    }
    // What the edu holds after the faulting read (written out through
    // IOVA C, mapped now) is not page 1's.
    map(&mut d, IOVA_C, p[4]);
    d.edu.write_to(0, IOVA_C, XFER).unwrap();
    let got = &d.page(p[4])[..XFER];
    assert!(
        got != &pattern(3)[..XFER],
        "the faulting read fetched page 1"
    );
    note(&format!(
        "map: after the faulting read the edu buffer holds {}",
        if got == &pattern(2)[..XFER] {
            "its old bytes"
        } else if all(got, 0) {
            "zeros"
        } else if all(got, 0xff) {
            "0xff"
        } else {
            "other bytes"
        }
    ));
}

#[test]
#[ignore = "needs QEMU's edu device in VIOMMU_EDU_CDEV: run by tests/vm/kernel-tier.sh"]
fn after_a_remap_dma_follows_the_new_page() {
    let (mut d, p) = setup();
    map(&mut d, IOVA_A, p[0]);
    map(&mut d, IOVA_B, p[1]);
    d.f.mem.write(p[0], &pattern(4)).unwrap();
    copy(&d, IOVA_A, IOVA_B);
    assert!(d.page(p[1]) == copied(4));

    // IOVA B now names page 3.
    unmap(&mut d, IOVA_B);
    map(&mut d, IOVA_B, p[3]);
    d.f.mem.write(p[0], &pattern(5)).unwrap();
    copy(&d, IOVA_A, IOVA_B);
    assert!(d.page(p[3]) == copied(5), "the new page got the bytes");
    assert!(d.page(p[1]) == copied(4), "the old page kept its own");
    for i in [2, 4] {
        assert!(all(&d.page(p[i]), FILL), "page {i} untouched");
    }
}
