// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-iommu wire format, in one place: every request, PROBE
//! property, event record and the config space as a `#[repr(C, packed)]`
//! struct of vm_memory's little-endian types, the numbers that go in them,
//! and the request types with their names.
//!
//! Layouts are spec-notes/protocol.md's (the ratified ones: virtio 1.2
//! section 5.13); the size assertions below hold every struct to it.
//! `packed` because some readable parts are not a multiple of their
//! widest field (INVALIDATE: 60 bytes with le64 fields) and so that a
//! struct can be read in place from a byte buffer of any alignment.
//!
//! A crate-level room, not the device's: the device, the guest table
//! formats (`nested`) and the fault relay all speak this vocabulary, and
//! dependencies point from the device to them, never back.
//! Decoders borrow them with `read`; encoders fill them and copy
//! `as_slice()`. What the fields mean, and what is valid, is decided
//! elsewhere (`device::request`, `nested::request`).

use std::mem::size_of;

use vm_memory::{ByteValued, Le16, Le32, Le64};

/// Borrow a `T` from the start of `bytes`; None if `bytes` is shorter.
/// Every struct here has alignment 1 (packed), so this never fails on
/// alignment.
pub(crate) fn read<T: ByteValued>(bytes: &[u8]) -> Option<&T> {
    T::from_slice(bytes.get(..size_of::<T>())?)
}

/// A request's type byte (`head.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RequestType {
    Attach = 1,
    Detach = 2,
    Map = 3,
    Unmap = 4,
    Probe = 5,
    /// Extension (F_ATTACH_TABLE).
    AttachTable = 6,
    /// Extension (F_ATTACH_TABLE).
    Invalidate = 7,
    /// Extension (F_PAGE_REQUEST).
    PageResp = 8,
}

/// Each type's names, indexed by type - 1: the spec's (logs) and the
/// `stats` key. The only place they are spelled.
const TYPE_NAMES: [(&str, &str); 8] = [
    ("ATTACH", "attach"),
    ("DETACH", "detach"),
    ("MAP", "map"),
    ("UNMAP", "unmap"),
    ("PROBE", "probe"),
    ("ATTACH_TABLE", "attach_table"),
    ("INVALIDATE", "invalidate"),
    ("PAGE_RESP", "page_resp"),
];

impl RequestType {
    /// Every type, in numeric order.
    pub const ALL: [RequestType; 8] = [
        RequestType::Attach,
        RequestType::Detach,
        RequestType::Map,
        RequestType::Unmap,
        RequestType::Probe,
        RequestType::AttachTable,
        RequestType::Invalidate,
        RequestType::PageResp,
    ];

    /// The spec's name, for logs: `ATTACH_TABLE`.
    pub fn name(self) -> &'static str {
        TYPE_NAMES[self as usize - 1].0
    }

    /// The control socket's `stats` key: `attach_table`.
    pub fn key(self) -> &'static str {
        TYPE_NAMES[self as usize - 1].1
    }

    /// The readable part's size (head and body).
    pub fn readable_len(self) -> usize {
        match self {
            RequestType::Attach => size_of::<ReqAttach>(),
            RequestType::Detach => size_of::<ReqDetach>(),
            RequestType::Map => size_of::<ReqMap>(),
            RequestType::Unmap => size_of::<ReqUnmap>(),
            RequestType::Probe => size_of::<ReqProbe>(),
            RequestType::AttachTable => size_of::<ReqAttachTable>(),
            RequestType::Invalidate => size_of::<ReqInvalidate>(),
            RequestType::PageResp => size_of::<ReqPageResp>(),
        }
    }
}

impl TryFrom<u8> for RequestType {
    /// The byte, not a known type.
    type Error = u8;

    fn try_from(b: u8) -> Result<Self, u8> {
        match b {
            1..=8 => Ok(RequestType::ALL[usize::from(b) - 1]),
            other => Err(other),
        }
    }
}

impl std::fmt::Display for RequestType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The tail's size: the first bytes of the writable part.
pub const TAIL_LEN: usize = size_of::<ReqTail>();
/// The longest readable part any type needs (ATTACH_TABLE), rounded up.
pub const MAX_READABLE: usize = size_of::<ReqAttachTable>().next_multiple_of(8);

// Ratified flags.
pub(crate) const ATTACH_F_BYPASS: u32 = 1;
pub(crate) const MAP_F_READ: u32 = 1 << 0;
pub(crate) const MAP_F_WRITE: u32 = 1 << 1;
pub(crate) const MAP_F_MMIO: u32 = 1 << 2;

