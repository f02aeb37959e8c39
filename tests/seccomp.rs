//! The seccomp filter (`--seccomp`, default `kill`): a system call outside
//! the serving threads' list kills the process; `trap` names it first; `log`
//! lets it through. Each case runs in a child process (this test binary,
//! re-run with VIOMMU_SECCOMP_CHILD set), since a filter cannot be removed.
//! The socket tier runs every backend with the default filter on.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use vhost_device_iommu::sandbox::{install, SeccompMode};

const CHILD: &str = "VIOMMU_SECCOMP_CHILD";

/// In the child: install the filter, then open a file (openat: refused).
fn child(mode: &str) -> ! {
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
