//! Routing: a request's path to a resource, namespace and name; the verb; RBAC
//! ([`crate::FakeApiServer::forbid`]) and CRD checks; then `get` and `list` (selectors,
//! `resourceVersion` and `resourceVersionMatch` semantics). Watches go to [`crate::watch`],
//! writes to [`crate::write`].
//!
//! No socket I/O: it returns a [`Reply`].

use serde_json::{json, Value};

use crate::http::{Reply, Request};
use crate::resources::ResourceType;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::status::{bad_request, expired, not_found_object, not_found_path, status, too_large_rv};
use crate::store::{current, snapshot_at, Key};
use crate::watch::WatchRequest;
use crate::write::{create, patch};
use crate::Shared;

/// A request's target: the resource, the namespace in the path, the name.
struct Route {
    rt: &'static ResourceType,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match *segs.first()? {
        "api" if segs.len() >= 3 => ("", segs[1], &segs[2..]),
        "apis" if segs.len() >= 4 => (segs[1], segs[2], &segs[3..]),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return None,
    };
    let rt = ResourceType::find(plural)?;
    if rt.group != group || rt.version != version {
        return None;
    }
    if namespace.is_some() && !rt.namespaced {
        return None;
    }
    if name.is_some() && rt.namespaced && namespace.is_none() {
        return None;
    }
    Some(Route {
        rt,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

pub(crate) fn route(shared: &Shared, req: &Request) -> Reply {
    match req.path.as_str() {
        "/healthz" | "/readyz" | "/livez" => return Reply::Text(200, "ok"),
        "/version" => {
            return Reply::Json(
                200,
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake",
                       "platform": "linux/amd64"}),
            )
        }
        _ => {}
    }
    let Some(route) = parse_route(&req.path) else {
        return not_found_path();
    };
    let watch = matches!(req.param("watch"), Some("true" | "1"));
    let verb = match (req.method.as_str(), &route.name) {
        ("GET", None) if watch => "watch",
        ("GET", None) => "list",
        ("GET", Some(_)) => "get",
        ("POST", None) => "create",
        ("PATCH", Some(_)) => "patch",
        _ => {
            return Reply::Json(
                405,
                status(
                    405,
                    "MethodNotAllowed",
                    &format!("{} is not supported here", req.method),
                    None,
                ),
            )
        }
    };
    let rt = route.rt;
    {
        let state = shared.lock();
        if state.forbidden.contains(rt.plural) {
            let scope = match &route.namespace {
                Some(ns) => format!("in the namespace \"{ns}\""),
                None => "at the cluster scope".to_owned(),
            };
            let message = format!(
                "{}{} is forbidden: User \"system:serviceaccount:dnsfence:dnsfence\" cannot \
                 {verb} resource \"{}\" in API group \"{}\" {scope}",
                rt.qualified(),
                route
                    .name
                    .as_ref()
                    .map(|n| format!(" \"{n}\""))
                    .unwrap_or_default(),
                rt.plural,
                rt.group
            );
            let mut details = json!({"kind": rt.plural});
            if !rt.group.is_empty() {
                details["group"] = json!(rt.group);
            }
            if let Some(n) = &route.name {
                details["name"] = json!(n);
            }
            return Reply::Json(403, status(403, "Forbidden", &message, Some(details)));
        }
        if !rt.builtin()
            && !state.objects.contains_key(&(
                "customresourcedefinitions",
                String::new(),
                rt.crd_name(),
            ))
        {
            return not_found_path();
        }
    }
    match verb {
        "watch" => match WatchRequest::parse(rt, route.namespace, req) {
            Ok(w) => Reply::Watch(Box::new(w)),
            Err(r) => r,
        },
        "list" => list(shared, rt, route.namespace, req),
        "get" => get(shared, rt, route.namespace, route.name.unwrap_or_default()),
        "create" => create(shared, rt, route.namespace, req),
        _ => patch(
            shared,
            rt,
            route.namespace,
            route.name.unwrap_or_default(),
            req,
        ),
    }
}

fn get(
    shared: &Shared,
    rt: &'static ResourceType,
    namespace: Option<String>,
    name: String,
) -> Reply {
    let key: Key = (rt.plural, namespace.unwrap_or_default(), name);
    match shared.lock().objects.get(&key) {
        Some(o) => Reply::Json(200, o.clone()),
        None => not_found_object(rt, &key.2),
    }
}

/// Which objects a list or watch wants.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub(crate) rt: &'static ResourceType,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    pub(crate) fn parse(
        rt: &'static ResourceType,
        namespace: Option<String>,
        req: &Request,
    ) -> Result<Self, Reply> {
        let labels = LabelSelector::parse(req.param("labelSelector").unwrap_or(""))
            .map_err(|e| bad_request(&format!("unable to parse requirement: {e}")))?;
        let fields = FieldSelector::parse(req.param("fieldSelector").unwrap_or(""))
            .map_err(|e| bad_request(&e))?;
        if let Some(f) = fields.0.iter().find(|t| !rt.selectable_field(&t.field)) {
            return Err(bad_request(&format!(
                "field label not supported: {}",
                f.field
            )));
        }
        Ok(Self {
            rt,
            namespace,
            labels,
            fields,
        })
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(ns) = &self.namespace {
            if meta["namespace"].as_str() != Some(ns.as_str()) {
                return false;
            }
        }
        self.labels.matches_object(object) && self.fields.matches(object)
    }
}

