// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Adaptive busy-polling of the requestq (`--poll-us`), after QEMU's
//! AioContext polling (poll-max-ns): the window opens when a request comes
//! within the bound after the window lapsed, and shrinks to nothing while
//! requests come later than the bound. A driver that sends one request at a
//! time and spins for the answer (Linux's) is then served without a wakeup,
//! while an idle or sporadic one costs no CPU.

//!
//! Polling must never hurt: a poller that takes the core the vCPU needs
//! turns a 10 us request into a scheduler time slice. First, by
//! construction: a window polls only while the host has a CPU for every
//! runnable thread (`RunQueues`: /proc/loadavg's count of runnable threads,
//! the kernel's `nr_running()`, against the online CPUs; read with one
//! pread at the window's start and every `CROWD_CHECK` while it polls,
//! 1.5 us a read). Crowded: the window ends before the worker spins on a
//! CPU someone waits for, and polling stays off for `CROWDED_OFF`, no
//! back-off (the next reading decides). The alternatives were weighed
//! (spec-notes/benchmarks.md): `sched_yield()` per look gives the CPU only
//! to a thread queued on the worker's own CPU, and to a busy one for a whole
//! slice with kicks off (the stall it was to avoid); SCHED_IDLE or nice 19
//! while polling cannot be undone without CAP_SYS_NICE (RLIMIT_NICE 0) and
//! starves the poller's own request behind any busy thread while kicks are
//! off. The count is the whole host's: a worker confined to some CPUs, or
//! a cgroup's CPU quota, is still covered only by the rules below.
//!
//! Then, as noticed after the fact: while it polls, the
//! worker looks at the ring every ~100 ns; a gap of `STALL` between two
//! looks means it was not running (the host's cores are taken by others),
//! and so does a window whose thread ran for less than 7/8 of it
//! (`LOST_SHARE`: its CPU clock, read at the window's start and end, shows
//! a preemption while it served, or many short ones). Then polling stops at
//! once and stays off for a back-off that doubles with each stall
//! (`BACKOFF_MIN` to `BACKOFF_MAX`). It decays only with wall time free of
//! stalls once it has ended: halved for each span as long as itself.
//! (Halving it per clean window let it decay through the short windows a
//! contended host still grants, so polling kept coming back to stall:
//! 12-21 stalls per contended guest boot, the back-off at zero after each.)
//! On a contended host the requestq is then served by kicks, as without
//! `--poll-us`, polling retried every `BACKOFF_MAX`; on a host that was
//! contended for a while the back-off is forgotten within about twice
//! `BACKOFF_MAX` without a stall.
//!
//! `IDLE_MAX` windows in a row that served nothing (spinning for nothing;
//! on a shared host the kick after them waits too) turn polling off for a
//! shorter back-off of their own (`IDLE_BACKOFF_MAX`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use thiserror::Error;

/// The least window worth polling; a smaller one is closed.
pub const POLL_MIN: Duration = Duration::from_micros(4);

/// A gap between two looks at the ring, while polling, that only a
/// descheduled worker has (a look takes well under a microsecond; a time
/// slice given to another thread takes milliseconds).
pub const STALL: Duration = Duration::from_micros(200);

/// A window whose worker ran for less than 7/8 of it (and lost at least
/// `STALL`) was not served: contended, as a stall is. The thread's CPU time
/// shows a preemption while it served, or many short ones, which the gap
/// between two looks does not.
pub const LOST_SHARE: u32 = 8;

/// Whether a window of `polled` that lost `lost` to other threads was
/// contended.
fn lost_too_much(lost: Duration, polled: Duration) -> bool {
    lost >= STALL && lost * LOST_SHARE >= polled
}

/// Windows in a row that lapse without serving a request before polling
/// backs off (`IDLE_BACKOFF_MAX`). Each costs a window of spinning, and on a
/// host whose cores are shared, it seems, the wakeup after it too (a
/// thread that just spun is owed less CPU, EEVDF lets it wait): guest tier,
/// contended, maps of 3.3 ms on average while every window lapsed for
/// nothing, without a stall or time lost in a window.
/// A driver whose requests the window catches never has four in a row.
pub const IDLE_MAX: u32 = 4;

