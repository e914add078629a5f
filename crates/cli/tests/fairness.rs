//! Fairness before work: a pod flooding the proxy, to one DNS server or to a different
//! address with every query, costs the other pods' DNS nothing.
//!
//! Run: `cargo test -p dnsfence --test fairness -- --nocapture`

#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

#[path = "integration/common.rs"]
mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dnsfence_lab::{LoadReport, LoadSpec, Netns, DNS_V4};

/// Where a flood goes.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// The one DNS server web's policy allows, asking an allowed name.
    OneServer,
    /// A new address with every query (port 53, so the redirect takes it).
    EveryAddress,
}

/// Flooding threads in a namespace, sending `rate` queries per second between them (in
/// bursts each millisecond) until stopped. The rate is set, not as fast as the threads can:
/// on a small test machine, unpaced threads would take the CPU from everything else (the
/// proxy, the world's DNS server, the victim) and measure the machine, not the proxy. A
/// pod's CPU is bounded by its cgroup on a real node.
struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Flood {
    fn start(ns: &Netns, threads: usize, rate: u32, target: Target) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        for t in 0..threads {
            let socket = ns.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
            socket.set_nonblocking(true).unwrap();
            let (stop, sent) = (stop.clone(), sent.clone());
            let per_ms = (rate / u32::try_from(threads).unwrap() / 1000).max(1);
            handles.push(std::thread::spawn(move || {
                let mut query = dnsfence_testsupport::msg::query(0, "flood.example.com", 1);
                let mut n: u32 = u32::try_from(t).unwrap() << 24;
                let mut buf = [0u8; 1500];
                let start = Instant::now();
                let mut due: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    let elapsed = u64::try_from(start.elapsed().as_millis()).unwrap();
                    if due > elapsed * u64::from(per_ms) {
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    }
                    due += 1;
                    n = n.wrapping_add(1);
                    query[..2].copy_from_slice(&(n as u16).to_be_bytes());
                    let to = match target {
                        Target::OneServer => DNS_V4,
                        // 100.64.0.0/10: a different address each time, 4 million of them.
                        Target::EveryAddress => {
                            let [_, b, c, d] = n.to_be_bytes();
                            SocketAddr::from((Ipv4Addr::new(100, 64 | (b & 63), c, d), 53))
                        }
                    };
                    if socket.send_to(&query, to).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    // Replies are read and thrown away, so the socket never backs up.
                    while socket.recv_from(&mut buf).is_ok() {}
                }
            }));
        }
        Self {
            stop,
            sent,
            threads: handles,
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Serializes the floods of this file.
static ONE_FLOOD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Web's share of the proxy in these tests, in packets per second.
const SHARE: u32 = 3000;

/// What a flood cost: the victim's queries, and how the bounds took the flood.
struct Outcome {
    victim: LoadReport,
    /// Packets the kernel dropped as over web's share (`dns-rate-limited`).
    rate_limited: u64,
    /// Queries the proxy dropped as asking too many new servers.
    new_servers_refused: f64,
}

/// The packets counted by the rule of the node's table whose comment is `comment`.
fn rule_packets(env: &common::Env, chain: &str, comment: &str) -> u64 {
    let out = env
        .lab
        .node()
        .command("nft")
        .args(["list", "chain", "inet", "dnsfence", chain])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains(comment))
        .unwrap_or_else(|| panic!("no rule {comment:?} in {text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "packets").unwrap();
    words[at + 1].parse().unwrap()
}

/// 300 queries from the `other` pod at 100 per second, each given 0.5 s, during a flood
/// of `rate` queries per second from web (three senders).
fn victim_during(target: Target, rate: u32) -> Option<Outcome> {
    // One flood at a time: two would measure this small machine's two cores.
    let _one = ONE_FLOOD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let port = common::metrics_port(1);
    // Web's share a third of the default (10000): these tests run the debug build, which
    // takes several times the release build's CPU per query, on a small machine.
    let config = format!(
        "metrics: {{listen: \"127.0.0.1:{port}\"}}\ndns: {{transparent: {{port: 15053, client_packets_per_second: {SHARE}}}}}\n"
    );
    let env = common::env_config(vec![], &config)?;
    let flood = Flood::start(env.web().netns(), 3, rate, target);
    std::thread::sleep(Duration::from_millis(500));
    let mut spec = LoadSpec::new(DNS_V4, ["other.example.com"], 100);
    spec.timeout = Duration::from_millis(500);
    let load = env.other().start_dns_load(spec).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let victim = load.stop();
    let sent = flood.stop();
    println!("{target:?}: flood sent {sent}; victim {}", victim.summary());
    let metrics = common::scrape(&env, port);
    let new_servers_refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dnsfence_dns_new_servers_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no dnsfence_dns_new_servers_refused_total in\n{metrics}"));
    Some(Outcome {
        victim,
        rate_limited: rule_packets(&env, "dns_limited", "over the client's rate"),
        new_servers_refused,
    })
}

// Found by the hardening review, fixed: a pod sending to a new address with every query
// made the proxy set up a reply socket for each before any per-client bound applied, and
// another pod lost 23 of 300 queries.
#[test]
fn a_flood_to_every_address_costs_other_pods_no_query() {
    // Several times web's share (dns.transparent.client_packets_per_second).
    let Some(o) = victim_during(Target::EveryAddress, 20_000) else {
        return;
    };
    assert_eq!(o.victim.timed_out, 0, "{}", o.victim.summary());
    assert_eq!(o.victim.sent, o.victim.noerror, "{}", o.victim.summary());
    // Both bounds took their part of the flood.
    assert!(o.rate_limited > 1000, "{}", o.rate_limited);
    assert!(o.new_servers_refused > 1000.0, "{}", o.new_servers_refused);
}

#[test]
fn a_flood_to_one_server_costs_other_pods_no_query() {
    let Some(o) = victim_during(Target::OneServer, 30_000) else {
        return;
    };
    assert_eq!(o.victim.timed_out, 0, "{}", o.victim.summary());
    assert_eq!(o.victim.sent, o.victim.noerror, "{}", o.victim.summary());
    assert!(o.rate_limited > 1000, "{}", o.rate_limited);
    // One server: its reply path is set up once.
    assert_eq!(o.new_servers_refused, 0.0);
}
