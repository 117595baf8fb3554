//! Fetching objects from an imageserver into a local `ObjectStore` (subd's Fetch and
//! `patch-directory`): `ObjectServer.GetObjects` in batches, each reply streamed through a
//! small bounded channel into a blocking writer that verifies every object's length and
//! SHA-512 before it is kept. Batches run concurrently as tasks, one per CPU (at most 4); the
//! objects they verify are committed (a sync, then the renames to their names) by one
//! commit at a time running beside the batches still streaming, which takes everything
//! verified since the last one began, so the fetch ends waiting only for the last. The
//! names are not synced: the update using the objects syncs before its first rename.
//! `fetch_objects_held` (`patch-directory`, whose update follows at once) names nothing:
//! it only syncs beside the batches, and hands the verified objects over under their temp
//! names (`HeldObjects`). Given sizes (the final metadata), batches carry equal bytes, the
//! heaviest first.
//! A mismatching object is discarded and reported; a truncated reply keeps the whole
//! objects before the cut; a full disk is reported as such. Given several imageservers
//! (`ImageServerClient` fails each call over itself), a reply that breaks off moves the
//! client to the next server and the objects the batch still lacks are asked for there,
//! each batch on at most every server once.

use crate::client::{ClientError, ImageServerClient};
use disk::objectstore::{HeldObjects, ObjectStore, PendingObject, StoreError, Unverified};
use futures_util::StreamExt;
use model::hash::ObjectId;
use model::image::Inode;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to fetch.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Objects asked for per request.
    pub batch_objects: usize,
    /// Cap on the transfer rate; `None` = unlimited.
    pub bytes_per_second: Option<u64>,
    /// The owner, mode and mtime each object will have at its last use, given to it as
    /// it is stored (`disk::apply::give_final_metadata`), so the update's stage, which
    /// runs alone, finds that work done while the fetch ran on every CPU.
    pub final_metadata: Option<Arc<HashMap<ObjectId, Inode>>>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            batch_objects: 1000,
            bytes_per_second: None,
            final_metadata: None,
        }
    }
}

/// `FetchOptions::final_metadata` from a plan's (or a Fetch request's) list.
pub fn metadata_map(list: &[model::plan::FinalMetadata]) -> Option<Arc<HashMap<ObjectId, Inode>>> {
    if list.is_empty() {
        return None;
    }
    Some(Arc::new(
        list.iter().map(|m| (m.object, m.inode())).collect(),
    ))
}

/// What a fetch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// `GetObjects` requests made.
    pub requests: u64,
    /// Objects newly stored.
    pub objects: u64,
    /// Bytes of the objects newly stored.
    pub bytes: u64,
    /// Objects skipped because the store already held them.
    pub already_present: u64,
}

/// Why a fetch did not bring every object.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error(
        "object cache {dir}: no space left on device (stored {stored} objects before it filled)"
    )]
    DiskFull { dir: String, stored: u64 },
    #[error(
        "{count} fetched objects failed SHA-512 verification and were discarded (first {first})"
    )]
    Mismatch { count: usize, first: Box<ObjectId> },
    #[error("reply truncated: {0}")]
    Truncated(String),
    #[error("server sent an object that was not asked for: {0}")]
    Unexpected(Box<ObjectId>),
    #[error("server did not send {count} of the objects asked for (first {first})")]
    Missing { count: usize, first: Box<ObjectId> },
    #[error("object cache: {0}")]
    Store(StoreError),
}

impl FetchError {
    /// True when the local disk filled up.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, FetchError::DiskFull { .. })
    }
}

/// A reply body that broke off while it was being received.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct TransferError(#[from] reqwest::Error);

/// Reads the chunks of a reply as they arrive (blocking side of the channel).
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, TransferError>>,
    cur: bytes::Bytes,
    /// A transfer error received while filling a buffer, for the next read.
    failed: Option<TransferError>,
}

impl io::BufRead for ChunkReader {
    /// The rest of the chunk received last, waiting for the next one when it is used up:
    /// its bytes are written to their file from where they arrived, not copied first.
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.cur.is_empty() {
            if let Some(e) = self.failed.take() {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, e));
            }
            match self.rx.blocking_recv() {
                None => break,
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => self.failed = Some(e),
            }
        }
        Ok(&self.cur)
    }

    fn consume(&mut self, n: usize) {
        let _ = self.cur.split_to(n);
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use io::BufRead;
        let k = {
            let have = self.fill_buf()?;
            let k = have.len().min(buf.len());
            buf[..k].copy_from_slice(&have[..k]);
            k
        };
        self.consume(k);
        Ok(k)
    }
}

