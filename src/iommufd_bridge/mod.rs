// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The host side of the IOMMU, behind one trait.
//!
//! The device state (`device::state`) decides what a request means; a
//! `HostIommu` makes the host agree with it. Three implementations:
//! - `software::SoftwareIommu`: every endpoint virtual, translated by the
//!   software model (`device::translate`) from the device state itself;
//! - `host::IommufdHost<vfio::VfioCdev>`: real iommufd, VFIO cdev devices;
//! - `host::IommufdHost<selftest::SelftestDevice>` (feature `selftest`): the
//!   kernel's iommufd selftest mock devices, for the kernel test tier.
//!
//! The iommufd calls themselves live in `sys`.

mod abi;
pub(crate) mod host;
pub mod ids;
pub(crate) mod reserved;
#[cfg(feature = "selftest")]
pub(crate) mod selftest;
pub(crate) mod software;
pub mod sys;
pub(crate) mod vfio;
pub(crate) mod vfio_adopt;

use std::fmt::Debug;

use thiserror::Error;

use crate::nested::{Invalidate, TableCaps, TableDesc};

/// One region of guest RAM as the frontend's memory table gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    pub gpa: u64,
    pub len: u64,
    /// Where we mapped it.
    pub host_va: u64,
    /// The file behind it, if any.
    pub file: Option<RamFile>,
}

/// The file (a memfd) behind a region of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamFile {
    /// Borrowed from the frontend's memory table, which outlives the region.
    pub fd: i32,
    /// The region's offset in the file.
    pub offset: u64,
}

/// Where an endpoint's DMA should go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Not attached: identity when bypass is on, blocked when it is off.
    Unattached,
    /// A bypass domain: identity.
    Identity,
    /// A MAP/UNMAP domain.
    Domain(u32),
    /// A table domain: the guest's table nested on guest RAM; with
    /// `page_requests`, its faults go to the connection's fault queue.
    Table {
        domain: u32,
        table: TableDesc,
        page_requests: bool,
    },
}

/// What a mapping lets a device do, as the host IOMMU enforces it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    pub read: bool,
    pub write: bool,
}

/// One mapping of a MAP/UNMAP domain (inclusive end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMapping {
    pub iova: u64,
    pub end: u64,
    pub phys: u64,
    pub access: Access,
}

/// x86's MSI doorbell window: DMA there is an interrupt, never memory, so
/// no IOMMU translates it (virtio-iommu.md P11).
pub const MSI_START: u64 = 0xfee0_0000;
pub(crate) const MSI_END: u64 = 0xfeef_ffff;

/// Why the host cannot translate an IOVA range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoleKind {
    /// Outside the device's usable IOVA ranges.
    Untranslated,
    /// An MSI doorbell window.
    Msi,
}

/// An IOVA range (inclusive end) the host IOMMU cannot map for an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IovaHole {
    pub start: u64,
    pub end: u64,
    pub kind: HoleKind,
}

/// How the host IOMMU ends a page-request group: the device retries the
/// access, or gives up on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageOutcome {
    Success,
    Invalid,
}

/// The answer to the fault queue's page-request group `cookie`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageResponse {
    pub cookie: u32,
    pub outcome: PageOutcome,
}

/// A host operation that failed. Comparable, so that request errors can
/// carry it; the errno is what the kernel said.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum BridgeError {
    #[error("{op} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Kernel { op: &'static str, errno: i32 },
    #[error("{op} failed: {detail}")]
    Host { op: &'static str, detail: String },
    #[error("gpa {gpa:#x}+{len:#x} is not guest RAM")]
    NotGuestRam { gpa: u64, len: u64 },
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("not a VFIO cdev (not a character device)")]
    NotCdev,
}

impl From<sys::SysError> for BridgeError {
    fn from(e: sys::SysError) -> Self {
        match e.errno() {
            Some(errno) => BridgeError::Kernel { op: e.op(), errno },
            None => BridgeError::Host {
                op: e.op(),
                detail: e.to_string(),
            },
        }
    }
}

pub type Result<T> = std::result::Result<T, BridgeError>;

/// A handle for reading a vIOMMU's vEVENTQ.
pub struct EventQueue {
    pub file: std::fs::File,
    /// What its events are.
    pub kind: crate::fault_queue::vevents::VeventKind,
}

/// What the host must do so that endpoints' DMA follows the device state.
/// Called by `IommuState` between validating a request and committing it:
/// an `Err` leaves the state as it was.
pub trait HostIommu: Debug + Send {
    /// Short name for logs and the control socket.
    fn name(&self) -> &'static str;

    /// Is this endpoint served by the host (not by the software model)?
    fn owns(&self, endpoint: u32) -> bool;

    /// Does the host hold objects for this domain (a host endpoint is in it)?
    fn backs(&self, domain: u32) -> bool;

    /// The frontend's memory table changed: guest RAM at IOVA = GPA.
    fn set_guest_ram(&mut self, regions: &[RamRegion]) -> Result<()>;

