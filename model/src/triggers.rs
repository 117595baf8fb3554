//! Triggers: which service to stop/start (or reload, or reboot for) when which paths change.
//!
//! The file format is Dominator's: a JSON array of objects with `MatchLines`, `Service`,
//! `DoReload`, `DoReboot`, `HighImpact` and `SortName`; unknown keys are ignored and key
//! names match without regard to case. Lines whose first non-blank characters are `#`,
//! `//` or `!` are comments. An empty file is an error; `[]` means no triggers.

use crate::filter::{compile_anchored, BadRegex, Budget, Patterns};
use crate::image::version_cmp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One trigger.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Trigger {
    pub match_lines: Vec<String>,
    pub service: String,
    #[serde(default)]
    pub do_reload: bool,
    #[serde(default)]
    pub do_reboot: bool,
    #[serde(default)]
    pub high_impact: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sort_name: String,
}

/// A compiled, validated list of triggers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(try_from = "Vec<Trigger>", into = "Vec<Trigger>")]
pub struct Triggers {
    list: Vec<Trigger>,
    /// One compiled set per trigger, in `list` order.
    sets: Vec<Patterns>,
}

/// Why a triggers file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TriggersError {
    #[error("{0}: empty triggers file (use [] for no triggers)")]
    Empty(String),
    #[error("{0}: invalid JSON: {1}")]
    Json(String, String),
    #[error("{0}: {1}")]
    Shape(String, String),
    #[error(transparent)]
    Regex(#[from] BadRegex),
    #[error("{source_name}: trigger {index}: invalid service name {service:?} (want letters, digits, and @ . _ + : -)")]
    BadService {
        source_name: String,
        index: usize,
        service: String,
    },
}

/// True for a plain service name: `[A-Za-z0-9@._+:-]+`, not starting with `-` or `.`.
pub fn valid_service_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && !s.starts_with('-')
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@._+:-".contains(&b))
}

