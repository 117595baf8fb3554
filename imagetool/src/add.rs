//! `imagetool add NAME PATH FILTERFILE TRIGGERSFILE [--state FILE]`: build the tree from a directory or a
//! tarball, send the objects the server lacks, then add the image.
//!
//! A directory is scanned (hashing in parallel), then its objects are checked and sent in
//! batches. A tarball is read once: a blocking thread imports it, keeping each file's bytes
//! (in memory when small, spooled to an unlinked temp file when large) in bounded batches
//! that an async task checks and uploads while the next batch is read.

use crate::upload::{Item, Source, UploadError, Uploader};
use disk::scan::{scan, ChangedFiles, ScanError, ScanOptions};
use disk::tarball::{self, ContentSink};
use indicatif::{ProgressBar, ProgressStyle};
use model::image::Kind;
use model::{FileTree, Filter, FsPath, Image, ImageName, ObjectId, StateLines, Triggers};
use std::collections::HashSet;
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use wire::client::{ClientError, ImageServerClient};

/// Why an image could not be added.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error(transparent)]
    Name(#[from] model::image::BadImageName),
    /// The filter file could not be read.
    #[error("filter file {path}")]
    FilterFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Filter(#[from] model::filter::BadRegex),
    /// The triggers file could not be read.
    #[error("triggers file {path}")]
    TriggersFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Triggers(#[from] model::triggers::TriggersError),
    /// The state file could not be read.
    #[error("state file {}", .path.display())]
    StateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] model::state::StateError),
    /// The directory or tarball could not be looked at or opened.
    #[error("{}", .path.display())]
    Source {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Neither a directory nor a regular file.
    #[error("{}: neither a directory nor a file", .0.display())]
    NotFileOrDir(PathBuf),
    /// Asking the imageserver whether the name is taken failed.
    #[error("asking the imageserver")]
    Ask { source: ClientError },
    /// The name holds an image.
    #[error("image {0} already exists")]
    Exists(ImageName),
    /// The name was deleted, and names are never reused.
    #[error("image {0} was deleted; image names are never reused")]
    Deleted(ImageName),
    /// The name's image expired, and names are never reused.
    #[error("image {0} expired; image names are never reused")]
    Expired(ImageName),
    /// `--expires-in` shorter than the server accepts.
    #[error("--expires-in")]
    Expiry(#[from] model::expiry::ExpiryError),
    /// The scanning thread panicked.
    #[error("scan thread")]
    ScanThread(#[source] tokio::task::JoinError),
    /// The directory could not be scanned.
    #[error("scanning {}", .path.display())]
    Scan { path: PathBuf, source: ScanError },
    /// The scanned tree is one the imageserver would refuse.
    #[error("{}", .path.display())]
    InvalidTree {
        path: PathBuf,
        source: model::image::TreeError,
    },
    /// The tar reading thread panicked.
    #[error("tar thread")]
    TarThread(#[source] tokio::task::JoinError),
    /// The file is not a tar archive.
    #[error("{} is not a tar archive, a gzip-compressed tar or a directory ({why})", .path.display())]
    NotTar { path: PathBuf, why: String },
    /// The tar archive could not be read.
    #[error("{}", .path.display())]
    Tar {
        path: PathBuf,
        source: tarball::TarError,
    },
    #[error(transparent)]
    Hooks(#[from] crate::hooks::HooksDirError),
    #[error(transparent)]
    Upload(#[from] UploadError),
    /// Objects sent from a tarball were deleted as unreferenced before `AddImage`.
    #[error("{0} objects sent earlier were deleted from the server (as unreferenced) during the add; run it again")]
    ObjectsDeleted(usize),
    /// `AddImage` failed.
    #[error("adding image {name}")]
    AddImage {
        name: ImageName,
        source: ClientError,
    },
}

/// What `add` did.
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub name: String,
    pub sparse: bool,
    pub files: u64,
    pub bytes: u64,
    pub new_objects: u64,
    pub bytes_sent: u64,
    pub seconds: f64,
}

/// A batch of tarball files is handed to the uploader at this many bytes in memory…
pub const BATCH_BYTES: u64 = 8 << 20;
/// …or this many files…
pub const BATCH_FILES: usize = 4096;
/// …or this many bytes in all, spooled ones included (each batch is one `AddObjects`,
/// and each costs the server at least one `syncfs`).
pub const BATCH_TOTAL_BYTES: u64 = 64 << 20;
/// A directory's missing objects are sent in requests of about this many bytes…
pub const DIR_BATCH_BYTES: u64 = 32 << 20;
/// …on this many concurrent streams.
pub const UPLOAD_STREAMS: usize = 2;
/// Files larger than this are spooled to a temp file rather than kept in memory.
pub const SPOOL_OVER: u64 = 1 << 20;

/// Reads and compiles the filter file (`""` = sparse image).
pub fn load_filter(arg: &str) -> Result<Option<Filter>, AddError> {
    if arg.is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(arg).map_err(|source| AddError::FilterFile {
        path: arg.to_string(),
        source,
    })?;
    let f = Filter::parse(&text, arg)?;
    for l in f.lines_with_trailing_blanks() {
        eprintln!("imagetool: warning: {arg}: filter line {l:?} ends in blanks, which are part of the regex");
    }
    Ok(Some(f))
}

/// The files `add` reads beside the tree: filter (`""` = sparse), triggers (`""` =
/// none) and state lines (`--state`).
pub struct Files<'a> {
    pub filter: &'a str,
    pub triggers: &'a str,
    pub state: Option<&'a Path>,
    /// The hooks directory (`--hooks`: `pre/` and `post/`), if any.
    pub hooks: Option<&'a Path>,
    /// `--expires-in`, in seconds (`None`: never expires).
    pub expires_in: Option<u64>,
}

/// Reads and compiles the state file (`None` = no state lines).
pub fn load_state(arg: Option<&Path>) -> Result<Option<StateLines>, AddError> {
    let Some(path) = arg else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|source| AddError::StateFile {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Some(StateLines::parse(&text, &path.display().to_string())?))
}

/// Reads and compiles the triggers file (`""` = none).
pub fn load_triggers(arg: &str) -> Result<Triggers, AddError> {
    if arg.is_empty() {
        return Ok(Triggers::default());
    }
    let text = std::fs::read_to_string(arg).map_err(|source| AddError::TriggersFile {
        path: arg.to_string(),
        source,
    })?;
    Ok(Triggers::parse(&text, arg)?)
}

pub(crate) fn progress_bar(label: &str) -> ProgressBar {
    if !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} {bytes} ({binary_bytes_per_sec}) {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_message(label.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

/// An I/O error on the directory or tarball being added.
fn source_error(path: &Path) -> impl FnOnce(io::Error) -> AddError + '_ {
    move |source| AddError::Source {
        path: path.to_path_buf(),
        source,
    }
}

/// True if `filter` leaves `path` out (it or an ancestor matches).
fn filtered(filter: Option<&Filter>, path: &FsPath) -> bool {
    let Some(f) = filter else { return false };
    let mut p = Some(path.clone());
    while let Some(x) = p {
        if x.is_root() {
            return false;
        }
        if f.matches(&x) {
            return true;
        }
        p = x.parent();
    }
    false
}

/// Refuses a taken (live, expired or deleted) name, and an `--expires-in` under the
/// server's minimum, before anything is sent (AddImage checks again, atomically).
async fn check_name(
    client: &ImageServerClient,
    name: &ImageName,
    expires_in: Option<u64>,
) -> Result<(), AddError> {
    let state = client
        .check_image_name(name.as_str())
        .await
        .map_err(|source| AddError::Ask { source })?;
    if state.exists {
        return Err(AddError::Exists(name.clone()));
    }
    if state.expired {
        return Err(AddError::Expired(name.clone()));
    }
    if state.deleted {
        return Err(AddError::Deleted(name.clone()));
    }
    let min = state.min_expiry_secs;
    if let Some(d) = expires_in.filter(|d| *d < min) {
        return Err(model::expiry::ExpiryError::TooSoon { secs: d, min }.into());
    }
    Ok(())
}

pub async fn add(
    client: &ImageServerClient,
    name: &str,
    path: &Path,
    files: &Files<'_>,
) -> Result<Summary, AddError> {
    let start = Instant::now();
    let name = ImageName::parse(name)?;
    let filter = load_filter(files.filter)?;
    let triggers = load_triggers(files.triggers)?;
    let state_lines = load_state(files.state)?;
    let hooks = files
        .hooks
        .map(crate::hooks::read_hooks_dir)
        .transpose()?
        .unwrap_or_default();
    let meta = std::fs::metadata(path).map_err(source_error(path))?;
    check_name(client, &name, files.expires_in).await?;
    let expires_in = files.expires_in;
    let mut up = Uploader::new(client.clone());
    let pb = progress_bar("adding");
    let pbc = pb.clone();
    up.on_bytes = Arc::new(move |n| pbc.inc(n));
    let tree = if meta.is_dir() {
        add_directory(&mut up, path, filter.clone(), &pb).await?
    } else if meta.is_file() {
        let tree = add_tarball(&mut up, path, filter.clone()).await;
        if tree.is_err() && up.sent.objects > 0 {
            pb.finish_and_clear();
            eprintln!(
                "imagetool: warning: the {} objects ({:.1} MiB) sent before the error stay on the server, unreferenced, until `imagetool delunrefobj` removes them",
                up.sent.objects,
                up.sent.bytes as f64 / 1048576.0
            );
        }
        tree?
    } else {
        return Err(AddError::NotFileOrDir(path.to_path_buf()));
    };
    // Confirm (and so pin) every object right before AddImage: one sent or found early
    // in a long add may have been deleted as unreferenced since its pin ran out.
    send_hooks(&mut up, &hooks).await?;
    let hook_ids: HashSet<ObjectId> = hooks.hooks.objects().into_keys().collect();
    let mut ids: Vec<ObjectId> = tree.objects().into_keys().collect();
    ids.extend(hook_ids.iter().copied());
    let mut gone = up.recheck(&ids).await?;
    if gone.iter().any(|id| hook_ids.contains(id)) {
        send_hooks(&mut up, &hooks).await?;
        gone.retain(|id| !hook_ids.contains(id));
    }
    if !gone.is_empty() {
        if meta.is_dir() {
            resend_from_directory(&mut up, path, &tree, &gone).await?;
        } else {
            return Err(AddError::ObjectsDeleted(gone.len()));
        }
    }
    pb.finish_and_clear();
    if filter.is_none() {
        if let Some(root) = tree.get(&FsPath::root()) {
            if (root.mode, root.uid, root.gid) != (0o755, 0, 0) {
                eprintln!(
                    "imagetool: warning: sparse image {name}: / is {:04o} {}:{}, not 0755 0:0; hosts' / will be changed to it",
                    root.mode, root.uid, root.gid
                );
            }
        }
    }
    let files = tree
        .entries
        .values()
        .filter(|i| tree.inodes[i].kind == Kind::File)
        .count() as u64;
    let bytes = tree.total_bytes();
    let sparse = filter.is_none();
    let mut image = Image::new(tree, filter, triggers);
    image.hooks = hooks.hooks;
    image.state = state_lines;
    // Counted from the moment the image is added, however long the upload took.
    image.expires_at = expires_in.map(|d| disk::clock::unix_now() + d);
    if let Err(source) = client.add_image(name.as_str(), &image).await {
        return Err(AddError::AddImage { name, source });
    }
    Ok(Summary {
        name: name.to_string(),
        sparse,
        files,
        bytes,
        new_objects: up.sent.objects,
        bytes_sent: up.sent.bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

async fn add_directory(
    up: &mut Uploader,
    path: &Path,
    filter: Option<Filter>,
    pb: &ProgressBar,
) -> Result<FileTree, AddError> {
    let root = path.to_path_buf();
    let pbc = pb.clone();
    let opts = ScanOptions {
        exclude: filter,
        threads: 0,
        throttle: Some(Arc::new(move |n| pbc.inc(n))),
        cancel: None,
        // A file replaced while `add` reads it is an error, never a silently wrong image.
        changed: ChangedFiles::Fail,
        known: None,
    };
    pb.set_message("hashing");
    let tree = tokio::task::spawn_blocking(move || scan(&root, &opts))
        .await
        .map_err(AddError::ScanThread)?
        .map_err(|source| AddError::Scan {
            path: path.to_path_buf(),
            source,
        })?;
    // Refuse what the imageserver would (an owner chown cannot set, …) before sending.
    tree.validate().map_err(|source| AddError::InvalidTree {
        path: path.to_path_buf(),
        source,
    })?;
    pb.set_message("sending");
    pb.set_position(0);
    // One path per object to read it from.
    let mut first_path: std::collections::HashMap<ObjectId, (u64, PathBuf)> = Default::default();
    for (p, ino) in &tree.entries {
        let i = &tree.inodes[ino];
        if let (Kind::File, Some(h)) = (i.kind, i.hash) {
            first_path
                .entry(h)
                .or_insert_with(|| (i.size, path.join(p.relative_os())));
        }
    }
    let ids: Vec<ObjectId> = first_path.keys().copied().collect();
    let missing = up.missing(&ids).await?;
    let mut batches: Vec<Vec<Item>> = vec![Vec::new()];
    let mut batch_bytes = 0u64;
    for id in ids.into_iter().filter(|i| missing.contains(i)) {
        let (size, p) = first_path.remove(&id).expect("listed");
        if batch_bytes >= DIR_BATCH_BYTES {
            batches.push(Vec::new());
            batch_bytes = 0;
        }
        batch_bytes += size;
        batches.last_mut().expect("non-empty").push(Item {
            id,
            size,
            source: Source::Path(p),
        });
    }
    up.send_concurrently(batches, UPLOAD_STREAMS).await?;
    Ok(tree)
}

/// Sends again, from the directory, the objects in `gone`.
/// Sends the hook objects the server lacks (from memory: hooks are read whole).
async fn send_hooks(up: &mut Uploader, hooks: &crate::hooks::HooksDir) -> Result<(), UploadError> {
    let ids: Vec<ObjectId> = hooks.objects.iter().map(|(id, _)| *id).collect();
    let missing = up.missing(&ids).await?;
    let mut items: std::collections::HashMap<ObjectId, Item> = Default::default();
    for (id, data) in hooks.objects.iter().filter(|(id, _)| missing.contains(id)) {
        items.entry(*id).or_insert_with(|| Item {
            id: *id,
            size: data.len() as u64,
            source: Source::Memory(data.clone()),
        });
    }
    if items.is_empty() {
        return Ok(());
    }
    up.send(items.into_values().collect()).await
}

async fn resend_from_directory(
    up: &mut Uploader,
    root: &Path,
    tree: &FileTree,
    gone: &HashSet<ObjectId>,
) -> Result<(), UploadError> {
    let mut items: std::collections::HashMap<ObjectId, Item> = Default::default();
    for (p, ino) in &tree.entries {
        let i = &tree.inodes[ino];
        if let Some(h) = i.hash.filter(|h| gone.contains(h)) {
            items.entry(h).or_insert_with(|| Item {
                id: h,
                size: i.size,
                source: Source::Path(root.join(p.relative_os())),
            });
        }
    }
    up.send(items.into_values().collect()).await
}

/// Collects tarball file contents into batches for the uploader.
struct BatchSink {
    filter: Option<Filter>,
    seen: HashSet<ObjectId>,
    batch: Vec<Item>,
    /// Bytes of the batch held in memory.
    batch_bytes: u64,
    /// Bytes of the batch, spooled ones included.
    batch_total: u64,
    tx: tokio::sync::mpsc::Sender<Vec<Item>>,
}

impl BatchSink {
    fn flush(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.batch_bytes = 0;
        self.batch_total = 0;
        self.tx
            .blocking_send(std::mem::take(&mut self.batch))
            .map_err(|_| io::Error::other("upload stopped"))
    }
}

impl ContentSink for BatchSink {
    fn file(&mut self, path: &FsPath, size: u64, content: &mut dyn Read) -> io::Result<ObjectId> {
        let skip = filtered(self.filter.as_ref(), path);
        let (id, source) = if size <= SPOOL_OVER {
            let mut v = Vec::with_capacity(size as usize);
            content.read_to_end(&mut v)?;
            (ObjectId::of(&v), Source::Memory(v))
        } else if skip {
            (
                model::hash::hash_reader(content)?.0,
                Source::Memory(Vec::new()),
            )
        } else {
            let mut f = tempfile::tempfile()?;
            let mut w = io::BufWriter::with_capacity(256 * 1024, &mut f);
            let (id, _) = tarball::hash_copy(content, &mut w)?;
            w.flush()?;
            drop(w);
            (id, Source::Spool(f))
        };
        if skip || !self.seen.insert(id) {
            return Ok(id);
        }
        let mem = matches!(source, Source::Memory(_));
        self.batch.push(Item { id, size, source });
        if mem {
            self.batch_bytes += size;
        }
        self.batch_total += size;
        if self.batch_bytes >= BATCH_BYTES
            || self.batch.len() >= BATCH_FILES
            || self.batch_total >= BATCH_TOTAL_BYTES
        {
            self.flush()?;
        }
        Ok(id)
    }
}

async fn add_tarball(
    up: &mut Uploader,
    path: &Path,
    filter: Option<Filter>,
) -> Result<FileTree, AddError> {
    let file = std::fs::File::open(path).map_err(source_error(path))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Item>>(1);
    let f2 = filter.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let mut sink = BatchSink {
            filter: f2,
            seen: HashSet::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            batch_total: 0,
            tx,
        };
        let r = tarball::import(file, &mut sink);
        if r.is_ok() {
            sink.flush().map_err(tarball::TarError::Sink)?;
        }
        r
    });
    let mut upload_err = None;
    while let Some(batch) = rx.recv().await {
        let ids: Vec<ObjectId> = batch.iter().map(|i| i.id).collect();
        let result = async {
            let missing = up.missing(&ids).await?;
            let items: Vec<Item> = batch
                .into_iter()
                .filter(|i| missing.contains(&i.id))
                .collect();
            up.send(items).await
        }
        .await;
        if let Err(e) = result {
            upload_err = Some(e);
            break;
        }
    }
    drop(rx);
    let imported = reader.await.map_err(AddError::TarThread)?;
    if let Some(e) = upload_err {
        return Err(e.into());
    }
    let path = path.to_path_buf();
    let (mut tree, _stats) = imported.map_err(|e| match e {
        tarball::TarError::NotTar(why) => AddError::NotTar { path, why },
        source => AddError::Tar { path, source },
    })?;
    if let Some(f) = &filter {
        tree.apply_filter(f);
    }
    Ok(tree)
}
