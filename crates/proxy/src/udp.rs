//! UDP: the client-facing listener and the pool of upstream sockets.
//!
//! Each upstream server gets a few sockets of its own, connected to it (random source
//! ports; the kernel then delivers only that server's datagrams to them and routes each
//! query without a lookup). Servers beyond [`MAX_CONNECTED_UPSTREAMS`] share unconnected
//! sockets. Each upstream socket keeps a table of pending queries indexed by the fresh
//! random ID it gave them. An answer is accepted only from the server that was
//! queried, for a pending ID, with the same question; anything else is counted and
//! ignored, so a spoofed answer can neither reach the client nor teach IPs.
//!
//! Source ports do not stay: every socket is replaced by one on a fresh random port after
//! `dns.upstream_port_lifetime`, one socket of a set at a time. A replaced socket only
//! waits for the answers it is owed, then closes; a spoofer who learned a port has until
//! then.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use prometheus_client::metrics::gauge::Gauge;
use std::time::{Duration, Instant};

use dnsfence_dns::{parse_query, wire, ParsedQuery, Query, Rcode};
use dnsfence_policy::Protocol;
use smallvec::SmallVec;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::replies::{Path, ReplySockets};
use crate::reply::ReplyVia;
use crate::shared::{Shared, Step};
use crate::sys::{self, Batch};

/// Client datagrams received with one system call.
const CLIENT_BATCH: usize = 32;

/// Largest client query accepted over UDP (larger ones arrive truncated and are refused
/// as malformed); EDNS queries are far smaller.
const CLIENT_DATAGRAM: usize = 4096;

/// Upstream answers received with one system call (each buffer holds the largest answer).
const UPSTREAM_BATCH: usize = 16;

/// Largest UDP message handled.
pub(crate) const MAX_UDP: usize = 65_535;

/// Queries in flight per upstream socket; IDs are 16 bits, and a nearly full table would
/// make a fresh random ID slow to find.
const MAX_PENDING_PER_SOCKET: usize = 32_768;

/// Upstream sockets per server (and unconnected ones per address family).
const POOL: usize = 4;

/// Replaced sockets kept open at once for the answers they are owed. Past this many (a
/// long `dns.upstream_timeout`, silent servers, a short port lifetime), sockets are not
/// replaced until some close: a bound on descriptors.
const MAX_DRAINING: usize = 256;

/// Servers that get connected sockets of their own; queries to further servers (only a
/// transparent proxy can see many) share the unconnected sockets.
const MAX_CONNECTED_UPSTREAMS: usize = 64;

struct Pending {
    client: SocketAddr,
    client_id: u16,
    rd: bool,
    learn: bool,
    reply_via: ReplyVia,
    /// The query as the client sent it (its question at `12..question_end`), to ask
    /// another upstream if this one fails; inline for queries of ordinary size (no
    /// allocation).
    packet: SmallVec<[u8; 128]>,
    question_end: usize,
    /// Whether another configured upstream may be asked when this one fails or is slow
    /// (explicit listeners with several upstreams, once).
    may_retry: bool,
    /// Set when a second copy of the query went to another upstream (see [`Hedge`]).
    hedge: Option<Arc<Hedge>>,
    upstream: SocketAddr,
    received: Instant,
    sent: Instant,
    deadline: Instant,
}

/// Two copies of one client query in flight: the first went to an upstream that was
/// slow to answer, the second to another upstream. The first answer reaches the client;
/// the client gets SERVFAIL only when both copies fail.
#[derive(Debug)]
struct Hedge {
    /// The client has its answer (or its SERVFAIL).
    done: AtomicBool,
    /// Copies still waiting for an answer.
    waiting: AtomicU8,
}

/// What it takes to send a pending query to another upstream.
struct Resend {
    client: SocketAddr,
    reply_via: ReplyVia,
    received: Instant,
    packet: SmallVec<[u8; 128]>,
    /// The upstream it went to first.
    upstream: SocketAddr,
}

impl Resend {
    fn of(p: &Pending) -> Self {
        Self {
            client: p.client,
            reply_via: p.reply_via.clone(),
            received: p.received,
            packet: p.packet.clone(),
            upstream: p.upstream,
        }
    }
}

impl Pending {
    /// Whether this copy's answer is the one the client gets (always, without a hedge).
    fn claim(&self) -> bool {
        self.hedge
            .as_ref()
            .is_none_or(|h| !h.done.swap(true, Ordering::AcqRel))
    }

