//! The S3 back-end of `storage` (`--object-store s3://BUCKET[/PREFIX]`), through the
//! `object_store` crate: objects live at `PREFIX/objects/<128 hex>`.
//!
//! Nothing unverified is stored under an object's name. A writer hashes as the upload
//! streams; an object up to `PART` bytes stays in memory and is put (one atomic PUT) only
//! at commit, after `finish` verified it; a larger one goes up as the parts of a multipart
//! upload under its final key, which S3 shows nobody until it is completed — done at
//! commit, after verification — and aborted on a mismatch, a truncation or a dropped
//! writer. An imageserver killed mid-upload leaves an incomplete multipart upload (invisible
//! under the name; a bucket lifecycle rule reclaims its parts), never an object.
//!
//! Objects are never conditionally created: Garage ignores `If-None-Match`, and it is not
//! needed. Names are SHA-512s of verified bytes, so a second PUT of a name (two uploads
//! racing) writes the identical bytes again: harmless.
//!
//! The catalogue is synchronous (it runs on blocking threads); each S3 call here is driven
//! to completion on the runtime this store was opened on (`Handle::block_on`).
//!
//! ## Unreferenced-object deletion with several imageservers over one bucket
//!
//! No server's memory decides alone whether an object may go: an add in progress on
//! another server, or an image another server added, must keep it. Without conditional
//! creates, this is a flag protocol in the bucket (Dekker's): each side writes its flag,
//! then reads the other's. The flags (bodies: `leases::encode`):
//! - a *lease* `PREFIX/leases/<server token>/<n>`: objects an add relies on, with a ttl
//!   (`LEASE_TTL`, 120 s from the object's last write, in the bucket's clock); its server
//!   rewrites it every `LEASE_RENEW` (20 s) while it needs it, and removes it after;
//! - a *condemned marker* `PREFIX/condemned/<server token>-<n>`: objects a collector means
//!   to delete, with a ttl (`MARKER_TTL`, 60 s);
//! - a *deletion record* `PREFIX/deleted/<same name>`: what a collector deletes, read by
//!   the other servers to drop those objects from their indexes; pruned
//!   `DELETED_RETENTION` (10 min) after it was written. A server that read none for half
//!   that long re-lists the bucket's objects instead.
//!
//! The adder (`Catalogue::secure`; before `CheckObjects` answers "present", before an
//! `AddObjects` batch is committed, and at `AddImage` for all the image's objects):
//! 1. A: writes its lease on the objects;
//! 2. B: lists the markers; while a live one written before its lease names one of its
//!    objects, waits (polling) — for each marker at most `MARKER_TTL` after first seeing
//!    it. A marker whose bucket time is `CLOCK_SLACK` (3 s) or more after the lease's was
//!    written after it, so its collector will see the lease: not waited for (else a
//!    collector running without pause would starve the adds);
//! 3. C: reads the deletion records not read before and drops what they name from its
//!    index (serialized with itself, so no older record is applied after a commit);
//! 4. an object a marker named is looked up in the bucket (a HEAD), forgotten if gone;
//! 5. only then relies on its index: `CheckObjects` answers from it (a forgotten object
//!    is absent: imagetool uploads it again), `AddObjects` puts its batch, `AddImage`
//!    refuses an image whose objects are missing. The `AddImage` lease is removed once
//!    the image is in the bucket; the others are kept for the pin grace period.
//!
//! The collector (`Catalogue::collect_shared`, behind `delunrefobj`):
//! 1. W: writes its marker naming the candidates (unreferenced here, not held, pinned or
//!    being committed here), and takes the bucket's time T from it (a HEAD);
//! 2. R: lists every server's leases (its own too), live if last written less than
//!    their ttl before T;
//! 3. I: refreshes the images from the bucket (new images indexed, tombstones taken in),
//!    so an image another server added, even one not yet seen here, refers to its objects;
//! 4. chooses the candidates still unreferenced, not held or pinned here and named by no
//!    live lease, and writes its deletion record naming them (before any deletion, so a
//!    collector that dies mid-way leaves nothing deleted unrecorded);
//! 5. deletes them, but none once `DELETE_BUDGET` (30 s) has passed since it began
//!    step 1 (those left are recorded but stored: other servers re-upload them if asked);
//! 6. removes its marker.
//!
//! Why no interleaving loses an object X an add relies on. Every operation is on the
//! bucket, which is linearizable for PUT/GET/LIST/DELETE (strong read-after-write, as
//! Garage and AWS S3 give). Either the adder's lease write A precedes the collector's
//! lease listing R — then R sees the lease (it is renewed until it is no longer needed,
//! so it is live), and X is not deleted; or R precedes A, and then W < R < A < B: the
//! adder's marker listing sees the marker (written before the lease, so bearing an
//! earlier time as long as the store's clocks agree within `CLOCK_SLACK`) and waits
//! until it is removed, which happens
//! after every deletion and after the deletion record is written, so C reads the record
//! and the adder treats X as absent (and uploads it again, after the deletion). A lease
//! removed after its image was put cannot open a gap either: the collector lists leases
//! (R) before images (I), so if R misses the lease, the lease was removed, hence the image
//! was put, before R < I, and I sees the image. An image another server added and this
//! collector has not refreshed is seen at step 3 the same way. A collector restarted or
//! stopped mid-way leaves a marker that counts only `MARKER_TTL`, and it deletes nothing
//! after `DELETE_BUDGET`: an adder that waited `MARKER_TTL` since first seeing the marker
//! (written before it was seen) knows no deletion is coming, checks with a HEAD and
//! re-uploads what is gone. The remaining half of `MARKER_TTL` is the margin for a
//! deletion request still in flight at the end of the budget. A dead server's leases
//! protect for at most `LEASE_TTL`; its add cannot finish anyway. A live server whose
//! lease was not rewritten for `LEASE_TRUSTED` (60 s, half the ttl: the bucket or the
//! server was too slow) refuses the `AddImage` (`LeaseLapsed`, 503) rather than rely on
//! it. Ttls are compared in the bucket's clock only (the `Last-Modified` of listed
//! records against the `Last-Modified` of one's own fresh write, whole seconds rounded
//! down, which errs towards keeping): clock skew between imageservers does not matter;
//! the waits use each server's monotonic clock.
//!
//! Cost: an add pays a lease write, a marker listing and a deletion-record listing per
//! `CheckObjects` call, per `AddObjects` batch and at `AddImage` (plus a HEAD when a
//! marker is live); on S3 `AddObjects` writes an object already stored again instead of
//! skipping it (imagetool sends only those `CheckObjects` reported absent). A collection
//! pays a marker write and HEAD, a lease listing (and one GET per lease not read before),
//! an image refresh, its deletions, a record write and the marker's removal.

