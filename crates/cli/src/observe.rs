//! `dnsfence observe`: flow events (DNS decisions and refused packets) from the API
//! socket of `run`/`proxy` and, when it answers, the agent's socket (refused packets in the
//! two-process form), filtered, as a table or JSON lines.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use dnsfence_agent::config::{NodeConfig as Config, Usage};
use dnsfence_agent::control::{Message, Role, CONTROL_PROTOCOL};
use dnsfence_policy::{FoldedName, NamePattern};
use dnsfence_proxy::API_VERSION;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    Dns,
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub(crate) struct ObserveArgs {
    /// The configuration file naming the sockets (defaults otherwise).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// The API socket of `run` or `proxy` (overrides the configuration).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Keep printing new events.
    #[arg(long, short = 'f')]
    follow: bool,
    /// How many past events.
    #[arg(long, default_value_t = 20)]
    last: usize,
    /// Only this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only this pod.
    #[arg(long)]
    pod: Option<String>,
    /// Only this verdict.
    #[arg(
        long,
        value_parser = [
            "allowed", "unfiltered", "denied", "audit", "malformed", "fairness", "timeout",
            "unreachable",
        ]
    )]
    verdict: Option<String>,
    /// Only query names (or names of refused destinations) matching this pattern
    /// (`matchPattern` syntax: `*.example.com`, `**.example.com`).
    #[arg(long)]
    name: Option<String>,
    /// Only DNS decisions or only refused packets.
    #[arg(long = "type", value_enum)]
    kind: Option<Kind>,
    /// Output.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

struct Filter {
    namespace: Option<String>,
    pod: Option<String>,
    verdict: Option<String>,
    name: Option<NamePattern>,
    kind: Option<Kind>,
}

impl Filter {
    fn keeps(&self, f: &Value) -> bool {
        let s = |v: &Value| v.as_str().map(str::to_owned);
        if let Some(ns) = &self.namespace {
            if s(&f["source"]["namespace"]).as_deref() != Some(ns) {
                return false;
            }
        }
        if let Some(pod) = &self.pod {
            if s(&f["source"]["pod_name"]).as_deref() != Some(pod) {
                return false;
            }
        }
        if let Some(v) = &self.verdict {
            if s(&f["verdict"]).as_deref() != Some(v) {
                return false;
            }
        }
        if let Some(k) = self.kind {
            let want = if k == Kind::Dns { "dns" } else { "drop" };
            if f["type"] != want {
                return false;
            }
        }
        if let Some(p) = &self.name {
            let mut names: Vec<String> = Vec::new();
            if let Some(q) = s(&f["dns"]["query"]) {
                names.push(q);
            }
            if let Some(list) = f["destination"]["names"].as_array() {
                names.extend(list.iter().filter_map(|n| n.as_str().map(str::to_owned)));
            }
            if !names
                .iter()
                .any(|n| FoldedName::new(n.as_bytes()).is_ok_and(|folded| p.matches(&folded)))
            {
                return false;
            }
        }
        true
    }
}

fn row(f: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let who = match (
        f["source"]["namespace"].as_str(),
        f["source"]["pod_name"].as_str(),
    ) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => s(&f["source"]["ip"]),
    };
    let what = if f["type"] == "dns" {
        let ips: Vec<String> = f["dns"]["ips"]
            .as_array()
            .map(|a| a.iter().map(&s).collect())
            .unwrap_or_default();
        format!(
            "{} {} {}{}",
            f["dns"]["qtypes"][0].as_str().unwrap_or(""),
            s(&f["dns"]["query"]),
            f["dns"]["rcode"].as_str().unwrap_or(""),
            if ips.is_empty() {
                String::new()
            } else {
                format!(" {}", ips.join(","))
            }
        )
    } else {
        let names: Vec<String> = f["destination"]["names"]
            .as_array()
            .map(|a| a.iter().map(&s).collect())
            .unwrap_or_default();
        format!(
            "{} {}:{}{}",
            s(&f["destination"]["protocol"]),
            s(&f["destination"]["ip"]),
            f["destination"]["port"]
                .as_u64()
                .map_or("-".into(), |p| p.to_string()),
            if names.is_empty() {
                String::new()
            } else {
                format!(" ({})", names.join(","))
            }
        )
    };
    let why = f["policy"]
        .as_str()
        .or(f["drop_reason_desc"].as_str())
        .unwrap_or("");
    format!(
        "{:<24} {:<4} {:<9} {:<28} {}  {}",
        s(&f["time"]),
        s(&f["type"]),
        s(&f["verdict"]),
        who,
        what,
        why
    )
}

