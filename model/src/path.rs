//! `FsPath`: an absolute path inside an image or a machine's root, kept as raw bytes.
//!
//! File names on Linux are bytes, so paths are `Vec<u8>`, never `String`. The encoding
//! decision, made once here: in JSON a path that is valid UTF-8 is a plain string; any
//! other path is an object `{"hex": "<hex of all its bytes>"}`. For humans (`show`, errors)
//! bytes that are not printable UTF-8 are written as `\xNN` and a backslash as `\\`.
//! Paths sort component by component, so a sorted list of paths is a pre-order walk with
//! the names of each directory in byte order.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cmp::Ordering;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;

/// An absolute, clean path: starts with `/`, no empty, `.` or `..` components, no trailing
/// `/` (except the root itself), no NUL.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct FsPath(Vec<u8>);

/// subd's private directory under a machine's root: never scanned, never part of an image.
pub const SUBD_DIR: &str = "/.subd";

/// Why a byte string is not an acceptable `FsPath`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid path {path}: {reason}")]
pub struct BadPath {
    pub path: String,
    pub reason: &'static str,
}

impl FsPath {
    /// The root, `/`.
    pub fn root() -> FsPath {
        FsPath(b"/".to_vec())
    }

    /// Validates an absolute path.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<FsPath, BadPath> {
        let bytes = bytes.into();
        let bad = |reason| BadPath {
            path: escape(&bytes),
            reason,
        };
        if bytes.first() != Some(&b'/') {
            return Err(bad("not absolute"));
        }
        if bytes.contains(&0) {
            return Err(bad("contains NUL"));
        }
        if bytes.len() == 1 {
            return Ok(FsPath(bytes));
        }
        for comp in bytes[1..].split(|&b| b == b'/') {
            match comp {
                b"" => return Err(bad("empty component or trailing slash")),
                b"." | b".." => return Err(bad("`.` or `..` component")),
                _ => {}
            }
        }
        Ok(FsPath(bytes))
    }

    /// Turns a relative archive path (`./etc/passwd`, `etc/passwd/`, `/etc`) into an
    /// absolute clean path. `.` components and repeated slashes are dropped; `..` is an
    /// error (it could escape). The archive root (`.` or empty) becomes `/`.
    pub fn from_relative(bytes: &[u8]) -> Result<FsPath, BadPath> {
        let mut out = Vec::with_capacity(bytes.len() + 1);
        for comp in bytes.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => {
                    return Err(BadPath {
                        path: escape(bytes),
                        reason: "`..` component",
                    })
                }
                c => {
                    out.push(b'/');
                    out.extend_from_slice(c);
                }
            }
        }
        if out.is_empty() {
            out.push(b'/');
        }
        FsPath::new(out)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.len() == 1
    }

    /// Path relative to the root, without the leading `/` (empty for the root).
    pub fn relative(&self) -> &[u8] {
        &self.0[1..]
    }

    /// As an `OsStr` relative to the root, for joining onto a directory.
    pub fn relative_os(&self) -> &OsStr {
        OsStr::from_bytes(self.relative())
    }

    /// The parent directory (`None` for the root).
    pub fn parent(&self) -> Option<FsPath> {
        if self.is_root() {
            return None;
        }
        let i = self.0.iter().rposition(|&b| b == b'/').unwrap();
        Some(FsPath(if i == 0 {
            b"/".to_vec()
        } else {
            self.0[..i].to_vec()
        }))
    }

    /// The last component (empty for the root).
    pub fn name(&self) -> &[u8] {
        let i = self.0.iter().rposition(|&b| b == b'/').unwrap();
        &self.0[i + 1..]
    }

    /// `self/name`; `name` must be a single non-empty component.
    pub fn join(&self, name: &[u8]) -> Result<FsPath, BadPath> {
        if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
            return Err(BadPath {
                path: escape(name),
                reason: "not a single file name",
            });
        }
        let mut v = self.0.clone();
        if !self.is_root() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        FsPath::new(v)
    }

    /// True if `self` is `other` or lies beneath it.
    pub fn starts_with(&self, other: &FsPath) -> bool {
        if other.is_root() {
            return true;
        }
        self.0.starts_with(&other.0)
            && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/')
    }

    /// The components after the root.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0[1..].split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    /// Human form with non-printable bytes escaped.
    pub fn display(&self) -> String {
        escape(&self.0)
    }
}

/// Escapes bytes for one-line human output: invalid UTF-8 and characters a terminal does
/// not show as themselves (controls, bidi overrides, zero-width and blank-looking ones:
/// `image::is_hidden_char`) as `\xNN`, backslash as `\\`.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if crate::image::is_hidden_char(c) => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn key(b: u8) -> u8 {
    // '/' sorts before every other byte so that a directory's subtree follows it directly.
    if b == b'/' {
        0
    } else {
        b
    }
}

impl Ord for FsPath {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (&self.0, &other.0);
        // `key` is one-to-one, so the first differing byte decides; found eight bytes at a
        // time (paths in one tree share long prefixes, and the diff compares them often).
        match first_difference(a, b) {
            Some(i) => key(a[i]).cmp(&key(b[i])),
            None => a.len().cmp(&b.len()),
        }
    }
}

/// Where `a` and `b` first differ, within the shorter's length.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let word = |s: &[u8]| u64::from_ne_bytes(s.try_into().expect("8 bytes"));
    let skip = a
        .chunks_exact(8)
        .zip(b.chunks_exact(8))
        .take_while(|(x, y)| word(x) == word(y))
        .count()
        * 8;
    (skip..n).find(|&i| a[i] != b[i])
}

