//! Filters: Dominator's list of path regexes naming paths to leave alone.
//!
//! One regex per line; blank lines and lines whose first character is `#` are skipped;
//! lines are not trimmed. Each regex is anchored at the start only (`^(?:line)`) and
//! matched against the absolute path bytes. A line that is exactly `!` inverts the
//! filter. Two filters are equal when they hold the same set of lines. Paths are bytes:
//! `.` matches one UTF-8 character, `(?-u:.)` any single byte of a non-UTF-8 name.

use crate::path::FsPath;
use regex::bytes::{RegexSet, RegexSetBuilder};
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

/// Compiled-size limits a set is tried with, smallest first; the one it fits is what it is
/// charged against the budget (an upper bound of its size, at most twice too high).
const SET_SIZE_TIERS: [usize; 4] = [64 << 10, 512 << 10, 4 << 20, 10 << 20];

/// Compiled regex one filter or one triggers file may hold in all (every set's tier).
/// Bounds the memory (and compile time) of every program that loads an image: the
/// imageserver, the dominator and every subd, which also keeps the previous image's.
pub const REGEX_BUDGET: usize = 40 << 20;

/// Lazy-DFA cache per set: path matching needs little, and sets may be many.
const DFA_CACHE: usize = 256 << 10;

/// What is left of `REGEX_BUDGET` while one filter or triggers file is compiled.
#[derive(Debug)]
pub(crate) struct Budget {
    left: usize,
}

impl Budget {
    pub(crate) fn new() -> Budget {
        Budget { left: REGEX_BUDGET }
    }
}

/// Compiles start-anchored regexes; `lines` are `(line number, regex)`, charged to `budget`.
pub(crate) fn compile_anchored(
    source_name: &str,
    lines: &[(usize, String)],
    budget: &mut Budget,
) -> Result<Patterns, BadRegex> {
    let bad = |n: usize, l: &str, message: String| BadRegex {
        source_name: source_name.to_string(),
        line: n,
        regex: l.to_string(),
        message,
    };
    let mut sets = Vec::new();
    pack(lines, &mut sets, budget, &bad)?;
    Ok(Patterns { sets })
}

/// The last line of a regex error (the crate's message spans several).
fn last_line(e: &regex::Error) -> String {
    e.to_string()
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Compiles `lines` as one set at the smallest tier it fits, or, when it fits none, each
/// half apart. A syntax error is narrowed down to its line the same way (parsing is cheap).
fn pack(
    lines: &[(usize, String)],
    out: &mut Vec<RegexSet>,
    budget: &mut Budget,
    bad: &dyn Fn(usize, &str, String) -> BadRegex,
) -> Result<(), BadRegex> {
    let Some((first, first_line)) = lines.first() else {
        return Ok(());
    };
    let mut last_error = None;
    for tier in SET_SIZE_TIERS {
        if tier > budget.left {
            break;
        }
        let built = RegexSetBuilder::new(lines.iter().map(|(_, l)| format!("^(?:{l})")))
            .size_limit(tier)
            .dfa_size_limit(DFA_CACHE)
            .build();
        match built {
            Ok(set) => {
                budget.left -= tier;
                out.push(set);
                return Ok(());
            }
            Err(e @ regex::Error::CompiledTooBig(_)) => last_error = Some(e),
            Err(e) => {
                if lines.len() == 1 {
                    return Err(bad(*first, first_line, last_line(&e)));
                }
                last_error = Some(e);
                break;
            }
        }
    }
    if lines.len() > 1 {
        let (a, b) = lines.split_at(lines.len() / 2);
        pack(a, out, budget, bad)?;
        return pack(b, out, budget, bad);
    }
    Err(bad(
        *first,
        first_line,
        match last_error {
            // Every tier was tried: the line is too big on its own.
            Some(e) if budget.left >= SET_SIZE_TIERS[SET_SIZE_TIERS.len() - 1] => last_line(&e),
            _ => format!(
                "with the lines before it, over the {} MiB of compiled regex one filter or triggers file may hold; use fewer or simpler regexes ([0-9A-Za-z_] rather than \\w, which is every letter of Unicode)",
                REGEX_BUDGET >> 20
            ),
        },
    ))
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
        let set = compile_anchored(source_name, &regexes, &mut Budget::new())?;
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

    /// Many lines that are each fine but together need more compiled regex than one
    /// filter or triggers file may hold are refused, naming the line where the budget ran
    /// out, rather than costing every program that loads the image gigabytes.
    #[test]
    fn lines_over_the_budget_together_are_refused_naming_where_it_ran_out() {
        let text: String = (0..300).map(|i| format!("/etc/x\\w{{30}}{i}\n")).collect();
        let t = std::time::Instant::now();
        let e = Filter::parse(&text, "big.filter").unwrap_err();
        assert!(
            e.message
                .contains("MiB of compiled regex one filter or triggers file may hold"),
            "{e}"
        );
        assert!(e.line > 1 && e.line < 300, "{e}");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "{:?}",
            t.elapsed()
        );
        // The same lines as many triggers share one budget.
        let triggers: Vec<serde_json::Value> = (0..300)
            .map(|i| serde_json::json!({"MatchLines": [format!("/etc/x\\w{{30}}{i}")], "Service": format!("s{i}")}))
            .collect();
        let e = crate::triggers::Triggers::parse(
            &serde_json::to_string(&triggers).unwrap(),
            "big.triggers",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("MiB of compiled regex"), "{e}");
        // A few of them are fine.
        let few: String = (0..3).map(|i| format!("/etc/x\\w{{30}}{i}\n")).collect();
        assert!(Filter::parse(&few, "few.filter")
            .unwrap()
            .matches(&"/etc/xabcdefghijabcdefghijabcdefghij1".parse().unwrap()));
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
