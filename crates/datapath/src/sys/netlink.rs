//! nf_tables set elements over netlink (`NETLINK_NETFILTER`), without spawning `nft`.
//!
//! [`NftSocket::apply`] adds and deletes the learned IPs of `inet` sets (`type ipv4_addr`
//! or `ipv6_addr`, `flags timeout`) in atomic nfnetlink batches and returns once the
//! kernel has committed them, so the DNS proxy can release an answer only after its
//! addresses are allowed. [`NftSocket::list`] dumps a set (tests, status).
//!
//! Semantics callers rely on, on every supported kernel (see [`Strategy`]):
//! - adding an element that is present refreshes its timeout;
//! - deleting an absent element succeeds;
//! - a missing table or set is an error ([`NetlinkError::Rejected`]), never a hang.
//!
//! This module only encodes messages and talks to the socket; it creates no tables or
//! sets. The socket belongs to the network namespace of the thread that opened it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use nix::sys::time::{TimeVal, TimeValLike};

#[cfg(test)]
mod tests;

// <linux/netlink.h>
const NLMSG_HDRLEN: usize = 16;
pub(crate) const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

// <linux/netfilter/nfnetlink.h>, <linux/netfilter/nf_tables.h>
pub(crate) const NFGENMSG_LEN: usize = 4;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFPROTO_INET: u8 = 1;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
/// Linux 6.3+: like `DELSETELEM`, but an absent element is not an error.
const NFT_MSG_DESTROYSETELEM: u16 = 30;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_DATA_VALUE: u16 = 1;
/// `NFT_NAME_MAXLEN - 1`: longer table and set names are refused.
const NAME_MAX: usize = 255;

/// Bytes of one batch (one `sendmsg`); larger applies are split into several batches.
/// Below the 4 MiB send buffer asked for, and well below the default (208 KiB) too.
pub const BATCH_LIMIT: usize = 128 * 1024;
/// Bytes of the elements of one message: the nested attribute's length is a `u16`, and
/// the kernel copies a rejected message back into its error, so keep it moderate.
pub(crate) const ELEMENTS_LIMIT: usize = 32 * 1024;
/// Receive buffer: holds the largest error (a copy of one rejected message) or dump part.
const RX_LEN: usize = 128 * 1024;
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// The kernel answers before `sendmsg` returns; this only guards against a bug.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// One change to an element of a set of the table given to [`NftSocket::apply`].
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
    fn set(&self) -> &'a str {
        match *self {
            Self::Add { set, .. } | Self::Delete { set, .. } => set,
        }
    }

    fn kind(&self) -> ElemKind {
        match self {
            Self::Add { .. } => ElemKind::Add,
            Self::Delete { .. } => ElemKind::Delete,
        }
    }

    fn elem(&self, op: usize) -> Elem {
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

/// How [`NftSocket::apply`] obtains "re-add refreshes" and "delete of absent succeeds".
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
    /// [`Strategy::Native`] on Linux 6.12 or later, else [`Strategy::Emulated`] (also
    /// when the release cannot be read).
    pub fn detect() -> Self {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or(Self::Emulated, |release| Self::for_release(&release))
    }

    fn for_release(release: &str) -> Self {
        let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
        let major = parts.next().and_then(|s| s.parse::<u32>().ok());
        let minor = parts.next().and_then(|s| s.parse::<u32>().ok());
        match (major, minor) {
            (Some(major), Some(minor)) if (major, minor) >= (6, 12) => Self::Native,
            _ => Self::Emulated,
        }
    }

    /// The messages one chunk of elements becomes: (message type, with timeouts).
    fn messages(self, kind: ElemKind) -> &'static [(u16, bool)] {
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

/// An element of a set, as [`NftSocket::list`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedElem {
    /// The address.
    pub ip: IpAddr,
    /// The timeout it was added with, if any.
    pub timeout: Option<Duration>,
    /// The time left before it expires, if it has a timeout.
    pub expires: Option<Duration>,
}

