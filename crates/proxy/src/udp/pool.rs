//! The UDP upstream sockets: which socket a query to a server leaves from, and their
//! source ports' rotation. Each socket is one path of the forwarder.
//!
//! Each upstream server gets [`POOL`] sockets of its own, connected to it (random source
//! ports; the kernel then delivers only that server's datagrams to them and routes each
//! query without a lookup). Servers beyond [`MAX_CONNECTED_UPSTREAMS`] share unconnected
//! sockets. Source ports do not stay: every socket is replaced by one on a fresh random
//! port after `dns.upstream_port_lifetime`, one socket of a set at a time. A replaced
//! socket only waits for the answers it is owed (the forwarder says when none is left),
//! then closes; a spoofer who learned a port has until then.
//!
//! It must not look at queries or answers: the forwarder matches them, the receive loop
//! (`udp.rs`) feeds it.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use dnsfence_dns::forward::PathId;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::UdpSocket;
use tracing::warn;

use crate::sys;
use crate::upstream::{Fwd, Upstreams};

/// Upstream sockets per server (and unconnected ones per address family).
const POOL: usize = 4;

/// Replaced sockets kept open at once for the answers they are owed. Past this many (a
/// long `dns.upstream_timeout`, silent servers, a short port lifetime), sockets are not
/// replaced until some close: a bound on descriptors.
const MAX_DRAINING: usize = 256;

/// Servers that get connected sockets of their own; queries to further servers (only a
/// transparent proxy can see many) share the unconnected sockets.
const MAX_CONNECTED_UPSTREAMS: usize = 64;

/// The unspecified addresses the shared sockets bind, by family.
const V4_ANY: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
const V6_ANY: SocketAddr = SocketAddr::new(std::net::IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);

/// One upstream socket: a path of the forwarder.
pub(crate) struct UpstreamSocket {
    pub(crate) socket: UdpSocket,
    /// Whether the socket is connected to its server (queries leave without an address).
    pub(crate) connected: bool,
    /// The forwarder's name for it.
    pub(crate) path: PathId,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The UDP upstream sockets. Callers hold the forwarder's lock, then take these.
pub(crate) struct Sockets {
    /// The upstreams, for the receive tasks it starts.
    up: Weak<Upstreams>,
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
    /// Open sockets (the metric).
    open: Gauge,
    /// `dns.upstream_port_lifetime`.
    lifetime: Duration,
}

impl Sockets {
    pub(crate) fn new(up: Weak<Upstreams>, open: Gauge, lifetime: Duration) -> Self {
        Self {
            up,
            connected: Mutex::default(),
            v4: Mutex::new(Arc::new([])),
            v6: Mutex::new(Arc::new([])),
            draining: Mutex::default(),
            warned: Mutex::default(),
            open,
            lifetime,
        }
    }

    /// Opens the unconnected sockets (IPv6 ones only if the host has IPv6) and the
    /// configured `upstreams`' connected ones.
    pub(crate) fn start(
        &self,
        fwd: &mut Fwd,
        upstreams: &[SocketAddr],
        now: Instant,
    ) -> io::Result<()> {
        *lock(&self.v4) = self.open_set(fwd, V4_ANY, false, now)?;
        // IPv6 may be disabled on the host; IPv4 upstreams still work.
        if let Ok(v6) = self.open_set(fwd, V6_ANY, false, now) {
            *lock(&self.v6) = v6;
        }
        for upstream in upstreams {
            self.connected_to(fwd, *upstream, now);
        }
        Ok(())
    }

