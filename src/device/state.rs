//! The virtio-iommu state of one guest: endpoints, domains, mappings, and
//! the pure transitions that requests make on it.
//!
//! Every method is a function of (state, request) -> (state, result); a
//! refused request leaves the state exactly as it was.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};

use crate::device::config::{features, DeviceConfig, Limits};
use crate::device::error::RequestError;
use crate::device::host_port::{host_mapping, page_response, reserved_region};
use crate::device::request::{Attach, Detach, Map, Unmap, ATTACH_F_BYPASS, MAP_F_MMIO};
use crate::device::request::{MAP_F_READ, MAP_F_WRITE};
use crate::fault_queue::pages::{
    FaultRecord, PageRequests, Refusal, Response, SourceId, CODE_FAILURE, CODE_INVALID,
    NO_RESPONSE, PERM_EXEC, PERM_PRIV, PERM_READ, PERM_WRITE,
};
use crate::fault_queue::{EventFifo, EventRecord, FLAG_EXEC, FLAG_PRIV, FLAG_READ, FLAG_WRITE};
use crate::iommufd_bridge::software::SoftwareIommu;
use crate::iommufd_bridge::{BridgeError, HostIommu, RamRegion, Target};
use crate::nested::request::PageResp;
use crate::nested::{AttachTable, Invalidate, TableCaps, TableDesc};

/// x86's MSI doorbell window, reported as a RESV_MEM MSI region and never
/// mappable (spec-notes/protocol.md 6.6); the host port's, so both agree.
pub use crate::iommufd_bridge::{MSI_END, MSI_START};

pub const RESV_MEM_T_RESERVED: u8 = 0;
pub const RESV_MEM_T_MSI: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservedRegion {
    pub start: u64,
    pub end: u64,
    pub subtype: u8,
}

/// One MAP: indivisible until an UNMAP covers it whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub end: u64,
    pub phys: u64,
    pub flags: u32,
}

#[derive(Debug, Default)]
pub enum DomainKind {
    /// MAP/UNMAP domain: mappings keyed by virt_start (inclusive ends).
    Map(BTreeMap<u64, Mapping>),
    #[default]
    Bypass,
    /// A guest-owned table (ATTACH_TABLE).
    Table(TableDomain),
}

/// The table a table domain was created with; every endpoint that joins
/// must name the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableDomain {
    pub table: TableDesc,
    pub page_requests: bool,
}

#[derive(Debug)]
pub struct Domain {
    pub kind: DomainKind,
    /// Number of attachments (endpoints, and endpoint PASIDs); the domain
    /// dies with the last one.
    pub endpoints: usize,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Endpoint {
    pub domain: Option<u32>,
}

/// What a virtual endpoint's DMA resolves to, before guest-RAM checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// Identity (bypass).
    Identity,
    /// Not attached and bypass off.
    Blocked,
    /// `len` bytes from `iova` translate to `gpa` (a prefix of the request).
    Mapped { gpa: u64, len: u64 },
    /// No mapping, or the mapping forbids the access.
    Miss,
    /// A guest table: walk it (the caller has guest memory). A miss may
    /// become a page request when the table was attached with PAGE_REQUESTS.
    Walk {
        pgtbl: u64,
        addr_width: u32,
        page_requests: bool,
    },
}

#[derive(Debug)]
pub struct IommuState {
    pub config: DeviceConfig,
    pub limits: Limits,
    /// Live bypass byte (config offset 36).
    pub bypass: bool,
    endpoints: HashMap<u32, Endpoint>,
    domains: HashMap<u32, Domain>,
    /// Mappings of all MAP/UNMAP domains together (bounded by
    /// `limits.max_total_mappings`; kept exact on every change).
    mapping_total: usize,
    /// (endpoint, PASID) -> domain, for tables attached at a PASID.
    pasids: BTreeMap<(u32, u32), u32>,
    reserved: Vec<ReservedRegion>,
    /// RESV_MEM regions of host endpoints: the host's IOVA holes, converted
    /// once when the host is set (they never change after).
    host_reserved: HashMap<u32, Vec<ReservedRegion>>,
    /// Keeps the host in step: called after a request is validated and
    /// before it is committed, so a host refusal changes nothing.
    host: Box<dyn HostIommu>,
    /// Outstanding page-request groups (spec-notes/protocol.md 6.8).
    pub pages: PageRequests,
}

/// The mappings of a MAP/UNMAP domain (a free function so that the host
/// can be called while they are borrowed).
fn map_domain(
    domains: &mut HashMap<u32, Domain>,
    domain: u32,
) -> Result<&mut BTreeMap<u64, Mapping>, RequestError> {
    match domains.get_mut(&domain).map(|d| &mut d.kind) {
        Some(DomainKind::Map(m)) => Ok(m),
        Some(DomainKind::Bypass) => Err(RequestError::BypassDomain(domain)),
        Some(DomainKind::Table(_)) => Err(RequestError::DomainKindMismatch(domain)),
        None => Err(RequestError::NoDomain(domain)),
    }
}

impl IommuState {
    pub fn new(config: DeviceConfig, limits: Limits, endpoint_ids: &[u32]) -> Self {
        IommuState {
            config,
            limits,
            bypass: config.boot_bypass,
            endpoints: endpoint_ids
                .iter()
                .map(|&id| (id, Endpoint::default()))
                .collect(),
            domains: HashMap::new(),
            mapping_total: 0,
            pasids: BTreeMap::new(),
            reserved: vec![ReservedRegion {
                start: MSI_START,
                end: MSI_END,
                subtype: RESV_MEM_T_MSI,
            }],
            host_reserved: HashMap::new(),
            host: Box::new(SoftwareIommu),
            pages: PageRequests::new(limits.max_page_requests)
                .with_timeout(limits.page_response_timeout),
        }
    }

    /// Serve host endpoints through `host` (iommufd) instead of software only.
    pub fn set_host(&mut self, mut host: Box<dyn HostIommu>) {
        // No guest yet: host devices are blocked until one brings its RAM.
        host.reset(false);
        self.host_reserved = self
            .endpoints
            .keys()
            .filter_map(|&id| {
                let holes = host.reserved(id)?;
                Some((id, holes.iter().map(reserved_region).collect()))
            })
            .collect();
        self.host = host;
    }

    pub fn host(&self) -> &dyn HostIommu {
        self.host.as_ref()
    }

    /// Is `endpoint` a host (VFIO, selftest) endpoint?
    pub fn is_host_endpoint(&self, endpoint: u32) -> bool {
        self.host.owns(endpoint)
    }

    /// The frontend's memory table changed.
    pub fn set_guest_ram(&mut self, regions: &[RamRegion]) -> Result<(), BridgeError> {
        // Host devices stay blocked between guests; the memory table is
        // where a guest begins, so unattached endpoints take its bypass now,
        // before RAM is mapped: some drivers (virtio-iommu on 6.12) refuse
        // an attach to an IOAS that already has mappings (EADDRINUSE).
        let attached = self.host.set_bypass(self.bypass);
        let mapped = self.host.set_guest_ram(regions);
        attached.and(mapped)
    }

