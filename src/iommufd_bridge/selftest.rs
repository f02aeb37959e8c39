//! The selftest mock-device provider: `--endpoint ID,selftest` makes a mock
//! device of the kernel's iommufd selftest (CONFIG_IOMMUFD_TEST) stand in
//! for a PCI device, so the whole iommufd path runs on a test kernel with
//! no IOMMU hardware. Compiled only with the `selftest` feature.

use serde_json::{json, Value};

use super::host::HostDevice;
use super::sys::{Iommufd, MockDevice};
use super::Result;

#[derive(Debug)]
pub struct SelftestDevice {
    mock: MockDevice,
}

impl SelftestDevice {
    /// IOMMU_TEST_OP_MOCK_DOMAIN: a mock device attached to `pt_id`.
    pub fn create(fd: &Iommufd, pt_id: u32) -> Result<Self> {
        Ok(SelftestDevice {
            mock: fd.mock_domain(pt_id)?,
        })
    }
}

impl HostDevice for SelftestDevice {
    fn dev_id(&self) -> u32 {
        self.mock.dev_id
    }

    fn attach(&mut self, fd: &Iommufd, pt_id: u32) -> Result<()> {
        fd.mock_domain_replace(self.mock.stdev_id, pt_id)?;
        Ok(())
    }

    fn describe(&self) -> Value {
        json!({ "kind": "selftest", "stdev_id": self.mock.stdev_id })
    }

    fn release(&mut self, fd: &Iommufd) {
        if let Err(e) = fd.destroy(self.mock.stdev_id) {
            log::error!("selftest device {}: destroy: {e}", self.mock.stdev_id);
        }
    }
}
