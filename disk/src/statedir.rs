//! The state directory `ROOT/.subd` of subd and `imagetool patch-directory`: opened once,
//! from a handle on the root and without following a symlink, checked to be this
//! process's own and writable by no one else, and from then on reached only through that
//! handle (`*at` calls, or paths anchored at it), never again by the path `ROOT/.subd`.
//!
//! Where a local user can write the root, they could otherwise swap `.subd` for a symlink
//! between two uses of the path and have the state written, deleted or read elsewhere. So
//! a root that others can write (group or other write without the sticky bit, or owned by
//! another user than this process or root) is refused at start, and so is a `.subd` that
//! is a symlink, not a directory, someone else's, or writable by others; a `.subd` of ours
//! with looser read bits is tightened to 0700.

use crate::fsutil::{DirLock, LockError, TEMP_SUFFIX};
use crate::objectstore::{ObjectStore, StoreError};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The state directory's name in the root.
pub const STATE_DIR_NAME: &str = ".subd";

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{root} is writable by other users (mode {mode:04o}): refusing to keep state in it (a local user could replace {state}); make it writable by its owner only")]
    RootWritable {
        root: PathBuf,
        mode: u32,
        state: PathBuf,
    },
    #[error("{root} is owned by uid {owner}, not by this process (uid {euid}) or root: refusing to keep state in it (its owner could replace {state})")]
    RootNotOurs {
        root: PathBuf,
        owner: u32,
        euid: u32,
        state: PathBuf,
    },
    #[error("{0} is a symlink or not a directory: refusing to use it as the state directory")]
    NotADirectory(PathBuf),
    #[error("{path} is owned by uid {owner}, not by this process (uid {euid}): refusing to use it as the state directory")]
    NotOurs {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error("{path} is writable by other users (mode {mode:04o}): refusing to trust what it holds; remove it or make it 0700")]
    OthersCanWrite { path: PathBuf, mode: u32 },
    #[error("{0} is not on the same file-system as the root (activation must be a rename)")]
    OtherFileSystem(PathBuf),
    #[error("/proc/self/fd does not show {0}: /proc must be mounted")]
    NoProc(PathBuf),
}

/// An open, checked state directory. Clones share the handle.
#[derive(Clone, Debug)]
pub struct StateDir {
    fd: Arc<OwnedFd>,
    shown: PathBuf,
}

fn errno_at(path: &Path) -> impl FnOnce(Errno) -> StateDirError + '_ {
    move |e| StateDirError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