/// An error of [`NftSocket`].
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be opened (no `CAP_NET_ADMIN` shows later, as `EPERM`).
    #[error("cannot open a netfilter netlink socket")]
    Open(#[source] Errno),
    /// A table or set name the kernel would refuse.
    #[error("invalid table or set name {name:?} (1 to 255 bytes, no NUL)")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// `sendmsg` failed.
    #[error("cannot send to the kernel")]
    Send(#[source] Errno),
    /// `recv` failed (`ENOBUFS`: answers were lost, the outcome of the batch is unknown).
    #[error("cannot receive from the kernel")]
    Receive(#[source] Errno),
    /// The kernel did not answer in time (it answers synchronously, so: a bug).
    #[error("no answer from the kernel within {0:?}")]
    NoAnswer(Duration),
    /// The kernel's answer could not be parsed.
    #[error("malformed answer from the kernel")]
    Malformed,
    /// The kernel refused a message; the batch holding it was rolled back as a whole.
    /// Batches before it (when the ops needed several) stay committed: retry the call,
    /// ops are idempotent.
    #[error("{kind} of ops {first}..={last} in set {set} of table {table}")]
    Rejected {
        /// The table.
        table: String,
        /// The set (for a list: the listed set).
        set: String,
        /// What the refused message did.
        kind: ElemKind,
        /// Index in the ops of the first op the message carried.
        first: usize,
        /// Index of the last op it carried.
        last: usize,
        /// The kernel's error: `ENOENT` for a missing table or set, `EINVAL` for an
        /// address of the wrong family, `EPERM` without `CAP_NET_ADMIN`.
        #[source]
        errno: Errno,
    },
    /// The kernel refused a whole batch or its commit.
    #[error("batch for table {table}")]
    BatchRejected {
        /// The table.
        table: String,
        /// The kernel's error.
        #[source]
        errno: Errno,
    },
    /// The kernel refused to list a set.
    #[error("list set {set} of table {table}")]
    List {
        /// The table.
        table: String,
        /// The set.
        set: String,
        /// The kernel's error (`ENOENT` for a missing table or set).
        #[source]
        errno: Errno,
    },
}

/// A netlink socket to nf_tables, with buffers reused across calls.
#[derive(Debug)]
pub struct NftSocket {
    fd: OwnedFd,
    strategy: Strategy,
    enc: Encoder,
    rx: Vec<u8>,
}

impl NftSocket {
    /// Opens a socket in the calling thread's network namespace, where it stays even
    /// when moved to another thread; the [`Strategy`] is detected from the kernel.
    pub fn open() -> Result<Self, NetlinkError> {
        Self::open_with(Strategy::detect())
    }

    /// Like [`NftSocket::open`] with a given [`Strategy`] (tests use both).
    pub fn open_with(strategy: Strategy) -> Result<Self, NetlinkError> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(NetlinkError::Open)?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(NetlinkError::Open)?;
        // Forcing needs CAP_NET_ADMIN, which nf_tables needs anyway; the defaults suffice
        // for the limits above, so failures only cost headroom.
        if socket::setsockopt(&fd, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
            let _ = socket::setsockopt(&fd, sockopt::SndBuf, &SOCKET_BUFFER);
        }
        if socket::setsockopt(&fd, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
            let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &SOCKET_BUFFER);
        }
        let timeout = TimeVal::milliseconds(ANSWER_TIMEOUT.as_millis().try_into().unwrap_or(0));
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).map_err(NetlinkError::Open)?;
        Ok(Self {
            fd,
            strategy,
            enc: Encoder::default(),
            rx: vec![0; RX_LEN],
        })
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Applies `ops` to sets of table `table` (family `inet`) and returns once the kernel
    /// has committed them. Ops go in one atomic batch (all or nothing) unless they exceed
    /// [`BATCH_LIMIT`] bytes (about 4,000 IPv4 adds with [`Strategy::Native`]); then in
    /// several, each atomic, in order, stopping at the first refused one.
    pub fn apply(&mut self, table: &str, ops: &[ElemOp<'_>]) -> Result<(), NetlinkError> {
        let Self {
            fd,
            strategy,
            enc,
            rx,
        } = self;
        enc.encode(table, ops, *strategy, BATCH_LIMIT, |batch, msgs, seqs| {
            send(fd, batch)?;
            let failure = wait_batch(fd, rx, seqs)?;
            match failure {
                None => Ok(()),
                Some((seq, errno)) => Err(rejection(table, ops, msgs, seq, errno)),
            }
        })
    }

    /// The elements of set `set` of table `table` (family `inet`).
    pub fn list(&mut self, table: &str, set: &str) -> Result<Vec<ListedElem>, NetlinkError> {
        check_name(table)?;
        check_name(set)?;
        let seq = self.enc.list_request(table, set);
        send(&self.fd, &self.enc.buf)?;
        let mut out = Vec::new();
        loop {
            let len = recv(&self.fd, &mut self.rx, MsgFlags::empty())?;
            for msg in Messages(self.rx.get(..len).ok_or(NetlinkError::Malformed)?) {
                let msg = msg?;
                if msg.seq != seq {
                    continue;
                }
                match msg.ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = error_code(msg.payload)?;
                        if errno == 0 {
                            return Ok(out);
                        }
                        return Err(NetlinkError::List {
                            table: table.to_owned(),
                            set: set.to_owned(),
                            errno: Errno::from_raw(errno),
                        });
                    }
                    _ => parse_elements(msg.payload, &mut out)?,
                }
            }
        }
    }
}

