//! The streaming object batches. `ObjectServer.AddObjects` reads a `frame` stream and
//! writes each object straight to a temp file while hashing it (never holding a whole
//! object in memory), verifies it, and commits verified objects in durable batches.
//! `ObjectServer.GetObjects` streams the requested objects back as frames, from an async
//! task through a small bounded queue, so a client that does not read holds a task and a
//! few pieces, never a thread; streams are bounded overall and per caller (503 beyond).
//! The task reads what the page cache holds itself (`RESOLVE_CACHED` opens, `RWF_NOWAIT`
//! reads) and hands only what would wait for the disk to a blocking thread.
//!
//! Every object an upload stream stores or offers (already present) is held until the
//! stream ends, then pinned for the catalogue's grace period, so unreferenced-object
//! deletion cannot race the `AddImage` that follows.

use crate::catalogue::{Catalogue, CatalogueError};
use crate::storage::Objects;
use crate::State;
use axum::body::Body;
use axum::extract::State as AxState;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use disk::objectstore::read_cached;
use futures_util::TryStreamExt;
use model::api;
use model::frame;
use model::ObjectId;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::io::{StreamReader, SyncIoBridge};
use wire::http::{ApiError, Caller, Json};

/// Verified objects are committed (one syncfs) at least this often, by bytes…
pub const COMMIT_BYTES: u64 = 64 << 20;
/// …or by count.
pub const COMMIT_OBJECTS: usize = 2048;

fn read_error(e: io::Error) -> ApiError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ApiError::BadRequest(format!("upload truncated: {e}"))
    } else {
        ApiError::BadRequest(format!("reading upload: {e}"))
    }
}

/// Drains exactly `len` bytes; an early end is a truncation.
fn skip_exact(r: &mut impl Read, len: u64) -> Result<(), ApiError> {
    let got = io::copy(&mut r.take(len), &mut io::sink()).map_err(read_error)?;
    if got != len {
        return Err(ApiError::BadRequest(format!(
            "upload truncated: object has {got} of {len} bytes"
        )));
    }
    Ok(())
}

/// How much of a refused upload is read and discarded before the connection is closed.
const DRAIN_LIMIT: u64 = 4 << 30;

/// The objects one upload stream holds; released (and pinned) when dropped, whether the
/// stream ends well or not.
struct Holds<'a> {
    catalogue: &'a Catalogue,
    ids: Vec<ObjectId>,
    /// On S3, the stream's leases in the bucket (kept for the grace period after it).
    leases: Vec<crate::s3::LeaseId>,
}

impl Drop for Holds<'_> {
    fn drop(&mut self) {
        self.catalogue.release(&self.ids);
        self.catalogue.release_leases(&self.leases);
    }
}

/// Receives a frame stream into the store; returns what was added.
pub fn receive(st: &State, mut r: impl Read) -> Result<api::AddObjectsResponse, ApiError> {
    let cat = &st.catalogue;
    let mut holds = Holds {
        catalogue: cat,
        ids: Vec::new(),
        leases: Vec::new(),
    };
    // On S3 an object already stored is written again (the same bytes) rather than
    // skipped: it is then leased before its commit like any other (`Catalogue::secure`),
    // which a skipped object could not be without a round trip each.
    let skip_present = cat.store().local().is_some();
    let mut resp = api::AddObjectsResponse::default();
    let mut pending = Vec::new();
    let mut pending_bytes = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    while let Some((id, len)) = frame::read_header(&mut r).map_err(read_error)? {
        if len == 0 {
            return Err(ApiError::BadRequest(format!(
                "object {id}: zero-length objects are never stored"
            )));
        }
        if skip_present && cat.hold_if_present(&id) {
            holds.ids.push(id);
            skip_exact(&mut r, len)?;
            resp.existing += 1;
            continue;
        }
        let mut w = cat.store().writer(id, len).map_err(CatalogueError::from)?;
        let mut left = len;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let n = match r.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            };
            w.write_all(&buf[..n]).map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    ApiError::InsufficientStorage(format!("writing object {id}: {e}"))
                } else {
                    ApiError::internal(format!("writing object {id}: {e}"))
                }
            })?;
            left -= n as u64;
        }
        let p = w
            .finish()
            .map_err(|e| ApiError::BadRequest(format!("upload refused: {e}")))?;
        pending_bytes += len;
        pending.push(p);
        if pending_bytes >= COMMIT_BYTES || pending.len() >= COMMIT_OBJECTS {
            commit(cat, std::mem::take(&mut pending), &mut holds, &mut resp)?;
            pending_bytes = 0;
        }
    }
    commit(cat, pending, &mut holds, &mut resp)?;
    Ok(resp)
}

