// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The README's passthrough recipe with a real QEMU 11 (issue 17): the
//! kernel tier's nested boot (tests/vm/mknested.sh, guest/nested.sh) puts
//! QEMU 11 into its x86 guest, and these tests run
//! `contrib/passthrough/launch.sh` with our backend and that QEMU sharing
//! /dev/iommu and the edu's VFIO cdev. QEMU really realizes
//! `-device vfio-pci,iommufd=,fd=` (bind, its IOAS and HWPT, guest RAM
//! pinned) and really resets the device (QMP `system_reset`). In the first
//! test the test itself is the vhost-user frontend and the edu's driver,
//! through a copy of the very open cdev QEMU holds (pidfd_getfd); in the
//! second QEMU is the frontend and a second-level guest it boots drives
//! both our device and the edu (spec-notes/passthrough.md).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::edu::{all, note, page_with, pattern, EduDevice, KernelLog, BUF_SIZE, XFER};
use support::wire;

/// A QMP connection: commands one at a time, events kept as they come.
struct Qmp {
    out: UnixStream,
    lines: BufReader<UnixStream>,
    events: Vec<Value>,
}

impl Qmp {
    /// Connect once the socket exists, read the greeting and leave
    /// capabilities negotiation mode: QEMU serves QMP only from its main
    /// loop, after it has realized every device.
    fn connect(path: &Path, timeout: Duration) -> Qmp {
        let deadline = Instant::now() + timeout;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "no QMP socket at {} after {timeout:?}: {e}",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        s.set_read_timeout(Some(timeout)).unwrap();
        let mut q = Qmp {
            out: s.try_clone().unwrap(),
            lines: BufReader::new(s),
            events: Vec::new(),
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        q.lines
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.lines.read_line(&mut line).expect("QMP read");
        assert!(n > 0, "QMP: QEMU closed the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP line {line:?}: {e}"))
    }

    /// Run a command; its `return` value (an `error` fails the test).
    fn cmd(&mut self, name: &str, args: Value) -> Value {
        let req = json!({"execute": name, "arguments": args});
        writeln!(self.out, "{req}").expect("QMP write");
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            assert!(v.get("error").is_none(), "QMP {name}: {v}");
            return v["return"].clone();
        }
    }

    /// Wait for event `name` (one already received counts once).
    fn event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        loop {
            let v = self.read();
            if v["event"] == name {
                return v;
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
}

/// The pid of the one process whose command line contains `needle`.
fn pid_with_arg(needle: &str) -> i32 {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) {
                found.push(pid);
            }
        }
    }
    // The launcher's shell has the same words before it execs QEMU; QEMU
    // runs in the foreground of that shell (no exec), so: the newest.
    found.sort_unstable();
    *found
        .last()
        .unwrap_or_else(|| panic!("no process with {needle:?}"))
}

/// A copy of fd `fd` of process `pid`: the same open file (pidfd_getfd).
fn fd_of(pid: i32, fd: i32) -> OwnedFd {
    // SAFETY: pidfd_open(pid, 0) returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd nobody else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(i32::try_from(pidfd).unwrap()) };
    // SAFETY: pidfd_getfd(pidfd, targetfd, 0) returns a new fd or -1.
    let copy = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        )
    };
    assert!(
        copy >= 0,
        "pidfd_getfd({pid}, {fd}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd nobody else owns.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(copy).unwrap()) }
}

/// The lines of `log` from `from` on that contain `what`.
fn lines_with(log: &Mutex<Vec<String>>, from: usize, what: &str) -> Vec<String> {
    log.lock().unwrap()[from..]
        .iter()
        .filter(|l| l.contains(what))
        .cloned()
        .collect()
}

