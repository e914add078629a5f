//! The netlink codec from arbitrary bytes. Invariants:
//! - the message and attribute walkers never panic, yield only slices inside what they
//!   walk, and stop after the first malformed item; the batch-answer, dump and NFLOG
//!   readers never panic, and a refusal they report is one of the request's and nonzero;
//! - set-element changes read from the input, encoded, and walked again come back: each
//!   batch within its byte limit, opened and closed by the markers `BatchSeqs` names,
//!   sequence numbers consecutive, only the last element message acknowledged, every
//!   message's elements among the ops it says it carries, and with the native strategy
//!   exactly the adds (with their timeouts) and the deletes, in order.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::time::Duration;

use dnsfence_datapath::netlink::nftables::{
    parse_elements, read_dump, Answers, BatchSeqs, Dump, ElemKind, ElemOp, Encoder, ListedElem,
    MsgInfo, Strategy, BATCH_LIMIT, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES,
    NFT_MSG_DESTROYSETELEM, NFT_MSG_NEWSETELEM,
};
use dnsfence_datapath::netlink::{nflog, Attrs, CodecError, Messages, NLM_F_ACK};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    walk(data);
    answers(data);
    round_trip(data);
});

fn within(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr_range(), inner.as_ptr_range());
    o.start <= i.start && i.end <= o.end
}

/// Attributes nested `depth` levels deep, all inside `buf`.
fn walk_attrs(buf: &[u8], depth: usize) {
    let mut attrs = Attrs(buf);
    while let Some(attr) = attrs.next() {
        let Ok((_, payload)) = attr else {
            assert!(
                attrs.next().is_none(),
                "the walk goes on after a malformed attribute"
            );
            return;
        };
        assert!(within(buf, payload));
        if depth > 0 {
            walk_attrs(payload, depth - 1);
        }
    }
}

fn walk(data: &[u8]) {
    let mut messages = Messages(data);
    let mut count = 0;
    while let Some(msg) = messages.next() {
        let Ok(msg) = msg else {
            assert!(
                messages.next().is_none(),
                "the walk goes on after a malformed message"
            );
            break;
        };
        count += 1;
        // Every message has a 16-byte header, so there are at most len / 16 of them.
        assert!(count * 16 <= data.len());
        assert!(within(data, msg.payload));
        walk_attrs(msg.payload, 3);
        let mut out = Vec::new();
        let _ = parse_elements(msg.payload, &mut out);
        let _ = nflog::parse_packet_message(msg.payload);
    }
    walk_attrs(data, 3);
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    let mut b = [0; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = data.get(at + i).copied().unwrap_or(0);
    }
    u32::from_ne_bytes(b)
}

