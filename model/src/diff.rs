//! The diff, shared by the dominator and `patch-directory`: a pure function from (the
//! required image, the machine's polled tree, its object cache, its scan exclusions) to the
//! `UpdatePlan` that makes the machine match the image.
//!
//! Rules (Dominator §2, §7.3): the image's own filter is applied to both trees; filtered,
//! excluded and `/.subd` paths are never compared, made or deleted. Directories are
//! compared by metadata only. Every other image inode is matched to at most one machine
//! inode with the same data (the "keeper"), which then gets at most a metadata change;
//! its other names become hardlinks to it, so hardlink groups join and split without
//! perpetual re-updates. Inodes with no keeper are made anew, from the object cache, from an
//! identical file elsewhere on the machine (copied to the cache first), or from fetched
//! objects. Full images delete what they lack (only the top of each deleted subtree); a full
//! image that would delete more than half of the machine, or that has fewer than half as
//! many inodes, is refused unless the caller allows unsafe updates. State paths (`seed`)
//! are made only where absent, and never changed or deleted.

use crate::filter::Filter;
use crate::hash::ObjectId;
use crate::image::{FileTree, Image, Inode, Kind};
use crate::path::FsPath;
use crate::path::SUBD_DIR;
use crate::plan::{Aspect, CopyToCache, Hardlink, MetadataChange, PathInode, Replaced, UpdatePlan};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Paths subd always treats as excluded: they record which image a machine was installed
/// from and last patched to, and an image must never fight over them.
pub const ALWAYS_EXCLUDED: [&str; 2] = ["/var/lib/initial-image", "/var/lib/patched-image"];

/// True for a path no update may touch: `/.subd` and beneath, the always-excluded paths,
/// and whatever the machine's scan exclusions match.
pub fn is_protected(path: &FsPath, exclusions: Option<&Filter>) -> bool {
    let (p, subd) = (path.as_bytes(), SUBD_DIR.as_bytes());
    let under_subd = p.starts_with(subd) && (p.len() == subd.len() || p[subd.len()] == b'/');
    under_subd
        || ALWAYS_EXCLUDED
            .iter()
            .any(|p| path.as_bytes() == p.as_bytes())
        || exclusions.is_some_and(|f| !path.is_root() && f.matches(path))
}

/// What the diff knows about the machine.
#[derive(Clone, Copy, Debug)]
pub struct Machine<'a> {
    /// The polled tree (already without `/.subd` and excluded paths).
    pub tree: &'a FileTree,
    /// Objects in the machine's object cache.
    pub object_cache: &'a BTreeSet<ObjectId>,
    /// The machine's scan exclusions.
    pub exclusions: Option<&'a Filter>,
    /// Directories holding entries the machine's scan left out (`scan::Scan`); kept by a
    /// full image. Empty when unknown.
    pub hidden_parents: &'a [FsPath],
    /// State paths the machine recorded as seeded (`seed`): state for good, whatever later
    /// images say. Empty when none.
    pub seeded: &'a [FsPath],
}

/// Knobs of the diff.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiffOptions {
    /// Skip the safety check (`unsafe_reason` stays `None`).
    pub allow_unsafe: bool,
}

/// Removes every path `hidden` says yes to, with its subtree (the root is always kept).
fn prune(tree: &FileTree, hidden: impl Fn(&FsPath) -> bool) -> FileTree {
    let mut out = FileTree::default();
    let mut dropped: Option<FsPath> = None;
    for (p, ino) in &tree.entries {
        if let Some(d) = &dropped {
            if p.starts_with(d) {
                continue;
            }
        }
        if !p.is_root() && hidden(p) {
            dropped = Some(p.clone());
            continue;
        }
        out.entries.insert(p.clone(), *ino);
        if let Some(i) = tree.inodes.get(ino) {
            out.inodes.insert(*ino, i.clone());
        }
    }
    out
}

