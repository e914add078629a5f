//! The install manifests, as typed `k8s-openapi` objects: what `dnsfence manifests`
//! prints and `deploy/kubernetes/install.yaml` holds.
//!
//! One [`Install`] is everything a cluster needs, in the order `kubectl apply` wants it:
//!
//! - the [`Namespace`] (default `dnsfence-system`);
//! - the two CRDs ([`crate::crd::crds`]);
//! - the [`ServiceAccount`] `dnsfence`, a [`ClusterRole`] with the least verbs the agent
//!   needs (read pods, namespaces and policies; write Events about invalid policies; read
//!   Cilium's policies and the CRDs that say whether they exist only with
//!   [`Options::watch_cilium_policies`]) and its [`ClusterRoleBinding`];
//! - the [`ConfigMap`] `dnsfence-config` holding `config.yaml`, the dnsfence
//!   configuration both containers read;
//! - the [`DaemonSet`] `dnsfence`: one pod per node on the host network with two
//!   containers, `agent` (`dnsfence agent`) and `proxy` (`dnsfence proxy --agent`), with the
//!   capabilities `NET_ADMIN` and `NET_RAW` instead of privileged, host directories for the
//!   API sockets and the state, `/healthz` probes, and a rolling update that starts the new
//!   pod before the old one stops (`maxSurge: 1`, `maxUnavailable: 0`): the DNS and metrics
//!   listeners use `SO_REUSEPORT`, so a node always has a proxy answering.
//!
//! The containers declare no `ports`: on the host network every container port is also a
//! host port, and the scheduler would refuse the surge pod of a rolling update because its
//! ports are taken by the pod it replaces.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource, HTTPGetAction,
    HostPathVolumeSource, Namespace, ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SecurityContext, ServiceAccount, Toleration, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde_yaml_ng::{Mapping, Value};

use crate::crd::{self, ClusterEgressPolicy, EgressPolicy};

/// The name of the ServiceAccount, ClusterRole, ClusterRoleBinding and DaemonSet.
pub const NAME: &str = "dnsfence";
/// The default namespace.
pub const DEFAULT_NAMESPACE: &str = "dnsfence-system";
/// The image repository; the default tag is this crate's version.
pub const IMAGE_REPOSITORY: &str = "ghcr.io/dnsfence/dnsfence";
/// The ConfigMap holding the configuration.
pub const CONFIG_MAP: &str = "dnsfence-config";
/// The ConfigMap's key holding the configuration file.
pub const CONFIG_KEY: &str = "config.yaml";
/// Where the containers see the ConfigMap.
pub const CONFIG_DIR: &str = "/etc/dnsfence";
/// The configuration file in the containers.
pub const CONFIG_PATH: &str = "/etc/dnsfence/config.yaml";
/// The host directory (and container path) of the API sockets.
pub const RUN_DIR: &str = "/run/dnsfence";
/// The host directory (and container path) of the state (`state_dir`).
pub const STATE_DIR: &str = "/var/lib/dnsfence";
/// The proxy's `/metrics` and `/healthz` port (`metrics.listen`), on the node's addresses.
pub const PROXY_METRICS_PORT: u16 = 9962;
/// The agent's `/metrics` and `/healthz` port (`metrics.agent_listen`).
pub const AGENT_METRICS_PORT: u16 = 9963;
/// The label every object carries and the DaemonSet selects its pods by.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// The pod annotation carrying a checksum of `config.yaml`, so that a configuration change
/// rolls the DaemonSet.
pub const CONFIG_CHECKSUM_ANNOTATION: &str = "dnsfence.io/config-checksum";

