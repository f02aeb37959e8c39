// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! virtio-iommu wire formats: request builders, reply/property/config/event
//! parsers (all little-endian; layouts from spec-notes/protocol.md and virtio 5.13).

use std::time::{Duration, Instant};

use super::virtq::{SplitQueue, Token};
use super::{invalid, Error, Result};

// ---- Feature bits -------------------------------------------------------

pub const VIRTIO_IOMMU_F_INPUT_RANGE: u32 = 0;
pub const VIRTIO_IOMMU_F_DOMAIN_RANGE: u32 = 1;
pub const VIRTIO_IOMMU_F_MAP_UNMAP: u32 = 2;
pub const VIRTIO_IOMMU_F_BYPASS: u32 = 3;
pub const VIRTIO_IOMMU_F_PROBE: u32 = 4;
pub const VIRTIO_IOMMU_F_MMIO: u32 = 5;
pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u32 = 6;
/// Extension (default bit; configurable on the command line).
pub const VIRTIO_IOMMU_F_ATTACH_TABLE: u32 = 7;
/// Extension (default bit; configurable on the command line).
pub const VIRTIO_IOMMU_F_PAGE_REQUEST: u32 = 10;
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// `1 << bit` as a feature mask.
pub const fn bit(b: u32) -> u64 {
    1u64 << b
}

// ---- Request types and flags --------------------------------------------

pub const T_ATTACH: u8 = 1;
pub const T_DETACH: u8 = 2;
pub const T_MAP: u8 = 3;
pub const T_UNMAP: u8 = 4;
pub const T_PROBE: u8 = 5;
pub const T_ATTACH_TABLE: u8 = 6;
pub const T_INVALIDATE: u8 = 7;
pub const T_PAGE_RESP: u8 = 8;

pub const ATTACH_F_BYPASS: u32 = 1;
pub const MAP_F_READ: u32 = 1;
pub const MAP_F_WRITE: u32 = 2;
pub const MAP_F_MMIO: u32 = 4;

/// Size of the tail (status u8, reserved[3]).
pub const TAIL_SIZE: u32 = 4;

// ---- Status codes --------------------------------------------------------

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
pub const S_DEVERR: u8 = 3;
pub const S_INVAL: u8 = 4;
pub const S_RANGE: u8 = 5;
pub const S_NOENT: u8 = 6;
pub const S_FAULT: u8 = 7;
pub const S_NOMEM: u8 = 8;

/// Name of a status code, for assertion messages.
pub fn status_name(s: u8) -> &'static str {
    match s {
        S_OK => "OK",
        S_IOERR => "IOERR",
        S_UNSUPP => "UNSUPP",
        S_DEVERR => "DEVERR",
        S_INVAL => "INVAL",
        S_RANGE => "RANGE",
        S_NOENT => "NOENT",
        S_FAULT => "FAULT",
        S_NOMEM => "NOMEM",
        _ => "<unknown status>",
    }
}

// ---- Builders ------------------------------------------------------------
//
// Each returns (readable bytes, writable length). Arrays avoid allocation.

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
fn get16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}
fn get32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn get64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// ATTACH (20 readable bytes); `reserved` is written at offset 16.
pub fn attach(domain: u32, endpoint: u32, flags: u32, reserved: u32) -> ([u8; 20], u32) {
    let mut b = [0u8; 20];
    b[0] = T_ATTACH;
    put32(&mut b, 4, domain);
    put32(&mut b, 8, endpoint);
    put32(&mut b, 12, flags);
    put32(&mut b, 16, reserved);
    (b, TAIL_SIZE)
}

/// DETACH (20 readable bytes), reserved bytes zero.
pub fn detach(domain: u32, endpoint: u32) -> ([u8; 20], u32) {
    detach_raw(domain, endpoint, [0; 8])
}

