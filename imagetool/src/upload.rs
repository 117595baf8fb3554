//! Sending objects to the imageserver: ask which of a batch it lacks (one
//! `CheckObjects`), then stream only those as one `AddObjects` frame stream, produced on a
//! blocking thread so file reading overlaps the network. A batch whose imageserver fails
//! mid-way goes, minus what the next one already holds, to the next of the list.

use model::frame;
use model::ObjectId;
use std::collections::HashSet;
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::io::{ReaderStream, SyncIoBridge};
use wire::client::{fails_over, ClientError, ImageServerClient};

/// Why objects could not be checked or sent.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// `CheckObjects` failed.
    #[error("asking the imageserver which objects it has")]
    Check { source: ClientError },
    /// `CheckObjects` answered a different number of sizes than hashes asked about.
    #[error("CheckObjects answered {got} sizes for {asked} hashes")]
    CheckAnswer { got: usize, asked: usize },
    /// A file to send could not be opened.
    #[error("{}", .path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file held fewer bytes than when it was hashed.
    #[error("a file shrank while being added (object {0})")]
    Shrank(ObjectId),
    /// Reading a file or feeding the request body failed.
    #[error(transparent)]
    Stream(#[from] std::io::Error),
    /// The thread producing the request body panicked or was cancelled.
    #[error("upload thread")]
    Thread(#[source] tokio::task::JoinError),
    /// The server refused the batch, because a file changed after it was hashed (the
    /// server's hash check failed).
    #[error("uploading objects (a file changed while being added)")]
    Changed { source: ClientError },
    /// The server refused the batch, or could not be reached.
    #[error("uploading objects")]
    Send { source: ClientError },
}

/// Where an object's bytes come from.
pub enum Source {
    /// A file on disk that must still hash to the id (a directory being added).
    Path(PathBuf),
    /// Bytes already read (small files from a tarball).
    Memory(Vec<u8>),
    /// A spooled temp file (large files from a tarball).
    Spool(std::fs::File),
}

/// One object to send.
pub struct Item {
    pub id: ObjectId,
    pub size: u64,
    pub source: Source,
}

/// Totals of what was sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    pub objects: u64,
    pub bytes: u64,
}

/// Most hashes per `CheckObjects`.
pub const CHECK_BATCH: usize = 8192;

/// Sends objects, remembering what the server is known to have.
pub struct Uploader {
    client: ImageServerClient,
    known: HashSet<ObjectId>,
    pub sent: Sent,
    /// Called with bytes as they are streamed.
    pub on_bytes: Arc<dyn Fn(u64) + Send + Sync>,
}

impl Uploader {
    pub fn new(client: ImageServerClient) -> Uploader {
        Uploader {
            client,
            known: HashSet::new(),
            sent: Sent::default(),
            on_bytes: Arc::new(|_| {}),
        }
    }

    /// Of `ids`, those the server lacks (asked in batches), never asking twice.
    pub async fn missing(&mut self, ids: &[ObjectId]) -> Result<HashSet<ObjectId>, UploadError> {
        let ask: Vec<ObjectId> = ids
            .iter()
            .filter(|i| !self.known.contains(i))
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut missing = HashSet::new();
        for chunk in ask.chunks(CHECK_BATCH) {
            let sizes = self
                .client
                .check_objects(chunk)
                .await
                .map_err(|source| UploadError::Check { source })?;
            if sizes.len() != chunk.len() {
                return Err(UploadError::CheckAnswer {
                    got: sizes.len(),
                    asked: chunk.len(),
                });
            }
            for (id, size) in chunk.iter().zip(sizes) {
                if size == 0 {
                    missing.insert(*id);
                } else {
                    self.known.insert(*id);
                }
            }
        }
        Ok(missing)
    }

    /// Asks the server again about every one of `ids`, whatever it was told before, which
    /// also pins them on the server for its grace period; returns those it lacks.
    pub async fn recheck(&mut self, ids: &[ObjectId]) -> Result<HashSet<ObjectId>, UploadError> {
        self.known.clear();
        self.missing(ids).await
    }

    /// Sends `items` (already known to be missing) in one streamed request.
    pub async fn send(&mut self, items: Vec<Item>) -> Result<(), UploadError> {
        let ids: Vec<ObjectId> = items.iter().map(|i| i.id).collect();
        let sent = send_batch(&self.client, items, self.on_bytes.clone()).await?;
        self.sent.objects += sent.objects;
        self.sent.bytes += sent.bytes;
        self.known.extend(ids);
        Ok(())
    }

    /// Sends batches (each already known to be missing) on `streams` concurrent requests,
    /// so the server verifies and writes on several cores.
    pub async fn send_concurrently(
        &mut self,
        batches: Vec<Vec<Item>>,
        streams: usize,
    ) -> Result<(), UploadError> {
        use futures_util::StreamExt;
        let client = self.client.clone();
        let on_bytes = self.on_bytes.clone();
        let mut results = futures_util::stream::iter(batches.into_iter().map(|b| {
            let ids: Vec<ObjectId> = b.iter().map(|i| i.id).collect();
            let (client, on_bytes) = (client.clone(), on_bytes.clone());
            async move { send_batch(&client, b, on_bytes).await.map(|s| (s, ids)) }
        }))
        .buffer_unordered(streams.max(1));
        while let Some(r) = results.next().await {
            let (s, ids) = r?;
            self.sent.objects += s.objects;
            self.sent.bytes += s.bytes;
            self.known.extend(ids);
        }
        Ok(())
    }
}

