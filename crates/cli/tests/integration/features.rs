//! Policy features beyond the peers, in the lab: audit mode, search lists that just work
//! (a musl-style stub resolver), and Kubernetes service names behind a DNAT.

use crate::common;

use std::net::IpAddr;
use std::process::Stdio;
use std::time::Duration;

use common::{a, blocked, env_config, ip, observe, reach, resolve};
use dnsfence_lab::{DnsStatus, Outcome, Pod, Rec, RecordType, Transport};

#[test]
fn audit_mode_lets_traffic_through_and_records_what_would_be_denied() {
    let Some(env) = env_config(vec![], "audit: true\n") else {
        return;
    };
    // A name no DNS rule allows: forwarded (the world answers), recorded as audit.
    assert_eq!(
        resolve(env.web(), "nope.example.org", RecordType::A, Transport::Udp).0,
        DnsStatus::NxDomain
    );
    // A destination no rule allows: reached, recorded as audit with its reason.
    assert_eq!(
        reach(env.web(), ip("203.0.113.66"), 443),
        Outcome::Connected
    );
    // egressDeny of an audit-mode policy is not enforced either.
    assert_eq!(
        reach(env.web(), ip("198.51.100.66"), 80),
        Outcome::Connected
    );
    std::thread::sleep(Duration::from_millis(300));
    let audit = observe(&env, &["--verdict", "audit"]);
    assert!(
        audit
            .iter()
            .any(|f| f["dns"]["query"] == "nope.example.org"),
        "{audit:#?}"
    );
    assert!(audit
        .iter()
        .any(|f| f["destination"]["ip"] == "203.0.113.66"
            && f["drop_reason_desc"] == "audit-policy-denied"));
    assert!(audit
        .iter()
        .any(|f| f["destination"]["ip"] == "198.51.100.66"
            && f["drop_reason_desc"] == "audit-egress-deny"));
    assert!(observe(&env, &["--verdict", "denied"]).is_empty());
}

/// Resolves `name` as musl's `getaddrinfo` does with `ndots:5` and `search`: each
/// candidate in turn, moving on only on NXDOMAIN (or an empty NOERROR); any other answer
/// (REFUSED, SERVFAIL, no answer) ends the lookup with an error.
fn musl_getaddrinfo(pod: &Pod, name: &str, search: &[&str]) -> Result<Vec<IpAddr>, String> {
    let dots = name.matches('.').count();
    let mut candidates: Vec<String> = Vec::new();
    if dots < 5 {
        candidates.extend(search.iter().map(|s| format!("{name}.{s}")));
    }
    candidates.push(name.to_owned());
    for c in candidates {
        let r = pod.resolve(&c, RecordType::A, Transport::Udp).unwrap();
        match r.status {
            DnsStatus::NoError if !r.ips.is_empty() => return Ok(r.ips),
            DnsStatus::NoError | DnsStatus::NxDomain => continue,
            other => return Err(format!("{c}: {other}")),
        }
    }
    Err("not found".into())
}

#[test]
fn search_lists_just_work_for_allowed_names_and_teach_nothing() {
    let search = [
        "default.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
    ];
    let config =
        "dns: {search_suffixes: [default.svc.cluster.local, svc.cluster.local, cluster.local]}\n";
    // A search candidate that exists upstream: answered, but its IP must not be learned.
    let Some(env) = env_config(
        vec![Rec::Addr(
            "api.example.com.cluster.local",
            60,
            ip("192.0.2.99"),
        )],
        config,
    ) else {
        return;
    };
    assert_eq!(
        musl_getaddrinfo(env.web(), "a.cdn.example.com", &search),
        Ok(vec![ip("192.0.2.21")])
    );
    assert_eq!(reach(env.web(), ip("192.0.2.21"), 443), Outcome::Connected);
    // The candidate answered with an address: the stub stops there (as musl does), and
    // that address stays unreachable: the candidate's name is not allowed.
    assert_eq!(
        musl_getaddrinfo(env.web(), "api.example.com", &search),
        Ok(vec![ip("192.0.2.99")])
    );
    assert!(blocked(reach(env.web(), ip("192.0.2.99"), 443)));
    // The policy forwarded it: its flow says allowed, not unfiltered.
    let flows = common::observe(&env, &["--name", "api.example.com.cluster.local"]);
    assert!(
        !flows.is_empty() && flows.iter().all(|f| f["verdict"] == "allowed"),
        "{flows:#?}"
    );
    // A denied name is refused at the first candidate, as before.
    let denied = musl_getaddrinfo(env.web(), "blocked.example.org", &search);
    assert!(denied.unwrap_err().contains("REFUSED"));
}

