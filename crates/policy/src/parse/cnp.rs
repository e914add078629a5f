//! `ClusterNetworkPolicy` (`policy.networking.k8s.io` `v1alpha2`/`v1beta1`): its `spec`
//! validated and compiled onto the model, as one [`Rule`] plus its [`Precedence`].
//!
//! The policy's egress rules are evaluated first match wins; the model has no order (denies
//! win, allows add up). The compilation, rule by rule in written order:
//! - `Accept` (or AdminNetworkPolicy's `Allow`, with a warning): one allow per `to[]` peer,
//!   with the rule's ports. An allow that covers port 53 over UDP or TCP also gets a DNS
//!   rule matching every name on that peer and port: DNS the policy accepts goes through
//!   the proxy, unfiltered, so that the IPs of `domainNames` are learned.
//! - `Deny`: one deny per peer. A `Deny` without ports to `0.0.0.0/0` and `::/0` (or one of
//!   them, with a warning) is the deny-all: it becomes the rule's default-deny, and the
//!   rules after it, which can never match, are ignored with a warning. Denies after the
//!   last `Accept` before it are left to the default-deny.
//! - `Pass` is refused: it hands traffic to namespaced policies and the Baseline tier,
//!   which dnsfence does not model, and ignoring it would change what later rules decide.
//! - A `Deny` that may match traffic an earlier `Accept` matches is refused: first match
//!   would accept, dnsfence's deny would win.
//!
//! `networks` that hold both `0.0.0.0/0` and `::/0` select every destination; otherwise a
//! CIDR selects destinations outside the cluster only, as Cilium's `toCIDR`.

mod domain;
mod peers;
mod ports;

use ipnet::IpNet;
use serde_yaml_ng::Value;

use super::value::{
    bounded_list, exactly_one, fields, index, integer, join, list, required, string, too_many,
};
use crate::diag::Sink;
use crate::labels::EndpointSelector;
use crate::model::{
    CidrRule, EgressRule, Peer, PortProtocol, PortRule, Precedence, Protocol, Rule, Tier,
};
use crate::order::rules_may_overlap;
use crate::pattern::NamePattern;
use peers::PeerSpec;

/// The API's limit on rules per direction and on the items of each list in a rule.
const MAX_ITEMS: usize = 25;

const SPEC_FIELDS: &[&str] = &["tier", "priority", "subject", "ingress", "egress"];
const RULE_FIELDS: &[&str] = &["name", "action", "to", "protocols", "ports"];

