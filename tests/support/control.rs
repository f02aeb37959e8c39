// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Client of the backend's control socket (JSON lines, spec-notes/protocol.md 8).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::{invalid, retry, Error, Result};

/// One connection to the control socket.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl ControlClient {
    /// Connect (retrying for up to 5 s), with a 15 s read timeout.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        Self::connect_timeout(path, Duration::from_secs(5), Duration::from_secs(15))
    }

    /// Connect, retrying for `connect_timeout`; replies must arrive within
    /// `read_timeout`.
    pub fn connect_timeout(
        path: impl AsRef<Path>,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<Self> {
        let path = path.as_ref();
        let s = retry(
            connect_timeout,
            &format!("connect to control socket {}", path.display()),
            || UnixStream::connect(path),
        )?;
        s.set_read_timeout(Some(read_timeout))?;
        let writer = s.try_clone()?;
        Ok(ControlClient {
            reader: BufReader::new(s),
            writer,
            line: String::new(),
        })
    }

    /// Change the reply timeout.
    pub fn set_read_timeout(&mut self, t: Duration) -> Result<()> {
        self.writer.set_read_timeout(Some(t))?;
        Ok(())
    }

    /// Send one raw line (a newline is appended) without reading a reply.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.writer.write_all(&buf)?;
        Ok(())
    }

    /// Read one reply line and parse it as JSON.
    pub fn read_reply(&mut self) -> Result<Value> {
        self.line.clear();
        let n = match self.reader.read_line(&mut self.line) {
            Ok(n) => n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Err(Error::Timeout("no reply on the control socket".into()))
            }
            Err(e) => return Err(Error::Io(e)),
        };
        if n == 0 {
            return invalid("control socket closed by the backend");
        }
        serde_json::from_str(self.line.trim_end())
            .or_else(|e| invalid(format!("control reply {:?} is not JSON: {e}", self.line)))
    }

    /// Send one request object and read its reply.
    pub fn request(&mut self, req: &Value) -> Result<Value> {
        self.send_line(&req.to_string())?;
        self.read_reply()
    }

    /// `{"op":"dma",...}`; `pasid` and `timeout_ms` are added when `Some`.
    pub fn dma(
        &mut self,
        endpoint: u32,
        iova: u64,
        len: u64,
        write: bool,
        pasid: Option<u32>,
        timeout_ms: Option<u64>,
    ) -> Result<Value> {
        let mut req =
            json!({"op": "dma", "endpoint": endpoint, "iova": iova, "len": len, "write": write});
        if let Some(p) = pasid {
            req["pasid"] = json!(p);
        }
        if let Some(t) = timeout_ms {
            req["timeout_ms"] = json!(t);
        }
        self.request(&req)
    }

    /// Send one request object with `fds` as SCM_RIGHTS ancillary data on
    /// the same sendmsg as its line, and read its reply.
    pub fn request_with_fds(&mut self, req: &Value, fds: &[RawFd]) -> Result<Value> {
        let line = format!("{req}\n");
        send_with_fds(&self.writer, line.as_bytes(), fds)?;
        self.read_reply()
    }

    /// `{"op":"stats"}`.
    pub fn stats(&mut self) -> Result<Value> {
        self.request(&json!({"op": "stats"}))
    }
}

/// A successful DMA reply's ranges as `(iova, gpa, len)`; an error
/// describing the reply otherwise.
pub fn dma_ranges(reply: &Value) -> Result<Vec<(u64, u64, u64)>> {
    if reply["ok"] != json!(true) {
        return invalid(format!("DMA failed: {reply}"));
    }
    let ranges = match reply["ranges"].as_array() {
        Some(r) => r,
        None => return invalid(format!("DMA reply without ranges: {reply}")),
    };
    ranges
        .iter()
        .map(
            |r| match (r["iova"].as_u64(), r["gpa"].as_u64(), r["len"].as_u64()) {
                (Some(i), Some(g), Some(l)) => Ok((i, g, l)),
                _ => invalid(format!("malformed range {r} in {reply}")),
            },
        )
        .collect()
}

