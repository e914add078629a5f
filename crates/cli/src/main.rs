//! `dnsfence`: the command-line interface. Thin: each subcommand lives in its own module,
//! parses its arguments, calls the libraries and prints; it must not hold node logic (that
//! is `dnsfence-agent`'s).
//!
//! Exit codes: 0 success, 1 a negative answer (invalid policy, denied query), 2 usage or
//! input error.

mod agent;
mod config;
mod demo;
mod fqdn;
mod manifests;
mod observe;
mod output;
mod policy;
mod proxy;
mod run;
mod signals;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// dnsfence: FQDN-based egress firewall for containers.
#[derive(Debug, Parser)]
#[command(name = "dnsfence", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate policies and ask what they allow.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Run the DNS proxy alone (no kernel enforcement).
    Proxy(proxy::ProxyArgs),
    /// Build a network-namespace lab, enforce an example policy in it, and show what pods
    /// can and cannot reach (root). Exit 0 only if every observation matches the policy.
    Demo(demo::DemoArgs),
    /// Run the agent alone: policies, endpoints and the nftables table, serving snapshots
    /// to `dnsfence proxy --agent` processes.
    Agent(agent::AgentArgs),
    /// Run agent, DNS proxy and nftables datapath in one process (the embedded default).
    Run(run::RunArgs),
    /// Remove dnsfence's nftables table and routing rule (enforced endpoints regain egress).
    Cleanup(run::CleanupArgs),
    /// Health of the agent and the proxy: snapshot versions, endpoints, learned
    /// mappings, kernel set sizes. Exit 0 when both answer, 1 otherwise.
    Status(status::StatusArgs),
    /// Flow events: DNS decisions and refused packets, with endpoint, name, rule and
    /// reason; `--follow` streams them.
    Observe(observe::ObserveArgs),
    /// Inspect learned name-to-IP mappings.
    #[command(subcommand)]
    Fqdn(fqdn::FqdnCommand),
    /// Kubernetes install manifests (default) or the CRDs alone, as YAML for
    /// `kubectl apply -f -`.
    Manifests(manifests::ManifestsArgs),
}

/// Logs to stderr, as text or JSON lines; `RUST_LOG` filters, else `log.level` (default
/// `info`).
fn init_logging(log: &dnsfence_agent::config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(log.level.as_deref().unwrap_or("info"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match log.format {
        dnsfence_agent::config::LogFormat::Json => builder.json().try_init(),
        dnsfence_agent::config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// One thread serves every socket: on small nodes this costs less CPU per query than a
/// multi-threaded scheduler (see BENCHMARKS.md); blocking work goes to `spawn_blocking`.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Policy(cmd) => policy::run(cmd),
        Command::Proxy(args) => proxy::run(&args),
        Command::Fqdn(cmd) => fqdn::run(&cmd),
        Command::Run(args) => run::run(&args),
        Command::Agent(args) => agent::run(&args),
        Command::Status(args) => status::run(&args),
        Command::Observe(args) => observe::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Cleanup(args) => run::cleanup(&args),
        Command::Manifests(args) => manifests::run(&args),
    };
    match result {
        Ok(code) => code,
        // The reader of the output went away (`| head`): nothing more to say.
        Err(e) if output::is_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dnsfence: {e:#}");
            ExitCode::from(2)
        }
    }
}