    /// This copy failed: whether the client is now owed an answer from the caller (always
    /// without a hedge; with one, when the other copy failed too and nothing answered).
    fn last_to_fail(&self) -> bool {
        match &self.hedge {
            None => true,
            Some(h) => {
                h.waiting.fetch_sub(1, Ordering::AcqRel) == 1
                    && !h.done.swap(true, Ordering::AcqRel)
            }
        }
    }

    /// The question's wire bytes.
    fn question(&self) -> &[u8] {
        self.packet
            .get(wire::HEADER_LEN..self.question_end)
            .unwrap_or_default()
    }
}

/// Who asked, and how to answer them.
pub(crate) struct ClientRef {
    /// The client's address.
    pub(crate) addr: SocketAddr,
    /// How the answer leaves.
    pub(crate) reply_via: ReplyVia,
    /// When the query arrived.
    pub(crate) received: Instant,
    /// When it leaves for this upstream (about: the batch's clock reading).
    pub(crate) sent: Instant,
}

struct UpstreamSocket {
    socket: UdpSocket,
    /// Whether the socket is connected to its server (queries leave without an address).
    connected: bool,
    /// Keyed by the random IDs the proxy chose (foldhash: cheap, and nobody else picks the keys).
    pending: Mutex<foldhash::HashMap<u16, Pending>>,
    /// When a socket on a fresh port takes its place.
    replace_at: Instant,
    /// Open upstream sockets (the metric), one less when this one closes.
    open: Gauge,
}

impl Drop for UpstreamSocket {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A server's sockets (or a family's unconnected ones), used in turn.
type SocketSet = Arc<[Arc<UpstreamSocket>]>;

