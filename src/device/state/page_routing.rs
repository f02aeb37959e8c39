// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Page requests in the state: which attachment handles a group, the
//! records it becomes, PAGE_RESP, and the kernel's responses written
//! before the host detaches what they answer (spec-notes/protocol.md 6.4, 6.8).

use super::*;

impl IommuState {
    /// Write the kernel's responses to the host's fault queue, up to 64 in
    /// one write. A group the kernel had completed itself (a detach raced
    /// the record) counts as the kernel's. (Called back only for responses
    /// not taken.)
    pub(crate) fn respond_host_faults(&mut self, rs: &[Response]) {
        let mut pairs = [page_response(0, 0); 64];
        for chunk in rs.chunks(pairs.len()) {
            for (p, r) in pairs.iter_mut().zip(chunk) {
                *p = page_response(r.cookie, r.code);
            }
            let pages = &mut self.pages;
            self.host
                .page_responses(&pairs[..chunk.len()], &mut |i, result| {
                    let r = &chunk[i];
                    match result {
                        Ok(true) => {}
                        Ok(false) => {
                            log::debug!(
                                "page response for cookie {}: the kernel had completed it",
                                r.cookie
                            );
                            pages.reclassify_as_kernel(r);
                        }
                        Err(e) => {
                            pages.counters.responses_failed += 1;
                            crate::log_limit::limited!(
                                log::Level::Warn,
                                "page response for cookie {}: {e}",
                                r.cookie
                            );
                        }
                    }
                });
        }
    }

    /// Write the kernel's responses now (before a host call that detaches
    /// or destroys what they answer); virtual ones stay for the glue.
    pub(super) fn respond_kernel_now(&mut self) {
        let mut batch = [NO_RESPONSE; 64];
        loop {
            let mut n = 0;
            while n < batch.len() {
                let Some(r) = self.pages.pop_response_of(SourceId::Kernel) else {
                    break;
                };
                batch[n] = r;
                n += 1;
            }
            if n == 0 {
                return;
            }
            self.respond_host_faults(&batch[..n]);
        }
    }

    /// The host's vIOMMU event queue, if any (the caller polls the handle).
    pub(crate) fn event_queue_reader(&self) -> Option<crate::iommufd_bridge::EventQueue> {
        self.host.event_queue_reader()
    }

    /// Does this endpoint exist?
    pub(crate) fn has_endpoint(&self, id: u32) -> bool {
        self.endpoints.contains_key(&id)
    }

    /// The host's fault queue, once made (the caller polls the handle).
    pub(crate) fn fault_queue_reader(&self) -> Option<std::fs::File> {
        self.host.fault_queue_reader()
    }

    /// PAGE_RESP: the driver answers one outstanding group.
    pub fn page_resp(&mut self, req: &PageResp) -> Result<(), RequestError> {
        // A group outstanding names a live endpoint (hot-unplug forgets its
        // groups): the endpoint map is asked only when none is.
        if let Err(e) = self
            .pages
            .driver_response(req.endpoint, req.pasid, req.group, req.code)
        {
            if !self.endpoints.contains_key(&req.endpoint) {
                return Err(RequestError::NoEndpoint(req.endpoint));
            }
            return Err(e.into());
        }
        // Written with the others of this request pass at its end
        // (`FaultRelay::flush`: one write() per 64, or the io_uring),
        // before the used ring's interrupt and before any detach of the
        // pass (which writes what is pending first).
        Ok(())
    }

    /// The table domain (with PAGE_REQUESTS) that handles a page request
    /// of `endpoint` at `pasid`: (attachment slot, domain).
    pub(super) fn page_request_handler(
        &self,
        endpoint: u32,
        pasid: Option<u32>,
    ) -> Option<(Option<u32>, u32)> {
        // At its PASID if attached there; else the default address space's
        // table (a guest-owned PASID table, as the kernel routes it).
        let slot = pasid.filter(|&p| self.pasids.contains_key(&(endpoint, p)));
        let domain = self.attached(endpoint, slot)?;
        match &self.domains.get(&domain)?.kind {
            DomainKind::Table(t) if t.page_requests => Some((slot, domain)),
            _ => None,
        }
    }

