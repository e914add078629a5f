#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

use super::*;
use dnsfence_datapath::DenyAction;
use std::time::Duration;

fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/configs")
}

#[test]
fn every_example_config_parses() {
    let mut n = 0;
    for entry in std::fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        NodeConfig::parse(&path.display().to_string(), &text)
            .unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
        n += 1;
    }
    assert!(n >= 2);
}

/// How each command uses a configuration (as the CLI does).
const USAGES: [Usage; 4] = [
    Usage {
        reads_policies: true,
        listeners: Listeners::Required,
        files_only: true,
    },
    Usage {
        reads_policies: true,
        listeners: Listeners::RequiredWithoutDatapath,
        files_only: true,
    },
    Usage {
        reads_policies: true,
        listeners: Listeners::Optional,
        files_only: false,
    },
    Usage {
        reads_policies: false,
        listeners: Listeners::Optional,
        files_only: false,
    },
];

#[test]
fn every_example_config_is_fit_for_every_command() {
    for entry in std::fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for usage in USAGES {
            NodeConfig::parse_file(&path, &text, usage)
                .unwrap_or_else(|e| panic!("{} ({usage:?}):\n{e}", path.display()));
        }
    }
}

/// A scratch directory holding `c.yaml`.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("dnsfence-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn parse(&self, text: &str, usage: Usage) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse_file(&self.0.join("c.yaml"), text, usage)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const PROXY: Usage = USAGES[0];
const RUN: Usage = USAGES[1];

/// Problems found by the checks between values (a missing policy file, `min_ttl` over
/// `max_ttl`) come in the same round as values that do not parse, not one round later.
#[test]
fn checks_between_values_run_despite_bad_values() {
    let dir = Dir::new("all");
    std::fs::write(dir.0.join("present.yaml"), "kind: x\n").unwrap();
    std::fs::create_dir(dir.0.join("policies.d")).unwrap();
    let text = r#"
policies: [present.yaml, missing.yaml, policies.d, gone.d/]
endpoints:
  - {name: a, ips: [10.0.0.1, x]}
  - {name: b, ips: [10.0.0.2]}
  - {name: c, ips: [10.0.0.2], lables: {}}
  - {ips: [10.0.0.9]}
  - {name: e, ips: [10.0.0.2]}
host_ips: [10.0.0.1, "10.0.0"]
dns:
  listen: ["127.0.0.1:5353", "nope", 53]
  upstreams: ["1.1.1.1:53"]
  min_ttl: 2h
  max_ttl: 1h
  upstream_timeout: soon
metrics: {listen: "localhost:9963"}
"#;
    let err = dir.parse(text, PROXY).unwrap_err();
    let c = dir.0.join("c.yaml").display().to_string();
    let missing = dir.0.join("missing.yaml").display().to_string();
    let gone = dir.0.join("gone.d/").display().to_string();
    let want = [
        format!("{c}: endpoints[2].lables: unknown key (expected one of: name, namespace, labels, ips, remote)"),
        format!("{c}: endpoints[0].ips[1]: invalid IP address \"x\""),
        format!("{c}: endpoints[2].lables: unknown key"),
        format!("{c}: endpoints[3].name: missing"),
        format!("{c}: host_ips[1]: invalid IP address \"10.0.0\""),
        format!("{c}: dns.listen[1]: invalid socket address \"nope\" (expected IP:port, like 127.0.0.1:53 or \"[::1]:53\")"),
        format!("{c}: dns.upstream_timeout: \"soon\" is not a duration"),
        format!("{c}: metrics.listen: invalid socket address \"localhost:9963\""),
        format!("{c}: dns.max_ttl: 1h must not be smaller than dns.min_ttl (2h)"),
        format!("{c}: endpoints[4].ips: 10.0.0.2 is already used by endpoints[1]"),
        format!("{c}: policies[1]: cannot read {missing}: "),
        format!("{c}: policies[3]: cannot read {gone}: "),
    ];
    let all = err.problems.join("\n");
    for needle in &want {
        assert!(
            all.contains(needle.as_str()),
            "missing {needle:?} in:\n{all}"
        );
    }
    assert!(
        all.contains("dns.listen[2]: invalid socket address 53 (expected a string)"),
        "{all}"
    );
    // Nothing else: in particular no "no upstream" (dns.listen did not parse), nor a
    // duplicate with the endpoint that failed.
    assert_eq!(err.problems.len(), 12, "{all}");
}

