use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::pattern::tests::CASES;
use crate::pattern::PatternField;

/// A deliberately simple matcher over the whole text, written from the documented
/// semantics, to check the compiled trie against.
fn reference(pattern: &str, name: &str) -> bool {
    fn valid_name(n: &str) -> bool {
        !n.is_empty()
            && n.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                    })
            })
    }
    fn glob(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len())
                .take_while(|&i| i == 0 || s[i - 1] != b'.')
                .any(|i| glob(rest, &s[i..])),
            Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
        }
    }
    let fold = |t: &str| {
        let t = t.to_ascii_lowercase();
        t.strip_suffix('.').map(str::to_owned).unwrap_or(t)
    };
    let (pattern, name) = (fold(pattern), fold(name));
    if name.len() > 254 || !valid_name(&name) {
        return false;
    }
    if pattern.bytes().all(|b| b == b'*') {
        return true;
    }
    match pattern.strip_prefix("**.") {
        Some(rest) => name
            .match_indices('.')
            .any(|(i, _)| glob(rest.as_bytes(), &name.as_bytes()[i + 1..])),
        None => glob(pattern.as_bytes(), name.as_bytes()),
    }
}

fn matches_of(m: &NameMatcher<usize>, name: &str) -> BTreeSet<usize> {
    let mut got = BTreeSet::new();
    if let Ok(n) = FoldedName::new(name.as_bytes()) {
        let _ = m.for_each_match(&n, |&v| {
            assert!(got.insert(v), "{v} reported twice for {name:?}");
            ControlFlow::<()>::Continue(())
        });
    }
    got
}

#[test]
fn reference_agrees_with_the_table() {
    for &(_, pattern, name, want) in CASES {
        assert_eq!(reference(pattern, name), want, "{pattern:?} vs {name:?}");
    }
}

#[test]
fn each_pattern_alone() {
    for &(field, pattern, name, want) in CASES {
        let p = NamePattern::parse(field, pattern).unwrap();
        let m: NameMatcher<usize> = [(p, 7)].into_iter().collect();
        let got = matches_of(&m, name);
        assert_eq!(!got.is_empty(), want, "{pattern:?} vs {name:?}");
    }
}

#[test]
fn all_patterns_together() {
    let patterns: Vec<NamePattern> = CASES
        .iter()
        .map(|&(f, p, _, _)| NamePattern::parse(f, p).unwrap())
        .collect();
    let m: NameMatcher<usize> = patterns.iter().cloned().zip(0..).collect();
    assert_eq!(m.len(), patterns.len());
    for &(_, _, name, _) in CASES {
        let want: BTreeSet<usize> = patterns
            .iter()
            .enumerate()
            .filter(|(_, p)| FoldedName::new(name.as_bytes()).is_ok_and(|n| p.matches(&n)))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(matches_of(&m, name), want, "{name:?}");
    }
}

#[test]
fn first_match_and_break() {
    let m: NameMatcher<u8> = [
        (NamePattern::match_pattern("*.example.com").unwrap(), 1),
        (NamePattern::match_name("www.example.com").unwrap(), 2),
    ]
    .into_iter()
    .collect();
    let www = FoldedName::new(b"www.example.com").unwrap();
    assert!(m.is_match(&www));
    assert!(matches!(m.first_match(&www), Some(1 | 2)));
    let mut seen = 0;
    let flow = m.for_each_match(&www, |_| {
        seen += 1;
        ControlFlow::Break(())
    });
    assert_eq!(flow, ControlFlow::Break(()));
    assert_eq!(seen, 1);
    assert!(!m.is_match(&FoldedName::new(b"example.com").unwrap()));
}

#[test]
fn many_wildcards_under_one_parent_spill_without_losing_matches() {
    // More live paths than fit inline: correctness must not depend on INLINE_ACTIVE.
    let mut m = NameMatcher::new();
    for i in 0..(INLINE_ACTIVE * 3) {
        let p =
            NamePattern::match_pattern(&format!("*{}*.x.example.com", "a".repeat(i % 5))).unwrap();
        m.insert(&p, i);
    }
    let got = matches_of(&m, "aaaaaaa.x.example.com");
    assert_eq!(got.len(), INLINE_ACTIVE * 3);
}

fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just("ab".to_owned()),
        Just("ba".to_owned()),
        Just("a-b".to_owned()),
        Just("_x".to_owned()),
        Just("B".to_owned()),
    ]
}

fn pattern_label() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => label(),
        1 => Just("*".to_owned()),
        1 => Just("a*".to_owned()),
        1 => Just("*b".to_owned()),
        1 => Just("*a*".to_owned()),
        1 => Just("a*b".to_owned()),
    ]
}

fn pattern() -> impl Strategy<Value = (PatternField, String)> {
    (
        any::<bool>(),
        prop::collection::vec(pattern_label(), 1..4),
        0..8u8,
    )
        .prop_map(|(subdomains, labels, kind)| {
            if kind == 0 {
                return (PatternField::MatchPattern, "*".to_owned());
            }
            let body = labels.join(".");
            if !body.contains('*') && kind % 2 == 0 {
                return (PatternField::MatchName, body);
            }
            let text = if subdomains {
                format!("**.{body}")
            } else {
                body
            };
            (PatternField::MatchPattern, text)
        })
}

fn name() -> impl Strategy<Value = String> {
    (prop::collection::vec(label(), 1..6), any::<bool>()).prop_map(|(labels, dot)| {
        let mut n = labels.join(".");
        if dot {
            n.push('.');
        }
        n
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The compiled matcher reports exactly the patterns the reference says match.
    #[test]
    fn compiled_matcher_equals_reference(
        patterns in prop::collection::vec(pattern(), 1..24),
        names in prop::collection::vec(name(), 1..8),
    ) {
        let parsed: Vec<NamePattern> = patterns
            .iter()
            .map(|(f, t)| NamePattern::parse(*f, t).unwrap())
            .collect();
        let m: NameMatcher<usize> = parsed.iter().cloned().zip(0..).collect();
        for n in &names {
            let want: BTreeSet<usize> = patterns
                .iter()
                .enumerate()
                .filter(|(_, (_, t))| reference(t, n))
                .map(|(i, _)| i)
                .collect();
            prop_assert_eq!(matches_of(&m, n), want, "name {:?} patterns {:?}", n, patterns);
        }
    }

    /// Folding never panics and anything it accepts is in the hostname alphabet.
    #[test]
    fn folding_is_total(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(n) = FoldedName::new(&bytes) {
            prop_assert!(n.as_bytes().iter().all(|&b| b == b'.' || crate::name::is_label_byte(b)));
        }
    }
}
