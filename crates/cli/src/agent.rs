//! `dnsfence agent --config FILE`: owns policies, endpoints and the nftables table, and
//! streams versioned snapshots to proxies (`dnsfence proxy --agent`) over the agent
//! socket ([`dnsfence_agent::control`]). It never writes learned IPs: proxies do, straight
//! into the selector sets, so DNS keeps resolving and enforcing while the agent is down.
//! On start it adopts an existing table (nothing is flushed; learned IPs stay).
//!
//! With `kubernetes.enabled` it also takes pods, namespaces and policy objects from the
//! API server ([`dnsfence_k8s::watch`]); it reconciles and serves snapshots only once
//! every watch has listed, so a restart never enforces half a cluster, and it keeps its
//! last state while the API server is unreachable.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use dnsfence_agent::config::{Listeners, NodeConfig as Config, Usage};
use dnsfence_agent::control::{
    read_message, write_message, LearnedIp, Message, Role, SelectorSets, SnapshotData,
    CONTROL_PROTOCOL,
};
use dnsfence_datapath::ruleset::fqdn_set_name;
use dnsfence_datapath::Backend;
use dnsfence_datapath::{Datapath, RealKernel, Worker};
use dnsfence_k8s::watch::ClusterView;
use dnsfence_policy::PolicySet;
use dnsfence_proxy::flows::{Flow, FlowLog, Source};
use tokio::io::BufReader;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::proxy::{compile, policy_docs, read_config};
use crate::run::{inventory, options};

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// The configuration file (YAML), shared with `dnsfence proxy --agent`.
    #[arg(long, short = 'c')]
    config: PathBuf,
}

/// `dnsfence agent`: it reads the policy files (and, in Kubernetes mode, the cluster's
/// objects) and serves no DNS.
const AGENT: Usage = Usage {
    reads_policies: true,
    listeners: Listeners::Optional,
    files_only: false,
};

/// A snapshot with its version.
type Versioned = Arc<(u64, SnapshotData)>;

/// The latest cluster view (Kubernetes mode; `None` until every watch has listed).
type View = Option<Arc<ClusterView>>;

/// What `dnsfence status` shows about connected proxies.
#[derive(Debug, Default)]
struct ProxyState {
    acked: u64,
    learned_reports: u64,
    learned_ips: u64,
    connected: bool,
}

#[derive(Default)]
struct Status {
    proxies: BTreeMap<u32, ProxyState>,
    reloads: u64,
    rejected_reloads: u64,
    /// Policies in force (objects of the policy set, as the proxy counts them).
    policies: usize,
    /// Kubernetes mode, once listed.
    kubernetes: Option<KubernetesStatus>,
}