/// The README's launcher running our backend (endpoint `EP`, the edu's
/// cdev) and QEMU 11: `qemu` is QEMU's command line, with the launcher's
/// `{IOMMUFD}`, `{CDEV}` and `{SOCKET}`; QEMU's stderr carries the trace of
/// what it does with the device. Every output line is kept in `log`
/// (printed when the test ends: libtest shows it on failure).
struct Launched {
    child: std::process::Child,
    log: Arc<Mutex<Vec<String>>>,
    closed: mpsc::Receiver<&'static str>,
    _print: PrintLog,
}

struct PrintLog(Arc<Mutex<Vec<String>>>);

impl Drop for PrintLog {
    fn drop(&mut self) {
        if let Ok(lines) = self.0.lock() {
            for l in lines.iter() {
                eprintln!("{l}");
            }
        }
    }
}

/// QEMU's guest RAM as a shared file the test reads
/// (memory-backend-file): `size` bytes, pattern 9 at `a`, `fill` at `b`.
fn qemu_ram(path: &Path, size: usize, a: u64, b: u64, fill: u8) -> std::fs::File {
    use std::os::unix::fs::FileExt;
    let ram = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    ram.set_len(size as u64).unwrap();
    ram.write_all_at(&pattern(9), a).unwrap();
    ram.write_all_at(&[fill; BUF_SIZE], b).unwrap();
    ram
}

const EP: u32 = 0x20;

impl Launched {
    fn start(cdev: &str, socket: &Path, qemu: &[&str]) -> Launched {
        let launcher = std::env::var("VIOMMU_LAUNCHER").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/passthrough/launch.sh").to_string()
        });
        let mut child = Command::new("sh")
            .arg(&launcher)
            .args(["--cdev", cdev, "--endpoint", &format!("{EP:#x}")])
            .args(["--backend", &support::process::binary()])
            // QEMU binds the cdev once it has started, which takes long here.
            .args(["--backend-arg", "--bind-wait-ms", "--backend-arg", "600000"])
            .arg("--socket")
            .arg(socket)
            .arg("--")
            .args(qemu)
            .args(["-trace", "iommufd_cdev_*", "-trace", "iommufd_backend_alloc_*"])
            .args(["-trace", "vfio_pci_reset*", "-trace", "vfio_pci_hot_reset*"])
            .args(["-trace", "vfio_device_detach"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the launcher starts");
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let (closed_tx, closed) = mpsc::channel::<&str>();
        for (name, pipe) in [
            (
                "stdout",
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            ),
            ("stderr", Box::new(child.stderr.take().unwrap())),
        ] {
            let log = log.clone();
            let tx = closed_tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(format!("launcher {name}: {line}"));
                }
                let _ = tx.send(name);
            });
        }
        Launched {
            child,
            _print: PrintLog(log.clone()),
            log,
            closed,
        }
    }

    /// QMP `quit`: QEMU exits, the launcher stops the backend and exits
    /// with QEMU's status, and nothing it started outlives it.
    fn quit(mut self, qmp: &mut Qmp) {
        let from = self.log.lock().unwrap().len();
        qmp.cmd("quit", json!({}));
        let deadline = Instant::now() + Duration::from_secs(60);
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("the launcher did not exit after QEMU's quit");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for _ in 0..2 {
            assert!(
                self.closed.recv_timeout(Duration::from_secs(10)).is_ok(),
                "a process the launcher started still holds its output 10 s after it exited"
            );
        }
        assert!(st.success(), "launcher: {st}");
        // Whether QEMU detaches the device on its way out (it unrealizes
        // only on hot-unplug), for the log.
        for l in lines_with(&self.log, from, "detach") {
            note(&format!("qemu11 quit: {l}"));
        }
    }
}

