//! The configuration file: one YAML document whose sections belong to the components they
//! configure (`dns` to the proxy, `datapath` to the datapath, `kubernetes` to the
//! Kubernetes front end), and whose top level (policies, endpoints, sockets, metrics,
//! flows, logs) is the agent's. It is read as a whole before anything starts: every
//! unknown key, every value that fails to parse and every value out of range or
//! inconsistent with another is reported at once, one line each, so an operator fixes a
//! file in one round. Checks that depend on the command reading the file (policy files it
//! reads, listeners it needs) come with [`NodeConfig::parse_file`] and a [`Usage`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use dnsfence_config::{ConfigError, Problems};
use dnsfence_datapath::{Backend, DatapathConfig};
use dnsfence_k8s::config::KubernetesConfig;
use dnsfence_policy::EndpointConfig;
use dnsfence_proxy::config::DnsConfig;
use serde::Deserialize;
use serde_yaml_ng::Value;

/// The whole file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Policy files or directories (default: none).
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    /// The standalone endpoint inventory (default: empty).
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// The node's own addresses, for `toEntities: host` (default: none).
    #[serde(default, deserialize_with = "dnsfence_config::de::ip_addresses")]
    pub host_ips: Vec<IpAddr>,
    /// The cluster's pod and service ranges (default: none). An answer's address inside
    /// them is learned only from the cluster's own service names
    /// (`NAME.NAMESPACE.svc.<dns.cluster_domain>`), so an allowed external name cannot
    /// point a pod at another pod or a Service.
    #[serde(default, deserialize_with = "dnsfence_config::de::cidrs")]
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
    pub flows: dnsfence_proxy::flows::FlowSettings,
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
    #[serde(default, deserialize_with = "dnsfence_config::de::socket_address")]
    pub listen: Option<SocketAddr>,
    /// The same for `dnsfence agent` (default: off): datapath, refused packets, its
    /// snapshot version.
    #[serde(default, deserialize_with = "dnsfence_config::de::socket_address")]
    pub agent_listen: Option<SocketAddr>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/dnsfence")
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/dnsfence/dnsfence.sock")
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
/// (see [`NodeConfig::parse_file`]). The default checks the file alone.
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

/// What stands in for an endpoint with a problem: no name, no address, so that the checks
/// between endpoints run on the others with their indices.
fn endpoint_placeholder() -> Value {
    let mut m = serde_yaml_ng::Mapping::new();
    m.insert(Value::from("name"), Value::from(""));
    m.insert(Value::from("ips"), Value::Sequence(Vec::new()));
    Value::Mapping(m)
}

/// The transparent port commands that enforce use when the configuration names none.
pub const DEFAULT_TRANSPARENT_PORT: u16 = 15053;

impl NodeConfig {
    /// Enforcing means intercepting pods' DNS: gives the transparent listener its default
    /// port ([`DEFAULT_TRANSPARENT_PORT`]) when the configuration names none.
    pub fn default_transparent(&mut self) {
        if self.dns.transparent.is_none() {
            self.dns.transparent = Some(dnsfence_proxy::config::TransparentConfig::on_port(
                DEFAULT_TRANSPARENT_PORT,
            ));
        }
    }

    /// Parses and checks a configuration file's text. `origin` names it in messages. Checks
    /// that depend on the command reading it are left to [`NodeConfig::parse_file`].
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
        let prefixed = |lines: Vec<String>| ConfigError {
            problems: lines
                .into_iter()
                .map(|l| format!("{origin}: {l}"))
                .collect(),
        };
        let value: Value = serde_yaml_ng::from_str(text)
            .map_err(|e| prefixed(vec![format!("invalid YAML: {e}")]))?;
        if !matches!(value, Value::Null | Value::Mapping(_)) {
            return Err(prefixed(vec![
                "expected a mapping at the top level".to_owned()
            ]));
        }
        let (config, mut problems) =
            dnsfence_config::read::<Self>(value, &[("endpoints", endpoint_placeholder())]);
        let Some(config) = config else {
            return Err(prefixed(problems.lines));
        };
        config.check(dir, usage, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(prefixed(problems.lines))
        }
    }

    /// The checks between values and of ranges, the sections' own first. Values that did
    /// not parse (their defaults stand in) are left out of the checks between values.
    fn check(&self, dir: Option<&Path>, usage: Usage, p: &mut Problems) {
        self.dns.check(p);
        self.datapath.check(p);
        if self.flows.ring_size == 0 {
            p.push("flows.ring_size", "must be at least 1");
        }
        let mut seen = BTreeMap::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            for ip in &ep.ips {
                if let Some(other) = seen.insert(*ip, i) {
                    p.push(
                        &format!("endpoints[{i}].ips"),
                        format_args!("{ip} is already used by endpoints[{other}]"),
                    );
                }
            }
        }
        if usage.files_only && p.parsed("kubernetes") && self.kubernetes.enabled {
            p.push(
                "kubernetes.enabled",
                "Kubernetes mode runs as `dnsfence agent` with `dnsfence proxy --agent` (the DaemonSet of `dnsfence manifests`); this command reads policies and endpoints from files only",
            );
        } else if p.parsed("dns.listen")
            && p.parsed("dns.transparent")
            && p.parsed("datapath.backend")
        {
            let needed = match usage.listeners {
                Listeners::Optional => false,
                Listeners::Required => true,
                Listeners::RequiredWithoutDatapath => self.datapath.backend == Backend::None,
            };
            if needed && self.dns.listen.is_empty() && self.dns.transparent.is_none() {
                p.push("dns", if usage.listeners == Listeners::Required {
                    "no listener: set dns.listen (with dns.upstreams) or dns.transparent, or the proxy serves nothing"
                } else {
                    "no listener: with datapath.backend: none there is no default transparent listener; set dns.listen (with dns.upstreams) or dns.transparent"
                });
            }
        }
        if let (true, Some(dir)) = (usage.reads_policies && p.parsed("policies"), dir) {
            for (i, policy) in self.policies.iter().enumerate() {
                let path = dir.join(policy);
                if let Err(e) = readable(&path) {
                    p.push(
                        &format!("policies[{i}]"),
                        format_args!("cannot read {}: {e}", path.display()),
                    );
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

#[cfg(test)]
mod tests;
