//! UDP: the client-facing listener and the pool of upstream sockets.
//!
//! Each upstream socket (random source port) keeps a table of pending queries indexed by
//! the fresh random ID it gave them. An answer is accepted only from the server that was
//! queried, for a pending ID, with the same question; anything else is counted and
//! ignored, so a spoofed answer can neither reach the client nor teach IPs.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dnsfence_dns::{wire, Query, Rcode};
use dnsfence_policy::Protocol;
use smallvec::SmallVec;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::shared::{Shared, Step};
use crate::sys::{recv_orig_dst, Batch, ReplySockets};

/// Client datagrams received with one system call.
const CLIENT_BATCH: usize = 32;

/// Largest client query accepted over UDP (larger ones arrive truncated and are refused
/// as malformed); EDNS queries are far smaller.
const CLIENT_DATAGRAM: usize = 4096;

/// Upstream answers received with one system call (each buffer holds the largest answer).
const UPSTREAM_BATCH: usize = 8;

/// Largest UDP message handled.
pub(crate) const MAX_UDP: usize = 65_535;

/// Queries in flight per upstream socket; IDs are 16 bits, and a nearly full table would
/// make a fresh random ID slow to find.
const MAX_PENDING_PER_SOCKET: usize = 32_768;

/// Upstream sockets per address family.
const POOL: usize = 4;

struct Pending {
    client: SocketAddr,
    client_id: u16,
    rd: bool,
    learn: bool,
    reply_via: Arc<UdpSocket>,
    /// The question's wire bytes; inline for names of ordinary length (no allocation).
    question: SmallVec<[u8; 96]>,
    upstream: SocketAddr,
    received: Instant,
    sent: Instant,
    deadline: Instant,
}

/// Who asked, and how to answer them.
pub(crate) struct ClientRef {
    /// The client's address.
    pub(crate) addr: SocketAddr,
    /// The listener socket the answer leaves from.
    pub(crate) reply_via: Arc<UdpSocket>,
    /// When the query arrived.
    pub(crate) received: Instant,
}

struct UpstreamSocket {
    socket: UdpSocket,
    pending: Mutex<HashMap<u16, Pending>>,
}

/// Sockets that send queries upstream and receive their answers.
pub(crate) struct UpstreamPool {
    v4: Vec<Arc<UpstreamSocket>>,
    v6: Vec<Arc<UpstreamSocket>>,
    next: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl UpstreamPool {
    /// Binds the sockets and starts their receive tasks and the timeout sweeper.
    pub(crate) async fn start(shared: Arc<Shared>) -> io::Result<Arc<Self>> {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for _ in 0..POOL {
            v4.push(Arc::new(UpstreamSocket {
                socket: UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?,
                pending: Mutex::new(HashMap::new()),
            }));
            // IPv6 may be disabled on the host; IPv4 upstreams still work.
            if let Ok(socket) = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).await {
                v6.push(Arc::new(UpstreamSocket {
                    socket,
                    pending: Mutex::new(HashMap::new()),
                }));
            }
        }
        let pool = Arc::new(Self {
            v4,
            v6,
            next: AtomicUsize::new(0),
        });
        for sock in pool.v4.iter().chain(&pool.v6) {
            tokio::spawn(receive(shared.clone(), sock.clone()));
        }
        tokio::spawn(sweep(shared, pool.clone()));
        Ok(pool)
    }