/// Commits a batch of verified objects, held (and on S3 leased) for the stream.
fn commit(
    cat: &Catalogue,
    pending: Vec<crate::storage::Pending>,
    holds: &mut Holds<'_>,
    resp: &mut api::AddObjectsResponse,
) -> Result<(), ApiError> {
    let ids: Vec<ObjectId> = pending.iter().map(|p| p.id()).collect();
    let count = ids.len() as u64;
    let ((n, b), lease) = cat.commit_objects_leased(pending)?;
    holds.ids.extend(ids);
    holds.leases.extend(lease);
    resp.added += n;
    resp.bytes_added += b;
    if cat.store().local().is_none() {
        resp.existing += count - n; // written again, as said above
    }
    Ok(())
}

pub async fn add_objects(
    AxState(st): AxState<State>,
    body: Body,
) -> Result<axum::Json<api::AddObjectsResponse>, ApiError> {
    let stream = body.into_data_stream().map_err(io::Error::other);
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    let st2 = st.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        let r = receive(&st2, &mut reader);
        if r.is_err() {
            // Read (and discard) what the client is still sending, so it sees our one-line
            // error instead of a reset connection. Bounded: a client that never stops is
            // cut off after DRAIN_LIMIT bytes.
            let _ = io::copy(&mut (&mut reader).take(DRAIN_LIMIT), &mut io::sink());
        }
        r
    })
    .await
    .map_err(ApiError::internal)?;
    match result {
        Ok(r) => {
            st.metrics
                .objects_received
                .fetch_add(r.added, Ordering::Relaxed);
            st.metrics
                .object_bytes_received
                .fetch_add(r.bytes_added, Ordering::Relaxed);
            Ok(axum::Json(r))
        }
        Err(e) => {
            st.metrics.rejected_uploads.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("AddObjects refused: {e}");
            Err(e)
        }
    }
}

/// Most `GetObjects` streams open at once, by default.
pub const DEFAULT_MAX_STREAMS: usize = 512;
/// Most `GetObjects` streams one caller (certificate name and address) may have open at
/// once, by default: a fleet shares one subd certificate, so machines are told apart by
/// address, and one machine cannot take the whole of `DEFAULT_MAX_STREAMS`.
pub const DEFAULT_MAX_STREAMS_PER_CALLER: usize = 32;
/// Callers remembered before those with no stream open are forgotten.
const FORGET_IDLE_CALLERS_ABOVE: usize = 4096;
/// Bytes of frames (headers and object bytes, several small objects together) read per
/// piece sent: one body chunk (and at most one blocking read task) per piece, not per
/// object.
const PIECE: usize = 256 * 1024;
/// Pieces queued per stream for a client that reads slowly.
const QUEUED_PIECES: usize = 2;
/// A stream whose client accepts nothing for this long is aborted, freeing its slot.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Bounds on concurrent `GetObjects` streams: overall and per caller (certificate name and
/// peer address, `Caller::key`).
pub struct StreamLimits {
    all: Arc<Semaphore>,
    per_caller_max: usize,
    per_caller: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// The slots one stream holds until it ends.
pub struct StreamPermit {
    _all: OwnedSemaphorePermit,
    _caller: OwnedSemaphorePermit,
}

impl StreamLimits {
    pub fn new(max: usize, per_caller: usize) -> StreamLimits {
        StreamLimits {
            all: Arc::new(Semaphore::new(max)),
            per_caller_max: per_caller,
            per_caller: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one stream of `caller`, or `Busy` (503) naming the bound reached.
    pub fn acquire(&self, caller: &str) -> Result<StreamPermit, ApiError> {
        let sem = {
            let mut map = self.per_caller.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= FORGET_IDLE_CALLERS_ABOVE {
                // Callers with no stream open hold nothing worth remembering.
                map.retain(|_, s| s.available_permits() < self.per_caller_max);
            }
            map.entry(caller.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_caller_max)))
                .clone()
        };
        let caller_permit = sem.try_acquire_owned().map_err(|_| {
            ApiError::Busy(format!(
                "too many object streams open for caller {caller:?} (at most {}); retry later",
                self.per_caller_max
            ))
        })?;
        let all = self.all.clone().try_acquire_owned().map_err(|_| {
            ApiError::Busy(
                "too many object streams open on this imageserver; retry later".to_string(),
            )
        })?;
        Ok(StreamPermit {
            _all: all,
            _caller: caller_permit,
        })
    }
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits::new(DEFAULT_MAX_STREAMS, DEFAULT_MAX_STREAMS_PER_CALLER)
    }
}

