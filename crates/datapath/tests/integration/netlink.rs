//! `NftSocket` against the real kernel, in network namespaces of its own.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dnsfence_datapath::sys::netlink::{ElemKind, ElemOp, NetlinkError, NftSocket, Strategy};
use dnsfence_lab::{Netns, ScratchNetns};
use dnsfence_testsupport::skip_unless_root;
use nix::errno::Errno;

const TABLE: &str = "dnsfence";

/// A namespace holding table `dnsfence` with sets `s4` and `s6`, and a socket in it.
struct Fixture {
    ns: ScratchNetns,
    sock: NftSocket,
}

fn fixture(tag: &str, strategy: Strategy) -> Option<Fixture> {
    if skip_unless_root(&["nft", "ip"]) {
        return None;
    }
    let ns = Netns::scratch(tag).unwrap();
    ns.exec("nft", ["add", "table", "inet", TABLE]).unwrap();
    for (set, ty) in [("s4", "ipv4_addr"), ("s6", "ipv6_addr")] {
        let spec = format!("{{ type {ty}; flags timeout; }}");
        ns.exec("nft", ["add", "set", "inet", TABLE, set, &spec])
            .unwrap();
    }
    let sock = ns.run(|| NftSocket::open_with(strategy).unwrap()).unwrap();
    Some(Fixture { ns, sock })
}

/// Both strategies where the kernel supports them (Native needs Linux 6.12).
fn strategies() -> Vec<Strategy> {
    match Strategy::detect() {
        Strategy::Native => vec![Strategy::Native, Strategy::Emulated],
        Strategy::Emulated => vec![Strategy::Emulated],
    }
}

/// The elements of a set per `nft -j list set`: (address, seconds until expiry).
fn nft_elements(ns: &Netns, set: &str) -> Vec<(IpAddr, u64)> {
    let out = ns
        .command("nft")
        .args(["-j", "list", "set", "inet", TABLE, set])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8(out.stdout).unwrap();
    // Each element reads {"elem": {"val": "ADDR", "timeout": T, "expires": E}}.
    json.split("\"val\": \"")
        .skip(1)
        .map(|elem| {
            let (addr, rest) = elem.split_once('"').unwrap();
            let expires = rest.split_once("\"expires\": ").map_or(0, |(_, n)| {
                n.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            });
            (addr.parse().unwrap(), expires)
        })
        .collect()
}

fn ips(elements: &[(IpAddr, u64)]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = elements.iter().map(|e| e.0).collect();
    v.sort();
    v
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn add<'a>(set: &'a str, addr: &str, secs: u64) -> ElemOp<'a> {
    ElemOp::Add {
        set,
        ip: ip(addr),
        timeout: Duration::from_secs(secs),
    }
}

fn delete<'a>(set: &'a str, addr: &str) -> ElemOp<'a> {
    ElemOp::Delete { set, ip: ip(addr) }
}

#[test]
fn adds_v4_and_v6_with_their_timeouts() {
    for strategy in strategies() {
        let Some(mut f) = fixture("nl-add", strategy) else {
            return;
        };
        let ops = [
            add("s4", "192.0.2.1", 60),
            add("s6", "2001:db8::1", 120),
            add("s4", "192.0.2.2", 60),
        ];
        f.sock.apply(TABLE, &ops).unwrap();
        let s4 = nft_elements(&f.ns, "s4");
        assert_eq!(ips(&s4), [ip("192.0.2.1"), ip("192.0.2.2")], "{strategy:?}");
        assert!(s4.iter().all(|e| (55..=60).contains(&e.1)), "{s4:?}");
        let s6 = nft_elements(&f.ns, "s6");
        assert_eq!(ips(&s6), [ip("2001:db8::1")]);
        assert!((115..=120).contains(&s6[0].1), "{s6:?}");

        let listed = f.sock.list(TABLE, "s6").unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].ip, ip("2001:db8::1"));
        assert_eq!(listed[0].timeout, Some(Duration::from_secs(120)));
        assert!(listed[0].expires.unwrap() > Duration::from_secs(100));
    }
}

