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

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dnsfence_policy::EndpointConfig;
use dnsfence_policy::PolicyDoc;
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, watcher, Event};
use kube::{Api, Client};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::cluster::{Change, ClusterState, PeerQuery, PolicySource, Rejection};

/// At most this many Events a minute, whatever the number of invalid objects.
pub const EVENTS_PER_MINUTE: u32 = 30;

/// How long the controller gathers changes before publishing (a list of many objects
/// becomes one reconcile).
const SETTLE: Duration = Duration::from_millis(150);

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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabel {
    resource: String,
}

/// The Kubernetes front end's metrics.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    watch_errors: Family<ResourceLabel, Counter>,
    rejections: Counter,
    invalid: Gauge,
    events: Counter,
    events_suppressed: Counter,
    synced: Gauge,
    endpoints: Gauge,
    host_network: Gauge,
    publishes: Counter,
}

impl Metrics {
    /// Registers them under `k8s_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("k8s");
        r.register(
            "watch_errors",
            "Errors of the Kubernetes watches by resource (the last state stays in force)",
            self.watch_errors.clone(),
        );
        r.register(
            "policy_rejections",
            "Policy object versions rejected as invalid (the previous valid version stays in force)",
            self.rejections.clone(),
        );
        r.register(
            "invalid_policies",
            "Policy objects whose latest version is invalid",
            self.invalid.clone(),
        );
        r.register(
            "events",
            "Kubernetes Events posted about invalid policies",
            self.events.clone(),
        );
        r.register(
            "events_suppressed",
            "Events not posted: over the rate limit, or the API refused them",
            self.events_suppressed.clone(),
        );
        r.register(
            "synced",
            "1 once every watch has listed (before that nothing is reconciled)",
            self.synced.clone(),
        );
        r.register(
            "endpoints",
            "Endpoints from Kubernetes (this node's pods and peer pods)",
            self.endpoints.clone(),
        );
        r.register(
            "host_network_pods",
            "This node's host-network pods, which dnsfence never enforces",
            self.host_network.clone(),
        );
        r.register(
            "view_updates",
            "Cluster views handed to the agent",
            self.publishes.clone(),
        );
    }

    fn error(&self, resource: &str) {
        self.watch_errors
            .get_or_create(&ResourceLabel {
                resource: resource.to_owned(),
            })
            .inc();
    }
}

/// A message of a watcher task to the controller.
#[derive(Debug)]
enum Msg {
    Local(Change<Pod>),
    Namespace(Change<Namespace>),
    Service(Change<Service>),
    Policy(PolicySource, Change<Value>),
    Peer(PeerQuery, Change<Pod>),
    /// A Cilium CRD exists: start its watcher.
    CrdPresent(PolicySource),
    Error(String, String),
}

fn change<K>(e: Event<K>) -> Change<K> {
    match e {
        Event::Apply(k) => Change::Apply(k),
        Event::Delete(k) => Change::Delete(k),
        Event::Init => Change::Init,
        Event::InitApply(k) => Change::InitApply(k),
        Event::InitDone => Change::InitDone,
    }
}

/// First and last pause after a failed list or watch.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(800), Duration::from_secs(30));

/// How long a new peer list may hold back a view once everything else has listed (a
/// peer list that keeps failing must not freeze the node's state).
const PEER_GRACE: Duration = Duration::from_secs(5);

/// Forwards a watch stream to the controller until the controller is gone. After an
/// error it pauses, twice as long after each error in a row (up to 30 s). Only progress
/// resets the pause: kube's watcher reports `Init` before every list attempt, so a list
/// that keeps failing would otherwise be retried at once, forever.
async fn forward<K, S>(
    resource: String,
    stream: S,
    tx: mpsc::Sender<Msg>,
    wrap: impl Fn(Change<K>) -> Msg,
) where
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut pause = BACKOFF.0;
    while let Some(item) = stream.next().await {
        let (msg, failed) = match item {
            Ok(e) => {
                if !matches!(e, Event::Init) {
                    pause = BACKOFF.0;
                }
                (wrap(change(e)), false)
            }
            Err(e) => (Msg::Error(resource.clone(), e.to_string()), true),
        };
        if tx.send(msg).await.is_err() {
            return;
        }
        if failed {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(BACKOFF.1);
        }
    }
}

