//! `imagetool adds`: an image made from a live host. The tree comes from a full poll of the
//! host's subd (`Snapshot.GetTree`) (`model::snapshot::captured_tree`: its scan exclusions and `/.subd` never
//! enter it, then the filter), the objects the imageserver lacks are read from the host
//! (`Snapshot.GetObjects`, re-hashed by subd as sent) and uploaded while the next batch
//! is read. An object whose file changed since the scan is retried from a fresh scan, a
//! bounded number of times, else the snapshot fails naming its path: no image ever holds
//! a stale hash. `--every` (`every`) repeats it, adding a numbered image only when the
//! host changed.

use crate::add::{load_filter, load_triggers, progress_bar, AddError, SPOOL_OVER};
use crate::upload::{Item, Source, UploadError, Uploader};
use futures_util::TryStreamExt;
use model::api::PollRequest;
use model::frame::{self, checked};
use model::{FileTree, Filter, FsPath, Image, ImageName, Kind, ObjectId, Triggers};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt};
use wire::client::{ClientError, ClientSecurity, ImageServerClient, SubdClient};

/// Objects asked for in one `Snapshot.GetObjects`, by bytes…
pub const FETCH_BATCH_BYTES: u64 = 32 << 20;
/// …and by count.
pub const FETCH_BATCH_OBJECTS: usize = 4096;
/// How long to wait for the host's next scan (after a change, or for its first one).
pub const RESCAN_WAIT: Duration = Duration::from_secs(120);

/// Why a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Add(#[from] AddError),
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error("subd address")]
    Address(#[source] wire::client::BadHostPort),
    #[error("connecting to subd {host}")]
    Connect { host: String, source: ClientError },
    #[error("polling subd {host}")]
    Poll { host: String, source: ClientError },
    #[error("subd {host} finished no new scan within {}s", .waited.as_secs())]
    NoScan { host: String, waited: Duration },
    #[error("the tree of {host} is not a valid image")]
    InvalidTree {
        host: String,
        source: model::image::TreeError,
    },
    #[error("reading files from subd {host}")]
    Fetch { host: String, source: ClientError },
    #[error("reading files from subd {host}: {message}")]
    Stream { host: String, message: String },
    #[error("spooling a large file")]
    Spool(#[source] std::io::Error),
    #[error("{path} changed while it was read, {attempts} times (and {others} other files); no image was added")]
    Changed {
        path: FsPath,
        attempts: u32,
        others: usize,
    },
}

/// What `adds` was asked to do.
pub struct Request<'a> {
    pub host: &'a str,
    pub filter: &'a str,
    pub triggers: &'a str,
    /// Fresh scans to try after a file changed while read.
    pub retries: u32,
}

/// What one snapshot did.
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub name: String,
    pub host: String,
    /// `false`: `--every` found the host unchanged and added nothing.
    pub added: bool,
    pub files: u64,
    pub bytes: u64,
    /// Objects the imageserver lacked and got from the host.
    pub new_objects: u64,
    pub bytes_sent: u64,
    /// Fresh scans needed because a file changed while read.
    pub retries: u32,
    pub seconds: f64,
}

/// The image built, and what it cost.
struct Taken {
    image: Image,
    retries: u32,
}

/// A live host and the imageserver a snapshot goes to.
pub struct Snapshotter {
    client: ImageServerClient,
    subd: SubdClient,
    host: String,
    up: Uploader,
    filter: Option<Filter>,
    triggers: Triggers,
    retries: u32,
}

impl Snapshotter {
    pub fn new(
        client: &ImageServerClient,
        security: &ClientSecurity,
        req: &Request<'_>,
    ) -> Result<Snapshotter, SnapshotError> {
        wire::client::check_host_port(req.host).map_err(SnapshotError::Address)?;
        let host = req.host.to_string();
        let subd =
            SubdClient::new(req.host, security, None).map_err(|source| SnapshotError::Connect {
                host: host.clone(),
                source,
            })?;
        Ok(Snapshotter {
            client: client.clone(),
            subd,
            host,
            up: Uploader::new(client.clone()),
            filter: load_filter(req.filter)?,
            triggers: load_triggers(req.triggers)?,
            retries: req.retries,
        })
    }

    /// Starts a round afresh: nothing sent yet, and nothing assumed present on the
    /// imageserver (objects may have been deleted as unreferenced since).
    fn reset(&mut self) {
        self.up = Uploader::new(self.client.clone());
    }

