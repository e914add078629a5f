use super::*;

/// (field, pattern, name, expected). Shared with the matcher tests, which must agree.
pub(crate) const CASES: &[(PatternField, &str, &str, bool)] = {
    use PatternField::{MatchName as N, MatchPattern as P};
    &[
        // matchName: exact, case-insensitive, trailing dot optional on either side.
        (N, "api.stripe.com", "api.stripe.com", true),
        (N, "api.stripe.com", "API.Stripe.COM", true),
        (N, "API.STRIPE.COM", "api.stripe.com", true),
        (N, "api.stripe.com.", "api.stripe.com", true),
        (N, "api.stripe.com", "api.stripe.com.", true),
        (N, "api.stripe.com.", "api.stripe.com.", true),
        (N, "api.stripe.com", "stripe.com", false),
        (N, "api.stripe.com", "x.api.stripe.com", false),
        (N, "api.stripe.com", "api.stripe.co", false),
        (N, "api.stripe.com", "api.stripe.com.evil.io", false),
        (N, "api.stripe.com", "apix.stripe.com", false),
        (N, "api.stripe.com", "api-stripe.com", false),
        (N, "my_service.internal", "my_service.internal", true),
        (N, "my_service.internal", "my-service.internal", false),
        (N, "xn--bcher-kva.de", "xn--bcher-kva.de", true),
        (N, "xn--bcher-kva.de", "XN--BCHER-KVA.DE.", true),
        (N, "xn--bcher-kva.de", "xn--bcher-kvb.de", false),
        (N, "localhost", "localhost", true),
        (N, "localhost", "localhost.localdomain", false),
        (N, "a.b.c.d.e.f.g", "a.b.c.d.e.f.g", true),
        (N, "a.b.c.d.e.f.g", "b.c.d.e.f.g", false),
        (N, "123.example.com", "123.example.com", true),
        // A leading `*` label: exactly one label, never zero, never two.
        (P, "*.example.com", "a.example.com", true),
        (P, "*.example.com", "www.example.com", true),
        (P, "*.example.com", "WWW.EXAMPLE.COM.", true),
        (P, "*.example.com", "_sip.example.com", true),
        (P, "*.example.com", "a-b.example.com", true),
        (P, "*.example.com", "example.com", false),
        (P, "*.example.com", "a.b.example.com", false),
        (P, "*.example.com", "a.example.org", false),
        (P, "*.example.com", "aexample.com", false),
        (P, "*.example.com", "a.example.com.evil", false),
        (P, "*.EXAMPLE.com.", "a.example.com", true),
        // `*` at the end of a label.
        (P, "app*.example.com", "app.example.com", true),
        (P, "app*.example.com", "app1.example.com", true),
        (P, "app*.example.com", "app-1.example.com", true),
        (P, "app*.example.com", "APP-prod.example.com", true),
        (P, "app*.example.com", "ap.example.com", false),
        (P, "app*.example.com", "xapp.example.com", false),
        (P, "app*.example.com", "app.x.example.com", false),
        (P, "app*.example.com", "app.example.com.x", false),
        // `*` at the start of a label.
        (P, "*-prod.example.com", "api-prod.example.com", true),
        (P, "*-prod.example.com", "-prod.example.com", true),
        (P, "*-prod.example.com", "api-prod2.example.com", false),
        (P, "*-prod.example.com", "prod.example.com", false),
        // `*` in the middle of a label.
        (P, "a*z.example.com", "az.example.com", true),
        (P, "a*z.example.com", "abcz.example.com", true),
        (P, "a*z.example.com", "a-z.example.com", true),
        (P, "a*z.example.com", "a.z.example.com", false),
        (P, "a*z.example.com", "abc.example.com", false),
        (P, "a*z.example.com", "za.example.com", false),
        // Several stars in one label.
        (P, "a*b*c.example.com", "abc.example.com", true),
        (P, "a*b*c.example.com", "axxbyyc.example.com", true),
        (P, "a*b*c.example.com", "acb.example.com", false),
        (P, "*api*.example.com", "api.example.com", true),
        (P, "*api*.example.com", "my-api-v2.example.com", true),
        (P, "*api*.example.com", "apx.example.com", false),
        (P, "*a*a*.x", "aa.x", true),
        (P, "*a*a*.x", "a.x", false),
        (P, "*ab*ab*.x", "abab.x", true),
        (P, "*ab*ab*.x", "aba.x", false),
        // Wildcards in inner labels and in the TLD.
        (P, "api.*.example.com", "api.eu.example.com", true),
        (P, "api.*.example.com", "api.example.com", false),
        (P, "api.*.example.com", "api.eu.west.example.com", false),
        (P, "example.*", "example.com", true),
        (P, "example.*", "example.co.uk", false),
        (P, "*.*.example.com", "a.b.example.com", true),
        (P, "*.*.example.com", "a.example.com", false),
        (P, "s3.*.amazonaws.com", "s3.us-east-1.amazonaws.com", true),
        (P, "*.s3.amazonaws.com", "bucket.s3.amazonaws.com", true),
        (P, "*.s3.amazonaws.com", "s3.amazonaws.com", false),
        (P, "*.s3.amazonaws.com", "a.b.s3.amazonaws.com", false),
        // A leading `**.`: one or more whole labels.
        (P, "**.example.com", "a.example.com", true),
        (P, "**.example.com", "a.b.example.com", true),
        (P, "**.example.com", "a.b.c.d.example.com", true),
        (P, "**.example.com", "A.B.Example.Com.", true),
        (P, "**.example.com", "example.com", false),
        (P, "**.example.com", "notexample.com", false),
        (P, "**.example.com", "a.example.org", false),
        (P, "**.example.com", "example.com.evil.io", false),
        (P, "**.*.example.com", "a.example.com", false),
        (P, "**.*.example.com", "a.b.example.com", true),
        (P, "**.app*.example.com", "x.app1.example.com", true),
        (P, "**.app*.example.com", "app1.example.com", false),
        // Only stars: every valid name.
        (P, "*", "example.com", true),
        (P, "*", "a", true),
        (P, "*", "a.b.c.d.e", true),
        (P, "*", "EXAMPLE.COM.", true),
        (P, "**", "example.com", true),
        (P, "***", "x.y", true),
        (P, "*.", "example.com", true),
        // Literal patterns in matchPattern behave like matchName.
        (P, "example.com", "example.com", true),
        (P, "example.com", "www.example.com", false),
        // Underscores and digits.
        (P, "_*._tcp.example.com", "_http._tcp.example.com", true),
        (P, "_*._tcp.example.com", "http._tcp.example.com", false),
        (P, "*.123.example.com", "456.123.example.com", true),
        // 63-character labels.
        (
            N,
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.example.com",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.example.com",
            true,
        ),
        (
            P,
            "*.example.com",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.example.com",
            true,
        ),
        (
            P,
            "a*.example.com",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.example.com",
            true,
        ),
        (
            P,
            "b*.example.com",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.example.com",
            false,
        ),
        // Punycode.
        (P, "*.xn--p1ai", "xn--80ak6aa92e.xn--p1ai", true),
        (P, "xn--*.example.com", "xn--bcher-kva.example.com", true),
        (P, "xn--*.example.com", "bcher.example.com", false),
        // Names outside the hostname alphabet never match, not even `*`.
        (P, "*", "a b.com", false),
        (P, "*", "a..com", false),
        (P, "*", "", false),
        (P, "*", ".", false),
        (P, "*.example.com", "a/b.example.com", false),
        (P, "*.example.com", "*.example.com", false),
        (N, "example.com", "exam\u{0}ple.com", false),
        (P, "*.example.com", "ä.example.com", false),
    ]
};