/// What `dnsfence status` shows of the cluster.
#[derive(Debug, Clone)]
struct KubernetesStatus {
    host_network_pods: Vec<String>,
    invalid_policies: usize,
    policy_objects: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The snapshot data of `set` under `config`.
fn data(config: &Config, docs: Vec<dnsfence_policy::PolicyDoc>, set: &PolicySet) -> SnapshotData {
    SnapshotData {
        policies: docs,
        endpoints: config.endpoints.clone(),
        host_ips: config.host_ips.clone(),
        selectors: set
            .fqdn_selectors()
            .iter()
            .map(|(_, p)| SelectorSets {
                pattern: p.as_str().to_owned(),
                v4: fqdn_set_name(p, false),
                v6: fqdn_set_name(p, true),
            })
            .collect(),
        table: (config.datapath.backend == Backend::Nftables)
            .then(|| config.datapath.table.clone()),
        audit: config.audit,
    }
}

/// The files' part of the desired state, as last read and validated (at start and on
/// SIGHUP only: a cluster change never re-reads them, so a bad edit of a mounted
/// ConfigMap cannot hold back the cluster's updates).
#[derive(Clone)]
struct Files {
    config: Config,
    docs: Vec<dnsfence_policy::PolicyDoc>,
    /// (kind, namespace, name) of their policies.
    ids: std::collections::BTreeSet<(String, Option<String>, String)>,
}

/// Reads and validates the configuration and its policy files; also returns their
/// compiled policies.
fn read_files(config_path: &std::path::Path, previous: &PolicySet) -> Result<(Files, PolicySet)> {
    let mut config = read_config(config_path, AGENT)
        .map_err(|_| anyhow::anyhow!("the configuration is invalid"))?;
    crate::run::default_transparent(&mut config);
    let docs = policy_docs(config_path, &config)?;
    let set = compile(&docs, previous, config.audit)?;
    let ids = set
        .policies()
        .iter()
        .map(|p| {
            (
                p.id.kind.as_str().to_owned(),
                p.id.namespace.clone(),
                p.id.name.clone(),
            )
        })
        .collect();
    Ok((Files { config, docs, ids }, set))
}

/// (kind, namespace, name) of a cluster policy document (JSON).
fn doc_id(doc: &dnsfence_policy::PolicyDoc) -> Option<(String, Option<String>, String)> {
    let v: serde_json::Value = serde_json::from_str(&doc.text).ok()?;
    Some((
        v["kind"].as_str()?.to_owned(),
        v["metadata"]["namespace"].as_str().map(str::to_owned),
        v["metadata"]["name"].as_str()?.to_owned(),
    ))
}

/// The files plus what the cluster view holds, compiled and programmed into the kernel;
/// what a start, a reload or a cluster change does.
fn load(
    files: &Files,
    previous: &PolicySet,
    worker: Option<&Worker>,
    cluster: Option<&ClusterView>,
) -> Result<(Config, PolicySet, SnapshotData)> {
    let mut config = files.config.clone();
    let mut docs = files.docs.clone();
    if let Some(view) = cluster {
        for doc in &view.docs {
            // A policy file wins over an object of the same kind and name, so an object
            // cannot make the whole set invalid.
            if doc_id(doc).is_some_and(|id| files.ids.contains(&id)) {
                warn!(object = %doc.file, "also defined in a policy file; the file's version is in force");
                continue;
            }
            docs.push(doc.clone());
        }
        let named: std::collections::BTreeSet<(String, String)> = config
            .endpoints
            .iter()
            .map(|e| (e.namespace.clone(), e.name.clone()))
            .collect();
        let ips: std::collections::BTreeSet<std::net::IpAddr> = config
            .endpoints
            .iter()
            .flat_map(|e| e.ips.iter().copied())
            .collect();
        // An endpoint of the file wins over a pod of the same name or address.
        config.endpoints.extend(
            view.endpoints
                .iter()
                .filter(|e| {
                    !named.contains(&(e.namespace.clone(), e.name.clone()))
                        && !e.ips.iter().any(|ip| ips.contains(ip))
                })
                .cloned(),
        );
        for ip in &view.host_ips {
            if !config.host_ips.contains(ip) {
                config.host_ips.push(*ip);
            }
        }
    }
    let set = compile(&docs, previous, config.audit)?;
    if let Some(worker) = worker {
        let inv = inventory(&config, &set)?;
        worker
            .reconcile(Arc::new(set.clone()), Arc::new(inv))
            .context("programming the datapath")?;
    }
    let data = data(&config, docs, &set);
    Ok((config, set, data))
}

pub(crate) fn run(args: &AgentArgs) -> Result<ExitCode> {
    let mut config = match read_config(&args.config, AGENT) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    crate::run::default_transparent(&mut config);
    // Validate before touching the kernel.
    let (files, set) = match read_files(&args.config, &PolicySet::default()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("dnsfence: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    crate::init_logging(&config.log);
    let runtime = crate::runtime()?;
    let flows = {
        let _guard = runtime.enter();
        FlowLog::new(&config.flows, dnsfence_proxy::flows::FlowMetrics::default())
    };
    // The thread reading refused packets: stopped after serving ends, before the runtime
    // waits for the flow log's writer (which its callback keeps open).
    let mut reader = None;
    let context = Arc::new(DropContext::default());
    let worker = match config.datapath.backend {
        Backend::None => None,
        Backend::Nftables => {
            let datapath = match Datapath::new(Box::new(RealKernel::default()), options(&config)) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("dnsfence: cannot start the nftables datapath: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let names = datapath.names();
            let worker = Worker::spawn(datapath).context("starting the datapath thread")?;
            if let Some(group) = options(&config).log_group {
                let (flows, context) = (flows.clone(), context.clone());
                let on_refusal = Box::new(move |r: &dnsfence_datapath::drops::Refusal| {
                    flows.push(agent_drop_flow(r, &context));
                });
                match dnsfence_datapath::drops::spawn_reader(
                    group,
                    names,
                    worker.stats.drops.clone(),
                    on_refusal,
                ) {
                    Ok(r) => reader = Some(r),
                    Err(e) => {
                        warn!(group, error = %e, "cannot read refused packets: they are refused but not logged");
                    }
                }
            }
            Some(worker)
        }
    };
    let k8s_metrics = dnsfence_k8s::watch::Metrics::default();
    let cluster = if config.kubernetes.enabled {
        let client = match runtime.block_on(dnsfence_k8s::watch::connect(
            config.kubernetes.kubeconfig.as_deref(),
        )) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("dnsfence: kubernetes.enabled, but no Kubernetes client: {e}");
                return Ok(ExitCode::from(2));
            }
        };
        let node = config
            .kubernetes
            .node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .or_else(|| nix_hostname().filter(|n| !n.is_empty()));
        let Some(node) = node else {
            eprintln!("dnsfence: kubernetes.node_name is not set, nor NODE_NAME, nor a host name");
            return Ok(ExitCode::from(2));
        };
        let settings = dnsfence_k8s::watch::Settings {
            node: node.clone(),
            cluster_name: config.kubernetes.cluster_name.clone(),
            watch_cilium_policies: config.kubernetes.watch_cilium_policies,
            instance: std::env::var("POD_NAME")
                .ok()
                .or(Some(format!("dnsfence-agent-{node}"))),
            crd_poll: std::time::Duration::from_secs(30),
        };
        let (tx, rx) = watch::channel::<View>(None);
        runtime.spawn(dnsfence_k8s::watch::run(
            client,
            settings,
            tx,
            k8s_metrics.clone(),
        ));
        info!(%node, "watching the Kubernetes API; the table is reconciled once every watch has listed");
        Some(rx)
    } else {
        None
    };
    let (set, data) = if cluster.is_some() {
        // Nothing is reconciled nor served before the cluster is known: the table of the
        // previous run stays in force meanwhile.
        (set, None)
    } else {
        let (config, set, data) = load(&files, &set, worker.as_ref(), None)?;
        info!(
            policies = set.policies().len(),
            selectors = set.fqdn_selectors().len(),
            endpoints = config.endpoints.len(),
            "agent ready; the table is in force"
        );
        (set, Some(data))
    };
    let code = runtime.block_on(serve(
        args.config.clone(),
        files,
        config,
        set,
        data,
        worker,
        flows,
        cluster,
        k8s_metrics,
        context,
    ));
    drop(reader);
    code
}

/// The agent socket, bound unless a running process holds it (`None`: try again later).
async fn bind_agent_socket(
    path: &std::path::Path,
) -> Result<Option<(UnixListener, dnsfence_proxy::api::SocketFile)>> {
    let bound = dnsfence_proxy::api::bind_unix(path)
        .await
        .with_context(|| format!("binding the agent socket {}", path.display()))?;
    if bound.is_some() {
        info!(socket = %path.display(), "agent socket listening");
    }
    Ok(bound)
}

/// The host name, for the node name of last resort.
fn nix_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    config_path: PathBuf,
    mut files: Files,
    config: Config,
    mut set: PolicySet,
    data: Option<SnapshotData>,
    worker: Option<Worker>,
    flows: Arc<FlowLog>,
    mut cluster: Option<watch::Receiver<View>>,
    k8s_metrics: dnsfence_k8s::watch::Metrics,
    context: Arc<DropContext>,
) -> Result<ExitCode> {
    let started = Instant::now();
    if let Some(d) = &data {
        context.set_endpoints(d);
    }
    // Versions grow within one agent's life and across restarts (start time in the high bits).
    let base = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        << 20;
    let mut version = base + 1;
    let (tx, rx) = watch::channel::<Option<Versioned>>(data.map(|d| Arc::new((version, d))));
    let version_gauge: prometheus_client::metrics::gauge::Gauge = Default::default();
    version_gauge.set(i64::try_from(version).unwrap_or(i64::MAX));
    if let Some(addr) = config.metrics.agent_listen {
        let mut registry = prometheus_client::registry::Registry::with_prefix("dnsfence");
        registry.register(
            "agent_snapshot_version",
            "Version of the snapshot the agent serves (compare with the proxy's dnsfence_snapshot_version)",
            version_gauge.clone(),
        );
        if let Some(w) = &worker {
            w.stats.register(&mut registry);
        }
        flows.metrics.register(&mut registry);
        if cluster.is_some() {
            k8s_metrics.register(&mut registry);
        }
        // SO_REUSEPORT: during a rolling update the old and the new agent both listen.
        let listener = dnsfence_proxy::bind_metrics(addr)
            .with_context(|| format!("binding metrics.agent_listen {addr}"))?;
        info!(%addr, "agent metrics listening");
        let registry = Arc::new(registry);
        tokio::spawn(async move {
            if let Err(e) = dnsfence_proxy::serve_metrics(listener, registry).await {
                error!(error = %e, "agent metrics listener stopped");
            }
        });
    }
    let status = Arc::new(Mutex::new(Status {
        policies: set.policies().len(),
        ..Status::default()
    }));
    let path = config.api.agent_socket.clone();
    // The socket, once bound. A running process holding it (the old agent during a rolling
    // update) keeps it: proxies stay with that agent until it exits, and this one binds the
    // socket then. The file is removed on exit only if it is still ours.
    let mut socket = bind_agent_socket(&path).await?;
    if socket.is_none() {
        warn!(
            socket = %path.display(),
            "agent socket {} is in use by a running process (the old agent during an upgrade, or another one with the same api.agent_socket): left alone, and taken once that process is gone",
            path.display()
        );
    }
    let mut retry = tokio::time::interval(dnsfence_proxy::api::SOCKET_RETRY);
    let mut bind_failed = false;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut view: View = None;
    loop {
        let mut reload: Option<&str> = None;
        tokio::select! {
            accepted = async { socket.as_ref()?.0.accept().await.ok() }, if socket.is_some() => {
                let Some((stream, _)) = accepted else { continue };
                let (rx, status, worker) = (rx.clone(), status.clone(), worker.clone());
                let (flows, context) = (flows.clone(), context.clone());
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, rx, status, worker, started, flows, context).await {
                        debug!(error = %e, "agent connection ended");
                    }
                });
            }
            _ = retry.tick(), if socket.is_none() => {
                match bind_agent_socket(&path).await {
                    Ok(bound) => socket = bound,
                    Err(e) if !bind_failed => {
                        warn!("{e:#}; retrying every 500 ms");
                        bind_failed = true;
                    }
                    Err(e) => debug!("{e:#}"),
                }
            }
            _ = hup.recv() => {
                let path = config_path.clone();
                let previous = set.clone();
                match tokio::task::spawn_blocking(move || read_files(&path, &previous)).await {
                    Ok(Ok((f, _))) => files = f,
                    Ok(Err(e)) => {
                        lock(&status).rejected_reloads += 1;
                        error!("reload rejected, the running policy stays in force: {e:#}");
                        continue;
                    }
                    Err(e) => {
                        error!("reload failed: {e}");
                        continue;
                    }
                }
                if cluster.is_some() && view.is_none() {
                    info!("SIGHUP: files read; they apply once the cluster is listed");
                    continue;
                }
                reload = Some("policies reloaded");
            }
            changed = async { cluster.as_mut()?.changed().await.ok() }, if cluster.is_some() => {
                if changed.is_none() {
                    // Exit so that the DaemonSet restarts the agent; the table stays in
                    // force meanwhile and proxies keep enforcing.
                    error!("the Kubernetes watchers stopped; exiting so the agent restarts (the table stays in force)");
                    return Ok(ExitCode::from(1));
                }
                let latest = cluster.as_mut().and_then(|c| c.borrow_and_update().clone());
                if latest.is_some() {
                    if view.is_none() {
                        info!("every Kubernetes watch has listed; reconciling");
                    }
                    view = latest;
                    reload = Some("cluster state in force");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        let Some(what) = reload else {
            continue;
        };
        let previous = set.clone();
        let w = worker.clone();
        let v = view.clone();
        let f = files.clone();
        let loaded =
            tokio::task::spawn_blocking(move || load(&f, &previous, w.as_ref(), v.as_deref()))
                .await;
        match loaded {
            Ok(Ok((config, new_set, data))) => {
                set = new_set;
                lock(&status).policies = set.policies().len();
                version += 1;
                version_gauge.set(i64::try_from(version).unwrap_or(i64::MAX));
                context.set_endpoints(&data);
                let _ = tx.send(Some(Arc::new((version, data))));
                lock(&status).reloads += 1;
                lock(&status).kubernetes = view.as_deref().map(|v| KubernetesStatus {
                    host_network_pods: v.host_network_pods.clone(),
                    invalid_policies: v.invalid_policies,
                    policy_objects: v.docs.len(),
                });
                info!(
                    version,
                    policies = set.policies().len(),
                    endpoints = config.endpoints.len(),
                    "{what}"
                );
            }
            Ok(Err(e)) => {
                lock(&status).rejected_reloads += 1;
                error!("reload rejected, the running policy stays in force: {e:#}");
            }
            Err(e) => error!("reload failed: {e}"),
        }
    }
    // The socket file goes with it, if still ours.
    drop(socket);
    info!("agent stopped; the table and the proxies keep enforcing");
    Ok(ExitCode::SUCCESS)
}

async fn connection(
    stream: UnixStream,
    mut rx: watch::Receiver<Option<Versioned>>,
    status: Arc<Mutex<Status>>,
    worker: Option<Worker>,
    started: Instant,
    flows: Arc<FlowLog>,
    context: Arc<DropContext>,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    let Some(Message::Hello {
        protocol,
        role,
        pid,
        ..
    }) = read_message(&mut rd, &mut line).await?
    else {
        return Ok(());
    };
    if protocol != CONTROL_PROTOCOL {
        let message = format!("agent speaks protocol {CONTROL_PROTOCOL}, not {protocol}");
        warn!(pid, "{message}");
        return write_message(&mut wr, &Message::Error { message }).await;
    }
    let current = rx.borrow_and_update().clone();
    write_message(
        &mut wr,
        &Message::Hello {
            protocol: CONTROL_PROTOCOL,
            role: Role::Agent,
            pid: std::process::id(),
            version: current.as_ref().map_or(0, |c| c.0),
        },
    )
    .await?;
    if role == Role::Cli {
        return match read_message(&mut rd, &mut line).await? {
            Some(Message::Observe { last, follow }) => observe(&flows, last, follow, &mut wr).await,
            _ => {
                let status = status_json(&status, current.as_ref(), worker.as_ref(), started);
                write_message(&mut wr, &Message::Status { status }).await
            }
        };
    }
    info!(pid, "proxy connected");
    lock(&status).proxies.entry(pid).or_default().connected = true;
    let send = |v: &Versioned| Message::Snapshot {
        version: v.0,
        snapshot: Box::new(v.1.clone()),
    };
    // Until the agent has a snapshot (Kubernetes mode, before every watch listed), the
    // proxy keeps serving from the one it saved.
    if let Some(current) = &current {
        write_message(&mut wr, &send(current)).await?;
    }
    let result = loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break Ok(());
                }
                let Some(v) = rx.borrow_and_update().clone() else { continue };
                if let Err(e) = write_message(&mut wr, &send(&v)).await {
                    break Err(e);
                }
            }
            msg = read_message(&mut rd, &mut line) => match msg {
                Ok(Some(Message::Ack { version })) => {
                    debug!(pid, version, "snapshot acknowledged");
                    lock(&status).proxies.entry(pid).or_default().acked = version;
                }
                Ok(Some(Message::Nack { version, reason })) => {
                    error!(pid, version, %reason, "proxy refused the snapshot");
                }
                Ok(Some(Message::Learned { ips, dropped })) => {
                    context.learned(&ips);
                    let mut s = lock(&status);
                    let p = s.proxies.entry(pid).or_default();
                    p.learned_reports += 1;
                    p.learned_ips += ips.len() as u64 + dropped;
                }
                Ok(Some(other)) => debug!(pid, ?other, "unexpected message"),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        }
    };
    info!(pid, "proxy disconnected");
    {
        let mut s = lock(&status);
        s.proxies.entry(pid).or_default().connected = false;
        forget_gone(&mut s.proxies, pid);
    }
    result
}

