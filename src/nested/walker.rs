// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Software walker for Intel VT-d first-stage page tables, and a builder
//! that writes such tables.
//!
//! First-stage tables use the x86-64 paging format: 4 levels for an address
//! width of 48 bits, 5 levels for 57. Levels are numbered as in Linux and the
//! VT-d spec: 5 (PML5), 4 (PML4), 3 (PDPT), 2 (PD), 1 (PT).
//!
//! The walker serves hostile guests, so it allocates nothing, never panics
//! and never writes guest memory: it does not set the Accessed or Dirty bits
//! (a guest that relies on A/D for DMA pages will not see them change). A
//! user request (the default: no privilege asked) needs U/S at every level,
//! as VT-d's first stage does, so a device bound to a process's page table
//! (SVA) cannot reach the kernel half of it; a privileged request ignores
//! U/S (whether it may be made at all is the attachment's SRE, checked by
//! the caller). A write needs R/W at every level. XD (bit 63) is
//! ignored as DMA never executes. The GPA a walk returns is not checked
//! against guest RAM; the caller does that for the whole access.
//!
//! The builder ([`TableBuilder`]) reaches memory through the [`TableMemory`]
//! trait, so it works on any memory: [`MmapTableMemory`] adapts a vm-memory
//! [`GuestMemory`] (e.g. a `GuestMemoryMmap`) with a bump allocator, and a
//! test may implement the trait on its own model of guest RAM.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Page sizes a leaf can map.
pub const PAGE_4K: u64 = 1 << 12;
pub const PAGE_2M: u64 = 1 << 21;
pub const PAGE_1G: u64 = 1 << 30;

// x86-64 paging entry bits we use.
/// Present.
pub(crate) const PTE_P: u64 = 1 << 0;
/// Writable.
pub const PTE_RW: u64 = 1 << 1;
/// User: a user request needs it at every level.
pub const PTE_US: u64 = 1 << 2;
/// Page size: a leaf at level 3 (1 GiB) or 2 (2 MiB); PAT at level 1.
pub(crate) const PTE_PS: u64 = 1 << 7;
/// Address field of an entry: bits 51:12.
pub(crate) const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Frame address of a 1 GiB leaf: bits 51:30.
const ADDR_MASK_1G: u64 = 0x000f_ffff_c000_0000;
/// Frame address of a 2 MiB leaf: bits 51:21.
const ADDR_MASK_2M: u64 = 0x000f_ffff_ffe0_0000;
/// Must be zero in a 1 GiB leaf: bits 29:13 (bit 12 is PAT).
const RSVD_1G: u64 = 0x3fff_e000;
/// Must be zero in a 2 MiB leaf: bits 20:13 (bit 12 is PAT).
const RSVD_2M: u64 = 0x001f_e000;

/// Entries per table.
const ENTRIES: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walked {
    /// Guest-physical address `iova` translates to.
    pub gpa: u64,
    /// Size of the leaf page (4K, 2M or 1G); the page starts at iova & !(page_size-1).
    pub page_size: u64,
    /// Every level allows writes.
    pub writable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("addr_width {0} is neither 48 nor 57")]
    BadWidth(u32),
    #[error("iova {0:#x} is not canonical for the table's width")]
    NonCanonical(u64),
    #[error("entry at level {level} (gpa {entry_gpa:#x}) is not present")]
    NotPresent { level: u8, entry_gpa: u64 },
    #[error("write to iova {iova:#x} denied at level {level}")]
    ReadOnly { level: u8, iova: u64 },
    #[error("user request to iova {iova:#x} denied at level {level} (U/S clear)")]
    SupervisorOnly { level: u8, iova: u64 },
    #[error("entry at level {level} has reserved bits set ({entry:#x})")]
    Reserved { level: u8, entry: u64 },
    #[error("table at gpa {0:#x} is outside guest RAM")]
    TableOutsideRam(u64),
}

