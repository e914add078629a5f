//! `/metrics` (Prometheus text) and `/healthz` over plain HTTP/1.1, for scrapers and probes.
//!
//! Deliberately tiny: GET only, one request per connection, bounded request size and time.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

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

/// Serves `/metrics` from `registry` and `/healthz` on `listener` until it fails.
pub async fn serve_metrics(listener: TcpListener, registry: Arc<Registry>) -> io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
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
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (status, ctype, body) = match (method, path) {
        (b"GET", b"/metrics") => {
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
        (b"GET", b"/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        (b"GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests: a panic is a failure")]
mod tests {
    use super::*;

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
}
