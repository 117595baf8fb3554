//! Scanning a directory into a `FileTree`: walks without following symlinks or crossing
//! file-systems, skips sockets, `/.subd` and whatever the exclusion filter matches, and
//! hashes every regular file (each inode once) on a pool of threads.

use crate::filter::Filter;
use crate::hash::{ObjectHasher, ObjectId};
use crate::image::{FileTree, Inode, Kind, Mtime};
use crate::path::FsPath;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Paths never scanned: subd's private directory.
pub const SUBD_DIR: &str = "/.subd";

/// Called after each chunk of file content is hashed, with the byte count; may sleep to
/// rate-limit the scan.
pub type Throttle = Arc<dyn Fn(u64) + Send + Sync>;

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
}

/// A scan that could not finish.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}: not a directory")]
    NotDir(PathBuf),
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
    let kind = Kind::from_mode(meta.mode())?;
    let mut ino = Inode::new(kind, meta.mode(), meta.uid(), meta.gid());
    let mtime = Mtime {
        sec: meta.mtime(),
        nsec: meta.mtime_nsec() as u32,
    };
    match kind {
        Kind::Dir => {}
        Kind::File => {
            ino.mtime = mtime;
            ino.size = meta.size();
        }
        Kind::Symlink => ino.target = link_target,
        Kind::Char | Kind::Block => {
            ino.mtime = mtime;
            ino.rdev = meta.rdev();
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
    let mut tree = FileTree::default();
    let root_ino = inode_from_meta(&meta, None).expect("a directory");
    tree.inodes.insert(meta.ino(), root_ino);
    tree.entries.insert(FsPath::root(), meta.ino());
    let mut to_hash: Vec<(u64, PathBuf)> = Vec::new();
    let mut hidden_parents = BTreeSet::new();
    walk(
        root,
        &FsPath::root(),
        meta.dev(),
        opts,
        &mut Found {
            tree: &mut tree,
            to_hash: &mut to_hash,
            hidden_parents: &mut hidden_parents,
        },
    )?;
    let hashes = hash_files(&to_hash, opts)?;
    for (ino, (id, size)) in hashes {
        if let Some(i) = tree.inodes.get_mut(&ino) {
            i.size = size;
            i.hash = if size == 0 { None } else { Some(id) };
        }
    }
    Ok(Scan {
        tree,
        hidden_parents,
    })
}

/// What a walk collects.
struct Found<'a> {
    tree: &'a mut FileTree,
    to_hash: &'a mut Vec<(u64, PathBuf)>,
    hidden_parents: &'a mut BTreeSet<FsPath>,
}

fn cancelled(opts: &ScanOptions) -> bool {
    opts.cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::Relaxed))
}

fn walk(
    dir: &Path,
    dir_path: &FsPath,
    dev: u64,
    opts: &ScanOptions,
    found: &mut Found,
) -> Result<(), ScanError> {
    if cancelled(opts) {
        return Err(ScanError::Cancelled);
    }
    let mut names: Vec<std::ffi::OsString> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err(dir))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !dir_path.is_root() => return Ok(()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let Ok(path) = dir_path.join(name.as_bytes()) else {
            continue;
        };
        if path.as_bytes() == SUBD_DIR.as_bytes() {
            continue;
        }
        if opts.exclude.as_ref().is_some_and(|f| f.matches(&path)) {
            found.hidden_parents.insert(dir_path.clone());
            continue;
        }
        let full = dir.join(&name);
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&full)(e)),
        };
        if meta.dev() != dev {
            // a mount point: another file-system is never scanned
            found.hidden_parents.insert(dir_path.clone());
            continue;
        }
        let target = if meta.file_type().is_symlink() {
            match std::fs::read_link(&full) {
                Ok(t) => Some(t.into_os_string().into_vec()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&full)(e)),
            }
        } else {
            None
        };
        let Some(inode) = inode_from_meta(&meta, target) else {
            continue;
        }; // sockets
        let ino = meta.ino();
        let kind = inode.kind;
        if let std::collections::btree_map::Entry::Vacant(slot) = found.tree.inodes.entry(ino) {
            if kind == Kind::File && inode.size > 0 {
                found.to_hash.push((ino, full.clone()));
            }
            slot.insert(inode);
        }
        found.tree.entries.insert(path.clone(), ino);
        if kind == Kind::Dir {
            walk(&full, &path, dev, opts, found)?;
        }
    }
    Ok(())
}

use std::os::unix::ffi::OsStringExt;

fn hash_files(
    files: &[(u64, PathBuf)],
    opts: &ScanOptions,
) -> Result<HashMap<u64, (ObjectId, u64)>, ScanError> {
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    type Hashed = Option<(u64, (ObjectId, u64))>;
    let one = |(ino, path): &(u64, PathBuf)| -> Result<Hashed, ScanError> {
        if cancelled(opts) {
            return Err(ScanError::Cancelled);
        }
        match hash_file(path, opts.throttle.as_ref()) {
            Ok(r) => Ok(Some((*ino, r))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    };
    if threads <= 1 {
        let mut out = HashMap::with_capacity(files.len());
        for f in files {
            if let Some((k, v)) = one(f)? {
                out.insert(k, v);
            }
        }
        return Ok(out);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| ScanError::Io {
            path: PathBuf::new(),
            source: io::Error::other(e),
        })?;
    use rayon::prelude::*;
    let results: Vec<_> =
        pool.install(|| files.par_iter().map(one).collect::<Result<Vec<_>, _>>())?;
    Ok(results.into_iter().flatten().collect())
}

/// Hashes one file, returning the id and length of the bytes actually read (so a file that
/// changes while being read still yields a consistent pair).
pub fn hash_file(path: &Path, throttle: Option<&Throttle>) -> io::Result<(ObjectId, u64)> {
    thread_local! {
        /// One read buffer per hashing thread, rather than one zeroed per file.
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 256 * 1024]);
    }
    BUF.with(|b| match b.try_borrow_mut() {
        Ok(mut buf) => hash_file_with(path, throttle, &mut buf),
        Err(_) => hash_file_with(path, throttle, &mut vec![0u8; 256 * 1024]),
    })
}

fn hash_file_with(
    path: &Path,
    throttle: Option<&Throttle>,
    buf: &mut [u8],
) -> io::Result<(ObjectId, u64)> {
    let mut f = File::open(path)?;
    let mut h = ObjectHasher::new();
    loop {
        let n = match f.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        if let Some(t) = throttle {
            t(n as u64);
        }
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

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
}
