//! Files in `state_dir` that survive restarts: written atomically (a temporary file, then
//! rename), each wrapped with a format version and a checksum of its body. A missing file
//! is normal; a corrupt, truncated or foreign one is reported and never trusted.
//!
//! `dnsfence proxy --agent` keeps two: the last snapshot the agent sent
//! (`proxy-snapshot.json`, where it starts when the agent is not there) and its learned
//! mappings (`proxy-learned.json`, every 2 s and on exit, restored with their remaining
//! TTLs at start).

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dnsfence_proxy::Shared;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::config::NodeConfig;
use crate::control::SnapshotData;

const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: u32,
    checksum: String,
    body: String,
}

/// FNV-1a, 64 bits: detects truncation and corruption (not tampering: the directory is
/// root's).
fn checksum(body: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Writes `body` to `path` atomically.
pub fn save(path: &Path, body: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let envelope = Envelope {
        format: FORMAT,
        checksum: checksum(body),
        body: body.to_owned(),
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&envelope)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads what [`save`] wrote: `Ok(None)` when there is no file, `Err` with the reason when
/// it cannot be trusted.
pub fn load(path: &Path) -> Result<Option<String>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let envelope: Envelope = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not a dnsfence state file: {e}", path.display()))?;
    if envelope.format != FORMAT {
        return Err(format!(
            "{}: format {} (this dnsfence reads {FORMAT})",
            path.display(),
            envelope.format
        ));
    }
    if checksum(&envelope.body) != envelope.checksum {
        return Err(format!("{}: checksum mismatch (corrupt)", path.display()));
    }
    Ok(Some(envelope.body))
}

/// The saved snapshot.
#[derive(Serialize, Deserialize)]
pub(crate) struct Saved {
    pub(crate) version: u64,
    pub(crate) data: SnapshotData,
}

/// One saved learned IP.
#[derive(Serialize, Deserialize)]
struct SavedIp {
    name: String,
    ip: IpAddr,
    /// Unix time, milliseconds.
    expires_ms: u64,
}

/// Where `proxy --agent` saves the agent's last snapshot.
pub(crate) fn snapshot_file(config: &NodeConfig) -> PathBuf {
    config.state_dir.join("proxy-snapshot.json")
}

fn learned_file(config: &NodeConfig) -> PathBuf {
    config.state_dir.join("proxy-learned.json")
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Saves snapshot `version`.
pub(crate) fn save_snapshot(file: &Path, version: u64, data: SnapshotData) {
    let body = match serde_json::to_string(&Saved { version, data }) {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "encoding the snapshot failed");
            return;
        }
    };
    if let Err(e) = save(file, &body) {
        warn!(error = %e, "saving the snapshot failed");
    }
}

/// Puts back the learned mappings saved before a restart.
pub(crate) async fn restore(shared: &Shared, config: &NodeConfig) {
    let body = match load(&learned_file(config)) {
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
pub(crate) fn save_learned(shared: &Shared, config: &NodeConfig) {
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
            if let Err(e) = save(&learned_file(config), &body) {
                warn!(error = %e, "saving learned IPs failed");
            }
        }
        Err(e) => warn!(error = %e, "encoding learned IPs failed"),
    }
}

/// Saves the learned mappings every 2 s.
pub(crate) async fn journal(shared: Arc<Shared>, config: Arc<NodeConfig>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (shared, config) = (shared.clone(), config.clone());
        let _ = tokio::task::spawn_blocking(move || save_learned(&shared, &config)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn round_trip_and_every_kind_of_damage_is_detected() {
        let dir = std::env::temp_dir().join(format!("dnsfence-state-{}", std::process::id()));
        let path = dir.join("s.json");
        assert_eq!(load(&path), Ok(None));
        save(&path, "{\"a\":1}").unwrap();
        assert_eq!(load(&path), Ok(Some("{\"a\":1}".to_owned())));
        let good = std::fs::read(&path).unwrap();
        // Truncated.
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(load(&path)
            .unwrap_err()
            .contains("not a dnsfence state file"));
        // A flipped byte in the body.
        let flipped = String::from_utf8(good.clone())
            .unwrap()
            .replace("\\\"a\\\":1", "\\\"a\\\":2");
        assert_ne!(flipped.as_bytes(), &good[..]);
        std::fs::write(&path, flipped).unwrap();
        assert!(load(&path).unwrap_err().contains("checksum mismatch"));
        // Garbage.
        std::fs::write(&path, [0xff, 0x00, 0x13]).unwrap();
        assert!(load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
