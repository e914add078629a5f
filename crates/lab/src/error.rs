//! Errors of the lab: building it ([`LabError`]) and reaching servers from a namespace
//! ([`ConnectError`]).

use std::io;
use std::time::Duration;

use nix::errno::Errno;

/// Building or running the lab failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// The dnsfence daemon of [`crate::daemon`] failed.
    #[error("dnsfence daemon: {0}")]
    Daemon(String),
    /// `ip` (iproute2) is not installed.
    #[error("`ip` not found in PATH, /usr/sbin or /sbin: the lab needs iproute2 (apt-get install iproute2)")]
    IpNotFound,
    /// A command could not be started.
    #[error("could not run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A command exited with a failure.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line (and, for `ip -batch`, its input).
        command: String,
        /// How it exited.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A network namespace could not be entered.
    #[error("could not enter network namespace `{netns}`")]
    Enter {
        /// The namespace.
        netns: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A sysctl could not be written inside a namespace.
    #[error("could not set {key}={value} in network namespace `{netns}`")]
    Sysctl {
        /// The namespace.
        netns: String,
        /// The key, as a path under /proc/sys.
        key: &'static str,
        /// The value.
        value: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A socket for a lab service could not be set up.
    #[error("could not set up {what} on {addr}")]
    Socket {
        /// The service.
        what: &'static str,
        /// Its address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A service thread could not start its runtime or died while starting.
    #[error("the {what} service did not start")]
    Service {
        /// The service.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A record or query name is not a valid domain name.
    #[error("invalid domain name `{name}`")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why.
        #[source]
        source: hickory_server::proto::ProtoError,
    },
    /// A DNS message could not be encoded or decoded.
    #[error("bad DNS message ({what})")]
    Message {
        /// What was being done.
        what: &'static str,
        /// Why (hickory's encoder or decoder error).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The lab was built but a pod could not reach the world's DNS server in time.
    #[error("pod `{pod}` could not reach the world's DNS server at {server} within {waited:?}")]
    NotReady {
        /// The pod's namespace.
        pod: String,
        /// The server it asked.
        server: std::net::SocketAddr,
        /// How long it tried.
        waited: Duration,
    },
    /// The builder was given an impossible topology.
    #[error("invalid lab: {0}")]
    Invalid(&'static str),
}

/// Reaching a server from a namespace failed; the variants are what a firewall test tells apart.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Refused: a TCP RST, or ICMP port unreachable (`ECONNREFUSED`).
    #[error("connection refused")]
    Refused,
    /// An ICMP error other than port unreachable: host/network unreachable, administratively
    /// prohibited (`reject with icmpx admin-prohibited` gives `EHOSTUNREACH` over IPv4 and
    /// `EACCES` over IPv6), or a local `EPERM`.
    #[error("unreachable")]
    Unreachable(#[source] io::Error),
    /// No answer at all within the timeout (packets dropped).
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// Another socket error.
    #[error("socket error")]
    Io(#[source] io::Error),
    /// The namespace could not be entered.
    #[error(transparent)]
    Lab(#[from] LabError),
}

impl ConnectError {
    /// Classifies a socket error the way a firewall test needs it.
    pub(crate) fn classify(error: io::Error, timeout: Duration) -> Self {
        let errno = error.raw_os_error().map(Errno::from_raw);
        match errno {
            Some(Errno::ECONNREFUSED) => Self::Refused,
            Some(
                Errno::EHOSTUNREACH
                | Errno::ENETUNREACH
                | Errno::EACCES
                | Errno::EPERM
                | Errno::EHOSTDOWN
                | Errno::ENONET,
            ) => Self::Unreachable(error),
            Some(Errno::ETIMEDOUT | Errno::EAGAIN) => Self::TimedOut(timeout),
            _ if error.kind() == io::ErrorKind::TimedOut => Self::TimedOut(timeout),
            _ if error.kind() == io::ErrorKind::WouldBlock => Self::TimedOut(timeout),
            _ => Self::Io(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(errno: Errno) -> io::Error {
        io::Error::from_raw_os_error(errno as i32)
    }

    #[test]
    fn icmp_errors_are_told_apart() {
        let t = Duration::from_secs(1);
        assert!(matches!(
            ConnectError::classify(os(Errno::ECONNREFUSED), t),
            ConnectError::Refused
        ));
        for e in [Errno::EHOSTUNREACH, Errno::EACCES, Errno::ENETUNREACH] {
            assert!(matches!(
                ConnectError::classify(os(e), t),
                ConnectError::Unreachable(_)
            ));
        }
        assert!(matches!(
            ConnectError::classify(io::ErrorKind::TimedOut.into(), t),
            ConnectError::TimedOut(_)
        ));
        assert!(matches!(
            ConnectError::classify(os(Errno::EAGAIN), t),
            ConnectError::TimedOut(_)
        ));
        assert!(matches!(
            ConnectError::classify(os(Errno::EINVAL), t),
            ConnectError::Io(_)
        ));
    }
}
