use std::net::IpAddr;

use dnsfence_policy::kube_names::is_label_value;
use dnsfence_policy::{EndpointSelector, Operator, NAMESPACE_LABEL};
use serde_json::{json, Value};

use super::peers::pod_key;
use super::*;

fn pod(ns: &str, name: &str, node: &str, labels: Value, ips: &[&str]) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": labels,
                     "resourceVersion": "1001", "managedFields": []},
        "spec": {"nodeName": node, "serviceAccountName": "billing-sa",
                 "containers": [{"name": "app", "image": "busybox"}]},
        "status": {"phase": "Running", "hostIP": "192.168.0.10",
                   "hostIPs": [{"ip": "192.168.0.10"}, {"ip": "fd00::10"}],
                   "podIP": ips.first().copied().unwrap_or_default(),
                   "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}
    }))
    .unwrap()
}

fn namespace(name: &str, labels: Value) -> Namespace {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels},
    }))
    .unwrap()
}

fn egress_policy(ns: &str, name: &str, generation: i64, fqdn: &str) -> Value {
    json!({
        "apiVersion": "dnsfence.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                     "generation": generation, "resourceVersion": "77",
                     "managedFields": [{"manager": "kubectl"}]},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "billing"}},
            "egress": [
                {"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system",
                                                  "k8s:k8s-app": "kube-dns"}}],
                 "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                              "rules": {"dns": [{"matchPattern": "*"}]}}]},
                {"toFQDNs": [{"matchName": fqdn}]}
            ]
        }
    })
}

fn synced_state() -> ClusterState {
    let mut s = ClusterState::new("node-1", "prod", [PolicySource::EgressPolicy]);
    for c in [Change::Init, Change::InitDone] {
        s.local_pod(c.clone());
        s.namespace(map_change(c.clone(), |_: Pod| None::<Namespace>).unwrap());
        s.service(map_change(c.clone(), |_: Pod| None::<Service>).unwrap());
        s.policy(
            PolicySource::EgressPolicy,
            map_change(c, |_: Pod| None::<Value>).unwrap(),
        );
    }
    s
}

#[test]
fn pods_get_cilium_labels_and_dual_stack_addresses() {
    let mut s = synced_state();
    assert!(s.synced());
    s.namespace(Change::Apply(namespace("payments", json!({"team": "pay"}))));
    s.local_pod(Change::Apply(pod(
        "payments",
        "billing-1",
        "node-1",
        json!({"app": "billing"}),
        &["10.244.1.5", "fd00:244::5"],
    )));
    let eps = s.endpoints();
    assert_eq!(eps.len(), 1);
    let e = &eps[0];
    assert_eq!(
        (e.namespace.as_str(), e.name.as_str()),
        ("payments", "billing-1")
    );
    assert_eq!(
        e.ips,
        [
            "10.244.1.5".parse::<IpAddr>().unwrap(),
            "fd00:244::5".parse().unwrap()
        ]
    );
    assert!(!e.remote);
    assert_eq!(e.labels["app"], "billing");
    assert_eq!(e.labels["io.cilium.k8s.namespace.labels.team"], "pay");
    assert_eq!(e.labels[SERVICE_ACCOUNT_LABEL], "billing-sa");
    assert_eq!(e.labels[CLUSTER_LABEL], "prod");
    assert_eq!(
        s.host_ips(),
        [
            "192.168.0.10".parse::<IpAddr>().unwrap(),
            "fd00::10".parse().unwrap()
        ]
    );
}

#[test]
fn host_network_terminal_and_foreign_pods_are_not_endpoints() {
    let mut s = synced_state();
    let mut host = pod(
        "kube-system",
        "kube-proxy",
        "node-1",
        json!({}),
        &["192.168.0.10"],
    );
    host.spec.as_mut().unwrap().host_network = Some(true);
    s.local_pod(Change::Apply(host));
    let mut done = pod("default", "job-1", "node-1", json!({}), &["10.244.1.9"]);
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    s.local_pod(Change::Apply(done));
    s.local_pod(Change::Apply(pod(
        "default",
        "elsewhere",
        "node-2",
        json!({}),
        &["10.244.2.9"],
    )));
    s.local_pod(Change::Apply(pod(
        "default",
        "pending",
        "node-1",
        json!({}),
        &[],
    )));
    assert!(s.endpoints().is_empty(), "{:?}", s.endpoints());
    assert_eq!(s.host_network_pods(), ["kube-system/kube-proxy"]);
}

