//! Source validation: packets arriving on an interface of an enforced endpoint must carry
//! the address of an endpoint on that interface, and those addresses are only theirs on
//! their own interface. Otherwise a pod could borrow another's allowances or DNS identity,
//! or slip out under an address no policy knows. The sets (`ep_ifaces`, `ep_src4/6`,
//! `ep_addr4/6`) and the `prerouting` rules that drop forged sources live here; which
//! chain runs them first is `hooks`'.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::reason::{log, DropReason};
use super::writer::Writer;
use dnsfence_policy::Inventory;

use super::Options;

/// The interfaces of enforced endpoints, and the (interface, address) pairs of every
/// endpoint on them.
pub(super) fn sets(w: &mut Writer, inventory: &Inventory, interfaces: &BTreeMap<IpAddr, String>) {
    let mut ifaces = BTreeSet::new();
    for ep in inventory.endpoints.iter().filter(|e| e.policy.enforced) {
        for ip in &ep.ips {
            if let Some(dev) = interfaces.get(ip) {
                ifaces.insert(dev.clone());
            }
        }
    }
    let mut src4 = Vec::new();
    let mut src6 = Vec::new();
    // Their addresses, which are only theirs on their own interface.
    let mut owned = Vec::new();
    for ep in &inventory.endpoints {
        for ip in &ep.ips {
            if let Some(dev) = interfaces.get(ip).filter(|d| ifaces.contains(*d)) {
                owned.push(*ip);
                let element = format!("\"{dev}\" . {ip}");
                if ip.is_ipv4() {
                    src4.push(element);
                } else {
                    src6.push(element);
                }
            }
        }
    }
    let quoted: Vec<String> = ifaces.iter().map(|i| format!("\"{i}\"")).collect();
    w.map("ep_ifaces", "ifname", "", &quoted);
    w.map("ep_src4", "ifname . ipv4_addr", "", &src4);
    w.map("ep_src6", "ifname . ipv6_addr", "", &src6);
    w.addr_set("ep_addr", &owned);
}

/// The `prerouting` rules dropping forged sources (logged first, if logging is on).
pub(super) fn refuse_forged(w: &mut Writer, options: &Options) {
    // From an enforced endpoint's interface, only its endpoints' addresses; and their
    // addresses from no other interface (another pod's, the uplink), or a sender there
    // could pass for the endpoint (its DNS identity, its allowances).
    for m in [
        "iifname @ep_ifaces meta nfproto ipv4 iifname . ip saddr != @ep_src4",
        "iifname @ep_ifaces ip6 saddr != { ::, fe80::/10 } iifname . ip6 saddr != @ep_src6",
        "ip saddr @ep_addr4 iifname . ip saddr != @ep_src4",
        "ip6 saddr @ep_addr6 iifname . ip6 saddr != @ep_src6",
    ] {
        if let Some(l) = log(options, DropReason::ForgedSource) {
            w.rule("prerouting", format_args!("{m} {l}"));
        }
        w.rule(
            "prerouting",
            format_args!("{m} counter drop comment \"forged source\""),
        );
    }
}