#[test]
fn without_search_suffixes_a_musl_lookup_is_refused() {
    let search = [
        "default.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
    ];
    let Some(env) = env_config(vec![], "") else {
        return;
    };
    let r = musl_getaddrinfo(env.web(), "a.cdn.example.com", &search);
    assert!(r.unwrap_err().contains("REFUSED"));
}

#[test]
fn a_service_name_allows_exactly_its_service_behind_kube_proxy_dnat() {
    let records = vec![
        Rec::Addr("api.payments.svc.cluster.local", 30, ip("10.96.5.5")),
        Rec::Addr("db.payments.svc.cluster.local", 30, ip("10.96.5.6")),
        // An allowed external name pointing at a ClusterIP.
        Rec::Addr("alias.cdn.example.com", 30, ip("10.96.5.6")),
    ];
    // With the service range declared, only the cluster's service names teach its
    // addresses.
    let Some(env) = env_config(records, "cluster_cidrs: [10.96.0.0/12]\n") else {
        return;
    };
    // kube-proxy's part: ClusterIPs DNATed to backends in the world.
    let rules = "table ip kubeproxy {
        chain pre { type nat hook prerouting priority dstnat; policy accept;
          ip daddr 10.96.5.5 tcp dport 443 dnat to 192.0.2.80:443
          ip daddr 10.96.5.6 tcp dport 443 dnat to 192.0.2.81:443
        }
      }";
    let mut child = env
        .lab
        .node()
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), rules.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    // The web policy allows api.payments.svc.cluster.local (see the reload below).
    let policy = common::POLICY.replace(
        "{matchName: short.example.com}]",
        "{matchName: short.example.com}, {matchName: api.payments.svc.cluster.local}]",
    );
    let policy = policy.replace(
        "{matchName: evil.example.org}]}",
        "{matchName: evil.example.org}, {matchPattern: \"*.payments.svc.cluster.local\"}]}",
    );
    env.daemon.reload(&policy).unwrap();
    assert_eq!(
        a(env.web(), "api.payments.svc.cluster.local"),
        [ip("10.96.5.5")]
    );
    assert_eq!(
        reach(env.web(), ip("10.96.5.5"), 443),
        Outcome::Connected,
        "{}",
        env.diag()
    );
    // Another service of the same namespace: resolvable, not allowed.
    assert_eq!(
        a(env.web(), "db.payments.svc.cluster.local"),
        [ip("10.96.5.6")]
    );
    assert!(blocked(reach(env.web(), ip("10.96.5.6"), 443)));
    // Nor through an allowed name outside the cluster that points at it.
    assert_eq!(a(env.web(), "alias.cdn.example.com"), [ip("10.96.5.6")]);
    assert!(blocked(reach(env.web(), ip("10.96.5.6"), 443)));
    // The backend itself was never resolved: not reachable directly.
    assert!(blocked(reach(env.web(), ip("192.0.2.80"), 443)));
}

