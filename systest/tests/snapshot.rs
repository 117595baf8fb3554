//! Snapshotting a live host (issue 12 §1) with the real binaries (imageserver, subd,
//! dominator, imagetool, mdb; insecure on loopback unless said): a host born from an image
//! is hand-edited, snapshotted with `imagetool adds` (only the objects the imageserver
//! lacks move; a second snapshot moves none), the snapshot diffed against its image shows
//! the edits, and rolled out through the MDB to a second host, which then matches the
//! first path by path. Also: `adds --every` adds a version only after a change and never
//! reuses a name; a file that keeps changing fails the snapshot naming it, one that settles
//! is retried into the image; over TLS a builder certificate may snapshot and the subd and
//! dominator certificates may not read a host's files.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins`.

mod common;

use std::io::BufRead;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::run_bin_ok as ok;
use testkit::{bin, Daemon};
use wire::client::{ClientSecurity, ImageServerClient, RpcClient, SubdClient};

/// Generous: CI is a 2-core machine shared with compilers.
const WAIT: Duration = Duration::from_secs(120);

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn write(path: &Path, data: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The image's source: a config, a program with a second name, a symlink.
fn source_tree(src: &Path) {
    write(&src.join("etc/app.conf"), "v1\n", 0o644);
    write(&src.join("usr/bin/tool"), "#!/bin/sh\necho tool\n", 0o755);
    std::fs::create_dir_all(src.join("usr/sbin")).unwrap();
    std::fs::hard_link(src.join("usr/bin/tool"), src.join("usr/sbin/tool-too")).unwrap();
    std::os::unix::fs::symlink("app.conf", src.join("etc/app.link")).unwrap();
    std::fs::create_dir_all(src.join("tmp")).unwrap();
}

/// Waits for a scan of `c`'s host for which `done` holds.
async fn scan_showing(c: &SubdClient, done: impl Fn(&model::FileTree) -> bool) {
    let t0 = Instant::now();
    let mut after = 0;
    loop {
        let p = common::full_poll(c, after).await;
        if done(p.tree.as_ref().unwrap()) {
            return;
        }
        after = p.generation;
        assert!(t0.elapsed() < WAIT, "no scan showed the change");
    }
}

/// Runs imagetool against `server`; its stdout, or panics with its stderr.
fn imagetool(server: &str, args: &[&str]) -> String {
    let mut all = vec!["--image-server", server];
    all.extend(args);
    ok("imagetool", &all)
}

/// `/api/machines/NAME` of a dominator as JSON (`Null` while it cannot be read).
async fn machine(api: &RpcClient, name: &str) -> serde_json::Value {
    let text = api
        .get_text(&format!("/api/machines/{name}"))
        .await
        .unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

/// Hand edits on a running host: content and owner (as root) of a config, the mode of a
/// program, a new file with a second name, and a file under an excluded directory.
fn hand_edit(root: &Path) {
    std::fs::write(root.join("etc/app.conf"), "v2: tuned by hand\n").unwrap();
    if is_root() {
        std::os::unix::fs::lchown(root.join("etc/app.conf"), Some(1234), Some(5678)).unwrap();
    }
    std::fs::set_permissions(
        root.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    write(&root.join("etc/new.conf"), "added on the host\n", 0o600);
    std::fs::hard_link(root.join("etc/new.conf"), root.join("etc/new.link")).unwrap();
    write(&root.join("tmp/scratch"), "excluded by subd\n", 0o644);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edited_host_is_snapshotted_diffed_and_rolled_out_to_another_host() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let is = common::imageserver(&t.join("imageserver"));
    let src = t.join("src");
    source_tree(&src);
    let full = t.join("full.filter");
    std::fs::write(&full, "").unwrap();
    let image = common::add_image(&is.addr, "app/1", &src, &s(&full)).await;

    // Host 1, born from app/1, then edited by hand.
    let root1 = t.join("root1");
    std::fs::create_dir_all(&root1).unwrap();
    let (subd1, c1) = common::subd(&root1);
    common::converge(&c1, &is.addr, "app/1", &image).await;
    hand_edit(&root1);
    scan_showing(&c1, |tree| {
        let link = "/etc/new.link".parse().unwrap();
        let tool = tree.get(&"/usr/bin/tool".parse().unwrap()).unwrap();
        tree.get(&link).is_some() && tool.mode == 0o700
    })
    .await;

    // Snapshot: only the two new contents move; again, nothing does.
    let out = imagetool(&is.addr, &["adds", "snap/1", &subd1.addr, &s(&full), ""]);
    assert!(out.contains(" 2 new objects"), "{out}");
    let again = imagetool(&is.addr, &["adds", "snap/2", &subd1.addr, &s(&full), ""]);
    assert!(again.contains(" 0 new objects, 0.0 MiB sent"), "{again}");
    let client = ImageServerClient::new(&is.addr, &ClientSecurity::Insecure).unwrap();
    let snap = client.get_image("snap/1").await.unwrap();
    assert!(!snap.is_sparse());
    for gone in ["/tmp/scratch", "/.subd"] {
        assert!(snap.tree.get(&gone.parse().unwrap()).is_none(), "{gone}");
    }

    // The diff against the image the host was born from shows the hand edits, only them.
    let diff = imagetool(&is.addr, &["diff", "app/1", "snap/1"]);
    let lines: Vec<&str> = diff.lines().collect();
    let conf = lines
        .iter()
        .find(|l| l.starts_with("~ /etc/app.conf: "))
        .unwrap_or_else(|| panic!("{diff}"));
    for want in ["size 3 -> 18", "content"] {
        assert!(conf.contains(want), "{conf}");
    }
    if is_root() {
        assert!(conf.contains("uid 0 -> 1234, gid 0 -> 5678"), "{conf}");
    }
    for want in [
        "~ /usr/bin/tool: mode 0755 -> 0700",
        // The same inode by its other name.
        "~ /usr/sbin/tool-too: mode 0755 -> 0700",
        "+ /etc/new.conf",
        "+ /etc/new.link",
    ] {
        assert!(lines.contains(&want), "{want:?} missing from:\n{diff}");
    }
    assert_eq!(lines.len(), 5, "{diff}");

    // Rolled out through the MDB to an empty host 2, which then matches host 1.
    let root2 = t.join("root2");
    std::fs::create_dir_all(&root2).unwrap();
    let (subd2, _c2) = common::subd(&root2);
    let mdb = s(&t.join("mdb.json"));
    let add = [
        "--mdb",
        &mdb,
        "add",
        "m2",
        "--ip",
        &subd2.addr,
        "--required",
        "snap/1",
    ];
    ok("mdb", &add);
    let dom = Daemon::dominator(&bin("dominator"), &mdb, &is.addr, 200);
    let api = dom.dominator_api();
    let t0 = Instant::now();
    loop {
        let m = machine(&api, "m2").await;
        if m["status_name"] == "synced" && m["last_update"]["image_name"] == "snap/1" {
            break;
        }
        assert!(t0.elapsed() < WAIT, "m2 never synced to snap/1: {m:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::remove_file(root1.join("tmp/scratch")).unwrap();
    let (want, got) = (
        testkit::tree::listing(&root1),
        testkit::tree::listing(&root2),
    );
    let differ = testkit::tree::differences(&want, &got);
    assert!(differ.is_empty(), "{differ:#?}");
    assert!(want["/etc/new.conf"].contains(r#"links ["/etc/new.conf", "/etc/new.link"]"#));
    assert!(want["/usr/bin/tool"].starts_with("100700 "), "{want:#?}");
    if is_root() {
        assert!(want["/etc/app.conf"].contains(" 1234:5678 "), "{want:#?}");
    }
}

/// Lines of a running `adds --every`, as they come.
struct Rounds(std::sync::mpsc::Receiver<String>);

impl Rounds {
    fn next(&self) -> String {
        self.0
            .recv_timeout(WAIT)
            .expect("adds --every printed no line in time")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recurring_snapshots_add_a_version_only_after_a_change_and_never_reuse_a_name() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let is = common::imageserver(&t.join("imageserver"));
    let root = t.join("root");
    write(&root.join("etc/app.conf"), "v1\n", 0o644);
    let (subd, _c) = common::subd(&root);
    let host = subd.addr.clone();
    // rec/1 was used and deleted: the loop must not take that name again.
    imagetool(&is.addr, &["adds", "rec/1", &host, "", ""]);
    imagetool(&is.addr, &["delete", "rec/1"]);

    let mut child = Command::new(bin("imagetool"))
        .args([
            "--image-server",
            &is.addr,
            "adds",
            "--every",
            "1s",
            "rec",
            &host,
            "",
            "",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines() {
            let _ = tx.send(l.unwrap());
        }
    });
    let rounds = Rounds(rx);
    let first = rounds.next();
    assert!(first.contains("round 1: added rec/2: "), "{first}");
    let second = rounds.next();
    assert!(
        second.contains("round 2: unchanged since rec/2: nothing added, 0 new objects"),
        "{second}"
    );

    // A change on the host: the next rounds add rec/3, once.
    std::fs::write(root.join("etc/app.conf"), "v2\n").unwrap();
    let t0 = Instant::now();
    let added = loop {
        let l = rounds.next();
        if !l.contains("unchanged since rec/2") {
            break l;
        }
        assert!(t0.elapsed() < WAIT, "the change was never snapshotted");
    };
    assert!(
        added.contains("added rec/3: ") && added.contains(" 1 new objects"),
        "{added}"
    );
    let after = rounds.next();
    assert!(after.contains("unchanged since rec/3"), "{after}");
    let list = imagetool(&is.addr, &["list", "rec/"]);
    assert_eq!(list, "rec/2\nrec/3\n");

    // SIGTERM ends the loop, successfully.
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(child.wait().unwrap().success());
}

/// Rewrites `path` in place (same size, new bytes) until `stop`.
fn keep_changing(path: &Path, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            f.write_all_at(format!("{n:016}\n").as_bytes(), 0).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changing_while_read_is_retried_or_fails_the_snapshot_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let is = common::imageserver(&t.join("imageserver"));
    let root = t.join("root");
    let counter = root.join("var/lib/app/counter");
    write(&counter, &format!("{:016}\n", 0), 0o644);
    write(&root.join("etc/app.conf"), "v1\n", 0o644);
    let (subd, c) = common::subd(&root);
    let host = subd.addr.clone();
    common::full_poll(&c, 0).await;

    // Always changing: every fresh scan is stale by the time it is read.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_changing(&counter, stop.clone());
    let out = Command::new(bin("imagetool"))
        .args([
            "--image-server",
            &is.addr,
            "adds",
            "--retries",
            "1",
            "snap/1",
            &host,
            "",
            "",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("/var/lib/app/counter changed while it was read, 2 times"),
        "{err}"
    );
    let check = testkit::run_bin(
        "imagetool",
        &["--image-server", &is.addr, "check", "snap/1"],
    );
    assert!(check.is_err(), "no image was added");

    // Settling while the snapshot retries: the image holds the settled bytes.
    let adds = Command::new(bin("imagetool"))
        .args([
            "--image-server",
            &is.addr,
            "adds",
            "--retries",
            "30",
            "snap/2",
            &host,
            "",
            "",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let out = adds.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("changed while read; waiting for a fresh scan of"),
        "{err}"
    );
    let client = ImageServerClient::new(&is.addr, &ClientSecurity::Insecure).unwrap();
    let image = client.get_image("snap/2").await.unwrap();
    let got = image
        .tree
        .get(&"/var/lib/app/counter".parse().unwrap())
        .unwrap();
    let settled = std::fs::read(&counter).unwrap();
    assert_eq!(got.hash, Some(model::ObjectId::of(&settled)));
}

fn tls_files(certs: &Path, cert: &str, key: &str) -> wire::tls::TlsFiles {
    wire::tls::TlsFiles {
        ca: certs.join("CA.pem"),
        cert: certs.join(cert),
        key: certs.join(key),
    }
}

fn tls_flags(f: &wire::tls::TlsFiles) -> Vec<String> {
    vec![
        "--ca-file".into(),
        s(&f.ca),
        "--cert-file".into(),
        s(&f.cert),
        "--key-file".into(),
        s(&f.key),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_builder_may_snapshot_and_the_subd_and_dominator_certificates_may_not() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let certs = t.join("certs");
    wire::certs::make_all(&certs, &[]).unwrap();
    let daemon = |role: &str| {
        tls_files(
            &certs,
            &format!("{role}/cert.pem"),
            &format!("{role}/key.pem"),
        )
    };
    let mut args = vec!["--data-dir".to_string(), s(&t.join("data"))];
    args.extend(["--listen".into(), "127.0.0.1:0".into()]);
    args.extend(tls_flags(&daemon("imageserver")));
    let is = Daemon::start(&bin("imageserver"), &args);
    let root = t.join("root");
    write(&root.join("etc/app.conf"), "v1\n", 0o644);
    let mut args = vec!["--root".to_string(), s(&root)];
    args.extend(["--listen".into(), "127.0.0.1:0".into()]);
    args.extend(["--scan-speed-percent".into(), "100".into()]);
    args.extend(tls_flags(&daemon("subd")));
    let subd = Daemon::start(&bin("subd"), &args);

    // A builder snapshots the host.
    let builder = tls_files(&certs, "builder.cert", "builder.key");
    let mut cmd = vec!["--image-server".to_string(), is.addr.clone()];
    cmd.extend(tls_flags(&builder));
    cmd.extend(["adds", "snap/1", &subd.addr, "", ""].map(String::from));
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let out = ok("imagetool", &cmd);
    assert!(out.contains("added snapshot snap/1 of "), "{out}");

    // The subd's and the dominator's certificates are refused the host's tree and files: 403.
    let hashes = [model::ObjectId::of(b"v1\n")];
    for role in ["subd", "dominator"] {
        let c = SubdClient::new(
            &subd.addr,
            &ClientSecurity::Tls(daemon(role)),
            Some(Duration::from_secs(30)),
        )
        .unwrap();
        let e = c.snapshot_objects(&hashes).await.expect_err("refused");
        assert_eq!(e.status(), Some(403), "{role}: {e}");
        let want = format!(
            "access to method denied: certificate \"{role}\" is not granted Snapshot.GetObjects"
        );
        assert!(e.to_string().contains(&want), "{role}: {e}");
        let req = model::api::PollRequest::default();
        let e = c.snapshot_tree(&req).await.expect_err("refused");
        assert_eq!(e.status(), Some(403), "{role}: {e}");
        assert!(e.to_string().contains("Snapshot.GetTree"), "{role}: {e}");
    }
}

/// subd serves only what its last scan recorded: a file under an excluded directory, or
/// in `/.subd`, is never read, whoever asks for its hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subd_serves_only_scanned_files_never_excluded_ones_or_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    write(&root.join("etc/app.conf"), "v1\n", 0o644);
    write(&root.join("tmp/secret"), "excluded\n", 0o600);
    let (_subd, c) = common::subd(&root);
    common::full_poll(&c, 0).await;
    write(&root.join(".subd/planted"), "subd's own\n", 0o600);
    let ids = ["excluded\n", "v1\n", "subd's own\n"].map(|t| model::ObjectId::of(t.as_bytes()));
    let resp = c.snapshot_objects(&ids).await.unwrap();
    let body = resp.bytes().await.unwrap();
    let mut r = &body[..];
    use model::frame::{checked, read_header};
    assert_eq!(
        read_header(&mut r).unwrap(),
        Some((ids[0], checked::UNAVAILABLE))
    );
    assert_eq!(read_header(&mut r).unwrap(), Some((ids[1], 3)));
    assert_eq!(&r[..4], b"v1\n\0", "the bytes, then SAME");
    r = &r[4..];
    assert_eq!(
        read_header(&mut r).unwrap(),
        Some((ids[2], checked::UNAVAILABLE))
    );
    assert!(r.is_empty());
}
