//! Every socket option and `recvmmsg`/`sendmmsg` call the proxy makes lives here.
//!
//! Transparent (TPROXY) sockets: the datapath redirects pods' DNS to the transparent port while keeping the original
//! destination. A UDP query's original destination comes from `IP_RECVORIGDSTADDR`
//! (`IPV6_RECVORIGDSTADDR`); the reply must leave from that address, so it is sent through
//! a transparent socket bound to it, or, when another socket on the node holds the address,
//! built whole and sent through a raw socket (see [`crate::reply`]). A TCP connection's
//! local address is the original destination.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recvmmsg, sendmmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    MultiHeaders, SockaddrStorage,
};
use smallvec::SmallVec;
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

/// How many bytes of datagrams a listener's queue holds (about 4,000 queries): a burst
/// waits there instead of being dropped while the proxy catches up.
const LISTENER_RECEIVE_BUFFER: usize = 4 << 20;

/// How many bytes of answers an upstream socket's queue holds (about 1,000): answers to
/// a burst of queries wait there while the proxy catches up.
const UPSTREAM_RECEIVE_BUFFER: usize = 1 << 20;

/// Gives a UDP socket a receive queue of `bytes`: past the system's `rmem_max` when
/// allowed (`CAP_NET_ADMIN`), else as much as it allows.
fn large_receive_buffer(socket: &Socket, bytes: usize) {
    let forced = nix::sys::socket::setsockopt(socket, sockopt::RcvBufForce, &bytes);
    if forced.is_err() {
        let _ = socket.set_recv_buffer_size(bytes);
    }
}

/// A UDP socket on `addr` (usually `0.0.0.0:PORT` or `[::]:PORT`) that receives
/// TPROXY-redirected queries with their original destination.
pub(crate) fn udp_listener(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = transparent(addr, Type::DGRAM, Protocol::UDP)?;
    large_receive_buffer(&socket, LISTENER_RECEIVE_BUFFER);
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
pub(crate) fn reply_socket(from: SocketAddr) -> io::Result<UdpSocket> {
    let socket = transparent(from, Type::DGRAM, Protocol::UDP)?;
    socket.bind(&from.into())?;
    UdpSocket::from_std(socket.into())
}

/// Whether a socket on this node is already bound to `addr` (exactly, or on its port of
/// the wildcard address): a transparent socket without address or port sharing cannot
/// bind it then.
pub(crate) fn bound_elsewhere(addr: SocketAddr) -> bool {
    let probe = || -> io::Result<()> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv4() {
            socket.set_ip_transparent_v4(true)?;
        } else {
            socket.set_only_v6(true)?;
            socket.set_ip_transparent_v6(true)?;
        }
        socket.bind(&addr.into())
    };
    matches!(probe(), Err(e) if e.kind() == io::ErrorKind::AddrInUse)
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

/// Buffers for receiving up to `count` datagrams with one `recvmmsg` call.
pub(crate) struct Batch {
    bufs: Vec<Vec<u8>>,
    /// Whether each datagram's original destination is read (transparent listeners).
    orig_dst: bool,
    /// Length, source and (transparent listeners) original destination of each datagram
    /// of the last receive.
    got: Vec<(usize, SocketAddr, Option<SocketAddr>)>,
}

/// A source address for datagrams whose source could not be read (they cannot be answered).
const NO_ADDRESS: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0));

impl Batch {
    /// `count` buffers of `size` bytes each.
    pub(crate) fn new(count: usize, size: usize) -> Self {
        Self {
            bufs: (0..count).map(|_| vec![0u8; size]).collect(),
            orig_dst: false,
            got: Vec::with_capacity(count),
        }
    }

    /// The same, for a transparent socket: each datagram comes with its original
    /// destination (`IP_RECVORIGDSTADDR` must be set on the socket).
    pub(crate) fn with_orig_dst(count: usize, size: usize) -> Self {
        Self {
            orig_dst: true,
            ..Self::new(count, size)
        }
    }

