// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Real iommufd behind the `HostIommu` trait, for any kind of host device
//! (VFIO cdev, selftest mock).
//!
//! Objects (see spec-notes/iommufd.md):
//! - the RAM IOAS: guest RAM at IOVA = GPA, from the memory table; bypass
//!   targets it (through the nesting parent when the kernel has one);
//! - the blocking IOAS: always empty; unattached endpoints with bypass off;
//! - per MAP/UNMAP domain with a host endpoint in it: an IOAS and its HWPT;
//!   MAP is IOAS_COPY from the RAM IOAS, so pages are pinned once.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;

use log::{debug, info, Level};

use crate::log_limit::limited;
use serde_json::{json, Value};

mod endpoints;
mod faults;
mod ram;
mod tables;

pub(in crate::iommufd_bridge) use faults::write_page_responses;

use super::ids::{FaultId, HwptId, IoasId, NestId, PtId, VdeviceId, VeventqId, ViommuId};
use super::sys::{Features, Iommufd, HWPT_ALLOC_PASID, IOAS_MAP_READABLE, IOAS_MAP_WRITEABLE};
use super::{
    Access, BridgeError, HostIommu, HostMapping, IovaHole, PageResponse, RamRegion, Result, Target,
};
use crate::fault_queue::vevents::VeventKind;
use crate::nested::{Invalidate, TableCaps, TableDesc};

/// A device the host IOMMU translates for, bound to our iommufd.
pub trait HostDevice: Debug + Send {
    /// Made from VFIO cdevs: `from_cdev` works.
    const FROM_CDEV: bool = false;
    /// The iommufd device id (HWPT_ALLOC, fault records).
    fn dev_id(&self) -> u32;
    /// Attach, or atomically replace the attachment, to `pt`.
    fn attach(&mut self, fd: &Iommufd, pt: PtId) -> Result<()>;
    /// Can it attach page tables per PASID?
    fn supports_pasid(&self) -> bool {
        false
    }
    /// Attach `pasid` to `pt`; `replace` when that PASID is attached.
    fn attach_pasid(&mut self, fd: &Iommufd, pasid: u32, pt: PtId, replace: bool) -> Result<()> {
        let _ = (fd, pasid, pt, replace);
        Err(BridgeError::Unsupported("PASID attach"))
    }
    /// Detach `pasid`.
    fn detach_pasid(&mut self, fd: &Iommufd, pasid: u32) -> Result<()> {
        let _ = (fd, pasid);
        Err(BridgeError::Unsupported("PASID detach"))
    }
    /// A device made from a VFIO cdev sent over the control socket, bound
    /// to `fd` (hot-plug). Devices of other kinds cannot be made so.
    fn from_cdev(fd: &Iommufd, file: std::fs::File) -> Result<Self>
    where
        Self: Sized,
    {
        let _ = (fd, file);
        Err(BridgeError::Unsupported(
            "this backend serves selftest endpoints: no VFIO devices",
        ))
    }
    /// For logs and the control socket.
    fn describe(&self) -> Value;
    /// Give the device up (destroy or detach); the last call made on it.
    fn release(&mut self, fd: &Iommufd);
}

#[derive(Debug)]
struct HostEndpoint<D> {
    dev: D,
    target: Target,
    /// The IOAS or HWPT it is attached to now.
    pt: PtId,
    reserved: Vec<IovaHole>,
    caps: TableCaps,
    /// PASID -> the table domain it is attached to.
    pasids: BTreeMap<u32, u32>,
    /// Its vDEVICE on the vIOMMU (virt_id = the endpoint ID).
    vdevice: Option<VdeviceId>,
}

#[derive(Debug)]
struct HostDomain {
    /// The IOAS of a MAP/UNMAP domain; None for a table domain.
    ioas: Option<IoasId>,
    /// The HWPT endpoints attach to (the IOAS when the kernel made it; the
    /// nested HWPT of a table domain).
    hwpt: PtId,
    own_hwpt: bool,
    users: usize,
    /// How a table domain's nested HWPT is invalidated.
    invalidate: Option<NestedInvalidate>,
    /// A table domain's guest table.
    table: Option<TableDesc>,
}

