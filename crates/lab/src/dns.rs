//! An authoritative DNS server built on hickory-server, serving records a test describes:
//! CNAME chains, many-IP names, AAAA, chosen TTLs; names it does not know get NXDOMAIN.
//! It runs on its own thread and runtime, on sockets bound beforehand (so they may belong
//! to any network namespace), can have its records replaced while it runs, and stops when
//! dropped.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordSet, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use hickory_server::Server;

use crate::LabError;

/// One record of a served zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rec {
    /// An address: owner, TTL, address (A or AAAA by family).
    Addr(&'static str, u32, IpAddr),
    /// A CNAME: owner, TTL, target.
    Cname(&'static str, u32, &'static str),
}

type Records = BTreeMap<RrKey, Arc<RecordSet>>;

/// A running authoritative server.
pub struct Authority {
    /// Where it listens: the first UDP socket's address (TCP listeners may share it).
    pub addr: SocketAddr,
    origin: Name,
    zone: Arc<InMemoryZoneHandler>,
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// `s` as a fully qualified name.
pub(crate) fn name(s: &str) -> Result<Name, LabError> {
    let fqdn = format!("{}.", s.trim_end_matches('.'));
    Name::from_str(&fqdn).map_err(|source| LabError::InvalidName {
        name: s.to_owned(),
        source,
    })
}

/// The zone `origin` holding an SOA and `records`, as hickory stores it.
fn zone_records(origin: &Name, records: &[Rec]) -> Result<Records, LabError> {
    let mut zone: InMemoryZoneHandler =
        InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let admin = |label: &str| {
        Name::from_str(label)
            .and_then(|l| l.append_domain(origin))
            .map_err(|source| LabError::InvalidName {
                name: label.to_owned(),
                source,
            })
    };
    let soa = SOA::new(admin("ns")?, admin("admin")?, 1, 3600, 600, 86_400, 1);
    zone.upsert_mut(Record::from_rdata(origin.clone(), 3600, RData::SOA(soa)), 1);
    for r in records {
        let record = match *r {
            Rec::Addr(owner, ttl, IpAddr::V4(ip)) => {
                Record::from_rdata(name(owner)?, ttl, RData::A(A(ip)))
            }
            Rec::Addr(owner, ttl, IpAddr::V6(ip)) => {
                Record::from_rdata(name(owner)?, ttl, RData::AAAA(AAAA(ip)))
            }
            Rec::Cname(owner, ttl, target) => {
                Record::from_rdata(name(owner)?, ttl, RData::CNAME(CNAME(name(target)?)))
            }
        };
        zone.upsert_mut(record, 1);
    }
    Ok(std::mem::take(zone.records_get_mut()))
}

impl Authority {
    /// Serves `origin` with `records` on 127.0.0.1 (a free port, UDP and TCP).
    ///
    /// # Panics
    ///
    /// When the server cannot start; for tests. [`Authority::serve`] returns errors.
    pub fn start(origin: &str, records: &[Rec]) -> Self {
        let (udp, tcp) = loopback_sockets().expect("bind a free loopback port");
        Self::serve(origin, records, vec![udp], vec![tcp]).expect("start the authority")
    }

    /// Serves `origin` (`"."` for every name) with `records` on sockets bound beforehand.
    pub fn serve(
        origin: &str,
        records: &[Rec],
        udp: Vec<UdpSocket>,
        tcp: Vec<TcpListener>,
    ) -> Result<Self, LabError> {
        let origin = if origin.trim_end_matches('.').is_empty() {
            Name::root()
        } else {
            name(origin)?
        };
        let mut zone: InMemoryZoneHandler =
            InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        *zone.records_get_mut() = zone_records(&origin, records)?;
        let zone = Arc::new(zone);
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::from(origin.clone()), vec![zone.clone()]);

        let service_error = |source| LabError::Service {
            what: "DNS",
            source,
        };
        let addr = udp
            .first()
            .map(UdpSocket::local_addr)
            .or_else(|| tcp.first().map(TcpListener::local_addr))
            .ok_or(LabError::Invalid("a DNS server needs a socket"))?
            .map_err(service_error)?;
        for s in &udp {
            s.set_nonblocking(true).map_err(service_error)?;
            // A queue of a production server's size (4 MiB): under a test's flood the lab
            // measures the proxy, not this server's default queue of ~300 datagrams. Only
            // root may go past `rmem_max`; the default stands otherwise.
            let _ = nix::sys::socket::setsockopt(
                s,
                nix::sys::socket::sockopt::RcvBufForce,
                &(4usize << 20),
            );
        }
        for s in &tcp {
            s.set_nonblocking(true).map_err(service_error)?;
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("lab-dns".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                runtime.block_on(async move {
                    let mut server = Server::new(catalog);
                    for s in udp {
                        match tokio::net::UdpSocket::from_std(s) {
                            Ok(s) => server.register_socket(s),
                            Err(e) => return drop(ready_tx.send(Err(e))),
                        }
                    }
                    for l in tcp {
                        match tokio::net::TcpListener::from_std(l) {
                            Ok(l) => server.register_listener(l, Duration::from_secs(5), 65_535),
                            Err(e) => return drop(ready_tx.send(Err(e))),
                        }
                    }
                    let _ = ready_tx.send(Ok(tokio::runtime::Handle::current()));
                    let _ = stopped.await;
                    let _ = server.shutdown_gracefully().await;
                });
            })
            .map_err(service_error)?;
        let runtime = ready_rx
            .recv()
            .map_err(|_| service_error(std::io::ErrorKind::BrokenPipe.into()))?
            .map_err(service_error)?;
        Ok(Self {
            addr,
            origin,
            zone,
            runtime,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Replaces every record (but the SOA) with `records`, at once: a query sees either the
    /// old set or the new one.
    pub fn set_records(&self, records: &[Rec]) -> Result<(), LabError> {
        let new = zone_records(&self.origin, records)?;
        let zone = self.zone.clone();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            *zone.records_mut().await = new;
            let _ = done_tx.send(());
        });
        done_rx.recv().map_err(|_| LabError::Service {
            what: "DNS",
            source: std::io::ErrorKind::BrokenPipe.into(),
        })
    }
}

/// A UDP socket and a TCP listener on the same free port of 127.0.0.1.
fn loopback_sockets() -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        match TcpListener::bind(udp.local_addr()?) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()))
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("addr", &self.addr)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Drop for Authority {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
