//! The rules of one endpoint's policy chain: its denies (enforced, then audited), its
//! allows, and the deny action or, in audit mode, a logged accept. Each rule becomes one
//! match per (destination, port) alternative: peers are endpoint addresses, CIDRs,
//! entity sets or FQDN selector sets; ports are nft port matches. It reads the policy and
//! the inventory, and writes nothing itself (`dispatch` does).

use std::fmt::Write as _;

use dnsfence_policy::{EgressRule, Entity, Peer, PolicySet, PortProtocol, Protocol};

use super::reason::{log, DropReason};
use super::sets::fqdn_set_name;
use dnsfence_policy::{Inventory, ResolvedEndpoint};

use super::{DenyAction, Options};

/// The rules of one endpoint's chain (identical lists share a chain).
pub(super) fn policy_chain(
    ep: &ResolvedEndpoint,
    inventory: &Inventory,
    policies: &PolicySet,
    options: &Options,
) -> Vec<String> {
    let deny = options.deny_action;
    let mut rules = Vec::new();
    let deny_verdict = match deny {
        DenyAction::Reject => "reject with icmpx type admin-prohibited",
        DenyAction::Drop => "drop",
    };
    for d in &ep.policy.denies {
        for m in rule_matches(&d.rule, inventory, policies, Use::Deny) {
            if let Some(l) = log(options, DropReason::EgressDeny) {
                rules.push(format!("{m} {l}"));
            }
            if deny == DenyAction::Reject && !m.contains("udp") && !m.contains("sctp") {
                rules.push(format!("{m} meta l4proto tcp reject with tcp reset"));
            }
            rules.push(format!("{m} {deny_verdict}"));
        }
    }
    // egressDeny of policies in audit mode: recorded, not enforced.
    if let Some(l) = log(options, DropReason::AuditEgressDeny) {
        for d in &ep.policy.audit_denies {
            for m in rule_matches(&d.rule, inventory, policies, Use::Deny) {
                rules.push(format!("{m} {l}"));
            }
        }
    }
    if !ep.policy.enforced {
        // Not in default-deny: only the denies above apply.
        rules.push("accept".to_owned());
        return rules;
    }
    for a in &ep.policy.allows {
        for m in rule_matches(&a.rule, inventory, policies, Use::Allow) {
            rules.push(format!("{m} accept"));
        }
    }
    if ep.policy.audit {
        // Every policy putting the endpoint in default-deny is in audit mode: what would
        // be refused is recorded and let through.
        if let Some(l) = log(options, DropReason::AuditPolicyDenied) {
            rules.push(l);
        }
        rules.push("counter accept".to_owned());
        return rules;
    }
    if let Some(l) = log(options, DropReason::PolicyDenied) {
        rules.push(l);
    }
    if deny == DenyAction::Reject {
        rules.push("meta l4proto tcp counter reject with tcp reset".to_owned());
    }
    rules.push(format!("counter {deny_verdict}"));
    rules
}

/// The match expressions of a rule: one per (destination, port) alternative.
fn rule_matches(
    rule: &EgressRule,
    inventory: &Inventory,
    policies: &PolicySet,
    usage: Use,
) -> Vec<String> {
    let peers = peer_matches(&rule.peer, inventory, policies, usage);
    let ports = port_matches(&allowed_ports(rule));
    let mut out = Vec::new();
    for p in &peers {
        for q in &ports {
            out.push(format!("{p} {q}").trim().to_owned());
        }
    }
    out
}

