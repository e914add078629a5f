//! Endpoints, their labels, and label selectors (`matchLabels`, `matchExpressions`).
//!
//! Label keys may carry Cilium's source prefix: `k8s:app` and `any:app` mean the same as
//! `app`. An endpoint always carries its namespace as the label
//! `io.kubernetes.pod.namespace`, so selectors can name it as Cilium policies do.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The label that holds an endpoint's namespace.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// Why a label key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelKeyError {
    /// A source prefix other than `k8s:` or `any:`.
    #[error("label source '{source_name}' is not supported (use 'k8s:', 'any:' or no prefix; reserved identities are written with toEntities)")]
    UnsupportedSource {
        /// The prefix before the colon.
        source_name: String,
    },
    /// An empty key.
    #[error("label key is empty")]
    Empty,
}

/// Strips the source prefix from a label key.
pub fn normalize_key(key: &str) -> Result<&str, LabelKeyError> {
    let bare = match key.split_once(':') {
        Some(("k8s" | "any", rest)) => rest,
        Some((source, _)) => {
            return Err(LabelKeyError::UnsupportedSource {
                source_name: source.to_owned(),
            })
        }
        None => key,
    };
    if bare.is_empty() {
        return Err(LabelKeyError::Empty);
    }
    Ok(bare)
}

/// A set of labels with normalized keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// Builds labels, normalizing keys. Fails on the first unsupported key.
    pub fn new<K: AsRef<str>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, LabelKeyError> {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            map.insert(normalize_key(k.as_ref())?.to_owned(), v.into());
        }
        Ok(Self(map))
    }

    /// The value of `key` (normalized).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Iterates over (key, value).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether `key` (normalized) is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// Builds labels from keys another system already validated (the Kubernetes API
    /// server, whose keys never carry a `:`): a key that does not normalize is left out.
    pub fn keep_valid<K: AsRef<str>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            if let Ok(key) = normalize_key(k.as_ref()) {
                map.insert(key.to_owned(), v.into());
            }
        }
        Self(map)
    }

    fn insert(&mut self, key: &str, value: &str) {
        self.0.insert(key.to_owned(), value.to_owned());
    }
}

impl std::ops::Index<&str> for Labels {
    type Output = String;

    /// The value of `key` (normalized); panics when it is absent, as a map's index does.
    fn index(&self, key: &str) -> &String {
        &self.0[key]
    }
}

impl serde::Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// A map whose keys are checked as [`Labels::new`] checks them. Every bad key is named on
/// a line of its own, starting with `.KEY: `, so a configuration reader appends it to the
/// map's path (`endpoints[1].labels.reserved:x: ...`).
impl<'de> serde::Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        let mut map = BTreeMap::new();
        let mut bad = Vec::new();
        for (k, v) in raw {
            match normalize_key(&k) {
                Ok(key) => {
                    map.insert(key.to_owned(), v);
                }
                Err(e) => bad.push(format!(".{k}: {e}")),
            }
        }
        if bad.is_empty() {
            Ok(Self(map))
        } else {
            Err(serde::de::Error::custom(bad.join("\n")))
        }
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// Something policies can select: a pod, a container, a network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    namespace: String,
    labels: Labels,
}

impl Endpoint {
    /// An endpoint of `namespace` with `labels`; the namespace label is added.
    pub fn new(namespace: impl Into<String>, mut labels: Labels) -> Self {
        let namespace = namespace.into();
        labels.insert(NAMESPACE_LABEL, &namespace);
        Self { namespace, labels }
    }

    /// Its namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Its labels, the namespace label included.
    pub fn labels(&self) -> &Labels {
        &self.labels
    }
}

/// A `matchExpressions` operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operator {
    /// The label's value is one of `values`.
    In,
    /// The label is absent or its value is none of `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl Operator {
    /// Parses the operator's YAML spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            _ => return None,
        })
    }

    /// Whether the operator needs a non-empty `values`.
    pub fn needs_values(self) -> bool {
        matches!(self, Operator::In | Operator::NotIn)
    }
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Requirement {
    /// Normalized key.
    pub key: String,
    /// Operator.
    pub operator: Operator,
    /// Values (empty for Exists/DoesNotExist).
    pub values: BTreeSet<String>,
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A label selector. The empty selector selects everything (in its scope).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    /// `matchLabels`, keys normalized.
    pub match_labels: BTreeMap<String, String>,
    /// `matchExpressions`.
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v.as_str()))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Whether the selector says anything about the namespace label.
    pub fn names_namespace(&self) -> bool {
        self.match_labels.contains_key(NAMESPACE_LABEL)
            || self
                .match_expressions
                .iter()
                .any(|r| r.key == NAMESPACE_LABEL)
    }
}