fn mtime_only(have: &Inode, want: &Inode) -> bool {
    want.keeps_mtime()
        && have.uid == want.uid
        && have.gid == want.gid
        && have.mode == want.mode
        && have.mtime != want.mtime
}

/// Computes the plan that makes `machine` match `image`: directories, then one keeper or a
/// new inode per image inode, then where new objects come from, then deletions (full
/// images), then the safety check.
pub fn diff(
    image_name: &str,
    image: &Image,
    machine: &Machine<'_>,
    opts: &DiffOptions,
) -> UpdatePlan {
    let sides = Sides::new(image, machine);
    let mut plan = UpdatePlan {
        image_name: image_name.to_string(),
        sparse: !sides.full,
        triggers: image.triggers.clone(),
        seeded: sides.seeded.clone(),
        state_diverged: sides.diverged,
        ..UpdatePlan::default()
    };
    plan_dirs(&sides, &mut plan);
    let kept = plan_inodes(&sides, &mut plan);
    plan_objects(&sides, machine.object_cache, &kept, &mut plan);
    if sides.full {
        let deleted = plan_deletions(&sides, machine.hidden_parents, &mut plan);
        if !opts.allow_unsafe {
            plan.unsafe_reason = safety_check(&sides, deleted);
        }
    }
    plan
}

/// The two trees a diff compares, without the paths it never touches, and the whole
/// polled tree (filtered paths included: they count as links that survive the update).
struct Sides<'a> {
    want: FileTree,
    have: FileTree,
    all: &'a FileTree,
    /// Every machine inode's names, over the whole polled tree.
    all_links: BTreeMap<u64, Vec<FsPath>>,
    /// A full image (it has a filter): deletes what it lacks.
    full: bool,
    /// Tops of the state subtrees this diff seeds (`seed`).
    seeded: Vec<FsPath>,
    /// State paths differing from their seed.
    diverged: u64,
}

