//! Header fields and the few replies the proxy writes itself, straight on the wire.
//!
//! Allowed queries and their answers are relayed as received with only the ID rewritten;
//! the proxy composes bytes only for its own answers (REFUSED, NXDOMAIN, FORMERR,
//! SERVFAIL, NOTIMP), by copying the query's header and question.

/// DNS header length.
pub const HEADER_LEN: usize = 12;

/// Response codes the proxy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rcode {
    /// 0.
    NoError,
    /// 1: the query could not be parsed.
    FormErr,
    /// 2: internal error, upstream timeout, fairness limit.
    ServFail,
    /// 3: the name does not exist (optional deny answer).
    NxDomain,
    /// 4: opcode not supported.
    NotImp,
    /// 5: policy denies the query.
    Refused,
}

impl Rcode {
    /// The 4-bit value.
    pub fn value(self) -> u8 {
        match self {
            Rcode::NoError => 0,
            Rcode::FormErr => 1,
            Rcode::ServFail => 2,
            Rcode::NxDomain => 3,
            Rcode::NotImp => 4,
            Rcode::Refused => 5,
        }
    }

    /// Lower-case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Rcode::NoError => "noerror",
            Rcode::FormErr => "formerr",
            Rcode::ServFail => "servfail",
            Rcode::NxDomain => "nxdomain",
            Rcode::NotImp => "notimp",
            Rcode::Refused => "refused",
        }
    }
}

/// The message ID, if there is a header.
pub fn id(packet: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*packet.first()?, *packet.get(1)?]))
}

/// Overwrites the message ID. Returns false when the packet is too short.
pub fn set_id(packet: &mut [u8], id: u16) -> bool {
    match packet.get_mut(..2) {
        Some(slot) => {
            slot.copy_from_slice(&id.to_be_bytes());
            true
        }
        None => false,
    }
}

/// Whether the QR (response) bit is set.
pub fn is_response(packet: &[u8]) -> bool {
    packet.get(2).is_some_and(|b| b & 0x80 != 0)
}

/// The opcode.
pub fn opcode(packet: &[u8]) -> Option<u8> {
    packet.get(2).map(|b| (b >> 3) & 0x0f)
}

/// The response code (low 4 bits).
pub fn rcode(packet: &[u8]) -> Option<u8> {
    packet.get(3).map(|b| b & 0x0f)
}

/// Whether the TC (truncated) bit is set.
pub fn is_truncated(packet: &[u8]) -> bool {
    packet.get(2).is_some_and(|b| b & 0x02 != 0)
}

/// Writes into `out` a response to `query` with `rcode`, echoing the ID, opcode, RD and
/// CD bits and, when `question_end` is given, the question (bytes `12..question_end` of the query).
/// Returns the reply's length, or `None` when `query` has no full header or `out` is small.
pub fn write_reply(
    query: &[u8],
    question_end: Option<usize>,
    rcode: Rcode,
    out: &mut [u8],
) -> Option<usize> {
    let header = query.get(..HEADER_LEN)?;
    let question = match question_end {
        Some(end) => query.get(HEADER_LEN..end)?,
        None => &[],
    };
    let len = HEADER_LEN + question.len();
    let dst = out.get_mut(..len)?;
    let (h, q) = dst.split_at_mut(HEADER_LEN);
    h.copy_from_slice(header);
    // QR=1, keep opcode and RD, clear AA/TC; RA=1, Z/AD=0, CD copied (RFC 4035
    // section 3.2.2), rcode.
    let flags0 = header.get(2).copied().unwrap_or(0);
    let flags1 = header.get(3).copied().unwrap_or(0);
    h[2] = 0x80 | (flags0 & 0x78) | (flags0 & 0x01);
    h[3] = 0x80 | (flags1 & 0x10) | rcode.value();
    let qdcount: u16 = u16::from(question_end.is_some());
    h[4..6].copy_from_slice(&qdcount.to_be_bytes());
    h[6..12].fill(0);
    q.copy_from_slice(question);
    // RFC 6891: a query with EDNS gets an OPT record back.
    let Some(do_bit) = question_end.and_then(|end| opt_after(query, end)) else {
        return Some(len);
    };
    let [hi, lo] = EDNS_PAYLOAD.to_be_bytes();
    let opt = [
        0,
        0,
        41,
        hi,
        lo,
        0,
        0,
        if do_bit { 0x80 } else { 0 },
        0,
        0,
        0,
    ];
    out.get_mut(len..len + opt.len())?.copy_from_slice(&opt);
    out.get_mut(10..12)?.copy_from_slice(&1u16.to_be_bytes());
    Some(len + opt.len())
}

/// The UDP payload size the proxy's own replies advertise (the DNS flag day 2020 value).
pub const EDNS_PAYLOAD: u16 = 1232;

