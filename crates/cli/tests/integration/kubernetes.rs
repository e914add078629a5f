//! Kubernetes mode in the lab: `dnsfence agent` watches a fake API server (real HTTP, the
//! API's JSON) that runs in the node's namespace, and the pods' egress is asserted.
//!
//! The same policy is also run in standalone mode (files) on a second lab, and what the
//! pods observe must be the same.

use crate::common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{blocked, ip, reach};
use dnsfence_fakeapi::FakeApiServer;
use dnsfence_lab::daemon::{Daemon, DaemonSpec};
use dnsfence_lab::{DnsStatus, Lab, Outcome, Pod, Rec, RecordType, Transport};
use dnsfence_testsupport::skip_unless_root;
use serde_json::{json, Value};

const NODE: &str = "lab-node";

fn records() -> Vec<Rec> {
    vec![
        Rec::Addr("api.example.com", 60, ip("192.0.2.10")),
        Rec::Addr("api.example.com", 60, ip("2001:db8::10")),
        Rec::Addr("other.example.com", 60, ip("192.0.2.50")),
    ]
}

fn lab() -> Lab {
    Lab::builder()
        .pods(2)
        .records(records())
        .tcp_ports([443])
        .build()
        .unwrap()
}

/// The policy's spec, shared by both modes.
fn spec(names: &[&str]) -> Value {
    let fqdns: Vec<Value> = names.iter().map(|n| json!({"matchName": n})).collect();
    json!({
        "endpointSelector": {"matchLabels": {"app": "web"}},
        "egress": [
            {"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system",
                                              "k8s:k8s-app": "kube-dns"}}],
             "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                          "rules": {"dns": [{"matchPattern": "*.example.com"}]}}]},
            {"toFQDNs": fqdns,
             "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}
        ]
    })
}

fn policy(names: &[&str]) -> Value {
    json!({
        "apiVersion": "dnsfence.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": "web-egress", "namespace": "shop"},
        "spec": spec(names),
    })
}

fn pod_object(name: &str, node: &str, labels: Value, ips: &[IpAddr]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": if name == "coredns" { "kube-system" } else { "shop" },
                     "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": "default",
                 "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running", "hostIP": "192.168.50.1",
                   "podIP": ips[0].to_string(),
                   "podIPs": ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>()},
    })
}

/// What the pods observe: web resolves an allowed name and one outside its DNS rules
/// (`*.example.com`), connects to an
/// allowed and another address; plain (no policy) connects to the other address.
fn observe(web: &Pod, plain: &Pod) -> Vec<String> {
    let status = |name: &str| {
        let r = web.resolve(name, RecordType::A, Transport::Udp).unwrap();
        format!("{name}: {:?}", r.status)
    };
    let tcp = |who: &str, pod: &Pod, addr: &str| {
        let o = reach(pod, ip(addr), 443);
        format!(
            "{who} -> {addr}: {}",
            if blocked(o) { "blocked" } else { "reached" }
        )
    };
    vec![
        status("api.example.com"),
        status("evil.example.org"),
        tcp("web", web, "192.0.2.10"),
        tcp("web", web, "192.0.2.50"),
        tcp("plain", plain, "192.0.2.50"),
    ]
}

