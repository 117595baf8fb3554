//! Scanning a directory into a `FileTree`: walks without following symlinks or crossing
//! file-systems, skips sockets, `/.subd` and whatever the exclusion filter matches, and
//! hashes every regular file (each inode once) on a pool of threads.
//!
//! The walk holds a handle on each directory it lists and reaches every name from it; a
//! file is hashed through a handle opened without following symlinks and without blocking
//! (`O_NOFOLLOW | O_NONBLOCK`), checked to be the very regular file that was listed (same
//! device and inode), and read for exactly the size that handle reports. So a name that a
//! local user flips between a file, a FIFO and a symlink (to `/dev/zero`, say) can neither
//! block the scan nor make it read forever: it is a *changed* name, which
//! `ChangedFiles` says how to treat (left out of this pass, or an error).

use crate::known::Known;
use model::filter::Filter;
use model::hash::ObjectId;
use model::hash_lanes::ALONE_BYTES;
use model::image::{FileTree, Inode, Kind, Mtime};
use model::path::FsPath;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Paths never scanned: subd's private directory.
pub use model::path::SUBD_DIR;

/// Called after each chunk of file content is hashed, with the byte count; may sleep to
/// rate-limit the scan.
pub type Throttle = Arc<dyn Fn(u64) + Send + Sync>;

/// What to do with a name that changed kind or inode between being listed and being
/// opened (a file replaced, swapped for a FIFO or a symlink, a directory swapped for a
/// file).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChangedFiles {
    /// Fail the scan with `ScanError::Changed` (building an image: it must be exact).
    #[default]
    Fail,
    /// Leave the name out of this pass; the next pass lists whatever is there then
    /// (subd's background scan: one busy name must not stop the others being reported).
    LeaveOut,
}

/// How to scan.
#[derive(Clone, Default)]
pub struct ScanOptions {
    /// Paths (and their subtrees) to leave out.
    pub exclude: Option<Filter>,
    /// Hashing threads; 0 = one per CPU.
    pub threads: usize,
    pub throttle: Option<Throttle>,
    /// Set to abandon the scan early (it then returns `ScanError::Cancelled`).
    pub cancel: Option<Arc<AtomicBool>>,
    /// What a name that changes during the scan does.
    pub changed: ChangedFiles,
    /// Files whose hash an update vouches for: one found exactly as recorded (device,
    /// inode, size, mtime, ctime) is not read (see `crate::known`).
    pub known: Option<Arc<Known>>,
}

/// A scan that could not finish.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}: not a directory")]
    NotDir(PathBuf),
    #[error("{0}: changed while being scanned (replaced, or no longer a regular file or directory); scan again")]
    Changed(PathBuf),
    #[error("scan cancelled")]
    Cancelled,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ScanError + '_ {
    move |source| ScanError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The inode for a `stat` result (content hash left empty).
pub fn inode_from_meta(meta: &std::fs::Metadata, link_target: Option<Vec<u8>>) -> Option<Inode> {
    inode_from_parts(
        meta.mode(),
        meta.uid(),
        meta.gid(),
        Mtime {
            sec: meta.mtime(),
            nsec: meta.mtime_nsec() as u32,
        },
        meta.size(),
        meta.rdev(),
        link_target,
    )
}

/// The inode for an `fstat`/`fstatat` result (content hash left empty).
pub fn inode_from_stat(st: &Stat, link_target: Option<Vec<u8>>) -> Option<Inode> {
    inode_from_parts(
        st.st_mode,
        st.st_uid,
        st.st_gid,
        Mtime {
            sec: st.st_mtime,
            nsec: st.st_mtime_nsec as u32,
        },
        st.st_size as u64,
        st.st_rdev,
        link_target,
    )
}

fn inode_from_parts(
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Mtime,
    size: u64,
    rdev: u64,
    link_target: Option<Vec<u8>>,
) -> Option<Inode> {
    let kind = Kind::from_mode(mode)?;
    let mut ino = Inode::new(kind, mode, uid, gid);
    match kind {
        Kind::Dir => {}
        Kind::File => {
            ino.mtime = mtime;
            ino.size = size;
        }
        Kind::Symlink => ino.target = link_target,
        Kind::Char | Kind::Block => {
            ino.mtime = mtime;
            ino.rdev = rdev;
        }
        Kind::Fifo => ino.mtime = mtime,
    }
    Some(ino.normalized())
}

