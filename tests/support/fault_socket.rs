// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The kernel's fault FD played by the test (`--test-fault-socket`, test
//! only): the backend connects to a unix stream socket the test listens on
//! and serves it as an iommufd fault FD. The test writes struct
//! iommu_hwpt_pgfault records (whole groups, LAST_PAGE ending each) and
//! reads back the struct iommu_hwpt_page_response records the backend
//! writes. A stream socket rather than SOCK_SEQPACKET: one read() takes
//! everything queued that fits, as the kernel's read() takes every whole
//! group that fits, where a SEQPACKET read returns one send() and silently
//! truncates a longer one.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use iommufd_bindings::iommufd::{
    iommu_hwpt_page_response, iommu_hwpt_pgfault,
    iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_LAST_PAGE,
    iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_PASID_VALID,
    iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_READ,
};

use super::process::fresh_temp_dir;
use super::{Error, Result};

/// struct iommu_hwpt_pgfault.
pub const RECORD: usize = std::mem::size_of::<iommu_hwpt_pgfault>();
/// struct iommu_hwpt_page_response.
pub const RESPONSE: usize = std::mem::size_of::<iommu_hwpt_page_response>();

/// Where the backend connects (`--test-fault-socket PATH`), before it starts.
pub struct FaultSocketListener {
    listener: UnixListener,
    dir: PathBuf,
    pub path: PathBuf,
}

impl FaultSocketListener {
    pub fn new() -> Result<FaultSocketListener> {
        let dir = fresh_temp_dir("fault-socket")?;
        let path = dir.join("fault.sock");
        let listener = UnixListener::bind(&path)?;
        Ok(FaultSocketListener {
            listener,
            dir,
            path,
        })
    }

    /// The backend's option and its value.
    pub fn args(&self) -> [String; 2] {
        [
            "--test-fault-socket".into(),
            self.path.display().to_string(),
        ]
    }

    /// The backend's connection (it connects at start-up, before its
    /// vhost-user socket appears: call this after the spawn).
    pub fn accept(self) -> Result<KernelFaultFd> {
        let (s, _) = self.listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(KernelFaultFd { s })
    }
}

impl Drop for FaultSocketListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One page request as the kernel writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    pub dev_id: u32,
    pub pasid: Option<u32>,
    pub addr: u64,
    pub cookie: u32,
    /// The group's last record.
    pub last: bool,
}

impl PageFault {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut flags = 0;
        if self.last {
            flags |= iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_LAST_PAGE;
        }
        if self.pasid.is_some() {
            flags |= iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_PASID_VALID;
        }
        let r = iommu_hwpt_pgfault {
            flags,
            dev_id: self.dev_id,
            pasid: self.pasid.unwrap_or(0),
            grpid: 0,
            perm: iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_READ,
            __reserved: 0,
            addr: self.addr,
            length: 0,
            cookie: self.cookie,
        };
        let mut b = [0u8; RECORD];
        // SAFETY: writes size_of::<iommu_hwpt_pgfault>() == RECORD bytes
        // into `b`, unaligned; the struct has no padding.
        unsafe { std::ptr::write_unaligned(b.as_mut_ptr().cast(), r) };
        out.extend_from_slice(&b);
    }
}

/// A response the backend wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub cookie: u32,
    /// IOMMUFD_PAGE_RESP_SUCCESS (0) or _INVALID (1).
    pub code: u32,
}

/// The test's end of the backend's fault FD.
pub struct KernelFaultFd {
    s: UnixStream,
}

impl KernelFaultFd {
    /// Queue `faults` for the backend in one write (the kernel had them
    /// all queued before the backend's read).
    pub fn raise(&mut self, faults: &[PageFault]) -> Result<()> {
        let mut b = Vec::with_capacity(faults.len() * RECORD);
        for f in faults {
            f.encode(&mut b);
        }
        self.s.write_all(&b)?;
        Ok(())
    }

    /// Exactly `n` responses, within a minute.
    pub fn answers(&mut self, n: usize) -> Result<Vec<Answer>> {
        let mut b = vec![0u8; n * RESPONSE];
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = 0;
        while got < b.len() {
            match self.s.read(&mut b[got..]) {
                Ok(0) => return Err(Error::Invalid("the backend closed its fault FD".into())),
                Ok(k) => got += k,
                Err(e)
                    if Instant::now() < deadline && e.kind() == std::io::ErrorKind::Interrupted => {
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(b.chunks_exact(RESPONSE)
            .map(|r| Answer {
                cookie: u32::from_ne_bytes(r[..4].try_into().unwrap()),
                code: u32::from_ne_bytes(r[4..8].try_into().unwrap()),
            })
            .collect())
    }

    /// Bytes the backend wrote that the test has not read (FIONREAD).
    pub fn pending(&self) -> Result<usize> {
        use std::os::fd::AsRawFd;
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int.
        if unsafe { libc::ioctl(self.s.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(n as usize)
    }
}
