// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! ATTACH_TABLE (type 6) and INVALIDATE (type 7) bodies decoded into typed,
//! validated values. Pure: bytes in, values or a `NestedError` out; what an
//! error means to the guest is decided in `device::error`.

use std::mem::offset_of;

use thiserror::Error;

use crate::wire::{
    self, ReqAttachTable, ReqHead, ReqInvalidate, ReqPageResp, RequestType, TableArmSmmu3,
    TableHostSelftest, TableIntelVtd, AT_F_EAFE, AT_F_PAGE_REQUESTS, AT_F_PASID_VALID, AT_F_SRE,
    AT_F_WPE, FORMAT_ARM_SMMU3, FORMAT_HOST_SELFTEST, FORMAT_INTEL_VTD, INV_CACHE_CONFIG,
    INV_CACHE_TLB, INV_F_GLOBAL, INV_F_ID_VALID, INV_F_LEAF, INV_F_PASID_VALID, INV_SCOPE_ADDRESS,
    INV_SCOPE_DOMAIN, INV_SCOPE_PASID, PAGE_RESP_F_PASID_VALID,
};

const AT_F_VTD_S1: u32 = AT_F_SRE | AT_F_WPE | AT_F_EAFE;
const AT_F_KNOWN: u32 = AT_F_VTD_S1 | AT_F_PASID_VALID | AT_F_PAGE_REQUESTS;

/// Largest PASID any endpoint can have (20-bit PCIe PASID).
pub(crate) const MAX_PASID_BITS: u8 = 20;
/// The page sizes an ADDRESS invalidation may name: 4 KiB .. 2^52.
const MIN_PAGE_SHIFT: u8 = 12;
const MAX_PAGE_SHIFT: u8 = 52;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum NestedError {
    #[error("unknown table format {0:#x}")]
    UnknownFormat(u8),
    #[error("reserved byte {0} of the descriptor is not zero")]
    ReservedNotZero(usize),
    #[error("unknown flags {0:#x} for this format")]
    UnknownFlags(u32),
    #[error("addr_width {0} is neither 48 nor 57")]
    BadAddrWidth(u32),
    #[error("table root {0:#x} is not 4 KiB aligned")]
    MisalignedRoot(u64),
    #[error("pasid {0:#x} is set without PASID_VALID")]
    StrayPasid(u32),
    #[error("pasid {0:#x} is wider than {MAX_PASID_BITS} bits")]
    PasidTooWide(u32),
    #[error("unknown invalidation scope {0}")]
    BadScope(u8),
    #[error("invalidation names no known cache (caches {0:#x})")]
    BadCaches(u8),
    #[error("PASID scope without PASID_VALID")]
    PasidScopeWithoutPasid,
    #[error("id {0:#x} is set without ID_VALID")]
    StrayId(u64),
    #[error("address fields are set for a scope that has no address")]
    StrayAddress,
    #[error("page_size 2^{0} is outside 2^12..2^52")]
    BadPageSize(u8),
    #[error("address {0:#x} is not aligned to the page size")]
    MisalignedAddress(u64),
    #[error("range of {nr_pages} pages from {address:#x} is empty or wraps")]
    BadRange { address: u64, nr_pages: u64 },
    #[error("response code {0} is not SUCCESS, INVALID or FAILURE")]
    BadCode(u16),
    #[error("STE {0:#x} {1:#x}: a field, Config or EATS a guest may not set")]
    BadSte(u64, u64),
}

/// One PAGE_RESP request (spec-notes/protocol.md 6.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageResp {
    pub endpoint: u32,
    pub pasid: Option<u32>,
    pub group: u16,
    /// 0 SUCCESS, 1 INVALID, 2 FAILURE.
    pub code: u16,
}

