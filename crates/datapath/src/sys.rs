//! Every system call of the datapath, behind [`Kernel`] so the logic above it is unit
//! tested with [`FakeKernel`]; the real one is tested in network namespaces.
//!
//! - The ruleset skeleton goes through the `nft` tool as one atomic transaction (`nft -f`),
//!   as kube-proxy's nftables mode does; it changes only on policy or inventory updates.
//! - Learned IPs, the hot path, go over netlink ([`netlink`]) in batches, no process spawned.
//! - The policy routing rule that delivers redirected DNS to the local proxy goes through
//!   the `ip` tool at start-up.

pub mod netlink;
pub mod nflog;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// A failed system operation, or a datapath thread that cannot carry one out.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// A required tool is missing.
    #[error("`{tool}` not found: the nftables datapath needs it ({hint})")]
    Missing {
        /// The tool.
        tool: &'static str,
        /// How to get it.
        hint: &'static str,
    },
    /// A command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// Netlink refused a batch.
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    /// The kernel refused one set of a batch of learned IPs after another (sets gone in
    /// a policy update this process has not seen yet); each was dropped from the batch
    /// and the rest retried, until the retries ran out. The IPs left were not written.
    #[error(
        "the kernel refused sets {} of table {table} one after another; the rest of the batch was not written",
        .sets.join(", ")
    )]
    SetsRefused {
        /// The table.
        table: String,
        /// The sets refused, in order; none of their IPs was written.
        sets: Vec<String>,
        /// The last refusal.
        #[source]
        source: netlink::NetlinkError,
    },
    /// The datapath thread has stopped (it panicked): nothing more is applied.
    #[error("the datapath thread has stopped")]
    WorkerStopped,
    /// The datapath thread did not answer a reconcile in time. It is still running, busy
    /// (the kernel is slow, or requests queued before) or stuck, and may apply the
    /// reconcile later; it has not stopped.
    #[error(
        "the datapath thread did not finish the reconcile within {waited:?}; it is still running and may apply it later"
    )]
    WorkerTimeout {
        /// How long the caller waited.
        waited: Duration,
    },
}

/// A learned-IP element operation on a named set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetOp {
    /// Add or extend.
    Add {
        /// The set.
        set: String,
        /// The IP.
        ip: IpAddr,
        /// Timeout from now.
        timeout: Duration,
    },
    /// Remove (a missing element is not an error).
    Delete {
        /// The set.
        set: String,
        /// The IP.
        ip: IpAddr,
    },
}

/// The kernel as the datapath sees it.
pub trait Kernel: Send {
    /// Checks that the tools exist.
    fn check(&mut self) -> Result<(), SysError>;
    /// Runs an `nft -f` script as one transaction.
    fn run_script(&mut self, script: &str) -> Result<(), SysError>;
    /// `nft --terse list table inet TABLE`; `None` when the table does not exist.
    fn list_table(&mut self, table: &str) -> Result<Option<String>, SysError>;
    /// Applies element operations in one atomic batch.
    fn apply_elements(&mut self, table: &str, ops: &[SetOp]) -> Result<(), SysError>;
    /// Deletes the table (no error when it does not exist).
    fn delete_table(&mut self, table: &str) -> Result<(), SysError>;
    /// Installs (idempotently) the rule routing packets with `fwmark` to local delivery
    /// through routing table `table`, IPv4 and IPv6.
    fn ensure_local_route(&mut self, fwmark: u32, table: u32) -> Result<(), SysError>;
    /// Removes that rule and route.
    fn remove_local_route(&mut self, fwmark: u32, table: u32) -> Result<(), SysError>;
    /// How many elements `set` of `table` holds.
    fn count_elements(&mut self, table: &str, set: &str) -> Result<usize, SysError>;
    /// The node interface each address is directly attached through (a connected route,
    /// not via a gateway, not the interface of a default route); others are left out.
    fn attached_interfaces(&mut self, ips: &[IpAddr])
        -> Result<BTreeMap<IpAddr, String>, SysError>;
}

