// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A view of guest memory for one pass over a queue, that remembers the
//! region it found last.
//!
//! virtio-queue reads every descriptor and ring entry, and writes every
//! used element, through vm-memory's `Bytes` for `GuestMemory`. For a
//! `GuestMemoryMmap` each access builds a slice iterator, looks the region
//! up (binary search) and walks the iterator through `stop_on_error`'s
//! `Peekable`, even when the access lies in one region, as nearly all do:
//! about 700 instructions per request (spec-notes/benchmarks.md). `Bytes`
//! is implemented once for every `GuestMemory`, so it cannot be overridden;
//! what it calls, `GuestMemory::get_slices` and the iterator's
//! `stop_on_error`, can. This view answers an access inside the region it
//! found last with that region's slice, and hands anything else (another
//! region, a range across regions, a hole) to `GuestMemoryMmap` itself, so
//! that results and errors are vm-memory's own.

use std::cell::Cell;
use std::iter::FusedIterator;

use vm_memory::guest_memory::{GuestMemoryBackendSliceIterator, GuestMemorySliceIterator};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress, Permissions, VolatileSlice,
};

type Result<T> = std::result::Result<T, GuestMemoryError>;

/// Guest memory as `GuestMemoryMmap` gives it, with the last region found
/// remembered. One per pass (it is not `Sync`: the cache is a `Cell`), so a
/// memory update (the frontend's SET_MEM_TABLE) is seen at the next pass.
pub(crate) struct CachedMemory<'a> {
    mem: &'a GuestMemoryMmap,
    last: Cell<Option<Region>>,
}

/// Where a region of `mem` lies in the guest and in this process.
#[derive(Clone, Copy)]
struct Region {
    start: u64,
    len: u64,
    host: *mut u8,
}

impl Region {
    /// Where `[addr, addr + count)` starts in this region, if it lies in
    /// it (count > 0).
    fn offset_of(&self, addr: GuestAddress, count: usize) -> Option<usize> {
        let off = addr.0.checked_sub(self.start)?;
        if off < self.len && count as u64 <= self.len - off {
            // Below the region's length, which is a mapping's: a usize.
            usize::try_from(off).ok()
        } else {
            None
        }
    }
}

impl<'a> CachedMemory<'a> {
    pub(crate) fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self {
            mem,
            last: Cell::new(None),
        }
    }

    /// `[addr, addr + count)` as one slice, if it lies in the region found
    /// last or (looked up then remembered) in the region holding `addr`.
    /// `None`: not in one region; the general path decides.
    fn one_slice(&self, addr: GuestAddress, count: usize) -> Option<VolatileSlice<'a>> {
        let (region, off) = match self.last.get() {
            Some(r) => match r.offset_of(addr, count) {
                Some(off) => (r, off),
                None => self.find(addr, count)?,
            },
            None => self.find(addr, count)?,
        };
        // SAFETY: `[off, off + count)` lies in the region (`offset_of`),
        // whose mapping `self.mem` keeps for 'a (vm-memory's own
        // `get_slice` builds its slices the same way); guest memory is only
        // ever accessed through volatile slices.
        Some(unsafe { VolatileSlice::new(region.host.add(off), count) })
    }

    /// The miss path: look the region up, remember it.
    #[cold]
    fn find(&self, addr: GuestAddress, count: usize) -> Option<(Region, usize)> {
        let r: &GuestRegionMmap = self.mem.find_region(addr)?;
        let region = Region {
            start: r.start_addr().0,
            len: r.len(),
            host: r.get_host_address(MemoryRegionAddress(0)).ok()?,
        };
        let off = region.offset_of(addr, count)?;
        self.last.set(Some(region));
        Some((region, off))
    }
}

impl<'a> GuestMemory for CachedMemory<'a> {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        if count == 0 {
            // As vm-memory: an empty range is always valid.
            return true;
        }
        self.one_slice(addr, count).is_some()
            || GuestMemory::check_range(self.mem, addr, count, access)
    }

    fn get_slices<'b>(
        &'b self,
        addr: GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> Result<impl GuestMemorySliceIterator<'b, ()>> {
        if count == 0 {
            // vm-memory's iterator is empty for 0 bytes, at any address.
            return Ok(Slices::One(None));
        }
        Ok(match self.one_slice(addr, count) {
            Some(s) => Slices::One(Some(s)),
            None => Slices::General(GuestMemoryBackend::get_slices(self.mem, addr, count)),
        })
    }

    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        // Only through the view: a caller given the `GuestMemoryMmap`
        // underneath would search its regions on every access again.
        None
    }
}

