// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The passthrough deployment (spec-notes/passthrough.md): QEMU binds a
//! VFIO cdev to an iommufd a launcher opened and passes to both processes;
//! the backend takes the same open cdev as `--endpoint ID,vfio-bound-fd=N`
//! with `--iommufd-fd`, never binds it, and attaches last.
//!
//! What runs here needs no VFIO device: the options. The kernel tier runs
//! the rest inside its guest (`qemu_standin_*`, ignored here), with a
//! stand-in that issues QEMU 11's iommufd calls on the shared fds.

mod support;

use std::time::Duration;

use support::process::run_to_exit;

/// A bound cdev lives in the VMM's iommufd: without `--iommufd-fd` the
/// backend would open its own /dev/iommu, where the device does not exist.
#[test]
fn a_vmm_bound_cdev_needs_the_vmms_iommufd() {
    let (st, _out, err) = run_to_exit(
        &[
            "--socket-path",
            "{dir}/v.sock",
            "--endpoint",
            "1,vfio-bound-fd=900",
        ],
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(st.code(), Some(1), "{err}");
    let want = "endpoint 0x1: vfio-bound-fd needs --iommufd-fd (the iommufd the VMM binds it to)";
    assert!(err.contains(want), "stderr {err:?} lacks {want:?}");
    assert_eq!(err.trim().lines().count(), 1, "{err:?}");
}

/// A bound cdev is an inherited fd like the others: checked open and named
/// once before the daemon owns it.
#[test]
fn a_vmm_bound_cdev_fd_is_checked_like_every_inherited_fd() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--endpoint", "1,vfio-bound-fd=7", "--iommufd-fd", "7"],
            "fd 7 is named twice: --iommufd-fd 7 and endpoint 0x1: vfio-bound-fd=7",
        ),
        (
            &["--endpoint", "2,vfio-bound-fd=900", "--iommufd-fd", "901"],
            "is not an open file descriptor",
        ),
    ];
    for (extra, want) in cases {
        support::process::assert_start_refused(extra, want);
    }
}

/// A stand-in for QEMU 11: the iommufd and VFIO calls QEMU issues on the
/// fds the launcher passed it (`-object iommufd,fd=` and
/// `-device vfio-pci,iommufd=,fd=`), named after the QEMU functions
/// (hw/vfio/iommufd.c, backends/iommufd.c, hw/vfio/pci.c; line numbers in
/// spec-notes/passthrough.md). Only the ioctls: QEMU's config-space writes
/// around a reset do not touch the IOMMU.
mod qemu_standin {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    use vhost_device_iommu::iommufd_bridge::sys::{Iommufd, IOAS_MAP_READABLE, IOAS_MAP_WRITEABLE};
    use vmm_sys_util::ioctl::ioctl_with_mut_ref;
    use vmm_sys_util::ioctl_io_nr;