/// Parses `ip -o route get` lines into address -> device, keeping only direct routes.
pub fn parse_route_get(output: &str, uplinks: &BTreeSet<String>) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    for line in output.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(ip) = words.iter().find_map(|w| w.parse::<IpAddr>().ok()) else {
            continue;
        };
        if words.first().is_some_and(|w| w.parse::<IpAddr>().is_err()) {
            // local, broadcast, unreachable, ...: not an attached endpoint.
            continue;
        }
        if words.contains(&"via") {
            continue;
        }
        let dev = words
            .iter()
            .position(|w| *w == "dev")
            .and_then(|i| words.get(i + 1));
        if let Some(dev) = dev {
            if *dev != "lo" && !uplinks.contains(*dev) {
                out.insert(ip, (*dev).to_owned());
            }
        }
    }
    out
}

/// The devices of default routes in `ip -o route show default` output.
pub fn parse_default_devices(output: &str) -> BTreeSet<String> {
    output
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let i = words.iter().position(|w| *w == "dev")?;
            words.get(i + 1).map(|d| (*d).to_owned())
        })
        .collect()
}

/// The real kernel: `nft`, `ip` and a netlink socket.
#[derive(Default)]
pub struct RealKernel {
    socket: Option<netlink::NftSocket>,
}

impl std::fmt::Debug for RealKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealKernel").finish_non_exhaustive()
    }
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, SysError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| SysError::Command {
            command: command.clone(),
            stderr: e.to_string(),
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| SysError::Command {
                command: command.clone(),
                stderr: e.to_string(),
            })?;
    }
    let out = child.wait_with_output().map_err(|e| SysError::Command {
        command: command.clone(),
        stderr: e.to_string(),
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SysError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn found(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        || Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

impl RealKernel {
    fn socket(&mut self) -> Result<&mut netlink::NftSocket, SysError> {
        match &mut self.socket {
            Some(s) => Ok(s),
            slot => Ok(slot.insert(netlink::NftSocket::open()?)),
        }
    }
}

impl Kernel for RealKernel {
    fn check(&mut self) -> Result<(), SysError> {
        if !found("nft") {
            return Err(SysError::Missing {
                tool: "nft",
                hint: "on Debian: apt install nftables",
            });
        }
        if !found("ip") {
            return Err(SysError::Missing {
                tool: "ip",
                hint: "on Debian: apt install iproute2",
            });
        }
        self.socket()?;
        Ok(())
    }

    fn run_script(&mut self, script: &str) -> Result<(), SysError> {
        run("nft", &["-f", "-"], Some(script)).map(drop)
    }

    fn list_table(&mut self, table: &str) -> Result<Option<String>, SysError> {
        match run("nft", &["--terse", "list", "table", "inet", table], None) {
            Ok(out) => Ok(Some(out)),
            Err(SysError::Command { stderr, .. }) if stderr.contains("No such file") => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn apply_elements(&mut self, table: &str, ops: &[SetOp]) -> Result<(), SysError> {
        let ops: Vec<netlink::ElemOp<'_>> = ops
            .iter()
            .map(|op| match op {
                SetOp::Add { set, ip, timeout } => netlink::ElemOp::Add {
                    set,
                    ip: *ip,
                    timeout: *timeout,
                },
                SetOp::Delete { set, ip } => netlink::ElemOp::Delete { set, ip: *ip },
            })
            .collect();
        self.socket()?.apply(table, &ops)?;
        Ok(())
    }

    fn delete_table(&mut self, table: &str) -> Result<(), SysError> {
        match run("nft", &["delete", "table", "inet", table], None) {
            Ok(_) => Ok(()),
            Err(SysError::Command { stderr, .. }) if stderr.contains("No such file") => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn ensure_local_route(&mut self, fwmark: u32, table: u32) -> Result<(), SysError> {
        let mark = format!("{fwmark:#x}");
        let table_s = table.to_string();
        for (fam, any) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
            let rules = run("ip", &[fam, "rule", "show", "fwmark", &mark], None)?;
            if !rules.contains(&format!("lookup {table}")) {
                run(
                    "ip",
                    &[fam, "rule", "add", "fwmark", &mark, "lookup", &table_s],
                    None,
                )?;
            }
            run(
                "ip",
                &[
                    fam, "route", "replace", "local", any, "dev", "lo", "table", &table_s,
                ],
                None,
            )?;
        }
        Ok(())
    }

    fn count_elements(&mut self, table: &str, set: &str) -> Result<usize, SysError> {
        Ok(self.socket()?.list(table, set)?.len())
    }

    fn attached_interfaces(
        &mut self,
        ips: &[IpAddr],
    ) -> Result<BTreeMap<IpAddr, String>, SysError> {
        if ips.is_empty() {
            return Ok(BTreeMap::new());
        }
        let mut uplinks =
            parse_default_devices(&run("ip", &["-o", "route", "show", "default"], None)?);
        uplinks.extend(parse_default_devices(&run(
            "ip",
            &["-o", "-6", "route", "show", "default"],
            None,
        )?));
        let script: String = ips.iter().map(|ip| format!("route get {ip}\n")).collect();
        // -force: an address without a route does not stop the others.
        let output = match run("ip", &["-o", "-force", "-batch", "-"], Some(&script)) {
            Ok(out) => out,
            Err(SysError::Command { .. }) => {
                // Some lookups failed; ask one by one so the others still count.
                let mut all = String::new();
                for ip in ips {
                    if let Ok(out) = run("ip", &["-o", "route", "get", &ip.to_string()], None) {
                        all.push_str(&out);
                    }
                }
                all
            }
            Err(e) => return Err(e),
        };
        Ok(parse_route_get(&output, &uplinks))
    }

    fn remove_local_route(&mut self, fwmark: u32, table: u32) -> Result<(), SysError> {
        let mark = format!("{fwmark:#x}");
        let table_s = table.to_string();
        for (fam, any) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
            while run(
                "ip",
                &[fam, "rule", "del", "fwmark", &mark, "lookup", &table_s],
                None,
            )
            .is_ok()
            {}
            let _ = run(
                "ip",
                &[
                    fam, "route", "del", "local", any, "dev", "lo", "table", &table_s,
                ],
                None,
            );
        }
        Ok(())
    }
}

/// What [`FakeKernel`] was asked to do.
#[derive(Debug, Default, Clone)]
pub struct FakeLog {
    /// Scripts run.
    pub scripts: Vec<String>,
    /// Element batches applied.
    pub batches: Vec<Vec<SetOp>>,
    /// Tables deleted.
    pub deleted: Vec<String>,
    /// The listing `list_table` returns.
    pub listing: Option<String>,
    /// Make the next element batch fail (the kernel refuses the whole batch).
    pub fail_next_batch: bool,
    /// Sets element batches refuse, as a kernel without them does: the first op on one
    /// of them fails its batch (`ENOENT`).
    pub refused_sets: BTreeSet<String>,
    /// Make the next script panic (the thread running it dies).
    pub crash_next_script: bool,
    /// What `attached_interfaces` answers.
    pub interfaces: BTreeMap<IpAddr, String>,
}

/// A kernel that records calls, for unit tests of the logic above it.
#[derive(Debug, Default, Clone)]
pub struct FakeKernel {
    /// The record, shared with the test.
    pub log: Arc<Mutex<FakeLog>>,
}

impl FakeKernel {
    fn log(&self) -> std::sync::MutexGuard<'_, FakeLog> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Kernel for FakeKernel {
    fn check(&mut self) -> Result<(), SysError> {
        Ok(())
    }
    fn run_script(&mut self, script: &str) -> Result<(), SysError> {
        let mut log = self.log();
        if std::mem::take(&mut log.crash_next_script) {
            drop(log);
            panic!("FakeKernel: crash_next_script");
        }
        log.scripts.push(script.to_owned());
        Ok(())
    }
    fn list_table(&mut self, _table: &str) -> Result<Option<String>, SysError> {
        Ok(self.log().listing.clone())
    }
    fn apply_elements(&mut self, table: &str, ops: &[SetOp]) -> Result<(), SysError> {
        let mut log = self.log();
        if std::mem::take(&mut log.fail_next_batch) {
            return Err(netlink::NetlinkError::BatchRejected {
                table: table.to_owned(),
                errno: nix::errno::Errno::EIO,
            }
            .into());
        }
        let refused = ops.iter().enumerate().find_map(|(i, op)| {
            let (SetOp::Add { set, .. } | SetOp::Delete { set, .. }) = op;
            log.refused_sets.contains(set).then_some((i, op, set))
        });
        if let Some((i, op, set)) = refused {
            return Err(netlink::NetlinkError::Rejected {
                table: table.to_owned(),
                set: set.clone(),
                kind: match op {
                    SetOp::Add { .. } => netlink::ElemKind::Add,
                    SetOp::Delete { .. } => netlink::ElemKind::Delete,
                },
                first: i,
                last: i,
                errno: nix::errno::Errno::ENOENT,
            }
            .into());
        }
        log.batches.push(ops.to_vec());
        Ok(())
    }
    fn delete_table(&mut self, table: &str) -> Result<(), SysError> {
        self.log().deleted.push(table.to_owned());
        Ok(())
    }
    fn ensure_local_route(&mut self, _fwmark: u32, _table: u32) -> Result<(), SysError> {
        Ok(())
    }
    fn remove_local_route(&mut self, _fwmark: u32, _table: u32) -> Result<(), SysError> {
        Ok(())
    }
    fn count_elements(&mut self, _table: &str, set: &str) -> Result<usize, SysError> {
        let log = self.log();
        let mut n = 0;
        for batch in &log.batches {
            for op in batch {
                match op {
                    SetOp::Add { set: s, .. } if s == set => n += 1,
                    SetOp::Delete { set: s, .. } if s == set => n -= 1,
                    _ => {}
                }
            }
        }
        Ok(n)
    }

    fn attached_interfaces(
        &mut self,
        ips: &[IpAddr],
    ) -> Result<BTreeMap<IpAddr, String>, SysError> {
        let log = self.log();
        Ok(ips
            .iter()
            .filter_map(|ip| log.interfaces.get(ip).map(|d| (*ip, d.clone())))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn only_direct_routes_off_the_uplink_count() {
        let uplinks = parse_default_devices(
            "default via 10.0.0.1 dev eth0 proto dhcp \ndefault via fe80::1 dev eth1 metric 1024 pref medium\n",
        );
        assert_eq!(uplinks.len(), 2);
        let out = "10.200.0.2 dev pod0 src 10.200.0.1 uid 0 \\    cache \n\
                   fd00:200:1::2 from :: dev pod1 proto kernel src fd00:200:1::1 metric 256 pref medium\n\
                   10.9.9.9 via 10.0.0.1 dev eth0 src 10.0.0.5 uid 0 \\    cache \n\
                   10.0.0.7 dev eth0 src 10.0.0.5 uid 0 \\    cache \n\
                   local 10.0.0.5 dev lo table local src 10.0.0.5 uid 0 \\    cache <local> \n";
        let m = parse_route_get(out, &uplinks);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[&"10.200.0.2".parse::<IpAddr>().unwrap()], "pod0");
        assert_eq!(m[&"fd00:200:1::2".parse::<IpAddr>().unwrap()], "pod1");
    }
}
