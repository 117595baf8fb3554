//! Image streams: an MDB image name that names an image *directory* (`dhcp/production`)
//! stands for the newest image directly in it, in version order (`image::version_cmp`, the
//! order `imagetool list` prints). Pure: the caller brings the imageserver's list of names.
//!
//! Rules:
//! - A name that is itself a live image is that image, even when images also live under
//!   `NAME/` (the exact image wins: an operator who wrote an image name meant it).
//! - Otherwise the newest of the images *directly* in `NAME/` (`NAME/X`, never
//!   `NAME/sub/X`: a sub-directory is another stream).
//! - Deleted images are not listed, so the newest's deletion falls back to the next newest;
//!   the caller leaves out expired ones (`expired`) the same way.
//! - An empty directory resolves to nothing (`Resolution::Unknown`): the caller waits,
//!   never enforces "no image".

use crate::image::version_cmp;
use std::cmp::Ordering;

/// What an MDB image name stands for, given the imageserver's live image names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The name is a live image.
    Exact,
    /// The name is an image directory; `latest` is its newest image.
    Stream { latest: String },
    /// Neither a live image nor a directory holding one.
    Unknown,
}

impl Resolution {
    /// The image to enforce for `name`: itself, its stream's newest, or `None`.
    pub fn image<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        match self {
            Resolution::Exact => Some(name),
            Resolution::Stream { latest } => Some(latest),
            Resolution::Unknown => None,
        }
    }
}

/// `name` without a leading `/` (as `ImageName::parse` and the imageserver read it).
fn clean(name: &str) -> &str {
    name.strip_prefix('/').unwrap_or(name)
}

/// The images directly in the directory `dir`, in version order (oldest first).
pub fn images_in<'a>(dir: &str, names: &'a [String]) -> Vec<&'a str> {
    let dir = clean(dir);
    let mut v: Vec<&str> = names
        .iter()
        .map(|n| clean(n))
        .filter(|n| {
            n.strip_prefix(dir)
                .and_then(|rest| rest.strip_prefix('/'))
                .is_some_and(|leaf| !leaf.is_empty() && !leaf.contains('/'))
        })
        .collect();
    v.sort_by(|a, b| version_cmp(a, b));
    v.dedup();
    v
}

/// The newest image directly in `dir` (what `imagetool find-latest-image DIR` prints).
pub fn latest_in<'a>(dir: &str, names: &'a [String]) -> Option<&'a str> {
    images_in(dir, names).pop()
}

/// The newest image in `dir` older than `current` in version order: the image a host
/// following the stream ran before `current` (what `mdb rollback` pins it to).
pub fn previous_in<'a>(dir: &str, names: &'a [String], current: &str) -> Option<&'a str> {
    images_in(dir, names)
        .into_iter()
        .rev()
        .find(|n| version_cmp(n, clean(current)) == Ordering::Less)
}

/// Whether an image with this `expires_at` has expired at `now` (Unix seconds): a
/// stream never follows an expired version, as if it were deleted.
pub fn expired(expires_at: Option<u64>, now: u64) -> bool {
    expires_at.is_some_and(|t| t <= now)
}

/// What the MDB image name `name` stands for among the live image `names` (any order;
/// a list from `ListImages` with prefix `name` is enough).
pub fn resolve(name: &str, names: &[String]) -> Resolution {
    let name = clean(name);
    if names.iter().any(|n| clean(n) == name) {
        return Resolution::Exact;
    }
    match latest_in(name, names) {
        Some(latest) => Resolution::Stream {
            latest: latest.to_string(),
        },
        None => Resolution::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn resolve_table() {
        let stream = |s: &str| Resolution::Stream { latest: s.into() };
        let cases: &[(&str, &[&str], Resolution)] = &[
            ("a/1", &["a/1", "a/2"], Resolution::Exact),
            ("/a/1", &["a/1"], Resolution::Exact),
            ("a", &["a/1", "a/2"], stream("a/2")),
            // Version order, not byte order.
            ("a", &["a/9", "a/10", "a/2"], stream("a/10")),
            (
                "a",
                &["a/2026.11.9.0", "a/2026.11.10.0"],
                stream("a/2026.11.10.0"),
            ),
            // The exact image wins over a directory of the same name.
            ("a", &["a", "a/1"], Resolution::Exact),
            // Only direct children; a sibling sharing the prefix is no member.
            ("a", &["a/sub/9", "a/1", "ab/7"], stream("a/1")),
            ("a", &["a/sub/9", "ab/7"], Resolution::Unknown),
            ("a", &[], Resolution::Unknown),
            ("a/b", &["a/b/1", "a/b/0"], stream("a/b/1")),
        ];
        for (name, list, want) in cases {
            assert_eq!(&resolve(name, &names(list)), want, "{name} in {list:?}");
        }
    }

    #[test]
    fn deleting_the_newest_falls_back_to_the_next() {
        let mut list = names(&["s/1", "s/2", "s/3"]);
        assert_eq!(resolve("s", &list).image("s"), Some("s/3"));
        list.retain(|n| n != "s/3");
        assert_eq!(resolve("s", &list).image("s"), Some("s/2"));
        list.clear();
        assert_eq!(resolve("s", &list).image("s"), None);
        assert_eq!(Resolution::Exact.image("x"), Some("x"));
    }

    #[test]
    fn expiry_table() {
        for (at, now, want) in [
            (None, 5, false),
            (Some(6), 5, false),
            (Some(5), 5, true),
            (Some(1), 5, true),
        ] {
            assert_eq!(expired(at, now), want, "{at:?} at {now}");
        }
    }

    #[test]
    fn previous_table() {
        let list = names(&["s/1", "s/2", "s/10", "s/x/99"]);
        let cases: &[(&str, Option<&str>)] = &[
            ("s/10", Some("s/2")),
            ("s/2", Some("s/1")),
            ("s/1", None),
            // A deleted current image: the newest older than it.
            ("s/5", Some("s/2")),
        ];
        for (current, want) in cases {
            assert_eq!(previous_in("s", &list, current), *want, "{current}");
        }
        assert_eq!(images_in("s", &list), ["s/1", "s/2", "s/10"]);
        assert_eq!(latest_in("t", &list), None);
    }
}