    /// Sends `packet` (a query already judged) to `upstream` under a fresh ID.
    pub(crate) async fn forward(
        &self,
        shared: &Shared,
        packet: &mut [u8],
        query: &Query,
        learn: bool,
        client: ClientRef,
        upstream: SocketAddr,
    ) {
        let family = if upstream.is_ipv4() {
            &self.v4
        } else {
            &self.v6
        };
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let Some(sock) = family.get(n % family.len().max(1)) else {
            warn!(%upstream, "no upstream socket for this address family");
            shared.leave(client.addr.ip());
            return;
        };
        let question = packet
            .get(wire::HEADER_LEN..query.question_end)
            .unwrap_or_default();
        let pending = Pending {
            client: client.addr,
            client_id: query.id,
            rd: wire::recursion_desired(packet),
            learn,
            reply_via: client.reply_via,
            question: SmallVec::from_slice(question),
            upstream,
            received: client.received,
            sent: Instant::now(),
            deadline: Instant::now() + shared.config.upstream_timeout,
        };
        let id = {
            let mut table = lock(&sock.pending);
            if table.len() >= MAX_PENDING_PER_SOCKET {
                Err(pending)
            } else {
                let mut id = rand::random::<u16>();
                while table.contains_key(&id) {
                    id = rand::random::<u16>();
                }
                table.insert(id, pending);
                Ok(id)
            }
        };
        let id = match id {
            Ok(id) => id,
            Err(pending) => {
                warn!("upstream socket has no free query ID; answering SERVFAIL");
                fail(shared, &pending, Rcode::ServFail).await;
                return;
            }
        };
        wire::set_id(packet, id);
        if let Err(e) = sock.socket.send_to(packet, upstream).await {
            debug!(%upstream, error = %e, "sending upstream failed");
            let p = lock(&sock.pending).remove(&id);
            if let Some(p) = p {
                fail(shared, &p, Rcode::ServFail).await;
            }
        }
    }
}

/// Answers a pending query's client with `rcode` and ends it.
async fn fail(shared: &Shared, p: &Pending, rcode: Rcode) {
    let mut out = [0u8; 512];
    if let Some(n) = wire::write_reply_to(p.client_id, p.rd, &p.question, rcode, &mut out) {
        let _ = p
            .reply_via
            .send_to(out.get(..n).unwrap_or_default(), p.client)
            .await;
    }
    shared.leave(p.client.ip());
}

async fn receive(shared: Arc<Shared>, sock: Arc<UpstreamSocket>) {
    let mut batch = Batch::new(UPSTREAM_BATCH, MAX_UDP);
    loop {
        let count = match batch.recv(&sock.socket).await {
            Ok(n) => n,
            Err(e) => {
                debug!(error = %e, "upstream receive failed");
                continue;
            }
        };
        for i in 0..count {
            if let Some((answer, from)) = batch.datagram(i) {
                answer_from_upstream(&shared, &sock, answer, from).await;
            }
        }
    }
}

/// One datagram from an upstream socket: relay it if it answers a pending query.
async fn answer_from_upstream(
    shared: &Arc<Shared>,
    sock: &UpstreamSocket,
    packet: &mut [u8],
    from: SocketAddr,
) {
    let Some(id) = wire::id(packet) else {
        return;
    };
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
        return;
    };
    shared
        .metrics
        .latency_upstream
        .observe(p.sent.elapsed().as_secs_f64());
    let asked = crate::shared::Asked {
        client: p.client.ip(),
        server: p.upstream,
        received: p.received,
    };
    let hold = match shared.accept_answer(&p.question, packet, p.learn, asked) {
        Some(hold) => hold,
        None => {
            // Not an answer to this question: keep waiting for the real one.
            lock(&sock.pending).insert(id, p);
            return;
        }
    };
    match hold {
        None => {
            wire::set_id(packet, p.client_id);
            deliver(shared, &p, packet).await;
        }
        Some(apply) => {
            // New IPs: wait for the datapath, never on this loop.
            let mut answer = packet.to_vec();
            let shared = shared.clone();
            tokio::spawn(async move {
                shared.hold(apply).await;
                wire::set_id(&mut answer, p.client_id);
                deliver(&shared, &p, &answer).await;
            });
        }
    }
}

async fn deliver(shared: &Shared, p: &Pending, answer: &[u8]) {
    if let Err(e) = p.reply_via.send_to(answer, p.client).await {
        debug!(client = %p.client, error = %e, "sending the answer failed");
    }
    shared
        .metrics
        .latency_total
        .observe(p.received.elapsed().as_secs_f64());
    shared.leave(p.client.ip());
}

