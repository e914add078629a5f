//! `spec`: selectors, egress and egressDeny rules, ports, DNS rules, with Cilium's rules.

use std::collections::BTreeSet;

use ipnet::IpNet;
use serde_yaml_ng::Value;

use super::value::{boolean, fields, index, join, list, port, show, string};
use crate::diag::Sink;
use crate::kube_names;
use crate::labels::{normalize_key, EndpointSelector, LabelSelector, Operator, Requirement};
use crate::model::{
    CidrRule, EgressRule, Entity, Peer, PolicyKind, PortProtocol, PortRule, Protocol, Rule,
};
use crate::pattern::{NamePattern, PatternField};

const SPEC_FIELDS: &[&str] = &[
    "endpointSelector",
    "nodeSelector",
    "ingress",
    "ingressDeny",
    "egress",
    "egressDeny",
    "enableDefaultDeny",
    "labels",
    "description",
    "log",
];

/// Parses one spec. `Some(None)`: valid but nothing dnsfence enforces (a host policy).
pub(super) fn parse_spec(
    sink: &mut Sink<'_>,
    v: &Value,
    path: &str,
    kind: PolicyKind,
    namespace: Option<&str>,
) -> Option<Option<Rule>> {
    let errors_before = sink.errors();
    let f = fields(sink, v, path, SPEC_FIELDS)?;
    let endpoint = f.get("endpointSelector");
    let node = f.get("nodeSelector");
    let subject = match (endpoint, node) {
        (Some(_), Some(_)) => {
            sink.error(
                path,
                "exactly one of endpointSelector and nodeSelector is allowed, found both",
            );
            None
        }
        (None, None) => {
            sink.error(
                path,
                "exactly one of endpointSelector and nodeSelector is required, found neither",
            );
            None
        }
        (Some(sel), None) => {
            label_selector(sink, sel, &join(path, "endpointSelector")).map(|selector| {
                EndpointSelector {
                    selector,
                    namespace: namespace.map(str::to_owned),
                }
            })
        }
        (None, Some(sel)) => {
            let p = join(path, "nodeSelector");
            if kind.is_namespaced() {
                sink.error(
                    &p,
                    format!(
                        "{} cannot select nodes; use a cluster-wide kind",
                        kind.as_str()
                    ),
                );
            } else {
                label_selector(sink, sel, &p);
                sink.warn(
                    &p,
                    "host policies are not enforced by dnsfence (it enforces pod egress); this spec is ignored",
                );
            }
            None
        }
    };
    for field in ["ingress", "ingressDeny"] {
        if let Some(rules) = f.get(field) {
            check_ingress(sink, rules, &join(path, field));
        }
    }
    let egress = rules(
        sink,
        f.get("egress"),
        &join(path, "egress"),
        None,
        namespace,
    );
    let egress_deny = rules(
        sink,
        f.get("egressDeny"),
        &join(path, "egressDeny"),
        Some(kind),
        namespace,
    );
    let mut default_deny = true;
    if let Some(dd) = f.get("enableDefaultDeny") {
        let dd_path = join(path, "enableDefaultDeny");
        if let Some(dd) = fields(sink, dd, &dd_path, &["egress", "ingress"]) {
            if let Some(e) = dd.get("egress") {
                default_deny = boolean(sink, e, &join(&dd_path, "egress")).unwrap_or(true);
            }
            if let Some(i) = dd.get("ingress") {
                boolean(sink, i, &join(&dd_path, "ingress"));
            }
        }
    }
    if let Some(d) = f.get("description") {
        string(sink, d, &join(path, "description"));
    }
    if sink.errors() > errors_before {
        return None;
    }
    let Some(subject) = subject else {
        return Some(None);
    };
    let has_egress = egress.written + egress_deny.written > 0;
    Some(Some(Rule {
        path: path.to_owned(),
        subject,
        egress: egress.rules,
        egress_deny: egress_deny.rules,
        default_deny_egress: has_egress && default_deny,
    }))
}

