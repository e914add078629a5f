//! One watcher's objects: [`Change`] (a watcher event) applied to a [`Store`], with the
//! re-list rule (objects absent from a new list go at its end, never before).
//!
//! Generic over key and value: it knows nothing of pods or policies.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;

use super::PodInfo;

/// One watcher event, as `kube`'s watcher reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<T> {
    /// Created or modified.
    Apply(T),
    /// Deleted.
    Delete(T),
    /// A (re-)list starts.
    Init,
    /// An object of the list.
    InitApply(T),
    /// The list is complete: objects it did not name are gone.
    InitDone,
}

/// A store that applies a watcher's events; see the module docs for re-lists.
#[derive(Debug, Clone)]
pub(super) struct Store<K: Ord, T> {
    pub(super) items: BTreeMap<K, T>,
    listing: Option<BTreeSet<K>>,
    pub(super) synced: bool,
}

impl<K: Ord, T> Default for Store<K, T> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            listing: None,
            synced: false,
        }
    }
}

impl<K: Ord + Clone, T: PartialEq> Store<K, T> {
    /// Applies `change` (already keyed); returns whether what the store holds changed,
    /// or it became synced.
    pub(super) fn apply(&mut self, change: Change<(K, T)>) -> bool {
        match change {
            Change::Init => {
                self.listing = Some(BTreeSet::new());
                false
            }
            Change::InitApply((k, v)) => {
                if let Some(seen) = &mut self.listing {
                    seen.insert(k.clone());
                }
                self.upsert(k, v)
            }
            Change::Apply((k, v)) => self.upsert(k, v),
            Change::Delete((k, _)) => self.items.remove(&k).is_some(),
            Change::InitDone => {
                let first = !self.synced;
                self.synced = true;
                let Some(seen) = self.listing.take() else {
                    return first;
                };
                let before = self.items.len();
                self.items.retain(|k, _| seen.contains(k));
                first || before != self.items.len()
            }
        }
    }

    fn upsert(&mut self, k: K, v: T) -> bool {
        if self.items.get(&k) == Some(&v) {
            return false;
        }
        self.items.insert(k, v);
        true
    }
}

pub(super) fn map_change<T, U>(change: Change<T>, f: impl Fn(T) -> Option<U>) -> Option<Change<U>> {
    Some(match change {
        Change::Apply(t) => Change::Apply(f(t)?),
        Change::Delete(t) => Change::Delete(f(t)?),
        Change::InitApply(t) => Change::InitApply(f(t)?),
        Change::Init => Change::Init,
        Change::InitDone => Change::InitDone,
    })
}

pub(super) fn keyed_pod(change: Change<Pod>) -> Option<Change<((String, String), PodInfo)>> {
    map_change(change, |pod: Pod| {
        let info = PodInfo::from_pod(&pod)?;
        Some((info.key(), info))
    })
}
