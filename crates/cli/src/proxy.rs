//! `dnsfence proxy --config FILE`: the DNS proxy as a process of its own
//! ([`dnsfence_agent::proxy_node`]). Alone it reads the policies itself and enforces
//! nothing in the kernel; with `--agent` it follows `dnsfence agent` and writes learned IPs
//! into the agent's table.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use dnsfence_agent::config::{Listeners, Usage};
use dnsfence_agent::link::Connector;
use dnsfence_agent::proxy_node::{snapshot_of_files, ProxyNode, Source};
use dnsfence_datapath::{Backend, Datapath, RealKernel, Worker};
use dnsfence_policy::PolicySet;
use dnsfence_proxy::flows::{FlowLog, FlowMetrics};
use prometheus_client::registry::Registry;

#[derive(Debug, Args)]
pub(crate) struct ProxyArgs {
    /// The configuration file (YAML).
    #[arg(long, short = 'c')]
    config: PathBuf,
    /// Follow `dnsfence agent` (on `api.agent_socket`): take its snapshots and write
    /// learned IPs into its nftables table; keep going when it is down.
    #[arg(long)]
    agent: bool,
}

/// `dnsfence proxy` alone: it reads the policy files, serves DNS on the configured listeners
/// only, and knows nothing of Kubernetes.
const PROXY: Usage = Usage {
    reads_policies: true,
    listeners: Listeners::Required,
    files_only: true,
};

/// `dnsfence proxy --agent`: its policies come from the agent (or its saved snapshot; the
/// policy files only when neither is there), and the transparent listener has a default.
const FOLLOWING: Usage = Usage {
    reads_policies: false,
    listeners: Listeners::Optional,
    files_only: false,
};

pub(crate) fn run(args: &ProxyArgs) -> Result<ExitCode> {
    let usage = if args.agent { FOLLOWING } else { PROXY };
    let mut config = match crate::config::read(&args.config, usage) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if args.agent {
        config.default_transparent();
        crate::init_logging(&config.log);
    }
    let started = if args.agent {
        dnsfence_agent::follow::initial(&args.config, &config)
    } else {
        snapshot_of_files(&args.config, &config, &PolicySet::default()).map(|s| (0, s))
    };
    let (version, snapshot) = match started {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dnsfence: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    if !args.agent {
        crate::init_logging(&config.log);
    }
    let source = if args.agent {
        // Only set elements: the agent owns the table.
        let worker = match config.datapath.backend {
            Backend::None => None,
            Backend::Nftables => Some(
                Worker::spawn(Datapath::elements_only(
                    Box::new(RealKernel::default()),
                    dnsfence_agent::datapath_options(&config),
                ))
                .context("starting the datapath thread")?,
            ),
        };
        Source::Agent {
            connector: Connector::Unix(config.api.agent_socket.clone()),
            version,
            worker,
            embedded: false,
        }
    } else {
        Source::Files
    };
    let runtime = crate::runtime()?;
    runtime.block_on(async move {
        let flows = FlowLog::new(&config.flows, FlowMetrics::default());
        let registry = Registry::with_prefix("dnsfence");
        let node =
            ProxyNode::start(&args.config, config, snapshot, source, flows, registry).await?;
        let controls = crate::signals::controls(1)?
            .pop()
            .context("the process's controls")?;
        node.serve(controls).await;
        Ok(ExitCode::SUCCESS)
    })
}
