//! The control socket (protocol.md section 6): JSON lines that make a
//! virtual endpoint issue DMA through the software IOMMU, and report stats.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{debug, info, Level};
use serde_json::{json, Value};
use vm_memory::GuestAddressSpace;

use crate::device::backend::IommuBackend;
use crate::device::config::features;
use crate::fault_queue::pages::{SourceId, CODE_INVALID, CODE_SUCCESS, PERM_READ, PERM_WRITE};
use crate::iommufd_bridge::model::{translate_dma, ModelError};
use crate::log_limit::limited;
use crate::sandbox::{self, Role};

/// How long a `dma` waits for PAGE_RESP unless it says (protocol.md 6).
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(5000);
const MAX_TIMEOUT_MS: u64 = 600_000;

/// Failed accepts and client threads that could not start (`stats`).
static CONTROL_ERRORS: AtomicU64 = AtomicU64::new(0);
/// Clients refused beyond `max_clients` (`stats`).
static CLIENTS_REFUSED: AtomicU64 = AtomicU64::new(0);

/// Bounds on what control clients can make us hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlLimits {
    /// Clients served at once; one more is refused with an error line.
    pub max_clients: usize,
    /// Longest request line; longer lines are refused, not buffered.
    pub max_line: usize,
}

impl Default for ControlLimits {
    fn default() -> Self {
        ControlLimits {
            max_clients: 16,
            max_line: 4096,
        }
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

fn stats(backend: &IommuBackend) -> Value {
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
    let vev = *backend.vevents.lock().unwrap();
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
        "page_responses_failed": p.responses_failed,
        "vevents_received": vev.received,
        "vevents_lost": vev.lost,
        "requestq_wakeups": poll.wakeups,
        "requestq_served_by_polling": poll.served_polling,
        "poll_window_us": window.as_micros() as u64,
        "bypass_writes": d.bypass_writes,
        "bypass_writes_refused": d.bypass_refused,
        "config_writes_ignored": d.config_writes_ignored,
        "config_reads_refused": d.config_reads_refused,
        "requestq_bad_avail_index": d.requestq_bad_avail,
        "eventq_bad_avail_index": d.eventq_bad_avail,
        "device_resets": d.device_resets,
        "frontend_connections": d.frontend_connections,
        "control_clients_refused": CLIENTS_REFUSED.load(Ordering::Relaxed),
        "control_errors": CONTROL_ERRORS.load(Ordering::Relaxed),
    })
}

/// One request line in, one reply object out.
pub fn handle_line(backend: &IommuBackend, line: &str) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return error("bad-request", format!("not JSON: {e}")),
    };
    match req.get("op").and_then(Value::as_str) {
        Some("dma") => dma(backend, &req).unwrap_or_else(|e| e),
        Some("stats") => stats(backend),
        Some("host") => serde_json::json!({
            "ok": true,
            "host": backend.session().iommu.host().describe(),
        }),
        Some(op) => error("bad-request", format!("unknown op {op:?}")),
        None => error("bad-request", "missing \"op\""),
    }
}

fn serve_client(backend: &IommuBackend, stream: UnixStream, max_line: usize) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
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
                Ok(text) => handle_line(backend, text.trim()),
                Err(_) => error("bad-request", "not UTF-8"),
            }
        };
        let mut out = reply.to_string();
        out.push('\n');
        writer.write_all(out.as_bytes())?;
    }
}

/// Listen on `path` (before the seccomp filter: it allows no new sockets).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    info!("control socket on {}", path.display());
    Ok(listener)
}

/// Serve `listener`'s clients on named threads, at most
/// `limits.max_clients` at once. Start it after the process's seccomp
/// filter: each thread stacks its own narrower one on it.
pub fn spawn(
    listener: UnixListener,
    backend: Arc<IommuBackend>,
    limits: ControlLimits,
) -> io::Result<thread::JoinHandle<()>> {
    let active = Arc::new(AtomicUsize::new(0));
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
                if active.fetch_add(1, Ordering::AcqRel) >= limits.max_clients {
                    active.fetch_sub(1, Ordering::AcqRel);
                    CLIENTS_REFUSED.fetch_add(1, Ordering::Relaxed);
                    let mut s = stream;
                    let _ = s.write_all(
                        format!("{}\n", error("bad-request", "too many control clients"))
                            .as_bytes(),
                    );
                    continue;
                }
                let (b, a) = (backend.clone(), active.clone());
                let spawned = thread::Builder::new()
                    .name("viommu-ctl-client".into())
                    .spawn(move || {
                        sandbox::narrow_or_warn(Role::ControlClient);
                        if let Err(e) = serve_client(&b, stream, limits.max_line) {
                            debug!("control client: {e}");
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
