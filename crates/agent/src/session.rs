//! The agent's end of one connection: a proxy following it (snapshots out,
//! acknowledgements and learned IPs in) or an operator's command (`dnsfence status`,
//! `dnsfence observe`), over either kind of [`Link`]; and the status it reports.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use dnsfence_datapath::Worker;
use dnsfence_policy::PolicySet;
use dnsfence_proxy::flows::{Flow, FlowLog};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::control::{Message, Role, SnapshotData, CONTROL_PROTOCOL};
use crate::drops::DropContext;
use crate::link::{Frame, Link};

/// A snapshot the agent serves: its version, what proxies are sent, and the policies it
/// was compiled into.
#[derive(Debug)]
pub(crate) struct Published {
    pub(crate) version: u64,
    pub(crate) data: SnapshotData,
    pub(crate) set: Arc<PolicySet>,
}

/// The snapshot in force (`None` until the first: Kubernetes mode before every watch has
/// listed).
pub(crate) type Current = Option<Arc<Published>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What `dnsfence status` shows about connected proxies.
#[derive(Debug, Default)]
pub(crate) struct ProxyState {
    pub(crate) acked: u64,
    pub(crate) learned_reports: u64,
    pub(crate) learned_ips: u64,
    pub(crate) connected: bool,
}

#[derive(Default)]
pub(crate) struct Status {
    pub(crate) proxies: BTreeMap<u32, ProxyState>,
    pub(crate) reloads: u64,
    pub(crate) rejected_reloads: u64,
    /// Policies in force (objects of the policy set, as the proxy counts them).
    pub(crate) policies: usize,
    /// Kubernetes mode, once listed.
    pub(crate) kubernetes: Option<KubernetesStatus>,
}

/// What `dnsfence status` shows of the cluster.
#[derive(Debug, Clone)]
pub(crate) struct KubernetesStatus {
    pub(crate) host_network_pods: Vec<String>,
    pub(crate) invalid_policies: usize,
    pub(crate) policy_objects: usize,
}

/// What every session of the agent shares.
#[derive(Clone)]
pub(crate) struct Sessions {
    /// The snapshot in force, as it changes.
    pub(crate) current: watch::Receiver<Current>,
    pub(crate) status: Arc<Mutex<Status>>,
    pub(crate) worker: Option<Worker>,
    pub(crate) started: Instant,
    pub(crate) flows: Arc<FlowLog>,
    pub(crate) context: Arc<DropContext>,
    /// Woken at every acknowledgement.
    pub(crate) acked: Arc<tokio::sync::Notify>,
}

/// Serves one connection: a proxy (snapshots out, acknowledgements and learned IPs in,
/// until it goes), or an operator's command (one status, or flow events).
pub(crate) async fn serve(mut link: Link, mut s: Sessions) -> std::io::Result<()> {
    let Some(Message::Hello {
        protocol,
        role,
        pid,
        ..
    }) = link.recv().await?.map(|f| f.message)
    else {
        return Ok(());
    };
    if protocol != CONTROL_PROTOCOL {
        let message = format!("agent speaks protocol {CONTROL_PROTOCOL}, not {protocol}");
        warn!(pid, "{message}");
        return link.send(Message::Error { message }).await;
    }
    let current = s.current.borrow_and_update().clone();
    link.send(Message::Hello {
        protocol: CONTROL_PROTOCOL,
        role: Role::Agent,
        pid: std::process::id(),
        version: current.as_ref().map_or(0, |c| c.version),
    })
    .await?;
    if role == Role::Cli {
        return match link.recv().await?.map(|f| f.message) {
            Some(Message::Observe { last, follow }) => {
                observe(&s.flows, last, follow, &mut link).await
            }
            _ => {
                let status =
                    status_json(&s.status, current.as_deref(), s.worker.as_ref(), s.started);
                link.send(Message::Status { status }).await
            }
        };
    }
    info!(pid, "proxy connected");
    lock(&s.status).proxies.entry(pid).or_default().connected = true;
    // Until the agent has a snapshot (Kubernetes mode, before every watch listed), the
    // proxy keeps serving from the one it saved.
    if let Some(current) = &current {
        link.send(snapshot_frame(current)).await?;
    }
    let result = loop {
        tokio::select! {
            changed = s.current.changed() => {
                if changed.is_err() {
                    break Ok(());
                }
                let Some(v) = s.current.borrow_and_update().clone() else { continue };
                if let Err(e) = link.send(snapshot_frame(&v)).await {
                    break Err(e);
                }
            }
            msg = link.recv() => match msg.map(|f| f.map(|f| f.message)) {
                Ok(Some(Message::Ack { version })) => {
                    debug!(pid, version, "snapshot acknowledged");
                    lock(&s.status).proxies.entry(pid).or_default().acked = version;
                    s.acked.notify_waiters();
                }
                Ok(Some(Message::Nack { version, reason })) => {
                    error!(pid, version, %reason, "proxy refused the snapshot");
                }
                Ok(Some(Message::Learned { ips, dropped })) => {
                    s.context.learned(&ips);
                    let mut st = lock(&s.status);
                    let p = st.proxies.entry(pid).or_default();
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
        let mut st = lock(&s.status);
        st.proxies.entry(pid).or_default().connected = false;
        forget_gone(&mut st.proxies, pid);
    }
    result
}

/// The snapshot message of `p`, with its compiled policies for a proxy of this process.
fn snapshot_frame(p: &Published) -> Frame {
    Frame {
        message: Message::Snapshot {
            version: p.version,
            snapshot: Box::new(p.data.clone()),
        },
        compiled: Some(p.set.clone()),
    }
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
    current: Option<&Published>,
    worker: Option<&Worker>,
    started: Instant,
) -> serde_json::Value {
    let s = lock(status);
    let version = current.map_or(0, |c| c.version);
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
        "endpoints": current.map_or(0, |c| c.data.endpoints.len()),
        "selectors": current.map_or(0, |c| c.data.selectors.len()),
        "table": current.and_then(|c| c.data.table.clone()),
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

/// Streams the agent's flow events (refused packets) to `dnsfence observe`.
async fn observe(
    flows: &FlowLog,
    last: usize,
    follow: bool,
    link: &mut Link,
) -> std::io::Result<()> {
    let mut live = flows.subscribe();
    let to_msg = |f: &Flow| Message::Flow {
        flow: serde_json::to_value(f).unwrap_or_default(),
    };
    for f in flows.last(last) {
        link.send(to_msg(&f)).await?;
    }
    if !follow {
        return Ok(());
    }
    loop {
        match live.recv().await {
            Ok(f) => link.send(to_msg(&f)).await?,
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