fn policy_api(client: &Client, source: PolicySource) -> Api<DynamicObject> {
    let (group, version) = source
        .api_version()
        .split_once('/')
        .unwrap_or(("", source.api_version()));
    let gvk = GroupVersionKind::gvk(group, version, source.kind());
    let ar = ApiResource::from_gvk_with_plural(&gvk, source.plural());
    Api::all_with(client.clone(), &ar)
}

fn spawn_policy_watch(
    client: &Client,
    source: PolicySource,
    tx: &mpsc::Sender<Msg>,
) -> JoinHandle<()> {
    let stream = watcher(policy_api(client, source), watcher::Config::default());
    let tx = tx.clone();
    tokio::spawn(forward(
        source.plural().to_owned(),
        stream,
        tx,
        move |c: Change<DynamicObject>| {
            Msg::Policy(
                source,
                match c {
                    Change::Apply(o) => Change::Apply(to_json(&o)),
                    Change::Delete(o) => Change::Delete(to_json(&o)),
                    Change::InitApply(o) => Change::InitApply(to_json(&o)),
                    Change::Init => Change::Init,
                    Change::InitDone => Change::InitDone,
                },
            )
        },
    ))
}

fn to_json(o: &DynamicObject) -> Value {
    serde_json::to_value(o).unwrap_or_default()
}

fn spawn_peer_watch(client: &Client, query: &PeerQuery, tx: &mpsc::Sender<Msg>) -> JoinHandle<()> {
    let api: Api<Pod> = match &query.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut config = watcher::Config::default();
    if !query.label_selector.is_empty() {
        config = config.labels(&query.label_selector);
    }
    let q = query.clone();
    tokio::spawn(forward(
        format!("pods(peers {})", query.label_selector),
        watcher(api, config),
        tx.clone(),
        move |c| Msg::Peer(q.clone(), c),
    ))
}

/// Polls for a Cilium CRD until it exists, then tells the controller.
async fn await_crd(client: Client, source: PolicySource, poll: Duration, tx: mpsc::Sender<Msg>) {
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let name = format!("{}.cilium.io", source.plural());
    loop {
        match api.get_opt(&name).await {
            Ok(Some(_)) => {
                let _ = tx.send(Msg::CrdPresent(source)).await;
                return;
            }
            Ok(None) => debug!(crd = %name, "not installed; looking again later"),
            Err(e) => {
                if tx
                    .send(Msg::Error(
                        "customresourcedefinitions".into(),
                        e.to_string(),
                    ))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// Whether the Cilium CRDs exist right now (`None`: cannot tell).
async fn crd_exists(client: &Client, source: PolicySource) -> Option<bool> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.get_opt(&format!("{}.cilium.io", source.plural()))
        .await
        .ok()
        .map(|o| o.is_some())
}

/// A token bucket for Events.
struct EventBudget {
    tokens: f64,
    at: Instant,
}

impl EventBudget {
    fn take(&mut self) -> bool {
        let per_sec = f64::from(EVENTS_PER_MINUTE) / 60.0;
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * per_sec)
            .min(f64::from(EVENTS_PER_MINUTE));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn reference(r: &Rejection) -> ObjectReference {
    ObjectReference {
        api_version: Some(r.source.api_version().to_owned()),
        kind: Some(r.source.kind().to_owned()),
        name: Some(r.name.clone()),
        namespace: r.namespace.clone(),
        uid: r.uid.clone(),
        // Per version: kube's recorder folds Events of one reference into a series and
        // keeps the first note, so each rejected version gets its own.
        resource_version: r.resource_version.clone(),
        ..Default::default()
    }
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
