//! HTTP/1.1 on blocking sockets: the accept loop (one thread per connection), reading
//! requests (content-length and chunked bodies, pipelining, percent-decoded queries) and
//! writing replies. What to answer is [`crate::routes::route`]'s; watch streams are
//! [`crate::watch`]'s.
//!
//! It knows nothing of Kubernetes objects: no store access beyond the shutdown and down
//! flags and the request log.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use crate::routes::route;
use crate::status::status;
use crate::watch::{serve_watch, WatchRequest};
use crate::{Shared, TICK};

/// Accepts connections until shutdown; one thread per connection.
pub(crate) fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let (shutdown, down) = {
            let state = shared.lock();
            (state.shutdown, state.down)
        };
        if shutdown {
            break;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if down {
                    let _ = stream.shutdown(Shutdown::Both);
                    continue;
                }
                let shared = shared.clone();
                connections.retain(|c| !c.is_finished());
                if let Ok(t) = std::thread::Builder::new()
                    .name("fake-apiserver-conn".into())
                    .spawn(move || serve_connection(&shared, stream))
                {
                    connections.push(t);
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    for c in connections {
        let _ = c.join();
    }
}

/// One HTTP request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    /// Decoded query pairs, in order.
    query: Vec<(String, String)>,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) body: Vec<u8>,
}

impl Request {
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn log_line(&self) -> String {
        if self.query.is_empty() {
            format!("{} {}", self.method, self.path)
        } else {
            let q: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{} {}?{}", self.method, self.path, q.join("&"))
        }
    }
}

/// Why reading a request stopped.
enum ReadEnd {
    /// The peer closed, or the server is shutting down or down.
    Closed,
    /// Not HTTP.
    Malformed(String),
}

fn should_close(shared: &Shared) -> bool {
    let state = shared.lock();
    state.shutdown || state.down
}

/// Reads one request; `buf` keeps bytes of the next (pipelining).
fn read_request(
    shared: &Shared,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Request, ReadEnd> {
    let mut chunk = [0u8; 16 * 1024];
    let mut fill = |buf: &mut Vec<u8>| -> Result<(), ReadEnd> {
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => return Err(ReadEnd::Closed),
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if should_close(shared) {
                        return Err(ReadEnd::Closed);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(ReadEnd::Closed),
            }
        }
    };
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 1 << 20 {
            return Err(ReadEnd::Malformed("header too large".into()));
        }
        fill(buf)?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadEnd::Malformed(format!(
            "bad request line {request_line:?}"
        )));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ReadEnd::Malformed(format!("unsupported {version}")));
    }
    let mut headers = BTreeMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut req = Request {
        method: method.to_owned(),
        path: percent_decode(path, false),
        query: parse_query(query),
        headers,
        body: Vec::new(),
    };
    buf.drain(..head_end + 4);
    let chunked = req
        .headers
        .get("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            match decode_chunked(buf) {
                Ok(Some((body, used))) => {
                    req.body = body;
                    buf.drain(..used);
                    break;
                }
                Ok(None) => fill(buf)?,
                Err(e) => return Err(ReadEnd::Malformed(e)),
            }
        }
    } else {
        let len: usize = match req.headers.get("content-length") {
            None => 0,
            Some(v) => v
                .parse()
                .map_err(|_| ReadEnd::Malformed(format!("bad content-length {v:?}")))?,
        };
        while buf.len() < len {
            fill(buf)?;
        }
        req.body = buf.drain(..len).collect();
    }
    Ok(req)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A complete chunked body at the start of `buf`: (body, bytes used); `None` when more
/// bytes are needed.
fn decode_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_end) = find(&buf[at..], b"\r\n") else {
            return Ok(None);
        };
        let size_line = String::from_utf8_lossy(&buf[at..at + line_end]).into_owned();
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_line:?}"))?;
        at += line_end + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(end) = find(&buf[at..], b"\r\n") else {
                    return Ok(None);
                };
                at += end + 2;
                if end == 0 {
                    return Ok(Some((body, at)));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// `%XX` (and `+` as a space in a query) decoded.
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'+' && plus_is_space {
            out.push(b' ');
        } else if b == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            match u8::from_str_radix(hex, 16) {
                Ok(v) => {
                    out.push(v);
                    i += 2;
                }
                Err(_) => out.push(b),
            }
        } else {
            out.push(b);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What to answer.
pub(crate) enum Reply {
    Json(u16, Value),
    Text(u16, &'static str),
    Watch(Box<WatchRequest>),
}

fn serve_connection(shared: &Arc<Shared>, mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(TICK));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let req = match read_request(shared, &mut stream, &mut buf) {
            Ok(r) => r,
            Err(ReadEnd::Closed) => break,
            Err(ReadEnd::Malformed(why)) => {
                let _ = write_json(&mut stream, 400, &status(400, "BadRequest", &why, None));
                break;
            }
        };
        {
            let mut state = shared.lock();
            if state.down || state.shutdown {
                break;
            }
            state.requests.push(req.log_line());
        }
        let close = req
            .headers
            .get("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let written = match route(shared, &req) {
            Reply::Json(code, body) => write_json(&mut stream, code, &body),
            Reply::Text(code, text) => write_text(&mut stream, code, text),
            Reply::Watch(w) => {
                serve_watch(shared, &mut stream, &w);
                break;
            }
        };
        if written.is_err() || close {
            break;
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

fn write_json(stream: &mut TcpStream, code: u16, body: &Value) -> io::Result<()> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {code} {}\r\nAudit-Id: fake\r\nCache-Control: no-cache, private\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        reason_phrase(code),
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    stream.write_all(&out)
}

fn write_text(stream: &mut TcpStream, code: u16, text: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{text}",
        reason_phrase(code),
        text.len()
    );
    stream.write_all(head.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::http;
    use crate::FakeApiServer;

    #[test]
    fn query_strings_are_decoded_as_kube_encodes_them() {
        assert_eq!(
            parse_query("labelSelector=zone+in+%28a%2Cb%29&limit=500&watch"),
            [
                ("labelSelector".to_owned(), "zone in (a,b)".to_owned()),
                ("limit".to_owned(), "500".to_owned()),
                ("watch".to_owned(), String::new()),
            ]
        );
        assert_eq!(percent_decode("%2", true), "%2");
    }

    #[test]
    fn chunked_bodies_decode_when_complete() {
        assert_eq!(
            decode_chunked(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\nNEXT").unwrap(),
            Some((b"abcde".to_vec(), 24))
        );
        assert_eq!(decode_chunked(b"3\r\nab").unwrap(), None);
        assert!(decode_chunked(b"zz\r\n").is_err());
    }

    #[test]
    fn down_refuses_connections() {
        let api = FakeApiServer::start();
        api.set_down(true);
        let (code, _) = http(&api, "GET", "/api/v1/namespaces", "");
        assert_eq!(code, 0, "no answer while down");
        api.set_down(false);
        let (code, _) = http(&api, "GET", "/api/v1/namespaces", "");
        assert_eq!(code, 200);
    }
}
