//! The agent as a running node: it owns the datapath and the desired state, and serves
//! versioned snapshots to the proxies that follow it. One path puts a desired state in
//! force (`enforce`), at start, on a reload and on each cluster change: compile,
//! resolve, reconcile the kernel, publish the snapshot.
//!
//! On start it adopts an existing table (nothing is flushed; learned IPs stay). In
//! Kubernetes mode it reconciles and serves snapshots only once every watch has listed,
//! so a restart never enforces half a cluster, and it keeps its last state while the API
//! server is unreachable. It never writes learned IPs: proxies do, straight into the
//! selector sets, so DNS keeps resolving and enforcing while the agent is down.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dnsfence_datapath::drops::Reader;
use dnsfence_datapath::{Backend, Datapath, RealKernel, SysError, Worker};
use dnsfence_k8s::watch::ClusterView;
use dnsfence_policy::PolicySet;
use dnsfence_proxy::flows::FlowLog;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::Usage;
use crate::control::SnapshotData;
use crate::desired::{Desired, DesiredError, Files};
use crate::drops::DropContext;
use crate::link::{self, Listener};
use crate::session::{self, Current, KubernetesStatus, Published, Sessions, Status};
use crate::Controls;

/// The latest cluster view (Kubernetes mode; `None` until every watch has listed).
pub type View = Option<Arc<ClusterView>>;

