//! Refused packets, as the kernel reports them: the datapath's log rules send a rate-limited
//! sample of every refusal to an NFLOG group; this reader turns each into a log line and a
//! counter naming the reason and the endpoint.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing::{error, info, warn};

use crate::ruleset::DropReason;
use crate::sys::nflog::{LoggedPacket, NflogSocket};

/// Endpoint names by address, for naming who was refused.
pub type EndpointNames = Arc<RwLock<HashMap<IpAddr, String>>>;

/// The `reason` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    /// One of [`DropReason::as_str`], or `other`.
    pub reason: &'static str,
}

/// Metrics of refused packets.
#[derive(Debug, Clone, Default)]
pub struct DropMetrics {
    /// Refused packets the kernel logged, by reason (rate limited per rule, so a lower
    /// bound under floods; the table's counters have the exact totals).
    pub logged: Family<ReasonLabel, Counter>,
    /// Times the kernel had more to report than the reader could take.
    pub overruns: Counter,
}

impl DropMetrics {
    /// Registers under `datapath_` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("datapath");
        r.register(
            "refused_packets",
            "Refused packets of enforced endpoints logged by the kernel, by reason",
            self.logged.clone(),
        );
        r.register(
            "refusal_log_overruns",
            "Times refused-packet logs were lost because the reader fell behind",
            self.overruns.clone(),
        );
    }
}

/// A refused packet, described for a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub reason: Option<DropReason>,
    /// The endpoint's name, when its address is in the inventory.
    pub endpoint: Option<String>,
    /// The packet.
    pub packet: LoggedPacket,
}

/// Names a logged packet.
pub fn describe(packet: LoggedPacket, names: &HashMap<IpAddr, String>) -> Refusal {
    Refusal {
        reason: DropReason::from_prefix(&packet.prefix),
        endpoint: names.get(&packet.src).cloned(),
        packet,
    }
}

/// The name of an IP protocol number.
pub fn protocol_name(p: u8) -> &'static str {
    match p {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        58 => "icmpv6",
        132 => "sctp",
        _ => "other",
    }
}

/// The thread reading refused packets; dropping it stops the thread (within a second)
/// and waits for it, so what its callback holds (the flow log, say) is released.
#[derive(Debug)]
pub struct Reader {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How often a group another process holds (the previous agent, during a rolling
/// update) is asked for again.
const REBIND_EVERY: Duration = Duration::from_secs(2);

/// Reads NFLOG `group` on a thread of its own (in the caller's network namespace) until
/// the returned [`Reader`] is dropped. While the group cannot be bound (another process
/// holds it), or after reading fails, the thread binds it again every 2 s.
pub fn spawn_reader(
    group: u16,
    names: EndpointNames,
    metrics: DropMetrics,
    on_refusal: Box<dyn Fn(&Refusal) + Send>,
) -> std::io::Result<Reader> {
    let mut socket = match NflogSocket::open(group) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(group, error = %e, "cannot read refused packets yet: they are refused but not logged; trying again every 2 s");
            None
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = std::thread::Builder::new()
        .name("dnsfence-drops".into())
        .spawn(move || {
            let mut overruns = 0;
            while !stopping.load(Ordering::Relaxed) {
                let Some(sock) = socket.as_mut() else {
                    let mut waited = Duration::ZERO;
                    while waited < REBIND_EVERY && !stopping.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                        waited += Duration::from_millis(100);
                    }
                    if let Ok(s) = NflogSocket::open(group) {
                        info!(group, "reading refused packets");
                        overruns = 0;
                        socket = Some(s);
                    }
                    continue;
                };
                let packets = match sock.recv(Some(Duration::from_secs(1))) {
                    Ok(p) => p,
                    Err(e) => {
                        error!(error = %e, "reading refused packets failed; binding the group again");
                        socket = None;
                        continue;
                    }
                };
                let now = sock.overruns();
                if now > overruns {
                    metrics.overruns.inc_by(now - overruns);
                    overruns = now;
                }
                let names = names.read().unwrap_or_else(PoisonError::into_inner);
                for packet in packets {
                    let r = describe(packet, &names);
                    let reason = r.reason.map_or("other", DropReason::as_str);
                    metrics.logged.get_or_create(&ReasonLabel { reason }).inc();
                    warn!(
                        target: "dnsfence::drop",
                        reason,
                        endpoint = r.endpoint.as_deref().unwrap_or("-"),
                        src = %r.packet.src,
                        dst = %r.packet.dst,
                        protocol = protocol_name(r.packet.protocol),
                        dport = r.packet.dst_port.unwrap_or(0),
                        icmp_type = r.packet.icmp_type.map_or(-1, i16::from),
                        "{}",
                        if r.reason.is_some_and(DropReason::is_audit) {
                            "packet would be refused (audit mode: let through)"
                        } else {
                            "packet refused"
                        }
                    );
                    on_refusal(&r);
                }
            }
        })?;
    Ok(Reader {
        stop,
        thread: Some(thread),
    })
}
