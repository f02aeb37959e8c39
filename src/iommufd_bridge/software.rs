// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The software IOMMU as a `HostIommu`: nothing on the host to keep in
//! step. Virtual endpoints translate through the device state itself
//! (`device::translate::translate_dma`), so every operation here succeeds at no cost.
//!
//! Test only (`--test-fault-socket`, hidden): a stream socket standing in
//! for the kernel's fault FD, so that the cost benches relay page requests
//! through the very code the kernel's fault queue goes through
//! (`SourceId::Kernel`: whole-group reads, `iommu_hwpt_page_response`
//! writes) on a host with no /dev/iommu. Its records name a virtual
//! endpoint in `dev_id`.

use std::fs::File;

use super::host::write_page_responses;
use super::{HostIommu, HostMapping, IovaHole, PageResponse, RamRegion, Result, Target};

#[derive(Debug, Default)]
pub struct SoftwareIommu {
    /// `--test-fault-socket`: read and answered as the kernel's fault FD.
    fault: Option<File>,
    /// write() calls that carried responses to it.
    response_writes: u64,
}

impl SoftwareIommu {
    /// Serve `fault` (connected, non-blocking) as this host's fault queue.
    pub(crate) fn with_test_fault_socket(fault: File) -> Self {
        SoftwareIommu {
            fault: Some(fault),
            response_writes: 0,
        }
    }
}

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

    fn fault_queue_reader(&self) -> Option<File> {
        let f = self.fault.as_ref()?;
        match f.try_clone() {
            Ok(f) => Some(f),
            Err(e) => {
                crate::log_limit::limited!(log::Level::Error, "test fault socket: dup: {e}");
                None
            }
        }
    }

    fn page_responses(
        &mut self,
        responses: &[PageResponse],
        each: &mut dyn FnMut(usize, Result<bool>),
    ) {
        match self.fault.as_mut() {
            Some(f) => self.response_writes += write_page_responses(f, responses, each).writes,
            None => {
                for i in 0..responses.len() {
                    each(i, Err(super::BridgeError::Unsupported("no fault queue")));
                }
            }
        }
    }

    fn endpoint_of_dev(&self, dev_id: u32) -> Option<u32> {
        // The stand-in's records name the endpoint itself.
        self.fault.as_ref().map(|_| dev_id)
    }

    fn describe(&self) -> serde_json::Value {
        match self.fault {
            None => serde_json::json!({ "kind": "software" }),
            Some(_) => serde_json::json!({
                "kind": "software",
                "test_fault_socket": true,
                "page_response_writes": self.response_writes,
            }),
        }
    }
}