/// Why the agent cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The nftables datapath cannot be set up (the tools are missing, no privileges).
    #[error("cannot start the nftables datapath: {0}")]
    Datapath(#[source] SysError),
    /// The datapath thread cannot be started.
    #[error("starting the datapath thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The first desired state cannot be put in force.
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// Why a desired state was not put in force; the running one stays.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// It cannot be built.
    #[error(transparent)]
    Desired(#[from] DesiredError),
    /// The kernel refused it.
    #[error("programming the datapath: {0}")]
    Datapath(#[source] SysError),
}

/// How serving ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The agent socket cannot be bound.
    #[error("binding the agent socket {}", .path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The Kubernetes watchers stopped: the process should exit so that it is restarted
    /// (the table stays in force meanwhile, and proxies keep enforcing).
    #[error("the Kubernetes watchers stopped")]
    KubernetesStopped,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running agent.
pub struct AgentNode {
    config_path: PathBuf,
    usage: Usage,
    files: Files,
    /// The policies in force (selectors keep their ids across loads).
    set: Arc<PolicySet>,
    version: u64,
    current: watch::Sender<Current>,
    worker: Option<Worker>,
    flows: Arc<FlowLog>,
    context: Arc<DropContext>,
    status: Arc<Mutex<Status>>,
    started: Instant,
    version_gauge: Gauge,
    cluster: Option<watch::Receiver<View>>,
    view: View,
    /// Whether a reload is reported only once the connected proxies have it in force.
    await_acks: bool,
    acked: Arc<tokio::sync::Notify>,
    /// The thread reading refused packets (stopped with the node).
    _reader: Option<Reader>,
}

/// How long a reload waits for the proxies to put it in force before it is reported
/// anyway (see `AgentNode::reporting_once_in_force`).
const ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl AgentNode {
    /// Starts the datapath (unless `datapath.backend: none`) and puts the files' desired
    /// state in force; with `cluster` (Kubernetes mode) that waits until every watch has
    /// listed, and the table of the previous run stays in force meanwhile. `files` were
    /// read from `config_path` as `usage` says (a reload reads them the same way).
    pub fn start(
        config_path: &Path,
        usage: Usage,
        files: Files,
        set: PolicySet,
        flows: Arc<FlowLog>,
        cluster: Option<watch::Receiver<View>>,
    ) -> Result<Self, StartError> {
        let mut files = files;
        // The datapath redirects DNS to the transparent listener, on its default port
        // unless the configuration names one.
        files.config.default_transparent();
        let context = Arc::new(DropContext::default());
        let mut reader = None;
        let config = &files.config;
        let worker = match config.datapath.backend {
            Backend::None => None,
            Backend::Nftables => {
                let options = crate::datapath_options(config);
                let log_group = options.log_group;
                let datapath = Datapath::new(Box::new(RealKernel::default()), options)
                    .map_err(StartError::Datapath)?;
                let names = datapath.names();
                let worker = Worker::spawn(datapath).map_err(StartError::Thread)?;
                if let Some(group) = log_group {
                    let (flows, context) = (flows.clone(), context.clone());
                    let on_refusal = Box::new(move |r: &dnsfence_datapath::drops::Refusal| {
                        flows.push(crate::drops::drop_flow(r, &context));
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
        // Versions grow within one agent's life and across restarts (start time in the
        // high bits).
        let base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            << 20;
        let (current, _) = watch::channel(None);
        let mut node = Self {
            config_path: config_path.to_owned(),
            usage,
            files,
            set: Arc::new(set),
            version: base,
            current,
            worker,
            flows,
            context,
            status: Arc::default(),
            started: Instant::now(),
            version_gauge: Gauge::default(),
            cluster,
            view: None,
            await_acks: false,
            acked: Arc::default(),
            _reader: reader,
        };
        if node.cluster.is_none() {
            let desired = enforce(&node.files, None, &node.set, node.worker.as_ref())?;
            node.publish(&desired);
            info!(
                policies = desired.set.policies().len(),
                selectors = desired.set.fqdn_selectors().len(),
                endpoints = desired.config.endpoints.len(),
                "agent ready; the table is in force"
            );
        } else {
            info!(
                "watching the Kubernetes API; the table is reconciled once every watch has listed"
            );
        }
        Ok(node)
    }

    /// The datapath, when there is one.
    pub fn worker(&self) -> Option<&Worker> {
        self.worker.as_ref()
    }

    /// The snapshot in force: its version, what proxies are sent, and its compiled
    /// policies (`None` before the first: Kubernetes mode before every watch has listed).
    pub fn published(&self) -> Option<(u64, SnapshotData, Arc<PolicySet>)> {
        self.current
            .borrow()
            .as_ref()
            .map(|p| (p.version, p.data.clone(), p.set.clone()))
    }

    /// Reports a reload (`policies reloaded`) only once every connected proxy has it in
    /// force, or after 10 s: `dnsfence run`, whose proxy is in the process, so
    /// that the reload is complete when it is reported, as a reload of one process is.
    pub fn reporting_once_in_force(mut self) -> Self {
        self.await_acks = true;
        self
    }

    /// Waits until every connected proxy has acknowledged `version` (at most
    /// `ACK_WAIT`).
    async fn wait_for_acks(&self, version: u64) {
        let deadline = tokio::time::Instant::now() + ACK_WAIT;
        loop {
            let notified = self.acked.notified();
            let done = lock(&self.status)
                .proxies
                .values()
                .filter(|p| p.connected)
                .all(|p| p.acked >= version);
            if done || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// Registers the agent's metrics: the version of the snapshot it serves, and the
    /// datapath's.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "agent_snapshot_version",
            "Version of the snapshot the agent serves (compare with the proxy's dnsfence_snapshot_version)",
            self.version_gauge.clone(),
        );
        if let Some(w) = &self.worker {
            w.stats.register(registry);
        }
    }

    fn publish(&mut self, desired: &Desired) {
        self.set = desired.set.clone();
        self.version += 1;
        self.version_gauge
            .set(i64::try_from(self.version).unwrap_or(i64::MAX));
        self.context.set_endpoints(&desired.data);
        {
            let mut status = lock(&self.status);
            status.policies = desired.set.policies().len();
            status.kubernetes = self.view.as_deref().map(|v| KubernetesStatus {
                host_network_pods: v.host_network_pods.clone(),
                invalid_policies: v.invalid_policies,
                policy_objects: v.docs.len(),
            });
        }
        self.current.send_replace(Some(Arc::new(Published {
            version: self.version,
            data: desired.data.clone(),
            set: desired.set.clone(),
        })));
    }

    /// Serves proxies and operators' commands on `listener` until `controls` says stop;
    /// reloads the files on request and follows the cluster view.
    pub async fn serve(
        mut self,
        listener: Listener,
        mut controls: Controls,
    ) -> Result<(), ServeError> {
        let sessions = Sessions {
            current: self.current.subscribe(),
            status: self.status.clone(),
            worker: self.worker.clone(),
            started: self.started,
            flows: self.flows.clone(),
            context: self.context.clone(),
            acked: self.acked.clone(),
        };
        let mut incoming = Incoming::new(listener).await?;
        let mut reloads = true;
        loop {
            let mut reload: Option<&str> = None;
            tokio::select! {
                link = incoming.next() => {
                    let Some(link) = link else { continue };
                    let sessions = sessions.clone();
                    tokio::spawn(async move {
                        if let Err(e) = session::serve(link, sessions).await {
                            debug!(error = %e, "agent connection ended");
                        }
                    });
                }
                requested = controls.reload.recv(), if reloads => {
                    if requested.is_none() {
                        reloads = false;
                        continue;
                    }
                    if !self.reread().await {
                        continue;
                    }
                    if self.cluster.is_some() && self.view.is_none() {
                        info!("reload: files read; they apply once the cluster is listed");
                        continue;
                    }
                    reload = Some("policies reloaded");
                }
                changed = async { self.cluster.as_mut()?.changed().await.ok() }, if self.cluster.is_some() => {
                    if changed.is_none() {
                        error!("the Kubernetes watchers stopped; exiting so the agent restarts (the table stays in force)");
                        return Err(ServeError::KubernetesStopped);
                    }
                    let latest = self.cluster.as_mut().and_then(|c| c.borrow_and_update().clone());
                    if latest.is_some() {
                        if self.view.is_none() {
                            info!("every Kubernetes watch has listed; reconciling");
                        }
                        self.view = latest;
                        reload = Some("cluster state in force");
                    }
                }
                _ = controls.stop.changed() => break,
            }
            if let Some(what) = reload {
                self.reload(what).await;
            }
        }
        drop(incoming);
        info!("agent stopped; the table and the proxies keep enforcing");
        Ok(())
    }

    /// Reads the files again (off the runtime thread); false when they are refused.
    async fn reread(&mut self) -> bool {
        let (path, usage, previous) = (self.config_path.clone(), self.usage, self.set.clone());
        match tokio::task::spawn_blocking(move || Files::read(&path, usage, &previous)).await {
            Ok(Ok((mut files, _))) => {
                files.config.default_transparent();
                self.files = files;
                true
            }
            Ok(Err(e)) => {
                lock(&self.status).rejected_reloads += 1;
                error!("reload rejected, the running policy stays in force: {e:#}");
                false
            }
            Err(e) => {
                error!("reload failed: {e}");
                false
            }
        }
    }

    /// Puts the current files and cluster view in force, off the runtime thread.
    async fn reload(&mut self, what: &str) {
        let (files, view, previous, worker) = (
            self.files.clone(),
            self.view.clone(),
            self.set.clone(),
            self.worker.clone(),
        );
        let built = tokio::task::spawn_blocking(move || {
            enforce(&files, view.as_deref(), &previous, worker.as_ref())
        })
        .await;
        match built {
            Ok(Ok(desired)) => {
                self.publish(&desired);
                if self.await_acks {
                    self.wait_for_acks(self.version).await;
                }
                lock(&self.status).reloads += 1;
                info!(
                    version = self.version,
                    policies = desired.set.policies().len(),
                    endpoints = desired.config.endpoints.len(),
                    "{what}"
                );
            }
            Ok(Err(e)) => {
                lock(&self.status).rejected_reloads += 1;
                error!("reload rejected, the running policy stays in force: {e:#}");
            }
            Err(e) => error!("reload failed: {e}"),
        }
    }
}

/// Builds the desired state of `files` and the cluster view and has the kernel enforce
/// it: the one path from desired state to enforced, at start, on a reload and on each
/// cluster change (the caller then publishes it to the proxies). Selectors of
/// `previous` keep their ids, so learned IPs stay in their sets. Blocking work.
fn enforce(
    files: &Files,
    view: Option<&ClusterView>,
    previous: &PolicySet,
    worker: Option<&Worker>,
) -> Result<Desired, LoadError> {
    let desired = Desired::build(files, view, previous)?;
    if let Some(worker) = worker {
        worker
            .reconcile(desired.set.clone(), desired.inventory.clone())
            .map_err(LoadError::Datapath)?;
    }
    Ok(desired)
}

/// New connections: accepted on the agent socket, or handed over in-process.
enum Incoming {
    Unix {
        path: PathBuf,
        /// The socket, once bound. A running process holding it (the old agent during a
        /// rolling update) keeps it: proxies stay with that agent until it exits, and
        /// this one binds the socket then. The file is removed on exit only if it is
        /// still ours.
        socket: Option<(tokio::net::UnixListener, dnsfence_proxy::api::SocketFile)>,
        retry: tokio::time::Interval,
        bind_failed: bool,
    },
    Local(tokio::sync::mpsc::Receiver<link::Link>),
}

impl Incoming {
    async fn new(listener: Listener) -> Result<Self, ServeError> {
        match listener {
            Listener::Local(rx) => Ok(Self::Local(rx)),
            Listener::Unix(path) => {
                let socket = bind_agent_socket(&path).await?;
                if socket.is_none() {
                    warn!(
                        socket = %path.display(),
                        "agent socket {} is in use by a running process (the old agent during an upgrade, or another one with the same api.agent_socket): left alone, and taken once that process is gone",
                        path.display()
                    );
                }
                Ok(Self::Unix {
                    path,
                    socket,
                    retry: tokio::time::interval(dnsfence_proxy::api::SOCKET_RETRY),
                    bind_failed: false,
                })
            }
        }
    }

    /// The next connection (`None`: nothing this time, ask again).
    async fn next(&mut self) -> Option<link::Link> {
        match self {
            Self::Local(rx) => match rx.recv().await {
                Some(l) => Some(l),
                // No proxy of this process any more: nothing will come.
                None => std::future::pending().await,
            },
            Self::Unix {
                path,
                socket,
                retry,
                bind_failed,
            } => match socket {
                Some((listener, _)) => link::accept(listener).await.ok(),
                None => {
                    retry.tick().await;
                    match bind_agent_socket(path).await {
                        Ok(bound) => *socket = bound,
                        Err(e) if !*bind_failed => {
                            warn!("{e:#}; retrying every 500 ms");
                            *bind_failed = true;
                        }
                        Err(e) => debug!("{e:#}"),
                    }
                    None
                }
            },
        }
    }
}

/// The agent socket, bound unless a running process holds it (`None`: try again later).
async fn bind_agent_socket(
    path: &Path,
) -> Result<Option<(tokio::net::UnixListener, dnsfence_proxy::api::SocketFile)>, ServeError> {
    let bound = dnsfence_proxy::api::bind_unix(path)
        .await
        .map_err(|source| ServeError::Bind {
            path: path.to_owned(),
            source,
        })?;
    if bound.is_some() {
        info!(socket = %path.display(), "agent socket listening");
    }
    Ok(bound)
}
