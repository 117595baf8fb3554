//! `UpdatePlan`: what the dominator tells a subd to do (and `patch-directory` does locally).
//! Computed by `diff`, carried over the wire, executed by `apply`.

use crate::hash::ObjectId;
use crate::image::{BadId, Inode, Kind};
use crate::path::FsPath;
use crate::triggers::Triggers;
use serde::{Deserialize, Serialize};

/// A path and the inode it must become.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathInode {
    pub path: FsPath,
    pub inode: Inode,
}

/// What differs between a machine's inode and the image's at one path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aspect {
    /// Another kind of inode (a file where the image has a symlink, …).
    Kind,
    /// Content: size and hash of a file, a symlink's target, a device's numbers.
    Content,
    Mode,
    /// Owner or group.
    Owner,
    Mtime,
}

impl Aspect {
    /// Every aspect in which `have` (the machine's) differs from `want` (the image's).
    pub fn differences(have: &Inode, want: &Inode) -> Vec<Aspect> {
        if have.kind != want.kind {
            return vec![Aspect::Kind];
        }
        let mut out = Vec::new();
        if !have.same_data(want) {
            out.push(Aspect::Content);
        }
        if want.kind != crate::Kind::Symlink && have.mode != want.mode {
            out.push(Aspect::Mode);
        }
        if have.uid != want.uid || have.gid != want.gid {
            out.push(Aspect::Owner);
        }
        if want.keeps_mtime() && have.mtime != want.mtime {
            out.push(Aspect::Mtime);
        }
        out
    }

    pub fn name(self) -> &'static str {
        match self {
            Aspect::Kind => "kind",
            Aspect::Content => "content",
            Aspect::Mode => "mode",
            Aspect::Owner => "owner",
            Aspect::Mtime => "mtime",
        }
    }

    /// `content, mode, owner`.
    pub fn list(aspects: &[Aspect]) -> String {
        aspects
            .iter()
            .map(|a| a.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A path of `inodes_to_make` where the machine already holds something else: the update
/// changes it (what differs), it does not add it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replaced {
    pub path: FsPath,
    pub what: Vec<Aspect>,
}

/// An existing file on the machine whose content is needed as an object. It is always
/// copied into the cache, never hardlinked: a linked object would share its inode with a
/// file a process may still write, and staging it would change that file's owner and mode
/// before the change window. (Plans from earlier versions carry a `may_link` flag; it is
/// ignored.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyToCache {
    pub path: FsPath,
    pub hash: ObjectId,
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

/// The owner, group, mode and mtime an object will have at its last use in an update (the
/// regular file the update makes from the cache's own object): a fetch ahead of the
/// update may give them to the object as it stores it, so the update's stage finds that
/// work done. A hint: the stage checks and sets them again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalMetadata {
    pub object: ObjectId,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub mtime: crate::image::Mtime,
    /// The object's length (a fetch shares the bytes out evenly among its requests).
    #[serde(default)]
    pub size: u64,
}

impl FinalMetadata {
    /// The regular file `self` describes, for the metadata calls.
    pub fn inode(&self) -> Inode {
        let mut i = Inode::file(self.mode, self.uid, self.gid, self.mtime, self.size, None);
        i.hash = Some(self.object);
        i
    }
}

/// Everything one update does, in the order subd applies it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdatePlan {
    pub image_name: String,
    pub sparse: bool,
    /// Objects the machine has nowhere: fetch them before sending the update.
    #[serde(default)]
    pub objects_to_fetch: Vec<ObjectId>,
    /// Bytes held by `objects_to_fetch` (for the free-space check).
    #[serde(default)]
    pub fetch_bytes: u64,
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
    /// Hook programs to run around this update (only when it changes the machine).
    #[serde(default, skip_serializing_if = "crate::hooks::Hooks::is_empty")]
    pub hooks: crate::hooks::Hooks,
    /// The image the machine held before (its last applied image; empty on a blank
    /// machine), as the dominator saw it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub previous_image: String,
    /// State paths this plan seeds (the top of each seeded subtree; each is made by
    /// `dirs_to_make` or `inodes_to_make`). Made only if nothing is there at the time of
    /// the update; the machine remembers them as state for good.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeded: Vec<FsPath>,
    /// State paths of the image present on the machine whose content or metadata differ
    /// from the image's seed (or that are gone from evolved state): shown, never changed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub state_diverged: u64,
    /// The paths of `inodes_to_make` the machine already holds, with what differs there
    /// (a modified file is replaced whole, but it is a change, not an addition). Plans
    /// from earlier versions have none: their changes read as additions, as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaced: Vec<Replaced>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Why a plan is refused before anything of it is done.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("{0}: {1}")]
    BadOwner(String, BadId),
    #[error("{0}: a directory in inodes_to_make (directories are made by dirs_to_make)")]
    DirInInodesToMake(String),
    #[error("{0}: dirs_to_make holds a non-directory ({1:?})")]
    NotADirInDirsToMake(String, Kind),
    #[error("/: mode {0:04o} would let other users write the root (and replace /.subd); subd would refuse to start on it")]
    RootWritableByOthers(u32),
    #[error("/: owner uid {0} is neither root nor this process (uid {1}); subd would refuse to start on it")]
    RootOwnedByOther(u32, u32),
    #[error("{0}: listed as seeded but the plan does not make it")]
    SeededNotMade(String),
}