#[test]
fn pod_deletion_removes_the_endpoint() {
    let mut s = synced_state();
    let p = pod(
        "default",
        "web-1",
        "node-1",
        json!({"app": "web"}),
        &["10.244.1.7"],
    );
    assert!(s.local_pod(Change::Apply(p.clone())));
    assert!(
        !s.local_pod(Change::Apply(p.clone())),
        "same object: no change"
    );
    assert_eq!(s.endpoints().len(), 1);
    assert!(s.local_pod(Change::Delete(p)));
    assert!(s.endpoints().is_empty());
}

#[test]
fn relist_keeps_state_until_done_and_then_prunes() {
    let mut s = synced_state();
    s.local_pod(Change::Apply(pod(
        "default",
        "a",
        "node-1",
        json!({}),
        &["10.244.1.1"],
    )));
    s.local_pod(Change::Apply(pod(
        "default",
        "b",
        "node-1",
        json!({}),
        &["10.244.1.2"],
    )));
    s.local_pod(Change::Init);
    s.local_pod(Change::InitApply(pod(
        "default",
        "a",
        "node-1",
        json!({}),
        &["10.244.1.1"],
    )));
    assert_eq!(
        s.endpoints().len(),
        2,
        "b stays while the list is incomplete"
    );
    assert!(s.local_pod(Change::InitDone));
    let names: Vec<_> = s.endpoints().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["a"]);
}

#[test]
fn waits_for_every_required_list() {
    let mut s = ClusterState::new(
        "n",
        "default",
        [
            PolicySource::EgressPolicy,
            PolicySource::ClusterEgressPolicy,
        ],
    );
    s.local_pod(Change::InitDone);
    s.namespace(Change::InitDone);
    s.service(Change::InitDone);
    s.policy(PolicySource::EgressPolicy, Change::InitDone);
    assert!(!s.synced());
    assert_eq!(s.waiting_for(), ["clusteregresspolicies"]);
    s.policy(PolicySource::ClusterEgressPolicy, Change::InitDone);
    assert!(s.synced());
}

#[test]
fn valid_policy_is_in_force_with_its_peer_query() {
    let mut s = synced_state();
    assert!(s.policy(
        PolicySource::EgressPolicy,
        Change::Apply(egress_policy(
            "payments",
            "allow-stripe",
            1,
            "api.stripe.com"
        ))
    ));
    let docs = s.policy_docs();
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].file, "EgressPolicy/payments/allow-stripe");
    assert!(!docs[0].text.contains("managedFields"), "{}", docs[0].text);
    let (added, removed) = s.update_peer_queries();
    assert!(removed.is_empty());
    assert_eq!(
        added,
        [PeerQuery {
            namespace: Some("kube-system".into()),
            label_selector: "k8s-app=kube-dns".into()
        }]
    );
    assert!(!s.synced(), "the new peer list is not there yet");
    let q = added[0].clone();
    s.peer_pod(
        &q,
        Change::InitApply(pod(
            "kube-system",
            "coredns-1",
            "node-2",
            json!({"k8s-app": "kube-dns"}),
            &["10.244.2.53"],
        )),
    );
    s.peer_pod(&q, Change::InitDone);
    assert!(s.synced());
    let eps = s.endpoints();
    assert_eq!(eps.len(), 1);
    assert!(eps[0].remote);
}

#[test]
fn invalid_version_is_reported_once_and_the_valid_one_stays() {
    let mut s = synced_state();
    s.policy(
        PolicySource::EgressPolicy,
        Change::Apply(egress_policy("payments", "p", 1, "api.stripe.com")),
    );
    let before = s.policy_docs();
    let mut bad = egress_policy("payments", "p", 2, "api.stripe.com");
    bad["spec"]["egress"][1]["toPorts"] =
        json!([{"ports": [{"port": "443"}], "rules": {"http": [{"path": "/"}]}}]);
    assert!(!s.policy(PolicySource::EgressPolicy, Change::Apply(bad.clone())));
    assert_eq!(
        s.policy_docs(),
        before,
        "the previous valid version stays in force"
    );
    let rejections = s.take_rejections();
    assert_eq!(rejections.len(), 1);
    let r = &rejections[0];
    assert_eq!(r.generation, Some(2));
    assert!(r.previous_in_force);
    assert!(
        r.note().contains("spec.egress[1].toPorts[0].rules.http"),
        "{}",
        r.note()
    );
    assert_eq!(s.invalid_policies(), 1);
    // The same generation again (a re-list, a status update): no second report.
    s.policy(PolicySource::EgressPolicy, Change::Apply(bad));
    assert!(s.take_rejections().is_empty());
    // Fixed: in force, no longer invalid.
    assert!(s.policy(
        PolicySource::EgressPolicy,
        Change::Apply(egress_policy("payments", "p", 3, "api.github.com"))
    ));
    assert_eq!(s.invalid_policies(), 0);
    assert!(s.policy_docs()[0].text.contains("api.github.com"));
}

