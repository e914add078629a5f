//! Label and field selectors as query parameters write them, parsed and checked as the
//! API server checks them (names by [`dnsfence_policy::kube_names`]), and matched against
//! objects.
//!
//! Pure: no state, no I/O.

use std::collections::{BTreeMap, BTreeSet};

use dnsfence_policy::kube_names;
use serde_json::Value;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `k=v` or `k==v`.
    Equals(String, String),
    /// `k!=v` (also true without the label).
    NotEquals(String, String),
    /// `k in (a,b)`.
    In(String, BTreeSet<String>),
    /// `k notin (a,b)` (also true without the label).
    NotIn(String, BTreeSet<String>),
    /// `k`.
    Exists(String),
    /// `!k`.
    DoesNotExist(String),
}

impl Requirement {
    /// Whether `labels` satisfy it.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// A Kubernetes label selector as a query parameter writes it: requirements separated by
/// commas, all of which must hold. Empty: everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Requirement>);

impl LabelSelector {
    /// Parses `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k` and `!k`, joined
    /// by commas; keys and values are checked as the API server checks them.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        let mut terms = Vec::new();
        let mut depth = 0usize;
        let mut start = 0;
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth = depth
                        .checked_sub(1)
                        .ok_or(format!("unbalanced ')' in {s:?}"))?
                }
                ',' if depth == 0 => {
                    terms.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        if depth != 0 {
            return Err(format!("unbalanced '(' in {s:?}"));
        }
        terms.push(&s[start..]);
        terms
            .into_iter()
            .map(parse_requirement)
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| r.matches(labels))
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub fn matches_object(&self, object: &Value) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let labels: BTreeMap<String, String> = object["metadata"]["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        self.matches(&labels)
    }
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    let term = term.trim();
    if term.is_empty() {
        return Err("found '', expected: !, identifier, or 'end of string'".into());
    }
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        check_key(key)?;
        return Ok(Requirement::DoesNotExist(key.to_owned()));
    }
    let key_end = term
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/')))
        .unwrap_or(term.len());
    let key = &term[..key_end];
    check_key(key)?;
    let rest = term[key_end..].trim_start();
    if rest.is_empty() {
        return Ok(Requirement::Exists(key.to_owned()));
    }
    let value = |v: &str| -> Result<String, String> {
        let v = v.trim();
        check_value(v)?;
        Ok(v.to_owned())
    };
    if let Some(v) = rest.strip_prefix("==") {
        return Ok(Requirement::Equals(key.to_owned(), value(v)?));
    }
    if let Some(v) = rest.strip_prefix("!=") {
        return Ok(Requirement::NotEquals(key.to_owned(), value(v)?));
    }
    if let Some(v) = rest.strip_prefix('=') {
        return Ok(Requirement::Equals(key.to_owned(), value(v)?));
    }
    for (word, not) in [("notin", true), ("in", false)] {
        let Some(after) = rest.strip_prefix(word) else {
            continue;
        };
        if !after.starts_with(|c: char| c == '(' || c.is_whitespace()) {
            continue;
        }
        let set = after.trim();
        let inner = set
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix(')'))
            .ok_or_else(|| format!("found {set:?}, expected: '(' values ')'"))?;
        let values: BTreeSet<String> = inner.split(',').map(value).collect::<Result<_, _>>()?;
        if inner.trim().is_empty() {
            return Err(format!("for '{word}' operator, values set can't be empty"));
        }
        return Ok(if not {
            Requirement::NotIn(key.to_owned(), values)
        } else {
            Requirement::In(key.to_owned(), values)
        });
    }
    Err(format!(
        "found {rest:?}, expected: in, notin, =, ==, !=, or end of string"
    ))
}

/// A label key as the API server accepts it ([`kube_names::label_key`]).
fn check_key(key: &str) -> Result<(), String> {
    kube_names::label_key(key).map_err(|_| format!("invalid label key {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"))
}

/// A label value as the API server accepts it ([`kube_names::is_label_value`]).
fn check_value(v: &str) -> Result<(), String> {
    if kube_names::is_label_value(v) {
        Ok(())
    } else {
        Err(format!("invalid label value: {v:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"))
    }
}

/// One term of a field selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldTerm {
    /// The dotted field path (`spec.nodeName`).
    pub field: String,
    /// `=`/`==` (true) or `!=` (false).
    pub equals: bool,
    /// The value.
    pub value: String,
}

/// A field selector: `path=v`, `path==v`, `path!=v`, joined by commas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<FieldTerm>);

impl FieldSelector {
    /// Parses a field selector.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        s.split(',')
            .map(|t| {
                let t = t.trim();
                let (field, equals, value) = if let Some((f, v)) = t.split_once("!=") {
                    (f, false, v)
                } else if let Some((f, v)) = t.split_once("==") {
                    (f, true, v)
                } else if let Some((f, v)) = t.split_once('=') {
                    (f, true, v)
                } else {
                    return Err(format!("invalid selector: '{s}'; can't understand '{t}'"));
                };
                Ok(FieldTerm {
                    field: field.trim().to_owned(),
                    equals,
                    value: value.trim().to_owned(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// Whether `object` satisfies every term (a missing field is the empty string).
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|t| {
            let mut v = object;
            for part in t.field.split('.') {
                v = &v[part];
            }
            let actual = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (actual == t.value) == t.equals
        })
    }
}

#[cfg(test)]
mod tests;
