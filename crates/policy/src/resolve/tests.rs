use std::net::IpAddr;

use super::*;
use crate::diag::Diagnostic;
use crate::labels::Labels;
use crate::model::{Destination, Entity, PortProtocol, Protocol};
use crate::parse::parse_stream;

fn set(yaml: &str) -> PolicySet {
    let mut diags: Vec<Diagnostic> = Vec::new();
    let policies = parse_stream("t.yaml", yaml, &mut diags);
    let errors: Vec<String> = diags
        .iter()
        .filter(|d| d.is_error())
        .map(ToString::to_string)
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    PolicySet::new(policies)
}

fn ep(ns: &str, labels: &[(&str, &str)]) -> Endpoint {
    Endpoint::new(ns, Labels::new(labels.iter().copied()).unwrap())
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const KUBE_DNS_RULE: &str = r#"
    - toEndpoints:
        - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns: [{matchPattern: "*.example.com"}]
"#;

fn cnp(ns: &str, name: &str, selector: &str, egress: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  endpointSelector: {selector}\n  egress:{egress}\n---\n"
    )
}

#[test]
fn namespaced_policies_select_only_their_namespace() {
    let s = set(&cnp(
        "prod",
        "p",
        "{matchLabels: {app: web}}",
        KUBE_DNS_RULE,
    ));
    assert!(s.resolve(&ep("prod", &[("app", "web")])).enforced);
    assert!(!s.resolve(&ep("dev", &[("app", "web")])).enforced);
    assert!(!s.resolve(&ep("prod", &[("app", "db")])).enforced);
}

#[test]
fn clusterwide_policies_select_every_namespace() {
    let yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: c}}\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  egress:{KUBE_DNS_RULE}"
    );
    let s = set(&yaml);
    assert!(s.resolve(&ep("prod", &[("app", "web")])).enforced);
    assert!(s.resolve(&ep("dev", &[("any:app", "web")])).enforced);
}

#[test]
fn to_endpoints_is_scoped_to_the_policy_namespace_unless_it_names_one() {
    let egress = r#"
    - toEndpoints: [{matchLabels: {app: db}}]
    - toEndpoints: [{matchLabels: {app: cache, io.kubernetes.pod.namespace: shared}}]
"#;
    let s = set(&cnp("prod", "p", "{}", egress));
    let r = s.resolve(&ep("prod", &[]));
    let allowed = |dest: &Endpoint| {
        r.allows.iter().any(|a| {
            a.rule
                .peer
                .selects(&Destination::Endpoint(ip("10.0.0.9"), dest))
        })
    };
    assert!(allowed(&ep("prod", &[("app", "db")])));
    assert!(!allowed(&ep("dev", &[("app", "db")])));
    assert!(allowed(&ep("shared", &[("app", "cache")])));
    assert!(!allowed(&ep("prod", &[("app", "cache")])));
}

#[test]
fn default_deny_follows_cilium() {
    // `egress: [{}]` denies everything; ingress alone does not touch egress;
    // enableDefaultDeny.egress=false adds allows without enforcing; egressDeny enforces.
    let yaml = cnp("a", "deny-all", "{}", "\n    - {}\n")
        + "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: ing, namespace: b}\nspec:\n  endpointSelector: {}\n  ingress:\n    - fromEntities: [world]\n---\n"
        + "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: soft, namespace: c}\nspec:\n  endpointSelector: {}\n  enableDefaultDeny: {egress: false}\n  egress:\n    - toEntities: [world]\n---\n"
        + "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: deny, namespace: d}\nspec:\n  endpointSelector: {}\n  egressDeny:\n    - toEntities: [host]\n";
    let s = set(&yaml);
    let a = s.resolve(&ep("a", &[]));
    assert!(a.enforced);
    assert!(a.allows.is_empty(), "{{}} allows nothing: {:?}", a.allows);
    assert!(!s.resolve(&ep("b", &[])).enforced);
    let c = s.resolve(&ep("c", &[]));
    assert!(!c.enforced);
    assert_eq!(c.allows.len(), 1);
    let d = s.resolve(&ep("d", &[]));
    assert!(d.enforced);
    assert_eq!(d.denies.len(), 1);
}

