//! What applies to one endpoint ([`EndpointPolicy`]): its allow and deny rules with the
//! policies they come from, its DNS rules and `toFQDNs` selectors, and the matchers the
//! per-query questions use; built rule by rule by [`super::PolicySet::resolve`].
//!
//! The questions themselves are in `decision`.

use crate::matcher::NameMatcher;
use crate::model::{Destination, EgressRule, Peer, PolicyId, PortProtocol, Protocol};
use crate::pattern::NamePattern;

use super::{PolicySet, SelectorId};

/// An egress rule with the policy it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedRule {
    /// The policy.
    pub policy: PolicyId,
    /// The rule (its `path` locates it in the policy).
    pub rule: EgressRule,
}

/// A `toPorts[].rules.dns` block: DNS to `peer` on `ports` is proxied and filtered by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRule {
    /// The policy.
    pub policy: PolicyId,
    /// Field path of the `toPorts[]` entry.
    pub path: String,
    /// Which DNS servers it covers.
    pub server: Peer,
    /// Which ports and protocols.
    pub ports: Vec<PortProtocol>,
    /// The names it allows.
    pub patterns: Vec<NamePattern>,
}

impl DnsRule {
    /// Whether DNS to `server` (any server when `None`) on `port`/`protocol` is covered.
    pub fn covers(&self, server: Option<&Destination<'_>>, port: u16, protocol: Protocol) -> bool {
        server.is_none_or(|s| self.server.selects(s))
            && self.ports.iter().any(|p| p.covers(port, protocol))
    }
}

/// A `toFQDNs` selector as it applies to one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FqdnAllow {
    /// The policy.
    pub policy: PolicyId,
    /// Field path of the egress rule.
    pub path: String,
    /// The selector's id in the [`PolicySet`].
    pub selector: SelectorId,
    /// The selector.
    pub pattern: NamePattern,
    /// Ports allowed to the IPs learned for it.
    pub ports: Vec<PortProtocol>,
}

/// A `toFQDNs` selector of an `egressDeny` rule as it applies to one endpoint: the names it
/// matches are refused by the proxy, whatever the DNS server and port, and the IPs learned
/// for them are denied on [`FqdnDeny::ports`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FqdnDeny {
    /// The policy.
    pub policy: PolicyId,
    /// Field path of the egressDeny rule.
    pub path: String,
    /// The selector's id in the [`PolicySet`].
    pub selector: SelectorId,
    /// The selector.
    pub pattern: NamePattern,
    /// Ports denied to the IPs learned for it (the rule's `toPorts`; they do not restrict
    /// the name deny).
    pub ports: Vec<PortProtocol>,
    /// The policy is in audit mode: the rule is in [`EndpointPolicy::audit_denies`] and only
    /// records would-be denials.
    pub audit: bool,
}

/// Where an [`FqdnDeny`] and its rule are, in an [`EndpointPolicy`].
#[derive(Debug, Clone, Copy)]
pub(super) struct DenyRef {
    /// Index in `fqdn_denies`.
    pub(super) deny: u32,
    /// Index in `denies`, or in `audit_denies` when the deny is `audit`.
    pub(super) rule: u32,
}

