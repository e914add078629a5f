//! Encoding set-element changes into nfnetlink batches: runs of one kind on one set
//! become one message each (three or two with [`Strategy::Emulated`]), split so that
//! no batch exceeds its byte limit and no message its elements limit. Only the last
//! element message of a batch asks for an acknowledgement.

use std::net::IpAddr;
use std::time::Duration;

use super::decode::BatchSeqs;
use super::{
    check_name, ELEMENTS_LIMIT, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES,
    NFPROTO_INET, NFTA_DATA_VALUE, NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_TIMEOUT, NFT_MSG_DELSETELEM,
    NFT_MSG_DESTROYSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_NEWSETELEM,
};
use crate::netlink::{
    attr_len, finish_message, nest_end, nest_start, put_attr, put_header, put_nfgenmsg, put_strz,
    CodecError, NFGENMSG_LEN, NLA_HDRLEN, NLMSG_HDRLEN, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REQUEST,
};
/// One change to an element of a set of the table a batch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemOp<'a> {
    /// Adds `ip` to `set`, expiring `timeout` from now (at least 1 ms); when `ip` is
    /// already present its timeout is reset to `timeout`.
    Add {
        /// The set's name.
        set: &'a str,
        /// The element: an IPv4 address for an `ipv4_addr` set, IPv6 for `ipv6_addr`.
        ip: IpAddr,
        /// How long from now the element lives.
        timeout: Duration,
    },
    /// Removes `ip` from `set`; nothing happens if it is absent.
    Delete {
        /// The set's name.
        set: &'a str,
        /// The element.
        ip: IpAddr,
    },
}

impl<'a> ElemOp<'a> {
    /// The set it changes.
    pub fn set(&self) -> &'a str {
        match *self {
            Self::Add { set, .. } | Self::Delete { set, .. } => set,
        }
    }

    /// Whether it adds or deletes.
    pub fn kind(&self) -> ElemKind {
        match self {
            Self::Add { .. } => ElemKind::Add,
            Self::Delete { .. } => ElemKind::Delete,
        }
    }

    pub(crate) fn elem(&self, op: usize) -> Elem {
        match *self {
            Self::Add { ip, timeout, .. } => Elem {
                ip,
                timeout_ms: u64::try_from(timeout.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
                op,
            },
            Self::Delete { ip, .. } => Elem {
                ip,
                timeout_ms: 0,
                op,
            },
        }
    }
}

/// Whether an [`ElemOp`] adds or deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElemKind {
    /// [`ElemOp::Add`].
    Add,
    /// [`ElemOp::Delete`].
    Delete,
}

impl std::fmt::Display for ElemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Add => "add",
            Self::Delete => "delete",
        })
    }
}

/// How a batch obtains "re-add refreshes" and "delete of absent succeeds".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Linux 6.12+: a new-element message without `NLM_F_EXCL` updates the timeout of a
    /// present element, and deletes use `NFT_MSG_DESTROYSETELEM` (6.3+). One message per
    /// run of ops of one kind on one set.
    Native,
    /// Any kernel: an add is sent as add, delete, add (older kernels keep the old timeout
    /// of a present element) and a delete as add, delete, all in the same atomic batch;
    /// duplicates within a run are merged (the last timeout wins). About 3x the bytes.
    Emulated,
}

impl Strategy {
    /// [`Strategy::Native`] for a kernel release (`/proc/sys/kernel/osrelease`) of
    /// Linux 6.12 or later, else [`Strategy::Emulated`] (also when it cannot be read).
    pub fn for_release(release: &str) -> Self {
        let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
        let major = parts.next().and_then(|s| s.parse::<u32>().ok());
        let minor = parts.next().and_then(|s| s.parse::<u32>().ok());
        match (major, minor) {
            (Some(major), Some(minor)) if (major, minor) >= (6, 12) => Self::Native,
            _ => Self::Emulated,
        }
    }

    /// The messages one chunk of elements becomes: (message type, with timeouts).
    pub(crate) fn messages(self, kind: ElemKind) -> &'static [(u16, bool)] {
        match (self, kind) {
            (Self::Native, ElemKind::Add) => &[(NFT_MSG_NEWSETELEM, true)],
            (Self::Native, ElemKind::Delete) => &[(NFT_MSG_DESTROYSETELEM, false)],
            (Self::Emulated, ElemKind::Add) => &[
                (NFT_MSG_NEWSETELEM, false),
                (NFT_MSG_DELSETELEM, false),
                (NFT_MSG_NEWSETELEM, true),
            ],
            (Self::Emulated, ElemKind::Delete) => {
                &[(NFT_MSG_NEWSETELEM, false), (NFT_MSG_DELSETELEM, false)]
            }
        }
    }
}

