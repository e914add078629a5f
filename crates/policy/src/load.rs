//! Loading many files into one [`PolicySet`], with every problem of every file reported.
//!
//! Besides each object's own problems, the loader checks `ClusterNetworkPolicy` objects
//! against each other (see [`crate::order`]): a policy whose rules dnsfence would enforce
//! differently from the specification, because one of higher precedence shadows them, is
//! rejected like an invalid one.

use std::collections::{BTreeSet, HashMap};

use crate::diag::{Diagnostic, Severity};
use crate::model::{Policy, PolicyId, Source};
use crate::order;
use crate::parse::parse_documents;
use crate::resolve::PolicySet;

/// Accumulates policies from several YAML streams.
#[derive(Debug, Default)]
pub struct PolicyLoader {
    policies: Vec<Policy>,
    seen: HashMap<PolicyId, Source>,
    /// Every problem: those of the objects themselves first (`own` of them), then those
    /// between `ClusterNetworkPolicy` objects, recomputed after each file.
    diagnostics: Vec<Diagnostic>,
    own: usize,
    /// Indices in `policies` of those rejected by the checks between policies.
    rejected: BTreeSet<usize>,
}

impl PolicyLoader {
    /// An empty loader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses the YAML stream `text` read from `file`. A file that holds no document (empty,
    /// blank, or only comments) is an error: it is what a truncated file looks like, and
    /// taking it for "no policies" would turn enforcement off.
    pub fn add(&mut self, file: &str, text: &str) {
        self.diagnostics.truncate(self.own);
        let (policies, documents) = parse_documents(file, text, &mut self.diagnostics);
        if documents == 0 {
            self.diagnostics.push(Diagnostic {
                severity: Severity::Error,
                file: file.into(),
                doc: 1,
                path: "(file)".to_owned(),
                message: "holds no policy documents (empty, or only comments): a policy file must hold at least one; remove it to have none".to_owned(),
            });
        }
        for policy in policies {
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
        self.own = self.diagnostics.len();
        self.rejected.clear();
        if self.policies.iter().any(|p| p.precedence.is_some()) {
            for (i, d) in order::check(&self.policies) {
                if d.is_error() {
                    self.rejected.insert(i);
                }
                self.diagnostics.push(d);
            }
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
        let rejected = self.rejected;
        let policies = self
            .policies
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !rejected.contains(i))
            .map(|(_, p)| p);
        (PolicySet::succeeding(policies, previous), self.diagnostics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: n}\nspec: {endpointSelector: {}}\n";

    /// A truncated file must not read as "no policies": that would turn filtering off.
    #[test]
    fn a_file_without_documents_is_an_error() {
        for text in [
            "",
            "\n  \n",
            "# only a comment\n",
            "---\n",
            "---\n# x\n---\n",
        ] {
            let mut loader = PolicyLoader::new();
            loader.add("good.yaml", POLICY);
            loader.add("empty.yaml", text);
            assert!(loader.has_errors(), "{text:?}");
            let lines: Vec<String> = loader
                .diagnostics()
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(
                lines,
                ["empty.yaml:1: (file): holds no policy documents (empty, or only comments): a policy file must hold at least one; remove it to have none"],
                "{text:?}"
            );
        }
        // A file with a policy after an empty document, or an explicit empty list, holds
        // documents.
        let mut loader = PolicyLoader::new();
        loader.add("late.yaml", &format!("---\n---\n{POLICY}"));
        loader.add("list.yaml", "apiVersion: v1\nkind: List\nitems: []\n");
        assert!(!loader.has_errors(), "{:?}", loader.diagnostics());
        // Broken YAML is reported as such, not as an empty file.
        let mut loader = PolicyLoader::new();
        loader.add("broken.yaml", "kind: [\n");
        assert_eq!(loader.diagnostics().len(), 1);
        assert!(loader.diagnostics()[0].message.contains("invalid YAML"));
    }
}
