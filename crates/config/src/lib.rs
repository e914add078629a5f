//! Reading dnsfence's configuration file: the machinery every section shares, none of the
//! sections themselves.
//!
//! Each component owns its section as plain serde data with `deny_unknown_fields` and its
//! defaults (`DnsConfig` in the proxy, `DatapathConfig` in the datapath,
//! `KubernetesConfig` in the Kubernetes front end, the top level in the agent). [`read`]
//! turns a whole document into those types and reports every problem at once, one line
//! each, named by its path; [`de`] has the deserializers for durations and lists of
//! addresses that several sections use. It must not know any section's keys: the key
//! names come from serde, so a field added to a section is known everywhere at once.

mod collect;
pub mod de;

pub use collect::{keys_of, read, Problems};

/// Why a configuration was refused: every problem found, one per line, each naming the
/// file and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    /// One line per problem.
    pub problems: Vec<String>,
}
