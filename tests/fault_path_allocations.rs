// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The page-request hot path allocates nothing per fault: records accepted
//! from a source, queued for the eventq, delivered, answered with
//! PAGE_RESP and the response taken for the source, a thousand times, with
//! a counting global allocator watching (this test binary only). It counts
//! only this test's thread: libtest's own thread allocates while the test
//! starts, and on a loaded machine that overlapped the measured loop.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use vhost_device_iommu::device::config::{features, DeviceConfig, Limits};
use vhost_device_iommu::device::state::IommuState;
use vhost_device_iommu::fault_queue::pages::{
    FaultRecord, SourceId, PERM_READ, PGFAULT_F_LAST_PAGE,
};
use vhost_device_iommu::fault_queue::EventFifo;
use vhost_device_iommu::nested::request::{decode_attach_table, decode_page_resp, encode};
use vhost_device_iommu::wire::AT_F_PAGE_REQUESTS;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static WATCHED: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    // try_with: the slot may be gone while a thread exits.
    if WATCHED.try_with(Cell::get).unwrap_or(false) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn accepting_delivering_and_answering_a_fault_allocates_nothing() {
    const EP: u32 = 7;
    WATCHED.with(|w| w.set(true));
    let acked = features::DEVICE_FEATURES | features::ATTACH_TABLE | features::PAGE_REQUEST;
    let mut s = IommuState::new(DeviceConfig::default(), Limits::default(), &[EP]);
    let a = encode::attach_vtd(1, EP, AT_F_PAGE_REQUESTS, 0, 0x1000, 48);
    s.attach_table(&decode_attach_table(&a).unwrap(), acked)
        .unwrap();
    let mut fifo = EventFifo::new(1024);
    let mut round = |i: u32| {
        let rec = FaultRecord {
            flags: PGFAULT_F_LAST_PAGE,
            dev_id: EP,
            perm: PERM_READ,
            addr: 0x4000,
            cookie: i + 1,
            ..Default::default()
        };
        s.accept_page_requests(
            SourceId::Virtual,
            &[rec],
            acked,
            &mut fifo,
            std::time::Instant::now(),
        );
        let r = *fifo.front().expect("queued");
        fifo.delivered();
        let key = r.group().expect("a page request");
        s.pages.mark_delivered(&key);
        let resp = encode::page_resp(EP, None, key.group, 0);
        s.page_resp(&decode_page_resp(&resp).unwrap()).unwrap();
        let out = s.pages.pop_response().expect("a response");
        assert_eq!(out.cookie, i + 1);
    };
    // Warm up: whatever the first fault makes lazily (until 2026-12-06 the
    // endpoint's group-id counter; group ids are slab slots now).
    round(0);
    let before = ALLOCS.load(Ordering::Relaxed);
    assert!(before > 0, "the counter counts (set-up allocated)");
    for i in 1..=1000 {
        round(i);
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    assert_eq!(allocs, 0, "allocations in 1000 faults");
    assert_eq!(s.pages.counters.completed_by_driver, 1001);
    assert_eq!(s.check_invariants(), Ok(()));
}
