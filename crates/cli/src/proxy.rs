//! `dnsfence proxy --config FILE`: the DNS proxy as a process of its own. Alone it reads
//! the policies itself and enforces nothing in the kernel; with `--agent` it follows
//! `dnsfence agent` and writes learned IPs into the agent's table ([`crate::follow`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use dnsfence_agent::config::{Listeners, NodeConfig as Config, Usage};
use dnsfence_datapath::{Backend, Worker};
use dnsfence_dns::{EndpointSpec, Snapshot};
use dnsfence_policy::{EndpointConfig, Labels, PolicyDoc, PolicyLoader, PolicySet};
use dnsfence_proxy::{IpSink, NoopSink, Proxy, ProxyMetrics};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::files;

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

/// What a proxy following the agent needs besides the proxy.
pub(crate) struct Follower {
    worker: Option<Worker>,
    version: u64,
    reports: tokio::sync::mpsc::Receiver<Vec<dnsfence_fqdncache::Change>>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
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

/// A reload (SIGHUP) of `run` or `proxy`: only the policies are taken from the new file.
const RELOAD: Usage = Usage {
    reads_policies: true,
    listeners: Listeners::Optional,
    files_only: false,
};

/// Reads and checks the configuration for a command that uses it as `usage` says; problems
/// are printed and mapped to exit code 2.
pub(crate) fn read_config(path: &Path, usage: Usage) -> Result<Config, ExitCode> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dnsfence: cannot read {}: {e}", path.display());
            return Err(ExitCode::from(2));
        }
    };
    let config = Config::parse_file(path, &text, usage).map_err(|e| {
        for p in &e.problems {
            eprintln!("{p}");
        }
        ExitCode::from(2)
    })?;
    // The filter syntax is tracing's: checked here, where it is known, not when logging
    // starts (which could only ignore it).
    if let Some(level) = &config.log.level {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
            eprintln!(
                "{}: log.level: {level:?} is not a log filter (such as info or info,dnsfence_proxy=debug): {e}",
                path.display()
            );
            return Err(ExitCode::from(2));
        }
    }
    Ok(config)
}

/// Policy paths are relative to the configuration file's directory.
pub(crate) fn policy_paths(config_path: &Path, config: &Config) -> Vec<PathBuf> {
    let base = config_path.parent().unwrap_or(Path::new("."));
    config.policies.iter().map(|p| base.join(p)).collect()
}

/// Reads the configuration's policy files.
pub(crate) fn policy_docs(config_path: &Path, config: &Config) -> Result<Vec<PolicyDoc>> {
    files::expand(&policy_paths(config_path, config))?
        .iter()
        .map(|f| {
            Ok(PolicyDoc {
                file: f.display().to_string(),
                text: files::read(f)?,
            })
        })
        .collect()
}

/// Compiles policy documents; `Err` lists every problem. Selectors `previous` also has
/// keep their ids.
pub(crate) fn compile(docs: &[PolicyDoc], previous: &PolicySet, audit: bool) -> Result<PolicySet> {
    let mut loader = PolicyLoader::new();
    for d in docs {
        loader.add(&d.file, &d.text);
    }
    let (set, diags) = loader.finish_after(previous);
    let set = set.with_global_audit(audit);
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
    Ok(set)
}

/// The proxy's snapshot of `set` for `endpoints`.
pub(crate) fn snapshot_of(
    set: PolicySet,
    endpoints: &[EndpointConfig],
    host_ips: &[IpAddr],
    config: &Config,
) -> Result<Snapshot> {
    let dns = &config.dns;
    let endpoints: Vec<EndpointSpec> = endpoints
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
    Ok(
        Snapshot::new(Arc::new(set), &endpoints, host_ips.to_vec(), dns.verdict())
            .with_search_suffixes(&dns.search_suffixes)
            .with_inside(Arc::new(dns.inside(&config.cluster_cidrs))),
    )
}

/// Builds the snapshot from the configuration's files; `Err` lists policy problems (the
/// caller keeps what runs). Selectors `previous` also has keep their ids.
pub(crate) fn build_snapshot(
    config_path: &Path,
    config: &Config,
    previous: &PolicySet,
) -> Result<Snapshot> {
    let docs = policy_docs(config_path, config)?;
    let set = compile(&docs, previous, config.audit)?;
    snapshot_of(set, &config.endpoints, &config.host_ips, config)
}

