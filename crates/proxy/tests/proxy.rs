//! The proxy with real sockets: a real upstream (dnsmasq, or a scripted socket for faults),
//! real clients (dig, and raw sockets for hostile input).

#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dnsfence_dns::{EndpointSpec, Rcode, Snapshot, UnknownClients, VerdictConfig};
use dnsfence_fqdncache::Change;
use dnsfence_policy::{Labels, PolicyLoader};
use dnsfence_proxy::config::{DnsConfig, HedgeAfter};
use dnsfence_proxy::metrics::{TransportLabel, VerdictLabel};
use dnsfence_proxy::{IpSink, NoopSink, Proxy, ProxyMetrics, SinkFuture};
use dnsfence_testsupport::policy::{dns_policy, DnsPeer};
use dnsfence_testsupport::{dig, msg, skip, Dnsmasq};
use tokio::net::UdpSocket;

fn policy(dns_port: u16) -> String {
    dns_policy(
        "web",
        DnsPeer::KubeDns,
        dns_port,
        &["*.example.com", "cdn.example.net"],
        &["*.example.com"],
    )
}

/// web-1 is 127.0.0.2 (enforced), other is 127.0.0.3 (no policy); the upstream on
/// 127.0.0.1 is kube-dns.
fn snapshot(upstream: SocketAddr, verdict: VerdictConfig) -> Snapshot {
    let mut loader = PolicyLoader::new();
    loader.add("policy.yaml", &policy(upstream.port()));
    assert!(!loader.has_errors(), "{:?}", loader.diagnostics());
    let (set, _) = loader.finish();
    let ep = |name: &str, ns: &str, k: &str, v: &str, ip: &str| EndpointSpec {
        name: name.into(),
        namespace: ns.into(),
        labels: Labels::new([(k, v)]).unwrap(),
        ips: vec![ip.parse().unwrap()],
    };
    Snapshot::new(
        Arc::new(set),
        &[
            ep("web-1", "default", "app", "web", "127.0.0.2"),
            ep("other", "default", "app", "other", "127.0.0.3"),
            ep(
                "coredns",
                "kube-system",
                "k8s-app",
                "kube-dns",
                &upstream.ip().to_string(),
            ),
        ],
        vec![],
        verdict,
    )
}

fn flow_log() -> Arc<dnsfence_proxy::flows::FlowLog> {
    dnsfence_proxy::flows::FlowLog::new(
        &dnsfence_proxy::flows::FlowSettings {
            ring_size: 1000,
            file: None,
            file_max_bytes: 0,
        },
        dnsfence_proxy::flows::FlowMetrics::default(),
    )
}

fn dns_config(upstream: SocketAddr) -> DnsConfig {
    DnsConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        upstreams: vec![upstream],
        ..DnsConfig::default()
    }
}

async fn start(cfg: DnsConfig, verdict: VerdictConfig, sink: Arc<dyn IpSink>) -> Proxy {
    let upstream = cfg.upstreams[0];
    Proxy::start(
        cfg,
        snapshot(upstream, verdict),
        sink,
        ProxyMetrics::default(),
        flow_log(),
    )
    .await
    .unwrap()
}

fn example_zone() -> Dnsmasq {
    Dnsmasq::start(
        "example.com",
        30,
        &[
            "--host-record=api.example.com,192.0.2.10,2001:db8::10".into(),
            "--host-record=edge.example.com,192.0.2.20".into(),
            "--cname=www.example.com,edge.example.com".into(),
            "--host-record=cdn.example.net,198.51.100.7".into(),
        ],
    )
}

