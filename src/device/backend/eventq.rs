// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The eventq worker's side of the device: queued records (fault records,
//! page requests) are written into the driver's buffers in posting order.

use std::io;
use std::sync::atomic::Ordering as AtomicOrdering;

use log::{debug, Level};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::DescriptorChain;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use super::ring::{check_avail, pop_chains, UsedWriter};
use super::IommuBackend;
use crate::device::chain::{gather, scatter_gathered, write_single, Gathered};
use crate::device::mem_view::CachedMemory;
use crate::fault_queue::{EventRecord, MAX_RECORD_LEN};
use crate::log_limit::limited;

/// Event buffers popped at once: a burst of records.
const POP_AHEAD: usize = 64;

impl IommuBackend {
    /// Move queued records into the driver's eventq buffers, in order.
    /// `kicked`: the driver kicked the eventq (it may have mended a ring
    /// found broken before; until it does, new records do not look at it).
    pub(super) fn process_eventq(&self, vring: &VringRwLock, kicked: bool) -> io::Result<()> {
        if kicked {
            self.eventq_stopped.store(false, AtomicOrdering::Release);
        } else if self.eventq_stopped.load(AtomicOrdering::Acquire) {
            return Ok(());
        }
        let mut vr = vring.get_mut();
        if !vr.is_enabled() || !vr.get_queue().ready() {
            return Ok(());
        }
        // Session before FIFO, as everywhere.
        let mut session = self.session();
        let s = &mut *session;
        let mem = s.mem.memory();
        // Ring and buffer accesses through the view (one region lookup per
        // pass, not per access: device/mem_view.rs).
        let view = CachedMemory::new(&mem);
        let mut fifo = self.relay.fifo();
        let mut buf = [0u8; MAX_RECORD_LEN];
        let mut g = Gathered::new();
        let size = vr.get_queue().size();
        let mut broken = None;
        // Chains popped ahead, up to a burst of records (one read of the
        // avail index for them all, not one per record); any left unused
        // (a group removed on the way) go back to the ring at the end.
        let mut popped: [Option<DescriptorChain<&CachedMemory>>; POP_AHEAD] =
            std::array::from_fn(|_| None);
        let (mut next, mut end) = (0, 0);
        let mut used_ring = UsedWriter::new(vr.get_queue(), &view);
        let result = (|| -> Result<(), virtio_queue::Error> {
            let mut popped_since_enable = true;
            // The avail ring is checked once per pass and again after it
            // ran dry (its address cannot change during the pass: we hold
            // the vring; an index the driver moves too far meanwhile is
            // caught by the pop).
            let mut checked = false;
            while let Some(rec) = fifo.front().copied() {
                let len = rec.encode(&mut buf);
                if next == end {
                    let check = if checked {
                        Ok(())
                    } else {
                        checked = true;
                        check_avail(vr.get_queue(), &view)
                    };
                    let want = fifo.len().min(POP_AHEAD);
                    let got = check
                        .and_then(|()| pop_chains(vr.get_queue_mut(), &view, &mut popped[..want]));
                    (next, end) = (0, 0);
                    match got {
                        Ok(n) => end = n,
                        Err(e) => {
                            broken = Some(e);
                            return Ok(());
                        }
                    }
                }
                let Some(chain) = popped.get_mut(next).and_then(Option::take) else {
                    // Out of buffers: ask to be kicked when the driver posts
                    // more. Retry once if some arrived meanwhile; never spin
                    // on a broken avail ring.
                    if popped_since_enable && vr.enable_notification()? {
                        popped_since_enable = false;
                        checked = false;
                        continue;
                    }
                    return Ok(());
                };
                next += 1;
                popped_since_enable = true;
                if chain.head_index() >= size {
                    debug!("eventq: head index {} beyond the queue", chain.head_index());
                    continue;
                }
                // One buffer large enough (the usual case) is written at
                // once; any other shape is gathered first.
                let fast = write_single(&chain, &buf[..len]);
                let gathered = match fast {
                    Some(_) => Ok(()),
                    None => gather(&chain, &mut g),
                };
                let used = match gathered {
                    Ok(()) if fast.is_some() || g.writable_len >= len as u64 => {
                        let written = match fast {
                            Some(w) => w,
                            None => scatter_gathered(&chain, &g, &buf[..len]),
                        };
                        match written {
                            Ok(n) => {
                                fifo.delivered();
                                if let EventRecord::PageRequest { last: true, .. } = rec {
                                    let key = rec.group().expect("a page request");
                                    s.iommu.pages.mark_delivered(&key);
                                }
                                n
                            }
                            Err(e) => {
                                debug!("event buffer not written: {e}");
                                0
                            }
                        }
                    }
                    Ok(()) => {
                        debug!(
                            "eventq buffer of {} bytes is too small for a {len}-byte record",
                            g.writable_len
                        );
                        if let Some(key) = rec.group() {
                            // A driver that takes page requests posts 48-byte
                            // buffers; waiting would stall the device.
                            s.iommu.pages.small_buffer(&key);
                            fifo.remove_group(&key);
                        }
                        0
                    }
                    Err(e) => {
                        debug!("unusable eventq buffer: {e}");
                        0
                    }
                };
                // At most one event record (a few dozen bytes) was written.
                #[allow(clippy::cast_possible_truncation)]
                let used = used as u32;
                used_ring.add(vr.get_queue(), &view, chain.head_index(), used)?;
            }
            Ok(())
        })();
        // Chains popped ahead and not used go back: the driver's buffers
        // wait for the next records.
        let unused = popped[next..end].iter().filter(|c| c.is_some()).count();
        if unused > 0 {
            let q = vr.get_queue_mut();
            // At most POP_AHEAD: fits the ring's u16 index.
            #[allow(clippy::cast_possible_truncation)]
            let back = q.next_avail().wrapping_sub(unused as u16);
            q.set_next_avail(back);
        }
        if let Some(e) = &broken {
            s.stats.device.eventq_bad_avail += 1;
            self.eventq_stopped.store(true, AtomicOrdering::Release);
            let _ = vr.enable_notification();
            limited!(Level::Warn, "eventq: {e}; records wait for the next kick");
        }
        drop(fifo);
        self.relay.flush(s);
        drop(session);
        if let Err(e) = result {
            debug!("eventq ring unusable: {e}");
        }
        // What the pass added is published whatever stopped it.
        match used_ring.publish(vr.get_queue_mut(), &view) {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = vr.signal_used_queue() {
                    debug!("cannot signal the driver: {e}");
                }
            }
            Err(e) => {
                debug!("eventq used ring unusable: {e}");
                // The safe side, as the requestq: interrupt the driver.
                let _ = vr.signal_used_queue();
            }
        }
        Ok(())
    }
}
