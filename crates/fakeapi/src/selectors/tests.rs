use serde_json::json;

use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn set(vs: &[&str]) -> BTreeSet<String> {
    vs.iter().map(|v| (*v).to_owned()).collect()
}

#[test]
fn label_selector_parses_every_operator() {
    let s = LabelSelector::parse(
        "app=web, tier==front,env!=prod,zone in (a, b),team notin(x,y),k8s.io/managed,!legacy",
    )
    .unwrap();
    assert_eq!(
        s.0,
        [
            Requirement::Equals("app".into(), "web".into()),
            Requirement::Equals("tier".into(), "front".into()),
            Requirement::NotEquals("env".into(), "prod".into()),
            Requirement::In("zone".into(), set(&["a", "b"])),
            Requirement::NotIn("team".into(), set(&["x", "y"])),
            Requirement::Exists("k8s.io/managed".into()),
            Requirement::DoesNotExist("legacy".into()),
        ]
    );
    assert_eq!(LabelSelector::parse("").unwrap(), LabelSelector::default());
    assert_eq!(
        LabelSelector::parse("k8s-app=kube-dns").unwrap().0,
        [Requirement::Equals("k8s-app".into(), "kube-dns".into())]
    );
    // An empty value is allowed for equality.
    assert_eq!(
        LabelSelector::parse("a=").unwrap().0,
        [Requirement::Equals("a".into(), String::new())]
    );
    // A key named like an operator is still a key.
    assert_eq!(
        LabelSelector::parse("in in (in)").unwrap().0,
        [Requirement::In("in".into(), set(&["in"]))]
    );
}

#[test]
fn label_selector_rejects_what_the_api_server_rejects() {
    for bad in [
        "a=b,",
        ",a",
        "a in ()",
        "a in (b",
        "a in b)",
        "a notin b",
        "a>1",
        "-a=b",
        "a=-b",
        "a=b c",
        "!",
        "Upper.Case/x=y",
        "a/b/c=d",
    ] {
        assert!(LabelSelector::parse(bad).is_err(), "{bad:?} must not parse");
    }
    // A key prefix is capped at 253 in all, not each of its labels at 63.
    assert!(LabelSelector::parse(&format!("{}.io/x=y", "a".repeat(64))).is_ok());
}

#[test]
fn label_selector_semantics() {
    let l = labels(&[("app", "web"), ("zone", "a")]);
    let yes = |s: &str| LabelSelector::parse(s).unwrap().matches(&l);
    assert!(yes(""));
    assert!(yes("app=web,zone in (a,b)"));
    assert!(!yes("app=web,zone in (b)"));
    assert!(yes("env!=prod"), "!= holds without the label");
    assert!(yes("env notin (prod)"), "notin holds without the label");
    assert!(!yes("zone notin (a)"));
    assert!(!yes("env in (prod)"));
    assert!(yes("app"));
    assert!(!yes("!app"));
    assert!(yes("!env"));
    let object = json!({"metadata": {"labels": {"app": "web"}}});
    assert!(LabelSelector::parse("app=web")
        .unwrap()
        .matches_object(&object));
    assert!(!LabelSelector::parse("app")
        .unwrap()
        .matches_object(&json!({"metadata": {}})));
}

#[test]
fn field_selector_parses_and_matches() {
    let s = FieldSelector::parse("spec.nodeName=node-1,status.phase!=Failed").unwrap();
    assert_eq!(s.0.len(), 2);
    let pod = |node: &str, phase: &str| json!({"spec": {"nodeName": node, "hostNetwork": true}, "status": {"phase": phase}});
    assert!(s.matches(&pod("node-1", "Running")));
    assert!(!s.matches(&pod("node-2", "Running")));
    assert!(!s.matches(&pod("node-1", "Failed")));
    assert!(FieldSelector::parse("spec.hostNetwork==true")
        .unwrap()
        .matches(&pod("n", "Running")));
    assert!(FieldSelector::parse("spec.nodeName=")
        .unwrap()
        .matches(&json!({"spec": {}})));
    assert!(FieldSelector::parse("spec.nodeName").is_err());
}