    const VFIO_TYPE: u32 = b';' as u32;
    ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE, 100 + 7);
    ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE, 100 + 11);
    ioctl_io_nr!(VFIO_DEVICE_PCI_HOT_RESET, VFIO_TYPE, 100 + 13);
    ioctl_io_nr!(VFIO_DEVICE_BIND_IOMMUFD, VFIO_TYPE, 100 + 18);
    ioctl_io_nr!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_TYPE, 100 + 19);
    ioctl_io_nr!(
        IOMMU_IOAS_CHANGE_PROCESS,
        IOMMUFD_TYPE as u32,
        IOMMUFD_CMD_IOAS_CHANGE_PROCESS
    );

    use iommufd_bindings::iommufd::{
        iommu_ioas_change_process as ChangeProcess, IOMMUFD_CMD_IOAS_CHANGE_PROCESS, IOMMUFD_TYPE,
    };

    use vfio_bindings::bindings::vfio::{
        vfio_device_attach_iommufd_pt as Attach, vfio_device_bind_iommufd as Bind,
        vfio_device_info as DeviceInfo, vfio_pci_hot_reset as HotReset, VFIO_DEVICE_FLAGS_RESET,
    };

    fn ioctl<F: AsRawFd, T>(f: &F, req: std::os::raw::c_ulong, arg: &mut T) -> std::io::Result<()> {
        // SAFETY: `arg` is the repr(C) struct `req` takes, with its size
        // field (argsz, size) set to its size; the kernel touches no more
        // than that.
        let rc = unsafe { ioctl_with_mut_ref(f, req, arg) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    // Test structs of a few u32s: their sizes fit argsz.
    #[allow(clippy::cast_possible_truncation)]
    fn argsz<T>() -> u32 {
        std::mem::size_of::<T>() as u32
    }

    /// What QEMU holds after realizing vfio-pci.
    pub struct Realized {
        pub devid: u32,
        pub ioas: u32,
        pub hwpt: u32,
        pub reset_works: bool,
        /// What the kernel answered QEMU's CPR probe (0, or the errno).
        pub cpr_probe: i32,
        /// The "guest RAM" QEMU's listener mapped (and pinned) in its IOAS.
        pub ram: (*mut libc::c_void, usize),
    }

    /// vfio_pci_realize -> vfio_device_attach -> iommufd_cdev_attach.
    /// `ram`: the file backing guest RAM (QEMU's memory-backend-memfd), or
    /// anonymous memory.
    pub fn realize(fd: &Iommufd, cdev: &File, ram_len: usize, ram: Option<&File>) -> Realized {
        // iommufd_cdev_connect_and_bind -> iommufd_backend_connect, first
        // user of the iommufd object -> vfio_iommufd_cpr_register_iommufd:
        // IOMMU_IOAS_CHANGE_PROCESS, which the kernel applies to every IOAS
        // of the shared context, the backend's too. QEMU only blocks CPR
        // if it fails.
        let mut cp = ChangeProcess {
            size: argsz::<ChangeProcess>(),
            ..Default::default()
        };
        let cpr_probe = outcome(ioctl(fd, IOMMU_IOAS_CHANGE_PROCESS(), &mut cp)).unwrap_or(0);
        // iommufd_cdev_connect_and_bind: VFIO_DEVICE_BIND_IOMMUFD.
        let mut bind = Bind {
            argsz: argsz::<Bind>(),
            iommufd: fd.as_raw_fd(),
            ..Default::default()
        };
        ioctl(cdev, VFIO_DEVICE_BIND_IOMMUFD(), &mut bind).expect("BIND_IOMMUFD");
        // iommufd_backend_alloc_ioas: the container's IOAS.
        let ioas = fd.ioas_alloc().expect("IOAS_ALLOC");
        // iommufd_cdev_autodomains_get: iommufd_backend_alloc_hwpt (no
        // dirty tracking, no nesting parent without a vIOMMU), then
        // iommufd_cdev_attach_ioas_hwpt.
        let hwpt = fd
            .hwpt_alloc(bind.out_devid, ioas, 0, 0, &mut [], None)
            .expect("HWPT_ALLOC");
        let mut attach = Attach {
            argsz: argsz::<Attach>(),
            pt_id: hwpt.raw(),
            ..Default::default()
        };
        ioctl(cdev, VFIO_DEVICE_ATTACH_IOMMUFD_PT(), &mut attach).expect("ATTACH");
        // iommufd_cdev_get_info_iova_range.
        let _ = fd.iova_ranges(ioas).expect("IOAS_IOVA_RANGES");
        // vfio_listener_register -> vfio_listener_region_add ->
        // vfio_container_dma_map -> iommufd_backend_map_dma: every RAM
        // section at IOVA = GPA (QEMU 10.1+ uses IOAS_MAP_FILE for memfd
        // RAM; both pin the pages).
        let (flags, ram_fd) = match ram {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh shared mapping of our own (of `ram`, at least
        // ram_len long, if given); unmapped in drop.
        let va = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ram_len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                ram_fd,
                0,
            )
        };
        assert_ne!(va, libc::MAP_FAILED);
        fd.ioas_map(
            ioas,
            va as u64,
            ram_len as u64,
            0,
            IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE,
        )
        .expect("IOAS_MAP of guest RAM");
        // iommufd_cdev_attach (found_container): VFIO_DEVICE_GET_INFO.
        let mut info = DeviceInfo {
            argsz: argsz::<DeviceInfo>(),
            ..Default::default()
        };
        ioctl(cdev, VFIO_DEVICE_GET_INFO(), &mut info).expect("GET_INFO");
        Realized {
            devid: bind.out_devid,
            ioas: ioas.raw(),
            hwpt: hwpt.raw(),
            reset_works: info.flags & VFIO_DEVICE_FLAGS_RESET != 0,
            cpr_probe,
            ram: (va, ram_len),
        }
    }

    /// What the reset did: which ioctls the kernel took.
    #[derive(Debug)]
    pub struct ResetOutcome {
        pub flr: Option<i32>,
        pub hot_reset: Option<i32>,
    }

    fn outcome(r: std::io::Result<()>) -> Option<i32> {
        Some(r.err().and_then(|e| e.raw_os_error()).unwrap_or(0))
    }

    /// vfio_pci_reset (device reset, and each device's part of a system
    /// reset): VFIO_DEVICE_RESET when reset_works, else
    /// iommufd_cdev_pci_hot_reset's VFIO_DEVICE_PCI_HOT_RESET with no
    /// group fds. QEMU ignores a failure; so does this.
    pub fn reset(cdev: &File, realized: &Realized) -> ResetOutcome {
        let mut out = ResetOutcome {
            flr: None,
            hot_reset: None,
        };
        if realized.reset_works {
            // SAFETY: VFIO_DEVICE_RESET takes no argument.
            let rc = unsafe { vmm_sys_util::ioctl::ioctl(cdev, VFIO_DEVICE_RESET()) };
            out.flr = outcome(if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            });
            if out.flr == Some(0) {
                return out;
            }
        }
        let mut hr = HotReset {
            argsz: argsz::<HotReset>(),
            ..Default::default()
        };
        out.hot_reset = outcome(ioctl(cdev, VFIO_DEVICE_PCI_HOT_RESET(), &mut hr));
        out
    }

    impl Drop for Realized {
        fn drop(&mut self) {
            // SAFETY: our mapping from realize.
            unsafe { libc::munmap(self.ram.0, self.ram.1) };
        }
    }
}

