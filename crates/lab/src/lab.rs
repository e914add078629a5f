//! [`Lab`]: the namespaces, links and world services built by [`LabBuilder`], removed on drop.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::client::{Reach, RecordType, Resolution, TcpConn, Transport};
use crate::dns::{Authority, Rec};
use crate::netns::{ip_binary, run, Cleanup};
use crate::servers::{bind_udp_echo, Servers};
use crate::topology::{self, MAX_PODS};
use crate::{ConnectError, LabError, Netns};

/// The world's DNS server over IPv4 (UDP and TCP).
pub const DNS_V4: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53)), 53);

/// The world's DNS server over IPv6 (UDP and TCP).
pub const DNS_V6: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x53)),
    53,
);

/// How long [`LabBuilder::build`] waits for every pod to reach the world's DNS server.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// What to build; see [`Lab::builder`].
#[derive(Debug, Clone)]
pub struct LabBuilder {
    pods: usize,
    records: Vec<Rec>,
    tcp_ports: Vec<u16>,
    udp_ports: Vec<u16>,
    resolver: SocketAddr,
}

impl Default for LabBuilder {
    fn default() -> Self {
        Self {
            pods: 2,
            records: Vec::new(),
            tcp_ports: vec![80, 443, 8080],
            udp_ports: vec![9000, 9001],
            resolver: DNS_V4,
        }
    }
}

impl LabBuilder {
    /// How many pods (default 2, at most [`MAX_PODS`]).
    pub fn pods(mut self, pods: usize) -> Self {
        self.pods = pods;
        self
    }

    /// The records the world's DNS serves (default none: every name is NXDOMAIN).
    pub fn records(mut self, records: impl IntoIterator<Item = Rec>) -> Self {
        self.records = records.into_iter().collect();
        self
    }

