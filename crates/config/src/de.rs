//! Serde helpers for the values configuration sections share: durations as operators
//! write them (`100ms`, `5s`, `1h`), and lists of addresses whose bad elements are each
//! named by their index (`[1]: invalid IP address "x"`, one line each, which
//! [`crate::read`] appends to the key's path).

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_yaml_ng::Value;

/// A duration like `100ms`, `5s` or `1h`.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// `s` as a duration; `Err` says what is wrong with it.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 100ms, 5s or 1h: {e}"))
}

/// A duration as an operator writes it: `1h`, `7days`, `100ms`.
pub fn show_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Addresses are parsed one by one, so that each bad one is named by its index and value:
/// one line each, starting with the index (`[1]: invalid IP address "x"`).
fn addresses<'de, D: Deserializer<'de>, A: FromStr>(
    d: D,
    what: &str,
    hint: &str,
) -> Result<Vec<A>, D::Error> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (i, v) in Vec::<Value>::deserialize(d)?.iter().enumerate() {
        match address(v, what, hint) {
            Ok(a) => good.push(a),
            Err(m) => bad.push(format!("[{i}]: {m}")),
        }
    }
    if bad.is_empty() {
        Ok(good)
    } else {
        Err(serde::de::Error::custom(bad.join("\n")))
    }
}

/// `v` as an address; `Err` says what is wrong with it.
fn address<A: FromStr>(v: &Value, what: &str, hint: &str) -> Result<A, String> {
    match v {
        Value::String(s) => s.parse().map_err(|_| format!("invalid {what} {s:?}{hint}")),
        other => Err(format!(
            "invalid {what} {} (expected a string)",
            show_value(other)
        )),
    }
}

/// A value as YAML shows it, on one line where it fits.
pub fn show_value(v: &Value) -> String {
    serde_yaml_ng::to_string(v)
        .map(|t| t.trim_end().to_owned())
        .unwrap_or_default()
}

/// A list of IP addresses.
pub fn ip_addresses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    addresses(d, "IP address", "")
}

/// A list of CIDRs (`10.96.0.0/12`).
pub fn cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    addresses(
        d,
        "CIDR",
        " (expected ADDRESS/LENGTH, like 10.96.0.0/12 or fd00::/8)",
    )
}

const SOCKET_HINT: &str = " (expected IP:port, like 127.0.0.1:53 or \"[::1]:53\")";

/// A list of socket addresses (`127.0.0.1:53`).
pub fn socket_addresses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    addresses(d, "socket address", SOCKET_HINT)
}

/// An optional socket address (`null` for none).
pub fn socket_address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v) => address(&v, "socket address", SOCKET_HINT)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Lists {
        #[serde(default, deserialize_with = "ip_addresses")]
        ips: Vec<IpAddr>,
        #[serde(default, deserialize_with = "socket_address")]
        at: Option<SocketAddr>,
        #[serde(default, deserialize_with = "duration")]
        wait: Duration,
    }

    fn read(text: &str) -> Result<Lists, String> {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn every_bad_address_is_named_by_its_index() {
        let err = read("ips: [10.0.0.1, x, 3, \"::1\"]").unwrap_err();
        assert!(err.contains("[1]: invalid IP address \"x\""), "{err}");
        assert!(
            err.contains("[2]: invalid IP address 3 (expected a string)"),
            "{err}"
        );
        let ok = read("ips: [10.0.0.1, \"::1\"]\nat: null\nwait: 250ms").unwrap();
        assert_eq!(ok.ips.len(), 2);
        assert_eq!((ok.at, ok.wait), (None, Duration::from_millis(250)));
        assert!(read("at: \"localhost:53\"")
            .unwrap_err()
            .contains("expected IP:port"));
        assert!(read("wait: soon")
            .unwrap_err()
            .contains("is not a duration like 100ms"));
        assert_eq!(show_duration(Duration::from_secs(3600)), "1h");
    }
}
