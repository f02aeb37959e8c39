// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The iommufd calls the device makes, in one place. What the
//! `iommufd-ioctls` crate wraps is called through it; what it lacks
//! (IOAS_IOVA_RANGES, IOAS_COPY, FAULT_QUEUE_ALLOC, and the selftest ABI)
//! is issued here by hand, each `unsafe` with its reason.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use iommufd_bindings::iommufd::{
    iommu_fault_alloc, iommu_hw_info, iommu_hw_info_type_IOMMU_HW_INFO_TYPE_ARM_SMMUV3,
    iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD, iommu_hwpt_alloc,
    iommu_hwpt_data_type_IOMMU_HWPT_DATA_ARM_SMMUV3, iommu_hwpt_data_type_IOMMU_HWPT_DATA_VTD_S1,
    iommu_hwpt_invalidate, iommu_hwpt_invalidate_data_type_IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
    iommu_hwpt_invalidate_data_type_IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, iommu_ioas_alloc,
    iommu_ioas_copy, iommu_ioas_iova_ranges, iommu_ioas_map, iommu_ioas_map_file, iommu_ioas_unmap,
    iommu_iova_range, iommu_vdevice_alloc, iommu_veventq_alloc,
    iommu_veventq_type_IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, iommu_viommu_alloc,
    iommu_viommu_type_IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_PASID,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_FAULT_ID_VALID,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE, IOMMUFD_CMD_FAULT_QUEUE_ALLOC,
    IOMMUFD_CMD_IOAS_COPY, IOMMUFD_CMD_IOAS_IOVA_RANGES, IOMMUFD_TYPE,
};
use iommufd_ioctls::IommuFd;

pub use super::ids::ObjectId;
use super::ids::{FaultId, HwptId, IoasId, NestId, VdeviceId, VeventqId, ViommuId};
use thiserror::Error;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

pub(crate) const IOAS_MAP_FIXED_IOVA: u32 = iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA;
pub const IOAS_MAP_WRITEABLE: u32 = iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
pub const IOAS_MAP_READABLE: u32 = iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
pub const HWPT_ALLOC_NEST_PARENT: u32 = iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT;
pub(crate) const HWPT_FAULT_ID_VALID: u32 = iommufd_hwpt_alloc_flags_IOMMU_HWPT_FAULT_ID_VALID;
/// IOMMU_HWPT_ALLOC_PASID (6.15): the HWPT may sit next to PASID attachments.
pub(crate) const HWPT_ALLOC_PASID: u32 = iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_PASID;
/// enum iommu_hwpt_data_type (HWPT_ALLOC) values we use.
pub(crate) const HWPT_DATA_VTD_S1: u32 = iommu_hwpt_data_type_IOMMU_HWPT_DATA_VTD_S1;
pub(crate) const HWPT_DATA_ARM_SMMUV3: u32 = iommu_hwpt_data_type_IOMMU_HWPT_DATA_ARM_SMMUV3;
/// enum iommu_hwpt_invalidate_data_type values we use.
pub(crate) const INVALIDATE_DATA_VTD_S1: u32 =
    iommu_hwpt_invalidate_data_type_IOMMU_HWPT_INVALIDATE_DATA_VTD_S1;
/// IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3: raw SMMUv3 commands, sent to
/// the vIOMMU (not to the nested HWPT).
pub(crate) const VIOMMU_INVALIDATE_DATA_ARM_SMMUV3: u32 =
    iommu_hwpt_invalidate_data_type_IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3;
/// IOMMU_VIOMMU_TYPE_ARM_SMMUV3, IOMMU_VEVENTQ_TYPE_ARM_SMMUV3.
pub(crate) const VIOMMU_TYPE_ARM_SMMUV3: u32 = iommu_viommu_type_IOMMU_VIOMMU_TYPE_ARM_SMMUV3;
pub(crate) const VEVENTQ_TYPE_ARM_SMMUV3: u32 = iommu_veventq_type_IOMMU_VEVENTQ_TYPE_ARM_SMMUV3;
/// enum iommu_hw_info_type values we recognise.
pub(crate) const HW_INFO_INTEL_VTD: u32 = iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD;
pub(crate) const HW_INFO_ARM_SMMUV3: u32 = iommu_hw_info_type_IOMMU_HW_INFO_TYPE_ARM_SMMUV3;
/// The selftest mock's types: not in the bindings (see `abi`).
pub use super::abi::{HWPT_DATA_SELFTEST, INVALIDATE_DATA_SELFTEST};
pub(crate) use super::abi::{HW_INFO_SELFTEST, VEVENTQ_TYPE_SELFTEST, VIOMMU_TYPE_SELFTEST};

