//! Packets the ruleset logs with `log group N prefix "reason"` (NFLOG), read over netlink:
//! the socket and its I/O. [`crate::netlink::nflog`] encodes the messages and parses
//! the packets.
//!
//! [`NflogSocket::open`] binds one NFLOG group of the calling thread's network namespace
//! (groups are per namespace: the same number can be bound once in each) and asks the
//! kernel for the first [`COPY_RANGE`] bytes of each packet, delivered one by one
//! (queue threshold 1), so a drop reaches [`NflogSocket::recv`] without delay.
//! [`parse_packet_message`] turns one message into a [`LoggedPacket`].
//!
//! Only datagrams sent by the kernel (port id 0) are read, so another process of the
//! namespace cannot forge events. This module installs no rules.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::netlink::nflog::{
    config_request, needs_pf_bind, read_datagram, Answer, Command, AF_INET, AF_INET6,
};
pub use crate::netlink::nflog::{parse_packet_message, LoggedPacket, COPY_RANGE};

/// Receive buffer: larger than the kernel's NFLOG buffer (a page by default).
const RX_LEN: usize = 64 * 1024;
/// Socket buffer: about a thousand logged packets before the kernel drops (overrun).
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// The kernel answers configuration before `sendmsg` returns; this only guards a bug.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams read without waiting after the first one, per [`NflogSocket::recv`].
const DRAIN_MAX: usize = 64;
/// Longest receive timeout handed to the kernel (a `timeval` must not overflow).
const MAX_TIMEOUT_MICROS: i64 = i64::MAX / 2;

