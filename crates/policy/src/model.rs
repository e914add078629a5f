//! The validated policy model: what a parsed policy means, independent of YAML.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::labels::{Endpoint, EndpointSelector};
use crate::pattern::NamePattern;

/// The five policy kinds dnsfence reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    /// `cilium.io/v2` `CiliumNetworkPolicy` (namespaced).
    CiliumNetworkPolicy,
    /// `cilium.io/v2` `CiliumClusterwideNetworkPolicy`.
    CiliumClusterwideNetworkPolicy,
    /// `dnsfence.io/v1alpha1` `EgressPolicy` (namespaced).
    EgressPolicy,
    /// `dnsfence.io/v1alpha1` `ClusterEgressPolicy`.
    ClusterEgressPolicy,
    /// `policy.networking.k8s.io` `ClusterNetworkPolicy` (sig-network's network-policy-api,
    /// cluster-scoped, tiered and prioritised; see [`Precedence`]).
    ClusterNetworkPolicy,
}

/// The `apiVersion`s accepted for `ClusterNetworkPolicy`, preferred first: the released
/// `v1alpha2` and its successor `v1beta1` have the same shape for what dnsfence reads.
const CLUSTER_NETWORK_POLICY_VERSIONS: &[&str] = &[
    "policy.networking.k8s.io/v1alpha2",
    "policy.networking.k8s.io/v1beta1",
];

impl PolicyKind {
    /// Looks a kind up by `apiVersion` group and `kind`; `None` if not a policy kind.
    pub fn from_kind(kind: &str) -> Option<Self> {
        Some(match kind {
            "CiliumNetworkPolicy" => PolicyKind::CiliumNetworkPolicy,
            "CiliumClusterwideNetworkPolicy" => PolicyKind::CiliumClusterwideNetworkPolicy,
            "EgressPolicy" => PolicyKind::EgressPolicy,
            "ClusterEgressPolicy" => PolicyKind::ClusterEgressPolicy,
            "ClusterNetworkPolicy" => PolicyKind::ClusterNetworkPolicy,
            _ => return None,
        })
    }

    /// The preferred `apiVersion` of this kind (the first of [`PolicyKind::api_versions`]).
    pub fn api_version(self) -> &'static str {
        match self.api_versions() {
            [first, ..] => first,
            [] => "",
        }
    }

    /// Every `apiVersion` accepted for this kind, preferred first.
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            PolicyKind::CiliumNetworkPolicy | PolicyKind::CiliumClusterwideNetworkPolicy => {
                &["cilium.io/v2"]
            }
            PolicyKind::EgressPolicy | PolicyKind::ClusterEgressPolicy => &["dnsfence.io/v1alpha1"],
            PolicyKind::ClusterNetworkPolicy => CLUSTER_NETWORK_POLICY_VERSIONS,
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        matches!(
            self,
            PolicyKind::CiliumNetworkPolicy | PolicyKind::EgressPolicy
        )
    }

    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            PolicyKind::EgressPolicy => "EgressPolicy",
            PolicyKind::ClusterEgressPolicy => "ClusterEgressPolicy",
            PolicyKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        }
    }
}

/// A `ClusterNetworkPolicy` tier, in evaluation order (`Admin` before `Baseline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// `Admin`: evaluated before every other policy.
    Admin,
    /// `Baseline`: evaluated last (after namespaced NetworkPolicies in Kubernetes).
    Baseline,
}

impl Tier {
    /// Parses the YAML spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Admin" => Tier::Admin,
            "Baseline" => Tier::Baseline,
            _ => return None,
        })
    }

    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        }
    }
}

/// Where a `ClusterNetworkPolicy` stands in the evaluation order: lower sorts first and
/// takes precedence (tier, then `priority` 0-1000, lower value first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Precedence {
    /// `spec.tier`.
    pub tier: Tier,
    /// `spec.priority`, 0-1000.
    pub priority: u16,
}

impl fmt::Display for Precedence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tier {} priority {}", self.tier.as_str(), self.priority)
    }
}

/// Where a policy came from: file and 1-based document index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    /// File name as given.
    pub file: Arc<str>,
    /// 1-based document index in the YAML stream.
    pub doc: usize,
}

