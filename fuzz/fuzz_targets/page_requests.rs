// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Page requests and PAGE_RESP, exactly once (spec-notes/protocol.md 6.8): arbitrary
//! sequences of table attaches and detaches, records from both sources
//! (groups of several records, PASIDs, unknown devices), deliveries, small
//! buffers, driver answers (right, wrong, repeated), timeouts and resets,
//! against the device state. After every step the state's invariants hold;
//! every cookie is completed at most once; at the end every raised cookie
//! was completed exactly once (answered to its source, or left to the
//! kernel by a detach).
//!
//! Input: a stream of operations, one byte each plus arguments.

#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use iommu_fuzz::{small_limits, Input, ENDPOINTS};
use libfuzzer_sys::fuzz_target;
use vhost_device_iommu::device::config::{features, DeviceConfig};
use vhost_device_iommu::device::request::Detach;
use vhost_device_iommu::device::state::IommuState;
use vhost_device_iommu::fault_queue::pages::{
    FaultRecord, SourceId, PGFAULT_F_LAST_PAGE, PGFAULT_F_PASID_VALID,
};
use vhost_device_iommu::fault_queue::{purge_completed, EventFifo, EventRecord};
use vhost_device_iommu::iommufd_bridge::{
    HostIommu, HostMapping, IovaHole, PageResponse, RamRegion, Result, Target,
};
use vhost_device_iommu::wire::{AT_F_PAGE_REQUESTS, AT_F_PASID_VALID};
use vhost_device_iommu::nested::request::{decode_attach_table, decode_page_resp, encode};

const MAX_OPS: usize = 512;

/// A host that only takes page responses (its endpoints are the virtual
/// ones, so nothing else reaches it): the kernel's side of the ledger.
#[derive(Debug)]
struct Recorder(Arc<Mutex<Vec<u32>>>);

impl HostIommu for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn owns(&self, _: u32) -> bool {
        false
    }
    fn backs(&self, _: u32) -> bool {
        false
    }
    fn set_guest_ram(&mut self, _: &[RamRegion]) -> Result<()> {
        Ok(())
    }
    fn attach(
        &mut self,
        _: u32,
        _: Target,
        _: &mut dyn Iterator<Item = HostMapping>,
    ) -> Result<()> {
        Ok(())
    }
    fn map(&mut self, _: u32, _: HostMapping) -> Result<()> {
        Ok(())
    }
    fn unmap(&mut self, _: u32, _: u64, _: u64) -> Result<()> {
        Ok(())
    }
    fn set_bypass(&mut self, _: bool) -> Result<()> {
        Ok(())
    }
    fn reset(&mut self, _: bool) {}
    fn reserved(&self, _: u32) -> Option<&[IovaHole]> {
        None
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn endpoint_of_dev(&self, dev_id: u32) -> Option<u32> {
        Some(dev_id)
    }
    fn page_response(&mut self, r: PageResponse) -> Result<bool> {
        self.0.lock().unwrap().push(r.cookie);
        Ok(true)
    }
}

