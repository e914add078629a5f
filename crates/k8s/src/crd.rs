//! The `dnsfence.io/v1alpha1` custom resources, `EgressPolicy` (namespaced) and
//! `ClusterEgressPolicy` (cluster-wide), typed so that their CRDs come out of Rust.
//!
//! The types describe the schema only: the agent reads policy objects as JSON and hands
//! them to the policy engine, which names every bad field. The schema rejects at
//! admission what OpenAPI can express (name characters and lengths, ports, protocols,
//! entities, selector operators), and it **never prunes**: every object keeps unknown
//! fields (`x-kubernetes-preserve-unknown-fields`), so a field dnsfence does not enforce
//! (`toServices`, an L7 `http` rule, a typo) reaches the engine and rejects the object
//! with an Event rather than disappearing and widening the policy. The fields Cilium
//! knows and dnsfence refuses are declared empty (`maxItems: 0` and the like, with the
//! engine's reason as description), so the API server refuses them at admission.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The API group.
pub const GROUP: &str = "dnsfence.io";
/// The served version.
pub const VERSION: &str = "v1alpha1";

/// `spec` of both kinds: the CiliumNetworkPolicy egress dialect.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The endpoints (pods) this policy applies to; `{}` selects all of the namespace
    /// (or of the cluster, for `ClusterEgressPolicy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_selector: Option<Selector>,
    /// Allow rules. An endpoint selected by any egress rule is default-deny for egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
    /// Deny rules; they win over allow rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_deny: Option<Vec<EgressRule>>,
    /// Whether selected endpoints become default-deny (as in Cilium).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_default_deny: Option<DefaultDeny>,
    /// Ingress rules are accepted for compatibility and not enforced (a warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_list")]
    pub ingress: Option<Vec<Value>>,
    /// Ingress deny rules: accepted, not enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_list")]
    pub ingress_deny: Option<Vec<Value>>,
}

/// `enableDefaultDeny`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DefaultDeny {
    /// Egress default-deny for selected endpoints (default true when egress rules exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
    /// Ingress (not enforced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<bool>,
}

/// A label selector; keys may carry Cilium's `k8s:`/`any:` source prefix.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    /// Labels that must be equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Requirements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_expressions: Option<Vec<Requirement>>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Requirement {
    /// The label key.
    #[schemars(length(min = 1))]
    pub key: String,
    /// In, NotIn, Exists or DoesNotExist.
    #[schemars(schema_with = "operator")]
    pub operator: String,
    /// Values for In and NotIn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

/// An `egress` or `egressDeny` rule: one kind of L3 peer, optionally narrowed by ports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Names; IPs are learned from the pod's own DNS answers.
    #[serde(default, rename = "toFQDNs", skip_serializing_if = "Option::is_none")]
    pub to_fqdns: Option<Vec<NameMatch>>,
    /// Other endpoints, by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<Selector>>,
    /// CIDRs.
    #[serde(default, rename = "toCIDR", skip_serializing_if = "Option::is_none")]
    pub to_cidr: Option<Vec<String>>,
    /// CIDRs with exceptions.
    #[serde(default, rename = "toCIDRSet", skip_serializing_if = "Option::is_none")]
    pub to_cidr_set: Option<Vec<CidrSet>>,
    /// Entities: world, world-ipv4, world-ipv6, cluster, host, all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "entities")]
    pub to_entities: Option<Vec<String>>,
    /// Ports and DNS rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
}

/// `matchName` or `matchPattern` (exactly one).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NameMatch {
    /// An exact name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[-a-zA-Z0-9_.]+$"))]
    pub match_name: Option<String>,
    /// A pattern: `*` within one label, a leading `**.` for any depth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[-a-zA-Z0-9_.*]+$"))]
    pub match_pattern: Option<String>,
}

/// A `toCIDRSet` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CidrSet {
    /// The CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// CIDRs inside it that stay excluded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<Vec<String>>,
}

/// A `toPorts` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PortRule {
    /// Ports; none means every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortProtocol>>,
    /// L7 rules: only `dns` is enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<L7Rules>,
}

