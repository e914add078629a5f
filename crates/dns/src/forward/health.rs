//! Upstream health: which configured upstreams (`dns.upstreams`) to pass over because they
//! stopped answering. It never reads the clock: every call takes `now`. It must not decide
//! what a client may resolve, nor log: it tells its caller when an upstream goes down or
//! comes back.
//!
//! An upstream is marked down after [`MAX_FAILS`] queries in a row went unanswered (timed
//! out, unreachable, or could not be sent). While it is down, queries go to the other
//! upstreams the client's policy allows; when every allowed upstream is down they go to one
//! anyway (health never decides what a pod may resolve, and a silent upstream only costs a
//! timeout). After a back-off (1 s, doubling with each failed probe, at most 30 s) one
//! query is let through as a probe: an answer brings the upstream back, silence doubles the
//! back-off. Any answer from an upstream resets its count.
//!
//! The query path pays one comparison while every upstream is healthy.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Unanswered queries in a row after which an upstream is marked down.
pub const MAX_FAILS: u32 = 3;

/// The first back-off of a down upstream; it doubles with each failed probe.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The longest back-off.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

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

/// One configured upstream as [`Forwarder::upstreams`](super::Forwarder::upstreams)
/// reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamStatus {
    /// Its address.
    pub address: SocketAddr,
    /// Whether it is marked down.
    pub down: bool,
    /// Queries it left unanswered since its last answer.
    pub unanswered: u32,
}

/// The health of the configured upstreams.
#[derive(Debug)]
pub(crate) struct Health {
    servers: Vec<SocketAddr>,
    states: Vec<State>,
    /// Upstreams whose count is not zero: none, and every check is one comparison.
    troubled: usize,
    /// How long a probe may take before another is let through.
    probe_timeout: Duration,
}

impl Health {
    /// Tracks `servers`; `probe_timeout` is the upstream timeout.
    pub(crate) fn new(servers: &[SocketAddr], probe_timeout: Duration) -> Self {
        Self {
            servers: servers.to_vec(),
            states: vec![State::default(); servers.len()],
            troubled: 0,
            probe_timeout,
        }
    }

    fn state(&mut self, server: SocketAddr) -> Option<&mut State> {
        let i = self.servers.iter().position(|s| *s == server)?;
        self.states.get_mut(i)
    }

    /// Whether a query may go to `server` at `now`. A down upstream whose back-off is over
    /// takes this query as its probe (and no other until the probe's outcome is known or
    /// it times out). Upstreams not configured are always usable.
    pub(crate) fn try_use(&mut self, server: SocketAddr, now: Instant) -> bool {
        if self.troubled == 0 {
            return true;
        }
        let probe_timeout = self.probe_timeout;
        let Some(state) = self.state(server) else {
            return true;
        };
        match state.down_until {
            None => true,
            Some(at) if now >= at => {
                // The probe: no other query until it is answered or times out.
                state.down_until = Some(now + probe_timeout);
                state.probing = true;
                true
            }
            Some(_) => false,
        }
    }

