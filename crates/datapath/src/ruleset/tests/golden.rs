//! The whole rendered ruleset for one fixture that exercises every concern, compared byte
//! for byte with a committed script: a change to what the kernel is told shows up here as
//! a diff to review. `DNSFENCE_BLESS=1 cargo test -p dnsfence-datapath golden` rewrites
//! the scripts after an intended change.

use super::*;

/// Every concern of the renderer in one set of policies:
/// - `shop/web`: DNS on 53 (ANY) and 5353 (UDP) to two kinds of peer, FQDN allows with
///   and without ports, CIDRs with exceptions in both families, entities, port ranges,
///   ANY with a port, a protocol without a port, and denies by CIDR, by FQDN and on UDP;
/// - `batch/jobs`: audit mode, with an audit egressDeny;
/// - `shop/legacy`: an egressDeny without default-deny.
const POLICIES: &str = r#"
apiVersion: dnsfence.io/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
    - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
      toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*.example.com"}]}}]
    - toCIDR: [192.0.2.53/32]
      toPorts: [{ports: [{port: "5353", protocol: UDP}], rules: {dns: [{matchName: local.example.com}]}}]
    - toFQDNs: [{matchName: api.example.com}, {matchPattern: "*.cdn.example.com"}]
      toPorts: [{ports: [{port: "443", protocol: TCP}, {port: "8443", endPort: 8450, protocol: TCP}]}]
    - toFQDNs: [{matchName: open.example.com}]
    - toCIDRSet:
        - {cidr: 198.51.100.0/24, except: [198.51.100.128/25, 198.51.100.64/26]}
        - {cidr: "2001:db8:1::/48"}
    - toEntities: [world]
      toPorts: [{ports: [{port: "80", protocol: TCP}, {port: "8080", protocol: ANY}]}]
    - toEntities: [host, cluster]
      toPorts: [{ports: [{port: "9100", endPort: 9110, protocol: TCP}, {port: "36412", protocol: SCTP}, {protocol: UDP}]}]
  egressDeny:
    - toCIDR: [198.51.100.66/32]
    - toFQDNs: [{matchName: tracker.example.com}]
    - toCIDR: [203.0.113.0/24]
      toPorts: [{ports: [{port: "123", protocol: UDP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: jobs, namespace: batch, annotations: {dnsfence.io/audit: "true"}}
spec:
  endpointSelector: {matchLabels: {app: jobs}}
  egress:
    - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
      toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchName: queue.example.com}]}}]
    - toFQDNs: [{matchName: queue.example.com}]
      toPorts: [{ports: [{port: "5671", protocol: TCP}]}]
  egressDeny:
    - toCIDR: [169.254.169.254/32]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: legacy, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: legacy}}
  enableDefaultDeny: {egress: false}
  egress:
    - toEntities: [world]
  egressDeny:
    - toCIDR: [169.254.169.254/32, "fd00:ec2::254/128"]
"#;

/// What the table holds before the reconcile: objects that stay (base chains, maps, a
/// meter), and stale ones (a policy chain, a selector set, a map and a chain of an older
/// release) that the script deletes.
const EXISTING: &str = "table inet dnsfence {
\tset cluster4 {
\t}
\tset fq_00000000deadbeef_4 {
\t}
\tset dnsrate4 {
\t}
\tmap ep4 {
\t}
\tmap old_map {
\t}
\tchain prerouting {
\t}
\tchain forward {
\t}
\tchain pol_0 {
\t}
\tchain pol_7 {
\t}
\tchain dns_limited {
\t}
\tchain retired {
\t}
}
";

fn fixture() -> (PolicySet, Inventory, BTreeMap<IpAddr, String>) {
    let mut loader = PolicyLoader::new();
    loader.add("golden.yaml", POLICIES);
    assert!(!loader.has_errors(), "{:?}", loader.diagnostics());
    let set = loader.finish().0;
    let inventory = Inventory::resolve(
        &set,
        [
            // Two endpoints with the same rules share a chain.
            ep(
                "web-1",
                "shop",
                &[("app", "web")],
                &["10.0.1.2", "fd00:1::2"],
            ),
            ep("web-2", "shop", &[("app", "web")], &["10.0.2.2"]),
            ep(
                "jobs-1",
                "batch",
                &[("app", "jobs")],
                &["10.0.4.2", "fd00:4::2"],
            ),
            ep("legacy-1", "shop", &[("app", "legacy")], &["10.0.3.2"]),
            // No policy selects it; it shares web-1's interface.
            ep("other", "shop", &[("app", "other")], &["10.0.1.9"]),
            ep(
                "coredns",
                "kube-system",
                &[("k8s-app", "kube-dns")],
                &["10.96.0.10", "fd00:96::10"],
            ),
        ],
        vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
    );
    let interfaces = [
        ("10.0.1.2", "pod1"),
        ("fd00:1::2", "pod1"),
        ("10.0.1.9", "pod1"),
        ("10.0.2.2", "pod2"),
        ("10.0.3.2", "pod3"),
        ("10.0.4.2", "pod4"),
        ("fd00:4::2", "pod4"),
    ]
    .iter()
    .map(|(ip, dev)| (ip.parse().unwrap(), (*dev).to_owned()))
    .collect();
    (set, inventory, interfaces)
}

/// Everything on: reject, TPROXY, logging, DNS rate limits, never-learn ranges.
fn everything_on() -> Options {
    options()
}

/// Everything off: drop, no redirect, no logging, no rate limit, no never-learn range.
fn everything_off() -> Options {
    Options {
        deny_action: DenyAction::Drop,
        tproxy_port: None,
        log_group: None,
        never_learn: Vec::new(),
        dns_rate_limit: None,
        ..options()
    }
}

/// Renders the fixture with `options` and compares (or, blessing, writes) `file`.
fn check(options: &Options, file: &str) {
    let (set, inventory, interfaces) = fixture();
    let r = render(
        &set,
        &inventory,
        &interfaces,
        options,
        &Existing::parse(EXISTING),
    );
    // What the script defines is what `objects` names.
    let defined: BTreeSet<String> = r
        .script
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some("add"), Some("chain" | "set" | "map")) => w.nth(2).map(str::to_owned),
                _ => None,
            }
        })
        .collect();
    assert_eq!(defined, r.objects);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/ruleset/tests")
        .join(file);
    if std::env::var_os("DNSFENCE_BLESS").is_some() {
        std::fs::write(&path, &r.script).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap();
    if r.script != want {
        let line = r
            .script
            .lines()
            .zip(want.lines())
            .position(|(got, want)| got != want)
            .unwrap_or_else(|| r.script.lines().count().min(want.lines().count()));
        panic!(
            "{file} differs from line {}:\n  got:  {:?}\n  want: {:?}\n(DNSFENCE_BLESS=1 rewrites it)",
            line + 1,
            r.script.lines().nth(line),
            want.lines().nth(line),
        );
    }
    assert_eq!(r.enforced, 5, "web-1 (2), web-2, jobs-1 (2)");
    assert_eq!(r.fqdn_sets.len(), 5);
}

#[test]
fn golden_everything_on() {
    check(&everything_on(), "golden.nft");
}

#[test]
fn golden_everything_off() {
    check(&everything_off(), "golden_drop.nft");
}
