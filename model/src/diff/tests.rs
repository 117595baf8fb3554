//! Table tests of the diff, and a property test (on a model of `apply`) that one update
//! always converges: applying diff(B, A) to A yields a tree that diffs to empty.

use super::*;
use crate::image::Mtime;
use crate::testing::*;
use crate::triggers::Triggers;
use proptest::prelude::*;

fn run(img: &Image, have: &FileTree, cache: &[ObjectId], excl: Option<&str>) -> UpdatePlan {
    let cache: BTreeSet<ObjectId> = cache.iter().copied().collect();
    let excl = excl.map(|e| Filter::parse(e, "excl").unwrap());
    diff(
        "img",
        img,
        &Machine {
            tree: have,
            object_cache: &cache,
            exclusions: excl.as_ref(),
            hidden_parents: &[],
            seeded: &[],
        },
        &DiffOptions::default(),
    )
}

fn paths<'a>(v: impl IntoIterator<Item = &'a FsPath>) -> Vec<String> {
    v.into_iter().map(|p| p.display()).collect()
}

/// A model of `apply` on trees, used to check convergence.
pub(super) fn simulate(have: &FileTree, plan: &UpdatePlan) -> FileTree {
    let mut t = have.clone();
    let mut next = t.inodes.keys().max().copied().unwrap_or(0) + 1000;
    let mut fresh = |t: &mut FileTree, path: &FsPath, inode: &Inode| {
        t.remove_subtree(path);
        next += 1;
        t.inodes.insert(next, inode.clone());
        t.entries.insert(path.clone(), next);
    };
    for d in &plan.dirs_to_make {
        if t.get(&d.path).is_none_or(|i| i.kind != Kind::Dir) {
            fresh(&mut t, &d.path, &d.inode);
        } else {
            let ino = t.entries[&d.path];
            t.inodes.insert(ino, d.inode.clone());
        }
    }
    for i in &plan.inodes_to_make {
        fresh(&mut t, &i.path, &i.inode);
    }
    for h in &plan.hardlinks_to_make {
        let ino = t.entries[&h.target];
        t.remove_subtree(&h.path);
        t.entries.insert(h.path.clone(), ino);
    }
    for d in &plan.paths_to_delete {
        t.remove_subtree(d);
    }
    for c in &plan.inodes_to_change {
        let ino = t.entries[&c.path];
        t.inodes.insert(ino, c.inode.clone());
    }
    t.gc_inodes();
    t.validate().unwrap();
    t
}

fn assert_converges(img: &Image, have: &FileTree) {
    let plan = run(img, have, &[], None);
    let after = simulate(have, &plan);
    let again = run(img, &after, &[], None);
    assert!(
        again.is_empty(),
        "not converged after {plan:#}\nsecond plan: {again:#}"
    );
}

#[test]
fn identical_trees_diff_to_empty() {
    let t = T::new()
        .dir("/etc")
        .file("/etc/passwd", b"root")
        .link("/etc/pw2", "/etc/passwd")
        .sym("/l", "/etc")
        .dev("/null", 0x103)
        .file("/empty", b"")
        .done();
    for filter in [None, Some("")] {
        let plan = run(&image(t.clone(), filter), &t, &[], None);
        assert!(plan.is_empty(), "{plan:#}");
        assert!(plan.unsafe_reason.is_none());
    }
}

#[test]
fn sparse_image_touches_only_its_paths() {
    let img = T::new().dir("/etc").file("/etc/a", b"new").done();
    let have = T::new()
        .dir("/etc")
        .file("/etc/a", b"old")
        .file("/etc/b", b"mine")
        .file("/x", b"x")
        .done();
    let plan = run(&image(img.clone(), None), &have, &[], None);
    assert!(plan.sparse);
    assert_eq!(
        paths(plan.inodes_to_make.iter().map(|i| &i.path)),
        ["/etc/a"]
    );
    assert!(plan.paths_to_delete.is_empty());
    assert_eq!(plan.objects_to_fetch, [ObjectId::of(b"new")]);
    assert_eq!(plan.fetch_bytes, 3);
    assert!(plan.unsafe_reason.is_none());
    assert_converges(&image(img, None), &have);
}

#[test]
fn full_image_deletes_only_tops_and_never_filtered() {
    let common = T::new()
        .dir("/etc")
        .file("/etc/a", b"a")
        .file("/etc/b", b"b")
        .file("/etc/c", b"c")
        .file("/etc/d", b"d");
    let img = common.clone().done();
    let have = common
        .dir("/junk")
        .dir("/junk/deep")
        .file("/junk/deep/f", b"f")
        .dir("/keep")
        .file("/keep/data", b"d")
        .file("/keepme", b"k")
        .done();
    let i = image(img, Some("/keep(|/.*)$\n"));
    let plan = run(&i, &have, &[], None);
    assert_eq!(paths(&plan.paths_to_delete), ["/junk", "/keepme"]);
    assert!(plan.unsafe_reason.is_none(), "{:?}", plan.unsafe_reason);
    assert_converges(&i, &have);
}