/// Everything that applies to one endpoint.
///
/// The endpoint's mode is `(enforced, audit)`:
///
/// | `enforced` | `audit` | mode |
/// |---|---|---|
/// | `false` | `false` | not enforced: no selecting policy makes egress default-deny |
/// | `true` | `false` | enforced: some policy not in audit mode makes it default-deny |
/// | `true` | `true` | audit: only audit-mode policies make it default-deny |
///
/// In audit mode what is not allowed is let through and recorded as `audit`: the datapath
/// logs would-be drops and accepts the packets, the proxy forwards the queries it would
/// refuse ([`DnsDecision::audit`](super::DnsDecision::audit)).
///
/// In every mode the allows of audit-mode policies count like any other allow, and
/// [`EndpointPolicy::denies`] (`egressDeny` of policies not in audit mode) deny.
/// [`EndpointPolicy::audit_denies`] never deny: they are recorded as would-be denials.
#[derive(Debug, Clone, Default)]
pub struct EndpointPolicy {
    /// Whether egress is default-deny: some selecting policy, in audit mode or not, has
    /// egress or egressDeny rules (and does not set `enableDefaultDeny.egress: false`).
    pub enforced: bool,
    /// Whether the endpoint is in audit mode: `enforced`, and every selecting policy that
    /// puts it in default-deny is in audit mode. Always `false` when not `enforced`.
    pub audit: bool,
    /// Allow rules (all peer kinds, `toFQDNs` included), of audit-mode policies too.
    pub allows: Vec<AppliedRule>,
    /// `egressDeny` rules of policies not in audit mode; they win over allows, whatever
    /// the endpoint's mode.
    pub denies: Vec<AppliedRule>,
    /// `egressDeny` rules of audit-mode policies: traffic they cover and that
    /// [`EndpointPolicy::denies`] does not deny is let through as before, and recorded as
    /// a would-be denial (`audit`).
    pub audit_denies: Vec<AppliedRule>,
    /// DNS rules.
    pub dns_rules: Vec<DnsRule>,
    /// `toFQDNs` selectors with their ports.
    pub fqdn_allows: Vec<FqdnAllow>,
    /// `toFQDNs` selectors of `egressDeny` rules, of [`EndpointPolicy::denies`] and
    /// [`EndpointPolicy::audit_denies`] (see [`FqdnDeny::audit`]).
    pub fqdn_denies: Vec<FqdnDeny>,
    pub(super) dns_matcher: NameMatcher<(u32, u32)>,
    pub(super) fqdn_matcher: NameMatcher<u32>,
    pub(super) fqdn_deny_matcher: NameMatcher<DenyRef>,
}

impl EndpointPolicy {
    pub(super) fn add_allow(&mut self, policy: &PolicyId, allow: &EgressRule, set: &PolicySet) {
        for (i, pr) in allow.to_ports.iter().enumerate() {
            let Some(patterns) = &pr.dns else { continue };
            let rule_idx = self.dns_rules.len() as u32;
            for (j, p) in patterns.iter().enumerate() {
                self.dns_matcher.insert(p, (rule_idx, j as u32));
            }
            self.dns_rules.push(DnsRule {
                policy: policy.clone(),
                path: format!("{}.toPorts[{i}]", allow.path),
                server: allow.peer.clone(),
                ports: pr.ports.clone(),
                patterns: patterns.clone(),
            });
        }
        if let Peer::Fqdns(patterns) = &allow.peer {
            let ports = allow.ports();
            for p in patterns {
                let Some(selector) = set.selector_id(p) else {
                    continue;
                };
                self.fqdn_matcher.insert(p, self.fqdn_allows.len() as u32);
                self.fqdn_allows.push(FqdnAllow {
                    policy: policy.clone(),
                    path: allow.path.clone(),
                    selector,
                    pattern: p.clone(),
                    ports: ports.clone(),
                });
            }
        }
        self.allows.push(AppliedRule {
            policy: policy.clone(),
            rule: allow.clone(),
        });
    }

    pub(super) fn add_deny(
        &mut self,
        policy: &PolicyId,
        deny: &EgressRule,
        audit: bool,
        set: &PolicySet,
    ) {
        let denies = if audit {
            &mut self.audit_denies
        } else {
            &mut self.denies
        };
        let rule = denies.len() as u32;
        denies.push(AppliedRule {
            policy: policy.clone(),
            rule: deny.clone(),
        });
        if let Peer::Fqdns(patterns) = &deny.peer {
            let ports = deny.ports();
            for p in patterns {
                let Some(selector) = set.selector_id(p) else {
                    continue;
                };
                let at = DenyRef {
                    deny: self.fqdn_denies.len() as u32,
                    rule,
                };
                self.fqdn_deny_matcher.insert(p, at);
                self.fqdn_denies.push(FqdnDeny {
                    policy: policy.clone(),
                    path: deny.path.clone(),
                    selector,
                    pattern: p.clone(),
                    ports: ports.clone(),
                    audit,
                });
            }
        }
    }
}
