//! Reading a client's query: header checks, the one question, its name folded label by label.

use dnsfence_policy::{FoldedName, NameError};
use domain::base::{Message, ParsedName};

use crate::wire::{self, Rcode, HEADER_LEN};

/// A parsed query, borrowing nothing: what the verdict and the pending table need.
#[derive(Debug, Clone)]
pub struct Query {
    /// The client's message ID.
    pub id: u16,
    /// The question's name, folded; an error when it is not a hostname (it then matches
    /// no pattern, so enforced endpoints are refused).
    pub name: Result<FoldedName, NameError>,
    /// QTYPE.
    pub qtype: u16,
    /// QCLASS.
    pub qclass: u16,
    /// Offset just past the question, to echo it in replies.
    pub question_end: usize,
}

impl Query {
    /// The question's wire bytes in `packet`, the message this query was parsed from.
    pub fn question<'p>(&self, packet: &'p [u8]) -> &'p [u8] {
        packet
            .get(wire::HEADER_LEN..self.question_end)
            .unwrap_or_default()
    }
}

/// What to do with bytes a client sent.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "lives on the stack for one query; boxing would allocate per query"
)]
pub enum ParsedQuery {
    /// A well-formed query with exactly one question.
    Query(Query),
    /// Answer with this rcode, echoing the header (and the question up to the offset, when
    /// it could be read).
    Reject {
        /// The response code.
        rcode: Rcode,
        /// Offset just past the question, when it parsed.
        question_end: Option<usize>,
    },
    /// Not even a header, or a response: send nothing.
    Drop,
}

/// Folds a name parsed from the wire, label by label.
pub fn fold_name<Octs: AsRef<[u8]>>(name: &ParsedName<Octs>) -> Result<FoldedName, NameError> {
    FoldedName::from_labels(name.iter().filter(|l| !l.is_root()).map(|l| l.as_slice()))
}

/// The most bytes of EDNS options a query may carry (cookies and client subnet fit).
pub(crate) const MAX_OPT_OPTIONS: usize = 128;

/// Where the uncompressed name starting at `at` ends (just past its root label); `None`
/// when it holds a compression pointer (or a reserved label type) or runs off the end.
fn uncompressed_name_end(packet: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *packet.get(at)?;
        if len == 0 {
            return Some(at + 1);
        }
        if len & 0xc0 != 0 {
            return None;
        }
        at += 1 + usize::from(len);
    }
}

/// EDNS padding (option 12, RFC 7830), which carries only zeros.
const OPT_PADDING: u16 = 12;

/// Whether a query's EDNS options are well formed and small: padding of any length, if it
/// is all zeros (it carries nothing), and at most [`MAX_OPT_OPTIONS`] bytes of the rest.
fn options_ok(mut options: &[u8]) -> bool {
    let mut other = 0usize;
    while !options.is_empty() {
        let [c0, c1, l0, l1, rest @ ..] = options else {
            return false;
        };
        let len = usize::from(u16::from_be_bytes([*l0, *l1]));
        let Some(data) = rest.get(..len) else {
            return false;
        };
        if u16::from_be_bytes([*c0, *c1]) == OPT_PADDING {
            if data.iter().any(|b| *b != 0) {
                return false;
            }
        } else {
            other += 4 + len;
        }
        options = rest.get(len..).unwrap_or_default();
    }
    other <= MAX_OPT_OPTIONS
}

/// Parses a client's query. Never panics, whatever the bytes.
pub fn parse_query(packet: &[u8]) -> ParsedQuery {
    if packet.len() < HEADER_LEN || wire::is_response(packet) {
        return ParsedQuery::Drop;
    }
    let Ok(msg) = Message::from_octets(packet) else {
        return ParsedQuery::Drop;
    };
    let reject = |rcode, question_end| ParsedQuery::Reject {
        rcode,
        question_end,
    };
    if wire::opcode(packet) != Some(0) {
        return reject(Rcode::NotImp, None);
    }
    if msg.header_counts().qdcount() != 1 {
        return reject(Rcode::FormErr, None);
    }
    let mut questions = msg.question();
    let question = match questions.next() {
        Some(Ok(q)) => q,
        _ => return reject(Rcode::FormErr, None),
    };
    let question_end = questions.pos();
    // The name as it is on the wire, with no compression pointer: a pointer could make
    // the name judged here differ from the one the upstream reads once the ID is
    // rewritten (a pointer into the header), and answers echo the name uncompressed.
    if uncompressed_name_end(packet, HEADER_LEN).map(|end| end + 4) != Some(question_end) {
        return reject(Rcode::FormErr, None);
    }
    // A stub's query is a question and at most an EDNS OPT record: anything else (answer
    // or authority records, other additional records, trailing bytes, large EDNS options)
    // would be a channel to the resolver past the policy, so it is refused.
    let counts = msg.header_counts();
    if counts.ancount() != 0 || counts.nscount() != 0 || counts.arcount() > 1 {
        return reject(Rcode::FormErr, Some(question_end));
    }
    let rest = packet.get(question_end..).unwrap_or_default();
    let rest_ok = if counts.arcount() == 0 {
        rest.is_empty()
    } else {
        // Root owner, type OPT (41), class, TTL, RDLENGTH, then options.
        match rest {
            [0, 0, 41, _, _, _, _, _, _, hi, lo, options @ ..] => {
                let len = usize::from(u16::from_be_bytes([*hi, *lo]));
                len == options.len() && options_ok(options)
            }
            _ => false,
        }
    };
    if !rest_ok {
        return reject(Rcode::FormErr, Some(question_end));
    }
    ParsedQuery::Query(Query {
        id: msg.header().id(),
        name: fold_name(question.qname()),
        qtype: question.qtype().to_int(),
        qclass: question.qclass().to_int(),
        question_end,
    })
}

#[cfg(test)]
mod tests;
