//! JSON RPC handlers: images (add, get, check, list, delete), unreferenced objects, and
//! `ObjectServer.CheckObjects`. Catalogue work that touches files runs on blocking threads.
//! Also the one translation of catalogue errors into `ApiError` (and so HTTP statuses),
//! which every route, the object streams included, goes through.

use crate::catalogue::CatalogueError;
use crate::State;
use crate::JSON_BODY_LIMIT;
use axum::body::Body;
use axum::extract::State as AxState;
use axum::http::header::CONTENT_LENGTH;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::TryStreamExt;
use model::api::{self, Empty};
use model::ImageName;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::io::{StreamReader, SyncIoBridge};
use wire::http::{ApiError, Caller, Json};

impl From<CatalogueError> for ApiError {
    /// Not found → 404, already exists → 409, expired → 410, invalid request → 400, corrupt or
    /// unreadable → 500; a store error by its cause (bad data 400, no space 507, else 500).
    /// The catalogue's one line is the message.
    fn from(e: CatalogueError) -> ApiError {
        use CatalogueError as E;
        let line = e.to_string();
        match e {
            E::ImageNotFound(_) | E::ObjectsNotFound { .. } => ApiError::NotFound(line),
            E::AlreadyExists(_) | E::NameDeleted(_) | E::NameExpired(_) | E::NameContended(_) => {
                ApiError::Conflict(line)
            }
            E::ImageExpired(_) => ApiError::Gone(line),
            E::InvalidTree { .. }
            | E::InvalidExpiry { .. }
            | E::InvalidHooks { .. }
            | E::InvalidMissingObjects { .. }
            | E::InvalidObjectSize { .. }
            | E::InvalidPercentage(_) => ApiError::BadRequest(line),
            E::CorruptImage { .. }
            | E::CorruptObject { .. }
            | E::ObjectUnreadable { .. }
            | E::ImageIo { .. }
            | E::Bucket(_) => ApiError::Internal(line),
            E::LeaseLapsed(_) => ApiError::Busy(line),
            E::Store(s) if s.is_bad_data() => ApiError::BadRequest(line),
            E::Store(s) if s.is_no_space() => ApiError::InsufficientStorage(line),
            E::Store(_) => ApiError::Internal(line),
        }
    }
}

fn name_of(raw: &str) -> Result<ImageName, ApiError> {
    ImageName::parse(raw).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// Runs catalogue work off the executor; its error becomes an `ApiError`.
pub(crate) async fn blocking<T: Send + 'static, E: Into<ApiError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
        .map_err(Into::into)
}

/// `AddImage` bodies above this size (by `Content-Length`; a body without one counts as
/// large) wait for one of the server's few large-body slots.
pub const LARGE_BODY: usize = 8 << 20;
/// Large `AddImage` bodies held in memory at once, by default.
pub const DEFAULT_LARGE_BODIES: usize = 2;
/// How long a large `AddImage` waits for a slot before it is refused with 503.
pub const DEFAULT_LARGE_BODY_WAIT: Duration = Duration::from_secs(30);

/// Counts what is read through it and fails past `JSON_BODY_LIMIT` bytes.
struct Bounded<R> {
    inner: R,
    read: usize,
}

impl<R: std::io::Read> std::io::Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n;
        if self.read > JSON_BODY_LIMIT {
            return Err(std::io::Error::other("over the limit"));
        }
        Ok(n)
    }
}

/// Parses a JSON body as it arrives, on a blocking thread: the body is never held whole
/// in memory, only the parsed value. More than `JSON_BODY_LIMIT` bytes is `TooLarge`.
async fn parse_json_body<T: serde::de::DeserializeOwned + Send + 'static>(
    body: Body,
    len: Option<usize>,
) -> Result<T, ApiError> {
    let too_large =
        || ApiError::TooLarge(format!("request body larger than {JSON_BODY_LIMIT} bytes"));
    if len.is_some_and(|l| l > JSON_BODY_LIMIT) {
        return Err(too_large());
    }
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    blocking(move || {
        let mut r = Bounded {
            inner: std::io::BufReader::with_capacity(256 * 1024, reader),
            read: 0,
        };
        serde_json::from_reader(&mut r).map_err(|e| {
            if r.read > JSON_BODY_LIMIT {
                too_large()
            } else {
                ApiError::BadRequest(format!("invalid JSON request: {e}"))
            }
        })
    })
    .await
}

