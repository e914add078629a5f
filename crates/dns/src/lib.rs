//! The sans-IO core of the dnsfence DNS proxy.
//!
//! Given a query's bytes, [`parse_query`] reads its one question; [`Snapshot::decide`]
//! judges it for the client endpoint and the server it was sent to; [`write_reply`] writes
//! the proxy's own answers (REFUSED and friends) by echoing the query's header and question.
//! Allowed queries are forwarded as they are with only the ID rewritten ([`wire::set_id`]);
//! [`check_answer`] accepts an upstream answer only for the question that was sent and
//! returns what it teaches (names on the CNAME chain, their addresses, the smallest TTL).
//! The [`forward::Forwarder`] owns the queries in flight upstream: their IDs, hedges,
//! retries, timeouts, and the health of the upstreams; it takes `now` and bytes and says
//! what to send, whom to answer and when to wake it.
//!
//! No sockets, no clock, no async: the shell (`dnsfence-proxy`) owns those. Parsing borrows
//! from the packet (the `domain` crate's zero-copy parser) and never panics on any input.

mod answer;
pub mod forward;
pub mod inside;
mod query;
mod snapshot;
pub mod wire;

pub use answer::{check_answer, Answer, AnswerError, Learned, MAX_CHAIN, MAX_IPS_PER_ANSWER};
pub use inside::{InsideConfig, NotLearned};
pub use query::{fold_name, parse_query, ParsedQuery, Query};
pub use snapshot::{
    DenyRcode, EndpointEntry, EndpointSpec, Reason, Snapshot, UnknownClients, Verdict,
    VerdictConfig,
};
pub use wire::{write_reply, Rcode};