/// The ports a rule opens. Ports that carry DNS rules open only UDP and TCP, the
/// protocols the proxy checks: `protocol: ANY` on a DNS port must not become an unfiltered
/// SCTP channel to the DNS server.
fn allowed_ports(rule: &EgressRule) -> Vec<PortProtocol> {
    if !rule.to_ports.iter().any(|pr| pr.dns.is_some()) {
        return rule.ports();
    }
    let mut out = Vec::new();
    for pr in &rule.to_ports {
        for pp in &pr.ports {
            if pr.dns.is_some() {
                for proto in [Protocol::Udp, Protocol::Tcp] {
                    if pp.protocol.covers(proto) {
                        out.push(PortProtocol {
                            protocol: proto,
                            ..*pp
                        });
                    }
                }
            } else {
                out.push(*pp);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn set_literal(ips: &[String]) -> String {
    format!("{{ {} }}", ips.join(", "))
}

/// Whether a rule allows or denies: a learned IP allows less than it denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    Allow,
    Deny,
}

/// Destination matches; empty when the peer selects nothing.
fn peer_matches(
    peer: &Peer,
    inventory: &Inventory,
    policies: &PolicySet,
    usage: Use,
) -> Vec<String> {
    let both = |v4: String, v6: String| vec![v4, v6];
    match peer {
        Peer::Any => vec![String::new()],
        Peer::Endpoints(selectors) => {
            let mut v4 = Vec::new();
            let mut v6 = Vec::new();
            for ep in &inventory.endpoints {
                if selectors.iter().any(|s| s.matches(&ep.endpoint)) {
                    for ip in &ep.ips {
                        if ip.is_ipv4() {
                            v4.push(ip.to_string());
                        } else {
                            v6.push(ip.to_string());
                        }
                    }
                }
            }
            let mut out = Vec::new();
            if !v4.is_empty() {
                out.push(format!("ip daddr {}", set_literal(&v4)));
            }
            if !v6.is_empty() {
                out.push(format!("ip6 daddr {}", set_literal(&v6)));
            }
            out
        }
        Peer::Cidrs(cidrs) => cidrs
            .iter()
            .map(|c| {
                let fam = if c.cidr.addr().is_ipv4() { "ip" } else { "ip6" };
                let cluster = if fam == "ip" { "cluster4" } else { "cluster6" };
                let mut m = format!("{fam} daddr {} {fam} daddr != @{cluster}", c.cidr.trunc());
                if !c.except.is_empty() {
                    let ex: Vec<String> = c.except.iter().map(|e| e.trunc().to_string()).collect();
                    let _ = write!(m, " {fam} daddr != {}", set_literal(&ex));
                }
                m
            })
            .collect(),
        Peer::Entities(entities) => {
            let mut out = Vec::new();
            for e in entities {
                match e {
                    Entity::All => out.push(String::new()),
                    Entity::World => out.extend(both(
                        "ip daddr != @cluster4".into(),
                        "ip6 daddr != @cluster6".into(),
                    )),
                    Entity::WorldIpv4 => out.push("ip daddr != @cluster4".into()),
                    Entity::WorldIpv6 => out.push("ip6 daddr != @cluster6".into()),
                    Entity::Cluster => out.extend(both(
                        "ip daddr @cluster4".into(),
                        "ip6 daddr @cluster6".into(),
                    )),
                    Entity::Host => {
                        out.extend(both("ip daddr @host4".into(), "ip6 daddr @host6".into()))
                    }
                }
            }
            out.sort();
            out.dedup();
            out
        }
        Peer::Fqdns(patterns) => {
            let mut out = Vec::new();
            for p in patterns {
                if policies.selector_id(p).is_none() {
                    continue;
                }
                let (v4, v6) = (fqdn_set_name(p, false), fqdn_set_name(p, true));
                if usage == Use::Deny {
                    // Denied as broadly as learned.
                    out.push(format!("ip daddr @{v4}"));
                    out.push(format!("ip6 daddr @{v6}"));
                    out.push(format!("ct original ip daddr @{v4}"));
                    out.push(format!("ct original ip6 daddr @{v6}"));
                    continue;
                }
                // A learned IP never opens the node (a local address, whatever the
                // inventory says), a broadcast or multicast address, nor a range of
                // `dns.never_learn`, even if a set holds it.
                out.push(format!(
                    "ip daddr @{v4} ip daddr != @never4 fib daddr type unicast"
                ));
                out.push(format!(
                    "ip6 daddr @{v6} ip6 daddr != @never6 fib daddr type unicast"
                ));
                // A learned service IP that the node rewrote (kube-proxy's DNAT to a
                // backend) is judged by the address the pod connected to.
                out.push(format!(
                    "ct status dnat ct original ip daddr @{v4} ct original ip daddr != @never4"
                ));
                out.push(format!(
                    "ct status dnat ct original ip6 daddr @{v6} ct original ip6 daddr != @never6"
                ));
            }
            out
        }
    }
}

/// Port matches; `[""]` for every port and protocol.
fn port_matches(ports: &[PortProtocol]) -> Vec<String> {
    if ports.contains(&PortProtocol::ANY) {
        return vec![String::new()];
    }
    ports
        .iter()
        .map(|p| {
            let range = if p.end_port > p.port {
                format!("{}-{}", p.port, p.end_port)
            } else {
                p.port.to_string()
            };
            match (p.protocol, p.port) {
                (Protocol::Any, 0) => String::new(),
                (Protocol::Any, _) => format!("meta l4proto {{ tcp, udp, sctp }} th dport {range}"),
                (proto, 0) => format!("meta l4proto {}", proto_name(proto)),
                (proto, _) => format!("{} dport {range}", proto_name(proto)),
            }
        })
        .collect()
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
        Protocol::Any => "",
    }
}
