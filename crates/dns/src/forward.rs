//! The forwarder: the sans-IO state machine between allowed client queries and upstream
//! servers, in the style of `quinn-proto`.
//!
//! It owns every query in flight: the fresh random ID each copy carries on its path (a UDP
//! upstream socket, or one TCP exchange), which answer is the awaited one (a pending ID on
//! that path, from the server asked, to the question asked), when a slow query gets a second
//! copy to another upstream (hedging), when a failed one is asked of another upstream (at
//! most once), when one times out, and which configured upstreams are passed over because
//! they stopped answering ([`health`]).
//!
//! It takes `now` and bytes and returns what to do. [`Forwarder::send`] registers an allowed
//! query; [`Forwarder::handle_answer`], [`Forwarder::handle_send_error`],
//! [`Forwarder::handle_unreachable`] and [`Forwarder::handle_timeout`] tell it what
//! happened; [`Forwarder::poll_transmit`] gives the copies to send,
//! [`Forwarder::poll_event`] the clients owed SERVFAIL and the upstreams gone down or back,
//! [`Forwarder::poll_timeout`] when to call again.
//!
//! It must not do I/O, read the clock, spawn or log: its driver (the proxy's UDP and TCP
//! modules) owns sockets, timers and tasks. Nor does it judge queries or learn from answers:
//! it asks [`Snapshot::decide`] only whether another upstream may take a query, and hands
//! each checked answer ([`check_answer`]) to the driver.

mod choose;
mod events;
pub mod health;
mod pending;
mod retry;
mod slab;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_core::CryptoRng;
use smallvec::SmallVec;

use crate::answer::check_answer;
use crate::query::Query;
use crate::snapshot::Snapshot;
use crate::wire;
use events::question;
use health::Health;
use pending::{copy_waits, hedge_due, Copy, Path, Queued, Request, Timer};
use slab::{Key, Slab};

pub use choose::Choice;
pub use events::{
    Answered, Event, FailReason, Failed, NotSent, Outbound, PathId, Rejection, Route, SendError,
    Sent, Transmit, Transport,
};
pub use health::UpstreamStatus;

/// Copies waiting on one path at most: IDs are 16 bits, and a nearly full table would make
/// a fresh random ID slow to find.
pub const MAX_PENDING_PER_PATH: usize = 32_768;

/// Stale timers kept beyond twice the live ones before they are swept out.
const TIMER_SLACK: usize = 1024;

/// How the forwarder is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwarderConfig {
    /// The configured upstreams (`dns.upstreams`): their health is tracked, and a failed or
    /// slow query is asked of another of them, in this order.
    pub upstreams: Vec<SocketAddr>,
    /// How long a copy waits for its answer (`dns.upstream_timeout`).
    pub timeout: Duration,
    /// When a query that may ask another upstream gets a second copy while the first is
    /// still unanswered (`dns.upstream_hedge_after`); `None`: never.
    pub hedge_after: Option<Duration>,
}

/// The forwarding state machine; `C` is the driver's token for a client, `R` the generator
/// of query IDs.
#[derive(Debug)]
pub struct Forwarder<C, R> {
    config: ForwarderConfig,
    health: Health,
    rng: R,
    paths: Slab<Path>,
    requests: Slab<Request<C>>,
    /// Copies in flight.
    copies: usize,
    /// Copies' deadlines, in the order they fall due (every copy waits as long).
    deadlines: VecDeque<Timer>,
    /// First copies' hedge times, in the order they fall due.
    hedges: VecDeque<Timer>,
    queued: VecDeque<Queued>,
    events: VecDeque<Event<C>>,
}

