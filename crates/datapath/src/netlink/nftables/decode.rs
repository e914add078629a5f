//! Reading what the kernel answers: the acknowledgements and errors of a batch
//! ([`Answers`]), and the elements of a set dump ([`read_dump`], [`parse_elements`]).
//! Answers to other requests (earlier, abandoned ones) are skipped by sequence number.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::{
    NFTA_DATA_VALUE, NFTA_LIST_ELEM, NFTA_SET_ELEM_EXPIRATION, NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_SET_ELEM_TIMEOUT,
};
use crate::netlink::{
    error_code, Attrs, CodecError, Messages, NFGENMSG_LEN, NLMSG_DONE, NLMSG_ERROR,
};

/// The sequence numbers of a sent batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSeqs {
    /// Of the batch-begin message.
    pub begin: u32,
    /// Of the batch-end message.
    pub end: u32,
    /// The message sent with `NLM_F_ACK`: its answer comes last.
    pub ack: u32,
}

impl BatchSeqs {
    /// Whether `seq` is one of the batch's (from `begin` to `end`, wrapping).
    pub fn contains(self, seq: u32) -> bool {
        seq.wrapping_sub(self.begin) <= self.end.wrapping_sub(self.begin)
    }
}

/// What the answers read so far say about one batch.
#[derive(Debug)]
pub struct Answers {
    seqs: BatchSeqs,
    done: bool,
    first_error: Option<(u32, i32)>,
}

impl Answers {
    /// Nothing read yet about the batch `seqs`.
    pub fn new(seqs: BatchSeqs) -> Self {
        Self {
            seqs,
            done: false,
            first_error: None,
        }
    }

    /// Reads one datagram.
    pub fn read(&mut self, datagram: &[u8]) -> Result<(), CodecError> {
        for msg in Messages(datagram) {
            let msg = msg?;
            if msg.ty != NLMSG_ERROR || !self.seqs.contains(msg.seq) {
                continue;
            }
            let code = error_code(msg.payload)?;
            if code != 0 {
                let offset = msg.seq.wrapping_sub(self.seqs.begin);
                let earlier = self
                    .first_error
                    .is_none_or(|(s, _)| offset < s.wrapping_sub(self.seqs.begin));
                if earlier {
                    self.first_error = Some((msg.seq, code));
                }
            }
            if msg.seq == self.seqs.ack || (msg.seq == self.seqs.begin && code != 0) {
                self.done = true;
            }
        }
        Ok(())
    }

    /// Whether the last answer to expect has come: the acknowledged message's, or a
    /// refusal of the whole batch.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The first refusal by sequence: (sequence number, positive errno).
    pub fn first_error(&self) -> Option<(u32, i32)> {
        self.first_error
    }
}

/// An element of a set, as a dump reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedElem {
    /// The address.
    pub ip: IpAddr,
    /// The timeout it was added with, if any.
    pub timeout: Option<Duration>,
    /// The time left before it expires, if it has a timeout.
    pub expires: Option<Duration>,
}

/// Where the answer to a dump request stands after one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dump {
    /// More datagrams follow.
    More,
    /// The dump is complete.
    Done,
    /// The kernel refused it (positive errno: `ENOENT` for a missing table or set).
    Refused(i32),
}

/// Reads one datagram of the answer to the dump request `seq`, appending the elements
/// it holds to `out`.
pub fn read_dump(datagram: &[u8], seq: u32, out: &mut Vec<ListedElem>) -> Result<Dump, CodecError> {
    for msg in Messages(datagram) {
        let msg = msg?;
        if msg.seq != seq {
            continue;
        }
        match msg.ty {
            NLMSG_DONE => return Ok(Dump::Done),
            NLMSG_ERROR => {
                let errno = error_code(msg.payload)?;
                if errno == 0 {
                    return Ok(Dump::Done);
                }
                return Ok(Dump::Refused(errno));
            }
            _ => parse_elements(msg.payload, out)?,
        }
    }
    Ok(Dump::More)
}

/// Appends the elements of one `NEWSETELEM` message of a dump (payload after the
/// `nlmsghdr`) to `out`.
pub fn parse_elements(payload: &[u8], out: &mut Vec<ListedElem>) -> Result<(), CodecError> {
    let attrs = payload.get(NFGENMSG_LEN..).ok_or(CodecError::Malformed)?;
    for attr in Attrs(attrs) {
        let (ty, list) = attr?;
        if ty != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for elem in Attrs(list) {
            let (ty, elem) = elem?;
            if ty == NFTA_LIST_ELEM {
                out.push(parse_element(elem)?);
            }
        }
    }
    Ok(())
}

fn parse_element(elem: &[u8]) -> Result<ListedElem, CodecError> {
    let mut ip = None;
    let (mut timeout, mut expires) = (None, None);
    for attr in Attrs(elem) {
        match attr? {
            (NFTA_SET_ELEM_KEY, key) => {
                for value in Attrs(key) {
                    if let (NFTA_DATA_VALUE, bytes) = value? {
                        ip = address(bytes);
                    }
                }
            }
            (NFTA_SET_ELEM_TIMEOUT, ms) => timeout = millis(ms),
            (NFTA_SET_ELEM_EXPIRATION, ms) => expires = millis(ms),
            _ => {}
        }
    }
    Ok(ListedElem {
        ip: ip.ok_or(CodecError::Malformed)?,
        timeout,
        expires,
    })
}

fn address(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(Ipv4Addr::from(v4).into());
    }
    <[u8; 16]>::try_from(bytes)
        .ok()
        .map(|v6| Ipv6Addr::from(v6).into())
}

fn millis(bytes: &[u8]) -> Option<Duration> {
    let ms = u64::from_be_bytes(bytes.try_into().ok()?);
    Some(Duration::from_millis(ms))
}