    /// The `i`-th datagram of the last receive.
    pub(crate) fn datagram(&mut self, i: usize) -> Option<(&mut [u8], SocketAddr)> {
        let (len, from, _) = *self.got.get(i)?;
        Some((self.bufs.get_mut(i)?.get_mut(..len)?, from))
    }

    /// The original destination of the `i`-th datagram of the last receive, when read.
    pub(crate) fn orig_dst(&self, i: usize) -> Option<SocketAddr> {
        self.got.get(i)?.2
    }

    /// The bytes of the `i`-th datagram of the last receive, as they are now (handling may
    /// have rewritten them in place).
    pub(crate) fn bytes(&self, i: usize) -> &[u8] {
        let len = self.got.get(i).map_or(0, |g| g.0);
        self.bufs
            .get(i)
            .and_then(|b| b.get(..len))
            .unwrap_or_default()
    }

    /// Waits until `socket` is readable, then receives every datagram queued (up to the
    /// batch size) with one system call. Returns how many arrived.
    ///
    /// A pending socket error wakes it too and is returned: on a connected socket,
    /// `ConnectionRefused` says the server's port was unreachable (ICMP). Once the
    /// socket is [`shut`] and its queue is empty, it returns an error [`is_shut`]
    /// recognises.
    pub(crate) async fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let fd = socket.as_raw_fd();
        loop {
            // Readable, or an error to report (which alone never makes it readable). The
            // receive below goes with the one interest that woke it: tokio's `try_io`
            // sees no readiness at all for a combined interest.
            let ready = socket.ready(Interest::READABLE | Interest::ERROR).await?;
            let interest = if ready.is_error() && !ready.is_readable() && !ready.is_read_closed() {
                Interest::ERROR
            } else {
                Interest::READABLE
            };
            let Self {
                bufs,
                orig_dst,
                got,
            } = self;
            got.clear();
            let capacity = bufs.len();
            let received = socket.try_io(interest, || {
                // The kernel's headers hold raw pointers (not `Send`): built per call, so
                // the batch can live across awaits; a few allocations per batch, not per
                // query.
                let cmsg = orig_dst.then(|| nix::cmsg_space!(OrigDstCmsg));
                let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(bufs.len(), cmsg);
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
                    let dst = if *orig_dst {
                        msg.cmsgs()
                            .ok()
                            .and_then(|mut c| c.find_map(|c| orig_dst_of(&c)))
                    } else {
                        None
                    };
                    got.push((msg.bytes, from.unwrap_or(NO_ADDRESS), dst));
                }
                if got.len() < capacity {
                    // Fewer than asked for: the queue is empty now. Saying so clears the
                    // socket's readiness, which saves the call that would only learn
                    // `EAGAIN`; a datagram arriving later raises a new (edge-triggered)
                    // event. Unconnected sockets carry no pending errors that could end a
                    // batch early.
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match received {
                Ok(()) => return Ok(got.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !got.is_empty() => {
                    return Ok(got.len())
                }
                // Shut: nothing more will arrive, and the readiness stays set.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && ready.is_read_closed() => {
                    return Err(io::Error::new(SHUT, "the socket was shut down"))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The error kind [`Batch::recv`] reports for a [`shut`] socket.
const SHUT: io::ErrorKind = io::ErrorKind::UnexpectedEof;

/// Whether `e`, from [`Batch::recv`], says the socket was [`shut`].
pub(crate) fn is_shut(e: &io::Error) -> bool {
    e.kind() == SHUT
}

/// Shuts a UDP socket down, which wakes a task waiting in [`Batch::recv`] on it and ends
/// its receiving. The descriptor closes when the socket is dropped.
pub(crate) fn shut(socket: &UdpSocket) {
    // An unconnected socket reports `ENOTCONN`, yet is shut down all the same (the kernel
    // marks it and wakes its waiters).
    let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Both);
}

/// The original destination a control message carries, if it is one.
fn orig_dst_of(c: &ControlMessageOwned) -> Option<SocketAddr> {
    match c {
        ControlMessageOwned::Ipv4OrigDstAddr(a) => Some(SocketAddr::V4(SocketAddrV4::new(
            u32::from_be(a.sin_addr.s_addr).into(),
            u16::from_be(a.sin_port),
        ))),
        ControlMessageOwned::Ipv6OrigDstAddr(a) => Some(SocketAddr::V6(SocketAddrV6::new(
            a.sin6_addr.s6_addr.into(),
            u16::from_be(a.sin6_port),
            0,
            a.sin6_scope_id,
        ))),
        _ => None,
    }
}

/// Sends each message (bytes, and the destination unless `socket` is connected) from
/// `socket`, with as few `sendmmsg` calls as the kernel allows (one, unless its buffer
/// fills). Returns the messages that could not be sent, by index, with their error; the
/// others are sent.
pub(crate) async fn send_batch(
    socket: &UdpSocket,
    msgs: &[(&[u8], Option<SocketAddr>)],
) -> Vec<(usize, io::Error)> {
    let fd = socket.as_raw_fd();
    let mut failed = Vec::new();
    let mut start = 0;
    // The message a stale error was last reported on (see below).
    let mut retried = None;
    while let Some(rest) = msgs.get(start..).filter(|r| !r.is_empty()) {
        let sent = socket
            .async_io(Interest::WRITABLE, || {
                let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(rest.len(), None);
                let iovs: Vec<[IoSlice<'_>; 1]> =
                    rest.iter().map(|(b, _)| [IoSlice::new(b)]).collect();
                // On the stack for batches of ordinary size.
                let addrs: SmallVec<[Option<SockaddrStorage>; BATCH_INLINE]> = rest
                    .iter()
                    .map(|(_, a)| a.map(SockaddrStorage::from))
                    .collect();
                let none: [ControlMessage<'_>; 0] = [];
                let results = sendmmsg(
                    fd,
                    &mut headers,
                    &iovs,
                    &addrs,
                    none,
                    MsgFlags::MSG_DONTWAIT,
                )
                .map_err(io::Error::from)?;
                Ok(results.count())
            })
            .await;
        match sent {
            Ok(n) if n > 0 => start += n,
            // The kernel reports an error only for the first message of a call; the
            // messages before it were sent by the previous call.
            Ok(_) => {
                failed.push((start, io::Error::other("sendmmsg sent nothing")));
                start += 1;
            }
            // A connected socket reports an ICMP error (port unreachable) for an earlier
            // datagram on its next send, once: that message was not sent; try it again.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && retried != Some(start) => {
                retried = Some(start);
            }
            Err(e) => {
                failed.push((start, e));
                start += 1;
            }
        }
    }
    failed
}

/// A plain (explicit) listener socket with `SO_REUSEPORT`, UDP or TCP.
/// Messages of a batch whose slices and addresses live on the stack.
const BATCH_INLINE: usize = 32;

/// A UDP socket on an ephemeral port of `upstream`'s family, connected to `upstream`: the
/// kernel then delivers only that server's datagrams to it, and sends to it without a
/// route lookup per datagram.
pub(crate) fn connected_udp(upstream: SocketAddr) -> io::Result<UdpSocket> {
    let socket = nonblocking(upstream, Type::DGRAM, Protocol::UDP)?;
    let any: SocketAddr = if upstream.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    large_receive_buffer(&socket, UPSTREAM_RECEIVE_BUFFER);
    socket.bind(&any.into())?;
    socket.connect(&upstream.into())?;
    UdpSocket::from_std(socket.into())
}

/// A UDP socket on an ephemeral port of `any` (the unspecified address of a family).
pub(crate) fn unconnected_udp(any: SocketAddr) -> io::Result<UdpSocket> {
    let socket = nonblocking(any, Type::DGRAM, Protocol::UDP)?;
    large_receive_buffer(&socket, UPSTREAM_RECEIVE_BUFFER);
    socket.bind(&any.into())?;
    UdpSocket::from_std(socket.into())
}

/// Raises the soft limit on open descriptors to the hard limit (often 1024 against
/// 524288): each TCP client, upstream connection and reply socket takes one.
pub(crate) fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// Every address on the node's interfaces (the namespace the proxy runs in): answers
/// naming one are never learned. Empty when they cannot be read.
pub(crate) fn local_addresses() -> foldhash::HashSet<std::net::IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return foldhash::HashSet::default();
    };
    addrs
        .filter_map(|a| {
            let a = a.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                return Some(std::net::IpAddr::V4(v4.ip()));
            }
            a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip()))
        })
        .collect()
}

/// A non-blocking socket of `addr`'s family; an IPv6 one is IPv6 only.
fn nonblocking(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

pub(crate) fn explicit_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = nonblocking(addr, Type::DGRAM, Protocol::UDP)?;
    large_receive_buffer(&socket, LISTENER_RECEIVE_BUFFER);
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// See [`explicit_udp`].
pub(crate) fn explicit_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = nonblocking(addr, Type::STREAM, Protocol::TCP)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_address_another_socket_holds_is_noticed() {
        let can = Socket::new(Domain::IPV4, Type::DGRAM, None)
            .and_then(|s| s.set_ip_transparent_v4(true));
        if matches!(&can, Err(e) if e.kind() == io::ErrorKind::PermissionDenied) {
            eprintln!("skipped: transparent sockets need CAP_NET_ADMIN");
            return;
        }
        // A server on the exact address, and one on the wildcard address of a port.
        let exact = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(bound_elsewhere(exact.local_addr().unwrap()));
        let wildcard = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = wildcard.local_addr().unwrap().port();
        assert!(bound_elsewhere(SocketAddr::from(([127, 0, 0, 1], port))));
        // Nothing there once they are gone (a pod's usual upstream elsewhere).
        let free = exact.local_addr().unwrap();
        drop(exact);
        assert!(!bound_elsewhere(free));
        assert!(!bound_elsewhere(SocketAddr::from((
            [192, 0, 2, 53],
            free.port()
        ))));
    }

    #[tokio::test]
    async fn shutting_a_socket_ends_the_receive_waiting_on_it() {
        let port9: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
        for (what, socket) in [
            ("connected", connected_udp(port9).unwrap()),
            ("unconnected", unconnected_udp(any).unwrap()),
        ] {
            let mut batch = Batch::new(4, 64);
            let (received, ()) = tokio::join!(
                tokio::time::timeout(Duration::from_secs(5), batch.recv(&socket)),
                async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    shut(&socket);
                }
            );
            let e = received
                .unwrap_or_else(|_| panic!("{what}: the receive still waits"))
                .expect_err(what);
            assert!(is_shut(&e), "{what}: {e}");
        }
    }

    #[tokio::test]
    async fn a_batch_sends_every_message_it_can_and_names_the_ones_it_cannot() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        // An IPv6 destination cannot be reached from an IPv4 socket.
        let unreachable: SocketAddr = "[::1]:53".parse().unwrap();
        let msgs: [(&[u8], Option<SocketAddr>); 4] = [
            (b"one", Some(to)),
            (b"two", Some(unreachable)),
            (b"three", Some(to)),
            (b"four", Some(to)),
        ];
        let failed = send_batch(&tx, &msgs).await;
        assert_eq!(failed.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1]);

        let mut batch = Batch::new(8, 64);
        let mut got = Vec::new();
        while got.len() < 3 {
            let n = tokio::time::timeout(Duration::from_secs(5), batch.recv(&rx))
                .await
                .expect("the sent datagrams arrive")
                .unwrap();
            for i in 0..n {
                got.push(batch.bytes(i).to_vec());
                assert_eq!(batch.datagram(i).unwrap().1, tx.local_addr().unwrap());
            }
        }
        assert_eq!(got, [&b"one"[..], b"three", b"four"]);
    }
}
