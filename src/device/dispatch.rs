// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One request in, one reply out: the pure core of the requestq.
//!
//! `handle` takes the readable bytes and the size of the writable part,
//! changes the state, and fills the reply. The queue glue only gathers and
//! scatters bytes.

use log::{debug, Level};

use crate::device::config::{features, PROBE_SIZE};
use crate::device::error::{RequestError, Status};
use std::mem::size_of;

use vm_memory::ByteValued;

use crate::device::request::{decode, Decoded, Request};
use crate::device::state::IommuState;
use crate::device::stats::Stats;
use crate::iommufd_bridge::BridgeError;
use crate::log_limit::limited;
use crate::nested::{Invalidate, TableCaps};
use crate::wire::{
    ProbeHwInfo, ProbeProperty, ProbeResvMem, ProbeTable, ProbeTableIntelVtd, ReqTail, RequestType,
    PROBE_TABLE_F_PAGE_REQUESTS, PROBE_T_HW_INFO, PROBE_T_RESV_MEM, PROBE_T_TABLE,
    PROBE_T_TABLE_INTEL_VTD, TAIL_LEN,
};

/// Largest reply: PROBE properties plus the tail.
pub const MAX_REPLY: usize = PROBE_SIZE as usize + TAIL_LEN;

/// What to write back for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Write nothing, used length 0 (unknown type, or no room for a tail).
    None,
    /// Write `len` bytes of the reply buffer at the start of the writable part.
    Write { len: usize },
}

/// Handle one request. `readable` holds up to MAX_READABLE bytes of the
/// readable part; `writable_len` is the size of the writable part.
pub fn handle(
    state: &mut IommuState,
    stats: &mut Stats,
    acked: u64,
    readable: &[u8],
    writable_len: u64,
    out: &mut [u8; MAX_REPLY],
) -> Reply {
    handle_decoded(
        state,
        stats,
        acked,
        &decode(readable, acked),
        writable_len,
        out,
    )
}

/// `handle` for a request already decoded (the requestq decodes each
/// request once, to see whether it is an INVALIDATE to batch first).
/// By reference: the request is not moved (it is large: ATTACH_TABLE).
pub(crate) fn handle_decoded(
    state: &mut IommuState,
    stats: &mut Stats,
    acked: u64,
    decoded: &Decoded,
    writable_len: u64,
    out: &mut [u8; MAX_REPLY],
) -> Reply {
    let failed;
    let (ty, req, result) = match decoded {
        &Decoded::Unknown(ty) => {
            debug!("request type {ty}: unknown, no reply");
            stats.count_unanswered(ty);
            return Reply::None;
        }
        Decoded::Refused(ty, e) => (*ty, None, Err(e)),
        Decoded::Request(req) => match execute(state, acked, req, writable_len, out) {
            Ok(body_len) => (req.ty(), Some(req), Ok(body_len)),
            Err(e) => {
                failed = e;
                (req.ty(), Some(req), Err(&failed))
            }
        },
    };
    let (status, body_len) = match result {
        Ok(body_len) => (Status::Ok, body_len),
        Err(e) => {
            // Only for the log lines: which endpoint and domain.
            let subject = req.map(Subject::of).unwrap_or_default();
            if matches!(
                e,
                RequestError::Host(BridgeError::Kernel { .. } | BridgeError::Host { .. })
            ) {
                // The host refused what the device state allowed: worth
                // an operator's eye, with the kernel's errno (a guest can
                // repeat it: rate-limited; `stats` counts each by status).
                limited!(
                    Level::Info,
                    "request {ty}{subject}: {e} -> {:?}",
                    e.status()
                );
            } else {
                debug!("request {ty}{subject}: {e} -> {:?}", e.status());
            }
            // PROBE's tail follows the whole properties area, even on error.
            let body = if ty == RequestType::Probe {
                // At most PROBE_SIZE (512) after the min().
                #[allow(clippy::cast_possible_truncation)]
                let body = writable_len
                    .saturating_sub(TAIL_LEN as u64)
                    .min(u64::from(PROBE_SIZE)) as usize;
                body
            } else {
                0
            };
            out[..body].fill(0);
            (e.status(), body)
        }
    };
    if writable_len < (body_len + TAIL_LEN) as u64 {
        // No room for the tail: the request cannot be answered.
        debug!(
            "request type {ty}: writable part of {writable_len} bytes has no room for the reply"
        );
        stats.count_unanswered(ty as u8);
        return Reply::None;
    }
    out[body_len..body_len + TAIL_LEN].copy_from_slice(ReqTail::new(status as u8).as_slice());
    stats.count(ty, status);
    Reply::Write {
        len: body_len + TAIL_LEN,
    }
}