// ATTACH_TABLE formats and flags (protocol.md 6.2.1).
pub(crate) const FORMAT_ARM_SMMU3: u8 = 1;
pub(crate) const FORMAT_INTEL_VTD: u8 = 2;
pub(crate) const FORMAT_HOST_SELFTEST: u8 = 0xf0;
pub(crate) const AT_F_SRE: u32 = 1 << 0;
pub(crate) const AT_F_WPE: u32 = 1 << 1;
pub(crate) const AT_F_EAFE: u32 = 1 << 2;
pub const AT_F_PASID_VALID: u32 = 1 << 8;
pub const AT_F_PAGE_REQUESTS: u32 = 1 << 9;

// INVALIDATE scopes, caches and flags (protocol.md 6.3).
pub(crate) const INV_SCOPE_DOMAIN: u8 = 1;
pub(crate) const INV_SCOPE_PASID: u8 = 2;
pub(crate) const INV_SCOPE_ADDRESS: u8 = 3;
pub(crate) const INV_CACHE_CONFIG: u8 = 1 << 0;
pub(crate) const INV_CACHE_TLB: u8 = 1 << 1;
pub(crate) const INV_F_LEAF: u16 = 1 << 0;
pub(crate) const INV_F_PASID_VALID: u16 = 1 << 1;
pub(crate) const INV_F_ID_VALID: u16 = 1 << 2;
pub(crate) const INV_F_GLOBAL: u16 = 1 << 3;

/// PAGE_RESP flags (protocol.md 6.4).
pub(crate) const PAGE_RESP_F_PASID_VALID: u32 = 1 << 0;

// PROBE property types (RESV_MEM ratified, the rest protocol.md 6.6).
pub(crate) const PROBE_T_RESV_MEM: u16 = 1;
pub(crate) const PROBE_T_TABLE: u16 = 0x100;
pub(crate) const PROBE_T_HW_INFO: u16 = 0x101;
pub(crate) const PROBE_T_TABLE_INTEL_VTD: u16 = 0x102;
pub(crate) const PROBE_TABLE_F_PAGE_REQUESTS: u8 = 1;

// Event record reasons and flags (protocol.md 6.7).
pub(crate) const REASON_UNKNOWN: u8 = 0;
pub(crate) const REASON_DOMAIN: u8 = 1;
pub(crate) const REASON_MAPPING: u8 = 2;
pub(crate) const FLAG_READ: u32 = 1 << 0;
pub(crate) const FLAG_WRITE: u32 = 1 << 1;
pub(crate) const FLAG_EXEC: u32 = 1 << 2;
pub(crate) const FLAG_PRIV: u32 = 1 << 3;
pub(crate) const FLAG_LAST: u32 = 1 << 4;
pub(crate) const FLAG_PAGE_REQ: u32 = 1 << 5;
pub(crate) const FLAG_ADDRESS: u32 = 1 << 8;
pub(crate) const FLAG_PASID: u32 = 1 << 9;
pub(crate) const FLAG_GROUP_ID: u32 = 1 << 10;

