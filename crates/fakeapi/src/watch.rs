//! Watch streams: parsing a watch request, the replay from a resource version (or the
//! initial `ADDED` events, with the streaming-list `BOOKMARK`), then following the store's
//! history as a chunked stream until timeout, a dropped connection, compaction or
//! [`crate::FakeApiServer::break_watches`].
//!
//! It reads the store and never changes it.

use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::http::{Reply, Request};
use crate::resources::ResourceType;
use crate::routes::{parse_rv, Filter};
use crate::status::{bad_request, expired, status};
use crate::store::{current, ChangeType, HistoryEntry};
use crate::{Shared, TICK};

/// Watch timeout when the client gives none (the real server picks 30 to 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// A parsed watch request.
#[derive(Debug)]
pub(crate) struct WatchRequest {
    filter: Filter,
    /// `None`: start with the current objects.
    from: Option<u64>,
    send_initial_events: bool,
    bookmarks: bool,
    timeout: Duration,
}

impl WatchRequest {
    pub(crate) fn parse(
        rt: &'static ResourceType,
        namespace: Option<String>,
        req: &Request,
    ) -> Result<Self, Reply> {
        let filter = Filter::parse(rt, namespace, req)?;
        let bookmarks = req.param("allowWatchBookmarks") == Some("true");
        let send_initial_events = req.param("sendInitialEvents") == Some("true");
        let rv_match = req.param("resourceVersionMatch").unwrap_or("");
        if send_initial_events && rv_match != "NotOlderThan" {
            return Err(Reply::Json(
                422,
                status(
                    422,
                    "Invalid",
                    "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                    None,
                ),
            ));
        }
        if send_initial_events && !bookmarks {
            return Err(Reply::Json(
                422,
                status(
                    422,
                    "Invalid",
                    "allowWatchBookmarks: Forbidden: sendInitialEvents requires allowWatchBookmarks=true",
                    None,
                ),
            ));
        }
        if !send_initial_events && !rv_match.is_empty() {
            return Err(bad_request(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        let from = match req.param("resourceVersion").unwrap_or("") {
            "" | "0" => None,
            r => Some(parse_rv(r)?),
        };
        let timeout = match req.param("timeoutSeconds") {
            None => DEFAULT_WATCH_TIMEOUT,
            Some(t) => Duration::from_secs(
                t.parse::<u64>()
                    .map_err(|_| bad_request(&format!("timeoutSeconds: Invalid value: \"{t}\"")))?,
            ),
        };
        Ok(Self {
            filter,
            from,
            send_initial_events,
            bookmarks,
            timeout,
        })
    }
}

/// The watch event of `entry` for `filter`, if it concerns it.
fn watch_event(filter: &Filter, entry: &HistoryEntry) -> Option<Value> {
    if entry.resource != filter.rt.plural {
        return None;
    }
    let now = filter.matches(&entry.object);
    let event = |t: &str, o: &Value| json!({"type": t, "object": o});
    match entry.change {
        ChangeType::Added | ChangeType::Deleted => {
            now.then(|| event(entry.change.as_str(), &entry.object))
        }
        ChangeType::Modified => {
            let before = entry.previous.as_ref().is_some_and(|p| filter.matches(p));
            match (before, now) {
                (true, true) => Some(event("MODIFIED", &entry.object)),
                (false, true) => Some(event("ADDED", &entry.object)),
                (true, false) => {
                    // Left the selection: the old state, at the change's version.
                    let mut old = entry.previous.clone().unwrap_or_default();
                    old["metadata"]["resourceVersion"] = json!(entry.rv.to_string());
                    Some(event("DELETED", &old))
                }
                (false, false) => None,
            }
        }
    }
}

fn bookmark(rt: &ResourceType, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"type": "BOOKMARK", "object": {"kind": rt.kind, "apiVersion": rt.api_version(),
                                           "metadata": meta}})
}

fn write_chunk(stream: &mut TcpStream, event: &Value) -> io::Result<()> {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    let mut out = format!("{:x}\r\n", line.len()).into_bytes();
    out.extend_from_slice(&line);
    out.extend_from_slice(b"\r\n");
    stream.write_all(&out)?;
    stream.flush()
}

/// Whether the client closed its end (checked while a watch is idle).
fn peer_closed(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    let closed = match stream.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    closed
}

/// How a watch ended.
enum WatchEnd {
    /// Timeout: a clean end of the stream.
    Timeout,
    /// Dropped (break_watches, down, shutdown, client gone): no final chunk.
    Dropped,
}

pub(crate) fn serve_watch(shared: &Shared, stream: &mut TcpStream, w: &WatchRequest) {
    let deadline = Instant::now() + w.timeout;
    let rt = w.filter.rt;
    // Under one lock: the start point, the replay and the epoch this watch belongs to.
    let (epoch, mut cursor, first) = {
        let state = shared.lock();
        let epoch = state.epoch;
        match w.from {
            Some(r) if r < state.compacted && !w.send_initial_events => {
                drop(state);
                let _ = write_watch_head(stream);
                let _ = write_chunk(
                    stream,
                    &json!({"type": "ERROR", "object": expired("too old resource version")}),
                );
                let _ = stream.write_all(b"0\r\n\r\n");
                return;
            }
            Some(r) if !w.send_initial_events => {
                let events: Vec<Value> = state
                    .history
                    .iter()
                    .skip(state.history.partition_point(|e| e.rv <= r))
                    .filter_map(|e| watch_event(&w.filter, e))
                    .collect();
                (epoch, state.rv.max(r), events)
            }
            _ => {
                let mut events: Vec<Value> = current(&state, rt)
                    .into_iter()
                    .filter(|o| w.filter.matches(o))
                    .map(|o| json!({"type": "ADDED", "object": o}))
                    .collect();
                if w.send_initial_events {
                    events.push(bookmark(rt, state.rv, true));
                }
                (epoch, state.rv, events)
            }
        }
    };
    if write_watch_head(stream).is_err() {
        return;
    }
    for e in &first {
        if write_chunk(stream, e).is_err() {
            return;
        }
    }
    let end = loop {
        let (events, end) = {
            let mut state = shared.lock();
            let mut idle_checks = 0u32;
            loop {
                if state.shutdown || state.down || state.epoch != epoch {
                    break (Vec::new(), Some(WatchEnd::Dropped));
                }
                if state.rv > cursor {
                    let events: Vec<Value> = state
                        .history
                        .iter()
                        .skip(state.history.partition_point(|e| e.rv <= cursor))
                        .filter_map(|e| watch_event(&w.filter, e))
                        .collect();
                    cursor = state.rv;
                    if !events.is_empty() {
                        break (events, None);
                    }
                }
                let now = Instant::now();
                if now >= deadline {
                    break (Vec::new(), Some(WatchEnd::Timeout));
                }
                idle_checks += 1;
                if idle_checks.is_multiple_of(10) && peer_closed(stream) {
                    break (Vec::new(), Some(WatchEnd::Dropped));
                }
                state = shared
                    .changed
                    .wait_timeout(state, (deadline - now).min(TICK))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        };
        for e in &events {
            if write_chunk(stream, e).is_err() {
                return;
            }
        }
        if let Some(end) = end {
            break end;
        }
    };
    match end {
        WatchEnd::Timeout => {
            if w.bookmarks {
                let _ = write_chunk(stream, &bookmark(rt, cursor, false));
            }
            let _ = stream.write_all(b"0\r\n\r\n");
        }
        WatchEnd::Dropped => {}
    }
}

fn write_watch_head(stream: &mut TcpStream) -> io::Result<()> {
    stream.write_all(
        b"HTTP/1.1 200 OK\r\nAudit-Id: fake\r\nCache-Control: no-cache, private\r\n\
          Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{http, json_body};
    use crate::FakeApiServer;

    #[test]
    fn watches_replay_follow_and_expire() {
        let api = FakeApiServer::start();
        let first = api.apply("namespaces", json!({"metadata": {"name": "a"}}));
        let rv: u64 = first["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        api.apply(
            "namespaces",
            json!({"metadata": {"name": "a", "labels": {"x": "1"}}}),
        );
        api.delete("namespaces", None, "a");
        let (code, text) = http(
            &api,
            "GET",
            &format!("/api/v1/namespaces?watch=true&timeoutSeconds=1&allowWatchBookmarks=true&resourceVersion={}", rv - 1),
            "",
        );
        assert_eq!(code, 200);
        let types: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object)
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(types, ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]);
        api.compact();
        let (code, text) = http(
            &api,
            "GET",
            &format!("/api/v1/namespaces?watch=1&resourceVersion={rv}"),
            "",
        );
        assert_eq!(code, 200);
        assert!(
            text.contains(r#""type":"ERROR""#) && text.contains(r#""code":410"#),
            "{text}"
        );
        // A forbidden resource, and a CRD that is not registered.
        api.forbid("namespaces", true);
        let (code, text) = http(&api, "GET", "/api/v1/namespaces", "");
        assert_eq!(
            (code, json_body(&text)["reason"].as_str()),
            (403, Some("Forbidden"))
        );
        let (code, text) = http(
            &api,
            "GET",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/ciliumnetworkpolicies.cilium.io",
            "",
        );
        assert_eq!(
            (code, json_body(&text)["reason"].as_str()),
            (404, Some("NotFound"))
        );
        let (code, _) = http(&api, "GET", "/apis/cilium.io/v2/ciliumnetworkpolicies", "");
        assert_eq!(code, 404);
        api.register_crd("ciliumnetworkpolicies.cilium.io");
        let (code, _) = http(&api, "GET", "/apis/cilium.io/v2/ciliumnetworkpolicies", "");
        assert_eq!(code, 200);
        assert!(api
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces?watch=true&timeoutSeconds=1")));
    }
}