/// Disconnected proxies `dnsfence status` still lists.
const GONE_PROXIES_SHOWN: usize = 4;

/// Proxies come and go (rolling updates): of the disconnected ones, keeps `last` (just
/// gone) and the most recent others (highest process IDs first), [`GONE_PROXIES_SHOWN`] in all.
fn forget_gone(proxies: &mut BTreeMap<u32, ProxyState>, last: u32) {
    let gone: Vec<u32> = proxies
        .iter()
        .filter(|(p, st)| !st.connected && **p != last)
        .map(|(p, _)| *p)
        .collect();
    let extra = gone.len().saturating_sub(GONE_PROXIES_SHOWN - 1);
    for old in gone.iter().take(extra) {
        proxies.remove(old);
    }
}

fn status_json(
    status: &Mutex<Status>,
    current: Option<&Versioned>,
    worker: Option<&Worker>,
    started: Instant,
) -> serde_json::Value {
    let s = lock(status);
    let version = current.map_or(0, |c| c.0);
    let proxies: Vec<serde_json::Value> = s
        .proxies
        .iter()
        .map(|(pid, p)| {
            serde_json::json!({
                "pid": pid,
                "connected": p.connected,
                "acked_version": p.acked,
                "in_sync": current.is_some() && p.acked == version,
                "learned_reports": p.learned_reports,
                "learned_ips_reported": p.learned_ips,
            })
        })
        .collect();
    let datapath = worker.map(|w| {
        serde_json::json!({
            "enforced_addresses": w.stats.enforced.get(),
            "reconciles": w.stats.reconciles.get(),
            "reconcile_errors": w.stats.reconcile_errors.get(),
            "elements": w.element_counts(),
        })
    });
    serde_json::json!({
        "role": "agent",
        "pid": std::process::id(),
        "uptime_s": started.elapsed().as_secs(),
        "snapshot_version": version,
        "policies": s.policies,
        "endpoints": current.map_or(0, |c| c.1.endpoints.len()),
        "selectors": current.map_or(0, |c| c.1.selectors.len()),
        "table": current.and_then(|c| c.1.table.clone()),
        "kubernetes": s.kubernetes.as_ref().map(|k| serde_json::json!({
            "policy_objects": k.policy_objects,
            "invalid_policies": k.invalid_policies,
            "host_network_pods_not_enforced": k.host_network_pods,
        })),
        "reloads": s.reloads,
        "rejected_reloads": s.rejected_reloads,
        "proxies": proxies,
        "datapath": datapath,
    })
}

