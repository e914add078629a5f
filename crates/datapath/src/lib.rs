//! The kernel datapath: one nftables table (`inet dnsfence` by default) that redirects
//! enforced endpoints' DNS to the proxy, accepts their traffic to what their policy allows
//! (learned FQDN IPs, CIDRs, entities, peer endpoints) and refuses everything else. It must
//! not touch any other table, nor decide policy: it renders what it is given.
//!
//! [`Datapath`] is the synchronous core (reconcile a policy set and inventory; apply
//! learned-IP changes); [`Worker`] runs it on its own thread and batches concurrent
//! learned-IP updates into one netlink transaction, so a burst of answers costs one kernel
//! round trip.
//!
//! Every system call is in [`sys`]; the netlink wire format it speaks is [`netlink`],
//! which does no I/O. [`ruleset`] renders what the table should hold.

pub mod config;
pub mod drops;
pub mod learned;
pub mod netlink;
pub mod ruleset;
pub mod sys;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dnsfence_fqdncache::Change;
use dnsfence_policy::{Inventory, PolicySet, SelectorId};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tracing::{debug, info, warn};

pub use config::{Backend, DatapathConfig};
use sys::netlink::NetlinkError;

pub use learned::{Learned, Op, MIN_TIMEOUT};
pub use ruleset::{DenyAction, DropReason, Existing, Options, Ruleset};
pub use sys::{FakeKernel, Kernel, RealKernel, SetOp, SysError};

/// What a reconcile did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Enforced endpoint addresses.
    pub enforced: usize,
    /// Selector sets in use.
    pub selectors: usize,
}

/// The datapath: owns the table and knows which learned IPs it holds.
pub struct Datapath {
    kernel: Box<dyn Kernel>,
    names: drops::EndpointNames,
    options: Options,
    learned: Learned,
    sets: BTreeMap<SelectorId, (String, String)>,
    ops: Vec<Op>,
    set_ops: Vec<SetOp>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("options", &self.options)
            .field("learned", &self.learned.len())
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// A datapath on `kernel`; checks that the tools it needs exist and installs the
    /// routing rule for redirected DNS. Nothing is enforced before [`Datapath::reconcile`].
    pub fn new(mut kernel: Box<dyn Kernel>, options: Options) -> Result<Self, SysError> {
        kernel.check()?;
        if options.tproxy_port.is_some() {
            kernel.ensure_local_route(options.fwmark, options.route_table)?;
        }
        Ok(Self::elements_only(kernel, options))
    }

    /// A datapath that only writes learned IPs into the selector sets of a table someone
    /// else (the agent) owns: no tools checked, no routing rule, no reconcile. Selectors
    /// come from [`Datapath::use_selectors`].
    pub fn elements_only(kernel: Box<dyn Kernel>, options: Options) -> Self {
        Self {
            kernel,
            names: drops::EndpointNames::default(),
            options,
            learned: Learned::default(),
            sets: BTreeMap::new(),
            ops: Vec::new(),
            set_ops: Vec::new(),
        }
    }

    /// Maps `policies`' selectors to their sets (named by pattern, as the agent names
    /// them) and forgets learned IPs of selectors that are gone.
    pub fn use_selectors(&mut self, policies: &PolicySet) {
        self.sets = policies
            .fqdn_selectors()
            .iter()
            .map(|(id, p)| {
                (
                    *id,
                    (
                        ruleset::fqdn_set_name(p, false),
                        ruleset::fqdn_set_name(p, true),
                    ),
                )
            })
            .collect();
        let sets = &self.sets;
        self.learned.retain_selectors(|s| sets.contains_key(&s));
    }

    /// Writes every learned IP that has not expired into its selector's set again, with
    /// the time it has left. The owner of the table may have recreated it (a reboot, an
    /// agent that started after this process learned or restored its IPs): re-adding an
    /// element only refreshes it. Returns how many elements were written.
    pub fn rewrite_learned(&mut self) -> Result<usize, SysError> {
        let now = Instant::now();
        self.set_ops.clear();
        for (selector, ip, until) in self.learned.elements() {
            if until <= now {
                continue;
            }
            let Some((v4, v6)) = self.sets.get(&selector) else {
                continue;
            };
            self.set_ops.push(SetOp::Add {
                set: if ip.is_ipv4() { v4 } else { v6 }.clone(),
                ip,
                timeout: until.saturating_duration_since(now).max(MIN_TIMEOUT),
            });
        }
        self.write_set_ops()
    }

