// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket's operations: `dma` (translate, fault, raise a page
//! request and wait for it), `stats`, `host`; one JSON reply per line.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use log::Level;

use crate::log_limit::limited;
use std::time::Duration;

use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use super::{ClientCounters, CONTROL_ERRORS, DEFAULT_TIMEOUT, MAX_TIMEOUT_MS};
use crate::device::backend::IommuBackend;
use crate::device::config::features;
use crate::device::state::{HotplugError, NewEndpoint};
use crate::device::translate::{translate_dma, ModelError};
use crate::fault_queue::pages::{CODE_INVALID, CODE_SUCCESS, PERM_READ, PERM_WRITE};
use crate::iommufd_bridge::BridgeError;

pub(super) fn error(kind: &str, detail: impl ToString) -> Value {
    json!({"ok": false, "error": kind, "detail": detail.to_string()})
}

fn field_u64(req: &Value, name: &str) -> Result<u64, Value> {
    req.get(name)
        .and_then(Value::as_u64)
        .ok_or_else(|| error("bad-request", format!("missing or bad \"{name}\"")))
}

/// Most bytes a `dma` carries in `data` (section 8 of spec-notes/protocol.md).
const MAX_DATA: u64 = 4096;

/// What a `dma` does with the bytes it reaches.
enum DmaData {
    None,
    /// Return what the endpoint read.
    Read,
    /// Write these bytes.
    Write(Vec<u8>),
}

fn parse_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.is_ascii() || !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

fn dma_data(req: &Value, len: u64, write: bool) -> Result<DmaData, Value> {
    let data = match req.get("data") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => return Ok(DmaData::None),
        Some(d) => d,
    };
    if len > MAX_DATA {
        return Err(error(
            "bad-request",
            format!("\"data\" needs len <= {MAX_DATA}"),
        ));
    }
    match (data, write) {
        (Value::Bool(true), false) => Ok(DmaData::Read),
        (Value::String(hex), true) => match parse_hex(hex) {
            Some(bytes) if bytes.len() as u64 == len => Ok(DmaData::Write(bytes)),
            _ => Err(error("bad-request", "\"data\" must be len bytes in hex")),
        },
        _ => Err(error(
            "bad-request",
            "\"data\": true on a read, a hex string on a write",
        )),
    }
}

