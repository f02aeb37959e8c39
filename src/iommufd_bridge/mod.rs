//! The host side of the IOMMU. Today: the software model that serves
//! virtual endpoints. The iommufd implementation and the trait both share
//! arrive with the kernel-tier work (issue 3).

pub mod model;
