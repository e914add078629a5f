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

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use dnsfence_policy::kube_names::{self, is_dns_label, is_label_value};
use dnsfence_policy::{EndpointSelector, Operator, Peer, Policy, PolicyLoader, NAMESPACE_LABEL};
use dnsfence_proxy::config::EndpointConfig;
use dnsfence_proxy::control::PolicyDoc;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use serde_json::{json, Value};

/// The label prefix of namespace labels on endpoints.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// The service account label.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// The cluster name label.
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// One watcher event, as `kube`'s watcher reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<T> {
    /// Created or modified.
    Apply(T),
    /// Deleted.
    Delete(T),
    /// A (re-)list starts.
    Init,
    /// An object of the list.
    InitApply(T),
    /// The list is complete: objects it did not name are gone.
    InitDone,
}

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

    fn key(&self) -> (String, String) {
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
fn pod_key(key: &str) -> bool {
    if key == NAMESPACE_LABEL || key.starts_with("io.cilium.k8s.") {
        return false;
    }
    kube_names::label_key(key).is_ok()
}

/// An invalid version of a policy object, to report as a Kubernetes Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Its kind.
    pub source: PolicySource,
    /// Namespace (namespaced kinds).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.resourceVersion` of the rejected version.
    pub resource_version: Option<String>,
    /// Every error, each naming its field (`spec.egress[0].toPorts[0]...: why`).
    pub problems: Vec<String>,
    /// Whether an earlier valid version stays in force.
    pub previous_in_force: bool,
}

impl Rejection {
    /// The Event's note: the first problems, then how many more.
    pub fn note(&self) -> String {
        let mut note = String::new();
        for p in self.problems.iter().take(3) {
            if !note.is_empty() {
                note.push_str("; ");
            }
            note.push_str(p);
        }
        if self.problems.len() > 3 {
            note.push_str(&format!("; and {} more", self.problems.len() - 3));
        }
        note.push_str(if self.previous_in_force {
            " (the previous valid version stays in force)"
        } else {
            " (not enforced)"
        });
        // Events notes are limited to 1 kB.
        if note.len() > 1000 {
            let mut end = 997;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        note
    }
}

type PolicyKey = (PolicySource, Option<String>, String);

/// A policy object: its last valid version and whether the latest one is invalid.
#[derive(Debug, Clone)]
struct PolicyEntry {
    /// `metadata.uid` of the object: a new object of the same name starts afresh.
    uid: Option<String>,
    valid: Option<(PolicyDoc, Vec<Policy>)>,
    /// Problems of the latest version (empty: it is the valid one).
    problems: Vec<String>,
    /// (uid, generation) of the latest version that was reported.
    reported: Option<(Option<String>, Option<i64>)>,
}

/// A store that applies a watcher's events; see the module docs for re-lists.
#[derive(Debug, Clone)]
struct Store<K: Ord, T> {
    items: BTreeMap<K, T>,
    listing: Option<BTreeSet<K>>,
    synced: bool,
}

impl<K: Ord, T> Default for Store<K, T> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            listing: None,
            synced: false,
        }
    }
}

impl<K: Ord + Clone, T: PartialEq> Store<K, T> {
    /// Applies `change` (already keyed); returns whether what the store holds changed,
    /// or it became synced.
    fn apply(&mut self, change: Change<(K, T)>) -> bool {
        match change {
            Change::Init => {
                self.listing = Some(BTreeSet::new());
                false
            }
            Change::InitApply((k, v)) => {
                if let Some(seen) = &mut self.listing {
                    seen.insert(k.clone());
                }
                self.upsert(k, v)
            }
            Change::Apply((k, v)) => self.upsert(k, v),
            Change::Delete((k, _)) => self.items.remove(&k).is_some(),
            Change::InitDone => {
                let first = !self.synced;
                self.synced = true;
                let Some(seen) = self.listing.take() else {
                    return first;
                };
                let before = self.items.len();
                self.items.retain(|k, _| seen.contains(k));
                first || before != self.items.len()
            }
        }
    }

