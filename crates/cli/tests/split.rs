//! Agent and proxy as two processes, in the lab: each is killed (SIGKILL), restarted or
//! rolled while pods resolve and connect, and what the pods observe is asserted.

#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{a, blocked, env_split, ip, reach, resolve, Env};
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

#[test]
fn learned_mappings_survive_a_restart_of_both_and_a_lost_table() {
    let Some(mut env) = env_split(vec![]) else {
        return;
    };
    wait_for(&env, "snapshot in force", 1);
    let cdn = a(env.web(), "a.cdn.example.com")[0];
    assert_eq!(reach(env.web(), cdn, 443), Outcome::Connected);
    // Let the journal write (every 2 s), then lose everything but the state directory:
    // both processes and the kernel table (as a reboot would).
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
        let out = env
            .lab
            .node()
            .command(env!("CARGO_BIN_EXE_dnsfence"))
            .args(["status", "-o", "json", "--config"])
            .arg(env.daemon.config_path())
            .output()
            .unwrap();
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
