//! The serving loop: one frontend at a time, a fresh device for each.

use std::os::fd::FromRawFd;
use std::sync::Arc;

use log::{error, info};
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use std::os::fd::AsRawFd;

use crate::args::{Options, SocketSpec};
use crate::control;
use crate::device::backend::{IommuBackend, EVENTQ, EVENTS_PENDING};

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
        source: std::io::Error,
    },
    #[error("cannot create the device: {0}")]
    Backend(std::io::Error),
    // vhost_user_backend::Error implements Display only, so no #[from].
    #[error("vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("cannot watch the event records: {0}")]
    Register(std::io::Error),
}

impl From<vhost_user_backend::Error> for ServerError {
    fn from(e: vhost_user_backend::Error) -> Self {
        ServerError::Daemon(e)
    }
}

pub fn run(opts: Options) -> Result<(), ServerError> {
    let mut listener = match &opts.socket {
        SocketSpec::Path(p) => Listener::new(p, true).map_err(|source| ServerError::Listen {
            path: p.display().to_string(),
            source,
        })?,
        // SAFETY: the operator hands us this fd as a listening unix socket
        // (systemd socket activation, or a VMM that created it); we own it
        // from here on.
        SocketSpec::Fd(fd) => unsafe { Listener::from_raw_fd(*fd) },
    };
    let backend = Arc::new(
        IommuBackend::new(
            opts.config,
            opts.limits,
            &opts.endpoints,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(ServerError::Backend)?,
    );
    if let Some(path) = &opts.control_socket {
        control::spawn(path, backend.clone()).map_err(|source| ServerError::Control {
            path: path.display().to_string(),
            source,
        })?;
    }
    info!(
        "serving virtio-iommu with {} virtual endpoint(s)",
        opts.endpoints.len()
    );
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        backend.begin_session(mem.clone());
        let mut daemon = VhostUserDaemon::new("viommu-vhost".into(), backend.clone(), mem)?;
        daemon.get_epoll_handlers()[EVENTQ as usize]
            .register_listener(
                backend.events.notify_fd().as_raw_fd(),
                EventSet::IN,
                EVENTS_PENDING,
            )
            .map_err(ServerError::Register)?;
        daemon.start(&mut listener)?;
        info!("frontend connected");
        let result = daemon.wait();
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        backend.end_session();
        match result {
            Ok(()) => info!("frontend disconnected; waiting for the next one"),
            Err(e) => error!("connection ended: {e}; waiting for the next frontend"),
        }
    }
}
