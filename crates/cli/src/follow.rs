//! `dnsfence proxy --agent`: the proxy as a separate process. It takes its snapshots from
//! the agent ([`dnsfence_proxy::control`]), writes learned IPs itself into the agent's
//! selector sets, and keeps both going when the agent is down:
//!
//! - each snapshot is saved in `state_dir` (atomic, checksummed) and is where the proxy
//!   starts when the agent is not there (then from the configuration's own files);
//! - learned mappings are saved every 2 s and on exit, and restored with their remaining
//!   TTLs at start, so a restart of both processes keeps pods' names working;
//! - it reconnects to the agent every 500 ms and reports what it learns in batches.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use dnsfence_datapath::ruleset::fqdn_set_name;
use dnsfence_datapath::Worker;
use dnsfence_fqdncache::Change;
use dnsfence_proxy::config::{Config, DnsConfig};
use dnsfence_proxy::control::{
    read_message, write_message, LearnedIp, Message, Role, SnapshotData, CONTROL_PROTOCOL,
};
use dnsfence_proxy::{IpSink, Shared, SinkFuture, Snapshot};
use serde::{Deserialize, Serialize};
use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::proxy::{compile, policy_docs, snapshot_of};
use crate::state;

/// The saved snapshot.
#[derive(Serialize, Deserialize)]
struct Saved {
    version: u64,
    data: SnapshotData,
}

/// One saved learned IP.
#[derive(Serialize, Deserialize)]
struct SavedIp {
    name: String,
    ip: IpAddr,
    /// Unix time, milliseconds.
    expires_ms: u64,
}

fn snapshot_file(config: &Config) -> PathBuf {
    config.state_dir.join("proxy-snapshot.json")
}