#[test]
fn adds_thousands_in_one_apply() {
    for strategy in strategies() {
        let Some(mut f) = fixture("nl-many", strategy) else {
            return;
        };
        let v4: Vec<IpAddr> = (0..2000u32)
            .map(|i| IpAddr::from((0x0a00_0000 + i).to_be_bytes()))
            .collect();
        let v6: Vec<IpAddr> = (0..2000u128)
            .map(|i| IpAddr::from((0x2001_0db8_u128 << 96 | i).to_be_bytes()))
            .collect();
        let ops: Vec<ElemOp<'_>> = v4
            .iter()
            .map(|&ip| ElemOp::Add {
                set: "s4",
                ip,
                timeout: Duration::from_secs(300),
            })
            .chain(v6.iter().map(|&ip| ElemOp::Add {
                set: "s6",
                ip,
                timeout: Duration::from_secs(300),
            }))
            .collect();
        f.sock.apply(TABLE, &ops).unwrap();
        let mut want = v4.clone();
        want.sort();
        assert_eq!(ips(&nft_elements(&f.ns, "s4")), want, "{strategy:?}");
        assert_eq!(f.sock.list(TABLE, "s6").unwrap().len(), 2000);
        // Deleting them all works as well.
        let dels: Vec<ElemOp<'_>> = v4
            .iter()
            .map(|&ip| ElemOp::Delete { set: "s4", ip })
            .collect();
        f.sock.apply(TABLE, &dels).unwrap();
        assert!(f.sock.list(TABLE, "s4").unwrap().is_empty());
    }
}

#[test]
fn re_adding_refreshes_the_timeout() {
    for strategy in strategies() {
        let Some(mut f) = fixture("nl-refresh", strategy) else {
            return;
        };
        f.sock.apply(TABLE, &[add("s4", "192.0.2.1", 2)]).unwrap();
        f.sock.apply(TABLE, &[add("s4", "192.0.2.1", 60)]).unwrap();
        let s4 = nft_elements(&f.ns, "s4");
        assert_eq!(ips(&s4), [ip("192.0.2.1")], "{strategy:?}");
        assert!(s4[0].1 > 30, "{strategy:?}: not refreshed: {s4:?}");
        // Shortening works too: the latest answer's TTL wins.
        f.sock.apply(TABLE, &[add("s4", "192.0.2.1", 10)]).unwrap();
        let s4 = nft_elements(&f.ns, "s4");
        assert!(s4[0].1 <= 10, "{strategy:?}: {s4:?}");
    }
}

#[test]
fn deletes_present_and_absent_elements() {
    for strategy in strategies() {
        let Some(mut f) = fixture("nl-del", strategy) else {
            return;
        };
        let ops = [
            add("s4", "192.0.2.1", 60),
            add("s4", "192.0.2.2", 60),
            add("s6", "2001:db8::1", 60),
        ];
        f.sock.apply(TABLE, &ops).unwrap();
        let ops = [
            delete("s4", "192.0.2.1"),
            delete("s4", "192.0.2.99"),   // absent
            delete("s6", "2001:db8::99"), // absent
            add("s4", "192.0.2.3", 60),
            delete("s6", "2001:db8::1"),
        ];
        f.sock.apply(TABLE, &ops).unwrap();
        assert_eq!(
            ips(&nft_elements(&f.ns, "s4")),
            [ip("192.0.2.2"), ip("192.0.2.3")],
            "{strategy:?}"
        );
        assert!(nft_elements(&f.ns, "s6").is_empty());
    }
}

