//! `ClusterNetworkPolicy` precedence on dnsfence's model, and where the two would differ.
//!
//! A `ClusterNetworkPolicy` is evaluated first match wins, in order of tier, priority and
//! rule index. dnsfence's model has no order: denies win, allows add up, and a deny-all
//! becomes default-deny. The two agree as long as no Accept is followed by a Deny that
//! matches some of the same traffic (first match accepts, dnsfence denies), and no Accept
//! comes after a deny-all (first match denies, dnsfence allows). The parser checks this
//! inside one policy; [`check`] checks it between policies, for the loader. What cannot be
//! known from the policies alone (the IPs a domain name resolves to, whether a CIDR holds
//! pod addresses) is listed in `docs/policy.md`.

use std::collections::BTreeSet;

use crate::diag::{Diagnostic, Severity};
use crate::model::{EgressRule, Peer, Policy, PortProtocol, Protocol};

/// Whether traffic matched by `accept` may also be matched by `deny`, in dnsfence's view of
/// the peers (CIDR rules select destinations outside the cluster only, domain names are
/// unknown until resolved). Conservative for label selectors and ports.
pub(crate) fn rules_may_overlap(accept: &EgressRule, deny: &EgressRule) -> bool {
    peers_may_overlap(&accept.peer, &deny.peer) && ports_may_overlap(accept, deny)
}

fn peers_may_overlap(a: &Peer, b: &Peer) -> bool {
    match (a, b) {
        (Peer::Any, _) | (_, Peer::Any) => true,
        (Peer::Endpoints(x), Peer::Endpoints(y)) => {
            x.iter().any(|s| y.iter().any(|t| s.may_overlap(t)))
        }
        (Peer::Cidrs(x), Peer::Cidrs(y)) => x.iter().any(|c| {
            y.iter()
                .any(|d| c.cidr.contains(&d.cidr.network()) || d.cidr.contains(&c.cidr.network()))
        }),
        // Different kinds select different destinations in dnsfence (endpoints versus
        // addresses outside the cluster), or unknown ones (the IPs of domain names).
        _ => false,
    }
}

fn ports_may_overlap(a: &EgressRule, b: &EgressRule) -> bool {
    let (pa, pb) = (a.ports(), b.ports());
    pa.iter().any(|p| pb.iter().any(|q| port_overlap(p, q)))
}

fn port_overlap(p: &PortProtocol, q: &PortProtocol) -> bool {
    let protocols =
        p.protocol == Protocol::Any || q.protocol == Protocol::Any || p.protocol == q.protocol;
    let ports = p.port == 0 || q.port == 0 || (p.port <= q.end_port && q.port <= p.end_port);
    protocols && ports
}

/// Problems between `ClusterNetworkPolicy` objects of `policies`, each with the index of
/// the policy it is about. Errors reject that policy: it is the one of lower precedence,
/// whose rules dnsfence would enforce differently from the specification. A warning
/// marks a `ClusterNetworkPolicy` whose subject other kinds may select too (they are not
/// tiered, so their rules combine with it as allows and denies do).
pub(crate) fn check(policies: &[Policy]) -> Vec<(usize, Diagnostic)> {
    let mut out = Vec::new();
    let mut seen: BTreeSet<(usize, String)> = BTreeSet::new();
    let tiered: Vec<(usize, &Policy)> = policies
        .iter()
        .enumerate()
        .filter(|(_, p)| p.precedence.is_some())
        .collect();
    for &(li, low) in &tiered {
        for &(_, high) in tiered.iter().filter(|(_, h)| h.precedence < low.precedence) {
            for (path, message) in shadowed(high, low) {
                if seen.insert((li, path.clone())) {
                    out.push((li, diagnostic(low, Severity::Error, path, message)));
                }
            }
        }
        let subject = low.rules.first().map(|r| format!("{}.subject", r.path));
        if let (Some(other), Some(subject)) = (untiered_overlap(policies, low), subject) {
            let message = format!(
                "endpoints it selects may also be selected by {} {}: dnsfence does not order ClusterNetworkPolicy tiers against other kinds, their rules combine (allows add up, denies win)",
                other.id.kind.as_str(),
                other.id
            );
            out.push((li, diagnostic(low, Severity::Warning, subject, message)));
        }
    }
    out
}

/// The rules of `low` that `high` (of higher precedence) makes dnsfence enforce differently.
fn shadowed(high: &Policy, low: &Policy) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(hp) = high.precedence else {
        return out;
    };
    for hr in &high.rules {
        for lr in low
            .rules
            .iter()
            .filter(|lr| hr.subject.may_overlap(&lr.subject))
        {
            if hr.default_deny_egress {
                if let Some(a) = lr.egress.first() {
                    out.push((
                        a.path.clone(),
                        format!(
                            "never matches endpoints that ClusterNetworkPolicy {} also selects: its deny-all rule comes first ({hp}), but dnsfence would allow this (allows add up); use a lower priority value than {} or disjoint subjects",
                            high.id, hp.priority
                        ),
                    ));
                }
            }
            for d in &lr.egress_deny {
                if let Some(a) = hr.egress.iter().find(|a| rules_may_overlap(a, d)) {
                    out.push((
                        d.path.clone(),
                        format!(
                            "may deny traffic that {} of ClusterNetworkPolicy {} ({hp}) accepts first; dnsfence's denies win over allows, so it cannot express this: narrow this Deny or the Accept",
                            a.path, high.id
                        ),
                    ));
                }
            }
        }
    }
    out
}

/// A policy of another kind, with egress rules, that may select endpoints `cnp` selects.
fn untiered_overlap<'a>(policies: &'a [Policy], cnp: &Policy) -> Option<&'a Policy> {
    policies.iter().find(|other| {
        other.precedence.is_none()
            && other.rules.iter().any(|or| {
                let has_rules =
                    or.default_deny_egress || !or.egress.is_empty() || !or.egress_deny.is_empty();
                has_rules && cnp.rules.iter().any(|r| r.subject.may_overlap(&or.subject))
            })
    })
}

fn diagnostic(policy: &Policy, severity: Severity, path: String, message: String) -> Diagnostic {
    Diagnostic {
        severity,
        file: policy.source.file.clone(),
        doc: policy.source.doc,
        path,
        message,
    }
}
