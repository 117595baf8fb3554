//! Group selection for MDB edits (`mdb set/list/rollback --where …`): which machine
//! records a list of `--where` terms picks. Pure: a record is seen as its host name and tags.
//!
//! A term is one of
//! - `TAG=VALUE`: the tag `TAG` is present with exactly `VALUE` (`TAG=` : present and empty);
//! - `TAG`: the tag is present, whatever its value;
//! - `Hostname=GLOB`: the host name matches `GLOB` (`*` any run, `?` one character,
//!   ASCII case-insensitive, as host names compare). `Hostname` is matched
//!   case-insensitively and is reserved: a tag of that name cannot be selected.
//!
//! Every term must hold (AND). Tag names and values compare exactly (case-sensitive).

use std::collections::BTreeMap;
use std::fmt;

/// A `--where` term that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadWhere {
    #[error("--where {0:?}: empty tag name")]
    EmptyKey(String),
    #[error("--where {0:?}: empty Hostname pattern")]
    EmptyPattern(String),
    #[error("no --where term given")]
    Nothing,
}

/// One `--where` term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Term {
    /// The tag is present (with this value, if given).
    Tag { key: String, value: Option<String> },
    /// The host name matches this glob.
    Hostname(String),
}

/// The reserved key of a host-name pattern.
pub const HOSTNAME_KEY: &str = "Hostname";

impl Term {
    /// Parses `TAG=VALUE`, `TAG` or `Hostname=GLOB`.
    pub fn parse(s: &str) -> Result<Term, BadWhere> {
        let (key, value) = match s.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (s, None),
        };
        if key.is_empty() {
            return Err(BadWhere::EmptyKey(s.to_string()));
        }
        if key.eq_ignore_ascii_case(HOSTNAME_KEY) {
            return match value {
                Some(glob) if !glob.is_empty() => Ok(Term::Hostname(glob.to_string())),
                _ => Err(BadWhere::EmptyPattern(s.to_string())),
            };
        }
        Ok(Term::Tag {
            key: key.to_string(),
            value: value.map(str::to_string),
        })
    }

    /// Whether a record with this host name and these tags satisfies the term.
    pub fn matches(&self, hostname: &str, tags: &BTreeMap<String, String>) -> bool {
        match self {
            Term::Tag { key, value: None } => tags.contains_key(key),
            Term::Tag {
                key,
                value: Some(v),
            } => tags.get(key) == Some(v),
            Term::Hostname(glob) => glob_match(glob.as_bytes(), hostname.as_bytes()),
        }
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Term::Tag { key, value: None } => write!(f, "{key}"),
            Term::Tag {
                key,
                value: Some(v),
            } => write!(f, "{key}={v}"),
            Term::Hostname(g) => write!(f, "{HOSTNAME_KEY}={g}"),
        }
    }
}

/// A selection: every term must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Where(Vec<Term>);

impl Where {
    /// Parses the `--where` arguments; at least one is needed.
    pub fn parse<S: AsRef<str>>(terms: &[S]) -> Result<Where, BadWhere> {
        if terms.is_empty() {
            return Err(BadWhere::Nothing);
        }
        terms
            .iter()
            .map(|t| Term::parse(t.as_ref()))
            .collect::<Result<_, _>>()
            .map(Where)
    }

    /// Whether a record with this host name and these tags is selected.
    pub fn matches(&self, hostname: &str, tags: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|t| t.matches(hostname, tags))
    }
}

/// The selection as the command line gave it: `--where a=b --where c`.
impl fmt::Display for Where {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "--where {t}")?;
        }
        Ok(())
    }
}

/// `*`/`?` glob match, ASCII case-insensitive (iterative, with one backtrack point).
fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p].eq_ignore_ascii_case(&s[i])) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(v: &[(&str, &str)]) -> BTreeMap<String, String> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parse_table() {
        let tag = |k: &str, v: Option<&str>| {
            Ok(Term::Tag {
                key: k.into(),
                value: v.map(String::from),
            })
        };
        let cases: &[(&str, Result<Term, BadWhere>)] = &[
            ("role=dhcp", tag("role", Some("dhcp"))),
            ("role", tag("role", None)),
            ("role=", tag("role", Some(""))),
            ("a=b=c", tag("a", Some("b=c"))),
            ("Hostname=web*", Ok(Term::Hostname("web*".into()))),
            ("hostname=web?", Ok(Term::Hostname("web?".into()))),
            ("=x", Err(BadWhere::EmptyKey("=x".into()))),
            ("", Err(BadWhere::EmptyKey("".into()))),
            ("Hostname=", Err(BadWhere::EmptyPattern("Hostname=".into()))),
            ("Hostname", Err(BadWhere::EmptyPattern("Hostname".into()))),
        ];
        for (s, want) in cases {
            assert_eq!(&Term::parse(s), want, "{s:?}");
        }
        assert_eq!(Where::parse::<&str>(&[]), Err(BadWhere::Nothing));
    }

    #[test]
    fn match_table() {
        let t = tags(&[("role", "dhcp"), ("site", "ams"), ("canary", "")]);
        let cases: &[(&[&str], &str, bool)] = &[
            (&["role=dhcp"], "m1", true),
            (&["role=DHCP"], "m1", false),
            (&["role=dhcp", "site=ams"], "m1", true),
            (&["role=dhcp", "site=lon"], "m1", false),
            (&["canary"], "m1", true),
            (&["canary="], "m1", true),
            (&["missing"], "m1", false),
            (&["Hostname=m*"], "M1.example", true),
            (&["Hostname=m?"], "m12", false),
            (&["Hostname=*.ams"], "web1.ams", true),
            (&["Hostname=*a*b*"], "xaxxbx", true),
            (&["Hostname=*a*b"], "xaxxbx", false),
            (&["Hostname=m1", "role=dhcp"], "m1", true),
        ];
        for (terms, host, want) in cases {
            let w = Where::parse(terms).unwrap();
            assert_eq!(w.matches(host, &t), *want, "{terms:?} on {host}");
        }
    }

    #[test]
    fn shows_as_given() {
        let w = Where::parse(&["role=dhcp", "canary", "hostname=m*"]).unwrap();
        assert_eq!(
            w.to_string(),
            "--where role=dhcp --where canary --where Hostname=m*"
        );
    }
}
