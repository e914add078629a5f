//! `dnsfence status`: the agent's and the proxy's health, snapshot versions, endpoints
//! enforced, learned mappings and the kernel sets' element counts.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use dnsfence_agent::config::{NodeConfig as Config, Usage};
use dnsfence_agent::control::{Message, Role, CONTROL_PROTOCOL};
use dnsfence_proxy::API_VERSION;

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The configuration file naming the sockets (defaults otherwise).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(short = 'o', long, value_parser = ["json", "text"], default_value = "text")]
    output: String,
}

fn connect(path: &Path) -> Result<UnixStream> {
    let s =
        UnixStream::connect(path).with_context(|| format!("{} not reachable", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

fn agent_status(path: &Path) -> Result<serde_json::Value> {
    let mut s = connect(path)?;
    let hello = Message::Hello {
        protocol: CONTROL_PROTOCOL,
        role: Role::Cli,
        pid: std::process::id(),
        version: 0,
    };
    writeln!(s, "{}", serde_json::to_string(&hello)?)?;
    writeln!(s, "{}", serde_json::to_string(&Message::StatusRequest {})?)?;
    let mut lines = BufReader::new(&s);
    let mut line = String::new();
    for _ in 0..2 {
        line.clear();
        lines.read_line(&mut line)?;
        match serde_json::from_str::<Message>(line.trim_end()) {
            Ok(Message::Status { status }) => return Ok(status),
            Ok(Message::Error { message }) => bail!("agent: {message}"),
            Ok(_) => {}
            Err(e) => bail!("agent: bad answer: {e}"),
        }
    }
    bail!("agent: no status")
}

fn proxy_status(path: &Path) -> Result<serde_json::Value> {
    let mut s = connect(path)?;
    writeln!(
        s,
        "{}",
        serde_json::json!({"version": API_VERSION, "request": "status"})
    )?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let reply: serde_json::Value = serde_json::from_str(&line).context("bad answer")?;
    if let Some(e) = reply.get("error") {
        bail!("proxy: {e}");
    }
    Ok(reply.get("status").cloned().unwrap_or_default())
}

pub(crate) fn run(args: &StatusArgs) -> Result<ExitCode> {
    let config = match &args.config {
        Some(path) => match crate::config::read(path, Usage::default()) {
            Ok(c) => c,
            Err(code) => return Ok(code),
        },
        None => Config::parse("defaults", "").map_err(|e| anyhow::anyhow!("{:?}", e.problems))?,
    };
    let agent = agent_status(&config.api.agent_socket);
    let proxy = proxy_status(&config.api.socket);
    // `dnsfence run` (or a proxy alone) takes its policy from its own files: no agent to
    // ask, and none missing.
    let agent_needed = !proxy
        .as_ref()
        .is_ok_and(|p| p["follows_agent"] == serde_json::Value::Bool(false));
    let show = |r: &Result<serde_json::Value>| match r {
        Ok(v) => v.clone(),
        Err(e) => serde_json::json!({"error": format!("{e:#}")}),
    };
    let mut out = crate::output::stdout();
    if args.output == "json" {
        writeln!(
            out,
            "{}",
            serde_json::json!({
                "agent": if agent_needed || agent.is_ok() {
                    show(&agent)
                } else {
                    serde_json::json!({"not_used": "the proxy runs on its own files (dnsfence run, or proxy without --agent)"})
                },
                "proxy": show(&proxy),
            })
        )?;
    } else {
        for (name, r) in [("agent", &agent), ("proxy", &proxy)] {
            match r {
                Ok(v) => {
                    writeln!(out, "{name}: up")?;
                    if let Some(map) = v.as_object() {
                        for (k, v) in map {
                            writeln!(out, "  {k}: {v}")?;
                        }
                    }
                }
                Err(_) if name == "agent" && !agent_needed => writeln!(
                    out,
                    "agent: not used (the proxy runs on its own files: dnsfence run, or proxy without --agent)"
                )?,
                Err(e) => writeln!(out, "{name}: DOWN ({e:#})")?,
            }
        }
    }
    out.flush()?;
    // 0 when what is needed answers, 1 when something is down.
    Ok(if (agent.is_ok() || !agent_needed) && proxy.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
