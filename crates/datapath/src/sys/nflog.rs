//! Packets the ruleset logs with `log group N prefix "reason"` (NFLOG), read over netlink.
//!
//! [`NflogSocket::open`] binds one NFLOG group of the calling thread's network namespace
//! (groups are per namespace: the same number can be bound once in each) and asks the
//! kernel for the first [`COPY_RANGE`] bytes of each packet, delivered one by one
//! (queue threshold 1), so a drop reaches [`NflogSocket::recv`] without delay.
//! [`parse_packet_message`] turns one message into a [`LoggedPacket`]: the prefix, the
//! addresses, the protocol and what the headers say about ports or ICMP type.
//!
//! Payloads are hostile: truncated or odd headers leave fields `None` and never panic.
//! Only datagrams sent by the kernel (port id 0) are read, so another process of the
//! namespace cannot forge events. This module installs no rules.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use nix::sys::time::{TimeVal, TimeValLike};

use super::netlink::{
    error_code, finish_message, put_attr, put_header, put_nfgenmsg, Attrs, Messages, NFGENMSG_LEN,
    NLMSG_ERROR, NLM_F_ACK, NLM_F_REQUEST,
};

#[cfg(test)]
mod tests;

// <linux/netfilter/nfnetlink.h>, <linux/netfilter/nfnetlink_log.h>
const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_IFINDEX_INDEV: u16 = 4;
const NFULA_IFINDEX_OUTDEV: u16 = 5;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_CFG_CMD_PF_BIND: u8 = 3;
const NFULNL_CFG_CMD_PF_UNBIND: u8 = 4;
const NFULNL_COPY_PACKET: u8 = 2;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

// <netinet/in.h>
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_DCCP: u8 = 33;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
// IPv6 extension headers.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// More extension headers than this and the packet is not worth reading further.
const IPV6_MAX_EXTENSIONS: usize = 8;

/// Bytes of each logged packet the kernel copies: the IP header, common IPv6 extension
/// headers and the start of the transport header.
pub const COPY_RANGE: u32 = 256;
/// Receive buffer: larger than the kernel's NFLOG buffer (a page by default).
const RX_LEN: usize = 64 * 1024;
/// Socket buffer: about a thousand logged packets before the kernel drops (overrun).
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// The kernel answers configuration before `sendmsg` returns; this only guards a bug.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams read without waiting after the first one, per [`NflogSocket::recv`].
const DRAIN_MAX: usize = 64;
/// Longest receive timeout handed to the kernel (a `timeval` must not overflow).
const MAX_TIMEOUT_MICROS: i64 = i64::MAX / 2;

/// A packet logged by a `log group N` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedPacket {
    /// The rule's `prefix`, without the trailing NUL (empty when it has none).
    pub prefix: String,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// `IPPROTO_*` of the transport header; for an IPv6 packet whose extension headers
    /// are cut off, the last header type that could be read.
    pub protocol: u8,
    /// Source port (TCP, UDP, UDP-Lite, SCTP, DCCP), when readable.
    pub src_port: Option<u16>,
    /// Destination port, when readable.
    pub dst_port: Option<u16>,
    /// ICMP or ICMPv6 type, when readable.
    pub icmp_type: Option<u8>,
    /// Input interface index (input, forward and prerouting hooks).
    pub indev: Option<u32>,
    /// Output interface index (output, forward and postrouting hooks).
    pub outdev: Option<u32>,
}