/// A port, a range and a protocol.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortProtocol {
    /// The port: a number, or the number as a string as Cilium writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "port")]
    pub port: Option<Value>,
    /// The last port of a range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub end_port: Option<i32>,
    /// TCP, UDP, SCTP or ANY (default ANY).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "protocol")]
    pub protocol: Option<String>,
}

/// `rules`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct L7Rules {
    /// The names pods may resolve through this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<NameMatch>>,
}

fn free_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
    })
}

fn string_enum(values: &[&str]) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "enum": values})
}

fn operator(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_enum(&["In", "NotIn", "Exists", "DoesNotExist"])
}

fn protocol(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_enum(&["TCP", "UDP", "SCTP", "ANY"])
}

fn entities(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "string", "enum": ["world", "world-ipv4", "world-ipv6", "cluster", "host", "all"]},
    })
}

fn port(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        "description": "A port number, 0 to 65535.",
    })
}

/// `EgressPolicy`'s spec: the policy, in CiliumNetworkPolicy's egress dialect.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "dnsfence.io",
    version = "v1alpha1",
    kind = "EgressPolicy",
    plural = "egresspolicies",
    namespaced,
    shortname = "egp",
    doc = "Egress policy for the pods of one namespace, in CiliumNetworkPolicy's egress dialect.",
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".spec.endpointSelector"}"#,
    printcolumn = r#"{"name":"Audit","type":"string","jsonPath":".metadata.annotations.dnsfence\\.io/audit"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct EgressPolicySpec {
    /// The policy.
    #[serde(flatten)]
    pub policy: PolicySpec,
}

/// `ClusterEgressPolicy`'s spec: the policy, in CiliumNetworkPolicy's egress dialect.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "dnsfence.io",
    version = "v1alpha1",
    kind = "ClusterEgressPolicy",
    plural = "clusteregresspolicies",
    shortname = "cegp",
    doc = "Egress policy for pods of every namespace, in CiliumClusterwideNetworkPolicy's egress dialect.",
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".spec.endpointSelector"}"#,
    printcolumn = r#"{"name":"Audit","type":"string","jsonPath":".metadata.annotations.dnsfence\\.io/audit"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct ClusterEgressPolicySpec {
    /// The policy.
    #[serde(flatten)]
    pub policy: PolicySpec,
}

/// Fields Cilium knows that dnsfence refuses, per object schema (named by a field only it
/// has), with their JSON type and the reason in the engine's words. The schema declares
/// them empty (`maxItems: 0`, `maxProperties: 0`, `maxLength: 0`), so the API server
/// refuses them at admission.
/// (field, JSON type, why).
type Refused = (&'static str, &'static str, &'static str);

const REFUSED: &[(&str, &[Refused])] = &[
    (
        "toFQDNs",
        &[
            ("toServices", "array", "not supported by dnsfence; select the service's pods with toEndpoints or its name with toFQDNs"),
            ("toGroups", "array", "cloud provider groups are not supported by dnsfence"),
            ("toRequires", "array", "not supported by dnsfence (deprecated in Cilium)"),
            ("toNodes", "array", "not supported by dnsfence; use toEntities host or toCIDR"),
            ("icmps", "array", "not supported by dnsfence; ignoring them would allow more than the policy says"),
            ("authentication", "object", "mutual authentication is not supported by dnsfence"),
        ],
    ),
    (
        "ports",
        &[
            ("serverNames", "array", "not supported by dnsfence; ignoring it would allow more than the policy says"),
            ("originatingTLS", "object", "not supported by dnsfence"),
            ("terminatingTLS", "object", "not supported by dnsfence"),
            ("listener", "object", "not supported by dnsfence"),
        ],
    ),
    (
        "dns",
        &[
            ("http", "array", "L7 http rules are not enforced by dnsfence; ignoring them would allow more than the policy says"),
            ("kafka", "array", "L7 kafka rules are not enforced by dnsfence; ignoring them would allow more than the policy says"),
            ("l7proto", "string", "L7 rules are not enforced by dnsfence"),
            ("l7", "array", "L7 rules are not enforced by dnsfence"),
        ],
    ),
];

/// Both CRDs, as `dnsfence manifests crds` prints them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        finish(EgressPolicy::crd()),
        finish(ClusterEgressPolicy::crd()),
    ]
}

