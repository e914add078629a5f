//! UDP: the client-facing listeners, and the receive loops of the upstream sockets (see
//! [`pool`]); the forwarder's UDP driver.
//!
//! A batch of client datagrams is judged, its allowed queries registered with the
//! forwarder (which gives each a fresh random ID on its socket) and sent with one
//! `sendmmsg` per socket. A batch of upstream datagrams goes to the forwarder, which
//! accepts an answer only from the server that was queried, for a pending ID, with the same
//! question; anything else is counted and ignored, so a spoofed answer can neither reach the
//! client nor teach IPs. Accepted answers leave together, or once their new IPs are enforced.
//!
//! It must not decide what the forwarder decides (IDs, retries, hedges, timeouts), nor
//! what the verdict decides.

pub(crate) mod pool;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dnsfence_dns::forward::{Answered, NotSent, Outbound, Route};
use dnsfence_dns::{wire, Rcode};
use dnsfence_policy::Protocol;
use smallvec::SmallVec;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::clock::Throttle;
use crate::replies::{Path, ReplySockets};
use crate::reply::ReplyVia;
use crate::shared::Step;
use crate::sys::{self, Batch};
use crate::upstream::{Client, Upstreams};
use pool::UpstreamSocket;

/// Client datagrams received with one system call.
const CLIENT_BATCH: usize = 32;

/// Largest client query accepted over UDP (larger ones arrive truncated and are refused
/// as malformed); EDNS queries are far smaller.
const CLIENT_DATAGRAM: usize = 4096;

/// Upstream answers received with one system call (each buffer holds the largest answer).
const UPSTREAM_BATCH: usize = 16;

/// Largest UDP message handled.
pub(crate) const MAX_UDP: usize = 65_535;

/// A registered query, ready to leave: its datagram's index in the batch, the socket it
/// leaves from, its ID there, its server.
type Registered = (usize, Arc<UpstreamSocket>, u16, SocketAddr);