/// An element about to be encoded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Elem {
    ip: IpAddr,
    /// 0 for deletes.
    pub(crate) timeout_ms: u64,
    /// Index of its op.
    op: usize,
}

impl Elem {
    /// Encoded length: list element { key { value }, [timeout] }.
    fn len(&self, with_timeout: bool) -> usize {
        let addr = match self.ip {
            IpAddr::V4(_) => 4,
            IpAddr::V6(_) => 16,
        };
        3 * NLA_HDRLEN + addr + if with_timeout { NLA_HDRLEN + 8 } else { 0 }
    }
}

/// What a message of a batch carried, to name the op a refusal refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgInfo {
    /// Its sequence number.
    pub seq: u32,
    /// What its ops do.
    pub kind: ElemKind,
    /// Index of the first op it carries.
    pub first: usize,
    /// Index of the last op it carries.
    pub last: usize,
}

/// Encodes batches into a buffer reused across calls; sequence numbers keep counting
/// from one call to the next, so answers to an abandoned batch are told apart.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
    msgs: Vec<MsgInfo>,
    elems: Vec<Elem>,
    seq: u32,
    begin_seq: u32,
    /// Offset of the last element message's header, which gets `NLM_F_ACK`.
    last_msg: usize,
}

impl Encoder {
    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Encodes `ops` for table `table` (family `inet`) into batches of at most `limit`
    /// bytes, handing each to `flush` (bytes, messages, sequence numbers) as soon as it
    /// is complete; stops at the first error `flush` returns. Names are checked before
    /// anything is handed over.
    pub fn encode<E, F>(
        &mut self,
        table: &str,
        ops: &[ElemOp<'_>],
        strategy: Strategy,
        limit: usize,
        mut flush: F,
    ) -> Result<(), E>
    where
        E: From<CodecError>,
        F: FnMut(&[u8], &[MsgInfo], BatchSeqs) -> Result<(), E>,
    {
        check_name(table)?;
        self.begin();
        let mut start = 0;
        while let Some(first) = ops.get(start) {
            let (set, kind) = (first.set(), first.kind());
            check_name(set)?;
            let len = ops[start..]
                .iter()
                .take_while(|op| op.set() == set && op.kind() == kind)
                .count();
            self.load_run(&ops[start..start + len], start, strategy);
            let messages = strategy.messages(kind);
            let mut done = 0;
            while done < self.elems.len() {
                let room = limit.saturating_sub(self.buf.len() + NLMSG_HDRLEN + NFGENMSG_LEN);
                let n = self.fit(done, table, set, messages, room);
                if n == 0 {
                    if self.msgs.is_empty() {
                        // Cannot happen with sane limits: one element is tiny.
                        return Err(CodecError::BatchTooSmall { limit }.into());
                    }
                    let seqs = self.end();
                    flush(&self.buf, &self.msgs, seqs)?;
                    self.begin();
                    continue;
                }
                for &(ty, with_timeout) in messages {
                    self.put_elements(ty, kind, table, set, done..done + n, with_timeout);
                }
                done += n;
            }
            start += len;
        }
        if self.msgs.is_empty() {
            return Ok(());
        }
        let seqs = self.end();
        flush(&self.buf, &self.msgs, seqs)
    }

    /// Loads a run of ops of one kind on one set; the emulated strategy merges
    /// duplicates (its delete would fail on the second copy), keeping the last timeout.
    fn load_run(&mut self, run: &[ElemOp<'_>], first: usize, strategy: Strategy) {
        self.elems.clear();
        self.elems
            .extend(run.iter().enumerate().map(|(i, op)| op.elem(first + i)));
        if strategy == Strategy::Emulated {
            self.elems.sort_by_key(|e| e.ip);
            self.elems.dedup_by(|later, kept| {
                let same = later.ip == kept.ip;
                if same {
                    kept.timeout_ms = later.timeout_ms;
                    kept.op = kept.op.max(later.op);
                }
                same
            });
        }
    }

    /// How many elements from `from` fit in `room` bytes as `messages`.
    fn fit(
        &self,
        from: usize,
        table: &str,
        set: &str,
        messages: &[(u16, bool)],
        room: usize,
    ) -> usize {
        let header = NLMSG_HDRLEN
            + NFGENMSG_LEN
            + attr_len(table.len() + 1)
            + attr_len(set.len() + 1)
            + NLA_HDRLEN;
        let mut total = messages.len() * header;
        let mut largest = 0;
        let mut n = 0;
        for e in &self.elems[from..] {
            let step: usize = messages.iter().map(|&(_, t)| e.len(t)).sum();
            let big = e.len(true);
            if total + step > room || largest + big > ELEMENTS_LIMIT {
                break;
            }
            total += step;
            largest += big;
            n += 1;
        }
        n
    }

    fn begin(&mut self) {
        self.buf.clear();
        self.msgs.clear();
        self.begin_seq = self.next_seq();
        let seq = self.begin_seq;
        self.put_batch_marker(NFNL_MSG_BATCH_BEGIN, seq);
    }

    fn end(&mut self) -> BatchSeqs {
        let ack = self.msgs.last().map_or(self.begin_seq, |m| m.seq);
        if let Some(flags) = self.buf.get_mut(self.last_msg + 6..self.last_msg + 8) {
            let value = u16::from_ne_bytes([flags[0], flags[1]]) | NLM_F_ACK;
            flags.copy_from_slice(&value.to_ne_bytes());
        }
        let end = self.next_seq();
        self.put_batch_marker(NFNL_MSG_BATCH_END, end);
        BatchSeqs {
            begin: self.begin_seq,
            end,
            ack,
        }
    }

    fn put_batch_marker(&mut self, ty: u16, seq: u32) {
        let start = self.put_header(ty, NLM_F_REQUEST, seq);
        put_nfgenmsg(&mut self.buf, 0, NFNL_SUBSYS_NFTABLES);
        self.finish_message(start);
    }

    fn put_elements(
        &mut self,
        ty: u16,
        kind: ElemKind,
        table: &str,
        set: &str,
        range: std::ops::Range<usize>,
        with_timeout: bool,
    ) {
        let seq = self.next_seq();
        let flags = if ty == NFT_MSG_NEWSETELEM {
            NLM_F_REQUEST | NLM_F_CREATE
        } else {
            NLM_F_REQUEST
        };
        let start = self.put_header(NFNL_SUBSYS_NFTABLES << 8 | ty, flags, seq);
        self.last_msg = start;
        put_nfgenmsg(&mut self.buf, NFPROTO_INET, 0);
        put_strz(&mut self.buf, NFTA_SET_ELEM_LIST_TABLE, table);
        put_strz(&mut self.buf, NFTA_SET_ELEM_LIST_SET, set);
        let list = nest_start(&mut self.buf, NFTA_SET_ELEM_LIST_ELEMENTS);
        let (mut first, mut last) = (usize::MAX, 0);
        for e in &self.elems[range] {
            first = first.min(e.op);
            last = last.max(e.op);
            let elem = nest_start(&mut self.buf, NFTA_LIST_ELEM);
            let key = nest_start(&mut self.buf, NFTA_SET_ELEM_KEY);
            match e.ip {
                IpAddr::V4(ip) => put_attr(&mut self.buf, NFTA_DATA_VALUE, &ip.octets()),
                IpAddr::V6(ip) => put_attr(&mut self.buf, NFTA_DATA_VALUE, &ip.octets()),
            }
            nest_end(&mut self.buf, key);
            if with_timeout {
                put_attr(
                    &mut self.buf,
                    NFTA_SET_ELEM_TIMEOUT,
                    &e.timeout_ms.to_be_bytes(),
                );
            }
            nest_end(&mut self.buf, elem);
        }
        nest_end(&mut self.buf, list);
        self.finish_message(start);
        self.msgs.push(MsgInfo {
            seq,
            kind,
            first,
            last,
        });
    }

    /// Encodes a dump request for the elements of set `set` of table `table` (family
    /// `inet`); returns its sequence number and its bytes.
    pub fn list_request(&mut self, table: &str, set: &str) -> Result<(u32, &[u8]), CodecError> {
        check_name(table)?;
        check_name(set)?;
        self.buf.clear();
        let seq = self.next_seq();
        let start = self.put_header(
            NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETSETELEM,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
        );
        put_nfgenmsg(&mut self.buf, NFPROTO_INET, 0);
        put_strz(&mut self.buf, NFTA_SET_ELEM_LIST_TABLE, table);
        put_strz(&mut self.buf, NFTA_SET_ELEM_LIST_SET, set);
        self.finish_message(start);
        Ok((seq, &self.buf))
    }

    fn put_header(&mut self, ty: u16, flags: u16, seq: u32) -> usize {
        put_header(&mut self.buf, ty, flags, seq)
    }

    fn finish_message(&mut self, start: usize) {
        finish_message(&mut self.buf, start);
    }
}
