//! The dnsfence policy engine: parse, validate, select endpoints, match DNS names. Pure: it
//! must not do I/O, read the clock or spawn anything.
//!
//! It answers the three questions the rest of dnsfence asks: which rules apply to an endpoint
//! ([`PolicySet::resolve`]); may it resolve a name on a given DNS server and port
//! ([`EndpointPolicy::dns_decision`]); which `toFQDNs` selectors does a name satisfy
//! ([`PolicySet::for_each_selector_match`], [`EndpointPolicy::for_each_fqdn_match`]).
//! `toFQDNs` in `egressDeny`, a dnsfence extension, denies names: the proxy refuses them
//! whatever allows them ([`EndpointPolicy::fqdn_deny`]) and their learned IPs are denied.
//! Policies in audit mode (annotation [`AUDIT_ANNOTATION`], or
//! [`PolicySet::with_global_audit`]) allow what they allow but deny nothing: the endpoint's
//! [`EndpointPolicy::audit`] and [`DnsDecision::audit`] say what to record instead.
//!
//! The input dialect is CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy
//! (`cilium.io/v2`) plus dnsfence's own `EgressPolicy` and `ClusterEgressPolicy`
//! (`dnsfence.io/v1alpha1`, same `spec`), with Cilium's validation rules and name semantics.
//! Kubernetes' `ClusterNetworkPolicy` (`policy.networking.k8s.io`, with `domainNames`
//! egress peers) is compiled onto the same model, and combinations of priorities the model
//! cannot express are rejected (`docs/policy.md` lists the mapping and its limits).
//!
//! [`kube_names`] holds Kubernetes' rules for names (namespaces, object names, label keys
//! and values), written once for this crate, the Kubernetes front end and the binary.
//!
//! This crate is pure: no I/O besides the bytes it is given, no async, no clock. Per-query
//! matching costs O(name length) and does not allocate.
//!
//! ```
//! use dnsfence_policy::{Endpoint, Labels, PolicyLoader, Protocol};
//!
//! let yaml = r#"
//! apiVersion: cilium.io/v2
//! kind: CiliumNetworkPolicy
//! metadata: {name: billing, namespace: payments}
//! spec:
//!   endpointSelector: {matchLabels: {app: billing}}
//!   egress:
//!     - toPorts:
//!         - ports: [{port: "53", protocol: ANY}]
//!           rules: {dns: [{matchPattern: "*.s3.amazonaws.com"}]}
//!     - toFQDNs: [{matchName: api.stripe.com}]
//! "#;
//! let mut loader = PolicyLoader::new();
//! loader.add("billing.yaml", yaml);
//! assert!(!loader.has_errors());
//! let (set, _warnings) = loader.finish();
//!
//! let pod = Endpoint::new("payments", Labels::new([("app", "billing")]).unwrap());
//! let policy = set.resolve(&pod);
//! assert!(policy.enforced);
//! assert!(policy.dns_decision(b"logs.s3.amazonaws.com", None, 53, Protocol::Udp).allowed);
//! assert!(!policy.dns_decision(b"evil.example", None, 53, Protocol::Udp).allowed);
//! ```

mod diag;
pub mod inventory;
pub mod kube_names;
mod labels;
mod load;
mod matcher;
mod model;
mod name;
mod order;
mod parse;
mod pattern;
mod resolve;

pub use diag::{Diagnostic, Severity};
pub use inventory::{EndpointConfig, Inventory, PolicyDoc, ResolvedEndpoint};
pub use labels::{
    normalize_key, Endpoint, EndpointSelector, LabelKeyError, LabelSelector, Labels, Operator,
    Requirement, NAMESPACE_LABEL,
};
pub use load::PolicyLoader;
pub use matcher::{NameMatcher, INLINE_ACTIVE};
pub use model::{
    CidrRule, Destination, EgressRule, Entity, Peer, Policy, PolicyId, PolicyKind, PortProtocol,
    PortRule, Precedence, Protocol, Rule, Source, Tier, AUDIT_ANNOTATION,
};
pub use name::{FoldedName, NameError, MAX_NAME_LEN};
pub use parse::parse_stream;
pub use pattern::{NamePattern, PatternError, PatternField};
pub use resolve::{
    AppliedRule, DnsDecision, DnsReason, DnsRule, EndpointPolicy, FqdnAllow, FqdnDeny, PolicySet,
    SelectorId,
};
