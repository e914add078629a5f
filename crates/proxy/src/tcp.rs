//! DNS over TCP (RFC 7766): length-prefixed messages, several queries pipelined on one
//! connection, answers written as they come (possibly out of order), idle timeouts.
//!
//! Each allowed query is exchanged with the upstream over its own TCP connection, so a
//! slow answer never holds up the others on the client's connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use dnsfence_dns::wire::{self, write_reply_to};
use dnsfence_dns::Rcode;
use dnsfence_policy::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tracing::debug;

use crate::shared::{Shared, Step};

/// Client connections served at once per listener; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 1024;

/// Where a TCP listener's allowed queries go.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Upstream {
    /// `dns.upstreams` (explicit listeners).
    Configured,
    /// The connection's original destination (transparent listeners).
    OriginalDestination,
}

/// Serves one TCP listener.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    upstream: Upstream,
) -> io::Result<()> {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut turn = 0usize;
    loop {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let (stream, client) = listener.accept().await?;
        turn = turn.wrapping_add(1);
        let servers = match upstream {
            Upstream::OriginalDestination => vec![stream.local_addr()?],
            Upstream::Configured => shared.config.upstreams.clone(),
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(shared, stream, client, servers, turn).await {
                debug!(%client, error = %e, "TCP client connection ended");
            }
            drop(permit);
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

async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: SocketAddr,
    servers: Vec<SocketAddr>,
    mut turn: usize,
) -> io::Result<()> {
    let (mut rd, wr) = stream.into_split();
    let wr = Arc::new(Mutex::new(wr));
    let mut out = vec![0u8; 1024];
    loop {
        let msg = match tokio::time::timeout(shared.config.tcp_idle_timeout, read_message(&mut rd))
            .await
        {
            Ok(Ok(m)) => m,
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()), // idle
        };
        let received = std::time::Instant::now();
        turn = turn.wrapping_add(1);
        match shared.judge(&msg, client, &servers, turn, Protocol::Tcp, &mut out) {
            Step::Reply(n) => {
                write_message(&mut *wr.lock().await, out.get(..n).unwrap_or_default()).await?;
            }
            Step::Forward(query, learn, upstream) => {
                let shared = shared.clone();
                let wr = wr.clone();
                tokio::spawn(async move {
                    let question = msg
                        .get(wire::HEADER_LEN..query.question_end)
                        .unwrap_or_default()
                        .to_vec();
                    let rd = wire::recursion_desired(&msg);
                    let answer = tokio::time::timeout(
                        shared.config.upstream_timeout,
                        exchange(
                            &shared,
                            upstream,
                            msg,
                            &question,
                            learn,
                            crate::shared::Asked {
                                client: client.ip(),
                                server: upstream,
                                received,
                                answered: received,
                            },
                        ),
                    )
                    .await;
                    let reply = match answer {
                        Ok(Ok(mut a)) => {
                            wire::set_id(&mut a, query.id);
                            shared
                                .metrics
                                .latency_total
                                .observe(received.elapsed().as_secs_f64());
                            a
                        }
                        other => {
                            if other.is_err() {
                                shared.metrics.upstream_timeouts.inc();
                            }
                            let mut buf = [0u8; 512];
                            let n =
                                write_reply_to(query.id, rd, &question, Rcode::ServFail, &mut buf)
                                    .unwrap_or(0);
                            buf.get(..n).unwrap_or_default().to_vec()
                        }
                    };
                    shared.leave(client.ip());
                    if !reply.is_empty() {
                        let _ = write_message(&mut *wr.lock().await, &reply).await;
                    }
                });
            }
            Step::Drop => {}
        }
    }
}

/// Idle upstream TCP connections, reused for later queries (RFC 7766 encourages reuse):
/// at most [`POOL_PER_UPSTREAM`] per upstream, each dropped after [`POOL_IDLE`] unused.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    idle: std::sync::Mutex<
        std::collections::HashMap<SocketAddr, Vec<(TcpStream, std::time::Instant)>>,
    >,
}

/// Idle connections kept per upstream.
const POOL_PER_UPSTREAM: usize = 8;
/// How long an idle connection is kept.
const POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

impl Pool {
    fn take(&self, upstream: SocketAddr) -> Option<TcpStream> {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = idle.get_mut(&upstream)?;
        while let Some((stream, since)) = list.pop() {
            if since.elapsed() < POOL_IDLE {
                return Some(stream);
            }
        }
        None
    }

    fn put(&self, upstream: SocketAddr, stream: TcpStream) {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = idle.entry(upstream).or_default();
        list.retain(|(_, since)| since.elapsed() < POOL_IDLE);
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
/// one if that fails), under a fresh ID; returns the checked answer after its IPs are
/// enforced.
async fn exchange(
    shared: &Shared,
    upstream: SocketAddr,
    mut query: Vec<u8>,
    question: &[u8],
    learn: bool,
    asked: crate::shared::Asked,
) -> io::Result<Vec<u8>> {
    let id = rand::random::<u16>();
    wire::set_id(&mut query, id);
    let sent = std::time::Instant::now();
    let (mut up, mut answer) = match shared.tcp_pool.take(upstream) {
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
                shared.tcp_pool.put(upstream, up);
                if let Some(apply) = hold {
                    shared.hold(apply).await;
                }
                return Ok(answer);
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
