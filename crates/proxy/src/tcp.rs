//! DNS over TCP (RFC 7766): length-prefixed messages, several queries pipelined on one
//! connection, answers written as they come (possibly out of order), idle timeouts.
//!
//! Each allowed query is exchanged with the upstream over its own TCP connection, so a
//! slow answer never holds up the others on the client's connection.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use dnsfence_dns::wire::{self, write_reply_to};
use dnsfence_dns::Rcode;
use dnsfence_policy::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::shared::Confirmation;
use crate::shared::{Shared, Step};

/// Client connections served at once per listener; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 1024;

/// Connections one client address may have open on a listener; more are closed at once,
/// so one client cannot take every connection slot.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 32;

/// Queries of one connection answered at once; the connection is not read further until
/// one of them is done.
pub const MAX_PIPELINED: usize = 64;

/// Longest a client may take to accept one answer (read it off its socket) before its
/// connection is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (out of descriptors or memory) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Where a TCP listener's allowed queries go.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Upstream {
    /// `dns.upstreams` (explicit listeners).
    Configured,
    /// The connection's original destination (transparent listeners).
    OriginalDestination,
}

/// Open connections per client address, for [`MAX_CONNECTIONS_PER_CLIENT`].
type PerClient = Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>;

/// A client's claim on one of its connection slots, given back on drop.
struct ClientSlot {
    table: PerClient,
    ip: IpAddr,
}

impl ClientSlot {
    fn take(table: &PerClient, ip: IpAddr) -> Option<Self> {
        let mut open = table.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_default();
        if *n >= MAX_CONNECTIONS_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(Self {
            table: table.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// What a connection holds while any part of it (its reader, its writer) is alive.
struct Held {
    _permit: OwnedSemaphorePermit,
    _slot: ClientSlot,
}

/// Serves one TCP listener. A failed `accept` (the process out of descriptors, say) is
/// logged, at most once a second, and retried after a pause: the listener never stops.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    upstream: Upstream,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_client = PerClient::default();
    let mut turn = 0usize;
    let mut warned: Option<Instant> = None;
    loop {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    warn!(error = %e, "accepting a TCP connection failed; retrying");
                    warned = Some(Instant::now());
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(slot) = ClientSlot::take(&per_client, client.ip()) else {
            shared.metrics.tcp_refused.inc();
            debug!(%client, "TCP connection closed: the client has its share open");
            continue;
        };
        turn = turn.wrapping_add(1);
        let servers = match upstream {
            Upstream::OriginalDestination => match stream.local_addr() {
                Ok(to) => vec![to],
                Err(e) => {
                    debug!(%client, error = %e, "TCP connection without a local address");
                    continue;
                }
            },
            Upstream::Configured => shared.config.upstreams.clone(),
        };
        let shared = shared.clone();
        let held = Held {
            _permit: permit,
            _slot: slot,
        };
        tokio::spawn(async move {
            if let Err(e) = connection(shared, stream, client, servers, turn, held).await {
                debug!(%client, error = %e, "TCP client connection ended");
            }
        });
    }
}

async fn read_message(stream: &mut (impl AsyncReadExt + Unpin)) -> io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut msg = vec![0u8; usize::from(len)];
    stream.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn write_message(w: &mut (impl AsyncWriteExt + Unpin), msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| io::Error::other("message too long"))?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    w.write_all(&framed).await
}

/// Writes a connection's answers in the order they are ready, until every sender is done;
/// gives up on the connection when the client takes longer than [`WRITE_TIMEOUT`] to
/// accept one.
async fn write_answers(
    shared: Arc<Shared>,
    mut wr: OwnedWriteHalf,
    mut answers: mpsc::Receiver<Vec<u8>>,
    client: SocketAddr,
    _held: Arc<Held>,
) {
    while let Some(answer) = answers.recv().await {
        match tokio::time::timeout(WRITE_TIMEOUT, write_message(&mut wr, &answer)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(%client, error = %e, "writing to a TCP client failed");
                return;
            }
            Err(_) => {
                shared.metrics.tcp_write_timeouts.inc();
                debug!(%client, "TCP client does not read its answers; closing");
                return;
            }
        }
    }
}

/// Serves one client connection: reads queries until the client closes, goes idle for
/// `dns.tcp_idle_timeout`, or stops reading its answers. Its descriptor and slots are
/// given back once the reader and the writer are both done.
async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: SocketAddr,
    servers: Vec<SocketAddr>,
    mut turn: usize,
    held: Held,
) -> io::Result<()> {
    let (mut rd, wr) = stream.into_split();
    let held = Arc::new(held);
    let (tx, rx) = mpsc::channel(MAX_PIPELINED);
    tokio::spawn(write_answers(shared.clone(), wr, rx, client, held.clone()));
    let pipelined = Arc::new(Semaphore::new(MAX_PIPELINED));
    let mut out = vec![0u8; 1024];
    loop {
        let answering = tokio::select! {
            p = pipelined.clone().acquire_owned() => p.map_err(io::Error::other)?,
            () = tx.closed() => return Ok(()),
        };
        let read = tokio::select! {
            r = tokio::time::timeout(shared.config.tcp_idle_timeout, read_message(&mut rd)) => r,
            // The writer gave up on the client.
            () = tx.closed() => return Ok(()),
        };
        let msg = match read {
            Ok(Ok(m)) => m,
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()), // idle
        };
        let received = Instant::now();
        turn = turn.wrapping_add(1);
        match shared.judge(&msg, client, &servers, turn, Protocol::Tcp, &mut out) {
            Step::Reply(n) => {
                if tx
                    .send(out.get(..n).unwrap_or_default().to_vec())
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            Step::Forward(query, learn, upstream) => {
                let several = servers.len() > 1;
                let shared = shared.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let reply = forward(
                        &shared, msg, &query, learn, client, upstream, received, several,
                    )
                    .await;
                    shared.leave(client.ip());
                    if !reply.is_empty() {
                        let _ = tx.send(reply).await;
                    }
                    drop(answering);
                });
            }
            Step::Drop => {}
        }
    }
}

