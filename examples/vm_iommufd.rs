// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Kernel-tier guest test: our iommufd layer (`iommufd_bridge::sys`)
//! against the real /dev/iommu of a test kernel, checked by the kernel's own
//! selftest mock (CONFIG_IOMMUFD_TEST). Built static and run inside the VM by
//! tests/vm/kernel-tier.sh; prints one PASS/FAIL line per check and
//! `vm-iommufd: N passed, M failed`.
// Test code with known small values (sizes, counts, timings): these casts
// cannot truncate or wrap.
#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]

use std::path::Path;
use std::process::ExitCode;

use vhost_device_iommu::iommufd_bridge::sys::{
    FaultQueue, Iommufd, IovaRanges, SysError, HWPT_ALLOC_NEST_PARENT, IOAS_MAP_READABLE,
    IOAS_MAP_WRITEABLE,
};

/// Inside the mock's IOVA aperture [1 << 24, (1 << 31) - 1].
const IOVA: u64 = 0x100_0000;
const IOVA2: u64 = 0x200_0000;
const LEN: u64 = 64 << 10;
const RW: u32 = IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE;

struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    fn check(&mut self, name: &str, r: Result<(), String>) -> bool {
        match r {
            Ok(()) => {
                self.passed += 1;
                println!("PASS {name}");
                true
            }
            Err(e) => {
                self.failed += 1;
                println!("FAIL {name}: {e}");
                false
            }
        }
    }
}

fn s(e: SysError) -> String {
    format!("{e} (errno {:?})", e.errno())
}

/// A memfd-backed buffer, as guest RAM is.
fn memfd_buffer(len: u64) -> Result<u64, String> {
    // SAFETY: memfd_create takes a NUL-terminated name; the fd is ours.
    let fd = unsafe { libc::memfd_create(c"vm-iommufd".as_ptr(), 0) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a memfd we own; ftruncate only sizes it.
    if unsafe { libc::ftruncate(fd, len as i64) } != 0 {
        return Err(format!("ftruncate: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new shared mapping of our own memfd; nothing else uses the
    // address range. The mapping lives until the process exits.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    Ok(p as u64)
}

fn main() -> ExitCode {
    let mut r = Report {
        passed: 0,
        failed: 0,
    };
    let fd = match Iommufd::open(Path::new("/dev/iommu")) {
        Ok(fd) => fd,
        Err(e) => {
            r.check("open /dev/iommu", Err(s(e)));
            println!("vm-iommufd: {} passed, {} failed", r.passed, r.failed);
            return ExitCode::FAILURE;
        }
    };
    r.check("open /dev/iommu", Ok(()));
    let run = |r: &mut Report| -> Result<(), String> {
        let buf = memfd_buffer(LEN)?;
        let ioas = fd.ioas_alloc().map_err(s)?;
        let dev = fd.mock_domain(ioas).map_err(s)?;
        r.check("IOAS_ALLOC + MOCK_DOMAIN", Ok(()));

        let IovaRanges {
            usable: ranges,
            alignment: align,
        } = fd.iova_ranges(ioas).map_err(s)?;
        r.check(
            "IOAS_IOVA_RANGES reports the mock aperture",
            if ranges
                .iter()
                .any(|r| r.start <= IOVA && IOVA2 + LEN - 1 <= r.last)
                && align >= 1
            {
                Ok(())
            } else {
                Err(format!("ranges {ranges:x?} align {align}"))
            },
        );

        r.check(
            "IOAS_MAP of memfd memory, verified by MD_CHECK_MAP",
            fd.ioas_map(ioas, buf, LEN, IOVA, RW)
                .and_then(|_| fd.md_check_map(dev.hwpt_id, IOVA, LEN, buf))
                .map_err(s),
        );
        r.check(
            "MD_CHECK_MAP refuses the wrong pages (negative control)",
            match fd.md_check_map(dev.hwpt_id, IOVA, LEN, buf + 0x1000) {
                Ok(()) => Err("the kernel accepted a wrong mapping".into()),
                Err(_) => Ok(()),
            },
        );
        r.check(
            "pages pinned once (MD_CHECK_REFS 1)",
            fd.md_check_refs(buf, LEN, 1).map_err(s),
        );

        // A second address space that shares the first one's pins.
        let ioas2 = fd.ioas_alloc().map_err(s)?;
        let dev2 = fd.mock_domain(ioas2).map_err(s)?;
        r.check(
            "IOAS_COPY into a second IOAS, verified by MD_CHECK_MAP",
            fd.ioas_copy(ioas2, IOVA2, ioas, IOVA, LEN, RW)
                .and_then(|_| fd.md_check_map(dev2.hwpt_id, IOVA2, LEN, buf))
                .map_err(s),
        );
        r.check(
            "IOAS_COPY does not pin again (MD_CHECK_REFS 1)",
            fd.md_check_refs(buf, LEN, 1).map_err(s),
        );
        r.check(
            "a partial UNMAP is refused (ENOENT)",
            match fd.ioas_unmap(ioas2, IOVA2, LEN / 2) {
                Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        r.check(
            "IOAS_UNMAP of the copy returns its length",
            match fd.ioas_unmap(ioas2, IOVA2, LEN) {
                Ok(n) if n == LEN => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        r.check(
            "the copy is gone from the mock domain",
            match fd.md_check_map(dev2.hwpt_id, IOVA2, LEN, buf) {
                Ok(()) => Err("still mapped".into()),
                Err(_) => Ok(()),
            },
        );

        let parent = fd.hwpt_alloc(dev.dev_id, ioas, HWPT_ALLOC_NEST_PARENT, 0, &mut [], None);
        r.check(
            "HWPT_ALLOC nesting parent on the IOAS",
            parent.as_ref().map(|_| ()).map_err(|e| format!("{e}")),
        );
        let FaultQueue {
            id: fault_id,
            file: fault_fd,
        } = fd.fault_queue_alloc().map_err(s)?;
        let mut rec = [0u8; 40];
        // SAFETY: reads at most 40 bytes into `rec`, which has 40.
        let n = unsafe {
            libc::read(
                std::os::fd::AsRawFd::as_raw_fd(&fault_fd),
                rec.as_mut_ptr().cast(),
                rec.len(),
            )
        };
        r.check(
            "FAULT_QUEUE_ALLOC: an empty fault fd reads 0",
            if fault_id.raw() != 0 && n == 0 {
                Ok(())
            } else {
                Err(format!("id {fault_id} read {n}"))
            },
        );

        // Teardown in dependency order; nothing may stay pinned.
        drop(fault_fd);
        let teardown = (|| {
            fd.destroy(fault_id)?;
            if let Ok(p) = parent {
                fd.destroy(p)?;
            }
            fd.destroy(dev2.stdev_id)?;
            fd.destroy(dev.stdev_id)?;
            fd.ioas_unmap(ioas, IOVA, LEN)?;
            fd.destroy(ioas2)?;
            fd.destroy(ioas)
        })();
        r.check("teardown in dependency order", teardown.map_err(s));
        r.check(
            "no page left pinned (MD_CHECK_REFS 0)",
            fd.md_check_refs(buf, LEN, 0).map_err(s),
        );
        Ok(())
    };
    if let Err(e) = run(&mut r) {
        r.check("setup", Err(e));
    }
    println!("vm-iommufd: {} passed, {} failed", r.passed, r.failed);
    if r.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
