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

use log::{debug, error, info, warn, Level};

use crate::log_limit::limited;
use serde_json::{json, Value};

use super::sys::{
    Features, HwInfoRaw, Iommufd, HWPT_ALLOC_NEST_PARENT, HWPT_ALLOC_PASID, HWPT_DATA_ARM_SMMUV3,
    HWPT_DATA_SELFTEST, HWPT_DATA_VTD_S1, HW_INFO_ARM_SMMUV3, HW_INFO_INTEL_VTD, HW_INFO_SELFTEST,
    INVALIDATE_DATA_SELFTEST, INVALIDATE_DATA_VTD_S1, IOAS_MAP_READABLE, IOAS_MAP_WRITEABLE,
    VEVENTQ_TYPE_ARM_SMMUV3, VEVENTQ_TYPE_SELFTEST, VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
    VIOMMU_TYPE_ARM_SMMUV3, VIOMMU_TYPE_SELFTEST,
};
use super::{
    Access, BridgeError, HoleKind, HostIommu, HostMapping, IovaHole, RamRegion, Result, Target,
    MSI_END, MSI_START,
};
use crate::nested::request::{
    AT_F_EAFE, AT_F_SRE, AT_F_WPE, FORMAT_ARM_SMMU3, FORMAT_HOST_SELFTEST, FORMAT_INTEL_VTD,
    INV_CACHE_CONFIG,
};
use crate::nested::smmu3::{self, SmmuInfo};
use crate::nested::{HwInfo, Invalidate, TableCaps, TableDesc};

/// A device the host IOMMU translates for, bound to our iommufd.
pub trait HostDevice: Debug + Send {
    /// The iommufd device id (HWPT_ALLOC, fault records).
    fn dev_id(&self) -> u32;
    /// Attach, or atomically replace the attachment, to `pt_id`.
    fn attach(&mut self, fd: &Iommufd, pt_id: u32) -> Result<()>;
    /// Can it attach page tables per PASID?
    fn supports_pasid(&self) -> bool {
        false
    }
    /// Attach `pasid` to `pt_id`; `replace` when that PASID is attached.
    fn attach_pasid(&mut self, fd: &Iommufd, pasid: u32, pt_id: u32, replace: bool) -> Result<()> {
        let _ = (fd, pasid, pt_id, replace);
        Err(BridgeError::Unsupported("PASID attach"))
    }
    /// Detach `pasid`.
    fn detach_pasid(&mut self, fd: &Iommufd, pasid: u32) -> Result<()> {
        let _ = (fd, pasid);
        Err(BridgeError::Unsupported("PASID detach"))
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
    pt: u32,
    reserved: Vec<IovaHole>,
    caps: TableCaps,
    /// PASID -> the table domain it is attached to.
    pasids: BTreeMap<u32, u32>,
    /// Its vDEVICE on the vIOMMU (virt_id = the endpoint ID).
    vdevice: Option<u32>,
}

#[derive(Debug)]
struct HostDomain {
    /// The IOAS of a MAP/UNMAP domain; None for a table domain.
    ioas: Option<u32>,
    /// The HWPT endpoints attach to (== ioas when the kernel made it; the
    /// nested HWPT of a table domain).
    hwpt: u32,
    own_hwpt: bool,
    users: usize,
    /// IOMMU_HWPT_INVALIDATE data type of a table domain's nested HWPT.
    invalidate_type: Option<u32>,
    /// Whom IOMMU_HWPT_INVALIDATE names: the nested HWPT, or for SMMUv3
    /// the vIOMMU.
    invalidate_id: u32,
    /// A table domain's guest table.
    table: Option<TableDesc>,
}

/// vEVENTQ depth: events the kernel holds while we do not read.
const VEVENTQ_DEPTH: u32 = 256;

/// The domain a target names, if any.
fn target_domain(t: Target) -> Option<u32> {
    match t {
        Target::Domain(d) | Target::Table { domain: d, .. } => Some(d),
        Target::Unattached | Target::Identity => None,
    }
}

/// HWPT_ALLOC data for a guest table: (data type, invalidate type, bytes).
fn nested_data(table: &TableDesc) -> Result<(u32, u32, Vec<u8>)> {
    match *table {
        TableDesc::HostSelftest { iotlb } => Ok((
            HWPT_DATA_SELFTEST,
            INVALIDATE_DATA_SELFTEST,
            iotlb.to_le_bytes().to_vec(),
        )),
        TableDesc::IntelVtd {
            flags,
            pgtbl,
            addr_width,
        } => {
            // struct iommu_hwpt_vtd_s1: the kernel's flag bits differ from ours.
            let mut f = 0u64;
            for (ours, kernel) in [(AT_F_SRE, 1), (AT_F_EAFE, 2), (AT_F_WPE, 4)] {
                if flags & ours != 0 {
                    f |= kernel;
                }
            }
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&f.to_le_bytes());
            d.extend_from_slice(&pgtbl.to_le_bytes());
            d.extend_from_slice(&addr_width.to_le_bytes());
            d.extend_from_slice(&0u32.to_le_bytes());
            Ok((HWPT_DATA_VTD_S1, INVALIDATE_DATA_VTD_S1, d))
        }
        TableDesc::ArmSmmu3 { ste } => {
            // struct iommu_hwpt_arm_smmuv3 {ste[2]}, little-endian.
            let mut d = Vec::with_capacity(16);
            d.extend_from_slice(&ste[0].to_le_bytes());
            d.extend_from_slice(&ste[1].to_le_bytes());
            Ok((HWPT_DATA_ARM_SMMUV3, VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, d))
        }
    }
}

