//! Where a UDP client's replies leave from.
//!
//! Usually a UDP socket: the explicit listener, or a transparent socket bound to the
//! address the pod asked (so the reply comes from it). When another socket on the node
//! already holds that address (a DNS server on the node itself, such as NodeLocal
//! DNSCache), a socket bound there would take some or all of that server's traffic. Those
//! replies are built whole instead, IP and UDP headers included, and sent through a raw
//! socket, which binds nothing.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use dnsfence_dns::wire;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

/// How a client's replies are sent.
#[derive(Clone)]
pub(crate) enum ReplyVia {
    /// Through this UDP socket (its address is the reply's source).
    Socket(Arc<UdpSocket>),
    /// Built whole with source `from` and sent through a raw socket.
    Raw {
        /// The reply's source: the server the client asked.
        from: SocketAddr,
        /// The raw sockets.
        raw: Arc<RawSender>,
    },
}

impl ReplyVia {
    /// Sends one reply to `to`.
    pub(crate) async fn send_to(&self, bytes: &[u8], to: SocketAddr) -> io::Result<()> {
        match self {
            Self::Socket(s) => s.send_to(bytes, to).await.map(drop),
            Self::Raw { from, raw } => raw.send(*from, to, bytes),
        }
    }
}

/// Raw sockets (`IPPROTO_RAW`: the caller writes the IP header) for each family the host
/// has. Sends never wait: a datagram the kernel cannot take at once is dropped (the
/// client asks again), as a full socket buffer would drop it on the way.
pub(crate) struct RawSender {
    v4: Option<Socket>,
    v6: Option<Socket>,
}

/// Hop limit of the replies built here.
const TTL: u8 = 64;

impl RawSender {
    /// Opens the raw sockets (needs `CAP_NET_RAW`). Fails only when neither family can
    /// have one.
    pub(crate) fn new() -> io::Result<Self> {
        let open = |domain: Domain| -> io::Result<Socket> {
            let s = Socket::new(domain, Type::RAW, Some(Protocol::from(255)))?;
            s.set_nonblocking(true)?;
            Ok(s)
        };
        let v4 = open(Domain::IPV4);
        let v6 = open(Domain::IPV6).ok();
        match (v4, v6) {
            (Err(e), None) => Err(e),
            (v4, v6) => Ok(Self { v4: v4.ok(), v6 }),
        }
    }

    /// Sends `payload` as a UDP datagram from `from` to `to`. A reply too large for the
    /// path (the kernel fragments none of these) goes out truncated instead: header and
    /// question with TC set, so the client asks again over TCP.
    pub(crate) fn send(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
        let socket = match to.ip() {
            IpAddr::V4(_) => self.v4.as_ref(),
            IpAddr::V6(_) => self.v6.as_ref(),
        }
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::Unsupported, "no raw socket for this family")
        })?;
        let dst = SocketAddr::new(to.ip(), 0).into();
        let packet = datagram(from, to, payload)?;
        match socket.send_to(&packet, &dst) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EMSGSIZE) => {
                let short = truncated(payload).ok_or(e)?;
                socket.send_to(&datagram(from, to, &short)?, &dst).map(drop)
            }
            sent => sent.map(drop),
        }
    }
}

/// An IP packet carrying `payload` in a UDP datagram from `from` to `to`, checksums
/// computed (the kernel fills in the IPv4 header's own checksum, length and ID).
fn datagram(from: SocketAddr, to: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
    let too_long = || io::Error::new(io::ErrorKind::InvalidInput, "datagram too long");
    let udp_len = u16::try_from(payload.len() + 8).map_err(|_| too_long())?;
    let mut p = Vec::with_capacity(48 + payload.len());
    let pseudo = match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = udp_len.checked_add(20).ok_or_else(too_long)?;
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&total.to_be_bytes());
            // ID, flags and fragment offset, TTL, protocol, checksum.
            p.extend_from_slice(&[0, 0, 0, 0, TTL, 17, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            sum(&s.octets()) + sum(&d.octets())
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&udp_len.to_be_bytes());
            p.extend_from_slice(&[17, TTL]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            sum(&s.octets()) + sum(&d.octets())
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "source and destination of different families",
            ))
        }
    };
    let udp = p.len();
    p.extend_from_slice(&from.port().to_be_bytes());
    p.extend_from_slice(&to.port().to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let total = pseudo + 17 + u64::from(udp_len) + sum(p.get(udp..).unwrap_or_default());
    let checksum = match !fold(total) {
        // Zero means "no checksum" over IPv4 and is invalid over IPv6.
        0 => 0xffff,
        c => c,
    };
    if let Some(c) = p.get_mut(udp + 6..udp + 8) {
        c.copy_from_slice(&checksum.to_be_bytes());
    }
    Ok(p)
}