#[test]
fn dns_decisions() {
    let s = set(&cnp("prod", "p", "{}", KUBE_DNS_RULE));
    let r = s.resolve(&ep("prod", &[]));
    let dns = ep("kube-system", &[("k8s-app", "kube-dns")]);
    let server = Destination::Endpoint(ip("10.96.0.10"), &dns);
    let d = r.dns_decision(b"WWW.example.com.", Some(&server), 53, Protocol::Tcp);
    assert!(d.allowed && d.proxied);
    assert!(
        matches!(d.reason, DnsReason::Pattern { pattern, .. } if pattern.as_str() == "*.example.com")
    );
    let d = r.dns_decision(b"example.com", Some(&server), 53, Protocol::Udp);
    assert_eq!((d.allowed, d.reason), (false, DnsReason::NoPatternMatches));
    let d = r.dns_decision(b"a.example.com", Some(&server), 54, Protocol::Udp);
    assert_eq!((d.allowed, d.reason), (false, DnsReason::NotCovered));
    let other = Destination::World(ip("192.0.2.1"));
    let d = r.dns_decision(b"a.example.com", Some(&other), 53, Protocol::Udp);
    assert_eq!((d.allowed, d.reason), (false, DnsReason::NotCovered));
    let d = r.dns_decision(b"a b.example.com", Some(&server), 53, Protocol::Udp);
    assert!(!d.allowed && matches!(d.reason, DnsReason::InvalidName(_)));
    // Without a server: any server the rules cover.
    assert!(
        r.dns_decision(b"a.example.com", None, 53, Protocol::Udp)
            .allowed
    );
}

#[test]
fn an_l4_rule_on_the_dns_port_allows_every_name() {
    let egress = format!("{KUBE_DNS_RULE}    - toEntities: [cluster]\n      toPorts: [{{ports: [{{port: \"53\"}}]}}]\n");
    let s = set(&cnp("prod", "p", "{}", &egress));
    let r = s.resolve(&ep("prod", &[]));
    let dns = ep("kube-system", &[("k8s-app", "kube-dns")]);
    let server = Destination::Endpoint(ip("10.96.0.10"), &dns);
    let d = r.dns_decision(b"anything.org", Some(&server), 53, Protocol::Udp);
    assert!(d.allowed && d.proxied, "{d:?}");
    assert!(matches!(d.reason, DnsReason::PortAllowed { .. }));
}

#[test]
fn deny_wins_over_allow() {
    let egress = format!("{KUBE_DNS_RULE}    - toEntities: [all]\n");
    let yaml = cnp("prod", "p", "{}", &egress)
        + "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: d, namespace: prod}\nspec:\n  endpointSelector: {}\n  egressDeny:\n    - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system}}]\n      toPorts: [{ports: [{port: \"53\", protocol: UDP}]}]\n";
    let s = set(&yaml);
    let r = s.resolve(&ep("prod", &[]));
    let dns = ep("kube-system", &[("k8s-app", "kube-dns")]);
    let server = Destination::Endpoint(ip("10.96.0.10"), &dns);
    let d = r.dns_decision(b"a.example.com", Some(&server), 53, Protocol::Udp);
    assert!(!d.allowed && matches!(d.reason, DnsReason::Denied { .. }));
    // TCP is not denied.
    assert!(
        r.dns_decision(b"a.example.com", Some(&server), 53, Protocol::Tcp)
            .allowed
    );
}

#[test]
fn cidr_rules_select_only_the_world_and_honour_except() {
    let egress = "\n    - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]\n";
    let s = set(&cnp("prod", "p", "{}", egress));
    let r = s.resolve(&ep("prod", &[]));
    let peer = &r.allows[0].rule.peer;
    assert!(peer.selects(&Destination::World(ip("10.2.3.4"))));
    assert!(!peer.selects(&Destination::World(ip("10.1.3.4"))));
    assert!(!peer.selects(&Destination::World(ip("11.0.0.1"))));
    let pod = ep("prod", &[]);
    assert!(!peer.selects(&Destination::Endpoint(ip("10.2.3.4"), &pod)));
    assert!(!peer.selects(&Destination::Host(ip("10.2.3.4"))));
}