/// An error of [`NflogSocket`].
#[derive(Debug, thiserror::Error)]
pub enum NflogError {
    /// The socket could not be opened.
    #[error("cannot open a netfilter netlink socket")]
    Open(#[source] Errno),
    /// The kernel refused to bind the group.
    #[error("cannot bind NFLOG group {group}")]
    Bind {
        /// The group.
        group: u16,
        /// `EPERM`: no `CAP_NET_ADMIN`, or another socket of this network namespace
        /// holds the group.
        #[source]
        errno: Errno,
    },
    /// `sendmsg` failed.
    #[error("cannot send to the kernel")]
    Send(#[source] Errno),
    /// `recvmsg` failed.
    #[error("cannot receive from the kernel")]
    Receive(#[source] Errno),
    /// The kernel did not answer in time (it answers synchronously, so: a bug).
    #[error("no answer from the kernel within {0:?}")]
    NoAnswer(Duration),
}

/// A netlink socket bound to one NFLOG group, with its buffers reused across calls.
pub struct NflogSocket {
    fd: OwnedFd,
    group: u16,
    seq: u32,
    tx: Vec<u8>,
    rx: Vec<u8>,
    /// Packets that arrived while waiting for a configuration answer.
    pending: Vec<LoggedPacket>,
    /// `SO_RCVTIMEO` as last set, in microseconds (0: forever).
    timeout_micros: Option<i64>,
    overruns: u64,
    malformed: u64,
}

impl std::fmt::Debug for NflogSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NflogSocket")
            .field("group", &self.group)
            .field("overruns", &self.overruns)
            .field("malformed", &self.malformed)
            .finish_non_exhaustive()
    }
}

/// What one receive call got.
enum Read {
    /// A datagram from the kernel of this many bytes is in `rx`.
    Datagram(usize),
    /// Nothing: the timeout passed, or nothing was queued (`MSG_DONTWAIT`).
    Nothing,
    /// Try again: interrupted, an overrun (counted), or a datagram not from the kernel.
    Again,
}

impl NflogSocket {
    /// Opens a socket in the calling thread's network namespace (where it stays even
    /// when moved to another thread) and binds NFLOG group `group` there, copying the
    /// first [`COPY_RANGE`] bytes of each packet, delivered one by one. Needs
    /// `CAP_NET_ADMIN`; the group is released when the socket is dropped.
    pub fn open(group: u16) -> Result<Self, NflogError> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(NflogError::Open)?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(NflogError::Open)?;
        // Forcing needs CAP_NET_ADMIN, which binding needs anyway; without it the default
        // buffer only overruns sooner.
        if socket::setsockopt(&fd, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
            let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &SOCKET_BUFFER);
        }
        let mut me = Self {
            fd,
            group,
            seq: 0,
            tx: Vec::with_capacity(64),
            rx: vec![0; RX_LEN],
            pending: Vec::new(),
            timeout_micros: None,
            overruns: 0,
            malformed: 0,
        };
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        if needs_pf_bind(&release) {
            // Before Linux 3.17 a `log group` rule reached NFLOG only through the logger
            // bound to the family. Later the rule names its logger, and binding would
            // instead change the namespace's default logger: never do it there.
            for family in [AF_INET, AF_INET6] {
                for cmd in [NFULNL_CFG_CMD_PF_UNBIND, NFULNL_CFG_CMD_PF_BIND] {
                    let _ = me.configure(family, 0, &[cmd], false);
                }
            }
        }
        me.configure(0, group, &[NFULNL_CFG_CMD_BIND], true)?;
        Ok(me)
    }

    /// The bound group.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// How many times the kernel reported dropping messages because the socket buffer
    /// was full (`ENOBUFS`); receiving continues after each.
    pub fn overruns(&self) -> u64 {
        self.overruns
    }

    /// How many messages were skipped because no IP header could be read in them.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Waits up to `timeout` (`None`: forever; zero: not at all) for logged packets and
    /// returns them with any others already queued (a bounded batch); empty when the
    /// timeout passed first.
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Vec<LoggedPacket>, NflogError> {
        let mut out = std::mem::take(&mut self.pending);
        // A deadline too far to represent waits forever.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        while out.is_empty() {
            let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let flags = if wait == Some(Duration::ZERO) {
                MsgFlags::MSG_DONTWAIT
            } else {
                self.set_timeout(wait)?;
                MsgFlags::empty()
            };
            match self.read(flags)? {
                Read::Datagram(len) => {
                    self.dispatch(len, &mut out, None);
                }
                Read::Nothing => return Ok(out),
                Read::Again => {}
            }
        }
        for _ in 0..DRAIN_MAX {
            match self.read(MsgFlags::MSG_DONTWAIT)? {
                Read::Datagram(len) => {
                    self.dispatch(len, &mut out, None);
                }
                Read::Nothing => break,
                Read::Again => {}
            }
        }
        Ok(out)
    }

    /// Sends one configuration message (`cmd` and, with `mode`, the copy mode and queue
    /// threshold) and waits for the kernel's answer.
    fn configure(
        &mut self,
        family: u8,
        group: u16,
        cmd: &[u8],
        mode: bool,
    ) -> Result<(), NflogError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.tx.clear();
        let ty = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG;
        let start = put_header(&mut self.tx, ty, NLM_F_REQUEST | NLM_F_ACK, seq);
        put_nfgenmsg(&mut self.tx, family, group);
        put_attr(&mut self.tx, NFULA_CFG_CMD, cmd);
        if mode {
            // struct nfulnl_msg_config_mode { __be32 copy_range; __u8 copy_mode; __u8 _pad; }
            let mut config = [0; 6];
            config[..4].copy_from_slice(&COPY_RANGE.to_be_bytes());
            config[4] = NFULNL_COPY_PACKET;
            put_attr(&mut self.tx, NFULA_CFG_MODE, &config);
            put_attr(&mut self.tx, NFULA_CFG_QTHRESH, &1u32.to_be_bytes());
        }
        finish_message(&mut self.tx, start);
        loop {
            match socket::send(self.fd.as_raw_fd(), &self.tx, MsgFlags::empty()) {
                Ok(_) => break,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(NflogError::Send(e)),
            }
        }
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let mut pending = std::mem::take(&mut self.pending);
        let answer = loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                break Err(NflogError::NoAnswer(ANSWER_TIMEOUT));
            }
            if let Err(e) = self.set_timeout(Some(wait)) {
                break Err(e);
            }
            match self.read(MsgFlags::empty()) {
                Ok(Read::Datagram(len)) => {
                    if let Some(result) = self.dispatch(len, &mut pending, Some(seq)) {
                        break result.map_err(|errno| NflogError::Bind { group, errno });
                    }
                }
                Ok(Read::Nothing) => break Err(NflogError::NoAnswer(ANSWER_TIMEOUT)),
                Ok(Read::Again) => {}
                Err(e) => break Err(e),
            }
        };
        self.pending = pending;
        answer
    }

    /// Sets `SO_RCVTIMEO` unless already set (`None`: forever).
    fn set_timeout(&mut self, wait: Option<Duration>) -> Result<(), NflogError> {
        let micros = wait.map_or(0, |w| {
            i64::try_from(w.as_micros())
                .unwrap_or(i64::MAX)
                .clamp(1, MAX_TIMEOUT_MICROS)
        });
        if self.timeout_micros != Some(micros) {
            let tv = TimeVal::microseconds(micros);
            socket::setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv)
                .map_err(NflogError::Receive)?;
            self.timeout_micros = Some(micros);
        }
        Ok(())
    }

    /// Receives one datagram into `rx`.
    fn read(&mut self, flags: MsgFlags) -> Result<Read, NflogError> {
        let mut iov = [std::io::IoSliceMut::new(&mut self.rx)];
        let received = socket::recvmsg::<NetlinkAddr>(self.fd.as_raw_fd(), &mut iov, None, flags)
            .map(|m| (m.bytes, m.address.is_some_and(|a| a.pid() == 0)));
        match received {
            Ok((len, true)) => Ok(Read::Datagram(len)),
            Ok((_, false)) => Ok(Read::Again),
            Err(Errno::EAGAIN) => Ok(Read::Nothing),
            Err(Errno::EINTR) => Ok(Read::Again),
            Err(Errno::ENOBUFS) => {
                self.overruns += 1;
                tracing::debug!(group = self.group, "NFLOG overrun: logged packets lost");
                Ok(Read::Again)
            }
            Err(e) => Err(NflogError::Receive(e)),
        }
    }

    /// Appends the packets of the datagram in `rx[..len]` to `out`; returns the answer
    /// to configuration message `ack`, if the datagram holds it.
    fn dispatch(
        &mut self,
        len: usize,
        out: &mut Vec<LoggedPacket>,
        ack: Option<u32>,
    ) -> Option<Result<(), Errno>> {
        let mut answer = None;
        for msg in Messages(self.rx.get(..len).unwrap_or_default()) {
            let Ok(msg) = msg else {
                self.malformed += 1;
                break;
            };
            if msg.ty == NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET {
                match parse_packet_message(msg.payload) {
                    Some(packet) => out.push(packet),
                    None => self.malformed += 1,
                }
            } else if msg.ty == NLMSG_ERROR && Some(msg.seq) == ack {
                answer = Some(match error_code(msg.payload) {
                    Ok(0) => Ok(()),
                    Ok(code) => Err(Errno::from_raw(code)),
                    Err(_) => Err(Errno::EPROTO),
                });
            }
            // Else NLMSG_DONE ending a multi-packet datagram, or a stale answer.
        }
        answer
    }
}

