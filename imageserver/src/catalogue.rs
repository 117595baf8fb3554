//! The catalogue: which images and objects the server holds, on disk and in memory.
//!
//! Layout under the data directory:
//! - `.lock`: held (`flock`) while a server has the directory open; one server per
//!   directory.
//! - `objects/<hh>/<126 hex>`: the content-addressed `disk::objectstore::ObjectStore`
//!   (`<hh>` is the first byte of the SHA-512; stores made by earlier versions keep their
//!   `<hh>/<hh>/<124 hex>` layout). With `--object-store s3://…` the objects are in the
//!   bucket instead (`storage::Objects::S3`, see `s3`), and so are the images: each is put
//!   there before its local copy appears, tombstones too; `images/` is then a copy, filled
//!   from the bucket at open and by `refresh_from_bucket`.
//! - `images/<name>/.image`: one JSON `Image` per image name. Image names never have a
//!   component starting with `.`, so `.image` never collides with a name, and an image
//!   `a/b` can coexist with `a/b/c`. A zero-length `.image` is a tombstone: the name was
//!   deleted and is never reused.
//! - `images/<name>/.image.sha512`: the SHA-512 (hex) of the `.image` bytes. Written before
//!   the `.image` is renamed into place, so an image is never visible without it; a
//!   `.image` without one was stored by an earlier version and is served unverified. An
//!   image whose bytes do not match is *corrupt*: listed on the status page and in
//!   metrics, and `GetImage` of it is an error, never the damaged tree. A tombstone has
//!   none (it is removed when the image is deleted). While an image's expiry is changed
//!   (the only edit an image ever gets) it holds the new sum and the old, one per line,
//!   so the file matches whichever `.image` a crash leaves.
//! - `images/<name>/.image.expired`: beside a tombstone, says the image expired rather
//!   than was deleted (`GetImage` then says so).
//!
//! Expiry: an image whose `expires_at` has passed is *due*: `list_images`, `image_json`
//! and `image_exists` treat it as gone at once (checked lazily at every call), and
//! `expire_due` (run at open and by the server's once-a-second sweep) tombstones it as a
//! deletion does, with the `.image.expired` marker, dropping its references.
//!
//! Errors are `CatalogueError`s, classified where they are made (not found, already
//! exists, invalid request, corrupt, storage); `rpc` turns them into HTTP statuses.
//!
//! An image file is written temp + fsync + rename (+ fsync of the directories up to
//! `images/`); objects are written to temp files while hashed and renamed into place in
//! batches between two `syncfs` (`ObjectStore::commit`). So after a crash a restart sees
//! each image and object either whole or not at all, and removes the temp files left. In memory the catalogue keeps the
//! names (live, deleted or being written), every object's size and reference count, and
//! when each unreferenced object became unreferenced (persisted as the object file's mtime,
//! so the oldest-first order survives restarts). Image bodies stay on disk.
//!
//! Pins: an object that arrives through `AddObjects` is *held* while its upload stream is
//! open and pinned for a grace period after the stream ends; an object `CheckObjects`
//! reports present is pinned for the grace period too. Unreferenced-object deletion skips
//! held and pinned objects, so a concurrent `delunrefobj` cannot delete what an `add` has
//! just sent or been told is there before its `AddImage` arrives. Pins live in memory;
//! after a restart an object stored less than the grace period ago is pinned for the rest
//! of it (by its mtime).
//!
//! Who may touch an object file when. The index decides, under its lock:
//! - An upload renames a verified temp file into place (or finds the object already
//!   there) only while the object is marked *committing* (`commit_objects`). It marks it
//!   only once no deletion of that object is under way, waiting for one to finish.
//! - Unreferenced-object deletion removes a file only while the object is marked
//!   *deleting*: taken out of the index (so every RPC sees it absent) and put in the
//!   deleting set, which it chooses only among collectable objects no upload is committing.
//!   It unmarks each batch of objects once their files are gone, and wakes the waiting
//!   uploads, which then store the object afresh.
//! - Readers (`GetObjects`) open files without marks: an object deleted under them is
//!   missing or short, which `GetObjects` reports as an error, never as a short success.
//!
//! So a deletion and an upload of the same object never overlap: an upload that arrives
//! during the deletion writes the object again after it, and the index never lists an
//! object whose file is gone.
//!
//! The catalogue is guarded by a std `Mutex` whose critical sections are short and never
//! span an `.await` or a file write; callers run it on blocking threads. Waiting for a
//! deletion uses a `Condvar` on that mutex.

use crate::storage::{Objects, Pending};
use disk::fsutil::{fsync_dir, write_atomic, TEMP_SUFFIX};
use disk::objectstore::{ObjectStore, StoreError};
use model::expiry::ExpiryError;
use model::{Image, ImageName, ObjectId};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long objects stay pinned after their upload stream ends or `CheckObjects` reports
/// them, unless configured otherwise. Dominator uses ~11 s; ours is longer because a large
/// tarball add uploads its first batches well before it reaches `AddImage`.
pub const DEFAULT_PIN_GRACE: Duration = Duration::from_secs(60);

/// File name of an image inside its name's directory.
pub const IMAGE_FILE: &str = ".image";

/// File name of an image's checksum (hex SHA-512 of the image file) beside it.
pub const CHECKSUM_FILE: &str = ".image.sha512";

/// File name of the marker beside a tombstone saying the image expired.
pub const EXPIRED_FILE: &str = ".image.expired";

/// A problem opening the data directory.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt image file: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(transparent)]
    Locked(#[from] disk::fsutil::LockError),
}

/// Why a catalogue operation failed, classified where it is made. Each variant's text is
/// the one line a client sees; `rpc` maps each variant to its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    /// Not found: no live image has this name.
    #[error("image {0} does not exist")]
    ImageNotFound(ImageName),
    /// Not found: objects asked for are not stored (`first`, and how many are missing).
    #[error("{}", unknown_objects(.first, *.count))]
    ObjectsNotFound { first: ObjectId, count: usize },
    /// Already exists: the name holds an image (or one is being added under it).
    #[error("image {0} already exists")]
    AlreadyExists(ImageName),
    /// Already exists: the name was deleted, and names are never reused.
    #[error("image {0} was deleted; image names are never reused")]
    NameDeleted(ImageName),
    /// Gone: the image expired (its name is never reused either).
    #[error("image {0} expired")]
    ImageExpired(ImageName),
    /// Already exists: the name's image expired, and names are never reused.
    #[error("image {0} expired; image names are never reused")]
    NameExpired(ImageName),
    /// Invalid request: an expiry too soon, or one that would shorten the image's life.
    #[error("image {name}: {source}")]
    InvalidExpiry {
        name: ImageName,
        source: ExpiryError,
    },
    /// Already exists: another imageserver over the same bucket was adding this name at
    /// the same moment (`s3::S3Objects::claim_name`); neither may have it yet.
    #[error("image {0} is being added through another imageserver at the same time; retry")]
    NameContended(ImageName),
    /// Invalid request: the image's tree is not one a machine could hold.
    #[error("image {name}: invalid tree: {source}")]
    InvalidTree {
        name: ImageName,
        source: model::image::TreeError,
    },
    /// Invalid request: the image's hooks have a bad or repeated name.
    #[error("image {name}: invalid hooks: {source}")]
    InvalidHooks {
        name: ImageName,
        source: model::hooks::HookError,
    },
    /// Invalid request: the image refers to objects not stored (`first`, and how many).
    #[error("object {first} is not available{}", how_many_missing(*.count))]
    InvalidMissingObjects { first: ObjectId, count: usize },
    /// Invalid request: the image gives an object a size other than its stored one.
    #[error("object {id} has {stored} bytes but the image says {claimed}")]
    InvalidObjectSize {
        id: ObjectId,
        stored: u64,
        claimed: u64,
    },
    /// Invalid request: a share of unreferenced objects over 100 %.
    #[error("percentage {0} is over 100")]
    InvalidPercentage(u8),
    /// Corrupt: the image's file is damaged (`damage` says how); it is never served.
    #[error("image {name} is corrupt: {damage}")]
    CorruptImage { name: ImageName, damage: String },
    /// Corrupt: an indexed object's file is shorter than recorded.
    #[error("object {id} is damaged: its file has {len} of {size} bytes")]
    CorruptObject { id: ObjectId, len: u64, size: u64 },
    /// Storage: an indexed object's file cannot be looked at.
    #[error("object {id} cannot be read: {source}")]
    ObjectUnreadable {
        id: ObjectId,
        source: std::io::Error,
    },
    /// Storage: an image file could not be written, read or replaced by a tombstone.
    #[error("{action} image {name}: {source}")]
    ImageIo {
        action: ImageAction,
        name: ImageName,
        source: std::io::Error,
    },
    /// Storage: the bucket could not be reached for the GC protocol (leases, markers,
    /// deletion records) or a refresh.
    #[error("object store: {0}")]
    Bucket(std::io::Error),
    /// Unavailable: the add's lease in the bucket was not renewed in time (the server or
    /// the bucket was too slow), so its objects may have been collected; nothing written.
    #[error("image {0}: its objects' lease in the bucket lapsed; retry")]
    LeaseLapsed(ImageName),
    /// The object store refused: bad data sent, a full disk, or another I/O failure
    /// (`StoreError::is_bad_data`, `is_no_space`).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `unknown object: ID`, or `first of N unknown objects: ID`.
fn unknown_objects(first: &ObjectId, count: usize) -> String {
    if count == 1 {
        format!("unknown object: {first}")
    } else {
        format!("first of {count} unknown objects: {first}")
    }
}

/// Nothing for one missing object, ` (N objects are missing)` for more.
fn how_many_missing(count: usize) -> String {
    if count == 1 {
        String::new()
    } else {
        format!(" ({count} objects are missing)")
    }
}

/// What was being done to an image file when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageAction {
    Writing,
    Reading,
    Deleting,
}

impl std::fmt::Display for ImageAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageAction::Writing => "writing",
            ImageAction::Reading => "reading",
            ImageAction::Deleting => "deleting",
        })
    }
}

/// The state of a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NameState {
    Live,
    /// Tombstoned: never reused.
    Deleted,
    /// Being written by an `add_image` in flight.
    Adding,
    /// Expired: tombstoned like `Deleted`, never reused.
    Expired,
}

#[derive(Clone, Copy, Debug)]
struct ObjectMeta {
    size: u64,
    refs: u32,
    /// Unix seconds when the object last became unreferenced (or arrived).
    unref_since: i64,
    /// Upload streams holding the object (it arrived or was offered in one still open).
    holds: u32,
    /// Not deleted as unreferenced before this instant.
    pinned_until: Option<Instant>,
}

impl ObjectMeta {
    /// An object no image refers to, neither held nor pinned, unreferenced since `now`.
    fn unreferenced(size: u64, now: i64) -> ObjectMeta {
        ObjectMeta {
            size,
            refs: 0,
            unref_since: now,
            holds: 0,
            pinned_until: None,
        }
    }

    fn collectable(&self, now: Instant) -> bool {
        self.refs == 0 && self.holds == 0 && self.pinned_until.is_none_or(|t| t <= now)
    }

    fn pin(&mut self, until: Instant) {
        self.pinned_until = Some(self.pinned_until.map_or(until, |t| t.max(until)));
    }
}

