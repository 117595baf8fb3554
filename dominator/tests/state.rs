//! Stateful paths (issue 11 §1) end to end, with the real binaries over loopback: an
//! imageserver, a dominator, two subds, images added with `imagetool add … --state`, the MDB
//! edited with `mdb`, statuses read from the dominator's `/api/machines`.
//!
//! use-ephemeral's relocation: every image holds `/etc/ssh/ssh_host_ed25519_key ->
//! /mnt/state/etc/ssh/ssh_host_ed25519_key` and, under the state line `/mnt/state/.*`, the
//! seed key and a seed database file. machine-1 starts blank: it gets the link and the
//! seeded key (owner, mode, mtime of the image's), and the trigger on `/mnt/state/` runs
//! once. Its key is then regenerated and its database evolves; machine-2 came with its own
//! key and a dangling symlink where the database goes. Ten image updates follow,
//! alternating sparse and full, one of them (machine-1's seventh) a full image without the
//! state line or the state files: both keep their state byte for byte, the trigger never
//! runs again, no update loops, and the divergence shows on the page and in `/api/`.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins`.

use serde_json::Value;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testkit::{bin, Daemon};
use testkit::{run_bin as run, run_bin_ok as ok};
use wire::client::{ClientSecurity, RpcClient};

/// Generous: CI is a 2-core machine shared with compilers.
const WAIT: Duration = Duration::from_secs(120);
const KEY: &str = "mnt/state/etc/ssh/ssh_host_ed25519_key";
const LINK: &str = "etc/ssh/ssh_host_ed25519_key";
const DB: &str = "mnt/state/db/data";

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn write(path: &Path, data: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The image source of version `n`: the relocation link, a motd naming the version, and
/// (unless `without_state`) the seeds under `/mnt/state`.
fn image_dir(base: &Path, n: usize, without_state: bool) -> PathBuf {
    let d = base.join(format!("src-{n}-{without_state}"));
    write(
        &d.join("etc/motd"),
        format!("version {n}\n").as_bytes(),
        0o644,
    );
    std::fs::create_dir_all(d.join("etc/ssh")).unwrap();
    std::os::unix::fs::symlink(format!("/{KEY}"), d.join(LINK)).unwrap();
    if !without_state {
        write(&d.join(KEY), b"seed key\n", 0o600);
        write(&d.join(DB), b"seed db\n", 0o640);
    }
    d
}

struct Fleet {
    dir: PathBuf,
    is_addr: String,
    mdb: PathBuf,
    api: RpcClient,
    _daemons: Vec<Daemon>,
    subd_addrs: Vec<String>,
}

impl Fleet {
    fn root(&self, i: usize) -> PathBuf {
        self.dir.join(format!("roots/machine-{}", i + 1))
    }
    fn service_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("service-{}.log", i + 1))).unwrap_or_default()
    }
    fn mdb(&self, args: &[&str]) {
        let mut a = vec!["--mdb", self.mdb.to_str().unwrap()];
        a.extend(args);
        ok("mdb", &a);
    }
    /// `imagetool add NAME DIR FILTER TRIGGERS [--state FILE]`.
    fn add(
        &self,
        name: &str,
        dir: &Path,
        filter: &str,
        state: Option<&Path>,
    ) -> Result<String, testkit::BinFailed> {
        let triggers = s(&self.dir.join("triggers.json"));
        let mut a = vec!["--image-server", &self.is_addr, "add", name];
        let dir = s(dir);
        a.extend([dir.as_str(), filter, triggers.as_str()]);
        let state = state.map(s);
        if let Some(st) = &state {
            a.extend(["--state", st.as_str()]);
        }
        run("imagetool", &a)
    }
    async fn machine(&self, host: &str) -> Value {
        let text = self
            .api
            .get_text("/api/machines")
            .await
            .expect("dominator API");
        let all: Value = serde_json::from_str(&text).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .find(|m| m["host"] == host)
            .cloned()
            .unwrap_or(Value::Null)
    }
    /// Waits until `host` is `synced` on `image`; returns its report.
    async fn wait_synced(&self, host: &str, image: &str) -> Value {
        let t0 = Instant::now();
        loop {
            let m = self.machine(host).await;
            if m["required_image"] == image && m["status_name"] == "synced" {
                return m;
            }
            assert!(t0.elapsed() < WAIT, "{host} never synced on {image}: {m:#}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn start_fleet(tmp: &Path) -> Fleet {
    let imageserver = Daemon::imageserver(&bin("imageserver"), &tmp.join("imageserver"), &[]);
    let is_addr = imageserver.addr.clone();
    let mdb = tmp.join("mdb.json");
    let args = [
        "--mdb",
        mdb.to_str().unwrap(),
        "--image-server",
        &is_addr,
        "--listen",
        "127.0.0.1:0",
        "--poll-interval-ms",
        "300",
        "--permit-insecure-mode",
    ];
    let dominator = Daemon::start(&bin("dominator"), &args.map(String::from));
    let api = RpcClient::new(
        &dominator.addr,
        6970,
        &ClientSecurity::Insecure,
        wire::client::DOMINATOR_NAME,
        Some(Duration::from_secs(30)),
    )
    .unwrap();
    let mut daemons = vec![imageserver, dominator];
    let mut subd_addrs = Vec::new();
    for i in 1..=2 {
        let log = tmp.join(format!("service-{i}.log"));
        let script = tmp.join(format!("service-{i}.sh"));
        let text = format!("#!/bin/sh\necho \"$*\" >> {}\n", log.display());
        write(&script, text.as_bytes(), 0o755);
        let root = tmp.join(format!("roots/machine-{i}"));
        std::fs::create_dir_all(&root).unwrap();
        let args = [
            "--root",
            root.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--service-command",
            script.to_str().unwrap(),
            "--scan-speed-percent",
            "100",
            "--permit-insecure-mode",
        ];
        let d = Daemon::start(&bin("subd"), &args.map(String::from));
        subd_addrs.push(d.addr.clone());
        daemons.push(d);
    }
    Fleet {
        dir: tmp.to_path_buf(),
        is_addr,
        mdb,
        api,
        _daemons: daemons,
        subd_addrs,
    }
}

fn sshd_runs(log: &str) -> usize {
    log.lines().filter(|l| l.contains("sshd")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_seeded_once_and_kept_across_ten_updates() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let f = start_fleet(t).await;
    let (r1, r2) = (f.root(0), f.root(1));
    let state = t.join("state.txt");
    std::fs::write(&state, "# use-ephemeral\n/mnt/state/.*\n").unwrap();
    let bad_state = t.join("bad-state.txt");
    std::fs::write(&bad_state, "/mnt/state/.*\n/mnt/(\n").unwrap();
    let full = t.join("full.filter");
    std::fs::write(&full, "").unwrap();
    std::fs::write(
        t.join("triggers.json"),
        r#"[{"MatchLines": ["/mnt/state/.*"], "Service": "sshd"}]"#,
    )
    .unwrap();
    // machine-2 regenerated its key before any image, and has a dangling symlink where the
    // database goes (present: never seeded over).
    write(&r2.join(KEY), b"machine-2's own key\n", 0o600);
    std::fs::create_dir_all(r2.join("mnt/state/db")).unwrap();
    std::os::unix::fs::symlink("/nowhere", r2.join(DB)).unwrap();

    // An invalid state regex: a one-line error, no image.
    let src1 = image_dir(t, 1, false);
    let e = f.add("state.1", &src1, "", Some(&bad_state)).unwrap_err();
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains("bad-state.txt:2: invalid regex"), "{e}");
    let check = run(
        "imagetool",
        &["--image-server", &f.is_addr, "check", "state.1"],
    );
    assert!(check.is_err(), "an image was stored: {check:?}");

    f.add("state.1", &src1, "", Some(&state)).unwrap();
    let shown = ok(
        "imagetool",
        &["--image-server", &f.is_addr, "show", "state.1"],
    );
    let marked = |line: &str| {
        shown
            .lines()
            .any(|l| l.contains(line) && l.ends_with(" [state]"))
    };
    assert!(
        marked(&format!("/{KEY}")) && marked("/mnt/state/db"),
        "{shown}"
    );
    assert!(
        !marked(" /etc/motd ") && !marked(&format!(" /{LINK} ->")),
        "{shown}"
    );
    let lines = ok(
        "imagetool",
        &["--image-server", &f.is_addr, "show-state", "state.1"],
    );
    assert_eq!(lines, "/mnt/state/.*\n");

    // `dominator plan` before machine-1 joins: what would be seeded.
    let preview_mdb = t.join("preview.json");
    let pm = preview_mdb.to_str().unwrap();
    ok(
        "mdb",
        &[
            "--mdb",
            pm,
            "add",
            "machine-1",
            "--ip",
            &f.subd_addrs[0],
            "--required",
            "state.1",
        ],
    );
    let plan = ok(
        "dominator",
        &[
            "plan",
            "--mdb",
            pm,
            "--image-server",
            &f.is_addr,
            "--permit-insecure-mode",
            "machine-1",
        ],
    );
    for seed in ["/mnt/state/db", "/mnt/state/etc"] {
        assert!(plan.contains(&format!("seed    {seed} (state")), "{plan}");
    }

    for (i, image) in [(0, "state.1"), (1, "state.1")] {
        f.mdb(&[
            "add",
            &format!("machine-{}", i + 1),
            "--ip",
            &f.subd_addrs[i],
            "--required",
            image,
        ]);
    }
    let m1 = f.wait_synced("machine-1", "state.1").await;
    let m2 = f.wait_synced("machine-2", "state.1").await;

    // machine-1: the link and the seeds, with the image's owner, mode and mtime.
    assert_eq!(
        std::fs::read_link(r1.join(LINK)).unwrap(),
        Path::new("/").join(KEY)
    );
    assert_eq!(std::fs::read(r1.join(KEY)).unwrap(), b"seed key\n");
    let (seeded, src) = (
        std::fs::metadata(r1.join(KEY)).unwrap(),
        std::fs::metadata(src1.join(KEY)).unwrap(),
    );
    assert_eq!(
        (
            seeded.mode() & 0o7777,
            seeded.uid(),
            seeded.gid(),
            seeded.mtime()
        ),
        (0o600, src.uid(), src.gid(), src.mtime())
    );
    assert_eq!(std::fs::read(r1.join(DB)).unwrap(), b"seed db\n");
    assert_eq!(sshd_runs(&f.service_log(0)), 2, "{}", f.service_log(0)); // stop, start
    assert_eq!(m1["state_diverged"], 0, "{m1:#}");
    // machine-2: its own key and dangling symlink kept; the trigger never ran.
    assert_eq!(
        std::fs::read(r2.join(KEY)).unwrap(),
        b"machine-2's own key\n"
    );
    assert_eq!(
        std::fs::read_link(r2.join(DB)).unwrap(),
        Path::new("/nowhere")
    );
    assert_eq!(sshd_runs(&f.service_log(1)), 0, "{}", f.service_log(1));
    assert_eq!(m2["state_diverged"], 2, "{m2:#}");

    // machine-1 regenerates its key and its database evolves.
    write(&r1.join(KEY), b"regenerated on machine-1\n", 0o640);
    write(&r1.join(DB), b"evolved db\n", 0o600);
    let t0 = Instant::now();
    loop {
        let m = f.machine("machine-1").await;
        if m["state_diverged"] == 2 && m["status_name"] == "synced" {
            break;
        }
        assert!(t0.elapsed() < WAIT, "divergence never showed: {m:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = f.api.get_text("/machine/machine-1").await.unwrap();
    assert!(
        page.contains("2 paths differ from the image&#x27;s seed")
            || page.contains("2 paths differ from the image's seed"),
        "{page}"
    );
    // No update loop: the drift in state sends nothing.
    let finished = f.machine("machine-1").await["last_update"]["finished_at"].clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = f.machine("machine-1").await;
    assert_eq!(m["last_update"]["finished_at"], finished, "{m:#}");

    // Ten updates, sparse and full; machine-1's seventh drops the state line and files.
    for n in 2..=11 {
        let filter = if n % 2 == 0 { s(&full) } else { String::new() };
        let name = format!("state.{n}");
        f.add(&name, &image_dir(t, n, false), &filter, Some(&state))
            .unwrap();
        let m1_image = if n == 7 {
            f.add("drop.7", &image_dir(t, n, true), &s(&full), None)
                .unwrap();
            let d = ok(
                "imagetool",
                &["--image-server", &f.is_addr, "diff", "state.7", "drop.7"],
            );
            assert!(d.contains("# state - /mnt/state/.*"), "{d}");
            "drop.7".to_string()
        } else {
            name.clone()
        };
        f.mdb(&["set", "machine-1", "--required", &m1_image]);
        f.mdb(&["set", "machine-2", "--required", &name]);
        f.wait_synced("machine-1", &m1_image).await;
        f.wait_synced("machine-2", &name).await;
        for r in [&r1, &r2] {
            assert_eq!(
                std::fs::read(r.join("etc/motd")).unwrap(),
                format!("version {n}\n").as_bytes()
            );
        }
        assert_eq!(
            std::fs::read(r1.join(KEY)).unwrap(),
            b"regenerated on machine-1\n",
            "update {n}"
        );
        assert_eq!(
            std::fs::metadata(r1.join(KEY)).unwrap().mode() & 0o7777,
            0o640
        );
        assert_eq!(
            std::fs::read(r1.join(DB)).unwrap(),
            b"evolved db\n",
            "update {n}"
        );
        assert_eq!(
            std::fs::read(r2.join(KEY)).unwrap(),
            b"machine-2's own key\n",
            "update {n}"
        );
        assert_eq!(
            std::fs::read_link(r2.join(DB)).unwrap(),
            Path::new("/nowhere")
        );
        assert_eq!(
            std::fs::read_link(r1.join(LINK)).unwrap(),
            Path::new("/").join(KEY)
        );
    }
    // The trigger on state ran only when it was seeded.
    assert_eq!(sshd_runs(&f.service_log(0)), 2, "{}", f.service_log(0));
    assert_eq!(sshd_runs(&f.service_log(1)), 0, "{}", f.service_log(1));
}