    fn upsert(&mut self, k: K, v: T) -> bool {
        if self.items.get(&k) == Some(&v) {
            return false;
        }
        self.items.insert(k, v);
        true
    }
}

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

    /// Applies an event of a policy watcher: `object` is the object's JSON. Returns
    /// whether the policies in force changed.
    pub fn policy(&mut self, source: PolicySource, change: Change<Value>) -> bool {
        match change {
            Change::Init => {
                self.policy_listing.insert(source, BTreeSet::new());
                false
            }
            Change::InitDone => {
                let first = self.policy_synced.insert(source);
                let Some(seen) = self.policy_listing.remove(&source) else {
                    return first;
                };
                let gone: Vec<PolicyKey> = self
                    .policies
                    .keys()
                    .filter(|k| k.0 == source && !seen.contains(*k))
                    .cloned()
                    .collect();
                let mut changed = first;
                for k in gone {
                    changed |= self.remove_policy(&k);
                }
                changed
            }
            Change::Delete(object) => match policy_key(source, &object) {
                Some(k) => self.remove_policy(&k),
                None => false,
            },
            Change::Apply(object) | Change::InitApply(object) => {
                let Some(k) = policy_key(source, &object) else {
                    return false;
                };
                if let Some(seen) = self.policy_listing.get_mut(&source) {
                    seen.insert(k.clone());
                }
                self.upsert_policy(source, k, &object)
            }
        }
    }

    fn remove_policy(&mut self, k: &PolicyKey) -> bool {
        self.policies.remove(k).is_some_and(|e| e.valid.is_some())
    }

    fn upsert_policy(&mut self, source: PolicySource, k: PolicyKey, object: &Value) -> bool {
        let doc = PolicyDoc {
            file: format!(
                "{}/{}",
                source.kind(),
                match &k.1 {
                    Some(ns) => format!("{ns}/{}", k.2),
                    None => k.2.clone(),
                }
            ),
            text: serde_json::to_string(&essentials(source, object)).unwrap_or_default(),
        };
        let mut loader = PolicyLoader::new();
        loader.add(&doc.file, &doc.text);
        let problems: Vec<String> = loader
            .diagnostics()
            .iter()
            .filter(|d| d.is_error())
            .map(|d| format!("{}: {}", d.path, d.message))
            .collect();
        let uid = object["metadata"]["uid"].as_str().map(str::to_owned);
        let entry = self.policies.entry(k.clone()).or_insert(PolicyEntry {
            uid: uid.clone(),
            valid: None,
            problems: Vec::new(),
            reported: None,
        });
        if entry.uid != uid {
            // Deleted and created again while the watch was away: the old object's
            // rules are not a previous version of this one.
            *entry = PolicyEntry {
                uid,
                valid: None,
                problems: Vec::new(),
                reported: None,
            };
        }
        if problems.is_empty() {
            let (set, _) = loader.finish_after(&dnsfence_policy::PolicySet::default());
            let parsed: Vec<Policy> = set.policies().iter().map(|p| (**p).clone()).collect();
            let changed = entry.valid.as_ref().is_none_or(|(d, _)| d.text != doc.text);
            entry.valid = Some((doc, parsed));
            entry.problems.clear();
            entry.reported = None;
            return changed;
        }
        let meta = &object["metadata"];
        let version = (
            meta["uid"].as_str().map(str::to_owned),
            meta["generation"].as_i64(),
        );
        if entry.problems != problems || entry.reported.as_ref() != Some(&version) {
            if entry.reported.as_ref() != Some(&version) {
                self.rejections.push(Rejection {
                    source,
                    namespace: k.1.clone(),
                    name: k.2.clone(),
                    uid: version.0.clone(),
                    generation: version.1,
                    resource_version: meta["resourceVersion"].as_str().map(str::to_owned),
                    problems: problems.clone(),
                    previous_in_force: entry.valid.is_some(),
                });
            }
            entry.reported = Some(version);
            entry.problems = problems;
        }
        false
    }

    /// Rejections found since the last call, to report.
    pub fn take_rejections(&mut self) -> Vec<Rejection> {
        std::mem::take(&mut self.rejections)
    }

    /// Policy objects whose latest version is invalid.
    pub fn invalid_policies(&self) -> usize {
        self.policies
            .values()
            .filter(|e| !e.problems.is_empty())
            .count()
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

    /// The valid policy documents in force.
    pub fn policy_docs(&self) -> Vec<PolicyDoc> {
        self.policies
            .values()
            .filter_map(|e| e.valid.as_ref().map(|(d, _)| d.clone()))
            .collect()
    }

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
                    && svc.selector.iter().all(|(k, v)| e.labels.get(k) == Some(v))
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
                labels,
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
            labels,
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

fn map_change<T, U>(change: Change<T>, f: impl Fn(T) -> Option<U>) -> Option<Change<U>> {
    Some(match change {
        Change::Apply(t) => Change::Apply(f(t)?),
        Change::Delete(t) => Change::Delete(f(t)?),
        Change::InitApply(t) => Change::InitApply(f(t)?),
        Change::Init => Change::Init,
        Change::InitDone => Change::InitDone,
    })
}

fn keyed_pod(change: Change<Pod>) -> Option<Change<((String, String), PodInfo)>> {
    map_change(change, |pod: Pod| {
        let info = PodInfo::from_pod(&pod)?;
        Some((info.key(), info))
    })
}

fn policy_key(source: PolicySource, object: &Value) -> Option<PolicyKey> {
    let meta = &object["metadata"];
    let name = meta["name"].as_str()?.to_owned();
    let namespace = if source.namespaced() {
        Some(meta["namespace"].as_str().unwrap_or("default").to_owned())
    } else {
        None
    };
    Some((source, namespace, name))
}

/// What the policy engine reads of an object: kind and apiVersion (those of the watched
/// resource: list items carry none), name, namespace,
/// annotations and the spec(s); `managedFields` and the like stay out of snapshots.
fn essentials(source: PolicySource, object: &Value) -> Value {
    let meta = &object["metadata"];
    let mut metadata = json!({"name": meta["name"]});
    if source.namespaced() {
        metadata["namespace"] = meta["namespace"].clone();
    }
    if let Some(a) = meta.get("annotations").filter(|a| !a.is_null()) {
        metadata["annotations"] = a.clone();
    }
    let mut out = json!({
        "apiVersion": source.api_version(),
        "kind": source.kind(),
        "metadata": metadata,
    });
    for key in ["spec", "specs"] {
        if let Some(v) = object.get(key).filter(|v| !v.is_null()) {
            out[key] = v.clone();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, node: &str, labels: Value, ips: &[&str]) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": labels,
                         "resourceVersion": "1001", "managedFields": []},
            "spec": {"nodeName": node, "serviceAccountName": "billing-sa",
                     "containers": [{"name": "app", "image": "busybox"}]},
            "status": {"phase": "Running", "hostIP": "192.168.0.10",
                       "hostIPs": [{"ip": "192.168.0.10"}, {"ip": "fd00::10"}],
                       "podIP": ips.first().copied().unwrap_or_default(),
                       "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}
        }))
        .unwrap()
    }

    fn namespace(name: &str, labels: Value) -> Namespace {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        }))
        .unwrap()
    }

    fn egress_policy(ns: &str, name: &str, generation: i64, fqdn: &str) -> Value {
        json!({
            "apiVersion": "dnsfence.io/v1alpha1",
            "kind": "EgressPolicy",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                         "generation": generation, "resourceVersion": "77",
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": "billing"}},
                "egress": [
                    {"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system",
                                                      "k8s:k8s-app": "kube-dns"}}],
                     "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                                  "rules": {"dns": [{"matchPattern": "*"}]}}]},
                    {"toFQDNs": [{"matchName": fqdn}]}
                ]
            }
        })
    }

    fn synced_state() -> ClusterState {
        let mut s = ClusterState::new("node-1", "prod", [PolicySource::EgressPolicy]);
        for c in [Change::Init, Change::InitDone] {
            s.local_pod(c.clone());
            s.namespace(map_change(c.clone(), |_: Pod| None::<Namespace>).unwrap());
            s.service(map_change(c.clone(), |_: Pod| None::<Service>).unwrap());
            s.policy(
                PolicySource::EgressPolicy,
                map_change(c, |_: Pod| None::<Value>).unwrap(),
            );
        }
        s
    }

    #[test]
    fn pods_get_cilium_labels_and_dual_stack_addresses() {
        let mut s = synced_state();
        assert!(s.synced());
        s.namespace(Change::Apply(namespace("payments", json!({"team": "pay"}))));
        s.local_pod(Change::Apply(pod(
            "payments",
            "billing-1",
            "node-1",
            json!({"app": "billing"}),
            &["10.244.1.5", "fd00:244::5"],
        )));
        let eps = s.endpoints();
        assert_eq!(eps.len(), 1);
        let e = &eps[0];
        assert_eq!(
            (e.namespace.as_str(), e.name.as_str()),
            ("payments", "billing-1")
        );
        assert_eq!(
            e.ips,
            [
                "10.244.1.5".parse::<IpAddr>().unwrap(),
                "fd00:244::5".parse().unwrap()
            ]
        );
        assert!(!e.remote);
        assert_eq!(e.labels["app"], "billing");
        assert_eq!(e.labels["io.cilium.k8s.namespace.labels.team"], "pay");
        assert_eq!(e.labels[SERVICE_ACCOUNT_LABEL], "billing-sa");
        assert_eq!(e.labels[CLUSTER_LABEL], "prod");
        assert_eq!(
            s.host_ips(),
            [
                "192.168.0.10".parse::<IpAddr>().unwrap(),
                "fd00::10".parse().unwrap()
            ]
        );
    }

    #[test]
    fn host_network_terminal_and_foreign_pods_are_not_endpoints() {
        let mut s = synced_state();
        let mut host = pod(
            "kube-system",
            "kube-proxy",
            "node-1",
            json!({}),
            &["192.168.0.10"],
        );
        host.spec.as_mut().unwrap().host_network = Some(true);
        s.local_pod(Change::Apply(host));
        let mut done = pod("default", "job-1", "node-1", json!({}), &["10.244.1.9"]);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        s.local_pod(Change::Apply(done));
        s.local_pod(Change::Apply(pod(
            "default",
            "elsewhere",
            "node-2",
            json!({}),
            &["10.244.2.9"],
        )));
        s.local_pod(Change::Apply(pod(
            "default",
            "pending",
            "node-1",
            json!({}),
            &[],
        )));
        assert!(s.endpoints().is_empty(), "{:?}", s.endpoints());
        assert_eq!(s.host_network_pods(), ["kube-system/kube-proxy"]);
    }

    #[test]
    fn pod_deletion_removes_the_endpoint() {
        let mut s = synced_state();
        let p = pod(
            "default",
            "web-1",
            "node-1",
            json!({"app": "web"}),
            &["10.244.1.7"],
        );
        assert!(s.local_pod(Change::Apply(p.clone())));
        assert!(
            !s.local_pod(Change::Apply(p.clone())),
            "same object: no change"
        );
        assert_eq!(s.endpoints().len(), 1);
        assert!(s.local_pod(Change::Delete(p)));
        assert!(s.endpoints().is_empty());
    }

    #[test]
    fn relist_keeps_state_until_done_and_then_prunes() {
        let mut s = synced_state();
        s.local_pod(Change::Apply(pod(
            "default",
            "a",
            "node-1",
            json!({}),
            &["10.244.1.1"],
        )));
        s.local_pod(Change::Apply(pod(
            "default",
            "b",
            "node-1",
            json!({}),
            &["10.244.1.2"],
        )));
        s.local_pod(Change::Init);
        s.local_pod(Change::InitApply(pod(
            "default",
            "a",
            "node-1",
            json!({}),
            &["10.244.1.1"],
        )));
        assert_eq!(
            s.endpoints().len(),
            2,
            "b stays while the list is incomplete"
        );
        assert!(s.local_pod(Change::InitDone));
        let names: Vec<_> = s.endpoints().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["a"]);
    }

    #[test]
    fn waits_for_every_required_list() {
        let mut s = ClusterState::new(
            "n",
            "default",
            [
                PolicySource::EgressPolicy,
                PolicySource::ClusterEgressPolicy,
            ],
        );
        s.local_pod(Change::InitDone);
        s.namespace(Change::InitDone);
        s.service(Change::InitDone);
        s.policy(PolicySource::EgressPolicy, Change::InitDone);
        assert!(!s.synced());
        assert_eq!(s.waiting_for(), ["clusteregresspolicies"]);
        s.policy(PolicySource::ClusterEgressPolicy, Change::InitDone);
        assert!(s.synced());
    }

    #[test]
    fn valid_policy_is_in_force_with_its_peer_query() {
        let mut s = synced_state();
        assert!(s.policy(
            PolicySource::EgressPolicy,
            Change::Apply(egress_policy(
                "payments",
                "allow-stripe",
                1,
                "api.stripe.com"
            ))
        ));
        let docs = s.policy_docs();
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].file, "EgressPolicy/payments/allow-stripe");
        assert!(!docs[0].text.contains("managedFields"), "{}", docs[0].text);
        let (added, removed) = s.update_peer_queries();
        assert!(removed.is_empty());
        assert_eq!(
            added,
            [PeerQuery {
                namespace: Some("kube-system".into()),
                label_selector: "k8s-app=kube-dns".into()
            }]
        );
        assert!(!s.synced(), "the new peer list is not there yet");
        let q = added[0].clone();
        s.peer_pod(
            &q,
            Change::InitApply(pod(
                "kube-system",
                "coredns-1",
                "node-2",
                json!({"k8s-app": "kube-dns"}),
                &["10.244.2.53"],
            )),
        );
        s.peer_pod(&q, Change::InitDone);
        assert!(s.synced());
        let eps = s.endpoints();
        assert_eq!(eps.len(), 1);
        assert!(eps[0].remote);
    }

    #[test]
    fn invalid_version_is_reported_once_and_the_valid_one_stays() {
        let mut s = synced_state();
        s.policy(
            PolicySource::EgressPolicy,
            Change::Apply(egress_policy("payments", "p", 1, "api.stripe.com")),
        );
        let before = s.policy_docs();
        let mut bad = egress_policy("payments", "p", 2, "api.stripe.com");
        bad["spec"]["egress"][1]["toPorts"] =
            json!([{"ports": [{"port": "443"}], "rules": {"http": [{"path": "/"}]}}]);
        assert!(!s.policy(PolicySource::EgressPolicy, Change::Apply(bad.clone())));
        assert_eq!(
            s.policy_docs(),
            before,
            "the previous valid version stays in force"
        );
        let rejections = s.take_rejections();
        assert_eq!(rejections.len(), 1);
        let r = &rejections[0];
        assert_eq!(r.generation, Some(2));
        assert!(r.previous_in_force);
        assert!(
            r.note().contains("spec.egress[1].toPorts[0].rules.http"),
            "{}",
            r.note()
        );
        assert_eq!(s.invalid_policies(), 1);
        // The same generation again (a re-list, a status update): no second report.
        s.policy(PolicySource::EgressPolicy, Change::Apply(bad));
        assert!(s.take_rejections().is_empty());
        // Fixed: in force, no longer invalid.
        assert!(s.policy(
            PolicySource::EgressPolicy,
            Change::Apply(egress_policy("payments", "p", 3, "api.github.com"))
        ));
        assert_eq!(s.invalid_policies(), 0);
        assert!(s.policy_docs()[0].text.contains("api.github.com"));
    }

    #[test]
    fn invalid_new_object_is_not_enforced() {
        let mut s = synced_state();
        let mut bad = egress_policy("default", "typo", 1, "x.example");
        bad["spec"]["egress"][1] = json!({"toFQDN": [{"matchName": "x.example"}]});
        s.policy(PolicySource::EgressPolicy, Change::Apply(bad));
        assert!(s.policy_docs().is_empty());
        let r = s.take_rejections();
        assert!(!r[0].previous_in_force);
        assert!(r[0].note().contains("toFQDN"), "{}", r[0].note());
    }

    #[test]
    fn deleting_a_policy_lifts_it_and_its_peer_query() {
        let mut s = synced_state();
        let p = egress_policy("payments", "p", 1, "api.stripe.com");
        s.policy(PolicySource::EgressPolicy, Change::Apply(p.clone()));
        s.update_peer_queries();
        assert!(s.policy(PolicySource::EgressPolicy, Change::Delete(p)));
        assert!(s.policy_docs().is_empty());
        let (added, removed) = s.update_peer_queries();
        assert!(added.is_empty());
        assert_eq!(removed.len(), 1);
    }

    #[test]
    fn policy_relist_removes_objects_deleted_meanwhile() {
        let mut s = synced_state();
        s.policy(
            PolicySource::EgressPolicy,
            Change::Apply(egress_policy("a", "kept", 1, "a.example")),
        );
        s.policy(
            PolicySource::EgressPolicy,
            Change::Apply(egress_policy("a", "gone", 1, "b.example")),
        );
        s.policy(PolicySource::EgressPolicy, Change::Init);
        s.policy(
            PolicySource::EgressPolicy,
            Change::InitApply(egress_policy("a", "kept", 1, "a.example")),
        );
        assert_eq!(s.policy_docs().len(), 2);
        assert!(s.policy(PolicySource::EgressPolicy, Change::InitDone));
        assert_eq!(s.policy_docs().len(), 1);
    }

    #[test]
    fn peer_query_drops_terms_pods_cannot_match() {
        let selector = EndpointSelector {
            selector: dnsfence_policy::LabelSelector {
                match_labels: [
                    (
                        "io.cilium.k8s.namespace.labels.team".to_owned(),
                        "x".to_owned(),
                    ),
                    ("app".to_owned(), "db".to_owned()),
                ]
                .into(),
                match_expressions: vec![dnsfence_policy::Requirement {
                    key: "tier".into(),
                    operator: Operator::NotIn,
                    values: ["a".to_owned(), "b".to_owned()].into(),
                }],
            },
            namespace: Some("shop".into()),
        };
        assert_eq!(
            PeerQuery::of(&selector),
            PeerQuery {
                namespace: Some("shop".into()),
                label_selector: "app=db,tier notin (a,b)".into()
            }
        );
    }

    #[test]
    fn a_service_of_a_peer_is_a_remote_endpoint_with_its_labels() {
        let mut s = synced_state();
        s.policy(
            PolicySource::EgressPolicy,
            Change::Apply(egress_policy("payments", "p", 1, "api.stripe.com")),
        );
        let (added, _) = s.update_peer_queries();
        s.peer_pod(
            &added[0],
            Change::InitApply(pod(
                "kube-system",
                "coredns-1",
                "node-2",
                json!({"k8s-app": "kube-dns"}),
                &["10.244.2.53"],
            )),
        );
        s.peer_pod(&added[0], Change::InitDone);
        let svc = |selector: Value, ip: &str| -> Service {
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "kube-dns", "namespace": "kube-system"},
                "spec": {"selector": selector, "clusterIP": ip, "clusterIPs": [ip],
                         "ports": [{"port": 53, "protocol": "UDP"}]}
            }))
            .unwrap()
        };
        s.service(Change::Apply(svc(
            json!({"k8s-app": "kube-dns"}),
            "10.96.0.10",
        )));
        let eps = s.endpoints();
        let service = eps.iter().find(|e| e.name == "service:kube-dns").unwrap();
        assert!(service.remote);
        assert_eq!(service.ips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(service.labels["k8s-app"], "kube-dns");
        // A Service selecting no known pod, or a headless one, is not an endpoint.
        s.service(Change::Apply(svc(
            json!({"k8s-app": "other"}),
            "10.96.0.10",
        )));
        assert!(s
            .endpoints()
            .iter()
            .all(|e| !e.name.starts_with("service:")));
        s.service(Change::Apply(svc(json!({"k8s-app": "kube-dns"}), "None")));
        assert!(s
            .endpoints()
            .iter()
            .all(|e| !e.name.starts_with("service:")));
    }

    #[test]
    fn label_terms_follow_the_api_servers_rules() {
        for ok in ["app", "k8s-app", "app.kubernetes.io/name", "a_b.c"] {
            assert!(pod_key(ok), "{ok}");
        }
        // The prefix is capped at 253 in all, not each of its labels at 63.
        assert!(pod_key(&format!("{}.io/x", "a".repeat(64))));
        for bad in [
            "-app",
            "App.io/x",
            "a/b/c",
            "x/",
            "/x",
            "a_b/c",
            &"a".repeat(64),
        ] {
            assert!(!pod_key(bad), "{bad}");
        }
        for ok in ["", "kube-dns", "v1.2_3"] {
            assert!(is_label_value(ok), "{ok}");
        }
        for bad in ["-dns", "dns-", "a b", &"a".repeat(64)] {
            assert!(!is_label_value(bad), "{bad}");
        }
    }

    #[test]
    fn a_pod_cannot_claim_its_namespaces_labels() {
        let mut s = synced_state();
        s.namespace(Change::Apply(namespace("tenant", json!({}))));
        s.local_pod(Change::Apply(pod(
            "tenant",
            "sneaky",
            "node-1",
            json!({"app": "x", "io.cilium.k8s.namespace.labels.egress": "internet",
                   "io.cilium.k8s.policy.serviceaccount": "admin"}),
            &["10.244.1.66"],
        )));
        let e = &s.endpoints()[0];
        assert!(
            !e.labels
                .contains_key("io.cilium.k8s.namespace.labels.egress"),
            "{e:?}"
        );
        assert_eq!(e.labels[SERVICE_ACCOUNT_LABEL], "billing-sa");
        assert_eq!(e.labels["app"], "x");
    }

    #[test]
    fn an_address_belongs_to_one_endpoint_the_live_pod_first() {
        let mut s = synced_state();
        let mut old = pod(
            "default",
            "old",
            "node-1",
            json!({"app": "a"}),
            &["10.244.1.8"],
        );
        old.metadata.deletion_timestamp =
            Some(serde_json::from_value(json!("2026-11-28T00:00:00Z")).unwrap());
        s.local_pod(Change::Apply(old));
        s.local_pod(Change::Apply(pod(
            "default",
            "new",
            "node-1",
            json!({"app": "b"}),
            &["10.244.1.8"],
        )));
        let names: Vec<_> = s.endpoints().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["new"]);
    }

    #[test]
    fn a_service_carries_only_the_labels_all_its_pods_have() {
        let mut s = synced_state();
        let mut p = egress_policy("payments", "p", 1, "api.stripe.com");
        p["spec"]["egress"][0]["toEndpoints"] =
            json!([{"matchLabels": {"app": "web", "tier": "public"}}]);
        s.policy(PolicySource::EgressPolicy, Change::Apply(p));
        let (added, _) = s.update_peer_queries();
        s.peer_pod(
            &added[0],
            Change::InitApply(pod(
                "payments",
                "web-public",
                "node-2",
                json!({"app": "web", "tier": "public"}),
                &["10.244.2.7"],
            )),
        );
        s.peer_pod(&added[0], Change::InitDone);
        let svc: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "payments"},
            "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.7.7"}
        }))
        .unwrap();
        s.service(Change::Apply(svc));
        let eps = s.endpoints();
        let e = eps.iter().find(|e| e.name == "service:web").unwrap();
        assert_eq!(e.labels.get("app").map(String::as_str), Some("web"));
        assert!(!e.labels.contains_key("tier"), "{e:?}");
    }

    #[test]
    fn a_policy_created_again_under_the_same_name_starts_afresh() {
        let mut s = synced_state();
        s.policy(
            PolicySource::EgressPolicy,
            Change::Apply(egress_policy("a", "p", 1, "old.example")),
        );
        let mut again = egress_policy("a", "p", 1, "x.example");
        again["metadata"]["uid"] = json!("another-uid");
        again["spec"]["egress"][1] = json!({"toFQDN": []});
        s.policy(PolicySource::EgressPolicy, Change::Apply(again));
        assert!(
            s.policy_docs().is_empty(),
            "the deleted object's rules are gone"
        );
    }

    #[test]
    fn a_namespace_the_api_refuses_widens_the_peer_query() {
        let selector = EndpointSelector {
            selector: dnsfence_policy::LabelSelector {
                match_labels: [(NAMESPACE_LABEL.to_owned(), "a/b".to_owned())].into(),
                match_expressions: Vec::new(),
            },
            namespace: None,
        };
        assert_eq!(PeerQuery::of(&selector).namespace, None);
    }
}
