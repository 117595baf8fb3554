//! Full poll replies without one copy of the tree per poller: the tree part of a reply
//! (`"tree":…,"object_cache":…,"hidden_parents":…`) is serialized once per generation and
//! shared by every concurrent poller of it, sent in slices; it lives only while a poller
//! is still sending it. At most [`TREES_HELD`] serialized trees exist at once; a poller
//! that finds no room within [`ROOM_WAIT`] gets 503 "busy, retry". Short polls never
//! touch this.

use bytes::Bytes;
use model::{FileTree, FsPath, ObjectId};
use serde::Serialize;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wire::http::ApiError;

/// Serialized trees alive at once (the current generation's, and older ones still being
/// sent to slow pollers).
pub const TREES_HELD: usize = 3;
/// How long a full poll waits for room before it is refused with 503.
pub const ROOM_WAIT: Duration = Duration::from_secs(10);
/// Size of the slices a shared tree is sent in.
const SLICE: usize = 64 * 1024;

/// What a full poll sends beside the status fields, as the scanner left it.
pub struct TreeParts {
    pub tree: Arc<FileTree>,
    pub object_cache: Option<Arc<Vec<ObjectId>>>,
    pub hidden_parents: Vec<FsPath>,
}

#[derive(Serialize)]
struct TreeFields<'a> {
    tree: &'a FileTree,
    object_cache: Option<&'a [ObjectId]>,
    #[serde(skip_serializing_if = "<[FsPath]>::is_empty")]
    hidden_parents: &'a [FsPath],
}

/// One generation's serialized tree fields (no braces), holding one of the permits.
pub struct SharedTree {
    generation: u64,
    bytes: Bytes,
    _room: OwnedSemaphorePermit,
}

impl SharedTree {
    /// Its bytes, in slices of at most `SLICE`, keeping `self` (and its permit) alive until
    /// the last slice is taken or the reply is dropped.
    pub fn slices(self: Arc<Self>) -> impl futures_util::Stream<Item = Bytes> + Send {
        futures_util::stream::unfold((self, 0usize), |(t, at)| async move {
            if at >= t.bytes.len() {
                return None;
            }
            let end = (at + SLICE).min(t.bytes.len());
            let slice = t.bytes.slice(at..end);
            Some((slice, (t, end)))
        })
    }
}

/// Shared serialized trees and the limits on them; one per subd.
pub struct PollShare {
    /// The newest tree serialized, while a poller still sends it (std Mutex: never held
    /// across `.await`).
    latest: Mutex<Weak<SharedTree>>,
    /// One serialization at a time: concurrent pollers of a new generation wait for it.
    building: tokio::sync::Mutex<()>,
    /// `TREES_HELD` permits, one held by each serialized tree alive.
    room: Arc<Semaphore>,
    /// How long a full poll waits for room (`ROOM_WAIT`).
    room_wait: Duration,
}

impl Default for PollShare {
    fn default() -> Self {
        PollShare {
            latest: Mutex::new(Weak::new()),
            building: tokio::sync::Mutex::new(()),
            room: Arc::new(Semaphore::new(TREES_HELD)),
            room_wait: ROOM_WAIT,
        }
    }
}

impl PollShare {
    fn latest_of(&self, generation: u64) -> Option<Arc<SharedTree>> {
        let latest = self
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .upgrade();
        latest.filter(|t| t.generation == generation)
    }

    /// The serialized tree fields of `generation`: the shared copy, or serialized from
    /// `parts` (off the executor) if none is. 503 when `TREES_HELD` trees are still being
    /// sent after `ROOM_WAIT`.
    pub async fn tree_fields(
        &self,
        generation: u64,
        parts: TreeParts,
    ) -> Result<Arc<SharedTree>, ApiError> {
        if let Some(t) = self.latest_of(generation) {
            return Ok(t);
        }
        let _building = self.building.lock().await;
        if let Some(t) = self.latest_of(generation) {
            return Ok(t);
        }
        let room =
            match tokio::time::timeout(self.room_wait, self.room.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => return Err(ApiError::internal(e)),
                Err(_) => {
                    return Err(ApiError::Busy(format!(
                        "busy: {TREES_HELD} scans are still being sent to slow pollers; retry"
                    )))
                }
            };
        let bytes = tokio::task::spawn_blocking(move || {
            let json = Bytes::from(serde_json::to_vec(&TreeFields {
                tree: &parts.tree,
                object_cache: parts.object_cache.as_deref().map(|v| v.as_slice()),
                hidden_parents: &parts.hidden_parents,
            })?);
            // Without the braces: it is spliced into the reply object.
            Ok::<_, serde_json::Error>(json.slice(1..json.len() - 1))
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
        let shared = Arc::new(SharedTree {
            generation,
            bytes,
            _room: room,
        });
        let mut latest = self
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if latest.upgrade().is_none_or(|t| t.generation <= generation) {
            *latest = Arc::downgrade(&shared);
        }
        Ok(shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use model::image::Inode;

    fn parts(files: usize) -> TreeParts {
        let mut tree = FileTree::with_root(Inode::dir(0o755, 0, 0));
        for i in 0..files {
            tree.inodes.insert(i as u64 + 1, Inode::dir(0o700, 0, 0));
            let path: FsPath = format!("/d{i}").parse().unwrap();
            tree.entries.insert(path, i as u64 + 1);
        }
        TreeParts {
            tree: Arc::new(tree),
            object_cache: Some(Arc::new(vec![ObjectId::of(b"x")])),
            hidden_parents: vec!["/tmp".parse().unwrap()],
        }
    }

    async fn text(t: Arc<SharedTree>) -> String {
        let parts: Vec<Bytes> = t.slices().collect().await;
        String::from_utf8(parts.concat()).unwrap()
    }

    #[tokio::test]
    async fn one_generation_is_serialized_once_and_spliceable() {
        let share = PollShare::default();
        let a = share.tree_fields(7, parts(20_000)).await.unwrap();
        let b = share.tree_fields(7, parts(1)).await.unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "the second poller shares the first's tree"
        );
        let whole = format!("{{{}}}", text(a).await);
        #[derive(serde::Deserialize)]
        struct Fields {
            tree: FileTree,
            object_cache: Vec<ObjectId>,
            hidden_parents: Vec<FsPath>,
        }
        let back: Fields = serde_json::from_str(&whole).unwrap();
        assert_eq!(back.tree.len(), 20_001);
        assert_eq!(back.object_cache, [ObjectId::of(b"x")]);
        assert_eq!(back.hidden_parents.len(), 1);
        drop(b);
        assert!(
            share.latest_of(7).is_none(),
            "freed once no poller sends it"
        );
        assert_eq!(share.room.available_permits(), TREES_HELD);
    }

    /// Slow pollers of `TREES_HELD` older generations keep their trees; a poll of a newer
    /// one waits for room, then gets 503, and gets its tree once one of them is done.
    #[tokio::test]
    async fn trees_held_are_bounded_and_the_next_poll_is_told_busy() {
        let share = PollShare {
            room_wait: Duration::from_millis(100),
            ..PollShare::default()
        };
        let mut held = Vec::new();
        for generation in 1..=TREES_HELD as u64 {
            held.push(share.tree_fields(generation, parts(1)).await.unwrap());
        }
        let e = share.tree_fields(9, parts(1)).await.err().unwrap();
        assert_eq!(
            e.status(),
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "{e}"
        );
        assert!(e.to_string().contains("retry"), "{e}");
        held.remove(0);
        assert!(share.tree_fields(9, parts(1)).await.is_ok());
    }
}
