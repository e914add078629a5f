//! Peer queries: for each `toEndpoints` selector of the policies in force, the pod list
//! to watch ([`PeerQuery`]), widened to what Kubernetes can select on pods.
//!
//! It decides what to watch; the watching is [`crate::watch`]'s.

use std::collections::BTreeSet;

use dnsfence_policy::kube_names::{self, is_dns_label, is_label_value};
use dnsfence_policy::{EndpointSelector, Operator, Peer, NAMESPACE_LABEL};

use super::store::Store;
use super::ClusterState;

/// A list of peer pods to watch: the pods a `toEndpoints` selector may select.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerQuery {
    /// Only this namespace (`None`: all).
    pub namespace: Option<String>,
    /// A Kubernetes label selector (may select more than the policy selector: the policy
    /// engine does the exact matching).
    pub label_selector: String,
}

impl PeerQuery {
    /// The query for `selector`: its namespace and the pod-label part of its
    /// requirements. Terms Kubernetes cannot express on pods (namespace labels, keys or
    /// values it would refuse) are left out, which only widens the list.
    pub fn of(selector: &EndpointSelector) -> Self {
        let sel = &selector.selector;
        // A namespace the API would refuse in a path: list cluster-wide instead.
        let namespace = selector
            .namespace
            .clone()
            .or_else(|| sel.match_labels.get(NAMESPACE_LABEL).cloned())
            .filter(|ns| is_dns_label(ns));
        let mut terms = Vec::new();
        for (k, v) in &sel.match_labels {
            if pod_key(k) && is_label_value(v) {
                terms.push(format!("{k}={v}"));
            }
        }
        for r in &sel.match_expressions {
            if !pod_key(&r.key) || !r.values.iter().all(|v| is_label_value(v)) {
                continue;
            }
            let values = r.values.iter().cloned().collect::<Vec<_>>().join(",");
            terms.push(match r.operator {
                Operator::In => format!("{} in ({values})", r.key),
                Operator::NotIn => format!("{} notin ({values})", r.key),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        Self {
            namespace,
            label_selector: terms.join(","),
        }
    }
}

/// Whether `key` is a pod label key Kubernetes accepts in a selector
/// ([`kube_names::label_key`]). Namespace and Cilium-derived keys are not pod labels.
pub(super) fn pod_key(key: &str) -> bool {
    if key == NAMESPACE_LABEL || key.starts_with("io.cilium.k8s.") {
        return false;
    }
    kube_names::label_key(key).is_ok()
}

impl ClusterState {
    /// The peer queries the policies in force need; starts tracking new ones and drops
    /// the others. Returns (added, removed).
    pub fn update_peer_queries(&mut self) -> (Vec<PeerQuery>, Vec<PeerQuery>) {
        let mut wanted = BTreeSet::new();
        for e in self.policies.values() {
            let Some((_, parsed)) = &e.valid else {
                continue;
            };
            for policy in parsed {
                for rule in &policy.rules {
                    for egress in rule.egress.iter().chain(&rule.egress_deny) {
                        if let Peer::Endpoints(selectors) = &egress.peer {
                            wanted.extend(selectors.iter().map(PeerQuery::of));
                        }
                    }
                }
            }
        }
        let removed: Vec<PeerQuery> = self
            .peers
            .keys()
            .filter(|q| !wanted.contains(*q))
            .cloned()
            .collect();
        for q in &removed {
            self.peers.remove(q);
        }
        let added: Vec<PeerQuery> = wanted
            .into_iter()
            .filter(|q| !self.peers.contains_key(q))
            .collect();
        for q in &added {
            self.peers.insert(q.clone(), Store::default());
        }
        (added, removed)
    }
}
