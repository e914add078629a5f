//! The DNS proxy as a running node: the proxy itself, its metrics and local API, and where
//! its policies come from. Alone (`dnsfence proxy`) it reads its own policy files and
//! enforces nothing in the kernel; following the agent (`dnsfence proxy --agent`, and
//! `dnsfence run` in one process) it takes the agent's snapshots and writes learned IPs
//! into the agent's table, and keeps both going when the agent is down.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dnsfence_datapath::Worker;
use dnsfence_dns::Snapshot;
use dnsfence_proxy::flows::FlowLog;
use dnsfence_proxy::{IpSink, NoopSink, Proxy, ProxyMetrics};
use prometheus_client::registry::Registry;
use tracing::{error, info, warn};

use crate::config::{NodeConfig, Usage};
use crate::desired::{compile, read_config, DesiredError};
use crate::follow::{self, Follower};
use crate::link::Connector;
use crate::sink::{DatapathSink, ReportingSink};
use crate::{persist, Controls};

/// Where the proxy's policies come from.
pub enum Source {
    /// `dnsfence proxy`: the configuration's own policy files, read again on a reload.
    Files,
    /// The agent, reached through `connector`.
    Agent {
        /// How to reach it.
        connector: Connector,
        /// The version of the snapshot the proxy starts with.
        version: u64,
        /// The datapath learned IPs go to.
        worker: Option<Worker>,
        /// `dnsfence run`: the agent is in this process; the datapath is its, and nothing
        /// is saved in `state_dir` (the agent's table and files are the state).
        embedded: bool,
    },
}

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A DNS listener cannot be bound.
    #[error("binding the DNS listeners: {0}")]
    Listeners(#[source] std::io::Error),
    /// The metrics listener cannot be bound.
    #[error("binding metrics.listen {addr}: {source}")]
    Metrics {
        /// Its address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where a running proxy's policies come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Its own files.
    Alone,
    /// An agent of another process.
    Following,
    /// The agent of this process.
    Embedded,
}

/// A running proxy.
pub struct ProxyNode {
    proxy: Proxy,
    config_path: PathBuf,
    config: Arc<NodeConfig>,
    mode: Mode,
}

impl ProxyNode {
    /// Binds every listener and starts serving: DNS from `snapshot`, the local API,
    /// metrics (`registry`, which gets the proxy's own) when `metrics.listen` is set.
    pub async fn start(
        config_path: &Path,
        config: NodeConfig,
        snapshot: Snapshot,
        source: Source,
        flows: Arc<FlowLog>,
        mut registry: Registry,
    ) -> Result<Self, StartError> {
        let metrics = ProxyMetrics::register(&mut registry);
        flows.metrics.register(&mut registry);
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(
                dnsfence_proxy::bind_metrics(addr)
                    .map_err(|source| StartError::Metrics { addr, source })?,
            ),
            None => None,
        };
        let (sink, follower): (Arc<dyn IpSink>, Option<Follower>) = match source {
            Source::Files => (Arc::new(NoopSink), None),
            Source::Agent {
                connector,
                version,
                worker,
                embedded,
            } => {
                let inner: Arc<dyn IpSink> = match &worker {
                    Some(w) => {
                        if !embedded {
                            w.use_selectors(snapshot.policies().clone());
                            w.stats.register(&mut registry);
                        }
                        Arc::new(DatapathSink(w.clone()))
                    }
                    None => Arc::new(NoopSink),
                };
                let (tx, reports) = tokio::sync::mpsc::channel(1024);
                let dropped = Arc::new(AtomicU64::new(0));
                let sink = Arc::new(ReportingSink {
                    inner,
                    tx,
                    dropped: dropped.clone(),
                });
                let follower = Follower {
                    connector,
                    worker,
                    shares_agent_datapath: embedded,
                    saves: !embedded,
                    version,
                    reports,
                    dropped,
                };
                (sink, Some(follower))
            }
        };
        let proxy = Proxy::start(config.dns.clone(), snapshot, sink, metrics, flows)
            .await
            .map_err(StartError::Listeners)?;
        if let Some(listener) = metrics_listener {
            let registry = Arc::new(registry);
            info!(addr = ?listener.local_addr().ok(), "metrics listening");
            tokio::spawn(async move {
                if let Err(e) = dnsfence_proxy::serve_metrics(listener, registry).await {
                    error!(error = %e, "metrics listener stopped");
                }
            });
        }
        info!(udp = ?proxy.udp_addrs(), tcp = ?proxy.tcp_addrs(), "DNS proxy listening");
        let shared = proxy.shared().clone();
        let socket = config.api.socket.clone();
        tokio::spawn(async move {
            if let Err(e) = dnsfence_proxy::serve_api(shared, &socket).await {
                error!(socket = %socket.display(), error = %e, "API socket unavailable");
            }
        });
        let mode = match &follower {
            None => Mode::Alone,
            Some(f) if f.shares_agent_datapath => Mode::Embedded,
            Some(_) => Mode::Following,
        };
        proxy
            .shared()
            .follows_agent
            .store(mode == Mode::Following, Ordering::Relaxed);
        let config = Arc::new(config);
        if let Some(f) = follower {
            if f.saves {
                persist::restore(proxy.shared(), &config).await;
                tokio::spawn(persist::journal(proxy.shared().clone(), config.clone()));
            }
            tokio::spawn(follow::follow(proxy.shared().clone(), config.clone(), f));
        }
        Ok(Self {
            proxy,
            config_path: config_path.to_owned(),
            config,
            mode,
        })
    }

    /// The proxy.
    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// Serves until `controls` says stop, then drains the queries in flight (at most
    /// `dns.drain_timeout`). A reload re-reads the policy files of a proxy on its own; a
    /// proxy following the agent leaves reloads to it.
    pub async fn serve(mut self, mut controls: Controls) {
        let mut reloads = true;
        loop {
            tokio::select! {
                requested = controls.reload.recv(), if reloads => match (requested, self.mode) {
                    (None, _) => reloads = false,
                    (Some(()), Mode::Alone) => self.reload().await,
                    (Some(()), Mode::Following) => {
                        info!("SIGHUP ignored: the agent owns the policies (reload the agent)");
                    }
                    // The agent of this process reloads.
                    (Some(()), Mode::Embedded) => {}
                },
                _ = controls.stop.changed() => break,
            }
        }
        info!("stopping: no new queries; draining those in flight");
        let left = self.proxy.drain(self.config.dns.drain_timeout).await;
        if left > 0 {
            warn!(left, "queries still in flight after dns.drain_timeout");
        }
        if self.mode == Mode::Following {
            persist::save_learned(self.proxy.shared(), &self.config);
        }
        info!("stopped");
    }

    /// Re-reads the configuration's policies; a set that fails validation is rejected and
    /// the running one stays in force.
    async fn reload(&self) {
        let path = self.config_path.clone();
        let previous = self.proxy.shared().snapshot().policies().clone();
        // Reading files and compiling policies are blocking work: off the DNS thread.
        let built = tokio::task::spawn_blocking(move || files_snapshot(&path, &previous)).await;
        match built {
            Ok(Ok(s)) => {
                self.proxy.shared().set_snapshot(s).await;
                info!("policies reloaded");
            }
            Ok(Err(e)) => error!("reload rejected, the running policy stays in force: {e:#}"),
            Err(e) => error!("reload failed: {e}"),
        }
    }
}

/// What a reload of `dnsfence proxy` reads: only the policies are taken from the new
/// file.
const RELOAD: Usage = Usage {
    reads_policies: true,
    listeners: crate::config::Listeners::Optional,
    files_only: false,
};

/// The snapshot of the configuration at `path` and its policy files; selectors of
/// `previous` keep their ids.
fn files_snapshot(
    path: &Path,
    previous: &dnsfence_policy::PolicySet,
) -> Result<Snapshot, DesiredError> {
    let config = read_config(path, RELOAD)?;
    snapshot_of_files(path, &config, previous)
}

/// The proxy's snapshot of the configuration's own files.
pub fn snapshot_of_files(
    path: &Path,
    config: &NodeConfig,
    previous: &dnsfence_policy::PolicySet,
) -> Result<Snapshot, DesiredError> {
    let docs = crate::files::policy_docs(path, config)?;
    let set = compile(&docs, previous, config.audit)?;
    Ok(follow::snapshot_of(
        Arc::new(set),
        &config.endpoints,
        &config.host_ips,
        config,
    ))
}
