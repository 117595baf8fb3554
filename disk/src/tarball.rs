//! Tar import: a `.tar`, `.tar.gz` or `.tgz` stream → a `FileTree`, with every regular
//! file's content handed, in archive order, to a `ContentSink` (which hashes it, and may
//! keep or upload it). One sequential pass; nothing is extracted to disk.
//!
//! Compression is detected by content (the gzip magic `1f 8b`), never by file name.
//!
//! Rules, chosen to make a hostile or broken archive an error rather than a surprise:
//! - Paths are taken relative to the image root: `./a`, `a` and `/a` all name `/a`.
//!   A `..` component anywhere is an error (it could escape).
//! - `./` (or `.`, `/`) sets the root's metadata and must be a directory; without it the
//!   root is `0755 root:root`.
//! - A directory that is not in the archive but has entries beneath it is created as
//!   `0755 root:root`; a later entry for it in the archive sets its metadata.
//! - Duplicate paths are an error (an archive naming a path twice is ambiguous: tar itself
//!   would keep the last, a reader of the listing would believe the first).
//! - A hardlink must name a path stored earlier in the archive, and not a directory.
//! - An entry below a symlink stored earlier (written *through* it) is an error; so is an
//!   entry below a file.
//! - `/.subd` and everything below it are dropped (subd's private directory).
//! - A uid or gid of 4294967295 (`(uid_t)-1`, which `chown` reads as "leave unchanged")
//!   or wider than 32 bits is an error.
//! - Sparse files, sockets and other exotic entry types are an error; PAX global headers
//!   are ignored. PAX `mtime` fractions give nanoseconds.
//! - A truncated archive (an entry shorter than its header says, a partial header, or a
//!   stream ending without the end-of-archive marker), a corrupt gzip stream (checked to
//!   its CRC trailer) and a file that is not a tar are errors. An archive with no entries
//!   at all is an error too.

use model::hash::{ObjectHasher, ObjectId};
use model::image::{check_id, FileTree, Inode, Kind, Mtime};
use model::path::SUBD_DIR;
use model::path::{escape, FsPath};
use std::collections::BTreeSet;
use std::io::{self, BufRead, BufReader, Read};
use tar::EntryType;

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("reading archive: {0}")]
    Io(#[source] io::Error),
    #[error("not a tar archive: {0}")]
    NotTar(String),
    #[error("archive has no entries (not a tar archive?)")]
    Empty,
    #[error("archive truncated: {0}")]
    Truncated(String),
    #[error("tar entry {path}: {reason}")]
    Entry { path: String, reason: String },
    #[error("{0}")]
    Sink(#[source] io::Error),
}

fn entry_err(path: &[u8], reason: impl Into<String>) -> TarError {
    TarError::Entry {
        path: escape(path),
        reason: reason.into(),
    }
}

/// Receives each regular file's content, in archive order.
pub trait ContentSink {
    /// Consumes exactly `size` bytes of `content` (the file at `path`) and returns their id.
    /// Called only for non-empty files.
    fn file(&mut self, path: &FsPath, size: u64, content: &mut dyn Read) -> io::Result<ObjectId>;
}

/// A sink that only hashes.
#[derive(Default)]
pub struct HashOnly;

impl ContentSink for HashOnly {
    fn file(&mut self, _: &FsPath, _: u64, content: &mut dyn Read) -> io::Result<ObjectId> {
        Ok(model::hash::hash_reader(content)?.0)
    }
}

/// Hashes `content` while copying it into `out`; returns the id and byte count.
pub fn hash_copy(content: &mut dyn Read, out: &mut dyn io::Write) -> io::Result<(ObjectId, u64)> {
    let mut h = ObjectHasher::new();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = match content.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    Ok(h.finish())
}

/// Counts of what an import saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportStats {
    pub entries: u64,
    /// Regular files with content (each hardlinked inode once).
    pub files: u64,
    pub bytes: u64,
    /// Entries dropped (`/.subd`).
    pub dropped: u64,
}

/// Wraps a reader to remember whether it ever reached end-of-file.
struct EofTracker<R> {
    inner: R,
    eof: bool,
}

impl<R: Read> Read for EofTracker<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        Ok(n)
    }
}

/// Counts bytes read, to detect content shorter than the header claims.
struct Counting<'a, R: ?Sized> {
    inner: &'a mut R,
    n: u64,
}

impl<R: Read + ?Sized> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Opens `r` as an archive stream, transparently decompressing gzip (detected by magic).
/// Returns the stream and whether it was compressed.
pub fn decompressed<R: Read + Send + 'static>(r: R) -> io::Result<(Box<dyn Read + Send>, bool)> {
    let mut br = BufReader::with_capacity(256 * 1024, r);
    let head = br.fill_buf()?;
    if head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b {
        Ok((
            Box::new(flate2::bufread::MultiGzDecoder::new(br)) as Box<dyn Read + Send>,
            true,
        ))
    } else {
        Ok((Box::new(br) as Box<dyn Read + Send>, false))
    }
}

