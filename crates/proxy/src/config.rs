//! The proxy's section of the configuration file (`dns`): plain serde data with its
//! defaults, and the checks of its values. Reading a whole file (unknown keys, every
//! problem at once) is `dnsfence-config`'s; the file's other sections belong to their
//! components.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use dnsfence_config::de::show_duration;
use dnsfence_config::Problems;
use serde::{Deserialize, Deserializer};

/// `upstream_hedge_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HedgeAfter {
    /// A fifth of `upstream_timeout`, from 100 ms to 1 s (default).
    #[default]
    Auto,
    /// After this long.
    After(Duration),
    /// Never: a query gets another upstream only once its own has failed.
    Off,
}

impl DnsConfig {
    /// The learned mappings' bounds.
    pub fn cache(&self) -> dnsfence_fqdncache::CacheConfig {
        dnsfence_fqdncache::CacheConfig {
            min_ttl: self.min_ttl,
            max_ttl: self.max_ttl,
            max_ips_per_name: self.max_ips_per_name,
            ..dnsfence_fqdncache::CacheConfig::default()
        }
    }

    /// The verdict's switches.
    pub fn verdict(&self) -> dnsfence_dns::VerdictConfig {
        dnsfence_dns::VerdictConfig {
            deny_rcode: self.deny_rcode.rcode(),
            unknown_clients: self.unknown_clients,
        }
    }

    /// What answers may teach: `dns.never_learn`, `dns.cluster_domain`, and the cluster's
    /// ranges (`cluster_cidrs`, a top-level key).
    pub fn inside(&self, cluster_cidrs: &[ipnet::IpNet]) -> dnsfence_dns::InsideConfig {
        dnsfence_dns::InsideConfig {
            never_learn: self.never_learn.iter().map(ipnet::IpNet::trunc).collect(),
            cluster_cidrs: cluster_cidrs.iter().map(ipnet::IpNet::trunc).collect(),
            cluster_domain: String::new(),
        }
        .with_cluster_domain(&self.cluster_domain)
    }

    /// How long a query waits for its upstream before a second copy goes to another
    /// one; `None`: no second copy.
    pub fn hedge_after(&self) -> Option<Duration> {
        match self.upstream_hedge_after {
            HedgeAfter::Auto => Some(
                (self.upstream_timeout / 5)
                    .clamp(Duration::from_millis(100), Duration::from_secs(1)),
            ),
            HedgeAfter::After(d) => Some(d),
            HedgeAfter::Off => None,
        }
    }
}

/// `dns.transparent`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TransparentConfig {
    /// The port TPROXY redirects DNS to.
    pub port: u16,
    /// Redirected DNS packets (UDP datagrams and TCP connection attempts) each endpoint
    /// address may send per second, in bursts of as many (default 10000; `0`: no limit).
    /// The datapath drops the rest before the proxy reads them, so one pod's flood
    /// cannot fill the socket every pod's DNS waits in.
    #[serde(default = "default_client_packets")]
    pub client_packets_per_second: u32,
    /// Servers a client may ask for the first time per second, in bursts of twice as
    /// many (default 20; at least 1): answering from a server's address the proxy has not
    /// answered from lately takes sockets, so a pod asking a new address with every query
    /// gets its share and no more (its other queries are dropped unanswered).
    #[serde(default = "default_client_new_servers")]
    pub client_new_servers_per_second: u32,
}

impl TransparentConfig {
    /// The listener on `port` with the default limits.
    pub fn on_port(port: u16) -> Self {
        Self {
            port,
            client_packets_per_second: default_client_packets(),
            client_new_servers_per_second: default_client_new_servers(),
        }
    }
}

fn default_client_packets() -> u32 {
    10_000
}
fn default_client_new_servers() -> u32 {
    20
}