/// Ingress is not enforced: a warning, but DNS rules there are invalid (egress only).
fn check_ingress(sink: &mut Sink<'_>, v: &Value, path: &str) {
    let Some(items) = list(sink, v, path) else {
        return;
    };
    if items.is_empty() {
        return;
    }
    sink.warn(
        path,
        "ingress rules are not enforced by dnsfence (egress only) and do not make egress default-deny",
    );
    for (i, item) in items.iter().enumerate() {
        let Some(ports) = item.get("toPorts").and_then(Value::as_sequence) else {
            continue;
        };
        for (j, pr) in ports.iter().enumerate() {
            if pr.get("rules").and_then(|r| r.get("dns")).is_some() {
                sink.error(
                    &format!("{path}[{i}].toPorts[{j}].rules.dns"),
                    "DNS rules are only allowed in egress rules",
                );
            }
        }
    }
}

struct Rules {
    rules: Vec<EgressRule>,
    /// Entries written, including empty ones that select nothing (they still make the
    /// endpoint default-deny, as Cilium's `egress: [{}]` does).
    written: usize,
}

/// `egress` (`deny_of: None`) or `egressDeny` (`deny_of: Some(kind of the policy)`).
fn rules(
    sink: &mut Sink<'_>,
    v: Option<&Value>,
    path: &str,
    deny_of: Option<PolicyKind>,
    namespace: Option<&str>,
) -> Rules {
    let mut out = Rules {
        rules: Vec::new(),
        written: 0,
    };
    let Some(items) = v.and_then(|v| list(sink, v, path)) else {
        return out;
    };
    out.written = items.len();
    for (i, item) in items.iter().enumerate() {
        if let Some(Some(rule)) = egress_rule(sink, item, &index(path, i), deny_of, namespace) {
            out.rules.push(rule);
        }
    }
    out
}

const ALLOW_FIELDS: &[&str] = &[
    "toEndpoints",
    "toCIDR",
    "toCIDRSet",
    "toEntities",
    "toFQDNs",
    "toPorts",
    "toServices",
    "toGroups",
    "toRequires",
    "toNodes",
    "icmps",
    "authentication",
];

const DENY_FIELDS: &[&str] = &[
    "toEndpoints",
    "toFQDNs",
    "toCIDR",
    "toCIDRSet",
    "toEntities",
    "toPorts",
    "toServices",
    "toGroups",
    "toRequires",
    "toNodes",
    "icmps",
];

/// Peers dnsfence cannot enforce, with the reason.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("toServices", "toServices is not supported by dnsfence; select the service's pods with toEndpoints or its name with toFQDNs"),
    ("toGroups", "toGroups (cloud provider groups) is not supported by dnsfence"),
    ("toRequires", "toRequires is not supported by dnsfence (it is deprecated in Cilium)"),
    ("toNodes", "toNodes is not supported by dnsfence; use toEntities host or toCIDR"),
    ("icmps", "icmps rules are not supported by dnsfence; ignoring them would allow more than the policy says"),
    ("authentication", "authentication (mutual auth) is not supported by dnsfence"),
];

/// The L3 peer fields, of which a rule may use one kind.
const PEER_FIELDS: &[&str] = &[
    "toEndpoints",
    "toCIDR",
    "toCIDRSet",
    "toEntities",
    "toFQDNs",
    "toServices",
    "toGroups",
    "toNodes",
];

