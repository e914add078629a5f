//! Where learned IPs go before an answer is released: the datapath, or nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use dnsfence_fqdncache::Change;

/// Why the sink could not apply changes (the datapath refused them, or stopped).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the IP sink failed")]
pub struct SinkError {
    #[source]
    source: Arc<dyn std::error::Error + Send + Sync>,
}

impl SinkError {
    /// A failure because of `source`.
    pub fn new(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            source: Arc::new(source),
        }
    }

    /// A failure because of `source`, already shared.
    pub fn shared(source: Arc<dyn std::error::Error + Send + Sync>) -> Self {
        Self { source }
    }
}

/// A future returned by [`IpSink::apply`].
pub type SinkFuture = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send>>;

/// Receives learned-IP changes; the returned future completes once they are enforced.
///
/// The proxy releases an answer with new IPs only after this future completes, or after
/// `dns.response_max_delay` (counted as a hold timeout).
pub trait IpSink: Send + Sync + 'static {
    /// Applies `changes` (upserts and removals, in order).
    fn apply(&self, changes: Vec<Change>) -> SinkFuture;
}

/// A sink that enforces nothing (the proxy alone, before a datapath exists).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopSink;

impl IpSink for NoopSink {
    fn apply(&self, _changes: Vec<Change>) -> SinkFuture {
        Box::pin(std::future::ready(Ok(())))
    }
}