#[test]
fn image_entries_its_own_filter_matches_are_ignored() {
    let img = T::new().dir("/etc").file("/etc/hostname", b"img").done();
    let have = T::new().dir("/etc").file("/etc/hostname", b"mine").done();
    let plan = run(&image(img, Some("/etc/hostname$")), &have, &[], None);
    assert!(plan.is_empty(), "{plan:#}");
}

#[test]
fn excluded_and_private_paths_are_never_made_or_deleted() {
    let img = T::new()
        .dir("/tmp")
        .file("/tmp/x", b"x")
        .dir("/.subd")
        .file("/.subd/evil", b"e")
        .dir("/var")
        .dir("/var/lib")
        .file("/var/lib/patched-image", b"other")
        .done();
    let have = T::new().dir("/tmp").dir("/var").dir("/var/lib").done();
    let plan = run(&image(img, Some("")), &have, &[], Some("/tmp/.*"));
    assert!(plan.is_empty(), "{plan:#}");
    assert!(is_protected(&p("/.subd/objects"), None));
    assert!(!is_protected(&p("/.subdx"), None));
}

#[test]
fn directory_holding_filtered_names_is_kept() {
    let img = T::new().done();
    let have = T::new()
        .dir("/d")
        .file("/d/keep", b"k")
        .file("/d/x", b"x")
        .done();
    let i = image(img, Some("/d/keep$"));
    let plan = run(&i, &have, &[], None);
    assert_eq!(paths(&plan.paths_to_delete), ["/d/x"]);
}

#[test]
fn type_changes() {
    // (machine, image) for one path /p, and what the plan must hold.
    let cases: Vec<(T, T, &str)> = vec![
        (T::new().file("/p", b"f"), T::new().dir("/p"), "mkdir"),
        (
            T::new().dir("/p").file("/p/c", b"c"),
            T::new().file("/p", b"f"),
            "inode",
        ),
        (T::new().file("/p", b"f"), T::new().sym("/p", "/t"), "inode"),
        (T::new().sym("/p", "/t"), T::new().file("/p", b"f"), "inode"),
        (T::new().sym("/p", "/t"), T::new().dir("/p"), "mkdir"),
        (T::new().dir("/p"), T::new().sym("/p", "/t"), "inode"),
        (T::new().sym("/p", "/a"), T::new().sym("/p", "/b"), "inode"),
        (T::new().dev("/p", 1), T::new().dev("/p", 2), "inode"),
        (T::new().file("/p", b""), T::new().dev("/p", 2), "inode"),
    ];
    for (have, want, what) in cases {
        let (have, want) = (have.done(), want.done());
        for filter in [None, Some("")] {
            let i = image(want.clone(), filter);
            let plan = run(&i, &have, &[], None);
            match what {
                "mkdir" => assert_eq!(paths(plan.dirs_to_make.iter().map(|d| &d.path)), ["/p"]),
                _ => assert_eq!(paths(plan.inodes_to_make.iter().map(|d| &d.path)), ["/p"]),
            }
            // a directory replaced by a file takes its subtree: no separate deletion
            assert!(plan.paths_to_delete.is_empty(), "{plan:#}");
            assert_converges(&i, &have);
        }
    }
}

#[test]
fn hardlink_groups_join_without_fetching() {
    let have = T::new().file("/a", b"same").file("/b", b"same").done();
    let want = T::new().file("/a", b"same").link("/b", "/a").done();
    let i = image(want, Some(""));
    let plan = run(&i, &have, &[], None);
    assert!(plan.inodes_to_make.is_empty());
    assert_eq!(plan.hardlinks_to_make.len(), 1);
    assert_eq!(plan.hardlinks_to_make[0].path, p("/b"));
    assert_eq!(plan.hardlinks_to_make[0].target, p("/a"));
    assert!(plan.objects_to_fetch.is_empty());
    assert_converges(&i, &have);
}

#[test]
fn hardlink_groups_split_by_copying_local_content() {
    let have = T::new().file("/a", b"same").link("/b", "/a").done();
    let want = T::new().file("/a", b"same").file("/b", b"same").done();
    let i = image(want, Some(""));
    let plan = run(&i, &have, &[], None);
    assert_eq!(paths(plan.inodes_to_make.iter().map(|d| &d.path)), ["/b"]);
    assert!(plan.objects_to_fetch.is_empty());
    assert_eq!(plan.files_to_copy_to_cache.len(), 1);
    assert_converges(&i, &have);
}