impl<'a> Sides<'a> {
    /// Prunes both trees of what the image's filter and the machine's exclusions hide, and
    /// of the state left alone (`seed`).
    fn new(image: &Image, machine: &Machine<'a>) -> Sides<'a> {
        let filter = image.filter.as_ref();
        let hidden = |p: &FsPath| {
            is_protected(p, machine.exclusions) || filter.is_some_and(|f| f.matches(p))
        };
        let (want, have) = (prune(&image.tree, hidden), prune(machine.tree, hidden));
        let roots = seed::Roots::new(image.state.as_ref(), machine.seeded);
        let split = if roots.is_empty() {
            seed::Split {
                want,
                have,
                seeded: Vec::new(),
                diverged: 0,
            }
        } else {
            seed::split(&roots, want, &have, machine.tree)
        };
        Sides {
            want: split.want,
            have: split.have,
            all: machine.tree,
            all_links: machine.tree.links(),
            full: filter.is_some(),
            seeded: split.seeded,
            diverged: split.diverged,
        }
    }

    /// True for a managed machine path the (full) image lacks.
    fn deleted(&self, q: &FsPath) -> bool {
        self.full && self.have.entries.contains_key(q) && !self.want.entries.contains_key(q)
    }
}

/// What the inode phase decided: the machine inodes kept, and the inodes made anew.
struct Kept {
    claimed: HashSet<u64>,
    made: Vec<(FsPath, Inode)>,
}

/// Directories: compared by metadata; anything else in the way is replaced.
fn plan_dirs(s: &Sides<'_>, plan: &mut UpdatePlan) {
    for (p, ino) in &s.want.entries {
        let wi = &s.want.inodes[ino];
        if wi.kind != Kind::Dir {
            continue;
        }
        match s.have.get(p) {
            Some(hi) if hi.kind == Kind::Dir => {
                if !hi.same_metadata(wi) {
                    plan.inodes_to_change.push(MetadataChange {
                        path: p.clone(),
                        inode: wi.clone(),
                        mtime_only: false,
                    });
                }
            }
            _ => plan.dirs_to_make.push(PathInode {
                path: p.clone(),
                inode: wi.clone(),
            }),
        }
    }
}

/// Non-directory inodes: one keeper per image inode (at most a metadata change), or a new
/// inode; every other name of the image inode becomes a hardlink to it.
fn plan_inodes(s: &Sides<'_>, plan: &mut UpdatePlan) -> Kept {
    let want_links = s.want.links();
    let mut order: Vec<(&FsPath, u64)> = want_links
        .iter()
        .filter(|(ino, _)| s.want.inodes[ino].kind != Kind::Dir)
        .map(|(ino, paths)| (&paths[0], *ino))
        .collect();
    order.sort();
    let mut kept = Kept {
        claimed: HashSet::new(),
        made: Vec::new(),
    };
    for (_, wino) in order {
        let wi = &s.want.inodes[&wino];
        let paths = &want_links[&wino];
        let keeper = find_keeper(s, wi, paths, &kept.claimed);
        let target = match keeper {
            Some((kp, hino)) => {
                kept.claimed.insert(hino);
                let hi = &s.have.inodes[&hino];
                if !hi.same_metadata(wi) {
                    plan.inodes_to_change.push(MetadataChange {
                        path: kp.clone(),
                        inode: wi.clone(),
                        mtime_only: mtime_only(hi, wi),
                    });
                }
                kp.clone()
            }
            None => {
                if let Some(hi) = s.have.get(&paths[0]) {
                    plan.replaced.push(Replaced {
                        path: paths[0].clone(),
                        what: Aspect::differences(hi, wi),
                    });
                }
                plan.inodes_to_make.push(PathInode {
                    path: paths[0].clone(),
                    inode: wi.clone(),
                });
                kept.made.push((paths[0].clone(), wi.clone()));
                paths[0].clone()
            }
        };
        let keeper_ino = keeper.map(|(_, h)| h);
        for p in paths {
            if *p == target {
                continue;
            }
            if keeper_ino.is_some() && s.have.entries.get(p).copied() == keeper_ino {
                continue;
            }
            plan.hardlinks_to_make.push(Hardlink {
                path: p.clone(),
                target: target.clone(),
            });
        }
    }
    kept
}

/// The first unclaimed machine inode at one of `paths` holding `wi`'s data whose metadata
/// may change without reaching a name that outlives the update.
fn find_keeper<'p>(
    s: &Sides<'_>,
    wi: &Inode,
    paths: &'p [FsPath],
    claimed: &HashSet<u64>,
) -> Option<(&'p FsPath, u64)> {
    let path_set: BTreeSet<&FsPath> = paths.iter().collect();
    for p in paths {
        let Some(&hino) = s.have.entries.get(p) else {
            continue;
        };
        let hi = &s.have.inodes[&hino];
        if claimed.contains(&hino) || !hi.same_data(wi) {
            continue;
        }
        // A metadata change must not reach a name that outlives the update.
        let keepable = hi.same_metadata(wi)
            || s.all_links[&hino]
                .iter()
                .all(|q| path_set.contains(q) || s.want.entries.contains_key(q) || s.deleted(q));
        if keepable {
            return Some((p, hino));
        }
    }
    None
}

/// Objects for new inodes: the cache, else an identical file on the machine, else fetch.
fn plan_objects(
    s: &Sides<'_>,
    object_cache: &BTreeSet<ObjectId>,
    kept: &Kept,
    plan: &mut UpdatePlan,
) {
    let mut by_hash: HashMap<ObjectId, u64> = HashMap::new();
    for (ino, i) in &s.all.inodes {
        if let (Kind::File, Some(h)) = (i.kind, i.hash) {
            by_hash.entry(h).or_insert(*ino);
        }
    }
    let mut arranged: BTreeSet<ObjectId> = BTreeSet::new();
    let mut fetch: BTreeMap<ObjectId, u64> = BTreeMap::new();
    for (_, i) in &kept.made {
        let (Kind::File, Some(h)) = (i.kind, i.hash) else {
            continue;
        };
        if object_cache.contains(&h) || !arranged.insert(h) {
            continue;
        }
        match by_hash.get(&h) {
            Some(hino) => {
                plan.files_to_copy_to_cache.push(CopyToCache {
                    path: s.all_links[hino][0].clone(),
                    hash: h,
                });
            }
            None => {
                fetch.insert(h, i.size);
            }
        }
    }
    plan.fetch_bytes = fetch.values().sum();
    plan.objects_to_fetch = fetch.into_keys().collect();
}

