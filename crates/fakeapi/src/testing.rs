//! Helpers for the unit tests: one request to a running server over a fresh connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

use crate::FakeApiServer;

/// A request on a fresh connection; returns (status code, headers+body text).
pub(crate) fn http(
    server: &FakeApiServer,
    method: &str,
    target: &str,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server may close first (down): a failed write is an answer too.
    let _ = write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/merge-patch+json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

/// The JSON body of an answer [`http`] returned.
pub(crate) fn json_body(text: &str) -> Value {
    serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap()
}
