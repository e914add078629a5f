//! Files in `state_dir` that survive restarts: written atomically (a temporary file, then
//! rename), each wrapped with a format version and a checksum of its body. A missing file
//! is normal; a corrupt, truncated or foreign one is reported and never trusted.

use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

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
pub(crate) fn save(path: &Path, body: &str) -> std::io::Result<()> {
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
pub(crate) fn load(path: &Path) -> Result<Option<String>, String> {
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
