//! The configuration file: plain serde data, checked as a whole before anything starts.
//!
//! Unknown keys anywhere are errors, and all of them are reported at once together with
//! every value that fails to parse and every value out of range or inconsistent with
//! another, so an operator fixes a file in one round. Checks that depend on the command
//! reading the file (policy files it reads, listeners it needs) come with
//! [`Config::parse_file`] and a [`Usage`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_yaml_ng::Value;

/// The whole file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Policy files or directories (default: none).
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    /// The standalone endpoint inventory (default: empty).
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// The node's own addresses, for `toEntities: host` (default: none).
    #[serde(default, deserialize_with = "ip_addresses")]
    pub host_ips: Vec<IpAddr>,
    /// The cluster's pod and service ranges (default: none). An answer's address inside
    /// them is learned only from the cluster's own service names
    /// (`NAME.NAMESPACE.svc.<dns.cluster_domain>`), so an allowed external name cannot
    /// point a pod at another pod or a Service.
    #[serde(default, deserialize_with = "cidrs")]
    pub cluster_cidrs: Vec<ipnet::IpNet>,
    /// The DNS proxy.
    #[serde(default)]
    pub dns: DnsConfig,
    /// The local API socket.
    #[serde(default)]
    pub api: ApiConfig,
    /// Metrics and health endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Where state survives restarts (default `/var/lib/dnsfence`).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Kernel enforcement (`dnsfence run`; `dnsfence proxy` enforces nothing).
    #[serde(default)]
    pub datapath: DatapathConfig,
    /// Flow events.
    #[serde(default)]
    pub flows: FlowsConfig,
    /// Every policy in audit mode: denials are recorded, not enforced (default false).
    #[serde(default)]
    pub audit: bool,
    /// Logs.
    #[serde(default)]
    pub log: LogConfig,
    /// Kubernetes mode of `dnsfence agent` (default: off).
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
}

/// The `kubernetes` section: `dnsfence agent` also takes pods, namespaces and policies
/// from the Kubernetes API (in addition to `endpoints` and `policies`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Watch the API server (default false).
    #[serde(default)]
    pub enabled: bool,
    /// A kubeconfig file to reach the API server with (default: the in-cluster service
    /// account, else `KUBECONFIG`, else `~/.kube/config`).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name: its pods are enforced (default: the `NODE_NAME` environment
    /// variable, else the host name).
    #[serde(default)]
    pub node_name: Option<String>,
    /// Also enforce `cilium.io/v2` CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy
    /// objects, when their CRDs exist (default false).
    #[serde(default)]
    pub watch_cilium_policies: bool,
    /// The cluster's name, as the label `io.cilium.k8s.policy.cluster` (default `default`).
    #[serde(default = "default_cluster_name")]
    pub cluster_name: String,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            kubeconfig: None,
            node_name: None,
            watch_cilium_policies: false,
            cluster_name: default_cluster_name(),
        }
    }
}

fn default_cluster_name() -> String {
    "default".to_owned()
}

/// The `flows` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FlowsConfig {
    /// Events kept in memory for `dnsfence observe` (default 10000).
    #[serde(default = "default_ring")]
    pub ring_size: usize,
    /// Also append them to this JSON-lines file (default: none).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Rotate the file past this many bytes, keeping one old file (default 104857600).
    #[serde(default = "default_file_max")]
    pub file_max_bytes: u64,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        Self {
            ring_size: default_ring(),
            file: None,
            file_max_bytes: default_file_max(),
        }
    }
}

fn default_ring() -> usize {
    10_000
}
fn default_file_max() -> u64 {
    100 * 1024 * 1024
}

/// `log.format`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The `log` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json` (default `text`).
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `info,dnsfence_proxy=debug` (default `info`;
    /// the `RUST_LOG` environment variable wins).
    #[serde(default)]
    pub level: Option<String>,
}

/// `datapath.backend`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One nftables table, programmed over netlink.
    #[default]
    Nftables,
    /// Enforce nothing (DNS filtering only).
    None,
}