    /// A full poll: the tree of a scan that finished after the first `scans` (waits for
    /// one); returns the scan count with the tree as a snapshot keeps it.
    async fn poll_after(&self, scans: u64) -> Result<(u64, FileTree), SnapshotError> {
        let started = Instant::now();
        loop {
            let poll = self
                .subd
                .snapshot_tree(&PollRequest {
                    have_generation: 0,
                    short_only: false,
                    ..Default::default()
                })
                .await
                .map_err(|source| SnapshotError::Poll {
                    host: self.host.clone(),
                    source,
                })?;
            if poll.generation != 0 && poll.scan_count > scans {
                if let Some(tree) = poll.tree {
                    let exclusions = Filter::from_lines(poll.exclusions).ok();
                    let tree = model::snapshot::captured_tree(
                        &tree,
                        exclusions.as_ref(),
                        self.filter.as_ref(),
                    );
                    return Ok((poll.scan_count, tree));
                }
            }
            if started.elapsed() > RESCAN_WAIT {
                return Err(SnapshotError::NoScan {
                    host: self.host.clone(),
                    waited: RESCAN_WAIT,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Polls, fetches and uploads until no object changed while read (or the retries
    /// are spent); returns the image (not yet added).
    async fn take(&mut self, pb: &indicatif::ProgressBar) -> Result<Taken, SnapshotError> {
        let mut scans = 0;
        let mut attempt = 0;
        let mut last_changed: Option<(FileTree, HashSet<ObjectId>)> = None;
        loop {
            pb.set_message("polling");
            let (count, tree) = match (self.poll_after(scans).await, last_changed.take()) {
                (Ok(polled), _) => polled,
                // No fresh scan to retry from: the change is the error.
                (Err(SnapshotError::NoScan { .. }), Some((tree, changed))) => {
                    return Err(changed_error(&tree, &changed, attempt))
                }
                (Err(e), _) => return Err(e),
            };
            scans = count;
            tree.validate()
                .map_err(|source| SnapshotError::InvalidTree {
                    host: self.host.clone(),
                    source,
                })?;
            pb.set_message("copying");
            let changed = self.copy_missing(&tree).await?;
            if changed.is_empty() {
                let image = Image::new(tree, self.filter.clone(), self.triggers.clone());
                return Ok(Taken {
                    image,
                    retries: attempt,
                });
            }
            attempt += 1;
            if attempt > self.retries {
                return Err(changed_error(&tree, &changed, attempt));
            }
            let note = format!(
                "imagetool: {} files changed while read; waiting for a fresh scan of {}",
                changed.len(),
                self.host
            );
            if pb.is_hidden() {
                eprintln!("{note}");
            } else {
                pb.println(note);
            }
            last_changed = Some((tree, changed));
        }
    }

    /// Copies the objects of `tree` the imageserver lacks from the host; returns those
    /// whose files changed since the scan (not sent).
    async fn copy_missing(&mut self, tree: &FileTree) -> Result<HashSet<ObjectId>, SnapshotError> {
        let objects = tree.objects();
        let ids: Vec<ObjectId> = objects.keys().copied().collect();
        let missing = self.up.missing(&ids).await?;
        let batches = batches(&objects, &missing);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Item>>(1);
        let subd = self.subd.clone();
        let host = self.host.clone();
        let reader = async move {
            let mut changed = HashSet::new();
            for batch in batches {
                let items = read_batch(&subd, &host, &batch, &mut changed).await?;
                if tx.send(items).await.is_err() {
                    break;
                }
            }
            Ok::<_, SnapshotError>(changed)
        };
        let up = &mut self.up;
        let writer = async move {
            while let Some(items) = rx.recv().await {
                let half = items.len() / 2;
                let mut first = items;
                let second = first.split_off(half);
                up.send_concurrently(vec![first, second], crate::add::UPLOAD_STREAMS)
                    .await?;
            }
            Ok::<_, SnapshotError>(())
        };
        let (read, written) = tokio::join!(reader, writer);
        written?;
        read
    }
}

/// The missing objects of `objects` as fetch batches of (id, size).
fn batches(
    objects: &BTreeMap<ObjectId, u64>,
    missing: &HashSet<ObjectId>,
) -> Vec<Vec<(ObjectId, u64)>> {
    let mut out: Vec<Vec<(ObjectId, u64)>> = Vec::new();
    let mut bytes = 0;
    for (id, size) in objects.iter().filter(|(id, _)| missing.contains(id)) {
        match out.last_mut() {
            Some(b) if bytes < FETCH_BATCH_BYTES && b.len() < FETCH_BATCH_OBJECTS => {
                b.push((*id, *size))
            }
            _ => {
                out.push(vec![(*id, *size)]);
                bytes = 0;
            }
        }
        bytes += size;
    }
    out
}

/// The error naming the first changed file's path.
fn changed_error(tree: &FileTree, changed: &HashSet<ObjectId>, attempts: u32) -> SnapshotError {
    let path = tree
        .entries
        .iter()
        .find(|(_, ino)| {
            let i = &tree.inodes[ino];
            i.kind == Kind::File && i.hash.is_some_and(|h| changed.contains(&h))
        })
        .map(|(p, _)| p.clone())
        .unwrap_or_else(FsPath::root);
    SnapshotError::Changed {
        path,
        attempts,
        others: changed.len().saturating_sub(1),
    }
}

/// Reads one batch from the host: the objects that still hash to their ids, and the ids
/// of those that changed added to `changed`.
async fn read_batch(
    subd: &SubdClient,
    host: &str,
    batch: &[(ObjectId, u64)],
    changed: &mut HashSet<ObjectId>,
) -> Result<Vec<Item>, SnapshotError> {
    let ids: Vec<ObjectId> = batch.iter().map(|(id, _)| *id).collect();
    let resp = subd
        .snapshot_objects(&ids)
        .await
        .map_err(|source| SnapshotError::Fetch {
            host: host.to_string(),
            source,
        })?;
    let stream = resp.bytes_stream().map_err(std::io::Error::other);
    let mut body = tokio_util::io::StreamReader::new(stream);
    let broken = |message: String| SnapshotError::Stream {
        host: host.to_string(),
        message,
    };
    let mut items = Vec::with_capacity(batch.len());
    for (id, size) in batch {
        let mut h = [0u8; frame::HEADER_LEN];
        body.read_exact(&mut h)
            .await
            .map_err(|e| broken(format!("reply ended early: {e}")))?;
        let (got, len) = frame::parse_header(&h);
        if got != *id {
            return Err(broken(format!(
                "sent object {got} where {id} was asked for"
            )));
        }
        if len == checked::UNAVAILABLE {
            changed.insert(*id);
            continue;
        }
        if len != *size {
            return Err(broken(format!(
                "sent {len} bytes for object {id} of {size}"
            )));
        }
        let source = read_content(&mut body, len)
            .await
            .map_err(|e| broken(format!("reading object {id}: {e}")))?;
        let mut status = [0u8];
        body.read_exact(&mut status)
            .await
            .map_err(|e| broken(format!("reply ended early: {e}")))?;
        match checked::status(status[0]) {
            Some(checked::Status::Same) => items.push(Item {
                id: *id,
                size: len,
                source,
            }),
            Some(checked::Status::Changed) => {
                changed.insert(*id);
            }
            None => return Err(broken(format!("bad status byte {}", status[0]))),
        }
    }
    Ok(items)
}

/// `len` bytes of `body`: in memory, or spooled to a temp file when large.
async fn read_content(body: &mut (impl AsyncRead + Unpin), len: u64) -> std::io::Result<Source> {
    if len <= SPOOL_OVER {
        let mut v = vec![0u8; len as usize];
        body.read_exact(&mut v).await?;
        return Ok(Source::Memory(v));
    }
    let mut f = tempfile::tempfile()?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let want = (left as usize).min(buf.len());
        body.read_exact(&mut buf[..want]).await?;
        f.write_all(&buf[..want])?;
        left -= want as u64;
    }
    Ok(Source::Spool(f))
}

/// Counts for a summary.
fn counts(tree: &FileTree) -> (u64, u64) {
    let files = tree
        .entries
        .values()
        .filter(|i| tree.inodes[i].kind == Kind::File)
        .count() as u64;
    (files, tree.total_bytes())
}

/// Refuses a name that holds or held an image.
async fn check_free(client: &ImageServerClient, name: &ImageName) -> Result<bool, AddError> {
    let state = client
        .check_image_name(name.as_str())
        .await
        .map_err(|source| AddError::Ask { source })?;
    Ok(!state.exists && !state.deleted)
}

/// `imagetool adds NAME HOST FILTER TRIGGERS`: snapshots the host into image `name`.
pub async fn adds(
    client: &ImageServerClient,
    security: &ClientSecurity,
    name: &str,
    req: &Request<'_>,
) -> Result<Summary, SnapshotError> {
    let start = Instant::now();
    let name = ImageName::parse(name).map_err(AddError::from)?;
    let mut snap = Snapshotter::new(client, security, req)?;
    if !check_free(client, &name).await? {
        let state = client
            .check_image_name(name.as_str())
            .await
            .map_err(|source| AddError::Ask { source })?;
        return Err(if state.deleted {
            AddError::Deleted(name).into()
        } else {
            AddError::Exists(name).into()
        });
    }
    let pb = progress_bar("snapshot");
    let pbc = pb.clone();
    snap.up.on_bytes = Arc::new(move |n| pbc.inc(n));
    let taken = snap.take(&pb).await?;
    pb.finish_and_clear();
    add_image(client, &name, &taken.image).await?;
    let (files, bytes) = counts(&taken.image.tree);
    Ok(Summary {
        name: name.to_string(),
        host: req.host.to_string(),
        added: true,
        files,
        bytes,
        new_objects: snap.up.sent.objects,
        bytes_sent: snap.up.sent.bytes,
        retries: taken.retries,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `AddImage`, after confirming (and so pinning) every object once more.
async fn add_image(
    client: &ImageServerClient,
    name: &ImageName,
    image: &Image,
) -> Result<(), SnapshotError> {
    let mut up = Uploader::new(client.clone());
    let ids: Vec<ObjectId> = image.objects().into_keys().collect();
    let gone = up.recheck(&ids).await?;
    if !gone.is_empty() {
        return Err(AddError::ObjectsDeleted(gone.len()).into());
    }
    client
        .add_image(name.as_str(), image)
        .await
        .map_err(|source| AddError::AddImage {
            name: name.clone(),
            source,
        })?;
    Ok(())
}

/// One round of `--every`: snapshots the host and adds `PREFIX/<n+1>` if its tree, filter
/// or triggers differ from the newest image under `prefix`.
pub async fn round(
    client: &ImageServerClient,
    snap: &mut Snapshotter,
    prefix: &str,
) -> Result<Summary, SnapshotError> {
    let start = Instant::now();
    snap.reset();
    let taken = snap.take(&indicatif::ProgressBar::hidden()).await?;
    let names = client
        .list_images(Some(&format!("{prefix}/")))
        .await
        .map_err(|source| AddError::Ask { source })?;
    let newest = match names.last() {
        Some(n) => Some((
            n.clone(),
            client
                .get_image(n)
                .await
                .map_err(|source| AddError::Ask { source })?,
        )),
        None => None,
    };
    let (files, bytes) = counts(&taken.image.tree);
    let mut summary = Summary {
        name: String::new(),
        host: snap.host.clone(),
        added: false,
        files,
        bytes,
        new_objects: snap.up.sent.objects,
        bytes_sent: snap.up.sent.bytes,
        retries: taken.retries,
        seconds: 0.0,
    };
    if let Some((n, image)) = &newest {
        if crate::listing::ImageDiff::of(image, &taken.image)
            .lines()
            .is_empty()
        {
            summary.name = n.clone();
            summary.seconds = start.elapsed().as_secs_f64();
            return Ok(summary);
        }
    }
    let name = free_name(client, prefix, names).await?;
    add_image(client, &name, &taken.image).await?;
    summary.name = name.to_string();
    summary.added = true;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// The next numbered name under `prefix` no image holds or held.
async fn free_name(
    client: &ImageServerClient,
    prefix: &str,
    mut names: Vec<String>,
) -> Result<ImageName, SnapshotError> {
    loop {
        let next = model::snapshot::next_numbered_name(prefix, &names);
        let name = ImageName::parse(&next).map_err(AddError::from)?;
        if check_free(client, &name).await? {
            return Ok(name);
        }
        names.push(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_only_missing_objects_bounded_by_bytes_and_count() {
        let mut objects = BTreeMap::new();
        for i in 0..10u32 {
            objects.insert(ObjectId::of(&i.to_be_bytes()), 10 << 20);
        }
        let missing: HashSet<ObjectId> = objects.keys().copied().take(7).collect();
        let b = batches(&objects, &missing);
        let sizes: Vec<usize> = b.iter().map(Vec::len).collect();
        assert_eq!(sizes, [4, 3], "a batch closes once it holds 32 MiB");
        assert!(b.iter().flatten().all(|(id, _)| missing.contains(id)));
        let small: BTreeMap<ObjectId, u64> = (0..5000u32)
            .map(|i| (ObjectId::of(&i.to_be_bytes()), 1))
            .collect();
        let all: HashSet<ObjectId> = small.keys().copied().collect();
        let sizes: Vec<usize> = batches(&small, &all).iter().map(Vec::len).collect();
        assert_eq!(sizes, [FETCH_BATCH_OBJECTS, 5000 - FETCH_BATCH_OBJECTS]);
        assert!(batches(&small, &HashSet::new()).is_empty());
    }
}
