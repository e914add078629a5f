//! Transparent interception in network namespaces the test creates: a pod's DNS to any
//! server is TPROXY-redirected (by an nft rule the test installs, standing in for the
//! datapath) to `dnsfence proxy`'s transparent port. The policy sees the original server,
//! the query goes there, and the reply comes from its address.

use std::process::Stdio;
use std::time::{Duration, Instant};

use dnsfence_lab::{Netns, ScratchNetns};
use dnsfence_testsupport::policy::{dns_policy, DnsPeer};
use dnsfence_testsupport::{dig_in, dnsmasq_in, skip_unless_root, Killed, TempDir};

const TPROXY_PORT: u16 = 15053;

fn policy() -> String {
    let servers = ["192.0.2.53/32", "2001:db8::53/128"];
    dns_policy(
        "web",
        DnsPeer::Cidrs(&servers),
        53,
        &["*.example.com"],
        &["*.example.com"],
    )
}

/// A node routing for a pod behind veth `n0`/`p0`: the node is `10.{net}.0.1` and
/// `fd{net}::1`, the pod `.2` and `::2`, with its default routes through the node.
fn node_and_pod(node: &str, pod: &str, net: u8) -> (ScratchNetns, ScratchNetns) {
    let node = Netns::scratch(node).unwrap();
    // Routing first: turning forwarding on resets the interfaces' IPv6 state.
    node.exec("sysctl", ["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    node.exec("sysctl", ["-qw", "net.ipv6.conf.all.forwarding=1"])
        .unwrap();
    let pod = Netns::scratch(pod).unwrap();
    let v4 = |host: u8| format!("10.{net}.0.{host}");
    let v6 = |host: u8| format!("fd{net}::{host}");
    node.veth(
        "n0",
        &format!("{}/24", v4(1)),
        &pod,
        "p0",
        &format!("{}/24", v4(2)),
    )
    .unwrap();
    pod.ip(&["route", "add", "default", "via", &v4(1)]).unwrap();
    node.ip(&[
        "addr",
        "add",
        &format!("{}/64", v6(1)),
        "dev",
        "n0",
        "nodad",
    ])
    .unwrap();
    pod.ip(&[
        "addr",
        "add",
        &format!("{}/64", v6(2)),
        "dev",
        "p0",
        "nodad",
    ])
    .unwrap();
    pod.ip(&["-6", "route", "add", "default", "via", &v6(1)])
        .unwrap();
    (node, pod)
}

/// The datapath's redirect, by hand: DNS (UDP and TCP, both families) arriving in `node`
/// on `n0` goes to the transparent port.
fn redirect_pod_dns(node: &Netns, tmp: &TempDir) {
    let rules = format!(
        "table inet dnsfence_t {{
           chain pre {{
             type filter hook prerouting priority mangle; policy accept;
             iifname \"n0\" meta nfproto ipv4 meta l4proto {{ udp, tcp }} th dport 53 tproxy ip to :{TPROXY_PORT} meta mark set 0x1 accept
             iifname \"n0\" meta nfproto ipv6 meta l4proto {{ udp, tcp }} th dport 53 tproxy ip6 to :{TPROXY_PORT} meta mark set 0x1 accept
           }}
         }}"
    );
    std::fs::write(tmp.path().join("rules.nft"), rules).unwrap();
    node.exec(
        "nft",
        ["-f", &tmp.path().join("rules.nft").display().to_string()],
    )
    .unwrap();
    node.ip(&["rule", "add", "fwmark", "1", "lookup", "100"])
        .unwrap();
    node.ip(&[
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ])
    .unwrap();
    node.ip(&["-6", "rule", "add", "fwmark", "1", "lookup", "100"])
        .unwrap();
    node.ip(&[
        "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100",
    ])
    .unwrap();
}

