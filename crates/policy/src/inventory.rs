//! What the engine is given to judge, and what it makes of it: policy documents and the
//! endpoint inventory, as plain data that files, the agent's snapshots and the Kubernetes
//! front end all carry; and the inventory resolved against a policy set, which the
//! datapath enforces.
//!
//! No logic beyond that: [`crate::PolicyLoader`] compiles the documents,
//! [`crate::PolicySet::resolve`] the endpoints.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One policy file's text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDoc {
    /// Where it was read (names it in diagnostics).
    pub file: String,
    /// The YAML.
    pub text: String,
}

/// One endpoint of the inventory: a pod, or anything with addresses and labels.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Name (pod name).
    pub name: String,
    /// Namespace (default `default`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Labels (keys may carry Cilium's `k8s:` or `any:` source prefix).
    #[serde(default)]
    pub labels: crate::Labels,
    /// Addresses.
    #[serde(deserialize_with = "dnsfence_config::de::ip_addresses")]
    pub ips: Vec<IpAddr>,
    /// On another node, or the host (default false): `toEndpoints` selectors see it, but
    /// dnsfence does not enforce its egress here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub remote: bool,
}

fn default_namespace() -> String {
    "default".to_owned()
}

impl EndpointConfig {
    /// Its namespace and labels, as policies select them.
    pub fn endpoint(&self) -> crate::Endpoint {
        crate::Endpoint::new(self.namespace.clone(), self.labels.clone())
    }
}

/// One endpoint of the inventory with the rules that apply to it.
#[derive(Debug, Clone)]
pub struct ResolvedEndpoint {
    /// Name, for comments.
    pub name: String,
    /// Namespace and labels (for `toEndpoints` peers).
    pub endpoint: crate::Endpoint,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// The rules that apply.
    pub policy: crate::EndpointPolicy,
}

/// Every endpoint with its rules, and the node's addresses: what the datapath enforces.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// The endpoints.
    pub endpoints: Vec<ResolvedEndpoint>,
    /// The node's addresses (`toEntities: host`).
    pub host_ips: Vec<IpAddr>,
}

impl Inventory {
    /// Resolves `policies` for each endpoint.
    pub fn resolve(
        policies: &crate::PolicySet,
        endpoints: impl IntoIterator<Item = (String, crate::Endpoint, Vec<IpAddr>)>,
        host_ips: Vec<IpAddr>,
    ) -> Self {
        Self {
            endpoints: endpoints
                .into_iter()
                .map(|(name, endpoint, ips)| ResolvedEndpoint {
                    name,
                    policy: policies.resolve(&endpoint),
                    endpoint,
                    ips,
                })
                .collect(),
            host_ips,
        }
    }
}
