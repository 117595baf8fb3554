//! Comparing directory trees path by path, as a machine must match its image: kind, mode,
//! owner, group, mtime (where images keep one), content, link target or device number, and
//! hardlink groups.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// What is under `root` (not subd's own records): per path its kind, mode, owner, group,
/// mtime with nanoseconds (where the image keeps one: not for directories and symlinks),
/// content hash, link target or device number, and the other
/// paths of its hardlink group.
pub fn listing(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, std::fs::Metadata)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
            if rel == "/.subd" || model::diff::ALWAYS_EXCLUDED.contains(&rel.as_str()) {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                walk(root, &p, out);
            }
            out.push((rel, m));
        }
    }
    let mut all = Vec::new();
    walk(root, root, &mut all);
    let mut groups: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (rel, m) in &all {
        if !m.is_dir() && m.nlink() > 1 {
            groups.entry(m.ino()).or_default().push(rel.clone());
        }
    }
    let mut out = BTreeMap::new();
    for (rel, m) in all {
        let ft = m.file_type();
        let what = if m.is_dir() {
            "dir".to_string()
        } else if ft.is_symlink() {
            format!("-> {:?}", std::fs::read_link(root.join(&rel[1..])).unwrap())
        } else if ft.is_char_device() || ft.is_block_device() {
            format!("dev {:x}", m.rdev())
        } else {
            let data = std::fs::read(root.join(&rel[1..])).unwrap();
            format!("file {}", model::ObjectId::of(&data))
        };
        let mut group = groups.get(&m.ino()).cloned().unwrap_or_default();
        group.sort();
        // Images keep mtimes for files, devices and FIFOs only (as Dominator does).
        let mtime = if m.is_dir() || ft.is_symlink() {
            "-".to_string()
        } else {
            format!("{}.{:09}", m.mtime(), m.mtime_nsec())
        };
        let line = format!(
            "{:o} {}:{} {mtime} {what} links {group:?}",
            m.mode(),
            m.uid(),
            m.gid(),
        );
        out.insert(rel, line);
    }
    out
}

/// The paths whose lines differ between two listings (`PATH: want …, got …`), every path
/// of either: empty when the trees match.
pub fn differences(want: &BTreeMap<String, String>, got: &BTreeMap<String, String>) -> Vec<String> {
    let mut paths: Vec<&String> = want.keys().chain(got.keys()).collect();
    paths.sort();
    paths.dedup();
    paths
        .into_iter()
        .filter(|p| want.get(*p) != got.get(*p))
        .map(|p| format!("{p}: want {:?}, got {:?}", want.get(p), got.get(p)))
        .collect()
}

/// `len` incompressible bytes, the same for the same `seed` (`model::testing::noise`).
pub use model::testing::noise;
