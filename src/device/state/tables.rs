// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest-owned tables (extension): ATTACH_TABLE, the attachments of an
//! endpoint and its PASIDs, and INVALIDATE (spec-notes/protocol.md 6.2, 6.3).

use super::*;

impl IommuState {
    /// What ATTACH_TABLE can do on `endpoint` (None: no such endpoint).
    pub(crate) fn table_caps(&self, endpoint: u32) -> Option<TableCaps> {
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
    pub(crate) fn attached(&self, endpoint: u32, pasid: Option<u32>) -> Option<u32> {
        match pasid {
            None => self.endpoints.get(&endpoint)?.domain,
            Some(p) => self.pasids.get(&(endpoint, p)).copied(),
        }
    }

    #[cfg(test)]
    pub(crate) fn pasid_count(&self) -> usize {
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

    /// May this (decoded) INVALIDATE wait to be sent to the host together
    /// with the ones that follow it? Only when it is valid and the host
    /// holds the domain's table.
    pub(crate) fn batchable_invalidate(&self, req: &Invalidate) -> bool {
        matches!(
            self.domains.get(&req.domain).map(|d| &d.kind),
            Some(DomainKind::Table(_))
        ) && self.host.backs(req.domain)
    }

    /// Consecutive INVALIDATEs of one domain that `batchable_invalidate`
    /// accepted: one host call for all. `Err` if the host refused the
    /// batch; the caller then sends them one by one for their statuses.
    pub(crate) fn invalidate_batch(
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
    pub(crate) fn invalidate(&mut self, req: &Invalidate) -> Result<(), RequestError> {
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
}
