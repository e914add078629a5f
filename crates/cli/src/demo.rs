//! `dnsfence demo`: builds the lab (a node routing between two pods and a world with DNS
//! and servers, all in network namespaces it creates), runs `dnsfence run` in the node
//! with the policy in `examples/demo/policy.yaml`, makes scripted attempts from the pods,
//! prints what was expected and observed, cleans up, and exits 0 only if all matched.

use std::fmt;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use dnsfence_lab::{DnsStatus, Lab, Outcome, Pod, Rec, RecordType, Transport};

use dnsfence_lab::daemon::{Daemon, DaemonSpec};

/// The policy the demo enforces.
pub(crate) const POLICY: &str = include_str!("../../../examples/demo/policy.yaml");

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Keep dnsfence's log (printed path) instead of deleting it with the lab.
    #[arg(long)]
    keep_log: bool,
}

fn records() -> Vec<Rec> {
    let ip = |s: &str| -> IpAddr { s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])) };
    vec![
        Rec::Addr("api.example.com", 60, ip("192.0.2.10")),
        Rec::Addr("api.example.com", 60, ip("2001:db8::10")),
        Rec::Cname("img.cdn.example.com", 60, "edge.cdn-provider.net"),
        Rec::Addr("edge.cdn-provider.net", 60, ip("192.0.2.20")),
        Rec::Addr("ipv6.example.com", 60, ip("2001:db8::30")),
        Rec::Addr("evil.example.org", 60, ip("203.0.113.66")),
        Rec::Addr("jobs.internal.example", 60, ip("198.51.100.7")),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Resolves,
    Refused,
    Connects,
    Blocked,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expect::Resolves => "resolves",
            Expect::Refused => "REFUSED",
            Expect::Connects => "connects",
            Expect::Blocked => "blocked",
        })
    }
}

