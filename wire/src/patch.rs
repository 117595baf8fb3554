//! `patch_directory`: make a local directory match an image without a subd — get the image,
//! scan the directory, diff, fetch the missing objects into `DIR/.subd/objects` (same
//! file-system, so activation is a rename; held under their temp names, which the apply
//! takes them from, the rest named after it), apply. `DIR/.subd` is checked and reached
//! through one handle, as subd does (`statedir`). The same diff and apply code subd uses;
//! `imagetool patch-directory NAME DIR` is a thin wrapper.

use crate::client::{ClientError, ImageServerClient};
use crate::fetch::{fetch_objects_held, FetchError, FetchOptions, FetchStats};
use disk::apply::{apply, ApplyOptions};
use disk::objectstore::{HeldObjects, ObjectStore, StoreError};
use disk::scan::{scan_full, ChangedFiles, ScanError, ScanOptions};
use disk::statedir::{StateDir, StateDirError};
use model::api::UpdateResult;
use model::diff::{diff, DiffOptions, Machine};
use model::hash::ObjectId;
use model::image::Image;
use model::image::Inode;
use model::plan::UpdatePlan;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// How to patch.
#[derive(Clone, Debug, Default)]
pub struct PatchOptions {
    /// Apply even when the safety check refuses (mass deletion).
    pub allow_unsafe: bool,
    /// Exclusions, trigger commands (none by default: triggers are listed, not run).
    pub apply: ApplyOptions,
    pub fetch: FetchOptions,
    /// Hashing threads for the scan; 0 = one per CPU.
    pub scan_threads: usize,
}

/// What a patch did.
#[derive(Clone, Debug)]
pub struct PatchReport {
    pub plan: UpdatePlan,
    pub fetch: FetchStats,
    pub result: UpdateResult,
    /// Seconds spent scanning + diffing, fetching, and applying.
    pub scan_seconds: f64,
    pub fetch_seconds: f64,
    pub apply_seconds: f64,
}

impl PatchReport {
    /// True when every step succeeded (trigger failures included).
    pub fn succeeded(&self) -> bool {
        self.result.errors.is_empty() && self.result.trigger_failures.is_empty()
    }
}

