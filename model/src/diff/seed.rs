//! The state part of the diff (use-ephemeral's stateful paths): which image paths are
//! seeded, which are left alone, and how many differ from their seed.
//!
//! A *state root* is a path matching one of the image's state lines, or one the machine
//! recorded as seeded (so a later image that drops the line still leaves it alone). Every
//! path at or beneath a state root is state. An image path is seeded when its nearest
//! state root (itself or an ancestor) is absent from the machine: the root and its subtree
//! are made as the image has them. When that root is present, the path is left alone:
//! never made, changed or deleted; only compared, to count divergence. Missing parents of a
//! seeded path are made with the image's metadata. Machine paths at or beneath a state
//! root are never compared, changed or deleted.

use super::prune;
use crate::image::FileTree;
use crate::path::FsPath;
use crate::state::StateLines;
use std::collections::{BTreeSet, HashMap, HashSet};

/// Which paths are state roots.
pub(super) struct Roots<'a> {
    lines: Option<&'a StateLines>,
    recorded: BTreeSet<&'a FsPath>,
}

impl<'a> Roots<'a> {
    pub(super) fn new(lines: Option<&'a StateLines>, recorded: &'a [FsPath]) -> Roots<'a> {
        Roots {
            lines: lines.filter(|l| !l.lines().is_empty()),
            recorded: recorded.iter().collect(),
        }
    }

    /// True when no path can be state (the diff then skips this module).
    pub(super) fn is_empty(&self) -> bool {
        self.lines.is_none() && self.recorded.is_empty()
    }

    fn is_root(&self, p: &FsPath) -> bool {
        !p.is_root() && (self.recorded.contains(p) || self.lines.is_some_and(|l| l.matches(p)))
    }
}

/// The two sides of the diff without the state it leaves alone, and what it seeds.
pub(super) struct Split {
    pub want: FileTree,
    pub have: FileTree,
    /// Tops of the seeded subtrees.
    pub seeded: Vec<FsPath>,
    /// Image state paths under a present root that differ from the machine's (or are gone).
    pub diverged: u64,
}

/// Where an image path stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Not state: diffed as usual.
    Managed,
    /// State whose root is absent: made from the image.
    Seed,
    /// State whose root is present: left alone.
    Kept,
}

/// Splits `want` (the image, already filtered) and `have` (the machine, already filtered)
/// by the state roots; `all` is the whole polled tree (what is present).
pub(super) fn split(roots: &Roots<'_>, want: FileTree, have: &FileTree, all: &FileTree) -> Split {
    let classes = classify(roots, &want, all);
    let mut keep: HashSet<&FsPath> = HashSet::new();
    let mut seeded = Vec::new();
    let mut diverged = 0u64;
    for (p, class) in &classes {
        match class {
            Class::Managed => {
                keep.insert(p);
            }
            Class::Seed => {
                keep.insert(p);
                let parent_seeded = p
                    .parent()
                    .is_some_and(|q| classes.get(&q) == Some(&Class::Seed));
                if !parent_seeded {
                    seeded.push(p.clone());
                }
            }
            Class::Kept => {
                let same = match (all.get(p), want.get(p)) {
                    (Some(h), Some(w)) => h.same_data(w) && h.same_metadata(w),
                    _ => false,
                };
                if !same {
                    diverged += 1;
                }
            }
        }
    }
    // Missing parents of seeded paths beneath a present root are made too.
    for s in &seeded {
        let mut a = s.parent();
        while let Some(q) = a {
            if classes.get(&q) != Some(&Class::Kept) || all.entries.contains_key(&q) {
                break;
            }
            if keep.insert(classes.get_key_value(&q).expect("classified").0) {
                diverged = diverged.saturating_sub(1);
            }
            a = q.parent();
        }
    }
    seeded.sort();
    Split {
        want: subset(&want, &keep),
        have: prune(have, |p| roots.is_root(p)),
        seeded,
        diverged,
    }
}

/// Each image path's class, from its nearest state root (parents come first in path order).
fn classify(roots: &Roots<'_>, want: &FileTree, all: &FileTree) -> HashMap<FsPath, Class> {
    let mut nearest: HashMap<&FsPath, Option<&FsPath>> = HashMap::new();
    let mut classes = HashMap::new();
    for p in want.entries.keys() {
        let root = if roots.is_root(p) {
            Some(p)
        } else {
            p.parent()
                .and_then(|q| nearest.get_key_value(&q).and_then(|(_, r)| *r))
        };
        nearest.insert(p, root);
        let class = match root {
            None => Class::Managed,
            Some(r) if all.entries.contains_key(r) => Class::Kept,
            Some(_) => Class::Seed,
        };
        classes.insert(p.clone(), class);
    }
    classes
}

/// The paths of `tree` in `keep`, with their inodes.
fn subset(tree: &FileTree, keep: &HashSet<&FsPath>) -> FileTree {
    let mut out = FileTree::default();
    for (p, ino) in &tree.entries {
        if keep.contains(p) {
            out.entries.insert(p.clone(), *ino);
            if let Some(i) = tree.inodes.get(ino) {
                out.inodes.insert(*ino, i.clone());
            }
        }
    }
    out
}
