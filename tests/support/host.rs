// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Host endpoints (VFIO, selftest) on a real /dev/iommu: the backend gets
//! a copy of the test's own iommufd (`--iommufd-fd`), so the object ids it
//! reports on its control socket (`{"op":"host"}`) are valid in the test
//! too, for the kernel's selftest checks and IOMMU_DESTROY probes.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_device_iommu::iommufd_bridge::sys::Iommufd;

use super::{BackendProcess, ControlClient, Frontend, FrontendOptions, GuestMem, Result};

/// Start the backend with `--iommufd-fd` naming a copy of `fd`, then `extra`.
pub fn spawn_sharing_iommufd(fd: &Iommufd, extra: &[&str]) -> Result<BackendProcess> {
    // SAFETY: dup of an fd we own. The copy has no CLOEXEC, so the child
    // inherits it; ours is closed right after the spawn.
    let shared = unsafe { libc::dup(fd.as_raw_fd()) };
    if shared < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let arg = shared.to_string();
    let mut args = vec!["--iommufd-fd", arg.as_str()];
    args.extend_from_slice(extra);
    let backend = BackendProcess::spawn(&args);
    // SAFETY: our copy; the child has its own.
    unsafe { libc::close(shared) };
    backend
}

/// The test's iommufd, the backend sharing it, and its control socket.
pub struct HostRig {
    pub fd: Iommufd,
    pub backend: BackendProcess,
    pub control: ControlClient,
}

impl HostRig {
    /// Open /dev/iommu and start the backend with `endpoints` (and more
    /// arguments) on it.
    pub fn new(args: &[&str]) -> HostRig {
        let fd = Iommufd::open("/dev/iommu".as_ref()).expect("open /dev/iommu");
        let backend = spawn_sharing_iommufd(&fd, args).expect("backend binds its host endpoints");
        let control = ControlClient::connect(&backend.control).expect("control socket");
        HostRig {
            fd,
            backend,
            control,
        }
    }

    /// A frontend with guest RAM laid out as `layout` (GPA, size).
    pub fn connect_with(&self, layout: &[(u64, usize)]) -> Frontend {
        let mem = Arc::new(GuestMem::with_regions(layout).unwrap());
        Frontend::connect(&self.backend.socket, mem, FrontendOptions::default())
            .expect("frontend sets up")
    }

    /// The control socket's `host` reply.
    pub fn host(&mut self) -> Value {
        let r = self.control.request(&json!({"op": "host"})).unwrap();
        assert_eq!(r["ok"], true, "{r}");
        r["host"].clone()
    }

    fn find(&mut self, list: &str, id: u32) -> Option<Value> {
        let h = self.host();
        h[list]
            .as_array()
            .unwrap_or_else(|| panic!("no {list} in {h}"))
            .iter()
            .find(|e| e["id"] == id)
            .cloned()
    }

    pub fn endpoint(&mut self, id: u32) -> Value {
        self.find("endpoints", id)
            .unwrap_or_else(|| panic!("endpoint {id:#x} is not a host endpoint"))
    }

    pub fn domain(&mut self, id: u32) -> Option<Value> {
        self.find("domains", id)
    }

    /// Wait until the backend has let go of the last guest (no RAM, no
    /// domain); returns the `host` reply then.
    pub fn wait_idle(&mut self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let h = self.host();
            if h["ram"].as_array().unwrap().is_empty()
                && h["domains"].as_array().unwrap().is_empty()
            {
                return h;
            }
            assert!(Instant::now() < deadline, "still holding: {h}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
