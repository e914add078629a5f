//! Flow events: one per DNS decision and per refused packet, in a bounded ring that
//! `dnsfence observe` reads and follows, optionally also appended to a JSON-lines file with
//! size-based rotation. Nothing here grows without bound: the ring keeps the newest
//! `flows.ring_size` events (older ones are counted as lost), a slow follower misses
//! events (counted) rather than holding memory, and the file writer's queue is bounded.
//!
//! Field names follow Hubble's flow JSON where there is one (`time`, `verdict`,
//! `source.pod_name`, `dns.query`, `dns.rcode`, `dns.ips`, `drop_reason_desc`...).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tracing::warn;

/// Who sent the traffic.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Source {
    /// Address.
    pub ip: Option<IpAddr>,
    /// Namespace, when the address is an inventory endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Pod name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// Labels, `key=value`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// Where it went.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Destination {
    /// Address.
    pub ip: Option<IpAddr>,
    /// Port (TCP, UDP, SCTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Protocol (`tcp`, `udp`, `icmp`...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    /// Names recently resolved to this address (drops only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

/// The DNS part of a DNS flow.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Dns {
    /// The name asked.
    pub query: String,
    /// The type asked (`A`, `AAAA`, ...).
    pub qtypes: Vec<Cow<'static, str>>,
    /// The answer's RCODE (ours when denied).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcode: Option<Cow<'static, str>>,
    /// Addresses in the answer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    /// Smallest TTL on the chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
    /// The server the query was for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<SocketAddr>,
    /// Time from the query's arrival to the answer, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// Addresses of the answer that were not learned, each with why (they point inside:
    /// the node, an endpoint, the cluster, a special-purpose range).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_learned: Vec<NotLearnedIp>,
}

/// An address of an answer that was not learned.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NotLearnedIp {
    /// The address.
    pub ip: IpAddr,
    /// Why: `loopback`, `link-local`, `node`, `endpoint`, `cluster`...
    pub reason: &'static str,
}

/// One event.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Flow {
    /// When (RFC 3339 with milliseconds in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// `dns` or `drop`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `allowed`, `unfiltered`, `denied`, `audit`, `malformed`, `fairness`, `timeout`,
    /// `unreachable` (DNS); `denied`
    /// or `audit` (packets, with `drop_reason_desc`).
    pub verdict: &'static str,
    /// The sender (shared by the events of one endpoint).
    pub source: Arc<Source>,
    /// DNS details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    /// Packet destination (drops).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    /// The policy and rule that decided, or why nothing did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Why a packet was refused (`policy-denied`, `forged-source`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_reason_desc: Option<String>,
}

impl Flow {
    /// A flow of `kind` with `verdict`, now.
    pub fn new(kind: &'static str, verdict: &'static str, source: Arc<Source>) -> Self {
        Self {
            time: SystemTime::now(),
            kind,
            verdict,
            source,
            dns: None,
            destination: None,
            policy: None,
            drop_reason_desc: None,
        }
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// Flow settings: the `flows` section of the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowSettings {
    /// Events kept in memory for `dnsfence observe` (default 10000; at least 1).
    #[serde(default = "default_ring")]
    pub ring_size: usize,
    /// Also append them to this JSON-lines file (default: none).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Rotate the file past this many bytes, keeping one old file, `.1` (default
    /// 104857600).
    #[serde(default = "default_file_max")]
    pub file_max_bytes: u64,
}

impl Default for FlowSettings {
    fn default() -> Self {
        Self {
            ring_size: default_ring(),
            file: None,
            file_max_bytes: default_file_max(),
        }
    }
}

fn default_ring() -> usize {
    10_000
}
fn default_file_max() -> u64 {
    100 * 1024 * 1024
}

/// Labels of the flow counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FlowLabels {
    /// `dns` or `drop`.
    pub kind: &'static str,
    /// The verdict.
    pub verdict: &'static str,
}

/// Labels of the lost-event counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LostLabels {
    /// `ring` (pushed out of the in-memory ring: normal once it is full), `follower` (a
    /// slow `observe --follow` missed it) or `file` (the file writer fell behind).
    pub stage: &'static str,
}