/// The default image: [`IMAGE_REPOSITORY`] tagged with this crate's version.
pub fn default_image() -> String {
    format!("{IMAGE_REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
}

/// What `dnsfence manifests` can change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The namespace of the ServiceAccount, ConfigMap and DaemonSet (default
    /// [`DEFAULT_NAMESPACE`]).
    pub namespace: String,
    /// The container image (default [`default_image`]).
    pub image: String,
    /// `log.level` of both containers (default `info`).
    pub log_level: String,
    /// The node-local DNS cache's address (usually `169.254.20.10`), when the cluster runs
    /// one (default: none). It is declared as a remote endpoint labelled like kube-dns, so
    /// the usual "DNS to kube-dns" `toEndpoints` rule also allows DNS to the cache.
    pub node_local_dns: Option<IpAddr>,
    /// Also enforce Cilium's policy kinds (`kubernetes.watch_cilium_policies`), with the
    /// RBAC to read them (default false).
    pub watch_cilium_policies: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            image: default_image(),
            log_level: "info".to_owned(),
            node_local_dns: None,
            watch_cilium_policies: false,
        }
    }
}

/// Every object of an installation.
#[derive(Debug, Clone, PartialEq)]
pub struct Install {
    /// The namespace.
    pub namespace: Namespace,
    /// The CRDs.
    pub crds: Vec<CustomResourceDefinition>,
    /// The agent's identity.
    pub service_account: ServiceAccount,
    /// What the agent may do.
    pub cluster_role: ClusterRole,
    /// Grants the role to the ServiceAccount.
    pub cluster_role_binding: ClusterRoleBinding,
    /// The configuration.
    pub config_map: ConfigMap,
    /// The agent and proxy on every node.
    pub daemon_set: DaemonSet,
}

impl Install {
    /// Every object for `options`.
    pub fn new(options: &Options) -> Result<Self, serde_yaml_ng::Error> {
        let config = config_yaml(options)?;
        Ok(Self {
            namespace: namespace(options),
            crds: crd::crds(),
            service_account: service_account(options),
            cluster_role: cluster_role(options),
            cluster_role_binding: cluster_role_binding(options),
            daemon_set: daemon_set(options, &config),
            config_map: config_map(options, config),
        })
    }

    /// The objects as one multi-document YAML stream, in apply order.
    pub fn to_yaml(&self) -> Result<String, serde_yaml_ng::Error> {
        let mut out = String::new();
        push_document(&mut out, &self.namespace)?;
        for crd in &self.crds {
            push_document(&mut out, crd)?;
        }
        push_document(&mut out, &self.service_account)?;
        push_document(&mut out, &self.cluster_role)?;
        push_document(&mut out, &self.cluster_role_binding)?;
        push_document(&mut out, &self.config_map)?;
        push_document(&mut out, &self.daemon_set)?;
        Ok(out)
    }
}

/// The install manifests for `options` as multi-document YAML (`dnsfence manifests install`).
pub fn install_yaml(options: &Options) -> Result<String, serde_yaml_ng::Error> {
    Install::new(options)?.to_yaml()
}

/// The CRDs alone as multi-document YAML (`dnsfence manifests crds`).
pub fn crds_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for crd in crd::crds() {
        push_document(&mut out, &crd)?;
    }
    Ok(out)
}

/// Appends `object` as one YAML document, `---` first.
fn push_document<T: Serialize>(out: &mut String, object: &T) -> Result<(), serde_yaml_ng::Error> {
    out.push_str("---\n");
    out.push_str(&serde_yaml_ng::to_string(object)?);
    Ok(())
}

/// The labels of every object.
fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([(NAME_LABEL.to_owned(), NAME.to_owned())])
}

fn cluster_meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        labels: Some(labels()),
        ..ObjectMeta::default()
    }
}

fn namespaced_meta(name: &str, options: &Options) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(options.namespace.clone()),
        ..cluster_meta(name)
    }
}

/// The namespace everything namespaced goes into.
pub fn namespace(options: &Options) -> Namespace {
    Namespace {
        metadata: cluster_meta(&options.namespace),
        ..Namespace::default()
    }
}

/// The ServiceAccount `dnsfence`.
pub fn service_account(options: &Options) -> ServiceAccount {
    ServiceAccount {
        metadata: namespaced_meta(NAME, options),
        ..ServiceAccount::default()
    }
}

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(resources.iter().map(|&r| r.to_owned()).collect()),
        verbs: verbs.iter().map(|&v| v.to_owned()).collect(),
        ..PolicyRule::default()
    }
}

