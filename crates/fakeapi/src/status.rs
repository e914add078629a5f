//! The API's error answers as the real server writes them: `Status` objects with their
//! reason, message and details (404, 400, 410, 422, 504).
//!
//! Pure: builds replies, decides nothing.

use serde_json::{json, Value};

use crate::http::Reply;
use crate::resources::ResourceType;

/// A `Status` object as the real server writes it.
pub(crate) fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

pub(crate) fn not_found_path() -> Reply {
    Reply::Json(
        404,
        status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            Some(json!({})),
        ),
    )
}

pub(crate) fn bad_request(message: &str) -> Reply {
    Reply::Json(400, status(400, "BadRequest", message, None))
}

pub(crate) fn not_found_object(rt: &ResourceType, name: &str) -> Reply {
    let mut details = json!({"name": name, "kind": rt.plural});
    if !rt.group.is_empty() {
        details["group"] = json!(rt.group);
    }
    Reply::Json(
        404,
        status(
            404,
            "NotFound",
            &format!("{} \"{name}\" not found", rt.qualified()),
            Some(details),
        ),
    )
}

pub(crate) fn too_large_rv() -> Reply {
    Reply::Json(
        504,
        status(
            504,
            "Timeout",
            "Too large resource version",
            Some(json!({"causes": [{"reason": "ResourceVersionTooLarge",
                                    "message": "Too large resource version"}],
                        "retryAfterSeconds": 1})),
        ),
    )
}

pub(crate) fn expired(message: &str) -> Value {
    status(410, "Expired", message, None)
}

pub(crate) fn invalid(rt: &ResourceType, name: &str, causes: &[(&str, String)]) -> Reply {
    let message = format!(
        "{} \"{name}\" is invalid: {}",
        rt.qualified(),
        causes
            .iter()
            .map(|(f, m)| format!("{f}: {m}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let causes: Vec<Value> = causes
        .iter()
        .map(|(f, m)| json!({"reason": "FieldValueInvalid", "message": m, "field": f}))
        .collect();
    let mut details = json!({"name": name, "kind": rt.kind, "causes": causes});
    if !rt.group.is_empty() {
        details["group"] = json!(rt.group);
    }
    Reply::Json(422, status(422, "Invalid", &message, Some(details)))
}
