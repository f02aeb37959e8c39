// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The serving loop: one frontend at a time, a fresh device for each.

use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use log::{info, warn, Level};
use thiserror::Error;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::args::{EndpointKind, IommufdSpec, Options, SocketSpec};
use crate::control;
use crate::device::backend::{
    epoll_data, IommuBackend, EVENTQ, EVENTS_PENDING, FAULT_RING, FRONTEND_THREAD, PAGE_TIMER,
    VIRTUAL_FAULTS,
};
use crate::iommufd_bridge::host::{HostDevice, IommufdHost};
use crate::iommufd_bridge::ids::IoasId;
use crate::iommufd_bridge::sys::Iommufd;
use crate::iommufd_bridge::vfio::{VfioCdev, VfioSource};
use crate::iommufd_bridge::{BridgeError, HostIommu};
use crate::log_limit::limited;
use crate::sandbox::{on_narrowed_thread, Role};

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        source: vhost::vhost_user::Error,
    },
    #[error("control socket {path}: {source}")]
    Control {
        path: String,
        source: control::ControlError,
    },
    #[error("cannot start the control socket's thread: {0}")]
    ControlThread(std::io::Error),
    #[error("{0}")]
    Args(#[from] crate::args::ArgsError),
    #[error("--socket-fd {fd} is not a listening unix socket: {reason}")]
    BadSocketFd { fd: i32, reason: String },
    #[error("cannot create the device: {0}")]
    Backend(std::io::Error),
    // vhost_user_backend::Error implements Display only, so no #[from].
    #[error("vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("cannot watch the event records: {0}")]
    Register(std::io::Error),
    #[error("--fault-io io-uring: {0}")]
    FaultIo(crate::fault_queue::uring::RingError),
    #[error("iommufd: {0}")]
    Iommufd(#[from] crate::iommufd_bridge::sys::SysError),
    #[error("iommufd: {0}")]
    Host(#[from] BridgeError),
    #[error("endpoint {id:#x}: {source}")]
    Endpoint { id: u32, source: BridgeError },
    #[error("{0}")]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("--test-fault-socket {path}: {source}")]
    TestFaultSocket {
        path: String,
        source: std::io::Error,
    },
}

/// The host IOMMU for the endpoints that are not virtual, if any.
fn open_host(opts: &Options) -> Result<Option<Box<dyn HostIommu>>, ServerError> {
    if let Some(path) = &opts.test_fault_socket {
        // Args allow it with virtual endpoints only.
        let bad = |e: std::io::Error| ServerError::TestFaultSocket {
            path: path.display().to_string(),
            source: e,
        };
        let s = std::os::unix::net::UnixStream::connect(path).map_err(bad)?;
        // The kernel's fault FD never blocks a read.
        s.set_nonblocking(true).map_err(bad)?;
        let file = std::fs::File::from(std::os::fd::OwnedFd::from(s));
        warn!(
            "--test-fault-socket {}: a test-only fault source",
            path.display()
        );
        return Ok(Some(Box::new(
            crate::iommufd_bridge::software::SoftwareIommu::with_test_fault_socket(file),
        )));
    }
    if !opts.vfio_hotplug
        && opts
            .endpoints
            .iter()
            .all(|e| e.kind == EndpointKind::Virtual)
    {
        return Ok(None);
    }
    let fd = match &opts.iommufd {
        IommufdSpec::Path(p) => Iommufd::open(p)?,
        IommufdSpec::Fd(fd) => {
            // SAFETY: the operator handed this fd over to us to own; `run`
            // checked it is open before opening anything itself, and args
            // that it is not 0-2 and that no other option names it.
            Iommufd::from_file(unsafe { std::fs::File::from_raw_fd(*fd) })
        }
    };
    let bypass = opts.config.boot_bypass;
    #[cfg(feature = "selftest")]
    if opts
        .endpoints
        .iter()
        .any(|e| e.kind == EndpointKind::Selftest)
    {
        use crate::iommufd_bridge::selftest::SelftestDevice;
        let host = add_endpoints(IommufdHost::new(fd, bypass)?, opts, |fd, e, pt| match e {
            EndpointKind::Selftest => SelftestDevice::create(fd, pt),
            _ => unreachable!("mixing is refused by args"),
        })?;
        return Ok(Some(Box::new(host)));
    }
    let host = add_endpoints(IommufdHost::new(fd, bypass)?, opts, |fd, e, _pt| match e {
        EndpointKind::Vfio(src) => VfioCdev::open(fd, src, opts.bind_wait),
        _ => unreachable!("only VFIO endpoints reach here"),
    })?;
    Ok(Some(Box::new(host)))
}

fn add_endpoints<D: HostDevice>(
    mut host: IommufdHost<D>,
    opts: &Options,
    make: impl Fn(&Iommufd, &EndpointKind, IoasId) -> Result<D, BridgeError>,
) -> Result<IommufdHost<D>, ServerError> {
    for e in opts
        .endpoints
        .iter()
        .filter(|e| e.kind != EndpointKind::Virtual)
    {
        host.add_endpoint(e.id, |fd, pt| make(fd, &e.kind, pt))
            .map_err(|source| ServerError::Endpoint { id: e.id, source })?;
        info!("endpoint {:#x}: {:?} bound", e.id, e.kind);
    }
    Ok(host)
}

impl From<vhost_user_backend::Error> for ServerError {
    fn from(e: vhost_user_backend::Error) -> Self {
        ServerError::Daemon(e)
    }
}

/// Take ownership of an inherited listening unix socket, checking it is one.
fn listener_from_fd(fd: i32) -> Result<Listener, ServerError> {
    let bad = |reason: String| ServerError::BadSocketFd { fd, reason };
    let mut accepting: libc::c_int = 0;
    // A c_int's size (4) fits socklen_t.
    #[allow(clippy::cast_possible_truncation)]
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`, a
    // c_int we own; an fd that is not a socket only makes it fail.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(bad(std::io::Error::last_os_error().to_string()));
    }
    if accepting == 0 {
        return Err(bad("it is not listening".into()));
    }
    // SAFETY: fd is an open, listening socket handed to us by the operator
    // (systemd socket activation, or the VMM); from here on we own it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    if let Err(e) = listener.local_addr() {
        // Not AF_UNIX: give the fd back untouched rather than closing it.
        std::mem::forget(listener);
        return Err(bad(e.to_string()));
    }
    Ok(Listener::from(listener))
}

/// The vhost-user listening socket: created at its path, or inherited.
fn listen(socket: &SocketSpec) -> Result<Listener, ServerError> {
    match socket {
        SocketSpec::Path(p) => Listener::new(p, true).map_err(|source| ServerError::Listen {
            path: p.display().to_string(),
            source,
        }),
        SocketSpec::Fd(fd) => listener_from_fd(*fd),
    }
}

pub fn run(opts: Options) -> Result<(), ServerError> {
    // Before this process opens anything: a closed fd number must not be
    // taken by a file of ours and then adopted as the operator's.
    opts.check_inherited_fds_open()?;
    // A VMM that binds a `vfio-bound-fd` cdev connects to us before it
    // binds (QEMU creates its chardevs before it realizes any device), and
    // we wait for that bind: there the socket must exist first. Everywhere
    // else host endpoints and the control socket come first: one that
    // cannot be opened fails before the socket appears, so a frontend
    // never connects to a dying backend.
    let vmm_binds = opts
        .endpoints
        .iter()
        .any(|e| matches!(e.kind, EndpointKind::Vfio(VfioSource::BoundFd(_))));
    let mut early = if vmm_binds {
        Some(listen(&opts.socket)?)
    } else {
        None
    };
    let host = open_host(&opts)?;
    let control = match &opts.control_socket {
        Some(path) => Some(control::bind(path, opts.control_group).map_err(|source| {
            ServerError::Control {
                path: path.display().to_string(),
                source,
            }
        })?),
        None => None,
    };
    let mut listener = match early.take() {
        Some(l) => l,
        None => listen(&opts.socket)?,
    };
    let mut backend = IommuBackend::new(
        opts.config,
        opts.limits,
        &opts.endpoint_ids(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(ServerError::Backend)?
    .with_poll(opts.poll, opts.poll_gate);
    if let Some(host) = host {
        backend = backend.with_host(host);
    }
    let (backend, fault_io, why) = backend
        .with_fault_io(opts.fault_io)
        .map_err(ServerError::FaultIo)?;
    match why {
        Some(why) => warn!(
            "fault I/O: {} (--fault-io {}: io_uring unavailable: {why})",
            fault_io.name(),
            opts.fault_io.name()
        ),
        None => info!(
            "fault I/O: {} (--fault-io {})",
            fault_io.name(),
            opts.fault_io.name()
        ),
    }
    crate::sandbox::allow_io_uring(fault_io == crate::fault_queue::uring::FaultIo::IoUring);
    let backend = Arc::new(backend);
    let virtual_count = opts
        .endpoints
        .iter()
        .filter(|e| e.kind == EndpointKind::Virtual)
        .count();
    info!(
        "serving virtio-iommu with {virtual_count} virtual and {} host endpoint(s)",
        opts.endpoints.len() - virtual_count
    );
    // Everything is open: from here on the serving threads need only the
    // system calls of crate::sandbox.
    match crate::sandbox::install(opts.seccomp)? {
        true => info!("seccomp filter: {:?}", opts.seccomp),
        false if opts.seccomp == crate::sandbox::SeccompMode::Off => {
            warn!("seccomp filter: off (--seccomp off)")
        }
        false => warn!("seccomp filter: NOT INSTALLED: this kernel has no seccomp"),
    }
    if let Some(listener) = control {
        control::spawn(listener, backend.clone(), opts.control_limits)
            .map_err(ServerError::ControlThread)?;
    }
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        backend.begin_session(mem.clone());
        // The library starts the vring workers here and the frontend
        // handler in `start`, and runs them; each is made from a thread
        // already narrowed to its role (plus making threads), so they never
        // serve under the whole process list.
        let mut daemon = on_narrowed_thread("viommu-mkworker", Role::StartWorkers, || {
            VhostUserDaemon::new(FRONTEND_THREAD.into(), backend.clone(), mem)
        })
        .map_err(ServerError::Thread)??;
        daemon.get_epoll_handlers()[EVENTQ as usize]
            .register_listener(
                backend.relay.notify_fd().as_raw_fd(),
                EventSet::IN,
                EVENTS_PENDING,
            )
            .map_err(ServerError::Register)?;
        // The fault FDs: read through the ring, whose FD is polled, or
        // each polled itself.
        let (fd, data) = match backend.relay.ring_fd() {
            Some(ring) => (ring, FAULT_RING),
            None => (backend.relay.virtual_source().fd(), VIRTUAL_FAULTS),
        };
        daemon.get_epoll_handlers()[EVENTQ as usize]
            .register_listener(fd, EventSet::IN, data)
            .map_err(ServerError::Register)?;
        // The eventq worker posts the ring's reads at its first pass.
        backend.relay.kick();
        daemon.get_epoll_handlers()[EVENTQ as usize]
            .register_listener(backend.relay.timer_fd(), EventSet::IN, PAGE_TIMER)
            .map_err(ServerError::Register)?;
        let eventq = daemon.get_epoll_handlers()[EVENTQ as usize].clone();
        backend
            .relay
            .set_registrar(Some(Box::new(move |fd, what, watch| {
                let data = epoll_data(what);
                if watch {
                    eventq.register_listener(fd, EventSet::IN, data)
                } else {
                    eventq.unregister_listener(fd, EventSet::IN, data)
                }
            })));
        on_narrowed_thread("viommu-accept", Role::StartHandler, || {
            daemon.start(&mut listener)
        })
        .map_err(ServerError::Thread)??;
        backend.session().stats.device.frontend_connections += 1;
        // A frontend can reconnect in a loop: these lines are rate-limited.
        limited!(Level::Info, "frontend connected");
        let result = daemon.wait();
        // Dropping the daemon stops and joins its vring workers, so none of
        // them touches the next guest's session.
        drop(daemon);
        backend.end_session();
        match result {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => limited!(
                Level::Info,
                "frontend disconnected; waiting for the next one"
            ),
            Err(e) => limited!(
                Level::Error,
                "connection ended: {e}; waiting for the next frontend"
            ),
        }
    }
}