impl AsFd for NflogSocket {
    /// Readable when [`NflogSocket::recv`] with a zero timeout has something to read
    /// (for an event loop's readiness polling).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Whether the kernel (`/proc/sys/kernel/osrelease`) predates Linux 3.17, where a
/// `log group` rule reaches NFLOG only after `NFULNL_CFG_CMD_PF_BIND`.
fn needs_pf_bind(release: &str) -> bool {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|s| s.parse::<u32>().ok());
    let minor = parts.next().and_then(|s| s.parse::<u32>().ok());
    matches!((major, minor), (Some(major), Some(minor)) if (major, minor) < (3, 17))
}

/// Parses one `NFULNL_MSG_PACKET` message (its payload after the `nlmsghdr`: `nfgenmsg`
/// and attributes); `None` when it holds no readable IPv4 or IPv6 header.
pub fn parse_packet_message(payload: &[u8]) -> Option<LoggedPacket> {
    let attrs = payload.get(NFGENMSG_LEN..)?;
    let (mut prefix, mut headers, mut indev, mut outdev) = (None, None, None, None);
    for attr in Attrs(attrs) {
        let Ok((ty, value)) = attr else { break };
        match ty {
            NFULA_PREFIX => prefix = value.split(|&b| b == 0).next(),
            NFULA_PAYLOAD => headers = ip_headers(value),
            NFULA_IFINDEX_INDEV => indev = be32(value),
            NFULA_IFINDEX_OUTDEV => outdev = be32(value),
            _ => {}
        }
    }
    let h = headers?;
    let (src_port, dst_port, icmp_type) = transport(h.protocol, h.transport);
    Some(LoggedPacket {
        prefix: String::from_utf8_lossy(prefix.unwrap_or_default()).into_owned(),
        src: h.src,
        dst: h.dst,
        protocol: h.protocol,
        src_port,
        dst_port,
        icmp_type,
        indev,
        outdev,
    })
}