/// A policy's identity: kind, namespace (for namespaced kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId {
    /// Kind.
    pub kind: PolicyKind,
    /// Namespace, for namespaced kinds.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// An L4 protocol in `toPorts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
    /// Any of them.
    Any,
}

impl Protocol {
    /// Parses Cilium's spelling (`TCP`, `UDP`, `SCTP`, `ANY`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            "ANY" => Protocol::Any,
            _ => return None,
        })
    }

    /// Whether a rule for `self` covers a packet of protocol `p`.
    pub fn covers(self, p: Protocol) -> bool {
        self == Protocol::Any || self == p
    }

    /// Cilium's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Any => "ANY",
        }
    }
}

/// One `ports[]` entry: a port or range and a protocol. Port 0 means every port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortProtocol {
    /// First port (0: all ports).
    pub port: u16,
    /// Last port, inclusive (equal to `port` for a single port).
    pub end_port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

impl PortProtocol {
    /// Every port of every protocol.
    pub const ANY: PortProtocol = PortProtocol {
        port: 0,
        end_port: 0,
        protocol: Protocol::Any,
    };

    /// Whether this covers `port` over `protocol`.
    pub fn covers(&self, port: u16, protocol: Protocol) -> bool {
        self.protocol.covers(protocol)
            && (self.port == 0 || (self.port..=self.end_port).contains(&port))
    }
}

impl fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.port, self.end_port) {
            (0, _) => write!(f, "*/{}", self.protocol.as_str()),
            (p, e) if p == e => write!(f, "{p}/{}", self.protocol.as_str()),
            (p, e) => write!(f, "{p}-{e}/{}", self.protocol.as_str()),
        }
    }
}

/// A `toEntities` value dnsfence can enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entity {
    /// Everything outside the cluster.
    World,
    /// IPv4 destinations outside the cluster.
    WorldIpv4,
    /// IPv6 destinations outside the cluster.
    WorldIpv6,
    /// Endpoints and nodes of the cluster.
    Cluster,
    /// The local node.
    Host,
    /// Everything.
    All,
}

impl Entity {
    /// Parses Cilium's spelling; `None` for entities dnsfence does not support.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "world" => Entity::World,
            "world-ipv4" => Entity::WorldIpv4,
            "world-ipv6" => Entity::WorldIpv6,
            "cluster" => Entity::Cluster,
            "host" => Entity::Host,
            "all" => Entity::All,
            _ => return None,
        })
    }

    /// Cilium's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::World => "world",
            Entity::WorldIpv4 => "world-ipv4",
            Entity::WorldIpv6 => "world-ipv6",
            Entity::Cluster => "cluster",
            Entity::Host => "host",
            Entity::All => "all",
        }
    }
}

/// A CIDR with the ranges carved out of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CidrRule {
    /// The CIDR.
    pub cidr: IpNet,
    /// Sub-ranges excluded (each inside `cidr`).
    pub except: Vec<IpNet>,
}

impl CidrRule {
    /// Whether `ip` is inside the CIDR and outside every exception.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

/// The L3 destination of an egress rule: one kind per rule, as in Cilium.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// No L3 part: any destination (the rule is L4-only).
    Any,
    /// `toEndpoints`.
    Endpoints(Vec<EndpointSelector>),
    /// `toCIDR` and `toCIDRSet`.
    Cidrs(Vec<CidrRule>),
    /// `toEntities`.
    Entities(Vec<Entity>),
    /// `toFQDNs`.
    Fqdns(Vec<NamePattern>),
}

/// What is known about a destination when a rule is checked against it.
#[derive(Debug, Clone, Copy)]
pub enum Destination<'a> {
    /// A known endpoint (a pod), by IP.
    Endpoint(IpAddr, &'a Endpoint),
    /// The local node.
    Host(IpAddr),
    /// Anything else: outside the cluster.
    World(IpAddr),
}

impl Destination<'_> {
    /// The destination's address.
    pub fn ip(&self) -> IpAddr {
        match *self {
            Destination::Endpoint(ip, _) | Destination::Host(ip) | Destination::World(ip) => ip,
        }
    }
}

