//! The proxy's view of the world: endpoints by IP with their resolved policies, and the
//! verdict for one query. Built off the hot path, then shared read-only (behind an `Arc`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use dnsfence_policy::{
    Destination, DnsReason, Endpoint, EndpointPolicy, FoldedName, Labels, PolicySet, Protocol,
};

use crate::inside::{InsideConfig, NotLearned};
use crate::query::Query;
use crate::wire::Rcode;

/// One endpoint of the inventory, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Its name (a pod name).
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its labels.
    pub labels: Labels,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
}

/// An endpoint with the rules that apply to it.
#[derive(Debug)]
pub struct EndpointEntry {
    /// Name.
    pub name: String,
    /// Namespace and labels.
    pub endpoint: Endpoint,
    /// The resolved policy.
    pub policy: EndpointPolicy,
}

/// What to do with queries from sources that are not in the inventory
/// (`dns.unknown_clients`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownClients {
    /// Answer REFUSED (fail closed; the default).
    #[default]
    Refuse,
    /// Forward unfiltered.
    Forward,
}

/// The rcode of denied queries (`dns.deny_rcode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DenyRcode {
    /// REFUSED (the default).
    #[default]
    Refused,
    /// NXDOMAIN (helps musl resolvers walk their search list).
    Nxdomain,
}

impl DenyRcode {
    /// The rcode itself.
    pub fn rcode(self) -> Rcode {
        match self {
            DenyRcode::Refused => Rcode::Refused,
            DenyRcode::Nxdomain => Rcode::NxDomain,
        }
    }
}

/// Behaviour switches of the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerdictConfig {
    /// The rcode for denied queries: REFUSED (default) or NXDOMAIN.
    pub deny_rcode: Rcode,
    /// Unknown sources.
    pub unknown_clients: UnknownClients,
}

impl Default for VerdictConfig {
    fn default() -> Self {
        Self {
            deny_rcode: Rcode::Refused,
            unknown_clients: UnknownClients::Refuse,
        }
    }
}

/// Everything the proxy needs to judge queries, immutable once built.
#[derive(Debug, Default)]
pub struct Snapshot {
    policies: Arc<PolicySet>,
    /// foldhash: looked up for every query; only the inventory chooses the keys.
    by_ip: foldhash::HashMap<IpAddr, Arc<EndpointEntry>>,
    host_ips: Vec<IpAddr>,
    config: VerdictConfig,
    /// Search domains (folded, without dots at either end), longest first.
    search_suffixes: Vec<String>,
    /// Which answer addresses may be learned.
    inside: Arc<InsideConfig>,
}

/// Why a query got its verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason<'a> {
    /// The source is not a known endpoint.
    UnknownClient,
    /// The policy engine's reason.
    Policy(DnsReason<'a>),
    /// The name is an allowed name with one of the search domains appended (a stub
    /// resolver trying its search list): forwarded so the upstream answers it (usually
    /// NXDOMAIN, and the resolver moves on), but its answer teaches nothing.
    SearchList {
        /// The search domain.
        suffix: &'a str,
    },
}

/// The decision for one query.
#[derive(Debug, Clone, Copy)]
pub struct Verdict<'a> {
    /// Forward upstream (`None`), or answer with this rcode.
    pub deny: Option<Rcode>,
    /// Whether a DNS rule covers this server and port, so that the answer may teach IPs.
    /// Queries forwarded unfiltered (no policy, unknown clients) teach nothing: their
    /// server was never vetted by a policy.
    pub learn: bool,
    /// The client endpoint, when known.
    pub endpoint: Option<&'a EndpointEntry>,
    /// Why.
    pub reason: Reason<'a>,
    /// The query is forwarded although a policy denies it, because that policy is in
    /// audit mode: record it as `audit`.
    pub audit: bool,
}

impl Verdict<'_> {
    /// Whether the query goes upstream.
    pub fn allowed(&self) -> bool {
        self.deny.is_none()
    }
}

