//! What the table holds before a reconcile, read from `nft --terse list table`, and the
//! deletion of what the new ruleset no longer defines, in the same transaction. It never
//! deletes an object the ruleset defines, and never the table.

use std::collections::BTreeSet;

use super::writer::Writer;

/// The objects (chains, sets, maps) found in the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    /// Chain names.
    pub chains: BTreeSet<String>,
    /// Set and map names.
    pub sets: BTreeSet<String>,
}

impl Existing {
    /// Parses `nft --terse list table` output.
    pub fn parse(listing: &str) -> Self {
        let mut out = Self::default();
        for line in listing.lines() {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("chain"), Some(name)) => {
                    out.chains.insert(name.to_owned());
                }
                (Some("set" | "map"), Some(name)) => {
                    out.sets.insert(name.to_owned());
                }
                _ => {}
            }
        }
        out
    }

    /// Deletes whatever the table holds that `w` has not defined: chains first (their
    /// rules may reference sets), then sets. Call it last.
    pub(super) fn delete_unwanted(&self, w: &mut Writer) {
        let chains: Vec<String> = self.chains.difference(w.objects()).cloned().collect();
        let sets: Vec<String> = self.sets.difference(w.objects()).cloned().collect();
        for chain in &chains {
            w.flush_chain(chain);
        }
        for chain in &chains {
            w.delete_chain(chain);
        }
        for set in &sets {
            w.delete_set(set);
        }
    }
}
