// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The software IOMMU as a `HostIommu`: nothing on the host to keep in
//! step. Virtual endpoints translate through the device state itself
//! (`device::translate::translate_dma`), so every operation here succeeds at no cost.

use super::{HostIommu, HostMapping, IovaHole, RamRegion, Result, Target};

#[derive(Debug, Default)]
pub struct SoftwareIommu;

impl HostIommu for SoftwareIommu {
    fn name(&self) -> &'static str {
        "software"
    }

    fn owns(&self, _endpoint: u32) -> bool {
        false
    }

    fn backs(&self, _domain: u32) -> bool {
        false
    }

    fn set_guest_ram(&mut self, _regions: &[RamRegion]) -> Result<()> {
        Ok(())
    }

    fn attach(
        &mut self,
        _endpoint: u32,
        _target: Target,
        _mappings: &mut dyn Iterator<Item = HostMapping>,
    ) -> Result<()> {
        Ok(())
    }

    fn map(&mut self, _domain: u32, _m: HostMapping) -> Result<()> {
        Ok(())
    }

    fn unmap(&mut self, _domain: u32, _iova: u64, _end: u64) -> Result<()> {
        Ok(())
    }

    fn set_bypass(&mut self, _on: bool) -> Result<()> {
        Ok(())
    }

    fn reset(&mut self, _bypass: bool) {}

    fn reserved(&self, _endpoint: u32) -> Option<&[IovaHole]> {
        None
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "kind": "software" })
    }
}