impl<C, R: CryptoRng> Forwarder<C, R> {
    /// A forwarder with nothing in flight; `rng` draws the query IDs.
    pub fn new(config: ForwarderConfig, rng: R) -> Self {
        Self {
            health: Health::new(&config.upstreams, config.timeout),
            config,
            rng,
            paths: Slab::default(),
            requests: Slab::default(),
            copies: 0,
            deadlines: VecDeque::new(),
            hedges: VecDeque::new(),
            queued: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// A new UDP path (an upstream socket the driver opened).
    pub fn open_path(&mut self) -> PathId {
        PathId(self.paths.insert(Path::default()))
    }

    /// Closes `path` if no copy waits on it any more; whether it is closed (or was).
    pub fn close_path(&mut self, path: PathId) -> bool {
        match self.paths.get(path.0) {
            Some(p) if !p.ids.is_empty() => false,
            _ => {
                self.paths.remove(path.0);
                true
            }
        }
    }

    /// Client queries in flight.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Each configured upstream with its health, in configured order.
    pub fn upstreams(&self) -> impl Iterator<Item = UpstreamStatus> + '_ {
        self.health.report()
    }

    /// Registers `out`, whose query is `query` parsed from `packet`, on `route` under a
    /// fresh random ID, and writes that ID into `packet`; the driver sends it.
    pub fn send(
        &mut self,
        now: Instant,
        route: Route,
        out: Outbound<C>,
        query: &Query,
        packet: &mut [u8],
    ) -> Result<Sent, NotSent<C>> {
        let (path, transport) = match route {
            Route::Udp(path) => (path, Transport::Udp),
            Route::Tcp => (self.open_one_shot(), Transport::Tcp),
        };
        let id = match self.fresh_id(path) {
            Ok(id) => id,
            Err(reason) => {
                self.close_one_shot(path);
                return Err(NotSent {
                    client: out.client,
                    reason,
                });
            }
        };
        let copy = Copy {
            path,
            id,
            upstream: out.upstream,
            learn: out.learn,
            sent: now,
        };
        let key = self.requests.insert(Request {
            client: Some(out.client),
            addr: out.addr,
            received: out.received,
            transport,
            query: SmallVec::from_slice(packet),
            question_end: query.question_end,
            may_retry: out.may_retry,
            queued: false,
            copies: [Some(copy), None],
            failed: None,
        });
        self.track(key, 0, copy);
        if let Some(after) = self.config.hedge_after.filter(|_| out.may_retry) {
            self.hedges.push_back(Timer {
                at: now + after,
                request: key,
                copy: 0,
            });
            if self.hedges.len() > 2 * self.requests.len() + TIMER_SLACK {
                let requests = &self.requests;
                self.hedges.retain(|t| hedge_due(requests, t));
            }
        }
        wire::set_id(packet, id);
        Ok(Sent { path, id })
    }

    /// A message from `from` on `path`. When it answers a copy (a pending ID, the server
    /// asked, the question asked), the copy is done and the packet carries the client's ID.
    pub fn handle_answer(
        &mut self,
        path: PathId,
        from: SocketAddr,
        packet: &mut [u8],
    ) -> Result<Answered<C>, Rejection> {
        let id = wire::id(packet).ok_or(Rejection::UnknownId)?;
        let state = self.paths.get(path.0).ok_or(Rejection::NoPath)?;
        let &(key, k) = state.ids.get(&id).ok_or(Rejection::UnknownId)?;
        let request = self.requests.get(key).ok_or(Rejection::UnknownId)?;
        let copy = request
            .copies
            .get(k)
            .copied()
            .flatten()
            .ok_or(Rejection::UnknownId)?;
        // Only the queried server may answer.
        if copy.upstream != from {
            return Err(Rejection::WrongSource);
        }
        if self.health.answered(copy.upstream) {
            self.events.push_back(Event::UpstreamUp {
                upstream: copy.upstream,
            });
        }
        let answer = check_answer(question(&request.query, request.question_end), packet)
            .map_err(Rejection::NotTheAnswer)?;
        self.untrack(key, k);
        let Some(request) = self.requests.get_mut(key) else {
            return Err(Rejection::UnknownId);
        };
        let client = request.client.take();
        if client.is_some() {
            if let Some(id) = wire::id(&request.query) {
                wire::set_id(packet, id);
            }
        }
        let (query, question_end, addr, received) = if request.waiting() {
            // The other copy is still out: it will find the query answered.
            let r = &*request;
            (r.query.clone(), r.question_end, r.addr, r.received)
        } else {
            let r = self.requests.remove(key).ok_or(Rejection::UnknownId)?;
            (r.query, r.question_end, r.addr, r.received)
        };
        Ok(Answered {
            client,
            addr,
            upstream: copy.upstream,
            learn: copy.learn,
            received,
            sent: copy.sent,
            answer,
            query,
            question_end,
        })
    }

    /// The copy `id` on `path` could not be sent. `snapshot` says which other upstreams
    /// the client may ask instead (so do the other `handle_*` calls).
    pub fn handle_send_error(&mut self, now: Instant, snapshot: &Snapshot, path: PathId, id: u16) {
        let found = self.paths.get(path.0).and_then(|p| p.ids.get(&id)).copied();
        if let Some((key, k)) = found {
            self.lose(now, snapshot, key, k, FailReason::SendFailed);
        }
    }

    /// `path`'s server cannot be reached (for TCP: the exchange failed): no copy waiting on
    /// it will be answered.
    pub fn handle_unreachable(&mut self, now: Instant, snapshot: &Snapshot, path: PathId) {
        let waiting: SmallVec<[(Key, usize); 8]> = match self.paths.get(path.0) {
            Some(p) => p.ids.values().copied().collect(),
            None => return,
        };
        for (key, k) in waiting {
            self.lose(now, snapshot, key, k, FailReason::Unreachable);
        }
    }

    /// Runs the clock to `now`: copies past their deadline are lost, slow queries get a
    /// second copy.
    pub fn handle_timeout(&mut self, now: Instant, snapshot: &Snapshot) {
        while let Some(t) = self.deadlines.front().copied().filter(|t| t.at <= now) {
            self.deadlines.pop_front();
            self.lose(now, snapshot, t.request, t.copy, FailReason::Timeout);
        }
        while let Some(t) = self.hedges.front().copied().filter(|t| t.at <= now) {
            self.hedges.pop_front();
            if !hedge_due(&self.requests, &t) {
                continue;
            }
            let Some(request) = self.requests.get_mut(t.request) else {
                continue;
            };
            let Some(first) = request.copies.first().copied().flatten() else {
                continue;
            };
            // One other upstream per query: this copy, or none.
            request.may_retry = false;
            let other = choose::alternative(
                &mut self.health,
                &self.config.upstreams,
                now,
                snapshot,
                request,
                first.upstream,
            );
            if let Some((server, learn)) = other {
                request.queued = true;
                self.queued.push_back(Queued {
                    request: t.request,
                    from: first.upstream,
                    server,
                    learn,
                    hedge: true,
                });
            }
        }
    }

    /// When [`Self::handle_timeout`] is next due.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let requests = &self.requests;
        while self
            .deadlines
            .front()
            .is_some_and(|t| !copy_waits(requests, t))
        {
            self.deadlines.pop_front();
        }
        while self.hedges.front().is_some_and(|t| !hedge_due(requests, t)) {
            self.hedges.pop_front();
        }
        let deadline = self.deadlines.front().map(|t| t.at);
        let hedge = self.hedges.front().map(|t| t.at);
        match (deadline, hedge) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next copy to send to another upstream (the first configured upstream, other than
    /// the one the query went to first, that the client may ask for the name and that is
    /// not marked down, chosen when the first copy failed or was found slow).
    /// `path_for(server)` names the UDP path it leaves on (TCP copies get a fresh path).
    /// Call it after every `handle_*` call, until `None`, then [`Self::poll_event`].
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        mut path_for: impl FnMut(SocketAddr) -> Option<PathId>,
    ) -> Option<Transmit> {
        while let Some(q) = self.queued.pop_front() {
            if let Some(t) = self.second_copy(now, q, &mut path_for) {
                return Some(t);
            }
            // Not sent: the query waits for its first copy, or has failed.
            self.settle(None, now, q.request);
        }
        None
    }

    /// What the driver must act on next.
    pub fn poll_event(&mut self) -> Option<Event<C>> {
        self.events.pop_front()
    }

    /// Whether [`Self::poll_transmit`] or [`Self::poll_event`] has something.
    pub fn has_output(&self) -> bool {
        !self.queued.is_empty() || !self.events.is_empty()
    }
}

#[cfg(test)]
mod tests;
