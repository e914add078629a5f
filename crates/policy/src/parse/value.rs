//! Typed access to YAML values that reports every problem with its field path.

use serde_yaml_ng::{Mapping, Value};

use crate::diag::Sink;

/// What a YAML value is, for messages.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// `parent.field`, or `field` at the root.
pub(crate) fn join(parent: &str, field: &str) -> String {
    if parent.is_empty() {
        field.to_owned()
    } else {
        format!("{parent}.{field}")
    }
}

/// `parent[i]`.
pub(crate) fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// The fields of a mapping, checked against the ones the caller knows.
pub(crate) struct Fields<'v> {
    map: &'v Mapping,
}

impl<'v> Fields<'v> {
    /// A field's value; `None` when absent or null (as Kubernetes treats them).
    pub(crate) fn get(&self, name: &str) -> Option<&'v Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// Whether the field is present and not null.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

/// Reads `v` as a mapping whose keys must be in `known` (a key of `ignored` is accepted and
/// skipped). Unknown keys are errors: a typo must never silently drop a rule.
pub(crate) fn fields<'v>(
    sink: &mut Sink<'_>,
    v: &'v Value,
    path: &str,
    known: &[&str],
) -> Option<Fields<'v>> {
    let Value::Mapping(map) = v else {
        sink.error(path, format!("expected a mapping, found {}", type_name(v)));
        return None;
    };
    for key in map.keys() {
        match key.as_str() {
            Some(k) if known.contains(&k) => {}
            Some(k) => sink.error(
                &join(path, k),
                format!("unknown field (expected one of: {})", known.join(", ")),
            ),
            None => sink.error(
                path,
                format!("field names must be strings, found {}", type_name(key)),
            ),
        }
    }
    Some(Fields { map })
}

/// Reads `v` as a list.
pub(crate) fn list<'v>(sink: &mut Sink<'_>, v: &'v Value, path: &str) -> Option<&'v [Value]> {
    match v {
        Value::Sequence(items) => Some(items),
        other => {
            sink.error(path, format!("expected a list, found {}", type_name(other)));
            None
        }
    }
}

/// Reads `v` as a string.
pub(crate) fn string<'v>(sink: &mut Sink<'_>, v: &'v Value, path: &str) -> Option<&'v str> {
    match v {
        Value::String(s) => Some(s),
        other => {
            sink.error(
                path,
                format!("expected a string, found {}", type_name(other)),
            );
            None
        }
    }
}

/// Reads `v` as a boolean.
pub(crate) fn boolean(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        other => {
            sink.error(
                path,
                format!("expected true or false, found {}", type_name(other)),
            );
            None
        }
    }
}

/// Reads a port number given as a number or a numeric string.
pub(crate) fn port(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<u16> {
    let parsed = match v {
        Value::Number(n) => n.as_u64().ok_or(()),
        Value::String(s) if s.chars().all(|c| c.is_ascii_digit()) && !s.is_empty() => {
            s.parse::<u64>().map_err(|_| ())
        }
        Value::String(s) if s.chars().any(|c| c.is_ascii_alphabetic()) => {
            sink.error(
                path,
                format!("named port {s:?} is not supported (dnsfence has no pod specs to resolve it); use a number"),
            );
            return None;
        }
        _ => Err(()),
    };
    match parsed {
        Ok(p) if p <= u64::from(u16::MAX) => u16::try_from(p).ok(),
        Ok(p) => {
            sink.error(path, format!("port {p} is out of range 0-65535"));
            None
        }
        Err(()) => {
            sink.error(
                path,
                format!("expected a port number 0-65535, found {}", show(v)),
            );
            None
        }
    }
}

/// A required field, or an error.
pub(crate) fn required<'v>(
    sink: &mut Sink<'_>,
    f: &Fields<'v>,
    name: &str,
    path: &str,
) -> Option<&'v Value> {
    let v = f.get(name);
    if v.is_none() {
        sink.error(path, "missing field");
    }
    v
}

/// Exactly one of `names` is set: its name and value.
pub(crate) fn exactly_one<'v>(
    sink: &mut Sink<'_>,
    f: &Fields<'v>,
    path: &str,
    names: &[&'static str],
) -> Option<(&'static str, &'v Value)> {
    let set: Vec<(&'static str, &'v Value)> = names
        .iter()
        .filter_map(|n| f.get(n).map(|v| (*n, v)))
        .collect();
    match set.as_slice() {
        [one] => Some(*one),
        [] => {
            sink.error(
                path,
                format!(
                    "exactly one of {} is required, found none",
                    names.join(", ")
                ),
            );
            None
        }
        [a, b, ..] => {
            sink.error(
                path,
                format!(
                    "exactly one of {} is allowed, found {} and {}",
                    names.join(", "),
                    a.0,
                    b.0
                ),
            );
            None
        }
    }
}

/// A list of 1 to `max` items.
pub(crate) fn bounded_list<'v>(
    sink: &mut Sink<'_>,
    v: &'v Value,
    path: &str,
    max: usize,
) -> Option<&'v [Value]> {
    let items = list(sink, v, path)?;
    if items.is_empty() {
        sink.error(path, "must have at least one item");
        return None;
    }
    if too_many(sink, items, path, max) {
        return None;
    }
    Some(items)
}

/// Reports a list longer than `max` items.
pub(crate) fn too_many(sink: &mut Sink<'_>, items: &[Value], path: &str, max: usize) -> bool {
    let over = items.len() > max;
    if over {
        sink.error(
            path,
            format!("has {} items, at most {max} are allowed", items.len()),
        );
    }
    over
}

/// An integer in `min..=max`.
pub(crate) fn integer(
    sink: &mut Sink<'_>,
    v: &Value,
    path: &str,
    min: u16,
    max: u16,
) -> Option<u16> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        _ => None,
    };
    match n.and_then(|n| u16::try_from(n).ok()) {
        Some(n) if (min..=max).contains(&n) => Some(n),
        _ => {
            sink.error(
                path,
                format!("expected an integer {min}-{max}, found {}", show(v)),
            );
            None
        }
    }
}

/// A short rendering of a scalar for messages.
pub(crate) fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => type_name(other).to_owned(),
    }
}