/// Read or write the bytes of `data` at the guest-physical pieces of a
/// translated access; Ok(Some(hex)) for a read.
fn move_data(
    backend: &IommuBackend,
    pieces: &[crate::device::translate::Piece],
    data: DmaData,
) -> Result<Option<String>, Value> {
    let s = backend.session();
    let mem = s.mem.memory();
    let fail = |e: vm_memory::GuestMemoryError| error("fault", format!("guest memory: {e}"));
    match data {
        DmaData::None => Ok(None),
        DmaData::Read => {
            let mut out = String::new();
            for p in pieces {
                let mut buf = vec![0u8; usize::try_from(p.len).unwrap_or(0)];
                mem.read_slice(&mut buf, GuestAddress(p.gpa))
                    .map_err(fail)?;
                out.extend(buf.iter().map(|b| format!("{b:02x}")));
            }
            Ok(Some(out))
        }
        DmaData::Write(bytes) => {
            let mut at = 0usize;
            for p in pieces {
                let n = usize::try_from(p.len).unwrap_or(0);
                let chunk = bytes.get(at..at + n).unwrap_or_default();
                mem.write_slice(chunk, GuestAddress(p.gpa)).map_err(fail)?;
                at += n;
            }
            Ok(None)
        }
    }
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
    // A user request unless privilege is asked (VT-d's PMR): it needs U/S
    // at every level of a guest table; a privileged one needs SRE.
    let privileged = match req.get("privileged") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(error("bad-request", "\"privileged\" must be a boolean")),
    };
    let pasid = match req.get("pasid") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|&p| p >> crate::nested::request::MAX_PASID_BITS == 0)
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| error("bad-request", "\"pasid\" must be a 20-bit number"))?,
        ),
    };
    let data = dma_data(req, len, write)?;
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
        translate_dma(
            &s.iommu, &*mem, endpoint, pasid, iova, len, write, privileged, pr,
        )
    };
    let mut result = attempt(true);
    if let Err(ModelError::PageRequest {
        iova: at, write, ..
    }) = result
    {
        // Ask the driver (spec-notes/protocol.md 8), then walk once more.
        page_request(backend, endpoint, pasid, at, write, timeout)?;
        result = attempt(false);
    }
    match result {
        Ok(pieces) => {
            let ranges: Vec<Value> = pieces
                .iter()
                .map(|p| json!({"iova": p.iova, "gpa": p.gpa, "len": p.len}))
                .collect();
            match move_data(backend, &pieces, data)? {
                Some(hex) => Ok(json!({"ok": true, "ranges": ranges, "data": hex})),
                None => Ok(json!({"ok": true, "ranges": ranges})),
            }
        }
        Err(e) => {
            if let Some(rec) = e.record() {
                backend.relay.send(rec);
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
    let (cookie, rx) = backend
        .relay
        .virtual_source()
        .raise(endpoint, pasid, iova & !0xfff, perm)
        .map_err(|e| error("page-request-failed", format!("cannot raise it: {e}")))?;
    let code = match rx.recv_timeout(timeout) {
        Ok(code) => code,
        Err(_) => {
            if backend.virtual_timed_out(cookie) {
                // Outstanding: completed here with FAILURE, exactly once.
                return Err(error(
                    "timeout",
                    format!("no PAGE_RESP within {} ms", timeout.as_millis()),
                ));
            }
            // Not read yet (dropped when it is), or answered just now.
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

pub(super) fn stats(backend: &IommuBackend, clients: &ClientCounters) -> Value {
    let (requests, d, p, outstanding) = {
        let s = backend.session();
        (
            s.stats.to_json(),
            s.stats.device,
            s.iommu.pages.counters,
            s.iommu.pages.outstanding(),
        )
    };
    let ps = backend.poll_stats();
    let (poll, window, backoff) = (ps.counters, ps.window, ps.backoff);
    let vev = backend.relay.vevent_counters();
    // `--fault-io` in force, and what its ring did (null: epoll).
    let fault_io = json!({
        "mode": backend.relay.fault_io().name(),
        "ring": backend.relay.ring_counters().map(|r| json!({
            "enters": r.enters,
            "reads": r.reads,
            "responses_written": r.responses_written,
            "responses_stale": r.responses_stale,
            "responses_failed": r.responses_failed,
        })),
    });
    let fifo = backend.relay.fifo();
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
        "fault_io": fault_io,
        "vevents_received": vev.received,
        "vevents_lost": vev.lost,
        "vevents_stale": vev.stale,
        "vevents_dropped": vev.dropped,
        "requestq_wakeups": poll.wakeups,
        "requestq_served_by_polling": poll.served_polling,
        "requestq_poll_stalls": poll.stalls,
        "requestq_poll_windows": poll.windows,
        "requestq_poll_us": u64::try_from(poll.polled.as_micros()).unwrap_or(u64::MAX),
        "requestq_poll_lost_us": u64::try_from(poll.lost.as_micros()).unwrap_or(u64::MAX),
        "requestq_poll_lost_windows": poll.lost_windows,
        "requestq_poll_idle_backoffs": poll.idle_backoffs,
        "requestq_poll_backed_off": poll.backed_off,
        "requestq_poll_crowded": poll.crowded,
        "requestq_poll_probe_reads": poll.probe_reads,
        "poll_gate": if ps.gate { "run-queues" } else { "none" },
        "poll_backoff_ms": u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
        "poll_window_us": u64::try_from(window.as_micros()).unwrap_or(u64::MAX),
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
        "frontend_disconnections": d.frontend_disconnections,
        "endpoints_added": d.endpoints_added,
        "endpoints_removed": d.endpoints_removed,
        "endpoint_adds_refused": d.endpoint_adds_refused,
        "control_errors": CONTROL_ERRORS.load(Ordering::Relaxed),
    })
}

/// The `endpoint` field: a 32-bit endpoint ID.
fn endpoint_field(req: &Value) -> Result<u32, Value> {
    u32::try_from(field_u64(req, "endpoint")?)
        .map_err(|_| error("bad-request", "endpoint is not a 32-bit number"))
}

/// `add_endpoint`: a virtual endpoint, or with `"vfio": true` the VFIO
/// cdev sent with the line (exactly one fd).
fn add_endpoint(
    backend: &IommuBackend,
    req: &Value,
    mut fds: Vec<OwnedFd>,
) -> Result<Value, Value> {
    let id = endpoint_field(req)?;
    let vfio = match req.get("vfio") {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => return Err(error("bad-request", "\"vfio\" must be a boolean")),
    };
    if vfio && !backend.takes_vfio() {
        // Its fd, if any, was dropped by the kernel (plain reads).
        return Err(error(
            "unsupported",
            "no iommufd for VFIO devices (start with --vfio-hotplug or a VFIO endpoint)",
        ));
    }
    let kind = match (vfio, fds.len()) {
        (false, 0) => NewEndpoint::Virtual,
        (false, _) => {
            return Err(error(
                "bad-request",
                "a virtual endpoint takes no file descriptor",
            ))
        }
        (true, 1) => NewEndpoint::Vfio(File::from(fds.pop().expect("one fd"))),
        (true, n) => {
            return Err(error(
                "bad-request",
                format!("\"vfio\" takes the cdev's fd, sent with the line (SCM_RIGHTS); got {n}"),
            ))
        }
    };
    let what = if vfio { "vfio" } else { "virtual" };
    backend.add_endpoint(id, kind).map_err(|e| {
        let kind = match &e {
            HotplugError::Exists(_) => "exists",
            HotplugError::Limit(_) => "limit",
            HotplugError::NoEndpoint(_) => "no-endpoint",
            HotplugError::Host {
                source: BridgeError::Unsupported(_),
                ..
            } => "unsupported",
            HotplugError::Host {
                source: BridgeError::NotCdev,
                ..
            } => "bad-request",
            HotplugError::Host { .. } => "host-error",
        };
        error(kind, e)
    })?;
    // A client can repeat these: rate-limited (`stats` counts them all).
    limited!(
        Level::Info,
        "endpoint {id:#x}: added ({what}) over the control socket"
    );
    Ok(json!({"ok": true, "endpoint": id, "kind": what}))
}

/// `remove_endpoint`: detach and forget it (its page requests completed).
fn remove_endpoint(backend: &IommuBackend, req: &Value) -> Result<Value, Value> {
    let id = endpoint_field(req)?;
    let removed = backend
        .remove_endpoint(id)
        .map_err(|e| error("no-endpoint", e))?;
    limited!(
        Level::Info,
        "endpoint {id:#x}: removed over the control socket"
    );
    Ok(json!({
        "ok": true,
        "endpoint": id,
        "kind": if removed.host { "vfio" } else { "virtual" },
        "page_requests_completed": removed.page_requests,
    }))
}

/// The host's description; the page responses written through the fault
/// ring (`--fault-io io-uring`) count with the host's own writes.
fn host(backend: &IommuBackend) -> Value {
    let mut h = backend.session().iommu.host().describe();
    if let Some(r) = backend.relay.ring_counters() {
        for (key, n) in [
            ("page_responses_written", r.responses_written),
            ("page_responses_stale", r.responses_stale),
        ] {
            if let Some(v) = h.get_mut(key) {
                *v = Value::from(v.as_u64().unwrap_or(0) + n);
            }
        }
    }
    h
}

/// `{"op":"poll","us":N}`: the requestq's polling bound from now on, as
/// `--poll-us N` (0: off; at most a second). For A/B measurements in one
/// guest boot (the guest tier's contended part), and for an operator who
/// sees the host get busy.
fn set_poll(backend: &IommuBackend, req: &Value) -> Result<Value, Value> {
    let us = req
        .get("us")
        .and_then(Value::as_u64)
        .ok_or_else(|| error("bad-request", "\"us\" (microseconds) missing"))?
        .min(1_000_000);
    backend.set_poll_max(std::time::Duration::from_micros(us));
    Ok(serde_json::json!({ "ok": true, "poll_us": us }))
}

/// One request line in, one reply object out. `fds` came with the line
/// (SCM_RIGHTS); only `add_endpoint` of a VFIO cdev takes one, and any
/// not taken are closed when the reply is made.
pub(super) fn handle_line(
    backend: &IommuBackend,
    clients: &ClientCounters,
    line: &str,
    fds: Vec<OwnedFd>,
) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return error("bad-request", format!("not JSON: {e}")),
    };
    let op = req.get("op").and_then(Value::as_str);
    if op != Some("add_endpoint") && !fds.is_empty() {
        return error(
            "bad-request",
            format!(
                "{} file descriptor(s) sent with an op that takes none",
                fds.len()
            ),
        );
    }
    match op {
        Some("add_endpoint") => add_endpoint(backend, &req, fds).unwrap_or_else(|e| e),
        Some("remove_endpoint") => remove_endpoint(backend, &req).unwrap_or_else(|e| e),
        Some("dma") => dma(backend, &req).unwrap_or_else(|e| e),
        Some("stats") => stats(backend, clients),
        Some("poll") => set_poll(backend, &req).unwrap_or_else(|e| e),
        Some("host") => serde_json::json!({
            "ok": true,
            "host": host(backend),
        }),
        Some(op) => error("bad-request", format!("unknown op {op:?}")),
        None => error("bad-request", "missing \"op\""),
    }
}