    /// Page-request records read from a source: each group (records up to
    /// one with LAST_PAGE, one cookie) is queued for the eventq as 48-byte
    /// records, or completed at once (spec-notes/protocol.md 6.8) when the driver did
    /// not negotiate F_PAGE_REQUEST, nothing handles it, or the bounds are
    /// hit. Virtual records name their endpoint in `dev_id`.
    pub fn accept_page_requests(
        &mut self,
        source: SourceId,
        recs: &[FaultRecord],
        acked: u64,
        fifo: &mut EventFifo,
        now: std::time::Instant,
    ) {
        // A burst usually comes from one device at one PASID: its endpoint
        // and handler are looked up once (nothing here changes them).
        let mut last: Option<RouteCache> = None;
        let mut start = 0;
        while start < recs.len() {
            let cookie = recs[start].cookie;
            // The group: same cookie, up to the record with LAST_PAGE.
            let mut end = start;
            while end + 1 < recs.len() && !recs[end].last() && recs[end + 1].cookie == cookie {
                end += 1;
            }
            let group = &recs[start..=end];
            start = end + 1;
            let first = group[0];
            if acked & features::PAGE_REQUEST == 0 {
                self.pages
                    .refuse(source, cookie, CODE_INVALID, Refusal::Unnegotiated);
                continue;
            }
            let pasid = first.pasid();
            let route = match last {
                Some(c) if c.dev_id == first.dev_id && c.pasid == pasid => c.route,
                _ => {
                    let route = match source {
                        SourceId::Virtual => Some(first.dev_id),
                        SourceId::Kernel => self.host.endpoint_of_dev(first.dev_id),
                    }
                    .filter(|e| self.endpoints.contains_key(e))
                    .map(|endpoint| Route {
                        endpoint,
                        handler: self.page_request_handler(endpoint, pasid),
                    });
                    last = Some(RouteCache {
                        dev_id: first.dev_id,
                        pasid,
                        route,
                    });
                    route
                }
            };
            let Some(Route { endpoint, handler }) = route else {
                self.pages
                    .refuse(source, cookie, CODE_INVALID, Refusal::NoHandler);
                continue;
            };
            let Some((slot, domain)) = handler else {
                self.pages
                    .refuse(source, cookie, CODE_INVALID, Refusal::NoHandler);
                continue;
            };
            if !fifo.has_room(group.len()) {
                self.pages
                    .refuse(source, cookie, CODE_FAILURE, Refusal::Full);
                continue;
            }
            let Some(id) = self
                .pages
                .raise(endpoint, pasid, slot, domain, source, cookie, now)
            else {
                continue;
            };
            for (i, r) in group.iter().enumerate() {
                let mut access = 0;
                for (perm, flag) in [
                    (PERM_READ, FLAG_READ),
                    (PERM_WRITE, FLAG_WRITE),
                    (PERM_EXEC, FLAG_EXEC),
                    (PERM_PRIV, FLAG_PRIV),
                ] {
                    if r.perm & perm != 0 {
                        access |= flag;
                    }
                }
                fifo.push(EventRecord::PageRequest {
                    endpoint,
                    pasid,
                    group: id,
                    address: r.addr,
                    access,
                    last: i + 1 == group.len(),
                });
            }
        }
    }
}

/// Where the last group of a read was routed: its source's device id and
/// PASID, and the route (None: no endpoint of ours).
#[derive(Clone, Copy)]
struct RouteCache {
    dev_id: u32,
    pasid: Option<u32>,
    route: Option<Route>,
}

/// An endpoint of ours and the attachment that handles its page requests
/// (`page_request_handler`: slot and table domain; None: none does).
#[derive(Clone, Copy)]
struct Route {
    endpoint: u32,
    handler: Option<(Option<u32>, u32)>,
}
