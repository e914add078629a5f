use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;
use dnsfence_testsupport::msg::{a, aaaa, cname, query, response};

fn question(q: &[u8]) -> &[u8] {
    &q[12..]
}

fn names(l: &Learned) -> Vec<&str> {
    l.names.iter().map(|n| n.as_str()).collect()
}

#[test]
fn credits_the_chain_with_the_smallest_ttl() {
    let q = query(1, "www.example.com", 1);
    let r = response(
        &q,
        0,
        &[
            cname("www.example.com", 300, "edge.cdn.example.net"),
            cname("EDGE.cdn.example.net", 120, "e1.cdn.example.net"),
            a("e1.cdn.example.net", 60, [192, 0, 2, 1]),
            a("e1.cdn.example.net", 90, [192, 0, 2, 2]),
        ],
        &[],
    );
    let ans = check_answer(question(&q), &r).unwrap();
    assert_eq!(ans.rcode, 0);
    assert_eq!(
        names(&ans.learned),
        [
            "www.example.com",
            "edge.cdn.example.net",
            "e1.cdn.example.net"
        ]
    );
    assert_eq!(
        &ans.learned.ips[..],
        [
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2))
        ]
    );
    assert_eq!(ans.learned.ttl, 60);
}

#[test]
fn aaaa_and_case_insensitive_question() {
    let q = query(2, "V6.Example.com", 28);
    let mut lower = query(2, "v6.example.com", 28);
    lower[0] = q[0];
    let r = response(
        &lower,
        0,
        &[aaaa("v6.example.com", 30, Ipv6Addr::LOCALHOST)],
        &[],
    );
    let ans = check_answer(question(&q), &r).unwrap();
    assert_eq!(&ans.learned.ips[..], [IpAddr::V6(Ipv6Addr::LOCALHOST)]);
}

#[test]
fn records_off_the_chain_or_outside_the_answer_teach_nothing() {
    let q = query(3, "api.example.com", 1);
    let r = response(
        &q,
        0,
        &[
            a("api.example.com", 60, [192, 0, 2, 10]),
            a("bank.example.org", 60, [198, 51, 100, 1]),
            cname("unrelated.example.com", 60, "x.example.net"),
            a("x.example.net", 60, [198, 51, 100, 2]),
        ],
        &[a("api.example.com", 60, [203, 0, 113, 9])],
    );
    let ans = check_answer(question(&q), &r).unwrap();
    assert_eq!(names(&ans.learned), ["api.example.com"]);
    assert_eq!(
        &ans.learned.ips[..],
        [IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))]
    );
}

#[test]
fn answers_to_other_questions_are_rejected() {
    let q = query(4, "api.example.com", 1);
    let other = query(4, "evil.example.com", 1);
    let r = response(
        &other,
        0,
        &[a("evil.example.com", 60, [192, 0, 2, 66])],
        &[],
    );
    assert_eq!(
        check_answer(question(&q), &r),
        Err(AnswerError::QuestionMismatch)
    );
    let other_type = query(4, "api.example.com", 28);
    let r = response(&other_type, 0, &[], &[]);
    assert_eq!(
        check_answer(question(&q), &r),
        Err(AnswerError::QuestionMismatch)
    );
    // Type and class compare exactly: type 97 is not type 65 (HTTPS, 0x41 = 'A') in
    // another case.
    let https = query(4, "api.example.com", 65);
    let r = response(&query(4, "api.example.com", 97), 0, &[], &[]);
    assert_eq!(
        check_answer(question(&https), &r),
        Err(AnswerError::QuestionMismatch)
    );
    assert!(check_answer(question(&https), &response(&https, 0, &[], &[])).is_ok());
    assert_eq!(
        check_answer(question(&q), &q),
        Err(AnswerError::NotResponse)
    );
    assert_eq!(
        check_answer(question(&q), &q[..5]),
        Err(AnswerError::Malformed)
    );
}

#[test]
fn errors_truncation_and_cname_loops() {
    let q = query(5, "gone.example.com", 1);
    let nx = check_answer(question(&q), &response(&q, 3, &[], &[])).unwrap();
    assert_eq!((nx.rcode, nx.learned.ips.len()), (3, 0));
    let mut tc = response(&q, 0, &[a("gone.example.com", 60, [192, 0, 2, 1])], &[]);
    tc[2] |= 0x02;
    let tc = check_answer(question(&q), &tc).unwrap();
    assert!(tc.truncated);
    assert!(
        tc.learned.ips.is_empty(),
        "a truncated answer teaches nothing"
    );
    let r = response(
        &q,
        0,
        &[
            cname("gone.example.com", 60, "b.example.com"),
            cname("b.example.com", 60, "gone.example.com"),
        ],
        &[],
    );
    let ans = check_answer(question(&q), &r).unwrap();
    assert!(ans.learned.ips.is_empty());
}

#[test]
fn truncated_record_data_never_panics() {
    let q = query(6, "a.example.com", 1);
    let r = response(&q, 0, &[a("a.example.com", 60, [192, 0, 2, 1])], &[]);
    for cut in 0..r.len() {
        let _ = check_answer(question(&q), &r[..cut]);
    }
}

