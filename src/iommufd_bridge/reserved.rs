// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a host endpoint cannot translate, from what it can.

use super::sys::IovaRange;
use super::{HoleKind, IovaHole, MSI_END, MSI_START};

/// The complement of `ranges` (usable IOVAs, inclusive) in the 64-bit space,
/// as untranslated holes, with the MSI window cut out and reported as MSI.
pub fn reserved_from_ranges(ranges: &[IovaRange]) -> Vec<IovaHole> {
    let mut usable = ranges.to_vec();
    usable.sort_unstable();
    let mut holes = Vec::new();
    let mut next = Some(0u64);
    for &IovaRange { start: s, last: e } in &usable {
        if let Some(n) = next {
            if s > n {
                holes.push((n, s - 1));
            }
            if e >= n {
                next = e.checked_add(1);
            }
        }
    }
    if let Some(n) = next {
        holes.push((n, u64::MAX));
    }
    let mut out = vec![IovaHole {
        start: MSI_START,
        end: MSI_END,
        kind: HoleKind::Msi,
    }];
    for (s, e) in holes {
        // Cut [MSI_START, MSI_END] out of the hole.
        if s < MSI_START {
            out.push(IovaHole {
                start: s,
                end: e.min(MSI_START - 1),
                kind: HoleKind::Untranslated,
            });
        }
        if e > MSI_END {
            out.push(IovaHole {
                start: s.max(MSI_END + 1),
                end: e,
                kind: HoleKind::Untranslated,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reserved_of(ranges: &[(u64, u64)]) -> Vec<IovaHole> {
        let ranges: Vec<IovaRange> = ranges
            .iter()
            .map(|&(start, last)| IovaRange { start, last })
            .collect();
        reserved_from_ranges(&ranges)
    }

    #[test]
    fn holes_of_the_mock_aperture_keep_the_msi_window_apart() {
        let r = reserved_of(&[(1 << 24, (1 << 31) - 1)]);
        assert_eq!(
            r,
            vec![
                IovaHole {
                    start: MSI_START,
                    end: MSI_END,
                    kind: HoleKind::Msi
                },
                IovaHole {
                    start: 0,
                    end: (1 << 24) - 1,
                    kind: HoleKind::Untranslated
                },
                IovaHole {
                    start: 1 << 31,
                    end: MSI_START - 1,
                    kind: HoleKind::Untranslated
                },
                IovaHole {
                    start: MSI_END + 1,
                    end: u64::MAX,
                    kind: HoleKind::Untranslated
                },
            ]
        );
    }

    #[test]
    fn whole_space_usable_leaves_only_msi() {
        assert_eq!(reserved_of(&[(0, u64::MAX)]).len(), 1);
        // Overlapping and unsorted ranges, and a usable range ending at the top.
        let r = reserved_of(&[(0x2000, u64::MAX), (0, 0xfff), (0x800, 0x1000)]);
        assert_eq!(r.len(), 2);
        assert_eq!((r[1].start, r[1].end), (0x1001, 0x1fff));
    }
}
