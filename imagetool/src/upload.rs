//! Sending objects to the imageserver: ask which of a batch it lacks (one
//! `CheckObjects`), then stream only those as one `AddObjects` frame stream, produced on a
//! blocking thread so file reading overlaps the network.

use anyhow::{bail, Context};
use model::frame;
use model::ObjectId;
use std::collections::HashSet;
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::io::{ReaderStream, SyncIoBridge};
use wire::client::ImageServerClient;

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
    pub async fn missing(&mut self, ids: &[ObjectId]) -> anyhow::Result<HashSet<ObjectId>> {
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
                .context("asking the imageserver which objects it has")?;
            if sizes.len() != chunk.len() {
                bail!(
                    "CheckObjects answered {} sizes for {} hashes",
                    sizes.len(),
                    chunk.len()
                );
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
    pub async fn recheck(&mut self, ids: &[ObjectId]) -> anyhow::Result<HashSet<ObjectId>> {
        self.known.clear();
        self.missing(ids).await
    }

    /// Sends `items` (already known to be missing) in one streamed request.
    pub async fn send(&mut self, items: Vec<Item>) -> anyhow::Result<()> {
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
    ) -> anyhow::Result<()> {
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

/// Streams one batch as a single `AddObjects` request.
async fn send_batch(
    client: &ImageServerClient,
    items: Vec<Item>,
    on_bytes: Arc<dyn Fn(u64) + Send + Sync>,
) -> anyhow::Result<Sent> {
    if items.is_empty() {
        return Ok(Sent::default());
    }
    let count = items.len() as u64;
    let total: u64 = items.iter().map(|i| i.size).sum();
    let (rd, wr) = tokio::io::duplex(256 * 1024);
    let producer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut out = SyncIoBridge::new(wr);
        let mut buf = vec![0u8; 256 * 1024];
        for item in items {
            out.write_all(&frame::header(&item.id, item.size))?;
            let mut reader: Box<dyn Read> = match item.source {
                Source::Path(p) => {
                    Box::new(std::fs::File::open(&p).with_context(|| format!("{}", p.display()))?)
                }
                Source::Memory(v) => Box::new(std::io::Cursor::new(v)),
                Source::Spool(mut f) => {
                    f.rewind()?;
                    Box::new(f)
                }
            };
            let mut left = item.size;
            while left > 0 {
                let want = (left as usize).min(buf.len());
                let n = reader.read(&mut buf[..want])?;
                if n == 0 {
                    bail!("a file shrank while being added (object {})", item.id);
                }
                out.write_all(&buf[..n])?;
                on_bytes(n as u64);
                left -= n as u64;
            }
        }
        out.flush()?;
        out.shutdown()?;
        Ok(())
    });
    let body = reqwest::Body::wrap_stream(ReaderStream::with_capacity(rd, 256 * 1024));
    let result = client.add_objects(body).await;
    let produced = producer.await.context("upload thread")?;
    // A local problem (a file changed) explains a server-side refusal better.
    produced?;
    // The server verifies every hash; a mismatch here means a file changed after it
    // was hashed.
    if let Err(e) = result {
        if e.to_string().contains("hash mismatch") {
            return Err(e).context("uploading objects (a file changed while being added)");
        }
        return Err(e).context("uploading objects");
    }
    Ok(Sent {
        objects: count,
        bytes: total,
    })
}
