//! The DNS load generator against the world's DNS server, without dnsfence: a steady
//! load is fully answered, and an outage (packets dropped on the node) shows as timeouts,
//! or as retries when the load retries, and the load recovers. Skips unless root with `ip`.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dnsfence_lab::{Lab, LoadReport, LoadSpec, Rec};

const NAMES: [&str; 4] = ["a.load.test", "b.load.test", "c.load.test", "d.load.test"];

fn lab() -> Lab {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    Lab::builder()
        .pods(2)
        .records([
            Rec::Addr(NAMES[0], 60, ip("192.0.2.1")),
            Rec::Addr(NAMES[1], 60, ip("192.0.2.2")),
            Rec::Addr(NAMES[2], 60, ip("198.51.100.3")),
            Rec::Addr(NAMES[3], 60, ip("203.0.113.4")),
        ])
        .build()
        .unwrap()
}

fn assert_rate(report: &LoadReport, qps: u32, run: Duration) {
    let expected = f64::from(qps) * run.as_secs_f64();
    let sent = report.sent as f64;
    assert!(
        (sent - expected).abs() <= expected * 0.1,
        "sent {sent}, expected {expected}: {}",
        report.summary()
    );
}

#[test]
fn two_pods_at_1000_qps_are_all_answered() {
    if dnsfence_lab::preflight::skip_unless_root(&["ip"]) {
        return;
    }
    let lab = lab();
    let (qps, run) = (1000, Duration::from_secs(2));
    let loads: Vec<_> = lab
        .pods()
        .iter()
        .map(|pod| {
            let spec = LoadSpec::new(lab.dns_server_v4(), NAMES, qps);
            pod.start_dns_load(spec).unwrap()
        })
        .collect();
    std::thread::sleep(run / 2);
    let halfway = loads[0].snapshot();
    assert!(halfway.noerror > 0, "{}", halfway.summary());
    std::thread::sleep(run / 2);
    loads.iter().for_each(|load| load.stop_sending());
    for load in loads {
        let report = load.stop();
        eprintln!("{}", report.summary());
        assert_rate(&report, qps, run);
        assert_eq!(report.in_flight(), 0);
        assert_eq!(
            (report.answered, report.noerror, report.timed_out),
            (report.sent, report.sent, 0),
            "{}",
            report.summary()
        );
        assert_eq!(
            (report.failed(), report.retried, report.unmatched),
            (0, 0, 0)
        );
        assert!(report.failures.is_empty());
        assert!(report.latency_p50 <= report.latency_p99);
        assert!(report.latency_p99 <= report.max_latency);
        assert!(report.max_latency < Duration::from_secs(1));
    }
}

/// Drops DNS queries to the world on the node while `f` runs.
fn outage(lab: &Lab, f: impl FnOnce()) {
    let rules = "add table inet load_outage; \
        add chain inet load_outage forward { type filter hook forward priority 0; }; \
        add rule inet load_outage forward udp dport 53 drop";
    lab.node().exec("nft", [rules]).unwrap();
    f();
    lab.node()
        .exec("nft", ["delete table inet load_outage"])
        .unwrap();
}

#[test]
fn an_outage_is_counted_as_timeouts_or_retries_and_the_load_recovers() {
    if dnsfence_lab::preflight::skip_unless_root(&["ip", "nft"]) {
        return;
    }
    let lab = lab();
    let qps = 400;
    let timeout = Duration::from_millis(250);
    let plain = LoadSpec {
        timeout,
        ..LoadSpec::new(lab.dns_server_v4(), NAMES, qps)
    };
    // Tries 250 ms apart over 750 ms: one of them falls after a 500 ms outage.
    let retrying = LoadSpec {
        retries: 3,
        ..plain.clone()
    };
    let plain = lab.pod(0).start_dns_load(plain).unwrap();
    let retrying = lab.pod(1).start_dns_load(retrying).unwrap();

    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let before = plain.elapsed();
    outage(&lab, || std::thread::sleep(Duration::from_millis(500)));
    let (outage_time, after) = (start.elapsed(), plain.elapsed());
    // Once the tries sent during the outage timed out, nothing fails any more.
    std::thread::sleep(timeout + Duration::from_millis(50));
    let recovered = plain.snapshot();
    std::thread::sleep(Duration::from_millis(500));
    retrying.stop_sending();
    let (plain, retrying) = (plain.stop(), retrying.stop());
    eprintln!("outage of {outage_time:?}\nno retries: {}", plain.summary());
    eprintln!("3 retries:  {}", retrying.summary());

    let lost = f64::from(qps) * outage_time.as_secs_f64();
    let timed_out = plain.timed_out as f64;
    assert!(
        (lost * 0.8..=lost * 1.2).contains(&timed_out),
        "expected ~{lost} timeouts: {}",
        plain.summary()
    );
    assert_eq!(plain.failed(), plain.timed_out);
    assert_eq!(plain.answered + plain.timed_out, plain.sent);
    let slack = Duration::from_millis(20);
    for (when, name, what) in &plain.failures {
        assert!(
            *when + slack >= before && *when <= after + slack,
            "{name} sent at {when:?}, outage from {before:?} to {after:?}: {what}"
        );
        assert_eq!(what, "timed out (1 tries)");
    }
    assert_eq!(plain.failures.len(), 100);
    assert_eq!(
        plain.timed_out, recovered.timed_out,
        "no failure after recovery"
    );
    assert!(plain.noerror >= recovered.noerror + u64::from(qps) * 4 / 10);

    assert_eq!(
        (retrying.timed_out, retrying.noerror),
        (0, retrying.sent),
        "{}",
        retrying.summary()
    );
    assert!(
        retrying.retried as f64 >= lost * 0.8,
        "{}",
        retrying.summary()
    );
    assert!(retrying.max_latency >= Duration::from_millis(250));
    assert_rate(&retrying, qps, retrying.elapsed);
}

/// CPU ticks (1/100 s) of this process's threads named `prefix*`.
fn thread_ticks(prefix: &str) -> u64 {
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        ticks += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    ticks
}

/// How fast the generator goes against the lab's DNS server (not run by default):
/// `cargo test -p dnsfence-lab --test integration -- load:: --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a test"]
fn capacity() {
    if dnsfence_lab::preflight::skip_unless_root(&["ip"]) {
        return;
    }
    let lab = lab();
    for total in [2_000, 5_000, 10_000, 20_000, 40_000] {
        let run = Duration::from_secs(2);
        let loads: Vec<_> = lab
            .pods()
            .iter()
            .map(|pod| {
                let spec = LoadSpec::new(lab.dns_server_v4(), NAMES, total / 2);
                pod.start_dns_load(spec).unwrap()
            })
            .collect();
        std::thread::sleep(run);
        let cpu = thread_ticks("dns-load") as f64 / 100.0 / run.as_secs_f64();
        loads.iter().for_each(|load| load.stop_sending());
        for load in loads {
            let report = load.stop();
            eprintln!(
                "{total} qps, generator CPU {:.0}%: {}",
                cpu * 100.0,
                report.summary()
            );
        }
    }
    // Where datagrams were lost (RcvbufErrors): the generator's sockets or the server's.
    for ns in [lab.pod(0).netns(), lab.world()] {
        let snmp = ns.exec("cat", ["/proc/net/snmp"]).unwrap().stdout;
        let snmp = String::from_utf8_lossy(&snmp).into_owned();
        let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
        eprintln!("{}:\n{}\n{}", ns.name(), udp[0], udp[1]);
    }
}