/// Verified objects held back for one commit at most: bounds the memory they take and
/// the work a crash loses.
const COMMIT_EVERY: usize = 8192;

/// Outcome of writing one reply.
struct BatchOutcome {
    /// Verified objects, not yet committed.
    pending: Vec<PendingObject>,
    bytes: u64,
    received: HashSet<ObjectId>,
    mismatched: Vec<ObjectId>,
    error: Option<FetchError>,
    /// The index (in the client's list) of the imageserver that sent the reply.
    server: usize,
}

fn no_space(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT)
}

/// Copies up to `len` bytes from `r` to `w`, each piece written from `r`'s buffer; returns
/// how many were copied (fewer only at the end of `r`).
fn copy_object(r: &mut impl io::BufRead, len: u64, w: &mut impl io::Write) -> io::Result<u64> {
    let mut done = 0u64;
    while done < len {
        let have = match r.fill_buf() {
            Ok([]) => break,
            Ok(have) => have,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let k = have.len().min((len - done) as usize);
        w.write_all(&have[..k])?;
        r.consume(k);
        done += k as u64;
    }
    Ok(done)
}

/// Parses frames from `r` into `store`, verifying each; returns what verified, uncommitted.
fn write_frames(
    mut r: impl io::BufRead,
    store: &ObjectStore,
    wanted: &HashSet<ObjectId>,
    metadata: Option<&HashMap<ObjectId, Inode>>,
) -> BatchOutcome {
    let mut out = BatchOutcome {
        pending: Vec::new(),
        bytes: 0,
        received: HashSet::new(),
        mismatched: Vec::new(),
        error: None,
        server: 0,
    };
    let dir = store.dir().display().to_string();
    // A head start only: the stage sets whatever this could not.
    let give = |id: &ObjectId, f: &std::fs::File| {
        metadata
            .and_then(|m| m.get(id))
            .is_some_and(|want| disk::apply::give_final_metadata(f, want).is_ok())
    };
    let mut queue = VerifyQueue::default();
    loop {
        let (id, len) = match model::frame::read_header(&mut r) {
            Ok(None) => break,
            Ok(Some(h)) => h,
            Err(e) => {
                out.error = Some(FetchError::Truncated(e.to_string()));
                break;
            }
        };
        if !wanted.contains(&id) {
            out.error = Some(FetchError::Unexpected(Box::new(id)));
            break;
        }
        out.received.insert(id);
        // Long objects are hashed as they stream; the others are checked together, eight
        // at a time (`VerifyQueue`).
        let alone = len >= HASH_AS_STREAMED;
        let made = if alone {
            store.writer(id, len)
        } else {
            let mode = metadata.and_then(|m| m.get(&id)).map(|i| i.mode);
            store.unhashed_writer(id, len, mode)
        };
        let mut w = match made {
            Ok(w) => w,
            Err(e) if e.is_no_space() => {
                out.error = Some(FetchError::DiskFull {
                    dir: dir.clone(),
                    stored: 0,
                });
                break;
            }
            Err(e) => {
                out.error = Some(FetchError::Store(e));
                break;
            }
        };
        match copy_object(&mut r, len, &mut w) {
            Ok(n) if n == len => {}
            Ok(n) => {
                out.error = Some(FetchError::Truncated(format!(
                    "object {id}: got {n} of {len} bytes"
                )));
                break;
            }
            Err(e) if no_space(&e) => {
                out.error = Some(FetchError::DiskFull {
                    dir: dir.clone(),
                    stored: 0,
                });
                break;
            }
            Err(e) => {
                out.error = Some(FetchError::Truncated(format!("object {id}: {e}")));
                break;
            }
        }
        if alone {
            out.take(id, w.finish_preparing(|f| give(&id, f)));
        } else {
            match w.finish_unverified() {
                Ok(u) => queue.push(u, len),
                Err(e) => out.take(id, Err(e)),
            }
            if queue.full() {
                queue.verify(&mut out, &give);
            }
        }
        if out.error.is_some() {
            break;
        }
    }
    // Whatever arrived whole is checked and kept, even when the reply broke off.
    queue.verify(&mut out, &give);
    out
}

/// Objects written whole, waiting to be hashed together.
#[derive(Default)]
struct VerifyQueue {
    objects: Vec<Unverified>,
    bytes: u64,
}

/// Objects at least this long are hashed as they stream, one at a time: in a queue of
/// shorter ones, one of them would be left to end alone in its lane (and it would be read
/// back from the page cache for nothing).
const HASH_AS_STREAMED: u64 = model::hash_lanes::ALONE_BYTES;

/// A queue is checked once it holds this many objects or bytes: enough for the lanes to
/// stay busy, few enough that the bytes are still in the page cache and the open files few.
const VERIFY_OBJECTS: usize = 128;
const VERIFY_BYTES: u64 = 16 << 20;

impl VerifyQueue {
    fn push(&mut self, u: Unverified, len: u64) {
        self.objects.push(u);
        self.bytes += len;
    }

    fn full(&self) -> bool {
        self.objects.len() >= VERIFY_OBJECTS || self.bytes >= VERIFY_BYTES
    }

    /// Hashes the queued objects and adds each outcome to `out`.
    fn verify(
        &mut self,
        out: &mut BatchOutcome,
        give: &impl Fn(&ObjectId, &std::fs::File) -> bool,
    ) {
        let objects = std::mem::take(&mut self.objects);
        self.bytes = 0;
        let ids: Vec<ObjectId> = objects.iter().map(|u| *u.id()).collect();
        for (id, r) in ids
            .into_iter()
            .zip(disk::objectstore::verify(objects, give))
        {
            out.take(id, r);
        }
    }
}

impl BatchOutcome {
    /// Adds one object's outcome: kept, discarded as mismatching, or the batch's error.
    fn take(&mut self, id: ObjectId, r: Result<PendingObject, StoreError>) {
        match r {
            Ok(p) => {
                self.bytes += p.len;
                self.pending.push(p);
            }
            Err(StoreError::HashMismatch { .. }) => {
                tracing::warn!("fetched object {id} does not match its SHA-512: discarded");
                self.mismatched.push(id);
            }
            Err(e) => {
                self.error.get_or_insert(FetchError::Store(e));
            }
        }
    }
}

/// Commits `pending` (off the executor: it syncs); returns how many were new. The store
/// is a cache: its new names are left for the update using them to make durable
/// (`ObjectStore::commit_unsynced_names`).
async fn commit(store: &ObjectStore, pending: Vec<PendingObject>) -> Result<u64, FetchError> {
    if pending.is_empty() {
        return Ok(0);
    }
    let st = store.clone();
    match tokio::task::spawn_blocking(move || st.commit_unsynced_names(pending)).await {
        Ok(Ok(n)) => Ok(n as u64),
        Ok(Err(e)) if e.is_no_space() => Err(FetchError::DiskFull {
            dir: store.dir().display().to_string(),
            stored: 0,
        }),
        Ok(Err(e)) => Err(FetchError::Store(e)),
        Err(e) => Err(FetchError::Truncated(format!("commit failed: {e}"))),
    }
}

/// Fetches one batch: one request, its reply streamed into a blocking writer.
async fn fetch_batch(
    client: &ImageServerClient,
    store: &ObjectStore,
    batch: &[ObjectId],
    opts: &FetchOptions,
    pace: &Pace,
) -> Result<BatchOutcome, FetchError> {
    let t_batch = Instant::now();
    let (server, resp) = client.get_objects_from(batch).await?;
    let wanted: HashSet<ObjectId> = batch.iter().copied().collect();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let st = store.clone();
    let metadata = opts.final_metadata.clone();
    let writer = tokio::task::spawn_blocking(move || {
        write_frames(
            ChunkReader {
                rx,
                cur: bytes::Bytes::new(),
                failed: None,
            },
            &st,
            &wanted,
            metadata.as_deref(),
        )
    });
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let item = chunk.map_err(TransferError::from);
        let failed = item.is_err();
        let len = item.as_ref().map_or(0, |b| b.len() as u64);
        if tx.send(item).await.is_err() || failed {
            break; // the writer stopped (disk full, bad frame) or the connection broke
        }
        if let Some(rate) = opts.bytes_per_second.filter(|r| *r > 0) {
            let total = pace.transferred.fetch_add(len, Ordering::Relaxed) + len;
            let due = Duration::from_secs_f64(total as f64 / rate as f64);
            let spent = pace.started.elapsed();
            if due > spent {
                tokio::time::sleep(due - spent).await;
            }
        }
    }
    drop(tx);
    let mut out = writer
        .await
        .map_err(|e| FetchError::Truncated(format!("writer failed: {e}")))?;
    out.server = server;
    tracing::debug!(
        "batch of {} objects ({} bytes): {:.1} ms",
        batch.len(),
        out.bytes,
        t_batch.elapsed().as_secs_f64() * 1000.0
    );
    Ok(out)
}