/// Decode a PAGE_RESP request.
pub fn decode_page_resp(r: &ReqPageResp) -> Result<PageResp, NestedError> {
    let flags = r.flags.to_native();
    let pasid_field = r.pasid.to_native();
    let code = r.code.to_native();
    check_zero(&r.reserved, offset_of!(ReqPageResp, reserved))?;
    if flags & !PAGE_RESP_F_PASID_VALID != 0 {
        return Err(NestedError::UnknownFlags(flags & !PAGE_RESP_F_PASID_VALID));
    }
    if code > 2 {
        return Err(NestedError::BadCode(code));
    }
    let pasid = if flags & PAGE_RESP_F_PASID_VALID != 0 {
        Some(pasid_field)
    } else if pasid_field != 0 {
        return Err(NestedError::StrayPasid(pasid_field));
    } else {
        None
    };
    Ok(PageResp {
        endpoint: r.endpoint.into(),
        pasid,
        group: r.group_id.into(),
        code,
    })
}

/// A guest table as ATTACH_TABLE describes it, PASID and flags aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableDesc {
    /// Guest STE words; PASIDs live in the guest's CD table.
    ArmSmmu3 { ste: [u64; 2] },
    /// VT-d first-stage table: `flags` holds SRE/WPE/EAFE only.
    IntelVtd {
        flags: u32,
        pgtbl: u64,
        addr_width: u32,
    },
    /// The iommufd selftest mock's nested format.
    HostSelftest { iotlb: u32 },
}

impl TableDesc {
    pub(crate) fn format(&self) -> u8 {
        match self {
            TableDesc::ArmSmmu3 { .. } => FORMAT_ARM_SMMU3,
            TableDesc::IntelVtd { .. } => FORMAT_INTEL_VTD,
            TableDesc::HostSelftest { .. } => FORMAT_HOST_SELFTEST,
        }
    }
}

/// One ATTACH_TABLE request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachTable {
    pub domain: u32,
    pub endpoint: u32,
    pub table: TableDesc,
    /// Attach at this PASID instead of the endpoint's default address space.
    pub pasid: Option<u32>,
    /// The driver answers page requests for this table.
    pub page_requests: bool,
}

/// What an INVALIDATE covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvScope {
    Domain,
    Pasid,
    /// `nr_pages` pages of 2^`page_shift` bytes from `address` (no wrap).
    Address {
        address: u64,
        nr_pages: u64,
        page_shift: u8,
    },
}

/// One INVALIDATE request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalidate {
    pub domain: u32,
    pub scope: InvScope,
    /// INV_CACHE_* bits.
    pub caches: u8,
    /// Only leaf entries changed.
    pub leaf: bool,
    pub global: bool,
    pub pasid: Option<u32>,
    /// Architecture tag (SMMU ASID, selftest IOTLB slot).
    pub id: Option<u64>,
}

impl Invalidate {
    /// The byte range it names, inclusive, or None for "everything".
    #[cfg(test)]
    pub(crate) fn range(&self) -> Option<(u64, u64)> {
        match self.scope {
            InvScope::Address {
                address,
                nr_pages,
                page_shift,
            } => Some((address, address + ((nr_pages << page_shift) - 1))),
            _ => None,
        }
    }
}

/// `bytes` all zero, else the offset (from the request start, `at` being
/// that of `bytes[0]`) of the first that is not.
fn check_zero<const N: usize>(bytes: &[u8; N], at: usize) -> Result<(), NestedError> {
    // A fixed-size compare (one word for PAGE_RESP's 8 bytes); the search
    // only for a request that is refused.
    if *bytes == [0; N] {
        return Ok(());
    }
    match bytes.iter().position(|&x| x != 0) {
        Some(i) => Err(NestedError::ReservedNotZero(at + i)),
        None => Ok(()),
    }
}

/// A descriptor's fields: the table, its flags and its PASID field.
struct Descriptor {
    table: TableDesc,
    flags: u32,
    pasid: u32,
}

/// The offset of a descriptor's field from the request start.
macro_rules! table_offset {
    ($t:ty, $f:ident) => {
        offset_of!(ReqAttachTable, table) + offset_of!($t, $f)
    };
}

