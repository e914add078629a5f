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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use dnsfence_policy::{
    EgressRule, Endpoint, EndpointPolicy, Entity, NamePattern, Peer, PolicySet, PortProtocol,
    Protocol, SelectorId,
};

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

/// One endpoint of the inventory with its resolved policy.
#[derive(Debug, Clone)]
pub struct EndpointState {
    /// Name, for comments.
    pub name: String,
    /// Namespace and labels (for `toEndpoints` peers).
    pub endpoint: Endpoint,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// The rules that apply.
    pub policy: EndpointPolicy,
}

/// Everything the datapath enforces.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// The endpoints.
    pub endpoints: Vec<EndpointState>,
    /// The node's addresses (`toEntities: host`).
    pub host_ips: Vec<IpAddr>,
}

impl Inventory {
    /// Resolves `policies` for each endpoint.
    pub fn resolve(
        policies: &PolicySet,
        endpoints: impl IntoIterator<Item = (String, Endpoint, Vec<IpAddr>)>,
        host_ips: Vec<IpAddr>,
    ) -> Self {
        Self {
            endpoints: endpoints
                .into_iter()
                .map(|(name, endpoint, ips)| EndpointState {
                    name,
                    policy: policies.resolve(&endpoint),
                    endpoint,
                    ips,
                })
                .collect(),
            host_ips,
        }
    }
}

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

/// The objects (chains, sets, maps) found in the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    /// Chain names.
    pub chains: BTreeSet<String>,
    /// Set and map names.
    pub sets: BTreeSet<String>,
}