/// Runs one batch as a task of its own (its receive loop on a runtime worker, beside the
/// socket it reads, not on the thread awaiting the fetch).
fn spawn_batch(
    tasks: &mut Tasks,
    client: &ImageServerClient,
    store: &ObjectStore,
    (batch, attempt): Batch,
    opts: &FetchOptions,
    pace: &Arc<Pace>,
) {
    let (client, store, opts, pace) = (client.clone(), store.clone(), opts.clone(), pace.clone());
    tasks.spawn(async move {
        let r = fetch_batch(&client, &store, &batch, &opts, &pace).await;
        ((batch, attempt), r)
    });
}

/// A batch's objects, and how many imageservers it has been tried on before.
type Batch = (Vec<ObjectId>, usize);

/// The batches running.
type Tasks = tokio::task::JoinSet<(Batch, Result<BatchOutcome, FetchError>)>;

/// Bytes moved so far by all batches of one fetch, for the rate limit.
struct Pace {
    started: Instant,
    transferred: AtomicU64,
}

/// Fetches `hashes` (those the store lacks) from `client` into `store`, running up to one
/// batch per CPU (at most 4) at a time so hashing and file creation use every core.
/// Phases: select what is missing → split it into batches → run them, absorbing each
/// result (its objects committed beside the batches still running) → commit the rest and
/// report.
pub async fn fetch_objects(
    client: &ImageServerClient,
    store: &ObjectStore,
    hashes: &[ObjectId],
    opts: &FetchOptions,
) -> Result<FetchStats, FetchError> {
    let run = fetch_run(client, store, hashes, opts, false).await;
    run.finish(store).await
}