pub(crate) fn run(args: &ProxyArgs) -> Result<ExitCode> {
    let usage = if args.agent { FOLLOWING } else { PROXY };
    let config = match read_config(&args.config, usage) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if args.agent {
        return run_following(args, config);
    }
    let snapshot = match build_snapshot(&args.config, &config, &PolicySet::default()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dnsfence: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    crate::init_logging(&config.log);
    let runtime = crate::runtime()?;
    runtime.block_on(serve(
        args.config.clone(),
        config,
        snapshot,
        Arc::new(NoopSink),
        None,
        None,
    ))
}

fn run_following(args: &ProxyArgs, mut config: Config) -> Result<ExitCode> {
    crate::run::default_transparent(&mut config);
    crate::init_logging(&config.log);
    let (version, snapshot) = match crate::follow::initial(&args.config, &config) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("dnsfence: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let (inner, worker): (Arc<dyn IpSink>, Option<Worker>) = match config.datapath.backend {
        Backend::None => (Arc::new(NoopSink), None),
        Backend::Nftables => {
            let datapath = dnsfence_datapath::Datapath::elements_only(
                Box::new(dnsfence_datapath::RealKernel::default()),
                crate::run::options(&config),
            );
            let worker = Worker::spawn(datapath).context("starting the datapath thread")?;
            worker.use_selectors(snapshot.policies().clone());
            (
                Arc::new(crate::sink::DatapathSink(worker.clone())),
                Some(worker),
            )
        }
    };
    let (tx, reports) = tokio::sync::mpsc::channel(1024);
    let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sink = Arc::new(crate::follow::ReportingSink {
        inner,
        tx,
        dropped: dropped.clone(),
    });
    let runtime = crate::runtime()?;
    runtime.block_on(serve(
        args.config.clone(),
        config,
        snapshot,
        sink,
        None,
        Some(Follower {
            worker,
            version,
            reports,
            dropped,
        }),
    ))
}

/// Serves DNS, metrics and the API until SIGTERM or SIGINT, then drains the queries in
/// flight (at most `dns.drain_timeout`). SIGHUP reloads policies (and reconciles
/// `datapath` first, when there is one, so new selector sets exist before learned IPs move
/// to them), except when following the agent, which owns the policies.
pub(crate) async fn serve(
    config_path: PathBuf,
    config: Config,
    snapshot: Snapshot,
    sink: Arc<dyn IpSink>,
    datapath: Option<Worker>,
    follower: Option<Follower>,
) -> Result<ExitCode> {
    let flow_metrics = dnsfence_proxy::flows::FlowMetrics::default();
    let flows = dnsfence_proxy::flows::FlowLog::new(&config.flows, flow_metrics.clone());
    let mut registry = Registry::with_prefix("dnsfence");
    let metrics = ProxyMetrics::register(&mut registry);
    if let Some(worker) = datapath
        .as_ref()
        .or_else(|| follower.as_ref().and_then(|f| f.worker.as_ref()))
    {
        worker.stats.register(&mut registry);
    }
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(
            dnsfence_proxy::bind_metrics(addr)
                .with_context(|| format!("binding metrics.listen {addr}"))?,
        ),
        None => None,
    };
    flow_metrics.register(&mut registry);
    let mut proxy = Proxy::start(config.dns.clone(), snapshot, sink, metrics, flows.clone())
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
    // Stopped when serving ends, which releases what its callback holds.
    let _reader = if let (Some(worker), Some(group)) =
        (&datapath, crate::run::options(&config).log_group)
    {
        let shared = proxy.shared().clone();
        let names = worker.names();
        let on_refusal = Box::new(move |r: &dnsfence_datapath::drops::Refusal| {
            shared.flows.push(drop_flow(r, &shared))
        });
        match dnsfence_datapath::drops::spawn_reader(
            group,
            names,
            worker.stats.drops.clone(),
            on_refusal,
        ) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(group, error = %e, "cannot read refused packets: they are refused but not logged");
                None
            }
        }
    } else {
        None
    };
    let following = follower.is_some();
    proxy
        .shared()
        .follows_agent
        .store(following, std::sync::atomic::Ordering::Relaxed);
    let config = Arc::new(config);
    if let Some(f) = follower {
        crate::follow::restore(proxy.shared(), &config).await;
        tokio::spawn(crate::follow::journal(
            proxy.shared().clone(),
            config.clone(),
        ));
        tokio::spawn(crate::follow::follow(
            proxy.shared().clone(),
            f.worker,
            config.clone(),
            f.version,
            f.reports,
            f.dropped,
        ));
    }
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if following {
                    info!("SIGHUP ignored: the agent owns the policies (reload the agent)");
                } else {
                    reload(&config_path, &proxy, datapath.as_ref()).await;
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("stopping: no new queries; draining those in flight");
    let left = proxy.drain(config.dns.drain_timeout).await;
    if left > 0 {
        warn!(left, "queries still in flight after dns.drain_timeout");
    }
    if following {
        crate::follow::save_learned(proxy.shared(), &config);
    }
    info!("stopped");
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
    let built = tokio::task::spawn_blocking(move || match read_config(&path, RELOAD) {
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

/// A refused packet as a flow event; with `shared`, the names recently learned for its
/// destination.
pub(crate) fn drop_flow(
    r: &dnsfence_datapath::drops::Refusal,
    shared: &dnsfence_proxy::Shared,
) -> dnsfence_proxy::flows::Flow {
    let mut flow = dnsfence_proxy::flows::Flow::new(
        "drop",
        if r.reason
            .is_some_and(dnsfence_datapath::DropReason::is_audit)
        {
            "audit"
        } else {
            "denied"
        },
        shared.source(r.packet.src),
    );
    let dst = r.packet.dst;
    let names = shared.with_cache(|c| {
        c.iter()
            .filter(|(_, ips, _)| ips.iter().any(|l| l.ip == dst))
            .map(|(n, _, _)| n.to_owned())
            .take(5)
            .collect()
    });
    flow.destination = Some(dnsfence_proxy::flows::Destination {
        ip: Some(dst),
        port: r.packet.dst_port,
        protocol: Some(dnsfence_datapath::drops::protocol_name(r.packet.protocol)),
        names,
    });
    flow.drop_reason_desc = Some(
        r.reason
            .map_or("other", dnsfence_datapath::DropReason::as_str)
            .to_owned(),
    );
    flow
}
