//! The whole system as real processes over mutual TLS: an imageserver, a dominator and three
//! subds (`testkit::bin`), certificates from `wire::certs::make_all`, images added with
//! `imagetool` (the builder's certificate), the MDB edited with `mdb`, statuses read from
//! the dominator's `/api/machines` (the admin's certificate) and results checked on disk.
//!
//! One test walks issue 4's scenarios in order, because each needs a converged fleet and
//! starting one costs seconds on a 2-core CI machine: the seed's sparse image with triggers
//! then an MDB edit; a full image with a filter; drift put back; a subd killed (-9) and
//! restarted while its RequiredImage changed; an image added after the MDB named it;
//! DisableUpdates; `mdb rollback`; an invalid MDB; the safety stop (and its tag);
//! `dominator plan` compared with what the update then did on disk; and a planned image
//! prefetched, then cleaned out of the cache when the MDB stops planning it.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins`.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use testkit::{bin, Daemon};
use wire::client::{ClientSecurity, RpcClient};
use wire::tls::TlsFiles;

/// Generous: CI is a 2-core machine shared with compilers.
const WAIT: Duration = Duration::from_secs(120);

struct Fleet {
    dir: PathBuf,
    certs: PathBuf,
    is_addr: String,
    dom_addr: String,
    mdb: PathBuf,
    api: RpcClient,
    _imageserver: Daemon,
    _dominator: Daemon,
    subds: Vec<Option<Daemon>>,
    subd_addrs: Vec<String>,
}

fn daemon_tls(certs: &Path, role: &str) -> Vec<String> {
    [
        "--ca-file".to_string(),
        certs.join("CA.pem").display().to_string(),
        "--cert-file".into(),
        certs.join(role).join("cert.pem").display().to_string(),
        "--key-file".into(),
        certs.join(role).join("key.pem").display().to_string(),
    ]
    .into()
}

fn user_tls(certs: &Path, user: &str) -> TlsFiles {
    TlsFiles {
        ca: certs.join("CA.pem"),
        cert: certs.join(format!("{user}.cert")),
        key: certs.join(format!("{user}.key")),
    }
}