/// The ClusterRole `dnsfence`: read pods, namespaces and dnsfence policies; create and
/// patch Events (both API groups); with [`Options::watch_cilium_policies`] also read
/// Cilium's policy kinds and the CRDs (to see whether those kinds exist).
pub fn cluster_role(options: &Options) -> ClusterRole {
    const READ: &[&str] = &["get", "list", "watch"];
    const EVENTS: &[&str] = &["create", "patch"];
    let mut rules = vec![
        rule("", &["pods", "namespaces", "services"], READ),
        rule(
            crd::GROUP,
            &[
                &<EgressPolicy as kube::Resource>::plural(&()),
                &<ClusterEgressPolicy as kube::Resource>::plural(&()),
            ],
            READ,
        ),
        rule("events.k8s.io", &["events"], EVENTS),
        rule("", &["events"], EVENTS),
    ];
    if options.watch_cilium_policies {
        rules.push(rule(
            "cilium.io",
            &["ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"],
            READ,
        ));
        rules.push(rule(
            "apiextensions.k8s.io",
            &["customresourcedefinitions"],
            READ,
        ));
    }
    ClusterRole {
        metadata: cluster_meta(NAME),
        rules: Some(rules),
        ..ClusterRole::default()
    }
}

/// Binds the ClusterRole to the ServiceAccount.
pub fn cluster_role_binding(options: &Options) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: cluster_meta(NAME),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "ClusterRole".to_owned(),
            name: NAME.to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: NAME.to_owned(),
            namespace: Some(options.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

/// A YAML mapping with its keys in the given order.
fn mapping<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::Mapping(
        entries
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect::<Mapping>(),
    )
}

/// The dnsfence configuration file (`config.yaml`) both containers read: Kubernetes mode,
/// the API sockets and state under the host directories, metrics and health on every node
/// address, JSON logs, and with [`Options::node_local_dns`] the node-local DNS cache as a
/// remote endpoint labelled like kube-dns.
pub fn config_yaml(options: &Options) -> Result<String, serde_yaml_ng::Error> {
    let mut config = mapping([
        (
            "kubernetes",
            mapping([
                ("enabled", Value::from(true)),
                (
                    "watch_cilium_policies",
                    Value::from(options.watch_cilium_policies),
                ),
            ]),
        ),
        (
            "api",
            mapping([
                ("socket", Value::from(format!("{RUN_DIR}/dnsfence.sock"))),
                ("agent_socket", Value::from(format!("{RUN_DIR}/agent.sock"))),
            ]),
        ),
        (
            "metrics",
            mapping([
                (
                    "listen",
                    Value::from(format!("0.0.0.0:{PROXY_METRICS_PORT}")),
                ),
                (
                    "agent_listen",
                    Value::from(format!("0.0.0.0:{AGENT_METRICS_PORT}")),
                ),
            ]),
        ),
        ("state_dir", Value::from(STATE_DIR)),
        (
            "log",
            mapping([
                ("level", Value::from(options.log_level.as_str())),
                ("format", Value::from("json")),
            ]),
        ),
    ]);
    if let (Some(ip), Value::Mapping(map)) = (options.node_local_dns, &mut config) {
        let endpoint = mapping([
            ("name", Value::from("node-local-dns")),
            ("namespace", Value::from("kube-system")),
            ("labels", mapping([("k8s-app", Value::from("kube-dns"))])),
            ("ips", Value::Sequence(vec![Value::from(ip.to_string())])),
            ("remote", Value::from(true)),
        ]);
        map.insert(Value::from("endpoints"), Value::Sequence(vec![endpoint]));
    }
    Ok(format!(
        "# dnsfence configuration from `dnsfence manifests`; every key: \
         examples/configs/standalone.yaml\n{}",
        serde_yaml_ng::to_string(&config)?
    ))
}

