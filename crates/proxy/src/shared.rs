//! State shared by every listener: the policy snapshot and its swap, the learned mappings,
//! the sink, the forwarder (queries in flight upstream), per-client fairness, flow
//! sources, the coarse clock, counters. Judging a query lives in [`judge`], learning from
//! its answer and holding the answer in [`learn`].

mod judge;
mod learn;

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwap;
use dnsfence_dns::forward::{Forwarder, ForwarderConfig};
use dnsfence_dns::Snapshot;
use dnsfence_fqdncache::{Change, FqdnCache};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::clock::Clock;
use crate::config::DnsConfig;
use crate::flows::{FlowLog, Source};
use crate::metrics::ProxyMetrics;
use crate::sink::IpSink;
use crate::upstream::Fwd;

pub(crate) use judge::Step;

/// Shared proxy state.
pub struct Shared {
    pub(crate) config: DnsConfig,
    snapshot: ArcSwap<Snapshot>,
    cache: Arc<Mutex<FqdnCache>>,
    sink: Arc<dyn IpSink>,
    refresh: mpsc::UnboundedSender<Vec<Change>>,
    inflight: Mutex<foldhash::HashMap<IpAddr, u32>>,
    /// Metrics (also read by tests).
    pub metrics: ProxyMetrics,
    /// Flow events.
    pub flows: Arc<FlowLog>,
    /// Queries in flight upstream, and the upstreams' health; the UDP batches, the TCP
    /// connections and the upstream timer take turns with it.
    forwarder: Mutex<Fwd>,
    /// The coarse clock.
    pub(crate) clock: Clock,
    /// IPs the sink is enforcing right now, each with the confirmation of its batch: a
    /// later answer carrying one waits for the same confirmation as the first.
    confirming: Arc<Mutex<foldhash::HashMap<IpAddr, Confirmation>>>,
    sources: ArcSwap<foldhash::HashMap<IpAddr, Arc<Source>>>,
    /// The version of the agent's snapshot in force (0: none, or not following an agent).
    pub snapshot_version: std::sync::atomic::AtomicU64,
    /// Whether this proxy takes its policy from an agent (`proxy --agent`), rather than
    /// from its own files (`run`, or `proxy` alone).
    pub follows_agent: std::sync::atomic::AtomicBool,
    /// When the snapshot in force was swapped in (by the coarse clock).
    snapshot_at: Mutex<Instant>,
    /// The node's interface addresses, and when they were last read.
    local_ips: ArcSwap<foldhash::HashSet<IpAddr>>,
    local_ips_at: Mutex<Option<Instant>>,
}

