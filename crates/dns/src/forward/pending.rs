//! The queries in flight: each client query with its copies, the copies waiting on each
//! path by ID, and the timelines of deadlines and hedges. It must not decide anything: the
//! forwarder does, on what is recorded here.

use std::net::SocketAddr;
use std::time::Instant;

use rand_core::CryptoRng;
use smallvec::SmallVec;

use super::events::{FailReason, PathId, SendError, Transport};
use super::slab::{Key, Slab};
use super::{Forwarder, MAX_PENDING_PER_PATH, TIMER_SLACK};

/// One copy of a query, on its way to an upstream.
#[derive(Debug, Clone, Copy)]
pub(super) struct Copy {
    pub(super) path: PathId,
    pub(super) id: u16,
    pub(super) upstream: SocketAddr,
    pub(super) learn: bool,
    pub(super) sent: Instant,
}

/// One client query and its copies: the first (index 0) and, at most once, a second one to
/// another upstream (index 1: a hedge, or a retry once the first failed).
#[derive(Debug)]
pub(super) struct Request<C> {
    /// `None` once the client has its answer (a copy may still be out).
    pub(super) client: Option<C>,
    pub(super) addr: SocketAddr,
    pub(super) received: Instant,
    pub(super) transport: Transport,
    /// The query as the client sent it (its ID, its question at `12..question_end`),
    /// inline for queries of ordinary size.
    pub(super) query: SmallVec<[u8; 128]>,
    pub(super) question_end: usize,
    /// Whether another upstream may still be asked.
    pub(super) may_retry: bool,
    /// A second copy waits for [`Forwarder::poll_transmit`].
    pub(super) queued: bool,
    pub(super) copies: [Option<Copy>; 2],
    /// The copy that failed last, and why.
    pub(super) failed: Option<(SocketAddr, FailReason)>,
}

impl<C> Request<C> {
    pub(super) fn waiting(&self) -> bool {
        self.queued || self.copies.iter().any(Option::is_some)
    }
}

/// The copies waiting on one path, by ID.
#[derive(Debug, Default)]
pub(super) struct Path {
    /// foldhash: cheap, and only this forwarder picks the keys.
    pub(super) ids: foldhash::HashMap<u16, (Key, usize)>,
    /// A TCP exchange: closed with its one copy.
    pub(super) one_shot: bool,
}

/// When a copy's deadline or a query's hedge is due.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timer {
    pub(super) at: Instant,
    pub(super) request: Key,
    pub(super) copy: usize,
}

/// A second copy decided on, sent by [`Forwarder::poll_transmit`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Queued {
    pub(super) request: Key,
    /// The upstream the query went to first.
    pub(super) from: SocketAddr,
    /// The one the copy goes to, and whether its answer may teach IPs.
    pub(super) server: SocketAddr,
    pub(super) learn: bool,
    pub(super) hedge: bool,
}

impl<C, R: CryptoRng> Forwarder<C, R> {
    /// Puts `copy`, copy `k` of `key`, in its path's table and on the timeline.
    pub(super) fn track(&mut self, key: Key, k: usize, copy: Copy) {
        if let Some(path) = self.paths.get_mut(copy.path.0) {
            path.ids.insert(copy.id, (key, k));
        }
        self.copies += 1;
        self.deadlines.push_back(Timer {
            at: copy.sent + self.config.timeout,
            request: key,
            copy: k,
        });
        if self.deadlines.len() > 2 * self.copies + TIMER_SLACK {
            let requests = &self.requests;
            self.deadlines.retain(|t| copy_waits(requests, t));
        }
    }

    /// Takes copy `k` of `key` off its path and the timeline; returns it.
    pub(super) fn untrack(&mut self, key: Key, k: usize) -> Option<Copy> {
        let copy = self.requests.get_mut(key)?.copies.get_mut(k)?.take()?;
        self.copies -= 1;
        if let Some(path) = self.paths.get_mut(copy.path.0) {
            path.ids.remove(&copy.id);
        }
        self.close_one_shot(copy.path);
        Some(copy)
    }

    /// A fresh random ID on `path`.
    pub(super) fn fresh_id(&mut self, path: PathId) -> Result<u16, SendError> {
        let ids = &self.paths.get(path.0).ok_or(SendError::NoPath)?.ids;
        if ids.len() >= MAX_PENDING_PER_PATH {
            return Err(SendError::NoFreeId);
        }
        let mut draw = || {
            let [a, b, _, _] = self.rng.next_u32().to_le_bytes();
            u16::from_le_bytes([a, b])
        };
        // The table is at most half full: a free ID is two draws away on average.
        for _ in 0..16 {
            let id = draw();
            if !ids.contains_key(&id) {
                return Ok(id);
            }
        }
        // A generator this unlucky repeats itself: the first free ID after a draw.
        let start = draw();
        (0..=u16::MAX)
            .map(|k| start.wrapping_add(k))
            .find(|id| !ids.contains_key(id))
            .ok_or(SendError::NoFreeId)
    }

    pub(super) fn open_one_shot(&mut self) -> PathId {
        PathId(self.paths.insert(Path {
            ids: foldhash::HashMap::default(),
            one_shot: true,
        }))
    }

    /// Closes `path` if it is a TCP exchange with no copy left.
    pub(super) fn close_one_shot(&mut self, path: PathId) {
        if self
            .paths
            .get(path.0)
            .is_some_and(|p| p.one_shot && p.ids.is_empty())
        {
            self.paths.remove(path.0);
        }
    }
}

/// Whether the copy a deadline is for still waits.
pub(super) fn copy_waits<C>(requests: &Slab<Request<C>>, t: &Timer) -> bool {
    requests
        .get(t.request)
        .and_then(|r| r.copies.get(t.copy))
        .is_some_and(Option::is_some)
}

/// Whether the query a hedge time is for still wants a second copy: unanswered, its first
/// copy out, no other upstream asked yet.
pub(super) fn hedge_due<C>(requests: &Slab<Request<C>>, t: &Timer) -> bool {
    requests.get(t.request).is_some_and(|r| {
        r.may_retry
            && !r.queued
            && r.client.is_some()
            && r.copies.first().is_some_and(Option::is_some)
    })
}
