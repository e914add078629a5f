//! The `dnsfence` binary as a user runs it: exit codes, diagnostics, JSON answers.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a panic is a test failure"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn dnsfence(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dnsfence"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run dnsfence")
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn invalid_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(root().join("examples/invalid"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .map(|n| format!("examples/invalid/{n}"))
        .collect();
    files.sort();
    files
}

fn expected_lines(file: &str) -> Vec<String> {
    std::fs::read_to_string(root().join(file))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn example_policies_validate() {
    let out = dnsfence(&["policy", "validate", "examples/policies"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in stderr_lines(&out) {
        assert!(line.contains(": warning: "), "unexpected problem: {line}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("0 error(s)"), "{stdout}");
}

#[test]
fn each_invalid_example_gives_exactly_its_listed_lines() {
    let files = invalid_files();
    assert!(files.len() >= 10, "{files:?}");
    for file in files {
        let want = expected_lines(&file);
        assert!(!want.is_empty(), "{file} lists no expected lines");
        let out = dnsfence(&["policy", "validate", &file]);
        assert_eq!(out.status.code(), Some(1), "{file}");
        assert_eq!(stderr_lines(&out), want, "{file}");
    }
}

#[test]
fn all_problems_of_all_files_in_one_run() {
    let files = invalid_files();
    let mut args = vec!["policy", "validate", "examples/policies"];
    args.extend(files.iter().map(String::as_str));
    let out = dnsfence(&args);
    assert_eq!(out.status.code(), Some(1));
    let got = stderr_lines(&out);
    for file in &files {
        for line in expected_lines(file) {
            assert!(got.contains(&line), "missing {line}");
        }
    }
}

#[test]
fn unreadable_paths_and_bad_usage_exit_2() {
    assert_eq!(
        dnsfence(&["policy", "validate", "no/such/dir"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(dnsfence(&["policy", "validate"]).status.code(), Some(2));
    assert_eq!(dnsfence(&["policy", "frobnicate"]).status.code(), Some(2));
    let out = dnsfence(&[
        "policy",
        "check",
        "-f",
        "examples/invalid/both-selectors.yaml",
        "--name",
        "a.com",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "invalid policies cannot be checked"
    );
}

fn check(args: &[&str]) -> (i32, Value) {
    let mut all = vec!["policy", "check", "-f", "examples/policies", "-o", "json"];
    all.extend_from_slice(args);
    let out = dnsfence(&all);
    let json: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), json)
}

const BILLING: &[&str] = &["--namespace", "payments", "--labels", "app=billing"];
const KUBE_DNS: &[&str] = &[
    "--server",
    "10.96.0.10",
    "--server-labels",
    "k8s-app=kube-dns",
];

fn with<'a>(parts: &[&[&'a str]]) -> Vec<&'a str> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

#[test]
fn check_allows_a_listed_name_and_names_the_rule_and_selectors() {
    let (code, j) = check(&with(&[
        BILLING,
        KUBE_DNS,
        &["--name", "Bucket-7.S3.amazonaws.com."],
    ]));
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["dns"], "allow");
    assert_eq!(j["enforced"], true);
    assert_eq!(j["dns_rule"]["policy"], "payments/billing-egress");
    assert_eq!(j["dns_rule"]["pattern"], "*.s3.amazonaws.com");
    let sel = j["fqdn_selectors"].as_array().unwrap();
    assert_eq!(sel.len(), 1, "{j}");
    assert_eq!(sel[0]["selector"], "*.s3.amazonaws.com");
    assert_eq!(sel[0]["ports"], serde_json::json!(["443/TCP"]));
}

#[test]
fn check_refuses_unlisted_and_deeper_names() {
    for name in [
        "evil.com",
        "s3.amazonaws.com",
        "a.b.s3.amazonaws.com",
        "api.stripe.com.evil.io",
    ] {
        let (code, j) = check(&with(&[BILLING, KUBE_DNS, &["--name", name]]));
        assert_eq!(code, 1, "{name}: {j}");
        assert_eq!(j["dns"], "deny");
        assert_eq!(j["reason"], "no-pattern-matches");
        assert_eq!(j["dns_rule"], Value::Null);
    }
}

#[test]
fn check_denies_dns_to_a_server_no_rule_covers() {
    // 8.8.8.8 is not kube-dns: the DNS rule's toEndpoints does not select it.
    let (code, j) = check(&with(&[
        BILLING,
        &["--server", "8.8.8.8", "--name", "api.stripe.com"],
    ]));
    assert_eq!(code, 1);
    assert_eq!(j["reason"], "not-covered");
    // kube-dns in the wrong namespace is not kube-dns either.
    let (code, _) = check(&with(&[
        BILLING,
        KUBE_DNS,
        &["--server-namespace", "default", "--name", "api.stripe.com"],
    ]));
    assert_eq!(code, 1);
    // Port 5353 is not covered.
    let (code, _) = check(&with(&[
        BILLING,
        KUBE_DNS,
        &["--port", "5353", "--name", "api.stripe.com"],
    ]));
    assert_eq!(code, 1);
}

#[test]
fn check_bare_star_and_doublestar() {
    let runner = &["--namespace", "ci", "--labels", "app=runner"][..];
    let (code, j) = check(&with(&[
        runner,
        KUBE_DNS,
        &["--name", "anything.example", "--protocol", "tcp"],
    ]));
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["fqdn_selectors"], serde_json::json!([]));
    let trainer = &["--namespace", "ml", "--labels", "app=trainer"][..];
    let (code, j) = check(&with(&[
        trainer,
        KUBE_DNS,
        &["--name", "a.b.storage.googleapis.com"],
    ]));
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["fqdn_selectors"][0]["selector"], "**.googleapis.com");
    let (code, _) = check(&with(&[trainer, KUBE_DNS, &["--name", "googleapis.com"]]));
    assert_eq!(code, 1);
}

#[test]
fn check_egress_deny_wins_and_unselected_pods_are_not_enforced() {
    let batch = &["--namespace", "batch", "--labels", "tier=batch"][..];
    let (code, j) = check(&with(&[
        batch,
        &["--server", "192.0.2.53", "--name", "example.com"],
    ]));
    assert_eq!(code, 0, "world allows DNS to any outside server: {j}");
    assert_eq!(j["reason"], "port-allowed");
    let (code, j) = check(&with(&[
        batch,
        &["--server", "169.254.169.254", "--name", "example.com"],
    ]));
    assert_eq!(code, 1, "{j}");
    assert_eq!(j["reason"], "egress-deny");
    // kube-system is outside every example policy's reach.
    let (code, j) = check(&[
        "--namespace",
        "kube-system",
        "--labels",
        "k8s-app=kube-dns",
        "--name",
        "x.y",
    ]);
    assert_eq!(code, 0);
    assert_eq!(j["enforced"], false);
}

#[test]
fn check_text_output_explains() {
    let mut args = vec!["policy", "check", "-f", "examples/policies"];
    args.extend(with(&[BILLING, &["--name", "api.stripe.com"]]));
    let out = dnsfence(&args);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("matchName \"api.stripe.com\""), "{text}");
    assert!(text.contains("443/TCP"), "{text}");
}

#[test]
fn check_audit_mode_records_denials_but_exits_1() {
    // 13-audit-mode.yaml: the only policy selecting the autoscaler is in audit mode.
    let autoscaler = &[
        "--namespace",
        "kube-system",
        "--labels",
        "app=cluster-autoscaler",
    ][..];
    let (code, j) = check(&with(&[
        autoscaler,
        KUBE_DNS,
        &["--name", "ec2.eu-west-1.amazonaws.com"],
    ]));
    assert_eq!(code, 0, "{j}");
    assert_eq!(
        (&j["mode"], &j["verdict"]),
        (&"audit".into(), &"allow".into())
    );
    let (code, j) = check(&with(&[autoscaler, KUBE_DNS, &["--name", "evil.com"]]));
    assert_eq!(code, 1, "a would-be denial still exits 1: {j}");
    assert_eq!(j["mode"], "audit");
    assert_eq!(j["dns"], "deny");
    assert_eq!(j["verdict"], "audit");
    assert_eq!(j["reason"], "no-pattern-matches");
    // Its egressDeny would deny, and is only audited too.
    let (code, j) = check(&with(&[
        autoscaler,
        &["--server", "169.254.169.254", "--name", "x.com"],
    ]));
    assert_eq!(code, 1, "{j}");
    assert_eq!(
        (&j["reason"], &j["verdict"]),
        (&"egress-deny".into(), &"audit".into())
    );
    assert_eq!(j["decided_by"]["path"], "spec.egressDeny[0]");

    // Other endpoints are enforced, unless --audit (the daemon's `audit: true`).
    let (code, j) = check(&with(&[BILLING, KUBE_DNS, &["--name", "evil.com"]]));
    assert_eq!(code, 1);
    assert_eq!(
        (&j["mode"], &j["verdict"]),
        (&"enforce".into(), &"deny".into())
    );
    let (code, j) = check(&with(&[
        BILLING,
        KUBE_DNS,
        &["--name", "evil.com", "--audit"],
    ]));
    assert_eq!(code, 1);
    assert_eq!(
        (&j["mode"], &j["verdict"]),
        (&"audit".into(), &"audit".into())
    );

    let mut args = vec!["policy", "check", "-f", "examples/policies"];
    args.extend(with(&[autoscaler, KUBE_DNS, &["--name", "evil.com"]]));
    let out = dnsfence(&args);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("mode       audit (denials are recorded, not enforced)"),
        "{text}"
    );
    assert!(text.contains("dns        audit: "), "{text}");
}