/// The longest back-off for idle windows (from `BACKOFF_MIN`, doubled while
/// they recur, none again once a window serves a request): idle windows say
/// that polling does not pay, not that the host is contended, and a driver
/// may start mapping back to back at any time (a guest's boot, then its
/// benchmark); under contention four idle windows every 200 ms are what
/// polling still costs.
pub const IDLE_BACKOFF_MAX: Duration = Duration::from_millis(200);

/// How long polling stays off after a stall, at first and at most.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How long polling stays off after the host was seen crowded (more
/// runnable threads than CPUs): a host that stays crowded costs at most one
/// read of /proc/loadavg per millisecond and never a spin (the window's
/// first read cuts it). Longer cost the polling gain where the count is
/// often crowded for an instant: 20 ms left a quiet guest tier's polled
/// MAPs at 36.9 us against 34.5 unpolled (93% of windows cut), 1 ms at
/// 15.9 (spec-notes/benchmarks.md).
pub const CROWDED_OFF: Duration = Duration::from_millis(1);

/// While a window polls, how often it reads the run queues again: a thread
/// that became runnable meanwhile waits at most this long for the poller's
/// CPU (a read costs a few microseconds, `poll_probe_costs`).
pub const CROWD_CHECK: Duration = Duration::from_micros(50);

/// Whether a host with `running` runnable threads (the reader included) on
/// `cpus` CPUs is crowded: some thread waits for a CPU, and a poller would
/// keep it waiting.
pub(crate) fn crowded(running: u32, cpus: u32) -> bool {
    running > cpus
}

/// The runnable threads in /proc/loadavg (`0.80 1.02 1.17 3/456 12345`:
/// the fourth field's numerator, the kernel's `nr_running()` over every
/// online CPU).
pub(crate) fn nr_running(loadavg: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(loadavg).ok()?;
    let field = text.split_ascii_whitespace().nth(3)?;
    let (running, _) = field.split_once('/')?;
    running.parse().ok()
}

/// Why the run-queue probe is not available (polling keeps its other rules).
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("cannot open /proc/loadavg: {0}")]
    Open(std::io::Error),
    #[error("cannot read the runnable threads from /proc/loadavg")]
    Read,
    #[error("cannot count the online CPUs")]
    Cpus,
}

/// The host's run queues, read while polling: polling that takes a CPU
/// some runnable thread waits for hurts it (the vCPU that is to send the
/// next request, or anything else), so a window polls only while the
/// host has a CPU for every runnable thread. Opened at start-up, before
/// the seccomp filter (the workers may only pread it).
#[derive(Debug)]
pub(crate) struct RunQueues {
    file: File,
    cpus: u32,
}

impl RunQueues {
    pub(crate) fn open() -> Result<Self, ProbeError> {
        let file = File::open("/proc/loadavg").map_err(ProbeError::Open)?;
        // SAFETY: sysconf reads a system value; no memory is passed.
        let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let cpus = u32::try_from(n)
            .ok()
            .filter(|&c| c > 0)
            .ok_or(ProbeError::Cpus)?;
        let rq = Self { file, cpus };
        rq.running().ok_or(ProbeError::Read)?;
        Ok(rq)
    }

    /// The online CPUs, counted at start-up.
    pub(crate) fn cpus(&self) -> u32 {
        self.cpus
    }

    /// The runnable threads now (one pread; None: unreadable).
    pub(crate) fn running(&self) -> Option<u32> {
        let mut buf = [0u8; 128];
        let n = self.file.read_at(&mut buf, 0).ok()?;
        nr_running(&buf[..n])
    }

    /// Whether some runnable thread waits for a CPU now (None: unreadable).
    pub(crate) fn crowded(&self) -> Option<bool> {
        self.running().map(|r| crowded(r, self.cpus))
    }
}

/// What one polling window saw, for `PollWindow::ended`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WindowRun {
    /// Wall time from the window's start to its end.
    pub polled: Duration,
    /// Of that, the time the worker did not run (wall time minus its
    /// thread's CPU time; None: the CPU clock could not be read).
    pub lost: Option<Duration>,
    /// A gap of `STALL` between two looks at the ring.
    pub stalled: bool,
    /// Cut because the host was crowded (`RunQueues`), at its start or
    /// while it polled.
    pub crowded: bool,
    /// Requests the window served (none: it lapsed for nothing).
    pub served: u64,
}

