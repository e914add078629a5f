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

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{LabError, Netns, Pod, RecordType};

/// How many sockets (and threads) a load uses, at most one per query per second.
pub const LOAD_SOCKETS: usize = 4;

/// How many failures a [`LoadReport`] lists.
pub const MAX_LISTED_FAILURES: usize = 100;

/// How often an idle worker looks whether it was stopped.
const STOP_POLL: Duration = Duration::from_millis(20);

/// How many due queries a worker sends before reading answers again.
const MAX_BURST: u64 = 64;

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

/// What every worker shares: the queries, the schedule and the limits.
#[derive(Debug)]
struct Plan {
    names: Vec<String>,
    /// One query per name, ID 0.
    templates: Vec<Vec<u8>>,
    qps: u32,
    sockets: u64,
    timeout: Duration,
    tries: u32,
    start: Instant,
}

impl Plan {
    fn new(spec: &LoadSpec) -> Result<Self, LabError> {
        if spec.names.is_empty() || spec.qps == 0 || spec.timeout.is_zero() {
            return Err(LabError::Invalid(
                "a DNS load needs names, a rate and a timeout",
            ));
        }
        let templates = spec
            .names
            .iter()
            .map(|name| crate::query::encode(name, spec.qtype))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            names: spec.names.clone(),
            templates,
            qps: spec.qps,
            sockets: u64::from(spec.qps).min(LOAD_SOCKETS as u64),
            timeout: spec.timeout,
            tries: spec.retries.saturating_add(1),
            start: Instant::now(),
        })
    }

    /// When the `n`-th query of the load is due.
    fn due(&self, n: u64) -> Instant {
        let nanos = u128::from(n) * 1_000_000_000 / u128::from(self.qps);
        self.start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// One try in flight.
#[derive(Debug, Clone, Copy)]
struct Flight {
    /// Which name (index into the plan).
    name: usize,
    /// When the query's first try was sent.
    first_sent: Instant,
    /// Tries so far, this one included.
    tries: u32,
    /// Unique per try of a worker, to recognise stale deadlines.
    seq: u64,
}

/// The queries in flight on one socket, without the socket: what to send, what an answer
/// or the clock means. Time is a parameter.
#[derive(Debug)]
struct Core {
    plan: Arc<Plan>,
    flights: HashMap<u16, Flight>,
    /// Deadlines in send order, hence in time order (every try has the same timeout).
    deadlines: VecDeque<(Instant, u16, u64)>,
    /// Queries to send again.
    retries: Vec<Flight>,
    next_id: u16,
    next_seq: u64,
}

impl Core {
    fn new(plan: Arc<Plan>, index: u64) -> Self {
        let expected = u64::from(plan.qps) * (plan.timeout.as_millis() as u64 + 1) / 1000;
        let capacity = (expected * u64::from(plan.tries) / plan.sockets).min(1 << 16) as usize;
        Self {
            plan,
            flights: HashMap::with_capacity(capacity),
            deadlines: VecDeque::with_capacity(capacity),
            retries: Vec::new(),
            next_id: (index as u16).wrapping_mul(0x4000) | 0x0dd,
            next_seq: 0,
        }
    }

    /// Registers a try of `flight` sent at `now` and writes its query into `out`; false
    /// when every ID is in flight.
    fn launch(&mut self, now: Instant, mut flight: Flight, out: &mut Vec<u8>) -> bool {
        let Some(id) = (0..=u16::MAX)
            .map(|i| self.next_id.wrapping_add(i))
            .find(|id| !self.flights.contains_key(id))
        else {
            return false;
        };
        self.next_id = id.wrapping_add(1);
        flight.seq = self.next_seq;
        self.next_seq += 1;
        self.flights.insert(id, flight);
        self.deadlines
            .push_back((now + self.plan.timeout, id, flight.seq));
        out.clear();
        out.extend_from_slice(&self.plan.templates[flight.name]);
        if let Some(header) = out.get_mut(..2) {
            header.copy_from_slice(&id.to_be_bytes());
        }
        true
    }

    /// Takes a datagram received at `now`.
    fn answer(&mut self, now: Instant, message: &[u8], stats: &mut Stats) {
        let Some(&[id0, id1, flags, rcode, 0, 1]) = message.get(..6) else {
            stats.unmatched += 1;
            return;
        };
        let id = u16::from_be_bytes([id0, id1]);
        let matches = |flight: &Flight| {
            let question = self.plan.templates[flight.name]
                .get(12..)
                .unwrap_or_default();
            let asked = message.get(12..12 + question.len());
            flags & 0x80 != 0 && asked.is_some_and(|a| a.eq_ignore_ascii_case(question))
        };
        let Some(flight) = self.flights.get(&id).copied().filter(matches) else {
            stats.unmatched += 1;
            return;
        };
        self.flights.remove(&id);
        let outcome = match rcode & 0x0f {
            0 => Outcome::NoError,
            2 => Outcome::ServFail,
            3 => Outcome::NxDomain,
            5 => Outcome::Refused,
            other => Outcome::Other(other),
        };
        if matches!(outcome, Outcome::ServFail | Outcome::Refused) && self.retry(flight) {
            return;
        }
        stats.finish(now, &self.plan, flight, outcome);
    }

    /// Ends the tries whose deadline passed at `now`: retried or timed out.
    fn expire(&mut self, now: Instant, stats: &mut Stats) {
        while let Some(&(deadline, id, seq)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            let Some(flight) = self.flights.get(&id).copied().filter(|f| f.seq == seq) else {
                continue; // answered
            };
            self.flights.remove(&id);
            if !self.retry(flight) {
                stats.finish(now, &self.plan, flight, Outcome::TimedOut);
            }
        }
    }

    /// Queues `flight` to be sent again, if it has tries left.
    fn retry(&mut self, flight: Flight) -> bool {
        if flight.tries >= self.plan.tries {
            return false;
        }
        self.retries.push(Flight {
            tries: flight.tries + 1,
            ..flight
        });
        true
    }

    /// When [`Core::expire`] may have something to do.
    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|&(deadline, ..)| deadline)
    }

    fn is_idle(&self) -> bool {
        self.flights.is_empty() && self.retries.is_empty()
    }
}

