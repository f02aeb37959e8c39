//! Adaptive busy-polling of the requestq (`--poll-us`), after QEMU's
//! AioContext polling (poll-max-ns): the window opens when a request comes
//! within the bound after the window lapsed, and shrinks to nothing while
//! requests come later than the bound. A driver that sends one request at a
//! time and spins for the answer (Linux's) is then served without a wakeup,
//! while an idle or sporadic one costs no CPU.

use std::time::Duration;

/// The least window worth polling; a smaller one is closed.
pub const POLL_MIN: Duration = Duration::from_micros(4);

/// How long to keep polling after serving the requestq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollWindow {
    max: Duration,
    current: Duration,
}

impl PollWindow {
    /// A window bounded by `max` (zero: never poll), closed at first.
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            current: Duration::ZERO,
        }
    }

    /// How long to poll after this pass.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The next request came `gap` after the previous one was served (the
    /// window's start). Caught by the window: nothing changes. Within the
    /// bound but after the window: polling would have caught it, so open the
    /// window to the bound at once (doubling from a small window, as QEMU
    /// does, costs a wakeup per step, and on a busy emulated machine the
    /// window decays again before it has grown back). Beyond the bound:
    /// polling did not pay, so halve it (below POLL_MIN: closed), which
    /// keeps it open across one late request (a timer, a preemption) and
    /// closes it after a few.
    pub fn observe(&mut self, gap: Duration) {
        if gap <= self.current {
            return;
        }
        self.current = if gap <= self.max {
            self.max
        } else if self.current / 2 >= POLL_MIN {
            self.current / 2
        } else {
            Duration::ZERO
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn a_request_within_the_bound_opens_the_window_to_it() {
        let mut w = PollWindow::new(us(32));
        assert_eq!(w.current(), Duration::ZERO);
        w.observe(us(5));
        assert_eq!(w.current(), us(32));
        // Caught from now on: unchanged.
        for g in [1, 5, 31, 32] {
            w.observe(us(g));
            assert_eq!(w.current(), us(32));
        }
    }

    #[test]
    fn gaps_beyond_the_bound_close_the_window() {
        let mut w = PollWindow::new(us(32));
        w.observe(us(20));
        // One late request halves it, the next one within the bound opens it.
        w.observe(us(33));
        assert_eq!(w.current(), us(16));
        w.observe(us(20));
        assert_eq!(w.current(), us(32));
        // A sporadic driver closes it.
        let mut seen = vec![];
        for _ in 0..5 {
            w.observe(us(1000));
            seen.push(w.current());
        }
        assert_eq!(
            seen,
            vec![us(16), us(8), us(4), Duration::ZERO, Duration::ZERO]
        );
        for _ in 0..100 {
            w.observe(us(1000));
        }
        assert_eq!(w.current(), Duration::ZERO);
    }

    #[test]
    fn a_zero_bound_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        for g in [0, 1, 5, 1000] {
            w.observe(us(g));
            assert_eq!(w.current(), Duration::ZERO);
        }
    }

    #[test]
    fn a_bound_below_the_minimum_is_kept() {
        let mut w = PollWindow::new(us(2));
        w.observe(us(1));
        assert_eq!(w.current(), us(2));
        w.observe(us(3));
        assert_eq!(w.current(), Duration::ZERO);
    }
}
