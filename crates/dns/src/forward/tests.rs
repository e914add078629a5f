//! The forwarder on a virtual clock: every test reads the clock once (`t0`) and then says
//! what time it is, so hedges, retries, timeouts and back-offs are exact and take no time.

#![allow(clippy::unwrap_used, reason = "tests: a panic is a failure")]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use dnsfence_policy::{Labels, PolicyLoader, Protocol};
use dnsfence_testsupport::msg;
use dnsfence_testsupport::policy::{dns_policy, DnsPeer};

use super::health::{FIRST_BACKOFF, MAX_FAILS};
use super::*;
use crate::query::{parse_query, ParsedQuery};
use crate::snapshot::{EndpointSpec, VerdictConfig};

/// Query IDs as scripted, then counting up from the second field.
struct Script(VecDeque<u16>, u16);

impl rand_core::TryRng for Script {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let id = self.0.pop_front().unwrap_or_else(|| {
            self.1 = self.1.wrapping_add(1);
            self.1
        });
        Ok(u32::from(id))
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        self.try_next_u32().map(u64::from)
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        dst.fill(0);
        Ok(())
    }
}

impl rand_core::TryCryptoRng for Script {}

/// kube-dns, which the client's policy allows for `*.example.com`.
const A: &str = "10.96.0.10:53";
/// kube-dns's second address.
const B: &str = "10.96.0.11:53";
/// A server no rule covers.
const X: &str = "192.0.2.53:53";
/// web-1, the client.
const CLIENT: &str = "10.0.0.2:5353";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn snapshot() -> Snapshot {
    let mut l = PolicyLoader::new();
    l.add(
        "p.yaml",
        &dns_policy("web", DnsPeer::KubeDns, 53, &["*.example.com"], &[]),
    );
    let (set, _) = l.finish();
    let ep = |name: &str, ns: &str, k: &str, v: &str, ips: &[&str]| EndpointSpec {
        name: name.into(),
        namespace: ns.into(),
        labels: Labels::new([(k, v)]).unwrap(),
        ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
    };
    Snapshot::new(
        Arc::new(set),
        &[
            ep("web-1", "default", "app", "web", &["10.0.0.2"]),
            ep(
                "coredns",
                "kube-system",
                "k8s-app",
                "kube-dns",
                &["10.96.0.10", "10.96.0.11"],
            ),
        ],
        vec![],
        VerdictConfig::default(),
    )
}

/// A forwarder over `upstreams`, each with a UDP path of its own, on a virtual clock.
struct Rig {
    fwd: Forwarder<u32, Script>,
    snapshot: Snapshot,
    t0: Instant,
    upstreams: Vec<SocketAddr>,
    paths: Vec<(SocketAddr, PathId)>,
}

/// One query as it left for its upstream.
#[derive(Debug)]
struct Asked {
    upstream: SocketAddr,
    path: PathId,
    packet: Vec<u8>,
}

impl Rig {
    fn new(upstreams: &[&str], hedge_after: Option<u64>, ids: &[u16]) -> Self {
        let upstreams: Vec<SocketAddr> = upstreams.iter().map(|s| addr(s)).collect();
        let config = ForwarderConfig {
            upstreams: upstreams.clone(),
            timeout: Duration::from_secs(2),
            hedge_after: hedge_after.map(Duration::from_millis),
        };
        let mut fwd = Forwarder::new(config, Script(ids.iter().copied().collect(), 1000));
        let paths = upstreams.iter().map(|u| (*u, fwd.open_path())).collect();
        Self {
            fwd,
            snapshot: snapshot(),
            t0: Instant::now(),
            upstreams,
            paths,
        }
    }

    /// `ms` milliseconds after the start.
    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn path(&self, server: SocketAddr) -> PathId {
        self.paths.iter().find(|(s, _)| *s == server).unwrap().1
    }