/// DETACH with explicit reserved bytes (offset 12..20).
pub fn detach_raw(domain: u32, endpoint: u32, reserved: [u8; 8]) -> ([u8; 20], u32) {
    let mut b = [0u8; 20];
    b[0] = T_DETACH;
    put32(&mut b, 4, domain);
    put32(&mut b, 8, endpoint);
    b[12..20].copy_from_slice(&reserved);
    (b, TAIL_SIZE)
}

/// MAP (36 readable bytes); `virt_end` is inclusive.
pub fn map(
    domain: u32,
    virt_start: u64,
    virt_end: u64,
    phys_start: u64,
    flags: u32,
) -> ([u8; 36], u32) {
    let mut b = [0u8; 36];
    b[0] = T_MAP;
    put32(&mut b, 4, domain);
    put64(&mut b, 8, virt_start);
    put64(&mut b, 16, virt_end);
    put64(&mut b, 24, phys_start);
    put32(&mut b, 32, flags);
    (b, TAIL_SIZE)
}

/// UNMAP (28 readable bytes); `virt_end` is inclusive.
pub fn unmap(domain: u32, virt_start: u64, virt_end: u64) -> ([u8; 28], u32) {
    unmap_raw(domain, virt_start, virt_end, 0)
}

/// UNMAP with explicit reserved word (offset 24).
pub fn unmap_raw(domain: u32, virt_start: u64, virt_end: u64, reserved: u32) -> ([u8; 28], u32) {
    let mut b = [0u8; 28];
    b[0] = T_UNMAP;
    put32(&mut b, 4, domain);
    put64(&mut b, 8, virt_start);
    put64(&mut b, 16, virt_end);
    put32(&mut b, 24, reserved);
    (b, TAIL_SIZE)
}

/// PROBE (72 readable bytes); writable = `probe_size` + 4.
pub fn probe(endpoint: u32, probe_size: u32) -> ([u8; 72], u32) {
    let mut b = [0u8; 72];
    b[0] = T_PROBE;
    put32(&mut b, 4, endpoint);
    (b, probe_size + TAIL_SIZE)
}

/// ATTACH_TABLE formats.
pub const TABLE_FMT_ARM_SMMU3: u8 = 1;
pub const TABLE_FMT_INTEL_VTD: u8 = 2;
pub const TABLE_FMT_HOST_SELFTEST: u8 = 0xF0;
/// ATTACH_TABLE flags (INTEL_VTD / HOST_SELFTEST).
pub const TABLE_F_SRE: u32 = 1 << 0;
pub const TABLE_F_WPE: u32 = 1 << 1;
pub const TABLE_F_EAFE: u32 = 1 << 2;
pub const TABLE_F_PASID_VALID: u32 = 1 << 8;
pub const TABLE_F_PAGE_REQUESTS: u32 = 1 << 9;

/// ATTACH_TABLE (124 readable bytes) with a raw descriptor: `desc` is
/// copied to offset 13 (at most 111 bytes; the rest stays zero).
pub fn attach_table(domain: u32, endpoint: u32, format: u8, desc: &[u8]) -> ([u8; 124], u32) {
    assert!(
        desc.len() <= 111,
        "ATTACH_TABLE descriptor is {} bytes, at most 111 fit",
        desc.len()
    );
    let mut b = [0u8; 124];
    b[0] = T_ATTACH_TABLE;
    put32(&mut b, 4, domain);
    put32(&mut b, 8, endpoint);
    b[12] = format;
    b[13..13 + desc.len()].copy_from_slice(desc);
    (b, TAIL_SIZE)
}

/// ATTACH_TABLE, format ARM_SMMU3: ste0 @16, ste1 @24.
pub fn attach_table_smmu3(domain: u32, endpoint: u32, ste0: u64, ste1: u64) -> ([u8; 124], u32) {
    let (mut b, w) = attach_table(domain, endpoint, TABLE_FMT_ARM_SMMU3, &[]);
    put64(&mut b, 16, ste0);
    put64(&mut b, 24, ste1);
    (b, w)
}

