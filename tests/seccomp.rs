// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seccomp filter (`--seccomp`, default `kill`): a system call outside
//! the serving threads' list kills the process; `trap` names it first; `log`
//! lets it through. Each case runs in a child process (this test binary,
//! re-run with VIOMMU_SECCOMP_CHILD set), since a filter cannot be removed.
//! The socket tier runs every backend with the default filter on.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use vhost_device_iommu::sandbox::{install, narrow, Role, SeccompMode};

const CHILD: &str = "VIOMMU_SECCOMP_CHILD";

/// IOMMU_DESTROY, _IO(';', 0x80): an ioctl number on the process list.
const IOMMU_DESTROY: libc::c_ulong = 0x3b80;

/// An ioctl the process filter allows (IOMMU_DESTROY on stdin, which the
/// kernel refuses with ENOTTY: only whether the filter lets it through
/// matters).
fn some_ioctl() {
    let mut n = [0u32; 2];
    // SAFETY: stdin is no iommufd: the kernel answers ENOTTY without
    // touching `n`, which we own anyway.
    unsafe { libc::ioctl(0, IOMMU_DESTROY, n.as_mut_ptr()) };
}

/// In the child: with the filter on, one call the lists refuse (each
/// `mode` names one); the trap handler names it and ends the process.
fn refused_child(mode: &str) -> ! {
    assert!(install(SeccompMode::Trap).expect("filter installed"));
    some_ioctl();
    println!("allowed ioctl passed");
    match mode {
        "ioctl" => {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD writes one c_int into `n`, which we own.
            unsafe { libc::ioctl(0, libc::FIONREAD, &mut n) };
        }
        "mmap-exec" => {
            // SAFETY: a fresh anonymous mapping; never used.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            println!("mapped {p:?}");
        }
        "mprotect-exec" => {
            // SAFETY: a fresh anonymous mapping of our own.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            println!("writable mapping allowed");
            // SAFETY: `p` is our mapping, 4096 bytes.
            let rc = unsafe { libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC) };
            println!("mprotect {rc}");
        }
        "threads-only" => {
            // Threads still start (clone3 says ENOSYS, glibc falls back to
            // clone with thread flags), and name themselves.
            let t = std::thread::Builder::new()
                .name("named".into())
                .spawn(|| 1)
                .unwrap();
            assert_eq!(t.join().unwrap(), 1);
            // SAFETY: clone3 with a null argument: refused before it is read.
            let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            println!("clone3 {rc} {errno:?}");
            // A process, not a thread: clone without CLONE_THREAD.
            // SAFETY: the child (if any) only exits.
            if unsafe { libc::fork() } == 0 {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(0) };
            }
            println!("forked");
        }
        "prctl" => {
            // SAFETY: PR_SET_DUMPABLE takes no pointer.
            let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
            println!("prctl {rc}");
        }
        _ => unreachable!("{mode}"),
    }
    println!("refused call allowed");
    std::process::exit(0);
}

/// In the child, "narrow": the process filter, then a control client's
/// filter on one thread; the main thread may still ioctl, the narrowed
/// thread may not (trap mode names the call).
fn narrowed_child() -> ! {
    assert!(install(SeccompMode::Trap).expect("filter installed"));
    some_ioctl();
    println!("main thread ioctl allowed");
    let t = std::thread::spawn(|| {
        assert!(narrow(Role::ControlClient).expect("narrowed"));
        println!("narrowed");
        some_ioctl();
    });
    let _ = t.join();
    println!("narrowed thread ioctl allowed");
    std::process::exit(0);
}

/// In the child: install the filter, then open a file (openat: refused).
fn child(mode: &str) -> ! {
    if mode == "narrow" {
        narrowed_child();
    }
    if let Some(m) = mode.strip_prefix("refuse-") {
        refused_child(m);
    }
    let mode = match mode {
        "kill" => SeccompMode::Kill,
        "trap" => SeccompMode::Trap,
        _ => SeccompMode::Log,
    };
    assert!(
        install(mode).expect("filter installed"),
        "a kernel with seccomp"
    );
    // A thread made after the filter is covered too (TSYNC and inheritance).
    let t = std::thread::spawn(|| std::fs::File::open("/dev/null").is_ok());
    let opened = t.join().unwrap_or(false);
    println!("opened={opened}");
    std::process::exit(0);
}

fn run(mode: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "forbidden_system_calls_kill_the_process",
            "--nocapture",
        ])
        .env(CHILD, mode)
        .output()
        .unwrap()
}

#[test]
fn forbidden_system_calls_kill_the_process() {
    if let Ok(mode) = std::env::var(CHILD) {
        child(&mode);
    }
    let kill = run("kill");
    assert_eq!(kill.status.signal(), Some(libc::SIGSYS), "{kill:?}");
    let trap = run("trap");
    assert_eq!(trap.status.code(), Some(128 + libc::SIGSYS), "{trap:?}");
    let err = String::from_utf8_lossy(&trap.stderr);
    assert!(
        err.contains(&format!("refused system call {}", libc::SYS_openat)),
        "{err}"
    );
    let log = run("log");
    assert!(log.status.success(), "{log:?}");
    assert!(String::from_utf8_lossy(&log.stdout).contains("opened=true"));
}

#[test]
fn a_thread_narrowed_to_its_role_loses_the_other_roles_calls() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "forbidden_system_calls_kill_the_process",
            "--nocapture",
        ])
        .env(CHILD, "narrow")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("main thread ioctl allowed"), "{stdout}");
    assert!(stdout.contains("narrowed\n"), "{stdout}");
    assert!(
        !stdout.contains("narrowed thread ioctl allowed"),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(128 + libc::SIGSYS), "{out:?}");
    assert!(
        stderr.contains(&format!("refused system call {}", libc::SYS_ioctl)),
        "{stderr}"
    );
}

/// Runs `refused_child(mode)`: it must get through the allowed ioctl, then
/// be stopped at `nr`.
fn assert_refused(mode: &str, nr: libc::c_long) -> String {
    let out = run(&format!("refuse-{mode}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("allowed ioctl passed"), "{mode}: {out:?}");
    assert!(!stdout.contains("refused call allowed"), "{mode}: {stdout}");
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGSYS),
        "{mode}: {out:?}"
    );
    assert!(
        stderr.contains(&format!("refused system call {nr}\n")),
        "{mode}: {stderr}"
    );
    stdout
}

#[test]
fn an_ioctl_outside_the_list_is_refused() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    assert_refused("ioctl", libc::SYS_ioctl);
}

#[test]
fn executable_mappings_are_refused() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    assert_refused("mmap-exec", libc::SYS_mmap);
    let out = assert_refused("mprotect-exec", libc::SYS_mprotect);
    assert!(out.contains("writable mapping allowed"), "{out}");
}

#[test]
fn threads_start_but_processes_and_other_prctls_are_refused() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let out = assert_refused("threads-only", libc::SYS_clone);
    assert!(
        out.contains(&format!("clone3 -1 Some({})", libc::ENOSYS)),
        "{out}"
    );
    assert!(!out.contains("forked"), "{out}");
    assert_refused("prctl", libc::SYS_prctl);
}