/// `fetch_objects` for an update that follows at once in this process: the fetched
/// objects are verified but left under their temp names (`HeldObjects`), sparing each a
/// sync and a rename; the update takes them from there and `HeldObjects::release` names
/// the rest. On an error, whatever verified is named and kept, as `fetch_objects` does.
pub async fn fetch_objects_held(
    client: &ImageServerClient,
    store: &ObjectStore,
    hashes: &[ObjectId],
    opts: &FetchOptions,
) -> Result<(FetchStats, HeldObjects), FetchError> {
    let mut run = fetch_run(client, store, hashes, opts, true).await;
    run.settle_commit().await;
    if run.first_error.is_some() || !run.mismatched.is_empty() {
        return run
            .finish(store)
            .await
            .map(|s| (s, HeldObjects::new(store, Vec::new())));
    }
    let held = std::mem::take(&mut run.pending);
    run.stats.objects = held.len() as u64;
    run.log_done(Instant::now());
    Ok((run.stats, HeldObjects::new(store, held)))
}

/// Runs the batches of a fetch; `hold`: verified objects are kept pending, not named.
async fn fetch_run(
    client: &ImageServerClient,
    store: &ObjectStore,
    hashes: &[ObjectId],
    opts: &FetchOptions,
    hold: bool,
) -> FetchRun {
    let mut run = FetchRun {
        hold,
        ..FetchRun::default()
    };
    let todo = run.select_missing(store, hashes);
    let lanes = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4);
    let pace = Arc::new(Pace {
        started: run.started,
        transferred: AtomicU64::new(0),
    });
    let size = batch_size(opts, todo.len(), lanes);
    let mut batches = split_batches(todo, size, opts.final_metadata.as_deref());
    // Dropping the set (the fetch abandoned) aborts the batches still running.
    let mut tasks = tokio::task::JoinSet::new();
    while tasks.len() < lanes {
        let Some(batch) = batches.pop_front() else {
            break;
        };
        spawn_batch(&mut tasks, client, store, batch, opts, &pace);
    }
    while let Some(joined) = tasks.join_next().await {
        if let Some(again) = run.absorb(store, joined, client).await {
            batches.push_back(again);
        }
        while tasks.len() < lanes {
            let Some(batch) = batches.pop_front() else {
                break;
            };
            spawn_batch(&mut tasks, client, store, batch, opts, &pace);
        }
    }
    run
}

