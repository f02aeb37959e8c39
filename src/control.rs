//! The control socket (protocol.md section 6): JSON lines that make a
//! virtual endpoint issue DMA through the software IOMMU, and report stats.

use std::ffi::CString;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn, Level};
use serde_json::{json, Value};
use thiserror::Error;
use vm_memory::GuestAddressSpace;

use crate::device::backend::IommuBackend;
use crate::device::config::features;
use crate::device::translate::{translate_dma, ModelError};
use crate::fault_queue::pages::{SourceId, CODE_INVALID, CODE_SUCCESS, PERM_READ, PERM_WRITE};
use crate::log_limit::limited;
use crate::sandbox::{self, Role};

/// How long a `dma` waits for PAGE_RESP unless it says (protocol.md 6).
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

fn error(kind: &str, detail: impl ToString) -> Value {
    json!({"ok": false, "error": kind, "detail": detail.to_string()})
}

fn field_u64(req: &Value, name: &str) -> Result<u64, Value> {
    req.get(name)
        .and_then(Value::as_u64)
        .ok_or_else(|| error("bad-request", format!("missing or bad \"{name}\"")))
}

fn dma(backend: &IommuBackend, req: &Value) -> Result<Value, Value> {
    let endpoint = u32::try_from(field_u64(req, "endpoint")?)
        .map_err(|_| error("bad-request", "endpoint is not a 32-bit number"))?;
    let iova = field_u64(req, "iova")?;
    let len = field_u64(req, "len")?;
    let write = match req.get("write") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(error("bad-request", "\"write\" must be a boolean")),
    };
    let pasid = match req.get("pasid") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|&p| p >> crate::nested::request::MAX_PASID_BITS == 0)
                .ok_or_else(|| error("bad-request", "\"pasid\" must be a 20-bit number"))?
                as u32,
        ),
    };
    let timeout = match req.get("timeout_ms") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT,
        Some(v) => Duration::from_millis(
            v.as_u64()
                .filter(|&t| t <= MAX_TIMEOUT_MS)
                .ok_or_else(|| error("bad-request", "\"timeout_ms\" must be 0..=600000"))?,
        ),
    };
    let attempt = |page_requests: bool| {
        let s = backend.session();
        let mem = s.mem.memory();
        let pr = page_requests && s.acked_features & features::PAGE_REQUEST != 0;
        translate_dma(&s.iommu, &*mem, endpoint, pasid, iova, len, write, pr)
    };
    let mut result = attempt(true);
    if let Err(ModelError::PageRequest {
        iova: at, write, ..
    }) = result
    {
        // Ask the driver (protocol.md 6), then walk once more.
        page_request(backend, endpoint, pasid, at, write, timeout)?;
        result = attempt(false);
    }
    match result {
        Ok(pieces) => {
            let ranges: Vec<Value> = pieces
                .iter()
                .map(|p| json!({"iova": p.iova, "gpa": p.gpa, "len": p.len}))
                .collect();
            Ok(json!({"ok": true, "ranges": ranges}))
        }
        Err(e) => {
            if let Some(rec) = e.record() {
                backend.events.send(rec);
            }
            let kind = match e {
                ModelError::NoEndpoint(_) => "no-endpoint",
                ModelError::Blocked { .. } => "blocked",
                ModelError::Fault { .. } | ModelError::OutsideRam { .. } => "fault",
                ModelError::BadRequest(_) => "bad-request",
                ModelError::PageRequest { .. } => "fault",
            };
            Err(error(kind, e))
        }
    }
}