fn descriptor(r: &ReqAttachTable) -> Result<Descriptor, NestedError> {
    Ok(match r.format {
        FORMAT_ARM_SMMU3 => {
            let d: &TableArmSmmu3 = table_of(r);
            check_zero(&d.zero, table_offset!(TableArmSmmu3, zero))?;
            let [w0, w1] = d.ste;
            let ste = [w0.to_native(), w1.to_native()];
            super::smmu3::check_vste(ste)?;
            Descriptor {
                table: TableDesc::ArmSmmu3 { ste },
                flags: 0,
                pasid: 0,
            }
        }
        FORMAT_INTEL_VTD => {
            let d: &TableIntelVtd = table_of(r);
            check_zero(&d.zero, table_offset!(TableIntelVtd, zero))?;
            let flags = d.flags.to_native();
            let pgtbl = d.pgtbl.to_native();
            let addr_width = d.addr_width.to_native();
            if flags & !AT_F_KNOWN != 0 {
                return Err(NestedError::UnknownFlags(flags & !AT_F_KNOWN));
            }
            if addr_width != 48 && addr_width != 57 {
                return Err(NestedError::BadAddrWidth(addr_width));
            }
            if pgtbl & 0xfff != 0 {
                return Err(NestedError::MisalignedRoot(pgtbl));
            }
            Descriptor {
                table: TableDesc::IntelVtd {
                    flags: flags & AT_F_VTD_S1,
                    pgtbl,
                    addr_width,
                },
                flags,
                pasid: d.pasid.into(),
            }
        }
        FORMAT_HOST_SELFTEST => {
            let d: &TableHostSelftest = table_of(r);
            check_zero(&d.zero, table_offset!(TableHostSelftest, zero))?;
            let flags = d.flags.to_native();
            // The mock takes no VT-d flags.
            let known = AT_F_PASID_VALID | AT_F_PAGE_REQUESTS;
            if flags & !known != 0 {
                return Err(NestedError::UnknownFlags(flags & !known));
            }
            Descriptor {
                table: TableDesc::HostSelftest {
                    iotlb: d.iotlb.into(),
                },
                flags,
                pasid: d.pasid.into(),
            }
        }
        other => return Err(NestedError::UnknownFormat(other)),
    })
}

/// The descriptor area as format `T`.
fn table_of<T: vm_memory::ByteValued>(r: &ReqAttachTable) -> &T {
    // Each format's struct is exactly the area's size, so `read` cannot
    // fail (checked at compile time).
    const { assert!(std::mem::size_of::<T>() == std::mem::size_of::<[u8; 108]>()) };
    match wire::read(&r.table) {
        Some(d) => d,
        None => unreachable!("descriptor structs are the descriptor's size"),
    }
}

/// Decode an ATTACH_TABLE request.
pub fn decode_attach_table(r: &ReqAttachTable) -> Result<AttachTable, NestedError> {
    check_zero(&r.reserved, offset_of!(ReqAttachTable, reserved))?;
    let Descriptor {
        table,
        flags,
        pasid: pasid_field,
    } = descriptor(r)?;
    let pasid = if flags & AT_F_PASID_VALID != 0 {
        if pasid_field >> MAX_PASID_BITS != 0 {
            return Err(NestedError::PasidTooWide(pasid_field));
        }
        Some(pasid_field)
    } else if pasid_field != 0 {
        return Err(NestedError::StrayPasid(pasid_field));
    } else {
        None
    };
    Ok(AttachTable {
        domain: r.domain.into(),
        endpoint: r.endpoint.into(),
        table,
        pasid,
        page_requests: flags & AT_F_PAGE_REQUESTS != 0,
    })
}

