use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::*;
use crate::netlink::{
    NLA_F_NESTED, NLA_HDRLEN, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST,
};

/// Errno values as the kernel sends them (negated in the message).
const ENOENT: i32 = 2;
const EPERM: i32 = 1;

const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

fn add(set: &str, ip: IpAddr, secs: u64) -> ElemOp<'_> {
    ElemOp::Add {
        set,
        ip,
        timeout: Duration::from_secs(secs),
    }
}

fn v6(n: u32) -> IpAddr {
    let mut o = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    o[12..].copy_from_slice(&n.to_be_bytes());
    IpAddr::V6(Ipv6Addr::from(o))
}

/// Encodes `ops` and returns each batch's bytes and messages.
fn batches(
    ops: &[ElemOp<'_>],
    strategy: Strategy,
    limit: usize,
) -> Vec<(Vec<u8>, Vec<MsgInfo>, BatchSeqs)> {
    let mut enc = Encoder::default();
    let mut out = Vec::new();
    enc.encode("t", ops, strategy, limit, |b, m, s| {
        out.push((b.to_vec(), m.to_vec(), s));
        Ok::<(), CodecError>(())
    })
    .unwrap();
    out
}

/// (type, flags, seq, payload) of each message of a batch.
fn headers(batch: &[u8]) -> Vec<(u16, u16, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = batch;
    while !rest.is_empty() {
        let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
        assert_eq!(len % 4, 0, "message length {len} not aligned");
        let ty = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
        let flags = u16::from_ne_bytes(rest[6..8].try_into().unwrap());
        let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
        out.push((ty, flags, seq, rest[16..len].to_vec()));
        rest = &rest[len..];
    }
    out
}

fn attr(out: &mut Vec<u8>, len: u16, ty: u16) {
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
}

#[test]
fn one_add_has_the_exact_layout() {
    let b = batches(&[add("s", V4, 5)], Strategy::Native, BATCH_LIMIT);
    assert_eq!(b.len(), 1);
    let (bytes, msgs, seqs) = &b[0];
    assert_eq!(bytes.len(), 20 + 68 + 20);
    let m = headers(bytes);
    assert_eq!(m.len(), 3);

    assert_eq!((m[0].0, m[0].1), (0x10, NLM_F_REQUEST));
    assert_eq!(
        m[0].3,
        [0, 0, 0, 10],
        "batch begin: AF_UNSPEC, res_id NFTABLES (be16)"
    );
    assert_eq!((m[2].0, m[2].1), (0x11, NLM_F_REQUEST));
    assert_eq!(m[2].3, [0, 0, 0, 10]);

    assert_eq!(m[1].0, 10 << 8 | 12, "NFT_MSG_NEWSETELEM");
    assert_eq!(m[1].1, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK);
    let mut want = vec![1, 0, 0, 0]; // inet, v0, res_id 0
    attr(&mut want, 6, 1); // table
    want.extend_from_slice(b"t\0\0\0");
    attr(&mut want, 6, 2); // set
    want.extend_from_slice(b"s\0\0\0");
    attr(&mut want, 32, 3 | NLA_F_NESTED); // elements
    attr(&mut want, 28, 1 | NLA_F_NESTED); // list elem
    attr(&mut want, 12, 1 | NLA_F_NESTED); // key
    attr(&mut want, 8, 1); // data value
    want.extend_from_slice(&[192, 0, 2, 1]);
    attr(&mut want, 12, 4); // timeout
    want.extend_from_slice(&5000u64.to_be_bytes());
    assert_eq!(m[1].3, want);

    assert_eq!(
        (m[0].2 + 1, m[0].2 + 2),
        (m[1].2, m[2].2),
        "consecutive seqs"
    );
    assert_eq!(
        *seqs,
        BatchSeqs {
            begin: m[0].2,
            end: m[2].2,
            ack: m[1].2
        }
    );
    assert_eq!(
        msgs,
        &[MsgInfo {
            seq: m[1].2,
            kind: ElemKind::Add,
            first: 0,
            last: 0
        }]
    );
}

#[test]
fn native_delete_destroys_a_key_without_timeout() {
    let b = batches(
        &[ElemOp::Delete {
            set: "s",
            ip: v6(1),
        }],
        Strategy::Native,
        BATCH_LIMIT,
    );
    let m = headers(&b[0].0);
    assert_eq!(m[1].0, 10 << 8 | 30, "NFT_MSG_DESTROYSETELEM");
    assert_eq!(m[1].1, NLM_F_REQUEST | NLM_F_ACK);
    // nfgenmsg 4 + table 8 + set 8 + elements (4 + list 4 + key 4 + value 4 + 16).
    assert_eq!(m[1].3.len(), 4 + 8 + 8 + 32);
}

#[test]
fn emulated_add_is_add_delete_add_and_only_the_last_message_is_acked() {
    let b = batches(&[add("s", V4, 5)], Strategy::Emulated, BATCH_LIMIT);
    let m = headers(&b[0].0);
    let types: Vec<u16> = m.iter().map(|h| h.0 & 0xff).collect();
    assert_eq!(types, [0x10, 12, 14, 12, 0x11]);
    let acked: Vec<bool> = m.iter().map(|h| h.1 & NLM_F_ACK != 0).collect();
    assert_eq!(acked, [false, false, false, true, false]);
    // Only the last add carries the timeout (12 bytes more).
    assert_eq!(m[1].3.len(), m[2].3.len());
    assert_eq!(m[3].3.len(), m[1].3.len() + 12);
    assert_eq!(b[0].2.ack, m[3].2);
}

#[test]
fn emulated_merges_duplicates_and_the_last_timeout_wins() {
    let ops = [add("s", V4, 5), add("s", v6(1), 5), add("s", V4, 9)];
    let b = batches(&ops, Strategy::Emulated, BATCH_LIMIT);
    let m = headers(&b[0].0);
    let last_add = &m[3].3;
    // One v4 (28) and one v6 (40) element.
    assert_eq!(last_add.len(), 4 + 8 + 8 + 4 + 28 + 40);
    let mut out = Vec::new();
    parse_elements(last_add, &mut out).unwrap();
    let v4 = out.iter().find(|e| e.ip == V4).unwrap();
    assert_eq!(v4.timeout, Some(Duration::from_secs(9)));
    assert_eq!(out.len(), 2);
}

#[test]
fn runs_of_one_set_and_kind_become_one_message_each_in_order() {
    let ops = [
        add("a", V4, 1),
        add("a", v6(1), 1),
        add("b", V4, 1),
        ElemOp::Delete { set: "a", ip: V4 },
        add("a", V4, 1),
    ];
    let b = batches(&ops, Strategy::Native, BATCH_LIMIT);
    assert_eq!(b.len(), 1);
    let spans: Vec<(ElemKind, usize, usize)> =
        b[0].1.iter().map(|m| (m.kind, m.first, m.last)).collect();
    assert_eq!(
        spans,
        [
            (ElemKind::Add, 0, 1),
            (ElemKind::Add, 2, 2),
            (ElemKind::Delete, 3, 3),
            (ElemKind::Add, 4, 4)
        ]
    );
    let sets: Vec<Vec<u8>> = headers(&b[0].0)[1..5]
        .iter()
        .map(|h| h.3[16..17].to_vec())
        .collect();
    assert_eq!(sets, [b"a", b"b", b"a", b"a"]);
}

#[test]
fn large_applies_split_into_batches_and_messages_within_limits() {
    let ips: Vec<IpAddr> = (0..10_000).map(v6).collect();
    for strategy in [Strategy::Native, Strategy::Emulated] {
        let ops: Vec<ElemOp<'_>> = ips.iter().map(|&ip| add("s", ip, 60)).collect();
        let b = batches(&ops, strategy, BATCH_LIMIT);
        assert!(b.len() > 1, "{strategy:?}");
        let mut adds_with_timeout = 0;
        for (bytes, msgs, seqs) in &b {
            assert!(bytes.len() <= BATCH_LIMIT, "{} bytes", bytes.len());
            let m = headers(bytes);
            assert_eq!(m.first().unwrap().0, NFNL_MSG_BATCH_BEGIN);
            assert_eq!(m.last().unwrap().0, NFNL_MSG_BATCH_END);
            assert_eq!(m.len(), msgs.len() + 2);
            let acked: Vec<u32> = m
                .iter()
                .filter(|h| h.1 & NLM_F_ACK != 0)
                .map(|h| h.2)
                .collect();
            assert_eq!(acked, [seqs.ack]);
            for h in &m[1..m.len() - 1] {
                let elements = &h.3[20..];
                let nest = usize::from(u16::from_ne_bytes([elements[0], elements[1]]));
                assert_eq!(nest, elements.len());
                assert!(nest <= ELEMENTS_LIMIT + NLA_HDRLEN);
                if h.0 & 0xff == NFT_MSG_NEWSETELEM && !h.3.is_empty() {
                    let mut out = Vec::new();
                    parse_elements(&h.3, &mut out).unwrap();
                    adds_with_timeout += out.iter().filter(|e| e.timeout.is_some()).count();
                }
            }
        }
        assert_eq!(adds_with_timeout, 10_000, "{strategy:?}");
    }
}

#[test]
fn no_ops_send_nothing() {
    assert!(batches(&[], Strategy::Native, BATCH_LIMIT).is_empty());
}

#[test]
fn bad_names_are_refused_before_encoding() {
    let mut enc = Encoder::default();
    let long = "x".repeat(256);
    for (table, set) in [("", "s"), ("t", "a\0b"), (long.as_str(), "s"), ("t", "")] {
        let r = enc.encode(
            table,
            &[add(set, V4, 1)],
            Strategy::Native,
            BATCH_LIMIT,
            |_, _, _| -> Result<(), CodecError> { panic!("sent") },
        );
        assert!(
            matches!(r, Err(CodecError::InvalidName { .. })),
            "{table:?} {set:?}"
        );
    }
}

fn error_msg(seq: u32, errno: i32) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&36u32.to_ne_bytes());
    m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&(-errno).to_ne_bytes());
    m.extend_from_slice(&[0; 16]); // the original header (capped)
    m
}