#[test]
fn entities() {
    let pod = ep("x", &[]);
    let cases = [
        (Entity::World, Destination::World(ip("192.0.2.1")), true),
        (Entity::World, Destination::Host(ip("10.0.0.1")), false),
        (
            Entity::WorldIpv4,
            Destination::World(ip("2001:db8::1")),
            false,
        ),
        (
            Entity::WorldIpv6,
            Destination::World(ip("2001:db8::1")),
            true,
        ),
        (
            Entity::Cluster,
            Destination::Endpoint(ip("10.0.0.5"), &pod),
            true,
        ),
        (Entity::Cluster, Destination::Host(ip("10.0.0.1")), true),
        (Entity::Cluster, Destination::World(ip("192.0.2.1")), false),
        (Entity::Host, Destination::Host(ip("10.0.0.1")), true),
        (
            Entity::Host,
            Destination::Endpoint(ip("10.0.0.5"), &pod),
            false,
        ),
        (Entity::All, Destination::World(ip("192.0.2.1")), true),
    ];
    for (e, dest, want) in cases {
        assert_eq!(
            Peer::Entities(vec![e]).selects(&dest),
            want,
            "{e:?} {dest:?}"
        );
    }
}

#[test]
fn fqdn_selectors_are_shared_across_policies_and_carry_ports() {
    let egress1 = "\n    - toFQDNs: [{matchPattern: \"*.example.com\"}]\n      toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]\n";
    let egress2 =
        "\n    - toFQDNs: [{matchPattern: \"*.EXAMPLE.com.\"}, {matchName: api.example.com}]\n";
    let s = set(&(cnp("a", "one", "{}", egress1) + &cnp("b", "two", "{}", egress2)));
    assert_eq!(s.fqdn_selectors().len(), 2, "{:?}", s.fqdn_selectors());
    let name = FoldedName::new(b"api.example.com").unwrap();
    let mut ids = Vec::new();
    let _ = s.for_each_selector_match(&name, |id| {
        ids.push(id);
        ControlFlow::<()>::Continue(())
    });
    ids.sort();
    assert_eq!(ids, [SelectorId(0), SelectorId(1)]);
    let a = s.resolve(&ep("a", &[]));
    let mut hits = Vec::new();
    let _ = a.for_each_fqdn_match(&name, |f| {
        hits.push((f.pattern.as_str().to_owned(), f.ports.clone()));
        ControlFlow::<()>::Continue(())
    });
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].1[0].port, 443);
    let b = s.resolve(&ep("b", &[]));
    assert_eq!(b.fqdn_allows.len(), 2);
    assert_eq!(b.fqdn_allows[0].ports, [PortProtocol::ANY]);
}

/// A CiliumNetworkPolicy in audit mode (or not) whose spec is `spec_body`.
fn audit_cnp(ns: &str, name: &str, audit: bool, spec_body: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{dnsfence.io/audit: \"{audit}\", other.io/x: y}}\nspec:\n  endpointSelector: {{}}\n{spec_body}---\n"
    )
}

fn kube_dns() -> Endpoint {
    ep("kube-system", &[("k8s-app", "kube-dns")])
}

#[test]
fn an_endpoint_enforced_only_by_audit_policies_is_in_audit_mode() {
    let s = set(&audit_cnp(
        "prod",
        "p",
        true,
        &format!("  egress:{KUBE_DNS_RULE}"),
    ));
    assert!(s.policies()[0].audit);
    let r = s.resolve(&ep("prod", &[]));
    assert!(r.enforced && r.audit);
    let dns = kube_dns();
    let server = Destination::Endpoint(ip("10.96.0.10"), &dns);
    // What the audit policy allows is allowed, and not an audit verdict.
    let d = r.dns_decision(b"a.example.com", Some(&server), 53, Protocol::Udp);
    assert!(d.allowed && d.proxied && !d.audit && d.forwarded(), "{d:?}");
    // What it does not allow is denied as today, but only audited.
    let d = r.dns_decision(b"evil.org", Some(&server), 53, Protocol::Udp);
    assert_eq!(
        (d.allowed, d.audit, d.reason),
        (false, true, DnsReason::NoPatternMatches)
    );
    assert!(d.forwarded() && d.proxied);
    let d = r.dns_decision(b"a.example.com", Some(&server), 5353, Protocol::Udp);
    assert_eq!(
        (d.allowed, d.audit, d.reason),
        (false, true, DnsReason::NotCovered)
    );
    // An endpoint no policy selects is not enforced, so not in audit mode either.
    let other = s.resolve(&ep("dev", &[]));
    assert!(!other.enforced && !other.audit);
}

