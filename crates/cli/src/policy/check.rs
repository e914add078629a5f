//! `dnsfence policy check`: explain what one endpoint may resolve and reach by name.

use std::io::Write;
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use dnsfence_policy::{
    AppliedRule, Destination, DnsDecision, DnsReason, Endpoint, EndpointPolicy, FoldedName,
    FqdnAllow, FqdnDeny, Labels, Peer, PolicyId, Protocol,
};
use serde_json::{json, Value};

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// Policy files or directories.
    #[arg(short = 'f', long = "file", required = true, num_args = 1..)]
    files: Vec<PathBuf>,
    /// The endpoint's namespace.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The endpoint's labels, `k=v[,k=v...]` (repeatable).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// The name to resolve.
    #[arg(long)]
    name: String,
    /// The DNS server's IP; when omitted, any server the endpoint's DNS rules cover.
    #[arg(long)]
    server: Option<IpAddr>,
    /// The server is an endpoint with these labels (`k=v[,k=v...]`), e.g. kube-dns.
    #[arg(long, value_delimiter = ',', requires = "server")]
    server_labels: Vec<String>,
    /// The server endpoint's namespace (with --server-labels).
    #[arg(long, default_value = "kube-system", requires = "server_labels")]
    server_namespace: String,
    /// The server is the local node (toEntities: host).
    #[arg(long, requires = "server", conflicts_with = "server_labels")]
    server_host: bool,
    /// Destination port of the query.
    #[arg(long, default_value_t = 53)]
    port: u16,
    /// Transport of the query.
    #[arg(long, value_enum, default_value_t = Transport::Udp)]
    protocol: Transport,
    /// Treat every policy as in audit mode, as the daemon's `audit: true` does.
    #[arg(long)]
    audit: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    output: Format,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Transport {
    Udp,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

fn parse_labels(pairs: &[String]) -> Result<Labels> {
    let mut kv = Vec::new();
    for pair in pairs.iter().filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("label {pair:?} is not k=v");
        };
        kv.push((k.to_owned(), v.to_owned()));
    }
    Labels::new(kv).context("invalid label")
}

pub(crate) fn run(args: &CheckArgs) -> Result<ExitCode> {
    let (set, diags, _) = super::load(&args.files)?;
    if diags.iter().any(|d| d.is_error()) {
        for d in &diags {
            eprintln!("{d}");
        }
        bail!("the policies are invalid; fix them first (dnsfence policy validate)");
    }
    let endpoint = Endpoint::new(args.namespace.clone(), parse_labels(&args.labels)?);
    let server_ep = if args.server_labels.is_empty() {
        None
    } else {
        Some(Endpoint::new(
            args.server_namespace.clone(),
            parse_labels(&args.server_labels)?,
        ))
    };
    let server = match (args.server, &server_ep) {
        (None, _) => None,
        (Some(ip), Some(ep)) => Some(Destination::Endpoint(ip, ep)),
        (Some(ip), None) if args.server_host => Some(Destination::Host(ip)),
        (Some(ip), None) => Some(Destination::World(ip)),
    };
    let protocol = match args.protocol {
        Transport::Udp => Protocol::Udp,
        Transport::Tcp => Protocol::Tcp,
    };
    let set = set.with_global_audit(args.audit);
    let resolved = set.resolve(&endpoint);
    let decision =
        resolved.dns_decision(args.name.as_bytes(), server.as_ref(), args.port, protocol);
    let selectors = fqdn_matches(&resolved, &args.name);
    let deny_selectors = fqdn_deny_matches(&resolved, &args.name);
    let name_deny = name_deny(&resolved, &decision, &args.name);
    let report = report(
        args,
        &endpoint,
        &resolved,
        &Decided {
            decision: &decision,
            name_deny,
        },
        &selectors,
        &deny_selectors,
    );
    let mut out = crate::output::stdout();
    match args.output {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
        Format::Text => print_text(&mut out, &report)?,
    }
    out.flush()?;
    Ok(if decision.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn fqdn_matches<'a>(resolved: &'a EndpointPolicy, name: &str) -> Vec<&'a FqdnAllow> {
    let mut out = Vec::new();
    if let Ok(folded) = FoldedName::new(name.as_bytes()) {
        let _ = resolved.for_each_fqdn_match(&folded, |a| {
            out.push(a);
            ControlFlow::<()>::Continue(())
        });
    }
    out.sort_by(|a, b| {
        (&a.policy, &a.path, a.pattern.as_str()).cmp(&(&b.policy, &b.path, b.pattern.as_str()))
    });
    out
}

fn fqdn_deny_matches<'a>(resolved: &'a EndpointPolicy, name: &str) -> Vec<&'a FqdnDeny> {
    let mut out = Vec::new();
    if let Ok(folded) = FoldedName::new(name.as_bytes()) {
        let _ = resolved.for_each_fqdn_deny_match(&folded, |d| {
            out.push(d);
            ControlFlow::<()>::Continue(())
        });
    }
    out.sort_by(|a, b| {
        (&a.policy, &a.path, a.pattern.as_str()).cmp(&(&b.policy, &b.path, b.pattern.as_str()))
    });
    out
}

