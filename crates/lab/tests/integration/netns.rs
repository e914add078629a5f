//! Scratch namespaces against the real kernel: unique names, loopback up, no duplicate
//! address detection, veth pairs between two, deletion on drop and on panic.

use std::io::Read as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use dnsfence_lab::Netns;

fn skip() -> bool {
    dnsfence_lab::preflight::skip_unless_root(&["ip"])
}

fn listed(name: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

#[test]
fn scratch_namespaces_are_set_up_linked_and_deleted_on_drop() {
    if skip() {
        return;
    }
    let a = Netns::scratch("scratch").unwrap();
    let b = Netns::scratch("scratch").unwrap();
    assert_ne!(a.name(), b.name());
    assert!(a
        .name()
        .starts_with(&format!("df-scratch-{}-", std::process::id())));
    assert!(listed(a.name()) && listed(b.name()));
    let lo = a.ip(&["link", "show", "lo"]).unwrap();
    assert!(String::from_utf8_lossy(&lo.stdout).contains("UP"));
    let dad = a
        .run(|| std::fs::read_to_string("/proc/sys/net/ipv6/conf/default/accept_dad"))
        .unwrap()
        .unwrap();
    assert_eq!(dad.trim(), "0");

    a.veth("sa0", "10.250.0.1/24", &b, "sb0", "10.250.0.2/24")
        .unwrap();
    let server: SocketAddr = "10.250.0.2:7000".parse().unwrap();
    let listener = b.run(|| TcpListener::bind(server)).unwrap().unwrap();
    let sent = a
        .run(|| {
            use std::io::Write as _;
            let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(2))?;
            s.write_all(b"over the veth")
        })
        .unwrap();
    assert!(sent.is_ok(), "{sent:?}");
    let (mut conn, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip().to_string(), "10.250.0.1");
    let mut got = String::new();
    conn.read_to_string(&mut got).unwrap();
    assert_eq!(got, "over the veth");

    let names = [a.name().to_owned(), b.name().to_owned()];
    drop(a);
    drop(b);
    for n in &names {
        assert!(!listed(n), "{n} left behind");
    }
}

#[test]
fn a_panicking_test_still_removes_its_scratch_namespace() {
    if skip() {
        return;
    }
    let name = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let ns = Netns::scratch("panics").unwrap();
        *name.lock().unwrap() = ns.name().to_owned();
        panic!("a failing test");
    });
    assert!(result.is_err());
    let name = name.into_inner().unwrap();
    assert!(!name.is_empty());
    assert!(!listed(&name), "{name} left behind");
}