/// QMP `system_reset`, and QEMU's trace that it reset the device
/// (vfio_pci_reset: VFIO_DEVICE_RESET, or its own bus reset), noted.
fn system_reset(qmp: &mut Qmp, launched: &Launched) {
    let from = launched.log.lock().unwrap().len();
    qmp.cmd("system_reset", json!({}));
    qmp.event("RESET");
    // The trace lines come on another pipe: give them a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    let resets = loop {
        let r = lines_with(&launched.log, from, "vfio_pci_reset");
        let h = lines_with(&launched.log, from, "vfio_pci_hot_reset_result");
        if r.iter().any(|l| l.contains("vfio_pci_reset_flr")) || !h.is_empty() {
            break [r, h].concat();
        }
        assert!(
            Instant::now() < deadline,
            "QEMU's system_reset reset no device: {:?}",
            &launched.log.lock().unwrap()[from..]
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for l in &resets {
        note(&format!("qemu11 system_reset: {l}"));
    }
    // QEMU re-attaching on a reset would put its identity map back in
    // charge until the guest's next ATTACH (spec-notes/passthrough.md):
    // no iommufd call of QEMU's on this path.
    let calls: Vec<String> = launched.log.lock().unwrap()[from..]
        .iter()
        .filter(|l| l.contains("iommufd_cdev_") || l.contains("iommufd_backend_"))
        .cloned()
        .collect();
    assert!(
        calls.is_empty(),
        "QEMU's system_reset made iommufd calls: {calls:?}"
    );
}

/// The recipe with QEMU 11 (`VIOMMU_NESTED_QEMU`) on the edu behind a root
/// port (`VIOMMU_EDU_RESET_CDEV`): after QEMU's realize our MAPs, not
/// QEMU's IOAS, decide where the edu's DMA goes; so after QEMU's
/// `system_reset` (vfio_pci_reset: VFIO_DEVICE_RESET); after our UNMAP the
/// DMA faults and moves nothing. QEMU's guest RAM is a file here so that
/// the test can show QEMU's pages at those IOVAs untouched.
#[test]
#[ignore = "needs QEMU 11 and an edu with a reset: run by tests/vm/kernel-tier.sh's nested boot"]
fn readme_launcher_with_qemu11_dma_follows_our_tables_across_system_reset() {
    const FILL: u8 = 0x5a;
    const QFILL: u8 = 0xa5;
    const RAM: usize = 64 << 20;
    const IOVA_A: u64 = 0x10_0000;
    const IOVA_B: u64 = 0x20_0000;
    const DST: usize = 0x400;
    const DST_OFF: u64 = DST as u64;
    // QEMU under TCG in a TCG guest: minutes are possible.
    const SLOW: Duration = Duration::from_secs(600);

    let cdev = std::env::var("VIOMMU_EDU_RESET_CDEV")
        .expect("VIOMMU_EDU_RESET_CDEV names the cdev of an edu with a working reset");
    let qemu = std::env::var("VIOMMU_NESTED_QEMU").expect("VIOMMU_NESTED_QEMU names QEMU 11");
    let dir = std::env::temp_dir().join(format!("viommu-qemu11-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("viommu.sock");
    let qmp_path = dir.join("qmp.sock");
    // QEMU's guest RAM: a shared file the test reads (memory-backend-file).
    let ram_path = dir.join("ram");
    let ram = qemu_ram(&ram_path, RAM, IOVA_A, IOVA_B, QFILL);
    let qemu_page = |iova: u64| {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; BUF_SIZE];
        ram.read_exact_at(&mut b, iova).unwrap();
        b
    };

    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
    let ram_arg = format!(
        "memory-backend-file,id=mem,size={RAM},mem-path={},share=on",
        ram_path.display()
    );
    let t0 = Instant::now();
    let launched = Launched::start(
        &cdev,
        &socket,
        &[
            &qemu,
            "-M",
            "q35",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "64M",
            // No -no-reboot: it would turn system_reset into a shutdown.
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-object",
            &ram_arg,
            "-machine",
            "memory-backend=mem",
            "-object",
            "iommufd,id=iommufd0,fd={IOMMUFD}",
            "-device",
            "vfio-pci,id=hostdev0,iommufd=iommufd0,fd={CDEV},addr=04.0",
            "-qmp",
            &qmp_arg,
            "-serial",
            "none",
            "-monitor",
            "none",
        ],
    );
    let log = launched.log.clone();

    // (i) QMP ready: QEMU has realized vfio-pci on the launcher's fds.
    let mut qmp = Qmp::connect(&qmp_path, SLOW);
    let realize_s = t0.elapsed().as_secs_f64();
    note(&format!(
        "nested-qemu-realize_s={realize_s:.1} (launcher start to QMP ready)"
    ));
    let realized = qmp.cmd(
        "qom-get",
        json!({"path": "/machine/peripheral/hostdev0", "property": "realized"}),
    );
    assert_eq!(realized, json!(true), "QEMU realized vfio-pci");
    let bound = lines_with(&log, 0, "iommufd_cdev_connect_and_bind");
    assert!(
        !bound.is_empty(),
        "QEMU's trace shows no bind: {:?}",
        log.lock().unwrap()
    );
    note(&format!("qemu11: {}", bound[0]));

    // The frontend: the backend adopted the cdev QEMU bound.
    let mem = Arc::new(support::GuestMem::with_regions(&[(0, 16 << 20)]).unwrap());
    let mut f =
        support::Frontend::connect(&socket, mem, Default::default()).expect("frontend connects");
    let ok = support::edu::request_ok;
    let p = support::edu::attach_and_map_two(&mut f, EP, IOVA_A, IOVA_B, FILL);
    let page = |f: &support::Frontend, gpa: u64| f.mem.read_vec(gpa, BUF_SIZE).unwrap();

    // The guest's driver of the edu: QEMU's own open cdev (fd 4 from the
    // launcher), BAR0 mapped, bus mastering on.
    let qemu_pid = pid_with_arg(&qmp_arg);
    let mut edu = EduDevice::from_file(fd_of(qemu_pid, 4).into());
    edu.enable().expect("edu enabled through QEMU's cdev");
    let copy = |edu: &EduDevice| {
        edu.read_from(IOVA_A, 0, XFER).expect("DMA read");
        edu.write_to(0, IOVA_B + DST_OFF, XFER).expect("DMA write");
    };
    let untouched = |f: &support::Frontend, what: &str| {
        for i in [2, 3, 4] {
            assert!(all(&page(f, p[i]), FILL), "{what}: page {i} untouched");
        }
        assert!(
            qemu_page(IOVA_A) == pattern(9) && all(&qemu_page(IOVA_B), QFILL),
            "{what}: QEMU's RAM at IOVA A and B untouched (its IOAS is not what the device uses)"
        );
    };

    // After QEMU's realize.
    f.mem.write(p[0], &pattern(1)).unwrap();
    copy(&edu);
    assert!(
        page(&f, p[1]) == page_with(FILL, DST, &pattern(1)[..XFER]),
        "after QEMU's realize: page 1 holds page 0's bytes, through our MAPs"
    );
    untouched(&f, "after QEMU's realize");

    // QEMU's system_reset: vfio_pci_reset on the device.
    system_reset(&mut qmp, &launched);
    // vfio_pci_pre_reset turned bus mastering off; the guest's driver
    // turns it on again.
    edu.enable().expect("edu enabled after the reset");
    f.mem.write(p[0], &pattern(2)).unwrap();
    f.mem.fill(p[1], BUF_SIZE, FILL).unwrap();
    copy(&edu);
    assert!(
        page(&f, p[1]) == page_with(FILL, DST, &pattern(2)[..XFER]),
        "after QEMU's system_reset: page 1 holds page 0's new bytes, through our MAPs"
    );
    untouched(&f, "after QEMU's system_reset");

    // Our UNMAP: the DMA faults and moves nothing.
    ok(&mut f, wire::unmap(1, IOVA_B, IOVA_B + 0xfff), "UNMAP B");
    ok(&mut f, wire::unmap(1, IOVA_A, IOVA_A + 0xfff), "UNMAP A");
    f.mem.fill(p[1], BUF_SIZE, FILL).unwrap();
    let mut klog = KernelLog::from_now().unwrap();
    edu.write_to(0, IOVA_B + DST_OFF, 4).expect("DMA write");
    let fault = klog
        .wait_for_fault(IOVA_B + DST_OFF, Duration::from_secs(5))
        .unwrap_or_else(|seen| panic!("no fault at IOVA B logged after UNMAP; logged: {seen:?}"));
    note(&format!("qemu11: after UNMAP: {fault}"));
    assert!(all(&page(&f, p[1]), FILL), "after UNMAP page 1 unchanged");
    untouched(&f, "after UNMAP");

    // QEMU quits; the launcher stops the backend and exits with QEMU's status.
    drop(edu);
    drop(f);
    launched.quit(&mut qmp);
    assert!(!socket.exists(), "the launcher removed the socket");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's recipe whole: QEMU 11 is our vhost-user frontend too and
/// boots a second-level guest (`VIOMMU_NESTED_KERNEL`, this kernel, with
/// `VIOMMU_NESTED_INITRD`, mknested.sh's tiny initramfs) whose kernel
/// drives our virtio-iommu (VIOT from our `viot` subcommand) and whose
/// VFIO driver (guest/edu-vfio.c) drives the assigned edu: its MAPs and
/// UNMAPs reach our backend through QEMU, and the edu's DMA follows them,
/// and moves nothing after the UNMAP (the fault is logged here, by this
/// kernel's IOMMU driver). Then QMP `system_reset`: QEMU resets vfio-pci
/// and our device, the guest boots again and the same checks pass again.
#[test]
#[ignore = "needs QEMU 11, a second-level kernel and an edu with a reset: run by tests/vm/kernel-tier.sh's nested boot"]
fn readme_recipe_with_qemu11_frontend_guest_edu_dma_across_system_reset() {
    const SLOW: Duration = Duration::from_secs(900);
    const DONE: &str = "L2-EDU-DONE";
    let cdev = std::env::var("VIOMMU_EDU_RESET_CDEV")
        .expect("VIOMMU_EDU_RESET_CDEV names the cdev of an edu with a working reset");
    let qemu = std::env::var("VIOMMU_NESTED_QEMU").expect("VIOMMU_NESTED_QEMU names QEMU 11");
    let kernel = std::env::var("VIOMMU_NESTED_KERNEL").expect("VIOMMU_NESTED_KERNEL");
    let initrd = std::env::var("VIOMMU_NESTED_INITRD").expect("VIOMMU_NESTED_INITRD");
    let dir = std::env::temp_dir().join(format!("viommu-qemu11-l2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("viommu.sock");
    let qmp_path = dir.join("qmp.sock");
    let serial = dir.join("l2.log");
    let viot = dir.join("viot.bin");
    let st = Command::new(support::process::binary())
        .args([
            "viot", "--iommu", "00:03.0", "--range", "00:04.0", "--output",
        ])
        .arg(&viot)
        .status()
        .expect("viot subcommand");
    assert!(st.success(), "viot: {st}");

    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
    let serial_arg = format!("file:{}", serial.display());
    let viot_arg = format!("file={}", viot.display());
    let t0 = Instant::now();
    let mut klog = KernelLog::from_now().unwrap();
    // The README's command line (TCG, less RAM, the console to a file).
    let launched = Launched::start(
        &cdev,
        &socket,
        &[
            &qemu, "-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", "256M", "-nodefaults",
            "-display", "none",
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
            "-machine", "memory-backend=mem",
            "-object", "iommufd,id=iommufd0,fd={IOMMUFD}",
            "-device", "vfio-pci,id=hostdev0,iommufd=iommufd0,fd={CDEV},addr=04.0",
            "-chardev", "socket,id=viommu,path={SOCKET}",
            "-device",
            "vhost-user-test-device-pci,chardev=viommu,virtio-id=23,num_vqs=2,config_size=40,addr=03.0",
            "-acpitable", &viot_arg,
            "-kernel", &kernel, "-initrd", &initrd,
            // MAP/UNMAP (the page-table series of contrib/linux off: a
            // passthrough endpoint has no table format); VFIO type1 on a
            // virtio-iommu needs unsafe interrupts allowed.
            "-append",
            "console=ttyS0 panic=-1 quiet viommu.l2=edu virtio_iommu.table_mode=0 vfio_iommu_type1.allow_unsafe_interrupts=1",
            "-serial", &serial_arg, "-qmp", &qmp_arg, "-monitor", "none",
        ],
    );
    let mut qmp = Qmp::connect(&qmp_path, SLOW);
    note(&format!(
        "nested-qemu-frontend: QMP ready after {:.1} s",
        t0.elapsed().as_secs_f64()
    ));
    let console = || std::fs::read_to_string(&serial).unwrap_or_default();
    // One boot of the guest: its checks, and the fault our UNMAP caused.
    let mut boot = |n: usize, what: &str| {
        let t = Instant::now();
        let deadline = t + SLOW;
        while console().matches(DONE).count() < n {
            assert!(
                Instant::now() < deadline,
                "{what}: the guest did not finish within {SLOW:?}; its console:\n{}",
                console()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let c = console();
        let run = c.split(DONE).nth(n - 1).unwrap_or("");
        let pass = run.matches("edu-vfio: PASS").count();
        let fail: Vec<&str> = run
            .lines()
            .filter(|l| l.contains("edu-vfio: FAIL"))
            .collect();
        assert!(
            fail.is_empty() && pass == 4,
            "{what}: the guest's edu checks: {pass} passed, failed {fail:?}; its console:\n{c}"
        );
        note(&format!(
            "nested-qemu-frontend: {what}: the guest's 4 edu checks passed after {:.1} s",
            t.elapsed().as_secs_f64()
        ));
        let done = c
            .split(DONE)
            .nth(n)
            .and_then(|r| r.lines().next())
            .unwrap_or("");
        note(&format!(
            "nested-qemu-frontend: {what}: guest: {DONE}{done}"
        ));
        for l in run.lines().filter(|l| l.contains("edu-vfio: PASS")) {
            note(&format!(
                "nested-qemu-frontend: {what}: guest: {}",
                l.trim()
            ));
        }
        // The write after the UNMAP faulted in this kernel's IOMMU.
        let fault = klog
            .wait_for_fault(0x20_0400, Duration::from_secs(10))
            .unwrap_or_else(|seen| panic!("{what}: no fault at 0x200400 logged; logged: {seen:?}"));
        note(&format!("nested-qemu-frontend: {what}: {fault}"));
    };
    boot(1, "first boot");
    system_reset(&mut qmp, &launched);
    boot(2, "after QEMU's system_reset");
    launched.quit(&mut qmp);
    assert!(!socket.exists(), "the launcher removed the socket");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The control for the two tests above: QEMU 11 alone (no backend, the
/// test passes it the iommufd and the cdev as the launcher would), and the
/// same edu DMA as in the first test lands in QEMU's RAM file at the IOVA
/// (QEMU's IOAS maps guest RAM at IOVA = GPA): what "our tables govern"
/// is checked against is what happens without us.
#[test]
#[ignore = "needs QEMU 11 and an edu with a reset: run by tests/vm/kernel-tier.sh's nested boot"]
fn qemu11_alone_sends_the_edu_dma_through_its_own_ioas() {
    use std::os::fd::AsRawFd;
    const RAM: usize = 64 << 20;
    const IOVA_A: u64 = 0x10_0000;
    const IOVA_B: u64 = 0x20_0000;
    const QFILL: u8 = 0xa5;
    const DST: usize = 0x400;

    let cdev_path = std::env::var("VIOMMU_EDU_RESET_CDEV")
        .expect("VIOMMU_EDU_RESET_CDEV names the cdev of an edu with a working reset");
    let qemu = std::env::var("VIOMMU_NESTED_QEMU").expect("VIOMMU_NESTED_QEMU names QEMU 11");
    let dir = std::env::temp_dir().join(format!("viommu-qemu11-alone-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let qmp_path = dir.join("qmp.sock");
    let ram_path = dir.join("ram");
    let ram = qemu_ram(&ram_path, RAM, IOVA_A, IOVA_B, QFILL);
    let open_rw = |p: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap_or_else(|e| panic!("open {p}: {e}"))
    };
    let iommufd = open_rw("/dev/iommu");
    let cdev = open_rw(&cdev_path);
    // Copies without CLOEXEC for QEMU (`fd=`), closed here once it runs.
    let inheritable = |f: &std::fs::File| {
        // SAFETY: dup of a file we own; the result is checked.
        let fd = unsafe { libc::dup(f.as_raw_fd()) };
        assert!(fd >= 0, "dup: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd nobody else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    let (fd_i, fd_c) = (inheritable(&iommufd), inheritable(&cdev));
    let iommufd_arg = format!("iommufd,id=iommufd0,fd={}", fd_i.as_raw_fd());
    let vfio_arg = format!(
        "vfio-pci,id=hostdev0,iommufd=iommufd0,fd={},addr=04.0",
        fd_c.as_raw_fd()
    );
    let ram_arg = format!(
        "memory-backend-file,id=mem,size={RAM},mem-path={},share=on",
        ram_path.display()
    );
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
    let mut child = Command::new(&qemu)
        .args(["-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", "64M"])
        .args(["-nodefaults", "-display", "none", "-S"])
        .args(["-object", &ram_arg, "-machine", "memory-backend=mem"])
        .args(["-object", &iommufd_arg, "-device", &vfio_arg])
        .args(["-qmp", &qmp_arg, "-serial", "none", "-monitor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Not ours: it would split libtest's `test NAME ... ok` line.
        .stderr(std::fs::File::create(dir.join("qemu.err")).unwrap())
        .spawn()
        .expect("QEMU starts");
    let qemu_err = || std::fs::read_to_string(dir.join("qemu.err")).unwrap_or_default();
    drop((fd_i, fd_c));
    let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(600));
    let realized = qmp.cmd(
        "qom-get",
        json!({"path": "/machine/peripheral/hostdev0", "property": "realized"}),
    );
    assert_eq!(
        realized,
        json!(true),
        "QEMU realized vfio-pci: {}",
        qemu_err()
    );
    // QEMU bound our open cdev: our copy may drive the device.
    let mut edu = EduDevice::from_file(cdev);
    edu.enable().expect("edu enabled");
    edu.read_from(IOVA_A, 0, XFER).expect("DMA read");
    edu.write_to(0, IOVA_B + DST as u64, XFER)
        .expect("DMA write");
    let mut b = vec![0u8; BUF_SIZE];
    {
        use std::os::unix::fs::FileExt;
        ram.read_exact_at(&mut b, IOVA_B).unwrap();
    }
    assert!(
        b == page_with(QFILL, DST, &pattern(9)[..XFER]),
        "without our backend the edu copies QEMU's RAM at IOVA A to QEMU's RAM at IOVA B"
    );
    note("qemu11 alone: the edu's DMA went through QEMU's IOAS (IOVA = GPA in its RAM)");
    drop(edu);
    drop(iommufd);
    qmp.cmd("quit", json!({}));
    let st = child.wait().expect("QEMU exits");
    assert!(st.success(), "QEMU: {st}: {}", qemu_err());
    let _ = std::fs::remove_dir_all(&dir);
}