/// Raise one page request for a virtual endpoint's access at `iova` and
/// wait for the driver's answer. Ok: SUCCESS.
fn page_request(
    backend: &IommuBackend,
    endpoint: u32,
    pasid: Option<u32>,
    iova: u64,
    write: bool,
    timeout: Duration,
) -> Result<(), Value> {
    let perm = if write { PERM_WRITE } else { PERM_READ };
    let src = &backend.virtual_faults;
    let (cookie, rx) = src
        .raise(endpoint, pasid, iova & !0xfff, perm)
        .map_err(|e| error("page-request-failed", format!("cannot raise it: {e}")))?;
    let code = match rx.recv_timeout(timeout) {
        Ok(code) => code,
        Err(_) => {
            let mut s = backend.session();
            if s.iommu.pages.time_out(SourceId::Virtual, cookie) {
                // Outstanding: completed here with FAILURE, exactly once.
                backend.flush_pages(&mut s);
                return Err(error(
                    "timeout",
                    format!("no PAGE_RESP within {} ms", timeout.as_millis()),
                ));
            }
            // Not read yet (dropped when it is), or answered just now.
            src.cancel(cookie);
            drop(s);
            match rx.try_recv() {
                Ok(code) => code,
                Err(_) => {
                    return Err(error(
                        "timeout",
                        format!("no PAGE_RESP within {} ms", timeout.as_millis()),
                    ))
                }
            }
        }
    };
    match code {
        CODE_SUCCESS => Ok(()),
        c => Err(error(
            "page-request-failed",
            format!(
                "the page request was answered {}",
                if c == CODE_INVALID {
                    "INVALID"
                } else {
                    "FAILURE"
                }
            ),
        )),
    }
}

fn stats(backend: &IommuBackend, clients: &ClientCounters) -> Value {
    let (requests, d, p, outstanding) = {
        let s = backend.session();
        (
            s.stats.to_json(),
            s.stats.device,
            s.iommu.pages.counters,
            s.iommu.pages.outstanding(),
        )
    };
    let (poll, window) = backend.poll_stats();
    let vev = *backend.vevents.lock();
    let fifo = backend.events.fifo();
    let c = fifo.counters;
    json!({
        "ok": true,
        "requests": requests,
        "faults_sent": c.delivered,
        "records_queued": fifo.len(),
        "records_lost": c.lost,
        "records_discarded": c.discarded,
        "page_requests_outstanding": outstanding,
        "page_requests_raised": p.raised,
        "page_requests_completed_by_driver": p.completed_by_driver,
        "page_requests_completed_by_device": p.completed_by_device,
        "page_requests_completed_by_kernel": p.completed_by_kernel,
        "page_requests_refused_full": p.refused_full,
        "page_requests_refused_unnegotiated": p.refused_unnegotiated,
        "page_requests_refused_no_handler": p.refused_no_handler,
        "page_requests_small_buffer": p.small_buffer,
        "page_requests_timed_out": p.timed_out,
        "page_requests_withdrawn": p.withdrawn,
        "page_responses_failed": p.responses_failed,
        "vevents_received": vev.received,
        "vevents_lost": vev.lost,
        "vevents_stale": vev.stale,
        "requestq_wakeups": poll.wakeups,
        "requestq_served_by_polling": poll.served_polling,
        "poll_window_us": window.as_micros() as u64,
        "control_clients_refused": clients.refused.load(Ordering::Relaxed),
        "control_clients_busy": clients.busy.load(Ordering::Relaxed),
        "control_clients_timed_out": clients.timed_out.load(Ordering::Relaxed),
        "bypass_writes": d.bypass_writes,
        "bypass_writes_refused": d.bypass_refused,
        "config_writes_ignored": d.config_writes_ignored,
        "config_reads_refused": d.config_reads_refused,
        "requestq_bad_avail_index": d.requestq_bad_avail,
        "eventq_bad_avail_index": d.eventq_bad_avail,
        "device_resets": d.device_resets,
        "frontend_connections": d.frontend_connections,
        "control_errors": CONTROL_ERRORS.load(Ordering::Relaxed),
    })
}

