//! The MDB on disk: reading, locked read-modify-write edits (temp + fsync + rename, so the
//! dominator never sees half a file), and the append-only history beside it.
//!
//! Files: `<mdb>` itself, `<mdb>.lock` (an `flock` taken for every edit, so two `mdb`
//! commands never lose each other's change) and `<mdb>.history` (JSON lines, one per
//! changed machine, fsynced before the new MDB is renamed into place). Hand edits with an
//! editor bypass the lock and the history; they are still read and kept.
//!
//! One edit (`mdb set --where …` changing many machines included) is one *edit id*: the
//! line number of its first history line, carried by each of its lines (`Edit`; lines
//! written before edit ids existed are each their own edit, numbered by their line).
//! `mdb rollback --entry ID` undoes an edit as a whole (`undo`).

use crate::machine::{Machine, Mdb, MdbError};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

/// A failed read or edit of the MDB file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: MdbError },
    #[error("{0}")]
    Edit(String),
    /// A `--where` selection that picks no machine.
    #[error("no machine in {} matches {selection}", .path.display())]
    NoMatch { selection: String, path: PathBuf },
    /// `rollback --entry ID` of an edit the history does not hold.
    #[error("no edit #{0} in the history (see `mdb history`)")]
    NoEdit(u64),
    /// Undoing an edit whose machine changed since (the message names host and field).
    #[error("cannot undo edit #{edit}: {host}: {problem}")]
    Conflict {
        edit: u64,
        host: String,
        problem: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads and validates the MDB at `path`.
pub fn load(path: &Path) -> Result<Mdb, StoreError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    Mdb::parse(&text).map_err(|source| StoreError::Invalid {
        path: path.to_path_buf(),
        source,
    })
}

/// `load`, plus the warnings about odd keys (`Mdb::parse_with_warnings`).
pub fn load_with_warnings(path: &Path) -> Result<(Mdb, Vec<String>), StoreError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    Mdb::parse_with_warnings(&text).map_err(|source| StoreError::Invalid {
        path: path.to_path_buf(),
        source,
    })
}

/// One line of the history: what an edit did to one machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Unix seconds.
    pub time: u64,
    pub host: String,
    /// `add`, `set`, `remove` or `rollback`.
    pub action: String,
    /// Who ran it (`$SUDO_USER`, `$USER` or the uid).
    pub user: String,
    pub before: Option<Machine>,
    pub after: Option<Machine>,
    /// The edit this line belongs to (every machine one command changed shares it);
    /// absent in lines written before edit ids, which read as their own line number.
    #[serde(default, rename = "edit", skip_serializing_if = "Option::is_none")]
    pub edit: Option<u64>,
}

impl HistoryEntry {
    /// The id of the edit this line belongs to (0 only for an entry never read or written).
    pub fn edit_id(&self) -> u64 {
        self.edit.unwrap_or(0)
    }
}

/// Where the history of the MDB at `path` lives.
pub fn history_path(path: &Path) -> PathBuf {
    sibling(path, ".history")
}

/// Where the edit lock of the MDB at `path` lives.
pub fn lock_path(path: &Path) -> PathBuf {
    sibling(path, ".lock")
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn current_user() -> String {
    for var in ["SUDO_USER", "USER", "LOGNAME"] {
        if let Ok(u) = std::env::var(var) {
            if !u.is_empty() {
                return u;
            }
        }
    }
    format!("uid {}", rustix::process::getuid().as_raw())
}

/// Reads every history entry for `host` (case-insensitive), oldest first. A missing
/// history is empty; a torn last line (crash while appending) is skipped.
pub fn history(path: &Path, host: &str) -> Result<Vec<HistoryEntry>, StoreError> {
    let mut all = history_all(path)?;
    all.retain(|e| e.host.eq_ignore_ascii_case(host));
    Ok(all)
}

/// Reads every history entry, oldest first, each with its edit id.
pub fn history_all(path: &Path) -> Result<Vec<HistoryEntry>, StoreError> {
    let hp = history_path(path);
    let f = match File::open(&hp) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&hp)(e)),
    };
    let mut out = Vec::new();
    for (n, line) in io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io_err(&hp))?;
        if let Ok(mut e) = serde_json::from_str::<HistoryEntry>(&line) {
            e.edit.get_or_insert(n as u64 + 1);
            out.push(e);
        }
    }
    Ok(out)
}