/// Bytes per read-ahead chunk.
const CHUNK: usize = 512 * 1024;

/// A read-ahead chunk: a buffer and how many of its bytes hold data.
type Chunk = io::Result<(Vec<u8>, usize)>;

/// Moves reading `r` onto its own thread, handing over chunks through a small bounded
/// queue, so decompression and hashing use two cores. Errors arrive in order. Chunk
/// buffers go back to the thread once read, so they are allocated (and zeroed) once.
/// Dropping the reader stops and joins the thread, so no thread outlives an import.
pub fn read_ahead(mut r: Box<dyn Read + Send>) -> impl Read + Send {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Chunk>(4);
    let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let thread = std::thread::spawn(move || loop {
        let mut buf = back_rx.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if tx.send(Ok((buf, n))).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(Err(e));
                break;
            }
        }
    });
    ChunkReader {
        rx: Some(rx),
        back: back_tx,
        thread: Some(thread),
        cur: Vec::new(),
        pos: 0,
        len: 0,
    }
}

struct ChunkReader {
    rx: Option<std::sync::mpsc::Receiver<Chunk>>,
    back: std::sync::mpsc::Sender<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<()>>,
    cur: Vec<u8>,
    pos: usize,
    /// Bytes of `cur` that hold data.
    len: usize,
}