/// The whole handover on a real VFIO device (VIOMMU_VFIO_CDEV): the
/// stand-in realizes vfio-pci (bind, its IOAS and HWPT, attach, guest RAM
/// pinned), the backend adopts the same open cdev and attaches last; the
/// kernel's own bookkeeping shows who governs the device: an HWPT a device
/// is attached to cannot be destroyed (EBUSY).
#[test]
#[ignore = "needs a VFIO cdev in VIOMMU_VFIO_CDEV: run by tests/vm/kernel-tier.sh"]
fn qemu_standin_binds_the_backend_attaches_last_and_stays_after_reset() {
    use std::os::fd::AsRawFd;
    use support::host::spawn_sharing_iommufd;
    use support::wire::{self, S_OK};
    use support::ControlClient;
    use vhost_device_iommu::iommufd_bridge::sys::Iommufd;

    const EP: u32 = 0x8;
    const EBUSY: i32 = libc::EBUSY;
    let path = std::env::var("VIOMMU_VFIO_CDEV").expect("VIOMMU_VFIO_CDEV names the VFIO cdev");
    // The launcher: one iommufd, one open cdev, for both processes.
    let fd = Iommufd::open("/dev/iommu".as_ref()).expect("open /dev/iommu");
    let cdev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open the cdev");

    // QEMU realizes vfio-pci first (it is before the vhost-user device on
    // its command line): it binds, attaches its HWPT and pins guest RAM.
    let qemu = qemu_standin::realize(&fd, &cdev, 16 << 20, None);
    eprintln!(
        "stand-in: devid {} ioas {} hwpt {} reset_works {} cpr_probe {}",
        qemu.devid, qemu.ioas, qemu.hwpt, qemu.reset_works, qemu.cpr_probe
    );
    assert_eq!(
        qemu.cpr_probe, 0,
        "QEMU's CPR probe (IOMMU_IOAS_CHANGE_PROCESS) on a context with nothing mapped"
    );
    let busy = |id: u32| fd.destroy(id).err().and_then(|e| e.errno()) == Some(EBUSY);
    assert!(busy(qemu.hwpt), "QEMU's HWPT is in use before the backend");

    // The backend gets a copy of the same open cdev.
    // SAFETY: dup of a file we own; the copy has no CLOEXEC, so the child
    // inherits it; ours is closed after the spawn.
    let shared = unsafe { libc::dup(cdev.as_raw_fd()) };
    assert!(shared >= 0);
    let ep = format!("{EP:#x},vfio-bound-fd={shared}");
    let backend = spawn_sharing_iommufd(&fd, &["--endpoint", &ep, "--bind-wait-ms", "5000"])
        .expect("the backend adopts the bound cdev");
    // SAFETY: our copy; the child has its own.
    unsafe { libc::close(shared) };
    let mut control = ControlClient::connect(&backend.control).expect("control socket");
    let mut host = || {
        let r = control.request(&serde_json::json!({"op": "host"})).unwrap();
        r["host"].clone()
    };
    let endpoint = |h: &serde_json::Value| {
        h["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == EP)
            .cloned()
            .unwrap()
    };
    let h = host();
    let e = endpoint(&h);
    assert_eq!(
        e["dev_id"], qemu.devid,
        "the backend learned QEMU's device id: {h}"
    );
    assert_eq!(e["device"]["bound_by"], "vmm", "{e}");
    assert_eq!(
        e["pt_id"], h["blocking_pt"],
        "the backend attached last: {h}"
    );
    // The kernel agrees: QEMU's HWPT has no device any more.
    assert!(!busy(qemu.hwpt), "QEMU's HWPT still has the device");
    // (That destroy freed QEMU's HWPT; QEMU itself never destroys it while
    // the device is realized.)

    // The guest attaches the endpoint to a MAP/UNMAP domain.
    let mem = std::sync::Arc::new(support::GuestMem::with_regions(&[(0, 16 << 20)]).unwrap());
    let mut f =
        support::Frontend::connect(&backend.socket, mem, Default::default()).expect("frontend");
    assert_eq!(f.request_status(&wire::attach(1, EP, 0, 0)).unwrap(), S_OK);
    let h = host();
    let pt = u32::try_from(endpoint(&h)["pt_id"].as_u64().unwrap()).unwrap();
    assert_ne!(Some(u64::from(pt)), h["blocking_pt"].as_u64());
    assert!(busy(pt), "the device is on the guest's domain: {h}");

    // QEMU resets the device (a system or bus reset; the guest's FLR is
    // the same kernel reset, which QEMU does not see).
    let r = qemu_standin::reset(&cdev, &qemu);
    eprintln!("stand-in reset: {r:?}");
    let h = host();
    assert_eq!(endpoint(&h)["pt_id"], pt, "{h}");
    assert!(
        busy(pt),
        "after the reset the device is still on our domain"
    );

    // And the guest's next attach still wins.
    assert_eq!(f.request_status(&wire::detach(1, EP)).unwrap(), S_OK);
    let h = host();
    assert_eq!(endpoint(&h)["pt_id"], h["bypass_pt"], "{h}");
    assert_eq!(
        fd.destroy(pt).err().and_then(|e| e.errno()),
        Some(libc::ENOENT),
        "domain 1's HWPT is gone with the domain"
    );
    eprintln!("qemu-standin: attach-last PASS, after-reset PASS");
}

/// Not a check: the QEMU stand-in as a process, for
/// `readme_launcher_*` below, which starts it through the README's
/// launcher in QEMU's place: `env VIOMMU_STANDIN={IOMMUFD},{CDEV},RAM
/// THIS-BINARY --exact qemu_standin_process`. It realizes vfio-pci on the
/// fds the launcher passed (guest RAM: the file RAM, the test's memfd),
/// then takes commands on stdin, one a line, as a guest's MMIO and a reset
/// would reach QEMU:
/// `read IOVA OFF LEN` and `write OFF IOVA LEN` (edu DMA, hex IOVA and
/// OFF), `reset` (vfio_pci_reset); it answers each on stdout with a
/// `standin: ` line and exits at EOF. Without VIOMMU_STANDIN (any other
/// run) it does nothing.
#[test]
fn qemu_standin_process() {
    if let Ok(spec) = std::env::var("VIOMMU_STANDIN") {
        standin_main(&spec);
    }
}

fn standin_say(msg: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "standin: {msg}");
    let _ = out.flush();
}

