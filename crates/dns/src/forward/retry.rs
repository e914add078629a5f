//! What becomes of a copy that got no answer: it counts against its upstream's health,
//! then, unless another copy still waits, the query is asked of another upstream (at most
//! once per query) or its client is owed SERVFAIL. Also turns queued second copies into
//! [`Transmit`]s. It must not pick servers itself ([`super::choose`] does) nor send.

use std::net::SocketAddr;
use std::time::Instant;

use rand_core::CryptoRng;

use super::choose;
use super::events::{Event, FailReason, Failed, PathId, Transmit, Transport};
use super::pending::{Copy, Queued, Request};
use super::slab::Key;
use super::Forwarder;
use crate::snapshot::Snapshot;
use crate::wire;

impl<C, R: CryptoRng> Forwarder<C, R> {
    /// Materializes the queued copy `q`; `None` when it cannot (or need not) be sent.
    pub(super) fn second_copy(
        &mut self,
        now: Instant,
        q: Queued,
        path_for: &mut impl FnMut(SocketAddr) -> Option<PathId>,
    ) -> Option<Transmit> {
        let request = self.requests.get_mut(q.request)?;
        request.queued = false;
        // Answered meanwhile.
        request.client.as_ref()?;
        let transport = request.transport;
        let (server, learn) = (q.server, q.learn);
        let path = match transport {
            Transport::Udp => path_for(server)?,
            Transport::Tcp => self.open_one_shot(),
        };
        let Ok(id) = self.fresh_id(path) else {
            self.close_one_shot(path);
            return None;
        };
        let copy = Copy {
            path,
            id,
            upstream: server,
            learn,
            sent: now,
        };
        let request = self.requests.get_mut(q.request)?;
        let slot = request.copies.get_mut(1)?;
        *slot = Some(copy);
        let mut contents = request.query.to_vec();
        wire::set_id(&mut contents, id);
        self.track(q.request, 1, copy);
        Some(Transmit {
            path,
            transport,
            server,
            from: q.from,
            hedge: q.hedge,
            id,
            contents,
        })
    }

    /// Copy `k` of `key` got no answer: counted against its upstream's health, then the
    /// query is settled (see [`Self::settle`]).
    pub(super) fn lose(
        &mut self,
        now: Instant,
        snapshot: &Snapshot,
        key: Key,
        k: usize,
        reason: FailReason,
    ) {
        let Some(copy) = self.untrack(key, k) else {
            return;
        };
        self.events.push_back(Event::Lost {
            upstream: copy.upstream,
            reason,
        });
        if let Some(unanswered) = self.health.failed(copy.upstream, now) {
            self.events.push_back(Event::UpstreamDown {
                upstream: copy.upstream,
                unanswered,
            });
        }
        if let Some(request) = self.requests.get_mut(key) {
            request.failed = Some((copy.upstream, reason));
        }
        self.settle(Some(snapshot), now, key);
    }

    /// A copy of `key` is done without an answer: unless another copy still waits or the
    /// client has its answer, the query goes to another upstream (once, when it may, and
    /// when `snapshot` is given to choose it), or its client is owed SERVFAIL.
    pub(super) fn settle(&mut self, snapshot: Option<&Snapshot>, now: Instant, key: Key) {
        let Some(request) = self.requests.get_mut(key) else {
            return;
        };
        if request.waiting() {
            return;
        }
        if let (Some(snapshot), Some((from, _)), true) = (
            snapshot,
            request.failed,
            request.may_retry && request.client.is_some(),
        ) {
            request.may_retry = false;
            let other = choose::alternative(
                &mut self.health,
                &self.config.upstreams,
                now,
                snapshot,
                request,
                from,
            );
            if let Some((server, learn)) = other {
                request.queued = true;
                self.queued.push_back(Queued {
                    request: key,
                    from,
                    server,
                    learn,
                    hedge: false,
                });
                return;
            }
        }
        match (request.client.is_some(), request.failed) {
            (true, Some((upstream, reason))) => {
                if let Some(Request {
                    client: Some(client),
                    addr,
                    transport,
                    query,
                    question_end,
                    ..
                }) = self.requests.remove(key)
                {
                    self.events.push_back(Event::Failed(Failed {
                        client,
                        addr,
                        transport,
                        upstream,
                        reason,
                        query,
                        question_end,
                    }));
                }
            }
            // Answered, or (never) done without a failure.
            _ => {
                self.requests.remove(key);
            }
        }
    }
}