/// The DNS decision, with the `egressDeny` `toFQDNs` selector that decided it, if one did.
struct Decided<'a> {
    decision: &'a DnsDecision<'a>,
    name_deny: Option<&'a FqdnDeny>,
}

/// The deny selector behind a [`DnsReason::Denied`] whose rule is a `toFQDNs` deny.
fn name_deny<'a>(
    resolved: &'a EndpointPolicy,
    d: &DnsDecision<'_>,
    name: &str,
) -> Option<&'a FqdnDeny> {
    let DnsReason::Denied { rule } = d.reason else {
        return None;
    };
    if !matches!(rule.rule.peer, Peer::Fqdns(_)) {
        return None;
    }
    let folded = FoldedName::new(name.as_bytes()).ok()?;
    // The decision's audit flag says which denies it came from.
    resolved.fqdn_deny(&folded, d.audit).map(|(_, deny)| deny)
}

fn policy_json(id: &PolicyId) -> Value {
    json!({"kind": id.kind.as_str(), "namespace": id.namespace, "name": id.name})
}

fn rule_json(r: &AppliedRule) -> Value {
    json!({"policy": r.policy.to_string(), "kind": r.policy.kind.as_str(), "path": r.rule.path})
}

/// `Kind ns/name (path)`: where a rule lives, for explanations.
fn rule_ref(policy: &PolicyId, path: &str) -> String {
    format!("{} {policy} ({path})", policy.kind.as_str())
}