/// Is this request an INVALIDATE that can wait for the ones after it, so
/// that consecutive invalidations of one domain reach the host in one call?
/// Only valid ones on host-held tables, with room for the tail.
pub(crate) fn deferrable_invalidate(
    state: &IommuState,
    decoded: &Decoded,
    writable_len: u64,
) -> Option<Invalidate> {
    if writable_len < TAIL_LEN as u64 {
        return None;
    }
    match decoded {
        Decoded::Request(Request::Invalidate(i)) if state.batchable_invalidate(i) => Some(*i),
        _ => None,
    }
}

/// Complete deferred INVALIDATEs of one domain (from
/// `deferrable_invalidate`, in ring order): one host call; if the host
/// refuses it, each again alone, so that every request gets its own status.
/// `statuses` receives one status per request.
pub(crate) fn complete_invalidates(
    state: &mut IommuState,
    stats: &mut Stats,
    reqs: &[Invalidate],
    statuses: &mut Vec<Status>,
) {
    statuses.clear();
    let Some(first) = reqs.first() else {
        return;
    };
    match state.invalidate_batch(first.domain, reqs) {
        Ok(()) => statuses.resize(reqs.len(), Status::Ok),
        Err(e) => {
            debug!(
                "{} INVALIDATEs in one call: {e}; again one by one",
                reqs.len()
            );
            for r in reqs {
                statuses.push(match state.invalidate(r) {
                    Ok(()) => Status::Ok,
                    Err(e) => {
                        limited!(
                            Level::Info,
                            "request INVALIDATE domain {}: {e} -> {:?}",
                            r.domain,
                            e.status()
                        );
                        e.status()
                    }
                });
            }
        }
    }
    for &st in statuses.iter() {
        stats.count(RequestType::Invalidate, st);
    }
}

/// Which endpoint and domain a request names, for its log line.
#[derive(Default)]
struct Subject {
    endpoint: Option<u32>,
    domain: Option<u32>,
}

impl Subject {
    fn of(req: &Request) -> Self {
        let (endpoint, domain) = match req {
            Request::Attach(a) => (Some(a.endpoint), Some(a.domain)),
            Request::Detach(d) => (Some(d.endpoint), Some(d.domain)),
            Request::Map(m) => (None, Some(m.domain)),
            Request::Unmap(u) => (None, Some(u.domain)),
            Request::Probe(p) => (Some(p.endpoint), None),
            Request::AttachTable(a) => (Some(a.endpoint), Some(a.domain)),
            Request::Invalidate(i) => (None, Some(i.domain)),
            Request::PageResp(p) => (Some(p.endpoint), None),
        };
        Subject { endpoint, domain }
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(e) = self.endpoint {
            write!(f, " endpoint {e:#x}")?;
        }
        if let Some(d) = self.domain {
            write!(f, " domain {d}")?;
        }
        Ok(())
    }
}

/// Run a decoded request; Ok carries the length of the body written to
/// `out` before the tail.
fn execute(
    state: &mut IommuState,
    acked: u64,
    req: &Request,
    writable_len: u64,
    out: &mut [u8; MAX_REPLY],
) -> Result<usize, RequestError> {
    match req {
        Request::Attach(a) => state.attach(a, acked).map(|_| 0),
        Request::Detach(d) => state.detach(d).map(|_| 0),
        Request::Map(m) => state.map(m, acked).map(|_| 0),
        Request::Unmap(u) => state.unmap(u).map(|_| 0),
        Request::AttachTable(a) => state.attach_table(a, acked).map(|_| 0),
        Request::Invalidate(i) => state.invalidate(i).map(|_| 0),
        Request::PageResp(p) => state.page_resp(p).map(|_| 0),
        Request::Probe(p) => {
            let area = writable_len.saturating_sub(TAIL_LEN as u64);
            let regions = state.probe(p.endpoint)?;
            if area < u64::from(PROBE_SIZE) {
                return Err(RequestError::ProbeBufferTooSmall {
                    got: area,
                    need: PROBE_SIZE,
                });
            }
            let props = &mut out[..PROBE_SIZE as usize];
            props.fill(0);
            let mut off = 0;
            for r in regions {
                let resv = |head| ProbeResvMem {
                    head,
                    subtype: r.subtype,
                    reserved: [0; 3],
                    start: r.start.into(),
                    end: r.end.into(),
                };
                if !put_prop(props, &mut off, PROBE_T_RESV_MEM, &[], resv) {
                    break;
                }
            }
            if acked & features::ATTACH_TABLE != 0 {
                if let Some(caps) = state.table_caps(p.endpoint) {
                    write_table_props(&caps, &mut props[off..]);
                }
            }
            Ok(PROBE_SIZE as usize)
        }
    }
}

