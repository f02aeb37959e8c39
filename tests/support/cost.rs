// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Machine-independent costs of the backend: user-space instructions
//! and system calls per operation, in steady state (spec-notes/
//! benchmarks.md, "Costs that do not depend on the machine").
//!
//! The backend runs under `valgrind --tool=callgrind --separate-threads=yes
//! --fair-sched=yes --trace-syscalls=yes`, with `--seccomp off` (valgrind
//! does not implement seccomp(2)), once for N and once for 2N operations
//! after the same set-up and warm-up. Only the backend is counted, never
//! the test driver, and only the threads the caller names by role.
//!
//! - Instructions: each thread's profile (self cost per function) from its
//!   callgrind file; (count(2N) - count(N)) / N cancels start-up, warm-up
//!   and shut-down exactly.
//! - System calls: valgrind's trace of the program's calls, by thread,
//!   between two marks (`mark`) around the measured operations, then the
//!   same difference. strace (`StraceSession`, attached to threads of a
//!   native backend, seccomp on) gives the same figure where the threads'
//!   interleaving does not matter, and is printed as a cross-check.
//!
//! Repeatable counts need the same interleaving of the driver's and the
//! backend's threads in every run: the driver waits for the workers to be
//! idle before each step (`wait_idle`), asks for interrupts when it kicks
//! (`SplitQueue::set_eager_used_event`) and holds threads where a race
//! would change the work (`Held`).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{binary, BackendProcess};
use super::{invalid, Error, Result};

/// Why the cost benches cannot run here (valgrind or strace missing), or
/// None when both work.
pub fn missing_tools() -> Option<String> {
    let works = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let mut missing = Vec::new();
    if !works("valgrind", "--version") {
        missing.push("valgrind not installed (apt-get install -y valgrind)");
    }
    if !works("strace", "-V") {
        missing.push("strace not installed (apt-get install -y strace)");
    }
    (!missing.is_empty()).then(|| missing.join("; "))
}

/// The thread roles of the backend, from the names it gives its threads
/// (`/proc/PID/task/TID/comm`) or, under callgrind, from the functions a
/// thread ran (callgrind does not record thread names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// `viommu-reqq`: serves the requestq.
    RequestQueue,
    /// `viommu-evtq`: the eventq and the fault sources.
    EventQueue,
    /// `viommu-ctl-client`: one control-socket connection.
    ControlClient,
    /// Everything else (main, frontend handler, accept loops).
    Other,
}

impl Role {
    fn of_comm(comm: &str) -> Role {
        match comm.trim() {
            "viommu-reqq" => Role::RequestQueue,
            "viommu-evtq" => Role::EventQueue,
            "viommu-ctl-clie" | "viommu-ctl-client" => Role::ControlClient,
            _ => Role::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::RequestQueue => "reqq",
            Role::EventQueue => "evtq",
            Role::ControlClient => "ctl-client",
            Role::Other => "other",
        }
    }
}

/// The backend's threads and their roles (Linux thread names are cut to
/// 15 bytes).
pub fn threads(pid: u32) -> Result<Vec<(u32, Role)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/task"))? {
        let e = e?;
        let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        out.push((tid, Role::of_comm(&comm)));
    }
    out.sort();
    Ok(out)
}

/// Wait until every thread in `tids` of `pid` sleeps in epoll_wait (its
/// `/proc/PID/task/TID/syscall`): the workers finished everything they had,
/// so the next event the driver makes starts one whole pass, the same in
/// every run (no pass that finds work another already took, no kick the
/// device had suppressed). Ring notifications would otherwise depend on
/// how the driver's and the device's threads interleave.
pub fn wait_idle(pid: u32, tids: &[u32]) -> Result<()> {
    // epoll_wait, epoll_pwait, epoll_pwait2.
    wait_blocked(pid, tids, "in epoll_wait", |c| {
        matches!(c[0], 232 | 281 | 441)
    })
}

/// Wait until every thread in `tids` sleeps in a futex wait with a timeout
/// (a `dma` waiting for its page request's answer: a channel's
/// recv_timeout), not on a lock (no timeout) nor on valgrind's own lock.
pub fn wait_answer_pending(pid: u32, tids: &[u32]) -> Result<()> {
    const FUTEX: u64 = 202;
    wait_blocked(pid, tids, "waiting for an answer", |c| {
        c.len() > 4 && c[0] == FUTEX && matches!(c[2] & 0x7f, 0 | 9) && c[4] != 0
    })
}

