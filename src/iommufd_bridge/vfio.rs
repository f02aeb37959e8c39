// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! VFIO devices through their cdev (`/dev/vfio/devices/vfioN`), bound to our
//! iommufd with the vfio-ioctls crate.

use std::fs::{File, OpenOptions};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use vfio_ioctls::{VfioDevice, VfioIommufd};

use super::host::HostDevice;
use super::ids::PtId;
use super::sys::Iommufd;
use super::vfio_adopt::BoundCdev;
use super::{BridgeError, Result};

/// Where a VFIO endpoint's device comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VfioSource {
    Path(std::path::PathBuf),
    /// An inherited, already open cdev.
    Fd(i32),
    /// An inherited cdev the VMM binds to the shared `--iommufd-fd`
    /// (passthrough: QEMU's `-device vfio-pci,fd=`); never bound by us.
    BoundFd(i32),
    /// A cdev sent over the control socket (hot-plug).
    Received,
}

/// How we hold the device.
enum Device {
    /// Bound by us, through the vfio-ioctls crate.
    Ours(VfioDevice),
    /// Bound by the VMM; we only attach.
    Vmm(BoundCdev),
}

pub struct VfioCdev {
    dev: Device,
    source: VfioSource,
    dev_id: u32,
}

impl std::fmt::Debug for VfioCdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioCdev")
            .field("source", &self.source)
            .field("dev_id", &self.dev_id)
            .finish()
    }
}

fn vfio_err(op: &'static str, e: vfio_ioctls::VfioError) -> BridgeError {
    // The crate wraps the kernel's errno in its error chain.
    let mut src: Option<&dyn std::error::Error> = Some(&e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if let Some(errno) = io.raw_os_error() {
                return BridgeError::Kernel { op, errno };
            }
        }
        if let Some(en) = s.downcast_ref::<vmm_sys_util::errno::Error>() {
            return BridgeError::Kernel {
                op,
                errno: en.errno(),
            };
        }
        src = s.source();
    }
    BridgeError::Host {
        op,
        detail: e.to_string(),
    }
}

impl VfioCdev {
    /// Open (or adopt) the cdev and bind it to `fd`, unattached; a
    /// `BoundFd` is waited for (up to `bind_wait`) until the VMM bound it.
    pub fn open(fd: &Iommufd, source: &VfioSource, bind_wait: Duration) -> Result<Self> {
        let file = match source {
            VfioSource::Path(p) => open_rw(p)?,
            VfioSource::BoundFd(raw) => {
                // SAFETY: as for Fd below: handed over to us to own (our
                // copy of the VMM's open file), checked open and unique.
                let file = unsafe { File::from_raw_fd(*raw) };
                let dev = BoundCdev::adopt(fd, file, bind_wait)?;
                return Ok(VfioCdev {
                    dev_id: dev.dev_id,
                    dev: Device::Vmm(dev),
                    source: source.clone(),
                });
            }
            VfioSource::Fd(raw) => {
                // SAFETY: the operator handed us this fd (--endpoint
                // ID,vfio-fd=N) to own. Args refused 0-2 and an fd any
                // other option names (so this File is its only owner), and
                // server::run checked it is open before opening anything.
                unsafe { File::from_raw_fd(*raw) }
            }
            VfioSource::Received => {
                return Err(BridgeError::Unsupported("a received cdev comes as a file"))
            }
        };
        Self::bind(fd, file, source)
    }

    /// Bind an open cdev to `fd`, unattached. A file that is not a
    /// character device is refused before any ioctl is made on it.
    fn bind(fd: &Iommufd, file: File, source: &VfioSource) -> Result<Self> {
        let meta = file.metadata().map_err(|e| BridgeError::Host {
            op: "fstat VFIO cdev",
            detail: e.to_string(),
        })?;
        if !std::os::unix::fs::FileTypeExt::is_char_device(&meta.file_type()) {
            return Err(BridgeError::NotCdev);
        }
        let ops = VfioIommufd::new(Arc::clone(fd.handle()), None, None)
            .map_err(|e| vfio_err("VFIO iommufd", e))?;
        let dev = VfioDevice::new_from_fd(file, Arc::new(ops), false)
            .map_err(|e| vfio_err("VFIO_DEVICE_BIND_IOMMUFD", e))?;
        let dev_id = dev.iommufd_dev_id().ok_or(BridgeError::Host {
            op: "VFIO_DEVICE_BIND_IOMMUFD",
            detail: "no device id".into(),
        })?;
        Ok(VfioCdev {
            dev: Device::Ours(dev),
            source: source.clone(),
            dev_id,
        })
    }
}

fn open_rw(p: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .map_err(|e| match e.raw_os_error() {
            Some(errno) => BridgeError::Kernel {
                op: "open VFIO cdev",
                errno,
            },
            None => BridgeError::Host {
                op: "open VFIO cdev",
                detail: e.to_string(),
            },
        })
}

impl HostDevice for VfioCdev {
    const FROM_CDEV: bool = true;

    fn dev_id(&self) -> u32 {
        self.dev_id
    }

    fn attach(&mut self, _fd: &Iommufd, pt: PtId) -> Result<()> {
        match &self.dev {
            Device::Ours(d) => d
                .attach_hwpt(pt.raw())
                .map_err(|e| vfio_err("VFIO_DEVICE_ATTACH_IOMMUFD_PT", e)),
            Device::Vmm(d) => d.attach(pt.raw(), None),
        }
    }

    fn supports_pasid(&self) -> bool {
        true
    }

    fn attach_pasid(&mut self, _fd: &Iommufd, pasid: u32, pt: PtId, _replace: bool) -> Result<()> {
        // VFIO replaces an attached PASID itself.
        match &self.dev {
            Device::Ours(d) => d
                .attach_iommufd_pt_pasid(pt.raw(), pasid)
                .map_err(|e| vfio_err("VFIO_DEVICE_ATTACH_IOMMUFD_PT (PASID)", e)),
            Device::Vmm(d) => d.attach(pt.raw(), Some(pasid)),
        }
    }

    fn detach_pasid(&mut self, _fd: &Iommufd, pasid: u32) -> Result<()> {
        match &self.dev {
            Device::Ours(d) => d
                .detach_iommufd_pt_pasid(pasid)
                .map_err(|e| vfio_err("VFIO_DEVICE_DETACH_IOMMUFD_PT (PASID)", e)),
            Device::Vmm(d) => d.detach(Some(pasid)),
        }
    }

    fn from_cdev(fd: &Iommufd, file: File) -> Result<Self> {
        Self::bind(fd, file, &VfioSource::Received)
    }

    fn describe(&self) -> Value {
        match &self.source {
            VfioSource::Path(p) => json!({ "kind": "vfio", "path": p }),
            VfioSource::Fd(fd) => json!({ "kind": "vfio", "fd": fd }),
            VfioSource::BoundFd(fd) => json!({ "kind": "vfio", "fd": fd, "bound_by": "vmm" }),
            VfioSource::Received => json!({ "kind": "vfio", "received": true }),
        }
    }

    fn release(&mut self, _fd: &Iommufd) {
        // A VMM-bound device is detached (blocked) too: the VMM's own
        // attachment was replaced by ours, so it must not come back.
        let r = match &self.dev {
            Device::Ours(d) => d.detach_hwpt().map_err(|e| e.to_string()),
            Device::Vmm(d) => d.detach(None).map_err(|e| e.to_string()),
        };
        if let Err(e) = r {
            log::warn!("VFIO device {:?}: detach: {e}", self.source);
        }
    }
}