/// Sockets that send queries upstream and receive their answers.
pub(crate) struct UpstreamPool {
    shared: Arc<Shared>,
    /// Connected sockets by server, created on first use (empty: connecting failed, the
    /// server's queries use the unconnected sockets).
    connected: Mutex<foldhash::HashMap<SocketAddr, SocketSet>>,
    /// Unconnected sockets, by family (IPv6 ones only when the host has IPv6).
    v4: Mutex<SocketSet>,
    v6: Mutex<SocketSet>,
    /// Sockets replaced by ones on fresh ports, until their last query is done.
    draining: Mutex<Vec<Arc<UpstreamSocket>>>,
    /// When a socket could last not be replaced (warnings at most once a minute).
    warned: Mutex<Option<Instant>>,
    next: AtomicUsize,
    /// The pool itself, for the receive tasks it starts (they retry failed queries).
    me: Weak<Self>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl UpstreamPool {
    /// Binds the sockets and starts their receive tasks and the timeout sweeper.
    pub(crate) async fn start(shared: Arc<Shared>) -> io::Result<Arc<Self>> {
        let pool = Arc::new_cyclic(|me| Self {
            shared: shared.clone(),
            connected: Mutex::default(),
            v4: Mutex::new(Arc::new([])),
            v6: Mutex::new(Arc::new([])),
            draining: Mutex::default(),
            warned: Mutex::default(),
            next: AtomicUsize::new(0),
            me: me.clone(),
        });
        *lock(&pool.v4) = pool.open_set(V4_ANY, false)?;
        // IPv6 may be disabled on the host; IPv4 upstreams still work.
        if let Ok(v6) = pool.open_set(V6_ANY, false) {
            *lock(&pool.v6) = v6;
        }
        // The configured servers get their sockets now, not on the first query.
        for upstream in &shared.config.upstreams {
            pool.connected_to(*upstream);
        }
        tokio::spawn(sweep(shared, pool.clone()));
        Ok(pool)
    }

    /// The sockets connected to `upstream`, created (and their receive tasks started) on
    /// first use. `None` or empty when the server gets none: there are already
    /// [`MAX_CONNECTED_UPSTREAMS`] servers, or connecting failed.
    fn connected_to(&self, upstream: SocketAddr) -> Option<SocketSet> {
        let mut map = lock(&self.connected);
        if let Some(socks) = map.get(&upstream) {
            return Some(socks.clone());
        }
        if map.len() >= MAX_CONNECTED_UPSTREAMS {
            return None;
        }
        let socks = match self.open_set(upstream, true) {
            Ok(socks) => socks,
            Err(e) => {
                warn!(%upstream, error = %e, "cannot connect a socket to this upstream; its queries share unconnected sockets");
                Arc::new([])
            }
        };
        map.insert(upstream, socks.clone());
        Some(socks)
    }

    /// The socket a batch's queries to `upstream` leave from: the queries of one receive
    /// batch share a socket (so they leave with one system call) and batches take turns.
    fn socket_for(&self, upstream: SocketAddr, turn: usize) -> Option<Arc<UpstreamSocket>> {
        if let Some(own) = self.connected_to(upstream) {
            if let Some(sock) = own.get(turn % own.len().max(1)) {
                return Some(sock.clone());
            }
        }
        let family = lock(if upstream.is_ipv4() {
            &self.v4
        } else {
            &self.v6
        })
        .clone();
        family.get(turn % family.len().max(1)).cloned()
    }

    /// A new upstream socket, its receive task started: connected to `to`, or (not
    /// `connected`) bound to the unspecified address `to` of a family.
    fn open(
        &self,
        to: SocketAddr,
        connected: bool,
        replace_at: Instant,
    ) -> io::Result<Arc<UpstreamSocket>> {
        let socket = if connected {
            sys::connected_udp(to)?
        } else {
            sys::unconnected_udp(to)?
        };
        let open = self.shared.metrics.upstream_sockets.clone();
        open.inc();
        let sock = Arc::new(UpstreamSocket {
            socket,
            connected,
            pending: Mutex::default(),
            replace_at,
            open,
        });
        tokio::spawn(receive(self.shared.clone(), sock.clone(), self.me.clone()));
        Ok(sock)
    }

    /// A new set of [`POOL`] sockets (see [`Self::open`]); on failure, the ones already
    /// opened are closed.
    fn open_set(&self, to: SocketAddr, connected: bool) -> io::Result<SocketSet> {
        let now = Instant::now();
        let mut socks = Vec::with_capacity(POOL);
        for k in 0..POOL {
            match self.open(to, connected, self.first_replacement(now, k)) {
                Ok(sock) => socks.push(sock),
                Err(e) => {
                    for sock in &socks {
                        sys::shut(&sock.socket);
                    }
                    return Err(e);
                }
            }
        }
        Ok(socks.into())
    }

    /// When the `k`-th socket of a new set is first replaced: the set's sockets take turns,
    /// so one of them changes port every `dns.upstream_port_lifetime` / [`POOL`].
    fn first_replacement(&self, now: Instant, k: usize) -> Instant {
        let lifetime = self.shared.config.upstream_port_lifetime;
        let k = u32::try_from(k).unwrap_or(u32::MAX).saturating_add(1);
        let pool = u32::try_from(POOL).unwrap_or(u32::MAX);
        now + lifetime.saturating_mul(k) / pool
    }

    /// Replaces, in each set, the first socket due (see [`Self::first_replacement`]) with
    /// one on a fresh port, and closes the replaced sockets no query waits on any more.
    fn rotate(&self, now: Instant) {
        self.close_drained();
        if lock(&self.draining).len() >= MAX_DRAINING {
            return;
        }
        let lifetime = self.shared.config.upstream_port_lifetime;
        let mut replaced = Vec::new();
        let mut failed = None;
        let mut renew = |set: &mut SocketSet, to: SocketAddr, connected: bool| {
            let Some(k) = set.iter().position(|s| s.replace_at <= now) else {
                return;
            };
            match self.open(to, connected, now + lifetime) {
                Ok(fresh) => {
                    let mut socks = set.to_vec();
                    if let Some(slot) = socks.get_mut(k) {
                        replaced.push(std::mem::replace(slot, fresh));
                    }
                    *set = socks.into();
                }
                Err(e) => failed = Some(e),
            }
        };
        for (upstream, set) in lock(&self.connected).iter_mut() {
            renew(set, *upstream, true);
        }
        renew(&mut lock(&self.v4), V4_ANY, false);
        if !lock(&self.v6).is_empty() {
            renew(&mut lock(&self.v6), V6_ANY, false);
        }
        if let Some(e) = failed {
            let mut warned = lock(&self.warned);
            if warned.is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(60))
            {
                warn!(error = %e, "cannot open an upstream socket on a fresh port; the old one stays in use");
                *warned = Some(now);
            }
        }
        lock(&self.draining).extend(replaced);
        self.close_drained();
    }

    /// Closes the replaced sockets no query waits on any more.
    fn close_drained(&self) {
        let mut draining = lock(&self.draining);
        // Closed once nothing can hand it a query any more (no batch holds it: only this
        // list and its receive task do) and no query waits on it.
        draining.retain(|s| {
            let idle = Arc::strong_count(s) <= 2 && lock(&s.pending).is_empty();
            if idle {
                sys::shut(&s.socket);
            }
            !idle
        });
    }

    /// Asks another configured upstream a query whose upstream failed (timed out or
    /// unreachable): the first one, in configured order, that the client's policy allows
    /// for the name and that is not marked down. A query is asked again at most once, and
    /// only when it came to an explicit listener with several upstreams. Returns the query
    /// when it was not sent again (its client is still owed an answer).
    async fn retry(&self, p: Pending) -> Option<Pending> {
        if !p.may_retry {
            return Some(p);
        }
        let copy = Resend::of(&p);
        if self.resend(copy, None).await {
            None
        } else {
            Some(p)
        }
    }