/// A refused packet as a flow event (the agent knows endpoints, not learned names).
/// What the agent knows to describe a refused packet: the names the proxies reported for
/// each address, and the endpoints of the snapshot in force.
#[derive(Debug, Default)]
struct DropContext {
    names: Mutex<HashMap<IpAddr, Vec<(String, Instant)>>>,
    endpoints: Mutex<HashMap<IpAddr, Arc<Source>>>,
}

/// Addresses whose names are remembered at once (a bound on memory; the proxies' own
/// caches are bounded the same way).
const DROP_CONTEXT_ADDRESSES: usize = 200_000;

impl DropContext {
    /// Takes a proxy's report of learned (or forgotten: TTL 0) mappings.
    fn learned(&self, ips: &[LearnedIp]) {
        let now = Instant::now();
        let mut names = lock(&self.names);
        for l in ips {
            if l.ttl_ms == 0 {
                if let Some(list) = names.get_mut(&l.ip) {
                    list.retain(|(n, _)| *n != l.name);
                    if list.is_empty() {
                        names.remove(&l.ip);
                    }
                }
                continue;
            }
            if names.len() >= DROP_CONTEXT_ADDRESSES && !names.contains_key(&l.ip) {
                names.retain(|_, list| {
                    list.retain(|(_, until)| *until > now);
                    !list.is_empty()
                });
                if names.len() >= DROP_CONTEXT_ADDRESSES {
                    continue;
                }
            }
            let until = now + std::time::Duration::from_millis(l.ttl_ms);
            let list = names.entry(l.ip).or_default();
            match list.iter_mut().find(|(n, _)| *n == l.name) {
                Some(entry) => entry.1 = entry.1.max(until),
                None => list.push((l.name.clone(), until)),
            }
        }
    }

