//! A network-namespace lab for dnsfence: the topology its tests, benchmarks and
//! `dnsfence demo` run in, built from namespaces it creates and deletes itself. It must
//! not touch the machine's own network namespace (see below).
//!
//! ```text
//!   [pod-a] ─veth─┐                    ┌─veth─ [world]: authoritative DNS, TCP and UDP
//!   [pod-b] ─veth─┤  [node]: routes,    ┤        servers on every address of 192.0.2.0/24,
//!   [pod-c] ─veth─┘  dnsfence runs here └        198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32
//! ```
//!
//! - [`Lab::builder`] creates the namespaces (names unique per process and lab, so labs run
//!   in parallel), links, addresses and routes, starts the world's services and returns once
//!   every pod reaches them; dropping the [`Lab`] removes everything, also on panic.
//! - The world's DNS ([`dns::Authority`], hickory-server) answers at [`DNS_V4`] and
//!   [`DNS_V6`] over UDP and TCP with the records given ([`Rec`]), NXDOMAIN for other names.
//!   Its TCP servers greet with `hello from <addr>:<port>` then echo; its UDP servers echo
//!   from the address the datagram was sent to.
//! - A pod (or any [`Netns`]) resolves, connects and exchanges datagrams from sockets created
//!   inside its namespace ([`Netns::resolve`], [`Netns::connect_tcp`],
//!   [`Netns::udp_exchange`], [`Netns::reach_tcp`]); failures say refused, unreachable or
//!   timed out, which is what a firewall test asserts.
//! - A test that needs one or two namespaces of its own rather than a lab takes
//!   [`Netns::scratch`] (deleted on drop) and links them with [`Netns::veth`].
//! - [`preflight`]: whether a test that needs root or a tool runs here, or says why it
//!   skips (and fails in CI).
//!
//! It must not touch the machine's own namespace: no address, route, link or sysctl
//! outside the lab's namespaces (only `ip netns add/del` act on `/run/netns`). It needs
//! root (`CAP_SYS_ADMIN`, `CAP_NET_ADMIN`) and `ip` from iproute2.

mod client;
pub mod daemon;
pub mod dns;
mod error;
mod lab;
pub mod load;
mod netns;
pub mod preflight;
mod query;
mod servers;
mod topology;

pub use client::{
    DnsStatus, Outcome, Reach, RecordType, Resolution, TcpConn, Transport, DNS_TIMEOUT,
    REACH_TIMEOUT,
};
pub use dns::Rec;
pub use error::{ConnectError, LabError};
pub use lab::{Lab, LabBuilder, Pod, DNS_V4, DNS_V6};
pub use load::{Load, LoadReport, LoadSpec};
pub use netns::{in_netns, Netns, ScratchNetns};
pub use servers::greeting;
pub use topology::{MAX_PODS, NODE_WORLD_INTERFACE, WORLD_PREFIXES};