/// `datapath.deny_action`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DenyAction {
    /// ICMP administratively prohibited, TCP reset: clients fail fast.
    #[default]
    Reject,
    /// Silently drop: clients time out.
    Drop,
}

/// The `datapath` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DatapathConfig {
    /// Which datapath (default `nftables`).
    #[serde(default)]
    pub backend: Backend,
    /// The nftables table (family `inet`) dnsfence owns (default `dnsfence`).
    #[serde(default = "default_table")]
    pub table: String,
    /// What happens to traffic no rule allows (default `reject`).
    #[serde(default)]
    pub deny_action: DenyAction,
    /// The packet mark of redirected DNS (default `0x4e53`), routed to the local proxy
    /// by a policy routing rule.
    #[serde(default = "default_fwmark")]
    pub fwmark: u32,
    /// The connection-tracking mark bit(s) of connections the datapath let start
    /// (default `0x400000`); the later packets of other connections are checked
    /// against the policy like new ones.
    #[serde(default = "default_ct_mark")]
    pub ct_mark: u32,
    /// The routing table of that rule (default `20053`).
    #[serde(default = "default_route_table")]
    pub route_table: u32,
    /// The NFLOG group refused packets are logged to, rate limited, for flow events
    /// and logs (default `20053`; `0`: off).
    #[serde(default = "default_log_group")]
    pub log_group: u16,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            backend: Backend::default(),
            table: default_table(),
            deny_action: DenyAction::default(),
            fwmark: default_fwmark(),
            ct_mark: default_ct_mark(),
            route_table: default_route_table(),
            log_group: default_log_group(),
        }
    }
}

fn default_table() -> String {
    "dnsfence".to_owned()
}
fn default_fwmark() -> u32 {
    0x4e53
}
fn default_ct_mark() -> u32 {
    0x0040_0000
}
fn default_route_table() -> u32 {
    20053
}
fn default_log_group() -> u16 {
    20053
}

/// One endpoint of the standalone inventory.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Name (pod name).
    pub name: String,
    /// Namespace (default `default`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Addresses.
    #[serde(deserialize_with = "ip_addresses")]
    pub ips: Vec<IpAddr>,
    /// On another node, or the host (default false): `toEndpoints` selectors see it, but
    /// dnsfence does not enforce its egress here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub remote: bool,
}

/// `deny_rcode`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DenyRcode {
    /// REFUSED (default).
    #[default]
    Refused,
    /// NXDOMAIN.
    Nxdomain,
}

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

/// `unknown_clients`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownClientsConfig {
    /// Answer REFUSED (default: fail closed).
    #[default]
    Refuse,
    /// Forward unfiltered.
    Forward,
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
    #[serde(default, deserialize_with = "socket_addresses")]
    pub listen: Vec<SocketAddr>,
    /// Where explicit listeners forward allowed queries (default: none).
    #[serde(default, deserialize_with = "socket_addresses")]
    pub upstreams: Vec<SocketAddr>,
    /// The transparent listener (default: off).
    #[serde(default)]
    pub transparent: Option<TransparentConfig>,
    /// Rcode for denied queries (default `refused`).
    #[serde(default)]
    pub deny_rcode: DenyRcode,
    /// Sources not in the inventory (default `refuse`).
    #[serde(default)]
    pub unknown_clients: UnknownClientsConfig,
    /// Smallest TTL applied to learned IPs (default `0s`: honour the server; at most 7 days).
    #[serde(default, deserialize_with = "duration")]
    pub min_ttl: Duration,
    /// Largest TTL applied to learned IPs (default `1day`; 1 s to 1 year, and at least
    /// `min_ttl`).
    #[serde(default = "default_max_ttl", deserialize_with = "duration")]
    pub max_ttl: Duration,
    /// At most this many IPs per name (default 1000; at least 1).
    #[serde(default = "default_max_ips")]
    pub max_ips_per_name: usize,
    /// Longest an answer is held waiting for its IPs to be enforced (default `100ms`; 1 ms to
    /// 10 s).
    #[serde(default = "default_response_max_delay", deserialize_with = "duration")]
    pub response_max_delay: Duration,
    /// When an upstream has not answered, SERVFAIL (default `5s`; 1 ms to 1 h).
    #[serde(default = "default_upstream_timeout", deserialize_with = "duration")]
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
        deserialize_with = "duration"
    )]
    pub upstream_port_lifetime: Duration,
    /// Queries in flight per client endpoint; more are answered SERVFAIL (default 256).
    #[serde(default = "default_max_inflight")]
    pub max_inflight_per_client: u32,
    /// Idle TCP client connections are closed after this (default `10s`; 1 ms to 1 h).
    #[serde(default = "default_tcp_idle", deserialize_with = "duration")]
    pub tcp_idle_timeout: Duration,
    /// How long an upstream TCP connection is kept for reuse once its query is answered
    /// (default `0s`: closed at once; at most 1 min). Reuse saves a handshake per TCP
    /// query, but a server that handles TCP in its only process (dnsmasq with `-d`) is
    /// blocked for as long as an idle connection stays open.
    #[serde(default, deserialize_with = "duration")]
    pub upstream_tcp_idle: Duration,
    /// On SIGTERM, how long queries in flight may take to finish (default 5s; at most 1 h).
    #[serde(default = "default_drain", deserialize_with = "duration")]
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
        deserialize_with = "cidrs"
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
            deny_rcode: DenyRcode::default(),
            unknown_clients: UnknownClientsConfig::default(),
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

