// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Rate-limited logging for what a guest, a frontend or a control client
//! can repeat: per kind (one `limited!` call site), the first `BURST` lines
//! of each `INTERVAL` are logged, the rest are counted and dropped, and the
//! first line of the next interval says how many were dropped. The totals
//! are in the control socket's `stats`, not in the log.
//!
//! Lock-free and allocation-free: three atomics per kind, and the clock
//! read (a vDSO call) only when the level is enabled.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines of one kind logged per interval.
pub(crate) const BURST: u64 = 5;
/// The interval.
pub(crate) const INTERVAL: Duration = Duration::from_secs(60);

/// What to add to a line that is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Line {
    /// Lines of this kind dropped in the interval before this one.
    pub(crate) dropped_before: u64,
    /// The last line of this kind logged in this interval.
    pub(crate) last_of_burst: bool,
    interval_s: u64,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dropped_before > 0 {
            write!(
                f,
                " ({} more like this were not logged in the last {} s)",
                self.dropped_before, self.interval_s
            )?;
        }
        if self.last_of_burst {
            write!(
                f,
                " (more like this are not logged for {} s; `stats` counts them)",
                self.interval_s
            )?;
        }
        Ok(())
    }
}

/// The limit of one kind of line.
#[derive(Debug)]
pub(crate) struct LogLimit {
    burst: u64,
    interval_ns: u64,
    /// Start of the current interval (`now_ns` plus 1; 0: none yet).
    start: AtomicU64,
    /// Lines of this kind in the current interval, logged or not.
    seen: AtomicU64,
    /// Of those, the ones dropped.
    dropped: AtomicU64,
}

impl LogLimit {
    pub(crate) const fn new(burst: u64, interval: Duration) -> Self {
        LogLimit {
            burst,
            // Intervals are seconds; u64 nanoseconds last 584 years.
            #[allow(clippy::cast_possible_truncation)]
            interval_ns: interval.as_nanos() as u64,
            start: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// One line of this kind at `now_ns` (any monotonic nanosecond clock):
    /// what to add to it, or None to drop it. Threads racing at an interval
    /// boundary may log a line or two more than the burst, never unboundedly.
    pub(crate) fn check(&self, now_ns: u64) -> Option<Line> {
        let start = self.start.load(Ordering::Acquire);
        let lapsed = start == 0 || now_ns.saturating_sub(start - 1) >= self.interval_ns;
        let mut dropped_before = 0;
        let n = if lapsed
            && self
                .start
                .compare_exchange(start, now_ns + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // This thread opened the next interval.
            dropped_before = self.dropped.swap(0, Ordering::AcqRel);
            self.seen.store(1, Ordering::Release);
            1
        } else {
            self.seen.fetch_add(1, Ordering::AcqRel) + 1
        };
        if n > self.burst {
            self.dropped.fetch_add(1, Ordering::AcqRel);
            return None;
        }
        Some(Line {
            dropped_before,
            last_of_burst: n == self.burst,
            interval_s: self.interval_ns / 1_000_000_000,
        })
    }
}

/// Nanoseconds since the first call (monotonic, never 0 after the first).
pub(crate) fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    u64::try_from(BASE.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// `log!` for lines a guest, frontend or control client can repeat: at
/// most `BURST` per `INTERVAL` from this call site.
macro_rules! limited {
    ($lvl:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimit =
            $crate::log_limit::LogLimit::new($crate::log_limit::BURST, $crate::log_limit::INTERVAL);
        let lvl: ::log::Level = $lvl;
        if ::log::log_enabled!(lvl) {
            if let Some(line) = LIMIT.check($crate::log_limit::now_ns()) {
                ::log::log!(lvl, "{}{}", format_args!($($arg)+), line);
            }
        }
    }};
}
pub(crate) use limited;

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn verdicts(l: &LogLimit, times: &[u64]) -> Vec<Option<(u64, bool)>> {
        times
            .iter()
            .map(|&t| l.check(t).map(|v| (v.dropped_before, v.last_of_burst)))
            .collect()
    }

    #[test]
    fn the_first_lines_of_an_interval_then_silence() {
        let l = LogLimit::new(3, Duration::from_secs(10));
        let got = verdicts(&l, &[0, 1, 2, 3, 4, 9 * S]);
        assert_eq!(
            got,
            vec![
                Some((0, false)),
                Some((0, false)),
                Some((0, true)),
                None,
                None,
                None
            ]
        );
    }

    #[test]
    fn the_next_interval_says_how_many_were_dropped() {
        let l = LogLimit::new(2, Duration::from_secs(10));
        for t in 0..1000 {
            l.check(5 * S + t);
        }
        // The interval began at the first line: still in it, so dropped
        // too (999 in all).
        assert_eq!(verdicts(&l, &[15 * S - 1]), vec![None]);
        assert_eq!(
            verdicts(&l, &[15 * S, 15 * S + 1, 15 * S + 2]),
            vec![Some((999, false)), Some((0, true)), None]
        );
        // A quiet interval: the next line starts afresh, nothing to report
        // but the one dropped line before.
        assert_eq!(
            verdicts(&l, &[100 * S, 100 * S + 1]),
            vec![Some((1, false)), Some((0, true))]
        );
        assert_eq!(verdicts(&l, &[200 * S]), vec![Some((0, false))]);
    }

    #[test]
    fn lines_per_interval_are_bounded_under_a_flood() {
        let l = LogLimit::new(5, Duration::from_secs(1));
        // A million lines over 10 s: 5 per second at most.
        let logged = (0..1_000_000u64)
            .filter(|i| l.check(i * 10 * S / 1_000_000).is_some())
            .count();
        assert_eq!(logged, 50);
    }

    #[test]
    fn threads_racing_stay_within_a_few_lines_of_the_burst() {
        let l = LogLimit::new(5, Duration::from_secs(3600));
        let logged = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if l.check(1).is_some() {
                            logged.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        // A thread that opens the interval resets the count after the
        // others may have counted: at most one extra line per other thread.
        let logged = logged.into_inner();
        assert!((5..=8).contains(&logged), "{logged} lines");
    }

    #[test]
    fn the_suffix_says_what_happened() {
        let l = LogLimit::new(1, Duration::from_secs(60));
        let first = l.check(0).unwrap();
        assert_eq!(
            first.to_string(),
            " (more like this are not logged for 60 s; `stats` counts them)"
        );
        assert!(l.check(1).is_none());
        let next = l.check(61 * S).unwrap();
        assert!(next
            .to_string()
            .starts_with(" (1 more like this were not logged in the last 60 s)"));
    }
}
