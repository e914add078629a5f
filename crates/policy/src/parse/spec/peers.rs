//! L3 peers given as data: `toCIDR`, `toCIDRSet` (with `except`), `toEntities` and
//! `toFQDNs` (also the `matchName`/`matchPattern` of DNS rules).

use ipnet::IpNet;
use serde_yaml_ng::Value;

use crate::diag::Sink;
use crate::model::{CidrRule, Entity};
use crate::parse::value::{fields, index, join, list, string};
use crate::pattern::{NamePattern, PatternField};

fn cidr(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<IpNet> {
    let s = string(sink, v, path)?;
    let parsed = s
        .parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
    match parsed {
        Ok(net) => Some(net.trunc()),
        Err(_) => {
            sink.error(
                path,
                format!("{s:?} is not a valid CIDR (like 192.0.2.0/24 or 2001:db8::/32)"),
            );
            None
        }
    }
}

pub(super) fn cidrs(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Vec<CidrRule>> {
    let items = list(sink, v, path)?;
    let mut out = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match cidr(sink, item, &index(path, i)) {
            Some(cidr) => out.push(CidrRule {
                cidr,
                except: Vec::new(),
            }),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

pub(super) fn cidr_sets(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Vec<CidrRule>> {
    let items = list(sink, v, path)?;
    let mut out = Vec::new();
    let errors_before = sink.errors();
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let Some(f) = fields(
            sink,
            item,
            &p,
            &["cidr", "except", "cidrGroupRef", "cidrGroupSelector"],
        ) else {
            continue;
        };
        for unsupported in ["cidrGroupRef", "cidrGroupSelector"] {
            if f.has(unsupported) {
                sink.error(
                    &join(&p, unsupported),
                    "CIDR groups are not supported by dnsfence; list the CIDRs",
                );
            }
        }
        let Some(c) = f.get("cidr") else {
            sink.error(&join(&p, "cidr"), "missing field");
            continue;
        };
        let Some(c) = cidr(sink, c, &join(&p, "cidr")) else {
            continue;
        };
        let mut except = Vec::new();
        if let Some(ex) = f.get("except") {
            let ex_path = join(&p, "except");
            for (j, e) in list(sink, ex, &ex_path)
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                let ep = index(&ex_path, j);
                if let Some(e) = cidr(sink, e, &ep) {
                    if c.contains(&e) {
                        except.push(e);
                    } else {
                        sink.error(&ep, format!("{e} is not inside {c}"));
                    }
                }
            }
        }
        out.push(CidrRule { cidr: c, except });
    }
    (sink.errors() == errors_before).then_some(out)
}

pub(super) fn entities(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Vec<Entity>> {
    let items = list(sink, v, path)?;
    let mut out = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let Some(s) = string(sink, item, &p) else {
            ok = false;
            continue;
        };
        match Entity::parse(s) {
            Some(e) => out.push(e),
            None => {
                ok = false;
                sink.error(
                    &p,
                    format!("entity {s:?} is not supported by dnsfence (supported: world, world-ipv4, world-ipv6, cluster, host, all)"),
                );
            }
        }
    }
    ok.then_some(out)
}

/// A `toFQDNs` or `rules.dns` entry: exactly one of `matchName` and `matchPattern`.
pub(super) fn name_pattern(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<NamePattern> {
    let f = fields(sink, v, path, &["matchName", "matchPattern"])?;
    let (field, text) = match (f.get("matchName"), f.get("matchPattern")) {
        (Some(_), Some(_)) => {
            sink.error(
                path,
                "exactly one of matchName and matchPattern is allowed, found both",
            );
            return None;
        }
        (None, None) => {
            sink.error(
                path,
                "exactly one of matchName and matchPattern is required, found neither",
            );
            return None;
        }
        (Some(n), None) => (PatternField::MatchName, n),
        (None, Some(p)) => (PatternField::MatchPattern, p),
    };
    let p = join(path, field.as_str());
    let text = string(sink, text, &p)?;
    match NamePattern::parse(field, text) {
        Ok(pattern) => Some(pattern),
        Err(e) => {
            sink.error(&p, format!("{text:?}: {e}"));
            None
        }
    }
}

pub(super) fn fqdns(sink: &mut Sink<'_>, v: &Value, path: &str) -> Option<Vec<NamePattern>> {
    let items = list(sink, v, path)?;
    let errors_before = sink.errors();
    let out: Vec<NamePattern> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| name_pattern(sink, item, &index(path, i)))
        .collect();
    (sink.errors() == errors_before).then_some(out)
}
