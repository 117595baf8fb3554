//! Sending objects to the imageserver: ask which of a batch it lacks (one
//! `CheckObjects`), then stream only those as one `AddObjects` frame stream, produced on a
//! blocking thread so file reading overlaps the network.

use anyhow::{bail, Context};
use model::client::ImageServerClient;
use model::frame;
use model::ObjectId;
use std::collections::HashSet;
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::io::{ReaderStream, SyncIoBridge};

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

    /// Sends `items` (already known to be missing) in one streamed request.
    pub async fn send(&mut self, items: Vec<Item>) -> anyhow::Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let ids: Vec<ObjectId> = items.iter().map(|i| i.id).collect();
        let total: u64 = items.iter().map(|i| i.size).sum();
        let (rd, wr) = tokio::io::duplex(256 * 1024);
        let on_bytes = self.on_bytes.clone();
        let producer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut out = SyncIoBridge::new(wr);
            let mut buf = vec![0u8; 256 * 1024];
            for item in items {
                out.write_all(&frame::header(&item.id, item.size))?;
                let mut reader: Box<dyn Read> = match item.source {
                    Source::Path(p) => Box::new(
                        std::fs::File::open(&p).with_context(|| format!("{}", p.display()))?,
                    ),
                    Source::Memory(v) => Box::new(std::io::Cursor::new(v)),
                    Source::Spool(mut f) => {
                        f.rewind()?;
                        Box::new(f)
                    }
                };
                let mut left = item.size;
                let mut hasher = model::hash::ObjectHasher::new();
                while left > 0 {
                    let want = (left as usize).min(buf.len());
                    let n = reader.read(&mut buf[..want])?;
                    if n == 0 {
                        bail!("a file shrank while being added (object {})", item.id);
                    }
                    hasher.update(&buf[..n]);
                    out.write_all(&buf[..n])?;
                    on_bytes(n as u64);
                    left -= n as u64;
                }
                if hasher.finish().0 != item.id {
                    bail!("a file changed while being added (object {})", item.id);
                }
            }
            out.flush()?;
            out.shutdown()?;
            Ok(())
        });
        let body = reqwest::Body::wrap_stream(ReaderStream::with_capacity(rd, 256 * 1024));
        let result = self.client.add_objects(body).await;
        let produced = producer.await.context("upload thread")?;
        // A local problem (a file changed) explains a server-side refusal better.
        produced?;
        result.context("uploading objects")?;
        self.sent.objects += ids.len() as u64;
        self.sent.bytes += total;
        self.known.extend(ids);
        Ok(())
    }
}
