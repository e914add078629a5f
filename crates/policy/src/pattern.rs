//! `matchName` and `matchPattern`: parsed once into typed values, valid by construction.
//!
//! Semantics (Cilium 1.19, plus a bare `*` in DNS rules):
//! - names and patterns compare case-insensitively, with or without the trailing dot;
//! - `*` matches zero or more of `[-a-z0-9_]` inside one label and never crosses a dot;
//! - a leading `**.` matches one or more whole labels;
//! - a pattern made only of stars matches every (valid) name.

use std::fmt;

use crate::name::{fold_into, FoldedName, NameError, MAX_NAME_LEN};

/// Which policy field a pattern came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PatternField {
    /// `matchName`: one exact name.
    MatchName,
    /// `matchPattern`: wildcards allowed.
    MatchPattern,
}

impl PatternField {
    /// The YAML field name.
    pub fn as_str(self) -> &'static str {
        match self {
            PatternField::MatchName => "matchName",
            PatternField::MatchPattern => "matchPattern",
        }
    }
}

/// Why a pattern was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The text is not a valid name or pattern.
    #[error(transparent)]
    Name(#[from] NameError),
    /// `**` somewhere other than as the whole leftmost label.
    #[error("'**' is only allowed as the whole leftmost label, as in '**.example.com'")]
    MisplacedDoubleStar,
}

/// One label of a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum LabelMatch {
    /// Exactly this (folded) label.
    Exact(Box<[u8]>),
    /// A label with `*` wildcards.
    Glob(Glob),
}

impl LabelMatch {
    pub(crate) fn matches(&self, label: &[u8]) -> bool {
        match self {
            LabelMatch::Exact(l) => **l == *label,
            LabelMatch::Glob(g) => g.matches(label),
        }
    }
}

/// A label holding at least one `*`, split at the stars: `app*-v*` is `["app", "-v", ""]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Glob {
    pieces: Box<[Box<[u8]>]>,
}

impl Glob {
    fn new(label: &[u8]) -> Self {
        Self {
            pieces: label.split(|&b| b == b'*').map(Box::from).collect(),
        }
    }

    /// The literal text before the first `*`.
    pub(crate) fn prefix(&self) -> &[u8] {
        self.pieces.first().map(|p| &p[..]).unwrap_or_default()
    }

    /// The literal text after the last `*`.
    pub(crate) fn suffix(&self) -> &[u8] {
        self.pieces.last().map(|p| &p[..]).unwrap_or_default()
    }

    /// Whether the (folded, valid) `label` matches. O(label length x pieces).
    pub(crate) fn matches(&self, label: &[u8]) -> bool {
        let Some((first, rest)) = self.pieces.split_first() else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return **first == *label;
        };
        if label.len() < first.len() + last.len()
            || !label.starts_with(first)
            || !label.ends_with(last)
        {
            return false;
        }
        let mut inner = label
            .get(first.len()..label.len() - last.len())
            .unwrap_or_default();
        for piece in middle {
            match find(inner, piece) {
                Some(at) => inner = inner.get(at + piece.len()..).unwrap_or_default(),
                None => return false,
            }
        }
        true
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The compiled shape of a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Shape {
    /// Only stars: every valid name.
    All,
    /// Label by label, left to right; `subdomains` for a leading `**.`.
    Labels {
        subdomains: bool,
        labels: Box<[LabelMatch]>,
    },
}

/// A validated `matchName` or `matchPattern`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct NamePattern {
    field: PatternField,
    text: Box<str>,
    shape: Shape,
}

impl NamePattern {
    /// Parses a `matchName` value: an exact name.
    pub fn match_name(text: &str) -> Result<Self, PatternError> {
        Self::parse(PatternField::MatchName, text)
    }

    /// Parses a `matchPattern` value.
    pub fn match_pattern(text: &str) -> Result<Self, PatternError> {
        Self::parse(PatternField::MatchPattern, text)
    }

    /// Parses `text` as the value of `field`.
    pub fn parse(field: PatternField, text: &str) -> Result<Self, PatternError> {
        let mut buf = [0u8; MAX_NAME_LEN];
        let is_pattern = field == PatternField::MatchPattern;
        let len = fold_into(text.as_bytes(), is_pattern, &mut buf)?;
        let folded = buf.get(..len).unwrap_or_default();
        let shape = if is_pattern && folded.iter().all(|&b| b == b'*') {
            Shape::All
        } else {
            let (subdomains, rest) = match folded.strip_prefix(b"**.") {
                Some(rest) => (true, rest),
                None => (false, folded),
            };
            let mut labels = Vec::new();
            for label in rest.split(|&b| b == b'.') {
                if find(label, b"**").is_some() {
                    return Err(PatternError::MisplacedDoubleStar);
                }
                labels.push(if label.contains(&b'*') {
                    LabelMatch::Glob(Glob::new(label))
                } else {
                    LabelMatch::Exact(label.into())
                });
            }
            Shape::Labels {
                subdomains,
                labels: labels.into(),
            }
        };
        let text = String::from_utf8_lossy(folded).into();
        Ok(Self { field, text, shape })
    }

    /// The field it came from.
    pub fn field(&self) -> PatternField {
        self.field
    }

    /// The folded text (lower case, no trailing dot).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether this pattern matches every name.
    pub fn matches_all(&self) -> bool {
        self.shape == Shape::All
    }

    pub(crate) fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Whether `name` matches this one pattern. O(name length).
    pub fn matches(&self, name: &FoldedName) -> bool {
        match &self.shape {
            Shape::All => true,
            Shape::Labels { subdomains, labels } => {
                let mut names = name.labels_rev();
                for want in labels.iter().rev() {
                    match names.next() {
                        Some(label) if want.matches(label) => {}
                        _ => return false,
                    }
                }
                // Exact patterns need the name to end here; `**.` needs at least one more label.
                names.next().is_some() == *subdomains
            }
        }
    }

    /// How specific the pattern is, for ranking explanations: exact names first, then
    /// patterns with more literal characters.
    pub fn specificity(&self) -> (bool, usize) {
        let exact = matches!(&self.shape, Shape::Labels { subdomains: false, labels } if labels.iter().all(|l| matches!(l, LabelMatch::Exact(_))));
        let literal = self.text.bytes().filter(|&b| b != b'*').count();
        (exact, literal)
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({:?})", self.field.as_str(), self.text)
    }
}

#[cfg(test)]
pub(crate) mod tests;
