//! The watch streams: one `kube` watcher per resource (and per peer query), forwarded to
//! the controller as [`Msg`]s with a backoff after errors; the Cilium CRDs looked for.
//!
//! Tasks that only read the API and send messages: the state is the controller's.

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, watcher, Event};
use kube::{Api, Client};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::cluster::{Change, PeerQuery, PolicySource};

/// A message of a watcher task to the controller.
#[derive(Debug)]
pub(super) enum Msg {
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

/// Forwards a watch stream to the controller until the controller is gone. After an
/// error it pauses, twice as long after each error in a row (up to 30 s). Only progress
/// resets the pause: kube's watcher reports `Init` before every list attempt, so a list
/// that keeps failing would otherwise be retried at once, forever.
pub(super) async fn forward<K, S>(
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

pub(super) fn spawn_policy_watch(
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

pub(super) fn spawn_peer_watch(
    client: &Client,
    query: &PeerQuery,
    tx: &mpsc::Sender<Msg>,
) -> JoinHandle<()> {
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
pub(super) async fn await_crd(
    client: Client,
    source: PolicySource,
    poll: Duration,
    tx: mpsc::Sender<Msg>,
) {
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
pub(super) async fn crd_exists(client: &Client, source: PolicySource) -> Option<bool> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.get_opt(&format!("{}.cilium.io", source.plural()))
        .await
        .ok()
        .map(|o| o.is_some())
}