/// Sends `packet` from `source` and waits for one reply.
async fn ask(source: &'static str, to: SocketAddr, packet: Vec<u8>) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind((source, 0)).await.unwrap();
    sock.send_to(&packet, to).await.unwrap();
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

fn rcode(reply: &[u8]) -> u8 {
    reply[3] & 0x0f
}

/// Asks the proxy at `at` for `api.example.com` from 127.0.0.2 under each ID, one after
/// the other; each gets NOERROR.
async fn all_answered(at: SocketAddr, ids: std::ops::Range<u16>) {
    answered_within(at, ids, Duration::MAX).await;
}

/// [`all_answered`], each in less than `limit`.
async fn answered_within(at: SocketAddr, ids: std::ops::Range<u16>, limit: Duration) {
    for id in ids {
        let started = Instant::now();
        let reply = ask("127.0.0.2", at, msg::query(id, "api.example.com", 1)).await;
        assert_eq!(reply.map(|r| rcode(&r)), Some(0), "query {id} answered");
        let took = started.elapsed();
        assert!(took < limit, "query {id} waited {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_denied_and_unknown_over_udp_and_tcp_with_dig() {
    if skip(&["dig", "dnsmasq"]) {
        return;
    }
    let up = example_zone();
    let proxy = start(
        dns_config(up.addr),
        VerdictConfig::default(),
        Arc::new(NoopSink),
    )
    .await;
    let at = proxy.udp_addrs()[0];
    let d = tokio::task::spawn_blocking(move || {
        (
            dig("127.0.0.2", at, "api.example.com", &[]),
            dig("127.0.0.2", at, "api.example.com", &["+tcp", "AAAA"]),
            dig("127.0.0.2", at, "evil.org", &[]),
            dig("127.0.0.2", at, "evil.org", &["+tcp"]),
            dig("127.0.0.9", at, "api.example.com", &[]),
            dig("127.0.0.3", at, "cdn.example.net", &["+tcp"]),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        (d.0.status.as_str(), d.0.answers.clone()),
        ("NOERROR", vec!["192.0.2.10".to_owned()]),
        "{}",
        d.0.raw
    );
    assert_eq!(
        (d.1.status.as_str(), d.1.answers.clone()),
        ("NOERROR", vec!["2001:db8::10".to_owned()]),
        "{}",
        d.1.raw
    );
    assert_eq!(d.2.status, "REFUSED", "{}", d.2.raw);
    assert_eq!(d.3.status, "REFUSED", "{}", d.3.raw);
    assert_eq!(d.4.status, "REFUSED", "unknown client: {}", d.4.raw);
    assert_eq!(
        d.5.answers,
        ["198.51.100.7"],
        "no policy, unfiltered: {}",
        d.5.raw
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cname_chain_names_are_learned_with_the_answer_ttl() {
    if skip(&["dnsmasq"]) {
        return;
    }
    let up = example_zone();
    let proxy = start(
        dns_config(up.addr),
        VerdictConfig::default(),
        Arc::new(NoopSink),
    )
    .await;
    let reply = ask(
        "127.0.0.2",
        proxy.udp_addrs()[0],
        msg::query(77, "WWW.example.com", 1),
    )
    .await
    .unwrap();
    assert_eq!(rcode(&reply), 0);
    assert_eq!(
        &reply[..2],
        &77u16.to_be_bytes(),
        "the client's ID is restored"
    );
    let learned = proxy.shared().with_cache(|c| {
        let mut v: Vec<(String, Vec<String>)> = c
            .iter()
            .map(|(n, ips, _)| (n.to_owned(), ips.iter().map(|l| l.ip.to_string()).collect()))
            .collect();
        v.sort();
        v
    });
    assert_eq!(
        learned,
        [
            ("edge.example.com".to_owned(), vec!["192.0.2.20".to_owned()]),
            ("www.example.com".to_owned(), vec!["192.0.2.20".to_owned()]),
        ]
    );
    let ttl = proxy
        .shared()
        .with_cache(|c| c.ips("edge.example.com")[0].expires);
    let left = ttl.saturating_duration_since(Instant::now());
    assert!(
        left > Duration::from_secs(25) && left <= Duration::from_secs(30),
        "{left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_answers_to_policy_vetted_queries_teach_ips() {
    if skip(&["dnsmasq"]) {
        return;
    }
    let up = example_zone();
    let verdict = VerdictConfig {
        unknown_clients: UnknownClients::Forward,
        ..VerdictConfig::default()
    };
    let proxy = start(dns_config(up.addr), verdict, Arc::new(NoopSink)).await;
    let at = proxy.udp_addrs()[0];
    // No policy (127.0.0.3) and unknown (127.0.0.9): forwarded unfiltered, learned nothing.
    assert_eq!(
        rcode(
            &ask("127.0.0.3", at, msg::query(1, "api.example.com", 1))
                .await
                .unwrap()
        ),
        0
    );
    assert_eq!(
        rcode(
            &ask("127.0.0.9", at, msg::query(2, "api.example.com", 1))
                .await
                .unwrap()
        ),
        0
    );
    assert_eq!(proxy.shared().with_cache(|c| c.len()), 0);
    // The enforced endpoint, through its DNS rule: learned.
    assert_eq!(
        rcode(
            &ask("127.0.0.2", at, msg::query(3, "api.example.com", 1))
                .await
                .unwrap()
        ),
        0
    );
    assert_eq!(proxy.shared().with_cache(|c| c.len()), 1);
    // Counted apart: two forwarded without a policy check, one allowed by a rule.
    let m = &proxy.shared().metrics;
    assert_eq!(m.queries(VerdictLabel::Unfiltered, TransportLabel::Udp), 2);
    assert_eq!(m.queries(VerdictLabel::Allowed, TransportLabel::Udp), 1);
    let verdicts: Vec<_> = proxy
        .shared()
        .flows
        .last(10)
        .iter()
        .map(|f| f.verdict)
        .collect();
    assert_eq!(verdicts, ["unfiltered", "unfiltered", "allowed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_deny_rcode_is_configurable() {
    if skip(&["dnsmasq"]) {
        return;
    }
    let up = example_zone();
    let verdict = VerdictConfig {
        deny_rcode: Rcode::NxDomain,
        unknown_clients: UnknownClients::Forward,
    };
    let proxy = start(dns_config(up.addr), verdict, Arc::new(NoopSink)).await;
    let at = proxy.udp_addrs()[0];
    let denied = ask("127.0.0.2", at, msg::query(1, "evil.org", 1))
        .await
        .unwrap();
    assert_eq!(rcode(&denied), 3);
    assert_eq!(
        &denied[12..],
        &msg::query(1, "evil.org", 1)[12..],
        "question echoed"
    );
    let unknown = ask("127.0.0.9", at, msg::query(2, "api.example.com", 1))
        .await
        .unwrap();
    assert_eq!(
        rcode(&unknown),
        0,
        "unknown clients forwarded when configured"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_malformed_packets_leaves_the_proxy_answering() {
    if skip(&["dnsmasq"]) {
        return;
    }
    let up = example_zone();
    let proxy = start(
        dns_config(up.addr),
        VerdictConfig::default(),
        Arc::new(NoopSink),
    )
    .await;
    let at = proxy.udp_addrs()[0];
    let flood = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let good = msg::query(9, "api.example.com", 1);
    for i in 0..5000 {
        let len = (next() % 600) as usize;
        let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 3 == 0 {
            // Mutate a valid query instead: the nastier case.
            p = good.clone();
            let at = (next() as usize) % p.len();
            p[at] = next() as u8;
            p.truncate(((next() as usize) % p.len()).max(1));
        }
        let _ = flood.send_to(&p, at).await;
    }
    // A readable header with two questions gets FORMERR, echoing the ID.
    let mut two = msg::header(0x5151, 0x0100, 2, 0, 0, 0);
    two.extend(msg::name("a.example.com"));
    two.extend([0, 1, 0, 1]);
    two.extend(msg::name("b.example.com"));
    two.extend([0, 1, 0, 1]);
    // The flood may still fill the socket's queue for a moment: ask like a stub resolver,
    // which retries.
    let mut formerr = None;
    for _ in 0..3 {
        formerr = ask("127.0.0.2", at, two.clone()).await;
        if formerr.is_some() {
            break;
        }
    }
    let formerr = formerr.expect("still answering after the flood");
    assert_eq!((rcode(&formerr), &formerr[..2]), (1, &[0x51, 0x51][..]));
    let reply = ask("127.0.0.2", at, good.clone())
        .await
        .expect("still answering after the flood");
    assert_eq!(rcode(&reply), 0);
    assert!(
        proxy
            .shared()
            .metrics
            .queries(VerdictLabel::Malformed, TransportLabel::Udp)
            > 100
    );
}

/// An upstream under the test's control.
async fn scripted_upstream() -> (Arc<UdpSocket>, SocketAddr) {
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = sock.local_addr().unwrap();
    (sock, addr)
}

/// A query for `api.example.com` (ID `id`, from 127.0.0.2) caught by a scripted upstream:
/// the client's pending reply, the query as forwarded, and the port it left from.
struct Caught {
    up: Arc<UdpSocket>,
    proxy: Proxy,
    client: tokio::task::JoinHandle<Option<Vec<u8>>>,
    forwarded: Vec<u8>,
    from: SocketAddr,
}

async fn catch_query(id: u16) -> Caught {
    let (up, addr) = scripted_upstream().await;
    let proxy = start(
        dns_config(addr),
        VerdictConfig::default(),
        Arc::new(NoopSink),
    )
    .await;
    let at = proxy.udp_addrs()[0];
    let client = tokio::spawn(ask("127.0.0.2", at, msg::query(id, "api.example.com", 1)));
    let mut buf = [0u8; 512];
    let (n, from) = up.recv_from(&mut buf).await.unwrap();
    Caught {
        up,
        proxy,
        client,
        forwarded: buf[..n].to_vec(),
        from,
    }
}

impl Caught {
    /// The upstream's real answer (`ip`, TTL 60) reaches the client under its own ID, and
    /// the learned-mapping cache holds that one IP for the query name alone.
    async fn real_answer_gets_through(self, id: u16, ip: [u8; 4]) {
        let real = msg::response(
            &self.forwarded,
            0,
            &[msg::a("api.example.com", 60, ip)],
            &[],
        );
        self.up.send_to(&real, self.from).await.unwrap();
        let reply = self.client.await.unwrap().unwrap();
        assert_eq!(&reply[..2], &id.to_be_bytes());
        assert_eq!(&reply[reply.len() - 4..], &ip);
        let learned: Vec<(String, Vec<std::net::IpAddr>)> = self.proxy.shared().with_cache(|c| {
            c.iter()
                .map(|(n, ips, _)| (n.to_owned(), ips.iter().map(|l| l.ip).collect()))
                .collect()
        });
        assert_eq!(learned, [("api.example.com".to_owned(), vec![ip.into()])]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_to_another_question_teach_nothing_and_the_real_one_gets_through() {
    let caught = catch_query(5).await;
    // A forged answer for another name, with the right ID, first.
    let mut other = msg::query(0, "bank.example.com", 1);
    other[..2].copy_from_slice(&caught.forwarded[..2]);
    let forged = msg::response(
        &other,
        0,
        &[msg::a("bank.example.com", 300, [203, 0, 113, 66])],
        &[],
    );
    caught.up.send_to(&forged, caught.from).await.unwrap();
    let rejected = || caught.proxy.shared().metrics.answers_rejected.get();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while rejected() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rejected(), 1);
    caught.real_answer_gets_through(5, [192, 0, 2, 10]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_perfectly_forged_answer_from_another_address_never_reaches_the_client() {
    let caught = catch_query(6).await;
    // Right port, ID and question, sent from an address the query did not go to.
    let rogue = UdpSocket::bind("127.0.0.3:0").await.unwrap();
    let forged = msg::response(
        &caught.forwarded,
        0,
        &[msg::a("api.example.com", 300, [203, 0, 113, 66])],
        &[],
    );
    rogue.send_to(&forged, caught.from).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    caught.real_answer_gets_through(6, [192, 0, 2, 11]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_upstream_port_gets_servfail_at_once_and_is_used_again_once_back() {
    // The upstream's port is closed: the kernel answers each query with ICMP port
    // unreachable, which the connected socket reports, and the proxy answers at once
    // rather than after the timeout.
    let (up, addr) = scripted_upstream().await;
    drop(up);
    let cfg = DnsConfig {
        upstream_timeout: Duration::from_secs(5),
        ..dns_config(addr)
    };
    let proxy = start(cfg, VerdictConfig::default(), Arc::new(NoopSink)).await;
    let at = proxy.udp_addrs()[0];
    // At least one query on each of the server's four sockets (they take turns).
    for id in 0..6 {
        let started = Instant::now();
        let reply = ask("127.0.0.2", at, msg::query(id, "api.example.com", 1)).await;
        assert_eq!(reply.map(|r| rcode(&r)), Some(2), "query {id}: SERVFAIL");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "query {id} answered after {:?}, not at once",
            started.elapsed()
        );
    }
    let m = &proxy.shared().metrics;
    assert_eq!(m.upstream_errors.get(), 6);
    assert_eq!(m.upstream_timeouts.get(), 0);
    // Back, on the same port: every query is answered by it (no stale error is left
    // on a socket to fail the next query).
    let _ = answering_upstream(Arc::new(UdpSocket::bind(addr).await.unwrap()));
    all_answered(at, 10..18).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_upstreams_a_closed_port_costs_no_query_an_answer() {
    // Both upstreams are allowed (both kube-dns, same port); the first listed has its
    // port closed. A query sent there is asked again of the other as soon as the ICMP
    // error arrives, and after three the closed one is passed over.
    let good = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let good_addr = good.local_addr().unwrap();
    let closed_addr: SocketAddr = format!("127.0.0.6:{}", good_addr.port()).parse().unwrap();
    let answered = answering_upstream(good);
    let proxy = start_two(
        [closed_addr, good_addr],
        "127.0.0.6",
        Duration::from_secs(5),
    )
    .await;
    let at = proxy.udp_addrs()[0];
    // None waits for a timeout.
    answered_within(at, 0..10, Duration::from_secs(1)).await;
    assert_eq!(answered.load(std::sync::atomic::Ordering::SeqCst), 10);
    let m = &proxy.shared().metrics;
    assert_eq!(m.upstream_errors.get(), 3, "three sent to the closed port");
    assert_eq!(m.upstreams_down.get(), 1);
    assert_eq!(m.upstream_timeouts.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_upstream_gives_servfail_and_the_fairness_bound_holds() {
    let (_up, addr) = scripted_upstream().await;
    let cfg = DnsConfig {
        upstream_timeout: Duration::from_secs(2),
        max_inflight_per_client: 2,
        ..dns_config(addr)
    };
    let proxy = start(cfg, VerdictConfig::default(), Arc::new(NoopSink)).await;
    let at = proxy.udp_addrs()[0];
    let a = tokio::spawn(ask("127.0.0.2", at, msg::query(1, "a.example.com", 1)));
    let b = tokio::spawn(ask("127.0.0.2", at, msg::query(2, "b.example.com", 1)));
    // Wait until both are in flight.
    while proxy
        .shared()
        .metrics
        .queries(VerdictLabel::Allowed, TransportLabel::Udp)
        < 2
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let third = ask("127.0.0.2", at, msg::query(3, "c.example.com", 1))
        .await
        .unwrap();
    assert_eq!(rcode(&third), 2, "over the bound: SERVFAIL at once");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "not after the 2 s timeout"
    );
    // Another client is not starved.
    let other = tokio::spawn(ask("127.0.0.3", at, msg::query(4, "d.example.org", 1)));
    for r in [
        a.await.unwrap().unwrap(),
        b.await.unwrap().unwrap(),
        other.await.unwrap().unwrap(),
    ] {
        assert_eq!(rcode(&r), 2, "upstream timeout: SERVFAIL");
    }
    let m = &proxy.shared().metrics;
    assert_eq!(m.queries(VerdictLabel::Fairness, TransportLabel::Udp), 1);
    assert_eq!(m.upstream_timeouts.get(), 3);
}

/// A sink that records what it got and confirms after `delay` (never, when `None`).
struct SlowSink {
    delay: Option<Duration>,
    seen: Arc<Mutex<Vec<(Instant, usize)>>>,
}

impl IpSink for SlowSink {
    fn apply(&self, changes: Vec<Change>) -> SinkFuture {
        let delay = self.delay;
        let seen = self.seen.clone();
        Box::pin(async move {
            match delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending::<()>().await,
            }
            seen.lock().unwrap().push((Instant::now(), changes.len()));
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_held_until_the_sink_confirms_or_the_delay_runs_out() {
    if skip(&["dnsmasq"]) {
        return;
    }
    let up = example_zone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::new(SlowSink {
        delay: Some(Duration::from_millis(60)),
        seen: seen.clone(),
    });
    let proxy = start(dns_config(up.addr), VerdictConfig::default(), sink).await;
    let asked = Instant::now();
    let reply = ask(
        "127.0.0.2",
        proxy.udp_addrs()[0],
        msg::query(1, "api.example.com", 1),
    )
    .await
    .unwrap();
    let answered = Instant::now();
    assert_eq!(rcode(&reply), 0);
    let confirmed = seen
        .lock()
        .unwrap()
        .first()
        .copied()
        .expect("sink saw the new IP");
    assert!(
        confirmed.0 <= answered,
        "released only after the sink confirmed"
    );
    assert!(answered - asked >= Duration::from_millis(60));

    let never = Arc::new(SlowSink {
        delay: None,
        seen: Arc::new(Mutex::new(Vec::new())),
    });
    let cfg = DnsConfig {
        response_max_delay: Duration::from_millis(80),
        ..dns_config(up.addr)
    };
    let proxy = start(cfg, VerdictConfig::default(), never).await;
    let asked = Instant::now();
    let reply = ask(
        "127.0.0.2",
        proxy.udp_addrs()[0],
        msg::query(2, "edge.example.com", 1),
    )
    .await
    .unwrap();
    assert_eq!(rcode(&reply), 0);
    assert!(asked.elapsed() >= Duration::from_millis(80));
    assert_eq!(proxy.shared().metrics.hold_timeouts.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_answer_with_an_ip_being_enforced_waits_for_it_too() {
    if skip(&["dnsmasq"]) {
        return;
    }
    let up = example_zone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::new(SlowSink {
        delay: Some(Duration::from_millis(400)),
        seen: seen.clone(),
    });
    let cfg = DnsConfig {
        response_max_delay: Duration::from_secs(3),
        ..dns_config(up.addr)
    };
    let proxy = start(cfg, VerdictConfig::default(), sink).await;
    let at = proxy.udp_addrs()[0];
    let first = tokio::spawn(ask("127.0.0.2", at, msg::query(1, "api.example.com", 1)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Another query for the same name while the sink is still at work, over UDP and TCP.
    let second = tokio::spawn(ask("127.0.0.2", at, msg::query(2, "api.example.com", 1)));
    let mut s = tcp_from("127.0.0.2", proxy.tcp_addrs()[0]).await.unwrap();
    tcp_send(&mut s, &msg::query(3, "api.example.com", 1)).await;
    let over_tcp = tcp_recv(&mut s).await.expect("answered over TCP");
    let tcp_answered = Instant::now();
    let second = second.await.unwrap().expect("answered");
    let second_answered = Instant::now();
    assert_eq!(rcode(&first.await.unwrap().expect("answered")), 0);
    assert_eq!((rcode(&second), rcode(&over_tcp)), (0, 0));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "one batch of new IPs: {seen:?}");
    assert!(
        seen[0].0 <= second_answered,
        "UDP answer released before the IP was enforced"
    );
    assert!(
        seen[0].0 <= tcp_answered,
        "TCP answer released before the IP was enforced"
    );
    assert_eq!(proxy.shared().metrics.hold_timeouts.get(), 0);
}

/// A sink whose first batch fails; it records every batch of new IPs it gets.
#[derive(Clone, Default)]
struct FailsFirst(Arc<Mutex<Vec<Vec<Change>>>>);

impl IpSink for FailsFirst {
    fn apply(&self, changes: Vec<Change>) -> SinkFuture {
        let mut seen = self.0.lock().unwrap();
        let first = seen.is_empty();
        seen.push(changes);
        Box::pin(async move {
            if first {
                Err(dnsfence_proxy::SinkError::new(std::io::Error::other(
                    "the datapath is down",
                )))
            } else {
                Ok(())
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ips_the_sink_failed_to_enforce_are_applied_again_by_the_next_answer() {
    if skip(&["dnsmasq"]) {
        return;
    }
    let up = example_zone();
    let sink = FailsFirst::default();
    let proxy = start(
        dns_config(up.addr),
        VerdictConfig::default(),
        Arc::new(sink.clone()),
    )
    .await;
    let at = proxy.udp_addrs()[0];
    for id in 1..=3 {
        let reply = ask("127.0.0.2", at, msg::query(id, "edge.example.com", 1)).await;
        assert_eq!(reply.map(|r| rcode(&r)), Some(0));
        // The failure is handled on a task of its own, right after the release.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let batches = sink.0.lock().unwrap().clone();
    let new_edge = |b: &Vec<Change>| {
        b.iter().any(|c| matches!(c, Change::Upsert { name, new: true, .. } if &**name == "edge.example.com"))
    };
    // The first batch failed, the second answer brought the IP again as new and it took;
    // the third found it enforced.
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert!(batches.iter().all(new_edge));
}

async fn tcp_send(stream: &mut tokio::net::TcpStream, msg: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    stream.write_all(&framed).await.unwrap();
}

async fn tcp_recv(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let len = tokio::time::timeout(Duration::from_secs(3), stream.read_u16())
        .await
        .ok()?
        .ok()?;
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.ok()?;
    Some(buf)
}

/// A TCP upstream that answers each query after a delay chosen by its name's first label
/// ("slow" waits 300 ms), with one A record.
async fn tcp_upstream() -> SocketAddr {
    tcp_upstream_counting().await.0
}

/// A TCP upstream, and how many connections it accepted.
async fn tcp_upstream_counting() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let (addr, accepted, _) = tcp_upstream_counting_closes().await;
    (addr, accepted)
}

/// The same, also counting the connections the proxy closed.
async fn tcp_upstream_counting_closes() -> (
    SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (count, closes) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let closes = closes.clone();
            tokio::spawn(async move {
                while let Some(q) = tcp_recv(&mut s).await {
                    let slow = q[13..17].eq_ignore_ascii_case(b"slow");
                    if slow {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let owner = if slow {
                        "slow.example.com"
                    } else {
                        "fast.example.com"
                    };
                    let r = msg::response(&q, 0, &[msg::a(owner, 60, [192, 0, 2, 1])], &[]);
                    tcp_send(&mut s, &r).await;
                }
                closes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            });
        }
    });
    (addr, accepted, closed)
}

// By default an upstream TCP connection closes once its answer is in: a server that
// serves TCP in its only process is not left blocked by an idle one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_upstream_connections_close_after_their_answer_by_default() {
    let (up, accepted, closed) = tcp_upstream_counting_closes().await;
    let proxy = start(dns_config(up), VerdictConfig::default(), Arc::new(NoopSink)).await;
    for id in 0..3u16 {
        let mut s = tcp_from("127.0.0.2", proxy.tcp_addrs()[0]).await.unwrap();
        tcp_send(&mut s, &msg::query(id, "fast.example.com", 1)).await;
        let r = tcp_recv(&mut s).await.expect("answer");
        assert_eq!(rcode(&r), 0);
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 3);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while closed.load(std::sync::atomic::Ordering::Relaxed) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "an upstream connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_queries_reuse_upstream_connections_when_asked_to() {
    let (up, accepted) = tcp_upstream_counting().await;
    let cfg = DnsConfig {
        upstream_tcp_idle: Duration::from_secs(10),
        ..dns_config(up)
    };
    let proxy = start(cfg, VerdictConfig::default(), Arc::new(NoopSink)).await;
    for id in 0..5u16 {
        // A new client connection each time: the upstream side is still reused.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(proxy.tcp_addrs()[0]).await.unwrap();
        tcp_send(&mut s, &msg::query(id, "fast.example.com", 1)).await;
        let r = tcp_recv(&mut s).await.expect("answer");
        assert_eq!(rcode(&r), 0);
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_a_refused_upstream_is_passed_over_and_its_query_asked_again() {
    // Two allowed upstreams on the same port; nothing listens on the first.
    let (good, accepted) = tcp_upstream_counting().await;
    let refused: SocketAddr = format!("127.0.0.7:{}", good.port()).parse().unwrap();
    let proxy = start_two(
        [refused, good],
        "127.0.0.7",
        DnsConfig::default().upstream_timeout,
    )
    .await;
    for id in 0..8u16 {
        let mut s = tcp_from("127.0.0.2", proxy.tcp_addrs()[0]).await.unwrap();
        tcp_send(&mut s, &msg::query(id, "fast.example.com", 1)).await;
        let r = tcp_recv(&mut s).await.expect("answer");
        assert_eq!(rcode(&r), 0, "query {id} answered");
    }
    assert!(accepted.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    let m = &proxy.shared().metrics;
    assert_eq!(
        m.upstream_errors.get(),
        3,
        "three refused connections, then passed over"
    );
    assert_eq!(m.upstreams_down.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_queries_are_pipelined_and_answered_out_of_order() {
    let up = tcp_upstream().await;
    let proxy = start(dns_config(up), VerdictConfig::default(), Arc::new(NoopSink)).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = sock.connect(proxy.tcp_addrs()[0]).await.unwrap();
    // Three queries back to back on one connection: slow, fast, denied.
    tcp_send(&mut s, &msg::query(1, "slow.example.com", 1)).await;
    tcp_send(&mut s, &msg::query(2, "fast.example.com", 1)).await;
    tcp_send(&mut s, &msg::query(3, "evil.org", 1)).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = tcp_recv(&mut s).await.expect("answer");
        ids.push((u16::from_be_bytes([r[0], r[1]]), rcode(&r)));
    }
    // The denied and the fast answer overtake the slow one.
    assert_eq!(ids.last(), Some(&(1, 0)), "{ids:?}");
    assert!(ids.contains(&(2, 0)) && ids.contains(&(3, 5)), "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_clients_are_closed() {
    let up = tcp_upstream().await;
    let cfg = DnsConfig {
        tcp_idle_timeout: Duration::from_millis(200),
        ..dns_config(up)
    };
    let proxy = start(cfg, VerdictConfig::default(), Arc::new(NoopSink)).await;
    // Taken before connecting: the proxy's idle timer cannot start earlier than this.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(proxy.tcp_addrs()[0])
        .await
        .unwrap();
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut byte))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "closed by the proxy");
    assert!(started.elapsed() >= Duration::from_millis(200));
}

/// A TCP connection from `source` (a loopback address) with a small receive buffer.
async fn tcp_from(source: &str, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_recv_buffer_size(4096)?;
    sock.bind(format!("{source}:0").parse().unwrap())?;
    sock.connect(to).await
}

/// Whether the peer closed `s`: a read returns end-of-file or an error within `wait`.
async fn closed_by_peer(s: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_take_every_tcp_connection() {
    let up = tcp_upstream().await;
    let proxy = start(dns_config(up), VerdictConfig::default(), Arc::new(NoopSink)).await;
    let metrics = proxy.shared().metrics.clone();
    let at = proxy.tcp_addrs()[0];
    // An unknown client opens its share, and keeps it open.
    let mut share = Vec::new();
    for _ in 0..dnsfence_proxy::MAX_CONNECTIONS_PER_CLIENT {
        let mut s = tcp_from("127.0.0.9", at).await.unwrap();
        tcp_send(&mut s, &msg::query(1, "api.example.com", 1)).await;
        assert_eq!(
            rcode(&tcp_recv(&mut s).await.unwrap()),
            5,
            "served (REFUSED)"
        );
        share.push(s);
    }
    // One more is closed at once, without an answer.
    let mut extra = tcp_from("127.0.0.9", at).await.unwrap();
    tcp_send(&mut extra, &msg::query(2, "api.example.com", 1)).await;
    assert!(closed_by_peer(&mut extra, Duration::from_secs(3)).await);
    assert_eq!(metrics.tcp_refused.get(), 1);
    // Another client is served as usual.
    let mut s = tcp_from("127.0.0.2", at).await.unwrap();
    tcp_send(&mut s, &msg::query(3, "api.example.com", 1)).await;
    let answer = tcp_recv(&mut s).await.expect("answered");
    assert_eq!((answer[0..2].to_vec(), rcode(&answer)), (vec![0, 3], 0));
    // Closing one of the share frees its slot.
    drop(share.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut s = tcp_from("127.0.0.9", at).await.unwrap();
        tcp_send(&mut s, &msg::query(4, "api.example.com", 1)).await;
        if tcp_recv(&mut s).await.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was not given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_client_that_never_reads_is_closed_and_others_are_served() {
    use tokio::io::AsyncWriteExt;
    let up = tcp_upstream().await;
    let proxy = start(dns_config(up), VerdictConfig::default(), Arc::new(NoopSink)).await;
    let metrics = proxy.shared().metrics.clone();
    let at = proxy.tcp_addrs()[0];
    // Denied queries pipelined without end, answers never read.
    let hog = tcp_from("127.0.0.9", at).await.unwrap();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut hog = hog;
        let q = msg::query(7, "api.example.com", 1);
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        let many: Vec<u8> = framed.repeat(1000);
        loop {
            if hog.write_all(&many).await.is_err() {
                return;
            }
        }
    });
    // Meanwhile another client is served.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut s = tcp_from("127.0.0.2", at).await.unwrap();
    tcp_send(&mut s, &msg::query(3, "api.example.com", 1)).await;
    assert_eq!(rcode(&tcp_recv(&mut s).await.expect("answered")), 0);
    // The hog's connection is closed once an answer waited too long to be taken.
    let limit = dnsfence_proxy::WRITE_TIMEOUT + Duration::from_secs(10);
    tokio::time::timeout(limit, writer)
        .await
        .expect("the proxy closed the connection")
        .unwrap();
    assert!(started.elapsed() >= dnsfence_proxy::WRITE_TIMEOUT);
    assert_eq!(metrics.tcp_write_timeouts.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edns_and_truncation_are_relayed_as_received() {
    let (up, addr) = scripted_upstream().await;
    let proxy = start(
        dns_config(addr),
        VerdictConfig::default(),
        Arc::new(NoopSink),
    )
    .await;
    let at = proxy.udp_addrs()[0];
    // A query with an OPT record (EDNS, 4096-byte payload).
    let mut q = msg::query(11, "big.example.com", 1);
    q[11] = 1; // ARCOUNT = 1
    q.extend([0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
    let client = tokio::spawn(ask("127.0.0.2", at, q.clone()));
    let mut buf = [0u8; 512];
    let (n, from) = up.recv_from(&mut buf).await.unwrap();
    assert_eq!(&buf[2..n], &q[2..], "forwarded byte for byte but the ID");
    // A truncated answer: relayed with TC so the client retries over TCP; teaches nothing.
    let mut r = msg::response(
        &buf[..n - 11],
        0,
        &[msg::a("big.example.com", 60, [192, 0, 2, 9])],
        &[],
    );
    r[2] |= 0x02;
    up.send_to(&r, from).await.unwrap();
    let reply = client.await.unwrap().unwrap();
    assert_eq!(&reply[..2], &11u16.to_be_bytes());
    assert_eq!(&reply[2..], &r[2..]);
    assert_eq!(proxy.shared().with_cache(|c| c.len()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_several_upstreams_the_policy_picks_the_one_it_allows() {
    if skip(&["dnsmasq"]) {
        return;
    }
    let up = example_zone();
    // A second upstream on a port the DNS rule does not cover, listed first.
    let (_other, other) = scripted_upstream().await;
    let cfg = DnsConfig {
        upstreams: vec![other, up.addr],
        ..dns_config(up.addr)
    };
    let proxy = Proxy::start(
        cfg,
        snapshot(up.addr, VerdictConfig::default()),
        Arc::new(NoopSink),
        ProxyMetrics::default(),
        flow_log(),
    )
    .await
    .unwrap();
    let at = proxy.udp_addrs()[0];
    for id in 0..6u16 {
        let r = ask("127.0.0.2", at, msg::query(id, "api.example.com", 1))
            .await
            .unwrap();
        assert_eq!(
            rcode(&r),
            0,
            "query {id} went to an upstream the policy does not allow"
        );
    }
    // A name no upstream is allowed for is still refused.
    let r = ask("127.0.0.2", at, msg::query(9, "evil.org", 1))
        .await
        .unwrap();
    assert_eq!(rcode(&r), 5);
}

/// A sink that confirms at once and records every change (shared with the test).
#[derive(Default, Clone)]
struct RecordingSink(Arc<Mutex<Vec<Change>>>);

impl IpSink for RecordingSink {
    fn apply(&self, changes: Vec<Change>) -> SinkFuture {
        self.0.lock().unwrap().extend(changes);
        Box::pin(std::future::ready(Ok(())))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_ttls_expire_into_removals_and_many_ips_are_capped() {
    if skip(&["dnsmasq"]) {
        return;
    }
    let mut records: Vec<String> = (1..=20)
        .map(|i| format!("--host-record=many.example.com,192.0.2.{i}"))
        .collect();
    records.push("--host-record=brief.example.com,198.51.100.9".into());
    let up = Dnsmasq::start("example.com", 1, &records);
    let sink = RecordingSink::default();
    let cfg = DnsConfig {
        max_ips_per_name: 5,
        ..dns_config(up.addr)
    };
    let proxy = start(cfg, VerdictConfig::default(), Arc::new(sink.clone())).await;
    let at = proxy.udp_addrs()[0];
    let many = ask("127.0.0.2", at, msg::query(1, "many.example.com", 1))
        .await
        .unwrap();
    assert_eq!(
        u16::from_be_bytes([many[6], many[7]]),
        20,
        "the client gets every record"
    );
    assert_eq!(
        proxy
            .shared()
            .with_cache(|c| c.ips("many.example.com").len()),
        5
    );
    ask("127.0.0.2", at, msg::query(2, "brief.example.com", 1))
        .await
        .unwrap();
    let added = |ip: &str| {
        sink.0.lock().unwrap().iter().any(|c| {
            matches!(c, Change::Upsert { name, ip: i, .. } if &**name == "brief.example.com" && i.to_string() == ip)
        })
    };
    let removed = |ip: &str| {
        sink.0.lock().unwrap().iter().any(|c| {
            matches!(c, Change::Remove { name, ip: i, .. } if &**name == "brief.example.com" && i.to_string() == ip)
        })
    };
    assert!(added("198.51.100.9"));
    assert!(!removed("198.51.100.9"));
    // TTL 1 s: the mapping expires and the sink is told, within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !removed("198.51.100.9") {
        assert!(Instant::now() < deadline, "expiry never reached the sink");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(proxy
        .shared()
        .with_cache(|c| c.ips("brief.example.com").is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authoritative_upstream_with_chains_many_ips_and_aaaa() {
    use dnsfence_testsupport::authority::{Authority, Rec};
    use std::net::IpAddr;
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    // Addresses this test host does not have (its own, 192.0.2.2 on some machines, would
    // rightly not be learned).
    let mut records = vec![
        Rec::Cname("www.example.com", 300, "a.example.com"),
        Rec::Cname("a.example.com", 120, "b.example.com"),
        Rec::Addr("b.example.com", 60, ip("203.0.113.1")),
        Rec::Addr("b.example.com", 60, ip("203.0.113.2")),
        Rec::Addr("b.example.com", 90, ip("203.0.113.3")),
        Rec::Addr("v6.example.com", 30, ip("2001:db8::1")),
    ];
    for i in 1..=50u8 {
        records.push(Rec::Addr(
            "many.example.com",
            300,
            IpAddr::from([198, 51, 100, i]),
        ));
    }
    let auth = tokio::task::spawn_blocking(move || Authority::start("example.com", &records))
        .await
        .unwrap();
    let proxy = start(
        dns_config(auth.addr),
        VerdictConfig::default(),
        Arc::new(NoopSink),
    )
    .await;
    let at = proxy.udp_addrs()[0];

    let r = ask("127.0.0.2", at, msg::query(1, "www.example.com", 1))
        .await
        .unwrap();
    assert_eq!(
        (rcode(&r), u16::from_be_bytes([r[6], r[7]])),
        (0, 5),
        "2 CNAMEs + 3 A"
    );
    let chain = proxy.shared().with_cache(|c| {
        let mut v: Vec<(String, usize)> = c
            .iter()
            .map(|(n, ips, _)| (n.to_owned(), ips.len()))
            .collect();
        v.sort();
        v
    });
    assert_eq!(
        chain,
        [
            ("a.example.com".into(), 3),
            ("b.example.com".into(), 3),
            ("www.example.com".into(), 3)
        ]
    );
    let left = proxy
        .shared()
        .with_cache(|c| c.ips("www.example.com")[0].expires)
        .saturating_duration_since(Instant::now());
    assert!(
        left <= Duration::from_secs(60),
        "smallest TTL on the chain: {left:?}"
    );

    // 50 A records do not fit in 512 bytes: the truncated UDP answer is relayed with TC and
    // teaches nothing; the client retries over TCP and gets (and the proxy learns) all 50.
    let r = ask("127.0.0.2", at, msg::query(2, "many.example.com", 1))
        .await
        .unwrap();
    assert_ne!(r[2] & 0x02, 0, "TC relayed");
    assert_eq!(
        proxy
            .shared()
            .with_cache(|c| c.ips("many.example.com").len()),
        0
    );
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = sock.connect(proxy.tcp_addrs()[0]).await.unwrap();
    tcp_send(&mut s, &msg::query(2, "many.example.com", 1)).await;
    let r = tcp_recv(&mut s).await.unwrap();
    assert_eq!(u16::from_be_bytes([r[6], r[7]]), 50);
    assert_eq!(
        proxy
            .shared()
            .with_cache(|c| c.ips("many.example.com").len()),
        50
    );

    // AAAA, over the same TCP connection.
    tcp_send(&mut s, &msg::query(3, "v6.example.com", 28)).await;
    let r = tcp_recv(&mut s).await.unwrap();
    assert_eq!(
        (rcode(&r), &r[r.len() - 16..]),
        (0, &ip6_bytes("2001:db8::1")[..])
    );
    let learned = proxy
        .shared()
        .with_cache(|c| c.ips("v6.example.com").to_vec());
    assert_eq!(learned.len(), 1);
    assert_eq!(learned[0].ip, ip("2001:db8::1"));
}

fn ip6_bytes(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_upstream_connection_the_server_closed_is_replaced() {
    // An upstream that answers one query per connection, then closes it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                if let Some(q) = tcp_recv(&mut s).await {
                    let r = msg::response(
                        &q,
                        0,
                        &[msg::a("fast.example.com", 60, [192, 0, 2, 1])],
                        &[],
                    );
                    tcp_send(&mut s, &r).await;
                }
            });
        }
    });
    let proxy = start(dns_config(up), VerdictConfig::default(), Arc::new(NoopSink)).await;
    for id in 0..3u16 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(proxy.tcp_addrs()[0]).await.unwrap();
        tcp_send(&mut s, &msg::query(id, "fast.example.com", 1)).await;
        let r = tcp_recv(&mut s).await.expect("answer");
        assert_eq!(rcode(&r), 0, "query {id}");
    }
}

/// web-1 (127.0.0.2) may resolve `*.example.com` on port `port` of kube-dns, which has
/// two addresses: 127.0.0.1 and `second`.
fn two_kube_dns_snapshot(port: u16, second: &str) -> Snapshot {
    let mut loader = PolicyLoader::new();
    loader.add("policy.yaml", &policy(port));
    let (set, _) = loader.finish();
    let ep = |name: &str, ns: &str, k: &str, v: &str, ips: &[&str]| EndpointSpec {
        name: name.into(),
        namespace: ns.into(),
        labels: Labels::new([(k, v)]).unwrap(),
        ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
    };
    Snapshot::new(
        Arc::new(set),
        &[
            ep("web-1", "default", "app", "web", &["127.0.0.2"]),
            ep(
                "coredns",
                "kube-system",
                "k8s-app",
                "kube-dns",
                &["127.0.0.1", second],
            ),
        ],
        vec![],
        VerdictConfig::default(),
    )
}

/// A proxy whose two upstreams, `upstreams`, are both kube-dns (see
/// [`two_kube_dns_snapshot`]): 127.0.0.1 and `second`, on the same port.
async fn start_two(upstreams: [SocketAddr; 2], second: &str, upstream_timeout: Duration) -> Proxy {
    start_two_hedged(upstreams, second, upstream_timeout, HedgeAfter::Auto).await
}

/// [`start_two`], with the second copy of a slow query sent after `hedge`.
async fn start_two_hedged(
    upstreams: [SocketAddr; 2],
    second: &str,
    upstream_timeout: Duration,
    hedge: HedgeAfter,
) -> Proxy {
    let port = upstreams[0].port();
    Proxy::start(
        DnsConfig {
            upstreams: upstreams.to_vec(),
            upstream_timeout,
            upstream_hedge_after: hedge,
            ..dns_config(upstreams[0])
        },
        two_kube_dns_snapshot(port, second),
        Arc::new(NoopSink),
        ProxyMetrics::default(),
        flow_log(),
    )
    .await
    .unwrap()
}

/// Waits (at most a second) until the proxy has no query in flight: it counts one out
/// just after its answer (or SERVFAIL) left, so a client can have it a moment before.
async fn every_query_left(proxy: &Proxy) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while proxy.shared().in_flight() != 0 {
        assert!(
            Instant::now() < deadline,
            "{} queries still in flight",
            proxy.shared().in_flight()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A scripted upstream on `sock` that answers every query for `api.example.com` with
/// 192.0.2.1 and counts the queries it answered.
fn answering_upstream(sock: Arc<UdpSocket>) -> Arc<std::sync::atomic::AtomicUsize> {
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let r = msg::response(
                &buf[..n],
                0,
                &[msg::a("api.example.com", 60, [192, 0, 2, 1])],
                &[],
            );
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = sock.send_to(&r, from).await;
        }
    });
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_both_copies_of_a_hedged_query_fail_the_client_gets_one_servfail() {
    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let a_addr = a.local_addr().unwrap();
    let b_addr: SocketAddr = format!("127.0.0.8:{}", a_addr.port()).parse().unwrap();
    let _b = UdpSocket::bind(b_addr).await.unwrap();
    let timeout = Duration::from_millis(300);
    let proxy = start_two([a_addr, b_addr], "127.0.0.8", timeout).await;
    let at = proxy.udp_addrs()[0];
    let client = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    client
        .send_to(&msg::query(7, "api.example.com", 1), at)
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), client.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(rcode(&buf[..n]), 2, "SERVFAIL once both copies timed out");
    let m = &proxy.shared().metrics;
    assert_eq!(m.upstream_retries.get(), 1, "one second copy");
    // Exactly one answer, and the query no longer counts as in flight.
    let again = tokio::time::timeout(Duration::from_millis(500), client.recv_from(&mut buf)).await;
    assert!(again.is_err(), "a second answer arrived");
    every_query_left(&proxy).await;
    assert_eq!(m.upstream_timeouts.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_is_hedged_passed_over_and_taken_back_after_a_probe() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    // Two upstreams the policy allows (both are kube-dns), on the same port: one answers,
    // the other counts what it gets and answers only once told to.
    let good = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let good_addr = good.local_addr().unwrap();
    let silent_addr: SocketAddr = format!("127.0.0.5:{}", good_addr.port()).parse().unwrap();
    let silent = UdpSocket::bind(silent_addr).await.unwrap();
    let answered_by_good = answering_upstream(good);
    let reached_silent = Arc::new(AtomicUsize::new(0));
    let wakes = Arc::new(AtomicBool::new(false));
    {
        let (reached, wakes) = (reached_silent.clone(), wakes.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = silent.recv_from(&mut buf).await {
                reached.fetch_add(1, SeqCst);
                if wakes.load(SeqCst) {
                    let r = msg::response(
                        &buf[..n],
                        0,
                        &[msg::a("api.example.com", 60, [192, 0, 2, 1])],
                        &[],
                    );
                    let _ = silent.send_to(&r, from).await;
                }
            }
        });
    }
    let timeout = Duration::from_secs(1);
    let proxy = start_two([silent_addr, good_addr], "127.0.0.5", timeout).await;
    let at = proxy.udp_addrs()[0];
    let m = &proxy.shared().metrics;
    // Round robin sends every other query to the silent one. Each of those gets a second
    // copy to the other upstream after a fifth of the timeout: answered, well before the
    // timeout.
    answered_within(at, 0..8, timeout).await;
    assert!(
        m.upstream_retries.get() >= 3,
        "{}",
        m.upstream_retries.get()
    );
    // Once three of its queries have timed out, it is marked down...
    let deadline = Instant::now() + Duration::from_secs(5);
    while m.upstreams_down.get() != 1 {
        assert!(Instant::now() < deadline, "never marked down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and passed over: nothing more reaches it.
    let reached = reached_silent.load(SeqCst);
    all_answered(at, 20..30u16).await;
    assert_eq!(
        reached_silent.load(SeqCst),
        reached,
        "a down upstream got queries"
    );
    // It comes back: after the one-second back-off a probe reaches it, it answers, and it
    // is used again.
    wakes.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = answered_by_good.load(SeqCst);
    all_answered(at, 40..50u16).await;
    let by_good = answered_by_good.load(SeqCst) - before;
    assert!(
        by_good < 10,
        "the recovered upstream took some of them ({by_good} of 10 went to the other)"
    );
    assert_eq!(m.upstreams_down.get(), 0);
    every_query_left(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_source_ports_change_and_replaced_sockets_close_once_their_answers_came() {
    use std::collections::HashSet;
    // An upstream that answers each query 300 ms late (past the sockets' 100 ms lifetime,
    // so queries are still waiting when their socket is replaced) and notes the source
    // port each query came from.
    let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let up_addr = up.local_addr().unwrap();
    let ports = Arc::new(Mutex::new(HashSet::new()));
    {
        let (up, ports) = (up.clone(), ports.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = up.recv_from(&mut buf).await {
                ports.lock().unwrap().insert(from.port());
                let r = msg::response(
                    &buf[..n],
                    0,
                    &[msg::a("api.example.com", 60, [192, 0, 2, 1])],
                    &[],
                );
                let up = up.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = up.send_to(&r, from).await;
                });
            }
        });
    }
    let proxy = start(
        DnsConfig {
            upstream_port_lifetime: Duration::from_millis(100),
            upstream_timeout: Duration::from_secs(2),
            ..dns_config(up_addr)
        },
        VerdictConfig::default(),
        Arc::new(NoopSink),
    )
    .await;
    let at = proxy.udp_addrs()[0];
    let sockets = proxy.shared().metrics.upstream_sockets.clone();
    let at_start = sockets.get();
    // A query every 40 ms for 1.2 s: every one is answered, from whichever port it left.
    let mut clients = Vec::new();
    for id in 0..30u16 {
        clients.push(tokio::spawn(ask(
            "127.0.0.2",
            at,
            msg::query(id, "api.example.com", 1),
        )));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    for (id, c) in clients.into_iter().enumerate() {
        let reply = c
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("query {id} unanswered"));
        assert_eq!(rcode(&reply), 0, "query {id}");
        assert_eq!(&reply[..2], &u16::try_from(id).unwrap().to_be_bytes());
    }
    let seen = ports.lock().unwrap().len();
    assert!(
        seen > 8,
        "30 queries over 1.2 s left from {seen} ports: the 4 sockets were not replaced"
    );
    every_query_left(&proxy).await;
    assert_eq!(proxy.shared().metrics.upstream_timeouts.get(), 0);
    // Replaced sockets close once their answers came: the count of open ones goes back to
    // where it started (they keep being replaced while idle).
    let deadline = Instant::now() + Duration::from_secs(5);
    while sockets.get() > at_start {
        assert!(
            Instant::now() < deadline,
            "{} upstream sockets open, {at_start} at the start: replaced ones stay open",
            sockets.get()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_query_is_copied_after_the_configured_delay_or_never_when_off() {
    // `auto` would copy after 400 ms.
    let timeout = Duration::from_secs(2);
    for (hedge, copied) in [
        (HedgeAfter::After(Duration::from_millis(50)), true),
        (HedgeAfter::Off, false),
    ] {
        // Two upstreams the policy allows: one answers, the other never does.
        let good = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let good_addr = good.local_addr().unwrap();
        let silent_addr: SocketAddr = format!("127.0.0.6:{}", good_addr.port()).parse().unwrap();
        let _silent = UdpSocket::bind(silent_addr).await.unwrap();
        answering_upstream(good);
        let proxy = start_two_hedged([silent_addr, good_addr], "127.0.0.6", timeout, hedge).await;
        let at = proxy.udp_addrs()[0];
        // Round robin sends some of four queries to the silent upstream.
        let clients: Vec<_> = (0..4u16)
            .map(|id| {
                tokio::spawn(async move {
                    let started = Instant::now();
                    let reply = ask("127.0.0.2", at, msg::query(id, "api.example.com", 1)).await;
                    (reply, started.elapsed())
                })
            })
            .collect();
        let mut slowest = Duration::ZERO;
        for c in clients {
            let (reply, took) = c.await.unwrap();
            assert_eq!(rcode(&reply.expect("answered")), 0, "{hedge:?}");
            slowest = slowest.max(took);
        }
        if copied {
            // The copy left after 50 ms, well before `auto` would have sent it.
            assert!(
                slowest < Duration::from_millis(300),
                "{hedge:?}: {slowest:?}"
            );
        } else {
            // No copy: the silent upstream's queries were asked again only at the timeout.
            assert!(slowest >= timeout, "{hedge:?}: {slowest:?}");
        }
        assert!(
            proxy.shared().metrics.upstream_retries.get() >= 1,
            "{hedge:?}"
        );
        every_query_left(&proxy).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_a_slow_query_is_copied_to_another_upstream_and_the_first_answer_wins() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    // Two allowed upstreams on the same port: one answers, the other takes each query and
    // never answers.
    let (good, _) = tcp_upstream_counting().await;
    let silent_addr: SocketAddr = format!("127.0.0.9:{}", good.port()).parse().unwrap();
    let silent = tokio::net::TcpListener::bind(silent_addr).await.unwrap();
    let reached_silent = Arc::new(AtomicUsize::new(0));
    {
        let reached = reached_silent.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = silent.accept().await {
                let reached = reached.clone();
                tokio::spawn(async move {
                    while tcp_recv(&mut s).await.is_some() {
                        reached.fetch_add(1, SeqCst);
                    }
                });
            }
        });
    }
    let timeout = Duration::from_secs(2);
    let hedge = HedgeAfter::After(Duration::from_millis(50));
    let proxy = start_two_hedged([silent_addr, good], "127.0.0.9", timeout, hedge).await;
    // Every query is answered long before the timeout, the silent upstream's too.
    for id in 0..4u16 {
        let started = Instant::now();
        let mut s = tcp_from("127.0.0.2", proxy.tcp_addrs()[0]).await.unwrap();
        tcp_send(&mut s, &msg::query(id, "fast.example.com", 1)).await;
        let r = tcp_recv(&mut s).await.expect("answer");
        assert_eq!(rcode(&r), 0, "query {id} answered");
        assert_eq!(&r[..2], &id.to_be_bytes());
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "query {id} took {:?}",
            started.elapsed()
        );
    }
    assert!(reached_silent.load(SeqCst) >= 1, "round robin asked both");
    assert!(proxy.shared().metrics.upstream_retries.get() >= 1);
    every_query_left(&proxy).await;
}
