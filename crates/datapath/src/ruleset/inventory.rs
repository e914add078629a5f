//! What the datapath enforces: the endpoints with their resolved policies, and the node's
//! addresses. Plain data built from a policy set; it renders nothing.

use std::net::IpAddr;

use dnsfence_policy::{Endpoint, EndpointPolicy, PolicySet};

/// One endpoint of the inventory with its resolved policy.
#[derive(Debug, Clone)]
pub struct EndpointState {
    /// Name, for comments.
    pub name: String,
    /// Namespace and labels (for `toEndpoints` peers).
    pub endpoint: Endpoint,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// The rules that apply.
    pub policy: EndpointPolicy,
}

/// Everything the datapath enforces.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// The endpoints.
    pub endpoints: Vec<EndpointState>,
    /// The node's addresses (`toEntities: host`).
    pub host_ips: Vec<IpAddr>,
}

impl Inventory {
    /// Resolves `policies` for each endpoint.
    pub fn resolve(
        policies: &PolicySet,
        endpoints: impl IntoIterator<Item = (String, Endpoint, Vec<IpAddr>)>,
        host_ips: Vec<IpAddr>,
    ) -> Self {
        Self {
            endpoints: endpoints
                .into_iter()
                .map(|(name, endpoint, ips)| EndpointState {
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