    /// Sends `copy` to another configured upstream (see [`Self::retry`]), as a second copy
    /// of a query still in flight when `hedge` is given. Whether it was sent.
    async fn resend(&self, copy: Resend, hedge: Option<Arc<Hedge>>) -> bool {
        let ParsedQuery::Query(query) = parse_query(&copy.packet) else {
            return false;
        };
        let shared = &self.shared;
        let Some((server, learn)) =
            shared.alternative(copy.client.ip(), copy.upstream, &query, Protocol::Udp)
        else {
            return false;
        };
        let now = Instant::now();
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let Some(sock) = self.socket_for(server, turn) else {
            return false;
        };
        let client = ClientRef {
            addr: copy.client,
            reply_via: copy.reply_via,
            received: copy.received,
            sent: now,
        };
        let mut packet = copy.packet;
        let timeout = shared.config.upstream_timeout;
        let Some(out) = sock.register(&mut packet, &query, learn, client, server, timeout, false)
        else {
            return false;
        };
        if let Some(h) = hedge {
            if let Some(p) = lock(&sock.pending).get_mut(&out.id) {
                p.hedge = Some(h);
            }
        }
        let to = (!sock.connected).then_some(server);
        if sys::send_batch(&sock.socket, &[(&packet[..], to)])
            .await
            .is_empty()
        {
            shared.metrics.upstream_retries.inc();
            debug!(from = %copy.upstream, to = %server, "query asked of another upstream");
            return true;
        }
        // Not sent: the query is still the caller's to answer.
        lock(&sock.pending).remove(&out.id);
        shared.upstreams.failed(server, now);
        false
    }

    /// Every upstream socket: the connected ones, the shared ones and the draining ones.
    fn all(&self) -> Vec<Arc<UpstreamSocket>> {
        let mut all: Vec<_> = lock(&self.connected)
            .values()
            .flat_map(|s| s.iter().cloned())
            .collect();
        all.extend(lock(&self.v4).iter().cloned());
        all.extend(lock(&self.v6).iter().cloned());
        all.extend(lock(&self.draining).iter().cloned());
        all
    }
}

/// The unspecified addresses the shared sockets bind, by family.
const V4_ANY: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
const V6_ANY: SocketAddr = SocketAddr::new(std::net::IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);

impl UpstreamSocket {
    /// Records `packet` (a query already judged) as pending on this socket under a fresh
    /// random ID and writes that ID into the packet; the caller sends it. `None` when no ID
    /// is free (the query cannot leave; the packet is unchanged).
    #[allow(
        clippy::too_many_arguments,
        reason = "one call per query; a struct would only be unpacked"
    )]
    fn register(
        self: &Arc<Self>,
        packet: &mut [u8],
        query: &Query,
        learn: bool,
        client: ClientRef,
        upstream: SocketAddr,
        timeout: Duration,
        may_retry: bool,
    ) -> Option<Outbound> {
        let now = client.sent;
        let pending = Pending {
            client: client.addr,
            client_id: query.id,
            rd: wire::recursion_desired(packet),
            learn,
            reply_via: client.reply_via,
            packet: SmallVec::from_slice(packet),
            question_end: query.question_end,
            may_retry,
            hedge: None,
            upstream,
            received: client.received,
            sent: now,
            deadline: now + timeout,
        };
        let mut table = lock(&self.pending);
        if table.len() >= MAX_PENDING_PER_SOCKET {
            warn!("upstream socket has no free query ID; answering SERVFAIL");
            return None;
        }
        let mut id = rand::random::<u16>();
        while table.contains_key(&id) {
            id = rand::random::<u16>();
        }
        table.insert(id, pending);
        drop(table);
        wire::set_id(packet, id);
        Some(Outbound {
            sock: self.clone(),
            id,
            upstream,
        })
    }
}

/// A registered query, ready to leave on its upstream socket.
struct Outbound {
    sock: Arc<UpstreamSocket>,
    id: u16,
    upstream: SocketAddr,
}

