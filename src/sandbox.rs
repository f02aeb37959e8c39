//! The seccomp filters installed once the backend has opened everything it
//! needs (sockets, devices, the iommufd). Two layers:
//! - the process filter, installed by the main thread on every thread with
//!   TSYNC: the union of what any serving thread needs (the main thread
//!   makes the others, and a thread inherits its maker's filters);
//! - a narrower filter per role, which each serving thread stacks on itself
//!   when it starts serving (the kernel applies both; the stricter wins):
//!   the vring workers, the vhost-user frontend handler, the control socket
//!   listener and its clients.
//!
//! A system call outside a thread's lists kills the process (`--seccomp
//! kill`, the default), or with `trap` prints its number first, or with
//! `log` is allowed and logged by the kernel, or (`off`) no filter at all.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
    #[error("seccomp filters are built for x86_64 and aarch64 only")]
    Arch,
}

/// What a system call outside the list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Kill the process.
    Kill,
    /// Print the system call's number on stderr, then kill the process.
    Trap,
    /// Allow it, and let the kernel log it (audit).
    Log,
    /// No filter.
    Off,
}

/// A serving thread's role: what it may do beyond the common runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The main thread: the union of every role, plus setting up each
    /// connection (epoll sets, eventfds, accept, the threads).
    Process,
    /// A vring worker: its epoll set, the queues' eventfds, the fault FDs,
    /// iommufd ioctls for requests.
    Worker,
    /// The vhost-user frontend handler: messages with fds, memory tables
    /// (mmap, iommufd ioctls mapping guest RAM), kick fds into the epolls.
    Frontend,
    /// The control socket's listener: accepts and starts client threads
    /// (which inherit its filter, so it includes theirs).
    ControlListener,
    /// A control client: reads lines and writes replies; `dma` writes the
    /// virtual fault pipe and waits.
    ControlClient,
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod lists {
    use libc::*;

    /// Every thread: the Rust and glibc runtime (allocation, locks, time,
    /// randomness for hash maps, logging to stderr, closing fds, exiting).
    pub const RUNTIME: &[c_long] = &[
        SYS_write,
        SYS_close,
        SYS_fcntl,
        SYS_mmap,
        SYS_munmap,
        SYS_mremap,
        SYS_mprotect,
        SYS_madvise,
        SYS_brk,
        SYS_futex,
        SYS_sched_getaffinity,
        SYS_sched_yield,
        SYS_sigaltstack,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_restart_syscall,
        SYS_gettid,
        SYS_getpid,
        SYS_tgkill,
        SYS_exit,
        SYS_exit_group,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_getrandom,
    ];
    /// Event loops: epoll sets, eventfds, the fault FDs, the vEVENTQ.
    pub const EVENTS: &[c_long] = &[
        SYS_read,
        SYS_readv,
        SYS_writev,
        SYS_epoll_ctl,
        SYS_epoll_pwait,
        SYS_ppoll,
        // The page-response timer (fault_queue::timer), armed by the eventq
        // worker.
        SYS_timerfd_settime,
    ];
    /// The same, where the architecture still has the old calls (aarch64
    /// has only the p-variants, which its libc uses).
    #[cfg(target_arch = "x86_64")]
    pub const EVENTS_OLD: &[c_long] = &[SYS_epoll_wait, SYS_poll];
    #[cfg(target_arch = "aarch64")]
    pub const EVENTS_OLD: &[c_long] = &[];
    /// The host IOMMU: iommufd and VFIO ioctls.
    pub const HOST: &[c_long] = &[SYS_ioctl];
    /// vhost-user messages (fds travel with SCM_RIGHTS) and the guest
    /// memory files they carry.
    pub const VHOST_USER: &[c_long] = &[
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_shutdown,
        SYS_dup,
        SYS_dup3,
        SYS_lseek,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_pread64,
        SYS_pwrite64,
    ];
    /// Stream sockets without fds (the control socket's clients), with
    /// their read and write timeouts (setsockopt).
    pub const STREAM: &[c_long] = &[
        SYS_read,
        SYS_recvfrom,
        SYS_sendto,
        SYS_shutdown,
        SYS_setsockopt,
    ];
    /// Accepting connections (getsockopt: the peer's credentials) and
    /// starting threads for them.
    pub const SPAWN: &[c_long] = &[
        SYS_accept,
        SYS_accept4,
        SYS_getsockname,
        SYS_getpeername,
        SYS_getsockopt,
        SYS_clone,
        SYS_clone3,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_prctl,
        SYS_rt_sigaction,
    ];
    /// Setting up a connection's event loops (main thread).
    pub const SETUP: &[c_long] = &[SYS_eventfd2, SYS_pipe2, SYS_epoll_create1];
}