/// Objects per batch: `opts.batch_objects`, but small fetches are split across the lanes
/// too, never into batches of fewer than 16.
fn batch_size(opts: &FetchOptions, todo: usize, lanes: usize) -> usize {
    opts.batch_objects.max(1).min(todo.div_ceil(lanes).max(16))
}

/// Splits `todo` into batches of at most `size` objects. Given the objects' sizes
/// (`metadata`), the bytes are shared out evenly, largest object first, each to the batch
/// with the fewest bytes so far, and the heaviest batch goes first: a long object then
/// streams and is hashed beside the other batches instead of alone at the end. Without
/// sizes, batches follow `todo`'s order.
fn split_batches(
    todo: Vec<ObjectId>,
    size: usize,
    metadata: Option<&HashMap<ObjectId, Inode>>,
) -> std::collections::VecDeque<Batch> {
    let Some(sizes) = metadata else {
        return todo.chunks(size).map(|b| (b.to_vec(), 0)).collect();
    };
    let len_of = |id: &ObjectId| sizes.get(id).map_or(0, |i| i.size);
    let mut todo = todo;
    todo.sort_by_key(|id| std::cmp::Reverse(len_of(id)));
    let count = todo.len().div_ceil(size);
    // (bytes, index), lightest on top; a batch leaves the heap once it is full.
    let mut open: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize)>> =
        (0..count).map(|i| std::cmp::Reverse((0, i))).collect();
    let mut batches: Vec<(Vec<ObjectId>, u64)> = vec![(Vec::new(), 0); count];
    for id in todo {
        let std::cmp::Reverse((bytes, i)) = open.pop().expect("room for every object");
        let b = &mut batches[i];
        b.0.push(id);
        b.1 = bytes + len_of(&id);
        if b.0.len() < size {
            open.push(std::cmp::Reverse((b.1, i)));
        }
    }
    batches.sort_by_key(|b| std::cmp::Reverse(b.1));
    batches.into_iter().map(|(b, _)| (b, 0)).collect()
}

/// What one `fetch_objects` has gathered so far.
struct FetchRun {
    started: Instant,
    /// Verified objects wait in `pending` for the caller (`fetch_objects_held`).
    hold: bool,
    stats: FetchStats,
    mismatched: Vec<ObjectId>,
    first_error: Option<FetchError>,
    /// Verified objects no commit has taken yet.
    pending: Vec<PendingObject>,
    /// The commit running beside the batches, if any (one at a time).
    committing: Option<tokio::task::JoinHandle<Result<u64, FetchError>>>,
}

impl Default for FetchRun {
    fn default() -> Self {
        FetchRun {
            started: Instant::now(),
            hold: false,
            stats: FetchStats::default(),
            mismatched: Vec::new(),
            first_error: None,
            pending: Vec::new(),
            committing: None,
        }
    }
}

type Joined = Result<(Batch, Result<BatchOutcome, FetchError>), tokio::task::JoinError>;

impl FetchRun {
    /// The distinct `hashes` the store lacks, counting those it holds.
    /// Many hashes are checked against one read of the store's directories rather than a
    /// `stat` each.
    fn select_missing(&mut self, store: &ObjectStore, hashes: &[ObjectId]) -> Vec<ObjectId> {
        let held = if hashes.len() >= 256 {
            store.ids().ok()
        } else {
            None
        };
        let present = |h: &ObjectId| match &held {
            Some(ids) => ids.contains(h),
            None => store.contains(h),
        };
        let mut seen = HashSet::new();
        let mut todo = Vec::new();
        for h in hashes {
            if !seen.insert(*h) {
                continue;
            }
            if present(h) {
                self.stats.already_present += 1;
            } else {
                todo.push(*h);
            }
        }
        todo
    }

    /// Keeps the first error of all.
    fn fail(&mut self, e: FetchError) {
        self.first_error.get_or_insert(e);
    }