/// The `error` kind of a failed reply (`None` if it succeeded).
pub fn error_kind(reply: &Value) -> Option<&str> {
    if reply["ok"] == json!(true) {
        None
    } else {
        reply["error"].as_str()
    }
}

/// What a client running as another user got from the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForeignReply {
    /// connect(2) failed with this errno (the socket file's mode kept it out).
    ConnectFailed(i32),
    /// The first line it read, without the newline (empty: closed at once).
    Line(String),
}

/// Connect to the control socket at `path` as `uid`, `gid` and
/// supplementary `groups` (from a forked child: the test must be root),
/// send `line` and return the first line read back.
pub fn request_as(
    path: impl AsRef<Path>,
    uid: u32,
    gid: u32,
    groups: &[u32],
    line: &str,
) -> Result<ForeignReply> {
    use std::os::unix::ffi::OsStrExt;
    // Everything the child touches is built before the fork: between fork
    // and _exit it makes raw system calls only (the test process has other
    // threads, whose locks the child must not need).
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_ref().as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return invalid("control socket path too long");
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let request = format!("{line}\n").into_bytes();
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let timeout = libc::timeval {
        tv_sec: 10,
        tv_usec: 0,
    };
    let mut reply = vec![0u8; 4096];
    let mut pipe = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: the child makes only async-signal-safe raw system calls on
    // memory prepared above, then _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: raw system calls on the child's own copies of the buffers
        // above; every path ends in _exit.
        unsafe {
            let out = pipe[1];
            let fail = |what: u8| {
                let e = *libc::__errno_location();
                let msg = [what, e as u8];
                libc::write(out, msg.as_ptr().cast(), 2);
                libc::_exit(1);
            };
            // Raw calls: glibc's wrappers would signal the parent's other
            // threads, which do not exist in the child.
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                fail(b'g');
            }
            if libc::syscall(libc::SYS_setgid, gid) != 0
                || libc::syscall(libc::SYS_setuid, uid) != 0
            {
                fail(b'u');
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd < 0 {
                fail(b's');
            }
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            if libc::connect(
                fd,
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            ) != 0
            {
                fail(b'c');
            }
            libc::write(fd, request.as_ptr().cast(), request.len());
            let mut n = 0usize;
            while n < reply.len() {
                let r = libc::read(fd, reply.as_mut_ptr().add(n).cast(), reply.len() - n);
                if r <= 0 {
                    break;
                }
                n += r as usize;
                if reply[..n].contains(&b'\n') {
                    break;
                }
            }
            libc::write(out, b"ok".as_ptr().cast(), 2);
            libc::write(out, reply.as_ptr().cast(), n);
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end, an fd we own.
    unsafe { libc::close(pipe[1]) };
    if pid < 0 {
        // SAFETY: the read end is ours.
        unsafe { libc::close(pipe[0]) };
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: the read end is ours; File closes it.
    let mut from_child = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(pipe[0]) };
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut from_child, &mut got)?;
    let mut status = 0;
    // SAFETY: reaps the child we forked.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    match got.as_slice() {
        [b'o', b'k', rest @ ..] => {
            let text = String::from_utf8_lossy(rest);
            Ok(ForeignReply::Line(
                text.split('\n').next().unwrap_or("").to_string(),
            ))
        }
        [b'c', errno] => Ok(ForeignReply::ConnectFailed(i32::from(*errno))),
        other => invalid(format!(
            "the client as uid {uid} failed: {:?}",
            String::from_utf8_lossy(other)
        )),
    }
}

/// sendmsg `bytes` with `fds` attached (SCM_RIGHTS); all of `bytes` must go
/// in one call (lines here are short).
pub fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> Result<()> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    // u64 elements: aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds CMSG_SPACE(fd_bytes) bytes, so the
        // first header and its data fit; we write exactly fd_bytes of data.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes);
        }
    }
    // SAFETY: msg points at our iovec, buffer and control data, all alive
    // for the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if n as usize != bytes.len() {
        return invalid(format!("sendmsg sent {n} of {} bytes", bytes.len()));
    }
    Ok(())
}
