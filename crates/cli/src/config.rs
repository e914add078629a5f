//! Reading the configuration file for a command: every problem printed, one per line, and
//! exit code 2 before anything starts.

use std::path::Path;
use std::process::ExitCode;

use dnsfence_agent::config::{NodeConfig, Usage};

/// Reads and checks the configuration for a command that uses it as `usage` says; problems
/// are printed and mapped to exit code 2.
pub(crate) fn read(path: &Path, usage: Usage) -> Result<NodeConfig, ExitCode> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dnsfence: cannot read {}: {e}", path.display());
            return Err(ExitCode::from(2));
        }
    };
    let config = NodeConfig::parse_file(path, &text, usage).map_err(|e| {
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
