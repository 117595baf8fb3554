//! subd's HTTP surface: `Subd.Poll`, `Subd.Fetch`, `Subd.Update`, `Subd.Cleanup`, the
//! status page at `/` and Prometheus metrics at `/metrics`.

use crate::Subd;
use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use model::api::{
    methods, CleanupRequest, Empty, FetchRequest, PollRequest, UpdateRequest, UpdateResponse,
    UpdateResult,
};
use model::client::ImageServerClient;
use model::fetch::{fetch_objects, FetchError, FetchOptions};
use model::http::{ApiError, Json};
use model::{FileTree, FsPath, ObjectId};
use serde::Serialize;
use std::sync::Arc;

/// The router of a subd.
pub fn router(state: Arc<Subd>) -> Router {
    Router::new()
        .route(&format!("/rpc/{}", methods::SUBD_POLL), post(poll))
        .route(&format!("/rpc/{}", methods::SUBD_FETCH), post(fetch))
        .route(&format!("/rpc/{}", methods::SUBD_UPDATE), post(update))
        .route(&format!("/rpc/{}", methods::SUBD_CLEANUP), post(cleanup))
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// `PollResponse` with borrowed tree and cache, so a poll serializes without copying them.
#[derive(Serialize)]
struct PollReply<'a> {
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
    tree: Option<&'a FileTree>,
    object_cache: Option<&'a [ObjectId]>,
    #[serde(skip_serializing_if = "<[FsPath]>::is_empty")]
    hidden_parents: &'a [FsPath],
}

async fn poll(
    State(s): State<Arc<Subd>>,
    Json(req): Json<PollRequest>,
) -> Result<Response, ApiError> {
    let s2 = s.clone();
    // Serializing a large tree is CPU work: off the executor. The lock is a std Mutex,
    // taken and released inside this blocking closure.
    let body = tokio::task::spawn_blocking(move || {
        let free_space = s2.free_space();
        let st = s2.status.lock().unwrap();
        let send_tree =
            !req.short_only && st.generation != 0 && st.generation != req.have_generation;
        let reply = PollReply {
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
            tree: if send_tree { st.tree.as_deref() } else { None },
            object_cache: if send_tree {
                st.object_cache.as_deref().map(|v| v.as_slice())
            } else {
                None
            },
            hidden_parents: if send_tree { &st.hidden_parents } else { &[] },
        };
        serde_json::to_vec(&reply)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    Ok(([("content-type", "application/json")], body).into_response())
}

/// Marks a fetch or update as running, or refuses.
fn claim(s: &Subd, fetching: bool) -> Result<(), ApiError> {
    let mut st = s.status.lock().unwrap();
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
    Ok(())
}

async fn fetch(
    State(s): State<Arc<Subd>>,
    Json(req): Json<FetchRequest>,
) -> Result<axum::Json<Empty>, ApiError> {
    if req.server.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "fetch: empty imageserver address".into(),
        ));
    }
    let client = ImageServerClient::with_server_name(
        &req.server,
        &s.config.client_security,
        &s.config.image_server_name,
    )
    .map_err(|e| ApiError::BadRequest(format!("fetch: {e}")))?;
    claim(&s, true)?;
    let s2 = s.clone();
    let task = tokio::spawn(async move {
        let opts = FetchOptions {
            bytes_per_second: s2.config.fetch_bytes_per_second,
            ..FetchOptions::default()
        };
        let r = fetch_objects(&client, &s2.store, &req.hashes, &opts).await;
        {
            let mut st = s2.status.lock().unwrap();
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
        s2.boost_scan();
        r
    });
    if !req.wait {
        return Ok(axum::Json(Empty {}));
    }
    match task.await.map_err(ApiError::internal)? {
        Ok(_) => Ok(axum::Json(Empty {})),
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
    claim(&s, false)?;
    s.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let s2 = s.clone();
    let task = tokio::task::spawn_blocking(move || {
        let plan = req.plan;
        tracing::info!(
            "update to {}: {}",
            plan.image_name,
            plan.to_string().trim_end().replace('\n', ";")
        );
        let result =
            model::apply::apply(&s2.config.root, &s2.state_dir, &plan, &s2.apply_options());
        s2.finish_update(&result, plan.sparse);
        result
    });
    if !req.wait {
        return Ok(axum::Json(UpdateResponse { result: None }));
    }
    let result = task.await.map_err(ApiError::internal)?;
    Ok(axum::Json(UpdateResponse {
        result: Some(result),
    }))
}

async fn cleanup(
    State(s): State<Arc<Subd>>,
    Json(req): Json<CleanupRequest>,
) -> Result<axum::Json<Empty>, ApiError> {
    {
        let st = s.status.lock().unwrap();
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
        Ok::<_, model::objectstore::StoreError>(())
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    s.boost_scan();
    Ok(axum::Json(Empty {}))
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn status_page(State(s): State<Arc<Subd>>) -> Html<String> {
    let free = s.free_space();
    let st = s.status.lock().unwrap();
    let mut h = String::from("<!doctype html><title>subd</title><h1>subd</h1>");
    if s.config.security.is_insecure() {
        h.push_str(model::http::INSECURE_BANNER);
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
        ("free space", format!("{free} bytes")),
        ("exclusions", s.exclusions.lines().join(" ")),
    ];
    h.push_str("<table>");
    for (k, v) in rows {
        h.push_str(&format!(
            "<tr><th align=left>{k}</th><td>{}</td></tr>",
            escape_html(&v)
        ));
    }
    h.push_str("</table>");
    Html(h)
}

async fn metrics(State(s): State<Arc<Subd>>) -> impl IntoResponse {
    let free = s.free_space();
    let st = s.status.lock().unwrap();
    let last = st.last_update.as_ref();
    let lines = [
        format!("subd_generation {}", st.generation),
        format!("subd_scan_count {}", st.scan_count),
        format!("subd_scans_aborted_for_update {}", st.scans_aborted),
        format!(
            "subd_last_scan_duration_seconds {}",
            st.last_scan_duration_ms as f64 / 1000.0
        ),
        format!("subd_paths {}", st.tree.as_ref().map_or(0, |t| t.len())),
        format!(
            "subd_cached_objects {}",
            st.object_cache.as_ref().map_or(0, |c| c.len())
        ),
        format!("subd_fetch_in_progress {}", st.fetch_in_progress as u8),
        format!("subd_update_in_progress {}", st.update_in_progress as u8),
        format!(
            "subd_last_fetch_failed {}",
            st.last_fetch_error.is_some() as u8
        ),
        format!(
            "subd_last_update_errors {}",
            last.map_or(0, |u| u.errors.len())
        ),
        format!(
            "subd_last_update_trigger_failures {}",
            last.map_or(0, |u| u.trigger_failures.len())
        ),
        format!(
            "subd_last_activation_seconds {}",
            last.map_or(0.0, |u| u.activation_ms / 1000.0)
        ),
        format!("subd_free_space_bytes {free}"),
    ];
    (
        [("content-type", "text/plain; version=0.0.4")],
        lines.join("\n") + "\n",
    )
}