/// IOMMU_GET_HW_INFO's answer for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HwInfoRaw {
    pub info_type: u32,
    pub capabilities: u64,
    pub max_pasid_log2: u8,
    /// The type-specific structure, as long as the kernel made it.
    pub data: Vec<u8>,
}

ioctl_io_nr!(IOMMU_IOAS_COPY, IOMMUFD_TYPE as u32, IOMMUFD_CMD_IOAS_COPY);
ioctl_io_nr!(
    IOMMU_IOAS_IOVA_RANGES,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_IOAS_IOVA_RANGES
);
ioctl_io_nr!(
    IOMMU_FAULT_QUEUE_ALLOC,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_FAULT_QUEUE_ALLOC
);

/// A refused host operation: which one, and the kernel's errno.
#[derive(Debug, Error)]
pub enum SysError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("{op} failed: {source}")]
    Ioctl { op: &'static str, source: io::Error },
    #[error("{op} failed: {source}")]
    Crate {
        op: &'static str,
        source: iommufd_ioctls::IommufdError,
    },
}

impl SysError {
    /// The operation that failed.
    pub(crate) fn op(&self) -> &'static str {
        match self {
            SysError::Open { .. } => "open",
            SysError::Ioctl { op, .. } | SysError::Crate { op, .. } => op,
        }
    }

    /// The errno behind the failure, if the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            SysError::Open { source, .. } | SysError::Ioctl { source, .. } => source.raw_os_error(),
            SysError::Crate { source, .. } => std::error::Error::source(source)
                .and_then(|e| e.downcast_ref::<vmm_sys_util::errno::Error>())
                .map(|e| e.errno()),
        }
    }
}

pub(crate) type Result<T> = std::result::Result<T, SysError>;

fn check(op: &'static str, rc: i32) -> Result<()> {
    if rc < 0 {
        return Err(SysError::Ioctl {
            op,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

// Only kernel ABI structs (tens of bytes) are measured: the size fits a u32.
#[allow(clippy::cast_possible_truncation)]
fn size_of<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// A buffer's length or entry count as the u32 the ioctl structs carry;
/// EOVERFLOW (before any call) if it does not fit.
fn len_u32(op: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| SysError::Ioctl {
        op,
        source: io::Error::from_raw_os_error(libc::EOVERFLOW),
    })
}

/// One open iommufd context.
pub struct Iommufd {
    fd: Arc<IommuFd>,
}

impl std::fmt::Debug for Iommufd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Iommufd(fd {})", self.fd.as_raw_fd())
    }
}

/// What this kernel's iommufd offers, probed once (ENOTTY = no such
/// ioctl), never assumed from a version number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Features {
    pub ioas_map_file: bool,
    pub fault_queue: bool,
    pub hwpt_invalidate: bool,
    pub viommu: bool,
    pub veventq: bool,
    pub selftest: bool,
}

impl std::fmt::Display for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yn = |b: bool| if b { "yes" } else { "no" };
        write!(
            f,
            "IOAS_MAP_FILE {}, FAULT_QUEUE_ALLOC {}, HWPT_INVALIDATE {}, VIOMMU_ALLOC {}, VEVENTQ_ALLOC {}, IOMMU_TEST_CMD {}",
            yn(self.ioas_map_file),
            yn(self.fault_queue),
            yn(self.hwpt_invalidate),
            yn(self.viommu),
            yn(self.veventq),
            yn(self.selftest)
        )
    }
}