#[test]
fn a_missing_set_fails_the_whole_batch() {
    for strategy in strategies() {
        let Some(mut f) = fixture("nl-missing", strategy) else {
            return;
        };
        let ops = [
            add("s4", "192.0.2.1", 60),
            add("nosuch", "192.0.2.2", 60),
            add("s6", "2001:db8::1", 60),
        ];
        let err = f.sock.apply(TABLE, &ops).unwrap_err();
        match &err {
            NetlinkError::Rejected {
                table,
                set,
                kind,
                first,
                last,
                errno,
            } => {
                assert_eq!((table.as_str(), set.as_str()), (TABLE, "nosuch"));
                assert_eq!((*kind, *first, *last), (ElemKind::Add, 1, 1));
                assert_eq!(*errno, Errno::ENOENT);
            }
            other => panic!("{strategy:?}: {other:?}"),
        }
        assert!(
            err.to_string().contains("set nosuch of table dnsfence"),
            "{err}"
        );
        assert!(
            nft_elements(&f.ns, "s4").is_empty(),
            "{strategy:?}: half applied"
        );
        assert!(
            nft_elements(&f.ns, "s6").is_empty(),
            "{strategy:?}: half applied"
        );

        // A missing table, an address of the wrong family: errors, not hangs.
        let err = f
            .sock
            .apply("nosuch", &[add("s4", "192.0.2.1", 60)])
            .unwrap_err();
        assert!(
            matches!(
                err,
                NetlinkError::Rejected {
                    errno: Errno::ENOENT,
                    ..
                }
            ),
            "{err:?}"
        );
        let err = f
            .sock
            .apply(TABLE, &[add("s4", "2001:db8::1", 60)])
            .unwrap_err();
        assert!(matches!(err, NetlinkError::Rejected { .. }), "{err:?}");
        // Deleting from a missing set or table is an error too, not "absent, fine".
        for (table, set) in [(TABLE, "nosuch"), ("nosuch", "s4")] {
            let err = f
                .sock
                .apply(table, &[delete(set, "192.0.2.1")])
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    NetlinkError::Rejected {
                        errno: Errno::ENOENT,
                        ..
                    }
                ),
                "{err:?}"
            );
        }
        let err = f.sock.list(TABLE, "nosuch").unwrap_err();
        assert!(
            matches!(
                err,
                NetlinkError::List {
                    errno: Errno::ENOENT,
                    ..
                }
            ),
            "{err:?}"
        );

        // The socket stays usable.
        f.sock.apply(TABLE, &[add("s4", "192.0.2.1", 60)]).unwrap();
        assert_eq!(ips(&nft_elements(&f.ns, "s4")), [ip("192.0.2.1")]);
    }
}

#[test]
fn elements_expire_by_themselves() {
    let Some(mut f) = fixture("nl-expire", Strategy::detect()) else {
        return;
    };
    let ops = [
        ElemOp::Add {
            set: "s4",
            ip: ip("192.0.2.1"),
            timeout: Duration::from_secs(1),
        },
        add("s4", "192.0.2.2", 60),
    ];
    f.sock.apply(TABLE, &ops).unwrap();
    assert_eq!(f.sock.list(TABLE, "s4").unwrap().len(), 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = ips(&nft_elements(&f.ns, "s4"));
        if left == [ip("192.0.2.2")] {
            break;
        }
        assert!(Instant::now() < deadline, "still there: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Latency of `apply` by batch size: `cargo test -p dnsfence-datapath --test integration
/// -- netlink:: --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a test"]
fn measure_apply_latency() {
    for strategy in strategies() {
        let Some(mut f) = fixture("nl-bench", strategy) else {
            return;
        };
        for n in [1u32, 10, 100, 1000, 10_000] {
            let addrs: Vec<IpAddr> = (0..n)
                .map(|i| IpAddr::from((0x0a00_0000 + i).to_be_bytes()))
                .collect();
            let ops: Vec<ElemOp<'_>> = addrs
                .iter()
                .map(|&ip| ElemOp::Add {
                    set: "s4",
                    ip,
                    timeout: Duration::from_secs(600),
                })
                .collect();
            let rounds = (20_000 / n).clamp(5, 2000);
            let mut times = Vec::new();
            for _ in 0..rounds {
                let t = Instant::now();
                f.sock.apply(TABLE, &ops).unwrap();
                times.push(t.elapsed());
            }
            times.sort();
            println!(
                "{strategy:?} n={n:>5} (present, refresh): median {:>9.1?} p99 {:>9.1?}",
                times[times.len() / 2],
                times[times.len() * 99 / 100]
            );
            let dels: Vec<ElemOp<'_>> = addrs
                .iter()
                .map(|&ip| ElemOp::Delete { set: "s4", ip })
                .collect();
            let mut times = Vec::new();
            for _ in 0..rounds {
                f.sock.apply(TABLE, &dels).unwrap();
                let t = Instant::now();
                f.sock.apply(TABLE, &ops).unwrap();
                times.push(t.elapsed());
            }
            times.sort();
            println!(
                "{strategy:?} n={n:>5} (absent, insert):  median {:>9.1?} p99 {:>9.1?}",
                times[times.len() / 2],
                times[times.len() * 99 / 100]
            );
        }
    }
}