impl Triggers {
    /// Parses a triggers file; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Triggers, TriggersError> {
        let stripped: String = text
            .lines()
            .map(|l| {
                let t = l.trim_start();
                if t.starts_with('#') || t.starts_with("//") || t.starts_with('!') {
                    ""
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        if stripped.trim().is_empty() {
            return Err(TriggersError::Empty(source_name.to_string()));
        }
        let value: serde_json::Value = serde_json::from_str(&stripped)
            .map_err(|e| TriggersError::Json(source_name.to_string(), e.to_string()))?;
        let arr = value.as_array().ok_or_else(|| {
            TriggersError::Shape(
                source_name.to_string(),
                "want a JSON array of triggers".into(),
            )
        })?;
        let mut list = Vec::new();
        for (i, v) in arr.iter().enumerate() {
            let obj = v.as_object().ok_or_else(|| {
                TriggersError::Shape(
                    source_name.to_string(),
                    format!("trigger {i} is not an object"),
                )
            })?;
            let mut t = Trigger::default();
            let shape = |what: &str| {
                TriggersError::Shape(source_name.to_string(), format!("trigger {i}: {what}"))
            };
            for (k, val) in obj {
                match k.to_ascii_lowercase().as_str() {
                    "matchlines" => {
                        t.match_lines = serde_json::from_value(val.clone())
                            .map_err(|_| shape("MatchLines must be an array of strings"))?
                    }
                    "service" => {
                        t.service = val
                            .as_str()
                            .ok_or_else(|| shape("Service must be a string"))?
                            .to_string()
                    }
                    "doreload" => {
                        t.do_reload = val
                            .as_bool()
                            .ok_or_else(|| shape("DoReload must be true or false"))?
                    }
                    "doreboot" => {
                        t.do_reboot = val
                            .as_bool()
                            .ok_or_else(|| shape("DoReboot must be true or false"))?
                    }
                    "highimpact" => {
                        t.high_impact = val
                            .as_bool()
                            .ok_or_else(|| shape("HighImpact must be true or false"))?
                    }
                    "sortname" => {
                        t.sort_name = val
                            .as_str()
                            .ok_or_else(|| shape("SortName must be a string"))?
                            .to_string()
                    }
                    _ => {}
                }
            }
            list.push(t);
        }
        Self::build(list, source_name, Some(text))
    }

    /// Validates and compiles a list (as stored in an image or sent in a plan).
    pub fn new(list: Vec<Trigger>) -> Result<Triggers, TriggersError> {
        Self::build(list, "triggers", None)
    }

    fn build(
        list: Vec<Trigger>,
        source_name: &str,
        text: Option<&str>,
    ) -> Result<Triggers, TriggersError> {
        let mut sets = Vec::with_capacity(list.len());
        let mut budget = Budget::new();
        for (i, t) in list.iter().enumerate() {
            if !valid_service_name(&t.service) {
                return Err(TriggersError::BadService {
                    source_name: source_name.to_string(),
                    index: i,
                    service: t.service.clone(),
                });
            }
            let numbered: Vec<(usize, String)> = t
                .match_lines
                .iter()
                .map(|l| (text.map_or(i + 1, |txt| line_of(txt, l)), l.clone()))
                .collect();
            sets.push(compile_anchored(source_name, &numbered, &mut budget)?);
        }
        Ok(Triggers { list, sets })
    }

    pub fn list(&self) -> &[Trigger] {
        &self.list
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Triggers any of whose regexes match any of `paths`, in run order (SortName in
    /// version order, then Service).
    pub fn matching<'a, P: AsRef<[u8]>>(&'a self, paths: &[P]) -> Vec<&'a Trigger> {
        let mut out: Vec<&Trigger> = self
            .list
            .iter()
            .zip(&self.sets)
            .filter(|(_, set)| paths.iter().any(|p| set.is_match(p.as_ref())))
            .map(|(t, _)| t)
            .collect();
        out.sort_by(|a, b| {
            version_cmp(&a.sort_name, &b.sort_name).then_with(|| a.service.cmp(&b.service))
        });
        out
    }

    /// Dominator's "old set": the union of `self` and `other`, merged by
    /// (Service, DoReload) with match lines unioned and DoReboot/HighImpact OR-ed.
    /// The compiled regexes are reused, not recompiled: a merge cannot fail.
    pub fn merged_with(&self, other: &Triggers) -> Triggers {
        let mut by_key: BTreeMap<(String, bool), (Trigger, Patterns)> = BTreeMap::new();
        for (t, set) in self
            .list
            .iter()
            .zip(&self.sets)
            .chain(other.list.iter().zip(&other.sets))
        {
            let (e, patterns) = by_key
                .entry((t.service.clone(), t.do_reload))
                .or_insert_with(|| {
                    let e = Trigger {
                        service: t.service.clone(),
                        do_reload: t.do_reload,
                        sort_name: t.sort_name.clone(),
                        ..Trigger::default()
                    };
                    (e, Patterns::default())
                });
            for l in &t.match_lines {
                if !e.match_lines.contains(l) {
                    e.match_lines.push(l.clone());
                }
            }
            patterns.extend(set);
            e.do_reboot |= t.do_reboot;
            e.high_impact |= t.high_impact;
        }
        let (list, sets) = by_key.into_values().unzip();
        Triggers { list, sets }
    }
}

fn line_of(text: &str, regex: &str) -> usize {
    let quoted = serde_json::to_string(regex).unwrap_or_default();
    text.lines()
        .position(|l| l.contains(&quoted))
        .map_or(0, |i| i + 1)
}

impl PartialEq for Triggers {
    fn eq(&self, other: &Self) -> bool {
        self.list == other.list
    }
}

impl TryFrom<Vec<Trigger>> for Triggers {
    type Error = TriggersError;
    fn try_from(v: Vec<Trigger>) -> Result<Self, Self::Error> {
        Triggers::new(v)
    }
}

impl From<Triggers> for Vec<Trigger> {
    fn from(t: Triggers) -> Vec<Trigger> {
        t.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"[
{
"MatchLines": [
"/etc/ssh/sshd[.]conf",
"/usr/sbin/sshd"
],
"Service": "sshd"
}
]"#;

    #[test]
    fn seed_example_parses_and_matches() {
        let t = Triggers::parse(SEED, "triggers.sshd").unwrap();
        assert_eq!(t.list()[0].service, "sshd");
        assert_eq!(t.matching(&["/etc/ssh/sshd.conf"]).len(), 1);
        assert_eq!(t.matching(&["/etc/ssh/sshdXconf"]).len(), 0);
        assert_eq!(t.matching(&["/usr/sbin/sshd-keygen"]).len(), 1);
        assert_eq!(t.matching(&["/x/usr/sbin/sshd"]).len(), 0);
    }

    #[test]
    fn keys_any_case_unknown_ignored_comments() {
        let t = Triggers::parse(
            "# c\n// c\n[{\"matchlines\":[\"/a\"],\"SERVICE\":\"nginx\",\"doreload\":true,\"Extra\":1}]",
            "t",
        )
        .unwrap();
        assert!(t.list()[0].do_reload);
        assert_eq!(t.list()[0].service, "nginx");
    }

    #[test]
    fn errors_table() {
        let cases = [
            ("", "empty triggers file"),
            ("[", "invalid JSON"),
            (
                "[{\"MatchLines\":[\"/a\"],\"Service\":\"x\"},]",
                "invalid JSON",
            ),
            ("{}", "JSON array"),
            (
                "[{\"MatchLines\":[\"/a\"],\"Service\":\"rm -rf /\"}]",
                "invalid service name",
            ),
            (
                "[{\"MatchLines\":[\"/a\"],\"Service\":\"../x\"}]",
                "invalid service name",
            ),
            ("[{\"MatchLines\":\"/a\",\"Service\":\"x\"}]", "MatchLines"),
            (
                "[\n{\"MatchLines\":\n[\"/a(\"],\"Service\":\"x\"}]",
                "t:3: invalid regex \"/a(\"",
            ),
        ];
        for (text, want) in cases {
            let e = Triggers::parse(text, "t").unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        assert!(Triggers::parse("[]", "t").unwrap().is_empty());
    }

    #[test]
    fn merge_and_order() {
        let a = Triggers::parse(r#"[{"MatchLines":["/a"],"Service":"b"},{"MatchLines":["/x"],"Service":"a","SortName":"2"}]"#, "a").unwrap();
        let b = Triggers::parse(
            r#"[{"MatchLines":["/c"],"Service":"b","DoReboot":true}]"#,
            "b",
        )
        .unwrap();
        let m = a.merged_with(&b);
        let bt = m.list().iter().find(|t| t.service == "b").unwrap();
        assert_eq!(bt.match_lines, ["/a", "/c"]);
        assert!(bt.do_reboot);
        let order: Vec<_> = m
            .matching(&["/a", "/x"])
            .iter()
            .map(|t| t.service.clone())
            .collect();
        assert_eq!(order, ["b", "a"]);
    }

    /// Issue 9 #2: each set compiles alone, but one regex set of all three `\w{100}` lines
    /// is over the regex size limit; the merge must still match every line.
    #[test]
    fn merge_of_sets_too_big_together_matches_every_line() {
        let a = Triggers::parse(
            r#"[{"MatchLines":["\\w{100}a","\\w{100}b"],"Service":"app"}]"#,
            "a",
        )
        .unwrap();
        let b = Triggers::parse(r#"[{"MatchLines":["\\w{100}c"],"Service":"app"}]"#, "b").unwrap();
        let m = a.merged_with(&b);
        assert_eq!(m.list().len(), 1);
        assert_eq!(m.list()[0].match_lines.len(), 3);
        for end in ["a", "b", "c"] {
            let path = format!("{}{end}", "x".repeat(100));
            assert_eq!(m.matching(&[path.as_bytes()]).len(), 1, "{end}");
        }
        assert!(m.matching(&[format!("{}d", "x".repeat(100))]).is_empty());
        // The merged list also round-trips through the JSON subd saves.
        let json = serde_json::to_vec(&m).unwrap();
        let back: Triggers = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.matching(&[format!("{}c", "x".repeat(100))]).len(), 1);
    }
}
