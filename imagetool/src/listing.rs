//! Human listings: `show`'s one line per path (Dominator's format), and `diff`.

use model::image::Kind;
use model::{FileTree, FsPath, Image, Inode, Mtime};
use serde::Serialize;
use std::collections::BTreeMap;

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `02 Jan 2006 15:04:05 UTC`, as Dominator prints mtimes.
pub fn format_time(sec: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(sec) {
        Ok(t) => format!(
            "{:02} {} {:04} {:02}:{:02}:{:02} UTC",
            t.day(),
            MONTHS[t.month() as usize - 1],
            t.year(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{sec}"),
    }
}

/// One `show` line: `mode nlinks uid gid size|devnum mtime path [hash | -> target]`.
pub fn show_line(path: &FsPath, inode: &Inode, nlinks: u32) -> String {
    let size = match inode.kind {
        Kind::File => format!("{:>10}", inode.size),
        Kind::Char | Kind::Block => format!("{:>#10x}", inode.rdev),
        _ => " ".repeat(10),
    };
    let mtime = if inode.keeps_mtime() {
        format_time(inode.mtime.sec)
    } else {
        " ".repeat(24)
    };
    let tail = match inode.kind {
        Kind::File => inode.hash.map(|h| format!(" {h}")).unwrap_or_default(),
        Kind::Symlink => format!(
            " -> {}",
            model::path::escape(inode.target.as_deref().unwrap_or_default())
        ),
        _ => String::new(),
    };
    format!(
        "{} {:>3} {:>5} {:>5} {} {} {}{}",
        inode.mode_string(),
        nlinks,
        inode.uid,
        inode.gid,
        size,
        mtime,
        path.display(),
        tail
    )
}

/// Every line of `show`, root first.
pub fn show_lines(tree: &FileTree) -> Vec<String> {
    let counts = tree.link_counts();
    tree.entries
        .iter()
        .filter_map(|(p, ino)| {
            tree.inodes
                .get(ino)
                .map(|i| show_line(p, i, counts.get(ino).copied().unwrap_or(1)))
        })
        .collect()
}

/// Every line of `show` for an image, root first; paths at or beneath a state line end in
/// ` [state]` (seeded on a machine only when absent).
pub fn show_image_lines(image: &Image) -> Vec<String> {
    let mut lines = show_lines(&image.tree);
    if let Some(state) = &image.state {
        for (l, p) in lines.iter_mut().zip(image.tree.entries.keys()) {
            if state.covers(p) {
                l.push_str(" [state]");
            }
        }
    }
    lines
}

/// The one-line description above a listing.
pub fn header(name: &str, image: &Image) -> String {
    let kind = match &image.filter {
        None => "sparse image (only its paths are managed; nothing is deleted)".to_string(),
        Some(f) => format!(
            "full image (filter of {} lines; everything else is deleted on hosts)",
            f.lines().len()
        ),
    };
    let mut s = format!(
        "# {name}: {kind}, {} paths, {} bytes",
        image.tree.len(),
        image.tree.total_bytes()
    );
    if image.created_on > 0 {
        s.push_str(&format!(
            ", created {}",
            format_time(image.created_on as i64)
        ));
    }
    if !image.created_by.is_empty() {
        s.push_str(&format!(" by {}", image.created_by));
    }
    if let Some(state) = image.state.as_ref().filter(|s| !s.lines().is_empty()) {
        s.push_str(&format!(
            "; {} state lines (paths marked [state] are seeded only when absent)",
            state.lines().len()
        ));
    }
    s
}

/// How one path differs between two trees.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Change {
    pub path: FsPath,
    /// `added`, `removed` or `changed`.
    pub what: &'static str,
    /// For `changed`: each difference, e.g. `mode 0644 -> 0755`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

fn mtime_str(m: Mtime) -> String {
    if m.nsec == 0 {
        format_time(m.sec)
    } else {
        format!("{}+{}ns", format_time(m.sec), m.nsec)
    }
}

fn inode_changes(a: &Inode, b: &Inode, la: u32, lb: u32) -> Vec<String> {
    let mut d = Vec::new();
    if a.kind != b.kind {
        d.push(format!("type {:?} -> {:?}", a.kind, b.kind));
        return d;
    }
    if a.mode != b.mode {
        d.push(format!("mode {:04o} -> {:04o}", a.mode, b.mode));
    }
    if a.uid != b.uid {
        d.push(format!("uid {} -> {}", a.uid, b.uid));
    }
    if a.gid != b.gid {
        d.push(format!("gid {} -> {}", a.gid, b.gid));
    }
    if a.keeps_mtime() && a.mtime != b.mtime {
        d.push(format!(
            "mtime {} -> {}",
            mtime_str(a.mtime),
            mtime_str(b.mtime)
        ));
    }
    if a.size != b.size {
        d.push(format!("size {} -> {}", a.size, b.size));
    }
    if a.hash != b.hash {
        d.push("content".into());
    }
    if a.target != b.target {
        d.push(format!(
            "target {} -> {}",
            model::path::escape(a.target.as_deref().unwrap_or_default()),
            model::path::escape(b.target.as_deref().unwrap_or_default())
        ));
    }
    if a.rdev != b.rdev {
        d.push(format!("device {:#x} -> {:#x}", a.rdev, b.rdev));
    }
    if la != lb {
        d.push(format!("links {la} -> {lb}"));
    }
    d
}

/// Everything that differs from image `a` to image `b`.
#[derive(Debug, serde::Serialize)]
pub struct ImageDiff {
    /// Whether each image is sparse (no filter).
    pub sparse: (bool, bool),
    pub filter_removed: Vec<String>,
    pub filter_added: Vec<String>,
    pub triggers_removed: Vec<model::Trigger>,
    pub triggers_added: Vec<model::Trigger>,
    /// Hooks added, removed or changed (`hook + pre NAME`, …).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub state_removed: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub state_added: Vec<String>,
    pub changes: Vec<Change>,
}

impl ImageDiff {
    pub fn of(a: &model::Image, b: &model::Image) -> ImageDiff {
        let lines = |i: &model::Image| -> Vec<String> {
            i.filter
                .as_ref()
                .map(|f| f.lines().to_vec())
                .unwrap_or_default()
        };
        let (fa, fb) = (lines(a), lines(b));
        let state = |i: &model::Image| -> Vec<String> {
            i.state
                .as_ref()
                .map(|s| s.lines().to_vec())
                .unwrap_or_default()
        };
        let (sa, sb) = (state(a), state(b));
        let (ta, tb) = (a.triggers.list(), b.triggers.list());
        ImageDiff {
            sparse: (a.filter.is_none(), b.filter.is_none()),
            filter_removed: fa.iter().filter(|l| !fb.contains(l)).cloned().collect(),
            filter_added: fb.iter().filter(|l| !fa.contains(l)).cloned().collect(),
            triggers_removed: ta.iter().filter(|t| !tb.contains(t)).cloned().collect(),
            triggers_added: tb.iter().filter(|t| !ta.contains(t)).cloned().collect(),
            hooks: b.hooks.diff_lines(&a.hooks),
            state_removed: sa.iter().filter(|l| !sb.contains(l)).cloned().collect(),
            state_added: sb.iter().filter(|l| !sa.contains(l)).cloned().collect(),
            changes: diff(&a.tree, &b.tree),
        }
    }

    /// The text form: `#` lines for the image-level differences, then one line per path.
    pub fn lines(&self) -> Vec<String> {
        let kind = |sparse: bool| if sparse { "sparse" } else { "full" };
        let mut out = Vec::new();
        if self.sparse.0 != self.sparse.1 {
            out.push(format!(
                "# {} -> {}",
                kind(self.sparse.0),
                kind(self.sparse.1)
            ));
        }
        out.extend(
            self.filter_removed
                .iter()
                .map(|l| format!("# filter - {l}")),
        );
        out.extend(self.filter_added.iter().map(|l| format!("# filter + {l}")));
        let json = |t: &model::Trigger| serde_json::to_string(t).unwrap_or_default();
        out.extend(
            self.triggers_removed
                .iter()
                .map(|t| format!("# trigger - {}", json(t))),
        );
        out.extend(
            self.triggers_added
                .iter()
                .map(|t| format!("# trigger + {}", json(t))),
        );
        out.extend(self.hooks.iter().map(|l| format!("# {l}")));
        out.extend(self.state_removed.iter().map(|l| format!("# state - {l}")));
        out.extend(self.state_added.iter().map(|l| format!("# state + {l}")));
        out.extend(self.changes.iter().map(diff_line));
        out
    }
}

/// Paths added, removed and changed from `a` to `b`, in path order.
pub fn diff(a: &FileTree, b: &FileTree) -> Vec<Change> {
    let (ca, cb) = (a.link_counts(), b.link_counts());
    let mut out = Vec::new();
    let mut all: BTreeMap<&FsPath, (Option<u64>, Option<u64>)> = BTreeMap::new();
    for (p, i) in &a.entries {
        all.entry(p).or_default().0 = Some(*i);
    }
    for (p, i) in &b.entries {
        all.entry(p).or_default().1 = Some(*i);
    }
    for (p, (ia, ib)) in all {
        match (ia, ib) {
            (Some(_), None) => out.push(Change {
                path: p.clone(),
                what: "removed",
                details: vec![],
            }),
            (None, Some(_)) => out.push(Change {
                path: p.clone(),
                what: "added",
                details: vec![],
            }),
            (Some(x), Some(y)) => {
                let d = inode_changes(&a.inodes[&x], &b.inodes[&y], ca[&x], cb[&y]);
                if !d.is_empty() {
                    out.push(Change {
                        path: p.clone(),
                        what: "changed",
                        details: d,
                    });
                }
            }
            (None, None) => {}
        }
    }
    out
}

/// What `imagetool diff A B` prints when the images do not differ.
pub fn no_difference(a: &str, b: &str) -> String {
    format!("{a} and {b} are identical: same tree, filter, triggers, state lines and hooks")
}

/// `+ path`, `- path`, `~ path: detail, detail`.
pub fn diff_line(c: &Change) -> String {
    match c.what {
        "added" => format!("+ {}", c.path),
        "removed" => format!("- {}", c.path),
        _ => format!("~ {}: {}", c.path, c.details.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::ObjectId;

    #[test]
    fn time_format_matches_dominator() {
        assert_eq!(format_time(1136214245), "02 Jan 2006 15:04:05 UTC");
    }

    #[test]
    fn show_line_shapes() {
        let f = Inode::file(
            0o4755,
            0,
            0,
            Mtime {
                sec: 1136214245,
                nsec: 0,
            },
            3,
            Some(ObjectId::of(b"abc")),
        );
        let l = show_line(&"/bin/su".parse().unwrap(), &f, 2);
        assert!(
            l.starts_with(
                "-rwsr-xr-x   2     0     0          3 02 Jan 2006 15:04:05 UTC /bin/su ddaf35a1"
            ),
            "{l}"
        );
        let s = Inode::symlink(1, 2, b"/x".to_vec());
        let l = show_line(&"/l".parse().unwrap(), &s, 1);
        assert!(l.ends_with("/l -> /x"), "{l}");
        assert!(l.starts_with("lrwxrwxrwx   1     1     2"), "{l}");
    }

    /// `show` marks the paths at or beneath a state line; `diff` names the state lines
    /// added and removed (and says nothing of state when neither image has any).
    #[test]
    fn state_is_marked_and_diffed() {
        let mut t = FileTree::with_root(Inode::dir(0o755, 0, 0));
        for (n, path) in ["/mnt", "/mnt/state", "/mnt/state/etc"].iter().enumerate() {
            t.inodes.insert(n as u64 + 1, Inode::dir(0o755, 0, 0));
            t.entries.insert(path.parse().unwrap(), n as u64 + 1);
        }
        let plain = Image::new(t, None, model::Triggers::default());
        let mut stateful = plain.clone();
        stateful.state = Some(model::StateLines::parse("/mnt/state/.*\n", "s").unwrap());
        let marked: Vec<bool> = show_image_lines(&stateful)
            .iter()
            .map(|l| l.ends_with(" [state]"))
            .collect();
        assert_eq!(marked, [false, false, false, true]);
        assert!(show_image_lines(&plain)
            .iter()
            .all(|l| !l.contains("[state]")));
        assert!(header("x", &stateful).contains("1 state lines"));
        assert_eq!(
            ImageDiff::of(&plain, &stateful).lines(),
            ["# state + /mnt/state/.*"]
        );
        assert_eq!(
            ImageDiff::of(&stateful, &plain).lines(),
            ["# state - /mnt/state/.*"]
        );
        let json = serde_json::to_string(&ImageDiff::of(&plain, &plain)).unwrap();
        assert!(!json.contains("state"), "{json}");
    }
}