enum Action {
    Resolve(&'static str, RecordType),
    /// Connect to the address the pod last resolved for the name, or a literal.
    Connect(Target, u16),
}

enum Target {
    Resolved(&'static str),
    Literal(&'static str),
}

struct Step {
    pod: usize,
    action: Action,
    expect: Expect,
    why: &'static str,
}

fn script() -> Vec<Step> {
    use Action::{Connect, Resolve};
    use Expect::{Blocked, Connects, Refused, Resolves};
    use Target::{Literal, Resolved};
    let s = |pod, action, expect, why| Step {
        pod,
        action,
        expect,
        why,
    };
    vec![
        s(
            0,
            Resolve("api.example.com", RecordType::A),
            Resolves,
            "matchName",
        ),
        s(
            0,
            Connect(Resolved("api.example.com"), 443),
            Connects,
            "learned IP, port 443",
        ),
        s(
            0,
            Connect(Resolved("api.example.com"), 8080),
            Blocked,
            "toPorts: 443 only",
        ),
        s(
            0,
            Resolve("img.cdn.example.com", RecordType::A),
            Resolves,
            "matchPattern, via CNAME",
        ),
        s(
            0,
            Connect(Resolved("img.cdn.example.com"), 443),
            Connects,
            "wildcard",
        ),
        s(
            0,
            Resolve("evil.example.org", RecordType::A),
            Refused,
            "no rule allows it",
        ),
        s(
            0,
            Connect(Literal("203.0.113.66"), 443),
            Blocked,
            "IP never resolved",
        ),
        s(
            0,
            Connect(Literal("192.0.2.99"), 443),
            Blocked,
            "IP never resolved",
        ),
        s(
            0,
            Resolve("ipv6.example.com", RecordType::AAAA),
            Resolves,
            "AAAA",
        ),
        s(
            0,
            Connect(Resolved("ipv6.example.com"), 443),
            Connects,
            "IPv6",
        ),
        s(
            1,
            Resolve("api.example.com", RecordType::A),
            Refused,
            "not in pod-b's policy",
        ),
        s(
            1,
            Connect(Literal("192.0.2.10"), 443),
            Blocked,
            "learned for pod-a only",
        ),
        s(
            1,
            Resolve("jobs.internal.example", RecordType::A),
            Resolves,
            "**. pattern",
        ),
        s(
            1,
            Connect(Resolved("jobs.internal.example"), 443),
            Connects,
            "learned IP",
        ),
    ]
}

struct Row {
    pod: String,
    action: String,
    target: String,
    expected: Expect,
    observed: String,
    ok: bool,
    ms: u128,
}

fn execute(step: &Step, pod: &Pod, resolved: &mut Vec<(usize, &'static str, IpAddr)>) -> Row {
    let started = Instant::now();
    let (action, target, observed, ok) = match &step.action {
        Action::Resolve(name, qtype) => {
            let r = pod.resolve(name, *qtype, Transport::Udp);
            let observed = match &r {
                Ok(r) if r.status == DnsStatus::NoError && !r.ips.is_empty() => {
                    for ip in &r.ips {
                        resolved.push((step.pod, name, *ip));
                    }
                    let ips: Vec<String> = r.ips.iter().map(ToString::to_string).collect();
                    format!("NOERROR {}", ips.join(" "))
                }
                Ok(r) => r.status.to_string(),
                Err(e) => format!("error: {e}"),
            };
            let ok = match step.expect {
                Expect::Resolves => observed.starts_with("NOERROR "),
                Expect::Refused => observed == "REFUSED",
                _ => false,
            };
            let kind = format!("dns {qtype}");
            (kind, (*name).to_owned(), observed, ok)
        }
        Action::Connect(target, port) => {
            let ip = match target {
                Target::Literal(s) => s.parse().ok(),
                Target::Resolved(name) => resolved
                    .iter()
                    .rev()
                    .find(|(p, n, _)| *p == step.pod && n == name)
                    .map(|(_, _, ip)| *ip),
            };
            let shown = match target {
                Target::Literal(s) => (*s).to_owned(),
                Target::Resolved(name) => (*name).to_owned(),
            };
            match ip {
                None => (
                    "tcp".to_owned(),
                    format!("{shown}:{port}"),
                    "not resolved".to_owned(),
                    false,
                ),
                Some(ip) => {
                    let reach = pod.reach_tcp(SocketAddr::new(ip, *port));
                    let observed = match reach.outcome {
                        Outcome::Connected => "connected".to_owned(),
                        other => format!("blocked ({other})"),
                    };
                    let ok = match step.expect {
                        Expect::Connects => reach.outcome == Outcome::Connected,
                        Expect::Blocked => matches!(
                            reach.outcome,
                            Outcome::Refused | Outcome::Unreachable | Outcome::TimedOut
                        ),
                        _ => false,
                    };
                    let target = if matches!(target, Target::Resolved(_)) {
                        format!("{shown}:{port} ({ip})")
                    } else {
                        format!("{shown}:{port}")
                    };
                    ("tcp".to_owned(), target, observed, ok)
                }
            }
        }
    };
    Row {
        pod: pod_name(step.pod),
        action,
        target,
        expected: step.expect,
        observed: format!("{observed}  [{}]", step.why),
        ok,
        ms: started.elapsed().as_millis(),
    }
}

fn pod_name(i: usize) -> String {
    format!("pod-{}", (b'a' + i as u8) as char)
}

pub(crate) fn run(args: &DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    eprintln!("dnsfence demo: building the lab (network namespaces: node, world, 2 pods)...");
    let lab = Lab::builder()
        .pods(2)
        .records(records())
        .build()
        .context("building the lab (the demo needs root and iproute2)")?;
    let endpoints = [("pod-a", "web", lab.pod(0)), ("pod-b", "batch", lab.pod(1))]
        .iter()
        .map(|(name, app, pod)| {
            format!(
                "  - {{name: {name}, namespace: default, labels: {{app: {app}}}, ips: [{}, \"{}\"]}}\n",
                pod.ipv4(),
                pod.ipv6()
            )
        })
        .collect::<String>();
    let host_ips = lab
        .pods()
        .iter()
        .flat_map(|p| {
            [
                p.gateway_v4().to_string(),
                format!("\"{}\"", p.gateway_v6()),
            ]
        })
        .collect::<Vec<_>>()
        .join(", ");
    let daemon = Daemon::start(
        &lab,
        &DaemonSpec {
            exe: std::env::current_exe().context("locating the dnsfence binary")?,
            policy: POLICY.to_owned(),
            config_extra: format!("endpoints:\n{endpoints}host_ips: [{host_ips}]\n"),
        },
    )
    .context("starting dnsfence run in the lab's node")?;
    eprintln!(
        "dnsfence demo: dnsfence run is enforcing in the node (ready in {} ms); running {} attempts\n",
        daemon.ready_in.as_millis(),
        script().len()
    );
    let mut resolved = Vec::new();
    let rows: Vec<Row> = script()
        .iter()
        .map(|step| execute(step, lab.pod(step.pod), &mut resolved))
        .collect();
    let mut out = crate::output::stdout();
    print_table(&mut out, &rows)?;
    let matched = rows.iter().filter(|r| r.ok).count();
    let all = matched == rows.len();
    if !all || args.keep_log {
        let kept = daemon.keep_log();
        eprintln!("dnsfence logs: {}", kept.display());
    } else {
        drop(daemon);
    }
    drop(lab);
    writeln!(out)?;
    if all {
        writeln!(
            out,
            "PASS: {matched}/{} observations matched the policy ({:.1} s, lab removed)",
            rows.len(),
            started.elapsed().as_secs_f64()
        )?;
        out.flush()?;
        Ok(ExitCode::SUCCESS)
    } else {
        writeln!(
            out,
            "FAIL: {matched}/{} observations matched the policy (lab removed)",
            rows.len()
        )?;
        out.flush()?;
        Ok(ExitCode::from(1))
    }
}

fn print_table(out: &mut impl std::io::Write, rows: &[Row]) -> std::io::Result<()> {
    let w = |f: &dyn Fn(&Row) -> usize, title: &str| {
        rows.iter().map(f).max().unwrap_or(0).max(title.len())
    };
    let wa = w(&|r| r.action.len(), "action");
    let wt = w(&|r| r.target.len(), "target");
    let we = w(&|r| r.expected.to_string().len(), "expected");
    writeln!(
        out,
        "{:<6}  {:<wa$}  {:<wt$}  {:<we$}  {:>5}  {:<2}  observed",
        "pod", "action", "target", "expected", "ms", ""
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<6}  {:<wa$}  {:<wt$}  {:<we$}  {:>5}  {:<2}  {}",
            r.pod,
            r.action,
            r.target,
            r.expected.to_string(),
            r.ms,
            if r.ok { "ok" } else { "!!" },
            r.observed
        )?;
    }
    Ok(())
}
