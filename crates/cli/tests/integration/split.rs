//! Agent and proxy as two processes, in the lab: each is killed (SIGKILL), restarted or
//! rolled while pods resolve and connect, and what the pods observe is asserted.

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    a, blocked, env_split, env_split_config, ip, metrics_port, reach, resolve, scrape, Env,
};
use dnsfence_lab::daemon::Process;
use dnsfence_lab::{DnsStatus, Outcome, Rec, RecordType, Transport};

fn log_count(env: &Env, what: &str) -> usize {
    env.daemon.log().matches(what).count()
}

fn wait_for(env: &Env, what: &str, at_least: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while log_count(env, what) < at_least {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in:\n{}",
            env.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn with_the_agent_killed_new_names_still_resolve_and_connect() {
    let fresh = |i: u32| -> (&'static str, std::net::IpAddr) {
        (
            Box::leak(format!("fresh{i}.cdn.example.com").into_boxed_str()),
            ip(&format!("192.0.2.{}", 150 + i)),
        )
    };
    let names: Vec<_> = (0..4).map(fresh).collect();
    let Some(mut env) = env_split(names.iter().map(|(n, a)| Rec::Addr(n, 60, *a)).collect()) else {
        return;
    };
    wait_for(&env, "snapshot in force", 1);
    let api = a(env.web(), "api.example.com")[0];
    let mut conn = env
        .web()
        .connect_tcp(SocketAddr::new(api, 443), Duration::from_secs(2))
        .unwrap();
    env.daemon.kill(Process::Agent);
    // Names never resolved before: the proxy judges with its last snapshot and writes the
    // IPs into the kernel itself.
    for (name, addr) in &names[..2] {
        assert_eq!(a(env.web(), name), [*addr]);
        assert_eq!(
            reach(env.web(), *addr, 443),
            Outcome::Connected,
            "{name}\n{}",
            env.diag()
        );
    }
    assert_eq!(
        resolve(
            env.web(),
            "blocked.example.org",
            RecordType::A,
            Transport::Udp
        )
        .0,
        DnsStatus::Refused
    );
    assert!(blocked(reach(env.web(), ip("203.0.113.66"), 443)));
    assert_eq!(conn.exchange(b"agent down").unwrap(), b"agent down");
    // The agent comes back: it adopts the table, the proxy reconnects, nothing drops.
    env.daemon.spawn(Process::Agent).unwrap();
    wait_for(&env, "snapshot in force", 2);
    assert_eq!(conn.exchange(b"agent back").unwrap(), b"agent back");
    for (_, addr) in &names[..2] {
        assert_eq!(
            reach(env.web(), *addr, 443),
            Outcome::Connected,
            "learned IPs kept"
        );
    }
    for (name, addr) in &names[2..] {
        assert_eq!(a(env.web(), name), [*addr]);
        assert_eq!(reach(env.web(), *addr, 443), Outcome::Connected);
    }
}

#[test]
fn with_the_proxy_killed_enforced_pods_fail_closed_then_recover() {
    let Some(mut env) = env_split(vec![]) else {
        return;
    };
    wait_for(&env, "snapshot in force", 1);
    let api = a(env.web(), "api.example.com")[0];
    env.daemon.kill(Process::Proxy);
    let (status, _) = resolve(env.web(), "api.example.com", RecordType::A, Transport::Udp);
    assert_eq!(status, DnsStatus::TimedOut, "no bypass to the upstream");
    assert!(blocked(reach(env.web(), ip("203.0.113.66"), 443)));
    // Pods without policy never depended on it.
    assert_eq!(a(env.plain(), "evil.example.org"), [ip("203.0.113.66")]);
    env.daemon.spawn(Process::Proxy).unwrap();
    assert_eq!(a(env.web(), "api.example.com"), [api]);
    assert_eq!(reach(env.web(), api, 443), Outcome::Connected);
    assert_eq!(
        resolve(
            env.web(),
            "blocked.example.org",
            RecordType::A,
            Transport::Udp
        )
        .0,
        DnsStatus::Refused
    );
}

/// Lets the journal write (every 2 s), then loses everything but the state directory:
/// both processes and the kernel table, as a reboot would.
fn lose_all_but_the_state(env: &mut Env) {
    std::thread::sleep(Duration::from_millis(2500));
    env.daemon.kill_all();
    let out = env
        .lab
        .node()
        .command("nft")
        .args(["delete", "table", "inet", "dnsfence"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn learned_mappings_survive_a_restart_of_both_and_a_lost_table() {
    let Some(mut env) = env_split(vec![]) else {
        return;
    };
    wait_for(&env, "snapshot in force", 1);
    let cdn = a(env.web(), "a.cdn.example.com")[0];
    assert_eq!(reach(env.web(), cdn, 443), Outcome::Connected);
    lose_all_but_the_state(&mut env);
    assert_eq!(
        reach(env.web(), cdn, 443),
        Outcome::Connected,
        "no table: unenforced"
    );
    env.daemon.spawn(Process::Agent).unwrap();
    assert!(
        blocked(reach(env.web(), cdn, 443)),
        "new table, no proxy yet"
    );
    env.daemon.spawn(Process::Proxy).unwrap();
    wait_for(&env, "learned IPs restored", 1);
    // The pod's cached answer works again without resolving.
    assert_eq!(
        reach(env.web(), cdn, 443),
        Outcome::Connected,
        "{}",
        env.diag()
    );
}

// After a reboot the proxy may start before the agent: it restores its learned IPs while
// there is no table to write them to, and writes them once the agent has made one.
#[test]
fn learned_mappings_come_back_when_the_proxy_starts_before_the_agent() {
    let Some(mut env) = env_split(vec![]) else {
        return;
    };
    wait_for(&env, "snapshot in force", 1);
    let cdn = a(env.web(), "a.cdn.example.com")[0];
    assert_eq!(reach(env.web(), cdn, 443), Outcome::Connected);
    lose_all_but_the_state(&mut env);
    let before = log_count(&env, "snapshot in force");
    env.daemon.spawn(Process::Proxy).unwrap();
    wait_for(&env, "learned IPs restored", 1);
    env.daemon.spawn(Process::Agent).unwrap();
    wait_for(&env, "snapshot in force", before + 1);
    // The pod's cached answer works again without resolving.
    let deadline = Instant::now() + Duration::from_secs(5);
    while reach(env.web(), cdn, 443) != Outcome::Connected {
        assert!(Instant::now() < deadline, "{}", env.diag());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn corrupt_state_files_are_reported_and_ignored() {
    let Some(mut env) = env_split(vec![]) else {
        return;
    };
    wait_for(&env, "snapshot in force", 1);
    env.daemon.kill_all();
    let state = env.daemon.state_dir();
    std::fs::write(
        state.join("proxy-snapshot.json"),
        b"{\"format\":1,\"checksum\":\"0\",\"body\":\"x\"}",
    )
    .unwrap();
    std::fs::write(state.join("proxy-learned.json"), [0xde, 0xad, 0xbe, 0xef]).unwrap();
    // The proxy first, without an agent: it must not trust the files.
    env.daemon.spawn(Process::Proxy).unwrap();
    wait_for(&env, "saved snapshot ignored", 1);
    wait_for(&env, "saved learned IPs ignored", 1);
    env.daemon.spawn(Process::Agent).unwrap();
    wait_for(&env, "snapshot in force", 2);
    let api = a(env.web(), "api.example.com")[0];
    assert_eq!(reach(env.web(), api, 443), Outcome::Connected);
}

#[test]
fn status_shows_both_processes() {
    let Some(mut env) = env_split(vec![]) else {
        return;
    };
    wait_for(&env, "snapshot in force", 1);
    let api = a(env.web(), "api.example.com")[0];
    assert_eq!(reach(env.web(), api, 443), Outcome::Connected);
    let status = |env: &Env| {
        let out = common::dnsfence_cli(env, &["status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (out.status.code(), v)
    };
    let (code, v) = status(&env);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(
        v["agent"]["snapshot_version"], v["proxy"]["snapshot_version"],
        "{v}"
    );
    assert_eq!(v["proxy"]["learned_names"], 1, "{v}");
    // Both count policies the same way: the lab's policy file holds two.
    assert_eq!(v["agent"]["policies"], 2, "{v}");
    assert_eq!(v["proxy"]["policies"], 2, "{v}");
    let elements: u64 = v["agent"]["datapath"]["elements"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert!(elements >= 1, "{v}");
    assert_eq!(v["agent"]["datapath"]["enforced_addresses"], 4, "{v}");
    env.daemon.kill(Process::Agent);
    let (code, v) = status(&env);
    assert_eq!(code, Some(1));
    assert!(v["agent"]["error"].is_string(), "{v}");
}

/// Steady DNS load from the web and the other pod, allowed names only.
fn start_load(env: &Env, qps: u32, retries: u32) -> (dnsfence_lab::Load, dnsfence_lab::Load) {
    let spec = |names: &[&str]| {
        let mut s = dnsfence_lab::LoadSpec::new(dnsfence_lab::DNS_V4, names.iter().copied(), qps);
        s.retries = retries;
        s.timeout = Duration::from_millis(500);
        s
    };
    (
        env.web()
            .start_dns_load(spec(&[
                "api.example.com",
                "a.cdn.example.com",
                "www.cdn.example.com",
            ]))
            .unwrap(),
        env.other()
            .start_dns_load(spec(&["other.example.com", "api.example.com"]))
            .unwrap(),
    )
}

#[test]
fn agent_killed_and_restarted_under_load_loses_no_query_and_no_connection() {
    let fresh: Vec<(&'static str, std::net::IpAddr)> = (0..3)
        .map(|i| {
            (
                &*Box::leak(format!("new{i}.cdn.example.com").into_boxed_str()),
                ip(&format!("198.51.100.{}", 10 + i)),
            )
        })
        .collect();
    let Some(mut env) = env_split(fresh.iter().map(|(n, a)| Rec::Addr(n, 60, *a)).collect()) else {
        return;
    };
    wait_for(&env, "snapshot in force", 1);
    let api = a(env.web(), "api.example.com")[0];
    let mut conn = env
        .web()
        .connect_tcp(SocketAddr::new(api, 443), Duration::from_secs(2))
        .unwrap();
    let (l1, l2) = start_load(&env, 500, 0);
    std::thread::sleep(Duration::from_millis(700));
    env.daemon.kill(Process::Agent);
    let mut new_ok = 0;
    for (name, addr) in &fresh {
        if a(env.web(), name) == [*addr] && reach(env.web(), *addr, 443) == Outcome::Connected {
            new_ok += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(700));
    env.daemon.spawn(Process::Agent).unwrap();
    wait_for(&env, "snapshot in force", 2);
    std::thread::sleep(Duration::from_millis(700));
    let (r1, r2) = (l1.stop(), l2.stop());
    let conn_ok = conn.exchange(b"still here").is_ok();
    println!("agent kill -9 + restart under load: web {}", r1.summary());
    println!("agent kill -9 + restart under load: other {}", r2.summary());
    println!(
        "new names resolved and reached with the agent down: {new_ok}/{}",
        fresh.len()
    );
    println!("established connection survived: {conn_ok}");
    assert_eq!(new_ok, fresh.len());
    assert!(conn_ok);
    assert_eq!(
        r1.failed() + r2.failed(),
        0,
        "{:?} {:?}",
        r1.failures,
        r2.failures
    );
}

#[test]
fn rolling_restarts_of_the_proxy_under_load() {
    let Some(mut env) = env_split(vec![]) else {
        return;
    };
    wait_for(&env, "snapshot in force", 1);
    // One pod asks like a bare client (no retry), the other like glibc's stub (retries).
    let mut bare = dnsfence_lab::LoadSpec::new(
        dnsfence_lab::DNS_V4,
        ["api.example.com", "a.cdn.example.com"],
        500,
    );
    bare.timeout = Duration::from_millis(500);
    let mut stub = bare.clone();
    stub.retries = 2;
    let l1 = env.web().start_dns_load(bare).unwrap();
    let l2 = env
        .other()
        .start_dns_load({
            let mut s = stub;
            s.names = vec!["other.example.com".into()];
            s
        })
        .unwrap();
    let mut drains = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        drains.push(env.daemon.roll_proxy().unwrap());
    }
    std::thread::sleep(Duration::from_millis(500));
    let (r1, r2) = (l1.stop(), l2.stop());
    println!("3 rolling proxy restarts, old proxies exited after {drains:?}");
    println!("  no retries:      {}", r1.summary());
    println!("  stub (2 retries): {}", r2.summary());
    assert_eq!(r2.failed(), 0, "{:?}", r2.failures);
    // Without retries a query that sat in the old socket's queue at close can be lost; the
    // figure is printed and bounded.
    assert!(r1.failed() <= 5, "{}: {:?}", r1.summary(), r1.failures);
}

/// The table as `nft` lists it, without counters, learned IPs and DNS meters (whose
/// timeouts tick): what a reconcile decides.
fn skeleton(env: &Env) -> String {
    let out = env
        .lab
        .node()
        .command("nft")
        .args(["list", "table", "inet", "dnsfence"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut keep = Vec::new();
    let mut in_fq = false;
    for line in text.lines() {
        let t = line.trim();
        // Learned IPs and the DNS meters are state, not skeleton.
        if t.starts_with("set fq_") || t.starts_with("set dnsrate") {
            in_fq = true;
            keep.push(t.to_owned());
            continue;
        }
        if in_fq {
            if t == "}" {
                in_fq = false;
            }
            continue;
        }
        let mut l = t.to_owned();
        if let Some(i) = l.find("counter packets") {
            let rest = &l[i..];
            let end = rest.find(" bytes ").map(|b| {
                let after = &rest[b + 7..];
                b + 7 + after.find(' ').unwrap_or(after.len())
            });
            if let Some(end) = end {
                l = format!("{}counter{}", &l[..i], &rest[end..]);
            }
        }
        keep.push(l);
    }
    keep.join("\n")
}

fn in_sync(env: &Env) -> bool {
    let out = env
        .lab
        .node()
        .command(env!("CARGO_BIN_EXE_dnsfence"))
        .args(["status", "-o", "json", "--config"])
        .arg(env.daemon.config_path())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["agent"]["snapshot_version"].is_u64()
        && v["agent"]["snapshot_version"] == v["proxy"]["snapshot_version"]
}

#[test]
fn kills_at_random_moments_during_policy_churn_leave_exactly_the_desired_state() {
    let Some(mut env) = env_split(vec![]) else {
        return;
    };
    wait_for(&env, "snapshot in force", 1);
    let a_policy = common::POLICY.to_owned();
    let b_policy = common::POLICY
        .replace(
            "- toFQDNs: [{matchName: api.example.com}]",
            "- toFQDNs: [{matchName: new.example.com}]",
        )
        .replace(
            "{matchName: short.example.com}]",
            "{matchName: short.example.com}, {matchName: other.example.com}]",
        );
    assert_ne!(a_policy, b_policy);
    let api = a(env.web(), "api.example.com")[0];
    let mut spec = dnsfence_lab::LoadSpec::new(
        dnsfence_lab::DNS_V4,
        ["a.cdn.example.com", "x.y.deep.example.net"],
        300,
    );
    spec.retries = 3;
    spec.timeout = Duration::from_millis(300);
    let load = env.web().start_dns_load(spec).unwrap();
    let mut seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("churn seed {seed}");
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let (mut agent_kills, mut proxy_kills) = (0, 0);
    for i in 0..50 {
        let policy = if i % 2 == 0 { &b_policy } else { &a_policy };
        env.daemon.signal_reload(policy).unwrap();
        std::thread::sleep(Duration::from_millis(next(40)));
        let victim = if next(2) == 0 {
            agent_kills += 1;
            Process::Agent
        } else {
            proxy_kills += 1;
            Process::Proxy
        };
        env.daemon.kill(victim);
        std::thread::sleep(Duration::from_millis(next(20)));
        env.daemon.spawn(victim).unwrap();
    }
    // Settle on policy B.
    env.daemon.reload(&b_policy).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !in_sync(&env) {
        assert!(
            Instant::now() < deadline,
            "proxy never caught up:\n{}",
            env.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = load.stop();
    let churned = skeleton(&env);
    // What a reconcile of B decides, applied again onto this table, changes nothing.
    env.daemon.reload(&b_policy).unwrap();
    let again = skeleton(&env);
    println!(
        "50 policy changes with {agent_kills} agent and {proxy_kills} proxy kill -9s: {}",
        report.summary()
    );
    assert_eq!(
        churned, again,
        "the churned table differs from the desired one"
    );
    // Exactly B's selector sets, nothing left over from A.
    let fq: Vec<&str> = churned
        .lines()
        .filter(|l| l.starts_with("set fq_"))
        .collect();
    assert_eq!(fq.len(), 2 * 5, "{fq:?}");
    // Nothing extra allowed: api.example.com was only in A.
    assert!(blocked(reach(env.web(), api, 443)));
    // And what B allows works.
    let other = a(env.web(), "other.example.com")[0];
    assert_eq!(
        reach(env.web(), other, 80),
        Outcome::Connected,
        "{}",
        env.diag()
    );
}

#[test]
fn a_proxy_alone_starts_from_its_saved_snapshot() {
    let Some(mut env) = env_split(vec![]) else {
        return;
    };
    wait_for(&env, "snapshot in force", 1);
    // Break the configuration's policy file: only the saved snapshot can say what is
    // allowed now.
    env.daemon.kill_all();
    std::fs::write(env.daemon.dir().join("policy.yaml"), "not: [a, policy").unwrap();
    env.daemon.spawn(Process::Proxy).unwrap();
    wait_for(&env, "starting from the saved snapshot", 1);
    let api = a(env.web(), "api.example.com")[0];
    assert_eq!(
        reach(env.web(), api, 443),
        Outcome::Connected,
        "{}",
        env.diag()
    );
    assert_eq!(
        resolve(
            env.web(),
            "blocked.example.org",
            RecordType::A,
            Transport::Udp
        )
        .0,
        DnsStatus::Refused
    );
}

#[test]
fn the_agent_refuses_a_proxy_speaking_another_protocol() {
    use std::io::{BufRead, BufReader, Write};
    let Some(env) = env_split(vec![]) else { return };
    let mut s =
        std::os::unix::net::UnixStream::connect(env.daemon.dir().join("agent.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    writeln!(
        s,
        "{{\"type\":\"hello\",\"protocol\":99,\"role\":\"proxy\",\"pid\":1,\"version\":0}}"
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.contains("\"type\":\"error\""), "{line}");
    assert!(line.contains("protocol 1, not 99"), "{line}");
}

#[test]
fn the_agent_serves_its_own_metrics() {
    let port = metrics_port(3);
    let Some(env) = env_split_config(
        vec![],
        &format!("metrics: {{agent_listen: \"127.0.0.1:{port}\"}}\n"),
    ) else {
        return;
    };
    wait_for(&env, "snapshot in force", 1);
    assert!(blocked(reach(env.web(), ip("203.0.113.66"), 443)));
    std::thread::sleep(Duration::from_millis(300));
    let text = scrape(&env, port);
    for name in [
        "dnsfence_agent_snapshot_version",
        "dnsfence_datapath_reconciles_total 1",
        "dnsfence_datapath_enforced_addresses 4",
        "dnsfence_datapath_refused_packets_total{reason=\"policy-denied\"}",
        "dnsfence_flow_events_total",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
}