    /// The ports of the world's TCP servers (default 80, 443, 8080), on every address.
    pub fn tcp_ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.tcp_ports = ports.into_iter().collect();
        self
    }

    /// The ports of the world's UDP echo servers (default 9000, 9001), on every address.
    pub fn udp_ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.udp_ports = ports.into_iter().collect();
        self
    }

    /// The server [`Pod::resolve`] asks (default [`DNS_V4`]), e.g. a proxy on the node.
    pub fn resolver(mut self, resolver: SocketAddr) -> Self {
        self.resolver = resolver;
        self
    }

    /// Creates the namespaces, links and services; returns once every pod reaches the
    /// world's DNS server over IPv4 and IPv6. On error, whatever was created is removed.
    pub fn build(self) -> Result<Lab, LabError> {
        self.validate()?;
        let ip = ip_binary()?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "dfl{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let node = Netns::new(format!("{id}-node"));
        let world = Netns::new(format!("{id}-world"));
        let pods: Vec<Netns> = (0..self.pods)
            .map(|i| Netns::new(format!("{id}-p{i}")))
            .collect();
        let all: Vec<&Netns> = [&node, &world].into_iter().chain(&pods).collect();

        let mut cleanup = Cleanup::default();
        for ns in &all {
            cleanup.add(ns.name().to_owned());
        }
        let script: String = all
            .iter()
            .map(|ns| format!("netns add {}\n", ns.name()))
            .collect();
        let mut add = std::process::Command::new(ip);
        add.args(["-batch", "-"]);
        run(add, Some(&script))?;

        for ns in &all {
            ns.sysctls(&topology::COMMON_SYSCTLS)?;
        }
        node.sysctls(&topology::NODE_SYSCTLS)?;
        world.sysctls(&topology::WORLD_SYSCTLS)?;

        let pod_names: Vec<String> = pods.iter().map(|p| p.name().to_owned()).collect();
        node.ip_batch(&topology::node_script(&pod_names, world.name()))?;
        std::thread::scope(|scope| {
            let world_done = scope.spawn(|| world.ip_batch(&topology::world_script()));
            let pods_done: Vec<_> = pods
                .iter()
                .enumerate()
                .map(|(i, pod)| scope.spawn(move || pod.ip_batch(&topology::pod_script(i))))
                .collect();
            for done in std::iter::once(world_done).chain(pods_done) {
                done.join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
            }
            Ok::<_, LabError>(())
        })?;

        let (dns, servers) = self.start_services(&world)?;
        let pods: Vec<Pod> = pods
            .into_iter()
            .enumerate()
            .map(|(index, netns)| Pod::new(index, netns, self.resolver))
            .collect();
        for pod in &pods {
            wait_ready(pod.netns(), DNS_V4)?;
            wait_ready(pod.netns(), DNS_V6)?;
        }
        Ok(Lab {
            dns,
            _servers: servers,
            pods,
            node,
            world,
            _cleanup: cleanup,
        })
    }

    fn validate(&self) -> Result<(), LabError> {
        if self.pods == 0 || self.pods > MAX_PODS {
            return Err(LabError::Invalid("a lab has 1 to 250 pods"));
        }
        let ports = self.tcp_ports.iter().chain(&self.udp_ports);
        if ports.clone().any(|&p| p == 0 || p == 53) {
            return Err(LabError::Invalid("server ports must not be 0 or 53 (DNS)"));
        }
        Ok(())
    }

    /// Binds every world socket inside the world, then serves them from plain threads.
    fn start_services(&self, world: &Netns) -> Result<(Authority, Servers), LabError> {
        let socket_error = |what, addr| move |source| LabError::Socket { what, addr, source };
        let sockets = world.run(|| {
            let mut dns_udp = Vec::new();
            let mut dns_tcp = Vec::new();
            for addr in [DNS_V4, DNS_V6] {
                dns_udp.push(UdpSocket::bind(addr).map_err(socket_error("DNS over UDP", addr))?);
                dns_tcp.push(TcpListener::bind(addr).map_err(socket_error("DNS over TCP", addr))?);
            }
            let mut tcp = Vec::new();
            for &port in &self.tcp_ports {
                // `[::]` is dual-stack: IPv4 clients arrive as v4-mapped addresses.
                let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
                tcp.push(TcpListener::bind(addr).map_err(socket_error("a TCP server", addr))?);
            }
            let mut udp = Vec::new();
            for &port in &self.udp_ports {
                for ip in [Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()] {
                    let addr = SocketAddr::new(ip, port);
                    udp.push(bind_udp_echo(addr).map_err(socket_error("a UDP echo server", addr))?);
                }
            }
            Ok::<_, LabError>((dns_udp, dns_tcp, tcp, udp))
        })??;
        let (dns_udp, dns_tcp, tcp, udp) = sockets;
        let dns = Authority::serve(".", &self.records, dns_udp, dns_tcp)?;
        let servers = Servers::serve(tcp, udp)?;
        Ok((dns, servers))
    }
}

