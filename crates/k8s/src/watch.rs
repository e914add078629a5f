//! The watchers: `kube` list+watch streams feeding one controller task that owns the
//! [`ClusterState`] and publishes a [`ClusterView`] whenever what the node enforces
//! changes.
//!
//! - Pods of this node (`spec.nodeName` field selector), namespaces, Services (see
//!   [`crate::cluster`] for why), the policy kinds,
//!   and, per distinct `toEndpoints` selector, the peer pods it may select (a label- and
//!   namespace-filtered watch, cluster-wide only where the selector is).
//! - Watches resume from resource versions; `410 Gone` and lost connections re-list
//!   (kube's watcher), with exponential backoff that only progress resets. Errors (`403` from missing RBAC, the API
//!   server down) are logged and counted and the last state stays in force.
//! - Nothing is published before every watcher has listed once, so a restarting agent
//!   never reconciles the kernel with half a cluster. A peer list that a new policy
//!   needs holds views back for at most 5 s, so one failing list cannot freeze the rest.
//! - Invalid policy versions become Warning Events on the object, at most one per object
//!   generation and at most [`EVENTS_PER_MINUTE`] in all.
//!
//! Layout: the watch streams and their messages (`streams`), the Events budget
//! (`events`), the metrics (`metrics`); the controller loop ([`run`]) here.

mod events;
mod metrics;
mod streams;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dnsfence_policy::{EndpointConfig, PolicyDoc};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, watcher};
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub use events::EVENTS_PER_MINUTE;
pub use metrics::Metrics;

use crate::cluster::{ClusterState, PeerQuery, PolicySource};
use events::{reference, EventBudget};
use streams::{await_crd, crd_exists, forward, spawn_peer_watch, spawn_policy_watch, Msg};

/// How long the controller gathers changes before publishing (a list of many objects
/// becomes one reconcile).
const SETTLE: Duration = Duration::from_millis(150);

/// How long a new peer list may hold back a view once everything else has listed (a
/// peer list that keeps failing must not freeze the node's state).
const PEER_GRACE: Duration = Duration::from_secs(5);

/// What the agent enforces from the cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    /// Valid policy objects, one document each.
    pub docs: Vec<PolicyDoc>,
    /// This node's pods (enforced) and peer pods (remote).
    pub endpoints: Vec<EndpointConfig>,
    /// The node's addresses.
    pub host_ips: Vec<IpAddr>,
    /// Host-network pods of this node (not enforced).
    pub host_network_pods: Vec<String>,
    /// Policy objects whose latest version is invalid.
    pub invalid_policies: usize,
}

/// What to watch.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node.
    pub node: String,
    /// `io.cilium.k8s.policy.cluster`.
    pub cluster_name: String,
    /// Also CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy, when their CRDs exist.
    pub watch_cilium_policies: bool,
    /// Who reports Events (the agent's pod name when known).
    pub instance: Option<String>,
    /// How often to look for the Cilium CRDs while they are absent.
    pub crd_poll: Duration,
}

