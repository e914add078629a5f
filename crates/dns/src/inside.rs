//! Which addresses of an allowed answer may be learned: never those that point inside.
//!
//! A name the policy allows (`*.example.com`) is controlled by whoever runs its zone, and
//! its answer may name any address: the node, another pod, a Service, loopback, the cloud's
//! metadata service. Learned, such an address would open to the pod what its policy never
//! named. So before an answer teaches, each address is classified:
//!
//! 1. Inside a `dns.never_learn` range (default: loopback, link-local, multicast,
//!    broadcast, unspecified, IPv4-mapped and -compatible IPv6): never learned.
//! 2. An address of this node: never learned (`toEntities: host` reaches the node).
//! 3. An address of a known endpoint (pod, Service), or inside `cluster_cidrs`: learned
//!    only from a Kubernetes service name of the cluster (`NAME.NAMESPACE.svc.DOMAIN`, the
//!    documented way `toFQDNs` reaches a Service), else never (`toEndpoints` reaches pods).
//!
//! Everything else, private ranges outside the cluster included (a corporate API at 10.x),
//! stays learnable. The cost is a few comparisons and one hash lookup per address.

use std::net::IpAddr;

use dnsfence_policy::FoldedName;
use ipnet::IpNet;

/// Why an address of an allowed answer is not learned. The names are bounded (metric
/// labels) and say which protection applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotLearned {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 169.254.0.0/16 (cloud metadata services live there), fe80::/10.
    LinkLocal,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 255.255.255.255 (and the rest of 240.0.0.0/4).
    Broadcast,
    /// 0.0.0.0/8, ::.
    Unspecified,
    /// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`, `::a.b.c.d`): it would reach
    /// the IPv4 address behind the IPv4 policy's back.
    MappedIpv4,
    /// Another range of `dns.never_learn`.
    NeverLearn,
    /// An address of this node.
    Node,
    /// An address of a known endpoint (a pod or a Service), from a name that is not the
    /// cluster's own service name.
    Endpoint,
    /// Inside `cluster_cidrs`, from a name that is not the cluster's own service name.
    Cluster,
}

impl NotLearned {
    /// Every reason.
    pub const ALL: [NotLearned; 10] = [
        NotLearned::Loopback,
        NotLearned::LinkLocal,
        NotLearned::Multicast,
        NotLearned::Broadcast,
        NotLearned::Unspecified,
        NotLearned::MappedIpv4,
        NotLearned::NeverLearn,
        NotLearned::Node,
        NotLearned::Endpoint,
        NotLearned::Cluster,
    ];

    /// The reason's name (flow events, metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            NotLearned::Loopback => "loopback",
            NotLearned::LinkLocal => "link-local",
            NotLearned::Multicast => "multicast",
            NotLearned::Broadcast => "broadcast",
            NotLearned::Unspecified => "unspecified",
            NotLearned::MappedIpv4 => "mapped-ipv4",
            NotLearned::NeverLearn => "never-learn",
            NotLearned::Node => "node",
            NotLearned::Endpoint => "endpoint",
            NotLearned::Cluster => "cluster",
        }
    }

    /// Which special-purpose range `ip` is in, if any.
    fn category(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, ..] = v4.octets();
                if v4.is_loopback() {
                    Some(Self::Loopback)
                } else if a == 169 && b == 254 {
                    Some(Self::LinkLocal)
                } else if v4.is_multicast() {
                    Some(Self::Multicast)
                } else if a >= 240 {
                    Some(Self::Broadcast)
                } else if a == 0 {
                    Some(Self::Unspecified)
                } else {
                    None
                }
            }
            IpAddr::V6(v6) => {
                let first = v6.segments()[0];
                if v6.is_loopback() {
                    Some(Self::Loopback)
                } else if v6.is_unspecified() {
                    Some(Self::Unspecified)
                } else if first & 0xffc0 == 0xfe80 {
                    Some(Self::LinkLocal)
                } else if v6.is_multicast() {
                    Some(Self::Multicast)
                } else if v6.to_ipv4().is_some() {
                    // `to_ipv4` covers both ::ffff:a.b.c.d and ::a.b.c.d.
                    Some(Self::MappedIpv4)
                } else {
                    None
                }
            }
        }
    }
}

