// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vEVENTQ records (IOMMU_VEVENTQ_ALLOC, 6.15+): unrecoverable faults a
//! vIOMMU reports, each `struct iommufd_vevent_header` {flags, sequence}
//! followed by the type's data. `decode` turns one event's data into a
//! fault record (a pure function); `VEventCounters::parse` walks a read
//! and counts lost events from the sequence gaps and LOST_EVENTS headers
//! (spec-notes/page-requests.md, "Unrecoverable faults of host endpoints").

use std::mem::{offset_of, size_of};

use iommufd_bindings::iommufd::{
    iommu_vevent_arm_smmuv3, iommu_veventq_flag_IOMMU_VEVENTQ_FLAG_LOST_EVENTS,
    iommufd_vevent_header,
};

use super::EventRecord;
use crate::wire::{
    FLAG_ADDRESS, FLAG_EXEC, FLAG_PRIV, FLAG_READ, FLAG_WRITE, REASON_DOMAIN, REASON_MAPPING,
    REASON_UNKNOWN,
};

const HEADER_LEN: usize = size_of::<iommufd_vevent_header>();
const FLAG_LOST_EVENTS: u32 = iommu_veventq_flag_IOMMU_VEVENTQ_FLAG_LOST_EVENTS;
/// Sequence indexes run over [0, INT_MAX], then wrap to 0.
const SEQ_MOD: u64 = 1 << 31;

/// GAP: struct iommu_viommu_event_selftest (the kernel's selftest ABI,
/// iommufd_test.h, not a uapi header: the bindings lack it).
#[repr(C)]
struct ViommuEventSelftest {
    virt_id: u32,
}

/// The SMMUv3 event record (drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3.h,
/// EVT_ID_* and EVTQ_*; not uapi, so not in the bindings). The kernel
/// forwards non-stall stage-1 events of C_BAD_STE, F_STREAM_DISABLED,
/// C_BAD_SUBSTREAMID, C_BAD_CD and the four translation faults
/// (arm_smmu_handle_event), with the StreamID replaced by the vSID.
mod smmu {
    pub(super) const EVTQ_0_ID: u64 = 0xff;
    pub(super) const EVTQ_0_SSV: u64 = 1 << 11;
    pub(super) const EVTQ_0_SSID_SHIFT: u32 = 12;
    pub(super) const EVTQ_0_SSID_MASK: u64 = 0xf_ffff;
    pub(super) const EVTQ_0_SID_SHIFT: u32 = 32;
    pub(super) const EVTQ_1_PNU: u64 = 1 << 33;
    pub(super) const EVTQ_1_IND: u64 = 1 << 34;
    pub(super) const EVTQ_1_RNW: u64 = 1 << 35;

    pub(super) const EVT_ID_BAD_STE_CONFIG: u8 = 0x04;
    pub(super) const EVT_ID_STREAM_DISABLED_FAULT: u8 = 0x06;
    pub(super) const EVT_ID_BAD_SUBSTREAMID_CONFIG: u8 = 0x08;
    pub(super) const EVT_ID_BAD_CD_CONFIG: u8 = 0x0a;
    pub(super) const EVT_ID_TRANSLATION_FAULT: u8 = 0x10;
    pub(super) const EVT_ID_ADDR_SIZE_FAULT: u8 = 0x11;
    pub(super) const EVT_ID_ACCESS_FAULT: u8 = 0x12;
    pub(super) const EVT_ID_PERMISSION_FAULT: u8 = 0x13;
}

/// The type of a vEVENTQ's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VeventKind {
    /// The selftest mock's (IOMMU_VEVENTQ_TYPE_SELFTEST): {virt_id}.
    Selftest,
    /// IOMMU_VEVENTQ_TYPE_ARM_SMMUV3: a 32-byte SMMUv3 event record.
    ArmSmmuv3,
}

impl VeventKind {
    /// The size of each event's data (after its header).
    pub const fn data_len(self) -> usize {
        match self {
            VeventKind::Selftest => size_of::<ViommuEventSelftest>(),
            VeventKind::ArmSmmuv3 => size_of::<iommu_vevent_arm_smmuv3>(),
        }
    }
}

/// Why an event's data became no record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VeventError {
    #[error("a {kind:?} vEVENT of {len} bytes (its type has {want})")]
    Short {
        kind: VeventKind,
        len: usize,
        want: usize,
    },
}