/// What happened to each cookie of each source.
#[derive(Default)]
struct Ledger {
    /// Completions seen (responses or the kernel's own).
    done: HashMap<(SourceId, u32), u32>,
    /// Cookies fed to the state.
    fed: Vec<(SourceId, u32)>,
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let acked = if input.u8() & 1 == 0 {
        features::DEVICE_FEATURES | features::ATTACH_TABLE | features::PAGE_REQUEST
    } else {
        // A driver without F_PAGE_REQUEST: everything refused at once.
        features::DEVICE_FEATURES | features::ATTACH_TABLE
    };
    let limits = small_limits(1 + usize::from(input.u8() % 16));
    let mut s = IommuState::new(DeviceConfig::default(), limits, &ENDPOINTS);
    let kernel = Arc::new(Mutex::new(Vec::new()));
    s.set_host(Box::new(Recorder(kernel.clone())));
    let mut fifo = EventFifo::new(limits.max_events);
    let mut ledger = Ledger::default();
    let mut next_cookie = 1u32;
    // A virtual clock: inputs choose how much time passes.
    let mut clock = std::time::Instant::now();
    let before = s.pages.counters.completed_by_kernel;
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let ep = ENDPOINTS[usize::from(input.u8()) % ENDPOINTS.len()];
        match input.u8() % 9 {
            0 => {
                // ATTACH_TABLE, PAGE_REQUESTS or not, at a PASID or not.
                let domain = u32::from(input.u8() % 4);
                let mut flags = 0;
                if input.u8() & 1 == 0 {
                    flags |= AT_F_PAGE_REQUESTS;
                }
                let pasid = u32::from(input.u8() % 3);
                if pasid != 0 {
                    flags |= AT_F_PASID_VALID;
                }
                let b = encode::attach_vtd(domain, ep, flags, pasid, 0x1000, 48);
                if let Ok(a) = decode_attach_table(&b) {
                    let _ = s.attach_table(&a, acked);
                }
            }
            1 => {
                let domain = u32::from(input.u8() % 4);
                let _ = s.detach(&Detach {
                    domain,
                    endpoint: ep,
                });
            }
            2 | 3 => {
                // A group of 1..4 records from one source.
                let source = if input.u8() & 1 == 0 {
                    SourceId::Virtual
                } else {
                    SourceId::Kernel
                };
                let n = 1 + usize::from(input.u8() % 4);
                let pasid = u32::from(input.u8() % 3);
                let cookie = next_cookie;
                next_cookie += 1;
                let recs: Vec<FaultRecord> = (0..n)
                    .map(|i| FaultRecord {
                        flags: if i + 1 == n { PGFAULT_F_LAST_PAGE } else { 0 }
                            | if pasid != 0 { PGFAULT_F_PASID_VALID } else { 0 },
                        dev_id: ep,
                        pasid,
                        perm: u32::from(input.u8() & 0xf),
                        addr: u64::from(input.u16()) << 12,
                        cookie,
                        ..Default::default()
                    })
                    .collect();
                ledger.fed.push((source, cookie));
                s.accept_page_requests(source, &recs, acked, &mut fifo, clock);
            }
            4 => {
                // The driver posts a buffer: 48 bytes, or too small.
                if let Some(rec) = fifo.front().copied() {
                    if input.u8() % 4 == 0 {
                        if let Some(key) = rec.group() {
                            s.pages.small_buffer(&key);
                            fifo.remove_group(&key);
                        } else {
                            // A fault record waits for a bigger buffer.
                        }
                    } else {
                        fifo.delivered();
                        if let EventRecord::PageRequest { last: true, .. } = rec {
                            s.pages.mark_delivered(&rec.group().unwrap());
                        }
                    }
                }
            }
            5 | 6 => {
                // PAGE_RESP, right or wrong.
                let pasid = match input.u8() % 3 {
                    0 => None,
                    p => Some(u32::from(p)),
                };
                let group = u16::from(input.u8() % 8);
                let code = u16::from(input.u8() % 4);
                let b = encode::page_resp(ep, pasid, group, code);
                if let Ok(p) = decode_page_resp(&b) {
                    let _ = s.page_resp(&p);
                }
            }
            7 if input.u8() % 2 == 0 => {
                // A virtual dma gives up.
                let c = 1 + (input.u32() % next_cookie.max(1));
                s.pages.time_out(SourceId::Virtual, c);
            }
            7 => {
                // Time passes: groups the driver left unanswered expire.
                clock += std::time::Duration::from_millis(u64::from(input.u8()));
                s.pages.expire(clock);
            }
            _ => {
                if input.u8() % 8 == 0 {
                    s.reset();
                }
            }
        }
        // Completions so far: responses to their sources (the kernel's are
        // written by the state at once), the kernel's own are counted.
        collect(&mut s, &kernel, &mut ledger);
        purge_completed(&mut s.pages, &mut fifo);
        if let Err(e) = s.check_invariants() {
            panic!("invariant broken: {e}");
        }
        for (c, n) in &ledger.done {
            assert!(*n <= 1, "cookie {c:?} completed {n} times");
        }
    }
    // The end: every cookie still outstanding is completed by a reset.
    s.reset();
    collect(&mut s, &kernel, &mut ledger);
    let c = s.pages.counters;
    assert_eq!(s.pages.outstanding(), 0);
    assert_eq!(
        c.raised,
        ledger.fed.len() as u64,
        "every group counted once"
    );
    let responded = ledger.done.values().map(|&n| u64::from(n)).sum::<u64>();
    assert_eq!(
        responded + c.completed_by_kernel - before,
        c.raised,
        "each group: one response or the kernel's own completion"
    );
    for (c, n) in &ledger.done {
        assert!(*n == 1, "cookie {c:?} completed {n} times");
    }
});

fn collect(s: &mut IommuState, kernel: &Arc<Mutex<Vec<u32>>>, ledger: &mut Ledger) {
    while let Some(r) = s.pages.pop_response() {
        *ledger.done.entry((r.source, r.cookie)).or_default() += 1;
    }
    for c in kernel.lock().unwrap().drain(..) {
        *ledger.done.entry((SourceId::Kernel, c)).or_default() += 1;
    }
}