#[test]
fn metadata_change_never_reaches_a_surviving_foreign_link() {
    // /f is filtered and shares /a's inode: chmod of /a would change /f, so /a is remade.
    let have = T::new().file("/a", b"x").link("/f", "/a").done();
    let want = T::new().file_m("/a", b"x", 0o600).done();
    let i = image(want, Some("/f$"));
    let plan = run(&i, &have, &[], None);
    assert!(plan.inodes_to_change.is_empty(), "{plan:#}");
    assert_eq!(paths(plan.inodes_to_make.iter().map(|d| &d.path)), ["/a"]);
    assert_converges(&i, &have);
}

#[test]
fn rename_of_identical_content_reuses_the_local_file() {
    let have = T::new().file("/old", b"content").done();
    let want = T::new().file("/new", b"content").done();
    let i = image(want, Some(""));
    let plan = run(&i, &have, &[], None);
    assert!(plan.objects_to_fetch.is_empty());
    assert_eq!(plan.files_to_copy_to_cache.len(), 1);
    assert_eq!(plan.files_to_copy_to_cache[0].path, p("/old"));
    assert_eq!(paths(&plan.paths_to_delete), ["/old"]);
    assert_converges(&i, &have);
}

#[test]
fn cached_objects_are_not_fetched_and_duplicates_fetched_once() {
    let have = T::new().done();
    let want = T::new()
        .file("/a", b"one")
        .file("/b", b"one")
        .file("/c", b"two")
        .done();
    let plan = run(&image(want, None), &have, &[ObjectId::of(b"two")], None);
    assert_eq!(plan.objects_to_fetch, [ObjectId::of(b"one")]);
    assert_eq!(object_uses(&plan)[&ObjectId::of(b"one")], 2);
}

#[test]
fn metadata_changes_setuid_owner_mtime() {
    let have = T::new()
        .dir("/bin")
        .file("/bin/su", b"su")
        .file("/bin/ls", b"ls")
        .file("/bin/own", b"o")
        .dev("/bin/dev", 7)
        .done();
    let want = T::new()
        .dir("/bin")
        .file_m("/bin/su", b"su", 0o4755)
        .file("/bin/ls", b"ls")
        .with("/bin/ls", |i| i.mtime = Mtime { sec: 1, nsec: 0 })
        .file("/bin/own", b"o")
        .with("/bin/own", |i| i.uid = 33)
        .dev("/bin/dev", 7)
        .with("/bin/dev", |i| i.mode = 0o666)
        .with("/", |i| i.mode = 0o700)
        .done();
    let i = image(want, None);
    let plan = run(&i, &have, &[], None);
    let changes: Vec<(String, bool)> = plan
        .inodes_to_change
        .iter()
        .map(|c| (c.path.display(), c.mtime_only))
        .collect();
    assert_eq!(
        changes,
        [
            ("/".to_string(), false),
            ("/bin/dev".to_string(), false),
            ("/bin/ls".to_string(), true),
            ("/bin/own".to_string(), false),
            ("/bin/su".to_string(), false),
        ]
    );
    assert!(plan.inodes_to_make.is_empty());
    let touched = paths(&plan.touched_paths());
    assert!(
        !touched.contains(&"/bin/ls".to_string()),
        "mtime-only fires nothing"
    );
    assert_converges(&i, &have);
}

#[test]
fn empty_files_need_no_object() {
    let plan = run(
        &image(T::new().file("/e", b"").done(), None),
        &T::new().done(),
        &[],
        None,
    );
    assert_eq!(plan.inodes_to_make.len(), 1);
    assert!(plan.objects_to_fetch.is_empty() && plan.files_to_copy_to_cache.is_empty());
}

#[test]
fn safety_check() {
    let mut big = T::new();
    for n in 0..10 {
        big = big.file(&format!("/f{n}"), format!("{n}").as_bytes());
    }
    let big = big.done();
    let tiny = T::new().file("/f0", b"0").done();
    let plan = run(&image(tiny.clone(), Some("")), &big, &[], None);
    assert!(
        plan.unsafe_reason
            .as_deref()
            .unwrap()
            .contains("would delete 9"),
        "{:?}",
        plan.unsafe_reason
    );
    let cache = BTreeSet::new();
    let ok = diff(
        "img",
        &image(tiny.clone(), Some("")),
        &Machine {
            tree: &big,
            object_cache: &cache,
            exclusions: None,
            hidden_parents: &[],
            seeded: &[],
        },
        &DiffOptions { allow_unsafe: true },
    );
    assert!(ok.unsafe_reason.is_none());
    assert_eq!(ok.paths_to_delete.len(), 9);
    // sparse images never delete, so are never unsafe
    assert!(run(&image(tiny, None), &big, &[], None)
        .unsafe_reason
        .is_none());
    // fewer than half as many inodes, without mass deletion: all names are links
    let mut linked = T::new().file("/a", b"a");
    for n in 0..6 {
        linked = linked.file(&format!("/x{n}"), b"a");
    }
    let want = {
        let mut w = T::new().file("/a", b"a");
        for n in 0..6 {
            w = w.link(&format!("/x{n}"), "/a");
        }
        w.done()
    };
    let plan = run(&image(want, Some("")), &linked.done(), &[], None);
    assert!(
        plan.unsafe_reason
            .as_deref()
            .unwrap()
            .contains("fewer than half"),
        "{:?}",
        plan.unsafe_reason
    );
}

