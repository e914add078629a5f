//! Every socket option and `recvmsg`/`recvmmsg` call the proxy makes lives here.
//!
//! Transparent (TPROXY) sockets: the datapath redirects pods' DNS to the transparent port while keeping the original
//! destination. A UDP query's original destination comes from `IP_RECVORIGDSTADDR`
//! (`IPV6_RECVORIGDSTADDR`); the reply must leave from that address, so it is sent through
//! a transparent socket bound to it. A TCP connection's local address is the original
//! destination.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use nix::sys::socket::{
    recvmmsg, recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, MultiHeaders,
    SockaddrStorage,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::{TcpListener, UdpSocket};

fn transparent(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    socket.set_reuse_address(true)?;
    // A restarting or upgraded proxy binds the same ports before the old one leaves.
    socket.set_reuse_port(true)?;
    if addr.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_only_v6(true)?;
        socket.set_ip_transparent_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A UDP socket on `addr` (usually `0.0.0.0:PORT` or `[::]:PORT`) that receives
/// TPROXY-redirected queries with their original destination.
pub(crate) fn udp_listener(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = transparent(addr, Type::DGRAM, Protocol::UDP)?;
    if addr.is_ipv4() {
        setsockopt(&socket, sockopt::Ipv4OrigDstAddr, &true).map_err(io::Error::from)?;
    } else {
        setsockopt(&socket, sockopt::Ipv6OrigDstAddr, &true).map_err(io::Error::from)?;
    }
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// A TCP listener on `addr` that accepts TPROXY-redirected connections.
pub(crate) fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = transparent(addr, Type::STREAM, Protocol::TCP)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// A UDP socket bound to `from` (a non-local address: the server the pod asked), so
/// replies appear to come from it.
fn reply_socket(from: SocketAddr) -> io::Result<UdpSocket> {
    let socket = transparent(from, Type::DGRAM, Protocol::UDP)?;
    socket.bind(&from.into())?;
    UdpSocket::from_std(socket.into())
}

/// Reply sockets by the address they answer from; there are few DNS servers.
#[derive(Default)]
pub(crate) struct ReplySockets(HashMap<SocketAddr, Arc<UdpSocket>>);

impl ReplySockets {
    /// The socket that sends from `from`, created on first use.
    pub(crate) fn get(&mut self, from: SocketAddr) -> io::Result<Arc<UdpSocket>> {
        if let Some(s) = self.0.get(&from) {
            return Ok(s.clone());
        }
        let s = Arc::new(reply_socket(from)?);
        self.0.insert(from, s.clone());
        Ok(s)
    }
}

/// Receives one datagram: its length, source, and original destination.
pub(crate) async fn recv_orig_dst(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, SocketAddr)> {
    let fd = socket.as_raw_fd();
    socket
        .async_io(Interest::READABLE, || {
            let mut cmsg = nix::cmsg_space!(OrigDstCmsg);
            let mut iov = [IoSliceMut::new(buf)];
            let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
                .map_err(io::Error::from)?;
            let source = msg
                .address
                .as_ref()
                .and_then(to_std)
                .ok_or_else(|| io::Error::other("datagram without a source address"))?;
            let mut orig = None;
            for c in msg.cmsgs().map_err(io::Error::from)? {
                match c {
                    ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                        orig = Some(SocketAddr::V4(SocketAddrV4::new(
                            u32::from_be(a.sin_addr.s_addr).into(),
                            u16::from_be(a.sin_port),
                        )));
                    }
                    ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                        orig = Some(SocketAddr::V6(SocketAddrV6::new(
                            a.sin6_addr.s6_addr.into(),
                            u16::from_be(a.sin6_port),
                            0,
                            a.sin6_scope_id,
                        )));
                    }
                    _ => {}
                }
            }
            let orig =
                orig.ok_or_else(|| io::Error::other("datagram without its original destination"))?;
            Ok((msg.bytes, source, orig))
        })
        .await
}

/// The largest control message expected (an IPv6 original destination).
type OrigDstCmsg = nix::libc::sockaddr_in6;

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::new(v4.ip(), v4.port())));
    }
    a.as_sockaddr_in6().map(|v6| {
        SocketAddr::V6(SocketAddrV6::new(
            v6.ip(),
            v6.port(),
            v6.flowinfo(),
            v6.scope_id(),
        ))
    })
}

/// Buffers for receiving up to `BATCH` datagrams with one `recvmmsg` call.
pub(crate) struct Batch {
    bufs: Vec<Vec<u8>>,
    /// Length and source of each datagram of the last receive.
    pub(crate) got: Vec<(usize, SocketAddr)>,
}

impl Batch {
    /// `count` buffers of `size` bytes each.
    pub(crate) fn new(count: usize, size: usize) -> Self {
        Self {
            bufs: (0..count).map(|_| vec![0u8; size]).collect(),
            got: Vec::with_capacity(count),
        }
    }

    /// The `i`-th datagram of the last receive.
    pub(crate) fn datagram(&mut self, i: usize) -> Option<(&mut [u8], SocketAddr)> {
        let (len, from) = *self.got.get(i)?;
        Some((self.bufs.get_mut(i)?.get_mut(..len)?, from))
    }

    /// Waits until `socket` is readable, then receives every datagram queued (up to the
    /// batch size) with one system call. Returns how many arrived.
    pub(crate) async fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let fd = socket.as_raw_fd();
        loop {
            socket.readable().await?;
            let Self { bufs, got } = self;
            got.clear();
            let received = socket.try_io(Interest::READABLE, || {
                // The kernel's headers hold raw pointers (not `Send`): built per call, so
                // the batch can live across awaits; one allocation per batch, not per query.
                let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(bufs.len(), None);
                let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
                    bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
                let results = recvmmsg(
                    fd,
                    &mut headers,
                    iovs.iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                )
                .map_err(io::Error::from)?;
                for msg in results {
                    // A datagram without a readable source address cannot be answered.
                    let from = msg.address.as_ref().and_then(to_std);
                    got.push((
                        msg.bytes,
                        from.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                    ));
                }
                Ok(())
            });
            match received {
                Ok(()) => return Ok(got.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A plain (explicit) listener socket with `SO_REUSEPORT`, UDP or TCP.
pub(crate) fn explicit_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// See [`explicit_udp`].
pub(crate) fn explicit_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
