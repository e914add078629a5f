//! A socket's thread ([`Worker`]): sends the queries due on schedule and the retries,
//! reads answers until the next send or deadline, and hands both to its [`super::core::Core`].
//!
//! The only part of the load that reads the clock and uses the socket.

use std::io;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::core::{Core, Flight, Outcome};
use super::stats::Stats;
use super::{lock, ABANDON, RUN};

/// How often an idle worker looks whether it was stopped.
const STOP_POLL: Duration = Duration::from_millis(20);

/// How many due queries a worker sends before reading answers again.
const MAX_BURST: u64 = 64;

/// A socket's thread: sends on schedule, reads answers, expires deadlines.
pub(super) struct Worker {
    pub(super) index: u64,
    pub(super) socket: UdpSocket,
    pub(super) core: Core,
    pub(super) mode: Arc<AtomicU8>,
    pub(super) stats: Arc<Mutex<Stats>>,
}

impl Worker {
    pub(super) fn run(mut self) {
        let plan = Arc::clone(&self.core.plan);
        let mut query = Vec::with_capacity(512);
        let mut buf = vec![0; 65_535];
        // This worker sends queries index, index + sockets, index + 2 * sockets, ...
        let mut next = self.index;
        loop {
            let mode = self.mode.load(Ordering::Relaxed);
            if mode == ABANDON {
                return;
            }
            let now = Instant::now();
            {
                let stats = &mut *lock(&self.stats);
                self.core.expire(now, stats);
                while let Some(flight) = self.core.retries.pop() {
                    if self.core.launch(now, flight, &mut query) {
                        stats.retried += 1;
                        self.send(&query, stats);
                    } else {
                        // Every ID in flight: the try cannot even be sent.
                        stats.finish(now, &plan, flight, Outcome::TimedOut);
                    }
                }
                if mode == RUN {
                    let names = plan.names.len() as u64;
                    for _ in 0..MAX_BURST {
                        if plan.due(next) > now {
                            break;
                        }
                        let flight = Flight {
                            name: (next % names) as usize,
                            first_sent: now,
                            tries: 1,
                            seq: 0,
                        };
                        if self.core.launch(now, flight, &mut query) {
                            stats.sent += 1;
                            self.send(&query, stats);
                        }
                        next += plan.sockets;
                    }
                } else if self.core.is_idle() {
                    return;
                }
            }
            let mut wake = now + STOP_POLL;
            if mode == RUN {
                wake = wake.min(plan.due(next));
            }
            if let Some(deadline) = self.core.next_deadline() {
                wake = wake.min(deadline);
            }
            self.receive(wake, &mut buf);
        }
    }

    /// Sends `query`, once more if the socket first reports an error for an earlier
    /// datagram; a try whose send fails is left to time out.
    fn send(&self, query: &[u8], stats: &mut Stats) {
        for _ in 0..2 {
            match self.socket.send(query) {
                Ok(_) => return,
                Err(_) => stats.socket_errors += 1,
            }
        }
    }

    /// Waits for one datagram until `wake` at most, and takes it.
    fn receive(&mut self, wake: Instant, buf: &mut [u8]) {
        // A zero read timeout means forever; the smallest one the kernel takes is 1 µs.
        let wait = wake
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(1));
        let received = self
            .socket
            .set_read_timeout(Some(wait))
            .and_then(|()| self.socket.recv(buf));
        match received {
            Ok(len) => {
                let now = Instant::now();
                let message = buf.get(..len).unwrap_or_default();
                self.core.answer(now, message, &mut lock(&self.stats));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => lock(&self.stats).socket_errors += 1,
        }
    }
}
