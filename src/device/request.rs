// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Decoding of requestq requests (head + body) into typed values.
//!
//! Pure: bytes in, `Request` out. Which request types exist depends on the
//! negotiated features; a type the driver cannot use is "unknown" and gets
//! no reply at all (used length 0), as the spec asks.

use crate::device::error::RequestError;
use crate::device::features;
use crate::nested::request::{
    decode_attach_table, decode_invalidate, decode_page_resp, PageResp, ATTACH_TABLE_LEN,
    INVALIDATE_LEN, PAGE_RESP_LEN, T_ATTACH_TABLE, T_INVALIDATE, T_PAGE_RESP,
};
use crate::nested::{AttachTable, Invalidate};

pub(crate) const T_ATTACH: u8 = 1;
pub(crate) const T_DETACH: u8 = 2;
pub(crate) const T_MAP: u8 = 3;
pub(crate) const T_UNMAP: u8 = 4;
pub(crate) const T_PROBE: u8 = 5;

/// Readable sizes (head + body) of the ratified requests.
pub(crate) const ATTACH_LEN: usize = 20;
pub(crate) const DETACH_LEN: usize = 20;
pub(crate) const MAP_LEN: usize = 36;
pub(crate) const UNMAP_LEN: usize = 28;
pub(crate) const PROBE_LEN: usize = 72;
/// The longest readable part we ever need to look at (ATTACH_TABLE: 124).
pub const MAX_READABLE: usize = 128;

pub const TAIL_LEN: usize = 4;

