// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The type-specific structures iommufd takes and gives (HWPT_ALLOC data,
//! HWPT_INVALIDATE entries, page responses), built from the
//! `iommufd-bindings` structs. vEVENT data is decoded with the fault
//! relay (`fault_queue::vevents`).
//!
//! Gaps: what the bindings lack is declared here, once, each marked GAP.
//! All of it is the kernel's selftest ABI (`iommufd_test.h`, which is not
//! a uapi header, so bindgen never sees it): the selftest data, invalidate
//! and vIOMMU/vEVENTQ/HW_INFO type numbers and their structs below (the
//! selftest vEVENT's struct is with its decoder, `fault_queue::vevents`),
//! and the IOMMU_TEST_CMD ioctl with struct iommu_test_cmd (the mock-device glue,
//! in `sys/selftest.rs`, feature `selftest`). See spec-notes/iommufd.md.

use iommufd_bindings::iommufd::{
    iommu_hwpt_arm_smmuv3, iommu_hwpt_page_response, iommu_hwpt_vtd_s1,
    iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_EAFE, iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_SRE,
    iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_WPE, iommu_hwpt_vtd_s1_invalidate,
    iommu_hwpt_vtd_s1_invalidate_flags_IOMMU_VTD_INV_FLAGS_LEAF,
    iommu_viommu_arm_smmuv3_invalidate, iommufd_page_response_code_IOMMUFD_PAGE_RESP_INVALID,
    iommufd_page_response_code_IOMMUFD_PAGE_RESP_SUCCESS,
};

use super::sys::{
    HWPT_DATA_ARM_SMMUV3, HWPT_DATA_VTD_S1, INVALIDATE_DATA_VTD_S1,
    VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
};
use super::{PageOutcome, PageResponse, Result};
use crate::nested::{Invalidate, TableDesc};
use crate::wire::{AT_F_EAFE, AT_F_SRE, AT_F_WPE, INV_CACHE_CONFIG};

/// GAP: IOMMU_HWPT_DATA_SELFTEST.
pub const HWPT_DATA_SELFTEST: u32 = 0xdead;
/// GAP: IOMMU_HWPT_INVALIDATE_DATA_SELFTEST.
pub const INVALIDATE_DATA_SELFTEST: u32 = 0xdead_beef;
/// GAP: IOMMU_VIOMMU_TYPE_SELFTEST and IOMMU_VEVENTQ_TYPE_SELFTEST.
pub const VIOMMU_TYPE_SELFTEST: u32 = 0xdead_beef;
pub const VEVENTQ_TYPE_SELFTEST: u32 = 0xbeef_beef;
/// GAP: IOMMU_HW_INFO_TYPE_SELFTEST.
pub const HW_INFO_SELFTEST: u32 = 0xfeed_beef;

/// GAP: struct iommu_hwpt_selftest.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct HwptSelftest {
    iotlb: u32,
}

/// GAP: struct iommu_hwpt_invalidate_selftest, and its flag
/// IOMMU_TEST_INVALIDATE_FLAG_ALL.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct InvalidateSelftest {
    flags: u32,
    iotlb_id: u32,
}
const INVALIDATE_SELFTEST_ALL: u32 = 1;

/// A kernel structure that is plain data.
///
/// # Safety
/// Only for `#[repr(C)]` structs of integers (or arrays of them) without
/// padding, so that every byte of a value is initialised. bindgen's layout
/// assertions pin the bindings' sizes; ours are checked below.
pub(super) unsafe trait Plain: Copy {}

// SAFETY: #[repr(C)], u64/u32 fields, no padding (sizes asserted by the
// bindings: 24, 16, 24, 16, 8 bytes).
unsafe impl Plain for iommu_hwpt_vtd_s1 {}
// SAFETY: as above.
unsafe impl Plain for iommu_hwpt_arm_smmuv3 {}
// SAFETY: as above.
unsafe impl Plain for iommu_hwpt_vtd_s1_invalidate {}
// SAFETY: as above.
unsafe impl Plain for iommu_viommu_arm_smmuv3_invalidate {}
// SAFETY: as above.
unsafe impl Plain for iommu_hwpt_page_response {}
// SAFETY: #[repr(C)], u32 fields only, no padding (checked below).
unsafe impl Plain for HwptSelftest {}
// SAFETY: as above.
unsafe impl Plain for InvalidateSelftest {}