/// IOMMU_HWPT_INVALIDATE entries for `invs`: (entry_len, bytes). Whatever
/// the host cannot express exactly is widened, never narrowed.
fn invalidate_entries(data_type: u32, invs: &[Invalidate]) -> (u32, Vec<u8>) {
    let mut out = Vec::new();
    if data_type == INVALIDATE_DATA_SELFTEST {
        // struct iommu_hwpt_invalidate_selftest {flags (ALL = 1), iotlb_id}:
        // the tag names one mock IOTLB slot; anything else flushes all.
        for inv in invs {
            let (flags, slot) = match inv.id.map(u32::try_from) {
                Some(Ok(slot)) => (0u32, slot),
                _ => (1, 0),
            };
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&slot.to_le_bytes());
        }
        return (8, out);
    }
    // struct iommu_hwpt_vtd_s1_invalidate {addr, npages, flags (LEAF = 1), rsvd}.
    for inv in invs {
        let pages = match inv.scope {
            crate::nested::InvScope::Address {
                address,
                nr_pages,
                page_shift,
            } if inv.caches & INV_CACHE_CONFIG == 0 => nr_pages
                .checked_shl(u32::from(page_shift - 12))
                .filter(|&p| p >> (page_shift - 12) == nr_pages)
                .map(|p| (address, p)),
            _ => None,
        };
        let (addr, npages, leaf) = match pages {
            Some((a, n)) => (a, n, inv.leaf),
            None => (0, u64::MAX, false),
        };
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&npages.to_le_bytes());
        out.extend_from_slice(&u32::from(leaf).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    (24, out)
}

/// Write struct iommu_hwpt_page_response {cookie, code} records, up to 64
/// in one write(); `each(i, result)` for every one, in order: Ok(true)
/// taken, Ok(false) refused as unknown (the kernel had completed the
/// group: EINVAL). The kernel takes responses in order and stops at the
/// first it refuses, returning the bytes it took, or (none taken) that
/// response's errno: so write, skip the refused one, go on.
fn write_page_responses(
    w: &mut impl std::io::Write,
    responses: &[(u32, u16)],
    each: &mut dyn FnMut(usize, Result<bool>),
) {
    const RESP: usize = 8;
    const BATCH: usize = 64;
    for (base, chunk) in responses.chunks(BATCH).enumerate() {
        let base = base * BATCH;
        // The kernel takes SUCCESS (0) and INVALID (1) only.
        let mut buf = [0u8; RESP * BATCH];
        for (i, &(cookie, code)) in chunk.iter().enumerate() {
            let kcode: u32 = if code == 0 { 0 } else { 1 };
            buf[i * RESP..i * RESP + 4].copy_from_slice(&cookie.to_le_bytes());
            buf[i * RESP + 4..(i + 1) * RESP].copy_from_slice(&kcode.to_le_bytes());
        }
        let mut i = 0;
        while i < chunk.len() {
            match w.write(&buf[i * RESP..chunk.len() * RESP]) {
                Ok(n) if n >= RESP && n % RESP == 0 => {
                    for k in i..i + n / RESP {
                        each(base + k, Ok(true));
                    }
                    i += n / RESP;
                }
                Ok(n) => {
                    let detail = format!("{n} bytes of a response");
                    each(
                        base + i,
                        Err(BridgeError::Host {
                            op: "fault queue write",
                            detail,
                        }),
                    );
                    i += 1;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    each(base + i, Ok(false));
                    i += 1;
                }
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    each(
                        base + i,
                        Err(BridgeError::Kernel {
                            op: "fault queue write",
                            errno,
                        }),
                    );
                    i += 1;
                }
            }
        }
    }
}

