//! `imagetool get NAME DIR`: unpack an image into a new or empty directory, with owners,
//! modes, mtimes, hardlinks, symlinks, devices and FIFOs. Objects arrive in one streamed
//! `GetObjects` per batch and are verified against their SHA-512 while written.

use anyhow::{bail, Context};
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
use wire::client::ImageServerClient;

/// Most objects per `GetObjects` request.
pub const GET_BATCH: usize = 4096;

/// Unpacks `name` into `dir`; returns the image.
pub async fn get(client: &ImageServerClient, name: &str, dir: &Path) -> anyhow::Result<Image> {
    let image = client
        .get_image(name)
        .await
        .with_context(|| format!("getting image {name}"))?;
    image
        .tree
        .validate()
        .with_context(|| format!("image {name} has an invalid tree"))?;
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
            .context("fetching objects")?;
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
fn write_initial_image(dir: &Path, name: &str) -> anyhow::Result<()> {
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
                std::fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("{}", d.display())),
        }
    }
    let path = dir.join(INITIAL_IMAGE);
    let ctx = || format!("writing {}", path.display());
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
    written.with_context(ctx)
}

fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                bail!("{}: directory is not empty", dir.display());
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
        }
        Err(e) => Err(e).with_context(|| format!("{}", dir.display())),
    }
}

/// Creates directories, symlinks, devices, FIFOs and empty files (everything but content).
fn create_skeleton(dir: &Path, tree: &FileTree) -> anyhow::Result<()> {
    let mut done: HashMap<u64, PathBuf> = HashMap::new();
    for (p, ino) in &tree.entries {
        if p.is_root() {
            continue;
        }
        let i = &tree.inodes[ino];
        let full = dir.join(p.relative_os());
        let ctx = || format!("creating {}", full.display());
        if let Some(first) = done.get(ino) {
            if i.kind != Kind::File || i.hash.is_none() {
                std::fs::hard_link(first, &full).with_context(ctx)?;
            }
            continue;
        }
        match i.kind {
            Kind::Dir => std::fs::create_dir(&full).with_context(ctx)?,
            Kind::File => {
                if i.hash.is_none() {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&full)
                        .with_context(ctx)?;
                }
            }
            Kind::Symlink => std::os::unix::fs::symlink(
                std::ffi::OsStr::from_bytes(i.target.as_deref().unwrap_or_default()),
                &full,
            )
            .with_context(ctx)?,
            Kind::Char | Kind::Block | Kind::Fifo => {
                let ft = match i.kind {
                    Kind::Char => FileType::CharacterDevice,
                    Kind::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                rustix::fs::mknodat(CWD, &full, ft, Mode::from_raw_mode(0o600), i.rdev as _)
                    .map_err(io::Error::from)
                    .with_context(ctx)?;
            }
        }
        done.insert(*ino, full);
    }
    Ok(())
}

/// Writes each received object to its paths, verifying its hash.
fn receive(r: &mut impl Read, want: Vec<(ObjectId, Vec<PathBuf>)>) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    for (id, paths) in want {
        let (got, len) = frame::read_header(r)?
            .with_context(|| format!("object stream ended before object {id}"))?;
        if got != id {
            bail!("server sent object {got} where {id} was expected");
        }
        let first = &paths[0];
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(first)
            .with_context(|| format!("creating {}", first.display()))?;
        let mut h = model::hash::ObjectHasher::new();
        let mut left = len;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let n = r.read(&mut buf[..want])?;
            if n == 0 {
                bail!("object stream truncated inside object {id}");
            }
            h.update(&buf[..n]);
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        if h.finish().0 != id {
            bail!("object {id} arrived corrupted (hash mismatch)");
        }
        for other in &paths[1..] {
            std::fs::copy(first, other).with_context(|| format!("writing {}", other.display()))?;
        }
    }
    Ok(())
}

/// Hardlinks the remaining names of each content file, then sets owners, modes and mtimes
/// (directories last, deepest first, so a read-only directory is filled before it closes).
fn finish(dir: &Path, tree: &FileTree) -> anyhow::Result<()> {
    let links = tree.links();
    for (ino, paths) in &links {
        let i = &tree.inodes[ino];
        if i.kind == Kind::File && i.hash.is_some() {
            let first = dir.join(paths[0].relative_os());
            for p in &paths[1..] {
                std::fs::hard_link(&first, dir.join(p.relative_os()))
                    .with_context(|| format!("linking {p}"))?;
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

fn set_meta(full: &Path, i: &model::Inode, root: bool, warned: &mut bool) -> anyhow::Result<()> {
    use rustix::fs::{AtFlags, Gid, Uid};
    let ctx = || format!("setting metadata of {}", full.display());
    let owned = rustix::fs::chownat(
        CWD,
        full,
        Some(Uid::from_raw(i.uid)),
        Some(Gid::from_raw(i.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    );
    if let Err(e) = owned {
        if root {
            return Err(io::Error::from(e)).with_context(ctx);
        }
        if !*warned {
            eprintln!("imagetool: warning: not root: owners are not set");
            *warned = true;
        }
    }
    if i.kind != Kind::Symlink {
        rustix::fs::chmodat(CWD, full, Mode::from_raw_mode(i.mode), AtFlags::empty())
            .map_err(io::Error::from)
            .with_context(ctx)?;
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
        .map_err(io::Error::from)
        .with_context(ctx)?;
    }
    Ok(())
}
