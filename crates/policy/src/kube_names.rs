//! Kubernetes' rules for names, written once: RFC 1123 labels (namespaces) and subdomains
//! (object names, label-key prefixes), label names and values, and qualified label keys,
//! as the API server's `IsDNS1123Label`, `IsDNS1123Subdomain`, `IsValidLabelValue` and
//! `IsQualifiedName` (k8s.io/apimachinery `util/validation`) check them.
//!
//! Pure predicates on bytes: no allocation, no diagnostics. Callers decide whether a name
//! that fails is an error, a warning or a term to leave out, and they word the message.
//! Cilium's source prefixes (`k8s:`, `any:`) are not names: strip them first
//! ([`crate::normalize_key`]).

/// The longest RFC 1123 label: a namespace name, a label name, a label value.
pub const DNS_LABEL_MAX: usize = 63;

/// The longest RFC 1123 subdomain: an object name, a label-key prefix.
pub const DNS_SUBDOMAIN_MAX: usize = 253;

/// Whether `s` is an RFC 1123 label, as Kubernetes requires of namespace names: at most
/// [`DNS_LABEL_MAX`] of lowercase letters, digits and `-`, beginning and ending with a
/// letter or digit.
pub fn is_dns_label(s: &str) -> bool {
    s.len() <= DNS_LABEL_MAX && dns_label_syntax(s.as_bytes())
}

/// Whether `s` is an RFC 1123 subdomain, as Kubernetes requires of most object names and
/// of label-key prefixes: at most [`DNS_SUBDOMAIN_MAX`] in all, RFC 1123 labels joined by
/// dots. As in Kubernetes, one label of it may be longer than [`DNS_LABEL_MAX`].
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= DNS_SUBDOMAIN_MAX && s.as_bytes().split(|b| *b == b'.').all(dns_label_syntax)
}

/// Whether `s` is a label name (the part of a key after any `/`): at most
/// [`DNS_LABEL_MAX`] of letters, digits, `-`, `_` and `.`, beginning and ending with a
/// letter or digit.
pub fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= DNS_LABEL_MAX
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// Whether `s` is a label value: empty, or a label name ([`is_label_name`]).
pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name(s)
}

/// Why a label key is not one Kubernetes accepts ([`label_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LabelKeyProblem {
    /// What comes before the last `/` is not a DNS subdomain (empty, too long, another
    /// `/`, or other characters).
    #[error("has a prefix that is not a DNS subdomain (lowercase letters, digits, '-' and '.')")]
    Prefix,
    /// What comes after it (or the whole key) is not a label name.
    #[error("is not a label name (at most 63 of letters, digits, '-', '_' and '.', beginning and ending with a letter or digit)")]
    Name,
}

/// Checks a label key as Kubernetes does (`IsQualifiedName`): an optional DNS-subdomain
/// prefix and `/`, then a label name. A selector with any other key can never match an
/// object, since the API server refuses such labels.
pub fn label_key(key: &str) -> Result<(), LabelKeyProblem> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if prefix.is_some_and(|p| !is_dns_subdomain(p)) {
        return Err(LabelKeyProblem::Prefix);
    }
    if is_label_name(name) {
        Ok(())
    } else {
        Err(LabelKeyProblem::Name)
    }
}

/// An RFC 1123 label of any length: non-empty, lowercase letters, digits and `-`, beginning
/// and ending with a letter or digit.
fn dns_label_syntax(b: &[u8]) -> bool {
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in [
            "a",
            "x1",
            "kube-system",
            "dnsfence-system",
            "0",
            &"a".repeat(63),
        ] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "é", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn dns_subdomains() {
        let long_label = format!("{}.io", "a".repeat(64));
        for ok in ["a", "example.com", "k8s.io", "a-b.c-d", long_label.as_str()] {
            assert!(is_dns_subdomain(ok), "{ok}");
        }
        let longest = ["a"; 127].join(".");
        assert_eq!(longest.len(), DNS_SUBDOMAIN_MAX);
        assert!(is_dns_subdomain(&longest));
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a..b",
            "A.io",
            "a_b.io",
            "-a.io",
            "a-.io",
            "a/b",
            &format!("{longest}a"),
        ] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }

    #[test]
    fn label_names_and_values() {
        for ok in ["app", "k8s-app", "a_b.c", "App", "v1.2_3", &"a".repeat(63)] {
            assert!(is_label_name(ok), "{ok}");
            assert!(is_label_value(ok), "{ok}");
        }
        assert!(is_label_value(""));
        assert!(!is_label_name(""));
        for bad in [
            "-dns",
            "dns-",
            "_a",
            "a.",
            "a b",
            "a/b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(!is_label_name(bad), "{bad}");
            assert!(!is_label_value(bad), "{bad}");
        }
    }

    #[test]
    fn label_keys_are_qualified_names() {
        for ok in ["app", "k8s-app", "app.kubernetes.io/name", "a_b.c", "x/Y_z"] {
            assert_eq!(label_key(ok), Ok(()), "{ok}");
        }
        // Kubernetes caps the prefix at 253 in all, not each of its labels at 63.
        let long_prefix = format!("{}.io/x", "a".repeat(64));
        assert_eq!(label_key(&long_prefix), Ok(()));
        for (bad, problem) in [
            ("App.io/x", LabelKeyProblem::Prefix),
            ("a_b/c", LabelKeyProblem::Prefix),
            ("/x", LabelKeyProblem::Prefix),
            ("a/b/c", LabelKeyProblem::Prefix),
            ("x/", LabelKeyProblem::Name),
            ("-app", LabelKeyProblem::Name),
            ("", LabelKeyProblem::Name),
            ("a".repeat(64).as_str(), LabelKeyProblem::Name),
        ] {
            assert_eq!(label_key(bad), Err(problem), "{bad}");
        }
    }
}
