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
//!
//! Layout: what applies to one endpoint and how it is built (`endpoint`), the per-query
//! questions and their answers (`decision`); the set, its selector ids and
//! [`PolicySet::resolve`] here.

mod decision;
mod endpoint;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use crate::labels::Endpoint;
use crate::matcher::NameMatcher;
use crate::model::{Peer, Policy};
use crate::name::FoldedName;
use crate::pattern::NamePattern;

pub use decision::{DnsDecision, DnsReason};
pub use endpoint::{AppliedRule, DnsRule, EndpointPolicy, FqdnAllow, FqdnDeny};

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

#[cfg(test)]
mod tests;
