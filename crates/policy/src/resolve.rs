//! Which rules apply to an endpoint, and the questions the proxy and datapath ask of them.
//!
//! [`PolicySet::resolve`] is done once per endpoint and policy change (O(policies)); the
//! per-query questions on the result ([`EndpointPolicy::dns_decision`],
//! [`EndpointPolicy::for_each_fqdn_match`]) cost O(name length) whatever the number of rules.
//!
//! Audit mode (a policy's [`Policy::audit`], or every policy with
//! [`PolicySet::with_global_audit`]) is resolved here too: [`EndpointPolicy::audit`] says
//! whether the endpoint's default-deny is only audited, [`EndpointPolicy::audit_denies`]
//! holds the `egressDeny` rules that would deny, and [`DnsDecision::audit`] marks a DNS
//! denial that is recorded but not enforced.
//!
//! `toFQDNs` in `egressDeny` (a dnsfence extension) denies names: their selectors are
//! interned like the allow ones (so IPs are learned and the datapath keeps a set for
//! them), and [`EndpointPolicy::dns_decision`] refuses a name they match before any allow
//! is looked at ([`EndpointPolicy::fqdn_deny`]).

use std::cmp::Reverse;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use crate::labels::Endpoint;
use crate::matcher::NameMatcher;
use crate::model::{
    Destination, EgressRule, Entity, Peer, Policy, PolicyId, PortProtocol, Protocol,
};
use crate::name::{FoldedName, NameError};
use crate::pattern::NamePattern;

/// Index of a distinct `toFQDNs` selector (of `egress` or `egressDeny`) in a [`PolicySet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SelectorId(pub u32);

/// A validated set of policies.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Vec<Arc<Policy>>,
    /// Every selector with its id, in id order.
    selectors: Vec<(SelectorId, NamePattern)>,
    selector_ids: HashMap<NamePattern, SelectorId>,
    selector_matcher: NameMatcher<SelectorId>,
    /// The id the next new selector gets (ids are never reused by successors).
    next_id: u32,
    /// Every policy is in audit mode, whatever its annotation.
    global_audit: bool,
}

impl PolicySet {
    /// Builds the set and interns every distinct `toFQDNs` selector, of `egress` and
    /// `egressDeny` rules alike (a pattern used by both has one id).
    pub fn new(policies: impl IntoIterator<Item = Policy>) -> Self {
        Self::succeeding(policies, &Self::default())
    }

    /// Builds the set that replaces `previous`: a selector both use keeps its id, a new
    /// one gets an id `previous` never used. Learned IPs and datapath sets keyed by
    /// [`SelectorId`] therefore stay meaningful across a policy update, and an id that
    /// disappears is never given to another selector. The successor also keeps
    /// `previous`'s [global audit switch](PolicySet::with_global_audit), so that a policy
    /// reload never turns enforcement on by itself.
    pub fn succeeding(policies: impl IntoIterator<Item = Policy>, previous: &PolicySet) -> Self {
        let mut set = Self {
            next_id: previous.next_id,
            global_audit: previous.global_audit,
            ..Self::default()
        };
        for p in policies {
            for rule in &p.rules {
                for egress in rule.egress.iter().chain(&rule.egress_deny) {
                    if let Peer::Fqdns(patterns) = &egress.peer {
                        for pattern in patterns {
                            set.intern(pattern, previous);
                        }
                    }
                }
            }
            set.policies.push(Arc::new(p));
        }
        set.selectors.sort_by_key(|(id, _)| *id);
        set
    }

    fn intern(&mut self, pattern: &NamePattern, previous: &PolicySet) -> SelectorId {
        if let Some(id) = self.selector_ids.get(pattern) {
            return *id;
        }
        let id = match previous.selector_id(pattern) {
            Some(id) => id,
            None => {
                let id = SelectorId(self.next_id);
                self.next_id += 1;
                id
            }
        };
        self.selectors.push((id, pattern.clone()));
        self.selector_ids.insert(pattern.clone(), id);
        self.selector_matcher.insert(pattern, id);
        id
    }

    /// The same set with the global audit switch on or off (the daemon's `audit: true`).
    /// When on, [`PolicySet::resolve`] treats every policy as in audit mode, whatever its
    /// `dnsfence.io/audit` annotation; when off (the default), each policy's
    /// [`Policy::audit`] decides. A new set starts off; a successor keeps the switch (see
    /// [`PolicySet::succeeding`]).
    #[must_use]
    pub fn with_global_audit(mut self, on: bool) -> Self {
        self.global_audit = on;
        self
    }

    /// Whether the global audit switch is on (see [`PolicySet::with_global_audit`]).
    pub fn global_audit(&self) -> bool {
        self.global_audit
    }

