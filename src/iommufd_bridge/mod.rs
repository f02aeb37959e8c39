//! The host side of the IOMMU: the software model that serves virtual
//! endpoints, and the iommufd calls (`sys`) that VFIO and selftest endpoints
//! will use. The trait both share arrives with the iommufd endpoints
//! (issue 3).

pub mod model;
pub mod sys;
