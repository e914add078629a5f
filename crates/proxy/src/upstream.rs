//! The upstream side of the proxy: the driver of the sans-IO [`Forwarder`]. It holds the
//! forwarder's transports (the UDP upstream sockets, the idle TCP connections), runs its
//! timer, sends the copies it asks for (retries and hedges, over UDP or TCP), answers the
//! clients it gives up on with SERVFAIL, delivers answers once their new IPs are enforced,
//! and turns its health events into logs and the `upstreams_down` gauge.
//!
//! It must not decide what the forwarder decides: which upstream, when, which answer counts.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dnsfence_dns::forward::{Answered, Event, FailReason, Failed, Forwarder, Transmit, Transport};
use rand::rngs::StdRng;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info, warn};

use crate::flows::{self, Dns, Flow};
use crate::reply::ReplyVia;
use crate::shared::Shared;
use crate::sys;
use crate::tcp::upstream::Idle;
use crate::udp::pool::{Sockets, UpstreamSocket};

/// The forwarder as the proxy runs it.
pub(crate) type Fwd = Forwarder<Client, StdRng>;

/// The shortest sleep of the timer: deadlines falling due within it are handled together.
const MIN_TICK: Duration = Duration::from_millis(10);

/// Who asked, as the forwarder carries it: how the answer gets back.
pub(crate) enum Client {
    /// A UDP client: its reply path.
    Udp(ReplyVia),
    /// A TCP client: its connection.
    Tcp(TcpClient),
}

/// A TCP client's connection, for one of its queries.
pub(crate) struct TcpClient {
    /// The connection's writer takes its answers from here.
    pub(crate) answers: mpsc::Sender<Vec<u8>>,
    /// One of the connection's pipelining slots, held until the query is answered.
    pub(crate) _slot: OwnedSemaphorePermit,
}

impl Client {
    /// Sends `bytes` to the client at `addr`. Failures are logged (a UDP client asks
    /// again); a TCP connection whose writer is busy gets them on a task of its own.
    pub(crate) async fn answer(self, bytes: &[u8], addr: SocketAddr) {
        match self {
            Client::Udp(via) => {
                if let Err(e) = via.send_to(bytes, addr).await {
                    debug!(client = %addr, error = %e, "sending the answer failed");
                }
            }
            Client::Tcp(c) => match c.answers.try_send(bytes.to_vec()) {
                Ok(()) | Err(TrySendError::Closed(_)) => {}
                Err(TrySendError::Full(bytes)) => {
                    tokio::spawn(async move {
                        let _ = c.answers.send(bytes).await;
                    });
                }
            },
        }
    }
}

/// What the forwarder asked for, taken under its lock and acted on after.
#[derive(Default)]
struct Outputs {
    /// Copies to send, with the UDP socket of their path.
    transmits: Vec<(Transmit, Option<Arc<UpstreamSocket>>)>,
    events: Vec<Event<Client>>,
}

impl Outputs {
    fn is_empty(&self) -> bool {
        self.transmits.is_empty() && self.events.is_empty()
    }
}

/// The forwarder's transports and its timer.
pub(crate) struct Upstreams {
    pub(crate) shared: Arc<Shared>,
    /// UDP upstream sockets.
    pub(crate) udp: Sockets,
    /// Idle upstream TCP connections.
    pub(crate) tcp: Idle,
    /// Batches take turns on a server's sockets.
    turn: AtomicUsize,
}

impl Upstreams {
    /// Opens the UDP upstream sockets (fails when no IPv4 one can be opened) and starts the
    /// timer, at `now`.
    pub(crate) fn start(shared: Arc<Shared>, now: Instant) -> io::Result<Arc<Self>> {
        let up = Arc::new_cyclic(|me| Self {
            udp: Sockets::new(
                me.clone(),
                shared.metrics.upstream_sockets.clone(),
                shared.config.upstream_port_lifetime,
            ),
            tcp: Idle::default(),
            shared: shared.clone(),
            turn: AtomicUsize::new(0),
        });
        up.udp
            .start(&mut shared.forwarder(), &shared.config.upstreams, now)?;
        tokio::spawn(timer(up.clone(), now));
        Ok(up)
    }

