// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket (spec-notes/protocol.md 8): JSON lines that make a
//! virtual endpoint issue DMA through the software IOMMU, and report stats.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::mem::{size_of, size_of_val};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, warn, Level};
use thiserror::Error;

use crate::device::backend::IommuBackend;
use crate::log_limit::limited;
use crate::sandbox::{self, Role};

mod access;
mod ops;

use access::turn_away;
pub use access::{bind, ControlSocket};
use ops::{error, handle_line};

/// How long a `dma` waits for PAGE_RESP unless it says (spec-notes/protocol.md 8).
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(5000);
const MAX_TIMEOUT_MS: u64 = 600_000;

/// How long a client has to send one request line, and to take one reply,
/// unless `--control-timeout-ms` says: long enough for someone typing into
/// `nc -U` or a test pausing between requests, short enough that a client
/// that stalls (or leaks its connection) gives its slot back within a
/// minute. Waiting for a `dma`'s page request does not count.
const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Refused, busy and timed-out clients each log this many warnings; the
/// rest are counted in `stats` only.
const LOG_FIRST: u64 = 3;

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("{0} is in the way, not a socket: not removing it")]
    InTheWay(&'static str),
    #[error("the path is longer than {0} bytes")]
    PathTooLong(usize),
    #[error("it was replaced while being set up")]
    Replaced,
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> ControlError {
    move |source| ControlError::Io { op, source }
}

/// Failed accepts and client threads that could not start (`stats`).
static CONTROL_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Bounds on what control clients can make us hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlLimits {
    /// Clients served at once; one more is refused with an error line.
    pub max_clients: usize,
    /// Longest request line; longer lines are refused, not buffered.
    pub max_line: usize,
    /// Time to send one request line, and to take one reply; beyond, the
    /// client is closed.
    pub timeout: Duration,
}

impl Default for ControlLimits {
    fn default() -> Self {
        ControlLimits {
            max_clients: 16,
            max_line: 4096,
            timeout: DEFAULT_CLIENT_TIMEOUT,
        }
    }
}

/// Clients turned away or cut off, for `stats`.
#[derive(Debug, Default)]
struct ClientCounters {
    /// Peer credentials not admitted.
    refused: AtomicU64,
    /// All slots taken.
    busy: AtomicU64,
    /// No complete request line, or a reply not taken, within the timeout.
    timed_out: AtomicU64,
}

/// Count one event in `counter`; warn about the first few only.
fn count_and_warn(counter: &AtomicU64, what: impl FnOnce() -> String) {
    let n = counter.fetch_add(1, Ordering::Relaxed);
    if n < LOG_FIRST {
        let more = if n + 1 == LOG_FIRST {
            " (further ones are only counted in stats)"
        } else {
            ""
        };
        warn!("control socket: {}{more}", what());
    }
}

/// File descriptors a client may have in flight at once (a request takes
/// at most one: `add_endpoint` of a VFIO cdev); more are closed on arrival.
/// Only daemons that take VFIO devices receive fds at all.
const MAX_FDS: usize = 4;

/// A file descriptor received with SCM_RIGHTS, and the stream offset of the
/// last byte of the read that brought it: the line holding that byte is the
/// one it was sent with (the kernel ends a read at the message carrying
/// fds, so a line sent in one sendmsg with its fd gets it).
struct ReceivedFd {
    at: u64,
    fd: OwnedFd,
}

/// A client's stream whose reads and writes must end by `at`: the reading
/// of one request line, or the writing of one reply, gets the timeout in
/// all, so a client trickling bytes cannot hold its slot either. Reads
/// take file descriptors sent along (at most `MAX_FDS` held).
struct Deadlined {
    stream: UnixStream,
    at: Instant,
    /// Take fds sent along (recvmsg); otherwise plain reads, and the kernel
    /// closes any fd sent.
    take_fds: bool,
    /// Bytes read so far.
    offset: u64,
    fds: Vec<ReceivedFd>,
}

impl Deadlined {
    fn new(stream: UnixStream, at: Instant, take_fds: bool) -> Self {
        Deadlined {
            stream,
            at,
            take_fds,
            offset: 0,
            fds: Vec::new(),
        }
    }

    /// The fds that came with stream bytes before `end`, in order.
    fn take_fds_before(&mut self, end: u64) -> Vec<OwnedFd> {
        let n = self.fds.iter().take_while(|f| f.at < end).count();
        self.fds.drain(..n).map(|f| f.fd).collect()
    }

    /// recvmsg into `buf`, keeping the fds that come along.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // u64 elements: aligned for cmsghdr.
        let mut control = [0u64; 8];
        let fd_bytes = u32::try_from(MAX_FDS * size_of::<RawFd>()).unwrap_or(u32::MAX);
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
        debug_assert!(space <= size_of_val(&control));
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; all zeroes is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg points at our iovec over `buf` and at `control`
        // (at least `space` bytes), both alive for the call. The kernel
        // drops fds that do not fit (MSG_CTRUNC); those that do are new
        // fds of ours, close-on-exec, taken over below.
        let n = unsafe {
            libc::recvmsg(
                self.stream.as_raw_fd(),
                &mut msg,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // Not negative: checked above.
        let n = n.cast_unsigned();
        self.offset += n as u64;
        let at = self.offset.saturating_sub(1);
        // SAFETY: walking the control data the kernel wrote, within
        // msg_controllen, with the CMSG_* accessors.
        let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !c.is_null() {
            // SAFETY: c points at a complete header inside `control`.
            let (level, ty, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len) };
            if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN only computes a size.
                let header = unsafe { libc::CMSG_LEN(0) } as usize;
                let count = len.saturating_sub(header) / size_of::<RawFd>();
                for i in 0..count {
                    // SAFETY: `count` fds follow the header, inside the
                    // data the kernel wrote; read unaligned.
                    let raw = unsafe { libc::CMSG_DATA(c).cast::<RawFd>().add(i).read_unaligned() };
                    // SAFETY: the kernel just installed this fd for us and
                    // nothing else refers to it: we own it.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    if self.fds.len() < MAX_FDS {
                        self.fds.push(ReceivedFd { at, fd });
                    }
                }
            }
            // SAFETY: as above; returns null past the end.
            c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
        }
        Ok(n)
    }
}

