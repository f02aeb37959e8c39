// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest RAM in the RAM IOAS (stage 2): guest RAM at IOVA = GPA, mapped
//! from the frontend's memory table.

use log::{debug, Level};

use super::{HostDevice, IommufdHost, MappedRegion};
use crate::iommufd_bridge::sys::{IovaRange, IovaRanges, IOAS_MAP_READABLE, IOAS_MAP_WRITEABLE};
use crate::iommufd_bridge::{BridgeError, RamRegion, Result};
use crate::log_limit::limited;

/// The parts of guest RAM [gpa, last] to map: its intersections with the
/// `usable` IOVA ranges (inclusive), shrunk to multiples of `align` (> 0).
/// The frontend chooses `gpa` and `last`: a region in the last `align`
/// bytes of the space has no aligned start, and none may wrap to 0.
fn region_pieces(gpa: u64, last: u64, usable: &[IovaRange], align: u64) -> Vec<(u64, u64)> {
    let mut pieces = Vec::new();
    for &IovaRange { start: s, last: e } in usable {
        // Intersect, then shrink to the IOAS's alignment.
        let (s, e) = (s.max(gpa), e.min(last));
        let Some(s) = s.checked_next_multiple_of(align) else {
            continue;
        };
        let Some(d) = e.checked_sub(s) else {
            continue;
        };
        // Whole aligned blocks in [s, e] (a length saturates below 2^64).
        let len = d.saturating_add(1) / align * align;
        if len > 0 {
            pieces.push((s, len));
        }
    }
    pieces
}

impl<D: HostDevice> IommufdHost<D> {
    /// Map [gpa, gpa + len) of region `r` at IOVA = GPA.
    fn map_piece(&self, r: &RamRegion, gpa: u64, len: u64) -> Result<()> {
        let flags = IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE;
        // Pieces lie inside their region; a wrap here would map memory
        // outside it, so it is refused rather than trusted.
        let outside = || BridgeError::NotGuestRam { gpa, len };
        let off = gpa
            .checked_sub(r.gpa)
            .filter(|&o| o <= r.len && len <= r.len - o)
            .ok_or_else(outside)?;
        match r.file {
            Some(file) if self.use_map_file => {
                let at = file.offset.checked_add(off).ok_or_else(outside)?;
                Ok(self
                    .fd
                    .ioas_map_file(self.ram_ioas, file.fd, at, len, gpa, flags)?)
            }
            _ => {
                let va = r.host_va.checked_add(off).ok_or_else(outside)?;
                Ok(self.fd.ioas_map(self.ram_ioas, va, len, gpa, flags)?)
            }
        }
    }

    /// Map the parts of region `r` that the devices can reach (the RAM
    /// IOAS's usable IOVA ranges); a part outside them is logged, and a
    /// MAP that needs it answers FAULT.
    pub(super) fn map_region(&mut self, r: &RamRegion) -> Result<Vec<(u64, u64)>> {
        let IovaRanges {
            usable,
            alignment: align,
        } = self.fd.iova_ranges(self.ram_ioas)?;
        let shown = format!("usable IOVA {usable:x?}, alignment {align:#x}");
        let align = align.max(1);
        let Some(last) = r.len.checked_sub(1).and_then(|l| r.gpa.checked_add(l)) else {
            limited!(
                Level::Warn,
                "guest RAM {:#x}+{:#x}: empty or beyond 2^64; not mapped",
                r.gpa,
                r.len
            );
            return Ok(Vec::new());
        };
        let pieces = region_pieces(r.gpa, last, &usable, align);
        let covered = pieces.iter().fold(0u64, |a, p| a.saturating_add(p.1));
        if covered < r.len {
            limited!(
                Level::Warn,
                "guest RAM {:#x}+{:#x}: {:#x} bytes lie outside the devices' usable IOVA ranges \
                 ({shown}); host endpoints cannot reach them",
                r.gpa,
                r.len,
                r.len - covered
            );
        }
        let mut done: Vec<(u64, u64)> = Vec::new();
        for &(gpa, len) in &pieces {
            let mut res = self.map_piece(r, gpa, len);
            if res.is_err() && self.use_map_file && r.file.is_some() {
                limited!(
                    Level::Warn,
                    "IOAS_MAP_FILE failed ({}); using IOAS_MAP",
                    res.unwrap_err()
                );
                self.use_map_file = false;
                res = self.map_piece(r, gpa, len);
            }
            if let Err(e) = res {
                for &(g, l) in &done {
                    let _ = self.fd.ioas_unmap(self.ram_ioas, g, l);
                }
                return Err(e);
            }
            debug!("guest RAM {gpa:#x}+{len:#x} mapped at IOVA = GPA");
            done.push((gpa, len));
        }
        Ok(done)
    }

