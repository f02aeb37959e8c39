// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The ACPI VIOT (Virtual I/O Translation Table) that tells a guest which PCI
//! devices this virtio-iommu manages. QEMU's generic vhost-user device
//! describes no topology, so the table is passed with `-acpitable file=...`.
//!
//! Layout (ACPI VIOT, Linux `include/acpi/actbl3.h`, parsed by
//! `drivers/acpi/viot.c`): a 36-byte ACPI header, `node_count` le16 @36,
//! `node_offset` le16 @38, reserved[8] @40, then the nodes. We emit one
//! virtio-iommu-on-PCI node at offset 48 and one PCI range node per range,
//! each pointing back at offset 48.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

pub const SIGNATURE: &[u8; 4] = b"VIOT";
/// Nodes start after the 36-byte ACPI header and VIOT's own 12 bytes; the IOMMU node
/// is the first, so this is also every range's `output_node`.
pub const NODE_OFFSET: u16 = 48;
pub const NODE_PCI_RANGE: u8 = 1;
pub const NODE_VIRTIO_IOMMU_PCI: u8 = 3;
pub const PCI_RANGE_NODE_LEN: u16 = 24;
pub const VIRTIO_IOMMU_PCI_NODE_LEN: u16 = 16;
/// QEMU's `-acpitable` refuses tables longer than this (including the header).
pub const MAX_TABLE_LEN: usize = u16::MAX as usize;
/// Ranges that fit in [`MAX_TABLE_LEN`] next to the header and the IOMMU node.
pub const MAX_RANGES: usize =
    (MAX_TABLE_LEN - NODE_OFFSET as usize - VIRTIO_IOMMU_PCI_NODE_LEN as usize)
        / PCI_RANGE_NODE_LEN as usize;

// Identification only; neither QEMU nor Linux looks at these.
const OEM_ID: &[u8; 6] = b"VHDEV ";
const OEM_TABLE_ID: &[u8; 8] = b"VIOMMU  ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: &[u8; 4] = b"VHDI";
const CREATOR_REVISION: u32 = 1;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ViotError {
    #[error(
        "bad PCI address {0:?}: expected [SEGMENT:]BUS:DEVICE.FUNCTION in hex \
         (device 0-1f, function 0-7), e.g. 00:03.0"
    )]
    BadAddress(String),
    #[error("bad range {0:?}: expected FIRST[-LAST][,ENDPOINT_START], e.g. 00:04.0-00:05.0")]
    BadRange(String),
    #[error("bad endpoint start {0:?}: expected a 32-bit number, decimal or 0x-hex")]
    BadEndpointStart(String),
    #[error("range {0} ends before it starts")]
    Backwards(PciRange),
    #[error("range {0} spans PCI segments: give one range per segment")]
    CrossSegment(PciRange),
    #[error("range {0} runs past endpoint ID 0xffffffff")]
    EndpointOverflow(PciRange),
    #[error(
        "ranges {0} and {1} overlap (Linux would use only the later one for the shared devices)"
    )]
    Overlap(PciRange, PciRange),
    #[error(
        "{0} ranges do not fit in one table: at most {MAX_RANGES} \
         (QEMU's -acpitable takes up to {MAX_TABLE_LEN} bytes)"
    )]
    TooManyRanges(usize),
    #[error("viot: --iommu is required")]
    NoIommu,
    #[error("viot: at least one --range is required")]
    NoRange,
    #[error(
        "refusing to write the binary table to a terminal: give --output FILE or redirect stdout"
    )]
    Terminal,
    #[error("cannot write {0}: {1}")]
    Write(String, String),
}

/// A PCI function: segment (domain) and bus/device/function packed as in a
/// requester ID, `bus << 8 | device << 3 | function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub segment: u16,
    pub bdf: u16,
}

impl PciAddress {
    pub fn new(segment: u16, bus: u8, device: u8, function: u8) -> Option<Self> {
        (device < 32 && function < 8).then_some(Self {
            segment,
            bdf: u16::from(bus) << 8 | u16::from(device) << 3 | u16::from(function),
        })
    }

