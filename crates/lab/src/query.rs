//! DNS queries the lab's clients send and the answers they read, with hickory's message
//! codec (the lab is a test harness: it trusts a codec that dnsfence itself does not use).

use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use hickory_server::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{RData, RecordType};

use crate::client::{DnsStatus, Resolution};
use crate::LabError;

/// A recursive query for `name`/`qtype` with a fresh ID.
pub(crate) fn encode(name: &str, qtype: RecordType) -> Result<Vec<u8>, LabError> {
    static NEXT_ID: AtomicU16 = AtomicU16::new(0x1d00);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(crate::dns::name(name)?, qtype));
    message.to_vec().map_err(|e| LabError::Message {
        what: "encoding a query",
        source: Box::new(e),
    })
}

/// The ID of a message (0 when too short).
pub(crate) fn id(message: &[u8]) -> u16 {
    match message {
        [a, b, ..] => u16::from_be_bytes([*a, *b]),
        _ => 0,
    }
}

/// What a test wants to know of an answer.
pub(crate) fn decode(answer: &[u8], elapsed: Duration) -> Result<Resolution, LabError> {
    let message = Message::from_vec(answer).map_err(|e| LabError::Message {
        what: "decoding an answer",
        source: Box::new(e),
    })?;
    let status = match message.metadata.response_code {
        ResponseCode::NoError => DnsStatus::NoError,
        ResponseCode::FormErr => DnsStatus::FormErr,
        ResponseCode::ServFail => DnsStatus::ServFail,
        ResponseCode::NXDomain => DnsStatus::NxDomain,
        ResponseCode::NotImp => DnsStatus::NotImp,
        ResponseCode::Refused => DnsStatus::Refused,
        other => DnsStatus::Other(u16::from(other)),
    };
    let mut ips = Vec::new();
    let mut cnames = Vec::new();
    for record in &message.answers {
        match &record.data {
            RData::A(a) => ips.push(a.0.into()),
            RData::AAAA(aaaa) => ips.push(aaaa.0.into()),
            RData::CNAME(target) => {
                cnames.push(target.0.to_ascii().trim_end_matches('.').to_owned())
            }
            _ => {}
        }
    }
    Ok(Resolution {
        status,
        ips,
        cnames,
        min_ttl: message.answers.iter().map(|r| r.ttl).min(),
        truncated: message.metadata.truncation,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn a_query_round_trips() {
        let q = encode("www.example.com", RecordType::AAAA).unwrap();
        let m = Message::from_vec(&q).unwrap();
        assert_eq!(m.queries[0].name().to_ascii(), "www.example.com.");
        assert_eq!(m.queries[0].query_type(), RecordType::AAAA);
        assert_eq!(id(&q), m.metadata.id);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode(&[1, 2, 3], Duration::ZERO).is_err());
    }
}