    /// Is [gpa, gpa + len) inside guest RAM (regions may be adjacent)?
    pub(super) fn in_ram(&self, gpa: u64, len: u64) -> bool {
        let Some(last) = len.checked_sub(1).and_then(|l| gpa.checked_add(l)) else {
            return false;
        };
        let mut cur = gpa;
        loop {
            let Some(&(p_gpa, p_len)) = self
                .ram
                .iter()
                .flat_map(|m| &m.pieces)
                .find(|&&(g, l)| g <= cur && cur - g < l)
            else {
                return false;
            };
            // Pieces are never empty and end by 2^64 - 1.
            let r_last = p_gpa.saturating_add(p_len.saturating_sub(1));
            if r_last >= last {
                return true;
            }
            cur = r_last + 1;
        }
    }

    pub(super) fn set_ram(&mut self, regions: &[RamRegion]) -> Result<()> {
        let old = std::mem::take(&mut self.ram);
        for MappedRegion { region, pieces } in &old {
            if regions.contains(region) {
                continue;
            }
            for &(gpa, len) in pieces {
                if let Err(e) = self.fd.ioas_unmap(self.ram_ioas, gpa, len) {
                    limited!(Level::Error, "guest RAM {gpa:#x}+{len:#x}: unmap: {e}");
                }
            }
        }
        self.ram = old
            .into_iter()
            .filter(|m| regions.contains(&m.region))
            .collect();
        let mut first_err = None;
        for r in regions {
            if self.ram.iter().any(|m| m.region == *r) {
                continue;
            }
            match self.map_region(r) {
                Ok(pieces) => self.ram.push(MappedRegion { region: *r, pieces }),
                Err(e) => {
                    limited!(Level::Error, "guest RAM {:#x}+{:#x}: {e}", r.gpa, r.len);
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every piece lies inside the region and a usable range, aligned.
    fn check_pieces(gpa: u64, last: u64, usable: &[(u64, u64)], align: u64) -> Vec<(u64, u64)> {
        let ranges: Vec<IovaRange> = usable
            .iter()
            .map(|&(start, last)| IovaRange { start, last })
            .collect();
        let pieces = region_pieces(gpa, last, &ranges, align);
        for &(s, len) in &pieces {
            let what = format!("piece {s:#x}+{len:#x} of {gpa:#x}-{last:#x} (align {align:#x})");
            assert!(len > 0 && len % align == 0 && s % align == 0, "{what}");
            let end = s.checked_add(len - 1).unwrap();
            assert!(gpa <= s && end <= last, "{what} leaves the region");
            assert!(
                usable.iter().any(|&(us, ue)| us <= s && end <= ue),
                "{what} leaves the usable ranges"
            );
        }
        pieces
    }

    #[test]
    fn region_pieces_stay_inside_a_region_at_the_top_of_the_space() {
        const TOP_PAGE: u64 = 0xffff_ffff_ffff_f000;
        // A region in the last 64 KiB, IOVA alignment 64 KiB: nothing can
        // be mapped (rounding its start up would pass 2^64).
        assert_eq!(
            check_pieces(TOP_PAGE, u64::MAX, &[(0, u64::MAX)], 0x10000),
            []
        );
        // The same with a usable range ending below the top.
        let usable = [(0, 0xffff_ffff_ffff_f7ff)];
        assert_eq!(check_pieces(TOP_PAGE, u64::MAX, &usable, 0x10000), []);
        // An aligned region up to 2^64 maps whole.
        let gpa = 0xffff_ffff_fff0_0000;
        let full = [(0, u64::MAX)];
        assert_eq!(
            check_pieces(gpa, u64::MAX, &full, 0x10000),
            [(gpa, 0x10_0000)]
        );
        // Unaligned at both ends: the aligned middle.
        assert_eq!(
            check_pieces(0x1_8000, 0x5_7fff, &full, 0x10000),
            [(0x2_0000, 0x3_0000)]
        );
        // Alignment 1 (no domain attached yet) and the top byte.
        assert_eq!(check_pieces(u64::MAX, u64::MAX, &full, 1), [(u64::MAX, 1)]);
        // Several usable ranges, one missing the region.
        let usable = [(0, 0xfff), (0x3000, 0x4fff), (0x8000, u64::MAX)];
        assert_eq!(
            check_pieces(0x1000, 0x9fff, &usable, 0x1000),
            [(0x3000, 0x2000), (0x8000, 0x2000)]
        );
        // Any region near the top with any power-of-two alignment.
        for shift in 0..=20 {
            for back in [1u64, 0x800, 0x1000, 0x1800, 0x10000, 0x10800] {
                let gpa = u64::MAX - back + 1;
                for last in [u64::MAX, u64::MAX - 0x400, gpa] {
                    if last >= gpa {
                        check_pieces(gpa, last, &full, 1 << shift);
                        check_pieces(gpa, last, &[(0, u64::MAX - 0x7ff)], 1 << shift);
                    }
                }
            }
        }
    }
}
