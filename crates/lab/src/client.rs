//! What a pod does on the network, from the test process: DNS queries, TCP connections and
//! UDP exchanges, each from a socket created inside the pod's namespace.
//!
//! Failures are classified the way firewall tests need them: refused (RST, ICMP port
//! unreachable), unreachable (other ICMP errors) or timed out (dropped).

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

pub use hickory_server::proto::rr::RecordType;

use crate::{ConnectError, Netns};

/// How a query travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// One UDP datagram each way.
    Udp,
    /// A TCP connection, the message prefixed with its length.
    Tcp,
}

/// How a query ended: the answer's RCODE, or why there was none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DnsStatus {
    /// NOERROR.
    NoError,
    /// FORMERR.
    FormErr,
    /// SERVFAIL.
    ServFail,
    /// NXDOMAIN.
    NxDomain,
    /// NOTIMP.
    NotImp,
    /// REFUSED.
    Refused,
    /// Another RCODE.
    Other(u16),
    /// No answer within the timeout.
    TimedOut,
    /// The server's port refused (RST or ICMP port unreachable).
    ConnectionRefused,
    /// An ICMP error (host unreachable, administratively prohibited, ...).
    Unreachable,
}

impl fmt::Display for DnsStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::NoError => "NOERROR",
            Self::FormErr => "FORMERR",
            Self::ServFail => "SERVFAIL",
            Self::NxDomain => "NXDOMAIN",
            Self::NotImp => "NOTIMP",
            Self::Refused => "REFUSED",
            Self::Other(code) => return write!(f, "RCODE{code}"),
            Self::TimedOut => "timeout",
            Self::ConnectionRefused => "connection refused",
            Self::Unreachable => "unreachable",
        };
        f.write_str(s)
    }
}

/// The outcome of one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The RCODE, or why there was no answer.
    pub status: DnsStatus,
    /// The addresses (A and AAAA data) of the answer section, in order.
    pub ips: Vec<IpAddr>,
    /// The targets of CNAMEs in the answer section, in order.
    pub cnames: Vec<String>,
    /// The smallest TTL in the answer section.
    pub min_ttl: Option<u32>,
    /// Whether the answer had TC set.
    pub truncated: bool,
    /// From sending the query to the answer (or giving up).
    pub elapsed: Duration,
}

/// How long [`Netns::resolve`] waits for an answer.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`Netns::reach_tcp`] waits for a connection and its greeting.
pub const REACH_TIMEOUT: Duration = Duration::from_secs(2);

/// An established TCP connection to a lab server, after its greeting.
#[derive(Debug)]
pub struct TcpConn {
    stream: TcpStream,
    greeting: String,
}

impl TcpConn {
    /// The server's first line (without the newline), e.g. `hello from 192.0.2.10:80`.
    pub fn greeting(&self) -> &str {
        &self.greeting
    }

    /// Sends `data` and reads as many bytes back (the lab's servers echo), waiting at most
    /// the timeout given to [`Netns::connect_tcp`]. A connection a firewall now drops times
    /// out; one it resets is [`ConnectError::Io`] with `ConnectionReset`.
    pub fn exchange(&mut self, data: &[u8]) -> Result<Vec<u8>, ConnectError> {
        let timeout = self.timeout();
        let classify = |e| ConnectError::classify(e, timeout);
        self.stream.write_all(data).map_err(classify)?;
        let mut back = vec![0; data.len()];
        self.stream.read_exact(&mut back).map_err(classify)?;
        Ok(back)
    }

    /// Changes how long [`TcpConn::exchange`] waits (initially the connect timeout).
    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))
    }

    /// The underlying stream (blocking, with the read timeout of the connect call).
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    fn timeout(&self) -> Duration {
        self.stream
            .read_timeout()
            .ok()
            .flatten()
            .unwrap_or(REACH_TIMEOUT)
    }
}

/// What [`Netns::reach_tcp`] found, for a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Connected and greeted.
    Connected,
    /// RST or ICMP port unreachable.
    Refused,
    /// Another ICMP error.
    Unreachable,
    /// No answer.
    TimedOut,
    /// Something else went wrong (see [`Netns::connect_tcp`] for details).
    Failed,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connected => "connected",
            Self::Refused => "refused",
            Self::Unreachable => "unreachable",
            Self::TimedOut => "timed out",
            Self::Failed => "failed",
        })
    }
}

/// An [`Outcome`] and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// What happened.
    pub outcome: Outcome,
    /// How long it took.
    pub elapsed: Duration,
}

impl fmt::Display for Reach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} ms)", self.outcome, self.elapsed.as_millis())
    }
}

impl Netns {
    /// Asks `server` for `name`/`qtype` over `transport` from this namespace, waiting at
    /// most [`DNS_TIMEOUT`]. Only setup failures are errors; no answer is a [`DnsStatus`].
    pub fn resolve(
        &self,
        server: SocketAddr,
        name: &str,
        qtype: RecordType,
        transport: Transport,
    ) -> Result<Resolution, crate::LabError> {
        self.resolve_with(server, name, qtype, transport, DNS_TIMEOUT)
    }

