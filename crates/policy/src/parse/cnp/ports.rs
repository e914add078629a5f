//! `protocols[]` (and the older `ports[]`) of a `ClusterNetworkPolicy` rule, as
//! [`PortProtocol`] values. Named ports are refused: dnsfence has no pod specs to resolve them.

use serde_yaml_ng::Value;

use super::MAX_ITEMS;
use crate::diag::Sink;
use crate::model::{PortProtocol, Protocol};
use crate::parse::value::{bounded_list, exactly_one, fields, index, integer, join, string};

const NAMED_PORT: &str = "named ports are not supported by dnsfence (it has no pod specs to resolve them); use a port number";

/// `protocols`: `tcp`, `udp` or `sctp` with a `destinationPort` (`number` or `range`).
pub(super) fn protocols(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Vec<PortProtocol>> {
    let items = bounded_list(sink, v, path, MAX_ITEMS)?;
    let errors_before = sink.errors();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let Some(f) = fields(
            sink,
            item,
            &p,
            &["tcp", "udp", "sctp", "destinationNamedPort"],
        ) else {
            continue;
        };
        let Some((field, value)) = exactly_one(
            sink,
            &f,
            &p,
            &["tcp", "udp", "sctp", "destinationNamedPort"],
        ) else {
            continue;
        };
        let fp = join(&p, field);
        let protocol = match field {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            _ => {
                sink.error(&fp, NAMED_PORT);
                continue;
            }
        };
        let Some(pf) = fields(sink, value, &fp, &["destinationPort"]) else {
            continue;
        };
        let dp_path = join(&fp, "destinationPort");
        let Some(dp) = pf.get("destinationPort") else {
            sink.error(&dp_path, "missing field");
            continue;
        };
        let Some(df) = fields(sink, dp, &dp_path, &["number", "range"]) else {
            continue;
        };
        match exactly_one(sink, &df, &dp_path, &["number", "range"]) {
            Some(("number", n)) => {
                if let Some(port) = integer(sink, n, &join(&dp_path, "number"), 1, 65535) {
                    out.push(single(port, protocol));
                }
            }
            Some((_, r)) => {
                if let Some(pp) = range(sink, r, &join(&dp_path, "range"), protocol, &[]) {
                    out.push(pp);
                }
            }
            None => {}
        }
    }
    (sink.errors() == errors_before).then_some(out)
}

/// The older `ports`: `portNumber {protocol, port}`, `portRange {protocol, start, end}` or
/// `namedPort`; `protocol` defaults to TCP.
pub(super) fn ports(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Vec<PortProtocol>> {
    let items = bounded_list(sink, v, path, MAX_ITEMS)?;
    let errors_before = sink.errors();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let known = ["portNumber", "portRange", "namedPort"];
        let Some(f) = fields(sink, item, &p, &known) else {
            continue;
        };
        let Some((field, value)) = exactly_one(sink, &f, &p, &known) else {
            continue;
        };
        let fp = join(&p, field);
        match field {
            "portNumber" => {
                let Some(nf) = fields(sink, value, &fp, &["protocol", "port"]) else {
                    continue;
                };
                let protocol = protocol(sink, nf.get("protocol"), &join(&fp, "protocol"));
                let port = match nf.get("port") {
                    Some(n) => integer(sink, n, &join(&fp, "port"), 1, 65535),
                    None => {
                        sink.error(&join(&fp, "port"), "missing field");
                        None
                    }
                };
                if let (Some(protocol), Some(port)) = (protocol, port) {
                    out.push(single(port, protocol));
                }
            }
            "portRange" => {
                let Some(rf) = fields(sink, value, &fp, &["protocol", "start", "end"]) else {
                    continue;
                };
                if let Some(protocol) = protocol(sink, rf.get("protocol"), &join(&fp, "protocol")) {
                    if let Some(pp) = range(sink, value, &fp, protocol, &["protocol"]) {
                        out.push(pp);
                    }
                }
            }
            _ => sink.error(&fp, NAMED_PORT),
        }
    }
    (sink.errors() == errors_before).then_some(out)
}

fn single(port: u16, protocol: Protocol) -> PortProtocol {
    PortProtocol {
        port,
        end_port: port,
        protocol,
    }
}

/// `{start, end}` (plus the `extra` fields the caller reads), `start < end`.
fn range(
    sink: &mut Sink<'_>,
    v: &Value,
    path: &str,
    protocol: Protocol,
    extra: &[&str],
) -> Option<PortProtocol> {
    let mut known = vec!["start", "end"];
    known.extend_from_slice(extra);
    let f = fields(sink, v, path, &known)?;
    let mut bound = |name: &str| match f.get(name) {
        Some(n) => integer(sink, n, &join(path, name), 1, 65535),
        None => {
            sink.error(&join(path, name), "missing field");
            None
        }
    };
    let (start, end) = (bound("start"), bound("end"));
    let (start, end) = (start?, end?);
    if start >= end {
        sink.error(
            &join(path, "end"),
            format!("end {end} must be greater than start {start}"),
        );
        return None;
    }
    Some(PortProtocol {
        port: start,
        end_port: end,
        protocol,
    })
}

/// A Kubernetes protocol name; TCP when absent.
fn protocol(sink: &mut Sink<'_>, v: Option<&Value>, path: &str) -> Option<Protocol> {
    let Some(v) = v else {
        return Some(Protocol::Tcp);
    };
    let s = string(sink, v, path)?;
    match s {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => {
            sink.error(
                path,
                format!("unknown protocol {s:?} (expected TCP, UDP or SCTP)"),
            );
            None
        }
    }
}
