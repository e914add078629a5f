//! The local API socket: newline-delimited JSON, one request and one answer per line.
//!
//! Requests carry a protocol version: `{"version":1,"request":"fqdn_list"}`. The answer is
//! `{"version":1,"fqdns":[...]}` or `{"version":1,"error":"..."}`. The socket is created
//! with mode 0600.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tracing::debug;

use crate::shared::Shared;

/// The API protocol version.
pub const API_VERSION: u32 = 1;

/// One learned IP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FqdnIp {
    /// The address.
    pub ip: std::net::IpAddr,
    /// Seconds until it expires.
    pub ttl: u64,
}

/// One learned name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FqdnEntry {
    /// The name.
    pub name: String,
    /// Its IPs.
    pub ips: Vec<FqdnIp>,
    /// The `toFQDNs` selectors it satisfies.
    pub selectors: Vec<String>,
}

#[derive(Deserialize)]
struct Request {
    version: u32,
    request: String,
    /// `observe`: how many past events (default 100).
    #[serde(default)]
    last: Option<usize>,
    /// `observe`: keep streaming new events.
    #[serde(default)]
    follow: bool,
}

/// The learned mappings, sorted by name.
pub(crate) fn fqdn_list(shared: &Shared) -> Vec<FqdnEntry> {
    let snapshot = shared.snapshot();
    let selectors = snapshot.policies();
    let now = Instant::now();
    let mut out: Vec<FqdnEntry> = shared.with_cache(|cache| {
        cache
            .iter()
            .map(|(name, ips, sels)| FqdnEntry {
                name: name.to_owned(),
                ips: ips
                    .iter()
                    .map(|l| FqdnIp {
                        ip: l.ip,
                        ttl: l.expires.saturating_duration_since(now).as_secs(),
                    })
                    .collect(),
                selectors: sels
                    .iter()
                    .filter_map(|s| selectors.selector(*s))
                    .map(|p| p.as_str().to_owned())
                    .collect(),
            })
            .collect()
    });
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn answer(shared: &Shared, line: &str) -> serde_json::Value {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            return serde_json::json!({"version": API_VERSION, "error": format!("bad request: {e}")})
        }
    };
    if req.version != API_VERSION {
        return serde_json::json!({"version": API_VERSION, "error": format!("unsupported version {}", req.version)});
    }
    match req.request.as_str() {
        "fqdn_list" => serde_json::json!({"version": API_VERSION, "fqdns": fqdn_list(shared)}),
        "status" => {
            let snapshot = shared.snapshot();
            let (names, ips) = shared.with_cache(|c| (c.len(), c.mappings()));
            serde_json::json!({"version": API_VERSION, "status": {
                "role": "proxy",
                "pid": std::process::id(),
                "uptime_s": shared.uptime().as_secs(),
                "snapshot_version": shared.snapshot_version.load(std::sync::atomic::Ordering::Relaxed),
                "policies": snapshot.policies().policies().len(),
                "selectors": snapshot.policies().fqdn_selectors().len(),
                "learned_names": names,
                "learned_ips": ips,
                "queries_in_flight": shared.in_flight(),
            }})
        }
        other => {
            serde_json::json!({"version": API_VERSION, "error": format!("unknown request {other:?}")})
        }
    }
}

/// Serves the API on the Unix socket at `path` (replacing a stale socket file).
pub async fn serve_api(shared: Arc<Shared>, path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(req) = serde_json::from_str::<Request>(&line) {
                    if req.version == API_VERSION && req.request == "observe" {
                        if let Err(e) = observe(&shared, &req, &mut wr).await {
                            debug!(error = %e, "observer went away");
                        }
                        return;
                    }
                }
                let mut reply = answer(&shared, &line).to_string();
                reply.push('\n');
                if let Err(e) = wr.write_all(reply.as_bytes()).await {
                    debug!(error = %e, "API client went away");
                    return;
                }
            }
        });
    }
}

/// Streams flow events: the last `req.last`, then (with `follow`) every new one, one JSON
/// object per line (`{"version":1,"flow":{...}}`, or `{"version":1,"lost":N}` when this
/// observer fell behind).
async fn observe<W: tokio::io::AsyncWrite + Unpin>(
    shared: &Shared,
    req: &Request,
    wr: &mut W,
) -> io::Result<()> {
    let mut live = shared.flows.subscribe();
    for flow in shared.flows.last(req.last.unwrap_or(100)) {
        let mut line = serde_json::json!({"version": API_VERSION, "flow": &*flow}).to_string();
        line.push('\n');
        wr.write_all(line.as_bytes()).await?;
    }
    if !req.follow {
        return Ok(());
    }
    loop {
        let line = match live.recv().await {
            Ok(flow) => serde_json::json!({"version": API_VERSION, "flow": &*flow}),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                shared.flows.metrics.lose("follower", n);
                serde_json::json!({"version": API_VERSION, "lost": n})
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        };
        let mut line = line.to_string();
        line.push('\n');
        wr.write_all(line.as_bytes()).await?;
    }
}
