//! nf_tables set elements over netlink (`NETLINK_NETFILTER`), without spawning `nft`:
//! the socket and its I/O. [`crate::netlink::nftables`] encodes the messages and reads
//! the answers.
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
//! This module only talks to the socket; it creates no tables or sets, and encodes and
//! parses nothing itself. The socket belongs to the network namespace of the thread that
//! opened it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::netlink::nftables::{read_dump, Answers, BatchSeqs, Dump, Encoder, MsgInfo};
pub use crate::netlink::nftables::{ElemKind, ElemOp, ListedElem, Strategy, BATCH_LIMIT};
use crate::netlink::CodecError;

/// Receive buffer: holds the largest error (a copy of one rejected message) or dump part.
const RX_LEN: usize = 128 * 1024;
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// The kernel answers before `sendmsg` returns; this only guards against a bug.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

impl Strategy {
    /// [`Strategy::Native`] on Linux 6.12 or later, else [`Strategy::Emulated`] (also
    /// when the release cannot be read).
    pub fn detect() -> Self {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or(Self::Emulated, |release| Self::for_release(&release))
    }
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

impl From<CodecError> for NetlinkError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::Malformed => Self::Malformed,
            CodecError::InvalidName { name } => Self::InvalidName { name },
            // What sendmsg would say of a message too large for the batch.
            CodecError::BatchTooSmall { .. } => Self::Send(Errno::EMSGSIZE),
        }
    }
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
        let (seq, request) = self.enc.list_request(table, set)?;
        send(&self.fd, request)?;
        let mut out = Vec::new();
        loop {
            let len = recv(&self.fd, &mut self.rx, MsgFlags::empty())?;
            let datagram = self.rx.get(..len).ok_or(NetlinkError::Malformed)?;
            match read_dump(datagram, seq, &mut out)? {
                Dump::More => {}
                Dump::Done => return Ok(out),
                Dump::Refused(errno) => {
                    return Err(NetlinkError::List {
                        table: table.to_owned(),
                        set: set.to_owned(),
                        errno: Errno::from_raw(errno),
                    })
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

/// Reads the answers to a batch: the first error (by sequence), or `None` once the
/// acknowledged message is answered without any error. Answers to other (earlier,
/// abandoned) requests are skipped.
fn wait_batch(
    fd: &OwnedFd,
    rx: &mut [u8],
    seqs: BatchSeqs,
) -> Result<Option<(u32, Errno)>, NetlinkError> {
    let mut answers = Answers::new(seqs);
    while !answers.is_done() {
        let len = recv(fd, rx, MsgFlags::empty())?;
        answers.read(rx.get(..len).ok_or(NetlinkError::Malformed)?)?;
    }
    // The kernel processes a batch inside sendmsg and queues its answers in order: a
    // refusal of the whole batch or of its commit first, then the message errors, and the
    // acknowledged (last) message's answer last. Only after a refusal can more follow:
    // drain them, so that the next batch does not skip over them.
    if answers
        .first_error()
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
    Ok(answers
        .first_error()
        .map(|(seq, errno)| (seq, Errno::from_raw(errno))))
}
