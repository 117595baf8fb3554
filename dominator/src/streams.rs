//! Image streams in the dominator: an MDB `RequiredImage`/`PlannedImage` naming an image
//! directory stands for the newest image in it (`model::stream::resolve`).
//!
//! A watcher task lists each name the MDB uses (`ImageServer.ListImages` with the name as
//! prefix) once per poll interval, and at once when the MDB names a new one. When a
//! resolution changes it wakes the machines, so a host following a stream starts moving to
//! a newly added version within one poll interval (plus one `ListImages` round trip) of
//! its `add`, and back to the next newest within one poll interval of the newest's
//! deletion. A stream's newest image whose `expires_at` has passed is skipped like a
//! deleted one (the imageserver does not remove expired images yet; the dominator never
//! follows one). A name found to be an exact image stays one (images are immutable; a deleted
//! one is reported by the image cache as before) and is not listed again. A failed
//! listing keeps the last resolution; a directory left empty resolves to nothing, so its
//! machines wait (`image not ready`) rather than being sent anywhere.

use crate::images::ImageCache;
use model::stream::Resolution;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Mutex;
use tokio::sync::{watch, Notify};

/// A machine record with its image names resolved, and what they resolved to.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// The record the herd acts on: stream names replaced by their newest image.
    pub machine: mdb::Machine,
    /// The image `RequiredImage` stands for (`None`: not known to exist yet).
    pub required: Option<String>,
    /// The image `PlannedImage` stands for.
    pub planned: Option<String>,
}

/// The resolutions of every image name the MDB uses, shared by the herd's tasks.
pub struct Streams {
    /// Names the MDB uses (required and planned), set by the MDB watcher.
    names: Mutex<BTreeSet<String>>,
    resolutions: Mutex<BTreeMap<String, Resolution>>,
    /// Bumped whenever a resolution changes.
    changed: watch::Sender<u64>,
    /// Wakes the watcher when the MDB names something new.
    new_names: Notify,
    /// Stream versions found expired (never followed again).
    expired: Mutex<HashSet<String>>,
}

impl Default for Streams {
    fn default() -> Self {
        Streams {
            names: Mutex::default(),
            resolutions: Mutex::default(),
            changed: watch::channel(0).0,
            new_names: Notify::new(),
            expired: Mutex::default(),
        }
    }
}

impl Streams {
    /// Sets the names the MDB uses; a name not seen before is resolved at once.
    pub fn set_names(&self, names: BTreeSet<String>) {
        let new = {
            let mut cur = self.names.lock().expect("streams lock");
            let new = names.iter().any(|n| !cur.contains(n));
            *cur = names.clone();
            new
        };
        // Never both locks at once here (`refresh` takes resolutions, then names).
        self.resolutions
            .lock()
            .expect("streams lock")
            .retain(|k, _| names.contains(k));
        if new {
            self.new_names.notify_one();
        }
    }

    /// A receiver that sees a change whenever any resolution changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// What `name` stands for: its newest image for a stream, itself for an exact image,
    /// `None` while not known.
    pub fn image_for(&self, name: &str) -> Option<String> {
        let r = self.resolutions.lock().expect("streams lock");
        r.get(name)?.image(name).map(str::to_string)
    }

    /// `m` with its stream names replaced by their newest images. A name not (yet)
    /// resolved is kept as it is: the image cache then says why it is not ready.
    pub fn resolve(&self, m: &mdb::Machine) -> Resolved {
        let name = |n: &str| (!n.is_empty()).then(|| self.image_for(n)).flatten();
        let (required, planned) = (name(&m.required_image), name(&m.planned_image));
        let mut machine = m.clone();
        if let Some(r) = &required {
            machine.required_image = r.clone();
        }
        if let Some(p) = &planned {
            machine.planned_image = p.clone();
        }
        Resolved {
            machine,
            required,
            planned,
        }
    }

