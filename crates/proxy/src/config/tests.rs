#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

use super::*;

/// A document with only the `dns` section, as the agent's whole file reads it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    #[serde(default)]
    dns: DnsConfig,
}

/// Problems of a document, one line each (without the file's name).
#[derive(Debug)]
struct Refused {
    problems: Vec<String>,
}

/// Reads `text` (a document with a `dns` section) and checks the section.
fn dns(text: &str) -> Result<DnsConfig, Refused> {
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).unwrap();
    let (doc, mut p) = dnsfence_config::read::<Doc>(value, &[]);
    let Some(doc) = doc else {
        return Err(Refused { problems: p.lines });
    };
    doc.dns.check(&mut p);
    if p.is_empty() {
        Ok(doc.dns)
    } else {
        Err(Refused { problems: p.lines })
    }
}

#[test]
fn defaults() {
    let d = dns("").unwrap();
    assert_eq!(d, DnsConfig::default());
    assert_eq!(d.response_max_delay, Duration::from_millis(100));
    assert_eq!(d.max_ttl, Duration::from_secs(86_400));
    assert_eq!(d.unknown_clients, dnsfence_dns::UnknownClients::Refuse);
    assert_eq!(d.never_learn, dnsfence_dns::inside::default_never_learn());
    assert_eq!(d.cluster_domain, "cluster.local");
}

#[test]
fn zero_and_huge_values_are_refused_with_their_range() {
    let err = dns(
        "dns: {upstream_timeout: 0s, upstream_port_lifetime: 10ms, tcp_idle_timeout: 0s, max_ips_per_name: 0, response_max_delay: 0ms, max_ttl: 0s}",
    )
    .unwrap_err();
    assert_eq!(
        err.problems,
        [
            "dns.max_ttl: 0s is too short: at least 1s",
            "dns.response_max_delay: 0s is too short: at least 1ms",
            "dns.upstream_timeout: 0s is too short: at least 1ms",
            "dns.upstream_port_lifetime: 10ms is too short: at least 100ms",
            "dns.tcp_idle_timeout: 0s is too short: at least 1ms",
            "dns.max_ips_per_name: must be at least 1",
        ]
    );
    // Past some point a duration overflows the clock arithmetic of timers: the process
    // would panic on the first query.
    let err = dns(
        "dns: {upstream_timeout: 500000000000y, upstream_port_lifetime: 2days, tcp_idle_timeout: 2h, drain_timeout: 1day, response_max_delay: 11s, min_ttl: 8days, max_ttl: 2y}",
    )
    .unwrap_err();
    assert_eq!(
        err.problems,
        [
            "dns.min_ttl: 8days is too long: at most 7days",
            "dns.max_ttl: 2years is too long: at most 1year",
            "dns.response_max_delay: 11s is too long: at most 10s",
            "dns.upstream_timeout: 500000000000years is too long: at most 1h",
            "dns.upstream_port_lifetime: 2days is too long: at most 1day",
            "dns.tcp_idle_timeout: 2h is too long: at most 1h",
            "dns.drain_timeout: 1day is too long: at most 1h",
        ]
    );
    // The bounds themselves are fine.
    dns(
        "dns: {upstream_timeout: 1h, upstream_port_lifetime: 100ms, tcp_idle_timeout: 1ms, drain_timeout: 0s, response_max_delay: 10s, min_ttl: 7days, max_ttl: 1y}",
    )
    .unwrap();
}

#[test]
fn the_hedge_delay_is_auto_off_or_a_duration_shorter_than_the_timeout() {
    let dns = |text: &str| dns(text);
    let auto = dns("").unwrap();
    assert_eq!(auto.upstream_hedge_after, HedgeAfter::Auto);
    assert_eq!(auto.hedge_after(), Some(Duration::from_secs(1)));
    let short = dns("dns: {upstream_timeout: 200ms, upstream_hedge_after: auto}").unwrap();
    assert_eq!(short.hedge_after(), Some(Duration::from_millis(100)));
    let off = dns("dns: {upstream_hedge_after: off}").unwrap();
    assert_eq!(off.hedge_after(), None);
    let set = dns("dns: {upstream_hedge_after: 300ms}").unwrap();
    assert_eq!(set.hedge_after(), Some(Duration::from_millis(300)));
    let problems = |text: &str| dns(text).unwrap_err().problems;
    assert_eq!(
        problems("dns: {upstream_hedge_after: later}"),
        ["dns.upstream_hedge_after: \"later\" is neither auto, off nor a duration like 200ms: expected number at 0"]
    );
    assert_eq!(
        problems("dns: {upstream_hedge_after: 0s}"),
        ["dns.upstream_hedge_after: 0s is too short: at least 1ms"]
    );
    assert_eq!(
        problems("dns: {upstream_timeout: 2s, upstream_hedge_after: 2s}"),
        ["dns.upstream_hedge_after: 2s is not shorter than dns.upstream_timeout (2s): no second copy would leave (to say so, use off)"]
    );
}

#[test]
fn ports_0_and_search_suffixes_that_are_not_names_are_refused() {
    let err = dns(
        "dns: {listen: [\"127.0.0.1:5353\"], upstreams: [\"127.0.0.1:0\"], transparent: {port: 0}, search_suffixes: [cluster.local, \"\", \"a..b\", \"with space\", \"*.x\"]}",
    )
    .unwrap_err();
    let all = err.problems.join("\n");
    for needle in [
        "dns.upstreams[0]: 127.0.0.1:0 has no port (0)",
        "dns.transparent.port: must not be 0",
        "dns.search_suffixes[1]: \"\"",
        "dns.search_suffixes[2]: \"a..b\"",
        "dns.search_suffixes[3]: \"with space\"",
        "dns.search_suffixes[4]: \"*.x\"",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(err.problems.len(), 6, "{all}");
}

#[test]
fn a_transparent_port_that_does_not_parse_is_named() {
    let err = dns("dns: {transparent: {port: abc}}").unwrap_err();
    assert_eq!(err.problems.len(), 1, "{:?}", err.problems);
    assert!(
        err.problems[0].starts_with("dns.transparent.port: "),
        "{:?}",
        err.problems
    );
}

#[test]
fn transparent_limits_default_and_are_checked() {
    let c = dns("dns: {transparent: {port: 15053}}\n").unwrap();
    let t = c.transparent.unwrap();
    assert_eq!(t, TransparentConfig::on_port(15053));
    assert_eq!(
        (t.client_packets_per_second, t.client_new_servers_per_second),
        (10_000, 20)
    );
    let c = dns(
        "dns: {transparent: {port: 15053, client_packets_per_second: 0, client_new_servers_per_second: 5}}\n",
    )
    .unwrap();
    let t = c.transparent.unwrap();
    assert_eq!(
        (t.client_packets_per_second, t.client_new_servers_per_second),
        (0, 5)
    );
    for (text, problem) in [
        (
            "dns: {transparent: {port: 15053, client_packet_per_second: 1}}\n",
            "dns.transparent.client_packet_per_second: unknown key",
        ),
        (
            "dns: {transparent: {port: 15053, client_new_servers_per_second: 0}}\n",
            "dns.transparent.client_new_servers_per_second: must be at least 1",
        ),
    ] {
        let all = dns(text).unwrap_err().problems.join("\n");
        assert!(all.contains(problem), "{all}");
    }
}
