//! Dispatch from an endpoint's address to its policy: one chain (`pol_N`) per distinct
//! list of rules, shared by every endpoint with that list; the verdict maps `ep4`/`ep6`
//! from address to chain; and `dns4`/`dns6`, the `address . protocol . port` of the DNS
//! that enforced endpoints send and the redirect takes. What a chain says is `rules`'.

use std::collections::BTreeSet;

use dnsfence_policy::{EndpointPolicy, PolicySet, Protocol};

use super::rules::policy_chain;
use super::writer::Writer;
use dnsfence_policy::Inventory;

use super::Options;

/// The chains and map elements of the endpoints the table dispatches.
#[derive(Debug, Default)]
pub(super) struct Dispatch {
    /// Each distinct chain body once; `pol_N` is the Nth.
    chains: Vec<Vec<String>>,
    ep4: Vec<String>,
    ep6: Vec<String>,
    dns4: Vec<String>,
    dns6: Vec<String>,
    /// Enforced endpoint addresses.
    enforced: usize,
}

impl Dispatch {
    /// Endpoints in default-deny, and those whose only rules deny something (an
    /// `egressDeny` without default-deny: everything else stays open for them).
    pub(super) fn of(policies: &PolicySet, inventory: &Inventory, options: &Options) -> Self {
        let mut d = Self::default();
        let dispatched = inventory.endpoints.iter().filter(|e| {
            e.policy.enforced || !e.policy.denies.is_empty() || !e.policy.audit_denies.is_empty()
        });
        for ep in dispatched {
            let body = policy_chain(ep, inventory, policies, options);
            let index = match d.chains.iter().position(|c| *c == body) {
                Some(i) => i,
                None => {
                    d.chains.push(body);
                    d.chains.len() - 1
                }
            };
            for ip in &ep.ips {
                if ep.policy.enforced {
                    d.enforced += 1;
                }
                let element = format!("{ip} : jump pol_{index}");
                if ip.is_ipv4() {
                    d.ep4.push(element);
                } else {
                    d.ep6.push(element);
                }
                if options.tproxy_port.is_some() && ep.policy.enforced {
                    for (proto, ports) in dns_ports(&ep.policy) {
                        let element = format!("{ip} . {proto} . {ports}");
                        if ip.is_ipv4() {
                            d.dns4.push(element);
                        } else {
                            d.dns6.push(element);
                        }
                    }
                }
            }
        }
        d
    }

    /// Writes the policy chains, then the maps; returns the enforced addresses.
    pub(super) fn write(self, w: &mut Writer) -> usize {
        for (i, body) in self.chains.iter().enumerate() {
            let name = format!("pol_{i}");
            w.plain_chain(&name);
            for rule in body {
                w.rule(&name, format_args!("{rule}"));
            }
        }
        w.map("ep4", "ipv4_addr : verdict", "", &self.ep4);
        w.map("ep6", "ipv6_addr : verdict", "", &self.ep6);
        w.map(
            "dns4",
            "ipv4_addr . inet_proto . inet_service",
            " flags interval;",
            &self.dns4,
        );
        w.map(
            "dns6",
            "ipv6_addr . inet_proto . inet_service",
            " flags interval;",
            &self.dns6,
        );
        self.enforced
    }
}

/// The DNS ports an endpoint's DNS rules cover, as `(protocol, port or range)`.
fn dns_ports(policy: &EndpointPolicy) -> BTreeSet<(&'static str, String)> {
    let mut out = BTreeSet::new();
    for rule in &policy.dns_rules {
        for pp in &rule.ports {
            // A DNS rule without a port means the DNS port, never "every port".
            let (lo, hi) = if pp.port == 0 {
                (53, 53)
            } else {
                (pp.port, pp.end_port.max(pp.port))
            };
            let range = format!("{lo}-{hi}");
            for proto in ["udp", "tcp"] {
                let p = if proto == "udp" {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                };
                if pp.protocol.covers(p) {
                    out.insert((proto, range.clone()));
                }
            }
        }
    }
    out
}
