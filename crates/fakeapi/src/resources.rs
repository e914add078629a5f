//! The resources the fake serves ([`RESOURCES`]): plural, group, version, kind, scope, and
//! the few facts about each that requests depend on (its `apiVersion`, whether it is
//! built in or needs a CRD, which fields a field selector may name).
//!
//! Pure data: no state, no I/O.

/// A resource the server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResourceType {
    pub(crate) plural: &'static str,
    pub(crate) group: &'static str,
    pub(crate) version: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) namespaced: bool,
}

const RESOURCES: &[ResourceType] = &[
    ResourceType {
        plural: "pods",
        group: "",
        version: "v1",
        kind: "Pod",
        namespaced: true,
    },
    ResourceType {
        plural: "services",
        group: "",
        version: "v1",
        kind: "Service",
        namespaced: true,
    },
    ResourceType {
        plural: "namespaces",
        group: "",
        version: "v1",
        kind: "Namespace",
        namespaced: false,
    },
    ResourceType {
        plural: "egresspolicies",
        group: "dnsfence.io",
        version: "v1alpha1",
        kind: "EgressPolicy",
        namespaced: true,
    },
    ResourceType {
        plural: "clusteregresspolicies",
        group: "dnsfence.io",
        version: "v1alpha1",
        kind: "ClusterEgressPolicy",
        namespaced: false,
    },
    ResourceType {
        plural: "ciliumnetworkpolicies",
        group: "cilium.io",
        version: "v2",
        kind: "CiliumNetworkPolicy",
        namespaced: true,
    },
    ResourceType {
        plural: "ciliumclusterwidenetworkpolicies",
        group: "cilium.io",
        version: "v2",
        kind: "CiliumClusterwideNetworkPolicy",
        namespaced: false,
    },
    ResourceType {
        plural: "customresourcedefinitions",
        group: "apiextensions.k8s.io",
        version: "v1",
        kind: "CustomResourceDefinition",
        namespaced: false,
    },
    ResourceType {
        plural: "events",
        group: "events.k8s.io",
        version: "v1",
        kind: "Event",
        namespaced: true,
    },
];

impl ResourceType {
    pub(crate) fn find(plural: &str) -> Option<&'static ResourceType> {
        RESOURCES.iter().find(|r| r.plural == plural)
    }

    pub(crate) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Built into Kubernetes (served without a CRD; list items carry no type).
    pub(crate) fn builtin(&self) -> bool {
        self.group.is_empty() || self.group.ends_with("k8s.io")
    }

    /// The CRD that serves it.
    pub(crate) fn crd_name(&self) -> String {
        format!("{}.{}", self.plural, self.group)
    }

    /// `pods` or `egresspolicies.dnsfence.io`, as error messages name it.
    pub(crate) fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The fields the real server accepts in field selectors for this resource.
    pub(crate) fn selectable_field(&self, field: &str) -> bool {
        if matches!(field, "metadata.name" | "metadata.namespace") {
            return true;
        }
        match self.plural {
            "pods" => matches!(
                field,
                "spec.nodeName"
                    | "spec.restartPolicy"
                    | "spec.schedulerName"
                    | "spec.serviceAccountName"
                    | "spec.hostNetwork"
                    | "status.phase"
                    | "status.podIP"
                    | "status.podIPs"
                    | "status.nominatedNodeName"
            ),
            "namespaces" => field == "status.phase",
            "services" => matches!(field, "spec.clusterIP" | "spec.type"),
            _ => false,
        }
    }
}
