//! Parsing and validation through the public API: documents, lists, field paths, values.

use dnsfence_policy::{
    parse_stream, Diagnostic, Endpoint, Labels, Peer, PolicyKind, PolicyLoader, PortProtocol,
    Protocol, Severity, Tier,
};

fn parse(yaml: &str) -> (Vec<dnsfence_policy::Policy>, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let policies = parse_stream("f.yaml", yaml, &mut diags);
    (policies, diags)
}

fn lines(diags: &[Diagnostic]) -> Vec<String> {
    diags.iter().map(ToString::to_string).collect()
}

#[test]
fn documents_are_numbered_from_one_and_empty_ones_skipped() {
    // The first `---` opens document 1 (empty), the second opens document 2.
    let yaml = "---\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec:\n  endpointSelector: {}\n  egress: [{toEntities: [bogus]}]\n";
    let (policies, diags) = parse(yaml);
    assert!(policies.is_empty());
    assert_eq!(
        lines(&diags),
        ["f.yaml:2: spec.egress[0].toEntities[0]: entity \"bogus\" is not supported by dnsfence (supported: world, world-ipv4, world-ipv6, cluster, host, all)"]
    );
}

#[test]
fn list_items_carry_their_index_in_the_path() {
    let yaml = r#"
apiVersion: v1
kind: List
items:
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: ok, namespace: a}
    spec: {endpointSelector: {}, egress: [{toEntities: [world]}]}
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: bad, namespace: a}
    spec: {endpointSelector: {}, egress: [{toFQDNs: [{matchPattern: "a b"}]}]}
"#;
    let (policies, diags) = parse(yaml);
    assert_eq!(policies.len(), 1, "the valid item survives");
    assert_eq!(policies[0].id.name, "ok");
    assert_eq!(diags.len(), 1);
    assert_eq!(
        diags[0].path,
        "items[1].spec.egress[0].toFQDNs[0].matchPattern"
    );
}

#[test]
fn spec_and_specs_both_count() {
    let yaml = r#"
apiVersion: dnsfence.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: both}
spec: {endpointSelector: {matchLabels: {a: "1"}}, egress: [{toEntities: [world]}]}
specs:
  - {endpointSelector: {matchLabels: {b: "2"}}, egress: [{toEntities: [host]}]}
  - {endpointSelector: {matchLabels: {c: "3"}}, egress: [{toEntities: [all]}]}
"#;
    let (policies, diags) = parse(yaml);
    assert!(diags.is_empty(), "{:?}", lines(&diags));
    assert_eq!(policies[0].id.kind, PolicyKind::ClusterEgressPolicy);
    let paths: Vec<&str> = policies[0].rules.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["spec", "specs[0]", "specs[1]"]);
}

#[test]
fn ports_accept_numbers_and_strings() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {}
  egress:
    - toCIDR: [192.0.2.7]
      toPorts:
        - ports:
            - {port: 443, protocol: TCP}
            - {port: "8000", endPort: 8100}
            - {port: "0"}
"#;
    let (policies, diags) = parse(yaml);
    assert!(diags.is_empty(), "{:?}", lines(&diags));
    let rule = &policies[0].rules[0].egress[0];
    let Peer::Cidrs(cidrs) = &rule.peer else {
        panic!("{:?}", rule.peer)
    };
    assert_eq!(cidrs[0].cidr.to_string(), "192.0.2.7/32");
    assert_eq!(
        rule.to_ports[0].ports,
        [
            PortProtocol {
                port: 443,
                end_port: 443,
                protocol: Protocol::Tcp
            },
            PortProtocol {
                port: 8000,
                end_port: 8100,
                protocol: Protocol::Any
            },
            PortProtocol::ANY,
        ]
    );
    assert!(rule.covers_port(8050, Protocol::Udp));
    // Port 0 means every port.
    assert!(rule.covers_port(1, Protocol::Sctp));
    // The namespace defaults to `default`, as kubectl does.
    assert_eq!(policies[0].id.namespace.as_deref(), Some("default"));
}

#[test]
fn label_values_and_source_prefixes() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l, namespace: x}
spec:
  endpointSelector: {matchLabels: {"k8s:version": 2, any:canary: true}}
  egress: [{toEntities: [world]}]