// VolatileSlice's `copy_to` and `copy_from` add ~30 instructions to each
// copy (an out-of-line call; up to 8 bytes, a unit at a time by
// alignment): ~16 per request, ~30 per relayed fault
// (spec-notes/benchmarks.md, "Cuts, fifth round"). The device copies a
// request out once and decodes its own copy, and the driver reads a reply
// only after the used index, so one plain copy is enough: what vm-memory
// itself does for more than 8 bytes.

/// Copy the start of `slice` into `buf` (as many bytes as both have).
pub(crate) fn copy_out(slice: &VolatileSlice<'_>, buf: &mut [u8]) -> usize {
    let n = slice.len().min(buf.len());
    let src = slice.ptr_guard();
    // SAFETY: `src` is valid for reads of `slice.len()` >= n bytes (a
    // VolatileSlice's invariant), `buf` for writes of n; they cannot
    // overlap: `buf` is ours, not guest memory.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), buf.as_mut_ptr(), n) };
    n
}

/// Copy `data` to the start of `slice` (as many bytes as both have).
pub(crate) fn copy_in(slice: &VolatileSlice<'_>, data: &[u8]) -> usize {
    let n = slice.len().min(data.len());
    let dst = slice.ptr_guard_mut();
    // SAFETY: `dst` is valid for writes of `slice.len()` >= n bytes (a
    // VolatileSlice's invariant; with no dirty bitmap, `()`, nothing else
    // to mark), `data` for reads of n; they cannot overlap: `data` is
    // ours, not guest memory.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst.as_ptr(), n) };
    n
}

/// Guest memory that hands out a range lying in one region as one slice,
/// without vm-memory's per-access iterator: what `device/chain.rs` copies
/// requests and replies through (a range across regions takes `Bytes`).
pub(crate) trait OneRegion: GuestMemory {
    fn slice_in_one_region(&self, addr: GuestAddress, count: usize) -> Option<VolatileSlice<'_>>;
}

impl OneRegion for CachedMemory<'_> {
    fn slice_in_one_region(&self, addr: GuestAddress, count: usize) -> Option<VolatileSlice<'_>> {
        self.one_slice(addr, count)
    }
}

impl OneRegion for GuestMemoryMmap {
    fn slice_in_one_region(&self, addr: GuestAddress, count: usize) -> Option<VolatileSlice<'_>> {
        GuestMemoryBackend::get_slice(self, addr, count).ok()
    }
}

/// The slices of one access: the one found in a cached region, or
/// `GuestMemoryMmap`'s own iterator.
enum Slices<'a> {
    One(Option<VolatileSlice<'a>>),
    General(GuestMemoryBackendSliceIterator<'a, GuestMemoryMmap>),
}

impl<'a> Iterator for Slices<'a> {
    type Item = Result<VolatileSlice<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Slices::One(s) => s.take().map(Ok),
            Slices::General(it) => it.next(),
        }
    }
}

impl FusedIterator for Slices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, ()> for Slices<'a> {
    // The provided one wraps every access in a `Peekable` and a
    // `FilterMap`; one slice needs neither.
    fn stop_on_error(self) -> Result<impl Iterator<Item = VolatileSlice<'a>>> {
        match self {
            Slices::One(s) => Ok(Stopped::One(s)),
            Slices::General(mut it) => match it.next() {
                Some(Err(e)) => Err(e),
                first => Ok(Stopped::General(first.and_then(Result::ok), it)),
            },
        }
    }
}

/// `Slices` after `stop_on_error`: ends at the first error after a slice
/// (vm-memory's iterator yields nothing after an error).
enum Stopped<'a> {
    One(Option<VolatileSlice<'a>>),
    General(
        Option<VolatileSlice<'a>>,
        GuestMemoryBackendSliceIterator<'a, GuestMemoryMmap>,
    ),
}

