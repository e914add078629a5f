//! The address sets rules look destinations up in: the entities (`cluster`, `host`), the
//! ranges no learned IP opens (`never`), and one timeout set per FQDN selector and family.
//! Entity sets are replaced by each reconcile; selector sets are created when missing and
//! never flushed, so the IPs learned into them survive policy updates and restarts.

use std::collections::BTreeMap;

use dnsfence_policy::{NamePattern, PolicySet, SelectorId};

use super::writer::Writer;
use dnsfence_policy::Inventory;

use super::Options;

/// The name of the set holding IPs learned for a selector, by family.
pub fn fqdn_set_name(pattern: &NamePattern, v6: bool) -> String {
    // FNV-1a: stable across builds and restarts, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in pattern.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("fq_{h:016x}_{}", if v6 { 6 } else { 4 })
}

/// `cluster4/6` (every endpoint's and the node's addresses), `host4/6` (the node's) and
/// `never4/6` (`dns.never_learn`).
pub(super) fn entities(w: &mut Writer, inventory: &Inventory, options: &Options) {
    let mut cluster = Vec::new();
    for ep in &inventory.endpoints {
        cluster.extend(ep.ips.iter().copied());
    }
    cluster.extend(inventory.host_ips.iter().copied());
    w.addr_set("cluster", &cluster);
    w.addr_set("host", &inventory.host_ips);
    // Ranges no learned IP opens (the proxy does not learn them either).
    w.cidr_set("never", &options.never_learn);
}

/// The sets of every FQDN selector of `policies`: id -> (v4 set, v6 set).
pub(super) fn selectors(
    w: &mut Writer,
    policies: &PolicySet,
) -> BTreeMap<SelectorId, (String, String)> {
    let mut out = BTreeMap::new();
    for (id, pattern) in policies.fqdn_selectors() {
        let v4 = fqdn_set_name(pattern, false);
        let v6 = fqdn_set_name(pattern, true);
        for (name, ty) in [(&v4, "ipv4_addr"), (&v6, "ipv6_addr")] {
            w.kept_set(
                name,
                format_args!(
                    "type {ty}; flags timeout; comment \"{}\";",
                    pattern.as_str()
                ),
            );
        }
        out.insert(*id, (v4, v6));
    }
    out
}
