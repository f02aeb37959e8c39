//! Adaptive busy-polling of the requestq (`--poll-us`), after QEMU's
//! AioContext polling (poll-max-ns): the window grows while each next
//! request comes within the bound, and shrinks to nothing while they do
//! not. A driver that sends one request at a time and spins for the answer
//! (Linux's) is then served without a wakeup, while an idle or sporadic one
//! costs no CPU.

use std::time::Duration;

/// The first window after a request that came soon enough (QEMU's too).
pub const POLL_START: Duration = Duration::from_micros(4);

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
    /// bound but after the window: a larger window would have caught it, so
    /// double it (at least POLL_START, at most the bound). Beyond the bound:
    /// polling did not pay, so halve it (below POLL_START: closed). Halving
    /// rather than closing at once (QEMU's default) keeps the window of a
    /// busy driver open across one late request (a timer, a preemption).
    pub fn observe(&mut self, gap: Duration) {
        if gap <= self.current {
            return;
        }
        self.current = if gap <= self.max {
            (self.current * 2).max(POLL_START).min(self.max)
        } else if self.current / 2 >= POLL_START {
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
    fn back_to_back_requests_open_the_window_up_to_the_bound() {
        let mut w = PollWindow::new(us(32));
        assert_eq!(w.current(), Duration::ZERO);
        let mut seen = vec![];
        for _ in 0..6 {
            w.observe(us(5));
            seen.push(w.current());
        }
        // 5 us gaps: caught once the window passes them, then unchanged.
        assert_eq!(seen, vec![us(4), us(8), us(8), us(8), us(8), us(8)]);
        for _ in 0..4 {
            w.observe(us(30));
        }
        assert_eq!(w.current(), us(32));
    }

    #[test]
    fn gaps_beyond_the_bound_close_the_window() {
        let mut w = PollWindow::new(us(32));
        for _ in 0..5 {
            w.observe(us(20));
        }
        assert_eq!(w.current(), us(32));
        // One late request halves it; a sporadic driver closes it.
        w.observe(us(33));
        assert_eq!(w.current(), us(16));
        let mut seen = vec![];
        for _ in 0..4 {
            w.observe(us(1000));
            seen.push(w.current());
        }
        assert_eq!(seen, vec![us(8), us(4), Duration::ZERO, Duration::ZERO]);
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
    fn a_bound_below_the_start_is_kept() {
        let mut w = PollWindow::new(us(2));
        w.observe(us(1));
        assert_eq!(w.current(), us(2));
    }
}
