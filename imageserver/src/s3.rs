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

use crate::storage::Listed;
use bytes::Bytes;
use disk::objectstore::StoreError;
use futures_util::{StreamExt, TryStreamExt};
use model::hash::ObjectHasher;
use model::ObjectId;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as S3Path;
use object_store::{ClientOptions, MultipartUpload, ObjectStore as _, ObjectStoreExt as _};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;

/// Objects up to this size are put whole; larger ones are multipart uploads of parts this
/// size (S3's smallest part is 5 MiB).
pub const PART: usize = 8 << 20;
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
        self.rt.block_on(async {
            self.store
                .put(&sum_key, checksum.into())
                .await
                .map_err(|e| self.io(&sum_key, e))?;
            self.store
                .put(&key, json.into())
                .await
                .map_err(|e| self.io(&key, e))
        })?;
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
                Some((name.to_string(), m.size))
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
            let json = self.store.get(&key).await.map_err(|e| self.io(&key, e))?;
            let json = json.bytes().await.map_err(|e| self.io(&key, e))?;
            Ok((json, sum))
        })
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
