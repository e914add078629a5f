//! How `dnsfence agent` starts and stops, for real in network namespaces the tests create:
//! it exits on SIGTERM while it reads refused packets and writes flows to a file, and a
//! second agent (a rolling update) takes over the refused-packet log once the first is
//! gone.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use dnsfence_lab::Netns;
use dnsfence_testsupport::{skip_unless_root, Killed, TempDir};

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
    - toFQDNs: [{matchName: api.example.com}]
"#;

/// Writes the policy and an agent configuration (flows to a file, refused packets to the
/// default log group) into `dir`, with the agent socket `name`.
fn agent_config(dir: &Path, name: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("policy.yaml"), POLICY).unwrap();
    let config = format!(
        "policies: [policy.yaml]\nendpoints: []\ndns: {{transparent: {{port: 15053}}}}\napi: {{socket: {d}/{name}-proxy.sock, agent_socket: {d}/{name}.sock}}\nmetrics: {{listen: \"127.0.0.1:0\", agent_listen: \"127.0.0.1:0\"}}\nstate_dir: {d}/{name}-state\nflows: {{file: {d}/{name}-flows.jsonl}}\n",
        d = dir.display()
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).unwrap();
    path
}

fn start_agent(ns: &Netns, config: &Path, log: &Path) -> Child {
    ns.command(env!("CARGO_BIN_EXE_dnsfence"))
        .args(["agent", "--config"])
        .arg(config)
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(std::fs::OpenOptions::new().append(true).open(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits until `log` holds `needle` (or panics with the log after `within`).
fn wait_for_line(log: &Path, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "no {needle:?} in:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A table of the test's own that logs UDP to port 9 to the agent's log group, then
/// drops it; `refuse_one` sends such a datagram.
fn install_logging_drop(ns: &Netns) {
    let script = "table inet lifecycle {\n chain out { type filter hook output priority 0; policy accept;\n  udp dport 9 log group 20053 drop\n }\n}\n";
    let mut nft = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    nft.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success());
}

fn refuse_one(ns: &Netns) {
    let _ = ns
        .command("python3")
        .args([
            "-c",
            "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))",
        ])
        .stderr(Stdio::null())
        .status();
}

/// Waits for `child` to exit, at most `within`; whether it did.
fn exits_within(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn the_agent_exits_on_sigterm_while_reading_refused_packets() {
    if skip_unless_root(&["ip", "nft", "python3"]) {
        return;
    }
    let ns = Netns::scratch("life-term").unwrap();
    let tmp = TempDir::new("life-term");
    let config = agent_config(tmp.path(), "agent");
    let log = tmp.path().join("agent.log");
    let mut agent = Killed(start_agent(&ns, &config, &log));
    wait_for_line(&log, "agent socket listening", Duration::from_secs(20));
    install_logging_drop(&ns);
    refuse_one(&ns);
    wait_for_line(&log, "packet refused", Duration::from_secs(5));
    let pid = agent.0.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(
        exits_within(&mut agent.0, Duration::from_secs(5)),
        "still running 5 s after SIGTERM:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[test]
fn a_second_agent_takes_over_the_refused_packet_log_when_the_first_is_gone() {
    if skip_unless_root(&["ip", "nft", "python3"]) {
        return;
    }
    let ns = Netns::scratch("life-takeover").unwrap();
    let tmp = TempDir::new("life-takeover");
    let first_log = tmp.path().join("first.log");
    let second_log = tmp.path().join("second.log");
    let first = Killed(start_agent(
        &ns,
        &agent_config(tmp.path(), "first"),
        &first_log,
    ));
    wait_for_line(
        &first_log,
        "agent socket listening",
        Duration::from_secs(20),
    );
    let _second = Killed(start_agent(
        &ns,
        &agent_config(tmp.path(), "second"),
        &second_log,
    ));
    wait_for_line(
        &second_log,
        "cannot read refused packets yet",
        Duration::from_secs(20),
    );
    drop(first);
    install_logging_drop(&ns);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        refuse_one(&ns);
        let text = std::fs::read_to_string(&second_log).unwrap_or_default();
        if text.contains("packet refused") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second agent never logged a refused packet:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
