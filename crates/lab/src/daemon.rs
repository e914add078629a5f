//! dnsfence inside a lab's node namespace, for `dnsfence demo` and end-to-end tests:
//! writes the policy and configuration to a directory of its own, starts `dnsfence run`
//! (or `agent` and `proxy --agent` as two processes) with `ip netns exec`, waits until
//! they serve, reloads with SIGHUP, kills and restarts them for fault tests, and stops
//! everything on drop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{Lab, LabError, Netns};

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

/// One dnsfence process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Process {
    /// `dnsfence run`: everything in one process.
    Run,
    /// `dnsfence agent`.
    Agent,
    /// `dnsfence proxy --agent`.
    Proxy,
}

impl Process {
    fn args(self) -> &'static [&'static str] {
        match self {
            Process::Run => &["run"],
            Process::Agent => &["agent"],
            Process::Proxy => &["proxy", "--agent"],
        }
    }

    fn log(self) -> &'static str {
        match self {
            Process::Run => "dnsfence.log",
            Process::Agent => "agent.log",
            Process::Proxy => "proxy.log",
        }
    }

    /// The socket whose appearance says the process serves.
    fn socket(self) -> &'static str {
        match self {
            Process::Run | Process::Proxy => "api.sock",
            Process::Agent => "agent.sock",
        }
    }
}

/// Running dnsfence processes; killed and their files removed on drop (unless kept). The
/// node's table and routes go with the lab's namespaces.
#[derive(Debug)]
pub struct Daemon {
    node: Netns,
    exe: PathBuf,
    children: BTreeMap<Process, Child>,
    /// A proxy being replaced: still draining.
    leaving: Vec<Child>,
    dir: PathBuf,
    keep: bool,
    /// Time from spawn to serving, of the first start.
    pub ready_in: Duration,
}

fn fail(what: impl Into<String>) -> LabError {
    LabError::Daemon(what.into())
}

fn io(what: &str, e: std::io::Error) -> LabError {
    fail(format!("{what}: {e}"))
}

impl Daemon {
    /// Starts `dnsfence run` in the lab's node and waits until it serves.
    pub fn start(lab: &Lab, spec: &DaemonSpec) -> Result<Self, LabError> {
        Self::start_with(lab, spec, &[Process::Run])
    }

    /// Starts `dnsfence agent`, then `dnsfence proxy --agent`, and waits for both.
    pub fn start_split(lab: &Lab, spec: &DaemonSpec) -> Result<Self, LabError> {
        Self::start_with(lab, spec, &[Process::Agent, Process::Proxy])
    }

    fn start_with(lab: &Lab, spec: &DaemonSpec, processes: &[Process]) -> Result<Self, LabError> {
        let dir = std::env::temp_dir().join(format!("dnsfence-{}", lab.node().name()));
        std::fs::create_dir_all(&dir).map_err(|e| io("creating the daemon directory", e))?;
        std::fs::write(dir.join("policy.yaml"), &spec.policy)
            .map_err(|e| io("writing policy.yaml", e))?;
        let config = format!(
            "policies: [policy.yaml]\n{}api: {{socket: {}, agent_socket: {}}}\nstate_dir: {}\n",
            spec.config_extra,
            dir.join("api.sock").display(),
            dir.join("agent.sock").display(),
            dir.join("state").display()
        );
        std::fs::write(dir.join("config.yaml"), config)
            .map_err(|e| io("writing config.yaml", e))?;
        let mut daemon = Self {
            node: lab.node().clone(),
            exe: spec.exe.clone(),
            children: BTreeMap::new(),
            leaving: Vec::new(),
            dir,
            keep: false,
            ready_in: Duration::ZERO,
        };
        let started = Instant::now();
        for p in processes {
            daemon.spawn(*p)?;
        }
        daemon.ready_in = started.elapsed();
        Ok(daemon)
    }

