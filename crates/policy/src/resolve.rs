//! Which rules apply to an endpoint, and the questions the proxy and datapath ask of them.
//!
//! [`PolicySet::resolve`] is done once per endpoint and policy change (O(policies)); the
//! per-query questions on the result ([`EndpointPolicy::dns_decision`],
//! [`EndpointPolicy::for_each_fqdn_match`]) cost O(name length) whatever the number of rules.

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

/// Index of a distinct `toFQDNs` selector in a [`PolicySet`].
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
}

impl PolicySet {
    /// Builds the set and interns every distinct `toFQDNs` selector.
    pub fn new(policies: impl IntoIterator<Item = Policy>) -> Self {
        Self::succeeding(policies, &Self::default())
    }

    /// Builds the set that replaces `previous`: a selector both use keeps its id, a new
    /// one gets an id `previous` never used. Learned IPs and datapath sets keyed by
    /// [`SelectorId`] therefore stay meaningful across a policy update, and an id that
    /// disappears is never given to another selector.
    pub fn succeeding(policies: impl IntoIterator<Item = Policy>, previous: &PolicySet) -> Self {
        let mut set = Self {
            next_id: previous.next_id,
            ..Self::default()
        };
        for p in policies {
            for rule in &p.rules {
                for allow in &rule.egress {
                    if let Peer::Fqdns(patterns) = &allow.peer {
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

    /// The policies, in load order.
    pub fn policies(&self) -> &[Arc<Policy>] {
        &self.policies
    }

    /// Every distinct `toFQDNs` selector with its id, in id order.
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

    /// Calls `visit` for each `toFQDNs` selector of any policy that `name` satisfies.
    /// O(name length).
    pub fn for_each_selector_match<B>(
        &self,
        name: &FoldedName,
        mut visit: impl FnMut(SelectorId) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        self.selector_matcher.for_each_match(name, |id| visit(*id))
    }

    /// The rules that apply to `ep`, compiled for per-query use.
    pub fn resolve(&self, ep: &Endpoint) -> EndpointPolicy {
        let mut out = EndpointPolicy::default();
        for policy in &self.policies {
            for rule in policy.rules.iter().filter(|r| r.subject.matches(ep)) {
                out.enforced |= rule.default_deny_egress;
                for allow in &rule.egress {
                    out.add_allow(&policy.id, allow, self);
                }
                for deny in &rule.egress_deny {
                    out.denies.push(AppliedRule {
                        policy: policy.id.clone(),
                        rule: deny.clone(),
                    });
                }
            }
        }
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

/// Everything that applies to one endpoint.
#[derive(Debug, Clone, Default)]
pub struct EndpointPolicy {
    /// Whether egress is default-deny (some selecting policy has egress rules).
    pub enforced: bool,
    /// Allow rules (all peer kinds, `toFQDNs` included).
    pub allows: Vec<AppliedRule>,
    /// `egressDeny` rules; they win over allows.
    pub denies: Vec<AppliedRule>,
    /// DNS rules.
    pub dns_rules: Vec<DnsRule>,
    /// `toFQDNs` selectors with their ports.
    pub fqdn_allows: Vec<FqdnAllow>,
    dns_matcher: NameMatcher<(u32, u32)>,
    fqdn_matcher: NameMatcher<u32>,
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
    /// An `egressDeny` rule covers this server and port.
    Denied {
        /// The rule.
        rule: &'a AppliedRule,
    },
    /// The name is not a valid hostname, so it matches no pattern.
    InvalidName(NameError),
}

/// The answer to "may this endpoint resolve this name on this server".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsDecision<'a> {
    /// Whether the query may go upstream.
    pub allowed: bool,
    /// Whether the query passes through the proxy (so IPs in the answer are learned).
    pub proxied: bool,
    /// Why.
    pub reason: DnsReason<'a>,
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
    pub fn dns_decision_folded(
        &self,
        name: Result<&FoldedName, &NameError>,
        server: Option<&Destination<'_>>,
        port: u16,
        protocol: Protocol,
    ) -> DnsDecision<'_> {
        let decide = |allowed, proxied, reason| DnsDecision {
            allowed,
            proxied,
            reason,
        };
        let deny = self.denies.iter().find(|d| {
            // Without a server, only deny rules that cover every destination apply.
            let everywhere = match &d.rule.peer {
                Peer::Any => true,
                Peer::Entities(es) => es.contains(&Entity::All),
                _ => false,
            };
            server.map_or(everywhere, |s| d.rule.peer.selects(s))
                && d.rule.covers_port(port, protocol)
        });
        if let Some(rule) = deny {
            return decide(false, false, DnsReason::Denied { rule });
        }
        if !self.enforced {
            return decide(true, false, DnsReason::NotEnforced);
        }
        let covered = self
            .dns_rules
            .iter()
            .any(|r| r.covers(server, port, protocol));
        if !covered {
            return match self.port_allow(server, port, protocol) {
                Some(rule) => decide(true, false, DnsReason::PortAllowed { rule }),
                None => decide(false, false, DnsReason::NotCovered),
            };
        }
        let folded = match name {
            Ok(f) => f,
            Err(e) => return decide(false, true, DnsReason::InvalidName(*e)),
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
            return decide(true, true, DnsReason::Pattern { rule, pattern });
        }
        match self.port_allow(server, port, protocol) {
            Some(rule) => decide(true, true, DnsReason::PortAllowed { rule }),
            None => decide(false, true, DnsReason::NoPatternMatches),
        }
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

#[cfg(test)]
mod tests;