impl PartialOrd for FsPath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for FsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

impl fmt::Debug for FsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.display())
    }
}

impl std::str::FromStr for FsPath {
    type Err = BadPath;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FsPath::new(s.as_bytes().to_vec())
    }
}

/// Serde form of raw bytes: a string if UTF-8, else `{"hex": …}`.
pub mod bytes_serde {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Str(String),
        Hex { hex: String },
    }

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(v) {
            Ok(st) => s.serialize_str(st),
            Err(_) => {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(1))?;
                let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
                m.serialize_entry("hex", &hex)?;
                m.end()
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Str(s) => Ok(s.into_bytes()),
            Repr::Hex { hex } => {
                if hex.len() % 2 != 0 {
                    return Err(serde::de::Error::custom("odd-length hex path"));
                }
                (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                    .collect::<Result<Vec<u8>, _>>()
                    .map_err(serde::de::Error::custom)
            }
        }
    }
}

impl Serialize for FsPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        bytes_serde::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for FsPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = bytes_serde::deserialize(d)?;
        FsPath::new(v).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths shown to an operator (`imagetool show`, `diff`) never carry a bidi override
    /// or other hidden character raw.
    #[test]
    fn escape_shows_hidden_characters_as_bytes() {
        assert_eq!(
            escape("/bidi\u{202e}gnp.exe".as_bytes()),
            "/bidi\\xe2\\x80\\xaegnp.exe"
        );
        assert_eq!(escape("/a\u{a0}b".as_bytes()), "/a\\xc2\\xa0b");
        assert_eq!(escape("/café/日本 x".as_bytes()), "/café/日本 x");
    }
    use proptest::prelude::*;

    fn p(s: &str) -> FsPath {
        FsPath::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn validation_table() {
        for ok in ["/", "/a", "/a/b", "/a b/c.d", "/.hidden"] {
            assert!(FsPath::new(ok.as_bytes().to_vec()).is_ok(), "{ok}");
        }
        for bad in ["", "a", "/a/", "//", "/a//b", "/./a", "/a/..", "/a\0b"] {
            assert!(FsPath::new(bad.as_bytes().to_vec()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn from_relative_table() {
        assert_eq!(FsPath::from_relative(b"./").unwrap(), p("/"));
        assert_eq!(FsPath::from_relative(b"").unwrap(), p("/"));
        assert_eq!(
            FsPath::from_relative(b"./etc//passwd").unwrap(),
            p("/etc/passwd")
        );
        assert_eq!(FsPath::from_relative(b"/abs/x/").unwrap(), p("/abs/x"));
        assert!(FsPath::from_relative(b"../etc").is_err());
        assert!(FsPath::from_relative(b"a/../../b").is_err());
    }

    #[test]
    fn preorder_sorting() {
        let mut v = [p("/a-c"), p("/a/b"), p("/"), p("/a"), p("/b"), p("/a/b/c")];
        v.sort();
        let s: Vec<String> = v.iter().map(|x| x.display()).collect();
        assert_eq!(s, ["/", "/a", "/a/b", "/a/b/c", "/a-c", "/b"]);
    }

    #[test]
    fn parent_name_join() {
        assert_eq!(p("/a/b").parent().unwrap(), p("/a"));
        assert_eq!(p("/a").parent().unwrap(), p("/"));
        assert!(p("/").parent().is_none());
        assert_eq!(p("/a/b").name(), b"b");
        assert_eq!(p("/").join(b"x").unwrap(), p("/x"));
        assert!(p("/a/bc").starts_with(&p("/a")));
        assert!(!p("/ab").starts_with(&p("/a")));
    }

    #[test]
    fn non_utf8_json_and_display() {
        let path = FsPath::new(b"/caf\xe9\n".to_vec()).unwrap();
        let j = serde_json::to_string(&path).unwrap();
        assert_eq!(j, r#"{"hex":"2f636166e90a"}"#);
        assert_eq!(serde_json::from_str::<FsPath>(&j).unwrap(), path);
        assert_eq!(path.display(), "/caf\\xe9\\x0a");
        assert_eq!(serde_json::to_string(&p("/ok")).unwrap(), "\"/ok\"");
    }

    proptest! {
        /// The word-at-a-time comparison orders paths as comparing their keys byte by byte.
        #[test]
        fn order_is_the_bytewise_order_of_keys(
            common in proptest::collection::vec(prop_oneof![Just(b'/'), 1u8..=255], 0..40),
            a in proptest::collection::vec(prop_oneof![Just(b'/'), 1u8..=255], 0..12),
            b in proptest::collection::vec(prop_oneof![Just(b'/'), 1u8..=255], 0..12),
        ) {
            let path = |tail: &[u8]| FsPath([b"/".as_slice(), &common, tail].concat());
            let (pa, pb) = (path(&a), path(&b));
            let reference = pa.0.iter().map(|&x| key(x)).cmp(pb.0.iter().map(|&x| key(x)));
            prop_assert_eq!(pa.cmp(&pb), reference);
        }

        #[test]
        fn json_round_trip(names in proptest::collection::vec(proptest::collection::vec(1u8..=255, 1..8), 0..4)) {
            let mut path = FsPath::root();
            for n in names {
                let n: Vec<u8> = n.into_iter().map(|b| if b == b'/' { b'_' } else { b }).collect();
                if n == b"." || n == b".." { continue; }
                path = path.join(&n).unwrap();
            }
            let j = serde_json::to_string(&path).unwrap();
            prop_assert_eq!(serde_json::from_str::<FsPath>(&j).unwrap(), path);
        }
    }
}