    /// The next turn (see [`Sockets::socket_for`]).
    pub(crate) fn turn(&self) -> usize {
        self.turn.fetch_add(1, Ordering::Relaxed)
    }

    /// Acts on everything the forwarder asks for, until it asks for nothing more.
    pub(crate) async fn flush(self: &Arc<Self>, now: Instant) {
        loop {
            let out = self.take(&mut self.shared.forwarder(), now);
            if out.is_empty() {
                return;
            }
            self.act(out, now).await;
        }
    }

    /// `path`'s server cannot be reached: its copies are lost.
    pub(crate) async fn unreachable(
        self: &Arc<Self>,
        now: Instant,
        path: dnsfence_dns::forward::PathId,
    ) {
        let snapshot = self.shared.snapshot();
        self.shared
            .forwarder()
            .handle_unreachable(now, &snapshot, path);
        self.flush(now).await;
    }

    /// Learns from `a` and answers its client with `bytes` (the answer under the client's
    /// ID) once the answer's new IPs are enforced; `now`: when it arrived.
    pub(crate) async fn deliver(&self, a: Answered<Client>, bytes: Vec<u8>, now: Instant) {
        let shared = &self.shared;
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
            return;
        };
        let released = match hold {
            Some(confirmation) => shared.hold(confirmation, now).await,
            None => now,
        };
        client.answer(&bytes, addr).await;
        shared.delivered(addr.ip(), received, released);
    }

    /// Takes what the forwarder asks for.
    fn take(&self, fwd: &mut Fwd, now: Instant) -> Outputs {
        let mut out = Outputs::default();
        let turn = self.turn();
        loop {
            let mut picked = None;
            let transmit = fwd.poll_transmit(now, |server| {
                let sock = self.udp.existing_socket_for(server, turn)?;
                let path = sock.path;
                picked = Some(sock);
                Some(path)
            });
            let Some(t) = transmit else {
                break;
            };
            let sock = picked.filter(|s| s.path == t.path);
            out.transmits.push((t, sock));
        }
        while let Some(e) = fwd.poll_event() {
            out.events.push(e);
        }
        out
    }

    /// Acts on `out` (`now`: about the time it was taken).
    async fn act(self: &Arc<Self>, out: Outputs, now: Instant) {
        let shared = &self.shared;
        for e in out.events {
            match e {
                Event::Lost {
                    reason: FailReason::Timeout,
                    ..
                } => {
                    shared.metrics.upstream_timeouts.inc();
                }
                Event::Lost {
                    reason: FailReason::Unreachable,
                    ..
                } => {
                    shared.metrics.upstream_errors.inc();
                }
                // Logged where the send failed.
                Event::Lost {
                    reason: FailReason::SendFailed,
                    ..
                } => {}
                Event::UpstreamDown {
                    upstream,
                    unanswered,
                } => {
                    shared.metrics.upstreams_down.inc();
                    warn!(
                        %upstream,
                        unanswered,
                        "upstream marked down; queries go to the other upstreams until it answers a probe"
                    );
                }
                Event::UpstreamUp { upstream } => {
                    shared.metrics.upstreams_down.dec();
                    info!(%upstream, "upstream answers again; back in use");
                }
                Event::Failed(f) => self.fail(f).await,
            }
        }
        for (t, sock) in out.transmits {
            self.resend(t, sock, now).await;
        }
    }

    /// Sends a copy the forwarder asked for: over UDP on `sock`, over TCP as an exchange
    /// of its own.
    async fn resend(
        self: &Arc<Self>,
        t: Transmit,
        sock: Option<Arc<UpstreamSocket>>,
        now: Instant,
    ) {
        let what = if t.hedge {
            "slow query copied to another upstream"
        } else {
            "query asked of another upstream"
        };
        match (t.transport, sock) {
            (Transport::Udp, Some(sock)) => {
                let to = (!sock.connected).then_some(t.server);
                let errors = sys::send_batch(&sock.socket, &[(&t.contents[..], to)]).await;
                if let Some((_, e)) = errors.first() {
                    debug!(upstream = %t.server, error = %e, "sending upstream failed");
                    let snapshot = self.shared.snapshot();
                    self.shared
                        .forwarder()
                        .handle_send_error(now, &snapshot, t.path, t.id);
                    return;
                }
            }
            (Transport::Udp, None) => return,
            (Transport::Tcp, _) => {
                let up = self.clone();
                tokio::spawn(crate::tcp::upstream::exchange(
                    up, t.path, t.server, t.contents, now,
                ));
            }
        }
        self.shared.metrics.upstream_retries.inc();
        debug!(from = %t.from, to = %t.server, transport = ?t.transport, "{what}");
    }

    /// Answers a client whose every copy failed with SERVFAIL (over UDP, with a flow event
    /// for a timeout or an unreachable upstream).
    async fn fail(&self, f: Failed<Client>) {
        let shared = &self.shared;
        let verdict = match f.reason {
            FailReason::Timeout => "timeout",
            FailReason::Unreachable => "unreachable",
            FailReason::SendFailed => "send failed",
        };
        debug!(upstream = %f.upstream, client = %f.addr, verdict, "upstream failed; answering SERVFAIL");
        if f.transport == Transport::Udp && f.reason != FailReason::SendFailed {
            shared.flows.push(failure_flow(shared, &f, verdict));
        }
        let mut out = [0u8; 512];
        if let Some(n) = f.write_servfail(&mut out) {
            let (addr, client) = (f.addr, f.client);
            client.answer(out.get(..n).unwrap_or_default(), addr).await;
        }
        shared.leave(f.addr.ip());
    }
}