    /// Client `token` asks `name` (ID `id`) at `ms`, the servers tried from `start` on.
    fn ask(&mut self, ms: u64, token: u32, id: u16, name: &str, start: usize) -> Asked {
        let now = self.at(ms);
        let mut packet = msg::query(id, name, 1);
        let ParsedQuery::Query(query) = parse_query(&packet) else {
            panic!("not a query")
        };
        let servers = self.upstreams.clone();
        let client = addr(CLIENT);
        let choice = self.fwd.choose(
            now,
            &self.snapshot,
            client.ip(),
            &servers,
            start,
            Protocol::Udp,
            &query,
        );
        let (upstream, verdict) = choice.forward.expect("allowed");
        let path = self.path(upstream);
        let out = Outbound {
            client: token,
            addr: client,
            upstream,
            learn: verdict.learn,
            may_retry: servers.len() > 1,
            received: now,
        };
        let sent = self
            .fwd
            .send(now, Route::Udp(path), out, &query, &mut packet)
            .map_err(|e| e.reason)
            .unwrap();
        assert_eq!(wire::id(&packet), Some(sent.id));
        Asked {
            upstream,
            path,
            packet,
        }
    }

    /// The copies to send at `ms`.
    fn transmits(&mut self, ms: u64) -> Vec<Transmit> {
        let now = self.at(ms);
        let paths = self.paths.clone();
        let mut out = Vec::new();
        while let Some(t) = self.fwd.poll_transmit(now, |server| {
            paths.iter().find(|(s, _)| *s == server).map(|(_, p)| *p)
        }) {
            out.push(t);
        }
        out
    }

    /// The clock reaches `ms`: what is lost and what is sent.
    fn tick(&mut self, ms: u64) -> Vec<Transmit> {
        self.fwd.handle_timeout(self.at(ms), &self.snapshot);
        self.transmits(ms)
    }

    fn events(&mut self) -> Vec<Event<u32>> {
        std::iter::from_fn(|| self.fwd.poll_event()).collect()
    }

    /// The clients owed SERVFAIL, and why.
    fn failed(&mut self) -> Vec<(u32, FailReason)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Failed(f) => Some((f.client, f.reason)),
                _ => None,
            })
            .collect()
    }

    /// `from` answers `packet` (a query as it left) on `path` with `ip`.
    fn reply(
        &mut self,
        path: PathId,
        from: SocketAddr,
        packet: &[u8],
        ip: [u8; 4],
    ) -> Result<Answered<u32>, Rejection> {
        let name = qname(packet);
        let mut answer = msg::response(packet, 0, &[msg::a(&name, 60, ip)], &[]);
        self.fwd.handle_answer(path, from, &mut answer)
    }
}

/// The question's name in `packet`, dotted.
fn qname(packet: &[u8]) -> String {
    let mut labels = Vec::new();
    let mut at = wire::HEADER_LEN;
    while let Some(&len) = packet.get(at).filter(|l| **l != 0) {
        let label = &packet[at + 1..at + 1 + usize::from(len)];
        labels.push(String::from_utf8_lossy(label).into_owned());
        at += 1 + usize::from(len);
    }
    labels.join(".")
}

/// A copy as [`Asked`], for [`Rig::reply`].
impl From<&Transmit> for Asked {
    fn from(t: &Transmit) -> Self {
        Asked {
            upstream: t.server,
            path: t.path,
            packet: t.contents.clone(),
        }
    }
}

impl Rig {
    fn answer(&mut self, asked: &Asked, ip: [u8; 4]) -> Result<Answered<u32>, Rejection> {
        self.reply(asked.path, asked.upstream, &asked.packet, ip)
    }
}

