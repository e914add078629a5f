//! Server choice: which upstream a query goes to, and which one a failed or slow query is
//! asked of next. Policy decides which servers a client may ask for a name; health only
//! orders the allowed ones (a down upstream is used when no allowed one is up). It must not
//! send or record anything: the forwarder registers the choice.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use dnsfence_policy::Protocol;

use super::health::Health;
use super::{Forwarder, Request};
use crate::query::{parse_query, ParsedQuery, Query};
use crate::snapshot::{Snapshot, Verdict};

/// Where a query goes, from [`Forwarder::choose`].
#[derive(Debug, Clone, Copy)]
pub struct Choice<'s> {
    /// The server it goes to, with its verdict; `None`: every server denies it.
    pub forward: Option<(SocketAddr, Verdict<'s>)>,
    /// The first server (in the order tried) that denies it, with its verdict, whether or
    /// not another one takes it.
    pub denied: Option<(SocketAddr, Verdict<'s>)>,
}

impl<C, R: rand_core::CryptoRng> Forwarder<C, R> {
    /// Chooses the server for `query` from `client` among `servers`, tried from index
    /// `start` on (round robin): the first that `snapshot` allows the client for the name
    /// and that is not marked down (with several servers; a down one whose back-off is over
    /// takes this query as its probe), else the first allowed one.
    #[allow(
        clippy::too_many_arguments,
        reason = "one call per query; a struct would only be unpacked"
    )]
    pub fn choose<'s>(
        &mut self,
        now: Instant,
        snapshot: &'s Snapshot,
        client: IpAddr,
        servers: &[SocketAddr],
        start: usize,
        protocol: Protocol,
        query: &Query,
    ) -> Choice<'s> {
        let mut choice = Choice {
            forward: None,
            denied: None,
        };
        // Allowed, but marked down: used only when no allowed server is up.
        let mut fallback = None;
        for k in 0..servers.len() {
            let Some(&server) = servers.get(start.wrapping_add(k) % servers.len()) else {
                continue;
            };
            let verdict = snapshot.decide(client, server, protocol, query);
            if verdict.deny.is_some() {
                choice.denied = choice.denied.or(Some((server, verdict)));
                continue;
            }
            if servers.len() > 1 && !self.health.try_use(server, now) {
                fallback = fallback.or(Some((server, verdict)));
                continue;
            }
            choice.forward = Some((server, verdict));
            break;
        }
        choice.forward = choice.forward.or(fallback);
        choice
    }
}

/// Another configured upstream to ask `request`'s query of when `failed` did not answer (or
/// was slow): the first one, in configured order, that `snapshot` allows the client for the
/// name and that is not marked down. Returns it with whether its answer may teach IPs.
pub(super) fn alternative<C>(
    health: &mut Health,
    upstreams: &[SocketAddr],
    now: Instant,
    snapshot: &Snapshot,
    request: &Request<C>,
    failed: SocketAddr,
) -> Option<(SocketAddr, bool)> {
    let ParsedQuery::Query(query) = parse_query(&request.query) else {
        return None;
    };
    let client = request.addr.ip();
    let protocol = request.transport.protocol();
    upstreams.iter().find_map(|&server| {
        if server == failed {
            return None;
        }
        let verdict = snapshot.decide(client, server, protocol, &query);
        (verdict.deny.is_none() && health.try_use(server, now)).then_some((server, verdict.learn))
    })
}