    /// Every domain goes, every endpoint comes back unattached.
    fn forget_domains(&mut self) {
        // Every outstanding page request is completed by the device first,
        // before the host detaches anything.
        self.pages.complete_all(CODE_INVALID);
        self.respond_kernel_now();
        self.domains.clear();
        self.mapping_total = 0;
        self.pasids.clear();
        for ep in self.endpoints.values_mut() {
            ep.domain = None;
        }
    }

    /// A frontend connected (or is about to): state as at power-on, host
    /// devices blocked until its memory table arrives.
    pub fn begin_session(&mut self) {
        self.forget_domains();
        self.bypass = self.config.boot_bypass;
        self.host.reset(false);
    }

    /// The bypass byte was written.
    pub fn set_bypass(&mut self, on: bool) -> Result<(), BridgeError> {
        self.host.set_bypass(on)?;
        self.bypass = on;
        Ok(())
    }

    /// The frontend is gone: as system reset, and the host lets go of
    /// guest RAM and blocks its devices until the next guest.
    pub fn disconnect(&mut self) {
        self.forget_domains();
        self.bypass = self.config.boot_bypass;
        self.host.disconnect();
    }

    /// Device reset: every domain goes, endpoints come back unattached. The
    /// bypass byte keeps its value (spec: it survives device reset).
    pub fn reset(&mut self) {
        self.forget_domains();
        self.host.reset(self.bypass);
    }

    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    pub fn domain(&self, id: u32) -> Option<&Domain> {
        self.domains.get(&id)
    }

    pub fn endpoint(&self, id: u32) -> Option<&Endpoint> {
        self.endpoints.get(&id)
    }

    pub fn reserved_regions(&self, endpoint: u32) -> &[ReservedRegion] {
        self.host_reserved
            .get(&endpoint)
            .map_or(&self.reserved, Vec::as_slice)
    }

    pub fn mapping_count(&self, domain: u32) -> usize {
        match self.domains.get(&domain).map(|d| &d.kind) {
            Some(DomainKind::Map(m)) => m.len(),
            _ => 0,
        }
    }

    /// Mappings of all domains together.
    pub fn total_mappings(&self) -> usize {
        self.mapping_total
    }

    fn check_domain_range(&self, domain: u32) -> Result<(), RequestError> {
        if domain < self.config.domain_start || domain > self.config.domain_end {
            return Err(RequestError::DomainOutOfRange(domain));
        }
        Ok(())
    }

    pub fn attach(&mut self, req: &Attach, acked: u64) -> Result<(), RequestError> {
        let mut known = 0;
        if acked & features::BYPASS_CONFIG != 0 {
            known |= ATTACH_F_BYPASS;
        }
        if req.flags & !known != 0 {
            return Err(RequestError::UnknownFlags(req.flags & !known));
        }
        if req.reserved_nonzero {
            return Err(RequestError::ReservedNotZero);
        }
        let ep = *self
            .endpoints
            .get(&req.endpoint)
            .ok_or(RequestError::NoEndpoint(req.endpoint))?;
        self.check_domain_range(req.domain)?;
        let bypass = req.flags & ATTACH_F_BYPASS != 0;
        match self.domains.get(&req.domain) {
            Some(d) => {
                let same_kind = match d.kind {
                    DomainKind::Bypass => bypass,
                    DomainKind::Map(_) => !bypass,
                    DomainKind::Table(_) => false,
                };
                if !same_kind {
                    return Err(RequestError::DomainKindMismatch(req.domain));
                }
            }
            None => {
                // Moving the endpoint may free its old domain's slot.
                let frees_old = ep
                    .domain
                    .and_then(|old| self.domains.get(&old))
                    .is_some_and(|d| d.endpoints == 1);
                if self.domains.len() - usize::from(frees_old) >= self.limits.max_domains {
                    return Err(RequestError::TooManyDomains(self.limits.max_domains));
                }
            }
        }
        if ep.domain == Some(req.domain) {
            return Ok(());
        }
        if self.host.owns(req.endpoint) {
            let target = if bypass {
                Target::Identity
            } else {
                Target::Domain(req.domain)
            };
            let mut existing = self
                .domains
                .get(&req.domain)
                .and_then(|d| match &d.kind {
                    DomainKind::Map(m) => Some(m.iter().map(|(&s, m)| host_mapping(s, m))),
                    DomainKind::Bypass | DomainKind::Table(_) => None,
                })
                .into_iter()
                .flatten();
            self.host.attach(req.endpoint, target, &mut existing)?;
        }
        // An attached endpoint moves: detach first (ratified ATTACH; cloud-hypervisor 3fa02b34c).
        if let Some(old) = ep.domain {
            self.pages.attachment_gone(req.endpoint, None, old);
            self.release(req.endpoint, old);
        }
        let d = self.domains.entry(req.domain).or_insert_with(|| Domain {
            kind: if bypass {
                DomainKind::Bypass
            } else {
                DomainKind::Map(BTreeMap::new())
            },
            endpoints: 0,
        });
        d.endpoints += 1;
        self.endpoints.get_mut(&req.endpoint).unwrap().domain = Some(req.domain);
        Ok(())
    }

    /// Take `endpoint` out of `domain`; the domain dies with its last endpoint.
    fn release(&mut self, endpoint: u32, domain: u32) {
        self.drop_attachment(domain);
        if let Some(ep) = self.endpoints.get_mut(&endpoint) {
            ep.domain = None;
        }
    }

    /// One attachment of `domain` is gone; the last one takes the domain.
    fn drop_attachment(&mut self, domain: u32) {
        if let Some(d) = self.domains.get_mut(&domain) {
            d.endpoints -= 1;
            if d.endpoints == 0 {
                if let DomainKind::Map(m) = &d.kind {
                    self.mapping_total -= m.len();
                }
                self.domains.remove(&domain);
            }
        }
    }

    /// What ATTACH_TABLE can do on `endpoint` (None: no such endpoint).
    pub fn table_caps(&self, endpoint: u32) -> Option<TableCaps> {
        if !self.endpoints.contains_key(&endpoint) {
            return None;
        }
        Some(if self.host.owns(endpoint) {
            self.host.table_caps(endpoint)
        } else {
            TableCaps::virtual_endpoint()
        })
    }

    /// The domain `endpoint` (at `pasid`, or its default address space)
    /// is attached to.
    pub fn attached(&self, endpoint: u32, pasid: Option<u32>) -> Option<u32> {
        match pasid {
            None => self.endpoints.get(&endpoint)?.domain,
            Some(p) => self.pasids.get(&(endpoint, p)).copied(),
        }
    }

    pub fn pasid_count(&self) -> usize {
        self.pasids.len()
    }

