//! The proxy's metrics, registered into a registry the caller owns.
//!
//! Label values are small fixed sets (verdict, transport, rcode); never a domain name.
//! Every handle used per query is resolved once here, so the hot path only increments.

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// What happened to a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VerdictLabel {
    /// Forwarded upstream.
    Allowed,
    /// Answered with the deny rcode (policy, or unknown client).
    Denied,
    /// Unreadable: FORMERR, NOTIMP, or dropped.
    Malformed,
    /// Over the per-client in-flight bound: SERVFAIL.
    Fairness,
    /// Denied by a policy in audit mode, forwarded.
    Audit,
    /// Forwarded without a policy check: from an endpoint no policy enforces, or from an
    /// unknown client with `dns.unknown_clients: forward`. Its answer teaches nothing.
    Unfiltered,
}

/// UDP or TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportLabel {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
}

/// Label values are lower case, as Prometheus conventions have them.
macro_rules! lower_case_label {
    ($t:ty) => {
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                encoder.write_str(&format!("{self:?}").to_ascii_lowercase())
            }
        }
    };
}

lower_case_label!(VerdictLabel);
lower_case_label!(TransportLabel);
lower_case_label!(RcodeLabel);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct QueryLabels {
    verdict: VerdictLabel,
    transport: TransportLabel,
}

/// Upstream response codes, folded into a fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RcodeLabel {
    /// 0.
    Noerror,
    /// 1.
    Formerr,
    /// 2.
    Servfail,
    /// 3.
    Nxdomain,
    /// 5.
    Refused,
    /// Anything else.
    Other,
}