#[test]
fn one_enforcing_policy_enforces_and_audit_allows_still_count() {
    let audit_dns = "\n    - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system}}]\n      toPorts: [{ports: [{port: \"53\"}], rules: {dns: [{matchName: audited.org}]}}]\n";
    let yaml = audit_cnp("prod", "a", true, &format!("  egress:{audit_dns}"))
        + &audit_cnp("prod", "e", false, &format!("  egress:{KUBE_DNS_RULE}"));
    let s = set(&yaml);
    let r = s.resolve(&ep("prod", &[]));
    assert!(r.enforced && !r.audit, "the enforcing policy wins");
    let dns = kube_dns();
    let server = Destination::Endpoint(ip("10.96.0.10"), &dns);
    let d = r.dns_decision(b"audited.org", Some(&server), 53, Protocol::Udp);
    assert!(
        d.allowed,
        "an audit policy still allows what it allows: {d:?}"
    );
    assert!(matches!(d.reason, DnsReason::Pattern { rule, .. } if rule.policy.name == "a"));
    let d = r.dns_decision(b"evil.org", Some(&server), 53, Protocol::Udp);
    assert_eq!((d.allowed, d.audit), (false, false));
    assert!(!d.forwarded());
}

#[test]
fn audit_mode_egress_deny_would_deny_but_does_not() {
    let deny_dns = "  egressDeny:\n    - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system}}]\n      toPorts: [{ports: [{port: \"53\", protocol: UDP}]}]\n";
    let enforcing = audit_cnp("prod", "e", false, &format!("  egress:{KUBE_DNS_RULE}"));
    let s = set(&(enforcing.clone() + &audit_cnp("prod", "d", true, deny_dns)));
    let r = s.resolve(&ep("prod", &[]));
    assert!(r.enforced && !r.audit);
    assert!(r.denies.is_empty());
    assert_eq!(r.audit_denies.len(), 1);
    assert_eq!(r.audit_denies[0].policy.name, "d");
    let dns = kube_dns();
    let server = Destination::Endpoint(ip("10.96.0.10"), &dns);
    // Allowed by the enforcing policy, would be denied by the audit one: forwarded and
    // proxied as before, recorded as audit.
    let d = r.dns_decision(b"a.example.com", Some(&server), 53, Protocol::Udp);
    assert!(!d.allowed && d.audit && d.proxied && d.forwarded(), "{d:?}");
    assert!(matches!(d.reason, DnsReason::Denied { rule } if rule.policy.name == "d"));
    // Over TCP the audit deny does not apply.
    let d = r.dns_decision(b"a.example.com", Some(&server), 53, Protocol::Tcp);
    assert!(d.allowed && !d.audit);
    // An enforced denial is never turned into an audit one by an audit deny.
    let d = r.dns_decision(b"evil.org", Some(&server), 53, Protocol::Udp);
    assert_eq!(
        (d.allowed, d.audit, d.reason),
        (false, false, DnsReason::NoPatternMatches)
    );

    // The same deny from an enforcing policy denies, even for an endpoint in audit mode.
    let yaml = audit_cnp("prod", "a", true, &format!("  egress:{KUBE_DNS_RULE}"))
        + &audit_cnp(
            "prod",
            "d",
            false,
            &format!("  enableDefaultDeny: {{egress: false}}\n{deny_dns}"),
        );
    let r = set(&yaml).resolve(&ep("prod", &[]));
    assert!(
        r.enforced && r.audit,
        "enableDefaultDeny false does not enforce"
    );
    assert_eq!((r.denies.len(), r.audit_denies.len()), (1, 0));
    let d = r.dns_decision(b"a.example.com", Some(&server), 53, Protocol::Udp);
    assert!(!d.allowed && !d.audit && !d.forwarded(), "{d:?}");
    assert!(matches!(d.reason, DnsReason::Denied { .. }));
}

