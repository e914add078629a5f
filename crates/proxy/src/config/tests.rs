use super::*;

fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/configs")
}

#[test]
fn every_example_config_parses() {
    let mut n = 0;
    for entry in std::fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        Config::parse(&path.display().to_string(), &text)
            .unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
        n += 1;
    }
    assert!(n >= 2);
}

#[test]
fn defaults() {
    let c = Config::parse("c.yaml", "").unwrap();
    assert_eq!(c.dns, DnsConfig::default());
    assert_eq!(c.dns.response_max_delay, Duration::from_millis(100));
    assert_eq!(c.dns.max_ttl, Duration::from_secs(86_400));
    assert_eq!(c.dns.unknown_clients, UnknownClientsConfig::Refuse);
    assert_eq!(c.api.socket, PathBuf::from("/run/dnsfence/dnsfence.sock"));
    let full = std::fs::read_to_string(examples().join("standalone.yaml")).unwrap();
    let c = Config::parse("standalone.yaml", &full).unwrap();
    assert_eq!(c.endpoints.len(), 4);
    assert!(c.endpoints[3].remote && !c.endpoints[2].remote);
    assert_eq!(c.kubernetes, KubernetesConfig::default());
    assert!(!c.kubernetes.enabled);
    assert_eq!(c.dns.upstream_timeout, Duration::from_secs(5));
    assert_eq!(c.endpoints[0].ips[1], "fd00::2".parse::<IpAddr>().unwrap());
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
polices: [x]
dns:
  listen: ["127.0.0.1:5353"]
  upstream: ["1.1.1.1:53"]
  min_ttl: soon
  deny_rcode: drop
endpoints:
  - {name: a, ips: [10.0.0.1], lables: {}}
metrics: {listen: "not-an-address"}
"#;
    let err = Config::parse("c.yaml", text).unwrap_err();
    let all = err.problems.join("\n");
    for needle in [
        "c.yaml: polices: unknown key",
        "c.yaml: dns.upstream: unknown key",
        "c.yaml: endpoints[0].lables: unknown key",
        "min_ttl",
        "deny_rcode",
        "metrics",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert!(err.problems.len() >= 6, "{all}");
}

#[test]
fn semantic_checks() {
    let err = Config::parse("c.yaml", "dns: {listen: [\"127.0.0.1:53\"]}").unwrap_err();
    assert_eq!(
        err.problems,
        ["c.yaml: dns.upstreams: explicit listeners (dns.listen) need at least one upstream"]
    );
    let err = Config::parse(
        "c.yaml",
        "endpoints: [{name: a, ips: [10.0.0.1]}, {name: b, ips: [10.0.0.1], labels: {\"reserved:x\": y}}]",
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 2, "{:?}", err.problems);
    let err = Config::parse("c.yaml", "dns: {min_ttl: 1h, max_ttl: 1m}").unwrap_err();
    assert!(err.problems[0].contains("max_ttl"));
}

#[test]
fn datapath_section_defaults_and_problems() {
    let c = Config::parse("c.yaml", "").unwrap();
    assert_eq!(c.datapath, DatapathConfig::default());
    assert_eq!(c.datapath.table, "dnsfence");
    assert_eq!(c.datapath.deny_action, DenyAction::Reject);
    let c = Config::parse(
        "c.yaml",
        "datapath: {backend: none, deny_action: drop, fwmark: 0x10}",
    )
    .unwrap();
    assert_eq!(
        (
            c.datapath.backend,
            c.datapath.deny_action,
            c.datapath.fwmark
        ),
        (Backend::None, DenyAction::Drop, 16)
    );
    let err = Config::parse(
        "c.yaml",
        "datapath: {backend: ebpf, tabel: x, deny_action: maybe}",
    )
    .unwrap_err();
    let all = err.problems.join("\n");
    for needle in [
        "datapath.backend",
        "datapath.tabel: unknown key",
        "datapath.deny_action",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    let err = Config::parse(
        "c.yaml",
        "datapath: {table: \"bad name\", fwmark: 0, route_table: 254}",
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 3, "{:?}", err.problems);
}
