//! `dnsfence run --config FILE`: agent, proxy and nftables datapath in one process (the
//! embedded default). The proxy's sink is the datapath, so an answer with new IPs is
//! released only once they are in the kernel. `dnsfence cleanup` removes the table.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use dnsfence_agent::config::{Listeners, NodeConfig as Config, Usage};
use dnsfence_datapath::{Backend, Datapath, Inventory, Kernel, Options, RealKernel, Worker};
use dnsfence_policy::{Endpoint, Labels, PolicySet};
use dnsfence_proxy::config::TransparentConfig;
use dnsfence_proxy::{IpSink, NoopSink};
use tracing::{info, warn};

use crate::proxy::{build_snapshot, read_config, serve};

/// `dnsfence run`: it reads the policy files and knows nothing of Kubernetes; with the
/// nftables datapath the transparent listener has a default, without it a listener must be
/// configured.
const RUN: Usage = Usage {
    reads_policies: true,
    listeners: Listeners::RequiredWithoutDatapath,
    files_only: true,
};

/// The transparent port `run` uses when the configuration names none.
pub(crate) const DEFAULT_TRANSPARENT_PORT: u16 = 15053;

/// Enforcing means intercepting pods' DNS: give the transparent listener its default port
/// when the configuration names none.
pub(crate) fn default_transparent(config: &mut Config) {
    if config.dns.transparent.is_none() {
        config.dns.transparent = Some(TransparentConfig::on_port(DEFAULT_TRANSPARENT_PORT));
    }
}

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

/// The datapath options a configuration asks for.
pub(crate) fn options(config: &Config) -> Options {
    let transparent = config.dns.transparent.as_ref();
    config.datapath.options(
        transparent.map(|t| t.port),
        config.dns.never_learn.clone(),
        transparent
            .map(|t| t.client_packets_per_second)
            .filter(|r| *r > 0),
    )
}

/// The configuration's endpoints with their resolved policies (none for remote ones).
pub(crate) fn inventory(config: &Config, policies: &PolicySet) -> Result<Inventory> {
    let endpoints = config
        .endpoints
        .iter()
        .map(|e| {
            let labels = Labels::new(e.labels.iter().map(|(k, v)| (k.as_str(), v.clone())))?;
            Ok((
                e.name.clone(),
                Endpoint::new(e.namespace.clone(), labels),
                e.ips.clone(),
            ))
        })
        .collect::<Result<Vec<_>, dnsfence_policy::LabelKeyError>>()?;
    let mut inventory = Inventory::resolve(policies, endpoints, config.host_ips.clone());
    // Remote endpoints are peers only: their own node enforces them.
    for (state, e) in inventory.endpoints.iter_mut().zip(&config.endpoints) {
        if e.remote {
            state.policy = dnsfence_policy::EndpointPolicy::default();
        }
    }
    Ok(inventory)
}

pub(crate) fn run(args: &RunArgs) -> Result<ExitCode> {
    let mut config = match read_config(&args.config, RUN) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if config.datapath.backend == Backend::Nftables {
        default_transparent(&mut config);
    }
    let snapshot = match build_snapshot(&args.config, &config, &PolicySet::default()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dnsfence: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    crate::init_logging(&config.log);
    let (sink, worker): (Arc<dyn IpSink>, Option<Worker>) = match config.datapath.backend {
        Backend::None => {
            warn!("datapath.backend is none: DNS is filtered, but no packet is");
            (Arc::new(NoopSink), None)
        }
        Backend::Nftables => {
            let datapath = match Datapath::new(Box::new(RealKernel::default()), options(&config)) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("dnsfence: cannot start the nftables datapath: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let worker = Worker::spawn(datapath).context("starting the datapath thread")?;
            let inventory = inventory(&config, snapshot.policies())?;
            let done = worker
                .reconcile(snapshot.policies().clone(), Arc::new(inventory))
                .context("programming the datapath")?;
            info!(
                table = %config.datapath.table,
                enforced = done.enforced,
                selectors = done.selectors,
                "datapath ready"
            );
            (
                Arc::new(crate::sink::DatapathSink(worker.clone())),
                Some(worker),
            )
        }
    };
    let runtime = crate::runtime()?;
    let code = runtime.block_on(serve(
        args.config.clone(),
        config,
        snapshot,
        sink,
        worker,
        None,
    ))?;
    // The table stays: enforced endpoints keep failing closed until `dnsfence cleanup`.
    info!("stopped; the nftables table stays in force (dnsfence cleanup removes it)");
    Ok(code)
}

pub(crate) fn cleanup(args: &CleanupArgs) -> Result<ExitCode> {
    let config = match &args.config {
        Some(path) => match read_config(path, Usage::default()) {
            Ok(c) => c,
            Err(code) => return Ok(code),
        },
        None => Config::parse("defaults", "").map_err(|e| anyhow::anyhow!("{:?}", e.problems))?,
    };
    let mut kernel = RealKernel::default();
    kernel.check().context("cleanup")?;
    Datapath::cleanup(&mut kernel, &options(&config)).context("cleanup")?;
    let mut out = crate::output::stdout();
    writeln!(
        out,
        "removed table inet {} and its routing rule",
        config.datapath.table
    )?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