#[test]
fn a_malformed_answer_section_teaches_nothing() {
    let q = query(7, "a.example.com", 1);
    let mut r = response(
        &q,
        0,
        &[
            a("a.example.com", 60, [192, 0, 2, 1]),
            a("a.example.com", 60, [192, 0, 2, 2]),
        ],
        &[],
    );
    // Claim a third record that is not there.
    r[7] = 3;
    let ans = check_answer(question(&q), &r).unwrap();
    assert!(ans.learned.ips.is_empty());
}

/// A wire-format name from raw labels (a label may hold any byte, dots included).
fn wire(labels: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in labels {
        out.push(u8::try_from(l.len()).unwrap());
        out.extend_from_slice(l);
    }
    out.push(0);
    out
}

fn wire_matches(labels: &[&[u8]], folded: &str) -> bool {
    let bytes = wire(labels);
    let mut parser = domain::dep::octseq::Parser::from_ref(&bytes[..]);
    let name = ParsedName::parse_ref(&mut parser).unwrap();
    same_name(&name, &FoldedName::new(folded.as_bytes()).unwrap())
}

#[test]
fn owner_names_compare_label_by_label_in_any_case() {
    assert!(wire_matches(
        &[b"api", b"example", b"com"],
        "api.example.com"
    ));
    assert!(wire_matches(
        &[b"API", b"Example", b"COM"],
        "api.example.com"
    ));
    // A dot inside a label never passes for a separator.
    assert!(!wire_matches(&[b"api.example", b"com"], "api.example.com"));
    assert!(!wire_matches(&[b"api", b"example.com"], "api.example.com"));
    // Prefixes and suffixes are other names.
    assert!(!wire_matches(&[b"example", b"com"], "api.example.com"));
    assert!(!wire_matches(
        &[b"x", b"api", b"example", b"com"],
        "api.example.com"
    ));
    assert!(!wire_matches(&[b"api", b"example"], "api.example.com"));
    assert!(!wire_matches(
        &[b"api", b"example", b"co"],
        "api.example.com"
    ));
    assert!(!wire_matches(
        &[b"api", b"example", b"comm"],
        "api.example.com"
    ));
}

#[test]
fn an_owner_with_a_dotted_label_teaches_nothing() {
    let q = query(1, "api.example.com", 1);
    let answer_owned_by = |owner: &[&[u8]]| {
        let mut r = response(&q, 0, &[], &[]);
        r[7] = 1; // ANCOUNT = 1
        r.extend_from_slice(&wire(owner));
        r.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 9]);
        r
    };
    // The same record under the query name teaches its address...
    let r = answer_owned_by(&[b"api", b"example", b"com"]);
    let ans = check_answer(question(&q), &r).unwrap();
    assert_eq!(
        &ans.learned.ips[..],
        [IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9))]
    );
    // ...but under one label "api.example" then "com", it is another name.
    let r = answer_owned_by(&[b"api.example", b"com"]);
    let ans = check_answer(question(&q), &r).unwrap();
    assert!(ans.learned.ips.is_empty());
}

#[test]
fn only_internet_class_records_teach_and_huge_ttls_count_as_zero() {
    let q = query(4, "api.example.com", 1);
    let owner_len = "api.example.com".len() + 2;
    // The record's class, just after its owner and type.
    let class_at = 12 + question(&q).len() + owner_len + 2;
    let mut r = response(&q, 0, &[a("api.example.com", 60, [192, 0, 2, 3])], &[]);
    assert_eq!(r[class_at..class_at + 2], [0, 1], "the class field");
    r[class_at + 1] = 3; // CH
    let ans = check_answer(question(&q), &r).unwrap();
    assert!(ans.learned.ips.is_empty());
    // RFC 2181: a TTL with its top bit set is zero, not 68 years.
    let r = response(
        &q,
        0,
        &[a("api.example.com", 0x8000_0001, [192, 0, 2, 3])],
        &[],
    );
    let ans = check_answer(question(&q), &r).unwrap();
    assert_eq!((ans.learned.ips.len(), ans.learned.ttl), (1, 0));
    let r = response(
        &q,
        0,
        &[a("api.example.com", 0x7fff_ffff, [192, 0, 2, 3])],
        &[],
    );
    assert_eq!(
        check_answer(question(&q), &r).unwrap().learned.ttl,
        0x7fff_ffff
    );
}

#[test]
fn one_answer_teaches_at_most_its_first_ips() {
    let q = query(4, "many.example.com", 1);
    let records: Vec<_> = (0..MAX_IPS_PER_ANSWER + 50)
        .map(|i| {
            let [_, _, hi, lo] = u32::try_from(i).unwrap().to_be_bytes();
            a("many.example.com", 60, [10, 1, hi, lo])
        })
        .collect();
    let r = response(&q, 0, &records, &[]);
    let ans = check_answer(question(&q), &r).unwrap();
    assert_eq!(ans.learned.ips.len(), MAX_IPS_PER_ANSWER);
    assert_eq!(ans.learned.ips[0], IpAddr::V4(Ipv4Addr::new(10, 1, 0, 0)));
}
