//! End-to-end tests of `dnsfence run` in the lab: real pods (network namespaces) resolve
//! through the world's DNS server (redirected to the proxy by the datapath) and connect to
//! the world's servers through the node's nftables table. Every assertion is about what a
//! pod observes (answers, connections, resets), not about internal state.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::common;

use common::{a, blocked, env, ip, reach, resolve, POLICY};
use dnsfence_lab::{DnsStatus, Outcome, Rec, RecordType, Transport};
use dnsfence_testsupport::skip_unless_root;

#[test]
fn allowed_name_resolves_and_connects_over_tcp_and_udp() {
    let Some(env) = env(vec![]) else { return };
    let ips = a(env.web(), "api.example.com");
    assert_eq!(ips, [ip("192.0.2.10")]);
    assert_eq!(
        reach(env.web(), ips[0], 443),
        Outcome::Connected,
        "{}",
        env.diag()
    );
    let echo = env
        .web()
        .udp_exchange(
            SocketAddr::new(ips[0], 9000),
            b"ping",
            Duration::from_secs(2),
        )
        .unwrap();
    assert_eq!(echo, b"ping");
}

#[test]
fn denied_name_is_refused_and_its_ip_and_unresolved_ips_are_unreachable() {
    let Some(env) = env(vec![]) else { return };
    let (status, _) = resolve(
        env.web(),
        "blocked.example.org",
        RecordType::A,
        Transport::Udp,
    );
    assert_eq!(status, DnsStatus::Refused);
    // evil.example.org may be resolved (DNS rule) but no toFQDNs selects it.
    assert_eq!(a(env.web(), "evil.example.org"), [ip("203.0.113.66")]);
    assert!(blocked(reach(env.web(), ip("203.0.113.66"), 443)));
    // Literal IPs never resolved, of every family and range.
    for target in ["192.0.2.99", "203.0.113.7", "2001:db8::99"] {
        let o = reach(env.web(), ip(target), 443);
        assert!(blocked(o), "{target}: {o:?}");
    }
    // UDP to a never-resolved IP gets no echo.
    assert!(env
        .web()
        .udp_exchange(
            SocketAddr::new(ip("192.0.2.99"), 9000),
            b"x",
            Duration::from_millis(500)
        )
        .is_err());
}

#[test]
fn an_ip_learned_for_one_pod_is_not_reachable_from_a_pod_whose_policy_does_not_select_it() {
    let Some(env) = env(vec![]) else { return };
    let ips = a(env.web(), "api.example.com");
    assert_eq!(reach(env.web(), ips[0], 443), Outcome::Connected);
    // The other pod may resolve it (its DNS rule allows all) but not reach it.
    assert_eq!(a(env.other(), "api.example.com"), ips);
    assert!(blocked(reach(env.other(), ips[0], 443)));
    // Its own name works.
    let own = a(env.other(), "other.example.com");
    assert_eq!(reach(env.other(), own[0], 80), Outcome::Connected);
}

#[test]
fn wildcard_and_multi_label_patterns_allow_their_names_and_cname_targets() {
    let Some(env) = env(vec![]) else { return };
    for (name, port) in [
        ("a.cdn.example.com", 80),
        ("www.cdn.example.com", 8080),
        ("x.y.deep.example.net", 443),
    ] {
        let ips = a(env.web(), name);
        assert_eq!(
            reach(env.web(), ips[0], port),
            Outcome::Connected,
            "{name}\n{}",
            env.diag()
        );
    }
    // `**.deep.example.net` needs at least one label more: the apex is refused.
    let (status, _) = resolve(env.web(), "deep.example.net", RecordType::A, Transport::Udp);
    assert_eq!(status, DnsStatus::Refused);
    assert!(blocked(reach(env.web(), ip("192.0.2.32"), 443)));
}

#[test]
fn to_ports_narrows_an_fqdn_allow() {
    let Some(env) = env(vec![]) else { return };
    let ips = a(env.web(), "api.example.com");
    assert_eq!(reach(env.web(), ips[0], 443), Outcome::Connected);
    assert!(blocked(reach(env.web(), ips[0], 80)));
    assert!(blocked(reach(env.web(), ips[0], 8080)));
    // 9000 is allowed over UDP only.
    assert!(env
        .web()
        .udp_exchange(
            SocketAddr::new(ips[0], 9001),
            b"x",
            Duration::from_millis(500)
        )
        .is_err());
}

#[test]
fn cidr_allow_with_except_and_egress_deny() {
    let Some(env) = env(vec![]) else { return };
    assert_eq!(reach(env.web(), ip("198.51.100.7"), 80), Outcome::Connected);
    assert!(
        blocked(reach(env.web(), ip("198.51.100.66"), 80)),
        "egressDeny wins"
    );
    assert!(
        blocked(reach(env.web(), ip("198.51.100.200"), 80)),
        "except"
    );
}

