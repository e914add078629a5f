//! The policy kinds the agent watches ([`PolicySource`]), what it keeps of pods and
//! Services ([`PodInfo`], [`ServiceInfo`]), and the labels it gives endpoints.
//!
//! Plain data read from the API's objects: no state, no I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service};

/// The label prefix of namespace labels on endpoints.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// The service account label.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";

/// The cluster name label.
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// The policy kinds the agent watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicySource {
    /// `dnsfence.io/v1alpha1` `EgressPolicy`.
    EgressPolicy,
    /// `dnsfence.io/v1alpha1` `ClusterEgressPolicy`.
    ClusterEgressPolicy,
    /// `cilium.io/v2` `CiliumNetworkPolicy`.
    CiliumNetworkPolicy,
    /// `cilium.io/v2` `CiliumClusterwideNetworkPolicy`.
    CiliumClusterwideNetworkPolicy,
}

impl PolicySource {
    /// Every source.
    pub const ALL: [PolicySource; 4] = [
        PolicySource::EgressPolicy,
        PolicySource::ClusterEgressPolicy,
        PolicySource::CiliumNetworkPolicy,
        PolicySource::CiliumClusterwideNetworkPolicy,
    ];

    /// The kind.
    pub fn kind(self) -> &'static str {
        match self {
            PolicySource::EgressPolicy => "EgressPolicy",
            PolicySource::ClusterEgressPolicy => "ClusterEgressPolicy",
            PolicySource::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicySource::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
        }
    }

    /// `group/version`.
    pub fn api_version(self) -> &'static str {
        match self {
            PolicySource::EgressPolicy | PolicySource::ClusterEgressPolicy => {
                "dnsfence.io/v1alpha1"
            }
            _ => "cilium.io/v2",
        }
    }

    /// The resource's plural name.
    pub fn plural(self) -> &'static str {
        match self {
            PolicySource::EgressPolicy => "egresspolicies",
            PolicySource::ClusterEgressPolicy => "clusteregresspolicies",
            PolicySource::CiliumNetworkPolicy => "ciliumnetworkpolicies",
            PolicySource::CiliumClusterwideNetworkPolicy => "ciliumclusterwidenetworkpolicies",
        }
    }

    /// Whether objects are namespaced.
    pub fn namespaced(self) -> bool {
        matches!(
            self,
            PolicySource::EgressPolicy | PolicySource::CiliumNetworkPolicy
        )
    }
}

/// What the agent keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName`.
    pub service_account: Option<String>,
    /// `status.podIPs` (or `status.podIP`).
    pub ips: Vec<IpAddr>,
    /// `status.hostIPs` (or `status.hostIP`): the node's addresses.
    pub host_ips: Vec<IpAddr>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// Phase `Succeeded` or `Failed`: its IPs may already belong to another pod.
    pub terminal: bool,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

impl PodInfo {
    /// Reads a pod; `None` without a name.
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let name = pod.metadata.name.clone()?;
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let parse = |s: &str| s.parse::<IpAddr>().ok();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|v| v.iter().filter_map(|p| parse(&p.ip)).collect())
            .unwrap_or_default();
        if ips.is_empty() {
            ips.extend(status.and_then(|s| s.pod_ip.as_deref()).and_then(parse));
        }
        let mut host_ips: Vec<IpAddr> = status
            .and_then(|s| s.host_ips.as_ref())
            .map(|v| v.iter().filter_map(|p| parse(&p.ip)).collect())
            .unwrap_or_default();
        if host_ips.is_empty() {
            host_ips.extend(status.and_then(|s| s.host_ip.as_deref()).and_then(parse));
        }
        Some(Self {
            namespace,
            name,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            service_account: spec.and_then(|s| s.service_account_name.clone()),
            ips,
            host_ips,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            node: spec.and_then(|s| s.node_name.clone()),
            deleting: pod.metadata.deletion_timestamp.is_some(),
            terminal: matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
        })
    }

    pub(super) fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }
}

/// What the agent keeps of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.selector` (empty: none, the Service's endpoints are managed by hand).
    pub selector: BTreeMap<String, String>,
    /// `spec.clusterIPs` (or `spec.clusterIP`), without `None`.
    pub cluster_ips: Vec<IpAddr>,
}

impl ServiceInfo {
    /// Reads a Service; `None` without a name.
    pub fn from_service(svc: &Service) -> Option<Self> {
        let spec = svc.spec.as_ref();
        let mut cluster_ips: Vec<IpAddr> = spec
            .and_then(|s| s.cluster_ips.as_ref())
            .map(|v| v.iter().filter_map(|ip| ip.parse().ok()).collect())
            .unwrap_or_default();
        if cluster_ips.is_empty() {
            cluster_ips.extend(
                spec.and_then(|s| s.cluster_ip.as_deref())
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            );
        }
        Some(Self {
            namespace: svc
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            name: svc.metadata.name.clone()?,
            selector: spec.and_then(|s| s.selector.clone()).unwrap_or_default(),
            cluster_ips,
        })
    }
}