/// The ranges `dns.never_learn` holds unless configured otherwise.
pub const DEFAULT_NEVER_LEARN: [&str; 11] = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "::/96",
    "fe80::/10",
    "ff00::/8",
];

/// The default of `dns.never_learn`, parsed.
pub fn default_never_learn() -> Vec<IpNet> {
    DEFAULT_NEVER_LEARN
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The default cluster DNS domain.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// What an answer may teach, as configured (shared by every snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsideConfig {
    /// Never learned, whatever the name (`dns.never_learn`).
    pub never_learn: Vec<IpNet>,
    /// The cluster's pod and service ranges (`cluster_cidrs`): learned only from the
    /// cluster's own service names.
    pub cluster_cidrs: Vec<IpNet>,
    /// The cluster's DNS domain (`dns.cluster_domain`, folded, without dots at either
    /// end): names `*.svc.<domain>` are its service names.
    pub cluster_domain: String,
}

impl Default for InsideConfig {
    fn default() -> Self {
        Self {
            never_learn: default_never_learn(),
            cluster_cidrs: Vec::new(),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_owned(),
        }
    }
}

impl InsideConfig {
    /// `domain` folded, without dots at either end.
    pub fn with_cluster_domain(mut self, domain: &str) -> Self {
        self.cluster_domain = domain.trim_matches('.').to_ascii_lowercase();
        self
    }

    /// Why `ip` must not be learned from `name`, where `node(ip)` says whether it is an
    /// address of this node and `endpoint(ip)` whether it is a known endpoint's; `None`:
    /// it may be.
    pub fn judge(
        &self,
        ip: IpAddr,
        name: &FoldedName,
        node: impl FnOnce(IpAddr) -> bool,
        endpoint: impl FnOnce(IpAddr) -> bool,
    ) -> Option<NotLearned> {
        if self.never_learn.iter().any(|n| n.contains(&ip)) {
            return Some(NotLearned::category(ip).unwrap_or(NotLearned::NeverLearn));
        }
        if node(ip) {
            return Some(NotLearned::Node);
        }
        if self.is_service_name(name) {
            return None;
        }
        if endpoint(ip) {
            return Some(NotLearned::Endpoint);
        }
        if self.cluster_cidrs.iter().any(|n| n.contains(&ip)) {
            return Some(NotLearned::Cluster);
        }
        None
    }

    /// Whether `name` is a service name of the cluster: `SERVICE.NAMESPACE.svc.DOMAIN`, or
    /// a name below one (`HOST.SERVICE.NAMESPACE.svc.DOMAIN`, headless services).
    pub fn is_service_name(&self, name: &FoldedName) -> bool {
        if self.cluster_domain.is_empty() {
            return false;
        }
        let name = name.as_str();
        let Some(rest) = name
            .strip_suffix(self.cluster_domain.as_str())
            .and_then(|r| r.strip_suffix(".svc."))
        else {
            return false;
        };
        // At least a service and a namespace label.
        rest.split('.').filter(|l| !l.is_empty()).count() >= 2
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]
    use super::*;

    fn name(s: &str) -> FoldedName {
        FoldedName::new(s.as_bytes()).unwrap()
    }

    fn judge(
        config: &InsideConfig,
        ip: &str,
        n: &str,
        node: &[&str],
        eps: &[&str],
    ) -> Option<NotLearned> {
        let ip: IpAddr = ip.parse().unwrap();
        let node: Vec<IpAddr> = node.iter().map(|s| s.parse().unwrap()).collect();
        let eps: Vec<IpAddr> = eps.iter().map(|s| s.parse().unwrap()).collect();
        config.judge(ip, &name(n), |i| node.contains(&i), |i| eps.contains(&i))
    }