/// Metrics of the flow log.
#[derive(Debug, Clone, Default)]
pub struct FlowMetrics {
    /// Events recorded.
    pub events: Family<FlowLabels, Counter>,
    /// Events not kept, by where they were lost.
    pub lost: Family<LostLabels, Counter>,
}

impl FlowMetrics {
    /// Registers `flow_events` and `flow_events_lost`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "flow_events",
            "Flow events recorded, by type and verdict",
            self.events.clone(),
        );
        registry.register(
            "flow_events_lost",
            "Flow events not kept, by stage: ring (pushed out, normal once full), follower or file",
            self.lost.clone(),
        );
    }

    /// Counts `n` events lost at `stage` (`ring`, `follower`, `file`).
    pub fn lose(&self, stage: &'static str, n: u64) {
        self.lost.get_or_create(&LostLabels { stage }).inc_by(n);
    }

    /// Events lost at `stage` so far.
    pub fn lost_at(&self, stage: &'static str) -> u64 {
        self.lost.get_or_create(&LostLabels { stage }).get()
    }
}

/// The flow log.
#[derive(Debug)]
pub struct FlowLog {
    ring: Mutex<VecDeque<Arc<Flow>>>,
    cap: usize,
    live: broadcast::Sender<Arc<Flow>>,
    file: Option<mpsc::Sender<Arc<Flow>>>,
    /// Metrics.
    pub metrics: FlowMetrics,
    /// The event counters of the usual kinds and verdicts, looked up once (the hot path
    /// then skips hashing the labels); others are found in the family.
    counters: Vec<(&'static str, &'static str, Counter)>,
    /// `flow_events_lost{stage="ring"}`: counted on every push once the ring is full.
    ring_lost: Counter,
}

/// The kinds and verdicts whose counters [`FlowLog`] keeps at hand.
const USUAL: [(&str, &str); 8] = [
    ("dns", "allowed"),
    ("dns", "denied"),
    ("dns", "audit"),
    ("dns", "malformed"),
    ("dns", "fairness"),
    ("dns", "timeout"),
    ("drop", "denied"),
    ("drop", "audit"),
];

impl FlowLog {
    /// A log; with a file, a writer task is started (call inside a tokio runtime).
    pub fn new(settings: &FlowSettings, metrics: FlowMetrics) -> Arc<Self> {
        let (live, _) = broadcast::channel(1024);
        let file = settings.file.clone().map(|path| {
            let (tx, rx) = mpsc::channel(4096);
            let max = settings.file_max_bytes;
            tokio::task::spawn_blocking(move || write_file(path, max, rx));
            tx
        });
        let counters = USUAL
            .iter()
            .map(|&(kind, verdict)| {
                let c = metrics
                    .events
                    .get_or_create(&FlowLabels { kind, verdict })
                    .clone();
                (kind, verdict, c)
            })
            .collect();
        let ring_lost = metrics
            .lost
            .get_or_create(&LostLabels { stage: "ring" })
            .clone();
        Arc::new(Self {
            ring: Mutex::new(VecDeque::with_capacity(settings.ring_size.min(65_536))),
            cap: settings.ring_size.max(1),
            live,
            file,
            metrics,
            counters,
            ring_lost,
        })
    }

    /// Records an event.
    pub fn push(&self, flow: Flow) {
        match self
            .counters
            .iter()
            .find(|(k, v, _)| *k == flow.kind && *v == flow.verdict)
        {
            Some((_, _, c)) => {
                c.inc();
            }
            None => {
                self.metrics
                    .events
                    .get_or_create(&FlowLabels {
                        kind: flow.kind,
                        verdict: flow.verdict,
                    })
                    .inc();
            }
        }
        let flow = Arc::new(flow);
        {
            let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
            if ring.len() >= self.cap {
                ring.pop_front();
                self.ring_lost.inc();
            }
            ring.push_back(flow.clone());
        }
        if let Some(file) = &self.file {
            if file.try_send(flow.clone()).is_err() {
                self.metrics.lose("file", 1);
            }
        }
        let _ = self.live.send(flow);
    }

