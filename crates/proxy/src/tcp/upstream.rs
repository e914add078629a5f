//! Upstream TCP exchanges: each copy of a TCP query is one exchange with its server (a
//! path of the forwarder of its own), on an idle pooled connection when there is one (RFC
//! 7766 encourages reuse; `dns.upstream_tcp_idle`), else a fresh one. It sends the query,
//! reads until the forwarder accepts an answer, and reports a broken exchange; the
//! forwarder decides everything else (the timeout, another upstream, SERVFAIL).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dnsfence_dns::forward::{PathId, Rejection};
use tokio::net::TcpStream;
use tracing::debug;

use super::{read_message, write_message};
use crate::upstream::Upstreams;

/// Idle connections kept per upstream.
const POOL_PER_UPSTREAM: usize = 8;

/// Upstreams with idle connections kept at once.
const POOL_UPSTREAMS: usize = 64;

/// Idle upstream TCP connections, reused for later queries when `dns.upstream_tcp_idle`
/// is set: at most [`POOL_PER_UPSTREAM`] per upstream, each dropped after that long unused.
#[derive(Debug, Default)]
pub(crate) struct Idle {
    idle: Mutex<HashMap<SocketAddr, Vec<(TcpStream, Instant)>>>,
}

impl Idle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<(TcpStream, Instant)>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection to `upstream` idle for less than `keep` at `now`.
    fn take(&self, upstream: SocketAddr, keep: Duration, now: Instant) -> Option<TcpStream> {
        if keep.is_zero() {
            return None;
        }
        let mut idle = self.lock();
        let list = idle.get_mut(&upstream)?;
        while let Some((stream, since)) = list.pop() {
            if now.saturating_duration_since(since) < keep {
                return Some(stream);
            }
        }
        None
    }

    /// Keeps `stream` for reuse, idle from `now`.
    fn put(&self, upstream: SocketAddr, stream: TcpStream, keep: Duration, now: Instant) {
        if keep.is_zero() {
            // Closed now: the server is not left holding an idle connection.
            return;
        }
        let mut idle = self.lock();
        // Expired connections are closed here, for every upstream: a transparent proxy
        // sees many servers, most of them asked once.
        idle.retain(|_, list| {
            list.retain(|(_, since)| now.saturating_duration_since(*since) < keep);
            !list.is_empty()
        });
        if idle.len() >= POOL_UPSTREAMS && !idle.contains_key(&upstream) {
            return;
        }
        let list = idle.entry(upstream).or_default();
        if list.len() < POOL_PER_UPSTREAM {
            list.push((stream, now));
        }
    }
}

/// Exchanges the copy `query` (registered on `path` at `sent`) with `server`, for at most
/// `dns.upstream_timeout`: past it the forwarder has timed the copy out, and there is
/// nothing left to report. (Boxed as `Send`: a broken exchange may have the forwarder start
/// another one, and `Send` cannot be inferred through that cycle.)
pub(crate) fn exchange(
    up: Arc<Upstreams>,
    path: PathId,
    server: SocketAddr,
    query: Vec<u8>,
    sent: Instant,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let limit = up.shared.config.upstream_timeout;
        let _ = tokio::time::timeout(limit, talk(&up, path, server, &query, sent)).await;
    })
}

/// Sends `query` and hands what comes back to the forwarder until it takes an answer.
async fn talk(up: &Arc<Upstreams>, path: PathId, server: SocketAddr, query: &[u8], sent: Instant) {
    let keep = up.shared.config.upstream_tcp_idle;
    let mut conn = None;
    loop {
        let read = match conn {
            Some(ref mut c) => read_message(c).await,
            None => match ask(&up.tcp, server, query, keep, sent).await {
                Ok((c, first)) => {
                    conn = Some(c);
                    Ok(first)
                }
                Err(e) => Err(e),
            },
        };
        let now = Instant::now();
        let mut msg = match read {
            Ok(msg) => msg,
            Err(e) => {
                debug!(upstream = %server, error = %e, "TCP exchange with the upstream failed");
                up.unreachable(now, path).await;
                return;
            }
        };
        let (reception, more) = {
            let mut fwd = up.shared.forwarder();
            let reception = fwd.handle_answer(path, server, &mut msg);
            (reception, fwd.has_output())
        };
        match reception {
            Ok(answered) => {
                if let Some(c) = conn.take() {
                    up.tcp.put(server, c, keep, now);
                }
                up.deliver(answered, msg, now).await;
                if more {
                    up.flush(now).await;
                }
                return;
            }
            // Timed out meanwhile.
            Err(Rejection::NoPath) => return,
            // Not the awaited answer: keep reading.
            Err(rejection) => up.shared.rejected(&rejection),
        }
    }
}

/// Sends `query` to `server` on an idle connection when there is one (a fresh one if that
/// fails: the server may have closed it meanwhile), and reads the first message back.
async fn ask(
    idle: &Idle,
    server: SocketAddr,
    query: &[u8],
    keep: Duration,
    now: Instant,
) -> io::Result<(TcpStream, Vec<u8>)> {
    if let Some(mut up) = idle.take(server, keep, now) {
        if write_message(&mut up, query).await.is_ok() {
            if let Ok(first) = read_message(&mut up).await {
                return Ok((up, first));
            }
        }
    }
    let mut up = TcpStream::connect(server).await?;
    write_message(&mut up, query).await?;
    let first = read_message(&mut up).await?;
    Ok((up, first))
}