fn learned_file(config: &Config) -> PathBuf {
    config.state_dir.join("proxy-learned.json")
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Compiles the agent's snapshot data. Set names are checked against the agent's: a
/// mismatch means the two speak different versions and learned IPs would go astray.
pub(crate) fn compile_data(
    data: &SnapshotData,
    dns: &DnsConfig,
    previous: &dnsfence_policy::PolicySet,
) -> Result<Snapshot> {
    let set = compile(&data.policies, previous, data.audit)?;
    for sel in &data.selectors {
        let ours = set
            .fqdn_selectors()
            .iter()
            .find(|(_, p)| p.as_str() == sel.pattern);
        match ours {
            Some((_, p)) if fqdn_set_name(p, false) == sel.v4 && fqdn_set_name(p, true) == sel.v6 => {}
            Some(_) => anyhow::bail!(
                "selector {:?}: the agent names its sets {}/{}, this proxy would not (version skew)",
                sel.pattern,
                sel.v4,
                sel.v6
            ),
            None => anyhow::bail!("selector {:?} of the agent is not in the policies", sel.pattern),
        }
    }
    snapshot_of(set, &data.endpoints, &data.host_ips, dns)
}

/// Where the proxy starts: the saved snapshot, else the configuration's files.
pub(crate) fn initial(config_path: &Path, config: &Config) -> Result<(u64, Snapshot)> {
    match state::load(&snapshot_file(config)) {
        Ok(Some(body)) => match serde_json::from_str::<Saved>(&body) {
            Ok(saved) => match compile_data(&saved.data, &config.dns, &Default::default()) {
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
    let docs = policy_docs(config_path, config)?;
    let set = compile(&docs, &Default::default(), config.audit)?;
    Ok((
        0,
        snapshot_of(set, &config.endpoints, &config.host_ips, &config.dns)?,
    ))
}

/// A sink that also reports learned IPs to the agent (never blocking: when the report
/// queue is full, changes are counted as dropped).
pub(crate) struct ReportingSink {
    pub(crate) inner: Arc<dyn IpSink>,
    pub(crate) tx: mpsc::Sender<Vec<Change>>,
    pub(crate) dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl IpSink for ReportingSink {
    fn apply(&self, changes: Vec<Change>) -> SinkFuture {
        if self.tx.try_send(changes.clone()).is_err() {
            self.dropped
                .fetch_add(changes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        self.inner.apply(changes)
    }
}

/// Puts back the learned mappings saved before a restart.
pub(crate) async fn restore(shared: &Shared, config: &Config) {
    let body = match state::load(&learned_file(config)) {
        Ok(Some(b)) => b,
        Ok(None) => return,
        Err(e) => {
            error!("saved learned IPs ignored: {e}");
            return;
        }
    };
    let saved: Vec<SavedIp> = match serde_json::from_str(&body) {
        Ok(s) => s,
        Err(e) => {
            error!("saved learned IPs unreadable, ignored: {e}");
            return;
        }
    };
    let now = unix_ms();
    let entries: Vec<(String, IpAddr, Duration)> = saved
        .into_iter()
        .filter(|s| s.expires_ms > now)
        .map(|s| (s.name, s.ip, Duration::from_millis(s.expires_ms - now)))
        .collect();
    let n = shared.restore(&entries).await;
    info!(
        mappings = entries.len(),
        changes = n,
        "learned IPs restored"
    );
}

/// Saves the learned mappings.
pub(crate) fn save_learned(shared: &Shared, config: &Config) {
    let now_i = Instant::now();
    let now = unix_ms();
    let saved: Vec<SavedIp> = shared.with_cache(|c| {
        c.iter()
            .flat_map(|(name, ips, _)| {
                ips.iter().map(move |l| SavedIp {
                    name: name.to_owned(),
                    ip: l.ip,
                    expires_ms: now
                        + u64::try_from(l.expires.saturating_duration_since(now_i).as_millis())
                            .unwrap_or(0),
                })
            })
            .collect()
    });
    match serde_json::to_string(&saved) {
        Ok(body) => {
            if let Err(e) = state::save(&learned_file(config), &body) {
                warn!(error = %e, "saving learned IPs failed");
            }
        }
        Err(e) => warn!(error = %e, "encoding learned IPs failed"),
    }
}

/// Saves the learned mappings every 2 s.
pub(crate) async fn journal(shared: Arc<Shared>, config: Arc<Config>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (shared, config) = (shared.clone(), config.clone());
        let _ = tokio::task::spawn_blocking(move || save_learned(&shared, &config)).await;
    }
}

/// Follows the agent until the process ends.
pub(crate) async fn follow(
    shared: Arc<Shared>,
    worker: Option<Worker>,
    config: Arc<Config>,
    mut version: u64,
    mut reports: mpsc::Receiver<Vec<Change>>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut was_connected = true;
    loop {
        match UnixStream::connect(&config.api.agent_socket).await {
            Ok(stream) => {
                was_connected = true;
                let result = session(
                    stream,
                    &shared,
                    worker.as_ref(),
                    &config,
                    &mut version,
                    &mut reports,
                    &dropped,
                )
                .await;
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
                    warn!(socket = %config.api.agent_socket.display(), error = %e, version, "agent not reachable; retrying every 500 ms");
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
                r = reports.recv() => if r.is_none() { return },
            }
        }
    }
}

async fn session(
    stream: UnixStream,
    shared: &Arc<Shared>,
    worker: Option<&Worker>,
    config: &Config,
    version: &mut u64,
    reports: &mut mpsc::Receiver<Vec<Change>>,
    dropped: &std::sync::atomic::AtomicU64,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    write_message(
        &mut wr,
        &Message::Hello {
            protocol: CONTROL_PROTOCOL,
            role: Role::Proxy,
            pid: std::process::id(),
            version: *version,
        },
    )
    .await?;
    match read_message(&mut rd, &mut line).await? {
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
            msg = read_message(&mut rd, &mut line) => match msg? {
                None => return Ok(()),
                Some(Message::Snapshot { version: v, snapshot }) => {
                    let reply = match apply(shared, worker, config, &snapshot).await {
                        Ok(()) => {
                            *version = v;
                            shared
                                .snapshot_version
                                .store(v, std::sync::atomic::Ordering::Relaxed);
                            shared
                                .metrics
                                .snapshot_version
                                .set(i64::try_from(v).unwrap_or(i64::MAX));
                            save_snapshot(config, v, *snapshot);
                            info!(version = v, "snapshot in force");
                            Message::Ack { version: v }
                        }
                        Err(e) => {
                            error!(version = v, "snapshot refused, the previous one stays in force: {e:#}");
                            Message::Nack { version: v, reason: format!("{e:#}") }
                        }
                    };
                    write_message(&mut wr, &reply).await?;
                }
                Some(other) => debug!(?other, "unexpected message from the agent"),
            },
            batch = reports.recv() => {
                let Some(first) = batch else { return Ok(()) };
                let mut changes = first;
                while let Ok(more) = reports.try_recv() {
                    changes.extend(more);
                }
                let now = Instant::now();
                let ips = changes
                    .iter()
                    .map(|c| match c {
                        Change::Upsert { name, ip, expires, .. } => LearnedIp {
                            name: name.to_string(),
                            ip: *ip,
                            ttl_ms: u64::try_from(expires.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX),
                        },
                        Change::Remove { name, ip, .. } => LearnedIp { name: name.to_string(), ip: *ip, ttl_ms: 0 },
                    })
                    .collect();
                let dropped = dropped.swap(0, std::sync::atomic::Ordering::Relaxed);
                write_message(&mut wr, &Message::Learned { ips, dropped }).await?;
            }
        }
    }
}

async fn apply(
    shared: &Arc<Shared>,
    worker: Option<&Worker>,
    config: &Config,
    data: &SnapshotData,
) -> Result<()> {
    let previous = shared.snapshot().policies().clone();
    let snapshot = compile_data(data, &config.dns, &previous)?;
    if let Some(worker) = worker {
        // Selector sets first, so the moves of learned IPs below land in them.
        let (w, p) = (worker.clone(), snapshot.policies().clone());
        tokio::task::spawn_blocking(move || w.use_selectors(p)).await?;
    }
    shared.set_snapshot(snapshot).await;
    Ok(())
}

fn save_snapshot(config: &Config, version: u64, data: SnapshotData) {
    let body = match serde_json::to_string(&Saved { version, data }) {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "encoding the snapshot failed");
            return;
        }
    };
    if let Err(e) = state::save(&snapshot_file(config), &body) {
        warn!(error = %e, "saving the snapshot failed");
    }
}
