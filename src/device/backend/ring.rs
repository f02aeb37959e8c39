// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The split rings as the device reads them: the avail index checked
//! before anything is popped, chains popped without the crate's error log,
//! kicks suppressed while polling, and the driver interrupted when the
//! ring's suppression rules ask for it.

use std::sync::atomic::Ordering as AtomicOrdering;

use thiserror::Error;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, Permissions, VolatileMemory, VolatileSlice};

use crate::device::mem_view::OneRegion;

/// Why a ring is not served until the driver's next kick. virtio-queue's
/// `pop_descriptor_chain` logs each of these at error level on every call
/// (and a poller calls it in a loop), so the rings are checked first and
/// popped with `iter`, which returns the error instead.
#[derive(Debug, Error)]
pub(crate) enum RingError {
    #[error(
        "avail index {avail} is more than the queue size ({size}) ahead of the device's {next}"
    )]
    AvailAhead { avail: u16, next: u16, size: u16 },
    #[error("avail ring at {addr:#x} is not in guest memory")]
    AvailUnreadable { addr: u64 },
    #[error("{0}")]
    Queue(virtio_queue::Error),
}

/// Check the avail ring of `q` before popping from it: readable, and its
/// index (read here, from guest memory) at most a queue size ahead of
/// where the device is (wrapping u16 arithmetic, as the spec counts).
pub(super) fn check_avail<M: vm_memory::GuestMemory + ?Sized>(
    q: &Queue,
    mem: &M,
) -> Result<(), RingError> {
    let addr = q.avail_ring();
    // flags, idx, ring[size]; virtio-queue refuses a ring at 0 as not ready.
    let len = 4 + 2 * usize::from(q.size());
    if addr == 0 || !mem.check_range(GuestAddress(addr), len, Permissions::Read) {
        return Err(RingError::AvailUnreadable { addr });
    }
    let avail = q
        .avail_idx(mem, AtomicOrdering::Acquire)
        .map_err(RingError::Queue)?
        .0;
    let (next, size) = (q.next_avail(), q.size());
    if avail.wrapping_sub(next) > size {
        return Err(RingError::AvailAhead { avail, next, size });
    }
    Ok(())
}

/// Chains popped per read of the avail index (`pop_chains`).
pub(super) const POP_BATCH: usize = 32;

/// Pop up to `out.len()` chains (into its first slots; returns how many)
/// with one read of the avail index (virtio-queue's `iter`, which returns
/// errors where `pop_descriptor_chain` logs them; popping one chain per
/// `iter` reads the index for each).
pub(super) fn pop_chains<'m, M>(
    q: &mut Queue,
    mem: &'m M,
    out: &mut [Option<DescriptorChain<&'m M>>],
) -> Result<usize, RingError>
where
    M: vm_memory::GuestMemory,
{
    let mut it = q.iter(mem).map_err(RingError::Queue)?;
    let mut n = 0;
    for slot in out.iter_mut() {
        let Some(chain) = it.next() else {
            break;
        };
        *slot = Some(chain);
        n += 1;
    }
    Ok(n)
}

/// While the device polls the requestq, ask the driver not to notify it:
/// with EVENT_IDX, an avail_event one behind what was consumed (the driver
/// kicks only when its avail index passes it); without, VRING_USED_F_NO_NOTIFY.
pub(super) fn suppress_kicks<M: vm_memory::GuestMemory>(vring: &VringRwLock, mem: &M) {
    use vm_memory::{Bytes, GuestAddress};
    let mut vr = vring.get_mut();
    let q = vr.get_queue_mut();
    if !q.ready() {
        // Stopped: no more writes to the ring.
        return;
    }
    if !q.event_idx_enabled() {
        let _ = q.disable_notification(mem);
        return;
    }
    // avail_event follows the used ring: flags, idx, ring[size].
    let at = q.used_ring() + 4 + 8 * u64::from(q.size());
    let behind = q.next_avail().wrapping_sub(1);
    let _ = mem.store(behind.to_le(), GuestAddress(at), AtomicOrdering::Relaxed);
}