"#;
    let (policies, diags) = parse(yaml);
    assert!(diags.is_empty(), "{:?}", lines(&diags));
    let ep = Endpoint::new(
        "x",
        Labels::new([("version", "2"), ("canary", "true")]).unwrap(),
    );
    assert!(policies[0].rules[0].subject.matches(&ep));
}

#[test]
fn duplicate_keys_and_wrong_types_are_errors() {
    let (_, diags) =
        parse("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nkind: CiliumNetworkPolicy\n");
    assert_eq!(diags.len(), 1);
    assert!(diags[0].message.contains("duplicate"), "{}", diags[0]);
    let (_, diags) = parse(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: t}\nspec:\n  endpointSelector: []\n  egress: {toEntities: [world]}\n",
    );
    assert_eq!(
        lines(&diags),
        [
            "f.yaml:1: spec.endpointSelector: expected a mapping, found a list",
            "f.yaml:1: spec.egress: expected a list, found a mapping",
        ]
    );
}

#[test]
fn warnings_do_not_reject() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host-fw, namespace: ignored}
spec:
  nodeSelector: {matchLabels: {role: worker}}
  egress: [{toEntities: [world]}]
"#;
    let (policies, diags) = parse(yaml);
    assert_eq!(policies.len(), 1);
    assert!(
        policies[0].rules.is_empty(),
        "host policies are not enforced"
    );
    assert!(diags.iter().all(|d| d.severity == Severity::Warning));
    assert_eq!(diags.len(), 2, "{:?}", lines(&diags));
}

// Kubernetes label syntax: a key or value no pod can carry is reported, as a warning (the
// policy stays: its selector only matches nothing).
#[test]
fn labels_no_pod_can_carry_are_warned_about() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: labels, namespace: default}
spec:
  endpointSelector:
    matchLabels: {"bad key!": web, "Team.Example/tier": front, "k8s:app.kubernetes.io/name": web}
  egress:
    - toEndpoints:
        - matchLabels: {app: "bad value!"}
          matchExpressions: [{key: tier, operator: In, values: ["-dash", ok]}]
"#;
    let (policies, diags) = parse(yaml);
    assert_eq!(policies.len(), 1, "{:?}", lines(&diags));
    assert!(diags.iter().all(|d| d.severity == Severity::Warning));
    let got = lines(&diags).join("\n");
    for needle in [
        "matchLabels.bad key!: warning: label key \"bad key!\" is not a label name",
        "matchLabels.Team.Example/tier: warning: label key \"Team.Example/tier\" has a prefix that is not a DNS subdomain",
        "matchLabels.app: warning: label value \"bad value!\" is not a valid label value",
        "matchExpressions[0].values[0]: warning: label value \"-dash\"",
    ] {
        assert!(got.contains(needle), "missing {needle:?} in:\n{got}");
    }
    assert_eq!(diags.len(), 4, "{got}");
}

#[test]
fn names_kubernetes_would_refuse_are_warned_about() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: Bad_Name, namespace: "Bad NS"}
spec:
  endpointSelector: {}
  egress: [{toEntities: [world]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: good.name-1, namespace: team-a}
spec:
  endpointSelector: {}
  egress: [{toEntities: [world]}]
"#;
    let (policies, diags) = parse(yaml);
    assert_eq!(policies.len(), 2, "{:?}", lines(&diags));
    let got = lines(&diags);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got[0].contains("metadata.name: warning: \"Bad_Name\": Kubernetes would refuse"),
        "{got:?}"
    );
    assert!(
        got[1].contains("metadata.namespace: warning: \"Bad NS\": Kubernetes would refuse"),
        "{got:?}"
    );
}

#[test]
fn loader_reports_duplicates_across_files() {
    let doc = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: d, namespace: n}\nspec: {endpointSelector: {}}\n";
    let mut loader = PolicyLoader::new();
    loader.add("one.yaml", doc);
    loader.add("two.yaml", doc);
    assert!(loader.has_errors());
    assert_eq!(
        lines(loader.diagnostics()),
        ["two.yaml:1: metadata.name: CiliumNetworkPolicy n/d is already defined at one.yaml:1"]
    );
    let (set, _) = loader.finish();
    assert_eq!(set.policies().len(), 1);
}

