// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest RAM: one memfd, mapped `MAP_SHARED` in the test process and handed
//! to the backend with `SET_MEM_TABLE`. Region `i` of the guest-physical
//! layout lives at memfd offset `sum(size of regions before i)`.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use vhost::VhostUserMemoryRegionInfo;

use super::{invalid, Error, Result};

/// Default guest RAM size.
pub const DEFAULT_MEM_SIZE: usize = 64 << 20;

/// First GPA handed out by the bump allocator (page 0 stays unused so that a
/// zero address in a request is never a harness buffer).
const ALLOC_START: u64 = 0x1000;

/// One contiguous guest-physical region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in the memfd (and in the local mapping).
    pub file_offset: u64,
}

impl MemRegion {
    /// Whether `[gpa, gpa+len)` lies entirely inside this region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= self.gpa + self.size)
    }
}

/// Guest RAM shared with the backend. All accessors take `&self`: the memory
/// is shared with another process anyway, so Rust's aliasing rules cannot
/// describe it; ring fields are accessed with atomics, payloads with plain
/// copies (the virtio protocol hands buffers over with barriers in between).
pub struct GuestMem {
    file: File,
    base: *mut u8,
    total: usize,
    regions: Vec<MemRegion>,
    /// Per-region bump pointer (next free GPA).
    next: Mutex<Vec<u64>>,
}

// SAFETY: `base` points to a MAP_SHARED mapping owned by this struct for its
// whole life; every access goes through bounds-checked methods and the
// mapping itself has no thread affinity.
unsafe impl Send for GuestMem {}
// SAFETY: see `Send`; concurrent accesses are raw memory accesses to shared
// memory (like a guest's RAM), and the allocator state is behind a Mutex.
unsafe impl Sync for GuestMem {}

impl GuestMem {
    /// One region at GPA 0 of `size` bytes.
    pub fn new(size: usize) -> Result<Self> {
        Self::with_regions(&[(0, size)])
    }

    /// The default 64 MiB at GPA 0.
    pub fn default_size() -> Result<Self> {
        Self::new(DEFAULT_MEM_SIZE)
    }

    /// Two regions with a hole between: `[0, low)` and `[high_gpa, high_gpa+high_size)`.
    pub fn with_hole(low: usize, high_gpa: u64, high_size: usize) -> Result<Self> {
        Self::with_regions(&[(0, low), (high_gpa, high_size)])
    }

    /// Arbitrary layout: `(gpa, size)` pairs, sorted, non-overlapping,
    /// page-aligned.
    pub fn with_regions(layout: &[(u64, usize)]) -> Result<Self> {
        if layout.is_empty() {
            return invalid("GuestMem needs at least one region");
        }
        let mut regions = Vec::with_capacity(layout.len());
        let mut off = 0u64;
        let mut prev_end = 0u64;
        for (i, &(gpa, size)) in layout.iter().enumerate() {
            if size == 0 || size % 4096 != 0 || gpa % 4096 != 0 {
                return invalid(format!("region {i} ({gpa:#x}, {size:#x}) not page-aligned"));
            }
            if i > 0 && gpa < prev_end {
                return invalid(format!("region {i} at {gpa:#x} overlaps or is unsorted"));
            }
            prev_end = gpa + size as u64;
            regions.push(MemRegion {
                gpa,
                size: size as u64,
                file_offset: off,
            });
            off += size as u64;
        }
        let total = off as usize;

        let name = CString::new("vhost-iommu-guest-ram").expect("static name");
        // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(total as u64)?;
        // SAFETY: mapping a fresh, correctly sized memfd; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        let next = regions
            .iter()
            .map(|r| if r.gpa == 0 { ALLOC_START } else { r.gpa })
            .collect();
        Ok(GuestMem {
            file,
            base: base.cast::<u8>(),
            total,
            regions,
            next: Mutex::new(next),
        })
    }

    /// The memfd backing guest RAM.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Raw fd of the memfd.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The guest-physical layout.
    pub fn regions(&self) -> &[MemRegion] {
        &self.regions
    }

