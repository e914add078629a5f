//! `dnsfence proxy --agent`: the proxy as a separate process. It takes its snapshots from
//! the agent ([`dnsfence_agent::control`]), writes learned IPs itself into the agent's
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
use dnsfence_agent::config::NodeConfig as Config;
use dnsfence_agent::control::{
    read_message, write_message, LearnedIp, Message, Role, SnapshotData, CONTROL_PROTOCOL,
};
use dnsfence_datapath::ruleset::fqdn_set_name;
use dnsfence_datapath::Worker;
use dnsfence_fqdncache::Change;
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
    config: &Config,
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
    snapshot_of(set, &data.endpoints, &data.host_ips, config)
}

/// Where the proxy starts: the saved snapshot, else the configuration's files.
pub(crate) fn initial(config_path: &Path, config: &Config) -> Result<(u64, Snapshot)> {
    match state::load(&snapshot_file(config)) {
        Ok(Some(body)) => match serde_json::from_str::<Saved>(&body) {
            Ok(saved) => match compile_data(&saved.data, config, &Default::default()) {
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
        snapshot_of(set, &config.endpoints, &config.host_ips, config)?,
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
                    // One at a time, in the order sent: the next message is read only once
                    // this snapshot is in force (or refused) and saved.
                    let reply = take_snapshot(shared, worker, config, v, snapshot).await;
                    if let Message::Ack { .. } = reply {
                        *version = v;
                    }
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

/// Puts the agent's snapshot `v` in force and saves it, or refuses it (the running one stays
/// in force); the answer for the agent. Compiling and saving (with an fsync) are blocking
/// work: they run off the DNS thread, which keeps answering meanwhile.
async fn take_snapshot(
    shared: &Arc<Shared>,
    worker: Option<&Worker>,
    config: &Config,
    v: u64,
    data: Box<SnapshotData>,
) -> Message {
    let data = match apply(shared, worker, config, data).await {
        Ok(data) => data,
        Err(e) => {
            error!(
                version = v,
                "snapshot refused, the previous one stays in force: {e:#}"
            );
            return Message::Nack {
                version: v,
                reason: format!("{e:#}"),
            };
        }
    };
    shared
        .snapshot_version
        .store(v, std::sync::atomic::Ordering::Relaxed);
    shared
        .metrics
        .snapshot_version
        .set(i64::try_from(v).unwrap_or(i64::MAX));
    let file = snapshot_file(config);
    if let Err(e) = tokio::task::spawn_blocking(move || save_snapshot(&file, v, *data)).await {
        warn!(error = %e, "saving the snapshot failed");
    }
    info!(version = v, "snapshot in force");
    Message::Ack { version: v }
}

/// Compiles `data` (off the DNS thread) and puts it in force; gives `data` back for saving.
async fn apply(
    shared: &Arc<Shared>,
    worker: Option<&Worker>,
    config: &Config,
    data: Box<SnapshotData>,
) -> Result<Box<SnapshotData>> {
    let previous = shared.snapshot().policies().clone();
    let local = config.clone();
    let (data, compiled) = tokio::task::spawn_blocking(move || {
        let compiled = compile_data(&data, &local, &previous);
        (data, compiled)
    })
    .await?;
    let snapshot = compiled?;
    if let Some(worker) = worker {
        // Selector sets first, so the moves of learned IPs below land in them.
        let (w, p) = (worker.clone(), snapshot.policies().clone());
        tokio::task::spawn_blocking(move || w.use_selectors(p)).await?;
    }
    shared.set_snapshot(snapshot).await;
    Ok(data)
}

fn save_snapshot(file: &Path, version: u64, data: SnapshotData) {
    let body = match serde_json::to_string(&Saved { version, data }) {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "encoding the snapshot failed");
            return;
        }
    };
    if let Err(e) = state::save(file, &body) {
        warn!(error = %e, "saving the snapshot failed");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests: a panic is a failure")]
mod tests {
    use super::*;
    use dnsfence_policy::PolicyDoc;
    use dnsfence_proxy::{NoopSink, Proxy, ProxyMetrics};

    /// `n` policies, each with its own DNS rule and `toFQDNs` selectors.
    fn snapshot_data(n: usize) -> SnapshotData {
        let text: String = (0..n)
            .map(|i| {
                format!(
                    "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{i}, namespace: n}}\nspec:\n  endpointSelector: {{matchLabels: {{app: a{i}}}}}\n  egress:\n    - toEndpoints: [{{matchLabels: {{k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}}}]\n      toPorts: [{{ports: [{{port: \"53\", protocol: ANY}}], rules: {{dns: [{{matchPattern: \"*.s{i}.example.com\"}}]}}}}]\n    - toFQDNs: [{{matchName: api.s{i}.example.com}}, {{matchPattern: \"*.cdn{i}.example.com\"}}]\n"
                )
            })
            .collect();
        SnapshotData {
            policies: vec![PolicyDoc {
                file: "policies.yaml".to_owned(),
                text,
            }],
            endpoints: Vec::new(),
            host_ips: Vec::new(),
            selectors: Vec::new(),
            table: None,
            audit: false,
        }
    }

    /// Applying a snapshot must not stall the single DNS thread: compiling it (and saving
    /// it) happen on a blocking thread while the runtime keeps running its other tasks.
    #[tokio::test(flavor = "current_thread")]
    async fn a_snapshot_is_compiled_off_the_dns_thread() {
        let dir = std::env::temp_dir().join(format!("dnsfence-follow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = Config::parse("c.yaml", "").unwrap();
        config.state_dir = dir.clone();
        // Big enough that compiling it takes a while, even on a fast machine.
        let mut n = 500;
        let (data, took) = loop {
            let data = snapshot_data(n);
            let started = Instant::now();
            compile_data(&data, &config, &Default::default()).unwrap();
            let took = started.elapsed();
            if took >= Duration::from_millis(300) || n >= 64_000 {
                break (data, took);
            }
            n *= 2;
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let flows = dnsfence_proxy::flows::FlowLog::new(
            &config.flows,
            dnsfence_proxy::flows::FlowMetrics::default(),
        );
        let proxy = Proxy::start(
            config.dns.clone(),
            compile_data(&snapshot_data(1), &config, &Default::default()).unwrap(),
            Arc::new(NoopSink),
            ProxyMetrics::register(&mut registry),
            flows,
        )
        .await
        .unwrap();
        // A task standing for the DNS listeners: how long does it wait for its turn?
        let longest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
        let ticker = tokio::spawn({
            let longest = longest.clone();
            async move {
                loop {
                    let before = Instant::now();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let gap = before.elapsed();
                    let mut l = longest.lock().unwrap();
                    *l = (*l).max(gap);
                }
            }
        });
        tokio::task::yield_now().await;
        let reply = take_snapshot(proxy.shared(), None, &config, 7, Box::new(data)).await;
        ticker.abort();
        assert!(matches!(reply, Message::Ack { version: 7 }), "{reply:?}");
        assert_eq!(proxy.shared().snapshot().policies().policies().len(), n);
        assert!(state::load(&snapshot_file(&config)).unwrap().is_some());
        let longest = *longest.lock().unwrap();
        assert!(
            longest < took / 2,
            "the runtime stalled {longest:?} while a snapshot that takes {took:?} to compile was applied"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
