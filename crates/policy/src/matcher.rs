//! A compiled set of name patterns: which patterns does a name match, in O(name length).
//!
//! Patterns are stored as a trie of reversed labels (`a.example.com` is `com` → `example` →
//! `a`). Matching walks the name's labels from the right once; at each step it follows the
//! exact child (one hash lookup) and the wildcard-label children that can match: those are
//! indexed by their literal prefix (`app*`) or, without one, their literal suffix (`*-prod`),
//! so finding them costs one lookup per distinct prefix length, bounded by the label length
//! and not by the number of patterns. Only labels with neither (`*`, `*x*`) are scanned.
//!
//! Cost depends on the name and on how many patterns actually match it, not on how many
//! patterns the set holds. No step allocates unless more than [`INLINE_ACTIVE`] trie paths
//! are alive at once, which only a set with that many overlapping wildcard labels under one
//! parent can cause.

// foldhash, not SipHash: these maps are looked up once per label of every query, and
// only policy authors choose their keys (a query can look up any key, never add one).
use foldhash::HashMap;
use std::ops::ControlFlow;

use smallvec::SmallVec;

use crate::name::FoldedName;
use crate::pattern::{Glob, LabelMatch, NamePattern, Shape};

/// How many live trie paths fit on the stack while matching.
pub const INLINE_ACTIVE: usize = 16;

/// The wildcard-label children of one trie node.
#[derive(Debug, Clone, Default)]
struct Globs {
    /// By literal prefix (non-empty).
    by_prefix: HashMap<Box<[u8]>, Vec<(Glob, u32)>>,
    /// Distinct lengths of the keys of `by_prefix`, ascending.
    prefix_lens: Vec<usize>,
    /// By literal suffix (non-empty), for globs without a prefix.
    by_suffix: HashMap<Box<[u8]>, Vec<(Glob, u32)>>,
    /// Distinct lengths of the keys of `by_suffix`, ascending.
    suffix_lens: Vec<usize>,
    /// Globs with neither prefix nor suffix, such as `*` or `*api*`.
    other: Vec<(Glob, u32)>,
}

impl Globs {
    fn find(&self, g: &Glob) -> Option<u32> {
        let list = if !g.prefix().is_empty() {
            self.by_prefix.get(g.prefix())?
        } else if !g.suffix().is_empty() {
            self.by_suffix.get(g.suffix())?
        } else {
            &self.other
        };
        list.iter().find(|(have, _)| have == g).map(|(_, id)| *id)
    }

    fn insert(&mut self, g: Glob, id: u32) {
        fn add(
            map: &mut HashMap<Box<[u8]>, Vec<(Glob, u32)>>,
            lens: &mut Vec<usize>,
            key: &[u8],
            entry: (Glob, u32),
        ) {
            map.entry(key.into()).or_default().push(entry);
            if let Err(at) = lens.binary_search(&key.len()) {
                lens.insert(at, key.len());
            }
        }
        if !g.prefix().is_empty() {
            let key: Box<[u8]> = g.prefix().into();
            add(&mut self.by_prefix, &mut self.prefix_lens, &key, (g, id));
        } else if !g.suffix().is_empty() {
            let key: Box<[u8]> = g.suffix().into();
            add(&mut self.by_suffix, &mut self.suffix_lens, &key, (g, id));
        } else {
            self.other.push((g, id));
        }
    }

    /// Calls `hit` with the child of every glob matching `label`.
    #[inline]
    fn for_each_match(&self, label: &[u8], mut hit: impl FnMut(u32)) {
        let mut check = |list: &[(Glob, u32)]| {
            for (g, id) in list {
                if g.matches(label) {
                    hit(*id);
                }
            }
        };
        for &len in self.prefix_lens.iter().take_while(|&&l| l <= label.len()) {
            if let Some(list) = label.get(..len).and_then(|k| self.by_prefix.get(k)) {
                check(list);
            }
        }
        for &len in self.suffix_lens.iter().take_while(|&&l| l <= label.len()) {
            if let Some(list) = label
                .get(label.len() - len..)
                .and_then(|k| self.by_suffix.get(k))
            {
                check(list);
            }
        }
        check(&self.other);
    }
}

#[derive(Debug, Clone)]
struct Node<V> {
    exact: HashMap<Box<[u8]>, u32>,
    globs: Globs,
    /// Patterns ending exactly here.
    terminal: Vec<V>,
    /// `**.` patterns whose fixed part ends here: they need one or more further labels.
    subdomains: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            exact: HashMap::default(),
            globs: Globs::default(),
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
            LabelMatch::Glob(g) => match node.globs.find(g) {
                Some(id) => id,
                None => {
                    node.globs.insert(g.clone(), next);
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
                node.globs.for_each_match(label, |child| next.push(child));
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