    #[test]
    fn special_purpose_ranges_are_never_learned_and_say_which() {
        let c = InsideConfig::default();
        for (ip, why) in [
            ("127.0.0.1", NotLearned::Loopback),
            ("127.3.4.5", NotLearned::Loopback),
            ("::1", NotLearned::Loopback),
            ("169.254.169.254", NotLearned::LinkLocal),
            ("fe80::1", NotLearned::LinkLocal),
            ("224.0.0.251", NotLearned::Multicast),
            ("ff02::fb", NotLearned::Multicast),
            ("255.255.255.255", NotLearned::Broadcast),
            ("0.0.0.0", NotLearned::Unspecified),
            ("::", NotLearned::Unspecified),
            ("::ffff:198.51.100.66", NotLearned::MappedIpv4),
            ("::198.51.100.66", NotLearned::MappedIpv4),
        ] {
            assert_eq!(judge(&c, ip, "a.example.com", &[], &[]), Some(why), "{ip}");
            // Not even from a service name.
            assert_eq!(
                judge(&c, ip, "api.ns.svc.cluster.local", &[], &[]),
                Some(why),
                "{ip}"
            );
        }
        // An operator's own range is named as such.
        let mut c = InsideConfig::default();
        c.never_learn.push("100.100.0.0/16".parse().unwrap());
        assert_eq!(
            judge(&c, "100.100.1.2", "a.example.com", &[], &[]),
            Some(NotLearned::NeverLearn)
        );
    }

    #[test]
    fn the_world_and_private_ranges_outside_the_cluster_stay_learnable() {
        let c = InsideConfig {
            cluster_cidrs: vec!["10.200.0.0/16".parse().unwrap()],
            ..InsideConfig::default()
        };
        for ip in [
            "192.0.2.10",
            "10.1.2.3",
            "172.16.0.5",
            "fd00:1::5",
            "2001:db8::10",
        ] {
            assert_eq!(judge(&c, ip, "a.example.com", &[], &[]), None, "{ip}");
        }
    }

    #[test]
    fn the_node_is_never_learned_endpoints_and_cluster_only_from_service_names() {
        let c = InsideConfig {
            cluster_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
            ..InsideConfig::default()
        };
        let node = ["10.200.0.1"];
        let eps = ["10.200.3.2", "10.96.0.10"];
        assert_eq!(
            judge(&c, "10.200.0.1", "int-node.example.com", &node, &eps),
            Some(NotLearned::Node)
        );
        assert_eq!(
            judge(&c, "10.200.0.1", "x.default.svc.cluster.local", &node, &eps),
            Some(NotLearned::Node)
        );
        assert_eq!(
            judge(&c, "10.200.3.2", "int-pod.example.com", &node, &eps),
            Some(NotLearned::Endpoint)
        );
        assert_eq!(
            judge(&c, "10.96.5.5", "int-svc.example.com", &node, &eps),
            Some(NotLearned::Cluster)
        );
        // The cluster's own service names teach their ClusterIPs and headless pods.
        for n in [
            "kube-dns.kube-system.svc.cluster.local",
            "api.payments.svc.cluster.local.",
            "db-0.db.payments.svc.cluster.local",
        ] {
            assert_eq!(judge(&c, "10.96.0.10", n, &node, &eps), None, "{n}");
            assert_eq!(judge(&c, "10.200.3.2", n, &node, &eps), None, "{n}");
        }
        // Look-alikes are not service names.
        for n in [
            "svc.cluster.local",
            "payments.svc.cluster.local",
            "api.payments.svc.cluster.local.evil.example.com",
            "api.payments.svcxcluster.local",
            "api.payments.notsvc.cluster.local",
        ] {
            assert_eq!(
                judge(&c, "10.96.0.10", n, &node, &eps),
                Some(NotLearned::Endpoint),
                "{n}"
            );
        }
        let other = InsideConfig::default().with_cluster_domain("Corp.Example.");
        assert!(other.is_service_name(&name("api.payments.svc.corp.example")));
        assert!(!other.is_service_name(&name("api.payments.svc.cluster.local")));
    }

    #[test]
    fn every_reason_has_a_distinct_name() {
        let mut names: Vec<&str> = NotLearned::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), NotLearned::ALL.len());
    }
}