#[test]
fn an_audit_policy_with_only_egress_deny_audits_and_allows_everything_else() {
    let deny =
        "  egressDeny:\n    - toEntities: [all]\n      toPorts: [{ports: [{port: \"53\"}]}]\n";
    let r = set(&audit_cnp("prod", "d", true, deny)).resolve(&ep("prod", &[]));
    assert!(r.enforced && r.audit);
    // No server given: a deny of every destination applies.
    let d = r.dns_decision(b"x.org", None, 53, Protocol::Udp);
    assert!(!d.allowed && d.audit && !d.proxied);
    assert!(matches!(d.reason, DnsReason::Denied { .. }));
}

#[test]
fn the_global_switch_puts_every_policy_in_audit_mode_and_survives_reloads() {
    let deny = "  egressDeny:\n    - toCIDR: [169.254.169.254/32]\n";
    let yaml = audit_cnp(
        "prod",
        "e",
        false,
        &format!("  egress:{KUBE_DNS_RULE}{deny}"),
    );
    let plain = set(&yaml);
    assert!(!plain.global_audit());
    let r = plain.resolve(&ep("prod", &[]));
    assert!(r.enforced && !r.audit && r.denies.len() == 1);

    let audited = plain.clone().with_global_audit(true);
    assert!(audited.global_audit() && audited.is_audit(&audited.policies()[0]));
    let r = audited.resolve(&ep("prod", &[]));
    assert!(r.enforced && r.audit);
    assert_eq!((r.denies.len(), r.audit_denies.len()), (0, 1));
    let d = r.dns_decision(b"evil.org", None, 53, Protocol::Udp);
    assert!(!d.allowed && d.audit, "{d:?}");

    // A set built to replace it keeps the switch, until it is turned off.
    let policies: Vec<Policy> = audited.policies().iter().map(|p| (**p).clone()).collect();
    let next = PolicySet::succeeding(policies, &audited);
    assert!(next.global_audit() && next.resolve(&ep("prod", &[])).audit);
    let off = next.with_global_audit(false);
    assert!(!off.resolve(&ep("prod", &[])).audit);
}

/// A `dnsfence.io/v1alpha1` `EgressPolicy` selecting every endpoint of `ns`.
fn egress_policy(ns: &str, name: &str, annotations: &str, spec_body: &str) -> String {
    format!(
        "apiVersion: dnsfence.io/v1alpha1\nkind: EgressPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{{annotations}}}\nspec:\n  endpointSelector: {{}}\n{spec_body}---\n"
    )
}

/// DNS to kube-dns for every name (`*`), and the world on every port.
const ALLOW_ALL_DNS: &str = "  egress:\n    - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system}}]\n      toPorts: [{ports: [{port: \"53\"}], rules: {dns: [{matchPattern: \"*\"}]}}]\n    - toEntities: [world]\n";

#[test]
fn a_name_deny_beats_a_star_dns_rule_on_every_port() {
    let deny = "  egressDeny:\n    - toFQDNs: [{matchName: Evil.Example.com.}]\n      toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]\n";
    let s = set(&egress_policy(
        "prod",
        "p",
        "",
        &format!("{ALLOW_ALL_DNS}{deny}"),
    ));
    let r = s.resolve(&ep("prod", &[]));
    assert_eq!((r.denies.len(), r.fqdn_denies.len()), (1, 1));
    let dns = kube_dns();
    let server = Destination::Endpoint(ip("10.96.0.10"), &dns);
    let d = r.dns_decision(b"evil.example.COM", Some(&server), 53, Protocol::Udp);
    assert!(
        !d.allowed && !d.audit && d.proxied && !d.forwarded(),
        "{d:?}"
    );
    let DnsReason::Denied { rule } = d.reason else {
        panic!("{d:?}")
    };
    assert_eq!(
        (rule.policy.name.as_str(), rule.rule.path.as_str()),
        ("p", "spec.egressDeny[0]")
    );
    // The rule's toPorts (443) restrict the IP deny only, not the name deny.
    let name = FoldedName::new(b"evil.example.com").unwrap();
    let (deny_rule, fqdn) = r.fqdn_deny(&name, false).unwrap();
    assert_eq!(deny_rule, rule);
    assert_eq!(fqdn.pattern.as_str(), "evil.example.com");
    assert_eq!(fqdn.ports[0].port, 443);
    assert!(r.fqdn_deny(&name, true).is_none());
    // Any server, even one no DNS rule covers (dropped anyway, not proxied).
    let d = r.dns_decision(b"evil.example.com", None, 53, Protocol::Tcp);
    assert!(!d.allowed && matches!(d.reason, DnsReason::Denied { .. }));
    let other = Destination::World(ip("192.0.2.53"));
    let d = r.dns_decision(b"evil.example.com", Some(&other), 5353, Protocol::Udp);
    assert!(
        !d.allowed && matches!(d.reason, DnsReason::Denied { .. }),
        "{d:?}"
    );
    // Other names, and a subdomain of the denied name, are still allowed.
    for allowed in ["good.example.com", "a.evil.example.com", "example.com"] {
        let d = r.dns_decision(allowed.as_bytes(), Some(&server), 53, Protocol::Udp);
        assert!(d.allowed, "{allowed}: {d:?}");
    }
    // An invalid name matches no deny pattern either.
    let d = r.dns_decision(b"evil example.com", Some(&server), 53, Protocol::Udp);
    assert!(matches!(d.reason, DnsReason::InvalidName(_)), "{d:?}");
}

