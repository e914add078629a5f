//! The datapath against the real kernel, in a network namespace the test creates: the
//! rendered ruleset is accepted by `nft` as one transaction, a reconcile is idempotent and
//! keeps learned IPs, a policy update removes what is no longer wanted, learned IPs land
//! in the selector sets, and cleanup removes everything. Packet-level behaviour is tested
//! in the lab (crates/cli/tests/lab.rs).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dnsfence_datapath::{Datapath, DenyAction, Kernel, Options, RealKernel, Worker};
use dnsfence_fqdncache::Change;
use dnsfence_lab::Netns;
use dnsfence_policy::Inventory;
use dnsfence_policy::{Endpoint, Labels, PolicyLoader, PolicySet};
use dnsfence_testsupport::skip_unless_root;

fn policies(fqdns: &[&str], previous: &PolicySet) -> PolicySet {
    let fqdns: Vec<String> = fqdns
        .iter()
        .map(|p| format!("{{matchPattern: \"{p}\"}}"))
        .collect();
    let text = format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: web, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  egress:
    - toCIDR: [192.0.2.53/32, "2001:db8::53/128"]
      toPorts: [{{ports: [{{port: "53", protocol: ANY}}], rules: {{dns: [{{matchPattern: "*"}}]}}}}]
    - toFQDNs: [{}]
      toPorts: [{{ports: [{{port: "443", protocol: TCP}}, {{port: "9000", protocol: UDP}}]}}]
    - toEntities: [host]
    - toEndpoints: [{{matchLabels: {{app: db}}}}]
  egressDeny:
    - toCIDRSet: [{{cidr: 198.51.100.0/24, except: [198.51.100.0/25]}}]
"#,
        fqdns.join(", ")
    );
    let mut loader = PolicyLoader::new();
    loader.add("p.yaml", &text);
    assert!(!loader.has_errors(), "{:?}", loader.diagnostics());
    loader.finish_after(previous).0
}

fn inventory(set: &PolicySet) -> Inventory {
    let ep = |name: &str, app: &str, ips: &[&str]| {
        (
            name.to_owned(),
            Endpoint::new("default", Labels::new([("app", app.to_owned())]).unwrap()),
            ips.iter()
                .map(|i| i.parse().unwrap())
                .collect::<Vec<IpAddr>>(),
        )
    };
    Inventory::resolve(
        set,
        [
            ep("web-1", "web", &["10.0.0.2", "fd00::2"]),
            ep("web-2", "web", &["10.0.0.3"]),
            ep("db", "db", &["10.0.0.4"]),
        ],
        vec!["10.0.0.1".parse().unwrap()],
    )
}

