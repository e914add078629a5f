//! The agent <-> proxy protocol: a line that parses as a message re-encodes to a line that
//! parses to the same message; nothing panics.
#![no_main]

use dnsfence_agent::control::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = serde_json::from_str::<Message>(text) {
        let again = serde_json::to_string(&m).expect("encodes");
        let back: Message = serde_json::from_str(&again).expect("decodes");
        assert_eq!(back, m);
    }
});