/// ATTACH_TABLE, format INTEL_VTD: flags @16, pasid @20, pgtbl @24, addr_width @32.
pub fn attach_table_vtd(
    domain: u32,
    endpoint: u32,
    flags: u32,
    pasid: u32,
    pgtbl: u64,
    addr_width: u32,
) -> ([u8; 124], u32) {
    let (mut b, w) = attach_table(domain, endpoint, TABLE_FMT_INTEL_VTD, &[]);
    put32(&mut b, 16, flags);
    put32(&mut b, 20, pasid);
    put64(&mut b, 24, pgtbl);
    put32(&mut b, 32, addr_width);
    (b, w)
}

/// ATTACH_TABLE, format HOST_SELFTEST: flags @16, pasid @20, iotlb @24.
pub fn attach_table_selftest(
    domain: u32,
    endpoint: u32,
    flags: u32,
    pasid: u32,
    iotlb: u32,
) -> ([u8; 124], u32) {
    let (mut b, w) = attach_table(domain, endpoint, TABLE_FMT_HOST_SELFTEST, &[]);
    put32(&mut b, 16, flags);
    put32(&mut b, 20, pasid);
    put32(&mut b, 24, iotlb);
    (b, w)
}

pub const INV_SCOPE_DOMAIN: u8 = 1;
pub const INV_SCOPE_PASID: u8 = 2;
pub const INV_SCOPE_ADDRESS: u8 = 3;
pub const INV_CACHE_CONFIG: u8 = 1 << 0;
pub const INV_CACHE_TLB: u8 = 1 << 1;
pub const INV_F_LEAF: u16 = 1 << 0;
pub const INV_F_PASID_VALID: u16 = 1 << 1;
pub const INV_F_ID_VALID: u16 = 1 << 2;
pub const INV_F_GLOBAL: u16 = 1 << 3;

/// Fields of an INVALIDATE request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Invalidate {
    pub scope: u8,
    pub caches: u8,
    pub flags: u16,
    pub domain: u32,
    pub pasid: u32,
    pub id: u64,
    pub address: u64,
    pub nr_pages: u64,
    pub page_size: u8,
    pub reserved: [u8; 19],
}

/// INVALIDATE (60 readable bytes).
pub fn invalidate(inv: &Invalidate) -> ([u8; 60], u32) {
    let mut b = [0u8; 60];
    b[0] = T_INVALIDATE;
    b[4] = inv.scope;
    b[5] = inv.caches;
    put16(&mut b, 6, inv.flags);
    put32(&mut b, 8, inv.domain);
    put32(&mut b, 12, inv.pasid);
    put64(&mut b, 16, inv.id);
    put64(&mut b, 24, inv.address);
    put64(&mut b, 32, inv.nr_pages);
    b[40] = inv.page_size;
    b[41..60].copy_from_slice(&inv.reserved);
    (b, TAIL_SIZE)
}

pub const PAGE_RESP_F_PASID_VALID: u32 = 1;
pub const PAGE_RESP_SUCCESS: u16 = 0;
pub const PAGE_RESP_INVALID: u16 = 1;
pub const PAGE_RESP_FAILURE: u16 = 2;

/// PAGE_RESP (28 readable bytes).
pub fn page_resp(
    endpoint: u32,
    flags: u32,
    pasid: u32,
    group_id: u16,
    code: u16,
) -> ([u8; 28], u32) {
    page_resp_raw(endpoint, flags, pasid, group_id, code, [0; 8])
}

/// PAGE_RESP with explicit reserved bytes (offset 20..28).
pub fn page_resp_raw(
    endpoint: u32,
    flags: u32,
    pasid: u32,
    group_id: u16,
    code: u16,
    reserved: [u8; 8],
) -> ([u8; 28], u32) {
    let mut b = [0u8; 28];
    b[0] = T_PAGE_RESP;
    put32(&mut b, 4, endpoint);
    put32(&mut b, 8, flags);
    put32(&mut b, 12, pasid);
    put16(&mut b, 16, group_id);
    put16(&mut b, 18, code);
    b[20..28].copy_from_slice(&reserved);
    (b, TAIL_SIZE)
}

