// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A VFIO cdev another process binds: the passthrough deployment, where
//! QEMU assigns the device (`-device vfio-pci,fd=`) and binds it to the
//! iommufd both processes share (spec-notes/passthrough.md).
//!
//! A cdev is bound once, ever (the kernel refuses a second
//! VFIO_DEVICE_BIND_IOMMUFD with EINVAL), and QEMU always binds, so we share
//! its open file, wait until it is bound, learn its iommufd device id
//! without binding, and attach with the device fd: an attach on an attached
//! device is a replace, so the last one to attach governs its DMA.

use std::fs::File;
use std::time::{Duration, Instant};

use log::{debug, info};
use vfio_bindings::bindings::vfio::{
    vfio_device_attach_iommufd_pt, vfio_device_detach_iommufd_pt, vfio_device_info,
    vfio_pci_dependent_device, vfio_pci_hot_reset_info, VFIO_DEVICE_ATTACH_PASID,
    VFIO_PCI_HOT_RESET_FLAG_DEV_ID,
};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

use super::sys::Iommufd;
use super::{BridgeError, Result};

// <linux/vfio.h>: _IO(VFIO_TYPE, VFIO_BASE + n) (macros: not in the bindings).
const VFIO_TYPE: u32 = b';' as u32;
ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE, 100 + 7);
ioctl_io_nr!(VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, VFIO_TYPE, 100 + 12);
ioctl_io_nr!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_TYPE, 100 + 19);
ioctl_io_nr!(VFIO_DEVICE_DETACH_IOMMUFD_PT, VFIO_TYPE, 100 + 20);

/// `VFIO_PCI_DEVID_OWNED` and `VFIO_PCI_DEVID_NOT_OWNED`: no device id.
const DEVID_NONE: [u32; 2] = [0, u32::MAX];
/// How often a cdev not bound yet is looked at again.
const BIND_POLL: Duration = Duration::from_millis(20);
/// Object ids probed for devices when the hot-reset info cannot name ours.
/// QEMU allocates a handful of objects per device; this bounds start-up.
const PROBE_IDS: u32 = 4096;

/// `vfio_pci_hot_reset_info` with room for this many dependent devices.
const HOT_RESET_MAX: usize = 64;

/// The bindings' `vfio_pci_hot_reset_info` ends in a flexible array: this
/// gives it room.
#[repr(C)]
struct HotResetInfo {
    head: vfio_pci_hot_reset_info,
    devices: [vfio_pci_dependent_device; HOT_RESET_MAX],
}

// The structs are a few u32s: their sizes fit argsz.
#[allow(clippy::cast_possible_truncation)]
const fn argsz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A PCI function's address, as the hot-reset info names devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PciAddr {
    pub segment: u16,
    pub bus: u8,
    pub devfn: u8,
}

/// `DDDD:BB:DD.F` (sysfs's name of a PCI device).
pub(crate) fn parse_pci_addr(s: &str) -> Option<PciAddr> {
    let (seg, rest) = s.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    let dev = u8::from_str_radix(dev, 16).ok().filter(|d| *d < 32)?;
    let func = u8::from_str_radix(func, 16).ok().filter(|f| *f < 8)?;
    Some(PciAddr {
        segment: u16::from_str_radix(seg, 16).ok()?,
        bus: u8::from_str_radix(bus, 16).ok()?,
        devfn: dev << 3 | func,
    })
}

/// The PCI address of the device behind cdev `file`, from sysfs.
fn pci_addr_of(file: &File) -> Result<PciAddr> {
    use std::os::unix::fs::MetadataExt;
    let not_cdev = |detail: String| BridgeError::Host {
        op: "VFIO cdev",
        detail,
    };
    let meta = file
        .metadata()
        .map_err(|e| not_cdev(format!("fstat: {e}")))?;
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    // /sys/dev/char/M:m is the vfio-dev node; its parent is the PCI device.
    let link = format!("/sys/dev/char/{major}:{minor}/device");
    let target = std::fs::read_link(&link)
        .map_err(|e| not_cdev(format!("not a VFIO cdev ({link}: {e})")))?;
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("");
    parse_pci_addr(name).ok_or_else(|| not_cdev(format!("not a PCI device ({name:?})")))
}