/// `dns`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Explicit listeners, UDP and TCP (default: none).
    #[serde(default, deserialize_with = "dnsfence_config::de::socket_addresses")]
    pub listen: Vec<SocketAddr>,
    /// Where explicit listeners forward allowed queries (default: none).
    #[serde(default, deserialize_with = "dnsfence_config::de::socket_addresses")]
    pub upstreams: Vec<SocketAddr>,
    /// The transparent listener (default: off).
    #[serde(default)]
    pub transparent: Option<TransparentConfig>,
    /// Rcode for denied queries (default `refused`).
    #[serde(default)]
    pub deny_rcode: dnsfence_dns::DenyRcode,
    /// Sources not in the inventory (default `refuse`).
    #[serde(default)]
    pub unknown_clients: dnsfence_dns::UnknownClients,
    /// Smallest TTL applied to learned IPs (default `0s`: honour the server; at most 7 days).
    #[serde(default, deserialize_with = "dnsfence_config::de::duration")]
    pub min_ttl: Duration,
    /// Largest TTL applied to learned IPs (default `1day`; 1 s to 1 year, and at least
    /// `min_ttl`).
    #[serde(
        default = "default_max_ttl",
        deserialize_with = "dnsfence_config::de::duration"
    )]
    pub max_ttl: Duration,
    /// At most this many IPs per name (default 1000; at least 1).
    #[serde(default = "default_max_ips")]
    pub max_ips_per_name: usize,
    /// Longest an answer is held waiting for its IPs to be enforced (default `100ms`; 1 ms to
    /// 10 s).
    #[serde(
        default = "default_response_max_delay",
        deserialize_with = "dnsfence_config::de::duration"
    )]
    pub response_max_delay: Duration,
    /// When an upstream has not answered, SERVFAIL (default `5s`; 1 ms to 1 h).
    #[serde(
        default = "default_upstream_timeout",
        deserialize_with = "dnsfence_config::de::duration"
    )]
    pub upstream_timeout: Duration,
    /// When a query still unanswered gets a second copy to another upstream (explicit
    /// listeners with several upstreams): `auto` (default: a fifth of
    /// `upstream_timeout`, from 100 ms to 1 s), a duration shorter than
    /// `upstream_timeout`, or `off`.
    #[serde(default, deserialize_with = "hedge_after")]
    pub upstream_hedge_after: HedgeAfter,
    /// How long an upstream UDP source port serves: each upstream's sockets are replaced
    /// by fresh ones on new random ports in turn, so none is used longer than this
    /// (default `1m`; 100 ms to 1 day). The ports a spoofer must guess keep changing.
    #[serde(
        default = "default_upstream_port_lifetime",
        deserialize_with = "dnsfence_config::de::duration"
    )]
    pub upstream_port_lifetime: Duration,
    /// Queries in flight per client endpoint; more are answered SERVFAIL (default 256).
    #[serde(default = "default_max_inflight")]
    pub max_inflight_per_client: u32,
    /// Idle TCP client connections are closed after this (default `10s`; 1 ms to 1 h).
    #[serde(
        default = "default_tcp_idle",
        deserialize_with = "dnsfence_config::de::duration"
    )]
    pub tcp_idle_timeout: Duration,
    /// How long an upstream TCP connection is kept for reuse once its query is answered
    /// (default `0s`: closed at once; at most 1 min). Reuse saves a handshake per TCP
    /// query, but a server that handles TCP in its only process (dnsmasq with `-d`) is
    /// blocked for as long as an idle connection stays open.
    #[serde(default, deserialize_with = "dnsfence_config::de::duration")]
    pub upstream_tcp_idle: Duration,
    /// On SIGTERM, how long queries in flight may take to finish (default 5s; at most 1 h).
    #[serde(
        default = "default_drain",
        deserialize_with = "dnsfence_config::de::duration"
    )]
    pub drain_timeout: Duration,
    /// The pods' DNS search domains: a query for an allowed name with one of them
    /// appended is forwarded (the upstream answers NXDOMAIN and the stub resolver moves on)
    /// instead of refused; its answer teaches nothing (default: none).
    #[serde(default)]
    pub search_suffixes: Vec<String>,
    /// Ranges an answer's address is never learned from, whatever the name (default:
    /// loopback, link-local including cloud metadata, multicast, broadcast and class E,
    /// unspecified, IPv4-mapped and -compatible IPv6; see [`dnsfence_dns::inside`]).
    /// Setting it replaces the default; the datapath refuses these ranges too.
    #[serde(
        default = "dnsfence_dns::inside::default_never_learn",
        deserialize_with = "dnsfence_config::de::cidrs"
    )]
    pub never_learn: Vec<ipnet::IpNet>,
    /// The cluster's DNS domain (default `cluster.local`): its service names may teach
    /// addresses of endpoints and of `cluster_cidrs`.
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
}