/// IOMMU_HWPT_INVALIDATE for a table domain.
#[derive(Debug, Clone, Copy)]
struct NestedInvalidate {
    /// Its data type.
    data_type: u32,
    /// Whom it names: the nested HWPT, or for SMMUv3 the vIOMMU.
    id: NestId,
}

/// A kernel object read through an FD (fault queue, vEVENTQ).
#[derive(Debug)]
struct KernelQueue<I> {
    id: I,
    file: std::fs::File,
}

/// A region of the memory table with the pieces of it mapped, (gpa, len)
/// each: the parts inside the RAM IOAS's usable IOVA ranges.
#[derive(Debug)]
struct MappedRegion {
    region: RamRegion,
    pieces: Vec<(u64, u64)>,
}

/// The domain a target names, if any.
fn target_domain(t: Target) -> Option<u32> {
    match t {
        Target::Domain(d) | Target::Table { domain: d, .. } => Some(d),
        Target::Unattached | Target::Identity => None,
    }
}

#[derive(Debug)]
pub struct IommufdHost<D: HostDevice> {
    fd: Iommufd,
    features: Features,
    ram_ioas: IoasId,
    block_ioas: IoasId,
    /// A HWPT on the blocking IOAS made with IOMMU_HWPT_ALLOC_PASID, so that
    /// a blocked endpoint may keep PASIDs attached (the kernel refuses PASID
    /// attachments next to a RID on an HWPT made without it).
    block_hwpt: Option<HwptId>,
    /// The kernel took IOMMU_HWPT_ALLOC_PASID: every HWPT we make has it.
    pasid_mode: bool,
    nest_parent: Option<HwptId>,
    /// A plain HWPT on the RAM IOAS where no nesting parent can be made.
    ram_hwpt: Option<HwptId>,
    /// Regions of the memory table, as mapped.
    ram: Vec<MappedRegion>,
    use_map_file: bool,
    bypass: bool,
    endpoints: BTreeMap<u32, HostEndpoint<D>>,
    domains: HashMap<u32, HostDomain>,
    /// IOMMU_HWPT_INVALIDATE calls made (one per run of INVALIDATEs).
    invalidate_calls: u64,
    /// This connection's fault queue.
    fault: Option<KernelQueue<FaultId>>,
    /// A vIOMMU on the nesting parent (kernels with vIOMMU, hosts whose
    /// type we drive): table domains are nested on it, and its vEVENTQ
    /// reports unrecoverable faults.
    viommu: Option<ViommuId>,
    veventq: Option<KernelQueue<VeventqId>>,
    /// The vEVENTQ's events.
    vevent_kind: VeventKind,
    /// Page responses written (accepted by the kernel), and those it
    /// refused because it had completed the group itself.
    responses_written: u64,
    /// write() calls that carried them (one per 64 and per refusal).
    response_writes: u64,
    responses_stale: u64,
}

/// Read/write flags of IOAS_MAP/COPY for a mapping's access.
fn ioas_flags(access: Access) -> u32 {
    let mut f = 0;
    if access.read {
        f |= IOAS_MAP_READABLE;
    }
    if access.write {
        f |= IOAS_MAP_WRITEABLE;
    }
    f
}

impl<D: HostDevice> IommufdHost<D> {
    /// Take over an iommufd: allocate the RAM and blocking IOASes.
    pub fn new(fd: Iommufd, bypass: bool) -> Result<Self> {
        // The first call proves it is an iommufd at all.
        let ram_ioas = fd.ioas_alloc()?;
        let block_ioas = fd.ioas_alloc()?;
        let features = fd.features();
        info!("iommufd: {features}");
        Ok(IommufdHost {
            fd,
            features,
            ram_ioas,
            block_ioas,
            block_hwpt: None,
            pasid_mode: false,
            nest_parent: None,
            ram_hwpt: None,
            ram: Vec::new(),
            use_map_file: features.ioas_map_file,
            bypass,
            endpoints: BTreeMap::new(),
            domains: HashMap::new(),
            invalidate_calls: 0,
            fault: None,
            viommu: None,
            veventq: None,
            vevent_kind: VeventKind::Selftest,
            responses_written: 0,
            response_writes: 0,
            responses_stale: 0,
        })
    }

