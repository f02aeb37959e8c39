// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Socket tier: who may use the control socket, and for how long
//! (requests.md, "Control socket access").

mod support;

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::control::{request_as, ForeignReply};
use support::fixtures::{backend, connect, control};
use support::process::run_to_exit;
use support::{ControlClient, Frontend};

const NOBODY: u32 = 65534;
/// Neither the daemon's user nor root, nor in any group used below.
const OTHER: u32 = 65533;
const GROUP: u32 = 65532;

const STATS: &str = r#"{"op":"stats"}"#;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The reply line of a refused client: forbidden, naming its uid.
fn assert_forbidden(r: &ForeignReply, uid: u32) {
    let ForeignReply::Line(line) = r else {
        panic!("uid {uid}: {r:?}")
    };
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(v["error"], "forbidden", "uid {uid}: {v}");
    assert!(
        v["detail"].as_str().unwrap().contains(&uid.to_string()),
        "{v}"
    );
}

fn assert_served(r: &ForeignReply) {
    let ForeignReply::Line(line) = r else {
        panic!("{r:?}")
    };
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn the_control_socket_is_created_owner_only() {
    let b = backend(&[]);
    let _f = connect(&b);
    let _c = control(&b);
    let m = std::fs::symlink_metadata(&b.control).unwrap();
    assert!(m.file_type().is_socket(), "{m:?}");
    // SAFETY: geteuid has no preconditions.
    assert_eq!(m.uid(), unsafe { libc::geteuid() });
    assert_eq!(mode(&b.control), 0o600, "{:o}", mode(&b.control));
}

/// A file, a symlink (even to a socket) or a directory at the control
/// path: the daemon removes none of them, says which, and exits 1 before
/// its vhost-user socket appears.
#[test]
fn something_else_at_the_control_path_is_left_alone_and_named() {
    let dir = support::process::fresh_temp_dir("ctl-in-the-way").unwrap();
    let file = dir.join("a-file");
    std::fs::write(&file, b"precious").unwrap();
    let link = dir.join("a-link");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let sock = dir.join("a-socket");
    let _listener = UnixListener::bind(&sock).unwrap();
    let link_to_socket = dir.join("a-link-to-a-socket");
    std::os::unix::fs::symlink(&sock, &link_to_socket).unwrap();
    let subdir = dir.join("a-dir");
    std::fs::create_dir(&subdir).unwrap();
    let vhost = dir.join("vhost.sock");
    for (path, kind) in [
        (&file, "a regular file"),
        (&link, "a symbolic link"),
        (&link_to_socket, "a symbolic link"),
        (&subdir, "a directory"),
    ] {
        let (p, v) = (path.to_str().unwrap(), vhost.to_str().unwrap());
        let args = ["--socket-path", v, "--endpoint", "8", "--control-socket", p];
        let (st, _out, err) = run_to_exit(&args, Duration::from_secs(5)).unwrap();
        assert_eq!(st.code(), Some(1), "{p}: {err}");
        assert!(err.contains(p) && err.contains(kind), "{p}: {err:?}");
        assert_eq!(err.trim().lines().count(), 1, "{p}: {err:?}");
        assert!(!vhost.exists(), "{p}: the vhost-user socket was created");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    assert_eq!(std::fs::read_link(&link).unwrap(), file);
    assert_eq!(std::fs::read_link(&link_to_socket).unwrap(), sock);
    assert!(subdir.is_dir() && sock.exists());
    // A stale socket (nothing listening) is replaced.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let mut b = support::BackendProcess::spawn_raw(&[
        "--socket-path",
        "{dir}/vhost.sock",
        "--endpoint",
        "8",
        "--control-socket",
        stale.to_str().unwrap(),
    ])
    .unwrap();
    b.wait_for_socket(Duration::from_secs(10)).unwrap();
    let mut c = ControlClient::connect(&stale).unwrap();
    assert_eq!(c.stats().unwrap()["ok"], true);
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The daemon runs as root here: another user who can reach the socket
/// (its mode widened after the fact) is refused by its peer credentials;
/// root is served.
#[test]
fn other_users_are_refused() {
    if !is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let b = backend(&[]);
    let _f = connect(&b);
    let mut c = control(&b);
    // As created, the file itself keeps others out.
    assert_eq!(
        request_as(&b.control, NOBODY, NOBODY, &[], STATS).unwrap(),
        ForeignReply::ConnectFailed(libc::EACCES)
    );
    chmod(&b.control, 0o666);
    for uid in [NOBODY, OTHER] {
        assert_forbidden(&request_as(&b.control, uid, uid, &[], STATS).unwrap(), uid);
    }
    // Root's group is not enough either.
    assert_forbidden(
        &request_as(&b.control, OTHER, 0, &[0], STATS).unwrap(),
        OTHER,
    );
    let s = c.stats().unwrap();
    assert_eq!(s["control_clients_refused"], 3, "{s}");
    assert!(b.stderr().contains("refused"), "{}", b.stderr());
}

/// `--control-group`: the socket is 0660 in that group, and its members
/// (primary or supplementary) are served; others are not.
#[test]
fn members_of_the_control_group_are_served() {
    if !is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let g = GROUP.to_string();
    let b = backend(&["--control-group", &g]);
    let _f = connect(&b);
    let mut c = control(&b);
    let m = std::fs::symlink_metadata(&b.control).unwrap();
    assert_eq!((m.mode() & 0o7777, m.gid()), (0o660, GROUP), "{m:?}");
    assert_served(&request_as(&b.control, NOBODY, GROUP, &[], STATS).unwrap());
    assert_served(&request_as(&b.control, NOBODY, NOBODY, &[GROUP], STATS).unwrap());
    assert_eq!(
        request_as(&b.control, OTHER, OTHER, &[], STATS).unwrap(),
        ForeignReply::ConnectFailed(libc::EACCES)
    );
    chmod(&b.control, 0o666);
    assert_forbidden(
        &request_as(&b.control, OTHER, OTHER, &[], STATS).unwrap(),
        OTHER,
    );
    assert_eq!(c.stats().unwrap()["control_clients_refused"], 1);
    // A group that does not exist is one line naming it.
    let (st, _, err) = run_to_exit(
        &[
            "--socket-path",
            "{dir}/v.sock",
            "--control-socket",
            "{dir}/c.sock",
            "--control-group",
            "no-such-group-here",
        ],
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("no-such-group-here"), "{err:?}");
    assert_eq!(err.trim().lines().count(), 1, "{err:?}");
}

/// Started as `nobody` (an inherited socket, as with socket activation):
/// its control socket serves `nobody` and root, and refuses another user.
#[test]
fn an_unprivileged_daemon_serves_itself_and_root_only() {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    if !is_root() {
        eprintln!("skipped: needs root to run the daemon and a client as other users");
        return;
    }
    let dir = support::process::fresh_temp_dir("ctl-unpriv").unwrap();
    chmod(&dir, 0o777);
    let path = dir.join("inherited.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let fd = listener.as_raw_fd();
    // SAFETY: clears FD_CLOEXEC on an fd we own so the child inherits it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let ctl = dir.join("ctl.sock");
    let mut child = Command::new(support::process::binary())
        .args(["--socket-fd", &fd.to_string(), "--endpoint", "8"])
        .arg("--control-socket")
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .uid(NOBODY)
        .gid(NOBODY)
        .spawn()
        .unwrap();
    let _f = Frontend::connect_default(&path).unwrap();
    support::process::wait_for_path(&ctl, Duration::from_secs(5)).unwrap();
    let m = std::fs::symlink_metadata(&ctl).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid()), (0o600, NOBODY), "{m:?}");
    assert_served(&request_as(&ctl, NOBODY, NOBODY, &[], STATS).unwrap());
    let mut root = ControlClient::connect(&ctl).unwrap();
    assert_eq!(root.stats().unwrap()["ok"], true);
    chmod(&ctl, 0o666);
    assert_forbidden(&request_as(&ctl, OTHER, OTHER, &[], STATS).unwrap(), OTHER);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that sends nothing, or a line a byte at a time slower than the
/// timeout allows for the whole line, is closed and its slot comes back.
#[test]
fn idle_and_trickling_clients_time_out_and_free_their_slots() {
    let b = backend(&["--max-control-clients", "2", "--control-timeout-ms", "500"]);
    let _f = connect(&b);
    let mut idle = control(&b);
    assert_eq!(idle.stats().unwrap()["ok"], true);
    let mut trickle = UnixStream::connect(&b.control).unwrap();
    let start = Instant::now();
    // Ok(at): the daemon closed it, `at` after the start; Err: the whole
    // line went through.
    let trickler = std::thread::spawn(move || {
        // One byte per 100 ms: each read is quick, the line never ends.
        for &byte in br#"{"op":"stats","pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#.iter() {
            if trickle.write_all(&[byte]).is_err() {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(start.elapsed())
    });
    // Both slots are taken.
    let mut third = control(&b);
    assert_eq!(third.read_reply().unwrap()["error"], "bad-request");
    let mut served = support::retry(Duration::from_secs(5), "a slot freed by a timeout", || {
        let mut c = control(&b);
        match c.stats() {
            Ok(v) if v["ok"] == true => Ok(c),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap();
    // Well before the trickle's 4 s line would have ended.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let gone = idle.read_reply().unwrap_err().to_string();
    assert!(gone.contains("closed by the backend"), "{gone}");
    let cut = trickler.join().unwrap();
    assert!(
        matches!(cut, Ok(t) if t < Duration::from_secs(3)),
        "the trickling client: {cut:?}"
    );
    let s = support::retry(Duration::from_secs(5), "both timeouts counted", || {
        let s = served.stats().unwrap();
        if s["control_clients_timed_out"] == 2 {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .unwrap();
    assert!(s["control_clients_busy"].as_u64().unwrap() >= 1, "{s}");
    assert!(b.stderr().contains("timed out"), "{}", b.stderr());
}

/// A client that sends requests and never reads the replies: once the
/// socket buffers are full the daemon's write times out, the client is
/// closed, and its slot comes back.
#[test]
fn a_client_that_does_not_read_times_out() {
    let b = backend(&["--max-control-clients", "1", "--control-timeout-ms", "500"]);
    let _f = connect(&b);
    let mut greedy = UnixStream::connect(&b.control).unwrap();
    greedy.set_nonblocking(true).unwrap();
    let line = format!("{STATS}\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0u64;
    // Until both directions are full: the daemon blocks writing replies.
    loop {
        match greedy.write(line.as_bytes()) {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                match greedy.write(line.as_bytes()) {
                    Ok(_) => sent += 1,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            Err(e) => panic!("{e}"),
        }
        assert!(
            Instant::now() < deadline,
            "still writing after {sent} lines"
        );
    }
    let mut served = support::retry(Duration::from_secs(5), "a slot freed by a timeout", || {
        let mut c = control(&b);
        match c.stats() {
            Ok(v) if v["ok"] == true => Ok(c),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap();
    assert_eq!(served.stats().unwrap()["control_clients_timed_out"], 1);
    // The greedy client finds its connection closed after the replies
    // already queued.
    greedy.set_nonblocking(false).unwrap();
    greedy
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match greedy.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{e}"),
        }
    }
}