#[test]
fn answers_report_the_first_error_of_the_batch_and_skip_stale_ones() {
    let seqs = BatchSeqs {
        begin: 10,
        end: 14,
        ack: 13,
    };
    let mut a = Answers::new(seqs);
    a.read(&error_msg(3, 2)).unwrap(); // an earlier, abandoned batch
    assert_eq!((a.is_done(), a.first_error()), (false, None));
    let mut two = error_msg(12, 22);
    two.extend(error_msg(11, 2));
    a.read(&two).unwrap();
    assert!(!a.is_done());
    a.read(&error_msg(13, 0)).unwrap();
    assert!(a.is_done());
    assert_eq!(a.first_error(), Some((11, ENOENT)));
}

#[test]
fn a_refused_batch_begin_ends_the_wait() {
    let seqs = BatchSeqs {
        begin: u32::MAX,
        end: 1,
        ack: 0,
    };
    let mut a = Answers::new(seqs);
    a.read(&error_msg(u32::MAX, 1)).unwrap();
    assert!(a.is_done());
    assert_eq!(a.first_error(), Some((u32::MAX, EPERM)));
}

#[test]
fn truncated_answers_are_malformed() {
    let m = error_msg(1, 2);
    let mut a = Answers::new(BatchSeqs {
        begin: 1,
        end: 1,
        ack: 1,
    });
    assert!(matches!(a.read(&m[..20]), Err(CodecError::Malformed)));
    let mut short = m.clone();
    short[0] = 200; // longer than the datagram
    assert!(matches!(a.read(&short), Err(CodecError::Malformed)));
}