#[derive(Default)]
struct Index {
    names: BTreeMap<String, NameState>,
    objects: HashMap<ObjectId, ObjectMeta>,
    object_bytes: u64,
    /// Images found at start-up referring to objects not stored (a disk lost files, or
    /// someone removed them), with those objects; an entry shrinks as they are uploaded
    /// again. Empty on a healthy server: nothing here ever deletes a referenced object.
    incomplete: BTreeMap<String, BTreeSet<ObjectId>>,
    /// Objects whose files unreferenced-object deletion is removing (no longer in
    /// `objects`); uploads of them wait until they are gone.
    deleting: HashSet<ObjectId>,
    /// Objects uploads are renaming into place, with how many uploads; deletion skips them.
    committing: HashMap<ObjectId, u32>,
    /// The SHA-512 of each live image's file (images stored by earlier versions have none).
    checksums: HashMap<String, ObjectId>,
    /// Live images whose file is damaged, with what is wrong; never served.
    corrupt: BTreeMap<String, String>,
    /// When each live image with an expiry expires (Unix seconds).
    expires: HashMap<String, u64>,
    /// The new checksum of an image whose file is being replaced (expiry changed): its
    /// file may match this one or the one in `checksums`.
    rewriting: HashMap<String, ObjectId>,
}

impl Index {
    /// Whether `name` is a live image whose expiry has passed at `now`.
    fn due(&self, name: &str, now: u64) -> bool {
        model::stream::expired(self.expires.get(name).copied(), now)
    }

    /// Whether `name` is a live image not yet due to expire at `now`.
    fn live(&self, name: &str, now: u64) -> bool {
        self.names.get(name) == Some(&NameState::Live) && !self.due(name, now)
    }
}

/// Candidates per round of collection from a bucket (one marker each): few enough to
/// delete well within `leases::DELETE_BUDGET`.
const COLLECT_ROUND: usize = 4000;

/// Objects deleted from a bucket per bulk request (S3's `DeleteObjects` takes 1000); the
/// collector's budget is checked between them.
const BULK_DELETE: usize = 1000;

/// Objects removed per critical section by unreferenced-object deletion; uploads waiting
/// for one of them wait at most for one batch.
const DELETE_BATCH: usize = 256;

/// Figures for the status page and metrics.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub images: u64,
    pub deleted_names: u64,
    pub objects: u64,
    pub object_bytes: u64,
    pub unreferenced_objects: u64,
    pub unreferenced_bytes: u64,
    /// Unreferenced objects that deletion skips for now (held or pinned).
    pub pinned_objects: u64,
    /// Images referring to objects that are not stored.
    pub incomplete_images: u64,
    /// Images whose file does not match its checksum.
    pub corrupt_images: u64,
}

/// What one image holds, for the status page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImageUsage {
    /// Bytes of regular-file content (each inode once).
    pub size: u64,
    /// Distinct objects (tree and hooks).
    pub objects: u64,
    /// Bytes of its objects no other image refers to (what deleting it would free).
    pub unique_bytes: u64,
}

/// Images and objects of one data directory.
pub struct Catalogue {
    /// Held while open: one imageserver per data directory.
    _lock: disk::fsutil::DirLock,
    store: Objects,
    images_dir: PathBuf,
    index: Mutex<Index>,
    /// Signalled when objects leave `Index::deleting`.
    deleted: Condvar,
    pin_grace: Duration,
    /// Shortest expiry accepted (`--min-expiry-secs`), in seconds.
    min_expiry_secs: std::sync::atomic::AtomicU64,
    /// Serializes the edits that replace an image file (expiry changes, deletions).
    rewrite: Mutex<()>,
    /// Serializes reading the bucket's deletion records with applying them (`s3`).
    sync: Mutex<()>,
    /// Serializes refreshes from the bucket: a collector's refresh must not miss an image
    /// another refresh copied here but has not indexed yet.
    refreshing: Mutex<()>,
}