/// Number of paging levels for `addr_width` (48 → 4, 57 → 5).
pub(crate) fn levels_for_width(addr_width: u32) -> Result<u8, WalkError> {
    match addr_width {
        48 => Ok(4),
        57 => Ok(5),
        w => Err(WalkError::BadWidth(w)),
    }
}

/// Whether bits 63..(addr_width-1) of `iova` are all equal. `addr_width`
/// must be 48 or 57 (anything in 1..=64 gives a meaningful answer).
pub(crate) fn is_canonical(iova: u64, addr_width: u32) -> bool {
    let shift = 64u32.saturating_sub(addr_width).min(63);
    // Sign-extend from bit addr_width-1: an arithmetic shift on the bits as i64.
    ((iova << shift).cast_signed() >> shift).cast_unsigned() == iova
}

/// Index of `iova` in a table at `level` (1..=5).
fn index(iova: u64, level: u8) -> u64 {
    let shift = 12 + 9 * u32::from(level.saturating_sub(1));
    (iova >> shift.min(63)) & (ENTRIES - 1)
}

/// Reads the entry at `gpa` as the hardware would: one 64-bit load, so a
/// guest rewriting it concurrently cannot hand us a torn value.
fn read_entry<M: GuestMemory + ?Sized>(mem: &M, gpa: u64) -> Result<u64, WalkError> {
    let addr = GuestAddress(gpa);
    mem.load::<u64>(addr, Ordering::Acquire)
        .map(u64::from_le)
        // A backend whose host mapping is not 8-byte aligned refuses atomic
        // loads; a plain copy is still correct there.
        .or_else(|_| mem.read_obj::<[u8; 8]>(addr).map(u64::from_le_bytes))
        .map_err(|_| WalkError::TableOutsideRam(gpa))
}

/// Walk the table rooted at `root` (GPA of the PML4 for width 48, of the PML5 for 57)
/// for an access at `iova`. Levels are numbered like Linux/VT-d: 5 (PML5), 4 (PML4),
/// 3 (PDPT), 2 (PD), 1 (PT).
///
/// The low 12 bits of `root` are ignored, as in the pointer field of a PASID
/// entry. Checks at each level, in order: presence, reserved bits, U/S
/// (only when `user`), then write permission (only when `write`).
pub fn walk<M: GuestMemory + ?Sized>(
    mem: &M,
    root: u64,
    addr_width: u32,
    iova: u64,
    write: bool,
    user: bool,
) -> Result<Walked, WalkError> {
    let levels = levels_for_width(addr_width)?;
    if !is_canonical(iova, addr_width) {
        return Err(WalkError::NonCanonical(iova));
    }
    let mut table = root & !(PAGE_4K - 1);
    let mut writable = true;
    let mut level = levels;
    loop {
        // `table` is 4 KiB aligned and the offset below 4 KiB: no overflow.
        let entry_gpa = table | (index(iova, level) * 8);
        let entry = read_entry(mem, entry_gpa)?;
        if entry & PTE_P == 0 {
            return Err(WalkError::NotPresent { level, entry_gpa });
        }
        let leaf = match level {
            1 => Some((PTE_ADDR_MASK, PAGE_4K)),
            2 if entry & PTE_PS != 0 => {
                if entry & RSVD_2M != 0 {
                    return Err(WalkError::Reserved { level, entry });
                }
                Some((ADDR_MASK_2M, PAGE_2M))
            }
            3 if entry & PTE_PS != 0 => {
                if entry & RSVD_1G != 0 {
                    return Err(WalkError::Reserved { level, entry });
                }
                Some((ADDR_MASK_1G, PAGE_1G))
            }
            4 | 5 if entry & PTE_PS != 0 => return Err(WalkError::Reserved { level, entry }),
            _ => None,
        };
        if user && entry & PTE_US == 0 {
            return Err(WalkError::SupervisorOnly { level, iova });
        }
        if entry & PTE_RW == 0 {
            if write {
                return Err(WalkError::ReadOnly { level, iova });
            }
            writable = false;
        }
        match leaf {
            Some((frame_mask, page_size)) => {
                // Frame and offset bits are disjoint.
                let gpa = (entry & frame_mask) | (iova & (page_size - 1));
                return Ok(Walked {
                    gpa,
                    page_size,
                    writable,
                });
            }
            None => {
                table = entry & PTE_ADDR_MASK;
                level -= 1;
            }
        }
    }
}