    pub fn bus(self) -> u8 {
        (self.bdf >> 8) as u8
    }

    pub fn device(self) -> u8 {
        (self.bdf >> 3 & 0x1f) as u8
    }

    pub fn function(self) -> u8 {
        (self.bdf & 7) as u8
    }

    /// `SEG:BUS:DEV.FN` or `BUS:DEV.FN` (hex, as lspci prints them); the
    /// short form takes `segment`.
    pub fn parse_in_segment(s: &str, segment: u16) -> Result<Self, ViotError> {
        let bad = || ViotError::BadAddress(s.into());
        // from_str_radix alone would accept a sign and any length.
        let hex = |t: &str, max_digits: usize| {
            if t.is_empty() || t.len() > max_digits || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u16::from_str_radix(t, 16).map_err(|_| bad())
        };
        let parts: Vec<&str> = s.trim().split(':').collect();
        let (segment, bus, devfn) = match parts[..] {
            [seg, bus, devfn] => (hex(seg, 4)?, bus, devfn),
            [bus, devfn] => (segment, bus, devfn),
            _ => return Err(bad()),
        };
        let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
        let (bus, dev, func) = (hex(bus, 2)?, hex(dev, 2)?, hex(func, 1)?);
        let byte = |v: u16| u8::try_from(v).map_err(|_| bad());
        Self::new(segment, byte(bus)?, byte(dev)?, byte(func)?).ok_or_else(bad)
    }
}

impl FromStr for PciAddress {
    type Err = ViotError;

    fn from_str(s: &str) -> Result<Self, ViotError> {
        Self::parse_in_segment(s, 0)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.segment,
            self.bus(),
            self.device(),
            self.function()
        )
    }
}

/// PCI functions `start..=end` (by requester ID) and the endpoint ID of the
/// first one; the others follow consecutively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciRange {
    pub start: PciAddress,
    pub end: PciAddress,
    pub endpoint_start: u32,
}

impl PciRange {
    /// Endpoint ID = requester ID, as QEMU assigns them for its own
    /// virtio-iommu.
    pub fn new(start: PciAddress, end: PciAddress) -> Self {
        Self {
            start,
            end,
            endpoint_start: u32::from(start.bdf),
        }
    }

    pub fn validate(&self) -> Result<(), ViotError> {
        if self.start.segment != self.end.segment {
            return Err(ViotError::CrossSegment(*self));
        }
        if self.end.bdf < self.start.bdf {
            return Err(ViotError::Backwards(*self));
        }
        let span = u32::from(self.end.bdf - self.start.bdf);
        if self.endpoint_start.checked_add(span).is_none() {
            return Err(ViotError::EndpointOverflow(*self));
        }
        Ok(())
    }

    /// Linux's test: segment and requester ID each within bounds.
    pub fn contains(&self, a: PciAddress) -> bool {
        (self.start.segment..=self.end.segment).contains(&a.segment)
            && (self.start.bdf..=self.end.bdf).contains(&a.bdf)
    }

    fn overlaps(&self, o: &PciRange) -> bool {
        self.start.segment <= o.end.segment
            && o.start.segment <= self.end.segment
            && self.start.bdf <= o.end.bdf
            && o.start.bdf <= self.end.bdf
    }
}

/// `FIRST[-LAST][,ENDPOINT_START]`: LAST defaults to FIRST, and takes FIRST's
/// segment when written without one; ENDPOINT_START (decimal or 0x-hex)
/// defaults to FIRST's requester ID. Not validated here: see `validate`.
impl FromStr for PciRange {
    type Err = ViotError;

