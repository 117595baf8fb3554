//! `Snapshot.GetObjects`: file contents by hash for `imagetool adds`, read from the paths
//! the last scan recorded with that hash and re-hashed as sent (`disk::readback`), one
//! `model::frame::checked` record per hash. Only paths of the scanned tree are ever read:
//! excluded paths and `/.subd` are not in it. Granted to the builder and admin roles only
//! (its own service name, outside the dominator's `Subd.*`).

use crate::Subd;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use model::api::SnapshotObjectsRequest;
use model::{FileTree, FsPath, Kind, ObjectId};
use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::io::{ReaderStream, SyncIoBridge};
use wire::http::{ApiError, Caller, Json};

/// Most hashes one request may ask for.
pub const MAX_HASHES: usize = 65536;

/// Where each object of a scan lives: its size and every path holding it.
pub type Index = HashMap<ObjectId, (u64, Vec<FsPath>)>;

/// An index unused this long is dropped (after the scan pass that notices).
pub const INDEX_IDLE: Duration = Duration::from_secs(60);

/// The index of the newest generation asked about (built on first use, shared by the
/// batches of one snapshot, dropped once idle for `INDEX_IDLE`).
#[derive(Default)]
pub struct IndexCache(Mutex<Option<Cached>>);

struct Cached {
    generation: u64,
    index: Arc<Index>,
    used: Instant,
}

impl IndexCache {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Cached>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The index of `tree` (scan `generation`), built once per generation.
    fn get(&self, generation: u64, tree: &FileTree) -> Arc<Index> {
        let mut slot = self.slot();
        if let Some(c) = slot.as_mut().filter(|c| c.generation == generation) {
            c.used = Instant::now();
            return c.index.clone();
        }
        let index = Arc::new(index_of(tree));
        *slot = Some(Cached {
            generation,
            index: index.clone(),
            used: Instant::now(),
        });
        index
    }

    /// Drops the index if unused for `idle` (the scanner calls this after each pass).
    pub fn expire(&self, idle: Duration) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|c| c.used.elapsed() >= idle) {
            *slot = None;
        }
    }

    /// Whether an index is held.
    pub fn is_held(&self) -> bool {
        self.slot().is_some()
    }
}

/// Every regular file's object, with its size and paths.
pub fn index_of(tree: &FileTree) -> Index {
    let mut index = Index::new();
    for (path, ino) in &tree.entries {
        let inode = &tree.inodes[ino];
        if let (Kind::File, Some(h)) = (inode.kind, inode.hash) {
            index
                .entry(h)
                .or_insert_with(|| (inode.size, Vec::new()))
                .1
                .push(path.clone());
        }
    }
    index
}

/// The handler: streams one checked record per requested hash.
pub async fn get_objects(
    State(s): State<Arc<Subd>>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<SnapshotObjectsRequest>,
) -> Result<Response, ApiError> {
    if req.hashes.len() > MAX_HASHES {
        return Err(ApiError::BadRequest(format!(
            "{} hashes asked for; at most {MAX_HASHES} per request",
            req.hashes.len()
        )));
    }
    let (generation, tree) = {
        let st = s.status();
        (st.generation, st.tree.clone())
    };
    let Some(tree) = tree else {
        return Err(ApiError::Busy(
            "no scan has finished yet; poll again later".into(),
        ));
    };
    tracing::info!(caller = %caller.key(), objects = req.hashes.len(), "snapshot objects");
    let root = std::fs::File::open(&s.config.root).map_err(ApiError::internal)?;
    let (rd, wr) = tokio::io::duplex(256 * 1024);
    let s2 = s.clone();
    tokio::task::spawn_blocking(move || {
        let index = s2.snapshot_index.get(generation, &tree);
        let mut out = std::io::BufWriter::with_capacity(256 * 1024, SyncIoBridge::new(wr));
        let mut buf = vec![0u8; 256 * 1024];
        use std::os::fd::AsFd;
        for id in &req.hashes {
            let (size, paths) = index
                .get(id)
                .map_or((0, &[][..]), |(size, p)| (*size, p.as_slice()));
            match disk::readback::send_object(root.as_fd(), paths, id, size, &mut buf, &mut out) {
                Ok(disk::readback::Sent::Same) => {}
                Ok(other) => tracing::info!("snapshot object {id}: {other:?}"),
                // The caller went away: stop reading.
                Err(_) => return,
            }
        }
        let _ = out.flush();
    });
    let body = axum::body::Body::from_stream(ReaderStream::with_capacity(rd, 256 * 1024));
    Ok(([("content-type", "application/octet-stream")], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::image::Inode;

    #[test]
    fn the_index_lists_each_object_s_paths_once_per_generation_and_is_dropped_when_idle() {
        let mut tree = FileTree::with_root(Inode::dir(0o755, 0, 0));
        let a = ObjectId::of(b"a");
        tree.inodes
            .insert(2, Inode::file(0o644, 0, 0, Default::default(), 1, Some(a)));
        tree.inodes.insert(3, Inode::symlink(0, 0, "x"));
        for (p, i) in [("/a", 2), ("/b", 2), ("/l", 3)] {
            tree.entries.insert(p.parse().unwrap(), i);
        }
        let index = index_of(&tree);
        assert_eq!(index.len(), 1);
        let cache = IndexCache::default();
        let first = cache.get(1, &tree);
        assert!(Arc::ptr_eq(&first, &cache.get(1, &tree)), "built once");
        assert!(!Arc::ptr_eq(&first, &cache.get(2, &tree)), "per generation");
        cache.expire(Duration::from_secs(60));
        assert!(cache.is_held(), "recently used: kept");
        cache.expire(Duration::ZERO);
        assert!(!cache.is_held(), "idle: dropped");
        let (size, paths) = &index[&a];
        assert_eq!(*size, 1);
        let paths: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        assert_eq!(paths, ["/a", "/b"]);
    }
}
