// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest-owned page tables: the ATTACH_TABLE and INVALIDATE extension
//! (spec-notes/protocol.md 6.2, 6.3) decoded into typed values, and the walker
//! that serves virtual endpoints attached to a guest table.

pub mod request;
pub(crate) mod smmu3;
pub mod walker;

pub(crate) use request::{AttachTable, InvScope, Invalidate, NestedError, TableDesc};

/// What ATTACH_TABLE can do on one endpoint, as PROBE reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableCaps {
    /// Table formats (wire::FORMAT_*) the endpoint accepts.
    pub formats: Vec<u8>,
    /// PASID width in bits; 0: no PASID attach.
    pub pasid_bits: u8,
    /// The endpoint can raise page requests.
    pub page_requests: bool,
    /// The host IOMMU's identification, for guests building a table for it.
    pub hw_info: Option<HwInfo>,
}

/// IOMMU_GET_HW_INFO's answer, passed to the guest as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HwInfo {
    /// enum iommu_hw_info_type (INTEL_VTD 1, ARM_SMMUV3 2, selftest 0xfeedbeef...).
    pub info_type: u32,
    pub capabilities: u64,
    pub max_pasid_log2: u8,
    /// The type-specific structure (e.g. struct iommu_hw_info_vtd).
    pub data: Vec<u8>,
}

/// What an INTEL_VTD table of an endpoint may use (PROBE TABLE_INTEL_VTD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VtdLimits {
    /// Widest addr_width ATTACH_TABLE takes: 48, or 57 (then 48 too).
    pub ias: u8,
    /// Table entries must point below 2^oas.
    pub oas: u8,
    /// Leaf sizes the table may use (bit n: 2^n bytes).
    pub pgsize_bitmap: u64,
}

const SZ_4K: u64 = 1 << 12;
const SZ_2M: u64 = 1 << 21;
const SZ_1G: u64 = 1 << 30;

impl TableCaps {
    /// The limits of an INTEL_VTD table, if the endpoint takes the format:
    /// a VT-d host's from its capability register (the nested first stage
    /// runs on it), otherwise the software walker's.
    pub(crate) fn vtd_limits(&self) -> Option<VtdLimits> {
        if !self.formats.contains(&crate::wire::FORMAT_INTEL_VTD) {
            return None;
        }
        let vtd_cap = self.hw_info.as_ref().and_then(|h| {
            // struct iommu_hw_info_vtd: flags u32, reserved u32, cap_reg u64, ecap_reg u64.
            (h.info_type == crate::iommufd_bridge::sys::HW_INFO_INTEL_VTD)
                .then(|| h.data.get(8..16))
                .flatten()
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        });
        Some(match vtd_cap {
            Some(cap) => {
                // VT-d cap_reg: MGAW 21:16 (width - 1), FL1GP 56, FL5LP 60.
                let mgaw = ((cap >> 16) & 0x3f) as u8 + 1;
                VtdLimits {
                    ias: if cap & (1 << 60) != 0 { 57 } else { 48 },
                    oas: mgaw.min(52),
                    pgsize_bitmap: SZ_4K | SZ_2M | if cap & (1 << 56) != 0 { SZ_1G } else { 0 },
                }
            }
            None => VtdLimits {
                ias: 57,
                oas: 52,
                pgsize_bitmap: SZ_4K | SZ_2M | SZ_1G,
            },
        })
    }

    /// What the software walker serves on virtual endpoints.
    pub(crate) fn virtual_endpoint() -> Self {
        TableCaps {
            formats: vec![crate::wire::FORMAT_INTEL_VTD],
            pasid_bits: request::MAX_PASID_BITS,
            page_requests: true,
            hw_info: None,
        }
    }
}