#[test]
fn dumped_elements_are_parsed() {
    let mut enc = Encoder::default();
    let ops = [add("s", v6(7), 30), add("s", V4, 2)];
    enc.encode("t", &ops, Strategy::Native, BATCH_LIMIT, |b, _, _| {
        let m = headers(b);
        let mut payload = m[1].3.clone();
        let mut out = Vec::new();
        parse_elements(&payload, &mut out).unwrap();
        assert_eq!(
            out,
            [
                ListedElem {
                    ip: v6(7),
                    timeout: Some(Duration::from_secs(30)),
                    expires: None
                },
                ListedElem {
                    ip: V4,
                    timeout: Some(Duration::from_secs(2)),
                    expires: None
                }
            ]
        );
        payload.truncate(payload.len() - 3);
        assert!(matches!(
            parse_elements(&payload, &mut out),
            Err(CodecError::Malformed)
        ));
        Ok::<(), CodecError>(())
    })
    .unwrap();
}

#[test]
fn list_request_is_a_dump_of_one_set() {
    let mut enc = Encoder::default();
    let (seq, request) = enc.list_request("t", "s").unwrap();
    let m = headers(request);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].0, 10 << 8 | 13);
    assert_eq!(m[0].1, NLM_F_REQUEST | NLM_F_DUMP);
    assert_eq!(m[0].2, seq);
    assert_eq!(m[0].3.len(), 4 + 8 + 8);
}