    /// Did a HWPT allocated before any attach leave `ioas` with no usable
    /// aperture? Some drivers (virtio-iommu on 6.12) size a domain only when
    /// a device attaches; for them the kernel must allocate the HWPT itself
    /// at attach time (attach to the IOAS).
    fn degenerate(&self, ioas: IoasId) -> bool {
        match self.fd.iova_ranges(ioas) {
            Ok(r) => r
                .usable
                .iter()
                .all(|u| u.last.saturating_sub(u.start) < 1 << 20),
            Err(_) => true,
        }
    }

    /// Flags for every HWPT we allocate.
    fn hwpt_flags(&self) -> u32 {
        if self.pasid_mode {
            HWPT_ALLOC_PASID
        } else {
            0
        }
    }

    /// Where blocked DMA goes.
    fn block_pt(&self) -> PtId {
        self.block_hwpt
            .map_or(PtId::Ioas(self.block_ioas), PtId::Hwpt)
    }

    /// Drop one attachment of `domain`; the last one destroys it.
    fn put_domain(&mut self, domain: u32) {
        if let Some(d) = self.domains.get_mut(&domain) {
            d.users -= 1;
            if d.users == 0 {
                self.destroy_domain(domain);
            }
        }
    }

    /// The HWPT or IOAS that bypass DMA goes through.
    fn ram_pt(&self) -> PtId {
        self.nest_parent
            .or(self.ram_hwpt)
            .map_or(PtId::Ioas(self.ram_ioas), PtId::Hwpt)
    }

    /// Create the host side of `domain` for a device, with its mappings.
    fn create_domain(
        &mut self,
        domain: u32,
        dev_id: u32,
        mappings: &mut dyn Iterator<Item = HostMapping>,
    ) -> Result<()> {
        let ioas = self.fd.ioas_alloc()?;
        let (hwpt, own_hwpt) =
            match self
                .fd
                .hwpt_alloc(dev_id, ioas, self.hwpt_flags(), 0, &mut [], None)
            {
                Ok(h) if self.degenerate(ioas) => {
                    debug!("domain {domain}: HWPT without an aperture yet; attaching to the IOAS");
                    let _ = self.fd.destroy(h);
                    (PtId::Ioas(ioas), false)
                }
                Ok(h) => (PtId::Hwpt(h), true),
                Err(e) => {
                    debug!("domain {domain}: HWPT_ALLOC ({e}); attaching to the IOAS");
                    (PtId::Ioas(ioas), false)
                }
            };
        self.domains.insert(
            domain,
            HostDomain {
                ioas: Some(ioas),
                hwpt,
                own_hwpt,
                users: 0,
                invalidate: None,
                table: None,
            },
        );
        for m in mappings {
            if let Err(e) = self.map(domain, m) {
                self.destroy_domain(domain);
                return Err(e);
            }
        }
        Ok(())
    }

    fn destroy_domain(&mut self, domain: u32) {
        let Some(d) = self.domains.remove(&domain) else {
            return;
        };
        if d.own_hwpt {
            if let Err(e) = self.fd.destroy(d.hwpt) {
                limited!(
                    Level::Error,
                    "domain {domain}: destroying HWPT {}: {e}",
                    d.hwpt
                );
            }
        }
        if let Some(ioas) = d.ioas {
            if let Err(e) = self.fd.destroy(ioas) {
                limited!(Level::Error, "domain {domain}: destroying IOAS {ioas}: {e}");
            }
        }
    }

