//! YAML streams to validated [`Policy`] values, reporting every problem at once.
//!
//! A stream may hold several documents; each is one policy object or a `kind: List` with
//! `items` (what `kubectl get cnp -A -o yaml` writes). An object with any error is rejected
//! as a whole; other objects of the same file are still read, so that one run reports all
//! problems of all files.

mod cnp;
mod spec;
mod value;

use std::sync::Arc;

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::diag::{Diagnostic, Sink};
use crate::kube_names;
use crate::model::{Policy, PolicyId, PolicyKind, Source, AUDIT_ANNOTATION};
use value::{fields, index, join, list, show, string};

/// Parses every document of the YAML stream `text`, read from `file`.
///
/// Returns the policies that validated; `diagnostics` receives errors and warnings.
pub fn parse_stream(file: &str, text: &str, diagnostics: &mut Vec<Diagnostic>) -> Vec<Policy> {
    parse_documents(file, text, diagnostics).0
}

/// As [`parse_stream`]; also returns how many documents hold something (not empty, or
/// invalid YAML): a file of none, blank or only comments, holds no policy at all.
pub(crate) fn parse_documents(
    file: &str,
    text: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> (Vec<Policy>, usize) {
    let file: Arc<str> = file.into();
    let mut policies = Vec::new();
    let mut documents = 0;
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let mut sink = Sink {
            file: &file,
            doc: i + 1,
            out: diagnostics,
        };
        match Value::deserialize(document) {
            Ok(Value::Null) => {}
            Ok(v) => {
                documents += 1;
                parse_document(&mut sink, &v, &mut policies);
            }
            Err(e) => {
                documents += 1;
                sink.error("(document)", format!("invalid YAML: {e}"));
                // The parser cannot resynchronise after a syntax error.
                break;
            }
        }
    }
    (policies, documents)
}

fn parse_document(sink: &mut Sink<'_>, v: &Value, out: &mut Vec<Policy>) {
    let kind = match v {
        Value::Mapping(m) => m.get("kind").and_then(Value::as_str),
        _ => None,
    };
    if kind.is_some_and(|k| k == "List" || k.ends_with("PolicyList")) {
        let Some(f) = fields(sink, v, "", &["apiVersion", "kind", "metadata", "items"]) else {
            return;
        };
        if let Some(items) = f.get("items").and_then(|items| list(sink, items, "items")) {
            for (i, item) in items.iter().enumerate() {
                if let Some(p) = parse_object(sink, item, &index("items", i)) {
                    out.push(p);
                }
            }
        }
        return;
    }
    if let Some(p) = parse_object(sink, v, "") {
        out.push(p);
    }
}

const OBJECT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "specs", "status"];

