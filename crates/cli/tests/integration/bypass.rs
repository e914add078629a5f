//! Bypass attempts from an enforced pod, each made for real in the lab and observed to
//! fail: forged source addresses, other resolvers and ports, DNS over TLS/HTTPS, names
//! that are not hostnames, malformed queries, ICMP. Where the attempt would leave the
//! node, a counter in the world's namespace proves that nothing arrived; each refusal also
//! shows in dnsfence's log with its reason.

use crate::common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::{a, blocked, env, ip, reach, resolve, Env, WorldCounter};
use dnsfence_lab::{DnsStatus, Outcome, Pod, RecordType, Transport, DNS_V4};
use nix::sys::socket::{
    recvfrom, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol,
    SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
};
use nix::sys::time::{TimeVal, TimeValLike};

/// Gives the pod an extra address and sends one UDP datagram from it.
fn send_forged(pod: &Pod, from: IpAddr, to: SocketAddr) {
    let prefix = if from.is_ipv4() { "32" } else { "128" };
    let mut args = vec!["addr", "add"];
    let cidr = format!("{from}/{prefix}");
    args.extend([cidr.as_str(), "dev", "eth0"]);
    if from.is_ipv6() {
        args.push("nodad");
    }
    let out = pod.netns().ip(&args);
    assert!(out.is_ok(), "{out:?}");
    let socket = pod
        .netns()
        .run(move || UdpSocket::bind(SocketAddr::new(from, 0)))
        .unwrap()
        .unwrap();
    for _ in 0..3 {
        socket.send_to(b"exfiltrated", to).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
}

fn log_shows(env: &Env, needles: &[&str]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let log = env.daemon.log();
        if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bypass_forged_source_addresses_never_leave_the_node() {
    let Some(env) = env(vec![]) else { return };
    let other_v4 = IpAddr::V4(env.other().ipv4());
    let plain_v4 = IpAddr::V4(env.plain().ipv4());
    let other_v6 = IpAddr::V6(env.other().ipv6());
    let unknown_v4 = ip("10.200.0.99");
    let unknown_v6: IpAddr = format!("{}99", env.web().ipv6().to_string().trim_end_matches('2'))
        .parse()
        .unwrap();
    let target = ip("192.0.2.50");
    let target6 = ip("2001:db8::50");
    let watch = WorldCounter::new(
        &env,
        &[
            ("other", format!("ip saddr {other_v4} udp dport 9000")),
            ("plain", format!("ip saddr {plain_v4} udp dport 9000")),
            ("unknown", format!("ip saddr {unknown_v4} udp dport 9000")),
            ("other6", format!("ip6 saddr {other_v6} udp dport 9000")),
            ("unknown6", format!("ip6 saddr {unknown_v6} udp dport 9000")),
        ],
    );
    // Control: the other pod may reach other.example.com, and the counter sees it.
    assert_eq!(a(env.other(), "other.example.com"), [target]);
    let echo = env
        .other()
        .udp_exchange(
            SocketAddr::new(target, 9000),
            b"legit",
            Duration::from_secs(2),
        )
        .unwrap();
    assert_eq!(echo, b"legit");
    assert_eq!(watch.count("other"), 1);

    // The web pod borrows the other pod's address (whose policy allows the target), a pod
    // without policy's address, an address nobody has, over IPv4 and IPv6.
    send_forged(env.web(), other_v4, SocketAddr::new(target, 9000));
    send_forged(env.web(), plain_v4, SocketAddr::new(target, 9000));
    send_forged(env.web(), unknown_v4, SocketAddr::new(target, 9000));
    send_forged(env.web(), other_v6, SocketAddr::new(target6, 9000));
    send_forged(env.web(), unknown_v6, SocketAddr::new(target6, 9000));
    assert_eq!(watch.count("other"), 1, "{}", env.diag());
    for name in ["plain", "unknown", "other6", "unknown6"] {
        assert_eq!(watch.count(name), 0, "{name}\n{}", env.diag());
    }
    assert!(
        log_shows(&env, &["forged-source", &other_v4.to_string()]),
        "{}",
        env.daemon.log()
    );
    assert!(log_shows(&env, &["forged-source", &unknown_v6.to_string()]));
}

#[test]
fn bypass_other_resolvers_and_ports_are_refused() {
    let Some(env) = env(vec![]) else { return };
    // Another resolver on port 53 (UDP and TCP): redirected and judged against the policy's
    // DNS servers, which do not include it.
    for transport in [Transport::Udp, Transport::Tcp] {
        let r = env
            .web()
            .netns()
            .resolve_with(
                SocketAddr::new(ip("203.0.113.53"), 53),
                "evil.example.org",
                RecordType::A,
                transport,
                Duration::from_secs(2),
            )
            .unwrap();
        assert_eq!(
            r.status,
            DnsStatus::Refused,
            "{transport:?}\n{}",
            env.diag()
        );
    }
    assert!(log_shows(&env, &["denied", &env.web().ipv4().to_string()]));
    // The allowed server on a port no DNS rule covers: not DNS, just refused traffic.
    for transport in [Transport::Udp, Transport::Tcp] {
        let r = env
            .web()
            .netns()
            .resolve_with(
                SocketAddr::new(DNS_V4.ip(), 5353),
                "api.example.com",
                RecordType::A,
                transport,
                Duration::from_secs(1),
            )
            .unwrap();
        assert!(
            matches!(
                r.status,
                DnsStatus::Unreachable | DnsStatus::ConnectionRefused | DnsStatus::TimedOut
            ),
            "{transport:?}: {:?}",
            r.status
        );
    }
    assert!(
        log_shows(&env, &["policy-denied", "5353"]),
        "{}",
        env.daemon.log()
    );
}

#[test]
fn bypass_dns_over_tls_and_https_reach_only_allowed_destinations() {
    let Some(env) = env(vec![]) else { return };
    // The world serves TCP on 443 and 853 everywhere: a refusal is the node's doing.
    for port in [853, 443] {
        assert!(blocked(reach(env.web(), DNS_V4.ip(), port)), "{port}");
        assert!(
            blocked(reach(env.web(), ip("2001:db8::53"), port)),
            "{port}"
        );
    }
    // A pod without policy reaches the same servers: they are there.
    assert_eq!(reach(env.plain(), DNS_V4.ip(), 443), Outcome::Connected);
}

/// A DNS query with the given wire-format name (labels as raw bytes) and question count.
fn raw_query(id: u16, labels: &[&[u8]], qdcount: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]);
    q.extend_from_slice(&qdcount.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    for _ in 0..qdcount.max(1) {
        for l in labels {
            q.push(l.len() as u8);
            q.extend_from_slice(l);
        }
        q.push(0);
        q.extend_from_slice(&[0, 1, 0, 1]);
    }
    q
}

fn rcode_of(pod: &Pod, query: &[u8]) -> Option<u8> {
    pod.udp_exchange(DNS_V4, query, Duration::from_secs(2))
        .ok()
        .filter(|r| r.len() >= 4 && r[..2] == query[..2])
        .map(|r| r[3] & 0x0f)
}

#[test]
fn bypass_names_that_are_not_hostnames_are_refused() {
    let Some(env) = env(vec![]) else { return };
    const REFUSED: u8 = 5;
    const FORMERR: u8 = 1;
    // Control: the plain wire form of an allowed name gets an answer.
    assert_eq!(
        rcode_of(env.web(), &raw_query(1, &[b"api", b"example", b"com"], 1)),
        Some(0)
    );
    // A label holding a dot reads as `x.api.example.com` when printed, which
    // `**.example.com` would allow; on the wire it is a different name.
    assert_eq!(
        rcode_of(env.web(), &raw_query(2, &[b"x.api", b"example", b"com"], 1)),
        Some(REFUSED)
    );
    assert_eq!(
        rcode_of(env.web(), &raw_query(3, &[b"api", b"example.com"], 1)),
        Some(REFUSED)
    );
    // Bytes outside the hostname alphabet.
    assert_eq!(
        rcode_of(env.web(), &raw_query(4, &[b"a b", b"example", b"com"], 1)),
        Some(REFUSED)
    );
    assert_eq!(
        rcode_of(env.web(), &raw_query(5, &[b"a\0", b"example", b"com"], 1)),
        Some(REFUSED)
    );
    // Over 255 bytes, two questions, a compression loop: FORMERR.
    let long = [
        b"a".repeat(63),
        b"b".repeat(63),
        b"c".repeat(63),
        b"d".repeat(63),
    ];
    let mut labels: Vec<&[u8]> = long.iter().map(Vec::as_slice).collect();
    labels.extend([b"example".as_slice(), b"com".as_slice()]);
    assert_eq!(
        rcode_of(env.web(), &raw_query(6, &labels, 1)),
        Some(FORMERR)
    );
    assert_eq!(
        rcode_of(env.web(), &raw_query(7, &[b"api", b"example", b"com"], 2)),
        Some(FORMERR)
    );
    let mut looped = raw_query(8, &[], 1);
    looped.truncate(12);
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    assert_eq!(rcode_of(env.web(), &looped), Some(FORMERR));
    assert!(log_shows(
        &env,
        &["malformed query", &env.web().ipv4().to_string()]
    ));
}

/// Sends one ICMP or ICMPv6 echo request from `pod` to `to`; true when the reply came.
fn ping(pod: &Pod, to: IpAddr) -> bool {
    let fd = pod
        .netns()
        .run(move || {
            let (family, proto) = if to.is_ipv4() {
                (AddressFamily::Inet, SockProtocol::Icmp)
            } else {
                (AddressFamily::Inet6, SockProtocol::IcmpV6)
            };
            socket(family, SockType::Raw, SockFlag::empty(), proto)
        })
        .unwrap()
        .unwrap();
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::milliseconds(1500)).unwrap();
    let (ty, reply_ty) = if to.is_ipv4() { (8u8, 0u8) } else { (128, 129) };
    let mut msg = vec![ty, 0, 0, 0, 0x12, 0x34, 0, 1];
    msg.extend_from_slice(b"dnsfence-bypass");
    if to.is_ipv4() {
        let mut sum: u32 = 0;
        for pair in msg.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let ck = !(sum as u16);
        msg[2..4].copy_from_slice(&ck.to_be_bytes());
    }
    let raw = fd.as_raw_fd();
    match to {
        IpAddr::V4(v4) => {
            sendto(
                raw,
                &msg,
                &SockaddrIn::from(std::net::SocketAddrV4::new(v4, 0)),
                MsgFlags::empty(),
            )
            .unwrap();
        }
        IpAddr::V6(v6) => {
            sendto(
                raw,
                &msg,
                &SockaddrIn6::from(std::net::SocketAddrV6::new(v6, 0, 0, 0)),
                MsgFlags::empty(),
            )
            .unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let Ok((n, from)) = recvfrom::<SockaddrStorage>(raw, &mut buf) else {
            return false;
        };
        let from_ip = from.and_then(|f| {
            f.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| f.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        });
        // IPv4 raw sockets see the IP header; IPv6 ones do not.
        let icmp = if to.is_ipv4() {
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            &buf[ihl.min(n)..n]
        } else {
            &buf[..n]
        };
        if from_ip == Some(to) && icmp.first() == Some(&reply_ty) {
            return true;
        }
    }
    false
}

#[test]
fn bypass_icmp_follows_the_same_rules() {
    let Some(env) = env(vec![]) else { return };
    // A CIDR allowed without ports allows every protocol, ICMP included: the control.
    assert!(ping(env.web(), ip("198.51.100.7")));
    // Never resolved, denied, or allowed only on TCP 443: no echo.
    assert!(!ping(env.web(), ip("203.0.113.66")));
    assert!(!ping(env.web(), ip("198.51.100.66")), "egressDeny");
    let api = a(env.web(), "api.example.com")[0];
    assert!(!ping(env.web(), api), "toPorts narrows to TCP 443");
    let (status, v6) = resolve(
        env.web(),
        "api.example.com",
        RecordType::AAAA,
        Transport::Udp,
    );
    assert_eq!(status, DnsStatus::NoError);
    assert!(!ping(env.web(), v6[0]));
    assert!(!ping(env.web(), ip("2001:db8::99")));
    // The pod without policy pings anything.
    assert!(ping(env.plain(), ip("203.0.113.66")));
    assert!(ping(env.plain(), ip("2001:db8::99")));
    assert!(log_shows(&env, &["policy-denied", "203.0.113.66"]));
}

#[test]
fn bypass_fragments_follow_the_same_rules() {
    let Some(env) = env(vec![]) else { return };
    // 4,000 bytes over a 1,500-byte MTU: the pod's kernel fragments, the node reassembles
    // before judging, v4 and v6.
    let big = vec![0x5a; 4000];
    let api = a(env.web(), "api.example.com")[0];
    let (_, api6) = resolve(
        env.web(),
        "api.example.com",
        RecordType::AAAA,
        Transport::Udp,
    );
    for allowed in [api, api6[0]] {
        let echo = env
            .web()
            .udp_exchange(SocketAddr::new(allowed, 9000), &big, Duration::from_secs(2))
            .unwrap();
        assert_eq!(echo.len(), big.len(), "{allowed}");
    }
    for denied in [ip("203.0.113.66"), ip("2001:db8::99")] {
        assert!(env
            .web()
            .udp_exchange(
                SocketAddr::new(denied, 9000),
                &big,
                Duration::from_millis(700)
            )
            .is_err());
    }
    // Port 9001 is not allowed even to the learned IP.
    assert!(env
        .web()
        .udp_exchange(SocketAddr::new(api, 9001), &big, Duration::from_millis(700))
        .is_err());
}

#[test]
fn bypass_connecting_before_the_answer_fails_and_right_after_succeeds() {
    let Some(env) = env(vec![]) else { return };
    // The pod knows the IP (hard-coded, cached elsewhere) but has not resolved it here.
    let known = ip("192.0.2.21");
    assert!(blocked(reach(env.web(), known, 443)));
    assert_eq!(a(env.web(), "a.cdn.example.com"), [known]);
    assert_eq!(reach(env.web(), known, 443), Outcome::Connected);
    assert!(log_shows(&env, &["policy-denied", "192.0.2.21"]));
}
