// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A frontend that misbehaves ends only its own connection: malformed
//! vhost-user messages, wrong sizes, setup out of order, file descriptors
//! where none are expected, a frontend that vanishes mid-request or with
//! page requests outstanding. The backend then serves the next frontend,
//! and over 1000 connection cycles its open files and memory stay flat.

mod support;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::control::error_kind;
use support::mem::TablePages;
use support::process::{proc_fd_count, proc_rss_kib};
use support::wire::{self, S_OK};
use support::{BackendProcess, ControlClient, Frontend, FrontendOptions, GuestMem};
use vhost_device_iommu::nested::walker::TableBuilder;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const EP: u32 = 8;
const RW: u32 = wire::MAP_F_READ | wire::MAP_F_WRITE;
/// vhost-user message header flags: version 1.
const VERSION: u32 = 0x1;

fn alive(b: &mut BackendProcess) -> bool {
    b.child.try_wait().map(|s| s.is_none()).unwrap_or(false)
}

fn backend(extra: &[&str]) -> BackendProcess {
    let mut args = vec!["--endpoint", "8"];
    args.extend_from_slice(extra);
    BackendProcess::spawn(&args).expect("backend starts")
}

/// A vhost-user message: header {request, flags, size} and payload.
fn msg(request: u32, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&request.to_le_bytes());
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