/// Decode an INVALIDATE request.
pub(crate) fn decode_invalidate(r: &ReqInvalidate) -> Result<Invalidate, NestedError> {
    let scope = r.scope;
    let caches = r.caches;
    let flags = r.flags.to_native();
    let domain = r.domain.to_native();
    let pasid_field = r.pasid.to_native();
    let id_field = r.id.to_native();
    let address = r.address.to_native();
    let nr_pages = r.nr_pages.to_native();
    let page_shift = r.page_size;
    check_zero(&r.reserved, offset_of!(ReqInvalidate, reserved))?;
    let known = INV_F_LEAF | INV_F_PASID_VALID | INV_F_ID_VALID | INV_F_GLOBAL;
    if flags & !known != 0 {
        return Err(NestedError::UnknownFlags(u32::from(flags & !known)));
    }
    if caches == 0 || caches & !(INV_CACHE_CONFIG | INV_CACHE_TLB) != 0 {
        return Err(NestedError::BadCaches(caches));
    }
    let pasid = if flags & INV_F_PASID_VALID != 0 {
        if pasid_field >> MAX_PASID_BITS != 0 {
            return Err(NestedError::PasidTooWide(pasid_field));
        }
        Some(pasid_field)
    } else if pasid_field != 0 {
        return Err(NestedError::StrayPasid(pasid_field));
    } else {
        None
    };
    let id = if flags & INV_F_ID_VALID != 0 {
        Some(id_field)
    } else if id_field != 0 {
        return Err(NestedError::StrayId(id_field));
    } else {
        None
    };
    let scope = match scope {
        INV_SCOPE_DOMAIN | INV_SCOPE_PASID => {
            if address != 0 || nr_pages != 0 || page_shift != 0 {
                return Err(NestedError::StrayAddress);
            }
            if scope == INV_SCOPE_PASID {
                if pasid.is_none() {
                    return Err(NestedError::PasidScopeWithoutPasid);
                }
                InvScope::Pasid
            } else {
                InvScope::Domain
            }
        }
        INV_SCOPE_ADDRESS => {
            if !(MIN_PAGE_SHIFT..=MAX_PAGE_SHIFT).contains(&page_shift) {
                return Err(NestedError::BadPageSize(page_shift));
            }
            if address & ((1u64 << page_shift) - 1) != 0 {
                return Err(NestedError::MisalignedAddress(address));
            }
            // The last byte must not wrap past 2^64 - 1.
            let fits = nr_pages != 0
                && nr_pages
                    .checked_shl(u32::from(page_shift))
                    .filter(|&bytes| bytes >> page_shift == nr_pages)
                    .and_then(|bytes| address.checked_add(bytes - 1))
                    .is_some();
            if !fits {
                return Err(NestedError::BadRange { address, nr_pages });
            }
            InvScope::Address {
                address,
                nr_pages,
                page_shift,
            }
        }
        other => return Err(NestedError::BadScope(other)),
    };
    Ok(Invalidate {
        domain,
        scope,
        caches,
        leaf: flags & INV_F_LEAF != 0,
        global: flags & INV_F_GLOBAL != 0,
        pasid,
        id,
    })
}

/// Encoders, for tests and guest-driver developers' tools: the readable
/// parts as wire structs (`as_slice()` gives the bytes).
pub mod encode {
    use vm_memory::{ByteValued, Le32};

    use super::*;

    /// An ATTACH_TABLE request with a raw descriptor (from offset 16).
    pub(crate) fn attach_table(
        domain: u32,
        endpoint: u32,
        format: u8,
        descriptor: &[u8],
    ) -> ReqAttachTable {
        let mut table = [0u8; 108];
        let n = descriptor.len().min(table.len());
        table[..n].copy_from_slice(&descriptor[..n]);
        ReqAttachTable {
            head: ReqHead::new(RequestType::AttachTable),
            domain: domain.into(),
            endpoint: endpoint.into(),
            format,
            reserved: [0; 3],
            table,
        }
    }

