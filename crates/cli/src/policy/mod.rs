//! `dnsfence policy validate` and `dnsfence policy check`.

mod check;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use dnsfence_policy::{Diagnostic, PolicyLoader, PolicySet};

use dnsfence_agent::files;

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Check policy files; print every problem as `FILE:DOC: FIELD.PATH: message`.
    ///
    /// Exit 0 when there is no error (warnings allowed), 1 when any policy is invalid,
    /// 2 when a path cannot be read.
    Validate {
        /// Files, or directories searched recursively for *.yaml and *.yml.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// May an endpoint resolve a name, and which toFQDNs selectors would allow (or deny) its IPs?
    ///
    /// Shows the endpoint's mode: `enforce`, or `audit` when only audit-mode policies
    /// (annotation `dnsfence.io/audit: "true"`, or --audit) put it in default-deny.
    ///
    /// Exit 0 when the query would be allowed, 1 when denied, also when the denial is only
    /// audited (verdict `audit`: the proxy forwards the query and records it), 2 on error.
    Check(check::CheckArgs),
}

pub(crate) fn run(cmd: PolicyCommand) -> Result<ExitCode> {
    match cmd {
        PolicyCommand::Validate { paths } => validate(&paths),
        PolicyCommand::Check(args) => check::run(&args),
    }
}

/// Reads every file; diagnostics in load order. Unreadable paths are an `Err`.
pub(crate) fn load(paths: &[PathBuf]) -> Result<(PolicySet, Vec<Diagnostic>, usize)> {
    load_after(paths, &PolicySet::default())
}

/// As [`load`], for a set replacing `previous` (selectors keep their ids).
pub(crate) fn load_after(
    paths: &[PathBuf],
    previous: &PolicySet,
) -> Result<(PolicySet, Vec<Diagnostic>, usize)> {
    let files = files::expand(paths)?;
    let mut loader = PolicyLoader::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        loader.add(&file.display().to_string(), &text);
    }
    let (set, diags) = loader.finish_after(previous);
    Ok((set, diags, files.len()))
}

fn validate(paths: &[PathBuf]) -> Result<ExitCode> {
    let (set, diags, files) = load(paths)?;
    for d in &diags {
        eprintln!("{d}");
    }
    let errors = diags.iter().filter(|d| d.is_error()).count();
    let warnings = diags.len() - errors;
    let policies = set.policies().len();
    let mut out = crate::output::stdout();
    writeln!(
        out,
        "{files} file(s), {policies} valid policy object(s), {errors} error(s), {warnings} warning(s)"
    )?;
    out.flush()?;
    Ok(if errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
