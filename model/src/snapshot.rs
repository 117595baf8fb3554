//! What a snapshot of a live host keeps of the tree its subd polled, and the names a
//! recurring snapshot takes (pure: `imagetool adds` does the I/O).

use crate::diff::is_protected;
use crate::filter::Filter;
use crate::image::FileTree;
use crate::path::FsPath;

/// The tree an image made from `polled` holds: nothing subd protects (`/.subd`, the
/// always-excluded paths, what the host's scan `exclusions` match, and their subtrees),
/// then `filter` applied as `imagetool add` applies it (`None`: a sparse image, nothing
/// more left out).
pub fn captured_tree(
    polled: &FileTree,
    exclusions: Option<&Filter>,
    filter: Option<&Filter>,
) -> FileTree {
    let mut tree = polled.clone();
    let mut dropped: Option<FsPath> = None;
    tree.entries.retain(|p, _| {
        if dropped.as_ref().is_some_and(|d| p.starts_with(d)) {
            return false;
        }
        if !p.is_root() && is_protected(p, exclusions) {
            dropped = Some(p.clone());
            return false;
        }
        true
    });
    match filter {
        Some(f) => tree.apply_filter(f),
        None => tree.gc_inodes(),
    }
    tree
}

/// The name a recurring snapshot adds next under `prefix`: `PREFIX/<n+1>`, where `n` is
/// the largest all-digit last component among `names` directly under `prefix` (0 if
/// none), so it sorts after every one of them in version order. The caller still asks
/// the imageserver whether the name is free (a deleted name is never reused).
pub fn next_numbered_name(prefix: &str, names: &[String]) -> String {
    let under = format!("{prefix}/");
    let n = names
        .iter()
        .filter_map(|n| n.strip_prefix(&under))
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|v| v.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    format!("{under}{}", n + 1)
}

/// A `--every` interval that is not a positive whole number with an optional unit.
#[derive(Debug, thiserror::Error)]
#[error("invalid interval {0:?}: a positive whole number with an optional unit s, m, h or d (e.g. 90s, 5m, 1h)")]
pub struct BadInterval(pub String);

/// Parses a recurring snapshot's interval: `N` or `Ns` seconds, `Nm`, `Nh`, `Nd`.
pub fn parse_interval(text: &str) -> Result<std::time::Duration, BadInterval> {
    let bad = || BadInterval(text.to_string());
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    match n.checked_mul(per) {
        Some(secs) if secs > 0 => Ok(std::time::Duration::from_secs(secs)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{version_cmp, Inode};

    fn tree(paths: &[&str]) -> FileTree {
        let mut t = FileTree::with_root(Inode::dir(0o755, 0, 0));
        for (n, p) in paths.iter().enumerate() {
            t.inodes.insert(n as u64 + 2, Inode::dir(0o755, 0, 0));
            t.entries.insert(p.parse().unwrap(), n as u64 + 2);
        }
        t
    }

    #[test]
    fn intervals_parse_with_units_and_refuse_the_rest() {
        for (text, want) in [
            ("30", Some(30)),
            ("90s", Some(90)),
            ("5m", Some(300)),
            ("2h", Some(7200)),
            ("1d", Some(86400)),
            ("0", None),
            ("0s", None),
            ("", None),
            ("m", None),
            ("5 m", None),
            ("1.5h", None),
            ("-1s", None),
            ("5ms", None),
            ("99999999999999999999d", None),
        ] {
            let got = parse_interval(text).ok().map(|d| d.as_secs());
            assert_eq!(got, want, "{text:?}");
        }
        assert!(parse_interval("1w")
            .unwrap_err()
            .to_string()
            .contains("\"1w\""));
    }

    #[test]
    fn captured_trees_leave_out_what_subd_protects_and_what_the_filter_matches() {
        let all = [
            "/.subd",
            "/.subd/objects",
            "/etc",
            "/etc/app",
            "/etc/app.d",
            "/tmp",
            "/tmp/x",
            "/var",
            "/var/lib",
            "/var/lib/initial-image",
        ];
        let excl = Filter::from_lines(vec!["/tmp/.*".into()]).unwrap();
        let filt = Filter::from_lines(vec!["/etc/app\\.d".into()]).unwrap();
        let cases: [(Option<&Filter>, Option<&Filter>, &[&str]); 3] = [
            (
                None,
                None,
                &[
                    "/",
                    "/etc",
                    "/etc/app",
                    "/etc/app.d",
                    "/tmp",
                    "/tmp/x",
                    "/var",
                    "/var/lib",
                ],
            ),
            (
                Some(&excl),
                None,
                &[
                    "/",
                    "/etc",
                    "/etc/app",
                    "/etc/app.d",
                    "/tmp",
                    "/var",
                    "/var/lib",
                ],
            ),
            (
                Some(&excl),
                Some(&filt),
                &["/", "/etc", "/etc/app", "/tmp", "/var", "/var/lib"],
            ),
        ];
        for (exclusions, filter, want) in cases {
            let t = captured_tree(&tree(&all), exclusions, filter);
            let got: Vec<String> = t.entries.keys().map(|p| p.to_string()).collect();
            assert_eq!(got, want, "{exclusions:?} {filter:?}");
            assert_eq!(t.inodes.len(), want.len(), "unused inodes dropped");
        }
    }

    #[test]
    fn next_numbered_names_follow_the_largest_number() {
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (names, want) in [
            (v(&[]), "snap/1"),
            (v(&["snap/1", "snap/2"]), "snap/3"),
            (v(&["snap/9", "snap/10"]), "snap/11"),
            (v(&["snap/007"]), "snap/8"),
            (
                v(&["snap/3", "snap/x", "snap/4a", "snapper/99", "snap/9/1"]),
                "snap/4",
            ),
            (v(&["other/5"]), "snap/1"),
        ] {
            assert_eq!(next_numbered_name("snap", &names), want, "{names:?}");
        }
        let mut sorted = v(&["snap/9", "snap/10"]);
        sorted.push(next_numbered_name("snap", &sorted));
        let mut again = sorted.clone();
        again.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(again, sorted, "the new name sorts last");
    }
}
