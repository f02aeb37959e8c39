// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Running the backend binary under test.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{invalid, Error, Result};

/// Path of the binary cargo built for these integration tests.
pub const BINARY: &str = env!("CARGO_BIN_EXE_vhost-device-iommu");

/// The binary to run: `VIOMMU_BIN` when set (the kernel tier copies the
/// test programs into a guest, where cargo's path does not exist).
pub fn binary() -> String {
    std::env::var("VIOMMU_BIN").unwrap_or_else(|_| BINARY.to_string())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty, uniquely named directory under the system temp dir.
pub fn fresh_temp_dir(tag: &str) -> Result<PathBuf> {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir =
        std::env::temp_dir().join(format!("viommu-{tag}-{}-{n}-{nanos:x}", std::process::id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Wait until `path` exists (e.g. a listening socket).
pub fn wait_for_path(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "{} did not appear within {timeout:?}",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// VmRSS of a process in KiB (from /proc/PID/status).
pub fn proc_rss_kib(pid: u32) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let num = rest.trim().trim_end_matches("kB").trim();
            return num
                .parse()
                .or_else(|e| invalid(format!("bad VmRSS line {line:?}: {e}")));
        }
    }
    invalid(format!("no VmRSS in /proc/{pid}/status"))
}

/// Number of open fds of a process (entries of /proc/PID/fd).
/// User + system CPU time of a process, in nanoseconds (from
/// /proc/PID/stat; resolution one clock tick).
pub fn proc_cpu_ns(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces; fields resume after its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| Error::Invalid("bad /proc stat".into()))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11, 12.
    let ticks: u64 = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(ticks * 1_000_000_000 / hz)
}

pub fn proc_fd_count(pid: u32) -> Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The running backend. Killed (and its temp dir removed) on drop; if the
/// test is panicking, its stderr is printed first.
pub struct BackendProcess {
    /// The child process.
    pub child: Child,
    /// Its private temp directory (also its working directory).
    pub dir: PathBuf,
    /// `dir/vhost.sock`, passed as `--socket-path` by [`BackendProcess::spawn`].
    pub socket: PathBuf,
    /// `dir/control.sock`, passed as `--control-socket` by [`BackendProcess::spawn`].
    pub control: PathBuf,
    /// Where stderr goes.
    pub stderr_path: PathBuf,
    /// Keep the temp dir on drop.
    pub keep_dir: bool,
}

/// `VIOMMU_FAULT_IO=epoll|io-uring|auto` runs the backends of a test binary
/// with that `--fault-io` (unless the test names one): the socket tests of
/// the fault path run in both modes.
fn fault_io_from_env(args: &mut Vec<String>) {
    if let Ok(mode) = std::env::var("VIOMMU_FAULT_IO") {
        if !args.iter().any(|a| a == "--fault-io") {
            args.extend(["--fault-io".to_string(), mode]);
        }
    }
}

/// `--socket-path DIR/vhost.sock --control-socket DIR/control.sock`, then
/// `extra`.
fn socket_args(dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--socket-path".into(),
        dir.join("vhost.sock").display().to_string(),
        "--control-socket".into(),
        dir.join("control.sock").display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

impl BackendProcess {
    /// Start the binary with `--socket-path DIR/vhost.sock --control-socket
    /// DIR/control.sock` followed by `extra` (`{dir}` in an argument is
    /// replaced by the temp dir), and wait for the vhost-user socket.
    pub fn spawn(extra: &[&str]) -> Result<Self> {
        let dir = fresh_temp_dir("backend")?;
        let mut args = socket_args(&dir, extra);
        fault_io_from_env(&mut args);
        let mut p = Self::spawn_in(dir, &args, false)?;
        p.wait_for_socket(Duration::from_secs(10))?;
        Ok(p)
    }

    /// [`BackendProcess::spawn`] at the daemon's default log level (no
    /// `RUST_LOG`, whatever the test runs with): what an operator sees.
    pub fn spawn_default_log(extra: &[&str]) -> Result<Self> {
        let dir = fresh_temp_dir("backend")?;
        let mut args = socket_args(&dir, extra);
        fault_io_from_env(&mut args);
        let mut p = Self::spawn_in(dir, &args, true)?;
        p.wait_for_socket(Duration::from_secs(10))?;
        Ok(p)
    }

    /// Start `program` (a wrapper such as valgrind) with `args` (the
    /// wrapper's, then the binary and its arguments: `{dir}` is replaced by
    /// the temp dir) followed by `--socket-path DIR/vhost.sock
    /// --control-socket DIR/control.sock`, and wait up to `timeout` for the
    /// vhost-user socket.
    pub fn spawn_wrapped(program: &str, args: &[&str], timeout: Duration) -> Result<Self> {
        let dir = fresh_temp_dir("backend")?;
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--socket-path".to_string(),
            dir.join("vhost.sock").display().to_string(),
            "--control-socket".to_string(),
            dir.join("control.sock").display().to_string(),
        ]);
        let mut p = Self::spawn_program(program, dir, &args, false)?;
        p.wait_for_socket(timeout)?;
        Ok(p)
    }

    /// Start the binary with exactly `args` (after `{dir}` substitution) in
    /// a fresh temp dir; does not wait for anything.
    pub fn spawn_raw(args: &[&str]) -> Result<Self> {
        let dir = fresh_temp_dir("backend")?;
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Self::spawn_in(dir, &args, false)
    }

    /// [`BackendProcess::spawn`] in a process where the system calls
    /// `denied` fail with EPERM, as a container's seccomp policy makes them
    /// (the filter is installed between fork and exec, so the backend starts
    /// under it).
    pub fn spawn_denying(extra: &[&str], denied: &[i64]) -> Result<Self> {
        let dir = fresh_temp_dir("backend")?;
        let args = socket_args(&dir, extra);
        let filter = deny_filter(denied)?;
        let mut p = Self::spawn_filtered(&binary(), dir, &args, false, Some(filter))?;
        p.wait_for_socket(Duration::from_secs(10))?;
        Ok(p)
    }

    fn spawn_in(dir: PathBuf, args: &[String], default_log: bool) -> Result<Self> {
        Self::spawn_program(&binary(), dir, args, default_log)
    }

    fn spawn_program(bin: &str, dir: PathBuf, args: &[String], default_log: bool) -> Result<Self> {
        Self::spawn_filtered(bin, dir, args, default_log, None)
    }

    fn spawn_filtered(
        bin: &str,
        dir: PathBuf,
        args: &[String],
        default_log: bool,
        filter: Option<seccompiler::BpfProgram>,
    ) -> Result<Self> {
        let d = dir.display().to_string();
        let args: Vec<String> = args.iter().map(|a| a.replace("{dir}", &d)).collect();
        let stderr_path = dir.join("stderr.log");
        let stderr = File::create(&stderr_path)?;
        let stdout = File::create(dir.join("stdout.log"))?;
        let mut cmd = Command::new(bin);
        cmd.args(&args).current_dir(&dir);
        if default_log {
            cmd.env_remove("RUST_LOG");
        } else {
            cmd.env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        }
        if let Some(filter) = filter {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs in the child between fork and exec;
            // it only calls prctl and seccomp on a program built before the
            // fork (no allocation, no lock).
            unsafe {
                cmd.pre_exec(move || {
                    seccompiler::apply_filter(&filter).map_err(std::io::Error::other)
                });
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| Error::Invalid(format!("cannot start {bin}: {e}")))?;
        Ok(BackendProcess {
            child,
            socket: dir.join("vhost.sock"),
            control: dir.join("control.sock"),
            dir,
            stderr_path,
            keep_dir: false,
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for the vhost-user socket file; fails early if the process exits.
    pub fn wait_for_socket(&mut self, timeout: Duration) -> Result<()> {
        let path = self.socket.clone();
        self.wait_for_file(&path, timeout)
    }

    /// Wait for `path`; fails early (with stderr) if the process exits.
    pub fn wait_for_file(&mut self, path: &Path, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if path.exists() {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return invalid(format!(
                    "backend exited ({st}) before {} appeared; stderr:\n{}",
                    path.display(),
                    self.stderr()
                ));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "{} did not appear within {timeout:?}; stderr:\n{}",
                    path.display(),
                    self.stderr()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "backend still running after {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Current VmRSS in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        proc_rss_kib(self.pid())
    }

    /// Current number of open fds.
    pub fn fd_count(&self) -> Result<usize> {
        proc_fd_count(self.pid())
    }

    /// Send SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run the binary with `args` to completion (e.g. `--print-capabilities`
/// or a bad option): `(status, stdout, stderr)`, killed after `timeout`.
pub fn run_to_exit(args: &[&str], timeout: Duration) -> Result<(ExitStatus, String, String)> {
    let mut p = BackendProcess::spawn_raw(args)?;
    let st = match p.wait_exit(timeout) {
        Ok(st) => st,
        Err(e) => {
            p.kill();
            return Err(e);
        }
    };
    let out = fs::read_to_string(p.dir.join("stdout.log")).unwrap_or_default();
    Ok((st, out, p.stderr()))
}

/// Start the binary with `--socket-path {dir}/v.sock` and `extra`, and
/// check that it refuses to start: exit status 1 and one stderr line that
/// contains `want`.
pub fn assert_start_refused(extra: &[&str], want: &str) {
    let mut args = vec!["--socket-path", "{dir}/v.sock"];
    args.extend_from_slice(extra);
    let (st, _out, err) = run_to_exit(&args, Duration::from_secs(10)).unwrap();
    assert_eq!(st.code(), Some(1), "{args:?}: {err}");
    assert!(
        err.contains(want),
        "{args:?}: stderr {err:?} lacks {want:?}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err:?}");
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- backend stderr ({}) ----\n{}\n---- end ----",
                self.stderr_path.display(),
                self.stderr()
            );
        }
        if !self.keep_dir {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A seccomp program that allows everything but `denied` (EPERM).
fn deny_filter(denied: &[i64]) -> Result<seccompiler::BpfProgram> {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    let rules = denied.iter().map(|&nr| (nr, vec![])).collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| Error::Invalid(format!("seccomp arch: {e}")))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| Error::Invalid(format!("seccomp filter: {e}")))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Invalid(format!("seccomp program: {e}")))
}

/// Can this host make an io_uring (`--fault-io io-uring`)? None: yes;
/// Some(why) otherwise (`kernel.io_uring_disabled`, a container's seccomp
/// policy, a kernel without it). Probed with io_uring_setup itself.
pub fn io_uring_unavailable() -> Option<String> {
    // struct io_uring_params is 120 bytes; zeroed asks for defaults.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes `params` (120 bytes, ours)
    // and returns a new fd or -1; nothing else is touched.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Some(format!(
            "io_uring_setup: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the fd was just returned to us and is closed once.
    unsafe { libc::close(fd as i32) };
    None
}