/// One egress (or egressDeny, with the policy's kind) entry. `Some(None)`: valid but
/// selects nothing (`{}`).
fn egress_rule(
    sink: &mut Sink<'_>,
    v: &Value,
    path: &str,
    deny_of: Option<PolicyKind>,
    namespace: Option<&str>,
) -> Option<Option<EgressRule>> {
    let errors_before = sink.errors();
    let deny = deny_of.is_some();
    let known = if deny { DENY_FIELDS } else { ALLOW_FIELDS };
    let f = fields(sink, v, path, known)?;
    if let Some(
        kind @ (PolicyKind::CiliumNetworkPolicy | PolicyKind::CiliumClusterwideNetworkPolicy),
    ) = deny_of
    {
        if f.has("toFQDNs") {
            sink.warn(
                &join(path, "toFQDNs"),
                format!(
                    "toFQDNs in egressDeny is a dnsfence extension: Cilium rejects it, so this {} works only with dnsfence (use an EgressPolicy or ClusterEgressPolicy)",
                    kind.as_str()
                ),
            );
        }
    }
    for (field, why) in UNSUPPORTED {
        if f.has(field) {
            sink.error(&join(path, field), why);
        }
    }
    let present: Vec<&str> = PEER_FIELDS
        .iter()
        .copied()
        .filter(|p| f.get(p).is_some_and(|v| !is_empty_list(v)))
        .collect();
    if let [first, second, ..] = present.as_slice() {
        sink.error(
            path,
            format!("combining {first} and {second} in one rule is not supported (one L3 peer kind per rule, as in Cilium)"),
        );
    }
    let peer = if let Some(v) = f.get("toEndpoints").filter(|v| !is_empty_list(v)) {
        endpoints(sink, v, &join(path, "toEndpoints"), namespace).map(Peer::Endpoints)
    } else if let Some(v) = f.get("toCIDR").filter(|v| !is_empty_list(v)) {
        cidrs(sink, v, &join(path, "toCIDR")).map(Peer::Cidrs)
    } else if let Some(v) = f.get("toCIDRSet").filter(|v| !is_empty_list(v)) {
        cidr_sets(sink, v, &join(path, "toCIDRSet")).map(Peer::Cidrs)
    } else if let Some(v) = f.get("toEntities").filter(|v| !is_empty_list(v)) {
        entities(sink, v, &join(path, "toEntities")).map(Peer::Entities)
    } else if let Some(v) = f.get("toFQDNs").filter(|v| !is_empty_list(v)) {
        fqdns(sink, v, &join(path, "toFQDNs")).map(Peer::Fqdns)
    } else {
        Some(Peer::Any)
    };
    let to_ports = match f.get("toPorts") {
        Some(v) => port_rules(sink, v, &join(path, "toPorts"), deny)?,
        None => Vec::new(),
    };
    if matches!(peer, Some(Peer::Fqdns(_))) && to_ports.iter().any(|pr| pr.dns.is_some()) {
        sink.error(
            &join(path, "toPorts"),
            "DNS rules cannot be combined with toFQDNs (the DNS server must be selected by toEndpoints, toCIDR, toEntities or no L3 peer)",
        );
    }
    if sink.errors() > errors_before {
        return None;
    }
    let peer = peer?;
    if peer == Peer::Any && to_ports.is_empty() {
        return Some(None);
    }
    Some(Some(EgressRule {
        path: path.to_owned(),
        peer,
        to_ports,
    }))
}

fn is_empty_list(v: &Value) -> bool {
    v.as_sequence().is_some_and(Vec::is_empty)
}

/// `toEndpoints`. In a namespaced policy a selector that does not name the namespace label
/// selects only endpoints of the policy's namespace, as in Cilium.
fn endpoints(
    sink: &mut Sink<'_>,
    v: &Value,
    path: &str,
    namespace: Option<&str>,
) -> Option<Vec<EndpointSelector>> {
    let items = list(sink, v, path)?;
    let errors_before = sink.errors();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        if let Some(selector) = label_selector(sink, item, &index(path, i)) {
            let namespace = namespace
                .filter(|_| !selector.names_namespace())
                .map(str::to_owned);
            out.push(EndpointSelector {
                selector,
                namespace,
            });
        }
    }
    (sink.errors() == errors_before).then_some(out)
}

/// A label selector (`matchLabels`, `matchExpressions`).
pub(super) fn label_selector(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<LabelSelector> {
    let errors_before = sink.errors();
    let f = fields(sink, v, path, &["matchLabels", "matchExpressions"])?;
    let mut sel = LabelSelector::default();
    if let Some(ml) = f.get("matchLabels") {
        let ml_path = join(path, "matchLabels");
        match ml {
            Value::Mapping(m) => {
                for (k, v) in m {
                    let Some(k) = k.as_str() else {
                        sink.error(&ml_path, "label keys must be strings");
                        continue;
                    };
                    let p = join(&ml_path, k);
                    let key = label_key(sink, k, &p);
                    let value = label_value(sink, v, &p);
                    if let (Some(key), Some(value)) = (key, value) {
                        sel.match_labels.insert(key, value);
                    }
                }
            }
            other => sink.error(
                &ml_path,
                format!(
                    "expected a mapping, found {}",
                    super::value::type_name(other)
                ),
            ),
        }
    }
    if let Some(me) = f.get("matchExpressions") {
        let me_path = join(path, "matchExpressions");
        for (i, e) in list(sink, me, &me_path)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if let Some(r) = requirement(sink, e, &index(&me_path, i)) {
                sel.match_expressions.push(r);
            }
        }
    }
    (sink.errors() == errors_before).then_some(sel)
}

