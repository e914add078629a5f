//! Where transparent UDP replies leave from: a pool of reply paths by the server address
//! they answer from, and each client's budget of new ones.
//!
//! A reply to a pod must come from the address the pod asked, so each server address
//! needs a reply path of its own (a transparent socket bound to it, or the raw sockets),
//! and setting one up costs system calls. Pods ask few servers, so the pool keeps the paths
//! in use and a query to a known server costs no system call. A pod that asks a new
//! address with every query would make the proxy do that work for each: so each client
//! may set up only `dns.transparent.client_new_servers_per_second` new paths per second
//! (bursts of twice as many), checked before any socket work; its other queries to new
//! addresses are dropped unanswered (its resolver asks again), and nobody else pays.
//!
//! The pool is a least-recently-used cache of [`MAX_REPLY_SOCKETS`] paths. A hit only
//! stamps its entry; the eviction order is brought up to date lazily, when a path must
//! go, so both cost O(1) amortized (O(log n) for the order's tree).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::reply::{RawSender, ReplyVia};
use crate::sys;

/// Reply paths kept at once. Past this many, the one used longest ago is closed (queries
/// waiting for an answer keep theirs until they are answered).
pub(crate) const MAX_REPLY_SOCKETS: usize = 256;

/// Clients whose budgets are remembered before idle ones are forgotten.
const MAX_CLIENTS: usize = 4096;

/// A budget unused for this long is full again, and may be forgotten.
const CLIENT_IDLE: Duration = Duration::from_secs(10);

/// The reply path for a query, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Path<T> {
    /// Reply through this.
    Via(T),
    /// The client set up its share of new paths this second: drop the query. `report`
    /// is true for the first such query of the client in a second (for its flow event).
    OverBudget {
        /// Whether to report it.
        report: bool,
    },
}

/// A client's budget of new reply paths: a token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// When the last refusal was reported.
    reported: Option<Instant>,
}

/// Reply paths by server address, with per-client budgets of new ones. Generic over the
/// path, so its bookkeeping is tested without sockets.
#[derive(Debug)]
pub(crate) struct Pool<T> {
    /// Each path with the turn it was last used on.
    paths: HashMap<SocketAddr, (T, u64)>,
    /// Eviction order: each path under the turn it had when last ordered (older than
    /// its stamp if it was used since).
    order: BTreeMap<u64, SocketAddr>,
    turn: u64,
    capacity: usize,
    /// New paths per second per client, and the burst.
    rate: f64,
    burst: f64,
    clients: HashMap<IpAddr, Bucket>,
}

impl<T: Clone> Pool<T> {
    /// A pool of `capacity` paths whose clients may each open `per_second` new ones per
    /// second, in bursts of twice as many.
    pub(crate) fn new(capacity: usize, per_second: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        Self {
            paths: HashMap::new(),
            order: BTreeMap::new(),
            turn: 0,
            capacity: capacity.max(1),
            rate,
            burst: 2.0 * rate,
            clients: HashMap::new(),
        }
    }

    /// The path replies from `from` take, for `client` at `now`: the pooled one, else one
    /// `open` makes if the client's budget allows.
    pub(crate) fn get(
        &mut self,
        from: SocketAddr,
        client: IpAddr,
        now: Instant,
        open: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<Path<T>> {
        self.turn += 1;
        if let Some((path, used)) = self.paths.get_mut(&from) {
            *used = self.turn;
            return Ok(Path::Via(path.clone()));
        }
        if let Some(report) = self.over_budget(client, now) {
            return Ok(Path::OverBudget { report });
        }
        let path = open()?;
        if self.paths.len() >= self.capacity {
            self.evict();
        }
        self.paths.insert(from, (path.clone(), self.turn));
        self.order.insert(self.turn, from);
        Ok(Path::Via(path))
    }

    /// Takes one token of `client`'s budget; `Some(report)` when there is none.
    fn over_budget(&mut self, client: IpAddr, now: Instant) -> Option<bool> {
        if self.clients.len() >= MAX_CLIENTS && !self.clients.contains_key(&client) {
            self.clients
                .retain(|_, b| now.saturating_duration_since(b.at) < CLIENT_IDLE);
        }
        let (rate, burst) = (self.rate, self.burst);
        let bucket = self.clients.entry(client).or_insert(Bucket {
            tokens: burst,
            at: now,
            reported: None,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return None;
        }
        let report = bucket
            .reported
            .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
        if report {
            bucket.reported = Some(now);
        }
        Some(report)
    }

    /// Closes the path used longest ago.
    fn evict(&mut self) {
        while let Some((ordered, from)) = self.order.pop_first() {
            match self.paths.get(&from) {
                Some((_, used)) if *used == ordered => {
                    self.paths.remove(&from);
                    return;
                }
                // Used since it was ordered: ordered again under its latest turn.
                Some((_, used)) => {
                    self.order.insert(*used, from);
                }
                None => {}
            }
        }
    }

    /// How many paths are pooled.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.paths.len()
    }
}

/// The transparent listener's reply paths: a socket bound to each server address, or,
/// when another socket on the node holds that address, the raw sockets.
pub(crate) struct ReplySockets {
    pool: Pool<ReplyVia>,
    /// For addresses another socket on the node holds (opened on first need).
    raw: Option<Arc<RawSender>>,
    /// Opening the raw sockets failed (no `CAP_NET_RAW`): such addresses get a bound
    /// socket after all, with a warning.
    raw_failed: bool,
}

impl ReplySockets {
    /// Reply paths whose clients may each set up `per_second` new ones per second.
    pub(crate) fn new(per_second: u32) -> Self {
        Self {
            pool: Pool::new(MAX_REPLY_SOCKETS, per_second),
            raw: None,
            raw_failed: false,
        }
    }

    /// How `client`'s replies from `from` are sent (see [`Pool::get`]).
    pub(crate) fn get(
        &mut self,
        from: SocketAddr,
        client: IpAddr,
        now: Instant,
    ) -> io::Result<Path<ReplyVia>> {
        let Self {
            pool,
            raw,
            raw_failed,
        } = self;
        pool.get(from, client, now, || {
            match sys::bound_elsewhere(from)
                .then(|| open_raw(raw, raw_failed))
                .flatten()
            {
                Some(raw) => {
                    tracing::info!(server = %from, "another socket on this node holds the DNS server's address; its replies are sent through a raw socket");
                    Ok(ReplyVia::Raw { from, raw })
                }
                None => Ok(ReplyVia::Socket(Arc::new(sys::reply_socket(from)?))),
            }
        })
    }
}

/// The raw sockets, opened on first need; `None` when they cannot be.
fn open_raw(raw: &mut Option<Arc<RawSender>>, failed: &mut bool) -> Option<Arc<RawSender>> {
    if raw.is_none() && !*failed {
        match RawSender::new() {
            Ok(r) => *raw = Some(Arc::new(r)),
            Err(e) => {
                *failed = true;
                tracing::warn!(error = %e, "cannot open raw sockets: replies from an address another socket on this node holds (a DNS server on the node itself) go through a socket bound to it, which can take some of that server's traffic; see docs/proxy.md");
            }
        }
    }
    raw.clone()
}

#[cfg(test)]
mod tests;
