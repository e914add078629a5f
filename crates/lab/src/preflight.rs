//! Whether this machine can run a test that needs root or a tool (`ip`, `nft`, `dig`...),
//! and how such a test says why it skips. In CI (`CI` set) a missing tool or root is a
//! failure instead, so that nothing is silently skipped there.
//!
//! For tests only; it reads `PATH`, `/proc/self/status` and `CI`, and changes nothing.

use std::path::Path;

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .any(|p| p.join(tool).is_file() || Path::new("/usr/sbin").join(tool).is_file())
    })
}

/// Prints why a test skips; returns true when it must. In CI (`CI` set) a missing tool is
/// a failure instead, so nothing is silently skipped there.
pub fn skip(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must install {missing:?} (see .ci/run)"
    );
    eprintln!("SKIP: needs {missing:?}; install dnsutils and dnsmasq-base to run this test");
    true
}

/// Whether this process runs as root (network-namespace tests need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Like [`skip`], and also skips (printing why) when not root.
pub fn skip_unless_root(tools: &[&str]) -> bool {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("SKIP: needs root (network namespaces)");
        return true;
    }
    skip(tools)
}