    /// Takes in one finished batch: its verified objects (committed once enough wait), its
    /// mismatches, its error, and what it was asked for but never sent. A reply that broke
    /// off, from one of several imageservers, moves `client` on and returns the objects
    /// still missing as a batch to try on the next one (until every server was tried).
    async fn absorb(
        &mut self,
        store: &ObjectStore,
        joined: Joined,
        client: &ImageServerClient,
    ) -> Option<Batch> {
        self.stats.requests += 1;
        let ((batch, attempt), mut out) = match joined {
            Ok((batch, Ok(out))) => (batch, out),
            Ok((_, Err(e))) => {
                self.fail(e);
                return None;
            }
            Err(e) => {
                self.fail(FetchError::Truncated(format!("batch failed: {e}")));
                return None;
            }
        };
        let retry = match &out.error {
            Some(e @ FetchError::Truncated(_)) if attempt + 1 < client.server_count() => {
                client.reply_failed(out.server, e);
                out.error = None;
                // What did not arrive whole and verified (the object cut in the middle was
                // received, not kept); mismatches are reported, not asked for again.
                let kept: HashSet<ObjectId> = out.pending.iter().map(|p| p.id).collect();
                let rest: Vec<ObjectId> = batch
                    .iter()
                    .filter(|h| !kept.contains(h) && !out.mismatched.contains(h))
                    .copied()
                    .collect();
                Some((rest, attempt + 1))
            }
            _ => None,
        };
        self.absorb_outcome(store, &batch, out, retry.is_some())
            .await;
        retry
    }

    /// `absorb` of a batch's outcome; `retried`: its missing objects are asked for again.
    async fn absorb_outcome(
        &mut self,
        store: &ObjectStore,
        batch: &[ObjectId],
        out: BatchOutcome,
        retried: bool,
    ) {
        self.stats.bytes += out.bytes;
        let fresh = !out.pending.is_empty();
        self.pending.extend(out.pending);
        if !self.hold {
            self.commit_beside(store).await;
        } else if fresh {
            self.sync_beside(store).await;
        }
        self.mismatched.extend(out.mismatched);
        if let Some(e) = out.error {
            return self.fail(e);
        }
        if retried {
            return;
        }
        let missing: Vec<&ObjectId> = batch.iter().filter(|h| !out.received.contains(h)).collect();
        if let Some(first) = missing.first() {
            self.fail(FetchError::Missing {
                count: missing.len(),
                first: Box::new(**first),
            });
        }
    }

    /// Starts a commit of everything pending unless one is running; settles a commit that
    /// has ended. Waits for the running one only when `COMMIT_EVERY` objects are pending,
    /// which bounds the memory and the work a crash loses.
    async fn commit_beside(&mut self, store: &ObjectStore) {
        let ended = self.committing.as_ref().is_some_and(|c| c.is_finished());
        if ended || self.pending.len() >= COMMIT_EVERY {
            self.settle_commit().await;
        }
        if self.committing.is_none() && !self.pending.is_empty() {
            let (st, pending) = (store.clone(), std::mem::take(&mut self.pending));
            self.committing = Some(tokio::spawn(async move { commit(&st, pending).await }));
        }
    }

    /// For held objects: starts a sync of the store (its bytes written back while the
    /// batches still stream, so the update's sync finds little left) unless one is running.
    async fn sync_beside(&mut self, store: &ObjectStore) {
        if self.committing.as_ref().is_some_and(|c| c.is_finished()) {
            self.settle_commit().await;
        }
        if self.committing.is_none() {
            let st = store.clone();
            self.committing = Some(tokio::spawn(async move {
                match tokio::task::spawn_blocking(move || st.sync()).await {
                    Ok(r) => r.map(|()| 0).map_err(FetchError::Store),
                    Err(e) => Err(FetchError::Truncated(format!("sync failed: {e}"))),
                }
            }));
        }
    }

    /// Logs the fetch's times: streaming until `t_commit`, then its last commit.
    fn log_done(&self, t_commit: Instant) {
        tracing::debug!(
            "fetch: {} objects in {} requests streamed in {:.1} ms, committed in {:.1} ms",
            self.stats.objects,
            self.stats.requests,
            (t_commit - self.started).as_secs_f64() * 1000.0,
            t_commit.elapsed().as_secs_f64() * 1000.0
        );
    }

    /// Waits for the running commit, if any, and counts what it named.
    async fn settle_commit(&mut self) {
        let Some(running) = self.committing.take() else {
            return;
        };
        match running.await {
            Ok(Ok(n)) => self.stats.objects += n,
            Ok(Err(e)) => self.fail(e),
            Err(e) => self.fail(FetchError::Truncated(format!("commit failed: {e}"))),
        }
    }

