//! A fake Kubernetes API server: real HTTP/1.1 on a TCP socket, speaking the API's JSON
//! for the requests `kube`'s watcher, `Api::get` and event `Recorder` make, so that the
//! agent's Kubernetes front end is tested through its real client stack (hyper, kube's
//! retry layer and watcher state machine) rather than through mocked calls.
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

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// How often idle threads look at the shutdown and down flags.
const TICK: Duration = Duration::from_millis(50);

/// Watch timeout when the client gives none (the real server picks 30 to 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// A resource the server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ResourceType {
    plural: &'static str,
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    namespaced: bool,
}

const RESOURCES: &[ResourceType] = &[
    ResourceType {
        plural: "pods",
        group: "",
        version: "v1",
        kind: "Pod",
        namespaced: true,
    },
    ResourceType {
        plural: "services",
        group: "",
        version: "v1",
        kind: "Service",
        namespaced: true,
    },
    ResourceType {
        plural: "namespaces",
        group: "",
        version: "v1",
        kind: "Namespace",
        namespaced: false,
    },
    ResourceType {
        plural: "egresspolicies",
        group: "dnsfence.io",
        version: "v1alpha1",
        kind: "EgressPolicy",
        namespaced: true,
    },
    ResourceType {
        plural: "clusteregresspolicies",
        group: "dnsfence.io",
        version: "v1alpha1",
        kind: "ClusterEgressPolicy",
        namespaced: false,
    },
    ResourceType {
        plural: "ciliumnetworkpolicies",
        group: "cilium.io",
        version: "v2",
        kind: "CiliumNetworkPolicy",
        namespaced: true,
    },
    ResourceType {
        plural: "ciliumclusterwidenetworkpolicies",
        group: "cilium.io",
        version: "v2",
        kind: "CiliumClusterwideNetworkPolicy",
        namespaced: false,
    },
    ResourceType {
        plural: "customresourcedefinitions",
        group: "apiextensions.k8s.io",
        version: "v1",
        kind: "CustomResourceDefinition",
        namespaced: false,
    },
    ResourceType {
        plural: "events",
        group: "events.k8s.io",
        version: "v1",
        kind: "Event",
        namespaced: true,
    },
];

impl ResourceType {
    fn find(plural: &str) -> Option<&'static ResourceType> {
        RESOURCES.iter().find(|r| r.plural == plural)
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Built into Kubernetes (served without a CRD; list items carry no type).
    fn builtin(&self) -> bool {
        self.group.is_empty() || self.group.ends_with("k8s.io")
    }

    /// The CRD that serves it.
    fn crd_name(&self) -> String {
        format!("{}.{}", self.plural, self.group)
    }

    /// `pods` or `egresspolicies.dnsfence.io`, as error messages name it.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The fields the real server accepts in field selectors for this resource.
    fn selectable_field(&self, field: &str) -> bool {
        if matches!(field, "metadata.name" | "metadata.namespace") {
            return true;
        }
        match self.plural {
            "pods" => matches!(
                field,
                "spec.nodeName"
                    | "spec.restartPolicy"
                    | "spec.schedulerName"
                    | "spec.serviceAccountName"
                    | "spec.hostNetwork"
                    | "status.phase"
                    | "status.podIP"
                    | "status.podIPs"
                    | "status.nominatedNodeName"
            ),
            "namespaces" => field == "status.phase",
            "services" => matches!(field, "spec.clusterIP" | "spec.type"),
            _ => false,
        }
    }
}

/// The kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One change in the history log.
#[derive(Debug, Clone)]
struct HistoryEntry {
    rv: u64,
    resource: &'static str,
    change: ChangeType,
    /// The object after the change (the last state for a deletion).
    object: Value,
    /// The object before a modification.
    previous: Option<Value>,
}

/// (resource, namespace or "", name).
type Key = (&'static str, String, String);

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<HistoryEntry>,
    /// Watches and exact lists from versions before this one get 410.
    compacted: u64,
    /// Bumped to end every open watch.
    epoch: u64,
    down: bool,
    shutdown: bool,
    forbidden: BTreeSet<String>,
    posted: Vec<Value>,
    requests: Vec<String>,
    uids: u64,
}

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

/// Stores `object` (create or update) and logs the change; `Err` names what is wrong.
fn store(state: &mut State, rt: &'static ResourceType, mut object: Value) -> Result<Value, String> {
    let Some(obj) = object.as_object_mut() else {
        return Err("an object must be a JSON object".into());
    };
    let api_version = rt.api_version();
    match obj.get("apiVersion").and_then(Value::as_str) {
        None => {
            obj.insert("apiVersion".into(), json!(api_version));
        }
        Some(v) if v == api_version => {}
        Some(v) => return Err(format!("apiVersion {v:?} is not {api_version:?}")),
    }
    match obj.get("kind").and_then(Value::as_str) {
        None => {
            obj.insert("kind".into(), json!(rt.kind));
        }
        Some(k) if k == rt.kind => {}
        Some(k) => return Err(format!("kind {k:?} is not {:?}", rt.kind)),
    }
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or("metadata must be an object")?;
    if meta.get("name").and_then(Value::as_str).is_none() {
        let Some(prefix) = meta.get("generateName").and_then(Value::as_str) else {
            return Err("metadata.name or metadata.generateName is required".into());
        };
        state.uids += 1;
        let name = format!("{prefix}{:05x}", state.uids);
        meta.insert("name".into(), json!(name));
    }
    let name = meta["name"].as_str().unwrap_or_default().to_owned();
    let namespace = if rt.namespaced {
        let ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        meta.insert("namespace".into(), json!(ns));
        ns
    } else {
        meta.remove("namespace");
        String::new()
    };
    let key: Key = (rt.plural, namespace, name);
    let old = state.objects.get(&key).cloned();
    if let Some(old) = &old {
        if without_server_fields(old) == without_server_fields(&object) {
            return Ok(old.clone());
        }
    }
    state.rv += 1;
    let rv = state.rv;
    let now = now_rfc3339();
    let uid = match &old {
        Some(o) => o["metadata"]["uid"].clone(),
        None => {
            state.uids += 1;
            json!(format!(
                "0f1e2d3c-{:04x}-4000-8000-{:012x}",
                state.uids & 0xffff,
                state.uids
            ))
        }
    };
    let spec_changed = old.as_ref().is_none_or(|o| {
        o.get("spec") != object.get("spec") || o.get("specs") != object.get("specs")
    });
    let generation = match &old {
        None => 1,
        Some(o) => o["metadata"]["generation"].as_i64().unwrap_or(1) + i64::from(spec_changed),
    };
    let created = old.as_ref().map_or_else(
        || json!(now),
        |o| o["metadata"]["creationTimestamp"].clone(),
    );
    let meta = &mut object["metadata"];
    meta["uid"] = uid;
    meta["resourceVersion"] = json!(rv.to_string());
    meta["creationTimestamp"] = created;
    if object.get("spec").is_some() || object.get("specs").is_some() {
        object["metadata"]["generation"] = json!(generation);
    }
    object["metadata"]["managedFields"] = json!([{
        "manager": "kubectl",
        "operation": "Update",
        "apiVersion": api_version,
        "time": now,
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {}}
    }]);
    state.history.push(HistoryEntry {
        rv,
        resource: rt.plural,
        change: if old.is_some() {
            ChangeType::Modified
        } else {
            ChangeType::Added
        },
        object: object.clone(),
        previous: old,
    });
    state.objects.insert(key, object.clone());
    Ok(object)
}