/// `api`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The local API of `run` and `proxy` (default `/run/dnsfence/dnsfence.sock`).
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Where `dnsfence agent` serves proxies and `status` (default
    /// `/run/dnsfence/agent.sock`).
    #[serde(default = "default_agent_socket")]
    pub agent_socket: PathBuf,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            agent_socket: default_agent_socket(),
        }
    }
}

fn default_agent_socket() -> PathBuf {
    PathBuf::from("/run/dnsfence/agent.sock")
}

/// `metrics`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `/metrics` and `/healthz` address of `run` and `proxy` (default: off).
    #[serde(default, deserialize_with = "socket_address")]
    pub listen: Option<SocketAddr>,
    /// The same for `dnsfence agent` (default: off): datapath, refused packets, its
    /// snapshot version.
    #[serde(default, deserialize_with = "socket_address")]
    pub agent_listen: Option<SocketAddr>,
}

fn default_namespace() -> String {
    "default".to_owned()
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/dnsfence")
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/dnsfence/dnsfence.sock")
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

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!("{s:?} is not a duration like 100ms, 5s or 1h: {e}"))
    })
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

/// Addresses are parsed one by one, so that each bad one is named by its index and value:
/// one line each, starting with the index (`[1]: invalid IP address "x"`), which
/// [`push_error`] appends to the key without a separator.
fn addresses<'de, D: Deserializer<'de>, A: FromStr>(
    d: D,
    what: &str,
    hint: &str,
) -> Result<Vec<A>, D::Error> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (i, v) in Vec::<Value>::deserialize(d)?.iter().enumerate() {
        match address(v, what, hint) {
            Ok(a) => good.push(a),
            Err(m) => bad.push(format!("[{i}]: {m}")),
        }
    }
    if bad.is_empty() {
        Ok(good)
    } else {
        Err(serde::de::Error::custom(bad.join("\n")))
    }
}

/// `v` as an address; `Err` says what is wrong with it.
fn address<A: FromStr>(v: &Value, what: &str, hint: &str) -> Result<A, String> {
    match v {
        Value::String(s) => s.parse().map_err(|_| format!("invalid {what} {s:?}{hint}")),
        other => Err(format!(
            "invalid {what} {} (expected a string)",
            show_value(other)
        )),
    }
}

fn ip_addresses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    addresses(d, "IP address", "")
}

fn cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    addresses(
        d,
        "CIDR",
        " (expected ADDRESS/LENGTH, like 10.96.0.0/12 or fd00::/8)",
    )
}

