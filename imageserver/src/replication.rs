//! Replication: an imageserver started with `--replication-master HOST:PORT` follows that
//! master (Dominator's replicas), and every imageserver serves its replicas.
//!
//! Master side: `ImageServer.GetReplicationState` answers the state of every image name
//! (live with checksum and expiry, deleted, expired) and a digest of it; given the digest
//! the caller already has, it holds the reply back (a long poll, re-checked every
//! `LONG_POLL_STEP`) until the state differs or `MAX_WAIT` passes.
//!
//! Replica side, one pass after another (`follow`), each in named phases:
//! observe (the master's state, long-polled) → decide (`model::replication::decide`,
//! pure, against the catalogue's own state) → fetch (each image to copy with
//! `ImageServer.GetImage`, and only the objects the catalogue lacks with
//! `ObjectServer.GetObjects`, each verified against its SHA-512 by the store's writer and
//! committed as uploads are) → write (`Catalogue::add_image`: temp + fsync + rename, then
//! deletions, expiries, tombstones, expiry changes) → publish (`ReplicaStatus`, on the
//! status page and `/metrics`). A change on the master reaches the replica within one
//! `LONG_POLL_STEP` (100 ms) plus the time to copy it. A failed pass is retried with a
//! backoff of 1 s doubling to `MAX_BACKOFF`; every pass decides afresh from both states,
//! so catch-up is idempotent, and since objects are committed before the image that needs
//! them and images are renamed into place whole, a replica killed at any point restarts
//! with nothing half-written visible and converges.
//!
//! A replica refuses writes (`refuse_writes`: add, delete, expiry changes, object uploads,
//! unreferenced-object deletion) with a 403 naming its master. It accepts any expiry its
//! master accepted (its own minimum is zero).

use crate::catalogue::{Catalogue, CatalogueError};
use crate::State;
use axum::extract::{Request, State as AxState};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use model::api::{self, methods};
use model::replication::{decide, Action, NameEntry};
use model::{Image, ImageName, ObjectId};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::io::{StreamReader, SyncIoBridge};
use wire::client::{ClientError, ClientSecurity, ImageServerClient};
use wire::http::{ApiError, Json};

/// How often a held-back `GetReplicationState` looks for a change.
pub const LONG_POLL_STEP: Duration = Duration::from_millis(100);
/// The longest a `GetReplicationState` is held back (well below clients' read timeout).
pub const MAX_WAIT: Duration = Duration::from_secs(20);
/// The longest wait between failed passes.
pub const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// Objects asked for per `GetObjects`.
const FETCH_BATCH: usize = 1000;

/// The methods a replica refuses: every write.
pub const WRITE_METHODS: &[&str] = &[
    methods::ADD_IMAGE,
    methods::DELETE_IMAGE,
    methods::CHANGE_IMAGE_EXPIRATION,
    methods::ADD_OBJECTS,
    methods::DELETE_UNREFERENCED_OBJECTS,
];

/// Why a replication pass did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("master {master}: {source}")]
    Master { master: String, source: ClientError },
    #[error("image {name}: {source}")]
    Local {
        name: String,
        source: CatalogueError,
    },
    #[error("image {name}: {message}")]
    Fetch { name: String, message: String },
    #[error("master sent a bad image name {0:?}")]
    BadName(String),
    #[error("{failed} of {total} actions failed; first: {first}")]
    Partial {
        failed: usize,
        total: usize,
        first: Box<ReplicationError>,
    },
}

/// What the status page and `/metrics` say about a replica.
#[derive(Clone, Debug, Default)]
pub struct ReplicaStatus {
    /// When (Unix seconds) the last pass found or left the replica in step.
    pub last_sync: Option<u64>,
    /// Images still to copy, delete, expire or tombstone after the last pass observed.
    pub pending: u64,
    /// The last pass's error, if it failed.
    pub last_error: Option<String>,
    /// Names the replica cannot repair, with why.
    pub diverged: Vec<(String, String)>,
    pub images_copied: u64,
    pub objects_fetched: u64,
    pub bytes_fetched: u64,
    pub names_removed: u64,
    pub passes: u64,
}