/// Makes every object schema keep unknown fields and declares the [`REFUSED`] ones empty.
fn finish(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let mut v = serde_json::to_value(&crd).unwrap_or_default();
    if let Some(versions) = v
        .pointer_mut("/spec/versions")
        .and_then(Value::as_array_mut)
    {
        for version in versions {
            let Some(root) = version.pointer_mut("/schema/openAPIV3Schema") else {
                continue;
            };
            let Some(spec) = root.pointer_mut("/properties/spec") else {
                continue;
            };
            harden(spec);
            // `specs`: more specs of the same shape; an object has either, or both.
            let specs = json!({
                "description": "More specs of the same form; the object's rules are those of all its specs.",
                "type": "array",
                "items": spec.clone(),
            });
            if let Some(props) = root.get_mut("properties").and_then(Value::as_object_mut) {
                props.insert("specs".into(), specs);
            }
            if let Some(obj) = root.as_object_mut() {
                obj.remove("required");
                obj.insert(
                    "anyOf".into(),
                    json!([{"required": ["spec"]}, {"required": ["specs"]}]),
                );
            }
        }
    }
    serde_json::from_value(v).unwrap_or(crd)
}

fn harden(schema: &mut Value) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    for child in obj.values_mut() {
        match child {
            Value::Object(_) => harden(child),
            Value::Array(items) => items.iter_mut().for_each(harden),
            _ => {}
        }
    }
    let Some(props) = obj.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    if let Some((_, fields)) = REFUSED
        .iter()
        .find(|(marker, _)| props.contains_key(*marker))
    {
        for (field, ty, why) in *fields {
            let empty = match *ty {
                "array" => {
                    json!({"type": "array", "maxItems": 0, "items": {"x-kubernetes-preserve-unknown-fields": true}})
                }
                "object" => {
                    json!({"type": "object", "maxProperties": 0, "x-kubernetes-preserve-unknown-fields": true})
                }
                _ => json!({"type": "string", "maxLength": 0}),
            };
            let mut empty = empty;
            empty["description"] = json!(format!("Must be absent: {why}."));
            props.insert((*field).to_owned(), empty);
        }
    }
    obj.insert("x-kubernetes-preserve-unknown-fields".into(), json!(true));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_name_both_kinds_with_short_names() {
        let crds = crds();
        let names: Vec<_> = crds
            .iter()
            .map(|c| c.metadata.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "egresspolicies.dnsfence.io",
                "clusteregresspolicies.dnsfence.io"
            ]
        );
        assert_eq!(crds[0].spec.scope, "Namespaced");
        assert_eq!(crds[1].spec.scope, "Cluster");
        assert_eq!(crds[0].spec.names.short_names, Some(vec!["egp".to_owned()]));
    }

    #[test]
    fn schema_keeps_unknown_fields_and_refuses_l7() {
        let v = serde_json::to_value(&crds()[0]).unwrap();
        let spec = v
            .pointer("/spec/versions/0/schema/openAPIV3Schema/properties/spec")
            .unwrap();
        assert_eq!(spec["x-kubernetes-preserve-unknown-fields"], json!(true));
        let text = spec.to_string();
        let http = v
            .pointer("/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/egress/items/properties/toPorts/items/properties/rules/properties/http")
            .unwrap();
        assert_eq!(http["maxItems"], json!(0), "{http}");
        assert!(text.contains("toServices"), "{text}");
        assert!(text.contains("^[-a-zA-Z0-9_.*]+$"), "{text}");
    }

    #[test]
    fn both_kinds_take_spec_specs_or_both() {
        for crd in crds() {
            let v = serde_json::to_value(&crd).unwrap();
            let root = v
                .pointer("/spec/versions/0/schema/openAPIV3Schema")
                .unwrap();
            assert_eq!(
                root["properties"]["specs"]["items"], root["properties"]["spec"],
                "specs holds specs"
            );
            assert_eq!(root["properties"]["specs"]["type"], json!("array"));
            assert!(root.get("required").is_none(), "{root}");
            assert_eq!(
                root["anyOf"],
                json!([{"required": ["spec"]}, {"required": ["specs"]}])
            );
        }
    }
}
