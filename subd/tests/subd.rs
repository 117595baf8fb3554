//! A real subd on 127.0.0.1:0 with a temp directory as root, driven through `SubdClient`;
//! plans computed with the shared diff from what Poll returns. Objects are put straight
//! into the subd's cache here (fetching from a real imageserver is in `fleet.rs`).

use disk::objectstore::ObjectStore;
use model::api::{PollRequest, PollResponse, UpdateRequest, UpdateResult};
use model::diff::DiffOptions;
use model::image::{FileTree, Image, Inode, Mtime};
use model::plan::{PathInode, UpdatePlan};
use model::{FsPath, ObjectId, Triggers};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use subd::{Config, Subd};
use wire::client::{ClientSecurity, SubdClient};

struct Running {
    _dir: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
    client: SubdClient,
    subd: Arc<Subd>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.subd.shutdown();
    }
}

impl Running {
    /// Stops this subd (its server and scanner let go of the root soon after) and hands
    /// back the directory holding its root, which would otherwise be deleted.
    fn stop_keeping_root(mut self) -> (tempfile::TempDir, PathBuf) {
        let dir = std::mem::replace(&mut self._dir, tempfile::tempdir().unwrap());
        (dir, self.root.clone())
    }
}

async fn start_with(prepare: impl FnOnce(&Path, &Path) -> Config) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let config = prepare(&root, dir.path());
    let subd = Subd::start(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(subd::serve(listener, subd.clone(), async {
        let _ = rx.await;
    }));
    let client = SubdClient::new(
        &addr.to_string(),
        &ClientSecurity::Insecure,
        Some(Duration::from_secs(30)),
    )
    .unwrap();
    Running {
        base: dir.path().to_path_buf(),
        _dir: dir,
        root,
        client,
        subd,
        stop: Some(tx),
    }
}

async fn start() -> Running {
    start_with(|root, _| Config::new(root)).await
}

/// Polls until the generation passes `after` and the tree is present.
async fn poll_after(r: &Running, after: u64) -> PollResponse {
    testkit::drive::poll_after(&r.client, after).await
}

fn p(s: &str) -> FsPath {
    s.parse().unwrap()
}

const M: Mtime = Mtime {
    sec: 1_650_000_000,
    nsec: 7,
};

fn plan_for(img: &Image, poll: &PollResponse) -> UpdatePlan {
    testkit::drive::plan_for("app/1", img, poll, &DiffOptions::default())
}

/// A sparse image with /etc/app.conf (content `conf`) and a setuid /bin/tool.
fn app_image(conf: &[u8]) -> (Image, Vec<Vec<u8>>) {
    let mut t = FileTree::with_root(Inode::dir(0o755, 0, 0));
    t.inodes.insert(1, Inode::dir(0o755, 0, 0));
    t.entries.insert(p("/etc"), 1);
    t.inodes.insert(
        2,
        Inode::file(0o644, 0, 0, M, conf.len() as u64, Some(ObjectId::of(conf))),
    );
    t.entries.insert(p("/etc/app.conf"), 2);
    t.inodes.insert(3, Inode::dir(0o755, 0, 0));
    t.entries.insert(p("/bin"), 3);
    t.inodes.insert(
        4,
        Inode::file(0o4755, 0, 0, M, 4, Some(ObjectId::of(b"tool"))),
    );
    t.entries.insert(p("/bin/tool"), 4);
    (
        Image::new(t, None, Triggers::default()),
        vec![conf.to_vec(), b"tool".to_vec()],
    )
}

/// Sends `plan` and waits for the result.
async fn update(r: &Running, plan: UpdatePlan) -> UpdateResult {
    testkit::drive::update(&r.client, plan).await
}

/// Sends `plan`, waits, and asserts it applied without errors.
async fn update_ok(r: &Running, plan: UpdatePlan) {
    let res = update(r, plan).await;
    assert!(res.errors.is_empty(), "{res:?}");
}

fn put_objects(r: &Running, objs: &[Vec<u8>]) {
    let store = ObjectStore::open(&r.root.join(".subd/objects")).unwrap();
    for o in objs {
        store.put(o).unwrap();
    }
}