/// The used entries of one pass over a ring, written straight into the
/// used ring (not through virtio-queue's generic write) and published with
/// one index store per `flush` (the eventq: at the end of the pass; the
/// requestq: after each batch of chains popped); whether to interrupt is
/// decided from the pass's first and last index by the rule
/// `Queue::needs_notification` applies (its own count of entries added
/// stays 0: these rings never go through `Queue::add_used`).
pub(super) struct UsedWriter<'m> {
    start: u16,
    next: u16,
    /// The used index the driver was last shown.
    published: u16,
    /// The ring's elements, looked up once per pass: each entry is then
    /// one 8-byte store, not a region lookup and a slice copy (~50
    /// instructions an entry: spec-notes/benchmarks.md). None when they do
    /// not lie in one region (no ring virtio-queue accepted, unless the
    /// memory changed under it): each entry is then written on its own.
    elements: Option<VolatileSlice<'m>>,
}

impl<'m> UsedWriter<'m> {
    pub(super) fn new<M: OneRegion>(q: &Queue, mem: &'m M) -> Self {
        let n = q.next_used();
        let elements = GuestAddress(q.used_ring())
            .checked_add(4)
            .and_then(|at| mem.slice_in_one_region(at, 8 * usize::from(q.size())));
        UsedWriter {
            start: n,
            next: n,
            published: n,
            elements,
        }
    }

    /// One used entry (`head` < the queue size, checked by the caller).
    pub(super) fn add<M: OneRegion>(
        &mut self,
        q: &Queue,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        let slot = self.next % q.size();
        let at = self.elements.as_ref().and_then(|e| {
            // Inside the slice: slot < size, the slice is 8 * size bytes.
            e.get_ref::<[u8; 8]>(8 * usize::from(slot)).ok()
        });
        match at {
            Some(r) => r.store(elem),
            None => write_one(q, mem, slot, &elem)?,
        }
        self.next = self.next.wrapping_add(1);
        Ok(())
    }

    /// Show the driver the entries added so far (the used index, Release:
    /// after them).
    pub(super) fn flush<M: vm_memory::GuestMemory>(
        &mut self,
        q: &mut Queue,
        mem: &M,
    ) -> Result<(), virtio_queue::Error> {
        if self.next != self.published {
            let idx = GuestAddress(q.used_ring())
                .checked_add(2)
                .ok_or(virtio_queue::Error::AddressOverflow)?;
            mem.store(self.next.to_le(), idx, AtomicOrdering::Release)
                .map_err(virtio_queue::Error::GuestMemory)?;
            q.set_next_used(self.next);
            self.published = self.next;
        }
        Ok(())
    }

    /// Publish the pass's entries and say whether the driver asked to be
    /// interrupted.
    pub(super) fn publish<M: vm_memory::GuestMemory>(
        &mut self,
        q: &mut Queue,
        mem: &M,
    ) -> Result<bool, virtio_queue::Error> {
        self.flush(q, mem)?;
        if !q.event_idx_enabled() {
            // As `needs_notification`: VRING_AVAIL_F_NO_INTERRUPT is not
            // looked at.
            return Ok(true);
        }
        // The entries and the index before the driver's used_event.
        std::sync::atomic::fence(AtomicOrdering::SeqCst);
        // used_event follows the avail ring: flags, idx, ring[size].
        let at = GuestAddress(q.avail_ring())
            .checked_add(4 + 2 * u64::from(q.size()))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let used_event = u16::from_le(
            mem.load::<u16>(at, AtomicOrdering::Relaxed)
                .map_err(virtio_queue::Error::GuestMemory)?,
        );
        // Interrupt when used_event lies in [start, next): the entries
        // of this pass passed it.
        let (new, old) = (self.next, self.start);
        Ok(new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old))
    }
}