#[test]
fn check_fqdn_deny_refuses_a_name_a_dns_rule_allows() {
    // 14-fqdn-deny.yaml: `**.example.com` is allowed, tracker.example.com denied by name.
    let site = &["--namespace", "marketing", "--labels", "app=site"][..];
    let (code, j) = check(&with(&[
        site,
        KUBE_DNS,
        &["--name", "Tracker.Example.com."],
    ]));
    assert_eq!(code, 1, "{j}");
    assert_eq!(
        (&j["dns"], &j["verdict"], &j["reason"]),
        (&"deny".into(), &"deny".into(), &"fqdn-deny".into())
    );
    assert_eq!(j["decided_by"]["policy"], "marketing/site-no-tracker");
    assert_eq!(j["decided_by"]["path"], "spec.egressDeny[0]");
    assert_eq!(j["decided_by"]["pattern"], "tracker.example.com");
    let denies = j["fqdn_deny_selectors"].as_array().unwrap();
    assert_eq!(denies.len(), 1, "{j}");
    assert_eq!(denies[0]["selector"], "tracker.example.com");
    assert_eq!(denies[0]["ports"], serde_json::json!(["*/ANY"]));
    // Its siblings are allowed by the DNS rule.
    let (code, j) = check(&with(&[site, KUBE_DNS, &["--name", "cdn.example.com"]]));
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["reason"], "dns-rule");
    assert_eq!(j["fqdn_deny_selectors"], serde_json::json!([]));

    let mut args = vec!["policy", "check", "-f", "examples/policies"];
    args.extend(with(&[site, KUBE_DNS, &["--name", "tracker.example.com"]]));
    let out = dnsfence(&args);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("dns        deny: matchName \"tracker.example.com\" of egressDeny spec.egressDeny[0] of EgressPolicy marketing/site-no-tracker"),
        "{text}"
    );
    assert!(
        text.contains("toFQDNs    egressDeny matchName \"tracker.example.com\""),
        "{text}"
    );
}