const SOCKET_HINT: &str = " (expected IP:port, like 127.0.0.1:53 or \"[::1]:53\")";

fn socket_addresses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    addresses(d, "socket address", SOCKET_HINT)
}

fn socket_address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v) => address(&v, "socket address", SOCKET_HINT)
            .map(Some)
            .map_err(serde::de::Error::custom),
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

/// A duration as an operator writes it: `1h`, `7days`, `100ms`.
fn show_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Which DNS listeners a command needs (see [`Usage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Listeners {
    /// None: the command serves no DNS, or gives `dns.transparent` its default port itself
    /// (`dnsfence agent`, `dnsfence proxy --agent`).
    #[default]
    Optional,
    /// At least one of `dns.listen` and `dns.transparent` (`dnsfence proxy`): without one
    /// the proxy would serve nothing.
    Required,
    /// As `Required` with `datapath.backend: none`; the nftables datapath gives
    /// `dns.transparent` its default port (`dnsfence run`).
    RequiredWithoutDatapath,
}

/// What the command reading a configuration does with it, for the checks that depend on it
/// (see [`Config::parse_file`]). The default checks the file alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// It reads the `policies` files: each must be readable (relative paths are read from
    /// the configuration file's directory).
    pub reads_policies: bool,
    /// The DNS listeners it needs.
    pub listeners: Listeners,
    /// It takes policies and endpoints from files only, so `kubernetes.enabled` (which only
    /// `dnsfence agent` honours) is refused rather than silently ignored.
    pub files_only: bool,
}

/// Why a configuration was refused: every problem found, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    /// One line per problem, each naming the key.
    pub problems: Vec<String>,
}

/// The keys each section accepts, to report every unknown key at once.
const KNOWN: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "policies",
            "endpoints",
            "host_ips",
            "cluster_cidrs",
            "dns",
            "api",
            "metrics",
            "state_dir",
            "datapath",
            "flows",
            "log",
            "audit",
            "kubernetes",
        ],
    ),
    (
        "dns",
        &[
            "listen",
            "upstreams",
            "transparent",
            "deny_rcode",
            "unknown_clients",
            "min_ttl",
            "max_ttl",
            "max_ips_per_name",
            "response_max_delay",
            "upstream_timeout",
            "upstream_port_lifetime",
            "upstream_hedge_after",
            "max_inflight_per_client",
            "tcp_idle_timeout",
            "upstream_tcp_idle",
            "drain_timeout",
            "search_suffixes",
            "never_learn",
            "cluster_domain",
        ],
    ),
    (
        "dns.transparent",
        &[
            "port",
            "client_packets_per_second",
            "client_new_servers_per_second",
        ],
    ),
    ("api", &["socket", "agent_socket"]),
    ("flows", &["ring_size", "file", "file_max_bytes"]),
    ("log", &["format", "level"]),
    (
        "datapath",
        &[
            "backend",
            "table",
            "deny_action",
            "fwmark",
            "ct_mark",
            "route_table",
            "log_group",
        ],
    ),
    ("metrics", &["listen", "agent_listen"]),
    (
        "endpoints[]",
        &["name", "namespace", "labels", "ips", "remote"],
    ),
    (
        "kubernetes",
        &[
            "enabled",
            "kubeconfig",
            "node_name",
            "watch_cilium_policies",
            "cluster_name",
        ],
    ),
];

fn unknown_keys(v: &Value, path: &str, known_path: &str, out: &mut Vec<String>) {
    match v {
        Value::Mapping(m) => {
            let known = KNOWN
                .iter()
                .find(|(p, _)| *p == known_path)
                .map(|(_, k)| *k);
            for (k, child) in m {
                let Some(k) = k.as_str() else { continue };
                let child_path = if path.is_empty() {
                    k.to_owned()
                } else {
                    format!("{path}.{k}")
                };
                let child_known = if known_path.is_empty() {
                    k.to_owned()
                } else {
                    format!("{known_path}.{k}")
                };
                match known {
                    Some(known) if !known.contains(&k) => {
                        out.push(format!(
                            "{child_path}: unknown key (expected one of: {})",
                            known.join(", ")
                        ));
                    }
                    Some(_) => unknown_keys(child, &child_path, &child_known, out),
                    None => {}
                }
            }
        }
        Value::Sequence(items) if known_path == "endpoints" => {
            for (i, item) in items.iter().enumerate() {
                unknown_keys(item, &format!("{path}[{i}]"), "endpoints[]", out);
            }
        }
        _ => {}
    }
}

impl Config {
    /// Parses and checks a configuration file's text. `origin` names it in messages. Checks
    /// that depend on the command reading it are left to [`Config::parse_file`].
    pub fn parse(origin: &str, text: &str) -> Result<Self, ConfigError> {
        Self::parse_with(origin, text, None, Usage::default())
    }

    /// Parses and checks the text of the configuration file at `path` for a command that
    /// uses it as `usage` says: relative `policies` are read from the file's directory.
    pub fn parse_file(path: &Path, text: &str, usage: Usage) -> Result<Self, ConfigError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse_with(&path.display().to_string(), text, Some(dir), usage)
    }

    fn parse_with(
        origin: &str,
        text: &str,
        dir: Option<&Path>,
        usage: Usage,
    ) -> Result<Self, ConfigError> {
        let value: Value = serde_yaml_ng::from_str(text).map_err(|e| ConfigError {
            problems: vec![format!("{origin}: invalid YAML: {e}")],
        })?;
        let value = if value.is_null() {
            Value::Mapping(Default::default())
        } else {
            value
        };
        let mut problems = Vec::new();
        unknown_keys(&value, "", "", &mut problems);
        let Value::Mapping(m) = &value else {
            problems.push("expected a mapping at the top level".to_owned());
            return Err(ConfigError {
                problems: prefixed(origin, problems),
            });
        };
        // Parse each field alone so a bad value in one does not hide the others. What
        // parses is kept, so that the checks between values run on the rest (`failed`
        // names the keys left out: checks involving them are skipped).
        let mut kept = serde_yaml_ng::Mapping::new();
        let mut failed = Vec::new();
        for (k, v) in m {
            let Some(k) = k.as_str() else {
                problems.push(format!("{}: keys must be strings", show_value(k)));
                continue;
            };
            let section = match (k, v) {
                ("dns", Value::Mapping(inner)) => {
                    // `dns.transparent.port` is named itself when it does not parse.
                    let mut inner = inner.clone();
                    let port = inner
                        .get("transparent")
                        .and_then(|t| t.get("port"))
                        .cloned();
                    if let Some(Err(e)) = port.map(serde_yaml_ng::from_value::<u16>) {
                        push_error("dns.transparent.port", &e, &mut problems);
                        failed.push("dns.transparent".to_owned());
                        inner.remove("transparent");
                    }
                    Some(valid_fields::<DnsConfig>(
                        "dns",
                        &inner,
                        &mut problems,
                        &mut failed,
                    ))
                }
                ("api", Value::Mapping(inner)) => Some(valid_fields::<ApiConfig>(
                    "api",
                    inner,
                    &mut problems,
                    &mut failed,
                )),
                ("metrics", Value::Mapping(inner)) => Some(valid_fields::<MetricsConfig>(
                    "metrics",
                    inner,
                    &mut problems,
                    &mut failed,
                )),
                ("datapath", Value::Mapping(inner)) => Some(valid_fields::<DatapathConfig>(
                    "datapath",
                    inner,
                    &mut problems,
                    &mut failed,
                )),
                ("flows", Value::Mapping(inner)) => Some(valid_fields::<FlowsConfig>(
                    "flows",
                    inner,
                    &mut problems,
                    &mut failed,
                )),
                ("log", Value::Mapping(inner)) => Some(valid_fields::<LogConfig>(
                    "log",
                    inner,
                    &mut problems,
                    &mut failed,
                )),
                ("kubernetes", Value::Mapping(inner)) => Some(valid_fields::<KubernetesConfig>(
                    "kubernetes",
                    inner,
                    &mut problems,
                    &mut failed,
                )),
                ("endpoints", Value::Sequence(items)) => Some(Value::Sequence(
                    items
                        .iter()
                        .enumerate()
                        .map(|(i, item)| valid_endpoint(i, item, &mut problems))
                        .collect(),
                )),
                _ => {
                    let mut single = serde_yaml_ng::Mapping::new();
                    single.insert(Value::from(k), v.clone());
                    match serde_yaml_ng::from_value::<Config>(Value::Mapping(single)) {
                        Ok(_) => Some(v.clone()),
                        Err(e) => {
                            push_error(k, &e, &mut problems);
                            failed.push(k.to_owned());
                            None
                        }
                    }
                }
            };
            if let Some(section) = section {
                kept.insert(Value::from(k), section);
            }
        }
        let config = match serde_yaml_ng::from_value::<Config>(Value::Mapping(kept)) {
            Ok(c) => c,
            Err(e) => {
                if problems.is_empty() {
                    problems.push(e.to_string());
                }
                return Err(ConfigError {
                    problems: prefixed(origin, problems),
                });
            }
        };
        config.check(&failed, dir, usage, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                problems: prefixed(origin, problems),
            })
        }
    }

    /// The checks between values and of ranges. Keys in `failed` did not parse (their
    /// defaults stand in): checks involving them are skipped.
    fn check(&self, failed: &[String], dir: Option<&Path>, usage: Usage, p: &mut Vec<String>) {
        let parsed = |key: &str| {
            !failed.iter().any(|f| {
                key == f
                    || key
                        .strip_prefix(f.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            })
        };
        if parsed("dns.listen")
            && parsed("dns.upstreams")
            && !self.dns.listen.is_empty()
            && self.dns.upstreams.is_empty()
        {
            p.push(
                "dns.upstreams: explicit listeners (dns.listen) need at least one upstream"
                    .to_owned(),
            );
        }
        // An IPv4 server written as an IPv4-mapped IPv6 address would be asked over
        // IPv6 (which cannot reach it) and judged by policies as IPv6.
        for (i, up) in self.dns.upstreams.iter().enumerate() {
            if let IpAddr::V6(v6) = up.ip() {
                if let Some(v4) = v6.to_ipv4_mapped() {
                    p.push(format!(
                        "dns.upstreams[{i}]: {up} is an IPv4-mapped IPv6 address; write {}",
                        SocketAddr::new(v4.into(), up.port())
                    ));
                }
            }
        }
        for (i, up) in self.dns.upstreams.iter().enumerate() {
            if up.port() == 0 {
                p.push(format!("dns.upstreams[{i}]: {up} has no port (0)"));
            }
        }
        if self.dns.transparent.as_ref().is_some_and(|t| t.port == 0) {
            p.push("dns.transparent.port: must not be 0".to_owned());
        }
        if self
            .dns
            .transparent
            .as_ref()
            .is_some_and(|t| t.client_new_servers_per_second == 0)
        {
            p.push("dns.transparent.client_new_servers_per_second: must be at least 1".to_owned());
        }
        if !self.dns.cluster_domain.is_empty() {
            if let Err(e) = dnsfence_policy::FoldedName::new(self.dns.cluster_domain.as_bytes()) {
                p.push(format!(
                    "dns.cluster_domain: {:?} is not a DNS name: {e}",
                    self.dns.cluster_domain
                ));
            }
        }
        for (i, suffix) in self.dns.search_suffixes.iter().enumerate() {
            if let Err(e) = dnsfence_policy::FoldedName::new(suffix.as_bytes()) {
                p.push(format!(
                    "dns.search_suffixes[{i}]: {suffix:?} is not a DNS name: {e}"
                ));
            }
        }
        let dns = &self.dns;
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
                p.push(format!(
                    "{key}: {} is too short: at least {}",
                    show_duration(value),
                    show_duration(*least)
                ));
            } else if value > *most {
                p.push(format!(
                    "{key}: {} is too long: at most {}",
                    show_duration(value),
                    show_duration(*most)
                ));
            }
        }
        if let HedgeAfter::After(d) = dns.upstream_hedge_after {
            if d < Duration::from_millis(1) {
                p.push(format!(
                    "dns.upstream_hedge_after: {} is too short: at least 1ms",
                    show_duration(d)
                ));
            } else if parsed("dns.upstream_timeout") && d >= dns.upstream_timeout {
                p.push(format!(
                    "dns.upstream_hedge_after: {} is not shorter than dns.upstream_timeout ({}): no second copy would leave (to say so, use off)",
                    show_duration(d),
                    show_duration(dns.upstream_timeout)
                ));
            }
        }
        if parsed("dns.min_ttl") && parsed("dns.max_ttl") && dns.max_ttl < dns.min_ttl {
            p.push(format!(
                "dns.max_ttl: {} must not be smaller than dns.min_ttl ({})",
                show_duration(dns.max_ttl),
                show_duration(dns.min_ttl)
            ));
        }
        if dns.max_ips_per_name == 0 {
            p.push("dns.max_ips_per_name: must be at least 1".to_owned());
        }
        if dns.max_inflight_per_client == 0 {
            p.push("dns.max_inflight_per_client: must be at least 1".to_owned());
        }
        let table = &self.datapath.table;
        if table.is_empty()
            || table.len() > 32
            || !table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            p.push(format!(
                "datapath.table: {table:?} must be 1 to 32 letters, digits, '_' or '-'"
            ));
        }
        if self.flows.ring_size == 0 {
            p.push("flows.ring_size: must be at least 1".to_owned());
        }
        if self.datapath.fwmark == 0 {
            p.push("datapath.fwmark: must not be 0".to_owned());
        }
        if self.datapath.ct_mark == 0 {
            p.push("datapath.ct_mark: must not be 0".to_owned());
        }
        if matches!(self.datapath.route_table, 0 | 253..=255) {
            p.push(format!(
                "datapath.route_table: {} is reserved (0, 253 default, 254 main, 255 local)",
                self.datapath.route_table
            ));
        }
        let mut seen = BTreeMap::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            for ip in &ep.ips {
                if let Some(other) = seen.insert(*ip, i) {
                    p.push(format!(
                        "endpoints[{i}].ips: {ip} is already used by endpoints[{other}]"
                    ));
                }
            }
            for k in ep.labels.keys() {
                if let Err(e) = dnsfence_policy::normalize_key(k) {
                    p.push(format!("endpoints[{i}].labels.{k}: {e}"));
                }
            }
        }
        if usage.files_only && parsed("kubernetes") && self.kubernetes.enabled {
            p.push(
                "kubernetes.enabled: Kubernetes mode runs as `dnsfence agent` with `dnsfence proxy --agent` (the DaemonSet of `dnsfence manifests`); this command reads policies and endpoints from files only"
                    .to_owned(),
            );
        } else if parsed("dns.listen") && parsed("dns.transparent") && parsed("datapath.backend") {
            let needed = match usage.listeners {
                Listeners::Optional => false,
                Listeners::Required => true,
                Listeners::RequiredWithoutDatapath => self.datapath.backend == Backend::None,
            };
            if needed && self.dns.listen.is_empty() && self.dns.transparent.is_none() {
                p.push(if usage.listeners == Listeners::Required {
                    "dns: no listener: set dns.listen (with dns.upstreams) or dns.transparent, or the proxy serves nothing".to_owned()
                } else {
                    "dns: no listener: with datapath.backend: none there is no default transparent listener; set dns.listen (with dns.upstreams) or dns.transparent".to_owned()
                });
            }
        }
        if let (true, Some(dir)) = (usage.reads_policies && parsed("policies"), dir) {
            for (i, policy) in self.policies.iter().enumerate() {
                let path = dir.join(policy);
                if let Err(e) = readable(&path) {
                    p.push(format!(
                        "policies[{i}]: cannot read {}: {e}",
                        path.display()
                    ));
                }
            }
        }
    }
}

/// Whether a policy path can be read: a file opened, a directory listed.
fn readable(path: &Path) -> std::io::Result<()> {
    if std::fs::metadata(path)?.is_dir() {
        std::fs::read_dir(path).map(drop)
    } else {
        std::fs::File::open(path).map(drop)
    }
}

fn show_value(v: &Value) -> String {
    serde_yaml_ng::to_string(v)
        .map(|t| t.trim_end().to_owned())
        .unwrap_or_default()
}

/// Records `e` at `path` unless it is about an unknown key (reported by `unknown_keys`).
fn push_error(path: &str, e: &serde_yaml_ng::Error, problems: &mut Vec<String>) {
    let msg = e.to_string();
    if msg.contains("unknown field") {
        return;
    }
    // Elements of a list name themselves by their index, one line each (see `addresses`).
    for line in msg.lines() {
        if line.starts_with('[') {
            problems.push(format!("{path}{line}"));
        } else {
            problems.push(format!("{path}: {line}"));
        }
    }
}

/// Deserializes each field of a section alone into `T` (whose fields all have defaults),
/// recording the problems, and returns the section with only the fields that parsed.
fn valid_fields<T: serde::de::DeserializeOwned>(
    section: &str,
    map: &serde_yaml_ng::Mapping,
    problems: &mut Vec<String>,
    failed: &mut Vec<String>,
) -> Value {
    let mut kept = serde_yaml_ng::Mapping::new();
    for (k, v) in map {
        let Some(k) = k.as_str() else {
            problems.push(format!("{section}.{}: keys must be strings", show_value(k)));
            continue;
        };
        let mut single = serde_yaml_ng::Mapping::new();
        single.insert(Value::from(k), v.clone());
        match serde_yaml_ng::from_value::<T>(Value::Mapping(single)) {
            Ok(_) => {
                kept.insert(Value::from(k), v.clone());
            }
            Err(e) => {
                push_error(&format!("{section}.{k}"), &e, problems);
                failed.push(format!("{section}.{k}"));
            }
        }
    }
    Value::Mapping(kept)
}

/// Checks the endpoint `endpoints[i]` field by field, recording the problems. An endpoint
/// with any is replaced by an empty one (no addresses, no labels), which no check between
/// endpoints trips on, so that those checks still run on the others with their indices.
fn valid_endpoint(i: usize, item: &Value, problems: &mut Vec<String>) -> Value {
    let placeholder = || {
        let mut m = serde_yaml_ng::Mapping::new();
        m.insert(Value::from("name"), Value::from(""));
        m.insert(Value::from("ips"), Value::Sequence(Vec::new()));
        Value::Mapping(m)
    };
    let Value::Mapping(map) = item else {
        if let Err(e) = serde_yaml_ng::from_value::<EndpointConfig>(item.clone()) {
            push_error(&format!("endpoints[{i}]"), &e, problems);
        }
        return placeholder();
    };
    let before = problems.len();
    let mut bad = false;
    for required in ["name", "ips"] {
        if !map.contains_key(required) {
            problems.push(format!("endpoints[{i}].{required}: missing"));
            bad = true;
        }
    }
    for (k, v) in map {
        let Some(k) = k.as_str() else {
            problems.push(format!(
                "endpoints[{i}].{}: keys must be strings",
                show_value(k)
            ));
            bad = true;
            continue;
        };
        // The field alone, with stand-ins for the required fields it is not.
        let Value::Mapping(mut single) = placeholder() else {
            continue;
        };
        single.insert(Value::from(k), v.clone());
        if let Err(e) = serde_yaml_ng::from_value::<EndpointConfig>(Value::Mapping(single)) {
            push_error(&format!("endpoints[{i}].{k}"), &e, problems);
            bad = true;
        }
    }
    if bad || problems.len() > before {
        placeholder()
    } else {
        item.clone()
    }
}

fn prefixed(origin: &str, problems: Vec<String>) -> Vec<String> {
    problems
        .into_iter()
        .map(|p| format!("{origin}: {p}"))
        .collect()
}

#[cfg(test)]
mod tests;
