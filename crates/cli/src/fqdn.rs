//! `dnsfence fqdn list`: the learned name → IP mappings, through the API socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use dnsfence_proxy::{FqdnEntry, API_VERSION};

#[derive(Debug, Subcommand)]
pub(crate) enum FqdnCommand {
    /// List learned names with their IPs, remaining TTL and selectors.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// The API socket (default: the configuration's `api.socket`, else
    /// /run/dnsfence/dnsfence.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The configuration file naming the socket.
    #[arg(short = 'c', long)]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    output: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

pub(crate) fn run(cmd: &FqdnCommand) -> Result<ExitCode> {
    let FqdnCommand::List(args) = cmd;
    let socket = match (&args.socket, &args.config) {
        (Some(s), _) => s.clone(),
        (None, Some(path)) => {
            match crate::config::read(path, dnsfence_agent::config::Usage::default()) {
                Ok(c) => c.api.socket,
                Err(code) => return Ok(code),
            }
        }
        (None, None) => PathBuf::from("/run/dnsfence/dnsfence.sock"),
    };
    let mut stream = UnixStream::connect(&socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    writeln!(
        stream,
        "{}",
        serde_json::json!({"version": API_VERSION, "request": "fqdn_list"})
    )?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let reply: serde_json::Value =
        serde_json::from_str(&line).context("bad answer from the API")?;
    if let Some(err) = reply.get("error") {
        bail!("API error: {err}");
    }
    let entries: Vec<FqdnEntry> =
        serde_json::from_value(reply.get("fqdns").cloned().unwrap_or_default())?;
    let mut out = crate::output::stdout();
    match args.output {
        Format::Json => writeln!(out, "{}", serde_json::to_string(&entries)?)?,
        Format::Text => {
            writeln!(out, "{:<40} {:<40} {:>7}  SELECTORS", "NAME", "IP", "TTL")?;
            for e in &entries {
                for ip in &e.ips {
                    writeln!(
                        out,
                        "{:<40} {:<40} {:>6}s  {}",
                        e.name,
                        ip.ip,
                        ip.ttl,
                        e.selectors.join(",")
                    )?;
                }
            }
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
