//! Time in the proxy, read in few places. The upstream timer reads the clock once per
//! wake-up (at most every `dns.upstream_timeout` / 10, and every 250 ms) and publishes that
//! instant here: the coarse clock, which uptime, snapshot age, the TTLs `fqdn list` shows,
//! restored mappings and the expiry of learned mappings go by. Recurring failures are
//! logged through a [`Throttle`], which needs no clock at all. Nothing here reads the clock.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

/// The coarse clock, and when the learned mappings are next due to expire.
#[derive(Debug)]
pub(crate) struct Clock {
    started: Instant,
    /// The upstream timer's last wake-up; the expiry loop waits on it.
    now: watch::Sender<Instant>,
    /// When the expiry loop wants to run next (the timer wakes for it).
    expire_due: Mutex<Instant>,
    /// Tells the timer that `expire_due` changed.
    rescheduled: Notify,
}

impl Clock {
    /// A clock started at `now` (the proxy's start), expiry due at once.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            started: now,
            now: watch::Sender::new(now),
            expire_due: Mutex::new(now),
            rescheduled: Notify::new(),
        }
    }

    /// The instant of the timer's last wake-up.
    pub(crate) fn now(&self) -> Instant {
        *self.now.borrow()
    }

    /// How long ago the proxy started (as of the last wake-up).
    pub(crate) fn uptime(&self) -> Duration {
        self.now().saturating_duration_since(self.started)
    }

    /// The timer woke at `now`.
    pub(crate) fn tick(&self, now: Instant) {
        self.now.send_replace(now);
    }

    /// Every wake-up of the timer, from now on.
    pub(crate) fn ticks(&self) -> watch::Receiver<Instant> {
        self.now.subscribe()
    }

    /// When the expiry loop wants to run next.
    pub(crate) fn expire_due(&self) -> Instant {
        *self
            .expire_due
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The expiry loop wants to run again at `at`.
    pub(crate) fn set_expire_due(&self, at: Instant) {
        *self
            .expire_due
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = at;
        self.rescheduled.notify_one();
    }

    /// Returns once the expiry loop has asked for another time (see
    /// [`Self::set_expire_due`]; a request made meanwhile counts).
    pub(crate) async fn rescheduled(&self) {
        self.rescheduled.notified().await;
    }
}

/// Failures in a row logged once: the first of a run, then one in [`Throttle::EVERY`]. The
/// loops that use it pause 100 ms after each failure, so that is at most once a second.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    /// Failures since the last success.
    run: u32,
}

impl Throttle {
    /// One log line per this many failures in a row.
    pub(crate) const EVERY: u32 = 10;

    /// A failure: `Some(n)` when it is to be logged, `n` the failures not logged since the
    /// last one that was.
    pub(crate) fn failed(&mut self) -> Option<u32> {
        let n = self.run;
        self.run = self.run.saturating_add(1);
        match n {
            0 => Some(0),
            n if n % Self::EVERY == 0 => Some(Self::EVERY - 1),
            _ => None,
        }
    }

    /// A success ends the run.
    pub(crate) fn succeeded(&mut self) {
        self.run = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_failures_is_logged_once_in_ten_and_a_success_starts_over() {
        let mut t = Throttle::default();
        let logged: Vec<_> = (0..25).filter_map(|_| t.failed()).collect();
        assert_eq!(logged, [0, 9, 9]);
        t.succeeded();
        assert_eq!(t.failed(), Some(0));
        assert_eq!(t.failed(), None);
    }

    #[test]
    fn the_coarse_clock_is_the_last_tick() {
        let t0 = Instant::now();
        let clock = Clock::new(t0);
        let mut ticks = clock.ticks();
        clock.tick(t0 + Duration::from_secs(3));
        assert!(ticks.has_changed().unwrap_or(false));
        assert_eq!(*ticks.borrow_and_update(), t0 + Duration::from_secs(3));
        assert_eq!(clock.uptime(), Duration::from_secs(3));
    }
}