impl Existing {
    /// Parses `nft --terse list table` output.
    pub fn parse(listing: &str) -> Self {
        let mut out = Self::default();
        for line in listing.lines() {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("chain"), Some(name)) => {
                    out.chains.insert(name.to_owned());
                }
                (Some("set" | "map"), Some(name)) => {
                    out.sets.insert(name.to_owned());
                }
                _ => {}
            }
        }
        out
    }
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
    let mut r = Renderer {
        t: format!("inet {}", options.table),
        out: String::new(),
        objects: BTreeSet::new(),
        fqdn_sets: BTreeMap::new(),
    };
    {
        let _ = writeln!(r.out, "add table {}", r.t);
    }

    // Address sets of the entities.
    let mut cluster = Vec::new();
    for ep in &inventory.endpoints {
        cluster.extend(ep.ips.iter().copied());
    }
    cluster.extend(inventory.host_ips.iter().copied());
    r.addr_set("cluster", &cluster);
    r.addr_set("host", &inventory.host_ips);
    // Ranges no learned IP opens (the proxy does not learn them either).
    r.cidr_set("never", &options.never_learn);

    // Selector sets: created when missing, never flushed.
    for (id, pattern) in policies.fqdn_selectors() {
        let v4 = fqdn_set_name(pattern, false);
        let v6 = fqdn_set_name(pattern, true);
        for (name, ty) in [(&v4, "ipv4_addr"), (&v6, "ipv6_addr")] {
            {
                let _ = writeln!(
                    r.out,
                    "add set {} {name} {{ type {ty}; flags timeout; comment \"{}\"; }}",
                    r.t,
                    pattern.as_str()
                );
            }
            r.objects.insert(name.clone());
        }
        r.fqdn_sets.insert(*id, (v4, v6));
    }

    // Policy chains, shared by endpoints with the same rules.
    let mut chains: Vec<Vec<String>> = Vec::new();
    let mut ep4 = Vec::new();
    let mut ep6 = Vec::new();
    let mut dns4 = Vec::new();
    let mut dns6 = Vec::new();
    let mut enforced = 0;
    // Endpoints in default-deny, and those whose only rules deny something (an
    // `egressDeny` without default-deny: everything else stays open for them).
    let dispatched = inventory.endpoints.iter().filter(|e| {
        e.policy.enforced || !e.policy.denies.is_empty() || !e.policy.audit_denies.is_empty()
    });
    for ep in dispatched {
        let body = policy_chain(ep, inventory, policies, options);
        let index = match chains.iter().position(|c| *c == body) {
            Some(i) => i,
            None => {
                chains.push(body);
                chains.len() - 1
            }
        };
        for ip in &ep.ips {
            if ep.policy.enforced {
                enforced += 1;
            }
            let element = format!("{ip} : jump pol_{index}");
            if ip.is_ipv4() {
                ep4.push(element);
            } else {
                ep6.push(element);
            }
            if options.tproxy_port.is_some() && ep.policy.enforced {
                for pp in dns_ports(&ep.policy) {
                    let (proto, ports) = pp;
                    let element = format!("{ip} . {proto} . {ports}");
                    if ip.is_ipv4() {
                        dns4.push(element);
                    } else {
                        dns6.push(element);
                    }
                }
            }
        }
    }
    for (i, body) in chains.iter().enumerate() {
        let name = format!("pol_{i}");
        {
            let _ = writeln!(r.out, "add chain {} {name}", r.t);
        }
        {
            let _ = writeln!(r.out, "flush chain {} {name}", r.t);
        }
        for rule in body {
            r.rule(&name, format_args!("{rule}"));
        }
        r.objects.insert(name);
    }
    r.map("ep4", "ipv4_addr : verdict", "", &ep4);
    r.map("ep6", "ipv6_addr : verdict", "", &ep6);
    r.map(
        "dns4",
        "ipv4_addr . inet_proto . inet_service",
        " flags interval;",
        &dns4,
    );
    r.map(
        "dns6",
        "ipv6_addr . inet_proto . inet_service",
        " flags interval;",
        &dns6,
    );

    // Source validation: interfaces of enforced endpoints, and the (interface, address)
    // pairs of every endpoint on them.
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
    r.map("ep_ifaces", "ifname", "", &quoted);
    r.map("ep_src4", "ifname . ipv4_addr", "", &src4);
    r.map("ep_src6", "ifname . ipv6_addr", "", &src6);
    r.addr_set("ep_addr", &owned);

    // Base chains.
    let mark = options.fwmark;
    r.base_chain("prerouting", "filter hook prerouting priority mangle");
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
            r.rule("prerouting", format_args!("{m} {l}"));
        }
        r.rule(
            "prerouting",
            format_args!("{m} counter drop comment \"forged source\""),
        );
    }
    if let Some(port) = options.tproxy_port {
        if let Some(rate) = options.dns_rate_limit {
            // Each endpoint address's share of the proxy, enforced before the proxy reads
            // anything: one pod's flood cannot fill the socket every pod's DNS waits in.
            // The meters forget an address idle for a minute.
            for name in ["dnsrate4", "dnsrate6"] {
                let ty = if name.ends_with('4') {
                    "ipv4_addr"
                } else {
                    "ipv6_addr"
                };
                let _ = writeln!(
                    r.out,
                    "add set {} {name} {{ type {ty}; size 65535; flags dynamic,timeout; timeout 1m; }}",
                    r.t
                );
                r.objects.insert(name.to_owned());
            }
            r.plain_chain("dns_limited");
            if let Some(l) = log(options, DropReason::DnsRateLimited) {
                r.rule("dns_limited", format_args!("{l}"));
            }
            r.rule(
                "dns_limited",
                format_args!("counter drop comment \"dns over the client's rate\""),
            );
            for (fam, set, meter) in [("ip", "dns4", "dnsrate4"), ("ip6", "dns6", "dnsrate6")] {
                // UDP datagrams and TCP connection attempts share one meter per address.
                for first in ["meta l4proto udp", "tcp flags & (syn | ack) == syn"] {
                    r.rule(
                        "prerouting",
                        format_args!(
                            "{first} {fam} saddr . meta l4proto . th dport @{set} update @{meter} {{ {fam} saddr limit rate over {rate}/second burst {rate} packets }} jump dns_limited"
                        ),
                    );
                }
            }
        }
        for (fam, set) in [("ip", "dns4"), ("ip6", "dns6")] {
            for proto in ["udp", "tcp"] {
                r.rule(
                    "prerouting",
                    format_args!(
                        "meta l4proto {proto} {fam} saddr . meta l4proto . th dport @{set} tproxy {fam} to :{port} meta mark set {mark:#x} accept"
                    ),
                );
            }
            // No proxy socket took it (the proxy is down): fail closed, never let an
            // enforced endpoint's DNS through unfiltered.
            let m =
                format!("meta l4proto {{ udp, tcp }} {fam} saddr . meta l4proto . th dport @{set}");
            if let Some(l) = log(options, DropReason::DnsProxyUnavailable) {
                r.rule("prerouting", format_args!("{m} {l}"));
            }
            r.rule(
                "prerouting",
                format_args!(
                    "meta l4proto {{ udp, tcp }} {fam} saddr . meta l4proto . th dport @{set} counter drop comment \"dns proxy unavailable\""
                ),
            );
        }
    }
    let ct = options.ct_mark;
    // Connections the node itself starts (to its pods, say): their answers pass.
    r.base_chain("output", "filter hook output priority filter");
    r.rule(
        "output",
        format_args!("ct state new ct mark set ct mark or {ct:#x}"),
    );
    for hook in ["forward", "input"] {
        r.base_chain(hook, &format!("filter hook {hook} priority filter"));
        if hook == "input" {
            // DNS the redirect delivers to the proxy, and IPv6 neighbour discovery.
            r.rule(hook, format_args!("meta mark {mark:#x} accept"));
            r.rule(
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
        r.rule(
            hook,
            format_args!("ct state established,related ct mark and {ct:#x} == {ct:#x} accept"),
        );
        // A new connection is marked now; its entry only outlives the packet if a rule
        // below accepts it.
        r.rule(
            hook,
            format_args!("ct state new ct mark set ct mark or {ct:#x}"),
        );
        if hook == "input" {
            // Link-local and unspecified sources (let in by the source check for neighbour
            // discovery) carry nothing else from an enforced endpoint's interface to the
            // node: no vmap entry would judge them.
            let m = "iifname @ep_ifaces ip6 saddr { ::, fe80::/10 }";
            if let Some(l) = log(options, DropReason::PolicyDenied) {
                r.rule(hook, format_args!("{m} {l}"));
            }
            r.rule(
                hook,
                format_args!("{m} counter drop comment \"link-local to node\""),
            );
        }
        r.rule(hook, format_args!("ip saddr vmap @ep4"));
        r.rule(hook, format_args!("ip6 saddr vmap @ep6"));
    }

    // Whatever the table holds that is no longer wanted: chains first (their rules may
    // reference sets), then sets.
    for chain in existing.chains.difference(&r.objects) {
        {
            let _ = writeln!(r.out, "flush chain {} {chain}", r.t);
        }
    }
    for chain in existing.chains.difference(&r.objects) {
        {
            let _ = writeln!(r.out, "delete chain {} {chain}", r.t);
        }
    }
    for set in existing.sets.difference(&r.objects) {
        {
            let _ = writeln!(r.out, "delete set {} {set}", r.t);
        }
    }
    Ruleset {
        script: r.out,
        fqdn_sets: r.fqdn_sets,
        objects: r.objects,
        enforced,
    }
}

/// The DNS ports an endpoint's DNS rules cover, as `(protocol, port or range)`.
fn dns_ports(policy: &EndpointPolicy) -> BTreeSet<(&'static str, String)> {
    let mut out = BTreeSet::new();
    for rule in &policy.dns_rules {
        for pp in &rule.ports {
            // A DNS rule without a port means the DNS port, never "every port".
            let (lo, hi) = if pp.port == 0 {
                (53, 53)
            } else {
                (pp.port, pp.end_port.max(pp.port))
            };
            let range = format!("{lo}-{hi}");
            for proto in ["udp", "tcp"] {
                let p = if proto == "udp" {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                };
                if pp.protocol.covers(p) {
                    out.insert((proto, range.clone()));
                }
            }
        }
    }
    out
}

struct Renderer {
    t: String,
    out: String,
    objects: BTreeSet<String>,
    fqdn_sets: BTreeMap<SelectorId, (String, String)>,
}

impl Renderer {
    fn rule(&mut self, chain: &str, args: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.out, "add rule {} {chain} {args}", self.t);
    }

    fn base_chain(&mut self, name: &str, spec: &str) {
        {
            let _ = writeln!(
                self.out,
                "add chain {} {name} {{ type {spec}; policy accept; }}",
                self.t
            );
        }
        {
            let _ = writeln!(self.out, "flush chain {} {name}", self.t);
        }
        self.objects.insert(name.to_owned());
    }

    /// A regular chain, emptied and filled anew by each reconcile.
    fn plain_chain(&mut self, name: &str) {
        let _ = writeln!(self.out, "add chain {} {name}", self.t);
        let _ = writeln!(self.out, "flush chain {} {name}", self.t);
        self.objects.insert(name.to_owned());
    }

    fn addr_set(&mut self, base: &str, ips: &[IpAddr]) {
        let v4: Vec<String> = ips
            .iter()
            .filter(|i| i.is_ipv4())
            .map(ToString::to_string)
            .collect();
        let v6: Vec<String> = ips
            .iter()
            .filter(|i| i.is_ipv6())
            .map(ToString::to_string)
            .collect();
        self.map(&format!("{base}4"), "ipv4_addr", "", &v4);
        self.map(&format!("{base}6"), "ipv6_addr", "", &v6);
    }

    fn cidr_set(&mut self, base: &str, nets: &[ipnet::IpNet]) {
        let (v4, v6): (Vec<ipnet::IpNet>, Vec<ipnet::IpNet>) = nets
            .iter()
            .map(ipnet::IpNet::trunc)
            .partition(|n| n.addr().is_ipv4());
        // Interval sets refuse overlapping elements: merge them first.
        let show = |nets: Vec<ipnet::IpNet>| -> Vec<String> {
            ipnet::IpNet::aggregate(&nets)
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        self.map(
            &format!("{base}4"),
            "ipv4_addr",
            " flags interval;",
            &show(v4),
        );
        self.map(
            &format!("{base}6"),
            "ipv6_addr",
            " flags interval;",
            &show(v6),
        );
    }

    /// A set or map whose content is replaced (atomically) by each reconcile.
    fn map(&mut self, name: &str, ty: &str, flags: &str, elements: &[String]) {
        let kind = if ty.contains(" : ") { "map" } else { "set" };
        {
            let _ = writeln!(
                self.out,
                "add {kind} {} {name} {{ type {ty};{flags} }}",
                self.t
            );
        }
        {
            let _ = writeln!(self.out, "flush {kind} {} {name}", self.t);
        }
        let mut elements = elements.to_vec();
        elements.sort();
        elements.dedup();
        for chunk in elements.chunks(256) {
            {
                let _ = writeln!(
                    self.out,
                    "add element {} {name} {{ {} }}",
                    self.t,
                    chunk.join(", ")
                );
            }
        }
        self.objects.insert(name.to_owned());
    }
}

/// The rules of one endpoint's chain (identical lists share a chain).
fn policy_chain(
    ep: &EndpointState,
    inventory: &Inventory,
    policies: &PolicySet,
    options: &Options,
) -> Vec<String> {
    let deny = options.deny_action;
    let mut rules = Vec::new();
    let deny_verdict = match deny {
        DenyAction::Reject => "reject with icmpx type admin-prohibited",
        DenyAction::Drop => "drop",
    };
    for d in &ep.policy.denies {
        for m in rule_matches(&d.rule, inventory, policies, Use::Deny) {
            if let Some(l) = log(options, DropReason::EgressDeny) {
                rules.push(format!("{m} {l}"));
            }
            if deny == DenyAction::Reject && !m.contains("udp") && !m.contains("sctp") {
                rules.push(format!("{m} meta l4proto tcp reject with tcp reset"));
            }
            rules.push(format!("{m} {deny_verdict}"));
        }
    }
    // egressDeny of policies in audit mode: recorded, not enforced.
    if let Some(l) = log(options, DropReason::AuditEgressDeny) {
        for d in &ep.policy.audit_denies {
            for m in rule_matches(&d.rule, inventory, policies, Use::Deny) {
                rules.push(format!("{m} {l}"));
            }
        }
    }
    if !ep.policy.enforced {
        // Not in default-deny: only the denies above apply.
        rules.push("accept".to_owned());
        return rules;
    }
    for a in &ep.policy.allows {
        for m in rule_matches(&a.rule, inventory, policies, Use::Allow) {
            rules.push(format!("{m} accept"));
        }
    }
    if ep.policy.audit {
        // Every policy putting the endpoint in default-deny is in audit mode: what would
        // be refused is recorded and let through.
        if let Some(l) = log(options, DropReason::AuditPolicyDenied) {
            rules.push(l);
        }
        rules.push("counter accept".to_owned());
        return rules;
    }
    if let Some(l) = log(options, DropReason::PolicyDenied) {
        rules.push(l);
    }
    if deny == DenyAction::Reject {
        rules.push("meta l4proto tcp counter reject with tcp reset".to_owned());
    }
    rules.push(format!("counter {deny_verdict}"));
    rules
}

/// The rate-limited log statement for `reason`, if logging is on.
fn log(options: &Options, reason: DropReason) -> Option<String> {
    options.log_group.map(|group| {
        format!(
            "limit rate {LOG_RATE_PER_SECOND}/second burst {LOG_RATE_PER_SECOND} packets log group {group} prefix \"{}\"",
            reason.as_str()
        )
    })
}

/// The match expressions of a rule: one per (destination, port) alternative.
fn rule_matches(
    rule: &EgressRule,
    inventory: &Inventory,
    policies: &PolicySet,
    usage: Use,
) -> Vec<String> {
    let peers = peer_matches(&rule.peer, inventory, policies, usage);
    let ports = port_matches(&allowed_ports(rule));
    let mut out = Vec::new();
    for p in &peers {
        for q in &ports {
            out.push(format!("{p} {q}").trim().to_owned());
        }
    }
    out
}

/// The ports a rule opens. Ports that carry DNS rules open only UDP and TCP, the
/// protocols the proxy checks: `protocol: ANY` on a DNS port must not become an unfiltered
/// SCTP channel to the DNS server.
fn allowed_ports(rule: &EgressRule) -> Vec<PortProtocol> {
    if !rule.to_ports.iter().any(|pr| pr.dns.is_some()) {
        return rule.ports();
    }
    let mut out = Vec::new();
    for pr in &rule.to_ports {
        for pp in &pr.ports {
            if pr.dns.is_some() {
                for proto in [Protocol::Udp, Protocol::Tcp] {
                    if pp.protocol.covers(proto) {
                        out.push(PortProtocol {
                            protocol: proto,
                            ..*pp
                        });
                    }
                }
            } else {
                out.push(*pp);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn set_literal(ips: &[String]) -> String {
    format!("{{ {} }}", ips.join(", "))
}

/// Whether a rule allows or denies: a learned IP allows less than it denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    Allow,
    Deny,
}

/// Destination matches; empty when the peer selects nothing.
fn peer_matches(
    peer: &Peer,
    inventory: &Inventory,
    policies: &PolicySet,
    usage: Use,
) -> Vec<String> {
    let both = |v4: String, v6: String| vec![v4, v6];
    match peer {
        Peer::Any => vec![String::new()],
        Peer::Endpoints(selectors) => {
            let mut v4 = Vec::new();
            let mut v6 = Vec::new();
            for ep in &inventory.endpoints {
                if selectors.iter().any(|s| s.matches(&ep.endpoint)) {
                    for ip in &ep.ips {
                        if ip.is_ipv4() {
                            v4.push(ip.to_string());
                        } else {
                            v6.push(ip.to_string());
                        }
                    }
                }
            }
            let mut out = Vec::new();
            if !v4.is_empty() {
                out.push(format!("ip daddr {}", set_literal(&v4)));
            }
            if !v6.is_empty() {
                out.push(format!("ip6 daddr {}", set_literal(&v6)));
            }
            out
        }
        Peer::Cidrs(cidrs) => cidrs
            .iter()
            .map(|c| {
                let fam = if c.cidr.addr().is_ipv4() { "ip" } else { "ip6" };
                let cluster = if fam == "ip" { "cluster4" } else { "cluster6" };
                let mut m = format!("{fam} daddr {} {fam} daddr != @{cluster}", c.cidr.trunc());
                if !c.except.is_empty() {
                    let ex: Vec<String> = c.except.iter().map(|e| e.trunc().to_string()).collect();
                    let _ = write!(m, " {fam} daddr != {}", set_literal(&ex));
                }
                m
            })
            .collect(),
        Peer::Entities(entities) => {
            let mut out = Vec::new();
            for e in entities {
                match e {
                    Entity::All => out.push(String::new()),
                    Entity::World => out.extend(both(
                        "ip daddr != @cluster4".into(),
                        "ip6 daddr != @cluster6".into(),
                    )),
                    Entity::WorldIpv4 => out.push("ip daddr != @cluster4".into()),
                    Entity::WorldIpv6 => out.push("ip6 daddr != @cluster6".into()),
                    Entity::Cluster => out.extend(both(
                        "ip daddr @cluster4".into(),
                        "ip6 daddr @cluster6".into(),
                    )),
                    Entity::Host => {
                        out.extend(both("ip daddr @host4".into(), "ip6 daddr @host6".into()))
                    }
                }
            }
            out.sort();
            out.dedup();
            out
        }
        Peer::Fqdns(patterns) => {
            let mut out = Vec::new();
            for p in patterns {
                if policies.selector_id(p).is_none() {
                    continue;
                }
                let (v4, v6) = (fqdn_set_name(p, false), fqdn_set_name(p, true));
                if usage == Use::Deny {
                    // Denied as broadly as learned.
                    out.push(format!("ip daddr @{v4}"));
                    out.push(format!("ip6 daddr @{v6}"));
                    out.push(format!("ct original ip daddr @{v4}"));
                    out.push(format!("ct original ip6 daddr @{v6}"));
                    continue;
                }
                // A learned IP never opens the node (a local address, whatever the
                // inventory says), a broadcast or multicast address, nor a range of
                // `dns.never_learn`, even if a set holds it.
                out.push(format!(
                    "ip daddr @{v4} ip daddr != @never4 fib daddr type unicast"
                ));
                out.push(format!(
                    "ip6 daddr @{v6} ip6 daddr != @never6 fib daddr type unicast"
                ));
                // A learned service IP that the node rewrote (kube-proxy's DNAT to a
                // backend) is judged by the address the pod connected to.
                out.push(format!(
                    "ct status dnat ct original ip daddr @{v4} ct original ip daddr != @never4"
                ));
                out.push(format!(
                    "ct status dnat ct original ip6 daddr @{v6} ct original ip6 daddr != @never6"
                ));
            }
            out
        }
    }
}

/// Port matches; `[""]` for every port and protocol.
fn port_matches(ports: &[PortProtocol]) -> Vec<String> {
    if ports.contains(&PortProtocol::ANY) {
        return vec![String::new()];
    }
    ports
        .iter()
        .map(|p| {
            let range = if p.end_port > p.port {
                format!("{}-{}", p.port, p.end_port)
            } else {
                p.port.to_string()
            };
            match (p.protocol, p.port) {
                (Protocol::Any, 0) => String::new(),
                (Protocol::Any, _) => format!("meta l4proto {{ tcp, udp, sctp }} th dport {range}"),
                (proto, 0) => format!("meta l4proto {}", proto_name(proto)),
                (proto, _) => format!("{} dport {range}", proto_name(proto)),
            }
        })
        .collect()
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
        Protocol::Any => "",
    }
}

#[cfg(test)]
mod tests;
