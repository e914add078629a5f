//! dnsfence's node agent: the node's configuration ([`config`]), its desired state
//! ([`desired`]), the agent that owns the datapath and serves snapshots ([`node`]), the
//! proxy that follows it ([`proxy_node`], [`follow`]), and the protocol and links between
//! them ([`control`], [`link`]). `dnsfence run` is the two composed in one process over an
//! in-process link, on the same code as the split form (`dnsfence agent` and `dnsfence
//! proxy --agent`). It must not parse arguments or print: that is the binary's.

pub mod config;
pub mod control;
pub mod desired;
pub mod drops;
pub mod files;
pub mod follow;
pub mod kube;
pub mod link;
pub mod node;
pub mod persist;
pub mod proxy_node;
mod session;
pub mod sink;

use dnsfence_datapath::Options;
use tokio::sync::{mpsc, watch};

use crate::config::NodeConfig;

/// What the process asks of a running node: reload its files (SIGHUP), stop (SIGTERM).
pub struct Controls {
    /// One message per reload request.
    pub reload: mpsc::Receiver<()>,
    /// Changes once, when the node must stop.
    pub stop: watch::Receiver<bool>,
}

/// The datapath's options under `config`: its own section, and what the DNS section
/// decides (the transparent port, the ranges learned IPs never open, each address's share
/// of redirected DNS).
pub fn datapath_options(config: &NodeConfig) -> Options {
    let transparent = config.dns.transparent.as_ref();
    config.datapath.options(
        transparent.map(|t| t.port),
        config.dns.never_learn.clone(),
        transparent
            .map(|t| t.client_packets_per_second)
            .filter(|r| *r > 0),
    )
}