/// Why a patch could not be applied at all.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("{0} (is a subd managing this directory?)")]
    Locked(#[from] disk::fsutil::LockError),
    #[error("getting image {name}: {source}")]
    Image { name: String, source: ClientError },
    #[error("{path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    State(#[from] StateDirError),
    #[error("scanning: {0}")]
    Scan(#[from] ScanError),
    #[error("object cache: {0}")]
    Store(#[from] StoreError),
    #[error("refusing unsafe update: {0} (pass --allow-unsafe to override)")]
    Unsafe(String),
    #[error("fetching objects: {0}")]
    Fetch(#[from] FetchError),
    #[error("internal: {0}")]
    Join(String),
}

/// Makes `dir` (created if missing) match image `image_name` from `client`. Phases: get
/// the image → open and lock `DIR/.subd` → scan and diff → fetch (held) → apply.
pub async fn patch_directory(
    client: &ImageServerClient,
    image_name: &str,
    dir: &Path,
    options: &PatchOptions,
) -> Result<PatchReport, PatchError> {
    let t_image = Instant::now();
    let image = client
        .get_image(image_name)
        .await
        .map_err(|source| PatchError::Image {
            name: image_name.to_string(),
            source,
        })?;
    let image_seconds = t_image.elapsed().as_secs_f64();
    let t_scan = Instant::now();
    std::fs::create_dir_all(dir).map_err(|source| PatchError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    // Checked, and from here on reached only through its handle.
    let state = StateDir::open(dir)?;
    let _lock = state.lock("lock")?;
    let (plan, store) = plan(image_name, &image, dir, &state, options).await?;
    let scan_seconds = t_scan.elapsed().as_secs_f64();
    let t_fetch = Instant::now();
    let fetch_options = FetchOptions {
        final_metadata: crate::fetch::metadata_map(&plan.final_metadata()),
        ..options.fetch.clone()
    };
    // Held, not named: the apply right after takes them from their temp names.
    let (fetch, held) =
        fetch_objects_held(client, &store, &plan.objects_to_fetch, &fetch_options).await?;
    let fetch_seconds = t_fetch.elapsed().as_secs_f64();
    let t_apply = Instant::now();
    let last_uses = fetch_options.final_metadata.clone();
    let result = apply_held(dir, state, &plan, &options.apply, held, last_uses).await?;
    let apply_seconds = t_apply.elapsed().as_secs_f64();
    tracing::info!(
        "patch phases: image {:.1} ms, scan+diff {:.1} ms, fetch {:.1} ms, apply {:.1} ms",
        image_seconds * 1000.0,
        scan_seconds * 1000.0,
        fetch_seconds * 1000.0,
        apply_seconds * 1000.0
    );
    Ok(PatchReport {
        plan,
        fetch,
        result,
        scan_seconds,
        fetch_seconds,
        apply_seconds,
    })
}

/// Scans `dir` and lists the object cache (off the executor), then diffs them against
/// `image`; refuses an unsafe plan. Returns the plan and the cache, opened.
async fn plan(
    image_name: &str,
    image: &Image,
    dir: &Path,
    state: &StateDir,
    options: &PatchOptions,
) -> Result<(UpdatePlan, ObjectStore), PatchError> {
    let (tree, store, cache) = {
        let state = state.clone();
        let dir = dir.to_path_buf();
        let opts = ScanOptions {
            exclude: options.apply.exclusions.clone(),
            threads: options.scan_threads,
            changed: ChangedFiles::LeaveOut,
            ..Default::default()
        };
        tokio::task::spawn_blocking(move || -> Result<_, PatchError> {
            let store = state.objects()?;
            let tree = scan_full(&dir, &opts)?;
            let cache: BTreeSet<ObjectId> = store.ids()?.into_iter().collect();
            Ok((tree, store, cache))
        })
        .await
        .map_err(|e| PatchError::Join(e.to_string()))??
    };
    let seeded = disk::apply::load_seeded(state);
    let plan = diff(
        image_name,
        image,
        &Machine {
            tree: &tree.tree,
            object_cache: &cache,
            exclusions: options.apply.exclusions.as_ref(),
            hidden_parents: &tree.hidden_parents.iter().cloned().collect::<Vec<_>>(),
            seeded: &seeded,
        },
        &DiffOptions {
            allow_unsafe: options.allow_unsafe,
        },
    );
    if let Some(r) = &plan.unsafe_reason {
        return Err(PatchError::Unsafe(r.clone()));
    }
    Ok((plan, store))
}

/// Applies `plan` (off the executor) with the `held` objects found under their temp
/// names, then releases them: a complete apply took every one with a last use in the
/// plan (`last_uses`, the fetch's final metadata: linked or renamed into place); the others are named and stay in the cache. (A
/// last use the apply skipped without an error, a seeded path that appeared since the
/// diff, leaves its temp file to the store's next open, which sweeps it.)
async fn apply_held(
    dir: &Path,
    state: StateDir,
    plan: &UpdatePlan,
    options: &ApplyOptions,
    held: HeldObjects,
    last_uses: Option<Arc<HashMap<ObjectId, Inode>>>,
) -> Result<UpdateResult, PatchError> {
    let (dir, plan) = (dir.to_path_buf(), plan.clone());
    let opts = ApplyOptions {
        held: Some(Arc::new(held.names())),
        ..options.clone()
    };
    tokio::task::spawn_blocking(move || {
        let result = apply(&dir, &state, &plan, &opts);
        let complete = result.errors.is_empty();
        let taken =
            |id: &ObjectId| complete && last_uses.as_ref().is_some_and(|m| m.contains_key(id));
        if let Err(e) = held.release(taken) {
            tracing::warn!("fetched objects the update did not use could not be kept: {e}");
        }
        result
    })
    .await
    .map_err(|e| PatchError::Join(e.to_string()))
}