pub(crate) const ATTACH_F_BYPASS: u32 = 1;
pub(crate) const MAP_F_READ: u32 = 1 << 0;
pub(crate) const MAP_F_WRITE: u32 = 1 << 1;
pub(crate) const MAP_F_MMIO: u32 = 1 << 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attach {
    pub domain: u32,
    pub endpoint: u32,
    pub flags: u32,
    pub reserved_nonzero: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detach {
    pub domain: u32,
    pub endpoint: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Map {
    pub domain: u32,
    pub virt_start: u64,
    pub virt_end: u64,
    pub phys_start: u64,
    pub flags: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unmap {
    pub domain: u32,
    pub virt_start: u64,
    pub virt_end: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub endpoint: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Attach(Attach),
    Detach(Detach),
    Map(Map),
    Unmap(Unmap),
    Probe(Probe),
    AttachTable(AttachTable),
    Invalidate(Invalidate),
    PageResp(PageResp),
}

/// What decoding can conclude besides a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Request(Request),
    /// Known type, body refused: answer with this error's status.
    Refused(u8, RequestError),
    /// Unknown type (or a type whose feature was not negotiated): no reply.
    Unknown(u8),
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The request type byte, if there is one.
pub(crate) fn request_type(readable: &[u8]) -> Option<u8> {
    readable.first().copied()
}

/// Decode the readable part. `readable` holds its first bytes (at most
/// MAX_READABLE; readable bytes beyond a type's size are ignored);
/// `acked_features` (internal bits) decides which types are known.
pub fn decode(readable: &[u8], acked_features: u64) -> Decoded {
    let Some(ty) = request_type(readable) else {
        return Decoded::Unknown(0);
    };
    let need = match ty {
        T_ATTACH => ATTACH_LEN,
        T_DETACH => DETACH_LEN,
        T_MAP | T_UNMAP if acked_features & features::MAP_UNMAP == 0 => {
            return Decoded::Unknown(ty)
        }
        T_MAP => MAP_LEN,
        T_UNMAP => UNMAP_LEN,
        T_PROBE if acked_features & features::PROBE == 0 => return Decoded::Unknown(ty),
        T_PROBE => PROBE_LEN,
        T_ATTACH_TABLE | T_INVALIDATE if acked_features & features::ATTACH_TABLE == 0 => {
            return Decoded::Unknown(ty)
        }
        T_ATTACH_TABLE => ATTACH_TABLE_LEN,
        T_INVALIDATE => INVALIDATE_LEN,
        T_PAGE_RESP if acked_features & features::PAGE_REQUEST == 0 => return Decoded::Unknown(ty),
        T_PAGE_RESP => PAGE_RESP_LEN,
        _ => return Decoded::Unknown(ty),
    };
    if readable.len() < need {
        return Decoded::Refused(
            ty,
            RequestError::Truncated {
                got: readable.len() as u64,
                need,
            },
        );
    }
    let b = readable;
    let req = match ty {
        T_ATTACH => Request::Attach(Attach {
            domain: le32(b, 4),
            endpoint: le32(b, 8),
            flags: le32(b, 12),
            reserved_nonzero: b[16..20].iter().any(|&x| x != 0),
        }),
        // DETACH's reserved bytes are ignored by the device (spec).
        T_DETACH => Request::Detach(Detach {
            domain: le32(b, 4),
            endpoint: le32(b, 8),
        }),
        T_MAP => Request::Map(Map {
            domain: le32(b, 4),
            virt_start: le64(b, 8),
            virt_end: le64(b, 16),
            phys_start: le64(b, 24),
            flags: le32(b, 32),
        }),
        // UNMAP's reserved bytes: the device MAY refuse; we ignore them.
        T_UNMAP => Request::Unmap(Unmap {
            domain: le32(b, 4),
            virt_start: le64(b, 8),
            virt_end: le64(b, 16),
        }),
        T_PROBE => Request::Probe(Probe {
            endpoint: le32(b, 4),
        }),
        T_ATTACH_TABLE => match decode_attach_table(b) {
            Ok(a) => Request::AttachTable(a),
            Err(e) => return Decoded::Refused(ty, e.into()),
        },
        T_INVALIDATE => match decode_invalidate(b) {
            Ok(i) => Request::Invalidate(i),
            Err(e) => return Decoded::Refused(ty, e.into()),
        },
        _ => match decode_page_resp(b) {
            Ok(p) => Request::PageResp(p),
            Err(e) => return Decoded::Refused(ty, e.into()),
        },
    };
    Decoded::Request(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = features::MAP_UNMAP | features::PROBE;

    fn attach_bytes(domain: u32, ep: u32, flags: u32) -> Vec<u8> {
        let mut b = vec![T_ATTACH, 0, 0, 0];
        b.extend_from_slice(&domain.to_le_bytes());
        b.extend_from_slice(&ep.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b
    }

    #[test]
    fn decodes_attach_fields_little_endian() {
        let b = attach_bytes(0x0102_0304, 7, 1);
        assert_eq!(
            decode(&b, ALL),
            Decoded::Request(Request::Attach(Attach {
                domain: 0x0102_0304,
                endpoint: 7,
                flags: 1,
                reserved_nonzero: false
            }))
        );
    }

    #[test]
    fn attach_reserved_bytes_are_reported() {
        let mut b = attach_bytes(1, 1, 0);
        b[19] = 1;
        match decode(&b, ALL) {
            Decoded::Request(Request::Attach(a)) => assert!(a.reserved_nonzero),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_body_is_refused_with_inval() {
        let b = attach_bytes(1, 1, 0);
        match decode(&b[..19], ALL) {
            Decoded::Refused(T_ATTACH, e) => {
                assert_eq!(e.status(), crate::device::error::Status::Inval)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_type_and_unnegotiated_types_have_no_reply() {
        assert_eq!(decode(&[0x42; 64], ALL), Decoded::Unknown(0x42));
        assert_eq!(decode(&[], ALL), Decoded::Unknown(0));
        let mut probe = vec![T_PROBE, 0, 0, 0];
        probe.resize(PROBE_LEN, 0);
        assert_eq!(
            decode(&probe, features::MAP_UNMAP),
            Decoded::Unknown(T_PROBE)
        );
        let mut map = vec![T_MAP, 0, 0, 0];
        map.resize(MAP_LEN, 0);
        assert_eq!(decode(&map, features::PROBE), Decoded::Unknown(T_MAP));
        // Extension types are unknown until their feature is negotiated.
        for t in 6..=8 {
            assert_eq!(decode(&[t; 128], ALL), Decoded::Unknown(t));
        }
        assert_eq!(
            decode(&[8; 128], ALL | features::ATTACH_TABLE),
            Decoded::Unknown(8)
        );
        let pr = crate::nested::request::encode::page_resp(1, None, 2, 0);
        assert!(matches!(
            decode(&pr, ALL | features::ATTACH_TABLE | features::PAGE_REQUEST),
            Decoded::Request(Request::PageResp(_))
        ));
    }

    #[test]
    fn extension_requests_decode_with_attach_table() {
        use crate::nested::request::encode;
        let acked = ALL | features::ATTACH_TABLE;
        let b = encode::attach_vtd(1, 2, 0, 0, 0x1000, 48);
        assert!(matches!(
            decode(&b, acked),
            Decoded::Request(Request::AttachTable(AttachTable { domain: 1, .. }))
        ));
        match decode(&b[..ATTACH_TABLE_LEN - 1], acked) {
            Decoded::Refused(T_ATTACH_TABLE, RequestError::Truncated { .. }) => {}
            other => panic!("{other:?}"),
        }
        let b = encode::attach_table(1, 2, 0x77, &[]);
        match decode(&b, acked) {
            Decoded::Refused(T_ATTACH_TABLE, e) => {
                assert_eq!(e.status(), crate::device::error::Status::Inval)
            }
            other => panic!("{other:?}"),
        }
        let b = encode::invalidate_domain(4);
        assert!(matches!(
            decode(&b, acked),
            Decoded::Request(Request::Invalidate(Invalidate { domain: 4, .. }))
        ));
        assert_eq!(decode(&b, ALL), Decoded::Unknown(T_INVALIDATE));
    }

    #[test]
    fn decodes_map_and_unmap() {
        let mut b = vec![T_MAP, 0, 0, 0];
        b.extend_from_slice(&5u32.to_le_bytes());
        b.extend_from_slice(&0x1000u64.to_le_bytes());
        b.extend_from_slice(&0x1fffu64.to_le_bytes());
        b.extend_from_slice(&0x8000u64.to_le_bytes());
        b.extend_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            decode(&b, ALL),
            Decoded::Request(Request::Map(Map {
                domain: 5,
                virt_start: 0x1000,
                virt_end: 0x1fff,
                phys_start: 0x8000,
                flags: 3
            }))
        );
        b[0] = T_UNMAP;
        assert_eq!(
            decode(&b[..UNMAP_LEN], ALL),
            Decoded::Request(Request::Unmap(Unmap {
                domain: 5,
                virt_start: 0x1000,
                virt_end: 0x1fff
            }))
        );
    }
}