    /// Point `endpoint` at `target`. For a domain the host does not back yet,
    /// `mappings` yields what it already maps.
    fn attach(
        &mut self,
        endpoint: u32,
        target: Target,
        mappings: &mut dyn Iterator<Item = HostMapping>,
    ) -> Result<()>;

    /// A new mapping in a domain the host backs.
    fn map(&mut self, domain: u32, m: HostMapping) -> Result<()>;

    /// Remove one whole mapping (as made by `map`) from a domain it backs.
    fn unmap(&mut self, domain: u32, iova: u64, end: u64) -> Result<()>;

    /// The bypass byte changed: unattached endpoints follow it.
    fn set_bypass(&mut self, on: bool) -> Result<()>;

    /// Device or system reset: every endpoint unattached (with `bypass`),
    /// every domain object destroyed in dependency order.
    fn reset(&mut self, bypass: bool);

    /// The frontend is gone: as `reset`, and guest RAM unmapped.
    fn disconnect(&mut self) {
        self.reset(false);
        if let Err(e) = self.set_guest_ram(&[]) {
            crate::log_limit::limited!(
                log::Level::Error,
                "{}: unmapping guest RAM: {e}",
                self.name()
            );
        }
    }

    /// Point one PASID of `endpoint` at a table domain (`Some(Target::Table)`)
    /// or detach it (`None`).
    fn attach_pasid(&mut self, endpoint: u32, pasid: u32, target: Option<Target>) -> Result<()> {
        let _ = (endpoint, pasid, target);
        Err(BridgeError::Unsupported("PASID attach"))
    }

    /// Invalidate the host's caches of a table domain's guest table;
    /// `invs` are consecutive INVALIDATE requests, sent in one call.
    fn invalidate(&mut self, domain: u32, invs: &[Invalidate]) -> Result<()> {
        let _ = (domain, invs);
        Err(BridgeError::Unsupported("INVALIDATE"))
    }

    /// The vIOMMU's event queue (unrecoverable faults), if there is one.
    fn event_queue_reader(&self) -> Option<EventQueue> {
        None
    }

    /// This connection's fault queue, once a table with PAGE_REQUESTS made
    /// it: a handle for reading its records (the eventq worker polls it).
    fn fault_queue_reader(&self) -> Option<std::fs::File> {
        None
    }

    /// Answer a page-request group of the fault queue. `Ok(false)`: the
    /// kernel had completed that group itself (detach, replace: EINVAL).
    fn page_response(&mut self, response: PageResponse) -> Result<bool> {
        let _ = response;
        Err(BridgeError::Unsupported("no fault queue"))
    }

    /// `page_response` for several groups at once (the kernel takes them in
    /// one write); `each(i, result)` is called, in order, for every one not
    /// taken (`Ok(false)` or an error): the others were (a call per taken
    /// response cost ~30 instructions per relayed fault).
    fn page_responses(
        &mut self,
        responses: &[PageResponse],
        each: &mut dyn FnMut(usize, Result<bool>),
    ) {
        for (i, &r) in responses.iter().enumerate() {
            match self.page_response(r) {
                Ok(true) => {}
                other => each(i, other),
            }
        }
    }

    /// The endpoint whose device has iommufd `dev_id` (fault records).
    fn endpoint_of_dev(&self, dev_id: u32) -> Option<u32> {
        let _ = dev_id;
        None
    }

    /// What ATTACH_TABLE can do on a host endpoint.
    fn table_caps(&self, endpoint: u32) -> TableCaps {
        let _ = endpoint;
        TableCaps::default()
    }

    /// Can `add_vfio` take VFIO devices (an iommufd serving VFIO)? The
    /// control socket receives fds, and its threads may bind them, only then.
    fn takes_vfio(&self) -> bool {
        false
    }

    /// Hot-plug: bind the VFIO cdev `file` (sent over the control socket)
    /// as endpoint `id`, unattached. On `Err` nothing is kept (the file is
    /// closed).
    fn add_vfio(&mut self, id: u32, file: std::fs::File) -> Result<()> {
        let _ = (id, file);
        Err(BridgeError::Unsupported(
            "no iommufd for VFIO devices (start with --vfio-hotplug or a VFIO endpoint)",
        ))
    }

    /// Hot-unplug: let go of host endpoint `id` and every host object it
    /// holds (PASIDs and RID detached, domains it was the last user of,
    /// its vDEVICE, the device itself). Never fails: what the kernel
    /// refuses is logged and released anyway.
    fn remove_endpoint(&mut self, id: u32) {
        let _ = id;
    }

    /// The IOVA holes of a host endpoint (None: use the platform's). Known
    /// from `add`ing the endpoint on; never changes after.
    fn reserved(&self, endpoint: u32) -> Option<&[IovaHole]>;

    /// A JSON description of the host objects, for the control socket.
    fn describe(&self) -> serde_json::Value;
}