impl RcodeLabel {
    /// Folds a 4-bit rcode.
    pub fn from_code(code: u8) -> Self {
        match code {
            0 => RcodeLabel::Noerror,
            1 => RcodeLabel::Formerr,
            2 => RcodeLabel::Servfail,
            3 => RcodeLabel::Nxdomain,
            5 => RcodeLabel::Refused,
            _ => RcodeLabel::Other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RcodeLabels {
    rcode: RcodeLabel,
}

/// Why an answer's address was not learned (see [`dnsfence_dns::inside`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NotLearnedLabel(pub dnsfence_dns::NotLearned);

impl EncodeLabelValue for NotLearnedLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NotLearnedLabels {
    reason: NotLearnedLabel,
}

/// Pre-resolved handles for the proxy's metrics.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    queries: Family<QueryLabels, Counter>,
    upstream_rcodes: Family<RcodeLabels, Counter>,
    /// Resolved handles: `[verdict][transport]`.
    query_handles: [[Counter; 2]; 6],
    /// Resolved handles, by `RcodeLabel` order.
    rcode_handles: [Counter; 6],
    not_learned: Family<NotLearnedLabels, Counter>,
    /// Resolved handles, by [`dnsfence_dns::NotLearned::ALL`] order.
    not_learned_handles: [Counter; 10],
    /// Upstream timeouts (asked of another upstream, or answered SERVFAIL).
    pub upstream_timeouts: Counter,
    /// Queries whose upstream could not be reached (its port unreachable, the TCP
    /// connection refused or broken): asked of another upstream, or answered SERVFAIL.
    pub upstream_errors: Counter,
    /// Queries asked of a second upstream: their first failed, or was slow.
    pub upstream_retries: Counter,
    /// Messages from upstream sockets that were not the awaited answer.
    pub answers_rejected: Counter,
    /// Answers released after `response_max_delay` without the sink's confirmation.
    pub hold_timeouts: Counter,
    /// TCP client connections closed at once: the client already had its share open.
    pub tcp_refused: Counter,
    /// Transparent UDP queries dropped unanswered: their client had set up its share of
    /// reply paths to new servers this second.
    pub new_servers_refused: Counter,
    /// TCP client connections closed because the client did not read its answers.
    pub tcp_write_timeouts: Counter,
    /// Configured upstreams marked down (passed over until they answer a probe).
    pub upstreams_down: Gauge,
    /// Open upstream UDP sockets: those in use, and replaced ones still waiting for
    /// answers (see `dns.upstream_port_lifetime`).
    pub upstream_sockets: Gauge,
    /// Seconds from a query's arrival to its answer leaving, for forwarded queries.
    pub latency_total: Histogram,
    /// Seconds the upstream took.
    pub latency_upstream: Histogram,
    /// Seconds answers were held waiting for enforcement.
    pub latency_hold: Histogram,
    /// Names with learned IPs.
    pub learned_names: Gauge,
    /// Learned (name, IP) mappings.
    pub learned_ips: Gauge,
    /// The agent's snapshot version in force (0 when not following an agent).
    pub snapshot_version: Gauge,
    /// Seconds since the snapshot in force was installed.
    pub snapshot_age: Gauge<f64, std::sync::atomic::AtomicU64>,
}

fn latency() -> Histogram {
    // 10 us .. ~5 s.
    Histogram::new(exponential_buckets(0.000_01, 2.5, 15))
}

const VERDICTS: [VerdictLabel; 6] = [
    VerdictLabel::Allowed,
    VerdictLabel::Denied,
    VerdictLabel::Malformed,
    VerdictLabel::Fairness,
    VerdictLabel::Audit,
    VerdictLabel::Unfiltered,
];
const RCODES: [RcodeLabel; 6] = [
    RcodeLabel::Noerror,
    RcodeLabel::Formerr,
    RcodeLabel::Servfail,
    RcodeLabel::Nxdomain,
    RcodeLabel::Refused,
    RcodeLabel::Other,
];

impl Default for ProxyMetrics {
    fn default() -> Self {
        let queries: Family<QueryLabels, Counter> = Family::default();
        let upstream_rcodes: Family<RcodeLabels, Counter> = Family::default();
        let query_handles = VERDICTS.map(|verdict| {
            [TransportLabel::Udp, TransportLabel::Tcp].map(|transport| {
                queries
                    .get_or_create(&QueryLabels { verdict, transport })
                    .clone()
            })
        });
        let rcode_handles = RCODES.map(|rcode| {
            upstream_rcodes
                .get_or_create(&RcodeLabels { rcode })
                .clone()
        });
        let not_learned: Family<NotLearnedLabels, Counter> = Family::default();
        let not_learned_handles = dnsfence_dns::NotLearned::ALL.map(|reason| {
            not_learned
                .get_or_create(&NotLearnedLabels {
                    reason: NotLearnedLabel(reason),
                })
                .clone()
        });
        Self {
            queries,
            upstream_rcodes,
            query_handles,
            rcode_handles,
            not_learned,
            not_learned_handles,
            upstream_timeouts: Counter::default(),
            upstream_errors: Counter::default(),
            upstream_retries: Counter::default(),
            answers_rejected: Counter::default(),
            hold_timeouts: Counter::default(),
            tcp_refused: Counter::default(),
            new_servers_refused: Counter::default(),
            tcp_write_timeouts: Counter::default(),
            upstreams_down: Gauge::default(),
            upstream_sockets: Gauge::default(),
            latency_total: latency(),
            latency_upstream: latency(),
            latency_hold: latency(),
            learned_names: Gauge::default(),
            learned_ips: Gauge::default(),
            snapshot_version: Gauge::default(),
            snapshot_age: Gauge::default(),
        }
    }
}

impl ProxyMetrics {
    /// Creates the metrics and registers them (names `dnsfence_dns_*` under `registry`'s
    /// prefix, which callers set to `dnsfence`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "snapshot_version",
            "Version of the agent's snapshot in force (0: not following an agent)",
            m.snapshot_version.clone(),
        );
        registry.register_with_unit(
            "snapshot_age",
            "Time since the snapshot in force was installed",
            Unit::Seconds,
            m.snapshot_age.clone(),
        );
        let r = registry.sub_registry_with_prefix("dns");
        r.register(
            "queries",
            "DNS queries by verdict and transport",
            m.queries.clone(),
        );
        r.register(
            "upstream_responses",
            "Upstream answers by rcode",
            m.upstream_rcodes.clone(),
        );
        r.register(
            "tcp_connections_refused",
            "TCP client connections closed at once because the client had its share open",
            m.tcp_refused.clone(),
        );
        r.register(
            "new_servers_refused",
            "Transparent queries dropped unanswered because their client asked more new servers per second than dns.transparent.client_new_servers_per_second",
            m.new_servers_refused.clone(),
        );
        r.register(
            "tcp_write_timeouts",
            "TCP client connections closed because the client did not read its answers",
            m.tcp_write_timeouts.clone(),
        );
        r.register(
            "upstream_timeouts",
            "Queries the upstream did not answer in time (asked of another upstream, or SERVFAIL)",
            m.upstream_timeouts.clone(),
        );
        r.register(
            "upstream_errors",
            "Queries whose upstream could not be reached (asked of another upstream, or SERVFAIL)",
            m.upstream_errors.clone(),
        );
        r.register(
            "upstream_retries",
            "Queries asked of a second upstream because the first failed or was slow",
            m.upstream_retries.clone(),
        );
        r.register(
            "upstreams_down",
            "Configured upstreams passed over because they stopped answering",
            m.upstreams_down.clone(),
        );
        r.register(
            "upstream_sockets",
            "Open upstream UDP sockets, in use or draining after their source port was replaced",
            m.upstream_sockets.clone(),
        );
        r.register(
            "answers_rejected",
            "Upstream messages ignored: wrong source, ID or question",
            m.answers_rejected.clone(),
        );
        r.register(
            "hold_timeouts",
            "Answers released before enforcement was confirmed",
            m.hold_timeouts.clone(),
        );
        r.register_with_unit(
            "latency",
            "Query arrival to answer sent, forwarded queries",
            Unit::Seconds,
            m.latency_total.clone(),
        );
        r.register_with_unit(
            "upstream_latency",
            "Time the upstream took to answer",
            Unit::Seconds,
            m.latency_upstream.clone(),
        );
        r.register_with_unit(
            "hold",
            "Time answers waited for their IPs to be enforced",
            Unit::Seconds,
            m.latency_hold.clone(),
        );
        r.register(
            "answer_ips_not_learned",
            "Addresses of allowed answers that were not learned because they point inside (the node, endpoints, the cluster, special-purpose ranges), by reason",
            m.not_learned.clone(),
        );
        r.register(
            "learned_names",
            "Names with learned IPs",
            m.learned_names.clone(),
        );
        r.register(
            "learned_ips",
            "Learned name-to-IP mappings",
            m.learned_ips.clone(),
        );
        m
    }