/// Runs the watchers and the controller until `out` has no receiver left. Publishes
/// `Some(view)` once everything listed, then on every change.
pub async fn run(
    client: Client,
    settings: Settings,
    out: watch::Sender<Option<Arc<ClusterView>>>,
    metrics: Metrics,
) {
    let (tx, mut rx) = mpsc::channel::<Msg>(1024);
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let mut required = vec![
        PolicySource::EgressPolicy,
        PolicySource::ClusterEgressPolicy,
    ];
    if settings.watch_cilium_policies {
        for source in [
            PolicySource::CiliumNetworkPolicy,
            PolicySource::CiliumClusterwideNetworkPolicy,
        ] {
            // A CRD present now is waited for; one that appears later is watched then.
            if crd_exists(&client, source).await == Some(true) {
                required.push(source);
                tasks.push(spawn_policy_watch(&client, source, &tx));
            } else {
                info!(kind = source.kind(), "CRD not installed; watching for it");
                tasks.push(tokio::spawn(await_crd(
                    client.clone(),
                    source,
                    settings.crd_poll,
                    tx.clone(),
                )));
            }
        }
    }
    let mut state = ClusterState::new(&settings.node, &settings.cluster_name, required);
    tasks.push(tokio::spawn(forward(
        "pods".to_owned(),
        watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node)),
        ),
        tx.clone(),
        Msg::Local,
    )));
    tasks.push(tokio::spawn(forward(
        "namespaces".to_owned(),
        watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        ),
        tx.clone(),
        Msg::Namespace,
    )));
    tasks.push(tokio::spawn(forward(
        "services".to_owned(),
        watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        ),
        tx.clone(),
        Msg::Service,
    )));
    for source in [
        PolicySource::EgressPolicy,
        PolicySource::ClusterEgressPolicy,
    ] {
        tasks.push(spawn_policy_watch(&client, source, &tx));
    }
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "dnsfence-agent".into(),
            instance: settings.instance.clone(),
        },
    );
    let mut budget = EventBudget {
        tokens: f64::from(EVENTS_PER_MINUTE),
        at: Instant::now(),
    };
    let mut peers: BTreeMap<PeerQuery, JoinHandle<()>> = BTreeMap::new();
    let mut last: Option<Arc<ClusterView>> = None;
    let mut announced_wait = Instant::now();
    // Since when new peer lists hold back views.
    let mut peers_pending: Option<tokio::time::Instant> = None;
    // Whether that grace has run out (then it no longer wakes the loop).
    let mut grace_fired = false;
    'outer: loop {
        // One message, then whatever else arrives while things settle; or the end of the
        // peers' grace.
        let grace_end = peers_pending
            .filter(|_| !grace_fired)
            .map(|since| since + PEER_GRACE);
        let first = tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => Some(m),
                None => break,
            },
            () = async { tokio::time::sleep_until(grace_end.unwrap_or_else(tokio::time::Instant::now)).await }, if grace_end.is_some() => None,
        };
        let mut policies_changed = match first {
            Some(m) => handle(&mut state, m, &client, &tx, &mut tasks, &metrics),
            None => false,
        };
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(msg)) => {
                    policies_changed |= handle(&mut state, msg, &client, &tx, &mut tasks, &metrics);
                }
                Ok(None) => break 'outer,
                Err(_) => break,
            }
        }
        if policies_changed {
            let (added, removed) = state.update_peer_queries();
            for q in removed {
                debug!(?q, "peer watch stopped");
                if let Some(t) = peers.remove(&q) {
                    t.abort();
                }
            }
            if !added.is_empty() {
                // New peers get their own grace, even when older ones are still late.
                peers_pending = Some(tokio::time::Instant::now());
                grace_fired = false;
            }
            for q in added {
                debug!(?q, "peer watch started");
                peers.insert(q.clone(), spawn_peer_watch(&client, &q, &tx));
            }
        }
        for r in state.take_rejections() {
            metrics.rejections.inc();
            warn!(
                kind = r.source.kind(),
                namespace = r.namespace.as_deref().unwrap_or(""),
                name = %r.name,
                "policy rejected: {}",
                r.note()
            );
            if !budget.take() {
                metrics.events_suppressed.inc();
                continue;
            }
            let recorder = recorder.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let event = KubeEvent {
                    type_: EventType::Warning,
                    reason: "InvalidPolicy".into(),
                    note: Some(r.note()),
                    action: "Validate".into(),
                    secondary: None,
                };
                match recorder.publish(&event, &reference(&r)).await {
                    Ok(()) => {
                        metrics.events.inc();
                    }
                    Err(e) => {
                        metrics.events_suppressed.inc();
                        warn!(error = %e, name = %r.name, "cannot post the Event");
                    }
                }
            });
        }
        metrics
            .invalid
            .set(i64::try_from(state.invalid_policies()).unwrap_or(i64::MAX));
        if state.peers_synced() {
            peers_pending = None;
            grace_fired = false;
        } else if peers_pending.is_none() {
            peers_pending = Some(tokio::time::Instant::now());
        }
        let peers_late = peers_pending.is_some_and(|since| since.elapsed() >= PEER_GRACE);
        grace_fired |= peers_late;
        if !state.base_synced() || (!state.peers_synced() && !peers_late) {
            if announced_wait.elapsed() > Duration::from_secs(10) {
                announced_wait = Instant::now();
                info!(waiting_for = ?state.waiting_for(), "waiting for lists; the last state stays in force");
            }
            continue;
        }
        if peers_late && !state.peers_synced() {
            debug!(waiting_for = ?state.waiting_for(), "peer lists late: publishing without them");
        }
        metrics.synced.set(1);
        let view = ClusterView {
            docs: state.policy_docs(),
            endpoints: state.endpoints(),
            host_ips: state.host_ips(),
            host_network_pods: state.host_network_pods(),
            invalid_policies: state.invalid_policies(),
        };
        if last.as_deref() == Some(&view) {
            continue;
        }
        for pod in &view.host_network_pods {
            if last
                .as_deref()
                .is_none_or(|l| !l.host_network_pods.contains(pod))
            {
                info!(%pod, "host-network pod not enforced: it shares the node's addresses");
            }
        }
        metrics
            .endpoints
            .set(i64::try_from(view.endpoints.len()).unwrap_or(i64::MAX));
        metrics
            .host_network
            .set(i64::try_from(view.host_network_pods.len()).unwrap_or(i64::MAX));
        let view = Arc::new(view);
        last = Some(view.clone());
        metrics.publishes.inc();
        if out.send(Some(view)).is_err() {
            break;
        }
    }
    for t in tasks.into_iter().chain(peers.into_values()) {
        t.abort();
    }
}

/// Applies one message; returns whether the policies in force changed.
fn handle(
    state: &mut ClusterState,
    msg: Msg,
    client: &Client,
    tx: &mpsc::Sender<Msg>,
    tasks: &mut Vec<JoinHandle<()>>,
    metrics: &Metrics,
) -> bool {
    match msg {
        Msg::Local(c) => {
            state.local_pod(c);
            false
        }
        Msg::Namespace(c) => {
            state.namespace(c);
            false
        }
        Msg::Service(c) => {
            state.service(c);
            false
        }
        Msg::Peer(q, c) => {
            state.peer_pod(&q, c);
            false
        }
        Msg::Policy(source, c) => state.policy(source, c),
        Msg::CrdPresent(source) => {
            info!(kind = source.kind(), "CRD installed; watching its objects");
            tasks.push(spawn_policy_watch(client, source, tx));
            false
        }
        Msg::Error(resource, error) => {
            metrics.error(&resource);
            warn!(%resource, %error, "watch failed; retrying with backoff, the last state stays in force");
            false
        }
    }
}

/// A client from `kubeconfig`, else the in-cluster service account, else `KUBECONFIG` /
/// `~/.kube/config`.
pub async fn connect(kubeconfig: Option<&std::path::Path>) -> Result<Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| e.to_string())?,
    };
    Client::try_from(config).map_err(|e| e.to_string())
}
