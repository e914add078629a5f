//! Upstream health: which configured upstreams (`dns.upstreams`) to pass over because they
//! stopped answering.
//!
//! An upstream is marked down after [`MAX_FAILS`] queries in a row went unanswered (timed
//! out, or could not be sent). While it is down, queries go to the other upstreams the
//! client's policy allows; when every allowed upstream is down they go to one anyway
//! (health never decides what a pod may resolve, and a silent upstream only costs a
//! timeout). After a back-off (1 s, doubling with each failed probe, at most 30 s) one
//! query is let through as a probe: an answer brings the upstream back, silence doubles the
//! back-off. Any answer from an upstream resets its count.
//!
//! The query path pays one atomic load while every upstream is healthy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tracing::{info, warn};

/// Unanswered queries in a row after which an upstream is marked down.
pub(crate) const MAX_FAILS: u32 = 3;

/// The first back-off of a down upstream; it doubles with each failed probe.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The longest back-off.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Default, Clone, Copy)]
struct State {
    /// Unanswered queries since the last answer.
    fails: u32,
    /// While down: when the next probe may go. `None`: up.
    down_until: Option<Instant>,
    /// While down: the current back-off.
    backoff: Duration,
    /// While down: a probe is out.
    probing: bool,
}

/// The health of the configured upstreams.
#[derive(Debug)]
pub(crate) struct Health {
    servers: Vec<SocketAddr>,
    states: Mutex<Vec<State>>,
    /// Upstreams whose count is not zero: none, and every check is one load.
    troubled: AtomicUsize,
    /// Upstreams marked down now (the `dnsfence_dns_upstreams_down` metric).
    down: Gauge,
    /// How long a probe may take before another is let through.
    probe_timeout: Duration,
}

impl Health {
    /// Tracks `servers`; `probe_timeout` is the upstream timeout; `down` counts the
    /// upstreams marked down.
    pub(crate) fn new(servers: &[SocketAddr], probe_timeout: Duration, down: Gauge) -> Self {
        Self {
            servers: servers.to_vec(),
            states: Mutex::new(vec![State::default(); servers.len()]),
            troubled: AtomicUsize::new(0),
            down,
            probe_timeout,
        }
    }

    fn index(&self, server: SocketAddr) -> Option<usize> {
        self.servers.iter().position(|s| *s == server)
    }

    fn states(&self) -> std::sync::MutexGuard<'_, Vec<State>> {
        self.states.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on `server`'s state; `None` when it is not a configured upstream.
    fn with_state<R>(&self, server: SocketAddr, f: impl FnOnce(&mut State) -> R) -> Option<R> {
        let i = self.index(server)?;
        self.states().get_mut(i).map(f)
    }

    /// Whether a query may go to `server` now. A down upstream whose back-off is over
    /// takes this query as its probe (and no other until the probe's outcome is known or
    /// it times out). Upstreams not configured are always usable.
    pub(crate) fn try_use(&self, server: SocketAddr) -> bool {
        if self.troubled.load(Ordering::Relaxed) == 0 {
            return true;
        }
        self.try_use_at(server, Instant::now())
    }

    /// [`Self::try_use`] at `now`.
    fn try_use_at(&self, server: SocketAddr, now: Instant) -> bool {
        self.with_state(server, |state| match state.down_until {
            None => true,
            Some(at) if now >= at => {
                // The probe: no other query until it is answered or times out.
                state.down_until = Some(now + self.probe_timeout);
                state.probing = true;
                true
            }
            Some(_) => false,
        })
        .unwrap_or(true)
    }

    /// Each configured upstream with its state, for `dnsfence status`: `up` or `down`,
    /// and the queries it left unanswered since its last answer.
    pub(crate) fn report(&self) -> Vec<serde_json::Value> {
        let states = self.states();
        self.servers
            .iter()
            .zip(states.iter())
            .map(|(server, state)| {
                serde_json::json!({
                    "address": server.to_string(),
                    "state": if state.down_until.is_some() { "down" } else { "up" },
                    "unanswered": state.fails,
                })
            })
            .collect()
    }

