//! Warning Events about rejected policies: the rate limit ([`EVENTS_PER_MINUTE`], a
//! token bucket) and the object reference an Event names.
//!
//! It posts nothing itself: the controller does, through kube's recorder.

use std::time::Instant;

use k8s_openapi::api::core::v1::ObjectReference;

use crate::cluster::Rejection;

/// At most this many Events a minute, whatever the number of invalid objects.
pub const EVENTS_PER_MINUTE: u32 = 30;

/// A token bucket for Events.
pub(super) struct EventBudget {
    pub(super) tokens: f64,
    pub(super) at: Instant,
}

impl EventBudget {
    pub(super) fn take(&mut self) -> bool {
        let per_sec = f64::from(EVENTS_PER_MINUTE) / 60.0;
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * per_sec)
            .min(f64::from(EVENTS_PER_MINUTE));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub(super) fn reference(r: &Rejection) -> ObjectReference {
    ObjectReference {
        api_version: Some(r.source.api_version().to_owned()),
        kind: Some(r.source.kind().to_owned()),
        name: Some(r.name.clone()),
        namespace: r.namespace.clone(),
        uid: r.uid.clone(),
        // Per version: kube's recorder folds Events of one reference into a series and
        // keeps the first note, so each rejected version gets its own.
        resource_version: r.resource_version.clone(),
        ..Default::default()
    }
}