/// Reads flow events from the `run`/`proxy` API into `tx`.
fn from_api(socket: PathBuf, last: usize, follow: bool, tx: mpsc::Sender<Value>) -> Result<()> {
    let mut stream = UnixStream::connect(&socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    writeln!(
        stream,
        "{}",
        serde_json::json!({"version": API_VERSION, "request": "observe", "last": last, "follow": follow})
    )?;
    for line in BufReader::new(stream).lines() {
        let v: Value = serde_json::from_str(&line?)?;
        if let Some(err) = v.get("error") {
            bail!("API error: {err}");
        }
        if let Some(n) = v.get("lost") {
            eprintln!("dnsfence observe: {n} events missed (this observer fell behind)");
        }
        if let Some(flow) = v.get("flow") {
            if tx.send(flow.clone()).is_err() {
                break;
            }
        }
    }
    Ok(())
}

/// Reads the agent's flow events (refused packets) into `tx`.
fn from_agent(socket: PathBuf, last: usize, follow: bool, tx: mpsc::Sender<Value>) -> Result<()> {
    let mut stream = UnixStream::connect(&socket)?;
    for m in [
        Message::Hello {
            protocol: CONTROL_PROTOCOL,
            role: Role::Cli,
            pid: std::process::id(),
            version: 0,
        },
        Message::Observe { last, follow },
    ] {
        writeln!(stream, "{}", serde_json::to_string(&m)?)?;
    }
    for line in BufReader::new(stream).lines() {
        if let Ok(Message::Flow { flow }) = serde_json::from_str::<Message>(&line?) {
            if tx.send(flow).is_err() {
                break;
            }
        }
    }
    Ok(())
}

pub(crate) fn run(args: &ObserveArgs) -> Result<ExitCode> {
    let config = match &args.config {
        Some(path) => match crate::config::read(path, Usage::default()) {
            Ok(c) => c,
            Err(code) => return Ok(code),
        },
        None => Config::parse("defaults", "").map_err(|e| anyhow::anyhow!("{:?}", e.problems))?,
    };
    let filter = Filter {
        namespace: args.namespace.clone(),
        pod: args.pod.clone(),
        verdict: args.verdict.clone(),
        name: match &args.name {
            Some(p) => Some(
                NamePattern::match_pattern(p).map_err(|e| anyhow::anyhow!("--name {p:?}: {e}"))?,
            ),
            None => None,
        },
        kind: args.kind,
    };
    let socket = args.socket.clone().unwrap_or(config.api.socket.clone());
    let (tx, rx) = mpsc::channel();
    let api = {
        let tx = tx.clone();
        let (last, follow) = (args.last, args.follow);
        std::thread::spawn(move || from_api(socket, last, follow, tx))
    };
    let agent_socket = config.api.agent_socket.clone();
    if agent_socket.exists() && args.socket.is_none() {
        let (last, follow) = (args.last, args.follow);
        std::thread::spawn(move || from_agent(agent_socket, last, follow, tx));
    } else {
        drop(tx);
    }
    let mut out = crate::output::stdout();
    if args.output == Format::Table {
        writeln!(
            out,
            "{:<24} {:<4} {:<9} {:<28} WHAT  WHY",
            "TIME", "TYPE", "VERDICT", "SOURCE"
        )?;
    }
    let mut print = |f: &Value| -> std::io::Result<()> {
        match args.output {
            Format::Json => writeln!(out, "{f}")?,
            Format::Table => writeln!(out, "{}", row(f))?,
        }
        out.flush()
    };
    // A failure to print (the reader went away) ends the command at once: the readers'
    // threads may be waiting for events that never come.
    if args.follow {
        for f in rx.iter() {
            if filter.keeps(&f) {
                print(&f)?;
            }
        }
    } else {
        let mut all: Vec<Value> = rx.iter().filter(|f| filter.keeps(f)).collect();
        all.sort_by(|a, b| a["time"].as_str().cmp(&b["time"].as_str()));
        let skip = all.len().saturating_sub(args.last);
        for f in &all[skip..] {
            print(f)?;
        }
    }
    match api.join() {
        Ok(Err(e)) => {
            eprintln!("dnsfence observe: {e:#}");
            Ok(ExitCode::from(2))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}