    /// An INTEL_VTD ATTACH_TABLE.
    pub fn attach_vtd(
        domain: u32,
        endpoint: u32,
        flags: u32,
        pasid: u32,
        pgtbl: u64,
        addr_width: u32,
    ) -> ReqAttachTable {
        let d = TableIntelVtd {
            flags: flags.into(),
            pasid: pasid.into(),
            pgtbl: pgtbl.into(),
            addr_width: addr_width.into(),
            zero: [0; 88],
        };
        attach_table(domain, endpoint, FORMAT_INTEL_VTD, d.as_slice())
    }

    /// A HOST_SELFTEST ATTACH_TABLE.
    #[cfg(test)]
    pub(crate) fn attach_selftest(
        domain: u32,
        endpoint: u32,
        flags: u32,
        pasid: u32,
        iotlb: u32,
    ) -> ReqAttachTable {
        let d = TableHostSelftest {
            flags: flags.into(),
            pasid: pasid.into(),
            iotlb: iotlb.into(),
            zero: [0; 96],
        };
        attach_table(domain, endpoint, FORMAT_HOST_SELFTEST, d.as_slice())
    }

    /// An ARM_SMMU3 ATTACH_TABLE.
    #[cfg(test)]
    pub(crate) fn attach_smmu3(domain: u32, endpoint: u32, ste: [u64; 2]) -> ReqAttachTable {
        let d = TableArmSmmu3 {
            ste: ste.map(vm_memory::Le64::from),
            zero: [0; 92],
        };
        attach_table(domain, endpoint, FORMAT_ARM_SMMU3, d.as_slice())
    }

    /// An INVALIDATE request.
    #[allow(clippy::too_many_arguments)]
    #[cfg(test)]
    pub(crate) fn invalidate(
        domain: u32,
        scope: u8,
        caches: u8,
        flags: u16,
        pasid: u32,
        id: u64,
        address: u64,
        nr_pages: u64,
        page_shift: u8,
    ) -> ReqInvalidate {
        ReqInvalidate {
            head: ReqHead::new(RequestType::Invalidate),
            scope,
            caches,
            flags: flags.into(),
            domain: domain.into(),
            pasid: pasid.into(),
            id: id.into(),
            address: address.into(),
            nr_pages: nr_pages.into(),
            page_size: page_shift,
            reserved: [0; 19],
        }
    }

    /// A PAGE_RESP request.
    pub fn page_resp(endpoint: u32, pasid: Option<u32>, group: u16, code: u16) -> ReqPageResp {
        let flags = if pasid.is_some() {
            PAGE_RESP_F_PASID_VALID
        } else {
            0
        };
        ReqPageResp {
            head: ReqHead::new(RequestType::PageResp),
            endpoint: endpoint.into(),
            flags: Le32::from(flags),
            pasid: pasid.unwrap_or(0).into(),
            group_id: group.into(),
            code: code.into(),
            reserved: [0; 8],
        }
    }

