//! Filters: Dominator's list of path regexes naming paths to leave alone.
//!
//! One regex per line; blank lines and lines whose first character is `#` are skipped;
//! lines are not trimmed. Each regex is anchored at the start only (`^(?:line)`) and
//! matched against the absolute path bytes. A line that is exactly `!` inverts the
//! filter. Two filters are equal when they hold the same set of lines. Paths are bytes:
//! `.` matches one UTF-8 character, `(?-u:.)` any single byte of a non-UTF-8 name.

use crate::path::FsPath;
use regex::bytes::RegexSet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A compiled filter.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Filter {
    lines: Vec<String>,
    set: Patterns,
    invert: bool,
}

/// A regex that does not compile, with where it came from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{source_name}:{line}: invalid regex {regex:?}: {message}")]
pub struct BadRegex {
    pub source_name: String,
    pub line: usize,
    pub regex: String,
    pub message: String,
}

/// Start-anchored regexes matched as one: packed into as few `RegexSet`s as fit the regex
/// size limit, so lines that each compile alone always compile (and match) together.
#[derive(Clone, Debug, Default)]
pub(crate) struct Patterns {
    sets: Vec<RegexSet>,
}

impl Patterns {
    /// True if any regex matches `path`.
    pub(crate) fn is_match(&self, path: &[u8]) -> bool {
        self.sets.iter().any(|s| s.is_match(path))
    }

    /// Adds `other`'s regexes (already compiled: a merge cannot fail).
    pub(crate) fn extend(&mut self, other: &Patterns) {
        self.sets.extend(other.sets.iter().cloned());
    }
}

/// Compiles start-anchored regexes; `lines` are `(line number, regex)`.
pub(crate) fn compile_anchored(
    source_name: &str,
    lines: &[(usize, String)],
) -> Result<Patterns, BadRegex> {
    let bad = |n: usize, l: &str, e: regex::Error| BadRegex {
        source_name: source_name.to_string(),
        line: n,
        regex: l.to_string(),
        message: e
            .to_string()
            .lines()
            .last()
            .unwrap_or("")
            .trim()
            .to_string(),
    };
    for (n, l) in lines {
        regex::bytes::Regex::new(&format!("^(?:{l})")).map_err(|e| bad(*n, l, e))?;
    }
    let mut sets = Vec::new();
    pack(lines, &mut sets, &bad)?;
    Ok(Patterns { sets })
}

/// Compiles `lines` as one set, or, when that is over the size limit, each half apart.
fn pack(
    lines: &[(usize, String)],
    out: &mut Vec<RegexSet>,
    bad: &dyn Fn(usize, &str, regex::Error) -> BadRegex,
) -> Result<(), BadRegex> {
    if lines.is_empty() {
        return Ok(());
    }
    match RegexSet::new(lines.iter().map(|(_, l)| format!("^(?:{l})"))) {
        Ok(set) => {
            out.push(set);
            Ok(())
        }
        Err(e) if lines.len() == 1 => Err(bad(lines[0].0, &lines[0].1, e)),
        Err(_) => {
            let (a, b) = lines.split_at(lines.len() / 2);
            pack(a, out, bad)?;
            pack(b, out, bad)
        }
    }
}

impl Filter {
    /// Parses a filter file's text; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Filter, BadRegex> {
        let numbered: Vec<(usize, String)> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
            .map(|(i, l)| (i + 1, l.to_string()))
            .collect();
        Self::from_numbered(numbered, source_name)
    }

    /// Builds a filter from regex lines (as stored in an image).
    pub fn from_lines(lines: Vec<String>) -> Result<Filter, BadRegex> {
        Self::from_numbered(
            lines
                .into_iter()
                .enumerate()
                .map(|(i, l)| (i + 1, l))
                .collect(),
            "filter",
        )
    }

    fn from_numbered(
        numbered: Vec<(usize, String)>,
        source_name: &str,
    ) -> Result<Filter, BadRegex> {
        let invert = numbered.iter().any(|(_, l)| l == "!");
        let regexes: Vec<(usize, String)> =
            numbered.iter().filter(|(_, l)| l != "!").cloned().collect();
        let set = compile_anchored(source_name, &regexes)?;
        Ok(Filter {
            lines: numbered.into_iter().map(|(_, l)| l).collect(),
            set,
            invert,
        })
    }

    /// An empty filter (a full image that excludes nothing).
    pub fn empty() -> Filter {
        Filter::from_lines(Vec::new()).unwrap()
    }

    /// The regex lines, in file order.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// True if `path` is filtered out (to be left alone).
    pub fn matches(&self, path: &FsPath) -> bool {
        self.matches_bytes(path.as_bytes())
    }

    pub fn matches_bytes(&self, path: &[u8]) -> bool {
        self.set.is_match(path) != self.invert
    }

    /// Lines that end in blanks (kept exactly, but probably a mistake).
    pub fn lines_with_trailing_blanks(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| l.ends_with(' ') || l.ends_with('\t'))
            .map(|l| l.as_str())
            .collect()
    }
}

