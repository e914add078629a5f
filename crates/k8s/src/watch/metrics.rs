//! The Kubernetes front end's metrics ([`Metrics`], `k8s_*`): watch errors by resource,
//! rejected policies and the Events about them, sync state, endpoints, views published.
//!
//! Handles only: the controller increments them; registering is [`Metrics::register`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabel {
    resource: String,
}

/// The Kubernetes front end's metrics.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    watch_errors: Family<ResourceLabel, Counter>,
    pub(super) rejections: Counter,
    pub(super) invalid: Gauge,
    pub(super) events: Counter,
    pub(super) events_suppressed: Counter,
    pub(super) synced: Gauge,
    pub(super) endpoints: Gauge,
    pub(super) host_network: Gauge,
    pub(super) publishes: Counter,
}

impl Metrics {
    /// Registers them under `k8s_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("k8s");
        r.register(
            "watch_errors",
            "Errors of the Kubernetes watches by resource (the last state stays in force)",
            self.watch_errors.clone(),
        );
        r.register(
            "policy_rejections",
            "Policy object versions rejected as invalid (the previous valid version stays in force)",
            self.rejections.clone(),
        );
        r.register(
            "invalid_policies",
            "Policy objects whose latest version is invalid",
            self.invalid.clone(),
        );
        r.register(
            "events",
            "Kubernetes Events posted about invalid policies",
            self.events.clone(),
        );
        r.register(
            "events_suppressed",
            "Events not posted: over the rate limit, or the API refused them",
            self.events_suppressed.clone(),
        );
        r.register(
            "synced",
            "1 once every watch has listed (before that nothing is reconciled)",
            self.synced.clone(),
        );
        r.register(
            "endpoints",
            "Endpoints from Kubernetes (this node's pods and peer pods)",
            self.endpoints.clone(),
        );
        r.register(
            "host_network_pods",
            "This node's host-network pods, which dnsfence never enforces",
            self.host_network.clone(),
        );
        r.register(
            "view_updates",
            "Cluster views handed to the agent",
            self.publishes.clone(),
        );
    }

    pub(super) fn error(&self, resource: &str) {
        self.watch_errors
            .get_or_create(&ResourceLabel {
                resource: resource.to_owned(),
            })
            .inc();
    }
}