#[test]
fn forged_answers_are_ignored_and_the_real_one_reaches_the_client_under_its_id() {
    let mut rig = Rig::new(&[A], None, &[]);
    let asked = rig.ask(0, 1, 0xbeef, "api.example.com", 0);
    // The right ID and question, from a server not asked.
    let forged = rig.reply(asked.path, addr(X), &asked.packet, [6, 6, 6, 6]);
    assert_eq!(forged.unwrap_err(), Rejection::WrongSource);
    // From the server asked, under an ID nobody waits for.
    let mut stray = asked.packet.clone();
    wire::set_id(&mut stray, wire::id(&asked.packet).unwrap().wrapping_add(1));
    let stray = rig.reply(asked.path, asked.upstream, &stray, [6, 6, 6, 6]);
    assert_eq!(stray.unwrap_err(), Rejection::UnknownId);
    // The right ID from the right server, answering another question.
    let mut other = msg::query(0, "bank.example.com", 1);
    other[..2].copy_from_slice(&asked.packet[..2]);
    let other = rig.reply(asked.path, asked.upstream, &other, [6, 6, 6, 6]);
    assert!(
        matches!(other, Err(Rejection::NotTheAnswer(_))),
        "{other:?}"
    );
    // The query still waits; the real answer gets through, once.
    let real = rig.answer(&asked, [192, 0, 2, 10]).unwrap();
    assert_eq!(real.client, Some(1));
    assert_eq!(
        (real.upstream, real.addr, real.learn),
        (addr(A), addr(CLIENT), true)
    );
    assert_eq!(
        real.answer.learned.ips.as_slice(),
        [std::net::IpAddr::from([192, 0, 2, 10])]
    );
    assert_eq!(real.question(), &msg::query(0, "api.example.com", 1)[12..]);
    assert_eq!(
        rig.answer(&asked, [192, 0, 2, 10]).unwrap_err(),
        Rejection::UnknownId
    );
    assert_eq!(rig.fwd.in_flight(), 0);
    assert!(rig.fwd.paths.get(asked.path.0).unwrap().ids.is_empty());
    assert_eq!(rig.fwd.poll_timeout(), None, "nothing left to time out");
}

#[test]
fn the_answer_carries_the_client_s_id_back() {
    let mut rig = Rig::new(&[A], None, &[]);
    let asked = rig.ask(0, 1, 0xbeef, "api.example.com", 0);
    assert_ne!(wire::id(&asked.packet), Some(0xbeef), "a fresh ID upstream");
    let mut answer = msg::response(&asked.packet, 0, &[], &[]);
    let answered = rig
        .fwd
        .handle_answer(asked.path, asked.upstream, &mut answer);
    assert_eq!(answered.unwrap().client, Some(1));
    assert_eq!(wire::id(&answer), Some(0xbeef));
}

#[test]
fn a_slow_query_gets_a_second_copy_after_the_hedge_delay_and_the_first_answer_wins() {
    let mut rig = Rig::new(&[A, B], Some(400), &[]);
    let first = rig.ask(0, 1, 7, "api.example.com", 0);
    assert_eq!(first.upstream, addr(A));
    assert_eq!(rig.fwd.poll_timeout(), Some(rig.at(400)));
    assert!(rig.tick(399).is_empty(), "not slow yet");
    let copies = rig.tick(400);
    assert_eq!(copies.len(), 1);
    let second = &copies[0];
    assert_eq!(
        (second.server, second.from, second.hedge),
        (addr(B), addr(A), true)
    );
    assert_eq!(second.transport, Transport::Udp);
    assert_eq!(wire::id(&second.contents), Some(second.id));
    assert_eq!(second.contents[2..], first.packet[2..], "the same query");
    assert_eq!(
        rig.fwd.poll_timeout(),
        Some(rig.at(2000)),
        "the first copy's deadline"
    );
    // The second copy answers first: the client gets it.
    let won = rig.answer(&Asked::from(second), [192, 0, 2, 2]).unwrap();
    assert_eq!((won.client, won.upstream), (Some(1), addr(B)));
    assert_eq!(won.sent, rig.at(400));
    // The first copy's answer comes late: it teaches, but reaches nobody.
    let late = rig.answer(&first, [192, 0, 2, 1]).unwrap();
    assert_eq!((late.client, late.upstream), (None, addr(A)));
    assert_eq!(rig.fwd.in_flight(), 0);
    assert!(rig.tick(5000).is_empty());
    assert!(rig.events().is_empty(), "no failure, no SERVFAIL");
}