    /// Total bytes of guest RAM.
    pub fn total_size(&self) -> usize {
        self.total
    }

    /// The region descriptions for `SET_MEM_TABLE`. `userspace_addr` is the
    /// real address of the region in this process, so vring addresses must
    /// be translated with [`GuestMem::uva`].
    pub fn region_infos(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: self.base as u64 + r.file_offset,
                mmap_offset: r.file_offset,
                mmap_handle: self.file.as_raw_fd(),
            })
            .collect()
    }

    fn region_of(&self, gpa: u64, len: u64) -> Option<&MemRegion> {
        self.regions.iter().find(|r| r.contains(gpa, len))
    }

    /// Whether `[gpa, gpa+len)` is entirely guest RAM.
    pub fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.region_of(gpa, len).is_some()
    }

    /// Userspace (frontend) virtual address of `gpa`, as used in
    /// `SET_VRING_ADDR`.
    pub fn uva(&self, gpa: u64) -> Result<u64> {
        Ok(self.host_ptr(gpa, 0)? as u64)
    }

    /// Local pointer to `[gpa, gpa+len)`, bounds-checked.
    pub fn host_ptr(&self, gpa: u64, len: usize) -> Result<*mut u8> {
        match self.region_of(gpa, len as u64) {
            // SAFETY: the region check keeps the offset inside the mapping.
            Some(r) => Ok(unsafe { self.base.add((r.file_offset + gpa - r.gpa) as usize) }),
            None => invalid(format!(
                "GPA range [{gpa:#x}, +{len:#x}) is not inside guest RAM"
            )),
        }
    }

    /// Copy `data` to guest RAM at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let p = self.host_ptr(gpa, data.len())?;
        // SAFETY: `p..p+len` is inside the mapping (checked); the source is a
        // distinct Rust slice, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Copy guest RAM at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let p = self.host_ptr(gpa, buf.len())?;
        // SAFETY: `p..p+len` is inside the mapping (checked); `buf` is a
        // distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Read `len` bytes at `gpa` into a new vector.
    pub fn read_vec(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(gpa, &mut v)?;
        Ok(v)
    }

    /// Append `len` bytes at `gpa` to `out`.
    pub fn read_append(&self, gpa: u64, len: usize, out: &mut Vec<u8>) -> Result<()> {
        let p = self.host_ptr(gpa, len)?;
        out.reserve(len);
        // SAFETY: the source range is inside the mapping (checked); the
        // destination is the reserved, uninitialised tail of `out`, which
        // becomes initialised by the copy before `set_len`.
        unsafe {
            std::ptr::copy_nonoverlapping(p, out.as_mut_ptr().add(out.len()), len);
            out.set_len(out.len() + len);
        }
        Ok(())
    }

    /// Fill `[gpa, gpa+len)` with `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) -> Result<()> {
        let p = self.host_ptr(gpa, len)?;
        // SAFETY: the range is inside the mapping (checked).
        unsafe { std::ptr::write_bytes(p, byte, len) };
        Ok(())
    }

    /// Little-endian scalar accessors.
    pub fn read_u8(&self, gpa: u64) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read(gpa, &mut b)?;
        Ok(b[0])
    }
    pub fn read_u16(&self, gpa: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    pub fn read_u32(&self, gpa: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    pub fn read_u64(&self, gpa: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    pub fn write_u8(&self, gpa: u64, v: u8) -> Result<()> {
        self.write(gpa, &[v])
    }
    pub fn write_u16(&self, gpa: u64, v: u16) -> Result<()> {
        self.write(gpa, &v.to_le_bytes())
    }
    pub fn write_u32(&self, gpa: u64, v: u32) -> Result<()> {
        self.write(gpa, &v.to_le_bytes())
    }
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<()> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// An atomic view of the naturally aligned u16 at `gpa` (ring indices).
    pub fn atomic_u16(&self, gpa: u64) -> Result<&AtomicU16> {
        self.atomic::<AtomicU16>(gpa)
    }
    /// An atomic view of the naturally aligned u32 at `gpa`.
    pub fn atomic_u32(&self, gpa: u64) -> Result<&AtomicU32> {
        self.atomic::<AtomicU32>(gpa)
    }
    /// An atomic view of the naturally aligned u64 at `gpa`.
    pub fn atomic_u64(&self, gpa: u64) -> Result<&AtomicU64> {
        self.atomic::<AtomicU64>(gpa)
    }

    fn atomic<T>(&self, gpa: u64) -> Result<&T> {
        let size = std::mem::size_of::<T>();
        if !gpa.is_multiple_of(size as u64) {
            return invalid(format!("GPA {gpa:#x} not aligned for a {size}-byte atomic"));
        }
        let p = self.host_ptr(gpa, size)?;
        // SAFETY: in bounds (checked), aligned (the mapping is page-aligned
        // and the GPA offset is a multiple of the size), and the atomic types
        // have the same layout as the integers; the reference lives no
        // longer than `self`, which owns the mapping.
        Ok(unsafe { &*(p as *const T) })
    }

    /// Allocate `size` bytes aligned to `align` (a power of two) in region 0.
    pub fn alloc(&self, size: u64, align: u64) -> Result<u64> {
        self.alloc_in(0, size, align)
    }

    /// Allocate `size` bytes aligned to `align` in region `region`.
    /// Allocations are never freed; memory starts zeroed (fresh memfd).
    pub fn alloc_in(&self, region: usize, size: u64, align: u64) -> Result<u64> {
        if !align.is_power_of_two() {
            return invalid(format!("alignment {align} is not a power of two"));
        }
        let r = match self.regions.get(region) {
            Some(r) => *r,
            None => return invalid(format!("no region {region}")),
        };
        let mut next = self.next.lock().expect("allocator lock poisoned");
        let start = (next[region] + align - 1) & !(align - 1);
        let end = start.checked_add(size.max(1));
        match end {
            Some(end) if end <= r.gpa + r.size => {
                next[region] = end;
                Ok(start)
            }
            _ => invalid(format!(
                "guest RAM region {region} exhausted: cannot allocate {size:#x} bytes \
                 (next {:#x}, end {:#x})",
                next[region],
                r.gpa + r.size
            )),
        }
    }

    /// Allocate and fill a buffer with `data`; returns its GPA.
    pub fn alloc_bytes(&self, data: &[u8], align: u64) -> Result<u64> {
        let gpa = self.alloc(data.len() as u64, align)?;
        self.write(gpa, data)?;
        Ok(gpa)
    }

    /// A GPA range guaranteed not to be guest RAM: the hole between region 0
    /// and region 1 if there is one, else the first page above the end of RAM.
    pub fn unmapped_gpa(&self) -> u64 {
        match self.regions.get(1) {
            Some(r1) if r1.gpa > self.regions[0].gpa + self.regions[0].size => {
                self.regions[0].gpa + self.regions[0].size
            }
            _ => {
                let last = self.regions[self.regions.len() - 1];
                last.gpa + last.size
            }
        }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: `base`/`total` describe the mapping created in `with_regions`,
        // and nothing can reference it once `self` is being dropped.
        unsafe { libc::munmap(self.base.cast::<libc::c_void>(), self.total) };
    }
}

/// Page tables in a test's guest memory: the crate's VT-d table builder
/// allocates its pages from the guest's allocator.
pub struct TablePages(pub std::sync::Arc<GuestMem>);

impl vhost_device_iommu::nested::walker::TableMemory for TablePages {
    fn alloc_page(&mut self) -> u64 {
        // Fresh memfd pages are zero and the allocator never reuses.
        self.0
            .alloc(4096, 4096)
            .expect("guest RAM for a table page")
    }

    fn write_u64(&mut self, gpa: u64, value: u64) {
        GuestMem::write_u64(&self.0, gpa, value).expect("table entry in guest RAM")
    }

    fn read_u64(&mut self, gpa: u64) -> u64 {
        GuestMem::read_u64(&self.0, gpa).expect("table entry in guest RAM")
    }
}
