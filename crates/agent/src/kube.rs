//! Kubernetes mode: the agent's desired state also comes from the API server. This
//! connects the client and starts the watchers of `dnsfence-k8s`, whose cluster view the
//! agent reads ([`crate::node::AgentNode::start`]).

use tokio::sync::watch;
use tracing::info;

use crate::config::NodeConfig;
use crate::node::View;

/// Why Kubernetes mode cannot start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No client (no kubeconfig, no in-cluster service account).
    #[error("kubernetes.enabled, but no Kubernetes client: {0}")]
    Client(String),
    /// The watchers' settings are incomplete.
    #[error(transparent)]
    Settings(#[from] dnsfence_k8s::config::SettingsError),
}

/// Connects to the API server and starts watching it (on the current runtime); the
/// receiver holds the cluster view once every watch has listed. The node is
/// `kubernetes.node_name`, else `NODE_NAME`, else the host name.
pub async fn watch(
    config: &NodeConfig,
    metrics: dnsfence_k8s::watch::Metrics,
) -> Result<watch::Receiver<View>, KubeError> {
    let client = dnsfence_k8s::watch::connect(config.kubernetes.kubeconfig.as_deref())
        .await
        .map_err(KubeError::Client)?;
    let settings = config.kubernetes.settings(
        std::env::var("NODE_NAME").ok(),
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_owned()),
        std::env::var("POD_NAME").ok(),
    )?;
    info!(node = %settings.node, "watching the Kubernetes API");
    let (tx, rx) = watch::channel::<View>(None);
    tokio::spawn(dnsfence_k8s::watch::run(client, settings, tx, metrics));
    Ok(rx)
}
