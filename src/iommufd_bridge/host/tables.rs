// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest tables nested on guest RAM: what a device can nest, the vIOMMU
//! and its vDEVICEs, nested HWPTs, PASID attachments.

use log::{debug, info, warn};

use super::{target_domain, HostDevice, HostDomain, IommufdHost, KernelQueue, NestedInvalidate};
use crate::fault_queue::vevents::VeventKind;
use crate::iommufd_bridge::abi::{
    invalidate_entries, nested_data, smmu3_entries, Entries, NestedData,
};
use crate::iommufd_bridge::ids::{NestId, PtId, VdeviceId};
use crate::iommufd_bridge::sys::{
    HwInfoRaw, Veventq, HWPT_ALLOC_NEST_PARENT, HWPT_ALLOC_PASID, HW_INFO_ARM_SMMUV3,
    HW_INFO_INTEL_VTD, HW_INFO_SELFTEST, VEVENTQ_TYPE_ARM_SMMUV3, VEVENTQ_TYPE_SELFTEST,
    VIOMMU_TYPE_ARM_SMMUV3, VIOMMU_TYPE_SELFTEST,
};
use crate::iommufd_bridge::{BridgeError, Result, Target};
use crate::nested::smmu3::{self, SmmuInfo};
use crate::nested::{HwInfo, Invalidate, TableCaps, TableDesc};
use crate::wire::{FORMAT_ARM_SMMU3, FORMAT_HOST_SELFTEST, FORMAT_INTEL_VTD};

/// vEVENTQ depth: events the kernel holds while we do not read.
const VEVENTQ_DEPTH: u32 = 256;

impl<D: HostDevice> IommufdHost<D> {
    /// Which guest tables the device can nest on guest RAM, from its IOMMU's
    /// identification; the reason for none is logged once, here.
    pub(super) fn table_caps_of(&self, id: u32, dev: &D) -> TableCaps {
        let raw = match self.fd.hw_info(dev.dev_id()) {
            Ok(r) => r,
            Err(e) => {
                info!("endpoint {id:#x}: no IOMMU_GET_HW_INFO ({e}); ATTACH_TABLE answers UNSUPP");
                return TableCaps::default();
            }
        };
        let HwInfoRaw {
            info_type,
            capabilities,
            max_pasid_log2,
            ref data,
        } = raw;
        let format = match info_type {
            HW_INFO_SELFTEST => Some(FORMAT_HOST_SELFTEST),
            HW_INFO_INTEL_VTD => Some(FORMAT_INTEL_VTD),
            // A vSTE needs a vIOMMU (6.13+) to nest on.
            HW_INFO_ARM_SMMUV3 if self.features.viommu => Some(FORMAT_ARM_SMMU3),
            HW_INFO_ARM_SMMUV3 => {
                info!("endpoint {id:#x}: SMMUv3 tables need a vIOMMU, which this kernel lacks; ATTACH_TABLE answers UNSUPP");
                None
            }
            _ => None,
        };
        let formats = match (format, self.nest_parent) {
            (Some(f), Some(_)) => vec![f],
            (Some(_), None) => {
                info!("endpoint {id:#x}: no nesting parent HWPT; ATTACH_TABLE answers UNSUPP");
                Vec::new()
            }
            (None, _) => {
                info!(
                    "endpoint {id:#x}: host IOMMU type {info_type:#x} has no nested format we drive; \
                     ATTACH_TABLE answers UNSUPP"
                );
                Vec::new()
            }
        };
        // PASID attach needs the kernel's ALLOC_PASID, a device that can, and
        // PASIDs enabled on it (GET_HW_INFO reports them only then).
        let pasid_bits = if self.pasid_mode && dev.supports_pasid() && !formats.is_empty() {
            max_pasid_log2.min(crate::nested::request::MAX_PASID_BITS)
        } else {
            0
        };
        // Page requests: a fault queue (6.11+) for nested HWPTs.
        let page_requests = self.features.fault_queue && !formats.is_empty();
        TableCaps {
            formats,
            pasid_bits,
            page_requests,
            hw_info: Some(HwInfo {
                info_type,
                capabilities,
                max_pasid_log2,
                data: data.clone(),
            }),
        }
    }