fn parse(field: PatternField, text: &str) -> NamePattern {
    NamePattern::parse(field, text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

#[test]
fn table() {
    assert!(CASES.len() >= 100, "{} cases", CASES.len());
    for &(field, pattern, name, want) in CASES {
        let p = parse(field, pattern);
        let got = FoldedName::new(name.as_bytes()).is_ok_and(|n| p.matches(&n));
        assert_eq!(got, want, "{}: {pattern:?} vs {name:?}", field.as_str());
    }
}

#[test]
fn invalid_patterns() {
    use PatternField::{MatchName as N, MatchPattern as P};
    let cases: &[(PatternField, &str)] = &[
        (N, ""),
        (N, "."),
        (N, "*.example.com"),
        (N, "exa mple.com"),
        (N, "example..com"),
        (N, ".example.com"),
        (N, "bücher.de"),
        (N, "example.com/"),
        (P, ""),
        (P, "a**.example.com"),
        (P, "a.**.example.com"),
        (P, "**.**.example.com"),
        (P, "*..example.com"),
        (P, "example.com?"),
        (P, "[a-z].example.com"),
    ];
    for &(field, text) in cases {
        assert!(
            NamePattern::parse(field, text).is_err(),
            "{}: {text:?} must be refused",
            field.as_str()
        );
    }
    let long = format!("{}.com", "a".repeat(252));
    assert!(matches!(
        NamePattern::match_name(&long),
        Err(PatternError::Name(NameError::TooLong { len: 256 }))
    ));
    assert!(NamePattern::match_name(&long[1..]).is_ok());
}

#[test]
fn canonical_text() {
    assert_eq!(
        parse(PatternField::MatchPattern, "*.EXAMPLE.com.").as_str(),
        "*.example.com"
    );
    assert!(parse(PatternField::MatchPattern, "**").matches_all());
    assert!(!parse(PatternField::MatchPattern, "**.a").matches_all());
    assert_eq!(parse(PatternField::MatchName, "A.b.").to_string(), "a.b");
}

#[test]
fn specificity_ranks_exact_first() {
    let exact = parse(PatternField::MatchName, "a.example.com");
    let glob = parse(PatternField::MatchPattern, "*.example.com");
    let all = parse(PatternField::MatchPattern, "*");
    assert!(exact.specificity() > glob.specificity());
    assert!(glob.specificity() > all.specificity());
}
