//! The one place the dominator computes an `UpdatePlan` for a machine, and the few pure
//! helpers around it (objects a planned image still needs, cache objects no longer needed).
//!
//! `compute` calls the shared `model::diff` with the safety check always evaluated
//! (`allow_unsafe: false`): the decision, not the diff, applies the MDB tag
//! `DisableSafetyCheck`, so the status page can say why an update was held.

use model::diff::{diff, DiffOptions, Machine};
use model::filter::Filter;
use model::{FileTree, Image, ObjectId, UpdatePlan};
use std::collections::{BTreeSet, HashSet};

/// The plan that brings `tree` (the machine's last scan, with object `cache`) to `image`,
/// never touching paths matched by the image's filter or the subd's `exclusions`, and
/// leaving alone the state the machine holds (its `seeded` paths and the image's state
/// lines that something occupies).
pub fn compute(
    image_name: &str,
    image: &Image,
    tree: &FileTree,
    cache: &[ObjectId],
    exclusions: &[String],
    hidden_parents: &[model::FsPath],
    seeded: &[model::FsPath],
) -> UpdatePlan {
    let exclusions = (!exclusions.is_empty())
        .then(|| Filter::from_lines(exclusions.to_vec()).ok())
        .flatten();
    let cache: BTreeSet<ObjectId> = cache.iter().copied().collect();
    let machine = Machine {
        tree,
        object_cache: &cache,
        exclusions: exclusions.as_ref(),
        hidden_parents,
        seeded,
    };
    diff(
        image_name,
        image,
        &machine,
        &DiffOptions {
            allow_unsafe: false,
        },
    )
}

/// Gives a computed `plan` for `image` the machine's `previous_image` and, when it changes
/// the machine, the image's hooks (and the hook objects the `cache` lacks to fetch).
pub fn attach_hooks(
    plan: &mut UpdatePlan,
    image: &Image,
    previous_image: Option<&str>,
    cache: &[ObjectId],
) {
    let cache: BTreeSet<ObjectId> = cache.iter().copied().collect();
    model::hooks::attach(plan, &image.hooks, previous_image, &cache);
}

/// Objects in the machine's `cache` that none of `wanted` needs (what `Subd.Cleanup` may
/// remove once the machine is in sync).
pub fn unneeded_cache(cache: &[ObjectId], wanted: &[std::sync::Arc<Image>]) -> Vec<ObjectId> {
    let needed: HashSet<ObjectId> = wanted
        .iter()
        .flat_map(|i| i.objects().into_keys())
        .collect();
    cache
        .iter()
        .filter(|h| !needed.contains(h))
        .copied()
        .collect()
}

/// Objects `image` needs that the machine has neither in its cache nor in any file.
pub fn missing_objects(image: &Image, tree: &FileTree, cache: &[ObjectId]) -> Vec<ObjectId> {
    let mut have: HashSet<ObjectId> = cache.iter().copied().collect();
    have.extend(tree.inodes.values().filter_map(|i| i.hash));
    image
        .objects()
        .into_keys()
        .filter(|h| !have.contains(h))
        .collect()
}