impl Snapshot {
    /// Resolves every endpoint's policy. `host_ips` are the node's own addresses.
    pub fn new(
        policies: Arc<PolicySet>,
        endpoints: &[EndpointSpec],
        host_ips: Vec<IpAddr>,
        config: VerdictConfig,
    ) -> Self {
        let mut by_ip = foldhash::HashMap::default();
        for spec in endpoints {
            let endpoint = Endpoint::new(spec.namespace.clone(), spec.labels.clone());
            let entry = Arc::new(EndpointEntry {
                name: spec.name.clone(),
                policy: policies.resolve(&endpoint),
                endpoint,
            });
            for ip in &spec.ips {
                by_ip.insert(*ip, entry.clone());
            }
        }
        Self {
            policies,
            by_ip,
            host_ips,
            config,
            search_suffixes: Vec::new(),
            inside: Arc::default(),
        }
    }

    /// Sets what answers may teach (see [`crate::inside`]); the default is
    /// [`InsideConfig::default`].
    pub fn with_inside(mut self, inside: Arc<InsideConfig>) -> Self {
        self.inside = inside;
        self
    }

    /// Why `ip`, an address of an allowed answer to `name`, must not be learned; `None`: it
    /// may be. `local(ip)` says whether the node has `ip` on one of its interfaces (the
    /// configured `host_ips` count too).
    pub fn not_learned(
        &self,
        ip: IpAddr,
        name: &FoldedName,
        local: impl FnOnce(IpAddr) -> bool,
    ) -> Option<NotLearned> {
        self.inside.judge(
            ip,
            name,
            |ip| self.host_ips.contains(&ip) || local(ip),
            |ip| self.by_ip.contains_key(&ip),
        )
    }

    /// The policy set.
    pub fn policies(&self) -> &Arc<PolicySet> {
        &self.policies
    }