fn default_cluster_domain() -> String {
    dnsfence_dns::inside::DEFAULT_CLUSTER_DOMAIN.to_owned()
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            upstreams: Vec::new(),
            transparent: None,
            deny_rcode: dnsfence_dns::DenyRcode::default(),
            unknown_clients: dnsfence_dns::UnknownClients::default(),
            min_ttl: Duration::ZERO,
            max_ttl: default_max_ttl(),
            max_ips_per_name: default_max_ips(),
            response_max_delay: default_response_max_delay(),
            upstream_timeout: default_upstream_timeout(),
            upstream_port_lifetime: default_upstream_port_lifetime(),
            upstream_hedge_after: HedgeAfter::default(),
            max_inflight_per_client: default_max_inflight(),
            tcp_idle_timeout: default_tcp_idle(),
            upstream_tcp_idle: Duration::ZERO,
            drain_timeout: default_drain(),
            search_suffixes: Vec::new(),
            never_learn: dnsfence_dns::inside::default_never_learn(),
            cluster_domain: default_cluster_domain(),
        }
    }
}

impl DnsConfig {
    /// Checks the values against each other and their ranges, naming each problem by its
    /// key (`dns.upstream_timeout`). Values in `p` that did not read (their defaults stand
    /// in) are left out of the checks between values.
    pub fn check(&self, p: &mut Problems) {
        if p.parsed("dns.listen")
            && p.parsed("dns.upstreams")
            && !self.listen.is_empty()
            && self.upstreams.is_empty()
        {
            p.lines.push(
                "dns.upstreams: explicit listeners (dns.listen) need at least one upstream"
                    .to_owned(),
            );
        }
        // An IPv4 server written as an IPv4-mapped IPv6 address would be asked over
        // IPv6 (which cannot reach it) and judged by policies as IPv6.
        for (i, up) in self.upstreams.iter().enumerate() {
            if let IpAddr::V6(v6) = up.ip() {
                if let Some(v4) = v6.to_ipv4_mapped() {
                    p.lines.push(format!(
                        "dns.upstreams[{i}]: {up} is an IPv4-mapped IPv6 address; write {}",
                        SocketAddr::new(v4.into(), up.port())
                    ));
                }
            }
        }
        for (i, up) in self.upstreams.iter().enumerate() {
            if up.port() == 0 {
                p.lines
                    .push(format!("dns.upstreams[{i}]: {up} has no port (0)"));
            }
        }
        if self.transparent.as_ref().is_some_and(|t| t.port == 0) {
            p.lines
                .push("dns.transparent.port: must not be 0".to_owned());
        }
        if self
            .transparent
            .as_ref()
            .is_some_and(|t| t.client_new_servers_per_second == 0)
        {
            p.lines.push(
                "dns.transparent.client_new_servers_per_second: must be at least 1".to_owned(),
            );
        }
        if !self.cluster_domain.is_empty() {
            if let Err(e) = dnsfence_policy::FoldedName::new(self.cluster_domain.as_bytes()) {
                p.lines.push(format!(
                    "dns.cluster_domain: {:?} is not a DNS name: {e}",
                    self.cluster_domain
                ));
            }
        }
        for (i, suffix) in self.search_suffixes.iter().enumerate() {
            if let Err(e) = dnsfence_policy::FoldedName::new(suffix.as_bytes()) {
                p.lines.push(format!(
                    "dns.search_suffixes[{i}]: {suffix:?} is not a DNS name: {e}"
                ));
            }
        }
        let dns = self;
        for (key, value) in [
            ("dns.min_ttl", dns.min_ttl),
            ("dns.max_ttl", dns.max_ttl),
            ("dns.response_max_delay", dns.response_max_delay),
            ("dns.upstream_timeout", dns.upstream_timeout),
            ("dns.upstream_port_lifetime", dns.upstream_port_lifetime),
            ("dns.tcp_idle_timeout", dns.tcp_idle_timeout),
            ("dns.upstream_tcp_idle", dns.upstream_tcp_idle),
            ("dns.drain_timeout", dns.drain_timeout),
        ] {
            let Some((_, least, most)) = DURATION_LIMITS.iter().find(|(k, _, _)| *k == key) else {
                continue;
            };
            if value < *least {
                p.lines.push(format!(
                    "{key}: {} is too short: at least {}",
                    show_duration(value),
                    show_duration(*least)
                ));
            } else if value > *most {
                p.lines.push(format!(
                    "{key}: {} is too long: at most {}",
                    show_duration(value),
                    show_duration(*most)
                ));
            }
        }
        if let HedgeAfter::After(d) = dns.upstream_hedge_after {
            if d < Duration::from_millis(1) {
                p.lines.push(format!(
                    "dns.upstream_hedge_after: {} is too short: at least 1ms",
                    show_duration(d)
                ));
            } else if p.parsed("dns.upstream_timeout") && d >= dns.upstream_timeout {
                p.lines.push(format!(
                    "dns.upstream_hedge_after: {} is not shorter than dns.upstream_timeout ({}): no second copy would leave (to say so, use off)",
                    show_duration(d),
                    show_duration(dns.upstream_timeout)
                ));
            }
        }
        if p.parsed("dns.min_ttl") && p.parsed("dns.max_ttl") && dns.max_ttl < dns.min_ttl {
            p.lines.push(format!(
                "dns.max_ttl: {} must not be smaller than dns.min_ttl ({})",
                show_duration(dns.max_ttl),
                show_duration(dns.min_ttl)
            ));
        }
        if dns.max_ips_per_name == 0 {
            p.lines
                .push("dns.max_ips_per_name: must be at least 1".to_owned());
        }
        if dns.max_inflight_per_client == 0 {
            p.lines
                .push("dns.max_inflight_per_client: must be at least 1".to_owned());
        }
    }
}