/// Why a stream stopped before its end.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("object {id}: {source}")]
    Read { id: ObjectId, source: io::Error },
    #[error("object {id} is shorter than its recorded {size} bytes")]
    Short { id: ObjectId, size: u64 },
    #[error("the client read nothing for {} s", STALL_TIMEOUT.as_secs())]
    Stalled,
    #[error("the client went away")]
    Gone,
    #[error("the task reading object files failed: {0}")]
    Task(tokio::task::JoinError),
}

/// The object a `Pieces` is in the middle of.
struct OpenObject {
    id: ObjectId,
    size: u64,
    left: u64,
    file: Source,
}

/// Where an open object's bytes come from.
enum Source {
    /// A local file: read without blocking where the page cache allows (`read_cached`).
    File(std::fs::File),
    /// Any other reader (S3): blocking reads only.
    Reader(Box<dyn Read + Send>),
}

/// How far `Pieces::fill` got.
#[derive(Debug, PartialEq)]
enum Filled {
    /// The piece is full, or the objects are all read.
    Done,
    /// Reading on without blocking was not possible: go on on a blocking thread.
    WouldBlock,
}

/// Reads the frames of a list of objects, a piece at a time: on the async task as far as
/// the page cache holds them (cached lookups, `RWF_NOWAIT` reads, no thread handed over),
/// the rest on a blocking thread.
struct Pieces {
    store: Objects,
    objects: Vec<(ObjectId, u64)>,
    next: usize,
    open: Option<OpenObject>,
    /// Objects and bytes whose last byte was read since `send_objects` last took them.
    finished: (u64, u64),
}

