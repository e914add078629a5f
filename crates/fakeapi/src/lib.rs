//! A fake Kubernetes API server, for tests only (never a dependency of shipped code): real
//! HTTP/1.1 on a TCP socket, speaking the API's JSON for the requests `kube`'s watcher,
//! `Api::get` and event `Recorder` make, so that the agent's Kubernetes front end is tested
//! through its real client stack (hyper, kube's retry layer and watcher state machine)
//! rather than through mocked calls.
//!
//! What it serves:
//! - **Resources**: core `pods`, `services` (namespaced; also across namespaces as
//!   `/api/v1/pods`), `namespaces`; `dnsfence.io/v1alpha1` `egresspolicies` and
//!   `clusteregresspolicies`; `cilium.io/v2` `ciliumnetworkpolicies` and
//!   `ciliumclusterwidenetworkpolicies`; `apiextensions.k8s.io/v1`
//!   `customresourcedefinitions`; `events.k8s.io/v1` `events`. A custom resource is served
//!   only while its CRD (`<plural>.<group>`) is registered, as on a real cluster: the
//!   dnsfence CRDs are registered at start, the Cilium ones by [`FakeApiServer::register_crd`].
//! - **List** (`GET` a collection): `{"kind":"PodList","metadata":{"resourceVersion":..},
//!   "items":[..]}`, filtered by the path's namespace, `labelSelector` (`k=v`, `k==v`,
//!   `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`; commas AND) and `fieldSelector`
//!   (`path=v`, `path!=v` on the fields the real server supports). Items of built-in kinds
//!   carry no `apiVersion`/`kind` (as the real server answers); custom resources do.
//!   `limit` is honoured by returning everything without a `continue` token (allowed by the
//!   API). `resourceVersion` semantics: unset = most recent, `0` = any,
//!   `resourceVersionMatch=NotOlderThan` (or unset) = at least that version (504 when it
//!   is in the future), `Exact` = the state at that version, reconstructed from the
//!   history (410 `Expired` when compacted away).
//! - **Watch** (`watch=true`/`watch=1`): a chunked stream of `{"type":..,"object":..}`
//!   lines. From `resourceVersion=R` it replays every change after R, then follows new
//!   ones; without R (or with `0`) it starts with `ADDED` for every current object. With
//!   `sendInitialEvents=true` (streaming lists; needs `allowWatchBookmarks=true` and
//!   `resourceVersionMatch=NotOlderThan`) it ends the initial objects with a `BOOKMARK`
//!   annotated `k8s.io/initial-events-end`. An object that stops (starts) matching the
//!   selectors is reported `DELETED` (`ADDED`), as the real server does. `timeoutSeconds`
//!   ends the stream (after a `BOOKMARK` when `allowWatchBookmarks=true`). A version older
//!   than the compaction point gets an `ERROR` event with a 410 `Expired` Status, then the
//!   stream ends (kube's watcher then lists again).
//! - **Get** of one object (`.../<name>`), **create** (`POST`) and JSON merge **patch**
//!   (`PATCH`). Events posted or patched are recorded ([`FakeApiServer::posted_events`])
//!   after the real server's main validations of `events.k8s.io/v1` Events.
//! - Errors are `Status` objects as the real server writes them: 404 `NotFound`,
//!   403 `Forbidden` (see [`FakeApiServer::forbid`]), 400 `BadRequest`, 409
//!   `AlreadyExists`, 410 `Expired`, 422 `Invalid`.
//!
//! Test controls: [`FakeApiServer::apply`] and [`FakeApiServer::delete`] change objects
//! as controllers and `kubectl` would (bumping the global resource version, setting
//! `uid`, `creationTimestamp`, `managedFields`, `generation` on spec changes);
//! [`FakeApiServer::compact`] and [`FakeApiServer::break_watches`] force the watch
//! recovery paths; [`FakeApiServer::set_down`] makes the server refuse every connection;
//! [`FakeApiServer::requests`] is the request log. [`FakeApiServer::start_on`] takes a
//! listener bound by the test, e.g. inside a network namespace (a socket keeps its
//! namespace). Threads are blocking std threads; they stop when the server is dropped.
//!
//! It is a test fixture, not an API server: no authentication, no TLS, no admission, no
//! paging, no server-side apply, one process's memory as its store. It is only ever a
//! dev-dependency (`publish = false`).
//!
//! Layout: `resources` (the kinds it serves), `store` (objects, their history and
//! versions), `http` (connections, requests, replies), `routes` (paths, get and list),
//! `watch` (watch streams), `write` (create and patch), `selectors` (label and field
//! selectors: [`LabelSelector`], [`FieldSelector`]), `status` (the API's error objects).

mod http;
mod resources;
mod routes;
mod selectors;
mod status;
mod store;
#[cfg(test)]
mod testing;
mod watch;
mod write;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

pub use selectors::{FieldSelector, FieldTerm, LabelSelector, Requirement};

use crate::http::accept_loop;
use crate::resources::ResourceType;
use crate::store::{now_rfc3339, store, ChangeType, HistoryEntry, Key, State};

