//! The lab against the real kernel: DNS, TCP and UDP from pods to the world, parallel labs,
//! cleanup on drop and on panic. Skips unless root with `ip`.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use dnsfence_lab::{greeting, ConnectError, DnsStatus, Lab, Outcome, Rec, RecordType, Transport};

fn skip() -> bool {
    dnsfence_lab::preflight::skip_unless_root(&["ip"])
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn records() -> Vec<Rec> {
    vec![
        Rec::Addr("web.example.com", 60, ip("192.0.2.10")),
        Rec::Addr("web.example.com", 60, ip("192.0.2.11")),
        Rec::Addr("web.example.com", 30, ip("2001:db8::10")),
        Rec::Cname("www.example.org", 300, "web.example.com"),
        Rec::Addr("api.test", 5, ip("198.51.100.7")),
    ]
}

fn lab() -> Lab {
    let start = Instant::now();
    let lab = Lab::builder().pods(2).records(records()).build().unwrap();
    eprintln!("lab built in {:?}", start.elapsed());
    lab
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pods_resolve_from_the_world_over_udp_and_tcp_v4_and_v6() {
    if skip() {
        return;
    }
    let lab = lab();
    let pod = lab.pod(1);
    for server in [lab.dns_server_v4(), lab.dns_server_v6()] {
        for transport in [Transport::Udp, Transport::Tcp] {
            let what = format!("{server} {transport:?}");
            let a = pod
                .netns()
                .resolve(server, "www.example.org", RecordType::A, transport)
                .unwrap();
            assert_eq!(a.status, DnsStatus::NoError, "{what}");
            assert_eq!(a.cnames, ["web.example.com"], "{what}");
            assert_eq!(a.ips, [ip("192.0.2.10"), ip("192.0.2.11")], "{what}");
            assert_eq!(a.min_ttl, Some(60), "{what}");

            let aaaa = pod
                .netns()
                .resolve(server, "web.example.com", RecordType::AAAA, transport)
                .unwrap();
            assert_eq!(
                (aaaa.status, aaaa.ips, aaaa.min_ttl),
                (DnsStatus::NoError, vec![ip("2001:db8::10")], Some(30)),
                "{what}"
            );

            let nx = pod
                .netns()
                .resolve(server, "nope.example.com", RecordType::A, transport)
                .unwrap();
            assert_eq!(nx.status, DnsStatus::NxDomain, "{what}");
            assert!(nx.ips.is_empty());
        }
    }
    // The pod's own resolver is the world's IPv4 server by default.
    let r = lab
        .pod(0)
        .resolve("api.test", RecordType::A, Transport::Udp)
        .unwrap();
    assert_eq!(
        (r.status, r.ips),
        (DnsStatus::NoError, vec![ip("198.51.100.7")])
    );
    assert_eq!(r.min_ttl, Some(5));
}

#[test]
fn records_can_change_while_the_lab_runs() {
    if skip() {
        return;
    }
    let lab = lab();
    lab.dns()
        .set_records(&[Rec::Addr("api.test", 7, ip("203.0.113.9"))])
        .unwrap();
    let r = lab
        .pod(0)
        .resolve("api.test", RecordType::A, Transport::Tcp)
        .unwrap();
    assert_eq!((r.ips, r.min_ttl), (vec![ip("203.0.113.9")], Some(7)));
    let gone = lab
        .pod(0)
        .resolve("web.example.com", RecordType::A, Transport::Udp)
        .unwrap();
    assert_eq!(gone.status, DnsStatus::NxDomain);
}

#[test]
fn pods_reach_tcp_servers_on_any_world_address() {
    if skip() {
        return;
    }
    let lab = lab();
    for (pod, addr) in [
        (0, "192.0.2.10:80"),
        (1, "[2001:db8::10]:443"),
        (0, "198.51.100.7:8080"),
        (1, "203.0.113.200:80"),
    ] {
        let mut conn = lab
            .pod(pod)
            .connect_tcp(sa(addr), Duration::from_secs(2))
            .unwrap();
        assert_eq!(conn.greeting(), format!("hello from {addr}"));
        assert_eq!(greeting(sa(addr)).trim_end(), conn.greeting());
        assert_eq!(conn.exchange(b"ping\n").unwrap(), b"ping\n");
        // The connection stays open until the client closes it.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(conn.exchange(b"again").unwrap(), b"again");
    }
    let reach = lab.pod(0).reach_tcp(sa("192.0.2.10:443"));
    assert_eq!(reach.outcome, Outcome::Connected, "{reach}");
    // Nothing listens on 81: the world's kernel resets.
    let refused = lab
        .pod(0)
        .connect_tcp(sa("192.0.2.10:81"), Duration::from_secs(2));
    assert!(matches!(refused, Err(ConnectError::Refused)), "{refused:?}");
    assert_eq!(
        lab.pod(1).reach_tcp(sa("[2001:db8::1]:81")).outcome,
        Outcome::Refused
    );
    // Outside the routed ranges: the node has no route and answers with ICMP.
    let unrouted = lab.pod(0).reach_tcp(sa("100.64.0.1:80"));
    assert_eq!(unrouted.outcome, Outcome::Unreachable, "{unrouted}");
}

#[test]
fn udp_echo_replies_from_the_address_it_was_sent_to() {
    if skip() {
        return;
    }
    let lab = lab();
    for addr in [
        "192.0.2.10:9000",
        "198.51.100.99:9001",
        "[2001:db8::10]:9000",
        "[2001:db8:ffff::1]:9001",
    ] {
        // The client socket is connected: a reply from another address would be dropped.
        let back = lab
            .pod(0)
            .udp_exchange(sa(addr), addr.as_bytes(), Duration::from_secs(2))
            .unwrap();
        assert_eq!(back, addr.as_bytes());
    }
    let refused = lab
        .pod(1)
        .udp_exchange(sa("192.0.2.10:9999"), b"x", Duration::from_secs(2));
    assert!(matches!(refused, Err(ConnectError::Refused)), "{refused:?}");
}

#[test]
fn labs_run_side_by_side_and_are_removed_on_drop() {
    if skip() {
        return;
    }
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(lab);
        let b = s.spawn(lab);
        (a.join().unwrap(), b.join().unwrap())
    });
    let names: Vec<String> = a
        .netns_names()
        .into_iter()
        .chain(b.netns_names())
        .map(str::to_owned)
        .collect();
    assert_eq!(names.len(), 8);
    let listed = netns_list();
    for n in &names {
        assert!(listed.contains(n.as_str()), "{n} missing from {listed}");
    }
    for lab in [&a, &b] {
        let r = lab
            .pod(0)
            .connect_tcp(sa("192.0.2.10:80"), Duration::from_secs(2))
            .unwrap();
        assert_eq!(r.greeting(), "hello from 192.0.2.10:80");
    }
    drop(a);
    drop(b);
    let listed = netns_list();
    for n in &names {
        assert!(!listed.contains(n.as_str()), "{n} left behind: {listed}");
    }
}