impl Pieces {
    /// Appends frames to `buf` until it holds `PIECE` bytes or every object is read. With
    /// `cached`, it never blocks: it stops with `WouldBlock` at the first open or read that
    /// would wait for the disk, leaving its place for the next call. An error comes after
    /// the bytes read before it, which are to be sent first.
    fn fill(&mut self, buf: &mut Vec<u8>, cached: bool) -> Result<Filled, SendError> {
        while buf.len() < PIECE {
            let Some(o) = self.open.as_mut() else {
                let Some(&(id, size)) = self.objects.get(self.next) else {
                    break;
                };
                if PIECE - buf.len() < frame::HEADER_LEN {
                    break; // the header starts the next piece; this one never grows
                }
                let opened = match &self.store {
                    _ if cached => self.store.open_cached(&id).map(Source::File),
                    Objects::Local(s) => s.open_object(&id).map(Source::File),
                    Objects::S3(_) => self.store.open(&id).map(Source::Reader),
                };
                match opened {
                    Ok(file) => {
                        self.next += 1;
                        buf.extend_from_slice(&frame::header(&id, size));
                        self.open = Some(OpenObject {
                            id,
                            size,
                            left: size,
                            file,
                        });
                    }
                    // Any failure of the cached open (it would block; or `openat2` is
                    // refused, as some seccomp filters do with EPERM) is left to the
                    // blocking open, whose error is the one reported.
                    Err(_) if cached => return Ok(Filled::WouldBlock),
                    Err(source) => return Err(SendError::Read { id, source }),
                }
                continue;
            };
            let want = o.left.min((PIECE - buf.len()) as u64);
            let read_err = |source| SendError::Read { id: o.id, source };
            let got = match (&mut o.file, cached) {
                _ if want == 0 => 0,
                (Source::File(f), true) => match read_cached(f, buf, want as usize) {
                    Ok(n) => n as u64, // 0: the end of the file, short
                    // Would block, or refused: the blocking read goes on from here.
                    Err(_) => return Ok(Filled::WouldBlock),
                },
                (Source::Reader(_), true) => return Ok(Filled::WouldBlock),
                (Source::File(f), false) => read_fully(f, want, buf).map_err(read_err)?,
                (Source::Reader(r), false) => read_fully(r, want, buf).map_err(read_err)?,
            };
            if got == 0 && want > 0 {
                return Err(SendError::Short {
                    id: o.id,
                    size: o.size,
                });
            }
            o.left -= got;
            if o.left == 0 {
                self.finished.0 += 1;
                self.finished.1 += o.size;
                self.open = None;
            }
        }
        Ok(Filled::Done)
    }
}

/// Reads up to `want` bytes from `r` onto `buf` (blocking); fewer only at its end.
fn read_fully(r: impl Read, want: u64, buf: &mut Vec<u8>) -> Result<u64, io::Error> {
    r.take(want).read_to_end(buf).map(|n| n as u64)
}