/// A request of any type with just a head (e.g. an unknown type), padded
/// with zeros to `readable_len`.
pub fn raw_request(ty: u8, readable_len: usize, writable_len: u32) -> (Vec<u8>, u32) {
    let mut b = vec![0u8; readable_len.max(1)];
    b[0] = ty;
    b.truncate(readable_len);
    (b, writable_len)
}

// ---- Replies ---------------------------------------------------------------

/// A request tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tail {
    pub status: u8,
    pub reserved: [u8; 3],
}

/// The tail at `offset` of the writable part (0 for all but PROBE, whose
/// tail is at `probe_size`). `None` if `written` is too short.
pub fn parse_tail(written: &[u8], offset: usize) -> Option<Tail> {
    let t = written.get(offset..offset + 4)?;
    Some(Tail {
        status: t[0],
        reserved: [t[1], t[2], t[3]],
    })
}

/// Status byte of a non-PROBE reply. Panics with a clear message when the
/// device reported used length 0 (nothing written).
pub fn expect_status(reply: &(u32, Vec<u8>)) -> u8 {
    assert!(
        reply.0 > 0,
        "device returned used length 0 (request not parsed)"
    );
    reply.1[0]
}

/// A PROBE property.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeProp {
    /// The full 16-bit type word (bits 0-11 type, 12-15 reserved).
    pub type_word: u16,
    /// The value (without the 4-byte header).
    pub value: Vec<u8>,
}

impl ProbeProp {
    /// Bits 0-11 of the type word.
    pub fn ty(&self) -> u16 {
        self.type_word & 0x0fff
    }
}

pub const PROBE_T_NONE: u16 = 0;
pub const PROBE_T_RESV_MEM: u16 = 1;
pub const RESV_MEM_T_RESERVED: u8 = 0;
pub const RESV_MEM_T_MSI: u8 = 1;

/// Parse the properties area of a PROBE reply (the first `probe_size`
/// bytes of the writable part) until a type-0 entry or the end. A property
/// whose header or value runs past the end is an error.
pub fn parse_probe_props(props: &[u8]) -> Result<Vec<ProbeProp>> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < props.len() {
        if off + 4 > props.len() {
            // Fewer than 4 bytes left: only zero padding is acceptable.
            if props[off..].iter().all(|&b| b == 0) {
                break;
            }
            return invalid(format!("PROBE: truncated property header at offset {off}"));
        }
        let type_word = get16(props, off);
        let len = get16(props, off + 2) as usize;
        if type_word & 0x0fff == PROBE_T_NONE {
            break;
        }
        let end = off + 4 + len;
        if end > props.len() {
            return invalid(format!(
                "PROBE: property type {type_word:#x} at offset {off} with length {len} runs \
                 past the {}-byte area",
                props.len()
            ));
        }
        out.push(ProbeProp {
            type_word,
            value: props[off + 4..end].to_vec(),
        });
        off = end;
    }
    Ok(out)
}

/// A RESV_MEM property value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResvMem {
    pub subtype: u8,
    pub reserved: [u8; 3],
    pub start: u64,
    /// Inclusive.
    pub end: u64,
}

impl ResvMem {
    /// Decode a RESV_MEM value (20 bytes, without the header).
    pub fn parse(value: &[u8]) -> Result<ResvMem> {
        if value.len() < 20 {
            return invalid(format!("RESV_MEM value is {} bytes, need 20", value.len()));
        }
        Ok(ResvMem {
            subtype: value[0],
            reserved: [value[1], value[2], value[3]],
            start: get64(value, 4),
            end: get64(value, 12),
        })
    }
}

