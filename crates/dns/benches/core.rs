//! The proxy core's per-query work, without sockets: parse a query, judge it, check an
//! answer and extract what it teaches.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use dnsfence_dns::{check_answer, parse_query, EndpointSpec, ParsedQuery, Snapshot, VerdictConfig};
use dnsfence_policy::{Labels, PolicyLoader, Protocol};
use dnsfence_testsupport::msg;
use dnsfence_testsupport::policy::{dns_policy, DnsPeer};

fn snapshot() -> Snapshot {
    let mut l = PolicyLoader::new();
    l.add(
        "p.yaml",
        &dns_policy(
            "web",
            DnsPeer::KubeDns,
            53,
            &["*.example.com", "api.stripe.com"],
            &["*.example.com"],
        ),
    );
    let (set, _) = l.finish();
    let ep = |name: &str, ns: &str, k: &str, v: &str, ip: &str| EndpointSpec {
        name: name.into(),
        namespace: ns.into(),
        labels: Labels::new([(k, v)]).expect("labels"),
        ips: vec![ip.parse().expect("ip")],
    };
    Snapshot::new(
        Arc::new(set),
        &[
            ep("web", "default", "app", "web", "10.0.0.2"),
            ep("dns", "kube-system", "k8s-app", "kube-dns", "10.96.0.10"),
        ],
        vec![],
        VerdictConfig::default(),
    )
}

fn bench(c: &mut Criterion) {
    let snap = snapshot();
    let query = msg::query(7, "www.example.com", 1);
    let client = "10.0.0.2".parse().expect("ip");
    let server = "10.96.0.10:53".parse().expect("addr");
    c.bench_function("parse_query", |b| {
        b.iter(|| black_box(parse_query(black_box(&query))))
    });
    c.bench_function("parse_and_decide", |b| {
        b.iter(|| match parse_query(black_box(&query)) {
            ParsedQuery::Query(q) => snap.decide(client, server, Protocol::Udp, &q).allowed(),
            _ => false,
        })
    });
    let eight: Vec<msg::Rr<'_>> = (1..=8u8)
        .map(|i| msg::a("e1.cdn.example.net", 60, [192, 0, 2, i]))
        .collect();
    let mut records = vec![
        msg::cname("www.example.com", 300, "edge.cdn.example.net"),
        msg::cname("edge.cdn.example.net", 120, "e1.cdn.example.net"),
    ];
    records.extend(eight);
    let answer = msg::response(&query, 0, &records, &[]);
    let question = &query[12..];
    c.bench_function("check_answer_2cname_8a", |b| {
        b.iter(|| {
            let a = check_answer(black_box(question), black_box(&answer)).expect("answer");
            assert_eq!(a.learned.ips.len(), 8);
            a.learned.ttl
        })
    });
    let one = msg::response(
        &query,
        0,
        &[msg::a(
            "www.example.com",
            60,
            Ipv4Addr::new(192, 0, 2, 1).octets(),
        )],
        &[],
    );
    c.bench_function("check_answer_1a", |b| {
        b.iter(|| {
            check_answer(black_box(question), black_box(&one))
                .expect("answer")
                .learned
                .ttl
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
