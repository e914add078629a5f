#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

use super::*;
use dnsfence_policy::{Endpoint, Labels, PolicyLoader};

mod golden;

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
    - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
      toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
    - toFQDNs: [{matchName: api.example.com}, {matchPattern: "*.cdn.example.com"}]
      toPorts: [{ports: [{port: "443", protocol: TCP}]}]
    - toCIDRSet: [{cidr: 198.51.100.0/24, except: [198.51.100.128/25]}]
  egressDeny:
    - toCIDR: [198.51.100.66/32]
"#;

fn policies() -> PolicySet {
    let mut loader = PolicyLoader::new();
    loader.add("p.yaml", POLICY);
    assert!(!loader.has_errors(), "{:?}", loader.diagnostics());
    loader.finish().0
}

fn ep(
    name: &str,
    ns: &str,
    labels: &[(&str, &str)],
    ips: &[&str],
) -> (String, Endpoint, Vec<IpAddr>) {
    let labels = Labels::new(labels.iter().map(|(k, v)| (*k, (*v).to_owned()))).unwrap();
    (
        name.to_owned(),
        Endpoint::new(ns, labels),
        ips.iter().map(|i| i.parse().unwrap()).collect(),
    )
}

fn options() -> Options {
    Options {
        table: "dnsfence".into(),
        deny_action: DenyAction::Reject,
        fwmark: 0x4e53,
        ct_mark: 0x0040_0000,
        tproxy_port: Some(15053),
        route_table: 20053,
        log_group: Some(20053),
        never_learn: vec![
            "127.0.0.0/8".parse().unwrap(),
            "169.254.0.0/16".parse().unwrap(),
            "::ffff:0:0/96".parse().unwrap(),
        ],
        dns_rate_limit: Some(5000),
    }
}

fn inventory(set: &PolicySet) -> Inventory {
    Inventory::resolve(
        set,
        [
            ep(
                "web-1",
                "default",
                &[("app", "web")],
                &["10.0.0.2", "fd00::2"],
            ),
            ep("web-2", "default", &[("app", "web")], &["10.0.0.3"]),
            ep("other", "default", &[("app", "other")], &["10.0.0.9"]),
            ep(
                "coredns",
                "kube-system",
                &[("k8s-app", "kube-dns")],
                &["10.96.0.10"],
            ),
        ],
        vec!["10.0.0.1".parse().unwrap()],
    )
}

#[test]
fn endpoints_with_the_same_rules_share_one_chain_and_unenforced_ones_are_absent() {
    let set = policies();
    let r = render(
        &set,
        &inventory(&set),
        &BTreeMap::new(),
        &options(),
        &Existing::default(),
    );
    assert!(
        r.script.contains(
            "add element inet dnsfence ep4 { 10.0.0.2 : jump pol_0, 10.0.0.3 : jump pol_0 }"
        ),
        "{}",
        r.script
    );
    assert!(r
        .script
        .contains("add element inet dnsfence ep6 { fd00::2 : jump pol_0 }"));
    assert!(
        !r.script.contains("10.0.0.9 :"),
        "an endpoint no policy enforces is not dispatched"
    );
    assert!(!r.script.contains("pol_1"));
    assert_eq!(r.enforced, 3);
}