#[test]
fn a_command_that_serves_dns_needs_a_listener() {
    let dir = Dir::new("listeners");
    let none = "datapath: {backend: none}\n";
    let problem = |text: &str, usage: Usage| dir.parse(text, usage).err().map(|e| e.problems);
    let c = dir.0.join("c.yaml").display().to_string();
    assert_eq!(
        problem("", PROXY),
        Some(vec![format!("{c}: dns: no listener: set dns.listen (with dns.upstreams) or dns.transparent, or the proxy serves nothing")])
    );
    assert_eq!(
        problem(none, RUN),
        Some(vec![format!("{c}: dns: no listener: with datapath.backend: none there is no default transparent listener; set dns.listen (with dns.upstreams) or dns.transparent")])
    );
    // `run` with the nftables datapath, the agent and `proxy --agent` give the
    // transparent listener its default port.
    for (text, usage) in [("", RUN), ("", USAGES[2]), (none, USAGES[3])] {
        assert_eq!(problem(text, usage), None, "{text:?} {usage:?}");
    }
    for text in [
        "dns: {transparent: {port: 15053}}\n",
        "dns: {listen: [\"127.0.0.1:53\"], upstreams: [\"127.0.0.1:5353\"]}\n",
    ] {
        assert_eq!(problem(text, PROXY), None, "{text}");
        assert_eq!(problem(&format!("{text}{none}"), RUN), None, "{text}");
    }
    // A listener that fails to parse is reported as such, not as missing.
    let err = problem("dns: {listen: [x]}\n", PROXY).unwrap();
    assert_eq!(err.len(), 1, "{err:?}");
    // Kubernetes mode outside the agent: that is the problem to report.
    let err = problem("kubernetes: {enabled: true}\n", PROXY).unwrap();
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("kubernetes.enabled: Kubernetes mode runs as `dnsfence agent`"));
    assert_eq!(problem("kubernetes: {enabled: true}\n", USAGES[2]), None);
}

#[test]
fn defaults() {
    let c = NodeConfig::parse("c.yaml", "").unwrap();
    assert_eq!(c.dns, DnsConfig::default());
    assert_eq!(c.dns.response_max_delay, Duration::from_millis(100));
    assert_eq!(c.dns.max_ttl, Duration::from_secs(86_400));
    assert_eq!(c.dns.unknown_clients, dnsfence_dns::UnknownClients::Refuse);
    assert_eq!(c.api.socket, PathBuf::from("/run/dnsfence/dnsfence.sock"));
    let full = std::fs::read_to_string(examples().join("standalone.yaml")).unwrap();
    let c = NodeConfig::parse("standalone.yaml", &full).unwrap();
    assert_eq!(c.endpoints.len(), 4);
    assert!(c.endpoints[3].remote && !c.endpoints[2].remote);
    assert_eq!(c.kubernetes, KubernetesConfig::default());
    assert!(!c.kubernetes.enabled);
    assert_eq!(c.dns.upstream_timeout, Duration::from_secs(5));
    assert_eq!(c.dns.upstream_port_lifetime, Duration::from_secs(60));
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
    let err = NodeConfig::parse("c.yaml", text).unwrap_err();
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
    let err = NodeConfig::parse("c.yaml", "dns: {listen: [\"127.0.0.1:53\"]}").unwrap_err();
    assert_eq!(
        err.problems,
        ["c.yaml: dns.upstreams: explicit listeners (dns.listen) need at least one upstream"]
    );
    let err = NodeConfig::parse(
        "c.yaml",
        "endpoints: [{name: a, ips: [10.0.0.1]}, {name: b, ips: [10.0.0.1], labels: {\"reserved:x\": y}}]",
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 2, "{:?}", err.problems);
    let err = NodeConfig::parse("c.yaml", "dns: {min_ttl: 1h, max_ttl: 1m}").unwrap_err();
    assert!(err.problems[0].contains("max_ttl"));
}