    /// Every endpoint address with its endpoint.
    pub fn endpoints(&self) -> impl Iterator<Item = (IpAddr, &EndpointEntry)> + '_ {
        self.by_ip.iter().map(|(ip, e)| (*ip, &**e))
    }

    /// The endpoint owning `ip`, if any.
    pub fn endpoint(&self, ip: IpAddr) -> Option<&Arc<EndpointEntry>> {
        self.by_ip.get(&ip)
    }

    /// How policies see `ip`: an endpoint, the node, or the world.
    pub fn destination(&self, ip: IpAddr) -> Destination<'_> {
        match self.by_ip.get(&ip) {
            Some(e) => Destination::Endpoint(ip, &e.endpoint),
            None if self.host_ips.contains(&ip) => Destination::Host(ip),
            None => Destination::World(ip),
        }
    }

    /// Judges `query` from `client`, sent to `server` over `protocol`. O(name length).
    pub fn decide(
        &self,
        client: IpAddr,
        server: SocketAddr,
        protocol: Protocol,
        query: &Query,
    ) -> Verdict<'_> {
        let Some(entry) = self.by_ip.get(&client) else {
            let deny = match self.config.unknown_clients {
                UnknownClients::Refuse => Some(Rcode::Refused),
                UnknownClients::Forward => None,
            };
            return Verdict {
                deny,
                learn: false,
                endpoint: None,
                reason: Reason::UnknownClient,
                audit: false,
            };
        };
        let dest = self.destination(server.ip());
        let d = entry.policy.dns_decision_folded(
            query.name.as_ref(),
            Some(&dest),
            server.port(),
            protocol,
        );
        if !d.forwarded() && !matches!(d.reason, DnsReason::Denied { .. }) {
            if let Some(suffix) = self.search_candidate(entry, query, &dest, server, protocol) {
                return Verdict {
                    deny: None,
                    learn: false,
                    endpoint: Some(entry),
                    reason: Reason::SearchList { suffix },
                    audit: false,
                };
            }
        }
        Verdict {
            deny: (!d.forwarded()).then_some(self.config.deny_rcode),
            learn: d.forwarded() && d.proxied,
            endpoint: Some(entry),
            reason: Reason::Policy(d.reason),
            audit: d.audit,
        }
    }

    /// Sets the search domains (`default.svc.cluster.local`, ...): a query for an allowed
    /// name with one of them appended is forwarded (see [`Reason::SearchList`]).
    pub fn with_search_suffixes(mut self, suffixes: &[String]) -> Self {
        let mut s: Vec<String> = suffixes
            .iter()
            .map(|x| x.trim_matches('.').to_ascii_lowercase())
            .filter(|x| !x.is_empty())
            .collect();
        s.sort_by_key(|x| std::cmp::Reverse(x.len()));
        s.dedup();
        self.search_suffixes = s;
        self
    }

    /// The search domain whose removal leaves a name the endpoint may resolve.
    fn search_candidate(
        &self,
        entry: &EndpointEntry,
        query: &Query,
        dest: &Destination<'_>,
        server: SocketAddr,
        protocol: Protocol,
    ) -> Option<&str> {
        let name = query.name.as_ref().ok()?;
        let name = name.as_str();
        for suffix in &self.search_suffixes {
            let Some(base) = name
                .strip_suffix(suffix.as_str())
                .and_then(|b| b.strip_suffix('.'))
            else {
                continue;
            };
            if base.is_empty() {
                continue;
            }
            let Ok(base) = FoldedName::new(base.as_bytes()) else {
                continue;
            };
            let d =
                entry
                    .policy
                    .dns_decision_folded(Ok(&base), Some(dest), server.port(), protocol);
            if d.allowed {
                return Some(suffix);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::{parse_query, ParsedQuery};
    use dnsfence_policy::PolicyLoader;
    use dnsfence_testsupport::msg::query;
    use dnsfence_testsupport::policy::{dns_policy, DnsPeer};

    fn snapshot(config: VerdictConfig) -> Snapshot {
        let mut l = PolicyLoader::new();
        l.add(
            "p.yaml",
            &dns_policy("web", DnsPeer::KubeDns, 53, &["*.example.com"], &[]),
        );
        let (set, _) = l.finish();
        let ep = |name: &str, ns: &str, k: &str, v: &str, ip: &str| EndpointSpec {
            name: name.into(),
            namespace: ns.into(),
            labels: Labels::new([(k, v)]).unwrap(),
            ips: vec![ip.parse().unwrap()],
        };
        Snapshot::new(
            Arc::new(set),
            &[
                ep("web-1", "default", "app", "web", "10.0.0.2"),
                ep("other", "default", "app", "other", "10.0.0.3"),
                ep(
                    "coredns",
                    "kube-system",
                    "k8s-app",
                    "kube-dns",
                    "10.96.0.10",
                ),
            ],
            vec!["10.0.0.1".parse().unwrap()],
            config,
        )
    }

    fn q(name: &str) -> Query {
        match parse_query(&query(1, name, 1)) {
            ParsedQuery::Query(q) => q,
            other => panic!("{other:?}"),
        }
    }

    fn decide(s: &Snapshot, client: &str, server: &str, name: &str) -> Option<Rcode> {
        s.decide(
            client.parse().unwrap(),
            server.parse().unwrap(),
            Protocol::Udp,
            &q(name),
        )
        .deny
    }

    #[test]
    fn verdicts() {
        let s = snapshot(VerdictConfig::default());
        let dns = "10.96.0.10:53";
        assert_eq!(decide(&s, "10.0.0.2", dns, "a.example.com"), None);
        assert_eq!(
            decide(&s, "10.0.0.2", dns, "example.com"),
            Some(Rcode::Refused)
        );
        assert_eq!(
            decide(&s, "10.0.0.2", "192.0.2.53:53", "a.example.com"),
            Some(Rcode::Refused)
        );
        assert_eq!(
            decide(&s, "10.0.0.2", "10.96.0.10:5353", "a.example.com"),
            Some(Rcode::Refused)
        );
        assert_eq!(
            decide(&s, "10.0.0.3", dns, "anything.org"),
            None,
            "not enforced"
        );
        let learns = |client: &str, name: &str| {
            s.decide(
                client.parse().unwrap(),
                dns.parse().unwrap(),
                Protocol::Udp,
                &q(name),
            )
            .learn
        };
        assert!(learns("10.0.0.2", "a.example.com"));
        assert!(
            !learns("10.0.0.3", "a.example.com"),
            "unfiltered queries teach nothing"
        );
        assert_eq!(
            decide(&s, "10.9.9.9", dns, "a.example.com"),
            Some(Rcode::Refused),
            "unknown"
        );
        assert!(matches!(
            s.destination("10.0.0.1".parse().unwrap()),
            Destination::Host(_)
        ));
    }

    #[test]
    fn configurable_rcode_and_unknown_clients() {
        let s = snapshot(VerdictConfig {
            deny_rcode: Rcode::NxDomain,
            unknown_clients: UnknownClients::Forward,
        });
        let dns = "10.96.0.10:53";
        assert_eq!(
            decide(&s, "10.0.0.2", dns, "example.org"),
            Some(Rcode::NxDomain)
        );
        assert_eq!(decide(&s, "10.9.9.9", dns, "example.org"), None);
    }
}