use crate::leases::{self, Record};
use crate::storage::Listed;
use bytes::Bytes;
use disk::objectstore::StoreError;
use futures_util::{StreamExt, TryStreamExt};
use model::hash::ObjectHasher;
use model::ObjectId;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as S3Path;
use object_store::{ClientOptions, MultipartUpload, ObjectStore as _, ObjectStoreExt as _};
use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use std::time::{Instant, SystemTime};
use tokio::runtime::Handle;

/// Objects up to this size are put whole; larger ones are multipart uploads of parts this
/// size (S3's smallest part is 5 MiB).
pub const PART: usize = 8 << 20;
/// Keys per bulk deletion request (S3 allows 1000; smaller requests run side by side).
const BULK_KEYS: usize = 100;
/// Puts (and multipart completions) in flight at once during one commit.
const COMMIT_CONCURRENCY: usize = 16;

/// Why the S3 back-end could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("--object-store {0:?}: expected s3://BUCKET[/PREFIX]")]
    BadUrl(String),
    #[error("--s3-credentials {path}: {source}")]
    CredentialsFile { path: PathBuf, source: io::Error },
    #[error("--s3-credentials {path}: line {line}: {message}")]
    CredentialsLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or give --s3-credentials FILE")]
    NoCredentials,
    #[error("S3 store {url}: {source}")]
    Client {
        url: String,
        source: object_store::Error,
    },
}

/// Where and how to reach the bucket (from `--object-store`, `--s3-endpoint`,
/// `--s3-credentials` and the `AWS_*` variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix, without leading or trailing `/` (empty: the bucket's root).
    pub prefix: String,
    pub endpoint: Option<String>,
    pub credentials: Credentials,
}

/// An access key, its secret and the region.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub region: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials({}, region {})",
            self.access_key_id, self.region
        )
    }
}

/// Splits `s3://BUCKET[/PREFIX]` into bucket and prefix.
pub fn parse_url(url: &str) -> Result<(String, String), S3Error> {
    let bad = || S3Error::BadUrl(url.to_string());
    let rest = url.strip_prefix("s3://").ok_or_else(bad)?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_matches('/');
    if bucket.is_empty() || prefix.split('/').any(|c| c == "." || c == "..") {
        return Err(bad());
    }
    if !prefix.is_empty() && prefix.split('/').any(str::is_empty) {
        return Err(bad());
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// Reads credentials from `KEY=VALUE` or `key = value` lines: `AWS_ACCESS_KEY_ID` /
/// `aws_access_key_id`, `AWS_SECRET_ACCESS_KEY` / `aws_secret_access_key`, `AWS_REGION` /
/// `region` (so an AWS `credentials` file's profile works too). `#` and `;` start comments;
/// `[section]` lines are ignored; any other line is an error naming it.
pub fn parse_credentials(
    path: &Path,
    text: &str,
    default_region: &str,
) -> Result<Credentials, S3Error> {
    let (mut id, mut secret, mut region) = (None, None, None);
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with(['#', ';']) || line.starts_with('[') {
            continue;
        }
        let bad = |message: &str| S3Error::CredentialsLine {
            path: path.to_path_buf(),
            line: n + 1,
            message: message.to_string(),
        };
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| bad("expected KEY=VALUE"))?;
        let v = v.trim().trim_matches('"').to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => id = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_region" | "region" | "aws_default_region" => region = Some(v),
            other => return Err(bad(&format!("unknown key {other:?}"))),
        }
    }
    match (id, secret) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials {
            access_key_id,
            secret_access_key,
            region: region.unwrap_or_else(|| default_region.to_string()),
        }),
        _ => Err(S3Error::CredentialsLine {
            path: path.to_path_buf(),
            line: 0,
            message: "needs both aws_access_key_id and aws_secret_access_key".to_string(),
        }),
    }
}

/// Credentials from `file` when given, else from `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY` and `AWS_REGION` (region `us-east-1` when unset; Garage's
/// default is `garage`, so set it).
pub fn credentials(file: Option<&Path>) -> Result<Credentials, S3Error> {
    let env_region = std::env::var("AWS_REGION")
        .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|_| "us-east-1".to_string());
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| S3Error::CredentialsFile {
            path: path.to_path_buf(),
            source,
        })?;
        return parse_credentials(path, &text, &env_region);
    }
    match (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Ok(access_key_id), Ok(secret_access_key)) => Ok(Credentials {
            access_key_id,
            secret_access_key,
            region: env_region,
        }),
        _ => Err(S3Error::NoCredentials),
    }
}