    /// The vIOMMU (made with the first device it suits) and this device's
    /// vDEVICE on it (virt_id: the endpoint ID, which is the guest's stream
    /// ID in SMMUv3 commands), so that its tables nest on the vIOMMU and its
    /// unrecoverable faults reach the vEVENTQ. Types driven: the selftest
    /// mock's and SMMUv3.
    pub(super) fn virtual_device(
        &mut self,
        id: u32,
        dev: &D,
        caps: &TableCaps,
    ) -> Option<VdeviceId> {
        let parent = self.nest_parent?;
        let info_type = caps.hw_info.as_ref().map(|h| h.info_type);
        // (vIOMMU type, vEVENTQ type, its events)
        let kind = match info_type {
            Some(HW_INFO_SELFTEST) => (
                VIOMMU_TYPE_SELFTEST,
                VEVENTQ_TYPE_SELFTEST,
                VeventKind::Selftest,
            ),
            Some(HW_INFO_ARM_SMMUV3) => (
                VIOMMU_TYPE_ARM_SMMUV3,
                VEVENTQ_TYPE_ARM_SMMUV3,
                VeventKind::ArmSmmuv3,
            ),
            _ => return None,
        };
        if !self.features.viommu {
            return None;
        }
        if self.viommu.is_none() {
            match self.fd.viommu_alloc(dev.dev_id(), parent, kind.0) {
                Ok(v) => {
                    info!(
                        "iommufd: vIOMMU {v} (type {:#x}) on the nesting parent",
                        kind.0
                    );
                    self.viommu = Some(v);
                    if self.features.veventq {
                        match self.fd.veventq_alloc(v, kind.1, VEVENTQ_DEPTH) {
                            Ok(Veventq { id, file }) => {
                                info!("iommufd: vEVENTQ {id} for unrecoverable faults");
                                self.veventq = Some(KernelQueue { id, file });
                                self.vevent_kind = kind.2;
                            }
                            Err(e) => info!("iommufd: no vEVENTQ ({e})"),
                        }
                    }
                }
                Err(e) => {
                    info!("iommufd: no vIOMMU ({e}); tables nest on the parent HWPT");
                    return None;
                }
            }
        }
        let viommu = self.viommu?;
        match self.fd.vdevice_alloc(viommu, dev.dev_id(), u64::from(id)) {
            Ok(v) => Some(v),
            Err(e) => {
                warn!("endpoint {id:#x}: vDEVICE: {e}");
                None
            }
        }
    }

    /// A table domain: the guest's table as a nested HWPT on the vIOMMU or
    /// the nesting parent, for device `dev_id`.
    pub(super) fn create_table_domain(
        &mut self,
        domain: u32,
        dev_id: u32,
        table: &TableDesc,
        page_requests: bool,
    ) -> Result<()> {
        let parent = match table {
            TableDesc::ArmSmmu3 { .. } => {
                self.viommu
                    .map(NestId::Viommu)
                    .ok_or(BridgeError::Unsupported(
                        "ARM_SMMU3 tables need a vIOMMU, and none could be made",
                    ))?
            }
            _ => self
                .viommu
                .map(NestId::Viommu)
                .or(self.nest_parent.map(NestId::Hwpt))
                .ok_or(BridgeError::Unsupported(
                    "the host IOMMU has no nesting parent",
                ))?,
        };
        let smmu = matches!(table, TableDesc::ArmSmmu3 { .. });
        let NestedData {
            data_type,
            invalidate_type: inv_type,
            mut data,
        } = nested_data(table)?;
        let fault_id = if page_requests {
            Some(self.fault_queue()?)
        } else {
            None
        };
        // An SMMUv3 nested domain takes no flags: its PASIDs live in the
        // guest's CD table.
        let flags = if smmu { 0 } else { self.hwpt_flags() };
        let hwpt = self
            .fd
            .hwpt_alloc(dev_id, parent, flags, data_type, &mut data, fault_id)?;
        debug!("domain {domain}: nested HWPT {hwpt} on parent {parent}");
        self.domains.insert(
            domain,
            HostDomain {
                ioas: None,
                hwpt: PtId::Hwpt(hwpt),
                own_hwpt: true,
                users: 0,
                invalidate: Some(NestedInvalidate {
                    data_type: inv_type,
                    id: if smmu { parent } else { NestId::Hwpt(hwpt) },
                }),
                table: Some(*table),
            },
        );
        Ok(())
    }

    /// SMMUv3 commands for `invs` on a domain whose vSTE is `ste`, for the
    /// vIOMMU (struct iommu_viommu_arm_smmuv3_invalidate each). The
    /// streams are the domain's endpoints' vDEVICEs.
    pub(super) fn smmu3_commands(
        &self,
        domain: u32,
        ste: [u64; 2],
        invs: &[Invalidate],
    ) -> Entries {
        let members = || {
            self.endpoints
                .iter()
                .filter(move |(_, e)| target_domain(e.target) == Some(domain))
        };
        let vsids: Vec<u32> = members()
            .filter(|(_, e)| e.vdevice.is_some())
            .map(|(&id, _)| id)
            .collect();
        let info = members()
            .find_map(|(_, e)| e.caps.hw_info.as_ref())
            .map_or_else(SmmuInfo::default, |h| SmmuInfo::parse(&h.data));
        let mut cmds = Vec::new();
        for inv in invs {
            smmu3::commands(inv, ste, &vsids, info, &mut cmds);
        }
        smmu3_entries(&cmds)
    }