/// The object without what the server sets, to tell a real change from a no-op update.
fn without_server_fields(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
        ] {
            meta.remove(k);
        }
    }
    o
}

/// Accepts connections until shutdown; one thread per connection.
fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let (shutdown, down) = {
            let state = shared.lock();
            (state.shutdown, state.down)
        };
        if shutdown {
            break;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if down {
                    let _ = stream.shutdown(Shutdown::Both);
                    continue;
                }
                let shared = shared.clone();
                connections.retain(|c| !c.is_finished());
                if let Ok(t) = std::thread::Builder::new()
                    .name("fake-apiserver-conn".into())
                    .spawn(move || serve_connection(&shared, stream))
                {
                    connections.push(t);
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    for c in connections {
        let _ = c.join();
    }
}

/// One HTTP request.
#[derive(Debug, Clone, Default)]
struct Request {
    method: String,
    path: String,
    /// Decoded query pairs, in order.
    query: Vec<(String, String)>,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Request {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn log_line(&self) -> String {
        if self.query.is_empty() {
            format!("{} {}", self.method, self.path)
        } else {
            let q: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{} {}?{}", self.method, self.path, q.join("&"))
        }
    }
}

/// Why reading a request stopped.
enum ReadEnd {
    /// The peer closed, or the server is shutting down or down.
    Closed,
    /// Not HTTP.
    Malformed(String),
}

fn should_close(shared: &Shared) -> bool {
    let state = shared.lock();
    state.shutdown || state.down
}

/// Reads one request; `buf` keeps bytes of the next (pipelining).
fn read_request(
    shared: &Shared,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Request, ReadEnd> {
    let mut chunk = [0u8; 16 * 1024];
    let mut fill = |buf: &mut Vec<u8>| -> Result<(), ReadEnd> {
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => return Err(ReadEnd::Closed),
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if should_close(shared) {
                        return Err(ReadEnd::Closed);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(ReadEnd::Closed),
            }
        }
    };
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 1 << 20 {
            return Err(ReadEnd::Malformed("header too large".into()));
        }
        fill(buf)?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadEnd::Malformed(format!(
            "bad request line {request_line:?}"
        )));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ReadEnd::Malformed(format!("unsupported {version}")));
    }
    let mut headers = BTreeMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut req = Request {
        method: method.to_owned(),
        path: percent_decode(path, false),
        query: parse_query(query),
        headers,
        body: Vec::new(),
    };
    buf.drain(..head_end + 4);
    let chunked = req
        .headers
        .get("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            match decode_chunked(buf) {
                Ok(Some((body, used))) => {
                    req.body = body;
                    buf.drain(..used);
                    break;
                }
                Ok(None) => fill(buf)?,
                Err(e) => return Err(ReadEnd::Malformed(e)),
            }
        }
    } else {
        let len: usize = match req.headers.get("content-length") {
            None => 0,
            Some(v) => v
                .parse()
                .map_err(|_| ReadEnd::Malformed(format!("bad content-length {v:?}")))?,
        };
        while buf.len() < len {
            fill(buf)?;
        }
        req.body = buf.drain(..len).collect();
    }
    Ok(req)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A complete chunked body at the start of `buf`: (body, bytes used); `None` when more
/// bytes are needed.
fn decode_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_end) = find(&buf[at..], b"\r\n") else {
            return Ok(None);
        };
        let size_line = String::from_utf8_lossy(&buf[at..at + line_end]).into_owned();
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_line:?}"))?;
        at += line_end + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(end) = find(&buf[at..], b"\r\n") else {
                    return Ok(None);
                };
                at += end + 2;
                if end == 0 {
                    return Ok(Some((body, at)));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// `%XX` (and `+` as a space in a query) decoded.
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'+' && plus_is_space {
            out.push(b' ');
        } else if b == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            match u8::from_str_radix(hex, 16) {
                Ok(v) => {
                    out.push(v);
                    i += 2;
                }
                Err(_) => out.push(b),
            }
        } else {
            out.push(b);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What to answer.
enum Reply {
    Json(u16, Value),
    Text(u16, &'static str),
    Watch(Box<WatchRequest>),
}

fn serve_connection(shared: &Arc<Shared>, mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(TICK));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let req = match read_request(shared, &mut stream, &mut buf) {
            Ok(r) => r,
            Err(ReadEnd::Closed) => break,
            Err(ReadEnd::Malformed(why)) => {
                let _ = write_json(&mut stream, 400, &status(400, "BadRequest", &why, None));
                break;
            }
        };
        {
            let mut state = shared.lock();
            if state.down || state.shutdown {
                break;
            }
            state.requests.push(req.log_line());
        }
        let close = req
            .headers
            .get("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let written = match route(shared, &req) {
            Reply::Json(code, body) => write_json(&mut stream, code, &body),
            Reply::Text(code, text) => write_text(&mut stream, code, text),
            Reply::Watch(w) => {
                serve_watch(shared, &mut stream, &w);
                break;
            }
        };
        if written.is_err() || close {
            break;
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

fn write_json(stream: &mut TcpStream, code: u16, body: &Value) -> io::Result<()> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {code} {}\r\nAudit-Id: fake\r\nCache-Control: no-cache, private\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        reason_phrase(code),
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    stream.write_all(&out)
}

fn write_text(stream: &mut TcpStream, code: u16, text: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{text}",
        reason_phrase(code),
        text.len()
    );
    stream.write_all(head.as_bytes())
}

/// A `Status` object as the real server writes it.
fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

fn not_found_path() -> Reply {
    Reply::Json(
        404,
        status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            Some(json!({})),
        ),
    )
}

