//! Diagnostics: one line per problem, `FILE:DOC: FIELD.PATH: message`.

use std::fmt;
use std::sync::Arc;

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Accepted, but the user should know (e.g. ingress rules are not enforced).
    Warning,
    /// The object is rejected.
    Error,
}

/// One problem found in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// File name as given by the caller.
    pub file: Arc<str>,
    /// 1-based document index in the YAML stream.
    pub doc: usize,
    /// Field path, e.g. `spec.egress[1].toFQDNs[0].matchPattern`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl Diagnostic {
    /// Whether this is an error.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.severity {
            Severity::Error => "",
            Severity::Warning => "warning: ",
        };
        write!(
            f,
            "{}:{}: {}: {prefix}{}",
            self.file, self.doc, self.path, self.message
        )
    }
}

/// Collects diagnostics for one document.
pub(crate) struct Sink<'a> {
    pub(crate) file: &'a Arc<str>,
    pub(crate) doc: usize,
    pub(crate) out: &'a mut Vec<Diagnostic>,
}

impl Sink<'_> {
    pub(crate) fn error(&mut self, path: &str, message: impl fmt::Display) {
        self.push(Severity::Error, path, message);
    }

    pub(crate) fn warn(&mut self, path: &str, message: impl fmt::Display) {
        self.push(Severity::Warning, path, message);
    }

    fn push(&mut self, severity: Severity, path: &str, message: impl fmt::Display) {
        self.out.push(Diagnostic {
            severity,
            file: self.file.clone(),
            doc: self.doc,
            // A problem with the document as a whole (not a mapping, say) has no field path.
            path: if path.is_empty() {
                "(document)".to_owned()
            } else {
                path.to_owned()
            },
            message: message.to_string(),
        });
    }

    /// Number of errors recorded so far (to tell whether an object added any).
    pub(crate) fn errors(&self) -> usize {
        self.out.iter().filter(|d| d.is_error()).count()
    }
}
