//! What the engine is given to judge: policy documents and the endpoint inventory, as
//! plain data that files, the agent's snapshots and the Kubernetes front end all carry.
//!
//! No logic: [`crate::PolicyLoader`] compiles the documents, [`crate::PolicySet::resolve`]
//! the endpoints.

use std::collections::BTreeMap;
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
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
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
    /// Its namespace and labels, as policies select them; fails on a label key no
    /// endpoint may carry.
    pub fn endpoint(&self) -> Result<crate::Endpoint, crate::LabelKeyError> {
        let labels = crate::Labels::new(self.labels.iter().map(|(k, v)| (k.as_str(), v.clone())))?;
        Ok(crate::Endpoint::new(self.namespace.clone(), labels))
    }
}