#[test]
fn fqdn_selectors_get_timeout_sets_with_ports_and_deny_comes_first() {
    let set = policies();
    let r = render(
        &set,
        &inventory(&set),
        &BTreeMap::new(),
        &options(),
        &Existing::default(),
    );
    assert_eq!(r.fqdn_sets.len(), 2);
    let api = set
        .fqdn_selectors()
        .iter()
        .find(|(_, p)| p.as_str() == "api.example.com")
        .unwrap();
    let v4 = fqdn_set_name(&api.1, false);
    assert!(r.script.contains(&format!(
        "add set inet dnsfence {v4} {{ type ipv4_addr; flags timeout;"
    )));
    assert!(
        r.script.contains(&format!(
            "add rule inet dnsfence pol_0 ip daddr @{v4} ip daddr != @never4 fib daddr type unicast tcp dport 443 accept"
        )),
        "{}",
        r.script
    );
    // Through a DNAT (a Service's ClusterIP), judged by the address the pod asked for.
    assert!(
        r.script.contains(&format!(
            "add rule inet dnsfence pol_0 ct status dnat ct original ip daddr @{v4} ct original ip daddr != @never4 tcp dport 443 accept"
        )),
        "{}",
        r.script
    );
    // No learned IP opens a never-learn range, nor the node (fib: local), whatever the
    // sets hold: every accept of a selector set says so.
    for line in r
        .script
        .lines()
        .filter(|l| l.contains(&format!("@{v4}")) && l.ends_with("accept"))
    {
        assert!(line.contains("!= @never4"), "{line}");
    }
    assert!(r
        .script
        .contains("add element inet dnsfence never4 { 127.0.0.0/8, 169.254.0.0/16 }"));
    assert!(
        r.script
            .contains("add element inet dnsfence never6 { ::ffff:0.0.0.0/96 }"),
        "{}",
        r.script
    );
    // Selector sets are never flushed by a reconcile (learned IPs survive it).
    assert!(!r.script.contains(&format!("flush set inet dnsfence {v4}")));
    let deny = r.script.find("198.51.100.66/32").unwrap();
    let allow = r.script.find("198.51.100.0/24").unwrap();
    assert!(deny < allow, "egressDeny is rendered before allows");
    assert!(r.script.contains("ip daddr 198.51.100.0/24 ip daddr != @cluster4 ip daddr != { 198.51.100.128/25 } accept"), "{}", r.script);
    // The kube-dns peer on its DNS port: ANY opens only UDP and TCP, which the proxy
    // checks; never SCTP, which would pass unfiltered.
    assert!(
        r.script
            .contains("ip daddr { 10.96.0.10 } udp dport 53 accept"),
        "{}",
        r.script
    );
    assert!(r
        .script
        .contains("ip daddr { 10.96.0.10 } tcp dport 53 accept"));
    assert!(!r.script.contains("sctp"), "{}", r.script);
    // The chain ends in the deny action.
    let last = r
        .script
        .lines()
        .rfind(|l| l.starts_with("add rule inet dnsfence pol_0 "))
        .unwrap();
    assert!(
        last.ends_with("counter reject with icmpx type admin-prohibited"),
        "{last}"
    );
}

#[test]
fn dns_of_enforced_endpoints_is_redirected_on_its_rule_ports() {
    let set = policies();
    let r = render(
        &set,
        &inventory(&set),
        &BTreeMap::new(),
        &options(),
        &Existing::default(),
    );
    assert!(r.script.contains("10.0.0.2 . udp . 53-53"), "{}", r.script);
    assert!(r.script.contains("10.0.0.2 . tcp . 53-53"));
    assert!(r.script.contains("fd00::2 . udp . 53-53"));
    assert!(r
        .script
        .contains("tproxy ip to :15053 meta mark set 0x4e53 accept"));
    let mut no_redirect = options();
    no_redirect.tproxy_port = None;
    let r = render(
        &set,
        &inventory(&set),
        &BTreeMap::new(),
        &no_redirect,
        &Existing::default(),
    );
    assert!(!r.script.contains("tproxy"));
}