fn label_key(sink: &mut Sink<'_>, k: &str, path: &str) -> Option<String> {
    match normalize_key(k) {
        Ok(bare) => {
            // A warning, not an error: rejecting the policy would leave its endpoints
            // without its rules (in Kubernetes mode, unenforced), where the selector
            // only matches nothing.
            if let Err(why) = kube_names::label_key(bare) {
                sink.warn(
                    path,
                    format!("label key {k:?} {why}: no pod can carry it, so this selects nothing"),
                );
            }
            Some(bare.to_owned())
        }
        Err(e) => {
            sink.error(path, e);
            None
        }
    }
}

/// Label values are strings; YAML numbers and booleans are taken as written.
fn label_value(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<String> {
    let value = label_value_text(sink, v, path)?;
    if !kube_names::is_label_value(&value) {
        sink.warn(
            path,
            format!("label value {value:?} is not a valid label value (at most 63 of letters, digits, '-', '_' and '.', beginning and ending with a letter or digit): no pod can carry it, so this selects nothing"),
        );
    }
    Some(value)
}

fn label_value_text(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(show(v)),
        Value::Null => Some(String::new()),
        other => {
            sink.error(
                path,
                format!(
                    "expected a string, found {}",
                    super::value::type_name(other)
                ),
            );
            None
        }
    }
}

fn requirement(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Requirement> {
    let f = fields(sink, v, path, &["key", "operator", "values"])?;
    let key = match f.get("key") {
        Some(k) => {
            string(sink, k, &join(path, "key")).and_then(|k| label_key(sink, k, &join(path, "key")))
        }
        None => {
            sink.error(&join(path, "key"), "missing field");
            None
        }
    };
    let op_path = join(path, "operator");
    let operator = match f.get("operator") {
        Some(o) => string(sink, o, &op_path).and_then(|o| {
            let op = Operator::parse(o);
            if op.is_none() {
                sink.error(
                    &op_path,
                    format!("unknown operator {o:?} (expected In, NotIn, Exists or DoesNotExist)"),
                );
            }
            op
        }),
        None => {
            sink.error(&op_path, "missing field");
            None
        }
    };
    let values_path = join(path, "values");
    let mut values = BTreeSet::new();
    if let Some(vs) = f.get("values") {
        for (i, v) in list(sink, vs, &values_path)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if let Some(v) = label_value(sink, v, &index(&values_path, i)) {
                values.insert(v);
            }
        }
    }
    let operator = operator?;
    if operator.needs_values() && values.is_empty() {
        sink.error(
            &values_path,
            format!("{operator:?} needs at least one value"),
        );
        return None;
    }
    if !operator.needs_values() && !values.is_empty() {
        sink.error(&values_path, format!("{operator:?} takes no values"));
        return None;
    }
    Some(Requirement {
        key: key?,
        operator,
        values,
    })
}