/// The system calls a thread of `role` may make (x86_64 and aarch64; none
/// elsewhere).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub fn allowed_for(role: Role) -> Vec<libc::c_long> {
    use lists::*;
    let groups: &[&[libc::c_long]] = match role {
        Role::Process => &[
            RUNTIME, EVENTS, EVENTS_OLD, HOST, VHOST_USER, STREAM, SPAWN, SETUP,
        ],
        Role::Worker => &[RUNTIME, EVENTS, EVENTS_OLD, HOST],
        Role::Frontend => &[RUNTIME, EVENTS, EVENTS_OLD, HOST, VHOST_USER],
        Role::ControlListener => &[RUNTIME, STREAM, SPAWN],
        Role::ControlClient => &[RUNTIME, STREAM],
    };
    let mut v: Vec<libc::c_long> = groups.iter().flat_map(|g| g.iter().copied()).collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn allowed_for(_role: Role) -> Vec<libc::c_long> {
    Vec::new()
}

/// The process filter's list: what any serving thread may do.
pub fn allowed() -> Vec<libc::c_long> {
    allowed_for(Role::Process)
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, 0, ...)`: a thread may stack a filter
/// on itself (which can only take calls away), never TSYNC one onto others.
fn narrowing_rule() -> Result<Vec<SeccompRule>, SandboxError> {
    let op = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::SECCOMP_SET_MODE_FILTER as u64,
    )?;
    let flags = SeccompCondition::new(1, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0)?;
    Ok(vec![SeccompRule::new(vec![op, flags])?])
}

fn action(mode: SeccompMode) -> Option<SeccompAction> {
    match mode {
        SeccompMode::Off => None,
        SeccompMode::Kill => Some(SeccompAction::KillProcess),
        SeccompMode::Trap => Some(SeccompAction::Trap),
        SeccompMode::Log => Some(SeccompAction::Log),
    }
}

/// The filter of `role` for `mode` (None for `off`).
pub fn filter_for(mode: SeccompMode, role: Role) -> Result<Option<BpfProgram>, SandboxError> {
    let Some(mismatch) = action(mode) else {
        return Ok(None);
    };
    let arch = if cfg!(target_arch = "x86_64") {
        TargetArch::x86_64
    } else if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        return Err(SandboxError::Arch);
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_for(role)
        .into_iter()
        .map(|n| (n, Vec::new()))
        .collect();
    if matches!(role, Role::Process | Role::ControlListener) {
        // The threads these make narrow themselves once they start.
        rules.insert(libc::SYS_seccomp, narrowing_rule()?);
    }
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?;
    Ok(Some(f.try_into()?))
}

/// The process filter for `mode` (None for `off`).
pub fn filter(mode: SeccompMode) -> Result<Option<BpfProgram>, SandboxError> {
    filter_for(mode, Role::Process)
}

/// Is seccomp filtering there at all? (A kernel built without
/// CONFIG_SECCOMP_FILTER answers EINVAL to PR_GET_SECCOMP... or ENOSYS.)
fn kernel_has_seccomp() -> bool {
    // SAFETY: PR_GET_SECCOMP takes no pointer arguments.
    let rc = unsafe { libc::prctl(libc::PR_GET_SECCOMP) };
    rc >= 0
}

/// The mode of the installed process filter; unset while none is.
static INSTALLED: OnceLock<SeccompMode> = OnceLock::new();

/// Install the process filter on every thread of the process (now and
/// later). Ok(false): the kernel has no seccomp, or `off`; nothing was
/// installed (the caller says so loudly). Call once, before any thread
/// narrows itself (TSYNC fails on a thread whose filters differ).
pub fn install(mode: SeccompMode) -> Result<bool, SandboxError> {
    let Some(prog) = filter(mode)? else {
        return Ok(false);
    };
    if !kernel_has_seccomp() {
        return Ok(false);
    }
    if mode == SeccompMode::Trap {
        trap_reporter();
    }
    settle_allocator();
    seccompiler::apply_filter_all_threads(&prog)?;
    let _ = INSTALLED.set(mode);
    Ok(true)
}

thread_local! {
    static NARROWED: Cell<bool> = const { Cell::new(false) };
}

/// Stack the filter of `role` on the calling thread, once per thread, if
/// the process filter is installed; a no-op otherwise (`off`, tests, no
/// seccomp). Ok(true) when this call installed it.
pub fn narrow(role: Role) -> Result<bool, SandboxError> {
    let Some(&mode) = INSTALLED.get() else {
        return Ok(false);
    };
    if NARROWED.with(|n| n.replace(true)) {
        return Ok(false);
    }
    if let Some(prog) = filter_for(mode, role)? {
        seccompiler::apply_filter(&prog)?;
    }
    Ok(true)
}

/// `narrow`, for threads that serve whatever happens: a failure is logged
/// (the process filter still holds).
pub fn narrow_or_warn(role: Role) {
    match narrow(role) {
        Ok(true) => log::debug!("seccomp: {role:?} filter on this thread"),
        Ok(false) => {}
        // Once per thread, but control clients come and go: rate-limited.
        Err(e) => crate::log_limit::limited!(
            log::Level::Warn,
            "seccomp: {role:?} filter not installed: {e}"
        ),
    }
}

/// glibc's malloc reads /sys/devices/system/cpu/online (openat) the first
/// time a thread needs a new arena, to cap their number; a fixed cap (its
/// own default, 8 per CPU) means it never has to.
fn settle_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let max = libc::c_int::try_from(8 * cpus).unwrap_or(64);
        // SAFETY: mallopt only sets an allocator parameter.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, max) };
    }
}

/// With `trap`: a SIGSYS handler that names the refused call, then exits.
fn trap_reporter() {
    extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // siginfo_t for SIGSYS: the system call number is the int at
        // offset 24 on x86_64 and aarch64 (_sigsys._syscall).
        // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO.
        let nr = unsafe { *((info as *const u8).add(24) as *const i32) };
        let prefix = b"vhost-device-iommu: seccomp: refused system call ";
        let mut digits = [0u8; 12];
        let mut n = nr.unsigned_abs();
        let mut i = digits.len() - 1;
        digits[i] = b'\n';
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 || i == 0 {
                break;
            }
        }
        // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffers
        // are ours.
        unsafe {
            libc::write(2, prefix.as_ptr().cast(), prefix.len());
            libc::write(2, digits[i..].as_ptr().cast(), digits.len() - i);
            libc::_exit(128 + libc::SIGSYS);
        }
    }
    // SAFETY: installs a handler for SIGSYS only; `sa` is fully initialised.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_build_for_every_mode() {
        for m in [SeccompMode::Kill, SeccompMode::Trap, SeccompMode::Log] {
            assert!(filter(m).unwrap().is_some());
        }
        assert!(filter(SeccompMode::Off).unwrap().is_none());
        let a = allowed();
        assert!(a.contains(&libc::SYS_ioctl) && !a.contains(&libc::SYS_openat));
        assert!(!a.contains(&libc::SYS_execve) && !a.contains(&libc::SYS_socket));
    }

    #[test]
    fn roles_are_narrower_than_the_process() {
        use libc::*;
        let process = allowed();
        let roles = [
            Role::Worker,
            Role::Frontend,
            Role::ControlListener,
            Role::ControlClient,
        ];
        for role in roles {
            let list = allowed_for(role);
            assert!(list.iter().all(|n| process.contains(n)), "{role:?}");
            assert!(list.len() < process.len(), "{role:?}");
            assert!(filter_for(SeccompMode::Kill, role).unwrap().is_some());
            // Only the main thread sets connections up.
            for n in [SYS_eventfd2, SYS_epoll_create1, SYS_pipe2] {
                assert!(!list.contains(&n), "{role:?} {n}");
            }
        }
        let has = |r, n| allowed_for(r).contains(&n);
        // Guest-facing threads cannot start threads or accept connections.
        for r in [Role::Worker, Role::Frontend, Role::ControlClient] {
            for n in [SYS_clone, SYS_clone3, SYS_accept4, SYS_prctl] {
                assert!(!has(r, n), "{r:?} {n}");
            }
        }
        // Control clients set their own read and write timeouts.
        assert!(has(Role::ControlClient, SYS_setsockopt));
        // The listener reads its clients' peer credentials.
        assert!(has(Role::ControlListener, SYS_getsockopt));
        // Only the vhost-user handler receives fds.
        assert!(has(Role::Frontend, SYS_recvmsg) && !has(Role::Worker, SYS_recvmsg));
        assert!(!has(Role::ControlClient, SYS_recvmsg));
        // The control socket never touches the host IOMMU.
        assert!(!has(Role::ControlClient, SYS_ioctl) && !has(Role::ControlListener, SYS_ioctl));
        assert!(has(Role::Worker, SYS_ioctl) && has(Role::Frontend, SYS_ioctl));
        // What the single list allowed before the roles, the process still does.
        for n in [
            SYS_read,
            SYS_write,
            SYS_recvmsg,
            SYS_sendmsg,
            SYS_accept4,
            SYS_ioctl,
            SYS_eventfd2,
            SYS_epoll_wait,
            SYS_mmap,
            SYS_clone3,
            SYS_futex,
            SYS_getrandom,
            SYS_statx,
        ] {
            assert!(process.contains(&n), "{n}");
        }
    }
}
