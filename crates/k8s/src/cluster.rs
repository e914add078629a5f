//! What the agent knows of the cluster, fed by watcher events and read as endpoints and
//! policy documents. Sans-IO: [`crate::watch`] turns the API's list and watch responses
//! into [`Change`]s; tests feed them directly.
//!
//! - **Re-lists never drop enforcement.** A watcher that lost its watch lists again
//!   ([`Change::Init`] .. [`Change::InitDone`]); objects are updated as they arrive and
//!   only those absent from the new list are removed, at `InitDone`.
//! - **Invalid policies are rejected per object.** Each policy object is validated alone
//!   by the policy engine; an invalid version is reported once ([`Rejection`]) and the
//!   previous valid version of that object stays in force.
//! - **Labels as Cilium gives them**: pod labels, `io.kubernetes.pod.namespace`, namespace
//!   labels as `io.cilium.k8s.namespace.labels.<key>`, the service account as
//!   `io.cilium.k8s.policy.serviceaccount` and `io.cilium.k8s.policy.cluster`.
//! - **Services stand for the pods they select**: pods query the kube-dns Service's
//!   ClusterIP, not a pod, and the DNS proxy judges the address the pod queried. A
//!   Service whose selector matches a pod the agent knows becomes a remote endpoint with
//!   the Service's ClusterIPs and only the labels every pod it fronts has (its selector,
//!   its namespace's), so a `toEndpoints` rule that names those labels covers it and a
//!   rule that needs more does not.
//! - **Labels only the agent sets** (`io.cilium.k8s.*`, the namespace label) are dropped
//!   from pods' own labels, as Cilium does: a pod cannot claim its namespace's labels.
//! - **Host-network pods are never endpoints**: they share the node's addresses, so
//!   enforcing them by source IP would enforce the node. They are listed as such.
//!
//! Layout: the kinds and what is kept of objects (`objects`), the store of one watcher's
//! events (`store`), policy objects and their rejections (`policies`), the peer queries
//! `toEndpoints` selectors need (`peers`), the endpoints the agent reads (`endpoints`);
//! [`ClusterState`] and its sync state here.

mod endpoints;
mod objects;
mod peers;
mod policies;
mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};

pub use objects::{
    PodInfo, PolicySource, ServiceInfo, CLUSTER_LABEL, NAMESPACE_LABELS_PREFIX,
    SERVICE_ACCOUNT_LABEL,
};
pub use peers::PeerQuery;
pub use policies::Rejection;
pub use store::Change;

use policies::{PolicyEntry, PolicyKey};
use store::{keyed_pod, map_change, Store};

/// The node's view of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterState {
    node: String,
    cluster_name: String,
    /// Pods on this node.
    local: Store<(String, String), PodInfo>,
    /// Namespaces and their labels.
    namespaces: Store<String, BTreeMap<String, String>>,
    /// Services.
    services: Store<(String, String), ServiceInfo>,
    /// Pods named by `toEndpoints`, per query.
    peers: BTreeMap<PeerQuery, Store<(String, String), PodInfo>>,
    policies: BTreeMap<PolicyKey, PolicyEntry>,
    policy_listing: BTreeMap<PolicySource, BTreeSet<PolicyKey>>,
    policy_synced: BTreeSet<PolicySource>,
    /// The policy sources the agent waits for before its first reconcile.
    required: BTreeSet<PolicySource>,
    rejections: Vec<Rejection>,
}

impl ClusterState {
    /// The state of `node` in `cluster_name`, waiting for `required` policy sources.
    pub fn new(
        node: impl Into<String>,
        cluster_name: impl Into<String>,
        required: impl IntoIterator<Item = PolicySource>,
    ) -> Self {
        Self {
            node: node.into(),
            cluster_name: cluster_name.into(),
            local: Store::default(),
            namespaces: Store::default(),
            services: Store::default(),
            peers: BTreeMap::new(),
            policies: BTreeMap::new(),
            policy_listing: BTreeMap::new(),
            policy_synced: BTreeSet::new(),
            required: required.into_iter().collect(),
            rejections: Vec::new(),
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Applies an event of the pods-on-this-node watcher. Pods of other nodes are
    /// ignored (the watch is filtered by `spec.nodeName`; this guards the rest).
    pub fn local_pod(&mut self, change: Change<Pod>) -> bool {
        let node = self.node.clone();
        match keyed_pod(change) {
            Some(Change::Apply((k, p)) | Change::InitApply((k, p)))
                if p.node.as_deref().is_some_and(|n| n != node) =>
            {
                self.local.apply(Change::Delete((k, p)))
            }
            Some(c) => self.local.apply(c),
            None => false,
        }
    }

    /// Applies an event of a peer watcher.
    pub fn peer_pod(&mut self, query: &PeerQuery, change: Change<Pod>) -> bool {
        let Some(store) = self.peers.get_mut(query) else {
            // A query no policy needs any more.
            return false;
        };
        keyed_pod(change).is_some_and(|c| store.apply(c))
    }

    /// Applies an event of the namespace watcher.
    pub fn namespace(&mut self, change: Change<Namespace>) -> bool {
        let keyed = map_change(change, |ns: Namespace| {
            let name = ns.metadata.name?;
            Some((name, ns.metadata.labels.unwrap_or_default()))
        });
        keyed.is_some_and(|c| self.namespaces.apply(c))
    }

    /// Applies an event of the Service watcher.
    pub fn service(&mut self, change: Change<Service>) -> bool {
        let keyed = map_change(change, |svc: Service| {
            let info = ServiceInfo::from_service(&svc)?;
            Some(((info.namespace.clone(), info.name.clone()), info))
        });
        keyed.is_some_and(|c| self.services.apply(c))
    }

    /// Whether every watcher the first reconcile needs has listed once.
    pub fn synced(&self) -> bool {
        self.base_synced() && self.peers_synced()
    }

    /// Whether pods, namespaces, services and the required policy kinds have listed.
    pub fn base_synced(&self) -> bool {
        self.local.synced
            && self.namespaces.synced
            && self.services.synced
            && self.required.iter().all(|s| self.policy_synced.contains(s))
    }

    /// Whether every peer query has listed.
    pub fn peers_synced(&self) -> bool {
        self.peers.values().all(|s| s.synced)
    }

    /// What has not listed yet (for logs and status).
    pub fn waiting_for(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.local.synced {
            out.push(format!("pods on node {}", self.node));
        }
        if !self.namespaces.synced {
            out.push("namespaces".to_owned());
        }
        if !self.services.synced {
            out.push("services".to_owned());
        }
        for s in &self.required {
            if !self.policy_synced.contains(s) {
                out.push(s.plural().to_owned());
            }
        }
        for (q, s) in &self.peers {
            if !s.synced {
                out.push(format!("peer pods {q:?}"));
            }
        }
        out
    }

    /// Also waits for `source` before the first reconcile (a Cilium CRD that appeared).
    pub fn require(&mut self, source: PolicySource) {
        self.required.insert(source);
    }
}