    /// Starts `process` (again) and waits until it serves.
    pub fn spawn(&mut self, process: Process) -> Result<(), LabError> {
        let socket = self.dir.join(process.socket());
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(process.log()))
            .map_err(|e| io("opening the log", e))?;
        let started = Instant::now();
        let child = self
            .node
            .command(&self.exe)
            .args(process.args())
            .arg("--config")
            .arg(self.dir.join("config.yaml"))
            // Per-query decisions are debug events of the proxy: tests read them.
            .env("RUST_LOG", "info,dnsfence_proxy=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| io(&format!("starting {}", self.exe.display()), e))?;
        if let Some(mut old) = self.children.insert(process, child) {
            let _ = old.kill();
            let _ = old.wait();
        }
        while !socket.exists() {
            let child = self
                .children
                .get_mut(&process)
                .ok_or_else(|| fail("lost child"))?;
            if let Ok(Some(status)) = child.try_wait() {
                self.keep = true;
                return Err(fail(format!(
                    "dnsfence {:?} exited ({status}) before it was ready; logs in {}:\n{}",
                    process,
                    self.dir.display(),
                    self.log()
                )));
            }
            if started.elapsed() > READY_TIMEOUT {
                self.keep = true;
                return Err(fail(format!(
                    "dnsfence {process:?} not ready after {READY_TIMEOUT:?}; log:\n{}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Kills `process` with SIGKILL (a crash) and waits for it.
    pub fn kill(&mut self, process: Process) {
        if let Some(mut child) = self.children.remove(&process) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills every process (SIGKILL).
    pub fn kill_all(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.children) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Replaces the proxy as an upgrade would: starts a new one (it binds the same ports),
    /// waits until it serves, then sends the old one SIGTERM so it drains and exits.
    /// Returns how long the old one took to exit.
    pub fn roll_proxy(&mut self) -> Result<Duration, LabError> {
        let old = self
            .children
            .remove(&Process::Proxy)
            .ok_or_else(|| fail("no proxy to roll"))?;
        self.leaving.push(old);
        self.spawn(Process::Proxy)?;
        let mut old = self
            .leaving
            .pop()
            .ok_or_else(|| fail("lost the old proxy"))?;
        let pid = i32::try_from(old.id()).map_err(|_| fail("pid out of range"))?;
        let started = Instant::now();
        kill(Pid::from_raw(pid), Signal::SIGTERM).map_err(|e| fail(format!("SIGTERM: {e}")))?;
        let _ = old.wait();
        Ok(started.elapsed())
    }

    /// The process id of `process`, if running.
    pub fn pid(&self, process: Process) -> Option<u32> {
        self.children.get(&process).map(Child::id)
    }

    /// The directory holding the configuration, policy, logs, sockets and state.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The main log file (`dnsfence run`'s).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(Process::Run.log())
    }

    /// Every log so far, one after the other.
    pub fn log(&self) -> String {
        [Process::Run, Process::Agent, Process::Proxy]
            .iter()
            .filter_map(|p| std::fs::read_to_string(self.dir.join(p.log())).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Replaces the policy file and sends SIGHUP to the process that owns the policies,
    /// without waiting for the outcome.
    pub fn signal_reload(&self, policy: &str) -> Result<(), LabError> {
        std::fs::write(self.dir.join("policy.yaml"), policy)
            .map_err(|e| fail(format!("writing policy.yaml: {e}")))?;
        let owner = self
            .children
            .get(&Process::Run)
            .or_else(|| self.children.get(&Process::Agent))
            .ok_or_else(|| fail("no process owns the policies"))?;
        let pid = i32::try_from(owner.id()).map_err(|_| fail("pid out of range"))?;
        kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|e| fail(format!("SIGHUP: {e}")))
    }

    /// Replaces the policy file and sends SIGHUP to the process that owns the policies;
    /// returns once the log says the reload was applied (`Ok`) or rejected (`Err`).
    pub fn reload(&self, policy: &str) -> Result<(), LabError> {
        let count = |log: &str, what: &str| log.matches(what).count();
        let before = self.log();
        let (applied, rejected) = (
            count(&before, "policies reloaded"),
            count(&before, "reload rejected"),
        );
        std::fs::write(self.dir.join("policy.yaml"), policy)
            .map_err(|e| fail(format!("writing policy.yaml: {e}")))?;
        let owner = self
            .children
            .get(&Process::Run)
            .or_else(|| self.children.get(&Process::Agent))
            .ok_or_else(|| fail("no process owns the policies"))?;
        let pid = i32::try_from(owner.id()).map_err(|_| fail("pid out of range"))?;
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

    /// Keeps the files after drop; returns the directory.
    pub fn keep_log(mut self) -> PathBuf {
        self.keep = true;
        self.dir.clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_all();
        for mut child in self.leaving.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
