//! The datapath's section of the configuration file (`datapath`): plain serde data with
//! its defaults, its checks, and the [`Options`] it builds. Reading the whole file is
//! `dnsfence-config`'s.

use serde::Deserialize;

use crate::{DenyAction, Options};

/// `datapath.backend`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One nftables table, programmed over netlink.
    #[default]
    Nftables,
    /// Enforce nothing (DNS filtering only).
    None,
}

/// The `datapath` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DatapathConfig {
    /// Which datapath (default `nftables`).
    #[serde(default)]
    pub backend: Backend,
    /// The nftables table (family `inet`) dnsfence owns (default `dnsfence`).
    #[serde(default = "default_table")]
    pub table: String,
    /// What happens to traffic no rule allows (default `reject`).
    #[serde(default)]
    pub deny_action: DenyAction,
    /// The packet mark of redirected DNS (default `0x4e53`), routed to the local proxy
    /// by a policy routing rule.
    #[serde(default = "default_fwmark")]
    pub fwmark: u32,
    /// The connection-tracking mark bit(s) of connections the datapath let start
    /// (default `0x400000`); the later packets of other connections are checked
    /// against the policy like new ones.
    #[serde(default = "default_ct_mark")]
    pub ct_mark: u32,
    /// The routing table of that rule (default `20053`).
    #[serde(default = "default_route_table")]
    pub route_table: u32,
    /// The NFLOG group refused packets are logged to, rate limited, for flow events
    /// and logs (default `20053`; `0`: off).
    #[serde(default = "default_log_group")]
    pub log_group: u16,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            backend: Backend::default(),
            table: default_table(),
            deny_action: DenyAction::default(),
            fwmark: default_fwmark(),
            ct_mark: default_ct_mark(),
            route_table: default_route_table(),
            log_group: default_log_group(),
        }
    }
}

impl DatapathConfig {
    /// Checks the values, naming each problem by its key.
    pub fn check(&self, p: &mut dnsfence_config::Problems) {
        let table = &self.table;
        if table.is_empty()
            || table.len() > 32
            || !table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            p.push(
                "datapath.table",
                format_args!("{table:?} must be 1 to 32 letters, digits, '_' or '-'"),
            );
        }
        if self.fwmark == 0 {
            p.push("datapath.fwmark", "must not be 0");
        }
        if self.ct_mark == 0 {
            p.push("datapath.ct_mark", "must not be 0");
        }
        if matches!(self.route_table, 0 | 253..=255) {
            p.push(
                "datapath.route_table",
                format_args!(
                    "{} is reserved (0, 253 default, 254 main, 255 local)",
                    self.route_table
                ),
            );
        }
    }

    /// The ruleset's options, with what the DNS section decides: the proxy's transparent
    /// port (`None`: no redirect), the ranges learned IPs never open, and each address's
    /// share of redirected DNS per second (`None`: no limit).
    pub fn options(
        &self,
        tproxy_port: Option<u16>,
        never_learn: Vec<ipnet::IpNet>,
        dns_rate_limit: Option<u32>,
    ) -> Options {
        Options {
            table: self.table.clone(),
            deny_action: self.deny_action,
            fwmark: self.fwmark,
            ct_mark: self.ct_mark,
            tproxy_port,
            route_table: self.route_table,
            log_group: (self.log_group != 0).then_some(self.log_group),
            never_learn,
            dns_rate_limit,
        }
    }
}

fn default_table() -> String {
    "dnsfence".to_owned()
}
fn default_fwmark() -> u32 {
    0x4e53
}
fn default_ct_mark() -> u32 {
    0x0040_0000
}
fn default_route_table() -> u32 {
    20053
}
fn default_log_group() -> u16 {
    20053
}
