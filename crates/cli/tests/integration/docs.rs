//! The walk of one query in `docs/architecture.md` names only functions that exist, in the
//! files it says: a rename that forgets the document fails here.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every (`file`, `function`) pair the document's numbered walks name: in each item, every
/// backquoted snake_case word after a backquoted `crates/....rs` path is a function of the
/// file last named (so system calls and keys are written without backquotes, or with a
/// dot).
fn references(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut file: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        // A new numbered item, or anything that is not a continuation, starts afresh.
        let numbered = trimmed
            .split_once(". ")
            .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if numbered || !line.starts_with("   ") {
            file = None;
        }
        if !numbered && !line.starts_with("   ") {
            continue;
        }
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                continue;
            }
            if part.starts_with("crates/") && part.ends_with(".rs") {
                file = Some(part.to_owned());
                continue;
            }
            let snake = part.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if let (Some(f), true) = (&file, snake) {
                out.push((f.clone(), part.to_owned()));
            }
        }
    }
    out
}

#[test]
fn every_function_the_architecture_walk_names_exists_in_its_file() {
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let refs = references(&doc);
    assert!(refs.len() >= 25, "too few references found: {refs:?}");
    let mut missing = Vec::new();
    for (file, name) in &refs {
        let path = root().join(file);
        let Ok(source) = std::fs::read_to_string(&path) else {
            missing.push(format!("{file} does not exist"));
            continue;
        };
        let defined = [" fn ", "\nfn "]
            .iter()
            .any(|p| source.contains(&format!("{p}{name}(")))
            || source.contains(&format!("fn {name}<"));
        if !defined {
            missing.push(format!("{file}: no fn {name}"));
        }
    }
    assert!(missing.is_empty(), "docs/architecture.md: {missing:#?}");
}

#[test]
fn the_reference_reader_sees_what_a_walk_line_names() {
    let refs = references(
        "Prose `crates/x.rs`: `not_counted`.\n\n1. `crates/a.rs`: `one` then `two`\n   and `three` (`crates/b.rs`: `four`).\n2. `Key` `dns.x` `five` `crates/c.rs`: `six`.\n",
    );
    let pairs: Vec<(&str, &str)> = refs.iter().map(|(f, n)| (f.as_str(), n.as_str())).collect();
    assert_eq!(
        pairs,
        [
            ("crates/a.rs", "one"),
            ("crates/a.rs", "two"),
            ("crates/a.rs", "three"),
            ("crates/b.rs", "four"),
            ("crates/c.rs", "six"),
        ]
    );
}