/// The ConfigMap `dnsfence-config` with `config` (see [`config_yaml`]) under
/// [`CONFIG_KEY`].
pub fn config_map(options: &Options, config: String) -> ConfigMap {
    ConfigMap {
        metadata: namespaced_meta(CONFIG_MAP, options),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_owned(), config)])),
        ..ConfigMap::default()
    }
}

/// 64-bit FNV-1a: a checksum that is the same on every build and platform.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn quantities(entries: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    entries
        .iter()
        .map(|&(k, v)| (k.to_owned(), Quantity(v.to_owned())))
        .collect()
}

/// A `/healthz` probe on `port` of the node (the pod's address on the host network).
fn healthz(port: u16, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz".to_owned()),
            port: IntOrString::Int(i32::from(port)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(10),
        timeout_seconds: Some(2),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

/// One of the two containers: same image, configuration, environment, mounts and security
/// context; `args`, probe port and resources differ.
fn container(
    name: &str,
    options: &Options,
    args: &[&str],
    health_port: u16,
    cpu_request: &str,
) -> Container {
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    };
    Container {
        name: name.to_owned(),
        image: Some(options.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        args: Some(args.iter().map(|&a| a.to_owned()).collect()),
        env: Some(vec![EnvVar {
            name: "NODE_NAME".to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "spec.nodeName".to_owned(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        volume_mounts: Some(vec![
            mount("config", CONFIG_DIR, true),
            mount("run", RUN_DIR, false),
            mount("state", STATE_DIR, false),
        ]),
        security_context: Some(SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            ..SecurityContext::default()
        }),
        readiness_probe: Some(healthz(health_port, 3)),
        liveness_probe: Some(healthz(health_port, 6)),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", cpu_request), ("memory", "64Mi")])),
            limits: Some(quantities(&[("memory", "256Mi")])),
            ..ResourceRequirements::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    }
}

/// The DaemonSet `dnsfence`; `config` is the ConfigMap's `config.yaml`, whose checksum
/// annotates the pods so that a configuration change rolls them.
pub fn daemon_set(options: &Options, config: &str) -> DaemonSet {
    let host_path = |name: &str, path: &str| Volume {
        name: name.to_owned(),
        host_path: Some(HostPathVolumeSource {
            path: path.to_owned(),
            type_: Some("DirectoryOrCreate".to_owned()),
        }),
        ..Volume::default()
    };
    let pod = PodSpec {
        service_account_name: Some(NAME.to_owned()),
        host_network: Some(true),
        dns_policy: Some("ClusterFirstWithHostNet".to_owned()),
        priority_class_name: Some("system-node-critical".to_owned()),
        termination_grace_period_seconds: Some(30),
        tolerations: Some(vec![Toleration {
            operator: Some("Exists".to_owned()),
            ..Toleration::default()
        }]),
        containers: vec![
            container(
                "agent",
                options,
                &["agent", "--config", CONFIG_PATH],
                AGENT_METRICS_PORT,
                "50m",
            ),
            container(
                "proxy",
                options,
                &["proxy", "--agent", "--config", CONFIG_PATH],
                PROXY_METRICS_PORT,
                "100m",
            ),
        ],
        volumes: Some(vec![
            Volume {
                name: "config".to_owned(),
                config_map: Some(ConfigMapVolumeSource {
                    name: CONFIG_MAP.to_owned(),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            host_path("run", RUN_DIR),
            host_path("state", STATE_DIR),
        ]),
        ..PodSpec::default()
    };
    DaemonSet {
        metadata: namespaced_meta(NAME, options),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_CHECKSUM_ANNOTATION.to_owned(),
                        format!("{:016x}", fnv1a64(config.as_bytes())),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests: a panic is a failure")]
mod tests {
    use super::*;

    fn install(options: &Options) -> Install {
        Install::new(options).unwrap()
    }

    fn rules(role: &ClusterRole) -> Vec<(String, String, Vec<String>)> {
        let mut out = Vec::new();
        for r in role.rules.as_deref().unwrap_or_default() {
            assert!(r.resource_names.is_none() && r.non_resource_urls.is_none());
            for g in r.api_groups.as_deref().unwrap_or_default() {
                for res in r.resources.as_deref().unwrap_or_default() {
                    let mut verbs = r.verbs.clone();
                    verbs.sort();
                    out.push((g.clone(), res.clone(), verbs));
                }
            }
        }
        out.sort();
        out
    }

    fn grants(list: &[(&str, &str, &[&str])]) -> Vec<(String, String, Vec<String>)> {
        let mut out: Vec<_> = list
            .iter()
            .map(|&(g, r, verbs)| {
                let mut verbs: Vec<String> = verbs.iter().map(|&v| v.to_owned()).collect();
                verbs.sort();
                (g.to_owned(), r.to_owned(), verbs)
            })
            .collect();
        out.sort();
        out
    }

    const READ: &[&str] = &["get", "list", "watch"];
    const WRITE_EVENTS: &[&str] = &["create", "patch"];
    const BASE: &[(&str, &str, &[&str])] = &[
        ("", "pods", READ),
        ("", "namespaces", READ),
        ("", "services", READ),
        ("dnsfence.io", "egresspolicies", READ),
        ("dnsfence.io", "clusteregresspolicies", READ),
        ("events.k8s.io", "events", WRITE_EVENTS),
        ("", "events", WRITE_EVENTS),
    ];

    #[test]
    fn rbac_is_the_least_set() {
        let role = cluster_role(&Options::default());
        assert_eq!(rules(&role), grants(BASE));
        let yaml = serde_yaml_ng::to_string(&role).unwrap();
        assert!(!yaml.contains('*'), "{yaml}");
        assert!(!yaml.contains("secrets"), "{yaml}");
        for verb in [
            "update",
            "delete",
            "deletecollection",
            "escalate",
            "bind",
            "impersonate",
        ] {
            assert!(!yaml.contains(verb), "{verb} in {yaml}");
        }
    }

    #[test]
    fn cilium_rbac_only_with_the_flag() {
        let role = serde_yaml_ng::to_string(&cluster_role(&Options::default())).unwrap();
        assert!(!role.contains("cilium"), "{role}");
        assert!(!role.contains("customresourcedefinitions"), "{role}");
        let config = config_yaml(&Options::default()).unwrap();
        assert!(config.contains("watch_cilium_policies: false"), "{config}");
        let options = Options {
            watch_cilium_policies: true,
            ..Options::default()
        };
        let mut expected = BASE.to_vec();
        expected.extend_from_slice(&[
            ("cilium.io", "ciliumnetworkpolicies", READ),
            ("cilium.io", "ciliumclusterwidenetworkpolicies", READ),
            ("apiextensions.k8s.io", "customresourcedefinitions", READ),
        ]);
        assert_eq!(rules(&cluster_role(&options)), grants(&expected));
        let config = config_yaml(&options).unwrap();
        assert!(config.contains("watch_cilium_policies: true"), "{config}");
    }

    #[test]
    fn binding_grants_the_role_to_the_service_account() {
        let i = install(&Options::default());
        assert_eq!(i.cluster_role_binding.role_ref.name, NAME);
        assert_eq!(i.cluster_role.metadata.name.as_deref(), Some(NAME));
        let subjects = i.cluster_role_binding.subjects.unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(
            Some(subjects[0].name.as_str()),
            i.service_account.metadata.name.as_deref()
        );
        assert_eq!(subjects[0].namespace.as_deref(), Some(DEFAULT_NAMESPACE));
    }

    fn pod(ds: &DaemonSet) -> &PodSpec {
        ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn daemon_set_runs_agent_and_proxy_with_capabilities_not_privileged() {
        let i = install(&Options::default());
        let pod = pod(&i.daemon_set);
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
        assert_eq!(pod.service_account_name.as_deref(), Some(NAME));
        assert!(pod.host_pid.is_none() && pod.host_ipc.is_none());
        let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["agent", "proxy"]);
        for c in &pod.containers {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.privileged, Some(false), "{}", c.name);
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            let caps = sc.capabilities.as_ref().unwrap();
            assert_eq!(caps.add.as_deref().unwrap(), ["NET_ADMIN", "NET_RAW"]);
            assert_eq!(caps.drop.as_deref().unwrap(), ["ALL"]);
            // On the host network container ports are host ports: the surge pod of a
            // rolling update could not be scheduled next to the old one.
            assert!(c.ports.is_none(), "{} declares ports", c.name);
            let env = c.env.as_deref().unwrap();
            let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
            let field = node
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap();
            assert_eq!(field.field_path, "spec.nodeName");
            let args = c.args.as_deref().unwrap();
            assert_eq!(args[args.len() - 2..], ["--config", CONFIG_PATH]);
            let resources = c.resources.as_ref().unwrap();
            assert!(resources.requests.as_ref().unwrap().contains_key("cpu"));
            assert!(resources.limits.as_ref().unwrap().contains_key("memory"));
        }
        let port = |c: &Container, probe: &Option<Probe>| {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.path.as_deref(), Some("/healthz"), "{}", c.name);
            get.port.clone()
        };
        let (agent, proxy) = (&pod.containers[0], &pod.containers[1]);
        assert_eq!(agent.args.as_deref().unwrap()[0], "agent");
        assert_eq!(proxy.args.as_deref().unwrap()[..2], ["proxy", "--agent"]);
        for probe in [&agent.readiness_probe, &agent.liveness_probe] {
            assert_eq!(
                port(agent, probe),
                IntOrString::Int(AGENT_METRICS_PORT.into())
            );
        }
        for probe in [&proxy.readiness_probe, &proxy.liveness_probe] {
            assert_eq!(
                port(proxy, probe),
                IntOrString::Int(PROXY_METRICS_PORT.into())
            );
        }
        let strategy = i
            .daemon_set
            .spec
            .as_ref()
            .unwrap()
            .update_strategy
            .as_ref()
            .unwrap();
        let rolling = strategy.rolling_update.as_ref().unwrap();
        assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
        let tolerations = pod.tolerations.as_deref().unwrap();
        assert_eq!(tolerations.len(), 1);
        assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
        assert!(tolerations[0].key.is_none() && tolerations[0].effect.is_none());
    }

    #[test]
    fn volumes_are_the_config_map_and_two_host_directories() {
        let i = install(&Options::default());
        let pod = pod(&i.daemon_set);
        let volumes = pod.volumes.as_deref().unwrap();
        let config = volumes.iter().find(|v| v.name == "config").unwrap();
        assert_eq!(
            config.config_map.as_ref().unwrap().name,
            i.config_map.metadata.name.clone().unwrap()
        );
        let mut host: Vec<(&str, &str)> = volumes
            .iter()
            .filter_map(|v| v.host_path.as_ref())
            .map(|h| (h.path.as_str(), h.type_.as_deref().unwrap()))
            .collect();
        host.sort();
        assert_eq!(
            host,
            [
                ("/run/dnsfence", "DirectoryOrCreate"),
                ("/var/lib/dnsfence", "DirectoryOrCreate")
            ]
        );
        for c in &pod.containers {
            let mounts = c.volume_mounts.as_deref().unwrap();
            for v in volumes {
                assert!(
                    mounts.iter().any(|m| m.name == v.name),
                    "{} lacks {}",
                    c.name,
                    v.name
                );
            }
        }
        assert!(i.config_map.data.as_ref().unwrap().contains_key(CONFIG_KEY));
    }

    fn yaml(options: &Options) -> String {
        install_yaml(options).unwrap()
    }

    #[test]
    fn options_change_namespace_image_and_log_level() {
        let default = install(&Options::default());
        assert_eq!(
            default.namespace.metadata.name.as_deref(),
            Some("dnsfence-system")
        );
        assert_eq!(
            pod(&default.daemon_set).containers[0].image.as_deref(),
            Some(format!("ghcr.io/dnsfence/dnsfence:{}", env!("CARGO_PKG_VERSION")).as_str())
        );
        assert!(default.config_map.data.as_ref().unwrap()[CONFIG_KEY].contains("level: info"));

        let options = Options {
            namespace: "fence".to_owned(),
            image: "registry.example/dnsfence:dev".to_owned(),
            log_level: "debug".to_owned(),
            ..Options::default()
        };
        let i = install(&options);
        assert_eq!(i.namespace.metadata.name.as_deref(), Some("fence"));
        for meta in [
            &i.service_account.metadata,
            &i.config_map.metadata,
            &i.daemon_set.metadata,
        ] {
            assert_eq!(meta.namespace.as_deref(), Some("fence"));
        }
        let subjects = i.cluster_role_binding.subjects.as_deref().unwrap();
        assert_eq!(subjects[0].namespace.as_deref(), Some("fence"));
        for c in &pod(&i.daemon_set).containers {
            assert_eq!(c.image.as_deref(), Some("registry.example/dnsfence:dev"));
        }
        let config = &i.config_map.data.as_ref().unwrap()[CONFIG_KEY];
        assert!(config.contains("level: debug"), "{config}");
        assert!(!yaml(&options).contains("dnsfence-system"));

        // A configuration change changes the pod template, so the DaemonSet rolls.
        let checksum = |i: &Install| {
            i.daemon_set
                .spec
                .as_ref()
                .unwrap()
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap()[CONFIG_CHECKSUM_ANNOTATION]
                .clone()
        };
        assert_ne!(checksum(&default), checksum(&i));
    }

    #[test]
    fn yaml_has_every_object_in_apply_order() {
        let text = yaml(&Options::default());
        let kinds: Vec<String> = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|doc| {
                let v = serde_yaml_ng::Value::deserialize(doc).unwrap();
                v["kind"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "ConfigMap",
                "DaemonSet"
            ]
        );
        assert!(
            text.starts_with("---\napiVersion: v1\nkind: Namespace\n"),
            "{text}"
        );
        let crds = crds_yaml().unwrap();
        assert!(
            text.contains(&crds),
            "install embeds the CRDs as `crds` prints them"
        );
    }

    use serde::Deserialize as _;

    fn parsed_config(options: &Options) -> serde_yaml_ng::Value {
        serde_yaml_ng::from_str(&config_yaml(options).unwrap()).unwrap()
    }

    #[test]
    fn config_has_the_kubernetes_sections() {
        let v = parsed_config(&Options::default());
        assert_eq!(v["kubernetes"]["enabled"], Value::from(true));
        assert_eq!(v["kubernetes"]["watch_cilium_policies"], Value::from(false));
        assert_eq!(
            v["api"]["socket"],
            Value::from("/run/dnsfence/dnsfence.sock")
        );
        assert_eq!(
            v["api"]["agent_socket"],
            Value::from("/run/dnsfence/agent.sock")
        );
        assert_eq!(v["metrics"]["listen"], Value::from("0.0.0.0:9962"));
        assert_eq!(v["metrics"]["agent_listen"], Value::from("0.0.0.0:9963"));
        assert_eq!(v["state_dir"], Value::from("/var/lib/dnsfence"));
        assert_eq!(v["log"]["format"], Value::from("json"));
        assert!(v.get("endpoints").is_none());
    }

    #[test]
    fn node_local_dns_is_a_remote_kube_dns_endpoint() {
        let options = Options {
            node_local_dns: Some("169.254.20.10".parse().unwrap()),
            ..Options::default()
        };
        let v = parsed_config(&options);
        let endpoints = v["endpoints"].as_sequence().unwrap();
        assert_eq!(endpoints.len(), 1);
        let e = &endpoints[0];
        assert_eq!(e["namespace"], Value::from("kube-system"));
        assert_eq!(e["labels"]["k8s-app"], Value::from("kube-dns"));
        assert_eq!(e["ips"][0], Value::from("169.254.20.10"));
        assert_eq!(e["remote"], Value::from(true));
    }
}
