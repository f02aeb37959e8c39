// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The ratified requests: ATTACH, DETACH, MAP, UNMAP, PROBE (virtio 1.2+
//! 5.13), each a pure transition; a refused request changes nothing.

use super::*;

impl IommuState {
    pub(crate) fn attach(&mut self, req: &Attach, acked: u64) -> Result<(), RequestError> {
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

    pub(crate) fn map(&mut self, req: &Map, acked: u64) -> Result<(), RequestError> {
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
    pub(crate) fn unmap(&mut self, req: &Unmap) -> Result<usize, RequestError> {
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
    pub(crate) fn probe(&self, endpoint: u32) -> Result<&[ReservedRegion], RequestError> {
        if !self.endpoints.contains_key(&endpoint) {
            return Err(RequestError::NoEndpoint(endpoint));
        }
        Ok(self.reserved_regions(endpoint))
    }
}
