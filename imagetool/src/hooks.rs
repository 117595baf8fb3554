//! `imagetool add … --hooks DIR`: reads `DIR/pre/` and `DIR/post/` into an image's
//! `Hooks` and the objects to upload. Anything else in DIR, or an entry that is not a
//! regular file (symlinks included: nothing is followed), is refused before anything is
//! sent.

use model::hooks::{Hook, HookError, Hooks, Phase};
use model::ObjectId;
use std::path::{Path, PathBuf};

/// Why a hooks directory is refused.
#[derive(Debug, thiserror::Error)]
pub enum HooksDirError {
    #[error("hooks directory {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("hooks directory {}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("hooks directory {}: unexpected entry {entry:?} (only pre/ and post/ may be there)", .dir.display())]
    Unexpected { dir: PathBuf, entry: String },
    #[error("hooks directory {}: {phase} is not a directory", .dir.display())]
    PhaseNotADirectory { dir: PathBuf, phase: Phase },
    #[error("hook {}: not a regular file", .0.display())]
    NotARegularFile(PathBuf),
    #[error("hook {}: name is not UTF-8", .0.display())]
    NotUtf8(PathBuf),
    #[error("hooks directory {}: {source}", .path.display())]
    Invalid { path: PathBuf, source: HookError },
}

/// An image's hooks and the bytes of their objects.
#[derive(Debug, Default)]
pub struct HooksDir {
    pub hooks: Hooks,
    pub objects: Vec<(ObjectId, Vec<u8>)>,
}

/// Reads the hooks in `dir` (`pre/` and `post/`, each optional).
pub fn read_hooks_dir(dir: &Path) -> Result<HooksDir, HooksDirError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HooksDirError::Io { path, source }
    };
    let meta = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    if !meta.is_dir() {
        return Err(HooksDirError::NotADirectory(dir.to_path_buf()));
    }
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let name = entry.map_err(io(dir))?.file_name();
        if name != "pre" && name != "post" {
            return Err(HooksDirError::Unexpected {
                dir: dir.to_path_buf(),
                entry: name.to_string_lossy().into_owned(),
            });
        }
    }
    let mut out = HooksDir::default();
    let mut lists = Vec::new();
    for phase in Phase::ALL {
        let sub = dir.join(phase.name());
        let list = match std::fs::symlink_metadata(&sub) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&sub)(e)),
            Ok(m) if !m.is_dir() => {
                return Err(HooksDirError::PhaseNotADirectory {
                    dir: dir.to_path_buf(),
                    phase,
                })
            }
            Ok(_) => read_phase(&sub, &mut out.objects)?,
        };
        lists.push(list);
    }
    let post = lists.pop().unwrap_or_default();
    let pre = lists.pop().unwrap_or_default();
    out.hooks = Hooks::new(pre, post).map_err(|source| HooksDirError::Invalid {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(out)
}

/// The hooks of one phase directory, their bytes added to `objects`.
fn read_phase(
    sub: &Path,
    objects: &mut Vec<(ObjectId, Vec<u8>)>,
) -> Result<Vec<Hook>, HooksDirError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HooksDirError::Io { path, source }
    };
    let mut hooks = Vec::new();
    for entry in std::fs::read_dir(sub).map_err(io(sub))? {
        let entry = entry.map_err(io(sub))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Err(HooksDirError::NotUtf8(path));
        };
        if !entry.file_type().map_err(io(&path))?.is_file() {
            return Err(HooksDirError::NotARegularFile(path));
        }
        let data = read_regular(&path)?;
        let hash = ObjectId::of(&data);
        hooks.push(Hook {
            name,
            hash,
            size: data.len() as u64,
        });
        objects.push((hash, data));
    }
    Ok(hooks)
}

/// The bytes of the regular file at `path`, opened without following a symlink and checked
/// to still be a regular file once open.
fn read_regular(path: &Path) -> Result<Vec<u8>, HooksDirError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| HooksDirError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)
        .map_err(io)?;
    if !f.metadata().map_err(io)?.is_file() {
        return Err(HooksDirError::NotARegularFile(path.to_path_buf()));
    }
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(io)?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_directories_table() {
        // (entries to make, error expected, pre names, post names)
        type Case = (
            &'static [&'static str],
            Option<&'static str>,
            &'static [&'static str],
        );
        let cases: &[Case] = &[
            (&["pre/b", "pre/a", "post/z"], None, &["a", "b"]),
            (&["post/x"], None, &[]),
            (&[], None, &[]),
            (&["other"], Some("unexpected entry \"other\""), &[]),
            (
                &["pre/a", "extra/"],
                Some("unexpected entry \"extra\""),
                &[],
            ),
            (&["pre/sub/"], Some("not a regular file"), &[]),
            (&["pre@"], Some("pre is not a directory"), &[]),
            (&["post/l@"], Some("not a regular file"), &[]),
        ];
        for (entries, err, pre) in cases {
            let d = tempfile::tempdir().unwrap();
            for e in *entries {
                let p = d.path().join(e.trim_end_matches(['/', '@']));
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                if e.ends_with('/') {
                    std::fs::create_dir(&p).unwrap();
                } else if e.ends_with('@') {
                    std::os::unix::fs::symlink("/etc/passwd", &p).unwrap();
                } else {
                    std::fs::write(&p, format!("#!/bin/sh\necho {e}\n")).unwrap();
                }
            }
            match (read_hooks_dir(d.path()), err) {
                (Ok(h), None) => {
                    let names: Vec<&str> = h.hooks.pre.iter().map(|h| h.name.as_str()).collect();
                    assert_eq!(&names, pre, "{entries:?}");
                    assert_eq!(h.objects.len(), h.hooks.pre.len() + h.hooks.post.len());
                }
                (Err(e), Some(want)) => {
                    let line = e.to_string();
                    assert!(line.contains(want), "{entries:?}: {line}");
                    assert!(!line.contains('\n'));
                }
                (r, want) => panic!("{entries:?}: got {r:?}, want {want:?}"),
            }
        }
    }
}