/// Memory the [`TableBuilder`] writes tables into.
pub trait TableMemory {
    /// GPA of a fresh, zeroed, 4 KiB-aligned 4 KiB page.
    fn alloc_page(&mut self) -> u64;
    /// Stores `value` little-endian at `gpa`.
    fn write_u64(&mut self, gpa: u64, value: u64);
    /// Loads the little-endian u64 at `gpa`.
    fn read_u64(&mut self, gpa: u64) -> u64;
}

/// [`TableMemory`] over a vm-memory [`GuestMemory`], allocating table pages
/// from `[next, end)` with a bump allocator. A test helper: it panics when
/// the pool is exhausted or an access falls outside guest memory.
pub struct MmapTableMemory<'a, M: GuestMemory + ?Sized = GuestMemoryMmap> {
    pub mem: &'a M,
    /// Next page to hand out (rounded up to 4 KiB on use).
    pub next: u64,
    /// End (exclusive) of the page pool.
    pub end: u64,
}

impl<'a, M: GuestMemory + ?Sized> MmapTableMemory<'a, M> {
    pub fn new(mem: &'a M, next: u64, end: u64) -> Self {
        MmapTableMemory { mem, next, end }
    }
}

impl<M: GuestMemory + ?Sized> TableMemory for MmapTableMemory<'_, M> {
    fn alloc_page(&mut self) -> u64 {
        let page = self
            .next
            .checked_next_multiple_of(PAGE_4K)
            .expect("page pool address overflows");
        let after = page.checked_add(PAGE_4K).expect("page pool overflows");
        assert!(
            after <= self.end,
            "page pool [.., {:#x}) exhausted",
            self.end
        );
        self.next = after;
        // The pool may hold old tables: hand out zeroed pages only.
        // 4096 fits any usize.
        #[allow(clippy::cast_possible_truncation)]
        const PAGE_LEN: usize = PAGE_4K as usize;
        self.mem
            .write_slice(&[0u8; PAGE_LEN], GuestAddress(page))
            .expect("table page outside guest memory");
        page
    }

    fn write_u64(&mut self, gpa: u64, value: u64) {
        self.mem
            .write_obj(value.to_le(), GuestAddress(gpa))
            .expect("table write outside guest memory");
    }

    fn read_u64(&mut self, gpa: u64) -> u64 {
        u64::from_le(
            self.mem
                .read_obj(GuestAddress(gpa))
                .expect("table read outside guest memory"),
        )
    }
}

/// Builds VT-d first-stage (x86-64) tables in any [`TableMemory`].
///
/// Intermediate entries are created present + RW + US, so permissions are
/// decided by leaves unless [`TableBuilder::set_entry`] changes them. The
/// builder never sets A/D bits.
pub struct TableBuilder<M: TableMemory> {
    mem: M,
    root: u64,
    levels: u8,
}

/// Leaf level for a page size. Panics on sizes other than 4K, 2M, 1G.
fn leaf_level(page_size: u64) -> u8 {
    match page_size {
        PAGE_4K => 1,
        PAGE_2M => 2,
        PAGE_1G => 3,
        s => panic!("page size {s:#x} is not 4K, 2M or 1G"),
    }
}

impl<M: TableMemory> TableBuilder<M> {
    /// Allocates the root table immediately.
    ///
    /// # Panics
    /// If `addr_width` is neither 48 nor 57.
    pub fn new(addr_width: u32, mut mem: M) -> Self {
        let levels = levels_for_width(addr_width).expect("addr_width must be 48 or 57");
        let root = mem.alloc_page();
        TableBuilder { mem, root, levels }
    }

