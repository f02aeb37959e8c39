// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the fuzz targets: a byte reader that never fails, split
//! virtqueue layout arithmetic, and a prediction of what the device will
//! pop from a ring (used to bound every used-ring length).

use std::num::Wrapping;
use std::ops::Deref;

use vhost_device_iommu::device::config::{DeviceConfig, Limits};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Reads little-endian values off the fuzz input; zeros once it runs out.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let got = self.bytes(N);
        b[..got.len()].copy_from_slice(got);
        b
    }

    pub fn u8(&mut self) -> u8 {
        self.fixed::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fixed())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fixed())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.fixed())
    }

    pub fn rest(&mut self) -> &'a [u8] {
        let r = self.data;
        self.data = &[];
        r
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Endpoints every target serves.
pub const ENDPOINTS: [u32; 4] = [1, 2, 3, 0x18];

/// Small bounds, so the limits are reached within one input.
pub fn small_limits(max_events: usize) -> Limits {
    Limits {
        max_endpoints: 1 << 16,
        max_domains: 16,
        max_mappings: 64,
        max_total_mappings: 128,
        max_events,
        max_pasids: 8,
        max_page_requests: 8,
        page_response_timeout: Some(std::time::Duration::from_millis(100)),
    }
}

/// A device config chosen by one fuzz byte (bit 0: domain range 1..=8,
/// bit 1: 32-bit input range, bit 2: 64 KiB granule, bit 3: bypass off).
pub fn config_from(bits: u8) -> DeviceConfig {
    let mut c = DeviceConfig::default();
    if bits & 1 != 0 {
        c.domain_start = 1;
        c.domain_end = 8;
    }
    if bits & 2 != 0 {
        c.input_end = 0xffff_ffff;
    }
    if bits & 4 != 0 {
        c.page_size_mask = !0xffff;
    }
    if bits & 8 != 0 {
        c.boot_bypass = false;
    }
    c
}

/// Split-ring sizes (bytes) for a queue of `size` entries.
pub fn desc_table_len(size: u16) -> u64 {
    16 * u64::from(size)
}
pub fn avail_ring_len(size: u16) -> u64 {
    6 + 2 * u64::from(size)
}
pub fn used_ring_len(size: u16) -> u64 {
    6 + 8 * u64::from(size)
}

/// A guest-physical byte range [start, start + len).
#[derive(Debug, Clone, Copy)]
pub struct Range {
    pub start: u64,
    pub len: u64,
}

impl Range {
    pub fn overlaps(&self, o: &Range) -> bool {
        if self.len == 0 || o.len == 0 {
            return false;
        }
        // In u128: a range may run past 2^64 (a wrapping guest address).
        let (a, b) = (u128::from(self.start), u128::from(o.start));
        a < b + u128::from(o.len) && b < a + u128::from(self.len)
    }
}

pub fn any_overlap(a: &[Range], b: &[Range]) -> bool {
    a.iter().any(|x| b.iter().any(|y| x.overlaps(y)))
}

/// What the device will pop from a ring, predicted on a copy of the queue.
pub struct Prediction {
    /// Head index and size of the writable part of each chain, in pop order.
    pub chains: Vec<(u16, u64)>,
    /// Bytes the walk reads (descriptor table, avail ring, every indirect
    /// table a descriptor of the table names): an over-approximation.
    pub reads: Vec<Range>,
    /// Bytes the device may write: the used ring and every writable buffer.
    pub writes: Vec<Range>,
    /// The used ring alone.
    pub used: Range,
    /// The writable buffers alone.
    pub buffers: Vec<Range>,
}

impl Prediction {
    /// True when the device's writes cannot change what it reads, nor the
    /// used entries it wrote before: the prediction is then exact.
    pub fn exact(&self) -> bool {
        !any_overlap(&self.reads, &self.writes) && !any_overlap(&[self.used], &self.buffers)
    }
}

/// Pop every chain the device would pop, on a queue built from the same
/// addresses, size and next_avail, against the same memory.
pub fn predict(
    mem: &GuestMemoryMmap,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    event_idx: bool,
) -> Prediction {
    let mut reads = vec![
        Range {
            start: desc,
            len: desc_table_len(size),
        },
        Range {
            start: avail,
            len: avail_ring_len(size),
        },
    ];
    for i in 0..u64::from(size) {
        let a = GuestAddress(desc.wrapping_add(16 * i));
        let (Ok(addr), Ok(len), Ok(flags)) = (
            mem.read_obj::<u64>(a),
            mem.read_obj::<u32>(GuestAddress(a.0.wrapping_add(8))),
            mem.read_obj::<u16>(GuestAddress(a.0.wrapping_add(12))),
        ) else {
            continue;
        };
        if u32::from(flags) & VRING_DESC_F_INDIRECT != 0 {
            reads.push(Range {
                start: addr,
                len: u64::from(len),
            });
        }
    }
    let used_r = Range {
        start: used,
        len: used_ring_len(size),
    };
    let mut chains = Vec::new();
    let mut buffers = Vec::new();
    let mut q = Queue::new(size.max(1)).expect("queue");
    q.set_size(size);
    q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q.set_next_avail(next_avail);
    q.set_event_idx(event_idx);
    q.set_ready(true);
    if let Ok(iter) = q.iter(mem) {
        for chain in iter {
            let head = chain.head_index();
            // The device drops (and counts) an entry naming a head beyond
            // the queue: no used entry can name it.
            if head >= size {
                continue;
            }
            let mut writable = 0u64;
            for d in chain {
                if u32::from(d.flags()) & VRING_DESC_F_WRITE != 0 {
                    writable += u64::from(d.len());
                    buffers.push(Range {
                        start: d.addr().0,
                        len: u64::from(d.len()),
                    });
                }
            }
            chains.push((head, writable));
        }
    }
    let mut writes = buffers.clone();
    writes.push(used_r);
    Prediction {
        chains,
        reads,
        writes,
        used: used_r,
        buffers,
    }
}

/// The used-ring entries from `from` (a used index) to `to`.
pub fn used_entries<M: Deref<Target = GuestMemoryMmap>>(
    mem: &M,
    used: u64,
    size: u16,
    from: u16,
    to: u16,
) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut i = Wrapping(from);
    while i.0 != to {
        let slot = u64::from(i.0 % size.max(1));
        let a = used.wrapping_add(4 + 8 * slot);
        let id = mem.read_obj::<u32>(GuestAddress(a)).unwrap_or(u32::MAX);
        let len = mem
            .read_obj::<u32>(GuestAddress(a.wrapping_add(4)))
            .unwrap_or(u32::MAX);
        out.push((id, len));
        i += Wrapping(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_reads_zeros_past_the_end() {
        let mut i = Input::new(&[1, 2, 3]);
        assert_eq!(i.u16(), 0x0201);
        assert_eq!(i.u32(), 3);
        assert_eq!(i.u64(), 0);
        assert!(i.is_empty());
    }

    #[test]
    fn ranges_overlap_half_open() {
        let a = Range { start: 0, len: 16 };
        assert!(a.overlaps(&Range { start: 15, len: 1 }));
        assert!(!a.overlaps(&Range { start: 16, len: 1 }));
        assert!(!a.overlaps(&Range { start: 4, len: 0 }));
        assert!(Range {
            start: u64::MAX - 1,
            len: 8
        }
        .overlaps(&Range {
            start: u64::MAX,
            len: 1
        }));
    }
}