impl StateDir {
    /// Opens `root/.subd`, creating it 0700 if absent, after checking that no one else
    /// can write the root; checks that it is a directory of ours on the root's file-system
    /// that no one else can write, and makes it 0700.
    pub fn open(root: &Path) -> Result<StateDir, StateDirError> {
        let shown = root.join(STATE_DIR_NAME);
        let root_fd = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno_at(root))?;
        let rst = rustix::fs::fstat(&root_fd).map_err(errno_at(root))?;
        let euid = rustix::process::geteuid().as_raw();
        if rst.st_uid != euid && rst.st_uid != 0 {
            return Err(StateDirError::RootNotOurs {
                root: root.to_path_buf(),
                owner: rst.st_uid,
                euid,
                state: shown,
            });
        }
        if others_can_replace_entries(rst.st_mode) {
            return Err(StateDirError::RootWritable {
                root: root.to_path_buf(),
                mode: rst.st_mode & 0o7777,
                state: shown,
            });
        }
        match rustix::fs::mkdirat(&root_fd, STATE_DIR_NAME, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(errno_at(&shown)(e)),
        }
        let fd = rustix::fs::openat(
            &root_fd,
            STATE_DIR_NAME,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::LOOP | Errno::NOTDIR => StateDirError::NotADirectory(shown.clone()),
            e => errno_at(&shown)(e),
        })?;
        let st = rustix::fs::fstat(&fd).map_err(errno_at(&shown))?;
        if st.st_dev != rst.st_dev {
            return Err(StateDirError::OtherFileSystem(shown));
        }
        if st.st_uid != euid {
            return Err(StateDirError::NotOurs {
                path: shown,
                owner: st.st_uid,
                euid,
            });
        }
        if st.st_mode & 0o022 != 0 {
            return Err(StateDirError::OthersCanWrite {
                path: shown,
                mode: st.st_mode & 0o7777,
            });
        }
        if st.st_mode & 0o7777 != 0o700 {
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700)).map_err(errno_at(&shown))?;
        }
        let dir = StateDir {
            fd: Arc::new(fd),
            shown,
        };
        // Paths anchored at the handle need /proc; check it shows this very directory.
        match rustix::fs::stat(dir.anchored()) {
            Ok(a) if a.st_dev == st.st_dev && a.st_ino == st.st_ino => Ok(dir),
            _ => Err(StateDirError::NoProc(dir.shown)),
        }
    }

    /// `ROOT/.subd`, for messages only.
    pub fn shown(&self) -> &Path {
        &self.shown
    }

    /// The directory handle.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A path that resolves through the handle (`/proc/self/fd/N`), for code that takes
    /// paths: whatever `ROOT/.subd` is renamed or replaced with, it names this directory.
    /// Valid while this `StateDir` (or a clone) lives.
    pub fn anchored(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// The object cache, `objects/` (reached through the handle).
    pub fn objects(&self) -> Result<ObjectStore, StoreError> {
        ObjectStore::open(&self.anchored().join("objects"))
    }

    /// `objects` for a process that has opened it already: no sweep of temp files
    /// (`ObjectStore::attach`).
    pub fn attach_objects(&self) -> Result<ObjectStore, StoreError> {
        ObjectStore::attach(&self.anchored().join("objects"))
    }

    /// The contents of file `name`, not following a symlink.
    pub fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let fd = rustix::fs::openat(
            self.fd(),
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut v = Vec::new();
        std::fs::File::from(fd).read_to_end(&mut v)?;
        Ok(v)
    }

    /// Atomically replaces file `name` with `data` (temp + fsync + rename + fsync).
    pub fn write_atomic(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let tmp = format!("{name}.{}{TEMP_SUFFIX}", std::process::id());
        let _ = rustix::fs::unlinkat(self.fd(), tmp.as_str(), AtFlags::empty());
        let fd = rustix::fs::openat(
            self.fd(),
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let written = (|| -> io::Result<()> {
            let mut f = std::fs::File::from(fd);
            f.write_all(data)?;
            f.sync_all()?;
            rustix::fs::renameat(self.fd(), tmp.as_str(), self.fd(), name)?;
            Ok(())
        })();
        if written.is_err() {
            let _ = rustix::fs::unlinkat(self.fd(), tmp.as_str(), AtFlags::empty());
        }
        written?;
        self.sync()
    }

    /// Removes file `name`; returns whether it existed.
    pub fn remove(&self, name: &str) -> io::Result<bool> {
        match rustix::fs::unlinkat(self.fd(), name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// fsyncs the directory, so renames and removals in it are durable.
    pub fn sync(&self) -> io::Result<()> {
        Ok(rustix::fs::fsync(self.fd())?)
    }

    /// Takes the lock file `name` (see `fsutil::lock_dir`).
    pub fn lock(&self, name: &str) -> Result<DirLock, LockError> {
        let path = self.shown.join(name);
        let fd = rustix::fs::openat(
            self.fd(),
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| LockError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        crate::fsutil::lock_file(std::fs::File::from(fd), &self.shown, &path)
    }

    /// A handle on subdirectory `name`, made 0700 if absent; never a symlink.
    pub fn subdir(&self, name: &str) -> io::Result<OwnedFd> {
        match rustix::fs::mkdirat(self.fd(), name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(rustix::fs::openat(
            self.fd(),
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?)
    }
}

use model::plan::writable_by_others as others_can_replace_entries;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn made_0700_and_tightened_and_reached_through_its_handle() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let meta = std::fs::symlink_metadata(d.path().join(".subd")).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o7777, 0o700);
        s.write_atomic("f", b"one").unwrap();
        assert_eq!(s.read("f").unwrap(), b"one");
        // Moved away and replaced: the handle still reaches the directory it opened.
        std::fs::rename(d.path().join(".subd"), d.path().join("moved")).unwrap();
        std::fs::create_dir(d.path().join(".subd")).unwrap();
        s.write_atomic("f", b"two").unwrap();
        assert_eq!(std::fs::read(d.path().join("moved/f")).unwrap(), b"two");
        assert!(!d.path().join(".subd/f").exists());
        assert!(s.objects().unwrap().dir().starts_with("/proc/self/fd"));
        assert!(d.path().join("moved/objects").is_dir());
        drop(s);
        // A 0755 one of ours (as earlier versions made it) is tightened.
        chmod(&d.path().join(".subd"), 0o755);
        StateDir::open(d.path()).unwrap();
        let mode = std::fs::metadata(d.path().join(".subd")).unwrap().mode();
        assert_eq!(mode & 0o7777, 0o700);
    }

    #[test]
    fn a_symlinked_state_dir_is_refused_and_nothing_outside_is_touched() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&outside).unwrap();
        symlink(&outside, root.join(".subd")).unwrap();
        let e = StateDir::open(&root).unwrap_err();
        assert!(matches!(e, StateDirError::NotADirectory(_)), "{e}");
        assert!(e.to_string().contains("symlink"), "{e}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn a_root_or_state_dir_others_can_write_is_refused() {
        let d = tempfile::tempdir().unwrap();
        chmod(d.path(), 0o777);
        let e = StateDir::open(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("writable by other users") && e.contains("0777"),
            "{e}"
        );
        assert!(!d.path().join(".subd").exists(), "nothing made: {e}");
        // The sticky bit keeps others from replacing our entries.
        chmod(d.path(), 0o1777);
        StateDir::open(d.path()).unwrap();
        chmod(d.path(), 0o755);
        chmod(&d.path().join(".subd"), 0o777);
        let e = StateDir::open(d.path()).unwrap_err().to_string();
        assert!(e.contains(".subd is writable by other users"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn state_dir_or_root_owned_by_someone_else_is_refused() {
        if rustix::process::geteuid().as_raw() != 0 {
            eprintln!("SKIPPING: needs root to chown");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join(".subd")).unwrap();
        std::os::unix::fs::chown(d.path().join(".subd"), Some(65534), Some(65534)).unwrap();
        let e = StateDir::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        std::os::unix::fs::chown(d.path(), Some(65534), None).unwrap();
        let e = StateDir::open(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("owned by uid 65534") && e.contains("its owner could replace"),
            "{e}"
        );
    }
}
