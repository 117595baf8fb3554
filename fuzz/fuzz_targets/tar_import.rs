//! Fuzzes the tar import (plain and gzip): it must never panic, and whatever it accepts
//! must be a valid tree.
#![no_main]
use libfuzzer_sys::fuzz_target;
use disk::tarball::{import, HashOnly};

fuzz_target!(|data: &[u8]| {
    if let Ok((tree, _)) = import(std::io::Cursor::new(data.to_vec()), &mut HashOnly) {
        tree.validate().expect("an accepted archive yields a valid tree");
    }
});
