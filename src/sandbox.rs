//! The seccomp filter installed once the backend has opened everything it
//! needs (sockets, devices, the iommufd): the serving threads (vhost-user
//! handler, vring workers, control socket) may then make only the system
//! calls below; anything else kills the process (`--seccomp kill`, the
//! default), or with `trap` prints the call's number first, or with `log`
//! is allowed and logged by the kernel, or (`off`) no filter at all.
//! One list for every thread: they share the event loop code, and a filter
//! installed with TSYNC covers the threads made later as well.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
    #[error("seccomp filters are built for x86_64 only")]
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

/// The system calls the serving threads make (x86_64).
#[cfg(target_arch = "x86_64")]
pub fn allowed() -> Vec<libc::c_long> {
    use libc::*;
    vec![
        // I/O on the sockets, eventfds, fault FDs, pipes; vhost-user fds.
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_recvfrom,
        SYS_sendto,
        SYS_accept,
        SYS_accept4,
        SYS_getsockname,
        SYS_getpeername,
        SYS_getsockopt,
        SYS_shutdown,
        SYS_close,
        SYS_fcntl,
        SYS_dup,
        SYS_dup3,
        SYS_lseek,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_ioctl,
        SYS_eventfd2,
        SYS_pipe2,
        SYS_poll,
        SYS_ppoll,
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        // Guest memory (vhost-user memory tables) and the allocator.
        SYS_mmap,
        SYS_munmap,
        SYS_mremap,
        SYS_mprotect,
        SYS_madvise,
        SYS_brk,
        // Threads (each connection's vring workers, control clients).
        SYS_clone,
        SYS_clone3,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_sigaltstack,
        SYS_prctl,
        SYS_sched_getaffinity,
        SYS_sched_yield,
        SYS_futex,
        SYS_exit,
        SYS_exit_group,
        SYS_gettid,
        SYS_getpid,
        SYS_tgkill,
        SYS_rt_sigprocmask,
        SYS_rt_sigaction,
        SYS_rt_sigreturn,
        SYS_restart_syscall,
        // Time and randomness (timeouts, hash maps).
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_getrandom,
    ]
}

#[cfg(not(target_arch = "x86_64"))]
pub fn allowed() -> Vec<libc::c_long> {
    Vec::new()
}

/// The filter for `mode` (None for `off`).
pub fn filter(mode: SeccompMode) -> Result<Option<BpfProgram>, SandboxError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Trap => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    if !cfg!(target_arch = "x86_64") {
        return Err(SandboxError::Arch);
    }
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        allowed().into_iter().map(|n| (n, Vec::new())).collect();
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)?;
    Ok(Some(f.try_into()?))
}

/// Is seccomp filtering there at all? (A kernel built without
/// CONFIG_SECCOMP_FILTER answers EINVAL to PR_GET_SECCOMP... or ENOSYS.)
fn kernel_has_seccomp() -> bool {
    // SAFETY: PR_GET_SECCOMP takes no pointer arguments.
    let rc = unsafe { libc::prctl(libc::PR_GET_SECCOMP) };
    rc >= 0
}

/// Install the filter on every thread of the process (now and later).
/// Ok(false): the kernel has no seccomp; nothing was installed (the caller
/// says so loudly).
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
    Ok(true)
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
        // offset 24 on x86_64 (_sigsys._syscall).
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
}