    fn query_handle(&self, verdict: VerdictLabel, transport: TransportLabel) -> &Counter {
        let v = VERDICTS.iter().position(|x| *x == verdict).unwrap_or(0);
        let t = usize::from(transport == TransportLabel::Tcp);
        &self.query_handles[v][t]
    }

    /// Counts a query.
    pub fn query(&self, verdict: VerdictLabel, transport: TransportLabel) {
        self.query_handle(verdict, transport).inc();
    }

    /// How many queries got `verdict` over `transport`.
    pub fn queries(&self, verdict: VerdictLabel, transport: TransportLabel) -> u64 {
        self.query_handle(verdict, transport).get()
    }

    /// Counts an answer's address that was not learned.
    pub fn not_learned(&self, reason: dnsfence_dns::NotLearned) {
        let i = dnsfence_dns::NotLearned::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        if let Some(c) = self.not_learned_handles.get(i) {
            c.inc();
        }
    }

    /// How many addresses were not learned for `reason`.
    pub fn not_learned_count(&self, reason: dnsfence_dns::NotLearned) -> u64 {
        self.not_learned
            .get_or_create(&NotLearnedLabels {
                reason: NotLearnedLabel(reason),
            })
            .get()
    }

    /// Counts an upstream rcode.
    pub fn upstream_rcode(&self, code: u8) {
        let label = RcodeLabel::from_code(code);
        let i = RCODES
            .iter()
            .position(|x| *x == label)
            .unwrap_or(RCODES.len() - 1);
        if let Some(c) = self.rcode_handles.get(i) {
            c.inc();
        }
    }
}
