//! The watchers and controller ([`dnsfence_k8s::watch::run`]) against a fake API server
//! that speaks the real API's JSON over real HTTP ([`FakeApiServer`]): kube's client,
//! retry layer and watcher make their real list and watch requests, and the tests assert
//! the [`ClusterView`]s the agent would enforce: the first view only once every list is
//! done, watch events, resume after `410 Gone`, RBAC `403`, the API server down, Warning
//! Events for invalid policy versions, and the Cilium kinds.
//!
//! Each test has its own server and agent, so they run in parallel. Waits poll with a
//! deadline ([`WAIT`]); the only fixed waits are the short windows in which a test
//! asserts that something does *not* happen ([`QUIET`], longer than the controller's
//! settle time), each opened only after a sync point shows the controller has seen the
//! messages that could have caused it.

#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dnsfence_fakeapi::FakeApiServer;
use dnsfence_k8s::watch::{run, ClusterView, Metrics, Settings};
use dnsfence_policy::EndpointConfig;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const NODE: &str = "node-1";
/// How long a test waits for something that must happen.
const WAIT: Duration = Duration::from_secs(10);
/// How long a test watches for something that must not happen (the controller publishes
/// within its 150 ms settle time of the messages that cause it).
const QUIET: Duration = Duration::from_millis(400);

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": labels},
           "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

fn pod(ns: &str, name: &str, node: &str, labels: Value, ips: &[&str]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels,
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                          "name": format!("{name}-rs"), "uid": "rs-uid",
                                          "controller": true}]},
        "spec": {"nodeName": node, "serviceAccountName": "billing-sa",
                 "containers": [{"name": "app", "image": "registry.example/app:1"}]},
        "status": {"phase": "Running", "hostIP": "192.168.0.10",
                   "hostIPs": [{"ip": "192.168.0.10"}, {"ip": "fd00::10"}],
                   "podIP": ips[0],
                   "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
                   "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

/// The usual shape: DNS to kube-dns (any name), then the FQDNs.
fn spec(fqdn: &str) -> Value {
    json!({
        "endpointSelector": {"matchLabels": {"app": "billing"}},
        "egress": [
            {"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system",
                                              "k8s:k8s-app": "kube-dns"}}],
             "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                          "rules": {"dns": [{"matchPattern": "*"}]}}]},
            {"toFQDNs": [{"matchName": fqdn}],
             "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}
        ]
    })
}

fn egress_policy(ns: &str, name: &str, fqdn: &str) -> Value {
    json!({"apiVersion": "dnsfence.io/v1alpha1", "kind": "EgressPolicy",
           "metadata": {"name": name, "namespace": ns}, "spec": spec(fqdn)})
}

/// A namespace with labels, a pod on this node (dual stack), one of the same app on
/// another node, CoreDNS on another node with its Service, and a policy for the app.
fn seed(api: &FakeApiServer) {
    api.apply("namespaces", namespace("payments", json!({"team": "pay"})));
    api.apply(
        "namespaces",
        namespace(
            "kube-system",
            json!({"kubernetes.io/metadata.name": "kube-system"}),
        ),
    );
    api.apply(
        "pods",
        pod(
            "payments",
            "billing-1",
            NODE,
            json!({"app": "billing"}),
            &["10.244.1.5", "fd00:244::5"],
        ),
    );
    api.apply(
        "pods",
        pod(
            "payments",
            "billing-2",
            "node-2",
            json!({"app": "billing"}),
            &["10.244.2.5"],
        ),
    );
    api.apply(
        "pods",
        pod(
            "kube-system",
            "coredns-1",
            "node-2",
            json!({"k8s-app": "kube-dns"}),
            &["10.244.2.53"],
        ),
    );
    api.apply(
        "services",
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "kube-dns", "namespace": "kube-system"},
               "spec": {"selector": {"k8s-app": "kube-dns"}, "clusterIP": "10.96.0.10",
                        "clusterIPs": ["10.96.0.10"], "type": "ClusterIP",
                        "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}),
    );
    api.apply(
        "egresspolicies",
        egress_policy("payments", "allow-stripe", "api.stripe.com"),
    );
}