#[test]
fn a_document_that_is_not_a_mapping_is_reported_on_the_document() {
    let (_, diags) = parse("just a string\n---\n- a\n- list\n");
    assert_eq!(
        lines(&diags),
        [
            "f.yaml:1: (document): expected a mapping, found a string",
            "f.yaml:2: (document): expected a mapping, found a list",
        ]
    );
}

fn with_annotations(kind: &str, annotations: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: {kind}\nmetadata:\n  name: p\n  labels: {{team: platform}}\n  annotations: {annotations}\nspec: {{endpointSelector: {{}}, egress: [{{toEntities: [world]}}]}}\n"
    )
}

#[test]
fn the_audit_annotation_sets_audit_mode_and_other_annotations_are_ignored() {
    for kind in ["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"] {
        for (annotations, audit) in [
            (r#"{dnsfence.io/audit: "true"}"#, true),
            (r#"{dnsfence.io/audit: "false", note: "x", n: 1}"#, false),
            (
                r#"{kubectl.kubernetes.io/last-applied-configuration: "{}"}"#,
                false,
            ),
            ("{}", false),
            ("null", false),
        ] {
            let (policies, diags) = parse(&with_annotations(kind, annotations));
            assert!(diags.is_empty(), "{annotations}: {:?}", lines(&diags));
            assert_eq!(policies[0].audit, audit, "{kind} {annotations}");
        }
    }
    let yaml = "apiVersion: dnsfence.io/v1alpha1\nkind: EgressPolicy\nmetadata: {name: e, annotations: {dnsfence.io/audit: \"true\"}}\nspec: {endpointSelector: {}}\n";
    let (policies, diags) = parse(yaml);
    assert!(diags.is_empty(), "{:?}", lines(&diags));
    assert!(policies[0].audit);
}

#[test]
fn a_bad_audit_annotation_is_an_error_naming_the_field() {
    for (annotations, message) in [
        (
            r#"{dnsfence.io/audit: "yes"}"#,
            r#"expected "true" or "false", found "yes""#,
        ),
        (
            r#"{dnsfence.io/audit: "True"}"#,
            r#"expected "true" or "false", found "True""#,
        ),
        (
            "{dnsfence.io/audit: true}",
            r#"annotation values are strings: quote it, "true""#,
        ),
        (
            "{dnsfence.io/audit: 1}",
            r#"expected "true" or "false", found 1"#,
        ),
    ] {
        let (policies, diags) = parse(&with_annotations("CiliumNetworkPolicy", annotations));
        assert!(policies.is_empty(), "{annotations}: the object is rejected");
        assert_eq!(
            lines(&diags),
            [format!(
                "f.yaml:1: metadata.annotations.dnsfence.io/audit: {message}"
            )]
        );
    }
    let (_, diags) = parse(&with_annotations("CiliumNetworkPolicy", "[a]"));
    assert_eq!(
        lines(&diags),
        ["f.yaml:1: metadata.annotations: expected a mapping, found a list"]
    );
    // The spec's problems are reported in the same run; list items carry their index.
    let yaml = r#"
apiVersion: v1
kind: List
items:
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: a, annotations: {dnsfence.io/audit: "on"}}
    spec: {endpointSelector: {}, egress: [{toEntities: [bogus]}]}
"#;
    let (policies, diags) = parse(yaml);
    assert!(policies.is_empty());
    let paths: Vec<&str> = diags.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "items[0].metadata.annotations.dnsfence.io/audit",
            "items[0].spec.egress[0].toEntities[0]"
        ]
    );
}

/// A policy of `kind` whose one spec denies `toFQDNs` (and `extra` in the same rule).
fn fqdn_deny_doc(api: &str, kind: &str, extra: &str) -> String {
    format!(
        "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: d}}\nspec:\n  endpointSelector: {{}}\n  egressDeny:\n    - toFQDNs: [{{matchName: evil.example.com}}, {{matchPattern: \"*.tracker.example\"}}]\n{extra}"
    )
}

