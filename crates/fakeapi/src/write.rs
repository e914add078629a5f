//! Writes through the API: `POST` (create) and JSON merge `PATCH`, with the real server's
//! checks of `events.k8s.io/v1` Events; posted and patched Events are recorded for
//! [`crate::FakeApiServer::posted_events`].
//!
//! Objects reach the store only through [`crate::store::store`].

use serde_json::{json, Map, Value};

use crate::http::{Reply, Request};
use crate::resources::ResourceType;
use crate::status::{bad_request, invalid, not_found_object, not_found_path, status};
use crate::store::{store, Key};
use crate::Shared;

fn parse_body(req: &Request) -> Result<Value, Reply> {
    serde_json::from_slice::<Value>(&req.body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| bad_request("the body of the request was in an unknown format"))
}

/// What the real server checks of an `events.k8s.io/v1` Event it creates.
fn validate_event(event: &Value) -> Vec<(&'static str, String)> {
    let mut causes = Vec::new();
    let required = |v: &Value| v.as_str().is_some_and(|s| !s.is_empty());
    if event.get("eventTime").is_none_or(Value::is_null) {
        causes.push(("eventTime", "Required value".to_owned()));
    }
    for field in [
        "reportingController",
        "reportingInstance",
        "action",
        "reason",
    ] {
        if !required(&event[field]) {
            causes.push((field, "Required value".to_owned()));
        }
    }
    if !matches!(event["type"].as_str(), Some("Normal" | "Warning")) {
        causes.push((
            "type",
            format!(
                "Unsupported value: {}: supported values: \"Normal\", \"Warning\"",
                event["type"]
            ),
        ));
    }
    if event["note"].as_str().is_some_and(|n| n.len() > 1024) {
        causes.push((
            "note",
            "Too long: may not be more than 1024 bytes".to_owned(),
        ));
    }
    if !event["regarding"].is_object() {
        causes.push(("regarding", "Required value".to_owned()));
    }
    causes
}

pub(crate) fn create(
    shared: &Shared,
    rt: &'static ResourceType,
    namespace: Option<String>,
    req: &Request,
) -> Reply {
    let mut body = match parse_body(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if rt.namespaced {
        let Some(ns) = namespace else {
            return not_found_path();
        };
        match body["metadata"]["namespace"].as_str() {
            None | Some("") => {
                if !body["metadata"].is_object() {
                    body["metadata"] = json!({});
                }
                body["metadata"]["namespace"] = json!(ns);
            }
            Some(n) if n == ns => {}
            Some(_) => {
                return bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            }
        }
    }
    let name = body["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if rt.plural == "events" {
        let causes = validate_event(&body);
        if !causes.is_empty() {
            return invalid(rt, &name, &causes);
        }
    }
    let mut state = shared.lock();
    if !name.is_empty() {
        let key: Key = (
            rt.plural,
            body["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            name.clone(),
        );
        if state.objects.contains_key(&key) {
            let mut details = json!({"name": name, "kind": rt.plural});
            if !rt.group.is_empty() {
                details["group"] = json!(rt.group);
            }
            return Reply::Json(
                409,
                status(
                    409,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", rt.qualified()),
                    Some(details),
                ),
            );
        }
    }
    if rt.plural == "events" {
        state.posted.push(body.clone());
    }
    let stored = store(&mut state, rt, body);
    drop(state);
    shared.changed.notify_all();
    match stored {
        Ok(o) => Reply::Json(201, o),
        Err(e) => invalid(rt, &name, &[("metadata", e)]),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(t) = target.as_object_mut() {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

pub(crate) fn patch(
    shared: &Shared,
    rt: &'static ResourceType,
    namespace: Option<String>,
    name: String,
    req: &Request,
) -> Reply {
    let content_type = req
        .headers
        .get("content-type")
        .map(String::as_str)
        .unwrap_or("");
    if !matches!(
        content_type.split(';').next().unwrap_or("").trim(),
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return Reply::Json(
            415,
            status(
                415,
                "UnsupportedMediaType",
                &format!("the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"),
                None,
            ),
        );
    }
    let body = match parse_body(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let key: Key = (rt.plural, namespace.unwrap_or_default(), name);
    let mut state = shared.lock();
    let Some(mut object) = state.objects.get(&key).cloned() else {
        return not_found_object(rt, &key.2);
    };
    merge_patch(&mut object, &body);
    if object["metadata"]["name"].as_str() != Some(key.2.as_str())
        || (rt.namespaced && object["metadata"]["namespace"].as_str() != Some(key.1.as_str()))
    {
        return invalid(
            rt,
            &key.2,
            &[("metadata.name", "field is immutable".to_owned())],
        );
    }
    if rt.plural == "events" {
        let causes = validate_event(&object);
        if !causes.is_empty() {
            return invalid(rt, &key.2, &causes);
        }
        state.posted.push(body);
    }
    let stored = store(&mut state, rt, object);
    drop(state);
    shared.changed.notify_all();
    match stored {
        Ok(o) => Reply::Json(200, o),
        Err(e) => invalid(rt, &key.2, &[("metadata", e)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{http, json_body};
    use crate::FakeApiServer;

    #[test]
    fn events_are_validated_recorded_and_patched() {
        let api = FakeApiServer::start();
        let event = json!({
            "metadata": {"name": "p.1"},
            "eventTime": "2024-01-01T00:00:00.000000Z",
            "reportingController": "c", "reportingInstance": "i",
            "action": "Validate", "reason": "InvalidPolicy", "type": "Warning",
            "regarding": {"kind": "EgressPolicy", "name": "p", "namespace": "shop"},
            "note": "bad"
        });
        let (code, text) = http(
            &api,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/shop/events",
            &event.to_string(),
        );
        assert_eq!(code, 201, "{text}");
        assert_eq!(json_body(&text)["metadata"]["namespace"], "shop");
        let (code, _) = http(
            &api,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/shop/events",
            &event.to_string(),
        );
        assert_eq!(code, 409);
        let (code, _) = http(
            &api,
            "PATCH",
            "/apis/events.k8s.io/v1/namespaces/shop/events/p.1",
            r#"{"series": {"count": 2, "lastObservedTime": "2024-01-01T00:00:01.000000Z"}}"#,
        );
        assert_eq!(code, 200);
        let mut bad = event.clone();
        bad["metadata"]["name"] = json!("p.2");
        bad["reason"] = json!("");
        let (code, text) = http(
            &api,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/shop/events",
            &bad.to_string(),
        );
        assert_eq!(
            (code, json_body(&text)["reason"].as_str()),
            (422, Some("Invalid"))
        );
        let posted = api.posted_events();
        assert_eq!(posted.len(), 2, "the post and the patch");
        assert_eq!(posted[1]["series"]["count"], 2);
    }
}