#[test]
fn a_late_copy_that_times_out_costs_its_upstream_but_the_client_nothing() {
    let mut rig = Rig::new(&[A, B], Some(400), &[]);
    let _first = rig.ask(0, 1, 7, "api.example.com", 0);
    let copies = rig.tick(400);
    rig.answer(&Asked::from(&copies[0]), [192, 0, 2, 2])
        .unwrap();
    assert!(rig.tick(2000).is_empty());
    let events = rig.events();
    assert!(
        matches!(events[..], [Event::Lost { upstream, reason: FailReason::Timeout }] if upstream == addr(A)),
        "{events:?}"
    );
    assert_eq!(rig.fwd.in_flight(), 0);
}

#[test]
fn when_both_copies_of_a_hedged_query_time_out_the_client_gets_one_servfail() {
    let mut rig = Rig::new(&[A, B], Some(400), &[]);
    rig.ask(0, 1, 7, "api.example.com", 0);
    assert_eq!(rig.tick(400).len(), 1);
    assert!(rig.tick(2000).is_empty(), "no third copy");
    assert!(rig.failed().is_empty(), "the second copy still waits");
    assert!(rig.tick(2400).is_empty());
    let events = rig.events();
    let [Event::Lost { .. }, Event::Failed(f)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(
        (f.client, f.upstream, f.reason),
        (1, addr(B), FailReason::Timeout)
    );
    let mut out = [0u8; 512];
    let n = f.write_servfail(&mut out).unwrap();
    let servfail = &out[..n];
    assert_eq!(wire::id(servfail), Some(7));
    assert_eq!(wire::rcode(servfail), Some(2));
    assert_eq!(f.question(), &msg::query(7, "api.example.com", 1)[12..]);
    assert_eq!(rig.fwd.in_flight(), 0);
}

#[test]
fn without_another_upstream_a_timeout_is_servfail() {
    let mut rig = Rig::new(&[A], Some(400), &[]);
    rig.ask(0, 1, 7, "api.example.com", 0);
    assert_eq!(
        rig.fwd.poll_timeout(),
        Some(rig.at(2000)),
        "one upstream: no hedge"
    );
    assert!(rig.tick(1999).is_empty());
    assert!(rig.failed().is_empty());
    assert!(rig.tick(2000).is_empty());
    assert_eq!(rig.failed(), [(1, FailReason::Timeout)]);
}

#[test]
fn a_failed_query_is_asked_again_of_another_upstream_at_most_once() {
    for how in [
        FailReason::SendFailed,
        FailReason::Unreachable,
        FailReason::Timeout,
    ] {
        let mut rig = Rig::new(&[A, B], None, &[]);
        let first = rig.ask(0, 1, 7, "api.example.com", 0);
        let fail = |rig: &mut Rig, asked: &Asked, ms: u64| match how {
            FailReason::SendFailed => {
                let id = wire::id(&asked.packet).unwrap();
                rig.fwd
                    .handle_send_error(rig.at(ms), &rig.snapshot, asked.path, id);
            }
            FailReason::Unreachable => {
                rig.fwd
                    .handle_unreachable(rig.at(ms), &rig.snapshot, asked.path)
            }
            FailReason::Timeout => rig.fwd.handle_timeout(rig.at(ms + 2000), &rig.snapshot),
        };
        fail(&mut rig, &first, 10);
        let retry = rig.transmits(10);
        assert_eq!(retry.len(), 1, "{how:?}");
        assert_eq!(
            (retry[0].server, retry[0].hedge),
            (addr(B), false),
            "{how:?}"
        );
        assert!(rig.failed().is_empty(), "{how:?}: asked again, not failed");
        // The retry fails too: no third upstream, no second retry.
        let second = Asked::from(&retry[0]);
        fail(&mut rig, &second, 20);
        assert!(rig.transmits(20).is_empty(), "{how:?}");
        assert_eq!(rig.failed(), [(1, how)], "{how:?}");
        assert_eq!(rig.fwd.in_flight(), 0, "{how:?}");
    }
}

#[test]
fn an_answer_to_the_retry_reaches_the_client() {
    let mut rig = Rig::new(&[A, B], None, &[]);
    let first = rig.ask(0, 1, 7, "api.example.com", 0);
    rig.fwd
        .handle_unreachable(rig.at(5), &rig.snapshot, first.path);
    let retry = rig.transmits(5);
    let answered = rig.answer(&Asked::from(&retry[0]), [192, 0, 2, 2]).unwrap();
    assert_eq!((answered.client, answered.received), (Some(1), rig.at(0)));
    let events = rig.events();
    assert!(
        matches!(
            events[..],
            [Event::Lost {
                reason: FailReason::Unreachable,
                ..
            }]
        ),
        "{events:?}"
    );
}

#[test]
fn an_unreachable_path_fails_every_query_waiting_on_it_at_once() {
    let mut rig = Rig::new(&[A], None, &[]);
    for token in 0..3 {
        rig.ask(0, token, token as u16, "api.example.com", 0);
    }
    let path = rig.path(addr(A));
    rig.fwd.handle_unreachable(rig.at(1), &rig.snapshot, path);
    assert!(rig.transmits(1).is_empty());
    let mut failed = rig.failed();
    failed.sort_by_key(|(t, _)| *t);
    assert_eq!(
        failed,
        [0, 1, 2].map(|t| (t, FailReason::Unreachable)),
        "SERVFAIL now, not at the timeout"
    );
    assert!(rig.fwd.close_path(path), "nothing waits on it");
}

#[test]
fn an_upstream_is_marked_down_after_silence_passed_over_and_back_after_a_probe() {
    let mut rig = Rig::new(&[A, B], None, &[]);
    // Three queries to A go unanswered; each is asked again of B, which answers.
    for k in 0..MAX_FAILS {
        rig.ask(0, k, 1, "api.example.com", 0);
    }
    for retry in rig.tick(2000) {
        rig.answer(&Asked::from(&retry), [192, 0, 2, 2]).unwrap();
    }
    let down: Vec<_> = rig
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::UpstreamDown {
                upstream,
                unanswered,
            } => Some((upstream, unanswered)),
            _ => None,
        })
        .collect();
    assert_eq!(down, [(addr(A), MAX_FAILS)]);
    let status: Vec<_> = rig.fwd.upstreams().collect();
    assert!(status[0].down && !status[1].down, "{status:?}");
    // Passed over: queries that would go to A go to B.
    assert_eq!(rig.ask(2500, 10, 1, "api.example.com", 0).upstream, addr(B));
    // After the back-off, one query probes A; the next goes to B while the probe is out.
    let back = 2000 + FIRST_BACKOFF.as_millis() as u64;
    let probe = rig.ask(back, 11, 1, "api.example.com", 0);
    assert_eq!(probe.upstream, addr(A));
    assert_eq!(rig.ask(back, 12, 1, "api.example.com", 0).upstream, addr(B));
    // The probe is answered: A is back.
    rig.answer(&probe, [192, 0, 2, 1]).unwrap();
    let events = rig.events();
    assert!(
        matches!(events[..], [Event::UpstreamUp { upstream }] if upstream == addr(A)),
        "{events:?}"
    );
    assert_eq!(rig.ask(back, 13, 1, "api.example.com", 0).upstream, addr(A));
}

