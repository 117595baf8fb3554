//! Hook programs an image carries (`imagetool add --hooks DIR`): `pre` hooks run on the
//! machine before an update changes anything, `post` hooks after activation and the
//! service starts. Here: what a hook is, which hooks an update runs and in what order, how
//! a plan carries them, and what a run reports. Pure: subd does the running.

use crate::hash::ObjectId;
use crate::plan::UpdatePlan;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// One hook program: its name (a file name in `pre/` or `post/`) and its content object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    pub name: String,
    pub hash: ObjectId,
    pub size: u64,
}

/// The hook programs of an image, each list in the order they run (byte order of names).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hooks {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post: Vec<Hook>,
}

/// When a hook runs.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Pre,
    Post,
}

impl Phase {
    /// Both phases, in the order they run.
    pub const ALL: [Phase; 2] = [Phase::Pre, Phase::Post];

    /// `pre` or `post` (also the subdirectory of a hooks directory).
    pub fn name(self) -> &'static str {
        match self {
            Phase::Pre => "pre",
            Phase::Post => "post",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a set of hooks is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HookError {
    #[error("{phase}/{name:?}: a hook name {why}")]
    BadName {
        phase: Phase,
        name: String,
        why: &'static str,
    },
    #[error("{phase}/{0}: named twice", .name)]
    Duplicate { phase: Phase, name: String },
}

/// Checks that `name` can name a hook: a single file name (no `/`, not `.` or `..`), at
/// most 255 bytes, without NUL, control or invisible format characters (it is shown on
/// status pages and in failure lines).
pub fn check_name(phase: Phase, name: &str) -> Result<(), HookError> {
    let why = if name.is_empty() {
        Some("is empty")
    } else if name == "." || name == ".." {
        Some("cannot be . or ..")
    } else if name.len() > 255 {
        Some("is longer than 255 bytes")
    } else if name.contains('/') {
        Some("cannot contain /")
    } else if name.chars().any(crate::image::is_hidden_char) {
        Some("cannot contain control or invisible characters")
    } else {
        None
    };
    match why {
        Some(why) => Err(HookError::BadName {
            phase,
            name: name.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

impl Hooks {
    /// No hook at all (old images, and images added without `--hooks`).
    pub fn is_empty(&self) -> bool {
        self.pre.is_empty() && self.post.is_empty()
    }

    /// The hooks of `phase`, as stored.
    pub fn of(&self, phase: Phase) -> &[Hook] {
        match phase {
            Phase::Pre => &self.pre,
            Phase::Post => &self.post,
        }
    }

    /// Builds hooks from unordered lists, sorted into running order and checked.
    pub fn new(pre: Vec<Hook>, post: Vec<Hook>) -> Result<Hooks, HookError> {
        let mut h = Hooks { pre, post };
        h.pre
            .sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        h.post
            .sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        h.validate()?;
        Ok(h)
    }

    /// Checks every name, and that no name appears twice in one phase.
    pub fn validate(&self) -> Result<(), HookError> {
        for phase in Phase::ALL {
            let mut seen = BTreeSet::new();
            for h in self.of(phase) {
                check_name(phase, &h.name)?;
                if !seen.insert(h.name.as_bytes()) {
                    return Err(HookError::Duplicate {
                        phase,
                        name: h.name.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The hooks of `phase` in the order they run: byte order of their names, whatever
    /// order they arrived in.
    pub fn ordered(&self, phase: Phase) -> Vec<&Hook> {
        let mut v: Vec<&Hook> = self.of(phase).iter().collect();
        v.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        v
    }

    /// Every hook's object and its size.
    pub fn objects(&self) -> BTreeMap<ObjectId, u64> {
        self.pre
            .iter()
            .chain(&self.post)
            .map(|h| (h.hash, h.size))
            .collect()
    }

    /// One line per hook, `pre NAME HASH SIZE`, in running order (`imagetool show-hooks`).
    pub fn listing(&self) -> String {
        let mut s = String::new();
        for phase in Phase::ALL {
            for h in self.ordered(phase) {
                s.push_str(&format!("{phase} {} {} {}\n", h.name, h.hash, h.size));
            }
        }
        s
    }

    /// The differences from `old` to `self`, one line each (`hook + pre NAME`,
    /// `hook - post NAME`, `hook ~ pre NAME` for new content), for `imagetool diff`.
    pub fn diff_lines(&self, old: &Hooks) -> Vec<String> {
        let mut lines = Vec::new();
        for phase in Phase::ALL {
            let a: BTreeMap<&[u8], &Hook> = old
                .of(phase)
                .iter()
                .map(|h| (h.name.as_bytes(), h))
                .collect();
            let b: BTreeMap<&[u8], &Hook> = self
                .of(phase)
                .iter()
                .map(|h| (h.name.as_bytes(), h))
                .collect();
            let names: BTreeSet<&[u8]> = a.keys().chain(b.keys()).copied().collect();
            for n in names {
                let line = match (a.get(n), b.get(n)) {
                    (Some(_), None) => format!("hook - {phase} {}", a[n].name),
                    (None, Some(h)) => format!("hook + {phase} {}", h.name),
                    (Some(x), Some(y)) if x.hash != y.hash => {
                        format!("hook ~ {phase} {}", y.name)
                    }
                    _ => continue,
                };
                lines.push(line);
            }
        }
        lines
    }
}

/// Whether `plan` changes anything on the machine: directories, inodes, links, deletions
/// or metadata. Fetching objects and copying files into the cache do not count.
pub fn changes_machine(plan: &UpdatePlan) -> bool {
    !(plan.dirs_to_make.is_empty()
        && plan.inodes_to_make.is_empty()
        && plan.hardlinks_to_make.is_empty()
        && plan.paths_to_delete.is_empty()
        && plan.inodes_to_change.is_empty())
}

/// Gives `plan` (just computed by `diff` for an image with `hooks`) the machine's
/// `previous_image` and, when the plan changes the machine, the hooks, adding the hook
/// objects the machine's `cache` lacks to what it must fetch. A plan that changes nothing
/// carries no hooks, so it stays empty and runs none.
pub fn attach(
    plan: &mut UpdatePlan,
    hooks: &Hooks,
    previous_image: Option<&str>,
    cache: &BTreeSet<ObjectId>,
) {
    plan.previous_image = previous_image.unwrap_or("").to_string();
    if hooks.is_empty() || !changes_machine(plan) {
        plan.hooks = Hooks::default();
        return;
    }
    plan.hooks = hooks.clone();
    for (id, size) in hooks.objects() {
        if !cache.contains(&id) && !plan.objects_to_fetch.contains(&id) {
            plan.objects_to_fetch.push(id);
            plan.fetch_bytes += size;
        }
    }
}

/// The hooks of `phase` an update of `plan` runs, in order: none when the plan changes
/// nothing on the machine.
pub fn to_run(plan: &UpdatePlan, phase: Phase) -> Vec<&Hook> {
    if !changes_machine(plan) {
        return Vec::new();
    }
    plan.hooks.ordered(phase)
}

/// How one hook run ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRun {
    pub phase: Phase,
    pub name: String,
    /// The exit code; `None` when killed by a signal, timed out or never started.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default)]
    pub timed_out: bool,
    /// Stopped (its process group sent `SIGTERM`, then `SIGKILL`) because subd was shutting
    /// down.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    /// Why it could not be started (not executable, bad interpreter …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawn_error: Option<String>,
    pub duration_ms: u64,
    /// The last lines of its standard output and error (interleaved as written).
    #[serde(default)]
    pub output: Vec<String>,
}

impl HookRun {
    /// Exited with status 0.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
            && !self.timed_out
            && !self.interrupted
            && self.spawn_error.is_none()
    }

    /// How it ended, in words: `exit 0`, `exit 3`, `killed by signal 9`, `timed out`,
    /// `interrupted`, or the spawn error.
    pub fn ending(&self) -> String {
        if let Some(e) = &self.spawn_error {
            return format!("not started: {e}");
        }
        if self.timed_out {
            return "timed out (killed)".into();
        }
        if self.interrupted {
            return "interrupted (subd shutting down)".into();
        }
        match (self.exit_code, self.signal) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "ended".into(),
        }
    }

    /// The status line of a failed run: `pre-hook failed: NAME: <last output line>`
    /// (for a timeout, a signal or a spawn failure, how it ended comes first).
    pub fn failure_line(&self) -> String {
        let phase = self.phase;
        let last = self.output.last().map(String::as_str).unwrap_or("");
        let why = if self.timed_out
            || self.interrupted
            || self.spawn_error.is_some()
            || self.exit_code.is_none()
        {
            if last.is_empty() {
                self.ending()
            } else {
                format!("{}: {last}", self.ending())
            }
        } else if last.is_empty() {
            self.ending()
        } else {
            last.to_string()
        };
        format!("{phase}-hook failed: {}: {why}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Inode;
    use crate::plan::PathInode;
    use crate::FsPath;

    fn hook(name: &str, n: u8) -> Hook {
        Hook {
            name: name.into(),
            hash: ObjectId::of(&[n]),
            size: 1,
        }
    }

    fn changing_plan() -> UpdatePlan {
        UpdatePlan {
            image_name: "img/2".into(),
            dirs_to_make: vec![PathInode {
                path: FsPath::new("/etc").unwrap(),
                inode: Inode::dir(0o755, 0, 0),
            }],
            ..UpdatePlan::default()
        }
    }

    #[test]
    fn hooks_run_in_byte_order_of_their_names() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["b", "a", "c"], &["a", "b", "c"]),
            (&["10-x", "2-y", "01-z"], &["01-z", "10-x", "2-y"]),
            (&["a", "B", "_"], &["B", "_", "a"]),
            (&["é", "z", "Z"], &["Z", "z", "é"]),
            (&[], &[]),
        ];
        for (given, want) in cases {
            let list: Vec<Hook> = given.iter().map(|n| hook(n, 0)).collect();
            let h = Hooks {
                pre: list.clone(),
                post: list.clone(),
            };
            for phase in Phase::ALL {
                let got: Vec<&str> = h.ordered(phase).iter().map(|h| h.name.as_str()).collect();
                assert_eq!(&got, want, "{given:?}");
            }
            let built = Hooks::new(list.clone(), vec![]).unwrap();
            let got: Vec<&str> = built.pre.iter().map(|h| h.name.as_str()).collect();
            assert_eq!(&got, want, "new {given:?}");
        }
    }

    #[test]
    fn bad_names_are_refused() {
        let cases: &[(&str, bool)] = &[
            ("ok-1.sh", true),
            ("", false),
            (".", false),
            ("..", false),
            ("a/b", false),
            ("tab\there", false),
            ("nl\n", false),
            ("zero\u{200b}width", false),
            (".hidden", true),
        ];
        for (name, ok) in cases {
            assert_eq!(check_name(Phase::Pre, name).is_ok(), *ok, "{name:?}");
        }
        let long = "x".repeat(256);
        assert!(check_name(Phase::Post, &long).is_err());
        let e = Hooks::new(vec![hook("a", 1), hook("a", 2)], vec![]).unwrap_err();
        assert_eq!(e.to_string(), "pre/a: named twice");
    }

    #[test]
    fn which_hooks_an_update_runs() {
        let hooks = Hooks {
            pre: vec![hook("b", 1), hook("a", 2)],
            post: vec![hook("z", 3)],
        };
        // (plan changes the machine, hooks given, pre to run, post to run)
        let cases: &[(bool, bool, &[&str], &[&str])] = &[
            (true, true, &["a", "b"], &["z"]),
            (false, true, &[], &[]),
            (true, false, &[], &[]),
            (false, false, &[], &[]),
        ];
        for (changes, with_hooks, pre, post) in cases {
            let mut plan = if *changes {
                changing_plan()
            } else {
                UpdatePlan::default()
            };
            let given = if *with_hooks {
                hooks.clone()
            } else {
                Hooks::default()
            };
            attach(&mut plan, &given, Some("img/1"), &BTreeSet::new());
            assert_eq!(plan.previous_image, "img/1");
            let names =
                |p| -> Vec<String> { to_run(&plan, p).iter().map(|h| h.name.clone()).collect() };
            assert_eq!(names(Phase::Pre), *pre, "{changes} {with_hooks}");
            assert_eq!(names(Phase::Post), *post, "{changes} {with_hooks}");
            // A plan that changes nothing stays empty: no update, no hooks, no fetch.
            assert_eq!(plan.is_empty(), !changes, "{changes} {with_hooks}");
        }
    }

    #[test]
    fn attach_fetches_only_the_hook_objects_the_cache_lacks() {
        let hooks = Hooks {
            pre: vec![hook("a", 1)],
            post: vec![hook("b", 2), hook("c", 1)],
        };
        let mut plan = changing_plan();
        let cache: BTreeSet<ObjectId> = [ObjectId::of(&[2])].into();
        attach(&mut plan, &hooks, None, &cache);
        assert_eq!(plan.objects_to_fetch, vec![ObjectId::of(&[1])]);
        assert_eq!(plan.fetch_bytes, 1);
        assert_eq!(plan.previous_image, "");
        // Once fetched, nothing more is asked for.
        let cache: BTreeSet<ObjectId> = [ObjectId::of(&[1]), ObjectId::of(&[2])].into();
        let mut plan = changing_plan();
        attach(&mut plan, &hooks, None, &cache);
        assert!(plan.objects_to_fetch.is_empty());
    }

    #[test]
    fn failure_lines() {
        let run = |exit: Option<i32>, signal, timed_out, out: &[&str]| HookRun {
            phase: Phase::Pre,
            name: "10-check".into(),
            exit_code: exit,
            signal,
            timed_out,
            output: out.iter().map(|s| s.to_string()).collect(),
            ..HookRun::default()
        };
        let cases = [
            (run(Some(0), None, false, &["fine"]), true, ""),
            (
                run(Some(3), None, false, &["first", "disk too small"]),
                false,
                "pre-hook failed: 10-check: disk too small",
            ),
            (
                run(Some(1), None, false, &[]),
                false,
                "pre-hook failed: 10-check: exit 1",
            ),
            (
                run(None, Some(9), true, &["waiting"]),
                false,
                "pre-hook failed: 10-check: timed out (killed): waiting",
            ),
            (
                run(None, Some(15), false, &[]),
                false,
                "pre-hook failed: 10-check: killed by signal 15",
            ),
            (
                HookRun {
                    interrupted: true,
                    ..run(None, Some(15), false, &["working"])
                },
                false,
                "pre-hook failed: 10-check: interrupted (subd shutting down): working",
            ),
            (
                // Exited 0 in the grace period after SIGTERM: still not a success.
                HookRun {
                    interrupted: true,
                    ..run(Some(0), None, false, &[])
                },
                false,
                "pre-hook failed: 10-check: interrupted (subd shutting down)",
            ),
        ];
        for (r, ok, line) in cases {
            assert_eq!(r.succeeded(), ok, "{r:?}");
            if !ok {
                assert_eq!(r.failure_line(), line);
            }
        }
    }

    #[test]
    fn listing_and_diff() {
        let old = Hooks {
            pre: vec![hook("a", 1), hook("b", 2)],
            post: vec![],
        };
        let new = Hooks {
            pre: vec![hook("b", 3), hook("c", 1)],
            post: vec![hook("p", 1)],
        };
        assert_eq!(
            new.diff_lines(&old),
            vec![
                "hook - pre a",
                "hook ~ pre b",
                "hook + pre c",
                "hook + post p"
            ]
        );
        assert!(new.diff_lines(&new).is_empty());
        let l = new.listing();
        assert!(l.starts_with("pre b "), "{l}");
        assert_eq!(l.lines().count(), 3);
    }

    #[test]
    fn old_json_without_hooks_loads_and_round_trips() {
        let h: Hooks = serde_json::from_str("{}").unwrap();
        assert!(h.is_empty());
        assert_eq!(serde_json::to_string(&h).unwrap(), "{}");
    }
}
