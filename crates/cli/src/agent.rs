//! `dnsfence agent --config FILE`: the agent alone ([`dnsfence_agent::node`]), serving
//! snapshots to `dnsfence proxy --agent` processes on the agent socket; with
//! `kubernetes.enabled` it also takes pods, namespaces and policy objects from the API
//! server.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use dnsfence_agent::config::{Listeners, Usage};
use dnsfence_agent::desired::Files;
use dnsfence_agent::link::Listener;
use dnsfence_agent::node::{AgentNode, ServeError};
use dnsfence_policy::PolicySet;
use dnsfence_proxy::flows::{FlowLog, FlowMetrics};
use tracing::{error, info};

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// The configuration file (YAML), shared with `dnsfence proxy --agent`.
    #[arg(long, short = 'c')]
    config: PathBuf,
}

/// `dnsfence agent`: it reads the policy files (and, in Kubernetes mode, the cluster's
/// objects) and serves no DNS.
const AGENT: Usage = Usage {
    reads_policies: true,
    listeners: Listeners::Optional,
    files_only: false,
};

pub(crate) fn run(args: &AgentArgs) -> Result<ExitCode> {
    let config = match crate::config::read(&args.config, AGENT) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    // Validate before touching the kernel.
    let (files, set) = match Files::of(&args.config, config, &PolicySet::default()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("dnsfence: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    crate::init_logging(&files.config.log);
    let runtime = crate::runtime()?;
    runtime.block_on(async move {
        let config = files.config.clone();
        let flows = FlowLog::new(&config.flows, FlowMetrics::default());
        let k8s_metrics = dnsfence_k8s::watch::Metrics::default();
        let cluster = if config.kubernetes.enabled {
            match dnsfence_agent::kube::watch(&config, k8s_metrics.clone()).await {
                Ok(rx) => Some(rx),
                Err(e) => {
                    eprintln!("dnsfence: {e}");
                    return Ok(ExitCode::from(2));
                }
            }
        } else {
            None
        };
        let kubernetes = cluster.is_some();
        let node = match AgentNode::start(&args.config, AGENT, files, set, flows.clone(), cluster) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("dnsfence: {e}");
                return Ok(ExitCode::from(2));
            }
        };
        if let Some(addr) = config.metrics.agent_listen {
            let mut registry = prometheus_client::registry::Registry::with_prefix("dnsfence");
            node.register(&mut registry);
            flows.metrics.register(&mut registry);
            if kubernetes {
                k8s_metrics.register(&mut registry);
            }
            // SO_REUSEPORT: during a rolling update the old and the new agent both listen.
            let listener = dnsfence_proxy::bind_metrics(addr)
                .with_context(|| format!("binding metrics.agent_listen {addr}"))?;
            info!(%addr, "agent metrics listening");
            let registry = Arc::new(registry);
            tokio::spawn(async move {
                if let Err(e) = dnsfence_proxy::serve_metrics(listener, registry).await {
                    error!(error = %e, "agent metrics listener stopped");
                }
            });
        }
        let controls = crate::signals::controls(1)?
            .pop()
            .context("the process's controls")?;
        match node
            .serve(Listener::Unix(config.api.agent_socket.clone()), controls)
            .await
        {
            Ok(()) => Ok(ExitCode::SUCCESS),
            // The DaemonSet restarts the agent; the table stays in force meanwhile.
            Err(ServeError::KubernetesStopped) => Ok(ExitCode::from(1)),
            Err(e) => Err(e.into()),
        }
    })
}
