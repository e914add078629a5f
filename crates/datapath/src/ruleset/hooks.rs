//! The base chains, hooked into netfilter, and the order of what they do:
//! - `prerouting` (mangle): forged sources dropped (`source`), then enforced endpoints'
//!   DNS metered per address and TPROXY-redirected to the proxy, or dropped when no proxy
//!   socket takes it (fail closed);
//! - `output`: connections the node starts are marked, so their answers pass;
//! - `forward` and `input` (filter): later packets of connections the table let start,
//!   then dispatch through the verdict maps to the policy chains (`dispatch`).
//!
//! What a policy allows is not decided here.

use super::reason::{log, DropReason};
use super::source;
use super::writer::Writer;
use super::Options;

/// `prerouting`: the source check, then the DNS redirect (with its meters).
pub(super) fn prerouting(w: &mut Writer, options: &Options) {
    w.base_chain("prerouting", "filter hook prerouting priority mangle");
    source::refuse_forged(w, options);
    if let Some(port) = options.tproxy_port {
        if let Some(rate) = options.dns_rate_limit {
            meter_dns(w, options, rate);
        }
        redirect_dns(w, options, port);
    }
}

/// Each endpoint address's share of the proxy, enforced before the proxy reads anything:
/// one pod's flood cannot fill the socket every pod's DNS waits in. The meters forget an
/// address idle for a minute.
fn meter_dns(w: &mut Writer, options: &Options, rate: u32) {
    for name in ["dnsrate4", "dnsrate6"] {
        let ty = if name.ends_with('4') {
            "ipv4_addr"
        } else {
            "ipv6_addr"
        };
        w.kept_set(
            name,
            format_args!("type {ty}; size 65535; flags dynamic,timeout; timeout 1m;"),
        );
    }
    w.plain_chain("dns_limited");
    if let Some(l) = log(options, DropReason::DnsRateLimited) {
        w.rule("dns_limited", format_args!("{l}"));
    }
    w.rule(
        "dns_limited",
        format_args!("counter drop comment \"dns over the client's rate\""),
    );
    for (fam, set, meter) in [("ip", "dns4", "dnsrate4"), ("ip6", "dns6", "dnsrate6")] {
        // UDP datagrams and TCP connection attempts share one meter per address.
        for first in ["meta l4proto udp", "tcp flags & (syn | ack) == syn"] {
            w.rule(
                "prerouting",
                format_args!(
                    "{first} {fam} saddr . meta l4proto . th dport @{set} update @{meter} {{ {fam} saddr limit rate over {rate}/second burst {rate} packets }} jump dns_limited"
                ),
            );
        }
    }
}

/// Enforced endpoints' DNS (`dns4`/`dns6`) to the proxy's transparent `port`, marked
/// for local delivery.
fn redirect_dns(w: &mut Writer, options: &Options, port: u16) {
    let mark = options.fwmark;
    for (fam, set) in [("ip", "dns4"), ("ip6", "dns6")] {
        for proto in ["udp", "tcp"] {
            w.rule(
                "prerouting",
                format_args!(
                    "meta l4proto {proto} {fam} saddr . meta l4proto . th dport @{set} tproxy {fam} to :{port} meta mark set {mark:#x} accept"
                ),
            );
        }
        // No proxy socket took it (the proxy is down): fail closed, never let an
        // enforced endpoint's DNS through unfiltered.
        let m = format!("meta l4proto {{ udp, tcp }} {fam} saddr . meta l4proto . th dport @{set}");
        if let Some(l) = log(options, DropReason::DnsProxyUnavailable) {
            w.rule("prerouting", format_args!("{m} {l}"));
        }
        w.rule(
            "prerouting",
            format_args!("{m} counter drop comment \"dns proxy unavailable\""),
        );
    }
}

/// `output`: connections the node itself starts (to its pods, say): their answers pass.
pub(super) fn output(w: &mut Writer, options: &Options) {
    let ct = options.ct_mark;
    w.base_chain("output", "filter hook output priority filter");
    w.rule(
        "output",
        format_args!("ct state new ct mark set ct mark or {ct:#x}"),
    );
}

/// `forward` and `input`: established traffic of connections they let start, then
/// dispatch to the policy chains.
pub(super) fn filter(w: &mut Writer, options: &Options) {
    let (mark, ct) = (options.fwmark, options.ct_mark);
    for hook in ["forward", "input"] {
        w.base_chain(hook, &format!("filter hook {hook} priority filter"));
        if hook == "input" {
            // DNS the redirect delivers to the proxy, and IPv6 neighbour discovery.
            w.rule(hook, format_args!("meta mark {mark:#x} accept"));
            w.rule(
                hook,
                format_args!(
                    "icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }} accept"
                ),
            );
        }
        // Later packets of connections this table let start, and ICMP errors related
        // to them. Not those of other connections an enforced endpoint has: its DNS
        // the redirect answered (for any server), which would otherwise carry "related"
        // ICMP errors, whatever their payload, to any address.
        w.rule(
            hook,
            format_args!("ct state established,related ct mark and {ct:#x} == {ct:#x} accept"),
        );
        // A new connection is marked now; its entry only outlives the packet if a rule
        // below accepts it.
        w.rule(
            hook,
            format_args!("ct state new ct mark set ct mark or {ct:#x}"),
        );
        if hook == "input" {
            // Link-local and unspecified sources (let in by the source check for neighbour
            // discovery) carry nothing else from an enforced endpoint's interface to the
            // node: no vmap entry would judge them.
            let m = "iifname @ep_ifaces ip6 saddr { ::, fe80::/10 }";
            if let Some(l) = log(options, DropReason::PolicyDenied) {
                w.rule(hook, format_args!("{m} {l}"));
            }
            w.rule(
                hook,
                format_args!("{m} counter drop comment \"link-local to node\""),
            );
        }
        w.rule(hook, format_args!("ip saddr vmap @ep4"));
        w.rule(hook, format_args!("ip6 saddr vmap @ep6"));
    }
}