/// The objects (and images) of one bucket and prefix.
pub struct S3Objects {
    store: Arc<AmazonS3>,
    /// `PREFIX/objects`.
    objects: S3Path,
    /// `PREFIX/images`.
    images: S3Path,
    /// `PREFIX/claims`: who may add which image name.
    claims: S3Path,
    /// `PREFIX/leases/<server token>/<n>`: objects adds in progress rely on.
    leases: S3Path,
    /// `PREFIX/condemned/<server token>-<n>`: objects a collector means to delete.
    condemned: S3Path,
    /// `PREFIX/deleted/<server token>-<n>`: objects a collector deleted.
    deleted: S3Path,
    /// This server's leases.
    book: std::sync::Mutex<LeaseBook>,
    /// The deletion records already read.
    deletions: std::sync::Mutex<DeletionSync>,
    /// Bodies of leases and markers read (a key's body never changes).
    bodies: std::sync::Mutex<HashMap<String, (Duration, Vec<ObjectId>)>>,
    /// The ETag of each image's `.image` this server last put or got.
    tags: std::sync::Mutex<HashMap<String, String>>,
    url: String,
    rt: Handle,
}

/// The HTTP client's options. Garage sets no `TCP_NODELAY`: over a kept-alive connection
/// its reply's second segment waits for our delayed ACK (about 40 ms per small request).
/// reqwest already sets `TCP_NODELAY` on our side, which cannot help with the server's
/// segments; a connection used once starts in quick-ACK mode, so idle connections are
/// not kept (`pool_max_idle_per_host(0)`): one connection per request, no stall.
pub fn client_options(keep_alive: bool) -> ClientOptions {
    let o = ClientOptions::new()
        .with_allow_http(true)
        .with_timeout(Duration::from_secs(300))
        .with_connect_timeout(Duration::from_secs(10));
    if keep_alive {
        o
    } else {
        o.with_pool_max_idle_per_host(0)
    }
}

impl S3Objects {
    /// Connects (lazily: the first request checks) to the bucket of `config`. Call on a
    /// runtime thread or a blocking thread of one; its handle drives every later call.
    pub fn open(config: &S3Config) -> Result<S3Objects, S3Error> {
        S3Objects::open_with(config, client_options(false))
    }

    /// `open` with explicit client options.
    pub fn open_with(config: &S3Config, options: ClientOptions) -> Result<S3Objects, S3Error> {
        // reqwest's rustls has no provider of its own here: ring, as the rest of the stack.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = if config.prefix.is_empty() {
            format!("s3://{}", config.bucket)
        } else {
            format!("s3://{}/{}", config.bucket, config.prefix)
        };
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_access_key_id(&config.credentials.access_key_id)
            .with_secret_access_key(&config.credentials.secret_access_key)
            .with_region(&config.credentials.region)
            .with_client_options(options);
        if let Some(e) = &config.endpoint {
            b = b.with_endpoint(e).with_allow_http(true);
        }
        let store = b.build().map_err(|source| S3Error::Client {
            url: url.clone(),
            source,
        })?;
        let under = |dir: &str| {
            if config.prefix.is_empty() {
                S3Path::from(dir)
            } else {
                S3Path::from(format!("{}/{dir}", config.prefix))
            }
        };
        Ok(S3Objects {
            store: Arc::new(store),
            objects: under("objects"),
            images: under("images"),
            claims: under("claims"),
            leases: under("leases"),
            condemned: under("condemned"),
            deleted: under("deleted"),
            book: Default::default(),
            deletions: Default::default(),
            bodies: Default::default(),
            tags: Default::default(),
            url,
            rt: Handle::current(),
        })
    }

    /// `s3://BUCKET[/PREFIX]`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    fn key(&self, id: &ObjectId) -> S3Path {
        self.objects.clone().join(id.to_hex())
    }

    fn error(&self, key: &S3Path, e: object_store::Error) -> StoreError {
        StoreError::Io {
            path: PathBuf::from(format!("{}/{}", self.url, key)),
            source: io::Error::other(e),
        }
    }

    /// Starts writing an object expected to hash to `id` and be `len` bytes long.
    pub fn writer(self: &Arc<Self>, id: ObjectId, len: u64) -> S3Writer {
        S3Writer {
            s3: self.clone(),
            id,
            len,
            hasher: ObjectHasher::new(),
            buf: Vec::with_capacity((len as usize).min(PART)),
            upload: None,
            failed: None,
        }
    }

    /// Puts (or completes) every pending object, a few at a time.
    pub fn commit(&self, pending: Vec<S3Pending>) -> Result<(), StoreError> {
        self.rt.block_on(
            futures_util::stream::iter(pending)
                .map(|mut p| async move {
                    let key = self.key(&p.id);
                    match std::mem::replace(&mut p.body, PendingBody::Whole(Bytes::new())) {
                        PendingBody::Whole(bytes) => {
                            self.store.put(&key, bytes.into()).await.map(|_| ())
                        }
                        PendingBody::Multipart(mut upload) => upload.complete().await.map(|_| ()),
                    }
                    .map_err(|e| self.error(&key, e))
                })
                .buffer_unordered(COMMIT_CONCURRENCY)
                .try_collect::<Vec<()>>(),
        )?;
        Ok(())
    }

    /// Every object under `PREFIX/objects/` named by a SHA-512 (anything else is skipped).
    pub fn list(&self) -> Result<Vec<Listed>, StoreError> {
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.store.list(Some(&self.objects)).try_collect())
            .map_err(|e| self.error(&self.objects, e))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let id = ObjectId::from_hex(m.location.filename()?).ok()?;
                Some(Listed {
                    id,
                    size: m.size,
                    modified: Some(m.last_modified.into()),
                })
            })
            .collect())
    }

    /// The stored size of `id` (a HEAD).
    pub fn size_of(&self, id: &ObjectId) -> io::Result<u64> {
        let key = self.key(id);
        match self.rt.block_on(self.store.head(&key)) {
            Ok(m) => Ok(m.size),
            Err(object_store::Error::NotFound { .. }) => Err(io::ErrorKind::NotFound.into()),
            Err(e) => Err(io::Error::other(self.error(&key, e))),
        }
    }

    /// A blocking reader of `id`'s bytes as they arrive.
    pub fn open_object(&self, id: &ObjectId) -> io::Result<Box<dyn Read + Send>> {
        let key = self.key(id);
        let got = match self.rt.block_on(self.store.get(&key)) {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Err(io::ErrorKind::NotFound.into()),
            Err(e) => return Err(io::Error::other(self.error(&key, e))),
        };
        let stream = got.into_stream().map_err(io::Error::other);
        let reader = tokio_util::io::StreamReader::new(stream);
        Ok(Box::new(tokio_util::io::SyncIoBridge::new_with_handle(
            reader,
            self.rt.clone(),
        )))
    }

    /// Deletes `ids` (absent is fine) in bulk requests (`DeleteObjects`) of
    /// `BULK_KEYS` keys, `COMMIT_CONCURRENCY` at once; returns those deleted, or the first
    /// error.
    pub fn remove_many(&self, ids: &[ObjectId]) -> Result<Vec<ObjectId>, StoreError> {
        let one_bulk = |chunk: &[ObjectId]| {
            let keys: Vec<object_store::Result<S3Path>> =
                chunk.iter().map(|id| Ok(self.key(id))).collect();
            let chunk = chunk.to_vec();
            async move {
                let results: Vec<object_store::Result<S3Path>> = self
                    .store
                    .delete_stream(futures_util::stream::iter(keys).boxed())
                    .collect()
                    .await;
                let mut gone = Vec::with_capacity(chunk.len());
                for (id, r) in chunk.iter().zip(results) {
                    match r {
                        Ok(_) | Err(object_store::Error::NotFound { .. }) => gone.push(*id),
                        Err(e) => return Err(self.error(&self.key(id), e)),
                    }
                }
                Ok(gone)
            }
        };
        let done: Vec<Vec<ObjectId>> = self.rt.block_on(
            futures_util::stream::iter(ids.chunks(BULK_KEYS).map(one_bulk))
                .buffer_unordered(COMMIT_CONCURRENCY)
                .try_collect(),
        )?;
        Ok(done.into_iter().flatten().collect())
    }

    /// Deletes `id` (absent is fine).
    pub fn remove(&self, id: &ObjectId) -> Result<(), StoreError> {
        let key = self.key(id);
        match self.rt.block_on(self.store.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(&key, e)),
        }
    }
}

