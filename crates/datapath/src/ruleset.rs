//! The desired ruleset: what the policy means for the kernel, rendered as one atomic `nft`
//! transaction that creates or updates the table in place.
//!
//! Layout (for 250 endpoints x 2,000 learned IPs, every lookup is a hash and every update
//! one set element):
//! - `ep4`/`ep6`: verdict maps from an enforced endpoint's address to the chain of its
//!   policy (`pol_N`); endpoints with identical rules share a chain.
//! - `fq_<hash>_4`/`_6`: one set per `toFQDNs` selector with per-element timeouts, shared by
//!   every endpoint whose policy uses the selector. Named by a hash of the pattern, so they
//!   survive policy updates and restarts, and never flushed by a reconcile.
//! - `cluster4/6`, `host4/6`: the inventory's and the node's addresses (entities).
//! - `dns4`/`dns6`: `address . protocol . port` of enforced endpoints' DNS, TPROXY-redirected
//!   to the proxy's transparent port with the routing mark.
//! - Base chains `prerouting` (redirect), `forward` and `input` (filter): established
//!   traffic of connections they let start (a conntrack mark bit) first, then dispatch
//!   through the verdict maps; a policy chain ends in the configured deny action.
//!   `output` marks the connections the node starts.
//!
//! The script is written in this order, one concern per module: entity and never-learn
//! sets and selector sets (`sets`), policy chains and dispatch maps (`dispatch`, with the
//! chains' rules from `rules`), source-validation sets (`source`), the base chains
//! (`hooks`), and last the deletion of what the table holds and the ruleset no longer
//! defines (`existing`). `writer` knows the syntax; `reason` names the log prefixes.

mod dispatch;
mod existing;
mod hooks;
mod reason;
mod rules;
mod sets;
mod source;
mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use dnsfence_policy::{Inventory, PolicySet, SelectorId};

pub use existing::Existing;
pub use reason::{DropReason, LOG_RATE_PER_SECOND};
pub use sets::fqdn_set_name;

/// What the datapath does with traffic nothing allows (`datapath.deny_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DenyAction {
    /// ICMP administratively prohibited, TCP reset: clients fail fast.
    #[default]
    Reject,
    /// Silent drop: clients time out.
    Drop,
}

/// Settings of the ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The `inet` table dnsfence owns.
    pub table: String,
    /// Verdict for traffic nothing allows.
    pub deny_action: DenyAction,
    /// Mark of redirected DNS (routed locally by the policy routing rule).
    pub fwmark: u32,
    /// Connection-tracking mark bit(s) of connections the `forward` or `input` chain let
    /// start (or the node started): only their later packets, and ICMP errors related to
    /// them, pass without a policy check. Must not be 0.
    pub ct_mark: u32,
    /// The proxy's transparent port; `None` disables the redirect (DNS is then filtered
    /// at L3/L4 only, and no IP is ever learned).
    pub tproxy_port: Option<u16>,
    /// The routing table of the local-delivery rule for `fwmark`.
    pub route_table: u32,
    /// NFLOG group that drops and rejects of enforced endpoints are logged to (rate
    /// limited in the kernel), for flow events; `None`: not logged.
    pub log_group: Option<u16>,
    /// Ranges a learned IP never opens (`dns.never_learn`: loopback, link-local...),
    /// whatever a selector set holds.
    pub never_learn: Vec<ipnet::IpNet>,
    /// Redirected DNS packets (UDP datagrams and TCP connection attempts) each enforced
    /// endpoint address may send per second (bursts of as many); more are dropped in the
    /// kernel, before they cost the proxy anything. `None`: no limit.
    pub dns_rate_limit: Option<u32>,
}

/// The rendered ruleset and what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// The `nft -f` script; idempotent, one transaction.
    pub script: String,
    /// The selector sets it uses: id -> (v4 set, v6 set).
    pub fqdn_sets: BTreeMap<SelectorId, (String, String)>,
    /// Every chain, set and map it defines (to delete the others).
    pub objects: BTreeSet<String>,
    /// Enforced endpoint addresses.
    pub enforced: usize,
}

/// Renders the desired ruleset; `existing` (what the table holds now, if it exists) is
/// used to delete objects that are no longer wanted, in the same transaction.
///
/// `interfaces` maps endpoint addresses to the node interface they are attached to:
/// packets arriving on an interface of an enforced endpoint must carry the address of an
/// endpoint on that interface as their source, so a pod can neither borrow another's
/// allowances nor slip out under an address no policy knows.
pub fn render(
    policies: &PolicySet,
    inventory: &Inventory,
    interfaces: &BTreeMap<IpAddr, String>,
    options: &Options,
    existing: &Existing,
) -> Ruleset {
    let mut w = writer::Writer::new(&options.table);
    sets::entities(&mut w, inventory, options);
    // Selector sets: created when missing, never flushed.
    let fqdn_sets = sets::selectors(&mut w, policies);
    let enforced = dispatch::Dispatch::of(policies, inventory, options).write(&mut w);
    source::sets(&mut w, inventory, interfaces);
    hooks::prerouting(&mut w, options);
    hooks::output(&mut w, options);
    hooks::filter(&mut w, options);
    existing.delete_unwanted(&mut w);
    let (script, objects) = w.finish();
    Ruleset {
        script,
        fqdn_sets,
        objects,
        enforced,
    }
}

#[cfg(test)]
mod tests;