/// Turns true when the sink is done with a batch of new IPs (confirmed or failed).
pub(crate) type Confirmation = watch::Receiver<bool>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// The state of a proxy starting at `now`.
    pub(crate) fn new(
        config: DnsConfig,
        snapshot: Snapshot,
        sink: Arc<dyn IpSink>,
        metrics: ProxyMetrics,
        flows: Arc<FlowLog>,
        now: Instant,
    ) -> (Self, mpsc::UnboundedReceiver<Vec<Change>>) {
        let cache = FqdnCache::new(config.cache());
        let (refresh, refresh_rx) = mpsc::unbounded_channel();
        let sources = Self::prepare_sources(&snapshot);
        let forwarder = Forwarder::new(
            ForwarderConfig {
                upstreams: config.upstreams.clone(),
                timeout: config.upstream_timeout,
                hedge_after: config.hedge_after(),
            },
            rand::make_rng(),
        );
        let shared = Self {
            forwarder: Mutex::new(forwarder),
            clock: Clock::new(now),
            config,
            snapshot: ArcSwap::from_pointee(snapshot),
            cache: Arc::new(Mutex::new(cache)),
            sink,
            refresh,
            inflight: Mutex::default(),
            metrics,
            flows,
            confirming: Arc::default(),
            sources: ArcSwap::from_pointee(sources),
            snapshot_version: std::sync::atomic::AtomicU64::new(0),
            follows_agent: std::sync::atomic::AtomicBool::new(false),
            snapshot_at: Mutex::new(now),
            local_ips: ArcSwap::from_pointee(crate::sys::local_addresses()),
            local_ips_at: Mutex::new(None),
        };
        (shared, refresh_rx)
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Swaps in a new snapshot and moves learned IPs to the selectors it defines.
    pub async fn set_snapshot(&self, snapshot: Snapshot) {
        let changes = lock(&self.cache).reselect(snapshot.policies());
        self.sources
            .store(Arc::new(Self::prepare_sources(&snapshot)));
        self.snapshot.store(Arc::new(snapshot));
        *lock(&self.snapshot_at) = self.clock.now();
        self.metrics.snapshot_version.set(
            i64::try_from(
                self.snapshot_version
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
            .unwrap_or(i64::MAX),
        );
        if !changes.is_empty() {
            if let Err(e) = self.sink.apply(changes).await {
                warn!(
                    error = &e as &dyn std::error::Error,
                    "applying selector changes after a policy update failed"
                );
            }
        }
    }

    /// Puts back mappings saved before a restart (name, IP, time left), as if their
    /// answers had just arrived (by the coarse clock), and has the sink enforce them.
    pub async fn restore(&self, entries: &[(String, IpAddr, std::time::Duration)]) -> usize {
        let changes = {
            let snapshot = self.snapshot.load();
            let mut cache = lock(&self.cache);
            let now = self.clock.now();
            let mut changes = Vec::new();
            for (name, ip, left) in entries {
                let Ok(folded) = dnsfence_policy::FoldedName::new(name.as_bytes()) else {
                    continue;
                };
                changes.extend(cache.learn(
                    now,
                    std::slice::from_ref(&folded),
                    std::slice::from_ref(ip),
                    *left,
                    snapshot.policies(),
                ));
            }
            self.gauge(&cache);
            changes
        };
        let n = changes.len();
        if n > 0 {
            if let Err(e) = self.sink.apply(changes).await {
                warn!(
                    error = &e as &dyn std::error::Error,
                    "enforcing restored IPs failed"
                );
            }
        }
        n
    }

    /// Runs `f` on the learned mappings.
    pub fn with_cache<R>(&self, f: impl FnOnce(&FqdnCache) -> R) -> R {
        f(&lock(&self.cache))
    }

    /// How long ago the proxy started (by the coarse clock).
    pub fn uptime(&self) -> std::time::Duration {
        self.clock.uptime()
    }

    /// The forwarder, locked. Never held across an `await`.
    pub(crate) fn forwarder(&self) -> MutexGuard<'_, Fwd> {
        lock(&self.forwarder)
    }

    /// The flow source of `ip`: the endpoint's namespace, name and labels when known
    /// (prepared once per snapshot, so an event costs no formatting).
    pub fn source(&self, ip: IpAddr) -> Arc<Source> {
        if let Some(s) = self.sources.load().get(&ip) {
            return s.clone();
        }
        Arc::new(Source {
            ip: Some(ip),
            ..Source::default()
        })
    }

    fn prepare_sources(snapshot: &Snapshot) -> foldhash::HashMap<IpAddr, Arc<Source>> {
        snapshot
            .endpoints()
            .map(|(ip, ep)| {
                (
                    ip,
                    Arc::new(Source {
                        ip: Some(ip),
                        namespace: Some(ep.endpoint.namespace().to_owned()),
                        pod_name: Some(ep.name.clone()),
                        labels: ep
                            .endpoint
                            .labels()
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect(),
                    }),
                )
            })
            .collect()
    }

    /// Queries forwarded upstream and not answered yet, over all clients.
    pub fn in_flight(&self) -> u32 {
        lock(&self.inflight).values().sum()
    }

    /// Counts a query in flight for `client`; false when over the bound.
    fn enter(&self, client: IpAddr) -> bool {
        let mut inflight = lock(&self.inflight);
        let n = inflight.entry(client).or_insert(0);
        if *n >= self.config.max_inflight_per_client {
            return false;
        }
        *n += 1;
        true
    }

    /// Accounts for an answer that left for `client` at `at` (its query arrived at
    /// `received`): the query is done.
    pub(crate) fn delivered(&self, client: IpAddr, received: Instant, at: Instant) {
        self.metrics
            .latency_total
            .observe(at.saturating_duration_since(received).as_secs_f64());
        self.leave(client);
    }

    /// Ends a query in flight for `client`.
    pub(crate) fn leave(&self, client: IpAddr) {
        let mut inflight = lock(&self.inflight);
        if let Some(n) = inflight.get_mut(&client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inflight.remove(&client);
            }
        }
    }
}