/// Whether a directory of this mode lets users other than its owner rename or remove its
/// entries (group or
/// other write, unless the sticky bit restricts that to each entry's owner).
pub fn writable_by_others(mode: u32) -> bool {
    mode & 0o022 != 0 && mode & 0o1000 == 0
}

impl UpdatePlan {
    /// The metadata of each fetched object's last use (the last regular file of the plan
    /// made from it), in the order of `objects_to_fetch`.
    pub fn final_metadata(&self) -> Vec<FinalMetadata> {
        let mut last = std::collections::HashMap::new();
        for pi in &self.inodes_to_make {
            if let (Kind::File, Some(h)) = (pi.inode.kind, pi.inode.hash) {
                last.insert(h, &pi.inode);
            }
        }
        self.objects_to_fetch
            .iter()
            .filter_map(|h| {
                last.get(h).map(|i| FinalMetadata {
                    object: *h,
                    uid: i.uid,
                    gid: i.gid,
                    mode: i.mode,
                    mtime: i.mtime,
                    size: i.size,
                })
            })
            .collect()
    }

    /// Checks that the plan leaves the root a directory subd still trusts when run as
    /// `euid`: owned by root or `euid`, and not writable by other users. A plan that broke
    /// this would stop subd at its next start, wedging the machine.
    pub fn check_root(&self, euid: u32) -> Result<(), PlanError> {
        let root = FsPath::root();
        for c in self.inodes_to_change.iter().filter(|c| c.path == root) {
            if writable_by_others(c.inode.mode) {
                return Err(PlanError::RootWritableByOthers(c.inode.mode & 0o7777));
            }
            if c.inode.uid != 0 && c.inode.uid != euid {
                return Err(PlanError::RootOwnedByOther(c.inode.uid, euid));
            }
        }
        Ok(())
    }

    /// Checks what `diff` always produces and `apply` relies on: directories only in
    /// `dirs_to_make`, no directory in `inodes_to_make`, and every uid and gid settable by
    /// `chown` (never `(uid_t)-1`). The first defect found is returned.
    pub fn validate(&self) -> Result<(), PlanError> {
        let owner = |pi: &Inode, path: &FsPath| {
            pi.check_owner()
                .map_err(|e| PlanError::BadOwner(path.display(), e))
        };
        for d in &self.dirs_to_make {
            if d.inode.kind != Kind::Dir {
                return Err(PlanError::NotADirInDirsToMake(
                    d.path.display(),
                    d.inode.kind,
                ));
            }
            owner(&d.inode, &d.path)?;
        }
        for i in &self.inodes_to_make {
            if i.inode.kind == Kind::Dir {
                return Err(PlanError::DirInInodesToMake(i.path.display()));
            }
            owner(&i.inode, &i.path)?;
        }
        for c in &self.inodes_to_change {
            owner(&c.inode, &c.path)?;
        }
        for p in &self.seeded {
            let made = self.dirs_to_make.iter().any(|d| d.path == *p)
                || self.inodes_to_make.iter().any(|i| i.path == *p);
            if !made {
                return Err(PlanError::SeededNotMade(p.display()));
            }
        }
        Ok(())
    }

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

/// What an update would do, in a few lines for humans (`dominator plan HOST`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanSummary {
    pub objects_to_fetch: usize,
    pub fetch_bytes: u64,
    pub files_to_copy_to_cache: usize,
    /// New names: directories, inodes and hardlinks whose path is not on the machine yet
    /// (or, in plans without `replaced`, is replaced).
    pub to_add: usize,
    /// Paths the machine holds that are replaced by a new inode (`replaced`: content or
    /// kind differ).
    pub to_replace: usize,
    /// Metadata changes (of which `mtime_only` fire no triggers).
    pub to_change: usize,
    pub mtime_only: usize,
    /// Tops of deleted subtrees.
    pub to_delete: usize,
    /// Services whose triggers the new image's set matches, in run order.
    pub services: Vec<String>,
    pub reboot: bool,
    /// State paths seeded (tops of seeded subtrees).
    pub to_seed: usize,
}