#[test]
fn a_panicking_test_still_removes_its_lab() {
    if skip() {
        return;
    }
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let lab = lab();
        names
            .lock()
            .unwrap()
            .extend(lab.netns_names().into_iter().map(str::to_owned));
        panic!("a failing test");
    });
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 4);
    let listed = netns_list();
    for n in &names {
        assert!(!listed.contains(n.as_str()), "{n} left behind: {listed}");
    }
}

#[test]
fn the_node_runs_commands_and_forwards() {
    if skip() {
        return;
    }
    let lab = lab();
    let forward = lab
        .node()
        .exec("cat", ["/proc/sys/net/ipv4/ip_forward"])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&forward.stdout).trim(), "1");
    // The host's own setting is untouched (whatever it is, it is not read from the lab).
    let routes = lab.node().ip(&["route", "show", "192.0.2.0/24"]).unwrap();
    assert!(String::from_utf8_lossy(&routes.stdout).contains("via 10.201.0.2"));
    let err = lab.node().exec("false", [""; 0]).unwrap_err();
    assert!(err.to_string().contains("false"), "{err}");
    let inside = lab
        .world()
        .run(|| std::fs::read_to_string("/proc/sys/net/ipv6/ip_nonlocal_bind"))
        .unwrap()
        .unwrap();
    assert_eq!(inside.trim(), "1");
}

/// What the pods see of a firewall on the node: the classification firewall tests rely on.
#[test]
fn firewall_verdicts_on_the_node_are_told_apart() {
    if skip() || dnsfence_lab::preflight::skip(&["nft"]) {
        return;
    }
    let lab = lab();
    let pod = lab.pod(0);
    let mut held = pod
        .connect_tcp(sa("192.0.2.30:80"), Duration::from_secs(2))
        .unwrap();
    let rules = "add table inet lab; \
        add chain inet lab filt { type filter hook forward priority 0; }; \
        add rule inet lab filt ip daddr 192.0.2.20 reject with icmpx admin-prohibited; \
        add rule inet lab filt ip6 daddr 2001:db8::20 reject with icmpx admin-prohibited; \
        add rule inet lab filt ip daddr 192.0.2.21 tcp dport 80 reject with tcp reset; \
        add rule inet lab filt ip daddr 192.0.2.22 reject with icmpx port-unreachable; \
        add rule inet lab filt ip daddr { 192.0.2.23, 192.0.2.30 } drop";
    lab.node().exec("nft", [rules]).unwrap();
    let short = Duration::from_millis(300);
    for (addr, expect) in [
        ("192.0.2.20:80", Outcome::Unreachable),
        // About 1 s: over veth the first ICMPv6 error arrives while connect() still holds
        // the socket and is dropped (TcpExtLockDroppedIcmps); the SYN retransmission's is not.
        ("[2001:db8::20]:80", Outcome::Unreachable),
        ("192.0.2.21:80", Outcome::Refused),
        ("192.0.2.22:80", Outcome::Refused),
        ("192.0.2.24:80", Outcome::Connected),
    ] {
        let reach = pod.reach_tcp(sa(addr));
        assert_eq!(reach.outcome, expect, "{addr}: {reach}");
    }
    let dropped = pod.connect_tcp(sa("192.0.2.23:80"), short);
    assert!(
        matches!(dropped, Err(ConnectError::TimedOut(_))),
        "{dropped:?}"
    );
    let udp = pod.udp_exchange(sa("192.0.2.20:9000"), b"x", short);
    assert!(matches!(udp, Err(ConnectError::Unreachable(_))), "{udp:?}");
    let udp = pod.udp_exchange(sa("192.0.2.22:9000"), b"x", short);
    assert!(matches!(udp, Err(ConnectError::Refused)), "{udp:?}");
    let dns = pod
        .netns()
        .resolve_with(
            sa("192.0.2.23:53"),
            "web.example.com",
            RecordType::A,
            Transport::Udp,
            short,
        )
        .unwrap();
    assert_eq!(dns.status, DnsStatus::TimedOut);
    // The connection opened before the rules now goes nowhere.
    held.set_timeout(short).unwrap();
    let stalled = held.exchange(b"still there?");
    assert!(
        matches!(stalled, Err(ConnectError::TimedOut(_))),
        "{stalled:?}"
    );
}