#[derive(Debug)]
pub struct IommufdHost<D: HostDevice> {
    fd: Iommufd,
    features: Features,
    ram_ioas: u32,
    block_ioas: u32,
    /// A HWPT on the blocking IOAS made with IOMMU_HWPT_ALLOC_PASID, so that
    /// a blocked endpoint may keep PASIDs attached (the kernel refuses PASID
    /// attachments next to a RID on an HWPT made without it).
    block_hwpt: Option<u32>,
    /// The kernel took IOMMU_HWPT_ALLOC_PASID: every HWPT we make has it.
    pasid_mode: bool,
    nest_parent: Option<u32>,
    /// A plain HWPT on the RAM IOAS where no nesting parent can be made.
    ram_hwpt: Option<u32>,
    /// Regions of the memory table, each with the pieces of it mapped (the
    /// parts inside the RAM IOAS's usable IOVA ranges).
    ram: Vec<(RamRegion, Vec<(u64, u64)>)>,
    use_map_file: bool,
    bypass: bool,
    endpoints: BTreeMap<u32, HostEndpoint<D>>,
    domains: HashMap<u32, HostDomain>,
    /// IOMMU_HWPT_INVALIDATE calls made (one per run of INVALIDATEs).
    invalidate_calls: u64,
    /// This connection's fault queue: (fault id, its FD).
    fault: Option<(u32, std::fs::File)>,
    /// A vIOMMU on the nesting parent (kernels with vIOMMU, hosts whose
    /// type we drive): table domains are nested on it, and its vEVENTQ
    /// reports unrecoverable faults.
    viommu: Option<u32>,
    veventq: Option<(u32, std::fs::File)>,
    /// The vEVENTQ's events: (data length, offset of the virtual ID in it).
    vevent_format: (usize, usize),
    /// Page responses written (accepted by the kernel), and those it
    /// refused because it had completed the group itself.
    responses_written: u64,
    responses_stale: u64,
}

