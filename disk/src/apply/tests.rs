//! `apply` on real directories: convergence (tables and a property test), path safety,
//! trigger order and command timeouts.

use super::*;
use crate::scan::{scan_full, ScanOptions};
use model::diff::{diff, DiffOptions, Machine};
use model::image::{FileTree, Image, Mtime};
use model::plan::{Hardlink, MetadataChange, PathInode};
use proptest::prelude::*;
use std::collections::HashMap;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::PathBuf;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn p(s: &str) -> FsPath {
    s.parse().unwrap()
}

/// Writes `tree` into the empty directory `dir` (independently of `apply`).
fn materialize(tree: &FileTree, dir: &Path, contents: &HashMap<ObjectId, Vec<u8>>) {
    let mut first: HashMap<u64, PathBuf> = HashMap::new();
    for (path, ino) in &tree.entries {
        let full = dir.join(path.relative_os());
        let i = &tree.inodes[ino];
        if !path.is_root() {
            if let Some(f) = first.get(ino) {
                std::fs::hard_link(f, &full).unwrap();
                continue;
            }
            match i.kind {
                Kind::Dir => std::fs::create_dir(&full).unwrap(),
                Kind::File => {
                    std::fs::write(&full, i.hash.map_or(&[][..], |h| &contents[&h])).unwrap()
                }
                Kind::Symlink => symlink(
                    std::ffi::OsStr::from_bytes(i.target.as_ref().unwrap()),
                    &full,
                )
                .unwrap(),
                Kind::Char | Kind::Block | Kind::Fifo => {
                    let ft = match i.kind {
                        Kind::Char => FileType::CharacterDevice,
                        Kind::Block => FileType::BlockDevice,
                        _ => FileType::Fifo,
                    };
                    rustix::fs::mknodat(CWD, &full, ft, Mode::from_raw_mode(0o600), i.rdev)
                        .unwrap();
                }
            }
            first.insert(*ino, full.clone());
        }
        let (fd, o_path) = {
            let parent = full.parent().unwrap();
            let pfd = rustix::fs::open(parent, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
                .unwrap();
            let name = if path.is_root() {
                b".".to_vec()
            } else {
                path.name().to_vec()
            };
            if path.is_root() {
                (
                    rustix::fs::open(&full, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
                        .unwrap(),
                    false,
                )
            } else {
                open_inode(pfd.as_fd(), &name, i.kind).unwrap()
            }
        };
        set_metadata(&fd, o_path, i).unwrap();
    }
}
use std::os::unix::ffi::OsStrExt;

struct Fixture {
    _d: tempfile::TempDir,
    root: PathBuf,
    /// `ROOT/.subd`, for looking at what apply left there.
    state: PathBuf,
    /// The same, opened as subd opens it.
    sd: StateDir,
}

fn fixture() -> Fixture {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let state = root.join(".subd");
    let sd = StateDir::open(&root).unwrap();
    Fixture {
        _d: d,
        root,
        state,
        sd,
    }
}

/// scan → diff → put fetched objects in the cache → apply.
fn converge(
    f: &Fixture,
    img: &Image,
    contents: &HashMap<ObjectId, Vec<u8>>,
    opts: &ApplyOptions,
) -> (UpdatePlan, UpdateResult) {
    let scanned = scan_full(
        &f.root,
        &ScanOptions {
            exclude: opts.exclusions.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    let (have, hidden): (_, Vec<_>) = (scanned.tree, scanned.hidden_parents.into_iter().collect());
    let store = f.sd.objects().unwrap();
    let cache: BTreeSet<ObjectId> = store.list().unwrap().into_iter().map(|(h, _)| h).collect();
    let plan = diff(
        "test/1",
        img,
        &Machine {
            tree: &have,
            object_cache: &cache,
            exclusions: opts.exclusions.as_ref(),
            hidden_parents: &hidden,
            seeded: &[],
        },
        &DiffOptions { allow_unsafe: true },
    );
    for h in &plan.objects_to_fetch {
        store.put(&contents[h]).unwrap();
    }
    let result = apply(&f.root, &f.sd, &plan, opts);
    (plan, result)
}

fn rediff(f: &Fixture, img: &Image, opts: &ApplyOptions) -> UpdatePlan {
    let scanned = scan_full(
        &f.root,
        &ScanOptions {
            exclude: opts.exclusions.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    let (have, hidden): (_, Vec<_>) = (scanned.tree, scanned.hidden_parents.into_iter().collect());
    let cache = BTreeSet::new();
    diff(
        "test/1",
        img,
        &Machine {
            tree: &have,
            object_cache: &cache,
            exclusions: opts.exclusions.as_ref(),
            hidden_parents: &hidden,
            seeded: &[],
        },
        &DiffOptions { allow_unsafe: true },
    )
}

/// A tree builder over real content.
struct B {
    tree: FileTree,
    contents: HashMap<ObjectId, Vec<u8>>,
    next: u64,
}

const M: Mtime = Mtime {
    sec: 1_600_000_000,
    nsec: 123_456_789,
};

impl B {
    fn new() -> B {
        B {
            tree: FileTree::with_root(Inode::dir(0o755, 0, 0)),
            contents: HashMap::new(),
            next: 10,
        }
    }
    fn add(mut self, path: &str, i: Inode) -> B {
        self.next += 1;
        self.tree.inodes.insert(self.next, i);
        self.tree.entries.insert(p(path), self.next);
        self
    }
    fn dir(self, path: &str, mode: u32) -> B {
        self.add(path, Inode::dir(mode, 0, 0))
    }
    fn file(mut self, path: &str, data: &[u8], mode: u32, uid: u32) -> B {
        let h = ObjectId::of(data);
        self.contents.insert(h, data.to_vec());
        self.add(
            path,
            Inode::file(mode, uid, uid, M, data.len() as u64, Some(h)),
        )
    }
    fn link(mut self, path: &str, to: &str) -> B {
        let ino = self.tree.entries[&p(to)];
        self.tree.entries.insert(p(path), ino);
        self
    }
    fn image(&self, filter: Option<&str>) -> Image {
        self.tree.validate().unwrap();
        Image::new(
            self.tree.clone(),
            filter.map(|f| Filter::parse(f, "f").unwrap()),
            Triggers::default(),
        )
    }
}

fn meta(f: &Fixture, path: &str) -> std::fs::Metadata {
    std::fs::symlink_metadata(f.root.join(path.trim_start_matches('/'))).unwrap()
}

#[test]
fn full_image_restores_kinds_owners_modes_links_and_deletes_extras() {
    let f = fixture();
    // the machine: drifted content, wrong modes, extras, a symlink where a dir goes
    std::fs::create_dir_all(f.root.join("etc")).unwrap();
    std::fs::write(f.root.join("etc/passwd"), b"drifted").unwrap();
    std::fs::write(f.root.join("etc/extra"), b"x").unwrap();
    std::fs::create_dir_all(f.root.join("junk/deep")).unwrap();
    std::fs::create_dir_all(f.root.join("keep")).unwrap();
    std::fs::write(f.root.join("keep/mine"), b"mine").unwrap();
    symlink("/etc", f.root.join("bin")).unwrap();
    let mut b = B::new()
        .dir("/etc", 0o755)
        .file("/etc/passwd", b"root:x:0:0\n", 0o644, 0)
        .dir("/bin", 0o755)
        .file("/bin/su", b"su binary", 0o4755, 0)
        .link("/bin/su2", "/bin/su")
        .file("/bin/owned", b"o", 0o640, 33)
        .add("/bin/sh", Inode::symlink(0, 0, b"dash".to_vec()))
        .add("/fifo", {
            let mut i = Inode::new(Kind::Fifo, 0o620, 0, 0);
            i.mtime = M;
            i
        })
        .add("/empty", Inode::file(0o600, 0, 0, M, 0, None));
    if is_root() {
        let mut d = Inode::new(Kind::Char, 0o666, 0, 0);
        d.rdev = rustix::fs::makedev(1, 3);
        d.mtime = M;
        b = b.add("/null", d);
    }
    let img = b.image(Some("/keep(|/.*)$"));
    let opts = ApplyOptions::default();
    let (plan, r) = converge(&f, &img, &b.contents, &opts);
    assert!(r.errors.is_empty(), "{:?}\n{plan:#}", r.errors);
    assert_eq!(
        std::fs::read(f.root.join("etc/passwd")).unwrap(),
        b"root:x:0:0\n"
    );
    assert!(!f.root.join("etc/extra").exists() && !f.root.join("junk").exists());
    assert_eq!(
        std::fs::read(f.root.join("keep/mine")).unwrap(),
        b"mine",
        "filtered path untouched"
    );
    assert_eq!(meta(&f, "/bin/su").mode() & 0o7777, 0o4755);
    assert_eq!(meta(&f, "/bin/su").ino(), meta(&f, "/bin/su2").ino());
    assert_eq!(meta(&f, "/bin/su").mtime_nsec(), 123_456_789);
    assert_eq!(
        std::fs::read_link(f.root.join("bin/sh")).unwrap().to_str(),
        Some("dash")
    );
    assert!(meta(&f, "/fifo").file_type().is_fifo());
    if is_root() {
        assert_eq!(meta(&f, "/bin/owned").uid(), 33);
        assert!(meta(&f, "/null").file_type().is_char_device());
    }
    assert!(r.activation_ms >= 0.0 && r.activation_ms < 5000.0);
    let again = rediff(&f, &img, &opts);
    assert!(again.is_empty(), "{again:#}");
    assert!(f.root.join(".subd/objects").exists(), "state dir untouched");
}

use std::os::unix::fs::FileTypeExt;

#[test]
fn drift_in_metadata_only_is_fixed_in_place() {
    let f = fixture();
    let b = B::new()
        .dir("/bin", 0o755)
        .file("/bin/su", b"su", 0o4755, 0);
    let img = b.image(None);
    let opts = ApplyOptions::default();
    converge(&f, &img, &b.contents, &opts);
    let ino = meta(&f, "/bin/su").ino();
    std::fs::set_permissions(
        f.root.join("bin/su"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let (plan, r) = converge(&f, &img, &b.contents, &opts);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(plan.inodes_to_change.len(), 1);
    assert_eq!(meta(&f, "/bin/su").mode() & 0o7777, 0o4755);
    assert_eq!(meta(&f, "/bin/su").ino(), ino, "same inode");
}

/// A full image applied completely is recorded in `/var/lib/patched-image` (when
/// `/var/lib` exists); an update with errors leaves the record as it was; either way the
/// staging directory ends empty.
#[test]
fn a_complete_full_update_records_its_image_in_var_lib_patched_image() {
    let f = fixture();
    let staging_empty = || {
        std::fs::read_dir(f.state.join("staging"))
            .unwrap()
            .next()
            .is_none()
    };
    let record = f.root.join("var/lib/patched-image");
    let opts = ApplyOptions::default();
    let b = B::new().dir("/etc", 0o755).file("/etc/a", b"a", 0o644, 0);
    let (_, r) = converge(&f, &b.image(Some("")), &b.contents, &opts);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(!f.root.join("var").exists(), "no /var/lib, no record");
    assert!(staging_empty());
    let b = b.dir("/var", 0o755).dir("/var/lib", 0o755);
    let (_, r) = converge(&f, &b.image(Some("")), &b.contents, &opts);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(std::fs::read(&record).unwrap(), b"test/1\n");
    assert!(staging_empty());
    // an object missing from the cache: an error, and the record stays as it was
    let plan = UpdatePlan {
        image_name: "test/2".into(),
        sparse: false,
        inodes_to_make: vec![PathInode {
            path: p("/etc/b"),
            inode: Inode::file(0o644, 0, 0, M, 6, Some(ObjectId::of(b"absent"))),
        }],
        ..UpdatePlan::default()
    };
    let r = apply(&f.root, &f.sd, &plan, &opts);
    assert!(!r.errors.is_empty());
    assert_eq!(std::fs::read(&record).unwrap(), b"test/1\n");
    assert!(staging_empty());
}

#[test]
fn sparse_image_leaves_everything_else_alone() {
    let f = fixture();
    std::fs::write(f.root.join("other"), b"o").unwrap();
    std::fs::set_permissions(f.root.join("other"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = meta(&f, "/other");
    let b = B::new()
        .dir("/app", 0o750)
        .file("/app/conf", b"c", 0o644, 0);
    let (plan, r) = converge(&f, &b.image(None), &b.contents, &ApplyOptions::default());
    assert!(r.errors.is_empty() && plan.paths_to_delete.is_empty());
    let after = meta(&f, "/other");
    assert_eq!(
        (before.ino(), before.mode(), before.mtime_nsec()),
        (after.ino(), after.mode(), after.mtime_nsec())
    );
    assert_eq!(meta(&f, "/app").mode() & 0o7777, 0o750);
}

#[test]
fn a_full_image_keeps_directories_holding_excluded_entries() {
    // The seed's full-image recipe on a tree without /tmp or /var: the machine's /tmp and
    // /var/log hold excluded files, so those directories stay; everything else goes.
    let f = fixture();
    for d in ["tmp", "var/log", "old"] {
        std::fs::create_dir_all(f.root.join(d)).unwrap();
    }
    std::fs::write(f.root.join("tmp/x"), b"x").unwrap();
    std::fs::write(f.root.join("var/log/y"), b"y").unwrap();
    std::fs::write(f.root.join("var/junk"), b"j").unwrap();
    std::fs::write(f.root.join("old/f"), b"f").unwrap();
    let opts = ApplyOptions {
        exclusions: Some(Filter::parse("/tmp/.*\n/var/log/.*\n", "e").unwrap()),
        ..Default::default()
    };
    let b = B::new()
        .dir("/etc", 0o755)
        .file("/etc/passwd", b"root", 0o644, 0);
    let (plan, r) = converge(&f, &b.image(Some("")), &b.contents, &opts);
    assert!(r.errors.is_empty(), "{:?}\n{plan:#}", r.errors);
    assert_eq!(
        plan.paths_to_delete,
        [p("/old"), p("/var/junk")],
        "only what no excluded entry needs: {plan:#}"
    );
    assert_eq!(std::fs::read(f.root.join("tmp/x")).unwrap(), b"x");
    assert_eq!(std::fs::read(f.root.join("var/log/y")).unwrap(), b"y");
    assert!(!f.root.join("old").exists() && !f.root.join("var/junk").exists());
    let again = rediff(&f, &b.image(Some("")), &opts);
    assert!(
        again.is_empty(),
        "converged, not deleting /tmp forever: {again:#}"
    );
}

#[test]
fn bad_paths_are_refused_and_symlinks_never_followed() {
    let f = fixture();
    let outside = f._d.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"safe").unwrap();
    std::fs::set_permissions(
        outside.join("victim"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    symlink(&outside, f.root.join("link")).unwrap();
    symlink(outside.join("victim"), f.root.join("filelink")).unwrap();
    let evil = Inode::file(0o777, 0, 0, M, 0, None);
    let plan = UpdatePlan {
        image_name: "evil".into(),
        sparse: true,
        inodes_to_make: vec![
            PathInode {
                path: p("/link/victim"),
                inode: evil.clone(),
            },
            PathInode {
                path: p("/.subd/objects/x"),
                inode: evil.clone(),
            },
        ],
        dirs_to_make: vec![PathInode {
            path: p("/link/newdir"),
            inode: Inode::dir(0o777, 0, 0),
        }],
        paths_to_delete: vec![p("/link/victim"), p("/.subd")],
        inodes_to_change: vec![
            MetadataChange {
                path: p("/filelink"),
                inode: evil.clone(),
                mtime_only: false,
            },
            MetadataChange {
                path: p("/link/victim"),
                inode: evil.clone(),
                mtime_only: false,
            },
        ],
        hardlinks_to_make: vec![Hardlink {
            path: p("/stolen"),
            target: p("/link/victim"),
        }],
        ..UpdatePlan::default()
    };
    let r = apply(&f.root, &f.sd, &plan, &ApplyOptions::default());
    let all = r.errors.join("\n");
    for want in [
        "refused: /.subd/objects/x",
        "refused: /.subd:",
        "a component is a symlink",
        "change /filelink",
    ] {
        assert!(all.contains(want), "{want:?} not in\n{all}");
    }
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"safe");
    assert_eq!(
        std::fs::metadata(outside.join("victim")).unwrap().mode() & 0o777,
        0o600
    );
    assert!(!outside.join("newdir").exists());
    assert!(!f.root.join("stolen").exists());
    assert!(f.root.join(".subd").exists());
    // the excluded and always-excluded paths too
    let plan = UpdatePlan {
        image_name: "x".into(),
        sparse: true,
        inodes_to_make: vec![
            PathInode {
                path: p("/tmp/x"),
                inode: evil.clone(),
            },
            PathInode {
                path: p("/var/lib/patched-image"),
                inode: evil,
            },
        ],
        ..UpdatePlan::default()
    };
    let opts = ApplyOptions {
        exclusions: Some(Filter::parse("/tmp/.*", "e").unwrap()),
        ..Default::default()
    };
    let r = apply(&f.root, &f.sd, &plan, &opts);
    assert_eq!(r.errors.len(), 2, "{:?}", r.errors);
}

#[test]
fn unsafe_plans_and_missing_objects_are_reported() {
    let f = fixture();
    let plan = UpdatePlan {
        unsafe_reason: Some("too much".into()),
        ..UpdatePlan::default()
    };
    let r = apply(&f.root, &f.sd, &plan, &ApplyOptions::default());
    assert!(r.errors[0].contains("unsafe"), "{:?}", r.errors);
    let h = ObjectId::of(b"absent");
    let plan = UpdatePlan {
        sparse: true,
        inodes_to_make: vec![PathInode {
            path: p("/f"),
            inode: Inode::file(0o644, 0, 0, M, 6, Some(h)),
        }],
        ..UpdatePlan::default()
    };
    let r = apply(&f.root, &f.sd, &plan, &ApplyOptions::default());
    assert!(
        r.errors[0].contains("is not in the cache"),
        "{:?}",
        r.errors
    );
    assert!(!f.root.join("f").exists());
}

/// A service command that appends `NAME ACTION <content of /etc/app.conf>` to a log.
fn recorder(f: &Fixture, body: &str) -> (Vec<String>, PathBuf) {
    let log = f._d.path().join("log");
    let script = f._d.path().join("svc.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n{body}\necho \"$1 $2 $(cat {}/etc/app.conf 2>/dev/null)\" >> {}\n",
            f.root.display(),
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (vec![script.display().to_string()], log)
}

fn triggers(json: &str) -> Triggers {
    Triggers::parse(json, "t").unwrap()
}

#[test]
fn triggers_stop_before_and_start_after_the_change() {
    let f = fixture();
    let (cmd, log) = recorder(&f, "");
    let opts = ApplyOptions {
        service_command: Some(cmd),
        ..Default::default()
    };
    // first image: app v1, triggers for "app" and for "old"
    let b1 = B::new()
        .dir("/etc", 0o755)
        .file("/etc/app.conf", b"v1", 0o644, 0);
    let mut img1 = b1.image(None);
    img1.triggers = triggers(
        r#"[{"MatchLines":["/etc/app"],"Service":"app"},{"MatchLines":["/etc/app"],"Service":"old"}]"#,
    );
    let (_, r) = converge(&f, &img1, &b1.contents, &opts);
    assert!(r.trigger_failures.is_empty(), "{:?}", r.trigger_failures);
    std::fs::remove_file(&log).unwrap();
    // second image drops "old", adds a reload-only "web"
    let b2 = B::new()
        .dir("/etc", 0o755)
        .file("/etc/app.conf", b"v2", 0o644, 0);
    let mut img2 = b2.image(None);
    img2.triggers = triggers(
        r#"[{"MatchLines":["/etc/app"],"Service":"app"},{"MatchLines":["/etc/app"],"Service":"web","DoReload":true}]"#,
    );
    let (_, r) = converge(&f, &img2, &b2.contents, &opts);
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        lines,
        [
            "app stop v1",
            "old stop v1",
            "app start v2",
            "web reload v2"
        ],
        "{r:?}"
    );
    assert_eq!(
        r.trigger_actions,
        ["app stop", "old stop", "app start", "web reload"]
    );
    // an mtime-only change fires nothing
    std::fs::remove_file(&log).unwrap();
    let t = filetime_set(&f.root.join("etc/app.conf"));
    let (plan, r) = converge(&f, &img2, &b2.contents, &opts);
    assert!(plan.inodes_to_change[0].mtime_only, "{t}");
    assert!(r.trigger_actions.is_empty() && !log.exists(), "{r:?}");
}

fn filetime_set(path: &Path) -> i64 {
    let t = Timespec {
        tv_sec: 5,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::empty(),
    )
    .unwrap();
    5
}

#[test]
fn starts_owed_by_an_interrupted_update_are_run_later() {
    let f = fixture();
    // The service command records whether the owed starts were on disk when it stopped.
    let (cmd, log) = recorder(
        &f,
        &format!(
            "[ \"$2\" = stop ] && cat {}/pending-starts >> {}/owed",
            f.state.display(),
            f._d.path().display()
        ),
    );
    let opts = ApplyOptions {
        service_command: Some(cmd),
        ..Default::default()
    };
    let b = B::new()
        .dir("/etc", 0o755)
        .file("/etc/app.conf", b"v1", 0o644, 0);
    let mut img = b.image(None);
    img.triggers = triggers(r#"[{"MatchLines":["/etc/app[.]conf"],"Service":"app"}]"#);
    converge(&f, &img, &b.contents, &opts);
    let _ = std::fs::remove_file(f._d.path().join("owed"));
    let b2 = B::new()
        .dir("/etc", 0o755)
        .file("/etc/app.conf", b"v2", 0o644, 0);
    let mut img2 = b2.image(None);
    img2.triggers = img.triggers.clone();
    let (_, r) = converge(&f, &img2, &b2.contents, &opts);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let owed = std::fs::read_to_string(f._d.path().join("owed")).unwrap();
    assert_eq!(owed, r#"[["app","start"]]"#, "recorded before the stop");
    assert!(!f.state.join(PENDING_STARTS).exists(), "forgotten once run");
    // A crash between stop and start leaves them on disk: they are run when subd starts.
    std::fs::write(f.state.join(PENDING_STARTS), r#"[["app","start"]]"#).unwrap();
    std::fs::write(&log, "").unwrap();
    let (done, failed) = resume_pending_starts(&f.sd, &opts);
    assert_eq!((done, failed), (vec!["app start".to_string()], vec![]));
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .starts_with("app start"));
    assert!(!f.state.join(PENDING_STARTS).exists());
    assert_eq!(resume_pending_starts(&f.sd, &opts), (vec![], vec![]));
}

#[test]
fn failing_and_hanging_service_commands_are_reported() {
    let f = fixture();
    let (cmd, _) = recorder(
        &f,
        "[ \"$1\" = hang ] && sleep 30\n[ \"$1\" = fail ] && { echo \"$1: unrecognized service\" >&2; exit 3; }",
    );
    let opts = ApplyOptions {
        service_command: Some(cmd),
        command_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let b = B::new().file("/x", b"x", 0o644, 0);
    let mut img = b.image(None);
    img.triggers = triggers(
        r#"[{"MatchLines":["/x"],"Service":"fail"},{"MatchLines":["/x"],"Service":"hang"}]"#,
    );
    let t0 = Instant::now();
    let (_, r) = converge(&f, &img, &b.contents, &opts);
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let all = r.trigger_failures.join("\n");
    assert!(
        all.contains("fail stop: exit status: 3 (fail: unrecognized service)"),
        "the command's own last line is in the error: {all}"
    );
    assert!(all.contains("hang stop: timed out"), "{all}");
    assert_eq!(
        std::fs::read(f.root.join("x")).unwrap(),
        b"x",
        "the update still happened"
    );
}

#[test]
fn reboot_trigger_skips_stops_and_runs_the_reboot_command() {
    let f = fixture();
    let (cmd, log) = recorder(&f, "");
    let marker = f._d.path().join("rebooted");
    let reboot = vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("touch {}", marker.display()),
    ];
    let opts = ApplyOptions {
        service_command: Some(cmd),
        reboot_command: Some(reboot),
        ..Default::default()
    };
    let b = B::new().file("/kernel", b"k", 0o644, 0);
    let mut img = b.image(None);
    img.triggers = triggers(
        r#"[{"MatchLines":["/kernel"],"Service":"kexec","DoReboot":true},{"MatchLines":["/kernel"],"Service":"app"}]"#,
    );
    let (_, r) = converge(&f, &img, &b.contents, &opts);
    let lines = std::fs::read_to_string(&log).unwrap();
    assert_eq!(lines.trim(), "kexec start", "{r:?}");
    assert!(marker.exists());
}

#[test]
fn an_object_several_inodes_need_is_duplicated() {
    let f = fixture();
    let b = B::new()
        .file("/a", b"same", 0o644, 0)
        .file("/b", b"same", 0o600, 0)
        .file("/c", b"same", 0o640, 0);
    let (plan, r) = converge(&f, &b.image(None), &b.contents, &ApplyOptions::default());
    assert_eq!(plan.objects_to_fetch.len(), 1);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    for n in ["a", "b", "c"] {
        assert_eq!(std::fs::read(f.root.join(n)).unwrap(), b"same");
    }
}

/// Enough inodes that staging runs over several lanes: every object is needed by several
/// files, its last use taking mode 000 in the cache, and every copy still gets the bytes
/// (the copies are staged before any last use changes the cache's object).
#[test]
fn many_inodes_sharing_objects_are_staged_over_lanes_with_every_copy_whole() {
    let f = fixture();
    let mut b = B::new().dir("/d", 0o755);
    for n in 0..(4 * crate::lanes::MIN_PER_LANE) {
        let data = format!("object {}", n % 7);
        b = b.file(
            &format!("/d/f{n:04}"),
            data.as_bytes(),
            [0o644, 0o000][n % 2],
            0,
        );
    }
    let (plan, r) = converge(&f, &b.image(None), &b.contents, &ApplyOptions::default());
    assert_eq!(plan.objects_to_fetch.len(), 7);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    for n in 0..(4 * crate::lanes::MIN_PER_LANE) {
        let path = f.root.join(format!("d/f{n:04}"));
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(m.mode() & 0o7777, [0o644, 0o000][n % 2], "{n}");
        assert_eq!(m.mtime(), M.sec);
        if is_root() || n % 2 == 0 {
            assert_eq!(
                std::fs::read(&path).unwrap(),
                format!("object {}", n % 7).as_bytes()
            );
        }
    }
    assert_eq!(
        rediff(&f, &b.image(None), &ApplyOptions::default())
            .inodes_to_make
            .len(),
        0
    );
}

/// Everything under `dir`, as (relative path, content or "<dir>"), sorted.
fn listing(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if e.file_type().unwrap().is_dir() {
            out.push((name.clone(), "<dir>".to_string()));
            for (n, c) in listing(&e.path()) {
                out.push((format!("{name}/{n}"), c));
            }
        } else {
            let c = std::fs::read(e.path()).unwrap_or_default();
            out.push((name, String::from_utf8_lossy(&c).to_string()));
        }
    }
    out.sort();
    out
}

#[test]
fn a_state_dir_swapped_for_a_symlink_while_open_is_never_followed() {
    let f = fixture();
    // What a local user who can write the root prepares: a directory outside the root
    // holding files subd would overwrite or delete, and `.subd` swapped for a link to it.
    let outside = f._d.path().join("outside");
    std::fs::create_dir_all(outside.join("staging")).unwrap();
    std::fs::write(outside.join("staging/0"), "victim").unwrap();
    std::fs::write(outside.join(PREVIOUS_TRIGGERS), "planted").unwrap();
    std::fs::write(outside.join(PENDING_STARTS), r#"[["evil","start"]]"#).unwrap();
    let before = listing(&outside);
    std::fs::rename(&f.state, f.root.join("moved")).unwrap();
    symlink(&outside, &f.state).unwrap();
    let (cmd, log) = recorder(&f, "");
    let opts = ApplyOptions {
        service_command: Some(cmd),
        ..Default::default()
    };
    let b = B::new()
        .dir("/etc", 0o755)
        .file("/etc/app.conf", b"v1", 0o644, 0);
    let mut img = b.image(None);
    img.triggers = triggers(r#"[{"MatchLines":["/etc/app[.]conf"],"Service":"app"}]"#);
    let (_, r) = converge(&f, &img, &b.contents, &opts);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(std::fs::read(f.root.join("etc/app.conf")).unwrap(), b"v1");
    assert_eq!(
        listing(&outside),
        before,
        "nothing outside the root changed"
    );
    let log = std::fs::read_to_string(log).unwrap();
    assert!(!log.contains("evil"), "no planted start ran: {log}");
    assert!(
        f.root.join("moved").join(PREVIOUS_TRIGGERS).exists(),
        "the state went to the directory opened at start"
    );
}

fn contents_for(t: &FileTree) -> HashMap<ObjectId, Vec<u8>> {
    let mut m = HashMap::new();
    for c in [&b"1"[..], b"2", b"3"] {
        m.insert(ObjectId::of(c), c.to_vec());
    }
    let _ = t;
    m
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn applying_a_diff_to_a_real_tree_converges(
        a in model::testing::arb_tree(),
        b in model::testing::arb_tree(),
        full in any::<bool>(),
    ) {
        let f = fixture();
        let contents = contents_for(&a);
        // fix the generated mtimes into the past so the kernel keeps them exactly
        materialize(&a, &f.root, &contents);
        let img = model::testing::image(b, full.then_some(""));
        let opts = ApplyOptions::default();
        let (plan, r) = converge(&f, &img, &contents, &opts);
        prop_assert!(r.errors.is_empty(), "{:?}\n{plan:#}", r.errors);
        let again = rediff(&f, &img, &opts);
        prop_assert!(again.is_empty(), "first {plan:#}\nsecond {again:#}");
    }
}

/// Applies `plan` to the fixture, returning the result and each failure typed.
fn apply_typed(f: &Fixture, plan: &UpdatePlan) -> (UpdateResult, Vec<ApplyError>) {
    update(&f.root, &f.sd, plan, &ApplyOptions::default(), None).finish()
}

#[test]
fn failures_are_typed_by_step_path_call_and_errno() {
    let f = fixture();
    std::fs::write(f.root.join("file"), b"").unwrap();
    let plan = UpdatePlan {
        image_name: "x".into(),
        sparse: true,
        dirs_to_make: vec![PathInode {
            path: p("/file/d"),
            inode: Inode::dir(0o755, 0, 0),
        }],
        inodes_to_make: vec![PathInode {
            path: p("/missing/f"),
            inode: Inode::file(0o644, 0, 0, M, 0, None),
        }],
        hardlinks_to_make: vec![Hardlink {
            path: p("/l"),
            target: p("/nope"),
        }],
        paths_to_delete: vec![p("/.subd/x")],
        ..UpdatePlan::default()
    };
    let (r, failures) = apply_typed(&f, &plan);
    assert_eq!(r.errors.len(), failures.len());
    let by_step = |s: Step| {
        failures
            .iter()
            .find(|e| e.step_of() == Some(s))
            .unwrap_or_else(|| panic!("no {s:?} failure in {failures:?}"))
    };

    // A missing parent: the walk to it fails with ENOENT, naming the directory.
    let install = by_step(Step::Install);
    assert_eq!(install.path(), Some(&p("/missing/f")));
    assert_eq!(install.op(), Some(Op::Open));
    assert_eq!(install.errno(), Some(Errno::NOENT));
    let ApplyError::Step { cause, .. } = install else {
        unreachable!()
    };
    assert_eq!(cause.path(), Some(&p("/missing")));
    assert_eq!(
        install.to_string(),
        format!(
            "install /missing/f: /missing: {}",
            io::Error::from(Errno::NOENT)
        )
    );

    // A parent that is a file: refused by rule, not by a call.
    let mkdir = by_step(Step::Mkdir);
    assert!(
        matches!(mkdir, ApplyError::Step { cause: Cause::NotADirectory(d), .. } if *d == p("/file")),
        "{mkdir:?}"
    );
    assert_eq!((mkdir.op(), mkdir.errno()), (None, None));
    assert_eq!(
        mkdir.to_string(),
        "mkdir /file/d: /file: a component is a symlink or not a directory"
    );

    // A link to a missing target: link(2) with ENOENT, on the target.
    let link = by_step(Step::Hardlink);
    assert_eq!(link.path(), Some(&p("/l")));
    assert_eq!(
        (link.op(), link.errno()),
        (Some(Op::Link), Some(Errno::NOENT))
    );
    assert!(
        link.to_string()
            .starts_with("hardlink /l: link from /nope: "),
        "{link}"
    );

    // A protected path: refused before anything runs.
    assert!(
        failures
            .iter()
            .any(|e| matches!(e, ApplyError::Refused(q) if *q == p("/.subd/x"))),
        "{failures:?}"
    );
    assert!(r
        .errors
        .contains(&"refused: /.subd/x: the root, under /.subd, or excluded".to_string()));
}

#[test]
fn an_object_missing_from_the_cache_is_typed_as_such() {
    let f = fixture();
    let h = ObjectId::of(b"absent");
    let plan = UpdatePlan {
        sparse: true,
        inodes_to_make: vec![PathInode {
            path: p("/f"),
            inode: Inode::file(0o644, 0, 0, M, 6, Some(h)),
        }],
        ..UpdatePlan::default()
    };
    let (_, failures) = apply_typed(&f, &plan);
    assert!(
        matches!(
            &failures[..],
            [ApplyError::Step { step: Step::Stage, cause: Cause::NotInCache(x), .. }] if *x == h
        ),
        "{failures:?}"
    );
}

/// The metadata a fetch gives an object ahead of its last use is only a head start: when
/// it is the image's, the stage takes the object as it is; when it is not (another use's,
/// or stale), the stage sets the image's.
#[test]
fn metadata_given_ahead_is_kept_when_right_and_set_again_when_not() {
    let f = fixture();
    let store = f.sd.objects().unwrap();
    let want = |mode| Inode::file(mode, 0, 0, M, 5, Some(ObjectId::of(b"data1")));
    for (n, (given, wanted)) in [(0o640, 0o640), (0o600, 0o755), (0o4755, 0o644)]
        .into_iter()
        .enumerate()
    {
        let data = format!("data{n}");
        let h = ObjectId::of(data.as_bytes());
        let mut w = store.writer(h, 5).unwrap();
        w.write_all(data.as_bytes()).unwrap();
        let mut ahead = want(given);
        ahead.mtime.sec -= 1000 * n as i64;
        let pending = w
            .finish_preparing(|f| give_final_metadata(f, &ahead).is_ok())
            .unwrap();
        store.commit(vec![pending]).unwrap();
        let mut inode = want(wanted);
        inode.hash = Some(h);
        let path = format!("/f{n}");
        let plan = UpdatePlan {
            sparse: true,
            inodes_to_make: vec![PathInode {
                path: p(&path),
                inode,
            }],
            ..UpdatePlan::default()
        };
        let (_, failures) = apply_typed(&f, &plan);
        assert!(failures.is_empty(), "{failures:?}");
        let m = meta(&f, &path);
        assert_eq!(
            (m.mode() & 0o7777, m.mtime(), m.mtime_nsec()),
            (wanted, M.sec, M.nsec as i64),
            "{n}"
        );
        assert_eq!(
            std::fs::read(f.root.join(&path[1..])).unwrap(),
            data.as_bytes()
        );
        assert!(!store.contains(&h));
    }
}

/// A cache object that is also another file's name (a link into place cut short by a
/// crash; the live file may since have been edited in place) is never used: it is dropped
/// from the cache and reported missing, for the next plan to fetch it again. The live
/// file is left as it is.
#[test]
fn a_cache_object_linked_to_a_live_file_is_dropped_not_used() {
    let f = fixture();
    let store = f.sd.objects().unwrap();
    let h = store.put(b"cached").unwrap();
    std::fs::hard_link(store.path_of(&h), f.root.join("live")).unwrap();
    std::fs::write(f.root.join("live"), b"edited").unwrap();
    for (path, other_use) in [("/a", false), ("/b", true)] {
        let mut plan = UpdatePlan {
            sparse: true,
            inodes_to_make: vec![PathInode {
                path: p(path),
                inode: Inode::file(0o644, 0, 0, M, 6, Some(h)),
            }],
            ..UpdatePlan::default()
        };
        if other_use {
            // Two uses: the first is a copy, which must not read the live file either.
            let mut second = plan.inodes_to_make[0].clone();
            second.path = p("/c");
            plan.inodes_to_make.push(second);
            std::fs::hard_link(f.root.join("live"), store.path_of(&h)).unwrap();
        }
        let (_, failures) = apply_typed(&f, &plan);
        assert!(
            failures.iter().all(|e| matches!(e,
                ApplyError::Step { step: Step::Stage, cause: Cause::NotInCache(x), .. } if *x == h)),
            "{failures:?}"
        );
        assert!(!failures.is_empty());
        assert!(!store.contains(&h), "the linked name stays in the cache");
        assert!(!f.root.join(&path[1..]).exists());
    }
    assert_eq!(std::fs::read(f.root.join("live")).unwrap(), b"edited");
}

/// An object's last use is the cache's own inode, given its metadata and linked from the
/// cache into place (its cache name removed, nothing copied); an object whose install fails stays in
/// the cache, content intact, for the next update; nothing is left in staging.
#[test]
fn a_last_use_goes_from_the_cache_into_place_and_a_failed_install_keeps_it_cached() {
    let f = fixture();
    let store = f.sd.objects().unwrap();
    let (a, b) = (
        store.put(b"content a").unwrap(),
        store.put(b"content b").unwrap(),
    );
    let cached_ino = std::fs::metadata(store.path_of(&a)).unwrap().ino();
    let plan = UpdatePlan {
        sparse: true,
        inodes_to_make: vec![
            PathInode {
                path: p("/a"),
                inode: Inode::file(0o751, 0, 0, M, 9, Some(a)),
            },
            PathInode {
                path: p("/missing/b"),
                inode: Inode::file(0o644, 0, 0, M, 9, Some(b)),
            },
        ],
        ..UpdatePlan::default()
    };
    let (_, failures) = apply_typed(&f, &plan);
    assert!(
        matches!(
            &failures[..],
            [ApplyError::Step {
                step: Step::Install,
                ..
            }]
        ),
        "{failures:?}"
    );
    let m = std::fs::symlink_metadata(f.root.join("a")).unwrap();
    assert_eq!(std::fs::read(f.root.join("a")).unwrap(), b"content a");
    assert_eq!((m.ino(), m.mode() & 0o7777), (cached_ino, 0o751));
    assert_eq!((m.mtime(), m.mtime_nsec()), (M.sec, M.nsec as i64));
    assert!(
        !store.contains(&a),
        "the last use took the object out of the cache"
    );
    let mut kept = Vec::new();
    store
        .open_object(&b)
        .unwrap()
        .read_to_end(&mut kept)
        .unwrap();
    assert_eq!(
        kept, b"content b",
        "a failed install leaves its object in the cache"
    );
    assert_eq!(
        std::fs::read_dir(f.state.join("staging")).unwrap().count(),
        0
    );
}

#[test]
fn a_name_the_filesystem_refuses_is_typed_with_the_call_and_its_errno() {
    // A component longer than NAME_MAX (255 bytes): refused by the kernel even for root, so
    // this runs the same as root and as an ordinary user.
    let f = fixture();
    let long = format!("/{}", "d".repeat(300));
    let plan = UpdatePlan {
        sparse: true,
        dirs_to_make: vec![PathInode {
            path: p(&long),
            inode: Inode::dir(0o755, rustix::process::geteuid().as_raw(), 0),
        }],
        ..UpdatePlan::default()
    };
    let (_, failures) = apply_typed(&f, &plan);
    let e = &failures[0];
    assert_eq!(e.step_of(), Some(Step::Mkdir));
    assert_eq!(e.path(), Some(&p(&long)));
    // apply looks before it makes: the first call to meet the name is the `lstat`.
    assert_eq!(
        (e.op(), e.errno()),
        (Some(Op::Stat), Some(Errno::NAMETOOLONG))
    );
}

#[test]
fn command_failures_are_typed() {
    let sh = |script: &str| vec!["/bin/sh".to_string(), "-c".into(), script.into()];
    let t = Duration::from_secs(10);
    assert!(matches!(run_command(&[], &[], t), Err(CommandError::Empty)));
    let e = run_command(&["/nonexistent/cmd".into()], &[], t).unwrap_err();
    assert!(
        matches!(&e, CommandError::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound),
        "{e:?}"
    );
    let e = run_command(&sh("echo no such thing >&2; exit 3"), &[], t).unwrap_err();
    assert!(
        matches!(&e, CommandError::Failed { status, output } if status.code() == Some(3) && output == "no such thing"),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "exit status: 3 (no such thing)");
    let e = run_command(&sh("sleep 30"), &[], Duration::from_millis(100)).unwrap_err();
    assert!(matches!(e, CommandError::TimedOut { .. }), "{e:?}");
}

#[test]
fn directories_standing_where_files_symlinks_and_links_go_are_replaced() {
    let f = fixture();
    std::fs::create_dir_all(f.root.join("full/deep")).unwrap();
    std::fs::write(f.root.join("full/deep/x"), b"x").unwrap();
    std::fs::create_dir_all(f.root.join("empty")).unwrap();
    std::fs::create_dir_all(f.root.join("linked/sub")).unwrap();
    let b = B::new()
        .file("/full", b"now a file", 0o644, 0)
        .add("/empty", Inode::symlink(0, 0, b"full".to_vec()))
        .link("/linked", "/full");
    let img = b.image(Some(""));
    let opts = ApplyOptions::default();
    let (plan, r) = converge(&f, &img, &b.contents, &opts);
    assert!(r.errors.is_empty(), "{:?}\n{plan:#}", r.errors);
    assert_eq!(std::fs::read(f.root.join("full")).unwrap(), b"now a file");
    assert_eq!(
        std::fs::read_link(f.root.join("empty")).unwrap().to_str(),
        Some("full")
    );
    assert_eq!(meta(&f, "/linked").ino(), meta(&f, "/full").ino());
    assert!(rediff(&f, &img, &opts).is_empty());
}

/// A seed planned while nothing was there is not made if something (here a dangling
/// symlink) appeared before the update; seeds made are recorded in `seeded.json`, and the
/// trigger on the skipped seed does not fire.
#[test]
fn a_seed_is_made_only_where_nothing_is_and_is_recorded() {
    let f = fixture();
    let b = B::new()
        .dir("/mnt", 0o755)
        .dir("/mnt/state", 0o755)
        .dir("/mnt/state/a", 0o700)
        .file("/mnt/state/a/key", b"seed a", 0o600, 0)
        .file("/mnt/state/b", b"seed b", 0o600, 0);
    let mut img = b.image(Some(""));
    img.state = Some(model::StateLines::parse("/mnt/state/.*", "s").unwrap());
    img.triggers =
        Triggers::parse(r#"[{"MatchLines":["/mnt/state/b"],"Service":"b"}]"#, "t").unwrap();
    let scanned = scan_full(&f.root, &ScanOptions::default()).unwrap();
    let plan = diff(
        "test/1",
        &img,
        &Machine {
            tree: &scanned.tree,
            object_cache: &BTreeSet::new(),
            exclusions: None,
            hidden_parents: &[],
            seeded: &[],
        },
        &DiffOptions { allow_unsafe: true },
    );
    assert_eq!(plan.seeded, [p("/mnt/state/a"), p("/mnt/state/b")]);
    let store = f.sd.objects().unwrap();
    for h in &plan.objects_to_fetch {
        store.put(&b.contents[h]).unwrap();
    }
    // Between the poll and the update, something takes /mnt/state/b.
    std::fs::create_dir_all(f.root.join("mnt/state")).unwrap();
    symlink("/nowhere", f.root.join("mnt/state/b")).unwrap();
    let log = f.root.join("../services.log");
    let script = f.root.join("../svc.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$*\" >> {}\n", log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let opts = ApplyOptions {
        service_command: Some(vec![script.display().to_string()]),
        ..ApplyOptions::default()
    };
    let r = apply(&f.root, &f.sd, &plan, &opts);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        std::fs::read(f.root.join("mnt/state/a/key")).unwrap(),
        b"seed a"
    );
    assert_eq!(meta(&f, "/mnt/state/a").mode() & 0o7777, 0o700);
    assert_eq!(
        std::fs::read_link(f.root.join("mnt/state/b")).unwrap(),
        Path::new("/nowhere")
    );
    assert!(std::fs::read_to_string(&log).unwrap_or_default().is_empty());
    assert_eq!(
        load_seeded(&f.sd),
        [p("/mnt/state/a"), p("/mnt/state/b")],
        "both are state now"
    );
}

#[test]
fn the_files_an_update_installs_are_noted_and_the_scan_after_it_reads_only_changed_ones() {
    let f = fixture();
    let b = B::new()
        .dir("/d", 0o755)
        .file("/d/a", b"alpha", 0o644, 0)
        .file("/b", b"bravo", 0o644, 0)
        .link("/b2", "/b")
        .file("/c", b"same", 0o644, 0)
        .file("/e", b"same", 0o600, 0);
    let img = b.image(Some(""));
    let opts = ApplyOptions::default();
    let plan = rediff(&f, &img, &opts);
    let store = f.sd.objects().unwrap();
    for h in &plan.objects_to_fetch {
        store.put(&b.contents[h]).unwrap();
    }
    let (r, known) = apply_noting(&f.root, &f.sd, &plan, &opts);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // Four inodes: /b and its link are one, /c and /e two copies of one object.
    assert_eq!(known.len(), 4);
    let read = scan_full(&f.root, &ScanOptions::default()).unwrap();
    let trusting = ScanOptions {
        known: Some(Arc::new(known)),
        ..Default::default()
    };
    let noted = scan_full(&f.root, &trusting).unwrap();
    assert_eq!(noted.tree, read.tree);
    assert_eq!(noted.known_files, 4);
    assert!(rediff(&f, &img, &opts).is_empty());
    // Same size, mtime put back, a later tick: the ctime moved, so it is read again.
    std::thread::sleep(Duration::from_millis(30));
    let a = f.root.join("d/a");
    std::fs::write(&a, b"ALPHA").unwrap();
    let t = Timestamps {
        last_access: Timespec {
            tv_sec: M.sec,
            tv_nsec: M.nsec as _,
        },
        last_modification: Timespec {
            tv_sec: M.sec,
            tv_nsec: M.nsec as _,
        },
    };
    rustix::fs::utimensat(CWD, &a, &t, AtFlags::empty()).unwrap();
    let after = scan_full(&f.root, &trusting).unwrap();
    assert_eq!(after.known_files, 3);
    let ino = after.tree.entries[&p("/d/a")];
    assert_eq!(after.tree.inodes[&ino].hash, Some(ObjectId::of(b"ALPHA")));
    assert_eq!(after.tree.inodes[&ino].mtime, M);
    assert!(!rediff(&f, &img, &opts).is_empty());
}
