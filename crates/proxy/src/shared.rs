//! State shared by every listener: the policy snapshot, the learned mappings, the sink,
//! per-client fairness, counters; and the step common to UDP and TCP: judge a query,
//! learn from its answer and hold the answer until the IPs are enforced.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwap;
use dnsfence_dns::Reason;
use dnsfence_dns::{check_answer, parse_query, write_reply, ParsedQuery, Query, Rcode, Snapshot};
use dnsfence_fqdncache::{Change, FqdnCache};
use dnsfence_policy::{DnsReason, Protocol};

use crate::flows::{self, Dns, Flow, FlowLog, Source};
use smallvec::SmallVec;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::config::DnsConfig;
use crate::metrics::{ProxyMetrics, TransportLabel, VerdictLabel};
use crate::sink::{IpSink, SinkFuture};

/// Who asked a query that is being answered, for its flow event.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asked {
    /// The client.
    pub(crate) client: IpAddr,
    /// The server the query went to.
    pub(crate) server: SocketAddr,
    /// When the query arrived.
    pub(crate) received: Instant,
    /// When the answer arrived (read once per batch of answers).
    pub(crate) answered: Instant,
}

fn rcode_name(rcode: u8) -> Cow<'static, str> {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        other => format!("RCODE{other}").into(),
    }
}

/// A decision's reason, for people.
fn reason_text(reason: &Reason<'_>) -> String {
    match reason {
        Reason::UnknownClient => "unknown client: not in the endpoint inventory".into(),
        Reason::Policy(r) => match r {
            DnsReason::NotEnforced => "no policy enforces the endpoint".into(),
            DnsReason::Pattern { rule, pattern } => {
                format!("{} {}: {}", rule.policy, rule.path, pattern.as_str())
            }
            DnsReason::PortAllowed { rule } => {
                format!(
                    "{} {}: port allowed without DNS rules",
                    rule.policy, rule.rule.path
                )
            }
            DnsReason::NoPatternMatches => "no DNS rule pattern matches the name".into(),
            DnsReason::NotCovered => "no rule allows DNS to this server and port".into(),
            DnsReason::Denied { rule } => {
                if matches!(rule.rule.peer, dnsfence_policy::Peer::Fqdns(_)) {
                    format!(
                        "{} {}: egressDeny toFQDNs denies the name (deny wins)",
                        rule.policy, rule.rule.path
                    )
                } else {
                    format!("{} {}: egressDeny", rule.policy, rule.rule.path)
                }
            }
            DnsReason::InvalidName(e) => format!("not a hostname: {e}"),
        },
        Reason::SearchList { suffix } => {
            format!("an allowed name with search domain {suffix} appended: forwarded, not learned")
        }
    }
}

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
    pub(crate) tcp_pool: crate::tcp::Pool,
    /// Which configured upstreams stopped answering.
    pub(crate) upstreams: crate::health::Health,
    /// IPs the sink is enforcing right now, each with the confirmation of its batch: a
    /// later answer carrying one waits for the same confirmation as the first.
    confirming: Arc<Mutex<foldhash::HashMap<IpAddr, Confirmation>>>,
    sources: ArcSwap<foldhash::HashMap<IpAddr, Arc<Source>>>,
    /// The version of the agent's snapshot in force (0: none, or not following an agent).
    pub snapshot_version: std::sync::atomic::AtomicU64,
    /// Whether this proxy takes its policy from an agent (`proxy --agent`), rather than
    /// from its own files (`run`, or `proxy` alone).
    pub follows_agent: std::sync::atomic::AtomicBool,
    started: Instant,
    snapshot_at: Mutex<Instant>,
    /// The node's interface addresses, and when they were last read.
    local_ips: ArcSwap<foldhash::HashSet<IpAddr>>,
    local_ips_at: Mutex<Option<Instant>>,
}

/// How often the node's interface addresses are read again.
const LOCAL_ADDRESSES_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Turns true when the sink is done with a batch of new IPs (confirmed or failed).
pub(crate) type Confirmation = watch::Receiver<bool>;