/// The parts of guest RAM [gpa, last] to map: its intersections with the
/// `usable` IOVA ranges (inclusive), shrunk to multiples of `align` (> 0).
/// The frontend chooses `gpa` and `last`: a region in the last `align`
/// bytes of the space has no aligned start, and none may wrap to 0.
fn region_pieces(gpa: u64, last: u64, usable: &[(u64, u64)], align: u64) -> Vec<(u64, u64)> {
    let mut pieces = Vec::new();
    for &(s, e) in usable {
        // Intersect, then shrink to the IOAS's alignment.
        let (s, e) = (s.max(gpa), e.min(last));
        let Some(s) = s.checked_next_multiple_of(align) else {
            continue;
        };
        let Some(d) = e.checked_sub(s) else {
            continue;
        };
        // Whole aligned blocks in [s, e] (a length saturates below 2^64).
        let len = d.saturating_add(1) / align * align;
        if len > 0 {
            pieces.push((s, len));
        }
    }
    pieces
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

/// The complement of `ranges` (usable IOVAs, inclusive) in the 64-bit space,
/// as untranslated holes, with the MSI window cut out and reported as MSI.
pub fn reserved_from_ranges(ranges: &[(u64, u64)]) -> Vec<IovaHole> {
    let mut usable = ranges.to_vec();
    usable.sort_unstable();
    let mut holes = Vec::new();
    let mut next = Some(0u64);
    for &(s, e) in &usable {
        if let Some(n) = next {
            if s > n {
                holes.push((n, s - 1));
            }
            if e >= n {
                next = e.checked_add(1);
            }
        }
    }
    if let Some(n) = next {
        holes.push((n, u64::MAX));
    }
    let mut out = vec![IovaHole {
        start: MSI_START,
        end: MSI_END,
        kind: HoleKind::Msi,
    }];
    for (s, e) in holes {
        // Cut [MSI_START, MSI_END] out of the hole.
        if s < MSI_START {
            out.push(IovaHole {
                start: s,
                end: e.min(MSI_START - 1),
                kind: HoleKind::Untranslated,
            });
        }
        if e > MSI_END {
            out.push(IovaHole {
                start: s.max(MSI_END + 1),
                end: e,
                kind: HoleKind::Untranslated,
            });
        }
    }
    out
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
            vevent_format: (4, 0),
            responses_written: 0,
            responses_stale: 0,
        })
    }

    /// Add an endpoint whose device `make` creates, attached to the
    /// blocking IOAS. Learns its usable IOVA ranges alone in a scratch IOAS,
    /// then puts it where an unattached endpoint belongs.
    pub fn add_endpoint(
        &mut self,
        id: u32,
        make: impl FnOnce(&Iommufd, u32) -> Result<D>,
    ) -> Result<()> {
        let mut dev = make(&self.fd, self.block_ioas)?;
        let scratch = self.fd.ioas_alloc()?;
        let ranges = dev
            .attach(&self.fd, scratch)
            .and_then(|_| Ok(self.fd.iova_ranges(scratch)?));
        if let Err(e) = dev.attach(&self.fd, self.block_ioas) {
            error!("endpoint {id:#x}: back to the blocking IOAS: {e}");
        }
        let _ = self.fd.destroy(scratch);
        let (ranges, align) = match ranges {
            Ok(r) => r,
            Err(e) => {
                dev.release(&self.fd);
                return Err(e);
            }
        };
        info!("endpoint {id:#x}: usable IOVA {ranges:x?}, alignment {align:#x}");
        if self.nest_parent.is_none() && self.ram_hwpt.is_none() {
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
        let caps = self.table_caps_of(id, &dev);
        let vdevice = self.virtual_device(id, &dev, &caps);
        self.endpoints.insert(
            id,
            HostEndpoint {
                dev,
                target: Target::Unattached,
                pt: self.block_ioas,
                reserved: reserved_from_ranges(&ranges),
                caps,
                pasids: BTreeMap::new(),
                vdevice,
            },
        );
        self.point(id, Target::Unattached, &mut std::iter::empty())
    }

    /// Which guest tables the device can nest on guest RAM, from its IOMMU's
    /// identification; the reason for none is logged once, here.
    fn table_caps_of(&self, id: u32, dev: &D) -> TableCaps {
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
    fn virtual_device(&mut self, id: u32, dev: &D, caps: &TableCaps) -> Option<u32> {
        let parent = self.nest_parent?;
        let info_type = caps.hw_info.as_ref().map(|h| h.info_type);
        // (vIOMMU type, vEVENTQ type, event length, virt_id offset in it)
        let kind = match info_type {
            Some(HW_INFO_SELFTEST) => (VIOMMU_TYPE_SELFTEST, VEVENTQ_TYPE_SELFTEST, 4, 0),
            // struct iommu_vevent_arm_smmuv3 {evt[4]}: the vSID is
            // evt[0] bits 63:32.
            Some(HW_INFO_ARM_SMMUV3) => (VIOMMU_TYPE_ARM_SMMUV3, VEVENTQ_TYPE_ARM_SMMUV3, 32, 4),
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
                            Ok(q) => {
                                info!("iommufd: vEVENTQ {} for unrecoverable faults", q.0);
                                self.veventq = Some(q);
                                self.vevent_format = (kind.2, kind.3);
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
    fn create_table_domain(
        &mut self,
        domain: u32,
        dev_id: u32,
        table: &TableDesc,
        page_requests: bool,
    ) -> Result<()> {
        let parent = match table {
            TableDesc::ArmSmmu3 { .. } => self.viommu.ok_or(BridgeError::Unsupported(
                "ARM_SMMU3 tables need a vIOMMU, and none could be made",
            ))?,
            _ => self
                .viommu
                .or(self.nest_parent)
                .ok_or(BridgeError::Unsupported(
                    "the host IOMMU has no nesting parent",
                ))?,
        };
        let smmu = matches!(table, TableDesc::ArmSmmu3 { .. });
        let (data_type, inv_type, mut data) = nested_data(table)?;
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
                hwpt,
                own_hwpt: true,
                users: 0,
                invalidate_type: Some(inv_type),
                invalidate_id: if smmu { parent } else { hwpt },
                table: Some(*table),
            },
        );
        Ok(())
    }

    /// SMMUv3 commands for `invs` on a domain whose vSTE is `ste`, for the
    /// vIOMMU (struct iommu_viommu_arm_smmuv3_invalidate {cmd[2]} each):
    /// (entry_len, bytes). The streams are the domain's endpoints' vDEVICEs.
    fn smmu3_commands(&self, domain: u32, ste: [u64; 2], invs: &[Invalidate]) -> (u32, Vec<u8>) {
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
        let mut out = Vec::with_capacity(cmds.len() * 16);
        for c in cmds {
            out.extend_from_slice(&c[0].to_le_bytes());
            out.extend_from_slice(&c[1].to_le_bytes());
        }
        (16, out)
    }

    /// The connection's fault queue, made when the first table with
    /// PAGE_REQUESTS needs it (IOMMU_FAULT_QUEUE_ALLOC).
    fn fault_queue(&mut self) -> Result<u32> {
        if let Some((id, _)) = &self.fault {
            return Ok(*id);
        }
        let (id, file) = self.fd.fault_queue_alloc()?;
        limited!(Level::Info, "iommufd: fault queue {id} for this connection");
        self.fault = Some((id, file));
        Ok(id)
    }

    /// Did a HWPT allocated before any attach leave `ioas` with no usable
    /// aperture? Some drivers (virtio-iommu on 6.12) size a domain only when
    /// a device attaches; for them the kernel must allocate the HWPT itself
    /// at attach time (attach to the IOAS).
    fn degenerate(&self, ioas: u32) -> bool {
        match self.fd.iova_ranges(ioas) {
            Ok((ranges, _)) => ranges.iter().all(|&(s, e)| e.saturating_sub(s) < 1 << 20),
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
    fn block_pt(&self) -> u32 {
        self.block_hwpt.unwrap_or(self.block_ioas)
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

    /// Point `pasid` of endpoint `id` at a table domain, or detach it.
    fn point_pasid(&mut self, id: u32, pasid: u32, target: Option<Target>) -> Result<()> {
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

    /// The HWPT or IOAS that bypass DMA goes through.
    fn ram_pt(&self) -> u32 {
        self.nest_parent.or(self.ram_hwpt).unwrap_or(self.ram_ioas)
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
                    (ioas, false)
                }
                Ok(h) => (h, true),
                Err(e) => {
                    debug!("domain {domain}: HWPT_ALLOC ({e}); attaching to the IOAS");
                    (ioas, false)
                }
            };
        self.domains.insert(
            domain,
            HostDomain {
                ioas: Some(ioas),
                hwpt,
                own_hwpt,
                users: 0,
                invalidate_type: None,
                invalidate_id: hwpt,
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
                    if ep.dev.attach(&self.fd, ioas).is_ok() {
                        if dom.own_hwpt {
                            let _ = self.fd.destroy(dom.hwpt);
                        }
                        dom.hwpt = ioas;
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

    /// Map [gpa, gpa + len) of region `r` at IOVA = GPA.
    fn map_piece(&self, r: &RamRegion, gpa: u64, len: u64) -> Result<()> {
        let flags = IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE;
        // Pieces lie inside their region; a wrap here would map memory
        // outside it, so it is refused rather than trusted.
        let outside = || BridgeError::NotGuestRam { gpa, len };
        let off = gpa
            .checked_sub(r.gpa)
            .filter(|&o| o <= r.len && len <= r.len - o)
            .ok_or_else(outside)?;
        match r.file {
            Some((fd, start)) if self.use_map_file => {
                let at = start.checked_add(off).ok_or_else(outside)?;
                Ok(self
                    .fd
                    .ioas_map_file(self.ram_ioas, fd, at, len, gpa, flags)?)
            }
            _ => {
                let va = r.host_va.checked_add(off).ok_or_else(outside)?;
                Ok(self.fd.ioas_map(self.ram_ioas, va, len, gpa, flags)?)
            }
        }
    }

    /// Map the parts of region `r` that the devices can reach (the RAM
    /// IOAS's usable IOVA ranges); a part outside them is logged, and a
    /// MAP that needs it answers FAULT.
    fn map_region(&mut self, r: &RamRegion) -> Result<Vec<(u64, u64)>> {
        let (usable, align) = self.fd.iova_ranges(self.ram_ioas)?;
        let shown = format!("usable IOVA {usable:x?}, alignment {align:#x}");
        let align = align.max(1);
        let Some(last) = r.len.checked_sub(1).and_then(|l| r.gpa.checked_add(l)) else {
            limited!(
                Level::Warn,
                "guest RAM {:#x}+{:#x}: empty or beyond 2^64; not mapped",
                r.gpa,
                r.len
            );
            return Ok(Vec::new());
        };
        let pieces = region_pieces(r.gpa, last, &usable, align);
        let covered = pieces.iter().fold(0u64, |a, p| a.saturating_add(p.1));
        if covered < r.len {
            limited!(
                Level::Warn,
                "guest RAM {:#x}+{:#x}: {:#x} bytes lie outside the devices' usable IOVA ranges \
                 ({shown}); host endpoints cannot reach them",
                r.gpa,
                r.len,
                r.len - covered
            );
        }
        let mut done: Vec<(u64, u64)> = Vec::new();
        for &(gpa, len) in &pieces {
            let mut res = self.map_piece(r, gpa, len);
            if res.is_err() && self.use_map_file && r.file.is_some() {
                limited!(
                    Level::Warn,
                    "IOAS_MAP_FILE failed ({}); using IOAS_MAP",
                    res.unwrap_err()
                );
                self.use_map_file = false;
                res = self.map_piece(r, gpa, len);
            }
            if let Err(e) = res {
                for &(g, l) in &done {
                    let _ = self.fd.ioas_unmap(self.ram_ioas, g, l);
                }
                return Err(e);
            }
            debug!("guest RAM {gpa:#x}+{len:#x} mapped at IOVA = GPA");
            done.push((gpa, len));
        }
        Ok(done)
    }

    /// Is [gpa, gpa + len) inside guest RAM (regions may be adjacent)?
    fn in_ram(&self, gpa: u64, len: u64) -> bool {
        let Some(last) = len.checked_sub(1).and_then(|l| gpa.checked_add(l)) else {
            return false;
        };
        let mut cur = gpa;
        loop {
            let Some(&(p_gpa, p_len)) = self
                .ram
                .iter()
                .flat_map(|(_, pieces)| pieces)
                .find(|&&(g, l)| g <= cur && cur - g < l)
            else {
                return false;
            };
            // Pieces are never empty and end by 2^64 - 1.
            let r_last = p_gpa.saturating_add(p_len.saturating_sub(1));
            if r_last >= last {
                return true;
            }
            cur = r_last + 1;
        }
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
        let old = std::mem::take(&mut self.ram);
        for (r, pieces) in &old {
            if regions.contains(r) {
                continue;
            }
            for &(gpa, len) in pieces {
                if let Err(e) = self.fd.ioas_unmap(self.ram_ioas, gpa, len) {
                    limited!(Level::Error, "guest RAM {gpa:#x}+{len:#x}: unmap: {e}");
                }
            }
        }
        self.ram = old
            .into_iter()
            .filter(|(r, _)| regions.contains(r))
            .collect();
        let mut first_err = None;
        for r in regions {
            if self.ram.iter().any(|(k, _)| k == r) {
                continue;
            }
            match self.map_region(r) {
                Ok(pieces) => self.ram.push((*r, pieces)),
                Err(e) => {
                    limited!(Level::Error, "guest RAM {:#x}+{:#x}: {e}", r.gpa, r.len);
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
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
        let (_, file) = self.veventq.as_ref()?;
        file.try_clone()
            .inspect_err(|e| limited!(Level::Warn, "vEVENTQ FD: {e}"))
            .ok()
            .map(|file| super::EventQueue {
                file,
                data_len: self.vevent_format.0,
                id_at: self.vevent_format.1,
            })
    }

    fn fault_queue_reader(&self) -> Option<std::fs::File> {
        let (_, file) = self.fault.as_ref()?;
        file.try_clone()
            .inspect_err(|e| limited!(Level::Warn, "fault queue FD: {e}"))
            .ok()
    }

    fn page_response(&mut self, cookie: u32, code: u16) -> Result<bool> {
        let mut out = Ok(false);
        self.page_responses(&[(cookie, code)], &mut |_, r| out = r);
        out
    }

    fn page_responses(
        &mut self,
        responses: &[(u32, u16)],
        each: &mut dyn FnMut(usize, Result<bool>),
    ) {
        let Some((_, file)) = self.fault.as_mut() else {
            for i in 0..responses.len() {
                each(i, Err(BridgeError::Unsupported("no fault queue")));
            }
            return;
        };
        let (mut written, mut stale) = (0, 0);
        write_page_responses(file, responses, &mut |i, r| {
            match r {
                Ok(true) => written += 1,
                Ok(false) => stale += 1,
                Err(_) => {}
            }
            each(i, r)
        });
        self.responses_written += written;
        self.responses_stale += stale;
    }

    fn endpoint_of_dev(&self, dev_id: u32) -> Option<u32> {
        self.endpoints
            .iter()
            .find(|(_, e)| e.dev.dev_id() == dev_id)
            .map(|(&id, _)| id)
    }

    fn invalidate(&mut self, domain: u32, invs: &[Invalidate]) -> Result<()> {
        let Some(d) = self.domains.get(&domain) else {
            return Ok(());
        };
        let Some(data_type) = d.invalidate_type else {
            return Err(BridgeError::Unsupported(
                "INVALIDATE of a domain without a table",
            ));
        };
        let (entry_len, mut entries) = match d.table {
            Some(TableDesc::ArmSmmu3 { ste }) => self.smmu3_commands(domain, ste, invs),
            _ => invalidate_entries(data_type, invs),
        };
        if entries.is_empty() {
            return Ok(());
        }
        let id = d.invalidate_id;
        self.invalidate_calls += 1;
        Ok(self
            .fd
            .hwpt_invalidate(id, data_type, entry_len, &mut entries)?)
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
        if let Some((id, file)) = self.fault.take() {
            drop(file);
            if let Err(e) = self.fd.destroy(id) {
                limited!(Level::Error, "iommufd: destroying fault queue {id}: {e}");
            }
        }
    }

    fn reserved(&self, endpoint: u32) -> Option<&[IovaHole]> {
        self.endpoints.get(&endpoint).map(|e| e.reserved.as_slice())
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
            "fault_queue": self.fault.as_ref().map(|f| f.0),
            "viommu": self.viommu,
            "veventq": self.veventq.as_ref().map(|q| q.0),
            "page_responses_written": self.responses_written,
            "page_responses_stale": self.responses_stale,
            "ram": self.ram.iter().flat_map(|(_, p)| p).map(|&(gpa, len)| json!({"gpa": gpa, "len": len})).collect::<Vec<_>>(),
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
                "nested": d.invalidate_type.is_some(),
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
        if let Some((id, file)) = self.veventq.take() {
            drop(file);
            let _ = self.fd.destroy(id);
        }
        if let Some(v) = self.viommu.take() {
            let _ = self.fd.destroy(v);
        }
        if let Some((id, file)) = self.fault.take() {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's fault FD as write() sees it: responses in order, stop
    /// at the first unknown cookie (EINVAL when it is the first).
    struct KernelResponses {
        outstanding: Vec<u32>,
        writes: usize,
    }

    impl std::io::Write for KernelResponses {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.writes += 1;
            let mut done = 0;
            for r in buf.chunks_exact(8) {
                let cookie = u32::from_le_bytes(r[..4].try_into().unwrap());
                match self.outstanding.iter().position(|&c| c == cookie) {
                    Some(p) => {
                        self.outstanding.remove(p);
                        done += 8;
                    }
                    None => break,
                }
            }
            if done == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            Ok(done)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn page_responses_go_in_batches_and_a_refused_one_is_skipped() {
        let mut k = KernelResponses {
            outstanding: (1..=100).filter(|c| c % 10 != 5).collect(),
            writes: 0,
        };
        let rs: Vec<(u32, u16)> = (1..=100).map(|c| (c, 0)).collect();
        let mut got = Vec::new();
        write_page_responses(&mut k, &rs, &mut |i, r| got.push((i, r.unwrap())));
        assert_eq!(got.len(), 100);
        assert!(
            got.iter().enumerate().all(|(n, &(i, _))| n == i),
            "in order"
        );
        let stale: Vec<_> = got.iter().filter(|g| !g.1).map(|g| g.0 + 1).collect();
        assert_eq!(stale, vec![5, 15, 25, 35, 45, 55, 65, 75, 85, 95]);
        assert!(k.outstanding.is_empty());
        // Chunks of 64 and 36; each refusal costs a failed write and one
        // that goes on: 1 + 2 * 6 for the first (6 refused), 2 * 4 for the
        // second (starts with one): 21 writes for 100 responses.
        assert_eq!(k.writes, 21);
    }

    /// Every piece lies inside the region and a usable range, aligned.
    fn check_pieces(gpa: u64, last: u64, usable: &[(u64, u64)], align: u64) -> Vec<(u64, u64)> {
        let pieces = region_pieces(gpa, last, usable, align);
        for &(s, len) in &pieces {
            let what = format!("piece {s:#x}+{len:#x} of {gpa:#x}-{last:#x} (align {align:#x})");
            assert!(len > 0 && len % align == 0 && s % align == 0, "{what}");
            let end = s.checked_add(len - 1).unwrap();
            assert!(gpa <= s && end <= last, "{what} leaves the region");
            assert!(
                usable.iter().any(|&(us, ue)| us <= s && end <= ue),
                "{what} leaves the usable ranges"
            );
        }
        pieces
    }

    #[test]
    fn region_pieces_stay_inside_a_region_at_the_top_of_the_space() {
        const TOP_PAGE: u64 = 0xffff_ffff_ffff_f000;
        // A region in the last 64 KiB, IOVA alignment 64 KiB: nothing can
        // be mapped (rounding its start up would pass 2^64).
        assert_eq!(
            check_pieces(TOP_PAGE, u64::MAX, &[(0, u64::MAX)], 0x10000),
            []
        );
        // The same with a usable range ending below the top.
        let usable = [(0, 0xffff_ffff_ffff_f7ff)];
        assert_eq!(check_pieces(TOP_PAGE, u64::MAX, &usable, 0x10000), []);
        // An aligned region up to 2^64 maps whole.
        let gpa = 0xffff_ffff_fff0_0000;
        let full = [(0, u64::MAX)];
        assert_eq!(
            check_pieces(gpa, u64::MAX, &full, 0x10000),
            [(gpa, 0x10_0000)]
        );
        // Unaligned at both ends: the aligned middle.
        assert_eq!(
            check_pieces(0x1_8000, 0x5_7fff, &full, 0x10000),
            [(0x2_0000, 0x3_0000)]
        );
        // Alignment 1 (no domain attached yet) and the top byte.
        assert_eq!(check_pieces(u64::MAX, u64::MAX, &full, 1), [(u64::MAX, 1)]);
        // Several usable ranges, one missing the region.
        let usable = [(0, 0xfff), (0x3000, 0x4fff), (0x8000, u64::MAX)];
        assert_eq!(
            check_pieces(0x1000, 0x9fff, &usable, 0x1000),
            [(0x3000, 0x2000), (0x8000, 0x2000)]
        );
        // Any region near the top with any power-of-two alignment.
        for shift in 0..=20 {
            for back in [1u64, 0x800, 0x1000, 0x1800, 0x10000, 0x10800] {
                let gpa = u64::MAX - back + 1;
                for last in [u64::MAX, u64::MAX - 0x400, gpa] {
                    if last >= gpa {
                        check_pieces(gpa, last, &full, 1 << shift);
                        check_pieces(gpa, last, &[(0, u64::MAX - 0x7ff)], 1 << shift);
                    }
                }
            }
        }
    }

    #[test]
    fn holes_of_the_mock_aperture_keep_the_msi_window_apart() {
        let r = reserved_from_ranges(&[(1 << 24, (1 << 31) - 1)]);
        assert_eq!(
            r,
            vec![
                IovaHole {
                    start: MSI_START,
                    end: MSI_END,
                    kind: HoleKind::Msi
                },
                IovaHole {
                    start: 0,
                    end: (1 << 24) - 1,
                    kind: HoleKind::Untranslated
                },
                IovaHole {
                    start: 1 << 31,
                    end: MSI_START - 1,
                    kind: HoleKind::Untranslated
                },
                IovaHole {
                    start: MSI_END + 1,
                    end: u64::MAX,
                    kind: HoleKind::Untranslated
                },
            ]
        );
    }

    #[test]
    fn whole_space_usable_leaves_only_msi() {
        assert_eq!(reserved_from_ranges(&[(0, u64::MAX)]).len(), 1);
        // Overlapping and unsorted ranges, and a usable range ending at the top.
        let r = reserved_from_ranges(&[(0x2000, u64::MAX), (0, 0xfff), (0x800, 0x1000)]);
        assert_eq!(r.len(), 2);
        assert_eq!((r[1].start, r[1].end), (0x1001, 0x1fff));
    }
}