    /// GPA of the root table (PML4 or PML5).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Number of levels (4 or 5).
    #[cfg(test)]
    pub(crate) fn levels(&self) -> u8 {
        self.levels
    }

    /// Address width the table serves (48 or 57).
    pub(crate) fn addr_width(&self) -> u32 {
        if self.levels == 5 {
            57
        } else {
            48
        }
    }

    /// Map one page of `page_size` (4K/2M/1G) at iova -> gpa, with RW if
    /// `writable`. Replaces whatever entry is at the leaf's level.
    ///
    /// # Panics
    /// On programmer errors: a bad page size, `iova` or `gpa` not aligned to
    /// it, `gpa` beyond 52 bits, `iova` not canonical, or a larger leaf
    /// already on the path.
    pub fn map(&mut self, iova: u64, gpa: u64, page_size: u64, writable: bool) {
        let leaf = leaf_level(page_size);
        assert_eq!(iova & (page_size - 1), 0, "iova {iova:#x} misaligned");
        assert_eq!(gpa & (page_size - 1), 0, "gpa {gpa:#x} misaligned");
        assert_eq!(gpa & !PTE_ADDR_MASK, 0, "gpa {gpa:#x} beyond 52 bits");
        assert!(
            is_canonical(iova, self.addr_width()),
            "iova {iova:#x} not canonical"
        );
        let mut table = self.root;
        for level in (leaf + 1..=self.levels).rev() {
            let entry_gpa = table | (index(iova, level) * 8);
            let entry = self.mem.read_u64(entry_gpa);
            if entry & PTE_P == 0 {
                let page = self.mem.alloc_page();
                self.mem
                    .write_u64(entry_gpa, page | PTE_P | PTE_RW | PTE_US);
                table = page;
            } else {
                assert!(
                    entry & PTE_PS == 0,
                    "iova {iova:#x} already mapped by a larger page at level {level}"
                );
                table = entry & PTE_ADDR_MASK;
            }
        }
        let mut value = gpa | PTE_P | PTE_US;
        if writable {
            value |= PTE_RW;
        }
        if leaf > 1 {
            value |= PTE_PS;
        }
        self.mem.write_u64(table | (index(iova, leaf) * 8), value);
    }

    /// GPA of the entry at `level` on the walk path of `iova`, if the path
    /// exists down to it (every entry above is present and not a leaf).
    pub(crate) fn entry_gpa(&mut self, iova: u64, level: u8) -> Option<u64> {
        if level == 0 || level > self.levels {
            return None;
        }
        let mut table = self.root;
        let mut cur = self.levels;
        loop {
            let entry_gpa = table | (index(iova, cur) * 8);
            if cur == level {
                return Some(entry_gpa);
            }
            let entry = self.mem.read_u64(entry_gpa);
            if entry & PTE_P == 0 || (entry & PTE_PS != 0 && cur <= 3) {
                return None;
            }
            table = entry & PTE_ADDR_MASK;
            cur -= 1;
        }
    }

    /// Value of the entry at `level` on the walk path of `iova`.
    pub fn entry(&mut self, iova: u64, level: u8) -> Option<u64> {
        let gpa = self.entry_gpa(iova, level)?;
        Some(self.mem.read_u64(gpa))
    }

    /// Make the entry at `level` on the walk path of `iova` have exactly
    /// `value` (to clear RW on an intermediate level, mark it not present,
    /// set reserved bits...). Returns the GPA of that entry, or `None` (and
    /// writes nothing) if the path does not reach `level`.
    pub fn set_entry(&mut self, iova: u64, level: u8, value: u64) -> Option<u64> {
        let gpa = self.entry_gpa(iova, level)?;
        self.mem.write_u64(gpa, value);
        Some(gpa)
    }

