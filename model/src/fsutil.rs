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
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.{n}{TEMP_SUFFIX}", std::process::id()));
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
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
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
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