    /// Whether `policy` is in audit mode in this set: its annotation, or the global switch.
    pub fn is_audit(&self, policy: &Policy) -> bool {
        self.global_audit || policy.audit
    }

    /// The policies, in load order.
    pub fn policies(&self) -> &[Arc<Policy>] {
        &self.policies
    }

    /// Every distinct `toFQDNs` selector with its id, in id order: those of `egress` and of
    /// `egressDeny` rules (the datapath keeps one set of learned IPs per selector).
    pub fn fqdn_selectors(&self) -> &[(SelectorId, NamePattern)] {
        &self.selectors
    }

    /// The selector with id `id`, if this set uses it.
    pub fn selector(&self, id: SelectorId) -> Option<&NamePattern> {
        self.selectors
            .binary_search_by_key(&id, |(i, _)| *i)
            .ok()
            .map(|i| &self.selectors[i].1)
    }

    /// The id of a selector, if some policy uses it.
    pub fn selector_id(&self, pattern: &NamePattern) -> Option<SelectorId> {
        self.selector_ids.get(pattern).copied()
    }

    /// Calls `visit` for each `toFQDNs` selector (allow or deny) of any policy that `name`
    /// satisfies. O(name length).
    pub fn for_each_selector_match<B>(
        &self,
        name: &FoldedName,
        mut visit: impl FnMut(SelectorId) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        self.selector_matcher.for_each_match(name, |id| visit(*id))
    }

    /// The rules that apply to `ep`, compiled for per-query use, with the endpoint's mode
    /// ([`EndpointPolicy::enforced`], [`EndpointPolicy::audit`]).
    pub fn resolve(&self, ep: &Endpoint) -> EndpointPolicy {
        let mut out = EndpointPolicy::default();
        // Whether some policy not in audit mode puts the endpoint in default-deny.
        let mut enforcing = false;
        for policy in &self.policies {
            let audit = self.is_audit(policy);
            for rule in policy.rules.iter().filter(|r| r.subject.matches(ep)) {
                out.enforced |= rule.default_deny_egress;
                enforcing |= rule.default_deny_egress && !audit;
                for allow in &rule.egress {
                    out.add_allow(&policy.id, allow, self);
                }
                for deny in &rule.egress_deny {
                    out.add_deny(&policy.id, deny, audit, self);
                }
            }
        }
        out.audit = out.enforced && !enforcing;
        out
    }
}

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
struct DenyRef {
    /// Index in `fqdn_denies`.
    deny: u32,
    /// Index in `denies`, or in `audit_denies` when the deny is `audit`.
    rule: u32,
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
/// refuse ([`DnsDecision::audit`]).
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
    dns_matcher: NameMatcher<(u32, u32)>,
    fqdn_matcher: NameMatcher<u32>,
    fqdn_deny_matcher: NameMatcher<DenyRef>,
}

/// Why a DNS query is allowed or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsReason<'a> {
    /// No policy puts the endpoint in default-deny: forwarded unfiltered.
    NotEnforced,
    /// A DNS rule's pattern matches the name.
    Pattern {
        /// The rule.
        rule: &'a DnsRule,
        /// The most specific matching pattern.
        pattern: &'a NamePattern,
    },
    /// An L3/L4 rule without DNS rules allows this server and port, so every name is
    /// allowed (proxied when some DNS rule also covers it, as Cilium's L7 wildcard).
    PortAllowed {
        /// The rule.
        rule: &'a AppliedRule,
    },
    /// DNS rules cover this server and port, and none of their patterns matches.
    NoPatternMatches,
    /// No rule allows DNS to this server and port at all.
    NotCovered,
    /// An `egressDeny` rule covers this server and port, or (when the rule's peer is
    /// [`Peer::Fqdns`]) one of its `toFQDNs` selectors matches the name, whatever the server
    /// and port: [`EndpointPolicy::fqdn_deny`] tells which.
    Denied {
        /// The rule.
        rule: &'a AppliedRule,
    },
    /// The name is not a valid hostname, so it matches no pattern.
    InvalidName(NameError),
}

