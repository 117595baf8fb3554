//! Fuzzes the MDB parser: never a panic; an accepted MDB survives a write/parse round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(m) = mdb::Mdb::parse(text) {
        let out = m.to_json();
        let back = mdb::Mdb::parse(&out).expect("a written MDB parses");
        assert_eq!(back.to_json(), out);
    }
});