/// The verdict the proxy records: `allow`, `deny`, or `audit` (denied, but only audited).
fn verdict(d: &DnsDecision<'_>) -> &'static str {
    match (d.allowed, d.audit) {
        (true, _) => "allow",
        (false, true) => "audit",
        (false, false) => "deny",
    }
}

fn reason(decided: &Decided<'_>) -> (&'static str, String) {
    let d = decided.decision;
    let (code, mut explanation) = match decided.name_deny {
        Some(deny) => name_deny_reason(d, deny),
        None => policy_reason(d),
    };
    if d.audit {
        explanation
            .push_str("; not enforced (audit mode): the query is forwarded and recorded as audit");
    }
    (code, explanation)
}

/// `matchName "x" of egressDeny spec.egressDeny[0] of EgressPolicy ns/name denies the name`.
fn name_deny_reason(d: &DnsDecision<'_>, deny: &FqdnDeny) -> (&'static str, String) {
    let mut text = format!(
        "{} {:?} of egressDeny {} of {}{} {} denies the name (deny wins over every allow)",
        deny.pattern.field().as_str(),
        deny.pattern.as_str(),
        deny.path,
        if d.audit { "audit-mode " } else { "" },
        deny.policy.kind.as_str(),
        deny.policy,
    );
    if !d.proxied {
        text.push_str(
            "; DNS to this server and port is not proxied, the IPs learned for the name are denied all the same",
        );
    }
    ("fqdn-deny", text)
}

fn policy_reason(d: &DnsDecision<'_>) -> (&'static str, String) {
    match d.reason {
        DnsReason::NotEnforced => (
            "not-enforced",
            "no policy puts this endpoint in egress default-deny".to_owned(),
        ),
        DnsReason::Pattern { rule, pattern } => (
            "dns-rule",
            format!(
                "{} {:?} of {}",
                pattern.field().as_str(),
                pattern.as_str(),
                rule_ref(&rule.policy, &rule.path)
            ),
        ),
        DnsReason::PortAllowed { rule } => (
            "port-allowed",
            format!(
                "{} allows this server and port without DNS rules, so every name is allowed{}",
                rule_ref(&rule.policy, &rule.rule.path),
                if d.proxied { "" } else { "; not proxied, so answers teach no IPs" }
            ),
        ),
        DnsReason::NoPatternMatches => (
            "no-pattern-matches",
            format!(
                "DNS rules cover this server and port but none of their patterns matches the name ({})",
                if d.audit { "would be answered REFUSED" } else { "answered REFUSED" }
            ),
        ),
        DnsReason::NotCovered => (
            "not-covered",
            format!(
                "no rule allows DNS from this endpoint to this server and port ({})",
                if d.audit { "would be dropped" } else { "dropped" }
            ),
        ),
        DnsReason::Denied { rule } => (
            "egress-deny",
            format!(
                "egressDeny of {}{} covers this server and port",
                // Only a deny of an audit-mode policy gives an audited denial.
                if d.audit { "audit-mode " } else { "" },
                rule_ref(&rule.policy, &rule.rule.path),
            ),
        ),
        DnsReason::InvalidName(e) => ("invalid-name", format!("the name is not a valid hostname: {e}")),
    }
}

fn report(
    args: &CheckArgs,
    ep: &Endpoint,
    resolved: &EndpointPolicy,
    decided: &Decided<'_>,
    selectors: &[&FqdnAllow],
    deny_selectors: &[&FqdnDeny],
) -> Value {
    let d = decided.decision;
    let (code, explanation) = reason(decided);
    let dns_rule = match d.reason {
        DnsReason::Pattern { rule, pattern } => json!({
            "policy": rule.policy.to_string(),
            "kind": rule.policy.kind.as_str(),
            "path": rule.path,
            "field": pattern.field().as_str(),
            "pattern": pattern.as_str(),
        }),
        _ => Value::Null,
    };
    let mut decided_by = match d.reason {
        DnsReason::PortAllowed { rule } | DnsReason::Denied { rule } => rule_json(rule),
        _ => Value::Null,
    };
    if let (Some(deny), Value::Object(by)) = (decided.name_deny, &mut decided_by) {
        by.insert("field".into(), deny.pattern.field().as_str().into());
        by.insert("pattern".into(), deny.pattern.as_str().into());
    }
    let fqdn: Vec<Value> = selectors
        .iter()
        .map(|a| {
            json!({
                "policy": a.policy.to_string(),
                "policy_ref": policy_json(&a.policy),
                "path": a.path,
                "field": a.pattern.field().as_str(),
                "selector": a.pattern.as_str(),
                "ports": a.ports.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        })
        .collect();
    let fqdn_deny: Vec<Value> = deny_selectors
        .iter()
        .map(|d| {
            json!({
                "policy": d.policy.to_string(),
                "policy_ref": policy_json(&d.policy),
                "path": d.path,
                "field": d.pattern.field().as_str(),
                "selector": d.pattern.as_str(),
                "ports": d.ports.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "audit": d.audit,
            })
        })
        .collect();
    json!({
        "name": args.name,
        "endpoint": {"namespace": ep.namespace(), "labels": ep.labels().to_string()},
        "server": args.server.map(|s| s.to_string()),
        "port": args.port,
        "protocol": match args.protocol { Transport::Udp => "UDP", Transport::Tcp => "TCP" },
        "enforced": resolved.enforced,
        "mode": if resolved.audit { "audit" } else { "enforce" },
        "dns": if d.allowed { "allow" } else { "deny" },
        "verdict": verdict(d),
        "proxied": d.proxied,
        "reason": code,
        "explanation": explanation,
        "dns_rule": dns_rule,
        "decided_by": decided_by,
        "fqdn_selectors": fqdn,
        "fqdn_deny_selectors": fqdn_deny,
    })
}

fn print_text(out: &mut impl Write, r: &Value) -> std::io::Result<()> {
    let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
    let server = r
        .get("server")
        .and_then(Value::as_str)
        .unwrap_or("any DNS server its rules cover");
    writeln!(
        out,
        "endpoint   {}/{{{}}} (egress {})",
        r.pointer("/endpoint/namespace")
            .and_then(Value::as_str)
            .unwrap_or(""),
        r.pointer("/endpoint/labels")
            .and_then(Value::as_str)
            .unwrap_or(""),
        if r.get("enforced") == Some(&Value::Bool(true)) {
            "enforced: default deny"
        } else {
            "not enforced"
        }
    )?;
    if r.get("mode").and_then(Value::as_str) == Some("audit") {
        writeln!(out, "mode       audit (denials are recorded, not enforced)")?;
    } else {
        writeln!(out, "mode       enforce")?;
    }
    writeln!(
        out,
        "query      {} via {server} port {}/{}",
        s("name"),
        r.get("port").map(ToString::to_string).unwrap_or_default(),
        s("protocol")
    )?;
    writeln!(out, "dns        {}: {}", s("verdict"), s("explanation"))?;
    let selectors = r
        .get("fqdn_selectors")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if selectors.is_empty() {
        writeln!(
            out,
            "toFQDNs    no selector matches: IPs in the answer would not be allowed"
        )?;
    }
    for sel in selectors {
        writeln!(
            out,
            "toFQDNs    {} allows the answer's IPs on {}",
            selector_text(&sel),
            ports_text(&sel)
        )?;
    }
    let denies = r
        .get("fqdn_deny_selectors")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for sel in denies {
        let verb = if sel.get("audit") == Some(&Value::Bool(true)) {
            "would deny (audit mode)"
        } else {
            "denies"
        };
        writeln!(
            out,
            "toFQDNs    egressDeny {} {verb} the answer's IPs on {}, whatever allows them",
            selector_text(&sel),
            ports_text(&sel)
        )?;
    }
    Ok(())
}

/// `matchName "x" of ns/name (path)`, from a selector's JSON.
fn selector_text(sel: &Value) -> String {
    let f = |k: &str| sel.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    format!(
        "{} {:?} of {} ({})",
        f("field"),
        f("selector"),
        f("policy"),
        f("path")
    )
}

fn ports_text(sel: &Value) -> String {
    let ports: Vec<&str> = sel
        .get("ports")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    ports.join(", ")
}
