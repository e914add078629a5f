//! Checking an upstream's answer against the query that was sent, and what it teaches.
//!
//! Only an answer to the question that was asked teaches anything, and only its answer
//! section does: A/AAAA records whose owner is the query name or a name on the query's
//! CNAME chain. Records elsewhere, or for other names, teach nothing. The TTL is the
//! smallest of the records used.

use std::net::IpAddr;

use dnsfence_policy::FoldedName;
use domain::base::iana::Class;
use domain::base::{Message, ParsedName, Rtype};
use domain::rdata::{Aaaa, Cname, A};
use smallvec::SmallVec;

use crate::query::fold_name;
use crate::wire::{self, HEADER_LEN};

/// Longest CNAME chain followed.
pub const MAX_CHAIN: usize = 16;

/// The most distinct IPs one answer teaches (the first ones in the answer); a larger
/// answer is still relayed whole. Bounds the work one answer costs the cache and the
/// datapath.
pub const MAX_IPS_PER_ANSWER: usize = 256;

/// Why an answer was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// Shorter than a header, or the message cannot be read.
    #[error("malformed answer")]
    Malformed,
    /// The QR bit is not set.
    #[error("not a response")]
    NotResponse,
    /// The question differs from the one sent (a spoofed or stray answer).
    #[error("answer to a different question")]
    QuestionMismatch,
}

/// The name → IP mappings an answer teaches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Learned {
    /// The query name, then each CNAME target in chain order.
    pub names: SmallVec<[FoldedName; 2]>,
    /// Addresses of names on the chain.
    pub ips: SmallVec<[IpAddr; 8]>,
    /// Smallest TTL among the records used, in seconds.
    pub ttl: u32,
}

/// An accepted answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Response code (low 4 bits).
    pub rcode: u8,
    /// Whether TC is set (the client should retry over TCP).
    pub truncated: bool,
    /// What it teaches (empty unless NOERROR with addresses).
    pub learned: Learned,
}

/// Whether `answer` answers `question` (the query's bytes from offset 12 to the end of its
/// question): the name compared ASCII-case-insensitively, the type and class exactly. The
/// question is always the first name of a message, so it is never compressed and plain
/// bytes compare.
fn same_question(answer: &[u8], question: &[u8]) -> bool {
    let Some(name_len) = question.len().checked_sub(4) else {
        return false;
    };
    let (name, type_class) = question.split_at(name_len);
    answer.get(4..6) == Some(&[0, 1][..])
        && answer
            .get(HEADER_LEN..HEADER_LEN + name_len)
            .is_some_and(|a| a.eq_ignore_ascii_case(name))
        && answer.get(HEADER_LEN + name_len..HEADER_LEN + question.len()) == Some(type_class)
}

/// Checks `packet` as the answer to the query whose question bytes are `question`, and
/// extracts what it teaches. Never panics, whatever the bytes.
pub fn check_answer(question: &[u8], packet: &[u8]) -> Result<Answer, AnswerError> {
    if packet.len() < HEADER_LEN {
        return Err(AnswerError::Malformed);
    }
    if !wire::is_response(packet) {
        return Err(AnswerError::NotResponse);
    }
    if !same_question(packet, question) {
        return Err(AnswerError::QuestionMismatch);
    }
    let msg = Message::from_octets(packet).map_err(|_| AnswerError::Malformed)?;
    let rcode = wire::rcode(packet).unwrap_or(0);
    let truncated = wire::is_truncated(packet);
    let mut answer = Answer {
        rcode,
        truncated,
        learned: Learned::default(),
    };
    if rcode != 0 || truncated {
        return Ok(answer);
    }
    let Some(Ok(q)) = msg.question().next() else {
        return Err(AnswerError::Malformed);
    };
    // A query name that is not a hostname teaches nothing.
    if let Ok(qname) = fold_name(q.qname()) {
        answer.learned = learn(&msg, qname);
    }
    Ok(answer)
}

