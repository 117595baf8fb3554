//! Test support for this crate's users: a tree builder, an image from a tree, and a
//! proptest strategy for small overlapping trees (feature `testing`, and this crate's tests).

use crate::filter::Filter;
use crate::image::{FileTree, Image, Inode, Kind, Mtime};
use crate::path::FsPath;
use crate::triggers::Triggers;
use crate::ObjectId;
use proptest::prelude::*;

/// A path from a literal; panics on an invalid one.
pub fn p(s: &str) -> FsPath {
    s.parse().unwrap()
}

/// A tree builder: `T::new().dir("/etc").file("/etc/passwd", b"x")…`.
#[derive(Clone)]
pub struct T {
    pub tree: FileTree,
    next: u64,
}

pub const M: Mtime = Mtime { sec: 1000, nsec: 5 };

impl Default for T {
    fn default() -> T {
        T::new()
    }
}

impl T {
    /// A tree holding only its root directory.
    pub fn new() -> T {
        T {
            tree: FileTree::with_root(Inode::dir(0o755, 0, 0)),
            next: 100,
        }
    }
    pub fn add(mut self, path: &str, inode: Inode) -> T {
        self.next += 1;
        self.tree.inodes.insert(self.next, inode);
        self.tree.entries.insert(p(path), self.next);
        self
    }
    pub fn dir(self, path: &str) -> T {
        self.add(path, Inode::dir(0o755, 0, 0))
    }
    pub fn file(self, path: &str, data: &[u8]) -> T {
        self.file_m(path, data, 0o644)
    }
    pub fn file_m(self, path: &str, data: &[u8], mode: u32) -> T {
        let h = (!data.is_empty()).then(|| ObjectId::of(data));
        self.add(path, Inode::file(mode, 0, 0, M, data.len() as u64, h))
    }
    pub fn sym(self, path: &str, target: &str) -> T {
        self.add(path, Inode::symlink(0, 0, target.as_bytes().to_vec()))
    }
    pub fn dev(self, path: &str, rdev: u64) -> T {
        let mut i = Inode::new(Kind::Char, 0o600, 0, 0);
        i.rdev = rdev;
        i.mtime = M;
        self.add(path, i)
    }
    pub fn link(mut self, path: &str, to: &str) -> T {
        let ino = self.tree.entries[&p(to)];
        self.tree.entries.insert(p(path), ino);
        self
    }
    pub fn with(mut self, path: &str, f: impl FnOnce(&mut Inode)) -> T {
        let ino = self.tree.entries[&p(path)];
        f(self.tree.inodes.get_mut(&ino).unwrap());
        self
    }
    pub fn done(self) -> FileTree {
        self.tree.validate().unwrap();
        self.tree
    }
}

/// An image of `tree` with no triggers and, if given, the filter text `filter`.
pub fn image(tree: FileTree, filter: Option<&str>) -> Image {
    Image::new(
        tree,
        filter.map(|f| Filter::parse(f, "filter").unwrap()),
        Triggers::default(),
    )
}

/// Small random trees drawn from a pool of seven names, so two of them overlap a lot.
pub fn arb_tree() -> impl Strategy<Value = FileTree> {
    // Up to 10 names drawn from a small pool, so trees overlap a lot.
    let names = prop::sample::select(vec!["/a", "/b", "/c", "/a/x", "/a/y", "/b/x", "/c/z"]);
    let kind = 0u8..7;
    let content = prop::sample::select(vec![&b""[..], b"1", b"2", b"3"]);
    let mode = prop::sample::select(vec![0o644u32, 0o4755, 0o600]);
    prop::collection::vec((names, kind, content, mode, 0u32..2), 0..10).prop_map(|items| {
        let mut t = T::new();
        for (name, kind, content, mode, uid) in items {
            if t.tree.entries.contains_key(&p(name)) {
                continue;
            }
            let path = p(name);
            // parents must exist and be directories
            if path
                .parent()
                .and_then(|d| t.tree.get(&d).cloned())
                .is_none_or(|i| i.kind != Kind::Dir)
            {
                continue;
            }
            t = match kind {
                0 | 1 => t.dir(name),
                2 | 3 => t.file_m(name, content, mode),
                4 => t.sym(name, "/a"),
                5 => t.dev(name, mode as u64),
                _ => {
                    // a hardlink to some existing non-directory
                    let existing = t
                        .tree
                        .entries
                        .iter()
                        .find(|(_, i)| t.tree.inodes[i].kind != Kind::Dir)
                        .map(|(q, _)| q.display());
                    match existing {
                        Some(q) => t.link(name, &q),
                        None => t.file(name, content),
                    }
                }
            };
            if uid == 1 {
                t = t.with(name, |i| i.uid = 7);
            }
        }
        t.done()
    })
}

/// `len` incompressible bytes, the same for the same `seed` (an xorshift stream): file
/// contents for tests that need real transfer sizes or varied bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
