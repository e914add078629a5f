//! Policy files: the configuration's `policies` (files as given, directories searched
//! recursively for `*.yaml` and `*.yml`), read into documents for the policy engine.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use dnsfence_policy::PolicyDoc;

use crate::config::NodeConfig;

/// A policy file or directory that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}", path.display())]
pub struct FilesError {
    /// What could not be read.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

fn unreadable(path: &Path) -> impl FnOnce(io::Error) -> FilesError + '_ {
    move |source| FilesError {
        path: path.to_owned(),
        source,
    }
}

/// The configuration's policy paths; relative ones are read from the directory of the
/// configuration file at `config_path`.
pub fn policy_paths(config_path: &Path, config: &NodeConfig) -> Vec<PathBuf> {
    let base = config_path.parent().unwrap_or(Path::new("."));
    config.policies.iter().map(|p| base.join(p)).collect()
}

/// Reads the configuration's policy files.
pub fn policy_docs(config_path: &Path, config: &NodeConfig) -> Result<Vec<PolicyDoc>, FilesError> {
    expand(&policy_paths(config_path, config))?
        .iter()
        .map(|f| {
            Ok(PolicyDoc {
                file: f.display().to_string(),
                text: fs::read_to_string(f).map_err(unreadable(f))?,
            })
        })
        .collect()
}

/// Expands `paths` into the YAML files to read, in a stable order. A directory yields every
/// `*.yaml` and `*.yml` below it; a file is taken whatever its name.
pub fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, FilesError> {
    let mut out = Vec::new();
    for path in paths {
        let meta = fs::metadata(path).map_err(unreadable(path))?;
        if meta.is_dir() {
            walk(path, &mut out)?;
        } else {
            out.push(path.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), FilesError> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(unreadable(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(unreadable(dir))?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]
    use super::*;

    #[test]
    fn directories_are_searched_for_yaml_in_order_and_files_taken_as_given() {
        let dir = std::env::temp_dir().join(format!("dnsfence-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("d/sub")).unwrap();
        for f in [
            "d/b.yaml",
            "d/a.yml",
            "d/sub/c.yaml",
            "d/notes.txt",
            "plain.conf",
        ] {
            fs::write(dir.join(f), "kind: x\n").unwrap();
        }
        let got = expand(&[dir.join("d"), dir.join("plain.conf")]).unwrap();
        let names: Vec<String> = got
            .iter()
            .map(|p| p.strip_prefix(&dir).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["d/a.yml", "d/b.yaml", "d/sub/c.yaml", "plain.conf"]);
        let err = expand(&[dir.join("gone")]).unwrap_err();
        assert!(err.to_string().starts_with("cannot read "), "{err}");
        assert_eq!(err.source.kind(), io::ErrorKind::NotFound);
        fs::remove_dir_all(&dir).unwrap();
    }
}