/// Sends the registered queries (batch index and where it goes), one `sendmmsg` per run
/// of queries sharing a socket. A query that cannot be sent is asked of another upstream
/// (see [`UpstreamPool::retry`]), or answered SERVFAIL.
async fn send_queries(
    shared: &Shared,
    pool: &UpstreamPool,
    batch: &Batch,
    queries: &[(usize, Outbound)],
) {
    let msgs: Vec<(&UdpSocket, &[u8], Option<SocketAddr>)> = queries
        .iter()
        .map(|(i, o)| {
            let to = (!o.sock.connected).then_some(o.upstream);
            (&o.sock.socket, batch.bytes(*i), to)
        })
        .collect();
    for (k, e) in send_runs(&msgs).await {
        let Some((_, o)) = queries.get(k) else {
            continue;
        };
        debug!(upstream = %o.upstream, error = %e, "sending upstream failed");
        shared.upstreams.failed(o.upstream, Instant::now());
        let p = lock(&o.sock.pending).remove(&o.id);
        if let Some(p) = p {
            if let Some(p) = pool.retry(p).await {
                fail(shared, &p, Rcode::ServFail).await;
            }
        }
    }
}

/// Sends each message (socket, bytes, destination unless the socket is connected), one
/// `sendmmsg` per run of messages sharing a socket. Returns the messages that could not be
/// sent, by index in `msgs`.
async fn send_runs(msgs: &[(&UdpSocket, &[u8], Option<SocketAddr>)]) -> Vec<(usize, io::Error)> {
    let mut failed = Vec::new();
    let mut out: SmallVec<[(&[u8], Option<SocketAddr>); CLIENT_BATCH]> = SmallVec::new();
    let mut start = 0;
    while let Some(&(first, _, _)) = msgs.get(start) {
        let now = msgs.get(start..).unwrap_or_default();
        let run = now
            .iter()
            .take_while(|(s, _, _)| std::ptr::eq(*s, first))
            .count();
        out.clear();
        out.extend(now.iter().take(run).map(|(_, b, to)| (*b, *to)));
        let errors = sys::send_batch(first, &out).await;
        failed.extend(errors.into_iter().map(|(k, e)| (start + k, e)));
        start += run;
    }
    failed
}

/// A message to send: the socket, the bytes, and the destination unless the socket is
/// connected.
type Outgoing<'a> = (&'a UdpSocket, &'a [u8], Option<SocketAddr>);

