//! Why the datapath refuses a packet, as the prefix of the rate-limited log statement
//! in front of each refusing rule. It names reasons; it decides nothing about packets.

use super::Options;

/// Why the datapath refused a packet: the NFLOG prefix of its log rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// No rule of the endpoint's policy allows the destination and port.
    PolicyDenied,
    /// An `egressDeny` rule matched.
    EgressDeny,
    /// The source address is not the endpoint's own on the interface it came from.
    ForgedSource,
    /// DNS to be redirected but no proxy socket took it.
    DnsProxyUnavailable,
    /// DNS over the endpoint's per-second share of the proxy (`dns.transparent.
    /// client_packets_per_second`).
    DnsRateLimited,
    /// Would be refused, but the endpoint's policies are in audit mode: accepted.
    AuditPolicyDenied,
    /// An `egressDeny` rule of a policy in audit mode matched: accepted.
    AuditEgressDeny,
}

impl DropReason {
    /// Every reason.
    pub const ALL: [DropReason; 7] = [
        DropReason::PolicyDenied,
        DropReason::EgressDeny,
        DropReason::ForgedSource,
        DropReason::DnsProxyUnavailable,
        DropReason::DnsRateLimited,
        DropReason::AuditPolicyDenied,
        DropReason::AuditEgressDeny,
    ];

    /// The prefix (and metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::PolicyDenied => "policy-denied",
            DropReason::EgressDeny => "egress-deny",
            DropReason::ForgedSource => "forged-source",
            DropReason::DnsProxyUnavailable => "dns-proxy-unavailable",
            DropReason::DnsRateLimited => "dns-rate-limited",
            DropReason::AuditPolicyDenied => "audit-policy-denied",
            DropReason::AuditEgressDeny => "audit-egress-deny",
        }
    }

    /// Whether the packet was let through (audit mode).
    pub fn is_audit(self) -> bool {
        matches!(
            self,
            DropReason::AuditPolicyDenied | DropReason::AuditEgressDeny
        )
    }

    /// Parses a log prefix.
    pub fn from_prefix(prefix: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == prefix.trim())
    }
}

/// Log statements are limited to this many packets per second per rule, so a flood of
/// refused packets cannot flood the log reader.
pub const LOG_RATE_PER_SECOND: u32 = 200;

/// The rate-limited log statement for `reason`, if logging is on.
pub(super) fn log(options: &Options, reason: DropReason) -> Option<String> {
    options.log_group.map(|group| {
        format!(
            "limit rate {LOG_RATE_PER_SECOND}/second burst {LOG_RATE_PER_SECOND} packets log group {group} prefix \"{}\"",
            reason.as_str()
        )
    })
}