    /// ATTACH_TABLE: create a table domain, or join one with the same table.
    pub fn attach_table(&mut self, req: &AttachTable, acked: u64) -> Result<(), RequestError> {
        let caps = self
            .table_caps(req.endpoint)
            .ok_or(RequestError::NoEndpoint(req.endpoint))?;
        self.check_domain_range(req.domain)?;
        if req.page_requests && acked & features::PAGE_REQUEST == 0 {
            return Err(RequestError::PageRequestsNotNegotiated);
        }
        let format = req.table.format();
        if !caps.formats.contains(&format) {
            return Err(RequestError::FormatUnsupported {
                endpoint: req.endpoint,
                format,
            });
        }
        if req.page_requests && !caps.page_requests {
            return Err(RequestError::NoPageRequests(req.endpoint));
        }
        if let Some(pasid) = req.pasid {
            if caps.pasid_bits == 0 {
                return Err(RequestError::NoPasid(req.endpoint));
            }
            if u64::from(pasid) >> caps.pasid_bits != 0 {
                return Err(RequestError::PasidOutOfRange {
                    endpoint: req.endpoint,
                    pasid,
                    bits: caps.pasid_bits,
                });
            }
        }
        let want = TableDomain {
            table: req.table,
            page_requests: req.page_requests,
        };
        let old = self.attached(req.endpoint, req.pasid);
        match self.domains.get(&req.domain).map(|d| &d.kind) {
            Some(DomainKind::Table(t)) if *t == want => {}
            Some(DomainKind::Table(_)) => return Err(RequestError::TableMismatch(req.domain)),
            Some(_) => return Err(RequestError::DomainKindMismatch(req.domain)),
            None => {
                let frees_old = old
                    .and_then(|o| self.domains.get(&o))
                    .is_some_and(|d| d.endpoints == 1);
                if self.domains.len() - usize::from(frees_old) >= self.limits.max_domains {
                    return Err(RequestError::TooManyDomains(self.limits.max_domains));
                }
            }
        }
        if old == Some(req.domain) {
            return Ok(());
        }
        if req.pasid.is_some() && old.is_none() && self.pasids.len() >= self.limits.max_pasids {
            return Err(RequestError::TooManyPasids(self.limits.max_pasids));
        }
        if self.host.owns(req.endpoint) {
            let target = Target::Table {
                domain: req.domain,
                table: req.table,
                page_requests: req.page_requests,
            };
            match req.pasid {
                None => self
                    .host
                    .attach(req.endpoint, target, &mut std::iter::empty())?,
                Some(p) => self.host.attach_pasid(req.endpoint, p, Some(target))?,
            }
        }
        // Moving: detach from the old domain first, as ATTACH does.
        if let Some(o) = old {
            self.pages.attachment_gone(req.endpoint, req.pasid, o);
            self.drop_attachment(o);
        }
        let d = self.domains.entry(req.domain).or_insert_with(|| Domain {
            kind: DomainKind::Table(want),
            endpoints: 0,
        });
        d.endpoints += 1;
        match req.pasid {
            None => self.endpoints.get_mut(&req.endpoint).unwrap().domain = Some(req.domain),
            Some(p) => {
                self.pasids.insert((req.endpoint, p), req.domain);
            }
        }
        Ok(())
    }