fn options(table: &str) -> Options {
    Options {
        table: table.to_owned(),
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

fn nft(ns: &Netns, args: &[&str]) -> String {
    let out = ns.command("nft").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn reconcile_learn_update_and_cleanup_against_the_kernel() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let ns = Netns::scratch("dp").unwrap();
    let table = "dnsfence";
    let s1 = Arc::new(policies(
        &["*.example.com", "api.other.org"],
        &PolicySet::default(),
    ));
    let (worker, first) = {
        let s1 = s1.clone();
        ns.run(move || {
            let dp = Datapath::new(Box::new(RealKernel::default()), options(table)).unwrap();
            let worker = Worker::spawn(dp).unwrap();
            let inv = Arc::new(inventory(&s1));
            let first = worker.reconcile(s1.clone(), inv.clone()).unwrap();
            // Idempotent: the same state again is accepted and changes nothing.
            worker.reconcile(s1, inv).unwrap();
            (worker, first)
        })
        .unwrap()
    };
    assert_eq!(first.enforced, 3, "web-1 (two addresses) and web-2");
    let listing = nft(&ns, &["list", "table", "inet", table]);
    assert_eq!(listing.matches("chain pol_").count(), 1, "{listing}");
    assert!(listing.contains("10.0.0.2 : jump pol_0"), "{listing}");
    assert!(
        !listing.contains("10.0.0.4 :"),
        "db has no policy: {listing}"
    );
    let rules = nft(&ns, &["-a", "list", "chain", "inet", table, "input"]);
    assert!(rules.contains("meta mark 0x00004e53 accept"), "{rules}");
    let routes = ns.command("ip").args(["rule", "show"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&routes.stdout).contains("fwmark 0x4e53 lookup 20053"),
        "{}",
        String::from_utf8_lossy(&routes.stdout)
    );

    // Learn IPs for both selectors, v4 and v6.
    let (wild, _) = s1.fqdn_selectors()[0].clone();
    let (exact, _) = s1.fqdn_selectors()[1].clone();
    let change = |name: &str, ip: &str, sel| Change::Upsert {
        name: name.into(),
        ip: ip.parse().unwrap(),
        expires: Instant::now() + Duration::from_secs(300),
        selectors: vec![sel].into(),
        new: true,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    worker.apply(
        vec![
            change("a.example.com", "192.0.2.10", wild),
            change("a.example.com", "2001:db8::10", wild),
            change("api.other.org", "192.0.2.20", exact),
        ],
        Box::new(move |r| tx.send(r.map_err(|e| e.to_string())).unwrap()),
    );
    rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    let listing = nft(&ns, &["list", "table", "inet", table]);
    for ip in ["192.0.2.10", "2001:db8::10", "192.0.2.20"] {
        assert!(listing.contains(ip), "{ip} missing:\n{listing}");
    }

    // A policy update drops api.other.org: its sets go, the wildcard's IPs stay.
    let s2 = Arc::new(policies(&["*.example.com"], &s1));
    let inv2 = Arc::new(inventory(&s2));
    worker.reconcile(s2, inv2).unwrap();
    let listing = nft(&ns, &["list", "table", "inet", table]);
    assert!(listing.contains("192.0.2.10"), "{listing}");
    assert!(listing.contains("2001:db8::10"), "{listing}");
    assert!(!listing.contains("192.0.2.20"), "{listing}");
    assert!(!listing.contains("api.other.org"), "{listing}");

    // Cleanup removes the table and the routing rule.
    ns.run(move || {
        let mut k = RealKernel::default();
        Datapath::cleanup(&mut k as &mut dyn Kernel, &options(table)).unwrap();
    })
    .unwrap();
    let tables = nft(&ns, &["list", "tables"]);
    assert!(!tables.contains(table), "{tables}");
    let routes = ns.command("ip").args(["rule", "show"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&routes.stdout).contains("0x4e53"));
}

#[test]
fn a_set_the_kernel_lacks_does_not_keep_the_other_ips_out() {
    if skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let ns = Netns::scratch("dpmiss").unwrap();
    let owned = Arc::new(policies(&["*.example.com"], &PolicySet::default()));
    // The proxy's view already has a selector whose sets the agent has not created.
    let seen = Arc::new(policies(
        &["*.example.com", "*.missing.org"],
        &PolicySet::default(),
    ));
    let (written, listing) = {
        let (owned, seen) = (owned.clone(), seen.clone());
        ns.run(move || {
            let dp = Datapath::new(Box::new(RealKernel::default()), options("dnsfence")).unwrap();
            let agent = Worker::spawn(dp).unwrap();
            agent
                .reconcile(owned.clone(), Arc::new(inventory(&owned)))
                .unwrap();
            let mut proxy =
                Datapath::elements_only(Box::new(RealKernel::default()), options("dnsfence"));
            proxy.use_selectors(&seen);
            let sel = |p: &str| {
                seen.fqdn_selectors()
                    .iter()
                    .find(|(_, pat)| pat.as_str() == p)
                    .unwrap()
                    .0
            };
            let change = |name: &str, ip: &str, s| Change::Upsert {
                name: name.into(),
                ip: ip.parse().unwrap(),
                expires: Instant::now() + Duration::from_secs(60),
                selectors: vec![s].into(),
                new: true,
            };
            let written = proxy
                .apply(&[
                    change("x.missing.org", "192.0.2.77", sel("*.missing.org")),
                    change("a.example.com", "192.0.2.78", sel("*.example.com")),
                ])
                .unwrap();
            let out = std::process::Command::new("nft")
                .args(["list", "table", "inet", "dnsfence"])
                .output()
                .unwrap();
            (written, String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .unwrap()
    };
    assert_eq!(written, 1);
    assert!(listing.contains("192.0.2.78"), "{listing}");
    assert!(!listing.contains("192.0.2.77"));
}