#[test]
fn invalid_new_object_is_not_enforced() {
    let mut s = synced_state();
    let mut bad = egress_policy("default", "typo", 1, "x.example");
    bad["spec"]["egress"][1] = json!({"toFQDN": [{"matchName": "x.example"}]});
    s.policy(PolicySource::EgressPolicy, Change::Apply(bad));
    assert!(s.policy_docs().is_empty());
    let r = s.take_rejections();
    assert!(!r[0].previous_in_force);
    assert!(r[0].note().contains("toFQDN"), "{}", r[0].note());
}

#[test]
fn deleting_a_policy_lifts_it_and_its_peer_query() {
    let mut s = synced_state();
    let p = egress_policy("payments", "p", 1, "api.stripe.com");
    s.policy(PolicySource::EgressPolicy, Change::Apply(p.clone()));
    s.update_peer_queries();
    assert!(s.policy(PolicySource::EgressPolicy, Change::Delete(p)));
    assert!(s.policy_docs().is_empty());
    let (added, removed) = s.update_peer_queries();
    assert!(added.is_empty());
    assert_eq!(removed.len(), 1);
}

#[test]
fn policy_relist_removes_objects_deleted_meanwhile() {
    let mut s = synced_state();
    s.policy(
        PolicySource::EgressPolicy,
        Change::Apply(egress_policy("a", "kept", 1, "a.example")),
    );
    s.policy(
        PolicySource::EgressPolicy,
        Change::Apply(egress_policy("a", "gone", 1, "b.example")),
    );
    s.policy(PolicySource::EgressPolicy, Change::Init);
    s.policy(
        PolicySource::EgressPolicy,
        Change::InitApply(egress_policy("a", "kept", 1, "a.example")),
    );
    assert_eq!(s.policy_docs().len(), 2);
    assert!(s.policy(PolicySource::EgressPolicy, Change::InitDone));
    assert_eq!(s.policy_docs().len(), 1);
}

#[test]
fn peer_query_drops_terms_pods_cannot_match() {
    let selector = EndpointSelector {
        selector: dnsfence_policy::LabelSelector {
            match_labels: [
                (
                    "io.cilium.k8s.namespace.labels.team".to_owned(),
                    "x".to_owned(),
                ),
                ("app".to_owned(), "db".to_owned()),
            ]
            .into(),
            match_expressions: vec![dnsfence_policy::Requirement {
                key: "tier".into(),
                operator: Operator::NotIn,
                values: ["a".to_owned(), "b".to_owned()].into(),
            }],
        },
        namespace: Some("shop".into()),
    };
    assert_eq!(
        PeerQuery::of(&selector),
        PeerQuery {
            namespace: Some("shop".into()),
            label_selector: "app=db,tier notin (a,b)".into()
        }
    );
}

#[test]
fn a_service_of_a_peer_is_a_remote_endpoint_with_its_labels() {
    let mut s = synced_state();
    s.policy(
        PolicySource::EgressPolicy,
        Change::Apply(egress_policy("payments", "p", 1, "api.stripe.com")),
    );
    let (added, _) = s.update_peer_queries();
    s.peer_pod(
        &added[0],
        Change::InitApply(pod(
            "kube-system",
            "coredns-1",
            "node-2",
            json!({"k8s-app": "kube-dns"}),
            &["10.244.2.53"],
        )),
    );
    s.peer_pod(&added[0], Change::InitDone);
    let svc = |selector: Value, ip: &str| -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "spec": {"selector": selector, "clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"port": 53, "protocol": "UDP"}]}
        }))
        .unwrap()
    };
    s.service(Change::Apply(svc(
        json!({"k8s-app": "kube-dns"}),
        "10.96.0.10",
    )));
    let eps = s.endpoints();
    let service = eps.iter().find(|e| e.name == "service:kube-dns").unwrap();
    assert!(service.remote);
    assert_eq!(service.ips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(service.labels["k8s-app"], "kube-dns");
    // A Service selecting no known pod, or a headless one, is not an endpoint.
    s.service(Change::Apply(svc(
        json!({"k8s-app": "other"}),
        "10.96.0.10",
    )));
    assert!(s
        .endpoints()
        .iter()
        .all(|e| !e.name.starts_with("service:")));
    s.service(Change::Apply(svc(json!({"k8s-app": "kube-dns"}), "None")));
    assert!(s
        .endpoints()
        .iter()
        .all(|e| !e.name.starts_with("service:")));
}

