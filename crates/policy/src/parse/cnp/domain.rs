//! `domainNames[]` entries (NPEP-133): validated as the API server does, then compiled to
//! dnsfence patterns.
//!
//! A domain name is two or more labels, optionally behind a leading `*.`; a label starts and
//! ends with a letter or digit and may hold `-` and `_` in between; one trailing dot is
//! allowed; letters compare case-insensitively. `*.` matches one or more whole labels, so
//! `*.example.com` becomes dnsfence's `**.example.com` (it matches `a.example.com` and
//! `a.b.example.com`, never `example.com`). A wildcard over a single label (`*.com`) and
//! a `*` anywhere else are invalid.

use crate::pattern::{NamePattern, PatternError};

/// Why a `domainNames[]` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DomainNameError {
    /// Nothing (or only a dot or `*.`).
    #[error("domain name is empty")]
    Empty,
    /// `*` other than as the whole leftmost label.
    #[error("'*' is only allowed as the whole leftmost label, as in '*.example.com'")]
    MisplacedWildcard,
    /// One label only: a top-level domain, or a wildcard over one (`*.com`).
    #[error("needs at least two labels after any '*.' (a top-level domain or a wildcard over one is not allowed)")]
    TooFewLabels,
    /// An empty label (two dots in a row, or a leading dot).
    #[error("empty label (a leading dot or two dots in a row)")]
    EmptyLabel,
    /// A label that does not start and end with a letter or digit, or holds a character
    /// other than letters, digits, `-` and `_`.
    #[error("label {label:?} must start and end with a letter or digit and hold only letters, digits, '-' and '_'")]
    BadLabel {
        /// The offending label.
        label: String,
    },
    /// Valid by the pattern, but not a DNS name dnsfence can match (too long).
    #[error(transparent)]
    Pattern(#[from] PatternError),
}

/// Validates `text` and compiles it: an exact name to a `matchName`, `*.rest` to the
/// `matchPattern` `**.rest`.
pub(crate) fn domain_name(text: &str) -> Result<NamePattern, DomainNameError> {
    let (wildcard, rest) = match text.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let rest = rest.strip_suffix('.').unwrap_or(rest);
    if rest.is_empty() {
        return Err(DomainNameError::Empty);
    }
    if rest.contains('*') {
        return Err(DomainNameError::MisplacedWildcard);
    }
    let mut labels = 0;
    for label in rest.split('.') {
        check_label(label)?;
        labels += 1;
    }
    if labels < 2 {
        return Err(DomainNameError::TooFewLabels);
    }
    Ok(if wildcard {
        NamePattern::match_pattern(&format!("**.{rest}"))?
    } else {
        NamePattern::match_name(rest)?
    })
}

fn check_label(label: &str) -> Result<(), DomainNameError> {
    let bytes = label.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return Err(DomainNameError::EmptyLabel);
    };
    let inner_ok = bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
    if inner_ok && first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric() {
        Ok(())
    } else {
        Err(DomainNameError::BadLabel {
            label: label.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::FoldedName;

    fn matches(pattern: &str, name: &str) -> bool {
        let p = domain_name(pattern).unwrap();
        p.matches(&FoldedName::new(name.as_bytes()).unwrap())
    }

    #[test]
    fn exact_names_match_only_themselves() {
        assert!(matches("kubernetes.io", "kubernetes.io"));
        assert!(matches("Blog.Kubernetes.IO.", "blog.kubernetes.io"));
        assert!(!matches("kubernetes.io", "www.kubernetes.io"));
        assert!(!matches("blog.kubernetes.io", "kubernetes.io"));
        assert!(!matches("kubernetes.io", "my-kubernetes.io"));
    }

    #[test]
    fn wildcard_matches_one_or_more_labels_never_the_apex() {
        assert!(matches("*.kubernetes.io", "www.kubernetes.io"));
        assert!(matches("*.kubernetes.io", "latest.blog.kubernetes.io"));
        assert!(!matches("*.kubernetes.io", "kubernetes.io"));
        assert!(!matches("*.kubernetes.io", "wikipedia.org"));
    }

    #[test]
    fn invalid_names_say_why() {
        let cases = [
            ("", DomainNameError::Empty),
            ("*.", DomainNameError::Empty),
            ("com", DomainNameError::TooFewLabels),
            ("*.com", DomainNameError::TooFewLabels),
            ("*", DomainNameError::MisplacedWildcard),
            ("**.example.com", DomainNameError::MisplacedWildcard),
            ("api.*.example.com", DomainNameError::MisplacedWildcard),
            ("api*.example.com", DomainNameError::MisplacedWildcard),
            ("a..example.com", DomainNameError::EmptyLabel),
            (".example.com", DomainNameError::EmptyLabel),
            ("example.com..", DomainNameError::EmptyLabel),
        ];
        for (text, want) in cases {
            assert_eq!(domain_name(text).unwrap_err(), want, "{text:?}");
        }
        for bad in [
            "-a.example.com",
            "a-.example.com",
            "_a.example.com",
            "ex ample.com",
            "ü.example.com",
        ] {
            assert!(
                matches!(domain_name(bad), Err(DomainNameError::BadLabel { .. })),
                "{bad:?}"
            );
        }
        assert!(domain_name("a_b.example.com").is_ok());
        assert!(matches!(
            domain_name(&format!("{}.com", "a".repeat(300))),
            Err(DomainNameError::Pattern(_))
        ));
    }
}
