// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The backend's one lock order, checked in debug builds.
//!
//! A thread may take a lock only while every lock it holds ranks lower
//! (`Rank` lists them in order). `std::sync::Mutex` is not re-entrant: a
//! method that takes the session while its caller holds it hangs every
//! worker behind it. Debug builds (every test tier but the VM tiers'
//! benchmarks) panic at the second lock instead, naming both, so such a
//! path fails its test rather than hanging it. Release builds keep a plain
//! mutex.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};

/// The backend's locks, in the order they may be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Rank {
    /// Whole-group reads of the kernel's fault FD; held while relaying them.
    FaultReader,
    /// The guest-facing state.
    Session,
    /// The connection's fault-queue FD.
    KernelFaults,
    /// The connection's vEVENTQ FD.
    KernelEvents,
    /// Adds FDs to the eventq worker's epoll.
    Registrar,
    /// Exit-event FDs to close at the end of the connection.
    ExitConsumers,
    /// Records waiting for eventq buffers.
    EventFifo,
    /// vEVENTQ counters.
    VEvents,
    /// The page-response timer.
    PageTimer,
    /// The io_uring of the fault FDs (`--fault-io io-uring`).
    FaultRing,
    /// The requestq's polling window.
    Poll,
}

#[cfg(debug_assertions)]
thread_local! {
    /// Bit r set: this thread holds the lock of rank r.
    static HELD: std::cell::Cell<u16> = const { std::cell::Cell::new(0) };
}

/// A mutex with a place in the lock order.
pub struct Ranked<T> {
    rank: Rank,
    inner: Mutex<T>,
}

impl<T> Ranked<T> {
    pub const fn new(rank: Rank, value: T) -> Self {
        Ranked {
            rank,
            inner: Mutex::new(value),
        }
    }

    /// Take the lock. Debug builds panic if this thread holds it or any
    /// lock ranked after it; a poisoned lock (a panic while it was held)
    /// panics as `Mutex::lock().unwrap()` does.
    pub fn lock(&self) -> RankedGuard<'_, T> {
        #[cfg(debug_assertions)]
        HELD.with(|held| {
            let bit = 1u16 << (self.rank as u8);
            let after = !(bit - 1);
            assert!(
                held.get() & after == 0,
                "lock order: taking {:?} while holding ranks {:#b} (see lock_order)",
                self.rank,
                held.get()
            );
            held.set(held.get() | bit);
        });
        RankedGuard {
            guard: self.inner.lock().unwrap(),
            rank: self.rank,
        }
    }
}

pub struct RankedGuard<'a, T> {
    guard: MutexGuard<'a, T>,
    rank: Rank,
}

impl<T> Drop for RankedGuard<'_, T> {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        HELD.with(|held| held.set(held.get() & !(1u16 << (self.rank as u8))));
        #[cfg(not(debug_assertions))]
        let _ = self.rank;
    }
}

impl<T> Deref for RankedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for RankedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;

    #[test]
    fn locks_in_order_are_fine_and_released_ones_forgotten() {
        let a = Ranked::new(Rank::Session, 1);
        let b = Ranked::new(Rank::EventFifo, 2);
        {
            let _a = a.lock();
            let _b = b.lock();
        }
        // Both released: either may be taken alone, in any order.
        drop(b.lock());
        drop(a.lock());
    }

    #[test]
    #[should_panic(expected = "lock order: taking Session")]
    fn taking_a_held_lock_again_panics_instead_of_hanging() {
        let a = Ranked::new(Rank::Session, 1);
        let _g = a.lock();
        let _again = a.lock();
    }

    #[test]
    #[should_panic(expected = "lock order: taking Session")]
    fn taking_a_lower_rank_panics() {
        let a = Ranked::new(Rank::Session, 1);
        let b = Ranked::new(Rank::EventFifo, 2);
        let _b = b.lock();
        let _a = a.lock();
    }
}