#[test]
fn strategy_follows_the_kernel_release() {
    for (release, want) in [
        ("6.18.44-fc-v595", Strategy::Native),
        ("6.12.0", Strategy::Native),
        ("7.0.0-30-generic", Strategy::Native),
        ("6.11.9", Strategy::Emulated),
        ("5.15.0-119-generic\n", Strategy::Emulated),
        ("garbage", Strategy::Emulated),
    ] {
        assert_eq!(Strategy::for_release(release), want, "{release}");
    }
}

#[test]
fn add_timeouts_are_whole_milliseconds_at_least_one() {
    let op = ElemOp::Add {
        set: "s",
        ip: V4,
        timeout: Duration::ZERO,
    };
    assert_eq!(op.elem(0).timeout_ms, 1);
    let op = ElemOp::Add {
        set: "s",
        ip: V4,
        timeout: Duration::MAX,
    };
    assert_eq!(op.elem(0).timeout_ms, u64::MAX);
}

#[test]
fn a_dump_ends_at_done_or_at_a_refusal_of_its_own_request() {
    let mut enc = Encoder::default();
    let mut elements = Vec::new();
    enc.encode(
        "t",
        &[add("s", V4, 2)],
        Strategy::Native,
        BATCH_LIMIT,
        |b, _, _| {
            elements = headers(b)[1].3.clone();
            Ok::<(), CodecError>(())
        },
    )
    .unwrap();
    let message = |ty: u16, seq: u32, payload: &[u8]| {
        let mut m = Vec::new();
        let start = crate::netlink::put_header(&mut m, ty, 0, seq);
        m.extend_from_slice(payload);
        crate::netlink::finish_message(&mut m, start);
        m
    };
    let part = 10 << 8 | NFT_MSG_NEWSETELEM;
    let mut datagram = message(part, 9, &elements);
    datagram.extend(message(part, 8, &elements)); // another request's
    let mut out = Vec::new();
    assert_eq!(read_dump(&datagram, 9, &mut out), Ok(Dump::More));
    assert_eq!(out.len(), 1);
    datagram.extend(message(crate::netlink::NLMSG_DONE, 9, &[]));
    assert_eq!(read_dump(&datagram, 9, &mut out), Ok(Dump::Done));
    assert_eq!(out.len(), 2);
    let refused = message(NLMSG_ERROR, 9, &(-ENOENT).to_ne_bytes());
    assert_eq!(read_dump(&refused, 9, &mut out), Ok(Dump::Refused(ENOENT)));
    let acked = message(NLMSG_ERROR, 9, &0i32.to_ne_bytes());
    assert_eq!(read_dump(&acked, 9, &mut out), Ok(Dump::Done));
    assert_eq!(
        read_dump(&refused[..refused.len() - 1], 9, &mut out),
        Err(CodecError::Malformed)
    );
}