#[test]
fn to_fqdns_in_egress_deny_is_accepted_in_every_kind() {
    let ports = "      toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]\n";
    for (api, kind) in [
        ("dnsfence.io/v1alpha1", "EgressPolicy"),
        ("dnsfence.io/v1alpha1", "ClusterEgressPolicy"),
        ("cilium.io/v2", "CiliumNetworkPolicy"),
        ("cilium.io/v2", "CiliumClusterwideNetworkPolicy"),
    ] {
        let (policies, diags) = parse(&fqdn_deny_doc(api, kind, ports));
        assert_eq!(policies.len(), 1, "{kind}: {:?}", lines(&diags));
        let rule = &policies[0].rules[0];
        assert!(rule.default_deny_egress, "{kind}");
        let deny = &rule.egress_deny[0];
        let Peer::Fqdns(patterns) = &deny.peer else {
            panic!("{kind}: {:?}", deny.peer)
        };
        let texts: Vec<&str> = patterns.iter().map(|p| p.as_str()).collect();
        assert_eq!(texts, ["evil.example.com", "*.tracker.example"], "{kind}");
        assert_eq!(deny.to_ports[0].ports[0].port, 443, "{kind}");
        if api == "cilium.io/v2" {
            // Cilium rejects the field: a warning, never an error.
            assert_eq!(
                lines(&diags),
                [format!("f.yaml:1: spec.egressDeny[0].toFQDNs: warning: toFQDNs in egressDeny is a dnsfence extension: Cilium rejects it, so this {kind} works only with dnsfence (use an EgressPolicy or ClusterEgressPolicy)")]
            );
        } else {
            assert!(diags.is_empty(), "{kind}: {:?}", lines(&diags));
        }
    }
}

#[test]
fn to_fqdns_in_egress_deny_takes_no_l7_rules_and_valid_patterns() {
    let l7 = "      toPorts: [{ports: [{port: \"53\"}], rules: {dns: [{matchPattern: \"*\"}]}}]\n    - toFQDNs: [{matchName: \"a b\"}]\n";
    let (policies, diags) = parse(&fqdn_deny_doc("dnsfence.io/v1alpha1", "EgressPolicy", l7));
    assert!(policies.is_empty());
    assert_eq!(
        lines(&diags),
        [
            "f.yaml:1: spec.egressDeny[0].toPorts[0].rules: L7 rules are not allowed in egressDeny",
            "f.yaml:1: spec.egressDeny[1].toFQDNs[0].matchName: \"a b\": character 0x20 at offset 1 is not allowed (only letters, digits, '-', '_' and '.')",
        ]
    );
}

fn cluster_network_policy(name: &str, priority: u16, subject: &str, egress: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: Admin\n  priority: {priority}\n  subject: {subject}\n  egress:\n{egress}"
    )
}

const DENY_ALL: &str = "    - {action: Deny, to: [{networks: [\"0.0.0.0/0\", \"::/0\"]}]}\n";
const CI: &str = "{namespaces: {matchLabels: {kubernetes.io/metadata.name: ci}}}";

