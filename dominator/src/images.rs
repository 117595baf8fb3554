//! The fleet-wide image cache: each wanted image is fetched from the imageserver once,
//! however many machines want it; a missing one is retried at most once per `retry`.
//! Images are immutable, so a cached image is kept until the MDB no longer names it or
//! the imageserver says it was deleted or expired (asked with `CheckImage` at most once per
//! `RECHECK`; an unreachable imageserver leaves the cached copy in use). An expired image
//! (`GetImage` answers 410) is its own reason: `image … expired`.

use model::Image;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wire::client::ImageServerClient;

/// Why an image is not ready (kept with its slot, so every machine sees the same reason
/// until the next try).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("image {0} was deleted from the imageserver")]
    Deleted(String),
    #[error("image {0} is not on the imageserver (yet)")]
    Missing(String),
    #[error("image {0} expired")]
    Expired(String),
    #[error("image {name} is malformed: {reason}")]
    Malformed { name: String, reason: String },
    /// The imageserver could not be asked (the client error's line).
    #[error("getting image {name}: {reason}")]
    Unavailable { name: String, reason: String },
}

#[derive(Default)]
struct Slot {
    image: Option<Arc<Image>>,
    error: Option<ImageError>,
    tried: Option<Instant>,
    /// When the cached image was last confirmed to still exist.
    confirmed: Option<Instant>,
}

impl Slot {
    /// Remembers `e` as why the image is not ready; returns it.
    fn fail(&mut self, e: ImageError) -> ImageError {
        self.error = Some(e.clone());
        e
    }
}

/// How often a cached image is confirmed to still exist on the imageserver.
pub const RECHECK: Duration = Duration::from_secs(10);

/// Images by name, shared by every machine task.
pub struct ImageCache {
    client: ImageServerClient,
    retry: Duration,
    // std Mutex: held only to look up or insert a slot, never across `.await`.
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
}

impl ImageCache {
    pub fn new(client: ImageServerClient, retry: Duration) -> ImageCache {
        ImageCache {
            client,
            retry,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The image `name`, fetching it if needed; the error says why it is not ready.
    /// Concurrent callers for one name wait for a single fetch.
    pub async fn get(&self, name: &str) -> Result<Arc<Image>, ImageError> {
        let slot = self
            .slots
            .lock()
            .expect("image cache lock")
            .entry(name.to_string())
            .or_default()
            .clone();
        let mut s = slot.lock().await;
        if let Some(img) = s.image.clone() {
            // A cached copy past its `expires_at` is asked about at once: it expired, or
            // its expiry was extended (then fetched again below, with the new time).
            let stale = model::stream::expired(img.expires_at, disk::clock::unix_now());
            if !stale && s.confirmed.is_some_and(|t| t.elapsed() < RECHECK) {
                return Ok(img);
            }
            s.confirmed = Some(Instant::now());
            match self.client.check_image_name(name).await {
                Ok(c) if !c.exists => {
                    s.image = None;
                    s.tried = Some(Instant::now());
                    let e = if c.expired {
                        tracing::warn!(image = name, "image expired on the imageserver");
                        ImageError::Expired(name.to_string())
                    } else {
                        tracing::warn!(image = name, "image deleted from the imageserver");
                        ImageError::Deleted(name.to_string())
                    };
                    return Err(s.fail(e));
                }
                Ok(_) if stale => s.image = None,
                // Present, or the imageserver cannot say: the cached copy is still the image.
                Ok(_) | Err(_) => return Ok(img),
            }
        }
        if let Some(e) = s
            .error
            .clone()
            .filter(|_| s.tried.is_some_and(|t| t.elapsed() < self.retry))
        {
            return Err(e);
        }
        s.tried = Some(Instant::now());
        match self.client.get_image(name).await {
            Ok(img) => {
                let checked = tokio::task::spawn_blocking(move || {
                    img.tree.validate().map(|()| img).map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
                match checked {
                    Ok(img) => {
                        tracing::info!(image = name, "image loaded");
                        let img = Arc::new(img);
                        s.image = Some(img.clone());
                        s.confirmed = Some(Instant::now());
                        Ok(img)
                    }
                    Err(reason) => Err(s.fail(ImageError::Malformed {
                        name: name.to_string(),
                        reason,
                    })),
                }
            }
            Err(e) => {
                let error = match (e.status(), &s.error) {
                    (Some(404), Some(deleted @ ImageError::Deleted(_))) => deleted.clone(),
                    (Some(404), _) => ImageError::Missing(name.to_string()),
                    (Some(410), _) => ImageError::Expired(name.to_string()),
                    _ => ImageError::Unavailable {
                        name: name.to_string(),
                        reason: e.to_string(),
                    },
                };
                Err(s.fail(error))
            }
        }
    }

    /// The imageserver client the cache fetches with.
    pub fn client(&self) -> &ImageServerClient {
        &self.client
    }

    /// The image if it is already cached (never fetches).
    pub fn cached(&self, name: &str) -> Option<Arc<Image>> {
        let slot = self
            .slots
            .lock()
            .expect("image cache lock")
            .get(name)
            .cloned()?;
        let s = slot.try_lock().ok()?;
        s.image.clone()
    }

    /// Forgets every image not in `wanted`.
    pub fn retain(&self, wanted: &HashSet<String>) {
        self.slots
            .lock()
            .expect("image cache lock")
            .retain(|k, _| wanted.contains(k));
    }

    /// Names of the images currently loaded.
    pub fn loaded(&self) -> Vec<String> {
        let slots = self.slots.lock().expect("image cache lock");
        let mut v: Vec<String> = slots
            .iter()
            .filter(|(_, s)| s.try_lock().is_ok_and(|s| s.image.is_some()))
            .map(|(k, _)| k.clone())
            .collect();
        v.sort_by(|a, b| model::image::version_cmp(a, b));
        v
    }
}