impl PartialEq for Filter {
    fn eq(&self, other: &Self) -> bool {
        self.lines.iter().collect::<BTreeSet<_>>() == other.lines.iter().collect::<BTreeSet<_>>()
    }
}

impl TryFrom<Vec<String>> for Filter {
    type Error = BadRegex;
    fn try_from(v: Vec<String>) -> Result<Self, Self::Error> {
        Filter::from_lines(v)
    }
}

impl From<Filter> for Vec<String> {
    fn from(f: Filter) -> Vec<String> {
        f.lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(f: &Filter, p: &str) -> bool {
        f.matches_bytes(p.as_bytes())
    }

    #[test]
    fn dominator_semantics_table() {
        let f = Filter::parse(
            "# comment\n\n/etc/fstab\n/tmp/.*\n/file.log\n/etc/hostname$\n",
            "f",
        )
        .unwrap();
        let cases = [
            ("/etc/fstab", true),
            ("/etc/fstab.bak", true),
            ("/etc/fstab/x", true),
            ("/usr/etc/fstab", false),
            ("/tmp", false),
            ("/tmp/x", true),
            ("/file%log", true),
            ("/etc/hostname", true),
            ("/etc/hostnamectl", false),
            ("/", false),
        ];
        for (p, want) in cases {
            assert_eq!(m(&f, p), want, "{p}");
        }
        assert_eq!(f.lines().len(), 4);
    }

    #[test]
    fn invert_line() {
        let f = Filter::parse("!\n/keep\n", "f").unwrap();
        assert!(!m(&f, "/keep/x"));
        assert!(m(&f, "/other"));
    }

    #[test]
    fn bad_regex_names_file_line_and_regex() {
        let e = Filter::parse("/ok\n/bad[\n", "filter.txt").unwrap_err();
        assert_eq!(e.line, 2);
        assert_eq!(e.regex, "/bad[");
        assert!(
            e.to_string()
                .starts_with("filter.txt:2: invalid regex \"/bad[\""),
            "{e}"
        );
    }

    #[test]
    fn empty_filter_matches_nothing_and_equality_is_set_based() {
        let f = Filter::parse("", "f").unwrap();
        assert!(!m(&f, "/anything"));
        assert_eq!(
            Filter::parse("/a\n/b\n", "x").unwrap(),
            Filter::parse("/b\n/a\n", "y").unwrap()
        );
        let j = serde_json::to_string(&Filter::parse("/a\n", "x").unwrap()).unwrap();
        assert_eq!(j, r#"["/a"]"#);
        assert!(serde_json::from_str::<Filter>(r#"["("]"#).is_err());
    }

    /// Lines that each compile but are over the regex size limit as one set (issue 9 #2).
    #[test]
    fn lines_too_big_together_still_compile_and_match() {
        let f = Filter::parse("\\w{100}a\n\\w{100}b\n\\w{100}c\n", "f").unwrap();
        for end in ["a", "b", "c"] {
            assert!(m(&f, &format!("{}{end}", "x".repeat(100))), "{end}");
        }
        assert!(!m(&f, &format!("{}d", "x".repeat(100))));
    }

    #[test]
    fn one_line_over_the_size_limit_names_its_line() {
        let e = Filter::parse("/ok\n\\w{100}{100}\n", "filter.txt").unwrap_err();
        assert_eq!((e.line, e.regex.as_str()), (2, "\\w{100}{100}"));
        assert!(
            e.to_string().starts_with("filter.txt:2: invalid regex"),
            "{e}"
        );
    }

    #[test]
    fn non_utf8_paths_match() {
        // Prefix patterns match whatever bytes follow; `.` matches one UTF-8 character,
        // and `(?-u:.)` one arbitrary byte.
        let f = Filter::parse("/caf\n/x(?-u:.)$", "f").unwrap();
        assert!(f.matches_bytes(b"/caf\xe9"));
        assert!(f.matches_bytes(b"/x\xff"));
        assert!(!f.matches_bytes(b"/x\xff\xfe"));
    }
}
