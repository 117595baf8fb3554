//! State lines: an image's *stateful paths* (use-ephemeral's), regexes with the filter's
//! syntax (one per line, start-anchored, `#` comments). A path matching one is seeded from
//! the image only when nothing exists there, and never managed afterwards.

use crate::filter::{BadRegex, Filter};
use crate::path::FsPath;
use serde::{Deserialize, Serialize};

/// Compiled state lines. Equal when they hold the same set of lines.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct StateLines(Filter);

/// Why a state file is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error(transparent)]
    Regex(#[from] BadRegex),
    #[error("{source_name}:{line}: \"!\" (invert) is a filter line, not a state line")]
    Invert { source_name: String, line: usize },
}

impl StateLines {
    /// Parses a state file's text; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<StateLines, StateError> {
        if let Some(n) = text.lines().position(|l| l == "!") {
            return Err(StateError::Invert {
                source_name: source_name.to_string(),
                line: n + 1,
            });
        }
        Ok(StateLines(Filter::parse(text, source_name)?))
    }

    /// Builds state lines from regex lines (as stored in an image).
    pub fn from_lines(lines: Vec<String>) -> Result<StateLines, StateError> {
        Self::parse(&lines.join("\n"), "state")
    }

    /// The regex lines, in file order.
    pub fn lines(&self) -> &[String] {
        self.0.lines()
    }

    /// True if `path` matches a state line.
    pub fn matches(&self, path: &FsPath) -> bool {
        !path.is_root() && self.0.matches(path)
    }

    /// True if `path` is state: it or an ancestor matches a state line.
    pub fn covers(&self, path: &FsPath) -> bool {
        let mut at = Some(path.clone());
        while let Some(p) = at {
            if self.matches(&p) {
                return true;
            }
            at = p.parent();
        }
        false
    }
}

impl TryFrom<Vec<String>> for StateLines {
    type Error = StateError;
    fn try_from(v: Vec<String>) -> Result<Self, Self::Error> {
        // Stored lines keep no comments or blanks; a `#` line is a regex only if it was
        // stored, which `parse` never does.
        StateLines::from_lines(v)
    }
}

impl From<StateLines> for Vec<String> {
    fn from(s: StateLines) -> Vec<String> {
        s.0.lines().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> FsPath {
        s.parse().unwrap()
    }

    #[test]
    fn filter_syntax_start_anchored_with_comments() {
        let s = StateLines::parse("# keys\n\n/mnt/state/.*\n/var/lib/db$\n", "f").unwrap();
        assert_eq!(s.lines(), ["/mnt/state/.*", "/var/lib/db$"]);
        let cases = [
            ("/mnt/state/etc", true),
            ("/mnt/state", false),
            ("/x/mnt/state/etc", false),
            ("/var/lib/db", true),
            ("/var/lib/db/x", false),
            ("/", false),
        ];
        for (path, want) in cases {
            assert_eq!(s.matches(&p(path)), want, "{path}");
        }
        assert!(s.covers(&p("/var/lib/db/x")));
        assert!(!s.covers(&p("/var/lib")));
    }

    #[test]
    fn bad_lines_are_refused_naming_the_line() {
        let e = StateLines::parse("/ok\n/bad[\n", "state.txt").unwrap_err();
        assert!(
            e.to_string().starts_with("state.txt:2: invalid regex"),
            "{e}"
        );
        let e = StateLines::parse("/ok\n!\n", "state.txt").unwrap_err();
        assert_eq!(
            e.to_string(),
            "state.txt:2: \"!\" (invert) is a filter line, not a state line"
        );
    }

    #[test]
    fn json_is_a_list_of_lines() {
        let s = StateLines::parse("/a\n/b\n", "x").unwrap();
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, r#"["/a","/b"]"#);
        assert_eq!(serde_json::from_str::<StateLines>(&j).unwrap(), s);
        assert!(serde_json::from_str::<StateLines>(r#"["("]"#).is_err());
        assert!(serde_json::from_str::<StateLines>(r#"["!"]"#).is_err());
    }
}
