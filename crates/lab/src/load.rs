//! A steady DNS load from one namespace, for fault tests: queries at a fixed rate from a
//! few UDP sockets created inside the namespace, answers matched by ID and question,
//! timeouts and stub-resolver-like retries, every outcome counted ([`LoadReport`]).
//!
//! Each socket has its own thread; the threads share the rate (the n-th query of the load
//! is due `n / qps` after the start, whichever socket sends it) and sleep in `recv` until
//! the next send, deadline or answer, so a load costs little CPU besides its syscalls.
//! Queries are encoded once per name; a send copies the template and writes the ID.
//!
//! UDP only: there is no TCP fallback, and a truncated answer counts by its RCODE. The
//! sockets are connected to the server, so only its answers are read; ICMP errors the
//! kernel reports on them cannot be told apart per query and are only counted
//! ([`LoadReport::socket_errors`]): the queries concerned time out.
//!
//! It must not be used for benchmarks of latency below ~10 µs: latencies are histogram
//! buckets of about 1% width, in microseconds.
//!
//! Layout: the plan and the sans-IO state of one socket's queries (`core`), the counters
//! and latency histogram (`stats`), the socket threads (`worker`); the spec, the report
//! and the running [`Load`] here.

mod core;
mod stats;
mod worker;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use self::core::{Core, Plan};
use crate::{LabError, Netns, Pod, RecordType};
use stats::Stats;
use worker::Worker;

/// How many sockets (and threads) a load uses, at most one per query per second.
pub const LOAD_SOCKETS: usize = 4;

/// How many failures a [`LoadReport`] lists.
pub const MAX_LISTED_FAILURES: usize = 100;

/// What to send; see [`Netns::start_dns_load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadSpec {
    /// The DNS server (IPv4 or IPv6), over UDP.
    pub server: SocketAddr,
    /// The names asked, in turn.
    pub names: Vec<String>,
    /// The type asked.
    pub qtype: RecordType,
    /// Queries per second, over all sockets (retries come on top).
    pub qps: u32,
    /// How long one try waits for its answer.
    pub timeout: Duration,
    /// How many times a query is sent again (with a new ID) after a try times out or is
    /// answered SERVFAIL or REFUSED, as glibc's stub resolver does; 0 for none.
    pub retries: u32,
}

impl LoadSpec {
    /// `qps` A queries for `names` to `server`, waiting 1 s for each, without retries.
    pub fn new<S: Into<String>>(
        server: SocketAddr,
        names: impl IntoIterator<Item = S>,
        qps: u32,
    ) -> Self {
        Self {
            server,
            names: names.into_iter().map(Into::into).collect(),
            qtype: RecordType::A,
            qps,
            timeout: Duration::from_secs(1),
            retries: 0,
        }
    }
}

/// What a load saw. Outcome counters count queries (not tries) by their last try.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// From the start to [`Load::stop_sending`] or [`Load::stop`] (or to the snapshot): how
    /// long queries were sent.
    pub elapsed: Duration,
    /// Queries sent (first tries).
    pub sent: u64,
    /// Queries answered, with any RCODE.
    pub answered: u64,
    /// Answered NOERROR.
    pub noerror: u64,
    /// Answered NXDOMAIN.
    pub nxdomain: u64,
    /// Answered REFUSED (by every try).
    pub refused: u64,
    /// Answered SERVFAIL (by every try).
    pub servfail: u64,
    /// Answered with another RCODE.
    pub other_rcode: u64,
    /// Not answered by any try.
    pub timed_out: u64,
    /// Tries sent again (a query retried twice counts 2).
    pub retried: u64,
    /// Answers matching no query in flight: late (after their try timed out), duplicated
    /// or not for us.
    pub unmatched: u64,
    /// Errors the sockets reported: ICMP errors for earlier datagrams (port or host
    /// unreachable), failed sends. The queries concerned are counted by their outcome.
    pub socket_errors: u64,
    /// Median latency of answered queries, from their first try.
    pub latency_p50: Duration,
    /// 99th percentile latency of answered queries, from their first try.
    pub latency_p99: Duration,
    /// Highest latency of an answered query.
    pub max_latency: Duration,
    /// The first [`MAX_LISTED_FAILURES`] failed queries (timed out or answered other than
    /// NOERROR): when their first try was sent (since the start), the name, what happened.
    pub failures: Vec<(Duration, String, String)>,
}

impl LoadReport {
    /// Queries that failed: timed out or answered other than NOERROR.
    pub fn failed(&self) -> u64 {
        self.timed_out + self.answered.saturating_sub(self.noerror)
    }

    /// Queries still waiting for an answer (0 after [`Load::stop`]).
    pub fn in_flight(&self) -> u64 {
        self.sent
            .saturating_sub(self.answered)
            .saturating_sub(self.timed_out)
    }

    /// One line for test output.
    pub fn summary(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut s = format!(
            "sent {} in {:.2} s, ok {}, failed {} (timeout {}, SERVFAIL {}, REFUSED {}, \
             NXDOMAIN {}, other {}), retried {}, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.sent,
            self.elapsed.as_secs_f64(),
            self.noerror,
            self.failed(),
            self.timed_out,
            self.servfail,
            self.refused,
            self.nxdomain,
            self.other_rcode,
            self.retried,
            ms(self.latency_p50),
            ms(self.latency_p99),
            ms(self.max_latency),
        );
        for (what, n) in [
            ("in flight", self.in_flight()),
            ("unmatched", self.unmatched),
            ("socket errors", self.socket_errors),
        ] {
            if n > 0 {
                s.push_str(&format!(", {what} {n}"));
            }
        }
        s
    }
}

