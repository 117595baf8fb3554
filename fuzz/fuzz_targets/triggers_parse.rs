//! Fuzzes triggers parsing and matching: never a panic; an accepted set survives a JSON
//! round trip unchanged.
#![no_main]
use libfuzzer_sys::fuzz_target;
use model::Triggers;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(t) = Triggers::parse(text, "fuzz") {
        let _ = t.matching(&["/etc/ssh/sshd.conf", "/usr/sbin/sshd"]);
        let j = serde_json::to_string(&t).unwrap();
        let back: Triggers = serde_json::from_str(&j).unwrap();
        assert!(back == t);
    }
});