/// Starts `dnsfence proxy` in `node`, transparent only, with `policy` and the endpoint
/// `web-1` (`app: web`) at `ips` (a YAML list), logging at `level` to `proxy.log` in
/// `tmp`; returns once its API socket is up.
fn start_proxy(node: &Netns, tmp: &TempDir, policy: &str, ips: &str, level: &str) -> Killed {
    std::fs::write(tmp.path().join("policy.yaml"), policy).unwrap();
    let config = format!(
        "policies: [policy.yaml]\nendpoints:\n  - {{name: web-1, labels: {{app: web}}, ips: {ips}}}\ndns:\n  transparent: {{port: {TPROXY_PORT}}}\napi: {{socket: {}}}\n",
        tmp.path().join("api.sock").display()
    );
    std::fs::write(tmp.path().join("config.yaml"), config).unwrap();
    let proxy = node
        .command(env!("CARGO_BIN_EXE_dnsfence"))
        .args(["proxy", "--config"])
        .arg(tmp.path().join("config.yaml"))
        .env("RUST_LOG", level)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("proxy.log")).unwrap())
        .spawn()
        .unwrap();
    let proxy = Killed(proxy);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tmp.path().join("api.sock").exists() {
        assert!(Instant::now() < deadline, "proxy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy
}

#[test]
fn pods_dns_is_intercepted_judged_and_answered_from_the_original_server() {
    if skip_unless_root(&["ip", "nft", "dig", "dnsmasq"]) {
        return;
    }
    let (node, pod) = node_and_pod("node", "pod", 77);
    // Two DNS servers in the world, routed through the node: the allowed one and one no
    // rule covers.
    let world = Netns::scratch("world").unwrap();
    node.veth("n1", "10.78.0.1/24", &world, "w0", "10.78.0.2/24")
        .unwrap();
    world
        .ip(&["addr", "add", "192.0.2.53/32", "dev", "lo"])
        .unwrap();
    world
        .ip(&["addr", "add", "192.0.2.54/32", "dev", "lo"])
        .unwrap();
    world
        .ip(&["route", "add", "default", "via", "10.78.0.1"])
        .unwrap();
    node.ip(&["route", "add", "192.0.2.0/24", "via", "10.78.0.2"])
        .unwrap();
    node.ip(&["addr", "add", "fd78::1/64", "dev", "n1", "nodad"])
        .unwrap();
    world
        .ip(&["addr", "add", "fd78::2/64", "dev", "w0", "nodad"])
        .unwrap();
    world
        .ip(&["addr", "add", "2001:db8::53/128", "dev", "lo", "nodad"])
        .unwrap();
    world
        .ip(&["-6", "route", "add", "default", "via", "fd78::1"])
        .unwrap();
    node.ip(&["-6", "route", "add", "2001:db8::/32", "via", "fd78::2"])
        .unwrap();
    let records = [
        "--host-record=api.example.com,192.0.2.10".to_owned(),
        "--host-record=evil.org,203.0.113.66".to_owned(),
    ];
    let _dns = dnsmasq_in(&world, "192.0.2.53", 53, "example.com", 60, &records);
    let _dns2 = dnsmasq_in(&world, "192.0.2.54", 53, "example.com", 60, &records);
    let _dns6 = dnsmasq_in(&world, "2001:db8::53", 53, "example.com", 60, &records);
    let tmp = TempDir::new("transparent");
    redirect_pod_dns(&node, &tmp);
    let _proxy = start_proxy(&node, &tmp, &policy(), "[10.77.0.2, \"fd77::2\"]", "debug");
    let log = || std::fs::read_to_string(tmp.path().join("proxy.log")).unwrap_or_default();

    // Allowed name, UDP and TCP: answered, and from 192.0.2.53 (dig rejects other sources).
    let ok = dig_in(&pod, &["@192.0.2.53", "api.example.com"]);
    assert_eq!(
        (ok.status.as_str(), ok.answers.clone()),
        ("NOERROR", vec!["192.0.2.10".to_owned()]),
        "{}",
        ok.raw
    );
    assert!(ok.raw.contains("SERVER: 192.0.2.53#53"), "{}", ok.raw);
    let tcp = dig_in(&pod, &["+tcp", "@192.0.2.53", "api.example.com"]);
    assert_eq!(tcp.answers, ["192.0.2.10"], "{}", tcp.raw);
    // Denied name: REFUSED by the proxy, UDP and TCP.
    assert_eq!(dig_in(&pod, &["@192.0.2.53", "evil.org"]).status, "REFUSED");
    assert_eq!(
        dig_in(&pod, &["+tcp", "@192.0.2.53", "evil.org"]).status,
        "REFUSED"
    );
    // A server no DNS rule covers: the policy judges the original destination.
    let other = dig_in(&pod, &["@192.0.2.54", "api.example.com"]);
    assert_eq!(other.status, "REFUSED", "{}", other.raw);
    // IPv6: the same over a v6 server, UDP and TCP.
    let v6 = dig_in(&pod, &["@2001:db8::53", "api.example.com"]);
    let diag = |ns: &Netns, args: &[&str]| {
        let out = ns.command(args[0]).args(&args[1..]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert_eq!(
        v6.answers,
        ["192.0.2.10"],
        "{}\nproxy log:\n{}\nnode nft:\n{}\npod routes:\n{}{}\nnode:\n{}{}",
        v6.raw,
        log(),
        diag(&node, &["nft", "list", "ruleset"]),
        diag(&pod, &["ip", "-6", "addr"]),
        diag(&pod, &["ip", "-6", "route"]),
        diag(&node, &["ip", "-6", "route", "show", "table", "all"]),
        diag(&node, &["ip", "-6", "rule"]),
    );
    assert!(v6.raw.contains("SERVER: 2001:db8::53#53"), "{}", v6.raw);
    assert_eq!(
        dig_in(&pod, &["+tcp", "@2001:db8::53", "api.example.com"]).answers,
        ["192.0.2.10"]
    );
    assert_eq!(
        dig_in(&pod, &["@2001:db8::53", "evil.org"]).status,
        "REFUSED"
    );
}

/// A DNS server on the node itself (NodeLocal DNSCache style): pods ask 169.254.20.10,
/// which a server in the node's own namespace holds. The proxy must answer the pods from
/// that address without binding it, and the server must keep all its own traffic.
#[test]
fn a_dns_server_on_the_node_keeps_its_traffic_and_pods_are_answered_from_its_address() {
    if skip_unless_root(&["ip", "nft", "dig", "dnsmasq"]) {
        return;
    }
    let (node, pod) = node_and_pod("nodelocal", "nlpod", 79);
    node.ip(&["addr", "add", "169.254.20.10/32", "dev", "lo"])
        .unwrap();
    node.ip(&["addr", "add", "fd79:53::10/128", "dev", "lo", "nodad"])
        .unwrap();
    // A name with 100 addresses, and answers up to 4096 bytes over UDP: too large for the
    // pod's link below.
    let mut records = vec![
        "--host-record=api.example.com,192.0.2.10".to_owned(),
        "--edns-packet-max=4096".to_owned(),
    ];
    records.extend((1..=100).map(|i| format!("--host-record=big.example.com,198.18.0.{i}")));
    let _cache = dnsmasq_in(&node, "169.254.20.10", 53, "example.com", 60, &records);
    let _cache6 = dnsmasq_in(&node, "fd79:53::10", 53, "example.com", 60, &records);
    let tmp = TempDir::new("nodelocal");
    redirect_pod_dns(&node, &tmp);
    let servers = ["169.254.20.10/32", "fd79:53::10/128"];
    let policy = dns_policy(
        "web",
        DnsPeer::Cidrs(&servers),
        53,
        &["*.example.com"],
        &["*.example.com"],
    );
    let _proxy = start_proxy(&node, &tmp, &policy, "[10.79.0.2, \"fd79::2\"]", "info");
    let log = || std::fs::read_to_string(tmp.path().join("proxy.log")).unwrap_or_default();

    for round in 0..5 {
        for (cache, shown) in [
            ("@169.254.20.10", "SERVER: 169.254.20.10#53"),
            ("@fd79:53::10", "SERVER: fd79:53::10#53"),
        ] {
            // The pod, redirected: judged, forwarded to the cache, answered from its
            // address (dig rejects a reply from any other).
            let ok = dig_in(&pod, &[cache, "api.example.com"]);
            assert_eq!(
                (ok.status.as_str(), ok.answers.clone()),
                ("NOERROR", vec!["192.0.2.10".to_owned()]),
                "round {round}, {cache}\n{}\nproxy log:\n{}",
                ok.raw,
                log()
            );
            assert!(ok.raw.contains(shown), "{}", ok.raw);
            assert_eq!(dig_in(&pod, &[cache, "evil.org"]).status, "REFUSED");
            // The node's own queries to the cache (not redirected) still reach it.
            let direct = dig_in(&node, &[cache, "api.example.com"]);
            assert_eq!(
                direct.answers,
                ["192.0.2.10"],
                "round {round}, {cache}: the cache lost its own traffic\n{}\nproxy log:\n{}",
                direct.raw,
                log()
            );
        }
    }
    // An answer larger than the link's MTU: the kernel fragments no built reply, so it
    // goes out truncated, and dig asks again over TCP.
    node.ip(&["link", "set", "n0", "mtu", "1280"]).unwrap();
    let big = dig_in(
        &pod,
        &["+bufsize=4096", "@169.254.20.10", "big.example.com"],
    );
    assert_eq!(big.answers.len(), 100, "{}\nproxy log:\n{}", big.raw, log());
    assert!(
        big.raw.contains("Truncated, retrying in TCP mode"),
        "{}",
        big.raw
    );
    // Both caches' addresses were answered from without being bound.
    assert_eq!(
        log()
            .matches("its replies are sent through a raw socket")
            .count(),
        2,
        "{}",
        log()
    );
}
