//! Property tests for the filter and triggers parsers (the fuzz targets' stable-toolchain
//! counterpart): arbitrary text never panics them, and whatever they accept survives a
//! JSON round trip unchanged.

use model::{Filter, FsPath, Triggers};
use proptest::prelude::*;

/// Text biased towards regex and JSON syntax, so the parsers get past their first byte.
fn parser_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("/etc/".to_string()),
            Just(".*".to_string()),
            Just("[".to_string()),
            Just("]".to_string()),
            Just("(".to_string()),
            Just(")".to_string()),
            Just("\n".to_string()),
            Just("#".to_string()),
            Just("!".to_string()),
            Just("{\"MatchLines\":[\"/a\"],\"Service\":\"x\"}".to_string()),
            Just("\"".to_string()),
            Just(",".to_string()),
            Just("{".to_string()),
            Just("}".to_string()),
            "[ -~]{0,6}",
            any::<char>().prop_map(String::from),
        ],
        0..40,
    )
    .prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn filter_parse_never_panics_and_round_trips(text in parser_text(), path in "/[a-z/]{0,12}") {
        if let Ok(f) = Filter::parse(&text, "prop") {
            if let Ok(p) = FsPath::new(path.trim_end_matches('/').replace("//", "/").into_bytes()) {
                let _ = f.matches(&p);
            }
            let j = serde_json::to_string(&f).unwrap();
            let back: Filter = serde_json::from_str(&j).unwrap();
            prop_assert!(back == f);
        }
    }

    #[test]
    fn triggers_parse_never_panics_and_round_trips(body in parser_text()) {
        for text in [body.clone(), format!("[{body}]")] {
            if let Ok(t) = Triggers::parse(&text, "prop") {
                let _ = t.matching(&["/etc/ssh/sshd.conf"]);
                let j = serde_json::to_string(&t).unwrap();
                let back: Triggers = serde_json::from_str(&j).unwrap();
                prop_assert!(back == t);
            }
        }
    }

    /// Every non-comment line of an accepted filter is kept, in order.
    #[test]
    fn filter_keeps_every_regex_line(lines in proptest::collection::vec("[a-z/.]{1,8}", 0..10)) {
        let text = lines.join("\n");
        let f = Filter::parse(&text, "prop").unwrap();
        prop_assert_eq!(f.lines(), &lines[..]);
    }
}
