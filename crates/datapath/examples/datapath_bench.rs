//! Datapath benchmark against the real kernel (run as root; `bench/datapath.sh` wraps it).
//!
//! In a network namespace of its own, it programs a table for 250 enforced endpoints
//! sharing 20 `toFQDNs` selectors, fills the selector sets with 2,000 live IPs, then
//! measures what the proxy waits for before releasing an answer: the time from handing
//! the datapath thread a batch of new IPs to the kernel confirming them, for 1, 10 and 100
//! new IPs per answer (p50/p99), and the sustained rate of new IPs per second.

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dnsfence_datapath::{Datapath, DenyAction, Options, RealKernel, Worker};
use dnsfence_fqdncache::Change;
use dnsfence_policy::Inventory;
use dnsfence_policy::{Endpoint, Labels, PolicyLoader, PolicySet, SelectorId};

struct Ns(String);
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn policies() -> PolicySet {
    let fqdns: Vec<String> = (0..20)
        .map(|i| format!("{{matchPattern: \"*.svc{i}.example.com\"}}"))
        .collect();
    let text = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: bench, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{app: bench}}}}\n  egress:\n    - toCIDR: [192.0.2.53/32]\n      toPorts: [{{ports: [{{port: \"53\", protocol: ANY}}], rules: {{dns: [{{matchPattern: \"*\"}}]}}}}]\n    - toFQDNs: [{}]\n      toPorts: [{{ports: [{{port: \"443\", protocol: TCP}}]}}]\n",
        fqdns.join(", ")
    );
    let mut loader = PolicyLoader::new();
    loader.add("bench.yaml", &text);
    loader.finish().0
}

fn ip(n: u32) -> IpAddr {
    if n % 4 == 3 {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0,
            0,
            0,
            0,
            (n >> 16) as u16,
            n as u16,
        ))
    } else {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (n & 0x00ff_ffff)))
    }
}

fn batch(start: u32, n: u32, sels: &[SelectorId]) -> Vec<Change> {
    (start..start + n)
        .map(|i| Change::Upsert {
            name: format!("h{i}.svc{}.example.com", i % 20).into(),
            ip: ip(i),
            expires: Instant::now() + Duration::from_secs(600),
            selectors: vec![sels[(i % 20) as usize]].into(),
            new: true,
        })
        .collect()
}

fn apply(worker: &Worker, changes: Vec<Change>) -> Duration {
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    worker.apply(changes, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    assert!(rx.recv().unwrap(), "batch failed");
    started.elapsed()
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn main() {
    let name = format!("dfbench-{}", std::process::id());
    assert!(Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap()
        .success());
    let _ns = Ns(name.clone());
    assert!(Command::new("ip")
        .args(["-n", &name, "link", "set", "lo", "up"])
        .status()
        .unwrap()
        .success());
    let file = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();

    let set = Arc::new(policies());
    let sels: Vec<SelectorId> = set.fqdn_selectors().iter().map(|(id, _)| *id).collect();
    let labels = Labels::new([("app", "bench".to_owned())]).unwrap();
    let endpoints = (0..250u32).map(|i| {
        (
            format!("pod-{i}"),
            Endpoint::new("default", labels.clone()),
            vec![IpAddr::V4(Ipv4Addr::new(
                10,
                244,
                (i / 200) as u8,
                (i % 200 + 2) as u8,
            ))],
        )
    });
    let inventory = Arc::new(Inventory::resolve(&set, endpoints, vec![]));
    let options = Options {
        table: "dnsfence".into(),
        deny_action: DenyAction::Reject,
        fwmark: 0x4e53,
        ct_mark: 0x0040_0000,
        tproxy_port: Some(15053),
        route_table: 20053,
        log_group: Some(20053),
        never_learn: vec![
            "127.0.0.0/8".parse().unwrap(),
            "169.254.0.0/16".parse().unwrap(),
            "::ffff:0:0/96".parse().unwrap(),
        ],
        dns_rate_limit: Some(5000),
    };
    let dp = Datapath::new(Box::new(RealKernel::default()), options).unwrap();
    let worker = Worker::spawn(dp).unwrap();
    let started = Instant::now();
    worker.reconcile(set.clone(), inventory).unwrap();
    println!(
        "reconcile: 250 endpoints, 20 selectors: {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    // 2,000 live IPs to start from.
    apply(&worker, batch(0, 2000, &sels));
    let mut next = 2000;
    println!(
        "{:>14} {:>10} {:>10} {:>10}",
        "new IPs/answer", "p50 us", "p99 us", "samples"
    );
    for per in [1u32, 10, 100] {
        let samples = if per == 100 { 300 } else { 1000 };
        let mut times: Vec<Duration> = (0..samples)
            .map(|_| {
                let d = apply(&worker, batch(next, per, &sels));
                next += per;
                d
            })
            .collect();
        times.sort();
        println!(
            "{per:>14} {:>10.0} {:>10.0} {samples:>10}",
            pct(&times, 0.5),
            pct(&times, 0.99)
        );
    }
    // Sustained: 100,000 new IPs in answers of 10, queued as fast as they come.
    let total = 100_000u32;
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    for k in 0..total / 10 {
        let tx = tx.clone();
        worker.apply(
            batch(next + k * 10, 10, &sels),
            Box::new(move |r| tx.send(r.is_ok()).unwrap()),
        );
    }
    for _ in 0..total / 10 {
        assert!(rx.recv().unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "sustained: {total} new IPs in {secs:.2} s = {:.0} new IPs/s ({} kernel batches)",
        f64::from(total) / secs,
        worker.stats.batches.get()
    );
}