/// Exchanges one allowed query with `upstream` and returns what the client gets: the
/// answer (after its new IPs are enforced, or `dns.response_max_delay`), or SERVFAIL when
/// the upstream fails or takes longer than `dns.upstream_timeout`. With `retry`, a query
/// is asked once more of another configured upstream the client's policy allows (see
/// [`Shared::alternative`]) when its upstream fails, or, as over UDP, as a second copy
/// when it has not answered after `dns.upstream_hedge_after`: the first answer wins.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only be unpacked"
)]
async fn forward(
    shared: &Arc<Shared>,
    msg: Vec<u8>,
    query: &dnsfence_dns::Query,
    learn: bool,
    client: SocketAddr,
    upstream: SocketAddr,
    received: Instant,
    retry: bool,
) -> Vec<u8> {
    let question: Arc<[u8]> = query.question(&msg).into();
    let rd = wire::recursion_desired(&msg);
    let again = retry.then(|| msg.clone());
    // Each copy runs as a task of its own: a copy that loses the race still ends in its
    // answer or its timeout, which the upstream's health counts.
    let copy = |msg: Vec<u8>, learn: bool, to: SocketAddr| {
        let (shared, question) = (shared.clone(), question.clone());
        tokio::spawn(
            async move { attempt(&shared, msg, &question, learn, client, to, received).await },
        )
    };
    let mut first = copy(msg, learn, upstream);
    let slow = shared.config.hedge_after().filter(|_| again.is_some());
    let early = match slow {
        None => Some((&mut first).await.ok().flatten()),
        Some(after) => tokio::select! {
            a = &mut first => Some(a.ok().flatten()),
            () = tokio::time::sleep(after) => None,
        },
    };
    let alternative = || shared.alternative(client.ip(), upstream, query, Protocol::Tcp);
    let answer = match (early, again) {
        (Some(answer @ Some(_)), _) | (Some(answer @ None), None) => answer,
        // Failed: asked again.
        (Some(None), Some(msg)) => match alternative() {
            Some((other, learn)) => {
                debug!(from = %upstream, to = %other, "TCP query asked again of another upstream");
                shared.metrics.upstream_retries.inc();
                copy(msg, learn, other).await.ok().flatten()
            }
            None => None,
        },
        // Slow: a second copy races the first.
        (None, msg) => match msg.and_then(|m| alternative().map(|(o, l)| (m, o, l))) {
            Some((msg, other, learn)) => {
                debug!(from = %upstream, to = %other, "slow TCP query copied to another upstream");
                shared.metrics.upstream_retries.inc();
                let mut second = copy(msg, learn, other);
                tokio::select! {
                    a = &mut first => match a.ok().flatten() {
                        Some(a) => Some(a),
                        None => second.await.ok().flatten(),
                    },
                    b = &mut second => match b.ok().flatten() {
                        Some(b) => Some(b),
                        None => first.await.ok().flatten(),
                    },
                }
            }
            None => first.await.ok().flatten(),
        },
    };
    match answer {
        Some(mut a) => {
            wire::set_id(&mut a, query.id);
            shared
                .metrics
                .latency_total
                .observe(received.elapsed().as_secs_f64());
            a
        }
        None => {
            let mut buf = [0u8; 512];
            let n = write_reply_to(query.id, rd, &question, Rcode::ServFail, &mut buf).unwrap_or(0);
            buf.get(..n).unwrap_or_default().to_vec()
        }
    }
}