fn bad_request(message: &str) -> Reply {
    Reply::Json(400, status(400, "BadRequest", message, None))
}

/// A request's target: the resource, the namespace in the path, the name.
struct Route {
    rt: &'static ResourceType,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match *segs.first()? {
        "api" if segs.len() >= 3 => ("", segs[1], &segs[2..]),
        "apis" if segs.len() >= 4 => (segs[1], segs[2], &segs[3..]),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return None,
    };
    let rt = ResourceType::find(plural)?;
    if rt.group != group || rt.version != version {
        return None;
    }
    if namespace.is_some() && !rt.namespaced {
        return None;
    }
    if name.is_some() && rt.namespaced && namespace.is_none() {
        return None;
    }
    Some(Route {
        rt,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

fn route(shared: &Shared, req: &Request) -> Reply {
    match req.path.as_str() {
        "/healthz" | "/readyz" | "/livez" => return Reply::Text(200, "ok"),
        "/version" => {
            return Reply::Json(
                200,
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake",
                       "platform": "linux/amd64"}),
            )
        }
        _ => {}
    }
    let Some(route) = parse_route(&req.path) else {
        return not_found_path();
    };
    let watch = matches!(req.param("watch"), Some("true" | "1"));
    let verb = match (req.method.as_str(), &route.name) {
        ("GET", None) if watch => "watch",
        ("GET", None) => "list",
        ("GET", Some(_)) => "get",
        ("POST", None) => "create",
        ("PATCH", Some(_)) => "patch",
        _ => {
            return Reply::Json(
                405,
                status(
                    405,
                    "MethodNotAllowed",
                    &format!("{} is not supported here", req.method),
                    None,
                ),
            )
        }
    };
    let rt = route.rt;
    {
        let state = shared.lock();
        if state.forbidden.contains(rt.plural) {
            let scope = match &route.namespace {
                Some(ns) => format!("in the namespace \"{ns}\""),
                None => "at the cluster scope".to_owned(),
            };
            let message = format!(
                "{}{} is forbidden: User \"system:serviceaccount:dnsfence:dnsfence\" cannot \
                 {verb} resource \"{}\" in API group \"{}\" {scope}",
                rt.qualified(),
                route
                    .name
                    .as_ref()
                    .map(|n| format!(" \"{n}\""))
                    .unwrap_or_default(),
                rt.plural,
                rt.group
            );
            let mut details = json!({"kind": rt.plural});
            if !rt.group.is_empty() {
                details["group"] = json!(rt.group);
            }
            if let Some(n) = &route.name {
                details["name"] = json!(n);
            }
            return Reply::Json(403, status(403, "Forbidden", &message, Some(details)));
        }
        if !rt.builtin()
            && !state.objects.contains_key(&(
                "customresourcedefinitions",
                String::new(),
                rt.crd_name(),
            ))
        {
            return not_found_path();
        }
    }
    match verb {
        "watch" => match WatchRequest::parse(rt, route.namespace, req) {
            Ok(w) => Reply::Watch(Box::new(w)),
            Err(r) => r,
        },
        "list" => list(shared, rt, route.namespace, req),
        "get" => get(shared, rt, route.namespace, route.name.unwrap_or_default()),
        "create" => create(shared, rt, route.namespace, req),
        _ => patch(
            shared,
            rt,
            route.namespace,
            route.name.unwrap_or_default(),
            req,
        ),
    }
}

fn not_found_object(rt: &ResourceType, name: &str) -> Reply {
    let mut details = json!({"name": name, "kind": rt.plural});
    if !rt.group.is_empty() {
        details["group"] = json!(rt.group);
    }
    Reply::Json(
        404,
        status(
            404,
            "NotFound",
            &format!("{} \"{name}\" not found", rt.qualified()),
            Some(details),
        ),
    )
}

fn get(
    shared: &Shared,
    rt: &'static ResourceType,
    namespace: Option<String>,
    name: String,
) -> Reply {
    let key: Key = (rt.plural, namespace.unwrap_or_default(), name);
    match shared.lock().objects.get(&key) {
        Some(o) => Reply::Json(200, o.clone()),
        None => not_found_object(rt, &key.2),
    }
}

