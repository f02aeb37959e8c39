// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-iommu state of one guest: endpoints, domains, mappings, and
//! the pure transitions that requests make on it.
//!
//! Every method is a function of (state, request) -> (state, result); a
//! refused request leaves the state exactly as it was.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};

use crate::fast_map::FastMap;

use crate::device::config::{features, DeviceConfig, Limits};
use crate::device::error::RequestError;
use crate::device::host_port::{host_mapping, page_response, reserved_region};
use crate::device::request::{Attach, Detach, Map, Unmap};
use crate::fault_queue::pages::{
    FaultRecord, PageRequests, Refusal, Response, SourceId, CODE_FAILURE, CODE_INVALID,
    NO_RESPONSE, PERM_EXEC, PERM_PRIV, PERM_READ, PERM_WRITE,
};
use crate::fault_queue::{EventFifo, EventRecord};
use crate::iommufd_bridge::software::SoftwareIommu;
use crate::iommufd_bridge::{BridgeError, HostIommu, RamRegion, Target};

use crate::nested::request::PageResp;
use crate::nested::{AttachTable, Invalidate, TableCaps, TableDesc};
use crate::wire::{ATTACH_F_BYPASS, AT_F_SRE, MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE};
use crate::wire::{FLAG_EXEC, FLAG_PRIV, FLAG_READ, FLAG_WRITE};
pub(crate) use hotplug::{HotplugError, NewEndpoint, Removed};

/// x86's MSI doorbell window, reported as a RESV_MEM MSI region and never
/// mappable (spec-notes/protocol.md 6.6); the host port's, so both agree.
pub(crate) use crate::iommufd_bridge::{MSI_END, MSI_START};

mod hotplug;
mod invariants;
mod page_routing;
mod ratified;
mod tables;

pub(crate) const RESV_MEM_T_RESERVED: u8 = 0;
pub(crate) const RESV_MEM_T_MSI: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReservedRegion {
    pub start: u64,
    pub end: u64,
    pub subtype: u8,
}

/// One MAP: indivisible until an UNMAP covers it whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub end: u64,
    pub phys: u64,
    pub flags: u32,
}

#[derive(Debug, Default)]
pub(crate) enum DomainKind {
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
pub(crate) struct TableDomain {
    pub table: TableDesc,
    pub page_requests: bool,
}

#[derive(Debug)]
pub(crate) struct Domain {
    pub kind: DomainKind,
    /// Number of attachments (endpoints, and endpoint PASIDs); the domain
    /// dies with the last one.
    pub endpoints: usize,
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Endpoint {
    pub domain: Option<u32>,
}

/// What a virtual endpoint's DMA resolves to, before guest-RAM checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Translation {
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
        /// The attachment's SRE: privileged requests allowed.
        sre: bool,
    },
}

#[derive(Debug)]
pub struct IommuState {
    pub config: DeviceConfig,
    pub limits: Limits,
    /// Live bypass byte (config offset 36).
    pub bypass: bool,
    endpoints: FastMap<u32, Endpoint>,
    domains: FastMap<u32, Domain>,
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
    domains: &mut FastMap<u32, Domain>,
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
            domains: FastMap::default(),
            mapping_total: 0,
            pasids: BTreeMap::new(),
            reserved: vec![ReservedRegion {
                start: MSI_START,
                end: MSI_END,
                subtype: RESV_MEM_T_MSI,
            }],
            host_reserved: HashMap::new(),
            host: Box::<SoftwareIommu>::default(),
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

    pub(crate) fn host(&self) -> &dyn HostIommu {
        self.host.as_ref()
    }

    /// Is `endpoint` a host (VFIO, selftest) endpoint?
    pub(crate) fn is_host_endpoint(&self, endpoint: u32) -> bool {
        self.host.owns(endpoint)
    }

    /// The frontend's memory table changed.
    pub(crate) fn set_guest_ram(&mut self, regions: &[RamRegion]) -> Result<(), BridgeError> {
        // Host devices stay blocked between guests; the memory table is
        // where a guest begins, so unattached endpoints take its bypass now,
        // before RAM is mapped: some drivers (virtio-iommu on 6.12) refuse
        // an attach to an IOAS that already has mappings (EADDRINUSE).
        let attached = self.host.set_bypass(self.bypass);
        let mapped = self.host.set_guest_ram(regions);
        attached.and(mapped)
    }

    /// Every domain goes, every endpoint comes back unattached.
    pub(super) fn forget_domains(&mut self) {
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
    pub(crate) fn begin_session(&mut self) {
        self.forget_domains();
        self.bypass = self.config.boot_bypass;
        self.host.reset(false);
    }

    /// The bypass byte was written.
    pub(crate) fn set_bypass(&mut self, on: bool) -> Result<(), BridgeError> {
        self.host.set_bypass(on)?;
        self.bypass = on;
        Ok(())
    }

    /// The frontend is gone: as system reset, and the host lets go of
    /// guest RAM and blocks its devices until the next guest.
    pub(crate) fn disconnect(&mut self) {
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

    #[cfg(test)]
    pub(crate) fn domain_count(&self) -> usize {
        self.domains.len()
    }

    #[cfg(test)]
    pub(crate) fn domain(&self, id: u32) -> Option<&Domain> {
        self.domains.get(&id)
    }

    #[cfg(test)]
    pub(crate) fn endpoint(&self, id: u32) -> Option<&Endpoint> {
        self.endpoints.get(&id)
    }

    pub(crate) fn reserved_regions(&self, endpoint: u32) -> &[ReservedRegion] {
        self.host_reserved
            .get(&endpoint)
            .map_or(&self.reserved, Vec::as_slice)
    }

    #[cfg(test)]
    pub(crate) fn mapping_count(&self, domain: u32) -> usize {
        match self.domains.get(&domain).map(|d| &d.kind) {
            Some(DomainKind::Map(m)) => m.len(),
            _ => 0,
        }
    }

    /// Mappings of all domains together.
    #[cfg(test)]
    pub(crate) fn total_mappings(&self) -> usize {
        self.mapping_total
    }

    pub(super) fn check_domain_range(&self, domain: u32) -> Result<(), RequestError> {
        if domain < self.config.domain_start || domain > self.config.domain_end {
            return Err(RequestError::DomainOutOfRange(domain));
        }
        Ok(())
    }

    /// Take `endpoint` out of `domain`; the domain dies with its last endpoint.
    pub(super) fn release(&mut self, endpoint: u32, domain: u32) {
        self.drop_attachment(domain);
        if let Some(ep) = self.endpoints.get_mut(&endpoint) {
            ep.domain = None;
        }
    }

    /// One attachment of `domain` is gone; the last one takes the domain.
    pub(super) fn drop_attachment(&mut self, domain: u32) {
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

    /// How an access of `len` bytes at `iova` by `endpoint` translates, for
    /// the software model. Only the first piece is returned; the caller
    /// walks on from `iova + len` for the rest (mappings may be adjacent).
    pub(crate) fn translate(
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
                        flags,
                        pgtbl,
                        addr_width,
                    } => Translation::Walk {
                        pgtbl,
                        addr_width,
                        page_requests: t.page_requests,
                        sre: flags & AT_F_SRE != 0,
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
        use crate::nested::request::{decode_attach_table, encode};
        use crate::wire::{AT_F_PAGE_REQUESTS, AT_F_PASID_VALID, FORMAT_HOST_SELFTEST};

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
                    page_requests: false,
                    sre: false
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
                    page_requests: false,
                    sre: false
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