/// The images: `PREFIX/images/<name>/.image` (the JSON; zero bytes is a tombstone) and
/// `.image.sha512` beside it, as in a data directory. The local `DATA/images` is a copy.
impl S3Objects {
    fn image_key(&self, name: &str, file: &str) -> S3Path {
        S3Path::from(format!("{}/{name}/{file}", self.images))
    }

    fn io(&self, key: &S3Path, e: object_store::Error) -> io::Error {
        io::Error::other(format!("{}/{key}: {e}", self.url))
    }

    /// Stores an image's checksum, then its JSON: whoever finds the image finds its sum.
    pub fn put_image(&self, name: &str, json: Bytes, checksum: Bytes) -> io::Result<()> {
        let sum_key = self.image_key(name, crate::catalogue::CHECKSUM_FILE);
        let key = self.image_key(name, crate::catalogue::IMAGE_FILE);
        let put = self.rt.block_on(async {
            self.store
                .put(&sum_key, checksum.into())
                .await
                .map_err(|e| self.io(&sum_key, e))?;
            self.store
                .put(&key, json.into())
                .await
                .map_err(|e| self.io(&key, e))
        })?;
        self.note_tag(name, put.e_tag);
        Ok(())
    }

    /// Replaces an image's checksum file (after a rewrite whose file held two sums).
    pub fn put_image_checksum(&self, name: &str, checksum: Bytes) -> io::Result<()> {
        let sum_key = self.image_key(name, crate::catalogue::CHECKSUM_FILE);
        self.rt
            .block_on(self.store.put(&sum_key, checksum.into()))
            .map_err(|e| self.io(&sum_key, e))?;
        Ok(())
    }

    /// Replaces an image by its tombstone (zero bytes) and drops its checksum; an
    /// `expired` tombstone is marked so first (`.image.expired`, as in a data directory).
    pub fn put_tombstone(&self, name: &str, expired: bool) -> io::Result<()> {
        let key = self.image_key(name, crate::catalogue::IMAGE_FILE);
        let sum_key = self.image_key(name, crate::catalogue::CHECKSUM_FILE);
        let marker = self.image_key(name, crate::catalogue::EXPIRED_FILE);
        self.rt.block_on(async {
            if expired {
                self.store
                    .put(&marker, Bytes::new().into())
                    .await
                    .map_err(|e| self.io(&marker, e))?;
            }
            self.store
                .put(&key, Bytes::new().into())
                .await
                .map_err(|e| self.io(&key, e))?;
            match self.store.delete(&sum_key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.io(&sum_key, e)),
            }
        })
    }

    /// Whether a tombstone is an expired image's (its `.image.expired` marker exists).
    pub fn is_expired(&self, name: &str) -> io::Result<bool> {
        let marker = self.image_key(name, crate::catalogue::EXPIRED_FILE);
        match self.rt.block_on(self.store.head(&marker)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.io(&marker, e)),
        }
    }

    /// Every image (and tombstone) in the bucket: name and size of its `.image`.
    pub fn list_images(&self) -> io::Result<Vec<(String, u64)>> {
        Ok(self
            .list_image_tags()?
            .into_iter()
            .map(|(n, size, _)| (n, size))
            .collect())
    }

    /// Every image (and tombstone) in the bucket: name, size and ETag of its `.image`.
    pub fn list_image_tags(&self) -> io::Result<Vec<(String, u64, Option<String>)>> {
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.store.list(Some(&self.images)).try_collect())
            .map_err(|e| self.io(&self.images, e))?;
        let base = format!("{}/", self.images);
        let suffix = format!("/{}", crate::catalogue::IMAGE_FILE);
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.as_ref();
                let name = key.strip_prefix(&base)?.strip_suffix(&suffix)?;
                Some((name.to_string(), m.size, m.e_tag.clone()))
            })
            .collect())
    }

    /// An image's JSON and its checksum file, when it has one.
    pub fn get_image(&self, name: &str) -> io::Result<(Bytes, Option<Bytes>)> {
        let key = self.image_key(name, crate::catalogue::IMAGE_FILE);
        let sum_key = self.image_key(name, crate::catalogue::CHECKSUM_FILE);
        self.rt.block_on(async {
            let sum = match self.store.get(&sum_key).await {
                Ok(g) => Some(g.bytes().await.map_err(|e| self.io(&sum_key, e))?),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => return Err(self.io(&sum_key, e)),
            };
            let got = self.store.get(&key).await.map_err(|e| self.io(&key, e))?;
            let tag = got.meta.e_tag.clone();
            let json = got.bytes().await.map_err(|e| self.io(&key, e))?;
            self.note_tag(name, tag);
            Ok((json, sum))
        })
    }

    /// Remembers the ETag of `name`'s `.image` as this server last put or got it.
    fn note_tag(&self, name: &str, tag: Option<String>) {
        let mut tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        match tag {
            Some(t) => tags.insert(name.to_string(), t.trim_matches('"').to_string()),
            None => tags.remove(name),
        };
    }

    /// Whether the bucket's `.image` of `name` (its listed ETag `tag`) is other than the
    /// one this server last put or got: changed through another imageserver, or unknown.
    pub fn image_changed(&self, name: &str, tag: Option<&str>) -> bool {
        let tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        match (tags.get(name), tag) {
            (Some(mine), Some(t)) => mine != t.trim_matches('"'),
            _ => true,
        }
    }
}