/// A running load; [`Load::stop`] ends it. Dropping it stops at once, without waiting for
/// the queries in flight.
pub struct Load {
    plan: Arc<Plan>,
    mode: Arc<AtomicU8>,
    workers: Vec<JoinHandle<()>>,
    stats: Vec<Arc<Mutex<Stats>>>,
    /// When [`Load::stop_sending`] was called, since the start.
    stopped: OnceLock<Duration>,
}

impl std::fmt::Debug for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Load")
            .field("qps", &self.plan.qps)
            .field("sockets", &self.plan.sockets)
            .finish_non_exhaustive()
    }
}

/// Sending new queries.
const RUN: u8 = 0;

/// Finishing the queries in flight.
const DRAIN: u8 = 1;

/// Leaving now.
const ABANDON: u8 = 2;

impl Load {
    fn start(netns: &Netns, spec: LoadSpec) -> Result<Self, LabError> {
        let plan = Arc::new(Plan::new(&spec)?);
        let server = spec.server;
        let sockets = netns
            .run(|| {
                (0..plan.sockets)
                    .map(|_| connected(server))
                    .collect::<io::Result<Vec<_>>>()
            })?
            .map_err(|source| LabError::Socket {
                what: "a DNS load socket",
                addr: server,
                source,
            })?;
        let mut load = Self {
            plan: Arc::clone(&plan),
            mode: Arc::new(AtomicU8::new(RUN)),
            workers: Vec::new(),
            stats: Vec::new(),
            stopped: OnceLock::new(),
        };
        for (index, socket) in (0u64..).zip(sockets) {
            let stats = Arc::new(Mutex::new(Stats::default()));
            load.stats.push(Arc::clone(&stats));
            let worker = Worker {
                index,
                socket,
                core: Core::new(Arc::clone(&plan), index),
                mode: Arc::clone(&load.mode),
                stats,
            };
            let thread = std::thread::Builder::new()
                .name(format!("dns-load-{index}"))
                .spawn(move || worker.run())
                .map_err(|source| LabError::Service {
                    what: "DNS load",
                    source,
                })?;
            load.workers.push(thread);
        }
        Ok(load)
    }

    /// Time since the load started (the clock of [`LoadReport::failures`]).
    pub fn elapsed(&self) -> Duration {
        self.plan.start.elapsed()
    }

    /// The counters so far (latencies of the queries answered so far).
    pub fn snapshot(&self) -> LoadReport {
        let elapsed = self.stopped.get().copied();
        self.report(elapsed.unwrap_or_else(|| self.plan.start.elapsed()))
    }

    /// Stops sending new queries, without waiting: to stop several loads at the same time,
    /// call it on each before [`Load::stop`].
    pub fn stop_sending(&self) {
        self.stopped.get_or_init(|| {
            self.mode.store(DRAIN, Ordering::Relaxed);
            self.plan.start.elapsed()
        });
    }

    /// Stops sending, waits for the queries in flight (each at most its timeout, times its
    /// tries) and reports.
    pub fn stop(mut self) -> LoadReport {
        self.stop_sending();
        let elapsed = self.stopped.get().copied().unwrap_or_default();
        for worker in self.workers.drain(..) {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
        self.report(elapsed)
    }

    fn report(&self, elapsed: Duration) -> LoadReport {
        let mut total = Stats::default();
        for stats in &self.stats {
            total.merge(&lock(stats));
        }
        total.report(elapsed)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.mode.store(ABANDON, Ordering::Relaxed);
        for worker in self.workers.drain(..) {
            // A panic was already printed; a destructor cannot report it.
            let _ = worker.join();
        }
    }
}

impl Netns {
    /// Starts sending DNS queries over UDP from this namespace as `spec` says, until
    /// [`Load::stop`]. Fails on an invalid spec (no names, a zero rate or timeout, a name
    /// that is not a domain name) or when the sockets or threads cannot be set up.
    pub fn start_dns_load(&self, spec: LoadSpec) -> Result<Load, LabError> {
        Load::start(self, spec)
    }
}

impl Pod {
    /// Starts a DNS load from the pod (see [`Netns::start_dns_load`]).
    pub fn start_dns_load(&self, spec: LoadSpec) -> Result<Load, LabError> {
        self.netns().start_dns_load(spec)
    }
}

/// A UDP socket connected to `server`, from the wildcard address of its family.
fn connected(server: SocketAddr) -> io::Result<UdpSocket> {
    let socket = match server {
        SocketAddr::V4(_) => UdpSocket::bind(("0.0.0.0", 0))?,
        SocketAddr::V6(_) => UdpSocket::bind(("::", 0))?,
    };
    socket.connect(server)?;
    Ok(socket)
}

fn lock(stats: &Mutex<Stats>) -> MutexGuard<'_, Stats> {
    stats.lock().unwrap_or_else(PoisonError::into_inner)
}