#[test]
fn when_every_allowed_upstream_is_down_one_is_used_anyway() {
    let mut rig = Rig::new(&[A, B], None, &[]);
    for k in 0..MAX_FAILS {
        rig.ask(0, k, 1, "api.example.com", 0);
        rig.ask(0, 10 + k, 1, "api.example.com", 1);
    }
    // A cannot be reached: its queries are asked of B, which cannot be reached either.
    rig.fwd
        .handle_unreachable(rig.at(10), &rig.snapshot, rig.path(addr(A)));
    assert_eq!(rig.transmits(10).len(), 3);
    rig.fwd
        .handle_unreachable(rig.at(20), &rig.snapshot, rig.path(addr(B)));
    assert!(
        rig.transmits(20).is_empty(),
        "A is down: nobody left to ask"
    );
    assert_eq!(rig.failed().len(), 6, "every client got SERVFAIL");
    assert!(rig.fwd.upstreams().all(|u| u.down));
    // Neither is due for a probe yet: the first allowed one is used all the same.
    assert_eq!(rig.ask(500, 20, 1, "api.example.com", 1).upstream, addr(B));
    assert_eq!(rig.ask(500, 21, 1, "api.example.com", 0).upstream, addr(A));
}

#[test]
fn the_policy_decides_which_servers_may_take_a_query_health_only_orders_them() {
    let mut rig = Rig::new(&[X, A], None, &[]);
    let ParsedQuery::Query(query) = parse_query(&msg::query(1, "api.example.com", 1)) else {
        panic!()
    };
    let client = addr(CLIENT).ip();
    let servers = [addr(X), addr(A)];
    let choice = rig.fwd.choose(
        rig.t0,
        &rig.snapshot,
        client,
        &servers,
        0,
        Protocol::Udp,
        &query,
    );
    assert_eq!(choice.forward.map(|(s, _)| s), Some(addr(A)));
    assert_eq!(
        choice.denied.map(|(s, _)| s),
        Some(addr(X)),
        "the first denial"
    );
    let ParsedQuery::Query(denied) = parse_query(&msg::query(1, "api.example.org", 1)) else {
        panic!()
    };
    let choice = rig.fwd.choose(
        rig.t0,
        &rig.snapshot,
        client,
        &servers,
        1,
        Protocol::Udp,
        &denied,
    );
    assert!(choice.forward.is_none());
    assert_eq!(
        choice.denied.map(|(s, _)| s),
        Some(addr(A)),
        "tried from index 1"
    );
    // A retry never goes to a server the policy does not allow: there is none here.
    let first = rig.ask(0, 1, 7, "api.example.com", 0);
    assert_eq!(first.upstream, addr(A));
    rig.fwd
        .handle_unreachable(rig.at(1), &rig.snapshot, first.path);
    assert!(rig.transmits(1).is_empty());
    assert_eq!(rig.failed(), [(1, FailReason::Unreachable)]);
}