/// Declare wire structs: packed, byte-valued, sizes asserted.
macro_rules! wire_struct {
    ($( $(#[$doc:meta])* $name:ident = $size:expr => { $($(#[$fdoc:meta])* $field:ident: $ty:ty,)* } )*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy, PartialEq, Eq)]
            #[repr(C, packed)]
            pub struct $name {
                $($(#[$fdoc])* pub $field: $ty,)*
            }

            // SAFETY: packed, so no padding; every field is an integer, a
            // vm_memory Le type or an array of u8 or Le types, for which
            // any bit pattern is valid.
            unsafe impl ByteValued for $name {}

            const _: () = assert!(size_of::<$name>() == $size);
        )*
    };
}

wire_struct! {
    /// `struct virtio_iommu_req_head`.
    ReqHead = 4 => {
        ty: u8,
        reserved: [u8; 3],
    }

    /// `struct virtio_iommu_req_tail`.
    ReqTail = 4 => {
        status: u8,
        reserved: [u8; 3],
    }

    /// ATTACH's readable part.
    ReqAttach = 20 => {
        head: ReqHead,
        domain: Le32,
        endpoint: Le32,
        flags: Le32,
        reserved: [u8; 4],
    }

    /// DETACH's readable part.
    ReqDetach = 20 => {
        head: ReqHead,
        domain: Le32,
        endpoint: Le32,
        reserved: [u8; 8],
    }

    /// MAP's readable part.
    ReqMap = 36 => {
        head: ReqHead,
        domain: Le32,
        virt_start: Le64,
        virt_end: Le64,
        phys_start: Le64,
        flags: Le32,
    }

    /// UNMAP's readable part.
    ReqUnmap = 28 => {
        head: ReqHead,
        domain: Le32,
        virt_start: Le64,
        virt_end: Le64,
        reserved: [u8; 4],
    }

    /// PROBE's readable part.
    ReqProbe = 72 => {
        head: ReqHead,
        endpoint: Le32,
        reserved: [u8; 64],
    }

    /// ATTACH_TABLE's readable part (protocol.md 6.2). The spec's
    /// `u8 descriptor[111]` at 13 starts with 3 reserved bytes in every
    /// format; they are split off here (`reserved`, checked before the
    /// format), and `table` is the rest, one of the `Table*` structs.
    ReqAttachTable = 124 => {
        head: ReqHead,
        domain: Le32,
        endpoint: Le32,
        format: u8,
        reserved: [u8; 3],
        table: [u8; 108],
    }

    /// ARM_SMMU3's descriptor, from offset 16.
    TableArmSmmu3 = 108 => {
        ste: [Le64; 2],
        zero: [u8; 92],
    }

    /// INTEL_VTD's descriptor, from offset 16.
    TableIntelVtd = 108 => {
        flags: Le32,
        pasid: Le32,
        pgtbl: Le64,
        addr_width: Le32,
        zero: [u8; 88],
    }

    /// HOST_SELFTEST's descriptor, from offset 16.
    TableHostSelftest = 108 => {
        flags: Le32,
        pasid: Le32,
        iotlb: Le32,
        zero: [u8; 96],
    }

    /// INVALIDATE's readable part (protocol.md 6.3).
    ReqInvalidate = 60 => {
        head: ReqHead,
        scope: u8,
        caches: u8,
        flags: Le16,
        domain: Le32,
        pasid: Le32,
        id: Le64,
        address: Le64,
        nr_pages: Le64,
        page_size: u8,
        reserved: [u8; 19],
    }

    /// PAGE_RESP's readable part (protocol.md 6.4).
    ReqPageResp = 28 => {
        head: ReqHead,
        endpoint: Le32,
        flags: Le32,
        pasid: Le32,
        group_id: Le16,
        code: Le16,
        reserved: [u8; 8],
    }

    /// `struct virtio_iommu_probe_property`: every property's header;
    /// `length` counts the bytes after it.
    ProbeProperty = 4 => {
        ty: Le16,
        length: Le16,
    }

    /// RESV_MEM (ratified).
    ProbeResvMem = 24 => {
        head: ProbeProperty,
        subtype: u8,
        reserved: [u8; 3],
        start: Le64,
        end: Le64,
    }

    /// TABLE (protocol.md 6.6), followed by `count` format bytes.
    ProbeTable = 8 => {
        head: ProbeProperty,
        pasid_bits: u8,
        flags: u8,
        count: u8,
        reserved: u8,
    }

    /// TABLE_INTEL_VTD (protocol.md 6.6).
    ProbeTableIntelVtd = 16 => {
        head: ProbeProperty,
        ias: u8,
        oas: u8,
        reserved: [u8; 2],
        pgsize_bitmap: Le64,
    }

    /// HW_INFO (protocol.md 6.6), followed by `data_len` bytes.
    ProbeHwInfo = 24 => {
        head: ProbeProperty,
        info_type: Le32,
        capabilities: Le64,
        max_pasid_log2: u8,
        reserved: [u8; 3],
        data_len: Le32,
    }

    /// `struct virtio_iommu_fault`: the ratified fault record, with the
    /// extension's `pasid` in its reserved word (protocol.md 6.7).
    FaultEvent = 24 => {
        reason: u8,
        reserved: [u8; 3],
        flags: Le32,
        endpoint: Le32,
        pasid: Le32,
        address: Le64,
    }

    /// A page-request record (protocol.md 6.7).
    PageRequestEvent = 48 => {
        reason: u8,
        reserved: [u8; 3],
        flags: Le32,
        endpoint: Le32,
        pasid: Le32,
        address: Le64,
        group_id: Le16,
        reserved2: [u8; 6],
        private_data: [Le64; 2],
    }

    /// `struct virtio_iommu_config` (ratified; protocol.md 4).
    Config = 40 => {
        page_size_mask: Le64,
        input_start: Le64,
        input_end: Le64,
        domain_start: Le32,
        domain_end: Le32,
        probe_size: Le32,
        bypass: u8,
        reserved: [u8; 3],
    }
}

impl ReqHead {
    pub(crate) fn new(ty: RequestType) -> Self {
        ReqHead {
            ty: ty as u8,
            reserved: [0; 3],
        }
    }
}

impl ReqTail {
    /// A tail carrying `status` (a virtio-iommu status code, 0-8).
    pub(crate) fn new(status: u8) -> Self {
        ReqTail {
            status,
            reserved: [0; 3],
        }
    }
}

impl ProbeProperty {
    /// The header of a property of `total` bytes (header included).
    pub(crate) fn new(ty: u16, total: usize) -> Option<Self> {
        let length = u16::try_from(total.checked_sub(size_of::<Self>())?).ok()?;
        Some(ProbeProperty {
            ty: ty.into(),
            length: length.into(),
        })
    }
}

/// The size of a ratified fault record.
pub const FAULT_RECORD_LEN: usize = size_of::<FaultEvent>();
/// The size of a page-request record.
pub(crate) const PAGE_REQUEST_LEN: usize = size_of::<PageRequestEvent>();
/// The size of the largest record.
pub const MAX_RECORD_LEN: usize = PAGE_REQUEST_LEN;
/// The config space's size.
pub(crate) const CONFIG_SIZE: usize = size_of::<Config>();
/// Where the bypass byte is in the config space.
pub(crate) const BYPASS_OFFSET: usize = std::mem::offset_of!(Config, bypass);

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use super::*;

    #[test]
    fn type_numbers_and_names_round_trip() {
        for (i, t) in RequestType::ALL.into_iter().enumerate() {
            assert_eq!(t as usize, i + 1);
            assert_eq!(RequestType::try_from(t as u8), Ok(t));
            assert_eq!(t.key(), t.name().to_ascii_lowercase());
        }
        assert_eq!(RequestType::try_from(0), Err(0));
        assert_eq!(RequestType::try_from(9), Err(9));
        assert_eq!(RequestType::AttachTable.to_string(), "ATTACH_TABLE");
    }

    #[test]
    fn readable_sizes_are_protocol_md_section_7() {
        let want = [20, 20, 36, 28, 72, 124, 60, 28];
        for (t, n) in RequestType::ALL.into_iter().zip(want) {
            assert_eq!(t.readable_len(), n, "{t}");
        }
        assert_eq!(MAX_READABLE, 128);
    }

    #[test]
    fn field_offsets_are_the_specs() {
        // The offsets protocol.md writes beside each field.
        assert_eq!(offset_of!(ReqAttachTable, format), 12);
        assert_eq!(offset_of!(ReqAttachTable, table), 16);
        assert_eq!(16 + offset_of!(TableArmSmmu3, ste), 16);
        assert_eq!(16 + offset_of!(TableArmSmmu3, zero), 32);
        assert_eq!(16 + offset_of!(TableIntelVtd, pgtbl), 24);
        assert_eq!(16 + offset_of!(TableIntelVtd, addr_width), 32);
        assert_eq!(16 + offset_of!(TableIntelVtd, zero), 36);
        assert_eq!(16 + offset_of!(TableHostSelftest, iotlb), 24);
        assert_eq!(16 + offset_of!(TableHostSelftest, zero), 28);
        assert_eq!(offset_of!(ReqInvalidate, flags), 6);
        assert_eq!(offset_of!(ReqInvalidate, id), 16);
        assert_eq!(offset_of!(ReqInvalidate, nr_pages), 32);
        assert_eq!(offset_of!(ReqInvalidate, page_size), 40);
        assert_eq!(offset_of!(ReqPageResp, group_id), 16);
        assert_eq!(offset_of!(ReqPageResp, code), 18);
        assert_eq!(offset_of!(ReqMap, flags), 32);
        assert_eq!(offset_of!(ProbeHwInfo, max_pasid_log2), 16);
        assert_eq!(offset_of!(ProbeHwInfo, data_len), 20);
        assert_eq!(offset_of!(ProbeTableIntelVtd, pgsize_bitmap), 8);
        assert_eq!(offset_of!(FaultEvent, address), 16);
        assert_eq!(offset_of!(PageRequestEvent, group_id), 24);
        assert_eq!(offset_of!(PageRequestEvent, private_data), 32);
        assert_eq!(offset_of!(Config, domain_start), 24);
        assert_eq!(offset_of!(Config, probe_size), 32);
        assert_eq!(BYPASS_OFFSET, 36);
    }

    #[test]
    fn read_takes_any_alignment_and_refuses_short_input() {
        let mut b = [0u8; 40];
        b[1] = RequestType::Map as u8;
        b[1 + 8..1 + 16].copy_from_slice(&0x1234u64.to_le_bytes());
        let m: &ReqMap = read(&b[1..]).unwrap();
        assert_eq!(m.head.ty, 3);
        assert_eq!(m.virt_start.to_native(), 0x1234);
        assert!(read::<ReqMap>(&b[..35]).is_none());
    }
}