/// Streams one batch as a single `AddObjects` request. When the imageserver fails (no
/// answer, a 5xx, the connection cut mid-body) and the client knows another, that one is
/// asked which of the batch it lacks (over a shared bucket it may already hold what the
/// failed one stored) and sent those, once per imageserver of the list.
async fn send_batch(
    client: &ImageServerClient,
    items: Vec<Item>,
    on_bytes: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<Sent, UploadError> {
    let sent = Sent {
        objects: items.len() as u64,
        bytes: items.iter().map(|i| i.size).sum(),
    };
    let mut items = items;
    let mut attempt = 1;
    while !items.is_empty() {
        let index = client.preferred();
        let (back, result) = stream_batch(client, index, items, on_bytes.clone()).await?;
        match result {
            Ok(()) => break,
            Err(e) if fails_over(&e) && attempt < client.server_count() => {
                client.reply_failed(index, &e);
                items = still_missing(client, back).await?;
                attempt += 1;
            }
            // The server verifies every hash; a mismatch here means a file changed after
            // it was hashed.
            Err(e) => return Err(refused(e)),
        }
    }
    Ok(sent)
}

/// Of `items`, those the (now preferred) imageserver lacks.
async fn still_missing(
    client: &ImageServerClient,
    mut items: Vec<Item>,
) -> Result<Vec<Item>, UploadError> {
    let ids: Vec<ObjectId> = items.iter().map(|i| i.id).collect();
    let mut sizes = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(CHECK_BATCH) {
        let got = client
            .check_objects(chunk)
            .await
            .map_err(|source| UploadError::Check { source })?;
        if got.len() != chunk.len() {
            return Err(UploadError::CheckAnswer {
                got: got.len(),
                asked: chunk.len(),
            });
        }
        sizes.extend(got);
    }
    let mut sizes = sizes.into_iter();
    items.retain(|_| sizes.next() == Some(0));
    Ok(items)
}

/// Why producing a request body stopped.
enum Produce {
    /// A local problem: a file missing, shrunk or unreadable.
    Local(UploadError),
    /// Writing into the request body failed: the request itself ended (its result says
    /// why).
    Pipe(std::io::Error),
}

/// Streams `items` to the imageserver at `index`: the items back (to send elsewhere), and
/// the server's answer. A local problem (a file changed) is the error, as it explains a
/// server-side refusal better.
async fn stream_batch(
    client: &ImageServerClient,
    index: usize,
    items: Vec<Item>,
    on_bytes: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<(Vec<Item>, Result<(), ClientError>), UploadError> {
    let (rd, wr) = tokio::io::duplex(256 * 1024);
    let producer = tokio::task::spawn_blocking(move || {
        let mut items = items;
        let r = produce(&mut items, SyncIoBridge::new(wr), &*on_bytes);
        (items, r)
    });
    let body = reqwest::Body::wrap_stream(ReaderStream::with_capacity(rd, 256 * 1024));
    let result = client.add_objects_to(index, body).await.map(|_| ());
    let (items, produced) = producer.await.map_err(UploadError::Thread)?;
    match (produced, result) {
        (Err(Produce::Local(e)), _) => Err(e),
        (Err(Produce::Pipe(e)), Ok(())) => Err(UploadError::Stream(e)),
        (_, result) => Ok((items, result)),
    }
}

/// Writes `items` as frames into `out`, reporting bytes to `on_bytes`.
fn produce(
    items: &mut [Item],
    mut out: SyncIoBridge<tokio::io::DuplexStream>,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), Produce> {
    let mut buf = vec![0u8; 256 * 1024];
    for item in items {
        out.write_all(&frame::header(&item.id, item.size))
            .map_err(Produce::Pipe)?;
        let mut reader: Box<dyn Read + '_> = match &mut item.source {
            Source::Path(path) => match std::fs::File::open(&*path) {
                Ok(f) => Box::new(f),
                Err(source) => {
                    let path = path.clone();
                    return Err(Produce::Local(UploadError::Open { path, source }));
                }
            },
            Source::Memory(v) => Box::new(std::io::Cursor::new(v.as_slice())),
            Source::Spool(f) => {
                f.rewind()
                    .map_err(|e| Produce::Local(UploadError::Stream(e)))?;
                Box::new(f)
            }
        };
        let mut left = item.size;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let n = reader
                .read(&mut buf[..want])
                .map_err(|e| Produce::Local(UploadError::Stream(e)))?;
            if n == 0 {
                return Err(Produce::Local(UploadError::Shrank(item.id)));
            }
            out.write_all(&buf[..n]).map_err(Produce::Pipe)?;
            on_bytes(n as u64);
            left -= n as u64;
        }
    }
    out.flush().map_err(Produce::Pipe)?;
    out.shutdown().map_err(Produce::Pipe)?;
    Ok(())
}

/// Classifies the server's refusal of a batch: a failed hash check (the server names it
/// only in its 400's message) means a file changed after it was hashed.
fn refused(source: ClientError) -> UploadError {
    match &source {
        ClientError::Status {
            status: 400,
            message,
            ..
        } if message.contains("hash mismatch") => UploadError::Changed { source },
        _ => UploadError::Send { source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, message: &str) -> ClientError {
        ClientError::Status {
            method: "ObjectServer.AddObjects".into(),
            status,
            message: message.into(),
        }
    }

    #[test]
    fn a_refused_batch_says_whether_a_file_changed() {
        let changed = refused(status(
            400,
            "upload refused: hash mismatch: expected a, computed b",
        ));
        assert!(
            matches!(changed, UploadError::Changed { .. }),
            "{changed:?}"
        );
        assert_eq!(
            disk::report::error_line(&changed),
            "uploading objects (a file changed while being added): ObjectServer.AddObjects: upload refused: hash mismatch: expected a, computed b (HTTP 400)"
        );
        for other in [status(400, "upload truncated"), status(507, "no space")] {
            let e = refused(other);
            assert!(matches!(e, UploadError::Send { .. }), "{e:?}");
        }
    }
}