    /// [`Netns::resolve`] with a chosen timeout.
    pub fn resolve_with(
        &self,
        server: SocketAddr,
        name: &str,
        qtype: RecordType,
        transport: Transport,
        timeout: Duration,
    ) -> Result<Resolution, crate::LabError> {
        let query = crate::query::encode(name, qtype)?;
        let id = crate::query::id(&query);
        let start = Instant::now();
        let answer = self.run(|| match transport {
            Transport::Udp => ask_udp(server, &query, id, timeout),
            Transport::Tcp => ask_tcp(server, &query, timeout),
        })?;
        let elapsed = start.elapsed();
        match answer {
            Ok(bytes) => crate::query::decode(&bytes, elapsed),
            Err(e) => Ok(Resolution {
                status: match ConnectError::classify(e, timeout) {
                    ConnectError::Refused => DnsStatus::ConnectionRefused,
                    ConnectError::Unreachable(_) => DnsStatus::Unreachable,
                    _ => DnsStatus::TimedOut,
                },
                ips: Vec::new(),
                cnames: Vec::new(),
                min_ttl: None,
                truncated: false,
                elapsed,
            }),
        }
    }

    /// Connects to `addr` from this namespace and reads the server's greeting line, each
    /// within `timeout`.
    ///
    /// Over veth an ICMP error answering the very first SYN can arrive while `connect`
    /// still holds the socket; the kernel then drops it (`TcpExtLockDroppedIcmps`; seen with
    /// ICMPv6 admin-prohibited) and the error is only reported for the SYN retransmitted
    /// after 1 s: give a timeout above 1 s to tell `Unreachable` from `TimedOut` reliably.
    pub fn connect_tcp(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<TcpConn, ConnectError> {
        let classify = |e| ConnectError::classify(e, timeout);
        let stream = self
            .run(|| TcpStream::connect_timeout(&addr, timeout))?
            .map_err(classify)?;
        stream.set_read_timeout(Some(timeout)).map_err(classify)?;
        stream.set_write_timeout(Some(timeout)).map_err(classify)?;
        stream.set_nodelay(true).map_err(classify)?;
        let mut greeting = String::new();
        BufReader::new(&stream)
            .read_line(&mut greeting)
            .map_err(classify)?;
        if !greeting.ends_with('\n') {
            return Err(ConnectError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        greeting.pop();
        Ok(TcpConn { stream, greeting })
    }

    /// Connects to `addr` and reads the greeting within [`REACH_TIMEOUT`]; for tables.
    pub fn reach_tcp(&self, addr: SocketAddr) -> Reach {
        let start = Instant::now();
        let outcome = match self.connect_tcp(addr, REACH_TIMEOUT) {
            Ok(_) => Outcome::Connected,
            Err(ConnectError::Refused) => Outcome::Refused,
            Err(ConnectError::Unreachable(_)) => Outcome::Unreachable,
            Err(ConnectError::TimedOut(_)) => Outcome::TimedOut,
            Err(_) => Outcome::Failed,
        };
        Reach {
            outcome,
            elapsed: start.elapsed(),
        }
    }

    /// Sends `payload` to `addr` from a connected UDP socket in this namespace and returns
    /// the first datagram that comes back (from `addr`: the kernel filters others) within
    /// `timeout`.
    pub fn udp_exchange(
        &self,
        addr: SocketAddr,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, ConnectError> {
        let socket = self.run(|| bind_any(addr))?;
        let classify = |e| ConnectError::classify(e, timeout);
        let socket = socket.map_err(classify)?;
        socket.connect(addr).map_err(classify)?;
        socket.set_read_timeout(Some(timeout)).map_err(classify)?;
        socket.send(payload).map_err(classify)?;
        let mut buf = vec![0; 65_535];
        let len = socket.recv(&mut buf).map_err(classify)?;
        buf.truncate(len);
        Ok(buf)
    }
}

/// A UDP socket on the wildcard address of `peer`'s family.
fn bind_any(peer: SocketAddr) -> io::Result<UdpSocket> {
    match peer {
        SocketAddr::V4(_) => UdpSocket::bind(("0.0.0.0", 0)),
        SocketAddr::V6(_) => UdpSocket::bind(("::", 0)),
    }
}

fn ask_udp(server: SocketAddr, query: &[u8], id: u16, timeout: Duration) -> io::Result<Vec<u8>> {
    let socket = bind_any(server)?;
    socket.connect(server)?;
    socket.send(query)?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0; 65_535];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        socket.set_read_timeout(Some(left))?;
        let len = socket.recv(&mut buf)?;
        let answer = buf.get(..len).unwrap_or_default();
        if answer.len() >= 2 && crate::query::id(answer) == id {
            return Ok(answer.to_vec());
        }
    }
}

fn ask_tcp(server: SocketAddr, query: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&server, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let len = u16::try_from(query.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed)?;
    let mut len = [0; 2];
    stream.read_exact(&mut len)?;
    let mut answer = vec![0; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer)?;
    Ok(answer)
}