/// One vEVENT, decoded: an unrecoverable fault of `endpoint` (the
/// vDEVICE's virt_id, which is the endpoint ID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VeventFault {
    pub endpoint: u32,
    pub reason: u8,
    /// FLAG_READ, FLAG_WRITE, FLAG_EXEC, FLAG_PRIV of the access.
    pub access: u32,
    /// The input address (IOVA), when the event has one.
    pub address: Option<u64>,
    pub pasid: Option<u32>,
}

impl VeventFault {
    /// The fault record for the eventq.
    pub fn record(self) -> EventRecord {
        EventRecord::Fault {
            reason: self.reason,
            flags: self.access | self.address.map_or(0, |_| FLAG_ADDRESS),
            endpoint: self.endpoint,
            address: self.address.unwrap_or(0),
            pasid: self.pasid,
        }
    }
}

/// Decode one event's data (the bytes after its header). Table 6.7 of
/// spec-notes/protocol.md says what each SMMUv3 event becomes.
pub fn decode(kind: VeventKind, data: &[u8]) -> Result<VeventFault, VeventError> {
    let want = kind.data_len();
    let short = VeventError::Short {
        kind,
        len: data.len(),
        want,
    };
    match kind {
        VeventKind::Selftest => {
            let at = offset_of!(ViommuEventSelftest, virt_id);
            let id = data.get(at..at + 4).ok_or(short)?;
            // The mock's event carries nothing but the device.
            Ok(VeventFault {
                endpoint: u32::from_ne_bytes(id.try_into().map_err(|_| short)?),
                reason: REASON_UNKNOWN,
                access: 0,
                address: None,
                pasid: None,
            })
        }
        VeventKind::ArmSmmuv3 => {
            let evt = read_smmuv3(data).ok_or(short)?;
            Ok(decode_smmuv3(evt.evt.map(u64::from_le)))
        }
    }
}

/// struct iommu_vevent_arm_smmuv3, read whole.
fn read_smmuv3(data: &[u8]) -> Option<iommu_vevent_arm_smmuv3> {
    if data.len() < size_of::<iommu_vevent_arm_smmuv3>() {
        return None;
    }
    // SAFETY: `data` holds at least size_of::<iommu_vevent_arm_smmuv3>()
    // bytes; the struct is #[repr(C)] u64s, valid for every bit pattern;
    // read_unaligned needs no alignment.
    Some(unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) })
}

/// struct iommufd_vevent_header, read whole (native endianness: the kernel
/// copies its own struct).
fn read_header(b: &[u8]) -> Option<iommufd_vevent_header> {
    if b.len() < HEADER_LEN {
        return None;
    }
    // SAFETY: `b` holds at least HEADER_LEN bytes; the struct is
    // #[repr(C)] u32s, valid for every bit pattern; read_unaligned needs
    // no alignment.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) })
}

fn decode_smmuv3(evt: [u64; 4]) -> VeventFault {
    use smmu::*;
    // Truncations are of fields masked to their width.
    #[allow(clippy::cast_possible_truncation)]
    let (id, sid, ssid) = (
        (evt[0] & EVTQ_0_ID) as u8,
        (evt[0] >> EVTQ_0_SID_SHIFT) as u32,
        ((evt[0] >> EVTQ_0_SSID_SHIFT) & EVTQ_0_SSID_MASK) as u32,
    );
    let pasid = (evt[0] & EVTQ_0_SSV != 0).then_some(ssid);
    let mut f = VeventFault {
        endpoint: sid,
        reason: REASON_UNKNOWN,
        access: 0,
        address: None,
        pasid,
    };
    match id {
        EVT_ID_TRANSLATION_FAULT
        | EVT_ID_ADDR_SIZE_FAULT
        | EVT_ID_ACCESS_FAULT
        | EVT_ID_PERMISSION_FAULT => {
            f.reason = REASON_MAPPING;
            f.address = Some(evt[2]);
            f.access = if evt[1] & EVTQ_1_RNW != 0 {
                FLAG_READ
            } else {
                FLAG_WRITE
            };
            if evt[1] & EVTQ_1_IND != 0 {
                f.access |= FLAG_EXEC;
            }
            if evt[1] & EVTQ_1_PNU != 0 {
                f.access |= FLAG_PRIV;
            }
        }
        // The configuration the guest gave for the endpoint (its STE), or
        // for the PASID (its CD, or none: an SSID out of range, an access
        // without one where S1DSS terminates) cannot translate.
        EVT_ID_BAD_STE_CONFIG
        | EVT_ID_STREAM_DISABLED_FAULT
        | EVT_ID_BAD_SUBSTREAMID_CONFIG
        | EVT_ID_BAD_CD_CONFIG => f.reason = REASON_DOMAIN,
        _ => {}
    }
    f
}

