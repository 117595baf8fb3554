//! Table tests of the state part of the diff: seeded where absent, left alone where
//! present (whatever its content, a dangling symlink included), never deleted once seeded,
//! and converged after one update.

use super::tests::simulate;
use super::*;
use crate::state::StateLines;
use crate::testing::*;
use crate::triggers::Triggers;

const KEY: &str = "/mnt/state/etc/ssh/ssh_host_ed25519_key";
const LINK: &str = "/etc/ssh/ssh_host_ed25519_key";

/// use-ephemeral's relocation: the key as a symlink into `/mnt/state`, and its seed there.
fn relocation() -> T {
    T::new()
        .dir("/etc")
        .dir("/etc/ssh")
        .sym(LINK, KEY)
        .file("/etc/ssh/sshd_config", b"Port 22\n")
        .dir("/mnt")
        .dir("/mnt/state")
        .dir("/mnt/state/etc")
        .dir("/mnt/state/etc/ssh")
        .file_m(KEY, b"seed key", 0o600)
}

fn img(tree: FileTree, filter: Option<&str>, state: Option<&str>) -> Image {
    let mut i = image(tree, filter);
    i.state = state.map(|s| StateLines::parse(s, "state").unwrap());
    i
}

fn run(img: &Image, have: &FileTree, seeded: &[&str]) -> UpdatePlan {
    let seeded: Vec<FsPath> = seeded.iter().map(|s| p(s)).collect();
    diff(
        "img",
        img,
        &Machine {
            tree: have,
            object_cache: &BTreeSet::new(),
            exclusions: None,
            hidden_parents: &[],
            seeded: &seeded,
        },
        &DiffOptions::default(),
    )
}

fn shown(v: impl IntoIterator<Item = FsPath>) -> Vec<String> {
    v.into_iter().map(|p| p.display()).collect()
}

/// (made: dirs and inodes, changed, deleted, seeded, diverged)
type Outcome = (Vec<String>, Vec<String>, Vec<String>, Vec<String>, u64);

fn outcome(plan: &UpdatePlan) -> Outcome {
    let mut made: Vec<FsPath> = plan.dirs_to_make.iter().map(|d| d.path.clone()).collect();
    made.extend(plan.inodes_to_make.iter().map(|i| i.path.clone()));
    made.sort();
    (
        shown(made),
        shown(plan.inodes_to_change.iter().map(|c| c.path.clone())),
        shown(plan.paths_to_delete.iter().cloned()),
        shown(plan.seeded.iter().cloned()),
        plan.state_diverged,
    )
}