/// Adds an image. Large bodies are admitted a few at a time (`State::image_bodies`); the
/// body is parsed as it arrives, never held whole.
pub async fn add_image(
    AxState(st): AxState<State>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<Empty>, ApiError> {
    let len = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let _slot = if len.is_none_or(|l| l > LARGE_BODY) {
        let (sem, wait) = (st.image_bodies.clone(), st.image_body_wait);
        match tokio::time::timeout(wait, sem.acquire_owned()).await {
            Ok(Ok(permit)) => Some(permit),
            _ => {
                return Err(ApiError::Busy(format!(
                    "too many large AddImage requests in progress (waited {} s for one of the slots); retry later",
                    wait.as_secs_f32()
                )))
            }
        }
    } else {
        None
    };
    let req: api::AddImageRequest = parse_json_body(body, len).await?;
    let name = name_of(&req.name)?;
    let mut image = req.image;
    image.format = 1;
    image.created_by = caller.name.clone();
    image.created_on = disk::clock::unix_now();
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
    // An expired name is a tombstone too: `deleted` for clients that know no `expired`.
    let expired = st.catalogue.name_expired(&name);
    Ok(axum::Json(api::CheckImageResponse {
        exists: st.catalogue.image_exists(&name),
        deleted: expired || st.catalogue.name_deleted(&name),
        expired,
        min_expiry_secs: st.catalogue.min_expiry(),
    }))
}

pub async fn get_image_expiration(
    AxState(st): AxState<State>,
    Json(req): Json<api::ImageNameRequest>,
) -> Result<axum::Json<api::ImageExpirationResponse>, ApiError> {
    let name = name_of(&req.name)?;
    Ok(axum::Json(api::ImageExpirationResponse {
        expires_at: st.catalogue.image_expiration(&name)?,
    }))
}

pub async fn change_image_expiration(
    AxState(st): AxState<State>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<api::ChangeImageExpirationRequest>,
) -> Result<axum::Json<Empty>, ApiError> {
    let name = name_of(&req.name)?;
    let cat = st.catalogue.clone();
    let n = name.clone();
    blocking(move || cat.change_expiration(&n, req.expires_at)).await?;
    tracing::info!(image = %name, by = %caller.name, expires_at = ?req.expires_at, "image expiry changed");
    Ok(axum::Json(Empty {}))
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
    let cat = st.catalogue.clone();
    let sizes = blocking(move || cat.check_objects_leased(&req.hashes)).await?;
    Ok(axum::Json(api::CheckObjectsResponse { sizes }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::objectstore::StoreError;
    use model::ObjectId;

    #[test]
    fn catalogue_errors_keep_their_line_and_get_their_status() {
        let name = ImageName::parse("app/1").unwrap();
        let id = ObjectId::of(b"x");
        let io = |errno| StoreError::Io {
            path: "/data/objects".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        let cases: [(CatalogueError, u16); 12] = [
            (CatalogueError::ImageNotFound(name.clone()), 404),
            (CatalogueError::ImageExpired(name.clone()), 410),
            (CatalogueError::NameExpired(name.clone()), 409),
            (
                CatalogueError::InvalidExpiry {
                    name: name.clone(),
                    source: model::expiry::ExpiryError::WasNever,
                },
                400,
            ),
            (
                CatalogueError::ObjectsNotFound {
                    first: id,
                    count: 1,
                },
                404,
            ),
            (CatalogueError::AlreadyExists(name.clone()), 409),
            (CatalogueError::NameDeleted(name.clone()), 409),
            (CatalogueError::NameContended(name.clone()), 409),
            (CatalogueError::InvalidPercentage(101), 400),
            (
                CatalogueError::CorruptImage {
                    name: name.clone(),
                    damage: "its file does not match".into(),
                },
                500,
            ),
            (CatalogueError::Store(io(libc::ENOSPC)), 507),
            (CatalogueError::Store(io(libc::EIO)), 500),
        ];
        for (e, status) in cases {
            let line = e.to_string();
            let api = ApiError::from(e);
            assert_eq!(api.status().as_u16(), status, "{line}");
            assert_eq!(api.to_string(), line);
        }
        let mismatch = CatalogueError::Store(StoreError::HashMismatch {
            expected: Box::new(id),
            computed: Box::new(ObjectId::of(b"y")),
        });
        assert_eq!(ApiError::from(mismatch).status().as_u16(), 400);
    }
}
