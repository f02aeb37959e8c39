// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The structural invariants every transition keeps, walked by the unit
//! tests and the fuzzers after each step.

use super::*;

impl IommuState {
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
