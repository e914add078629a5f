//! Test harnesses shared by dnsfence's crates, so fixtures are written once. Never a
//! dependency of shipped code.
//!
//! - [`msg`]: DNS messages built by hand, including malformed and hostile ones;
//! - [`authority::Authority`]: a real authoritative server (hickory-server) with test zones;
//! - [`Dnsmasq`]: a real upstream DNS server (Debian's `dnsmasq`) on a loopback port;
//! - [`dig`]: the real `dig` client, bound to a chosen source address;
//! - [`dnsmasq_in`], [`dig_in`]: the same inside a network namespace of the lab's
//!   ([`dnsfence_lab::Netns`], which also makes the namespaces and links for tests);
//! - [`skip`]: how tests that need a missing tool or root say why they skip (re-exported
//!   from [`dnsfence_lab::preflight`], so that the lab's own tests need not depend on this
//!   crate).
//!
//! The fake Kubernetes API server is a crate of its own, `dnsfence-fakeapi`.

#![allow(
    clippy::unwrap_used,
    reason = "test support: a panic is a test failure"
)]
#![allow(missing_docs, reason = "test support")]

pub mod authority;
pub mod msg;
pub mod policy;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use dnsfence_lab::preflight::{have, is_root, skip, skip_unless_root};
use dnsfence_lab::Netns;

/// A free UDP and TCP port on 127.0.0.1 (racy by nature; fine for tests).
pub fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// dnsmasq in the foreground, with no configuration but its command line: it answers for
/// `local_zone` from the records given after these arguments (NXDOMAIN for other names
/// in the zone), on `listen`:`port`, with `ttl`.
fn dnsmasq_args(listen: &str, port: u16, local_zone: &str, ttl: u32) -> Vec<String> {
    [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        "--pid-file=",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([
        format!("--listen-address={listen}"),
        format!("--port={port}"),
        format!("--local=/{local_zone}/"),
        format!("--local-ttl={ttl}"),
    ])
    .collect()
}

/// A dnsmasq serving records from its command line, killed on drop.
pub struct Dnsmasq {
    child: Child,
    pub addr: SocketAddr,
}

impl Dnsmasq {
    /// Starts dnsmasq on 127.0.0.1 (a free port) with `records`: each is a dnsmasq option
    /// such as `--host-record=a.example.com,192.0.2.1` or `--cname=b.example.com,a.example.com`.
    /// Names under `local_zone` that it does not know get NXDOMAIN.
    pub fn start(local_zone: &str, ttl: u32, records: &[String]) -> Self {
        let port = free_port();
        let dnsmasq = if Path::new("/usr/sbin/dnsmasq").exists() {
            "/usr/sbin/dnsmasq"
        } else {
            "dnsmasq"
        };
        let child = Command::new(dnsmasq)
            .args(dnsmasq_args("127.0.0.1", port, local_zone, ttl))
            .args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let me = Self { child, addr };
        me.wait_ready();
        me
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let q = msg::query(1, "ready.invalid", 1);
        while Instant::now() < deadline {
            let _ = sock.send_to(&q, self.addr);
            let mut buf = [0u8; 512];
            if sock.recv_from(&mut buf).is_ok() {
                return;
            }
        }
        panic!("dnsmasq did not come up on {}", self.addr);
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The output of one `dig` run.
#[derive(Debug)]
pub struct DigResult {
    /// `status:` from the header (NOERROR, REFUSED, ...), empty when no answer.
    pub status: String,
    /// The answer section's data fields (addresses, CNAME targets).
    pub answers: Vec<String>,
    pub raw: String,
}

/// Runs `dig` from `source` against `server`. `extra` adds flags such as `+tcp` or a type.
pub fn dig(source: &str, server: SocketAddr, name: &str, extra: &[&str]) -> DigResult {
    let out = Command::new("dig")
        .args([
            "-b",
            source,
            "-p",
            &server.port().to_string(),
            &format!("@{}", server.ip()),
            name,
            "+time=2",
            "+tries=1",
            "+nocookie",
        ])
        .args(extra)
        .output()
        .expect("run dig");
    parse_dig(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse_dig(raw: String) -> DigResult {
    let status = raw
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("")
        .to_owned();
    let mut answers = Vec::new();
    let mut in_answer = false;
    for line in raw.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            in_answer = true;
            continue;
        }
        if in_answer {
            if line.trim().is_empty() {
                break;
            }
            if let Some(data) = line.split_whitespace().last() {
                answers.push(data.to_owned());
            }
        }
    }
    DigResult {
        status,
        answers,
        raw,
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// Creates `dnsfence-<prefix>-<pid>-<n>`.
    pub fn new(prefix: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("dnsfence-{prefix}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (and reaped) on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts dnsmasq inside `ns` on `addr` (port 53 unless given) serving `records`.
pub fn dnsmasq_in(
    ns: &Netns,
    listen: &str,
    port: u16,
    local_zone: &str,
    ttl: u32,
    records: &[String],
) -> Killed {
    let child = ns
        .command("/usr/sbin/dnsmasq")
        .args(dnsmasq_args(listen, port, local_zone, ttl))
        .args(records)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dnsmasq");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = ns
            .command("dig")
            .args([
                "+time=1",
                "+tries=1",
                "-p",
                &port.to_string(),
                &format!("@{listen}"),
                "ready.invalid",
            ])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("status:") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dnsmasq did not come up in {}",
            ns.name()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Killed(child)
}

/// Runs `dig` inside `ns`; `args` are passed as they are.
pub fn dig_in(ns: &Netns, args: &[&str]) -> DigResult {
    let out = ns
        .command("dig")
        .args(["+time=2", "+tries=1", "+nocookie"])
        .args(args)
        .output()
        .expect("run dig");
    parse_dig(String::from_utf8_lossy(&out.stdout).into_owned())
}
