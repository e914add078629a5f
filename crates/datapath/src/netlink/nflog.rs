//! NFLOG messages (`NFNL_SUBSYS_ULOG`), sans I/O: configuration requests (bind a group,
//! copy packets, deliver them one by one), the kernel's answers, and logged packets,
//! parsed into a [`LoggedPacket`]: the prefix, the addresses, the protocol and what the
//! headers say about ports or ICMP type.
//!
//! Payloads are hostile: truncated or odd headers leave fields `None` and never panic.
//! It sends and receives nothing (`sys::nflog` does), and installs no rules.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    error_code, finish_message, put_attr, put_header, put_nfgenmsg, Attrs, Messages, NFGENMSG_LEN,
    NLMSG_ERROR, NLM_F_ACK, NLM_F_REQUEST,
};

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
/// `AF_INET`: the family of a per-family logger command.
pub const AF_INET: u8 = 2;
/// `AF_INET6`.
pub const AF_INET6: u8 = 10;

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

/// A configuration command (`NFULNL_CFG_CMD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Binds the socket to a group.
    Bind,
    /// Binds the family's logger (before Linux 3.17).
    PfBind,
    /// Unbinds the family's logger (before Linux 3.17).
    PfUnbind,
}

/// Encodes into `buf` (emptied first) configuration message `seq`: `command` for
/// `family` and `group` and, with `copy_packets`, the copy mode ([`COPY_RANGE`] bytes of
/// each packet) and a queue threshold of 1; the kernel is asked to acknowledge it.
pub fn config_request(
    buf: &mut Vec<u8>,
    seq: u32,
    family: u8,
    group: u16,
    command: Command,
    copy_packets: bool,
) {
    let cmd = match command {
        Command::Bind => NFULNL_CFG_CMD_BIND,
        Command::PfBind => NFULNL_CFG_CMD_PF_BIND,
        Command::PfUnbind => NFULNL_CFG_CMD_PF_UNBIND,
    };
    buf.clear();
    let ty = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG;
    let start = put_header(buf, ty, NLM_F_REQUEST | NLM_F_ACK, seq);
    put_nfgenmsg(buf, family, group);
    put_attr(buf, NFULA_CFG_CMD, &[cmd]);
    if copy_packets {
        // struct nfulnl_msg_config_mode { __be32 copy_range; __u8 copy_mode; __u8 _pad; }
        let mut config = [0; 6];
        config[..4].copy_from_slice(&COPY_RANGE.to_be_bytes());
        config[4] = NFULNL_COPY_PACKET;
        put_attr(buf, NFULA_CFG_MODE, &config);
        put_attr(buf, NFULA_CFG_QTHRESH, &1u32.to_be_bytes());
    }
    finish_message(buf, start);
}

/// The kernel's answer to a configuration message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Done.
    Ack,
    /// Refused, with this (positive) errno.
    Refused(i32),
    /// An error message too short to hold an errno.
    Malformed,
}

/// What one datagram held besides its logged packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Datagram {
    /// The answer to the configuration message asked about, if the datagram holds it.
    pub answer: Option<Answer>,
    /// Messages skipped because no IP header could be read in them, or because the
    /// datagram was cut in the middle of one (the rest is then skipped).
    pub malformed: u64,
}

/// Appends the packets logged in `datagram` to `out`, and picks out the answer to
/// configuration message `ack`. Other messages (`NLMSG_DONE` ending a multi-part
/// datagram, a stale answer) are skipped.
pub fn read_datagram(datagram: &[u8], ack: Option<u32>, out: &mut Vec<LoggedPacket>) -> Datagram {
    let mut read = Datagram::default();
    for msg in Messages(datagram) {
        let Ok(msg) = msg else {
            read.malformed += 1;
            break;
        };
        if msg.ty == NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET {
            match parse_packet_message(msg.payload) {
                Some(packet) => out.push(packet),
                None => read.malformed += 1,
            }
        } else if msg.ty == NLMSG_ERROR && Some(msg.seq) == ack {
            read.answer = Some(match error_code(msg.payload) {
                Ok(0) => Answer::Ack,
                Ok(code) => Answer::Refused(code),
                Err(_) => Answer::Malformed,
            });
        }
    }
    read
}

/// Whether the kernel (`/proc/sys/kernel/osrelease`) predates Linux 3.17, where a
/// `log group` rule reaches NFLOG only after `NFULNL_CFG_CMD_PF_BIND`.
pub fn needs_pf_bind(release: &str) -> bool {
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

#[cfg(test)]
mod tests;
