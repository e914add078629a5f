//! The store: objects by (resource, namespace, name), the global resource version and the
//! history of every change, from which watches replay and exact lists are rebuilt.
//! [`store`] is the one way an object is created or updated; it sets what the real server
//! sets (`uid`, `resourceVersion`, `creationTimestamp`, `generation`, `managedFields`).
//!
//! No I/O and no locking: callers hold the lock on [`State`] and wake the watches.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::resources::ResourceType;

/// The kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One change in the history log.
#[derive(Debug, Clone)]
pub(crate) struct HistoryEntry {
    pub(crate) rv: u64,
    pub(crate) resource: &'static str,
    pub(crate) change: ChangeType,
    /// The object after the change (the last state for a deletion).
    pub(crate) object: Value,
    /// The object before a modification.
    pub(crate) previous: Option<Value>,
}

/// (resource, namespace or "", name).
pub(crate) type Key = (&'static str, String, String);

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) rv: u64,
    pub(crate) objects: BTreeMap<Key, Value>,
    pub(crate) history: Vec<HistoryEntry>,
    /// Watches and exact lists from versions before this one get 410.
    pub(crate) compacted: u64,
    /// Bumped to end every open watch.
    pub(crate) epoch: u64,
    pub(crate) down: bool,
    pub(crate) shutdown: bool,
    pub(crate) forbidden: BTreeSet<String>,
    pub(crate) posted: Vec<Value>,
    pub(crate) requests: Vec<String>,
    uids: u64,
}

/// Stores `object` (create or update) and logs the change; `Err` names what is wrong.
pub(crate) fn store(
    state: &mut State,
    rt: &'static ResourceType,
    mut object: Value,
) -> Result<Value, String> {
    let Some(obj) = object.as_object_mut() else {
        return Err("an object must be a JSON object".into());
    };
    let api_version = rt.api_version();
    match obj.get("apiVersion").and_then(Value::as_str) {
        None => {
            obj.insert("apiVersion".into(), json!(api_version));
        }
        Some(v) if v == api_version => {}
        Some(v) => return Err(format!("apiVersion {v:?} is not {api_version:?}")),
    }
    match obj.get("kind").and_then(Value::as_str) {
        None => {
            obj.insert("kind".into(), json!(rt.kind));
        }
        Some(k) if k == rt.kind => {}
        Some(k) => return Err(format!("kind {k:?} is not {:?}", rt.kind)),
    }
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or("metadata must be an object")?;
    if meta.get("name").and_then(Value::as_str).is_none() {
        let Some(prefix) = meta.get("generateName").and_then(Value::as_str) else {
            return Err("metadata.name or metadata.generateName is required".into());
        };
        state.uids += 1;
        let name = format!("{prefix}{:05x}", state.uids);
        meta.insert("name".into(), json!(name));
    }
    let name = meta["name"].as_str().unwrap_or_default().to_owned();
    let namespace = if rt.namespaced {
        let ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        meta.insert("namespace".into(), json!(ns));
        ns
    } else {
        meta.remove("namespace");
        String::new()
    };
    let key: Key = (rt.plural, namespace, name);
    let old = state.objects.get(&key).cloned();
    if let Some(old) = &old {
        if without_server_fields(old) == without_server_fields(&object) {
            return Ok(old.clone());
        }
    }
    state.rv += 1;
    let rv = state.rv;
    let now = now_rfc3339();
    let uid = match &old {
        Some(o) => o["metadata"]["uid"].clone(),
        None => {
            state.uids += 1;
            json!(format!(
                "0f1e2d3c-{:04x}-4000-8000-{:012x}",
                state.uids & 0xffff,
                state.uids
            ))
        }
    };
    let spec_changed = old.as_ref().is_none_or(|o| {
        o.get("spec") != object.get("spec") || o.get("specs") != object.get("specs")
    });
    let generation = match &old {
        None => 1,
        Some(o) => o["metadata"]["generation"].as_i64().unwrap_or(1) + i64::from(spec_changed),
    };
    let created = old.as_ref().map_or_else(
        || json!(now),
        |o| o["metadata"]["creationTimestamp"].clone(),
    );
    let meta = &mut object["metadata"];
    meta["uid"] = uid;
    meta["resourceVersion"] = json!(rv.to_string());
    meta["creationTimestamp"] = created;
    if object.get("spec").is_some() || object.get("specs").is_some() {
        object["metadata"]["generation"] = json!(generation);
    }
    object["metadata"]["managedFields"] = json!([{
        "manager": "kubectl",
        "operation": "Update",
        "apiVersion": api_version,
        "time": now,
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {}}
    }]);
    state.history.push(HistoryEntry {
        rv,
        resource: rt.plural,
        change: if old.is_some() {
            ChangeType::Modified
        } else {
            ChangeType::Added
        },
        object: object.clone(),
        previous: old,
    });
    state.objects.insert(key, object.clone());
    Ok(object)
}

/// The object without what the server sets, to tell a real change from a no-op update.
fn without_server_fields(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
        ] {
            meta.remove(k);
        }
    }
    o
}

/// The objects of `rt` at version `rv`, rebuilt from the history.
pub(crate) fn snapshot_at(state: &State, rt: &ResourceType, rv: u64) -> Vec<Value> {
    let mut objects: BTreeMap<(String, String), Value> = BTreeMap::new();
    for e in state
        .history
        .iter()
        .take_while(|e| e.rv <= rv)
        .filter(|e| e.resource == rt.plural)
    {
        let meta = &e.object["metadata"];
        let key = (
            meta["namespace"].as_str().unwrap_or_default().to_owned(),
            meta["name"].as_str().unwrap_or_default().to_owned(),
        );
        match e.change {
            ChangeType::Deleted => {
                objects.remove(&key);
            }
            _ => {
                objects.insert(key, e.object.clone());
            }
        }
    }
    objects.into_values().collect()
}

pub(crate) fn current(state: &State, rt: &ResourceType) -> Vec<Value> {
    state
        .objects
        .range((rt.plural, String::new(), String::new())..)
        .take_while(|((r, _, _), _)| *r == rt.plural)
        .map(|(_, o)| o.clone())
        .collect()
}

/// Now as RFC 3339 (UTC, seconds), as Kubernetes writes timestamps.
pub(crate) fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let days = i64::try_from(secs / 86_400).unwrap_or_default();
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(now_rfc3339().len(), 20);
    }
}