/// Sends the registered queries, one `sendmmsg` per run of queries sharing a socket. A
/// query that cannot be sent is the forwarder's to ask of another upstream, or to fail.
async fn send_queries(up: &Arc<Upstreams>, batch: &Batch, queries: &[Registered], now: Instant) {
    let msgs: SmallVec<[Outgoing<'_>; CLIENT_BATCH]> = queries
        .iter()
        .map(|(i, sock, _, server)| {
            let to = (!sock.connected).then_some(*server);
            (&sock.socket, batch.bytes(*i), to)
        })
        .collect();
    let failed = send_runs(&msgs).await;
    if failed.is_empty() {
        return;
    }
    {
        let snapshot = up.shared.snapshot();
        let mut fwd = up.shared.forwarder();
        for (k, e) in failed {
            let Some((_, sock, id, server)) = queries.get(k) else {
                continue;
            };
            debug!(upstream = %server, error = %e, "sending upstream failed");
            fwd.handle_send_error(now, &snapshot, sock.path, *id);
        }
    }
    up.flush(now).await;
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

/// Receives an upstream socket's datagrams until it is shut, hands them to the forwarder,
/// and delivers the answers it accepts.
pub(crate) async fn receive(up: Weak<Upstreams>, sock: Arc<UpstreamSocket>) {
    let mut batch = Batch::new(UPSTREAM_BATCH, MAX_UDP);
    let mut ready: Vec<(usize, Answered<Client>)> = Vec::with_capacity(UPSTREAM_BATCH);
    loop {
        let received = batch.recv(&sock.socket).await;
        let now = Instant::now();
        let Some(up) = up.upgrade() else {
            return;
        };
        let count = match received {
            Ok(n) => n,
            // Replaced, and its last query is done.
            Err(e) if sys::is_shut(&e) => return,
            // No query waiting on this socket will be answered: each is asked of another
            // upstream when there is one to ask, else answered SERVFAIL now rather than
            // after `dns.upstream_timeout`.
            Err(e) if unreachable_error(&e) && sock.connected => {
                up.unreachable(now, sock.path).await;
                continue;
            }
            Err(e) => {
                debug!(error = %e, "upstream receive failed");
                continue;
            }
        };
        let more = {
            let mut fwd = up.shared.forwarder();
            for i in 0..count {
                let Some((packet, from)) = batch.datagram(i) else {
                    continue;
                };
                match fwd.handle_answer(sock.path, from, packet) {
                    Ok(answered) => ready.push((i, answered)),
                    Err(rejection) => up.shared.rejected(&rejection),
                }
            }
            fwd.has_output()
        };
        answer_clients(&up, &batch, &mut ready, now).await;
        // An upstream marked down answered.
        if more {
            up.flush(now).await;
        }
    }
}

/// Learns from the answers `ready` (datagrams of `batch`) and sends them to their
/// clients: those that may leave at once together, the others once their new IPs are
/// enforced, each on a task of its own.
async fn answer_clients(
    up: &Upstreams,
    batch: &Batch,
    ready: &mut Vec<(usize, Answered<Client>)>,
    now: Instant,
) {
    let shared = &up.shared;
    let mut at_once: SmallVec<[(usize, ReplyVia, SocketAddr, Instant); UPSTREAM_BATCH]> =
        SmallVec::new();
    for (i, a) in ready.drain(..) {
        shared
            .metrics
            .latency_upstream
            .observe(now.saturating_duration_since(a.sent).as_secs_f64());
        let hold = shared.accept_answer(&a, now);
        let Answered {
            client: Some(client),
            addr,
            received,
            ..
        } = a
        else {
            // Another copy of the query was answered first.
            continue;
        };
        match (client, hold) {
            (Client::Udp(via), None) => at_once.push((i, via, addr, received)),
            (client, hold) => {
                // New IPs: wait for the datapath, never on this loop.
                let bytes = batch.bytes(i).to_vec();
                let shared = shared.clone();
                tokio::spawn(async move {
                    let released = match hold {
                        Some(confirmation) => shared.hold(confirmation, now).await,
                        None => now,
                    };
                    client.answer(&bytes, addr).await;
                    shared.delivered(addr.ip(), received, released);
                });
            }
        }
    }
    if at_once.is_empty() {
        return;
    }
    // The answers released at once leave together.
    let msgs: SmallVec<[(&ReplyVia, &[u8], SocketAddr); UPSTREAM_BATCH]> = at_once
        .iter()
        .map(|(i, via, addr, _)| (via, batch.bytes(*i), *addr))
        .collect();
    send_to_clients(&msgs).await;
    for (_, _, addr, received) in &at_once {
        shared.delivered(addr.ip(), *received, now);
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

/// Judges every datagram of a client batch, then sends what it produced: replies, one
/// `sendmmsg` per reply socket, and forwarded queries, one `sendmmsg` per upstream socket.
/// `route(i)` gives the `i`-th datagram's candidate servers and the index to try them
/// from (`None`: the datagram is skipped). `reply_via(client, server, now)` gives the
/// socket a reply to `client` from `server` leaves from, once the query has passed the
/// client's bounds (`None`: the query is dropped, unanswered).
async fn handle_batch<'r>(
    up: &Arc<Upstreams>,
    batch: &mut Batch,
    count: usize,
    outs: &mut [Vec<u8>],
    mut route: impl FnMut(usize) -> Option<(&'r [SocketAddr], usize)>,
    mut reply_via: impl FnMut(SocketAddr, SocketAddr, Instant) -> Option<ReplyVia>,
) {
    let at = Instant::now();
    let shared = &*up.shared;
    let turn = up.turn();
    let mut replies: SmallVec<[Reply; 8]> = SmallVec::new();
    let mut queries: SmallVec<[Registered; CLIENT_BATCH]> = SmallVec::new();
    {
        let mut fwd = shared.forwarder();
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
            let (query, learn, server) = match shared.judge(
                &mut fwd,
                at,
                packet,
                client,
                servers,
                start,
                Protocol::Udp,
                out,
            ) {
                Step::Reply(len) => {
                    if let Some(via) = reply_via(client, asked, at) {
                        replies.push((i, len, client, via));
                    }
                    continue;
                }
                Step::Forward(query, learn, server) => (query, learn, server),
                Step::Drop => continue,
            };
            let Some(via) = reply_via(client, asked, at) else {
                shared.leave(client.ip());
                continue;
            };
            let Some(sock) = up.udp.socket_for(&mut fwd, server, turn, at) else {
                warn!(%server, "no upstream socket for this address family; answering SERVFAIL");
                shared.leave(client.ip());
                if let Some(n) =
                    wire::write_reply(packet, Some(query.question_end), Rcode::ServFail, out)
                {
                    replies.push((i, n, client, via));
                }
                continue;
            };
            let ask = Outbound {
                client: Client::Udp(via),
                addr: client,
                upstream: server,
                learn,
                may_retry: servers.len() > 1,
                received: at,
            };
            match fwd.send(at, Route::Udp(sock.path), ask, &query, packet) {
                Ok(sent) => queries.push((i, sock, sent.id, server)),
                Err(NotSent {
                    client: back,
                    reason,
                }) => {
                    warn!(%server, error = %reason, "cannot send upstream; answering SERVFAIL");
                    shared.leave(client.ip());
                    let reply =
                        wire::write_reply(packet, Some(query.question_end), Rcode::ServFail, out);
                    if let (Client::Udp(via), Some(n)) = (back, reply) {
                        replies.push((i, n, client, via));
                    }
                }
            }
        }
    }
    if !replies.is_empty() {
        let msgs: SmallVec<[(&ReplyVia, &[u8], SocketAddr); 8]> = replies
            .iter()
            .map(|(i, len, client, via)| {
                let bytes = outs.get(*i).and_then(|o| o.get(..*len));
                (via, bytes.unwrap_or_default(), *client)
            })
            .collect();
        send_to_clients(&msgs).await;
    }
    if !queries.is_empty() {
        send_queries(up, batch, &queries, at).await;
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
pub(crate) async fn serve(up: Arc<Upstreams>, socket: Arc<UdpSocket>) -> io::Result<()> {
    let mut batch = Batch::new(CLIENT_BATCH, CLIENT_DATAGRAM);
    let mut outs = reply_buffers();
    let upstreams = up.shared.config.upstreams.clone();
    let mut turn = 0usize;
    let mut throttle = Throttle::default();
    loop {
        let count = match batch.recv(&socket).await {
            Ok(n) => n,
            // ICMP errors for earlier sends surface here on some systems: keep serving.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => continue,
            // Anything else (out of memory, say) is logged, at most once a second, and
            // retried after a pause: the listener never stops.
            Err(e) => {
                if let Some(unlogged) = throttle.failed() {
                    warn!(error = %e, also_since_last_log = unlogged, "receiving on a UDP listener failed; retrying");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        throttle.succeeded();
        let via = ReplyVia::Socket(socket.clone());
        handle_batch(
            &up,
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
    up: Arc<Upstreams>,
    socket: Arc<UdpSocket>,
) -> io::Result<()> {
    let shared = up.shared.clone();
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
            &up,
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
