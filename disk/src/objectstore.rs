//! The content-addressed object store (imageserver objects, subd's object cache): each
//! object lives at `<dir>/<hh>/<remaining 126 hex>` under the SHA-512 of its bytes (stores
//! made by earlier versions, `<dir>/<hh>/<hh>/<124 hex>`, are recognised and kept as they
//! are). One level of fan-out: a second level made a directory for nearly every object of
//! a fresh machine's fetch, doubling the inodes a birth allocates.
//!
//! Writes stream into a temp file while hashing, are checked against the expected id, and
//! are made durable in batches: `sync` (syncfs) of all temp files, renames, `sync` again.
//! So a crash at any moment leaves only whole, correct objects under their names, plus
//! temp files that `open` removes. Nothing here overwrites or edits an object's bytes. (In
//! subd's cache, `disk::apply` takes an object's last use out of the store: it gives the
//! object its final owner, mode and mtime where it is, links it into place and removes its
//! name here.)

use crate::fsutil::{DeleteOnDrop, TEMP_SUFFIX};
use model::hash::{ObjectHasher, ObjectId};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Why an object was refused.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("hash mismatch: expected {expected}, computed {computed}")]
    HashMismatch {
        expected: Box<ObjectId>,
        computed: Box<ObjectId>,
    },
    #[error("object {id}: truncated: expected {expected} bytes, got {got}")]
    Truncated {
        id: Box<ObjectId>,
        expected: u64,
        got: u64,
    },
    #[error("object store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl StoreError {
    /// True for errors caused by the data sent, not by the store.
    pub fn is_bad_data(&self) -> bool {
        !matches!(self, StoreError::Io { .. })
    }
    /// True when the disk is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How objects are laid out under the store's directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `<hh>/<126 hex>`: every store made by this version.
    OneLevel,
    /// `<hh>/<hh>/<124 hex>`: stores made by earlier versions.
    TwoLevel,
}

impl Layout {
    /// What an existing store holds: a two-character directory inside a first-level
    /// directory means the old layout; anything else (an empty store included) the new one.
    fn detect(dir: &Path) -> Result<Layout, StoreError> {
        for l1 in read_dir_names(dir)? {
            if l1.len() != 2 {
                continue;
            }
            let d1 = dir.join(&l1);
            for name in read_dir_names(&d1)? {
                if name.ends_with(TEMP_SUFFIX) {
                    continue;
                }
                return Ok(if name.len() == 2 && d1.join(&name).is_dir() {
                    Layout::TwoLevel
                } else {
                    Layout::OneLevel
                });
            }
        }
        Ok(Layout::OneLevel)
    }
}

/// A directory of objects.
#[derive(Clone, Debug)]
pub struct ObjectStore {
    dir: PathBuf,
    layout: Layout,
    /// First-level directories known to exist (one-level layout), so writing an object
    /// costs no `mkdir` attempt once its directory is made.
    made: Arc<[AtomicBool; 256]>,
    /// A handle on `dir`, for reaching objects by `name_of` without walking `dir` again.
    fd: Arc<std::os::fd::OwnedFd>,
}

impl ObjectStore {
    /// Opens (creating if needed) a store and removes temp files left by a crash.
    pub fn open(dir: &Path) -> Result<ObjectStore, StoreError> {
        let store = ObjectStore::attach(dir)?;
        store.walk(false, |path, name, _| {
            if name.ends_with(TEMP_SUFFIX) {
                let _ = std::fs::remove_file(path);
            }
        })?;
        Ok(store)
    }

    /// Opens (creating if needed) a store this process has already opened, without
    /// removing temp files: they are objects being fetched, or verified objects held for an
    /// update (`HeldObjects`).
    pub fn attach(dir: &Path) -> Result<ObjectStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
        let fd = rustix::fs::open(
            dir,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| io_at(dir)(e.into()))?;
        let store = ObjectStore {
            dir: dir.to_path_buf(),
            layout: Layout::detect(dir)?,
            made: Arc::new(std::array::from_fn(|_| AtomicBool::new(false))),
            fd: Arc::new(fd),
        };
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `id` lives.
    pub fn path_of(&self, id: &ObjectId) -> PathBuf {
        self.dir.join(self.name_of(id))
    }