    /// Point `pasid` of endpoint `id` at a table domain, or detach it.
    pub(super) fn point_pasid(
        &mut self,
        id: u32,
        pasid: u32,
        target: Option<Target>,
    ) -> Result<()> {
        let Some(ep) = self.endpoints.get(&id) else {
            return Ok(());
        };
        let (old, dev_id) = (ep.pasids.get(&pasid).copied(), ep.dev.dev_id());
        let Some(target) = target else {
            let Some(old) = old else {
                return Ok(());
            };
            let ep = self.endpoints.get_mut(&id).expect("endpoint checked above");
            ep.dev.detach_pasid(&self.fd, pasid)?;
            ep.pasids.remove(&pasid);
            self.put_domain(old);
            return Ok(());
        };
        let Target::Table {
            domain,
            table,
            page_requests,
        } = target
        else {
            return Err(BridgeError::Unsupported(
                "PASID attach of a non-table domain",
            ));
        };
        if old == Some(domain) {
            return Ok(());
        }
        let mut created = false;
        if !self.domains.contains_key(&domain) {
            self.create_table_domain(domain, dev_id, &table, page_requests)?;
            created = true;
        }
        let hwpt = self.domains[&domain].hwpt;
        let ep = self.endpoints.get_mut(&id).expect("endpoint checked above");
        if let Err(e) = ep.dev.attach_pasid(&self.fd, pasid, hwpt, old.is_some()) {
            if created {
                self.destroy_domain(domain);
            }
            return Err(e);
        }
        ep.pasids.insert(pasid, domain);
        self.domains.get_mut(&domain).expect("exists").users += 1;
        if let Some(old) = old {
            self.put_domain(old);
        }
        Ok(())
    }
    /// The nesting parent HWPT on the RAM IOAS (bypass, and stage 2 of
    /// nested domains), made with the first device; where the kernel
    /// cannot nest, a plain HWPT in its place.
    pub(super) fn make_ram_parent(&mut self, dev: &D) {
        let parent = |flags| {
            self.fd
                .hwpt_alloc(dev.dev_id(), self.ram_ioas, flags, 0, &mut [], None)
        };
        // With PASID support where the kernel and device have it (6.15+).
        let with_pasid = if dev.supports_pasid() {
            parent(HWPT_ALLOC_NEST_PARENT | HWPT_ALLOC_PASID)
                .inspect_err(|e| {
                    info!("iommufd: no nesting parent with IOMMU_HWPT_ALLOC_PASID ({e})")
                })
                .ok()
        } else {
            None
        };
        if with_pasid.is_some() {
            self.pasid_mode = true;
            match self.fd.hwpt_alloc(
                dev.dev_id(),
                self.block_ioas,
                HWPT_ALLOC_PASID,
                0,
                &mut [],
                None,
            ) {
                Ok(h) => self.block_hwpt = Some(h),
                Err(e) => info!("iommufd: blocking HWPT with PASID support: {e}"),
            }
        }
        match with_pasid.map_or_else(|| parent(HWPT_ALLOC_NEST_PARENT), Ok) {
            Ok(h) => {
                info!(
                    "iommufd: nesting parent HWPT {h} on the RAM IOAS{}",
                    if self.pasid_mode { " (PASID)" } else { "" }
                );
                self.nest_parent = Some(h);
            }
            Err(e) => {
                // A plain HWPT still gives the RAM IOAS the device's
                // aperture (and pins RAM) before guest RAM arrives.
                info!("iommufd: no nesting parent ({e}); a plain HWPT on the RAM IOAS");
                match self
                    .fd
                    .hwpt_alloc(dev.dev_id(), self.ram_ioas, 0, 0, &mut [], None)
                {
                    Ok(h) if self.degenerate(self.ram_ioas) => {
                        info!("iommufd: the RAM IOAS's HWPT has no usable aperture before attach; bypass attaches to the IOAS");
                        let _ = self.fd.destroy(h);
                    }
                    Ok(h) => self.ram_hwpt = Some(h),
                    Err(e) => info!("iommufd: HWPT_ALLOC on the RAM IOAS: {e}"),
                }
            }
        }
    }

    pub(super) fn invalidate_table(&mut self, domain: u32, invs: &[Invalidate]) -> Result<()> {
        let Some(d) = self.domains.get(&domain) else {
            return Ok(());
        };
        let Some(NestedInvalidate { data_type, id }) = d.invalidate else {
            return Err(BridgeError::Unsupported(
                "INVALIDATE of a domain without a table",
            ));
        };
        let Entries {
            entry_len,
            data: mut entries,
        } = match d.table {
            Some(TableDesc::ArmSmmu3 { ste }) => self.smmu3_commands(domain, ste, invs),
            _ => invalidate_entries(data_type, invs),
        };
        if entries.is_empty() {
            return Ok(());
        }
        self.invalidate_calls += 1;
        Ok(self
            .fd
            .hwpt_invalidate(id, data_type, entry_len, &mut entries)?)
    }
}
