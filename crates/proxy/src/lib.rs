//! The dnsfence DNS proxy: the tokio shell around `dnsfence-dns`.
//!
//! It owns sockets, tasks and timers: explicit listeners (UDP and TCP) that clients send
//! to, the upstream sockets and connections, the learned-mapping cache and its expiry, and
//! the hold of each answer until its new IPs are enforced by the [`IpSink`]. Decisions
//! themselves are made by the sans-IO core: verdicts on an immutable [`Snapshot`] swapped
//! in without locks, and everything about queries in flight upstream by its forwarder,
//! which the UDP and TCP modules drive (`upstream.rs` runs its timer). The clock is read
//! where time enters: a batch or a message arrives, the timer wakes, an answer is released.

pub mod api;
mod clock;
pub mod config;
pub mod flows;
mod http;
pub mod metrics;
mod replies;
mod reply;
mod shared;
mod sink;
mod sys;
mod tcp;
mod udp;
mod upstream;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use dnsfence_dns::Snapshot;
use tracing::error;

pub use api::{serve_api, FqdnEntry, FqdnIp, API_VERSION};
pub use http::{bind_metrics, serve_metrics};
pub use metrics::ProxyMetrics;
pub use shared::Shared;
pub use sink::{IpSink, NoopSink, SinkError, SinkFuture};
pub use tcp::{MAX_CONNECTIONS_PER_CLIENT, MAX_PIPELINED, WRITE_TIMEOUT};

/// A running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    udp: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
    listeners: Vec<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// Binds every explicit listener (UDP and TCP on each `dns.listen` address; with port
    /// 0, TCP takes the port UDP got) and starts serving. Fails before serving anything if a
    /// socket cannot be bound.
    pub async fn start(
        config: config::DnsConfig,
        snapshot: Snapshot,
        sink: Arc<dyn IpSink>,
        metrics: ProxyMetrics,
        flows: Arc<flows::FlowLog>,
    ) -> io::Result<Self> {
        sys::raise_fd_limit();
        let listen = config.listen.clone();
        let now = Instant::now();
        let (shared, refresh_rx) = Shared::new(config, snapshot, sink, metrics, flows, now);
        let shared = Arc::new(shared);
        let flusher = shared.clone();
        tokio::spawn(async move { flusher.flush_refreshes(refresh_rx).await });
        let mut udp_sockets = Vec::new();
        let mut tcp_listeners = Vec::new();
        for addr in listen {
            let udp = sys::explicit_udp(addr)?;
            let bound = udp.local_addr()?;
            let tcp = sys::explicit_tcp(bound)?;
            udp_sockets.push(Arc::new(udp));
            tcp_listeners.push(tcp);
        }
        let mut transparent_udp = Vec::new();
        let mut transparent_tcp = Vec::new();
        if let Some(t) = shared.config.transparent {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, t.port));
            transparent_udp.push(Arc::new(sys::udp_listener(v4)?));
            transparent_tcp.push(sys::tcp_listener(v4)?);
            // IPv6 may be disabled on the node; IPv4 interception still works then.
            let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, t.port));
            match (sys::udp_listener(v6), sys::tcp_listener(v6)) {
                (Ok(u), Ok(l)) => {
                    transparent_udp.push(Arc::new(u));
                    transparent_tcp.push(l);
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "no IPv6 transparent listener");
                }
            }
        }
        let up = upstream::Upstreams::start(shared.clone(), now)?;
        let mut listeners = Vec::new();
        for socket in transparent_udp {
            let up = up.clone();
            listeners.push(tokio::spawn(async move {
                if let Err(e) = udp::serve_transparent(up, socket).await {
                    error!(error = %e, "transparent UDP listener stopped");
                }
            }));
        }
        for listener in transparent_tcp {
            let up = up.clone();
            listeners.push(tokio::spawn(async move {
                if let Err(e) = tcp::serve(up, listener, tcp::Upstream::OriginalDestination).await {
                    error!(error = %e, "transparent TCP listener stopped");
                }
            }));
        }
        let mut proxy = Self {
            shared: shared.clone(),
            udp: Vec::new(),
            tcp: Vec::new(),
            listeners,
        };
        for socket in udp_sockets {
            proxy.udp.push(socket.local_addr()?);
            let up = up.clone();
            proxy.listeners.push(tokio::spawn(async move {
                if let Err(e) = udp::serve(up, socket).await {
                    error!(error = %e, "UDP listener stopped");
                }
            }));
        }
        for listener in tcp_listeners {
            proxy.tcp.push(listener.local_addr()?);
            let up = up.clone();
            proxy.listeners.push(tokio::spawn(async move {
                if let Err(e) = tcp::serve(up, listener, tcp::Upstream::Configured).await {
                    error!(error = %e, "TCP listener stopped");
                }
            }));
        }
        tokio::spawn(expire_loop(shared));
        Ok(proxy)
    }

    /// Addresses of the UDP listeners, as bound.
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp
    }

    /// Addresses of the TCP listeners, as bound.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp
    }

    /// The shared state: snapshot, cache, counters.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops taking new queries (closes every listener: a successor bound to the same
    /// ports with `SO_REUSEPORT` gets them), then waits until the queries in flight are
    /// answered, at most `limit`. Returns how many were still in flight at the end.
    pub async fn drain(&mut self, limit: Duration) -> u32 {
        for task in self.listeners.drain(..) {
            task.abort();
            let _ = task.await;
        }
        let drained = async {
            while self.shared.in_flight() != 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let _ = tokio::time::timeout(limit, drained).await;
        self.shared.in_flight()
    }
}

/// Removes expired mappings when the upstream timer's coarse clock reaches the next
/// expiry (at least every 10 ms apart, at most a second apart).
async fn expire_loop(shared: Arc<Shared>) {
    let mut ticks = shared.clock.ticks();
    loop {
        let now = *ticks.borrow_and_update();
        if now >= shared.clock.expire_due() {
            let next = shared.expire(now).await;
            let (soonest, latest) = (
                now + Duration::from_millis(10),
                now + Duration::from_secs(1),
            );
            shared
                .clock
                .set_expire_due(next.unwrap_or(latest).clamp(soonest, latest));
        }
        if ticks.changed().await.is_err() {
            return;
        }
    }
}