#[test]
fn summary_counts_and_triggers() {
    let want = T::new().dir("/etc").file("/etc/ssh", b"conf").done();
    let mut i = image(want, Some(""));
    i.triggers = Triggers::parse(
        r#"[{"MatchLines":["/etc/ssh"],"Service":"sshd"},{"MatchLines":["/boot"],"Service":"k","DoReboot":true}]"#,
        "t",
    )
    .unwrap();
    let have = T::new().dir("/etc").file("/old", b"o").done();
    let plan = run(&i, &have, &[], None);
    let s = plan.summary();
    assert_eq!((s.to_add, s.to_delete, s.objects_to_fetch), (1, 1, 1));
    assert_eq!(s.services, ["sshd"]);
    assert!(!s.reboot);
    let text = format!("{plan:#}");
    assert!(text.contains("triggers: sshd"), "{text}");
    assert!(text.contains("+ -rw-r--r-- /etc/ssh"), "{text}");
    assert!(text.contains("- /old"), "{text}");
}

// ---- property: one update converges ----

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn one_update_converges(a in arb_tree(), b in arb_tree(), full in any::<bool>()) {
        let img = image(b, full.then_some(""));
        let cache = BTreeSet::new();
        let m = Machine { tree: &a, object_cache: &cache, exclusions: None, hidden_parents: &[], seeded: &[] };
        let plan = diff("img", &img, &m, &DiffOptions { allow_unsafe: true });
        let after = simulate(&a, &plan);
        let m2 = Machine { tree: &after, object_cache: &cache, exclusions: None, hidden_parents: &[], seeded: &[] };
        let again = diff("img", &img, &m2, &DiffOptions { allow_unsafe: true });
        prop_assert!(again.is_empty(), "plan {plan:#} second {again:#}");
        if full {
            // the result is the image, inode for inode up to numbering
            prop_assert_eq!(after.entries.len(), img.tree.entries.len());
        }
    }
}

#[test]
fn a_modified_file_is_a_change_naming_what_differs_not_an_addition() {
    let want = T::new()
        .dir("/etc")
        .file_m("/etc/app.conf", b"new", 0o600)
        .file("/etc/new", b"n")
        .done();
    let i = image(want, None);
    // (the machine's /etc/app.conf, what differs)
    let cases: Vec<(FileTree, Vec<Aspect>)> = vec![
        (
            T::new().dir("/etc").file("/etc/app.conf", b"old").done(),
            vec![Aspect::Content, Aspect::Mode],
        ),
        (
            T::new()
                .dir("/etc")
                .file_m("/etc/app.conf", b"old", 0o600)
                .with("/etc/app.conf", |i| {
                    i.uid = 7;
                    i.mtime = Mtime { sec: 9, nsec: 0 };
                })
                .done(),
            vec![Aspect::Content, Aspect::Owner, Aspect::Mtime],
        ),
        (
            T::new().dir("/etc").sym("/etc/app.conf", "/x").done(),
            vec![Aspect::Kind],
        ),
    ];
    for (have, what) in cases {
        let plan = run(&i, &have, &[], None);
        assert_eq!(plan.replaced_at(&p("/etc/app.conf")), Some(what.as_slice()));
        assert_eq!(plan.replaced_at(&p("/etc/new")), None);
        let s = plan.summary();
        assert_eq!((s.to_add, s.to_replace), (1, 1));
        let text = format!("{plan:#}");
        assert!(text.contains("add 1, change 1"), "{text}");
        let line = format!("~ -rw------- /etc/app.conf ({})", Aspect::list(&what));
        assert!(text.contains(&line), "{text}");
        assert!(text.contains("+ -rw-r--r-- /etc/new"), "{text}");
    }
    // A plan from an earlier version (no `replaced`) still loads: its changes read as adds.
    let old: UpdatePlan = serde_json::from_str(r#"{"image_name":"x","sparse":true}"#).unwrap();
    assert!(old.replaced.is_empty());
}
