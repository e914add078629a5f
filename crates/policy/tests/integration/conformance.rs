//! Runs every case of `conformance/clusternetworkpolicy/`: each YAML file holds policies and
//! `# expect:` lines (format in that folder's README) that dnsfence must meet. Decisions are
//! taken on the policy model (what the datapath and the proxy enforce): a connection is
//! denied by a covering deny, else allowed when the endpoint is not default-deny or an
//! allow covers it; DNS questions go to [`EndpointPolicy::dns_decision`].
#![allow(
    clippy::unwrap_used,
    reason = "test harness: a panic is a test failure"
)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use dnsfence_policy::{
    Destination, EgressRule, Endpoint, EndpointPolicy, FoldedName, Labels, Peer, PolicyLoader,
    PolicySet, Protocol,
};

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/clusternetworkpolicy")
}

/// Where a connection or DNS query goes.
enum Dest {
    /// A host the pod reached by resolving this name (optionally at a known address).
    Name(String, Option<IpAddr>),
    /// An address outside the cluster.
    Ip(IpAddr),
    /// A pod.
    Pod(Endpoint),
}

fn endpoint(s: &str) -> Result<Endpoint, String> {
    let (ns, labels) = s
        .split_once('/')
        .ok_or_else(|| format!("endpoint {s:?} is not NAMESPACE/LABELS"))?;
    let pairs: Vec<(&str, &str)> = labels
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .ok_or_else(|| format!("label {p:?} is not k=v"))
        })
        .collect::<Result<_, _>>()?;
    let labels = Labels::new(pairs).map_err(|e| e.to_string())?;
    Ok(Endpoint::new(ns, labels))
}

fn dest(s: &str) -> Result<Dest, String> {
    if let Some(pod) = s.strip_prefix("pod:") {
        return endpoint(pod).map(Dest::Pod);
    }
    if let Ok(ip) = s.parse() {
        return Ok(Dest::Ip(ip));
    }
    match s.split_once('@') {
        Some((name, ip)) => {
            let ip = ip.parse().map_err(|_| format!("bad address in {s:?}"))?;
            Ok(Dest::Name(name.to_owned(), Some(ip)))
        }
        None => Ok(Dest::Name(s.to_owned(), None)),
    }
}

fn proto_port(s: &str) -> Result<(Protocol, u16), String> {
    let (proto, port) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not PROTO/PORT"))?;
    let proto = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        _ => return Err(format!("unknown protocol {proto:?}")),
    };
    let port = port.parse().map_err(|_| format!("bad port in {s:?}"))?;
    Ok((proto, port))
}

fn verdict(s: Option<&str>) -> Result<bool, String> {
    match s {
        Some("allow") => Ok(true),
        Some("deny") => Ok(false),
        other => Err(format!("expected allow or deny, found {other:?}")),
    }
}

/// Whether `rule` matches a connection to `dest` on `port`/`proto`.
fn covers(rule: &EgressRule, dest: &Dest, proto: Protocol, port: u16) -> bool {
    if !rule.covers_port(port, proto) {
        return false;
    }
    let pod_ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    match (dest, &rule.peer) {
        (Dest::Name(name, _), Peer::Fqdns(patterns)) => {
            let folded = FoldedName::new(name.as_bytes()).unwrap();
            patterns.iter().any(|p| p.matches(&folded))
        }
        (Dest::Name(_, ip), peer) => {
            *peer == Peer::Any || ip.is_some_and(|ip| peer.selects(&Destination::World(ip)))
        }
        (Dest::Ip(ip), peer) => peer.selects(&Destination::World(*ip)),
        (Dest::Pod(ep), peer) => peer.selects(&Destination::Endpoint(pod_ip, ep)),
    }
}

fn connect(policy: &EndpointPolicy, dest: &Dest, proto: Protocol, port: u16) -> bool {
    if policy
        .denies
        .iter()
        .any(|d| covers(&d.rule, dest, proto, port))
    {
        return false;
    }
    !policy.enforced
        || policy
            .allows
            .iter()
            .any(|a| covers(&a.rule, dest, proto, port))
}