/// The flow event of a query that got SERVFAIL because its upstream failed (`verdict`:
/// `timeout` or `unreachable`).
fn failure_flow(shared: &Shared, f: &Failed<Client>, verdict: &'static str) -> Flow {
    let mut flow = Flow::new("dns", verdict, shared.source(f.addr.ip()));
    let (name, qtype) = flows::question_name(f.question());
    flow.dns = Some(Dns {
        query: name,
        qtypes: qtype.map(flows::qtype_name).into_iter().collect(),
        rcode: Some("SERVFAIL".into()),
        server: Some(f.upstream),
        ..Dns::default()
    });
    flow
}

/// The forwarder's clock: wakes at `start`, then when a deadline or a hedge falls due or
/// the learned mappings are due to expire (at least every tenth of `dns.upstream_timeout`,
/// half the hedge delay, 250 ms; at most every 10 ms). Each time it replaces upstream
/// sockets due for a fresh port, runs the forwarder's timeouts, and publishes the instant
/// as the coarse clock (which wakes the expiry of learned mappings).
async fn timer(up: Arc<Upstreams>, start: Instant) {
    let shared = &up.shared;
    let longest = (shared.config.upstream_timeout / 10)
        .min(shared.config.hedge_after().map_or(Duration::MAX, |s| s / 2))
        .clamp(MIN_TICK, Duration::from_millis(250));
    let (mut last, mut wake) = (start, start);
    loop {
        // The expiry of learned mappings may want an earlier wake-up than planned.
        let expire = shared.clock.expire_due();
        let at = if expire > last {
            wake.min(expire.max(last + MIN_TICK))
        } else {
            wake
        };
        tokio::select! {
            () = tokio::time::sleep_until(at.into()) => {}
            () = shared.clock.rescheduled() => continue,
        }
        let now = Instant::now();
        last = now;
        shared.clock.tick(now);
        {
            let snapshot = shared.snapshot();
            let mut fwd = shared.forwarder();
            up.udp.rotate(&mut fwd, now);
            fwd.handle_timeout(now, &snapshot);
        }
        up.flush(now).await;
        let next = shared.forwarder().poll_timeout();
        wake = next
            .unwrap_or(now + longest)
            .clamp(now + MIN_TICK, now + longest);
    }
}