fn answers(data: &[u8]) {
    let begin = u32_at(data, 0);
    let span = u32_at(data, 4) % 64;
    let seqs = BatchSeqs {
        begin,
        end: begin.wrapping_add(span),
        ack: begin.wrapping_add(span.saturating_sub(1)),
    };
    let body = data.get(8..).unwrap_or_default();
    // The body as one datagram, then as two.
    let mid = body.len() / 2;
    for datagrams in [vec![body], vec![&body[..mid], &body[mid..]]] {
        let mut a = Answers::new(seqs);
        let mut was_done = false;
        let mut first: Option<u32> = None;
        for d in datagrams {
            let _ = a.read(d);
            assert!(!was_done || a.is_done(), "done, then not done");
            was_done = a.is_done();
            if let Some((seq, errno)) = a.first_error() {
                assert!(seqs.contains(seq) && errno != 0, "{seq} {errno}");
                let offset = seq.wrapping_sub(begin);
                assert!(
                    first.is_none_or(|f| offset <= f),
                    "a later error replaced an earlier one"
                );
                first = Some(offset);
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(Dump::Refused(errno)) = read_dump(body, begin, &mut out) {
        assert_ne!(errno, 0);
    }
    let mut packets = Vec::new();
    let read = nflog::read_datagram(body, Some(begin), &mut packets);
    if let Some(nflog::Answer::Refused(errno)) = read.answer {
        assert_ne!(errno, 0);
    }
}

const SETS: [&str; 3] = ["a", "b", "fq_0123456789abcdef_6"];

/// Element changes read from `data`: a tag byte (add or delete, set, family), the
/// address, and for adds a timeout in milliseconds.
fn ops(mut data: &[u8]) -> Vec<ElemOp<'static>> {
    let mut out = Vec::new();
    while let Some((&tag, rest)) = data.split_first() {
        let set = SETS[usize::from(tag >> 1 & 3) % SETS.len()];
        let (ip, rest) = if tag & 8 == 0 {
            let Some((a, rest)) = rest.split_first_chunk::<4>() else {
                break;
            };
            (IpAddr::V4(Ipv4Addr::from(*a)), rest)
        } else {
            let Some((a, rest)) = rest.split_first_chunk::<16>() else {
                break;
            };
            (IpAddr::V6(Ipv6Addr::from(*a)), rest)
        };
        if tag & 1 == 0 {
            let Some((t, rest)) = rest.split_first_chunk::<4>() else {
                break;
            };
            let timeout = Duration::from_millis(u64::from(u32::from_be_bytes(*t)));
            out.push(ElemOp::Add { set, ip, timeout });
            data = rest;
        } else {
            out.push(ElemOp::Delete { set, ip });
            data = rest;
        }
    }
    out
}

/// What the encoder handed over for one batch.
struct Batch {
    bytes: Vec<u8>,
    msgs: Vec<MsgInfo>,
    seqs: BatchSeqs,
}

fn round_trip(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let strategy = if mode & 1 == 0 {
        Strategy::Native
    } else {
        Strategy::Emulated
    };
    let limit = [BATCH_LIMIT, 4096, 300, 100][usize::from(mode >> 1 & 3)];
    let ops = ops(rest);
    let mut batches = Vec::new();
    let result = Encoder::default().encode("dnsfence", &ops, strategy, limit, |b, m, s| {
        batches.push(Batch {
            bytes: b.to_vec(),
            msgs: m.to_vec(),
            seqs: s,
        });
        Ok::<(), CodecError>(())
    });
    match result {
        Ok(()) => {}
        // Only a limit too small for one element (plus the markers) may refuse.
        Err(CodecError::BatchTooSmall { .. }) => {
            assert!(limit <= 300);
            return;
        }
        Err(e) => panic!("{e:?}"),
    }
    assert_eq!(batches.is_empty(), ops.is_empty());
    let mut timed = Vec::new();
    let mut destroyed = Vec::new();
    let mut previous_end: Option<u32> = None;
    for batch in &batches {
        assert!(
            batch.bytes.len() <= limit,
            "{} bytes over {limit}",
            batch.bytes.len()
        );
        if let Some(end) = previous_end {
            assert_eq!(batch.seqs.begin, end.wrapping_add(1));
        }
        previous_end = Some(batch.seqs.end);
        check_batch(batch, &ops, &mut timed, &mut destroyed);
    }
    if strategy == Strategy::Native {
        let adds: Vec<(IpAddr, Option<Duration>)> = ops
            .iter()
            .filter_map(|op| match *op {
                ElemOp::Add { ip, timeout, .. } => {
                    let ms = u64::try_from(timeout.as_millis())
                        .unwrap_or(u64::MAX)
                        .max(1);
                    Some((ip, Some(Duration::from_millis(ms))))
                }
                ElemOp::Delete { .. } => None,
            })
            .collect();
        let deletes: Vec<IpAddr> = ops
            .iter()
            .filter(|op| op.kind() == ElemKind::Delete)
            .map(|op| match *op {
                ElemOp::Add { ip, .. } | ElemOp::Delete { ip, .. } => ip,
            })
            .collect();
        let timed: Vec<_> = timed
            .iter()
            .map(|e: &ListedElem| (e.ip, e.timeout))
            .collect();
        assert_eq!(timed, adds);
        assert_eq!(destroyed, deletes);
    }
}

/// Walks one batch: markers, sequences, the acknowledged message, and each message's
/// elements; collects the elements added with a timeout and those destroyed.
fn check_batch(
    batch: &Batch,
    ops: &[ElemOp<'_>],
    timed: &mut Vec<ListedElem>,
    destroyed: &mut Vec<IpAddr>,
) {
    let msgs: Vec<_> = Messages(&batch.bytes)
        .map(|m| m.expect("an encoded batch walks"))
        .collect();
    assert_eq!(msgs.len(), batch.msgs.len() + 2);
    let (first, last) = (msgs[0], msgs[msgs.len() - 1]);
    assert_eq!(
        (first.ty, first.seq),
        (NFNL_MSG_BATCH_BEGIN, batch.seqs.begin)
    );
    assert_eq!((last.ty, last.seq), (NFNL_MSG_BATCH_END, batch.seqs.end));
    let acked: Vec<u32> = msgs
        .iter()
        .filter(|m| m.flags & NLM_F_ACK != 0)
        .map(|m| m.seq)
        .collect();
    assert_eq!(acked, [batch.seqs.ack]);
    assert_eq!(batch.seqs.ack, msgs[msgs.len() - 2].seq);
    for (i, (msg, info)) in msgs[1..msgs.len() - 1].iter().zip(&batch.msgs).enumerate() {
        let offset = u32::try_from(i + 1).expect("few messages");
        assert_eq!(msg.seq, batch.seqs.begin.wrapping_add(offset));
        assert_eq!(msg.seq, info.seq);
        assert!(batch.seqs.contains(msg.seq));
        assert_eq!(msg.ty >> 8, NFNL_SUBSYS_NFTABLES);
        let carried: Range<usize> = info.first..info.last + 1;
        let run = ops
            .get(carried.clone())
            .expect("the ops a message names exist");
        assert!(run
            .iter()
            .all(|op| op.kind() == info.kind && op.set() == run[0].set()));
        let mut elements = Vec::new();
        parse_elements(msg.payload, &mut elements).expect("encoded elements parse");
        assert!(!elements.is_empty());
        for e in &elements {
            assert!(run.iter().any(|op| match *op {
                ElemOp::Add { ip, .. } | ElemOp::Delete { ip, .. } => ip == e.ip,
            }));
        }
        match msg.ty & 0xff {
            NFT_MSG_NEWSETELEM if elements[0].timeout.is_some() => timed.extend(elements),
            NFT_MSG_DESTROYSETELEM => destroyed.extend(elements.iter().map(|e| e.ip)),
            _ => {}
        }
    }
}