    /// Clears (zeroes) the entry at the leaf level for `page_size` on the
    /// path of `iova`; does nothing if the path does not reach that level.
    /// Tables below a cleared entry are not freed.
    ///
    /// # Panics
    /// If `page_size` is not 4K, 2M or 1G.
    pub fn unmap(&mut self, iova: u64, page_size: u64) {
        let leaf = leaf_level(page_size);
        self.set_entry(iova, leaf, 0);
    }
}

#[cfg(test)]
// Test code with known small values.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    const RAM: u64 = 16 << 20;
    const POOL: (u64, u64) = (1 << 20, 8 << 20);

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    fn builder(mem: &GuestMemoryMmap, width: u32) -> TableBuilder<MmapTableMemory<'_>> {
        TableBuilder::new(width, MmapTableMemory::new(mem, POOL.0, POOL.1))
    }

    /// xorshift64: deterministic, no extra crates.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn leaf_4k_preserves_offset() {
        let mem = ram();
        let mut b = builder(&mem, 48);
        b.map(0x1234_5000, 0x9a_b000, PAGE_4K, true);
        let w = walk(&mem, b.root(), 48, 0x1234_5678, true, true).unwrap();
        assert_eq!(
            w,
            Walked {
                gpa: 0x9a_b678,
                page_size: PAGE_4K,
                writable: true
            }
        );
    }

    #[test]
    fn leaf_2m() {
        let mem = ram();
        let mut b = builder(&mem, 48);
        b.map(0x4020_0000, 0x60_0000, PAGE_2M, true);
        let w = walk(&mem, b.root(), 48, 0x4021_2345, false, true).unwrap();
        assert_eq!(w.gpa, 0x61_2345);
        assert_eq!(w.page_size, PAGE_2M);
        assert!(w.writable);
    }

    #[test]
    fn leaf_1g() {
        let mem = ram();
        let mut b = builder(&mem, 48);
        // The leaf's GPA need not be in RAM: the walker does not check it.
        b.map(0x80_4000_0000, 0x1_c000_0000, PAGE_1G, true);
        let w = walk(&mem, b.root(), 48, 0x80_7654_3210, true, true).unwrap();
        assert_eq!(w.gpa, 0x1_f654_3210);
        assert_eq!(w.page_size, PAGE_1G);
    }

    #[test]
    fn five_levels_above_2_48() {
        let mem = ram();
        let mut b = builder(&mem, 57);
        assert_eq!(b.levels(), 5);
        let iova = 0x00ab_cdef_1234_5000;
        assert!(iova >= 1 << 48);
        b.map(iova, 0x20_0000, PAGE_4K, true);
        let w = walk(&mem, b.root(), 57, iova + 0x10, true, true).unwrap();
        assert_eq!(w.gpa, 0x20_0010);
        // The same iova is not canonical at width 48.
        assert_eq!(
            walk(&mem, b.root(), 48, iova, false, true),
            Err(WalkError::NonCanonical(iova))
        );
        // And a 2M leaf on a 5-level table.
        b.map(0x00f0_0000_0020_0000, 0xa0_0000, PAGE_2M, false);
        let w = walk(&mem, b.root(), 57, 0x00f0_0000_0020_0001, false, true).unwrap();
        assert_eq!(
            (w.gpa, w.page_size, w.writable),
            (0xa0_0001, PAGE_2M, false)
        );
    }

    #[test]
    fn upper_half_canonical_walks() {
        let mem = ram();
        let mut b = builder(&mem, 48);
        let iova = 0xffff_8000_0000_0000;
        b.map(iova, 0x30_0000, PAGE_4K, true);
        let w = walk(&mem, b.root(), 48, iova | 0xabc, true, true).unwrap();
        assert_eq!(w.gpa, 0x30_0abc);
        // The top of the lower half (PML4 slot 255) is unmapped.
        assert!(matches!(
            walk(
                &mem,
                b.root(),
                48,
                0x0000_8000_0000_0000 - PAGE_4K,
                false,
                true
            ),
            Err(WalkError::NotPresent { level: 4, .. })
        ));
    }

    #[test]
    fn user_requests_need_us_at_every_level() {
        let mem = ram();
        let mut b = builder(&mem, 48);
        b.map(0x40_0000, 0x5000, PAGE_4K, true);
        let pdpte = b.entry(0x40_0000, 3).unwrap();
        b.set_entry(0x40_0000, 3, pdpte & !PTE_US);
        assert_eq!(
            walk(&mem, b.root(), 48, 0x40_0010, false, true),
            Err(WalkError::SupervisorOnly {
                level: 3,
                iova: 0x40_0010
            })
        );
        // A privileged request ignores U/S.
        let w = walk(&mem, b.root(), 48, 0x40_0010, true, false).unwrap();
        assert_eq!(w.gpa, 0x5010);
    }

    #[test]
    fn read_only_leaf_denies_write_allows_read() {
        let mem = ram();
        let mut b = builder(&mem, 48);
        b.map(0x1000, 0x5000, PAGE_4K, false);
        let w = walk(&mem, b.root(), 48, 0x1008, false, true).unwrap();
        assert_eq!(w.gpa, 0x5008);
        assert!(!w.writable);
        assert_eq!(
            walk(&mem, b.root(), 48, 0x1008, true, true),
            Err(WalkError::ReadOnly {
                level: 1,
                iova: 0x1008
            })
        );
    }

    #[test]
    fn rw_cleared_at_intermediate_level_denies_write() {
        for level in 2..=4u8 {
            let mem = ram();
            let mut b = builder(&mem, 48);
            b.map(0x7000, 0x5000, PAGE_4K, true);
            let e = b.entry(0x7000, level).unwrap();
            b.set_entry(0x7000, level, e & !PTE_RW).unwrap();
            assert_eq!(
                walk(&mem, b.root(), 48, 0x7000, true, true),
                Err(WalkError::ReadOnly {
                    level,
                    iova: 0x7000
                })
            );
            let w = walk(&mem, b.root(), 48, 0x7000, false, true).unwrap();
            assert_eq!(w.gpa, 0x5000);
            assert!(!w.writable);
        }
    }

    #[test]
    fn not_present_at_each_level() {
        for width in [48, 57] {
            let levels = levels_for_width(width).unwrap();
            for level in 1..=levels {
                let mem = ram();
                let mut b = builder(&mem, width);
                let iova = 0x12_3456_7000;
                b.map(iova, 0x5000, PAGE_4K, true);
                let e = b.entry(iova, level).unwrap();
                let entry_gpa = b.set_entry(iova, level, e & !PTE_P).unwrap();
                assert_eq!(
                    walk(&mem, b.root(), width, iova, false, true),
                    Err(WalkError::NotPresent { level, entry_gpa })
                );
            }
        }
    }

    #[test]
    fn ps_at_level_4_and_5_is_reserved() {
        for (width, level) in [(48, 4u8), (57, 4), (57, 5)] {
            let mem = ram();
            let mut b = builder(&mem, width);
            b.map(0x1000, 0x5000, PAGE_4K, true);
            let e = b.entry(0x1000, level).unwrap() | PTE_PS;
            b.set_entry(0x1000, level, e).unwrap();
            assert_eq!(
                walk(&mem, b.root(), width, 0x1000, false, true),
                Err(WalkError::Reserved { level, entry: e })
            );
        }
    }

    #[test]
    fn reserved_bits_in_large_leaves() {
        // Entries written by hand without U/S: privileged walks.
        let mem = ram();
        let mut b = builder(&mem, 48);
        b.map(0x20_0000, 0x40_0000, PAGE_2M, true);
        for bit in 13..=20 {
            let e = 0x40_0000 | PTE_P | PTE_RW | PTE_PS | (1 << bit);
            b.set_entry(0x20_0000, 2, e).unwrap();
            assert_eq!(
                walk(&mem, b.root(), 48, 0x20_0000, false, false),
                Err(WalkError::Reserved { level: 2, entry: e })
            );
        }
        // Bit 12 (PAT) and bits 62:52 and 63 are not reserved.
        let e = 0x40_0000 | PTE_P | PTE_PS | (1 << 12) | (0x7ff << 52) | (1 << 63);
        b.set_entry(0x20_0000, 2, e).unwrap();
        assert_eq!(
            walk(&mem, b.root(), 48, 0x20_0004, false, false)
                .unwrap()
                .gpa,
            0x40_0004
        );

        b.map(0x4000_0000, 0x4000_0000, PAGE_1G, true);
        let e = 0x4000_0000 | PTE_P | PTE_PS | (1 << 29);
        b.set_entry(0x4000_0000, 3, e).unwrap();
        assert_eq!(
            walk(&mem, b.root(), 48, 0x4000_0000, false, false),
            Err(WalkError::Reserved { level: 3, entry: e })
        );
    }

    #[test]
    fn pat_bit_at_level_1_is_ignored() {
        let mem = ram();
        let mut b = builder(&mem, 48);
        b.map(0x3000, 0x8000, PAGE_4K, true);
        let e = b.entry(0x3000, 1).unwrap() | PTE_PS;
        b.set_entry(0x3000, 1, e).unwrap();
        let w = walk(&mem, b.root(), 48, 0x3001, true, true).unwrap();
        assert_eq!((w.gpa, w.page_size), (0x8001, PAGE_4K));
    }

    #[test]
    fn table_outside_ram() {
        // Entries written by hand without U/S: privileged walks.
        let mem = ram();
        // The root itself.
        assert_eq!(
            walk(&mem, 0x1_0000_0000, 48, 0, false, false),
            Err(WalkError::TableOutsideRam(0x1_0000_0000))
        );
        // A level-3 pointer leading out of RAM.
        let mut b = builder(&mem, 48);
        let iova = 0x40_0000_3000; // PDPT index 1
        b.map(iova, 0x5000, PAGE_4K, true);
        b.set_entry(iova, 3, 0x2_0000_0000 | PTE_P | PTE_RW)
            .unwrap();
        assert_eq!(
            walk(&mem, b.root(), 48, iova, false, false),
            Err(WalkError::TableOutsideRam(0x2_0000_0000))
        );
    }

    #[test]
    fn non_canonical_iova() {
        let mem = ram();
        let b = builder(&mem, 48);
        for iova in [
            1u64 << 47,
            0xffff_0000_0000_0000,
            1 << 63,
            0x0001_0000_0000_0000,
        ] {
            assert_eq!(
                walk(&mem, b.root(), 48, iova, false, true),
                Err(WalkError::NonCanonical(iova))
            );
        }
        assert_eq!(
            walk(&mem, b.root(), 57, 1 << 56, false, true),
            Err(WalkError::NonCanonical(1 << 56))
        );
        assert!(is_canonical(0xff00_0000_0000_0000, 57));
        assert!(is_canonical(0x00ff_ffff_ffff_ffff, 57));
    }

    #[test]
    fn bad_width() {
        let mem = ram();
        for w in [0, 39, 47, 56, 64, u32::MAX] {
            assert_eq!(
                walk(&mem, 0, w, 0, false, true),
                Err(WalkError::BadWidth(w))
            );
        }
    }

    #[test]
    fn unmap_clears_leaf() {
        let mem = ram();
        let mut b = builder(&mem, 48);
        b.map(0x20_0000, 0x40_0000, PAGE_2M, true);
        b.map(0x1000, 0x5000, PAGE_4K, true);
        b.unmap(0x20_0000, PAGE_2M);
        assert!(matches!(
            walk(&mem, b.root(), 48, 0x20_0000, false, true),
            Err(WalkError::NotPresent { level: 2, .. })
        ));
        assert_eq!(
            walk(&mem, b.root(), 48, 0x1000, false, true).unwrap().gpa,
            0x5000
        );
        // No path to a 4K leaf under an unmapped region: a no-op.
        b.unmap(0x7fff_0000_0000, PAGE_4K);
        assert_eq!(b.entry_gpa(0x7fff_0000_0000, 1), None);
    }

    #[test]
    fn walker_never_writes_guest_memory() {
        let mem = ram();
        let mut b = builder(&mem, 48);
        b.map(0x1000, 0x5000, PAGE_4K, false);
        b.map(0x20_0000, 0x40_0000, PAGE_2M, true);
        let snapshot = |m: &GuestMemoryMmap| {
            let mut v = vec![0u8; RAM as usize];
            m.read_slice(&mut v, GuestAddress(0)).unwrap();
            v
        };
        let before = snapshot(&mem);
        for iova in [0x1000, 0x20_0000, 0x9000, 0xffff_8000_0000_0000] {
            for write in [false, true] {
                let _ = walk(&mem, b.root(), 48, iova, write, iova & 1 == 0);
            }
        }
        assert!(before == snapshot(&mem));
    }

    #[test]
    fn random_4k_pages_walk_and_neighbours_fault() {
        for width in [48u32, 57] {
            let mem = ram();
            let mut b = builder(&mem, width);
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(width));
            let half = 1u64 << (width - 1);
            let mut pages: Vec<(u64, u64, bool)> = Vec::new();
            while pages.len() < 200 {
                let r = rng.next();
                let mut iova = r & (half - 1) & !(PAGE_4K - 1);
                if r & (1 << 63) != 0 {
                    // Upper half: sign-extend.
                    iova |= !(half - 1);
                }
                if pages.iter().any(|p| p.0 == iova) {
                    continue;
                }
                let gpa = (8 << 20) + (rng.next() % 2048) * PAGE_4K;
                let writable = rng.next() & 1 != 0;
                b.map(iova, gpa, PAGE_4K, writable);
                pages.push((iova, gpa, writable));
            }
            for &(iova, gpa, writable) in &pages {
                let off = rng.next() & (PAGE_4K - 1);
                let w = walk(&mem, b.root(), width, iova | off, false, true).unwrap();
                assert_eq!(w.gpa, gpa | off);
                assert_eq!(w.page_size, PAGE_4K);
                assert_eq!(w.writable, writable);
                assert_eq!(
                    walk(&mem, b.root(), width, iova, true, true).is_ok(),
                    writable
                );
                for n in [iova.wrapping_sub(PAGE_4K), iova.wrapping_add(PAGE_4K)] {
                    if !is_canonical(n, width) || pages.iter().any(|p| p.0 == n) {
                        continue;
                    }
                    assert!(matches!(
                        walk(&mem, b.root(), width, n, false, true),
                        Err(WalkError::NotPresent { .. })
                    ));
                }
            }
        }
    }

    #[test]
    fn garbage_tables_never_panic() {
        let mem = ram();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        // Random entries in the first 1 MiB, pointing mostly back into it.
        for gpa in (0..(1u64 << 20)).step_by(8) {
            let r = rng.next();
            let v = match r % 4 {
                0 => r,
                _ => (r & 0xf_f000) | (r >> 56),
            };
            mem.write_obj(v, GuestAddress(gpa)).unwrap();
        }
        for _ in 0..20_000 {
            let root = rng.next() & 0xf_ffff;
            let width = if rng.next() & 1 == 0 { 48 } else { 57 };
            let mut iova = rng.next();
            if iova & 3 != 0 {
                // Mostly canonical, so that the walk gets past the first check.
                let s = 64 - width;
                iova = ((iova << s).cast_signed() >> s).cast_unsigned();
            }
            if let Ok(w) = walk(
                &mem,
                root,
                width,
                iova,
                rng.next() & 1 == 0,
                rng.next() & 1 == 0,
            ) {
                assert!(matches!(w.page_size, PAGE_4K | PAGE_2M | PAGE_1G));
                assert_eq!(w.gpa & (w.page_size - 1), iova & (w.page_size - 1));
            }
        }
    }
}
