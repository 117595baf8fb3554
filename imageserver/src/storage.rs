//! The one storage interface of the imageserver's objects, with two back-ends: the local
//! directory (`disk::objectstore`, the default) and an S3 bucket (`s3`). The catalogue
//! and the object streams see only this: write (hash while streaming, verify, commit),
//! list, size, read and remove by `ObjectId`.
//!
//! Both keep the same promise: nothing unverified is ever visible under an object's name.
//! A writer checks length and SHA-512 in `finish`; only a verified `Pending` object can be
//! committed (renamed into place, or put / its multipart upload completed in S3).

use crate::s3::{S3Objects, S3Pending, S3Writer};
use disk::objectstore::{ObjectStore, ObjectWriter, PendingObject, StoreError};
use model::ObjectId;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::SystemTime;

/// Where the objects live.
#[derive(Clone)]
pub enum Objects {
    /// `DATA/objects/` on the local file-system.
    Local(ObjectStore),
    /// `s3://BUCKET/PREFIX/objects/` (`--object-store`).
    S3(Arc<S3Objects>),
}

/// An object being written: hashed as it streams, checked by `finish`.
pub enum Writer {
    Local(ObjectWriter),
    S3(S3Writer),
}

/// A verified object not yet visible under its name (`Objects::commit` makes it so).
pub enum Pending {
    Local(PendingObject),
    S3(S3Pending),
}

/// One stored object as listed: id, size and when it was last written.
pub struct Listed {
    pub id: ObjectId,
    pub size: u64,
    pub modified: Option<SystemTime>,
}

impl Pending {
    pub fn id(&self) -> ObjectId {
        match self {
            Pending::Local(p) => p.id,
            Pending::S3(p) => p.id,
        }
    }
    pub fn size(&self) -> u64 {
        match self {
            Pending::Local(p) => p.len,
            Pending::S3(p) => p.len,
        }
    }
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Writer::Local(w) => w.write(buf),
            Writer::S3(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Writer::Local(w) => w.flush(),
            Writer::S3(w) => w.flush(),
        }
    }
}

impl Writer {
    /// Checks length and hash; on success the object awaits `Objects::commit`. On failure
    /// nothing is left under the object's name (the temp file removed, the multipart
    /// upload aborted).
    pub fn finish(self) -> Result<Pending, StoreError> {
        match self {
            Writer::Local(w) => w.finish().map(Pending::Local),
            Writer::S3(w) => w.finish().map(Pending::S3),
        }
    }
}

impl Objects {
    /// The local store, if that is the back-end.
    pub fn local(&self) -> Option<&ObjectStore> {
        match self {
            Objects::Local(s) => Some(s),
            Objects::S3(_) => None,
        }
    }

    /// Where the objects are, for messages and the status page.
    pub fn describe(&self) -> String {
        match self {
            Objects::Local(s) => s.dir().display().to_string(),
            Objects::S3(s) => s.url(),
        }
    }

    /// Starts writing an object expected to hash to `id` and be `len` bytes long.
    pub fn writer(&self, id: ObjectId, len: u64) -> Result<Writer, StoreError> {
        match self {
            Objects::Local(s) => s.writer(id, len).map(Writer::Local),
            Objects::S3(s) => Ok(Writer::S3(s.writer(id, len))),
        }
    }

    /// Makes verified objects durable and visible under their names.
    pub fn commit(&self, pending: Vec<Pending>) -> Result<(), StoreError> {
        match self {
            Objects::Local(s) => {
                let local = pending.into_iter().filter_map(|p| match p {
                    Pending::Local(p) => Some(p),
                    Pending::S3(_) => None,
                });
                s.commit(local.collect()).map(|_| ())
            }
            Objects::S3(s) => {
                let remote = pending.into_iter().filter_map(|p| match p {
                    Pending::S3(p) => Some(p),
                    Pending::Local(_) => None,
                });
                s.commit(remote.collect())
            }
        }
    }

    /// Every stored object.
    pub fn list(&self) -> Result<Vec<Listed>, StoreError> {
        match self {
            Objects::Local(s) => Ok(s
                .list()?
                .into_iter()
                .map(|(id, size)| Listed {
                    id,
                    size,
                    modified: std::fs::metadata(s.path_of(&id))
                        .and_then(|m| m.modified())
                        .ok(),
                })
                .collect()),
            Objects::S3(s) => s.list(),
        }
    }

    /// The stored size of `id`.
    pub fn size_of(&self, id: &ObjectId) -> io::Result<u64> {
        match self {
            Objects::Local(s) => std::fs::metadata(s.path_of(id)).map(|m| m.len()),
            Objects::S3(s) => s.size_of(id),
        }
    }

    /// Opens `id` for reading (a blocking reader: call from a blocking thread).
    pub fn open(&self, id: &ObjectId) -> io::Result<Box<dyn Read + Send>> {
        match self {
            Objects::Local(s) => Ok(Box::new(s.open_object(id)?)),
            Objects::S3(s) => s.open_object(id),
        }
    }

    /// A local object's file, opened without blocking (`ObjectStore::open_object_cached`);
    /// `WouldBlock` when that would need a disk read, and always for S3.
    pub fn open_cached(&self, id: &ObjectId) -> io::Result<std::fs::File> {
        match self {
            Objects::Local(s) => s.open_object_cached(id),
            Objects::S3(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Removes `id` (absent is fine).
    pub fn remove(&self, id: &ObjectId) -> Result<(), StoreError> {
        match self {
            Objects::Local(s) => s.remove(id),
            Objects::S3(s) => s.remove(id),
        }
    }

    /// Records, best effort, that `id` became unreferenced at `t` (the local back-end keeps
    /// it as the file's mtime, for the deletion order after a restart; S3 cannot).
    pub fn mark_unreferenced(&self, id: &ObjectId, t: SystemTime) {
        if let Objects::Local(s) = self {
            if let Ok(f) = std::fs::File::options().write(true).open(s.path_of(id)) {
                let _ = f.set_modified(t);
            }
        }
    }
}
