//! A VFIO endpoint on a real kernel: `--endpoint ID,vfio=CDEV` with the cdev
//! named by `VIOMMU_VFIO_CDEV` (a device bound to vfio-pci).
//!
//! The kernel tier boots its guest with QEMU's virtio-iommu and a
//! pci-testdev bound to vfio-pci, so the guest's /dev/vfio/devices/vfio0 is
//! a real VFIO device behind a real IOMMU driver; on a host with IOMMU
//! hardware the same tests run against the device an operator names. The
//! test shares its iommufd with the backend (`--iommufd-fd`) to check
//! object lifetimes. A pci-testdev does no DMA, so translations themselves
//! are proven with the selftest mock (tests/selftest_endpoints.rs); here
//! the kernel accepting every bind, attach, replace, copy and unmap on a
//! real device is what is tested.

mod support;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::wire::{self, S_INVAL, S_OK};
use support::{BackendProcess, ControlClient, Frontend, FrontendOptions, GuestMem};
use vhost_device_iommu::iommufd_bridge::sys::Iommufd;

const EP: u32 = 0x8;
const RW: u32 = wire::MAP_F_READ | wire::MAP_F_WRITE;
const MEM: usize = 16 << 20;

fn cdev() -> String {
    std::env::var("VIOMMU_VFIO_CDEV")
        .expect("VIOMMU_VFIO_CDEV names the VFIO cdev (/dev/vfio/devices/vfioN) to use")
}

struct Rig {
    fd: Iommufd,
    backend: BackendProcess,
    control: ControlClient,
}

impl Rig {
    fn new() -> Rig {
        let fd = Iommufd::open("/dev/iommu".as_ref()).expect("open /dev/iommu");
        // SAFETY: dup of an fd we own (no CLOEXEC: the backend inherits it);
        // our copy is closed below.
        let shared = unsafe { libc::dup(fd.as_raw_fd()) };
        assert!(shared >= 0);
        let fd_arg = shared.to_string();
        let ep = format!("{EP:#x},vfio={}", cdev());
        let backend = BackendProcess::spawn(&["--iommufd-fd", &fd_arg, "--endpoint", &ep]);
        // SAFETY: our copy; the child has its own.
        unsafe { libc::close(shared) };
        let backend = backend.expect("backend binds the VFIO device");
        let control = ControlClient::connect(&backend.control).expect("control socket");
        Rig {
            fd,
            backend,
            control,
        }
    }

    fn connect(&self) -> Frontend {
        let mem = Arc::new(GuestMem::new(MEM).unwrap());
        Frontend::connect(&self.backend.socket, mem, FrontendOptions::default())
            .expect("frontend sets up")
    }

    fn host(&mut self) -> Value {
        let r = self.control.request(&json!({"op": "host"})).unwrap();
        assert_eq!(r["ok"], true, "{r}");
        r["host"].clone()
    }

    fn endpoint(&mut self) -> Value {
        self.host()["endpoints"][0].clone()
    }

    fn domain(&mut self, id: u32) -> Option<Value> {
        let h = self.host();
        h["domains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .cloned()
    }
}

fn status<R: AsRef<[u8]>>(f: &mut Frontend, req: (R, u32)) -> u8 {
    f.request_status(&req).expect("request answered")
}

#[test]
#[ignore = "needs a VFIO cdev in VIOMMU_VFIO_CDEV: run by tests/vm/kernel-tier.sh"]
fn vfio_device_binds_and_follows_the_guest() {
    let mut rig = Rig::new();
    let h = rig.host();
    assert_eq!(h["kind"], "iommufd");
    let e = rig.endpoint();
    assert_eq!(e["device"]["kind"], "vfio", "{h}");
    assert_eq!(e["pt_id"], h["blocking_ioas"], "blocked until a guest");

    let mut f = rig.connect();
    let h = rig.host();
    assert!(
        !h["ram"].as_array().unwrap().is_empty(),
        "guest RAM mapped: {h}"
    );
    assert_eq!(rig.endpoint()["pt_id"], h["bypass_pt"], "bypass on at boot");

    // PROBE: the MSI window at least, every other hole as RESERVED.
    let p = f.probe(EP).unwrap();
    assert_eq!(p.status, S_OK);
    let r = p.resv_mem().unwrap();
    assert!(
        r.iter().any(|m| m.subtype == 1 && m.start == 0xfee0_0000),
        "{r:?}"
    );

    // MAP domain: attach, map, unmap, replace, detach.
    assert_eq!(status(&mut f, wire::attach(1, EP, 0, 0)), S_OK);
    let d1 = rig.domain(1).expect("domain 1 on the host");
    assert_eq!(rig.endpoint()["pt_id"], d1["hwpt"]);
    let gpa = f.mem.alloc(0x10000, 0x1000).unwrap();
    for i in 0..8u64 {
        let iova = 0x1_0000_0000 + i * 0x2000;
        assert_eq!(
            status(
                &mut f,
                wire::map(1, iova, iova + 0xfff, gpa + i * 0x1000, RW)
            ),
            S_OK
        );
    }
    assert_eq!(
        status(&mut f, wire::unmap(1, 0x1_0000_0000, 0x1_0000_ffff)),
        S_OK
    );
    // The MSI window is refused before the kernel sees it.
    assert_eq!(
        status(&mut f, wire::map(1, 0xfee0_0000, 0xfee0_0fff, gpa, RW)),
        S_INVAL
    );
    assert_eq!(status(&mut f, wire::attach(2, EP, 0, 0)), S_OK);
    let d2 = rig.domain(2).unwrap();
    assert_eq!(rig.endpoint()["pt_id"], d2["hwpt"]);
    assert!(rig.domain(1).is_none());
    assert_eq!(
        rig.fd
            .destroy(d1["ioas"].as_u64().unwrap() as u32)
            .unwrap_err()
            .errno(),
        Some(libc::ENOENT)
    );
    assert_eq!(status(&mut f, wire::detach(2, EP)), S_OK);
    assert_eq!(rig.endpoint()["pt_id"], rig.host()["bypass_pt"]);

    // Disconnect: blocked, nothing held; the next guest is served.
    assert_eq!(status(&mut f, wire::attach(3, EP, 0, 0)), S_OK);
    f.disconnect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = rig.host();
        if h["ram"].as_array().unwrap().is_empty() && h["domains"].as_array().unwrap().is_empty() {
            assert_eq!(h["endpoints"][0]["pt_id"], h["blocking_ioas"]);
            break;
        }
        assert!(Instant::now() < deadline, "still holding: {h}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut f = rig.connect();
    assert_eq!(status(&mut f, wire::attach(1, EP, 0, 0)), S_OK);
    assert!(rig.backend.child.try_wait().unwrap().is_none());
}
