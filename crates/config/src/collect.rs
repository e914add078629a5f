//! Reads a configuration document into typed sections and finds every problem in one go.
//!
//! Each section is plain serde data with `deny_unknown_fields`, owned by the crate it
//! configures; nothing here knows their keys. Serde stops at the first problem, so the
//! document is read again after each one, without the value at fault (its field falls
//! back to its default), until it reads: every unknown key, missing field and bad value is
//! reported, one line each, named by its path (`dns.transparent.port`,
//! `endpoints[2].lables`). The paths of values that did not read are kept, so that the
//! checks between values can skip what stands in for them.
//!
//! An element of a list of structs with an unknown key or a missing field is replaced by a
//! placeholder the caller gives (an endpoint without name or address, say), so that the
//! other elements keep their indices and the checks between elements (duplicate
//! addresses) still run; a bad value in an element only takes its field's default.

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use serde_yaml_ng::{Mapping, Value};

/// The most rounds one document takes (each finds one problem).
const MAX_ROUNDS: usize = 1000;

/// What reading a document found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Problems {
    /// One line per problem, each starting with the path of the key at fault.
    pub lines: Vec<String>,
    /// The paths whose values did not read (their defaults stand in).
    failed: Vec<String>,
}

impl Problems {
    /// Records `message` about `path`.
    pub fn push(&mut self, path: &str, message: impl std::fmt::Display) {
        self.lines.push(format!("{path}: {message}"));
    }

