// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A user-space driver for QEMU's `edu` PCI device through its VFIO cdev,
//! for the kernel tiers' DMA checks (tests/dma_map.rs, tests/dma_smmu3.rs).
//!
//! `edu` (hw/misc/edu.c, vendor 1234 device 11e8) has a 4 KiB buffer at
//! device address 0x40000 and a DMA engine driven from BAR0: source (0x80),
//! destination (0x88), count (0x90), command (0x98: bit 0 start, bit 1
//! direction, 1 = buffer to RAM). QEMU runs the transfer from a 100 ms
//! timer and clears bit 0 when done; DMA errors are not reported (a faulting
//! write moves nothing, a faulting read fills the buffer with whatever the
//! bus returned). Its default DMA mask is 28 bits: IOVAs stay below 256 MiB.
//!
//! The cdev is opened here and handed to the backend (`--endpoint
//! ID,vfio-fd=N`), which binds it to its iommufd; the open file is shared, so
//! once bound our descriptor is allowed the device ioctls too (a second open
//! of a cdev could not be bound). No guest driver is involved.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

use super::host::HostRig;
use super::{invalid, Error, Frontend, Result};

/// Device address of the buffer.
pub const BUF: u64 = 0x4_0000;
/// Size of the buffer. A transfer must end before the buffer's last byte:
/// QEMU 7.2 (the x86 kernel tier's) aborts the whole machine on one that
/// reaches it (an off-by-one in its range check, fixed in later versions).
pub const BUF_SIZE: usize = 4096;
/// What the tests move per DMA: half a page, so that the bytes around it
/// show that nothing else was written.
pub const XFER: usize = 2048;
/// What register 0 reads (version 1.0, "ed").
const ID: u32 = 0x0100_00ed;

const REG_ID: usize = 0x00;
const REG_DMA_SRC: usize = 0x80;
const REG_DMA_DST: usize = 0x88;
const REG_DMA_CNT: usize = 0x90;
const REG_DMA_CMD: usize = 0x98;
const CMD_RUN: u64 = 1 << 0;
const CMD_TO_RAM: u64 = 1 << 1;

/// VFIO_DEVICE_GET_REGION_INFO: _IO(VFIO_TYPE ';', VFIO_BASE 100 + 8).
const VFIO_DEVICE_GET_REGION_INFO: u64 = 0x3b6c;
const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;

const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// No interrupt is used; keep INTx off so that nothing waits on one.
const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// `struct vfio_region_info` (linux/vfio.h).
#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

/// The edu device behind a VFIO cdev.
pub struct EduDevice {
    file: File,
    bar: *mut u8,
    bar_len: usize,
}

