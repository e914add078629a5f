//! Learning from an upstream's answer: check it, keep the addresses that may be learned,
//! record them (the sink enforces new ones), hold the answer until they are enforced, and
//! expire old mappings. It must not judge queries or talk to upstreams.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use dnsfence_dns::forward::{Answered, Rejection};
use dnsfence_dns::Learned;
use dnsfence_fqdncache::{Change, FqdnCache};
use dnsfence_policy::FoldedName;
use smallvec::SmallVec;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::{lock, Confirmation, Shared};
use crate::flows::{self, Dns, Flow};
use crate::sink::SinkFuture;
use crate::upstream::Client;

/// An answer's addresses (inline for ordinary answers).
type Ips = SmallVec<[IpAddr; 8]>;

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

/// How often the node's interface addresses are read again.
const LOCAL_ADDRESSES_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

impl Shared {
    /// Counts an upstream message the forwarder did not take as an answer.
    pub(crate) fn rejected(&self, rejection: &Rejection) {
        self.metrics.answers_rejected.inc();
        if let Rejection::NotTheAnswer(e) = rejection {
            debug!(error = %e, "ignoring upstream message");
        }
    }

    /// Records an upstream answer the forwarder accepted at `now` (its flow event, its
    /// rcode) and learns its IPs. `Some(confirmation)`: new IPs; release the answer once
    /// it is done (see [`Shared::hold`]). Never waits: refreshes of known IPs go to a
    /// background flusher, so most answers leave at once.
    pub(crate) fn accept_answer(&self, a: &Answered<Client>, now: Instant) -> Option<Confirmation> {
        let (checked, learn) = (&a.answer, a.learn);
        self.metrics.upstream_rcode(checked.rcode);
        let learned = &checked.learned;
        let mut ips = learned.ips.clone();
        // Addresses that point inside are never learned, whatever the policy allows.
        let not_learned = if learn {
            self.keep_learnable(learned, &mut ips)
        } else {
            Vec::new()
        };
        let client = a.addr.ip();
        {
            // Answers to queries no policy vetted are told apart from allowed ones.
            let enforced = learn
                || self
                    .snapshot
                    .load()
                    .endpoint(client)
                    .is_some_and(|e| e.policy.enforced);
            let verdict = if enforced { "allowed" } else { "unfiltered" };
            let mut flow = Flow::new("dns", verdict, self.source(client));
            let (name, qtype) = flows::question_name(a.question());
            let mut shown = ips.to_vec();
            shown.extend(not_learned.iter().map(|n| n.ip));
            flow.dns = Some(Dns {
                query: name,
                qtypes: qtype.map(flows::qtype_name).into_iter().collect(),
                rcode: Some(rcode_name(checked.rcode)),
                ips: shown,
                ttl: (!ips.is_empty()).then_some(learned.ttl),
                server: Some(a.upstream),
                latency_us: Some(
                    u64::try_from(now.saturating_duration_since(a.received).as_micros())
                        .unwrap_or(u64::MAX),
                ),
                not_learned,
            });
            self.flows.push(flow);
        }
        if !learn || ips.is_empty() {
            return None;
        }
        self.learn(&learned.names, &ips, learned.ttl, now)
    }

    /// Removes from `ips` (those of `learned`) the addresses that point inside (see
    /// [`dnsfence_dns::inside`]), counting each; returns them with their reasons.
    fn keep_learnable(&self, learned: &Learned, ips: &mut Ips) -> Vec<flows::NotLearnedIp> {
        let Some(name) = learned.names.first() else {
            return Vec::new();
        };
        let snapshot = self.snapshot.load();
        let local = self.local_ips.load();
        let mut refused = Vec::new();
        ips.retain(
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
    fn learn(
        &self,
        names: &[FoldedName],
        ips: &[IpAddr],
        ttl: u32,
        now: Instant,
    ) -> Option<Confirmation> {
        let changes = {
            let snapshot = self.snapshot.load();
            let mut cache = lock(&self.cache);
            let changes = cache.learn(
                now,
                names,
                ips,
                std::time::Duration::from_secs(u64::from(ttl)),
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
            return ips.iter().find_map(|ip| confirming.get(ip).cloned());
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

    /// Waits for `confirmation` (new IPs reaching the datapath) of an answer that arrived
    /// at `since`, at most `response_max_delay`. Returns when the answer is released.
    pub(crate) async fn hold(&self, mut confirmation: Confirmation, since: Instant) -> Instant {
        let result = tokio::time::timeout(
            self.config.response_max_delay,
            confirmation.wait_for(|done| *done),
        )
        .await;
        let released = Instant::now();
        self.metrics
            .latency_hold
            .observe(released.saturating_duration_since(since).as_secs_f64());
        match result {
            // Done (the task driving the sink logs a failure), or the task is gone.
            Ok(_) => {}
            Err(_) => {
                self.metrics.hold_timeouts.inc();
                warn!("learned IPs not confirmed within response_max_delay; releasing the answer");
            }
        }
        released
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

    pub(super) fn gauge(&self, cache: &FqdnCache) {
        self.metrics
            .learned_names
            .set(i64::try_from(cache.len()).unwrap_or(i64::MAX));
        self.metrics
            .learned_ips
            .set(i64::try_from(cache.mappings()).unwrap_or(i64::MAX));
    }

    /// Removes the mappings expired at `now` and tells the sink. Returns when the next
    /// one expires.
    pub(crate) async fn expire(&self, now: Instant) -> Option<Instant> {
        self.refresh_local_addresses(now);
        let age = now.saturating_duration_since(*lock(&self.snapshot_at));
        self.metrics.snapshot_age.set(age.as_secs_f64());
        let (changes, next) = {
            let mut cache = lock(&self.cache);
            let changes = cache.expire(now);
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