    /// The newest `n` events, oldest first.
    pub fn last(&self, n: usize) -> Vec<Arc<Flow>> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.iter()
            .skip(ring.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Flow>> {
        self.live.subscribe()
    }

    /// Events in the ring.
    pub fn len(&self) -> usize {
        self.ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn write_file(path: PathBuf, max: u64, mut rx: mpsc::Receiver<Arc<Flow>>) {
    let open = |p: &PathBuf| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
    };
    let mut file = match open(&path) {
        Ok(f) => f,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "flow file unavailable");
            return;
        }
    };
    let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
    while let Some(flow) = rx.blocking_recv() {
        let Ok(mut line) = serde_json::to_vec(&*flow) else {
            continue;
        };
        line.push(b'\n');
        if size + line.len() as u64 > max && size > 0 {
            let _ = std::fs::rename(&path, path.with_extension("1"));
            match open(&path) {
                Ok(f) => {
                    file = f;
                    size = 0;
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "flow file rotation failed");
                    return;
                }
            }
        }
        if file.write_all(&line).is_ok() {
            size += line.len() as u64;
        }
    }
}

/// Decodes a question section's name (wire form) for display: labels joined by dots, bytes
/// outside printable ASCII and dots inside labels escaped as `\DDD`.
pub fn question_name(question: &[u8]) -> (String, Option<u16>) {
    let mut name = String::with_capacity(question.len());
    let mut i = 0;
    while let Some(&len) = question.get(i) {
        let len = usize::from(len);
        if len == 0 || len > 63 {
            i += 1;
            break;
        }
        let Some(label) = question.get(i + 1..i + 1 + len) else {
            return (name, None);
        };
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            if b.is_ascii_graphic() && b != b'.' && b != b'\\' {
                name.push(char::from(b));
            } else {
                name.push_str(&format!("\\{b:03}"));
            }
        }
        i += 1 + len;
    }
    let qtype = question
        .get(i..i + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]));
    if name.is_empty() {
        name.push('.');
    }
    (name, qtype)
}

/// The mnemonic of a query type.
pub fn qtype_name(t: u16) -> Cow<'static, str> {
    match t {
        1 => "A".into(),
        28 => "AAAA".into(),
        5 => "CNAME".into(),
        15 => "MX".into(),
        16 => "TXT".into(),
        33 => "SRV".into(),
        65 => "HTTPS".into(),
        2 => "NS".into(),
        6 => "SOA".into(),
        12 => "PTR".into(),
        255 => "ANY".into(),
        other => format!("TYPE{other}").into(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[tokio::test]
    async fn the_ring_is_bounded_and_counts_what_it_loses() {
        let log = FlowLog::new(
            &FlowSettings {
                ring_size: 100,
                file: None,
                file_max_bytes: 0,
            },
            FlowMetrics::default(),
        );
        let mut live = log.subscribe();
        // More than the followers' queue (1,024) and the ring (100).
        for _ in 0..2000 {
            log.push(Flow::new("dns", "denied", Arc::default()));
        }
        assert_eq!(log.len(), 100);
        assert_eq!(log.metrics.lost_at("ring"), 1900);
        assert_eq!(log.last(10).len(), 10);
        // A follower that fell behind learns how many it missed.
        assert!(matches!(
            live.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
    }

    #[tokio::test]
    async fn the_file_rotates_past_its_size() {
        let dir = std::env::temp_dir().join(format!("dnsfence-flows-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.jsonl");
        let log = FlowLog::new(
            &FlowSettings {
                ring_size: 10,
                file: Some(path.clone()),
                file_max_bytes: 2000,
            },
            FlowMetrics::default(),
        );
        for _ in 0..50 {
            log.push(Flow::new("dns", "allowed", Arc::default()));
        }
        drop(log);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !path.with_extension("1").exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.len() <= 2000);
        for line in current.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["verdict"], "allowed");
        }
        assert!(path.with_extension("1").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn question_names_escape_what_is_not_a_hostname() {
        let q = [
            3, b'a', b'.', b'b', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0, 0, 1, 0, 1,
        ];
        assert_eq!(question_name(&q), ("a\\046b.example".to_owned(), Some(1)));
        assert_eq!(question_name(&[0, 0, 28, 0, 1]), (".".to_owned(), Some(28)));
        assert_eq!(question_name(&[5, b'a']).1, None);
    }
}
