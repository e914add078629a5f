//! DNS names in presentation form: validation and ASCII case folding, without allocating.
//!
//! Every name the engine compares is first turned into a [`FoldedName`]: lower-case, without
//! the trailing dot, made only of the hostname alphabet (`[-a-z0-9_]` labels separated by
//! single dots). A name that cannot be folded never matches any pattern, not even `*`: bytes
//! outside the alphabet cannot sneak past a rule written for hostnames.

use std::fmt;

/// Longest name or pattern accepted, in characters, as in Cilium's validation.
pub const MAX_NAME_LEN: usize = 255;

/// Why a name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty (or only a dot).
    #[error("name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("name is {len} characters long, the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// Length of the offending name.
        len: usize,
    },
    /// A byte outside `[-a-zA-Z0-9_.]` (and `*` for patterns).
    #[error("character {} at offset {offset} is not allowed (only letters, digits, '-', '_' and '.'{})", DisplayByte(*byte), if *pattern { " and '*'" } else { "" })]
    InvalidChar {
        /// The offending byte.
        byte: u8,
        /// Its offset in the input.
        offset: usize,
        /// Whether `*` would have been allowed (pattern context).
        pattern: bool,
    },
    /// Two dots in a row, or a leading dot.
    #[error("empty label (a leading dot or two dots in a row)")]
    EmptyLabel,
}

struct DisplayByte(u8);

impl fmt::Display for DisplayByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", self.0 as char)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// Whether `b` may appear inside a label of a name (after folding to lower case).
#[inline]
pub(crate) fn is_label_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_')
}

/// Checks `input` as a name (or, with `pattern`, a pattern that may hold `*`) and writes its
/// folded form into `out`. Returns the folded length. `out` must hold `MAX_NAME_LEN` bytes.
pub(crate) fn fold_into(input: &[u8], pattern: bool, out: &mut [u8]) -> Result<usize, NameError> {
    if input.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: input.len() });
    }
    let body = input.strip_suffix(b".").unwrap_or(input);
    if body.is_empty() {
        return Err(NameError::Empty);
    }
    let mut prev_dot = true;
    for (offset, (&b, slot)) in body.iter().zip(out.iter_mut()).enumerate() {
        let lower = b.to_ascii_lowercase();
        if lower == b'.' {
            if prev_dot {
                return Err(NameError::EmptyLabel);
            }
            prev_dot = true;
        } else if is_label_byte(lower) || (pattern && lower == b'*') {
            prev_dot = false;
        } else {
            return Err(NameError::InvalidChar {
                byte: b,
                offset,
                pattern,
            });
        }
        *slot = lower;
    }
    if prev_dot {
        // A name ending in "..": the stripped trailing dot left an empty last label.
        return Err(NameError::EmptyLabel);
    }
    Ok(body.len())
}

/// A name folded for matching: lower case, no trailing dot, hostname alphabet only.
///
/// Lives on the stack; building one never allocates.
#[derive(Clone)]
pub struct FoldedName {
    buf: [u8; MAX_NAME_LEN],
    len: usize,
}

impl FoldedName {
    /// Folds `name` (presentation form, any case, trailing dot optional).
    pub fn new(name: &[u8]) -> Result<Self, NameError> {
        let mut buf = [0u8; MAX_NAME_LEN];
        let len = fold_into(name, false, &mut buf)?;
        Ok(Self { buf, len })
    }

