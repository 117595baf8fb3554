//! The keys of an MDB record as written: duplicates refused (serde_json would silently keep
//! the last of two equal keys, and two spellings of one key would both be read), and
//! warnings for keys that look like a misspelled known key (`RequiredImag`) or a known key
//! in another case (`requiredimage`). Pure: text in, findings out.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::collections::HashSet;
use std::fmt;

/// The keys of a record, as `mdb` writes them.
pub const KNOWN_KEYS: [&str; 6] = [
    "Hostname",
    "IpAddress",
    "RequiredImage",
    "PlannedImage",
    "DisableUpdates",
    "Tags",
];

/// Checks that no JSON object anywhere in `text` holds the same key twice; the error
/// names the key and where the second one is (serde_json's line and column).
pub fn check_no_duplicate_keys(text: &str) -> Result<(), serde_json::Error> {
    serde_json::from_str::<NoDuplicates>(text).map(|_| ())
}

/// Any JSON value, read only to refuse an object holding one key twice.
struct NoDuplicates;

impl<'de> Deserialize<'de> for NoDuplicates {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<NoDuplicates, D::Error> {
        d.deserialize_any(NoDuplicatesVisitor)
    }
}

struct NoDuplicatesVisitor;

impl<'de> Visitor<'de> for NoDuplicatesVisitor {
    type Value = NoDuplicates;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_i64<E>(self, _: i64) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_u64<E>(self, _: u64) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_f64<E>(self, _: f64) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_str<E>(self, _: &str) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_unit<E>(self) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NoDuplicates, A::Error> {
        while seq.next_element::<NoDuplicates>()?.is_some() {}
        Ok(NoDuplicates)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NoDuplicates, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            map.next_value::<NoDuplicates>()?;
        }
        Ok(NoDuplicates)
    }
}

/// Two keys of one record naming the same known field (`RequiredImage` and
/// `Requiredimage`): which known key, and the two spellings.
pub fn same_field_twice(record: &serde_json::Map<String, Value>) -> Option<(String, String)> {
    let mut seen: Vec<&str> = Vec::new();
    for key in record.keys() {
        if let Some(other) = seen.iter().find(|s| s.eq_ignore_ascii_case(key)) {
            if KNOWN_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key)) {
                return Some((other.to_string(), key.clone()));
            }
        }
        seen.push(key);
    }
    None
}

/// What is odd about one key of a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyWarning {
    /// A known key in another case (read as that key, as Dominator does).
    Case { key: String, known: &'static str },
    /// An unknown key a small typo away from a known one (kept, but not read).
    Typo { key: String, known: &'static str },
}

impl fmt::Display for KeyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyWarning::Case { key, known } => {
                write!(
                    f,
                    "key {key:?} is read as {known:?} (keys are case-insensitive)"
                )
            }
            KeyWarning::Typo { key, known } => write!(
                f,
                "unknown key {key:?} (kept, but not read): did you mean {known:?}?"
            ),
        }
    }
}

/// The warning for `key`, if it is a known key in another case or a typo of one.
pub fn key_warning(key: &str) -> Option<KeyWarning> {
    if KNOWN_KEYS.contains(&key) {
        return None;
    }
    if let Some(known) = KNOWN_KEYS.iter().find(|k| k.eq_ignore_ascii_case(key)) {
        return Some(KeyWarning::Case {
            key: key.to_string(),
            known,
        });
    }
    let lower = key.to_ascii_lowercase();
    KNOWN_KEYS
        .iter()
        .map(|k| (k, edit_distance(&lower, &k.to_ascii_lowercase())))
        .filter(|(k, d)| *d <= if k.len() >= 8 { 2 } else { 1 })
        .min_by_key(|(_, d)| *d)
        .map(|(known, _)| KeyWarning::Typo {
            key: key.to_string(),
            known,
        })
}

/// Levenshtein distance (insertions, deletions, substitutions) over chars.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        for (a, b, d) in [
            ("", "", 0),
            ("abc", "abc", 0),
            ("requiredimag", "requiredimage", 1),
            ("reqiredimage", "requiredimage", 1),
            ("requiredimgae", "requiredimage", 2),
            ("tag", "tags", 1),
            ("kitten", "sitting", 3),
        ] {
            assert_eq!(edit_distance(a, b), d, "{a} {b}");
        }
    }

    #[test]
    fn key_warnings_table() {
        let typo = |k: &'static str| {
            Some(KeyWarning::Typo {
                key: "".into(),
                known: k,
            })
        };
        for (key, want) in [
            ("RequiredImage", None),
            ("Tags", None),
            ("Owner", None),
            ("Rack", None),
            ("Location", None),
            ("RequiredImag", typo("RequiredImage")),
            ("RequiredImgae", typo("RequiredImage")),
            ("PlanedImage", typo("PlannedImage")),
            ("Hostnam", typo("Hostname")),
            ("IPAdress", typo("IpAddress")),
            ("Tag", typo("Tags")),
            ("DisableUpdate", typo("DisableUpdates")),
        ] {
            let got = key_warning(key).map(|w| match w {
                KeyWarning::Typo { known, .. } => KeyWarning::Typo {
                    key: "".into(),
                    known,
                },
                other => other,
            });
            assert_eq!(got, want, "{key}");
        }
        assert_eq!(
            key_warning("requiredimage"),
            Some(KeyWarning::Case {
                key: "requiredimage".into(),
                known: "RequiredImage"
            })
        );
    }

    #[test]
    fn duplicates_are_seen_at_any_depth() {
        assert!(check_no_duplicate_keys(r#"[{"a":1,"b":{"c":1,"d":[{"e":1}]}}]"#).is_ok());
        let e = check_no_duplicate_keys(r#"[{"Hostname":"a","Hostname":"b"}]"#).unwrap_err();
        assert!(
            e.to_string().starts_with("duplicate key \"Hostname\""),
            "{e}"
        );
        let e = check_no_duplicate_keys(r#"[{"Tags":{"k":"1","k":"2"}}]"#).unwrap_err();
        assert!(e.to_string().contains("duplicate key \"k\""), "{e}");
        let rec: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"RequiredImage":"a","Requiredimage":"b","x":1,"X":2}"#)
                .unwrap();
        let (a, b) = same_field_twice(&rec).unwrap();
        let mut pair = [a, b];
        pair.sort();
        assert_eq!(
            pair,
            ["RequiredImage".to_string(), "Requiredimage".to_string()]
        );
    }
}