/// When the query's bytes from `at` on are exactly one well-formed OPT record: whether it
/// sets the DO bit.
fn opt_after(query: &[u8], at: usize) -> Option<bool> {
    match query.get(at..)? {
        [0, 0, 41, _, _, _, _, flags, _, hi, lo, options @ ..]
            if usize::from(u16::from_be_bytes([*hi, *lo])) == options.len() =>
        {
            Some(flags & 0x80 != 0)
        }
        _ => None,
    }
}

/// Writes a reply with `id`, the RD bit, `question` (wire bytes of one question) and
/// `rcode`, for answers composed without the original query at hand (upstream timeouts).
pub fn write_reply_to(
    id: u16,
    rd: bool,
    question: &[u8],
    rcode: Rcode,
    out: &mut [u8],
) -> Option<usize> {
    let len = HEADER_LEN + question.len();
    let dst = out.get_mut(..len)?;
    let (h, q) = dst.split_at_mut(HEADER_LEN);
    h[..2].copy_from_slice(&id.to_be_bytes());
    h[2] = 0x80 | u8::from(rd);
    h[3] = 0x80 | rcode.value();
    h[4..6].copy_from_slice(&1u16.to_be_bytes());
    h[6..12].fill(0);
    q.copy_from_slice(question);
    Some(len)
}

/// Whether the RD bit is set.
pub fn recursion_desired(packet: &[u8]) -> bool {
    packet.get(2).is_some_and(|b| b & 0x01 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_with_edns_gets_an_opt_record_back() {
        // "a." A IN, then OPT: payload 4096, DO set, a 4-byte option.
        let mut query = vec![
            0, 7, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1, 1, b'a', 0, 0, 1, 0, 1,
        ];
        let question_end = query.len();
        query.extend([0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 4, 0, 99, 0, 0]);
        let mut out = [0u8; 64];
        let n = write_reply(&query, Some(question_end), Rcode::Refused, &mut out).unwrap();
        assert_eq!(&out[10..12], &[0, 1], "ARCOUNT");
        assert_eq!(
            &out[question_end..n],
            &[0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 0]
        );
        // A broken OPT (its length runs past the end) gets none.
        query.truncate(query.len() - 1);
        let n = write_reply(&query, Some(question_end), Rcode::FormErr, &mut out).unwrap();
        assert_eq!((n, &out[10..12]), (question_end, &[0u8, 0][..]));
        // Nor does a reply without the question.
        let n = write_reply(&query, None, Rcode::FormErr, &mut out).unwrap();
        assert_eq!(n, HEADER_LEN);
    }

    #[test]
    fn reply_echoes_id_question_and_rd() {
        // ID 0xbeef, RD, 1 question: "a." A IN.
        let query = [
            0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1,
        ];
        let mut out = [0u8; 64];
        let n = write_reply(&query, Some(query.len()), Rcode::Refused, &mut out).unwrap();
        let r = &out[..n];
        assert_eq!(n, query.len());
        assert_eq!(id(r), Some(0xbeef));
        assert!(is_response(r));
        assert_eq!(r[2] & 0x01, 0x01, "RD copied");
        assert_eq!(rcode(r), Some(5));
        assert_eq!(&r[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&r[12..], &query[12..]);
        assert_eq!(r[3] & 0x10, 0, "CD not set by itself");
        // CD (checking disabled) is copied, AD is not.
        let mut cd = query;
        cd[3] = 0x30;
        let n = write_reply(&cd, Some(cd.len()), Rcode::Refused, &mut out).unwrap();
        assert_eq!(out[..n][3], 0x80 | 0x10 | 5);
        let n = write_reply(&query, None, Rcode::FormErr, &mut out).unwrap();
        assert_eq!(n, HEADER_LEN);
        assert_eq!(&out[4..6], &[0, 0]);
        assert_eq!(
            write_reply(&query[..5], None, Rcode::FormErr, &mut out),
            None
        );
        assert_eq!(
            write_reply(&query, Some(query.len()), Rcode::FormErr, &mut out[..4]),
            None
        );
    }

    #[test]
    fn reply_to_a_question() {
        let question = [1, b'a', 0, 0, 1, 0, 1];
        let mut out = [0u8; 32];
        let n = write_reply_to(7, true, &question, Rcode::ServFail, &mut out).unwrap();
        assert_eq!(
            &out[..n],
            &[0, 7, 0x81, 0x82, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1]
        );
        assert_eq!(
            write_reply_to(7, true, &question, Rcode::ServFail, &mut out[..10]),
            None
        );
    }

    #[test]
    fn id_rewrite() {
        let mut p = [0u8; 12];
        assert!(set_id(&mut p, 0x1234));
        assert_eq!(id(&p), Some(0x1234));
        assert!(!set_id(&mut [0u8; 1], 1));
        assert_eq!(id(&[1]), None);
    }
}
