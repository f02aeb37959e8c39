// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The selftest mock-device provider: `--endpoint ID,selftest` makes a mock
//! device of the kernel's iommufd selftest (CONFIG_IOMMUFD_TEST) stand in
//! for a PCI device, so the whole iommufd path runs on a test kernel with
//! no IOMMU hardware. Compiled only with the `selftest` feature.

use serde_json::{json, Value};

use super::host::HostDevice;
use super::ids::{IoasId, PtId};
use super::sys::{Iommufd, MockDevice, MOCK_FLAGS_DEVICE_PASID};
use super::Result;

#[derive(Debug)]
pub struct SelftestDevice {
    mock: MockDevice,
    /// Made with PASID support (kernels with the mock's PASID ops).
    pasid: bool,
}

impl SelftestDevice {
    /// A mock device attached to `ioas`: with PASID support where the
    /// kernel has it (MOCK_DOMAIN_FLAGS), else a plain MOCK_DOMAIN.
    pub fn create(fd: &Iommufd, ioas: IoasId) -> Result<Self> {
        match fd.mock_domain_flags(ioas.raw(), MOCK_FLAGS_DEVICE_PASID) {
            Ok(mock) => Ok(SelftestDevice { mock, pasid: true }),
            Err(e) => {
                log::info!("selftest device without PASID support: {e}");
                Ok(SelftestDevice {
                    mock: fd.mock_domain(ioas.raw())?,
                    pasid: false,
                })
            }
        }
    }
}

impl HostDevice for SelftestDevice {
    fn dev_id(&self) -> u32 {
        self.mock.dev_id
    }

    fn attach(&mut self, fd: &Iommufd, pt: PtId) -> Result<()> {
        fd.mock_domain_replace(self.mock.stdev_id, pt.raw())?;
        Ok(())
    }

    fn supports_pasid(&self) -> bool {
        self.pasid
    }

    fn attach_pasid(&mut self, fd: &Iommufd, pasid: u32, pt: PtId, replace: bool) -> Result<()> {
        Ok(fd.mock_pasid_attach(self.mock.stdev_id, pasid, pt.raw(), replace)?)
    }

    fn detach_pasid(&mut self, fd: &Iommufd, pasid: u32) -> Result<()> {
        Ok(fd.mock_pasid_detach(self.mock.stdev_id, pasid)?)
    }

    fn describe(&self) -> Value {
        json!({ "kind": "selftest", "stdev_id": self.mock.stdev_id, "pasid": self.pasid })
    }

    fn release(&mut self, fd: &Iommufd) {
        if let Err(e) = fd.destroy(self.mock.stdev_id) {
            log::error!("selftest device {}: destroy: {e}", self.mock.stdev_id);
        }
    }
}