/// Whether `name` (as it came off the wire, any case) is `folded`. Compares label by
/// label, so a label holding a dot never passes for two; a name [`fold_name`] would refuse
/// equals no folded name.
fn same_name(name: &ParsedName<&[u8]>, folded: &FoldedName) -> bool {
    let mut rest = folded.as_bytes();
    for label in name.iter() {
        if label.is_root() {
            break;
        }
        if rest.is_empty() {
            return false;
        }
        let (head, tail) = match rest.iter().position(|&b| b == b'.') {
            Some(dot) => (
                rest.get(..dot).unwrap_or_default(),
                rest.get(dot + 1..).unwrap_or_default(),
            ),
            None => (rest, &[][..]),
        };
        if !label.as_slice().eq_ignore_ascii_case(head) {
            return false;
        }
        rest = tail;
    }
    rest.is_empty()
}

/// Follows the CNAME chain from `qname` and collects the addresses of names on it, in one
/// pass over the answer section. Names are compared as they came off the wire; only the
/// CNAME targets taken into the chain are folded.
fn learn<'a>(msg: &Message<&'a [u8]>, qname: FoldedName) -> Learned {
    type Name<'a> = ParsedName<&'a [u8]>;
    let mut cnames: SmallVec<[(Name<'a>, Name<'a>, u32); 4]> = SmallVec::new();
    let mut addrs: SmallVec<[(Name<'a>, IpAddr, u32); 8]> = SmallVec::new();
    let Ok(section) = msg.answer() else {
        return Learned::default();
    };
    for rr in section {
        let Ok(rr) = rr else {
            // A malformed answer teaches nothing (it is still relayed, as received).
            return Learned::default();
        };
        // Only Internet-class data names Internet addresses.
        if rr.class() != Class::IN {
            continue;
        }
        // RFC 2181 section 8: a TTL with the most significant bit set counts as zero.
        let ttl = match rr.ttl().as_secs() {
            t if t > MAX_TTL => 0,
            t => t,
        };
        match rr.rtype() {
            Rtype::CNAME => {
                if let Ok(Some(r)) = rr.to_record::<Cname<ParsedName<&[u8]>>>() {
                    cnames.push((*r.owner(), *r.data().cname(), ttl));
                }
            }
            Rtype::A => {
                if let Ok(Some(r)) = rr.to_record::<A>() {
                    addrs.push((*r.owner(), IpAddr::V4(r.data().addr()), ttl));
                }
            }
            Rtype::AAAA => {
                if let Ok(Some(r)) = rr.to_record::<Aaaa>() {
                    addrs.push((*r.owner(), IpAddr::V6(r.data().addr()), ttl));
                }
            }
            _ => {}
        }
    }
    let mut learned = Learned {
        names: SmallVec::new(),
        ips: SmallVec::new(),
        ttl: u32::MAX,
    };
    learned.names.push(qname);
    let mut ttl = u32::MAX;
    // Follow CNAMEs: each step takes the first CNAME owned by the last name on the chain
    // whose target is a hostname.
    while learned.names.len() < MAX_CHAIN {
        let Some(last) = learned.names.last() else {
            break;
        };
        let next = cnames
            .iter()
            .filter(|(owner, _, _)| same_name(owner, last))
            .find_map(|(_, target, t)| fold_name(target).ok().map(|f| (f, *t)));
        match next {
            Some((target, t)) if !learned.names.contains(&target) => {
                ttl = ttl.min(t);
                learned.names.push(target);
            }
            _ => break,
        }
    }
    for (owner, ip, t) in &addrs {
        if learned.ips.len() >= MAX_IPS_PER_ANSWER {
            break;
        }
        if learned.names.iter().any(|n| same_name(owner, n)) {
            push_ip(&mut learned.ips, *ip);
            ttl = ttl.min(*t);
        }
    }
    if learned.ips.is_empty() {
        return Learned::default();
    }
    learned.ttl = ttl;
    learned
}

/// The largest TTL a record can carry (RFC 2181: 2^31 - 1 seconds).
const MAX_TTL: u32 = 0x7fff_ffff;

fn push_ip(ips: &mut SmallVec<[IpAddr; 8]>, ip: IpAddr) {
    if !ips.contains(&ip) {
        ips.push(ip);
    }
}

#[cfg(test)]
mod tests;
