// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Decoding of requestq requests (head + body) into typed values.
//!
//! Pure: bytes in, `Request` out. Which request types exist depends on the
//! negotiated features; a type the driver cannot use is "unknown" and gets
//! no reply at all (used length 0), as the spec asks.

use crate::device::error::RequestError;
use crate::device::features;
use crate::nested::request::{decode_attach_table, decode_invalidate, decode_page_resp, PageResp};
use crate::nested::{AttachTable, Invalidate};
use crate::wire::{self, ReqAttach, ReqDetach, ReqMap, ReqProbe, ReqUnmap, RequestType};

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

impl Request {
    pub(crate) fn ty(&self) -> RequestType {
        match self {
            Request::Attach(_) => RequestType::Attach,
            Request::Detach(_) => RequestType::Detach,
            Request::Map(_) => RequestType::Map,
            Request::Unmap(_) => RequestType::Unmap,
            Request::Probe(_) => RequestType::Probe,
            Request::AttachTable(_) => RequestType::AttachTable,
            Request::Invalidate(_) => RequestType::Invalidate,
            Request::PageResp(_) => RequestType::PageResp,
        }
    }
}

/// What decoding can conclude besides a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Request(Request),
    /// Known type, body refused: answer with this error's status.
    Refused(RequestType, RequestError),
    /// Unknown type (or a type whose feature was not negotiated): no reply.
    Unknown(u8),
}

/// Is `ty` usable with these (internal) feature bits?
fn negotiated(ty: RequestType, acked_features: u64) -> bool {
    let needs = match ty {
        RequestType::Attach | RequestType::Detach => return true,
        RequestType::Map | RequestType::Unmap => features::MAP_UNMAP,
        RequestType::Probe => features::PROBE,
        RequestType::AttachTable | RequestType::Invalidate => features::ATTACH_TABLE,
        RequestType::PageResp => features::PAGE_REQUEST,
    };
    acked_features & needs != 0
}

/// Decode the readable part. `readable` holds its first bytes (at most
/// MAX_READABLE; readable bytes beyond a type's size are ignored);
/// `acked_features` (internal bits) decides which types are known.
pub fn decode(readable: &[u8], acked_features: u64) -> Decoded {
    let Some(&byte) = readable.first() else {
        return Decoded::Unknown(0);
    };
    let ty = match RequestType::try_from(byte) {
        Ok(ty) if negotiated(ty, acked_features) => ty,
        _ => return Decoded::Unknown(byte),
    };
    match decode_body(ty, readable) {
        Ok(req) => Decoded::Request(req),
        Err(e) => Decoded::Refused(ty, e),
    }
}

/// The readable part as `T`, or Truncated.
fn body<T: vm_memory::ByteValued>(readable: &[u8]) -> Result<&T, RequestError> {
    wire::read(readable).ok_or(RequestError::Truncated {
        got: readable.len() as u64,
        need: std::mem::size_of::<T>(),
    })
}

// Inlined into `decode`: the request is then built in place, not copied
// out of a `Result` (most of `decode`'s cost otherwise).
#[inline(always)]
fn decode_body(ty: RequestType, b: &[u8]) -> Result<Request, RequestError> {
    Ok(match ty {
        RequestType::Attach => {
            let r: &ReqAttach = body(b)?;
            Request::Attach(Attach {
                domain: r.domain.into(),
                endpoint: r.endpoint.into(),
                flags: r.flags.into(),
                reserved_nonzero: r.reserved != [0; 4],
            })
        }
        // DETACH's reserved bytes are ignored by the device (spec).
        RequestType::Detach => {
            let r: &ReqDetach = body(b)?;
            Request::Detach(Detach {
                domain: r.domain.into(),
                endpoint: r.endpoint.into(),
            })
        }
        RequestType::Map => {
            let r: &ReqMap = body(b)?;
            Request::Map(Map {
                domain: r.domain.into(),
                virt_start: r.virt_start.into(),
                virt_end: r.virt_end.into(),
                phys_start: r.phys_start.into(),
                flags: r.flags.into(),
            })
        }
        // UNMAP's reserved bytes: the device MAY refuse; we ignore them.
        RequestType::Unmap => {
            let r: &ReqUnmap = body(b)?;
            Request::Unmap(Unmap {
                domain: r.domain.into(),
                virt_start: r.virt_start.into(),
                virt_end: r.virt_end.into(),
            })
        }
        RequestType::Probe => {
            let r: &ReqProbe = body(b)?;
            Request::Probe(Probe {
                endpoint: r.endpoint.into(),
            })
        }
        RequestType::AttachTable => Request::AttachTable(decode_attach_table(body(b)?)?),
        RequestType::Invalidate => Request::Invalidate(decode_invalidate(body(b)?)?),
        RequestType::PageResp => Request::PageResp(decode_page_resp(body(b)?)?),
    })
}

