//! `deploy/grafana/dnsfence.json`: every panel queries something, and every metric it
//! queries is one dnsfence exports, so renaming a metric breaks this test until the
//! dashboard follows.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

/// Sample names as `/metrics` exposes them (histograms without `_bucket`, `_sum`,
/// `_count`), scraped from `dnsfence proxy` and `dnsfence run`.
const KNOWN: &[&str] = &[
    // The DNS proxy.
    "dnsfence_dns_queries_total",
    "dnsfence_dns_upstream_responses_total",
    "dnsfence_dns_upstream_timeouts_total",
    "dnsfence_dns_upstream_errors_total",
    "dnsfence_dns_upstream_retries_total",
    "dnsfence_dns_answers_rejected_total",
    "dnsfence_dns_hold_timeouts_total",
    "dnsfence_dns_latency_seconds",
    "dnsfence_dns_upstream_latency_seconds",
    "dnsfence_dns_hold_seconds",
    "dnsfence_dns_learned_names",
    "dnsfence_dns_learned_ips",
    "dnsfence_dns_upstreams_down",
    "dnsfence_dns_upstream_sockets",
    // The datapath (`dnsfence run`, `dnsfence proxy --agent`).
    "dnsfence_datapath_batches_total",
    "dnsfence_datapath_elements_total",
    "dnsfence_datapath_batch_errors_total",
    "dnsfence_datapath_batch_seconds",
    "dnsfence_datapath_reconciles_total",
    "dnsfence_datapath_reconcile_errors_total",
    "dnsfence_datapath_enforced_addresses",
    "dnsfence_datapath_refused_packets_total",
    "dnsfence_datapath_refusal_log_overruns_total",
    // The flow log.
    "dnsfence_flow_events_total",
    "dnsfence_flow_events_lost_total",
    // The snapshot in force.
    "dnsfence_snapshot_version",
    "dnsfence_snapshot_age_seconds",
    // The agent (`metrics.agent_listen`).
    "dnsfence_agent_snapshot_version",
];

fn dashboard() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/dnsfence.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(v: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in v["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(panels(p));
    }
    out
}

/// The metric names in a PromQL expression: each token starting with `dnsfence_`, with a
/// histogram's `_bucket`, `_sum` or `_count` suffix trimmed.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("dnsfence_") {
        let preceded_by_name_char = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if !preceded_by_name_char {
            let token = &tail[..end];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| token.strip_suffix(s))
                .unwrap_or(token);
            names.push(name.to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn metric_names_are_extracted() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(dnsfence_dns_hold_seconds_bucket{instance=~"$node"}[5m])))"#
        ),
        ["dnsfence_dns_hold_seconds"]
    );
    assert_eq!(
        metric_names(
            "rate(dnsfence_a_total[5m]) / rate(dnsfence_b_seconds_count[5m]) + x_dnsfence_c"
        ),
        ["dnsfence_a_total", "dnsfence_b_seconds"]
    );
}

#[test]
fn dashboard_is_well_formed() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    assert!(d["uid"].as_str().is_some_and(|s| !s.is_empty()), "uid");
    let inputs = d["__inputs"].as_array().unwrap();
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"),
        "a DS_PROMETHEUS input"
    );
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "a DS_PROMETHEUS datasource variable"
    );
    assert!(
        vars.iter().any(|v| v["name"] == "node"
            && v["definition"]
                .as_str()
                .is_some_and(|q| q.contains("dnsfence_dns_queries_total"))),
        "a node variable from dnsfence_dns_queries_total"
    );
    let ids: Vec<u64> = panels(&d).iter().filter_map(|p| p["id"].as_u64()).collect();
    let unique: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "panel ids are unique");
}

#[test]
fn every_panel_queries_known_metrics() {
    let d = dashboard();
    let known: BTreeSet<&str> = KNOWN.iter().copied().collect();
    let all = panels(&d);
    assert!(all.len() >= 10, "only {} panels", all.len());
    let mut used = BTreeSet::new();
    for p in all {
        let title = p["title"].as_str().unwrap_or("");
        assert!(!title.trim().is_empty(), "a panel without a title: {p}");
        if p["type"] == "row" {
            continue;
        }
        let exprs: Vec<&str> = p["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["expr"].as_str())
            .filter(|e| !e.trim().is_empty())
            .collect();
        assert!(
            !exprs.is_empty(),
            "panel {title:?} has no target with an expr"
        );
        for expr in exprs {
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "panel {title:?}: no dnsfence metric in {expr:?}"
            );
            for name in names {
                assert!(
                    known.contains(name.as_str()),
                    "panel {title:?} queries {name}, which dnsfence does not export"
                );
                used.insert(name);
            }
        }
    }
    for name in [
        "dnsfence_dns_queries_total",
        "dnsfence_dns_hold_timeouts_total",
        "dnsfence_datapath_batch_errors_total",
        "dnsfence_datapath_refused_packets_total",
        "dnsfence_flow_events_lost_total",
        "dnsfence_snapshot_age_seconds",
    ] {
        assert!(used.contains(name), "no panel shows {name}");
    }
}