/// A parsed PROBE reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeReply {
    pub used_len: u32,
    pub status: u8,
    pub tail: Tail,
    /// The raw properties area (probe_size bytes).
    pub raw: Vec<u8>,
    pub props: Vec<ProbeProp>,
}

impl ProbeReply {
    /// Split a PROBE reply's writable bytes (probe_size + 4) into properties
    /// and tail.
    pub fn parse(used_len: u32, written: &[u8], probe_size: u32) -> Result<ProbeReply> {
        let ps = probe_size as usize;
        let tail = match parse_tail(written, ps) {
            Some(t) => t,
            None => {
                return invalid(format!(
                    "PROBE reply has {} writable bytes, need {}",
                    written.len(),
                    ps + 4
                ))
            }
        };
        let raw = written[..ps].to_vec();
        let props = if used_len > 0 && tail.status == S_OK {
            parse_probe_props(&raw)?
        } else {
            Vec::new()
        };
        Ok(ProbeReply {
            used_len,
            status: tail.status,
            tail,
            raw,
            props,
        })
    }

    /// All RESV_MEM properties, decoded.
    pub fn resv_mem(&self) -> Result<Vec<ResvMem>> {
        self.props
            .iter()
            .filter(|p| p.ty() == PROBE_T_RESV_MEM)
            .map(|p| ResvMem::parse(&p.value))
            .collect()
    }
}

// ---- Config space ----------------------------------------------------------

/// Size of the virtio-iommu config space.
pub const CONFIG_SIZE: u32 = 40;
/// Offset of `probe_size`.
pub const CONFIG_PROBE_SIZE_OFF: u32 = 32;
/// Offset of `bypass`.
pub const CONFIG_BYPASS_OFF: u32 = 36;

/// The 40-byte virtio-iommu config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuConfig {
    pub page_size_mask: u64,
    pub input_start: u64,
    /// Inclusive.
    pub input_end: u64,
    pub domain_start: u32,
    /// Inclusive.
    pub domain_end: u32,
    pub probe_size: u32,
    pub bypass: u8,
    pub reserved: [u8; 3],
}

impl IommuConfig {
    /// Decode (needs at least 40 bytes).
    pub fn parse(b: &[u8]) -> Result<IommuConfig> {
        if b.len() < CONFIG_SIZE as usize {
            return invalid(format!("config space is {} bytes, need 40", b.len()));
        }
        Ok(IommuConfig {
            page_size_mask: get64(b, 0),
            input_start: get64(b, 8),
            input_end: get64(b, 16),
            domain_start: get32(b, 24),
            domain_end: get32(b, 28),
            probe_size: get32(b, 32),
            bypass: b[36],
            reserved: [b[37], b[38], b[39]],
        })
    }

    /// The mapping granule (lowest set bit of page_size_mask).
    pub fn granule(&self) -> u64 {
        1u64 << self.page_size_mask.trailing_zeros()
    }
}

// ---- Events ------------------------------------------------------------------

pub const EVT_REASON_UNKNOWN: u8 = 0;
pub const EVT_REASON_DOMAIN: u8 = 1;
pub const EVT_REASON_MAPPING: u8 = 2;
pub const EVT_F_READ: u32 = 1 << 0;
pub const EVT_F_WRITE: u32 = 1 << 1;
pub const EVT_F_EXEC: u32 = 1 << 2;
pub const EVT_F_PRIV: u32 = 1 << 3;
pub const EVT_F_LAST: u32 = 1 << 4;
pub const EVT_F_PAGE_REQ: u32 = 1 << 5;
pub const EVT_F_ADDRESS: u32 = 1 << 8;
pub const EVT_F_PASID: u32 = 1 << 9;
pub const EVT_F_GROUP_ID: u32 = 1 << 10;
pub const EVT_F_PRIV_DATA: u32 = 1 << 11;
/// Size of a ratified fault record.
pub const FAULT_RECORD_SIZE: u32 = 24;
/// Size of an extended (page-request) record.
pub const EXT_RECORD_SIZE: u32 = 48;

