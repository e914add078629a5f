//! The agent <-> proxy protocol, on the agent's Unix socket (`api.agent_socket`).
//!
//! Newline-delimited JSON, one message per line, each an object with a `type`:
//!
//! 1. The proxy connects and sends `hello` (`protocol`, `role: "proxy"`, the snapshot
//!    version it already has). An agent speaking another `protocol` answers `error` and
//!    closes.
//! 2. The agent sends `snapshot` with a `version` that only grows within one agent's life:
//!    the policy documents, the endpoint inventory, the node's addresses, and for each
//!    `toFQDNs` selector the names of its kernel sets. It sends a new one after every
//!    policy or inventory change, once the kernel has the sets.
//! 3. The proxy answers `ack` with the version once the snapshot is in force, and reports
//!    what it learns in `learned` batches (at most a few per second, never one per answer).
//!
//! Selector ids are not part of the protocol: each process numbers selectors itself, and
//! the kernel sets are named by a hash of the pattern, which both compute and the snapshot
//! carries so a version skew is detected instead of writing to the wrong set.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

use dnsfence_policy::{EndpointConfig, PolicyDoc};

/// The protocol version.
pub const CONTROL_PROTOCOL: u32 = 1;

/// Who is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A DNS proxy.
    Proxy,
    /// The agent.
    Agent,
    /// An operator's command (`dnsfence status`): gets one `status` and the connection ends.
    Cli,
}

/// A selector and its kernel sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectorSets {
    /// The pattern, as normalized.
    pub pattern: String,
    /// The IPv4 set.
    pub v4: String,
    /// The IPv6 set.
    pub v6: String,
}

/// What the proxy needs to judge queries and write learned IPs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotData {
    /// The policies in force.
    pub policies: Vec<PolicyDoc>,
    /// The endpoint inventory.
    pub endpoints: Vec<EndpointConfig>,
    /// The node's addresses.
    pub host_ips: Vec<IpAddr>,
    /// The selectors' kernel sets.
    pub selectors: Vec<SelectorSets>,
    /// The nftables table holding them; `None` when the agent enforces nothing.
    pub table: Option<String>,
    /// Every policy in audit mode (the configuration's `audit`).
    #[serde(default)]
    pub audit: bool,
}

/// A learned IP reported to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedIp {
    /// The name.
    pub name: String,
    /// The IP.
    pub ip: IpAddr,
    /// Milliseconds until it expires (0: removed).
    pub ttl_ms: u64,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// First message of each side.
    Hello {
        /// [`CONTROL_PROTOCOL`].
        protocol: u32,
        /// Who.
        role: Role,
        /// The process id.
        pid: u32,
        /// The snapshot version the sender has (0: none).
        version: u64,
    },
    /// A snapshot, agent to proxy.
    Snapshot {
        /// Its version.
        version: u64,
        /// Its content.
        snapshot: Box<SnapshotData>,
    },
    /// A snapshot is in force, proxy to agent.
    Ack {
        /// Its version.
        version: u64,
    },
    /// A snapshot was refused, proxy to agent; the previous one stays in force.
    Nack {
        /// Its version.
        version: u64,
        /// Why.
        reason: String,
    },
    /// Learned IPs, proxy to agent.
    Learned {
        /// What changed since the last report.
        ips: Vec<LearnedIp>,
        /// Changes not reported because the batch was full.
        dropped: u64,
    },
    /// Asks for the agent's state, cli to agent.
    StatusRequest {},
    /// The agent's state, for `dnsfence status`.
    Status {
        /// Free-form JSON object.
        status: serde_json::Value,
    },
    /// Flow events, cli to agent: the last `last`, then new ones with `follow`.
    Observe {
        /// How many past events.
        last: usize,
        /// Keep streaming.
        follow: bool,
    },
    /// One flow event, agent to cli.
    Flow {
        /// The event (see [`dnsfence_proxy::flows::Flow`]).
        flow: serde_json::Value,
    },
    /// The other side cannot continue.
    Error {
        /// Why.
        message: String,
    },
}

/// Reads the next message; `Ok(None)` at end of stream.
pub async fn read_message<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut String,
) -> std::io::Result<Option<Message>> {
    line.clear();
    if reader.read_line(line).await? == 0 {
        return Ok(None);
    }
    serde_json::from_str(line.trim_end())
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes one message.
pub async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(message)?;
    bytes.push(b'\n');
    writer.write_all(&bytes).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn messages_round_trip_with_their_type_tag() {
        let m = Message::Hello {
            protocol: CONTROL_PROTOCOL,
            role: Role::Proxy,
            pid: 7,
            version: 0,
        };
        let text = serde_json::to_string(&m).unwrap();
        assert!(
            text.starts_with("{\"type\":\"hello\",\"protocol\":1"),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Message>(&text).unwrap(), m);
        let s = Message::Snapshot {
            version: 3,
            snapshot: Box::new(SnapshotData {
                policies: vec![PolicyDoc {
                    file: "p.yaml".into(),
                    text: "kind: x".into(),
                }],
                endpoints: vec![],
                host_ips: vec!["10.0.0.1".parse().unwrap()],
                selectors: vec![],
                table: Some("dnsfence".into()),
                audit: false,
            }),
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Message>(&text).unwrap(), s);
        assert!(serde_json::from_str::<Message>("{\"type\":\"bogus\"}").is_err());
    }
}
