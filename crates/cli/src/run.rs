//! `dnsfence run --config FILE`: the agent and the proxy composed in one process (the
//! embedded default), over an in-process link: the same code as `dnsfence agent` and
//! `dnsfence proxy --agent`, sharing one datapath, so an answer with new IPs is released
//! only once they are in the kernel. `dnsfence cleanup` removes the table.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use dnsfence_agent::config::{Listeners, NodeConfig, Usage};
use dnsfence_agent::desired::Files;
use dnsfence_agent::link::Connector;
use dnsfence_agent::node::AgentNode;
use dnsfence_agent::proxy_node::{ProxyNode, Source};
use dnsfence_datapath::{Backend, Datapath, Kernel, RealKernel};
use dnsfence_policy::PolicySet;
use dnsfence_proxy::flows::{FlowLog, FlowMetrics};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

/// `dnsfence run`: it reads the policy files and knows nothing of Kubernetes; with the
/// nftables datapath the transparent listener has a default, without it a listener must be
/// configured.
const RUN: Usage = Usage {
    reads_policies: true,
    listeners: Listeners::RequiredWithoutDatapath,
    files_only: true,
};

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The configuration file (YAML).
    #[arg(long, short = 'c')]
    config: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct CleanupArgs {
    /// The configuration file naming the table and routing rule (default names otherwise).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
}

pub(crate) fn run(args: &RunArgs) -> Result<ExitCode> {
    let mut config = match crate::config::read(&args.config, RUN) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if config.datapath.backend == Backend::Nftables {
        config.default_transparent();
    }
    // Validate before touching the kernel.
    let (files, set) = match Files::of(&args.config, config.clone(), &PolicySet::default()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("dnsfence: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    crate::init_logging(&config.log);
    if config.datapath.backend == Backend::None {
        warn!("datapath.backend is none: DNS is filtered, but no packet is");
    }
    let runtime = crate::runtime()?;
    let code = runtime.block_on(async move {
        let flows = FlowLog::new(&config.flows, FlowMetrics::default());
        let agent = match AgentNode::start(&args.config, RUN, files, set, flows.clone(), None) {
            Ok(a) => a.reporting_once_in_force(),
            Err(e) => {
                eprintln!("dnsfence: {e}");
                return Ok(ExitCode::from(2));
            }
        };
        // The proxy starts from the agent's first snapshot, compiled once.
        let (version, data, compiled) = agent
            .published()
            .context("the agent has no snapshot to start from")?;
        let snapshot = dnsfence_agent::follow::compile_data(
            &data,
            Some(compiled),
            &config,
            &PolicySet::default(),
        )
        .context("the agent's first snapshot")?;
        let mut registry = Registry::with_prefix("dnsfence");
        if let Some(worker) = agent.worker() {
            worker.stats.register(&mut registry);
        }
        let (connector, listener) = Connector::local();
        let source = Source::Agent {
            connector,
            version,
            worker: agent.worker().cloned(),
            embedded: true,
        };
        let proxy =
            ProxyNode::start(&args.config, config, snapshot, source, flows, registry).await?;
        let mut controls = crate::signals::controls(2)?.into_iter();
        let (Some(agent_controls), Some(proxy_controls)) = (controls.next(), controls.next())
        else {
            anyhow::bail!("the process's controls");
        };
        let agent = tokio::spawn(agent.serve(listener, agent_controls));
        proxy.serve(proxy_controls).await;
        agent.await??;
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    })?;
    // The table stays: enforced endpoints keep failing closed until `dnsfence cleanup`.
    info!("stopped; the nftables table stays in force (dnsfence cleanup removes it)");
    Ok(code)
}

pub(crate) fn cleanup(args: &CleanupArgs) -> Result<ExitCode> {
    let config = match &args.config {
        Some(path) => match crate::config::read(path, Usage::default()) {
            Ok(c) => c,
            Err(code) => return Ok(code),
        },
        None => {
            NodeConfig::parse("defaults", "").map_err(|e| anyhow::anyhow!("{:?}", e.problems))?
        }
    };
    let mut kernel = RealKernel::default();
    kernel.check().context("cleanup")?;
    Datapath::cleanup(&mut kernel, &dnsfence_agent::datapath_options(&config))
        .context("cleanup")?;
    let mut out = crate::output::stdout();
    writeln!(
        out,
        "removed table inet {} and its routing rule",
        config.datapath.table
    )?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
