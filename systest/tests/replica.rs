//! Imageserver replicas (issue 14 §3) with the real binaries on loopback: an imageserver
//! started with `--replication-master` copies its master's images byte for byte (the same
//! `imagetool show`, hooks, state lines, expiry, image file and checksum), fetches only the
//! objects it lacks, follows deletions, expiries and expiry changes (names stay never
//! reusable), refuses writes naming the master, catches up after its link is cut (fault
//! proxy), after a crash mid-catch-up, and from an empty data directory; its status page
//! and metrics say whose replica it is and how far behind; a machine is born from it.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};
use testkit::{bin, run_bin, Daemon, Fault, FaultProxy};
use wire::client::{ClientSecurity, ImageServerClient, RpcClient};

/// Generous: CI is a 2-core machine shared with compilers.
const WAIT: Duration = Duration::from_secs(120);

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A directory of `files` files of `size` bytes each (all different, seeded by `seed`),
/// plus `/etc/shared` and `/etc/own` = `own`.
fn tree(t: &Path, name: &str, files: usize, size: usize, seed: u64, own: &str) -> String {
    let dir = t.join(name);
    std::fs::create_dir_all(dir.join("payload")).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/shared"), "the same in every image\n").unwrap();
    std::fs::write(dir.join("etc/own"), own).unwrap();
    for i in 0..files {
        let bytes = testkit::tree::noise(i as u64 + 1 + seed, size);
        std::fs::write(dir.join(format!("payload/f{i}")), bytes).unwrap();
    }
    s(&dir)
}

/// An insecure imageserver on `dir` following `master`.
fn replica_of(dir: &Path, master: &str) -> Daemon {
    Daemon::imageserver(&bin("imageserver"), dir, &["--replication-master", master])
}

/// `imagetool --image-server SERVER ARGS…`: stdout, or stderr and stdout on failure.
fn it(server: &str, args: &[&str]) -> Result<String, testkit::BinFailed> {
    let mut v = vec!["--image-server", server];
    v.extend_from_slice(args);
    run_bin("imagetool", &v)
}

fn page_client(addr: &str) -> RpcClient {
    RpcClient::new(
        addr,
        wire::client::IMAGESERVER_PORT,
        &ClientSecurity::Insecure,
        wire::client::IMAGESERVER_NAME,
        Some(Duration::from_secs(30)),
    )
    .unwrap()
}

