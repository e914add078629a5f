#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

use super::*;

const V4_SRC: [u8; 4] = [10, 0, 0, 1];
const V4_DST: [u8; 4] = [192, 0, 2, 7];
const V6_SRC: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const V6_DST: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// An IPv4 packet: `options` words of IP options, `fragment` the offset field.
fn ipv4_packet(protocol: u8, options: usize, fragment: u16, l4: &[u8]) -> Vec<u8> {
    let ihl = 5 + options;
    let mut p = vec![0x40 | u8::try_from(ihl).unwrap(), 0, 0, 0, 0, 0];
    p.extend_from_slice(&fragment.to_be_bytes());
    p.extend_from_slice(&[64, protocol, 0, 0]);
    p.extend_from_slice(&V4_SRC);
    p.extend_from_slice(&V4_DST);
    p.extend(std::iter::repeat_n(1, options * 4)); // NOPs
    p.extend_from_slice(l4);
    p
}

/// An IPv6 packet whose first next header is `next`, followed by `rest`.
fn ipv6_packet(next: u8, rest: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0, 0, 0, next, 64];
    p.extend_from_slice(&V6_SRC);
    p.extend_from_slice(&V6_DST);
    p.extend_from_slice(rest);
    p
}

fn ports(src: u16, dst: u16) -> Vec<u8> {
    let mut h = src.to_be_bytes().to_vec();
    h.extend_from_slice(&dst.to_be_bytes());
    h.extend_from_slice(&[0; 16]);
    h
}

/// An `NFULNL_MSG_PACKET` payload: nfgenmsg and attributes.
fn message(family: u8, prefix: &[u8], packet: &[u8], outdev: Option<u32>) -> Vec<u8> {
    let mut m = Vec::new();
    put_nfgenmsg(&mut m, family, 5);
    put_attr(&mut m, 1, &[0x08, 0x00, 3, 0]); // NFULA_PACKET_HDR: ignored
    if let Some(dev) = outdev {
        put_attr(&mut m, NFULA_IFINDEX_OUTDEV, &dev.to_be_bytes());
    }
    put_attr(&mut m, NFULA_PAYLOAD, packet);
    put_attr(&mut m, NFULA_PREFIX, prefix);
    m
}

/// (source, destination, protocol, whether a transport header was found, its fields).
type Summary = (
    IpAddr,
    IpAddr,
    u8,
    bool,
    (Option<u16>, Option<u16>, Option<u8>),
);

fn summary(packet: &[u8]) -> Option<Summary> {
    let h = ip_headers(packet)?;
    Some((
        h.src,
        h.dst,
        h.protocol,
        h.transport.is_some(),
        transport(h.protocol, h.transport),
    ))
}

#[test]
fn ipv4_tcp_udp_icmp() {
    let (src, dst) = (IpAddr::from(V4_SRC), IpAddr::from(V4_DST));
    assert_eq!(
        summary(&ipv4_packet(IPPROTO_TCP, 0, 0, &ports(40000, 443))),
        Some((src, dst, IPPROTO_TCP, true, (Some(40000), Some(443), None)))
    );
    // Options move the transport header.
    assert_eq!(
        summary(&ipv4_packet(IPPROTO_UDP, 2, 0, &ports(5353, 53))),
        Some((src, dst, IPPROTO_UDP, true, (Some(5353), Some(53), None)))
    );
    assert_eq!(
        summary(&ipv4_packet(IPPROTO_ICMP, 0, 0, &[8, 0, 0, 0])),
        Some((src, dst, IPPROTO_ICMP, true, (None, None, Some(8))))
    );
    // An IHL below 5 is not IPv4.
    let mut bad = ipv4_packet(IPPROTO_TCP, 0, 0, &ports(1, 2));
    bad[0] = 0x44;
    assert_eq!(summary(&bad), None);
}

#[test]
fn ipv4_later_fragment_has_no_ports() {
    let (src, dst) = (IpAddr::from(V4_SRC), IpAddr::from(V4_DST));
    assert_eq!(
        summary(&ipv4_packet(IPPROTO_UDP, 0, 185, &ports(1, 2))),
        Some((src, dst, IPPROTO_UDP, false, (None, None, None)))
    );
    // The first fragment (more-fragments flag set, offset 0) has them.
    assert_eq!(
        summary(&ipv4_packet(IPPROTO_UDP, 0, 0x2000, &ports(1, 2))),
        Some((src, dst, IPPROTO_UDP, true, (Some(1), Some(2), None)))
    );
}