impl UpdatePlan {
    /// What differs at `path` if it is one of `inodes_to_make` the machine already holds.
    pub fn replaced_at(&self, path: &FsPath) -> Option<&[Aspect]> {
        self.replaced
            .iter()
            .find(|r| &r.path == path)
            .map(|r| r.what.as_slice())
    }

    /// One line per path, as `{:#}` shows them: `+ MODE PATH` added, `~ MODE PATH (what)`
    /// changed (`content, mode, owner, mtime`; `mtime` alone for an mtime-only change),
    /// `= PATH => TARGET` hardlinked, `- PATH` deleted.
    pub fn path_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in &self.dirs_to_make {
            out.push(format!("+ {} {}", d.inode.mode_string(), d.path.display()));
        }
        for i in &self.inodes_to_make {
            let (m, p) = (i.inode.mode_string(), i.path.display());
            out.push(match self.replaced_at(&i.path) {
                Some(what) => format!("~ {m} {p} ({})", Aspect::list(what)),
                None => format!("+ {m} {p}"),
            });
        }
        for h in &self.hardlinks_to_make {
            out.push(format!("= {} => {}", h.path.display(), h.target.display()));
        }
        for c in &self.inodes_to_change {
            let what = if c.mtime_only { " (mtime)" } else { "" };
            out.push(format!(
                "~ {} {}{what}",
                c.inode.mode_string(),
                c.path.display()
            ));
        }
        for p in &self.paths_to_delete {
            out.push(format!("- {}", p.display()));
        }
        out
    }

    /// Counts and the triggers that would fire (matched against the image's own triggers;
    /// subd also merges the previously applied image's triggers when it stops services).
    pub fn summary(&self) -> PlanSummary {
        let touched = self.touched_paths();
        let touched: Vec<&[u8]> = touched.iter().map(|p| p.as_bytes()).collect();
        let matched = self.triggers.matching(&touched);
        let mut services: Vec<String> = Vec::new();
        for t in &matched {
            if !services.contains(&t.service) {
                services.push(t.service.clone());
            }
        }
        PlanSummary {
            objects_to_fetch: self.objects_to_fetch.len(),
            fetch_bytes: self.fetch_bytes,
            files_to_copy_to_cache: self.files_to_copy_to_cache.len(),
            to_add: (self.dirs_to_make.len()
                + self.inodes_to_make.len()
                + self.hardlinks_to_make.len())
            .saturating_sub(self.replaced.len()),
            to_replace: self.replaced.len(),
            to_change: self.inodes_to_change.len(),
            mtime_only: self
                .inodes_to_change
                .iter()
                .filter(|c| c.mtime_only)
                .count(),
            to_delete: self.paths_to_delete.len(),
            services,
            reboot: matched.iter().any(|t| t.do_reboot),
            to_seed: self.seeded.len(),
        }
    }
}

