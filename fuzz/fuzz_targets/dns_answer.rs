//! Upstream answers from arbitrary bytes, to a fixed question. Invariants: no panic; an
//! answer is accepted only with the question that was asked; what it teaches starts at
//! the query name, has no duplicate names or IPs, stays within MAX_CHAIN, and only
//! NOERROR answers that are not truncated teach anything.
#![no_main]

use dnsfence_dns::{check_answer, MAX_CHAIN};
use libfuzzer_sys::fuzz_target;

// "www.example.com" A IN.
const QUESTION: &[u8] = b"\x03www\x07example\x03com\x00\x00\x01\x00\x01";

fuzz_target!(|data: &[u8]| {
    // As given, and with a valid header and question in front so records get parsed.
    let mut framed = vec![0x12, 0x34, 0x81, 0x80, 0, 1];
    framed.extend_from_slice(data.get(..6).unwrap_or(data));
    framed.resize(12, 0);
    framed.extend_from_slice(QUESTION);
    framed.extend_from_slice(data.get(6..).unwrap_or_default());
    for packet in [data, &framed[..]] {
        let Ok(answer) = check_answer(QUESTION, packet) else { continue };
        assert!(packet[12..].len() >= QUESTION.len());
        assert!(packet[12..12 + QUESTION.len()].eq_ignore_ascii_case(QUESTION));
        let l = &answer.learned;
        if l.ips.is_empty() {
            continue;
        }
        assert_eq!(answer.rcode, 0);
        assert!(!answer.truncated);
        assert_eq!(l.names[0].as_str(), "www.example.com");
        assert!(l.names.len() <= MAX_CHAIN);
        for (i, n) in l.names.iter().enumerate() {
            assert!(!l.names[..i].contains(n), "duplicate name on the chain");
        }
        for (i, ip) in l.ips.iter().enumerate() {
            assert!(!l.ips[..i].contains(ip), "duplicate IP");
        }
    }
});