fn run(program: &str, args: &[String]) -> String {
    let out = Command::new(bin(program))
        .args(args)
        .env("HOME", "/nonexistent")
        .env_remove("MDB_FILE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

impl Fleet {
    fn root(&self, i: usize) -> PathBuf {
        self.dir.join(format!("roots/machine-{}", i + 1))
    }
    fn service_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("service-{}.log", i + 1))).unwrap_or_default()
    }

    /// Starts subd `i` on a free port, or, restarted, on the address it had (the MDB names
    /// it; the port was its own until it was killed), and records its address.
    fn start_subd(&mut self, i: usize) {
        let addr = match &self.subd_addrs[i] {
            a if a.is_empty() => "127.0.0.1:0".to_string(),
            a => a.clone(),
        };
        let script = self.dir.join(format!("service-{}.sh", i + 1));
        let mut args = vec![
            "--root".to_string(),
            s(&self.root(i)),
            "--listen".into(),
            addr.clone(),
            "--service-command".into(),
            s(&script),
            "--scan-speed-percent".into(),
            "100".into(),
            "--cpu-percent".into(),
            "100".into(),
        ];
        args.extend(daemon_tls(&self.certs, "subd"));
        let d = Daemon::start(&bin("subd"), &args);
        self.subd_addrs[i] = d.addr.clone();
        self.subds[i] = Some(d);
    }

    fn imagetool_add(&self, name: &str, dir: &Path, filter: &str, triggers: &str) {
        let u = user_tls(&self.certs, "builder");
        run(
            "imagetool",
            &[
                "--image-server".into(),
                self.is_addr.clone(),
                "--ca-file".into(),
                s(&u.ca),
                "--cert-file".into(),
                s(&u.cert),
                "--key-file".into(),
                s(&u.key),
                "add".into(),
                name.into(),
                s(dir),
                filter.into(),
                triggers.into(),
            ],
        );
    }

    fn mdb(&self, args: &[&str]) -> String {
        let mut a = vec!["--mdb".to_string(), s(&self.mdb)];
        a.extend(args.iter().map(|x| x.to_string()));
        run("mdb", &a)
    }

    async fn api(&self, path: &str) -> Value {
        let text = self.api.get_text(path).await.expect("dominator API");
        serde_json::from_str(&text).unwrap()
    }

    async fn machine(&self, host: &str) -> Value {
        let all = self.api("/api/machines").await;
        all.as_array()
            .unwrap()
            .iter()
            .find(|m| m["host"] == host)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Waits until `host` reports `status` for `image`; returns its report.
    async fn wait_status(&self, host: &str, image: &str, status: &str) -> Value {
        let t0 = Instant::now();
        loop {
            let m = self.machine(host).await;
            if m["required_image"] == image && m["status_name"] == status {
                return m;
            }
            assert!(
                t0.elapsed() < WAIT,
                "{host} never reached {status:?} on {image}; last report: {m:#}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Waits until `path` holds exactly `want`.
async fn wait_content(path: &Path, want: &[u8]) {
    let t0 = Instant::now();
    loop {
        if std::fs::read(path).ok().as_deref() == Some(want) {
            return;
        }
        assert!(
            t0.elapsed() < WAIT,
            "{} never became {:?} (is {:?})",
            path.display(),
            String::from_utf8_lossy(want),
            std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn write(path: &Path, data: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// What is on disk under `root` (without subd's own records): per path, the kind and mode, for files
/// the mtime and content, for symlinks the target.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
            // subd's own records (`/.subd`, `/var/lib/patched-image`), never an image's.
            if rel == "/.subd" || model::diff::ALWAYS_EXCLUDED.contains(&rel.as_str()) {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            let v = if m.is_dir() {
                walk(root, &p, out);
                // Not its mtime: a directory's mtime follows its entries.
                format!("dir {:o}", m.mode())
            } else if m.file_type().is_symlink() {
                format!("symlink {:?}", std::fs::read_link(&p).unwrap())
            } else {
                format!(
                    "file {:o} {} {:?}",
                    m.mode(),
                    m.mtime(),
                    model::ObjectId::of(&std::fs::read(&p).unwrap())
                )
            };
            out.insert(rel, v);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Writes a copy of `from` into `to`, keeping modes and mtimes.
fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

async fn start_fleet(tmp: &Path) -> Fleet {
    let certs = tmp.join("certs");
    wire::certs::make_all(&certs, &[]).unwrap();

    let mut a = vec![
        "--data-dir".to_string(),
        s(&tmp.join("imageserver")),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    a.extend(daemon_tls(&certs, "imageserver"));
    let imageserver = Daemon::start(&bin("imageserver"), &a);
    let is_addr = imageserver.addr.clone();

    let mdb = tmp.join("mdb.json");
    let mut a = vec![
        "--mdb".to_string(),
        s(&mdb),
        "--image-server".into(),
        is_addr.clone(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--poll-interval-ms".into(),
        "500".into(),
    ];
    a.extend(daemon_tls(&certs, "dominator"));
    let dominator = Daemon::start(&bin("dominator"), &a);
    let dom_addr = dominator.addr.clone();

    let api = RpcClient::new(
        &dom_addr,
        6970,
        &ClientSecurity::Tls(user_tls(&certs, "admin")),
        wire::client::DOMINATOR_NAME,
        Some(Duration::from_secs(30)),
    )
    .unwrap();
    let mut f = Fleet {
        dir: tmp.to_path_buf(),
        certs,
        is_addr,
        dom_addr,
        mdb,
        api,
        _imageserver: imageserver,
        _dominator: dominator,
        subds: vec![None, None, None],
        subd_addrs: vec![String::new(); 3],
    };
    for i in 0..3 {
        let log = tmp.join(format!("service-{}.log", i + 1));
        let script = tmp.join(format!("service-{}.sh", i + 1));
        write(
            &script,
            &format!("#!/bin/sh\necho \"$*\" >> {}\n", log.display()),
        );
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(f.root(i)).unwrap();
        f.start_subd(i);
    }
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_real_processes_over_mutual_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    dominator::local_fleet::write_fleet_files(&images).unwrap();
    let img = |p: &str| s(&images.join(p));

    // machine-2 carries 40 files of its own (for the safety stop later); machine-3 has an
    // extra file, a wrong motd and a filtered /etc/hostname (for the full image).
    let t = tmp.path();
    for n in 0..40 {
        write(
            &t.join(format!("roots/machine-2/srv/data/f{n}")),
            &format!("{n}\n"),
        );
    }
    write(&t.join("roots/machine-3/etc/hostname"), "machine-3\n");
    write(&t.join("roots/machine-3/etc/motd"), "not the image's\n");
    write(&t.join("roots/machine-3/opt/junk/file"), "extra\n");

    let mut f = start_fleet(t).await;
    let (r1, r2, r3) = (f.root(0), f.root(1), f.root(2));
    let app_conf = |v: &str| std::fs::read(images.join(v).join("etc/app/app.conf")).unwrap();

    // The seed: `imagetool add sparse.0 path "" triggers` (and a full image with a filter),
    // then the MDB names them.
    f.imagetool_add(
        "app.0",
        &images.join("app.0"),
        "",
        &img("app.triggers.json"),
    );
    f.imagetool_add("base.0", &images.join("base.0"), &img("base.filter"), "");
    for (i, image) in ["app.0", "app.0", "base.0"].iter().enumerate() {
        f.mdb(&[
            "add",
            &format!("machine-{}", i + 1),
            "--ip",
            &f.subd_addrs[i],
            "--required",
            image,
        ]);
    }
    for (host, image) in [
        ("machine-1", "app.0"),
        ("machine-2", "app.0"),
        ("machine-3", "base.0"),
    ] {
        f.wait_status(host, image, "synced").await;
    }
    assert_eq!(
        std::fs::read(r1.join("etc/app/app.conf")).unwrap(),
        app_conf("app.0")
    );
    let mode = std::fs::metadata(r2.join("usr/local/bin/app"))
        .unwrap()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
    assert!(
        f.service_log(0).contains("app start"),
        "{}",
        f.service_log(0)
    );

    // The full image with a filter: extras deleted, filtered paths untouched.
    assert_eq!(
        std::fs::read_to_string(r3.join("etc/motd")).unwrap(),
        "Welcome to a machine managed by the dominator (image base.0).\n"
    );
    assert!(!r3.join("opt").exists(), "extra /opt not deleted");
    assert_eq!(
        std::fs::read_to_string(r3.join("etc/hostname")).unwrap(),
        "machine-3\n",
        "filtered /etc/hostname was touched"
    );
    assert!(r3.join("usr/bin/hello").exists());

    // The seed's MDB edit: a new version rolled out by one `mdb set`; its trigger fires.
    f.imagetool_add(
        "app.1",
        &images.join("app.1"),
        "",
        &img("app.triggers.json"),
    );
    let starts = f.service_log(0).matches("app start").count();
    f.mdb(&["set", "machine-1", "--required", "app.1"]);
    f.wait_status("machine-1", "app.1", "synced").await;
    wait_content(&r1.join("etc/app/app.conf"), &app_conf("app.1")).await;
    let log = f.service_log(0);
    assert!(log.contains("app stop"), "{log}");
    assert_eq!(log.matches("app start").count(), starts + 1, "{log}");

    // Drift: a managed file edited on the machine is put back.
    std::fs::write(r1.join("etc/app/app.conf"), "tampered\n").unwrap();
    wait_content(&r1.join("etc/app/app.conf"), &app_conf("app.1")).await;

    // A subd killed (-9) while its RequiredImage changes converges when it returns.
    f.subds[1].as_mut().unwrap().kill9();
    f.subds[1] = None;
    f.mdb(&["set", "machine-2", "--required", "app.1"]);
    let m = f
        .wait_status("machine-2", "app.1", "connection refused")
        .await;
    let err = m["last_error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("onnection refused"), "{m:#}");
    f.start_subd(1);
    f.wait_status("machine-2", "app.1", "synced").await;
    wait_content(&r2.join("etc/app/app.conf"), &app_conf("app.1")).await;

    // An image named by the MDB before it exists: waited for, then rolled out.
    f.mdb(&["set", "machine-1", "--required", "app.2"]);
    let m = f.wait_status("machine-1", "app.2", "image not ready").await;
    assert!(
        m["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("app.2"),
        "{m:#}"
    );
    let app2 = t.join("app.2");
    copy_tree(&images.join("app.1"), &app2);
    write(&app2.join("etc/app/app.conf"), "greeting = app.2\n");
    f.imagetool_add("app.2", &app2, "", &img("app.triggers.json"));
    f.wait_status("machine-1", "app.2", "synced").await;
    wait_content(&r1.join("etc/app/app.conf"), b"greeting = app.2\n").await;

    // DisableUpdates: the machine stays deviant, and says so.
    f.mdb(&[
        "set",
        "machine-1",
        "--required",
        "app.0",
        "--disable-updates",
        "true",
    ]);
    let m = f
        .wait_status("machine-1", "app.0", "updates disabled")
        .await;
    assert!(
        m["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("DisableUpdates"),
        "{m:#}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        std::fs::read(r1.join("etc/app/app.conf")).unwrap(),
        b"greeting = app.2\n",
        "updated although DisableUpdates"
    );
    f.mdb(&["set", "machine-1", "--disable-updates", "false"]);
    f.wait_status("machine-1", "app.0", "synced").await;
    wait_content(&r1.join("etc/app/app.conf"), &app_conf("app.0")).await;

    // `mdb rollback`: back to the previous RequiredImage, and the machine follows.
    f.mdb(&["rollback", "machine-1"]);
    let shown: Value = serde_json::from_str(&f.mdb(&["show", "machine-1"])).unwrap();
    assert_eq!(shown["RequiredImage"], "app.2", "{shown:#}");
    f.wait_status("machine-1", "app.2", "synced").await;
    wait_content(&r1.join("etc/app/app.conf"), b"greeting = app.2\n").await;

    // An invalid MDB: reported, the previous list kept (drift still corrected).
    let good = std::fs::read(&f.mdb).unwrap();
    std::fs::write(&f.mdb, b"[{\"Hostname\": \"machine-1\", ").unwrap();
    let t0 = Instant::now();
    loop {
        let fleet = f.api("/api/fleet").await;
        if fleet["mdb_error"].is_string() {
            assert_eq!(fleet["machines"].as_array().unwrap().len(), 3, "{fleet:#}");
            break;
        }
        assert!(t0.elapsed() < WAIT, "invalid MDB never reported: {fleet:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(r1.join("etc/app/app.conf"), "tampered again\n").unwrap();
    wait_content(&r1.join("etc/app/app.conf"), b"greeting = app.2\n").await;
    f.wait_status("machine-1", "app.2", "synced").await;
    std::fs::write(&f.mdb, &good).unwrap();
    let t0 = Instant::now();
    while !f.api("/api/fleet").await["mdb_error"].is_null() {
        assert!(t0.elapsed() < WAIT, "MDB error never cleared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The safety stop: a full image that would delete most of machine-2 is held…
    f.mdb(&["set", "machine-2", "--required", "base.0"]);
    let m = f.wait_status("machine-2", "base.0", "unsafe update").await;
    assert!(
        m["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("DisableSafetyCheck"),
        "{m:#}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(r2.join("srv/data/f39").exists(), "unsafe update applied");
    // …until the MDB tag lifts the check for this machine.
    f.mdb(&["set", "machine-2", "--tag", "DisableSafetyCheck=true"]);
    f.wait_status("machine-2", "base.0", "synced").await;
    assert!(!r2.join("srv").exists(), "extras of machine-2 not deleted");
    assert!(r2.join("etc/motd").exists());

    // `dominator plan` prints what the update then does: held with DisableUpdates, planned,
    // released, and the plan's paths compared with what changed on disk.
    let base1 = t.join("base.1");
    copy_tree(&images.join("base.0"), &base1);
    write(&base1.join("etc/motd"), "base.1 motd\n");
    std::fs::remove_file(base1.join("var/lib/base/data")).unwrap();
    write(&base1.join("usr/bin/world"), "#!/bin/sh\necho world\n");
    write(
        &t.join("base.triggers.json"),
        r#"[{"MatchLines": ["/etc/motd"], "Service": "motd"}]"#,
    );
    f.imagetool_add(
        "base.1",
        &base1,
        &img("base.filter"),
        &s(&t.join("base.triggers.json")),
    );
    f.mdb(&[
        "set",
        "machine-3",
        "--required",
        "base.1",
        "--disable-updates",
        "true",
    ]);
    f.wait_status("machine-3", "base.1", "updates disabled")
        .await;
    let before = snapshot(&r3);
    let mut a = vec![
        "plan".to_string(),
        "machine-3".into(),
        "--mdb".into(),
        s(&f.mdb),
        "--image-server".into(),
        f.is_addr.clone(),
    ];
    a.extend(daemon_tls(&f.certs, "dominator"));
    let plan = run("dominator", &a);
    assert!(plan.contains("(not sent: DisableUpdates"), "{plan}");
    let mut planned: BTreeSet<String> = BTreeSet::new();
    let mut triggers = Vec::new();
    for l in plan.lines().map(str::trim) {
        let (verb, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
        let path = rest.trim().split(' ').next().unwrap_or("").to_string();
        match verb {
            "add" | "change" | "mkdir" | "delete" | "link" | "chmeta" => {
                planned.insert(path);
            }
            "trigger" => triggers.push(path),
            _ => {}
        }
    }
    for p in ["/etc/motd", "/usr/bin/world", "/var/lib/base/data"] {
        assert!(planned.contains(p), "plan misses {p}:\n{plan}");
    }
    assert_eq!(triggers, ["motd"], "{plan}");
    let motd_before = f.service_log(2).matches("motd").count();
    f.mdb(&["set", "machine-3", "--disable-updates", "false"]);
    f.wait_status("machine-3", "base.1", "synced").await;
    wait_content(&r3.join("etc/motd"), b"base.1 motd\n").await;
    let after = snapshot(&r3);
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let changed: BTreeSet<String> = keys
        .into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| k.to_string())
        .collect();
    assert_eq!(
        changed, planned,
        "what changed on disk differs from the plan:\n{plan}\nbefore {before:#?}\nafter {after:#?}"
    );
    assert!(
        f.service_log(2).matches("motd").count() > motd_before,
        "plan said trigger motd but it did not fire: {}",
        f.service_log(2)
    );

    // A planned image is prefetched into the cache once in sync; when the MDB no longer
    // plans it, the dominator tells subd to clean those objects up (`Subd.Cleanup`).
    let objects = r1.join(".subd/objects");
    assert_eq!(cached_objects(&objects), 0, "cache not empty after updates");
    f.mdb(&["set", "machine-1", "--planned", "app.1"]);
    wait_until("planned image prefetched", || cached_objects(&objects) > 0).await;
    let m = f.wait_status("machine-1", "app.2", "synced").await;
    assert_eq!(m["planned_image"], "app.1");
    f.mdb(&["set", "machine-1", "--planned", ""]);
    wait_until("cache cleaned up", || cached_objects(&objects) == 0).await;
    let metrics = f.api.get_text("/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("dominator_cleanups_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    wait_content(&r1.join("etc/app/app.conf"), b"greeting = app.2\n").await;
    let _ = &f.dom_addr;
}

/// Whole object files in a subd's cache directory (not temp files of a fetch).
fn cached_objects(dir: &Path) -> usize {
    fn count(d: &Path) -> usize {
        std::fs::read_dir(d).map_or(0, |rd| {
            rd.filter_map(Result::ok)
                .map(|e| {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        count(&e.path())
                    } else {
                        let name = e.file_name().to_string_lossy().into_owned();
                        usize::from(!name.ends_with(disk::fsutil::TEMP_SUFFIX))
                    }
                })
                .sum()
        })
    }
    count(dir)
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < WAIT, "{what}: timed out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
