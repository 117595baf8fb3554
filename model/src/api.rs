//! Wire types: the request and response bodies of every RPC, named `Service.Method`.
//!
//! Every RPC is `POST /rpc/<Service.Method>` with a JSON body and a JSON reply, except the
//! object batches, whose bodies are `frame` streams. Errors are a non-2xx status with
//! `{"error": "<one line>"}`. The method name is also what permissions grant.

use crate::hash::ObjectId;
use crate::image::{FileTree, Image};
use crate::path::FsPath;
use crate::plan::UpdatePlan;
use serde::{Deserialize, Serialize};

/// Method names, in one place, so the permission model and the routers agree.
pub mod methods {
    pub const ADD_IMAGE: &str = "ImageServer.AddImage";
    pub const CHECK_IMAGE: &str = "ImageServer.CheckImage";
    pub const GET_IMAGE: &str = "ImageServer.GetImage";
    pub const LIST_IMAGES: &str = "ImageServer.ListImages";
    pub const DELETE_IMAGE: &str = "ImageServer.DeleteImage";
    pub const CHANGE_IMAGE_EXPIRATION: &str = "ImageServer.ChangeImageExpiration";
    pub const GET_IMAGE_EXPIRATION: &str = "ImageServer.GetImageExpiration";
    pub const LIST_UNREFERENCED_OBJECTS: &str = "ImageServer.ListUnreferencedObjects";
    pub const DELETE_UNREFERENCED_OBJECTS: &str = "ImageServer.DeleteUnreferencedObjects";
    pub const CHECK_OBJECTS: &str = "ObjectServer.CheckObjects";
    pub const ADD_OBJECTS: &str = "ObjectServer.AddObjects";
    pub const GET_OBJECTS: &str = "ObjectServer.GetObjects";
    pub const SUBD_POLL: &str = "Subd.Poll";
    pub const SUBD_FETCH: &str = "Subd.Fetch";
    pub const SUBD_UPDATE: &str = "Subd.Update";
    pub const SUBD_CLEANUP: &str = "Subd.Cleanup";
    /// Served by subd for `imagetool adds`: file contents by hash, from the paths its last
    /// scan recorded. The `Snapshot` service is its own, so neither the dominator's
    /// `Subd.*` grant nor the subd role's `ObjectServer.GetObjects` reaches it
    /// (`make-certs`: builder and admin only).
    pub const SNAPSHOT_GET_OBJECTS: &str = "Snapshot.GetObjects";
    /// Served by subd for `imagetool adds`: a full poll (a `PollRequest`, answered with a
    /// `PollResponse` carrying the tree), granted apart from `Subd.Poll` so a builder can
    /// snapshot a host without being able to pose as its dominator.
    pub const SNAPSHOT_GET_TREE: &str = "Snapshot.GetTree";
    /// Served by an imageserver to its replicas: the state of every image name (a
    /// `ReplicationStateRequest`, answered with a `ReplicationStateResponse`), held back
    /// until it changes when the caller already has it.
    pub const GET_REPLICATION_STATE: &str = "ImageServer.GetReplicationState";
}

/// The error body of every non-2xx reply.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// An empty request or reply.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Empty {}

// ---- ImageServer ----

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddImageRequest {
    pub name: String,
    pub image: Image,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageNameRequest {
    pub name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckImageResponse {
    pub exists: bool,
    /// The name was used and deleted: it can never be used again. (Absent from older
    /// servers' replies, hence the default.)
    #[serde(default)]
    pub deleted: bool,
    /// The name's image expired (a tombstone too, never reused). (Absent from older
    /// servers' replies, hence the default.)
    #[serde(default)]
    pub expired: bool,
    /// The shortest expiry the server accepts, in seconds (0 from older servers: not
    /// said), so a client can refuse a too-short `--expires-in` before uploading.
    #[serde(default)]
    pub min_expiry_secs: u64,
}

/// `ImageServer.ChangeImageExpiration`: the image's new `expires_at` (`None` = never).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChangeImageExpirationRequest {
    pub name: String,
    pub expires_at: Option<u64>,
}

/// `ImageServer.GetImageExpiration`'s reply: when the image expires (`None` = never).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageExpirationResponse {
    pub expires_at: Option<u64>,
}

/// A replica asking its master for the state of every image name.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReplicationStateRequest {
    /// The `digest` of the state the replica already has: the master answers once its
    /// state differs, or after `wait_ms` with the same state.
    #[serde(default)]
    pub known: Option<crate::ObjectId>,
    /// Longest wait for a change, in milliseconds (the master caps it).
    #[serde(default)]
    pub wait_ms: u64,
}