/// What `claim_name` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This server alone may add the name; its claim stays, marking the name used.
    Won,
    /// An image (or its tombstone, `deleted`) or a finished claim already has the name.
    Used { deleted: bool },
    /// Another imageserver claimed it at the same moment; this claim was withdrawn.
    Contended,
}

/// Image names are unique across every imageserver of the bucket without a conditional
/// create (Garage ignores `If-None-Match`): to add NAME a server puts its own claim
/// `PREFIX/claims/NAME/<unique>`, then lists `PREFIX/claims/NAME/`. It may add the image
/// only if its claim is the only one listed. Two racing servers cannot both win: S3 lists
/// what was written before the listing began (strong read-after-write consistency, as AWS
/// S3 since 2020 and Garage's quorum reads give), so of two claims the later-listed
/// server sees the other's; if both see both, both withdraw (`Contended`, retry). A won
/// claim stays for good: the name is taken even before its image appears.
impl S3Objects {
    fn claims(&self, name: &str) -> S3Path {
        S3Path::from(format!("{}/{name}", self.claims))
    }

    /// Claims `name` for one add (see the impl's comment).
    pub fn claim_name(&self, name: &str) -> io::Result<Claim> {
        let image = self.image_key(name, crate::catalogue::IMAGE_FILE);
        let dir = self.claims(name);
        let mine = dir.clone().join(unique_token());
        self.rt.block_on(async {
            match self.store.head(&image).await {
                Ok(m) => {
                    return Ok(Claim::Used {
                        deleted: m.size == 0,
                    })
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.io(&image, e)),
            }
            self.store
                .put(&mine, Bytes::new().into())
                .await
                .map_err(|e| self.io(&mine, e))?;
            let listed: Vec<object_store::ObjectMeta> = self
                .store
                .list(Some(&dir))
                .try_collect()
                .await
                .map_err(|e| self.io(&dir, e))?;
            if listed.iter().all(|m| m.location == mine) {
                return Ok(Claim::Won);
            }
            let _ = self.store.delete(&mine).await;
            // An older claim whose image exists or is being written: used; otherwise a race.
            Ok(Claim::Contended)
        })
    }

    /// Withdraws this server's claims on `name` after its add failed (best effort).
    pub fn release_name(&self, name: &str) {
        let dir = self.claims(name);
        let token = process_token();
        self.rt.block_on(async {
            let listed: Vec<object_store::ObjectMeta> = self
                .store
                .list(Some(&dir))
                .try_collect()
                .await
                .unwrap_or_default();
            for m in listed {
                if m.location.filename().is_some_and(|f| f.starts_with(&token)) {
                    let _ = self.store.delete(&m.location).await;
                }
            }
        });
    }
}

/// A lease this server holds (`S3Objects::lease`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId(u64);

/// One of this server's leases.
struct Lease {
    key: S3Path,
    body: Bytes,
    /// `None` while an add holds it; else it is dropped at this instant.
    until: Option<Instant>,
    /// When its last write succeeded (this server's clock).
    written: Instant,
}

/// This server's leases, by id.
#[derive(Default)]
struct LeaseBook {
    next: u64,
    leases: HashMap<LeaseId, Lease>,
}

/// The deletion records already read, and when they last were.
#[derive(Default)]
struct DeletionSync {
    seen: HashSet<String>,
    last: Option<Instant>,
}

/// New deletion records: the objects they name, and whether this server went so long
/// without reading them that some may have been pruned unread (then it re-lists objects).
pub struct Deletions {
    pub ids: Vec<ObjectId>,
    pub gap: bool,
}

/// A collector's condemned marker, written by `condemn`.
pub struct Condemned {
    key: S3Path,
    /// The bucket's time when it was written.
    pub now: SystemTime,
    /// This server's clock just before it was written: deletions end by
    /// `started + leases::DELETE_BUDGET`.
    pub started: Instant,
}

