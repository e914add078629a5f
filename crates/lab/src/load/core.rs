//! What every socket shares ([`Plan`]: the queries, the schedule, the limits) and the
//! queries in flight on one socket ([`Core`]): launching tries, matching answers by ID and
//! question, expiring deadlines, queueing retries.
//!
//! Sans-IO: time is a parameter and no socket is touched, so its tests need no network.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::stats::Stats;
use super::{LoadSpec, LOAD_SOCKETS};
use crate::LabError;

/// What every worker shares: the queries, the schedule and the limits.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) names: Vec<String>,
    /// One query per name, ID 0.
    templates: Vec<Vec<u8>>,
    pub(super) qps: u32,
    pub(super) sockets: u64,
    timeout: Duration,
    tries: u32,
    pub(super) start: Instant,
}

impl Plan {
    pub(super) fn new(spec: &LoadSpec) -> Result<Self, LabError> {
        if spec.names.is_empty() || spec.qps == 0 || spec.timeout.is_zero() {
            return Err(LabError::Invalid(
                "a DNS load needs names, a rate and a timeout",
            ));
        }
        let templates = spec
            .names
            .iter()
            .map(|name| crate::query::encode(name, spec.qtype))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            names: spec.names.clone(),
            templates,
            qps: spec.qps,
            sockets: u64::from(spec.qps).min(LOAD_SOCKETS as u64),
            timeout: spec.timeout,
            tries: spec.retries.saturating_add(1),
            start: Instant::now(),
        })
    }

    /// When the `n`-th query of the load is due.
    pub(super) fn due(&self, n: u64) -> Instant {
        let nanos = u128::from(n) * 1_000_000_000 / u128::from(self.qps);
        self.start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// One try in flight.
#[derive(Debug, Clone, Copy)]
pub(super) struct Flight {
    /// Which name (index into the plan).
    pub(super) name: usize,
    /// When the query's first try was sent.
    pub(super) first_sent: Instant,
    /// Tries so far, this one included.
    pub(super) tries: u32,
    /// Unique per try of a worker, to recognise stale deadlines.
    pub(super) seq: u64,
}

/// The queries in flight on one socket, without the socket: what to send, what an answer
/// or the clock means. Time is a parameter.
#[derive(Debug)]
pub(super) struct Core {
    pub(super) plan: Arc<Plan>,
    flights: HashMap<u16, Flight>,
    /// Deadlines in send order, hence in time order (every try has the same timeout).
    deadlines: VecDeque<(Instant, u16, u64)>,
    /// Queries to send again.
    pub(super) retries: Vec<Flight>,
    next_id: u16,
    next_seq: u64,
}

impl Core {
    pub(super) fn new(plan: Arc<Plan>, index: u64) -> Self {
        let expected = u64::from(plan.qps) * (plan.timeout.as_millis() as u64 + 1) / 1000;
        let capacity = (expected * u64::from(plan.tries) / plan.sockets).min(1 << 16) as usize;
        Self {
            plan,
            flights: HashMap::with_capacity(capacity),
            deadlines: VecDeque::with_capacity(capacity),
            retries: Vec::new(),
            next_id: (index as u16).wrapping_mul(0x4000) | 0x0dd,
            next_seq: 0,
        }
    }

    /// Registers a try of `flight` sent at `now` and writes its query into `out`; false
    /// when every ID is in flight.
    pub(super) fn launch(&mut self, now: Instant, mut flight: Flight, out: &mut Vec<u8>) -> bool {
        let Some(id) = (0..=u16::MAX)
            .map(|i| self.next_id.wrapping_add(i))
            .find(|id| !self.flights.contains_key(id))
        else {
            return false;
        };
        self.next_id = id.wrapping_add(1);
        flight.seq = self.next_seq;
        self.next_seq += 1;
        self.flights.insert(id, flight);
        self.deadlines
            .push_back((now + self.plan.timeout, id, flight.seq));
        out.clear();
        out.extend_from_slice(&self.plan.templates[flight.name]);
        if let Some(header) = out.get_mut(..2) {
            header.copy_from_slice(&id.to_be_bytes());
        }
        true
    }

    /// Takes a datagram received at `now`.
    pub(super) fn answer(&mut self, now: Instant, message: &[u8], stats: &mut Stats) {
        let Some(&[id0, id1, flags, rcode, 0, 1]) = message.get(..6) else {
            stats.unmatched += 1;
            return;
        };
        let id = u16::from_be_bytes([id0, id1]);
        let matches = |flight: &Flight| {
            let question = self.plan.templates[flight.name]
                .get(12..)
                .unwrap_or_default();
            let asked = message.get(12..12 + question.len());
            flags & 0x80 != 0 && asked.is_some_and(|a| a.eq_ignore_ascii_case(question))
        };
        let Some(flight) = self.flights.get(&id).copied().filter(matches) else {
            stats.unmatched += 1;
            return;
        };
        self.flights.remove(&id);
        let outcome = match rcode & 0x0f {
            0 => Outcome::NoError,
            2 => Outcome::ServFail,
            3 => Outcome::NxDomain,
            5 => Outcome::Refused,
            other => Outcome::Other(other),
        };
        if matches!(outcome, Outcome::ServFail | Outcome::Refused) && self.retry(flight) {
            return;
        }
        stats.finish(now, &self.plan, flight, outcome);
    }

    /// Ends the tries whose deadline passed at `now`: retried or timed out.
    pub(super) fn expire(&mut self, now: Instant, stats: &mut Stats) {
        while let Some(&(deadline, id, seq)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            let Some(flight) = self.flights.get(&id).copied().filter(|f| f.seq == seq) else {
                continue; // answered
            };
            self.flights.remove(&id);
            if !self.retry(flight) {
                stats.finish(now, &self.plan, flight, Outcome::TimedOut);
            }
        }
    }

    /// Queues `flight` to be sent again, if it has tries left.
    fn retry(&mut self, flight: Flight) -> bool {
        if flight.tries >= self.plan.tries {
            return false;
        }
        self.retries.push(Flight {
            tries: flight.tries + 1,
            ..flight
        });
        true
    }

    /// When [`Core::expire`] may have something to do.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|&(deadline, ..)| deadline)
    }

    pub(super) fn is_idle(&self) -> bool {
        self.flights.is_empty() && self.retries.is_empty()
    }
}