/// Every image name of the master (live, deleted, expired), in name order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicationStateResponse {
    pub names: Vec<crate::replication::NameEntry>,
    /// SHA-512 of `names` as JSON, to send back as `known`.
    pub digest: crate::ObjectId,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListImagesRequest {
    /// Only names starting with this prefix.
    #[serde(default)]
    pub prefix: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListImagesResponse {
    /// Version-sorted.
    pub names: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckObjectsRequest {
    pub hashes: Vec<ObjectId>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckObjectsResponse {
    /// One per requested hash, in order: the object's size, or 0 if absent.
    pub sizes: Vec<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AddObjectsResponse {
    /// Objects newly stored.
    pub added: u64,
    /// Objects that were already present.
    pub existing: u64,
    /// Bytes newly stored.
    pub bytes_added: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GetObjectsRequest {
    pub hashes: Vec<ObjectId>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ObjectInfo {
    pub hash: ObjectId,
    pub size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListUnreferencedObjectsResponse {
    /// Oldest-unreferenced first.
    pub objects: Vec<ObjectInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeleteUnreferencedObjectsRequest {
    /// Delete oldest first until at least this percentage of the unreferenced objects…
    pub percentage: u8,
    /// …and at least this many bytes are deleted (`100 0` = all, `0 0` = none).
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeleteUnreferencedObjectsResponse {
    pub deleted: u64,
    pub bytes: u64,
}

// ---- Subd ----

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PollRequest {
    /// The generation the caller already holds; the tree is sent only if it differs.
    #[serde(default)]
    pub have_generation: u64,
    /// Never send the tree.
    #[serde(default)]
    pub short_only: bool,
    /// Hold the reply until the subd has finished this many scans (its `scan_count`), for
    /// at most `wait_ms` (the subd caps the hold at `MAX_POLL_HOLD_MS`); 0 = reply at once.
    /// A dominator awaiting the scan that confirms its fetch or update hears of it as it
    /// ends instead of at its next poll. A subd that predates it replies at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub wait_for_scan: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub wait_ms: u64,
}

/// The longest a subd holds a poll waiting for a scan.
pub const MAX_POLL_HOLD_MS: u64 = 5_000;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What the last update did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateResult {
    pub image_name: String,
    /// Unix seconds when it finished.
    pub finished_at: u64,
    /// Every step that failed, one line each (empty = success).
    pub errors: Vec<String>,
    /// Trigger commands that failed or timed out, one line each.
    pub trigger_failures: Vec<String>,
    /// Services acted on, in order, e.g. `sshd stop`, `sshd start`.
    pub trigger_actions: Vec<String>,
    /// Milliseconds from the first rename to the last change.
    pub activation_ms: f64,
    /// The hooks this update ran, in order (none when it changed nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<crate::hooks::HookRun>,
    /// `pre-hook failed: NAME: …` or `post-hook failed: NAME: …` when a hook failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_failure: Option<String>,
    /// The update was a rebuild: its plan said the machine held no image before (the
    /// dominator saw no last image; its hooks got `SUBD_REBUILD=1`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rebuild: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PollResponse {
    /// 0 until the first scan finishes; rises when a finished scan differs from the last.
    pub generation: u64,
    pub scan_count: u64,
    /// Unix seconds when this subd started.
    pub start_time: u64,
    /// Unix seconds of the end of the last scan (0 = none yet).
    pub last_scan_time: u64,
    pub last_scan_duration_ms: u64,
    pub fetch_in_progress: bool,
    pub update_in_progress: bool,
    pub last_fetch_error: Option<String>,
    pub last_update: Option<UpdateResult>,
    /// Free bytes on the root's file-system (`None`: not reported).
    #[serde(default)]
    pub free_space: Option<u64>,
    /// Last image applied by an update (full or sparse).
    pub last_image: Option<String>,
    /// The scan exclusion regexes in force (the diff must not touch them).
    pub exclusions: Vec<String>,
    /// The scanned tree; present only when `generation != have_generation`.
    pub tree: Option<FileTree>,
    /// Objects in the cache; sent with the tree.
    pub object_cache: Option<Vec<ObjectId>>,
    /// Directories holding entries the scan left out (excluded names, mount points), which
    /// a full image keeps; sent with the tree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden_parents: Vec<FsPath>,
    /// State paths this machine seeded (`UpdatePlan::seeded` of its updates): state for
    /// good, whatever later images say. Sent with every poll.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeded: Vec<FsPath>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FetchRequest {
    /// The imageserver to fetch from, `HOST:PORT`.
    pub server: String,
    pub hashes: Vec<ObjectId>,
    /// Return only when the fetch is done (errors are then returned too).
    #[serde(default)]
    pub wait: bool,
    /// The metadata the following update gives each object at its last use, for subd to
    /// give it as it stores the object (`UpdatePlan::final_metadata`; a hint, checked again
    /// by the update). Left out by older dominators.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub final_metadata: Vec<crate::plan::FinalMetadata>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpdateRequest {
    pub plan: UpdatePlan,
    /// Return only when the update is done, with its result.
    #[serde(default)]
    pub wait: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpdateResponse {
    /// Present when `wait` was set.
    pub result: Option<UpdateResult>,
    /// subd's scan count when it accepted the update: every scan counted after it started
    /// after the update ended (absent from subds before this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_count: Option<u64>,
}

/// `Subd.Fetch`'s reply.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FetchResponse {
    /// subd's scan count when it accepted the fetch: every scan counted after it started
    /// after the fetch ended, so it lists every object fetched (absent from older subds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_count: Option<u64>,
}

/// `Snapshot.GetObjects`: the objects to read from the paths the last scan recorded with
/// these hashes. The reply is a `frame::checked` stream, one record per hash, in order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotObjectsRequest {
    pub hashes: Vec<ObjectId>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CleanupRequest {
    pub hashes: Vec<ObjectId>,
}
