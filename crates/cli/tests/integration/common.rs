//! What the lab tests share: a policy, world records, and a lab with three pods (web,
//! other, no policy) and `dnsfence run` in the node.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different part"
)]

use std::net::{IpAddr, SocketAddr};

use dnsfence_lab::daemon::{Daemon, DaemonSpec};
use dnsfence_lab::{DnsStatus, Lab, Outcome, Pod, Rec, RecordType, Transport};
use dnsfence_testsupport::skip_unless_root;

pub const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
    - toCIDR: [192.0.2.53/32, "2001:db8::53/128"]
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules: {dns: [{matchPattern: "**.example.com"}, {matchPattern: "**.deep.example.net"}, {matchName: evil.example.org}]}
    - toFQDNs: [{matchName: api.example.com}]
      toPorts: [{ports: [{port: "443", protocol: TCP}, {port: "9000", protocol: UDP}]}]
    - toFQDNs: [{matchPattern: "*.cdn.example.com"}, {matchPattern: "**.deep.example.net"}, {matchName: short.example.com}]
    - toCIDRSet: [{cidr: 198.51.100.0/24, except: [198.51.100.128/25]}]
  egressDeny:
    - toCIDR: [198.51.100.66/32]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: other, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: other}}
  egress:
    - toCIDR: [192.0.2.53/32, "2001:db8::53/128"]
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules: {dns: [{matchPattern: "*"}]}
    - toFQDNs: [{matchName: other.example.com}]
"#;

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn records() -> Vec<Rec> {
    vec![
        Rec::Addr("api.example.com", 60, ip("192.0.2.10")),
        Rec::Addr("api.example.com", 60, ip("2001:db8::10")),
        Rec::Addr("a.cdn.example.com", 60, ip("192.0.2.21")),
        Rec::Cname("www.cdn.example.com", 60, "edge.provider.net"),
        Rec::Addr("edge.provider.net", 60, ip("192.0.2.22")),
        Rec::Addr("x.y.deep.example.net", 60, ip("192.0.2.31")),
        Rec::Addr("deep.example.net", 60, ip("192.0.2.32")),
        Rec::Addr("short.example.com", 2, ip("192.0.2.40")),
        Rec::Addr("evil.example.org", 60, ip("203.0.113.66")),
        Rec::Addr("other.example.com", 60, ip("192.0.2.50")),
    ]
}

/// A lab with three pods (web, other, no policy) and dnsfence running in the node.
pub struct Env {
    pub daemon: Daemon,
    pub lab: Lab,
}

pub fn env(extra_records: Vec<Rec>) -> Option<Env> {
    env_with(extra_records, false, "")
}

/// As [`env`], with more top-level configuration.
pub fn env_config(extra_records: Vec<Rec>, config: &str) -> Option<Env> {
    env_with(extra_records, false, config)
}

/// As [`env_split`], with more top-level configuration.
pub fn env_split_config(extra_records: Vec<Rec>, config: &str) -> Option<Env> {
    env_with(extra_records, true, config)
}

/// As [`env`], with `dnsfence agent` and `dnsfence proxy --agent` as two processes.
pub fn env_split(extra_records: Vec<Rec>) -> Option<Env> {
    env_with(extra_records, true, "")
}

fn env_with(extra_records: Vec<Rec>, split: bool, extra_config: &str) -> Option<Env> {
    if skip_unless_root(&["ip", "nft"]) {
        return None;
    }
    let mut recs = records();
    recs.extend(extra_records);
    let lab = Lab::builder()
        .pods(3)
        .records(recs)
        .tcp_ports([80, 443, 853, 8080])
        .build()
        .unwrap();
    let ep = |name: &str, app: &str, pod: &Pod| {
        format!(
            "  - {{name: {name}, labels: {{app: {app}}}, ips: [{}, \"{}\"]}}\n",
            pod.ipv4(),
            pod.ipv6()
        )
    };
    let config = format!(
        "{extra_config}endpoints:\n{}{}{}",
        ep("web", "web", lab.pod(0)),
        ep("other", "other", lab.pod(1)),
        ep("plain", "plain", lab.pod(2)),
    );
    let spec = DaemonSpec {
        exe: env!("CARGO_BIN_EXE_dnsfence").into(),
        policy: POLICY.to_owned(),
        config_extra: config,
    };
    let daemon = if split {
        Daemon::start_split(&lab, &spec)
    } else {
        Daemon::start(&lab, &spec)
    }
    .unwrap();
    Some(Env { daemon, lab })
}