    /// Elements per selector set, read from the kernel (sets it cannot read are left out).
    pub fn element_counts(&mut self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (v4, v6) in self.sets.values() {
            for set in [v4, v6] {
                if let Ok(n) = self.kernel.count_elements(&self.options.table, set) {
                    out.insert(set.clone(), n);
                }
            }
        }
        out
    }

    /// Endpoint names by address, as of the last reconcile (for naming refused packets).
    pub fn names(&self) -> drops::EndpointNames {
        self.names.clone()
    }

    /// The options.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Makes the table enforce `policies` for `inventory`, in one transaction, without a
    /// moment of open or broken egress: nothing is flushed but what is rewritten in the
    /// same transaction, and learned IPs of selectors that stay are kept.
    pub fn reconcile(
        &mut self,
        policies: &PolicySet,
        inventory: &Inventory,
    ) -> Result<Reconciled, SysError> {
        let existing = self
            .kernel
            .list_table(&self.options.table)?
            .map(|l| Existing::parse(&l))
            .unwrap_or_default();
        let addresses: Vec<IpAddr> = inventory
            .endpoints
            .iter()
            .flat_map(|e| e.ips.iter().copied())
            .collect();
        let interfaces = self.kernel.attached_interfaces(&addresses)?;
        for ep in inventory.endpoints.iter().filter(|e| e.policy.enforced) {
            for ip in ep.ips.iter().filter(|ip| !interfaces.contains_key(*ip)) {
                warn!(
                    endpoint = %ep.name,
                    %ip,
                    "no directly attached interface for this address: its source is not validated"
                );
            }
        }
        let ruleset = ruleset::render(policies, inventory, &interfaces, &self.options, &existing);
        self.kernel.run_script(&ruleset.script)?;
        self.learned
            .retain_selectors(|s| ruleset.fqdn_sets.contains_key(&s));
        self.sets = ruleset.fqdn_sets;
        let names = inventory
            .endpoints
            .iter()
            .flat_map(|e| {
                e.ips
                    .iter()
                    .map(|ip| (*ip, format!("{}/{}", e.endpoint.namespace(), e.name)))
            })
            .collect();
        *self
            .names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = names;
        info!(
            table = %self.options.table,
            enforced = ruleset.enforced,
            selectors = self.sets.len(),
            "datapath reconciled"
        );
        Ok(Reconciled {
            enforced: ruleset.enforced,
            selectors: self.sets.len(),
        })
    }

    /// Applies learned-IP changes in one batch; returns how many elements it wrote.
    /// Changes for selectors the table does not have (retired by a policy update) are
    /// ignored. On error the bookkeeping keeps the changes (a later refresh re-adds).
    pub fn apply(&mut self, changes: &[Change]) -> Result<usize, SysError> {
        let now = Instant::now();
        self.ops.clear();
        self.learned.apply(changes, now, &mut self.ops);
        self.set_ops.clear();
        for op in &self.ops {
            let (selector, ip) = match op {
                Op::Add { selector, ip, .. } | Op::Delete { selector, ip } => (*selector, *ip),
            };
            let Some((v4, v6)) = self.sets.get(&selector) else {
                continue;
            };
            let set = if ip.is_ipv4() { v4 } else { v6 }.clone();
            self.set_ops.push(match op {
                Op::Add { timeout, .. } => SetOp::Add {
                    set,
                    ip,
                    timeout: *timeout,
                },
                Op::Delete { .. } => SetOp::Delete { set, ip },
            });
        }
        self.write_set_ops()
    }

    /// Writes `set_ops` in one batch; returns how many were written.
    fn write_set_ops(&mut self) -> Result<usize, SysError> {
        if self.set_ops.is_empty() {
            return Ok(0);
        }
        // A set the kernel refuses (gone in a policy update another process made and this
        // one has not seen yet) must not keep the other IPs of the batch out: retry
        // without it, a few times.
        let mut refused = Vec::new();
        loop {
            let error = match self
                .kernel
                .apply_elements(&self.options.table, &self.set_ops)
            {
                Ok(()) => {
                    debug!(elements = self.set_ops.len(), "learned IPs applied");
                    return Ok(self.set_ops.len());
                }
                Err(SysError::Netlink(e)) => e,
                Err(e) => return Err(e),
            };
            let set = match &error {
                NetlinkError::Rejected { set, errno, .. }
                    if self.set_ops.iter().any(|op| op_set(op) == set) =>
                {
                    warn!(%set, %errno, "the kernel refused a set; applying the rest without it");
                    set.clone()
                }
                _ => return Err(error.into()),
            };
            self.set_ops.retain(|op| op_set(op) != set);
            refused.push(set);
            if self.set_ops.is_empty() {
                return Ok(0);
            }
            if refused.len() == REFUSED_SETS_MAX {
                return Err(SysError::SetsRefused {
                    table: self.options.table.clone(),
                    sets: refused,
                    source: error,
                });
            }
        }
    }

