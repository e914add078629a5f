//! Client queries from arbitrary bytes. Invariants: no panic; every reply the proxy would
//! write echoes the query's ID and (when it parsed) its question; a judged query never
//! panics the verdict.
#![no_main]

use std::sync::{Arc, OnceLock};

use dnsfence_dns::{parse_query, wire, write_reply, EndpointSpec, ParsedQuery, Rcode, Snapshot, VerdictConfig};
use dnsfence_policy::{Labels, PolicyLoader, Protocol};
use libfuzzer_sys::fuzz_target;

fn snapshot() -> &'static Snapshot {
    static S: OnceLock<Snapshot> = OnceLock::new();
    S.get_or_init(|| {
        let mut l = PolicyLoader::new();
        l.add(
            "p.yaml",
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  egress:\n    - toPorts:\n        - ports: [{port: \"53\"}]\n          rules: {dns: [{matchPattern: \"*.example.com\"}, {matchPattern: \"**.a.b\"}]}\n",
        );
        let (set, _) = l.finish();
        let ep = EndpointSpec {
            name: "e".into(),
            namespace: "default".into(),
            labels: Labels::default(),
            ips: vec!["10.0.0.2".parse().unwrap()],
        };
        Snapshot::new(Arc::new(set), &[ep], vec![], VerdictConfig::default())
    })
}

fuzz_target!(|data: &[u8]| {
    let mut out = [0u8; 1024];
    match parse_query(data) {
        ParsedQuery::Query(q) => {
            assert_eq!(Some(q.id), wire::id(data));
            assert!(q.question_end <= data.len());
            let v = snapshot().decide("10.0.0.2".parse().unwrap(), "10.96.0.10:53".parse().unwrap(), Protocol::Udp, &q);
            if let Ok(name) = &q.name {
                assert!(name.as_bytes().iter().all(|&b| b == b'.' || b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'));
            } else {
                assert!(!v.allowed(), "a name that is not a hostname is never allowed for an enforced endpoint");
            }
            if let Some(n) = write_reply(data, Some(q.question_end), Rcode::Refused, &mut out) {
                assert_eq!(&out[..2], &data[..2]);
                assert_eq!(&out[12..q.question_end], &data[12..q.question_end]);
                // Past the question, only the OPT record an EDNS query gets back.
                assert!(n == q.question_end || (n == q.question_end + 11 && out[q.question_end..q.question_end + 3] == [0, 0, 41]));
                assert!(wire::is_response(&out[..n]));
            }
        }
        ParsedQuery::Reject { rcode, question_end } => {
            let n = write_reply(data, question_end, rcode, &mut out).expect("a header exists");
            assert_eq!(&out[..2], &data[..2]);
            assert_eq!(wire::rcode(&out[..n]), Some(rcode.value()));
        }
        ParsedQuery::Drop => assert!(data.len() < 12 || wire::is_response(data)),
    }
});