fn standin_main(spec: &str) {
    use std::fs::File;
    use std::io::BufRead;
    use std::os::fd::FromRawFd;
    use support::edu::EduDevice;
    use vhost_device_iommu::iommufd_bridge::sys::Iommufd;

    let parts: Vec<&str> = spec.split(',').collect();
    let [iommufd, cdev, ram] = parts[..] else {
        panic!("VIOMMU_STANDIN={spec:?}: want IOMMUFD,CDEV,RAMFILE");
    };
    let num = |s: &str| -> i32 { s.parse().expect("an fd number") };
    // SAFETY: the launcher passed these open fds to this process (QEMU's
    // `-object iommufd,fd=` and `-device vfio-pci,fd=`); nothing else here
    // owns them.
    let (fd, cdev) = unsafe {
        (
            Iommufd::from_file(File::from_raw_fd(num(iommufd))),
            File::from_raw_fd(num(cdev)),
        )
    };
    let ram = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(ram)
        .expect("the RAM file");
    let len = usize::try_from(ram.metadata().unwrap().len()).unwrap();
    let qemu = qemu_standin::realize(&fd, &cdev, len, Some(&ram));
    standin_say(&format!(
        "realized devid {} ioas {} hwpt {} reset_works {} cpr_probe {}",
        qemu.devid, qemu.ioas, qemu.hwpt, qemu.reset_works, qemu.cpr_probe
    ));
    // The guest's driver: BAR0 mapped (QEMU maps it for the guest), bus
    // mastering on.
    let mut edu = EduDevice::from_file(cdev.try_clone().expect("dup the cdev"));
    edu.enable().expect("edu enabled");
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex");
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let w: Vec<&str> = line.split_whitespace().collect();
        let reply = match w[..] {
            ["read", iova, off, n] => edu
                .read_from(hex(iova), hex(off), n.parse().expect("a length"))
                .map(|()| "ok".to_string()),
            ["write", off, iova, n] => edu
                .write_to(hex(off), hex(iova), n.parse().expect("a length"))
                .map(|()| "ok".to_string()),
            ["reset"] => {
                let r = qemu_standin::reset(&cdev, &qemu);
                // vfio_pci_pre_reset turned bus mastering off; the guest's
                // driver turns it on again.
                edu.enable().map(|()| format!("reset {r:?}"))
            }
            _ => panic!("stand-in: unknown command {line:?}"),
        };
        standin_say(&reply.unwrap_or_else(|e| format!("error {e}")));
    }
}

