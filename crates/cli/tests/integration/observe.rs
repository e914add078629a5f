//! Flow events in the lab: `dnsfence observe` shows denied queries and refused packets
//! with the domain, the pod, the policy and the reason; `--follow` streams them within a
//! second; a flood stays within the ring and the loss is counted.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    blocked, env, env_config, env_split, ip, metrics_port, observe, reach, resolve, scrape,
};
use dnsfence_lab::{DnsStatus, RecordType, Transport};
use serde_json::Value;

#[test]
fn observe_names_the_domain_pod_policy_and_reason() {
    let Some(env) = env(vec![]) else { return };
    let (status, _) = resolve(
        env.web(),
        "blocked.example.org",
        RecordType::A,
        Transport::Udp,
    );
    assert_eq!(status, DnsStatus::Refused);
    assert!(blocked(reach(env.web(), ip("203.0.113.66"), 443)));
    let (status, ips) = resolve(env.web(), "api.example.com", RecordType::A, Transport::Udp);
    assert_eq!(status, DnsStatus::NoError);
    // The learned IP on a port the policy does not allow: the drop names the domain.
    assert!(blocked(reach(env.web(), ips[0], 8080)));
    std::thread::sleep(Duration::from_millis(300));

    let denied = observe(&env, &["--verdict", "denied", "--last", "100"]);
    let dns = denied
        .iter()
        .find(|f| f["type"] == "dns" && f["dns"]["query"] == "blocked.example.org")
        .unwrap_or_else(|| panic!("{denied:#?}"));
    assert_eq!(dns["source"]["pod_name"], "web");
    assert_eq!(dns["source"]["namespace"], "default");
    assert_eq!(dns["dns"]["rcode"], "REFUSED");
    assert!(dns["policy"].as_str().unwrap().contains("pattern"), "{dns}");
    let drop = denied
        .iter()
        .find(|f| f["type"] == "drop" && f["destination"]["ip"] == "203.0.113.66")
        .unwrap_or_else(|| panic!("{denied:#?}"));
    assert_eq!(drop["drop_reason_desc"], "policy-denied");
    assert_eq!(drop["destination"]["port"], 443);
    assert_eq!(drop["destination"]["protocol"], "tcp");
    assert_eq!(drop["source"]["pod_name"], "web");
    let named = denied
        .iter()
        .find(|f| f["type"] == "drop" && f["destination"]["port"] == 8080)
        .unwrap_or_else(|| panic!("{denied:#?}"));
    assert_eq!(named["destination"]["names"][0], "api.example.com");

    // Allowed answers carry the IPs and the TTL.
    let allowed = observe(&env, &["--verdict", "allowed", "--name", "*.example.com"]);
    let a = allowed
        .iter()
        .find(|f| f["dns"]["query"] == "api.example.com")
        .unwrap_or_else(|| panic!("{allowed:#?}"));
    assert_eq!(a["dns"]["ips"][0], "192.0.2.10");
    assert_eq!(a["dns"]["ttl"], 60);
    assert_eq!(a["dns"]["qtypes"][0], "A");
    // Filters: another pod, another type.
    assert!(observe(&env, &["--pod", "other"]).is_empty());
    assert!(observe(&env, &["--type", "drop", "--verdict", "allowed"]).is_empty());
}