/// What to do with a client's query.
#[allow(
    clippy::large_enum_variant,
    reason = "lives on the stack for one query; boxing would allocate per query"
)]
pub(crate) enum Step {
    /// Send these bytes back (length within the reply buffer).
    Reply(usize),
    /// Forward upstream to the given server; the parsed query says what to expect back,
    /// the flag whether the answer may teach IPs.
    Forward(Query, bool, SocketAddr),
    /// Send nothing.
    Drop,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn new(
        config: DnsConfig,
        snapshot: Snapshot,
        sink: Arc<dyn IpSink>,
        metrics: ProxyMetrics,
        flows: Arc<FlowLog>,
    ) -> (Self, mpsc::UnboundedReceiver<Vec<Change>>) {
        let cache = FqdnCache::new(config.cache());
        let (refresh, refresh_rx) = mpsc::unbounded_channel();
        let sources = Self::prepare_sources(&snapshot);
        let upstreams = crate::health::Health::new(
            &config.upstreams,
            config.upstream_timeout,
            metrics.upstreams_down.clone(),
        );
        let shared = Self {
            upstreams,
            config,
            snapshot: ArcSwap::from_pointee(snapshot),
            cache: Arc::new(Mutex::new(cache)),
            sink,
            refresh,
            inflight: Mutex::default(),
            metrics,
            flows,
            tcp_pool: crate::tcp::Pool::default(),
            confirming: Arc::default(),
            sources: ArcSwap::from_pointee(sources),
            snapshot_version: std::sync::atomic::AtomicU64::new(0),
            follows_agent: std::sync::atomic::AtomicBool::new(false),
            started: Instant::now(),
            snapshot_at: Mutex::new(Instant::now()),
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
        *lock(&self.snapshot_at) = Instant::now();
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
    /// answers had just arrived, and has the sink enforce them.
    pub async fn restore(&self, entries: &[(String, IpAddr, std::time::Duration)]) -> usize {
        let changes = {
            let snapshot = self.snapshot.load();
            let mut cache = lock(&self.cache);
            let now = Instant::now();
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

    /// Judges the query in `packet` from `client`, to be sent to one of `servers` (tried
    /// from index `start` on, round robin): the first server the client's policy allows
    /// this name on and that is not marked down is chosen (the first allowed one when
    /// every allowed one is down), and the query is denied only when none is allowed. A
    /// reply goes to `out`.
    pub(crate) fn judge(
        &self,
        packet: &[u8],
        client: SocketAddr,
        servers: &[SocketAddr],
        start: usize,
        protocol: Protocol,
        out: &mut [u8],
    ) -> Step {
        let t = match protocol {
            Protocol::Tcp => TransportLabel::Tcp,
            _ => TransportLabel::Udp,
        };
        let query = match parse_query(packet) {
            ParsedQuery::Query(q) => q,
            ParsedQuery::Reject {
                rcode,
                question_end,
            } => {
                self.metrics.query(VerdictLabel::Malformed, t);
                debug!(%client, ?rcode, "malformed query refused");
                let mut flow = Flow::new("dns", "malformed", self.source(client.ip()));
                flow.policy = Some(format!("malformed query, answered {rcode:?}"));
                self.flows.push(flow);
                return match write_reply(packet, question_end, rcode, out) {
                    Some(n) => Step::Reply(n),
                    None => Step::Drop,
                };
            }
            ParsedQuery::Drop => {
                self.metrics.query(VerdictLabel::Malformed, t);
                debug!(%client, "unreadable query dropped");
                self.flows
                    .push(Flow::new("dns", "malformed", self.source(client.ip())));
                return Step::Drop;
            }
        };
        let snapshot = self.snapshot.load();
        let mut chosen = None;
        // Allowed, but marked down: used only when no allowed server is up.
        let mut fallback = None;
        let mut denied = None;
        for k in 0..servers.len() {
            let Some(&server) = servers.get(start.wrapping_add(k) % servers.len()) else {
                continue;
            };
            let verdict = snapshot.decide(client.ip(), server, protocol, &query);
            match verdict.deny {
                None => {
                    if servers.len() > 1 && !self.upstreams.try_use(server) {
                        if fallback.is_none() {
                            fallback = Some((server, verdict));
                        }
                        continue;
                    }
                    chosen = Some((server, verdict));
                    break;
                }
                Some(rcode) => {
                    if denied.is_none() {
                        debug!(client = %client, name = ?query.name, reason = ?verdict.reason, "denied");
                        let mut flow = Flow::new("dns", "denied", self.source(client.ip()));
                        let (name, _) = flows::question_name(query.question(packet));
                        flow.dns = Some(Dns {
                            query: name,
                            qtypes: vec![flows::qtype_name(query.qtype)],
                            rcode: Some(format!("{rcode:?}").to_uppercase().into()),
                            server: Some(server),
                            ..Dns::default()
                        });
                        flow.policy = Some(reason_text(&verdict.reason));
                        self.flows.push(flow);
                        denied = Some(rcode);
                    }
                }
            }
        }
        let Some((server, verdict)) = chosen.or(fallback) else {
            self.metrics.query(VerdictLabel::Denied, t);
            let rcode = denied.unwrap_or(Rcode::Refused);
            return match write_reply(packet, Some(query.question_end), rcode, out) {
                Some(n) => Step::Reply(n),
                None => Step::Drop,
            };
        };
        let learn = verdict.learn;
        let audited = verdict.audit;
        // Forwarded by an enforced endpoint's policy without teaching (a search-list
        // candidate, a port allowed without DNS rules) is still allowed, not unfiltered.
        let enforced = verdict.endpoint.is_some_and(|e| e.policy.enforced);
        if audited {
            let mut flow = Flow::new("dns", "audit", self.source(client.ip()));
            let (name, _) = flows::question_name(query.question(packet));
            flow.dns = Some(Dns {
                query: name,
                qtypes: vec![flows::qtype_name(query.qtype)],
                server: Some(server),
                ..Dns::default()
            });
            flow.policy = Some(reason_text(&verdict.reason));
            self.flows.push(flow);
        }
        if !self.enter(client.ip()) {
            self.metrics.query(VerdictLabel::Fairness, t);
            self.flows
                .push(Flow::new("dns", "fairness", self.source(client.ip())));
            return match write_reply(packet, Some(query.question_end), Rcode::ServFail, out) {
                Some(n) => Step::Reply(n),
                None => Step::Drop,
            };
        }
        self.metrics.query(
            if audited {
                VerdictLabel::Audit
            } else if learn || enforced {
                VerdictLabel::Allowed
            } else {
                VerdictLabel::Unfiltered
            },
            t,
        );
        Step::Forward(query, learn, server)
    }

    /// Counts a transparent query dropped because `client` set up its share of reply
    /// paths to new servers; `report`: also as a flow event (at most one a second per
    /// client).
    pub(crate) fn new_server_refused(&self, client: IpAddr, server: SocketAddr, report: bool) {
        self.metrics.new_servers_refused.inc();
        if report {
            debug!(%client, %server, "over the client's budget of new servers; dropped");
            let mut flow = Flow::new("dns", "fairness", self.source(client));
            flow.dns = Some(Dns {
                server: Some(server),
                ..Dns::default()
            });
            flow.policy = Some(format!(
                "more new servers per second than dns.transparent.client_new_servers_per_second: queries to new servers are dropped for the rest of the second (first: {server})"
            ));
            self.flows.push(flow);
        }
    }

    /// Another configured upstream to ask `query` of when `failed` did not answer: the
    /// first one, in configured order, that `client`'s policy allows for the name and
    /// that is not marked down. Returns it with whether its answer may teach IPs.
    pub(crate) fn alternative(
        &self,
        client: IpAddr,
        failed: SocketAddr,
        query: &Query,
        protocol: Protocol,
    ) -> Option<(SocketAddr, bool)> {
        let snapshot = self.snapshot.load();
        self.config.upstreams.iter().find_map(|&server| {
            if server == failed {
                return None;
            }
            let verdict = snapshot.decide(client, server, protocol, query);
            (verdict.deny.is_none() && self.upstreams.try_use(server))
                .then_some((server, verdict.learn))
        })
    }

    /// How long ago the proxy started.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
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

    /// Checks an upstream answer against the question sent (`question`: the query's bytes
    /// from offset 12 to the question's end) and learns its IPs. `None`: not an answer to
    /// that question. `Some(Some(fut))`: new IPs; release the answer once `fut` is done
    /// (see [`Shared::hold`]). Never waits: refreshes of known IPs go to a background
    /// flusher, so most answers leave at once.
    pub(crate) fn accept_answer(
        &self,
        question: &[u8],
        answer: &[u8],
        learn: bool,
        asked: Asked,
    ) -> Option<Option<Confirmation>> {
        let checked = match check_answer(question, answer) {
            Ok(a) => a,
            Err(e) => {
                self.metrics.answers_rejected.inc();
                debug!(error = %e, "ignoring upstream message");
                return None;
            }
        };
        self.metrics.upstream_rcode(checked.rcode);
        let mut learned = checked.learned;
        // Addresses that point inside are never learned, whatever the policy allows.
        let not_learned = if learn {
            self.keep_learnable(&mut learned)
        } else {
            Vec::new()
        };
        {
            // Answers to queries no policy vetted are told apart from allowed ones.
            let enforced = learn
                || self
                    .snapshot
                    .load()
                    .endpoint(asked.client)
                    .is_some_and(|e| e.policy.enforced);
            let verdict = if enforced { "allowed" } else { "unfiltered" };
            let mut flow = Flow::new("dns", verdict, self.source(asked.client));
            let (name, qtype) = flows::question_name(question);
            let mut ips = learned.ips.to_vec();
            ips.extend(not_learned.iter().map(|n| n.ip));
            flow.dns = Some(Dns {
                query: name,
                qtypes: qtype.map(flows::qtype_name).into_iter().collect(),
                rcode: Some(rcode_name(checked.rcode)),
                ips,
                ttl: (!learned.ips.is_empty()).then_some(learned.ttl),
                server: Some(asked.server),
                latency_us: Some(
                    u64::try_from(
                        asked
                            .answered
                            .saturating_duration_since(asked.received)
                            .as_micros(),
                    )
                    .unwrap_or(u64::MAX),
                ),
                not_learned,
            });
            self.flows.push(flow);
        }
        if !learn || learned.ips.is_empty() {
            return Some(None);
        }
        Some(self.learn(&learned, asked.answered))
    }

    /// Removes from `learned` the addresses that point inside (see
    /// [`dnsfence_dns::inside`]), counting each; returns them with their reasons.
    fn keep_learnable(&self, learned: &mut dnsfence_dns::Learned) -> Vec<flows::NotLearnedIp> {
        let Some(name) = learned.names.first() else {
            return Vec::new();
        };
        let snapshot = self.snapshot.load();
        let local = self.local_ips.load();
        let mut refused = Vec::new();
        learned.ips.retain(
            |ip| match snapshot.not_learned(*ip, name, |ip| local.contains(&ip)) {
                None => true,
                Some(reason) => {
                    self.metrics.not_learned(reason);
                    refused.push(flows::NotLearnedIp {
                        ip: *ip,
                        reason: reason.as_str(),
                    });
                    false
                }
            },
        );
        if !refused.is_empty() {
            debug!(
                name = name.as_str(),
                ?refused,
                "answer addresses that point inside are not learned"
            );
        }
        refused
    }

    /// Reads the node's interface addresses again (answers naming one are never learned),
    /// at most every [`LOCAL_ADDRESSES_REFRESH`].
    pub(crate) fn refresh_local_addresses(&self, now: Instant) {
        {
            let mut at = lock(&self.local_ips_at);
            if at.is_some_and(|t| now.saturating_duration_since(t) < LOCAL_ADDRESSES_REFRESH) {
                return;
            }
            *at = Some(now);
        }
        self.local_ips
            .store(Arc::new(crate::sys::local_addresses()));
    }

    /// Records what an answer taught; returns what its release must wait for: the sink's
    /// confirmation of its new IPs, or of IPs another answer brought moments ago that the
    /// sink has not confirmed yet.
    fn learn(&self, learned: &dnsfence_dns::Learned, now: Instant) -> Option<Confirmation> {
        let changes = {
            let snapshot = self.snapshot.load();
            let mut cache = lock(&self.cache);
            let changes = cache.learn(
                now,
                &learned.names,
                &learned.ips,
                std::time::Duration::from_secs(u64::from(learned.ttl)),
                snapshot.policies(),
            );
            self.gauge(&cache);
            changes
        };
        let new: SmallVec<[(Arc<str>, IpAddr); 8]> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Upsert {
                    name,
                    ip,
                    new: true,
                    ..
                } => Some((name.clone(), *ip)),
                _ => None,
            })
            .collect();
        if new.is_empty() {
            if !changes.is_empty() {
                // Only refreshes: the IPs are already enforced.
                let _ = self.refresh.send(changes);
            }
            let confirming = lock(&self.confirming);
            return learned
                .ips
                .iter()
                .find_map(|ip| confirming.get(ip).cloned());
        }
        Some(self.confirm(self.sink.apply(changes), new))
    }

    /// Drives `apply` (the sink enforcing the mappings `new`) to its end on a task of its
    /// own, so every answer waiting for these IPs is released when it completes. When the
    /// sink fails, the mappings are forgotten, so the next answer carrying them applies
    /// them again.
    fn confirm(&self, apply: SinkFuture, new: SmallVec<[(Arc<str>, IpAddr); 8]>) -> Confirmation {
        let (done, confirmation) = watch::channel(false);
        {
            let mut confirming = lock(&self.confirming);
            for (_, ip) in &new {
                confirming.insert(*ip, confirmation.clone());
            }
        }
        let confirming = self.confirming.clone();
        let cache = self.cache.clone();
        let mine = confirmation.clone();
        tokio::spawn(async move {
            if let Err(e) = apply.await {
                warn!(error = &e as &dyn std::error::Error, "enforcing learned IPs failed; releasing the answers, and the next answers carrying these IPs try again");
                let mut cache = lock(&cache);
                for (name, ip) in &new {
                    cache.forget(name, *ip);
                }
            }
            let _ = done.send(true);
            let mut confirming = lock(&confirming);
            for (_, ip) in &new {
                if confirming.get(ip).is_some_and(|c| c.same_channel(&mine)) {
                    confirming.remove(ip);
                }
            }
        });
        confirmation
    }

    /// Waits for `apply` (new IPs reaching the datapath), at most `response_max_delay`.
    pub(crate) async fn hold(&self, mut confirmation: Confirmation) {
        let started = Instant::now();
        let result = tokio::time::timeout(
            self.config.response_max_delay,
            confirmation.wait_for(|done| *done),
        )
        .await;
        self.metrics
            .latency_hold
            .observe(started.elapsed().as_secs_f64());
        match result {
            // Done (the task driving the sink logs a failure), or the task is gone.
            Ok(_) => {}
            Err(_) => {
                self.metrics.hold_timeouts.inc();
                warn!("learned IPs not confirmed within response_max_delay; releasing the answer");
            }
        }
    }

    /// Applies queued refreshes in batches until the proxy stops.
    pub(crate) async fn flush_refreshes(&self, mut rx: mpsc::UnboundedReceiver<Vec<Change>>) {
        while let Some(mut batch) = rx.recv().await {
            while let Ok(more) = rx.try_recv() {
                batch.extend(more);
            }
            if let Err(e) = self.sink.apply(batch).await {
                warn!(
                    error = &e as &dyn std::error::Error,
                    "refreshing learned IPs failed"
                );
            }
        }
    }

    fn gauge(&self, cache: &FqdnCache) {
        self.metrics
            .learned_names
            .set(i64::try_from(cache.len()).unwrap_or(i64::MAX));
        self.metrics
            .learned_ips
            .set(i64::try_from(cache.mappings()).unwrap_or(i64::MAX));
    }

    /// Removes expired mappings and tells the sink. Returns when the next one expires.
    pub(crate) async fn expire(&self) -> Option<Instant> {
        self.refresh_local_addresses(Instant::now());
        self.metrics
            .snapshot_age
            .set(lock(&self.snapshot_at).elapsed().as_secs_f64());
        let (changes, next) = {
            let mut cache = lock(&self.cache);
            let changes = cache.expire(Instant::now());
            self.gauge(&cache);
            (changes, cache.next_expiry())
        };
        if !changes.is_empty() {
            if let Err(e) = self.sink.apply(changes).await {
                warn!(
                    error = &e as &dyn std::error::Error,
                    "removing expired IPs failed"
                );
            }
        }
        next
    }
}
