//! A worker's counters ([`Stats`]) and the latency histogram (buckets of about 1%, in
//! microseconds), merged over workers into a [`super::LoadReport`].
//!
//! Plain counting: no clock, no I/O.

use std::time::{Duration, Instant};

use super::core::{Flight, Outcome, Plan};
use super::{LoadReport, MAX_LISTED_FAILURES};

/// A worker's counters, read by [`Load::snapshot`](super::Load::snapshot).
#[derive(Debug, Clone, Default)]
pub(super) struct Stats {
    pub(super) sent: u64,
    pub(super) answered: u64,
    pub(super) noerror: u64,
    nxdomain: u64,
    refused: u64,
    pub(super) servfail: u64,
    other_rcode: u64,
    pub(super) timed_out: u64,
    pub(super) retried: u64,
    pub(super) unmatched: u64,
    pub(super) socket_errors: u64,
    pub(super) latencies: Histogram,
    pub(super) failures: Vec<(Duration, String, String)>,
}

impl Stats {
    pub(super) fn finish(&mut self, now: Instant, plan: &Plan, flight: Flight, outcome: Outcome) {
        let counter = match outcome {
            Outcome::NoError => &mut self.noerror,
            Outcome::NxDomain => &mut self.nxdomain,
            Outcome::ServFail => &mut self.servfail,
            Outcome::Refused => &mut self.refused,
            Outcome::Other(_) => &mut self.other_rcode,
            Outcome::TimedOut => &mut self.timed_out,
        };
        *counter += 1;
        if outcome != Outcome::TimedOut {
            self.answered += 1;
            self.latencies
                .record(now.saturating_duration_since(flight.first_sent));
        }
        if outcome != Outcome::NoError && self.failures.len() < MAX_LISTED_FAILURES {
            let what = match outcome {
                Outcome::TimedOut => format!("timed out ({} tries)", flight.tries),
                Outcome::Other(rcode) => format!("RCODE {rcode}"),
                other => format!("{other:?}").to_ascii_uppercase(),
            };
            let when = flight.first_sent.saturating_duration_since(plan.start);
            let name = plan.names[flight.name].clone();
            self.failures.push((when, name, what));
        }
    }

    pub(super) fn merge(&mut self, other: &Self) {
        self.sent += other.sent;
        self.answered += other.answered;
        self.noerror += other.noerror;
        self.nxdomain += other.nxdomain;
        self.refused += other.refused;
        self.servfail += other.servfail;
        self.other_rcode += other.other_rcode;
        self.timed_out += other.timed_out;
        self.retried += other.retried;
        self.unmatched += other.unmatched;
        self.socket_errors += other.socket_errors;
        self.latencies.merge(&other.latencies);
        self.failures.extend(other.failures.iter().cloned());
    }

    pub(super) fn report(mut self, elapsed: Duration) -> LoadReport {
        self.failures.sort_by_key(|(when, ..)| *when);
        self.failures.truncate(MAX_LISTED_FAILURES);
        LoadReport {
            elapsed,
            sent: self.sent,
            answered: self.answered,
            noerror: self.noerror,
            nxdomain: self.nxdomain,
            refused: self.refused,
            servfail: self.servfail,
            other_rcode: self.other_rcode,
            timed_out: self.timed_out,
            retried: self.retried,
            unmatched: self.unmatched,
            socket_errors: self.socket_errors,
            latency_p50: self.latencies.percentile(50),
            latency_p99: self.latencies.percentile(99),
            max_latency: self.latencies.max,
            failures: self.failures,
        }
    }
}

/// Latencies in microseconds, in buckets of 1/128 of a power of two (exact below 128 µs).
#[derive(Debug, Clone)]
pub(super) struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    max: Duration,
}

/// Bits of a bucket's mantissa.
const SUB_BITS: u32 = 7;

/// Latencies are clamped below 2^40 µs (12 days).
const MAX_BITS: u32 = 40;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; ((MAX_BITS - SUB_BITS + 1) << SUB_BITS) as usize].into(),
            total: 0,
            max: Duration::ZERO,
        }
    }
}

impl Histogram {
    fn bucket(micros: u64) -> usize {
        let v = micros.min((1 << MAX_BITS) - 1);
        if v < 1 << SUB_BITS {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros();
        let mantissa = (v >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
        (((exp - SUB_BITS + 1) << SUB_BITS) as u64 + mantissa) as usize
    }

    /// The middle of a bucket, in microseconds.
    fn value(bucket: usize) -> u64 {
        let i = bucket as u64;
        if i < 1 << SUB_BITS {
            return i;
        }
        let shift = (i >> SUB_BITS) - 1;
        let low = ((1 << SUB_BITS) + (i & ((1 << SUB_BITS) - 1))) << shift;
        low + ((1 << shift) >> 1)
    }

    fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        if let Some(count) = self.counts.get_mut(Self::bucket(micros)) {
            *count += 1;
        }
        self.total += 1;
        self.max = self.max.max(latency);
    }

    fn merge(&mut self, other: &Self) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The latency `percent`% of the recorded ones do not exceed (zero when none).
    pub(super) fn percentile(&self, percent: u64) -> Duration {
        let rank = (self.total * percent).div_ceil(100).max(1);
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_micros(Self::value(bucket)).min(self.max);
            }
        }
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_within_one_percent() {
        for micros in [0, 1, 127, 128, 129, 255, 256, 1000, 123_456, 9_999_999] {
            let value = Histogram::value(Histogram::bucket(micros));
            assert!(
                value.abs_diff(micros) <= micros / 128,
                "{micros} -> {value}"
            );
        }
        let mut h = Histogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.percentile(50).as_secs_f64();
        assert!((0.0495..0.0505).contains(&p50), "{p50}");
        assert!(h.percentile(99) <= Duration::from_millis(100));
        assert_eq!(h.max, Duration::from_millis(100));
    }
}
