// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An endpoint's life on the host: added (at start, or hot-plugged from a
//! cdev), placed where an unattached endpoint belongs, and released
//! (detached, its vDEVICE and device gone, its domains told).

use std::collections::BTreeMap;

use log::{error, Level};

use super::{target_domain, HostDevice, HostEndpoint, IommufdHost};
use crate::iommufd_bridge::ids::{IoasId, PtId};
use crate::iommufd_bridge::reserved::reserved_from_ranges;
use crate::iommufd_bridge::sys::{Iommufd, IovaRanges};
use crate::iommufd_bridge::{BridgeError, Result, Target};
use crate::log_limit::limited;

impl<D: HostDevice> IommufdHost<D> {
    /// Add an endpoint whose device `make` creates, attached to the
    /// blocking IOAS. Learns its usable IOVA ranges alone in a scratch IOAS,
    /// then puts it where an unattached endpoint belongs.
    pub fn add_endpoint(
        &mut self,
        id: u32,
        make: impl FnOnce(&Iommufd, IoasId) -> Result<D>,
    ) -> Result<()> {
        let mut dev = make(&self.fd, self.block_ioas)?;
        let scratch = self.fd.ioas_alloc()?;
        let ranges = dev
            .attach(&self.fd, PtId::Ioas(scratch))
            .and_then(|_| Ok(self.fd.iova_ranges(scratch)?));
        if let Err(e) = dev.attach(&self.fd, PtId::Ioas(self.block_ioas)) {
            error!("endpoint {id:#x}: back to the blocking IOAS: {e}");
        }
        let _ = self.fd.destroy(scratch);
        let IovaRanges {
            usable: ranges,
            alignment: align,
        } = match ranges {
            Ok(r) => r,
            Err(e) => {
                dev.release(&self.fd);
                return Err(e);
            }
        };
        // Hot-plug repeats this: rate-limited.
        limited!(
            Level::Info,
            "endpoint {id:#x}: usable IOVA {ranges:x?}, alignment {align:#x}"
        );
        if self.nest_parent.is_none() && self.ram_hwpt.is_none() {
            self.make_ram_parent(&dev);
        }
        let caps = self.table_caps_of(id, &dev);
        let vdevice = self.virtual_device(id, &dev, &caps);
        self.endpoints.insert(
            id,
            HostEndpoint {
                dev,
                target: Target::Unattached,
                pt: PtId::Ioas(self.block_ioas),
                reserved: reserved_from_ranges(&ranges),
                caps,
                pasids: BTreeMap::new(),
                vdevice,
            },
        );
        self.point(id, Target::Unattached, &mut std::iter::empty())
    }

    /// Hot-plug: a VFIO device from its cdev (the control socket's
    /// `add_endpoint`); nothing stays behind when it fails.
    pub(super) fn add_vfio_endpoint(&mut self, id: u32, file: std::fs::File) -> Result<()> {
        if self.endpoints.contains_key(&id) {
            // The device state checks first; this only keeps the map sound.
            return Err(BridgeError::Unsupported("endpoint exists"));
        }
        let added = self.add_endpoint(id, |fd, _| D::from_cdev(fd, file));
        if added.is_err() {
            // Inserted, then not placed: nothing may stay behind.
            self.release_endpoint(id);
        }
        added
    }

    /// Detach an endpoint (PASIDs, then the RID), release its vDEVICE and
    /// device, and drop it from the domains it was in.
    pub(super) fn release_endpoint(&mut self, id: u32) {
        let Some(ep) = self.endpoints.get(&id) else {
            return;
        };
        // PASIDs before the RID, as on reset.
        let pasids: Vec<u32> = ep.pasids.keys().copied().collect();
        for p in pasids {
            if let Err(e) = self.point_pasid(id, p, None) {
                limited!(Level::Error, "endpoint {id:#x} pasid {p}: removal: {e}");
                if let Some(d) = self
                    .endpoints
                    .get_mut(&id)
                    .and_then(|e| e.pasids.remove(&p))
                {
                    self.put_domain(d);
                }
            }
        }
        if let Err(e) = self.point(id, Target::Unattached, &mut std::iter::empty()) {
            limited!(Level::Error, "endpoint {id:#x}: removal: {e}");
        }
        let Some(mut ep) = self.endpoints.remove(&id) else {
            return;
        };
        // The vDEVICE before its device; the device detached and closed
        // (the kernel unbinds it from our iommufd with its last fd).
        if let Some(v) = ep.vdevice.take() {
            if let Err(e) = self.fd.destroy(v.raw()) {
                limited!(
                    Level::Error,
                    "endpoint {id:#x}: destroying vDEVICE {v}: {e}"
                );
            }
        }
        ep.dev.release(&self.fd);
        drop(ep.dev);
        // Domains it could not be moved out of lose it now that it is off.
        for d in target_domain(ep.target)
            .into_iter()
            .chain(ep.pasids.into_values())
        {
            self.put_domain(d);
        }
        limited!(Level::Info, "endpoint {id:#x}: host objects released");
    }
}
