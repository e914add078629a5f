//! DNS over TCP (RFC 7766): length-prefixed messages, several queries pipelined on one
//! connection, answers written as they come (possibly out of order), idle timeouts; the
//! forwarder's TCP driver.
//!
//! Each allowed query is registered with the forwarder and exchanged with the upstream
//! over a connection of its own (see [`upstream`]), so a slow answer never holds up the
//! others on the client's connection. It must not decide what the forwarder decides
//! (retries, hedges, timeouts) nor what the verdict decides.

pub(crate) mod upstream;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use dnsfence_dns::forward::{Outbound, Route};
use dnsfence_dns::wire::write_reply;
use dnsfence_dns::Rcode;
use dnsfence_policy::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::clock::Throttle;
use crate::shared::{Shared, Step};
use crate::upstream::{Client, TcpClient, Upstreams};

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
    up: Arc<Upstreams>,
    listener: TcpListener,
    upstream: Upstream,
) -> io::Result<()> {
    let shared = &up.shared;
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_client = PerClient::default();
    let mut turn = 0usize;
    let mut throttle = Throttle::default();
    loop {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                if let Some(unlogged) = throttle.failed() {
                    warn!(error = %e, also_since_last_log = unlogged, "accepting a TCP connection failed; retrying");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        throttle.succeeded();
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
        let up = up.clone();
        let held = Held {
            _permit: permit,
            _slot: slot,
        };
        tokio::spawn(async move {
            if let Err(e) = connection(up, stream, client, servers, turn, held).await {
                debug!(%client, error = %e, "TCP client connection ended");
            }
        });
    }
}

pub(crate) async fn read_message(stream: &mut (impl AsyncReadExt + Unpin)) -> io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut msg = vec![0u8; usize::from(len)];
    stream.read_exact(&mut msg).await?;
    Ok(msg)
}

pub(crate) async fn write_message(
    w: &mut (impl AsyncWriteExt + Unpin),
    msg: &[u8],
) -> io::Result<()> {
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
    up: Arc<Upstreams>,
    stream: TcpStream,
    client: SocketAddr,
    servers: Vec<SocketAddr>,
    mut turn: usize,
    held: Held,
) -> io::Result<()> {
    let shared = &up.shared;
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
        let mut msg = match read {
            Ok(Ok(m)) => m,
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()), // idle
        };
        let received = Instant::now();
        turn = turn.wrapping_add(1);
        let (reply, exchange) = {
            let mut fwd = shared.forwarder();
            match shared.judge(
                &mut fwd,
                received,
                &msg,
                client,
                &servers,
                turn,
                Protocol::Tcp,
                &mut out,
            ) {
                Step::Reply(n) => (out.get(..n).map(<[u8]>::to_vec), None),
                Step::Forward(query, learn, server) => {
                    let ask = Outbound {
                        client: Client::Tcp(TcpClient {
                            answers: tx.clone(),
                            _slot: answering,
                        }),
                        addr: client,
                        upstream: server,
                        learn,
                        may_retry: servers.len() > 1,
                        received,
                    };
                    match fwd.send(received, Route::Tcp, ask, &query, &mut msg) {
                        Ok(sent) => (None, Some((sent.path, server))),
                        Err(e) => {
                            warn!(%server, error = %e.reason, "cannot send upstream; answering SERVFAIL");
                            shared.leave(client.ip());
                            let n = write_reply(
                                &msg,
                                Some(query.question_end),
                                Rcode::ServFail,
                                &mut out,
                            );
                            (n.and_then(|n| out.get(..n)).map(<[u8]>::to_vec), None)
                        }
                    }
                }
                Step::Drop => (None, None),
            }
        };
        if let Some((path, server)) = exchange {
            tokio::spawn(upstream::exchange(up.clone(), path, server, msg, received));
        }
        if let Some(reply) = reply {
            if tx.send(reply).await.is_err() {
                return Ok(());
            }
        }
    }
}