/// A finished scan.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scan {
    pub tree: FileTree,
    /// Directories holding entries the scan left out (names the exclusions match, mount
    /// points; not `/.subd`): a full image must keep them, deleting only what they hold
    /// that is managed.
    pub hidden_parents: BTreeSet<FsPath>,
    /// Regular files whose hash came from `ScanOptions::known` rather than being read.
    pub known_files: usize,
}

/// Scans `root` into a tree whose inode numbers are the host's.
pub fn scan(root: &Path, opts: &ScanOptions) -> Result<FileTree, ScanError> {
    scan_full(root, opts).map(|s| s.tree)
}

/// `scan`, also reporting the directories that hold entries it left out.
pub fn scan_full(root: &Path, opts: &ScanOptions) -> Result<Scan, ScanError> {
    let meta = std::fs::symlink_metadata(root).map_err(io_err(root))?;
    if !meta.is_dir() {
        return Err(ScanError::NotDir(root.to_path_buf()));
    }
    let root_fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err(root)(e.into()))?;
    let st = rustix::fs::fstat(&root_fd).map_err(|e| io_err(root)(e.into()))?;
    let mut tree = FileTree::default();
    let root_ino = inode_from_stat(&st, None).ok_or_else(|| ScanError::NotDir(root.into()))?;
    if root_ino.kind != Kind::Dir {
        return Err(ScanError::NotDir(root.to_path_buf()));
    }
    tree.inodes.insert(st.st_ino as u64, root_ino);
    tree.entries.insert(FsPath::root(), st.st_ino as u64);
    let mut to_hash: Vec<Listed> = Vec::new();
    let mut hidden_parents = BTreeSet::new();
    let mut found = Found {
        tree: &mut tree,
        known_files: 0,
        to_hash: &mut to_hash,
        hidden_parents: &mut hidden_parents,
    };
    let w = Walk {
        root,
        dev: st.st_dev as u64,
        opts,
    };
    let t_walk = std::time::Instant::now();
    walk(root_fd.as_fd(), &FsPath::root(), &w, &mut found)?;
    let known_files = found.known_files;
    let t_hash = std::time::Instant::now();
    let hashes = hash_files(root, root_fd.as_fd(), &to_hash, opts)?;
    tracing::debug!(
        "scan: walk {:.1} ms, {} files hashed in {:.1} ms, {} known",
        (t_hash - t_walk).as_secs_f64() * 1000.0,
        to_hash.len(),
        t_hash.elapsed().as_secs_f64() * 1000.0,
        known_files
    );
    for (ino, outcome) in hashes {
        match outcome {
            Hashed::Same { id, size, current } => {
                if let Some(i) = tree.inodes.get_mut(&ino) {
                    *i = *current;
                    i.size = size;
                    i.hash = if size == 0 { None } else { Some(id) };
                }
            }
            Hashed::Changed => {
                tree.inodes.remove(&ino);
                tree.entries.retain(|_, i| *i != ino);
            }
        }
    }
    Ok(Scan {
        tree,
        hidden_parents,
        known_files,
    })
}

/// A regular file listed by the walk, to be hashed.
struct Listed {
    path: FsPath,
    dev: u64,
    ino: u64,
    /// Its size when listed (to hand the longest out first).
    size: u64,
}

/// What a walk collects.
struct Found<'a> {
    tree: &'a mut FileTree,
    known_files: usize,
    to_hash: &'a mut Vec<Listed>,
    hidden_parents: &'a mut BTreeSet<FsPath>,
}

/// What every level of a walk shares.
struct Walk<'a> {
    root: &'a Path,
    dev: u64,
    opts: &'a ScanOptions,
}

impl Walk<'_> {
    fn shown(&self, path: &FsPath) -> PathBuf {
        self.root.join(path.relative_os())
    }
    fn err(&self, path: &FsPath, e: Errno) -> ScanError {
        ScanError::Io {
            path: self.shown(path),
            source: e.into(),
        }
    }
}

fn cancelled(opts: &ScanOptions) -> bool {
    opts.cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::Relaxed))
}

/// Flags for opening a directory to list it: never follows a symlink, never blocks.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::CLOEXEC);

/// Is `e` what opening a name that changed kind (or vanished) since it was listed gives?
fn is_change(e: Errno) -> bool {
    matches!(
        e,
        Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::NXIO | Errno::XDEV | Errno::AGAIN
    )
}

