//! An authoritative DNS server built on hickory-server, serving zones the test describes:
//! CNAME chains, many-IP names, AAAA, short TTLs. It runs on its own thread and runtime
//! and stops when dropped.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use hickory_server::Server;

/// One record of a test zone.
#[derive(Debug, Clone)]
pub enum Rec {
    /// An address (A or AAAA by family).
    Addr(&'static str, u32, IpAddr),
    /// A CNAME: owner, TTL, target.
    Cname(&'static str, u32, &'static str),
}

/// A running authoritative server.
pub struct Authority {
    /// Where it listens, UDP and TCP.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn name(s: &str) -> Name {
    Name::from_str(&format!("{}.", s.trim_end_matches('.'))).unwrap()
}

impl Authority {
    /// Serves `origin` with `records` on 127.0.0.1 (a free port, UDP and TCP).
    pub fn start(origin: &str, records: &[Rec]) -> Self {
        let origin_name = name(origin);
        let mut zone: InMemoryZoneHandler =
            InMemoryZoneHandler::empty(origin_name.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            name(&format!("ns.{origin}")),
            name(&format!("admin.{origin}")),
            1,
            3600,
            600,
            86_400,
            1,
        );
        zone.upsert_mut(
            Record::from_rdata(origin_name.clone(), 3600, RData::SOA(soa)),
            1,
        );
        for r in records {
            let record = match r {
                Rec::Addr(owner, ttl, IpAddr::V4(ip)) => {
                    Record::from_rdata(name(owner), *ttl, RData::A(A(*ip)))
                }
                Rec::Addr(owner, ttl, IpAddr::V6(ip)) => {
                    Record::from_rdata(name(owner), *ttl, RData::AAAA(AAAA(*ip)))
                }
                Rec::Cname(owner, ttl, target) => {
                    Record::from_rdata(name(owner), *ttl, RData::CNAME(CNAME(name(target))))
                }
            };
            zone.upsert_mut(record, 1);
        }
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::from(origin_name), vec![Arc::new(zone)]);

        let port = crate::free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut server = Server::new(catalog);
                server.register_socket(tokio::net::UdpSocket::bind(addr).await.unwrap());
                server.register_listener(
                    tokio::net::TcpListener::bind(addr).await.unwrap(),
                    Duration::from_secs(5),
                    65_535,
                );
                ready_tx.send(()).unwrap();
                let _ = stopped.await;
                let _ = server.shutdown_gracefully().await;
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("authority started");
        Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
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