/// Checks one `connect` or `dns` line; `Err` says what differs.
fn decision(set: &PolicySet, kind: &str, words: &[&str]) -> Result<(), String> {
    match (kind, words) {
        ("connect", [ep, to, pp, want]) => {
            let policy = set.resolve(&endpoint(ep)?);
            let (proto, port) = proto_port(pp)?;
            let got = connect(&policy, &dest(to)?, proto, port);
            let want = verdict(Some(want))?;
            (got == want)
                .then_some(())
                .ok_or_else(|| format!("got {}", if got { "allow" } else { "deny" }))
        }
        ("dns", [ep, name, server, pp, want, rest @ ..]) => {
            let policy = set.resolve(&endpoint(ep)?);
            let (proto, port) = proto_port(pp)?;
            let server = dest(server)?;
            let pod_ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 53));
            let server = match &server {
                Dest::Ip(ip) => Destination::World(*ip),
                Dest::Pod(ep) => Destination::Endpoint(pod_ip, ep),
                Dest::Name(..) => return Err("a DNS server is an address or a pod".into()),
            };
            let d = policy.dns_decision(name.as_bytes(), Some(&server), port, proto);
            let want = verdict(Some(want))?;
            if d.allowed != want {
                return Err(format!("got allowed={} ({:?})", d.allowed, d.reason));
            }
            if rest == ["learn"] && !d.proxied {
                return Err("allowed but not proxied: its IPs would not be learned".into());
            }
            Ok(())
        }
        _ => Err("malformed line".into()),
    }
}

/// `[DOC:]PATH` against a diagnostic.
fn path_matches(want: &str, doc: usize, path: &str) -> bool {
    match want.split_once(':') {
        Some((d, p)) if d.chars().all(|c| c.is_ascii_digit()) => d.parse() == Ok(doc) && p == path,
        _ => want == path,
    }
}

fn run_case(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let mut failures = Vec::new();
    let mut fail = |line: &str, why: String| failures.push(format!("{name}: {line}: {why}"));
    let scope = text.lines().find_map(|l| l.strip_prefix("# scope: "));
    if !matches!(scope, Some("spec" | "dnsfence")) {
        fail("# scope:", "missing, or neither spec nor dnsfence".into());
    }
    let expects: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .collect();
    if expects.is_empty() {
        fail("# expect:", "no expectations".into());
    }
    let mut loader = PolicyLoader::new();
    loader.add(&name, &text);
    let (set, diags) = loader.finish();
    let errors: Vec<_> = diags.iter().filter(|d| d.is_error()).collect();
    let wanted_errors: Vec<&str> = expects
        .iter()
        .filter_map(|l| l.strip_prefix("invalid "))
        .collect();
    for d in &errors {
        if !wanted_errors
            .iter()
            .any(|w| path_matches(w, d.doc, &d.path))
        {
            fail("(unexpected error)", d.to_string());
        }
    }
    for line in &expects {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((kind, rest)) = words.split_first() else {
            fail(line, "empty".into());
            continue;
        };
        let result = match (*kind, rest) {
            ("invalid", [want]) => errors
                .iter()
                .any(|d| path_matches(want, d.doc, &d.path))
                .then_some(())
                .ok_or_else(|| "no error there".to_owned()),
            ("warning", [want]) => diags
                .iter()
                .any(|d| !d.is_error() && path_matches(want, d.doc, &d.path))
                .then_some(())
                .ok_or_else(|| "no warning there".to_owned()),
            ("connect" | "dns", _) => decision(&set, kind, rest),
            _ => Err("unknown expectation".into()),
        };
        if let Err(why) = result {
            fail(line, why);
        }
    }
    failures
}

#[test]
fn every_case_meets_its_expectations() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(cases_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 15, "{files:?}");
    let failures: Vec<String> = files.iter().flat_map(|f| run_case(f)).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