/// The agent's Kubernetes front end, running against a server.
struct Agent {
    rx: watch::Receiver<Option<Arc<ClusterView>>>,
    /// Every view published, in order (collected as they come).
    views: Arc<Mutex<Vec<Arc<ClusterView>>>>,
    registry: Registry,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn start(api: &FakeApiServer, watch_cilium_policies: bool) -> Agent {
    let config = kube::Config::new(api.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let (tx, rx) = watch::channel(None);
    let metrics = Metrics::default();
    let mut registry = Registry::with_prefix("dnsfence");
    metrics.register(&mut registry);
    let settings = Settings {
        node: NODE.into(),
        cluster_name: "prod".into(),
        watch_cilium_policies,
        instance: Some("dnsfence-agent-7x2k9".into()),
        crd_poll: Duration::from_millis(200),
    };
    let controller = tokio::spawn(run(client, settings, tx, metrics));
    let views = Arc::new(Mutex::new(Vec::new()));
    let mut collect_rx = rx.clone();
    let collected = views.clone();
    let collector = tokio::spawn(async move {
        while collect_rx.changed().await.is_ok() {
            let view = collect_rx.borrow_and_update().clone();
            if let Some(v) = view {
                collected.lock().unwrap().push(v);
            }
        }
    });
    Agent {
        rx,
        views,
        registry,
        tasks: vec![controller, collector],
    }
}

impl Agent {
    /// Waits until the last view published satisfies `pred` (as collected, so that
    /// [`Agent::views`] has it too).
    async fn view_where(
        &self,
        api: &FakeApiServer,
        what: &str,
        pred: impl Fn(&ClusterView) -> bool,
    ) -> Arc<ClusterView> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let last = self.views.lock().unwrap().last().cloned();
            if let Some(v) = last.filter(|v| pred(v)) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no view where {what} within {WAIT:?}\nlast view: {:#?}\nmetrics:\n{}\nrequests:\n{}",
                self.current(),
                self.metrics(),
                api.requests().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The metrics, as the agent's `/metrics` would serve them.
    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }

    /// The sum of the samples whose name (with labels) starts with `prefix`.
    fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn views(&self) -> Vec<Arc<ClusterView>> {
        self.views.lock().unwrap().clone()
    }

    fn current(&self) -> Option<Arc<ClusterView>> {
        self.rx.borrow().clone()
    }
}

/// Polls `cond` until it holds; panics with `diag()` after [`WAIT`].
async fn eventually(what: &str, mut cond: impl FnMut() -> bool, diag: impl Fn() -> String) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {WAIT:?}: {what}\n{}",
            diag()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn endpoint<'a>(view: &'a ClusterView, ns: &str, name: &str) -> Option<&'a EndpointConfig> {
    view.endpoints
        .iter()
        .find(|e| e.namespace == ns && e.name == name)
}

fn has(view: &ClusterView, ns: &str, name: &str) -> bool {
    endpoint(view, ns, name).is_some()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|ip| ip.parse().unwrap()).collect()
}

/// The full view of [`seed`]: the local pod, the peer, the policy.
fn seeded(v: &ClusterView) -> bool {
    has(v, "payments", "billing-1") && has(v, "kube-system", "coredns-1") && v.docs.len() == 1
}

/// How many requests of the log satisfy `pred`.
fn count(api: &FakeApiServer, pred: impl Fn(&str) -> bool) -> usize {
    api.requests().iter().filter(|r| pred(r)).count()
}

fn is_watch(r: &str) -> bool {
    r.contains("watch=true") || r.contains("watch=1")
}

const LOCAL_PODS_LIST: &str = "GET /api/v1/pods?fieldSelector=spec.nodeName=node-1&";