fn eventually(what: &str, mut check: impl FnMut() -> bool, diag: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: timed out\n{}", diag());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn diag(daemon: &Daemon, lab: &Lab) -> String {
    let nft = lab
        .node()
        .command("nft")
        .args(["list", "table", "inet", "dnsfence"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    format!("log:\n{}\ntable:\n{nft}", daemon.log())
}

/// A fake API server listening on the node's loopback, where the agent runs.
fn api_in_node(lab: &Lab) -> FakeApiServer {
    let listener = lab
        .node()
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    FakeApiServer::start_on(listener)
}

/// `dnsfence agent` in Kubernetes mode (watching `api`) and `dnsfence proxy --agent`.
fn start_agent(lab: &Lab, api: &FakeApiServer) -> Daemon {
    start_agent_with(lab, api, "")
}

/// As [`start_agent`], with more keys of the `kubernetes` section (`, key: value`).
fn start_agent_with(lab: &Lab, api: &FakeApiServer, kubernetes: &str) -> Daemon {
    // The daemon's own directory, removed with it.
    let dir = std::env::temp_dir().join(format!("dnsfence-{}", lab.node().name()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    Daemon::start_split(
        lab,
        &DaemonSpec {
            exe: env!("CARGO_BIN_EXE_dnsfence").into(),
            // No policy in the file (an empty file is refused: it looks truncated).
            policy: "apiVersion: v1\nkind: List\nitems: []\n".to_owned(),
            config_extra: format!(
                "kubernetes: {{enabled: true, node_name: {NODE}, kubeconfig: {}{kubernetes}}}\n",
                kubeconfig.display()
            ),
        },
    )
    .unwrap()
}

/// This node's pod `web` (app=web, the lab's first pod) and CoreDNS on another node, at
/// the lab's DNS server address.
fn web_and_remote_dns(api: &FakeApiServer, lab: &Lab) {
    let web = lab.pod(0);
    api.apply(
        "pods",
        pod_object("web", NODE, json!({"app": "web"}), &[web.ipv4().into()]),
    );
    api.apply(
        "pods",
        pod_object(
            "coredns",
            "node-2",
            json!({"k8s-app": "kube-dns"}),
            &[lab.dns_server_v4().ip()],
        ),
    );
}

/// Waits until web is enforced by [`policy`]'s rules (other addresses blocked), then
/// checks that the allowed name resolves and connects and that plain is not enforced.
fn enforced_as_written(web: &Pod, plain: &Pod, d: impl Fn() -> String) {
    eventually(
        "web is enforced",
        || blocked(reach(web, ip("192.0.2.50"), 443)),
        &d,
    );
    let r = web
        .resolve("api.example.com", RecordType::A, Transport::Udp)
        .unwrap();
    assert_eq!(r.status, DnsStatus::NoError, "{}", d());
    assert_eq!(
        reach(web, ip("192.0.2.10"), 443),
        Outcome::Connected,
        "{}",
        d()
    );
    assert_eq!(reach(plain, ip("192.0.2.50"), 443), Outcome::Connected);
}

/// Waits until the agent has reconciled the listed cluster and the proxy has its snapshot.
fn in_force(daemon: &Daemon, d: impl Fn() -> String) {
    eventually(
        "the agent reconciles once listed",
        || daemon.log().contains("cluster state in force"),
        &d,
    );
    eventually(
        "the proxy has the cluster's snapshot",
        || daemon.log().matches("snapshot in force").count() >= 1,
        &d,
    );
}

fn standalone_observations() -> Vec<String> {
    let lab = lab();
    let (web, plain) = (lab.pod(0), lab.pod(1));
    let mut doc = policy(&["api.example.com"]);
    doc["kind"] = json!("EgressPolicy");
    let config = format!(
        "endpoints:\n  - {{name: web, namespace: shop, labels: {{app: web}}, ips: [{}, \"{}\"]}}\n  - {{name: plain, namespace: shop, labels: {{app: plain}}, ips: [{}, \"{}\"]}}\n  - {{name: kube-dns, namespace: kube-system, labels: {{k8s-app: kube-dns}}, ips: [{}, \"{}\"], remote: true}}\n",
        web.ipv4(),
        web.ipv6(),
        plain.ipv4(),
        plain.ipv6(),
        lab.dns_server_v4().ip(),
        lab.dns_server_v6().ip(),
    );
    let daemon = Daemon::start_split(
        &lab,
        &DaemonSpec {
            exe: env!("CARGO_BIN_EXE_dnsfence").into(),
            policy: serde_json::to_string(&doc).unwrap(),
            config_extra: config,
        },
    )
    .unwrap();
    eventually(
        "standalone proxy in sync",
        || daemon.log().contains("snapshot in force"),
        || daemon.log(),
    );
    observe(web, plain)
}

#[test]
fn egress_policy_objects_are_enforced_as_in_standalone_mode_and_lifted_on_delete() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let lab = lab();
    let (web, plain) = (lab.pod(0), lab.pod(1));
    let api = api_in_node(&lab);
    let dns4 = lab.dns_server_v4().ip();
    let dns6 = lab.dns_server_v6().ip();
    api.apply(
        "namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "shop", "labels": {"team": "checkout"}}}),
    );
    api.apply(
        "namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}}),
    );
    let web_pod = pod_object(
        "web",
        NODE,
        json!({"app": "web"}),
        &[web.ipv4().into(), web.ipv6().into()],
    );
    api.apply("pods", web_pod.clone());
    api.apply(
        "pods",
        pod_object(
            "plain",
            NODE,
            json!({"app": "plain"}),
            &[plain.ipv4().into(), plain.ipv6().into()],
        ),
    );
    // CoreDNS runs on another node; pods query its Service, whose ClusterIPs are the
    // lab's DNS server addresses.
    api.apply(
        "pods",
        pod_object(
            "coredns",
            "node-2",
            json!({"k8s-app": "kube-dns"}),
            &[ip("10.244.9.53")],
        ),
    );
    api.apply(
        "services",
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "kube-dns", "namespace": "kube-system"},
               "spec": {"selector": {"k8s-app": "kube-dns"},
                        "clusterIP": dns4.to_string(),
                        "clusterIPs": [dns4.to_string(), dns6.to_string()],
                        "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}),
    );
    api.apply("egresspolicies", policy(&["api.example.com"]));
    let daemon = start_agent(&lab, &api);
    let d = || diag(&daemon, &lab);
    in_force(&daemon, d);
    let in_kubernetes = observe(web, plain);
    assert_eq!(
        in_kubernetes,
        [
            "api.example.com: NoError",
            "evil.example.org: Refused",
            "web -> 192.0.2.10: reached",
            "web -> 192.0.2.50: blocked",
            "plain -> 192.0.2.50: reached",
        ],
        "{}",
        d()
    );
    assert_eq!(
        in_kubernetes,
        standalone_observations(),
        "same as standalone"
    );

    // A policy change reaches the kernel.
    api.apply(
        "egresspolicies",
        policy(&["api.example.com", "other.example.com"]),
    );
    eventually(
        "the changed policy allows other.example.com",
        || {
            web.resolve("other.example.com", RecordType::A, Transport::Udp)
                .is_ok_and(|r| r.status == DnsStatus::NoError)
                && reach(web, ip("192.0.2.50"), 443) == Outcome::Connected
        },
        d,
    );

    // A bad edit of the configuration file (a mounted ConfigMap changes without a
    // SIGHUP) does not hold back the cluster's changes: files are read on SIGHUP only.
    std::fs::write(daemon.config_path(), "kubernetes: [not, valid\n").unwrap();

    // Deleting the policy lifts it: web is no longer enforced.
    api.delete("egresspolicies", Some("shop"), "web-egress");
    eventually(
        "deleting the policy lifts it",
        || reach(web, ip("198.51.100.1"), 443) == Outcome::Connected,
        d,
    );

    // Enforced again, then the pod is deleted: its address is no longer enforced.
    api.apply("egresspolicies", policy(&["api.example.com"]));
    eventually(
        "the policy is back",
        || blocked(reach(web, ip("192.0.2.50"), 443)),
        d,
    );
    api.delete("pods", Some("shop"), "web");
    eventually(
        "deleting the pod removes its enforcement",
        || reach(web, ip("192.0.2.50"), 443) == Outcome::Connected,
        d,
    );
}

#[test]
fn an_invalid_policy_version_posts_an_event_and_the_valid_one_stays() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let lab = lab();
    let (web, plain) = (lab.pod(0), lab.pod(1));
    let api = api_in_node(&lab);
    // This time the DNS server is a kube-dns pod of another node, queried directly.
    web_and_remote_dns(&api, &lab);
    api.apply("egresspolicies", policy(&["api.example.com"]));
    let daemon = start_agent(&lab, &api);
    let d = || diag(&daemon, &lab);
    in_force(&daemon, d);
    eventually("enforced", || blocked(reach(web, ip("192.0.2.50"), 443)), d);
    // An L7 rule dnsfence cannot enforce: rejected, the valid version stays.
    let mut bad = policy(&["api.example.com", "other.example.com"]);
    bad["spec"]["egress"][1]["toPorts"][0]["rules"] = json!({"http": [{"method": "GET"}]});
    api.apply("egresspolicies", bad);
    eventually(
        "a Warning Event names the field",
        || {
            api.posted_events().iter().any(|e| {
                e["reason"] == "InvalidPolicy"
                    && e["type"] == "Warning"
                    && e["regarding"]["name"] == "web-egress"
                    && e["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("spec.egress[1].toPorts[0].rules.http"))
            })
        },
        || format!("events: {:?}\n{}", api.posted_events(), d()),
    );
    assert!(
        blocked(reach(web, ip("192.0.2.50"), 443)),
        "the previous valid version stays in force\n{}",
        d()
    );
    let r = web
        .resolve("api.example.com", RecordType::A, Transport::Udp)
        .unwrap();
    assert_eq!(r.status, DnsStatus::NoError, "{}", d());
    assert_eq!(
        reach(web, ip("192.0.2.10"), 443),
        Outcome::Connected,
        "{}",
        d()
    );
    assert_eq!(reach(plain, ip("192.0.2.50"), 443), Outcome::Connected);
}

#[test]
fn a_cluster_policy_selects_by_namespace_labels_and_follows_them() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let lab = lab();
    let (web, plain) = (lab.pod(0), lab.pod(1));
    let api = api_in_node(&lab);
    let shop = |labels: Value| {
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "shop", "labels": labels}})
    };
    api.apply("namespaces", shop(json!({"egress": "restricted"})));
    web_and_remote_dns(&api, &lab);
    // Every pod of a namespace labelled egress=restricted, whatever its own labels.
    let mut spec = spec(&["api.example.com"]);
    spec["endpointSelector"] =
        json!({"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.egress": "restricted"}});
    api.apply(
        "clusteregresspolicies",
        json!({"apiVersion": "dnsfence.io/v1alpha1", "kind": "ClusterEgressPolicy",
               "metadata": {"name": "restricted-namespaces"}, "spec": spec}),
    );
    let daemon = start_agent(&lab, &api);
    let d = || diag(&daemon, &lab);
    in_force(&daemon, d);
    enforced_as_written(web, plain, d);
    // The namespace loses its label: the policy no longer selects its pods.
    api.apply("namespaces", shop(json!({})));
    eventually(
        "relabelling the namespace lifts the policy",
        || reach(web, ip("192.0.2.50"), 443) == Outcome::Connected,
        d,
    );
}

#[test]
fn cilium_policies_are_enforced_unchanged_with_the_watch_flag() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let lab = lab();
    let (web, plain) = (lab.pod(0), lab.pod(1));
    let api = api_in_node(&lab);
    api.register_crd("ciliumnetworkpolicies.cilium.io");
    api.register_crd("ciliumclusterwidenetworkpolicies.cilium.io");
    web_and_remote_dns(&api, &lab);
    // An existing Cilium policy, as written for Cilium or ACNS.
    let mut cnp = policy(&["api.example.com"]);
    cnp["apiVersion"] = json!("cilium.io/v2");
    cnp["kind"] = json!("CiliumNetworkPolicy");
    api.apply("ciliumnetworkpolicies", cnp);
    let daemon = start_agent_with(&lab, &api, ", watch_cilium_policies: true");
    let d = || diag(&daemon, &lab);
    in_force(&daemon, d);
    enforced_as_written(web, plain, d);
    api.delete("ciliumnetworkpolicies", Some("shop"), "web-egress");
    eventually(
        "deleting it lifts it",
        || reach(web, ip("192.0.2.50"), 443) == Outcome::Connected,
        d,
    );
}
