//! Where the proxy's learned IPs go: the datapath (the proxy releases an answer once the
//! kernel has its IPs), and a tap that also reports them to the agent, for its status and
//! the names of refused packets' destinations.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dnsfence_datapath::Worker;
use dnsfence_fqdncache::Change;
use dnsfence_proxy::{IpSink, SinkError, SinkFuture};
use tokio::sync::mpsc;

/// The datapath as the proxy's sink.
pub struct DatapathSink(pub Worker);

impl IpSink for DatapathSink {
    fn apply(&self, changes: Vec<Change>) -> SinkFuture {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.apply(
            changes,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        Box::pin(async move {
            match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(SinkError::shared(e)),
                Err(_) => Err(SinkError::new(dnsfence_datapath::SysError::WorkerStopped)),
            }
        })
    }
}

/// A sink that also reports learned IPs to the agent, never blocking: when the report
/// queue is full, changes are counted as dropped.
pub struct ReportingSink {
    /// Where the changes are enforced.
    pub inner: Arc<dyn IpSink>,
    /// The reports' queue.
    pub tx: mpsc::Sender<Vec<Change>>,
    /// Changes not reported because the queue was full.
    pub dropped: Arc<AtomicU64>,
}

impl IpSink for ReportingSink {
    fn apply(&self, changes: Vec<Change>) -> SinkFuture {
        if self.tx.try_send(changes.clone()).is_err() {
            self.dropped
                .fetch_add(changes.len() as u64, Ordering::Relaxed);
        }
        self.inner.apply(changes)
    }
}
