//! `spec`: selectors, egress and egressDeny rules, ports, DNS rules, with Cilium's rules.
//!
//! Layout: label selectors (`labels`), L3 peers other than endpoints (`peers`), `toPorts`
//! and their DNS rules (`ports`); the spec, its rule lists and one egress rule here.

mod labels;
mod peers;
mod ports;

use serde_yaml_ng::Value;

use super::value::{boolean, fields, index, join, list, string};
use crate::diag::Sink;
use crate::labels::EndpointSelector;
use crate::model::{EgressRule, Peer, PolicyKind, Rule};
pub(super) use labels::label_selector;
use peers::{cidr_sets, cidrs, entities, fqdns};
use ports::port_rules;

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