/// Lists `dir` (sorted), records each entry and descends into each subdirectory.
fn walk(
    dir: BorrowedFd<'_>,
    dir_path: &FsPath,
    w: &Walk<'_>,
    found: &mut Found<'_>,
) -> Result<(), ScanError> {
    if cancelled(w.opts) {
        return Err(ScanError::Cancelled);
    }
    let mut names: Vec<Vec<u8>> = Vec::new();
    let entries = rustix::fs::Dir::read_from(dir).map_err(|e| w.err(dir_path, e))?;
    for e in entries {
        let e = e.map_err(|e| w.err(dir_path, e))?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    names.sort();
    for name in names {
        if let Some((path, sub)) = visit(dir, dir_path, &name, w, found)? {
            walk(sub.as_fd(), &path, w, found)?;
        }
    }
    Ok(())
}

/// Records the entry `name` of `dir`; returns it, opened, if it is a directory to descend
/// into. Left out: `/.subd`, exclusions and mount points (their parent noted as hiding
/// entries), sockets, and names that changed since they were listed (`changed`).
fn visit(
    dir: BorrowedFd<'_>,
    dir_path: &FsPath,
    name: &[u8],
    w: &Walk<'_>,
    found: &mut Found<'_>,
) -> Result<Option<(FsPath, OwnedFd)>, ScanError> {
    let Ok(path) = dir_path.join(name) else {
        return Ok(None);
    };
    if path.as_bytes() == SUBD_DIR.as_bytes() {
        return Ok(None);
    }
    if w.opts.exclude.as_ref().is_some_and(|f| f.matches(&path)) {
        found.hidden_parents.insert(dir_path.clone());
        return Ok(None);
    }
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(w.err(&path, e)),
    };
    if st.st_dev as u64 != w.dev {
        // a mount point: another file-system is never scanned
        found.hidden_parents.insert(dir_path.clone());
        return Ok(None);
    }
    let target = if Kind::from_mode(st.st_mode as u32) == Some(Kind::Symlink) {
        match rustix::fs::readlinkat(dir, name, Vec::new()) {
            Ok(t) => Some(t.into_bytes()),
            Err(e) if is_change(e) || e == Errno::INVAL => return changed(w, path).map(|()| None),
            Err(e) => return Err(w.err(&path, e)),
        }
    } else {
        None
    };
    let Some(inode) = inode_from_stat(&st, target) else {
        return Ok(None); // sockets
    };
    // A directory is opened before it is recorded: if it is no longer the directory
    // listed, the name is changed, not a directory to descend into.
    let sub = if inode.kind == Kind::Dir {
        match rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => match rustix::fs::fstat(&fd) {
                Ok(s) if s.st_ino == st.st_ino && s.st_dev == st.st_dev => Some(fd),
                Ok(_) => return changed(w, path).map(|()| None),
                Err(e) => return Err(w.err(&path, e)),
            },
            Err(e) if is_change(e) => return changed(w, path).map(|()| None),
            Err(e) => return Err(w.err(&path, e)),
        }
    } else {
        None
    };
    record(&st, inode, &path, w, found);
    Ok(sub.map(|fd| (path, fd)))
}

/// Adds `path` and (if new) its inode to the tree; a regular file with content is queued
/// for hashing unless the last update's record already knows its hash.
fn record(st: &rustix::fs::Stat, inode: Inode, path: &FsPath, w: &Walk<'_>, found: &mut Found<'_>) {
    #[allow(clippy::unnecessary_cast)] // `ino_t` and `dev_t` are not 64-bit on every target
    let (ino, dev) = (st.st_ino as u64, st.st_dev as u64);
    let kind = inode.kind;
    if let std::collections::btree_map::Entry::Vacant(slot) = found.tree.inodes.entry(ino) {
        let mut inode = inode;
        let known = w.opts.known.as_ref().and_then(|k| k.hash_of(st));
        if kind == Kind::File && inode.size > 0 && known.is_some() {
            inode.hash = known;
            found.known_files += 1;
        } else if kind == Kind::File && inode.size > 0 {
            found.to_hash.push(Listed {
                path: path.clone(),
                dev,
                ino,
                size: inode.size,
            });
        }
        slot.insert(inode);
    }
    found.tree.entries.insert(path.clone(), ino);
}