/// An eventq record (24-byte fault or 48-byte extended record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub reason: u8,
    pub reserved: [u8; 3],
    pub flags: u32,
    pub endpoint: u32,
    pub pasid: u32,
    pub address: u64,
    /// 0 for a 24-byte record.
    pub group_id: u16,
    pub reserved2: [u8; 6],
    /// Zero for a 24-byte record.
    pub private_data: [u64; 2],
}

impl EventRecord {
    /// Decode the first 24 (or 48, when available) bytes.
    pub fn parse(b: &[u8]) -> Result<EventRecord> {
        if b.len() < FAULT_RECORD_SIZE as usize {
            return invalid(format!("event record is {} bytes, need 24", b.len()));
        }
        let ext = b.len() >= EXT_RECORD_SIZE as usize;
        Ok(EventRecord {
            reason: b[0],
            reserved: [b[1], b[2], b[3]],
            flags: get32(b, 4),
            endpoint: get32(b, 8),
            pasid: get32(b, 12),
            address: get64(b, 16),
            group_id: if ext { get16(b, 24) } else { 0 },
            reserved2: if ext {
                b[26..32].try_into().expect("6 bytes")
            } else {
                [0; 6]
            },
            private_data: if ext {
                [get64(b, 32), get64(b, 40)]
            } else {
                [0; 2]
            },
        })
    }

    /// Whether this is a page request.
    pub fn is_page_request(&self) -> bool {
        self.flags & EVT_F_PAGE_REQ != 0
    }
}

// ---- Event queue helpers -------------------------------------------------------

/// Post `count` device-writable buffers of `size` bytes (24 or 48) on the
/// event queue, then kick. Returns the tokens in posting order.
pub fn post_event_buffers(q: &mut SplitQueue, count: usize, size: u32) -> Result<Vec<Token>> {
    let mut toks = Vec::with_capacity(count);
    for _ in 0..count {
        toks.push(q.add(&[], &[size])?);
    }
    q.kick()?;
    Ok(toks)
}

/// One used event buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventBuf {
    pub token: Token,
    pub used_len: u32,
    /// The whole buffer (poison bytes beyond what the device wrote).
    pub bytes: Vec<u8>,
}

impl EventBuf {
    /// Decode the record (only the first `used_len` bytes).
    pub fn record(&self) -> Result<EventRecord> {
        EventRecord::parse(&self.bytes[..(self.used_len as usize).min(self.bytes.len())])
    }
}

/// Collect used event buffers, in used-ring order, until `max` arrived or
/// `timeout` passed (no error on timeout: the caller checks the count).
pub fn collect_events_upto(
    q: &mut SplitQueue,
    max: usize,
    timeout: Duration,
) -> Result<Vec<EventBuf>> {
    let deadline = Instant::now() + timeout;
    let mut done = Vec::new();
    let mut out = Vec::new();
    while out.len() < max {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        done.clear();
        match q.wait_used_into(&mut done, max - out.len(), deadline - now) {
            Ok(()) | Err(Error::Timeout(_)) => {}
            Err(e) => return Err(e),
        }
        for &(token, used_len) in &done {
            out.push(EventBuf {
                token,
                used_len,
                bytes: q.read_written(token)?,
            });
        }
    }
    Ok(out)
}

/// Collect exactly `n` used event buffers as `(used_len, bytes)` in used
/// order; an error if fewer arrive within `timeout`.
pub fn collect_events(
    q: &mut SplitQueue,
    n: usize,
    timeout: Duration,
) -> Result<Vec<(u32, Vec<u8>)>> {
    let v = collect_events_upto(q, n, timeout)?;
    if v.len() < n {
        return Err(Error::Timeout(format!(
            "expected {n} event records, got {} within {timeout:?}",
            v.len()
        )));
    }
    Ok(v.into_iter().map(|e| (e.used_len, e.bytes)).collect())
}