pub(crate) fn parse_rv(s: &str) -> Result<u64, Reply> {
    s.parse::<u64>().map_err(|_| {
        Reply::Json(
            400,
            status(
                400,
                "BadRequest",
                &format!("resourceVersion: Invalid value: \"{s}\": must be a non-negative integer"),
                None,
            ),
        )
    })
}

fn list(
    shared: &Shared,
    rt: &'static ResourceType,
    namespace: Option<String>,
    req: &Request,
) -> Reply {
    let filter = match Filter::parse(rt, namespace, req) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Some(limit) = req.param("limit") {
        if limit.parse::<u64>().is_err() {
            return bad_request(&format!("limit: Invalid value: \"{limit}\""));
        }
    }
    if req.param("continue").is_some_and(|c| !c.is_empty()) {
        // This server never hands out continue tokens.
        return bad_request("continue key is not valid: this server does not page");
    }
    let rv_param = req.param("resourceVersion").unwrap_or("");
    let rv_match = req.param("resourceVersionMatch").unwrap_or("");
    let state = shared.lock();
    let (list_rv, objects): (u64, Vec<Value>) = match (rv_param, rv_match) {
        ("", "") => (state.rv, current(&state, rt)),
        ("", _) => {
            return bad_request(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            )
        }
        ("0", "Exact") => {
            return bad_request(
                "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            )
        }
        (r, "" | "NotOlderThan") => {
            let r = match parse_rv(r) {
                Ok(r) => r,
                Err(reply) => return reply,
            };
            if r > state.rv {
                return too_large_rv();
            }
            (state.rv, current(&state, rt))
        }
        (r, "Exact") => {
            let r = match parse_rv(r) {
                Ok(r) => r,
                Err(reply) => return reply,
            };
            if r > state.rv {
                return too_large_rv();
            }
            if r < state.compacted {
                return Reply::Json(
                    410,
                    expired("The resourceVersion for the provided list is too old."),
                );
            }
            (r, snapshot_at(&state, rt, r))
        }
        (_, other) => {
            return bad_request(&format!(
                "resourceVersionMatch: Unsupported value: \"{other}\": supported values: \"Exact\", \"NotOlderThan\""
            ))
        }
    };
    drop(state);
    let items: Vec<Value> = objects
        .into_iter()
        .filter(|o| filter.matches(o))
        .map(|mut o| {
            if rt.builtin() {
                if let Some(m) = o.as_object_mut() {
                    m.remove("apiVersion");
                    m.remove("kind");
                }
            }
            o
        })
        .collect();
    Reply::Json(
        200,
        json!({
            "kind": format!("{}List", rt.kind),
            "apiVersion": rt.api_version(),
            "metadata": {"resourceVersion": list_rv.to_string()},
            "items": items,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{http, json_body};
    use crate::FakeApiServer;

    #[test]
    fn routes() {
        let r = parse_route("/api/v1/namespaces/kube-system/pods").unwrap();
        assert_eq!(
            (r.rt.plural, r.namespace.as_deref(), r.name),
            ("pods", Some("kube-system"), None)
        );
        let r = parse_route("/api/v1/namespaces/payments").unwrap();
        assert_eq!(
            (r.rt.plural, r.name.as_deref()),
            ("namespaces", Some("payments"))
        );
        let r = parse_route("/apis/dnsfence.io/v1alpha1/egresspolicies").unwrap();
        assert_eq!((r.rt.plural, r.namespace), ("egresspolicies", None));
        assert!(parse_route("/apis/dnsfence.io/v1/egresspolicies").is_none());
        assert!(parse_route("/api/v1/namespaces/x/namespaces").is_none());
        assert!(parse_route("/api/v1/pods/name-without-namespace").is_none());
        assert!(
            parse_route("/apis/cilium.io/v2/namespaces/a/ciliumclusterwidenetworkpolicies")
                .is_none()
        );
    }

    #[test]
    fn lists_filter_and_strip_builtin_types() {
        let api = FakeApiServer::start();
        for (name, node, app) in [("a", "n1", "web"), ("b", "n2", "web"), ("c", "n1", "db")] {
            api.apply(
                "pods",
                json!({"metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
                       "spec": {"nodeName": node}}),
            );
        }
        let (code, text) = http(
            &api,
            "GET",
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1&labelSelector=app+in+%28web%29&limit=500",
            "",
        );
        assert_eq!(code, 200, "{text}");
        let list = json_body(&text);
        assert_eq!(list["kind"], "PodList");
        assert_eq!(
            list["metadata"]["resourceVersion"],
            api.resource_version().to_string()
        );
        assert!(list["metadata"].get("continue").is_none());
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["metadata"]["name"], "a");
        assert!(
            items[0].get("kind").is_none(),
            "built-in list items carry no kind"
        );
        let (code, text) = http(&api, "GET", "/api/v1/pods?fieldSelector=spec.image%3Dx", "");
        assert_eq!(
            (code, json_body(&text)["reason"].as_str()),
            (400, Some("BadRequest"))
        );
        // Exact lists go back in time until the compaction point.
        let before = api.resource_version();
        api.delete("pods", Some("shop"), "a");
        let (_, text) = http(
            &api,
            "GET",
            &format!(
                "/api/v1/namespaces/shop/pods?resourceVersion={before}&resourceVersionMatch=Exact"
            ),
            "",
        );
        assert_eq!(json_body(&text)["items"].as_array().unwrap().len(), 3);
        api.compact();
        let (code, _) = http(
            &api,
            "GET",
            &format!(
                "/api/v1/namespaces/shop/pods?resourceVersion={before}&resourceVersionMatch=Exact"
            ),
            "",
        );
        assert_eq!(code, 410);
    }
}
