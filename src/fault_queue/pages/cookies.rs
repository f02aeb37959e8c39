// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The outstanding groups' cookies and the slab slots holding them: an
//! open-addressing table with linear probing, at least twice the bound, so
//! that a probe meets an empty entry after a few steps. A `FastMap` cost
//! ~130 instructions per fault for the insert and the remove (hashbrown's
//! control bytes and group probes); this is a seeded foldhash, a masked
//! index and a few compares. Removal shifts the entries after it back (no
//! tombstones), so the table never degrades with the number of groups
//! ever raised. Cookies come from the kernel (ids it allocates) or from
//! our virtual source (a counter), never from the guest; the hasher is
//! seeded per process anyway, and the table is bounded: a probe never
//! runs longer than the table.

use std::hash::BuildHasher;

/// An empty entry.
const EMPTY: u32 = u32::MAX;

#[derive(Debug)]
pub(super) struct CookieIndex {
    keys: Box<[u64]>,
    /// The slot of each key, EMPTY where none.
    slots: Box<[u32]>,
    mask: usize,
    len: usize,
    hasher: foldhash::fast::RandomState,
}

impl CookieIndex {
    /// Room for `max` cookies (allocated once).
    pub(super) fn new(max: usize) -> Self {
        let size = max.saturating_mul(2).max(2).next_power_of_two();
        CookieIndex {
            keys: vec![0; size].into_boxed_slice(),
            slots: vec![EMPTY; size].into_boxed_slice(),
            mask: size - 1,
            len: 0,
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn home(&self, key: u64) -> usize {
        // Truncated to the table's size: the low bits are the index.
        #[allow(clippy::cast_possible_truncation)]
        let h = self.hasher.hash_one(key) as usize;
        h & self.mask
    }

    /// Where `key` is, or the empty entry where it would go.
    fn probe(&self, key: u64) -> (usize, bool) {
        let mut i = self.home(key);
        // At most the table: it always has an empty entry (twice the bound),
        // so this ends well before; bounded regardless.
        for _ in 0..=self.mask {
            if self.slots[i] == EMPTY {
                return (i, false);
            }
            if self.keys[i] == key {
                return (i, true);
            }
            i = (i + 1) & self.mask;
        }
        (i, false)
    }

    pub(super) fn get(&self, key: u64) -> Option<u32> {
        match self.probe(key) {
            (i, true) => Some(self.slots[i]),
            _ => None,
        }
    }

    /// Add `key` for `slot`: false (and nothing changed) if it is already
    /// there, or the table is full (never below the bound it was made for).
    pub(super) fn insert(&mut self, key: u64, slot: u32) -> bool {
        if slot == EMPTY || self.len >= self.mask {
            return false;
        }
        match self.probe(key) {
            (_, true) => false,
            (i, false) if self.slots[i] == EMPTY => {
                self.keys[i] = key;
                self.slots[i] = slot;
                self.len += 1;
                true
            }
            _ => false,
        }
    }

    /// Remove `key`: its slot, if it was there.
    pub(super) fn remove(&mut self, key: u64) -> Option<u32> {
        let (mut hole, true) = self.probe(key) else {
            return None;
        };
        let slot = self.slots[hole];
        // Backward shift (Knuth 6.4, algorithm R): an entry after the hole
        // moves into it unless its home lies cyclically in (hole, j].
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            if self.slots[j] == EMPTY {
                break;
            }
            let home = self.home(self.keys[j]);
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.keys[hole] = self.keys[j];
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Against std's HashMap, through inserts and removes that wrap the
    /// table and collide (a tiny table: every probe chain is long).
    #[test]
    fn agrees_with_a_hash_map() {
        let mut ours = CookieIndex::new(8);
        let mut theirs: HashMap<u64, u32> = HashMap::new();
        let mut x: u64 = 0x1234_5678;
        for step in 0..200_000u32 {
            // xorshift: a reproducible mix of keys from a small set.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = (x % 24) | ((x & 1) << 32);
            if x.is_multiple_of(3) {
                assert_eq!(ours.remove(key), theirs.remove(&key), "step {step}");
            } else if theirs.len() < 8 || theirs.contains_key(&key) {
                let fresh = !theirs.contains_key(&key);
                assert_eq!(ours.insert(key, step), fresh, "step {step}");
                theirs.entry(key).or_insert(step);
            }
            assert_eq!(ours.len(), theirs.len());
            for k in 0..24u64 {
                for s in [0, 1u64 << 32] {
                    assert_eq!(ours.get(k | s), theirs.get(&(k | s)).copied());
                }
            }
        }
    }
}