fn cidr(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<IpNet> {
    let s = string(sink, v, path)?;
    let parsed = s
        .parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
    match parsed {
        Ok(net) => Some(net.trunc()),
        Err(_) => {
            sink.error(
                path,
                format!("{s:?} is not a valid CIDR (like 192.0.2.0/24 or 2001:db8::/32)"),
            );
            None
        }
    }
}

fn cidrs(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Vec<CidrRule>> {
    let items = list(sink, v, path)?;
    let mut out = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match cidr(sink, item, &index(path, i)) {
            Some(cidr) => out.push(CidrRule {
                cidr,
                except: Vec::new(),
            }),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn cidr_sets(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Vec<CidrRule>> {
    let items = list(sink, v, path)?;
    let mut out = Vec::new();
    let errors_before = sink.errors();
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let Some(f) = fields(
            sink,
            item,
            &p,
            &["cidr", "except", "cidrGroupRef", "cidrGroupSelector"],
        ) else {
            continue;
        };
        for unsupported in ["cidrGroupRef", "cidrGroupSelector"] {
            if f.has(unsupported) {
                sink.error(
                    &join(&p, unsupported),
                    "CIDR groups are not supported by dnsfence; list the CIDRs",
                );
            }
        }
        let Some(c) = f.get("cidr") else {
            sink.error(&join(&p, "cidr"), "missing field");
            continue;
        };
        let Some(c) = cidr(sink, c, &join(&p, "cidr")) else {
            continue;
        };
        let mut except = Vec::new();
        if let Some(ex) = f.get("except") {
            let ex_path = join(&p, "except");
            for (j, e) in list(sink, ex, &ex_path)
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                let ep = index(&ex_path, j);
                if let Some(e) = cidr(sink, e, &ep) {
                    if c.contains(&e) {
                        except.push(e);
                    } else {
                        sink.error(&ep, format!("{e} is not inside {c}"));
                    }
                }
            }
        }
        out.push(CidrRule { cidr: c, except });
    }
    (sink.errors() == errors_before).then_some(out)
}

fn entities(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Vec<Entity>> {
    let items = list(sink, v, path)?;
    let mut out = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let Some(s) = string(sink, item, &p) else {
            ok = false;
            continue;
        };
        match Entity::parse(s) {
            Some(e) => out.push(e),
            None => {
                ok = false;
                sink.error(
                    &p,
                    format!("entity {s:?} is not supported by dnsfence (supported: world, world-ipv4, world-ipv6, cluster, host, all)"),
                );
            }
        }
    }
    ok.then_some(out)
}

/// A `toFQDNs` or `rules.dns` entry: exactly one of `matchName` and `matchPattern`.
fn name_pattern(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<NamePattern> {
    let f = fields(sink, v, path, &["matchName", "matchPattern"])?;
    let (field, text) = match (f.get("matchName"), f.get("matchPattern")) {
        (Some(_), Some(_)) => {
            sink.error(
                path,
                "exactly one of matchName and matchPattern is allowed, found both",
            );
            return None;
        }
        (None, None) => {
            sink.error(
                path,
                "exactly one of matchName and matchPattern is required, found neither",
            );
            return None;
        }
        (Some(n), None) => (PatternField::MatchName, n),
        (None, Some(p)) => (PatternField::MatchPattern, p),
    };
    let p = join(path, field.as_str());
    let text = string(sink, text, &p)?;
    match NamePattern::parse(field, text) {
        Ok(pattern) => Some(pattern),
        Err(e) => {
            sink.error(&p, format!("{text:?}: {e}"));
            None
        }
    }
}

fn fqdns(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Vec<NamePattern>> {
    let items = list(sink, v, path)?;
    let errors_before = sink.errors();
    let out: Vec<NamePattern> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| name_pattern(sink, item, &index(path, i)))
        .collect();
    (sink.errors() == errors_before).then_some(out)
}

const PORT_RULE_FIELDS: &[&str] = &[
    "ports",
    "rules",
    "serverNames",
    "originatingTLS",
    "terminatingTLS",
    "listener",
];

fn port_rules(sink: &mut Sink<'_>, v: &Value, path: &str, deny: bool) -> Option<Vec<PortRule>> {
    let items = list(sink, v, path)?;
    let errors_before = sink.errors();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let Some(f) = fields(sink, item, &p, PORT_RULE_FIELDS) else {
            continue;
        };
        if deny && f.has("rules") {
            sink.error(&join(&p, "rules"), "L7 rules are not allowed in egressDeny");
            continue;
        }
        for unsupported in [
            "serverNames",
            "originatingTLS",
            "terminatingTLS",
            "listener",
        ] {
            if f.has(unsupported) {
                sink.error(&join(&p, unsupported), format!("{unsupported} is not supported by dnsfence; ignoring it would allow more than the policy says"));
            }
        }
        let ports_path = join(&p, "ports");
        // The entries that parsed, with their index in the list (the others are reported).
        let mut indexed = Vec::new();
        // How many entries were written (`None`: no `ports` at all).
        let mut written = None;
        if let Some(v) = f.get("ports") {
            let entries = list(sink, v, &ports_path).unwrap_or_default();
            written = Some(entries.len());
            for (j, pp) in entries.iter().enumerate() {
                if let Some(pp) = port_protocol(sink, pp, &index(&ports_path, j)) {
                    indexed.push((j, pp));
                }
            }
        }
        let ports: Vec<PortProtocol> = if indexed.is_empty() {
            vec![PortProtocol::ANY]
        } else {
            indexed.iter().map(|(_, pp)| *pp).collect()
        };
        let dns = match f.get("rules") {
            Some(r) => l7_rules(sink, r, &join(&p, "rules")),
            None => None,
        };
        if dns.is_some() {
            check_dns_ports(sink, written, &indexed, &ports_path);
        }
        out.push(PortRule { ports, dns });
    }
    (sink.errors() == errors_before).then_some(out)
}

/// DNS rules need a specific port, no range, and TCP, UDP or ANY.
///
/// `written` is how many entries the list has (`None`: no list); `ports` are the entries
/// that parsed, with their index in it (the others were reported already).
fn check_dns_ports(
    sink: &mut Sink<'_>,
    written: Option<usize>,
    ports: &[(usize, PortProtocol)],
    path: &str,
) {
    if written.is_none_or(|n| n == 0) {
        sink.error(path, "DNS rules need a port (usually 53)");
        return;
    }
    for (j, pp) in ports {
        let p = index(path, *j);
        if pp.port == 0 {
            sink.error(
                &join(&p, "port"),
                "DNS rules need a specific port (usually 53), not 0",
            );
        }
        if pp.end_port != pp.port {
            sink.error(&join(&p, "endPort"), "DNS rules cannot use a port range");
        }
        if pp.protocol == Protocol::Sctp {
            sink.error(
                &join(&p, "protocol"),
                "DNS rules need protocol TCP, UDP or ANY",
            );
        }
    }
}

fn port_protocol(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<PortProtocol> {
    let f = fields(sink, v, path, &["port", "endPort", "protocol"])?;
    // Every field is judged, so that one run reports all of an entry's problems.
    let port_value = match f.get("port") {
        Some(p) => port(sink, p, &join(path, "port")),
        None => Some(0),
    };
    let end = match f.get("endPort") {
        Some(e) => port(sink, e, &join(path, "endPort")).map(Some),
        None => Some(None),
    };
    let protocol = match f.get("protocol") {
        Some(p) => {
            let pp = join(path, "protocol");
            string(sink, p, &pp).and_then(|s| {
                let parsed = Protocol::parse(s);
                if parsed.is_none() {
                    sink.error(
                        &pp,
                        format!("unknown protocol {s:?} (expected TCP, UDP, SCTP or ANY)"),
                    );
                }
                parsed
            })
        }
        None => Some(Protocol::Any),
    };
    let (port_value, end) = (port_value?, end?);
    let end_port = match end {
        None | Some(0) => port_value,
        Some(_) if port_value == 0 => {
            sink.error(&join(path, "endPort"), "endPort needs a port");
            return None;
        }
        Some(e) if e < port_value => {
            sink.error(
                &join(path, "endPort"),
                format!("endPort {e} is lower than port {port_value}"),
            );
            return None;
        }
        Some(e) => e,
    };
    Some(PortProtocol {
        port: port_value,
        end_port,
        protocol: protocol?,
    })
}

/// `rules`: only `dns` is enforceable; every other L7 kind is an error.
fn l7_rules(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Vec<NamePattern>> {
    let f = fields(sink, v, path, &["dns", "http", "kafka", "l7proto", "l7"])?;
    for l7 in ["http", "kafka", "l7proto", "l7"] {
        if f.has(l7) {
            sink.error(
                &join(path, l7),
                format!("L7 {l7} rules are not enforced by dnsfence; ignoring them would allow more than the policy says"),
            );
        }
    }
    let dns = f.get("dns")?;
    let dns_path = join(path, "dns");
    let items = list(sink, dns, &dns_path)?;
    let errors_before = sink.errors();
    let out: Vec<NamePattern> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| name_pattern(sink, item, &index(&dns_path, i)))
        .collect();
    (sink.errors() == errors_before).then_some(out)
}