/// Sends the frames of `objects` (id, recorded size) into `tx`, read from their files a
/// piece at a time: on this task while the page cache holds them, else on a blocking
/// thread (`Pieces::fill`).
async fn send_objects(
    st: &State,
    objects: Vec<(ObjectId, u64)>,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(), SendError> {
    let mut pieces = Pieces {
        store: st.catalogue.store().clone(),
        objects,
        next: 0,
        open: None,
        finished: (0, 0),
    };
    loop {
        let mut buf = Vec::with_capacity(PIECE);
        let mut filled = pieces.fill(&mut buf, true);
        if let Ok(Filled::WouldBlock) = filled {
            let (p, b, f) = tokio::task::spawn_blocking(move || {
                let f = pieces.fill(&mut buf, false);
                (pieces, buf, f)
            })
            .await
            .map_err(SendError::Task)?;
            (pieces, buf, filled) = (p, b, f);
        }
        let ended = buf.is_empty();
        if !ended {
            match tokio::time::timeout(STALL_TIMEOUT, tx.send(Bytes::from(buf))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(SendError::Gone),
                Err(_) => return Err(SendError::Stalled),
            }
        }
        if filled? == Filled::Done && ended {
            return Ok(());
        }
        let (n, bytes) = std::mem::take(&mut pieces.finished);
        st.metrics.objects_served.fetch_add(n, Ordering::Relaxed);
        st.metrics
            .object_bytes_served
            .fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Streams the requested objects as frames. Every object must be indexed and its file as
/// long as recorded before the 200 is sent; a file that goes missing or short after that
/// aborts the response, so the client sees a broken body, never a short success.
pub async fn get_objects(
    AxState(st): AxState<State>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<api::GetObjectsRequest>,
) -> Result<Response, ApiError> {
    let permit = st.streams.acquire(&caller.key())?;
    let cat = st.catalogue.clone();
    let objects = crate::rpc::blocking(move || cat.object_files(&req.hashes)).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUED_PIECES);
    let complete = Arc::new(AtomicBool::new(false));
    let done = complete.clone();
    tokio::spawn(async move {
        let _permit = permit;
        match send_objects(&st, objects, &tx).await {
            Ok(()) => done.store(true, Ordering::Release),
            Err(SendError::Gone) => {}
            Err(e) => tracing::warn!(caller = %caller.name, "GetObjects aborted: {e}"),
        }
    });
    // The body ends cleanly only if the sender finished; otherwise it ends in an error,
    // which aborts the response.
    let body = futures_util::stream::unfold(Some(rx), move |rx| {
        let complete = complete.clone();
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(b) => Some((Ok(b), Some(rx))),
                None if complete.load(Ordering::Acquire) => None,
                None => Some((Err(io::Error::other("object stream aborted")), None)),
            }
        }
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(body),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::objectstore::ObjectStore;
    use std::os::fd::AsRawFd;

    fn pieces(store: &ObjectStore, objects: Vec<(ObjectId, u64)>) -> Pieces {
        Pieces {
            store: Objects::Local(store.clone()),
            objects,
            next: 0,
            open: None,
            finished: (0, 0),
        }
    }

    /// Everything `send_objects` would send (page cache first when `cached`, the rest on
    /// disk), the error it would end with, and how many pieces fell back to blocking reads.
    fn drain(mut p: Pieces, cached: bool) -> (Vec<u8>, Option<SendError>, usize) {
        let (mut out, mut blocked) = (Vec::new(), 0);
        loop {
            let mut buf = Vec::with_capacity(PIECE);
            let mut filled = p.fill(&mut buf, cached);
            if let Ok(Filled::WouldBlock) = filled {
                blocked += 1;
                filled = p.fill(&mut buf, false);
            }
            assert!(buf.len() <= PIECE);
            let ended = buf.is_empty();
            out.extend_from_slice(&buf);
            match filled {
                Err(e) => return (out, Some(e), blocked),
                Ok(Filled::Done) if ended => return (out, None, blocked),
                Ok(_) => {}
            }
        }
    }

    /// Drops a file's pages from the page cache (it is synced first), so reading it
    /// without blocking is refused.
    fn evict(path: &std::path::Path) {
        let f = std::fs::File::open(path).unwrap();
        f.sync_all().unwrap();
        // SAFETY: a plain advisory call on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }

    #[test]
    fn frames_read_from_the_page_cache_or_from_disk_are_the_same() {
        let d = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(d.path()).unwrap();
        let sizes = [1usize, 7_000, 100_000, 300_000, PIECE - 3, 1_000_000, 40];
        let mut list = Vec::new();
        let mut want = Vec::new();
        for (i, n) in sizes.into_iter().enumerate() {
            let data: Vec<u8> = (0..n).map(|j| (j * 31 + i) as u8).collect();
            let id = store.put(&data).unwrap();
            list.push((id, n as u64));
            want.extend_from_slice(&frame::header(&id, n as u64));
            want.extend_from_slice(&data);
        }
        let (blocking, e, _) = drain(pieces(&store, list.clone()), false);
        assert!(e.is_none(), "{e:?}");
        assert_eq!(blocking, want);
        let (hot, e, _) = drain(pieces(&store, list.clone()), true);
        assert!(e.is_none(), "{e:?}");
        assert_eq!(hot, want);
        // cold: every object read from disk, wherever the fall-back happens
        for (id, _) in &list {
            evict(&store.path_of(id));
        }
        let (cold, e, blocked) = drain(pieces(&store, list.clone()), true);
        assert!(e.is_none(), "{e:?}");
        assert_eq!(cold, want);
        assert!(blocked > 0, "cold objects fell back to blocking reads");
    }

    #[test]
    fn a_file_shorter_than_recorded_ends_the_stream_after_its_bytes_in_either_mode() {
        let d = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(d.path()).unwrap();
        let a = store.put(b"whole").unwrap();
        let b = store.put(b"cut short").unwrap();
        for cached in [true, false] {
            let list = vec![(a, 5), (b, 20)];
            let (out, e, _) = drain(pieces(&store, list), cached);
            assert!(
                matches!(e, Some(SendError::Short { id, size: 20 }) if id == b),
                "{e:?}"
            );
            let mut want = frame::header(&a, 5).to_vec();
            want.extend_from_slice(b"whole");
            want.extend_from_slice(&frame::header(&b, 20));
            want.extend_from_slice(b"cut short");
            assert_eq!(out, want, "cached {cached}");
        }
    }
}
