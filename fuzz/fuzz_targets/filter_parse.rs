//! Fuzzes filter parsing and matching: never a panic; an accepted filter survives a JSON
//! round trip unchanged.
#![no_main]
use libfuzzer_sys::fuzz_target;
use model::Filter;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(f) = Filter::parse(text, "fuzz") {
        let _ = f.matches_bytes(b"/etc/passwd");
        let _ = f.matches_bytes(data);
        let j = serde_json::to_string(&f).unwrap();
        let back: Filter = serde_json::from_str(&j).unwrap();
        assert!(back == f);
    }
});
