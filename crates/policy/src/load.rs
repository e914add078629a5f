//! Loading many files into one [`PolicySet`], with every problem of every file reported.

use std::collections::HashMap;

use crate::diag::{Diagnostic, Severity};
use crate::model::{Policy, PolicyId, Source};
use crate::parse::parse_stream;
use crate::resolve::PolicySet;

/// Accumulates policies from several YAML streams.
#[derive(Debug, Default)]
pub struct PolicyLoader {
    policies: Vec<Policy>,
    seen: HashMap<PolicyId, Source>,
    diagnostics: Vec<Diagnostic>,
}

impl PolicyLoader {
    /// An empty loader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses the YAML stream `text` read from `file`.
    pub fn add(&mut self, file: &str, text: &str) {
        for policy in parse_stream(file, text, &mut self.diagnostics) {
            if let Some(first) = self.seen.get(&policy.id) {
                self.diagnostics.push(Diagnostic {
                    severity: Severity::Error,
                    file: policy.source.file.clone(),
                    doc: policy.source.doc,
                    path: "metadata.name".to_owned(),
                    message: format!(
                        "{} {} is already defined at {}:{}",
                        policy.id.kind.as_str(),
                        policy.id,
                        first.file,
                        first.doc
                    ),
                });
                continue;
            }
            self.seen.insert(policy.id.clone(), policy.source.clone());
            self.policies.push(policy);
        }
    }

    /// Problems found so far, in the order found.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        &self.diagnostics
    }

    /// Whether any error was found.
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }

    /// The set of every policy that validated, and all diagnostics. Callers that must keep
    /// a running set when anything is wrong check [`PolicyLoader::has_errors`] first.
    pub fn finish(self) -> (PolicySet, Vec<Diagnostic>) {
        self.finish_after(&PolicySet::default())
    }

    /// As [`PolicyLoader::finish`], for a set that replaces `previous`: selectors both use
    /// keep their ids (see [`PolicySet::succeeding`]).
    pub fn finish_after(self, previous: &PolicySet) -> (PolicySet, Vec<Diagnostic>) {
        (
            PolicySet::succeeding(self.policies, previous),
            self.diagnostics,
        )
    }
}
