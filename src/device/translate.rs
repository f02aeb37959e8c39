// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The software IOMMU: how a virtual endpoint's DMA translates, using the
//! device state as its page tables, and which fault record a miss raises.

use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use crate::device::state::{IommuState, Translation};
use crate::fault_queue::EventRecord;
use crate::nested::walker::walk;
use crate::wire::{FLAG_ADDRESS, FLAG_PRIV, FLAG_READ, FLAG_WRITE, REASON_DOMAIN, REASON_MAPPING};

/// Largest single DMA the model translates (bounds the reply).
pub const MAX_DMA_LEN: u64 = 64 << 20;

/// One contiguous piece of a translated access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub iova: u64,
    pub gpa: u64,
    pub len: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("endpoint {0} does not exist")]
    NoEndpoint(u32),
    #[error("endpoint {endpoint} is not attached and bypass is off")]
    Blocked { endpoint: u32, record: EventRecord },
    #[error("no mapping allows {access} at iova {iova:#x}{why}")]
    Fault {
        iova: u64,
        access: &'static str,
        /// The walker's reason, for table domains (": ..."), else empty.
        why: String,
        record: EventRecord,
    },
    #[error("gpa {gpa:#x}+{len:#x} is outside guest RAM")]
    OutsideRam { gpa: u64, len: u64 },
    /// A miss in a table attached with PAGE_REQUESTS: ask the driver.
    #[error("page request for {access} at iova {iova:#x}")]
    PageRequest {
        iova: u64,
        access: &'static str,
        write: bool,
    },
    #[error("{0}")]
    BadRequest(&'static str),
}

impl ModelError {
    /// The fault record this error raises on the eventq, if any.
    pub fn record(&self) -> Option<EventRecord> {
        match self {
            ModelError::Blocked { record, .. } | ModelError::Fault { record, .. } => Some(*record),
            _ => None,
        }
    }
}