const _: () = assert!(std::mem::size_of::<HwptSelftest>() == 4);
const _: () = assert!(std::mem::size_of::<InvalidateSelftest>() == 8);

/// The bytes of `v`, as the kernel reads them.
pub(super) fn bytes_of<T: Plain>(v: &[T]) -> &[u8] {
    // SAFETY: `T: Plain` has no padding, so all size_of_val(v) bytes are
    // initialised; u8 needs no alignment; the result borrows `v`.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn to_vec<T: Plain>(v: &[T]) -> Vec<u8> {
    bytes_of(v).to_vec()
}

/// HWPT_ALLOC data for a guest table, and how its caches are invalidated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NestedData {
    pub data_type: u32,
    pub invalidate_type: u32,
    pub data: Vec<u8>,
}

/// HWPT_ALLOC data for a guest table.
pub(super) fn nested_data(table: &TableDesc) -> Result<NestedData> {
    match *table {
        TableDesc::HostSelftest { iotlb } => Ok(NestedData {
            data_type: HWPT_DATA_SELFTEST,
            invalidate_type: INVALIDATE_DATA_SELFTEST,
            data: to_vec(&[HwptSelftest { iotlb }]),
        }),
        TableDesc::IntelVtd {
            flags,
            pgtbl,
            addr_width,
        } => {
            // The kernel's flag bits differ from ours.
            let mut f = 0u64;
            for (ours, kernel) in [
                (AT_F_SRE, iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_SRE),
                (AT_F_EAFE, iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_EAFE),
                (AT_F_WPE, iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_WPE),
            ] {
                if flags & ours != 0 {
                    f |= u64::from(kernel);
                }
            }
            let s1 = iommu_hwpt_vtd_s1 {
                flags: f,
                pgtbl_addr: pgtbl,
                addr_width,
                __reserved: 0,
            };
            Ok(NestedData {
                data_type: HWPT_DATA_VTD_S1,
                invalidate_type: INVALIDATE_DATA_VTD_S1,
                data: to_vec(&[s1]),
            })
        }
        TableDesc::ArmSmmu3 { ste } => {
            // The STE is little-endian whatever the host.
            let s = iommu_hwpt_arm_smmuv3 {
                ste: [ste[0].to_le(), ste[1].to_le()],
            };
            Ok(NestedData {
                data_type: HWPT_DATA_ARM_SMMUV3,
                invalidate_type: VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
                data: to_vec(&[s]),
            })
        }
    }
}

/// IOMMU_HWPT_INVALIDATE's array: each entry's length, and the entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entries {
    pub entry_len: u32,
    pub data: Vec<u8>,
}

// The entries are kernel ABI structs of a few dozen bytes: the size fits a u32.
#[allow(clippy::cast_possible_truncation)]
fn entries<T: Plain>(v: &[T]) -> Entries {
    Entries {
        entry_len: std::mem::size_of::<T>() as u32,
        data: to_vec(v),
    }
}

/// IOMMU_HWPT_INVALIDATE entries for `invs`. Whatever the host cannot
/// express exactly is widened, never narrowed.
pub(super) fn invalidate_entries(data_type: u32, invs: &[Invalidate]) -> Entries {
    if data_type == INVALIDATE_DATA_SELFTEST {
        // The tag names one mock IOTLB slot; anything else flushes all.
        let out: Vec<InvalidateSelftest> = invs
            .iter()
            .map(|inv| match inv.id.map(u32::try_from) {
                Some(Ok(slot)) => InvalidateSelftest {
                    flags: 0,
                    iotlb_id: slot,
                },
                _ => InvalidateSelftest {
                    flags: INVALIDATE_SELFTEST_ALL,
                    iotlb_id: 0,
                },
            })
            .collect();
        return entries(&out);
    }
    let mut out = Vec::with_capacity(invs.len());
    for inv in invs {
        let pages = match inv.scope {
            crate::nested::InvScope::Address {
                address,
                nr_pages,
                page_shift,
            } if inv.caches & INV_CACHE_CONFIG == 0 => nr_pages
                .checked_shl(u32::from(page_shift - 12))
                .filter(|&p| p >> (page_shift - 12) == nr_pages)
                .map(|p| (address, p)),
            _ => None,
        };
        let (addr, npages, leaf) = match pages {
            Some((a, n)) => (a, n, inv.leaf),
            None => (0, u64::MAX, false),
        };
        out.push(iommu_hwpt_vtd_s1_invalidate {
            addr,
            npages,
            flags: if leaf {
                iommu_hwpt_vtd_s1_invalidate_flags_IOMMU_VTD_INV_FLAGS_LEAF
            } else {
                0
            },
            __reserved: 0,
        });
    }
    entries(&out)
}