impl std::fmt::Display for UpdatePlan {
    /// A summary line block, then (with `{:#}`) every path: `+` added, `~` changed,
    /// `-` deleted, `=` hardlinked.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.summary();
        let kind = if self.sparse { "sparse" } else { "full" };
        writeln!(f, "image {} ({kind})", self.image_name)?;
        if let Some(r) = &self.unsafe_reason {
            writeln!(f, "  UNSAFE: {r}")?;
        }
        if self.state_diverged > 0 {
            writeln!(
                f,
                "  state: {} paths differ from the image's seed (kept)",
                self.state_diverged
            )?;
        }
        if self.is_empty() {
            return writeln!(f, "  nothing to do");
        }
        writeln!(
            f,
            "  fetch {} objects ({} bytes), copy {} local files to the cache",
            s.objects_to_fetch, s.fetch_bytes, s.files_to_copy_to_cache
        )?;
        writeln!(
            f,
            "  add {}, change {} ({} mtime only), delete {}",
            s.to_add,
            s.to_change + s.to_replace,
            s.mtime_only,
            s.to_delete
        )?;
        if s.services.is_empty() {
            writeln!(f, "  triggers: none")?;
        } else {
            writeln!(f, "  triggers: {}", s.services.join(", "))?;
        }
        if s.reboot {
            writeln!(f, "  reboot: yes")?;
        }
        for p in &self.seeded {
            writeln!(f, "  seed {}", p.display())?;
        }
        if f.alternate() {
            for l in self.path_lines() {
                writeln!(f, "  {l}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_to_cache_from_an_earlier_version_is_read_without_its_may_link_flag() {
        let h = ObjectId::of(b"x");
        let json = format!(r#"{{"path":"/a","hash":"{}","may_link":true}}"#, h.to_hex());
        let c: CopyToCache = serde_json::from_str(&json).unwrap();
        assert_eq!(
            c,
            CopyToCache {
                path: "/a".parse().unwrap(),
                hash: h
            }
        );
        assert!(!serde_json::to_string(&c).unwrap().contains("may_link"));
    }

    fn at(path: &str, inode: Inode) -> PathInode {
        PathInode {
            path: path.parse().unwrap(),
            inode,
        }
    }

    /// A plan may not leave the root one subd would refuse at its next start.
    #[test]
    fn check_root_refuses_a_root_others_could_write_or_own() {
        let change = |mode, uid| UpdatePlan {
            inodes_to_change: vec![MetadataChange {
                path: FsPath::root(),
                inode: Inode::dir(mode, uid, 0),
                mtime_only: false,
            }],
            ..UpdatePlan::default()
        };
        change(0o755, 0).check_root(0).unwrap();
        change(0o1777, 0).check_root(0).unwrap();
        change(0o755, 1000).check_root(1000).unwrap();
        assert_eq!(
            change(0o777, 0).check_root(0).unwrap_err(),
            PlanError::RootWritableByOthers(0o777)
        );
        assert_eq!(
            change(0o755, 1000).check_root(0).unwrap_err(),
            PlanError::RootOwnedByOther(1000, 0)
        );
        // Only the root matters: other directories may be anything.
        let mut p = change(0o755, 0);
        p.inodes_to_change[0].path = "/srv".parse().unwrap();
        p.inodes_to_change[0].inode.mode = 0o777;
        p.check_root(0).unwrap();
    }

    #[test]
    fn validate_refuses_directories_out_of_place_and_unsettable_owners() {
        let ok = UpdatePlan {
            dirs_to_make: vec![at("/d", Inode::dir(0o755, 0, 0))],
            inodes_to_make: vec![at("/d/l", Inode::symlink(0, 0, "x"))],
            ..UpdatePlan::default()
        };
        ok.validate().unwrap();

        let mut p = ok.clone();
        p.inodes_to_make.push(at("/e", Inode::dir(0o755, 0, 0)));
        assert_eq!(
            p.validate().unwrap_err().to_string(),
            "/e: a directory in inodes_to_make (directories are made by dirs_to_make)"
        );

        let mut p = ok.clone();
        p.dirs_to_make.push(at("/f", Inode::symlink(0, 0, "x")));
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("/f: dirs_to_make"));

        let mut p = ok.clone();
        p.inodes_to_make[0].inode.uid = u32::MAX;
        assert_eq!(
            p.validate().unwrap_err().to_string(),
            "/d/l: uid 4294967295 is (uid_t)-1, which chown reads as \"leave unchanged\""
        );

        let mut p = ok.clone();
        p.inodes_to_change.push(MetadataChange {
            path: "/d".parse().unwrap(),
            inode: Inode::dir(0o755, 0, u32::MAX),
            mtime_only: false,
        });
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("/d: gid 4294967295"));

        let mut p = ok;
        p.dirs_to_make[0].inode.gid = u32::MAX;
        assert!(p.validate().is_err());
    }

    /// Each fetched object's hint is its last use's metadata; objects not fetched get none.
    #[test]
    fn final_metadata_is_each_fetched_objects_last_use() {
        let (a, b, c) = (ObjectId::of(b"a"), ObjectId::of(b"b"), ObjectId::of(b"c"));
        let t = |sec| crate::image::Mtime { sec, nsec: 7 };
        let file = |mode, uid, sec, h| Inode::file(mode, uid, uid, t(sec), 1, Some(h));
        let plan = UpdatePlan {
            objects_to_fetch: vec![b, a],
            inodes_to_make: vec![
                at("/a1", file(0o600, 1, 10, a)),
                at("/b", file(0o755, 2, 20, b)),
                at("/a2", file(0o4755, 3, 30, a)),
                at("/c", file(0o644, 4, 40, c)),
                at("/l", Inode::symlink(0, 0, "a1")),
            ],
            ..UpdatePlan::default()
        };
        let hint = |object, mode, uid, sec| FinalMetadata {
            object,
            uid,
            gid: uid,
            mode,
            mtime: t(sec),
            size: 1,
        };
        assert_eq!(
            plan.final_metadata(),
            [hint(b, 0o755, 2, 20), hint(a, 0o4755, 3, 30)]
        );
        assert_eq!(plan.final_metadata()[1].inode().mode, 0o4755);
    }
}