#[test]
fn label_terms_follow_the_api_servers_rules() {
    for ok in ["app", "k8s-app", "app.kubernetes.io/name", "a_b.c"] {
        assert!(pod_key(ok), "{ok}");
    }
    // The prefix is capped at 253 in all, not each of its labels at 63.
    assert!(pod_key(&format!("{}.io/x", "a".repeat(64))));
    for bad in [
        "-app",
        "App.io/x",
        "a/b/c",
        "x/",
        "/x",
        "a_b/c",
        &"a".repeat(64),
    ] {
        assert!(!pod_key(bad), "{bad}");
    }
    for ok in ["", "kube-dns", "v1.2_3"] {
        assert!(is_label_value(ok), "{ok}");
    }
    for bad in ["-dns", "dns-", "a b", &"a".repeat(64)] {
        assert!(!is_label_value(bad), "{bad}");
    }
}

#[test]
fn a_pod_cannot_claim_its_namespaces_labels() {
    let mut s = synced_state();
    s.namespace(Change::Apply(namespace("tenant", json!({}))));
    s.local_pod(Change::Apply(pod(
        "tenant",
        "sneaky",
        "node-1",
        json!({"app": "x", "io.cilium.k8s.namespace.labels.egress": "internet",
               "io.cilium.k8s.policy.serviceaccount": "admin"}),
        &["10.244.1.66"],
    )));
    let e = &s.endpoints()[0];
    assert!(
        !e.labels
            .contains_key("io.cilium.k8s.namespace.labels.egress"),
        "{e:?}"
    );
    assert_eq!(e.labels[SERVICE_ACCOUNT_LABEL], "billing-sa");
    assert_eq!(e.labels["app"], "x");
}

#[test]
fn an_address_belongs_to_one_endpoint_the_live_pod_first() {
    let mut s = synced_state();
    let mut old = pod(
        "default",
        "old",
        "node-1",
        json!({"app": "a"}),
        &["10.244.1.8"],
    );
    old.metadata.deletion_timestamp =
        Some(serde_json::from_value(json!("2026-11-28T00:00:00Z")).unwrap());
    s.local_pod(Change::Apply(old));
    s.local_pod(Change::Apply(pod(
        "default",
        "new",
        "node-1",
        json!({"app": "b"}),
        &["10.244.1.8"],
    )));
    let names: Vec<_> = s.endpoints().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["new"]);
}

#[test]
fn a_service_carries_only_the_labels_all_its_pods_have() {
    let mut s = synced_state();
    let mut p = egress_policy("payments", "p", 1, "api.stripe.com");
    p["spec"]["egress"][0]["toEndpoints"] =
        json!([{"matchLabels": {"app": "web", "tier": "public"}}]);
    s.policy(PolicySource::EgressPolicy, Change::Apply(p));
    let (added, _) = s.update_peer_queries();
    s.peer_pod(
        &added[0],
        Change::InitApply(pod(
            "payments",
            "web-public",
            "node-2",
            json!({"app": "web", "tier": "public"}),
            &["10.244.2.7"],
        )),
    );
    s.peer_pod(&added[0], Change::InitDone);
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "payments"},
        "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.7.7"}
    }))
    .unwrap();
    s.service(Change::Apply(svc));
    let eps = s.endpoints();
    let e = eps.iter().find(|e| e.name == "service:web").unwrap();
    assert_eq!(e.labels.get("app"), Some("web"));
    assert!(!e.labels.contains_key("tier"), "{e:?}");
}

#[test]
fn a_policy_created_again_under_the_same_name_starts_afresh() {
    let mut s = synced_state();
    s.policy(
        PolicySource::EgressPolicy,
        Change::Apply(egress_policy("a", "p", 1, "old.example")),
    );
    let mut again = egress_policy("a", "p", 1, "x.example");
    again["metadata"]["uid"] = json!("another-uid");
    again["spec"]["egress"][1] = json!({"toFQDN": []});
    s.policy(PolicySource::EgressPolicy, Change::Apply(again));
    assert!(
        s.policy_docs().is_empty(),
        "the deleted object's rules are gone"
    );
}

#[test]
fn a_namespace_the_api_refuses_widens_the_peer_query() {
    let selector = EndpointSelector {
        selector: dnsfence_policy::LabelSelector {
            match_labels: [(NAMESPACE_LABEL.to_owned(), "a/b".to_owned())].into(),
            match_expressions: Vec::new(),
        },
        namespace: None,
    };
    assert_eq!(PeerQuery::of(&selector).namespace, None);
}