fn be32(bytes: &[u8]) -> Option<u32> {
    bytes.try_into().ok().map(u32::from_be_bytes)
}

fn be16_at(bytes: &[u8], at: usize) -> Option<u16> {
    let pair = bytes.get(at..at.checked_add(2)?)?;
    pair.try_into().ok().map(u16::from_be_bytes)
}

/// The network header of a logged packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IpHeaders<'a> {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    /// From the transport header on (cut at the copy range); `None` for a non-first
    /// fragment, which has none, or when extension headers could not be walked.
    transport: Option<&'a [u8]>,
}

/// Reads an IPv4 or IPv6 header (by its version nibble).
fn ip_headers(packet: &[u8]) -> Option<IpHeaders<'_>> {
    match packet.first()? >> 4 {
        4 => ipv4(packet),
        6 => ipv6(packet),
        _ => None,
    }
}

fn ipv4(packet: &[u8]) -> Option<IpHeaders<'_>> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
    let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
    let protocol = *packet.get(9)?;
    let fragment_offset = be16_at(packet, 6)? & 0x1fff;
    Some(IpHeaders {
        src: Ipv4Addr::from(src).into(),
        dst: Ipv4Addr::from(dst).into(),
        protocol,
        transport: if fragment_offset == 0 {
            packet.get(ihl..)
        } else {
            None
        },
    })
}

fn ipv6(packet: &[u8]) -> Option<IpHeaders<'_>> {
    let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
    let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
    let (protocol, transport) = ipv6_transport(packet, *packet.get(6)?);
    Some(IpHeaders {
        src: Ipv6Addr::from(src).into(),
        dst: Ipv6Addr::from(dst).into(),
        protocol,
        transport,
    })
}

/// Walks the extension headers after the fixed header: (upper-layer protocol, its header).
fn ipv6_transport(packet: &[u8], mut next: u8) -> (u8, Option<&[u8]>) {
    let mut at = 40;
    for _ in 0..IPV6_MAX_EXTENSIONS {
        let extension = matches!(
            next,
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT
        );
        if !extension {
            return (next, packet.get(at..));
        }
        let Some(&[following, len]) = packet.get(at..at + 2) else {
            return (next, None);
        };
        let len = match next {
            IPV6_AH => (usize::from(len) + 2) * 4,
            IPV6_FRAGMENT => match be16_at(packet, at + 2) {
                Some(offset) if offset >> 3 == 0 => 8,
                // A later fragment: no transport header.
                Some(_) => return (following, None),
                None => return (next, None),
            },
            _ => (usize::from(len) + 1) * 8,
        };
        next = following;
        at += len;
    }
    (next, None)
}

/// (source port, destination port, ICMP type) from a transport header.
fn transport(protocol: u8, header: Option<&[u8]>) -> (Option<u16>, Option<u16>, Option<u8>) {
    let Some(header) = header else {
        return (None, None, None);
    };
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP | IPPROTO_DCCP => {
            (be16_at(header, 0), be16_at(header, 2), None)
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => (None, None, header.first().copied()),
        _ => (None, None, None),
    }
}