/// What one walk of a read found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Walked {
    /// Events (with data) walked.
    pub events: u64,
    /// Events the kernel dropped.
    pub lost: u64,
    /// Runs of lost events that began in this read (a run ends at the
    /// next event received): each is logged once.
    pub bursts: u64,
}

/// Sequence bookkeeping across reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VEventCounters {
    pub received: u64,
    /// Events the kernel dropped (its queue was full).
    pub lost: u64,
    /// Events read but relayed to no guest: raised while none was served.
    pub stale: u64,
    /// Events of the served guest that became no record: for no endpoint
    /// of it (a vDEVICE of a removed endpoint), or undecodable.
    pub dropped: u64,
    /// The sequence index the next event should have.
    next: u32,
    /// The last event seen was lost: more losses are the same burst.
    in_burst: bool,
}

impl Default for VEventCounters {
    /// The kernel numbers a new vEVENTQ's events from 0, and ours is read
    /// from its creation on (stale events too), so a first event with a
    /// later index says the ones before it were lost.
    fn default() -> Self {
        VEventCounters {
            received: 0,
            lost: 0,
            stale: 0,
            dropped: 0,
            next: 0,
            in_burst: false,
        }
    }
}

impl VEventCounters {
    /// Walk one read's bytes: `f` gets each event's data (`data_len`
    /// bytes). A truncated tail (never made by the kernel) is ignored.
    pub fn parse(&mut self, buf: &[u8], data_len: usize, mut f: impl FnMut(&[u8])) -> Walked {
        let mut out = Walked::default();
        let mut off = 0;
        while let Some(h) = buf.get(off..).and_then(read_header) {
            off += HEADER_LEN;
            let lost_header = h.flags & FLAG_LOST_EVENTS != 0;
            if !lost_header && buf.len() - off < data_len {
                return out;
            }
            // Events from `next` to the header's index were lost; a
            // LOST_EVENTS header's own index is one of them (the kernel
            // moves that header to the tail with each loss).
            let gap = (u64::from(h.sequence) + SEQ_MOD - u64::from(self.next)) % SEQ_MOD;
            let lost = gap + u64::from(lost_header);
            if lost > 0 {
                if !self.in_burst {
                    out.bursts += 1;
                }
                self.in_burst = true;
                out.lost += lost;
                self.lost += lost;
            }
            // The mask keeps it below 2^31.
            #[allow(clippy::cast_possible_truncation)]
            let next = ((u64::from(h.sequence) + 1) % SEQ_MOD) as u32;
            self.next = next;
            if lost_header {
                continue;
            }
            self.in_burst = false;
            self.received += 1;
            out.events += 1;
            f(&buf[off..off + data_len]);
            off += data_len;
        }
        out
    }