    fn from_str(s: &str) -> Result<Self, ViotError> {
        let (addrs, ep) = match s.split_once(',') {
            Some((a, ep)) => (a, Some(ep)),
            None => (s, None),
        };
        let bad_range = |_| ViotError::BadRange(s.into());
        let (start, end) = match addrs.split_once('-') {
            Some((a, b)) => {
                let start: PciAddress = a.parse().map_err(bad_range)?;
                let end = PciAddress::parse_in_segment(b, start.segment).map_err(bad_range)?;
                (start, end)
            }
            None => {
                let start = addrs.parse().map_err(bad_range)?;
                (start, start)
            }
        };
        let mut range = PciRange::new(start, end);
        if let Some(ep) = ep {
            range.endpoint_start = parse_u32(ep)?;
        }
        Ok(range)
    }
}

impl fmt::Display for PciRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{},{:#x}", self.start, self.end, self.endpoint_start)
    }
}

fn parse_u32(s: &str) -> Result<u32, ViotError> {
    let bad = || ViotError::BadEndpointStart(s.into());
    let t = s.trim();
    let (digits, radix) = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (t, 10),
    };
    // from_str_radix alone would accept a sign.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad());
    }
    u32::from_str_radix(digits, radix).map_err(|_| bad())
}

/// One virtio-iommu on PCI and the endpoint ranges behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViotTable {
    pub iommu: PciAddress,
    pub ranges: Vec<PciRange>,
}

impl ViotTable {
    /// Ranges may cover the IOMMU itself (Linux skips it), but must not
    /// overlap one another: the guest would silently ignore part of one.
    pub fn validate(&self) -> Result<(), ViotError> {
        if self.ranges.len() > MAX_RANGES {
            return Err(ViotError::TooManyRanges(self.ranges.len()));
        }
        for (i, r) in self.ranges.iter().enumerate() {
            r.validate()?;
            if let Some(earlier) = self.ranges[..i].iter().find(|e| e.overlaps(r)) {
                return Err(ViotError::Overlap(*earlier, *r));
            }
        }
        Ok(())
    }

    /// The whole table, ACPI header included, as `-acpitable file=` wants it.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ViotError> {
        self.validate()?;
        let len = usize::from(NODE_OFFSET)
            + usize::from(VIRTIO_IOMMU_PCI_NODE_LEN)
            + self.ranges.len() * usize::from(PCI_RANGE_NODE_LEN);
        // validate() bounds the range count, so these always convert.
        let too_many = |_| ViotError::TooManyRanges(self.ranges.len());
        let node_count = u16::try_from(self.ranges.len() + 1).map_err(too_many)?;
        let table_len = u32::try_from(len).map_err(too_many)?;
        let mut t = Vec::with_capacity(len);

        t.extend_from_slice(SIGNATURE);
        t.extend_from_slice(&table_len.to_le_bytes());
        t.push(0); // revision
        t.push(0); // checksum, set last
        t.extend_from_slice(OEM_ID);
        t.extend_from_slice(OEM_TABLE_ID);
        t.extend_from_slice(&OEM_REVISION.to_le_bytes());
        t.extend_from_slice(CREATOR_ID);
        t.extend_from_slice(&CREATOR_REVISION.to_le_bytes());

        t.extend_from_slice(&node_count.to_le_bytes());
        t.extend_from_slice(&NODE_OFFSET.to_le_bytes());
        t.extend_from_slice(&[0; 8]);

        t.push(NODE_VIRTIO_IOMMU_PCI);
        t.push(0);
        t.extend_from_slice(&VIRTIO_IOMMU_PCI_NODE_LEN.to_le_bytes());
        t.extend_from_slice(&self.iommu.segment.to_le_bytes());
        t.extend_from_slice(&self.iommu.bdf.to_le_bytes());
        t.extend_from_slice(&[0; 8]);