    /// Each configured upstream with its state, in configured order.
    pub(crate) fn report(&self) -> impl Iterator<Item = UpstreamStatus> + '_ {
        self.servers
            .iter()
            .zip(&self.states)
            .map(|(address, state)| UpstreamStatus {
                address: *address,
                down: state.down_until.is_some(),
                unanswered: state.fails,
            })
    }

    /// `server` answered a query. Returns true when that brings it back from down.
    pub(crate) fn answered(&mut self, server: SocketAddr) -> bool {
        if self.troubled == 0 {
            return false;
        }
        let Some(state) = self.state(server) else {
            return false;
        };
        if state.fails == 0 {
            return false;
        }
        let was_down = state.down_until.is_some();
        *state = State::default();
        self.troubled -= 1;
        was_down
    }

    /// A query to `server` went unanswered at `now`. Returns how many it left unanswered
    /// when this marks it down.
    pub(crate) fn failed(&mut self, server: SocketAddr, now: Instant) -> Option<u32> {
        let state = self.state(server)?;
        let first = state.fails == 0;
        state.fails = state.fails.saturating_add(1);
        let mut marked = None;
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
            marked = Some(state.fails);
        }
        if first {
            self.troubled += 1;
        }
        marked
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
        Health::new(&[addr(1), addr(2)], probe_timeout)
    }

    /// `server` leaves [`MAX_FAILS`] queries unanswered at `now`: marked down.
    fn mark_down(h: &mut Health, server: SocketAddr, now: Instant) {
        for _ in 0..MAX_FAILS {
            h.failed(server, now);
        }
    }

    fn down(h: &Health) -> usize {
        h.report().filter(|s| s.down).count()
    }

    #[test]
    fn marked_down_after_max_fails_and_back_after_an_answered_probe() {
        let mut h = two(Duration::from_secs(5));
        let t0 = Instant::now();
        for _ in 0..MAX_FAILS - 1 {
            assert_eq!(h.failed(addr(1), t0), None);
        }
        assert!(h.try_use(addr(1), t0), "not down before MAX_FAILS");
        assert_eq!(h.failed(addr(1), t0), Some(MAX_FAILS));
        assert_eq!(down(&h), 1);
        assert!(!h.try_use(addr(1), t0));
        assert!(h.try_use(addr(2), t0), "the other upstream is untouched");
        // The back-off is over: one probe, then nothing until it is answered.
        let t1 = t0 + FIRST_BACKOFF;
        assert!(h.try_use(addr(1), t1));
        assert!(!h.try_use(addr(1), t1));
        assert!(h.answered(addr(1)), "back up");
        assert_eq!(down(&h), 0);
        assert!(h.try_use(addr(1), t1));
        assert_eq!(h.troubled, 0, "fast path again");
    }

    #[test]
    fn a_failed_probe_doubles_the_backoff_up_to_the_cap() {
        let mut h = two(Duration::from_millis(100));
        let mut now = Instant::now();
        mark_down(&mut h, addr(1), now);
        // Queries sent before it was marked down time out later: no change.
        for _ in 0..50 {
            assert_eq!(h.failed(addr(1), now), None);
        }
        assert!(
            h.try_use(addr(1), now + FIRST_BACKOFF),
            "back-off still 1 s"
        );
        now += FIRST_BACKOFF;
        h.failed(addr(1), now);
        let mut backoff = FIRST_BACKOFF * 2;
        now += backoff;
        assert!(!h.try_use(addr(1), now - Duration::from_millis(1)));
        for _ in 0..10 {
            assert!(h.try_use(addr(1), now), "probe due after {backoff:?}");
            h.failed(addr(1), now);
            backoff = (backoff * 2).min(MAX_BACKOFF);
            assert!(!h.try_use(addr(1), now + backoff - Duration::from_millis(1)));
            now += backoff;
        }
        assert_eq!(backoff, MAX_BACKOFF);
        assert_eq!(down(&h), 1);
    }

    #[test]
    fn the_report_names_each_upstream_with_its_state() {
        let mut h = two(Duration::from_secs(5));
        let now = Instant::now();
        mark_down(&mut h, addr(2), now);
        h.failed(addr(1), now);
        let report: Vec<_> = h.report().collect();
        assert_eq!(
            report,
            [
                UpstreamStatus {
                    address: addr(1),
                    down: false,
                    unanswered: 1
                },
                UpstreamStatus {
                    address: addr(2),
                    down: true,
                    unanswered: 3
                },
            ]
        );
    }

    #[test]
    fn an_unanswered_probe_lets_another_through_after_the_probe_timeout() {
        let mut h = two(Duration::from_millis(100));
        let t0 = Instant::now();
        mark_down(&mut h, addr(1), t0);
        let t1 = t0 + FIRST_BACKOFF;
        assert!(h.try_use(addr(1), t1));
        assert!(!h.try_use(addr(1), t1 + Duration::from_millis(99)));
        assert!(h.try_use(addr(1), t1 + Duration::from_millis(100)));
    }

    #[test]
    fn an_answer_resets_the_count_and_unknown_servers_are_always_usable() {
        let mut h = Health::new(&[addr(1)], Duration::from_secs(5));
        let now = Instant::now();
        h.failed(addr(1), now);
        h.failed(addr(1), now);
        assert!(!h.answered(addr(1)), "it was never down");
        h.failed(addr(1), now);
        assert!(h.try_use(addr(1), now), "one failure since the answer");
        assert_eq!(down(&h), 0);
        h.failed(addr(9), now);
        assert!(h.try_use(addr(9), now));
    }
}