/// A name changed between being listed and being opened: an error, or left out.
fn changed(w: &Walk<'_>, path: FsPath) -> Result<(), ScanError> {
    match w.opts.changed {
        ChangedFiles::Fail => Err(ScanError::Changed(w.shown(&path))),
        ChangedFiles::LeaveOut => {
            tracing::debug!(
                "{}: changed while listed; left out of this pass",
                path.display()
            );
            Ok(())
        }
    }
}

/// What hashing a listed file found.
#[derive(Debug)]
enum Hashed {
    /// Still the listed regular file: its current metadata and the hash of exactly the
    /// `size` bytes read (its size when opened, or fewer if it shrank while read).
    Same {
        id: ObjectId,
        size: u64,
        current: Box<Inode>,
    },
    /// Gone, or another inode or kind now has the name.
    Changed,
}

/// Hashes `files` on `opts.threads` threads (0: one per CPU), each taking the next file
/// from a shared counter into one of its eight SHA-512 lanes (`model::hash_lanes`).
fn hash_files(
    root: &Path,
    root_fd: BorrowedFd<'_>,
    files: &[Listed],
    opts: &ScanOptions,
) -> Result<HashMap<u64, Hashed>, ScanError> {
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    // The files hashed alone first, longest first (the longest is the scan's critical
    // path), then the rest in walk order.
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_by_key(|&i| {
        let size = files[i].size;
        (
            size < ALONE_BYTES,
            if size < ALONE_BYTES {
                0
            } else {
                u64::MAX - size
            },
        )
    });
    let share = Share {
        root,
        root_fd,
        files,
        order,
        opts,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    };
    let threads = threads.clamp(1, files.len().max(1));
    let parts: Vec<Result<Vec<(u64, Hashed)>, ScanError>> = std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads).map(|_| s.spawn(|| share.hash())).collect();
        let mine = share.hash();
        std::iter::once(mine)
            .chain(
                helpers
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
            )
            .collect()
    });
    let mut out = HashMap::with_capacity(files.len());
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

/// The files of one scan, shared by its hashing threads: each takes the next index from
/// `next`; the first error sets `stop`, and every thread then stops taking files.
struct Share<'a> {
    root: &'a Path,
    root_fd: BorrowedFd<'a>,
    files: &'a [Listed],
    /// The order in which files are handed out (indices into `files`).
    order: Vec<usize>,
    opts: &'a ScanOptions,
    next: AtomicUsize,
    stop: AtomicBool,
}

impl Share<'_> {
    /// This thread's part: files taken until none are left (or the scan stops), each
    /// opened and checked, then hashed in the lanes.
    fn hash(&self) -> Result<Vec<(u64, Hashed)>, ScanError> {
        let out = RefCell::new(Vec::new());
        let failed: RefCell<Option<ScanError>> = RefCell::new(None);
        let opened: RefCell<HashMap<usize, Box<Inode>>> = RefCell::new(HashMap::new());
        let fail = |e: ScanError| {
            failed.borrow_mut().get_or_insert(e);
            self.stop.store(true, Ordering::Relaxed);
        };
        let next = || loop {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            if cancelled(self.opts) {
                fail(ScanError::Cancelled);
                return None;
            }
            let i = *self.order.get(self.next.fetch_add(1, Ordering::Relaxed))?;
            let l = &self.files[i];
            match open_listed_file(self.root_fd, l) {
                Ok(Some((f, current))) => {
                    let len = f.limit();
                    opened.borrow_mut().insert(i, current);
                    return Some((i, Throttled(f, self.opts), len));
                }
                Ok(None) if self.opts.changed == ChangedFiles::Fail => {
                    fail(ScanError::Changed(self.shown(l)));
                    return None;
                }
                Ok(None) => {
                    tracing::debug!(
                        "{}: changed before it was hashed; left out of this pass",
                        l.path.display()
                    );
                    out.borrow_mut().push((l.ino, Hashed::Changed));
                }
                Err(e) => {
                    fail(io_err(&self.shown(l))(e));
                    return None;
                }
            }
        };
        let done = |i: usize, r: io::Result<(ObjectId, u64)>| {
            let l = &self.files[i];
            let current = opened.borrow_mut().remove(&i);
            match (r, current) {
                (Ok((id, size)), Some(current)) => out
                    .borrow_mut()
                    .push((l.ino, Hashed::Same { id, size, current })),
                (Ok(_), None) => {}
                (Err(_), _) if cancelled(self.opts) => fail(ScanError::Cancelled),
                (Err(e), _) => fail(io_err(&self.shown(l))(e)),
            }
        };
        model::hash_lanes::hash_many(next, done);
        match failed.into_inner() {
            Some(e) => Err(e),
            None => Ok(out.into_inner()),
        }
    }

    fn shown(&self, l: &Listed) -> PathBuf {
        self.root.join(l.path.relative_os())
    }
}

