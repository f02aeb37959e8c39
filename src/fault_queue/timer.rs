// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The page-response timer: one timerfd in the eventq worker's epoll that
//! fires when the oldest outstanding page-request group may have timed out
//! (`--page-response-timeout-ms`).
//!
//! System calls are bounded by time, not by faults: the timer is armed only
//! when it is idle (the first group after a quiet spell), and after firing
//! it is armed again no sooner than `timeout / 8` later, so it fires at most
//! about eight times per timeout period however many groups come and go. A
//! group therefore ends between `timeout` and `timeout * 9 / 8` after it
//! was raised.
//!
//! It also ends a pause of the kernel fault FD's reads (`relay::READ_PAUSE`):
//! it fires no later than the pause's end, whatever the groups need.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use log::warn;
use vmm_sys_util::timerfd::TimerFd;

pub struct PageTimer {
    fd: TimerFd,
    /// When it fires next (None: disarmed).
    armed: Option<Instant>,
    /// Until when reads of the kernel's fault FD are paused (None: not).
    pause_until: Option<Instant>,
}

impl PageTimer {
    pub fn new() -> io::Result<Self> {
        let fd = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: F_SETFL on an fd we own; no memory is passed. Non-blocking:
        // a read after a re-arm (which clears the expiry count) must not
        // block the worker.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PageTimer {
            fd,
            armed: None,
            pause_until: None,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A group with deadline `at` was raised: arm the timer unless it is
    /// armed already (then it fires no later than an older group's
    /// deadline, and the scan at that time finds this one).
    pub fn group_raised(&mut self, now: Instant, at: Instant) {
        if self.armed.is_none() {
            self.set(now, Some(at));
        }
    }

    /// It fired: consume the expiry.
    pub fn fired(&mut self) {
        // EAGAIN: cleared by a re-arm since; nothing to consume.
        let _ = self.fd.wait();
        self.armed = None;
    }

    /// Arm for `next` (None: disarm), no sooner than `timeout / 8` from now.
    pub fn rearm(&mut self, now: Instant, next: Option<Instant>, timeout: Duration) {
        let at = next.map(|n| n.max(now + (timeout / 8).max(Duration::from_millis(1))));
        self.set(now, at);
    }

    /// Pause the kernel fault FD's reads until `until`; the timer fires by
    /// then.
    pub fn pause(&mut self, now: Instant, until: Instant) {
        self.pause_until = Some(until);
        if self.armed.is_none_or(|a| a > until) {
            self.set(now, Some(until));
        }
    }

    /// Has a pause ended by `now`? True once per pause.
    pub fn pause_ended(&mut self, now: Instant) -> bool {
        match self.pause_until {
            Some(until) if until <= now => {
                self.pause_until = None;
                true
            }
            _ => false,
        }
    }

    /// The connection's fault FD is gone: no pause to end.
    pub fn cancel_pause(&mut self) {
        self.pause_until = None;
    }

    fn set(&mut self, now: Instant, at: Option<Instant>) {
        // A pending pause's end comes first.
        let at = match (at, self.pause_until) {
            (Some(a), Some(p)) => Some(a.min(p)),
            (a, p) => a.or(p),
        };
        if self.armed == at {
            return;
        }
        let r = match at {
            // A zero value would disarm it: one nanosecond is "now".
            Some(at) => self.fd.reset(
                at.saturating_duration_since(now)
                    .max(Duration::from_nanos(1)),
                None,
            ),
            None => self.fd.clear(),
        };
        match r {
            Ok(()) => self.armed = at,
            // Not a guest-repeatable path: the fd is ours and valid.
            Err(e) => warn!("page-response timer: {e}"),
        }
    }
}