    /// Move endpoint `id` to `target`; on failure nothing changed.
    fn point(
        &mut self,
        id: u32,
        target: Target,
        mappings: &mut dyn Iterator<Item = HostMapping>,
    ) -> Result<()> {
        let Some(ep) = self.endpoints.get(&id) else {
            return Ok(());
        };
        let (old_target, old_pt, dev_id) = (ep.target, ep.pt, ep.dev.dev_id());
        // The domain made for this attach, undone if the attach fails.
        let mut created = None;
        let pt = match target {
            Target::Unattached if self.bypass => self.ram_pt(),
            Target::Unattached => self.block_pt(),
            Target::Identity => self.ram_pt(),
            Target::Domain(d) => {
                if !self.domains.contains_key(&d) {
                    self.create_domain(d, dev_id, mappings)?;
                    created = Some(d);
                }
                self.domains[&d].hwpt
            }
            Target::Table {
                domain: d,
                table,
                page_requests,
            } => {
                if !self.domains.contains_key(&d) {
                    self.create_table_domain(d, dev_id, &table, page_requests)?;
                    created = Some(d);
                }
                self.domains[&d].hwpt
            }
        };
        if pt != old_pt {
            let ep = self.endpoints.get_mut(&id).expect("endpoint checked above");
            let mut r = ep.dev.attach(&self.fd, pt);
            if let (Err(_), Some(d)) = (&r, created) {
                // The device could not use the HWPT made for it; let the
                // kernel pick one for the IOAS instead (not for tables).
                let dom = self.domains.get_mut(&d).expect("created above");
                if let Some(ioas) = dom.ioas {
                    if ep.dev.attach(&self.fd, PtId::Ioas(ioas)).is_ok() {
                        if dom.own_hwpt {
                            let _ = self.fd.destroy(dom.hwpt);
                        }
                        dom.hwpt = PtId::Ioas(ioas);
                        dom.own_hwpt = false;
                        r = Ok(());
                    }
                }
            }
            if let Err(e) = r {
                if let Some(d) = created {
                    self.destroy_domain(d);
                }
                return Err(e);
            }
        }
        let ep = self.endpoints.get_mut(&id).expect("endpoint checked above");
        ep.pt = match created {
            Some(d) => self.domains[&d].hwpt,
            None => pt,
        };
        ep.target = target;
        if old_target != target {
            if let Some(d) = target_domain(target) {
                self.domains.get_mut(&d).unwrap().users += 1;
            }
            if let Some(old) = target_domain(old_target) {
                self.put_domain(old);
            }
        }
        Ok(())
    }
}

