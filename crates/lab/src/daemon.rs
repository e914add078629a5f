//! `dnsfence run` inside a lab's node namespace, for `dnsfence demo` and end-to-end tests:
//! writes the policy and configuration to a directory of its own, starts the binary with
//! `ip netns exec`, waits until it serves, reloads it with SIGHUP, and stops it on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{Lab, LabError};

/// How long [`Daemon::start`] and [`Daemon::reload`] wait.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// What to run.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    /// The `dnsfence` binary.
    pub exe: PathBuf,
    /// The policy YAML (written to `policy.yaml`).
    pub policy: String,
    /// More top-level configuration: `endpoints`, `host_ips`, `datapath`, `dns`...
    pub config_extra: String,
}

/// A running `dnsfence run`; killed and its files removed on drop (unless kept). The
/// node's table and routes go with the lab's namespaces.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    dir: PathBuf,
    keep: bool,
    /// Time from spawn to serving.
    pub ready_in: Duration,
}

fn fail(what: impl Into<String>) -> LabError {
    LabError::Daemon(what.into())
}

impl Daemon {
    /// Starts `spec.exe run` in the lab's node and waits until its API socket exists.
    pub fn start(lab: &Lab, spec: &DaemonSpec) -> Result<Self, LabError> {
        let dir = std::env::temp_dir().join(format!("dnsfence-{}", lab.node().name()));
        let io = |what: &str, e: std::io::Error| fail(format!("{what}: {e}"));
        std::fs::create_dir_all(&dir).map_err(|e| io("creating the daemon directory", e))?;
        std::fs::write(dir.join("policy.yaml"), &spec.policy)
            .map_err(|e| io("writing policy.yaml", e))?;
        let socket = dir.join("api.sock");
        let config = format!(
            "policies: [policy.yaml]\n{}api: {{socket: {}}}\nstate_dir: {}\n",
            spec.config_extra,
            socket.display(),
            dir.display()
        );
        std::fs::write(dir.join("config.yaml"), config)
            .map_err(|e| io("writing config.yaml", e))?;
        let log = std::fs::File::create(dir.join("dnsfence.log"))
            .map_err(|e| io("creating the log", e))?;
        let started = Instant::now();
        let child = lab
            .node()
            .command(&spec.exe)
            .arg("run")
            .arg("--config")
            .arg(dir.join("config.yaml"))
            // Per-query decisions are debug events of the proxy: tests read them.
            .env("RUST_LOG", "info,dnsfence_proxy=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| io(&format!("starting {}", spec.exe.display()), e))?;
        let mut daemon = Self {
            child,
            dir,
            keep: false,
            ready_in: Duration::ZERO,
        };
        while !socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                daemon.keep = true;
                return Err(fail(format!(
                    "dnsfence run exited ({status}) before it was ready; log {}:\n{}",
                    daemon.log_path().display(),
                    daemon.log()
                )));
            }
            if started.elapsed() > READY_TIMEOUT {
                daemon.keep = true;
                return Err(fail(format!(
                    "dnsfence run not ready after {READY_TIMEOUT:?}; log:\n{}",
                    daemon.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        daemon.ready_in = started.elapsed();
        Ok(daemon)
    }

    /// The directory holding the configuration, policy, log and API socket.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("dnsfence.log")
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Replaces the policy file and sends SIGHUP; returns once the log says the reload was
    /// applied (`Ok`) or rejected (`Err` with the log).
    pub fn reload(&self, policy: &str) -> Result<(), LabError> {
        let count = |log: &str, what: &str| log.matches(what).count();
        let before = self.log();
        let (applied, rejected) = (
            count(&before, "policies reloaded"),
            count(&before, "reload rejected"),
        );
        std::fs::write(self.dir.join("policy.yaml"), policy)
            .map_err(|e| fail(format!("writing policy.yaml: {e}")))?;
        let pid = i32::try_from(self.child.id()).map_err(|_| fail("pid out of range"))?;
        kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|e| fail(format!("SIGHUP: {e}")))?;
        let started = Instant::now();
        loop {
            let log = self.log();
            if count(&log, "policies reloaded") > applied {
                return Ok(());
            }
            if count(&log, "reload rejected") > rejected {
                return Err(fail(format!("reload rejected:\n{log}")));
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(fail(format!("no reload after {READY_TIMEOUT:?}:\n{log}")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process (as a crash would) and waits for it; files stay until drop.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Keeps the files after drop; returns the log's path.
    pub fn keep_log(mut self) -> PathBuf {
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
