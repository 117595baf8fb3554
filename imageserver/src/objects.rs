//! The streaming object batches. `ObjectServer.AddObjects` reads a `frame` stream and
//! writes each object straight to a temp file while hashing it (never holding a whole
//! object in memory), verifies it, and commits verified objects in durable batches.
//! `ObjectServer.GetObjects` streams the requested objects back as frames.
//!
//! Every object an upload stream stores or offers (already present) is held until the
//! stream ends, then pinned for the catalogue's grace period, so unreferenced-object
//! deletion cannot race the `AddImage` that follows.

use crate::catalogue::Catalogue;
use crate::State;
use axum::body::Body;
use axum::extract::State as AxState;
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use model::api;
use model::frame;
use model::http::{ApiError, Json};
use model::ObjectId;
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};

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
}

impl Drop for Holds<'_> {
    fn drop(&mut self) {
        self.catalogue.release(&self.ids);
    }
}

/// Receives a frame stream into the store; returns what was added.
pub fn receive(st: &State, mut r: impl Read) -> Result<api::AddObjectsResponse, ApiError> {
    let cat = &st.catalogue;
    let mut holds = Holds {
        catalogue: cat,
        ids: Vec::new(),
    };
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
        if cat.hold_if_present(&id) {
            holds.ids.push(id);
            skip_exact(&mut r, len)?;
            resp.existing += 1;
            continue;
        }
        let mut w = cat.store().writer(id, len).map_err(|e| {
            if e.is_no_space() {
                ApiError::InsufficientStorage(e.to_string())
            } else {
                ApiError::internal(e)
            }
        })?;
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
            let ids: Vec<ObjectId> = pending.iter().map(|p| p.id).collect();
            let (n, b) = cat.commit_objects(std::mem::take(&mut pending))?;
            holds.ids.extend(ids);
            resp.added += n;
            resp.bytes_added += b;
            pending_bytes = 0;
        }
    }
    let ids: Vec<ObjectId> = pending.iter().map(|p| p.id).collect();
    let (n, b) = cat.commit_objects(pending)?;
    holds.ids.extend(ids);
    resp.added += n;
    resp.bytes_added += b;
    Ok(resp)
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

pub async fn get_objects(
    AxState(st): AxState<State>,
    Json(req): Json<api::GetObjectsRequest>,
) -> Result<Response, ApiError> {
    if let Some((first, n)) = st.catalogue.first_missing(&req.hashes) {
        return Err(ApiError::NotFound(if n == 1 {
            format!("unknown object: {first}")
        } else {
            format!("first of {n} unknown objects: {first}")
        }));
    }
    let (rd, wr) = tokio::io::duplex(256 * 1024);
    let st2 = st.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = SyncIoBridge::new(wr);
        for id in &req.hashes {
            let sent = (|| -> io::Result<u64> {
                let mut f = st2.catalogue.store().open_object(id)?;
                let len = f.metadata()?.len();
                out.write_all(&frame::header(id, len))?;
                let n = io::copy(&mut (&mut f).take(len), &mut out)?;
                if n != len {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "object shrank",
                    ));
                }
                Ok(len)
            })();
            match sent {
                Ok(len) => {
                    st2.metrics.objects_served.fetch_add(1, Ordering::Relaxed);
                    st2.metrics
                        .object_bytes_served
                        .fetch_add(len, Ordering::Relaxed);
                }
                Err(e) => {
                    // The client sees a truncated frame stream and reports it.
                    tracing::warn!(object = %id, "GetObjects aborted: {e}");
                    return;
                }
            }
        }
        let _ = out.flush();
        let _ = out.shutdown();
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(ReaderStream::with_capacity(rd, 256 * 1024)),
    )
        .into_response())
}