/// The answer to "may this endpoint resolve this name on this server".
///
/// Three outcomes: allowed (`allowed`), denied (neither), and an audited denial
/// (`audit`): the query would be denied if every policy were enforced, but the denial
/// comes from audit mode, so the query is forwarded and recorded with verdict `audit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsDecision<'a> {
    /// Whether every policy, audit-mode ones included, lets the query go upstream.
    pub allowed: bool,
    /// Whether the query passes through the proxy (so IPs in the answer are learned,
    /// when it is forwarded: see [`DnsDecision::forwarded`]).
    pub proxied: bool,
    /// Why: for an audited denial, why it would be denied.
    pub reason: DnsReason<'a>,
    /// The denial is not enforced (always `false` when `allowed`): the endpoint is in audit
    /// mode ([`EndpointPolicy::audit`]) and no enforced `egressDeny` applies, or the
    /// query is allowed except for an `egressDeny` of an audit-mode policy, covering the
    /// server or denying the name (the reason is then [`DnsReason::Denied`] with a rule of
    /// [`EndpointPolicy::audit_denies`]).
    pub audit: bool,
}

impl DnsDecision<'_> {
    /// Whether the query goes upstream: allowed, or denied in audit mode only.
    pub fn forwarded(&self) -> bool {
        self.allowed || self.audit
    }
}

impl EndpointPolicy {
    fn add_allow(&mut self, policy: &PolicyId, allow: &EgressRule, set: &PolicySet) {
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

    fn add_deny(&mut self, policy: &PolicyId, deny: &EgressRule, audit: bool, set: &PolicySet) {
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

    /// Whether a rule without DNS rules allows `server` (any server when `None`) on the port.
    fn port_allow(
        &self,
        server: Option<&Destination<'_>>,
        port: u16,
        protocol: Protocol,
    ) -> Option<&AppliedRule> {
        self.allows.iter().find(|a| {
            a.rule.to_ports.iter().all(|pr| pr.dns.is_none())
                && server.map_or(a.rule.peer == Peer::Any, |s| a.rule.peer.selects(s))
                && a.rule.covers_port(port, protocol)
        })
    }

    /// May the endpoint resolve `name` by sending it to `server` (a server any DNS rule
    /// covers, when `None`) on `port` over `protocol`? O(name length) plus the matches.
    pub fn dns_decision(
        &self,
        name: &[u8],
        server: Option<&Destination<'_>>,
        port: u16,
        protocol: Protocol,
    ) -> DnsDecision<'_> {
        self.dns_decision_folded(FoldedName::new(name).as_ref(), server, port, protocol)
    }

    /// [`EndpointPolicy::dns_decision`] for a name already folded (or refused by folding),
    /// as the proxy has it from the wire.
    ///
    /// In order: an enforced `egressDeny` covering the server and port denies; then an
    /// enforced `egressDeny` `toFQDNs` selector matching the name denies (whatever the
    /// server, the port and the allow rules: deny wins); otherwise the allow rules decide
    /// as if every policy were enforced; then an allowed query that an audit-mode
    /// `egressDeny` covers or whose name it denies, or any denial of an endpoint in audit
    /// mode, becomes an audited denial ([`DnsDecision::audit`]). A name denial keeps the
    /// `proxied` of the allow rules: only a proxied query can be refused by name (the
    /// learned IPs are denied by the datapath either way).
    pub fn dns_decision_folded(
        &self,
        name: Result<&FoldedName, &NameError>,
        server: Option<&Destination<'_>>,
        port: u16,
        protocol: Protocol,
    ) -> DnsDecision<'_> {
        if let Some(rule) = covering_deny(&self.denies, server, port, protocol) {
            return decision(false, false, DnsReason::Denied { rule });
        }
        let mut d = self.allow_decision(name, server, port, protocol);
        if let Some((rule, _)) = name.ok().and_then(|n| self.fqdn_deny(n, false)) {
            return decision(false, d.proxied, DnsReason::Denied { rule });
        }
        if d.allowed || self.audit {
            let rule = covering_deny(&self.audit_denies, server, port, protocol).or_else(|| {
                name.ok()
                    .and_then(|n| self.fqdn_deny(n, true))
                    .map(|(rule, _)| rule)
            });
            if let Some(rule) = rule {
                return DnsDecision {
                    allowed: false,
                    proxied: d.proxied,
                    reason: DnsReason::Denied { rule },
                    audit: true,
                };
            }
        }
        // A denial of an enforced endpoint stays enforced.
        d.audit = !d.allowed && self.audit;
        d
    }

