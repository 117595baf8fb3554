//! Durable file writes: write to a temp name in the same directory, fsync, rename into
//! place, fsync the directory. Readers never see a half-written file, and nothing is
//! acknowledged before it would survive a power cut.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Suffix of temporary files; anything ending in it is debris from a crash.
pub const TEMP_SUFFIX: &str = ".tmp~";

/// A temp path beside `path`, unique per process and call.
pub fn temp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".{}.{n}{TEMP_SUFFIX}",
        PID.get_or_init(std::process::id)
    ));
    path.with_file_name(name)
}

/// fsyncs a directory so renames within it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Atomically replaces `path` with `data` (mode 0644 for new files).
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    let guard = DeleteOnDrop(Some(tmp.clone()));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    guard.disarm();
    fsync_dir(parent_dir(path))
}

/// The directory `path` is in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// An exclusive lock on a directory, held until dropped (or the process dies): one
/// daemon per data or state directory.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{dir} is in use by another process ({holder}); only one may use it at a time")]
    Busy { dir: PathBuf, holder: String },
    #[error("locking {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Takes the lock file `name` in `dir` without waiting, and records this process's pid in
/// it; fails with `LockError::Busy` naming the holder's pid if another process has it.
pub fn lock_dir(dir: &Path, name: &str) -> Result<DirLock, LockError> {
    let path = dir.join(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(|source| LockError::Io {
            path: path.clone(),
            source,
        })?;
    lock_file(file, dir, &path)
}

/// Takes the lock on an open lock file `file` (of directory `dir`, at `path`: both for
/// messages), as `lock_dir` does.
pub fn lock_file(mut file: File, dir: &Path, path: &Path) -> Result<DirLock, LockError> {
    use rustix::fs::{flock, FlockOperation};
    use std::io::{Read, Seek};
    let io = |source| LockError::Io {
        path: path.to_path_buf(),
        source,
    };
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(LockError::Busy {
                dir: dir.to_path_buf(),
                holder: if pid.is_empty() {
                    format!("lock file {}", path.display())
                } else {
                    format!("pid {pid}, lock file {}", path.display())
                },
            });
        }
        Err(e) => return Err(io(e.into())),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(DirLock { _file: file })
}

/// Removes a file when dropped, unless disarmed: cleans up temp files on every error path.
pub struct DeleteOnDrop(pub Option<PathBuf>);

impl DeleteOnDrop {
    pub fn new(path: PathBuf) -> Self {
        DeleteOnDrop(Some(path))
    }
    /// Keeps the file.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_of_a_bare_file_name_is_the_current_directory() {
        assert_eq!(parent_dir(Path::new("x")), Path::new("."));
        assert_eq!(parent_dir(Path::new("a/x")), Path::new("a"));
        assert_eq!(parent_dir(Path::new("/x")), Path::new("/"));
    }

    #[test]
    fn a_locked_directory_names_its_holder_until_released() {
        let d = tempfile::tempdir().unwrap();
        let held = lock_dir(d.path(), "lock").unwrap();
        let e = lock_dir(d.path(), "lock").unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains("in use"),
            "{e}"
        );
        drop(held);
        lock_dir(d.path(), "lock").unwrap();
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