/// Send `bytes` (with `fds`, if any) on a fresh connection, then wait until
/// the backend closes it or 2 s pass; our side closes either way.
fn misbehave(b: &BackendProcess, bytes: &[u8], fds: &[i32]) {
    let mut s = support::frontend::connect_stream(&b.socket, Duration::from_secs(5)).unwrap();
    if fds.is_empty() {
        let _ = s.write_all(bytes);
    } else {
        let _ = s.send_with_fds(&[bytes], fds);
    }
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// The next frontend is served normally (returned still connected).
fn served(b: &BackendProcess) -> Frontend {
    let mem = Arc::new(GuestMem::new(4 << 20).unwrap());
    let mut f = Frontend::connect(&b.socket, mem, FrontendOptions::default())
        .expect("the next frontend sets up");
    assert_eq!(f.request_status(&wire::attach(1, EP, 0, 0)).unwrap(), S_OK);
    assert_eq!(
        f.request_status(&wire::map(1, 0x1000, 0x1fff, 0x1000, RW))
            .unwrap(),
        S_OK
    );
    f
}

#[test]
fn malformed_messages_end_only_their_connection() {
    let mut b = backend(&[]);
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let cases: Vec<(&str, Vec<u8>, Vec<i32>)> = vec![
        ("garbage", vec![0xa5; 64], vec![]),
        ("truncated header", vec![1, 0, 0, 0], vec![]),
        (
            "oversized payload claim",
            msg(2, 0x10_0000, &[0; 8]),
            vec![],
        ),
        // SET_FEATURES takes a u64.
        ("short SET_FEATURES", msg(2, 4, &[0; 4]), vec![]),
        // SET_VRING_ADDR before any feature or memory table.
        ("SET_VRING_ADDR first", msg(9, 40, &[0; 40]), vec![]),
        // SET_MEM_TABLE with 8 regions and no fds.
        (
            "SET_MEM_TABLE without fds",
            msg(5, 8 + 8 * 32, &[8; 8 + 8 * 32]),
            vec![],
        ),
        // An fd with GET_FEATURES, which takes none.
        (
            "fd where none is expected",
            msg(1, 0, &[]),
            vec![devnull.as_raw_fd()],
        ),
        ("unknown request", msg(999, 0, &[]), vec![]),
        // A reply flag on a request.
        (
            "reply flag",
            {
                let mut m = msg(1, 0, &[]);
                m[4] = 0x5;
                m
            },
            vec![],
        ),
    ];
    for (name, bytes, fds) in cases {
        misbehave(&b, &bytes, &fds);
        assert!(alive(&mut b), "{name}: the backend died: {}", b.stderr());
        served(&b).disconnect();
    }
}

#[test]
fn a_thousand_connection_cycles_keep_files_and_memory_flat() {
    let b = backend(&["--max-page-requests", "8"]);
    let pid = b.pid();
    let cycle = |i: usize| {
        let mem = Arc::new(GuestMem::new(4 << 20).unwrap());
        let mut f = Frontend::connect(&b.socket, mem, FrontendOptions::default())
            .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        assert_eq!(f.request_status(&wire::attach(1, EP, 0, 0)).unwrap(), S_OK);
        for k in 0..4u64 {
            let iova = 0x10_0000 + k * 0x1000;
            let req = wire::map(1, iova, iova + 0xfff, iova, RW);
            assert_eq!(f.request_status(&req).unwrap(), S_OK);
        }
        match i % 10 {
            // Vanish with requests in flight, not waited for.
            3 => {
                let q = f.requestq();
                for _ in 0..8 {
                    let (m, w) = wire::map(1, 0x20_0000, 0x20_0fff, 0, RW);
                    q.add(&[&m], &[w]).unwrap();
                }
                q.kick().unwrap();
            }
            // Vanish with a page request outstanding: its dma is answered.
            7 => {
                let root = TableBuilder::new(48, TablePages(f.mem.clone())).root();
                let at = wire::attach_table_vtd(2, EP, wire::TABLE_F_PAGE_REQUESTS, 0, root, 48);
                assert_eq!(f.request_status(&at).unwrap(), S_OK);
                let mut ctl = ControlClient::connect(&b.control).unwrap();
                let waiter =
                    thread::spawn(move || ctl.dma(EP, 0x5000, 8, false, None, None).unwrap());
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut c = ControlClient::connect(&b.control).unwrap();
                while c.stats().unwrap()["page_requests_outstanding"] != 1 {
                    assert!(Instant::now() < deadline, "cycle {i}: no page request");
                    thread::sleep(Duration::from_millis(1));
                }
                f.disconnect();
                let r = waiter.join().unwrap();
                assert_eq!(error_kind(&r), Some("page-request-failed"), "cycle {i}");
                return;
            }
            _ => {}
        }
        f.disconnect();
    };
    for i in 0..20 {
        cycle(i);
    }
    // Measured in the same state both times: one frontend connected and
    // set up.
    let f = served(&b);
    let (fds0, rss0) = (proc_fd_count(pid).unwrap(), proc_rss_kib(pid).unwrap());
    f.disconnect();
    let start = Instant::now();
    for i in 20..1020 {
        cycle(i);
    }
    let f = served(&b);
    let (fds1, rss1) = (proc_fd_count(pid).unwrap(), proc_rss_kib(pid).unwrap());
    if fds1 != fds0 {
        let mut kinds = std::collections::BTreeMap::new();
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
        {
            let t = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let k = t.split(':').next().unwrap_or("").to_string()
                + ":"
                + t.split(':').nth(1).unwrap_or("");
            *kinds
                .entry(k.chars().take(40).collect::<String>())
                .or_insert(0) += 1;
        }
        println!("open fds by kind: {kinds:?}");
    }
    println!(
        "connection soak: 1000 cycles in {} ms; open fds {fds0} -> {fds1}; RSS {rss0} -> {rss1} KiB",
        start.elapsed().as_millis()
    );
    f.disconnect();
    let s = ControlClient::connect(&b.control).unwrap().stats().unwrap();
    assert_eq!(s["page_requests_outstanding"], 0, "{s}");
    assert_eq!(fds1, fds0, "no file descriptor leaked");
    assert!(rss1 <= rss0 + 2048, "RSS grew from {rss0} to {rss1} KiB");
}

/// A frontend that acknowledges CONFIGURE_MEM_SLOTS (never offered: the
/// vhost crate records whatever is acknowledged) and adds memory regions
/// one by one could make the backend map, and keep, any number of them.
/// A memory table beyond the vhost-user limit without that feature (8
/// regions) ends the connection, so its regions go with it; the next
/// frontend is served and memory stays flat over many such frontends.
#[test]
fn a_frontend_adding_regions_without_end_loses_its_connection() {
    use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};
    use vhost::VhostUserMemoryRegionInfo;
    const REGION: u64 = 1 << 20;
    let mut b = backend(&[]);
    let memfd = {
        let name = std::ffi::CString::new("regions").unwrap();
        // SAFETY: memfd_create with a valid name; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by this File alone.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(REGION).unwrap();
        f
    };
    let mut rss = Vec::new();
    for round in 0..20 {
        let mut f = Frontend::connect_default(&b.socket).unwrap();
        let p = f.acked_protocol | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        f.vu.set_protocol_features(p).unwrap();
        let mut added = 0;
        for i in 0..64u64 {
            let region = VhostUserMemoryRegionInfo {
                guest_phys_addr: (1 << 40) + i * REGION,
                memory_size: REGION,
                userspace_addr: 0x7000_0000_0000 + i * REGION,
                mmap_offset: 0,
                mmap_handle: memfd.as_raw_fd(),
            };
            if f.vu.add_mem_region(&region).is_err() {
                break;
            }
            added += 1;
        }
        assert!(
            added < 64,
            "round {round}: {added} regions added, the connection never ended"
        );
        drop(f);
        assert!(alive(&mut b), "round {round}: the backend died");
        if round == 2 || round == 19 {
            std::thread::sleep(Duration::from_millis(100));
            rss.push(proc_rss_kib(b.child.id()).unwrap());
        }
    }
    // The next frontend is served.
    let mut f = Frontend::connect_default(&b.socket).unwrap();
    assert_eq!(f.request_status(&wire::attach(1, EP, 0, 0)).unwrap(), S_OK);
    eprintln!("regions: rss {} KiB -> {} KiB", rss[0], rss[1]);
    assert!(rss[1] <= rss[0] + 1024, "rss {rss:?}");
}