/// Append a property: its fixed part (`fixed` makes it from the header),
/// then `tail`, then zeros to a multiple of 8 bytes (like RESV_MEM's);
/// false, writing nothing, if it does not fit.
fn put_prop<T: ByteValued>(
    out: &mut [u8],
    off: &mut usize,
    ty: u16,
    tail: &[u8],
    fixed: impl FnOnce(ProbeProperty) -> T,
) -> bool {
    let len = size_of::<T>() + tail.len();
    let total = len.next_multiple_of(8);
    let Some(head) = ProbeProperty::new(ty, total) else {
        return false;
    };
    let Some(dst) = out.get_mut(*off..*off + total) else {
        return false;
    };
    dst[..size_of::<T>()].copy_from_slice(fixed(head).as_slice());
    dst[size_of::<T>()..len].copy_from_slice(tail);
    dst[len..].fill(0);
    *off += total;
    true
}

/// The extension properties of one endpoint (layouts in spec-notes/protocol.md 6.6).
fn write_table_props(caps: &TableCaps, out: &mut [u8]) {
    let mut off = 0;
    let flags = if caps.page_requests {
        PROBE_TABLE_F_PAGE_REQUESTS
    } else {
        0
    };
    let Ok(count) = u8::try_from(caps.formats.len()) else {
        return;
    };
    let table = |head| ProbeTable {
        head,
        pasid_bits: caps.pasid_bits,
        flags,
        count,
        reserved: 0,
    };
    if !put_prop(out, &mut off, PROBE_T_TABLE, &caps.formats, table) {
        return;
    }
    if let Some(l) = caps.vtd_limits() {
        let vtd = |head| ProbeTableIntelVtd {
            head,
            ias: l.ias,
            oas: l.oas,
            reserved: [0; 2],
            pgsize_bitmap: l.pgsize_bitmap.into(),
        };
        if !put_prop(out, &mut off, PROBE_T_TABLE_INTEL_VTD, &[], vtd) {
            return;
        }
    }
    if let Some(hw) = &caps.hw_info {
        let Ok(data_len) = u32::try_from(hw.data.len()) else {
            return;
        };
        let info = |head| ProbeHwInfo {
            head,
            info_type: hw.info_type.into(),
            capabilities: hw.capabilities.into(),
            max_pasid_log2: hw.max_pasid_log2,
            reserved: [0; 3],
            data_len: data_len.into(),
        };
        put_prop(out, &mut off, PROBE_T_HW_INFO, &hw.data, info);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::config::{DeviceConfig, Limits};
    use crate::wire::*;

    const T_ATTACH: u8 = RequestType::Attach as u8;
    const T_MAP: u8 = RequestType::Map as u8;
    const T_PROBE: u8 = RequestType::Probe as u8;

    const ACKED: u64 = features::DEVICE_FEATURES;

    fn setup() -> (IommuState, Stats, Box<[u8; MAX_REPLY]>) {
        (
            IommuState::new(DeviceConfig::default(), Limits::default(), &[1]),
            Stats::default(),
            Box::new([0xaa; MAX_REPLY]),
        )
    }

    fn probe_req(ep: u32) -> Vec<u8> {
        let mut b = vec![T_PROBE, 0, 0, 0];
        b.extend_from_slice(&ep.to_le_bytes());
        b.resize(RequestType::Probe.readable_len(), 0);
        b
    }

    #[test]
    fn probe_reply_has_msi_region_zero_fill_and_tail_after_probe_size() {
        let (mut s, mut st, mut out) = setup();
        let r = handle(&mut s, &mut st, ACKED, &probe_req(1), 516, &mut out);
        assert_eq!(r, Reply::Write { len: 516 });
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), PROBE_T_RESV_MEM);
        assert_eq!(u16::from_le_bytes([out[2], out[3]]), 20);
        assert_eq!(out[4], 1, "MSI subtype");
        assert_eq!(
            u64::from_le_bytes(out[8..16].try_into().unwrap()),
            0xfee0_0000
        );
        assert_eq!(
            u64::from_le_bytes(out[16..24].try_into().unwrap()),
            0xfeef_ffff
        );
        assert!(
            out[24..512].iter().all(|&b| b == 0),
            "zero-filled to probe_size"
        );
        assert_eq!(&out[512..516], &[0, 0, 0, 0]);
        assert_eq!(st.get(RequestType::Probe, Status::Ok), 1);
    }

    #[test]
    fn probe_has_table_property_only_with_attach_table() {
        let (mut s, mut st, mut out) = setup();
        handle(&mut s, &mut st, ACKED, &probe_req(1), 516, &mut out);
        assert!(out[24..512].iter().all(|&b| b == 0));
        let acked = ACKED | features::ATTACH_TABLE;
        handle(&mut s, &mut st, acked, &probe_req(1), 516, &mut out);
        let p = &out[24..];
        assert_eq!(u16::from_le_bytes([p[0], p[1]]), PROBE_T_TABLE);
        assert_eq!(u16::from_le_bytes([p[2], p[3]]), 12, "16 bytes in all");
        // 20 PASID bits, page requests, one format: INTEL_VTD.
        assert_eq!(&p[4..9], &[20, 1, 1, 0, 2]);
        // Then TABLE_INTEL_VTD (the next test), and no HW_INFO: virtual.
        assert_eq!(
            u16::from_le_bytes([out[40], out[41]]),
            PROBE_T_TABLE_INTEL_VTD
        );
        assert!(out[56..512].iter().all(|&b| b == 0), "no HW_INFO: virtual");
    }

    #[test]
    fn probe_has_intel_vtd_limits_after_table_property() {
        let (mut s, mut st, mut out) = setup();
        let acked = ACKED | features::ATTACH_TABLE;
        handle(&mut s, &mut st, acked, &probe_req(1), 516, &mut out);
        // RESV_MEM (24 bytes), TABLE (16), then TABLE_INTEL_VTD (16).
        let p = &out[40..];
        assert_eq!(u16::from_le_bytes([p[0], p[1]]), PROBE_T_TABLE_INTEL_VTD);
        assert_eq!(u16::from_le_bytes([p[2], p[3]]), 12, "16 bytes in all");
        // The walker: 4- and 5-level tables, 52-bit frames, 4 KiB, 2 MiB, 1 GiB leaves.
        assert_eq!(&p[4..8], &[57, 52, 0, 0]);
        assert_eq!(
            u64::from_le_bytes(p[8..16].try_into().unwrap()),
            (1 << 12) | (1 << 21) | (1 << 30)
        );
        assert!(out[56..512].iter().all(|&b| b == 0));
    }

    #[test]
    fn intel_vtd_limits_of_a_vtd_host_follow_its_cap_reg() {
        // cap_reg: MGAW 48 (bits 21:16 = 47), no FL1GP (56), no FL5LP (60).
        let vtd = |cap: u64| TableCaps {
            formats: vec![crate::wire::FORMAT_INTEL_VTD],
            pasid_bits: 0,
            page_requests: false,
            hw_info: Some(crate::nested::HwInfo {
                info_type: crate::iommufd_bridge::sys::HW_INFO_INTEL_VTD,
                capabilities: 0,
                max_pasid_log2: 0,
                // struct iommu_hw_info_vtd: flags, reserved, cap_reg, ecap_reg
                data: [[0u8; 8], cap.to_le_bytes(), [0u8; 8]].concat(),
            }),
        };
        let mut out = [0u8; 128];
        write_table_props(&vtd(47 << 16), &mut out);
        let p = &out[16..];
        assert_eq!(u16::from_le_bytes([p[0], p[1]]), PROBE_T_TABLE_INTEL_VTD);
        assert_eq!(&p[4..8], &[48, 48, 0, 0]);
        assert_eq!(u64::from_le_bytes(p[8..16].try_into().unwrap()), 0x20_1000);
        assert_eq!(u16::from_le_bytes([out[32], out[33]]), PROBE_T_HW_INFO);
        let mut out = [0u8; 128];
        write_table_props(&vtd((56 << 16) | (1 << 56) | (1 << 60)), &mut out);
        assert_eq!(&out[20..24], &[57, 52, 0, 0]);
        assert_eq!(
            u64::from_le_bytes(out[24..32].try_into().unwrap()),
            0x4020_1000
        );
        // A format list without INTEL_VTD: no such property.
        let mut out = [0u8; 128];
        let mut caps = vtd(47 << 16);
        caps.formats = vec![0xf0];
        write_table_props(&caps, &mut out);
        assert_eq!(u16::from_le_bytes([out[16], out[17]]), PROBE_T_HW_INFO);
    }

    #[test]
    fn hw_info_property_layout() {
        let caps = TableCaps {
            formats: vec![0xf0],
            pasid_bits: 0,
            page_requests: true,
            hw_info: Some(crate::nested::HwInfo {
                info_type: 0xfeed_beef,
                capabilities: 5,
                max_pasid_log2: 20,
                data: vec![1, 2, 3, 4, 0xef, 0xbe, 0xad, 0xde],
            }),
        };
        let mut out = [0u8; 64];
        write_table_props(&caps, &mut out);
        assert_eq!(&out[..9], &[0, 1, 12, 0, 0, 1, 1, 0, 0xf0]);
        let h = &out[16..];
        assert_eq!(u16::from_le_bytes([h[0], h[1]]), PROBE_T_HW_INFO);
        assert_eq!(u16::from_le_bytes([h[2], h[3]]), 28);
        assert_eq!(u32::from_le_bytes(h[4..8].try_into().unwrap()), 0xfeed_beef);
        assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), 5);
        assert_eq!(h[16], 20);
        assert_eq!(u32::from_le_bytes(h[20..24].try_into().unwrap()), 8);
        assert_eq!(&h[24..32], &[1, 2, 3, 4, 0xef, 0xbe, 0xad, 0xde]);
        // No room: nothing half-written.
        let mut small = [0u8; 40];
        write_table_props(&caps, &mut small);
        assert_eq!(&small[..9], &[0, 1, 12, 0, 0, 1, 1, 0, 0xf0]);
        assert!(small[9..].iter().all(|&b| b == 0));
    }

    #[test]
    fn probe_short_buffer_is_inval_without_properties() {
        let (mut s, mut st, mut out) = setup();
        let r = handle(&mut s, &mut st, ACKED, &probe_req(1), 100, &mut out);
        assert_eq!(r, Reply::Write { len: 100 });
        assert!(out[..96].iter().all(|&b| b == 0));
        assert_eq!(out[96], Status::Inval as u8);
    }

    #[test]
    fn probe_unknown_endpoint_is_noent() {
        let (mut s, mut st, mut out) = setup();
        let r = handle(&mut s, &mut st, ACKED, &probe_req(9), 516, &mut out);
        assert_eq!(r, Reply::Write { len: 516 });
        assert_eq!(out[512], Status::NoEnt as u8);
    }

    #[test]
    fn unknown_type_gets_no_reply_and_is_counted() {
        let (mut s, mut st, mut out) = setup();
        assert_eq!(
            handle(&mut s, &mut st, ACKED, &[9; 20], 4, &mut out),
            Reply::None
        );
        assert_eq!(st.unanswered(9), 1);
    }

    #[test]
    fn no_room_for_tail_is_no_reply() {
        let (mut s, mut st, mut out) = setup();
        let mut a = vec![T_ATTACH, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0];
        a.resize(RequestType::Attach.readable_len(), 0);
        assert_eq!(handle(&mut s, &mut st, ACKED, &a, 3, &mut out), Reply::None);
        assert_eq!(
            handle(&mut s, &mut st, ACKED, &a, 4, &mut out),
            Reply::Write { len: 4 }
        );
        assert_eq!(&out[..4], &[0, 0, 0, 0]);
    }

    #[test]
    fn truncated_request_is_inval_with_zeroed_tail_reserved() {
        let (mut s, mut st, mut out) = setup();
        let r = handle(&mut s, &mut st, ACKED, &[T_MAP, 0, 0, 0, 1], 8, &mut out);
        assert_eq!(r, Reply::Write { len: 4 });
        assert_eq!(&out[..4], &[Status::Inval as u8, 0, 0, 0]);
    }
}
