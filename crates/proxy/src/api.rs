//! The local API socket: newline-delimited JSON, one request and one answer per line.
//!
//! Requests carry a protocol version: `{"version":1,"request":"fqdn_list"}`. The answer is
//! `{"version":1,"fqdns":[...]}` or `{"version":1,"error":"..."}`. The socket is created
//! with mode 0600.
//!
//! A socket file is only ever replaced when stale (nothing accepts connections on it: its
//! process died). One that a running process answers on (the old proxy during a rolling
//! update, or another process given the same path) is left alone until that process is
//! gone, and a process removes its socket file on exit only if it is still the one it
//! bound ([`bind_unix`], [`SocketFile`]; `dnsfence agent` binds its socket the same way).

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

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
    // The coarse clock: a TTL may show up to a timer tick longer.
    let now = shared.clock.now();
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
                "follows_agent": shared.follows_agent.load(std::sync::atomic::Ordering::Relaxed),
                "pid": std::process::id(),
                "uptime_s": shared.uptime().as_secs(),
                "snapshot_version": shared.snapshot_version.load(std::sync::atomic::Ordering::Relaxed),
                "policies": snapshot.policies().policies().len(),
                "selectors": snapshot.policies().fqdn_selectors().len(),
                "learned_names": names,
                "learned_ips": ips,
                "queries_in_flight": shared.in_flight(),
                "upstreams": upstreams(shared),
            }})
        }
        other => {
            serde_json::json!({"version": API_VERSION, "error": format!("unknown request {other:?}")})
        }
    }
}

/// Each configured upstream with its state, for `dnsfence status`: `up` or `down`, and
/// the queries it left unanswered since its last answer.
fn upstreams(shared: &Shared) -> Vec<serde_json::Value> {
    shared
        .forwarder()
        .upstreams()
        .map(|u| {
            serde_json::json!({
                "address": u.address.to_string(),
                "state": if u.down { "down" } else { "up" },
                "unanswered": u.unanswered,
            })
        })
        .collect()
}

/// A Unix socket file this process bound. Dropping it removes the file if it is still the
/// one bound here: a newer process may have replaced it since, and then it is not ours.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// The file when bound: see [`identity`].
    identity: Option<Identity>,
}

impl SocketFile {
    /// The path of the socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file at the path is still the one bound here.
    pub fn is_ours(&self) -> bool {
        self.identity.is_some() && identity(&self.path) == self.identity
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.is_ours() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Device, inode and change time of a file: a file made in place of a removed one may get
/// its inode number back, not also the time it was made.
type Identity = (u64, u64, i64, i64);

fn identity(path: &Path) -> Option<Identity> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Binds a Unix socket at `path` with mode 0600, creating its directory, unless a running
/// process accepts connections on it: then `Ok(None)`, and that socket is left alone. A stale
/// file (nothing accepts on it) is replaced. Must be called inside the Tokio runtime.
pub async fn bind_unix(path: &Path) -> io::Result<Option<(UnixListener, SocketFile)>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A non-blocking connect: a live process with a full backlog answers "would block"
    // rather than stalling this one.
    match UnixStream::connect(path).await {
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            // Stale: its process is gone.
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let file = SocketFile {
        path: path.to_owned(),
        identity: identity(path),
    };
    Ok(Some((listener, file)))
}

/// How often a socket held by a running process is tried again.
pub const SOCKET_RETRY: Duration = Duration::from_millis(500);

/// [`bind_unix`], waiting while a running process holds the socket (tried every
/// [`SOCKET_RETRY`]; `what` names the socket in the log).
pub async fn bind_unix_when_free(
    what: &str,
    path: &Path,
) -> io::Result<(UnixListener, SocketFile)> {
    let mut waited = false;
    loop {
        if let Some(bound) = bind_unix(path).await? {
            if waited {
                info!(socket = %path.display(), "{what} free again: listening");
            }
            return Ok(bound);
        }
        if !waited {
            warn!(
                socket = %path.display(),
                "{what} {} is in use by a running process (an older instance during an upgrade, or another one with the same path): left alone, and taken once that process is gone",
                path.display()
            );
            waited = true;
        }
        tokio::time::sleep(SOCKET_RETRY).await;
    }
}

/// Serves the API on the Unix socket at `path`, once no running process holds it (see
/// [`bind_unix_when_free`]); the socket file is removed when this stops (at shutdown) if it
/// is still ours.
pub async fn serve_api(shared: Arc<Shared>, path: &Path) -> io::Result<()> {
    let (listener, _file) = bind_unix_when_free("API socket", path).await?;
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

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests: a panic is a failure")]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dnsfence-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A second process given the same path must not take the socket of a running one.
    #[tokio::test]
    async fn a_live_socket_is_left_alone_and_a_stale_one_replaced() {
        let dir = dir("live");
        let path = dir.join("api.sock");
        let running = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(bind_unix(&path).await.unwrap().is_none());
        // The running process still answers on it.
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(running.accept().is_ok());
        // Its process dies: the file stays, stale, and is replaced.
        drop(running);
        assert!(path.exists());
        let (listener, file) = bind_unix(&path).await.unwrap().unwrap();
        assert!(file.is_ours());
        let client = UnixStream::connect(&path).await.unwrap();
        assert!(listener.accept().await.is_ok());
        drop(client);
        // Dropped (at shutdown): the file goes.
        drop(file);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A newer process that took the path over keeps its file when the old one stops.
    #[tokio::test]
    async fn a_replaced_socket_file_is_not_removed() {
        let dir = dir("replaced");
        let path = dir.join("api.sock");
        let (old_listener, old_file) = bind_unix(&path).await.unwrap().unwrap();
        // A link keeps the old file's inode alive, so the new file cannot reuse its number.
        std::fs::hard_link(&path, dir.join("old.sock")).unwrap();
        drop(old_listener);
        let (_new_listener, new_file) = bind_unix(&path).await.unwrap().unwrap();
        assert!(!old_file.is_ours() && new_file.is_ours());
        drop(old_file);
        assert!(path.exists());
        UnixStream::connect(&path).await.unwrap();
        drop(new_file);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Waiting for a running process to go: the socket is bound once it has.
    #[tokio::test]
    async fn the_socket_is_taken_once_its_process_is_gone() {
        let dir = dir("wait");
        let path = dir.join("api.sock");
        let running = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let waiting = tokio::spawn({
            let path = path.clone();
            async move { bind_unix_when_free("API socket", &path).await }
        });
        tokio::time::sleep(SOCKET_RETRY * 2).await;
        assert!(!waiting.is_finished());
        drop(running);
        let (listener, file) = tokio::time::timeout(SOCKET_RETRY * 4, waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let _client = UnixStream::connect(&path).await.unwrap();
        assert!(listener.accept().await.is_ok());
        drop(file);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
