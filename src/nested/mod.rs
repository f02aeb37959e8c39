//! Guest-owned page tables: the ATTACH_TABLE and INVALIDATE extension
//! (spec-notes/protocol.md 6.2, 6.3) decoded into typed values, and the walker
//! that serves virtual endpoints attached to a guest table.

pub mod request;
pub mod smmu3;
pub mod walker;

pub use request::{AttachTable, InvScope, Invalidate, NestedError, TableDesc};

/// What ATTACH_TABLE can do on one endpoint, as PROBE reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableCaps {
    /// Table formats (request::FORMAT_*) the endpoint accepts.
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

impl TableCaps {
    /// What the software walker serves on virtual endpoints.
    pub fn virtual_endpoint() -> Self {
        TableCaps {
            formats: vec![request::FORMAT_INTEL_VTD],
            pasid_bits: request::MAX_PASID_BITS,
            page_requests: true,
            hw_info: None,
        }
    }
}
