//! The seccomp filter (`--seccomp`, default `kill`): a system call outside
//! the serving threads' list kills the process; `trap` names it first; `log`
//! lets it through. Each case runs in a child process (this test binary,
//! re-run with VIOMMU_SECCOMP_CHILD set), since a filter cannot be removed.
//! The socket tier runs every backend with the default filter on.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use vhost_device_iommu::sandbox::{install, narrow, Role, SeccompMode};

const CHILD: &str = "VIOMMU_SECCOMP_CHILD";

/// An ioctl the process filter allows (FIONREAD on stdin; its result does
/// not matter, only whether the filter lets it through).
fn some_ioctl() {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int into `n`, which we own.
    unsafe { libc::ioctl(0, libc::FIONREAD, &mut n) };
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
