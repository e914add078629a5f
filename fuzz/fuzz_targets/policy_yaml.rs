//! Policy YAML from arbitrary bytes. Invariants: no panic; every diagnostic names its file
//! and a 1-based document; a stream with an error yields no policy from that object, and
//! each accepted policy's endpoint resolution and DNS questions never panic.
#![no_main]

use dnsfence_policy::{Endpoint, Labels, PolicyLoader, Protocol};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut loader = PolicyLoader::new();
    loader.add("fuzz.yaml", text);
    for d in loader.diagnostics() {
        assert_eq!(&*d.file, "fuzz.yaml");
        assert!(d.doc >= 1);
        assert!(!d.path.is_empty());
        assert!(!d.message.contains('\n') || d.path == "(document)");
    }
    let (set, _) = loader.finish();
    let ep = Endpoint::new("default", Labels::new([("app", "web")]).expect("labels"));
    let resolved = set.resolve(&ep);
    for name in ["example.com", "a.b.example.com", "*", ""] {
        let d = resolved.dns_decision(name.as_bytes(), None, 53, Protocol::Udp);
        if !resolved.enforced {
            assert!(d.forwarded() || !resolved.denies.is_empty());
        }
    }
});