/// Wait until another process has bound `file` to its iommufd: until then
/// every ioctl but BIND is EINVAL.
fn wait_bound(file: &File, wait: Duration) -> Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        let mut info = vfio_device_info {
            argsz: argsz::<vfio_device_info>(),
            ..Default::default()
        };
        // SAFETY: the kernel writes at most argsz bytes into `info`.
        let rc = unsafe { ioctl_with_mut_ref(file, VFIO_DEVICE_GET_INFO(), &mut info) };
        if rc == 0 {
            return Ok(());
        }
        let e = errno();
        if e != libc::EINVAL {
            return Err(BridgeError::Kernel {
                op: "VFIO_DEVICE_GET_INFO",
                errno: e,
            });
        }
        if Instant::now() >= deadline {
            return Err(BridgeError::Host {
                op: "VFIO cdev",
                detail: format!(
                    "not bound to an iommufd by the VMM within {} ms (--bind-wait-ms)",
                    wait.as_millis()
                ),
            });
        }
        std::thread::sleep(BIND_POLL);
    }
}

/// Our device's id among the hot-reset info's devices (bound to the same
/// iommufd as the asking device, so QEMU's).
pub(crate) fn devid_in(devices: &[(PciAddr, u32)], me: PciAddr) -> Option<u32> {
    devices
        .iter()
        .find(|(a, id)| *a == me && !DEVID_NONE.contains(id))
        .map(|(_, id)| *id)
}

/// VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: the one uAPI that tells a process
/// that did not bind a cdev its device id. Needs a slot or bus reset.
fn devid_from_hot_reset(file: &File, me: PciAddr) -> Result<Option<u32>> {
    let mut info = HotResetInfo {
        head: vfio_pci_hot_reset_info {
            argsz: argsz::<HotResetInfo>(),
            ..Default::default()
        },
        devices: [vfio_pci_dependent_device::default(); HOT_RESET_MAX],
    };
    // SAFETY: the kernel writes at most argsz bytes into `info`.
    let rc = unsafe { ioctl_with_mut_ref(file, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO(), &mut info) };
    if rc != 0 {
        debug!("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: errno {}", errno());
        return Ok(None);
    }
    if info.head.flags & VFIO_PCI_HOT_RESET_FLAG_DEV_ID == 0 {
        return Ok(None);
    }
    let n = (info.head.count as usize).min(HOT_RESET_MAX);
    let devices: Vec<(PciAddr, u32)> = info.devices[..n]
        .iter()
        .map(|d| {
            (
                PciAddr {
                    segment: d.segment,
                    bus: d.bus,
                    devfn: d.devfn,
                },
                // SAFETY: both members of the union are a u32; with
                // FLAG_DEV_ID the kernel filled `devid`.
                unsafe { d.__bindgen_anon_1.devid },
            )
        })
        .collect();
    Ok(devid_in(&devices, me))
}

/// The only device object on `fd`, found by IOMMU_GET_HW_INFO on the ids
/// the kernel hands out (from 1, densely); None when there are several.
fn devid_by_probe(fd: &Iommufd) -> Option<u32> {
    let found: Vec<u32> = (1..=PROBE_IDS)
        .filter(|id| fd.hw_info(*id).is_ok())
        .take(2)
        .collect();
    match found[..] {
        [one] => Some(one),
        _ => None,
    }
}

/// A cdev the VMM has bound to the shared iommufd; `file` is our copy of
/// the VMM's open file.
#[derive(Debug)]
pub(crate) struct BoundCdev {
    file: File,
    pub(crate) dev_id: u32,
}