/// Parses and compiles `spec`; `None` when it has errors.
pub(super) fn parse_spec(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<(Rule, Precedence)> {
    let errors_before = sink.errors();
    let f = fields(sink, v, path, SPEC_FIELDS)?;
    let tier_path = join(path, "tier");
    let tier = required(sink, &f, "tier", &tier_path).and_then(|t| {
        let s = string(sink, t, &tier_path)?;
        let tier = Tier::parse(s);
        if tier.is_none() {
            sink.error(
                &tier_path,
                format!("unknown tier {s:?} (expected Admin or Baseline)"),
            );
        }
        tier
    });
    let priority_path = join(path, "priority");
    let priority = required(sink, &f, "priority", &priority_path)
        .and_then(|p| integer(sink, p, &priority_path, 0, 1000));
    let subject_path = join(path, "subject");
    let subject =
        required(sink, &f, "subject", &subject_path).and_then(|s| subject(sink, s, &subject_path));
    if let Some(ingress) = f.get("ingress") {
        let p = join(path, "ingress");
        if let Some(items) = list(sink, ingress, &p) {
            too_many(sink, items, &p, MAX_ITEMS);
            if !items.is_empty() {
                sink.warn(
                    &p,
                    "ingress rules are not enforced by dnsfence (egress only)",
                );
            }
        }
    }
    let mut rules = Vec::new();
    if let Some(egress) = f.get("egress") {
        let p = join(path, "egress");
        if let Some(items) = list(sink, egress, &p) {
            too_many(sink, items, &p, MAX_ITEMS);
            for (i, item) in items.iter().enumerate() {
                if let Some(rule) = egress_rule(sink, item, &index(&p, i)) {
                    rules.push(rule);
                }
            }
        }
    }
    if sink.errors() > errors_before {
        return None;
    }
    let precedence = Precedence {
        tier: tier?,
        priority: priority?,
    };
    let rule = compile(sink, path, subject?, rules);
    (sink.errors() == errors_before).then_some((rule, precedence))
}

/// `subject`: exactly one of `namespaces` and `pods`.
fn subject(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<EndpointSelector> {
    let f = fields(sink, v, path, &["namespaces", "pods"])?;
    match exactly_one(sink, &f, path, &["namespaces", "pods"])? {
        ("namespaces", ns) => peers::namespaces(sink, ns, &join(path, "namespaces")),
        (_, pods) => peers::pods(sink, pods, &join(path, "pods")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Accept,
    Deny,
}

/// One egress rule, its peers mapped to model rules.
struct ParsedRule {
    path: String,
    action: Action,
    /// One per `to[]` entry, or a single [`Peer::Any`] when `networks` cover everything.
    entries: Vec<EgressRule>,
    /// A `Deny` of every destination on every port.
    deny_all: bool,
}

fn egress_rule(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<ParsedRule> {
    let errors_before = sink.errors();
    let f = fields(sink, v, path, RULE_FIELDS)?;
    if let Some(name) = f.get("name") {
        let p = join(path, "name");
        if string(sink, name, &p).is_some_and(|n| n.chars().count() > 100) {
            sink.error(&p, "longer than 100 characters");
        }
    }
    let action_path = join(path, "action");
    let action =
        required(sink, &f, "action", &action_path).and_then(|a| action(sink, a, &action_path));
    let to_path = join(path, "to");
    let peers: Vec<(String, PeerSpec)> = match required(sink, &f, "to", &to_path) {
        Some(to) => bounded_list(sink, to, &to_path, MAX_ITEMS)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let p = index(&to_path, i);
                peers::peer(sink, item, &p).map(|peer| (p, peer))
            })
            .collect(),
        None => Vec::new(),
    };
    let port_list = match (f.get("protocols"), f.get("ports")) {
        (Some(_), Some(_)) => {
            sink.error(
                path,
                "protocols and ports cannot both be set (ports is the older spelling of protocols)",
            );
            None
        }
        (Some(p), None) => ports::protocols(sink, p, &join(path, "protocols")),
        (None, Some(p)) => ports::ports(sink, p, &join(path, "ports")),
        (None, None) => Some(Vec::new()),
    };
    if action == Some(Action::Deny) {
        for (p, peer) in &peers {
            if matches!(peer, PeerSpec::Domains(_)) {
                sink.error(
                    &join(p, "domainNames"),
                    "domainNames is only allowed in Accept rules",
                );
            }
        }
    }
    if sink.errors() > errors_before {
        return None;
    }
    let (action, port_list) = (action?, port_list?);
    let to_ports = if port_list.is_empty() {
        Vec::new()
    } else {
        vec![PortRule {
            ports: port_list,
            dns: None,
        }]
    };
    let everywhere = covers_everything(&peers);
    let deny_all = action == Action::Deny && to_ports.is_empty() && everywhere != Coverage::None;
    if deny_all && everywhere == Coverage::OneFamily {
        sink.warn(
            path,
            "denies every destination of one IP family only; dnsfence treats it as denying all egress, of both families",
        );
    }
    let entries = if everywhere == Coverage::Both || deny_all {
        vec![EgressRule {
            path: path.to_owned(),
            peer: Peer::Any,
            to_ports,
        }]
    } else {
        peers
            .into_iter()
            .map(|(p, peer)| entry(sink, p, peer, action, &to_ports))
            .collect()
    };
    Some(ParsedRule {
        path: path.to_owned(),
        action,
        entries,
        deny_all,
    })
}

fn action(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Action> {
    match string(sink, v, path)? {
        "Accept" => Some(Action::Accept),
        "Allow" => {
            sink.warn(
                path,
                "\"Allow\" is AdminNetworkPolicy's spelling; ClusterNetworkPolicy uses \"Accept\"",
            );
            Some(Action::Accept)
        }
        "Deny" => Some(Action::Deny),
        "Pass" => {
            sink.error(path, "Pass is not supported by dnsfence: it hands traffic to namespaced policies and the Baseline tier, which dnsfence does not order, and ignoring it would let later rules decide");
            None
        }
        other => {
            sink.error(
                path,
                format!("unknown action {other:?} (expected Accept, Deny or Pass)"),
            );
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coverage {
    None,
    OneFamily,
    Both,
}

/// Whether the rule's `networks` hold `0.0.0.0/0`, `::/0`, or both.
fn covers_everything(peers: &[(String, PeerSpec)]) -> Coverage {
    let nets = peers.iter().filter_map(|(_, p)| match p {
        PeerSpec::Networks(n) => Some(n),
        _ => None,
    });
    let (mut v4, mut v6) = (false, false);
    for net in nets.flatten().filter(|n| n.prefix_len() == 0) {
        match net {
            IpNet::V4(_) => v4 = true,
            IpNet::V6(_) => v6 = true,
        }
    }
    match (v4, v6) {
        (true, true) => Coverage::Both,
        (false, false) => Coverage::None,
        _ => Coverage::OneFamily,
    }
}

fn entry(
    sink: &mut Sink<'_>,
    path: String,
    peer: PeerSpec,
    action: Action,
    to_ports: &[PortRule],
) -> EgressRule {
    let peer = match peer {
        PeerSpec::Endpoints(sel) => Peer::Endpoints(vec![sel]),
        PeerSpec::Domains(patterns) => Peer::Fqdns(patterns),
        PeerSpec::Networks(nets) => {
            if action == Action::Deny {
                sink.warn(
                    &join(&path, "networks"),
                    "in-cluster destinations (pods, nodes) in these networks are not denied: dnsfence's CIDR rules select destinations outside the cluster; deny them with namespaces or pods peers",
                );
            }
            Peer::Cidrs(
                nets.into_iter()
                    .map(|cidr| CidrRule {
                        cidr,
                        except: Vec::new(),
                    })
                    .collect(),
            )
        }
    };
    EgressRule {
        path,
        peer,
        to_ports: to_ports.to_vec(),
    }
}

/// The rules in first-match order, as one model rule (see the module docs).
fn compile(
    sink: &mut Sink<'_>,
    path: &str,
    subject: EndpointSelector,
    rules: Vec<ParsedRule>,
) -> Rule {
    let cut = rules.iter().position(|r| r.deny_all);
    if let Some(k) = cut {
        let deny_all = rules.get(k).map(|r| r.path.clone()).unwrap_or_default();
        for r in rules.iter().skip(k + 1) {
            sink.warn(
                &r.path,
                format!("never matches: {deny_all} denies all egress before it; ignored"),
            );
        }
    }
    let live = rules.get(..cut.unwrap_or(rules.len())).unwrap_or_default();
    for (j, deny) in live
        .iter()
        .enumerate()
        .filter(|(_, r)| r.action == Action::Deny)
    {
        let earlier = live.get(..j).unwrap_or_default();
        let shadow = earlier
            .iter()
            .filter(|r| r.action == Action::Accept)
            .flat_map(|r| &r.entries)
            .find(|a| deny.entries.iter().any(|d| rules_may_overlap(a, d)));
        if let Some(a) = shadow {
            sink.error(&deny.path, format!("may match traffic that {} accepts first; dnsfence's denies win over allows, so it cannot express this: narrow this Deny, or move it before the Accept if they never match the same traffic", a.path));
        }
    }
    // Denies after the last Accept are already covered by the deny-all's default-deny.
    let last_accept = live.iter().rposition(|r| r.action == Action::Accept);
    let mut rule = Rule {
        path: path.to_owned(),
        subject,
        egress: Vec::new(),
        egress_deny: Vec::new(),
        default_deny_egress: cut.is_some(),
    };
    for (i, r) in live.iter().enumerate() {
        match r.action {
            Action::Accept => {
                for e in &r.entries {
                    rule.egress.push(e.clone());
                    rule.egress.extend(dns_rule(e));
                }
            }
            Action::Deny if cut.is_some() && last_accept.is_none_or(|a| i > a) => {}
            Action::Deny => rule.egress_deny.extend(r.entries.iter().cloned()),
        }
    }
    rule
}

/// For an allow covering port 53 over UDP or TCP, a rule sending that DNS through the
/// proxy with every name allowed.
fn dns_rule(allow: &EgressRule) -> Option<EgressRule> {
    if matches!(allow.peer, Peer::Fqdns(_)) {
        return None;
    }
    let mut ports: Vec<PortProtocol> = allow
        .ports()
        .into_iter()
        .filter(|p| p.covers(53, Protocol::Udp) || p.covers(53, Protocol::Tcp))
        .map(|p| PortProtocol {
            port: 53,
            end_port: 53,
            protocol: p.protocol,
        })
        .collect();
    ports.sort();
    ports.dedup();
    if ports.is_empty() {
        return None;
    }
    let every_name = NamePattern::match_pattern("*").ok()?;
    Some(EgressRule {
        path: allow.path.clone(),
        peer: allow.peer.clone(),
        to_ports: vec![PortRule {
            ports,
            dns: Some(vec![every_name]),
        }],
    })
}