/// The object GC protocol's I/O (see the module comment).
impl S3Objects {
    fn lock_book(&self) -> std::sync::MutexGuard<'_, LeaseBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bucket's time now: the `Last-Modified` of `key`, just written (whole seconds,
    /// rounded down: leases and markers then look younger, which errs on the safe side).
    fn bucket_time(&self, key: &S3Path) -> io::Result<SystemTime> {
        let m = self
            .rt
            .block_on(self.store.head(key))
            .map_err(|e| self.io(key, e))?;
        Ok(m.last_modified.into())
    }

    /// Writes a lease on `ids` (held until `release_lease` or `drop_lease`). Written before
    /// the add relies on any of them being stored.
    pub fn lease(&self, ids: &[ObjectId]) -> io::Result<LeaseId> {
        let id = {
            let mut book = self.lock_book();
            book.next += 1;
            LeaseId(book.next)
        };
        let key = self
            .leases
            .clone()
            .join(process_token())
            .join(id.0.to_string());
        let body = Bytes::from(leases::encode(leases::LEASE_TTL, ids));
        let written = Instant::now();
        self.rt
            .block_on(self.store.put(&key, body.clone().into()))
            .map_err(|e| self.io(&key, e))?;
        self.lock_book().leases.insert(
            id,
            Lease {
                key,
                body,
                until: None,
                written,
            },
        );
        Ok(id)
    }

    /// Keeps a held lease until `until` (then `renew_leases` drops it); drops it now if
    /// that is already past (no pin grace period).
    pub fn release_lease(&self, id: LeaseId, until: Instant) {
        if until <= Instant::now() {
            return self.drop_lease(id);
        }
        if let Some(l) = self.lock_book().leases.get_mut(&id) {
            l.until = Some(until);
        }
    }

    /// Drops a lease now (best effort: a lease left behind expires after `LEASE_TTL`).
    pub fn drop_lease(&self, id: LeaseId) {
        let Some(l) = self.lock_book().leases.remove(&id) else {
            return;
        };
        let _ = self.rt.block_on(self.store.delete(&l.key));
    }

    /// Whether a lease was written recently enough to rely on (`LEASE_TRUSTED`).
    pub fn lease_trusted(&self, id: LeaseId) -> bool {
        self.lock_book()
            .leases
            .get(&id)
            .is_some_and(|l| l.written.elapsed() < leases::LEASE_TRUSTED)
    }

    /// Rewrites the leases still needed that were last written `LEASE_RENEW` ago or more,
    /// and drops those whose time is up. Returns how many are held.
    pub fn renew_leases(&self) -> usize {
        let now = Instant::now();
        let (due, done): (Vec<_>, Vec<_>) = {
            let mut book = self.lock_book();
            let done: Vec<LeaseId> = book
                .leases
                .iter()
                .filter(|(_, l)| l.until.is_some_and(|u| u <= now))
                .map(|(id, _)| *id)
                .collect();
            let done = done
                .into_iter()
                .filter_map(|id| book.leases.remove(&id))
                .map(|l| l.key)
                .collect();
            let due = book
                .leases
                .iter()
                .filter(|(_, l)| now.duration_since(l.written) >= leases::LEASE_RENEW)
                .map(|(id, l)| (*id, l.key.clone(), l.body.clone()))
                .collect();
            (due, done)
        };
        for key in done {
            let _ = self.rt.block_on(self.store.delete(&key));
        }
        for (id, key, body) in due {
            let t = Instant::now();
            match self.rt.block_on(self.store.put(&key, body.into())) {
                Ok(_) => {
                    let mut book = self.lock_book();
                    match book.leases.get_mut(&id) {
                        Some(l) => l.written = t,
                        None => {
                            // Dropped while it was rewritten: drop it again.
                            drop(book);
                            let _ = self.rt.block_on(self.store.delete(&key));
                        }
                    }
                }
                Err(e) => tracing::warn!("renewing lease {key}: {e}"),
            }
        }
        self.lock_book().leases.len()
    }

    /// Every record under `dir` as listed, with its body (read once per key).
    fn records(&self, dir: &S3Path) -> io::Result<Vec<(S3Path, Record)>> {
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.store.list(Some(dir)).try_collect())
            .map_err(|e| self.io(dir, e))?;
        {
            // Forget the bodies of records gone from under `dir`.
            let listed: HashSet<&str> = metas.iter().map(|m| m.location.as_ref()).collect();
            let under = format!("{dir}/");
            let mut bodies = self.bodies.lock().unwrap_or_else(|p| p.into_inner());
            bodies.retain(|k, _| !k.starts_with(&under) || listed.contains(k.as_str()));
        }
        let mut out = Vec::with_capacity(metas.len());
        for m in metas {
            let cached = self
                .bodies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(m.location.as_ref())
                .cloned();
            let (ttl, ids) = match cached {
                Some(b) => b,
                None => {
                    let got = self
                        .rt
                        .block_on(async { self.store.get(&m.location).await?.bytes().await });
                    let body = match got {
                        Ok(b) => b,
                        Err(object_store::Error::NotFound { .. }) => continue, // just removed
                        Err(e) => return Err(self.io(&m.location, e)),
                    };
                    let Ok(parsed) = leases::decode(&body) else {
                        tracing::warn!(
                            "ignoring {}/{}: not a lease or marker",
                            self.url,
                            m.location
                        );
                        continue;
                    };
                    self.bodies
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(m.location.to_string(), parsed.clone());
                    parsed
                }
            };
            let written = m.last_modified.into();
            out.push((m.location, Record { written, ttl, ids }));
        }
        Ok(out)
    }

