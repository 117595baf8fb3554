//! The dominator in-process against in-test subds and an in-test imageserver speaking the
//! real RPCs over real sockets: convergence, MDB edits (good and invalid), a missing image
//! added later, DisableUpdates, the global switch, the safety stop, unreachable machines (named: `connection refused`),
//! the status page, JSON API and metrics, image streams. (`tests/fleet.rs` runs the real binaries.)

use dominator::herd::HerdConfig;
use model::{FileTree, FsPath, Image, Inode, Mtime, ObjectId};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use testkit::fake::{self, start_imageserver, start_subd, FakeImages as Images, FakeSubd};
use wire::client::ClientSecurity;
use wire::http::Security;

// ---- trees for the in-memory subds (`testkit::fake`) ----

fn file(content: &[u8]) -> Inode {
    Inode::file(
        0o644,
        0,
        0,
        Mtime { sec: 1, nsec: 0 },
        content.len() as u64,
        Some(ObjectId::of(content)),
    )
}

fn tree(files: &[(&str, &[u8])]) -> FileTree {
    let mut t = FileTree::with_root(Inode::dir(0o755, 0, 0));
    let mut n = 1;
    for (p, c) in files {
        let path: FsPath = p.parse().unwrap();
        let mut parent = path.parent();
        while let Some(d) = parent {
            if !t.entries.contains_key(&d) {
                t.inodes.insert(n, Inode::dir(0o755, 0, 0));
                t.entries.insert(d.clone(), n);
                n += 1;
            }
            parent = d.parent();
        }
        t.inodes.insert(n, file(c));
        t.entries.insert(path, n);
        n += 1;
    }
    t
}

// ---- the fixture ----

struct Fixture {
    _dir: tempfile::TempDir,
    mdb: PathBuf,
    images: Images,
    base: String,
    http: reqwest::Client,
}

impl Fixture {
    async fn start(mdb_text: &str, disable_at_startup: Option<&str>) -> Fixture {
        Fixture::start_with(Some(mdb_text), disable_at_startup).await
    }

    /// `mdb_text` `None`: the MDB file does not exist.
    async fn start_with(mdb_text: Option<&str>, disable_at_startup: Option<&str>) -> Fixture {
        Fixture::start_checking(mdb_text, disable_at_startup, Duration::from_millis(50)).await
    }

