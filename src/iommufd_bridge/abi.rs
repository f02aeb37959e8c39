//! The type-specific structures iommufd takes (HWPT_ALLOC data,
//! HWPT_INVALIDATE entries), packed for the kernel.

use super::sys::{
    HWPT_DATA_ARM_SMMUV3, HWPT_DATA_SELFTEST, HWPT_DATA_VTD_S1, INVALIDATE_DATA_SELFTEST,
    INVALIDATE_DATA_VTD_S1, VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
};
use super::Result;
use crate::nested::request::{AT_F_EAFE, AT_F_SRE, AT_F_WPE, INV_CACHE_CONFIG};
use crate::nested::{Invalidate, TableDesc};

/// HWPT_ALLOC data for a guest table: (data type, invalidate type, bytes).
pub(super) fn nested_data(table: &TableDesc) -> Result<(u32, u32, Vec<u8>)> {
    match *table {
        TableDesc::HostSelftest { iotlb } => Ok((
            HWPT_DATA_SELFTEST,
            INVALIDATE_DATA_SELFTEST,
            iotlb.to_le_bytes().to_vec(),
        )),
        TableDesc::IntelVtd {
            flags,
            pgtbl,
            addr_width,
        } => {
            // struct iommu_hwpt_vtd_s1: the kernel's flag bits differ from ours.
            let mut f = 0u64;
            for (ours, kernel) in [(AT_F_SRE, 1), (AT_F_EAFE, 2), (AT_F_WPE, 4)] {
                if flags & ours != 0 {
                    f |= kernel;
                }
            }
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&f.to_le_bytes());
            d.extend_from_slice(&pgtbl.to_le_bytes());
            d.extend_from_slice(&addr_width.to_le_bytes());
            d.extend_from_slice(&0u32.to_le_bytes());
            Ok((HWPT_DATA_VTD_S1, INVALIDATE_DATA_VTD_S1, d))
        }
        TableDesc::ArmSmmu3 { ste } => {
            // struct iommu_hwpt_arm_smmuv3 {ste[2]}, little-endian.
            let mut d = Vec::with_capacity(16);
            d.extend_from_slice(&ste[0].to_le_bytes());
            d.extend_from_slice(&ste[1].to_le_bytes());
            Ok((HWPT_DATA_ARM_SMMUV3, VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, d))
        }
    }
}

/// IOMMU_HWPT_INVALIDATE entries for `invs`: (entry_len, bytes). Whatever
/// the host cannot express exactly is widened, never narrowed.
pub(super) fn invalidate_entries(data_type: u32, invs: &[Invalidate]) -> (u32, Vec<u8>) {
    let mut out = Vec::new();
    if data_type == INVALIDATE_DATA_SELFTEST {
        // struct iommu_hwpt_invalidate_selftest {flags (ALL = 1), iotlb_id}:
        // the tag names one mock IOTLB slot; anything else flushes all.
        for inv in invs {
            let (flags, slot) = match inv.id.map(u32::try_from) {
                Some(Ok(slot)) => (0u32, slot),
                _ => (1, 0),
            };
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&slot.to_le_bytes());
        }
        return (8, out);
    }
    // struct iommu_hwpt_vtd_s1_invalidate {addr, npages, flags (LEAF = 1), rsvd}.
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
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&npages.to_le_bytes());
        out.extend_from_slice(&u32::from(leaf).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    (24, out)
}
