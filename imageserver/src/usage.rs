//! What the status page says about each image: its size, object count and unique bytes
//! (`Catalogue::image_usage`, cached until the set of images changes: images are
//! immutable and names never reused), and which MDB records use it when the server is
//! given the MDB (`--mdb PATH`, read-only, read again when its inode, size or mtime
//! changes).

use crate::catalogue::{Catalogue, ImageUsage};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;

/// Image usage figures for one set of live images.
#[derive(Default)]
pub struct UsageCache {
    names: Vec<String>,
    rows: BTreeMap<String, ImageUsage>,
}

impl UsageCache {
    /// The figures of `names` (the live images now), recomputed when the set changed.
    /// Blocking: reads every image file after a change.
    pub fn rows(
        cache: &Mutex<UsageCache>,
        catalogue: &Catalogue,
        names: &[String],
    ) -> BTreeMap<String, ImageUsage> {
        if let Some(c) = cache.lock().ok().filter(|c| c.names == names) {
            return c.rows.clone();
        }
        let mut rows = BTreeMap::new();
        for n in names {
            let Ok(name) = model::ImageName::parse(n) else {
                continue;
            };
            match catalogue.image_usage(&name) {
                Ok(u) => {
                    rows.insert(n.clone(), u);
                }
                Err(e) => tracing::warn!(image = %n, "status page: {e}"),
            }
        }
        if let Ok(mut c) = cache.lock() {
            c.names = names.to_vec();
            c.rows = rows.clone();
        }
        rows
    }
}

/// Which MDB records use an image: `host` or `host (planned)`.
pub type Users = BTreeMap<String, Vec<String>>;

/// Why the MDB could not be read (kept as its one line: the result of a read is cached
/// until the file changes).
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct MdbUnreadable(pub String);

/// What identifies one version of the MDB file: inode, size, mtime (s, ns).
type FileKey = (u64, u64, i64, i64);

/// The MDB as the status page reads it.
pub struct MdbUsers {
    path: PathBuf,
    /// The file last read, and what it said.
    last: Mutex<Option<(FileKey, Result<Users, MdbUnreadable>)>>,
}

impl MdbUsers {
    pub fn new(path: PathBuf) -> MdbUsers {
        MdbUsers {
            path,
            last: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The users of each image, from the MDB as it is now (read again only when the file
    /// changed); `Err` says why it cannot be read. Blocking.
    pub fn users(&self) -> Result<Users, MdbUnreadable> {
        let key = std::fs::metadata(&self.path)
            .map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
            .map_err(|e| MdbUnreadable(format!("{}: {e}", self.path.display())))?;
        let mut last = self.last.lock().map_err(|e| MdbUnreadable(e.to_string()))?;
        if let Some((k, users)) = last.as_ref() {
            if *k == key {
                return users.clone();
            }
        }
        let users = mdb::load(&self.path)
            .map(|m| users_of(&m))
            .map_err(|e| MdbUnreadable(e.to_string()));
        *last = Some((key, users.clone()));
        users
    }
}

/// Image → the records requiring it (`host`) or planning it (`host (planned)`).
pub fn users_of(m: &mdb::Mdb) -> Users {
    let mut u = Users::new();
    for machine in m.machines() {
        if !machine.required_image.is_empty() {
            u.entry(machine.required_image.clone())
                .or_default()
                .push(machine.hostname.clone());
        }
        if !machine.planned_image.is_empty() && machine.planned_image != machine.required_image {
            u.entry(machine.planned_image.clone())
                .or_default()
                .push(format!("{} (planned)", machine.hostname));
        }
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_name_required_and_planned_images() {
        let m = mdb::Mdb::parse(
            r#"[{"Hostname":"a","RequiredImage":"app/1","PlannedImage":"app/2"},
                 {"Hostname":"b","RequiredImage":"app/1","PlannedImage":"app/1"},
                 {"Hostname":"c"}]"#,
        )
        .unwrap();
        let u = users_of(&m);
        assert_eq!(u["app/1"], ["a", "b"]);
        assert_eq!(u["app/2"], ["a (planned)"]);
        assert_eq!(u.len(), 2);
    }
}