async fn sweep(shared: Arc<Shared>, pool: Arc<UpstreamPool>) {
    let period = (shared.config.upstream_timeout / 10)
        .clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let now = Instant::now();
        for sock in pool.v4.iter().chain(&pool.v6) {
            let expired: Vec<Pending> = {
                let mut table = lock(&sock.pending);
                let ids: Vec<u16> = table
                    .iter()
                    .filter(|(_, p)| p.deadline <= now)
                    .map(|(id, _)| *id)
                    .collect();
                ids.iter().filter_map(|id| table.remove(id)).collect()
            };
            for p in expired {
                shared.metrics.upstream_timeouts.inc();
                let mut flow =
                    crate::flows::Flow::new("dns", "timeout", shared.source(p.client.ip()));
                let (name, qtype) = crate::flows::question_name(&p.question);
                flow.dns = Some(crate::flows::Dns {
                    query: name,
                    qtypes: qtype.map(crate::flows::qtype_name).into_iter().collect(),
                    rcode: Some("SERVFAIL".into()),
                    server: Some(p.upstream),
                    ..crate::flows::Dns::default()
                });
                shared.flows.push(flow);
                fail(&shared, &p, Rcode::ServFail).await;
            }
        }
    }
}

/// One received client datagram and where it was headed.
struct Received<'a> {
    packet: &'a mut [u8],
    client: SocketAddr,
    /// The servers the query may go to (the policy chooses), tried from `start` on.
    servers: &'a [SocketAddr],
    start: usize,
    /// The socket answers leave from.
    reply_via: Arc<UdpSocket>,
    at: Instant,
}

/// Judges one datagram and answers it or forwards it.
async fn handle(shared: &Shared, pool: &UpstreamPool, r: Received<'_>, out: &mut [u8]) {
    match shared.judge(r.packet, r.client, r.servers, r.start, Protocol::Udp, out) {
        Step::Reply(len) => {
            let _ = r
                .reply_via
                .send_to(out.get(..len).unwrap_or_default(), r.client)
                .await;
        }
        Step::Forward(query, learn, server) => {
            let client = ClientRef {
                addr: r.client,
                reply_via: r.reply_via,
                received: r.at,
            };
            pool.forward(shared, r.packet, &query, learn, client, server)
                .await;
        }
        Step::Drop => {}
    }
}

/// Serves one explicit UDP listener until the socket fails.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    pool: Arc<UpstreamPool>,
    socket: Arc<UdpSocket>,
) -> io::Result<()> {
    let mut batch = Batch::new(CLIENT_BATCH, CLIENT_DATAGRAM);
    let mut out = vec![0u8; 1024];
    let upstreams = shared.config.upstreams.clone();
    let mut turn = 0usize;
    loop {
        let count = match batch.recv(&socket).await {
            Ok(n) => n,
            // ICMP errors for earlier sends surface here on some systems: keep serving.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => continue,
            Err(e) => return Err(e),
        };
        let at = Instant::now();
        for i in 0..count {
            let Some((packet, client)) = batch.datagram(i) else {
                continue;
            };
            turn = turn.wrapping_add(1);
            let reply_via = socket.clone();
            handle(
                &shared,
                &pool,
                Received {
                    packet,
                    client,
                    servers: &upstreams,
                    start: turn,
                    reply_via,
                    at,
                },
                &mut out,
            )
            .await;
        }
    }
}

/// Serves one transparent UDP listener: the policy's server and the upstream are the
/// query's original destination, and replies leave from that address.
pub(crate) async fn serve_transparent(
    shared: Arc<Shared>,
    pool: Arc<UpstreamPool>,
    socket: Arc<UdpSocket>,
) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_UDP];
    let mut out = vec![0u8; 1024];
    let mut replies = ReplySockets::default();
    loop {
        let (n, client, server) = match recv_orig_dst(&socket, &mut buf).await {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "transparent receive failed");
                continue;
            }
        };
        let at = Instant::now();
        let reply_via = match replies.get(server) {
            Ok(s) => s,
            Err(e) => {
                warn!(%server, error = %e, "cannot answer from the original destination");
                continue;
            }
        };
        let packet = buf.get_mut(..n).unwrap_or_default();
        handle(
            &shared,
            &pool,
            Received {
                packet,
                client,
                servers: &[server],
                start: 0,
                reply_via,
                at,
            },
            &mut out,
        )
        .await;
    }
}
