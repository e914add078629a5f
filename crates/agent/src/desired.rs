//! The node's desired state: the configuration and its policy files, merged with what the
//! cluster holds (Kubernetes mode), compiled into a policy set, and resolved for each
//! endpoint into the inventory the datapath enforces. Pure data in, data out: reading the
//! files is the only I/O, and programming the kernel is [`crate::node`]'s.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use dnsfence_config::ConfigError;
use dnsfence_datapath::ruleset::fqdn_set_name;
use dnsfence_datapath::Backend;
use dnsfence_k8s::watch::ClusterView;
use dnsfence_policy::{
    EndpointPolicy, Inventory, PolicyDoc, PolicyLoader, PolicySet, ResolvedEndpoint,
};
use tracing::warn;

use crate::config::{NodeConfig, Usage};
use crate::control::{SelectorSets, SnapshotData};
use crate::files::{self, FilesError};

/// Why a desired state could not be built; the running one stays in force.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    /// The configuration file is invalid (every problem, one per line).
    #[error("the configuration is invalid:\n{0}")]
    Config(#[from] ConfigError),
    /// The configuration file cannot be read.
    #[error("cannot read {}", .path.display())]
    ConfigFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A policy file cannot be read.
    #[error(transparent)]
    Files(#[from] FilesError),
    /// Some policy is invalid.
    #[error(transparent)]
    Policies(#[from] InvalidPolicies),
}

/// Policies that failed validation: every problem, one per line (`FILE:DOC: FIELD: ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid policies:\n{}", .problems.join("\n"))]
pub struct InvalidPolicies {
    /// One line per problem.
    pub problems: Vec<String>,
}

/// Compiles policy documents; warnings are logged. Selectors `previous` also has keep
/// their ids, so learned IPs stay with them.
pub fn compile(
    docs: &[PolicyDoc],
    previous: &PolicySet,
    audit: bool,
) -> Result<PolicySet, InvalidPolicies> {
    let mut loader = PolicyLoader::new();
    for d in docs {
        loader.add(&d.file, &d.text);
    }
    let (set, diags) = loader.finish_after(previous);
    let set = set.with_global_audit(audit);
    let problems: Vec<String> = diags
        .iter()
        .filter(|d| d.is_error())
        .map(ToString::to_string)
        .collect();
    for d in diags.iter().filter(|d| !d.is_error()) {
        warn!("{d}");
    }
    if problems.is_empty() {
        Ok(set)
    } else {
        Err(InvalidPolicies { problems })
    }
}

/// Reads and checks the configuration file at `path` for a command that uses it as
/// `usage` says.
pub fn read_config(path: &Path, usage: Usage) -> Result<NodeConfig, DesiredError> {
    let text = std::fs::read_to_string(path).map_err(|source| DesiredError::ConfigFile {
        path: path.to_owned(),
        source,
    })?;
    Ok(NodeConfig::parse_file(path, &text, usage)?)
}

/// The files' part of the desired state, as last read and validated (at start and on
/// SIGHUP only: a cluster change never re-reads them, so a bad edit of a mounted
/// ConfigMap cannot hold back the cluster's updates).
#[derive(Debug, Clone)]
pub struct Files {
    /// The configuration.
    pub config: NodeConfig,
    /// Its policy documents.
    pub docs: Vec<PolicyDoc>,
    /// (kind, namespace, name) of their policies.
    ids: BTreeSet<(String, Option<String>, String)>,
}

impl Files {
    /// Reads the configuration at `path` and its policy files, and validates them; also
    /// returns their compiled policies (selectors of `previous` keep their ids).
    pub fn read(
        path: &Path,
        usage: Usage,
        previous: &PolicySet,
    ) -> Result<(Self, PolicySet), DesiredError> {
        let config = read_config(path, usage)?;
        Self::of(path, config, previous)
    }

    /// As [`Files::read`], with the configuration already read.
    pub fn of(
        path: &Path,
        config: NodeConfig,
        previous: &PolicySet,
    ) -> Result<(Self, PolicySet), DesiredError> {
        let docs = files::policy_docs(path, &config)?;
        let set = compile(&docs, previous, config.audit)?;
        let ids = set
            .policies()
            .iter()
            .map(|p| {
                (
                    p.id.kind.as_str().to_owned(),
                    p.id.namespace.clone(),
                    p.id.name.clone(),
                )
            })
            .collect();
        Ok((Self { config, docs, ids }, set))
    }

    /// The files plus what the cluster view holds: the configuration in force (with the
    /// cluster's endpoints and node addresses) and every policy document. A policy file
    /// wins over an object of the same kind and name (so an object cannot make the whole
    /// set invalid), an endpoint of the file over a pod of the same name or address.
    pub fn merge(&self, cluster: Option<&ClusterView>) -> (NodeConfig, Vec<PolicyDoc>) {
        let mut config = self.config.clone();
        let mut docs = self.docs.clone();
        let Some(view) = cluster else {
            return (config, docs);
        };
        for doc in &view.docs {
            if doc_id(doc).is_some_and(|id| self.ids.contains(&id)) {
                warn!(object = %doc.file, "also defined in a policy file; the file's version is in force");
                continue;
            }
            docs.push(doc.clone());
        }
        let named: BTreeSet<(String, String)> = config
            .endpoints
            .iter()
            .map(|e| (e.namespace.clone(), e.name.clone()))
            .collect();
        let ips: BTreeSet<IpAddr> = config
            .endpoints
            .iter()
            .flat_map(|e| e.ips.iter().copied())
            .collect();
        config.endpoints.extend(
            view.endpoints
                .iter()
                .filter(|e| {
                    !named.contains(&(e.namespace.clone(), e.name.clone()))
                        && !e.ips.iter().any(|ip| ips.contains(ip))
                })
                .cloned(),
        );
        for ip in &view.host_ips {
            if !config.host_ips.contains(ip) {
                config.host_ips.push(*ip);
            }
        }
        (config, docs)
    }
}

/// (kind, namespace, name) of a cluster policy document (JSON).
fn doc_id(doc: &PolicyDoc) -> Option<(String, Option<String>, String)> {
    let v: serde_json::Value = serde_json::from_str(&doc.text).ok()?;
    Some((
        v["kind"].as_str()?.to_owned(),
        v["metadata"]["namespace"].as_str().map(str::to_owned),
        v["metadata"]["name"].as_str()?.to_owned(),
    ))
}

/// The configuration's endpoints with their resolved policies; remote ones (another
/// node's, the host) are peers only and get none: their own node enforces them.
pub fn inventory(config: &NodeConfig, policies: &PolicySet) -> Inventory {
    let endpoints = config
        .endpoints
        .iter()
        .map(|e| {
            let endpoint = e.endpoint();
            ResolvedEndpoint {
                name: e.name.clone(),
                policy: if e.remote {
                    EndpointPolicy::default()
                } else {
                    policies.resolve(&endpoint)
                },
                endpoint,
                ips: e.ips.clone(),
            }
        })
        .collect();
    Inventory {
        endpoints,
        host_ips: config.host_ips.clone(),
    }
}

/// What the agent sends its proxies for `set`, compiled from `docs`, under `config`.
pub fn snapshot_data(config: &NodeConfig, docs: Vec<PolicyDoc>, set: &PolicySet) -> SnapshotData {
    SnapshotData {
        policies: docs,
        endpoints: config.endpoints.clone(),
        host_ips: config.host_ips.clone(),
        selectors: set
            .fqdn_selectors()
            .iter()
            .map(|(_, p)| SelectorSets {
                pattern: p.as_str().to_owned(),
                v4: fqdn_set_name(p, false),
                v6: fqdn_set_name(p, true),
            })
            .collect(),
        table: (config.datapath.backend == Backend::Nftables)
            .then(|| config.datapath.table.clone()),
        audit: config.audit,
    }
}

/// A compiled desired state: the configuration in force, its policies, the inventory the
/// datapath enforces, and what proxies are sent.
#[derive(Debug, Clone)]
pub struct Desired {
    /// The configuration with the cluster's endpoints and node addresses.
    pub config: NodeConfig,
    /// The compiled policies.
    pub set: Arc<PolicySet>,
    /// Every endpoint with its policy.
    pub inventory: Arc<Inventory>,
    /// The snapshot for proxies.
    pub data: SnapshotData,
}

impl Desired {
    /// Compiles `files` merged with `cluster`; selectors of `previous` keep their ids.
    pub fn build(
        files: &Files,
        cluster: Option<&ClusterView>,
        previous: &PolicySet,
    ) -> Result<Self, DesiredError> {
        let (config, docs) = files.merge(cluster);
        let set = compile(&docs, previous, config.audit)?;
        let inventory = inventory(&config, &set);
        let data = snapshot_data(&config, docs, &set);
        Ok(Self {
            config,
            set: Arc::new(set),
            inventory: Arc::new(inventory),
            data,
        })
    }
}