#[test]
fn a_repeated_id_is_never_given_to_two_queries_on_one_path() {
    // The generator repeats 7: the second query on the path gets 9, while another path may
    // use 7.
    let mut rig = Rig::new(&[A, B], None, &[7, 7, 9, 7]);
    let one = rig.ask(0, 1, 100, "api.example.com", 0);
    let two = rig.ask(0, 2, 200, "www.example.com", 0);
    let three = rig.ask(0, 3, 300, "api.example.com", 1);
    assert_eq!(wire::id(&one.packet), Some(7));
    assert_eq!(wire::id(&two.packet), Some(9));
    assert_eq!(
        (three.upstream, wire::id(&three.packet)),
        (addr(B), Some(7))
    );
    for (asked, token) in [(&two, 2), (&one, 1), (&three, 3)] {
        assert_eq!(
            rig.answer(asked, [192, 0, 2, 1]).unwrap().client,
            Some(token)
        );
    }
}

#[test]
fn a_generator_stuck_on_one_value_still_finds_a_free_id() {
    let mut rig = Rig::new(&[A], None, &[5; 64]);
    let one = rig.ask(0, 1, 1, "api.example.com", 0);
    let two = rig.ask(0, 2, 2, "api.example.com", 0);
    assert_eq!(wire::id(&one.packet), Some(5));
    assert_ne!(wire::id(&two.packet), Some(5));
}