fn local_pods_list(r: &str) -> bool {
    r.starts_with(LOCAL_PODS_LIST) && !is_watch(r)
}

fn local_pods_watch(r: &str) -> bool {
    r.starts_with("GET /api/v1/pods?")
        && is_watch(r)
        && r.contains("fieldSelector=spec.nodeName=node-1")
}

fn peer_watch(r: &str) -> bool {
    r.starts_with("GET /api/v1/namespaces/kube-system/pods?")
        && is_watch(r)
        && r.contains("labelSelector=k8s-app=kube-dns")
}

/// Waits until the controller has handled every message queued before now: the watch
/// error count of `resource` (which the controller increments as it handles each error,
/// in channel order) moves past its current value. Needs `resource` to be failing.
async fn controller_caught_up(agent: &Agent, api: &FakeApiServer, resource: &str) {
    let key = format!("dnsfence_k8s_watch_errors_total{{resource=\"{resource}\"}}");
    let before = agent.metric(&key);
    eventually(
        &format!("another {resource} error handled"),
        || agent.metric(&key) > before,
        || format!("{}\n{}", agent.metrics(), api.requests().join("\n")),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_published_before_every_list_then_the_node_and_its_peers() {
    let api = FakeApiServer::start();
    seed(&api);
    // Namespaces cannot be listed yet: every other watcher lists and watches.
    api.forbid("namespaces", true);
    let agent = start(&api, false);
    eventually(
        "every other watch started, the peer watch too",
        || {
            let r = api.requests();
            let watching = |prefix: &str| r.iter().any(|l| l.starts_with(prefix) && is_watch(l));
            r.iter().any(|l| local_pods_watch(l))
                && r.iter().any(|l| peer_watch(l))
                && watching("GET /api/v1/services?")
                && watching("GET /apis/dnsfence.io/v1alpha1/egresspolicies?")
                && watching("GET /apis/dnsfence.io/v1alpha1/clusteregresspolicies?")
        },
        || api.requests().join("\n"),
    )
    .await;
    // Each list's end was queued before its watch started; once a later error is
    // handled, so are they.
    controller_caught_up(&agent, &api, "namespaces").await;
    tokio::time::sleep(QUIET).await;
    assert!(agent.current().is_none(), "{:?}", agent.current());
    assert!(agent.views().is_empty());
    assert!(
        agent.metrics().contains("dnsfence_k8s_synced 0"),
        "{}",
        agent.metrics()
    );

    api.forbid("namespaces", false);
    let view = agent
        .view_where(&api, "the pod has its namespace labels", |v| {
            seeded(v)
                && endpoint(v, "payments", "billing-1")
                    .is_some_and(|e| e.labels.contains_key("io.cilium.k8s.namespace.labels.team"))
        })
        .await;
    assert_eq!(
        agent.views().len(),
        1,
        "the first view is complete: {:#?}",
        agent.views()
    );
    let local = endpoint(&view, "payments", "billing-1").unwrap();
    assert!(!local.remote);
    assert_eq!(local.ips, ips(&["10.244.1.5", "fd00:244::5"]));
    assert_eq!(local.labels["app"], "billing");
    assert_eq!(local.labels["io.cilium.k8s.namespace.labels.team"], "pay");
    assert_eq!(
        local.labels["io.cilium.k8s.policy.serviceaccount"],
        "billing-sa"
    );
    assert_eq!(local.labels["io.cilium.k8s.policy.cluster"], "prod");
    let peer = endpoint(&view, "kube-system", "coredns-1").unwrap();
    assert!(peer.remote, "a peer on another node is remote");
    assert_eq!(peer.ips, ips(&["10.244.2.53"]));
    assert_eq!(peer.labels["k8s-app"], "kube-dns");
    assert_eq!(
        peer.labels["io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"],
        "kube-system"
    );
    let service = endpoint(&view, "kube-system", "service:kube-dns").unwrap();
    assert!(service.remote);
    assert_eq!(service.ips, ips(&["10.96.0.10"]));
    assert!(
        !has(&view, "payments", "billing-2"),
        "a pod of another node that no toEndpoints selects is not in the view"
    );
    assert_eq!(view.host_ips, ips(&["192.168.0.10", "fd00::10"]));
    assert_eq!(view.docs.len(), 1);
    assert_eq!(view.docs[0].file, "EgressPolicy/payments/allow-stripe");
    assert!(view.docs[0].text.contains("api.stripe.com"));
    assert!(!view.docs[0].text.contains("managedFields"));
    assert_eq!(view.invalid_policies, 0);
    assert!(agent.metrics().contains("dnsfence_k8s_synced 1"));

    // The requests kube made: the node's pods by field selector; the peers by label
    // selector in kube-system only, listed and then watched from the list's version.
    let log = api.requests();
    assert!(
        log.iter()
            .any(|r| local_pods_list(r) && r.contains("limit=500")),
        "{log:#?}"
    );
    let peer_list = log
        .iter()
        .find(|r| {
            r.starts_with("GET /api/v1/namespaces/kube-system/pods?labelSelector=k8s-app=kube-dns")
                && !is_watch(r)
        })
        .unwrap_or_else(|| panic!("no peer list: {log:#?}"));
    assert!(peer_list.contains("limit=500"), "{peer_list}");
    let watch = log.iter().find(|r| peer_watch(r)).unwrap();
    assert!(
        watch.contains("allowWatchBookmarks=true") && watch.contains("resourceVersion="),
        "{watch}"
    );
    assert!(
        !log.iter()
            .any(|r| r.starts_with("GET /api/v1/pods?") && r.contains("labelSelector")),
        "the peer query is namespaced: {log:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_other_nodes_never_reach_the_view() {
    let api = FakeApiServer::start();
    seed(&api);
    let agent = start(&api, false);
    agent.view_where(&api, "seeded", seeded).await;
    // Another node's pod of the selected app, then (a sync point on the same watch
    // stream order) a local one.
    api.apply(
        "pods",
        pod(
            "payments",
            "billing-3",
            "node-3",
            json!({"app": "billing"}),
            &["10.244.3.5"],
        ),
    );
    api.apply(
        "pods",
        pod(
            "payments",
            "billing-4",
            NODE,
            json!({"app": "billing"}),
            &["10.244.1.6"],
        ),
    );
    agent
        .view_where(&api, "billing-4 is in", |v| has(v, "payments", "billing-4"))
        .await;
    for v in agent.views() {
        assert!(!has(&v, "payments", "billing-2"), "{v:#?}");
        assert!(!has(&v, "payments", "billing-3"), "{v:#?}");
    }
    // The server never sent them: every pods request carried the field selector, but
    // the peer ones (label selector, kube-system).
    for r in api.requests() {
        if r.contains("/pods?") && !r.contains("/namespaces/kube-system/") {
            assert!(r.contains("fieldSelector=spec.nodeName=node-1"), "{r}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_update_the_view() {
    let api = FakeApiServer::start();
    seed(&api);
    let agent = start(&api, false);
    agent.view_where(&api, "seeded", seeded).await;
    let lists = count(&api, local_pods_list);

    api.delete("pods", Some("payments"), "billing-1");
    let v = agent
        .view_where(&api, "billing-1 is gone", |v| {
            !has(v, "payments", "billing-1")
        })
        .await;
    assert!(has(&v, "kube-system", "coredns-1"));

    api.apply(
        "egresspolicies",
        egress_policy("payments", "allow-stripe", "api.github.com"),
    );
    let v = agent
        .view_where(&api, "the policy's new version is in force", |v| {
            v.docs.len() == 1 && v.docs[0].text.contains("api.github.com")
        })
        .await;
    assert!(!v.docs[0].text.contains("api.stripe.com"));

    api.delete("egresspolicies", Some("payments"), "allow-stripe");
    let v = agent
        .view_where(&api, "no policy", |v| v.docs.is_empty())
        .await;
    assert!(
        !has(&v, "kube-system", "coredns-1"),
        "no policy names the peers any more: {v:#?}"
    );
    assert_eq!(
        count(&api, local_pods_list),
        lists,
        "watch events, no re-list"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_watches_resume_and_410_gone_relists_without_dropping_state() {
    let api = FakeApiServer::start();
    seed(&api);
    let agent = start(&api, false);
    agent.view_where(&api, "seeded", seeded).await;
    assert_eq!(count(&api, local_pods_list), 1);

    // A dropped connection: the watch resumes from its version, no re-list.
    let watches = count(&api, local_pods_watch);
    api.break_watches();
    api.apply(
        "pods",
        pod(
            "payments",
            "billing-5",
            NODE,
            json!({"app": "billing"}),
            &["10.244.1.7"],
        ),
    );
    agent
        .view_where(&api, "billing-5 is in", |v| has(v, "payments", "billing-5"))
        .await;
    assert!(count(&api, local_pods_watch) > watches);
    assert_eq!(count(&api, local_pods_list), 1, "resumed, not re-listed");

    // Disconnected while a pod is deleted and the history compacted: every watch comes
    // back to 410 Gone, lists again, and the deletion shows; nothing else ever leaves.
    let mark = agent.views().len();
    let log_mark = api.requests().len();
    api.set_down(true);
    api.delete("pods", Some("payments"), "billing-5");
    api.compact();
    let compacted = api.resource_version();
    api.set_down(false);
    let v = agent
        .view_where(&api, "billing-5 is gone", |v| {
            !has(v, "payments", "billing-5")
        })
        .await;
    assert!(seeded(&v), "{v:#?}");
    let views = agent.views();
    for v in &views[mark..] {
        assert!(seeded(v), "a view without the others: {v:#?}");
    }
    // The pods watch came back from a compacted version (answered 410), then listed.
    let log = api.requests()[log_mark..].to_vec();
    let expired = log
        .iter()
        .position(|r| {
            local_pods_watch(r)
                && r.split("resourceVersion=")
                    .nth(1)
                    .and_then(|v| v.split('&').next()?.parse::<u64>().ok())
                    .is_some_and(|v| v < compacted)
        })
        .unwrap_or_else(|| panic!("no watch from before the compaction: {log:#?}"));
    assert!(
        log[expired..].iter().any(|r| local_pods_list(r)),
        "re-listed after 410: {log:#?}"
    );
    eventually(
        "every published view was observed",
        || {
            #[allow(clippy::cast_precision_loss, reason = "a small count")]
            let seen = agent.views().len() as f64;
            agent.metric("dnsfence_k8s_view_updates_total") == seen
        },
        || agent.metrics(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_policies_hold_back_the_view_until_allowed() {
    let api = FakeApiServer::start();
    seed(&api);
    api.forbid("egresspolicies", true);
    let agent = start(&api, false);
    eventually(
        "every other watch started",
        || {
            let r = api.requests();
            let watching = |prefix: &str| r.iter().any(|l| l.starts_with(prefix) && is_watch(l));
            r.iter().any(|l| local_pods_watch(l))
                && watching("GET /api/v1/namespaces?")
                && watching("GET /api/v1/services?")
                && watching("GET /apis/dnsfence.io/v1alpha1/clusteregresspolicies?")
        },
        || api.requests().join("\n"),
    )
    .await;
    controller_caught_up(&agent, &api, "egresspolicies").await;
    tokio::time::sleep(QUIET).await;
    assert!(
        agent.current().is_none(),
        "no view without the policies: {:?}",
        agent.current()
    );
    let metrics = agent.metrics();
    assert!(
        agent.metric("dnsfence_k8s_watch_errors_total{resource=\"egresspolicies\"}") >= 1.0,
        "{metrics}"
    );
    assert!(metrics.contains("dnsfence_k8s_synced 0"), "{metrics}");
    assert!(
        !api.requests().iter().any(|r| peer_watch(r)),
        "no policy known, no peer watch"
    );

    api.forbid("egresspolicies", false);
    let v = agent.view_where(&api, "seeded", seeded).await;
    assert_eq!(v.docs[0].file, "EgressPolicy/payments/allow-stripe");
    assert_eq!(agent.views().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_keeps_the_last_view_and_catches_up() {
    let api = FakeApiServer::start();
    seed(&api);
    let agent = start(&api, false);
    let before = agent.view_where(&api, "seeded", seeded).await;
    let published = agent.metric("dnsfence_k8s_view_updates_total");

    api.set_down(true);
    api.apply(
        "pods",
        pod(
            "payments",
            "billing-6",
            NODE,
            json!({"app": "billing"}),
            &["10.244.1.8"],
        ),
    );
    // The agent notices, retries and fails again while down.
    let errors = agent.metric("dnsfence_k8s_watch_errors_total");
    eventually(
        "the watches fail twice",
        || agent.metric("dnsfence_k8s_watch_errors_total") >= errors + 2.0,
        || agent.metrics(),
    )
    .await;
    controller_caught_up(&agent, &api, "pods").await;
    tokio::time::sleep(QUIET).await;
    assert!(
        Arc::ptr_eq(&agent.current().unwrap(), &before),
        "the last view stays while the API server is down"
    );
    assert_eq!(agent.metric("dnsfence_k8s_view_updates_total"), published);

    api.set_down(false);
    let v = agent
        .view_where(&api, "the pod created meanwhile is in", |v| {
            has(v, "payments", "billing-6")
        })
        .await;
    assert!(seeded(&v), "{v:#?}");
    for v in agent.views() {
        assert!(seeded(&v), "never a view without the seeded state: {v:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policy_version_posts_one_warning_event_and_keeps_the_valid_one() {
    let api = FakeApiServer::start();
    seed(&api);
    let agent = start(&api, false);
    agent.view_where(&api, "seeded", seeded).await;

    // Generation 2: an HTTP rule (dnsfence does not enforce L7) and another name.
    let mut bad = egress_policy("payments", "allow-stripe", "api.github.com");
    bad["spec"]["egress"][0]["toPorts"][0]["rules"] = json!({"http": [{"method": "GET"}]});
    let stored = api.apply("egresspolicies", bad.clone());
    assert_eq!(stored["metadata"]["generation"], 2);
    eventually(
        "a Warning Event is posted",
        || !api.posted_events().is_empty(),
        || format!("{}\n{}", agent.metrics(), api.requests().join("\n")),
    )
    .await;
    let event = &api.posted_events()[0];
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidPolicy");
    assert_eq!(event["metadata"]["namespace"], "payments");
    assert_eq!(event["reportingController"], "dnsfence-agent");
    assert_eq!(event["reportingInstance"], "dnsfence-agent-7x2k9");
    let regarding = &event["regarding"];
    assert_eq!(regarding["apiVersion"], "dnsfence.io/v1alpha1");
    assert_eq!(regarding["kind"], "EgressPolicy");
    assert_eq!(regarding["namespace"], "payments");
    assert_eq!(regarding["name"], "allow-stripe");
    assert_eq!(regarding["uid"], stored["metadata"]["uid"]);
    let note = event["note"].as_str().unwrap();
    assert!(
        note.contains("spec.egress[0].toPorts[0].rules.http"),
        "{note}"
    );
    assert!(
        note.contains("previous valid version stays in force"),
        "{note}"
    );
    assert!(api
        .requests()
        .iter()
        .any(|r| r.starts_with("POST /apis/events.k8s.io/v1/namespaces/payments/events")));

    let v = agent
        .view_where(&api, "the policy is counted invalid", |v| {
            v.invalid_policies == 1
        })
        .await;
    assert_eq!(v.docs.len(), 1);
    assert!(
        v.docs[0].text.contains("api.stripe.com") && !v.docs[0].text.contains("api.github.com"),
        "the previous valid version stays in force: {}",
        v.docs[0].text
    );

    // The same generation again (a label change), then, on the same watch stream, a
    // second policy: once that one is in force, the first change has been handled.
    bad["metadata"]["labels"] = json!({"touched": "yes"});
    let again = api.apply("egresspolicies", bad);
    assert_eq!(again["metadata"]["generation"], 2);
    api.apply(
        "egresspolicies",
        egress_policy("payments", "allow-github", "api.github.com"),
    );
    agent
        .view_where(&api, "the second policy is in force", |v| v.docs.len() == 2)
        .await;
    assert_eq!(
        agent.metric("dnsfence_k8s_policy_rejections_total"),
        1.0,
        "{}",
        agent.metrics()
    );
    assert_eq!(api.posted_events().len(), 1, "{:#?}", api.posted_events());
    assert_eq!(agent.metric("dnsfence_k8s_events_total"), 1.0);

    // Fixed: in force, no longer invalid.
    api.apply(
        "egresspolicies",
        egress_policy("payments", "allow-stripe", "api.stripe.com"),
    );
    let v = agent
        .view_where(&api, "nothing invalid", |v| v.invalid_policies == 0)
        .await;
    assert_eq!(v.docs.len(), 2);
}

fn cilium_policy(kind: &str, ns: Option<&str>, name: &str, fqdn: &str) -> Value {
    let mut meta = json!({"name": name});
    if let Some(ns) = ns {
        meta["namespace"] = json!(ns);
    }
    json!({"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta, "spec": spec(fqdn)})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cilium_policies_are_watched_when_their_crds_exist() {
    let api = FakeApiServer::start();
    seed(&api);
    api.register_crd("ciliumnetworkpolicies.cilium.io");
    api.apply(
        "ciliumnetworkpolicies",
        cilium_policy(
            "CiliumNetworkPolicy",
            Some("payments"),
            "cnp-billing",
            "cilium.example.com",
        ),
    );
    let agent = start(&api, true);
    let v = agent
        .view_where(&api, "the CiliumNetworkPolicy is in force", |v| {
            seeded_but_docs(v)
                && v.docs
                    .iter()
                    .any(|d| d.file == "CiliumNetworkPolicy/payments/cnp-billing")
        })
        .await;
    assert!(
        agent.views()[0]
            .docs
            .iter()
            .any(|d| d.file == "CiliumNetworkPolicy/payments/cnp-billing"),
        "an installed CRD is waited for before the first view"
    );
    assert!(v.docs.iter().any(|d| d.text.contains("cilium.example.com")));
    let log = api.requests();
    assert!(
        log.iter().any(|r| r
            == "GET /apis/apiextensions.k8s.io/v1/customresourcedefinitions/ciliumclusterwidenetworkpolicies.cilium.io"),
        "{log:#?}"
    );
    assert!(
        !log.iter()
            .any(|r| r.starts_with("GET /apis/cilium.io/v2/ciliumclusterwidenetworkpolicies")),
        "an absent CRD's objects are not watched: {log:#?}"
    );

    // The clusterwide CRD appears later: its objects are watched then.
    api.register_crd("ciliumclusterwidenetworkpolicies.cilium.io");
    api.apply(
        "ciliumclusterwidenetworkpolicies",
        cilium_policy(
            "CiliumClusterwideNetworkPolicy",
            None,
            "ccnp-billing",
            "clusterwide.example.com",
        ),
    );
    agent
        .view_where(&api, "the clusterwide policy is in force", |v| {
            v.docs
                .iter()
                .any(|d| d.file == "CiliumClusterwideNetworkPolicy/ccnp-billing")
        })
        .await;
}

/// [`seeded`], with any number of documents.
fn seeded_but_docs(v: &ClusterView) -> bool {
    has(v, "payments", "billing-1") && has(v, "kube-system", "coredns-1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cilium_crds_nothing_cilium_is_watched_and_the_view_is_published() {
    let api = FakeApiServer::start();
    seed(&api);
    let agent = start(&api, true);
    let v = agent.view_where(&api, "seeded", seeded).await;
    assert_eq!(v.docs[0].file, "EgressPolicy/payments/allow-stripe");
    let log = api.requests();
    for crd in [
        "ciliumnetworkpolicies.cilium.io",
        "ciliumclusterwidenetworkpolicies.cilium.io",
    ] {
        assert!(
            log.iter().any(|r| r
                == &format!("GET /apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")),
            "{log:#?}"
        );
    }
    assert!(
        !log.iter().any(|r| r.contains("/apis/cilium.io/")),
        "{log:#?}"
    );

    // Without the flag, not even the CRDs are looked at.
    let api = FakeApiServer::start();
    seed(&api);
    api.register_crd("ciliumnetworkpolicies.cilium.io");
    let agent = start(&api, false);
    agent.view_where(&api, "seeded", seeded).await;
    assert!(
        !api.requests().iter().any(|r| r.contains("cilium")),
        "{:#?}",
        api.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_selector_the_api_would_refuse_never_freezes_the_view() {
    let api = FakeApiServer::start();
    seed(&api);
    let agent = start(&api, false);
    agent.view_where(&api, "seeded", seeded).await;
    // A label value Kubernetes refuses in a selector (it must start with a letter or a
    // digit): the term is left out of the peer list, which only widens it.
    let mut odd = egress_policy("payments", "odd-peer", "x.example");
    odd["spec"]["egress"][0]["toEndpoints"] = json!([{"matchLabels": {"app": "-dns"}}]);
    api.apply("egresspolicies", odd);
    agent
        .view_where(&api, "the odd policy is in force", |v| v.docs.len() == 2)
        .await;
    api.delete("pods", Some("payments"), "billing-1");
    agent
        .view_where(&api, "the deleted pod is gone", |v| {
            !has(v, "payments", "billing-1")
        })
        .await;
    assert!(
        !api.requests().iter().any(|r| r.contains("app=-dns")),
        "{}",
        api.requests().join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rejected_version_gets_an_event_with_its_own_problem() {
    let api = FakeApiServer::start();
    seed(&api);
    let agent = start(&api, false);
    agent.view_where(&api, "seeded", seeded).await;
    let mut http = egress_policy("payments", "allow-stripe", "api.stripe.com");
    http["spec"]["egress"][0]["toPorts"][0]["rules"] = json!({"http": [{"method": "GET"}]});
    api.apply("egresspolicies", http);
    eventually(
        "the first Event",
        || api.posted_events().len() == 1,
        || format!("{:#?}", api.posted_events()),
    )
    .await;
    let mut typo = egress_policy("payments", "allow-stripe", "api.stripe.com");
    typo["spec"]["egress"][1] = json!({"toFQDN": [{"matchName": "api.stripe.com"}]});
    api.apply("egresspolicies", typo);
    eventually(
        "a second Event naming the new problem",
        || {
            api.posted_events().iter().any(|e| {
                e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("toFQDN") && !n.contains("rules.http"))
            })
        },
        || format!("{:#?}", api.posted_events()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_that_keeps_failing_is_retried_less_and_less_often() {
    let api = FakeApiServer::start();
    seed(&api);
    api.forbid("egresspolicies", true);
    let _agent = start(&api, false);
    let lists = || {
        count(&api, |r| {
            r.starts_with("GET /apis/dnsfence.io/v1alpha1/egresspolicies?") && !is_watch(r)
        })
    };
    eventually(
        "a first list",
        || lists() >= 1,
        || api.requests().join("\n"),
    )
    .await;
    // Pauses of 0.8, 1.6, 3.2 s...: at most 4 attempts in 6 s (about one a second
    // without the backoff).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let n = lists();
    assert!((2..=4).contains(&n), "{n} lists in 6 s");
}
