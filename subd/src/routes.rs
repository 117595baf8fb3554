//! subd's HTTP surface: `Subd.Poll`, `Subd.Fetch`, `Subd.Update`, `Subd.Cleanup`,
//! `Snapshot.GetTree` (a full poll for `imagetool adds`), `Snapshot.GetObjects` (in
//! `crate::snapshot`), the
//! status page at `/` and Prometheus metrics at `/metrics`.

use crate::Subd;
use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::Router;
use bytes::Bytes;
use model::api::{
    methods, CleanupRequest, Empty, FetchRequest, FetchResponse, PollRequest, UpdateRequest,
    UpdateResponse, UpdateResult,
};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use wire::client::ImageServerClient;
use wire::fetch::{fetch_objects, FetchError, FetchOptions};
use wire::http::{ApiError, Caller, Json};

/// The router of a subd.
pub fn router(state: Arc<Subd>) -> Router {
    Router::new()
        .route(&format!("/rpc/{}", methods::SUBD_POLL), post(poll))
        .route(&format!("/rpc/{}", methods::SUBD_FETCH), post(fetch))
        .route(&format!("/rpc/{}", methods::SUBD_UPDATE), post(update))
        .route(&format!("/rpc/{}", methods::SUBD_CLEANUP), post(cleanup))
        .route(
            &format!("/rpc/{}", methods::SNAPSHOT_GET_TREE),
            post(snapshot_tree),
        )
        .route(
            &format!("/rpc/{}", methods::SNAPSHOT_GET_OBJECTS),
            post(crate::snapshot::get_objects),
        )
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// `PollResponse` without the tree fields, which a full poll splices in from the shared
/// serialized tree (`crate::poll`).
#[derive(Serialize)]
struct PollHead<'a> {
    generation: u64,
    scan_count: u64,
    start_time: u64,
    last_scan_time: u64,
    last_scan_duration_ms: u64,
    fetch_in_progress: bool,
    update_in_progress: bool,
    last_fetch_error: Option<&'a str>,
    last_update: Option<&'a UpdateResult>,
    free_space: u64,
    last_image: Option<&'a str>,
    exclusions: &'a [String],
    #[serde(skip_serializing_if = "<[model::FsPath]>::is_empty")]
    seeded: &'a [model::FsPath],
}

async fn poll(
    State(s): State<Arc<Subd>>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<PollRequest>,
) -> Result<Response, ApiError> {
    // A short poll is open to any authenticated caller; the tree needs the grant.
    if !req.short_only && !caller.may(methods::SUBD_POLL) {
        tracing::warn!(caller = %caller.name, "full poll denied (short polls only)");
        return Err(ApiError::Forbidden("access to method denied".into()));
    }
    poll_reply(s, req).await
}

/// Holds a poll that asks for it until the scan count reaches `wait_for_scan`, at most
/// `wait_ms` (capped by `MAX_POLL_HOLD_MS`); the reply then says where the count stands.
async fn hold_for_scan(s: &Subd, req: &PollRequest) {
    if req.wait_for_scan == 0 || req.wait_ms == 0 {
        return;
    }
    let hold = Duration::from_millis(req.wait_ms.min(model::api::MAX_POLL_HOLD_MS));
    let mut scans = s.scans.subscribe();
    let reached = scans.wait_for(|n| *n >= req.wait_for_scan);
    let _ = tokio::time::timeout(hold, reached).await;
}

/// `Snapshot.GetTree`: a full poll for a snapshot (its grant checked by the server).
async fn snapshot_tree(
    State(s): State<Arc<Subd>>,
    Json(req): Json<PollRequest>,
) -> Result<Response, ApiError> {
    let req = PollRequest {
        short_only: false,
        ..req
    };
    poll_reply(s, req).await
}

