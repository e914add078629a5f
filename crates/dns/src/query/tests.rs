use super::*;
use dnsfence_testsupport::msg::{header, name, query};

fn parsed(p: &[u8]) -> Query {
    match parse_query(p) {
        ParsedQuery::Query(q) => q,
        other => panic!("{other:?}"),
    }
}

#[test]
fn reads_id_name_type_and_question_end() {
    let p = query(0x4242, "WWW.Example.COM.", 28);
    let q = parsed(&p);
    assert_eq!(q.id, 0x4242);
    assert_eq!(q.name.unwrap().as_str(), "www.example.com");
    assert_eq!((q.qtype, q.qclass), (28, 1));
    assert_eq!(q.question_end, p.len());
}

#[test]
fn names_are_judged_label_by_label() {
    // "evil.com" as ONE label followed by "example.com": must not read as evil.com.example.com.
    let q = parsed(&query(1, "evil\\.com.example.com", 1));
    assert!(q.name.is_err(), "{:?}", q.name);
    let q = parsed(&query(1, "a\\ b.example.com", 1));
    assert!(q.name.is_err());
}

#[test]
fn rejects_what_is_not_one_plain_question() {
    assert!(matches!(parse_query(&[1, 2, 3]), ParsedQuery::Drop));
    // A response is never answered (no reflection loops).
    let mut resp = query(1, "a.com", 1);
    resp[2] |= 0x80;
    assert!(matches!(parse_query(&resp), ParsedQuery::Drop));
    // Two questions.
    let mut two = header(7, 0x0100, 2, 0, 0, 0);
    for _ in 0..2 {
        two.extend(name("a.com"));
        two.extend([0, 1, 0, 1]);
    }
    assert!(matches!(
        parse_query(&two),
        ParsedQuery::Reject {
            rcode: Rcode::FormErr,
            question_end: None
        }
    ));
    // No question.
    assert!(matches!(
        parse_query(&header(7, 0x0100, 0, 0, 0, 0)),
        ParsedQuery::Reject {
            rcode: Rcode::FormErr,
            ..
        }
    ));
    // Truncated question.
    let p = query(7, "example.com", 1);
    assert!(matches!(
        parse_query(&p[..p.len() - 3]),
        ParsedQuery::Reject {
            rcode: Rcode::FormErr,
            ..
        }
    ));
    // Opcode UPDATE.
    let mut upd = query(7, "example.com", 1);
    upd[2] = 5 << 3;
    assert!(matches!(
        parse_query(&upd),
        ParsedQuery::Reject {
            rcode: Rcode::NotImp,
            ..
        }
    ));
}

#[test]
fn compression_loops_and_long_names_are_refused() {
    // Question name is a pointer to itself.
    let mut p = header(9, 0x0100, 1, 0, 0, 0);
    p.extend([0xc0, 12, 0, 1, 0, 1]);
    assert!(matches!(
        parse_query(&p),
        ParsedQuery::Reject {
            rcode: Rcode::FormErr,
            ..
        }
    ));
    // Over 255 bytes on the wire.
    let long = vec!["a".repeat(63); 5].join(".");
    let p = query(9, &long, 1);
    assert!(matches!(
        parse_query(&p),
        ParsedQuery::Reject {
            rcode: Rcode::FormErr,
            ..
        } | ParsedQuery::Query(Query { name: Err(_), .. })
    ));
}

/// A query for `a.example.com` with `ar` additional records given as raw bytes.
fn with_additional(ar: u16, extra: &[u8]) -> Vec<u8> {
    let mut p = header(7, 0x0100, 1, 0, 0, ar);
    p.extend(name("a.example.com"));
    p.extend([0, 1, 0, 1]);
    p.extend_from_slice(extra);
    p
}

fn opt(options: &[u8]) -> Vec<u8> {
    let mut o = vec![0, 0, 41, 0x10, 0, 0, 0, 0, 0];
    o.extend_from_slice(&(options.len() as u16).to_be_bytes());
    o.extend_from_slice(options);
    o
}

fn is_formerr(p: &[u8]) -> bool {
    matches!(
        parse_query(p),
        ParsedQuery::Reject {
            rcode: Rcode::FormErr,
            ..
        }
    )
}

#[test]
fn a_query_carries_nothing_but_its_question_and_a_small_opt() {
    // EDNS with a cookie, as dig sends: fine.
    let cookie = [0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8];
    assert_eq!(parsed(&with_additional(1, &opt(&cookie))).qtype, 1);
    // Bytes after the question, extra records, or large options: a channel, refused.
    assert!(is_formerr(&with_additional(0, b"exfiltrated bytes")));
    assert!(is_formerr(&with_additional(
        1,
        &[opt(&cookie), b"x".to_vec()].concat()
    )));
    assert!(is_formerr(&with_additional(1, &opt(&[0u8; 512]))));
    let mut two = opt(&cookie);
    two.extend(opt(&cookie));
    assert!(is_formerr(&with_additional(2, &two)));
    // Not an OPT record in the additional section.
    let mut txt = name("x.example.com");
    txt.extend([0, 16, 0, 1, 0, 0, 0, 0, 0, 3, 2, b'h', b'i']);
    assert!(is_formerr(&with_additional(1, &txt)));
    // Answer or authority records in a query.
    let mut p = header(7, 0x0100, 1, 1, 0, 0);
    p.extend(name("a.example.com"));
    p.extend([0, 1, 0, 1]);
    assert!(is_formerr(&p));
}

#[test]
fn edns_padding_of_any_length_is_fine_when_it_carries_only_zeros() {
    let padding = |fill: u8| {
        let mut o = vec![0, 12, 0x01, 0x90];
        o.extend([fill; 400]);
        o
    };
    let cookie = [0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8];
    let padded = [&cookie[..], &padding(0)].concat();
    assert_eq!(parsed(&with_additional(1, &opt(&padded))).qtype, 1);
    // Padding that carries data is a channel.
    assert!(is_formerr(&with_additional(1, &opt(&padding(b'x')))));
    // An option running past the record.
    assert!(is_formerr(&with_additional(1, &opt(&[0, 12, 0, 9, 0, 0]))));
}

#[test]
fn a_compressed_question_name_is_refused() {
    // "x" then a pointer to offset 0: the name would be read from the ID, which the proxy
    // rewrites before forwarding.
    let mut p = header(0x0161, 0x0100, 1, 0, 0, 0);
    p.extend([1, b'x', 0xc0, 0]);
    p.extend([0, 1, 0, 1]);
    assert!(is_formerr(&p));
    // A pointer to a name placed after the question is no better.
    let mut p = header(7, 0x0100, 1, 0, 0, 0);
    p.extend([1, b'x', 0xc0, 22, 0, 1, 0, 1]);
    p.extend(name("example.com"));
    assert!(is_formerr(&p));
    // The same name uncompressed is a query.
    let mut p = header(7, 0x0100, 1, 0, 0, 0);
    p.extend(name("x.example.com"));
    p.extend([0, 1, 0, 1]);
    assert_eq!(parsed(&p).qtype, 1);
}
