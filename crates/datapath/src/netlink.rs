//! The netlink wire format of the datapath, sans I/O: messages are encoded into and
//! decoded from byte slices the caller owns. No sockets, no system calls, no clock;
//! `sys` sends and receives the bytes.
//!
//! This module is the framing both families share (`nlmsghdr`, `nfgenmsg`, attributes);
//! [`nftables`] encodes batches of set-element changes and reads the kernel's answers,
//! [`nflog`] encodes NFLOG configuration and parses logged packets.
//!
//! Bytes from the kernel are treated as hostile: every read is checked, a truncated
//! message or attribute is [`CodecError::Malformed`], and nothing panics.

pub mod nflog;
pub mod nftables;

// <linux/netlink.h>
pub(crate) const NLMSG_HDRLEN: usize = 16;
/// `nlmsghdr.nlmsg_type` of an error or acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// `nlmsghdr.nlmsg_type` ending a dump.
pub const NLMSG_DONE: u16 = 3;
/// `nlmsghdr.nlmsg_flags`: a request.
pub const NLM_F_REQUEST: u16 = 0x1;
/// `nlmsghdr.nlmsg_flags`: the sender wants an acknowledgement.
pub const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLA_HDRLEN: usize = 4;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

// <linux/netfilter/nfnetlink.h>
pub(crate) const NFGENMSG_LEN: usize = 4;

/// Bytes that are not a well-formed netlink message, or a request that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A message, attribute or answer that is truncated or inconsistent.
    #[error("malformed answer from the kernel")]
    Malformed,
    /// A table or set name the kernel would refuse.
    #[error("invalid table or set name {name:?} (1 to 255 bytes, no NUL)")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// Not even one element fits in a batch of `limit` bytes.
    #[error("a batch of {limit} bytes cannot hold one element")]
    BatchTooSmall {
        /// The batch size limit asked for.
        limit: usize,
    },
}

/// Writes an `nlmsghdr` with a length to fill in; returns where it starts.
pub(crate) fn put_header(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    start
}

/// Fills in the length of the message [`put_header`] started at `start`.
pub(crate) fn finish_message(buf: &mut [u8], start: usize) {
    let len = u32::try_from(buf.len() - start).unwrap_or(u32::MAX);
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// Writes an `nfgenmsg`: `family`, version 0, `res_id` (big-endian).
pub(crate) fn put_nfgenmsg(buf: &mut Vec<u8>, family: u8, res_id: u16) {
    buf.extend_from_slice(&[family, 0]); // version NFNETLINK_V0
    buf.extend_from_slice(&res_id.to_be_bytes());
}

/// Length of an attribute with `payload` bytes, padding included.
pub(crate) fn attr_len(payload: usize) -> usize {
    align4(NLA_HDRLEN + payload)
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn pad4(buf: &mut Vec<u8>) {
    buf.resize(align4(buf.len()), 0);
}

pub(crate) fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = u16::try_from(NLA_HDRLEN + payload.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    pad4(buf);
}

/// A NUL-terminated string attribute (names are checked: at most 255 bytes).
pub(crate) fn put_strz(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let len = u16::try_from(NLA_HDRLEN + s.len() + 1).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
    pad4(buf);
}

pub(crate) fn nest_start(buf: &mut Vec<u8>, ty: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    start
}

/// Fills in a nest's length (elements are capped by
/// [`nftables::ELEMENTS_LIMIT`], so it fits).
pub(crate) fn nest_end(buf: &mut [u8], start: usize) {
    let len = u16::try_from(buf.len() - start).unwrap_or(u16::MAX);
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// One netlink message of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg<'a> {
    /// `nlmsg_type`.
    pub ty: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// What follows the header, up to the message's length.
    pub payload: &'a [u8],
}

/// The netlink messages of a datagram, in order; a truncated one is
/// [`CodecError::Malformed`] and ends the walk.
#[derive(Debug, Clone)]
pub struct Messages<'a>(pub &'a [u8]);

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Msg<'a>, CodecError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let parsed = (|| {
            let header = self.0.get(..NLMSG_HDRLEN)?;
            let len = usize::try_from(u32::from_ne_bytes(header[0..4].try_into().ok()?)).ok()?;
            let ty = u16::from_ne_bytes(header[4..6].try_into().ok()?);
            let flags = u16::from_ne_bytes(header[6..8].try_into().ok()?);
            let seq = u32::from_ne_bytes(header[8..12].try_into().ok()?);
            let payload = self.0.get(NLMSG_HDRLEN..len)?;
            let rest = self.0.get(align4(len).min(self.0.len())..)?;
            Some((
                Msg {
                    ty,
                    flags,
                    seq,
                    payload,
                },
                rest,
            ))
        })();
        match parsed {
            Some((msg, rest)) => {
                self.0 = rest;
                Some(Ok(msg))
            }
            None => {
                self.0 = &[];
                Some(Err(CodecError::Malformed))
            }
        }
    }
}

/// The attributes in a buffer, in order: (type without flags, payload); a truncated one
/// is [`CodecError::Malformed`] and ends the walk.
#[derive(Debug, Clone)]
pub struct Attrs<'a>(pub &'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), CodecError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.len() < NLA_HDRLEN {
            return None;
        }
        let parsed = (|| {
            let len = usize::from(u16::from_ne_bytes(self.0.get(0..2)?.try_into().ok()?));
            let ty = u16::from_ne_bytes(self.0.get(2..4)?.try_into().ok()?) & NLA_TYPE_MASK;
            let payload = self.0.get(NLA_HDRLEN..len)?;
            let rest = self.0.get(align4(len).min(self.0.len())..)?;
            Some(((ty, payload), rest))
        })();
        match parsed {
            Some((attr, rest)) => {
                self.0 = rest;
                Some(Ok(attr))
            }
            None => {
                self.0 = &[];
                Some(Err(CodecError::Malformed))
            }
        }
    }
}

/// The positive errno of an `NLMSG_ERROR` payload (0 for an acknowledgement).
pub fn error_code(payload: &[u8]) -> Result<i32, CodecError> {
    let code = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .ok_or(CodecError::Malformed)?;
    Ok(code.saturating_neg())
}