/// Sends replies and answers to clients (how each leaves, its bytes, the client): one
/// `sendmmsg` per run sharing a socket, built replies one by one. Failures are logged
/// (the client asks again).
async fn send_to_clients(msgs: &[(&ReplyVia, &[u8], SocketAddr)]) {
    let mut sockets: SmallVec<[Outgoing<'_>; CLIENT_BATCH]> = SmallVec::new();
    for (via, bytes, to) in msgs {
        let sent = match via {
            ReplyVia::Socket(s) => {
                sockets.push((s, bytes, Some(*to)));
                Ok(())
            }
            ReplyVia::Raw { from, raw } => raw.send(*from, *to, bytes),
        };
        if let Err(e) = sent {
            debug!(client = %to, error = %e, "sending a reply failed");
        }
    }
    for (k, e) in send_runs(&sockets).await {
        if let Some((_, _, Some(to))) = sockets.get(k) {
            debug!(client = %to, error = %e, "sending a reply failed");
        }
    }
}

/// Answers a pending query's client with `rcode` and ends it.
async fn fail(shared: &Shared, p: &Pending, rcode: Rcode) {
    let mut out = [0u8; 512];
    if let Some(n) = wire::write_reply_to(p.client_id, p.rd, p.question(), rcode, &mut out) {
        let _ = p
            .reply_via
            .send_to(out.get(..n).unwrap_or_default(), p.client)
            .await;
    }
    shared.leave(p.client.ip());
}

async fn receive(shared: Arc<Shared>, sock: Arc<UpstreamSocket>, pool: Weak<UpstreamPool>) {
    let mut batch = Batch::new(UPSTREAM_BATCH, MAX_UDP);
    let mut ready: Vec<(usize, Pending)> = Vec::with_capacity(UPSTREAM_BATCH);
    loop {
        let count = match batch.recv(&sock.socket).await {
            Ok(n) => n,
            // Replaced, and its last query is done.
            Err(e) if sys::is_shut(&e) => return,
            Err(e) if unreachable_error(&e) && sock.connected => {
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                unreachable(&shared, &pool, &sock).await;
                continue;
            }
            Err(e) => {
                debug!(error = %e, "upstream receive failed");
                continue;
            }
        };
        ready.clear();
        let now = Instant::now();
        for i in 0..count {
            if let Some((answer, from)) = batch.datagram(i) {
                if let Some(p) = answer_from_upstream(&shared, &sock, answer, from, now) {
                    ready.push((i, p));
                }
            }
        }
        // The answers released at once leave together.
        let msgs: Vec<(&ReplyVia, &[u8], SocketAddr)> = ready
            .iter()
            .map(|(i, p)| (&p.reply_via, batch.bytes(*i), p.client))
            .collect();
        send_to_clients(&msgs).await;
        drop(msgs);
        for (_, p) in ready.drain(..) {
            delivered(&shared, &p, now);
        }
    }
}

/// Whether a connected socket's error says its server cannot be reached (ICMP port,
/// host or network unreachable).
fn unreachable_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

/// The server a connected socket sends to reported itself unreachable (ICMP): the
/// queries waiting on this socket will get no answer. Each counts against the server's
/// health and goes to another upstream when there is one to ask, else its client gets
/// SERVFAIL now rather than after `dns.upstream_timeout`.
async fn unreachable(shared: &Shared, pool: &UpstreamPool, sock: &UpstreamSocket) {
    let waiting: Vec<Pending> = lock(&sock.pending).drain().map(|(_, p)| p).collect();
    let now = Instant::now();
    for p in waiting {
        shared.metrics.upstream_errors.inc();
        upstream_failed(shared, pool, p, now, "unreachable").await;
    }
}

/// A copy of a query got no answer from its upstream (`verdict`: `timeout` or
/// `unreachable`): counted against the upstream's health; unless the other copy of a
/// hedged query is still waiting or has answered, asked of another upstream, or else
/// answered SERVFAIL.
async fn upstream_failed(
    shared: &Shared,
    pool: &UpstreamPool,
    p: Pending,
    now: Instant,
    verdict: &'static str,
) {
    shared.upstreams.failed(p.upstream, now);
    if !p.last_to_fail() {
        return;
    }
    let Some(p) = pool.retry(p).await else {
        return;
    };
    debug!(upstream = %p.upstream, client = %p.client, verdict, "upstream failed; answering SERVFAIL");
    shared.flows.push(failure_flow(shared, &p, verdict));
    fail(shared, &p, Rcode::ServFail).await;
}

/// The flow event of a query that got SERVFAIL because its upstream failed (`verdict`:
/// `timeout` or `unreachable`).
fn failure_flow(shared: &Shared, p: &Pending, verdict: &'static str) -> crate::flows::Flow {
    let mut flow = crate::flows::Flow::new("dns", verdict, shared.source(p.client.ip()));
    let (name, qtype) = crate::flows::question_name(p.question());
    flow.dns = Some(crate::flows::Dns {
        query: name,
        qtypes: qtype.map(crate::flows::qtype_name).into_iter().collect(),
        rcode: Some("SERVFAIL".into()),
        server: Some(p.upstream),
        ..crate::flows::Dns::default()
    });
    flow
}

/// One datagram from an upstream socket: if it answers a pending query, returns that
/// query when its answer (now carrying the client's ID) may be released at once; an
/// answer that must wait for the datapath is released by a task of its own.
fn answer_from_upstream(
    shared: &Arc<Shared>,
    sock: &UpstreamSocket,
    packet: &mut [u8],
    from: SocketAddr,
    now: Instant,
) -> Option<Pending> {
    let id = wire::id(packet)?;
    // Only the queried server may answer, and only for a pending ID.
    let pending = {
        let mut table = lock(&sock.pending);
        match table.get(&id) {
            Some(p) if p.upstream == from => table.remove(&id),
            _ => None,
        }
    };
    let Some(p) = pending else {
        shared.metrics.answers_rejected.inc();
        return None;
    };
    shared.upstreams.answered(p.upstream);
    shared
        .metrics
        .latency_upstream
        .observe(now.saturating_duration_since(p.sent).as_secs_f64());
    let asked = crate::shared::Asked {
        client: p.client.ip(),
        server: p.upstream,
        received: p.received,
        answered: now,
    };
    let hold = match shared.accept_answer(p.question(), packet, p.learn, asked) {
        Some(hold) => hold,
        None => {
            // Not an answer to this question: keep waiting for the real one.
            lock(&sock.pending).insert(id, p);
            return None;
        }
    };
    if !p.claim() {
        // The other copy of this query was answered first.
        return None;
    }
    match hold {
        None => {
            wire::set_id(packet, p.client_id);
            Some(p)
        }
        Some(apply) => {
            // New IPs: wait for the datapath, never on this loop.
            let mut answer = packet.to_vec();
            let shared = shared.clone();
            tokio::spawn(async move {
                shared.hold(apply).await;
                wire::set_id(&mut answer, p.client_id);
                if let Err(e) = p.reply_via.send_to(&answer, p.client).await {
                    debug!(client = %p.client, error = %e, "sending the answer failed");
                }
                delivered(&shared, &p, Instant::now());
            });
            None
        }
    }
}

/// Accounts for an answer sent to its client (`now`: about when it left).
fn delivered(shared: &Shared, p: &Pending, now: Instant) {
    shared
        .metrics
        .latency_total
        .observe(now.saturating_duration_since(p.received).as_secs_f64());
    shared.leave(p.client.ip());
}

/// Every tick: replaces upstream sockets due for a fresh port, sends second copies of
/// slow queries, and fails the ones past their deadline. The tick is a tenth of the
/// timeout (and at most half the hedge delay), from 10 ms to 250 ms.
async fn sweep(shared: Arc<Shared>, pool: Arc<UpstreamPool>) {
    let slow = shared.config.hedge_after();
    let period = (shared.config.upstream_timeout / 10)
        .min(slow.map_or(Duration::MAX, |s| s / 2))
        .clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let now = Instant::now();
        pool.rotate(now);
        for sock in pool.all() {
            let mut hedges = Vec::new();
            let expired: Vec<Pending> = {
                let mut table = lock(&sock.pending);
                let ids: Vec<u16> = table
                    .iter()
                    .filter(|(_, p)| p.deadline <= now)
                    .map(|(id, _)| *id)
                    .collect();
                // Slow ones get a second copy to another upstream.
                for p in table.values_mut() {
                    if p.may_retry
                        && p.deadline > now
                        && slow.is_some_and(|slow| now.saturating_duration_since(p.sent) >= slow)
                    {
                        p.may_retry = false;
                        let hedge = Arc::new(Hedge {
                            done: AtomicBool::new(false),
                            waiting: AtomicU8::new(2),
                        });
                        p.hedge = Some(hedge.clone());
                        hedges.push((Resend::of(p), hedge));
                    }
                }
                ids.iter().filter_map(|id| table.remove(id)).collect()
            };
            for (copy, hedge) in hedges {
                if !pool.resend(copy, Some(hedge.clone())).await {
                    // No second copy: the first is alone again.
                    hedge.waiting.fetch_sub(1, Ordering::AcqRel);
                }
            }
            for p in expired {
                shared.metrics.upstream_timeouts.inc();
                upstream_failed(&shared, &pool, p, now, "timeout").await;
            }
        }
    }
}