#[test]
fn datapath_section_defaults_and_problems() {
    let c = NodeConfig::parse("c.yaml", "").unwrap();
    assert_eq!(c.datapath, DatapathConfig::default());
    assert_eq!(c.datapath.table, "dnsfence");
    assert_eq!(c.datapath.deny_action, DenyAction::Reject);
    let c = NodeConfig::parse(
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
    let err = NodeConfig::parse(
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
    let err = NodeConfig::parse(
        "c.yaml",
        "datapath: {table: \"bad name\", fwmark: 0, route_table: 254}",
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 3, "{:?}", err.problems);
}

#[test]
fn a_zero_ct_mark_and_ipv4_mapped_upstreams_are_refused() {
    let err = NodeConfig::parse(
        "c.yaml",
        "datapath: {ct_mark: 0}\ndns: {listen: [\"127.0.0.1:5353\"], upstreams: [\"[::ffff:192.0.2.53]:53\", \"[2001:db8::53]:53\"]}",
    )
    .unwrap_err();
    let all = err.problems.join("\n");
    assert!(all.contains("datapath.ct_mark: must not be 0"), "{all}");
    assert!(
        all.contains("dns.upstreams[0]: [::ffff:192.0.2.53]:53 is an IPv4-mapped IPv6 address; write 192.0.2.53:53"),
        "{all}"
    );
    assert_eq!(err.problems.len(), 2, "{all}");
    let ok = NodeConfig::parse("c.yaml", "datapath: {ct_mark: 0x10}").unwrap();
    assert_eq!(ok.datapath.ct_mark, 0x10);
}

#[test]
fn kubernetes_keys_are_checked_one_by_one() {
    let err = NodeConfig::parse(
        "c.yaml",
        "kubernetes: {cluster_name: [1], node_name: [5], kubeconfig: [x], enabled: 7, watch_cilium_policies: true}",
    )
    .unwrap_err();
    let all = err.problems.join("\n");
    for key in [
        "kubernetes.cluster_name: ",
        "kubernetes.node_name: ",
        "kubernetes.kubeconfig: ",
        "kubernetes.enabled: ",
    ] {
        assert!(all.contains(key), "missing {key:?} in:\n{all}");
    }
    assert!(!all.contains("watch_cilium_policies"), "{all}");
    assert_eq!(err.problems.len(), 4, "{all}");
}

/// The example configuration shows every key the configuration accepts: the keys of each
/// section as serde knows them, at every depth the example has.
#[test]
fn the_standalone_example_names_every_key() {
    let full = std::fs::read_to_string(examples().join("standalone.yaml")).unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&full).unwrap();
    let mut missing = Vec::new();
    let mut checked = 0;
    // (path of a struct, the values the example has there)
    let mut todo: Vec<(Vec<String>, Vec<&serde_yaml_ng::Value>)> = vec![(vec![], vec![&doc])];
    while let Some((path, values)) = todo.pop() {
        let steps: Vec<&str> = path.iter().map(String::as_str).collect();
        let Some(keys) = dnsfence_config::keys_of::<NodeConfig>(&steps) else {
            continue;
        };
        checked += 1;
        for key in keys {
            let under: Vec<&serde_yaml_ng::Value> =
                values.iter().filter_map(|v| v.get(key.as_str())).collect();
            if under.is_empty() {
                missing.push(format!("{}.{key}", path.join(".")));
                continue;
            }
            let mut deeper = path.clone();
            deeper.push(key.clone());
            // A list of structs: the keys may be spread over its elements.
            if let Some(items) = under.first().and_then(|v| v.as_sequence()) {
                let mut list = deeper.clone();
                list.push("[]".to_owned());
                todo.push((list, items.iter().collect()));
            }
            if under.iter().any(|v| v.is_mapping()) {
                todo.push((deeper, under));
            }
        }
    }
    assert!(checked >= 8, "only {checked} sections seen");
    assert!(missing.is_empty(), "not in standalone.yaml: {missing:?}");
}

#[test]
fn never_learn_cluster_cidrs_and_cluster_domain() {
    let c = NodeConfig::parse("c.yaml", "").unwrap();
    assert_eq!(
        c.dns.never_learn,
        dnsfence_dns::inside::default_never_learn()
    );
    assert!(c.cluster_cidrs.is_empty());
    assert_eq!(c.dns.cluster_domain, "cluster.local");
    let c = NodeConfig::parse(
        "c.yaml",
        "cluster_cidrs: [10.244.0.0/16, \"fd00:10::/64\"]\ndns: {never_learn: [127.0.0.0/8], cluster_domain: corp.internal}\n",
    )
    .unwrap();
    assert_eq!(c.cluster_cidrs.len(), 2);
    assert_eq!(
        c.dns.never_learn,
        vec!["127.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(c.dns.cluster_domain, "corp.internal");
    let err = NodeConfig::parse(
        "c.yaml",
        "cluster_cidrs: [10.244.0.0/16, 10.96.0.0]\ndns: {never_learn: [x/8], cluster_domain: \"a..b\"}\n",
    )
    .unwrap_err();
    let all = err.problems.join("\n");
    for needle in [
        "c.yaml: cluster_cidrs[1]: invalid CIDR \"10.96.0.0\" (expected ADDRESS/LENGTH",
        "c.yaml: dns.never_learn[0]: invalid CIDR \"x/8\"",
        "c.yaml: dns.cluster_domain: \"a..b\" is not a DNS name",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(err.problems.len(), 3, "{all}");
}

#[test]
fn the_manifests_configuration_parses() {
    for options in [
        dnsfence_k8s::manifests::Options::default(),
        dnsfence_k8s::manifests::Options {
            node_local_dns: Some("fd00::a".parse().unwrap()),
            watch_cilium_policies: true,
            log_level: "debug".to_owned(),
            ..dnsfence_k8s::manifests::Options::default()
        },
    ] {
        let text = dnsfence_k8s::manifests::config_yaml(&options).unwrap();
        let config =
            NodeConfig::parse("config.yaml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(config.kubernetes.enabled);
        assert_eq!(
            config.kubernetes.watch_cilium_policies,
            options.watch_cilium_policies
        );
        assert_eq!(
            config.endpoints.len(),
            usize::from(options.node_local_dns.is_some())
        );
        assert!(config.endpoints.iter().all(|e| e.remote));
        assert_eq!(
            config.log.level.as_deref(),
            Some(options.log_level.as_str())
        );
        assert_eq!(
            config.metrics.agent_listen.map(|a| a.port()),
            Some(dnsfence_k8s::manifests::AGENT_METRICS_PORT)
        );
    }
}