/// A replica's master and what it knows of its progress.
pub struct Replica {
    /// `HOST:PORT` of the master.
    pub master: String,
    status: Mutex<ReplicaStatus>,
}

impl Replica {
    /// A copy of the current status.
    pub fn status(&self) -> ReplicaStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut ReplicaStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The one line a refused write gets.
    pub fn refusal(&self) -> String {
        format!(
            "this imageserver is a replica of {}; send writes there",
            self.master
        )
    }
}

/// Makes `state` a replica of `master`: writes refused, any expiry the master accepted
/// accepted, and the follow loop started on the current runtime.
pub fn start(
    mut state: State,
    master: &str,
    security: &ClientSecurity,
) -> Result<State, ClientError> {
    wire::client::check_host_port(master).map_err(|e| ClientError::Setup(e.to_string()))?;
    if master.contains(',') {
        return Err(ClientError::Setup(format!(
            "{master}: a replica follows one master"
        )));
    }
    let client = ImageServerClient::new(master, security)?;
    let replica = Arc::new(Replica {
        master: master.to_string(),
        status: Mutex::new(ReplicaStatus::default()),
    });
    state.catalogue.set_min_expiry_secs(0);
    state.replica = Some(replica.clone());
    tokio::spawn(follow(state.catalogue.clone(), replica, client));
    Ok(state)
}

/// Refuses every write (`WRITE_METHODS`) on a replica with a 403 naming the master.
pub async fn refuse_writes(AxState(st): AxState<State>, req: Request, next: Next) -> Response {
    if let Some(r) = &st.replica {
        let method = wire::http::method_of(req.uri().path()).unwrap_or("");
        if WRITE_METHODS.contains(&method) {
            return ApiError::Forbidden(r.refusal()).into_response();
        }
    }
    next.run(req).await
}

/// The digest of a state: SHA-512 of its JSON.
fn digest_of(names: &[NameEntry]) -> ObjectId {
    ObjectId::of(&serde_json::to_vec(names).expect("names serialize"))
}

/// `ImageServer.GetReplicationState`: every name's state, held back while it equals the
/// caller's `known` one (up to `wait_ms`, at most `MAX_WAIT`).
pub async fn get_replication_state(
    AxState(st): AxState<State>,
    Json(req): Json<api::ReplicationStateRequest>,
) -> Result<axum::Json<api::ReplicationStateResponse>, ApiError> {
    let deadline = Instant::now() + Duration::from_millis(req.wait_ms).min(MAX_WAIT);
    loop {
        let names = st.catalogue.replication_state();
        let digest = digest_of(&names);
        if req.known != Some(digest) || Instant::now() >= deadline {
            return Ok(axum::Json(api::ReplicationStateResponse { names, digest }));
        }
        tokio::time::sleep(LONG_POLL_STEP).await;
    }
}

