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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::config::features;
    use crate::device::request::Attach;
    use crate::nested::request::{decode_attach_table, encode};
    use crate::wire::AT_F_PAGE_REQUESTS;

    const ACKED: u64 = features::DEVICE_FEATURES | features::ATTACH_TABLE | features::PAGE_REQUEST;

    fn attach(s: &mut IommuState, domain: u32, endpoint: u32) {
        let a = Attach {
            domain,
            endpoint,
            flags: 0,
            reserved_nonzero: false,
        };
        s.attach(&a, ACKED).unwrap();
    }

    #[test]
    fn added_endpoints_are_bounded_and_unique() {
        let limits = Limits {
            max_endpoints: 3,
            ..Limits::default()
        };
        let mut s = IommuState::new(DeviceConfig::default(), limits, &[1, 2]);
        assert!(matches!(
            s.add_endpoint(1, NewEndpoint::Virtual),
            Err(HotplugError::Exists(1))
        ));
        s.add_endpoint(3, NewEndpoint::Virtual).unwrap();
        assert!(matches!(
            s.add_endpoint(4, NewEndpoint::Virtual),
            Err(HotplugError::Limit(3))
        ));
        assert!(matches!(
            s.remove_endpoint(9),
            Err(HotplugError::NoEndpoint(9))
        ));
        s.remove_endpoint(3).unwrap();
        s.add_endpoint(4, NewEndpoint::Virtual).unwrap();
        // Without a host, a VFIO device is refused and nothing changes.
        let f = std::fs::File::open("/dev/null").unwrap();
        s.remove_endpoint(4).unwrap();
        assert!(matches!(
            s.add_endpoint(4, NewEndpoint::Vfio(f)),
            Err(HotplugError::Host {
                source: BridgeError::Unsupported(_),
                ..
            })
        ));
        assert!(!s.has_endpoint(4));
        assert_eq!(s.check_invariants(), Ok(()));
    }

    #[test]
    fn removal_detaches_everything_and_completes_its_groups() {
        let mut s = IommuState::new(DeviceConfig::default(), Limits::default(), &[1, 2]);
        s.add_endpoint(7, NewEndpoint::Virtual).unwrap();
        // 7 shares MAP domain 1 with 1; PASID 3 in table domain 2 alone.
        attach(&mut s, 1, 1);
        attach(&mut s, 1, 7);
        let at = encode::attach_vtd(
            2,
            7,
            AT_F_PAGE_REQUESTS | crate::wire::AT_F_PASID_VALID,
            3,
            0x1000,
            48,
        );
        s.attach_table(&decode_attach_table(&at).unwrap(), ACKED)
            .unwrap();
        let now = std::time::Instant::now();
        s.pages
            .raise(7, Some(3), Some(3), 2, SourceId::Virtual, 11, now)
            .unwrap();
        let removed = s.remove_endpoint(7).unwrap();
        assert_eq!(
            removed,
            Removed {
                host: false,
                page_requests: 1
            }
        );
        assert_eq!(s.pages.outstanding(), 0);
        let r = s.pages.pop_response().unwrap();
        assert_eq!((r.cookie, r.code), (11, CODE_INVALID));
        assert!(s.domain(2).is_none(), "the table domain died with it");
        assert_eq!(
            s.domain(1).unwrap().endpoints,
            1,
            "domain 1 keeps endpoint 1"
        );
        assert_eq!((s.pasid_count(), s.has_endpoint(7)), (0, false));
        assert!(s.translate(7, None, 0, 1, false).is_err());
        assert_eq!(s.check_invariants(), Ok(()));
    }
}