/// An error of [`NflogSocket`].
#[derive(Debug, thiserror::Error)]
pub enum NflogError {
    /// The socket could not be opened.
    #[error("cannot open a netfilter netlink socket")]
    Open(#[source] Errno),
    /// The kernel refused to bind the group.
    #[error("cannot bind NFLOG group {group}")]
    Bind {
        /// The group.
        group: u16,
        /// `EPERM`: no `CAP_NET_ADMIN`, or another socket of this network namespace
        /// holds the group.
        #[source]
        errno: Errno,
    },
    /// `sendmsg` failed.
    #[error("cannot send to the kernel")]
    Send(#[source] Errno),
    /// `recvmsg` failed.
    #[error("cannot receive from the kernel")]
    Receive(#[source] Errno),
    /// The kernel did not answer in time (it answers synchronously, so: a bug).
    #[error("no answer from the kernel within {0:?}")]
    NoAnswer(Duration),
}

/// A netlink socket bound to one NFLOG group, with its buffers reused across calls.
pub struct NflogSocket {
    fd: OwnedFd,
    group: u16,
    seq: u32,
    tx: Vec<u8>,
    rx: Vec<u8>,
    /// Packets that arrived while waiting for a configuration answer.
    pending: Vec<LoggedPacket>,
    /// `SO_RCVTIMEO` as last set, in microseconds (0: forever).
    timeout_micros: Option<i64>,
    overruns: u64,
    malformed: u64,
}

impl std::fmt::Debug for NflogSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NflogSocket")
            .field("group", &self.group)
            .field("overruns", &self.overruns)
            .field("malformed", &self.malformed)
            .finish_non_exhaustive()
    }
}

/// What one receive call got.
enum Read {
    /// A datagram from the kernel of this many bytes is in `rx`.
    Datagram(usize),
    /// Nothing: the timeout passed, or nothing was queued (`MSG_DONTWAIT`).
    Nothing,
    /// Try again: interrupted, an overrun (counted), or a datagram not from the kernel.
    Again,
}

impl NflogSocket {
    /// Opens a socket in the calling thread's network namespace (where it stays even
    /// when moved to another thread) and binds NFLOG group `group` there, copying the
    /// first [`COPY_RANGE`] bytes of each packet, delivered one by one. Needs
    /// `CAP_NET_ADMIN`; the group is released when the socket is dropped.
    pub fn open(group: u16) -> Result<Self, NflogError> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(NflogError::Open)?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(NflogError::Open)?;
        // Forcing needs CAP_NET_ADMIN, which binding needs anyway; without it the default
        // buffer only overruns sooner.
        if socket::setsockopt(&fd, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
            let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &SOCKET_BUFFER);
        }
        let mut me = Self {
            fd,
            group,
            seq: 0,
            tx: Vec::with_capacity(64),
            rx: vec![0; RX_LEN],
            pending: Vec::new(),
            timeout_micros: None,
            overruns: 0,
            malformed: 0,
        };
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        if needs_pf_bind(&release) {
            // Before Linux 3.17 a `log group` rule reached NFLOG only through the logger
            // bound to the family. Later the rule names its logger, and binding would
            // instead change the namespace's default logger: never do it there.
            for family in [AF_INET, AF_INET6] {
                for cmd in [Command::PfUnbind, Command::PfBind] {
                    let _ = me.configure(family, 0, cmd, false);
                }
            }
        }
        me.configure(0, group, Command::Bind, true)?;
        Ok(me)
    }

    /// The bound group.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// How many times the kernel reported dropping messages because the socket buffer
    /// was full (`ENOBUFS`); receiving continues after each.
    pub fn overruns(&self) -> u64 {
        self.overruns
    }

    /// How many messages were skipped because no IP header could be read in them.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Waits up to `timeout` (`None`: forever; zero: not at all) for logged packets and
    /// returns them with any others already queued (a bounded batch); empty when the
    /// timeout passed first.
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Vec<LoggedPacket>, NflogError> {
        let mut out = std::mem::take(&mut self.pending);
        // A deadline too far to represent waits forever.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        while out.is_empty() {
            let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let flags = if wait == Some(Duration::ZERO) {
                MsgFlags::MSG_DONTWAIT
            } else {
                self.set_timeout(wait)?;
                MsgFlags::empty()
            };
            match self.read(flags)? {
                Read::Datagram(len) => {
                    self.dispatch(len, &mut out, None);
                }
                Read::Nothing => return Ok(out),
                Read::Again => {}
            }
        }
        for _ in 0..DRAIN_MAX {
            match self.read(MsgFlags::MSG_DONTWAIT)? {
                Read::Datagram(len) => {
                    self.dispatch(len, &mut out, None);
                }
                Read::Nothing => break,
                Read::Again => {}
            }
        }
        Ok(out)
    }

    /// Sends one configuration message (`cmd` and, with `mode`, the copy mode and queue
    /// threshold) and waits for the kernel's answer.
    fn configure(
        &mut self,
        family: u8,
        group: u16,
        cmd: Command,
        mode: bool,
    ) -> Result<(), NflogError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        config_request(&mut self.tx, seq, family, group, cmd, mode);
        loop {
            match socket::send(self.fd.as_raw_fd(), &self.tx, MsgFlags::empty()) {
                Ok(_) => break,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(NflogError::Send(e)),
            }
        }
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let mut pending = std::mem::take(&mut self.pending);
        let answer = loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                break Err(NflogError::NoAnswer(ANSWER_TIMEOUT));
            }
            if let Err(e) = self.set_timeout(Some(wait)) {
                break Err(e);
            }
            match self.read(MsgFlags::empty()) {
                Ok(Read::Datagram(len)) => {
                    if let Some(result) = self.dispatch(len, &mut pending, Some(seq)) {
                        break result.map_err(|errno| NflogError::Bind { group, errno });
                    }
                }
                Ok(Read::Nothing) => break Err(NflogError::NoAnswer(ANSWER_TIMEOUT)),
                Ok(Read::Again) => {}
                Err(e) => break Err(e),
            }
        };
        self.pending = pending;
        answer
    }

    /// Sets `SO_RCVTIMEO` unless already set (`None`: forever).
    fn set_timeout(&mut self, wait: Option<Duration>) -> Result<(), NflogError> {
        let micros = wait.map_or(0, |w| {
            i64::try_from(w.as_micros())
                .unwrap_or(i64::MAX)
                .clamp(1, MAX_TIMEOUT_MICROS)
        });
        if self.timeout_micros != Some(micros) {
            let tv = TimeVal::microseconds(micros);
            socket::setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv)
                .map_err(NflogError::Receive)?;
            self.timeout_micros = Some(micros);
        }
        Ok(())
    }

    /// Receives one datagram into `rx`.
    fn read(&mut self, flags: MsgFlags) -> Result<Read, NflogError> {
        let mut iov = [std::io::IoSliceMut::new(&mut self.rx)];
        let received = socket::recvmsg::<NetlinkAddr>(self.fd.as_raw_fd(), &mut iov, None, flags)
            .map(|m| (m.bytes, m.address.is_some_and(|a| a.pid() == 0)));
        match received {
            Ok((len, true)) => Ok(Read::Datagram(len)),
            Ok((_, false)) => Ok(Read::Again),
            Err(Errno::EAGAIN) => Ok(Read::Nothing),
            Err(Errno::EINTR) => Ok(Read::Again),
            Err(Errno::ENOBUFS) => {
                self.overruns += 1;
                tracing::debug!(group = self.group, "NFLOG overrun: logged packets lost");
                Ok(Read::Again)
            }
            Err(e) => Err(NflogError::Receive(e)),
        }
    }

    /// Appends the packets of the datagram in `rx[..len]` to `out`; returns the answer
    /// to configuration message `ack`, if the datagram holds it.
    fn dispatch(
        &mut self,
        len: usize,
        out: &mut Vec<LoggedPacket>,
        ack: Option<u32>,
    ) -> Option<Result<(), Errno>> {
        let read = read_datagram(self.rx.get(..len).unwrap_or_default(), ack, out);
        self.malformed += read.malformed;
        read.answer.map(|answer| match answer {
            Answer::Ack => Ok(()),
            Answer::Refused(code) => Err(Errno::from_raw(code)),
            Answer::Malformed => Err(Errno::EPROTO),
        })
    }
}

impl AsFd for NflogSocket {
    /// Readable when [`NflogSocket::recv`] with a zero timeout has something to read
    /// (for an event loop's readiness polling).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
