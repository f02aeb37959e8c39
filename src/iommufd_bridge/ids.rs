// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! iommufd object IDs, one type per kind of object, so that an IOAS is
//! never passed where a HWPT is meant. `sys` takes and gives the kernel's
//! raw numbers; `.raw()` is where they meet.

use std::fmt;

use serde::{Serialize, Serializer};

/// Anything the kernel names by an object ID: the typed IDs, and a raw
/// number (tests read them from `{"op":"host"}`). `sys` calls that take
/// an object of several kinds (DESTROY, a HWPT's parent) take this.
pub trait ObjectId: Copy {
    /// The kernel's number.
    fn raw(self) -> u32;
}

impl ObjectId for u32 {
    fn raw(self) -> u32 {
        self
    }
}

macro_rules! object_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub u32);

        impl $name {
            /// The kernel's number.
            pub fn raw(self) -> u32 {
                self.0
            }
        }

        impl ObjectId for $name {
            fn raw(self) -> u32 {
                $name::raw(self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

object_id!(
    /// An I/O address space (IOMMU_IOAS_ALLOC).
    IoasId
);
object_id!(
    /// A hardware page table (IOMMU_HWPT_ALLOC).
    HwptId
);
object_id!(
    /// A vIOMMU (IOMMU_VIOMMU_ALLOC).
    ViommuId
);
object_id!(
    /// A vDEVICE on a vIOMMU (IOMMU_VDEVICE_ALLOC).
    VdeviceId
);
object_id!(
    /// A fault queue (IOMMU_FAULT_QUEUE_ALLOC).
    FaultId
);
object_id!(
    /// A vEVENTQ (IOMMU_VEVENTQ_ALLOC).
    VeventqId
);

/// What a device attaches to: an IOAS (the kernel makes the HWPT) or a
/// HWPT of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PtId {
    Ioas(IoasId),
    Hwpt(HwptId),
}

impl PtId {
    /// The kernel's number.
    pub fn raw(self) -> u32 {
        match self {
            PtId::Ioas(i) => i.raw(),
            PtId::Hwpt(h) => h.raw(),
        }
    }
}

impl ObjectId for PtId {
    fn raw(self) -> u32 {
        PtId::raw(self)
    }
}

impl fmt::Display for PtId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.raw().fmt(f)
    }
}

impl Serialize for PtId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u32(self.raw())
    }
}

/// What a nested HWPT is allocated on, and what its invalidations name:
/// a HWPT (the nesting parent, or the nested HWPT itself) or the vIOMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NestId {
    Hwpt(HwptId),
    Viommu(ViommuId),
}

impl NestId {
    /// The kernel's number.
    pub fn raw(self) -> u32 {
        match self {
            NestId::Hwpt(h) => h.raw(),
            NestId::Viommu(v) => v.raw(),
        }
    }
}

impl ObjectId for NestId {
    fn raw(self) -> u32 {
        NestId::raw(self)
    }
}

impl fmt::Display for NestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.raw().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_show_and_serialize_as_the_kernel_numbers() {
        let pt = PtId::Hwpt(HwptId(7));
        assert_eq!((pt.to_string(), pt.raw()), ("7".to_string(), 7));
        assert_eq!(serde_json::json!(pt), serde_json::json!(7));
        assert_eq!(serde_json::json!(Some(IoasId(3))), serde_json::json!(3));
        assert_eq!(NestId::Viommu(ViommuId(9)).to_string(), "9");
    }
}
