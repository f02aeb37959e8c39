// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A VFIO endpoint on a real kernel: `--endpoint ID,vfio=CDEV` with the cdev
//! named by `VIOMMU_VFIO_CDEV` (a device bound to vfio-pci).
//!
//! The kernel tier boots its guest with QEMU's virtio-iommu and a
//! pci-testdev bound to vfio-pci, so the guest's /dev/vfio/devices/vfio0 is
//! a real VFIO device behind a real IOMMU driver; on a host with IOMMU
//! hardware the same tests run against the device an operator names. The
//! test shares its iommufd with the backend (`--iommufd-fd`) to check
//! object lifetimes. A pci-testdev does no DMA, so translations themselves
//! are proven with the selftest mock (tests/selftest_endpoints.rs) and with
//! QEMU's edu device (tests/dma_map.rs); here the kernel accepting every
//! bind, attach, replace, copy and unmap on a real device is what is tested.
// Test code with known small values (sizes, counts, timings): these casts
// cannot truncate or wrap.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

use serde_json::{json, Value};
use support::control::error_kind;
use support::host::HostRig;
use support::wire::{self, S_INVAL, S_NOENT, S_OK};
use support::Frontend;

const EP: u32 = 0x8;
const RW: u32 = wire::MAP_F_READ | wire::MAP_F_WRITE;
const MEM: usize = 16 << 20;

fn cdev() -> String {
    std::env::var("VIOMMU_VFIO_CDEV")
        .expect("VIOMMU_VFIO_CDEV names the VFIO cdev (/dev/vfio/devices/vfioN) to use")
}

/// The VFIO device as endpoint EP, on the test's iommufd.
fn rig() -> HostRig {
    let ep = format!("{EP:#x},vfio={}", cdev());
    HostRig::new(&["--endpoint", &ep])
}

fn connect(rig: &HostRig) -> Frontend {
    rig.connect_with(&[(0, MEM)])
}

fn status<R: AsRef<[u8]>>(f: &mut Frontend, req: (R, u32)) -> u8 {
    f.request_status(&req).expect("request answered")
}

#[test]
#[ignore = "needs a VFIO cdev in VIOMMU_VFIO_CDEV: run by tests/vm/kernel-tier.sh"]
fn vfio_device_binds_and_follows_the_guest() {
    let mut rig = rig();
    let h = rig.host();
    assert_eq!(h["kind"], "iommufd");
    let e = rig.endpoint(EP);
    assert_eq!(e["device"]["kind"], "vfio", "{h}");
    assert_eq!(e["pt_id"], h["blocking_pt"], "blocked until a guest");

    let mut f = connect(&rig);
    let h = rig.host();
    assert!(
        !h["ram"].as_array().unwrap().is_empty(),
        "guest RAM mapped: {h}"
    );
    assert_eq!(
        rig.endpoint(EP)["pt_id"],
        h["bypass_pt"],
        "bypass on at boot"
    );

    // PROBE: the MSI window at least, every other hole as RESERVED.
    let p = f.probe(EP).unwrap();
    assert_eq!(p.status, S_OK);
    let r = p.resv_mem().unwrap();
    assert!(
        r.iter().any(|m| m.subtype == 1 && m.start == 0xfee0_0000),
        "{r:?}"
    );

    // ATTACH_TABLE: a VT-d host with nesting takes an (empty) first-stage
    // table; any other host IOMMU (QEMU's virtio-iommu in the kernel tier
    // offers no nesting) answers UNSUPP and nothing changes.
    let formats = rig.endpoint(EP)["table_formats"].clone();
    let root = f.mem.alloc(0x1000, 0x1000).unwrap();
    let table = wire::attach_table_vtd(9, EP, 0, 0, root, 48);
    if formats.as_array().is_some_and(|a| a.contains(&2.into())) {
        assert_eq!(status(&mut f, table), S_OK);
        assert!(rig.domain(9).unwrap()["nested"].as_bool().unwrap());
        assert_eq!(status(&mut f, wire::detach(9, EP)), S_OK);
    } else {
        assert_eq!(status(&mut f, table), wire::S_UNSUPP, "formats {formats}");
    }
    assert!(rig.domain(9).is_none());
    assert_eq!(rig.endpoint(EP)["pt_id"], rig.host()["bypass_pt"]);

    // MAP domain: attach, map, unmap, replace, detach.
    assert_eq!(status(&mut f, wire::attach(1, EP, 0, 0)), S_OK);
    let d1 = rig.domain(1).expect("domain 1 on the host");
    assert_eq!(rig.endpoint(EP)["pt_id"], d1["hwpt"]);
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
    assert_eq!(rig.endpoint(EP)["pt_id"], d2["hwpt"]);
    assert!(rig.domain(1).is_none());
    assert_eq!(
        rig.fd
            .destroy(d1["ioas"].as_u64().unwrap() as u32)
            .unwrap_err()
            .errno(),
        Some(libc::ENOENT)
    );
    assert_eq!(status(&mut f, wire::detach(2, EP)), S_OK);
    assert_eq!(rig.endpoint(EP)["pt_id"], rig.host()["bypass_pt"]);

    // Disconnect: blocked, nothing held; the next guest is served.
    assert_eq!(status(&mut f, wire::attach(3, EP, 0, 0)), S_OK);
    f.disconnect();
    let h = rig.wait_idle();
    assert_eq!(h["endpoints"][0]["pt_id"], h["blocking_pt"]);
    let mut f = connect(&rig);
    assert_eq!(status(&mut f, wire::attach(1, EP, 0, 0)), S_OK);
    assert!(rig.backend.child.try_wait().unwrap().is_none());
}

