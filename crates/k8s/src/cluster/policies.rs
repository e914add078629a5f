//! Policy objects: each validated alone by the policy engine; the last valid version
//! stays in force while a newer one is invalid, and an invalid version is reported once
//! ([`Rejection`]).
//!
//! No I/O: the Events are [`crate::watch`]'s to post.

use std::collections::BTreeSet;

use dnsfence_policy::PolicyDoc;
use dnsfence_policy::{Policy, PolicyLoader};
use serde_json::{json, Value};

use super::{Change, ClusterState, PolicySource};

/// An invalid version of a policy object, to report as a Kubernetes Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Its kind.
    pub source: PolicySource,
    /// Namespace (namespaced kinds).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.resourceVersion` of the rejected version.
    pub resource_version: Option<String>,
    /// Every error, each naming its field (`spec.egress[0].toPorts[0]...: why`).
    pub problems: Vec<String>,
    /// Whether an earlier valid version stays in force.
    pub previous_in_force: bool,
}

impl Rejection {
    /// The Event's note: the first problems, then how many more.
    pub fn note(&self) -> String {
        let mut note = String::new();
        for p in self.problems.iter().take(3) {
            if !note.is_empty() {
                note.push_str("; ");
            }
            note.push_str(p);
        }
        if self.problems.len() > 3 {
            note.push_str(&format!("; and {} more", self.problems.len() - 3));
        }
        note.push_str(if self.previous_in_force {
            " (the previous valid version stays in force)"
        } else {
            " (not enforced)"
        });
        // Events notes are limited to 1 kB.
        if note.len() > 1000 {
            let mut end = 997;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        note
    }
}

pub(super) type PolicyKey = (PolicySource, Option<String>, String);

/// A policy object: its last valid version and whether the latest one is invalid.
#[derive(Debug, Clone)]
pub(super) struct PolicyEntry {
    /// `metadata.uid` of the object: a new object of the same name starts afresh.
    uid: Option<String>,
    pub(super) valid: Option<(PolicyDoc, Vec<Policy>)>,
    /// Problems of the latest version (empty: it is the valid one).
    problems: Vec<String>,
    /// (uid, generation) of the latest version that was reported.
    reported: Option<(Option<String>, Option<i64>)>,
}

impl ClusterState {
    /// Applies an event of a policy watcher: `object` is the object's JSON. Returns
    /// whether the policies in force changed.
    pub fn policy(&mut self, source: PolicySource, change: Change<Value>) -> bool {
        match change {
            Change::Init => {
                self.policy_listing.insert(source, BTreeSet::new());
                false
            }
            Change::InitDone => {
                let first = self.policy_synced.insert(source);
                let Some(seen) = self.policy_listing.remove(&source) else {
                    return first;
                };
                let gone: Vec<PolicyKey> = self
                    .policies
                    .keys()
                    .filter(|k| k.0 == source && !seen.contains(*k))
                    .cloned()
                    .collect();
                let mut changed = first;
                for k in gone {
                    changed |= self.remove_policy(&k);
                }
                changed
            }
            Change::Delete(object) => match policy_key(source, &object) {
                Some(k) => self.remove_policy(&k),
                None => false,
            },
            Change::Apply(object) | Change::InitApply(object) => {
                let Some(k) = policy_key(source, &object) else {
                    return false;
                };
                if let Some(seen) = self.policy_listing.get_mut(&source) {
                    seen.insert(k.clone());
                }
                self.upsert_policy(source, k, &object)
            }
        }
    }

    fn remove_policy(&mut self, k: &PolicyKey) -> bool {
        self.policies.remove(k).is_some_and(|e| e.valid.is_some())
    }