/// Issue 10 §4: a root path carrying HTML (quotes and apostrophes too) is shown as text.
#[tokio::test]
async fn a_hostile_root_path_is_escaped_on_the_status_page() {
    let r = start_with(|_, base| {
        let root = base.join("r<script>\"'&");
        std::fs::create_dir(&root).unwrap();
        Config::new(&root)
    })
    .await;
    let page = r.client.rpc.get_text("/").await.unwrap();
    assert!(
        page.contains("/r&lt;script&gt;&quot;&#x27;&amp;</td>"),
        "{page}"
    );
    assert!(!page.contains("<script>"), "{page}");
}

#[tokio::test]
async fn poll_reports_generations_and_sends_the_tree_only_when_it_changed() {
    let r = start_with(|root, _| {
        std::fs::write(root.join("a"), b"1").unwrap();
        std::fs::create_dir(root.join("tmp")).unwrap();
        std::fs::write(root.join("tmp/scratch"), b"s").unwrap();
        Config::new(root)
    })
    .await;
    let p1 = poll_after(&r, 0).await;
    assert!(p1.generation >= 1);
    assert!(p1.exclusions.iter().any(|e| e == "/tmp/.*"));
    // /tmp/scratch is excluded: not in the tree, but /tmp is named as holding it.
    assert!(p1.tree.as_ref().unwrap().get(&p("/tmp/scratch")).is_none());
    assert_eq!(p1.hidden_parents, [p("/tmp")]);
    let same = r
        .client
        .poll(&PollRequest {
            have_generation: p1.generation,
            short_only: false,
            ..Default::default()
        })
        .await
        .unwrap();
    if same.generation == p1.generation {
        assert!(same.tree.is_none(), "tree sent though the caller has it");
    }
    let short = r
        .client
        .poll(&PollRequest {
            have_generation: 0,
            short_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(short.tree.is_none());
    // content change without a size or mtime change is still seen (no mtime shortcut)
    let mtime = std::fs::metadata(r.root.join("a"))
        .unwrap()
        .modified()
        .unwrap();
    std::fs::write(r.root.join("a"), b"2").unwrap();
    std::fs::File::options()
        .write(true)
        .open(r.root.join("a"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let p2 = poll_after(&r, p1.generation).await;
    let ino = p2.tree.as_ref().unwrap().get(&p("/a")).unwrap();
    assert_eq!(ino.hash, Some(ObjectId::of(b"2")));
    // .subd is never reported
    assert!(p2.tree.as_ref().unwrap().get(&p("/.subd")).is_none());
    // status page and metrics
    let page = r.client.rpc.get_text("/").await.unwrap();
    assert!(
        page.contains("generation") && page.contains("INSECURE MODE"),
        "{page}"
    );
    let m = r.client.rpc.get_text("/metrics").await.unwrap();
    assert!(
        m.contains(&format!("subd_generation {}", p2.generation)) || m.contains("subd_generation"),
        "{m}"
    );
}

#[tokio::test]
async fn sparse_update_applies_and_drift_is_corrected() {
    let r = start().await;
    std::fs::write(r.root.join("other"), b"mine").unwrap();
    let other_ino = std::fs::metadata(r.root.join("other")).unwrap().ino();
    let (img, objs) = app_image(b"v1");
    put_objects(&r, &objs);
    let poll = poll_after(&r, 0).await;
    let poll = if poll.object_cache.as_ref().unwrap().len() < 2 {
        poll_after(&r, poll.generation).await
    } else {
        poll
    };
    let plan = plan_for(&img, &poll);
    assert!(plan.objects_to_fetch.is_empty(), "{plan:#}");
    update_ok(&r, plan).await;
    assert_eq!(std::fs::read(r.root.join("etc/app.conf")).unwrap(), b"v1");
    assert_eq!(
        std::fs::metadata(r.root.join("bin/tool")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_eq!(
        std::fs::metadata(r.root.join("other")).unwrap().ino(),
        other_ino
    );
    // the next scan shows nothing left to do
    let after = poll_after(&r, poll.generation).await;
    assert!(
        plan_for(&img, &after).is_empty(),
        "{:#}",
        plan_for(&img, &after)
    );
    assert_eq!(after.last_image.as_deref(), Some("app/1"));
    // drift: mode and content; the cache no longer holds v1 (renamed into place)
    std::fs::set_permissions(
        r.root.join("bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(r.root.join("etc/app.conf"), b"edited").unwrap();
    let drifted = poll_after(&r, after.generation).await;
    let plan = plan_for(&img, &drifted);
    assert_eq!(plan.objects_to_fetch, [ObjectId::of(b"v1")], "{plan:#}");
    put_objects(&r, &objs[..1]);
    let again = poll_after(&r, drifted.generation).await;
    let plan = plan_for(&img, &again);
    update_ok(&r, plan).await;
    assert_eq!(std::fs::read(r.root.join("etc/app.conf")).unwrap(), b"v1");
    assert_eq!(
        std::fs::metadata(r.root.join("bin/tool")).unwrap().mode() & 0o7777,
        0o4755
    );
    // a second subd on the same root is refused while this one runs…
    let e = Subd::start(Config::new(&r.root)).err().expect("refused");
    assert!(e.to_string().contains("in use by another process"), "{e}");
    // …and a restart loses nothing: once this one has stopped, a new subd on the same root
    // remembers the last image and update
    let (_dir, root) = r.stop_keeping_root();
    let t0 = Instant::now();
    let s2 = loop {
        match Subd::start(Config::new(&root)) {
            Ok(s) => break s,
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(10), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        s2.status.lock().unwrap().last_image.as_deref(),
        Some("app/1")
    );
    assert!(s2.status.lock().unwrap().last_update.is_some());
    s2.shutdown();
}

#[tokio::test]
async fn bad_plans_are_refused_or_reported() {
    let r = start().await;
    let outside = r.base.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, r.root.join("escape")).unwrap();
    let poll = poll_after(&r, 0).await;
    let evil = Inode::file(0o777, 0, 0, M, 0, None);
    let plan = UpdatePlan {
        image_name: "evil/1".into(),
        sparse: true,
        inodes_to_make: vec![
            PathInode {
                path: p("/escape/owned"),
                inode: evil.clone(),
            },
            PathInode {
                path: p("/.subd/objects/x"),
                inode: evil.clone(),
            },
            PathInode {
                path: p("/tmp/x"),
                inode: evil,
            },
        ],
        ..UpdatePlan::default()
    };
    let res = update(&r, plan).await;
    assert_eq!(res.errors.len(), 3, "{res:?}");
    assert!(!outside.join("owned").exists());
    // not valid paths at all: 400 with one line
    let raw = r
        .client
        .rpc
        .call::<_, serde_json::Value>(
            "Subd.Update",
            &serde_json::json!({"plan": {"image_name": "x", "sparse": true, "paths_to_delete": ["/a/../../etc"]}}),
        )
        .await
        .unwrap_err();
    assert_eq!(raw.status(), Some(400), "{raw}");
    assert!(raw.to_string().contains("`.` or `..`"), "{raw}");
    // an unsafe plan is refused
    let plan = UpdatePlan {
        unsafe_reason: Some("would delete everything".into()),
        ..UpdatePlan::default()
    };
    let e = r
        .client
        .update(&UpdateRequest { plan, wait: true })
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    let _ = poll;
}

#[tokio::test]
async fn triggers_run_around_the_change_and_a_second_update_is_refused_meanwhile() {
    let r = start_with(|root, base| {
        let log = base.join("log");
        let script = base.join("svc.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$2\" = stop ] && sleep 1\necho \"$1 $2 $(cat {}/etc/app.conf)\" >> {}\n",
                root.display(),
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        Config { service_command: vec![script.display().to_string()], ..Config::new(root) }
    })
    .await;
    std::fs::create_dir(r.root.join("etc")).unwrap();
    std::fs::write(r.root.join("etc/app.conf"), b"old").unwrap();
    let (mut img, objs) = app_image(b"new");
    img.triggers = Triggers::parse(
        r#"[{"MatchLines":["/etc/app[.]conf$"],"Service":"app"}]"#,
        "t",
    )
    .unwrap();
    put_objects(&r, &objs);
    let mut poll = poll_after(&r, 0).await;
    while poll.object_cache.as_ref().unwrap().len() < 2 {
        poll = poll_after(&r, poll.generation).await;
    }
    let plan = plan_for(&img, &poll);
    let resp = r
        .client
        .update(&UpdateRequest {
            plan: plan.clone(),
            wait: false,
        })
        .await
        .unwrap();
    assert!(resp.result.is_none());
    let busy = r
        .client
        .update(&UpdateRequest { plan, wait: false })
        .await
        .unwrap_err();
    assert_eq!(busy.status(), Some(409), "{busy}");
    let t0 = Instant::now();
    let done = loop {
        let s = r
            .client
            .poll(&PollRequest {
                have_generation: 0,
                short_only: true,
                ..Default::default()
            })
            .await
            .unwrap();
        if !s.update_in_progress && s.last_update.is_some() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let u = done.last_update.unwrap();
    assert_eq!(u.trigger_actions, ["app stop", "app start"], "{u:?}");
    let log = std::fs::read_to_string(r.base.join("log")).unwrap();
    assert_eq!(log, "app stop old\napp start new\n");
    assert!(r.root.join(".subd/triggers.previous").exists());
}

#[tokio::test]
async fn an_update_abandons_the_scan_pass_in_progress() {
    // 300 files make a throttled pass (1 % of one CPU) last seconds; the first pass is
    // unthrottled, every later one is slow, and starts at once.
    let r = start_with(|root, _| {
        for i in 0..300 {
            std::fs::write(root.join(format!("f{i:03}")), vec![i as u8; 64 * 1024]).unwrap();
        }
        let (_, objs) = app_image(b"v1");
        let store = ObjectStore::open(&root.join(".subd/objects")).unwrap();
        for o in &objs {
            store.put(o).unwrap();
        }
        let mut c = Config::new(root);
        c.scan_speed_percent = 1;
        c.min_scan_interval = Duration::ZERO;
        c
    })
    .await;
    let poll = poll_after(&r, 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the slow second pass is running
    assert_eq!(r.subd.status.lock().unwrap().scans_aborted, 0);
    let (img, _) = app_image(b"v1");
    let plan = plan_for(&img, &poll);
    assert!(plan.objects_to_fetch.is_empty(), "{plan:#}");
    update_ok(&r, plan).await;
    let t0 = Instant::now();
    while r.subd.status.lock().unwrap().scans_aborted == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "the pass in progress was not abandoned"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The boosted pass after the update sees the change, and the image is then in place.
    let after = poll_after(&r, poll.generation).await;
    assert!(
        plan_for(&img, &after).is_empty(),
        "{:#}",
        plan_for(&img, &after)
    );
    // …and the operator can see it.
    let metrics = r.client.rpc.get_text("/metrics").await.unwrap();
    assert!(
        metrics.contains("subd_scans_aborted_for_update 1\n"),
        "{metrics}"
    );
}

/// Issue 11 §2: a hook runs only from its verified object: one missing from the cache, or
/// whose cached bytes no longer match its hash, stops the update before anything changes;
/// once right, it runs from a 0700 copy under `ROOT/.subd/hooks/`, never from the tree.
#[tokio::test]
async fn hooks_run_only_from_verified_copies_in_the_state_directory() {
    use model::hooks::{attach, Hook, Hooks};
    let r = start().await;
    let (img, objs) = app_image(b"v1\n");
    put_objects(&r, &objs);
    let log = r.base.join("hook.log");
    let script = format!(
        "#!/bin/sh\necho \"$SUBD_HOOK_PHASE $0 $SUBD_REBUILD\" >> {}\n",
        log.display()
    );
    let hook = Hook {
        name: "10-a".into(),
        hash: ObjectId::of(script.as_bytes()),
        size: script.len() as u64,
    };
    let hooks = Hooks {
        pre: vec![hook.clone()],
        post: vec![],
    };
    // A decoy at the same relative path in the managed tree is never run.
    std::fs::create_dir_all(r.root.join("hooks/pre")).unwrap();
    std::fs::write(r.root.join("hooks/pre/10-a"), "#!/bin/sh\nexit 9\n").unwrap();
    let poll = poll_after(&r, 0).await;
    let mut plan = plan_for(&img, &poll);
    let no_cache = Default::default();
    attach(&mut plan, &hooks, None, &no_cache);
    assert!(plan.objects_to_fetch.contains(&hook.hash));
    plan.objects_to_fetch.clear(); // sent as if fetched, to see subd check it

    let res = update(&r, plan.clone()).await;
    assert_eq!(
        res.errors,
        vec![format!(
            "update not started: hooks: object {} is not in the cache (fetch it first)",
            hook.hash
        )]
    );
    assert!(!r.root.join("etc").exists(), "nothing changed");

    // The cached object altered after it was verified.
    let store = ObjectStore::open(&r.root.join(".subd/objects")).unwrap();
    let id = store.put(script.as_bytes()).unwrap();
    let cached = store.path_of(&id);
    let mut perms = std::fs::metadata(&cached).unwrap().permissions();
    perms.set_mode(0o600);
    std::fs::set_permissions(&cached, perms).unwrap();
    std::fs::write(&cached, script.replace("echo", "echp")).unwrap();
    let res = update(&r, plan.clone()).await;
    assert!(
        res.errors[0].contains("10-a: its object does not match its hash"),
        "{res:?}"
    );
    assert!(!r.root.join("etc").exists(), "nothing changed");
    assert!(!log.exists(), "no hook ran");

    std::fs::write(&cached, &script).unwrap();
    let res = update(&r, plan).await;
    assert!(res.errors.is_empty(), "{res:?}");
    assert_eq!(res.hooks.len(), 1);
    assert_eq!(res.hooks[0].exit_code, Some(0), "{res:?}");
    let ran = std::fs::read_to_string(&log).unwrap();
    let copy = r.root.join(".subd/hooks/pre/10-a").canonicalize().unwrap();
    assert_eq!(ran, format!("pre {} 1\n", copy.display()));
    let m = std::fs::metadata(&copy).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o700);
    assert_eq!(std::fs::read(r.root.join("etc/app.conf")).unwrap(), b"v1\n");
}

/// Seeded state is remembered durably under `ROOT/.subd` and reported in every poll, short
/// ones included, also after a restart; a plan computed from such a poll leaves the seeded
/// path alone even for an image without the state line.
#[tokio::test]
async fn seeded_paths_are_remembered_across_restarts_and_reported_in_polls() {
    let r = start().await;
    let (mut img, objs) = app_image(b"seed conf\n");
    img.state = Some(model::StateLines::parse("/etc/app.conf$", "state").unwrap());
    put_objects(&r, &objs);
    let poll = poll_after(&r, 0).await;
    assert!(poll.seeded.is_empty());
    let plan = plan_for(&img, &poll);
    assert_eq!(plan.seeded, [p("/etc/app.conf")]);
    update_ok(&r, plan).await;
    let short = r
        .client
        .poll(&PollRequest {
            short_only: true,
            ..PollRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(short.seeded, [p("/etc/app.conf")]);
    std::fs::write(r.root.join("etc/app.conf"), b"evolved\n").unwrap();
    let (_dir, root) = r.stop_keeping_root();
    let t0 = Instant::now();
    let s2 = loop {
        match Subd::start(Config::new(&root)) {
            Ok(s) => break s,
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(10), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(s2.status().seeded, [p("/etc/app.conf")]);
    // An image without the state line (the line's file content differs) changes nothing.
    let (plain, _) = app_image(b"seed conf\n");
    let t0 = Instant::now();
    let tree = loop {
        let tree = {
            let st = s2.status();
            st.tree.clone().filter(|_| st.generation > 0)
        };
        if let Some(t) = tree {
            break t;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no scan after restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let seeded = s2.status().seeded.clone();
    let plan = model::diff::diff(
        "app/2",
        &plain,
        &model::diff::Machine {
            tree: &tree,
            object_cache: &Default::default(),
            exclusions: None,
            hidden_parents: &[],
            seeded: &seeded,
        },
        &DiffOptions::default(),
    );
    assert!(plan.is_empty(), "{plan:#}");
    s2.shutdown();
}

/// A poll asking to wait for a scan is held until that scan is counted (not answered at
/// once with the count before it), and no longer than asked when the scan is far off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_waiting_for_a_scan_is_answered_when_it_is_done() {
    let r = start_with(|root, _| {
        let mut c = Config::new(root);
        c.min_scan_interval = Duration::from_millis(1500);
        c
    })
    .await;
    let now = poll_after(&r, 0).await.scan_count;
    let t0 = Instant::now();
    let held = r
        .client
        .poll(&PollRequest {
            short_only: true,
            wait_for_scan: now + 1,
            wait_ms: 4000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        held.scan_count > now,
        "answered before the scan: {}",
        held.scan_count
    );
    assert!(
        t0.elapsed() < Duration::from_millis(3500),
        "{:?}",
        t0.elapsed()
    );
    // A scan out of reach: answered when the hold ends, with the count as it stands.
    let t0 = Instant::now();
    let timed_out = r
        .client
        .poll(&PollRequest {
            short_only: true,
            wait_for_scan: held.scan_count + 100,
            wait_ms: 300,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(timed_out.scan_count < held.scan_count + 100);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
}