    /// Removes the table and the routing rule (`dnsfence cleanup`): enforced endpoints
    /// regain unrestricted egress.
    pub fn cleanup(kernel: &mut dyn Kernel, options: &Options) -> Result<(), SysError> {
        kernel.delete_table(&options.table)?;
        kernel.remove_local_route(options.fwmark, options.route_table)
    }
}

/// Sets of one batch the kernel may refuse, each dropped and the rest retried, before the
/// batch fails ([`SysError::SetsRefused`]).
const REFUSED_SETS_MAX: usize = 4;

/// How long [`Worker::reconcile`] waits for the datapath thread
/// ([`SysError::WorkerTimeout`]).
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(60);

fn op_set(op: &SetOp) -> &str {
    match op {
        SetOp::Add { set, .. } | SetOp::Delete { set, .. } => set,
    }
}

/// Called once a batch is in the kernel (or failed).
pub type Done = Box<dyn FnOnce(Result<(), Arc<SysError>>) + Send>;

enum Request {
    Apply(Vec<Change>, Done),
    Reconcile(
        Arc<PolicySet>,
        Arc<Inventory>,
        mpsc::Sender<Result<Reconciled, SysError>>,
    ),
    UseSelectors(Arc<PolicySet>, mpsc::Sender<()>),
    Counts(mpsc::Sender<BTreeMap<String, usize>>),
}

/// Metrics of the datapath (registered by the binary in its Prometheus registry).
#[derive(Debug, Clone)]
pub struct Stats {
    /// Netlink batches of learned IPs written.
    pub batches: Counter,
    /// Set elements written (adds and deletes).
    pub elements: Counter,
    /// Batches the kernel refused (their answers were released unenforced: fail closed).
    pub errors: Counter,
    /// Time to write one batch, seconds.
    pub batch_seconds: Histogram,
    /// Reconciles applied.
    pub reconciles: Counter,
    /// Reconciles that failed (the previous ruleset stays in force).
    pub reconcile_errors: Counter,
    /// Enforced endpoint addresses in the table.
    pub enforced: Gauge,
    /// Refused packets the kernel logged.
    pub drops: drops::DropMetrics,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            batches: Counter::default(),
            elements: Counter::default(),
            errors: Counter::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.000_005, 2.5, 14)),
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
            enforced: Gauge::default(),
            drops: drops::DropMetrics::default(),
        }
    }
}

impl Stats {
    /// Registers every metric under `datapath_` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("datapath");
        r.register(
            "batches",
            "Batches of learned IPs written to the kernel",
            self.batches.clone(),
        );
        r.register(
            "elements",
            "Learned-IP set elements written (adds and deletes)",
            self.elements.clone(),
        );
        r.register(
            "batch_errors",
            "Batches the kernel refused; their IPs are not allowed (fail closed)",
            self.errors.clone(),
        );
        r.register(
            "batch_seconds",
            "Time to write one batch of learned IPs and get the kernel's confirmation",
            self.batch_seconds.clone(),
        );
        r.register(
            "reconciles",
            "Rulesets applied (start, policy or inventory change)",
            self.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Rulesets the kernel refused; the previous one stays in force",
            self.reconcile_errors.clone(),
        );
        r.register(
            "enforced_addresses",
            "Endpoint addresses whose egress the table enforces",
            self.enforced.clone(),
        );
        self.drops.register(registry);
    }
}

