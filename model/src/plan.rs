//! `UpdatePlan`: what the dominator tells a subd to do (and `patch-directory` does locally).
//! Computed by `diff`, carried over the wire, executed by `apply`.

use crate::hash::ObjectId;
use crate::image::Inode;
use crate::path::FsPath;
use crate::triggers::Triggers;
use serde::{Deserialize, Serialize};

/// A path and the inode it must become.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathInode {
    pub path: FsPath,
    pub inode: Inode,
}

/// An existing file on the machine whose content is needed as an object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyToCache {
    pub path: FsPath,
    pub hash: ObjectId,
    /// Every link of the file is going away, so it may be moved (hardlinked) instead of copied.
    #[serde(default)]
    pub may_link: bool,
}

/// A new name for an inode that the update makes (or that exists) at `target`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardlink {
    pub path: FsPath,
    pub target: FsPath,
}

/// A metadata-only change to an existing inode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataChange {
    pub path: FsPath,
    pub inode: Inode,
    /// Only the mtime differs (such changes fire no triggers).
    #[serde(default)]
    pub mtime_only: bool,
}

/// Everything one update does, in the order subd applies it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdatePlan {
    pub image_name: String,
    pub sparse: bool,
    /// Objects the machine has nowhere: fetch them before sending the update.
    #[serde(default)]
    pub objects_to_fetch: Vec<ObjectId>,
    #[serde(default)]
    pub files_to_copy_to_cache: Vec<CopyToCache>,
    #[serde(default)]
    pub dirs_to_make: Vec<PathInode>,
    /// Non-directory inodes to create: regular files from cache objects (by `hash`),
    /// empty files, symlinks, devices, FIFOs.
    #[serde(default)]
    pub inodes_to_make: Vec<PathInode>,
    #[serde(default)]
    pub hardlinks_to_make: Vec<Hardlink>,
    /// Paths removed with everything beneath them.
    #[serde(default)]
    pub paths_to_delete: Vec<FsPath>,
    #[serde(default)]
    pub inodes_to_change: Vec<MetadataChange>,
    /// The image's triggers (the "new set").
    #[serde(default)]
    pub triggers: Triggers,
    /// Set when the safety check refuses this plan.
    #[serde(default)]
    pub unsafe_reason: Option<String>,
}

impl UpdatePlan {
    /// True when the machine already matches (nothing to fetch or change).
    pub fn is_empty(&self) -> bool {
        self.objects_to_fetch.is_empty()
            && self.files_to_copy_to_cache.is_empty()
            && self.dirs_to_make.is_empty()
            && self.inodes_to_make.is_empty()
            && self.hardlinks_to_make.is_empty()
            && self.paths_to_delete.is_empty()
            && self.inodes_to_change.is_empty()
    }

    /// Paths the update touches, for trigger matching (mtime-only changes excluded;
    /// deleted paths only at their top).
    pub fn touched_paths(&self) -> Vec<FsPath> {
        let mut v: Vec<FsPath> = Vec::new();
        v.extend(self.dirs_to_make.iter().map(|p| p.path.clone()));
        v.extend(self.inodes_to_make.iter().map(|p| p.path.clone()));
        v.extend(self.hardlinks_to_make.iter().map(|h| h.path.clone()));
        v.extend(self.paths_to_delete.iter().cloned());
        v.extend(
            self.inodes_to_change
                .iter()
                .filter(|c| !c.mtime_only)
                .map(|c| c.path.clone()),
        );
        v.sort();
        v.dedup();
        v
    }
}