        for r in &self.ranges {
            t.push(NODE_PCI_RANGE);
            t.push(0);
            t.extend_from_slice(&PCI_RANGE_NODE_LEN.to_le_bytes());
            t.extend_from_slice(&r.endpoint_start.to_le_bytes());
            t.extend_from_slice(&r.start.segment.to_le_bytes());
            t.extend_from_slice(&r.end.segment.to_le_bytes());
            t.extend_from_slice(&r.start.bdf.to_le_bytes());
            t.extend_from_slice(&r.end.bdf.to_le_bytes());
            t.extend_from_slice(&NODE_OFFSET.to_le_bytes()); // output_node
            t.extend_from_slice(&[0; 6]);
        }
        debug_assert_eq!(t.len(), len);

        let sum = t.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        t[9] = sum.wrapping_neg();
        Ok(t)
    }

    /// The endpoint ID the guest's virtio-iommu driver uses for `addr`
    /// (what `--endpoint` must name), computed as Linux's
    /// `viot_pci_dev_iommu_init` does. None if no range covers `addr`, or
    /// `addr` is the IOMMU itself (Linux does not translate it).
    #[cfg(test)]
    pub fn endpoint_id(&self, addr: PciAddress) -> Option<u32> {
        if addr == self.iommu {
            return None;
        }
        // Linux list_add()s each range at the head of its list: on overlap
        // the last range in the table wins.
        let r = self.ranges.iter().rev().find(|r| r.contains(addr))?;
        let seg = u32::from(addr.segment - r.start.segment) << 16;
        Some(
            seg.wrapping_add(u32::from(addr.bdf - r.start.bdf))
                .wrapping_add(r.endpoint_start),
        )
    }
}