#[test]
fn each_address_dns_is_metered_before_the_redirect() {
    let set = policies();
    let render_with = |o: &Options| {
        render(
            &set,
            &inventory(&set),
            &BTreeMap::new(),
            o,
            &Existing::default(),
        )
        .script
    };
    let script = render_with(&options());
    let meter = script
        .find("update @dnsrate4 { ip saddr limit rate over 5000/second burst 5000 packets } jump dns_limited")
        .unwrap_or_else(|| panic!("{script}"));
    assert!(script.contains(
        "tcp flags & (syn | ack) == syn ip saddr . meta l4proto . th dport @dns4 update @dnsrate4"
    ));
    assert!(script.contains("update @dnsrate6 { ip6 saddr limit rate over 5000/second"));
    // Metered before the redirect takes it, and the meters are never flushed.
    assert!(meter < script.find("tproxy ip to :15053").unwrap());
    assert!(!script.contains("flush set inet dnsfence dnsrate4"));
    assert!(script.contains("prefix \"dns-rate-limited\""));
    assert!(script.contains("add rule inet dnsfence dns_limited counter drop"));
    let mut unlimited = options();
    unlimited.dns_rate_limit = None;
    let script = render_with(&unlimited);
    assert!(
        !script.contains("dnsrate") && !script.contains("dns_limited"),
        "{script}"
    );
}

#[test]
fn objects_no_longer_wanted_are_deleted_in_the_same_transaction() {
    let set = policies();
    let existing = Existing::parse(
        "table inet dnsfence {\n\tset fq_00000000deadbeef_4 {\n\t}\n\tchain pol_7 {\n\t}\n\tchain forward {\n\t}\n}\n",
    );
    let r = render(
        &set,
        &inventory(&set),
        &BTreeMap::new(),
        &options(),
        &existing,
    );
    let flush = r.script.find("flush chain inet dnsfence pol_7").unwrap();
    let del = r.script.find("delete chain inet dnsfence pol_7").unwrap();
    let del_set = r
        .script
        .find("delete set inet dnsfence fq_00000000deadbeef_4")
        .unwrap();
    assert!(flush < del && del < del_set);
    assert!(!r.script.contains("delete chain inet dnsfence forward"));
}

#[test]
fn drop_action_has_no_reject() {
    let set = policies();
    let mut o = options();
    o.deny_action = DenyAction::Drop;
    let r = render(
        &set,
        &inventory(&set),
        &BTreeMap::new(),
        &o,
        &Existing::default(),
    );
    assert!(!r.script.contains("reject"));
    assert!(r.script.contains("pol_0 counter drop"));
}

#[test]
fn set_names_are_stable_and_distinct_per_pattern_and_family() {
    let set = policies();
    let names: Vec<String> = set
        .fqdn_selectors()
        .iter()
        .flat_map(|(_, p)| [fqdn_set_name(p, false), fqdn_set_name(p, true)])
        .collect();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4);
    assert!(names.iter().all(|n| n.len() <= 32));
    let again = policies();
    assert_eq!(fqdn_set_name(&again.fqdn_selectors()[0].1, false), names[0]);
}

#[test]
fn sources_are_validated_on_interfaces_of_enforced_endpoints() {
    let set = policies();
    let ifaces: BTreeMap<IpAddr, String> = [
        ("10.0.0.2", "pod0"),
        ("fd00::2", "pod0"),
        ("10.0.0.9", "pod9"),
        ("10.96.0.10", "pod0"),
    ]
    .iter()
    .map(|(ip, d)| (ip.parse().unwrap(), (*d).to_owned()))
    .collect();
    let r = render(
        &set,
        &inventory(&set),
        &ifaces,
        &options(),
        &Existing::default(),
    );
    // Only interfaces of enforced endpoints are checked (other: not enforced, pod9).
    assert!(
        r.script
            .contains("add element inet dnsfence ep_ifaces { \"pod0\" }"),
        "{}",
        r.script
    );
    // Every endpoint on such an interface may use its own address, enforced or not.
    assert!(r.script.contains("\"pod0\" . 10.0.0.2"));
    assert!(r.script.contains("\"pod0\" . 10.96.0.10"));
    assert!(r.script.contains("\"pod0\" . fd00::2"));
    assert!(!r.script.contains("\"pod9\""));
    assert!(r.script.contains(
        "iifname @ep_ifaces meta nfproto ipv4 iifname . ip saddr != @ep_src4 counter drop"
    ));
    // The check comes before the DNS redirect.
    let check = r.script.find("@ep_src4 counter drop").unwrap();
    let redirect = r.script.find("tproxy ip to").unwrap();
    assert!(check < redirect);
}

