//! A compiled set of name patterns: which patterns does a name match, in O(name length).
//!
//! Patterns are stored as a trie of reversed labels (`a.example.com` is `com` → `example` →
//! `a`). Matching walks the name's labels from the right once; at each step it follows the
//! exact child (one hash lookup) and any wildcard-label children. Cost depends on the name and
//! on how many patterns actually match it, not on how many patterns the set holds. No step
//! allocates unless more than [`INLINE_ACTIVE`] trie paths are alive at once, which only a
//! set with that many overlapping wildcard labels under one parent can cause.

use std::collections::HashMap;
use std::ops::ControlFlow;

use smallvec::SmallVec;

use crate::name::FoldedName;
use crate::pattern::{Glob, LabelMatch, NamePattern, Shape};

/// How many live trie paths fit on the stack while matching.
pub const INLINE_ACTIVE: usize = 16;

#[derive(Debug, Clone)]
struct Node<V> {
    exact: HashMap<Box<[u8]>, u32>,
    globs: Vec<(Glob, u32)>,
    /// Patterns ending exactly here.
    terminal: Vec<V>,
    /// `**.` patterns whose fixed part ends here: they need one or more further labels.
    subdomains: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            globs: Vec::new(),
            terminal: Vec::new(),
            subdomains: Vec::new(),
        }
    }
}

/// A set of [`NamePattern`]s, each carrying a value `V` reported when it matches.
#[derive(Debug, Clone)]
pub struct NameMatcher<V> {
    nodes: Vec<Node<V>>,
    all: Vec<V>,
    len: usize,
}

impl<V> Default for NameMatcher<V> {
    fn default() -> Self {
        Self {
            nodes: vec![Node::default()],
            all: Vec::new(),
            len: 0,
        }
    }
}

impl<V> NameMatcher<V> {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of patterns inserted.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no pattern was inserted.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `pattern`, reporting `value` when it matches. The same pattern may be added
    /// several times with different values.
    pub fn insert(&mut self, pattern: &NamePattern, value: V) {
        self.len += 1;
        let (subdomains, labels) = match pattern.shape() {
            Shape::All => {
                self.all.push(value);
                return;
            }
            Shape::Labels { subdomains, labels } => (*subdomains, labels),
        };
        let mut at = 0usize;
        for label in labels.iter().rev() {
            at = self.child(at, label);
        }
        if let Some(node) = self.nodes.get_mut(at) {
            if subdomains {
                node.subdomains.push(value);
            } else {
                node.terminal.push(value);
            }
        }
    }

    fn child(&mut self, at: usize, label: &LabelMatch) -> usize {
        let next = self.nodes.len() as u32;
        let Some(node) = self.nodes.get_mut(at) else {
            return at;
        };
        let found = match label {
            LabelMatch::Exact(l) => *node.exact.entry(l.clone()).or_insert(next),
            LabelMatch::Glob(g) => match node.globs.iter().find(|(have, _)| have == g) {
                Some((_, id)) => *id,
                None => {
                    node.globs.push((g.clone(), next));
                    next
                }
            },
        };
        if found == next {
            self.nodes.push(Node::default());
        }
        found as usize
    }

    /// Calls `visit` with the value of every pattern that matches `name`, until it breaks.
    /// Each matching insertion is reported once; the order is unspecified.
    pub fn for_each_match<'a, B>(
        &'a self,
        name: &FoldedName,
        mut visit: impl FnMut(&'a V) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        for v in &self.all {
            visit(v)?;
        }
        let mut active: SmallVec<[u32; INLINE_ACTIVE]> = SmallVec::new();
        let mut next: SmallVec<[u32; INLINE_ACTIVE]> = SmallVec::new();
        active.push(0);
        for label in name.labels_rev() {
            next.clear();
            for &id in &active {
                let Some(node) = self.nodes.get(id as usize) else {
                    continue;
                };
                // This label exists, so `**.` patterns ending at this node match.
                for v in &node.subdomains {
                    visit(v)?;
                }
                if let Some(&child) = node.exact.get(label) {
                    next.push(child);
                }
                for (glob, child) in &node.globs {
                    if glob.matches(label) {
                        next.push(*child);
                    }
                }
            }
            std::mem::swap(&mut active, &mut next);
            if active.is_empty() {
                return ControlFlow::Continue(());
            }
        }
        for &id in &active {
            if let Some(node) = self.nodes.get(id as usize) {
                for v in &node.terminal {
                    visit(v)?;
                }
            }
        }
        ControlFlow::Continue(())
    }

    /// The first value found for a pattern matching `name`, if any.
    pub fn first_match(&self, name: &FoldedName) -> Option<&V> {
        match self.for_each_match(name, ControlFlow::Break) {
            ControlFlow::Break(v) => Some(v),
            ControlFlow::Continue(()) => None,
        }
    }

    /// Whether any pattern matches `name`.
    pub fn is_match(&self, name: &FoldedName) -> bool {
        self.first_match(name).is_some()
    }
}

impl<V> FromIterator<(NamePattern, V)> for NameMatcher<V> {
    fn from_iter<I: IntoIterator<Item = (NamePattern, V)>>(iter: I) -> Self {
        let mut m = Self::new();
        for (p, v) in iter {
            m.insert(&p, v);
        }
        m
    }
}

#[cfg(test)]
mod tests;