#[test]
fn ipv6_tcp_after_extension_headers() {
    let mut rest = vec![IPV6_DSTOPTS, 0, 1, 4, 0, 0, 0, 0]; // hop-by-hop, 8 bytes
    rest.extend_from_slice(&[IPV6_ROUTING, 1]); // destination options, 16 bytes
    rest.extend_from_slice(&[1; 14]);
    rest.extend_from_slice(&[IPV6_AH, 0, 4, 0, 0, 0, 0, 0]); // routing, 8 bytes
    rest.extend_from_slice(&[IPPROTO_TCP, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // AH, 12 bytes
    rest.extend_from_slice(&ports(50000, 8443));
    assert_eq!(
        summary(&ipv6_packet(IPV6_HOPOPTS, &rest)),
        Some((
            IpAddr::from(V6_SRC),
            IpAddr::from(V6_DST),
            IPPROTO_TCP,
            true,
            (Some(50000), Some(8443), None)
        ))
    );
}

#[test]
fn ipv6_fragments() {
    let (src, dst) = (IpAddr::from(V6_SRC), IpAddr::from(V6_DST));
    let mut first = vec![IPPROTO_UDP, 0, 0x00, 0x01, 0, 0, 0, 9]; // offset 0, more follow
    first.extend_from_slice(&ports(1234, 53));
    assert_eq!(
        summary(&ipv6_packet(IPV6_FRAGMENT, &first)),
        Some((src, dst, IPPROTO_UDP, true, (Some(1234), Some(53), None)))
    );
    let mut later = vec![IPPROTO_UDP, 0, 0x05, 0x28, 0, 0, 0, 9]; // offset 165 (x8 bytes)
    later.extend_from_slice(&ports(1234, 53));
    assert_eq!(
        summary(&ipv6_packet(IPV6_FRAGMENT, &later)),
        Some((src, dst, IPPROTO_UDP, false, (None, None, None)))
    );
}

#[test]
fn ipv6_icmp_and_endless_extensions() {
    let (src, dst) = (IpAddr::from(V6_SRC), IpAddr::from(V6_DST));
    assert_eq!(
        summary(&ipv6_packet(IPPROTO_ICMPV6, &[128, 0, 0, 0])),
        Some((src, dst, IPPROTO_ICMPV6, true, (None, None, Some(128))))
    );
    let mut rest = Vec::new();
    for _ in 0..100 {
        rest.extend_from_slice(&[IPV6_DSTOPTS, 0, 0, 0, 0, 0, 0, 0]);
    }
    assert_eq!(
        summary(&ipv6_packet(IPV6_DSTOPTS, &rest)),
        Some((src, dst, IPV6_DSTOPTS, false, (None, None, None)))
    );
}

#[test]
fn message_fields() {
    let packet = ipv4_packet(IPPROTO_UDP, 0, 0, &ports(4000, 9999));
    let p = parse_packet_message(&message(AF_INET, b"forged-source\0", &packet, Some(1))).unwrap();
    assert_eq!(
        p,
        LoggedPacket {
            prefix: "forged-source".to_owned(),
            src: IpAddr::from(V4_SRC),
            dst: IpAddr::from(V4_DST),
            protocol: IPPROTO_UDP,
            src_port: Some(4000),
            dst_port: Some(9999),
            icmp_type: None,
            indev: None,
            outdev: Some(1),
        }
    );
    // No NUL, no prefix at all, not IP.
    let p = parse_packet_message(&message(AF_INET, b"x", &packet, None)).unwrap();
    assert_eq!((p.prefix.as_str(), p.outdev), ("x", None));
    let mut m = Vec::new();
    put_nfgenmsg(&mut m, AF_INET, 5);
    put_attr(&mut m, NFULA_PAYLOAD, &packet);
    assert_eq!(parse_packet_message(&m).unwrap().prefix, "");
    assert_eq!(
        parse_packet_message(&message(AF_INET, b"p\0", &[0x50; 40], None)),
        None
    );
}

/// Every truncation of every packet: no panic, fields present only when readable.
#[test]
fn truncated_packets() {
    let mut v6 = vec![IPPROTO_TCP, 0, 0, 0, 0, 0, 0, 0];
    v6.extend_from_slice(&ports(1, 2));
    let packets = [
        ipv4_packet(IPPROTO_TCP, 1, 0, &ports(1, 2)),
        ipv4_packet(IPPROTO_ICMP, 0, 0, &[8, 0]),
        ipv6_packet(IPV6_HOPOPTS, &v6),
        ipv6_packet(IPV6_FRAGMENT, &v6),
    ];
    for packet in &packets {
        let full = ip_headers(packet).unwrap();
        for len in 0..packet.len() {
            let cut = &packet[..len];
            let _ = parse_packet_message(&message(AF_INET6, b"p\0", cut, Some(2)));
            match ip_headers(cut) {
                Some(h) => {
                    assert_eq!((h.src, h.dst), (full.src, full.dst));
                    let (src, dst, icmp) = transport(h.protocol, h.transport);
                    let l4 = len.saturating_sub(packet.len() - full.transport.unwrap().len());
                    assert_eq!(src.is_some(), l4 >= 2 && h.protocol != IPPROTO_ICMP);
                    assert_eq!(dst.is_some(), l4 >= 4 && h.protocol != IPPROTO_ICMP);
                    assert_eq!(icmp.is_some(), l4 >= 1 && h.protocol == IPPROTO_ICMP);
                }
                None => assert!(len < 40, "{len}"),
            }
        }
    }
}

/// Random bytes and random corruptions of valid messages never panic.
#[test]
fn garbage_never_panics() {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let valid = message(
        AF_INET6,
        b"p\0",
        &ipv6_packet(
            IPV6_HOPOPTS,
            &[IPPROTO_UDP, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2],
        ),
        Some(3),
    );
    for round in 0..20_000 {
        let mut bytes = if round % 2 == 0 {
            valid.clone()
        } else {
            let len = usize::try_from(next() % 200).unwrap();
            (0..len).map(|_| next().to_le_bytes()[0]).collect()
        };
        for _ in 0..next() % 4 {
            if let Some(i) = usize::try_from(next()).unwrap().checked_rem(bytes.len()) {
                bytes[i] = next().to_le_bytes()[0];
            }
        }
        let _ = parse_packet_message(&bytes);
        let _ = ip_headers(&bytes);
        for msg in Messages(&bytes) {
            let Ok(msg) = msg else { break };
            let _ = parse_packet_message(msg.payload);
        }
    }
}

#[test]
fn pf_bind_only_before_3_17() {
    assert!(needs_pf_bind("3.16.0-4-amd64"));
    assert!(needs_pf_bind("2.6.32"));
    assert!(!needs_pf_bind("3.17.0"));
    assert!(!needs_pf_bind("6.18.44-fc-v595\n"));
    assert!(!needs_pf_bind(""));
}

#[test]
fn config_requests_ask_for_an_acknowledgement() {
    let mut buf = vec![0xff; 3]; // emptied first
    config_request(&mut buf, 7, 0, 20053, Command::Bind, true);
    let msgs: Vec<_> = Messages(&buf).map(Result::unwrap).collect();
    assert_eq!(msgs.len(), 1);
    let m = msgs[0];
    assert_eq!(
        (m.ty, m.flags, m.seq),
        (4 << 8 | 1, NLM_F_REQUEST | NLM_F_ACK, 7)
    );
    assert_eq!(
        m.payload[..4],
        [0, 0, 0x4e, 0x55],
        "AF_UNSPEC, v0, group (be16)"
    );
    let attrs: Vec<(u16, &[u8])> = Attrs(&m.payload[4..]).map(Result::unwrap).collect();
    assert_eq!(
        attrs,
        [
            (NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND][..]),
            (NFULA_CFG_MODE, &[0, 0, 1, 0, NFULNL_COPY_PACKET, 0][..]),
            (NFULA_CFG_QTHRESH, &[0, 0, 0, 1][..]),
        ]
    );
    config_request(&mut buf, 8, AF_INET6, 0, Command::PfUnbind, false);
    let m = Messages(&buf).next().unwrap().unwrap();
    assert_eq!(m.payload[0], AF_INET6);
    let attrs: Vec<(u16, &[u8])> = Attrs(&m.payload[4..]).map(Result::unwrap).collect();
    assert_eq!(attrs, [(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_PF_UNBIND][..])]);
}