    fn upsert_policy(&mut self, source: PolicySource, k: PolicyKey, object: &Value) -> bool {
        let doc = PolicyDoc {
            file: format!(
                "{}/{}",
                source.kind(),
                match &k.1 {
                    Some(ns) => format!("{ns}/{}", k.2),
                    None => k.2.clone(),
                }
            ),
            text: serde_json::to_string(&essentials(source, object)).unwrap_or_default(),
        };
        let mut loader = PolicyLoader::new();
        loader.add(&doc.file, &doc.text);
        let problems: Vec<String> = loader
            .diagnostics()
            .iter()
            .filter(|d| d.is_error())
            .map(|d| format!("{}: {}", d.path, d.message))
            .collect();
        let uid = object["metadata"]["uid"].as_str().map(str::to_owned);
        let entry = self.policies.entry(k.clone()).or_insert(PolicyEntry {
            uid: uid.clone(),
            valid: None,
            problems: Vec::new(),
            reported: None,
        });
        if entry.uid != uid {
            // Deleted and created again while the watch was away: the old object's
            // rules are not a previous version of this one.
            *entry = PolicyEntry {
                uid,
                valid: None,
                problems: Vec::new(),
                reported: None,
            };
        }
        if problems.is_empty() {
            let (set, _) = loader.finish_after(&dnsfence_policy::PolicySet::default());
            let parsed: Vec<Policy> = set.policies().iter().map(|p| (**p).clone()).collect();
            let changed = entry.valid.as_ref().is_none_or(|(d, _)| d.text != doc.text);
            entry.valid = Some((doc, parsed));
            entry.problems.clear();
            entry.reported = None;
            return changed;
        }
        let meta = &object["metadata"];
        let version = (
            meta["uid"].as_str().map(str::to_owned),
            meta["generation"].as_i64(),
        );
        if entry.problems != problems || entry.reported.as_ref() != Some(&version) {
            if entry.reported.as_ref() != Some(&version) {
                self.rejections.push(Rejection {
                    source,
                    namespace: k.1.clone(),
                    name: k.2.clone(),
                    uid: version.0.clone(),
                    generation: version.1,
                    resource_version: meta["resourceVersion"].as_str().map(str::to_owned),
                    problems: problems.clone(),
                    previous_in_force: entry.valid.is_some(),
                });
            }
            entry.reported = Some(version);
            entry.problems = problems;
        }
        false
    }

    /// Rejections found since the last call, to report.
    pub fn take_rejections(&mut self) -> Vec<Rejection> {
        std::mem::take(&mut self.rejections)
    }

    /// Policy objects whose latest version is invalid.
    pub fn invalid_policies(&self) -> usize {
        self.policies
            .values()
            .filter(|e| !e.problems.is_empty())
            .count()
    }

    /// The valid policy documents in force.
    pub fn policy_docs(&self) -> Vec<PolicyDoc> {
        self.policies
            .values()
            .filter_map(|e| e.valid.as_ref().map(|(d, _)| d.clone()))
            .collect()
    }
}

fn policy_key(source: PolicySource, object: &Value) -> Option<PolicyKey> {
    let meta = &object["metadata"];
    let name = meta["name"].as_str()?.to_owned();
    let namespace = if source.namespaced() {
        Some(meta["namespace"].as_str().unwrap_or("default").to_owned())
    } else {
        None
    };
    Some((source, namespace, name))
}

/// What the policy engine reads of an object: kind and apiVersion (those of the watched
/// resource: list items carry none), name, namespace,
/// annotations and the spec(s); `managedFields` and the like stay out of snapshots.
fn essentials(source: PolicySource, object: &Value) -> Value {
    let meta = &object["metadata"];
    let mut metadata = json!({"name": meta["name"]});
    if source.namespaced() {
        metadata["namespace"] = meta["namespace"].clone();
    }
    if let Some(a) = meta.get("annotations").filter(|a| !a.is_null()) {
        metadata["annotations"] = a.clone();
    }
    let mut out = json!({
        "apiVersion": source.api_version(),
        "kind": source.kind(),
        "metadata": metadata,
    });
    for key in ["spec", "specs"] {
        if let Some(v) = object.get(key).filter(|v| !v.is_null()) {
            out[key] = v.clone();
        }
    }
    out
}