impl Env {
    pub fn web(&self) -> &Pod {
        self.lab.pod(0)
    }
    pub fn other(&self) -> &Pod {
        self.lab.pod(1)
    }
    pub fn plain(&self) -> &Pod {
        self.lab.pod(2)
    }
    pub fn diag(&self) -> String {
        let nft = self
            .lab
            .node()
            .command("nft")
            .args(["list", "table", "inet", "dnsfence"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        format!("dnsfence log:\n{}\nnode table:\n{nft}", self.daemon.log())
    }
}

/// Runs `dnsfence ARGS... --config <the lab's configuration>` in the node.
pub fn dnsfence_cli(env: &Env, args: &[&str]) -> std::process::Output {
    env.lab
        .node()
        .command(env!("CARGO_BIN_EXE_dnsfence"))
        .args(args)
        .arg("--config")
        .arg(env.daemon.config_path())
        .output()
        .unwrap()
}

pub fn resolve(
    pod: &Pod,
    name: &str,
    qtype: RecordType,
    transport: Transport,
) -> (DnsStatus, Vec<IpAddr>) {
    let r = pod.resolve(name, qtype, transport).unwrap();
    (r.status, r.ips)
}

pub fn a(pod: &Pod, name: &str) -> Vec<IpAddr> {
    let (status, ips) = resolve(pod, name, RecordType::A, Transport::Udp);
    assert_eq!(status, DnsStatus::NoError, "{name}");
    ips
}

pub fn reach(pod: &Pod, ip: IpAddr, port: u16) -> Outcome {
    pod.reach_tcp(SocketAddr::new(ip, port)).outcome
}

pub fn blocked(o: Outcome) -> bool {
    matches!(
        o,
        Outcome::Refused | Outcome::Unreachable | Outcome::TimedOut
    )
}

/// `GET /metrics` on `port` of the node's loopback.
pub fn scrape(env: &Env, port: u16) -> String {
    env.lab
        .node()
        .run(move || {
            use std::io::{Read, Write};
            let mut s =
                std::net::TcpStream::connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok::<_, std::io::Error>(body)
        })
        .unwrap()
        .unwrap()
}

/// A port for a test's metrics listener (each lab has its own node namespace, so ports
/// only need to differ between the listeners of one test).
pub fn metrics_port(n: u16) -> u16 {
    19_900 + n
}

/// `dnsfence observe -o json ARGS` (`--last 1000` unless given) against the lab's daemon, parsed.
pub fn observe(env: &Env, args: &[&str]) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dnsfence"))
        .arg("observe")
        .arg("--config")
        .arg(env.daemon.config_path())
        .args(["-o", "json"])
        .args(if args.contains(&"--last") {
            &[][..]
        } else {
            &["--last", "1000"][..]
        })
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Counters in the world's input path: how many packets arrived that match each rule.
pub struct WorldCounter<'a> {
    world: &'a dnsfence_lab::Netns,
}

impl<'a> WorldCounter<'a> {
    pub fn new(env: &'a Env, rules: &[(&str, String)]) -> Self {
        let mut script = "table inet observe {\n chain in { type filter hook input priority -300; policy accept;\n".to_owned();
        for (name, m) in rules {
            script += &format!("  {m} counter comment \"{name}\"\n");
        }
        script += " }\n}\n";
        let world = env.lab.world();
        let mut child = world
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "{script}");
        Self { world }
    }

    pub fn count(&self, name: &str) -> u64 {
        let out = self
            .world
            .command("nft")
            .args(["list", "chain", "inet", "observe", "in"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains(&format!("comment \"{name}\"")))
            .unwrap_or_else(|| panic!("no rule {name}: {text}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        let i = words.iter().position(|w| *w == "packets").unwrap();
        words[i + 1].parse().unwrap()
    }
}
