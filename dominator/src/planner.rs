//! The one place the dominator computes an `UpdatePlan` for a machine, and the few pure
//! helpers around it (objects a planned image still needs, cache objects no longer needed).
//!
//! INTERIM: until the shared `model::diff` is merged, `compute` holds a simplified diff
//! (create/replace/metadata/delete, objects to fetch or copy from existing files, the
//! safety check). It handles hardlinks only by making later names links to the first one.
//! When `model::diff` lands, `compute` becomes a call to it and this body goes.

use model::filter::Filter;
use model::path::FsPath;
use model::plan::{CopyToCache, Hardlink, MetadataChange, PathInode};
use model::{FileTree, Image, Kind, ObjectId, UpdatePlan};
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// The plan that brings `tree` (the machine's last scan, with object `cache`) to `image`,
/// never touching paths matched by the image's filter or the subd's `exclusions`.
pub fn compute(
    image_name: &str,
    image: &Image,
    tree: &FileTree,
    cache: &[ObjectId],
    exclusions: &[String],
) -> UpdatePlan {
    let excluded = Filter::from_lines(exclusions.to_vec()).unwrap_or_else(|_| Filter::empty());
    let skip = |p: &FsPath| {
        !p.is_root() && (excluded.matches(p) || image.filter.as_ref().is_some_and(|f| f.matches(p)))
    };
    let mut plan = UpdatePlan {
        image_name: image_name.to_string(),
        sparse: image.is_sparse(),
        triggers: image.triggers.clone(),
        ..UpdatePlan::default()
    };
    let cache: HashSet<ObjectId> = cache.iter().copied().collect();
    let mut on_machine: BTreeMap<ObjectId, FsPath> = BTreeMap::new();
    for (p, ino) in &tree.entries {
        if let Some(h) = tree.inodes.get(ino).and_then(|i| i.hash) {
            on_machine.entry(h).or_insert_with(|| p.clone());
        }
    }
    let mut made: BTreeMap<u64, FsPath> = BTreeMap::new();
    let mut fetch: BTreeSet<ObjectId> = BTreeSet::new();
    let mut copy: BTreeMap<ObjectId, FsPath> = BTreeMap::new();
    let mut skipped_dir: Option<FsPath> = None;
    for (path, ino) in &image.tree.entries {
        if let Some(d) = &skipped_dir {
            if path.starts_with(d) {
                continue;
            }
        }
        if skip(path) {
            skipped_dir = Some(path.clone());
            continue;
        }
        let want = &image.tree.inodes[ino];
        let have = tree.get(path);
        if want.kind == Kind::Dir {
            match have {
                Some(h) if h.kind == Kind::Dir && h.same_metadata(want) => {}
                Some(h) if h.kind == Kind::Dir => plan.inodes_to_change.push(MetadataChange {
                    path: path.clone(),
                    inode: want.clone(),
                    mtime_only: false,
                }),
                _ => plan.dirs_to_make.push(PathInode {
                    path: path.clone(),
                    inode: want.clone(),
                }),
            }
            continue;
        }
        if let Some(h) = have {
            if h.same_data(want) {
                if !h.same_metadata(want) {
                    let mtime_only = h.uid == want.uid && h.gid == want.gid && h.mode == want.mode;
                    plan.inodes_to_change.push(MetadataChange {
                        path: path.clone(),
                        inode: want.clone(),
                        mtime_only,
                    });
                }
                made.entry(*ino).or_insert_with(|| path.clone());
                continue;
            }
        }
        if let Some(first) = made.get(ino) {
            plan.hardlinks_to_make.push(Hardlink {
                path: path.clone(),
                target: first.clone(),
            });
            continue;
        }
        made.insert(*ino, path.clone());
        if let Some(h) = want.hash {
            if !cache.contains(&h) {
                match on_machine.get(&h) {
                    Some(src) => {
                        copy.entry(h).or_insert_with(|| src.clone());
                    }
                    None => {
                        fetch.insert(h);
                    }
                }
            }
        }
        plan.inodes_to_make.push(PathInode {
            path: path.clone(),
            inode: want.clone(),
        });
    }
    if !image.is_sparse() {
        let mut deleted: Option<FsPath> = None;
        for path in tree.entries.keys() {
            if let Some(d) = &deleted {
                if path.starts_with(d) {
                    continue;
                }
            }
            if path.is_root() || skip(path) {
                if skip(path) {
                    deleted = Some(path.clone());
                }
                continue;
            }
            if image.tree.entries.contains_key(path) {
                continue;
            }
            plan.paths_to_delete.push(path.clone());
            deleted = Some(path.clone());
        }
        let (have, want) = (tree.inodes.len(), image.tree.inodes.len());
        let doomed = plan
            .paths_to_delete
            .iter()
            .map(|p| {
                tree.entries
                    .range(p.clone()..)
                    .take_while(|(q, _)| q.starts_with(p))
                    .count()
            })
            .sum::<usize>();
        if want * 2 < have {
            plan.unsafe_reason = Some(format!(
                "the image has {want} inodes, fewer than half the machine's {have}"
            ));
        } else if doomed * 2 > have {
            plan.unsafe_reason = Some(format!(
                "the update deletes {doomed} of the machine's {have} paths"
            ));
        }
    }
    plan.objects_to_fetch = fetch.into_iter().collect();
    plan.files_to_copy_to_cache = copy
        .into_iter()
        .map(|(hash, path)| CopyToCache {
            path,
            hash,
            may_link: false,
        })
        .collect();
    plan
}

/// Objects `image` needs that the machine has neither in its cache nor in any file.
pub fn missing_objects(image: &Image, tree: &FileTree, cache: &[ObjectId]) -> Vec<ObjectId> {
    let mut have: HashSet<ObjectId> = cache.iter().copied().collect();
    have.extend(tree.inodes.values().filter_map(|i| i.hash));
    image
        .tree
        .objects()
        .into_keys()
        .filter(|h| !have.contains(h))
        .collect()
}