fn v(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

#[test]
fn state_table() {
    let full = Some("");
    let state = Some("# use-ephemeral\n/mnt/state/.*\n");
    let blank = T::new().done();
    let evolved = relocation()
        .with(KEY, |i| {
            i.size = 11;
            i.hash = Some(ObjectId::of(b"regenerated"));
        })
        .done();
    let dangling = relocation()
        .add(KEY, Inode::symlink(0, 0, "/nowhere"))
        .done();
    let drifted = relocation().with(KEY, |i| i.mode = 0o644).done();
    let no_state_dir = T::new()
        .dir("/etc")
        .dir("/etc/ssh")
        .sym(LINK, KEY)
        .dir("/mnt")
        .dir("/mnt/state");
    let ssh_dir_kept = no_state_dir.clone().dir("/mnt/state/etc").done();
    let image_without_key = T::new().dir("/etc").dir("/etc/ssh").sym(LINK, KEY).done();
    let db = |extra: &[&str]| {
        let mut t = T::new().dir("/var").dir("/var/lib").dir("/var/lib/db");
        for e in extra {
            t = t.dir(e);
        }
        t
    };
    let db_image = db(&["/var/lib/db/a"])
        .file("/var/lib/db/a/b", b"x")
        .file("/var/lib/db/c", b"y")
        .done();
    #[rustfmt::skip]
    let cases: Vec<(&str, Image, FileTree, &[&str], Outcome)> = vec![
        ("blank machine: link made, key seeded with its parents",
         img(relocation().done(), full, state), blank.clone(), &[],
         (v(&["/etc", "/etc/ssh", LINK, "/etc/ssh/sshd_config", "/mnt", "/mnt/state", "/mnt/state/etc", "/mnt/state/etc/ssh", KEY]),
          v(&[]), v(&[]), v(&["/mnt/state/etc"]), 0)),
        ("evolved key kept by a full image",
         img(relocation().done(), full, state), evolved.clone(), &[],
         (v(&[]), v(&[]), v(&[]), v(&[]), 1)),
        ("evolved key kept by a sparse image",
         img(relocation().done(), None, state), evolved.clone(), &[],
         (v(&[]), v(&[]), v(&[]), v(&[]), 1)),
        ("a dangling symlink is present",
         img(relocation().done(), full, state), dangling, &[],
         (v(&[]), v(&[]), v(&[]), v(&[]), 1)),
        ("metadata drift is not corrected",
         img(relocation().done(), full, state), drifted, &[],
         (v(&[]), v(&[]), v(&[]), v(&[]), 1)),
        ("a missing state subtree is seeded below a present parent",
         img(relocation().done(), full, state), ssh_dir_kept, &[],
         (v(&["/etc/ssh/sshd_config", "/mnt/state/etc/ssh", KEY]), v(&[]), v(&[]), v(&["/mnt/state/etc/ssh"]), 0)),
        ("line dropped, key recorded as seeded: a full image without it deletes nothing there",
         img(image_without_key.clone(), full, None), evolved.clone(), &["/mnt/state/etc"],
         (v(&[]), v(&[]), v(&["/etc/ssh/sshd_config"]), v(&[]), 0)),
        ("line dropped, recorded, image still holding the old seed: not overwritten",
         img(relocation().done(), full, None), evolved.clone(), &["/mnt/state/etc"],
         (v(&[]), v(&[]), v(&[]), v(&[]), 1)),
        ("control: line dropped and nothing recorded, a full image deletes it",
         img(image_without_key, full, None), evolved.clone(), &[],
         (v(&[]), v(&[]), v(&["/etc/ssh/sshd_config", "/mnt"]), v(&[]), 0)),
        ("a present state directory keeps its children out; a missing child is divergence",
         img(db_image.clone(), full, Some("/var/lib/db$")), db(&[]).done(), &[],
         (v(&[]), v(&[]), v(&[]), v(&[]), 3)),
        ("a seeded path's missing parent beneath a present root is made",
         img(db_image.clone(), full, Some("/var/lib/db$\n/var/lib/db/a/b$")), db(&[]).done(), &[],
         (v(&["/var/lib/db/a", "/var/lib/db/a/b"]), v(&[]), v(&[]), v(&["/var/lib/db/a/b"]), 1)),
        ("an absent state directory is seeded whole",
         img(db_image, full, Some("/var/lib/db$")), T::new().dir("/var").dir("/var/lib").done(), &[],
         (v(&["/var/lib/db", "/var/lib/db/a", "/var/lib/db/a/b", "/var/lib/db/c"]), v(&[]), v(&[]), v(&["/var/lib/db"]), 0)),
    ];
    for (name, image, have, seeded, want) in cases {
        let plan = run(&image, &have, seeded);
        assert_eq!(outcome(&plan), want, "{name}\n{plan:#}");
        plan.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        // One update converges: the second diff is empty, and seeds nothing more.
        let after = simulate(&have, &plan);
        let mut recorded: Vec<&str> = seeded.to_vec();
        let shown_seeded = shown(plan.seeded.iter().cloned());
        recorded.extend(shown_seeded.iter().map(|s| s.as_str()));
        let again = run(&image, &after, &recorded);
        assert!(
            again.is_empty() && again.seeded.is_empty(),
            "{name}: second plan {again:#}"
        );
    }
}

/// A trigger on state fires when it is seeded, not when the state later evolves.
#[test]
fn a_trigger_on_state_fires_on_seeding_only() {
    let mut image = img(relocation().done(), Some(""), Some("/mnt/state/.*"));
    image.triggers = Triggers::parse(
        r#"[{"MatchLines": ["/mnt/state/.*"], "Service": "sshd"}]"#,
        "t",
    )
    .unwrap();
    let blank = T::new().done();
    let plan = run(&image, &blank, &[]);
    assert_eq!(plan.summary().services, ["sshd"]);
    assert_eq!(plan.summary().to_seed, 1);
    let evolved = relocation()
        .with(KEY, |i| i.hash = Some(ObjectId::of(b"new key!")))
        .done();
    let plan = run(&image, &evolved, &["/mnt/state/etc"]);
    assert!(plan.is_empty(), "{plan:#}");
    assert!(plan.summary().services.is_empty());
    let text = format!("{}", run(&image, &blank, &[]));
    assert!(text.contains("  seed /mnt/state/etc\n"), "{text}");
    let text = format!("{plan}");
    assert!(
        text.contains("state: 1 paths differ from the image's seed"),
        "{text}"
    );
}

/// Images stored before state lines existed load as before and serialize byte for byte
/// the same (the image checksum is of these bytes).
#[test]
fn images_without_state_lines_are_unchanged() {
    let old = image(relocation().done(), Some("/tmp"));
    let json = serde_json::to_string(&old).unwrap();
    assert!(!json.contains("\"state\""), "{json}");
    let back: Image = serde_json::from_str(&json).unwrap();
    assert!(back.state.is_none());
    assert_eq!(serde_json::to_string(&back).unwrap(), json);
    let with = img(relocation().done(), None, Some("/mnt/state/.*"));
    let json = serde_json::to_string(&with).unwrap();
    assert!(json.contains(r#""state":["/mnt/state/.*"]"#), "{json}");
    assert_eq!(
        serde_json::from_str::<Image>(&json).unwrap().state,
        with.state
    );
    let bad = json.replace(r#"["/mnt/state/.*"]"#, r#"["/bad["]"#);
    assert!(serde_json::from_str::<Image>(&bad).is_err());
}