    /// Write a page response to the host's fault queue. A group the kernel
    /// had completed itself (a detach raced the record) counts as the
    /// kernel's.
    /// Write the kernel's responses, up to 64 in one write.
    pub fn respond_host_faults(&mut self, rs: &[Response]) {
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
    fn respond_kernel_now(&mut self) {
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
    pub fn event_queue_reader(&self) -> Option<crate::iommufd_bridge::EventQueue> {
        self.host.event_queue_reader()
    }

    /// Does this endpoint exist?
    pub fn has_endpoint(&self, id: u32) -> bool {
        self.endpoints.contains_key(&id)
    }

    /// The host's fault queue, once made (the caller polls the handle).
    pub fn fault_queue_reader(&self) -> Option<std::fs::File> {
        self.host.fault_queue_reader()
    }

    /// PAGE_RESP: the driver answers one outstanding group.
    pub fn page_resp(&mut self, req: &PageResp) -> Result<(), RequestError> {
        if !self.endpoints.contains_key(&req.endpoint) {
            return Err(RequestError::NoEndpoint(req.endpoint));
        }
        self.pages
            .driver_response(req.endpoint, req.pasid, req.group, req.code)?;
        // Written before the reply: OK means the response reached the host.
        self.respond_kernel_now();
        Ok(())
    }

    /// The table domain (with PAGE_REQUESTS) that handles a page request
    /// of `endpoint` at `pasid`: (attachment slot, domain).
    fn page_request_handler(
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
            let endpoint = match source {
                SourceId::Virtual => Some(first.dev_id),
                SourceId::Kernel => self.host.endpoint_of_dev(first.dev_id),
            }
            .filter(|e| self.endpoints.contains_key(e));
            if acked & features::PAGE_REQUEST == 0 {
                self.pages
                    .refuse(source, cookie, CODE_INVALID, Refusal::Unnegotiated);
                continue;
            }
            let Some(endpoint) = endpoint else {
                self.pages
                    .refuse(source, cookie, CODE_INVALID, Refusal::NoHandler);
                continue;
            };
            let pasid = first.pasid();
            let Some((slot, domain)) = self.page_request_handler(endpoint, pasid) else {
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

    /// May this (decoded) INVALIDATE wait to be sent to the host together
    /// with the ones that follow it? Only when it is valid and the host
    /// holds the domain's table.
    pub fn batchable_invalidate(&self, req: &Invalidate) -> bool {
        matches!(
            self.domains.get(&req.domain).map(|d| &d.kind),
            Some(DomainKind::Table(_))
        ) && self.host.backs(req.domain)
    }

    /// Consecutive INVALIDATEs of one domain that `batchable_invalidate`
    /// accepted: one host call for all. `Err` if the host refused the
    /// batch; the caller then sends them one by one for their statuses.
    pub fn invalidate_batch(
        &mut self,
        domain: u32,
        reqs: &[Invalidate],
    ) -> Result<(), RequestError> {
        self.host.invalidate(domain, reqs)?;
        Ok(())
    }

    /// INVALIDATE: only table domains have caches of guest tables. The
    /// software walker caches nothing, so for virtual endpoints there is
    /// nothing to drop; the host's caches are invalidated before we answer.
    pub fn invalidate(&mut self, req: &Invalidate) -> Result<(), RequestError> {
        match self.domains.get(&req.domain).map(|d| &d.kind) {
            Some(DomainKind::Table(_)) => {}
            Some(_) => return Err(RequestError::NotTableDomain(req.domain)),
            None => return Err(RequestError::NoDomain(req.domain)),
        }
        if self.host.backs(req.domain) {
            self.host
                .invalidate(req.domain, std::slice::from_ref(req))?;
        }
        Ok(())
    }

    pub fn detach(&mut self, req: &Detach) -> Result<(), RequestError> {
        let ep = self
            .endpoints
            .get(&req.endpoint)
            .ok_or(RequestError::NoEndpoint(req.endpoint))?;
        let rid = ep.domain == Some(req.domain);
        // A table domain may hold the endpoint at PASIDs too: all go.
        let pasids: Vec<u32> = self
            .pasids
            .range((req.endpoint, 0)..=(req.endpoint, u32::MAX))
            .filter(|(_, &d)| d == req.domain)
            .map(|(&(_, p), _)| p)
            .collect();
        if !rid && pasids.is_empty() {
            return Err(RequestError::NotAttached {
                endpoint: req.endpoint,
                domain: req.domain,
            });
        }
        let host = self.host.owns(req.endpoint);
        for &p in &pasids {
            if host {
                self.host.attach_pasid(req.endpoint, p, None)?;
            }
            self.pasids.remove(&(req.endpoint, p));
            self.pages
                .attachment_gone(req.endpoint, Some(p), req.domain);
            self.drop_attachment(req.domain);
        }
        if rid {
            if host {
                self.host
                    .attach(req.endpoint, Target::Unattached, &mut std::iter::empty())?;
            }
            self.pages.attachment_gone(req.endpoint, None, req.domain);
            self.release(req.endpoint, req.domain);
        }
        Ok(())
    }

    pub fn map(&mut self, req: &Map, acked: u64) -> Result<(), RequestError> {
        let mut known = MAP_F_READ | MAP_F_WRITE;
        if acked & features::MMIO != 0 {
            known |= MAP_F_MMIO;
        }
        if req.flags & !known != 0 {
            return Err(RequestError::UnknownFlags(req.flags & !known));
        }
        let (start, end) = (req.virt_start, req.virt_end);
        let limit = self.limits.max_mappings;
        let granule_mask = self.config.granule() - 1;
        let input = (self.config.input_start, self.config.input_end);
        let reserved_hit = self
            .reserved
            .iter()
            .any(|r| r.start <= end && start <= r.end);
        let mappings = map_domain(&mut self.domains, req.domain)?;
        if end < start {
            return Err(RequestError::EmptyRange { start, end });
        }
        // virt_end + 1 wraps to 0 for a mapping that ends at 2^64 - 1: aligned.
        for a in [start, end.wrapping_add(1), req.phys_start] {
            if a & granule_mask != 0 {
                return Err(RequestError::Misaligned(a));
            }
        }
        if start < input.0 || end > input.1 {
            return Err(RequestError::OutsideInputRange { start, end });
        }
        req.phys_start
            .checked_add(end - start)
            .ok_or(RequestError::PhysOverflow)?;
        if reserved_hit {
            return Err(RequestError::Reserved { start, end });
        }
        if let Some((&s, m)) = mappings.range(..=end).next_back() {
            if m.end >= start {
                return Err(RequestError::Overlap {
                    start,
                    end,
                    existing: s,
                });
            }
        }
        if mappings.len() >= limit {
            return Err(RequestError::TooManyMappings(limit));
        }
        if self.mapping_total >= self.limits.max_total_mappings {
            return Err(RequestError::TooManyTotalMappings(
                self.limits.max_total_mappings,
            ));
        }
        let m = Mapping {
            end,
            phys: req.phys_start,
            flags: req.flags,
        };
        if self.host.backs(req.domain) {
            self.host.map(req.domain, host_mapping(start, &m))?;
        }
        mappings.insert(start, m);
        self.mapping_total += 1;
        Ok(())
    }

    /// UNMAP: removes every mapping inside [virt_start, virt_end]; refuses
    /// with RANGE, removing nothing, if one would be split.
    pub fn unmap(&mut self, req: &Unmap) -> Result<usize, RequestError> {
        let backed = self.host.backs(req.domain);
        let mappings = map_domain(&mut self.domains, req.domain)?;
        let (start, end) = (req.virt_start, req.virt_end);
        if end < start {
            return Err(RequestError::EmptyRange { start, end });
        }
        // Fast path, what drivers send: exactly one whole mapping. Mappings
        // never overlap, so nothing else can be in the range or straddle it.
        if let Entry::Occupied(e) = mappings.entry(start) {
            if e.get().end == end {
                if backed {
                    self.host.unmap(req.domain, start, end)?;
                }
                e.remove();
                self.mapping_total -= 1;
                return Ok(1);
            }
        }
        // A mapping that begins before `start` and reaches into the range.
        if let Some((&s, m)) = mappings.range(..start).next_back() {
            if m.end >= start {
                return Err(RequestError::WouldSplit {
                    start: s,
                    end: m.end,
                });
            }
        }
        // The last mapping beginning inside the range must end inside it.
        if let Some((&s, m)) = mappings.range(start..=end).next_back() {
            if m.end > end {
                return Err(RequestError::WouldSplit {
                    start: s,
                    end: m.end,
                });
            }
        }
        if backed {
            // The host first: if it refuses, nothing is removed here (what it
            // did remove is tolerated as gone when the guest tries again).
            for (&s, m) in mappings.range(start..=end) {
                self.host.unmap(req.domain, s, m.end)?;
            }
        }
        let mut removed = 0;
        while let Some(&s) = mappings.range(start..=end).next().map(|(s, _)| s) {
            mappings.remove(&s);
            removed += 1;
        }
        self.mapping_total -= removed;
        Ok(removed)
    }

    /// PROBE: the endpoint must exist.
    pub fn probe(&self, endpoint: u32) -> Result<&[ReservedRegion], RequestError> {
        if !self.endpoints.contains_key(&endpoint) {
            return Err(RequestError::NoEndpoint(endpoint));
        }
        Ok(self.reserved_regions(endpoint))
    }

    /// How an access of `len` bytes at `iova` by `endpoint` translates, for
    /// the software model. Only the first piece is returned; the caller
    /// walks on from `iova + len` for the rest (mappings may be adjacent).
    pub fn translate(
        &self,
        endpoint: u32,
        pasid: Option<u32>,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<Translation, RequestError> {
        let ep = self
            .endpoints
            .get(&endpoint)
            .ok_or(RequestError::NoEndpoint(endpoint))?;
        let domain = match pasid {
            None => ep.domain,
            // Bypass covers requests without PASID only.
            Some(p) => match self.pasids.get(&(endpoint, p)) {
                Some(&d) => Some(d),
                None => return Ok(Translation::Blocked),
            },
        };
        let Some(domain) = domain else {
            return Ok(if self.bypass {
                Translation::Identity
            } else {
                Translation::Blocked
            });
        };
        let Some(d) = self.domains.get(&domain) else {
            return Ok(Translation::Blocked);
        };
        let mappings = match &d.kind {
            DomainKind::Map(m) => m,
            DomainKind::Bypass => return Ok(Translation::Identity),
            DomainKind::Table(t) => {
                return Ok(match t.table {
                    TableDesc::IntelVtd {
                        pgtbl, addr_width, ..
                    } => Translation::Walk {
                        pgtbl,
                        addr_width,
                        page_requests: t.page_requests,
                    },
                    // Other formats never reach a virtual endpoint.
                    _ => Translation::Blocked,
                });
            }
        };
        let Some((&s, m)) = mappings.range(..=iova).next_back() else {
            return Ok(Translation::Miss);
        };
        if m.end < iova {
            return Ok(Translation::Miss);
        }
        let need = if write { MAP_F_WRITE } else { MAP_F_READ };
        // WRITE implies READ where write-only mappings are impossible: we can
        // do write-only, so permissions are taken literally.
        if m.flags & need == 0 {
            return Ok(Translation::Miss);
        }
        let off = iova - s;
        // Bytes left in this mapping from iova: (end - iova) + 1, saturating
        // for a mapping that ends at 2^64 - 1.
        let avail = (m.end - iova).saturating_add(1);
        Ok(Translation::Mapped {
            gpa: m.phys + off,
            len: avail.min(len),
        })
    }

    /// Check the structural invariants every transition must keep; `Err`
    /// names the first one broken. For fuzzing and tests: it walks all state.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.domains.len() > self.limits.max_domains {
            return Err(format!(
                "{} domains, limit {}",
                self.domains.len(),
                self.limits.max_domains
            ));
        }
        let mut attached: HashMap<u32, usize> = HashMap::new();
        for (&ep, e) in &self.endpoints {
            if let Some(d) = e.domain {
                if !self.domains.contains_key(&d) {
                    return Err(format!("endpoint {ep} points at missing domain {d}"));
                }
                *attached.entry(d).or_default() += 1;
            }
        }
        for (&(ep, p), &d) in &self.pasids {
            if !self.domains.contains_key(&d) {
                return Err(format!(
                    "endpoint {ep} pasid {p} points at missing domain {d}"
                ));
            }
            if !matches!(self.domains[&d].kind, DomainKind::Table(_)) {
                return Err(format!(
                    "endpoint {ep} pasid {p} is in non-table domain {d}"
                ));
            }
            *attached.entry(d).or_default() += 1;
        }
        self.pages.check_invariants()?;
        if self.pasids.len() > self.limits.max_pasids {
            return Err(format!(
                "{} PASID attachments, limit {}",
                self.pasids.len(),
                self.limits.max_pasids
            ));
        }
        for (&id, d) in &self.domains {
            let n = attached.get(&id).copied().unwrap_or(0);
            if d.endpoints == 0 || d.endpoints != n {
                return Err(format!(
                    "domain {id} counts {} endpoints, {n} point at it",
                    d.endpoints
                ));
            }
            let DomainKind::Map(mappings) = &d.kind else {
                continue;
            };
            if mappings.len() > self.limits.max_mappings {
                return Err(format!(
                    "domain {id} has {} mappings, limit {}",
                    mappings.len(),
                    self.limits.max_mappings
                ));
            }
            let mut prev: Option<(u64, u64)> = None;
            for (&start, m) in mappings {
                if m.end < start {
                    return Err(format!(
                        "domain {id}: mapping {start:#x}-{:#x} ends before it starts",
                        m.end
                    ));
                }
                if let Some((ps, pe)) = prev {
                    if pe >= start {
                        return Err(format!(
                            "domain {id}: mappings {ps:#x}-{pe:#x} and {start:#x}-{:#x} overlap",
                            m.end
                        ));
                    }
                }
                if let Some(r) = self
                    .reserved
                    .iter()
                    .find(|r| r.start <= m.end && start <= r.end)
                {
                    return Err(format!(
                        "domain {id}: mapping {start:#x}-{:#x} overlaps reserved {:#x}-{:#x}",
                        m.end, r.start, r.end
                    ));
                }
                prev = Some((start, m.end));
            }
        }
        let counted: usize = self
            .domains
            .values()
            .map(|d| match &d.kind {
                DomainKind::Map(m) => m.len(),
                _ => 0,
            })
            .sum();
        if counted != self.mapping_total {
            return Err(format!(
                "{counted} mappings in the domains, the total counts {}",
                self.mapping_total
            ));
        }
        if self.mapping_total > self.limits.max_total_mappings {
            return Err(format!(
                "{} mappings in all domains, limit {}",
                self.mapping_total, self.limits.max_total_mappings
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::error::Status;

    const ACKED: u64 = features::DEVICE_FEATURES;

    fn state() -> IommuState {
        IommuState::new(DeviceConfig::default(), Limits::default(), &[1, 2, 3])
    }

    fn attach(s: &mut IommuState, domain: u32, endpoint: u32) -> Result<(), RequestError> {
        s.attach(
            &Attach {
                domain,
                endpoint,
                flags: 0,
                reserved_nonzero: false,
            },
            ACKED,
        )
    }

    fn map(s: &mut IommuState, domain: u32, start: u64, end: u64) -> Result<(), RequestError> {
        s.map(
            &Map {
                domain,
                virt_start: start,
                virt_end: end,
                phys_start: start,
                flags: MAP_F_READ | MAP_F_WRITE,
            },
            ACKED,
        )
    }

    fn unmap(s: &mut IommuState, domain: u32, start: u64, end: u64) -> Result<usize, RequestError> {
        s.unmap(&Unmap {
            domain,
            virt_start: start,
            virt_end: end,
        })
    }

    fn status<T>(r: Result<T, RequestError>) -> Status {
        match r {
            Ok(_) => Status::Ok,
            Err(e) => e.status(),
        }
    }

    #[test]
    fn attach_creates_domain_and_unknown_endpoint_is_noent() {
        let mut s = state();
        assert_eq!(status(attach(&mut s, 10, 1)), Status::Ok);
        assert_eq!(s.domain_count(), 1);
        assert_eq!(status(attach(&mut s, 10, 99)), Status::NoEnt);
    }

    #[test]
    fn attach_reserved_or_unknown_flags_is_inval() {
        let mut s = state();
        let mut a = Attach {
            domain: 1,
            endpoint: 1,
            flags: 0,
            reserved_nonzero: true,
        };
        assert_eq!(status(s.attach(&a, ACKED)), Status::Inval);
        a.reserved_nonzero = false;
        a.flags = 2;
        assert_eq!(status(s.attach(&a, ACKED)), Status::Inval);
        // ATTACH_F_BYPASS is unknown to a driver without BYPASS_CONFIG.
        a.flags = ATTACH_F_BYPASS;
        assert_eq!(
            status(s.attach(&a, ACKED & !features::BYPASS_CONFIG)),
            Status::Inval
        );
        assert_eq!(s.domain_count(), 0);
    }

    #[test]
    fn attach_moves_endpoint_and_frees_old_domain() {
        let mut s = state();
        attach(&mut s, 1, 1).unwrap();
        map(&mut s, 1, 0, 0xfff).unwrap();
        attach(&mut s, 2, 1).unwrap();
        assert!(
            s.domain(1).is_none(),
            "old domain died with its last endpoint"
        );
        assert_eq!(s.endpoint(1).unwrap().domain, Some(2));
    }

    #[test]
    fn bypass_flag_mismatch_is_inval() {
        let mut s = state();
        attach(&mut s, 1, 1).unwrap();
        let a = Attach {
            domain: 1,
            endpoint: 2,
            flags: ATTACH_F_BYPASS,
            reserved_nonzero: false,
        };
        assert_eq!(status(s.attach(&a, ACKED)), Status::Inval);
        assert_eq!(s.endpoint(2).unwrap().domain, None);
    }

    #[test]
    fn domain_outside_range_is_range() {
        let mut s = state();
        s.config.domain_start = 1;
        s.config.domain_end = 5;
        assert_eq!(status(attach(&mut s, 6, 1)), Status::Range);
        assert_eq!(status(attach(&mut s, 0, 1)), Status::Range);
        assert_eq!(status(attach(&mut s, 5, 1)), Status::Ok);
    }

    #[test]
    fn domain_limit_is_nomem_but_moving_frees_a_slot() {
        let mut s = state();
        s.limits.max_domains = 1;
        attach(&mut s, 1, 1).unwrap();
        assert_eq!(status(attach(&mut s, 2, 2)), Status::NoMem);
        // Endpoint 1 is alone in domain 1: moving it to a new domain is fine.
        assert_eq!(status(attach(&mut s, 3, 1)), Status::Ok);
        assert_eq!(s.domain_count(), 1);
    }

    #[test]
    fn detach_rules() {
        let mut s = state();
        attach(&mut s, 1, 1).unwrap();
        attach(&mut s, 1, 2).unwrap();
        let d = |domain, endpoint| Detach { domain, endpoint };
        assert_eq!(status(s.detach(&d(1, 99))), Status::NoEnt);
        assert_eq!(status(s.detach(&d(7, 1))), Status::Inval);
        assert_eq!(status(s.detach(&d(1, 3))), Status::Inval);
        assert_eq!(status(s.detach(&d(1, 1))), Status::Ok);
        assert!(s.domain(1).is_some(), "endpoint 2 still holds the domain");
        assert_eq!(status(s.detach(&d(1, 2))), Status::Ok);
        assert!(s.domain(1).is_none(), "last detach destroys the domain");
        // Reattaching finds an empty domain: mappings died with it.
        attach(&mut s, 1, 1).unwrap();
        assert_eq!(s.mapping_count(1), 0);
    }

    #[test]
    fn map_validation() {
        let mut s = state();
        attach(&mut s, 1, 1).unwrap();
        assert_eq!(status(map(&mut s, 9, 0, 0xfff)), Status::NoEnt);
        assert_eq!(status(map(&mut s, 1, 0x1000, 0xfff)), Status::Inval);
        assert_eq!(status(map(&mut s, 1, 0x800, 0x17ff)), Status::Range);
        assert_eq!(status(map(&mut s, 1, 0x1000, 0x1ffe)), Status::Range);
        assert_eq!(
            status(map(&mut s, 1, 1 << 48, (1 << 48) + 0xfff)),
            Status::Range
        );
        assert_eq!(
            status(map(&mut s, 1, MSI_START, MSI_START + 0xfff)),
            Status::Inval
        );
        assert_eq!(status(map(&mut s, 1, 0x1000, 0x2fff)), Status::Ok);
        assert_eq!(status(map(&mut s, 1, 0x2000, 0x3fff)), Status::Inval);
        assert_eq!(status(map(&mut s, 1, 0x0, 0x1fff)), Status::Inval);
        assert_eq!(status(map(&mut s, 1, 0x3000, 0x3fff)), Status::Ok);
        let mut m = Map {
            domain: 1,
            virt_start: 0x8000,
            virt_end: 0x8fff,
            phys_start: 0x8800,
            flags: MAP_F_READ,
        };
        assert_eq!(status(s.map(&m, ACKED)), Status::Range, "phys misaligned");
        m.phys_start = 0x8000;
        m.flags = 8;
        assert_eq!(status(s.map(&m, ACKED)), Status::Inval, "unknown flag");
        m.flags = MAP_F_MMIO;
        assert_eq!(
            status(s.map(&m, ACKED & !features::MMIO)),
            Status::Inval,
            "MMIO needs F_MMIO"
        );
        assert_eq!(status(s.map(&m, ACKED)), Status::Ok);
        m.virt_start = 0x10000;
        m.virt_end = 0x10fff;
        m.phys_start = 0xffff_ffff_ffff_f000;
        m.virt_end = 0x11fff;
        assert_eq!(status(s.map(&m, ACKED)), Status::Range, "phys overflow");
    }

    #[test]
    fn map_limit_is_nomem() {
        let mut s = state();
        s.limits.max_mappings = 2;
        attach(&mut s, 1, 1).unwrap();
        map(&mut s, 1, 0, 0xfff).unwrap();
        map(&mut s, 1, 0x1000, 0x1fff).unwrap();
        assert_eq!(status(map(&mut s, 1, 0x2000, 0x2fff)), Status::NoMem);
    }

    /// --max-total-mappings bounds all domains together, and every way a
    /// mapping goes (UNMAP, DETACH, a domain's death, reset) gives its
    /// slot back.
    #[test]
    fn total_mappings_are_bounded_and_counted_exactly() {
        let mut s = IommuState::new(DeviceConfig::default(), Limits::default(), &[1, 2, 3, 4]);
        s.limits.max_mappings = 3;
        s.limits.max_total_mappings = 4;
        let page = |n: u64| (n * 0x1000, n * 0x1000 + 0xfff);
        let fill = |s: &mut IommuState, domain: u32, pages: std::ops::Range<u64>| {
            for n in pages {
                let (a, b) = page(n);
                map(s, domain, a, b).unwrap();
            }
        };
        let check = |s: &IommuState, total: usize| {
            assert_eq!(s.check_invariants(), Ok(()));
            assert_eq!(s.total_mappings(), total);
        };
        for (d, ep) in [(1, 1), (2, 2), (3, 3)] {
            attach(&mut s, d, ep).unwrap();
        }
        fill(&mut s, 1, 0..2);
        fill(&mut s, 2, 0..2);
        check(&s, 4);
        // Beyond the total, in a domain under its own bound: NOMEM.
        let (a, b) = page(0);
        assert_eq!(status(map(&mut s, 3, a, b)), Status::NoMem);
        let (a, b) = page(5);
        assert_eq!(status(map(&mut s, 1, a, b)), Status::NoMem);
        check(&s, 4);
        // UNMAP of one mapping, and of several at once.
        let (a, b) = page(1);
        assert_eq!(unmap(&mut s, 1, a, b).unwrap(), 1);
        check(&s, 3);
        fill(&mut s, 3, 0..1);
        check(&s, 4);
        assert_eq!(unmap(&mut s, 2, 0, 0xf_ffff).unwrap(), 2);
        check(&s, 2);
        // DETACH of the last endpoint: the domain dies with its mappings.
        fill(&mut s, 2, 0..2);
        s.detach(&Detach {
            domain: 2,
            endpoint: 2,
        })
        .unwrap();
        check(&s, 2);
        // A domain shared by two endpoints lives on while one stays.
        attach(&mut s, 3, 4).unwrap();
        s.detach(&Detach {
            domain: 3,
            endpoint: 3,
        })
        .unwrap();
        check(&s, 2);
        // An endpoint moving out (ATTACH elsewhere) kills its old domain.
        attach(&mut s, 9, 4).unwrap();
        check(&s, 1);
        // ATTACH_TABLE moving the last endpoint out of a MAP domain.
        fill(&mut s, 9, 0..3);
        check(&s, 4);
        let at = crate::nested::request::encode::attach_vtd(20, 4, 0, 0, 0x1000, 48);
        let at = crate::nested::request::decode_attach_table(&at).unwrap();
        s.attach_table(&at, ACKED | features::ATTACH_TABLE).unwrap();
        check(&s, 1);
        // Reset and a new session free everything.
        attach(&mut s, 2, 2).unwrap();
        fill(&mut s, 2, 0..3);
        check(&s, 4);
        s.reset();
        check(&s, 0);
        attach(&mut s, 2, 2).unwrap();
        fill(&mut s, 2, 0..3);
        s.begin_session();
        check(&s, 0);
        attach(&mut s, 2, 2).unwrap();
        fill(&mut s, 2, 0..3);
        s.disconnect();
        check(&s, 0);
    }

    #[test]
    fn map_on_bypass_domain_is_inval() {
        let mut s = state();
        s.attach(
            &Attach {
                domain: 1,
                endpoint: 1,
                flags: ATTACH_F_BYPASS,
                reserved_nonzero: false,
            },
            ACKED,
        )
        .unwrap();
        assert_eq!(status(map(&mut s, 1, 0, 0xfff)), Status::Inval);
        assert_eq!(status(unmap(&mut s, 1, 0, 0xfff)), Status::Inval);
    }

    #[test]
    fn whole_64_bit_space_maps_without_overflow() {
        let mut s = state();
        s.config.input_end = u64::MAX;
        s.reserved.clear();
        attach(&mut s, 1, 1).unwrap();
        assert_eq!(status(map(&mut s, 1, 0, u64::MAX)), Status::Ok);
        assert_eq!(
            s.translate(1, None, u64::MAX, 1, true).unwrap(),
            Translation::Mapped {
                gpa: u64::MAX,
                len: 1
            }
        );
        assert_eq!(
            s.translate(1, None, 0, u64::MAX, true).unwrap(),
            Translation::Mapped {
                gpa: 0,
                len: u64::MAX
            }
        );
        assert_eq!(unmap(&mut s, 1, 0, u64::MAX).unwrap(), 1);
    }

    /// The worked examples of the spec's UNMAP section, in units of 0x1000.
    #[test]
    fn unmap_spec_examples() {
        let p = |n: u64| n * 0x1000;
        // (mappings, UNMAP range, expected status, mappings left)
        type Case = (&'static [(u64, u64)], (u64, u64), Status, usize);
        let cases: &[Case] = &[
            (&[], (0, 4), Status::Ok, 0),
            (&[(0, 9)], (0, 9), Status::Ok, 0),
            (&[(0, 4), (5, 9)], (0, 9), Status::Ok, 0),
            (&[(0, 9)], (0, 4), Status::Range, 1),
            (&[(0, 4), (5, 9)], (0, 4), Status::Ok, 1),
            (&[(0, 4)], (0, 9), Status::Ok, 0),
            (&[(0, 4), (10, 14)], (0, 14), Status::Ok, 0),
        ];
        for (maps, (us, ue), want, left) in cases {
            let mut s = state();
            attach(&mut s, 1, 1).unwrap();
            for &(a, b) in maps.iter() {
                map(&mut s, 1, p(a), p(b + 1) - 1).unwrap();
            }
            let got = status(unmap(&mut s, 1, p(*us), p(us.max(ue) + 1) - 1));
            assert_eq!(got, *want, "maps {maps:?} unmap {us}-{ue}");
            assert_eq!(s.mapping_count(1), *left, "maps {maps:?} unmap {us}-{ue}");
        }
    }

    #[test]
    fn unmap_split_at_end_removes_nothing() {
        let mut s = state();
        attach(&mut s, 1, 1).unwrap();
        map(&mut s, 1, 0x0, 0xfff).unwrap();
        map(&mut s, 1, 0x1000, 0x2fff).unwrap();
        assert_eq!(status(unmap(&mut s, 1, 0, 0x1fff)), Status::Range);
        assert_eq!(s.mapping_count(1), 2, "nothing removed on RANGE");
        assert_eq!(status(unmap(&mut s, 9, 0, 0xfff)), Status::NoEnt);
        assert_eq!(status(unmap(&mut s, 1, 0x1000, 0xfff)), Status::Inval);
    }

    #[test]
    fn probe_unknown_endpoint_is_noent() {
        let s = state();
        assert_eq!(status(s.probe(42)), Status::NoEnt);
        let r = s.probe(1).unwrap();
        assert_eq!(r[0].subtype, RESV_MEM_T_MSI);
        assert_eq!((r[0].start, r[0].end), (0xfee0_0000, 0xfeef_ffff));
    }

    #[test]
    fn translation_follows_bypass_and_permissions() {
        let mut s = state();
        assert_eq!(
            s.translate(1, None, 0x5000, 8, false).unwrap(),
            Translation::Identity
        );
        s.bypass = false;
        assert_eq!(
            s.translate(1, None, 0x5000, 8, false).unwrap(),
            Translation::Blocked
        );
        attach(&mut s, 1, 1).unwrap();
        assert_eq!(
            s.translate(1, None, 0x5000, 8, false).unwrap(),
            Translation::Miss
        );
        s.map(
            &Map {
                domain: 1,
                virt_start: 0x5000,
                virt_end: 0x5fff,
                phys_start: 0x9000,
                flags: MAP_F_READ,
            },
            ACKED,
        )
        .unwrap();
        assert_eq!(
            s.translate(1, None, 0x5ff0, 0x100, false).unwrap(),
            Translation::Mapped {
                gpa: 0x9ff0,
                len: 0x10
            }
        );
        assert_eq!(
            s.translate(1, None, 0x5000, 8, true).unwrap(),
            Translation::Miss
        );
        assert!(s.translate(77, None, 0, 1, false).is_err());
    }

    #[test]
    fn check_invariants_holds_after_transitions_and_catches_breakage() {
        let mut s = state();
        assert_eq!(s.check_invariants(), Ok(()));
        attach(&mut s, 1, 1).unwrap();
        attach(&mut s, 1, 2).unwrap();
        map(&mut s, 1, 0, 0xfff).unwrap();
        map(&mut s, 1, 0x1000, 0x1fff).unwrap();
        attach(&mut s, 2, 2).unwrap();
        assert_eq!(s.check_invariants(), Ok(()));

        let broken = |f: &dyn Fn(&mut IommuState)| {
            let mut s = state();
            attach(&mut s, 1, 1).unwrap();
            map(&mut s, 1, 0x1000, 0x1fff).unwrap();
            f(&mut s);
            s.check_invariants().unwrap_err()
        };
        fn insert(s: &mut IommuState, start: u64, end: u64) {
            let DomainKind::Map(m) = &mut s.domains.get_mut(&1).unwrap().kind else {
                unreachable!()
            };
            let flags = MAP_F_READ;
            m.insert(
                start,
                Mapping {
                    end,
                    phys: 0,
                    flags,
                },
            );
        }
        assert!(broken(&|s| insert(s, 0x1800, 0x2fff)).contains("overlap"));
        assert!(broken(&|s| insert(s, 0x5000, 0x4fff)).contains("ends before"));
        assert!(broken(&|s| insert(s, MSI_START, MSI_START + 0xfff)).contains("reserved"));
        assert!(broken(&|s| s.domains.get_mut(&1).unwrap().endpoints = 2).contains("counts"));
        assert!(broken(&|s| s.endpoints.get_mut(&2).unwrap().domain = Some(9)).contains("missing"));
        assert!(broken(&|s| s.limits.max_domains = 0).contains("limit"));
        assert!(broken(&|s| s.limits.max_mappings = 0).contains("limit"));
        assert!(broken(&|s| s.limits.max_total_mappings = 0).contains("limit"));
        assert!(broken(&|s| s.mapping_total += 1).contains("total counts"));
        assert!(broken(&|s| insert(s, 0x8000, 0x8fff)).contains("total counts"));
    }

    mod tables {
        use super::*;
        use crate::nested::request::{decode_attach_table, AT_F_PAGE_REQUESTS, AT_F_PASID_VALID};
        use crate::nested::request::{encode, FORMAT_HOST_SELFTEST};

        const ACKED_T: u64 = ACKED | features::ATTACH_TABLE;

        fn vtd(domain: u32, ep: u32, root: u64, pasid: Option<u32>) -> AttachTable {
            let flags = if pasid.is_some() { AT_F_PASID_VALID } else { 0 };
            let b = encode::attach_vtd(domain, ep, flags, pasid.unwrap_or(0), root, 48);
            decode_attach_table(&b).unwrap()
        }

        fn inv(domain: u32) -> Invalidate {
            crate::nested::request::decode_invalidate(&encode::invalidate_domain(domain)).unwrap()
        }

        #[test]
        fn attach_table_creates_and_shares_a_domain() {
            let mut s = state();
            assert_eq!(
                status(s.attach_table(&vtd(5, 1, 0x1000, None), ACKED_T)),
                Status::Ok
            );
            assert_eq!(
                status(s.attach_table(&vtd(5, 2, 0x1000, None), ACKED_T)),
                Status::Ok
            );
            assert_eq!(s.domain(5).unwrap().endpoints, 2);
            assert_eq!(
                s.translate(1, None, 0x4000, 8, false).unwrap(),
                Translation::Walk {
                    pgtbl: 0x1000,
                    addr_width: 48,
                    page_requests: false
                }
            );
            // Another table in the same domain: INVAL, nothing moves.
            assert_eq!(
                status(s.attach_table(&vtd(5, 3, 0x2000, None), ACKED_T)),
                Status::Inval
            );
            assert_eq!(s.endpoint(3).unwrap().domain, None);
            // Again the same: a no-op.
            assert_eq!(
                status(s.attach_table(&vtd(5, 1, 0x1000, None), ACKED_T)),
                Status::Ok
            );
            assert_eq!(s.domain(5).unwrap().endpoints, 2);
            assert_eq!(s.check_invariants(), Ok(()));
        }

        #[test]
        fn kinds_do_not_mix() {
            let mut s = state();
            attach(&mut s, 1, 1).unwrap();
            assert_eq!(
                status(s.attach_table(&vtd(1, 2, 0x1000, None), ACKED_T)),
                Status::Inval
            );
            s.attach_table(&vtd(2, 2, 0x1000, None), ACKED_T).unwrap();
            assert_eq!(status(attach(&mut s, 2, 3)), Status::Inval);
            assert_eq!(status(map(&mut s, 2, 0, 0xfff)), Status::Inval);
            assert_eq!(status(unmap(&mut s, 2, 0, 0xfff)), Status::Inval);
            assert_eq!(status(s.invalidate(&inv(1))), Status::Inval);
            assert_eq!(status(s.invalidate(&inv(9))), Status::NoEnt);
            assert_eq!(status(s.invalidate(&inv(2))), Status::Ok);
            // ATTACH moves an endpoint out of a table domain, which dies.
            attach(&mut s, 1, 2).unwrap();
            assert!(s.domain(2).is_none());
            assert_eq!(s.check_invariants(), Ok(()));
        }

        #[test]
        fn refusals_leave_state_unchanged() {
            let mut s = state();
            assert_eq!(
                status(s.attach_table(&vtd(1, 99, 0x1000, None), ACKED_T)),
                Status::NoEnt
            );
            let st = encode::attach_selftest(1, 1, 0, 0, 7);
            let st = decode_attach_table(&st).unwrap();
            assert_eq!(st.table.format(), FORMAT_HOST_SELFTEST);
            assert_eq!(status(s.attach_table(&st, ACKED_T)), Status::Unsupp);
            let pr = encode::attach_vtd(1, 1, AT_F_PAGE_REQUESTS, 0, 0x1000, 48);
            let pr = decode_attach_table(&pr).unwrap();
            assert_eq!(status(s.attach_table(&pr, ACKED_T)), Status::Inval);
            s.config.domain_end = 10;
            assert_eq!(
                status(s.attach_table(&vtd(11, 1, 0x1000, None), ACKED_T)),
                Status::Range
            );
            s.limits.max_domains = 1;
            attach(&mut s, 1, 2).unwrap();
            assert_eq!(
                status(s.attach_table(&vtd(2, 1, 0x1000, None), ACKED_T)),
                Status::NoMem
            );
            assert_eq!(s.domain_count(), 1);
            assert_eq!(s.endpoint(1).unwrap().domain, None);
        }

        #[test]
        fn pasids_attach_detach_and_translate() {
            let mut s = state();
            s.attach_table(&vtd(1, 1, 0x1000, Some(7)), ACKED_T)
                .unwrap();
            s.attach_table(&vtd(1, 1, 0x1000, Some(8)), ACKED_T)
                .unwrap();
            s.attach_table(&vtd(1, 1, 0x1000, None), ACKED_T).unwrap();
            s.attach_table(&vtd(2, 1, 0x3000, Some(9)), ACKED_T)
                .unwrap();
            assert_eq!(s.domain(1).unwrap().endpoints, 3);
            assert_eq!(s.attached(1, Some(7)), Some(1));
            assert_eq!(s.pasid_count(), 3);
            assert_eq!(
                s.translate(1, Some(9), 0, 1, false).unwrap(),
                Translation::Walk {
                    pgtbl: 0x3000,
                    addr_width: 48,
                    page_requests: false
                }
            );
            // A PASID with nothing attached is blocked, bypass or not.
            assert_eq!(
                s.translate(1, Some(3), 0, 1, false).unwrap(),
                Translation::Blocked
            );
            // Moving PASID 8 to domain 2.
            s.attach_table(&vtd(2, 1, 0x3000, Some(8)), ACKED_T)
                .unwrap();
            assert_eq!(s.domain(1).unwrap().endpoints, 2);
            // DETACH takes the RID and every PASID in that domain.
            s.detach(&Detach {
                domain: 1,
                endpoint: 1,
            })
            .unwrap();
            assert!(s.domain(1).is_none());
            assert_eq!(s.attached(1, None), None);
            assert_eq!(s.attached(1, Some(7)), None);
            assert_eq!(s.attached(1, Some(8)), Some(2));
            assert_eq!(s.check_invariants(), Ok(()));
            assert_eq!(
                status(s.detach(&Detach {
                    domain: 1,
                    endpoint: 1
                })),
                Status::Inval
            );
            s.reset();
            assert_eq!((s.domain_count(), s.pasid_count()), (0, 0));
        }

        #[test]
        fn pasid_limit_is_nomem() {
            let mut s = state();
            s.limits.max_pasids = 2;
            s.attach_table(&vtd(1, 1, 0x1000, Some(1)), ACKED_T)
                .unwrap();
            s.attach_table(&vtd(1, 2, 0x1000, Some(1)), ACKED_T)
                .unwrap();
            assert_eq!(
                status(s.attach_table(&vtd(1, 3, 0x1000, Some(1)), ACKED_T)),
                Status::NoMem
            );
            // Moving an attached PASID takes no new slot.
            assert_eq!(
                status(s.attach_table(&vtd(2, 1, 0x2000, Some(1)), ACKED_T)),
                Status::Ok
            );
            assert_eq!(s.check_invariants(), Ok(()));
        }
    }

    #[test]
    fn reset_keeps_bypass_a_new_session_restores_it() {
        let mut s = state();
        attach(&mut s, 1, 1).unwrap();
        s.bypass = false;
        s.reset();
        assert_eq!(s.domain_count(), 0);
        assert_eq!(s.endpoint(1).unwrap().domain, None);
        assert!(!s.bypass);
        attach(&mut s, 1, 1).unwrap();
        s.begin_session();
        assert!(s.bypass);
        assert_eq!(s.domain_count(), 0);
        assert_eq!(s.endpoint(1).unwrap().domain, None);
    }
}