/// Judges every datagram of a client batch, then sends what it produced: replies, one
/// `sendmmsg` per reply socket, and forwarded queries, one `sendmmsg` per upstream socket.
/// `route(i)` gives the `i`-th datagram's candidate servers and the index to try them
/// from (`None`: the datagram is skipped). `reply_via(client, server, now)` gives the
/// socket a reply to `client` from `server` leaves from, once the query has passed the
/// client's bounds (`None`: the query is dropped, unanswered).
async fn handle_batch<'r>(
    shared: &Shared,
    pool: &UpstreamPool,
    batch: &mut Batch,
    count: usize,
    outs: &mut [Vec<u8>],
    mut route: impl FnMut(usize) -> Option<(&'r [SocketAddr], usize)>,
    mut reply_via: impl FnMut(SocketAddr, SocketAddr, Instant) -> Option<ReplyVia>,
) {
    let at = Instant::now();
    let turn = pool.next.fetch_add(1, Ordering::Relaxed);
    let mut replies: SmallVec<[Reply; 8]> = SmallVec::new();
    let mut queries: SmallVec<[(usize, Outbound); CLIENT_BATCH]> = SmallVec::new();
    for i in 0..count {
        let Some((servers, start)) = route(i) else {
            continue;
        };
        let (Some((packet, client)), Some(out)) = (batch.datagram(i), outs.get_mut(i)) else {
            continue;
        };
        // The server whose address a reply of the proxy's own comes from (transparent
        // listeners have exactly one candidate: the original destination).
        let asked = servers.first().copied().unwrap_or(NO_SERVER);
        match shared.judge(packet, client, servers, start, Protocol::Udp, out) {
            Step::Reply(len) => {
                if let Some(via) = reply_via(client, asked, at) {
                    replies.push((i, len, client, via));
                }
            }
            Step::Forward(query, learn, server) => {
                let Some(via) = reply_via(client, asked, at) else {
                    shared.leave(client.ip());
                    continue;
                };
                let asker = ClientRef {
                    addr: client,
                    reply_via: via.clone(),
                    received: at,
                    sent: at,
                };
                let outbound = match pool.socket_for(server, turn) {
                    Some(sock) => sock.register(
                        packet,
                        &query,
                        learn,
                        asker,
                        server,
                        shared.config.upstream_timeout,
                        servers.len() > 1,
                    ),
                    None => {
                        warn!(%server, "no upstream socket for this address family; answering SERVFAIL");
                        None
                    }
                };
                match outbound {
                    Some(outbound) => queries.push((i, outbound)),
                    None => {
                        shared.leave(client.ip());
                        let reply = wire::write_reply(
                            packet,
                            Some(query.question_end),
                            Rcode::ServFail,
                            out,
                        );
                        if let Some(n) = reply {
                            replies.push((i, n, client, via));
                        }
                    }
                }
            }
            Step::Drop => {}
        }
    }
    if !replies.is_empty() {
        let msgs: Vec<(&ReplyVia, &[u8], SocketAddr)> = replies
            .iter()
            .map(|(i, len, client, via)| {
                let bytes = outs.get(*i).and_then(|o| o.get(..*len));
                (via, bytes.unwrap_or_default(), *client)
            })
            .collect();
        send_to_clients(&msgs).await;
    }
    if !queries.is_empty() {
        send_queries(shared, pool, batch, &queries).await;
    }
}