/// A file read for hashing, telling the scan's throttle of every chunk and ending with an
/// error once the scan is cancelled (a throttled pass must stop within a chunk, not after
/// the files in every lane).
struct Throttled<'a>(io::Take<File>, &'a ScanOptions);

impl Read for Throttled<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if cancelled(self.1) {
            return Err(io::Error::other("scan cancelled"));
        }
        let n = self.0.read(buf)?;
        if let Some(t) = &self.1.throttle {
            t(n as u64);
        }
        Ok(n)
    }
}

/// Opens listed file `l` under the root without following any symlink or crossing a
/// mount point (`openat2` where the kernel has it; else only the last component is
/// checked, and the inode check below catches the rest), never blocking.
fn open_listed(root_fd: BorrowedFd<'_>, l: &Listed) -> Result<OwnedFd, Errno> {
    open_beneath(root_fd, &l.path)
}

/// Opens `path` (absolute in the tree) read-only beneath `root_fd` without following any
/// symlink or crossing a mount point, never blocking (as the scan opens files).
pub fn open_beneath(root_fd: BorrowedFd<'_>, path: &FsPath) -> Result<OwnedFd, Errno> {
    let rel = path.relative_os();
    let base =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let open = |flags: OFlags| match rustix::fs::openat2(
        root_fd,
        rel,
        flags,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV,
    ) {
        Err(Errno::NOSYS) => rustix::fs::openat(root_fd, rel, flags, Mode::empty()),
        r => r,
    };
    // O_NOATIME needs ownership of the file (or CAP_FOWNER); without it, open plainly.
    match open(base | OFlags::NOATIME) {
        Err(Errno::PERM) => open(base),
        r => r,
    }
}