    /// Forgets the cached body of a removed record.
    fn forget_body(&self, key: &S3Path) {
        self.bodies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key.as_ref());
    }

    /// After `lease` (id `lease`) on `ids`: waits while a live condemned marker written
    /// before the lease (`leases::condemned`) names any of them, each marker at most
    /// `MARKER_TTL` after this server first saw it. Returns the objects such a marker
    /// named: the caller must check they are still stored.
    pub fn wait_condemned(
        &self,
        lease: LeaseId,
        ids: &HashSet<ObjectId>,
    ) -> io::Result<Vec<ObjectId>> {
        let mut flagged: HashSet<ObjectId> = HashSet::new();
        let mut first_seen: HashMap<String, Instant> = HashMap::new();
        let mut clock: Option<(SystemTime, Instant)> = None;
        loop {
            let mut markers = self.records(&self.condemned)?;
            markers.retain(|(_, m)| m.ids.iter().any(|id| ids.contains(id)));
            if markers.is_empty() {
                break; // (the bucket's time is needed only when one names ours)
            }
            let (t0, i0) = match clock {
                Some(c) => c,
                None => {
                    let key = self.lock_book().leases.get(&lease).map(|l| l.key.clone());
                    let key = key.ok_or_else(|| io::Error::other("lease dropped"))?;
                    *clock.insert((self.bucket_time(&key)?, Instant::now()))
                }
            };
            let now = t0 + i0.elapsed();
            let waiting: Vec<&(S3Path, Record)> = markers
                .iter()
                .filter(|(key, m)| {
                    let seen = *first_seen
                        .entry(key.to_string())
                        .or_insert_with(Instant::now);
                    seen.elapsed() < leases::MARKER_TTL
                        && !leases::condemned(ids, std::slice::from_ref(m), t0, now).is_empty()
                })
                .collect();
            if waiting.is_empty() {
                break;
            }
            for (_, m) in &waiting {
                flagged.extend(leases::condemned(ids, std::slice::from_ref(m), t0, now));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut v: Vec<ObjectId> = flagged.into_iter().collect();
        v.sort();
        Ok(v)
    }

    /// Writes a condemned marker naming `ids`, the collector's first step.
    pub fn condemn(&self, ids: &[ObjectId]) -> io::Result<Condemned> {
        let started = Instant::now();
        let key = self.condemned.clone().join(unique_token());
        let body = leases::encode(leases::MARKER_TTL, ids);
        self.rt
            .block_on(self.store.put(&key, Bytes::from(body).into()))
            .map_err(|e| self.io(&key, e))?;
        let now = self.bucket_time(&key)?;
        Ok(Condemned { key, now, started })
    }

    /// Every lease of every server (the collector's second step, after its marker);
    /// removes those left by servers gone for twice their ttl.
    pub fn all_leases(&self, now: SystemTime) -> io::Result<Vec<Record>> {
        let listed = self.records(&self.leases)?;
        let mut live = Vec::with_capacity(listed.len());
        for (key, r) in listed {
            if leases::prunable(r.written, r.ttl, now) {
                let _ = self.rt.block_on(self.store.delete(&key));
                self.forget_body(&key);
            } else {
                live.push(r);
            }
        }
        Ok(live)
    }

    /// The collector's step before its first deletion: records the objects it is about to
    /// delete (for the other servers' indexes; written first, so a collector that dies
    /// mid-way leaves no deleted object unrecorded).
    pub fn record_deletions(&self, c: &Condemned, doomed: &[ObjectId]) -> io::Result<()> {
        let name = c.key.filename().unwrap_or_default().to_string();
        let key = self.deleted.clone().join(name.as_str());
        let body = leases::encode(leases::DELETED_RETENTION, doomed);
        self.rt
            .block_on(self.store.put(&key, Bytes::from(body).into()))
            .map_err(|e| self.io(&key, e))?;
        let mut sync = self.deletions.lock().unwrap_or_else(|p| p.into_inner());
        sync.seen.insert(key.to_string());
        Ok(())
    }

    /// The collector's last step: removes its marker; prunes old markers and deletion
    /// records.
    pub fn finish_condemned(&self, c: Condemned) -> io::Result<()> {
        self.rt
            .block_on(self.store.delete(&c.key))
            .map_err(|e| self.io(&c.key, e))?;
        self.forget_body(&c.key);
        self.prune(&self.condemned, |r| {
            leases::prunable(r.written, r.ttl, c.now)
        });
        self.prune(&self.deleted, |r| {
            leases::prunable(r.written, r.ttl / 2, c.now)
        });
        Ok(())
    }

    /// Removes (best effort) the records under `dir` that `old` says are out of date.
    fn prune(&self, dir: &S3Path, old: impl Fn(&Record) -> bool) {
        let Ok(listed) = self.records(dir) else {
            return;
        };
        for (key, _) in listed.iter().filter(|(_, r)| old(r)) {
            let _ = self.rt.block_on(self.store.delete(key));
            self.forget_body(key);
        }
    }

    /// Marks every deletion record now in the bucket as read (at start-up, just before the
    /// objects are listed: the listing already lacks what they name).
    pub fn skip_deletions(&self) -> io::Result<()> {
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.store.list(Some(&self.deleted)).try_collect())
            .map_err(|e| self.io(&self.deleted, e))?;
        let mut sync = self.deletions.lock().unwrap_or_else(|p| p.into_inner());
        sync.seen = metas.into_iter().map(|m| m.location.to_string()).collect();
        sync.last = Some(Instant::now());
        Ok(())
    }

    /// The objects named by deletion records not read before (see `Deletions`).
    pub fn new_deletions(&self) -> io::Result<Deletions> {
        let started = Instant::now();
        let listed = self.records(&self.deleted)?;
        let mut sync = self.deletions.lock().unwrap_or_else(|p| p.into_inner());
        let gap = sync
            .last
            .is_none_or(|t| t.elapsed() > leases::DELETED_RETENTION / 2);
        let mut ids = Vec::new();
        for (key, r) in &listed {
            if !sync.seen.contains(key.as_ref()) {
                ids.extend(r.ids.iter().copied());
            }
        }
        sync.seen = listed.iter().map(|(k, _)| k.to_string()).collect();
        sync.last = Some(started);
        Ok(Deletions { ids, gap })
    }

    /// Whether `id` is stored (a HEAD).
    pub fn exists(&self, id: &ObjectId) -> io::Result<bool> {
        match self.size_of(id) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// This process's part of a claim's name: host-independent and unique enough (pid, start
/// time, a hash of both).
fn process_token() -> String {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN
        .get_or_init(|| {
            let seed = format!(
                "{}-{:?}-{:?}",
                std::process::id(),
                std::time::SystemTime::now(),
                std::thread::current().id()
            );
            ObjectId::of(seed.as_bytes()).to_hex()[..24].to_string()
        })
        .clone()
}

/// A claim's name: this process's token and a counter.
fn unique_token() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", process_token())
}

/// The bytes of a verified object awaiting commit.
enum PendingBody {
    /// Small: put whole at commit.
    Whole(Bytes),
    /// Large: every part uploaded; completed at commit.
    Multipart(Box<dyn MultipartUpload>),
}

/// A verified object not yet visible under its name.
pub struct S3Pending {
    pub id: ObjectId,
    pub len: u64,
    body: PendingBody,
}

/// An object being written to S3: hashed as it streams; see the module comment.
pub struct S3Writer {
    s3: Arc<S3Objects>,
    id: ObjectId,
    len: u64,
    hasher: ObjectHasher,
    buf: Vec<u8>,
    upload: Option<Box<dyn MultipartUpload>>,
    /// An upload error, reported by the next write or `finish`.
    failed: Option<io::Error>,
}

impl S3Writer {
    /// Sends the buffered part, starting the multipart upload if needed.
    fn send_part(&mut self) -> io::Result<()> {
        let s3 = self.s3.clone();
        let key = s3.key(&self.id);
        let part = Bytes::from(std::mem::take(&mut self.buf));
        let upload = &mut self.upload;
        s3.rt
            .block_on(async {
                if upload.is_none() {
                    *upload = Some(s3.store.put_multipart(&key).await?);
                }
                upload
                    .as_mut()
                    .expect("started")
                    .put_part(part.into())
                    .await
            })
            .map_err(|e| io::Error::other(s3.error(&key, e)))?;
        self.buf = Vec::with_capacity(PART);
        Ok(())
    }

    /// Checks length and hash; on success the object awaits `S3Objects::commit`. On
    /// failure the multipart upload (if any) is aborted: nothing under the name.
    pub fn finish(mut self) -> Result<S3Pending, StoreError> {
        if let Some(e) = self.failed.take() {
            return Err(StoreError::Io {
                path: PathBuf::from(format!("{}/{}", self.s3.url, self.s3.key(&self.id))),
                source: e,
            });
        }
        let (computed, got) = std::mem::replace(&mut self.hasher, ObjectHasher::new()).finish();
        if got != self.len {
            return Err(StoreError::Truncated {
                id: Box::new(self.id),
                expected: self.len,
                got,
            });
        }
        if computed != self.id {
            return Err(StoreError::HashMismatch {
                expected: Box::new(self.id),
                computed: Box::new(computed),
            });
        }
        let body = if self.upload.is_some() {
            if !self.buf.is_empty() {
                let key = self.s3.key(&self.id);
                self.send_part().map_err(|source| StoreError::Io {
                    path: PathBuf::from(format!("{}/{key}", self.s3.url)),
                    source,
                })?;
            }
            PendingBody::Multipart(self.upload.take().expect("started"))
        } else {
            PendingBody::Whole(Bytes::from(std::mem::take(&mut self.buf)))
        };
        Ok(S3Pending {
            id: self.id,
            len: self.len,
            body,
        })
    }
}

impl io::Write for S3Writer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(e) = &self.failed {
            return Err(io::Error::new(e.kind(), e.to_string()));
        }
        self.hasher.update(data);
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PART {
            if let Err(e) = self.send_part() {
                self.failed = Some(io::Error::new(e.kind(), e.to_string()));
                return Err(e);
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for S3Writer {
    /// An unfinished (or refused) multipart upload is aborted in the background.
    fn drop(&mut self) {
        if let Some(mut upload) = self.upload.take() {
            self.s3.rt.spawn(async move {
                let _ = upload.abort().await;
            });
        }
    }
}

impl Drop for S3Pending {
    /// A verified multipart upload never committed (its batch failed) is aborted.
    fn drop(&mut self) {
        if let PendingBody::Multipart(_) = &self.body {
            let body = std::mem::replace(&mut self.body, PendingBody::Whole(Bytes::new()));
            if let PendingBody::Multipart(mut upload) = body {
                if let Ok(rt) = Handle::try_current() {
                    rt.spawn(async move {
                        let _ = upload.abort().await;
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let ok = |u: &str, b: &str, p: &str| {
            assert_eq!(parse_url(u).unwrap(), (b.to_string(), p.to_string()), "{u}")
        };
        ok("s3://images", "images", "");
        ok("s3://images/", "images", "");
        ok("s3://images/site/a", "images", "site/a");
        ok("s3://images/site/", "images", "site");
        for bad in [
            "images",
            "s3://",
            "s3:///x",
            "http://b",
            "s3://b/a//c",
            "s3://b/../x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credential_files() {
        let p = Path::new("/c");
        let c =
            parse_credentials(p, "AWS_ACCESS_KEY_ID=GK1\nAWS_SECRET_ACCESS_KEY=s\n", "r0").unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.secret_access_key.as_str()),
            ("GK1", "s")
        );
        assert_eq!(c.region, "r0");
        let ini = "[default]\n# comment\naws_access_key_id = GK2\naws_secret_access_key = \"t\"\nregion = garage\n";
        let c = parse_credentials(p, ini, "r0").unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.region.as_str()),
            ("GK2", "garage")
        );
        assert_eq!(c.secret_access_key, "t");
        for (bad, line) in [
            ("aws_access_key_id=x\n", 0),
            ("aws_access_key_id=x\nnonsense\n", 2),
            ("aws_access_key_id=x\ncolour=blue\n", 2),
        ] {
            match parse_credentials(p, bad, "r") {
                Err(S3Error::CredentialsLine { line: l, .. }) => assert_eq!(l, line, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let secret = format!("{:?}", c);
        assert!(
            !secret.contains("\"t\""),
            "Debug hides the secret: {secret}"
        );
    }
}
