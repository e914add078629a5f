//! What goes into the forwarder and what comes out of it: the queries it registers, the
//! copies it has sent, the answers and failures it reports, the health changes it notices.
//! Plain data; it must not hold behaviour beyond reading what it carries.

use std::net::SocketAddr;
use std::time::Instant;

use smallvec::SmallVec;

use super::slab::Key;
#[cfg(doc)]
use super::{Forwarder, MAX_PENDING_PER_PATH};
use crate::answer::{Answer, AnswerError};
use crate::wire::{self, Rcode};

/// A path queries leave on and answers return on: a UDP upstream socket the driver opened
/// with [`Forwarder::open_path`], or one TCP exchange the forwarder opened itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PathId(pub(super) Key);

/// The transport a client query came over; its copies go upstream the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: copies leave on the driver's upstream sockets.
    Udp,
    /// TCP: each copy is an exchange on a path of its own.
    Tcp,
}

impl Transport {
    pub(super) fn protocol(self) -> dnsfence_policy::Protocol {
        match self {
            Transport::Udp => dnsfence_policy::Protocol::Udp,
            Transport::Tcp => dnsfence_policy::Protocol::Tcp,
        }
    }
}

/// Where [`Forwarder::send`] registers a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// On this UDP path.
    Udp(PathId),
    /// On a fresh TCP path.
    Tcp,
}

/// An allowed query to forward, as [`Forwarder::send`] takes it.
#[derive(Debug)]
pub struct Outbound<C> {
    /// The driver's token for the client: what it needs to answer it.
    pub client: C,
    /// The client's address.
    pub addr: SocketAddr,
    /// The server chosen (see [`Forwarder::choose`]).
    pub upstream: SocketAddr,
    /// Whether its answer may teach IPs (the verdict's `learn` for that server).
    pub learn: bool,
    /// Whether another configured upstream may be asked when this one fails or is slow.
    pub may_retry: bool,
    /// When the query arrived.
    pub received: Instant,
}

/// A registered copy: the path it leaves on and the ID written into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// The path (for [`Route::Tcp`], a fresh one).
    pub path: PathId,
    /// The copy's ID on that path.
    pub id: u16,
}

/// Why [`Forwarder::send`] registered nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The path has [`MAX_PENDING_PER_PATH`] queries waiting.
    #[error("no free query ID on the path")]
    NoFreeId,
    /// The path was closed.
    #[error("the path is closed")]
    NoPath,
}

/// A query [`Forwarder::send`] did not register, with the client's token back.
#[derive(Debug)]
pub struct NotSent<C> {
    /// The client, still owed an answer.
    pub client: C,
    /// Why.
    pub reason: SendError,
}

/// A copy of a query to send to another upstream (a retry, or a hedge's second copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The path it leaves on.
    pub path: PathId,
    /// How.
    pub transport: Transport,
    /// The server it goes to.
    pub server: SocketAddr,
    /// The server the query went to first.
    pub from: SocketAddr,
    /// Whether it is a second copy while the first still waits (else, a retry).
    pub hedge: bool,
    /// Its ID on the path.
    pub id: u16,
    /// The bytes to send: the client's query under the copy's ID.
    pub contents: Vec<u8>,
}

/// Why a copy of a query got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// No answer within the timeout.
    Timeout,
    /// The server cannot be reached (ICMP unreachable, a TCP connection refused or broken).
    Unreachable,
    /// It could not be sent.
    SendFailed,
}

/// Something the driver must act on, from [`Forwarder::poll_event`].
#[derive(Debug)]
pub enum Event<C> {
    /// A copy sent to `upstream` got no answer (counted against its health).
    Lost {
        /// The upstream.
        upstream: SocketAddr,
        /// Why.
        reason: FailReason,
    },
    /// Every copy of a query failed and no other upstream is left to ask: the client is
    /// owed SERVFAIL.
    Failed(Failed<C>),
    /// A configured upstream is marked down after so many queries in a row unanswered.
    UpstreamDown {
        /// The upstream.
        upstream: SocketAddr,
        /// The queries it left unanswered.
        unanswered: u32,
    },
    /// A configured upstream marked down answered: it is used again.
    UpstreamUp {
        /// The upstream.
        upstream: SocketAddr,
    },
}

/// A query whose copies all failed.
#[derive(Debug)]
pub struct Failed<C> {
    /// The client's token.
    pub client: C,
    /// The client's address.
    pub addr: SocketAddr,
    /// The transport it came over.
    pub transport: Transport,
    /// The upstream of the copy that failed last.
    pub upstream: SocketAddr,
    /// Why that copy failed.
    pub reason: FailReason,
    pub(super) query: SmallVec<[u8; 128]>,
    pub(super) question_end: usize,
}

impl<C> Failed<C> {
    /// The question's wire bytes.
    pub fn question(&self) -> &[u8] {
        question(&self.query, self.question_end)
    }

    /// Writes the client's SERVFAIL (its ID, RD and question) into `out`; its length, or
    /// `None` when `out` is too small.
    pub fn write_servfail(&self, out: &mut [u8]) -> Option<usize> {
        let id = wire::id(&self.query)?;
        let rd = wire::recursion_desired(&self.query);
        wire::write_reply_to(id, rd, self.question(), Rcode::ServFail, out)
    }
}

/// The answer to a query, from [`Forwarder::handle_answer`]; the packet now carries the
/// client's ID.
#[derive(Debug)]
pub struct Answered<C> {
    /// Who gets it: `None` when another copy of the query was answered first (this answer
    /// still teaches what it teaches, but reaches nobody).
    pub client: Option<C>,
    /// The client's address.
    pub addr: SocketAddr,
    /// The upstream that answered.
    pub upstream: SocketAddr,
    /// Whether the answer may teach IPs.
    pub learn: bool,
    /// When the client's query arrived.
    pub received: Instant,
    /// When this copy left.
    pub sent: Instant,
    /// What the answer says and teaches.
    pub answer: Answer,
    pub(super) query: SmallVec<[u8; 128]>,
    pub(super) question_end: usize,
}

impl<C> Answered<C> {
    /// The question's wire bytes, as the client sent them.
    pub fn question(&self) -> &[u8] {
        question(&self.query, self.question_end)
    }
}

/// Why a message from an upstream is not an awaited answer (it is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The path is closed (a TCP exchange whose query is done).
    #[error("the path is closed")]
    NoPath,
    /// No query waits under its ID on that path.
    #[error("no query waits under its ID")]
    UnknownId,
    /// It comes from a server the query did not go to.
    #[error("not from the server asked")]
    WrongSource,
    /// It does not answer the question asked; the query keeps waiting.
    #[error("not the answer")]
    NotTheAnswer(#[source] AnswerError),
}

pub(super) fn question(query: &[u8], end: usize) -> &[u8] {
    query.get(wire::HEADER_LEN..end).unwrap_or_default()
}