/// A handle to the datapath thread.
#[derive(Clone)]
pub struct Worker {
    tx: mpsc::Sender<Request>,
    names: drops::EndpointNames,
    /// Counters.
    pub stats: Arc<Stats>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

impl Worker {
    /// Moves `datapath` to its own thread (which inherits the caller's network namespace).
    pub fn spawn(mut datapath: Datapath) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Request>();
        let names = datapath.names();
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("dnsfence-datapath".into())
            .spawn(move || {
                let mut pending: Vec<Request> = Vec::new();
                while let Ok(first) = rx.recv() {
                    pending.push(first);
                    // Everything queued meanwhile goes in the same batch.
                    while let Ok(more) = rx.try_recv() {
                        pending.push(more);
                    }
                    let mut changes = Vec::new();
                    let mut waiting: Vec<Done> = Vec::new();
                    for req in pending.drain(..) {
                        match req {
                            Request::Apply(c, done) => {
                                changes.extend(c);
                                waiting.push(done);
                            }
                            Request::Reconcile(p, inv, reply) => {
                                // Apply what came before, in order.
                                flush(&mut datapath, &st, &mut changes, &mut waiting);
                                let result = datapath.reconcile(&p, &inv);
                                match &result {
                                    Ok(r) => {
                                        st.reconciles.inc();
                                        st.enforced.set(i64::try_from(r.enforced).unwrap_or(0));
                                    }
                                    Err(_) => {
                                        st.reconcile_errors.inc();
                                    }
                                }
                                let _ = reply.send(result);
                            }
                            Request::Counts(reply) => {
                                let _ = reply.send(datapath.element_counts());
                            }
                            Request::UseSelectors(p, reply) => {
                                flush(&mut datapath, &st, &mut changes, &mut waiting);
                                datapath.use_selectors(&p);
                                // The table's owner may have recreated it since: put
                                // back what this process learned.
                                match datapath.rewrite_learned() {
                                    Ok(n) if n > 0 => {
                                        debug!(elements = n, "learned IPs written again");
                                    }
                                    Ok(_) => {}
                                    Err(e) => {
                                        tracing::warn!(error = %e, "writing learned IPs again failed");
                                    }
                                }
                                let _ = reply.send(());
                            }
                        }
                    }
                    flush(&mut datapath, &st, &mut changes, &mut waiting);
                }
            })?;
        Ok(Self { tx, names, stats })
    }

    /// Endpoint names by address, as of the last reconcile.
    pub fn names(&self) -> drops::EndpointNames {
        self.names.clone()
    }

    /// Queues learned-IP changes; `done` is called once they are in the kernel.
    pub fn apply(&self, changes: Vec<Change>, done: Done) {
        if let Err(mpsc::SendError(Request::Apply(_, done))) =
            self.tx.send(Request::Apply(changes, done))
        {
            done(Err(Arc::new(SysError::WorkerStopped)));
        }
    }

    /// Switches the selector-to-set mapping (after the changes queued before it) and
    /// waits until it is done.
    pub fn use_selectors(&self, policies: Arc<PolicySet>) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Request::UseSelectors(policies, tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Elements per selector set, read from the kernel.
    pub fn element_counts(&self) -> BTreeMap<String, usize> {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Request::Counts(tx)).is_ok() {
            return rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        }
        BTreeMap::new()
    }

    /// Reconciles and waits for the result, up to a minute: then
    /// [`SysError::WorkerTimeout`] (the thread is alive and may still apply it), or
    /// [`SysError::WorkerStopped`] if the thread has died.
    pub fn reconcile(
        &self,
        policies: Arc<PolicySet>,
        inventory: Arc<Inventory>,
    ) -> Result<Reconciled, SysError> {
        self.reconcile_within(policies, inventory, RECONCILE_TIMEOUT)
    }

    fn reconcile_within(
        &self,
        policies: Arc<PolicySet>,
        inventory: Arc<Inventory>,
        timeout: Duration,
    ) -> Result<Reconciled, SysError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Request::Reconcile(policies, inventory, tx))
            .map_err(|_| SysError::WorkerStopped)?;
        match rx.recv_timeout(timeout) {
            Ok(result) => result,
            // The request (and its reply channel) is still queued or in the thread's
            // hands: it is alive, only slow.
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(SysError::WorkerTimeout { waited: timeout })
            }
            // The thread dropped the reply channel without answering: it died.
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(SysError::WorkerStopped),
        }
    }
}

fn flush(
    datapath: &mut Datapath,
    stats: &Stats,
    changes: &mut Vec<Change>,
    waiting: &mut Vec<Done>,
) {
    if waiting.is_empty() {
        return;
    }
    let started = Instant::now();
    let result = datapath.apply(changes);
    changes.clear();
    let result = match result {
        Ok(0) => Ok(()),
        Ok(n) => {
            stats.batch_seconds.observe(started.elapsed().as_secs_f64());
            stats.batches.inc();
            stats.elements.inc_by(n as u64);
            Ok(())
        }
        Err(e) => {
            stats.errors.inc();
            tracing::error!(error = %e, "writing learned IPs to the kernel failed; they stay blocked");
            Err(Arc::new(e))
        }
    };
    for done in waiting.drain(..) {
        done(result.clone());
    }
}

#[cfg(test)]
mod tests;
