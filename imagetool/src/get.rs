//! `imagetool get NAME DIR`: unpack an image into a new or empty directory, with owners,
//! modes, mtimes, hardlinks, symlinks, devices and FIFOs. Objects arrive in one streamed
//! `GetObjects` per batch and are verified against their SHA-512 while written.

use futures_util::TryStreamExt;
use model::frame;
use model::image::Kind;
use model::{FileTree, FsPath, Image, ObjectId};
use rustix::fs::{FileType, Mode, Timespec, Timestamps, CWD};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use tokio_util::io::{StreamReader, SyncIoBridge};
use wire::client::{ClientError, ImageServerClient};

/// Why an image could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// `GetImage` failed.
    #[error("getting image {name}")]
    GetImage { name: String, source: ClientError },
    /// The image's tree is not one that can be unpacked.
    #[error("image {name} has an invalid tree")]
    InvalidTree {
        name: String,
        source: model::image::TreeError,
    },
    /// The target directory exists and holds something.
    #[error("{}: directory is not empty", .0.display())]
    NotEmpty(PathBuf),
    /// The target directory (or `var/lib` in it) could not be looked at.
    #[error("{}", .0.display())]
    Dir(PathBuf, #[source] io::Error),
    /// A path could not be created (or its content written).
    #[error("creating {}", .0.display())]
    Create(PathBuf, #[source] io::Error),
    /// A file could not be written (a further name of an object's content, or
    /// `var/lib/initial-image`).
    #[error("writing {}", .0.display())]
    Write(PathBuf, #[source] io::Error),
    /// A hardlink could not be made.
    #[error("linking {path}")]
    Link { path: FsPath, source: io::Error },
    /// Owner, mode or mtime could not be set.
    #[error("setting metadata of {}", .0.display())]
    SetMeta(PathBuf, #[source] io::Error),
    /// `GetObjects` failed.
    #[error("fetching objects")]
    Fetch { source: ClientError },
    /// The object stream could not be read, or an object not written.
    #[error(transparent)]
    Stream(#[from] io::Error),
    /// The object stream ended before an object.
    #[error("object stream ended before object {0}")]
    StreamEnded(ObjectId),
    /// The object stream ended inside an object.
    #[error("object stream truncated inside object {0}")]
    Truncated(ObjectId),
    /// The server sent another object than the one expected next.
    #[error("server sent object {got} where {want} was expected")]
    WrongObject {
        got: Box<ObjectId>,
        want: Box<ObjectId>,
    },
    /// An object's bytes do not hash to its id.
    #[error("object {0} arrived corrupted (hash mismatch)")]
    Corrupted(ObjectId),
    /// A blocking task panicked.
    #[error(transparent)]
    Thread(#[from] tokio::task::JoinError),
}

/// The error `f` (a variant) makes of an I/O error at `path`, for `map_err`.
fn at<'a>(
    f: fn(PathBuf, io::Error) -> GetError,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> GetError + 'a {
    move |source| f(path.to_path_buf(), source)
}

/// Most objects per `GetObjects` request.
pub const GET_BATCH: usize = 4096;

/// Unpacks `name` into `dir`; returns the image.
pub async fn get(client: &ImageServerClient, name: &str, dir: &Path) -> Result<Image, GetError> {
    let image = client
        .get_image(name)
        .await
        .map_err(|source| GetError::GetImage {
            name: name.to_string(),
            source,
        })?;
    image
        .tree
        .validate()
        .map_err(|source| GetError::InvalidTree {
            name: name.to_string(),
            source,
        })?;
    prepare_dir(dir)?;
    let tree = image.tree.clone();
    let d = dir.to_path_buf();
    let tree =
        tokio::task::spawn_blocking(move || create_skeleton(&d, &tree).map(|()| tree)).await??;
    // Inodes needing each object: the first path of each inode.
    let links = tree.links();
    let mut by_object: HashMap<ObjectId, Vec<u64>> = HashMap::new();
    for (ino, i) in &tree.inodes {
        if let (Kind::File, Some(h)) = (i.kind, i.hash) {
            by_object.entry(h).or_default().push(*ino);
        }
    }
    let ids: Vec<ObjectId> = by_object.keys().copied().collect();
    for chunk in ids.chunks(GET_BATCH) {
        let resp = client
            .get_objects(chunk)
            .await
            .map_err(|source| GetError::Fetch { source })?;
        let stream = resp.bytes_stream().map_err(io::Error::other);
        let mut r = SyncIoBridge::new(StreamReader::new(stream));
        let want: Vec<(ObjectId, Vec<PathBuf>)> = chunk
            .iter()
            .map(|id| {
                let paths = by_object[id]
                    .iter()
                    .map(|ino| dir.join(links[ino][0].relative_os()))
                    .collect();
                (*id, paths)
            })
            .collect();
        tokio::task::spawn_blocking(move || receive(&mut r, want)).await??;
    }
    let d = dir.to_path_buf();
    let n = name.to_string();
    tokio::task::spawn_blocking(move || {
        write_initial_image(&d, &n)?;
        finish(&d, &tree)
    })
    .await??;
    Ok(image)
}

/// Where `get` records the image a directory was unpacked from, as Dominator's does.
pub const INITIAL_IMAGE: &str = "var/lib/initial-image";

/// Writes `DIR/var/lib/initial-image` (the image name and a newline, mode 0644; temp +
/// fsync + rename), creating `var/lib` if the image lacks it. Skipped with a warning when
/// the image has `/var` or `/var/lib` as something other than a directory (a symlink must
/// not lead the write out of `DIR`).
fn write_initial_image(dir: &Path, name: &str) -> Result<(), GetError> {
    let mut d = dir.to_path_buf();
    for part in ["var", "lib"] {
        d.push(part);
        match std::fs::symlink_metadata(&d) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                eprintln!(
                    "imagetool: warning: {} is not a directory: {INITIAL_IMAGE} not written",
                    d.display()
                );
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir(&d).map_err(at(GetError::Create, &d))?;
            }
            Err(source) => return Err(GetError::Dir(d, source)),
        }
    }
    let path = dir.join(INITIAL_IMAGE);
    let tmp = disk::fsutil::temp_path(&path);
    let written = (|| -> io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        f.write_all(format!("{name}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        disk::fsutil::fsync_dir(&d)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(at(GetError::Write, &path))
}

/// Makes sure `dir` exists and is empty.
fn prepare_dir(dir: &Path) -> Result<(), GetError> {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(GetError::NotEmpty(dir.to_path_buf()));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(at(GetError::Create, dir))
        }
        Err(source) => Err(GetError::Dir(dir.to_path_buf(), source)),
    }
}

/// Creates directories, symlinks, devices, FIFOs and empty files (everything but content).
fn create_skeleton(dir: &Path, tree: &FileTree) -> Result<(), GetError> {
    let mut done: HashMap<u64, PathBuf> = HashMap::new();
    for (p, ino) in &tree.entries {
        if p.is_root() {
            continue;
        }
        let i = &tree.inodes[ino];
        let full = dir.join(p.relative_os());
        let ctx = |source| GetError::Create(full.clone(), source);
        if let Some(first) = done.get(ino) {
            if i.kind != Kind::File || i.hash.is_none() {
                std::fs::hard_link(first, &full).map_err(ctx)?;
            }
            continue;
        }
        match i.kind {
            Kind::Dir => std::fs::create_dir(&full).map_err(ctx)?,
            Kind::File => {
                if i.hash.is_none() {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&full)
                        .map_err(ctx)?;
                }
            }
            Kind::Symlink => std::os::unix::fs::symlink(
                std::ffi::OsStr::from_bytes(i.target.as_deref().unwrap_or_default()),
                &full,
            )
            .map_err(ctx)?,
            Kind::Char | Kind::Block | Kind::Fifo => {
                let ft = match i.kind {
                    Kind::Char => FileType::CharacterDevice,
                    Kind::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                rustix::fs::mknodat(CWD, &full, ft, Mode::from_raw_mode(0o600), i.rdev as _)
                    .map_err(io::Error::from)
                    .map_err(ctx)?;
            }
        }
        done.insert(*ino, full);
    }
    Ok(())
}

/// Writes each received object to its paths, verifying its hash.
fn receive(r: &mut impl Read, want: Vec<(ObjectId, Vec<PathBuf>)>) -> Result<(), GetError> {
    let mut buf = vec![0u8; 256 * 1024];
    for (id, paths) in want {
        let (got, len) = frame::read_header(r)?.ok_or(GetError::StreamEnded(id))?;
        if got != id {
            return Err(GetError::WrongObject {
                got: Box::new(got),
                want: Box::new(id),
            });
        }
        let first = &paths[0];
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(first)
            .map_err(at(GetError::Create, first))?;
        let mut h = model::hash::ObjectHasher::new();
        let mut left = len;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let n = r.read(&mut buf[..want])?;
            if n == 0 {
                return Err(GetError::Truncated(id));
            }
            h.update(&buf[..n]);
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        if h.finish().0 != id {
            return Err(GetError::Corrupted(id));
        }
        for other in &paths[1..] {
            std::fs::copy(first, other).map_err(at(GetError::Write, other))?;
        }
    }
    Ok(())
}

/// Hardlinks the remaining names of each content file, then sets owners, modes and mtimes
/// (directories last, deepest first, so a read-only directory is filled before it closes).
fn finish(dir: &Path, tree: &FileTree) -> Result<(), GetError> {
    let links = tree.links();
    for (ino, paths) in &links {
        let i = &tree.inodes[ino];
        if i.kind == Kind::File && i.hash.is_some() {
            let first = dir.join(paths[0].relative_os());
            for p in &paths[1..] {
                std::fs::hard_link(&first, dir.join(p.relative_os())).map_err(|source| {
                    GetError::Link {
                        path: p.clone(),
                        source,
                    }
                })?;
            }
        }
    }
    let root = rustix::process::geteuid().is_root();
    let mut warned = false;
    let mut dirs: Vec<(&FsPath, u64)> = Vec::new();
    for (ino, paths) in &links {
        let i = &tree.inodes[ino];
        if i.kind == Kind::Dir {
            dirs.extend(paths.iter().map(|p| (p, *ino)));
            continue;
        }
        let full = dir.join(paths[0].relative_os());
        set_meta(&full, i, root, &mut warned)?;
    }
    dirs.sort();
    for (p, ino) in dirs.into_iter().rev() {
        let full = if p.is_root() {
            dir.to_path_buf()
        } else {
            dir.join(p.relative_os())
        };
        set_meta(&full, &tree.inodes[&ino], root, &mut warned)?;
    }
    Ok(())
}

/// Sets the owner (if root; a warning otherwise), mode and mtime of `full` to `i`'s.
fn set_meta(full: &Path, i: &model::Inode, root: bool, warned: &mut bool) -> Result<(), GetError> {
    use rustix::fs::{AtFlags, Gid, Uid};
    let ctx = |e: rustix::io::Errno| GetError::SetMeta(full.to_path_buf(), e.into());
    let owned = rustix::fs::chownat(
        CWD,
        full,
        Some(Uid::from_raw(i.uid)),
        Some(Gid::from_raw(i.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    );
    if let Err(e) = owned {
        if root {
            return Err(ctx(e));
        }
        if !*warned {
            eprintln!("imagetool: warning: not root: owners are not set");
            *warned = true;
        }
    }
    if i.kind != Kind::Symlink {
        rustix::fs::chmodat(CWD, full, Mode::from_raw_mode(i.mode), AtFlags::empty())
            .map_err(ctx)?;
    }
    if i.keeps_mtime() {
        let t = Timespec {
            tv_sec: i.mtime.sec,
            tv_nsec: i.mtime.nsec as _,
        };
        rustix::fs::utimensat(
            CWD,
            full,
            &Timestamps {
                last_access: t,
                last_modification: t,
            },
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(ctx)?;
    }
    Ok(())
}