#[cfg(test)]
// Test code with known small values.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    fn range(s: &str) -> PciRange {
        s.parse().unwrap()
    }

    fn le16(t: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(t[at..at + 2].try_into().unwrap())
    }

    fn le32(t: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(t[at..at + 4].try_into().unwrap())
    }

    /// The header checks every table must pass.
    fn check_header(t: &[u8], ranges: usize) {
        assert_eq!(&t[0..4], b"VIOT");
        assert_eq!(le32(t, 4) as usize, t.len());
        assert_eq!(t.len(), 48 + 16 + 24 * ranges);
        assert_eq!(t[8], 0, "revision");
        assert_eq!(t.iter().map(|&b| u32::from(b)).sum::<u32>() % 256, 0);
        assert_eq!(&t[10..16], OEM_ID);
        assert_eq!(&t[16..24], OEM_TABLE_ID);
        assert_eq!(le32(t, 24), OEM_REVISION);
        assert_eq!(&t[28..32], CREATOR_ID);
        assert_eq!(le32(t, 32), CREATOR_REVISION);
        assert_eq!(le16(t, 36) as usize, ranges + 1, "node_count");
        assert_eq!(le16(t, 38), 48, "node_offset");
        assert_eq!(&t[40..48], &[0; 8]);
    }

    fn check_iommu_node(t: &[u8], iommu: PciAddress) {
        let n = &t[48..64];
        assert_eq!((n[0], n[1], le16(n, 2)), (3, 0, 16));
        assert_eq!((le16(n, 4), le16(n, 6)), (iommu.segment, iommu.bdf));
        assert_eq!(&n[8..16], &[0; 8]);
    }

    /// (endpoint_start, segment_start, segment_end, bdf_start, bdf_end) of
    /// range node `i`, after checking its type, length, output and padding.
    fn range_node(t: &[u8], i: usize) -> (u32, u16, u16, u16, u16) {
        let n = &t[64 + 24 * i..88 + 24 * i];
        assert_eq!((n[0], n[1], le16(n, 2)), (1, 0, 24));
        assert_eq!(le16(n, 16), 48, "output_node is the IOMMU node");
        assert_eq!(&n[18..24], &[0; 6]);
        (
            le32(n, 4),
            le16(n, 8),
            le16(n, 10),
            le16(n, 12),
            le16(n, 14),
        )
    }

    /// An independent reading of the bytes, step for step as Linux's
    /// drivers/acpi/viot.c: walk node_count nodes from node_offset, keep PCI
    /// ranges whose output_node is a virtio-iommu-pci node, newest first.
    fn linux_endpoint_id(t: &[u8], a: PciAddress) -> Option<u32> {
        let mut ranges = Vec::new();
        let mut iommu = None;
        let mut off = usize::from(le16(t, 38));
        for _ in 0..le16(t, 36) {
            assert!(off >= 48 && off + 4 <= le32(t, 4) as usize);
            let len = usize::from(le16(t, off + 2));
            assert!(len >= 4);
            if t[off] == 1 {
                let out = usize::from(le16(t, off + 16));
                assert_eq!(t[out], 3);
                iommu = Some((le16(t, out + 4), le16(t, out + 6)));
                ranges.insert(0, &t[off..off + len]);
            }
            off += len;
        }
        if iommu == Some((a.segment, a.bdf)) {
            return None;
        }
        let d = u32::from(a.segment);
        let r = ranges.iter().find(|n| {
            (u32::from(le16(n, 8))..=u32::from(le16(n, 10))).contains(&d)
                && (le16(n, 12)..=le16(n, 14)).contains(&a.bdf)
        })?;
        Some(
            ((d - u32::from(le16(r, 8))) << 16)
                .wrapping_add(u32::from(a.bdf - le16(r, 12)))
                .wrapping_add(le32(r, 4)),
        )
    }

    #[test]
    fn viot_address_forms() {
        assert_eq!(
            addr("00:03.0"),
            PciAddress {
                segment: 0,
                bdf: 0x18
            }
        );
        assert_eq!(addr("0000:00:03.0"), addr("00:03.0"));
        assert_eq!(
            addr("0001:3a:1f.7"),
            PciAddress {
                segment: 1,
                bdf: 0x3a << 8 | 0x1f << 3 | 7
            }
        );
        assert_eq!(
            addr("FFFF:FF:1F.7"),
            PciAddress {
                segment: 0xffff,
                bdf: 0xffff
            }
        );
        let a = addr("2:1:2.3");
        assert_eq!((a.segment, a.bus(), a.device(), a.function()), (2, 1, 2, 3));
        assert_eq!(a.to_string(), "0002:01:02.3");
        assert_eq!(PciAddress::new(0, 0, 32, 0), None);
        for bad in [
            "",
            "03.0",
            "00:03",
            "00:20.0",
            "00:03.8",
            "00:03.",
            ":03.0",
            "100:03.0",
            "10000:00:03.0",
            "00:+3.0",
            "0:0:0:03.0",
            "00:03.0x",
            "g0:03.0",
            "00:003.0",
        ] {
            assert_eq!(
                bad.parse::<PciAddress>(),
                Err(ViotError::BadAddress(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn viot_range_forms() {
        let r = range("00:04.0-00:05.0");
        assert_eq!(
            (r.start, r.end, r.endpoint_start),
            (addr("00:04.0"), addr("00:05.0"), 0x20)
        );
        let r = range("00:04.0");
        assert_eq!(
            (r.start, r.end, r.endpoint_start),
            (addr("00:04.0"), addr("00:04.0"), 0x20)
        );
        assert_eq!(range("00:04.0-00:05.0,0x100").endpoint_start, 0x100);
        assert_eq!(range("00:04.0,7").endpoint_start, 7);
        // A short LAST stays in FIRST's segment.
        let r = range("0003:00:04.0-01:00.0");
        assert_eq!(
            r.end,
            PciAddress {
                segment: 3,
                bdf: 0x100
            }
        );
        assert_eq!(r.to_string(), "0003:00:04.0-0003:01:00.0,0x20");
        for bad in [
            "",
            "-",
            "00:04.0-",
            "00:04.0-00:05.0-00:06.0",
            "x",
            "00:04.0;00:05.0",
        ] {
            assert_eq!(
                bad.parse::<PciRange>(),
                Err(ViotError::BadRange(bad.into())),
                "{bad}"
            );
        }
        for (s, ep) in [
            ("00:04.0,", ""),
            ("00:04.0,0x1_0", "0x1_0"),
            ("00:04.0,0x100000000", "0x100000000"),
            ("00:04.0,-1", "-1"),
            ("00:04.0,0x+1", "0x+1"),
        ] {
            assert_eq!(
                s.parse::<PciRange>(),
                Err(ViotError::BadEndpointStart(ep.into())),
                "{s}"
            );
        }
    }

    /// The table testbed.md shows QEMU and Linux accepting: IOMMU at 00:03.0,
    /// endpoints 00:04.0 and 00:05.0 with endpoint ID = requester ID.
    #[test]
    fn viot_single_range_88_bytes() {
        let table = ViotTable {
            iommu: addr("00:03.0"),
            ranges: vec![range("00:04.0-00:05.0")],
        };
        let t = table.to_bytes().unwrap();
        assert_eq!(t.len(), 88);
        check_header(&t, 1);
        check_iommu_node(&t, addr("00:03.0"));
        assert_eq!(range_node(&t, 0), (0x20, 0, 0, 0x20, 0x28));
        // The same table, byte for byte.
        let mut want = Vec::new();
        want.extend_from_slice(b"VIOT");
        want.extend_from_slice(&[88, 0, 0, 0, 0, t[9]]);
        want.extend_from_slice(b"VHDEV VIOMMU  \x01\x00\x00\x00VHDI\x01\x00\x00\x00");
        want.extend_from_slice(&[2, 0, 48, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[3, 0, 16, 0, 0, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[1, 0, 24, 0, 0x20, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0x20, 0, 0x28, 0, 48, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(t, want);

        for (a, id) in [
            ("00:04.0", Some(0x20)),
            ("00:05.0", Some(0x28)),
            ("00:04.1", Some(0x21)),
            ("00:03.0", None),
            ("00:06.0", None),
            ("0001:00:04.0", None),
        ] {
            assert_eq!(table.endpoint_id(addr(a)), id, "{a}");
            assert_eq!(linux_endpoint_id(&t, addr(a)), id, "{a} in the bytes");
        }
    }

    #[test]
    fn viot_several_ranges() {
        let table = ViotTable {
            iommu: addr("0000:00:03.0"),
            ranges: vec![
                // QEMU's style: the whole root bus, including the IOMMU.
                range("00:00.0-00:1f.7"),
                range("0001:02:00.0-02:1f.7,0x10000"),
                range("0000:05:00.0"),
            ],
        };
        let t = table.to_bytes().unwrap();
        check_header(&t, 3);
        check_iommu_node(&t, addr("00:03.0"));
        assert_eq!(range_node(&t, 0), (0, 0, 0, 0, 0xff));
        assert_eq!(range_node(&t, 1), (0x10000, 1, 1, 0x200, 0x2ff));
        assert_eq!(range_node(&t, 2), (0x500, 0, 0, 0x500, 0x500));
        for (a, id) in [
            ("00:03.0", None),
            ("00:03.1", Some(0x19)),
            ("00:1f.7", Some(0xff)),
            ("01:00.0", None),
            ("0001:02:00.0", Some(0x10000)),
            ("0001:02:01.2", Some(0x1000a)),
            ("0001:00:00.0", None),
            ("05:00.0", Some(0x500)),
            ("05:00.1", None),
        ] {
            assert_eq!(table.endpoint_id(addr(a)), id, "{a}");
            assert_eq!(linux_endpoint_id(&t, addr(a)), id, "{a} in the bytes");
        }
    }

    #[test]
    fn viot_no_ranges_and_max_ranges() {
        let mut table = ViotTable {
            iommu: addr("00:03.0"),
            ranges: vec![],
        };
        let t = table.to_bytes().unwrap();
        check_header(&t, 0);
        check_iommu_node(&t, addr("00:03.0"));

        // One single-function range per function: as many as fit.
        table.ranges = (0..MAX_RANGES as u16)
            .map(|bdf| {
                let a = PciAddress { segment: 0, bdf };
                PciRange::new(a, a)
            })
            .collect();
        let t = table.to_bytes().unwrap();
        assert!(t.len() <= MAX_TABLE_LEN && MAX_TABLE_LEN - t.len() < 24);
        check_header(&t, MAX_RANGES);
        assert_eq!(range_node(&t, MAX_RANGES - 1).3, MAX_RANGES as u16 - 1);
        let a = PciAddress {
            segment: 0,
            bdf: 1000,
        };
        assert_eq!(linux_endpoint_id(&t, a), Some(1000));

        let a = PciAddress {
            segment: 0,
            bdf: MAX_RANGES as u16,
        };
        table.ranges.push(PciRange::new(a, a));
        assert_eq!(
            table.to_bytes(),
            Err(ViotError::TooManyRanges(MAX_RANGES + 1))
        );
    }

    #[test]
    fn viot_validation_errors() {
        let table = |ranges: &[&str]| ViotTable {
            iommu: addr("00:03.0"),
            ranges: ranges.iter().map(|r| range(r)).collect(),
        };
        let r = range("00:05.0-00:04.0");
        assert_eq!(
            table(&["00:05.0-00:04.0"]).to_bytes(),
            Err(ViotError::Backwards(r))
        );
        let r = range("0000:00:04.0-0001:00:05.0");
        assert_eq!(
            table(&["0000:00:04.0-0001:00:05.0"]).to_bytes(),
            Err(ViotError::CrossSegment(r))
        );
        let r = range("00:04.0-00:05.0,0xfffffff8");
        assert_eq!(
            table(&["00:04.0-00:05.0,0xfffffff8"]).to_bytes(),
            Err(ViotError::EndpointOverflow(r))
        );
        // The last ID exactly at the limit is fine.
        assert!(table(&["00:04.0-00:05.0,0xfffffff7"]).to_bytes().is_ok());
        assert_eq!(
            table(&["00:04.0-00:05.0", "00:05.0-00:06.0"]).to_bytes(),
            Err(ViotError::Overlap(
                range("00:04.0-00:05.0"),
                range("00:05.0-00:06.0")
            ))
        );
        // Same functions in another segment: no overlap.
        assert!(table(&["00:04.0-00:05.0", "0001:00:04.0-00:05.0"])
            .to_bytes()
            .is_ok());
        // The IOMMU inside a range is allowed; Linux skips it.
        assert!(table(&["00:03.0"]).to_bytes().is_ok());
        assert_eq!(
            ViotError::Overlap(range("00:04.0"), range("00:04.0-00:05.0")).to_string(),
            "ranges 0000:00:04.0-0000:00:04.0,0x20 and 0000:00:04.0-0000:00:05.0,0x20 overlap \
             (Linux would use only the later one for the shared devices)"
        );
    }

    /// Overlapping ranges can only be built by hand; the lookup still agrees
    /// with Linux (the later range wins).
    #[test]
    fn viot_endpoint_id_overlap_follows_linux() {
        let table = ViotTable {
            iommu: addr("00:03.0"),
            ranges: vec![range("00:00.0-00:1f.7"), range("00:04.0,0x1000")],
        };
        assert_eq!(table.endpoint_id(addr("00:04.0")), Some(0x1000));
        assert_eq!(table.endpoint_id(addr("00:04.1")), Some(0x21));
        // Across segments (also hand-built): the segment goes in bits 16 and up.
        let table = ViotTable {
            iommu: addr("00:03.0"),
            ranges: vec![PciRange {
                start: addr("0001:00:00.0"),
                end: addr("0003:00:1f.7"),
                endpoint_start: 5,
            }],
        };
        assert_eq!(
            table.endpoint_id(addr("0003:00:01.0")),
            Some((2 << 16) + 8 + 5)
        );
        assert_eq!(table.endpoint_id(addr("0003:01:00.0")), None);
    }
}