/// The poll reply: the status, and the shared tree when asked for and newer than the
/// caller's.
async fn poll_reply(s: Arc<Subd>, req: PollRequest) -> Result<Response, ApiError> {
    hold_for_scan(&s, &req).await;
    let s2 = s.clone();
    // statvfs and the status lock (a std Mutex, taken and released inside): off the
    // executor. The tree is only referenced here, never serialized.
    let (head, parts) = tokio::task::spawn_blocking(move || {
        let free_space = s2.free_space();
        let st = s2.status();
        let send_tree =
            !req.short_only && st.generation != 0 && st.generation != req.have_generation;
        let head = serde_json::to_vec(&PollHead {
            generation: st.generation,
            scan_count: st.scan_count,
            start_time: s2.start_time,
            last_scan_time: st.last_scan_time,
            last_scan_duration_ms: st.last_scan_duration_ms,
            fetch_in_progress: st.fetch_in_progress,
            update_in_progress: st.update_in_progress,
            last_fetch_error: st.last_fetch_error.as_deref(),
            last_update: st.last_update.as_ref(),
            free_space,
            last_image: st.last_image.as_deref(),
            exclusions: s2.exclusions.lines(),
            seeded: &st.seeded,
        })?;
        let parts = st.tree.clone().filter(|_| send_tree).map(|tree| {
            let parts = crate::poll::TreeParts {
                tree,
                object_cache: st.object_cache.clone(),
                hidden_parents: st.hidden_parents.clone(),
            };
            (st.generation, parts)
        });
        Ok::<_, serde_json::Error>((head, parts))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    let Some((generation, parts)) = parts else {
        return Ok(([("content-type", "application/json")], head).into_response());
    };
    let shared = s.polls.tree_fields(generation, parts).await?;
    // `{head…` + `,` + the shared tree fields + `}`.
    let mut open = head;
    open.pop();
    open.push(b',');
    use futures_util::StreamExt;
    let body = futures_util::stream::iter([Bytes::from(open)])
        .chain(shared.slices())
        .chain(futures_util::stream::iter([Bytes::from_static(b"}")]))
        .map(Ok::<_, std::convert::Infallible>);
    Ok((
        [("content-type", "application/json")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// A running fetch or update: clears its `*_in_progress` flag when dropped, on every path
/// (a panic or a dropped task included), recording the failure unless `finished`.
struct Claim {
    subd: Arc<Subd>,
    fetching: bool,
    /// The image an update applies (for the failure it records).
    image: String,
    /// The scan count when the work was accepted (scans counted later started after it).
    accepted_at_scan: u64,
    finished: bool,
}

impl Claim {
    /// The work ended normally and recorded its own outcome.
    fn finished(mut self) {
        self.finished = true;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let what = if self.fetching { "fetch" } else { "update" };
        let msg = format!("{what} aborted by an internal error (see subd's log)");
        tracing::error!("{msg}");
        {
            // Not `unwrap`: a panic while holding the lock must not keep the flag set.
            let mut st = self.subd.status();
            if self.fetching {
                st.fetch_in_progress = false;
                st.last_fetch_error = Some(msg);
            } else {
                st.update_in_progress = false;
                st.last_update = Some(UpdateResult {
                    image_name: self.image.clone(),
                    finished_at: disk::clock::unix_now(),
                    errors: vec![msg],
                    ..UpdateResult::default()
                });
            }
        }
        // A pass that overlapped the work is discarded.
        self.subd
            .epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.subd.boost_scan();
    }
}

/// Marks a fetch or update as running, or refuses.
fn claim(s: &Arc<Subd>, fetching: bool) -> Result<Claim, ApiError> {
    let mut st = s.status();
    if st.fetch_in_progress || st.update_in_progress {
        return Err(ApiError::Conflict(
            "a fetch or update is already in progress".into(),
        ));
    }
    if !fetching && st.generation == 0 {
        return Err(ApiError::Busy(
            "no scan has finished yet; poll again later".into(),
        ));
    }
    if fetching {
        st.fetch_in_progress = true;
        st.last_fetch_error = None;
    } else {
        st.update_in_progress = true;
        // Under the lock: the scanner clears this only before it reads the status.
        s.scan_abort
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
    Ok(Claim {
        subd: s.clone(),
        fetching,
        image: String::new(),
        accepted_at_scan: st.scan_count,
        finished: false,
    })
}

/// Runs `apply` for `plan`, records its result and releases `claim`. A panic inside
/// `apply` is caught and becomes the update's error (the services it stopped are started).
fn run_update(
    s: &Subd,
    plan: &model::UpdatePlan,
    claim: Claim,
    apply: impl FnOnce() -> UpdateResult,
) -> UpdateResult {
    let mut result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(apply)) {
        Ok(r) => r,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|m| m.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let line = why.lines().next().unwrap_or("");
            let (trigger_actions, trigger_failures) =
                disk::apply::resume_pending_starts(&s.state_dir, &s.apply_options());
            UpdateResult {
                image_name: plan.image_name.clone(),
                finished_at: disk::clock::unix_now(),
                errors: vec![format!("update failed: internal error: {line}")],
                trigger_actions,
                trigger_failures,
                ..UpdateResult::default()
            }
        }
    };
    result.rebuild = plan.previous_image.is_empty();
    s.finish_update(&result, plan.sparse);
    claim.finished();
    result
}

/// The client a fetch uses: for `--image-server` if given, else for the Fetch's `server`
/// (one address or a comma-separated list, each checked to be `HOST[:PORT]`); the same
/// client as the last fetch's when the list is the same, so the server it failed over to
/// stays preferred.
fn fetch_client(s: &Subd, requested: &str) -> Result<ImageServerClient, ApiError> {
    let list = s.config.image_server.as_deref().unwrap_or(requested);
    for addr in wire::client::split_servers(list) {
        if let Err(e) = wire::client::check_host_port(addr) {
            return Err(ApiError::BadRequest(format!(
                "fetch: imageserver address {e}"
            )));
        }
    }
    let mut last = s.fetch_client.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((l, c)) = last.as_ref().filter(|(l, _)| l == list) {
        debug_assert_eq!(l, list);
        return Ok(c.clone());
    }
    let client = ImageServerClient::with_server_name(
        list,
        &s.config.client_security,
        &s.config.image_server_name,
    )
    .map_err(|e| ApiError::BadRequest(format!("fetch: {e}")))?;
    *last = Some((list.to_string(), client.clone()));
    Ok(client)
}

async fn fetch(
    State(s): State<Arc<Subd>>,
    Json(req): Json<FetchRequest>,
) -> Result<axum::Json<FetchResponse>, ApiError> {
    let client = fetch_client(&s, &req.server)?;
    let claim = claim(&s, true)?;
    let scan_count = Some(claim.accepted_at_scan);
    let s2 = s.clone();
    let task = tokio::spawn(async move {
        let opts = FetchOptions {
            bytes_per_second: s2.config.fetch_bytes_per_second,
            final_metadata: wire::fetch::metadata_map(&req.final_metadata),
            ..FetchOptions::default()
        };
        let r = fetch_objects(&client, &s2.store, &req.hashes, &opts).await;
        {
            let mut st = s2.status();
            st.fetch_in_progress = false;
            match &r {
                Ok(stats) => {
                    tracing::info!(?stats, "fetch done");
                    st.last_fetch = Some(stats.clone());
                }
                Err(e) => {
                    tracing::warn!("fetch: {e}");
                    st.last_fetch_error = Some(e.to_string());
                }
            }
        }
        // A pass that listed the object cache while the fetch ran is discarded: the next
        // scan counted lists every object fetched.
        s2.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        s2.boost_scan();
        claim.finished();
        r
    });
    if !req.wait {
        return Ok(axum::Json(FetchResponse { scan_count }));
    }
    match task.await.map_err(ApiError::internal)? {
        Ok(_) => Ok(axum::Json(FetchResponse { scan_count })),
        Err(e @ FetchError::DiskFull { .. }) => Err(ApiError::InsufficientStorage(e.to_string())),
        Err(e) => Err(ApiError::Internal(format!("fetch: {e}"))),
    }
}

async fn update(
    State(s): State<Arc<Subd>>,
    Json(req): Json<UpdateRequest>,
) -> Result<axum::Json<UpdateResponse>, ApiError> {
    if let Some(r) = &req.plan.unsafe_reason {
        return Err(ApiError::BadRequest(format!("refusing unsafe update: {r}")));
    }
    if let Err(e) = req
        .plan
        .validate()
        .and_then(|()| req.plan.check_root(rustix::process::geteuid().as_raw()))
    {
        return Err(ApiError::BadRequest(format!("refusing invalid plan: {e}")));
    }
    let mut claim = claim(&s, false)?;
    claim.image = req.plan.image_name.clone();
    let scan_count = Some(claim.accepted_at_scan);
    s.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let s2 = s.clone();
    let task = tokio::task::spawn_blocking(move || {
        let plan = req.plan;
        tracing::info!(
            "update to {}: {}{}",
            plan.image_name,
            plan.to_string().trim_end().replace('\n', ";"),
            logged_paths(&plan)
        );
        run_update(&s2, &plan, claim, || {
            crate::hooks::update_with_hooks(&s2, &plan, || {
                let (result, known) = disk::apply::apply_noting(
                    &s2.config.root,
                    &s2.state_dir,
                    &plan,
                    &s2.apply_options(),
                );
                // Set while the update is still in progress: the scanner takes it for its
                // first pass after the update ends.
                s2.status().known = Some(Arc::new(known));
                result
            })
        })
    });
    if !req.wait {
        return Ok(axum::Json(UpdateResponse {
            result: None,
            scan_count,
        }));
    }
    let result = task.await.map_err(ApiError::internal)?;
    Ok(axum::Json(UpdateResponse {
        result: Some(result),
        scan_count,
    }))
}

async fn cleanup(
    State(s): State<Arc<Subd>>,
    Json(req): Json<CleanupRequest>,
) -> Result<axum::Json<Empty>, ApiError> {
    {
        let st = s.status();
        if st.fetch_in_progress || st.update_in_progress {
            return Err(ApiError::Conflict(
                "a fetch or update is in progress".into(),
            ));
        }
    }
    let s2 = s.clone();
    tokio::task::spawn_blocking(move || {
        for h in &req.hashes {
            s2.store.remove(h)?;
        }
        Ok::<_, disk::objectstore::StoreError>(())
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    s.boost_scan();
    Ok(axum::Json(Empty {}))
}

async fn status_page(State(s): State<Arc<Subd>>) -> Html<String> {
    let free = s.free_space();
    let st = s.status();
    let mut h = String::from("<!doctype html><title>subd</title><h1>subd</h1>");
    if s.config.security.is_insecure() {
        h.push_str(wire::http::INSECURE_BANNER);
    }
    let last = st.last_update.as_ref();
    let rows = [
        ("root", s.config.root.display().to_string()),
        ("generation", st.generation.to_string()),
        ("scans", st.scan_count.to_string()),
        (
            "last scan duration",
            format!("{} ms", st.last_scan_duration_ms),
        ),
        ("paths", st.tree.as_ref().map_or(0, |t| t.len()).to_string()),
        (
            "cached objects",
            st.object_cache.as_ref().map_or(0, |c| c.len()).to_string(),
        ),
        ("fetch in progress", st.fetch_in_progress.to_string()),
        ("update in progress", st.update_in_progress.to_string()),
        (
            "last fetch error",
            st.last_fetch_error.clone().unwrap_or_default(),
        ),
        ("last image", st.last_image.clone().unwrap_or_default()),
        (
            "last update errors",
            last.map_or(String::new(), |u| u.errors.join("; ")),
        ),
        (
            "last trigger failures",
            last.map_or(String::new(), |u| u.trigger_failures.join("; ")),
        ),
        (
            "last hook failure",
            last.and_then(|u| u.hook_failure.clone())
                .unwrap_or_default(),
        ),
        (
            "last hooks",
            last.map_or(String::new(), |u| {
                u.hooks
                    .iter()
                    .map(|r| {
                        let phase = r.phase;
                        let out = r.output.last().map(String::as_str).unwrap_or("");
                        format!("{phase} {}: {} ({out})", r.name, r.ending())
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            }),
        ),
        ("free space", format!("{free} bytes")),
        ("exclusions", s.exclusions.lines().join(" ")),
        (
            "seeded state",
            st.seeded
                .iter()
                .map(|p| p.display())
                .collect::<Vec<_>>()
                .join(" "),
        ),
    ];
    h.push_str("<table>");
    for (k, v) in rows {
        h.push_str(&format!(
            "<tr><th align=left>{k}</th><td>{}</td></tr>",
            wire::pages::escape(&v)
        ));
    }
    h.push_str("</table>");
    Html(h)
}

async fn metrics(State(s): State<Arc<Subd>>) -> Response {
    let free = s.free_space();
    let st = s.status();
    let last = st.last_update.as_ref();
    let mut m = wire::pages::Metrics::new();
    m.gauge(
        "subd_generation",
        "Scan generation (moves when the tree changes)",
        st.generation,
    )
    .untyped("subd_scan_count", "Scans finished", st.scan_count)
    .untyped(
        "subd_scans_aborted_for_update",
        "Scans abandoned because an update began",
        st.scans_aborted,
    )
    .gauge_f64(
        "subd_last_scan_duration_seconds",
        "Duration of the last scan",
        st.last_scan_duration_ms as f64 / 1000.0,
    )
    .gauge(
        "subd_last_scan_known_files",
        "Files the last scan took from the preceding update's record instead of reading",
        st.last_scan_known_files,
    )
    .gauge(
        "subd_paths",
        "Paths in the last scan",
        st.tree.as_ref().map_or(0, |t| t.len()) as u64,
    )
    .gauge(
        "subd_cached_objects",
        "Objects in the cache",
        st.object_cache.as_ref().map_or(0, |c| c.len()) as u64,
    )
    .gauge(
        "subd_fetch_in_progress",
        "1 while a fetch runs",
        u64::from(st.fetch_in_progress),
    )
    .gauge(
        "subd_update_in_progress",
        "1 while an update runs",
        u64::from(st.update_in_progress),
    )
    .gauge(
        "subd_last_fetch_failed",
        "1 if the last fetch failed",
        u64::from(st.last_fetch_error.is_some()),
    )
    .gauge(
        "subd_last_update_errors",
        "Errors of the last update",
        last.map_or(0, |u| u.errors.len()) as u64,
    )
    .gauge(
        "subd_last_update_trigger_failures",
        "Failed service commands of the last update",
        last.map_or(0, |u| u.trigger_failures.len()) as u64,
    )
    .gauge_f64(
        "subd_last_activation_seconds",
        "Duration of the last update's activation",
        last.map_or(0.0, |u| u.activation_ms / 1000.0),
    )
    .gauge("subd_free_space_bytes", "Free space under the root", free);
    m.response()
}

/// The first paths an update changes, for its log line: `; + MODE PATH; ~ MODE PATH
/// (content, mode)…`, at most 20 (then how many more).
fn logged_paths(plan: &model::UpdatePlan) -> String {
    const MAX: usize = 20;
    let lines = plan.path_lines();
    let mut s: String = lines.iter().take(MAX).map(|l| format!(";  {l}")).collect();
    if lines.len() > MAX {
        s.push_str(&format!(";  … and {} more", lines.len() - MAX));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_update_log_line_says_change_for_a_replaced_file_and_bounds_its_paths() {
        use model::plan::{Aspect, PathInode, Replaced};
        let path = model::path::FsPath::from_relative(b"etc/app.conf").unwrap();
        let mut plan = model::UpdatePlan::default();
        plan.inodes_to_make.push(PathInode {
            path: path.clone(),
            inode: model::Inode::file(0o644, 0, 0, Default::default(), 0, None),
        });
        plan.replaced.push(Replaced {
            path,
            what: vec![Aspect::Content, Aspect::Mode],
        });
        let line = format!(
            "{}{}",
            plan.to_string().trim_end().replace('\n', ";"),
            logged_paths(&plan)
        );
        assert!(line.contains("add 0, change 1"), "{line}");
        assert!(
            line.contains("~ -rw-r--r-- /etc/app.conf (content, mode)"),
            "{line}"
        );
        for i in 0..30 {
            plan.paths_to_delete
                .push(model::path::FsPath::from_relative(format!("d{i}").as_bytes()).unwrap());
        }
        assert!(
            logged_paths(&plan).ends_with("… and 11 more"),
            "{}",
            logged_paths(&plan)
        );
    }

    fn subd() -> (tempfile::TempDir, Arc<Subd>) {
        let d = tempfile::tempdir().unwrap();
        let s = Subd::start(crate::Config::new(d.path())).unwrap();
        (d, s)
    }

    fn claimed(s: &Arc<Subd>, fetching: bool) -> Claim {
        let mut st = s.status();
        st.fetch_in_progress = fetching;
        st.update_in_progress = !fetching;
        Claim {
            subd: s.clone(),
            fetching,
            image: "app/1".into(),
            accepted_at_scan: st.scan_count,
            finished: false,
        }
    }

    /// Issue 9 #2: a panic inside apply must not leave `update_in_progress` set.
    #[test]
    fn a_panic_inside_apply_is_the_update_error_and_clears_the_flag() {
        let (_d, s) = subd();
        let claim = claimed(&s, false);
        let plan = model::UpdatePlan {
            image_name: "app/1".into(),
            ..Default::default()
        };
        let r = run_update(&s, &plan, claim, || panic!("boom\nsecond line"));
        assert_eq!(r.errors, ["update failed: internal error: boom"]);
        let st = s.status();
        assert!(!st.update_in_progress);
        assert_eq!(st.last_update.as_ref().unwrap().errors, r.errors);
        assert_ne!(st.last_image.as_deref(), Some("app/1"));
        drop(st);
        s.shutdown();
    }

    /// An update whose claim is dropped without finishing (a panic outside apply, a task
    /// never run) clears the flag and records the failure as the update's error.
    #[test]
    fn an_update_claim_dropped_unfinished_records_the_failure() {
        let (_d, s) = subd();
        drop(claimed(&s, false));
        let st = s.status();
        assert!(!st.update_in_progress);
        let u = st.last_update.as_ref().unwrap();
        assert_eq!(u.image_name, "app/1");
        assert!(u.errors[0].contains("internal error"), "{u:?}");
        drop(st);
        s.shutdown();
    }

    /// A panic while the status lock is held poisons it; later claims and polls still
    /// work rather than panicking on every call (a wedged subd).
    #[test]
    fn a_poisoned_status_lock_does_not_wedge_later_calls() {
        let (_d, s) = subd();
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            let _st = s2.status();
            panic!("broke while holding the status");
        });
        assert!(t.join().is_err());
        assert!(s.status.is_poisoned());
        drop(claimed(&s, true));
        assert!(!s.status().fetch_in_progress);
        s.shutdown();
    }

    /// A fetch task that panics drops its claim: the flag is cleared, the failure recorded.
    #[test]
    fn a_fetch_that_panics_clears_its_flag() {
        let (_d, s) = subd();
        let claim = claimed(&s, true);
        let t = std::thread::spawn(move || {
            let _claim = claim;
            panic!("fetch broke");
        });
        assert!(t.join().is_err());
        let st = s.status();
        assert!(!st.fetch_in_progress);
        assert!(
            st.last_fetch_error
                .as_deref()
                .unwrap()
                .contains("internal error"),
            "{:?}",
            st.last_fetch_error
        );
        drop(st);
        s.shutdown();
    }
}