    /// Folds a name given label by label, as DNS carries it on the wire (without the root
    /// label). A label holding a dot, or any byte outside `[-a-zA-Z0-9_]`, is refused: on the
    /// wire a dot is an ordinary byte, and it must never pass for a label separator.
    pub fn from_labels<'a>(labels: impl IntoIterator<Item = &'a [u8]>) -> Result<Self, NameError> {
        let mut buf = [0u8; MAX_NAME_LEN];
        let mut len = 0usize;
        for label in labels {
            if label.is_empty() {
                return Err(NameError::EmptyLabel);
            }
            let sep = usize::from(len > 0);
            if len + sep + label.len() > MAX_NAME_LEN {
                return Err(NameError::TooLong {
                    len: len + sep + label.len(),
                });
            }
            if sep == 1 {
                if let Some(slot) = buf.get_mut(len) {
                    *slot = b'.';
                }
                len += 1;
            }
            for (i, &b) in label.iter().enumerate() {
                let lower = b.to_ascii_lowercase();
                if !is_label_byte(lower) {
                    return Err(NameError::InvalidChar {
                        byte: b,
                        offset: len + i,
                        pattern: false,
                    });
                }
                if let Some(slot) = buf.get_mut(len + i) {
                    *slot = lower;
                }
            }
            len += label.len();
        }
        if len == 0 {
            return Err(NameError::Empty);
        }
        Ok(Self { buf, len })
    }

    /// The folded bytes.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    /// The folded name as text (always ASCII).
    pub fn as_str(&self) -> &str {
        // Only ASCII bytes are ever written by `fold_into`.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// Labels from the rightmost (the TLD) to the leftmost.
    #[inline]
    pub fn labels_rev(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.as_bytes().rsplit(|&b| b == b'.')
    }
}

impl PartialEq for FoldedName {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for FoldedName {}

impl fmt::Debug for FoldedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FoldedName").field(&self.as_str()).finish()
    }
}

impl fmt::Display for FoldedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_case_and_trailing_dot() {
        let n = FoldedName::new(b"WWW.Example.COM.").unwrap();
        assert_eq!(n.as_str(), "www.example.com");
        let labels: Vec<_> = n.labels_rev().collect();
        assert_eq!(labels, [&b"com"[..], b"example", b"www"]);
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(FoldedName::new(b"").unwrap_err(), NameError::Empty);
        assert_eq!(FoldedName::new(b".").unwrap_err(), NameError::Empty);
        assert_eq!(FoldedName::new(b"a..b").unwrap_err(), NameError::EmptyLabel);
        assert_eq!(FoldedName::new(b".a").unwrap_err(), NameError::EmptyLabel);
        assert_eq!(FoldedName::new(b"a..").unwrap_err(), NameError::EmptyLabel);
        assert!(matches!(
            FoldedName::new(b"a b.com"),
            Err(NameError::InvalidChar {
                byte: b' ',
                offset: 1,
                ..
            })
        ));
        assert!(matches!(
            FoldedName::new(b"*.com"),
            Err(NameError::InvalidChar { byte: b'*', .. })
        ));
        assert!(matches!(
            FoldedName::new("bücher.de".as_bytes()),
            Err(NameError::InvalidChar { .. })
        ));
        let long = vec![b'a'; MAX_NAME_LEN + 1];
        assert_eq!(
            FoldedName::new(&long).unwrap_err(),
            NameError::TooLong { len: 256 }
        );
    }

    #[test]
    fn from_wire_labels() {
        let n = FoldedName::from_labels([&b"WWW"[..], b"Example", b"com"]).unwrap();
        assert_eq!(n.as_str(), "www.example.com");
        assert_eq!(n, FoldedName::new(b"www.example.com.").unwrap());
        // A dot inside a label must not pass for a separator.
        assert!(matches!(
            FoldedName::from_labels([&b"evil.example"[..], b"com"]),
            Err(NameError::InvalidChar { byte: b'.', .. })
        ));
        assert!(FoldedName::from_labels([&b"a\x00"[..]]).is_err());
        assert_eq!(
            FoldedName::from_labels(std::iter::empty()).unwrap_err(),
            NameError::Empty
        );
        assert_eq!(
            FoldedName::from_labels([&b""[..]]).unwrap_err(),
            NameError::EmptyLabel
        );
        let big = [b'a'; 63];
        let labels = [&big[..], &big[..], &big[..], &big[..], &b"b"[..]];
        assert!(matches!(
            FoldedName::from_labels(labels),
            Err(NameError::TooLong { .. })
        ));
    }

    #[test]
    fn accepts_the_limit() {
        let mut name = Vec::new();
        while name.len() + 64 <= MAX_NAME_LEN {
            name.extend_from_slice(&[b'a'; 63]);
            name.push(b'.');
        }
        name.push(b'z');
        assert!(name.len() <= MAX_NAME_LEN);
        assert!(FoldedName::new(&name).is_ok());
    }
}