/// How a query ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    NoError,
    NxDomain,
    ServFail,
    Refused,
    Other(u8),
    TimedOut,
}

/// A worker's counters, read by [`Load::snapshot`].
#[derive(Debug, Clone, Default)]
struct Stats {
    sent: u64,
    answered: u64,
    noerror: u64,
    nxdomain: u64,
    refused: u64,
    servfail: u64,
    other_rcode: u64,
    timed_out: u64,
    retried: u64,
    unmatched: u64,
    socket_errors: u64,
    latencies: Histogram,
    failures: Vec<(Duration, String, String)>,
}

impl Stats {
    fn finish(&mut self, now: Instant, plan: &Plan, flight: Flight, outcome: Outcome) {
        let counter = match outcome {
            Outcome::NoError => &mut self.noerror,
            Outcome::NxDomain => &mut self.nxdomain,
            Outcome::ServFail => &mut self.servfail,
            Outcome::Refused => &mut self.refused,
            Outcome::Other(_) => &mut self.other_rcode,
            Outcome::TimedOut => &mut self.timed_out,
        };
        *counter += 1;
        if outcome != Outcome::TimedOut {
            self.answered += 1;
            self.latencies
                .record(now.saturating_duration_since(flight.first_sent));
        }
        if outcome != Outcome::NoError && self.failures.len() < MAX_LISTED_FAILURES {
            let what = match outcome {
                Outcome::TimedOut => format!("timed out ({} tries)", flight.tries),
                Outcome::Other(rcode) => format!("RCODE {rcode}"),
                other => format!("{other:?}").to_ascii_uppercase(),
            };
            let when = flight.first_sent.saturating_duration_since(plan.start);
            let name = plan.names[flight.name].clone();
            self.failures.push((when, name, what));
        }
    }

    fn merge(&mut self, other: &Self) {
        self.sent += other.sent;
        self.answered += other.answered;
        self.noerror += other.noerror;
        self.nxdomain += other.nxdomain;
        self.refused += other.refused;
        self.servfail += other.servfail;
        self.other_rcode += other.other_rcode;
        self.timed_out += other.timed_out;
        self.retried += other.retried;
        self.unmatched += other.unmatched;
        self.socket_errors += other.socket_errors;
        self.latencies.merge(&other.latencies);
        self.failures.extend(other.failures.iter().cloned());
    }

    fn report(mut self, elapsed: Duration) -> LoadReport {
        self.failures.sort_by_key(|(when, ..)| *when);
        self.failures.truncate(MAX_LISTED_FAILURES);
        LoadReport {
            elapsed,
            sent: self.sent,
            answered: self.answered,
            noerror: self.noerror,
            nxdomain: self.nxdomain,
            refused: self.refused,
            servfail: self.servfail,
            other_rcode: self.other_rcode,
            timed_out: self.timed_out,
            retried: self.retried,
            unmatched: self.unmatched,
            socket_errors: self.socket_errors,
            latency_p50: self.latencies.percentile(50),
            latency_p99: self.latencies.percentile(99),
            max_latency: self.latencies.max,
            failures: self.failures,
        }
    }
}