/// The first refusal of a batch as an error.
fn rejection(
    table: &str,
    ops: &[ElemOp<'_>],
    msgs: &[MsgInfo],
    seq: u32,
    errno: Errno,
) -> NetlinkError {
    match msgs.iter().find(|m| m.seq == seq) {
        Some(m) => NetlinkError::Rejected {
            table: table.to_owned(),
            set: ops.get(m.first).map_or("", |op| op.set()).to_owned(),
            kind: m.kind,
            first: m.first,
            last: m.last,
            errno,
        },
        None => NetlinkError::BatchRejected {
            table: table.to_owned(),
            errno,
        },
    }
}

fn check_name(name: &str) -> Result<(), NetlinkError> {
    if name.is_empty() || name.len() > NAME_MAX || name.contains('\0') {
        return Err(NetlinkError::InvalidName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn send(fd: &OwnedFd, bytes: &[u8]) -> Result<(), NetlinkError> {
    loop {
        match socket::send(fd.as_raw_fd(), bytes, MsgFlags::empty()) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(NetlinkError::Send(e)),
        }
    }
}

fn recv(fd: &OwnedFd, buf: &mut [u8], flags: MsgFlags) -> Result<usize, NetlinkError> {
    loop {
        match socket::recv(fd.as_raw_fd(), buf, flags) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) if !flags.contains(MsgFlags::MSG_DONTWAIT) => {
                return Err(NetlinkError::NoAnswer(ANSWER_TIMEOUT))
            }
            Err(e) => return Err(NetlinkError::Receive(e)),
        }
    }
}

/// The sequence numbers of a sent batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchSeqs {
    begin: u32,
    end: u32,
    /// The message sent with `NLM_F_ACK`: its answer comes last.
    ack: u32,
}

impl BatchSeqs {
    fn contains(self, seq: u32) -> bool {
        seq.wrapping_sub(self.begin) <= self.end.wrapping_sub(self.begin)
    }
}

/// Reads the answers to a batch: the first error (by sequence), or `None` once the
/// acknowledged message is answered without any error. Answers to other (earlier,
/// abandoned) requests are skipped.
fn wait_batch(
    fd: &OwnedFd,
    rx: &mut [u8],
    seqs: BatchSeqs,
) -> Result<Option<(u32, Errno)>, NetlinkError> {
    let mut answers = Answers::new(seqs);
    while !answers.done {
        let len = recv(fd, rx, MsgFlags::empty())?;
        answers.read(rx.get(..len).ok_or(NetlinkError::Malformed)?)?;
    }
    // The kernel processes a batch inside sendmsg and queues its answers in order: a
    // refusal of the whole batch or of its commit first, then the message errors, and the
    // acknowledged (last) message's answer last. Only after a refusal can more follow:
    // drain them, so that the next batch does not skip over them.
    if answers
        .first_error
        .is_some_and(|(seq, _)| seq == seqs.begin)
    {
        loop {
            match recv(fd, rx, MsgFlags::MSG_DONTWAIT) {
                Ok(len) => answers.read(rx.get(..len).ok_or(NetlinkError::Malformed)?)?,
                Err(NetlinkError::Receive(Errno::EAGAIN)) => break,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(answers.first_error)
}

/// What the answers read so far say about one batch.
#[derive(Debug)]
pub(crate) struct Answers {
    seqs: BatchSeqs,
    done: bool,
    first_error: Option<(u32, Errno)>,
}

impl Answers {
    pub(crate) fn new(seqs: BatchSeqs) -> Self {
        Self {
            seqs,
            done: false,
            first_error: None,
        }
    }

    /// Reads one datagram.
    pub(crate) fn read(&mut self, datagram: &[u8]) -> Result<(), NetlinkError> {
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
                    self.first_error = Some((msg.seq, Errno::from_raw(code)));
                }
            }
            if msg.seq == self.seqs.ack || (msg.seq == self.seqs.begin && code != 0) {
                self.done = true;
            }
        }
        Ok(())
    }
}

