//! `dnsfence proxy --config FILE`: the DNS proxy alone, with a sink that enforces nothing
//! (the nftables datapath comes with `dnsfence run`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use dnsfence_datapath::Worker;
use dnsfence_dns::{EndpointSpec, Rcode, Snapshot, UnknownClients, VerdictConfig};
use dnsfence_policy::{Labels, PolicySet};
use dnsfence_proxy::config::{Config, DenyRcode, UnknownClientsConfig};
use dnsfence_proxy::{IpSink, NoopSink, Proxy, ProxyMetrics};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::policy;

#[derive(Debug, Args)]
pub(crate) struct ProxyArgs {
    /// The configuration file (YAML).
    #[arg(long, short = 'c')]
    config: PathBuf,
}

/// Reads and checks the configuration; problems are printed and mapped to exit code 2.
pub(crate) fn read_config(path: &Path) -> Result<Config, ExitCode> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dnsfence: cannot read {}: {e}", path.display());
            return Err(ExitCode::from(2));
        }
    };
    Config::parse(&path.display().to_string(), &text).map_err(|e| {
        for p in &e.problems {
            eprintln!("{p}");
        }
        ExitCode::from(2)
    })
}

/// Policy paths are relative to the configuration file's directory.
pub(crate) fn policy_paths(config_path: &Path, config: &Config) -> Vec<PathBuf> {
    let base = config_path.parent().unwrap_or(Path::new("."));
    config.policies.iter().map(|p| base.join(p)).collect()
}

/// Builds the snapshot; `Err` lists policy problems (the caller keeps what runs).
/// Selectors `previous` also has keep their ids.
pub(crate) fn build_snapshot(
    config_path: &Path,
    config: &Config,
    previous: &PolicySet,
) -> Result<Snapshot> {
    let (set, diags, _) = policy::load_after(&policy_paths(config_path, config), previous)?;
    let errors: Vec<String> = diags
        .iter()
        .filter(|d| d.is_error())
        .map(ToString::to_string)
        .collect();
    for d in diags.iter().filter(|d| !d.is_error()) {
        warn!("{d}");
    }
    if !errors.is_empty() {
        anyhow::bail!("invalid policies:\n{}", errors.join("\n"));
    }
    let endpoints: Vec<EndpointSpec> = config
        .endpoints
        .iter()
        .map(|e| {
            Ok(EndpointSpec {
                name: e.name.clone(),
                namespace: e.namespace.clone(),
                labels: Labels::new(e.labels.iter().map(|(k, v)| (k.as_str(), v.clone())))?,
                ips: e.ips.clone(),
            })
        })
        .collect::<Result<_, dnsfence_policy::LabelKeyError>>()?;
    let verdict = VerdictConfig {
        deny_rcode: match config.dns.deny_rcode {
            DenyRcode::Refused => Rcode::Refused,
            DenyRcode::Nxdomain => Rcode::NxDomain,
        },
        unknown_clients: match config.dns.unknown_clients {
            UnknownClientsConfig::Refuse => UnknownClients::Refuse,
            UnknownClientsConfig::Forward => UnknownClients::Forward,
        },
    };
    Ok(Snapshot::new(
        Arc::new(set),
        &endpoints,
        config.host_ips.clone(),
        verdict,
    ))
}

pub(crate) fn run(args: &ProxyArgs) -> Result<ExitCode> {
    let config = match read_config(&args.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let snapshot = match build_snapshot(&args.config, &config, &PolicySet::default()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dnsfence: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    crate::init_logging();
    // One thread serves every socket: on small nodes this costs less CPU per query than a
    // multi-threaded scheduler (see BENCHMARKS.md); reloads build snapshots off this thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(
        args.config.clone(),
        config,
        snapshot,
        Arc::new(NoopSink),
        None,
    ))
}

/// Serves DNS, metrics and the API until SIGTERM or SIGINT; SIGHUP reloads policies (and
/// reconciles `datapath` first, when there is one, so new selector sets exist before
/// learned IPs move to them).
pub(crate) async fn serve(
    config_path: PathBuf,
    config: Config,
    snapshot: Snapshot,
    sink: Arc<dyn IpSink>,
    datapath: Option<Worker>,
) -> Result<ExitCode> {
    let mut registry = Registry::with_prefix("dnsfence");
    let metrics = ProxyMetrics::register(&mut registry);
    if let Some(worker) = &datapath {
        worker.stats.register(&mut registry);
    }
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding metrics.listen {addr}"))?,
        ),
        None => None,
    };
    let proxy = Proxy::start(config.dns.clone(), snapshot, sink, metrics)
        .await
        .context("binding the DNS listeners")?;
    if let Some(listener) = metrics_listener {
        let registry = Arc::new(registry);
        info!(addr = ?listener.local_addr().ok(), "metrics listening");
        tokio::spawn(async move {
            if let Err(e) = dnsfence_proxy::serve_metrics(listener, registry).await {
                error!(error = %e, "metrics listener stopped");
            }
        });
    }
    info!(udp = ?proxy.udp_addrs(), tcp = ?proxy.tcp_addrs(), "DNS proxy listening");
    let shared = proxy.shared().clone();
    let socket = config.api.socket.clone();
    tokio::spawn(async move {
        if let Err(e) = dnsfence_proxy::serve_api(shared, &socket).await {
            error!(socket = %socket.display(), error = %e, "API socket unavailable");
        }
    });
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&config_path, &proxy, datapath.as_ref()).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("stopping");
    Ok(ExitCode::SUCCESS)
}

/// SIGHUP: re-read the configuration's policies; a set that fails validation is rejected
/// and the running one stays in force.
async fn reload(config_path: &Path, proxy: &Proxy, datapath: Option<&Worker>) {
    let path = config_path.to_owned();
    let previous = proxy.shared().snapshot().policies().clone();
    let datapath = datapath.cloned();
    // Reading files, compiling policies and programming the kernel are blocking work:
    // keep them off the DNS thread.
    let built = tokio::task::spawn_blocking(move || match read_config(&path) {
        Ok(config) => Some(
            build_snapshot(&path, &config, &previous).and_then(|snapshot| {
                if let Some(worker) = &datapath {
                    let inventory = crate::run::inventory(&config, snapshot.policies())?;
                    worker
                        .reconcile(snapshot.policies().clone(), Arc::new(inventory))
                        .context("programming the datapath")?;
                }
                Ok(snapshot)
            }),
        ),
        Err(_) => None,
    })
    .await
    .ok()
    .flatten();
    let Some(built) = built else {
        error!("reload rejected: the configuration is invalid; the running policy stays in force");
        return;
    };
    match built {
        Ok(s) => {
            proxy.shared().set_snapshot(s).await;
            info!("policies reloaded");
        }
        Err(e) => error!("reload rejected, the running policy stays in force: {e:#}"),
    }
}