    /// Walk one read's bytes of events that belong to no guest: they keep
    /// the sequence tracking right and count as `stale`, not `received`.
    pub fn drop_stale(&mut self, buf: &[u8], data_len: usize) -> Walked {
        let walked = self.parse(buf, data_len, |_| {});
        self.received -= walked.events;
        self.stale += walked.events;
        walked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(out: &mut Vec<u8>, flags: u32, seq: u32, data: Option<u32>) {
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        if let Some(d) = data {
            out.extend_from_slice(&d.to_ne_bytes());
        }
    }

    #[test]
    fn events_gaps_and_lost_headers_are_counted() {
        let mut c = VEventCounters::default();
        let mut b = Vec::new();
        ev(&mut b, 0, 0, Some(10));
        ev(&mut b, 0, 1, Some(11));
        ev(&mut b, 0, 4, Some(12)); // 2 and 3 lost
        let mut got = Vec::new();
        c.parse(&b, 4, |d| {
            got.push(u32::from_ne_bytes(d.try_into().unwrap()))
        });
        assert_eq!(got, vec![10, 11, 12]);
        assert_eq!((c.received, c.lost), (3, 2));
        // A LOST_EVENTS header at the tail (its own index, 5, was lost),
        // then the next read: 6 was lost too.
        let mut b = Vec::new();
        ev(&mut b, FLAG_LOST_EVENTS, 5, None);
        c.parse(&b, 4, |_| panic!("no data after a lost header"));
        let mut b = Vec::new();
        ev(&mut b, 0, 7, Some(13));
        c.parse(&b, 4, |_| {});
        assert_eq!((c.received, c.lost), (4, 4));
        // Wrapping at INT_MAX is no loss.
        let mut c = VEventCounters {
            next: i32::MAX.cast_unsigned(),
            ..VEventCounters::default()
        };
        let mut b = Vec::new();
        ev(&mut b, 0, i32::MAX.cast_unsigned(), Some(1));
        ev(&mut b, 0, 0, Some(2));
        c.parse(&b, 4, |_| {});
        assert_eq!((c.received, c.lost), (2, 0));
        // A truncated tail is ignored.
        c.parse(&[0, 0, 0], 4, |_| panic!());
        let mut b = Vec::new();
        ev(&mut b, 0, 1, None);
        c.parse(&b, 4, |_| panic!());
        assert_eq!((c.received, c.lost), (2, 0));
    }

    /// The queue is ours from its creation, where the kernel starts at 0:
    /// a first event (or LOST_EVENTS header) with a later index says what
    /// was lost before it.
    #[test]
    fn losses_before_the_first_event_read_are_counted() {
        let mut c = VEventCounters::default();
        let mut b = Vec::new();
        ev(&mut b, FLAG_LOST_EVENTS, 3, None);
        let w = c.parse(&b, 4, |_| panic!());
        assert_eq!((w.lost, w.bursts, c.lost), (4, 1, 4));
    }

    /// A run of losses is one burst (logged once) however the reads cut
    /// it: it ends at the next event received.
    #[test]
    fn a_burst_of_losses_is_reported_once() {
        let mut c = VEventCounters::default();
        let mut b = Vec::new();
        ev(&mut b, 0, 0, Some(1));
        ev(&mut b, FLAG_LOST_EVENTS, 1, None);
        let w = c.parse(&b, 4, |_| {});
        assert_eq!((w.events, w.lost, w.bursts), (1, 1, 1));
        // More were lost before the next read: the header moved on to 4.
        let mut b = Vec::new();
        ev(&mut b, FLAG_LOST_EVENTS, 4, None);
        let w = c.parse(&b, 4, |_| {});
        assert_eq!((w.events, w.lost, w.bursts), (0, 3, 0));
        // Then 5 lost too, 6 received (the burst ends), 8 after a new gap.
        let mut b = Vec::new();
        ev(&mut b, 0, 6, Some(2));
        ev(&mut b, 0, 8, Some(3));
        let w = c.parse(&b, 4, |_| {});
        assert_eq!((w.events, w.lost, w.bursts), (2, 2, 1));
        assert_eq!((c.received, c.lost), (3, 6));
    }

    #[test]
    fn stale_events_are_counted_apart_and_keep_the_sequence() {
        let mut c = VEventCounters::default();
        let mut b = Vec::new();
        ev(&mut b, 0, 0, Some(10));
        ev(&mut b, 0, 1, Some(11));
        assert_eq!(c.drop_stale(&b, 4).events, 2);
        assert_eq!((c.received, c.stale, c.lost), (0, 2, 0));
        // The next guest's first event follows on: no gap counted.
        let mut b = Vec::new();
        ev(&mut b, 0, 2, Some(12));
        c.parse(&b, 4, |_| {});
        assert_eq!((c.received, c.stale, c.lost), (1, 2, 0));
    }

    /// struct iommu_vevent_arm_smmuv3 data as the kernel fills it
    /// (arm_vmaster_report_event: the event record's four little-endian
    /// double words, the StreamID replaced by the vSID), built by hand
    /// from the EVTQ_* field layout of arm-smmu-v3.h: no SMMU event was
    /// captured from hardware or QEMU here.
    const F_TRANSLATION: [u8; 32] = [
        // dw0: ID 0x10, SSV, SSID 3, SID (vSID) 5
        0x10, 0x38, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00,
        // dw1: PnU, InD, RnW (a privileged instruction read)
        0x00, 0x00, 0x00, 0x00, 0x0e, 0x00, 0x00, 0x00,
        // dw2: input address 0x7f12_3456_7000
        0x00, 0x70, 0x56, 0x34, 0x12, 0x7f, 0x00, 0x00, // dw3: IPA 0x4000_0000
        0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00,
    ];

    fn smmu(dw: [u64; 4]) -> Vec<u8> {
        dw.iter().flat_map(|d| d.to_le_bytes()).collect()
    }

    #[test]
    #[rustfmt::skip]
    fn smmuv3_events_decode_to_the_virtio_reasons() {
        let k = VeventKind::ArmSmmuv3;
        assert_eq!(
            decode(k, &F_TRANSLATION),
            Ok(VeventFault {
                endpoint: 5,
                reason: REASON_MAPPING,
                access: FLAG_READ | FLAG_EXEC | FLAG_PRIV,
                address: Some(0x7f12_3456_7000),
                pasid: Some(3),
            })
        );
        // The four translation faults: MAPPING, the address, the access
        // (RnW 0: a write); no SSV, no PASID (the SSID field is ignored).
        for id in [0x10, 0x11, 0x12, 0x13] {
            let f = decode(k, &smmu([0x0000_0007_0000_5000 | id, 1 << 33, 0x1000, 0])).unwrap();
            assert_eq!(
                (f.endpoint, f.reason, f.access, f.address, f.pasid),
                (7, REASON_MAPPING, FLAG_WRITE | FLAG_PRIV, Some(0x1000), None),
                "event {id:#x}"
            );
        }
        // Configuration faults: DOMAIN, no address, no access; the PASID
        // when SSV.
        for id in [0x04, 0x06, 0x08, 0x0a] {
            let f = decode(k, &smmu([0x0000_0007_0000_1800 | id, 1 << 35, 0x1000, 0])).unwrap();
            assert_eq!(
                f,
                VeventFault { endpoint: 7, reason: REASON_DOMAIN, access: 0, address: None, pasid: Some(1) },
                "event {id:#x}"
            );
        }
        // Anything else: UNKNOWN, the endpoint only.
        for id in [0x00, 0x02, 0x03, 0x09, 0x25, 0xff] {
            let f = decode(k, &smmu([0xffff_ffff_0000_0000 | id, !0, !0, !0])).unwrap();
            assert_eq!(
                f,
                VeventFault {
                    endpoint: u32::MAX, reason: REASON_UNKNOWN, access: 0, address: None, pasid: None,
                },
                "event {id:#x}"
            );
        }
        // SSID bits 31:12, all 20 of them.
        let f = decode(k, &smmu([0x0000_0001_ffff_f810, 0, 0, 0])).unwrap();
        assert_eq!(f.pasid, Some(0xf_ffff));
        // The record: ADDRESS with an address, PASID with a PASID.
        assert_eq!(
            decode(k, &F_TRANSLATION).unwrap().record(),
            EventRecord::Fault {
                reason: REASON_MAPPING,
                flags: FLAG_READ | FLAG_EXEC | FLAG_PRIV | FLAG_ADDRESS,
                endpoint: 5,
                address: 0x7f12_3456_7000,
                pasid: Some(3),
            }
        );
    }

    #[test]
    fn short_data_is_refused_and_selftest_events_name_the_device() {
        assert_eq!(
            decode(VeventKind::ArmSmmuv3, &F_TRANSLATION[..31]),
            Err(VeventError::Short {
                kind: VeventKind::ArmSmmuv3,
                len: 31,
                want: 32
            })
        );
        assert!(decode(VeventKind::Selftest, &[1, 2]).is_err());
        assert_eq!(
            decode(VeventKind::Selftest, &9u32.to_ne_bytes())
                .unwrap()
                .record(),
            EventRecord::Fault {
                reason: REASON_UNKNOWN,
                flags: 0,
                endpoint: 9,
                address: 0,
                pasid: None,
            }
        );
        assert_eq!(
            (
                VeventKind::Selftest.data_len(),
                VeventKind::ArmSmmuv3.data_len()
            ),
            (4, 32)
        );
    }
}
