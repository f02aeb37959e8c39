// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The kernel's iommufd selftest ABI (CONFIG_IOMMUFD_TEST): a mock device
//! and checks of what the kernel really mapped. Tests only.

use super::*;

ioctl_io_nr!(IOMMU_TEST_CMD, IOMMUFD_TYPE as u32, 0xa0);

pub const OP_MOCK_DOMAIN: u32 = 2;
pub const OP_MD_CHECK_MAP: u32 = 3;
pub const OP_MD_CHECK_REFS: u32 = 4;
pub const OP_MOCK_DOMAIN_REPLACE: u32 = 10;
pub const OP_MOCK_DOMAIN_FLAGS: u32 = 12;
pub const OP_MD_CHECK_IOTLB: u32 = 14;
pub const OP_TRIGGER_IOPF: u32 = 15;
pub const OP_PASID_ATTACH: u32 = 18;
pub const OP_PASID_REPLACE: u32 = 19;
pub const OP_PASID_DETACH: u32 = 20;
pub const OP_PASID_CHECK_HWPT: u32 = 21;
pub const OP_TRIGGER_VEVENT: u32 = 17;
/// MOCK_FLAGS_DEVICE_PASID (6.15): the mock device gets 20 PASID bits.
pub const MOCK_FLAGS_DEVICE_PASID: u32 = 1 << 2;

/// struct iommu_test_cmd: 72 bytes on 6.12 and 7.x.
#[repr(C, align(8))]
struct TestCmd {
    size: u32,
    op: u32,
    id: u32,
    reserved: u32,
    u: [u8; 48],
    last: u32,
}

const _: () = assert!(std::mem::size_of::<TestCmd>() == 72);

impl TestCmd {
    fn new(op: u32, id: u32) -> Self {
        TestCmd {
            size: size_of::<TestCmd>(),
            op,
            id,
            reserved: 0,
            u: [0; 48],
            last: 0,
        }
    }
    fn put32(&mut self, off: usize, v: u32) -> &mut Self {
        self.u[off..off + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
    fn put64(&mut self, off: usize, v: u64) -> &mut Self {
        self.u[off..off + 8].copy_from_slice(&v.to_le_bytes());
        self
    }
    fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.u[off..off + 4].try_into().unwrap())
    }
}

/// A mock device made by MOCK_DOMAIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockDevice {
    /// Handle for REPLACE and for IOMMU_DESTROY of the device.
    pub stdev_id: u32,
    /// The HWPT it was attached to.
    pub hwpt_id: u32,
    /// The iommufd device id (dev_id for HWPT_ALLOC, faults).
    pub dev_id: u32,
}

impl Iommufd {
    fn test_cmd(&self, op: &'static str, cmd: &mut TestCmd) -> Result<()> {
        // SAFETY: IOMMU_TEST_CMD reads and writes back one 72-byte
        // iommu_test_cmd; `cmd` is one, with `size` set.
        check(op, unsafe {
            ioctl_with_mut_ref(self, IOMMU_TEST_CMD(), cmd)
        })
    }

    /// Create a mock device attached to `pt_id` (an IOAS or a HWPT).
    pub fn mock_domain(&self, pt_id: impl ObjectId) -> Result<MockDevice> {
        let mut c = TestCmd::new(OP_MOCK_DOMAIN, pt_id.raw());
        self.test_cmd("IOMMU_TEST_OP_MOCK_DOMAIN", &mut c)?;
        Ok(MockDevice {
            stdev_id: c.get32(0),
            hwpt_id: c.get32(4),
            dev_id: c.get32(8),
        })
    }

    /// Re-attach a mock device to `pt_id`; returns the HWPT it is on now.
    /// MOCK_DOMAIN_FLAGS: a mock device with `dev_flags` (6.15's PASID
    /// flag; older kernels refuse unknown flags with EINVAL).
    pub fn mock_domain_flags(&self, pt_id: impl ObjectId, dev_flags: u32) -> Result<MockDevice> {
        let mut c = TestCmd::new(OP_MOCK_DOMAIN_FLAGS, pt_id.raw());
        c.put32(12, dev_flags);
        self.test_cmd("IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS", &mut c)?;
        Ok(MockDevice {
            stdev_id: c.get32(0),
            hwpt_id: c.get32(4),
            dev_id: c.get32(8),
        })
    }