/// A whole message (header included) of type `ty` with `payload`.
fn framed(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    let start = put_header(&mut m, ty, 0, seq);
    m.extend_from_slice(payload);
    finish_message(&mut m, start);
    m
}

#[test]
fn datagrams_yield_packets_the_answer_asked_for_and_a_count_of_the_rest() {
    let packet = ipv4_packet(IPPROTO_UDP, 0, 0, &ports(4000, 53));
    let ty = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET;
    let mut datagram = framed(ty, 0, &message(AF_INET, b"a\0", &packet, None));
    datagram.extend(framed(ty, 0, &message(AF_INET, b"b\0", &[0x50; 40], None)));
    datagram.extend(framed(NLMSG_ERROR, 3, &(-2i32).to_ne_bytes())); // not asked for
    datagram.extend(framed(NLMSG_ERROR, 4, &(-1i32).to_ne_bytes()));
    let mut out = Vec::new();
    let read = read_datagram(&datagram, Some(4), &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].prefix, "a");
    assert_eq!(
        read,
        Datagram {
            answer: Some(Answer::Refused(1)),
            malformed: 1
        }
    );
    let ack = framed(NLMSG_ERROR, 5, &0i32.to_ne_bytes());
    assert_eq!(
        read_datagram(&ack, Some(5), &mut out).answer,
        Some(Answer::Ack)
    );
    let short = framed(NLMSG_ERROR, 5, &[0; 2]);
    assert_eq!(
        read_datagram(&short, Some(5), &mut out).answer,
        Some(Answer::Malformed)
    );
    // Cut in the middle of a message: counted once, the rest skipped.
    let read = read_datagram(&datagram[..datagram.len() - 2], Some(4), &mut out);
    assert_eq!((read.answer, read.malformed), (None, 2));
}