/// A selector with the namespace scope its policy gives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointSelector {
    /// The selector as written.
    pub selector: LabelSelector,
    /// `Some(ns)`: only endpoints of `ns` (namespaced policies).
    pub namespace: Option<String>,
}

impl EndpointSelector {
    /// Whether `ep` is selected.
    pub fn matches(&self, ep: &Endpoint) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| ns == ep.namespace())
            && self.selector.matches(ep.labels())
    }

    /// Whether some endpoint could be selected by both `self` and `other`. Conservative:
    /// `false` only when one label key (the namespace included) is constrained to values
    /// the other selector rules out; `true` when unsure.
    pub(crate) fn may_overlap(&self, other: &EndpointSelector) -> bool {
        let mut keys: BTreeSet<&str> = BTreeSet::new();
        for sel in [&self.selector, &other.selector] {
            keys.extend(sel.match_labels.keys().map(String::as_str));
            keys.extend(sel.match_expressions.iter().map(|r| r.key.as_str()));
        }
        if self.namespace.is_some() || other.namespace.is_some() {
            keys.insert(NAMESPACE_LABEL);
        }
        !keys
            .into_iter()
            .any(|key| KeyConstraint::of(self, key).excludes(&KeyConstraint::of(other, key)))
    }
}

/// What a selector says about one label key.
struct KeyConstraint<'a> {
    /// The values it allows; `None`: any value (or none at all).
    allowed: Option<BTreeSet<&'a str>>,
    /// Values it rules out (`NotIn`).
    excluded: BTreeSet<&'a str>,
    /// The label must be present.
    present: bool,
    /// The label must be absent (`DoesNotExist`).
    absent: bool,
}

impl<'a> KeyConstraint<'a> {
    fn of(sel: &'a EndpointSelector, key: &str) -> Self {
        let mut c = KeyConstraint {
            allowed: None,
            excluded: BTreeSet::new(),
            present: false,
            absent: false,
        };
        let allow = |values: BTreeSet<&'a str>, c: &mut KeyConstraint<'a>| {
            c.allowed = Some(match c.allowed.take() {
                Some(prev) => prev.intersection(&values).copied().collect(),
                None => values,
            });
        };
        if key == NAMESPACE_LABEL {
            if let Some(ns) = &sel.namespace {
                allow(BTreeSet::from([ns.as_str()]), &mut c);
            }
        }
        if let Some(v) = sel.selector.match_labels.get(key) {
            allow(BTreeSet::from([v.as_str()]), &mut c);
        }
        for r in sel
            .selector
            .match_expressions
            .iter()
            .filter(|r| r.key == key)
        {
            let values = r.values.iter().map(String::as_str).collect();
            match r.operator {
                Operator::In => allow(values, &mut c),
                Operator::NotIn => c.excluded.extend(values),
                Operator::Exists => c.present = true,
                Operator::DoesNotExist => c.absent = true,
            }
        }
        c.present |= c.allowed.is_some();
        c
    }