/// SMMUv3 commands for the vIOMMU, little-endian whatever the host.
pub(super) fn smmu3_entries(cmds: &[[u64; 2]]) -> Entries {
    let out: Vec<iommu_viommu_arm_smmuv3_invalidate> = cmds
        .iter()
        .map(|c| iommu_viommu_arm_smmuv3_invalidate {
            cmd: [c[0].to_le(), c[1].to_le()],
        })
        .collect();
    entries(&out)
}

/// A page response for the fault queue.
pub(super) fn page_response(r: PageResponse) -> iommu_hwpt_page_response {
    iommu_hwpt_page_response {
        cookie: r.cookie,
        code: match r.outcome {
            PageOutcome::Success => iommufd_page_response_code_IOMMUFD_PAGE_RESP_SUCCESS,
            PageOutcome::Invalid => iommufd_page_response_code_IOMMUFD_PAGE_RESP_INVALID,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nested::InvScope;

    /// The bytes are those the kernel's structs have (the layouts that were
    /// packed by hand before, little-endian hosts).
    #[test]
    #[cfg(target_endian = "little")]
    fn structs_pack_as_the_kernel_lays_them_out() {
        let vtd = nested_data(&TableDesc::IntelVtd {
            flags: AT_F_SRE | AT_F_WPE,
            pgtbl: 0x1234_5000,
            addr_width: 48,
        })
        .unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(&5u64.to_le_bytes());
        want.extend_from_slice(&0x1234_5000u64.to_le_bytes());
        want.extend_from_slice(&48u32.to_le_bytes());
        want.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(vtd.data, want);
        assert_eq!(
            (vtd.data_type, vtd.invalidate_type),
            (HWPT_DATA_VTD_S1, INVALIDATE_DATA_VTD_S1)
        );

        let smmu = nested_data(&TableDesc::ArmSmmu3 { ste: [1, 2] }).unwrap();
        assert_eq!(smmu.data.len(), 16);
        assert_eq!(smmu.data[0], 1);
        assert_eq!(smmu.data[8], 2);

        let st = nested_data(&TableDesc::HostSelftest { iotlb: 0xabcd }).unwrap();
        assert_eq!(st.data, 0xabcdu32.to_le_bytes());

        let inv = Invalidate {
            scope: InvScope::Address {
                address: 0x4000,
                nr_pages: 2,
                page_shift: 12,
            },
            leaf: true,
            domain: 1,
            caches: 0,
            global: false,
            pasid: None,
            id: None,
        };
        let e = invalidate_entries(INVALIDATE_DATA_VTD_S1, &[inv]);
        assert_eq!(e.entry_len, 24);
        let mut want = Vec::new();
        want.extend_from_slice(&0x4000u64.to_le_bytes());
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(e.data, want);

        let e = invalidate_entries(INVALIDATE_DATA_SELFTEST, &[inv]);
        assert_eq!((e.entry_len, e.data), (8, vec![1, 0, 0, 0, 0, 0, 0, 0]));

        let e = smmu3_entries(&[[3, 4]]);
        assert_eq!(
            (e.entry_len, e.data.len(), e.data[0], e.data[8]),
            (16, 16, 3, 4)
        );

        let r = [
            page_response(PageResponse {
                cookie: 7,
                outcome: PageOutcome::Success,
            }),
            page_response(PageResponse {
                cookie: 8,
                outcome: PageOutcome::Invalid,
            }),
        ];
        assert_eq!(
            bytes_of(&r),
            [7, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0]
        );
    }
}