fn parse_object(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Policy> {
    let errors_before = sink.errors();
    let f = fields(sink, v, path, OBJECT_FIELDS)?;
    let kind = match f.get("kind") {
        None => {
            sink.error(&join(path, "kind"), "missing field");
            None
        }
        Some(k) => string(sink, k, &join(path, "kind")).and_then(|k| {
            let kind = PolicyKind::from_kind(k);
            if kind.is_none() {
                sink.error(
                    &join(path, "kind"),
                    format!("{k:?} is not a policy kind (expected CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, EgressPolicy, ClusterEgressPolicy, ClusterNetworkPolicy or List)"),
                );
            }
            kind
        }),
    };
    let api_path = join(path, "apiVersion");
    let api_version = match f.get("apiVersion") {
        None => {
            sink.error(&api_path, "missing field");
            None
        }
        Some(a) => string(sink, a, &api_path),
    };
    let kind = kind?;
    if let Some(api) = api_version {
        if !kind.api_versions().contains(&api) {
            sink.error(
                &api_path,
                format!(
                    "{} needs apiVersion {}, found {api:?}",
                    kind.as_str(),
                    kind.api_versions().join(" or ")
                ),
            );
        }
    }
    let Metadata {
        name,
        namespace,
        audit,
    } = parse_metadata(sink, f.get("metadata"), path, kind)?;
    let mut rules = Vec::new();
    let mut precedence = None;
    let mut specs_seen = 0;
    if kind == PolicyKind::ClusterNetworkPolicy {
        if f.has("specs") {
            sink.error(
                &join(path, "specs"),
                "ClusterNetworkPolicy has one spec; specs is not allowed",
            );
        }
        if let Some(s) = f.get("spec") {
            specs_seen += 1;
            if let Some((rule, p)) = cnp::parse_spec(sink, s, &join(path, "spec")) {
                rules.push(rule);
                precedence = Some(p);
            }
        }
    } else if let Some(s) = f.get("spec") {
        specs_seen += 1;
        let spec_path = join(path, "spec");
        if let Some(rule) = spec::parse_spec(sink, s, &spec_path, kind, namespace.as_deref()) {
            rules.extend(rule);
        }
    }
    if let Some(specs) = f
        .get("specs")
        .filter(|_| kind != PolicyKind::ClusterNetworkPolicy)
    {
        let specs_path = join(path, "specs");
        if let Some(items) = list(sink, specs, &specs_path) {
            specs_seen += items.len();
            for (i, s) in items.iter().enumerate() {
                let p = index(&specs_path, i);
                if let Some(rule) = spec::parse_spec(sink, s, &p, kind, namespace.as_deref()) {
                    rules.extend(rule);
                }
            }
        }
    }
    if specs_seen == 0 {
        sink.error(
            &join(path, "spec"),
            "missing field (one of spec or specs is required)",
        );
    }
    if sink.errors() > errors_before {
        return None;
    }
    Some(Policy {
        id: PolicyId {
            kind,
            namespace,
            name,
        },
        source: Source {
            file: sink.file.clone(),
            doc: sink.doc,
        },
        rules,
        audit,
        precedence,
    })
}

/// What dnsfence reads of `metadata`; every other field (`labels`, `uid`, ...) is ignored.
struct Metadata {
    name: String,
    /// For namespaced kinds, `default` when not given, as kubectl.
    namespace: Option<String>,
    /// The [`AUDIT_ANNOTATION`].
    audit: bool,
}

fn parse_metadata(
    sink: &mut Sink<'_>,
    v: Option<&Value>,
    path: &str,
    kind: PolicyKind,
) -> Option<Metadata> {
    let path = join(path, "metadata");
    let Some(v) = v else {
        sink.error(&path, "missing field");
        return None;
    };
    let Value::Mapping(m) = v else {
        sink.error(
            &path,
            format!("expected a mapping, found {}", value::type_name(v)),
        );
        return None;
    };
    let name_path = join(&path, "name");
    let name = match m.get("name") {
        Some(n) => string(sink, n, &name_path).map(str::to_owned),
        None => {
            sink.error(&name_path, "missing field");
            None
        }
    };
    match name.as_deref() {
        Some("") => sink.error(&name_path, "must not be empty"),
        Some(n) if !kube_names::is_dns_subdomain(n) => sink.warn(
            &name_path,
            format!("{n:?}: Kubernetes would refuse this name (lowercase letters, digits, '-' and '.', at most 253, beginning and ending with a letter or digit)"),
        ),
        _ => {}
    }
    let ns_path = join(&path, "namespace");
    let namespace = match m.get("namespace").filter(|v| !v.is_null()) {
        Some(ns) => string(sink, ns, &ns_path).map(str::to_owned),
        None => None,
    };
    if let Some(ns) = namespace
        .as_deref()
        .filter(|ns| !kube_names::is_dns_label(ns))
    {
        sink.warn(
            &ns_path,
            format!("{ns:?}: Kubernetes would refuse this namespace (lowercase letters, digits and '-', at most 63, beginning and ending with a letter or digit)"),
        );
    }
    let namespace = if kind.is_namespaced() {
        Some(namespace.unwrap_or_else(|| "default".to_owned()))
    } else {
        if namespace.is_some() {
            sink.warn(
                &ns_path,
                format!("ignored: {} is cluster-wide", kind.as_str()),
            );
        }
        None
    };
    // A bad annotation is an error, but the spec is still read so that all its problems
    // are reported too (the object is rejected either way).
    let audit = match m.get("annotations").filter(|v| !v.is_null()) {
        Some(a) => audit_annotation(sink, a, &join(&path, "annotations")).unwrap_or(false),
        None => false,
    };
    Some(Metadata {
        name: name?,
        namespace,
        audit,
    })
}

/// `metadata.annotations`: a string-to-string map of which only [`AUDIT_ANNOTATION`]
/// means something; its value must be the string `"true"` or `"false"`.
fn audit_annotation(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<bool> {
    let Value::Mapping(m) = v else {
        sink.error(
            path,
            format!("expected a mapping, found {}", value::type_name(v)),
        );
        return None;
    };
    let Some(a) = m.get(AUDIT_ANNOTATION) else {
        return Some(false);
    };
    let audit_path = join(path, AUDIT_ANNOTATION);
    match a {
        Value::String(s) if s == "true" => Some(true),
        Value::String(s) if s == "false" => Some(false),
        Value::Bool(b) => {
            sink.error(
                &audit_path,
                format!("annotation values are strings: quote it, \"{b}\""),
            );
            None
        }
        other => {
            sink.error(
                &audit_path,
                format!("expected \"true\" or \"false\", found {}", show(other)),
            );
            None
        }
    }
}