    /// The images the streams currently stand for (kept in the image cache).
    pub fn images(&self) -> HashSet<String> {
        let r = self.resolutions.lock().expect("streams lock");
        r.iter()
            .filter_map(|(n, res)| res.image(n).map(str::to_string))
            .collect()
    }

    /// What `name` stands for now: listed with the imageserver, skipping stream versions
    /// that have expired (each newest candidate is loaded into the image cache, which the
    /// machines following it need anyway).
    pub async fn resolve_name(
        &self,
        images: &ImageCache,
        name: &str,
    ) -> Result<Resolution, wire::client::ClientError> {
        let mut listed = images.client().list_images(Some(name)).await?;
        loop {
            listed.retain(|n| !self.expired.lock().expect("streams lock").contains(n));
            let res = model::stream::resolve(name, &listed);
            let Resolution::Stream { latest } = &res else {
                return Ok(res);
            };
            let expired = match images.get(latest).await {
                Ok(img) => model::stream::expired(img.expires_at, disk::clock::unix_now()),
                Err(crate::images::ImageError::Expired(_)) => true,
                Err(_) => false,
            };
            if !expired {
                return Ok(res);
            }
            tracing::warn!(stream = %name, image = %latest, "image expired: not followed");
            self.expired
                .lock()
                .expect("streams lock")
                .insert(latest.clone());
        }
    }

    /// Lists every name not known to be an exact image; returns whether any resolution
    /// changed (and then tells the subscribers).
    pub async fn refresh(&self, images: &ImageCache) -> bool {
        let names: Vec<String> = {
            let r = self.resolutions.lock().expect("streams lock");
            let names = self.names.lock().expect("streams lock");
            names
                .iter()
                .filter(|n| r.get(*n) != Some(&Resolution::Exact))
                .cloned()
                .collect()
        };
        let mut changed = false;
        for name in names {
            let res = match self.resolve_name(images, &name).await {
                Ok(res) => res,
                Err(e) => {
                    tracing::warn!(image = %name, "listing image stream (keeping the last resolution): {e}");
                    continue;
                }
            };
            let mut r = self.resolutions.lock().expect("streams lock");
            if !self.names.lock().expect("streams lock").contains(&name) {
                continue;
            }
            if r.get(&name) != Some(&res) {
                if let Resolution::Stream { latest } = &res {
                    tracing::info!(stream = %name, image = %latest, "image stream resolved");
                }
                r.insert(name, res);
                changed = true;
            }
        }
        if changed {
            self.changed.send_modify(|n| *n += 1);
        }
        changed
    }

    /// Waits for `period` or for the MDB to name something new.
    pub async fn wait(&self, period: std::time::Duration) {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = self.new_names.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_records_by_the_known_resolutions() {
        let s = Streams::default();
        s.set_names(["s".to_string(), "x/1".to_string()].into());
        {
            let mut r = s.resolutions.lock().unwrap();
            r.insert(
                "s".into(),
                Resolution::Stream {
                    latest: "s/2".into(),
                },
            );
            r.insert("x/1".into(), Resolution::Exact);
        }
        let mut m = mdb::Machine::new("h");
        m.required_image = "s".into();
        m.planned_image = "x/1".into();
        let got = s.resolve(&m);
        assert_eq!(got.machine.required_image, "s/2");
        assert_eq!(got.machine.planned_image, "x/1");
        assert_eq!(got.required.as_deref(), Some("s/2"));
        assert_eq!(got.planned.as_deref(), Some("x/1"));
        // Unknown names are kept as they are.
        m.required_image = "new".into();
        let got = s.resolve(&m);
        assert_eq!(got.machine.required_image, "new");
        assert_eq!(got.required, None);
        assert_eq!(
            s.images(),
            ["s/2".to_string(), "x/1".to_string()].into_iter().collect()
        );
        // Names the MDB dropped are forgotten.
        s.set_names(["x/1".to_string()].into());
        assert_eq!(s.image_for("s"), None);
    }
}