    /// Whether no value (or absence) of the key satisfies both.
    fn excludes(&self, other: &KeyConstraint<'_>) -> bool {
        let ruled_out = |a: &KeyConstraint<'_>, b: &KeyConstraint<'_>| {
            (a.absent && b.present)
                || a.allowed
                    .as_ref()
                    .is_some_and(|vs| vs.iter().all(|v| b.excluded.contains(v)))
        };
        let disjoint_values = match (&self.allowed, &other.allowed) {
            (Some(a), Some(b)) => a.is_disjoint(b),
            _ => false,
        };
        disjoint_values || ruled_out(self, other) || ruled_out(other, self)
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.match_labels.is_empty() && self.match_expressions.is_empty() {
            return f.write_str("{}");
        }
        let mut first = true;
        for (k, v) in &self.match_labels {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{k}={v}")?;
        }
        for r in &self.match_expressions {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            let values: Vec<&str> = r.values.iter().map(String::as_str).collect();
            match r.operator {
                Operator::In => write!(f, "{} in ({})", r.key, values.join(","))?,
                Operator::NotIn => write!(f, "{} notin ({})", r.key, values.join(","))?,
                Operator::Exists => write!(f, "{}", r.key)?,
                Operator::DoesNotExist => write!(f, "!{}", r.key)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::new(pairs.iter().copied()).unwrap()
    }

    fn req(key: &str, operator: Operator, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn source_prefixes_match_alike() {
        assert_eq!(normalize_key("k8s:app"), Ok("app"));
        assert_eq!(normalize_key("any:app"), Ok("app"));
        assert_eq!(normalize_key("app"), Ok("app"));
        assert!(matches!(
            normalize_key("reserved:host"),
            Err(LabelKeyError::UnsupportedSource { .. })
        ));
        assert_eq!(normalize_key("k8s:"), Err(LabelKeyError::Empty));
        let a = labels(&[("k8s:app", "web")]);
        let b = labels(&[("app", "web")]);
        assert_eq!(a, b);
    }

    #[test]
    fn expressions_follow_kubernetes_semantics() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        let cases = [
            (req("app", Operator::In, &["web", "api"]), true),
            (req("app", Operator::In, &["api"]), false),
            (req("missing", Operator::In, &["x"]), false),
            (req("app", Operator::NotIn, &["api"]), true),
            (req("app", Operator::NotIn, &["web"]), false),
            (req("missing", Operator::NotIn, &["x"]), true),
            (req("tier", Operator::Exists, &[]), true),
            (req("missing", Operator::Exists, &[]), false),
            (req("missing", Operator::DoesNotExist, &[]), true),
            (req("tier", Operator::DoesNotExist, &[]), false),
        ];
        for (r, want) in cases {
            let sel = LabelSelector {
                match_expressions: vec![r.clone()],
                ..LabelSelector::default()
            };
            assert_eq!(sel.matches(&l), want, "{r:?}");
        }
    }

    #[test]
    fn empty_selector_matches_all_in_scope() {
        let ep = Endpoint::new("prod", labels(&[("app", "web")]));
        let any = EndpointSelector {
            selector: LabelSelector::default(),
            namespace: None,
        };
        let prod = EndpointSelector {
            namespace: Some("prod".into()),
            ..any.clone()
        };
        let dev = EndpointSelector {
            namespace: Some("dev".into()),
            ..any.clone()
        };
        assert!(any.matches(&ep));
        assert!(prod.matches(&ep));
        assert!(!dev.matches(&ep));
    }

    #[test]
    fn overlap_is_ruled_out_only_by_contradicting_constraints() {
        let sel =
            |ns: Option<&str>, pairs: &[(&str, &str)], exprs: Vec<Requirement>| EndpointSelector {
                selector: LabelSelector {
                    match_labels: pairs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    match_expressions: exprs,
                },
                namespace: ns.map(str::to_owned),
            };
        let ns_in = |vs: &[&str]| req(NAMESPACE_LABEL, Operator::In, vs);
        let a = sel(None, &[], vec![ns_in(&["a", "b"])]);
        let b = sel(None, &[(NAMESPACE_LABEL, "b")], vec![]);
        let c = sel(Some("c"), &[], vec![]);
        let not_c = sel(
            None,
            &[],
            vec![req(NAMESPACE_LABEL, Operator::NotIn, &["c"])],
        );
        let web = sel(None, &[("app", "web")], vec![]);
        let no_app = sel(None, &[], vec![req("app", Operator::DoesNotExist, &[])]);
        let all = sel(None, &[], vec![]);
        assert!(a.may_overlap(&b));
        assert!(!a.may_overlap(&c));
        assert!(!c.may_overlap(&not_c));
        assert!(a.may_overlap(&not_c));
        assert!(!web.may_overlap(&no_app));
        assert!(all.may_overlap(&c) && all.may_overlap(&web));
        assert!(web.may_overlap(&c));
    }

    #[test]
    fn namespace_is_a_label() {
        let ep = Endpoint::new("kube-system", labels(&[("k8s-app", "kube-dns")]));
        assert_eq!(ep.labels().get(NAMESPACE_LABEL), Some("kube-system"));
        let mut sel = LabelSelector::default();
        sel.match_labels
            .insert(NAMESPACE_LABEL.into(), "kube-system".into());
        assert!(sel.names_namespace());
        assert!(sel.matches(ep.labels()));
    }
}