impl EduDevice {
    /// Open the cdev (not bound yet: hand [`EduDevice::backend_fd`] to the
    /// backend, then call [`EduDevice::enable`]).
    pub fn open(path: &str) -> Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(EduDevice {
            file,
            bar: std::ptr::null_mut(),
            bar_len: 0,
        })
    }

    /// An open cdev someone else binds (the passthrough stand-in's, bound
    /// as QEMU binds it): call [`EduDevice::enable`] once it is bound.
    pub fn from_file(file: File) -> Self {
        EduDevice {
            file,
            bar: std::ptr::null_mut(),
            bar_len: 0,
        }
    }

    /// A copy of the descriptor without CLOEXEC, for the backend to inherit
    /// (`vfio-fd=`); close it once the backend is started.
    pub fn backend_fd(&self) -> Result<OwnedFd> {
        // SAFETY: dup of an fd we own; dup clears CLOEXEC on the copy.
        let fd = unsafe { libc::dup(self.file.as_raw_fd()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn region(&self, index: u32) -> Result<RegionInfo> {
        let mut info = RegionInfo {
            argsz: std::mem::size_of::<RegionInfo>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: the ioctl writes at most argsz bytes into `info`, which
        // lives for the call.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                VFIO_DEVICE_GET_REGION_INFO as _,
                &raw mut info,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(info)
    }

    /// Once the backend has bound the device: map BAR0, turn on memory
    /// decoding and bus mastering (INTx off), and check the ID register.
    pub fn enable(&mut self) -> Result<()> {
        if !self.bar.is_null() {
            // Again (after a reset cleared the command register): the BAR
            // stays mapped.
            return self.command_on();
        }
        let bar = self.region(VFIO_PCI_BAR0_REGION_INDEX)?;
        if bar.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || bar.size < 0x100 {
            return invalid(format!(
                "BAR0: flags {:#x} size {:#x}: not mappable",
                bar.flags, bar.size
            ));
        }
        let len = bar.size as usize;
        // SAFETY: a fresh shared mapping of the device's BAR region at the
        // offset VFIO named; the result is checked and unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                bar.offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        self.bar = p.cast();
        self.bar_len = len;
        self.command_on()
    }

    /// Memory decoding and bus mastering on (INTx off); check the ID.
    fn command_on(&mut self) -> Result<()> {
        let cfg = self.region(VFIO_PCI_CONFIG_REGION_INDEX)?;
        let mut cmd = [0u8; 2];
        self.file
            .read_exact_at(&mut cmd, cfg.offset + PCI_COMMAND)?;
        let cmd = u16::from_le_bytes(cmd)
            | PCI_COMMAND_MEMORY
            | PCI_COMMAND_MASTER
            | PCI_COMMAND_INTX_DISABLE;
        self.file
            .write_all_at(&cmd.to_le_bytes(), cfg.offset + PCI_COMMAND)?;

        let id = self.read32(REG_ID);
        if id != ID {
            return invalid(format!("edu ID register reads {id:#x}, want {ID:#x}"));
        }
        Ok(())
    }

    fn read32(&self, reg: usize) -> u32 {
        assert!(reg + 4 <= self.bar_len, "register {reg:#x} outside BAR0");
        // SAFETY: inside the BAR mapping (checked), 4-byte aligned; MMIO
        // needs volatile accesses.
        unsafe { std::ptr::read_volatile(self.bar.add(reg).cast::<u32>()) }
    }

    fn read64(&self, reg: usize) -> u64 {
        assert!(reg + 8 <= self.bar_len, "register {reg:#x} outside BAR0");
        // SAFETY: as read32; the DMA registers take 8-byte accesses.
        unsafe { std::ptr::read_volatile(self.bar.add(reg).cast::<u64>()) }
    }

    fn write64(&self, reg: usize, v: u64) {
        assert!(reg + 8 <= self.bar_len, "register {reg:#x} outside BAR0");
        // SAFETY: as read64.
        unsafe { std::ptr::write_volatile(self.bar.add(reg).cast::<u64>(), v) }
    }

    fn run(&self, src: u64, dst: u64, len: usize, cmd: u64) -> Result<()> {
        let off = if cmd & CMD_TO_RAM != 0 { src } else { dst } - BUF;
        if len == 0 || off + len as u64 >= BUF_SIZE as u64 {
            return invalid(format!(
                "edu buffer range {off:#x}+{len:#x}: it must end before the buffer does"
            ));
        }
        self.write64(REG_DMA_SRC, src);
        self.write64(REG_DMA_DST, dst);
        self.write64(REG_DMA_CNT, len as u64);
        self.write64(REG_DMA_CMD, cmd | CMD_RUN);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.read64(REG_DMA_CMD) & CMD_RUN != 0 {
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "edu DMA {src:#x} -> {dst:#x} ({len} bytes) still running"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// DMA read: `len` bytes at `iova` into the buffer at `off`.
    pub fn read_from(&self, iova: u64, off: u64, len: usize) -> Result<()> {
        self.run(iova, BUF + off, len, 0)
    }

    /// DMA write: `len` bytes of the buffer at `off` to `iova`.
    pub fn write_to(&self, off: u64, iova: u64, len: usize) -> Result<()> {
        self.run(BUF + off, iova, len, CMD_TO_RAM)
    }
}

impl Drop for EduDevice {
    fn drop(&mut self) {
        if !self.bar.is_null() {
            // SAFETY: the mapping made in enable(), not used after this.
            unsafe { libc::munmap(self.bar.cast(), self.bar_len) };
        }
    }
}

/// Kernel log records written from now on (/dev/kmsg), to find the fault
/// lines an IOMMU driver prints.
pub struct KernelLog {
    file: File,
}

impl KernelLog {
    /// Open /dev/kmsg positioned at its end.
    pub fn from_now() -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")?;
        // SAFETY: lseek on an fd we own; SEEK_END on /dev/kmsg skips the
        // records already in the buffer.
        if unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) } < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(KernelLog { file })
    }

    /// Wait up to `timeout` for an IOMMU fault line naming `iova` (a
    /// driver's fault line names the address in hex): Ok(that line), or
    /// Err(what was logged meanwhile), for the failure message.
    pub fn wait_for_fault(
        &mut self,
        iova: u64,
        timeout: std::time::Duration,
    ) -> std::result::Result<String, Vec<String>> {
        let needle = format!("{iova:#x}");
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            for l in self.new_lines() {
                if l.contains("fault") && l.contains(&needle) {
                    return Ok(l);
                }
                seen.push(l);
            }
            if std::time::Instant::now() >= deadline {
                return Err(seen);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The messages logged since the last call (one record per read).
    pub fn new_lines(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: reads at most buf.len() bytes into `buf`.
            let n =
                unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                let rec = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
                // "prio,seq,time,flags;message\n" then " KEY=value\n" lines.
                let msg = rec.split_once(';').map_or(rec.as_str(), |(_, m)| m);
                out.push(msg.lines().next().unwrap_or("").to_string());
                continue;
            }
            // EPIPE: records were overwritten; the read goes on after them.
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPIPE) {
                continue;
            }
            return out;
        }
    }
}

/// Guest RAM of the frontend in these tests.
pub const MEM: usize = 16 << 20;

/// The backend serving the edu device (`VIOMMU_EDU_CDEV`) as endpoint `ep`
/// on the test's iommufd, a frontend connected to it, and the device
/// enabled for DMA.
pub struct DmaRig {
    pub rig: HostRig,
    pub f: Frontend,
    pub edu: EduDevice,
}

impl DmaRig {
    pub fn new(ep: u32) -> DmaRig {
        let path = std::env::var("VIOMMU_EDU_CDEV")
            .expect("VIOMMU_EDU_CDEV names the edu device's VFIO cdev (/dev/vfio/devices/vfioN)");
        let mut edu = EduDevice::open(&path).expect("open the edu cdev");
        let fd = edu.backend_fd().expect("dup the cdev");
        let arg = format!("{ep:#x},vfio-fd={}", fd.as_raw_fd());
        let rig = HostRig::new(&["--endpoint", &arg]);
        // The backend has its copy (and has bound the device).
        drop(fd);
        edu.enable().expect("edu BAR0 mapped, bus master on");
        let f = rig.connect_with(&[(0, MEM)]);
        DmaRig { rig, f, edu }
    }

    /// `n` consecutive guest pages, each filled with `byte`.
    pub fn pages(&self, n: u64, byte: u8) -> Vec<u64> {
        let base = self.f.mem.alloc(n * 0x1000, 0x1000).unwrap();
        self.f.mem.fill(base, (n * 0x1000) as usize, byte).unwrap();
        (0..n).map(|i| base + i * 0x1000).collect()
    }

    /// The 4 KiB of guest RAM (the memfd the backend maps) at `gpa`.
    pub fn page(&self, gpa: u64) -> Vec<u8> {
        self.f.mem.read_vec(gpa, BUF_SIZE).unwrap()
    }
}

/// Send `req` through `f` and assert that it is answered OK (`what`
/// names it in the failure).
pub fn request_ok<R: AsRef<[u8]>>(f: &mut Frontend, req: (R, u32), what: &str) {
    assert_eq!(
        f.request_status(&req).expect("answered"),
        super::wire::S_OK,
        "{what}"
    );
}

/// The handover tests' start (tests/passthrough.rs, passthrough_qemu.rs):
/// endpoint `ep` attached to domain 1, five guest pages allocated and
/// filled with `fill`, the first mapped read-write at `iova_a` and the
/// second at `iova_b`. Returns the five pages' guest addresses.
pub fn attach_and_map_two(
    f: &mut Frontend,
    ep: u32,
    iova_a: u64,
    iova_b: u64,
    fill: u8,
) -> Vec<u64> {
    use super::wire;
    const RW: u32 = wire::MAP_F_READ | wire::MAP_F_WRITE;
    request_ok(f, wire::attach(1, ep, 0, 0), "ATTACH");
    let base = f.mem.alloc(5 * 0x1000, 0x1000).unwrap();
    f.mem.fill(base, 5 * 0x1000, fill).unwrap();
    let p: Vec<u64> = (0..5).map(|i| base + i * 0x1000).collect();
    request_ok(f, wire::map(1, iova_a, iova_a + 0xfff, p[0], RW), "MAP A");
    request_ok(f, wire::map(1, iova_b, iova_b + 0xfff, p[1], RW), "MAP B");
    p
}

/// 4 KiB that no other seed and no fill byte produces.
pub fn pattern(seed: u8) -> Vec<u8> {
    (0..BUF_SIZE)
        .map(|i| (i as u8).wrapping_mul(31) ^ ((i >> 8) as u8) ^ seed.wrapping_mul(0x65))
        .collect()
}

/// A page of `fill` with `data` at `off`: what a DMA of `data` to that
/// offset leaves.
pub fn page_with(fill: u8, off: usize, data: &[u8]) -> Vec<u8> {
    let mut p = vec![fill; BUF_SIZE];
    p[off..off + data.len()].copy_from_slice(data);
    p
}

/// Whether every byte of `page` is `byte`.
pub fn all(page: &[u8], byte: u8) -> bool {
    page.iter().all(|&b| b == byte)
}

/// A line for the tier's log even when the test passes: appended to the
/// file `VIOMMU_TEST_NOTES` names (the guest scripts print it after the
/// run; stderr would split libtest's `test NAME ... ok` line), else stderr.
pub fn note(msg: &str) {
    use std::io::Write;
    let line = format!("dma-note: {msg}\n");
    if let Some(path) = std::env::var_os("VIOMMU_TEST_NOTES") {
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(line.as_bytes());
            return;
        }
    }
    eprint!("{line}");
}
