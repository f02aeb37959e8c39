// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vEVENTQ records (IOMMU_VEVENTQ_ALLOC, 6.15+): unrecoverable faults a
//! vIOMMU reports, each `struct iommufd_vevent_header` {flags, sequence}
//! followed by the type's data, relayed to the eventq as fault records.
//! Lost events are counted from the sequence gaps and LOST_EVENTS headers.

pub const VEVENT_HEADER_LEN: usize = 8;
pub const VEVENTQ_FLAG_LOST_EVENTS: u32 = 1 << 0;
/// Sequence indexes run over [0, INT_MAX], then wrap to 0.
const SEQ_MOD: u64 = 1 << 31;

/// Sequence bookkeeping across reads.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VEventCounters {
    pub received: u64,
    /// Events the kernel dropped (its queue was full).
    pub lost: u64,
    /// Events read but relayed to no guest: raised while none was served.
    pub stale: u64,
    next: Option<u32>,
}

impl VEventCounters {
    /// Walk one read's bytes: `f` gets each event's data (`data_len`
    /// bytes). A truncated tail (never made by the kernel) is ignored.
    pub fn parse(&mut self, buf: &[u8], data_len: usize, mut f: impl FnMut(&[u8])) {
        let mut off = 0;
        while off + VEVENT_HEADER_LEN <= buf.len() {
            let flags = u32::from_le_bytes(buf[off..off + 4].try_into().unwrap());
            let seq = u32::from_le_bytes(buf[off + 4..off + 8].try_into().unwrap());
            off += VEVENT_HEADER_LEN;
            if let Some(want) = self.next {
                let gap = (u64::from(seq) + SEQ_MOD - u64::from(want)) % SEQ_MOD;
                self.lost += gap;
            }
            if flags & VEVENTQ_FLAG_LOST_EVENTS != 0 {
                // Events from `seq` on were lost; the next real event's
                // sequence says how many more.
                self.lost += 1;
                self.next = Some(((u64::from(seq) + 1) % SEQ_MOD) as u32);
                continue;
            }
            if off + data_len > buf.len() {
                return;
            }
            self.received += 1;
            f(&buf[off..off + data_len]);
            off += data_len;
            self.next = Some(((u64::from(seq) + 1) % SEQ_MOD) as u32);
        }
    }

    /// Walk one read's bytes of events that belong to no guest: they keep
    /// the sequence tracking right and count as `stale`, not `received`.
    /// Returns how many there were.
    pub fn drop_stale(&mut self, buf: &[u8], data_len: usize) -> u64 {
        let before = self.received;
        self.parse(buf, data_len, |_| {});
        let n = self.received - before;
        self.received = before;
        self.stale += n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(out: &mut Vec<u8>, flags: u32, seq: u32, data: Option<u32>) {
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        if let Some(d) = data {
            out.extend_from_slice(&d.to_le_bytes());
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
            got.push(u32::from_le_bytes(d.try_into().unwrap()))
        });
        assert_eq!(got, vec![10, 11, 12]);
        assert_eq!((c.received, c.lost), (3, 2));
        // A LOST_EVENTS header at the tail, then the next read: 5 and 6
        // were lost.
        let mut b = Vec::new();
        ev(&mut b, VEVENTQ_FLAG_LOST_EVENTS, 5, None);
        c.parse(&b, 4, |_| panic!("no data after a lost header"));
        let mut b = Vec::new();
        ev(&mut b, 0, 7, Some(13));
        c.parse(&b, 4, |_| {});
        assert_eq!((c.received, c.lost), (4, 4));
        // Wrapping at INT_MAX is no loss.
        let mut c = VEventCounters::default();
        let mut b = Vec::new();
        ev(&mut b, 0, i32::MAX as u32, Some(1));
        ev(&mut b, 0, 0, Some(2));
        c.parse(&b, 4, |_| {});
        assert_eq!((c.received, c.lost), (2, 0));
        // A truncated tail is ignored.
        c.parse(&[0, 0, 0], 4, |_| panic!());
    }

    #[test]
    fn stale_events_are_counted_apart_and_keep_the_sequence() {
        let mut c = VEventCounters::default();
        let mut b = Vec::new();
        ev(&mut b, 0, 0, Some(10));
        ev(&mut b, 0, 1, Some(11));
        assert_eq!(c.drop_stale(&b, 4), 2);
        assert_eq!((c.received, c.stale, c.lost), (0, 2, 0));
        // The next guest's first event follows on: no gap counted.
        let mut b = Vec::new();
        ev(&mut b, 0, 2, Some(12));
        c.parse(&b, 4, |_| {});
        assert_eq!((c.received, c.stale, c.lost), (1, 2, 0));
    }
}