#[test]
fn refusals_are_logged_rate_limited_with_their_reason() {
    let set = policies();
    let r = render(
        &set,
        &inventory(&set),
        &BTreeMap::new(),
        &options(),
        &Existing::default(),
    );
    for reason in DropReason::ALL.into_iter().filter(|r| !r.is_audit()) {
        assert!(
            r.script
                .contains(&format!("log group 20053 prefix \"{}\"", reason.as_str())),
            "{reason:?}"
        );
        assert_eq!(DropReason::from_prefix(reason.as_str()), Some(reason));
    }
    assert!(r.script.contains("limit rate 200/second"));
    let mut quiet = options();
    quiet.log_group = None;
    let r = render(
        &set,
        &inventory(&set),
        &BTreeMap::new(),
        &quiet,
        &Existing::default(),
    );
    assert!(!r.script.contains(" log "));
}

#[test]
fn audit_endpoints_log_what_would_be_refused_and_let_it_through() {
    let text = POLICY.replace(
        "metadata: {name: web, namespace: default}",
        "metadata: {name: web, namespace: default, annotations: {dnsfence.io/audit: \"true\"}}",
    );
    assert_ne!(text, POLICY);
    let mut loader = PolicyLoader::new();
    loader.add("p.yaml", &text);
    assert!(!loader.has_errors(), "{:?}", loader.diagnostics());
    let set = loader.finish().0;
    let r = render(
        &set,
        &inventory(&set),
        &BTreeMap::new(),
        &options(),
        &Existing::default(),
    );
    let chain: Vec<&str> = r
        .script
        .lines()
        .filter(|l| l.starts_with("add rule inet dnsfence pol_0 "))
        .collect();
    assert!(
        chain.last().unwrap().ends_with("counter accept"),
        "{chain:#?}"
    );
    assert!(r.script.contains("prefix \"audit-policy-denied\""));
    // The audit policy's egressDeny is logged, never enforced.
    assert!(
        chain
            .iter()
            .any(|l| l.contains("198.51.100.66/32") && l.ends_with("prefix \"audit-egress-deny\"")),
        "{chain:#?}"
    );
    assert!(!chain
        .iter()
        .any(|l| l.contains("198.51.100.66/32") && l.contains("reject")));
    // DNS is still redirected: the proxy records what it would refuse.
    assert!(r.script.contains("10.0.0.2 . udp . 53-53"));
}

#[test]
fn an_egress_deny_without_default_deny_is_enforced_and_everything_else_stays_open() {
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: metadata-api, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  enableDefaultDeny: {egress: false}
  egress:
    - toEntities: [world]
  egressDeny:
    - toCIDR: [169.254.169.254/32]
"#;
    let mut loader = PolicyLoader::new();
    loader.add("p.yaml", text);
    assert!(!loader.has_errors(), "{:?}", loader.diagnostics());
    let set = loader.finish().0;
    let r = render(
        &set,
        &inventory(&set),
        &BTreeMap::new(),
        &options(),
        &Existing::default(),
    );
    let chain: Vec<&str> = r
        .script
        .lines()
        .filter(|l| l.starts_with("add rule inet dnsfence pol_0 "))
        .collect();
    assert!(
        chain
            .iter()
            .any(|l| l.contains("169.254.169.254") && l.contains("reject")),
        "{chain:#?}"
    );
    assert_eq!(
        *chain.last().unwrap(),
        "add rule inet dnsfence pol_0 accept"
    );
    assert_eq!(r.enforced, 0, "not in default-deny");
    // Its DNS is not redirected: it is not filtered either.
    assert!(!r.script.contains("10.0.0.2 . udp"));
}