/// Opens listed file `l` for hashing if it is still that regular file: its handle, limited
/// to the size the handle reports (a file that grows while read cannot make the scan read
/// forever), and its current metadata; `None` if the name changed.
fn open_listed_file(
    root_fd: BorrowedFd<'_>,
    l: &Listed,
) -> io::Result<Option<(io::Take<File>, Box<Inode>)>> {
    let fd = match open_listed(root_fd, l) {
        Ok(fd) => fd,
        Err(e) if is_change(e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let st = rustix::fs::fstat(&fd)?;
    match inode_from_stat(&st, None) {
        Some(i)
            if i.kind == Kind::File && st.st_ino as u64 == l.ino && st.st_dev as u64 == l.dev =>
        {
            Ok(Some((File::from(fd).take(st.st_size as u64), Box::new(i))))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::path::PathBuf;

    /// The hash the scan reports for `path` (absolute in the tree).
    fn hash_at(s: &Scan, path: &str) -> Option<ObjectId> {
        let ino = s.tree.entries[&path.parse::<FsPath>().unwrap()];
        s.tree.inodes[&ino].hash
    }

    #[test]
    fn a_file_found_as_recorded_is_not_read_and_any_change_to_it_is() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        std::fs::write(&a, b"one").unwrap();
        std::fs::write(d.path().join("b"), b"two").unwrap();
        // A hash the content does not have: seeing it reported proves the file was not read.
        let vouched = ObjectId::of(b"what the update wrote");
        let mut known = Known::default();
        known.insert(&rustix::fs::stat(&a).unwrap(), vouched);
        let opts = ScanOptions {
            known: Some(Arc::new(known)),
            ..Default::default()
        };
        let s = scan_full(d.path(), &opts).unwrap();
        assert_eq!(hash_at(&s, "/a"), Some(vouched));
        assert_eq!(hash_at(&s, "/b"), Some(ObjectId::of(b"two")));
        assert_eq!(s.known_files, 1);
        // A later tick: a chmod moves the ctime, so the record no longer fits and the
        // content is read.
        std::thread::sleep(std::time::Duration::from_millis(30));
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = scan_full(d.path(), &opts).unwrap();
        assert_eq!(hash_at(&s, "/a"), Some(ObjectId::of(b"one")));
        assert_eq!(s.known_files, 0);
    }

    #[test]
    fn scans_kinds_hardlinks_and_filters() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("etc/ssh")).unwrap();
        std::fs::write(r.join("etc/passwd"), b"root:x:0:0\n").unwrap();
        std::fs::write(r.join("etc/empty"), b"").unwrap();
        std::fs::hard_link(r.join("etc/passwd"), r.join("etc/passwd-link")).unwrap();
        symlink("/nowhere", r.join("dangling")).unwrap();
        std::fs::set_permissions(
            r.join("etc/passwd"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        std::fs::create_dir_all(r.join(".subd/objects")).unwrap();
        std::fs::create_dir_all(r.join("tmp/junk")).unwrap();
        let opts = ScanOptions {
            exclude: Some(Filter::parse("/tmp/.*\n", "x").unwrap()),
            threads: 2,
            ..Default::default()
        };
        let t = scan(r, &opts).unwrap();
        t.validate().unwrap();
        let get = |p: &str| t.get(&p.parse().unwrap()).cloned();
        let pw = get("/etc/passwd").unwrap();
        assert_eq!(pw.hash, Some(ObjectId::of(b"root:x:0:0\n")));
        assert_eq!(pw.mode, 0o4755);
        assert_eq!(
            t.entries[&"/etc/passwd".parse().unwrap()],
            t.entries[&"/etc/passwd-link".parse().unwrap()]
        );
        assert_eq!(get("/etc/empty").unwrap().hash, None);
        assert_eq!(get("/dangling").unwrap().target.unwrap(), b"/nowhere");
        assert!(get("/.subd").is_none());
        assert!(get("/tmp").is_some());
        assert!(get("/tmp/junk").is_none());
        let full = scan_full(r, &opts).unwrap();
        assert_eq!(full.tree, t);
        assert_eq!(
            full.hidden_parents.into_iter().collect::<Vec<_>>(),
            ["/tmp".parse::<FsPath>().unwrap()],
            "/tmp holds the excluded /tmp/junk; / holds only /.subd, which does not count"
        );
    }

    /// Scans `root` on another thread; panics if it has not finished within ten seconds
    /// (a scan must never block on a FIFO or read a device forever).
    fn scan_within_10s(root: &Path, opts: ScanOptions) -> Result<Scan, ScanError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let root = root.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(scan_full(&root, &opts));
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the scan finished within 10 s")
    }

    /// Options hashing on one thread, running `swap` once, after the first chunk of `a` is
    /// read (so after `b` was listed, before it is opened: see `two_files`).
    fn swapping(changed: ChangedFiles, swap: impl Fn() + Send + Sync + 'static) -> ScanOptions {
        let done = AtomicBool::new(false);
        ScanOptions {
            threads: 1,
            changed,
            throttle: Some(Arc::new(move |_| {
                if !done.swap(true, Ordering::SeqCst) {
                    swap();
                }
            })),
            ..Default::default()
        }
    }

    /// `a` and `b`, with enough files listed between them (`a1`, `a2`, …) to fill every
    /// hashing lane, so that `b` is opened only once a lane frees, after `a`'s first chunk.
    fn two_files() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().to_path_buf();
        std::fs::write(r.join("a"), vec![7u8; 1 << 20]).unwrap();
        for i in 1..model::hash_lanes::LANES {
            std::fs::write(r.join(format!("a{i}")), vec![i as u8; 4096]).unwrap();
        }
        std::fs::write(r.join("b"), b"listed content").unwrap();
        (d, r)
    }

    fn mkfifo(p: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o666),
            0,
        )
        .unwrap();
    }

    fn assert_b_left_out(s: &Scan) {
        let a = s.tree.get(&"/a".parse().unwrap()).expect("/a is reported");
        assert_eq!(a.hash, Some(ObjectId::of(&vec![7u8; 1 << 20])));
        assert!(
            s.tree.get(&"/b".parse().unwrap()).is_none(),
            "the swapped name is left out of this pass"
        );
        s.tree.validate().unwrap();
    }

    #[test]
    fn a_fifo_swapped_in_after_listing_neither_blocks_nor_aborts_the_pass() {
        let (_d, r) = two_files();
        let b = r.join("b");
        let s = scan_within_10s(
            &r,
            swapping(ChangedFiles::LeaveOut, move || {
                std::fs::remove_file(&b).unwrap();
                mkfifo(&b);
            }),
        )
        .unwrap();
        assert_b_left_out(&s);
        // The next pass lists the FIFO for what it is.
        let s = scan_within_10s(&r, ScanOptions::default()).unwrap();
        assert_eq!(s.tree.get(&"/b".parse().unwrap()).unwrap().kind, Kind::Fifo);
    }

    #[test]
    fn a_symlink_to_dev_zero_swapped_in_is_not_followed() {
        let (_d, r) = two_files();
        let b = r.join("b");
        let s = scan_within_10s(
            &r,
            swapping(ChangedFiles::LeaveOut, move || {
                std::fs::remove_file(&b).unwrap();
                symlink("/dev/zero", &b).unwrap();
            }),
        )
        .unwrap();
        assert_b_left_out(&s);
    }

    #[test]
    fn a_file_replaced_between_listing_and_hashing_is_changed_not_misreported() {
        let (_d, r) = two_files();
        let b = r.join("b");
        let swap = move || {
            std::fs::write(b.with_extension("new"), b"other content, other inode").unwrap();
            std::fs::rename(b.with_extension("new"), &b).unwrap();
        };
        let s = scan_within_10s(&r, swapping(ChangedFiles::LeaveOut, swap)).unwrap();
        assert_b_left_out(&s);
        // Building an image, the same race is an error naming the file.
        let (_d, r) = two_files();
        let b = r.join("b");
        let e = scan_within_10s(
            &r,
            swapping(ChangedFiles::Fail, move || {
                std::fs::write(b.with_extension("new"), b"x").unwrap();
                std::fs::rename(b.with_extension("new"), &b).unwrap();
            }),
        )
        .unwrap_err();
        assert!(
            matches!(&e, ScanError::Changed(p) if p.ends_with("b")),
            "{e}"
        );
        assert!(e.to_string().contains("changed while being scanned"), "{e}");
    }

    #[test]
    fn a_file_growing_forever_is_hashed_for_the_size_it_had_when_opened() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        std::fs::write(&a, vec![1u8; 1 << 20]).unwrap();
        let grow = {
            let a = a.clone();
            Arc::new(move |_| {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new().append(true).open(&a).unwrap();
                f.write_all(&[2u8; 256 * 1024]).unwrap();
            }) as Throttle
        };
        let opts = ScanOptions {
            threads: 1,
            throttle: Some(grow),
            ..Default::default()
        };
        let s = scan_within_10s(d.path(), opts).unwrap();
        let i = s.tree.get(&"/a".parse().unwrap()).unwrap();
        assert_eq!(i.size, 1 << 20);
        assert_eq!(i.hash, Some(ObjectId::of(&vec![1u8; 1 << 20])));
    }

    #[test]
    fn scans_racing_names_that_flip_kinds_always_finish_whole() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().to_path_buf();
        std::fs::create_dir(r.join("crash")).unwrap();
        std::fs::write(r.join("keep"), b"kept").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        // A file, a FIFO, a symlink to /dev/zero, a directory, in turn, as fast as it goes.
        let flipper = {
            let (stop, f) = (stop.clone(), r.join("crash/x"));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = std::fs::remove_file(&f);
                    let _ = std::fs::remove_dir_all(&f);
                    std::fs::write(&f, vec![3u8; 64 << 10]).unwrap();
                    std::fs::remove_file(&f).unwrap();
                    mkfifo(&f);
                    std::fs::remove_file(&f).unwrap();
                    symlink("/dev/zero", &f).unwrap();
                    std::fs::remove_file(&f).unwrap();
                    std::fs::create_dir(&f).unwrap();
                    std::fs::write(f.join("in"), b"in").unwrap();
                }
            })
        };
        for n in 0..200 {
            let changed = if n % 2 == 0 {
                ChangedFiles::LeaveOut
            } else {
                ChangedFiles::Fail
            };
            let opts = ScanOptions {
                threads: 2,
                changed,
                ..Default::default()
            };
            match scan_within_10s(&r, opts) {
                Ok(s) => {
                    s.tree.validate().unwrap();
                    let keep = s.tree.get(&"/keep".parse().unwrap()).unwrap();
                    assert_eq!(keep.hash, Some(ObjectId::of(b"kept")));
                }
                Err(ScanError::Changed(p)) if changed == ChangedFiles::Fail => {
                    assert!(p.starts_with(r.join("crash/x")), "{}", p.display())
                }
                Err(e) => panic!("pass {n} ({changed:?}): {e}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
    }
}