/// One exchange with `upstream`, bounded by `dns.upstream_timeout` (the hold has its own
/// bound): the answer once its new IPs are enforced, or `None` when the upstream failed
/// (counted, and against its health).
async fn attempt(
    shared: &Shared,
    msg: Vec<u8>,
    question: &[u8],
    learn: bool,
    client: SocketAddr,
    upstream: SocketAddr,
    received: Instant,
) -> Option<Vec<u8>> {
    let asked = crate::shared::Asked {
        client: client.ip(),
        server: upstream,
        received,
        answered: received,
    };
    let answer = tokio::time::timeout(
        shared.config.upstream_timeout,
        exchange(shared, upstream, msg, question, learn, asked),
    )
    .await;
    match answer {
        Ok(Ok((a, hold))) => {
            shared.upstreams.answered(upstream);
            if let Some(apply) = hold {
                shared.hold(apply).await;
            }
            Some(a)
        }
        other => {
            if other.is_err() {
                shared.metrics.upstream_timeouts.inc();
            } else {
                shared.metrics.upstream_errors.inc();
            }
            shared.upstreams.failed(upstream, Instant::now());
            None
        }
    }
}

/// Idle upstream TCP connections, reused for later queries (RFC 7766 encourages reuse)
/// when `dns.upstream_tcp_idle` is set: at most [`POOL_PER_UPSTREAM`] per upstream, each
/// dropped after that long unused.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    idle: std::sync::Mutex<
        std::collections::HashMap<SocketAddr, Vec<(TcpStream, std::time::Instant)>>,
    >,
}

/// Idle connections kept per upstream.
const POOL_PER_UPSTREAM: usize = 8;
/// Upstreams with idle connections kept at once.
const POOL_UPSTREAMS: usize = 64;
impl Pool {
    fn take(&self, upstream: SocketAddr, keep: std::time::Duration) -> Option<TcpStream> {
        if keep.is_zero() {
            return None;
        }
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = idle.get_mut(&upstream)?;
        while let Some((stream, since)) = list.pop() {
            if since.elapsed() < keep {
                return Some(stream);
            }
        }
        None
    }

    fn put(&self, upstream: SocketAddr, stream: TcpStream, keep: std::time::Duration) {
        if keep.is_zero() {
            // Closed now: the server is not left holding an idle connection.
            return;
        }
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Expired connections are closed here, for every upstream: a transparent proxy
        // sees many servers, most of them asked once.
        idle.retain(|_, list| {
            list.retain(|(_, since)| since.elapsed() < keep);
            !list.is_empty()
        });
        if idle.len() >= POOL_UPSTREAMS && !idle.contains_key(&upstream) {
            return;
        }
        let list = idle.entry(upstream).or_default();
        if list.len() < POOL_PER_UPSTREAM {
            list.push((stream, std::time::Instant::now()));
        }
    }
}

/// Sends `query` on `up` and reads messages until one carries `id`.
async fn ask(up: &mut TcpStream, query: &[u8], id: u16, shared: &Shared) -> io::Result<Vec<u8>> {
    write_message(up, query).await?;
    loop {
        let answer = read_message(up).await?;
        if wire::id(&answer) == Some(id) {
            return Ok(answer);
        }
        shared.metrics.answers_rejected.inc();
    }
}

/// One query to `upstream` over TCP, on an idle connection when there is one (a fresh
/// one if that fails), under a fresh ID; returns the checked answer and, when it brought
/// new IPs, what to wait for before releasing it.
async fn exchange(
    shared: &Shared,
    upstream: SocketAddr,
    mut query: Vec<u8>,
    question: &[u8],
    learn: bool,
    asked: crate::shared::Asked,
) -> io::Result<(Vec<u8>, Option<Confirmation>)> {
    let id = rand::random::<u16>();
    wire::set_id(&mut query, id);
    let sent = std::time::Instant::now();
    let keep = shared.config.upstream_tcp_idle;
    let (mut up, mut answer) = match shared.tcp_pool.take(upstream, keep) {
        Some(mut up) => match ask(&mut up, &query, id, shared).await {
            Ok(a) => (up, a),
            Err(_) => {
                // The upstream closed it meanwhile.
                let mut up = TcpStream::connect(upstream).await?;
                let a = ask(&mut up, &query, id, shared).await?;
                (up, a)
            }
        },
        None => {
            let mut up = TcpStream::connect(upstream).await?;
            let a = ask(&mut up, &query, id, shared).await?;
            (up, a)
        }
    };
    shared
        .metrics
        .latency_upstream
        .observe(sent.elapsed().as_secs_f64());
    loop {
        let asked = crate::shared::Asked {
            answered: std::time::Instant::now(),
            ..asked
        };
        match shared.accept_answer(question, &answer, learn, asked) {
            Some(hold) => {
                shared.tcp_pool.put(upstream, up, keep);
                return Ok((answer, hold));
            }
            // Not an answer to this question: keep reading.
            None => answer = ask_more(&mut up, id, shared).await?,
        }
    }
}

/// Reads until the next message carrying `id`.
async fn ask_more(up: &mut TcpStream, id: u16, shared: &Shared) -> io::Result<Vec<u8>> {
    loop {
        let answer = read_message(up).await?;
        if wire::id(&answer) == Some(id) {
            return Ok(answer);
        }
        shared.metrics.answers_rejected.inc();
    }
}
