//! JSON RPC handlers: images (add, get, check, list, delete), unreferenced objects, and
//! `ObjectServer.CheckObjects`. Catalogue work that touches files runs on blocking threads.

use crate::State;
use axum::extract::State as AxState;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use model::api::{self, Empty};
use model::http::{ApiError, Caller, Json};
use model::ImageName;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

fn name_of(raw: &str) -> Result<ImageName, ApiError> {
    ImageName::parse(raw).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// Runs catalogue work off the executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

pub async fn add_image(
    AxState(st): AxState<State>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<api::AddImageRequest>,
) -> Result<axum::Json<Empty>, ApiError> {
    let name = name_of(&req.name)?;
    let mut image = req.image;
    image.format = 1;
    image.created_by = caller.name.clone();
    image.created_on = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let cat = st.catalogue.clone();
    let n = name.clone();
    blocking(move || cat.add_image(&n, &image)).await?;
    st.metrics.images_added.fetch_add(1, Ordering::Relaxed);
    tracing::info!(image = %name, by = %caller.name, "image added");
    Ok(axum::Json(Empty {}))
}

pub async fn check_image(
    AxState(st): AxState<State>,
    Json(req): Json<api::ImageNameRequest>,
) -> Result<axum::Json<api::CheckImageResponse>, ApiError> {
    let name = name_of(&req.name)?;
    Ok(axum::Json(api::CheckImageResponse {
        exists: st.catalogue.image_exists(&name),
        deleted: st.catalogue.name_deleted(&name),
    }))
}

pub async fn get_image(
    AxState(st): AxState<State>,
    Json(req): Json<api::ImageNameRequest>,
) -> Result<Response, ApiError> {
    let name = name_of(&req.name)?;
    let cat = st.catalogue.clone();
    let bytes = blocking(move || cat.image_json(&name)).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        bytes,
    )
        .into_response())
}

pub async fn list_images(
    AxState(st): AxState<State>,
    Json(req): Json<api::ListImagesRequest>,
) -> Result<axum::Json<api::ListImagesResponse>, ApiError> {
    let prefix = req.prefix.unwrap_or_default();
    let prefix = prefix.strip_prefix('/').unwrap_or(&prefix);
    Ok(axum::Json(api::ListImagesResponse {
        names: st.catalogue.list_images(prefix),
    }))
}

pub async fn delete_image(
    AxState(st): AxState<State>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<api::ImageNameRequest>,
) -> Result<axum::Json<Empty>, ApiError> {
    let name = name_of(&req.name)?;
    let cat = st.catalogue.clone();
    let n = name.clone();
    blocking(move || cat.delete_image(&n)).await?;
    st.metrics.images_deleted.fetch_add(1, Ordering::Relaxed);
    tracing::info!(image = %name, by = %caller.name, "image deleted");
    Ok(axum::Json(Empty {}))
}

pub async fn list_unreferenced(
    AxState(st): AxState<State>,
) -> Result<axum::Json<api::ListUnreferencedObjectsResponse>, ApiError> {
    let objects = st
        .catalogue
        .unreferenced()
        .into_iter()
        .map(|(hash, size)| api::ObjectInfo { hash, size })
        .collect();
    Ok(axum::Json(api::ListUnreferencedObjectsResponse { objects }))
}

pub async fn delete_unreferenced(
    AxState(st): AxState<State>,
    Json(req): Json<api::DeleteUnreferencedObjectsRequest>,
) -> Result<axum::Json<api::DeleteUnreferencedObjectsResponse>, ApiError> {
    let cat = st.catalogue.clone();
    let (deleted, bytes) =
        blocking(move || cat.delete_unreferenced(req.percentage, req.bytes)).await?;
    tracing::info!(deleted, bytes, "unreferenced objects deleted");
    Ok(axum::Json(api::DeleteUnreferencedObjectsResponse {
        deleted,
        bytes,
    }))
}

/// Most hashes one `CheckObjects` may ask about.
pub const MAX_CHECK: usize = 1 << 20;

pub async fn check_objects(
    AxState(st): AxState<State>,
    Json(req): Json<api::CheckObjectsRequest>,
) -> Result<axum::Json<api::CheckObjectsResponse>, ApiError> {
    if req.hashes.len() > MAX_CHECK {
        return Err(ApiError::TooLarge(format!(
            "{} hashes in one request (at most {MAX_CHECK})",
            req.hashes.len()
        )));
    }
    Ok(axum::Json(api::CheckObjectsResponse {
        sizes: st.catalogue.check_objects(&req.hashes),
    }))
}