#[test]
fn a_wildcard_name_deny_carves_out_of_a_doublestar_allow() {
    let body = "  egress:\n    - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system}}]\n      toPorts: [{ports: [{port: \"53\"}], rules: {dns: [{matchPattern: \"**.example\"}]}}]\n    - toFQDNs: [{matchPattern: \"**.example\"}]\n  egressDeny:\n    - toFQDNs: [{matchPattern: \"*.evil.example\"}]\n";
    let s = set(&egress_policy("prod", "p", "", body));
    let r = s.resolve(&ep("prod", &[]));
    let dns = kube_dns();
    let server = Destination::Endpoint(ip("10.96.0.10"), &dns);
    let decide = |n: &str| r.dns_decision(n.as_bytes(), Some(&server), 53, Protocol::Udp);
    let d = decide("www.evil.example");
    assert!(
        !d.allowed && matches!(d.reason, DnsReason::Denied { .. }),
        "{d:?}"
    );
    // `*` stays in one label: deeper names and the apex are not denied.
    for n in ["evil.example", "a.b.evil.example", "good.example"] {
        let d = decide(n);
        assert!(
            d.allowed && matches!(d.reason, DnsReason::Pattern { .. }),
            "{n}: {d:?}"
        );
    }
    // The selectors of the name and their matches, allow and deny.
    let name = FoldedName::new(b"www.evil.example").unwrap();
    let mut denies = Vec::new();
    let _ = r.for_each_fqdn_deny_match(&name, |f| {
        denies.push(f.pattern.as_str().to_owned());
        ControlFlow::<()>::Continue(())
    });
    assert_eq!(denies, ["*.evil.example"]);
    assert!(r.fqdn_allows.len() == 1 && r.fqdn_denies.len() == 1);
}

#[test]
fn deny_selectors_are_interned_and_keep_their_ids() {
    let deny = "  egressDeny:\n    - toFQDNs: [{matchPattern: \"*.evil.example\"}, {matchName: api.example.com}]\n";
    let allow = "  egress:\n    - toFQDNs: [{matchName: api.example.com}]\n";
    let s = set(&egress_policy("prod", "p", "", &format!("{allow}{deny}")));
    let sels: Vec<(SelectorId, &str)> = s
        .fqdn_selectors()
        .iter()
        .map(|(id, p)| (*id, p.as_str()))
        .collect();
    // Allows first, then denies; a pattern used by both has one id.
    assert_eq!(
        sels,
        [
            (SelectorId(0), "api.example.com"),
            (SelectorId(1), "*.evil.example")
        ]
    );
    let evil = NamePattern::match_pattern("*.evil.example").unwrap();
    assert_eq!(s.selector_id(&evil), Some(SelectorId(1)));
    // Learned IPs are tracked for the deny selector.
    let mut ids = Vec::new();
    let _ = s.for_each_selector_match(&FoldedName::new(b"x.evil.example").unwrap(), |id| {
        ids.push(id);
        ControlFlow::<()>::Continue(())
    });
    assert_eq!(ids, [SelectorId(1)]);
    let r = s.resolve(&ep("prod", &[]));
    assert_eq!(r.fqdn_denies[0].selector, SelectorId(1));
    assert_eq!(r.fqdn_denies[1].selector, SelectorId(0));

    // A successor keeps the deny selector's id; a new selector gets a fresh one.
    let deny2 = "  egressDeny:\n    - toFQDNs: [{matchName: new.example}, {matchPattern: \"*.evil.example\"}]\n";
    let mut diags = Vec::new();
    let policies = parse_stream("t.yaml", &egress_policy("prod", "p", "", deny2), &mut diags);
    assert!(diags.is_empty(), "{diags:?}");
    let next = PolicySet::succeeding(policies, &s);
    assert_eq!(next.selector_id(&evil), Some(SelectorId(1)));
    let new = NamePattern::match_name("new.example").unwrap();
    assert_eq!(next.selector_id(&new), Some(SelectorId(2)));
    assert_eq!(next.fqdn_selectors().len(), 2);
}