/// The positive errno of an `NLMSG_ERROR` payload (0 for an acknowledgement).
pub(crate) fn error_code(payload: &[u8]) -> Result<i32, NetlinkError> {
    let code = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .ok_or(NetlinkError::Malformed)?;
    Ok(code.saturating_neg())
}

/// An element about to be encoded.
#[derive(Debug, Clone, Copy)]
struct Elem {
    ip: IpAddr,
    /// 0 for deletes.
    timeout_ms: u64,
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
pub(crate) struct MsgInfo {
    seq: u32,
    kind: ElemKind,
    first: usize,
    last: usize,
}

/// Encodes batches into a buffer reused across calls.
#[derive(Debug, Default)]
pub(crate) struct Encoder {
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

    /// Encodes `ops` into batches of at most `limit` bytes, handing each to `flush`
    /// (bytes, messages, sequence numbers) as soon as it is complete.
    pub(crate) fn encode<F>(
        &mut self,
        table: &str,
        ops: &[ElemOp<'_>],
        strategy: Strategy,
        limit: usize,
        mut flush: F,
    ) -> Result<(), NetlinkError>
    where
        F: FnMut(&[u8], &[MsgInfo], BatchSeqs) -> Result<(), NetlinkError>,
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
                        return Err(NetlinkError::Send(Errno::EMSGSIZE));
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

    /// Encodes a dump request for a set's elements into the buffer; returns its seq.
    fn list_request(&mut self, table: &str, set: &str) -> u32 {
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
        seq
    }

    fn put_header(&mut self, ty: u16, flags: u16, seq: u32) -> usize {
        put_header(&mut self.buf, ty, flags, seq)
    }

    fn finish_message(&mut self, start: usize) {
        finish_message(&mut self.buf, start);
    }
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
fn attr_len(payload: usize) -> usize {
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
fn put_strz(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let len = u16::try_from(NLA_HDRLEN + s.len() + 1).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
    pad4(buf);
}

fn nest_start(buf: &mut Vec<u8>, ty: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    start
}

/// Fills in a nest's length (elements are capped by [`ELEMENTS_LIMIT`], so it fits).
fn nest_end(buf: &mut [u8], start: usize) {
    let len = u16::try_from(buf.len() - start).unwrap_or(u16::MAX);
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// A netlink message received from the kernel.
#[derive(Debug)]
pub(crate) struct Msg<'a> {
    pub(crate) ty: u16,
    pub(crate) seq: u32,
    pub(crate) payload: &'a [u8],
}

/// The netlink messages of a datagram; a truncated one is an error.
pub(crate) struct Messages<'a>(pub(crate) &'a [u8]);

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Msg<'a>, NetlinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let parsed = (|| {
            let header = self.0.get(..NLMSG_HDRLEN)?;
            let len = usize::try_from(u32::from_ne_bytes(header[0..4].try_into().ok()?)).ok()?;
            let ty = u16::from_ne_bytes(header[4..6].try_into().ok()?);
            let seq = u32::from_ne_bytes(header[8..12].try_into().ok()?);
            let payload = self.0.get(NLMSG_HDRLEN..len)?;
            let rest = self.0.get(align4(len).min(self.0.len())..)?;
            Some((Msg { ty, seq, payload }, rest))
        })();
        match parsed {
            Some((msg, rest)) => {
                self.0 = rest;
                Some(Ok(msg))
            }
            None => {
                self.0 = &[];
                Some(Err(NetlinkError::Malformed))
            }
        }
    }
}

/// The attributes in `buf`: (type without flags, payload); a truncated one is an error.
pub(crate) struct Attrs<'a>(pub(crate) &'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), NetlinkError>;

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
                Some(Err(NetlinkError::Malformed))
            }
        }
    }
}

/// Appends the elements of one `NEWSETELEM` message of a dump (payload after the
/// `nlmsghdr`) to `out`.
pub(crate) fn parse_elements(
    payload: &[u8],
    out: &mut Vec<ListedElem>,
) -> Result<(), NetlinkError> {
    let attrs = payload.get(NFGENMSG_LEN..).ok_or(NetlinkError::Malformed)?;
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

fn parse_element(elem: &[u8]) -> Result<ListedElem, NetlinkError> {
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
        ip: ip.ok_or(NetlinkError::Malformed)?,
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