impl Drop for ChunkReader {
    fn drop(&mut self) {
        // Closing the queue makes the reader thread's next send fail, so it ends.
        drop(self.rx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.len {
            let Some(rx) = &self.rx else { return Ok(0) };
            match rx.recv() {
                Ok(Ok((c, n))) => {
                    let done = std::mem::replace(&mut self.cur, c);
                    if !done.is_empty() {
                        let _ = self.back.send(done);
                    }
                    self.pos = 0;
                    self.len = n;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.len - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Imports an archive (plain or gzip, detected by content) into a tree, feeding file
/// contents to `sink`.
pub fn import<R: Read + Send + 'static>(
    r: R,
    sink: &mut dyn ContentSink,
) -> Result<(FileTree, ImportStats), TarError> {
    let (stream, gz) = decompressed(r).map_err(TarError::Io)?;
    if gz {
        import_plain(read_ahead(stream), sink)
    } else {
        import_plain(stream, sink)
    }
}

/// Builds the tree while entries arrive.
struct Builder {
    tree: FileTree,
    next_ino: u64,
    /// Directories created only because something lay beneath them.
    implicit: BTreeSet<FsPath>,
    root_seen: bool,
    stats: ImportStats,
}

impl Builder {
    fn new() -> Builder {
        Builder {
            tree: FileTree::with_root(Inode::dir(0o755, 0, 0)),
            next_ino: 1,
            implicit: BTreeSet::new(),
            root_seen: false,
            stats: ImportStats::default(),
        }
    }

    /// Makes sure every ancestor of `path` is a directory, creating missing ones.
    fn ensure_parents(&mut self, path: &FsPath) -> Result<(), TarError> {
        let mut ancestors = Vec::new();
        let mut p = path.parent();
        while let Some(a) = p {
            if a.is_root() {
                break;
            }
            p = a.parent();
            ancestors.push(a);
        }
        for a in ancestors.into_iter().rev() {
            match self.tree.get(&a) {
                Some(i) if i.kind == Kind::Dir => {}
                Some(i) if i.kind == Kind::Symlink => {
                    return Err(entry_err(
                        path.as_bytes(),
                        format!(
                            "written through the symlink {} stored earlier in the archive",
                            a.display()
                        ),
                    ))
                }
                Some(_) => {
                    return Err(entry_err(
                        path.as_bytes(),
                        format!("parent {} is not a directory", a.display()),
                    ))
                }
                None => {
                    let ino = self.alloc();
                    self.tree.inodes.insert(ino, Inode::dir(0o755, 0, 0));
                    self.tree.entries.insert(a.clone(), ino);
                    self.implicit.insert(a);
                }
            }
        }
        Ok(())
    }

    fn alloc(&mut self) -> u64 {
        let i = self.next_ino;
        self.next_ino += 1;
        i
    }

    /// Adds `inode` at `path` (a new inode), enforcing the duplicate rule.
    fn add(&mut self, path: FsPath, inode: Inode) -> Result<(), TarError> {
        if path.is_root() {
            if inode.kind != Kind::Dir {
                return Err(entry_err(b"/", "the archive root must be a directory"));
            }
            if self.root_seen {
                return Err(entry_err(b"/", "appears twice in the archive"));
            }
            self.root_seen = true;
            self.tree.inodes.insert(0, inode);
            return Ok(());
        }
        self.ensure_parents(&path)?;
        if let Some(&ino) = self.tree.entries.get(&path) {
            if inode.kind == Kind::Dir && self.implicit.remove(&path) {
                self.tree.inodes.insert(ino, inode);
                return Ok(());
            }
            return Err(entry_err(path.as_bytes(), "appears twice in the archive"));
        }
        let ino = self.alloc();
        self.tree.inodes.insert(ino, inode);
        self.tree.entries.insert(path, ino);
        Ok(())
    }

    fn hardlink(&mut self, path: FsPath, target: FsPath) -> Result<(), TarError> {
        if path.is_root() {
            return Err(entry_err(b"/", "the archive root cannot be a hardlink"));
        }
        let Some(&ino) = self.tree.entries.get(&target) else {
            return Err(entry_err(
                path.as_bytes(),
                format!(
                    "hardlink to {}, which is not earlier in the archive",
                    target.display()
                ),
            ));
        };
        if self.tree.inodes[&ino].kind == Kind::Dir {
            return Err(entry_err(
                path.as_bytes(),
                format!("hardlink to the directory {}", target.display()),
            ));
        }
        self.ensure_parents(&path)?;
        if self.tree.entries.contains_key(&path) {
            return Err(entry_err(path.as_bytes(), "appears twice in the archive"));
        }
        self.tree.entries.insert(path, ino);
        Ok(())
    }
}

fn is_subd(p: &FsPath) -> bool {
    let subd = FsPath::new(SUBD_DIR.as_bytes().to_vec()).expect("valid");
    p.starts_with(&subd)
}

/// What an entry's pax extended header says of its metadata.
#[derive(Default)]
struct PaxOverrides {
    mtime: Option<Mtime>,
    uid: Option<u64>,
    gid: Option<u64>,
}

/// Why a pax `uid` or `gid` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PaxIdError {
    /// Empty, or not only decimal digits (the value escaped).
    #[error("pax {which} {value:?} is not a decimal number")]
    NotDecimal { which: &'static str, value: String },
    #[error("pax {which} {value} does not fit in 32 bits")]
    TooWide { which: &'static str, value: String },
}

/// A pax `uid`/`gid` value: decimal digits only, as POSIX says (no sign, space or dot).
fn pax_id(which: &'static str, v: &[u8]) -> Result<u64, PaxIdError> {
    let s = std::str::from_utf8(v).unwrap_or("");
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PaxIdError::NotDecimal {
            which,
            value: model::path::escape(v),
        });
    }
    s.parse::<u64>().map_err(|_| PaxIdError::TooWide {
        which,
        value: s.to_string(),
    })
}

/// Reads the entry's pax `mtime`, `uid` and `gid`; a malformed `uid` or `gid` is refused.
fn pax_overrides(
    entry: &mut tar::Entry<'_, impl Read>,
    raw_path: &[u8],
) -> Result<PaxOverrides, TarError> {
    let mut out = PaxOverrides::default();
    let Some(exts) = entry.pax_extensions().map_err(classify_io)? else {
        return Ok(out);
    };
    for e in exts {
        let e = e.map_err(classify_io)?;
        match e.key_bytes() {
            b"mtime" => out.mtime = pax_mtime(e.value_bytes()),
            b"uid" => {
                out.uid = Some(
                    pax_id("uid", e.value_bytes())
                        .map_err(|m| entry_err(raw_path, m.to_string()))?,
                )
            }
            b"gid" => {
                out.gid = Some(
                    pax_id("gid", e.value_bytes())
                        .map_err(|m| entry_err(raw_path, m.to_string()))?,
                )
            }
            _ => {}
        }
    }
    Ok(out)
}

/// A pax `mtime` (seconds, optionally with a fraction); `None` if it does not parse.
fn pax_mtime(value: &[u8]) -> Option<Mtime> {
    let v = std::str::from_utf8(value).unwrap_or("");
    let (s, frac) = v.split_once('.').unwrap_or((v, ""));
    let sec = s.parse::<i64>().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let nsec = if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        0
    } else {
        format!("{digits:0<9}").parse::<u32>().unwrap_or(0)
    };
    // A negative fractional time counts down from the whole second.
    if sec < 0 && nsec > 0 {
        return Some(Mtime {
            sec: sec - 1,
            nsec: 1_000_000_000 - nsec,
        });
    }
    Some(Mtime { sec, nsec })
}

fn classify_io(e: io::Error) -> TarError {
    // The tar crate quotes header bytes in its messages: escaped, so that a hostile file
    // cannot put an escape sequence on the operator's terminal.
    let msg = model::path::escape(e.to_string().as_bytes());
    if msg.contains("checksum mismatch") || msg.contains("numeric field") {
        TarError::NotTar(msg)
    } else if e.kind() == io::ErrorKind::UnexpectedEof || msg.contains("entire block") {
        TarError::Truncated(msg)
    } else {
        TarError::Io(e)
    }
}

/// Other formats' magic numbers, refused by name rather than as a broken tar.
const OTHER_FORMATS: &[(&[u8], &str)] = &[
    (b"PK\x03\x04", "a zip archive"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"BZh", "bzip2-compressed"),
    (b"\xfd7zXZ\x00", "xz-compressed"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-zip archive"),
];

/// Refuses a stream whose first block cannot begin a tar archive: another format's magic
/// number, or (when shorter than a block) numeric header fields that are not octal. A full
/// block is checked by the tar reader (its checksum).
fn check_first_block(head: &[u8]) -> Result<(), TarError> {
    if let Some((_, what)) = OTHER_FORMATS.iter().find(|(m, _)| head.starts_with(m)) {
        return Err(TarError::NotTar(format!("it is {what}")));
    }
    if head.is_empty() || head.len() >= 512 {
        return Ok(());
    }
    // mode, uid, gid, size, mtime: octal digits padded with spaces or NULs (or a GNU
    // base-256 number, first byte 0x80 or 0xff).
    for (start, end) in [(100, 108), (108, 116), (116, 124), (124, 136), (136, 148)] {
        let Some(field) = head.get(start..end.min(head.len())) else {
            break;
        };
        let octal = field.iter().all(|&b| matches!(b, b'0'..=b'7' | b' ' | 0));
        let base256 = matches!(field.first(), Some(0x80 | 0xff));
        if !octal && !base256 {
            return Err(TarError::NotTar(format!(
                "its first {} bytes are not a tar header",
                head.len()
            )));
        }
    }
    if !head.contains(&0) {
        // Every tar header pads its fields with NULs; a short text file has none.
        return Err(TarError::NotTar(format!(
            "it is {} bytes without the NUL padding every tar header has",
            head.len()
        )));
    }
    Ok(())
}

/// Imports an uncompressed tar stream: the first block checked, then each entry added to
/// the tree, then the end of the stream checked and the tree validated.
pub fn import_plain<R: Read>(
    r: R,
    sink: &mut dyn ContentSink,
) -> Result<(FileTree, ImportStats), TarError> {
    let mut tracker = open_stream(r)?;
    let mut b = Builder::new();
    {
        let mut archive = tar::Archive::new(&mut tracker);
        let entries = archive.entries().map_err(classify_io)?;
        for entry in entries {
            b.entry(entry.map_err(classify_io)?, sink)?;
        }
    }
    finish(b, tracker)
}

/// A stream with its first block read ahead (and put back in front).
type Headed<R> = io::Chain<io::Cursor<Vec<u8>>, R>;

/// Reads and checks the first block, then hands it back in front of the rest of the
/// stream, which is watched for reaching its end.
fn open_stream<R: Read>(mut r: R) -> Result<EofTracker<Headed<R>>, TarError> {
    let mut head = Vec::with_capacity(512);
    (&mut r)
        .take(512)
        .read_to_end(&mut head)
        .map_err(classify_io)?;
    check_first_block(&head)?;
    Ok(EofTracker {
        inner: io::Cursor::new(head).chain(r),
        eof: false,
    })
}

/// Refuses an empty or unterminated archive, drains the padding (which also checks a gzip
/// stream's CRC trailer) and validates the tree.
fn finish<R: Read>(
    b: Builder,
    mut tracker: EofTracker<R>,
) -> Result<(FileTree, ImportStats), TarError> {
    if b.stats.entries == 0 {
        return Err(TarError::Empty);
    }
    if tracker.eof {
        return Err(TarError::Truncated(
            "the stream ends without the end-of-archive marker".into(),
        ));
    }
    io::copy(&mut tracker.inner, &mut io::sink()).map_err(classify_io)?;
    b.tree.validate().map_err(|e| TarError::Entry {
        path: String::new(),
        reason: e.to_string(),
    })?;
    Ok((b.tree, b.stats))
}

/// An entry's metadata: its header's, with the pax extended header's `mtime`, `uid` and
/// `gid` taking precedence.
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Mtime,
    size: u64,
    link: Option<Vec<u8>>,
    major: u32,
    minor: u32,
}

impl EntryMeta {
    fn read(entry: &mut tar::Entry<'_, impl Read>, raw_path: &[u8]) -> Result<EntryMeta, TarError> {
        let h = entry.header();
        let mode = h.mode().map_err(|e| entry_err(raw_path, e.to_string()))?;
        let header_uid = h.uid().map_err(|e| entry_err(raw_path, e.to_string()))?;
        let header_gid = h.gid().map_err(|e| entry_err(raw_path, e.to_string()))?;
        let mut mtime = Mtime {
            sec: h.mtime().map_err(|e| entry_err(raw_path, e.to_string()))? as i64,
            nsec: 0,
        };
        let link = entry.link_name_bytes().map(|c| c.into_owned());
        let (major, minor) = (
            h.device_major().ok().flatten().unwrap_or(0),
            h.device_minor().ok().flatten().unwrap_or(0),
        );
        let pax = pax_overrides(entry, raw_path)?;
        if let Some(m) = pax.mtime {
            mtime = m;
        }
        let uid = check_id("uid", pax.uid.unwrap_or(header_uid))
            .map_err(|e| entry_err(raw_path, e.to_string()))?;
        let gid = check_id("gid", pax.gid.unwrap_or(header_gid))
            .map_err(|e| entry_err(raw_path, e.to_string()))?;
        Ok(EntryMeta {
            mode,
            uid,
            gid,
            mtime,
            size: entry.size(),
            link,
            major,
            minor,
        })
    }
}

impl Builder {
    /// Adds one archive entry: skips pax and long-name headers, drops `/.subd`, and adds
    /// the rest by type.
    fn entry(
        &mut self,
        mut entry: tar::Entry<'_, impl Read>,
        sink: &mut dyn ContentSink,
    ) -> Result<(), TarError> {
        self.stats.entries += 1;
        let raw_path = entry.path_bytes().into_owned();
        let path = FsPath::from_relative(&raw_path)
            .map_err(|e| entry_err(&raw_path, e.reason.to_string()))?;
        let etype = entry.header().entry_type();
        if matches!(
            etype,
            EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName
        ) {
            return Ok(());
        }
        if is_subd(&path) {
            self.stats.dropped += 1;
            return Ok(());
        }
        let m = EntryMeta::read(&mut entry, &raw_path)?;
        match etype {
            EntryType::Directory => self.add(path, Inode::dir(m.mode, m.uid, m.gid)),
            EntryType::Regular | EntryType::Continuous => {
                let hash = self.content(&mut entry, &path, m.size, sink)?;
                self.add(
                    path,
                    Inode::file(m.mode, m.uid, m.gid, m.mtime, m.size, hash),
                )
            }
            EntryType::Symlink => {
                let target = m
                    .link
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| entry_err(&raw_path, "symlink without a target".to_string()))?;
                self.add(path, Inode::symlink(m.uid, m.gid, target))
            }
            EntryType::Link => self.link_entry(path, &raw_path, m.link),
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let kind = match etype {
                    EntryType::Char => Kind::Char,
                    EntryType::Block => Kind::Block,
                    _ => Kind::Fifo,
                };
                let mut ino = Inode::new(kind, m.mode, m.uid, m.gid);
                ino.mtime = m.mtime;
                if kind != Kind::Fifo {
                    ino.rdev = libc::makedev(m.major, m.minor);
                }
                self.add(path, ino.normalized())
            }
            other => Err(entry_err(
                &raw_path,
                format!("unsupported entry type {:?}", other.as_byte() as char),
            )),
        }
    }

    /// Hands a regular file's content to `sink` (none for an empty file); content shorter
    /// than the header says is a truncated archive.
    fn content(
        &mut self,
        entry: &mut dyn Read,
        path: &FsPath,
        size: u64,
        sink: &mut dyn ContentSink,
    ) -> Result<Option<ObjectId>, TarError> {
        if size == 0 {
            return Ok(None);
        }
        let mut counting = Counting { inner: entry, n: 0 };
        let id = sink.file(path, size, &mut counting).map_err(|e| {
            if counting.n < size {
                classify_io(e)
            } else {
                TarError::Sink(e)
            }
        })?;
        if counting.n != size {
            return Err(TarError::Truncated(format!(
                "{}: {} of {size} bytes present",
                path.display(),
                counting.n
            )));
        }
        self.stats.files += 1;
        self.stats.bytes += size;
        Ok(Some(id))
    }

    /// Adds a hardlink entry: its target must be a path earlier in the archive, outside
    /// `/.subd`.
    fn link_entry(
        &mut self,
        path: FsPath,
        raw_path: &[u8],
        link: Option<Vec<u8>>,
    ) -> Result<(), TarError> {
        let target = link.ok_or_else(|| entry_err(raw_path, "hardlink without a target"))?;
        let target = FsPath::from_relative(&target)
            .map_err(|e| entry_err(raw_path, format!("hardlink target: {}", e.reason)))?;
        if is_subd(&target) {
            return Err(entry_err(
                raw_path,
                "hardlink into /.subd, which is never part of an image",
            ));
        }
        self.hardlink(path, target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pax_ids_are_classified() {
        assert_eq!(pax_id("uid", b"1000"), Ok(1000));
        for bad in [&b""[..], b"-1", b" 7", b"1.0", b"\xff"] {
            assert!(
                matches!(
                    pax_id("uid", bad),
                    Err(PaxIdError::NotDecimal { which: "uid", .. })
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            pax_id("gid", b"18446744073709551616"),
            Err(PaxIdError::TooWide {
                which: "gid",
                value: "18446744073709551616".into()
            })
        );
        // The value is shown escaped: a hostile header cannot reach the terminal.
        let e = pax_id("uid", b"\x1b[2J").unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"pax uid "\\x1b[2J" is not a decimal number"#
        );
    }

    /// Builds a tar in memory; `f` adds entries.
    fn tar_with(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().unwrap()
    }

    fn hdr(kind: EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = hdr(EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
        let mut h = hdr(EntryType::Directory, mode, 0);
        b.append_data(&mut h, path, io::empty()).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: EntryType, path: &str, target: &str) {
        let mut h = hdr(kind, 0o777, 0);
        b.append_link(&mut h, path, target).unwrap();
    }

    fn run(data: Vec<u8>) -> Result<FileTree, TarError> {
        import(io::Cursor::new(data), &mut HashOnly).map(|(t, _)| t)
    }

    fn p(s: &str) -> FsPath {
        s.parse().unwrap()
    }

    #[test]
    fn normal_archive_with_root_hardlinks_symlinks_devices() {
        let data = tar_with(|b| {
            dir(b, "./", 0o750);
            dir(b, "./etc", 0o755);
            file(b, "./etc/passwd", b"root:x:0:0\n");
            link(b, EntryType::Link, "./etc/passwd-", "./etc/passwd");
            link(b, EntryType::Symlink, "./lnk", "/nowhere");
            let mut h = hdr(EntryType::Char, 0o620, 0);
            h.set_device_major(4).unwrap();
            h.set_device_minor(1).unwrap();
            b.append_data(&mut h, "./dev/tty1", io::empty()).unwrap();
            let mut h = hdr(EntryType::Fifo, 0o600, 0);
            b.append_data(&mut h, "./run/fifo", io::empty()).unwrap();
            file(b, "./.subd/objects/x", b"dropped");
            file(b, "./empty", b"");
        });
        let t = run(data).unwrap();
        assert_eq!(t.get(&FsPath::root()).unwrap().mode, 0o750);
        let pw = t.get(&p("/etc/passwd")).unwrap();
        assert_eq!(pw.hash, Some(ObjectId::of(b"root:x:0:0\n")));
        assert_eq!(t.entries[&p("/etc/passwd")], t.entries[&p("/etc/passwd-")]);
        assert_eq!(
            t.get(&p("/lnk")).unwrap().target.as_deref(),
            Some(&b"/nowhere"[..])
        );
        let tty = t.get(&p("/dev/tty1")).unwrap();
        assert_eq!(tty.kind, Kind::Char);
        assert_eq!(tty.rdev, libc::makedev(4, 1));
        // implicit parent directory
        assert_eq!(t.get(&p("/dev")).unwrap().mode, 0o755);
        assert_eq!(t.get(&p("/run/fifo")).unwrap().kind, Kind::Fifo);
        assert!(t.get(&p("/.subd")).is_none());
        assert!(t.get(&p("/.subd/objects/x")).is_none());
        assert_eq!(t.get(&p("/empty")).unwrap().hash, None);
    }

    #[test]
    fn default_root_and_late_directory_entry_sets_metadata() {
        let data = tar_with(|b| {
            file(b, "a/b", b"x");
            dir(b, "a", 0o700);
        });
        let t = run(data).unwrap();
        assert_eq!(t.get(&FsPath::root()).unwrap().mode, 0o755);
        assert_eq!(t.get(&p("/a")).unwrap().mode, 0o700);
    }

    fn expect_err(data: Vec<u8>, want: &str) {
        let e = run(data).expect_err("must fail").to_string();
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    }

    /// A pax `uid`/`gid` overrides the header's, and a malformed one (a sign, a fraction,
    /// a space) is refused rather than ignored in favour of the header's 0 (issue 9 #4).
    #[test]
    fn pax_owner_ids_are_applied_and_malformed_ones_refused() {
        let tar_with = |key: &str, value: &str| {
            let mut b = tar::Builder::new(Vec::new());
            b.append_pax_extensions([(key, value.as_bytes())]).unwrap();
            b.append_data(&mut hdr(EntryType::Regular, 0o4755, 1), "tool", &b"x"[..])
                .unwrap();
            b.into_inner().unwrap()
        };
        for (key, value, want) in [
            (
                "uid",
                "-1",
                "tar entry tool: pax uid \"-1\" is not a decimal number",
            ),
            (
                "uid",
                "4294967295.0",
                "pax uid \"4294967295.0\" is not a decimal number",
            ),
            (
                "gid",
                " 4294967295",
                "pax gid \" 4294967295\" is not a decimal number",
            ),
            ("uid", "4294967295", "uid 4294967295 is (uid_t)-1"),
            (
                "uid",
                "18446744073709551616",
                "pax uid 18446744073709551616 does not fit in 32 bits",
            ),
            (
                "gid",
                "4294967296",
                "gid 4294967296 does not fit in 32 bits",
            ),
        ] {
            expect_err(tar_with(key, value), want);
        }
        let t = run(tar_with("uid", "5000")).unwrap();
        assert_eq!(t.get(&p("/tool")).unwrap().uid, 5000);
        let t = run(tar_with("gid", "77")).unwrap();
        assert_eq!(t.get(&p("/tool")).unwrap().gid, 77);
    }

    /// A file that is not a tar and begins with terminal escape sequences: the error
    /// names it without passing the sequences to the operator's terminal.
    #[test]
    fn a_non_tar_error_never_carries_raw_control_characters() {
        let mut data = b"\x1b]0;PWNED\x07\x1b[31mRED\xe2\x80\xae".to_vec();
        data.resize(2048, b'A');
        let e = run(data).expect_err("must fail").to_string();
        assert!(e.contains("not a tar"), "{e:?}");
        assert!(
            !e.chars().any(model::image::is_hidden_char),
            "raw control character in {e:?}"
        );
    }

    /// Writes a raw header with an arbitrary path (the builder refuses `..`).
    fn raw_entry(b: &mut tar::Builder<Vec<u8>>, kind: EntryType, path: &[u8], link: &[u8]) {
        let mut h = hdr(kind, 0o644, 0);
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
    }

    #[test]
    fn bad_archives() {
        expect_err(
            tar_with(|b| raw_entry(b, EntryType::Regular, b"../etc/passwd", b"")),
            "`..` component",
        );
        expect_err(
            tar_with(|b| raw_entry(b, EntryType::Regular, b"/a/../../x", b"")),
            "`..` component",
        );
        expect_err(
            tar_with(|b| {
                link(b, EntryType::Link, "a", "b");
                file(b, "b", b"x");
            }),
            "not earlier in the archive",
        );
        expect_err(
            tar_with(|b| {
                link(b, EntryType::Symlink, "etc", "/etc");
                file(b, "etc/passwd", b"x");
            }),
            "written through the symlink /etc",
        );
        expect_err(
            tar_with(|b| {
                file(b, "a", b"1");
                file(b, "a", b"2");
            }),
            "appears twice",
        );
        expect_err(
            tar_with(|b| {
                dir(b, "d", 0o755);
                dir(b, "d", 0o755);
            }),
            "appears twice",
        );
        expect_err(
            tar_with(|b| {
                file(b, "f", b"1");
                file(b, "f/x", b"2");
            }),
            "is not a directory",
        );
        expect_err(
            tar_with(|b| {
                dir(b, "d", 0o755);
                link(b, EntryType::Link, "h", "d");
            }),
            "hardlink to the directory",
        );
        expect_err(
            b"hello, I am not a tar archive at all".repeat(40),
            "not a tar",
        );
        for (uid, gid, want) in [
            (
                4294967295u64,
                0u64,
                "tar entry opt/tool: uid 4294967295 is (uid_t)-1",
            ),
            (
                0,
                4294967295,
                "tar entry opt/tool: gid 4294967295 is (uid_t)-1",
            ),
            (
                1 << 32,
                0,
                "tar entry opt/tool: uid 4294967296 does not fit in 32 bits",
            ),
        ] {
            expect_err(
                tar_with(|b| {
                    let mut h = hdr(EntryType::Regular, 0o4755, 1);
                    h.set_uid(uid);
                    h.set_gid(gid);
                    b.append_data(&mut h, "opt/tool", &b"x"[..]).unwrap();
                }),
                want,
            );
        }
        // A tiny zip (one stored file "a" holding "x"), shorter than one tar block.
        expect_err(TINY_ZIP.to_vec(), "not a tar archive: it is a zip archive");
        expect_err(b"BZh91AY&SY".to_vec(), "it is bzip2-compressed");
        expect_err(
            b"just some text, not an archive, but longer than a name: 0123456789 abcdefghijklmnopqrstuvwxyz 0123456789 abcdefghijklmnopqrstuvwxyz".to_vec(),
            "not a tar archive: its first 131 bytes are not a tar header",
        );
        expect_err(Vec::new(), "no entries");
        expect_err(vec![0u8; 10240], "no entries");
    }

    /// A zip archive holding one stored file `a` with the content `x`.
    pub(crate) const TINY_ZIP: &[u8] = b"PK\x03\x04\x14\x00\x00\x00\x00\x00\x00\x00\x21\x00\x83\x16\xdc\x8c\x01\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00ax\
PK\x01\x02\x14\x03\x14\x00\x00\x00\x00\x00\x00\x00\x21\x00\x83\x16\xdc\x8c\x01\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x80\x01\x00\x00\x00\x00a\
PK\x05\x06\x00\x00\x00\x00\x01\x00\x01\x00\x2f\x00\x00\x00\x20\x00\x00\x00\x00\x00";

    /// A short text file is named as not a tar, not as a truncated one (issue 9).
    #[test]
    fn a_short_text_file_is_not_a_tar() {
        expect_err(
            b"hello\n".to_vec(),
            "not a tar archive: it is 6 bytes without the NUL padding every tar header has",
        );
    }

    #[test]
    fn truncations() {
        let good = tar_with(|b| file(b, "big", &vec![7u8; 100_000]));
        run(good.clone()).unwrap();
        // inside the content
        expect_err(good[..50_000].to_vec(), "truncated");
        // inside a header
        expect_err(good[..100].to_vec(), "truncated");
        // at an entry boundary, without the end marker
        let boundary = 512 + 100_000usize.div_ceil(512) * 512;
        expect_err(good[..boundary].to_vec(), "truncated");
        // gzip cut anywhere
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &good).unwrap();
        let gz = gz.finish().unwrap();
        run(gz.clone()).unwrap();
        for cut in [10, gz.len() / 2, gz.len() - 4] {
            assert!(run(gz[..cut].to_vec()).is_err(), "gzip cut at {cut}");
        }
        let mut corrupt = gz.clone();
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 0xff;
        assert!(run(corrupt).is_err());
    }

    #[test]
    fn non_utf8_names_survive() {
        let data = tar_with(|b| raw_entry(b, EntryType::Regular, b"caf\xe9", b""));
        let t = run(data).unwrap();
        assert!(t.get(&FsPath::new(b"/caf\xe9".to_vec()).unwrap()).is_some());
    }

    #[test]
    fn gzip_detected_by_content_and_matches_plain() {
        let plain = tar_with(|b| {
            file(b, "x", b"hello");
            link(b, EntryType::Symlink, "y", "x");
        });
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        io::Write::write_all(&mut gz, &plain).unwrap();
        assert_eq!(run(plain).unwrap(), run(gz.finish().unwrap()).unwrap());
    }

    /// Regression (cargo fuzz, tar_import, leak-29a052f9…): a failed gzip import left the
    /// read-ahead thread running after `import` returned.
    #[test]
    fn fuzz_regression_read_ahead_thread_is_joined() {
        let data = include_bytes!("../../testdata/tarballs/fuzz-leak-read-ahead.bin");
        if let Ok(t) = run(data.to_vec()) {
            t.validate().unwrap();
        }
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        struct Endless(Arc<AtomicBool>);
        impl Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                buf.fill(1);
                Ok(buf.len())
            }
        }
        impl Drop for Endless {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let gone = Arc::new(AtomicBool::new(false));
        let mut r = read_ahead(Box::new(Endless(gone.clone())));
        let mut buf = [0u8; 10];
        r.read_exact(&mut buf).unwrap();
        drop(r);
        assert!(
            gone.load(Ordering::SeqCst),
            "the reader thread ended before drop returned"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Arbitrary bytes never panic the importer.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = run(data);
        }

        /// Random valid archives import to exactly the files put in.
        #[test]
        fn random_archives_round_trip(files in proptest::collection::btree_map("[a-z]{1,3}(/[a-z]{1,3}){0,2}", proptest::collection::vec(any::<u8>(), 0..300), 1..20)) {
            // Drop names that are a prefix directory of another name.
            let names: Vec<&String> = files.keys().collect();
            let leaves: Vec<(&String, &Vec<u8>)> = files.iter().filter(|(k, _)| !names.iter().any(|n| n.starts_with(&format!("{k}/")))).collect();
            let data = tar_with(|b| for (k, v) in &leaves { file(b, k, v) });
            let t = run(data).unwrap();
            t.validate().unwrap();
            for (k, v) in leaves {
                let ino = t.get(&p(&format!("/{k}"))).unwrap();
                prop_assert_eq!(ino.size, v.len() as u64);
                prop_assert_eq!(ino.hash, if v.is_empty() { None } else { Some(ObjectId::of(v)) });
            }
        }

        /// Mutating one byte of a valid archive either fails cleanly or yields a valid tree.
        #[test]
        fn mutated_archives_fail_cleanly(pos in 0usize..3072, val in any::<u8>()) {
            let mut data = tar_with(|b| {
                dir(b, "./", 0o755);
                file(b, "a/b", b"hello");
                link(b, EntryType::Link, "a/c", "a/b");
                link(b, EntryType::Symlink, "s", "a");
            });
            let pos = pos % data.len();
            data[pos] = val;
            if let Ok(t) = run(data) { t.validate().unwrap() }
        }
    }
}