    /// `start_with`, the MDB file's identity checked every `mdb_check`.
    async fn start_checking(
        mdb_text: Option<&str>,
        disable_at_startup: Option<&str>,
        mdb_check: Duration,
    ) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mdb = dir.path().join("mdb.json");
        if let Some(text) = mdb_text {
            std::fs::write(&mdb, text).unwrap();
        }
        let images = Images::default();
        let is = start_imageserver(images.clone()).await;
        let mut herd = HerdConfig::new(mdb.clone(), is, ClientSecurity::Insecure);
        herd.poll_interval = Duration::from_millis(50);
        herd.backoff_base = Duration::from_millis(50);
        herd.backoff_cap = Duration::from_millis(400);
        herd.mdb_check_interval = mdb_check;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let config = dominator::Config {
            herd,
            security: Security::Insecure,
            disable_updates_at_startup: disable_at_startup.map(str::to_string),
            connection_limits: Default::default(),
            status: None,
        };
        tokio::spawn(dominator::serve(l, config, std::future::pending()));
        Fixture {
            _dir: dir,
            mdb,
            images,
            base,
            http: reqwest::Client::new(),
        }
    }

    /// Waits (up to 20 s) until `/api/fleet` satisfies `ok`; returns it.
    async fn wait_fleet(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        for _ in 0..400 {
            let (_, body) = self.get("/api/fleet").await;
            last = serde_json::from_str(&body).unwrap_or(Value::Null);
            if ok(&last) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the fleet never showed {what}; last: {last:#}");
    }

    fn add_image(&self, name: &str, image: Image) {
        self.images.lock().unwrap().insert(name.into(), image);
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn machine(&self, host: &str) -> Value {
        let (code, body) = self.get(&format!("/api/machines/{host}")).await;
        if code != 200 {
            return Value::Null;
        }
        serde_json::from_str(&body).unwrap()
    }

    /// Waits (up to 20 s) until `host` shows `status`; returns its report.
    async fn wait_status(&self, host: &str, status: &str) -> Value {
        self.wait_error(host, status, "").await
    }

    /// Waits (up to 20 s) until `host` shows `status` with an error containing `error`.
    async fn wait_error(&self, host: &str, status: &str, error: &str) -> Value {
        let mut last = Value::Null;
        for _ in 0..400 {
            last = self.machine(host).await;
            if last["status_name"] == status
                && (error.is_empty()
                    || last["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains(error)))
            {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{host} never reached {status:?}; last report: {last:#}");
    }

    async fn rpc(&self, method: &str, body: Value) -> (u16, String) {
        let r = self
            .http
            .post(format!("{}/rpc/{method}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

fn mdb_json(entries: &[Value]) -> String {
    serde_json::to_string_pretty(entries).unwrap()
}

fn sparse(files: &[(&str, &[u8])]) -> Image {
    Image::new(tree(files), None, model::Triggers::default())
}

/// Issue 13 §4: the overview shows the planned image, a drifted machine with updates
/// disabled says how far it differs from its image, and the machine page leaves out the
/// labels of empty lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_drifted_machine_says_how_far_it_differs() {
    let a = FakeSubd::new(tree(&[("/etc/app.conf", b"old")]));
    let addr = start_subd(a).await;
    let f = Fixture::start(
        &mdb_json(&[serde_json::json!({
            "Hostname": "m", "IpAddress": addr, "RequiredImage": "app/1", "PlannedImage": "app/2"
        })]),
        Some("change freeze"),
    )
    .await;
    f.add_image(
        "app/1",
        sparse(&[("/etc/app.conf", b"new"), ("/etc/other", b"o")]),
    );
    f.wait_status("m", "updates disabled").await;
    let mut html = String::new();
    for _ in 0..200 {
        html = f.get("/").await.1;
        if html.contains("(differs: ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        html.contains(">m</a></td><td>app/1</td><td>app/2</td><td class=\"idle\">updates disabled <span class=\"differs\">(differs: 2 changes)</span></td>"),
        "{html}"
    );
    let (_, page) = f.get("/machine/m").await;
    assert!(
        page.contains("updates disabled (differs from its image: 2 changes)"),
        "{page}"
    );

    // Once updated, the last update lists only what it has.
    let (code, _) = f
        .rpc("Dominator.EnableUpdates", serde_json::json!({}))
        .await;
    assert_eq!(code, 200);
    f.wait_status("m", "synced").await;
    let (_, page) = f.get("/machine/m").await;
    let last = page
        .split("<pre id=\"last-update\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no last update: {page}"));
    let last = &last[..last.find("</pre>").unwrap()];
    assert!(!last.contains("errors:"), "{last}");
    assert!(!last.contains("trigger failures:"), "{last}");
    assert!(last.contains("no errors"), "{last}");
    let (_, html) = f.get("/").await;
    assert!(!html.contains("(differs: "), "{html}");
}

/// Issue 10 §4: an image name and a disable reason carrying HTML (quotes and apostrophes
/// too) are shown as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_text_is_escaped_on_the_status_page() {
    let hostile = "<script>\"'&";
    let f = Fixture::start(
        &mdb_json(&[serde_json::json!({
            "Hostname": "h", "IpAddress": "127.0.0.1:1", "RequiredImage": format!("x/{hostile}")
        })]),
        Some(hostile),
    )
    .await;
    // Its first report (the image cell comes from it) is in once a poll has failed.
    f.wait_fleet("machine h reported", |v| {
        v["machines"].as_array().is_some_and(|m| {
            m.len() == 1 && m[0]["required_image"] != "" && m[0]["last_error"].is_string()
        })
    })
    .await;
    let (_, html) = f.get("/").await;
    let escaped = "&lt;script&gt;&quot;&#x27;&amp;";
    assert!(html.contains(&format!("<td>x/{escaped}</td>")), "{html}");
    assert!(
        html.contains(&format!("fleet-wide: {escaped} (by")),
        "{html}"
    );
    // The page's own inline script is the only one: the hostile text is escaped.
    assert!(!html.contains("<script>\""), "{html}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_and_follows_mdb_edits() {
    let a = FakeSubd::new(tree(&[("/etc/keep", b"mine")]));
    let b = FakeSubd::new(tree(&[]));
    let (aa, ba) = (start_subd(a.clone()).await, start_subd(b.clone()).await);
    let mdb = |img_a: &str| {
        mdb_json(&[
            serde_json::json!({"Hostname": "a", "IpAddress": aa, "RequiredImage": img_a}),
            serde_json::json!({"Hostname": format!("b:{}", ba.rsplit(':').next().unwrap()), "IpAddress": ba, "RequiredImage": "app/1"}),
        ])
    };
    let f = Fixture::start(&mdb("app/1"), None).await;
    f.add_image("app/1", sparse(&[("/etc/app.conf", b"v1")]));
    f.add_image("app/2", sparse(&[("/etc/app.conf", b"v2")]));
    let r = f.wait_status("a", "synced").await;
    assert!(r["last_synced"].as_u64().is_some());
    assert_eq!(
        a.lock().unwrap().content("/etc/app.conf"),
        Some(ObjectId::of(b"v1"))
    );
    assert_eq!(
        a.lock().unwrap().content("/etc/keep"),
        Some(ObjectId::of(b"mine")),
        "sparse keeps other files"
    );
    f.wait_status(&format!("b:{}", ba.rsplit(':').next().unwrap()), "synced")
        .await;

    // An MDB edit is picked up (written in place, as an editor might).
    std::fs::write(&f.mdb, mdb("app/2")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while a.lock().unwrap().content("/etc/app.conf") != Some(ObjectId::of(b"v2")) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "MDB edit not applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = f.wait_status("a", "synced").await;
    assert_eq!(r["required_image"], "app/2");
    assert!(r["plan_text"].as_str().unwrap().contains("in sync"), "{r}");

    // Drift is put back.
    let updates = a.lock().unwrap().updates;
    {
        let mut m = a.lock().unwrap();
        let ino = m.tree.entries[&"/etc/app.conf".parse::<FsPath>().unwrap()];
        m.tree.inodes.insert(ino, file(b"tampered"));
        m.generation += 1;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while a.lock().unwrap().content("/etc/app.conf") != Some(ObjectId::of(b"v2")) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "drift not corrected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.lock().unwrap().updates, updates + 1);

    // The status page and metrics show the fleet.
    f.wait_status("a", "synced").await;
    let (code, html) = f.get("/").await;
    assert_eq!(code, 200);
    assert!(html.contains("INSECURE MODE"), "{html}");
    assert!(
        html.contains(
            "<a href=\"/machine/a\">a</a></td><td>app/2</td><td>-</td><td class=\"ok\">synced</td>"
        ),
        "{html}"
    );
    let (_, page) = f.get("/machine/a").await;
    assert!(
        page.contains("<pre id=\"plan\">a: image app/2 (sparse)"),
        "{page}"
    );
    let (_, metrics) = f.get("/metrics").await;
    assert!(
        metrics.contains("dominator_machines{status=\"synced\"} 2"),
        "{metrics}"
    );
    let (code, _) = f.get("/api/machines/nope").await;
    assert_eq!(code, 404);

    // A machine removed from the MDB disappears from the status.
    std::fs::write(
        &f.mdb,
        mdb_json(&[
            serde_json::json!({"Hostname": "a", "IpAddress": aa, "RequiredImage": "app/2"}),
        ]),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = f.get("/api/machines").await;
        if serde_json::from_str::<Vec<Value>>(&body).unwrap().len() == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_images_and_honours_every_stop() {
    let m = FakeSubd::new(tree(&[
        ("/a", b"1"),
        ("/b", b"2"),
        ("/c", b"3"),
        ("/d", b"4"),
    ]));
    let addr = start_subd(m.clone()).await;
    let entry = |extra: Value| {
        let mut e =
            serde_json::json!({"Hostname": "m", "IpAddress": addr, "RequiredImage": "full/1"});
        e.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        mdb_json(&[e])
    };
    let f = Fixture::start(&entry(serde_json::json!({})), None).await;

    // The image does not exist yet: waited for, then used.
    let r = f.wait_status("m", "image not ready").await;
    assert!(r["last_error"].as_str().unwrap().contains("full/1"), "{r}");
    let mut full = sparse(&[("/a", b"1")]);
    full.filter = Some(model::Filter::empty());
    f.add_image("full/1", full);

    // A tiny full image onto a bigger machine: the safety check stops it.
    f.wait_error("m", "unsafe update", "DisableSafetyCheck")
        .await;
    assert_eq!(m.lock().unwrap().updates, 0);

    // DisableUpdates in the MDB wins (even with the safety check lifted).
    std::fs::write(
        &f.mdb,
        entry(serde_json::json!({"DisableUpdates": true, "Tags": {"DisableSafetyCheck": "yes"}})),
    )
    .unwrap();
    f.wait_error("m", "updates disabled", "DisableUpdates is set in the MDB")
        .await;

    // An invalid MDB is reported and the previous list kept.
    std::fs::write(&f.mdb, "[{\"Hostname\": \"m\",]").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = f.get("/api/fleet").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        if v["mdb_error"].is_string() {
            assert!(
                v["mdb_error"].as_str().unwrap().contains("not valid JSON"),
                "{v}"
            );
            assert_eq!(v["machines"].as_array().unwrap().len(), 1);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "invalid MDB not reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, html) = f.get("/").await;
    assert!(
        html.contains("id=\"mdb-error\">MDB not loaded (previous list kept): "),
        "{html}"
    );
    f.wait_status("m", "updates disabled").await;

    // The global switch stops the update the tag would now allow.
    let (code, body) = f
        .rpc(
            "Dominator.DisableUpdates",
            serde_json::json!({"reason": ""}),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    let (code, _) = f
        .rpc(
            "Dominator.DisableUpdates",
            serde_json::json!({"reason": "change freeze"}),
        )
        .await;
    assert_eq!(code, 200);
    std::fs::write(
        &f.mdb,
        entry(serde_json::json!({"Tags": {"DisableSafetyCheck": "yes"}})),
    )
    .unwrap();
    f.wait_error("m", "updates disabled", "change freeze").await;
    let (_, html) = f.get("/").await;
    assert!(
        html.contains("Updates are disabled fleet-wide: change freeze"),
        "{html}"
    );
    assert_eq!(m.lock().unwrap().updates, 0);

    // Enabled again: the full image (safety lifted by the tag) applies.
    let (code, _) = f
        .rpc("Dominator.EnableUpdates", serde_json::json!({}))
        .await;
    assert_eq!(code, 200);
    f.wait_status("m", "synced").await;
    let t = m.lock().unwrap().tree.clone();
    let paths: Vec<String> = t.entries.keys().map(|p| p.display()).collect();
    assert_eq!(paths, ["/", "/a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_machines_back_off_and_converge_when_they_return() {
    // Reserve a port, then start nothing on it. This test needs the address before its
    // server exists (the machine is in the MDB while it is down), so it cannot learn it
    // from a listening server; the fake subd binds it again later in this process.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let f = Fixture::start(
        &mdb_json(&[
            serde_json::json!({"Hostname": "gone", "IpAddress": addr, "RequiredImage": "app/1"}),
        ]),
        Some("testing startup"),
    )
    .await;
    f.add_image("app/1", sparse(&[("/x", b"x")]));
    let r = f.wait_status("gone", "connection refused").await;
    assert!(!r["last_error"].as_str().unwrap().is_empty());
    // Failures accumulate (the back-off grows) while it is down.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while f.machine("gone").await["consecutive_failures"]
        .as_u64()
        .unwrap()
        < 3
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It comes back (updates disabled at startup), then updates are enabled.
    let sub = FakeSubd::new(tree(&[]));
    let l = tokio::net::TcpListener::bind(&addr).await.unwrap();
    fake::serve_on(l, fake::subd_router(sub.clone()));
    let r = f
        .wait_error("gone", "updates disabled", "testing startup")
        .await;
    assert_eq!(r["consecutive_failures"], 0);
    f.rpc("Dominator.EnableUpdates", serde_json::json!({}))
        .await;
    f.wait_status("gone", "synced").await;
    assert_eq!(sub.lock().unwrap().content("/x"), Some(ObjectId::of(b"x")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_previews_exactly_what_the_update_then_does() {
    let m = FakeSubd::new(tree(&[("/etc/app.conf", b"old"), ("/junk", b"j")]));
    let addr = start_subd(m.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mdb = dir.path().join("mdb.json");
    std::fs::write(
        &mdb,
        mdb_json(&[
            serde_json::json!({"Hostname": "m", "IpAddress": addr, "RequiredImage": "app/1"}),
            serde_json::json!({"Hostname": "down", "IpAddress": "127.0.0.1:1", "RequiredImage": "app/1"}),
        ]),
    )
    .unwrap();
    let images = Images::default();
    let triggers = model::Triggers::parse(
        r#"[{"MatchLines":["/etc/app[.]conf"],"Service":"app"}]"#,
        "t",
    )
    .unwrap();
    images.lock().unwrap().insert(
        "app/1".into(),
        Image::new(
            tree(&[("/etc/app.conf", b"new"), ("/bin/app", b"bin")]),
            None,
            triggers,
        ),
    );
    let is = start_imageserver(images).await;
    let args = dominator::commands::FleetArgs {
        mdb: mdb.clone(),
        image_server: Some(is),
        subd_port: 6969,
        subd_connect_timeout_ms: 15_000,
        image_server_name: wire::client::IMAGESERVER_NAME.into(),
        subd_name: wire::client::SUBD_NAME.into(),
        tls: wire::security::DaemonTlsArgs {
            permit_insecure_mode: true,
            ca: Some(dir.path().join("none")),
            ..Default::default()
        },
    };
    let plans = dominator::commands::plan(&args, None).await.unwrap();
    assert_eq!(plans.len(), 2);
    let text = plans[0].result.as_ref().unwrap();
    assert_eq!(
        text,
        "m: image app/1 (sparse)\n  rebuild: the machine holds no image (its hooks get SUBD_REBUILD=1)\n  fetch   2 objects from the imageserver\n  mkdir   /bin (drwxr-xr-x 0:0)\n  add     /bin/app (-rw-r--r-- 0:0 3 B)\n  change  /etc/app.conf (content; now -rw-r--r-- 0:0 3 B)\n  trigger app (stop, then start)\n"
    );
    assert!(
        plans[1]
            .result
            .as_ref()
            .unwrap_err()
            .to_string()
            .starts_with("connection refused"),
        "{:?}",
        plans[1].result
    );
    // Nothing was changed by planning.
    assert_eq!(m.lock().unwrap().updates, 0);
    assert_eq!(
        m.lock().unwrap().content("/etc/app.conf"),
        Some(ObjectId::of(b"old"))
    );
}

// ---- the status page in a real browser ----

fn chromium() -> Option<PathBuf> {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

async fn headless(browser: &PathBuf, extra: &[String], url: &str) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .arg(url)
    .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium timed out")
        .expect("running chromium")
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(data: &[u8]) -> (u32, u32) {
    assert!(
        data.len() > 24 && &data[..8] == b"\x89PNG\r\n\x1a\n",
        "not a PNG"
    );
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&data[16..20]), be(&data[20..24]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_in_a_real_browser() {
    let Some(browser) = chromium() else {
        eprintln!("\n!!!!!!!! SKIPPED status_page_renders_in_a_real_browser: chromium is not installed (apt-get install -y chromium) !!!!!!!!\n");
        return;
    };
    let a = FakeSubd::new(tree(&[]));
    let addr = start_subd(a).await;
    let f = Fixture::start(
        &mdb_json(&[
            serde_json::json!({"Hostname": "web-1", "IpAddress": addr, "RequiredImage": "app/1"}),
            serde_json::json!({"Hostname": "web-2", "IpAddress": "127.0.0.1:1", "RequiredImage": "app/1"}),
        ]),
        None,
    )
    .await;
    f.add_image("app/1", sparse(&[("/etc/app.conf", b"v1")]));
    f.wait_status("web-1", "synced").await;
    f.wait_status("web-2", "connection refused").await;

    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("status.png");
    let blank = dir.path().join("blank.png");
    let size = "--window-size=1024,700".to_string();
    for (png, url) in [
        (&shot, format!("{}/", f.base)),
        (&blank, "about:blank".to_string()),
    ] {
        let out = headless(
            &browser,
            &[format!("--screenshot={}", png.display()), size.clone()],
            &url,
        )
        .await;
        assert!(
            png.exists(),
            "no screenshot of {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let page = std::fs::read(&shot).unwrap();
    let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dominator-status.png");
    let _ = std::fs::copy(&shot, &keep);
    let empty = std::fs::read(&blank).unwrap();
    assert_eq!(png_size(&page), (1024, 700));
    // A rendered table compresses far worse than an empty page of the same size.
    assert!(
        page.len() > 2 * empty.len(),
        "screenshot looks blank: {} bytes vs {} for about:blank",
        page.len(),
        empty.len()
    );

    let out = headless(
        &browser,
        &["--dump-dom".to_string()],
        &format!("{}/", f.base),
    )
    .await;
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("<table id=\"machines\">"), "{dom}");
    assert!(
        dom.contains(">web-1</a></td><td>app/1</td><td>-</td><td class=\"ok\">synced</td>"),
        "{dom}"
    );
    assert!(
        dom.contains("<td class=\"bad\">connection refused</td>"),
        "{dom}"
    );
    assert!(dom.contains("INSECURE MODE"), "{dom}");
    let out = headless(
        &browser,
        &["--dump-dom".to_string()],
        &format!("{}/machine/web-1", f.base),
    )
    .await;
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("<pre id=\"plan\">web-1: image app/1 (sparse)"),
        "{dom}"
    );
}

/// An MDB edit is seen when it lands (inotify on the MDB's directory), not at the next
/// identity check (an hour away here): a rename into place as `mdb` makes it, and a
/// rewrite in place as an editor may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mdb_edits_are_seen_at_once_not_at_the_next_check() {
    let f = Fixture::start_checking(Some(&mdb_json(&[])), None, Duration::from_secs(3600)).await;
    let hosts = |n: usize| move |v: &Value| v["machines"].as_array().is_some_and(|m| m.len() == n);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = start_subd(FakeSubd::new(tree(&[]))).await;
    let tmp = f.mdb.with_extension("tmp");
    std::fs::write(
        &tmp,
        mdb_json(&[serde_json::json!({"Hostname": "a", "IpAddress": a})]),
    )
    .unwrap();
    std::fs::rename(&tmp, &f.mdb).unwrap();
    f.wait_fleet("the machine renamed in", hosts(1)).await;
    let b = start_subd(FakeSubd::new(tree(&[]))).await;
    std::fs::write(
        &f.mdb,
        mdb_json(&[
            serde_json::json!({"Hostname": "a", "IpAddress": a}),
            serde_json::json!({"Hostname": "b", "IpAddress": b}),
        ]),
    )
    .unwrap();
    f.wait_fleet("the machine written in place", hosts(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_mdb_is_reported_until_it_appears() {
    let f = Fixture::start_with(None, None).await;
    let v = f
        .wait_fleet("the missing MDB", |v| v["mdb_error"].is_string())
        .await;
    assert!(
        v["mdb_error"]
            .as_str()
            .unwrap()
            .contains("No such file or directory"),
        "{v}"
    );
    // Checked every 50 ms here: still reported once, not on every check.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, metrics) = f.get("/metrics").await;
    assert!(
        metrics.contains("dominator_mdb_errors_total 1\n"),
        "{metrics}"
    );
    let sub = FakeSubd::new(tree(&[]));
    let addr = start_subd(sub).await;
    std::fs::write(
        &f.mdb,
        mdb_json(&[serde_json::json!({"Hostname": "m", "IpAddress": addr})]),
    )
    .unwrap();
    let v = f
        .wait_fleet("the machine once the MDB appears", |v| {
            v["mdb_error"].is_null() && v["machines"].as_array().is_some_and(|m| m.len() == 1)
        })
        .await;
    assert_eq!(v["machines"][0]["host"], "m", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_service_commands_show_on_the_overview_and_in_metrics() {
    let sub = FakeSubd::new(tree(&[]));
    sub.lock().unwrap().trigger_failures =
        vec!["app start: exit status: 1 (app: unrecognized service)".into()];
    let addr = start_subd(sub).await;
    let f = Fixture::start(
        &mdb_json(&[
            serde_json::json!({"Hostname": "t", "IpAddress": addr, "RequiredImage": "app/1"}),
        ]),
        None,
    )
    .await;
    f.add_image("app/1", sparse(&[("/x", b"x")]));
    f.wait_status("t", "synced").await;
    let (_, html) = f.get("/").await;
    assert!(
        html.contains("triggers failed: app start: exit status: 1 (app: unrecognized service)"),
        "a synced machine whose services failed says so: {html}"
    );
    let (_, metrics) = f.get("/metrics").await;
    assert!(
        metrics.contains("dominator_machines_with_trigger_failures 1\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_deleted_from_the_imageserver_is_reported_not_enforced_from_memory() {
    let sub = FakeSubd::new(tree(&[]));
    let addr = start_subd(sub.clone()).await;
    let f = Fixture::start(
        &mdb_json(&[
            serde_json::json!({"Hostname": "d", "IpAddress": addr, "RequiredImage": "app/1"}),
        ]),
        None,
    )
    .await;
    f.add_image("app/1", sparse(&[("/x", b"x")]));
    f.wait_status("d", "synced").await;
    f.images.lock().unwrap().remove("app/1");
    // Within RECHECK (10 s) of the deletion the cache lets go and says why.
    let r = f
        .wait_error(
            "d",
            "image not ready",
            "image app/1 was deleted from the imageserver",
        )
        .await;
    assert_eq!(r["required_image"], "app/1");
}

/// Waits (up to 20 s) until `sub`'s `path` holds `content`.
async fn wait_content(sub: &testkit::fake::SharedSubd, path: &str, content: &[u8]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while sub.lock().unwrap().content(path) != Some(ObjectId::of(content)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never became {:?}",
            String::from_utf8_lossy(content)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 12 §2: a RequiredImage or PlannedImage naming an image directory follows its
/// newest image (added or deleted later, with no MDB edit); a name that is both an image
/// and a directory is the image; a directory without images is waited for, never "no
/// image".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_streams_follow_the_newest_and_an_exact_name_wins() {
    let (a, b, c) = (
        FakeSubd::new(tree(&[])),
        FakeSubd::new(tree(&[])),
        FakeSubd::new(tree(&[])),
    );
    let (aa, ba, ca) = (
        start_subd(a.clone()).await,
        start_subd(b.clone()).await,
        start_subd(c.clone()).await,
    );
    let f = Fixture::start(
        &mdb_json(&[
            serde_json::json!({"Hostname": "a", "IpAddress": aa, "RequiredImage": "s", "PlannedImage": "p"}),
            serde_json::json!({"Hostname": "b", "IpAddress": ba, "RequiredImage": "e"}),
            serde_json::json!({"Hostname": "c", "IpAddress": ca, "RequiredImage": "empty"}),
        ]),
        None,
    )
    .await;
    f.add_image("s/1", sparse(&[("/v", b"1")]));
    f.add_image("s/10/x", sparse(&[("/v", b"sub-directory")]));
    f.add_image("e", sparse(&[("/v", b"exact")]));
    f.add_image("e/9", sparse(&[("/v", b"e9")]));
    f.add_image("p/3", sparse(&[("/v", b"p3")]));
    wait_content(&a, "/v", b"1").await;
    wait_content(&b, "/v", b"exact").await;
    let r = f.wait_status("a", "synced").await;
    assert_eq!(r["required_image"], "s", "{r:#}");
    assert_eq!(r["resolved_required_image"], "s/1", "{r:#}");
    assert_eq!(r["resolved_planned_image"], "p/3", "{r:#}");
    let r = f.wait_status("b", "synced").await;
    assert_eq!(r["resolved_required_image"], "e", "{r:#}");
    let r = f.wait_status("c", "image not ready").await;
    assert!(r["resolved_required_image"].is_null(), "{r:#}");
    assert_eq!(c.lock().unwrap().updates, 0, "nothing sent to c");

    // Newer versions, version-ordered (2 < 10): followed without an MDB edit.
    f.add_image("s/2", sparse(&[("/v", b"2")]));
    wait_content(&a, "/v", b"2").await;
    f.add_image("s/10", sparse(&[("/v", b"10")]));
    wait_content(&a, "/v", b"10").await;
    // The newest gone: back to the next newest.
    f.images.lock().unwrap().remove("s/10");
    wait_content(&a, "/v", b"2").await;
    let (_, page) = f.get("/machine/a").await;
    assert!(page.contains("s \u{2192} s/2 (stream)"), "{page}");
    // The directory c names gets an image: c follows it.
    f.add_image("empty/1", sparse(&[("/v", b"no longer empty")]));
    wait_content(&c, "/v", b"no longer empty").await;
}

/// Issue 14 §5: many simulated machines behind ONE listening socket (`fake::start_subds`),
/// each on its own loopback address, are told apart by the address dialled: each converges
/// on its own image, and a connection to an address no machine answers on is refused
/// (shown as `not a subd`, the 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_sharing_one_listener_are_told_apart_by_address() {
    let subs: Vec<_> = (0..3)
        .map(|i| FakeSubd::new(tree(&[("/etc/id", format!("m{i}").as_bytes())])))
        .collect();
    let addrs = fake::start_subds(&subs).await.unwrap();
    let port = addrs[0].rsplit(':').next().unwrap().to_string();
    assert!(addrs.iter().all(|a| a.ends_with(&format!(":{port}"))));
    let mut entries: Vec<Value> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| serde_json::json!({"Hostname": format!("m{i}"), "IpAddress": a, "RequiredImage": format!("app/{i}")}))
        .collect();
    let stranger = format!("{}:{port}", fake::machine_address(1000));
    entries.push(serde_json::json!({"Hostname": "stranger", "IpAddress": stranger, "RequiredImage": "app/0"}));
    let f = Fixture::start(&mdb_json(&entries), None).await;
    for i in 0..3 {
        f.add_image(
            &format!("app/{i}"),
            sparse(&[("/etc/app.conf", format!("v{i}").as_bytes())]),
        );
    }
    for (i, s) in subs.iter().enumerate() {
        f.wait_status(&format!("m{i}"), "synced").await;
        let m = s.lock().unwrap();
        assert_eq!(
            m.content("/etc/app.conf"),
            Some(ObjectId::of(format!("v{i}").as_bytes()))
        );
        assert_eq!(
            m.content("/etc/id"),
            Some(ObjectId::of(format!("m{i}").as_bytes()))
        );
    }
    f.wait_status("stranger", "not a subd").await;
}
