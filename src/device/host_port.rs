//! Where virtio meets the host port: the one place the device turns its
//! types (MAP flags, RESV_MEM regions) into `iommufd_bridge`'s and back.
//! The bridge knows nothing of virtio.

use crate::device::request::{MAP_F_READ, MAP_F_WRITE};
use crate::device::state::{Mapping, ReservedRegion, RESV_MEM_T_MSI, RESV_MEM_T_RESERVED};
use crate::iommufd_bridge::{Access, HoleKind, HostMapping, IovaHole};

/// What a MAP's flags let a device do (MMIO is no access right).
pub(crate) fn access(flags: u32) -> Access {
    Access {
        read: flags & MAP_F_READ != 0,
        write: flags & MAP_F_WRITE != 0,
    }
}

/// The host's view of the mapping at `iova`.
pub(crate) fn host_mapping(iova: u64, m: &Mapping) -> HostMapping {
    HostMapping {
        iova,
        end: m.end,
        phys: m.phys,
        access: access(m.flags),
    }
}

/// The RESV_MEM region that reports a hole of the host's.
pub(crate) fn reserved_region(hole: &IovaHole) -> ReservedRegion {
    ReservedRegion {
        start: hole.start,
        end: hole.end,
        subtype: match hole.kind {
            HoleKind::Msi => RESV_MEM_T_MSI,
            HoleKind::Untranslated => RESV_MEM_T_RESERVED,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::request::MAP_F_MMIO;

    #[test]
    fn map_flags_become_access_rights() {
        assert_eq!(access(0), Access::default());
        assert_eq!(
            access(MAP_F_READ | MAP_F_MMIO),
            Access {
                read: true,
                write: false
            }
        );
        assert_eq!(
            access(MAP_F_READ | MAP_F_WRITE),
            Access {
                read: true,
                write: true
            }
        );
    }

    #[test]
    fn holes_become_resv_mem_subtypes() {
        let hole = |kind| IovaHole {
            start: 1,
            end: 2,
            kind,
        };
        assert_eq!(
            reserved_region(&hole(HoleKind::Msi)).subtype,
            RESV_MEM_T_MSI
        );
        assert_eq!(
            reserved_region(&hole(HoleKind::Untranslated)).subtype,
            RESV_MEM_T_RESERVED
        );
    }
}