    /// Commits what is still pending (whatever verified is kept, even when another batch
    /// failed) and reports: the first error, else the first mismatch, else the counts.
    async fn finish(mut self, store: &ObjectStore) -> Result<FetchStats, FetchError> {
        let t_commit = Instant::now();
        self.settle_commit().await;
        match commit(store, std::mem::take(&mut self.pending)).await {
            Ok(n) => self.stats.objects += n,
            Err(e) => self.fail(e),
        }
        self.log_done(t_commit);
        if let Some(mut e) = self.first_error {
            if let FetchError::DiskFull { stored, .. } = &mut e {
                *stored = self.stats.objects;
            }
            return Err(e);
        }
        if let Some(first) = self.mismatched.first() {
            return Err(FetchError::Mismatch {
                count: self.mismatched.len(),
                first: Box::new(*first),
            });
        }
        Ok(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::frame::header;

    fn body(objs: &[(&ObjectId, &[u8])]) -> Vec<u8> {
        let mut v = Vec::new();
        for (id, data) in objs {
            v.extend_from_slice(&header(id, data.len() as u64));
            v.extend_from_slice(data);
        }
        v
    }

    /// A reply cut off mid-body reaches the frame reader as a broken connection carrying
    /// the client's error, after the bytes that did arrive.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_body_cut_short_is_a_transfer_error() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 4096];
            let _ = s.read(&mut req).await;
            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789";
            s.write_all(reply).await.unwrap();
            // Dropped here: the body ends 90 bytes short.
        });
        let resp = reqwest::get(format!("http://{addr}/")).await.unwrap();
        let mut body = resp.bytes_stream();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        while let Some(chunk) = body.next().await {
            let item = chunk.map_err(TransferError::from);
            let failed = item.is_err();
            tx.send(item).await.unwrap();
            if failed {
                break;
            }
        }
        drop(tx);
        let (got, e) = tokio::task::spawn_blocking(move || {
            let mut r = ChunkReader {
                rx,
                cur: bytes::Bytes::new(),
                failed: None,
            };
            let mut got = Vec::new();
            let e = r.read_to_end(&mut got).unwrap_err();
            (got, e)
        })
        .await
        .unwrap();
        assert_eq!(got, b"0123456789");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        let t = e.get_ref().and_then(|i| i.downcast_ref::<TransferError>());
        assert!(t.is_some_and(|t| t.0.is_body() || t.0.is_decode()), "{e:?}");
    }

    #[test]
    fn frames_are_verified_and_bad_ones_discarded() {
        let d = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(d.path()).unwrap();
        let (a, b, c) = (
            ObjectId::of(b"aaa"),
            ObjectId::of(b"bbb"),
            ObjectId::of(b"ccc"),
        );
        let wanted: HashSet<ObjectId> = [a, b, c].into_iter().collect();
        // b's bytes are wrong; c is cut short
        let mut v = body(&[(&a, b"aaa"), (&b, b"BBB"), (&c, b"ccc")]);
        v.truncate(v.len() - 1);
        let out = write_frames(&v[..], &s, &wanted, None);
        assert_eq!(out.pending.len(), 1);
        assert!(!s.contains(&a), "nothing visible before the commit");
        assert_eq!(s.commit(out.pending).unwrap(), 1);
        assert_eq!(out.mismatched, [b]);
        assert!(
            matches!(out.error, Some(FetchError::Truncated(_))),
            "{:?}",
            out.error.map(|e| e.to_string())
        );
        assert!(s.contains(&a) && !s.contains(&b) && !s.contains(&c));
        // an object nobody asked for stops the reply
        let x = ObjectId::of(b"x");
        let out = write_frames(&body(&[(&x, b"x")])[..], &s, &wanted, None);
        assert!(matches!(out.error, Some(FetchError::Unexpected(_))));
        assert!(!s.contains(&x));
    }

    /// Objects checked together (several queues' worth, long ones hashed as they stream):
    /// every good one kept with its own bytes, every bad one discarded, wherever it falls.
    #[test]
    fn queued_checks_keep_exactly_the_objects_whose_bytes_match() {
        let d = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(d.path()).unwrap();
        let n = VERIFY_OBJECTS * 2 + 37;
        let datas: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                // Mostly small; a few past HASH_AS_STREAMED.
                let len = if i % 97 == 5 {
                    (1 << 20) + i
                } else {
                    100 + i * 37
                };
                (0..len).map(|j| (i * 7 + j * 13) as u8).collect()
            })
            .collect();
        let ids: Vec<ObjectId> = datas.iter().map(|d| ObjectId::of(d)).collect();
        let bad: HashSet<usize> = [0, 5, VERIFY_OBJECTS - 1, VERIFY_OBJECTS, n - 1].into();
        let sent: Vec<Vec<u8>> = datas
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut d = d.clone();
                if bad.contains(&i) {
                    let mid = d.len() / 2;
                    d[mid] ^= 1;
                }
                d
            })
            .collect();
        let frames: Vec<(&ObjectId, &[u8])> =
            ids.iter().zip(&sent).map(|(i, d)| (i, &d[..])).collect();
        let wanted: HashSet<ObjectId> = ids.iter().copied().collect();
        let out = write_frames(&body(&frames)[..], &s, &wanted, None);
        assert!(
            out.error.is_none(),
            "{:?}",
            out.error.map(|e| e.to_string())
        );
        let mut mismatched = out.mismatched.clone();
        mismatched.sort();
        let mut want_bad: Vec<ObjectId> = bad.iter().map(|&i| ids[i]).collect();
        want_bad.sort();
        assert_eq!(mismatched, want_bad);
        assert_eq!(s.commit(out.pending).unwrap(), n - bad.len());
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(s.contains(id), !bad.contains(&i), "object {i}");
            if !bad.contains(&i) {
                assert_eq!(
                    std::fs::read(s.path_of(id)).unwrap(),
                    datas[i],
                    "object {i}"
                );
            }
        }
        // Nothing unverified is left behind: only the named objects' files remain.
        let files: usize = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .map(|p| std::fs::read_dir(p).unwrap().count())
            .sum();
        assert_eq!(files, n - bad.len());
    }

    /// Batches share the bytes out evenly, heaviest first, never over `size` objects,
    /// every object in exactly one; without sizes they follow the list.
    #[test]
    fn batches_share_the_bytes_and_the_heaviest_goes_first() {
        let ids: Vec<ObjectId> = (0u32..103)
            .map(|i| ObjectId::of(&i.to_be_bytes()))
            .collect();
        // one object as long as all the others together, and a spread of lengths
        let len = |i: usize| {
            if i == 7 {
                5_000
            } else {
                1 + (i as u64 * 37) % 97
            }
        };
        let sizes: HashMap<ObjectId, Inode> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let inode = Inode::file(0o644, 0, 0, Default::default(), len(i), Some(*id));
                (*id, inode)
            })
            .collect();
        for size in [10, 16, 40, 103, 500] {
            let batches = split_batches(ids.clone(), size, Some(&sizes));
            assert_eq!(batches.len(), ids.len().div_ceil(size), "size {size}");
            let bytes: Vec<u64> = batches
                .iter()
                .map(|(b, _)| b.iter().map(|id| sizes[id].size).sum())
                .collect();
            assert!(
                bytes.windows(2).all(|w| w[0] >= w[1]),
                "heaviest first: {bytes:?}"
            );
            assert!(
                batches[0].0.contains(&ids[7]),
                "the long object starts first"
            );
            assert!(batches
                .iter()
                .all(|(b, tries)| b.len() <= size && *tries == 0));
            let mut all: Vec<ObjectId> = batches.iter().flat_map(|(b, _)| b.clone()).collect();
            all.sort();
            let mut want = ids.clone();
            want.sort();
            assert_eq!(all, want, "size {size}: every object once");
        }
        // without the long one, and room to spare: within one object's length of each other
        let short: Vec<ObjectId> = ids.iter().copied().filter(|id| *id != ids[7]).collect();
        let batches = split_batches(short, 30, Some(&sizes));
        let bytes: Vec<u64> = batches
            .iter()
            .map(|(b, _)| b.iter().map(|id| sizes[id].size).sum())
            .collect();
        assert_eq!(bytes.len(), 4);
        assert!(bytes[0] - bytes[3] <= 97, "{bytes:?}");
        let plain = split_batches(ids.clone(), 40, None);
        let flat: Vec<ObjectId> = plain.iter().flat_map(|(b, _)| b.clone()).collect();
        assert_eq!(flat, ids, "without sizes, the list's order");
    }
}
