//! The world's application servers, on sockets bound beforehand (in the world's namespace):
//!
//! - TCP: each connection first gets `hello from <local addr>:<port>\n` (the address the
//!   client dialled, so a test knows which server it reached), then an echo of what it sends,
//!   until the client closes;
//! - UDP: each datagram is echoed back from the address and port it was sent to (with
//!   `IP_PKTINFO`/`IPV6_PKTINFO`, which a wildcard socket needs when every address of a
//!   range is local), so a connected client socket accepts the reply.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use nix::libc;
use nix::sys::socket::{
    bind, recvmsg, sendmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrStorage,
};
use tokio::io::{AsyncWriteExt, Interest};

use crate::LabError;

/// The greeting a TCP server sends first, for a connection to `local`.
pub fn greeting(local: SocketAddr) -> String {
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    format!("hello from {local}\n")
}

/// A UDP socket on `addr` that learns each datagram's destination address (for the reply).
/// An IPv6 socket is IPv6-only: bind `0.0.0.0` separately.
pub(crate) fn bind_udp_echo(addr: SocketAddr) -> io::Result<UdpSocket> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = socket(family, SockType::Datagram, flags, None)?;
    if addr.is_ipv4() {
        setsockopt(&fd, sockopt::Ipv4PacketInfo, &true)?;
    } else {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
        setsockopt(&fd, sockopt::Ipv6RecvPacketInfo, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(UdpSocket::from(fd))
}

/// Running TCP and UDP servers, stopped on drop.
#[derive(Debug)]
pub(crate) struct Servers {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Servers {
    /// Serves `tcp` (greeting, then echo) and `udp` (echo; sockets from [`bind_udp_echo`]).
    pub(crate) fn serve(tcp: Vec<TcpListener>, udp: Vec<UdpSocket>) -> Result<Self, LabError> {
        let service_error = |source| LabError::Service {
            what: "TCP/UDP echo",
            source,
        };
        for s in &tcp {
            s.set_nonblocking(true).map_err(service_error)?;
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let thread = std::thread::Builder::new()
            .name("lab-servers".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                runtime.block_on(async move {
                    let started = start_all(tcp, udp);
                    let ok = started.is_ok();
                    let _ = ready_tx.send(started);
                    if ok {
                        let _ = stopped.await;
                    }
                });
                // Dropping the runtime cancels every task, closing open connections.
            })
            .map_err(service_error)?;
        ready_rx
            .recv()
            .map_err(|_| service_error(io::ErrorKind::BrokenPipe.into()))?
            .map_err(service_error)?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Spawns a task per socket (inside the runtime, which `from_std` needs).
fn start_all(tcp: Vec<TcpListener>, udp: Vec<UdpSocket>) -> io::Result<()> {
    for listener in tcp {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => drop(tokio::spawn(greet_and_echo(stream))),
                    // Out of descriptors and the like: wait instead of spinning.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                }
            }
        });
    }
    for socket in udp {
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        tokio::spawn(udp_echo(socket));
    }
    Ok(())
}

async fn greet_and_echo(mut stream: tokio::net::TcpStream) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    if stream.write_all(greeting(local).as_bytes()).await.is_err() {
        return;
    }
    let (mut read, mut write) = stream.split();
    let _ = tokio::io::copy(&mut read, &mut write).await;
}

/// The destination of a received datagram.
#[derive(Clone, Copy)]
enum Destination {
    V4(libc::in_pktinfo),
    V6(libc::in6_pktinfo),
}

async fn udp_echo(socket: tokio::net::UdpSocket) {
    let fd = socket.as_raw_fd();
    let mut buf = vec![0u8; 65_535];
    loop {
        let received = socket
            .async_io(Interest::READABLE, || receive(fd, &mut buf))
            .await;
        let Ok((len, peer, Some(destination))) = received else {
            continue;
        };
        let Some(data) = buf.get(..len) else {
            continue;
        };
        // A full send buffer drops the echo, as a real server would.
        let _ = socket
            .async_io(Interest::WRITABLE, || reply(fd, data, &peer, destination))
            .await;
    }
}

fn receive(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SockaddrStorage, Option<Destination>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(libc::in_pktinfo, libc::in6_pktinfo);
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())?;
    let mut destination = None;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4PacketInfo(info) => destination = Some(Destination::V4(info)),
            ControlMessageOwned::Ipv6PacketInfo(info) => destination = Some(Destination::V6(info)),
            _ => {}
        }
    }
    let peer = msg.address.ok_or(io::ErrorKind::InvalidData)?;
    Ok((msg.bytes, peer, destination))
}

fn reply(
    fd: RawFd,
    data: &[u8],
    peer: &SockaddrStorage,
    destination: Destination,
) -> io::Result<usize> {
    let iov = [IoSlice::new(data)];
    let sent = match destination {
        Destination::V4(mut info) => {
            info.ipi_spec_dst = info.ipi_addr;
            info.ipi_ifindex = 0;
            let cmsg = [ControlMessage::Ipv4PacketInfo(&info)];
            sendmsg(fd, &iov, &cmsg, MsgFlags::empty(), Some(peer))
        }
        Destination::V6(mut info) => {
            info.ipi6_ifindex = 0;
            let cmsg = [ControlMessage::Ipv6PacketInfo(&info)];
            sendmsg(fd, &iov, &cmsg, MsgFlags::empty(), Some(peer))
        }
    };
    Ok(sent?)
}