#[test]
fn ttl_expiry_blocks_new_connections_while_established_ones_continue() {
    let Some(env) = env(vec![]) else { return };
    let ips = a(env.web(), "short.example.com");
    let started = Instant::now();
    let mut conn = env
        .web()
        .connect_tcp(SocketAddr::new(ips[0], 80), Duration::from_secs(2))
        .unwrap();
    assert_eq!(conn.exchange(b"before").unwrap(), b"before");
    // TTL 2 s: poll until new connections are refused (bounded).
    let mut expired = false;
    while started.elapsed() < Duration::from_secs(8) {
        if blocked(reach(env.web(), ips[0], 80)) {
            expired = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        expired,
        "still reachable 8 s after a 2 s TTL\n{}",
        env.diag()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "expired too early"
    );
    assert_eq!(
        conn.exchange(b"after").unwrap(),
        b"after",
        "established connection cut"
    );
}

#[test]
fn dns_over_tcp_is_filtered_and_teaches_ips() {
    let Some(env) = env(vec![]) else { return };
    let (status, ips) = resolve(env.web(), "api.example.com", RecordType::A, Transport::Tcp);
    assert_eq!(status, DnsStatus::NoError);
    assert_eq!(reach(env.web(), ips[0], 443), Outcome::Connected);
    let (status, _) = resolve(env.web(), "nope.example.org", RecordType::A, Transport::Tcp);
    assert_eq!(status, DnsStatus::Refused);
}

#[test]
fn ipv6_answers_and_pods() {
    let Some(env) = env(vec![]) else { return };
    let (status, ips) = resolve(
        env.web(),
        "api.example.com",
        RecordType::AAAA,
        Transport::Udp,
    );
    assert_eq!(
        (status, ips.clone()),
        (DnsStatus::NoError, vec![ip("2001:db8::10")])
    );
    assert_eq!(
        reach(env.web(), ips[0], 443),
        Outcome::Connected,
        "{}",
        env.diag()
    );
    assert!(blocked(reach(env.web(), ips[0], 80)));
    // Through the IPv6 DNS server too.
    let r = env
        .web()
        .netns()
        .resolve_with(
            dnsfence_lab::DNS_V6,
            "a.cdn.example.com",
            RecordType::A,
            Transport::Udp,
            Duration::from_secs(2),
        )
        .unwrap();
    assert_eq!(r.status, DnsStatus::NoError);
    let r = env
        .web()
        .netns()
        .resolve_with(
            dnsfence_lab::DNS_V6,
            "blocked.example.org",
            RecordType::AAAA,
            Transport::Udp,
            Duration::from_secs(2),
        )
        .unwrap();
    assert_eq!(r.status, DnsStatus::Refused);
}

#[test]
fn a_pod_without_policy_is_unaffected() {
    let Some(env) = env(vec![]) else { return };
    // Its DNS is not redirected nor filtered, and it reaches anything.
    assert_eq!(a(env.plain(), "evil.example.org"), [ip("203.0.113.66")]);
    for (target, port) in [
        ("203.0.113.66", 443),
        ("192.0.2.99", 8080),
        ("2001:db8::99", 80),
    ] {
        assert_eq!(
            reach(env.plain(), ip(target), port),
            Outcome::Connected,
            "{target}"
        );
    }
}

#[test]
fn the_first_connection_right_after_the_answer_never_fails() {
    // 200 names, each with an IP nobody resolved before: every answer carries a new IP
    // and the pod connects the moment it has it.
    let names: Vec<(&'static str, IpAddr)> = (0..200u32)
        .map(|i| {
            let name: &'static str = Box::leak(format!("n{i}.cdn.example.com").into_boxed_str());
            let addr = if i < 150 {
                ip(&format!("192.0.2.{}", 100 + i))
            } else {
                ip(&format!("203.0.113.{}", 100 + i - 150))
            };
            (name, addr)
        })
        .collect();
    let recs = names.iter().map(|(n, a)| Rec::Addr(n, 60, *a)).collect();
    let Some(env) = env(recs) else { return };
    let mut failures = Vec::new();
    for (name, addr) in &names {
        let ips = a(env.web(), name);
        assert_eq!(ips, [*addr]);
        let o = reach(env.web(), ips[0], 443);
        if o != Outcome::Connected {
            failures.push(format!("{name} {addr}: {o:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:?}\n{}", env.diag());
}

#[test]
fn a_policy_change_takes_effect_without_dropping_established_connections() {
    let Some(env) = env(vec![]) else { return };
    let api = a(env.web(), "api.example.com")[0];
    let mut conn = env
        .web()
        .connect_tcp(SocketAddr::new(api, 443), Duration::from_secs(2))
        .unwrap();
    assert_eq!(conn.exchange(b"1").unwrap(), b"1");
    // api.example.com leaves the policy; a new name arrives.
    let new_policy = POLICY
        .replace(
            "- toFQDNs: [{matchName: api.example.com}]",
            "- toFQDNs: [{matchName: new.example.com}]",
        )
        .replace(
            "{matchName: short.example.com}]",
            "{matchName: short.example.com}, {matchName: other.example.com}]",
        );
    assert_ne!(new_policy, POLICY);
    env.daemon.reload(&new_policy).unwrap();
    assert_eq!(
        conn.exchange(b"2").unwrap(),
        b"2",
        "established connection dropped"
    );
    assert!(blocked(reach(env.web(), api, 443)), "{}", env.diag());
    let other = a(env.web(), "other.example.com")[0];
    assert_eq!(reach(env.web(), other, 80), Outcome::Connected);
    // A broken policy is rejected and the running one stays.
    assert!(env.daemon.reload("kind: [").is_err());
    assert_eq!(
        reach(env.web(), a(env.web(), "other.example.com")[0], 80),
        Outcome::Connected
    );
    assert_eq!(conn.exchange(b"3").unwrap(), b"3");
}

#[test]
fn when_dnsfence_dies_enforced_pods_fail_closed_and_others_are_unaffected() {
    let Some(mut env) = env(vec![]) else { return };
    let api = a(env.web(), "api.example.com")[0];
    let mut conn = env
        .web()
        .connect_tcp(SocketAddr::new(api, 443), Duration::from_secs(2))
        .unwrap();
    env.daemon.kill_all();
    // The table stays: the enforced pod's DNS is dropped, not forwarded unfiltered...
    let (status, _) = resolve(env.web(), "evil.example.org", RecordType::A, Transport::Udp);
    assert_eq!(status, DnsStatus::TimedOut, "{}", env.diag());
    let (status, _) = resolve(env.web(), "api.example.com", RecordType::A, Transport::Tcp);
    assert!(
        matches!(status, DnsStatus::TimedOut | DnsStatus::ConnectionRefused),
        "{status:?}"
    );
    // ...never-allowed destinations stay blocked, established and learned ones keep working.
    assert!(blocked(reach(env.web(), ip("203.0.113.66"), 443)));
    assert_eq!(conn.exchange(b"still").unwrap(), b"still");
    assert_eq!(reach(env.web(), api, 443), Outcome::Connected);
    // A pod without policy never depended on dnsfence.
    assert_eq!(a(env.plain(), "evil.example.org"), [ip("203.0.113.66")]);
    let counters = env
        .lab
        .node()
        .command("nft")
        .args(["list", "chain", "inet", "dnsfence", "prerouting"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&counters.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("dns proxy unavailable") && !l.contains("packets 0 ")),
        "{text}"
    );
}

#[test]
fn the_demo_passes_and_cleans_up() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_dnsfence"))
        .arg("demo")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let prefix = format!("dfl{}x", child.id());
    let out = child.wait_with_output().unwrap();
    let left = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains(&prefix), "the demo left namespaces: {left}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdict = stdout.lines().last().unwrap();
    assert!(verdict.starts_with("PASS: 14/14"), "{verdict}");
    for header in ["pod", "action", "target", "expected", "ms", "observed"] {
        assert!(stdout.lines().next().unwrap().contains(header));
    }
}

#[test]
fn run_without_nft_fails_clearly_before_touching_anything() {
    let tmp = dnsfence_testsupport::TempDir::new("run-no-nft");
    std::fs::write(tmp.path().join("c.yaml"), "policies: []\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dnsfence"))
        .args(["run", "--config"])
        .arg(tmp.path().join("c.yaml"))
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("`nft` not found"), "{stderr}");
    assert!(stderr.contains("apt install nftables"), "{stderr}");
}

// `dnsfence run` has no agent: status says so and is healthy (exit 0).
#[test]
fn status_of_run_needs_no_agent() {
    let Some(env) = env(vec![]) else { return };
    let out = common::dnsfence_cli(&env, &["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_eq!(v["proxy"]["follows_agent"], false, "{v}");
    assert!(v["agent"]["not_used"].is_string(), "{v}");
}

// `fqdn list` finds the API socket through the configuration, as status and observe do.
#[test]
fn fqdn_list_reads_the_socket_from_the_configuration() {
    let Some(env) = env(vec![]) else { return };
    a(env.web(), "api.example.com");
    let out = common::dnsfence_cli(&env, &["fqdn", "list", "-o", "json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("api.example.com"), "{text}");
}