impl BoundCdev {
    /// Wait up to `wait` for the VMM's bind, then learn the device id.
    pub(crate) fn adopt(fd: &Iommufd, file: File, wait: Duration) -> Result<Self> {
        let me = pci_addr_of(&file)?;
        wait_bound(&file, wait)?;
        let (dev_id, how) = match devid_from_hot_reset(&file, me)? {
            Some(id) => (id, "hot-reset info"),
            None => match devid_by_probe(fd) {
                Some(id) => (id, "the only device on the iommufd"),
                None => {
                    return Err(BridgeError::Host {
                        op: "VFIO cdev",
                        detail: "bound, but its iommufd device id is unknown: no slot or bus \
                                 reset to ask, and not the only device on the iommufd"
                            .into(),
                    })
                }
            },
        };
        info!(
            "VFIO cdev {:04x}:{:02x}:{:02x}.{:x}: bound by the VMM, device id {dev_id} ({how})",
            me.segment,
            me.bus,
            me.devfn >> 3,
            me.devfn & 7
        );
        Ok(BoundCdev { file, dev_id })
    }

    /// VFIO_DEVICE_ATTACH_IOMMUFD_PT: attach, or replace the attachment.
    pub(crate) fn attach(&self, pt: u32, pasid: Option<u32>) -> Result<()> {
        let mut a = vfio_device_attach_iommufd_pt {
            argsz: argsz::<vfio_device_attach_iommufd_pt>(),
            flags: if pasid.is_some() {
                VFIO_DEVICE_ATTACH_PASID
            } else {
                0
            },
            pt_id: pt,
            pasid: pasid.unwrap_or(0),
        };
        // SAFETY: the kernel reads and writes at most argsz bytes of `a`.
        let rc = unsafe { ioctl_with_mut_ref(&self.file, VFIO_DEVICE_ATTACH_IOMMUFD_PT(), &mut a) };
        if rc != 0 {
            return Err(BridgeError::Kernel {
                op: "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
                errno: errno(),
            });
        }
        Ok(())
    }

    /// VFIO_DEVICE_DETACH_IOMMUFD_PT.
    pub(crate) fn detach(&self, pasid: Option<u32>) -> Result<()> {
        let mut d = vfio_device_detach_iommufd_pt {
            argsz: argsz::<vfio_device_detach_iommufd_pt>(),
            flags: u32::from(pasid.is_some()),
            pasid: pasid.unwrap_or(0),
        };
        // SAFETY: the kernel reads at most argsz bytes of `d`.
        let rc = unsafe { ioctl_with_mut_ref(&self.file, VFIO_DEVICE_DETACH_IOMMUFD_PT(), &mut d) };
        if rc != 0 {
            return Err(BridgeError::Kernel {
                op: "VFIO_DEVICE_DETACH_IOMMUFD_PT",
                errno: errno(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_parse_as_sysfs_names_them() {
        assert_eq!(
            parse_pci_addr("0000:00:04.0"),
            Some(PciAddr {
                segment: 0,
                bus: 0,
                devfn: 4 << 3
            })
        );
        assert_eq!(
            parse_pci_addr("0001:3a:1f.7"),
            Some(PciAddr {
                segment: 1,
                bus: 0x3a,
                devfn: 0x1f << 3 | 7
            })
        );
        for bad in [
            "",
            "0000:00:20.0",
            "0000:00:04.8",
            "00:04.0",
            "vfio0",
            "0000:00:04",
        ] {
            assert_eq!(parse_pci_addr(bad), None, "{bad}");
        }
    }

    #[test]
    fn our_device_id_is_the_entry_at_our_address_with_an_id() {
        let a = |devfn| PciAddr {
            segment: 0,
            bus: 1,
            devfn,
        };
        let devices = [(a(0), 5), (a(1), 0), (a(2), u32::MAX), (a(3), 9)];
        assert_eq!(devid_in(&devices, a(0)), Some(5));
        assert_eq!(devid_in(&devices, a(3)), Some(9));
        assert_eq!(devid_in(&devices, a(1)), None, "OWNED: no id");
        assert_eq!(devid_in(&devices, a(2)), None, "NOT_OWNED");
        assert_eq!(devid_in(&devices, a(4)), None);
    }
}