    /// `server` answered a query.
    pub(crate) fn answered(&self, server: SocketAddr) {
        if self.troubled.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.with_state(server, |state| {
            if state.fails == 0 {
                return;
            }
            if state.down_until.is_some() {
                self.down.dec();
                info!(upstream = %server, "upstream answers again; back in use");
            }
            *state = State::default();
            self.troubled.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// A query to `server` went unanswered (timed out or could not be sent).
    pub(crate) fn failed(&self, server: SocketAddr, now: Instant) {
        self.with_state(server, |state| {
            if state.fails == 0 {
                self.troubled.fetch_add(1, Ordering::Relaxed);
            }
            state.fails = state.fails.saturating_add(1);
            if state.down_until.is_some() {
                // The probe failed (or, seldom, a query sent before the upstream was marked
                // down timed out while the probe was out). Other failures while down are
                // queries sent before it was marked down: they change nothing.
                if state.probing {
                    state.probing = false;
                    state.backoff = (state.backoff * 2).min(MAX_BACKOFF);
                    state.down_until = Some(now + state.backoff);
                }
            } else if state.fails >= MAX_FAILS {
                state.backoff = FIRST_BACKOFF;
                state.down_until = Some(now + FIRST_BACKOFF);
                self.down.inc();
                warn!(
                    upstream = %server,
                    unanswered = state.fails,
                    "upstream marked down; queries go to the other upstreams until it answers a probe"
                );
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Two upstreams, 127.0.0.1:1 and :2, with this probe timeout.
    fn two(probe_timeout: Duration) -> Health {
        Health::new(&[addr(1), addr(2)], probe_timeout, Gauge::default())
    }

    /// `server` leaves [`MAX_FAILS`] queries unanswered at `now`: marked down.
    fn mark_down(h: &Health, server: SocketAddr, now: Instant) {
        for _ in 0..MAX_FAILS {
            h.failed(server, now);
        }
    }

    #[test]
    fn marked_down_after_max_fails_and_back_after_an_answered_probe() {
        let h = two(Duration::from_secs(5));
        let t0 = Instant::now();
        for _ in 0..MAX_FAILS - 1 {
            h.failed(addr(1), t0);
        }
        assert!(h.try_use_at(addr(1), t0), "not down before MAX_FAILS");
        h.failed(addr(1), t0);
        assert_eq!(h.down.get(), 1);
        assert!(!h.try_use_at(addr(1), t0));
        assert!(h.try_use_at(addr(2), t0), "the other upstream is untouched");
        // The back-off is over: one probe, then nothing until it is answered.
        let t1 = t0 + FIRST_BACKOFF;
        assert!(h.try_use_at(addr(1), t1));
        assert!(!h.try_use_at(addr(1), t1));
        h.answered(addr(1));
        assert_eq!(h.down.get(), 0);
        assert!(h.try_use_at(addr(1), t1));
        assert_eq!(h.troubled.load(Ordering::Relaxed), 0, "fast path again");
    }

    #[test]
    fn a_failed_probe_doubles_the_backoff_up_to_the_cap() {
        let h = two(Duration::from_millis(100));
        let mut now = Instant::now();
        mark_down(&h, addr(1), now);
        // Queries sent before it was marked down time out later: no change.
        for _ in 0..50 {
            h.failed(addr(1), now);
        }
        assert!(
            h.try_use_at(addr(1), now + FIRST_BACKOFF),
            "back-off still 1 s"
        );
        now += FIRST_BACKOFF;
        h.failed(addr(1), now);
        let mut backoff = FIRST_BACKOFF * 2;
        now += backoff;
        assert!(!h.try_use_at(addr(1), now - Duration::from_millis(1)));
        for _ in 0..10 {
            assert!(h.try_use_at(addr(1), now), "probe due after {backoff:?}");
            h.failed(addr(1), now);
            backoff = (backoff * 2).min(MAX_BACKOFF);
            assert!(!h.try_use_at(addr(1), now + backoff - Duration::from_millis(1)));
            now += backoff;
        }
        assert_eq!(backoff, MAX_BACKOFF);
        assert_eq!(h.down.get(), 1);
    }

    #[test]
    fn the_report_names_each_upstream_with_its_state() {
        let h = two(Duration::from_secs(5));
        let now = Instant::now();
        mark_down(&h, addr(2), now);
        h.failed(addr(1), now);
        assert_eq!(
            serde_json::Value::from(h.report()),
            serde_json::json!([
                {"address": "127.0.0.1:1", "state": "up", "unanswered": 1},
                {"address": "127.0.0.1:2", "state": "down", "unanswered": 3},
            ])
        );
    }

    #[test]
    fn an_unanswered_probe_lets_another_through_after_the_probe_timeout() {
        let h = two(Duration::from_millis(100));
        let t0 = Instant::now();
        mark_down(&h, addr(1), t0);
        let t1 = t0 + FIRST_BACKOFF;
        assert!(h.try_use_at(addr(1), t1));
        assert!(!h.try_use_at(addr(1), t1 + Duration::from_millis(99)));
        assert!(h.try_use_at(addr(1), t1 + Duration::from_millis(100)));
    }

    #[test]
    fn an_answer_resets_the_count_and_unknown_servers_are_always_usable() {
        let h = Health::new(&[addr(1)], Duration::from_secs(5), Gauge::default());
        let now = Instant::now();
        h.failed(addr(1), now);
        h.failed(addr(1), now);
        h.answered(addr(1));
        h.failed(addr(1), now);
        assert!(h.try_use_at(addr(1), now), "one failure since the answer");
        assert_eq!(h.down.get(), 0);
        h.failed(addr(9), now);
        assert!(h.try_use_at(addr(9), now));
    }
}