#[test]
fn a_full_path_takes_no_more_queries() {
    let mut rig = Rig::new(&[A], None, &[]);
    let path = rig.path(addr(A));
    let mut packet = msg::query(1, "api.example.com", 1);
    let ParsedQuery::Query(query) = parse_query(&packet) else {
        panic!()
    };
    let out = |token| Outbound {
        client: token,
        addr: addr(CLIENT),
        upstream: addr(A),
        learn: true,
        may_retry: false,
        received: rig.t0,
    };
    for token in 0..MAX_PENDING_PER_PATH as u32 {
        let sent = rig
            .fwd
            .send(rig.t0, Route::Udp(path), out(token), &query, &mut packet);
        assert!(sent.is_ok());
    }
    let refused = rig
        .fwd
        .send(rig.t0, Route::Udp(path), out(u32::MAX), &query, &mut packet)
        .unwrap_err();
    assert_eq!(
        (refused.client, refused.reason),
        (u32::MAX, SendError::NoFreeId)
    );
    assert!(!rig.fwd.close_path(path), "queries wait on it");
}

#[test]
fn over_tcp_each_copy_is_an_exchange_of_its_own() {
    let mut rig = Rig::new(&[A, B], Some(400), &[]);
    let mut packet = msg::query(7, "api.example.com", 1);
    let ParsedQuery::Query(query) = parse_query(&packet) else {
        panic!()
    };
    let out = Outbound {
        client: 1,
        addr: addr(CLIENT),
        upstream: addr(A),
        learn: true,
        may_retry: true,
        received: rig.t0,
    };
    let sent = rig
        .fwd
        .send(rig.t0, Route::Tcp, out, &query, &mut packet)
        .unwrap();
    assert!(
        rig.paths.iter().all(|(_, p)| *p != sent.path),
        "a path of its own"
    );
    rig.fwd.handle_timeout(rig.at(400), &rig.snapshot);
    let hedge = rig
        .fwd
        .poll_transmit(rig.at(400), |_| panic!("no UDP path for TCP"))
        .unwrap();
    assert_eq!((hedge.transport, hedge.server), (Transport::Tcp, addr(B)));
    assert_ne!(hedge.path, sent.path);
    // The first exchange breaks; the second answers, and its path closes with it.
    rig.fwd
        .handle_unreachable(rig.at(500), &rig.snapshot, sent.path);
    assert!(rig.failed().is_empty(), "the second copy still waits");
    let second = Asked::from(&hedge);
    assert_eq!(rig.answer(&second, [192, 0, 2, 2]).unwrap().client, Some(1));
    assert_eq!(
        rig.answer(&second, [192, 0, 2, 2]).unwrap_err(),
        Rejection::NoPath
    );
    assert_eq!(rig.fwd.paths.len(), 2, "only the UDP paths are left");
}

#[test]
fn answered_queries_leave_no_timers_behind() {
    let mut rig = Rig::new(&[A, B], Some(400), &[]);
    for k in 0..10_000u32 {
        let asked = rig.ask(0, k, 1, "api.example.com", 0);
        rig.answer(&asked, [192, 0, 2, 1]).unwrap();
    }
    assert!(
        rig.fwd.deadlines.len() <= 2 * TIMER_SLACK,
        "{}",
        rig.fwd.deadlines.len()
    );
    assert!(
        rig.fwd.hedges.len() <= 2 * TIMER_SLACK,
        "{}",
        rig.fwd.hedges.len()
    );
    assert_eq!(rig.fwd.poll_timeout(), None);
}