    /// The decision of the allow rules alone (no `egressDeny`), every policy enforced.
    fn allow_decision(
        &self,
        name: Result<&FoldedName, &NameError>,
        server: Option<&Destination<'_>>,
        port: u16,
        protocol: Protocol,
    ) -> DnsDecision<'_> {
        if !self.enforced {
            return decision(true, false, DnsReason::NotEnforced);
        }
        let covered = self
            .dns_rules
            .iter()
            .any(|r| r.covers(server, port, protocol));
        if !covered {
            return match self.port_allow(server, port, protocol) {
                Some(rule) => decision(true, false, DnsReason::PortAllowed { rule }),
                None => decision(false, false, DnsReason::NotCovered),
            };
        }
        let folded = match name {
            Ok(f) => f,
            Err(e) => return decision(false, true, DnsReason::InvalidName(*e)),
        };
        let mut best: Option<(&DnsRule, &NamePattern)> = None;
        let _ = self.dns_matcher.for_each_match(folded, |&(r, p)| {
            let rule = self.dns_rules.get(r as usize);
            let pattern = rule.and_then(|rule| rule.patterns.get(p as usize));
            if let (Some(rule), Some(pattern)) = (rule, pattern) {
                if rule.covers(server, port, protocol)
                    && best.is_none_or(|(_, b)| pattern.specificity() > b.specificity())
                {
                    best = Some((rule, pattern));
                }
            }
            ControlFlow::<()>::Continue(())
        });
        if let Some((rule, pattern)) = best {
            return decision(true, true, DnsReason::Pattern { rule, pattern });
        }
        match self.port_allow(server, port, protocol) {
            Some(rule) => decision(true, true, DnsReason::PortAllowed { rule }),
            None => decision(false, true, DnsReason::NoPatternMatches),
        }
    }

    /// The `egressDeny` `toFQDNs` selector that denies `name`, with its rule: among those of
    /// policies not in audit mode (`audit` false, rules of [`EndpointPolicy::denies`]) or
    /// of audit-mode ones (`audit` true, [`EndpointPolicy::audit_denies`]), the most
    /// specific pattern, then the first in load order. The rule's `toPorts` do not matter:
    /// a name is denied on every DNS server and port. O(name length) plus the matches.
    pub fn fqdn_deny(&self, name: &FoldedName, audit: bool) -> Option<(&AppliedRule, &FqdnDeny)> {
        // Rank: the most specific pattern, then the lowest index (load order).
        let rank = |at: &DenyRef, d: &FqdnDeny| (d.pattern.specificity(), Reverse(at.deny));
        let mut best: Option<(DenyRef, &FqdnDeny)> = None;
        let _ = self.fqdn_deny_matcher.for_each_match(name, |at| {
            if let Some(deny) = self.fqdn_denies.get(at.deny as usize) {
                if deny.audit == audit && best.is_none_or(|(b, bd)| rank(at, deny) > rank(&b, bd)) {
                    best = Some((*at, deny));
                }
            }
            ControlFlow::<()>::Continue(())
        });
        let (at, deny) = best?;
        let rules = if audit {
            &self.audit_denies
        } else {
            &self.denies
        };
        rules.get(at.rule as usize).map(|r| (r, deny))
    }

    /// Calls `visit` for each `egressDeny` `toFQDNs` selector of this endpoint that `name`
    /// satisfies, of audit-mode policies too ([`FqdnDeny::audit`]).
    pub fn for_each_fqdn_deny_match<'a, B>(
        &'a self,
        name: &FoldedName,
        mut visit: impl FnMut(&'a FqdnDeny) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        self.fqdn_deny_matcher.for_each_match(name, |at| {
            match self.fqdn_denies.get(at.deny as usize) {
                Some(d) => visit(d),
                None => ControlFlow::Continue(()),
            }
        })
    }

    /// Calls `visit` for each `toFQDNs` selector of this endpoint that `name` satisfies.
    pub fn for_each_fqdn_match<'a, B>(
        &'a self,
        name: &FoldedName,
        mut visit: impl FnMut(&'a FqdnAllow) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        self.fqdn_matcher
            .for_each_match(name, |&i| match self.fqdn_allows.get(i as usize) {
                Some(a) => visit(a),
                None => ControlFlow::Continue(()),
            })
    }
}

/// A decision not (yet) audited.
fn decision(allowed: bool, proxied: bool, reason: DnsReason<'_>) -> DnsDecision<'_> {
    DnsDecision {
        allowed,
        proxied,
        reason,
        audit: false,
    }
}

/// The first of `denies` covering DNS to `server` (any server when `None`) on the port.
fn covering_deny<'a>(
    denies: &'a [AppliedRule],
    server: Option<&Destination<'_>>,
    port: u16,
    protocol: Protocol,
) -> Option<&'a AppliedRule> {
    denies.iter().find(|d| {
        // Without a server, only deny rules that cover every destination apply.
        let everywhere = match &d.rule.peer {
            Peer::Any => true,
            Peer::Entities(es) => es.contains(&Entity::All),
            _ => false,
        };
        server.map_or(everywhere, |s| d.rule.peer.selects(s)) && d.rule.covers_port(port, protocol)
    })
}

#[cfg(test)]
mod tests;