/// The README's passthrough recipe, run: `contrib/passthrough/launch.sh`
/// opens /dev/iommu and the edu's cdev (VIOMMU_EDU_RESET_CDEV) once and starts
/// the backend and, in QEMU's place, the stand-in with both fds. The test
/// is the vhost-user frontend (a guest's MAP/UNMAP) and, through the
/// stand-in, the guest's driver of the edu. Its DMA lands in exactly the
/// page of the frontend's memfd that our MAP names, not in the stand-in's
/// RAM at that IOVA (where QEMU's own IOAS mapping would send it), before
/// and after the stand-in resets the device as QEMU does; after UNMAP it
/// faults and moves nothing.
#[test]
#[ignore = "needs an edu with a reset in VIOMMU_EDU_RESET_CDEV: run by tests/vm/kernel-tier.sh"]
fn readme_launcher_dma_follows_our_tables_before_and_after_a_reset() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};
    use support::edu::{all, note, page_with, pattern, KernelLog, BUF_SIZE, XFER};
    use support::wire;

    const EP: u32 = 0x20;
    /// Guest pages (the frontend's memfd) before the DMA.
    const FILL: u8 = 0x5a;
    /// The stand-in's RAM (QEMU's guest RAM, IOVA = GPA in its IOAS).
    const QFILL: u8 = 0xa5;
    const RAM: usize = 16 << 20;
    // Both inside the stand-in's RAM: QEMU's IOAS maps them.
    const IOVA_A: u64 = 0x10_0000;
    const IOVA_B: u64 = 0x20_0000;
    const DST: usize = 0x400;
    const DST_OFF: u64 = DST as u64;

    let cdev = std::env::var("VIOMMU_EDU_RESET_CDEV")
        .expect("VIOMMU_EDU_RESET_CDEV names the cdev of an edu with a working reset");
    let launcher = std::env::var("VIOMMU_LAUNCHER").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/passthrough/launch.sh").to_string()
    });
    let dir = std::env::temp_dir().join(format!("viommu-launch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // QEMU's memory-backend-memfd: the stand-in opens it by its /proc path
    // (the same shmem file) and pins it in its IOAS.
    // SAFETY: a NUL-terminated name; the fd is checked and owned below.
    let memfd = unsafe { libc::memfd_create(c"standin-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        memfd >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd nobody else owns.
    let ram = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(memfd) };
    let ram_path = format!("/proc/{}/fd/{memfd}", std::process::id());
    ram.set_len(RAM as u64).unwrap();
    {
        use std::os::unix::fs::FileExt;
        ram.write_all_at(&pattern(9), IOVA_A).unwrap();
        ram.write_all_at(&[QFILL; BUF_SIZE], IOVA_B).unwrap();
    }
    let qemu_page = |iova: u64| {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; BUF_SIZE];
        ram.read_exact_at(&mut b, iova).unwrap();
        b
    };
    let socket = dir.join("viommu.sock");
    let exe = std::env::current_exe().unwrap();
    let standin_env = format!("VIOMMU_STANDIN={{IOMMUFD}},{{CDEV}},{ram_path}");
    // The launcher's stderr (the backend's log) and the stand-in's libtest
    // lines: kept, and printed from this thread when the test ends (libtest
    // shows them on failure), so that they never split this test's own
    // `test ... ok` line that the tier counts.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    struct PrintLog(std::sync::Arc<std::sync::Mutex<Vec<String>>>);
    impl Drop for PrintLog {
        fn drop(&mut self) {
            if let Ok(lines) = self.0.lock() {
                for l in lines.iter() {
                    eprintln!("{l}");
                }
            }
        }
    }
    let _print_log = PrintLog(log.clone());
    let mut launch = Command::new("sh")
        .arg(&launcher)
        .args(["--cdev", &cdev, "--endpoint", &format!("{EP:#x}")])
        .args(["--backend", &support::process::binary()])
        .arg("--socket")
        .arg(&socket)
        .args(["--", "env", &standin_env])
        .arg(&exe)
        .args(["--exact", "qemu_standin_process", "--nocapture"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the launcher starts");
    let err = launch.stderr.take().unwrap();
    let err_log = log.clone();
    // Each reader says when its pipe closed: once every process the
    // launcher started is gone.
    let (closed_tx, closed) = mpsc::channel::<&str>();
    let err_closed = closed_tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            err_log
                .lock()
                .unwrap()
                .push(format!("launcher stderr: {line}"));
        }
        let _ = err_closed.send("stderr");
    });
    let mut to_standin = launch.stdin.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let out = launch.stdout.take().unwrap();
    let out_log = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            match line.strip_prefix("standin: ") {
                Some(msg) => {
                    let _ = tx.send(msg.to_string());
                }
                // libtest's lines of the stand-in (kept apart from this
                // test's own result lines).
                None => out_log
                    .lock()
                    .unwrap()
                    .push(format!("launcher stdout: {line}")),
            }
        }
        let _ = closed_tx.send("stdout");
    });
    let next = |what: &str| -> String {
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no stand-in answer to {what}: {e}"))
    };
    let mut ask = |cmd: &str| -> String {
        writeln!(to_standin, "{cmd}").unwrap();
        to_standin.flush().unwrap();
        next(cmd)
    };
    let realized = next("realize");
    note(&format!("launcher: stand-in {realized}"));
    assert!(realized.starts_with("realized "), "{realized}");
    // The backend is up, waiting for the bind: it has mapped nothing yet,
    // so QEMU's context-wide CPR probe finds no mapping it refuses.
    assert!(
        realized.ends_with(" cpr_probe 0"),
        "QEMU's CPR probe (IOMMU_IOAS_CHANGE_PROCESS) before the bind: {realized}"
    );

    // The frontend: its handshake completes once the backend adopted the
    // cdev the stand-in bound (the launcher started the stand-in when the
    // socket existed).
    let mem = std::sync::Arc::new(support::GuestMem::with_regions(&[(0, RAM)]).unwrap());
    let mut f =
        support::Frontend::connect(&socket, mem, Default::default()).expect("frontend connects");
    let ok = support::edu::request_ok;
    let p = support::edu::attach_and_map_two(&mut f, EP, IOVA_A, IOVA_B, FILL);
    let page = |f: &support::Frontend, gpa: u64| f.mem.read_vec(gpa, BUF_SIZE).unwrap();
    let copy = |ask: &mut dyn FnMut(&str) -> String| {
        for cmd in [
            format!("read {IOVA_A:#x} 0 {XFER}"),
            format!("write 0 {:#x} {XFER}", IOVA_B + DST_OFF),
        ] {
            assert_eq!(ask(&cmd), "ok", "{cmd}");
        }
    };
    let untouched = |f: &support::Frontend, what: &str| {
        for i in [2, 3, 4] {
            assert!(all(&page(f, p[i]), FILL), "{what}: page {i} untouched");
        }
        assert!(
            qemu_page(IOVA_A) == pattern(9) && all(&qemu_page(IOVA_B), QFILL),
            "{what}: QEMU's RAM at IOVA A and B untouched \
             (its IOAS mapping is not what the device uses)"
        );
    };

    // Before any reset: edu reads our page 0 through IOVA A (not the
    // stand-in's pattern 9 there) and writes it to our page 1.
    f.mem.write(p[0], &pattern(1)).unwrap();
    copy(&mut ask);
    assert!(
        page(&f, p[1]) == page_with(FILL, DST, &pattern(1)[..XFER]),
        "before the reset: page 1 holds page 0's bytes, through our MAPs"
    );
    untouched(&f, "before the reset");

    // QEMU resets the device (vfio_pci_reset); our tables still govern.
    let r = ask("reset");
    note(&format!("launcher: stand-in {r}"));
    // The kernel took it (this edu sits alone behind a root port: a bus
    // reset, through VFIO_DEVICE_RESET or the hot reset).
    assert!(
        r.starts_with("reset ") && r.contains("Some(0)"),
        "the reset was done: {r}"
    );
    f.mem.write(p[0], &pattern(2)).unwrap();
    f.mem.fill(p[1], BUF_SIZE, FILL).unwrap();
    copy(&mut ask);
    assert!(
        page(&f, p[1]) == page_with(FILL, DST, &pattern(2)[..XFER]),
        "after the reset: page 1 holds page 0's new bytes, through our MAPs"
    );
    untouched(&f, "after the reset");

    // UNMAP: the same DMA faults (the guest kernel logs it) and moves
    // nothing, neither to our page nor to QEMU's.
    ok(&mut f, wire::unmap(1, IOVA_B, IOVA_B + 0xfff), "UNMAP B");
    ok(&mut f, wire::unmap(1, IOVA_A, IOVA_A + 0xfff), "UNMAP A");
    f.mem.fill(p[1], BUF_SIZE, FILL).unwrap();
    let mut log = KernelLog::from_now().unwrap();
    let cmd = format!("write 0 {:#x} 4", IOVA_B + DST_OFF);
    assert_eq!(ask(&cmd), "ok", "{cmd}");
    let fault = log
        .wait_for_fault(IOVA_B + DST_OFF, Duration::from_secs(5))
        .unwrap_or_else(|seen| panic!("no fault at IOVA B logged after UNMAP; logged: {seen:?}"));
    note(&format!("launcher: after UNMAP: {fault}"));
    // Only that one 4-byte DMA: the guest kernel logs 10 IOMMU faults per
    // 5 s and QEMU reports one per 4 bytes; a full-size faulting DMA here
    // would use up the budget of tests/dma_map.rs, which runs next.
    assert!(all(&page(&f, p[1]), FILL), "after UNMAP page 1 unchanged");
    untouched(&f, "after UNMAP");

    // EOF: the stand-in exits ("QEMU" quits), the launcher stops the
    // backend and exits with the stand-in's status.
    drop(to_standin);
    drop(f);
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Some(st) = launch.try_wait().unwrap() {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = launch.kill();
            panic!("the launcher did not exit after the stand-in's EOF");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Nothing the launcher started outlives it (the backend would hold
    // the launcher's stderr open).
    for _ in 0..2 {
        let pipe = closed.recv_timeout(Duration::from_secs(10));
        assert!(
            pipe.is_ok(),
            "a process the launcher started still holds its output 10 s after it exited"
        );
    }
    assert!(st.success(), "launcher: {st}");
    assert!(!socket.exists(), "the launcher removed the socket");
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("readme-launcher: before-reset PASS, after-reset PASS, unmap-faults PASS");
}
