//! The software IOMMU: how a virtual endpoint's DMA translates, using the
//! device state as its page tables, and which fault record a miss raises.

use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use crate::device::state::{IommuState, Translation};
use crate::fault_queue::{
    EventRecord, FLAG_ADDRESS, FLAG_READ, FLAG_WRITE, REASON_DOMAIN, REASON_MAPPING,
};

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
    #[error("no mapping allows {access} at iova {iova:#x}")]
    Fault {
        iova: u64,
        access: &'static str,
        record: EventRecord,
    },
    #[error("gpa {gpa:#x}+{len:#x} is outside guest RAM")]
    OutsideRam { gpa: u64, len: u64 },
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
/// every resulting piece lies in guest RAM.
pub fn translate_dma<G: GuestMemory + ?Sized>(
    state: &IommuState,
    mem: &G,
    endpoint: u32,
    iova: u64,
    len: u64,
    write: bool,
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
    let access = if write { FLAG_WRITE } else { FLAG_READ };
    let record = |reason, address| EventRecord::Fault {
        reason,
        flags: access | FLAG_ADDRESS,
        endpoint,
        address,
    };
    let mut pieces: Vec<Piece> = Vec::new();
    let (mut cur, mut left) = (iova, len);
    while left > 0 {
        let t = state
            .translate(endpoint, cur, left, write)
            .map_err(|_| ModelError::NoEndpoint(endpoint))?;
        let (gpa, n) = match t {
            Translation::Identity => (cur, left),
            Translation::Mapped { gpa, len } => (gpa, len),
            Translation::Blocked => {
                return Err(ModelError::Blocked {
                    endpoint,
                    record: record(REASON_DOMAIN, cur),
                })
            }
            Translation::Miss => {
                return Err(ModelError::Fault {
                    iova: cur,
                    access: if write { "write" } else { "read" },
                    record: record(REASON_MAPPING, cur),
                })
            }
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
    use crate::device::request::{Attach, Map, MAP_F_READ, MAP_F_WRITE};
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
            translate_dma(&s, &mem, 1, 0x1000, 0x10, false).unwrap(),
            vec![Piece {
                iova: 0x1000,
                gpa: 0x1000,
                len: 0x10
            }]
        );
        assert!(matches!(
            translate_dma(&s, &mem, 1, 0x20_0000, 0x10, false),
            Err(ModelError::OutsideRam { .. })
        ));
    }

    #[test]
    fn blocked_raises_a_domain_fault() {
        let (mut s, mem) = setup();
        s.bypass = false;
        let e = translate_dma(&s, &mem, 1, 0x1000, 4, true).unwrap_err();
        assert_eq!(
            e.record(),
            Some(EventRecord::Fault {
                reason: REASON_DOMAIN,
                flags: FLAG_WRITE | FLAG_ADDRESS,
                endpoint: 1,
                address: 0x1000
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
            translate_dma(&s, &mem, 1, 0x1_0800, 0x2000, true).unwrap(),
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
        let e = translate_dma(&s, &mem, 1, 0x1_0000, 8, true).unwrap_err();
        assert!(matches!(
            e.record(),
            Some(EventRecord::Fault {
                reason: REASON_MAPPING,
                address: 0x1_0000,
                ..
            })
        ));
        // Runs off the end of the mapping into a hole.
        let e = translate_dma(&s, &mem, 1, 0x1_0f00, 0x200, false).unwrap_err();
        assert!(matches!(e, ModelError::Fault { iova: 0x1_1000, .. }));
    }

    #[test]
    fn bad_requests() {
        let (s, mem) = setup();
        assert!(matches!(
            translate_dma(&s, &mem, 1, 0, 0, false),
            Err(ModelError::BadRequest(_))
        ));
        assert!(matches!(
            translate_dma(&s, &mem, 1, u64::MAX, 2, false),
            Err(ModelError::BadRequest(_))
        ));
        assert!(matches!(
            translate_dma(&s, &mem, 9, 0, 1, false),
            Err(ModelError::NoEndpoint(9))
        ));
    }
}
