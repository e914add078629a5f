//! What the agent reads of the cluster state: the endpoints (this node's pods, peer pods
//! of other nodes, Services of known pods) with the labels Cilium would give them, and
//! the node's addresses.
//!
//! Read-only: it changes nothing in the state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use dnsfence_policy::NAMESPACE_LABEL;
use dnsfence_policy::{EndpointConfig, Labels};

use super::{ClusterState, PodInfo, CLUSTER_LABEL, NAMESPACE_LABELS_PREFIX, SERVICE_ACCOUNT_LABEL};

impl ClusterState {
    /// The endpoints: this node's pods (enforced), then peer pods of other nodes
    /// (remote: selectable, not enforced here). Host-network and terminal pods and pods
    /// without addresses are left out.
    pub fn endpoints(&self) -> Vec<EndpointConfig> {
        let mut out: BTreeMap<(String, String), EndpointConfig> = BTreeMap::new();
        // One endpoint per address: a pod being deleted may still list an address the
        // CNI already gave to a new pod. Live pods first, local before remote.
        let mut taken: BTreeSet<IpAddr> = BTreeSet::new();
        let mut local: Vec<&PodInfo> = self.local.items.values().filter(|p| usable(p)).collect();
        local.sort_by_key(|p| p.deleting);
        for p in local {
            if p.ips.iter().any(|ip| taken.contains(ip)) {
                continue;
            }
            taken.extend(p.ips.iter().copied());
            out.insert(p.key(), self.endpoint(p, false));
        }
        let mut remote: Vec<&PodInfo> = self
            .peers
            .values()
            .flat_map(|s| s.items.values())
            .filter(|p| usable(p) && p.node.as_deref() != Some(self.node.as_str()))
            .collect();
        remote.sort_by_key(|p| p.deleting);
        for p in remote {
            if out.contains_key(&p.key()) || p.ips.iter().any(|ip| taken.contains(ip)) {
                continue;
            }
            taken.extend(p.ips.iter().copied());
            out.insert(p.key(), self.endpoint(p, true));
        }
        // Services of known pods, after the pods so that a pod's own name wins.
        let known: BTreeSet<IpAddr> = out.values().flat_map(|e| e.ips.iter().copied()).collect();
        for svc in self.services.items.values() {
            if svc.selector.is_empty() || svc.cluster_ips.is_empty() {
                continue;
            }
            let fronts_known_pod = out.values().any(|e| {
                e.namespace == svc.namespace
                    && svc
                        .selector
                        .iter()
                        .all(|(k, v)| e.labels.get(k) == Some(v.as_str()))
            });
            if !fronts_known_pod {
                continue;
            }
            let ips: Vec<IpAddr> = svc
                .cluster_ips
                .iter()
                .filter(|ip| !known.contains(ip))
                .copied()
                .collect();
            if ips.is_empty() {
                continue;
            }
            // Only what every pod it may forward to has: its selector, its namespace.
            let mut labels: BTreeMap<String, String> = svc
                .selector
                .iter()
                .filter(|(k, _)| !reserved_label(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            self.add_namespace_labels(&svc.namespace, &mut labels);
            labels.insert(CLUSTER_LABEL.to_owned(), self.cluster_name.clone());
            let endpoint = EndpointConfig {
                name: format!("service:{}", svc.name),
                namespace: svc.namespace.clone(),
                labels: Labels::keep_valid(labels),
                ips,
                remote: true,
            };
            out.insert((svc.namespace.clone(), endpoint.name.clone()), endpoint);
        }
        out.into_values().collect()
    }

    fn endpoint(&self, p: &PodInfo, remote: bool) -> EndpointConfig {
        // A pod may not claim what only its namespace or the agent says about it.
        let mut labels: BTreeMap<String, String> = p
            .labels
            .iter()
            .filter(|(k, _)| !reserved_label(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.add_namespace_labels(&p.namespace, &mut labels);
        labels.insert(
            SERVICE_ACCOUNT_LABEL.to_owned(),
            p.service_account
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
        );
        labels.insert(CLUSTER_LABEL.to_owned(), self.cluster_name.clone());
        EndpointConfig {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            labels: Labels::keep_valid(labels),
            ips: p.ips.clone(),
            remote,
        }
    }

    fn add_namespace_labels(&self, namespace: &str, labels: &mut BTreeMap<String, String>) {
        if let Some(ns_labels) = self.namespaces.items.get(namespace) {
            for (k, v) in ns_labels {
                labels.insert(format!("{NAMESPACE_LABELS_PREFIX}{k}"), v.clone());
            }
        }
    }

    /// The node's addresses, as its pods report them (`status.hostIPs`).
    pub fn host_ips(&self) -> Vec<IpAddr> {
        let set: BTreeSet<IpAddr> = self
            .local
            .items
            .values()
            .flat_map(|p| p.host_ips.iter().copied())
            .collect();
        set.into_iter().collect()
    }

    /// This node's host-network pods (`namespace/name`): never enforced by dnsfence.
    pub fn host_network_pods(&self) -> Vec<String> {
        self.local
            .items
            .values()
            .filter(|p| p.host_network && !p.terminal)
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect()
    }
}

/// Labels only the agent sets: a pod or Service carrying them is not believed.
fn reserved_label(key: &str) -> bool {
    key.starts_with("io.cilium.k8s.") || key == NAMESPACE_LABEL
}

fn usable(p: &PodInfo) -> bool {
    !p.host_network && !p.terminal && !p.ips.is_empty()
}