fn open_cdev() -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(cdev())
        .expect("open the VFIO cdev")
}

/// `add_endpoint` of EP as a VFIO device, with `file` sent along.
fn add_vfio(rig: &mut HostRig, file: &impl AsRawFd) -> Value {
    rig.control
        .request_with_fds(
            &json!({"op": "add_endpoint", "endpoint": EP, "vfio": true}),
            &[file.as_raw_fd()],
        )
        .unwrap()
}

fn host_endpoint(rig: &mut HostRig, id: u32) -> Option<Value> {
    let h = rig.host();
    h["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
        .cloned()
}

/// Hot-plug (spec-notes/protocol.md 8.2): the backend starts with a
/// virtual endpoint only and `--vfio-hotplug`; while a guest runs, the
/// VFIO device is added with its cdev sent over the control socket, used,
/// removed while attached (its domain and every host object released,
/// requests naming it NOENT), and added again, which the kernel allows
/// only once the first binding is gone.
#[test]
#[ignore = "needs a VFIO cdev in VIOMMU_VFIO_CDEV: run by tests/vm/kernel-tier.sh"]
fn vfio_device_is_hot_plugged_and_removed_while_a_guest_runs() {
    let mut rig = HostRig::new(&["--endpoint", "0x10", "--vfio-hotplug"]);
    let mut f = connect(&rig);
    assert_eq!(status(&mut f, wire::attach(1, EP, 0, 0)), S_NOENT);
    assert!(host_endpoint(&mut rig, EP).is_none());

    // Not a VFIO cdev: a pipe (no ioctl is tried), /dev/null (a character
    // device the kernel refuses to bind). Nothing is kept.
    let (pipe_r, _pipe_w) = std::os::unix::net::UnixStream::pair().unwrap();
    assert_eq!(
        error_kind(&add_vfio(&mut rig, &pipe_r)),
        Some("bad-request")
    );
    let null = File::open("/dev/null").unwrap();
    let r = add_vfio(&mut rig, &null);
    assert_eq!(error_kind(&r), Some("host-error"), "{r}");
    assert!(host_endpoint(&mut rig, EP).is_none());

    // Added while the guest runs: unattached, bypass on, so guest RAM.
    let r = add_vfio(&mut rig, &open_cdev());
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["kind"], "vfio", "{r}");
    let h = rig.host();
    let e = host_endpoint(&mut rig, EP).expect("the host holds the device");
    assert_eq!(e["device"]["received"], true, "{e}");
    assert_eq!(e["pt_id"], h["bypass_pt"], "{h}");
    // The same device again, under another ID: the kernel binds a device
    // once; refused, nothing kept.
    let again = rig
        .control
        .request_with_fds(
            &json!({"op": "add_endpoint", "endpoint": EP + 0x100, "vfio": true}),
            &[open_cdev().as_raw_fd()],
        )
        .unwrap();
    assert_eq!(error_kind(&again), Some("host-error"), "{again}");
    assert!(host_endpoint(&mut rig, EP + 0x100).is_none());

    // Used: PROBE, a MAP domain on the host.
    assert_eq!(f.probe(EP).unwrap().status, S_OK);
    assert_eq!(status(&mut f, wire::attach(1, EP, 0, 0)), S_OK);
    let d1 = rig.domain(1).expect("domain 1 on the host");
    assert_eq!(host_endpoint(&mut rig, EP).unwrap()["pt_id"], d1["hwpt"]);
    let gpa = f.mem.alloc(0x4000, 0x1000).unwrap();
    assert_eq!(
        status(&mut f, wire::map(1, 0x1_0000_0000, 0x1_0000_3fff, gpa, RW)),
        S_OK
    );

    // Removed while attached: the domain (its only endpoint's) and the
    // device are released.
    let r = rig
        .control
        .request(&json!({"op": "remove_endpoint", "endpoint": EP}))
        .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["kind"], "vfio", "{r}");
    assert!(host_endpoint(&mut rig, EP).is_none());
    assert!(rig.domain(1).is_none());
    assert_eq!(
        rig.fd
            .destroy(d1["ioas"].as_u64().unwrap() as u32)
            .unwrap_err()
            .errno(),
        Some(libc::ENOENT),
        "the domain's IOAS is gone"
    );
    assert_eq!(status(&mut f, wire::attach(2, EP, 0, 0)), S_NOENT);
    assert_eq!(f.probe(EP).unwrap().status, S_NOENT);
    assert_eq!(
        status(&mut f, wire::map(1, 0x2_0000_0000, 0x2_0000_0fff, gpa, RW)),
        S_NOENT
    );

    // Released: the kernel binds the device again.
    let r = add_vfio(&mut rig, &open_cdev());
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(status(&mut f, wire::attach(3, EP, 0, 0)), S_OK);
    // The guest goes; the device stays, blocked; the next guest uses it.
    f.disconnect();
    let h = rig.wait_idle();
    assert_eq!(
        host_endpoint(&mut rig, EP).unwrap()["pt_id"],
        h["blocking_pt"]
    );
    let mut f = connect(&rig);
    assert_eq!(status(&mut f, wire::attach(1, EP, 0, 0)), S_OK);
    let r = rig
        .control
        .request(&json!({"op": "remove_endpoint", "endpoint": EP}))
        .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(status(&mut f, wire::attach(1, 0x10, 0, 0)), S_OK);
    let s = rig.control.stats().unwrap();
    assert_eq!(s["endpoints_added"], 2, "{s}");
    assert_eq!(s["endpoints_removed"], 2, "{s}");
    assert!(rig.backend.child.try_wait().unwrap().is_none());
}