/// One request line in, one reply object out.
fn handle_line(backend: &IommuBackend, clients: &ClientCounters, line: &str) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return error("bad-request", format!("not JSON: {e}")),
    };
    match req.get("op").and_then(Value::as_str) {
        Some("dma") => dma(backend, &req).unwrap_or_else(|e| e),
        Some("stats") => stats(backend, clients),
        Some("host") => serde_json::json!({
            "ok": true,
            "host": backend.session().iommu.host().describe(),
        }),
        Some(op) => error("bad-request", format!("unknown op {op:?}")),
        None => error("bad-request", "missing \"op\""),
    }
}

/// A client's stream whose reads and writes must end by `at`: the reading
/// of one request line, or the writing of one reply, gets the timeout in
/// all, so a client trickling bytes cannot hold its slot either.
struct Deadlined {
    stream: UnixStream,
    at: Instant,
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
        self.stream.read(buf)
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
) -> io::Result<()> {
    let max_line = limits.max_line;
    let now = Instant::now();
    let mut writer = Deadlined {
        stream: stream.try_clone()?,
        at: now,
    };
    let mut reader = BufReader::new(Deadlined { stream, at: now });
    let mut line = Vec::with_capacity(256);
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
        let reply = if line.last() != Some(&b'\n') && n > max_line {
            // Skip the rest of the long line, then answer once.
            let mut sink = Vec::new();
            while !sink.ends_with(b"\n") {
                sink.clear();
                if (&mut reader)
                    .take(max_line as u64)
                    .read_until(b'\n', &mut sink)?
                    == 0
                {
                    break;
                }
            }
            error("bad-request", format!("line longer than {max_line} bytes"))
        } else {
            match std::str::from_utf8(&line) {
                Ok(text) => handle_line(backend, clients, text.trim()),
                Err(_) => error("bad-request", "not UTF-8"),
            }
        };
        let mut out = reply.to_string();
        out.push('\n');
        writer.at = Instant::now() + limits.timeout;
        writer.write_all(out.as_bytes())?;
    }
}

/// Who may use the control socket: the daemon's own user, root, and the
/// members of `group`.
#[derive(Debug, Clone, Copy)]
struct Access {
    uid: libc::uid_t,
    group: Option<libc::gid_t>,
}

/// The peer's credentials as of its connect(2) (effective uid and gid).
fn peer_cred(s: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, ours.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// Is `gid` among the peer's supplementary groups (SO_PEERGROUPS)?
fn peer_has_group(s: &UnixStream, gid: libc::gid_t) -> io::Result<bool> {
    let size = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    // Twice at most: when ours is short the kernel answers ERANGE with the
    // room it needs, bounded by NGROUPS_MAX (65536).
    for _ in 0..2 {
        let mut len = (groups.len() * size) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / size;
        if rc == 0 {
            return Ok(groups[..n.min(groups.len())].contains(&gid));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() || n > 65536 {
            return Err(e);
        }
        groups.resize(n, 0);
    }
    Err(io::Error::from_raw_os_error(libc::ERANGE))
}

impl Access {
    /// Ok, or why not (the detail of the refusal line).
    fn admit(&self, s: &UnixStream) -> Result<(), String> {
        let cred = peer_cred(s).map_err(|e| format!("peer credentials: {e}"))?;
        if cred.uid == self.uid || cred.uid == 0 {
            return Ok(());
        }
        if let Some(g) = self.group {
            if cred.gid == g || peer_has_group(s, g).unwrap_or(false) {
                return Ok(());
            }
        }
        Err(format!(
            "uid {} (pid {}) may not use this control socket",
            cred.uid, cred.pid
        ))
    }
}

/// One error line to a client we are not serving, without waiting for it.
fn turn_away(stream: &UnixStream, kind: &str, detail: &str) {
    let line = format!("{}\n", error(kind, detail));
    // SAFETY: send(2) reads `line`, ours; MSG_DONTWAIT: never blocks the
    // listener.
    unsafe {
        libc::send(
            stream.as_raw_fd(),
            line.as_ptr().cast(),
            line.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

/// A bound control socket, not yet served.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    access: Access,
}

/// What is at `path` when it is not a socket, for the refusal.
fn describe(t: std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device node"
    } else {
        "something"
    }
}

/// Remove a stale socket at `path`; anything else there stays (symlinks
/// are not followed).
fn clear_path(path: &Path) -> Result<(), ControlError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(io_err("removing the old socket"))
        }
        Ok(m) => Err(ControlError::InTheWay(describe(m.file_type()))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("lstat")(e)),
    }
}

