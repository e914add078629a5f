//! `/metrics` (Prometheus text) and `/healthz` over plain HTTP/1.1, for scrapers and probes.
//!
//! Deliberately tiny: GET and HEAD only, one request per connection, bounded request size
//! and time. A query string is ignored (`/metrics?x=1` is `/metrics`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::clock::Throttle;

const MAX_REQUEST: usize = 8 * 1024;

/// Binds the `/metrics` and `/healthz` listener on `addr` with `SO_REUSEPORT`, as the DNS
/// listeners are: during an upgrade the new process starts, and answers probes, while the
/// old one still listens on the same port (two pods of a host-network DaemonSet during a
/// rolling update with `maxSurge`). Must be called inside the Tokio runtime.
pub fn bind_metrics(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}

/// Serves `/metrics` from `registry` and `/healthz` on `listener`. It does not stop on an
/// accept error (out of file descriptors, say): the error is logged at most once a second
/// and accepting resumes 100 ms later.
pub async fn serve_metrics(listener: TcpListener, registry: Arc<Registry>) -> io::Result<()> {
    serve_on(&listener, registry).await
}

/// The pause after a failed accept: errors such as EMFILE persist for a while, and retrying
/// at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Where connections come from: the listener, or a test's stand-in.
trait Accept {
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)>;
}

impl Accept for TcpListener {
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        TcpListener::accept(self).await
    }
}

async fn serve_on(listener: &impl Accept, registry: Arc<Registry>) -> io::Result<()> {
    let mut throttle = Throttle::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                if let Some(unlogged) = throttle.failed() {
                    warn!(error = %e, also_since_last_log = unlogged, "metrics listener: accept failed; retrying");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        throttle.succeeded();
        let registry = registry.clone();
        tokio::spawn(async move {
            let served =
                tokio::time::timeout(Duration::from_secs(5), respond(stream, &registry)).await;
            if !matches!(served, Ok(Ok(()))) {
                debug!(%peer, "metrics request failed or timed out");
            }
        });
    }
}

async fn respond(mut stream: TcpStream, registry: &Registry) -> io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return Ok(());
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    let head_only = method == b"HEAD";
    let (status, ctype, body) = match (method, path) {
        (b"GET" | b"HEAD", b"/metrics") => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => (
                    "500 Internal Server Error",
                    "text/plain",
                    "encoding failed\n".to_owned(),
                ),
            }
        }
        (b"GET" | b"HEAD", b"/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        (b"GET" | b"HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET or HEAD only\n".to_owned(),
        ),
    };
    let allow = if status.starts_with("405") {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    // HEAD: the headers GET would have, without the body.
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests: a panic is a failure")]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An upgrade starts the new process while the old one still listens.
    #[tokio::test]
    async fn two_metrics_listeners_share_a_port() {
        let first = bind_metrics("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind_metrics(addr).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
        drop(first);
        let registry = Arc::new(Registry::default());
        tokio::spawn(serve_metrics(second, registry));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    }

    async fn request(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply
    }

    fn registry() -> Arc<Registry> {
        let mut registry = Registry::with_prefix("dnsfence");
        let counter: prometheus_client::metrics::counter::Counter = Default::default();
        counter.inc();
        registry.register("probe", "A counter", counter);
        Arc::new(registry)
    }

    /// Scrapers add query strings; load balancers and probes send HEAD.
    #[tokio::test]
    async fn query_strings_are_ignored_and_head_has_no_body() {
        let listener = bind_metrics("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_metrics(listener, registry()));
        let get = request(addr, "GET /metrics?x=1 HTTP/1.1\r\n\r\n").await;
        assert!(get.starts_with("HTTP/1.1 200 OK"), "{get}");
        assert!(get.contains("dnsfence_probe_total 1"), "{get}");
        let health = request(addr, "GET /healthz?verbose HTTP/1.1\r\n\r\n").await;
        assert!(health.starts_with("HTTP/1.1 200 OK") && health.ends_with("\r\n\r\nok\n"));
        for path in ["/healthz", "/metrics"] {
            let get = request(addr, &format!("GET {path} HTTP/1.1\r\n\r\n")).await;
            let head = request(addr, &format!("HEAD {path} HTTP/1.1\r\n\r\n")).await;
            let (get_head, _) = get.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
            assert_eq!(head, format!("{get_head}\r\n\r\n"), "HEAD {path}");
        }
        let missing = request(addr, "HEAD /nope HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404") && missing.ends_with("\r\n\r\n"));
        let post = request(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET, HEAD\r\n"));
    }

    /// Fails to accept `failures` times (as when out of file descriptors), then accepts.
    struct Flaky {
        listener: TcpListener,
        failures: std::sync::atomic::AtomicU32,
    }

    impl Accept for Flaky {
        async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
            let left = self.failures.load(std::sync::atomic::Ordering::Relaxed);
            if left > 0 {
                self.failures
                    .store(left - 1, std::sync::atomic::Ordering::Relaxed);
                return Err(io::Error::from_raw_os_error(24)); // EMFILE
            }
            self.listener.accept().await
        }
    }

    #[tokio::test]
    async fn accept_errors_do_not_stop_the_listener() {
        let listener = bind_metrics("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let flaky = Flaky {
            listener,
            failures: 3.into(),
        };
        let server = tokio::spawn(async move { serve_on(&flaky, registry()).await });
        let started = Instant::now();
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            request(addr, "GET /healthz HTTP/1.1\r\n\r\n"),
        )
        .await
        .unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        // It backed off between the failures.
        assert!(
            started.elapsed() >= ACCEPT_BACKOFF * 3,
            "{:?}",
            started.elapsed()
        );
        assert!(!server.is_finished());
        server.abort();
    }
}