impl AsRawFd for Iommufd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Iommufd {
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| SysError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Iommufd::from_file(file))
    }

    /// An open /dev/iommu (an inherited one: --iommufd-fd, or the VMM
    /// stand-in of tests/passthrough.rs).
    pub fn from_file(file: File) -> Self {
        Iommufd {
            fd: Arc::new(IommuFd::new_from_fd(file)),
        }
    }

    /// The crate's handle, shared with vfio-ioctls.
    pub(crate) fn handle(&self) -> &Arc<IommuFd> {
        &self.fd
    }

    /// Is ioctl number `nr` known to this kernel? A zero `size` makes every
    /// known command fail its size check (EINVAL) before doing anything;
    /// an unknown one fails with ENOTTY.
    pub(crate) fn has_ioctl(&self, nr: u32) -> bool {
        let mut probe = [0u64; 16];
        let req = vmm_sys_util::ioctl::ioctl_expr(
            vmm_sys_util::ioctl::_IOC_NONE,
            u32::from(IOMMUFD_TYPE),
            nr,
            0,
        );
        // SAFETY: `probe` is 128 zero bytes, more than any iommufd command
        // struct; with size 0 the kernel reads only the size field.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(self, req, &mut probe) };
        rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOTTY)
    }

    pub fn features(&self) -> Features {
        Features {
            ioas_map_file: self.has_ioctl(0x8f),
            fault_queue: self.has_ioctl(0x8e),
            hwpt_invalidate: self.has_ioctl(0x8d),
            viommu: self.has_ioctl(0x90),
            veventq: self.has_ioctl(0x93),
            selftest: self.has_ioctl(0xa0),
        }
    }

    pub fn destroy(&self, id: impl ObjectId) -> Result<()> {
        self.fd
            .destroy_iommu_object(id.raw())
            .map_err(|source| SysError::Crate {
                op: "IOMMU_DESTROY",
                source,
            })
    }

    pub fn ioas_alloc(&self) -> Result<IoasId> {
        let mut a = iommu_ioas_alloc {
            size: size_of::<iommu_ioas_alloc>(),
            ..Default::default()
        };
        self.fd
            .alloc_iommu_ioas(&mut a)
            .map_err(|source| SysError::Crate {
                op: "IOMMU_IOAS_ALLOC",
                source,
            })?;
        Ok(IoasId(a.out_ioas_id))
    }

    /// Map `len` bytes of our address space at `va` to `iova` (fixed).
    pub fn ioas_map(&self, ioas: IoasId, va: u64, len: u64, iova: u64, flags: u32) -> Result<()> {
        let m = iommu_ioas_map {
            size: size_of::<iommu_ioas_map>(),
            flags: flags | IOAS_MAP_FIXED_IOVA,
            ioas_id: ioas.raw(),
            user_va: va,
            length: len,
            iova,
            ..Default::default()
        };
        self.fd
            .map_iommu_ioas(&m)
            .map_err(|source| SysError::Crate {
                op: "IOMMU_IOAS_MAP",
                source,
            })
    }

    /// Map `len` bytes of file `fd` from `offset` to `iova` (fixed).
    pub(crate) fn ioas_map_file(
        &self,
        ioas: IoasId,
        fd: RawFd,
        offset: u64,
        len: u64,
        iova: u64,
        flags: u32,
    ) -> Result<()> {
        let m = iommu_ioas_map_file {
            size: size_of::<iommu_ioas_map_file>(),
            flags: flags | IOAS_MAP_FIXED_IOVA,
            ioas_id: ioas.raw(),
            fd,
            start: offset,
            length: len,
            iova,
        };
        self.fd
            .map_iommu_ioas_file(&m)
            .map_err(|source| SysError::Crate {
                op: "IOMMU_IOAS_MAP_FILE",
                source,
            })
    }

    /// Unmap whole areas in [iova, iova + len); returns the bytes unmapped.
    pub fn ioas_unmap(&self, ioas: IoasId, iova: u64, len: u64) -> Result<u64> {
        let mut u = iommu_ioas_unmap {
            size: size_of::<iommu_ioas_unmap>(),
            ioas_id: ioas.raw(),
            iova,
            length: len,
        };
        self.fd
            .unmap_iommu_ioas(&mut u)
            .map_err(|source| SysError::Crate {
                op: "IOMMU_IOAS_UNMAP",
                source,
            })?;
        Ok(u.length)
    }

    /// Map what `src` maps at `src_iova` into `dst` at `dst_iova`, sharing
    /// the pages `src` already pinned.
    pub fn ioas_copy(
        &self,
        dst: IoasId,
        dst_iova: u64,
        src: IoasId,
        src_iova: u64,
        len: u64,
        flags: u32,
    ) -> Result<()> {
        let mut c = iommu_ioas_copy {
            size: size_of::<iommu_ioas_copy>(),
            flags: flags | IOAS_MAP_FIXED_IOVA,
            dst_ioas_id: dst.raw(),
            src_ioas_id: src.raw(),
            length: len,
            dst_iova,
            src_iova,
        };
        // SAFETY: IOMMU_IOAS_COPY reads and writes back exactly one
        // iommu_ioas_copy, which `c` is, with `size` set to its size.
        check("IOMMU_IOAS_COPY", unsafe {
            ioctl_with_mut_ref(self, IOMMU_IOAS_COPY(), &mut c)
        })
    }

    /// The usable IOVA ranges of an IOAS (inclusive ends) and the alignment
    /// that MAP and COPY need.
    pub fn iova_ranges(&self, ioas: IoasId) -> Result<IovaRanges> {
        let mut ranges: Vec<iommu_iova_range> = vec![iommu_iova_range::default(); 8];
        loop {
            let mut r = iommu_ioas_iova_ranges {
                size: size_of::<iommu_ioas_iova_ranges>(),
                ioas_id: ioas.raw(),
                num_iovas: len_u32("IOMMU_IOAS_IOVA_RANGES", ranges.len())?,
                allowed_iovas: ranges.as_mut_ptr() as u64,
                ..Default::default()
            };
            // SAFETY: the kernel writes `r` back and at most `num_iovas`
            // iommu_iova_range entries to `allowed_iovas`, which points at
            // `ranges`, a live Vec of exactly that many entries.
            let rc = unsafe { ioctl_with_mut_ref(self, IOMMU_IOAS_IOVA_RANGES(), &mut r) };
            if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EMSGSIZE) {
                // Too small: the kernel said how many there are. Bounded by
                // what the kernel reports, and tried again once per growth.
                ranges.resize(r.num_iovas as usize, iommu_iova_range::default());
                continue;
            }
            check("IOMMU_IOAS_IOVA_RANGES", rc)?;
            ranges.truncate(r.num_iovas as usize);
            let usable = ranges
                .iter()
                .map(|x| IovaRange {
                    start: x.start,
                    last: x.last,
                })
                .collect();
            return Ok(IovaRanges {
                usable,
                alignment: r.out_iova_alignment,
            });
        }
    }

    /// IOMMU_HWPT_ALLOC: a HWPT for device `dev_id` on `pt_id` (an IOAS, or a
    /// nesting parent when `data` describes a guest stage-1 table).
    pub fn hwpt_alloc(
        &self,
        dev_id: u32,
        pt_id: impl ObjectId,
        flags: u32,
        data_type: u32,
        data: &mut [u8],
        fault_id: Option<FaultId>,
    ) -> Result<HwptId> {
        let mut h = iommu_hwpt_alloc {
            size: size_of::<iommu_hwpt_alloc>(),
            flags: flags | fault_id.map_or(0, |_| HWPT_FAULT_ID_VALID),
            dev_id,
            pt_id: pt_id.raw(),
            data_type,
            data_len: len_u32("IOMMU_HWPT_ALLOC", data.len())?,
            data_uptr: if data.is_empty() {
                0
            } else {
                data.as_mut_ptr() as u64
            },
            fault_id: fault_id.map_or(0, FaultId::raw),
            ..Default::default()
        };
        self.fd
            .alloc_iommu_hwpt(&mut h)
            .map_err(|source| SysError::Crate {
                op: "IOMMU_HWPT_ALLOC",
                source,
            })?;
        Ok(HwptId(h.out_hwpt_id))
    }

    /// IOMMU_GET_HW_INFO for device `dev_id`.
    pub(crate) fn hw_info(&self, dev_id: u32) -> Result<HwInfoRaw> {
        // Larger than every known info structure (SMMUv3: 40 bytes).
        const DATA_MAX: u32 = 256;
        let mut data = vec![0u8; DATA_MAX as usize];
        let mut h = iommu_hw_info {
            size: size_of::<iommu_hw_info>(),
            dev_id,
            data_len: DATA_MAX,
            data_uptr: data.as_mut_ptr() as u64,
            ..Default::default()
        };
        self.fd
            .get_hw_info(&mut h)
            .map_err(|source| SysError::Crate {
                op: "IOMMU_GET_HW_INFO",
                source,
            })?;
        data.truncate(h.data_len.min(DATA_MAX) as usize);
        Ok(HwInfoRaw {
            // SAFETY: a union of two u32s; the kernel wrote out_data_type.
            info_type: unsafe { h.__bindgen_anon_1.out_data_type },
            capabilities: h.out_capabilities,
            max_pasid_log2: h.out_max_pasid_log2,
            data,
        })
    }

    /// IOMMU_HWPT_INVALIDATE: `entries` holds `entries.len() / entry_len`
    /// requests of `data_type` for HWPT `hwpt`, handled in one call.
    pub fn hwpt_invalidate(
        &self,
        hwpt: NestId,
        data_type: u32,
        entry_len: u32,
        entries: &mut [u8],
    ) -> Result<()> {
        let mut h = iommu_hwpt_invalidate {
            size: size_of::<iommu_hwpt_invalidate>(),
            hwpt_id: hwpt.raw(),
            data_uptr: entries.as_mut_ptr() as u64,
            data_type,
            entry_len,
            entry_num: len_u32(
                "IOMMU_HWPT_INVALIDATE",
                entries.len() / entry_len.max(1) as usize,
            )?,
            ..Default::default()
        };
        self.fd
            .invalidate_hwpt(&mut h)
            .map_err(|source| SysError::Crate {
                op: "IOMMU_HWPT_INVALIDATE",
                source,
            })
    }

    /// IOMMU_VIOMMU_ALLOC (6.13): a vIOMMU of `ty` for device `dev_id` on
    /// the nesting parent `parent`.
    pub(crate) fn viommu_alloc(&self, dev_id: u32, parent: HwptId, ty: u32) -> Result<ViommuId> {
        let mut v = iommu_viommu_alloc {
            size: size_of::<iommu_viommu_alloc>(),
            type_: ty,
            dev_id,
            hwpt_id: parent.raw(),
            ..Default::default()
        };
        self.fd
            .alloc_iommu_viommu(&mut v)
            .map_err(|source| SysError::Crate {
                op: "IOMMU_VIOMMU_ALLOC",
                source,
            })?;
        Ok(ViommuId(v.out_viommu_id))
    }

    /// IOMMU_VDEVICE_ALLOC (6.13): device `dev_id` as `virt_id` on `viommu`.
    pub(crate) fn vdevice_alloc(
        &self,
        viommu: ViommuId,
        dev_id: u32,
        virt_id: u64,
    ) -> Result<VdeviceId> {
        let mut v = iommu_vdevice_alloc {
            size: size_of::<iommu_vdevice_alloc>(),
            viommu_id: viommu.raw(),
            dev_id,
            virt_id,
            ..Default::default()
        };
        self.fd
            .alloc_iommu_vdevice(&mut v)
            .map_err(|source| SysError::Crate {
                op: "IOMMU_VDEVICE_ALLOC",
                source,
            })?;
        Ok(VdeviceId(v.out_vdevice_id))
    }

    /// IOMMU_VEVENTQ_ALLOC (6.15): a vEVENTQ of `ty` on `viommu`, and its
    /// FD (non-blocking).
    pub(crate) fn veventq_alloc(&self, viommu: ViommuId, ty: u32, depth: u32) -> Result<Veventq> {
        let mut v = iommu_veventq_alloc {
            size: size_of::<iommu_veventq_alloc>(),
            viommu_id: viommu.raw(),
            type_: ty,
            veventq_depth: depth,
            ..Default::default()
        };
        self.fd
            .alloc_veventq(&mut v)
            .map(|(id, file)| Veventq {
                id: VeventqId(id),
                file,
            })
            .map_err(|source| SysError::Crate {
                op: "IOMMU_VEVENTQ_ALLOC",
                source,
            })
    }

    /// IOMMU_FAULT_QUEUE_ALLOC: a fault object and its fd (read page
    /// requests, write responses).
    pub fn fault_queue_alloc(&self) -> Result<FaultQueue> {
        let mut f = iommu_fault_alloc {
            size: size_of::<iommu_fault_alloc>(),
            ..Default::default()
        };
        // SAFETY: IOMMU_FAULT_QUEUE_ALLOC reads and writes back one
        // iommu_fault_alloc, which `f` is.
        check("IOMMU_FAULT_QUEUE_ALLOC", unsafe {
            ioctl_with_mut_ref(self, IOMMU_FAULT_QUEUE_ALLOC(), &mut f)
        })?;
        // SAFETY: on success the kernel installed a new fd in our table and
        // handed its ownership to us in out_fault_fd.
        let file = unsafe { File::from_raw_fd(f.out_fault_fd.cast_signed()) };
        Ok(FaultQueue {
            id: FaultId(f.out_fault_id),
            file,
        })
    }
}

#[cfg(feature = "selftest")]
pub(crate) use selftest::*;

/// One usable IOVA range of an IOAS, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IovaRange {
    pub start: u64,
    pub last: u64,
}

/// IOMMU_IOAS_IOVA_RANGES' answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IovaRanges {
    pub usable: Vec<IovaRange>,
    /// What MAP and COPY need IOVAs and lengths aligned to.
    pub alignment: u64,
}

/// A fault queue (IOMMU_FAULT_QUEUE_ALLOC): read page requests from
/// `file`, write responses to it.
#[derive(Debug)]
pub struct FaultQueue {
    pub id: FaultId,
    pub file: File,
}

/// A vEVENTQ (IOMMU_VEVENTQ_ALLOC) and its non-blocking FD.
#[derive(Debug)]
pub(crate) struct Veventq {
    pub id: VeventqId,
    pub file: File,
}

#[cfg(feature = "selftest")]
mod selftest;