/// Latencies in microseconds, in buckets of 1/128 of a power of two (exact below 128 µs).
#[derive(Debug, Clone)]
struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    max: Duration,
}

/// Bits of a bucket's mantissa.
const SUB_BITS: u32 = 7;
/// Latencies are clamped below 2^40 µs (12 days).
const MAX_BITS: u32 = 40;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; ((MAX_BITS - SUB_BITS + 1) << SUB_BITS) as usize].into(),
            total: 0,
            max: Duration::ZERO,
        }
    }
}

impl Histogram {
    fn bucket(micros: u64) -> usize {
        let v = micros.min((1 << MAX_BITS) - 1);
        if v < 1 << SUB_BITS {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros();
        let mantissa = (v >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
        (((exp - SUB_BITS + 1) << SUB_BITS) as u64 + mantissa) as usize
    }

    /// The middle of a bucket, in microseconds.
    fn value(bucket: usize) -> u64 {
        let i = bucket as u64;
        if i < 1 << SUB_BITS {
            return i;
        }
        let shift = (i >> SUB_BITS) - 1;
        let low = ((1 << SUB_BITS) + (i & ((1 << SUB_BITS) - 1))) << shift;
        low + ((1 << shift) >> 1)
    }

    fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        if let Some(count) = self.counts.get_mut(Self::bucket(micros)) {
            *count += 1;
        }
        self.total += 1;
        self.max = self.max.max(latency);
    }

    fn merge(&mut self, other: &Self) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The latency `percent`% of the recorded ones do not exceed (zero when none).
    fn percentile(&self, percent: u64) -> Duration {
        let rank = (self.total * percent).div_ceil(100).max(1);
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_micros(Self::value(bucket)).min(self.max);
            }
        }
        Duration::ZERO
    }
}

/// A socket's thread: sends on schedule, reads answers, expires deadlines.
struct Worker {
    index: u64,
    socket: UdpSocket,
    core: Core,
    mode: Arc<AtomicU8>,
    stats: Arc<Mutex<Stats>>,
}

impl Worker {
    fn run(mut self) {
        let plan = Arc::clone(&self.core.plan);
        let mut query = Vec::with_capacity(512);
        let mut buf = vec![0; 65_535];
        // This worker sends queries index, index + sockets, index + 2 * sockets, ...
        let mut next = self.index;
        loop {
            let mode = self.mode.load(Ordering::Relaxed);
            if mode == ABANDON {
                return;
            }
            let now = Instant::now();
            {
                let stats = &mut *lock(&self.stats);
                self.core.expire(now, stats);
                while let Some(flight) = self.core.retries.pop() {
                    if self.core.launch(now, flight, &mut query) {
                        stats.retried += 1;
                        self.send(&query, stats);
                    } else {
                        // Every ID in flight: the try cannot even be sent.
                        stats.finish(now, &plan, flight, Outcome::TimedOut);
                    }
                }
                if mode == RUN {
                    let names = plan.names.len() as u64;
                    for _ in 0..MAX_BURST {
                        if plan.due(next) > now {
                            break;
                        }
                        let flight = Flight {
                            name: (next % names) as usize,
                            first_sent: now,
                            tries: 1,
                            seq: 0,
                        };
                        if self.core.launch(now, flight, &mut query) {
                            stats.sent += 1;
                            self.send(&query, stats);
                        }
                        next += plan.sockets;
                    }
                } else if self.core.is_idle() {
                    return;
                }
            }
            let mut wake = now + STOP_POLL;
            if mode == RUN {
                wake = wake.min(plan.due(next));
            }
            if let Some(deadline) = self.core.next_deadline() {
                wake = wake.min(deadline);
            }
            self.receive(wake, &mut buf);
        }
    }

    /// Sends `query`, once more if the socket first reports an error for an earlier
    /// datagram; a try whose send fails is left to time out.
    fn send(&self, query: &[u8], stats: &mut Stats) {
        for _ in 0..2 {
            match self.socket.send(query) {
                Ok(_) => return,
                Err(_) => stats.socket_errors += 1,
            }
        }
    }