/// Deletions (full images only): the top of each subtree the image lacks. A directory
/// holding filtered or excluded names is kept and only its managed contents go. Returns
/// how many managed machine paths go, subtrees counted whole.
fn plan_deletions(s: &Sides<'_>, hidden_parents: &[FsPath], plan: &mut UpdatePlan) -> usize {
    let holds_hidden = dirs_holding_hidden(s, hidden_parents);
    let mut deleted_count = 0usize;
    let mut skip: Option<FsPath> = None;
    for (p, hino) in &s.have.entries {
        if let Some(sk) = &skip {
            if p.starts_with(sk) {
                if !s.want.entries.contains_key(p) {
                    deleted_count += 1;
                }
                continue;
            }
        }
        match s.want.get(p) {
            Some(wi) => {
                // A directory replaced by a non-directory takes its subtree with it.
                if s.have.inodes[hino].kind == Kind::Dir && wi.kind != Kind::Dir {
                    skip = Some(p.clone());
                }
            }
            None => {
                if s.have.inodes[hino].kind == Kind::Dir && holds_hidden.contains(p) {
                    continue;
                }
                deleted_count += 1;
                plan.paths_to_delete.push(p.clone());
                skip = Some(p.clone());
            }
        }
    }
    deleted_count
}

/// Directories holding names the filter or exclusions hide, here or on the machine (where
/// the scan never reported them), and their ancestors.
fn dirs_holding_hidden(s: &Sides<'_>, hidden_parents: &[FsPath]) -> HashSet<FsPath> {
    let mut holds_hidden: HashSet<FsPath> = HashSet::new();
    let mut keep = |mut a: Option<FsPath>| {
        while let Some(d) = a {
            if !holds_hidden.insert(d.clone()) {
                break;
            }
            a = d.parent();
        }
    };
    for p in s.all.entries.keys() {
        if !s.have.entries.contains_key(p) {
            keep(p.parent());
        }
    }
    for d in hidden_parents {
        keep(Some(d.clone()));
    }
    holds_hidden
}

/// Why a full update is refused as unsafe: it deletes more than half of the machine, or
/// the image has fewer than half as many inodes.
fn safety_check(s: &Sides<'_>, deleted_count: usize) -> Option<String> {
    let (want, have) = (&s.want, &s.have);
    let have_inodes: HashSet<u64> = have.entries.values().copied().collect();
    let want_inodes: HashSet<u64> = want.entries.values().copied().collect();
    if deleted_count * 2 > have.len() {
        Some(format!(
            "would delete {deleted_count} of the machine's {} paths (more than half)",
            have.len()
        ))
    } else if want_inodes.len() * 2 < have_inodes.len() {
        Some(format!(
            "image has {} inodes, fewer than half the machine's {}",
            want_inodes.len(),
            have_inodes.len()
        ))
    } else {
        None
    }
}

/// How many new inodes each object of the plan feeds (an object renamed into place is
/// consumed, so all uses but the last need a copy).
pub fn object_uses(plan: &UpdatePlan) -> BTreeMap<ObjectId, usize> {
    let mut m = BTreeMap::new();
    for pi in &plan.inodes_to_make {
        if let (Kind::File, Some(h)) = (pi.inode.kind, pi.inode.hash) {
            *m.entry(h).or_insert(0) += 1;
        }
    }
    m
}

mod seed;

#[cfg(test)]
mod seed_tests;
#[cfg(test)]
mod tests;
