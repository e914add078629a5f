//! Patterns and names from arbitrary bytes. Invariants: parsing never panics; a parsed
//! pattern re-parses from its canonical text to the same pattern; the compiled trie reports
//! exactly the patterns whose own `matches` says yes.
#![no_main]

use std::ops::ControlFlow;

use dnsfence_policy::{FoldedName, NameMatcher, NamePattern, PatternField};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Layout: patterns separated by '\n', then '\0', then names separated by '\n'.
    let text = String::from_utf8_lossy(data);
    let (pats, names) = text.split_once('\0').unwrap_or((&text, ""));
    let mut parsed = Vec::new();
    for (i, p) in pats.split('\n').enumerate() {
        let field = if i % 3 == 0 { PatternField::MatchName } else { PatternField::MatchPattern };
        if let Ok(pattern) = NamePattern::parse(field, p) {
            let again = NamePattern::parse(field, pattern.as_str()).expect("canonical text re-parses");
            assert_eq!(again, pattern);
            parsed.push(pattern);
        }
    }
    let matcher: NameMatcher<usize> = parsed.iter().cloned().zip(0..).collect();
    for name in names.split('\n') {
        let Ok(folded) = FoldedName::new(name.as_bytes()) else { continue };
        let mut got = vec![false; parsed.len()];
        let _ = matcher.for_each_match(&folded, |&i| {
            assert!(!got[i], "reported twice");
            got[i] = true;
            ControlFlow::<()>::Continue(())
        });
        for (i, p) in parsed.iter().enumerate() {
            assert_eq!(got[i], p.matches(&folded), "{p:?} vs {name:?}");
        }
    }
});