/// How a query ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    NoError,
    NxDomain,
    ServFail,
    Refused,
    Other(u8),
    TimedOut,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(retries: u32) -> Arc<Plan> {
        let spec = LoadSpec {
            retries,
            ..LoadSpec::new(crate::DNS_V4, ["a.example", "b.example"], 100)
        };
        Arc::new(Plan::new(&spec).unwrap())
    }

    fn flight(name: usize, now: Instant) -> Flight {
        Flight {
            name,
            first_sent: now,
            tries: 1,
            seq: 0,
        }
    }

    /// The answer to `query` with `rcode` (no records: only the header matters).
    fn answer(query: &[u8], rcode: u8) -> Vec<u8> {
        let mut a = query.to_vec();
        a[2] |= 0x80;
        a[3] = (a[3] & 0xf0) | rcode;
        a
    }

    #[test]
    fn answers_match_by_id_and_question() {
        let (t0, mut stats, mut q) = (Instant::now(), Stats::default(), Vec::new());
        let mut core = Core::new(plan(0), 0);
        assert!(core.launch(t0, flight(0, t0), &mut q));
        let mut wrong_name = answer(&q, 0);
        wrong_name[13] = b'b';
        core.answer(t0, &wrong_name, &mut stats);
        core.answer(t0, &q, &mut stats); // not a response
        assert_eq!((stats.unmatched, stats.answered), (2, 0));

        core.answer(t0 + Duration::from_millis(3), &answer(&q, 0), &mut stats);
        core.answer(t0, &answer(&q, 0), &mut stats); // duplicate
        assert_eq!((stats.noerror, stats.unmatched), (1, 3));
        assert!(core.is_idle() && stats.failures.is_empty());
        assert_eq!(stats.latencies.percentile(50), Duration::from_millis(3));
        core.expire(t0 + Duration::from_secs(5), &mut stats);
        assert_eq!(stats.timed_out, 0);
    }

    #[test]
    fn timeouts_and_servfail_are_retried_with_new_ids_then_counted() {
        let (t0, mut stats, mut q) = (Instant::now(), Stats::default(), Vec::new());
        let mut core = Core::new(plan(1), 1);
        assert!(core.launch(t0, flight(1, t0), &mut q));
        let first = q.clone();
        core.expire(t0 + Duration::from_millis(999), &mut stats);
        assert!(core.retries.is_empty());
        core.expire(t0 + Duration::from_secs(1), &mut stats);
        let retry = core.retries.pop().unwrap();
        assert_eq!(retry.tries, 2);
        assert!(core.launch(t0 + Duration::from_secs(1), retry, &mut q));
        assert_ne!(q[..2], first[..2], "a retry has a new ID");
        core.answer(t0, &answer(&first, 0), &mut stats); // late
        core.expire(t0 + Duration::from_secs(2), &mut stats);
        assert_eq!(
            (stats.unmatched, stats.timed_out, stats.answered),
            (1, 1, 0)
        );
        assert_eq!(stats.failures[0].1, "b.example");
        assert_eq!(stats.failures[0].2, "timed out (2 tries)");

        assert!(core.launch(t0, flight(0, t0), &mut q));
        core.answer(t0, &answer(&q, 2), &mut stats);
        let retry = core.retries.pop().unwrap();
        assert!(core.launch(t0, retry, &mut q));
        core.answer(t0, &answer(&q, 2), &mut stats);
        assert_eq!((stats.servfail, stats.answered), (1, 1));
        assert_eq!(stats.failures[1].2, "SERVFAIL");
        assert!(core.is_idle());
    }

    #[test]
    fn the_schedule_spreads_queries_evenly() {
        let plan = plan(0);
        assert_eq!(plan.due(0), plan.start);
        assert_eq!(plan.due(250) - plan.start, Duration::from_millis(2500));
    }
}
