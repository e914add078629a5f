//! `dnsfence proxy` and `dnsfence fqdn list` as a user runs them: a real upstream
//! (dnsmasq), a real client (dig), signals, the API socket.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dnsfence_testsupport::policy::{dns_policy, DnsPeer};
use dnsfence_testsupport::{dig, free_port, skip, Dnsmasq, TempDir};

struct Running {
    child: Child,
    dir: TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_policy(dir: &Path, port: u16, pattern: &str) {
    let text = dns_policy("web", DnsPeer::KubeDns, port, &[pattern], &[pattern]);
    std::fs::write(dir.join("policy.yaml"), text).unwrap();
}

fn start(upstream: SocketAddr, listen: u16, metrics: u16) -> Running {
    let tmp = TempDir::new("proxy-cli");
    let dir = tmp.path().to_owned();
    write_policy(&dir, upstream.port(), "*.example.com");
    let config = format!(
        "policies: [policy.yaml]\nendpoints:\n  - {{name: web-1, labels: {{app: web}}, ips: [127.0.0.2]}}\n  - {{name: coredns, namespace: kube-system, labels: {{k8s-app: kube-dns}}, ips: [127.0.0.1]}}\ndns:\n  listen: [\"127.0.0.1:{listen}\"]\n  upstreams: [\"{upstream}\"]\napi: {{socket: {}}}\nmetrics: {{listen: \"127.0.0.1:{metrics}\"}}\n",
        dir.join("api.sock").display()
    );
    std::fs::write(dir.join("config.yaml"), config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_dnsfence"))
        .args(["proxy", "--config"])
        .arg(dir.join("config.yaml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("proxy.log")).unwrap())
        .spawn()
        .unwrap();
    let running = Running { child, dir: tmp };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !running.dir.0.join("api.sock").exists() {
        assert!(Instant::now() < deadline, "proxy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    running
}

fn fqdn_list(r: &Running) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_dnsfence"))
        .args(["fqdn", "list", "-o", "json", "--socket"])
        .arg(r.dir.0.join("api.sock"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Sends SIGHUP and waits until the proxy has logged the outcome of the reload.
fn hup(r: &Running) {
    let log = r.dir.path().join("proxy.log");
    let reloads = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("policies reloaded") || l.contains("reload rejected"))
            .count()
    };
    let before = reloads();
    let ok = Command::new("kill")
        .args(["-HUP", &r.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads() == before {
        assert!(
            Instant::now() < deadline,
            "the proxy never logged the reload"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn resolve_inspect_and_reload() {
    if skip(&["dig", "dnsmasq"]) {
        return;
    }
    let up = Dnsmasq::start(
        "example.com",
        60,
        &[
            "--host-record=edge.example.com,192.0.2.20".into(),
            "--cname=www.example.com,edge.example.com".into(),
            "--host-record=api.example.org,198.51.100.1".into(),
        ],
    );
    let port = free_port();
    let metrics_port = free_port();
    let r = start(up.addr, port, metrics_port);
    let at: SocketAddr = ([127, 0, 0, 1], port).into();
    let ok = dig("127.0.0.2", at, "www.example.com", &[]);
    assert_eq!(ok.status, "NOERROR", "{}", ok.raw);
    assert_eq!(ok.answers, ["edge.example.com.", "192.0.2.20"]);
    assert_eq!(
        dig("127.0.0.2", at, "api.example.org", &["+tcp"]).status,
        "REFUSED"
    );
    let list = fqdn_list(&r);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["edge.example.com", "www.example.com"]);
    assert_eq!(list[1]["ips"][0]["ip"], "192.0.2.20");
    let ttl = list[1]["ips"][0]["ttl"].as_u64().unwrap();
    assert!((55..=60).contains(&ttl), "{ttl}");
    assert_eq!(list[1]["selectors"][0], "*.example.com");

    let scrape = http_get(metrics_port, "/metrics");
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    for needle in [
        "dnsfence_dns_queries_total{verdict=\"allowed\",transport=\"udp\"} 1",
        "dnsfence_dns_queries_total{verdict=\"denied\",transport=\"tcp\"} 1",
        "dnsfence_dns_upstream_responses_total{rcode=\"noerror\"} 1",
        "dnsfence_dns_latency_seconds_bucket",
        "dnsfence_dns_upstream_latency_seconds_count 1",
        "dnsfence_dns_hold_seconds_count 1",
        "dnsfence_dns_learned_names 2",
        "dnsfence_dns_learned_ips 2",
        "dnsfence_dns_hold_timeouts_total 0",
    ] {
        assert!(scrape.contains(needle), "missing {needle} in\n{scrape}");
    }
    assert!(http_get(metrics_port, "/healthz").ends_with("ok\n"));

    // An invalid policy on SIGHUP is rejected; the running set stays in force.
    std::fs::write(
        r.dir.0.join("policy.yaml"),
        "kind: CiliumNetworkPolicy\nspec: {}\n",
    )
    .unwrap();
    hup(&r);
    let log = std::fs::read_to_string(r.dir.path().join("proxy.log")).unwrap();
    assert!(log.contains("reload rejected"), "{log}");
    assert_eq!(
        dig("127.0.0.2", at, "www.example.com", &[]).status,
        "NOERROR"
    );
    assert_eq!(
        dig("127.0.0.2", at, "api.example.org", &[]).status,
        "REFUSED"
    );
    // A valid new policy takes effect.
    write_policy(&r.dir.0, up.addr.port(), "*.example.org");
    hup(&r);
    assert_eq!(
        dig("127.0.0.2", at, "api.example.org", &[]).status,
        "NOERROR"
    );
    assert_eq!(
        dig("127.0.0.2", at, "www.example.com", &[]).status,
        "REFUSED"
    );
}

/// Runs `dnsfence proxy` on the configuration `text` (written to `dir/c.yaml`); its exit
/// code and standard error.
fn proxy_on(dir: &std::path::Path, text: &str) -> (Option<i32>, String) {
    std::fs::write(dir.join("c.yaml"), text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dnsfence"))
        .args(["proxy", "--config"])
        .arg(dir.join("c.yaml"))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_config_exits_2_before_binding() {
    let tmp = TempDir::new("badcfg");
    let dir = tmp.path().to_owned();
    let port = free_port();
    let dns = format!("dns:\n  listen: [\"127.0.0.1:{port}\"]\n  upstreams: [\"127.0.0.1:53\"]\n");
    let (code, err) = proxy_on(&dir, &format!("{dns}  min_ttl: soon\nbogus: 1\n"));
    assert_eq!(code, Some(2));
    assert!(
        err.contains("bogus: unknown key") && err.contains("dns.min_ttl"),
        "{err}"
    );
    // So does a log filter tracing cannot read.
    let (code, err) = proxy_on(&dir, &format!("log: {{level: \"info,=[bad\"}}\n{dns}"));
    assert_eq!(code, Some(2));
    assert!(err.contains("log.level"), "{err}");
    // Invalid policies also stop it before it binds anything.
    std::fs::write(dir.join("p.yaml"), "kind: Nope\n").unwrap();
    let (code, err) = proxy_on(&dir, &format!("policies: [p.yaml]\n{dns}"));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok(),
        "nothing was bound"
    );
}

#[test]
fn kubernetes_mode_outside_the_agent_is_refused_not_ignored() {
    let tmp = TempDir::new("proxy-cli-k8s");
    let config = tmp.path().join("config.yaml");
    std::fs::write(
        &config,
        "kubernetes: {enabled: true, node_name: n1}\ndatapath: {backend: none}\n",
    )
    .unwrap();
    for command in [&["proxy"][..], &["run"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_dnsfence"))
            .args(command)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {stderr}");
        assert!(stderr.contains("dnsfence agent"), "{command:?}: {stderr}");
    }
}

fn proxy_with(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dnsfence"))
        .args(["proxy", "--config"])
        .arg(config)
        .output()
        .unwrap()
}

#[test]
fn every_config_problem_in_one_round_and_no_proxy_without_listeners() {
    let tmp = TempDir::new("proxy-cli-round");
    let config = tmp.path().join("c.yaml");
    // The policy file is missing and the TTLs are inverted, next to a value that does not
    // parse: all three in one round.
    std::fs::write(
        &config,
        "policies: [missing.yaml]\ndns:\n  listen: [\"127.0.0.1:1\"]\n  upstreams: [\"127.0.0.1:53\"]\n  min_ttl: 2h\n  max_ttl: 1h\n  upstream_timeout: 0s\n  max_ips_per_name: x\n",
    )
    .unwrap();
    let out = proxy_with(&config);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "policies[0]: cannot read",
        "missing.yaml",
        "dns.max_ttl: 1h must not be smaller than dns.min_ttl (2h)",
        "dns.upstream_timeout: 0s is too short",
        "dns.max_ips_per_name",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    // A proxy with no listener would serve nothing.
    std::fs::write(&config, "datapath: {backend: none}\n").unwrap();
    let out = proxy_with(&config);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dns: no listener"), "{err}");
    // Nor would `run` without its datapath (and with it, it would need root: not tried).
    let out = Command::new(env!("CARGO_BIN_EXE_dnsfence"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dns: no listener"), "{err}");
}

#[test]
fn an_empty_policy_file_never_turns_filtering_off() {
    if skip(&["dig", "dnsmasq"]) {
        return;
    }
    let up = Dnsmasq::start(
        "example.com",
        60,
        &["--host-record=api.example.org,198.51.100.1".into()],
    );
    let port = free_port();
    let r = start(up.addr, port, free_port());
    let at: SocketAddr = ([127, 0, 0, 1], port).into();
    assert_eq!(
        dig("127.0.0.2", at, "api.example.org", &[]).status,
        "REFUSED"
    );
    // Truncated: the reload is rejected and the running policy stays in force.
    std::fs::write(r.dir.0.join("policy.yaml"), "").unwrap();
    hup(&r);
    let log = std::fs::read_to_string(r.dir.path().join("proxy.log")).unwrap();
    assert!(log.contains("reload rejected"), "{log}");
    assert!(
        log.contains("policy.yaml:1: (file): holds no policy documents"),
        "{log}"
    );
    assert_eq!(
        dig("127.0.0.2", at, "api.example.org", &[]).status,
        "REFUSED"
    );
    // And a proxy does not start on it.
    let out = proxy_with(&r.dir.0.join("config.yaml"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds no policy documents"), "{err}");
}

fn status_pid(socket: &Path) -> Option<u64> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    writeln!(s, "{{\"version\":1,\"request\":\"status\"}}").ok()?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).ok()?;
    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
    v["status"]["pid"].as_u64()
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn terminate(child: &mut Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// A second proxy given the same `api.socket` must not take the running one's API: it
/// waits for it to be gone (as during an upgrade), and each removes the socket on exit only
/// if it is still its own.
#[test]
fn a_second_proxy_waits_for_the_api_socket() {
    let mut first = start("127.0.0.1:53".parse().unwrap(), free_port(), free_port());
    let socket = first.dir.0.join("api.sock");
    wait_until("the first proxy answers", || {
        status_pid(&socket) == Some(u64::from(first.child.id()))
    });
    // The same configuration but for the ports.
    let config = std::fs::read_to_string(first.dir.0.join("config.yaml")).unwrap();
    let config: String = config
        .lines()
        .map(|l| {
            if l.contains("listen:") {
                let port = free_port();
                if l.trim_start().starts_with("metrics") {
                    format!("metrics: {{listen: \"127.0.0.1:{port}\"}}")
                } else {
                    format!("  listen: [\"127.0.0.1:{port}\"]")
                }
            } else {
                l.to_owned()
            }
        })
        .map(|l| l + "\n")
        .collect();
    std::fs::write(first.dir.0.join("second.yaml"), config).unwrap();
    let log = first.dir.0.join("second.log");
    let mut second = Command::new(env!("CARGO_BIN_EXE_dnsfence"))
        .args(["proxy", "--config"])
        .arg(first.dir.0.join("second.yaml"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until("the second proxy says the socket is in use", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("is in use by a running process")
    });
    // The first one keeps its API.
    assert_eq!(status_pid(&socket), Some(u64::from(first.child.id())));
    // It stops: the second one takes the socket over.
    terminate(&mut first.child);
    wait_until("the second proxy answers", || {
        status_pid(&socket) == Some(u64::from(second.id()))
    });
    // It stops too, and leaves no socket behind.
    terminate(&mut second);
    assert!(!socket.exists(), "the socket file stayed");
}