/// How often idle threads look at the shutdown and down flags.
const TICK: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A fake Kubernetes API server; see the module docs.
#[derive(Debug)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts on 127.0.0.1 (a free port).
    pub fn start() -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
    }

    /// Starts on `listener` (bound by the caller, e.g. inside a network namespace).
    pub fn start_on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("listener address");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let shared = Arc::new(Shared::default());
        let me_shared = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || accept_loop(&me_shared, &listener))
            .expect("spawn the acceptor");
        let server = Self {
            shared,
            addr,
            acceptor: Some(acceptor),
        };
        for plural in ["egresspolicies", "clusteregresspolicies"] {
            server.register_crd(&format!("{plural}.dnsfence.io"));
        }
        server
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Creates or updates `object` of `resource` (a plural such as `pods`), as a controller
    /// or `kubectl apply` would: bumps the global resource version, keeps or assigns the
    /// `uid`, bumps `metadata.generation` when the spec changed, and emits `ADDED` or
    /// `MODIFIED` to the watches. Namespaced objects without a namespace go to `default`.
    /// An update that changes nothing is a no-op, as on the real server. Returns the
    /// stored object.
    pub fn apply(&self, resource: &str, object: Value) -> Value {
        let rt = ResourceType::find(resource)
            .unwrap_or_else(|| panic!("the fake API server does not serve {resource:?}"));
        let mut state = self.shared.lock();
        let stored = store(&mut state, rt, object).unwrap_or_else(|e| panic!("apply: {e}"));
        drop(state);
        self.shared.changed.notify_all();
        stored
    }

    /// Deletes an object; emits `DELETED` (with the deletion's resource version). Returns
    /// the object's last state, `None` when there was none.
    pub fn delete(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let rt = ResourceType::find(resource)
            .unwrap_or_else(|| panic!("the fake API server does not serve {resource:?}"));
        let key: Key = (
            rt.plural,
            if rt.namespaced {
                namespace.unwrap_or("default").to_owned()
            } else {
                String::new()
            },
            name.to_owned(),
        );
        let mut state = self.shared.lock();
        let mut object = state.objects.remove(&key)?;
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.history.push(HistoryEntry {
            rv,
            resource: rt.plural,
            change: ChangeType::Deleted,
            object: object.clone(),
            previous: None,
        });
        drop(state);
        self.shared.changed.notify_all();
        Some(object)
    }

    /// The stored object, if any.
    pub fn get(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let rt = ResourceType::find(resource)?;
        let ns = if rt.namespaced {
            namespace.unwrap_or("default").to_owned()
        } else {
            String::new()
        };
        self.shared
            .lock()
            .objects
            .get(&(rt.plural, ns, name.to_owned()))
            .cloned()
    }

    /// The current (global) resource version.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Forgets the history before now: a watch (or an exact list) from an older version
    /// than the current one gets `410 Gone` (`Expired`). Open watches go on.
    pub fn compact(&self) {
        let mut state = self.shared.lock();
        state.compacted = state.rv;
    }

    /// Drops the connection of every open watch (no final chunk: as a lost connection or
    /// a restarting API server). Clients reconnect at once; new watches are not affected.
    pub fn break_watches(&self) {
        self.shared.lock().epoch += 1;
        self.shared.changed.notify_all();
    }

    /// Whether requests on `resource` get `403 Forbidden`, as RBAC answers a service account
    /// without the permission. Open watches go on (RBAC does not end them).
    pub fn forbid(&self, resource: &str, forbidden: bool) {
        let mut state = self.shared.lock();
        if forbidden {
            state.forbidden.insert(resource.to_owned());
        } else {
            state.forbidden.remove(resource);
        }
    }

    /// While down, every connection is closed without an answer (open watches are dropped,
    /// new connections closed when accepted), so clients see connection errors.
    pub fn set_down(&self, down: bool) {
        let mut state = self.shared.lock();
        state.down = down;
        if down {
            state.epoch += 1;
        }
        drop(state);
        self.shared.changed.notify_all();
    }

    /// The bodies of the Events posted (`POST`) or updated (`PATCH`), in order.
    pub fn posted_events(&self) -> Vec<Value> {
        self.shared.lock().posted.clone()
    }

    /// The request log: `METHOD /path?query`, the query decoded (`labelSelector=a=b`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// Registers the CRD `name` (`<plural>.<group>`): `GET` finds it and, when the server
    /// knows the resource, its objects are served.
    pub fn register_crd(&self, name: &str) {
        let (plural, group) = name.split_once('.').unwrap_or((name, ""));
        let known = ResourceType::find(plural).filter(|r| r.group == group);
        let kind = known.map_or_else(|| plural.to_owned(), |r| r.kind.to_owned());
        let scope = if known.is_none_or(|r| r.namespaced) {
            "Namespaced"
        } else {
            "Cluster"
        };
        let version = known.map_or("v1", |r| r.version);
        self.apply(
            "customresourcedefinitions",
            json!({
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": name},
                "spec": {
                    "group": group,
                    "names": {"plural": plural, "singular": kind.to_lowercase(), "kind": kind,
                              "listKind": format!("{kind}List")},
                    "scope": scope,
                    "versions": [{"name": version, "served": true, "storage": true,
                                  "schema": {"openAPIV3Schema": {"type": "object",
                                             "x-kubernetes-preserve-unknown-fields": true}}}]
                },
                "status": {
                    "conditions": [{"type": "Established", "status": "True",
                                    "reason": "InitialNamesAccepted", "message": "the initial names have been accepted",
                                    "lastTransitionTime": now_rfc3339()}],
                    "acceptedNames": {"plural": plural, "kind": kind},
                    "storedVersions": [version]
                }
            }),
        );
    }

    /// Writes a kubeconfig for this server (plain HTTP, no credentials, its context
    /// current), for processes that read `KUBECONFIG` or take a kubeconfig path.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\npreferences: {{}}\n",
            self.url()
        );
        std::fs::write(path.as_ref(), text)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.as_ref().display()));
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_names_the_server() {
        let api = FakeApiServer::start();
        let dir = dnsfence_testsupport::TempDir::new("kubeconfig");
        let path = dir.path().join("config");
        api.write_kubeconfig(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("server: {}", api.url())), "{text}");
        assert!(text.contains("current-context: fake"));
    }
}
