//! `dnsfence proxy` at the limits of the process: out of file descriptors.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dnsfence_testsupport::policy::{dns_policy, DnsPeer};
use dnsfence_testsupport::{dig, free_port, skip, Dnsmasq, TempDir};

/// Kills the proxy when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_tcp_listener_survives_running_out_of_descriptors() {
    if skip(&["dnsmasq", "dig", "prlimit"]) {
        return;
    }
    let up = Dnsmasq::start(
        "example.com",
        30,
        &["--host-record=api.example.com,192.0.2.10".into()],
    );
    let dir = TempDir::new("fd-limit");
    let policy = dns_policy(
        "web",
        DnsPeer::KubeDns,
        up.addr.port(),
        &["*.example.com"],
        &["*.example.com"],
    );
    std::fs::write(dir.0.join("policy.yaml"), policy).unwrap();
    let listen = free_port();
    let config = format!(
        "policies: [policy.yaml]\nendpoints:\n  - {{name: web-1, labels: {{app: web}}, ips: [127.0.0.2]}}\n  - {{name: coredns, namespace: kube-system, labels: {{k8s-app: kube-dns}}, ips: [127.0.0.1]}}\ndns:\n  listen: [\"127.0.0.1:{listen}\"]\n  upstreams: [\"{}\"]\napi: {{socket: {}}}\n",
        up.addr,
        dir.0.join("api.sock").display()
    );
    std::fs::write(dir.0.join("config.yaml"), config).unwrap();
    let log = dir.0.join("proxy.log");
    let proxy = Killed(
        Command::new(env!("CARGO_BIN_EXE_dnsfence"))
            .args(["proxy", "--config"])
            .arg(dir.0.join("config.yaml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("the API socket", || dir.0.join("api.sock").exists());
    let server = format!("127.0.0.1:{listen}").parse().unwrap();
    assert_eq!(
        dig("127.0.0.2", server, "api.example.com", &["+tcp"]).status,
        "NOERROR"
    );

    // Leave the running proxy room for only a few more descriptors.
    let pid = proxy.0.id();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = open + 4;
    let ok = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    // More connections than that: accepting fails with "too many open files".
    let held: Vec<_> = (0..12)
        .map(|_| std::net::TcpStream::connect(server).unwrap())
        .collect();
    let failed = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("accepting a TCP connection failed")
    };
    wait_for("the failed accept in the log", failed);
    // Once they are gone, TCP clients are served again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = dig("127.0.0.2", server, "api.example.com", &["+tcp"]);
        if r.status == "NOERROR" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "TCP never recovered: {}\n{}",
            r.raw,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
