//! Judging a client's query: parse it, choose the server it goes to (policy first, then
//! upstream health), count it and record its flow event, enforce the client's fairness
//! bound. It must not send anything or touch the learned mappings.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use dnsfence_dns::Reason;
use dnsfence_dns::{parse_query, write_reply, ParsedQuery, Query, Rcode};
use dnsfence_policy::{DnsReason, Protocol};
use tracing::debug;

use super::Shared;
use crate::flows::{self, Dns, Flow};
use crate::metrics::{TransportLabel, VerdictLabel};
use crate::upstream::Fwd;

/// What to do with a client's query.
#[allow(
    clippy::large_enum_variant,
    reason = "lives on the stack for one query; boxing would allocate per query"
)]
pub(crate) enum Step {
    /// Send these bytes back (length within the reply buffer).
    Reply(usize),
    /// Forward upstream to the given server; the parsed query says what to expect back,
    /// the flag whether the answer may teach IPs.
    Forward(Query, bool, SocketAddr),
    /// Send nothing.
    Drop,
}

/// A decision's reason, for people.
fn reason_text(reason: &Reason<'_>) -> String {
    match reason {
        Reason::UnknownClient => "unknown client: not in the endpoint inventory".into(),
        Reason::Policy(r) => match r {
            DnsReason::NotEnforced => "no policy enforces the endpoint".into(),
            DnsReason::Pattern { rule, pattern } => {
                format!("{} {}: {}", rule.policy, rule.path, pattern.as_str())
            }
            DnsReason::PortAllowed { rule } => {
                format!(
                    "{} {}: port allowed without DNS rules",
                    rule.policy, rule.rule.path
                )
            }
            DnsReason::NoPatternMatches => "no DNS rule pattern matches the name".into(),
            DnsReason::NotCovered => "no rule allows DNS to this server and port".into(),
            DnsReason::Denied { rule } => {
                if matches!(rule.rule.peer, dnsfence_policy::Peer::Fqdns(_)) {
                    format!(
                        "{} {}: egressDeny toFQDNs denies the name (deny wins)",
                        rule.policy, rule.rule.path
                    )
                } else {
                    format!("{} {}: egressDeny", rule.policy, rule.rule.path)
                }
            }
            DnsReason::InvalidName(e) => format!("not a hostname: {e}"),
        },
        Reason::SearchList { suffix } => {
            format!("an allowed name with search domain {suffix} appended: forwarded, not learned")
        }
    }
}

impl Shared {
    /// Judges the query in `packet` from `client` at `now`, to be sent to one of `servers`
    /// (tried from index `start` on, round robin): the first server the client's policy
    /// allows this name on and that is not marked down is chosen (the first allowed one
    /// when every allowed one is down; see [`Fwd::choose`]), and the query is denied only
    /// when none is allowed. A reply goes to `out`.
    #[allow(
        clippy::too_many_arguments,
        reason = "one call per query; a struct would only be unpacked"
    )]
    pub(crate) fn judge(
        &self,
        fwd: &mut Fwd,
        now: Instant,
        packet: &[u8],
        client: SocketAddr,
        servers: &[SocketAddr],
        start: usize,
        protocol: Protocol,
        out: &mut [u8],
    ) -> Step {
        let t = match protocol {
            Protocol::Tcp => TransportLabel::Tcp,
            _ => TransportLabel::Udp,
        };
        let query = match parse_query(packet) {
            ParsedQuery::Query(q) => q,
            ParsedQuery::Reject {
                rcode,
                question_end,
            } => {
                self.metrics.query(VerdictLabel::Malformed, t);
                debug!(%client, ?rcode, "malformed query refused");
                let mut flow = Flow::new("dns", "malformed", self.source(client.ip()));
                flow.policy = Some(format!("malformed query, answered {rcode:?}"));
                self.flows.push(flow);
                return match write_reply(packet, question_end, rcode, out) {
                    Some(n) => Step::Reply(n),
                    None => Step::Drop,
                };
            }
            ParsedQuery::Drop => {
                self.metrics.query(VerdictLabel::Malformed, t);
                debug!(%client, "unreadable query dropped");
                self.flows
                    .push(Flow::new("dns", "malformed", self.source(client.ip())));
                return Step::Drop;
            }
        };
        let snapshot = self.snapshot.load();
        let choice = fwd.choose(
            now,
            &snapshot,
            client.ip(),
            servers,
            start,
            protocol,
            &query,
        );
        let mut denied = None;
        if let Some((server, verdict)) = choice.denied {
            let rcode = verdict.deny.unwrap_or(Rcode::Refused);
            debug!(client = %client, name = ?query.name, reason = ?verdict.reason, "denied");
            let mut flow = Flow::new("dns", "denied", self.source(client.ip()));
            let (name, _) = flows::question_name(query.question(packet));
            flow.dns = Some(Dns {
                query: name,
                qtypes: vec![flows::qtype_name(query.qtype)],
                rcode: Some(format!("{rcode:?}").to_uppercase().into()),
                server: Some(server),
                ..Dns::default()
            });
            flow.policy = Some(reason_text(&verdict.reason));
            self.flows.push(flow);
            denied = Some(rcode);
        }
        let Some((server, verdict)) = choice.forward else {
            self.metrics.query(VerdictLabel::Denied, t);
            let rcode = denied.unwrap_or(Rcode::Refused);
            return match write_reply(packet, Some(query.question_end), rcode, out) {
                Some(n) => Step::Reply(n),
                None => Step::Drop,
            };
        };
        let learn = verdict.learn;
        let audited = verdict.audit;
        // Forwarded by an enforced endpoint's policy without teaching (a search-list
        // candidate, a port allowed without DNS rules) is still allowed, not unfiltered.
        let enforced = verdict.endpoint.is_some_and(|e| e.policy.enforced);
        if audited {
            let mut flow = Flow::new("dns", "audit", self.source(client.ip()));
            let (name, _) = flows::question_name(query.question(packet));
            flow.dns = Some(Dns {
                query: name,
                qtypes: vec![flows::qtype_name(query.qtype)],
                server: Some(server),
                ..Dns::default()
            });
            flow.policy = Some(reason_text(&verdict.reason));
            self.flows.push(flow);
        }
        if !self.enter(client.ip()) {
            self.metrics.query(VerdictLabel::Fairness, t);
            self.flows
                .push(Flow::new("dns", "fairness", self.source(client.ip())));
            return match write_reply(packet, Some(query.question_end), Rcode::ServFail, out) {
                Some(n) => Step::Reply(n),
                None => Step::Drop,
            };
        }
        self.metrics.query(
            if audited {
                VerdictLabel::Audit
            } else if learn || enforced {
                VerdictLabel::Allowed
            } else {
                VerdictLabel::Unfiltered
            },
            t,
        );
        Step::Forward(query, learn, server)
    }

    /// Counts a transparent query dropped because `client` set up its share of reply
    /// paths to new servers; `report`: also as a flow event (at most one a second per
    /// client).
    pub(crate) fn new_server_refused(&self, client: IpAddr, server: SocketAddr, report: bool) {
        self.metrics.new_servers_refused.inc();
        if report {
            debug!(%client, %server, "over the client's budget of new servers; dropped");
            let mut flow = Flow::new("dns", "fairness", self.source(client));
            flow.dns = Some(Dns {
                server: Some(server),
                ..Dns::default()
            });
            flow.policy = Some(format!(
                "more new servers per second than dns.transparent.client_new_servers_per_second: queries to new servers are dropped for the rest of the second (first: {server})"
            ));
            self.flows.push(flow);
        }
    }
}