    /// Waits for one datagram until `wake` at most, and takes it.
    fn receive(&mut self, wake: Instant, buf: &mut [u8]) {
        // A zero read timeout means forever; the smallest one the kernel takes is 1 µs.
        let wait = wake
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(1));
        let received = self
            .socket
            .set_read_timeout(Some(wait))
            .and_then(|()| self.socket.recv(buf));
        match received {
            Ok(len) => {
                let now = Instant::now();
                let message = buf.get(..len).unwrap_or_default();
                self.core.answer(now, message, &mut lock(&self.stats));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => lock(&self.stats).socket_errors += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(retries: u32) -> Arc<Plan> {
        let spec = LoadSpec {
            retries,
            ..LoadSpec::new(crate::DNS_V4, ["a.example", "b.example"], 100)
        };
        Arc::new(Plan::new(&spec).unwrap())
    }

    fn flight(name: usize, now: Instant) -> Flight {
        Flight {
            name,
            first_sent: now,
            tries: 1,
            seq: 0,
        }
    }

    /// The answer to `query` with `rcode` (no records: only the header matters).
    fn answer(query: &[u8], rcode: u8) -> Vec<u8> {
        let mut a = query.to_vec();
        a[2] |= 0x80;
        a[3] = (a[3] & 0xf0) | rcode;
        a
    }

    #[test]
    fn answers_match_by_id_and_question() {
        let (t0, mut stats, mut q) = (Instant::now(), Stats::default(), Vec::new());
        let mut core = Core::new(plan(0), 0);
        assert!(core.launch(t0, flight(0, t0), &mut q));
        let mut wrong_name = answer(&q, 0);
        wrong_name[13] = b'b';
        core.answer(t0, &wrong_name, &mut stats);
        core.answer(t0, &q, &mut stats); // not a response
        assert_eq!((stats.unmatched, stats.answered), (2, 0));

        core.answer(t0 + Duration::from_millis(3), &answer(&q, 0), &mut stats);
        core.answer(t0, &answer(&q, 0), &mut stats); // duplicate
        assert_eq!((stats.noerror, stats.unmatched), (1, 3));
        assert!(core.is_idle() && stats.failures.is_empty());
        assert_eq!(stats.latencies.percentile(50), Duration::from_millis(3));
        core.expire(t0 + Duration::from_secs(5), &mut stats);
        assert_eq!(stats.timed_out, 0);
    }

    #[test]
    fn timeouts_and_servfail_are_retried_with_new_ids_then_counted() {
        let (t0, mut stats, mut q) = (Instant::now(), Stats::default(), Vec::new());
        let mut core = Core::new(plan(1), 1);
        assert!(core.launch(t0, flight(1, t0), &mut q));
        let first = q.clone();
        core.expire(t0 + Duration::from_millis(999), &mut stats);
        assert!(core.retries.is_empty());
        core.expire(t0 + Duration::from_secs(1), &mut stats);
        let retry = core.retries.pop().unwrap();
        assert_eq!(retry.tries, 2);
        assert!(core.launch(t0 + Duration::from_secs(1), retry, &mut q));
        assert_ne!(q[..2], first[..2], "a retry has a new ID");
        core.answer(t0, &answer(&first, 0), &mut stats); // late
        core.expire(t0 + Duration::from_secs(2), &mut stats);
        assert_eq!(
            (stats.unmatched, stats.timed_out, stats.answered),
            (1, 1, 0)
        );
        assert_eq!(stats.failures[0].1, "b.example");
        assert_eq!(stats.failures[0].2, "timed out (2 tries)");

        assert!(core.launch(t0, flight(0, t0), &mut q));
        core.answer(t0, &answer(&q, 2), &mut stats);
        let retry = core.retries.pop().unwrap();
        assert!(core.launch(t0, retry, &mut q));
        core.answer(t0, &answer(&q, 2), &mut stats);
        assert_eq!((stats.servfail, stats.answered), (1, 1));
        assert_eq!(stats.failures[1].2, "SERVFAIL");
        assert!(core.is_idle());
    }

    #[test]
    fn histogram_buckets_are_within_one_percent() {
        for micros in [0, 1, 127, 128, 129, 255, 256, 1000, 123_456, 9_999_999] {
            let value = Histogram::value(Histogram::bucket(micros));
            assert!(
                value.abs_diff(micros) <= micros / 128,
                "{micros} -> {value}"
            );
        }
        let mut h = Histogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.percentile(50).as_secs_f64();
        assert!((0.0495..0.0505).contains(&p50), "{p50}");
        assert!(h.percentile(99) <= Duration::from_millis(100));
        assert_eq!(h.max, Duration::from_millis(100));
    }

    #[test]
    fn the_schedule_spreads_queries_evenly() {
        let plan = plan(0);
        assert_eq!(plan.due(0), plan.start);
        assert_eq!(plan.due(250) - plan.start, Duration::from_millis(2500));
    }
}