#[cfg(test)]
mod tests {
    use vm_memory::ByteValued;

    use super::*;
    use crate::wire::MAX_READABLE;

    const T_ATTACH: u8 = RequestType::Attach as u8;
    const T_MAP: u8 = RequestType::Map as u8;
    const T_UNMAP: u8 = RequestType::Unmap as u8;
    const T_PROBE: u8 = RequestType::Probe as u8;
    const T_INVALIDATE: u8 = RequestType::Invalidate as u8;

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
            Decoded::Refused(RequestType::Attach, e) => {
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
        probe.resize(RequestType::Probe.readable_len(), 0);
        assert_eq!(
            decode(&probe, features::MAP_UNMAP),
            Decoded::Unknown(T_PROBE)
        );
        let mut map = vec![T_MAP, 0, 0, 0];
        map.resize(RequestType::Map.readable_len(), 0);
        assert_eq!(decode(&map, features::PROBE), Decoded::Unknown(T_MAP));
        // Extension types are unknown until their feature is negotiated.
        for t in 6..=8 {
            assert_eq!(decode(&[t; MAX_READABLE], ALL), Decoded::Unknown(t));
        }
        assert_eq!(
            decode(&[8; MAX_READABLE], ALL | features::ATTACH_TABLE),
            Decoded::Unknown(8)
        );
        let pr = crate::nested::request::encode::page_resp(1, None, 2, 0);
        assert!(matches!(
            decode(
                pr.as_slice(),
                ALL | features::ATTACH_TABLE | features::PAGE_REQUEST
            ),
            Decoded::Request(Request::PageResp(_))
        ));
    }

    #[test]
    fn extension_requests_decode_with_attach_table() {
        use crate::nested::request::encode;
        let acked = ALL | features::ATTACH_TABLE;
        let b = encode::attach_vtd(1, 2, 0, 0, 0x1000, 48);
        let b = b.as_slice();
        assert!(matches!(
            decode(b, acked),
            Decoded::Request(Request::AttachTable(AttachTable { domain: 1, .. }))
        ));
        match decode(&b[..123], acked) {
            Decoded::Refused(
                RequestType::AttachTable,
                RequestError::Truncated { need: 124, .. },
            ) => {}
            other => panic!("{other:?}"),
        }
        let b = encode::attach_table(1, 2, 0x77, &[]);
        match decode(b.as_slice(), acked) {
            Decoded::Refused(RequestType::AttachTable, e) => {
                assert_eq!(e.status(), crate::device::error::Status::Inval)
            }
            other => panic!("{other:?}"),
        }
        let b = encode::invalidate_domain(4);
        let b = b.as_slice();
        assert!(matches!(
            decode(b, acked),
            Decoded::Request(Request::Invalidate(Invalidate { domain: 4, .. }))
        ));
        assert_eq!(decode(b, ALL), Decoded::Unknown(T_INVALIDATE));
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
            decode(&b[..28], ALL),
            Decoded::Request(Request::Unmap(Unmap {
                domain: 5,
                virt_start: 0x1000,
                virt_end: 0x1fff
            }))
        );
    }
}