/// Follows the master forever: one pass after another, long-polling while in step, with
/// a doubling backoff after a failed pass.
pub async fn follow(catalogue: Arc<Catalogue>, replica: Arc<Replica>, client: ImageServerClient) {
    let mut known = None;
    let mut backoff = Duration::from_secs(1);
    loop {
        match pass(&catalogue, &replica, &client, known).await {
            Ok(digest) => {
                known = Some(digest);
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                tracing::warn!(master = %replica.master, "replication: {e}");
                replica.update(|s| s.last_error = Some(e.to_string()));
                known = None;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One pass: observe → decide → fetch and write → publish. Returns the digest of the
/// master state it brought the replica to, or the first failure (the others still run).
async fn pass(
    catalogue: &Arc<Catalogue>,
    replica: &Replica,
    client: &ImageServerClient,
    known: Option<ObjectId>,
) -> Result<ObjectId, ReplicationError> {
    let master = observe(replica, client, known).await?;
    let actions = plan(catalogue, &master.names).await;
    let diverged: Vec<(String, String)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Diverged { name, why } => Some((name.clone(), why.clone())),
            _ => None,
        })
        .collect();
    let todo: Vec<Action> = actions
        .into_iter()
        .filter(|a| !matches!(a, Action::Diverged { .. }))
        .collect();
    replica.update(|s| {
        s.pending = todo.len() as u64;
        s.diverged = diverged;
        s.passes += 1;
    });
    let total = todo.len();
    let mut failures = Vec::new();
    for action in todo {
        match carry_out(catalogue, replica, client, &action).await {
            Ok(()) => replica.update(|s| s.pending = s.pending.saturating_sub(1)),
            Err(e) => {
                tracing::warn!(image = action.name(), "replication: {e}");
                failures.push(e);
            }
        }
    }
    publish(replica, total, failures).map(|()| master.digest)
}

/// Observe: the master's state, held back by the master while it equals `known`.
async fn observe(
    replica: &Replica,
    client: &ImageServerClient,
    known: Option<ObjectId>,
) -> Result<api::ReplicationStateResponse, ReplicationError> {
    let req = api::ReplicationStateRequest {
        known,
        wait_ms: MAX_WAIT.as_millis() as u64,
    };
    client
        .rpc
        .call(methods::GET_REPLICATION_STATE, &req)
        .await
        .map_err(|source| ReplicationError::Master {
            master: replica.master.clone(),
            source,
        })
}

/// Decide: what to do, from the master's state and the catalogue's (pure).
async fn plan(catalogue: &Arc<Catalogue>, master: &[NameEntry]) -> Vec<Action> {
    let cat = catalogue.clone();
    let local = tokio::task::spawn_blocking(move || cat.replication_state())
        .await
        .unwrap_or_default();
    decide(master, &local, disk::clock::unix_now())
}

/// Publish: records the pass's outcome; the first failure is the pass's error.
fn publish(
    replica: &Replica,
    total: usize,
    mut failures: Vec<ReplicationError>,
) -> Result<(), ReplicationError> {
    if failures.is_empty() {
        replica.update(|s| {
            s.last_sync = Some(disk::clock::unix_now());
            s.last_error = None;
        });
        return Ok(());
    }
    let failed = failures.len();
    let first = failures.swap_remove(0);
    Err(if failed == 1 {
        first
    } else {
        ReplicationError::Partial {
            failed,
            total,
            first: Box::new(first),
        }
    })
}

/// Carries out one action against the catalogue (off the executor where it writes).
async fn carry_out(
    catalogue: &Arc<Catalogue>,
    replica: &Replica,
    client: &ImageServerClient,
    action: &Action,
) -> Result<(), ReplicationError> {
    let raw = action.name().to_string();
    let name = ImageName::parse(&raw).map_err(|_| ReplicationError::BadName(raw.clone()))?;
    if let Action::Copy(_) = action {
        return copy_image(catalogue, replica, client, &name).await;
    }
    let cat = catalogue.clone();
    let act = action.clone();
    let n = name.clone();
    let done = tokio::task::spawn_blocking(move || match act {
        Action::Delete(_) => cat.delete_image(&n),
        Action::Expire(_) => cat.expire_image(&n),
        Action::Tombstone { expired, .. } => cat.record_tombstone(&n, expired),
        Action::ChangeExpiry { expires_at, .. } => cat.change_expiration(&n, expires_at),
        Action::Copy(_) | Action::Diverged { .. } => Ok(()),
    })
    .await
    .map_err(|e| ReplicationError::Fetch {
        name: raw.clone(),
        message: e.to_string(),
    })?;
    match done {
        Ok(()) => {
            if !matches!(action, Action::ChangeExpiry { .. }) {
                replica.update(|s| s.names_removed += 1);
            }
            tracing::info!(image = %name, ?action, "replicated");
            Ok(())
        }
        // Expired here on its own (the sweep) in the meantime: in step.
        Err(CatalogueError::ImageExpired(_)) if matches!(action, Action::Expire(_)) => Ok(()),
        Err(source) => Err(ReplicationError::Local { name: raw, source }),
    }
}

/// Objects held against unreferenced-object deletion until the image referring to them is
/// stored; released when dropped.
struct Holds {
    catalogue: Arc<Catalogue>,
    ids: Vec<ObjectId>,
}

impl Drop for Holds {
    fn drop(&mut self) {
        self.catalogue.release(&self.ids);
    }
}

/// Fetch and write one image: the image from the master, the objects the catalogue lacks,
/// then the image through the catalogue's own add (its file renamed into place last).
async fn copy_image(
    catalogue: &Arc<Catalogue>,
    replica: &Replica,
    client: &ImageServerClient,
    name: &ImageName,
) -> Result<(), ReplicationError> {
    let master = |source| ReplicationError::Master {
        master: replica.master.clone(),
        source,
    };
    let image: Image = client.get_image(name.as_str()).await.map_err(master)?;
    let mut holds = Holds {
        catalogue: catalogue.clone(),
        ids: Vec::new(),
    };
    let mut missing = Vec::new();
    for (id, size) in image.objects() {
        if catalogue.hold_if_present(&id) {
            holds.ids.push(id);
        } else {
            missing.push((id, size));
        }
    }
    for batch in missing.chunks(FETCH_BATCH) {
        let ids: Vec<ObjectId> = batch.iter().map(|(id, _)| *id).collect();
        let resp = client.get_objects(&ids).await.map_err(master)?;
        let (held, got) = receive_batch(catalogue, resp, batch.to_vec()).await;
        holds.ids.extend(held);
        let (n, bytes) = got.map_err(|message| ReplicationError::Fetch {
            name: name.to_string(),
            message,
        })?;
        replica.update(|s| {
            s.objects_fetched += n;
            s.bytes_fetched += bytes;
        });
    }
    let cat = catalogue.clone();
    let n = name.clone();
    let img = image.clone();
    let added = tokio::task::spawn_blocking(move || cat.add_image(&n, &img))
        .await
        .map_err(|e| ReplicationError::Fetch {
            name: name.to_string(),
            message: e.to_string(),
        })?;
    drop(holds);
    match added {
        Ok(()) => {}
        Err(CatalogueError::InvalidExpiry { .. }) => {
            // It expired while being copied: a tombstone, as on the master.
            let cat = catalogue.clone();
            let n = name.clone();
            let _ = tokio::task::spawn_blocking(move || cat.record_tombstone(&n, true)).await;
        }
        Err(source) => {
            return Err(ReplicationError::Local {
                name: name.to_string(),
                source,
            })
        }
    }
    replica.update(|s| s.images_copied += 1);
    tracing::info!(image = %name, master = %replica.master, "image replicated");
    Ok(())
}

/// Streams one `GetObjects` reply into the catalogue's store on a blocking thread.
/// Returns the objects committed (held for the caller) and, on success, how many objects
/// and bytes were stored; every object is checked to be one asked for, of its size, and to
/// hash to its name before it is committed.
async fn receive_batch(
    catalogue: &Arc<Catalogue>,
    resp: reqwest::Response,
    wanted: Vec<(ObjectId, u64)>,
) -> (Vec<ObjectId>, Result<(u64, u64), String>) {
    let stream = resp.bytes_stream().map_err(std::io::Error::other);
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    let cat = catalogue.clone();
    tokio::task::spawn_blocking(move || {
        let mut held = Vec::new();
        let r = store_frames(&cat, reader, &wanted, &mut held);
        (held, r)
    })
    .await
    .unwrap_or_else(|e| (Vec::new(), Err(format!("receiving objects failed: {e}"))))
}

/// Reads frames from `r` into the store, verifying each, and commits them; `held` gets
/// every committed object (the caller releases them).
fn store_frames(
    cat: &Catalogue,
    mut r: impl Read,
    wanted: &[(ObjectId, u64)],
    held: &mut Vec<ObjectId>,
) -> Result<(u64, u64), String> {
    let sizes: std::collections::HashMap<ObjectId, u64> = wanted.iter().copied().collect();
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    while let Some((id, len)) =
        model::frame::read_header(&mut r).map_err(|e| format!("reply truncated: {e}"))?
    {
        match sizes.get(&id) {
            Some(size) if *size == len => {}
            Some(size) => {
                return Err(format!(
                    "master sent object {id} with {len} bytes, the image says {size}"
                ))
            }
            None => return Err(format!("master sent object {id}, which was not asked for")),
        }
        let mut w = cat.store().writer(id, len).map_err(|e| e.to_string())?;
        let mut left = len;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let n = r
                .read(&mut buf[..want])
                .map_err(|e| format!("object {id}: reply broke off: {e}"))?;
            if n == 0 {
                return Err(format!(
                    "object {id}: reply ended after {} of {len} bytes",
                    len - left
                ));
            }
            w.write_all(&buf[..n])
                .map_err(|e| format!("writing object {id}: {e}"))?;
            left -= n as u64;
        }
        // Checks the length and SHA-512: nothing unverified is ever committed.
        pending.push(w.finish().map_err(|e| format!("object {id}: {e}"))?);
    }
    if pending.len() != wanted.len() {
        return Err(format!(
            "master sent {} of the {} objects asked for",
            pending.len(),
            wanted.len()
        ));
    }
    let ids: Vec<ObjectId> = pending.iter().map(|p| p.id()).collect();
    let (n, bytes) = cat.commit_objects(pending).map_err(|e| e.to_string())?;
    held.extend(ids);
    Ok((n, bytes))
}

/// The replica section of the status page (empty on a master).
pub fn status_html(st: &State) -> String {
    use wire::pages::escape;
    let Some(r) = &st.replica else {
        return String::new();
    };
    let s = r.status();
    let now = disk::clock::unix_now();
    let behind = match s.last_sync {
        Some(t) => format!(
            "last in step at {t} (Unix seconds, {} s ago)",
            now.saturating_sub(t)
        ),
        None => "not yet in step".into(),
    };
    let mut out = format!(
        "<h2 id=\"replication\">Replica of {}</h2>\n<p>Writes are refused here; send them to the master.<br>{behind}<br>images pending: {}<br>images copied: {}<br>objects fetched: {} ({} bytes)<br>names deleted or expired: {}</p>\n",
        escape(&r.master),
        s.pending,
        s.images_copied,
        s.objects_fetched,
        s.bytes_fetched,
        s.names_removed
    );
    if let Some(e) = &s.last_error {
        out.push_str(&format!(
            "<p class=\"error\" id=\"replication-error\">last pass failed: {}</p>\n",
            escape(e)
        ));
    }
    if !s.diverged.is_empty() {
        out.push_str("<p class=\"error\" id=\"replication-diverged\">Names that differ from the master and are left as they are:</p>\n<ul>\n");
        for (n, why) in &s.diverged {
            out.push_str(&format!("<li>{} {}</li>\n", escape(n), escape(why)));
        }
        out.push_str("</ul>\n");
    }
    out
}

/// The replica's metrics (none on a master).
pub fn metrics(st: &State, m: &mut wire::pages::Metrics) {
    let Some(r) = &st.replica else {
        return;
    };
    let s = r.status();
    m.gauge_by(
        "imageserver_replica",
        "1 on a replica, labelled with its master",
        "master",
        [(r.master.clone(), 1)],
    )
    .gauge(
        "imageserver_replica_last_sync_seconds",
        "When (Unix seconds) the replica was last in step with its master (0: never)",
        s.last_sync.unwrap_or(0),
    )
    .gauge(
        "imageserver_replica_images_pending",
        "Images the replica still has to copy, delete or expire",
        s.pending,
    )
    .gauge(
        "imageserver_replica_diverged_images",
        "Names that differ from the master and cannot be repaired",
        s.diverged.len() as u64,
    )
    .counter(
        "imageserver_replica_images_copied",
        "Images copied from the master",
        s.images_copied,
    )
    .counter(
        "imageserver_replica_objects_fetched",
        "Objects fetched from the master",
        s.objects_fetched,
    )
    .counter(
        "imageserver_replica_object_bytes_fetched",
        "Bytes of objects fetched from the master",
        s.bytes_fetched,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::replication::NameState as S;
    use model::{FileTree, Inode};

    fn frames(objects: &[(ObjectId, &[u8])]) -> Vec<u8> {
        let mut v = Vec::new();
        for (id, data) in objects {
            v.extend_from_slice(&model::frame::header(id, data.len() as u64));
            v.extend_from_slice(data);
        }
        v
    }

    #[test]
    fn fetched_objects_are_verified_before_anything_is_committed() {
        let d = tempfile::tempdir().unwrap();
        let cat = Catalogue::open(d.path()).unwrap();
        let (a, b) = (ObjectId::of(b"alpha"), ObjectId::of(b"bravo"));
        let wanted = [(a, 5), (b, 5)];
        // b's bytes do not hash to b: refused, and a (before it) is not committed either.
        let mut held = Vec::new();
        let bad = frames(&[(a, b"alpha"), (b, b"BRAVO")]);
        let e = store_frames(&cat, &bad[..], &wanted, &mut held).unwrap_err();
        assert!(e.contains(&b.to_string()), "{e}");
        assert!(held.is_empty() && !cat.has_object(&a) && !cat.has_object(&b));
        // Short, unasked-for, or of another size: refused.
        let short = frames(&[(a, b"alpha")]);
        let e = store_frames(&cat, &short[..], &wanted, &mut held).unwrap_err();
        assert_eq!(e, "master sent 1 of the 2 objects asked for");
        let other = ObjectId::of(b"other");
        let e =
            store_frames(&cat, &frames(&[(other, b"other")])[..], &wanted, &mut held).unwrap_err();
        assert!(e.contains("not asked for"), "{e}");
        let cut = &frames(&[(a, b"alpha")])[..70];
        assert!(store_frames(&cat, cut, &wanted, &mut held).is_err());
        // Whole and right: committed and held for the image being copied.
        let good = frames(&[(a, b"alpha"), (b, b"bravo")]);
        assert_eq!(
            store_frames(&cat, &good[..], &wanted, &mut held).unwrap(),
            (2, 10)
        );
        assert_eq!(held, [a, b]);
        assert!(cat.has_object(&a) && cat.has_object(&b));
        cat.release(&held);
    }

    #[test]
    fn the_catalogue_reports_every_name_and_keeps_tombstones_recorded_for_a_master() {
        let d = tempfile::tempdir().unwrap();
        let name = |n: &str| ImageName::parse(n).unwrap();
        let image = Image::new(
            FileTree::with_root(Inode::dir(0o755, 0, 0)),
            None,
            Default::default(),
        );
        {
            let cat = Catalogue::open(d.path()).unwrap();
            cat.add_image(&name("a/1"), &image).unwrap();
            cat.add_image(&name("a/2"), &image).unwrap();
            cat.expire_image(&name("a/2")).unwrap();
            cat.record_tombstone(&name("b/1"), false).unwrap();
            cat.record_tombstone(&name("b/2"), true).unwrap();
            assert!(matches!(
                cat.record_tombstone(&name("a/1"), false),
                Err(CatalogueError::AlreadyExists(_))
            ));
        }
        let cat = Catalogue::open(d.path()).unwrap();
        let states: Vec<(String, S)> = cat
            .replication_state()
            .into_iter()
            .map(|e| (e.name, e.state))
            .collect();
        assert_eq!(states.len(), 4);
        assert!(matches!(
            &states[0],
            (n, S::Live { checksum: Some(_), expires_at: None }) if n == "a/1"
        ));
        assert_eq!(states[1], ("a/2".into(), S::Expired));
        assert_eq!(states[2], ("b/1".into(), S::Deleted));
        assert_eq!(states[3], ("b/2".into(), S::Expired));
        assert!(matches!(
            cat.add_image(&name("b/1"), &image),
            Err(CatalogueError::NameDeleted(_))
        ));
        assert!(matches!(
            cat.add_image(&name("b/2"), &image),
            Err(CatalogueError::NameExpired(_))
        ));
    }

    #[test]
    fn the_digest_changes_with_the_state() {
        let a = vec![NameEntry {
            name: "x".into(),
            state: S::Deleted,
        }];
        let mut b = a.clone();
        b[0].state = S::Expired;
        assert_ne!(digest_of(&a), digest_of(&b));
        assert_eq!(digest_of(&a), digest_of(&a.clone()));
    }
}
