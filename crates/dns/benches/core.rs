//! The proxy core's per-query work, without sockets: parse a query, judge it, check an
//! answer and extract what it teaches, and the forwarder's round trip (choose a server,
//! register the query under a fresh ID, match its answer).

use std::convert::Infallible;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use dnsfence_dns::forward::{Forwarder, ForwarderConfig, Outbound, Route};
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

/// A fast generator of query IDs for the benchmark (xorshift; not for real use).
struct Xorshift(u64);

impl rand_core::TryRng for Xorshift {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        self.try_next_u64().map(|x| (x >> 32) as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Ok(self.0)
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for b in dst {
            *b = self.try_next_u32()? as u8;
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for Xorshift {}

fn forward(c: &mut Criterion) {
    let snap = snapshot();
    let server = "10.96.0.10:53".parse().expect("addr");
    let client: std::net::SocketAddr = "10.0.0.2:5353".parse().expect("addr");
    let config = ForwarderConfig {
        upstreams: vec![server],
        timeout: Duration::from_secs(5),
        hedge_after: None,
    };
    let mut fwd: Forwarder<(), _> = Forwarder::new(config, Xorshift(0x9e37_79b9_7f4a_7c15));
    let path = fwd.open_path();
    let query = msg::query(7, "www.example.com", 1);
    let ParsedQuery::Query(q) = parse_query(&query) else {
        panic!("a query")
    };
    let answer = msg::response(
        &query,
        0,
        &[msg::a("www.example.com", 60, [192, 0, 2, 1])],
        &[],
    );
    let (mut packet, mut reply) = (query.clone(), answer.clone());
    let now = Instant::now();
    c.bench_function("forward_choose_send_answer", |b| {
        b.iter(|| {
            let choice = fwd.choose(now, &snap, client.ip(), &[server], 0, Protocol::Udp, &q);
            let (upstream, verdict) = choice.forward.expect("allowed");
            packet.copy_from_slice(&query);
            let out = Outbound {
                client: (),
                addr: client,
                upstream,
                learn: verdict.learn,
                may_retry: false,
                received: now,
            };
            let sent = fwd
                .send(now, Route::Udp(path), out, &q, &mut packet)
                .expect("sent");
            reply.copy_from_slice(&answer);
            reply[..2].copy_from_slice(&sent.id.to_be_bytes());
            let answered = fwd
                .handle_answer(path, upstream, &mut reply)
                .expect("answered");
            black_box(answered.answer.learned.ttl)
        })
    });
}

criterion_group!(benches, bench, forward);
criterion_main!(benches);
