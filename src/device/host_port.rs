// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where virtio meets the host port: the one place the device turns its
//! types (MAP flags, RESV_MEM regions, PAGE_RESP codes) into
//! `iommufd_bridge`'s and back.
//! The bridge knows nothing of virtio.

use crate::device::state::{Mapping, ReservedRegion, RESV_MEM_T_MSI, RESV_MEM_T_RESERVED};
use crate::fault_queue::pages::CODE_SUCCESS;
use crate::iommufd_bridge::{Access, HoleKind, HostMapping, IovaHole, PageOutcome, PageResponse};
use crate::wire::{MAP_F_READ, MAP_F_WRITE};

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

/// The host's page response for PAGE_RESP `code` on `cookie`: the kernel
/// takes SUCCESS and INVALID only, so FAILURE (or any other code) is sent
/// as INVALID.
pub(crate) fn page_response(cookie: u32, code: u16) -> PageResponse {
    PageResponse {
        cookie,
        outcome: if code == CODE_SUCCESS {
            PageOutcome::Success
        } else {
            PageOutcome::Invalid
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault_queue::pages::{CODE_FAILURE, CODE_INVALID};
    use crate::wire::MAP_F_MMIO;

    #[test]
    fn page_resp_codes_become_the_two_the_kernel_takes() {
        let outcome = |code| page_response(5, code).outcome;
        assert_eq!(outcome(CODE_SUCCESS), PageOutcome::Success);
        assert_eq!(outcome(CODE_INVALID), PageOutcome::Invalid);
        assert_eq!(outcome(CODE_FAILURE), PageOutcome::Invalid);
        assert_eq!(page_response(5, CODE_SUCCESS).cookie, 5);
    }

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