#[test]
fn cluster_network_policy_compiles_onto_the_model() {
    let egress = format!(
        "    - action: Accept\n      to: [{{pods: {{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: kube-system}}}}, podSelector: {{matchLabels: {{k8s-app: kube-dns}}}}}}}}]\n      protocols: [{{udp: {{destinationPort: {{number: 53}}}}}}]\n    - action: Accept\n      to: [{{domainNames: [\"*.example.com\"]}}]\n{DENY_ALL}"
    );
    let (policies, diags) = parse(&cluster_network_policy("ci", 10, CI, &egress));
    assert!(diags.is_empty(), "{:?}", lines(&diags));
    let policy = &policies[0];
    assert_eq!(policy.id.kind, PolicyKind::ClusterNetworkPolicy);
    assert_eq!(policy.id.namespace, None);
    let precedence = policy.precedence.unwrap();
    assert_eq!((precedence.tier, precedence.priority), (Tier::Admin, 10));
    let rule = &policy.rules[0];
    assert!(rule.default_deny_egress, "the deny-all is the default-deny");
    assert!(rule.egress_deny.is_empty());
    let paths: Vec<&str> = rule.egress.iter().map(|e| e.path.as_str()).collect();
    // The DNS accept, its unfiltered DNS rule (so that answers are learned), the names.
    assert_eq!(
        paths,
        [
            "spec.egress[0].to[0]",
            "spec.egress[0].to[0]",
            "spec.egress[1].to[0]"
        ]
    );
    let dns = rule.egress[1].to_ports[0].dns.as_ref().unwrap();
    assert!(dns[0].matches_all());
    let Peer::Fqdns(names) = &rule.egress[2].peer else {
        panic!("{:?}", rule.egress[2].peer)
    };
    assert_eq!(names[0].as_str(), "**.example.com");
    let ci = Endpoint::new("ci", Labels::new([("app", "x")]).unwrap());
    let other = Endpoint::new("prod", Labels::new([("app", "x")]).unwrap());
    assert!(rule.subject.matches(&ci) && !rule.subject.matches(&other));
}

#[test]
fn cluster_network_policy_api_versions() {
    let yaml = cluster_network_policy("v", 1, CI, DENY_ALL).replace(
        "policy.networking.k8s.io/v1alpha2",
        "policy.networking.k8s.io/v1",
    );
    let (_, diags) = parse(&yaml);
    assert_eq!(
        lines(&diags),
        ["f.yaml:1: apiVersion: ClusterNetworkPolicy needs apiVersion policy.networking.k8s.io/v1alpha2 or policy.networking.k8s.io/v1beta1, found \"policy.networking.k8s.io/v1\""]
    );
    let yaml = cluster_network_policy("v", 1, CI, DENY_ALL).replace("v1alpha2", "v1beta1");
    assert!(parse(&yaml).1.is_empty());
}

#[test]
fn cluster_network_policy_order_is_checked_across_files() {
    // Loaded first, but of lower precedence: its Deny of kube-system would win over the
    // Accept of `first`, which the specification evaluates before it.
    let late = cluster_network_policy(
        "late",
        50,
        "{namespaces: {}}",
        "    - {action: Deny, to: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: kube-system}}}]}\n",
    );
    let first = cluster_network_policy(
        "first",
        5,
        CI,
        "    - {action: Accept, to: [{namespaces: {}}]}\n",
    );
    let mut loader = PolicyLoader::new();
    loader.add("late.yaml", &late);
    assert!(!loader.has_errors());
    loader.add("first.yaml", &first);
    assert!(loader.has_errors());
    let (set, diags) = loader.finish();
    assert_eq!(
        lines(&diags),
        ["late.yaml:1: spec.egress[0].to[0]: may deny traffic that spec.egress[0].to[0] of ClusterNetworkPolicy first (tier Admin priority 5) accepts first; dnsfence's denies win over allows, so it cannot express this: narrow this Deny or the Accept"]
    );
    let names: Vec<&str> = set.policies().iter().map(|p| p.id.name.as_str()).collect();
    assert_eq!(names, ["first"], "the shadowed policy is rejected");
}

#[test]
fn cluster_network_policy_warns_when_other_kinds_select_its_pods() {
    let cnp = cluster_network_policy("ci", 10, CI, DENY_ALL);
    let cilium = |ns: &str| {
        format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: c, namespace: {ns}}}\nspec:\n  endpointSelector: {{}}\n  egress: [{{toEntities: [world]}}]\n")
    };
    let mut loader = PolicyLoader::new();
    loader.add("cnp.yaml", &cnp);
    loader.add("other.yaml", &cilium("prod"));
    assert!(loader.diagnostics().is_empty());
    loader.add("same.yaml", &cilium("ci"));
    let (set, diags) = loader.finish();
    assert_eq!(
        lines(&diags),
        ["cnp.yaml:1: spec.subject: warning: endpoints it selects may also be selected by CiliumNetworkPolicy ci/c: dnsfence does not order ClusterNetworkPolicy tiers against other kinds, their rules combine (allows add up, denies win)"]
    );
    assert_eq!(set.policies().len(), 3);
}
