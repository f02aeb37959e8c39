// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seccomp filters installed once the backend has opened everything it
//! needs (sockets, devices, the iommufd). Two layers:
//! - the process filter, installed by the main thread on every thread with
//!   TSYNC: the union of what any serving thread needs (the main thread
//!   makes the others, and a thread inherits its maker's filters);
//! - a narrower filter per role, which each serving thread stacks on itself
//!   when it starts serving (the kernel applies both; the stricter wins):
//!   the vring workers, the vhost-user frontend handler, the control socket
//!   listener and its clients. vhost-user-backend starts the workers and the
//!   handler itself, with no hook of ours before they serve, so they are
//!   made from a short-lived thread already narrowed to their role plus
//!   making threads (`on_narrowed_thread`): they inherit that from their
//!   first instruction, and drop the extras at their first event/callback.
//!
//! Arguments are checked where it matters: ioctl only with the requests of
//! `IOCTLS`; mmap and mprotect never with PROT_EXEC; clone only for
//! threads (clone3, whose flags the filter cannot read, answers ENOSYS and
//! glibc falls back to clone); prctl only PR_SET_NAME and
//! PR_SET_NO_NEW_PRIVS; seccomp only to stack a filter on the caller.
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
    /// The listener of a daemon that can take VFIO devices over the control
    /// socket (it has an iommufd): its clients' list is in it.
    ControlListenerVfio,
    /// A control client of such a daemon: also receives the cdev fds
    /// hot-plug sends with its lines, and binds and releases devices on the
    /// host IOMMU (`add_endpoint`, `remove_endpoint`).
    ControlClientVfio,
    /// The short-lived thread that makes a connection's vring workers (the
    /// library starts them, with no hook of ours before their first event):
    /// the worker's list plus what making them takes, so the workers hold
    /// that from their first instruction.
    StartWorkers,
    /// The short-lived thread that accepts the frontend and starts its
    /// handler (same reason): the handler's list plus accept and threads.
    StartHandler,
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod lists {
    use libc::*;

    /// Every thread: the Rust and glibc runtime (allocation, locks, time,
    /// randomness for hash maps, logging to stderr, closing fds, exiting).
    /// mmap and mprotect never with PROT_EXEC (see `rules_for`).
    pub(crate) const RUNTIME: &[c_long] = &[
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
    pub(crate) const EVENTS: &[c_long] = &[
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
    pub(crate) const EVENTS_OLD: &[c_long] = &[SYS_epoll_wait, SYS_poll];
    #[cfg(target_arch = "aarch64")]
    pub(crate) const EVENTS_OLD: &[c_long] = &[];
    /// The host IOMMU: iommufd and VFIO ioctls, only the request numbers of
    /// `super::IOCTLS`.
    pub(crate) const HOST: &[c_long] = &[SYS_ioctl];
    /// The requestq worker reads the host's run queues while it polls
    /// (/proc/loadavg, opened at start-up: `device::poll::RunQueues`), at
    /// most once per `CROWD_CHECK` of polling and per window.
    pub(crate) const POLL_PROBE: &[c_long] = &[SYS_pread64];
    /// vhost-user messages (fds travel with SCM_RIGHTS) and the guest
    /// memory files they carry.
    pub(crate) const VHOST_USER: &[c_long] = &[
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
    pub(crate) const STREAM: &[c_long] = &[
        SYS_read,
        SYS_recvfrom,
        SYS_sendto,
        SYS_shutdown,
        SYS_setsockopt,
    ];
    /// Hot-plug on the control socket: cdev fds arrive with SCM_RIGHTS
    /// (recvmsg), are checked to be character devices (fstat; Rust's
    /// metadata tries statx first) and bound with the host's ioctls.
    pub(crate) const HOTPLUG: &[c_long] = &[SYS_recvmsg, SYS_fstat, SYS_newfstatat, SYS_statx];
    /// Accepting connections (getsockopt: the peer's credentials).
    pub(crate) const ACCEPT: &[c_long] = &[
        SYS_accept,
        SYS_accept4,
        SYS_getsockname,
        SYS_getpeername,
        SYS_getsockopt,
    ];
    /// Starting threads, and what a new thread does before its first line
    /// of ours (glibc registers its robust list and rseq area, Rust names
    /// it): clone only with thread flags, clone3 answered ENOSYS (glibc
    /// then uses clone), prctl only PR_SET_NAME and PR_SET_NO_NEW_PRIVS
    /// (see `rules_for`).
    pub(crate) const THREADS: &[c_long] = &[
        SYS_clone,
        SYS_clone3,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_prctl,
    ];
    /// Setting up a connection's event loops (main thread, and the thread
    /// making the vring workers).
    pub(crate) const SETUP: &[c_long] = &[SYS_eventfd2, SYS_epoll_create1];
    /// Main thread only: the control socket's pipes.
    pub(crate) const SETUP_MAIN: &[c_long] = &[SYS_pipe2];
    /// The fault FDs' io_uring (`--fault-io io-uring`), made before the
    /// filter: any thread that flushes page responses submits to it.
    pub(crate) const IO_URING: &[c_long] = &[SYS_io_uring_enter];
}

/// io_uring_enter is allowed (every role) only when the fault FDs are
/// served through an io_uring.
static IO_URING_ALLOWED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Allow io_uring_enter in the filters built from now on (before `install`).
pub(crate) fn allow_io_uring(on: bool) {
    IO_URING_ALLOWED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The system calls a thread of `role` may make (x86_64 and aarch64; none
/// elsewhere).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) fn allowed_for(role: Role) -> Vec<libc::c_long> {
    allowed_with(
        role,
        IO_URING_ALLOWED.load(std::sync::atomic::Ordering::Relaxed),
    )
}

/// `allowed_for`, with or without the io_uring call.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn allowed_with(role: Role, io_uring: bool) -> Vec<libc::c_long> {
    use lists::*;
    let groups: &[&[libc::c_long]] = match role {
        Role::Process => &[
            RUNTIME, EVENTS, EVENTS_OLD, HOST, VHOST_USER, STREAM, ACCEPT, THREADS, SETUP,
            SETUP_MAIN,
        ],
        Role::Worker => &[RUNTIME, EVENTS, EVENTS_OLD, HOST, POLL_PROBE],
        Role::Frontend => &[RUNTIME, EVENTS, EVENTS_OLD, HOST, VHOST_USER],
        Role::ControlListener => &[RUNTIME, STREAM, ACCEPT, THREADS],
        Role::ControlClient => &[RUNTIME, STREAM],
        Role::ControlListenerVfio => &[RUNTIME, STREAM, ACCEPT, THREADS, HOTPLUG, HOST],
        Role::ControlClientVfio => &[RUNTIME, STREAM, HOTPLUG, HOST],
        Role::StartWorkers => &[
            RUNTIME, EVENTS, EVENTS_OLD, HOST, POLL_PROBE, SETUP, THREADS,
        ],
        Role::StartHandler => &[
            RUNTIME, EVENTS, EVENTS_OLD, HOST, VHOST_USER, ACCEPT, THREADS,
        ],
    };
    let mut v: Vec<libc::c_long> = groups.iter().flat_map(|g| g.iter().copied()).collect();
    if io_uring {
        v.extend_from_slice(IO_URING);
    }
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(crate) fn allowed_for(_role: Role) -> Vec<libc::c_long> {
    Vec::new()
}

/// The process filter's list: what any serving thread may do.
#[cfg(test)]
pub(crate) fn allowed() -> Vec<libc::c_long> {
    allowed_for(Role::Process)
}

/// `_IO(';', nr)`: iommufd and VFIO share the type ';' and use no size or
/// direction bits (VFIO numbers from 100, iommufd from 0x80).
const fn io(nr: u32) -> u32 {
    (b';' as u32) << 8 | nr
}

/// Every ioctl request the daemon issues once the filters are on, and
/// where. VFIO_DEVICE_BIND_IOMMUFD, GET_INFO, GET_REGION_INFO and
/// GET_IRQ_INFO (vfio-ioctls' `VfioDevice::new_from_fd`) at start-up for
/// `--endpoint ID,vfio=`, and on a control client for a hot-plugged cdev.
/// Start-up only (before the filter; not listed): the iommufd capability
/// probes (`Iommufd::features`; their numbers are here anyway,
/// but IOMMU_TEST_CMD's only with `selftest`). No other crate we use
/// issues one on a serving path: vhost, vhost-user-backend, vm-memory and
/// vmm-sys-util's epoll and eventfd make none; env_logger asks whether
/// stderr is a terminal (TCGETS) once, at start-up; nothing sets a socket
/// non-blocking (FIONBIO) after it.
pub(crate) const IOCTLS: &[(u32, &str)] = &[
    // iommufd (`iommufd_bridge::sys`, through iommufd-ioctls or by hand).
    (io(0x80), "IOMMU_DESTROY"),
    (io(0x81), "IOMMU_IOAS_ALLOC"),
    (io(0x83), "IOMMU_IOAS_COPY"),
    (io(0x84), "IOMMU_IOAS_IOVA_RANGES"),
    (io(0x85), "IOMMU_IOAS_MAP"),
    (io(0x86), "IOMMU_IOAS_UNMAP"),
    (io(0x89), "IOMMU_HWPT_ALLOC"),
    (io(0x8a), "IOMMU_GET_HW_INFO"),
    (io(0x8d), "IOMMU_HWPT_INVALIDATE"),
    (io(0x8e), "IOMMU_FAULT_QUEUE_ALLOC"),
    (io(0x8f), "IOMMU_IOAS_MAP_FILE"),
    (io(0x90), "IOMMU_VIOMMU_ALLOC"),
    (io(0x91), "IOMMU_VDEVICE_ALLOC"),
    (io(0x93), "IOMMU_VEVENTQ_ALLOC"),
    // The iommufd selftest's mock devices (`--endpoint ID,selftest`).
    #[cfg(feature = "selftest")]
    (io(0xa0), "IOMMU_TEST_CMD"),
    // VFIO cdevs: binding a hot-plugged one (vfio-ioctls' new_from_fd),
    // attach_hwpt, detach_hwpt and the PASID variants, VfioDevice's drop.
    (io(100 + 7), "VFIO_DEVICE_GET_INFO"),
    (io(100 + 8), "VFIO_DEVICE_GET_REGION_INFO"),
    (io(100 + 9), "VFIO_DEVICE_GET_IRQ_INFO"),
    (io(100 + 18), "VFIO_DEVICE_BIND_IOMMUFD"),
    (io(100 + 19), "VFIO_DEVICE_ATTACH_IOMMUFD_PT"),
    (io(100 + 20), "VFIO_DEVICE_DETACH_IOMMUFD_PT"),
];

fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, SandboxError> {
    Ok(SeccompCondition::new(arg, len, op, value)?)
}

/// ioctl(fd, request, ...): only the requests of `IOCTLS`. The kernel
/// reads the request as 32 bits, and so does the filter.
fn ioctl_rules() -> Result<Vec<SeccompRule>, SandboxError> {
    IOCTLS
        .iter()
        .map(|&(nr, _)| {
            let c = cond(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, nr.into())?;
            Ok(SeccompRule::new(vec![c])?)
        })
        .collect()
}

/// mmap(addr, len, prot, ...) and mprotect(addr, len, prot): never
/// PROT_EXEC (nothing here loads code once serving).
fn no_exec_rule() -> Result<Vec<SeccompRule>, SandboxError> {
    let exec = libc::PROT_EXEC as u64;
    let c = cond(2, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(exec), 0)?;
    Ok(vec![SeccompRule::new(vec![c])?])
}

/// clone(flags, ...) (flags first on x86_64 and aarch64): threads only,
/// glibc's pthread_create flags; a new process (fork) has none of them.
fn thread_clone_rule() -> Result<Vec<SeccompRule>, SandboxError> {
    let thread = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD) as u64;
    let c = cond(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(thread),
        thread,
    )?;
    Ok(vec![SeccompRule::new(vec![c])?])
}

/// prctl: PR_SET_NAME (a new thread names itself) and
/// PR_SET_NO_NEW_PRIVS(1) (seccompiler's, before a thread stacks its
/// filter).
fn prctl_rules() -> Result<Vec<SeccompRule>, SandboxError> {
    // The PR_* options are small positive ints.
    #[allow(clippy::cast_sign_loss)]
    let op = |v: libc::c_int| cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v as u64);
    Ok(vec![
        SeccompRule::new(vec![op(libc::PR_SET_NAME)?])?,
        SeccompRule::new(vec![
            op(libc::PR_SET_NO_NEW_PRIVS)?,
            cond(1, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 1)?,
        ])?,
    ])
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, 0, ...)`: a thread may stack a filter
/// on itself (which can only take calls away), never TSYNC one onto others.
fn narrowing_rule() -> Result<Vec<SeccompRule>, SandboxError> {
    let op = cond(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(libc::SECCOMP_SET_MODE_FILTER),
    )?;
    let flags = cond(1, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0)?;
    Ok(vec![SeccompRule::new(vec![op, flags])?])
}

/// The argument conditions of system call `nr` (empty: any arguments).
fn rules_for(nr: libc::c_long) -> Result<Vec<SeccompRule>, SandboxError> {
    match nr {
        libc::SYS_ioctl => ioctl_rules(),
        libc::SYS_mmap | libc::SYS_mprotect => no_exec_rule(),
        libc::SYS_clone => thread_clone_rule(),
        libc::SYS_prctl => prctl_rules(),
        _ => Ok(Vec::new()),
    }
}

fn action(mode: SeccompMode) -> Option<SeccompAction> {
    match mode {
        SeccompMode::Off => None,
        SeccompMode::Kill => Some(SeccompAction::KillProcess),
        SeccompMode::Trap => Some(SeccompAction::Trap),
        SeccompMode::Log => Some(SeccompAction::Log),
    }
}

/// clone3's number as the filter compares it.
// System call numbers are small (clone3 is 435): it fits a u32.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
const SYS_CLONE3: u32 = libc::SYS_clone3 as u32;

/// clone3 takes its flags in a struct the filter cannot read, so it is
/// answered ENOSYS, as if the kernel were older; glibc (2.34+) then makes
/// the thread with clone, whose flags the filter checks. seccompiler gives
/// one action to every rule, so this goes in front of its program: native
/// architecture and clone3 return ERRNO(ENOSYS); everything else falls
/// through to it (jumps are relative, so its offsets stand).
fn clone3_enosys(arch: u32) -> BpfProgram {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        // seccomp_data.arch
        ins(LD_W_ABS, 0, 0, 4),
        ins(JEQ_K, 0, 3, arch),
        // seccomp_data.nr
        ins(LD_W_ABS, 0, 0, 0),
        ins(JEQ_K, 0, 1, SYS_CLONE3),
        ins(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ]
}

/// AUDIT_ARCH_X86_64 and AUDIT_ARCH_AARCH64 (EM_* | 64-bit | little endian).
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
const AUDIT_ARCH_AARCH64: u32 = 183 | 0x8000_0000 | 0x4000_0000;

/// The filter of `role` for `mode` (None for `off`).
pub(crate) fn filter_for(
    mode: SeccompMode,
    role: Role,
) -> Result<Option<BpfProgram>, SandboxError> {
    let Some(mismatch) = action(mode) else {
        return Ok(None);
    };
    let (arch, audit_arch) = if cfg!(target_arch = "x86_64") {
        (TargetArch::x86_64, AUDIT_ARCH_X86_64)
    } else if cfg!(target_arch = "aarch64") {
        (TargetArch::aarch64, AUDIT_ARCH_AARCH64)
    } else {
        return Err(SandboxError::Arch);
    };
    let list = allowed_for(role);
    let mut rules = BTreeMap::new();
    for &nr in &list {
        // clone3 never reaches seccompiler's program (clone3_enosys).
        if nr != libc::SYS_clone3 {
            rules.insert(nr, rules_for(nr)?);
        }
    }
    if list.contains(&libc::SYS_clone) {
        // The threads these make narrow themselves once they start.
        rules.insert(libc::SYS_seccomp, narrowing_rule()?);
    }
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?;
    let prog: BpfProgram = f.try_into()?;
    if list.contains(&libc::SYS_clone3) {
        let mut with_prefix = clone3_enosys(audit_arch);
        with_prefix.extend(prog);
        return Ok(Some(with_prefix));
    }
    Ok(Some(prog))
}

/// The process filter for `mode` (None for `off`).
pub(crate) fn filter(mode: SeccompMode) -> Result<Option<BpfProgram>, SandboxError> {
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
    settle_threads();
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
pub(crate) fn narrow_or_warn(role: Role) {
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

/// Run `make` on a short-lived thread named `name` that first stacks the
/// filter of `role` on itself, and wait for it: the threads `make` starts
/// inherit that filter from their first instruction. For threads a library
/// starts and runs (vhost-user-backend's vring workers and frontend
/// handler), with no hook of ours before their first message or event.
pub(crate) fn on_narrowed_thread<T: Send>(
    name: &str,
    role: Role,
    make: impl FnOnce() -> T + Send,
) -> std::io::Result<T> {
    std::thread::scope(|s| {
        let t = std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(s, || {
                narrow_or_warn(role);
                make()
            })?;
        Ok(t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
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

/// glibc's first pthread_create, while the process is single-threaded,
/// installs its SIGCANCEL and SIGSETXID handlers (rt_sigaction): one
/// thread made and joined before the filter means no thread made after it
/// needs rt_sigaction.
fn settle_threads() {
    if let Err(e) = std::thread::Builder::new().spawn(|| ()).map(|t| t.join()) {
        log::warn!("seccomp: no thread before the filter: {e}");
    }
}

/// With `trap`: a SIGSYS handler that names the refused call, then exits.
fn trap_reporter() {
    extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // siginfo_t for SIGSYS: the system call number is the int at
        // offset 24 on x86_64 and aarch64 (_sigsys._syscall).
        // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO.
        let nr = unsafe { *info.cast_const().cast::<u8>().add(24).cast::<i32>() };
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
// Test code with known small values.
#[allow(clippy::cast_possible_truncation)]
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
            Role::ControlListenerVfio,
            Role::ControlClientVfio,
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
        for r in [
            Role::Worker,
            Role::Frontend,
            Role::ControlClient,
            Role::ControlClientVfio,
        ] {
            for n in [SYS_clone, SYS_clone3, SYS_accept4, SYS_prctl] {
                assert!(!has(r, n), "{r:?} {n}");
            }
        }
        // Control clients set their own read and write timeouts.
        assert!(has(Role::ControlClient, SYS_setsockopt));
        // The listener reads its clients' peer credentials.
        assert!(has(Role::ControlListener, SYS_getsockopt));
        // Only the vhost-user handler receives fds, and the control clients
        // of a daemon that takes VFIO devices over the control socket.
        assert!(has(Role::Frontend, SYS_recvmsg) && !has(Role::Worker, SYS_recvmsg));
        assert!(!has(Role::ControlClient, SYS_recvmsg));
        // The control socket never touches the host IOMMU, unless it can
        // hot-plug VFIO devices.
        assert!(!has(Role::ControlClient, SYS_ioctl) && !has(Role::ControlListener, SYS_ioctl));
        assert!(has(Role::Worker, SYS_ioctl) && has(Role::Frontend, SYS_ioctl));
        assert!(
            has(Role::ControlClientVfio, SYS_recvmsg) && has(Role::ControlClientVfio, SYS_statx)
        );
        assert!(has(Role::ControlClientVfio, SYS_ioctl));
        let subset = |a: Role, b: Role| allowed_for(a).iter().all(|n| has(b, *n));
        assert!(subset(Role::ControlClient, Role::ControlClientVfio));
        assert!(subset(Role::ControlClientVfio, Role::ControlListenerVfio));
        assert!(subset(Role::ControlListener, Role::ControlListenerVfio));
        // Even then: no sending fds, no memory files, no threads.
        for n in [SYS_sendmsg, SYS_dup, SYS_lseek, SYS_pread64, SYS_clone] {
            assert!(!has(Role::ControlClientVfio, n), "{n}");
        }
        // The threads that make the library's threads: their role's list,
        // plus only what making them takes; never the other roles' calls.
        assert!(subset(Role::Worker, Role::StartWorkers));
        assert!(subset(Role::Frontend, Role::StartHandler));
        for r in [Role::StartWorkers, Role::StartHandler] {
            assert!(subset(r, Role::Process) && allowed_for(r).len() < process.len());
            assert!(has(r, SYS_clone) && !has(r, SYS_recvfrom) && !has(r, SYS_pipe2));
        }
        assert!(!has(Role::StartWorkers, SYS_recvmsg) && !has(Role::StartWorkers, SYS_accept4));
        assert!(!has(Role::StartHandler, SYS_eventfd2) && has(Role::StartHandler, SYS_accept4));
        // io_uring only with --fault-io io-uring, then for every role (any
        // thread that flushes page responses submits them); never setup or
        // register (the ring is made before the filter).
        for r in [
            Role::Process,
            Role::Worker,
            Role::Frontend,
            Role::ControlListener,
            Role::ControlClient,
            Role::StartWorkers,
            Role::StartHandler,
        ] {
            assert!(
                !allowed_with(r, false).contains(&SYS_io_uring_enter),
                "{r:?}"
            );
            let with = allowed_with(r, true);
            assert!(with.contains(&SYS_io_uring_enter), "{r:?}");
            assert!(!with.contains(&SYS_io_uring_setup) && !with.contains(&SYS_io_uring_register));
        }
        // What the single list allowed before the roles, the process still does.
        for n in [
            SYS_read,
            SYS_write,
            SYS_recvmsg,
            SYS_sendmsg,
            SYS_accept4,
            SYS_ioctl,
            SYS_eventfd2,
            SYS_mmap,
            SYS_clone3,
            SYS_futex,
            SYS_getrandom,
            SYS_statx,
        ] {
            assert!(process.contains(&n), "{n}");
        }
        // aarch64 has only epoll_pwait (listed in calls::EVENTS).
        #[cfg(target_arch = "x86_64")]
        assert!(process.contains(&SYS_epoll_wait), "{SYS_epoll_wait}");
    }

    #[test]
    fn the_ioctl_list_has_every_request_the_bridge_issues() {
        use crate::iommufd_bridge::sys;
        let listed = |nr: libc::c_ulong| IOCTLS.iter().any(|&(n, _)| libc::c_ulong::from(n) == nr);
        // Issued by hand in iommufd_bridge::sys.
        assert!(listed(sys::IOMMU_IOAS_COPY()));
        assert!(listed(sys::IOMMU_IOAS_IOVA_RANGES()));
        assert!(listed(sys::IOMMU_FAULT_QUEUE_ALLOC()));
        // The capability probes (Iommufd::features).
        for nr in [0x8d, 0x8e, 0x8f, 0x90, 0x93] {
            assert!(listed(0x3b00 | nr), "{nr:#x}");
        }
        // The kernel's numbers: IOMMU_DESTROY, VFIO_DEVICE_ATTACH_IOMMUFD_PT.
        assert!(listed(0x3b80) && listed(0x3b77) && listed(0x3b78));
        // Binding a hot-plugged cdev: VFIO_DEVICE_BIND_IOMMUFD, GET_INFO,
        // GET_REGION_INFO, GET_IRQ_INFO.
        assert!(listed(0x3b76) && listed(0x3b6b) && listed(0x3b6c) && listed(0x3b6d));
    }

    #[test]
    fn clone3_is_answered_enosys_before_the_rest() {
        let prog = filter_for(SeccompMode::Kill, Role::Process)
            .unwrap()
            .unwrap();
        assert_eq!(prog[3].k, SYS_CLONE3);
        assert_eq!(prog[4].k, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
        // Roles that make no threads kill it like any unlisted call.
        let worker = filter_for(SeccompMode::Kill, Role::Worker)
            .unwrap()
            .unwrap();
        assert_ne!(worker[..5], prog[..5]);
    }
}
