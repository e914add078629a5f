//! `toPorts`: ports, ranges and protocols, the L7 `rules` (only `dns` is enforced), and
//! the checks DNS rules need (port 53 style single ports, a protocol that carries DNS).

use serde_yaml_ng::Value;

use super::peers::name_pattern;
use crate::diag::Sink;
use crate::model::{PortProtocol, PortRule, Protocol};
use crate::parse::value::{fields, index, join, list, port, string};
use crate::pattern::NamePattern;

const PORT_RULE_FIELDS: &[&str] = &[
    "ports",
    "rules",
    "serverNames",
    "originatingTLS",
    "terminatingTLS",
    "listener",
];

pub(super) fn port_rules(
    sink: &mut Sink<'_>,
    v: &Value,
    path: &str,
    deny: bool,
) -> Option<Vec<PortRule>> {
    let items = list(sink, v, path)?;
    let errors_before = sink.errors();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let Some(f) = fields(sink, item, &p, PORT_RULE_FIELDS) else {
            continue;
        };
        if deny && f.has("rules") {
            sink.error(&join(&p, "rules"), "L7 rules are not allowed in egressDeny");
            continue;
        }
        for unsupported in [
            "serverNames",
            "originatingTLS",
            "terminatingTLS",
            "listener",
        ] {
            if f.has(unsupported) {
                sink.error(&join(&p, unsupported), format!("{unsupported} is not supported by dnsfence; ignoring it would allow more than the policy says"));
            }
        }
        let ports_path = join(&p, "ports");
        // The entries that parsed, with their index in the list (the others are reported).
        let mut indexed = Vec::new();
        // How many entries were written (`None`: no `ports` at all).
        let mut written = None;
        if let Some(v) = f.get("ports") {
            let entries = list(sink, v, &ports_path).unwrap_or_default();
            written = Some(entries.len());
            for (j, pp) in entries.iter().enumerate() {
                if let Some(pp) = port_protocol(sink, pp, &index(&ports_path, j)) {
                    indexed.push((j, pp));
                }
            }
        }
        let ports: Vec<PortProtocol> = if indexed.is_empty() {
            vec![PortProtocol::ANY]
        } else {
            indexed.iter().map(|(_, pp)| *pp).collect()
        };
        let dns = match f.get("rules") {
            Some(r) => l7_rules(sink, r, &join(&p, "rules")),
            None => None,
        };
        if dns.is_some() {
            check_dns_ports(sink, written, &indexed, &ports_path);
        }
        out.push(PortRule { ports, dns });
    }
    (sink.errors() == errors_before).then_some(out)
}

/// DNS rules need a specific port, no range, and TCP, UDP or ANY.
///
/// `written` is how many entries the list has (`None`: no list); `ports` are the entries
/// that parsed, with their index in it (the others were reported already).
fn check_dns_ports(
    sink: &mut Sink<'_>,
    written: Option<usize>,
    ports: &[(usize, PortProtocol)],
    path: &str,
) {
    if written.is_none_or(|n| n == 0) {
        sink.error(path, "DNS rules need a port (usually 53)");
        return;
    }
    for (j, pp) in ports {
        let p = index(path, *j);
        if pp.port == 0 {
            sink.error(
                &join(&p, "port"),
                "DNS rules need a specific port (usually 53), not 0",
            );
        }
        if pp.end_port != pp.port {
            sink.error(&join(&p, "endPort"), "DNS rules cannot use a port range");
        }
        if pp.protocol == Protocol::Sctp {
            sink.error(
                &join(&p, "protocol"),
                "DNS rules need protocol TCP, UDP or ANY",
            );
        }
    }
}

fn port_protocol(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<PortProtocol> {
    let f = fields(sink, v, path, &["port", "endPort", "protocol"])?;
    // Every field is judged, so that one run reports all of an entry's problems.
    let port_value = match f.get("port") {
        Some(p) => port(sink, p, &join(path, "port")),
        None => Some(0),
    };
    let end = match f.get("endPort") {
        Some(e) => port(sink, e, &join(path, "endPort")).map(Some),
        None => Some(None),
    };
    let protocol = match f.get("protocol") {
        Some(p) => {
            let pp = join(path, "protocol");
            string(sink, p, &pp).and_then(|s| {
                let parsed = Protocol::parse(s);
                if parsed.is_none() {
                    sink.error(
                        &pp,
                        format!("unknown protocol {s:?} (expected TCP, UDP, SCTP or ANY)"),
                    );
                }
                parsed
            })
        }
        None => Some(Protocol::Any),
    };
    let (port_value, end) = (port_value?, end?);
    let end_port = match end {
        None | Some(0) => port_value,
        Some(_) if port_value == 0 => {
            sink.error(&join(path, "endPort"), "endPort needs a port");
            return None;
        }
        Some(e) if e < port_value => {
            sink.error(
                &join(path, "endPort"),
                format!("endPort {e} is lower than port {port_value}"),
            );
            return None;
        }
        Some(e) => e,
    };
    Some(PortProtocol {
        port: port_value,
        end_port,
        protocol: protocol?,
    })
}

/// `rules`: only `dns` is enforceable; every other L7 kind is an error.
fn l7_rules(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Vec<NamePattern>> {
    let f = fields(sink, v, path, &["dns", "http", "kafka", "l7proto", "l7"])?;
    for l7 in ["http", "kafka", "l7proto", "l7"] {
        if f.has(l7) {
            sink.error(
                &join(path, l7),
                format!("L7 {l7} rules are not enforced by dnsfence; ignoring them would allow more than the policy says"),
            );
        }
    }
    let dns = f.get("dns")?;
    let dns_path = join(path, "dns");
    let items = list(sink, dns, &dns_path)?;
    let errors_before = sink.errors();
    let out: Vec<NamePattern> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| name_pattern(sink, item, &index(&dns_path, i)))
        .collect();
    (sink.errors() == errors_before).then_some(out)
}