/// Wait until `is` holds for the system call (number, then arguments) in
/// which each thread of `tids` sleeps (`/proc/PID/task/TID/syscall`).
fn wait_blocked(pid: u32, tids: &[u32], what: &str, is: impl Fn(&[u64]) -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for t in tids {
        let path = format!("/proc/{pid}/task/{t}/syscall");
        loop {
            let s = fs::read_to_string(&path)?;
            // "NR 0xARG1 ... 0xSP 0xPC", or "running", or "-1 SP PC".
            let mut fields = s.split_whitespace();
            let mut call: Vec<u64> = fields
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .into_iter()
                .collect();
            if !call.is_empty() {
                call.extend(
                    fields.map_while(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()),
                );
            }
            if !call.is_empty() && is(&call) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!("thread {t} never {what}: {s}")));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(())
}

/// One thread of the backend held in a ptrace stop while the others run
/// (PTRACE_SEIZE + PTRACE_INTERRUPT; released on drop): what the others
/// do meanwhile is all there when it runs again. Its blocking call is
/// interrupted: epoll_wait returns EINTR once when released (one more
/// epoll_wait per hold, counted like any other).
pub struct Held {
    tid: u32,
}

impl Held {
    pub fn hold(tid: u32) -> Result<Held> {
        let t = tid as libc::pid_t;
        let null = std::ptr::null_mut::<libc::c_void>();
        // SAFETY: ptrace requests on a thread of our own child that pass
        // no memory (null addr and data).
        if unsafe { libc::ptrace(libc::PTRACE_SEIZE, t, null, null) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let held = Held { tid };
        // SAFETY: as above.
        if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, t, null, null) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut status = 0;
        // SAFETY: waits for our tracee's stop; `status` is ours to fill.
        if unsafe { libc::waitpid(t, &mut status, libc::__WALL) } != t {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(held)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let null = std::ptr::null_mut::<libc::c_void>();
        // SAFETY: detaching our stopped tracee resumes it; no memory passed.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.tid as libc::pid_t, null, null) };
    }
}

/// The virtual endpoints' fault FD of the backend `pid` (the one pipe
/// whose both ends it holds; valgrind's own FDs sit above 1000), opened for
/// looking at how many bytes wait in it (`pending`), never read.
pub struct FaultPipe {
    file: fs::File,
}

impl FaultPipe {
    pub fn open(pid: u32) -> Result<FaultPipe> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut pipes: Vec<(u32, String)> = Vec::new();
        for e in fs::read_dir(format!("/proc/{pid}/fd"))? {
            let e = e?;
            let Ok(fd) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let link = fs::read_link(e.path())?.to_string_lossy().into_owned();
            if fd < 1000 && link.starts_with("pipe:") {
                pipes.push((fd, link));
            }
        }
        // The backend holds both ends of its own pipe; a lone end was
        // inherited (a jobserver's).
        let both: Vec<&(u32, String)> = pipes
            .iter()
            .filter(|p| pipes.iter().filter(|q| q.1 == p.1).count() == 2)
            .collect();
        if both.len() != 2 {
            return invalid(format!(
                "expected one pipe of the backend's, found {pipes:?}"
            ));
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/{pid}/fd/{}", both[0].0))?;
        Ok(FaultPipe { file })
    }

    /// Bytes waiting in the pipe.
    pub fn pending(&self) -> Result<usize> {
        use std::os::fd::AsRawFd;
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int to the pointer we pass.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(n.max(0) as usize)
    }