/// A reply produced while a batch is handled: the datagram's index (the reply is in its
/// reply buffer), the reply's length, the client, and the socket it leaves from.
type Reply = (usize, usize, SocketAddr, ReplyVia);

/// Reply buffers for a client batch, one per datagram.
fn reply_buffers() -> Vec<Vec<u8>> {
    (0..CLIENT_BATCH).map(|_| vec![0u8; 1024]).collect()
}

/// Serves one explicit UDP listener until the socket fails.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    pool: Arc<UpstreamPool>,
    socket: Arc<UdpSocket>,
) -> io::Result<()> {
    let mut batch = Batch::new(CLIENT_BATCH, CLIENT_DATAGRAM);
    let mut outs = reply_buffers();
    let upstreams = shared.config.upstreams.clone();
    let mut turn = 0usize;
    let mut warned: Option<Instant> = None;
    loop {
        let count = match batch.recv(&socket).await {
            Ok(n) => n,
            // ICMP errors for earlier sends surface here on some systems: keep serving.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => continue,
            // Anything else (out of memory, say) is logged, at most once a second, and
            // retried after a pause: the listener never stops.
            Err(e) => {
                if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    warn!(error = %e, "receiving on a UDP listener failed; retrying");
                    warned = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let via = ReplyVia::Socket(socket.clone());
        handle_batch(
            &shared,
            &pool,
            &mut batch,
            count,
            &mut outs,
            |_| {
                turn = turn.wrapping_add(1);
                Some((&upstreams[..], turn))
            },
            |_, _, _| Some(via.clone()),
        )
        .await;
    }
}

/// Serves one transparent UDP listener: the policy's server and the upstream are the
/// query's original destination, and replies leave from that address.
pub(crate) async fn serve_transparent(
    shared: Arc<Shared>,
    pool: Arc<UpstreamPool>,
    socket: Arc<UdpSocket>,
) -> io::Result<()> {
    let mut batch = Batch::with_orig_dst(CLIENT_BATCH, CLIENT_DATAGRAM);
    let mut outs = reply_buffers();
    let per_second = shared
        .config
        .transparent
        .map_or(1, |t| t.client_new_servers_per_second);
    let mut replies = ReplySockets::new(per_second);
    // The original destinations of the current batch, so each datagram can name its one
    // candidate server as a slice.
    let mut servers: Vec<SocketAddr> = Vec::with_capacity(CLIENT_BATCH);
    loop {
        let count = match batch.recv(&socket).await {
            Ok(n) => n,
            Err(e) => {
                debug!(error = %e, "transparent receive failed");
                continue;
            }
        };
        servers.clear();
        servers.extend((0..count).map(|i| batch.orig_dst(i).unwrap_or(NO_SERVER)));
        let servers = &servers;
        handle_batch(
            &shared,
            &pool,
            &mut batch,
            count,
            &mut outs,
            |i| {
                let server = *servers.get(i)?;
                if server == NO_SERVER {
                    debug!("transparent datagram without its original destination dropped");
                    return None;
                }
                Some((servers.get(i..=i)?, 0))
            },
            |client, server, now| match replies.get(server, client.ip(), now) {
                Ok(Path::Via(via)) => Some(via),
                Ok(Path::OverBudget { report }) => {
                    shared.new_server_refused(client.ip(), server, report);
                    None
                }
                Err(e) => {
                    warn!(%server, error = %e, "cannot answer from the original destination");
                    None
                }
            },
        )
        .await;
    }
}

/// Stands for a missing original destination (never a real one: port 0).
const NO_SERVER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
