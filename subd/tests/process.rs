//! The real subd binary: SIGTERM stops it cleanly; kill -9 during an update leaves every
//! file wholly old or wholly new and the next update converges; kill -9 during a fetch
//! leaves no partial object behind; a root others can write, or a `.subd` that is a
//! symlink, is refused at start-up.

use disk::objectstore::ObjectStore;
use model::api::{FetchRequest, PollRequest, PollResponse, UpdateRequest};
use model::diff::DiffOptions;
use model::image::{FileTree, Image, Inode, Mtime};
use model::{Filter, FsPath, ObjectId, Triggers};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use wire::client::{ClientSecurity, SubdClient};

struct Proc {
    child: Child,
    client: SubdClient,
}

fn spawn(root: &Path, extra: &[&str]) -> (Proc, String) {
    let (child, addr) = testkit::spawn_listening(
        Command::new(env!("CARGO_BIN_EXE_subd"))
            .args([
                "--root",
                root.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--permit-insecure-mode",
            ])
            .args(extra),
    );
    let addr = addr.to_string();
    let client = SubdClient::new(
        &addr,
        &ClientSecurity::Insecure,
        Some(Duration::from_secs(10)),
    )
    .unwrap();
    (Proc { child, client }, addr)
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn poll_tree(c: &SubdClient, after: u64) -> PollResponse {
    testkit::drive::poll_after(c, after).await
}

fn kill9(child: &Child) {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
}

#[tokio::test]
async fn sigterm_stops_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let (mut p, _) = spawn(d.path(), &[]);
    poll_tree(&p.client, 0).await;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(p.child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

/// A SIGTERM sent as soon as subd says where it listens (before it has served anything)
/// stops it cleanly: the handler is installed before the listening line.
#[test]
fn sigterm_right_after_the_listening_line_stops_cleanly() {
    for _ in 0..5 {
        let d = tempfile::tempdir().unwrap();
        let (mut p, _) = spawn(d.path(), &[]);
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(p.child.id() as i32).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let status = p.child.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

#[tokio::test]
async fn refuses_to_start_without_certificates_unless_insecure() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_subd"))
        .args([
            "--root",
            d.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--ca-file",
            "/nonexistent/ca.pem",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--permit-insecure-mode"), "{err}");
}

/// Runs subd on `root` expecting it to refuse to start within 10 s; returns the last
/// line of its stderr (the error).
fn refused(root: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_subd"))
        .args(["--root", root.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--permit-insecure-mode"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("subd started on {}: it should have refused", root.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // The log may say more above; the error itself is the one last line.
    let err = stderr.lines().last().unwrap_or_default().to_string();
    assert!(err.starts_with("subd: "), "{stderr}");
    err
}

#[test]
fn refuses_a_root_others_can_write_and_a_state_dir_that_is_a_symlink() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = refused(&root);
    assert!(
        err.contains("writable by other users (mode 0777)") && err.contains("root"),
        "{err}"
    );
    assert!(!root.join(".subd").exists(), "nothing made: {err}");

    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let outside = d.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, root.join(".subd")).unwrap();
    let err = refused(&root);
    assert!(
        err.contains(".subd is a symlink or not a directory"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "{err}");
}

const N: usize = 150;
const SIZE: usize = 64 * 1024;

fn image(fill: u8) -> (Image, Vec<u8>) {
    let data = vec![fill; SIZE];
    let h = ObjectId::of(&data);
    let mut t = FileTree::with_root(Inode::dir(0o755, 0, 0));
    t.inodes.insert(1, Inode::dir(0o755, 0, 0));
    t.entries.insert("/d".parse().unwrap(), 1);
    for i in 0..N {
        // distinct inodes with the same content: one object, duplicated on apply
        t.inodes.insert(
            10 + i as u64,
            Inode::file(
                0o644,
                0,
                0,
                Mtime {
                    sec: 1_600_000_000,
                    nsec: 0,
                },
                SIZE as u64,
                Some(h),
            ),
        );
        let path: FsPath = format!("/d/f{i:03}").parse().unwrap();
        t.entries.insert(path, 10 + i as u64);
    }
    let mut img = Image::new(t, Some(Filter::empty()), Triggers::default());
    img.triggers = Triggers::parse(r#"[{"MatchLines":["/d"],"Service":"app"}]"#, "t").unwrap();
    (img, data)
}

fn plan(img: &Image, p: &PollResponse) -> model::UpdatePlan {
    testkit::drive::plan_for("d/2", img, p, &DiffOptions::default())
}

fn every_file_wholly(root: &Path) -> (usize, usize) {
    let (mut old, mut new) = (0, 0);
    for i in 0..N {
        let b = std::fs::read(root.join(format!("d/f{i:03}"))).unwrap();
        assert_eq!(b.len(), SIZE, "f{i:03} has {} bytes", b.len());
        if b.iter().all(|&x| x == b'A') {
            old += 1;
        } else if b.iter().all(|&x| x == b'B') {
            new += 1;
        } else {
            panic!("f{i:03} is mixed");
        }
    }
    (old, new)
}

#[tokio::test]
async fn kill_9_during_an_update_leaves_whole_files_and_the_next_update_converges() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir_all(root.join("d")).unwrap();
    for i in 0..N {
        std::fs::write(root.join(format!("d/f{i:03}")), vec![b'A'; SIZE]).unwrap();
    }
    let script = d.path().join("svc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$2\" = stop ] && sleep 0.3\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let svc = script.display().to_string();
    let (img, data) = image(b'B');
    let store = ObjectStore::open(&root.join(".subd/objects")).unwrap();
    store.put(&data).unwrap();
    let (p, _) = spawn(&root, &["--service-command", &svc]);
    let mut poll = poll_tree(&p.client, 0).await;
    while poll.object_cache.as_ref().unwrap().is_empty() {
        poll = poll_tree(&p.client, poll.generation).await;
    }
    let pl = plan(&img, &poll);
    assert_eq!(pl.inodes_to_make.len(), N, "{pl:#}");
    p.client
        .update(&UpdateRequest {
            plan: pl,
            wait: false,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(320)).await;
    kill9(&p.child);
    drop(p);
    let (old, new) = every_file_wholly(&root);
    eprintln!("after kill -9: {old} old, {new} new");
    // restart; the object may have been consumed: "fetch" it again, then update
    store.put(&data).unwrap();
    let (p, _) = spawn(&root, &["--service-command", &svc]);
    let mut poll = poll_tree(&p.client, 0).await;
    while poll.object_cache.as_ref().unwrap().is_empty() {
        poll = poll_tree(&p.client, poll.generation).await;
    }
    let pl = plan(&img, &poll);
    let res = p
        .client
        .update(&UpdateRequest {
            plan: pl,
            wait: true,
        })
        .await
        .unwrap()
        .result
        .unwrap();
    assert!(res.errors.is_empty(), "{res:?}");
    assert_eq!(every_file_wholly(&root), (0, N));
    let after = poll_tree(&p.client, poll.generation).await;
    assert!(plan(&img, &after).is_empty());
    assert!(
        std::fs::read_dir(root.join(".subd/staging"))
            .unwrap()
            .next()
            .is_none(),
        "staging emptied"
    );
}

#[tokio::test]
async fn kill_9_during_a_fetch_leaves_no_partial_object() {
    // An "imageserver" that sends half an object and then stalls forever.
    let data = vec![9u8; 100_000];
    let h = ObjectId::of(&data);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap().to_string();
    let mut frame = model::frame::header(&h, data.len() as u64).to_vec();
    frame.extend_from_slice(&data[..50_000]);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            let frame = frame.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 100072\r\n\r\n")
                    .await;
                let _ = s.write_all(&frame).await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
            });
        }
    });
    let d = tempfile::tempdir().unwrap();
    let (p, _) = spawn(d.path(), &[]);
    poll_tree(&p.client, 0).await;
    p.client
        .fetch(&FetchRequest {
            server,
            hashes: vec![h],
            wait: false,
            ..Default::default()
        })
        .await
        .unwrap();
    let t0 = Instant::now();
    loop {
        let s = p
            .client
            .poll(&PollRequest {
                have_generation: 0,
                short_only: true,
                ..Default::default()
            })
            .await
            .unwrap();
        if s.fetch_in_progress {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    kill9(&p.child);
    drop(p);
    let store = ObjectStore::open(&d.path().join(".subd/objects")).unwrap();
    assert!(
        store.list().unwrap().is_empty(),
        "no partial object under its name"
    );
    let leftovers = walk(&d.path().join(".subd/objects"));
    assert!(
        leftovers.is_empty(),
        "temp files removed on open: {leftovers:?}"
    );
}

fn walk(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            v.extend(walk(&e.path()));
        } else {
            v.push(e.path().display().to_string());
        }
    }
    v
}

/// A sparse image holding `/etc/app.conf` = `conf`, with `triggers` (JSON).
fn conf_image(conf: &[u8], triggers: &str) -> Image {
    let mut t = FileTree::with_root(Inode::dir(0o755, 0, 0));
    t.inodes.insert(1, Inode::dir(0o755, 0, 0));
    t.entries.insert("/etc".parse().unwrap(), 1);
    let mtime = Mtime {
        sec: 1_600_000_000,
        nsec: 0,
    };
    let id = ObjectId::of(conf);
    t.inodes.insert(
        2,
        Inode::file(0o644, 0, 0, mtime, conf.len() as u64, Some(id)),
    );
    t.entries.insert("/etc/app.conf".parse().unwrap(), 2);
    Image::new(t, None, Triggers::parse(triggers, "t").unwrap())
}

/// Puts `conf` into the cache (an update renames an object out of it for its last use),
/// updates to `img` once a scan lists it, and asserts that the update succeeded and ran
/// the `app` trigger.
async fn update_with_trigger(c: &SubdClient, root: &Path, conf: &[u8], name: &str, img: &Image) {
    let mut poll = poll_tree(c, 0).await; // subd has set its cache up
    ObjectStore::open(&root.join(".subd/objects"))
        .unwrap()
        .put(conf)
        .unwrap();
    while !poll
        .object_cache
        .as_ref()
        .unwrap()
        .contains(&ObjectId::of(conf))
    {
        poll = poll_tree(c, poll.generation).await;
    }
    let pl = testkit::drive::plan_for(name, img, &poll, &DiffOptions::default());
    assert!(!pl.is_empty(), "{name}: nothing to do?");
    let r = testkit::drive::update(c, pl).await;
    assert!(r.errors.is_empty(), "{name}: {r:?}");
    assert_eq!(
        r.trigger_actions,
        ["app stop", "app start"],
        "{name}: {r:?}"
    );
}

/// Issue 9 #2: image A's and image B's triggers each compile, but not as one regex set.
/// The update from A to B used to panic and leave `update_in_progress` set for good (every
/// later call 409, and the saved triggers jammed it again after a restart).
#[tokio::test]
async fn triggers_too_big_together_do_not_jam_subd() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let script = d.path().join("svc.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let svc = script.display().to_string();
    let a = conf_image(
        b"A",
        r#"[{"MatchLines":["/etc/app[.]conf$","\\w{100}a","\\w{100}b"],"Service":"app"}]"#,
    );
    let b = conf_image(
        b"B",
        r#"[{"MatchLines":["/etc/app[.]conf$","\\w{100}c"],"Service":"app"}]"#,
    );
    let conf = root.join("etc/app.conf");

    let (p, _) = spawn(&root, &["--service-command", &svc]);
    update_with_trigger(&p.client, &root, b"A", "app/a", &a).await;
    assert_eq!(std::fs::read(&conf).unwrap(), b"A");
    update_with_trigger(&p.client, &root, b"B", "app/b", &b).await;
    assert_eq!(std::fs::read(&conf).unwrap(), b"B");

    // Not jammed: a fetch is accepted, and drift is put back (the trigger runs again).
    p.client
        .fetch(&FetchRequest {
            server: "127.0.0.1:1".into(),
            hashes: vec![],
            wait: true,
            ..Default::default()
        })
        .await
        .unwrap();
    std::fs::write(&conf, b"drift").unwrap();
    update_with_trigger(&p.client, &root, b"B", "app/b", &b).await;
    assert_eq!(std::fs::read(&conf).unwrap(), b"B");
    drop(p);

    // After a restart, B's saved triggers merge with A's again.
    let (p, _) = spawn(&root, &["--service-command", &svc]);
    update_with_trigger(&p.client, &root, b"A", "app/a", &a).await;
    assert_eq!(std::fs::read(&conf).unwrap(), b"A");
    let short = p
        .client
        .poll(&PollRequest {
            have_generation: 0,
            short_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!short.update_in_progress);
    assert_eq!(short.last_image.as_deref(), Some("app/a"));
}

/// The subd process's resident set, in bytes (VmRSS).
fn vm_rss(child: &Child) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// A poll whose reply is never read: the request is sent on a socket with a tiny receive
/// buffer, and the socket is kept open.
async fn unread_full_poll(addr: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(addr.parse().unwrap()).await.unwrap();
    let body = r#"{"have_generation":0,"short_only":false}"#;
    let req = format!(
        "POST /rpc/Subd.Poll HTTP/1.1\r\nhost: subd\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// Issue 9 #9: full polls nobody reads used to hold one serialized tree each (200 of a
/// 60k-file root: 93 MB → 1.97 GB). All polls of one generation now share one buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_full_polls_share_one_buffer_and_rss_stays_bounded() {
    const FILES: usize = 30_000;
    const POLLS: usize = 40;
    let d = tempfile::tempdir().unwrap();
    for i in 0..FILES {
        let dir = d.path().join(format!("dir-{:03}", i % 300));
        if i < 300 {
            std::fs::create_dir(&dir).unwrap();
        }
        let name = format!("a-file-with-a-rather-long-name-to-make-the-tree-big-{i:06}");
        std::fs::write(dir.join(name), i.to_string()).unwrap();
    }
    let (p, addr) = spawn(d.path(), &[]);
    let full = poll_tree(&p.client, 0).await;
    let tree_bytes = serde_json::to_vec(&full).unwrap().len() as u64;
    assert!(
        tree_bytes > 8 << 20,
        "a tree larger than a socket's buffers: {tree_bytes}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = vm_rss(&p.child);

    let mut stuck = Vec::new();
    for _ in 0..POLLS {
        stuck.push(unread_full_poll(&addr).await);
    }
    // Every reply is being sent once RSS stops rising (2 s without 1 MiB more).
    let mut samples = vec![vm_rss(&p.child)];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        samples.push(vm_rss(&p.child));
        let n = samples.len();
        if n > 4 && samples[n - 1] < samples[n - 5] + (1 << 20) {
            break;
        }
    }
    let mut after = *samples.iter().max().unwrap();
    // A poll as the dominator makes it still answers: short, and full.
    let t0 = Instant::now();
    let short = p
        .client
        .poll(&PollRequest {
            have_generation: full.generation,
            short_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(short.generation, full.generation);
    let again = p
        .client
        .poll(&PollRequest {
            have_generation: 0,
            short_only: false,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(again.tree, full.tree);
    assert!(t0.elapsed() < Duration::from_secs(10));
    after = after.max(vm_rss(&p.child));
    let growth = after.saturating_sub(before);
    eprintln!(
        "{POLLS} unread full polls of a {} MiB tree: VmRSS {} MiB -> {} MiB",
        tree_bytes >> 20,
        before >> 20,
        after >> 20
    );
    // One serialized tree shared by all 40 (two, were a scan to finish meanwhile) and the
    // connections' buffers (slices of the shared tree, not copies). Before the fix: 432 MiB
    // here (one tree per poll).
    assert!(
        growth < 2 * tree_bytes + (16 << 20),
        "VmRSS grew by {} MiB for {POLLS} polls of a {} MiB tree",
        growth >> 20,
        tree_bytes >> 20
    );
    drop(stuck);
}