/// The one's-complement sum of `bytes` as 16-bit words, not yet folded.
fn sum(bytes: &[u8]) -> u64 {
    bytes
        .chunks(2)
        .map(|w| {
            let hi = w.first().copied().unwrap_or(0);
            u64::from(u16::from_be_bytes([hi, w.get(1).copied().unwrap_or(0)]))
        })
        .sum()
}

/// Folds a sum into 16 bits.
fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    u16::try_from(s).unwrap_or(0xffff)
}

/// A reply cut to its header and question, with TC set and no records (RFC 2181 §9).
/// `None` when the question cannot be read.
fn truncated(reply: &[u8]) -> Option<Vec<u8>> {
    let mut at = wire::HEADER_LEN;
    // The first name of a message is never compressed.
    loop {
        let len = usize::from(*reply.get(at)?);
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        at += 1 + len;
    }
    let end = at + 5;
    let mut short = reply.get(..end)?.to_vec();
    if let Some(flags) = short.get_mut(2) {
        *flags |= 0x02;
    }
    if let Some(counts) = short.get_mut(6..12) {
        counts.fill(0);
    }
    Some(short)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]
    use super::*;

    /// Whether the datagram's UDP checksum verifies (sum over pseudo-header and datagram
    /// folds to all ones).
    fn checksum_ok(p: &[u8], header: usize, src: &[u8], dst: &[u8]) -> bool {
        let udp = &p[header..];
        let total =
            sum(src) + sum(dst) + 17 + u64::from(u16::try_from(udp.len()).unwrap()) + sum(udp);
        fold(total) == 0xffff
    }

    #[test]
    fn datagrams_carry_the_addresses_ports_and_a_valid_checksum() {
        let payload = b"\x12\x34\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01x";
        let from: SocketAddr = "169.254.20.10:53".parse().unwrap();
        let to: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let p = datagram(from, to, payload).unwrap();
        assert_eq!(p.len(), 20 + 8 + payload.len());
        assert_eq!((p[0], p[8], p[9]), (0x45, TTL, 17));
        assert_eq!(&p[12..16], &[169, 254, 20, 10]);
        assert_eq!(&p[16..20], &[10, 0, 0, 2]);
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 53);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 40000);
        assert_eq!(
            usize::from(u16::from_be_bytes([p[24], p[25]])),
            8 + payload.len()
        );
        assert_eq!(&p[28..], payload);
        assert!(checksum_ok(&p, 20, &p[12..16], &p[16..20]));

        let from: SocketAddr = "[fd00::53]:53".parse().unwrap();
        let to: SocketAddr = "[fd00::2]:5353".parse().unwrap();
        let p = datagram(from, to, payload).unwrap();
        assert_eq!(p.len(), 40 + 8 + payload.len());
        assert_eq!((p[0], p[6], p[7]), (0x60, 17, TTL));
        assert_eq!(
            usize::from(u16::from_be_bytes([p[4], p[5]])),
            8 + payload.len()
        );
        assert!(checksum_ok(&p, 40, &p[8..24], &p[24..40]));
        // A corrupted byte no longer verifies: the check can fail.
        let mut bad = p.clone();
        bad[50] ^= 1;
        assert!(!checksum_ok(&bad, 40, &bad[8..24], &bad[24..40]));

        assert!(datagram(from, "10.0.0.2:1".parse().unwrap(), payload).is_err());
    }

    #[test]
    fn a_truncated_reply_keeps_header_and_question_with_tc_set() {
        // ID 0x1234, QR RD RA, one question "a." A IN, one answer record after it.
        let mut reply =
            b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01".to_vec();
        let question_end = reply.len();
        reply
            .extend_from_slice(b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x01");
        let short = truncated(&reply).unwrap();
        assert_eq!(short.len(), question_end);
        assert_eq!(&short[..2], &[0x12, 0x34]);
        assert_eq!(short[2], 0x83, "TC set, QR and RD kept");
        assert_eq!(&short[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&short[12..], &reply[12..question_end]);
        // Unreadable questions: cut short, or compressed.
        assert!(truncated(&reply[..15]).is_none());
        assert!(truncated(
            b"\x12\x34\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01"
        )
        .is_none());
    }
}