fn now_secs() -> i64 {
    disk::clock::unix_now() as i64
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Catalogue {
    /// Opens (creating if needed) a data directory with the default pin grace period.
    pub fn open(data_dir: &Path) -> Result<Catalogue, OpenError> {
        Catalogue::open_with_grace(data_dir, DEFAULT_PIN_GRACE)
    }

    /// Opens (creating if needed) a data directory: removes crash debris, registers every
    /// object by its file name and every image and tombstone. Objects stay pinned for
    /// `pin_grace` after they are uploaded or reported present.
    pub fn open_with_grace(data_dir: &Path, pin_grace: Duration) -> Result<Catalogue, OpenError> {
        Catalogue::open_with_objects(data_dir, pin_grace, None)
    }

    /// `open_with_grace`, with the objects in S3 (`s3`) instead of `DATA/objects`.
    pub fn open_with_objects(
        data_dir: &Path,
        pin_grace: Duration,
        s3: Option<std::sync::Arc<crate::s3::S3Objects>>,
    ) -> Result<Catalogue, OpenError> {
        std::fs::create_dir_all(data_dir).map_err(io_at(data_dir))?;
        // Before anything is cleaned up: debris may be another live server's uploads.
        let lock = disk::fsutil::lock_dir(data_dir, ".lock")?;
        let store = match s3 {
            Some(s3) => Objects::S3(s3),
            None => Objects::Local(ObjectStore::open(&data_dir.join("objects"))?),
        };
        let images_dir = data_dir.join("images");
        std::fs::create_dir_all(&images_dir).map_err(io_at(&images_dir))?;
        if let Objects::S3(s3) = &store {
            let listed = s3.list_image_tags().map_err(io_at(&images_dir))?;
            pull_images(s3, &images_dir, &listed, |_| false).map_err(io_at(&images_dir))?;
            // Deletion records older than the objects' listing below are in it already.
            s3.skip_deletions().map_err(io_at(&images_dir))?;
        }
        let mut index = Index::default();
        index_objects(&mut index, &store, pin_grace)?;
        index_images(&mut index, &images_dir)?;
        let cat = Catalogue {
            _lock: lock,
            store,
            images_dir,
            index: Mutex::new(index),
            deleted: Condvar::new(),
            pin_grace,
            min_expiry_secs: model::expiry::DEFAULT_MIN_EXPIRY_SECS.into(),
            rewrite: Mutex::new(()),
            sync: Mutex::new(()),
            refreshing: Mutex::new(()),
        };
        cat.expire_due();
        Ok(cat)
    }

    /// Sets the shortest expiry accepted on add or change (the default is Dominator's
    /// 15 minutes; tests lower it).
    pub fn set_min_expiry_secs(&self, secs: u64) {
        self.min_expiry_secs
            .store(secs, std::sync::atomic::Ordering::Relaxed);
    }

    /// The shortest expiry accepted, in seconds.
    pub fn min_expiry(&self) -> u64 {
        self.min_expiry_secs
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn store(&self) -> &Objects {
        &self.store
    }

    fn image_path(&self, name: &ImageName) -> PathBuf {
        self.images_dir.join(name.as_str()).join(IMAGE_FILE)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sizes of the given objects (0 = absent), in order. Present objects are pinned for
    /// the grace period: the caller may be about to add an image that refers to them.
    pub fn check_objects(&self, ids: &[ObjectId]) -> Vec<u64> {
        let until = Instant::now() + self.pin_grace;
        let mut idx = self.lock();
        ids.iter()
            .map(|id| {
                idx.objects.get_mut(id).map_or(0, |m| {
                    m.pin(until);
                    m.size
                })
            })
            .collect()
    }

    /// `check_objects`, and on S3 first a lease in the bucket on the objects found
    /// present (kept for the grace period), so no imageserver's collector deletes them
    /// before the add that asked refers to them; an object another server deleted is
    /// reported absent (0), to be uploaded again.
    pub fn check_objects_leased(&self, ids: &[ObjectId]) -> Result<Vec<u64>, CatalogueError> {
        if let Objects::S3(s3) = &self.store {
            let present: Vec<ObjectId> = {
                let idx = self.lock();
                ids.iter()
                    .filter(|id| idx.objects.contains_key(id))
                    .copied()
                    .collect()
            };
            if !present.is_empty() {
                let lease = self.secure(s3, &present)?;
                s3.release_lease(lease, Instant::now() + self.pin_grace);
            }
        }
        Ok(self.check_objects(ids))
    }

    pub fn has_object(&self, id: &ObjectId) -> bool {
        self.lock().objects.contains_key(id)
    }

    /// If the object is stored, holds it for an upload stream (see `release`) and returns
    /// true.
    pub fn hold_if_present(&self, id: &ObjectId) -> bool {
        match self.lock().objects.get_mut(id) {
            Some(m) => {
                m.holds += 1;
                true
            }
            None => false,
        }
    }

    /// Ends an upload stream's holds on `ids`, pinning them for the grace period.
    pub fn release(&self, ids: &[ObjectId]) {
        let until = Instant::now() + self.pin_grace;
        let mut idx = self.lock();
        for id in ids {
            if let Some(m) = idx.objects.get_mut(id) {
                m.holds = m.holds.saturating_sub(1);
                m.pin(until);
            }
        }
    }

    /// Makes verified objects durable and visible, each held for the calling upload stream
    /// (which must `release` them, including those already present); returns (new objects,
    /// new bytes).
    pub fn commit_objects(&self, pending: Vec<Pending>) -> Result<(u64, u64), CatalogueError> {
        let (added, lease) = self.commit_objects_leased(pending)?;
        if let (Some(lease), Objects::S3(s3)) = (lease, &self.store) {
            s3.release_lease(lease, Instant::now() + self.pin_grace);
        }
        Ok(added)
    }

    /// `commit_objects`; on S3 the objects are leased in the bucket first (`secure`) and
    /// the lease is returned, held: the caller releases it (`release_leases`) when its
    /// stream ends.
    pub fn commit_objects_leased(
        &self,
        pending: Vec<Pending>,
    ) -> Result<((u64, u64), Option<crate::s3::LeaseId>), CatalogueError> {
        let ids: Vec<(ObjectId, u64)> = pending.iter().map(|p| (p.id(), p.size())).collect();
        let lease = match &self.store {
            Objects::S3(s3) if !ids.is_empty() => {
                let just: Vec<ObjectId> = ids.iter().map(|(id, _)| *id).collect();
                Some(self.secure(s3, &just)?)
            }
            _ => None,
        };
        let added = self.commit_leased(pending, ids);
        if let (Err(_), Some(l), Objects::S3(s3)) = (&added, lease, &self.store) {
            s3.drop_lease(l);
        }
        Ok((added?, lease))
    }

    /// On S3, rewrites the leases still needed and drops the others (run with every
    /// refresh; `S3Objects::renew_leases`).
    pub fn renew_leases(&self) {
        if let Objects::S3(s3) = &self.store {
            s3.renew_leases();
        }
    }

    /// Keeps each of an upload stream's leases for the grace period from now.
    pub fn release_leases(&self, leases: &[crate::s3::LeaseId]) {
        if let Objects::S3(s3) = &self.store {
            let until = Instant::now() + self.pin_grace;
            for l in leases {
                s3.release_lease(*l, until);
            }
        }
    }

    /// `commit_objects` once leased.
    fn commit_leased(
        &self,
        pending: Vec<Pending>,
        ids: Vec<(ObjectId, u64)>,
    ) -> Result<(u64, u64), CatalogueError> {
        {
            let mut idx = self.lock();
            while ids.iter().any(|(id, _)| idx.deleting.contains(id)) {
                idx = self.deleted.wait(idx).unwrap_or_else(|p| p.into_inner());
            }
            for (id, _) in &ids {
                *idx.committing.entry(*id).or_default() += 1;
            }
        }
        let t = std::time::Instant::now();
        let committed = self.store.commit(pending);
        let mut idx = self.lock();
        for (id, _) in &ids {
            if let Some(c) = idx.committing.get_mut(id) {
                *c -= 1;
                if *c == 0 {
                    idx.committing.remove(id);
                }
            }
        }
        committed?;
        tracing::debug!(
            objects = ids.len(),
            ms = t.elapsed().as_millis() as u64,
            "objects committed"
        );
        let now = now_secs();
        let (mut n, mut bytes) = (0, 0);
        for (id, size) in ids {
            if let Some(m) = idx.objects.get_mut(&id) {
                m.holds += 1;
                continue;
            }
            // An object an incomplete image was missing: referenced from now on.
            let mut refs = 0;
            for missing in idx.incomplete.values_mut() {
                refs += u32::from(missing.remove(&id));
            }
            if refs > 0 {
                idx.incomplete.retain(|_, m| !m.is_empty());
            }
            idx.objects.insert(
                id,
                ObjectMeta {
                    size,
                    refs,
                    unref_since: now,
                    holds: 1,
                    pinned_until: None,
                },
            );
            idx.object_bytes += size;
            n += 1;
            bytes += size;
        }
        Ok((n, bytes))
    }

    /// The first missing object of `ids`, and how many are missing.
    pub fn first_missing(&self, ids: &[ObjectId]) -> Option<(ObjectId, usize)> {
        let idx = self.lock();
        let missing: Vec<&ObjectId> = ids
            .iter()
            .filter(|i| !idx.objects.contains_key(i))
            .collect();
        missing.first().map(|f| (**f, missing.len()))
    }

    /// The recorded sizes of `ids`, in order, once each is checked to be stored whole: an
    /// unknown object is `ObjectsNotFound` (worded as Dominator does); a file shorter than
    /// recorded is `CorruptObject`, one that cannot be looked at `ObjectUnreadable`.
    pub fn object_files(&self, ids: &[ObjectId]) -> Result<Vec<(ObjectId, u64)>, CatalogueError> {
        if let Some((first, count)) = self.first_missing(ids) {
            return Err(CatalogueError::ObjectsNotFound { first, count });
        }
        let sizes: Vec<u64> = {
            let idx = self.lock();
            ids.iter()
                .map(|id| idx.objects.get(id).map_or(0, |m| m.size))
                .collect()
        };
        if self.store.local().is_none() {
            // S3 objects are written whole or not at all, never edited: a HEAD per object
            // would only add a round trip each. One deleted behind our back aborts the
            // body when it is reached, as a file vanishing mid-stream does.
            return Ok(ids.iter().copied().zip(sizes).collect());
        }
        let mut out = Vec::with_capacity(ids.len());
        for (id, size) in ids.iter().zip(sizes) {
            let on_disk = self.store.size_of(id);
            match on_disk {
                Ok(len) if len >= size => out.push((*id, size)),
                Ok(len) => return Err(CatalogueError::CorruptObject { id: *id, len, size }),
                Err(source) => return Err(CatalogueError::ObjectUnreadable { id: *id, source }),
            }
        }
        Ok(out)
    }

    /// Adds an image under a fresh name: the name must never have been used, the tree must
    /// be valid and every object it needs present with the right size.
    pub fn add_image(&self, name: &ImageName, image: &Image) -> Result<(), CatalogueError> {
        image
            .tree
            .validate()
            .map_err(|source| CatalogueError::InvalidTree {
                name: name.clone(),
                source,
            })?;
        image
            .hooks
            .validate()
            .map_err(|source| CatalogueError::InvalidHooks {
                name: name.clone(),
                source,
            })?;
        let min = model::expiry::server_minimum(self.min_expiry());
        model::expiry::check_new(image.expires_at, disk::clock::unix_now(), min).map_err(
            |source| CatalogueError::InvalidExpiry {
                name: name.clone(),
                source,
            },
        )?;
        let objects = image.objects();
        let lease = match &self.store {
            Objects::S3(s3) if !objects.is_empty() => {
                let ids: Vec<ObjectId> = objects.keys().copied().collect();
                Some((s3, self.secure(s3, &ids)?))
            }
            _ => None,
        };
        let added = self.add_leased(name, image, &objects, lease.map(|(_, l)| l));
        if let Some((s3, l)) = lease {
            // On success the image in the bucket protects its objects from now on.
            s3.drop_lease(l);
        }
        added
    }

    /// `add_image` once its objects are leased (on S3).
    fn add_leased(
        &self,
        name: &ImageName,
        image: &Image,
        objects: &BTreeMap<ObjectId, u64>,
        lease: Option<crate::s3::LeaseId>,
    ) -> Result<(), CatalogueError> {
        {
            let mut idx = self.lock();
            match idx.names.get(name.as_str()) {
                Some(NameState::Deleted) => return Err(CatalogueError::NameDeleted(name.clone())),
                Some(NameState::Expired) => return Err(CatalogueError::NameExpired(name.clone())),
                Some(_) => return Err(CatalogueError::AlreadyExists(name.clone())),
                None => {}
            }
            let mut missing = objects
                .iter()
                .filter(|(id, _)| !idx.objects.contains_key(id));
            if let Some((first, _)) = missing.next() {
                return Err(CatalogueError::InvalidMissingObjects {
                    first: *first,
                    count: missing.count() + 1,
                });
            }
            for (id, size) in objects {
                let stored = idx.objects[id].size;
                if stored != *size {
                    return Err(CatalogueError::InvalidObjectSize {
                        id: *id,
                        stored,
                        claimed: *size,
                    });
                }
            }
            for id in objects.keys() {
                idx.objects.get_mut(id).expect("checked").refs += 1;
            }
            idx.names.insert(name.to_string(), NameState::Adding);
        }
        let written = self.claim_name(name).and_then(|()| {
            if let (Some(l), Objects::S3(s3)) = (lease, &self.store) {
                if !s3.lease_trusted(l) {
                    return Err(CatalogueError::LeaseLapsed(name.clone()));
                }
            }
            self.write_image(name, image, None, |_| ())
                .map_err(|source| CatalogueError::ImageIo {
                    action: ImageAction::Writing,
                    name: name.clone(),
                    source,
                })
        });
        let mut idx = self.lock();
        match written {
            Ok(sum) => {
                idx.names.insert(name.to_string(), NameState::Live);
                idx.checksums.insert(name.to_string(), sum);
                if let Some(t) = image.expires_at {
                    idx.expires.insert(name.to_string(), t);
                }
                Ok(())
            }
            Err(e) => {
                idx.names.remove(name.as_str());
                let now = now_secs();
                for id in objects.keys() {
                    if let Some(m) = idx.objects.get_mut(id) {
                        m.refs -= 1;
                        if m.refs == 0 {
                            m.unref_since = now;
                        }
                    }
                }
                drop(idx);
                if let (Objects::S3(s3), false) = (
                    &self.store,
                    matches!(
                        e,
                        CatalogueError::AlreadyExists(_)
                            | CatalogueError::NameDeleted(_)
                            | CatalogueError::NameContended(_)
                    ),
                ) {
                    s3.release_name(name.as_str());
                }
                Err(e)
            }
        }
    }

    /// On S3, makes this server the only one that may add `name` (`S3Objects::claim_name`):
    /// a name used or claimed through any imageserver of the bucket is refused.
    fn claim_name(&self, name: &ImageName) -> Result<(), CatalogueError> {
        let Objects::S3(s3) = &self.store else {
            return Ok(());
        };
        let io = |source| CatalogueError::ImageIo {
            action: ImageAction::Writing,
            name: name.clone(),
            source,
        };
        match s3.claim_name(name.as_str()).map_err(io)? {
            crate::s3::Claim::Won => Ok(()),
            crate::s3::Claim::Used { deleted: true } => {
                Err(CatalogueError::NameDeleted(name.clone()))
            }
            crate::s3::Claim::Used { deleted: false } => {
                Err(CatalogueError::AlreadyExists(name.clone()))
            }
            crate::s3::Claim::Contended => Err(CatalogueError::NameContended(name.clone())),
        }
    }

    /// Writes an image file and, before it appears, its checksum; returns the checksum.
    /// The JSON is streamed to the file (never a second copy of it in memory). When it
    /// replaces a file whose checksum is `old`, the checksum file holds both sums until
    /// the new file is in place; `before_rename` is called with the new sum just before.
    fn write_image(
        &self,
        name: &ImageName,
        image: &Image,
        old: Option<ObjectId>,
        before_rename: impl FnOnce(&ObjectId),
    ) -> std::io::Result<ObjectId> {
        let path = self.image_path(name);
        let dir = path.parent().expect("has a parent");
        std::fs::create_dir_all(dir)?;
        let tmp = disk::fsutil::temp_path(&path);
        let guard = disk::fsutil::DeleteOnDrop::new(tmp.clone());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        let mut w = HashingWriter {
            inner: std::io::BufWriter::with_capacity(1 << 20, file),
            hasher: model::hash::ObjectHasher::new(),
        };
        serde_json::to_writer(&mut w, image).map_err(std::io::Error::other)?;
        let file = w.inner.into_inner().map_err(|e| e.into_error())?;
        let (sum, _) = w.hasher.finish();
        file.sync_all()?;
        drop(file);
        let sum_path = path.with_file_name(CHECKSUM_FILE);
        let both = old.map_or(String::new(), |o| format!("{o}\n"));
        if let Objects::S3(s3) = &self.store {
            // The bucket holds the image first: it is the truth, this directory a copy.
            let json = std::fs::read(&tmp)?;
            s3.put_image(name.as_str(), json.into(), format!("{sum}\n{both}").into())?;
        }
        write_atomic(&sum_path, format!("{sum}\n{both}").as_bytes())?;
        before_rename(&sum);
        std::fs::rename(&tmp, &path)?;
        guard.disarm();
        if old.is_some() {
            if let Objects::S3(s3) = &self.store {
                s3.put_image_checksum(name.as_str(), format!("{sum}\n").into())?;
            }
            write_atomic(&sum_path, format!("{sum}\n").as_bytes())?;
        }
        // Make every directory on the way durable too.
        let mut d = dir.to_path_buf();
        while d != self.images_dir {
            let parent = d.parent().expect("below images_dir").to_path_buf();
            fsync_dir(&parent)?;
            d = parent;
        }
        Ok(sum)
    }

    /// The stored JSON of a live image, checked against its checksum (a mismatch marks the
    /// image corrupt and is an error).
    /// An image whose expiry has passed is `ImageExpired` (even before the sweep
    /// tombstones it).
    pub fn image_json(&self, name: &ImageName) -> Result<Vec<u8>, CatalogueError> {
        {
            let idx = self.lock();
            if idx.due(name.as_str(), disk::clock::unix_now()) {
                return Err(CatalogueError::ImageExpired(name.clone()));
            }
        }
        self.checked_json(name)
    }

    /// `image_json` without the expiry check (for expiring it).
    fn checked_json(&self, name: &ImageName) -> Result<Vec<u8>, CatalogueError> {
        let sums = {
            let idx = self.lock();
            match idx.names.get(name.as_str()) {
                Some(NameState::Live) => {}
                Some(NameState::Expired) => return Err(CatalogueError::ImageExpired(name.clone())),
                _ => return Err(CatalogueError::ImageNotFound(name.clone())),
            }
            if let Some(damage) = idx.corrupt.get(name.as_str()) {
                return Err(corrupt_error(name, damage));
            }
            let recorded = idx.checksums.get(name.as_str()).copied();
            let new = idx.rewriting.get(name.as_str()).copied();
            recorded.map(|r| [Some(r), new])
        };
        let bytes = self.read_image_file(name)?;
        let sums: Vec<ObjectId> = sums.into_iter().flatten().flatten().collect();
        if let Some(damage) = (!sums.is_empty())
            .then(|| mismatch(&sums, &bytes))
            .flatten()
        {
            let mut idx = self.lock();
            // The file may have been replaced (expiry changed) since the sums were taken.
            let now: Vec<ObjectId> = [&idx.checksums, &idx.rewriting]
                .iter()
                .filter_map(|m| m.get(name.as_str()).copied())
                .collect();
            if mismatch(&now, &bytes).is_none() {
                return Ok(bytes);
            }
            tracing::error!(image = %name, "image is corrupt, not served: {damage}");
            let e = corrupt_error(name, &damage);
            idx.corrupt.insert(name.to_string(), damage);
            return Err(e);
        }
        Ok(bytes)
    }

    /// When a live image expires (`None` = never).
    pub fn image_expiration(&self, name: &ImageName) -> Result<Option<u64>, CatalogueError> {
        let idx = self.lock();
        match idx.names.get(name.as_str()) {
            _ if idx.due(name.as_str(), disk::clock::unix_now()) => {
                Err(CatalogueError::ImageExpired(name.clone()))
            }
            Some(NameState::Live) => Ok(idx.expires.get(name.as_str()).copied()),
            Some(NameState::Expired) => Err(CatalogueError::ImageExpired(name.clone())),
            _ => Err(CatalogueError::ImageNotFound(name.clone())),
        }
    }

    /// Changes when a live image expires (`None` = never): only ever extended, and a new
    /// time at least the minimum ahead. The image file is rewritten with the new
    /// `expires_at` (and a new checksum), the one edit an image ever gets.
    pub fn change_expiration(
        &self,
        name: &ImageName,
        expires_at: Option<u64>,
    ) -> Result<(), CatalogueError> {
        if let Objects::S3(s3) = &self.store {
            // Changed or deleted through another imageserver since the last refresh: take
            // that in first, so the extend-only rule holds and no tombstone is overwritten.
            self.adopt_rewrite(s3, name)?;
        }
        let _rewrite = self.rewrite.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.image_expiration(name)?;
        let now = disk::clock::unix_now();
        let min = model::expiry::server_minimum(self.min_expiry());
        model::expiry::check_change(current, expires_at, now, min).map_err(|source| {
            CatalogueError::InvalidExpiry {
                name: name.clone(),
                source,
            }
        })?;
        let bytes = self.image_json(name)?;
        let mut image: Image =
            serde_json::from_slice(&bytes).map_err(|e| corrupt_error(name, &e.to_string()))?;
        if image.expires_at == expires_at {
            return Ok(());
        }
        image.expires_at = expires_at;
        let old = ObjectId::of(&bytes);
        drop(bytes);
        let key = name.to_string();
        let written = self.write_image(name, &image, Some(old), |sum| {
            self.lock().rewriting.insert(key.clone(), *sum);
        });
        let mut idx = self.lock();
        let new = idx.rewriting.remove(&key);
        let sum = written.map_err(|source| CatalogueError::ImageIo {
            action: ImageAction::Writing,
            name: name.clone(),
            source,
        })?;
        debug_assert_eq!(new, Some(sum));
        idx.checksums.insert(key.clone(), sum);
        match expires_at {
            Some(t) => idx.expires.insert(key, t),
            None => idx.expires.remove(&key),
        };
        Ok(())
    }

    /// Tombstones every live image whose expiry has passed (as `delete_image` does, with
    /// the `.image.expired` marker); returns their names. A failure is logged and the
    /// image tried again at the next call.
    pub fn expire_due(&self) -> Vec<ImageName> {
        let now = disk::clock::unix_now();
        let due: Vec<String> = {
            let idx = self.lock();
            idx.expires
                .iter()
                .filter(|(n, t)| **t <= now && idx.names.get(*n) == Some(&NameState::Live))
                .map(|(n, _)| n.clone())
                .collect()
        };
        let mut gone = Vec::new();
        for name in due {
            let Ok(name) = ImageName::parse(&name) else {
                continue;
            };
            match self.remove_image(&name, NameState::Expired) {
                Ok(()) => {
                    tracing::info!(image = %name, "image expired");
                    gone.push(name);
                }
                Err(e) => tracing::error!(image = %name, "expiring the image failed: {e}"),
            }
        }
        gone
    }

    /// Live images expiring within `window` seconds of now, soonest first, with when.
    pub fn expiring_within(&self, window: u64) -> Vec<(String, u64)> {
        let now = disk::clock::unix_now();
        let idx = self.lock();
        let mut v: Vec<(String, u64)> = idx
            .expires
            .iter()
            .filter(|(n, t)| {
                model::expiry::expiring_within(Some(**t), now, window)
                    && idx.names.get(*n) == Some(&NameState::Live)
            })
            .map(|(n, t)| (n.clone(), *t))
            .collect();
        v.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    fn read_image_file(&self, name: &ImageName) -> Result<Vec<u8>, CatalogueError> {
        std::fs::read(self.image_path(name)).map_err(|source| CatalogueError::ImageIo {
            action: ImageAction::Reading,
            name: name.clone(),
            source,
        })
    }

    /// Live images whose file does not match its checksum, with what is wrong.
    pub fn corrupt_images(&self) -> Vec<(String, String)> {
        let idx = self.lock();
        idx.corrupt
            .iter()
            .map(|(n, d)| (n.clone(), d.clone()))
            .collect()
    }

    /// What a live image holds (read from its checked file): content size, distinct
    /// objects, and the bytes of the objects no other image refers to.
    pub fn image_usage(&self, name: &ImageName) -> Result<ImageUsage, CatalogueError> {
        let bytes = self.image_json(name)?;
        let image: Image =
            serde_json::from_slice(&bytes).map_err(|e| corrupt_error(name, &e.to_string()))?;
        let objects = image.objects();
        let idx = self.lock();
        let unique_bytes = objects
            .iter()
            .filter(|(id, _)| idx.objects.get(id).is_some_and(|m| m.refs == 1))
            .map(|(_, size)| size)
            .sum();
        Ok(ImageUsage {
            size: image.tree.total_bytes(),
            objects: objects.len() as u64,
            unique_bytes,
        })
    }

    pub fn image_exists(&self, name: &ImageName) -> bool {
        self.lock().live(name.as_str(), disk::clock::unix_now())
    }

    /// True if the name's image expired (due now, or tombstoned by expiry).
    pub fn name_expired(&self, name: &ImageName) -> bool {
        let idx = self.lock();
        idx.names.get(name.as_str()) == Some(&NameState::Expired)
            || (idx.names.get(name.as_str()) == Some(&NameState::Live)
                && idx.due(name.as_str(), disk::clock::unix_now()))
    }

    /// True if the name was deleted (a tombstone: it can never be used again).
    pub fn name_deleted(&self, name: &ImageName) -> bool {
        self.lock().names.get(name.as_str()) == Some(&NameState::Deleted)
    }

    /// Live image names starting with `prefix`, version-sorted (never one whose expiry
    /// has passed).
    pub fn list_images(&self, prefix: &str) -> Vec<String> {
        let now = disk::clock::unix_now();
        let idx = self.lock();
        let mut v: Vec<String> = idx
            .names
            .iter()
            .filter(|(n, s)| **s == NameState::Live && n.starts_with(prefix) && !idx.due(n, now))
            .map(|(n, _)| n.clone())
            .collect();
        v.sort_by(|a, b| model::image::version_cmp(a, b));
        v
    }

    /// Deletes an image, leaving a tombstone so the name is never reused.
    /// A corrupt image may be deleted too (its references are dropped as far as its file
    /// can still be read).
    pub fn delete_image(&self, name: &ImageName) -> Result<(), CatalogueError> {
        if self.name_expired(name) {
            return Err(CatalogueError::ImageExpired(name.clone()));
        }
        self.remove_image(name, NameState::Deleted)
    }

    /// Tombstones a live image (`how`: `Deleted` or `Expired`, which also leaves the
    /// `.image.expired` marker) and drops its references.
    fn remove_image(&self, name: &ImageName, how: NameState) -> Result<(), CatalogueError> {
        let _rewrite = self.rewrite.lock().unwrap_or_else(|p| p.into_inner());
        let (bytes, corrupt) = match self.checked_json(name) {
            Ok(b) => (b, false),
            Err(e) if self.lock().corrupt.contains_key(name.as_str()) => {
                tracing::warn!(image = %name, "deleting a corrupt image: {e}");
                (self.read_image_file(name)?, true)
            }
            Err(e) => return Err(e),
        };
        let image: Option<Image> = match serde_json::from_slice(&bytes) {
            Ok(i) => Some(i),
            Err(_) if corrupt => None,
            Err(e) => return Err(corrupt_error(name, &e.to_string())),
        };
        {
            let mut idx = self.lock();
            if idx.names.get(name.as_str()) != Some(&NameState::Live) {
                return Err(CatalogueError::ImageNotFound(name.clone()));
            }
            idx.names.insert(name.to_string(), NameState::Adding);
        }
        let expired = matches!(how, NameState::Expired);
        let marker = self.image_path(name).with_file_name(EXPIRED_FILE);
        let bucket = match &self.store {
            Objects::S3(s3) => s3.put_tombstone(name.as_str(), expired),
            Objects::Local(_) => Ok(()),
        };
        let tombstone = bucket
            .and_then(|()| match expired {
                true => write_atomic(&marker, b""),
                false => Ok(()),
            })
            .and_then(|()| write_atomic(&self.image_path(name), b""));
        if let Err(source) = tombstone {
            self.lock().names.insert(name.to_string(), NameState::Live);
            return Err(CatalogueError::ImageIo {
                action: ImageAction::Deleting,
                name: name.clone(),
                source,
            });
        }
        self.forget_image(name, how, image);
        Ok(())
    }

    /// The index's side of tombstoning `name` (its files already are): its state becomes
    /// `how`, its references (as `image` has them, if readable) are dropped.
    fn forget_image(&self, name: &ImageName, how: NameState, image: Option<Image>) {
        let now = now_secs();
        let mut freed = Vec::new();
        {
            let mut idx = self.lock();
            idx.names.insert(name.to_string(), how);
            idx.expires.remove(name.as_str());
            idx.incomplete.remove(name.as_str());
            idx.corrupt.remove(name.as_str());
            idx.checksums.remove(name.as_str());
            let ids = image.map(|i| i.objects().into_keys().collect::<Vec<_>>());
            for id in ids.iter().flatten() {
                if let Some(m) = idx.objects.get_mut(id) {
                    m.refs = m.refs.saturating_sub(1);
                    if m.refs == 0 {
                        m.unref_since = now;
                        freed.push(*id);
                    }
                }
            }
        }
        // The tombstone needs no checksum. Best effort: a stale one beside it is ignored.
        let _ = std::fs::remove_file(self.image_path(name).with_file_name(CHECKSUM_FILE));
        // Record when each object became unreferenced in its mtime, for the order after a
        // restart. Best effort: the order is advisory.
        let t = SystemTime::now();
        for id in freed {
            self.store.mark_unreferenced(&id, t);
        }
    }

    /// Takes in a tombstone another imageserver put in the bucket for the live image
    /// `name` (deleted, or expired: `.image.expired` beside it): the same files here, and
    /// the image's references dropped.
    fn adopt_tombstone(
        &self,
        s3: &crate::s3::S3Objects,
        name: &ImageName,
    ) -> Result<(), CatalogueError> {
        let _rewrite = self.rewrite.lock().unwrap_or_else(|p| p.into_inner());
        let io = |source| CatalogueError::ImageIo {
            action: ImageAction::Deleting,
            name: name.clone(),
            source,
        };
        if self.lock().names.get(name.as_str()) != Some(&NameState::Live) {
            return Ok(());
        }
        let image = self
            .read_image_file(name)
            .ok()
            .and_then(|b| serde_json::from_slice::<Image>(&b).ok());
        let expired = s3.is_expired(name.as_str()).map_err(io)?;
        let path = self.image_path(name);
        if expired {
            write_atomic(&path.with_file_name(EXPIRED_FILE), b"").map_err(io)?;
        }
        write_atomic(&path, b"").map_err(io)?;
        let how = match expired {
            true => NameState::Expired,
            false => NameState::Deleted,
        };
        self.forget_image(name, how, image);
        tracing::info!(image = %name, expired, "image removed through another imageserver");
        Ok(())
    }

    /// Takes in the bucket's copy of the live image `name` when it differs from this
    /// server's (its expiry was changed through another imageserver): checksum file, then
    /// image, and the index's expiry and checksum. Returns whether it differed.
    fn adopt_rewrite(
        &self,
        s3: &crate::s3::S3Objects,
        name: &ImageName,
    ) -> Result<bool, CatalogueError> {
        let _rewrite = self.rewrite.lock().unwrap_or_else(|p| p.into_inner());
        let io = |source| CatalogueError::ImageIo {
            action: ImageAction::Writing,
            name: name.clone(),
            source,
        };
        if self.lock().names.get(name.as_str()) != Some(&NameState::Live) {
            return Ok(false);
        }
        let (json, sums) = s3.get_image(name.as_str()).map_err(io)?;
        if json.is_empty() {
            drop(_rewrite);
            return self.adopt_tombstone(s3, name).map(|()| true);
        }
        if self.read_image_file(name).is_ok_and(|b| b == json[..]) {
            return Ok(false);
        }
        let image: Image =
            serde_json::from_slice(&json).map_err(|e| corrupt_error(name, &e.to_string()))?;
        let sum = ObjectId::of(&json);
        let key = name.to_string();
        let path = self.image_path(name);
        if let Some(sums) = &sums {
            write_atomic(&path.with_file_name(CHECKSUM_FILE), sums).map_err(io)?;
        }
        self.lock().rewriting.insert(key.clone(), sum);
        let written = write_atomic(&path, &json);
        let mut idx = self.lock();
        idx.rewriting.remove(&key);
        written.map_err(io)?;
        let listed = sums.is_some_and(|s| String::from_utf8_lossy(&s).contains(&sum.to_hex()));
        if listed {
            idx.checksums.insert(key.clone(), sum);
        }
        match image.expires_at {
            Some(t) => idx.expires.insert(key, t),
            None => idx.expires.remove(&key),
        };
        drop(idx);
        tracing::info!(image = %name, "image expiry changed through another imageserver");
        Ok(true)
    }

    /// Unreferenced objects, oldest-unreferenced first.
    pub fn unreferenced(&self) -> Vec<(ObjectId, u64)> {
        let idx = self.lock();
        let mut v: Vec<(i64, ObjectId, u64)> = idx
            .objects
            .iter()
            .filter(|(_, m)| m.refs == 0)
            .map(|(id, m)| (m.unref_since, *id, m.size))
            .collect();
        v.sort();
        v.into_iter().map(|(_, id, s)| (id, s)).collect()
    }

    /// Deletes unreferenced objects, oldest first, until at least `percentage` % of them
    /// and at least `bytes` bytes are gone (`100 0` = all, `0 0` = none). Held and pinned
    /// objects are skipped (and not counted).
    pub fn delete_unreferenced(
        &self,
        percentage: u8,
        bytes: u64,
    ) -> Result<(u64, u64), CatalogueError> {
        if percentage > 100 {
            return Err(CatalogueError::InvalidPercentage(percentage));
        }
        let doomed = {
            let now = Instant::now();
            let mut idx = self.lock();
            let mut v: Vec<(i64, ObjectId, u64)> = idx
                .objects
                .iter()
                .filter(|(id, m)| m.collectable(now) && !idx.committing.contains_key(id))
                .map(|(id, m)| (m.unref_since, *id, m.size))
                .collect();
            v.sort();
            let want_count = (v.len() as u64 * percentage as u64).div_ceil(100);
            let mut doomed = Vec::new();
            let (mut n, mut b) = (0u64, 0u64);
            for (_, id, size) in v {
                if n >= want_count && b >= bytes {
                    break;
                }
                n += 1;
                b += size;
                doomed.push((id, size));
            }
            if let Objects::S3(s3) = &self.store {
                drop(idx);
                // In rounds, each with its own marker and deletion budget.
                let (mut n, mut b) = (0, 0);
                for round in doomed.chunks(COLLECT_ROUND) {
                    let (rn, rb) = self.collect_shared(s3, round.to_vec())?;
                    n += rn;
                    b += rb;
                }
                return Ok((n, b));
            }
            for (id, size) in &doomed {
                let meta = idx.objects.remove(id).expect("listed above");
                idx.object_bytes -= size;
                idx.deleting.insert(*id);
                debug_assert_eq!(meta.refs, 0);
            }
            doomed
        };
        let (mut n, mut b) = (0, 0);
        let mut batches = doomed.chunks(DELETE_BATCH);
        while let Some(batch) = batches.next() {
            let mut failed = None;
            let mut gone = 0;
            for (id, _) in batch {
                if let Err(e) = self.store.remove(id) {
                    failed = Some(e);
                    break;
                }
                gone += 1;
            }
            let mut idx = self.lock();
            for (id, size) in &batch[..gone] {
                idx.deleting.remove(id);
                n += 1;
                b += size;
            }
            if let Some(e) = failed {
                // The rest keep their files: back into the index, unreferenced as before.
                let now = now_secs();
                let rest = batch[gone..].iter().chain(batches.flatten());
                for (id, size) in rest {
                    idx.deleting.remove(id);
                    idx.object_bytes += size;
                    idx.objects.insert(
                        *id,
                        ObjectMeta {
                            size: *size,
                            refs: 0,
                            unref_since: now,
                            holds: 0,
                            pinned_until: None,
                        },
                    );
                }
                drop(idx);
                self.deleted.notify_all();
                return Err(e.into());
            }
            drop(idx);
            self.deleted.notify_all();
        }
        Ok((n, b))
    }

    /// Images referring to objects that are not stored, with how many are missing.
    pub fn incomplete_images(&self) -> Vec<(String, usize)> {
        let idx = self.lock();
        idx.incomplete
            .iter()
            .map(|(n, m)| (n.clone(), m.len()))
            .collect()
    }

    pub fn counts(&self) -> Counts {
        let idx = self.lock();
        let mut c = Counts {
            objects: idx.objects.len() as u64,
            object_bytes: idx.object_bytes,
            incomplete_images: idx.incomplete.len() as u64,
            corrupt_images: idx.corrupt.len() as u64,
            ..Default::default()
        };
        for s in idx.names.values() {
            match s {
                NameState::Live => c.images += 1,
                NameState::Deleted | NameState::Expired => c.deleted_names += 1,
                NameState::Adding => {}
            }
        }
        let now = Instant::now();
        for m in idx.objects.values().filter(|m| m.refs == 0) {
            c.unreferenced_objects += 1;
            c.unreferenced_bytes += m.size;
            if !m.collectable(now) {
                c.pinned_objects += 1;
            }
        }
        c
    }
}

/// Registers every stored object: its size, when it became unreferenced (its file's
/// mtime), and a pin for the rest of the grace period if that was less than `pin_grace` ago.
fn index_objects(index: &mut Index, store: &Objects, pin_grace: Duration) -> Result<(), OpenError> {
    let (wall, mono) = (SystemTime::now(), Instant::now());
    for crate::storage::Listed { id, size, modified } in store.list()? {
        let mtime = modified
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        // Stored (or unreferenced) less than the grace period ago: pinned for the rest.
        let age = modified.and_then(|t| wall.duration_since(t).ok());
        let pinned_until = age
            .filter(|a| *a < pin_grace)
            .map(|a| mono + (pin_grace - a));
        index.object_bytes += size;
        index.objects.insert(
            id,
            ObjectMeta {
                size,
                refs: 0,
                unref_since: mtime,
                holds: 0,
                pinned_until,
            },
        );
    }
    Ok(())
}

/// Registers every image and tombstone below `images_dir` (removing temp files): counts
/// each live image's references, records its checksum, and notes images that are corrupt
/// or refer to objects not stored. An image that cannot be parsed is an error unless it is
/// already known to be corrupt.
fn index_images(index: &mut Index, images_dir: &Path) -> Result<(), OpenError> {
    let mut found = Vec::new();
    walk_images(images_dir, images_dir, &mut found)?;
    for (name, path, len) in found {
        index_image(index, name, &path, len)?;
    }
    Ok(())
}

/// Registers one image (or tombstone, `len` 0) whose file is `path`.
fn index_image(index: &mut Index, name: String, path: &Path, len: u64) -> Result<(), OpenError> {
    {
        if len == 0 {
            let state = if path.with_file_name(EXPIRED_FILE).exists() {
                NameState::Expired
            } else {
                NameState::Deleted
            };
            index.names.insert(name, state);
            return Ok(());
        }
        let bytes = std::fs::read(path).map_err(io_at(path))?;
        let recorded = read_checksum(&path.with_file_name(CHECKSUM_FILE));
        let damage = match &recorded {
            Ok(sums) if !sums.is_empty() => mismatch(sums, &bytes),
            Ok(_) => {
                tracing::info!(image = %name, "image has no checksum (stored by an earlier version); served unverified");
                None
            }
            Err(e) => Some(e.to_string()),
        };
        // The sum the file matches (of two, if a crash interrupted an expiry change).
        if let Ok(sums) = &recorded {
            let got = ObjectId::of(&bytes);
            if let Some(sum) = sums.iter().find(|s| **s == got).or(sums.first()) {
                index.checksums.insert(name.clone(), *sum);
            }
        }
        let parsed = serde_json::from_slice::<Image>(&bytes);
        if let Some(damage) = damage {
            tracing::error!(image = %name, "image is corrupt, not served: {damage}");
            index.corrupt.insert(name.clone(), damage);
        }
        let image = match parsed {
            Ok(image) => image,
            // Damaged beyond parsing: refers to nothing we can tell.
            Err(_) if index.corrupt.contains_key(&name) => {
                index.names.insert(name, NameState::Live);
                return Ok(());
            }
            Err(e) => {
                return Err(OpenError::Corrupt {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })
            }
        };
        let mut missing = BTreeSet::new();
        for id in image.objects().keys() {
            match index.objects.get_mut(id) {
                Some(m) => m.refs += 1,
                None => {
                    missing.insert(*id);
                }
            }
        }
        if let Some(first) = missing.first() {
            tracing::error!(image = %name, missing = missing.len(), %first, "image refers to objects that are not stored; upload them again (imagetool add of the same tree) or delete the image");
            index.incomplete.insert(name.clone(), missing);
        }
        if let Some(t) = image.expires_at {
            index.expires.insert(name.clone(), t);
        }
        index.names.insert(name, NameState::Live);
    }
    Ok(())
}

/// Copies into `images_dir` every image of the bucket that `known` does not name and
/// this directory lacks (or holds live where the bucket has its tombstone): checksum
/// first, then the image, each by temp file and rename. Returns the names copied, and
/// those of live copies already here that `known` does not name (to be indexed).
fn pull_images(
    s3: &crate::s3::S3Objects,
    images_dir: &Path,
    listed: &[(String, u64, Option<String>)],
    known: impl Fn(&str) -> bool,
) -> std::io::Result<Vec<(String, PathBuf, u64)>> {
    let mut pulled = Vec::new();
    for (name, len, _) in listed {
        let (name, len) = (name.clone(), *len);
        if known(&name) {
            continue;
        }
        if let Err(e) = ImageName::parse(&name) {
            tracing::warn!("ignoring the bucket's image {name:?}: {e}");
            continue;
        }
        let path = images_dir.join(&name).join(IMAGE_FILE);
        match std::fs::metadata(&path) {
            Ok(m) if m.len() == 0 => continue, // a tombstone here
            Ok(m) if len > 0 => {
                // A copy here already, not indexed (`known`): index it as it is.
                pulled.push((name, path, m.len()));
                continue;
            }
            _ => {}
        }
        let (json, sum) = s3.get_image(&name)?;
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        if let Some(sum) = sum {
            write_atomic(&path.with_file_name(CHECKSUM_FILE), &sum)?;
        }
        if json.is_empty() && s3.is_expired(&name)? {
            write_atomic(&path.with_file_name(EXPIRED_FILE), b"")?;
        }
        write_atomic(&path, &json)?;
        pulled.push((name, path, json.len() as u64));
    }
    Ok(pulled)
}

impl Catalogue {
    /// Takes in what other imageservers over the same bucket did since the last call
    /// (nothing on the local back-end): the objects they deleted (deletion records), the
    /// images they added (copied and indexed), deleted or expired (tombstoned here too)
    /// and whose expiry they changed. Returns how many images were added or changed.
    pub fn refresh_from_bucket(&self) -> Result<usize, OpenError> {
        let Objects::S3(s3) = &self.store else {
            return Ok(0);
        };
        let _one = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = |e: CatalogueError| OpenError::Io {
            path: self.images_dir.clone(),
            source: std::io::Error::other(e.to_string()),
        };
        self.sync_deletions(s3).map_err(bucket)?;
        let listed = s3.list_image_tags().map_err(io_at(&self.images_dir))?;
        let adopted = self.adopt_new_images(s3, &listed)?;
        let mut changed = 0;
        for (name, len, tag) in &listed {
            let Ok(name) = ImageName::parse(name) else {
                continue;
            };
            let (live, expires) = {
                let idx = self.lock();
                let live = idx.names.get(name.as_str()) == Some(&NameState::Live);
                (live, idx.expires.contains_key(name.as_str()))
            };
            // An image without an expiry never gets one (extend-only): never rewritten.
            let done = match (live, *len == 0) {
                (true, true) => self.adopt_tombstone(s3, &name).map(|()| true),
                (true, false) if expires && s3.image_changed(name.as_str(), tag.as_deref()) => {
                    self.adopt_rewrite(s3, &name)
                }
                _ => continue,
            };
            match done {
                Ok(c) => changed += usize::from(c),
                Err(e) => tracing::warn!(image = %name, "taking in the bucket's change: {e}"),
            }
        }
        Ok(adopted + changed)
    }

    /// Copies and indexes the images of `listed` this server does not know (added through
    /// other imageservers). Returns how many.
    fn adopt_new_images(
        &self,
        s3: &crate::s3::S3Objects,
        listed: &[(String, u64, Option<String>)],
    ) -> Result<usize, OpenError> {
        let known: HashSet<String> = self.lock().names.keys().cloned().collect();
        let pulled = pull_images(s3, &self.images_dir, listed, |n| known.contains(n))
            .map_err(io_at(&self.images_dir))?;
        // The objects the new images name that this server has not seen (uploaded through
        // another): stored before their image was, so a HEAD finds each. Looked up and
        // indexed under the deletion-sync lock: a deletion record read meanwhile is applied
        // after the insertion, never before it.
        let _sync = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        let mut found = Vec::new();
        for (_, path, len) in &pulled {
            let image = match std::fs::read(path).map(|b| serde_json::from_slice::<Image>(&b)) {
                Ok(Ok(image)) if *len > 0 => image,
                _ => continue, // a tombstone, or damage index_image reports
            };
            let unseen: Vec<ObjectId> = {
                let idx = self.lock();
                image
                    .objects()
                    .into_keys()
                    .filter(|id| !idx.objects.contains_key(id))
                    .collect()
            };
            for id in unseen {
                if let Ok(size) = s3.size_of(&id) {
                    found.push((id, size));
                }
            }
        }
        let mut idx = self.lock();
        let now = Instant::now();
        for (id, size) in found {
            if !idx.objects.contains_key(&id) {
                idx.object_bytes += size;
                idx.objects.insert(
                    id,
                    ObjectMeta {
                        size,
                        refs: 0,
                        unref_since: now_secs(),
                        holds: 0,
                        pinned_until: Some(now + self.pin_grace),
                    },
                );
            }
        }
        let mut adopted = 0;
        for (name, path, len) in pulled {
            if idx.names.contains_key(&name) {
                continue; // added here meanwhile (a name race: see `s3`)
            }
            index_image(&mut idx, name, &path, len)?;
            adopted += 1;
        }
        Ok(adopted)
    }
}

/// The object GC protocol over a shared bucket (see `s3`'s module comment): the adder's
/// `secure`, the collector's `collect_shared`, and the deletion records every server
/// applies to its index.
impl Catalogue {
    /// The adder's steps before it relies on `ids` being stored: writes a lease on them,
    /// waits while a collector's live marker condemns any, then applies the deletion
    /// records written meanwhile; an object a marker named is checked in the bucket (a
    /// HEAD) and forgotten if gone. Returns the lease, held.
    fn secure(
        &self,
        s3: &crate::s3::S3Objects,
        ids: &[ObjectId],
    ) -> Result<crate::s3::LeaseId, CatalogueError> {
        let lease = s3.lease(ids).map_err(CatalogueError::Bucket)?;
        let checked = (|| {
            let wanted: HashSet<ObjectId> = ids.iter().copied().collect();
            let flagged = s3
                .wait_condemned(lease, &wanted)
                .map_err(CatalogueError::Bucket)?;
            self.sync_deletions(s3)?;
            for id in flagged {
                if self.has_object(&id) && !s3.exists(&id).map_err(CatalogueError::Bucket)? {
                    self.forget_objects(s3, &[id], false);
                }
            }
            Ok(())
        })();
        match checked {
            Ok(()) => Ok(lease),
            Err(e) => {
                s3.drop_lease(lease);
                Err(e)
            }
        }
    }

    /// Reads the deletion records other servers wrote since the last call and drops what
    /// they name from the index (after a long gap, re-lists the bucket's objects instead).
    /// Serialized with itself, so a commit that follows a call never has its object
    /// forgotten by an older record applied late.
    fn sync_deletions(&self, s3: &crate::s3::S3Objects) -> Result<(), CatalogueError> {
        let _sync = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        let d = s3.new_deletions().map_err(CatalogueError::Bucket)?;
        if d.gap {
            let stored: HashSet<ObjectId> = s3.list()?.into_iter().map(|l| l.id).collect();
            let gone: Vec<ObjectId> = {
                let idx = self.lock();
                idx.objects
                    .keys()
                    .filter(|id| !stored.contains(id))
                    .copied()
                    .collect()
            };
            self.forget_objects(s3, &gone, true);
        }
        self.forget_objects(s3, &d.ids, true);
        Ok(())
    }

    /// Drops objects deleted through another server from the index. One an image here
    /// still refers to is first checked in the bucket (`check`): kept if it is there.
    fn forget_objects(&self, s3: &crate::s3::S3Objects, ids: &[ObjectId], check: bool) {
        for id in ids {
            let referenced = {
                let idx = self.lock();
                match idx.objects.get(id) {
                    None => continue,
                    Some(_) if idx.committing.contains_key(id) => continue,
                    Some(m) => m.refs > 0,
                }
            };
            if check && referenced && s3.exists(id).unwrap_or(true) {
                continue;
            }
            let mut idx = self.lock();
            if idx.committing.contains_key(id) {
                continue;
            }
            if let Some(m) = idx.objects.remove(id) {
                idx.object_bytes -= m.size;
            }
        }
    }

    /// `delete_unreferenced` over a shared bucket. The collector condemns its candidates
    /// (a marker), then lists every server's leases, then refreshes the images from the
    /// bucket; it deletes only candidates still unreferenced, not held or pinned here,
    /// and named by no live lease, within `DELETE_BUDGET` of its marker; then records
    /// what it deleted and removes its marker.
    fn collect_shared(
        &self,
        s3: &crate::s3::S3Objects,
        candidates: Vec<(ObjectId, u64)>,
    ) -> Result<(u64, u64), CatalogueError> {
        if candidates.is_empty() {
            return Ok((0, 0));
        }
        let ids: Vec<ObjectId> = candidates.iter().map(|(id, _)| *id).collect();
        s3.renew_leases(); // drops this server's own leases whose time is up
        let marker = s3.condemn(&ids).map_err(CatalogueError::Bucket)?;
        let chosen = s3
            .all_leases(marker.now)
            .map_err(CatalogueError::Bucket)
            .and_then(|leases| {
                self.refresh_from_bucket()
                    .map_err(|e| CatalogueError::Bucket(std::io::Error::other(e.to_string())))?;
                Ok(self.choose_doomed(&ids, &leases, marker.now))
            });
        let doomed = match chosen {
            Ok(d) => d,
            Err(e) => {
                let _ = s3.finish_condemned(marker);
                return Err(e);
            }
        };
        let sizes: HashMap<ObjectId, u64> = candidates.into_iter().collect();
        let chosen_ms = marker.started.elapsed().as_millis() as u64;
        let (gone, failed) = self.delete_doomed(s3, &marker, &doomed);
        let deleted_ms = marker.started.elapsed().as_millis() as u64;
        let finished = s3.finish_condemned(marker);
        tracing::info!(
            candidates = ids.len(),
            deleted = gone.len(),
            chosen_ms,
            deleted_ms,
            "unreferenced objects collected from the bucket"
        );
        let mut idx = self.lock();
        let now = now_secs();
        for id in &doomed {
            idx.deleting.remove(id);
            if !gone.contains(id) {
                // Not deleted (budget spent or an error): back, unreferenced as before.
                let size = sizes[id];
                idx.object_bytes += size;
                idx.objects.insert(*id, ObjectMeta::unreferenced(size, now));
            }
        }
        drop(idx);
        self.deleted.notify_all();
        if let Some(e) = failed {
            return Err(e);
        }
        finished.map_err(CatalogueError::Bucket)?;
        Ok((
            gone.len() as u64,
            gone.iter().map(|id| sizes[id]).sum::<u64>(),
        ))
    }

    /// Records `doomed` as deleted, then deletes them within the marker's budget; returns
    /// those deleted, and the error that stopped it, if one did.
    fn delete_doomed(
        &self,
        s3: &crate::s3::S3Objects,
        marker: &crate::s3::Condemned,
        doomed: &[ObjectId],
    ) -> (HashSet<ObjectId>, Option<CatalogueError>) {
        let mut gone = HashSet::new();
        if doomed.is_empty() {
            return (gone, None);
        }
        if let Err(e) = s3.record_deletions(marker, doomed) {
            return (gone, Some(CatalogueError::Bucket(e)));
        }
        for chunk in doomed.chunks(BULK_DELETE) {
            if marker.started.elapsed() >= crate::leases::DELETE_BUDGET {
                break;
            }
            match s3.remove_many(chunk) {
                Ok(ids) => gone.extend(ids),
                Err(e) => return (gone, Some(e.into())),
            };
        }
        (gone, None)
    }

    /// Of the condemned `ids`, those to delete now (see `collect_shared`): taken out of
    /// the index into the deleting set.
    fn choose_doomed(
        &self,
        ids: &[ObjectId],
        leases: &[crate::leases::Record],
        now: SystemTime,
    ) -> Vec<ObjectId> {
        let t = Instant::now();
        let mut idx = self.lock();
        let keep = |id: &ObjectId| {
            idx.committing.contains_key(id) || idx.objects.get(id).is_none_or(|m| !m.collectable(t))
        };
        let doomed = crate::leases::deletable(ids, leases, now, keep);
        for id in &doomed {
            let m = idx.objects.remove(id).expect("checked present");
            idx.object_bytes -= m.size;
            idx.deleting.insert(*id);
        }
        doomed
    }
}

/// A writer that hashes (SHA-512) what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: model::hash::ObjectHasher,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Why an image's recorded checksum cannot be used (the image is then corrupt).
#[derive(Debug, thiserror::Error)]
enum ChecksumError {
    #[error("its checksum file {} is malformed: {source}", .path.display())]
    Malformed {
        path: PathBuf,
        source: model::hash::BadObjectId,
    },
    #[error("its checksum file {} cannot be read: {source}", .path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The checksums recorded at `path`, one a line (two while an expiry change is under
/// way): none if there is no file (an image stored by an earlier version).
fn read_checksum(path: &Path) -> Result<Vec<ObjectId>, ChecksumError> {
    match std::fs::read_to_string(path) {
        // An empty file is malformed, as it always was (not "no checksum").
        Ok(s) if s.trim().is_empty() => Err(ChecksumError::Malformed {
            path: path.to_path_buf(),
            source: ObjectId::from_hex("").expect_err("empty is no hash"),
        }),
        Ok(s) => s
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                ObjectId::from_hex(l.trim()).map_err(|source| ChecksumError::Malformed {
                    path: path.to_path_buf(),
                    source,
                })
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(ChecksumError::Unreadable {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// What is wrong if `bytes` hash to none of `sums` (the first is the one named).
fn mismatch(sums: &[ObjectId], bytes: &[u8]) -> Option<String> {
    let got = ObjectId::of(bytes);
    let first = sums.first()?;
    (!sums.contains(&got)).then(|| {
        format!(
            "its file does not match its SHA-512 checksum (recorded {}…, file has {}…)",
            &first.to_hex()[..16],
            &got.to_hex()[..16]
        )
    })
}

fn corrupt_error(name: &ImageName, damage: &str) -> CatalogueError {
    CatalogueError::CorruptImage {
        name: name.clone(),
        damage: damage.to_string(),
    }
}

/// Collects `(name, path, length)` of every `.image` below `dir`; removes temp files.
fn walk_images(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, PathBuf, u64)>,
) -> Result<(), OpenError> {
    for e in std::fs::read_dir(dir).map_err(io_at(dir))? {
        let e = e.map_err(io_at(dir))?;
        let path = e.path();
        let ft = e.file_type().map_err(io_at(&path))?;
        let fname = e.file_name();
        let fname = fname.to_string_lossy();
        if ft.is_dir() {
            walk_images(root, &path, out)?;
        } else if fname.ends_with(TEMP_SUFFIX) {
            let _ = std::fs::remove_file(&path);
        } else if fname == IMAGE_FILE && dir != root {
            let rel = dir.strip_prefix(root).expect("below root");
            let Some(name) = rel.to_str() else {
                continue;
            };
            if let Err(e) = ImageName::parse(name) {
                // Debug formatting: the name is shown escaped, never raw into a terminal.
                tracing::warn!("ignoring the image file {path:?}: {e}");
                continue;
            }
            let len = e.metadata().map_err(io_at(&path))?.len();
            out.push((name.to_string(), path, len));
        }
    }
    Ok(())
}

/// What replication (`crate::replication`) needs of the catalogue: every name's state,
/// and tombstones made on the master's word.
impl Catalogue {
    /// Every image name with its state, in name order (names being added are left out; a
    /// live image past its expiry is expired).
    pub fn replication_state(&self) -> Vec<model::replication::NameEntry> {
        use model::replication::{NameEntry, NameState as S};
        let now = disk::clock::unix_now();
        let idx = self.lock();
        let state = |name: &str, s: &NameState| match s {
            NameState::Live if idx.due(name, now) => Some(S::Expired),
            NameState::Live => Some(S::Live {
                checksum: idx.checksums.get(name).copied(),
                expires_at: idx.expires.get(name).copied(),
            }),
            NameState::Deleted => Some(S::Deleted),
            NameState::Expired => Some(S::Expired),
            NameState::Adding => None,
        };
        idx.names
            .iter()
            .filter_map(|(n, s)| {
                state(n, s).map(|state| NameEntry {
                    name: n.clone(),
                    state,
                })
            })
            .collect()
    }

    /// Tombstones a live image as expired now (its master expired it).
    pub fn expire_image(&self, name: &ImageName) -> Result<(), CatalogueError> {
        self.remove_image(name, NameState::Expired)
    }

    /// Records a tombstone (deleted, or `expired`) for a name never used here, so it is
    /// never used either; a name already known is left as it is (`AlreadyExists`).
    pub fn record_tombstone(&self, name: &ImageName, expired: bool) -> Result<(), CatalogueError> {
        {
            let mut idx = self.lock();
            if idx.names.contains_key(name.as_str()) {
                return Err(CatalogueError::AlreadyExists(name.clone()));
            }
            idx.names.insert(name.to_string(), NameState::Adding);
        }
        let path = self.image_path(name);
        let written = std::fs::create_dir_all(path.parent().expect("has a parent"))
            .and_then(|()| match &self.store {
                Objects::S3(s3) => s3.put_tombstone(name.as_str(), expired),
                Objects::Local(_) => Ok(()),
            })
            .and_then(|()| match expired {
                true => write_atomic(&path.with_file_name(EXPIRED_FILE), b""),
                false => Ok(()),
            })
            .and_then(|()| write_atomic(&path, b""));
        let mut idx = self.lock();
        match written {
            Ok(()) => {
                let state = if expired {
                    NameState::Expired
                } else {
                    NameState::Deleted
                };
                idx.names.insert(name.to_string(), state);
                Ok(())
            }
            Err(source) => {
                idx.names.remove(name.as_str());
                Err(CatalogueError::ImageIo {
                    action: ImageAction::Writing,
                    name: name.clone(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn put(cat: &Catalogue, data: &[u8]) -> ObjectId {
        let id = ObjectId::of(data);
        let mut w = cat.store().writer(id, data.len() as u64).unwrap();
        w.write_all(data).unwrap();
        let p = w.finish().unwrap();
        cat.commit_objects(vec![p]).unwrap();
        id
    }

    #[test]
    fn held_objects_survive_deletion_until_released_then_the_grace_period() {
        let d = tempfile::tempdir().unwrap();
        let cat = Catalogue::open_with_grace(d.path(), Duration::from_millis(300)).unwrap();
        // committed by a stream: held until released
        let a = put(&cat, b"aaa");
        assert_eq!(cat.delete_unreferenced(100, 0).unwrap(), (0, 0));
        assert_eq!(cat.counts().pinned_objects, 1);
        cat.release(&[a]);
        // released: pinned for the grace period…
        assert_eq!(cat.delete_unreferenced(100, 0).unwrap(), (0, 0));
        std::thread::sleep(Duration::from_millis(350));
        // …then collectable
        assert_eq!(cat.counts().pinned_objects, 0);
        // offered again in a stream: held, whatever the time
        assert!(cat.hold_if_present(&a));
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(cat.delete_unreferenced(100, 0).unwrap(), (0, 0));
        cat.release(&[a]);
        std::thread::sleep(Duration::from_millis(350));
        // CheckObjects pins it again
        assert_eq!(cat.check_objects(&[a]), [3]);
        assert_eq!(cat.delete_unreferenced(100, 0).unwrap(), (0, 0));
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(cat.delete_unreferenced(100, 0).unwrap(), (1, 3));
        assert!(!cat.has_object(&a));
        assert!(!cat.hold_if_present(&a));
    }

    #[test]
    fn hook_objects_must_be_stored_and_are_references() {
        use model::hooks::{Hook, Hooks};
        use model::{FileTree, Inode};
        let d = tempfile::tempdir().unwrap();
        let cat = Catalogue::open_with_grace(d.path(), Duration::from_millis(1)).unwrap();
        let hook_data = b"#!/bin/sh\ntrue\n";
        let id = ObjectId::of(hook_data);
        let mut image = Image::new(
            FileTree::with_root(Inode::dir(0o755, 0, 0)),
            None,
            Default::default(),
        );
        image.hooks = Hooks {
            pre: vec![Hook {
                name: "10-check".into(),
                hash: id,
                size: hook_data.len() as u64,
            }],
            post: vec![],
        };
        let name = ImageName::parse("hooked/1").unwrap();
        assert!(matches!(
            cat.add_image(&name, &image),
            Err(CatalogueError::InvalidMissingObjects { first, count: 1 }) if first == id
        ));
        let mut bad = image.clone();
        bad.hooks.pre.push(bad.hooks.pre[0].clone());
        put(&cat, hook_data);
        cat.release(&[id]);
        assert!(matches!(
            cat.add_image(&name, &bad),
            Err(CatalogueError::InvalidHooks { .. })
        ));
        cat.add_image(&name, &image).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(cat.delete_unreferenced(100, 0).unwrap(), (0, 0));
        assert!(
            cat.has_object(&id),
            "a hook object is referenced by its image"
        );
        drop(cat);
        // Counted again at start-up.
        let cat = Catalogue::open_with_grace(d.path(), Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(cat.delete_unreferenced(100, 0).unwrap(), (0, 0));
        assert!(cat.has_object(&id));
    }

    #[test]
    fn an_image_whose_objects_vanished_is_reported_until_they_are_uploaded_again() {
        use model::{FileTree, Inode, Mtime};
        let d = tempfile::tempdir().unwrap();
        let name = ImageName::parse("app/1").unwrap();
        let (a, b) = (ObjectId::of(b"kept"), ObjectId::of(b"lost"));
        {
            let cat = Catalogue::open(d.path()).unwrap();
            put(&cat, b"kept");
            put(&cat, b"lost");
            let mut t = FileTree::with_root(Inode::dir(0o755, 0, 0));
            for (n, (p, id)) in [("/a", a), ("/b", b)].into_iter().enumerate() {
                let m = Mtime { sec: 1, nsec: 0 };
                t.inodes
                    .insert(n as u64 + 1, Inode::file(0o644, 0, 0, m, 4, Some(id)));
                t.entries.insert(p.parse().unwrap(), n as u64 + 1);
            }
            cat.add_image(&name, &Image::new(t, None, Default::default()))
                .unwrap();
            assert_eq!(cat.counts().incomplete_images, 0);
        }
        std::fs::remove_file(
            Catalogue::open(d.path())
                .unwrap()
                .store()
                .local()
                .unwrap()
                .path_of(&b),
        )
        .unwrap();
        let cat = Catalogue::open_with_grace(d.path(), Duration::ZERO).unwrap();
        assert_eq!(cat.incomplete_images(), [("app/1".to_string(), 1)]);
        // Uploaded again: complete, and referenced (delunrefobj must not take it).
        put(&cat, b"lost");
        cat.release(&[b]);
        assert_eq!(cat.counts().incomplete_images, 0);
        assert_eq!(cat.delete_unreferenced(100, 0).unwrap(), (0, 0));
        assert!(cat.has_object(&b));
    }

    #[test]
    fn a_restart_pins_recent_objects_for_the_rest_of_the_grace_period() {
        let d = tempfile::tempdir().unwrap();
        {
            let cat = Catalogue::open_with_grace(d.path(), Duration::ZERO).unwrap();
            let a = put(&cat, b"recent");
            cat.release(&[a]);
        }
        let cat = Catalogue::open_with_grace(d.path(), Duration::from_secs(3600)).unwrap();
        assert_eq!(cat.counts().pinned_objects, 1);
        assert_eq!(cat.delete_unreferenced(100, 0).unwrap(), (0, 0));
        drop(cat);
        let cat = Catalogue::open_with_grace(d.path(), Duration::ZERO).unwrap();
        assert_eq!(cat.delete_unreferenced(100, 0).unwrap(), (1, 6));
    }

    #[test]
    fn errors_are_classified_where_they_are_made() {
        use model::{FileTree, Inode};
        let d = tempfile::tempdir().unwrap();
        let cat = Catalogue::open(d.path()).unwrap();
        let name = ImageName::parse("app/1").unwrap();
        let absent = ObjectId::of(b"absent");
        assert!(matches!(
            cat.image_json(&name),
            Err(CatalogueError::ImageNotFound(n)) if n == name
        ));
        assert!(matches!(
            cat.object_files(&[absent, ObjectId::of(b"other")]),
            Err(CatalogueError::ObjectsNotFound { count: 2, .. })
        ));
        let empty = Image::new(
            FileTree::with_root(Inode::dir(0o755, 0, 0)),
            None,
            Default::default(),
        );
        cat.add_image(&name, &empty).unwrap();
        assert!(matches!(
            cat.add_image(&name, &empty),
            Err(CatalogueError::AlreadyExists(_))
        ));
        cat.delete_image(&name).unwrap();
        let e = cat.add_image(&name, &empty).unwrap_err();
        assert!(matches!(e, CatalogueError::NameDeleted(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "image app/1 was deleted; image names are never reused"
        );
        let writable = Image::new(
            FileTree::with_root(Inode::dir(0o777, 0, 0)),
            None,
            Default::default(),
        );
        let fresh = ImageName::parse("app/2").unwrap();
        assert!(matches!(
            cat.add_image(&fresh, &writable),
            Err(CatalogueError::InvalidTree { .. })
        ));
        assert!(matches!(
            cat.delete_unreferenced(101, 0),
            Err(CatalogueError::InvalidPercentage(101))
        ));
    }

    fn empty_image(expires_at: Option<u64>) -> Image {
        use model::{FileTree, Inode};
        let mut i = Image::new(
            FileTree::with_root(Inode::dir(0o755, 0, 0)),
            None,
            Default::default(),
        );
        i.expires_at = expires_at;
        i
    }

    #[test]
    fn an_image_expires_lazily_then_is_tombstoned_and_stays_so_after_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let cat = Catalogue::open_with_grace(d.path(), Duration::ZERO).unwrap();
        let now = disk::clock::unix_now();
        let (a, b) = (
            ImageName::parse("a/1").unwrap(),
            ImageName::parse("b/1").unwrap(),
        );
        assert!(matches!(
            cat.add_image(&a, &empty_image(Some(now + 60))),
            Err(CatalogueError::InvalidExpiry { .. })
        ));
        cat.set_min_expiry_secs(1);
        cat.add_image(&a, &empty_image(Some(now + 2))).unwrap();
        cat.add_image(&b, &empty_image(Some(now + 2))).unwrap();
        assert_eq!(cat.expiring_within(60).len(), 2);
        cat.change_expiration(&b, None).unwrap();
        assert_eq!(cat.image_expiration(&b).unwrap(), None);
        // The rewritten file carries the new time and matches its (one) new checksum.
        let img: Image = serde_json::from_slice(&cat.image_json(&b).unwrap()).unwrap();
        assert_eq!(img.expires_at, None);
        std::thread::sleep(Duration::from_millis(2100));
        // Due: gone from every lookup before any sweep.
        assert_eq!(cat.list_images(""), ["b/1"]);
        assert!(!cat.image_exists(&a) && cat.name_expired(&a));
        assert!(matches!(
            cat.image_json(&a),
            Err(CatalogueError::ImageExpired(_))
        ));
        assert_eq!(cat.expire_due(), std::slice::from_ref(&a));
        assert!(matches!(
            cat.add_image(&a, &empty_image(None)),
            Err(CatalogueError::NameExpired(_))
        ));
        drop(cat);
        let cat = Catalogue::open(d.path()).unwrap();
        assert_eq!(cat.list_images(""), ["b/1"]);
        assert!(cat.name_expired(&a) && !cat.name_deleted(&a));
        assert!(cat.counts().corrupt_images == 0);
    }

    #[test]
    fn an_image_due_while_the_server_was_down_expires_at_open() {
        let d = tempfile::tempdir().unwrap();
        let name = ImageName::parse("a/1").unwrap();
        {
            let cat = Catalogue::open(d.path()).unwrap();
            cat.set_min_expiry_secs(1);
            cat.add_image(&name, &empty_image(Some(disk::clock::unix_now() + 1)))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(1100));
        let cat = Catalogue::open(d.path()).unwrap();
        assert!(cat.list_images("").is_empty());
        assert_eq!(cat.counts().deleted_names, 1);
        let dir = d.path().join("images/a/1");
        assert_eq!(std::fs::metadata(dir.join(IMAGE_FILE)).unwrap().len(), 0);
        assert!(dir.join(EXPIRED_FILE).exists());
    }

    #[test]
    fn old_images_without_expires_at_or_checksum_load_and_never_expire() {
        let d = tempfile::tempdir().unwrap();
        let name = ImageName::parse("old/1").unwrap();
        {
            let cat = Catalogue::open(d.path()).unwrap();
            cat.add_image(&name, &empty_image(None)).unwrap();
        }
        let dir = d.path().join("images/old/1");
        let json = std::fs::read_to_string(dir.join(IMAGE_FILE)).unwrap();
        let old = json.replace(",\"expires_at\":null", "");
        assert_ne!(old, json);
        std::fs::write(dir.join(IMAGE_FILE), old).unwrap();
        std::fs::remove_file(dir.join(CHECKSUM_FILE)).unwrap();
        let cat = Catalogue::open(d.path()).unwrap();
        assert_eq!(cat.list_images(""), ["old/1"]);
        assert_eq!(cat.image_expiration(&name).unwrap(), None);
        assert!(cat.expire_due().is_empty());
        // Its expiry can be set (extended from never is refused), and it stays verified.
        assert!(matches!(
            cat.change_expiration(&name, Some(disk::clock::unix_now() + 3600)),
            Err(CatalogueError::InvalidExpiry { .. })
        ));
        cat.image_json(&name).unwrap();
    }

    #[test]
    fn a_crash_between_the_two_checksums_of_an_expiry_change_leaves_a_valid_image() {
        let d = tempfile::tempdir().unwrap();
        let name = ImageName::parse("a/1").unwrap();
        let dir = d.path().join("images/a/1");
        let (old_bytes, old_sum) = {
            let cat = Catalogue::open(d.path()).unwrap();
            cat.add_image(&name, &empty_image(Some(disk::clock::unix_now() + 3600)))
                .unwrap();
            let b = std::fs::read(dir.join(IMAGE_FILE)).unwrap();
            let sum = ObjectId::of(&b);
            cat.change_expiration(&name, None).unwrap();
            (b, sum)
        };
        // As if the change had crashed after the rename and before the last write…
        let new_sum = ObjectId::of(&std::fs::read(dir.join(IMAGE_FILE)).unwrap());
        std::fs::write(dir.join(CHECKSUM_FILE), format!("{new_sum}\n{old_sum}\n")).unwrap();
        let cat = Catalogue::open(d.path()).unwrap();
        assert_eq!(cat.image_expiration(&name).unwrap(), None);
        cat.image_json(&name).unwrap();
        drop(cat);
        // …or before the rename.
        std::fs::write(dir.join(IMAGE_FILE), &old_bytes).unwrap();
        let cat = Catalogue::open(d.path()).unwrap();
        assert!(cat.image_expiration(&name).unwrap().is_some());
        cat.image_json(&name).unwrap();
        assert_eq!(cat.counts().corrupt_images, 0);
    }

    #[test]
    fn a_second_server_on_the_same_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let cat = Catalogue::open(d.path()).unwrap();
        let e = Catalogue::open(d.path())
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("in use by another process"), "{e}");
        drop(cat);
        Catalogue::open(d.path()).unwrap();
    }
    /// Deletion of unreferenced objects racing uploads of the same objects: whenever an
    /// upload holds an object, the index has it and its file is whole on disk.
    #[test]
    fn an_upload_racing_unreferenced_deletion_never_loses_its_objects() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let d = tempfile::tempdir().unwrap();
        let cat = Catalogue::open_with_grace(d.path(), Duration::ZERO).unwrap();
        let data: Vec<Vec<u8>> = (0..200u32)
            .map(|i| format!("object {i} ").repeat(40).into_bytes())
            .collect();
        /// Stops the deleting thread however the rounds end (a failed assertion included).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    cat.delete_unreferenced(100, 0).unwrap();
                }
            });
            let _stop = StopOnDrop(&stop);
            for round in 0..100 {
                // as `objects::receive` does: hold what is present, write the rest
                let mut ids = Vec::new();
                let mut pending = Vec::new();
                for o in &data {
                    let id = ObjectId::of(o);
                    if cat.hold_if_present(&id) {
                        ids.push(id);
                        continue;
                    }
                    let mut w = cat.store().writer(id, o.len() as u64).unwrap();
                    w.write_all(o).unwrap();
                    pending.push(w.finish().unwrap());
                }
                ids.extend(pending.iter().map(|p| p.id()));
                cat.commit_objects(pending).unwrap();
                for id in &ids {
                    assert!(cat.has_object(id), "round {round}: {id} not indexed");
                }
                for o in &data {
                    let id = ObjectId::of(o);
                    let len = std::fs::metadata(cat.store().local().unwrap().path_of(&id))
                        .map(|m| m.len());
                    assert_eq!(
                        len.ok(),
                        Some(o.len() as u64),
                        "round {round}: {id} held by an upload but its file is gone"
                    );
                }
                cat.release(&ids);
            }
        });
    }
}