/// Polls `server` from `netns` until it answers (links come up asynchronously).
fn wait_ready(netns: &Netns, server: SocketAddr) -> Result<(), LabError> {
    let start = Instant::now();
    loop {
        let probe = netns.resolve_with(
            server,
            "lab-ready.invalid",
            RecordType::A,
            Transport::Udp,
            Duration::from_millis(50),
        )?;
        if probe.status != crate::DnsStatus::TimedOut
            && probe.status != crate::DnsStatus::Unreachable
        {
            return Ok(());
        }
        if start.elapsed() > READY_TIMEOUT {
            return Err(LabError::NotReady {
                pod: netns.name().to_owned(),
                server,
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A built lab. Dropping it stops the world's services and deletes every namespace (and
/// with them every link and route), also when a test panics.
#[derive(Debug)]
pub struct Lab {
    // Fields drop in this order: services first, namespaces last.
    dns: Authority,
    _servers: Servers,
    pods: Vec<Pod>,
    node: Netns,
    world: Netns,
    _cleanup: Cleanup,
}

impl Lab {
    /// A builder with 2 pods, no records, TCP servers on 80, 443 and 8080 and UDP echo
    /// servers on 9000 and 9001.
    pub fn builder() -> LabBuilder {
        LabBuilder::default()
    }

    /// Pod `index`.
    ///
    /// # Panics
    ///
    /// When there is no such pod.
    pub fn pod(&self, index: usize) -> &Pod {
        &self.pods[index]
    }

    /// Every pod.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The node, which routes between the pods and the world; dnsfence runs here.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The world: DNS and application servers on every documentation address.
    pub fn world(&self) -> &Netns {
        &self.world
    }

    /// The world's DNS server, whose records can be replaced while the lab runs.
    pub fn dns(&self) -> &Authority {
        &self.dns
    }

    /// The world's DNS server over IPv4.
    pub fn dns_server_v4(&self) -> SocketAddr {
        DNS_V4
    }

    /// The world's DNS server over IPv6.
    pub fn dns_server_v6(&self) -> SocketAddr {
        DNS_V6
    }

    /// The names of every namespace of the lab (node, world, pods).
    pub fn netns_names(&self) -> Vec<&str> {
        [&self.node, &self.world]
            .into_iter()
            .chain(self.pods.iter().map(Pod::netns))
            .map(Netns::name)
            .collect()
    }
}

/// A pod: a namespace with one link to the node, an IPv4 and an IPv6 address.
#[derive(Debug)]
pub struct Pod {
    index: usize,
    netns: Netns,
    resolver: SocketAddr,
}

impl Pod {
    fn new(index: usize, netns: Netns, resolver: SocketAddr) -> Self {
        Self {
            index,
            netns,
            resolver,
        }
    }

    /// Its namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Its namespace's name.
    pub fn name(&self) -> &str {
        self.netns.name()
    }

    /// A command to run inside the pod (see [`Netns::command`]).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        self.netns.command(program)
    }

    /// Runs `f` on a thread inside the pod (see [`Netns::run`]).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
        self.netns.run(f)
    }

    /// A short label for tables: `pod-a`, `pod-b`, ... (`pod-26` and up past `z`).
    pub fn label(&self) -> String {
        match u8::try_from(self.index) {
            Ok(i) if i < 26 => format!("pod-{}", char::from(b'a' + i)),
            _ => format!("pod-{}", self.index),
        }
    }

    /// Its index in the lab.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Its IPv4 address (`10.200.<index>.2`).
    pub fn ipv4(&self) -> Ipv4Addr {
        topology::pod_addresses(self.index).0 .0
    }

    /// Its IPv6 address (`fd00:200:<index>::2`).
    pub fn ipv6(&self) -> Ipv6Addr {
        topology::pod_addresses(self.index).1 .0
    }

    /// The node's IPv4 address on this pod's link (the pod's default gateway).
    pub fn gateway_v4(&self) -> Ipv4Addr {
        topology::pod_addresses(self.index).0 .1
    }

    /// The node's IPv6 address on this pod's link (the pod's default gateway).
    pub fn gateway_v6(&self) -> Ipv6Addr {
        topology::pod_addresses(self.index).1 .1
    }

    /// The node's interface towards this pod (`pod<index>`).
    pub fn node_interface(&self) -> String {
        topology::pod_interface(self.index)
    }

    /// The server [`Pod::resolve`] asks.
    pub fn resolver(&self) -> SocketAddr {
        self.resolver
    }

    /// Asks the pod's resolver for `name`/`qtype` (see [`Netns::resolve`]).
    pub fn resolve(
        &self,
        name: &str,
        qtype: RecordType,
        transport: Transport,
    ) -> Result<Resolution, LabError> {
        self.netns.resolve(self.resolver, name, qtype, transport)
    }

    /// Connects and reads the greeting (see [`Netns::connect_tcp`]).
    pub fn connect_tcp(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<TcpConn, ConnectError> {
        self.netns.connect_tcp(addr, timeout)
    }

    /// Connects, reads the greeting and tells how it went (see [`Netns::reach_tcp`]).
    pub fn reach_tcp(&self, addr: SocketAddr) -> Reach {
        self.netns.reach_tcp(addr)
    }

    /// Sends a datagram and waits for the echo (see [`Netns::udp_exchange`]).
    pub fn udp_exchange(
        &self,
        addr: SocketAddr,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, ConnectError> {
        self.netns.udp_exchange(addr, payload, timeout)
    }
}