/// The value of the metric line starting with `name` (labels included) on `addr`.
async fn metric(addr: &str, name: &str) -> Option<u64> {
    let text = page_client(addr).get_text("/metrics").await.ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until `imagetool list` on the replica prints what it prints on the master.
async fn wait_listed_alike(master: &str, replica: &str) -> String {
    let t0 = Instant::now();
    loop {
        let m = it(master, &["list"]).unwrap();
        if it(replica, &["list"]).ok().as_deref() == Some(m.as_str())
            && metric(replica, "imageserver_replica_images_pending").await == Some(0)
        {
            return m;
        }
        assert!(
            t0.elapsed() < WAIT,
            "replica never listed {m:?}: {:?}",
            it(replica, &["list"])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Everything imagetool shows of `name`, as the master and the replica show it, equal.
fn assert_shown_alike(master: &str, replica: &str, name: &str) {
    for cmd in [
        "show",
        "show-hooks",
        "show-state",
        "show-filter",
        "show-triggers",
        "get-image-expiration",
    ] {
        let m = it(master, &[cmd, name]).unwrap();
        assert_eq!(it(replica, &[cmd, name]).unwrap(), m, "{cmd} {name}");
    }
}

/// The image file and its checksum file are byte-identical in both data directories.
fn assert_files_alike(master_data: &Path, replica_data: &Path, name: &str) {
    for f in [".image", ".image.sha512"] {
        let p = format!("images/{name}/{f}");
        assert_eq!(
            std::fs::read(replica_data.join(&p)).unwrap(),
            std::fs::read(master_data.join(&p)).unwrap(),
            "{p}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_copies_images_and_only_missing_objects_and_follows_deletions_and_expiry() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (md, rd) = (t.join("master"), t.join("replica"));
    let master = Daemon::imageserver(&bin("imageserver"), &md, &["--min-expiry-secs", "2"]);
    let m = master.addr.clone();
    // An image with hooks, state lines and an expiry, before the replica exists.
    let hooks = t.join("hooks");
    std::fs::create_dir_all(hooks.join("pre")).unwrap();
    std::fs::write(hooks.join("pre/10-check"), "#!/bin/sh\nexit 0\n").unwrap();
    let state = t.join("state");
    std::fs::write(&state, "/etc/own$\n").unwrap();
    let src1 = tree(t, "src1", 6, 4096, 0, "one\n");
    let h = s(&hooks);
    let st = s(&state);
    let add1 = [
        "add",
        "--hooks",
        &h,
        "--state",
        &st,
        "--expires-in",
        "1h",
        "app/1",
        &src1,
        "",
        "",
    ];
    it(&m, &add1).unwrap();
    it(
        &m,
        &["add", "gone/1", &tree(t, "g", 1, 10, 50, "g\n"), "", ""],
    )
    .unwrap();
    it(&m, &["delete", "gone/1"]).unwrap();

    let replica = replica_of(&rd, &m);
    let r = replica.addr.clone();
    assert_eq!(wait_listed_alike(&m, &r).await, "app/1\n");
    assert_shown_alike(&m, &r, "app/1");
    assert_files_alike(&md, &rd, "app/1");
    // A name deleted before the replica existed is a tombstone there too.
    let rc = ImageServerClient::new(&r, &ClientSecurity::Insecure).unwrap();
    assert!(rc.check_image_name("gone/1").await.unwrap().deleted);
    let fetched = metric(&r, "imageserver_replica_objects_fetched_total")
        .await
        .unwrap();
    // 6 payload files, /etc/shared, /etc/own and the hook.
    assert_eq!(fetched, 9);

    // A second image sharing all but one object: only that one crosses.
    let src2 = tree(t, "src2", 6, 4096, 0, "two\n");
    it(&m, &["add", "app/2", &src2, "", ""]).unwrap();
    assert_eq!(wait_listed_alike(&m, &r).await, "app/1\napp/2\n");
    assert_shown_alike(&m, &r, "app/2");
    assert_files_alike(&md, &rd, "app/2");
    assert_eq!(
        metric(&r, "imageserver_replica_objects_fetched_total").await,
        Some(fetched + 1)
    );

    // An expiry extended on the master: the replica's file is rewritten alike.
    it(&m, &["change-image-expiration", "app/1", "never"]).unwrap();
    let t0 = Instant::now();
    while it(&r, &["get-image-expiration", "app/1"]).unwrap() != "never\n" {
        assert!(t0.elapsed() < WAIT, "expiry change never followed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_files_alike(&md, &rd, "app/1");

    // A deletion follows; the name stays unusable on the replica.
    it(&m, &["delete", "app/1"]).unwrap();
    assert_eq!(wait_listed_alike(&m, &r).await, "app/2\n");
    assert!(rc.check_image_name("app/1").await.unwrap().deleted);

    // An expiry follows: app/3 expires on both, and its name stays taken.
    let src3 = tree(t, "src3", 1, 100, 99, "three\n");
    it(&m, &["add", "--expires-in", "3s", "app/3", &src3, "", ""]).unwrap();
    assert_eq!(wait_listed_alike(&m, &r).await, "app/2\napp/3\n");
    assert_shown_alike(&m, &r, "app/3");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(wait_listed_alike(&m, &r).await, "app/2\n");
    let c3 = rc.check_image_name("app/3").await.unwrap();
    assert!(c3.expired && !c3.exists, "{c3:?}");
    // …and the status page says whose replica it is, in step.
    let page = page_client(&r).get_text("/").await.unwrap();
    assert!(page.contains(&format!("Replica of {m}")), "{page}");
    assert!(page.contains("images pending: 0"), "{page}");
    assert!(
        metric(&r, &format!("imageserver_replica{{master=\"{m}\"}}")).await == Some(1),
        "replica metric"
    );
    let synced = metric(&r, "imageserver_replica_last_sync_seconds")
        .await
        .unwrap();
    assert!(synced + 60 > disk::clock::unix_now(), "last sync {synced}");
    assert_eq!(
        metric(&m, "imageserver_replica_last_sync_seconds").await,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_sent_to_a_replica_are_refused_naming_the_master() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let master = Daemon::imageserver(&bin("imageserver"), &t.join("master"), &[]);
    let m = master.addr.clone();
    let src = tree(t, "src", 2, 1000, 0, "x\n");
    it(&m, &["add", "app/1", &src, "", ""]).unwrap();
    let replica = replica_of(&t.join("replica"), &m);
    let r = replica.addr.clone();
    wait_listed_alike(&m, &r).await;
    let line = format!("this imageserver is a replica of {m}; send writes there");
    let src2 = tree(t, "src2", 2, 1000, 7, "new\n");
    for args in [
        vec!["add", "app/2", src2.as_str(), "", ""],
        vec!["delete", "app/1"],
        vec!["change-image-expiration", "app/1", "never"],
        vec!["delunrefobj", "100", "0"],
    ] {
        let err = it(&r, &args).unwrap_err();
        assert!(err.contains(&line), "{args:?}: {err}");
        assert!(err.contains("403"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    // Raw object uploads too.
    let rc = ImageServerClient::new(&r, &ClientSecurity::Insecure).unwrap();
    let e = rc.rpc.call_raw(
        model::api::methods::ADD_OBJECTS,
        reqwest::Body::from(Vec::new()),
        "application/octet-stream",
    );
    let e = e.await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    // Nothing changed on either.
    assert_eq!(it(&r, &["list"]).unwrap(), "app/1\n");
    assert_eq!(it(&m, &["list"]).unwrap(), "app/1\n");
    assert!(!rc.check_image_name("app/2").await.unwrap().deleted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_catches_up_after_its_link_is_cut_and_after_a_crash_and_from_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let md = t.join("master");
    let mut master = Daemon::imageserver(&bin("imageserver"), &md, &[]);
    let m = master.addr.clone();
    it(
        &m,
        &["add", "app/1", &tree(t, "s1", 3, 1000, 0, "1\n"), "", ""],
    )
    .unwrap();
    let proxy = FaultProxy::start(m.parse().unwrap(), Fault::Pass).await;
    let via = proxy.addr.to_string();
    let rd = t.join("replica");
    let mut replica =
        Daemon::imageserver(&bin("imageserver"), &rd, &["--replication-master", &via]);
    let r = replica.addr.clone();
    wait_listed_alike(&m, &r).await;

    // The link is cut (new connections reset, and the master restarted on its data and
    // port, which ends the replica's held connection): the master moves on; the replica
    // says it lost it.
    proxy.set(Fault::Reset);
    master.kill9();
    let args: Vec<String> = [
        "--data-dir",
        &s(&md),
        "--listen",
        &m,
        "--permit-insecure-mode",
    ]
    .map(String::from)
    .to_vec();
    let _master = Daemon::start(&bin("imageserver"), &args);
    it(
        &m,
        &["add", "app/2", &tree(t, "s2", 3, 1000, 10, "2\n"), "", ""],
    )
    .unwrap();
    it(&m, &["delete", "app/1"]).unwrap();
    let t0 = Instant::now();
    loop {
        let page = page_client(&r).get_text("/").await.unwrap();
        if page.contains("last pass failed") {
            break;
        }
        assert!(t0.elapsed() < WAIT, "replica never said it lost the master");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(it(&r, &["list"]).unwrap(), "app/1\n");
    // Restored: it catches up.
    proxy.set(Fault::Pass);
    assert_eq!(wait_listed_alike(&m, &r).await, "app/2\n");
    assert_files_alike(&md, &rd, "app/2");

    // Killed in the middle of copying a large image, restarted: it converges, and nothing
    // half-written was ever visible.
    let big = tree(t, "big", 400, 64 * 1024, 1000, "big\n");
    it(&m, &["add", "app/big", &big, "", ""]).unwrap();
    let image_file = rd.join("images/app/big/.image");
    let t0 = Instant::now();
    while !image_file.exists()
        && !testkit::files_under(&rd.join("objects"))
            .iter()
            .any(|f| f.to_string_lossy().ends_with(disk::fsutil::TEMP_SUFFIX))
    {
        assert!(t0.elapsed() < WAIT, "the copy never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    replica.kill9();
    eprintln!(
        "replica killed {} the image was written",
        if image_file.exists() {
            "after"
        } else {
            "before"
        }
    );
    // Killed mid-copy: the image is absent or whole, never partial.
    if let Ok(b) = std::fs::read(&image_file) {
        assert_eq!(b, std::fs::read(md.join("images/app/big/.image")).unwrap());
    }
    let replica = Daemon::imageserver(&bin("imageserver"), &rd, &["--replication-master", &via]);
    let r = replica.addr.clone();
    assert_eq!(wait_listed_alike(&m, &r).await, "app/2\napp/big\n");
    assert_files_alike(&md, &rd, "app/big");
    common::check_objects(&rd.join("objects"), false);
    drop(replica);

    // From an empty data directory: everything again, tombstones included.
    let fresh = t.join("fresh");
    let replica = replica_of(&fresh, &m);
    let r = replica.addr.clone();
    assert_eq!(wait_listed_alike(&m, &r).await, "app/2\napp/big\n");
    assert_shown_alike(&m, &r, "app/big");
    let rc = ImageServerClient::new(&r, &ClientSecurity::Insecure).unwrap();
    assert!(rc.check_image_name("app/1").await.unwrap().deleted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_is_born_from_a_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let master = Daemon::imageserver(&bin("imageserver"), &t.join("master"), &[]);
    let m = master.addr.clone();
    let src = tree(t, "src", 5, 20_000, 3, "born\n");
    it(&m, &["add", "app/1", &src, "", ""]).unwrap();
    let replica = replica_of(&t.join("replica"), &m);
    let r = replica.addr.clone();
    wait_listed_alike(&m, &r).await;
    // The master goes away: the machine needs only the replica.
    drop(master);
    let root = t.join("m1");
    std::fs::create_dir_all(&root).unwrap();
    let subd = Daemon::subd(
        &bin("subd"),
        &s(&root),
        &["--image-server", &r, "--scan-speed-percent", "100"],
    );
    let c = wire::client::SubdClient::new(
        &subd.addr,
        &ClientSecurity::Insecure,
        Some(Duration::from_secs(30)),
    )
    .unwrap();
    let image = ImageServerClient::new(&r, &ClientSecurity::Insecure)
        .unwrap()
        .get_image("app/1")
        .await
        .unwrap();
    common::converge(&c, &r, "app/1", &image).await;
    for f in ["etc/own", "etc/shared", "payload/f0", "payload/f4"] {
        assert_eq!(
            std::fs::read(root.join(f)).unwrap(),
            std::fs::read(Path::new(&src).join(f)).unwrap(),
            "{f}"
        );
    }
}

/// `--ca-file`, `--cert-file`, `--key-file` of a daemon role or a user from `make-certs`.
fn tls_flags(certs: &Path, role: &str, daemon: bool) -> Vec<String> {
    let (cert, key) = if daemon {
        (
            certs.join(role).join("cert.pem"),
            certs.join(role).join("key.pem"),
        )
    } else {
        (
            certs.join(format!("{role}.cert")),
            certs.join(format!("{role}.key")),
        )
    };
    [
        "--ca-file",
        &s(&certs.join("CA.pem")),
        "--cert-file",
        &s(&cert),
        "--key-file",
        &s(&key),
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_follows_over_mutual_tls_with_its_own_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let certs = t.join("certs");
    wire::certs::make_all(&certs, &[]).unwrap();
    let start = |data: &Path, extra: &[&str]| {
        let mut args: Vec<String> = ["--data-dir", &s(data), "--listen", "127.0.0.1:0"]
            .map(String::from)
            .to_vec();
        args.extend(tls_flags(&certs, "imageserver", true));
        args.extend(extra.iter().map(|a| a.to_string()));
        Daemon::start(&bin("imageserver"), &args)
    };
    let master = start(&t.join("master"), &[]);
    let m = master.addr.clone();
    let admin = tls_flags(&certs, "admin", false);
    let tool = |server: &str, args: &[&str]| {
        let mut v: Vec<&str> = admin.iter().map(String::as_str).collect();
        v.extend(["--image-server", server]);
        v.extend_from_slice(args);
        run_bin("imagetool", &v)
    };
    let src = tree(t, "src", 3, 5000, 4, "tls\n");
    tool(&m, &["add", "app/1", &src, "", ""]).unwrap();
    let replica = start(&t.join("replica"), &["--replication-master", &m]);
    let r = replica.addr.clone();
    let t0 = Instant::now();
    while tool(&r, &["list"]).ok().as_deref() != Some("app/1\n") {
        assert!(t0.elapsed() < WAIT, "never replicated over TLS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        tool(&r, &["show", "app/1"]).unwrap(),
        tool(&m, &["show", "app/1"]).unwrap()
    );
    // Even the admin's writes go to the master.
    let err = tool(&r, &["delete", "app/1"]).unwrap_err();
    assert!(
        err.contains(&format!("replica of {m}; send writes there")),
        "{err}"
    );
    // A subd's certificate may fetch objects but not follow the master.
    let subd = TlsFilesFor(tls_flags(&certs, "subd", true));
    let c = ImageServerClient::new(&m, &subd.security()).unwrap();
    let e = c
        .rpc
        .call::<_, model::api::ReplicationStateResponse>(
            model::api::methods::GET_REPLICATION_STATE,
            &model::api::ReplicationStateRequest::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
}

/// A client's TLS files from `--ca-file X --cert-file Y --key-file Z` flags.
struct TlsFilesFor(Vec<String>);

impl TlsFilesFor {
    fn security(&self) -> ClientSecurity {
        ClientSecurity::Tls(wire::tls::TlsFiles {
            ca: self.0[1].clone().into(),
            cert: self.0[3].clone().into(),
            key: self.0[5].clone().into(),
        })
    }
}

#[test]
fn a_bad_master_address_or_a_bucket_is_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = s(&tmp.path().join("data"));
    let run = |extra: &[&str]| {
        let mut args = vec!["--data-dir", data.as_str(), "--listen", "127.0.0.1:0"];
        args.push("--permit-insecure-mode");
        args.extend_from_slice(extra);
        run_bin("imageserver", &args).unwrap_err()
    };
    let e = run(&["--replication-master", "http://master:6971/"]);
    assert!(e.contains("is not HOST[:PORT]: a URL"), "{e}");
    let e = run(&["--replication-master", "a:1,b:2"]);
    assert!(e.contains("a replica follows one master"), "{e}");
    let e = run(&["--replication-master", "a:1", "--object-store", "s3://b"]);
    assert!(e.contains("cannot be used with"), "{e}");
}