    /// Where `id` lives, relative to `fd`.
    pub fn name_of(&self, id: &ObjectId) -> PathBuf {
        let hex = id.to_hex();
        match self.layout {
            Layout::OneLevel => Path::new(&hex[0..2]).join(&hex[2..]),
            Layout::TwoLevel => Path::new(&hex[0..2]).join(&hex[2..4]).join(&hex[4..]),
        }
    }

    /// A handle on the store's directory (`name_of` names objects beneath it).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Makes the directory `final_path` of `id` goes in, unless known to exist.
    fn make_parent(&self, id: &ObjectId, final_path: &Path) -> Result<(), StoreError> {
        let slot = &self.made[id.0[0] as usize];
        if self.layout == Layout::OneLevel && slot.load(Ordering::Relaxed) {
            return Ok(());
        }
        let parent = final_path.parent().unwrap();
        std::fs::create_dir_all(parent).map_err(io_at(parent))?;
        slot.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The size of `id` if present.
    pub fn size_of(&self, id: &ObjectId) -> Option<u64> {
        std::fs::metadata(self.path_of(id)).ok().map(|m| m.len())
    }

    pub fn contains(&self, id: &ObjectId) -> bool {
        self.path_of(id).exists()
    }

    /// Opens an object for reading.
    pub fn open_object(&self, id: &ObjectId) -> io::Result<File> {
        File::open(self.path_of(id))
    }

    /// `open_object` only if that needs no disk read (every name on the way in the
    /// kernel's lookup cache: `openat2` with `RESOLVE_CACHED`); `WouldBlock` otherwise,
    /// and on kernels before 5.12, which lack the flag. For a caller that must not block
    /// (an async task), with `read_cached`.
    pub fn open_object_cached(&self, id: &ObjectId) -> io::Result<File> {
        use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match openat2(
            self.fd(),
            self.name_of(id),
            flags,
            Mode::empty(),
            ResolveFlags::CACHED,
        ) {
            Ok(fd) => Ok(File::from(fd)),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                Err(io::ErrorKind::WouldBlock.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Starts writing an object expected to hash to `expected` and be `len` bytes long.
    pub fn writer(&self, expected: ObjectId, len: u64) -> Result<ObjectWriter, StoreError> {
        self.make_writer(expected, len, true, 0o640)
    }

    /// A writer that does not hash as it writes: `ObjectWriter::finish_unverified`, then
    /// `verify` with others, hashes the objects together from the page cache, eight at a
    /// time (`model::hash_lanes`), several times faster than one by one as they stream.
    /// `mode`: its permission bits when made (those its last use will have, so no `chmod`
    /// follows; only for a store in a directory nobody else can enter, as subd's cache).
    pub fn unhashed_writer(
        &self,
        expected: ObjectId,
        len: u64,
        mode: Option<u32>,
    ) -> Result<ObjectWriter, StoreError> {
        self.make_writer(expected, len, false, mode.map_or(0o640, |m| m & 0o777))
    }

    fn make_writer(
        &self,
        expected: ObjectId,
        len: u64,
        hash: bool,
        mode: u32,
    ) -> Result<ObjectWriter, StoreError> {
        let final_name = self.name_of(&expected);
        let final_path = self.dir.join(&final_name);
        self.make_parent(&expected, &final_path)?;
        let tmp_name = crate::fsutil::temp_path(&final_name);
        let tmp = self.dir.join(&tmp_name);
        // Beneath the store's handle: no walk of its path per object.
        let create = || -> io::Result<File> {
            use rustix::fs::{Mode, OFlags};
            let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
            let fd = rustix::fs::openat(
                self.fd(),
                &tmp_name,
                flags | OFlags::CLOEXEC,
                Mode::from_raw_mode(mode),
            )?;
            Ok(File::from(fd))
        };
        let file = match create() {
            // Its directory was removed behind our back: make it again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.made[expected.0[0] as usize].store(false, Ordering::Relaxed);
                self.make_parent(&expected, &final_path)?;
                create()
            }
            r => r,
        }
        .map_err(io_at(&tmp))?;
        Ok(ObjectWriter {
            guard: DeleteOnDrop::new(tmp.clone()),
            tmp,
            final_path,
            names: (tmp_name, final_name),
            file,
            hasher: hash.then(ObjectHasher::new),
            written: 0,
            expected,
            len,
        })
    }

    /// Makes pending objects visible and durable: sync, rename each into place, sync.
    /// Returns how many were new.
    pub fn commit(&self, pending: Vec<PendingObject>) -> Result<usize, StoreError> {
        if pending.is_empty() {
            return Ok(0);
        }
        let added = self.commit_unsynced_names(pending)?;
        self.sync()?;
        Ok(added)
    }

    /// `commit` without the sync after the renames, for a cache: every name it makes holds
    /// a whole, verified, durable object, but a crash may lose names (the objects are then
    /// fetched again), so only a store nobody is told is durable may use it. (subd's and
    /// `patch-directory`'s fetches: the update that uses the objects syncs before its
    /// first rename into place.)
    pub fn commit_unsynced_names(&self, pending: Vec<PendingObject>) -> Result<usize, StoreError> {
        if pending.is_empty() {
            return Ok(0);
        }
        self.sync()?;
        // Each lane renames its own objects' temp files (an object is in one lane only);
        // the guards are settled here, in order, once every lane is done.
        let renamed: Vec<io::Result<bool>> = crate::lanes::run(&pending, |chunk, _| {
            let rename = |p: &PendingObject| {
                let (tmp, name) = &p.names;
                rename_no_replace(self.fd(), (tmp, name), &p.final_path)
            };
            chunk.iter().map(rename).collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect();
        let mut added = 0;
        let mut failed = None;
        for (p, r) in pending.into_iter().zip(renamed) {
            match r {
                Ok(true) => {
                    p.guard.disarm();
                    added += 1;
                }
                // An identical object arrived meanwhile; the guard removes the temp.
                Ok(false) => {}
                Err(e) => {
                    failed.get_or_insert_with(|| io_at(&p.final_path)(e));
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(added)
    }

    /// Writes a whole object from memory, verified and durable.
    pub fn put(&self, data: &[u8]) -> Result<ObjectId, StoreError> {
        let id = ObjectId::of(data);
        if self.contains(&id) {
            return Ok(id);
        }
        let mut w = self.writer(id, data.len() as u64)?;
        w.write_all(data).map_err(io_at(&self.dir))?;
        let p = w.finish()?;
        self.commit(vec![p])?;
        Ok(id)
    }

    /// Flushes everything written to the store's file-system.
    pub fn sync(&self) -> Result<(), StoreError> {
        let f = File::open(&self.dir).map_err(io_at(&self.dir))?;
        rustix::fs::syncfs(&f).map_err(|e| StoreError::Io {
            path: self.dir.clone(),
            source: e.into(),
        })
    }

    /// Removes an object (absent is fine).
    pub fn remove(&self, id: &ObjectId) -> Result<(), StoreError> {
        let p = self.path_of(id);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_at(&p)(e)),
        }
    }

    /// Every object's id (no `stat` per object: one directory read per fan-out directory).
    pub fn ids(&self) -> Result<std::collections::HashSet<ObjectId>, StoreError> {
        let mut out = std::collections::HashSet::new();
        self.walk(false, |_, name, _| {
            if let Ok(id) = ObjectId::from_hex(name) {
                out.insert(id);
            }
        })?;
        Ok(out)
    }

    /// Every object with its size.
    pub fn list(&self) -> Result<Vec<(ObjectId, u64)>, StoreError> {
        let mut out = Vec::new();
        self.walk(true, |_, name, size| {
            if let Ok(id) = ObjectId::from_hex(name) {
                out.push((id, size));
            }
        })?;
        Ok(out)
    }

    /// Calls `f(path, hex-name-or-temp-name, size)` for every file in the fan-out
    /// directories; the name passed is the full 128-hex id for objects, the raw file name
    /// otherwise. Sizes are 0 unless `sized` (each costs a `stat`).
    fn walk(&self, sized: bool, mut f: impl FnMut(&Path, &str, u64)) -> Result<(), StoreError> {
        let mut visit = |dir: &Path, prefix: &str| -> Result<(), StoreError> {
            for name in read_dir_names(dir)? {
                let p = dir.join(&name);
                let size = match sized {
                    true => std::fs::symlink_metadata(&p).map(|m| m.len()).unwrap_or(0),
                    false => 0,
                };
                if name.ends_with(TEMP_SUFFIX) {
                    f(&p, &name, size);
                } else {
                    f(&p, &format!("{prefix}{name}"), size);
                }
            }
            Ok(())
        };
        for l1 in read_dir_names(&self.dir)? {
            if l1.len() != 2 {
                continue;
            }
            let d1 = self.dir.join(&l1);
            if self.layout == Layout::OneLevel {
                visit(&d1, &l1)?;
                continue;
            }
            for l2 in read_dir_names(&d1)? {
                if l2.len() == 2 {
                    visit(&d1.join(&l2), &format!("{l1}{l2}"))?;
                }
            }
        }
        Ok(())
    }
}

/// Renames `from` to `to` unless `to` exists; false when it did. One `renameat2` where the
/// file-system supports `RENAME_NOREPLACE`, else a check and a rename.
fn rename_no_replace(
    dir: std::os::fd::BorrowedFd<'_>,
    (from, to): (&Path, &Path),
    shown: &Path,
) -> io::Result<bool> {
    use rustix::fs::{renameat, renameat_with, RenameFlags};
    match renameat_with(dir, from, dir, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::EXIST) => Ok(false),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOSYS) => {
            if shown.exists() {
                return Ok(false);
            }
            renameat(dir, from, dir, to)?;
            Ok(true)
        }
        Err(e) => Err(e.into()),
    }
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => return Ok(Vec::new()),
        Err(e) => return Err(io_at(dir)(e)),
    };
    let mut v = Vec::new();
    for e in rd {
        let e = e.map_err(io_at(dir))?;
        if let Ok(s) = e.file_name().into_string() {
            v.push(s);
        }
    }
    Ok(v)
}

/// An object being written; `finish` verifies it.
pub struct ObjectWriter {
    guard: DeleteOnDrop,
    tmp: PathBuf,
    final_path: PathBuf,
    /// `tmp` and `final_path` relative to the store's handle.
    names: (PathBuf, PathBuf),
    file: File,
    /// `None`: hashed later, by `verify`.
    hasher: Option<ObjectHasher>,
    written: u64,
    expected: ObjectId,
    len: u64,
}

impl Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl ObjectWriter {
    /// Checks length and hash; on success the object awaits `ObjectStore::commit`.
    /// On failure the temp file is removed.
    pub fn finish(self) -> Result<PendingObject, StoreError> {
        self.finish_preparing(|_| false)
    }

    /// `finish`, calling `prepare` on the verified file before it is closed (to give it
    /// metadata; never to change its bytes; true if it did: `PendingObject::prepared`).
    pub fn finish_preparing(
        mut self,
        prepare: impl FnOnce(&File) -> bool,
    ) -> Result<PendingObject, StoreError> {
        self.check_length()?;
        let computed = match self.hasher.take() {
            Some(h) => h.finish().0,
            // Not hashed as written: read it back.
            None => {
                model::hash::hash_reader(ReadAt::new(&self.file, self.len))
                    .map_err(io_at(&self.tmp))?
                    .0
            }
        };
        start_writeback(&self.file, self.len);
        self.checked(computed, prepare)
    }

    /// Checks the length and starts the write-back; the hash is checked by `verify`.
    pub fn finish_unverified(self) -> Result<Unverified, StoreError> {
        self.check_length()?;
        start_writeback(&self.file, self.len);
        Ok(Unverified(self))
    }

    fn check_length(&self) -> Result<(), StoreError> {
        if self.written != self.len {
            return Err(StoreError::Truncated {
                id: Box::new(self.expected),
                expected: self.len,
                got: self.written,
            });
        }
        Ok(())
    }

    /// The object, given its `computed` hash: pending if it is the expected one.
    fn checked(
        self,
        computed: ObjectId,
        prepare: impl FnOnce(&File) -> bool,
    ) -> Result<PendingObject, StoreError> {
        if computed != self.expected {
            return Err(StoreError::HashMismatch {
                expected: Box::new(self.expected),
                computed: Box::new(computed),
            });
        }
        let prepared = prepare(&self.file);
        Ok(PendingObject {
            prepared,
            guard: self.guard,
            final_path: self.final_path,
            names: self.names,
            id: self.expected,
            len: self.len,
        })
    }
}

/// An object written whole but not yet hashed (`ObjectWriter::finish_unverified`).
pub struct Unverified(ObjectWriter);

impl Unverified {
    pub fn id(&self) -> &ObjectId {
        &self.0.expected
    }
}

/// Hashes `objects` together, reading them back (eight at a time where the CPU allows,
/// `model::hash_lanes`), and returns each one's outcome in order: pending (after `prepare`
/// gave it metadata) if it holds its expected bytes, else `HashMismatch` (its temp file
/// removed).
pub fn verify(
    objects: Vec<Unverified>,
    mut prepare: impl FnMut(&ObjectId, &File) -> bool,
) -> Vec<Result<PendingObject, StoreError>> {
    let mut computed: Vec<Option<io::Result<ObjectId>>> =
        (0..objects.len()).map(|_| None).collect();
    // Longest first: the lanes then end together rather than one long object last, alone.
    let mut order: Vec<usize> = (0..objects.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(objects[i].0.len));
    let mut it = order.into_iter();
    model::hash_lanes::hash_many(
        || {
            it.next().map(|i| {
                (
                    i,
                    ReadAt::new(&objects[i].0.file, objects[i].0.len),
                    objects[i].0.len,
                )
            })
        },
        |i, r| computed[i] = Some(r.map(|(id, _)| id)),
    );
    objects
        .into_iter()
        .zip(computed)
        .map(|(Unverified(w), c)| match c {
            Some(Ok(id)) => {
                let expected = w.expected;
                w.checked(id, |f| prepare(&expected, f))
            }
            Some(Err(e)) => Err(io_at(&w.tmp)(e)),
            None => Err(io_at(&w.tmp)(io::Error::other("not hashed"))),
        })
        .collect()
}

/// Reads the first `len` bytes of a file by position (`pread`), leaving its offset alone;
/// the end is known, so no read is spent finding it.
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
    len: u64,
}

impl<'a> ReadAt<'a> {
    fn new(file: &'a File, len: u64) -> ReadAt<'a> {
        ReadAt { file, pos: 0, len }
    }
}

impl io::Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let left = (self.len - self.pos).min(buf.len() as u64) as usize;
        if left == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..left], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Appends to `buf` up to `want` bytes read from `file` at its position, as far as the
/// page cache holds them (`preadv2` with `RWF_NOWAIT`): returns how many (0 at the end of
/// the file), or `WouldBlock` when the first of them would need a disk read. Never waits
/// for the disk, so an async task may call it.
pub fn read_cached(file: &File, buf: &mut Vec<u8>, want: usize) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    buf.reserve(want);
    let spare = &mut buf.spare_capacity_mut()[..want];
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    // SAFETY: the one iovec covers `want` bytes of `buf`'s spare capacity, which the
    // kernel writes and nothing else aliases; only the `n` bytes it reports written are
    // then counted as initialised. Offset -1: the file's position, which it advances.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // EOPNOTSUPP: a file-system without RWF_NOWAIT reads (then always blocking).
            Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) => Err(io::ErrorKind::WouldBlock.into()),
            _ => Err(e),
        };
    }
    let n = n as usize;
    // SAFETY: the kernel initialised the first `n` (≤ `want`) spare bytes.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Objects at least this long start their write-back when verified.