/// What `PollWindow::ended` made of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Polling goes on.
    Clean,
    /// A gap of `STALL` between two looks: backed off.
    Stalled,
    /// Lost a `LOST_SHARE` of its time to other threads: backed off.
    LostTime,
    /// The `IDLE_MAX`th window in a row that served nothing: backed off
    /// for `IDLE_BACKOFF_MAX` at most.
    Idle,
    /// Cut because the host was crowded: off for `CROWDED_OFF`.
    Crowded,
}

/// How long to keep polling after serving the requestq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollWindow {
    max: Duration,
    current: Duration,
    /// The back-off after the last stall (zero: none).
    backoff: Duration,
    /// No polling before this (a stall's back-off).
    off_until: Option<Instant>,
    /// Since when no stall was seen with polling allowed: the end of the
    /// last back-off, or its last halving.
    clean_since: Option<Instant>,
    /// Windows in a row that served nothing.
    idle: u32,
    /// The back-off for idle windows (zero: none), and until when it holds.
    idle_backoff: Duration,
    idle_until: Option<Instant>,
    /// No polling before this: the host was crowded.
    crowded_until: Option<Instant>,
}

impl PollWindow {
    /// A window bounded by `max` (zero: never poll), closed at first.
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            current: Duration::ZERO,
            backoff: Duration::ZERO,
            off_until: None,
            clean_since: None,
            idle: 0,
            idle_backoff: Duration::ZERO,
            idle_until: None,
            crowded_until: None,
        }
    }

    /// A new bound (zero: never poll), at run time: the window starts over,
    /// closed; a back-off in force, and the time towards its decay, stay
    /// (the host has not changed).
    pub fn set_max(&mut self, max: Duration) {
        self.max = max;
        self.current = Duration::ZERO;
    }

    /// How long to poll after this pass (the adaptive window, ignoring a
    /// back-off).
    pub fn current(&self) -> Duration {
        self.current
    }

    /// How long to poll after a pass at `now`: nothing while backing off.
    pub fn at(&self, now: Instant) -> Duration {
        let off = |until: Option<Instant>| until.is_some_and(|t| now < t);
        if off(self.off_until) || off(self.idle_until) || off(self.crowded_until) {
            Duration::ZERO
        } else {
            self.current
        }
    }

    /// A polling window ended at `now` (`run`: what it saw). Contended (a
    /// stall, or the window lost a `LOST_SHARE` of its time to other
    /// threads), or the `IDLE_MAX`th in a row to serve nothing: back off.
    /// Cut because the host was crowded: off for `CROWDED_OFF`.
    /// The back-off decays with wall time free of stalls once it has ended,
    /// not per window (a contended host still grants short windows that
    /// run clean; were each to halve the back-off, polling would keep
    /// coming back to stall again).
    pub fn ended(&mut self, now: Instant, run: WindowRun) -> Verdict {
        self.decay(now);
        if run.served == 0 {
            // A window cut short did not lapse for nothing.
            if !run.crowded {
                self.idle += 1;
            }
        } else {
            self.idle = 0;
            self.idle_backoff = Duration::ZERO;
        }
        let verdict = if run.stalled {
            Verdict::Stalled
        } else if run.lost.is_some_and(|l| lost_too_much(l, run.polled)) {
            Verdict::LostTime
        } else if run.crowded {
            // Not a back-off: the reading is direct, the next one decides.
            self.crowded_until = now.checked_add(CROWDED_OFF);
            return Verdict::Crowded;
        } else if self.idle >= IDLE_MAX {
            self.idle = 0;
            self.idle_backoff = (self.idle_backoff * 2).clamp(BACKOFF_MIN, IDLE_BACKOFF_MAX);
            self.idle_until = now.checked_add(self.idle_backoff);
            return Verdict::Idle;
        } else {
            return Verdict::Clean;
        };
        self.idle = 0;
        self.stalled(now);
        verdict
    }

    /// The back-off in force after the last stall (zero: none).
    pub fn backoff(&self) -> Duration {
        self.backoff
    }

    /// Polling stalled at `now` (the worker was descheduled): stop, and
    /// stay off for twice the last back-off.
    fn stalled(&mut self, now: Instant) {
        self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        self.off_until = now.checked_add(self.backoff);
        self.clean_since = self.off_until;
    }

    /// For each span as long as the back-off that passed without a stall
    /// since it ended (or was last halved), halve it (below `BACKOFF_MIN`:
    /// none): the host has room again, so a later stall backs off less.
    fn decay(&mut self, now: Instant) {
        while let Some(since) = self.clean_since {
            if self.backoff.is_zero() {
                self.clean_since = None;
            } else if now.saturating_duration_since(since) >= self.backoff {
                self.clean_since = since.checked_add(self.backoff);
                self.backoff /= 2;
                if self.backoff < BACKOFF_MIN {
                    self.backoff = Duration::ZERO;
                }
            } else {
                break;
            }
        }
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

    fn stall() -> WindowRun {
        WindowRun {
            polled: us(300),
            lost: None,
            stalled: true,
            crowded: false,
            served: 1,
        }
    }

    fn clean() -> WindowRun {
        clean_for(us(300))
    }

    fn clean_for(polled: Duration) -> WindowRun {
        WindowRun {
            polled,
            lost: Some(Duration::ZERO),
            stalled: false,
            crowded: false,
            served: 1,
        }
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

    #[test]
    fn a_stall_turns_polling_off_for_a_back_off_that_doubles_and_decays_with_time_free_of_stalls() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut w = PollWindow::new(us(200));
        w.observe(us(20));
        assert_eq!(w.at(t0), us(200));
        w.ended(t0, stall());
        assert_eq!(w.at(t0), Duration::ZERO);
        assert_eq!(w.at(t0 + ms(49)), Duration::ZERO);
        assert_eq!(w.at(t0 + ms(50)), us(200), "back after BACKOFF_MIN");
        // Stalls in a row: 100 ms, 200 ms, ... up to BACKOFF_MAX.
        let t1 = t0 + ms(50);
        w.ended(t1, stall());
        assert_eq!(w.at(t1 + ms(99)), Duration::ZERO);
        assert_eq!(w.at(t1 + ms(100)), us(200));
        for _ in 0..20 {
            w.ended(t1, stall());
        }
        assert_eq!(w.at(t1 + BACKOFF_MAX - ms(1)), Duration::ZERO);
        assert_eq!(w.at(t1 + BACKOFF_MAX), us(200));
        // Wall time free of stalls once the back-off ended halves it, once
        // per span as long as the back-off: 2 s free after it ended, 1 s.
        let t2 = t1 + BACKOFF_MAX + BACKOFF_MAX;
        w.ended(t2 - ms(1), clean());
        assert_eq!(w.backoff(), BACKOFF_MAX);
        w.ended(t2, clean());
        assert_eq!(w.backoff(), BACKOFF_MAX / 2);
        // 2 s more: 500, 250, 125, 62.5 ms, then below BACKOFF_MIN: none.
        let t3 = t2 + BACKOFF_MAX;
        w.ended(t3, clean());
        assert_eq!(w.backoff(), Duration::ZERO);
        w.ended(t3, stall());
        assert_eq!(w.at(t3 + BACKOFF_MIN - ms(1)), Duration::ZERO);
        assert_eq!(w.at(t3 + BACKOFF_MIN), us(200));
        // A stall 10 ms after the back-off ended: doubled.
        let t4 = t3 + BACKOFF_MIN + ms(10);
        w.ended(t4, clean());
        w.ended(t4, stall());
        assert_eq!(w.backoff(), 2 * BACKOFF_MIN);
        // Idle time counts (no window needed): 100 ms free after it ended
        // halve it before the next stall doubles it.
        let t5 = t4 + 2 * BACKOFF_MIN + 2 * BACKOFF_MIN;
        w.ended(t5, stall());
        assert_eq!(w.backoff(), 2 * BACKOFF_MIN);
        // The adaptive window itself is unchanged by a back-off.
        assert_eq!(w.current(), us(200));
    }

    #[test]
    fn short_clean_windows_between_stalls_keep_the_back_off() {
        // A contended host still grants short windows that run clean; the
        // back-off must not decay through them, or polling keeps coming
        // back to stall again.
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut w = PollWindow::new(us(200));
        w.observe(us(20));
        for _ in 0..10 {
            w.ended(t0, stall());
        }
        assert_eq!(w.backoff(), BACKOFF_MAX);
        // 100 clean windows of 300 us, one after the other: 30 ms polled
        // without a stall once the back-off ended.
        let mut t1 = t0 + BACKOFF_MAX;
        for _ in 0..100 {
            t1 += us(300);
            w.ended(t1, clean());
        }
        assert_eq!(w.backoff(), BACKOFF_MAX, "30 ms of clean polling");
        w.ended(t1, stall());
        assert_eq!(w.at(t1 + BACKOFF_MAX - ms(1)), Duration::ZERO);
        assert_eq!(w.at(t1 + BACKOFF_MAX), us(200));
    }

    #[test]
    fn a_window_that_lost_its_time_to_others_counts_as_a_stall() {
        // No gap between two looks reached STALL (the worker was taken
        // off the core while it served, or often for less), but the
        // thread ran for less than 7/8 of the window.
        let t0 = Instant::now();
        let mut w = PollWindow::new(us(200));
        w.observe(us(20));
        let run = WindowRun {
            polled: us(2000),
            lost: Some(us(600)),
            stalled: false,
            crowded: false,
            served: 1,
        };
        assert_eq!(w.ended(t0, run), Verdict::LostTime);
        assert_eq!(w.at(t0), Duration::ZERO);
        assert_eq!(w.backoff(), BACKOFF_MIN);
    }

    #[test]
    fn a_little_time_lost_is_clean() {
        let t0 = Instant::now();
        let mut w = PollWindow::new(us(200));
        w.observe(us(20));
        for (polled, lost) in [(2000, 199), (10_000, 1000), (100, 90)] {
            let run = WindowRun {
                polled: us(polled),
                lost: Some(us(lost)),
                stalled: false,
                crowded: false,
                served: 1,
            };
            assert_eq!(w.ended(t0, run), Verdict::Clean, "{polled} {lost}");
            assert_eq!(w.at(t0), us(200));
        }
        // An unreadable CPU clock: only the gaps count.
        let run = WindowRun {
            polled: us(1000),
            lost: None,
            stalled: false,
            crowded: false,
            served: 1,
        };
        assert_eq!(w.ended(t0, run), Verdict::Clean);
    }

    #[test]
    fn a_new_bound_starts_the_window_over_and_keeps_the_back_off() {
        let t0 = Instant::now();
        let mut w = PollWindow::new(us(200));
        w.observe(us(20));
        w.ended(t0, stall());
        w.set_max(Duration::ZERO);
        w.observe(us(1));
        assert_eq!(w.current(), Duration::ZERO, "off");
        w.set_max(us(100));
        assert_eq!(w.current(), Duration::ZERO, "closed at first");
        w.observe(us(20));
        assert_eq!(w.current(), us(100));
        assert_eq!(w.backoff(), BACKOFF_MIN);
        assert_eq!(w.at(t0), Duration::ZERO, "still backed off");
    }

    #[test]
    fn windows_that_lapse_for_nothing_back_off() {
        let t0 = Instant::now();
        let mut w = PollWindow::new(us(200));
        w.observe(us(20));
        let idle = WindowRun {
            served: 0,
            ..clean()
        };
        // Three in a row, then one that served: nothing.
        for _ in 0..3 {
            assert_eq!(w.ended(t0, idle), Verdict::Clean);
        }
        assert_eq!(w.ended(t0, clean()), Verdict::Clean);
        for _ in 0..IDLE_MAX - 1 {
            assert_eq!(w.ended(t0, idle), Verdict::Clean);
        }
        assert_eq!(w.at(t0), us(200));
        // The IDLE_MAXth in a row backs off for BACKOFF_MIN, the stalls'
        // back-off untouched.
        let ms = Duration::from_millis;
        assert_eq!(w.ended(t0, idle), Verdict::Idle);
        assert_eq!(w.at(t0), Duration::ZERO);
        assert_eq!(w.at(t0 + BACKOFF_MIN - ms(1)), Duration::ZERO);
        assert_eq!(w.at(t0 + BACKOFF_MIN), us(200));
        assert_eq!(w.backoff(), Duration::ZERO);
        // While they recur it doubles, up to IDLE_BACKOFF_MAX.
        let mut t = t0 + BACKOFF_MIN;
        let mut want = BACKOFF_MIN;
        for _ in 0..5 {
            for _ in 0..IDLE_MAX - 1 {
                assert_eq!(w.ended(t, idle), Verdict::Clean);
            }
            assert_eq!(w.ended(t, idle), Verdict::Idle);
            want = (want * 2).min(IDLE_BACKOFF_MAX);
            assert_eq!(w.at(t + want - ms(1)), Duration::ZERO);
            assert_eq!(w.at(t + want), us(200));
            t += want;
        }
        // A window that serves a request: BACKOFF_MIN again.
        w.ended(t, clean());
        for _ in 0..IDLE_MAX {
            w.ended(t, idle);
        }
        assert_eq!(w.at(t + BACKOFF_MIN), us(200));
    }

    #[test]
    fn a_crowded_host_turns_polling_off_for_a_while_and_nothing_else() {
        // The run queues held more runnable threads than CPUs: polling
        // stops for CROWDED_OFF, without a back-off (the reading is
        // direct, the next one decides) and without counting the window
        // as idle (it was cut, not lapsed).
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut w = PollWindow::new(us(200));
        w.observe(us(20));
        let crowded = WindowRun {
            served: 0,
            crowded: true,
            ..clean()
        };
        for i in 0..2 * IDLE_MAX {
            let t = t0 + CROWDED_OFF * i;
            assert_eq!(w.ended(t, crowded), Verdict::Crowded);
            assert_eq!(w.at(t), Duration::ZERO);
            assert_eq!(w.at(t + CROWDED_OFF - us(1)), Duration::ZERO);
            assert_eq!(w.at(t + CROWDED_OFF), us(200));
        }
        assert_eq!(w.backoff(), Duration::ZERO);
        // No idle windows counted: the next three lapse without a back-off.
        let idle = WindowRun {
            served: 0,
            ..clean()
        };
        let t = t0 + ms(500);
        for _ in 0..IDLE_MAX - 1 {
            assert_eq!(w.ended(t, idle), Verdict::Clean);
        }
        // A stall or lost time in a crowded window is what it is.
        let stalled = WindowRun {
            stalled: true,
            ..crowded
        };
        assert_eq!(w.ended(t, stalled), Verdict::Stalled);
        assert_eq!(w.backoff(), BACKOFF_MIN);
    }

    #[test]
    fn the_run_queues_are_read_from_proc_loadavg() {
        assert_eq!(nr_running(b"0.80 1.02 1.17 3/456 12345\n"), Some(3));
        assert_eq!(nr_running(b"12.00 9.50 7.25 17/1024 99\n"), Some(17));
        for bad in [
            &b""[..],
            b"0.80 1.02 1.17",
            b"0.80 1.02 1.17 x/456 1",
            b"0.80 1.02 1.17 3 1",
            b"\xff\xfe 1 2 3/4 5",
        ] {
            assert_eq!(nr_running(bad), None, "{bad:?}");
        }
        // The reader counts itself: as many runnable threads as CPUs
        // leaves none waiting.
        assert!(!crowded(1, 1) && !crowded(2, 2) && !crowded(0, 2));
        assert!(crowded(3, 2) && crowded(2, 1));
        // And the probe reads a running host (this thread at least).
        let rq = RunQueues::open().expect("/proc/loadavg");
        assert!(rq.cpus() >= 1);
        assert!(rq.running().is_some_and(|n| n >= 1));
    }

    /// What the candidate signals cost per call on this host (not a check:
    /// `cargo test --lib -- --ignored --nocapture poll_probe_costs`).
    #[test]
    #[ignore]
    fn poll_probe_costs() {
        const N: u32 = 20_000;
        let time = |name: &str, f: &mut dyn FnMut()| {
            for _ in 0..N / 10 {
                f();
            }
            let t = Instant::now();
            for _ in 0..N {
                f();
            }
            let per = t.elapsed() / N;
            println!("poll-probe-cost {name} ns_per_call={}", per.as_nanos());
        };
        let rq = RunQueues::open().expect("/proc/loadavg");
        time("instant_now", &mut || {
            std::hint::black_box(Instant::now());
        });
        time("pread_loadavg", &mut || {
            std::hint::black_box(rq.crowded());
        });
        time("sched_yield", &mut || {
            // SAFETY: sched_yield takes no arguments.
            std::hint::black_box(unsafe { libc::sched_yield() });
        });
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        time("clock_thread_cputime", &mut || {
            // SAFETY: clock_gettime writes only the timespec it is given.
            std::hint::black_box(unsafe {
                libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts)
            });
        });
        println!(
            "poll-probe-cost cpus={} running={:?}",
            rq.cpus(),
            rq.running()
        );
    }
}
