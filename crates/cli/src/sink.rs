//! Sinks the binary composes: the datapath as the proxy's sink, and a tap that reports
//! learned IPs to the agent.

use std::future::Future;
use std::pin::Pin;

use dnsfence_datapath::Worker;
use dnsfence_fqdncache::Change;
use dnsfence_proxy::{IpSink, SinkError};

/// The datapath as the proxy's sink.
pub(crate) struct DatapathSink(pub(crate) Worker);

impl IpSink for DatapathSink {
    fn apply(&self, changes: Vec<Change>) -> dnsfence_proxy::SinkFuture {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.apply(
            changes,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        let fut: Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send>> =
            Box::pin(async move {
                match rx.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(SinkError {
                        reason: e.to_string(),
                    }),
                    Err(_) => Err(SinkError {
                        reason: "the datapath thread stopped".to_owned(),
                    }),
                }
            });
        fut
    }
}