impl Deadlined {
    fn remaining(&self) -> io::Result<Duration> {
        match self.at.checked_duration_since(Instant::now()) {
            Some(d) if !d.is_zero() => Ok(d),
            _ => Err(ErrorKind::TimedOut.into()),
        }
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        self.stream.set_read_timeout(Some(left))?;
        if self.take_fds {
            self.recv(buf)
        } else {
            self.stream.read(buf)
        }
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A socket timeout (SO_RCVTIMEO/SO_SNDTIMEO answer EAGAIN) or our own.
fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn serve_client(
    backend: &IommuBackend,
    clients: &ClientCounters,
    stream: UnixStream,
    limits: ControlLimits,
    take_fds: bool,
) -> io::Result<()> {
    let max_line = limits.max_line;
    let now = Instant::now();
    let mut writer = Deadlined::new(stream.try_clone()?, now, false);
    let mut reader = BufReader::new(Deadlined::new(stream, now, take_fds));
    let mut line = Vec::with_capacity(256);
    // Stream bytes taken as lines so far.
    let mut consumed = 0u64;
    loop {
        line.clear();
        reader.get_mut().at = Instant::now() + limits.timeout;
        // Read at most max_line + 1 bytes so a client cannot grow our memory.
        let n = (&mut reader)
            .take(max_line as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        consumed += n as u64;
        let reply = if line.last() != Some(&b'\n') && n > max_line {
            // Skip the rest of the long line, then answer once.
            let mut sink = Vec::new();
            while !sink.ends_with(b"\n") {
                sink.clear();
                let skipped = (&mut reader)
                    .take(max_line as u64)
                    .read_until(b'\n', &mut sink)?;
                if skipped == 0 {
                    break;
                }
                consumed += skipped as u64;
            }
            // Its fds are closed here.
            drop(reader.get_mut().take_fds_before(consumed));
            error("bad-request", format!("line longer than {max_line} bytes"))
        } else {
            let fds = reader.get_mut().take_fds_before(consumed);
            match std::str::from_utf8(&line) {
                Ok(text) => handle_line(backend, clients, text.trim(), fds),
                Err(_) => error("bad-request", "not UTF-8"),
            }
        };
        let mut out = reply.to_string();
        out.push('\n');
        writer.at = Instant::now() + limits.timeout;
        writer.write_all(out.as_bytes())?;
    }
}

/// Serve `socket`'s clients on named threads, at most
/// `limits.max_clients` at once, after checking each one's credentials.
/// Start it after the process's seccomp filter: each thread stacks its own
/// narrower one on it.
pub fn spawn(
    socket: ControlSocket,
    backend: Arc<IommuBackend>,
    limits: ControlLimits,
) -> io::Result<thread::JoinHandle<()>> {
    let active = Arc::new(AtomicUsize::new(0));
    let clients = Arc::new(ClientCounters::default());
    let ControlSocket { listener, access } = socket;
    // Only a daemon that can bind VFIO devices receives fds on its control
    // socket and lets its control threads make the host's ioctls.
    let vfio = backend.takes_vfio();
    let (listener_role, client_role) = if vfio {
        (Role::ControlListenerVfio, Role::ControlClientVfio)
    } else {
        (Role::ControlListener, Role::ControlClient)
    };
    thread::Builder::new()
        .name("viommu-control".into())
        .spawn(move || {
            sandbox::narrow_or_warn(listener_role);
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and the like repeat at once: rate-limited.
                        CONTROL_ERRORS.fetch_add(1, Ordering::Relaxed);
                        limited!(Level::Warn, "control socket accept: {e}");
                        continue;
                    }
                };
                if let Err(detail) = access.admit(&stream) {
                    count_and_warn(&clients.refused, || format!("refused a client: {detail}"));
                    turn_away(&stream, "forbidden", &detail);
                    continue;
                }
                if active.fetch_add(1, Ordering::AcqRel) >= limits.max_clients {
                    active.fetch_sub(1, Ordering::AcqRel);
                    count_and_warn(&clients.busy, || {
                        format!(
                            "{} clients already: one more turned away",
                            limits.max_clients
                        )
                    });
                    turn_away(&stream, "bad-request", "too many control clients");
                    continue;
                }
                let (b, a, c) = (backend.clone(), active.clone(), clients.clone());
                let spawned = thread::Builder::new()
                    .name("viommu-ctl-client".into())
                    .spawn(move || {
                        sandbox::narrow_or_warn(client_role);
                        match serve_client(&b, &c, stream, limits, vfio) {
                            Ok(()) => {}
                            Err(e) if is_timeout(&e) => count_and_warn(&c.timed_out, || {
                                format!(
                                    "a client timed out (no complete line, or its reply not \
                                     taken, within {} ms): closed",
                                    limits.timeout.as_millis()
                                )
                            }),
                            Err(e) => debug!("control client: {e}"),
                        }
                        a.fetch_sub(1, Ordering::AcqRel);
                    });
                if let Err(e) = spawned {
                    CONTROL_ERRORS.fetch_add(1, Ordering::Relaxed);
                    limited!(Level::Warn, "cannot start a control client thread: {e}");
                    active.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })
}