/// A listening unix socket at `path` whose file is created with mode
/// 0600 (less the umask, which can only take bits away).
fn listen_owner_only(path: &Path) -> Result<UnixListener, ControlError> {
    let last_os = |op| io_err(op)(io::Error::last_os_error());
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(ControlError::PathTooLong(addr.sun_path.len() - 1));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(last_os("socket"));
    }
    // SAFETY: a fresh fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // bind(2) gives the file the socket inode's mode less the umask:
    // narrowing the inode first means the file never exists with a wider
    // mode, without touching the umask (process-wide, so racy).
    // SAFETY: fchmod on the fd we own.
    if unsafe { libc::fchmod(fd, 0o600) } != 0 {
        return Err(last_os("fchmod"));
    }
    // SAFETY: `addr` is a valid sockaddr_un of the size given.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(last_os("bind"));
    }
    // SAFETY: listen on the fd we own.
    if unsafe { libc::listen(fd, libc::SOMAXCONN) } != 0 {
        return Err(last_os("listen"));
    }
    Ok(UnixListener::from(sock))
}

/// Give the socket file at `path` its group and exactly `mode`, through
/// an O_PATH fd checked to be a socket of ours: a name swapped in by
/// someone else is never followed or changed.
fn settle_file(
    path: &Path,
    uid: libc::uid_t,
    group: Option<libc::gid_t>,
    mode: u32,
) -> Result<(), ControlError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| ControlError::Replaced)?;
    // SAFETY: open(2) of a NUL-terminated path; O_PATH only names the file.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io_err("open O_PATH")(io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd that nothing else owns.
    let file = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: stat is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`, ours.
    if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io_err("fstat")(io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK || st.st_uid != uid {
        return Err(ControlError::Replaced);
    }
    if let Some(g) = group.filter(|&g| g != st.st_gid) {
        // SAFETY: fchownat on our O_PATH fd with an empty path (the fd
        // itself); uid -1 leaves the owner.
        let rc = unsafe {
            libc::fchownat(
                file.as_raw_fd(),
                c"".as_ptr(),
                libc::uid_t::MAX,
                g,
                libc::AT_EMPTY_PATH,
            )
        };
        if rc != 0 {
            return Err(io_err("setting its group")(io::Error::last_os_error()));
        }
    }
    if st.st_mode & 0o7777 != mode {
        // An O_PATH fd takes no fchmod; its /proc link names the inode.
        let link = format!("/proc/self/fd/{}", file.as_raw_fd());
        std::fs::set_permissions(link, std::fs::Permissions::from_mode(mode))
            .map_err(io_err("setting its mode"))?;
    }
    Ok(())
}

/// Listen on `path` (before the seccomp filter: it allows no new sockets).
/// The file is the daemon's, mode 0600, or 0660 in `group` when given
/// (widened only after the group is set); a stale socket there is
/// replaced, anything else refused.
pub fn bind(path: &Path, group: Option<libc::gid_t>) -> Result<ControlSocket, ControlError> {
    clear_path(path)?;
    let listener = listen_owner_only(path)?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    settle_file(path, uid, group, mode)?;
    match group {
        Some(g) => info!("control socket on {} (mode 660, group {g})", path.display()),
        None => info!("control socket on {} (mode 600)", path.display()),
    }
    Ok(ControlSocket {
        listener,
        access: Access { uid, group },
    })
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
    thread::Builder::new()
        .name("viommu-control".into())
        .spawn(move || {
            sandbox::narrow_or_warn(Role::ControlListener);
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
                        sandbox::narrow_or_warn(Role::ControlClient);
                        match serve_client(&b, &c, stream, limits) {
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