    /// PASID_ATTACH (or PASID_REPLACE when `replace`): `pasid` of the
    /// mock device to `pt_id`.
    pub fn mock_pasid_attach(
        &self,
        stdev_id: u32,
        pasid: u32,
        pt_id: impl ObjectId,
        replace: bool,
    ) -> Result<()> {
        let (op, name) = if replace {
            (OP_PASID_REPLACE, "IOMMU_TEST_OP_PASID_REPLACE")
        } else {
            (OP_PASID_ATTACH, "IOMMU_TEST_OP_PASID_ATTACH")
        };
        let mut c = TestCmd::new(op, stdev_id);
        c.put32(0, pasid).put32(4, pt_id.raw());
        self.test_cmd(name, &mut c)
    }

    /// TRIGGER_VEVENT (6.15): the mock reports one vEVENT {virt_id} of
    /// device `dev_id` to its vIOMMU's selftest vEVENTQ.
    pub fn trigger_vevent(&self, dev_id: u32) -> Result<()> {
        let mut c = TestCmd::new(OP_TRIGGER_VEVENT, 0);
        c.put32(0, dev_id);
        self.test_cmd("IOMMU_TEST_OP_TRIGGER_VEVENT", &mut c)
    }

    /// PASID_DETACH.
    pub fn mock_pasid_detach(&self, stdev_id: u32, pasid: u32) -> Result<()> {
        let mut c = TestCmd::new(OP_PASID_DETACH, stdev_id);
        c.put32(0, pasid);
        self.test_cmd("IOMMU_TEST_OP_PASID_DETACH", &mut c)
    }

    /// PASID_CHECK_HWPT: is `pasid` of the mock device on `hwpt` (0:
    /// is it detached)?
    pub fn mock_pasid_check_hwpt(
        &self,
        stdev_id: u32,
        pasid: u32,
        hwpt: impl ObjectId,
    ) -> Result<()> {
        let mut c = TestCmd::new(OP_PASID_CHECK_HWPT, stdev_id);
        c.put32(0, pasid).put32(4, hwpt.raw());
        self.test_cmd("IOMMU_TEST_OP_PASID_CHECK_HWPT", &mut c)
    }

    pub fn mock_domain_replace(&self, stdev_id: u32, pt_id: impl ObjectId) -> Result<u32> {
        let mut c = TestCmd::new(OP_MOCK_DOMAIN_REPLACE, stdev_id);
        c.put32(0, pt_id.raw());
        self.test_cmd("IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE", &mut c)?;
        Ok(c.get32(0))
    }

    /// Ask the kernel whether `hwpt` maps [iova, iova + len) to the pages
    /// at our address `uptr`.
    pub fn md_check_map(&self, hwpt: impl ObjectId, iova: u64, len: u64, uptr: u64) -> Result<()> {
        let mut c = TestCmd::new(OP_MD_CHECK_MAP, hwpt.raw());
        c.put64(0, iova).put64(8, len).put64(16, uptr);
        self.test_cmd("IOMMU_TEST_OP_MD_CHECK_MAP", &mut c)
    }

    /// Ask the kernel whether every page of [uptr, uptr + len) has
    /// `refs` pins.
    pub fn md_check_refs(&self, uptr: u64, len: u64, refs: u32) -> Result<()> {
        let mut c = TestCmd::new(OP_MD_CHECK_REFS, 0);
        c.put64(0, len).put64(8, uptr).put32(16, refs);
        self.test_cmd("IOMMU_TEST_OP_MD_CHECK_REFS", &mut c)
    }

    /// Check one IOTLB slot of a mock nested HWPT.
    pub fn md_check_iotlb(&self, hwpt: impl ObjectId, slot: u32, value: u32) -> Result<()> {
        let mut c = TestCmd::new(OP_MD_CHECK_IOTLB, hwpt.raw());
        c.put32(0, slot).put32(4, value);
        self.test_cmd("IOMMU_TEST_OP_MD_CHECK_IOTLB", &mut c)
    }

    /// Inject one page request (LAST set) from a mock device.
    pub fn trigger_iopf(
        &self,
        dev_id: u32,
        pasid: u32,
        grpid: u32,
        perm: u32,
        addr: u64,
    ) -> Result<()> {
        let mut c = TestCmd::new(OP_TRIGGER_IOPF, 0);
        c.put32(0, dev_id)
            .put32(4, pasid)
            .put32(8, grpid)
            .put32(12, perm)
            .put64(16, addr);
        self.test_cmd("IOMMU_TEST_OP_TRIGGER_IOPF", &mut c)
    }
}
