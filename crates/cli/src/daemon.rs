//! `dnsfence run` inside a lab's node namespace, for the demo.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dnsfence_lab::Lab;

/// What to run.
pub(crate) struct DaemonSpec {
    /// The dnsfence binary.
    pub(crate) exe: PathBuf,
    /// Policy YAML.
    pub(crate) policy: String,
    /// More top-level configuration (endpoints, host_ips, datapath...).
    pub(crate) config_extra: String,
}

/// A running `dnsfence run`; stopped and its files removed on drop (the lab, dropped
/// after, takes the node's table and routes with its namespace).
pub(crate) struct Daemon {
    child: Child,
    dir: PathBuf,
    keep: bool,
    /// Time from spawn to ready.
    pub(crate) ready_in: Duration,
}

impl Daemon {
    pub(crate) fn start(lab: &Lab, spec: &DaemonSpec) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "dnsfence-{}-{}",
            lab.node().name(),
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("policy.yaml"), &spec.policy)?;
        let socket = dir.join("api.sock");
        let config = format!(
            "policies: [policy.yaml]\n{}api: {{socket: {}}}\nstate_dir: {}\n",
            spec.config_extra,
            socket.display(),
            dir.display()
        );
        std::fs::write(dir.join("config.yaml"), config)?;
        let log = std::fs::File::create(dir.join("dnsfence.log"))?;
        let started = Instant::now();
        let child = lab
            .node()
            .command(&spec.exe)
            .arg("run")
            .arg("--config")
            .arg(dir.join("config.yaml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", spec.exe.display()))?;
        let mut daemon = Self {
            child,
            dir,
            keep: false,
            ready_in: Duration::ZERO,
        };
        while !socket.exists() {
            if let Some(status) = daemon.child.try_wait()? {
                daemon.keep = true;
                bail!(
                    "dnsfence run exited ({status}) before it was ready; log {}:\n{}",
                    daemon.log_path().display(),
                    daemon.log()
                );
            }
            if started.elapsed() > crate::demo::READY_TIMEOUT {
                daemon.keep = true;
                bail!(
                    "dnsfence run not ready after {:?}; log:\n{}",
                    crate::demo::READY_TIMEOUT,
                    daemon.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        daemon.ready_in = started.elapsed();
        Ok(daemon)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("dnsfence.log")
    }

    /// The log so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Keeps the files after drop; returns the log's path.
    pub(crate) fn keep_log(mut self) -> PathBuf {
        self.keep = true;
        self.log_path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
