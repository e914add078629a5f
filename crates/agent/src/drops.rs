//! Refused packets as flow events: the datapath reads them from the kernel's log and says
//! who sent them and where to; this module adds what the agent knows, the endpoint behind
//! the source address (from the snapshot in force) and the names the destination was
//! learned for (from the proxies' reports).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use dnsfence_proxy::flows::{Flow, Source};

use crate::control::{LearnedIp, SnapshotData};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the agent knows to describe a refused packet: the names the proxies reported for
/// each address, and the endpoints of the snapshot in force.
#[derive(Debug, Default)]
pub struct DropContext {
    names: Mutex<HashMap<IpAddr, Vec<(String, Instant)>>>,
    endpoints: Mutex<HashMap<IpAddr, Arc<Source>>>,
}

/// Addresses whose names are remembered at once (a bound on memory; the proxies' own
/// caches are bounded the same way).
const DROP_CONTEXT_ADDRESSES: usize = 200_000;

impl DropContext {
    /// Takes a proxy's report of learned (or forgotten: TTL 0) mappings.
    pub fn learned(&self, ips: &[LearnedIp]) {
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
    pub fn names_of(&self, ip: IpAddr) -> Vec<String> {
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
    pub fn set_endpoints(&self, data: &SnapshotData) {
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

/// A refused packet as a flow event, with the endpoint it came from and the names its
/// destination was learned for.
pub fn drop_flow(r: &dnsfence_datapath::drops::Refusal, context: &DropContext) -> Flow {
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