    /// The sockets connected to `upstream`, created (and their receive tasks started) on
    /// first use. `None` or empty when the server gets none: there are already
    /// [`MAX_CONNECTED_UPSTREAMS`] servers, or connecting failed.
    fn connected_to(&self, fwd: &mut Fwd, upstream: SocketAddr, now: Instant) -> Option<SocketSet> {
        let mut map = lock(&self.connected);
        if let Some(socks) = map.get(&upstream) {
            return Some(socks.clone());
        }
        if map.len() >= MAX_CONNECTED_UPSTREAMS {
            return None;
        }
        let socks = match self.open_set(fwd, upstream, true, now) {
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
    pub(crate) fn socket_for(
        &self,
        fwd: &mut Fwd,
        upstream: SocketAddr,
        turn: usize,
        now: Instant,
    ) -> Option<Arc<UpstreamSocket>> {
        let own = self.connected_to(fwd, upstream, now);
        self.pick(own, upstream, turn)
    }

    /// [`Self::socket_for`] among the sockets open now (none is opened).
    pub(crate) fn existing_socket_for(
        &self,
        upstream: SocketAddr,
        turn: usize,
    ) -> Option<Arc<UpstreamSocket>> {
        let own = lock(&self.connected).get(&upstream).cloned();
        self.pick(own, upstream, turn)
    }

    fn pick(
        &self,
        own: Option<SocketSet>,
        upstream: SocketAddr,
        turn: usize,
    ) -> Option<Arc<UpstreamSocket>> {
        if let Some(sock) = own.and_then(|own| own.get(turn % own.len().max(1)).cloned()) {
            return Some(sock);
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
        fwd: &mut Fwd,
        to: SocketAddr,
        connected: bool,
        replace_at: Instant,
    ) -> io::Result<Arc<UpstreamSocket>> {
        let socket = if connected {
            sys::connected_udp(to)?
        } else {
            sys::unconnected_udp(to)?
        };
        self.open.inc();
        let sock = Arc::new(UpstreamSocket {
            socket,
            connected,
            path: fwd.open_path(),
            replace_at,
            open: self.open.clone(),
        });
        tokio::spawn(crate::udp::receive(self.up.clone(), sock.clone()));
        Ok(sock)
    }

    /// A new set of [`POOL`] sockets (see [`Self::open`]); on failure, the ones already
    /// opened are closed.
    fn open_set(
        &self,
        fwd: &mut Fwd,
        to: SocketAddr,
        connected: bool,
        now: Instant,
    ) -> io::Result<SocketSet> {
        let mut socks = Vec::with_capacity(POOL);
        for k in 0..POOL {
            match self.open(fwd, to, connected, self.first_replacement(now, k)) {
                Ok(sock) => socks.push(sock),
                Err(e) => {
                    for sock in &socks {
                        sys::shut(&sock.socket);
                        fwd.close_path(sock.path);
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
        let k = u32::try_from(k).unwrap_or(u32::MAX).saturating_add(1);
        let pool = u32::try_from(POOL).unwrap_or(u32::MAX);
        now + self.lifetime.saturating_mul(k) / pool
    }

    /// Replaces, in each set, the first socket due (see [`Self::first_replacement`]) with
    /// one on a fresh port, and closes the replaced sockets no query waits on any more.
    pub(crate) fn rotate(&self, fwd: &mut Fwd, now: Instant) {
        self.close_drained(fwd);
        if lock(&self.draining).len() >= MAX_DRAINING {
            return;
        }
        let mut replaced = Vec::new();
        let mut failed = None;
        let mut renew = |fwd: &mut Fwd, set: &mut SocketSet, to: SocketAddr, connected: bool| {
            let Some(k) = set.iter().position(|s| s.replace_at <= now) else {
                return;
            };
            match self.open(fwd, to, connected, now + self.lifetime) {
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
            renew(fwd, set, *upstream, true);
        }
        renew(fwd, &mut lock(&self.v4), V4_ANY, false);
        if !lock(&self.v6).is_empty() {
            renew(fwd, &mut lock(&self.v6), V6_ANY, false);
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
        self.close_drained(fwd);
    }

    /// Closes the replaced sockets no query waits on any more.
    fn close_drained(&self, fwd: &mut Fwd) {
        // Closed once nothing can hand it a query any more (no batch holds it: only this
        // list and its receive task do) and no query waits on it.
        lock(&self.draining).retain(|s| {
            let idle = Arc::strong_count(s) <= 2 && fwd.close_path(s.path);
            if idle {
                sys::shut(&s.socket);
            }
            !idle
        });
    }
}