fn default_max_ttl() -> Duration {
    Duration::from_secs(86_400)
}
fn default_max_ips() -> usize {
    1000
}
fn default_response_max_delay() -> Duration {
    Duration::from_millis(100)
}
fn default_upstream_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_upstream_port_lifetime() -> Duration {
    Duration::from_secs(60)
}
fn default_max_inflight() -> u32 {
    256
}
fn default_drain() -> Duration {
    Duration::from_secs(5)
}
fn default_tcp_idle() -> Duration {
    Duration::from_secs(10)
}

fn hedge_after<'de, D: Deserializer<'de>>(d: D) -> Result<HedgeAfter, D::Error> {
    let s = String::deserialize(d)?;
    match s.as_str() {
        "auto" => Ok(HedgeAfter::Auto),
        "off" => Ok(HedgeAfter::Off),
        _ => humantime::parse_duration(&s)
            .map(HedgeAfter::After)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "{s:?} is neither auto, off nor a duration like 200ms: {e}"
                ))
            }),
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// The range of each duration key, `(key, at least, at most)`. Zero timeouts would fail
/// every query (or close every connection) at once; very long ones are mistakes, and past
/// some point they overflow the clock arithmetic of timers.
const DURATION_LIMITS: &[(&str, Duration, Duration)] = &[
    (
        "dns.min_ttl",
        Duration::ZERO,
        Duration::from_secs(7 * 86_400),
    ),
    // humantime's year (`1y`): 365.25 days.
    (
        "dns.max_ttl",
        Duration::from_secs(1),
        Duration::from_secs(31_557_600),
    ),
    // A client's resolver gives up after a few seconds (glibc: 5 s): an answer held
    // longer reaches nobody.
    (
        "dns.response_max_delay",
        Duration::from_millis(1),
        Duration::from_secs(10),
    ),
    ("dns.upstream_timeout", Duration::from_millis(1), HOUR),
    (
        "dns.upstream_port_lifetime",
        Duration::from_millis(100),
        Duration::from_secs(86_400),
    ),
    ("dns.tcp_idle_timeout", Duration::from_millis(1), HOUR),
    (
        "dns.upstream_tcp_idle",
        Duration::ZERO,
        Duration::from_secs(60),
    ),
    ("dns.drain_timeout", Duration::ZERO, HOUR),
];

#[cfg(test)]
mod tests;