/// Lines already in the history (the next line's number is one more), and whether a
/// torn last line (no newline: a crash while appending) must first be ended.
fn history_lines(hp: &Path) -> Result<(u64, bool), StoreError> {
    match std::fs::read(hp) {
        Ok(b) => {
            let torn = b.last().is_some_and(|&c| c != b'\n');
            let n = b.iter().filter(|&&c| c == b'\n').count() as u64;
            Ok((n + u64::from(torn), torn))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((0, false)),
        Err(e) => Err(io_err(hp)(e)),
    }
}

/// Undoes the edit whose lines are `entries` (all with one edit id) on `mdb`, as a whole:
/// a changed machine gets back the fields that edit changed, an added one is removed, a
/// removed one comes back. Refused, naming the machine and field, when the machine has
/// changed since in a way the undo would overwrite.
pub fn undo(mdb: &mut Mdb, entries: &[HistoryEntry]) -> Result<Vec<String>, StoreError> {
    let mut hosts = Vec::new();
    for e in entries {
        let conflict = |problem: String| StoreError::Conflict {
            edit: e.edit_id(),
            host: e.host.clone(),
            problem,
        };
        let current = mdb.get(&e.host).cloned();
        match (&e.before, &e.after) {
            (Some(b), Some(a)) => {
                let cur = current.ok_or_else(|| conflict("no longer in the MDB".into()))?;
                let undone = undo_fields(b, a, &cur).map_err(conflict)?;
                *mdb.get_mut(&e.host).expect("present") = undone;
            }
            (None, Some(a)) => {
                if current.as_ref() != Some(a) {
                    return Err(conflict("changed or removed since it was added".into()));
                }
                mdb.remove(&e.host);
            }
            (Some(b), None) => {
                if current.is_some() {
                    return Err(conflict("added again since it was removed".into()));
                }
                mdb.add(b.clone())
                    .map_err(|err| conflict(err.to_string()))?;
            }
            (None, None) => continue,
        }
        hosts.push(e.host.clone());
    }
    Ok(hosts)
}

/// `cur` with every field that `before -> after` changed set back to `before`; an error
/// names a field that no longer holds the edit's value.
fn undo_fields(before: &Machine, after: &Machine, cur: &Machine) -> Result<Machine, String> {
    let mut out = cur.clone();
    macro_rules! field {
        ($f:ident, $name:literal) => {
            if before.$f != after.$f {
                if cur.$f != after.$f {
                    return Err(format!(concat!($name, " changed since (now {:?})"), cur.$f));
                }
                out.$f = before.$f.clone();
            }
        };
    }
    field!(required_image, "RequiredImage");
    field!(planned_image, "PlannedImage");
    field!(disable_updates, "DisableUpdates");
    field!(ip_address, "IpAddress");
    field!(tags, "Tags");
    field!(extra, "other fields");
    Ok(out)
}

/// The image `rollback` returns `host` to: walking the history newest first, the first
/// recorded RequiredImage (after, then before) that differs from `current`. So a rollback
/// undoes the last change, a second rollback redoes it, and a hand edit made after the
/// last recorded change is undone to the recorded value.
pub fn previous_image(entries: &[HistoryEntry], current: &str) -> Option<String> {
    entries.iter().rev().find_map(|e| {
        [&e.after, &e.before]
            .into_iter()
            .flatten()
            .map(|m| m.required_image.as_str())
            .find(|img| !img.is_empty() && *img != current)
            .map(str::to_string)
    })
}

/// Applies `edit` to the MDB at `path` under its lock and records what changed.
///
/// A missing file is treated as an empty MDB when `create` is set. The closure returns
/// the action name for the history; the file is rewritten only if the content changed.
pub fn edit<T>(
    path: &Path,
    create: bool,
    edit: impl FnOnce(&mut Mdb) -> Result<(&'static str, T), StoreError>,
) -> Result<T, StoreError> {
    edit_recorded(path, create, edit).map(|(out, _)| out)
}

/// `edit`, also returning the edit id recorded in the history (`None`: nothing changed,
/// nothing written). Every machine the edit changed is one history line with that id,
/// all appended and fsynced before the one atomic rename of the new MDB.
pub fn edit_recorded<T>(
    path: &Path,
    create: bool,
    edit: impl FnOnce(&mut Mdb) -> Result<(&'static str, T), StoreError>,
) -> Result<(T, Option<u64>), StoreError> {
    let lp = lock_path(path);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lp)
        .map_err(io_err(&lp))?;
    lock.lock().map_err(io_err(&lp))?;
    let before = match std::fs::read_to_string(path) {
        Ok(text) => Mdb::parse(&text).map_err(|source| StoreError::Invalid {
            path: path.to_path_buf(),
            source,
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => Mdb::default(),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut after = before.clone();
    let (action, out) = edit(&mut after)?;
    // Re-validate the whole result: the closure may have produced a duplicate or a bad field.
    let text = after.to_json();
    Mdb::parse(&text).map_err(|e| StoreError::Edit(e.to_string()))?;
    let mut id = None;
    if after != before {
        id = Some(append_history(path, action, &before, &after)?);
        disk::fsutil::write_atomic(path, text.as_bytes()).map_err(io_err(path))?;
    }
    drop(lock);
    Ok((out, id))
}

/// Appends one line per changed machine, all with one edit id (returned).
fn append_history(path: &Path, action: &str, before: &Mdb, after: &Mdb) -> Result<u64, StoreError> {
    let hp = history_path(path);
    let (n, torn) = history_lines(&hp)?;
    let id = n + 1;
    let mut hosts: Vec<&str> = before
        .machines()
        .chain(after.machines())
        .map(|m| m.hostname.as_str())
        .collect();
    hosts.sort_by_key(|h| h.to_ascii_lowercase());
    hosts.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    let (time, user) = (disk::clock::unix_now(), current_user());
    let mut lines = String::new();
    if torn {
        lines.push('\n');
    }
    for host in hosts {
        let (b, a) = (before.get(host), after.get(host));
        if b == a {
            continue;
        }
        let e = HistoryEntry {
            time,
            host: host.to_string(),
            action: action.to_string(),
            user: user.clone(),
            before: b.cloned(),
            after: a.cloned(),
            edit: Some(id),
        };
        lines.push_str(&serde_json::to_string(&e).expect("history serializes"));
        lines.push('\n');
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&hp)
        .map_err(io_err(&hp))?;
    f.write_all(lines.as_bytes()).map_err(io_err(&hp))?;
    f.sync_all().map_err(io_err(&hp))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(before: Option<&str>, after: Option<&str>) -> HistoryEntry {
        let m = |img: &str| Machine {
            required_image: img.into(),
            ..Machine::new("h")
        };
        HistoryEntry {
            time: 0,
            host: "h".into(),
            action: "set".into(),
            user: "u".into(),
            before: before.map(m),
            after: after.map(m),
            edit: None,
        }
    }

    #[test]
    fn previous_image_table() {
        type Change<'a> = (Option<&'a str>, Option<&'a str>);
        let cases: &[(&[Change<'_>], &str, Option<&str>)] = &[
            (&[], "a", None),
            (&[(None, Some("a"))], "a", None),
            (&[(None, Some("a")), (Some("a"), Some("b"))], "b", Some("a")),
            // A second rollback toggles back.
            (
                &[
                    (None, Some("a")),
                    (Some("a"), Some("b")),
                    (Some("b"), Some("a")),
                ],
                "a",
                Some("b"),
            ),
            // A hand edit after the last recorded change is undone to the recorded value.
            (&[(Some("a"), Some("b"))], "c", Some("b")),
            // A change of something else (same image) is skipped over.
            (
                &[(Some("a"), Some("b")), (Some("b"), Some("b"))],
                "b",
                Some("a"),
            ),
            // Empty images are never a rollback target.
            (&[(Some(""), Some("b"))], "b", None),
        ];
        for (hist, current, want) in cases {
            let entries: Vec<_> = hist.iter().map(|(b, a)| entry(*b, *a)).collect();
            assert_eq!(
                previous_image(&entries, current).as_deref(),
                *want,
                "{hist:?} {current}"
            );
        }
    }

    #[test]
    fn edit_writes_history_and_refuses_bad_results() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("mdb.json");
        edit(&p, true, |m| Ok(("add", m.add(Machine::new("a")).unwrap()))).unwrap();
        edit(&p, false, |m| {
            m.get_mut("a").unwrap().required_image = "img/1".into();
            Ok(("set", ()))
        })
        .unwrap();
        // An edit producing an invalid MDB changes nothing.
        let err = edit(&p, false, |m| {
            m.get_mut("a").unwrap().required_image = "../bad".into();
            Ok(("set", ()))
        })
        .unwrap_err();
        assert!(err.to_string().contains("RequiredImage"), "{err}");
        assert_eq!(load(&p).unwrap().get("a").unwrap().required_image, "img/1");
        let h = history(&p, "A").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].action, "add");
        assert_eq!(h[1].after.as_ref().unwrap().required_image, "img/1");
        // Only the MDB, its lock and its history: no temp debris.
        let mut names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["mdb.json", "mdb.json.history", "mdb.json.lock"]);
    }

    #[test]
    fn undo_table() {
        let m = |img: &str, planned: &str| Machine {
            required_image: img.into(),
            planned_image: planned.into(),
            ..Machine::new("h")
        };
        let e = |b: Option<Machine>, a: Option<Machine>| {
            HistoryEntry {
                edit: Some(7),
                ..entry(None, None)
            }
            .with(b, a)
        };
        type Case = (
            Option<Machine>,
            Option<Machine>,
            Option<Machine>,
            Result<Option<Machine>, &'static str>,
        );
        let cases: Vec<Case> = vec![
            // A set is undone field by field; fields it did not change keep later edits.
            (
                Some(m("a", "")),
                Some(m("b", "")),
                Some(m("b", "p")),
                Ok(Some(m("a", "p"))),
            ),
            // A field the edit changed that changed again since: refused.
            (
                Some(m("a", "")),
                Some(m("b", "")),
                Some(m("c", "")),
                Err("RequiredImage changed since"),
            ),
            (
                Some(m("a", "")),
                Some(m("b", "")),
                None,
                Err("no longer in the MDB"),
            ),
            // An add is undone by removing the machine, a remove by adding it back.
            (None, Some(m("a", "")), Some(m("a", "")), Ok(None)),
            (
                None,
                Some(m("a", "")),
                Some(m("z", "")),
                Err("changed or removed since"),
            ),
            (Some(m("a", "")), None, None, Ok(Some(m("a", "")))),
            (Some(m("a", "")), None, Some(m("q", "")), Err("added again")),
        ];
        for (before, after, current, want) in cases {
            let mut mdb = Mdb::default();
            if let Some(c) = current.clone() {
                mdb.add(c).unwrap();
            }
            let got = undo(&mut mdb, &[e(before.clone(), after.clone())]);
            let label = format!("{before:?} -> {after:?} on {current:?}");
            match want {
                Ok(w) => {
                    assert_eq!(got.unwrap(), ["h"], "{label}");
                    assert_eq!(mdb.get("h"), w.as_ref(), "{label}");
                }
                Err(needle) => {
                    let err = got.unwrap_err().to_string();
                    assert!(
                        err.starts_with("cannot undo edit #7: h: "),
                        "{label}: {err}"
                    );
                    assert!(err.contains(needle), "{label}: {err}");
                }
            }
        }
    }

    impl HistoryEntry {
        fn with(mut self, before: Option<Machine>, after: Option<Machine>) -> Self {
            self.before = before;
            self.after = after;
            self
        }
    }

    #[test]
    fn concurrent_edits_are_not_lost() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("mdb.json");
        std::thread::scope(|s| {
            for i in 0..8 {
                let p = &p;
                s.spawn(move || {
                    edit(p, true, |m| {
                        Ok(("add", m.add(Machine::new(&format!("h{i}"))).unwrap()))
                    })
                    .unwrap()
                });
            }
        });
        assert_eq!(load(&p).unwrap().machines().count(), 8);
    }
}
