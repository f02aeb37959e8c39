// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Endpoint hot-plug (the control socket's `add_endpoint` and
//! `remove_endpoint`, spec-notes/protocol.md 8.2): an endpoint appears
//! unattached, or goes as if the guest had detached it from everything
//! first, its outstanding page requests completed exactly once.

use thiserror::Error;

use super::*;

/// What serves a hot-plugged endpoint.
#[derive(Debug)]
pub(crate) enum NewEndpoint {
    /// The software IOMMU.
    Virtual,
    /// A VFIO device: its cdev, sent over the control socket.
    Vfio(std::fs::File),
}

#[derive(Debug, Error)]
pub(crate) enum HotplugError {
    #[error("endpoint {0:#x} exists")]
    Exists(u32),
    #[error("{0} endpoints already (--max-endpoints)")]
    Limit(usize),
    #[error("no endpoint {0:#x}")]
    NoEndpoint(u32),
    #[error("endpoint {id:#x}: {source}")]
    Host {
        id: u32,
        #[source]
        source: BridgeError,
    },
}

/// What a removal undid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Removed {
    /// Was it a host (VFIO) endpoint?
    pub host: bool,
    /// Its page-request groups the device completed (INVALID to their
    /// sources; the kernel completes a host device's own on detach).
    pub page_requests: u64,
}

impl IommuState {
    /// Add endpoint `id`, unattached (bypass or blocked as the bypass byte
    /// says). Nothing changes on `Err`.
    pub(crate) fn add_endpoint(&mut self, id: u32, kind: NewEndpoint) -> Result<(), HotplugError> {
        if self.endpoints.contains_key(&id) {
            return Err(HotplugError::Exists(id));
        }
        if self.endpoints.len() >= self.limits.max_endpoints {
            return Err(HotplugError::Limit(self.limits.max_endpoints));
        }
        if let NewEndpoint::Vfio(file) = kind {
            self.host
                .add_vfio(id, file)
                .map_err(|source| HotplugError::Host { id, source })?;
            if let Some(holes) = self.host.reserved(id) {
                let regions = holes.iter().map(reserved_region).collect();
                self.host_reserved.insert(id, regions);
            }
        }
        self.endpoints.insert(id, Endpoint::default());
        Ok(())
    }

    /// Remove endpoint `id`: every attachment (PASIDs, then the RID) goes
    /// as a DETACH would take it, domains die with their last endpoint,
    /// the host lets go of the device. Responses owed to the kernel are
    /// written before its device is detached.
    pub(crate) fn remove_endpoint(&mut self, id: u32) -> Result<Removed, HotplugError> {
        let ep = *self
            .endpoints
            .get(&id)
            .ok_or(HotplugError::NoEndpoint(id))?;
        let host = self.host.owns(id);
        let by_device = self.pages.counters.completed_by_device;
        self.respond_kernel_now();
        let pasids: Vec<(u32, u32)> = self
            .pasids
            .range((id, 0)..=(id, u32::MAX))
            .map(|(&(_, p), &d)| (p, d))
            .collect();
        for (p, d) in pasids {
            self.pasids.remove(&(id, p));
            self.pages.attachment_gone(id, Some(p), d);
            self.drop_attachment(d);
        }
        if let Some(d) = ep.domain {
            self.pages.attachment_gone(id, None, d);
            self.release(id, d);
        }
        // The host detaches its PASIDs and RID itself, and never fails.
        if host {
            self.host.remove_endpoint(id);
        }
        self.endpoints.remove(&id);
        self.host_reserved.remove(&id);
        self.pages.forget_endpoint(id);
        Ok(Removed {
            host,
            page_requests: self.pages.counters.completed_by_device - by_device,
        })
    }
}
