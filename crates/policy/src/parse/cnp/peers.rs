//! Selectors and egress peers of a `ClusterNetworkPolicy`: `namespaces`, `pods`,
//! `networks`, `domainNames` (and `nodes`, refused).
//!
//! dnsfence knows a pod's namespace by name (the label `io.kubernetes.pod.namespace`), not
//! the namespace's labels. A namespace selector may therefore only use
//! `kubernetes.io/metadata.name`, which Kubernetes sets to the namespace's name; any other
//! key is refused rather than guessed.

use std::collections::btree_map::Entry;
use std::collections::BTreeSet;

use ipnet::IpNet;
use serde_yaml_ng::Value;

use super::domain::domain_name;
use super::MAX_ITEMS;
use crate::diag::Sink;
use crate::labels::{EndpointSelector, LabelSelector, Operator, Requirement, NAMESPACE_LABEL};
use crate::parse::spec::label_selector;
use crate::parse::value::{bounded_list, exactly_one, fields, index, join, string};
use crate::pattern::NamePattern;

/// The namespace label Kubernetes sets to each namespace's name.
const NAMESPACE_NAME_KEY: &str = "kubernetes.io/metadata.name";

const PEER_FIELDS: &[&str] = &["namespaces", "pods", "nodes", "networks", "domainNames"];

/// One `to[]` entry.
pub(super) enum PeerSpec {
    /// `namespaces` or `pods`.
    Endpoints(EndpointSelector),
    /// `networks`.
    Networks(Vec<IpNet>),
    /// `domainNames`.
    Domains(Vec<NamePattern>),
}

/// One `to[]` entry: exactly one peer field.
pub(super) fn peer(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<PeerSpec> {
    let f = fields(sink, v, path, PEER_FIELDS)?;
    let (field, value) = exactly_one(sink, &f, path, PEER_FIELDS)?;
    let p = join(path, field);
    match field {
        "namespaces" => namespaces(sink, value, &p).map(PeerSpec::Endpoints),
        "pods" => pods(sink, value, &p).map(PeerSpec::Endpoints),
        "networks" => networks(sink, value, &p).map(PeerSpec::Networks),
        "domainNames" => domain_names(sink, value, &p).map(PeerSpec::Domains),
        _ => {
            sink.error(
                &p,
                "nodes peers are not supported by dnsfence (it does not know node labels); use networks with the nodes' addresses",
            );
            None
        }
    }
}

/// `namespaces`: every pod of the selected namespaces.
pub(super) fn namespaces(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<EndpointSelector> {
    namespace_selector(sink, v, path).map(|selector| EndpointSelector {
        selector,
        namespace: None,
    })
}

/// `pods`: `podSelector` (required) in the namespaces of `namespaceSelector` (all when absent).
pub(super) fn pods(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<EndpointSelector> {
    let f = fields(sink, v, path, &["namespaceSelector", "podSelector"])?;
    let namespaces = match f.get("namespaceSelector") {
        Some(ns) => namespace_selector(sink, ns, &join(path, "namespaceSelector")),
        None => Some(LabelSelector::default()),
    };
    let pod_path = join(path, "podSelector");
    let pods = match f.get("podSelector") {
        Some(p) => label_selector(sink, p, &pod_path),
        None => {
            sink.error(&pod_path, "missing field");
            None
        }
    };
    let (mut selector, namespaces) = (pods?, namespaces?);
    for (key, value) in namespaces.match_labels {
        match selector.match_labels.entry(key) {
            Entry::Vacant(e) => {
                e.insert(value);
            }
            Entry::Occupied(e) => selector.match_expressions.push(Requirement {
                key: e.key().clone(),
                operator: Operator::In,
                values: BTreeSet::from([value]),
            }),
        }
    }
    selector
        .match_expressions
        .extend(namespaces.match_expressions);
    Some(EndpointSelector {
        selector,
        namespace: None,
    })
}

/// A namespace label selector, as a selector on the endpoints' namespace label.
fn namespace_selector(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<LabelSelector> {
    let written = label_selector(sink, v, path)?;
    let unsupported = |key: &str| {
        format!("namespace label {key:?} is not supported yet: dnsfence knows namespaces by name only; select them with {NAMESPACE_NAME_KEY}")
    };
    let mut out = LabelSelector::default();
    let mut ok = true;
    for (key, value) in written.match_labels {
        if key == NAMESPACE_NAME_KEY {
            out.match_labels.insert(NAMESPACE_LABEL.to_owned(), value);
        } else {
            sink.error(&join(&join(path, "matchLabels"), &key), unsupported(&key));
            ok = false;
        }
    }
    for (i, r) in written.match_expressions.into_iter().enumerate() {
        if r.key == NAMESPACE_NAME_KEY {
            out.match_expressions.push(Requirement {
                key: NAMESPACE_LABEL.to_owned(),
                ..r
            });
        } else {
            let p = join(&index(&join(path, "matchExpressions"), i), "key");
            sink.error(&p, unsupported(&r.key));
            ok = false;
        }
    }
    ok.then_some(out)
}

/// `networks`: CIDRs with no host bits set, no duplicates, at most 25.
fn networks(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Vec<IpNet>> {
    let items = bounded_list(sink, v, path, MAX_ITEMS)?;
    let errors_before = sink.errors();
    let mut out: Vec<IpNet> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let Some(s) = string(sink, item, &p) else {
            continue;
        };
        match s.parse::<IpNet>() {
            Ok(net) if net != net.trunc() => sink.error(
                &p,
                format!("{s:?} has host bits set; did you mean {}?", net.trunc()),
            ),
            Ok(net) if out.contains(&net) => sink.error(&p, format!("duplicate {s:?}")),
            Ok(net) => out.push(net),
            Err(_) => sink.error(
                &p,
                format!("{s:?} is not a CIDR (like 192.0.2.0/24 or 2001:db8::/32)"),
            ),
        }
    }
    (sink.errors() == errors_before).then_some(out)
}

/// `domainNames`: at most 25 distinct names (see [`domain_name`]).
fn domain_names(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Vec<NamePattern>> {
    let items = bounded_list(sink, v, path, MAX_ITEMS)?;
    let errors_before = sink.errors();
    let mut out: Vec<NamePattern> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let Some(text) = string(sink, item, &p) else {
            continue;
        };
        match domain_name(text) {
            Ok(pattern) if out.contains(&pattern) => {
                sink.error(&p, format!("duplicate {text:?}"));
            }
            Ok(pattern) => out.push(pattern),
            Err(e) => sink.error(&p, format!("{text:?}: {e}")),
        }
    }
    (sink.errors() == errors_before).then_some(out)
}