impl<D: HostDevice> HostIommu for IommufdHost<D> {
    fn name(&self) -> &'static str {
        "iommufd"
    }

    fn owns(&self, endpoint: u32) -> bool {
        self.endpoints.contains_key(&endpoint)
    }

    fn backs(&self, domain: u32) -> bool {
        self.domains.contains_key(&domain)
    }

    fn set_guest_ram(&mut self, regions: &[RamRegion]) -> Result<()> {
        self.set_ram(regions)
    }

    fn attach(
        &mut self,
        endpoint: u32,
        target: Target,
        mappings: &mut dyn Iterator<Item = HostMapping>,
    ) -> Result<()> {
        self.point(endpoint, target, mappings)
    }

    fn map(&mut self, domain: u32, m: HostMapping) -> Result<()> {
        let Some(ioas) = self.domains.get(&domain).and_then(|d| d.ioas) else {
            return Ok(());
        };
        let flags = ioas_flags(m.access);
        if flags == 0 {
            // No access allowed: nothing for the IOMMU to hold.
            return Ok(());
        }
        let len = m.end.wrapping_sub(m.iova).wrapping_add(1);
        if len == 0 || !self.in_ram(m.phys, len) {
            return Err(BridgeError::NotGuestRam { gpa: m.phys, len });
        }
        Ok(self
            .fd
            .ioas_copy(ioas, m.iova, self.ram_ioas, m.phys, len, flags)?)
    }

    fn unmap(&mut self, domain: u32, iova: u64, end: u64) -> Result<()> {
        let Some(ioas) = self.domains.get(&domain).and_then(|d| d.ioas) else {
            return Ok(());
        };
        let len = end.wrapping_sub(iova).wrapping_add(1);
        match self.fd.ioas_unmap(ioas, iova, len) {
            Ok(_) => Ok(()),
            // Never mapped on the host (no access flags) or already gone.
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn set_bypass(&mut self, on: bool) -> Result<()> {
        self.bypass = on;
        let ids: Vec<u32> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.target == Target::Unattached)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.point(id, Target::Unattached, &mut std::iter::empty())?;
        }
        Ok(())
    }

    fn reset(&mut self, bypass: bool) {
        self.bypass = bypass;
        let ids: Vec<u32> = self.endpoints.keys().copied().collect();
        // PASIDs first: their tables go before the RID moves.
        for &id in &ids {
            let pasids: Vec<u32> = self.endpoints[&id].pasids.keys().copied().collect();
            for p in pasids {
                if let Err(e) = self.point_pasid(id, p, None) {
                    limited!(Level::Error, "endpoint {id:#x} pasid {p}: reset: {e}");
                    // Forget it anyway: the device is released or reused
                    // by the next guest, and its table must not leak.
                    if let Some(d) = self.endpoints.get_mut(&id).unwrap().pasids.remove(&p) {
                        self.put_domain(d);
                    }
                }
            }
        }
        for id in ids {
            if let Err(e) = self.point(id, Target::Unattached, &mut std::iter::empty()) {
                limited!(Level::Error, "endpoint {id:#x}: reset: {e}");
            }
        }
        // Normally gone with their last endpoint; anything left is a bug
        // we would rather not leak.
        let left: Vec<u32> = self.domains.keys().copied().collect();
        for d in left {
            limited!(
                Level::Warn,
                "domain {d}: still held after reset; destroying"
            );
            self.destroy_domain(d);
        }
    }

    fn attach_pasid(&mut self, endpoint: u32, pasid: u32, target: Option<Target>) -> Result<()> {
        self.point_pasid(endpoint, pasid, target)
    }

    fn event_queue_reader(&self) -> Option<super::EventQueue> {
        let KernelQueue { file, .. } = self.veventq.as_ref()?;
        file.try_clone()
            .inspect_err(|e| limited!(Level::Warn, "vEVENTQ FD: {e}"))
            .ok()
            .map(|file| super::EventQueue {
                file,
                kind: self.vevent_kind,
            })
    }

    fn fault_queue_reader(&self) -> Option<std::fs::File> {
        let KernelQueue { file, .. } = self.fault.as_ref()?;
        file.try_clone()
            .inspect_err(|e| limited!(Level::Warn, "fault queue FD: {e}"))
            .ok()
    }

    fn page_response(&mut self, response: PageResponse) -> Result<bool> {
        // Not called back: taken.
        let mut out = Ok(true);
        self.page_responses(&[response], &mut |_, r| out = r);
        out
    }

    fn page_responses(
        &mut self,
        responses: &[PageResponse],
        each: &mut dyn FnMut(usize, Result<bool>),
    ) {
        self.write_responses(responses, each)
    }

    fn endpoint_of_dev(&self, dev_id: u32) -> Option<u32> {
        self.endpoints
            .iter()
            .find(|(_, e)| e.dev.dev_id() == dev_id)
            .map(|(&id, _)| id)
    }

    fn invalidate(&mut self, domain: u32, invs: &[Invalidate]) -> Result<()> {
        self.invalidate_table(domain, invs)
    }

    fn table_caps(&self, endpoint: u32) -> TableCaps {
        self.endpoints
            .get(&endpoint)
            .map(|e| e.caps.clone())
            .unwrap_or_default()
    }

    fn disconnect(&mut self) {
        self.reset(false);
        if let Err(e) = self.set_guest_ram(&[]) {
            limited!(Level::Error, "iommufd: unmapping guest RAM: {e}");
        }
        // The fault object goes with the connection: close its FD first,
        // then destroy it (nothing refers to it once the tables are gone).
        if let Some(KernelQueue { id, file }) = self.fault.take() {
            drop(file);
            if let Err(e) = self.fd.destroy(id) {
                limited!(Level::Error, "iommufd: destroying fault queue {id}: {e}");
            }
        }
    }

    fn reserved(&self, endpoint: u32) -> Option<&[IovaHole]> {
        self.endpoints.get(&endpoint).map(|e| e.reserved.as_slice())
    }

    fn takes_vfio(&self) -> bool {
        D::FROM_CDEV
    }

    fn add_vfio(&mut self, id: u32, file: std::fs::File) -> Result<()> {
        self.add_vfio_endpoint(id, file)
    }

    fn remove_endpoint(&mut self, id: u32) {
        self.release_endpoint(id);
    }

    fn describe(&self) -> Value {
        let target = |t: Target| match t {
            Target::Unattached => json!("unattached"),
            Target::Identity => json!("identity"),
            Target::Domain(d) => json!(d),
            Target::Table { domain, .. } => json!(domain),
        };
        json!({
            "kind": "iommufd",
            "features": self.features,
            "ram_ioas": self.ram_ioas,
            "blocking_ioas": self.block_ioas,
            "blocking_pt": self.block_pt(),
            "pasid_mode": self.pasid_mode,
            "nest_parent": self.nest_parent,
            "bypass_pt": self.ram_pt(),
            "invalidate_calls": self.invalidate_calls,
            "fault_queue": self.fault.as_ref().map(|f| f.id),
            "viommu": self.viommu,
            "veventq": self.veventq.as_ref().map(|q| q.id),
            "page_responses_written": self.responses_written,
            "page_response_writes": self.response_writes,
            "page_responses_stale": self.responses_stale,
            "ram": self.ram.iter().flat_map(|m| &m.pieces).map(|&(gpa, len)| json!({"gpa": gpa, "len": len})).collect::<Vec<_>>(),
            "endpoints": self.endpoints.iter().map(|(id, e)| json!({
                "id": id,
                "table_formats": e.caps.formats,
                "device": e.dev.describe(),
                "dev_id": e.dev.dev_id(),
                "pt_id": e.pt,
                "target": target(e.target),
                "vdevice": e.vdevice,
                "pasids": e.pasids.iter().map(|(p, d)| json!({"pasid": p, "domain": d})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "domains": self.domains.iter().map(|(id, d)| json!({
                "id": id,
                "ioas": d.ioas,
                "hwpt": d.hwpt,
                "nested": d.invalidate.is_some(),
                "endpoints": d.users,
            })).collect::<Vec<_>>(),
        })
    }
}

impl<D: HostDevice> Drop for IommufdHost<D> {
    /// Dependency order: devices off and released, domains, the nesting
    /// parent, then the IOASes (which unpin guest RAM).
    fn drop(&mut self) {
        self.reset(false);
        // vDEVICEs before their devices; the vEVENTQ (FD first) and the
        // vIOMMU before the nesting parent.
        for ep in self.endpoints.values_mut() {
            if let Some(v) = ep.vdevice.take() {
                let _ = self.fd.destroy(v);
            }
        }
        for (_, mut ep) in std::mem::take(&mut self.endpoints) {
            ep.dev.release(&self.fd);
        }
        if let Some(KernelQueue { id, file }) = self.veventq.take() {
            drop(file);
            let _ = self.fd.destroy(id);
        }
        if let Some(v) = self.viommu.take() {
            let _ = self.fd.destroy(v);
        }
        if let Some(KernelQueue { id, file }) = self.fault.take() {
            drop(file);
            let _ = self.fd.destroy(id);
        }
        for h in [
            self.block_hwpt.take(),
            self.nest_parent.take(),
            self.ram_hwpt.take(),
        ]
        .into_iter()
        .flatten()
        {
            let _ = self.fd.destroy(h);
        }
        let _ = self.fd.destroy(self.ram_ioas);
        let _ = self.fd.destroy(self.block_ioas);
    }
}