    /// INVALIDATE of a whole domain's TLB.
    #[cfg(test)]
    pub(crate) fn invalidate_domain(domain: u32) -> ReqInvalidate {
        invalidate(domain, INV_SCOPE_DOMAIN, INV_CACHE_TLB, 0, 0, 0, 0, 0, 0)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::ByteValued;

    use super::encode::*;
    use super::*;

    #[test]
    fn vtd_descriptor_fields_and_flags() {
        let b = attach_vtd(
            5,
            9,
            AT_F_SRE | AT_F_PASID_VALID | AT_F_PAGE_REQUESTS,
            7,
            0x1234_5000,
            57,
        );
        assert_eq!(
            decode_attach_table(&b),
            Ok(AttachTable {
                domain: 5,
                endpoint: 9,
                table: TableDesc::IntelVtd {
                    flags: AT_F_SRE,
                    pgtbl: 0x1234_5000,
                    addr_width: 57
                },
                pasid: Some(7),
                page_requests: true,
            })
        );
    }

    #[test]
    fn vtd_refusals() {
        let ok = |f, p, root, w| decode_attach_table(&attach_vtd(1, 1, f, p, root, w));
        assert_eq!(ok(0, 0, 0x1000, 48).unwrap().pasid, None);
        assert_eq!(ok(1 << 3, 0, 0x1000, 48), Err(NestedError::UnknownFlags(8)));
        assert_eq!(ok(0, 0, 0x1000, 39), Err(NestedError::BadAddrWidth(39)));
        assert_eq!(
            ok(0, 0, 0x1800, 48),
            Err(NestedError::MisalignedRoot(0x1800))
        );
        assert_eq!(ok(0, 3, 0x1000, 48), Err(NestedError::StrayPasid(3)));
        assert_eq!(
            ok(AT_F_PASID_VALID, 1 << 20, 0x1000, 48),
            Err(NestedError::PasidTooWide(1 << 20))
        );
        // Reserved bytes after the header and after the descriptor.
        let mut b = attach_vtd(1, 1, 0, 0, 0x1000, 48);
        b.as_mut_slice()[14] = 1;
        assert_eq!(
            decode_attach_table(&b),
            Err(NestedError::ReservedNotZero(14))
        );
        let mut b = attach_vtd(1, 1, 0, 0, 0x1000, 48);
        b.as_mut_slice()[123] = 1;
        assert_eq!(
            decode_attach_table(&b),
            Err(NestedError::ReservedNotZero(123))
        );
    }

    #[test]
    fn selftest_and_smmu_descriptors() {
        let b = attach_selftest(2, 3, AT_F_PAGE_REQUESTS, 0, 0xbadbeef);
        let a = decode_attach_table(&b).unwrap();
        assert_eq!(a.table, TableDesc::HostSelftest { iotlb: 0xbadbeef });
        assert!(a.page_requests);
        // VT-d flags mean nothing to the mock.
        let b = attach_selftest(2, 3, AT_F_SRE, 0, 1);
        assert_eq!(decode_attach_table(&b), Err(NestedError::UnknownFlags(1)));
        let mut b = attach_selftest(2, 3, 0, 0, 1);
        b.as_mut_slice()[28] = 1;
        assert_eq!(
            decode_attach_table(&b),
            Err(NestedError::ReservedNotZero(28))
        );

        let b = attach_smmu3(4, 4, [0x11, 0x22]);
        let a = decode_attach_table(&b).unwrap();
        assert_eq!(a.table, TableDesc::ArmSmmu3 { ste: [0x11, 0x22] });
        assert_eq!((a.pasid, a.page_requests), (None, false));
        let mut b = b;
        b.as_mut_slice()[40] = 1;
        assert_eq!(
            decode_attach_table(&b),
            Err(NestedError::ReservedNotZero(40))
        );
    }

    #[test]
    fn unknown_format_is_refused() {
        for f in [0u8, 3, 4, 0xef, 0xf1, 0xff] {
            let b = attach_table(1, 1, f, &[]);
            assert_eq!(decode_attach_table(&b), Err(NestedError::UnknownFormat(f)));
        }
    }

    #[test]
    fn page_resp_decoding() {
        let b = page_resp(7, Some(3), 0x102, 1);
        assert_eq!(
            decode_page_resp(&b),
            Ok(PageResp {
                endpoint: 7,
                pasid: Some(3),
                group: 0x102,
                code: 1
            })
        );
        assert_eq!(
            decode_page_resp(&page_resp(7, None, 1, 3)),
            Err(NestedError::BadCode(3))
        );
        let mut b = page_resp(7, None, 1, 0);
        b.as_mut_slice()[27] = 1;
        assert_eq!(decode_page_resp(&b), Err(NestedError::ReservedNotZero(27)));
        let mut b = page_resp(7, None, 1, 0);
        b.as_mut_slice()[8] = 2;
        assert_eq!(decode_page_resp(&b), Err(NestedError::UnknownFlags(2)));
        let mut b = page_resp(7, None, 1, 0);
        b.as_mut_slice()[12] = 9;
        assert_eq!(decode_page_resp(&b), Err(NestedError::StrayPasid(9)));
    }

    #[test]
    fn invalidate_scopes() {
        let d = decode_invalidate(&invalidate_domain(3)).unwrap();
        assert_eq!((d.domain, d.scope, d.range()), (3, InvScope::Domain, None));
        let p = invalidate(3, INV_SCOPE_PASID, 3, INV_F_PASID_VALID, 9, 0, 0, 0, 0);
        let p = decode_invalidate(&p).unwrap();
        assert_eq!((p.scope, p.pasid, p.caches), (InvScope::Pasid, Some(9), 3));
        let a = invalidate(
            3,
            INV_SCOPE_ADDRESS,
            INV_CACHE_TLB,
            INV_F_LEAF | INV_F_ID_VALID,
            0,
            0x42,
            0x20_0000,
            2,
            21,
        );
        let a = decode_invalidate(&a).unwrap();
        assert_eq!(a.range(), Some((0x20_0000, 0x5f_ffff)));
        assert!(a.leaf && !a.global);
        assert_eq!(a.id, Some(0x42));
        // The very last page of the address space is fine.
        let top = invalidate(1, INV_SCOPE_ADDRESS, 2, 0, 0, 0, !0xfff, 1, 12);
        assert_eq!(
            decode_invalidate(&top).unwrap().range(),
            Some((!0xfff, u64::MAX))
        );
    }

    #[test]
    fn invalidate_refusals() {
        use NestedError::*;
        let inv = |scope, caches, flags, pasid, id, addr, n, shift| {
            decode_invalidate(&invalidate(
                1, scope, caches, flags, pasid, id, addr, n, shift,
            ))
        };
        let s = INV_SCOPE_ADDRESS;
        assert_eq!(inv(0, 2, 0, 0, 0, 0, 0, 0), Err(BadScope(0)));
        assert_eq!(inv(4, 2, 0, 0, 0, 0, 0, 0), Err(BadScope(4)));
        assert_eq!(inv(1, 0, 0, 0, 0, 0, 0, 0), Err(BadCaches(0)));
        assert_eq!(inv(1, 4, 0, 0, 0, 0, 0, 0), Err(BadCaches(4)));
        assert_eq!(inv(1, 2, 1 << 4, 0, 0, 0, 0, 0), Err(UnknownFlags(16)));
        assert_eq!(inv(2, 2, 0, 0, 0, 0, 0, 0), Err(PasidScopeWithoutPasid));
        assert_eq!(inv(1, 2, 0, 5, 0, 0, 0, 0), Err(StrayPasid(5)));
        assert_eq!(inv(1, 2, 0, 0, 5, 0, 0, 0), Err(StrayId(5)));
        assert_eq!(inv(1, 2, 0, 0, 0, 0x1000, 0, 0), Err(StrayAddress));
        assert_eq!(inv(s, 2, 0, 0, 0, 0x1000, 1, 11), Err(BadPageSize(11)));
        assert_eq!(inv(s, 2, 0, 0, 0, 0x1000, 1, 53), Err(BadPageSize(53)));
        assert_eq!(
            inv(s, 2, 0, 0, 0, 0x1000, 1, 21),
            Err(MisalignedAddress(0x1000))
        );
        assert_eq!(
            inv(s, 2, 0, 0, 0, 0x1000, 0, 12),
            Err(BadRange {
                address: 0x1000,
                nr_pages: 0
            })
        );
        assert_eq!(
            inv(s, 2, 0, 0, 0, !0xfff, 2, 12),
            Err(BadRange {
                address: !0xfff,
                nr_pages: 2
            })
        );
        assert_eq!(
            inv(s, 2, 0, 0, 0, 0, 1 << 60, 12),
            Err(BadRange {
                address: 0,
                nr_pages: 1 << 60
            })
        );
        let mut b = invalidate_domain(1);
        b.as_mut_slice()[59] = 1;
        assert_eq!(decode_invalidate(&b), Err(ReservedNotZero(59)));
    }
}