#[test]
fn a_denied_name_behind_a_wildcard_dns_rule_is_refused_and_its_ip_unreachable() {
    let Some(env) = env_config(
        vec![
            Rec::Addr("tracker.example.com", 60, ip("192.0.2.66")),
            Rec::Addr("cdn.example.com", 60, ip("192.0.2.67")),
        ],
        "",
    ) else {
        return;
    };
    let policy = r#"
apiVersion: dnsfence.io/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
    - toCIDR: [192.0.2.53/32, "2001:db8::53/128"]
      toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
    - toEntities: [world]
  egressDeny:
    - toFQDNs: [{matchName: tracker.example.com}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: other, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: other}}
  egress:
    - toCIDR: [192.0.2.53/32, "2001:db8::53/128"]
      toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
    - toFQDNs: [{matchName: other.example.com}]
"#;
    env.daemon.reload(policy).unwrap();
    // Deny wins over the `*` DNS rule...
    assert_eq!(
        resolve(
            env.web(),
            "tracker.example.com",
            RecordType::A,
            Transport::Udp
        )
        .0,
        DnsStatus::Refused
    );
    // ...and over the `world` entity, once the name's IP is known (another pod resolved it).
    assert_eq!(a(env.other(), "tracker.example.com"), [ip("192.0.2.66")]);
    assert!(
        blocked(reach(env.web(), ip("192.0.2.66"), 443)),
        "{}",
        env.diag()
    );
    // Everything else the policy allows still works.
    assert_eq!(a(env.web(), "cdn.example.com"), [ip("192.0.2.67")]);
    assert_eq!(reach(env.web(), ip("192.0.2.67"), 443), Outcome::Connected);
    std::thread::sleep(Duration::from_millis(300));
    let denied = observe(
        &env,
        &["--verdict", "denied", "--name", "tracker.example.com"],
    );
    assert!(denied.iter().any(|f| f["type"] == "dns"), "{denied:#?}");
    assert!(denied
        .iter()
        .any(|f| f["type"] == "drop" && f["drop_reason_desc"] == "egress-deny"));
}

#[test]
fn a_cluster_network_policy_with_domain_names_behaves_as_specified() {
    let Some(env) = env_config(vec![Rec::Addr("cdn.example.com", 60, ip("192.0.2.23"))], "") else {
        return;
    };
    let policy = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: web-allowlist}
spec:
  tier: Admin
  priority: 10
  subject:
    pods:
      namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: default}}
      podSelector: {matchLabels: {app: web}}
  egress:
    - name: dns
      action: Accept
      to:
        - networks: ["192.0.2.53/32"]
      protocols:
        - udp: {destinationPort: {number: 53}}
        - tcp: {destinationPort: {number: 53}}
    - name: cdn
      action: Accept
      to:
        - domainNames: ["*.cdn.example.com", "api.example.com"]
      protocols:
        - tcp: {destinationPort: {number: 443}}
    - name: everything-else
      action: Deny
      to:
        - networks: ["0.0.0.0/0", "::/0"]
"#;
    env.daemon.reload(policy).unwrap();
    // DNS is not filtered by domainNames (NPEP-133), but only the listed names open.
    for (name, addr) in [
        ("a.cdn.example.com", "192.0.2.21"),
        ("x.y.deep.example.net", "192.0.2.31"),
        ("cdn.example.com", "192.0.2.23"),
    ] {
        assert_eq!(a(env.web(), name), [ip(addr)], "{name}");
    }
    // `*.` matches one or more labels, never the apex; exact names only themselves.
    assert_eq!(
        reach(env.web(), ip("192.0.2.21"), 443),
        Outcome::Connected,
        "{}",
        env.diag()
    );
    assert!(
        blocked(reach(env.web(), ip("192.0.2.21"), 80)),
        "protocols narrow"
    );
    assert!(blocked(reach(env.web(), ip("192.0.2.23"), 443)), "apex");
    assert!(
        blocked(reach(env.web(), ip("192.0.2.31"), 443)),
        "not listed"
    );
    assert_eq!(a(env.web(), "api.example.com"), [ip("192.0.2.10")]);
    assert_eq!(reach(env.web(), ip("192.0.2.10"), 443), Outcome::Connected);
    // Pods the subject does not select are untouched.
    assert_eq!(
        reach(env.plain(), ip("192.0.2.31"), 443),
        Outcome::Connected
    );
}