/// One used entry written at its slot on its own (a ring not in one region).
fn write_one<M: OneRegion>(
    q: &Queue,
    mem: &M,
    slot: u16,
    elem: &[u8; 8],
) -> Result<(), virtio_queue::Error> {
    let slot = u64::from(slot);
    // flags, idx, then 8-byte elements.
    let addr = GuestAddress(q.used_ring())
        .checked_add(4 + 8 * slot)
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    match mem.slice_in_one_region(addr, elem.len()) {
        Some(slice) => slice.copy_from(elem),
        None => mem
            .write_slice(elem, addr)
            .map_err(virtio_queue::Error::GuestMemory)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const SIZE: u16 = 16;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn queue(event_idx: bool) -> Queue {
        let mut q = Queue::new(SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(0x1000)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    fn set_used_event(mem: &GuestMemoryMmap, v: u16) {
        let at = GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE));
        mem.write_obj(v.to_le(), at).unwrap();
    }

    /// The pass's entries land where `Queue::add_used` puts them (the used
    /// index too, after a flush in the middle of the pass), and the
    /// interrupt is decided as `needs_notification` decides it after the
    /// same entries, for every used_event around the pass and across the
    /// index's wrap, past the ring's end and for more than a ring's worth
    /// in one pass; for a used ring in one region (stored through the
    /// slice found once) and split across two (written one by one).
    #[test]
    fn a_pass_written_directly_matches_virtio_queue() {
        let one = [(GuestAddress(0), 0x10000)];
        // The boundary falls inside the used ring's elements.
        const AT: usize = 0x3040;
        let split = [
            (GuestAddress(0), AT),
            (GuestAddress(AT as u64), 0x10000 - AT),
        ];
        assert!(USED < AT as u64 && (AT as u64) < USED + 4 + 8 * u64::from(SIZE));
        for ranges in [&one[..], &split[..]] {
            pass_matches_virtio_queue(ranges);
        }
    }

    fn pass_matches_virtio_queue(ranges: &[(GuestAddress, usize)]) {
        let mem = GuestMemoryMmap::from_ranges(ranges).unwrap();
        let theirs_mem = GuestMemoryMmap::from_ranges(ranges).unwrap();
        for event_idx in [true, false] {
            for start in [0u16, 7, 65530] {
                for n in (0..5u16).chain([15, 16, 17, 40, 70, 130]) {
                    for ev in start.wrapping_sub(3)..start.wrapping_add(8) {
                        let (mut ours, mut theirs) = (queue(event_idx), queue(event_idx));
                        ours.set_next_used(start);
                        theirs.set_next_used(start);
                        set_used_event(&mem, ev);
                        set_used_event(&theirs_mem, ev);
                        let mut w = UsedWriter::new(&ours, &mem);
                        for i in 0..n {
                            let head = i % SIZE;
                            w.add(&ours, &mem, head, 48 + u32::from(i)).unwrap();
                            theirs
                                .add_used(&theirs_mem, head, 48 + u32::from(i))
                                .unwrap();
                            if i == 1 {
                                // The requestq flushes after each batch: the
                                // driver sees what virtio-queue shows it.
                                w.flush(&mut ours, &mem).unwrap();
                                let idx = GuestAddress(USED + 2);
                                let a: u16 = mem.read_obj(idx).unwrap();
                                let b: u16 = theirs_mem.read_obj(idx).unwrap();
                                assert_eq!(a, b, "event_idx {event_idx} start {start} n {n}");
                            }
                        }
                        let want = theirs.needs_notification(&theirs_mem).unwrap();
                        let got = w.publish(&mut ours, &mem).unwrap();
                        let what = format!("event_idx {event_idx} start {start} n {n} ev {ev}");
                        assert_eq!(got, want, "{what}");
                        assert_eq!(ours.next_used(), theirs.next_used(), "{what}");
                        // flags, idx and the entries written, byte for byte.
                        let len = 4 + 8 * usize::from(SIZE);
                        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
                        mem.read_slice(&mut a, GuestAddress(USED)).unwrap();
                        theirs_mem.read_slice(&mut b, GuestAddress(USED)).unwrap();
                        if n > 0 {
                            assert_eq!(a, b, "{what}");
                        }
                    }
                }
            }
        }
    }
}