const WRITEBACK_FROM: u64 = 256 * 1024;

/// Starts writing a verified object's pages to disk without waiting (`sync_file_range`), so
/// the sync before its commit finds most of the work done; small objects are left to that
/// sync, which merges them.
fn start_writeback(file: &File, len: u64) {
    use std::os::fd::AsRawFd;
    if len >= WRITEBACK_FROM {
        // SAFETY: a plain syscall on an open descriptor; its failure only loses the head start.
        unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }
}

/// Verified objects left under their temp names for an update in this same process to
/// take at once (`imagetool patch-directory`): each is spared the sync before naming and
/// the rename to its name, which only an object kept for later needs. The update finds
/// them through `names`; `release` then names whatever it did not take, so no verified
/// object is lost. Dropped unreleased, the held objects are removed.
pub struct HeldObjects {
    store: ObjectStore,
    objects: Vec<PendingObject>,
}

/// Where a held object waits.
#[derive(Clone, Debug)]
pub struct HeldName {
    /// Its temp name, relative to the store's handle.
    pub name: PathBuf,
    /// It was given its last use's metadata as it was stored (`PendingObject::prepared`).
    pub prepared: bool,
}

/// Held objects by id.
pub type HeldNames = std::collections::HashMap<ObjectId, HeldName>;