    /// The names last learned for `ip` that have not expired (at most 5).
    fn names_of(&self, ip: IpAddr) -> Vec<String> {
        let now = Instant::now();
        lock(&self.names).get(&ip).map_or_else(Vec::new, |list| {
            list.iter()
                .filter(|(_, until)| *until > now)
                .map(|(n, _)| n.clone())
                .take(5)
                .collect()
        })
    }

    /// Takes the endpoints of a new snapshot.
    fn set_endpoints(&self, data: &SnapshotData) {
        let mut map = HashMap::new();
        for ep in &data.endpoints {
            let labels: Vec<String> = ep.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            for ip in &ep.ips {
                map.insert(
                    *ip,
                    Arc::new(Source {
                        ip: Some(*ip),
                        namespace: Some(ep.namespace.clone()),
                        pod_name: Some(ep.name.clone()),
                        labels: labels.clone(),
                    }),
                );
            }
        }
        *lock(&self.endpoints) = map;
    }
}

fn agent_drop_flow(r: &dnsfence_datapath::drops::Refusal, context: &DropContext) -> Flow {
    let source = lock(&context.endpoints)
        .get(&r.packet.src)
        .cloned()
        .unwrap_or_else(|| {
            let (namespace, pod_name) = match r.endpoint.as_deref().and_then(|e| e.split_once('/'))
            {
                Some((ns, name)) => (Some(ns.to_owned()), Some(name.to_owned())),
                None => (None, None),
            };
            Arc::new(Source {
                ip: Some(r.packet.src),
                namespace,
                pod_name,
                labels: Vec::new(),
            })
        });
    let mut flow = Flow::new(
        "drop",
        if r.reason
            .is_some_and(dnsfence_datapath::DropReason::is_audit)
        {
            "audit"
        } else {
            "denied"
        },
        source,
    );
    flow.destination = Some(dnsfence_proxy::flows::Destination {
        ip: Some(r.packet.dst),
        port: r.packet.dst_port,
        protocol: Some(dnsfence_datapath::drops::protocol_name(r.packet.protocol)),
        names: context.names_of(r.packet.dst),
    });
    flow.drop_reason_desc = Some(
        r.reason
            .map_or("other", dnsfence_datapath::DropReason::as_str)
            .to_owned(),
    );
    flow
}

/// Streams the agent's flow events (refused packets) to `dnsfence observe`.
async fn observe<W: tokio::io::AsyncWrite + Unpin>(
    flows: &FlowLog,
    last: usize,
    follow: bool,
    wr: &mut W,
) -> std::io::Result<()> {
    let mut live = flows.subscribe();
    let to_msg = |f: &Flow| Message::Flow {
        flow: serde_json::to_value(f).unwrap_or_default(),
    };
    for f in flows.last(last) {
        write_message(wr, &to_msg(&f)).await?;
    }
    if !follow {
        return Ok(());
    }
    loop {
        match live.recv().await {
            Ok(f) => write_message(wr, &to_msg(&f)).await?,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                flows.metrics.lose("follower", n);
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_keeps_connected_proxies_and_the_last_few_gone() {
        let mut proxies = BTreeMap::new();
        for pid in 1..=10u32 {
            proxies.insert(
                pid,
                ProxyState {
                    connected: pid == 5,
                    ..ProxyState::default()
                },
            );
        }
        forget_gone(&mut proxies, 2);
        let left: Vec<u32> = proxies.keys().copied().collect();
        assert_eq!(left, [2, 5, 8, 9, 10]);
    }
}