    /// Wait until `bytes` wait in the pipe.
    pub fn wait_for(&self, bytes: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n = self.pending()?;
            if n >= bytes {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "{n} of {bytes} bytes in the fault pipe"
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// The backend's queue workers (`viommu-reqq`, `viommu-evtq`), once named
/// (at their first event).
pub fn workers(pid: u32) -> Result<Vec<(u32, Role)>> {
    Ok(threads(pid)?
        .into_iter()
        .filter(|t| matches!(t.1, Role::RequestQueue | Role::EventQueue))
        .collect())
}

/// Start the backend under callgrind (with `--seccomp off` appended), one
/// output file per thread in the backend's directory. Waits for the
/// vhost-user socket (valgrind's start-up is slow).
pub fn spawn_callgrind(extra: &[&str]) -> Result<BackendProcess> {
    let bin = binary();
    let mut args: Vec<&str> = vec![
        "--tool=callgrind",
        "--separate-threads=yes",
        // Threads take valgrind's lock in the order they asked for it:
        // with the driver's rendezvous (`wait_idle`, `Gate`) the backend's
        // threads run in the same order in every run.
        "--fair-sched=yes",
        // Every system call the program makes, with its thread, in the
        // log: counted per thread in the same run as the instructions.
        "--trace-syscalls=yes",
        "--callgrind-out-file={dir}/callgrind.out",
        // The whole-process summary goes to stderr.log with the backend's.
        "--log-file={dir}/valgrind.log",
        &bin,
        "--seccomp",
        "off",
    ];
    args.extend_from_slice(extra);
    BackendProcess::spawn_wrapped("valgrind", &args, Duration::from_secs(120))
}

/// One thread's profile: instructions executed in each function (self
/// cost, i.e. not counting the functions it called).
#[derive(Debug, Default, Clone)]
pub struct Profile {
    pub by_fn: HashMap<String, u64>,
    pub total: u64,
}

impl Profile {
    pub fn add(&mut self, other: &Profile) {
        for (f, n) in &other.by_fn {
            *self.by_fn.entry(f.clone()).or_default() += n;
        }
        self.total += other.total;
    }

    /// Does any function name contain `pat`?
    fn ran(&self, pat: &str) -> bool {
        self.by_fn.keys().any(|f| f.contains(pat))
    }

    /// The thread's role, from what it ran (a queue worker first: only
    /// they run `handle_event`). A control client's `serve_client` may be
    /// inlined into its thread's closure: what it calls (`control::ops::`,
    /// the `Deadlined` stream) names it then.
    pub fn role(&self) -> Role {
        if self.ran("VhostUserBackend>::handle_event") {
            if self.ran("backend::requestq::") {
                Role::RequestQueue
            } else {
                Role::EventQueue
            }
        } else if [
            "control::serve_client",
            "control::ops::",
            "control::Deadlined",
        ]
        .iter()
        .any(|f| self.ran(f))
        {
            Role::ControlClient
        } else {
            Role::Other
        }
    }
}

/// Parse one callgrind output file (events: Ir only): self cost per
/// function. Cost lines right after `calls=` are the call's inclusive
/// cost and belong to the callee: skipped.
pub fn parse_callgrind(text: &str) -> Result<Profile> {
    let mut names: HashMap<String, String> = HashMap::new();
    let mut p = Profile::default();
    let mut current = String::new();
    let mut after_calls = false;
    for line in text.lines() {
        let first = line.as_bytes().first().copied().unwrap_or(b' ');
        if first.is_ascii_digit() || first == b'+' || first == b'-' || first == b'*' {
            if std::mem::take(&mut after_calls) {
                continue;
            }
            let n: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            *p.by_fn.entry(current.clone()).or_default() += n;
            p.total += n;
        } else if let Some(rest) = line.strip_prefix("fn=") {
            current = compressed_name(&mut names, rest);
        } else if let Some(rest) = line.strip_prefix("cfn=") {
            // Registers the compressed name only.
            compressed_name(&mut names, rest);
        } else if line.starts_with("calls=") {
            after_calls = true;
        }
    }
    Ok(p)
}

/// `(id) name` defines a compressed name, `(id)` uses one.
fn compressed_name(names: &mut HashMap<String, String>, s: &str) -> String {
    if let Some(rest) = s.strip_prefix('(') {
        if let Some((id, name)) = rest.split_once(')') {
            let name = name.trim();
            if name.is_empty() {
                return names.get(id).cloned().unwrap_or_else(|| s.to_string());
            }
            names.insert(id.to_string(), name.to_string());
            return name.to_string();
        }
    }
    s.to_string()
}

/// What one run under callgrind counted, summed by thread role.
#[derive(Debug, Default)]
pub struct Run {
    pub profiles: BTreeMap<Role, Profile>,
    pub syscalls: BTreeMap<Role, Syscalls>,
}

impl Run {
    /// The profiles of `roles`, summed.
    pub fn profile(&self, roles: &[Role]) -> Profile {
        let mut p = Profile::default();
        for r in roles {
            if let Some(x) = self.profiles.get(r) {
                p.add(x);
            }
        }
        p
    }

    /// The system calls of `roles`, summed, each name prefixed with its
    /// role (`evtq:read`) when `by_role`.
    pub fn syscalls(&self, roles: &[Role], by_role: bool) -> Syscalls {
        let mut all = Syscalls::default();
        for r in roles {
            let Some(s) = self.syscalls.get(r) else {
                continue;
            };
            for (k, v) in &s.by_name {
                let k = if by_role {
                    format!("{}:{k}", r.name())
                } else {
                    k.clone()
                };
                *all.by_name.entry(k).or_default() += v;
            }
            all.total += s.total;
        }
        all
    }
}

/// Stop a backend started by [`spawn_callgrind`] (SIGTERM: valgrind writes
/// its profiles on the way out) and sum the profiles and system calls of
/// its threads by role.
pub fn finish_callgrind(mut b: BackendProcess) -> Result<Run> {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(b.pid() as i32, libc::SIGTERM) };
    b.wait_exit(Duration::from_secs(120))?;
    // VIOMMU_COST_KEEP=DIR: keep the profiles and the log (for
    // callgrind_annotate), in DIR/<pid>/.
    if let Ok(keep) = std::env::var("VIOMMU_COST_KEEP") {
        let to = Path::new(&keep).join(b.pid().to_string());
        fs::create_dir_all(&to)?;
        for e in fs::read_dir(&b.dir)? {
            let path = e?.path();
            if path.is_file() {
                fs::copy(&path, to.join(path.file_name().unwrap_or_default()))?;
            }
        }
        eprintln!("callgrind profiles kept in {}", to.display());
    }
    let log = fs::read_to_string(b.dir.join("valgrind.log")).unwrap_or_default();
    let calls = parse_syscall_trace(marked_window(&log));
    let mut run = Run::default();
    let mut files = 0;
    for e in fs::read_dir(&b.dir)? {
        let path = e?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !name.starts_with("callgrind.out") {
            continue;
        }
        let text = fs::read_to_string(&path)?;
        let Some(tid) = text
            .lines()
            .find_map(|l| l.strip_prefix("thread: "))
            .and_then(|t| t.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let p = parse_callgrind(&text)?;
        let role = p.role();
        run.profiles.entry(role).or_default().add(&p);
        if let Some(s) = calls.get(&tid) {
            let mine = run.syscalls.entry(role).or_default();
            for (k, v) in &s.by_name {
                *mine.by_name.entry(k.clone()).or_default() += v;
            }
            mine.total += s.total;
        }
        files += 1;
    }
    if files == 0 {
        return invalid(format!("callgrind wrote no profile; its log:\n{log}"));
    }
    Ok(run)
}

/// Mark the start or the end of the counted window in the syscall trace
/// of a backend under callgrind: a new control-socket client, whose thread
/// the backend starts with clone(2) (no other thread starts in steady
/// state). Call it with the workers idle (`wait_idle`).
pub fn mark(b: &BackendProcess) -> Result<()> {
    let mut c = super::ControlClient::connect_timeout(
        &b.control,
        Duration::from_secs(60),
        Duration::from_secs(60),
    )?;
    // Answered: its thread exists.
    c.stats()?;
    Ok(())
}

/// The part of the trace between the last two `mark`s (the whole trace
/// when there are fewer).
pub fn marked_window(log: &str) -> &str {
    let clones: Vec<usize> = log
        .match_indices("SYSCALL[")
        .map(|(i, _)| i)
        .filter(|&i| {
            let rest = &log[i..];
            let rest = rest.split_once(") ").map_or("", |(_, r)| r);
            rest.starts_with("sys_clone")
        })
        .collect();
    match clones.len() {
        0 | 1 => log,
        n => {
            let (a, b) = (clones[n - 2], clones[n - 1]);
            // From after the first marker's clone to before the second's.
            let a = a + log[a..].find('\n').unwrap_or(0);
            &log[a..b]
        }
    }
}

/// Calls served by the vDSO natively (no system call); valgrind has no
/// vDSO and makes them real calls: not counted.
const VDSO: [&str; 4] = ["clock_gettime", "gettimeofday", "time", "getcpu"];

/// valgrind --trace-syscalls=yes: `SYSCALL[pid,tid](nr) name ( args ) -->`
/// once per call (a blocking call adds a `SYSCALL[pid,tid](nr) ...
/// [async] -->` line when it returns: not counted again). By valgrind
/// thread id (the callgrind files' `thread:`).
pub fn parse_syscall_trace(log: &str) -> HashMap<u32, Syscalls> {
    let mut out: HashMap<u32, Syscalls> = HashMap::new();
    for piece in log.split("SYSCALL[").skip(1) {
        let Some((ids, rest)) = piece.split_once(']') else {
            continue;
        };
        let Some(tid) = ids.split(',').nth(1).and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        let Some((nr, rest)) = rest.strip_prefix('(').and_then(|r| r.split_once(')')) else {
            continue;
        };
        let rest = rest.trim_start();
        if rest.starts_with("...") {
            continue;
        }
        let name = rest.split_whitespace().next().unwrap_or("");
        let name = name.strip_prefix("sys_").unwrap_or(name);
        let name = name.split('(').next().unwrap_or(name);
        if VDSO.contains(&name) {
            continue;
        }
        let name = if name.is_empty() || name == "unimplemented" {
            format!("nr{nr}")
        } else {
            name.to_string()
        };
        let s = out.entry(tid).or_default();
        *s.by_name.entry(name).or_default() += 1;
        s.total += 1;
    }
    out
}

/// System calls counted by strace, by name.
#[derive(Debug, Default, Clone)]
pub struct Syscalls {
    pub by_name: BTreeMap<String, u64>,
    pub total: u64,
}

/// strace attached to some of the backend's threads.
pub struct StraceSession {
    child: Child,
    out: PathBuf,
}

impl StraceSession {
    /// Attach `strace -c` to `tids` (threads only, not their process) and
    /// wait until every one is attached.
    pub fn attach(dir: &Path, tag: &str, tids: &[u32]) -> Result<StraceSession> {
        let out = dir.join(format!("strace-{tag}.txt"));
        let mut cmd = Command::new("strace");
        cmd.arg("-c").arg("-o").arg(&out);
        for t in tids {
            cmd.arg("-p").arg(t.to_string());
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Invalid(format!("cannot start strace: {e}")))?;
        let stderr = child.stderr.take().expect("piped");
        let mut lines = BufReader::new(stderr).lines();
        let mut attached = 0;
        while attached < tids.len() {
            match lines.next() {
                Some(Ok(l)) if l.contains("attached") => attached += 1,
                Some(Ok(_)) => {}
                _ => {
                    let _ = child.kill();
                    return invalid("strace exited before attaching");
                }
            }
        }
        // Keep draining its stderr so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(StraceSession { child, out })
    }

    /// Detach (SIGINT) and read the counts.
    pub fn finish(mut self) -> Result<Syscalls> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                return Err(Error::Timeout("strace did not detach".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut text = String::new();
        fs::File::open(&self.out)?.read_to_string(&mut text)?;
        Ok(parse_strace_summary(&text))
    }
}

/// System calls per operation by strace on `tids`: `run(rounds)` then
/// `run(2 * rounds)`, each under its own attach, `per` operations apart;
/// `n/a (<why>)` when strace cannot attach (no ptrace rights).
pub fn strace_per_op(
    dir: &Path,
    tids: &[u32],
    rounds: usize,
    per: u64,
    mut run: impl FnMut(usize),
) -> String {
    let mut count = |n: usize, tag: &str| -> Result<Syscalls> {
        let s = StraceSession::attach(dir, tag, tids)?;
        run(n);
        s.finish()
    };
    match (count(rounds, "n"), count(2 * rounds, "2n")) {
        (Ok(a), Ok(b)) => format!("{:.4}", (b.total as f64 - a.total as f64) / per as f64),
        (Err(e), _) | (_, Err(e)) => format!("n/a ({e})").replace(' ', "_"),
    }
}

/// strace -c's table: `% time seconds usecs/call calls [errors] syscall`.
pub fn parse_strace_summary(text: &str) -> Syscalls {
    let mut s = Syscalls::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || f[0].starts_with('-') || f[0] == "%" {
            continue;
        }
        let (Some(name), Ok(calls)) = (f.last(), f[3].parse::<u64>()) else {
            continue;
        };
        if *name == "total" {
            continue;
        }
        *s.by_name.entry(name.to_string()).or_default() += calls;
        s.total += calls;
    }
    s
}

/// (b - a) / n per function, the `k` largest, as `name=<n>` pairs.
pub fn top_diff(a: &Profile, b: &Profile, n: u64, k: usize) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = b
        .by_fn
        .iter()
        .map(|(f, &nb)| {
            let na = a.by_fn.get(f).copied().unwrap_or(0);
            (f.clone(), (nb as f64 - na as f64) / n as f64)
        })
        .collect();
    v.sort_by(|x, y| y.1.total_cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
    v.truncate(k);
    v
}

/// A function's name for a one-line summary: its type (or trait impl)
/// and name, `GuestMemoryBackend::to_region_addr`, without crate paths
/// and generics.
pub fn short_name(f: &str) -> String {
    let Some((prefix, name)) = split_last_path(f) else {
        return f.to_string();
    };
    let ty = match prefix.strip_suffix('>').and_then(|p| p.strip_prefix('<')) {
        // `<X as Trait>::f` or `<impl Trait for X>::f`.
        Some(inner) => match inner.strip_prefix("impl ") {
            Some(i) => i.split(" for ").next().unwrap_or(i).to_string(),
            None => inner.split(" as ").next().unwrap_or(inner).to_string(),
        },
        None => prefix.to_string(),
    };
    let ty = strip_generics(&ty);
    match ty.rsplit("::").find(|s| !s.is_empty()) {
        Some(t) => format!("{t}::{name}"),
        None => name.to_string(),
    }
}

/// `(path, last)` split at the last `::` outside angle brackets.
fn split_last_path(f: &str) -> Option<(&str, &str)> {
    let b = f.as_bytes();
    let mut depth = 0i32;
    let mut at = None;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'<' => depth += 1,
            b'>' => depth -= 1,
            b':' if depth == 0 && b.get(i + 1) == Some(&b':') => {
                at = Some(i);
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    at.map(|i| (&f[..i], &f[i + 2..]))
}

fn strip_generics(s: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in s.chars() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// The top `k` functions as `name=<n>` separated by spaces.
pub fn format_top(top: &[(String, f64)]) -> String {
    top.iter()
        .map(|(f, n)| format!("{}={n:.0}", short_name(f)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The crate a function (as callgrind names it) belongs to, as the
/// breakdown names it: `ours`, `vm-memory`, `virtio-queue`, `std` (core,
/// alloc, std), `libc` (a name without a path: glibc's memcpy), else the
/// crate's name. `<Type as Trait>::f` is the type's crate unless the type is
/// std's (`<AtomicI16 as vm_memory::AtomicInteger>::load` is vm-memory's).
/// Code inlined into a function counts as that function's: a generic of
/// vm-memory's instantiated for our view counts as vm-memory's.
pub fn crate_of(f: &str) -> String {
    let first = |path: &str| path.split("::").next().unwrap_or(path).to_string();
    let krate = match f.strip_prefix('<') {
        Some(rest) => {
            // Split `Type as Trait>::f` at the ` as ` outside brackets.
            let b = rest.as_bytes();
            let mut depth = 0i32;
            let mut split = None;
            for i in 0..b.len() {
                match b[i] {
                    b'<' => depth += 1,
                    b'>' if depth == 0 => break,
                    b'>' => depth -= 1,
                    b' ' if depth == 0 && rest[i..].starts_with(" as ") => {
                        split = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            match split {
                Some(i) => {
                    let ty = first(&rest[..i]);
                    if matches!(ty.as_str(), "core" | "alloc" | "std") {
                        first(&rest[i + 4..])
                    } else {
                        ty
                    }
                }
                None => first(rest),
            }
        }
        None if !f.contains("::") => return "libc".to_string(),
        None => first(f),
    };
    match krate.as_str() {
        "vhost_device_iommu" => "ours".to_string(),
        "core" | "alloc" | "std" => "std".to_string(),
        k => k.replace('_', "-"),
    }
}

/// (b - a) / n of the self cost by crate ([`crate_of`]), largest first.
pub fn crates_diff(a: &Profile, b: &Profile, n: u64) -> Vec<(String, f64)> {
    let mut by: HashMap<String, f64> = HashMap::new();
    for (f, &nb) in &b.by_fn {
        let na = a.by_fn.get(f).copied().unwrap_or(0);
        *by.entry(crate_of(f)).or_default() += (nb as f64 - na as f64) / n as f64;
    }
    for (f, &na) in &a.by_fn {
        if !b.by_fn.contains_key(f) {
            *by.entry(crate_of(f)).or_default() -= na as f64 / n as f64;
        }
    }
    let mut v: Vec<(String, f64)> = by.into_iter().filter(|(_, d)| d.abs() >= 0.5).collect();
    v.sort_by(|x, y| y.1.total_cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
    v
}

/// `ours=700 vm-memory=500 ...`
pub fn format_crates(v: &[(String, f64)]) -> String {
    v.iter()
        .map(|(k, n)| format!("{k}={n:.0}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Per-role (b - a) / n, e.g. `reqq=2600 other=12`.
pub fn format_roles(a: &BTreeMap<Role, Profile>, b: &BTreeMap<Role, Profile>, n: u64) -> String {
    b.iter()
        .map(|(r, pb)| {
            let na = a.get(r).map_or(0, |p| p.total);
            let d = ((pb.total as f64 - na as f64) / n as f64).round() as i64;
            format!("{}={d}", r.name())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The syscalls' (b - a) / n by name, e.g. `read=0.0039 write=0.0044`.
pub fn format_syscalls(a: &Syscalls, b: &Syscalls, n: u64) -> String {
    syscall_diff(a, b, n)
        .iter()
        .map(|(k, v)| format!("{k}={v:.4}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// (b - a) / n of the syscalls, by name, largest first.
pub fn syscall_diff(a: &Syscalls, b: &Syscalls, n: u64) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = b
        .by_name
        .iter()
        .map(|(k, &nb)| {
            let na = a.by_name.get(k).copied().unwrap_or(0);
            (k.clone(), (nb as f64 - na as f64) / n as f64)
        })
        .filter(|(_, d)| *d != 0.0)
        .collect();
    v.sort_by(|x, y| y.1.total_cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_trace_counts_each_call_once() {
        let log = "SYSCALL[7,2](232) sys_epoll_wait ( 16, 0x1, 100, -1 ) --> [async] ... \n\
                   SYSCALL[7,2](232) ... [async] --> Success(0x1) \n\
                   SYSCALL[7,2](0) sys_read ( 6 )[sync] --> Success(0x28) SYSCALL[7,3](0) sys_read ( 5 )\n";
        let s = parse_syscall_trace(log);
        assert_eq!(s[&2].total, 2);
        assert_eq!(s[&2].by_name["epoll_wait"], 1);
        assert_eq!(s[&3].by_name["read"], 1);
    }

    #[test]
    fn short_names() {
        assert_eq!(
            short_name("vm_memory::guest_memory::GuestMemoryBackend::to_region_addr"),
            "GuestMemoryBackend::to_region_addr"
        );
        assert_eq!(
            short_name("<virtio_queue::chain::DescriptorChain<M> as core::iter::Iterator>::next"),
            "DescriptorChain::next"
        );
        assert_eq!(
            short_name(
                "vm_memory::guest_memory::<impl vm_memory::bytes::Bytes<A> for T>::read_slice"
            ),
            "guest_memory::read_slice"
        );
        assert_eq!(short_name("memcpy"), "memcpy");
    }

    #[test]
    fn crates_of_functions() {
        for (f, k) in [
            (
                "vm_memory::guest_memory::<impl vm_memory::bytes::Bytes<A> for T>::read_slice",
                "vm-memory",
            ),
            (
                "<virtio_queue::chain::DescriptorChain<M> as core::iter::Iterator>::next'2",
                "virtio-queue",
            ),
            (
                "<core::sync::atomic::AtomicI16 as vm_memory::atomic_integer::AtomicInteger>::load",
                "vm-memory",
            ),
            ("alloc::collections::btree::map::BTreeMap<K,V,A>::range", "std"),
            ("vhost_device_iommu::device::dispatch::handle_decoded", "ours"),
            (
                "<vhost_device_iommu::device::backend::IommuBackend as vhost_user_backend::backend::VhostUserBackend>::handle_event",
                "ours",
            ),
            ("__memcpy_avx_unaligned_erms", "libc"),
        ] {
            assert_eq!(crate_of(f), k, "{f}");
        }
    }

    #[test]
    fn callgrind_self_cost_skips_call_costs() {
        let text = "events: Ir\nfn=(1) a\n1 10\n+1 5\ncfn=(2) b\ncalls=1 0\n3 100\nfn=(2)\n4 100\n";
        let p = parse_callgrind(text).unwrap();
        assert_eq!(p.by_fn["a"], 15);
        assert_eq!(p.by_fn["b"], 100);
        assert_eq!(p.total, 115);
    }
}
