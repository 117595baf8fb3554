//! End-to-end tests: a real imageserver on an ephemeral port (in-process, on its own
//! runtime thread) driven by the real imagetool binary, checking what a user sees.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Server {
    addr: String,
    data: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// A server whose objects are never pinned against `delunrefobj`, so tests of
    /// unreferenced objects need not wait.
    fn start() -> Server {
        Server::start_with_grace(std::time::Duration::ZERO)
    }

    fn start_with_grace(grace: std::time::Duration) -> Server {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().to_path_buf();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (atx, arx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                atx.send(listener.local_addr().unwrap().to_string())
                    .unwrap();
                let state = imageserver::State::open_with_grace(
                    &dir,
                    wire::http::Security::Insecure,
                    grace,
                )
                .unwrap();
                imageserver::serve(listener, state, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
            });
        });
        Server {
            addr: arx.recv().unwrap(),
            data,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    fn tool(&self, args: &[&str]) -> Output {
        let mut all = vec!["--image-server", &self.addr];
        all.extend_from_slice(args);
        run_tool(&all)
    }

    /// Regular object files stored (temp files included: there must never be any left).
    fn object_files(&self) -> usize {
        count_files(&self.data.path().join("objects"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn count_files(p: &Path) -> usize {
    testkit::files_under(p).len()
}

fn run_tool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imagetool"))
        .args(args)
        .env_remove("IMAGE_SERVER")
        .env("HOME", "/nonexistent")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Asserts exit 1 with one stderr line containing `want`.
#[track_caller]
fn fails(o: Output, want: &str) {
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "stderr: {err}\nstdout: {}",
        stdout(&o)
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.contains("warning")).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err:?}");
    assert!(err.contains(want), "{err:?} lacks {want:?}");
}

fn testdata(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(p)
        .display()
        .to_string()
}

/// A small tree: /etc/passwd, /etc/hostname, /usr/bin/tool (0755), a symlink, a hardlink.
fn make_tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    std::fs::create_dir_all(r.join("usr/bin")).unwrap();
    std::fs::write(r.join("etc/passwd"), "root:x:0:0\n").unwrap();
    std::fs::write(r.join("etc/hostname"), "web1\n").unwrap();
    std::fs::write(r.join("usr/bin/tool"), "#!/bin/sh\n".repeat(1000)).unwrap();
    std::fs::set_permissions(
        r.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::hard_link(r.join("usr/bin/tool"), r.join("usr/bin/tool2")).unwrap();
    std::os::unix::fs::symlink("tool", r.join("usr/bin/t")).unwrap();
    std::fs::set_permissions(r, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[test]
fn add_list_show_check_delete_from_directory() {
    let s = Server::start();
    let tree = make_tree();
    let src = tree.path().to_str().unwrap();
    let out = ok(s.tool(&["add", "web/prod/1.9", src, "", ""]));
    assert!(
        out.contains("added sparse image web/prod/1.9: 4 files"),
        "{out}"
    );
    assert!(
        out.contains("2 new objects") || out.contains("3 new objects"),
        "{out}"
    );
    ok(s.tool(&["add", "web/prod/1.10", src, "", ""]));
    ok(s.tool(&["add", "other/1", src, "", ""]));
    assert_eq!(
        ok(s.tool(&["list"])),
        "other/1\nweb/prod/1.9\nweb/prod/1.10\n"
    );
    assert_eq!(
        ok(s.tool(&["list", "web/"])),
        "web/prod/1.9\nweb/prod/1.10\n"
    );
    assert_eq!(
        ok(s.tool(&["--json", "list", "web"])),
        "[\"web/prod/1.9\",\"web/prod/1.10\"]\n"
    );
    let show = ok(s.tool(&["show", "web/prod/1.9"]));
    let lines: Vec<&str> = show.lines().collect();
    assert!(lines[0].contains("sparse image"), "{show}");
    assert!(
        lines[1].starts_with("drwxr-xr-x   1     0     0") && lines[1].ends_with(" /"),
        "{show}"
    );
    assert!(show.contains("/usr/bin/t -> tool"), "{show}");
    let tool_line = lines.iter().find(|l| l.contains("/usr/bin/tool ")).unwrap();
    assert!(tool_line.starts_with("-rwxr-xr-x   2"), "{tool_line}");
    assert!(
        tool_line.contains(&model::ObjectId::of("#!/bin/sh\n".repeat(1000).as_bytes()).to_hex())
    );
    // check: silent, 0 / 1
    let c = s.tool(&["check", "web/prod/1.9"]);
    assert_eq!(
        (c.status.code(), c.stdout.len(), c.stderr.len()),
        (Some(0), 0, 0)
    );
    let c = s.tool(&["check", "nope"]);
    assert_eq!(
        (c.status.code(), c.stdout.len(), c.stderr.len()),
        (Some(1), 0, 0)
    );
    ok(s.tool(&["delete", "web/prod/1.9"]));
    assert_eq!(s.tool(&["check", "web/prod/1.9"]).status.code(), Some(1));
    fails(s.tool(&["delete", "web/prod/1.9"]), "does not exist");
    // names are never reused
    fails(
        s.tool(&["add", "web/prod/1.9", src, "", ""]),
        "never reused",
    );
    fails(s.tool(&["add", "other/1", src, "", ""]), "already exists");
    fails(s.tool(&["show", "nope"]), "image nope does not exist");
}

#[test]
fn dedup_second_image_stores_exactly_one_new_object() {
    let s = Server::start();
    let tree = make_tree();
    let src = tree.path().to_str().unwrap();
    ok(s.tool(&["add", "a/1", src, "", ""]));
    let before = s.object_files();
    std::fs::write(tree.path().join("etc/hostname"), "web2\n").unwrap();
    let out = ok(s.tool(&["--json", "add", "a/2", src, "", ""]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["new_objects"], 1, "{out}");
    assert_eq!(v["bytes_sent"], 5, "{out}");
    assert_eq!(s.object_files(), before + 1);
    // a mode-, owner- and symlink-only change sends nothing
    std::fs::set_permissions(
        tree.path().join("etc/passwd"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::remove_file(tree.path().join("usr/bin/t")).unwrap();
    std::os::unix::fs::symlink("tool2", tree.path().join("usr/bin/t")).unwrap();
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(tree.path().join("etc/hostname"), Some(7), Some(7)).unwrap();
    }
    let out = ok(s.tool(&["--json", "add", "a/3", src, "", ""]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["new_objects"], 0, "{out}");
    assert_eq!(s.object_files(), before + 1);
    let diff = ok(s.tool(&["diff", "a/2", "a/3"]));
    assert!(diff.contains("~ /etc/passwd: mode 0644 -> 0600"), "{diff}");
    assert!(
        diff.contains("~ /usr/bin/t: target tool -> tool2"),
        "{diff}"
    );
    let d1 = ok(s.tool(&["diff", "a/1", "a/2"]));
    assert!(
        d1.contains("~ /etc/hostname: ") && d1.contains("content"),
        "{d1}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&ok(s.tool(&["--json", "diff", "a/1", "a/2"]))).unwrap();
    assert_eq!(j["changes"][0]["path"], "/etc/hostname");
    assert_eq!(j["changes"][0]["what"], "changed");
}

#[test]
fn tarballs_full_image_filter_triggers_and_get_round_trip() {
    let s = Server::start();
    let filter = testdata("example.filter");
    let trig = testdata("triggers.sshd");
    let out = ok(s.tool(&[
        "add",
        "t/normal",
        &testdata("tarballs/normal.tar.gz"),
        &filter,
        &trig,
    ]));
    assert!(out.contains("added full image t/normal"), "{out}");
    let show = ok(s.tool(&["show", "t/normal"]));
    assert!(
        show.lines().next().unwrap().contains("full image"),
        "{show}"
    );
    assert!(
        show.contains("/tmp\n") && !show.contains("/tmp/scratch"),
        "filter applied: {show}"
    );
    assert!(show.contains("drwxrwxrwt"), "{show}");
    assert_eq!(
        ok(s.tool(&["show-filter", "t/normal"])),
        std::fs::read_to_string(&filter)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    );
    let trig_out = ok(s.tool(&["show-triggers", "t/normal"]));
    assert!(
        trig_out.contains("\"Service\": \"sshd\"") && trig_out.contains("/etc/ssh/sshd[.]conf"),
        "{trig_out}"
    );
    // plain tar of the same tree gives the same tree
    ok(s.tool(&[
        "add",
        "t/plain",
        &testdata("tarballs/normal.tar"),
        &filter,
        &trig,
    ]));
    assert_eq!(
        ok(s.tool(&["diff", "t/normal", "t/plain"])),
        "t/normal and t/plain are identical: same tree, filter, triggers, state lines and hooks\n"
    );
    // the same tree, sparse and without triggers: the image-level differences are named
    ok(s.tool(&["add", "t/sparse", &testdata("tarballs/normal.tar"), "", ""]));
    let d = ok(s.tool(&["diff", "t/normal", "t/sparse"]));
    let first_filter_line = std::fs::read_to_string(&filter)
        .unwrap()
        .lines()
        .find(|l| !l.starts_with('#') && !l.is_empty())
        .unwrap()
        .to_string();
    assert!(d.starts_with("# full -> sparse\n"), "{d}");
    assert!(
        d.contains(&format!("# filter - {first_filter_line}\n")),
        "{d}"
    );
    assert!(d.contains("# trigger - {\"MatchLines\""), "{d}");
    let j: serde_json::Value =
        serde_json::from_str(&ok(s.tool(&["--json", "diff", "t/normal", "t/sparse"]))).unwrap();
    assert_eq!(j["sparse"], serde_json::json!([false, true]), "{j}");
    assert_eq!(j["triggers_removed"][0]["Service"], "sshd", "{j}");
    assert!(!j["filter_removed"].as_array().unwrap().is_empty(), "{j}");
    // kinds: setuid, setgid, hardlinks, symlinks, devices, FIFO, owners
    ok(s.tool(&["add", "t/kinds", &testdata("tarballs/kinds.tar"), "", ""]));
    let show = ok(s.tool(&["show", "t/kinds"]));
    assert!(
        show.contains("-rwsr-xr-x   2     0     0         14 14 Nov 2023 22:13:20 UTC /bin/su "),
        "{show}"
    );
    assert!(
        show.contains("crw-rw-rw-   1     0     0      0x103"),
        "{show}"
    );
    assert!(show.contains("prw-------"), "{show}");
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out");
    ok(s.tool(&["get", "t/kinds", target.to_str().unwrap()]));
    let m = |p: &str| std::fs::symlink_metadata(target.join(p)).unwrap();
    assert_eq!(m("bin/su").mode() & 0o7777, 0o4755);
    assert_eq!(m("bin/wall").mode() & 0o7777, 0o2755);
    assert_eq!(m("bin/su").ino(), m("bin/su-again").ino());
    assert_eq!(m("bin/su").mtime(), 1_700_000_000);
    assert_eq!(
        std::fs::read_link(target.join("dangling")).unwrap(),
        PathBuf::from("/does/not/exist")
    );
    assert_eq!(
        std::fs::read(target.join("bin/su")).unwrap(),
        b"setuid binary\n"
    );
    assert_eq!(m("tmp").mode() & 0o7777, 0o1777);
    assert!(m("run/fifo").file_type().is_fifo_like());
    if rustix::process::geteuid().is_root() {
        assert_eq!(
            (m("home/user.txt").uid(), m("home/user.txt").gid()),
            (1000, 1000)
        );
        assert_eq!(m("bin/wall").gid(), 5);
        assert_eq!(m("dev/null").rdev(), libc::makedev(1, 3));
    }
    // get refuses a non-empty directory
    fails(
        s.tool(&["get", "t/kinds", target.to_str().unwrap()]),
        "not empty",
    );
    // a full round trip: the unpacked tree added again is the same image (once the
    // var/lib/initial-image that get records, and the /var it made for it, are removed)
    assert_eq!(
        std::fs::read_to_string(target.join("var/lib/initial-image")).unwrap(),
        "t/kinds\n"
    );
    std::fs::remove_dir_all(target.join("var")).unwrap();
    ok(s.tool(&["add", "t/again", target.to_str().unwrap(), "", ""]));
    if rustix::process::geteuid().is_root() {
        let same = ok(s.tool(&["diff", "t/kinds", "t/again"]));
        assert!(
            same.starts_with("t/kinds and t/again are identical"),
            "{same}"
        );
    }
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

#[test]
fn non_utf8_names_round_trip() {
    let s = Server::start();
    ok(s.tool(&["add", "n/1", &testdata("tarballs/nonutf8.tar"), "", ""]));
    let show = ok(s.tool(&["show", "n/1"]));
    assert!(show.contains("/caf\\xe9.txt"), "{show}");
    let j = ok(s.tool(&["--json", "show", "n/1"]));
    assert!(j.contains("{\"hex\":\"2f636166e92e747874\"}"), "{j}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    ok(s.tool(&["get", "n/1", out.to_str().unwrap()]));
    use std::os::unix::ffi::OsStrExt;
    let p = out.join(std::ffi::OsStr::from_bytes(b"caf\xe9.txt"));
    assert_eq!(std::fs::read(p).unwrap(), b"latin-1 name\n");
}

#[test]
fn bad_inputs_fail_with_one_line_and_store_nothing() {
    let s = Server::start();
    let tree = make_tree();
    let src = tree.path().to_str().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![testdata("tarballs/escape.tar"), "".into(), "".into()],
            "`..` component",
        ),
        (
            vec![
                testdata("tarballs/hardlink-to-later.tar"),
                "".into(),
                "".into(),
            ],
            "not earlier in the archive",
        ),
        (
            vec![
                testdata("tarballs/through-symlink.tar"),
                "".into(),
                "".into(),
            ],
            "written through the symlink /etc",
        ),
        (
            vec![testdata("tarballs/duplicate.tar"), "".into(), "".into()],
            "appears twice",
        ),
        (
            vec![testdata("tarballs/truncated.tar.gz"), "".into(), "".into()],
            "truncated",
        ),
        (
            vec![testdata("tarballs/not-a-tar.tar"), "".into(), "".into()],
            "not a tar",
        ),
        (
            vec![src.into(), testdata("bad-regex.filter"), "".into()],
            "bad-regex.filter:2: invalid regex \"/etc/(unclosed\"",
        ),
        (
            vec![src.into(), "".into(), testdata("bad-json.triggers")],
            "bad-json.triggers",
        ),
        (
            vec![src.into(), "".into(), testdata("bad-regex.triggers")],
            "/etc/[ssh",
        ),
        (
            vec!["/does/not/exist".into(), "".into(), "".into()],
            "/does/not/exist: No such file",
        ),
        (
            vec![src.into(), "/no/filter".into(), "".into()],
            "filter file /no/filter",
        ),
    ];
    for (args, want) in cases {
        let mut a = vec!["add", "bad/1"];
        a.extend(args.iter().map(|s| s.as_str()));
        fails(s.tool(&a), want);
        assert_eq!(ok(s.tool(&["list"])), "", "no image after {args:?}");
        assert_eq!(s.object_files(), 0, "no object after {args:?}");
    }
    fails(
        s.tool(&["add", "bad//name", src, "", ""]),
        "invalid image name",
    );
    // a name already taken, or deleted, is refused before any object is sent
    ok(s.tool(&["add", "good/1", src, "", ""]));
    ok(s.tool(&["add", "good/2", src, "", ""]));
    ok(s.tool(&["delete", "good/2"]));
    let n = s.object_files();
    std::fs::write(tree.path().join("new-file"), "never sent\n").unwrap();
    fails(s.tool(&["add", "good/1", src, "", ""]), "already exists");
    fails(
        s.tool(&["add", "good/2", src, "", ""]),
        "image good/2 was deleted; image names are never reused",
    );
    assert_eq!(s.object_files(), n, "nothing sent for a taken name");
}

/// A bad tarball larger than one upload batch: the objects of its valid prefix were sent
/// before the bad entry was reached. No image is created, imagetool says what was left,
/// and `delunrefobj` removes it.
#[test]
fn a_large_bad_tarball_leaves_only_unreferenced_objects_that_delunrefobj_removes() {
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let tarball = tmp.path().join("bad-late.tar.gz");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&tarball).unwrap(),
        flate2::Compression::fast(),
    );
    let mut b = tar::Builder::new(gz);
    let add = |b: &mut tar::Builder<_>, path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, data).unwrap();
    };
    // ten distinct 1 MiB files: more than one batch (8 MiB)
    for i in 0..10u8 {
        add(&mut b, &format!("d/f{i}"), &vec![i; 1 << 20]);
    }
    add(&mut b, "d/f7", b"again");
    b.into_inner().unwrap().finish().unwrap();
    let o = s.tool(&["add", "late/1", tarball.to_str().unwrap(), "", ""]);
    let err = stderr(&o);
    assert!(
        err.contains("objects (") && err.contains("until `imagetool delunrefobj`"),
        "{err}"
    );
    fails(o, "tar entry /d/f7: appears twice in the archive");
    assert_eq!(ok(s.tool(&["list"])), "");
    let left = s.object_files();
    assert!(left >= 8, "a first batch was sent ({left} objects)");
    assert_eq!(ok(s.tool(&["listunrefobj"])).lines().count(), left);
    ok(s.tool(&["delunrefobj", "100", "0"]));
    assert_eq!(s.object_files(), 0);
}

/// With the server's default pin grace, objects just sent survive a `delunrefobj`.
#[test]
fn recently_uploaded_objects_survive_delunrefobj() {
    let s = Server::start_with_grace(std::time::Duration::from_secs(600));
    let tree = make_tree();
    ok(s.tool(&["add", "p/1", tree.path().to_str().unwrap(), "", ""]));
    ok(s.tool(&["delete", "p/1"]));
    let n = s.object_files();
    assert_eq!(ok(s.tool(&["listunrefobj"])).lines().count(), n);
    assert_eq!(
        ok(s.tool(&["delunrefobj", "100", "0"])),
        "deleted 0 objects, 0 bytes\n"
    );
    assert_eq!(s.object_files(), n);
}

#[test]
fn warnings_are_not_errors() {
    let s = Server::start();
    let tree = make_tree();
    std::fs::set_permissions(tree.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let src = tree.path().to_str().unwrap();
    let o = s.tool(&["add", "w/1", src, "", ""]);
    assert!(o.status.success());
    assert!(
        stderr(&o).contains("warning: sparse image w/1: / is 0700"),
        "{}",
        stderr(&o)
    );
    let o = s.tool(&["add", "w/2", src, &testdata("trailing-blank.filter"), ""]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("ends in blanks"), "{}", stderr(&o));
}

#[test]
fn usage_errors_exit_2_and_server_errors_exit_1() {
    let s = Server::start();
    assert_eq!(s.tool(&["add", "x"]).status.code(), Some(2));
    assert_eq!(s.tool(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(s.tool(&["delunrefobj", "x", "0"]).status.code(), Some(2));
    assert_eq!(run_tool(&[]).status.code(), Some(2));
    fails(
        run_tool(&["--image-server", "127.0.0.1:1", "list"]),
        "127.0.0.1:1",
    );
}

#[test]
fn dominator_flag_spellings_work() {
    let s = Server::start();
    let (host, port) = s.addr.rsplit_once(':').unwrap();
    ok(s.tool(&["add", "d/1", make_tree().path().to_str().unwrap(), "", ""]));
    let h = format!("-imageServerHostname={host}");
    let p = format!("-imageServerPortNum={port}");
    assert_eq!(ok(run_tool(&[&h, &p, "list"])), "d/1\n");
    assert_eq!(
        ok(run_tool(&[
            "-imageServerHostname",
            host,
            "-imageServerPortNum",
            port,
            "list"
        ])),
        "d/1\n"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_imagetool"))
        .arg("list")
        .env("IMAGE_SERVER", &s.addr)
        .output()
        .unwrap();
    assert_eq!(ok(o), "d/1\n");
    // Dominator's scripts make image directories first; here names need none.
    assert_eq!(ok(run_tool(&[&h, &p, "mkdir", "web"])), "");
    ok(run_tool(&[&h, &p, "mkdir", "web/prod"]));
    ok(s.tool(&[
        "add",
        "web/prod/1",
        make_tree().path().to_str().unwrap(),
        "",
        "",
    ]));
    assert_eq!(ok(s.tool(&["list", "web/"])), "web/prod/1\n");
    fails(s.tool(&["mkdir", "d/1"]), "d/1 is the name of an image");
    fails(s.tool(&["mkdir", "a/../b"]), "a/../b");
}

#[test]
fn unreferenced_objects_are_listed_oldest_first_and_deleted() {
    let s = Server::start();
    let tree = make_tree();
    let src = tree.path().to_str().unwrap();
    ok(s.tool(&["add", "u/1", src, "", ""]));
    assert_eq!(ok(s.tool(&["listunrefobj"])), "");
    std::fs::write(tree.path().join("etc/hostname"), "other\n").unwrap();
    ok(s.tool(&["add", "u/2", src, "", ""]));
    ok(s.tool(&["delete", "u/1"]));
    let list = ok(s.tool(&["listunrefobj"]));
    let hostname_id = model::ObjectId::of(b"web1\n");
    assert_eq!(list, format!("{hostname_id} 5\n"));
    assert_eq!(
        ok(s.tool(&["delunrefobj", "0", "0"])),
        "deleted 0 objects, 0 bytes\n"
    );
    let n = s.object_files();
    assert_eq!(
        ok(s.tool(&["delunrefobj", "100", "0"])),
        "deleted 1 objects, 5 bytes\n"
    );
    assert_eq!(s.object_files(), n - 1);
    assert_eq!(ok(s.tool(&["listunrefobj"])), "");
    // the remaining image is still whole
    let dir = tempfile::tempdir().unwrap();
    ok(s.tool(&["get", "u/2", dir.path().join("x").to_str().unwrap()]));
    fails(s.tool(&["delunrefobj", "101", "0"]), "over 100");
}

#[test]
fn patch_directory_converges_a_directory_and_keeps_what_the_filter_protects() {
    let s = Server::start();
    let src = make_tree();
    let filter = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(filter.path(), "/etc/hostname$\n/keep(|/.*)$\n").unwrap();
    ok(s.tool(&[
        "add",
        "full.0",
        src.path().to_str().unwrap(),
        filter.path().to_str().unwrap(),
        "",
    ]));

    // A drifted machine: wrong content, an extra file, a protected file, a missing file.
    let dst = tempfile::tempdir().unwrap();
    let d = dst.path();
    std::fs::create_dir_all(d.join("etc")).unwrap();
    std::fs::create_dir_all(d.join("keep")).unwrap();
    std::fs::write(d.join("etc/passwd"), "evil\n").unwrap();
    std::fs::write(d.join("etc/hostname"), "mine\n").unwrap();
    std::fs::write(d.join("extra"), "delete me\n").unwrap();
    std::fs::write(d.join("keep/state"), "precious\n").unwrap();
    let out = ok(s.tool(&[
        "patch-directory",
        "full.0",
        d.to_str().unwrap(),
        "--allow-unsafe",
    ]));
    assert!(out.contains("patched"), "{out}");

    assert_eq!(
        std::fs::read_to_string(d.join("etc/passwd")).unwrap(),
        "root:x:0:0\n"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("etc/hostname")).unwrap(),
        "mine\n"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("keep/state")).unwrap(),
        "precious\n"
    );
    assert!(!d.join("extra").exists());
    let tool = std::fs::metadata(d.join("usr/bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o755);
    assert_eq!(
        tool.ino(),
        std::fs::metadata(d.join("usr/bin/tool2")).unwrap().ino()
    );
    assert_eq!(
        std::fs::read_link(d.join("usr/bin/t")).unwrap(),
        Path::new("tool")
    );

    // Converged: a second run changes nothing and fetches nothing.
    let again = ok(s.tool(&["patch-directory", "full.0", d.to_str().unwrap()]));
    assert!(
        again.contains("nothing to do") && again.contains("fetched 0 objects"),
        "{again}"
    );
    let missing = s.tool(&["patch-directory", "no-such-image", d.to_str().unwrap()]);
    fails(missing, "no-such-image");
}

#[test]
fn half_a_tls_configuration_is_an_error_not_plain_http() {
    let s = Server::start(); // plain HTTP: any fall-back would succeed
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_imagetool"))
            .args(["--image-server", &s.addr])
            .args(args)
            .env_remove("IMAGE_SERVER")
            .env("HOME", home.path())
            .output()
            .unwrap()
    };
    let pem = home.path().join("x.pem");
    std::fs::write(&pem, "not used").unwrap();
    let pem = pem.to_str().unwrap();
    fails(
        run(&["--cert-file", pem, "list"]),
        "--cert-file needs --key-file",
    );
    fails(
        run(&["--key-file", pem, "list"]),
        "--key-file needs --cert-file",
    );
    fails(
        run(&["--ca-file", pem, "list"]),
        "--ca-file given but no client certificate",
    );
    // A user's pair in ~/.ssl whose CA is missing.
    std::fs::create_dir(home.path().join(".ssl")).unwrap();
    std::fs::write(home.path().join(".ssl/me.cert"), "x").unwrap();
    std::fs::write(home.path().join(".ssl/me.key"), "x").unwrap();
    fails(
        run(&["--ca-file", "/nonexistent/CA.pem", "list"]),
        "CA certificate /nonexistent/CA.pem does not exist",
    );
    // Nothing at all: plain HTTP, as before.
    std::fs::remove_dir_all(home.path().join(".ssl")).unwrap();
    ok(run(&["list"]));
}

/// A tar of one 4755 file `opt/tool` owned by `uid:gid`.
fn setuid_tar(uid: u64, gid: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o4755);
    h.set_size(3);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, "opt/tool", &b"#!\n"[..]).unwrap();
    b.into_inner().unwrap()
}

/// Posts `body` to the real server's `method`; returns the status and the body text.
fn post_raw(addr: &str, method: &str, body: String) -> (u16, String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("http://{addr}/rpc/{method}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

/// An AddImage body for `name`: a root and `/opt/tool` (4755, empty) owned by `uid:gid`.
fn add_image_body(name: &str, uid: u32, gid: u32) -> String {
    use model::image::{Inode, Mtime};
    let mut t = model::FileTree::with_root(Inode::dir(0o755, 0, 0));
    t.inodes.insert(1, Inode::dir(0o755, 0, 0));
    t.entries.insert("/opt".parse().unwrap(), 1);
    t.inodes
        .insert(2, Inode::file(0o4755, uid, gid, Mtime::default(), 0, None));
    t.entries.insert("/opt/tool".parse().unwrap(), 2);
    let image = model::Image::new(t, None, Default::default());
    serde_json::to_string(&model::api::AddImageRequest {
        name: name.into(),
        image,
    })
    .unwrap()
}

/// uid or gid 4294967295 is `(uid_t)-1`, which chown reads as "leave unchanged": such an
/// owner is refused in a tar given to `add` and in an AddImage sent to the server.
#[test]
fn owner_4294967295_is_refused_in_tars_and_add_image() {
    let s = Server::start();
    let d = tempfile::tempdir().unwrap();
    for (uid, gid, want) in [
        (
            4294967295u64,
            4294967295u64,
            "tar entry opt/tool: uid 4294967295 is (uid_t)-1, which chown reads as \"leave unchanged\"",
        ),
        (0, 4294967295, "tar entry opt/tool: gid 4294967295 is (uid_t)-1"),
        (4294967296, 0, "tar entry opt/tool: uid 4294967296 does not fit in 32 bits"),
    ] {
        let tar = d.path().join("setuid.tar");
        std::fs::write(&tar, setuid_tar(uid, gid)).unwrap();
        fails(
            s.tool(&["add", "evil/1", tar.to_str().unwrap(), "", ""]),
            want,
        );
        assert_eq!(ok(s.tool(&["list"])), "");
    }
    let fine = d.path().join("fine.tar");
    std::fs::write(&fine, setuid_tar(4294967294, 0)).unwrap();
    ok(s.tool(&["add", "fine/1", fine.to_str().unwrap(), "", ""]));

    for (uid, gid, want) in [
        (u32::MAX, 0, "/opt/tool: uid 4294967295 is (uid_t)-1"),
        (0, u32::MAX, "/opt/tool: gid 4294967295 is (uid_t)-1"),
    ] {
        let (status, body) = post_raw(
            &s.addr,
            model::api::methods::ADD_IMAGE,
            add_image_body("evil/2", uid, gid),
        );
        assert_eq!(status, 400, "{body}");
        assert!(body.contains(want), "{body}");
        assert!(!body.trim().contains('\n'), "one line: {body}");
    }
    assert_eq!(ok(s.tool(&["list"])), "fine/1\n");
}

/// Names with control or format characters never reach a listing, and a component over
/// 255 bytes is a 400 naming the problem (it was a 500).
#[test]
fn image_names_with_control_characters_or_long_components_are_refused() {
    let s = Server::start();
    let tree = make_tree();
    let src = tree.path().to_str().unwrap();
    for name in [
        "web/\t1",
        "web/\u{7f}1",
        "web/\u{1b}[2J1",
        "web/\u{202e}1",
        "web/\u{200b}1",
    ] {
        let o = s.tool(&["add", name, src, "", ""]);
        let err = stderr(&o);
        fails(o, "contains a control or format character");
        assert!(!err.contains(name), "name escaped: {err:?}");
        let (status, body) = post_raw(
            &s.addr,
            model::api::methods::ADD_IMAGE,
            add_image_body(name, 0, 0),
        );
        assert_eq!(status, 400, "{name:?}: {body}");
        assert!(
            body.contains("contains a control or format character"),
            "{body}"
        );
        let (status, _) = post_raw(
            &s.addr,
            model::api::methods::GET_IMAGE,
            serde_json::to_string(&serde_json::json!({ "name": name })).unwrap(),
        );
        assert_eq!(status, 400, "GetImage {name:?}");
    }
    let long = format!("web/{}/1", "x".repeat(300));
    let (status, body) = post_raw(
        &s.addr,
        model::api::methods::ADD_IMAGE,
        add_image_body(&long, 0, 0),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("a component longer than 255 bytes"), "{body}");
    fails(
        s.tool(&["add", &long, src, "", ""]),
        "a component longer than 255 bytes",
    );
    assert_eq!(ok(s.tool(&["list"])), "");
    assert_eq!(s.object_files(), 0);
}

/// A zip (or anything whose first block is not a tar header) is named as such, not as a
/// truncated archive.
#[test]
fn a_zip_given_to_add_is_not_a_tar() {
    // One stored file `a` holding `x`, as `zip` writes it.
    const TINY_ZIP: &[u8] = b"PK\x03\x04\x14\x00\x00\x00\x00\x00\x00\x00\x21\x00\x83\x16\xdc\x8c\x01\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00ax\
PK\x01\x02\x14\x03\x14\x00\x00\x00\x00\x00\x00\x00\x21\x00\x83\x16\xdc\x8c\x01\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x80\x01\x00\x00\x00\x00a\
PK\x05\x06\x00\x00\x00\x00\x01\x00\x01\x00\x2f\x00\x00\x00\x20\x00\x00\x00\x00\x00";
    let s = Server::start();
    let d = tempfile::tempdir().unwrap();
    let zip = d.path().join("image.zip");
    std::fs::write(&zip, TINY_ZIP).unwrap();
    let z = zip.to_str().unwrap();
    fails(
        s.tool(&["add", "z/1", z, "", ""]),
        &format!(
            "{z} is not a tar archive, a gzip-compressed tar or a directory (it is a zip archive)"
        ),
    );
    // A larger zip-like file (past one tar block) and plain text too.
    let mut big = TINY_ZIP.to_vec();
    big.resize(4096, 0);
    std::fs::write(&zip, &big).unwrap();
    fails(
        s.tool(&["add", "z/1", z, "", ""]),
        "is not a tar archive, a gzip-compressed tar or a directory",
    );
    let txt = d.path().join("notes.txt");
    std::fs::write(&txt, "these are notes, not an archive; ".repeat(4)).unwrap();
    fails(
        s.tool(&["add", "z/1", txt.to_str().unwrap(), "", ""]),
        "is not a tar archive, a gzip-compressed tar or a directory",
    );
    assert_eq!(ok(s.tool(&["list"])), "");
    assert_eq!(s.object_files(), 0);
}

/// `get` records the image name in `DIR/var/lib/initial-image`, as Dominator's does.
#[test]
fn get_writes_var_lib_initial_image() {
    let s = Server::start();
    let tree = make_tree();
    ok(s.tool(&["add", "web/2026.1", tree.path().to_str().unwrap(), "", ""]));
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("unpacked");
    ok(s.tool(&["get", "web/2026.1", dir.to_str().unwrap()]));
    let f = dir.join("var/lib/initial-image");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "web/2026.1\n");
    let meta = std::fs::symlink_metadata(&f).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o7777, 0o644);
    let names: Vec<_> = std::fs::read_dir(dir.join("var/lib"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["initial-image"], "no temp file left");
    // The image's own files are all there too.
    assert_eq!(
        std::fs::read_to_string(dir.join("etc/hostname")).unwrap(),
        "web1\n"
    );

    // An image whose /var is a symlink: nothing is written through it.
    let t2 = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir(outside.path().join("lib")).unwrap();
    std::os::unix::fs::symlink(outside.path(), t2.path().join("var")).unwrap();
    std::fs::set_permissions(t2.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    ok(s.tool(&["add", "link/1", t2.path().to_str().unwrap(), "", ""]));
    let dir2 = out.path().join("unpacked2");
    let o = s.tool(&["get", "link/1", dir2.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("is not a directory"), "{}", stderr(&o));
    assert!(!outside.path().join("lib/initial-image").exists());
}

/// Issue 9 #2: regexes that each compile but are over the regex size limit as one set
/// are accepted (and kept); one regex over the limit alone is refused with one line
/// naming file, line and regex. Never a panic (exit 101).
#[test]
fn regexes_too_big_as_one_set_are_accepted_and_one_too_big_alone_is_refused() {
    let s = Server::start();
    let tree = make_tree();
    let src = tree.path().to_str().unwrap();
    let files = tempfile::tempdir().unwrap();
    let filter = files.path().join("big.filter");
    std::fs::write(&filter, "\\w{100}a\n\\w{100}b\n\\w{100}c\n").unwrap();
    let triggers = files.path().join("big.triggers");
    std::fs::write(
        &triggers,
        r#"[{"MatchLines":["\\w{100}a","\\w{100}b","\\w{100}c"],"Service":"app"}]"#,
    )
    .unwrap();
    let (f, t) = (filter.to_str().unwrap(), triggers.to_str().unwrap());
    ok(s.tool(&["add", "big/1", src, f, t]));
    assert_eq!(ok(s.tool(&["show-filter", "big/1"])).lines().count(), 3);
    assert!(ok(s.tool(&["show-triggers", "big/1"])).contains("\\w{100}c"));

    let too_big = files.path().join("too-big.filter");
    std::fs::write(&too_big, "/etc\n\\w{100}{100}\n").unwrap();
    fails(
        s.tool(&["add", "big/2", src, too_big.to_str().unwrap(), ""]),
        &format!(
            "{}:2: invalid regex \"\\\\w{{100}}{{100}}\"",
            too_big.display()
        ),
    );
    assert_eq!(ok(s.tool(&["list"])), "big/1\n");
}

/// A root other users can write (a tar's `./` or a directory of mode 0777) is refused at
/// `add`: subd refuses to start on such a root, so the image would wedge every machine.
#[test]
fn a_root_other_users_can_write_is_refused() {
    let s = Server::start();
    let d = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o777);
    h.set_size(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, "./", &b""[..]).unwrap();
    let tar = d.path().join("open.tar");
    std::fs::write(&tar, b.into_inner().unwrap()).unwrap();
    fails(
        s.tool(&["add", "open/1", tar.to_str().unwrap(), "", ""]),
        "/: mode 0777 lets other users write the root",
    );
    let tree = make_tree();
    std::fs::set_permissions(tree.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    fails(
        s.tool(&["add", "open/2", tree.path().to_str().unwrap(), "", ""]),
        "/: mode 0777 lets other users write the root",
    );
    std::fs::set_permissions(tree.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    ok(s.tool(&["add", "sticky/1", tree.path().to_str().unwrap(), "", ""]));
    assert_eq!(ok(s.tool(&["list"])), "sticky/1\n");
}

/// `adds` refuses bad input with one line and adds nothing: a bad interval, a host that
/// does not answer, a missing filter file, a taken name.
#[test]
fn adds_bad_inputs_fail_with_one_line_and_add_nothing() {
    let s = Server::start();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    fails(
        s.tool(&["adds", "--every", "5 min", "snap", &closed, "", ""]),
        "invalid interval \"5 min\"",
    );
    fails(
        s.tool(&["adds", "snap/1", &closed, "", ""]),
        &format!("polling subd {closed}"),
    );
    fails(
        s.tool(&["adds", "snap/1", &closed, "/nonexistent/filter", ""]),
        "filter file /nonexistent/filter",
    );
    fails(
        s.tool(&["adds", "snap/1", "http://host/x", "", ""]),
        "subd address: http://host/x is not HOST[:PORT]: a URL",
    );
    assert_eq!(stdout(&s.tool(&["list"])), "");
    let tree = make_tree();
    ok(s.tool(&["add", "taken", tree.path().to_str().unwrap(), "", ""]));
    fails(
        s.tool(&["adds", "taken", &closed, "", ""]),
        "image taken already exists",
    );
}
