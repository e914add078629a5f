//! Cost of matching one name against 10, 1,000 and 10,000 patterns: it must stay flat.
//!
//! `matcher/*` measures the compiled pattern set alone (name folding included);
//! `dns_decision/*` measures the whole per-query question on a resolved endpoint policy
//! whose DNS rule holds that many patterns.

use std::hint::black_box;
use std::ops::ControlFlow;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dnsfence_policy::{
    Endpoint, FoldedName, Labels, NameMatcher, NamePattern, PolicyLoader, Protocol,
};

/// A realistic mix: exact names, leading wildcards, `**.` subdomains, label globs.
fn patterns(n: usize) -> Vec<NamePattern> {
    (0..n)
        .map(|i| match i % 4 {
            0 => NamePattern::match_name(&format!("api{i}.service{}.example.com", i % 97)),
            1 => NamePattern::match_pattern(&format!("*.bucket{i}.s3.amazonaws.com")),
            2 => NamePattern::match_pattern(&format!("**.corp{i}.internal")),
            _ => NamePattern::match_pattern(&format!("app{i}-*.cdn{}.example.net", i % 89)),
        })
        .map(|p| p.expect("valid pattern"))
        .collect()
}

/// Names that hit each shape, and one that misses deep in the trie.
fn names(n: usize) -> Vec<(&'static str, String)> {
    let last = |k: usize| (0..n).rev().find(|i| i % 4 == k).unwrap_or(0);
    vec![
        (
            "exact",
            format!("API{0}.service{1}.example.com.", last(0), last(0) % 97),
        ),
        (
            "wildcard",
            format!("my-data.bucket{}.s3.amazonaws.com", last(1)),
        ),
        ("subdomains", format!("a.b.c.corp{}.internal", last(2))),
        (
            "glob",
            format!("app{}-eu-west.cdn{}.example.net", last(3), last(3) % 89),
        ),
        ("miss", "api1.service1.example.org".to_owned()),
    ]
}

fn bench_matcher(c: &mut Criterion) {
    let mut group = c.benchmark_group("matcher");
    for n in [10usize, 1_000, 10_000] {
        let m: NameMatcher<u32> = patterns(n).into_iter().zip(0..).collect();
        for (kind, name) in names(n) {
            group.bench_with_input(BenchmarkId::new(kind, n), &name, |b, name| {
                b.iter(|| {
                    let folded = FoldedName::new(black_box(name.as_bytes())).expect("valid");
                    let mut hits = 0u32;
                    let _ = m.for_each_match(&folded, |_| {
                        hits += 1;
                        ControlFlow::<()>::Continue(())
                    });
                    hits
                })
            });
        }
    }
    group.finish();
}

fn policy_yaml(n: usize) -> String {
    let mut y = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bench, namespace: default}\n\
         spec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toPorts:\n    - ports: [{port: \"53\", protocol: ANY}]\n      rules:\n        dns:\n",
    );
    for p in patterns(n) {
        let field = p.field().as_str();
        y.push_str(&format!("        - {field}: \"{}\"\n", p.as_str()));
    }
    y
}

fn bench_dns_decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("dns_decision");
    let ep = Endpoint::new("default", Labels::new([("app", "web")]).expect("labels"));
    for n in [10usize, 1_000, 10_000] {
        let mut loader = PolicyLoader::new();
        loader.add("bench.yaml", &policy_yaml(n));
        assert!(!loader.has_errors(), "{:?}", loader.diagnostics());
        let (set, _) = loader.finish();
        let resolved = set.resolve(&ep);
        for (kind, name) in names(n) {
            group.bench_with_input(BenchmarkId::new(kind, n), &name, |b, name| {
                b.iter(|| {
                    resolved
                        .dns_decision(black_box(name.as_bytes()), None, 53, Protocol::Udp)
                        .allowed
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_matcher, bench_dns_decision);
criterion_main!(benches);