impl Peer {
    /// Whether the peer selects `dest`. FQDN peers select nothing here: their IPs are
    /// learned from DNS at run time. As in Cilium, CIDR rules select only destinations
    /// outside the cluster, never endpoints or the node.
    pub fn selects(&self, dest: &Destination<'_>) -> bool {
        match self {
            Peer::Any => true,
            Peer::Endpoints(sels) => match dest {
                Destination::Endpoint(_, ep) => sels.iter().any(|s| s.matches(ep)),
                _ => false,
            },
            Peer::Cidrs(cidrs) => match dest {
                Destination::World(ip) => cidrs.iter().any(|c| c.contains(*ip)),
                _ => false,
            },
            Peer::Entities(es) => es.iter().any(|e| match (e, dest) {
                (Entity::All, _) => true,
                (Entity::World, Destination::World(_)) => true,
                (Entity::WorldIpv4, Destination::World(ip)) => ip.is_ipv4(),
                (Entity::WorldIpv6, Destination::World(ip)) => ip.is_ipv6(),
                (Entity::Cluster, Destination::Endpoint(..) | Destination::Host(_)) => true,
                (Entity::Host, Destination::Host(_)) => true,
                _ => false,
            }),
            Peer::Fqdns(_) => false,
        }
    }

    /// A short description, for explanations.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Peer::Any => "any destination",
            Peer::Endpoints(_) => "toEndpoints",
            Peer::Cidrs(_) => "toCIDR",
            Peer::Entities(_) => "toEntities",
            Peer::Fqdns(_) => "toFQDNs",
        }
    }
}

/// One `toPorts[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortRule {
    /// The ports; never empty (a missing list is [`PortProtocol::ANY`]).
    pub ports: Vec<PortProtocol>,
    /// `rules.dns`: when present, DNS on these ports is proxied and filtered by name.
    pub dns: Option<Vec<NamePattern>>,
}

/// One `egress[]` or `egressDeny[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EgressRule {
    /// Field path in its document, e.g. `spec.egress[1]`.
    pub path: String,
    /// The destination.
    pub peer: Peer,
    /// `toPorts`; empty means every port and protocol.
    pub to_ports: Vec<PortRule>,
}

impl EgressRule {
    /// Whether traffic to `port`/`protocol` is covered by the rule's ports.
    pub fn covers_port(&self, port: u16, protocol: Protocol) -> bool {
        self.to_ports.is_empty()
            || self
                .to_ports
                .iter()
                .any(|pr| pr.ports.iter().any(|pp| pp.covers(port, protocol)))
    }

    /// All port/protocol pairs the rule allows (`[ANY]` when it has no `toPorts`).
    pub fn ports(&self) -> Vec<PortProtocol> {
        if self.to_ports.is_empty() {
            return vec![PortProtocol::ANY];
        }
        let mut all: Vec<PortProtocol> = self
            .to_ports
            .iter()
            .flat_map(|pr| pr.ports.iter().copied())
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// One `spec` (or one entry of `specs`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Field path of the spec, `spec` or `specs[N]`.
    pub path: String,
    /// The endpoints it applies to, scoped to the namespace for namespaced kinds.
    pub subject: EndpointSelector,
    /// `egress[]`.
    pub egress: Vec<EgressRule>,
    /// `egressDeny[]`.
    pub egress_deny: Vec<EgressRule>,
    /// Whether the rule puts the endpoints it selects in egress default-deny: it has egress
    /// rules and `enableDefaultDeny.egress` is not false.
    pub default_deny_egress: bool,
}

/// A validated policy object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Kind, namespace, name.
    pub id: PolicyId,
    /// Where it was read.
    pub source: Source,
    /// Its specs. Empty for a host policy (`nodeSelector`), which dnsfence does not enforce.
    pub rules: Vec<Rule>,
    /// Audit mode (annotation [`AUDIT_ANNOTATION`] `"true"`): the policy's allows count,
    /// but neither its default-deny nor its `egressDeny` rules are enforced; what they
    /// would deny is recorded instead. See [`EndpointPolicy`](crate::EndpointPolicy).
    pub audit: bool,
    /// For a `ClusterNetworkPolicy`, its tier and priority; `None` for the other kinds,
    /// which are not ordered. The loader uses it to reject combinations of policies that
    /// dnsfence's "deny wins, allows add up" cannot express (see `docs/policy.md`).
    pub precedence: Option<Precedence>,
}

/// The `metadata.annotations` key that puts a policy in audit mode; its value is
/// `"true"` or `"false"` (a string, as every annotation value).
pub const AUDIT_ANNOTATION: &str = "dnsfence.io/audit";