    /// Whether the value at `path` (and everything above it) was read as written: checks
    /// involving a value that fell back to its default are skipped.
    pub fn parsed(&self, path: &str) -> bool {
        !self.failed.iter().any(|f| {
            path == f
                || path
                    .strip_prefix(f.as_str())
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Key(String),
    Index(usize),
}

fn show(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Reads `doc` as a `T`, reporting every problem. `placeholders` names lists of structs
/// (by their path, `endpoints`) and the value that stands in for an element with a
/// problem. `None` when the document cannot be read even without its bad values.
pub fn read<T: DeserializeOwned>(
    doc: Value,
    placeholders: &[(&str, Value)],
) -> (Option<T>, Problems) {
    let mut problems = Problems::default();
    let mut doc = match doc {
        Value::Null => Value::Mapping(Mapping::new()),
        other => other,
    };
    drop_non_string_keys(&mut doc, &mut Vec::new(), &mut problems);
    // Paths removed because their values were bad: a "missing field" for one of them is
    // the same problem again.
    let mut removed: BTreeSet<Vec<Step>> = BTreeSet::new();
    // Elements of placeholder lists that had a problem: replaced once the rest reads.
    let mut tainted: BTreeSet<Vec<Step>> = BTreeSet::new();
    for _ in 0..MAX_ROUNDS {
        let err = match serde_path_to_error::deserialize::<_, T>(doc.clone()) {
            Ok(t) if tainted.is_empty() => return (Some(t), problems),
            Ok(_) => {
                for element in std::mem::take(&mut tainted) {
                    replace_with_placeholder(&mut doc, &element, placeholders);
                }
                continue;
            }
            Err(e) => e,
        };
        let path: Vec<Step> = err
            .path()
            .iter()
            .filter_map(|s| match s {
                Segment::Map { key } => Some(Step::Key(key.clone())),
                Segment::Seq { index } => Some(Step::Index(*index)),
                Segment::Enum { .. } | Segment::Unknown => None,
            })
            .collect();
        let message = err.inner().to_string();
        let kind = classify(&message);
        // An element with an unknown key or a missing field may be something else
        // entirely: the placeholder stands in for all of it. A bad value only takes its
        // field's default, and the rest of the element is still checked.
        let taints = !matches!(kind, Kind::Other);
        let target = match kind {
            Kind::Unknown { expected } => {
                problems.lines.push(format!(
                    "{}: unknown key (expected one of: {})",
                    show(&path),
                    expected.join(", ")
                ));
                path
            }
            Kind::Missing { field } => {
                let mut full = path.clone();
                full.push(Step::Key(field.clone()));
                if !removed.contains(&full) {
                    problems.lines.push(format!("{}: missing", show(&full)));
                }
                path
            }
            Kind::Other => {
                // Lists report each bad element on a line of its own that starts with
                // its index, maps each bad key on a line starting with `.KEY`: appended
                // to the path as they are.
                let at = show(&path);
                for line in message.lines() {
                    if line.starts_with('[') || line.starts_with('.') {
                        problems.lines.push(format!("{at}{line}"));
                    } else {
                        problems.push(&at, line);
                    }
                }
                path
            }
        };
        let target = field_of(target, placeholders);
        if target.is_empty() {
            return (None, problems);
        }
        if let Some(element) = element_of(&target, placeholders).filter(|_| taints) {
            tainted.insert(element);
        }
        problems.failed.push(show(&target));
        removed.insert(target.clone());
        if !remove(&mut doc, &target, placeholders) {
            return (None, problems);
        }
    }
    (None, problems)
}

/// The keys `T` takes at `path` (`["dns", "transparent"]`; `[]` for the top level; a
/// list's elements as `["endpoints", "[]"]`), as serde knows them: for documentation and
/// for tests that an example shows every key. `None` where `T` has no struct there (a
/// map with free keys, say).
pub fn keys_of<T: DeserializeOwned>(path: &[&str]) -> Option<Vec<String>> {
    let mut probe = Value::Mapping(Mapping::from_iter([(
        Value::from("__no_such_key__"),
        Value::from(0),
    )]));
    for step in path.iter().rev() {
        probe = if *step == "[]" {
            Value::Sequence(vec![probe])
        } else {
            Value::Mapping(Mapping::from_iter([(Value::from(*step), probe)]))
        };
    }
    let err = serde_path_to_error::deserialize::<_, T>(probe).err()?;
    match classify(&err.inner().to_string()) {
        Kind::Unknown { expected } => Some(expected),
        _ => None,
    }
}

/// What a serde error says.
enum Kind {
    /// An unknown key (the path names it), with the keys its struct takes.
    Unknown { expected: Vec<String> },
    /// A struct (the path) lacks this field.
    Missing { field: String },
    /// A value that does not read.
    Other,
}

fn classify(message: &str) -> Kind {
    let quoted: Vec<String> = message
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    if message.starts_with("unknown field") {
        Kind::Unknown {
            expected: quoted.into_iter().skip(1).collect(),
        }
    } else if message.starts_with("missing field") {
        match quoted.into_iter().next() {
            Some(field) => Kind::Missing { field },
            None => Kind::Other,
        }
    } else {
        Kind::Other
    }
}

/// The path to remove for a problem at `path`: an element of a list is removed with its
/// list, unless the list has a placeholder (its elements are replaced one by one).
fn field_of(mut path: Vec<Step>, placeholders: &[(&str, Value)]) -> Vec<Step> {
    while let Some(Step::Index(_)) = path.last() {
        let list = &path[..path.len() - 1];
        if placeholders.iter().any(|(p, _)| *p == show(list)) {
            break;
        }
        path.pop();
    }
    path
}

/// The element of a placeholder list that `path` is in, if any.
fn element_of(path: &[Step], placeholders: &[(&str, Value)]) -> Option<Vec<Step>> {
    (1..path.len()).find_map(|n| {
        let (list, rest) = path.split_at(n);
        matches!(rest.first(), Some(Step::Index(_)))
            .then_some(())
            .filter(|()| placeholders.iter().any(|(p, _)| *p == show(list)))
            .map(|()| path[..=n].to_vec())
    })
}

/// Removes the value at `path` (an element of a placeholder list is replaced instead, so
/// later elements keep their indices). False when there is nothing to remove.
fn remove(doc: &mut Value, path: &[Step], placeholders: &[(&str, Value)]) -> bool {
    let Some((last, parent)) = path.split_last() else {
        return false;
    };
    match (last, walk(doc, parent)) {
        (Step::Key(k), Some(Value::Mapping(m))) => m.remove(k.as_str()).is_some(),
        (Step::Index(_), Some(_)) => replace_with_placeholder(doc, path, placeholders),
        _ => false,
    }
}

fn replace_with_placeholder(
    doc: &mut Value,
    element: &[Step],
    placeholders: &[(&str, Value)],
) -> bool {
    let Some((_, list)) = element.split_last() else {
        return false;
    };
    let Some((_, placeholder)) = placeholders.iter().find(|(p, _)| *p == show(list)) else {
        return false;
    };
    match walk(doc, element) {
        Some(v) if v != placeholder => {
            *v = placeholder.clone();
            true
        }
        _ => false,
    }
}

fn walk<'a>(doc: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    let mut at = doc;
    for step in path {
        at = match (step, at) {
            (Step::Key(k), Value::Mapping(m)) => m.get_mut(k.as_str())?,
            (Step::Index(i), Value::Sequence(s)) => s.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(at)
}

/// Reports and removes every key that is not a string (serde could only say that some
/// key of some mapping is not).
fn drop_non_string_keys(v: &mut Value, path: &mut Vec<Step>, problems: &mut Problems) {
    match v {
        Value::Mapping(m) => {
            let bad: Vec<Value> = m.keys().filter(|k| !k.is_string()).cloned().collect();
            for k in bad {
                let shown = serde_yaml_ng::to_string(&k)
                    .map(|t| t.trim_end().to_owned())
                    .unwrap_or_default();
                let mut at = path.clone();
                at.push(Step::Key(shown));
                problems.push(&show(&at), "keys must be strings");
                m.remove(&k);
            }
            for (k, child) in m.iter_mut() {
                if let Some(k) = k.as_str() {
                    path.push(Step::Key(k.to_owned()));
                    drop_non_string_keys(child, path, problems);
                    path.pop();
                }
            }
        }
        Value::Sequence(s) => {
            for (i, child) in s.iter_mut().enumerate() {
                path.push(Step::Index(i));
                drop_non_string_keys(child, path, problems);
                path.pop();
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests;