impl<'a> Iterator for Stopped<'a> {
    type Item = VolatileSlice<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Stopped::One(s) => s.take(),
            Stopped::General(first, it) => first.take().or_else(|| it.next()?.ok()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use vm_memory::Bytes;

    /// [0, 0x2000) and [0x2000, 0x4000) adjacent, a hole, [0x8000, 0x9000).
    fn regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x2000),
            (GuestAddress(0x2000), 0x2000),
            (GuestAddress(0x8000), 0x1000),
        ])
        .unwrap()
    }

    /// Every access gives what `GuestMemoryMmap` gives, byte for byte, and
    /// fails where it fails.
    fn same_as_mmap(addr: u64, len: usize) {
        let plain = regions();
        let cached_mem = regions();
        let view = CachedMemory::new(&cached_mem);
        let a = GuestAddress(addr);
        let data: Vec<u8> = (0..len)
            .map(|i| u8::try_from(i % 251).unwrap() + 1)
            .collect();
        let expect = plain.write_slice(&data, a);
        let got = view.write_slice(&data, a);
        assert_eq!(got.is_ok(), expect.is_ok(), "write at {addr:#x}+{len}");
        let mut x = vec![0u8; len];
        let mut y = vec![0u8; len];
        assert_eq!(
            view.read_slice(&mut y, a).is_ok(),
            plain.read_slice(&mut x, a).is_ok(),
            "read at {addr:#x}+{len}"
        );
        assert_eq!(x, y, "bytes at {addr:#x}+{len}");
        for p in [Permissions::Read, Permissions::Write] {
            assert_eq!(
                view.check_range(a, len, p),
                GuestMemory::check_range(&plain, a, len, p),
                "check_range at {addr:#x}+{len}"
            );
        }
        // Partial writes: vm-memory writes up to the hole; so must we.
        assert_eq!(
            view.write(&data, a).ok(),
            plain.write(&data, a).ok(),
            "write() at {addr:#x}+{len}"
        );
    }

    #[test]
    fn accesses_inside_a_region_and_at_its_edges() {
        for (addr, len) in [
            (0, 1),
            (0x10, 16),
            (0x1ff0, 16),
            (0x1fff, 1),
            (0x2000, 8),
            (0x3ff8, 8),
            (0x8000, 0x1000),
            (0x8fff, 1),
        ] {
            same_as_mmap(addr, len);
        }
    }

    #[test]
    fn an_access_across_two_regions_takes_the_general_path() {
        for (addr, len) in [(0x1ffd, 6), (0x1000, 0x2000), (0, 0x4000)] {
            same_as_mmap(addr, len);
        }
    }

    #[test]
    fn an_access_into_or_beyond_a_hole_fails_as_with_mmap() {
        for (addr, len) in [
            (0x3ffd, 6),
            (0x4000, 1),
            (0x7fff, 2),
            (0x8ffd, 6),
            (0x9000, 1),
            (u64::MAX, 1),
            (u64::MAX - 3, 8),
        ] {
            same_as_mmap(addr, len);
        }
    }

    #[test]
    fn a_zero_length_access_succeeds_anywhere_as_with_mmap() {
        for addr in [0, 0x1fff, 0x4000, 0x9000, u64::MAX] {
            same_as_mmap(addr, 0);
        }
    }

    #[test]
    fn the_cache_follows_the_accesses_from_region_to_region() {
        let mem = regions();
        let view = CachedMemory::new(&mem);
        for round in 0..3u8 {
            for addr in [0x10u64, 0x2010, 0x8010, 0x2010, 0x10] {
                view.write_obj(round, GuestAddress(addr)).unwrap();
                assert_eq!(mem.read_obj::<u8>(GuestAddress(addr)).unwrap(), round);
                assert_eq!(view.read_obj::<u8>(GuestAddress(addr)).unwrap(), round);
            }
            // A miss after a hit in another region does not keep the old
            // region's answer.
            assert!(view.read_obj::<u32>(GuestAddress(0x4000)).is_err());
            assert!(view.read_obj::<u32>(GuestAddress(0x1ffe)).is_ok());
        }
    }

    #[test]
    fn atomic_loads_and_stores_go_through_the_view() {
        let mem = regions();
        let view = CachedMemory::new(&mem);
        view.store(0xbeefu16, GuestAddress(0x2002), Ordering::Release)
            .unwrap();
        assert_eq!(
            view.load::<u16>(GuestAddress(0x2002), Ordering::Acquire)
                .unwrap(),
            0xbeef
        );
        assert!(view
            .load::<u16>(GuestAddress(0x4000), Ordering::Acquire)
            .is_err());
        // Across two regions: vm-memory refuses an atomic access there.
        assert_eq!(
            view.load::<u16>(GuestAddress(0x1fff), Ordering::Acquire)
                .is_ok(),
            mem.load::<u16>(GuestAddress(0x1fff), Ordering::Acquire)
                .is_ok()
        );
    }
}