/// Which objects a list or watch wants.
#[derive(Debug, Clone)]
struct Filter {
    rt: &'static ResourceType,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn parse(
        rt: &'static ResourceType,
        namespace: Option<String>,
        req: &Request,
    ) -> Result<Self, Reply> {
        let labels = LabelSelector::parse(req.param("labelSelector").unwrap_or(""))
            .map_err(|e| bad_request(&format!("unable to parse requirement: {e}")))?;
        let fields = FieldSelector::parse(req.param("fieldSelector").unwrap_or(""))
            .map_err(|e| bad_request(&e))?;
        if let Some(f) = fields.0.iter().find(|t| !rt.selectable_field(&t.field)) {
            return Err(bad_request(&format!(
                "field label not supported: {}",
                f.field
            )));
        }
        Ok(Self {
            rt,
            namespace,
            labels,
            fields,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(ns) = &self.namespace {
            if meta["namespace"].as_str() != Some(ns.as_str()) {
                return false;
            }
        }
        self.labels.matches_object(object) && self.fields.matches(object)
    }
}

/// The objects of `rt` at version `rv`, rebuilt from the history.
fn snapshot_at(state: &State, rt: &ResourceType, rv: u64) -> Vec<Value> {
    let mut objects: BTreeMap<(String, String), Value> = BTreeMap::new();
    for e in state
        .history
        .iter()
        .take_while(|e| e.rv <= rv)
        .filter(|e| e.resource == rt.plural)
    {
        let meta = &e.object["metadata"];
        let key = (
            meta["namespace"].as_str().unwrap_or_default().to_owned(),
            meta["name"].as_str().unwrap_or_default().to_owned(),
        );
        match e.change {
            ChangeType::Deleted => {
                objects.remove(&key);
            }
            _ => {
                objects.insert(key, e.object.clone());
            }
        }
    }
    objects.into_values().collect()
}

fn parse_rv(s: &str) -> Result<u64, Reply> {
    s.parse::<u64>().map_err(|_| {
        Reply::Json(
            400,
            status(
                400,
                "BadRequest",
                &format!("resourceVersion: Invalid value: \"{s}\": must be a non-negative integer"),
                None,
            ),
        )
    })
}

fn too_large_rv() -> Reply {
    Reply::Json(
        504,
        status(
            504,
            "Timeout",
            "Too large resource version",
            Some(json!({"causes": [{"reason": "ResourceVersionTooLarge",
                                    "message": "Too large resource version"}],
                        "retryAfterSeconds": 1})),
        ),
    )
}

fn expired(message: &str) -> Value {
    status(410, "Expired", message, None)
}

fn list(
    shared: &Shared,
    rt: &'static ResourceType,
    namespace: Option<String>,
    req: &Request,
) -> Reply {
    let filter = match Filter::parse(rt, namespace, req) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Some(limit) = req.param("limit") {
        if limit.parse::<u64>().is_err() {
            return bad_request(&format!("limit: Invalid value: \"{limit}\""));
        }
    }
    if req.param("continue").is_some_and(|c| !c.is_empty()) {
        // This server never hands out continue tokens.
        return bad_request("continue key is not valid: this server does not page");
    }
    let rv_param = req.param("resourceVersion").unwrap_or("");
    let rv_match = req.param("resourceVersionMatch").unwrap_or("");
    let state = shared.lock();
    let (list_rv, objects): (u64, Vec<Value>) = match (rv_param, rv_match) {
        ("", "") => (state.rv, current(&state, rt)),
        ("", _) => {
            return bad_request(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            )
        }
        ("0", "Exact") => {
            return bad_request(
                "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            )
        }
        (r, "" | "NotOlderThan") => {
            let r = match parse_rv(r) {
                Ok(r) => r,
                Err(reply) => return reply,
            };
            if r > state.rv {
                return too_large_rv();
            }
            (state.rv, current(&state, rt))
        }
        (r, "Exact") => {
            let r = match parse_rv(r) {
                Ok(r) => r,
                Err(reply) => return reply,
            };
            if r > state.rv {
                return too_large_rv();
            }
            if r < state.compacted {
                return Reply::Json(
                    410,
                    expired("The resourceVersion for the provided list is too old."),
                );
            }
            (r, snapshot_at(&state, rt, r))
        }
        (_, other) => {
            return bad_request(&format!(
                "resourceVersionMatch: Unsupported value: \"{other}\": supported values: \"Exact\", \"NotOlderThan\""
            ))
        }
    };
    drop(state);
    let items: Vec<Value> = objects
        .into_iter()
        .filter(|o| filter.matches(o))
        .map(|mut o| {
            if rt.builtin() {
                if let Some(m) = o.as_object_mut() {
                    m.remove("apiVersion");
                    m.remove("kind");
                }
            }
            o
        })
        .collect();
    Reply::Json(
        200,
        json!({
            "kind": format!("{}List", rt.kind),
            "apiVersion": rt.api_version(),
            "metadata": {"resourceVersion": list_rv.to_string()},
            "items": items,
        }),
    )
}

fn current(state: &State, rt: &ResourceType) -> Vec<Value> {
    state
        .objects
        .range((rt.plural, String::new(), String::new())..)
        .take_while(|((r, _, _), _)| *r == rt.plural)
        .map(|(_, o)| o.clone())
        .collect()
}

/// A parsed watch request.
#[derive(Debug)]
struct WatchRequest {
    filter: Filter,
    /// `None`: start with the current objects.
    from: Option<u64>,
    send_initial_events: bool,
    bookmarks: bool,
    timeout: Duration,
}

impl WatchRequest {
    fn parse(
        rt: &'static ResourceType,
        namespace: Option<String>,
        req: &Request,
    ) -> Result<Self, Reply> {
        let filter = Filter::parse(rt, namespace, req)?;
        let bookmarks = req.param("allowWatchBookmarks") == Some("true");
        let send_initial_events = req.param("sendInitialEvents") == Some("true");
        let rv_match = req.param("resourceVersionMatch").unwrap_or("");
        if send_initial_events && rv_match != "NotOlderThan" {
            return Err(Reply::Json(
                422,
                status(
                    422,
                    "Invalid",
                    "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                    None,
                ),
            ));
        }
        if send_initial_events && !bookmarks {
            return Err(Reply::Json(
                422,
                status(
                    422,
                    "Invalid",
                    "allowWatchBookmarks: Forbidden: sendInitialEvents requires allowWatchBookmarks=true",
                    None,
                ),
            ));
        }
        if !send_initial_events && !rv_match.is_empty() {
            return Err(bad_request(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        let from = match req.param("resourceVersion").unwrap_or("") {
            "" | "0" => None,
            r => Some(parse_rv(r)?),
        };
        let timeout = match req.param("timeoutSeconds") {
            None => DEFAULT_WATCH_TIMEOUT,
            Some(t) => Duration::from_secs(
                t.parse::<u64>()
                    .map_err(|_| bad_request(&format!("timeoutSeconds: Invalid value: \"{t}\"")))?,
            ),
        };
        Ok(Self {
            filter,
            from,
            send_initial_events,
            bookmarks,
            timeout,
        })
    }
}

/// The watch event of `entry` for `filter`, if it concerns it.
fn watch_event(filter: &Filter, entry: &HistoryEntry) -> Option<Value> {
    if entry.resource != filter.rt.plural {
        return None;
    }
    let now = filter.matches(&entry.object);
    let event = |t: &str, o: &Value| json!({"type": t, "object": o});
    match entry.change {
        ChangeType::Added | ChangeType::Deleted => {
            now.then(|| event(entry.change.as_str(), &entry.object))
        }
        ChangeType::Modified => {
            let before = entry.previous.as_ref().is_some_and(|p| filter.matches(p));
            match (before, now) {
                (true, true) => Some(event("MODIFIED", &entry.object)),
                (false, true) => Some(event("ADDED", &entry.object)),
                (true, false) => {
                    // Left the selection: the old state, at the change's version.
                    let mut old = entry.previous.clone().unwrap_or_default();
                    old["metadata"]["resourceVersion"] = json!(entry.rv.to_string());
                    Some(event("DELETED", &old))
                }
                (false, false) => None,
            }
        }
    }
}

fn bookmark(rt: &ResourceType, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"type": "BOOKMARK", "object": {"kind": rt.kind, "apiVersion": rt.api_version(),
                                           "metadata": meta}})
}

fn write_chunk(stream: &mut TcpStream, event: &Value) -> io::Result<()> {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    let mut out = format!("{:x}\r\n", line.len()).into_bytes();
    out.extend_from_slice(&line);
    out.extend_from_slice(b"\r\n");
    stream.write_all(&out)?;
    stream.flush()
}

/// Whether the client closed its end (checked while a watch is idle).
fn peer_closed(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    let closed = match stream.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    closed
}

/// How a watch ended.
enum WatchEnd {
    /// Timeout: a clean end of the stream.
    Timeout,
    /// Dropped (break_watches, down, shutdown, client gone): no final chunk.
    Dropped,
}

fn serve_watch(shared: &Shared, stream: &mut TcpStream, w: &WatchRequest) {
    let deadline = Instant::now() + w.timeout;
    let rt = w.filter.rt;
    // Under one lock: the start point, the replay and the epoch this watch belongs to.
    let (epoch, mut cursor, first) = {
        let state = shared.lock();
        let epoch = state.epoch;
        match w.from {
            Some(r) if r < state.compacted && !w.send_initial_events => {
                drop(state);
                let _ = write_watch_head(stream);
                let _ = write_chunk(
                    stream,
                    &json!({"type": "ERROR", "object": expired("too old resource version")}),
                );
                let _ = stream.write_all(b"0\r\n\r\n");
                return;
            }
            Some(r) if !w.send_initial_events => {
                let events: Vec<Value> = state
                    .history
                    .iter()
                    .skip(state.history.partition_point(|e| e.rv <= r))
                    .filter_map(|e| watch_event(&w.filter, e))
                    .collect();
                (epoch, state.rv.max(r), events)
            }
            _ => {
                let mut events: Vec<Value> = current(&state, rt)
                    .into_iter()
                    .filter(|o| w.filter.matches(o))
                    .map(|o| json!({"type": "ADDED", "object": o}))
                    .collect();
                if w.send_initial_events {
                    events.push(bookmark(rt, state.rv, true));
                }
                (epoch, state.rv, events)
            }
        }
    };
    if write_watch_head(stream).is_err() {
        return;
    }
    for e in &first {
        if write_chunk(stream, e).is_err() {
            return;
        }
    }
    let end = loop {
        let (events, end) = {
            let mut state = shared.lock();
            let mut idle_checks = 0u32;
            loop {
                if state.shutdown || state.down || state.epoch != epoch {
                    break (Vec::new(), Some(WatchEnd::Dropped));
                }
                if state.rv > cursor {
                    let events: Vec<Value> = state
                        .history
                        .iter()
                        .skip(state.history.partition_point(|e| e.rv <= cursor))
                        .filter_map(|e| watch_event(&w.filter, e))
                        .collect();
                    cursor = state.rv;
                    if !events.is_empty() {
                        break (events, None);
                    }
                }
                let now = Instant::now();
                if now >= deadline {
                    break (Vec::new(), Some(WatchEnd::Timeout));
                }
                idle_checks += 1;
                if idle_checks.is_multiple_of(10) && peer_closed(stream) {
                    break (Vec::new(), Some(WatchEnd::Dropped));
                }
                state = shared
                    .changed
                    .wait_timeout(state, (deadline - now).min(TICK))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        };
        for e in &events {
            if write_chunk(stream, e).is_err() {
                return;
            }
        }
        if let Some(end) = end {
            break end;
        }
    };
    match end {
        WatchEnd::Timeout => {
            if w.bookmarks {
                let _ = write_chunk(stream, &bookmark(rt, cursor, false));
            }
            let _ = stream.write_all(b"0\r\n\r\n");
        }
        WatchEnd::Dropped => {}
    }
}

fn write_watch_head(stream: &mut TcpStream) -> io::Result<()> {
    stream.write_all(
        b"HTTP/1.1 200 OK\r\nAudit-Id: fake\r\nCache-Control: no-cache, private\r\n\
          Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
}

fn parse_body(req: &Request) -> Result<Value, Reply> {
    serde_json::from_slice::<Value>(&req.body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| bad_request("the body of the request was in an unknown format"))
}

fn invalid(rt: &ResourceType, name: &str, causes: &[(&str, String)]) -> Reply {
    let message = format!(
        "{} \"{name}\" is invalid: {}",
        rt.qualified(),
        causes
            .iter()
            .map(|(f, m)| format!("{f}: {m}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let causes: Vec<Value> = causes
        .iter()
        .map(|(f, m)| json!({"reason": "FieldValueInvalid", "message": m, "field": f}))
        .collect();
    let mut details = json!({"name": name, "kind": rt.kind, "causes": causes});
    if !rt.group.is_empty() {
        details["group"] = json!(rt.group);
    }
    Reply::Json(422, status(422, "Invalid", &message, Some(details)))
}

/// What the real server checks of an `events.k8s.io/v1` Event it creates.
fn validate_event(event: &Value) -> Vec<(&'static str, String)> {
    let mut causes = Vec::new();
    let required = |v: &Value| v.as_str().is_some_and(|s| !s.is_empty());
    if event.get("eventTime").is_none_or(Value::is_null) {
        causes.push(("eventTime", "Required value".to_owned()));
    }
    for field in [
        "reportingController",
        "reportingInstance",
        "action",
        "reason",
    ] {
        if !required(&event[field]) {
            causes.push((field, "Required value".to_owned()));
        }
    }
    if !matches!(event["type"].as_str(), Some("Normal" | "Warning")) {
        causes.push((
            "type",
            format!(
                "Unsupported value: {}: supported values: \"Normal\", \"Warning\"",
                event["type"]
            ),
        ));
    }
    if event["note"].as_str().is_some_and(|n| n.len() > 1024) {
        causes.push((
            "note",
            "Too long: may not be more than 1024 bytes".to_owned(),
        ));
    }
    if !event["regarding"].is_object() {
        causes.push(("regarding", "Required value".to_owned()));
    }
    causes
}

fn create(
    shared: &Shared,
    rt: &'static ResourceType,
    namespace: Option<String>,
    req: &Request,
) -> Reply {
    let mut body = match parse_body(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if rt.namespaced {
        let Some(ns) = namespace else {
            return not_found_path();
        };
        match body["metadata"]["namespace"].as_str() {
            None | Some("") => {
                if !body["metadata"].is_object() {
                    body["metadata"] = json!({});
                }
                body["metadata"]["namespace"] = json!(ns);
            }
            Some(n) if n == ns => {}
            Some(_) => {
                return bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            }
        }
    }
    let name = body["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if rt.plural == "events" {
        let causes = validate_event(&body);
        if !causes.is_empty() {
            return invalid(rt, &name, &causes);
        }
    }
    let mut state = shared.lock();
    if !name.is_empty() {
        let key: Key = (
            rt.plural,
            body["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            name.clone(),
        );
        if state.objects.contains_key(&key) {
            let mut details = json!({"name": name, "kind": rt.plural});
            if !rt.group.is_empty() {
                details["group"] = json!(rt.group);
            }
            return Reply::Json(
                409,
                status(
                    409,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", rt.qualified()),
                    Some(details),
                ),
            );
        }
    }
    if rt.plural == "events" {
        state.posted.push(body.clone());
    }
    let stored = store(&mut state, rt, body);
    drop(state);
    shared.changed.notify_all();
    match stored {
        Ok(o) => Reply::Json(201, o),
        Err(e) => invalid(rt, &name, &[("metadata", e)]),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(t) = target.as_object_mut() {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn patch(
    shared: &Shared,
    rt: &'static ResourceType,
    namespace: Option<String>,
    name: String,
    req: &Request,
) -> Reply {
    let content_type = req
        .headers
        .get("content-type")
        .map(String::as_str)
        .unwrap_or("");
    if !matches!(
        content_type.split(';').next().unwrap_or("").trim(),
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return Reply::Json(
            415,
            status(
                415,
                "UnsupportedMediaType",
                &format!("the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"),
                None,
            ),
        );
    }
    let body = match parse_body(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let key: Key = (rt.plural, namespace.unwrap_or_default(), name);
    let mut state = shared.lock();
    let Some(mut object) = state.objects.get(&key).cloned() else {
        return not_found_object(rt, &key.2);
    };
    merge_patch(&mut object, &body);
    if object["metadata"]["name"].as_str() != Some(key.2.as_str())
        || (rt.namespaced && object["metadata"]["namespace"].as_str() != Some(key.1.as_str()))
    {
        return invalid(
            rt,
            &key.2,
            &[("metadata.name", "field is immutable".to_owned())],
        );
    }
    if rt.plural == "events" {
        let causes = validate_event(&object);
        if !causes.is_empty() {
            return invalid(rt, &key.2, &causes);
        }
        state.posted.push(body);
    }
    let stored = store(&mut state, rt, object);
    drop(state);
    shared.changed.notify_all();
    match stored {
        Ok(o) => Reply::Json(200, o),
        Err(e) => invalid(rt, &key.2, &[("metadata", e)]),
    }
}

/// Now as RFC 3339 (UTC, seconds), as Kubernetes writes timestamps.
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let days = i64::try_from(secs / 86_400).unwrap_or_default();
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `k=v` or `k==v`.
    Equals(String, String),
    /// `k!=v` (also true without the label).
    NotEquals(String, String),
    /// `k in (a,b)`.
    In(String, BTreeSet<String>),
    /// `k notin (a,b)` (also true without the label).
    NotIn(String, BTreeSet<String>),
    /// `k`.
    Exists(String),
    /// `!k`.
    DoesNotExist(String),
}

impl Requirement {
    /// Whether `labels` satisfy it.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// A Kubernetes label selector as a query parameter writes it: requirements separated by
/// commas, all of which must hold. Empty: everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Requirement>);

impl LabelSelector {
    /// Parses `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k` and `!k`, joined
    /// by commas; keys and values are checked as the API server checks them.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        let mut terms = Vec::new();
        let mut depth = 0usize;
        let mut start = 0;
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth = depth
                        .checked_sub(1)
                        .ok_or(format!("unbalanced ')' in {s:?}"))?
                }
                ',' if depth == 0 => {
                    terms.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        if depth != 0 {
            return Err(format!("unbalanced '(' in {s:?}"));
        }
        terms.push(&s[start..]);
        terms
            .into_iter()
            .map(parse_requirement)
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| r.matches(labels))
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub fn matches_object(&self, object: &Value) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let labels: BTreeMap<String, String> = object["metadata"]["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        self.matches(&labels)
    }
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    let term = term.trim();
    if term.is_empty() {
        return Err("found '', expected: !, identifier, or 'end of string'".into());
    }
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        check_key(key)?;
        return Ok(Requirement::DoesNotExist(key.to_owned()));
    }
    let key_end = term
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/')))
        .unwrap_or(term.len());
    let key = &term[..key_end];
    check_key(key)?;
    let rest = term[key_end..].trim_start();
    if rest.is_empty() {
        return Ok(Requirement::Exists(key.to_owned()));
    }
    let value = |v: &str| -> Result<String, String> {
        let v = v.trim();
        check_value(v)?;
        Ok(v.to_owned())
    };
    if let Some(v) = rest.strip_prefix("==") {
        return Ok(Requirement::Equals(key.to_owned(), value(v)?));
    }
    if let Some(v) = rest.strip_prefix("!=") {
        return Ok(Requirement::NotEquals(key.to_owned(), value(v)?));
    }
    if let Some(v) = rest.strip_prefix('=') {
        return Ok(Requirement::Equals(key.to_owned(), value(v)?));
    }
    for (word, not) in [("notin", true), ("in", false)] {
        let Some(after) = rest.strip_prefix(word) else {
            continue;
        };
        if !after.starts_with(|c: char| c == '(' || c.is_whitespace()) {
            continue;
        }
        let set = after.trim();
        let inner = set
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix(')'))
            .ok_or_else(|| format!("found {set:?}, expected: '(' values ')'"))?;
        let values: BTreeSet<String> = inner.split(',').map(value).collect::<Result<_, _>>()?;
        if inner.trim().is_empty() {
            return Err(format!("for '{word}' operator, values set can't be empty"));
        }
        return Ok(if not {
            Requirement::NotIn(key.to_owned(), values)
        } else {
            Requirement::In(key.to_owned(), values)
        });
    }
    Err(format!(
        "found {rest:?}, expected: in, notin, =, ==, !=, or end of string"
    ))
}

fn name_part_ok(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && l.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    if prefix_ok && name_part_ok(name, 63) {
        Ok(())
    } else {
        Err(format!("invalid label key {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"))
    }
}

fn check_value(v: &str) -> Result<(), String> {
    if v.is_empty() || name_part_ok(v, 63) {
        Ok(())
    } else {
        Err(format!("invalid label value: {v:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"))
    }
}

/// One term of a field selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldTerm {
    /// The dotted field path (`spec.nodeName`).
    pub field: String,
    /// `=`/`==` (true) or `!=` (false).
    pub equals: bool,
    /// The value.
    pub value: String,
}

/// A field selector: `path=v`, `path==v`, `path!=v`, joined by commas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<FieldTerm>);

impl FieldSelector {
    /// Parses a field selector.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        s.split(',')
            .map(|t| {
                let t = t.trim();
                let (field, equals, value) = if let Some((f, v)) = t.split_once("!=") {
                    (f, false, v)
                } else if let Some((f, v)) = t.split_once("==") {
                    (f, true, v)
                } else if let Some((f, v)) = t.split_once('=') {
                    (f, true, v)
                } else {
                    return Err(format!("invalid selector: '{s}'; can't understand '{t}'"));
                };
                Ok(FieldTerm {
                    field: field.trim().to_owned(),
                    equals,
                    value: value.trim().to_owned(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// Whether `object` satisfies every term (a missing field is the empty string).
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|t| {
            let mut v = object;
            for part in t.field.split('.') {
                v = &v[part];
            }
            let actual = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (actual == t.value) == t.equals
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn set(vs: &[&str]) -> BTreeSet<String> {
        vs.iter().map(|v| (*v).to_owned()).collect()
    }

    #[test]
    fn label_selector_parses_every_operator() {
        let s = LabelSelector::parse(
            "app=web, tier==front,env!=prod,zone in (a, b),team notin(x,y),k8s.io/managed,!legacy",
        )
        .unwrap();
        assert_eq!(
            s.0,
            [
                Requirement::Equals("app".into(), "web".into()),
                Requirement::Equals("tier".into(), "front".into()),
                Requirement::NotEquals("env".into(), "prod".into()),
                Requirement::In("zone".into(), set(&["a", "b"])),
                Requirement::NotIn("team".into(), set(&["x", "y"])),
                Requirement::Exists("k8s.io/managed".into()),
                Requirement::DoesNotExist("legacy".into()),
            ]
        );
        assert_eq!(LabelSelector::parse("").unwrap(), LabelSelector::default());
        assert_eq!(
            LabelSelector::parse("k8s-app=kube-dns").unwrap().0,
            [Requirement::Equals("k8s-app".into(), "kube-dns".into())]
        );
        // An empty value is allowed for equality.
        assert_eq!(
            LabelSelector::parse("a=").unwrap().0,
            [Requirement::Equals("a".into(), String::new())]
        );
        // A key named like an operator is still a key.
        assert_eq!(
            LabelSelector::parse("in in (in)").unwrap().0,
            [Requirement::In("in".into(), set(&["in"]))]
        );
    }

    #[test]
    fn label_selector_rejects_what_the_api_server_rejects() {
        for bad in [
            "a=b,",
            ",a",
            "a in ()",
            "a in (b",
            "a in b)",
            "a notin b",
            "a>1",
            "-a=b",
            "a=-b",
            "a=b c",
            "!",
            "Upper.Case/x=y",
            "a/b/c=d",
        ] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn label_selector_semantics() {
        let l = labels(&[("app", "web"), ("zone", "a")]);
        let yes = |s: &str| LabelSelector::parse(s).unwrap().matches(&l);
        assert!(yes(""));
        assert!(yes("app=web,zone in (a,b)"));
        assert!(!yes("app=web,zone in (b)"));
        assert!(yes("env!=prod"), "!= holds without the label");
        assert!(yes("env notin (prod)"), "notin holds without the label");
        assert!(!yes("zone notin (a)"));
        assert!(!yes("env in (prod)"));
        assert!(yes("app"));
        assert!(!yes("!app"));
        assert!(yes("!env"));
        let object = json!({"metadata": {"labels": {"app": "web"}}});
        assert!(LabelSelector::parse("app=web")
            .unwrap()
            .matches_object(&object));
        assert!(!LabelSelector::parse("app")
            .unwrap()
            .matches_object(&json!({"metadata": {}})));
    }

    #[test]
    fn field_selector_parses_and_matches() {
        let s = FieldSelector::parse("spec.nodeName=node-1,status.phase!=Failed").unwrap();
        assert_eq!(s.0.len(), 2);
        let pod = |node: &str, phase: &str| json!({"spec": {"nodeName": node, "hostNetwork": true}, "status": {"phase": phase}});
        assert!(s.matches(&pod("node-1", "Running")));
        assert!(!s.matches(&pod("node-2", "Running")));
        assert!(!s.matches(&pod("node-1", "Failed")));
        assert!(FieldSelector::parse("spec.hostNetwork==true")
            .unwrap()
            .matches(&pod("n", "Running")));
        assert!(FieldSelector::parse("spec.nodeName=")
            .unwrap()
            .matches(&json!({"spec": {}})));
        assert!(FieldSelector::parse("spec.nodeName").is_err());
    }

    #[test]
    fn query_strings_are_decoded_as_kube_encodes_them() {
        assert_eq!(
            parse_query("labelSelector=zone+in+%28a%2Cb%29&limit=500&watch"),
            [
                ("labelSelector".to_owned(), "zone in (a,b)".to_owned()),
                ("limit".to_owned(), "500".to_owned()),
                ("watch".to_owned(), String::new()),
            ]
        );
        assert_eq!(percent_decode("%2", true), "%2");
    }

    #[test]
    fn routes() {
        let r = parse_route("/api/v1/namespaces/kube-system/pods").unwrap();
        assert_eq!(
            (r.rt.plural, r.namespace.as_deref(), r.name),
            ("pods", Some("kube-system"), None)
        );
        let r = parse_route("/api/v1/namespaces/payments").unwrap();
        assert_eq!(
            (r.rt.plural, r.name.as_deref()),
            ("namespaces", Some("payments"))
        );
        let r = parse_route("/apis/dnsfence.io/v1alpha1/egresspolicies").unwrap();
        assert_eq!((r.rt.plural, r.namespace), ("egresspolicies", None));
        assert!(parse_route("/apis/dnsfence.io/v1/egresspolicies").is_none());
        assert!(parse_route("/api/v1/namespaces/x/namespaces").is_none());
        assert!(parse_route("/api/v1/pods/name-without-namespace").is_none());
        assert!(
            parse_route("/apis/cilium.io/v2/namespaces/a/ciliumclusterwidenetworkpolicies")
                .is_none()
        );
    }

    #[test]
    fn chunked_bodies_decode_when_complete() {
        assert_eq!(
            decode_chunked(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\nNEXT").unwrap(),
            Some((b"abcde".to_vec(), 24))
        );
        assert_eq!(decode_chunked(b"3\r\nab").unwrap(), None);
        assert!(decode_chunked(b"zz\r\n").is_err());
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(now_rfc3339().len(), 20);
    }

    /// A request on a fresh connection; returns (status code, headers+body text).
    fn http(server: &FakeApiServer, method: &str, target: &str, body: &str) -> (u16, String) {
        let mut s = TcpStream::connect(server.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The server may close first (down): a failed write is an answer too.
        let _ = write!(
            s,
            "{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/merge-patch+json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let code = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, out)
    }

    fn json_body(text: &str) -> Value {
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    }

    #[test]
    fn lists_filter_and_strip_builtin_types() {
        let api = FakeApiServer::start();
        for (name, node, app) in [("a", "n1", "web"), ("b", "n2", "web"), ("c", "n1", "db")] {
            api.apply(
                "pods",
                json!({"metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
                       "spec": {"nodeName": node}}),
            );
        }
        let (code, text) = http(
            &api,
            "GET",
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1&labelSelector=app+in+%28web%29&limit=500",
            "",
        );
        assert_eq!(code, 200, "{text}");
        let list = json_body(&text);
        assert_eq!(list["kind"], "PodList");
        assert_eq!(
            list["metadata"]["resourceVersion"],
            api.resource_version().to_string()
        );
        assert!(list["metadata"].get("continue").is_none());
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["metadata"]["name"], "a");
        assert!(
            items[0].get("kind").is_none(),
            "built-in list items carry no kind"
        );
        let (code, text) = http(&api, "GET", "/api/v1/pods?fieldSelector=spec.image%3Dx", "");
        assert_eq!(
            (code, json_body(&text)["reason"].as_str()),
            (400, Some("BadRequest"))
        );
        // Exact lists go back in time until the compaction point.
        let before = api.resource_version();
        api.delete("pods", Some("shop"), "a");
        let (_, text) = http(
            &api,
            "GET",
            &format!(
                "/api/v1/namespaces/shop/pods?resourceVersion={before}&resourceVersionMatch=Exact"
            ),
            "",
        );
        assert_eq!(json_body(&text)["items"].as_array().unwrap().len(), 3);
        api.compact();
        let (code, _) = http(
            &api,
            "GET",
            &format!(
                "/api/v1/namespaces/shop/pods?resourceVersion={before}&resourceVersionMatch=Exact"
            ),
            "",
        );
        assert_eq!(code, 410);
    }

    #[test]
    fn watches_replay_follow_and_expire() {
        let api = FakeApiServer::start();
        let first = api.apply("namespaces", json!({"metadata": {"name": "a"}}));
        let rv: u64 = first["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        api.apply(
            "namespaces",
            json!({"metadata": {"name": "a", "labels": {"x": "1"}}}),
        );
        api.delete("namespaces", None, "a");
        let (code, text) = http(
            &api,
            "GET",
            &format!("/api/v1/namespaces?watch=true&timeoutSeconds=1&allowWatchBookmarks=true&resourceVersion={}", rv - 1),
            "",
        );
        assert_eq!(code, 200);
        let types: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object)
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(types, ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]);
        api.compact();
        let (code, text) = http(
            &api,
            "GET",
            &format!("/api/v1/namespaces?watch=1&resourceVersion={rv}"),
            "",
        );
        assert_eq!(code, 200);
        assert!(
            text.contains(r#""type":"ERROR""#) && text.contains(r#""code":410"#),
            "{text}"
        );
        // A forbidden resource, and a CRD that is not registered.
        api.forbid("namespaces", true);
        let (code, text) = http(&api, "GET", "/api/v1/namespaces", "");
        assert_eq!(
            (code, json_body(&text)["reason"].as_str()),
            (403, Some("Forbidden"))
        );
        let (code, text) = http(
            &api,
            "GET",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/ciliumnetworkpolicies.cilium.io",
            "",
        );
        assert_eq!(
            (code, json_body(&text)["reason"].as_str()),
            (404, Some("NotFound"))
        );
        let (code, _) = http(&api, "GET", "/apis/cilium.io/v2/ciliumnetworkpolicies", "");
        assert_eq!(code, 404);
        api.register_crd("ciliumnetworkpolicies.cilium.io");
        let (code, _) = http(&api, "GET", "/apis/cilium.io/v2/ciliumnetworkpolicies", "");
        assert_eq!(code, 200);
        assert!(api
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces?watch=true&timeoutSeconds=1")));
    }

    #[test]
    fn events_are_validated_recorded_and_patched() {
        let api = FakeApiServer::start();
        let event = json!({
            "metadata": {"name": "p.1"},
            "eventTime": "2024-01-01T00:00:00.000000Z",
            "reportingController": "c", "reportingInstance": "i",
            "action": "Validate", "reason": "InvalidPolicy", "type": "Warning",
            "regarding": {"kind": "EgressPolicy", "name": "p", "namespace": "shop"},
            "note": "bad"
        });
        let (code, text) = http(
            &api,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/shop/events",
            &event.to_string(),
        );
        assert_eq!(code, 201, "{text}");
        assert_eq!(json_body(&text)["metadata"]["namespace"], "shop");
        let (code, _) = http(
            &api,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/shop/events",
            &event.to_string(),
        );
        assert_eq!(code, 409);
        let (code, _) = http(
            &api,
            "PATCH",
            "/apis/events.k8s.io/v1/namespaces/shop/events/p.1",
            r#"{"series": {"count": 2, "lastObservedTime": "2024-01-01T00:00:01.000000Z"}}"#,
        );
        assert_eq!(code, 200);
        let mut bad = event.clone();
        bad["metadata"]["name"] = json!("p.2");
        bad["reason"] = json!("");
        let (code, text) = http(
            &api,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/shop/events",
            &bad.to_string(),
        );
        assert_eq!(
            (code, json_body(&text)["reason"].as_str()),
            (422, Some("Invalid"))
        );
        let posted = api.posted_events();
        assert_eq!(posted.len(), 2, "the post and the patch");
        assert_eq!(posted[1]["series"]["count"], 2);
    }

    #[test]
    fn down_refuses_connections() {
        let api = FakeApiServer::start();
        api.set_down(true);
        let (code, _) = http(&api, "GET", "/api/v1/namespaces", "");
        assert_eq!(code, 0, "no answer while down");
        api.set_down(false);
        let (code, _) = http(&api, "GET", "/api/v1/namespaces", "");
        assert_eq!(code, 200);
    }

    #[test]
    fn kubeconfig_names_the_server() {
        let api = FakeApiServer::start();
        let dir = crate::TempDir::new("kubeconfig");
        let path = dir.path().join("config");
        api.write_kubeconfig(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("server: {}", api.url())), "{text}");
        assert!(text.contains("current-context: fake"));
    }
}