#[test]
fn an_audit_mode_name_deny_is_recorded_not_enforced() {
    let deny = "  egressDeny:\n    - toFQDNs: [{matchName: tracker.example.com}]\n";
    let yaml = egress_policy("prod", "e", "", ALLOW_ALL_DNS)
        + &egress_policy("prod", "d", "dnsfence.io/audit: \"true\"", deny);
    let s = set(&yaml);
    let r = s.resolve(&ep("prod", &[]));
    assert!(r.enforced && !r.audit);
    assert_eq!((r.denies.len(), r.audit_denies.len()), (0, 1));
    assert!(r.fqdn_denies[0].audit);
    let dns = kube_dns();
    let server = Destination::Endpoint(ip("10.96.0.10"), &dns);
    let d = r.dns_decision(b"tracker.example.com", Some(&server), 53, Protocol::Udp);
    assert!(!d.allowed && d.audit && d.proxied && d.forwarded(), "{d:?}");
    assert!(matches!(d.reason, DnsReason::Denied { rule } if rule.policy.name == "d"));
    let name = FoldedName::new(b"tracker.example.com").unwrap();
    assert!(r.fqdn_deny(&name, false).is_none());
    assert_eq!(r.fqdn_deny(&name, true).unwrap().0.policy.name, "d");
    assert!(
        r.dns_decision(b"other.example.com", Some(&server), 53, Protocol::Udp)
            .allowed
    );

    // The same deny in an enforcing policy denies, also for an endpoint in audit mode.
    let yaml = egress_policy("prod", "e", "dnsfence.io/audit: \"true\"", ALLOW_ALL_DNS)
        + &egress_policy(
            "prod",
            "d",
            "",
            &format!("  enableDefaultDeny: {{egress: false}}\n{deny}"),
        );
    let r = set(&yaml).resolve(&ep("prod", &[]));
    assert!(r.enforced && r.audit);
    let d = r.dns_decision(b"tracker.example.com", Some(&server), 53, Protocol::Udp);
    assert!(!d.allowed && !d.audit && !d.forwarded(), "{d:?}");
    assert!(matches!(d.reason, DnsReason::Denied { rule } if rule.policy.name == "d"));
    // Under the global switch every deny only audits.
    let d = set(&yaml).with_global_audit(true).resolve(&ep("prod", &[]));
    let d = d.dns_decision(b"tracker.example.com", Some(&server), 53, Protocol::Udp);
    assert!(!d.allowed && d.audit && d.forwarded(), "{d:?}");
}

#[test]
fn the_most_specific_name_deny_decides() {
    let deny = "  egressDeny:\n    - toFQDNs: [{matchPattern: \"*\"}]\n    - toFQDNs: [{matchPattern: \"**.example.com\"}]\n    - toFQDNs: [{matchName: a.example.com}]\n";
    let r = set(&egress_policy(
        "prod",
        "p",
        "",
        &format!("{ALLOW_ALL_DNS}{deny}"),
    ))
    .resolve(&ep("prod", &[]));
    let path = |n: &str| {
        let name = FoldedName::new(n.as_bytes()).unwrap();
        r.fqdn_deny(&name, false)
            .map(|(rule, _)| rule.rule.path.clone())
    };
    assert_eq!(path("a.example.com").as_deref(), Some("spec.egressDeny[2]"));
    assert_eq!(path("b.example.com").as_deref(), Some("spec.egressDeny[1]"));
    assert_eq!(path("example.org").as_deref(), Some("spec.egressDeny[0]"));
}
