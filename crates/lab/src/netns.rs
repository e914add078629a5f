//! Named network namespaces (`/run/netns/<name>`, as `ip netns` makes them): running `ip`
//! and programs inside one, running a closure in a thread switched into one, linking two
//! with a veth pair, and deleting a set of them on drop. [`Netns::scratch`] makes one
//! namespace of a test's own, outside any lab.
//!
//! Nothing here touches the namespace the process runs in: commands go through
//! `ip -n <name>` or `ip netns exec <name>`, closures run on a fresh thread that `setns(2)`
//! moved, and sysctls are written from such a thread.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use nix::sched::{setns, CloneFlags};

use crate::topology::COMMON_SYSCTLS;
use crate::LabError;

/// Where `ip` lives, found once.
pub(crate) fn ip_binary() -> Result<&'static Path, LabError> {
    static IP: OnceLock<Option<PathBuf>> = OnceLock::new();
    IP.get_or_init(|| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
            .map(|dir| dir.join("ip"))
            .find(|p| p.is_file())
    })
    .as_deref()
    .ok_or(LabError::IpNotFound)
}

/// Runs `command`, feeding it `stdin`, and fails with its stderr unless it succeeds.
pub(crate) fn run(mut command: Command, stdin: Option<&str>) -> Result<Output, LabError> {
    let describe = |command: &Command| {
        let mut s = command.get_program().to_string_lossy().into_owned();
        for a in command.get_args() {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        if let Some(input) = stdin {
            s.push_str(" <<EOF\n");
            s.push_str(input);
            s.push_str("EOF");
        }
        s
    };
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let described = describe(&command);
    let spawn_error = |source| LabError::Spawn {
        command: described.clone(),
        source,
    };
    let mut child = command.spawn().map_err(spawn_error)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn_error)?;
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(LabError::Command {
            command: described,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Runs `f` on a new thread switched into the network namespace `netns` (a name under
/// `/run/netns`) and returns what it returns. Sockets created inside `f` belong to that
/// namespace for their whole life and can be used from any thread afterwards.
///
/// A panic in `f` is propagated to the caller.
pub fn in_netns<T, F>(netns: &str, f: F) -> Result<T, LabError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let enter_error = |source| LabError::Enter {
        netns: netns.to_owned(),
        source,
    };
    let handle = File::open(Path::new("/run/netns").join(netns)).map_err(enter_error)?;
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name(format!("netns-{netns}"))
            .spawn_scoped(scope, move || {
                setns(&handle, CloneFlags::CLONE_NEWNET)
                    .map_err(|errno| enter_error(errno.into()))?;
                Ok(f())
            })
            .map_err(enter_error)?;
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A named network namespace of a lab. It is a name, not an owner: the lab deletes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub(crate) fn new(name: String) -> Self {
        Self { name }
    }

    /// The name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <name> <program>`: a command to complete and run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(ip_binary().unwrap_or(Path::new("ip")));
        command.args(["netns", "exec", &self.name]);
        command.arg(program);
        command
    }

    /// Runs `program args` inside the namespace; fails with its stderr unless it succeeds.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Result<Output, LabError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = self.command(program);
        command.args(args);
        run(command, None)
    }

    /// Runs `ip -n <name> args`; fails with its stderr unless it succeeds.
    pub fn ip(&self, args: &[&str]) -> Result<Output, LabError> {
        let mut command = Command::new(ip_binary()?);
        command.args(["-n", &self.name]).args(args);
        run(command, None)
    }

    /// Runs `f` on a thread inside the namespace (see [`in_netns`]).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
        in_netns(&self.name, f)
    }

    /// Creates a network namespace of the caller's own, for a test that needs one or two
    /// rather than a whole [`crate::Lab`]: named `df-<tag>-<pid>-<n>` (unique while this
    /// process runs, so tests run in parallel), its loopback up and IPv6 duplicate address
    /// detection off (addresses are usable at once). It is deleted when the returned owner
    /// is dropped, also when unwinding from a panic or when setting it up fails.
    pub fn scratch(tag: &str) -> Result<ScratchNetns, LabError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("df-{tag}-{}-{n}", std::process::id());
        let mut add = Command::new(ip_binary()?);
        add.args(["netns", "add", &name]);
        run(add, None)?;
        let mut cleanup = Cleanup::default();
        cleanup.add(name.clone());
        let netns = Netns::new(name);
        netns.ip(&["link", "set", "lo", "up"])?;
        netns.sysctls(&COMMON_SYSCTLS)?;
        Ok(ScratchNetns {
            netns,
            _cleanup: cleanup,
        })
    }

    /// Links this namespace and `peer` with a veth pair: `interface` here with `address`,
    /// `peer_interface` there with `peer_address` (CIDR notation), both up. The pair is
    /// created from inside this namespace, its far end placed straight into `peer`.
    pub fn veth(
        &self,
        interface: &str,
        address: &str,
        peer: &Netns,
        peer_interface: &str,
        peer_address: &str,
    ) -> Result<(), LabError> {
        self.ip(&[
            "link",
            "add",
            interface,
            "type",
            "veth",
            "peer",
            "name",
            peer_interface,
            "netns",
            peer.name(),
        ])?;
        self.ip(&["addr", "add", address, "dev", interface])?;
        peer.ip(&["addr", "add", peer_address, "dev", peer_interface])?;
        self.ip(&["link", "set", interface, "up"])?;
        peer.ip(&["link", "set", peer_interface, "up"])?;
        Ok(())
    }

    /// Runs `ip -n <name> -batch -` fed with `script` (one `ip` command a line).
    pub(crate) fn ip_batch(&self, script: &str) -> Result<Output, LabError> {
        let mut command = Command::new(ip_binary()?);
        command.args(["-n", &self.name, "-batch", "-"]);
        run(command, Some(script))
    }

    /// Writes sysctls (`key` is the path under `/proc/sys`) inside the namespace.
    pub(crate) fn sysctls(
        &self,
        settings: &[(&'static str, &'static str)],
    ) -> Result<(), LabError> {
        self.run(|| {
            for (key, value) in settings {
                std::fs::write(Path::new("/proc/sys").join(key), value).map_err(|source| {
                    LabError::Sysctl {
                        netns: self.name.clone(),
                        key,
                        value,
                        source,
                    }
                })?;
            }
            Ok(())
        })?
    }
}

/// A network namespace its holder owns ([`Netns::scratch`]): a [`Netns`] (through `Deref`)
/// that is deleted on drop.
#[derive(Debug)]
pub struct ScratchNetns {
    netns: Netns,
    _cleanup: Cleanup,
}

impl std::ops::Deref for ScratchNetns {
    type Target = Netns;

    fn deref(&self) -> &Netns {
        &self.netns
    }
}

/// Deletes namespaces on drop (also when unwinding from a panic), in one `ip` run.
#[derive(Debug, Default)]
pub(crate) struct Cleanup {
    names: Vec<String>,
}

impl Cleanup {
    /// Adds `name` (before creating it, so that a half-built lab is removed too).
    pub(crate) fn add(&mut self, name: String) {
        self.names.push(name);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.names.is_empty() {
            return;
        }
        let Ok(ip) = ip_binary() else { return };
        let mut command = Command::new(ip);
        command.args(["-force", "-batch", "-"]);
        let script: String = self
            .names
            .iter()
            .map(|n| format!("netns del {n}\n"))
            .collect();
        // Errors are for names never created; nothing else can be done in a destructor.
        let _ = run(command, Some(&script));
    }
}