impl HeldObjects {
    pub fn new(store: &ObjectStore, objects: Vec<PendingObject>) -> HeldObjects {
        HeldObjects {
            store: store.clone(),
            objects,
        }
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Where the update finds each held object.
    pub fn names(&self) -> HeldNames {
        self.objects
            .iter()
            .map(|p| {
                let name = p.names.0.clone();
                let prepared = p.prepared;
                (p.id, HeldName { name, prepared })
            })
            .collect()
    }

    /// After the update: the objects `taken` (linked or renamed into place, their temp
    /// names gone) are let go; the others are named (sync, then renames) and stay in the
    /// store. One whose temp name turns out to be gone is counted as taken. Returns how
    /// many were named.
    pub fn release(self, taken: impl Fn(&ObjectId) -> bool) -> Result<usize, StoreError> {
        let (gone, kept): (Vec<PendingObject>, Vec<PendingObject>) =
            self.objects.into_iter().partition(|p| taken(&p.id));
        for p in gone {
            p.guard.disarm();
        }
        let mut left = Vec::with_capacity(kept.len());
        for p in kept {
            let there = rustix::fs::statat(
                self.store.fd(),
                &p.names.0,
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .is_ok();
            if there {
                left.push(p);
            } else {
                p.guard.disarm();
            }
        }
        self.store.commit_unsynced_names(left)
    }
}

/// A verified object not yet visible under its name.
pub struct PendingObject {
    /// Whether `prepare` gave it its metadata (`ObjectWriter::finish_preparing`).
    pub prepared: bool,
    guard: DeleteOnDrop,
    final_path: PathBuf,
    /// `tmp` and `final_path` relative to the store's handle.
    names: (PathBuf, PathBuf),
    pub id: ObjectId,
    pub len: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_list_remove_and_temp_cleanup() {
        let d = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(d.path()).unwrap();
        let id = s.put(b"hello").unwrap();
        assert_eq!(s.size_of(&id), Some(5));
        assert_eq!(s.list().unwrap(), vec![(id, 5)]);
        // a crash leaves a temp file: open removes it
        let mut w = s.writer(ObjectId::of(b"zz"), 2).unwrap();
        w.write_all(b"zz").unwrap();
        std::mem::forget(w);
        let s = ObjectStore::open(d.path()).unwrap();
        assert_eq!(s.list().unwrap().len(), 1);
        s.remove(&id).unwrap();
        assert!(s.list().unwrap().is_empty());
    }

    fn pending(s: &ObjectStore, data: &[u8]) -> PendingObject {
        let mut w = s.writer(ObjectId::of(data), data.len() as u64).unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn held_objects_are_found_by_their_temp_names_and_released_by_what_was_taken() {
        let d = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(d.path()).unwrap();
        let data: [&[u8]; 4] = [b"taken", b"left", b"gone", b"dropped"];
        let ids: Vec<ObjectId> = data.iter().map(|b| ObjectId::of(b)).collect();
        let mut objects: Vec<PendingObject> = data[..2].iter().map(|b| pending(&s, b)).collect();
        let mut w = s.writer(ids[2], 4).unwrap();
        w.write_all(data[2]).unwrap();
        objects.push(w.finish_preparing(|_| true).unwrap());
        let held = HeldObjects::new(&s, objects);
        assert_eq!(held.len(), 3);
        let names = held.names();
        assert!(!names[&ids[0]].prepared && names[&ids[2]].prepared);
        for (id, b) in ids[..3].iter().zip(data) {
            assert!(!s.contains(id), "held, not named");
            let at = d.path().join(&names[id].name);
            assert_eq!(std::fs::read(&at).unwrap(), b, "{}", at.display());
        }
        // `attach` leaves held objects alone (`open` would sweep them).
        let again = ObjectStore::attach(d.path()).unwrap();
        assert!(d.path().join(&names[&ids[0]].name).exists());
        // the update took "taken" (moved it away) and, unreported, "gone"
        let out = d.path().join("elsewhere");
        std::fs::rename(d.path().join(&names[&ids[0]].name), &out).unwrap();
        std::fs::remove_file(d.path().join(&names[&ids[2]].name)).unwrap();
        assert_eq!(held.release(|id| *id == ids[0]).unwrap(), 1);
        assert_eq!(
            again.list().unwrap(),
            vec![(ids[1], 4)],
            "only what was left is named"
        );
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"taken",
            "a taken one is not removed"
        );
        assert_eq!(
            walkdir_files(d.path()),
            2,
            "no temp files: the object and `elsewhere`"
        );
        // dropped unreleased, held objects go
        drop(HeldObjects::new(&s, vec![pending(&s, data[3])]));
        assert!(!s.contains(&ids[3]));
        assert_eq!(walkdir_files(d.path()), 2);
    }

    #[test]
    fn mismatch_and_truncation_store_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(d.path()).unwrap();
        let mut w = s.writer(ObjectId::of(b"good"), 4).unwrap();
        w.write_all(b"evil").unwrap();
        assert!(matches!(w.finish(), Err(StoreError::HashMismatch { .. })));
        let mut w = s.writer(ObjectId::of(b"good"), 4).unwrap();
        w.write_all(b"go").unwrap();
        assert!(matches!(w.finish(), Err(StoreError::Truncated { .. })));
        assert!(s.list().unwrap().is_empty());
        let count = walkdir_files(d.path());
        assert_eq!(count, 0, "no temp files left");
    }

    #[test]
    fn stores_of_the_earlier_two_level_layout_are_kept() {
        let d = tempfile::tempdir().unwrap();
        let id = ObjectId::of(b"old");
        let hex = id.to_hex();
        let old = d.path().join(&hex[0..2]).join(&hex[2..4]);
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join(&hex[4..]), b"old").unwrap();
        std::fs::write(old.join(format!("x{TEMP_SUFFIX}")), b"crash").unwrap();
        let s = ObjectStore::open(d.path()).unwrap();
        assert_eq!(s.list().unwrap(), vec![(id, 3)]);
        assert!(!old.join(format!("x{TEMP_SUFFIX}")).exists());
        let new = s.put(b"new").unwrap();
        assert_eq!(
            s.path_of(&new).parent().unwrap().parent().unwrap().parent(),
            Some(d.path())
        );
        assert_eq!(s.list().unwrap().len(), 2);
        // a fresh store uses one level of fan-out
        let e = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(e.path()).unwrap();
        let id = s.put(b"x").unwrap();
        assert_eq!(s.path_of(&id).parent().unwrap().parent(), Some(e.path()));
        assert_eq!(
            ObjectStore::open(e.path()).unwrap().list().unwrap(),
            vec![(id, 1)]
        );
    }

    fn walkdir_files(p: &Path) -> usize {
        let mut n = 0;
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                n += walkdir_files(&e.path());
            } else {
                n += 1;
            }
        }
        n
    }
}