// With the agent and the proxy as two processes, the agent reads the refused packets: it
// names their destination from what the proxies reported learning, and their pod with
// its labels.
#[test]
fn split_drop_events_name_the_domain_and_the_pods_labels() {
    let Some(env) = env_split(vec![]) else { return };
    let (status, ips) = resolve(env.web(), "api.example.com", RecordType::A, Transport::Udp);
    assert_eq!(status, DnsStatus::NoError);
    // The proxy's report of the learned IP reaches the agent.
    std::thread::sleep(Duration::from_millis(300));
    assert!(blocked(reach(env.web(), ips[0], 8080)));
    let deadline = Instant::now() + Duration::from_secs(5);
    let drop = loop {
        let drops = observe(&env, &["--type", "drop", "--last", "100"]);
        if let Some(d) = drops
            .iter()
            .find(|f| f["destination"]["port"] == 8080)
            .cloned()
        {
            break d;
        }
        assert!(Instant::now() < deadline, "{drops:#?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(drop["destination"]["names"][0], "api.example.com", "{drop}");
    assert_eq!(drop["source"]["pod_name"], "web", "{drop}");
    let labels = drop["source"]["labels"].as_array().unwrap();
    assert!(labels.iter().any(|l| l == "app=web"), "{drop}");
}

#[test]
fn observe_follow_shows_a_denial_within_a_second() {
    let Some(env) = env(vec![]) else { return };
    let mut child = Command::new(env!("CARGO_BIN_EXE_dnsfence"))
        .arg("observe")
        .arg("--config")
        .arg(env.daemon.config_path())
        .args([
            "--follow",
            "-o",
            "json",
            "--verdict",
            "denied",
            "--last",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let (status, _) = resolve(env.web(), "nope.example.org", RecordType::A, Transport::Udp);
    assert_eq!(status, DnsStatus::Refused);
    assert!(blocked(reach(env.web(), ip("203.0.113.9"), 443)));
    let (mut dns, mut drop) = (None, None);
    while dns.is_none() || drop.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(1).saturating_sub(started.elapsed()))
            .unwrap_or_else(|_| panic!("not within a second: dns {dns:?} drop {drop:?}"));
        let f: Value = serde_json::from_str(&line).unwrap();
        if f["dns"]["query"] == "nope.example.org" {
            dns = Some(started.elapsed());
        }
        if f["destination"]["ip"] == "203.0.113.9" {
            drop = Some(started.elapsed());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_flood_of_denied_queries_stays_within_the_ring_and_counts_the_loss() {
    let port = metrics_port(1);
    let config = format!("flows: {{ring_size: 500}}\nmetrics: {{listen: \"127.0.0.1:{port}\"}}\n");
    let Some(env) = env_config(vec![], &config) else {
        return;
    };
    let mut spec = dnsfence_lab::LoadSpec::new(
        dnsfence_lab::DNS_V4,
        ["a.denied.org", "b.denied.org", "c.denied.org"],
        3000,
    );
    spec.timeout = Duration::from_millis(500);
    let load = env.web().start_dns_load(spec).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let report = load.stop();
    println!("flood: {}", report.summary());
    assert!(report.refused >= 3000, "{}", report.summary());
    let kept = observe(&env, &["--last", "1000000"]);
    assert!(kept.len() <= 500, "{}", kept.len());
    let text = scrape(&env, port);
    let recorded = metric(&text, "dnsfence_flow_events_total");
    let lost = metric(&text, "dnsfence_flow_events_lost_total");
    assert!(recorded >= report.refused as f64, "{recorded}\n{text}");
    assert!(lost >= recorded - 500.0, "lost {lost} of {recorded}");
}

#[test]
fn metrics_are_served_with_their_documented_names() {
    let port = metrics_port(2);
    let Some(env) = env_config(
        vec![],
        &format!("metrics: {{listen: \"127.0.0.1:{port}\"}}\n"),
    ) else {
        return;
    };
    let api = common::a(env.web(), "api.example.com")[0];
    assert_eq!(reach(env.web(), api, 443), dnsfence_lab::Outcome::Connected);
    assert!(blocked(reach(env.web(), ip("203.0.113.66"), 443)));
    let _ = resolve(env.web(), "nope.example.org", RecordType::A, Transport::Udp);
    std::thread::sleep(Duration::from_millis(300));
    let text = scrape(&env, port);
    for name in [
        "dnsfence_dns_queries_total{verdict=\"allowed\",transport=\"udp\"}",
        "dnsfence_dns_queries_total{verdict=\"denied\",transport=\"udp\"}",
        "dnsfence_dns_upstream_responses_total",
        "dnsfence_dns_latency_seconds_bucket",
        "dnsfence_dns_hold_seconds_bucket",
        "dnsfence_dns_learned_names",
        "dnsfence_datapath_batches_total",
        "dnsfence_datapath_batch_seconds_bucket",
        "dnsfence_datapath_enforced_addresses",
        "dnsfence_datapath_refused_packets_total{reason=\"policy-denied\"}",
        "dnsfence_flow_events_total",
        "dnsfence_snapshot_age_seconds",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    // No domain name ever becomes a label value.
    assert!(!text.contains("example"), "{text}");
}
