//! The proxy's end of the link to the agent: it takes the agent's snapshots (each in force
//! before the next is read, acknowledged or refused), reports what it learns in batches,
//! and keeps enforcing the last snapshot while the agent is away, reconnecting every
//! 500 ms. `dnsfence proxy --agent` also saves each snapshot (where it starts when the
//! agent is not there) and its learned mappings ([`crate::persist`]); `dnsfence run`
//! follows the agent of its own process and shares its datapath.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dnsfence_datapath::ruleset::fqdn_set_name;
use dnsfence_datapath::Worker;
use dnsfence_dns::{EndpointSpec, Snapshot};
use dnsfence_fqdncache::Change;
use dnsfence_policy::{EndpointConfig, PolicySet};
use dnsfence_proxy::Shared;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::config::NodeConfig;
use crate::control::{LearnedIp, Message, Role, SnapshotData, CONTROL_PROTOCOL};
use crate::desired::{compile, DesiredError};
use crate::link::{Connector, Link};
use crate::persist;

/// Why a snapshot of the agent was refused; the previous one stays in force.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Its policies or endpoints are invalid.
    #[error(transparent)]
    Desired(#[from] DesiredError),
    /// The agent names a selector's sets otherwise than this proxy would: the two speak
    /// different versions, and learned IPs would go astray.
    #[error("selector {pattern:?}: the agent names its sets {v4}/{v6}, this proxy would not (version skew)")]
    SetNames {
        /// The selector.
        pattern: String,
        /// The agent's IPv4 set.
        v4: String,
        /// The agent's IPv6 set.
        v6: String,
    },
    /// The agent's selector is not in its own policies.
    #[error("selector {0:?} of the agent is not in the policies")]
    UnknownSelector(String),
    /// Compiling it stopped unexpectedly.
    #[error("compiling the snapshot stopped: {0}")]
    Stopped(#[from] tokio::task::JoinError),
}

/// The proxy's snapshot of `set` for `endpoints`, under the configuration's DNS section.
pub fn snapshot_of(
    set: Arc<PolicySet>,
    endpoints: &[EndpointConfig],
    host_ips: &[IpAddr],
    config: &NodeConfig,
) -> Snapshot {
    let dns = &config.dns;
    let endpoints: Vec<EndpointSpec> = endpoints
        .iter()
        .map(|e| EndpointSpec {
            name: e.name.clone(),
            namespace: e.namespace.clone(),
            labels: e.labels.clone(),
            ips: e.ips.clone(),
        })
        .collect();
    Snapshot::new(set, &endpoints, host_ips.to_vec(), dns.verdict())
        .with_search_suffixes(&dns.search_suffixes)
        .with_inside(Arc::new(dns.inside(&config.cluster_cidrs)))
}

/// Compiles the agent's snapshot data (unless the agent of this process compiled it
/// already). Set names are checked against the agent's.
pub fn compile_data(
    data: &SnapshotData,
    compiled: Option<Arc<PolicySet>>,
    config: &NodeConfig,
    previous: &PolicySet,
) -> Result<Snapshot, SnapshotError> {
    let set = match compiled {
        Some(set) => set,
        None => {
            Arc::new(compile(&data.policies, previous, data.audit).map_err(DesiredError::from)?)
        }
    };
    for sel in &data.selectors {
        let ours = set
            .fqdn_selectors()
            .iter()
            .find(|(_, p)| p.as_str() == sel.pattern);
        match ours {
            Some((_, p))
                if fqdn_set_name(p, false) == sel.v4 && fqdn_set_name(p, true) == sel.v6 => {}
            Some(_) => {
                return Err(SnapshotError::SetNames {
                    pattern: sel.pattern.clone(),
                    v4: sel.v4.clone(),
                    v6: sel.v6.clone(),
                })
            }
            None => return Err(SnapshotError::UnknownSelector(sel.pattern.clone())),
        }
    }
    Ok(snapshot_of(set, &data.endpoints, &data.host_ips, config))
}

/// Where `proxy --agent` starts: the saved snapshot, else the configuration's files.
pub fn initial(config_path: &Path, config: &NodeConfig) -> Result<(u64, Snapshot), DesiredError> {
    match persist::load(&persist::snapshot_file(config)) {
        Ok(Some(body)) => match serde_json::from_str::<persist::Saved>(&body) {
            Ok(saved) => match compile_data(&saved.data, None, config, &PolicySet::default()) {
                Ok(s) => {
                    info!(version = saved.version, "starting from the saved snapshot");
                    return Ok((saved.version, s));
                }
                Err(e) => error!("saved snapshot unusable, ignored: {e:#}"),
            },
            Err(e) => error!("saved snapshot unreadable, ignored: {e}"),
        },
        Ok(None) => {}
        Err(e) => error!("saved snapshot ignored: {e}"),
    }
    warn!(
        "no saved snapshot: starting from the configuration's policy files until the agent answers"
    );
    let docs = crate::files::policy_docs(config_path, config)?;
    let set = compile(&docs, &PolicySet::default(), config.audit)?;
    Ok((
        0,
        snapshot_of(Arc::new(set), &config.endpoints, &config.host_ips, config),
    ))
}

/// How a proxy follows the agent.
pub struct Follower {
    /// How it reaches the agent.
    pub connector: Connector,
    /// The datapath it writes learned IPs into: its own, writing only set elements
    /// (`proxy --agent`), or the agent's (`run`, which keeps the selectors it reconciled).
    pub worker: Option<Worker>,
    /// Whether the datapath is the agent's.
    pub shares_agent_datapath: bool,
    /// Whether snapshots are saved in `state_dir` (`proxy --agent`).
    pub saves: bool,
    /// The version it starts with.
    pub version: u64,
    /// Learned-IP changes to report.
    pub reports: mpsc::Receiver<Vec<Change>>,
    /// Changes not reported because the queue was full.
    pub dropped: Arc<AtomicU64>,
}

/// Follows the agent until the process ends.
pub async fn follow(shared: Arc<Shared>, config: Arc<NodeConfig>, mut f: Follower) {
    let mut was_connected = true;
    loop {
        match f.connector.connect().await {
            Ok(link) => {
                was_connected = true;
                let result = session(link, &shared, &config, &mut f).await;
                let version = f.version;
                match result {
                    Ok(()) => warn!(
                        version,
                        "agent went away; enforcing snapshot {version} meanwhile"
                    ),
                    Err(e) => {
                        warn!(version, error = %e, "agent connection lost; enforcing snapshot {version} meanwhile")
                    }
                }
            }
            Err(e) => {
                if was_connected {
                    warn!(agent = %f.connector.describe(), error = %e, version = f.version, "agent not reachable; retrying every 500 ms");
                    was_connected = false;
                }
            }
        }
        // Nobody to report to: let the queue drain.
        let pause = tokio::time::sleep(Duration::from_millis(500));
        tokio::pin!(pause);
        loop {
            tokio::select! {
                _ = &mut pause => break,
                r = f.reports.recv() => if r.is_none() { return },
            }
        }
    }
}

async fn session(
    mut link: Link,
    shared: &Arc<Shared>,
    config: &NodeConfig,
    f: &mut Follower,
) -> std::io::Result<()> {
    link.send(Message::Hello {
        protocol: CONTROL_PROTOCOL,
        role: Role::Proxy,
        pid: std::process::id(),
        version: f.version,
    })
    .await?;
    match link.recv().await?.map(|f| f.message) {
        Some(Message::Hello {
            protocol: CONTROL_PROTOCOL,
            ..
        }) => info!("connected to the agent"),
        Some(Message::Error { message }) => {
            error!(%message, "the agent refused this proxy");
            return Ok(());
        }
        other => {
            error!(?other, "unexpected answer from the agent");
            return Ok(());
        }
    }
    loop {
        tokio::select! {
            frame = link.recv() => {
                let Some(frame) = frame? else { return Ok(()) };
                match frame.message {
                    Message::Snapshot { version: v, snapshot } => {
                        // One at a time, in the order sent: the next message is read only
                        // once this snapshot is in force (or refused) and saved.
                        let reply = take_snapshot(shared, f, config, v, snapshot, frame.compiled).await;
                        if let Message::Ack { .. } = reply {
                            f.version = v;
                        }
                        link.send(reply).await?;
                    }
                    other => debug!(?other, "unexpected message from the agent"),
                }
            }
            batch = f.reports.recv() => {
                let Some(mut changes) = batch else { return Ok(()) };
                while let Ok(more) = f.reports.try_recv() {
                    changes.extend(more);
                }
                let dropped = f.dropped.swap(0, Ordering::Relaxed);
                link.send(Message::Learned { ips: report(&changes, Instant::now()), dropped }).await?;
            }
        }
    }
}

/// Learned-IP changes as the agent is told them.
fn report(changes: &[Change], now: Instant) -> Vec<LearnedIp> {
    changes
        .iter()
        .map(|c| match c {
            Change::Upsert {
                name, ip, expires, ..
            } => LearnedIp {
                name: name.to_string(),
                ip: *ip,
                ttl_ms: u64::try_from(expires.saturating_duration_since(now).as_millis())
                    .unwrap_or(u64::MAX),
            },
            Change::Remove { name, ip, .. } => LearnedIp {
                name: name.to_string(),
                ip: *ip,
                ttl_ms: 0,
            },
        })
        .collect()
}

/// Puts the agent's snapshot `v` in force (and saves it), or refuses it (the running one
/// stays in force); the answer for the agent. Compiling and saving (with an fsync) are
/// blocking work: they run off the DNS thread, which keeps answering meanwhile.
pub(crate) async fn take_snapshot(
    shared: &Arc<Shared>,
    f: &Follower,
    config: &NodeConfig,
    v: u64,
    data: Box<SnapshotData>,
    compiled: Option<Arc<PolicySet>>,
) -> Message {
    let data = match apply(shared, f, config, data, compiled).await {
        Ok(data) => data,
        Err(e) => {
            error!(
                version = v,
                "snapshot refused, the previous one stays in force: {e:#}"
            );
            return Message::Nack {
                version: v,
                reason: e.to_string(),
            };
        }
    };
    if !f.shares_agent_datapath {
        shared.snapshot_version.store(v, Ordering::Relaxed);
        shared
            .metrics
            .snapshot_version
            .set(i64::try_from(v).unwrap_or(i64::MAX));
    }
    if f.saves {
        let file = persist::snapshot_file(config);
        if let Err(e) =
            tokio::task::spawn_blocking(move || persist::save_snapshot(&file, v, *data)).await
        {
            warn!(error = %e, "saving the snapshot failed");
        }
    }
    info!(version = v, "snapshot in force");
    Message::Ack { version: v }
}

/// Compiles `data` (off the DNS thread) and puts it in force; gives `data` back for saving.
async fn apply(
    shared: &Arc<Shared>,
    f: &Follower,
    config: &NodeConfig,
    data: Box<SnapshotData>,
    compiled: Option<Arc<PolicySet>>,
) -> Result<Box<SnapshotData>, SnapshotError> {
    let previous = shared.snapshot().policies().clone();
    let local = config.clone();
    let (data, snapshot) = tokio::task::spawn_blocking(move || {
        let snapshot = compile_data(&data, compiled, &local, &previous);
        (data, snapshot)
    })
    .await?;
    let snapshot = snapshot?;
    if let (Some(worker), false) = (&f.worker, f.shares_agent_datapath) {
        // Selector sets first, so the moves of learned IPs below land in them.
        let (w, p) = (worker.clone(), snapshot.policies().clone());
        tokio::task::spawn_blocking(move || w.use_selectors(p)).await?;
    }
    shared.set_snapshot(snapshot).await;
    Ok(data)
}

#[cfg(test)]
mod tests;