/// Translate an access of `len` bytes at `iova` by `endpoint`, and check that
/// every resulting piece lies in guest RAM. With `page_requests` (F_PAGE_REQUEST
/// negotiated, first attempt), a miss in a table attached with PAGE_REQUESTS
/// is `ModelError::PageRequest` instead of a fault.
#[allow(clippy::too_many_arguments)]
pub fn translate_dma<G: GuestMemory + ?Sized>(
    state: &IommuState,
    mem: &G,
    endpoint: u32,
    pasid: Option<u32>,
    iova: u64,
    len: u64,
    write: bool,
    privileged: bool,
    page_requests: bool,
) -> Result<Vec<Piece>, ModelError> {
    if len == 0 || len > MAX_DMA_LEN {
        return Err(ModelError::BadRequest("len must be 1..=64 MiB"));
    }
    if iova.checked_add(len - 1).is_none() {
        return Err(ModelError::BadRequest("iova + len overflows"));
    }
    if state.is_host_endpoint(endpoint) {
        // Its DMA is the device's own, translated by the host IOMMU.
        return Err(ModelError::BadRequest(
            "endpoint is a host device, not a virtual one",
        ));
    }
    let access =
        if write { FLAG_WRITE } else { FLAG_READ } | if privileged { FLAG_PRIV } else { 0 };
    let record = |reason, address| EventRecord::Fault {
        reason,
        flags: access | FLAG_ADDRESS,
        endpoint,
        address,
        pasid,
    };
    let miss = |cur: u64, why: String| ModelError::Fault {
        iova: cur,
        access: if write { "write" } else { "read" },
        why,
        record: record(REASON_MAPPING, cur),
    };
    let mut pieces: Vec<Piece> = Vec::new();
    let (mut cur, mut left) = (iova, len);
    while left > 0 {
        let t = state
            .translate(endpoint, pasid, cur, left, write)
            .map_err(|_| ModelError::NoEndpoint(endpoint))?;
        let (gpa, n) = match t {
            Translation::Identity => (cur, left),
            Translation::Mapped { gpa, len } => (gpa, len),
            Translation::Walk {
                pgtbl,
                addr_width,
                page_requests: pr,
                sre,
            } => {
                // VT-d: a privileged request needs SRE; no page request can
                // grant that.
                if privileged && !sre {
                    return Err(miss(
                        cur,
                        ": privileged request, table attached without SRE".into(),
                    ));
                }
                let w = walk(mem, pgtbl, addr_width, cur, write, !privileged).map_err(|e| {
                    if pr && page_requests {
                        ModelError::PageRequest {
                            iova: cur,
                            access: if write { "write" } else { "read" },
                            write,
                        }
                    } else {
                        miss(cur, format!(": {e}"))
                    }
                })?;
                // The rest of this page, at most what is left.
                let in_page = w.page_size - (cur & (w.page_size - 1));
                (w.gpa, in_page.min(left))
            }
            Translation::Blocked => {
                return Err(ModelError::Blocked {
                    endpoint,
                    record: record(REASON_DOMAIN, cur),
                })
            }
            Translation::Miss => return Err(miss(cur, String::new())),
        };
        match pieces.last_mut() {
            // Adjacent mappings that are contiguous in both spaces merge.
            Some(p) if p.gpa.checked_add(p.len) == Some(gpa) => p.len += n,
            _ => pieces.push(Piece {
                iova: cur,
                gpa,
                len: n,
            }),
        }
        left -= n;
        cur = cur.wrapping_add(n);
    }
    for p in &pieces {
        let in_ram = usize::try_from(p.len)
            .map(|l| mem.check_range(GuestAddress(p.gpa), l, Permissions::ReadWrite))
            .unwrap_or(false);
        if !in_ram {
            return Err(ModelError::OutsideRam {
                gpa: p.gpa,
                len: p.len,
            });
        }
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::config::{features, DeviceConfig, Limits};
    use crate::device::request::{Attach, Map};
    use crate::wire::{MAP_F_READ, MAP_F_WRITE};
    use vm_memory::GuestMemoryMmap;

    fn setup() -> (IommuState, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        (
            IommuState::new(DeviceConfig::default(), Limits::default(), &[1]),
            mem,
        )
    }

    fn attach_map(s: &mut IommuState, maps: &[(u64, u64, u64, u32)]) {
        s.attach(
            &Attach {
                domain: 1,
                endpoint: 1,
                flags: 0,
                reserved_nonzero: false,
            },
            features::DEVICE_FEATURES,
        )
        .unwrap();
        for &(virt_start, virt_end, phys_start, flags) in maps {
            s.map(
                &Map {
                    domain: 1,
                    virt_start,
                    virt_end,
                    phys_start,
                    flags,
                },
                features::DEVICE_FEATURES,
            )
            .unwrap();
        }
    }

    #[test]
    fn bypass_is_identity_inside_ram_and_fault_outside() {
        let (s, mem) = setup();
        assert_eq!(
            translate_dma(&s, &mem, 1, None, 0x1000, 0x10, false, false, false).unwrap(),
            vec![Piece {
                iova: 0x1000,
                gpa: 0x1000,
                len: 0x10
            }]
        );
        assert!(matches!(
            translate_dma(&s, &mem, 1, None, 0x20_0000, 0x10, false, false, false),
            Err(ModelError::OutsideRam { .. })
        ));
    }

    #[test]
    fn blocked_raises_a_domain_fault() {
        let (mut s, mem) = setup();
        s.bypass = false;
        let e = translate_dma(&s, &mem, 1, None, 0x1000, 4, true, false, false).unwrap_err();
        assert_eq!(
            e.record(),
            Some(EventRecord::Fault {
                reason: REASON_DOMAIN,
                flags: FLAG_WRITE | FLAG_ADDRESS,
                endpoint: 1,
                address: 0x1000,
                pasid: None,
            })
        );
    }

    #[test]
    fn access_spanning_adjacent_mappings_is_split_and_merged() {
        let (mut s, mem) = setup();
        let rw = MAP_F_READ | MAP_F_WRITE;
        attach_map(
            &mut s,
            &[
                (0x1_0000, 0x1_0fff, 0x2000, rw),
                (0x1_1000, 0x1_1fff, 0x3000, rw),
                (0x1_2000, 0x1_2fff, 0x8000, rw),
            ],
        );
        assert_eq!(
            translate_dma(&s, &mem, 1, None, 0x1_0800, 0x2000, true, false, false).unwrap(),
            vec![
                Piece {
                    iova: 0x1_0800,
                    gpa: 0x2800,
                    len: 0x1800
                },
                Piece {
                    iova: 0x1_2000,
                    gpa: 0x8000,
                    len: 0x800
                }
            ]
        );
    }

    #[test]
    fn miss_and_permission_raise_mapping_faults() {
        let (mut s, mem) = setup();
        attach_map(&mut s, &[(0x1_0000, 0x1_0fff, 0x2000, MAP_F_READ)]);
        let e = translate_dma(&s, &mem, 1, None, 0x1_0000, 8, true, false, false).unwrap_err();
        assert!(matches!(
            e.record(),
            Some(EventRecord::Fault {
                reason: REASON_MAPPING,
                address: 0x1_0000,
                pasid: None,
                ..
            })
        ));
        // Runs off the end of the mapping into a hole.
        let e = translate_dma(&s, &mem, 1, None, 0x1_0f00, 0x200, false, false, false).unwrap_err();
        assert!(matches!(e, ModelError::Fault { iova: 0x1_1000, .. }));
    }

    #[test]
    fn table_domain_walks_the_guest_table() {
        use crate::nested::request::{decode_attach_table, encode};
        use crate::nested::walker::{MmapTableMemory, TableBuilder, PAGE_2M, PAGE_4K};
        use crate::wire::AT_F_PASID_VALID;
        let (mut s, mem) = setup();
        let mut t = TableBuilder::new(48, MmapTableMemory::new(&mem, 0x8_0000, 0x10_0000));
        t.map(0x40_0000, 0x1000, PAGE_4K, true);
        t.map(0x40_1000, 0x2000, PAGE_4K, false);
        t.map(0x4000_0000, 0, PAGE_2M, true);
        let root = t.root();
        let acked = features::DEVICE_FEATURES | features::ATTACH_TABLE;
        let a = encode::attach_vtd(1, 1, AT_F_PASID_VALID, 5, root, 48);
        s.attach_table(&decode_attach_table(&a).unwrap(), acked)
            .unwrap();
        let dma =
            |iova, len, write| translate_dma(&s, &mem, 1, Some(5), iova, len, write, false, false);
        // Two 4 KiB pages, contiguous in guest RAM: one piece.
        assert_eq!(
            dma(0x40_0800, 0x1000, false).unwrap(),
            vec![Piece {
                iova: 0x40_0800,
                gpa: 0x1800,
                len: 0x1000
            }]
        );
        assert_eq!(
            dma(0x4000_0000 + 0x1_2345, 16, true).unwrap()[0].gpa,
            0x1_2345
        );
        // Write to the read-only page: a MAPPING fault carrying the PASID.
        let e = dma(0x40_0800, 0x1000, true).unwrap_err();
        assert!(
            matches!(
                e,
                ModelError::Fault {
                    iova: 0x40_1000,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.record(),
            Some(EventRecord::Fault {
                reason: REASON_MAPPING,
                flags: FLAG_WRITE | FLAG_ADDRESS,
                endpoint: 1,
                address: 0x40_1000,
                pasid: Some(5),
            })
        );
        // Unmapped iova, and the same PASID-less access (not attached: bypass).
        assert!(matches!(
            dma(0x5000, 4, false),
            Err(ModelError::Fault { .. })
        ));
        assert_eq!(
            translate_dma(&s, &mem, 1, None, 0x5000, 4, false, false, false).unwrap()[0].gpa,
            0x5000
        );
    }

    #[test]
    fn bad_requests() {
        let (s, mem) = setup();
        assert!(matches!(
            translate_dma(&s, &mem, 1, None, 0, 0, false, false, false),
            Err(ModelError::BadRequest(_))
        ));
        assert!(matches!(
            translate_dma(&s, &mem, 1, None, u64::MAX, 2, false, false, false),
            Err(ModelError::BadRequest(_))
        ));
        assert!(matches!(
            translate_dma(&s, &mem, 9, None, 0, 1, false, false, false),
            Err(ModelError::NoEndpoint(9))
        ));
    }
}
