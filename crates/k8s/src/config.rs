//! The Kubernetes front end's section of the configuration file (`kubernetes`): plain
//! serde data with its defaults, and the watchers' [`Settings`] it builds.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::watch::Settings;

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

/// Why the watchers cannot be set up from a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// No node name anywhere.
    #[error("kubernetes.node_name is not set, nor NODE_NAME, nor a host name")]
    NoNodeName,
}

impl KubernetesConfig {
    /// The watchers' settings. The node is `node_name`, else `node_env` (the `NODE_NAME`
    /// environment variable), else `hostname`; Events are reported as `pod_name` (the
    /// `POD_NAME` environment variable), else as `dnsfence-agent-<node>`.
    pub fn settings(
        &self,
        node_env: Option<String>,
        hostname: Option<String>,
        pod_name: Option<String>,
    ) -> Result<Settings, SettingsError> {
        let node = self
            .node_name
            .clone()
            .or(node_env.filter(|n| !n.is_empty()))
            .or(hostname.filter(|n| !n.is_empty()))
            .ok_or(SettingsError::NoNodeName)?;
        Ok(Settings {
            instance: pod_name.or_else(|| Some(format!("dnsfence-agent-{node}"))),
            node,
            cluster_name: self.cluster_name.clone(),
            watch_cilium_policies: self.watch_cilium_policies,
            crd_poll: Duration::from_secs(30),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]
    use super::*;

    #[test]
    fn the_node_comes_from_the_config_then_the_environment_then_the_host_name() {
        let c = KubernetesConfig::default();
        let s = |n: Option<&str>, h: Option<&str>| {
            c.settings(n.map(str::to_owned), h.map(str::to_owned), None)
        };
        assert_eq!(s(Some("env"), Some("host")).unwrap().node, "env");
        assert_eq!(s(Some(""), Some("host")).unwrap().node, "host");
        assert!(matches!(s(None, None), Err(SettingsError::NoNodeName)));
        let named = KubernetesConfig {
            node_name: Some("n1".to_owned()),
            ..KubernetesConfig::default()
        };
        let settings = named
            .settings(Some("env".to_owned()), None, Some("pod-1".to_owned()))
            .unwrap();
        assert_eq!(settings.node, "n1");
        assert_eq!(settings.instance.as_deref(), Some("pod-1"));
        assert_eq!(
            s(None, Some("h")).unwrap().instance.as_deref(),
            Some("dnsfence-agent-h")
        );
    }
}
