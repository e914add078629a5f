//! Label selectors (`matchLabels`, `matchExpressions`) with Kubernetes' rules for keys
//! and values ([`crate::kube_names`]): a key or value no pod can carry is a warning (the
//! selector selects nothing), a malformed selector an error.

use std::collections::BTreeSet;

use serde_yaml_ng::Value;

use crate::diag::Sink;
use crate::kube_names;
use crate::labels::{normalize_key, LabelSelector, Operator, Requirement};
use crate::parse::value::{fields, index, join, list, show, string, type_name};

/// A label selector (`matchLabels`, `matchExpressions`).
pub(in crate::parse) fn label_selector(
    sink: &mut Sink<'_>,
    v: &Value,
    path: &str,
) -> Option<LabelSelector> {
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
                format!("expected a mapping, found {}", type_name(other)),
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
                format!("expected a string, found {}", type_name(other)),
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
