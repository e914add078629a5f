//! The per-query questions on an [`EndpointPolicy`]: may it resolve this name on this
//! server and port ([`EndpointPolicy::dns_decision`], with its [`DnsReason`]), which
//! `toFQDNs` selectors (allow or deny) does a name satisfy. O(name length) plus the
//! matches, whatever the number of rules.

use std::cmp::Reverse;
use std::ops::ControlFlow;

use crate::model::{Destination, Entity, Peer, Protocol};
use crate::name::{FoldedName, NameError};
use crate::pattern::NamePattern;

use super::endpoint::DenyRef;
use super::{AppliedRule, DnsRule, EndpointPolicy, FqdnAllow, FqdnDeny};

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
