#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]

use super::*;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Doc {
    #[serde(default)]
    name: String,
    #[serde(default)]
    inner: Inner,
    #[serde(default)]
    opt: Option<Required>,
    #[serde(default)]
    items: Vec<Item>,
    #[serde(default)]
    words: Vec<String>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
struct Inner {
    port: u16,
    size: u32,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Required {
    port: u16,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Item {
    id: String,
    #[serde(default)]
    n: u8,
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap()
}

fn placeholders() -> Vec<(&'static str, Value)> {
    vec![("items", yaml("{id: \"\"}"))]
}

fn read_doc(text: &str) -> (Option<Doc>, Problems) {
    read::<Doc>(yaml(text), &placeholders())
}

#[test]
fn a_good_document_reads_whole() {
    let (doc, p) = read_doc("name: a\ninner: {port: 5}\nitems: [{id: x, n: 2}]\n");
    assert!(p.is_empty(), "{p:?}");
    let doc = doc.unwrap();
    assert_eq!(
        (doc.name.as_str(), doc.inner.port, doc.items.len()),
        ("a", 5, 1)
    );
    let (doc, p) = read::<Doc>(Value::Null, &[]);
    assert!(p.is_empty());
    assert_eq!(doc.unwrap(), Doc::default());
}

#[test]
fn every_unknown_key_is_named_with_what_its_struct_takes() {
    let (doc, p) = read_doc("nmae: a\ninner: {prot: 5, size: 3, extra: 1}\nname: b\n");
    let mut lines = p.lines.clone();
    lines.sort();
    assert_eq!(
        lines,
        [
            "inner.extra: unknown key (expected one of: port, size)",
            "inner.prot: unknown key (expected one of: port, size)",
            "nmae: unknown key (expected one of: name, inner, opt, items, words)",
        ]
    );
    assert_eq!(p.lines.len(), 3, "{:?}", p.lines);
    // What read is kept.
    let doc = doc.unwrap();
    assert_eq!((doc.name.as_str(), doc.inner.size), ("b", 3));
}

#[test]
fn a_bad_value_is_named_once_and_its_default_stands_in() {
    let (doc, p) = read_doc("inner: {port: -1, size: 7}\nopt: {port: abc}\nwords: [a, 3]\n");
    assert_eq!(p.lines.len(), 3, "{:?}", p.lines);
    assert!(
        p.lines[0].starts_with("inner.port: invalid value"),
        "{:?}",
        p.lines
    );
    // A required field that did not read is not also "missing".
    assert!(
        p.lines[1].starts_with("opt.port: invalid type"),
        "{:?}",
        p.lines
    );
    assert!(
        p.lines[2].starts_with("words[1]: invalid type"),
        "{:?}",
        p.lines
    );
    let doc = doc.unwrap();
    assert_eq!((doc.inner.port, doc.inner.size), (0, 7));
    assert_eq!(doc.opt, None);
    assert!(doc.words.is_empty());
    assert!(!p.parsed("inner.port") && p.parsed("inner.size") && p.parsed("inner"));
    assert!(!p.parsed("opt") && !p.parsed("opt.port") && !p.parsed("words"));
}

#[test]
fn missing_fields_are_named_by_their_path() {
    let (doc, p) = read_doc("opt: {}\n");
    assert_eq!(p.lines, ["opt.port: missing"]);
    assert_eq!(doc.unwrap().opt, None);
}

#[test]
fn a_bad_element_keeps_the_others_indices() {
    let (doc, p) =
        read_doc("items: [{id: a}, {n: 1}, {id: c, bogus: 1}, 5, {id: e, n: 300}, {id: f}]\n");
    let all = p.lines.join("\n");
    for needle in [
        "items[1].id: missing",
        "items[2].bogus: unknown key (expected one of: id, n)",
        "items[3]: invalid type: integer `5`",
        "items[4].n: invalid value",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in\n{all}");
    }
    assert_eq!(p.lines.len(), 4, "{all}");
    // An element with an unknown key, a missing field or of the wrong type is the
    // placeholder; one with a bad value keeps the rest (its `n` takes its default); all
    // keep their places.
    let items = doc.unwrap().items;
    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["a", "", "", "", "e", "f"]);
    assert_eq!(items[4].n, 0);
}

#[test]
fn keys_that_are_not_strings_are_named() {
    let (doc, p) = read_doc("1: x\ninner: {true: 2, port: 3}\n");
    assert_eq!(
        p.lines,
        [
            "1: keys must be strings",
            "inner.true: keys must be strings"
        ]
    );
    assert_eq!(doc.unwrap().inner.port, 3);
}

#[test]
fn a_document_that_is_not_a_mapping_does_not_read() {
    let (doc, p) = read_doc("[1, 2]\n");
    assert!(doc.is_none());
    assert_eq!(p.lines.len(), 1, "{:?}", p.lines);
}

#[test]
fn the_keys_of_each_struct_come_from_serde() {
    assert_eq!(
        keys_of::<Doc>(&[]).unwrap(),
        ["name", "inner", "opt", "items", "words"]
    );
    assert_eq!(keys_of::<Doc>(&["inner"]).unwrap(), ["port", "size"]);
    assert_eq!(keys_of::<Doc>(&["opt"]).unwrap(), ["port"]);
    assert_eq!(keys_of::<Doc>(&["items", "[]"]).unwrap(), ["id", "n"]);
    assert_eq!(keys_of::<Doc>(&["words"]), None);
    assert_eq!(keys_of::<Doc>(&["name"]), None);
}
