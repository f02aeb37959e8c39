// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Who may use the control socket, and the socket file itself: created
//! owner-only (or group) without a window, nothing but a stale socket
//! removed, each client's peer credentials checked.

use std::ffi::CString;
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use log::info;

use super::ops::error;
use super::{io_err, ControlError};

/// Who may use the control socket: the daemon's own user, root, and the
/// members of `group`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Access {
    uid: libc::uid_t,
    group: Option<libc::gid_t>,
}

/// `size_of::<T>()` as the socklen_t the socket calls take.
// Only small kernel structs (sockaddr_un, ucred) are passed: far below 4 GiB.
#[allow(clippy::cast_possible_truncation)]
const fn socklen_of<T>() -> libc::socklen_t {
    std::mem::size_of::<T>() as libc::socklen_t
}

/// The peer's credentials as of its connect(2) (effective uid and gid).
fn peer_cred(s: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = socklen_of::<libc::ucred>();
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
        // At most NGROUPS_MAX gids, checked below before growing.
        let mut len = libc::socklen_t::try_from(groups.len() * size)
            .map_err(|_| io::Error::from_raw_os_error(libc::ERANGE))?;
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
    pub(super) fn admit(&self, s: &UnixStream) -> Result<(), String> {
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
pub(super) fn turn_away(stream: &UnixStream, kind: &str, detail: &str) {
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
    pub(super) listener: UnixListener,
    pub(super) access: Access,
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
    // AF_UNIX is 1: it fits sa_family_t.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let family = libc::AF_UNIX as libc::sa_family_t;
    addr.sun_family = family;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(ControlError::PathTooLong(addr.sun_path.len() - 1));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([*s]);
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
            socklen_of::<libc::sockaddr_un>(),
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
