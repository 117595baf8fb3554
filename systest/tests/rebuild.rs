//! Rebuilding a dead host (issue 11 §3) end to end, with the real binaries (imageserver,
//! dominator, subd, imagetool, mdb; insecure on loopback): the MDB record of `m1` points at
//! a dead address; a replacement machine (a running subd on an empty root) appears;
//! `dominator plan m1` against it says it is a rebuild; `mdb set m1 --address …` points the
//! record at it; it converges in one update to `synced`: contents, owners, groups, modes,
//! mtimes, a hardlink, a device node (when run as root), a symlink, a seeded state path,
//! pre and post hooks in order with `SUBD_REBUILD=1`, the service started. The root is then
//! compared path by path with the image's source tree, and the page and `/api/` say rebuild.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins`.

use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::run_bin_ok as ok;
use testkit::{bin, Daemon};
use wire::client::RpcClient;

/// Generous: CI is a 2-core machine shared with compilers.
const WAIT: Duration = Duration::from_secs(120);
/// The owner of the image's files (not root, nor anyone on the machine).
const UID: u32 = 4321;
const GID: u32 = 8765;

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

/// Sets `path`'s mtime (not following a symlink) to `secs`.`nanos`.
fn set_mtime(path: &Path, secs: i64, nanos: i64) {
    let t = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: nanos as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: nanos as _,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &t,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// The image's source tree: owned by `UID:GID` (when run as root), assorted modes and
/// mtimes, a hardlink, a symlink, an empty file, a character device (as root) and the
/// state seed `/mnt/state/key`.
fn source_tree(src: &Path) {
    write(&src.join("etc/app.conf"), "v1\n", 0o640);
    write(&src.join("usr/bin/tool"), "#!/bin/sh\necho tool\n", 0o4755);
    std::fs::create_dir_all(src.join("usr/sbin")).unwrap();
    std::fs::hard_link(src.join("usr/bin/tool"), src.join("usr/sbin/tool-too")).unwrap();
    write(&src.join("srv/data/empty"), "", 0o600);
    std::fs::set_permissions(src.join("srv/data"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("app.conf", src.join("etc/app.link")).unwrap();
    write(&src.join("mnt/state/key"), "seed key\n", 0o600);
    if is_root() {
        std::fs::create_dir_all(src.join("dev")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            src.join("dev/null0"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o620),
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
        for p in ["etc/app.conf", "usr/bin/tool", "srv/data", "srv/data/empty"] {
            std::os::unix::fs::lchown(src.join(p), Some(UID), Some(GID)).unwrap();
        }
        std::os::unix::fs::lchown(src.join("etc/app.link"), Some(UID), None).unwrap();
        std::os::unix::fs::lchown(src.join("dev/null0"), Some(0), Some(GID)).unwrap();
        // After the chowns, which clear set-user-ID (and mknod's mode is masked).
        for (p, mode) in [("usr/bin/tool", 0o4755), ("dev/null0", 0o620)] {
            std::fs::set_permissions(src.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    // Files first, then directories deepest first (making a child changes its parent).
    for (i, p) in [
        "etc/app.conf",
        "usr/bin/tool",
        "srv/data/empty",
        "etc/app.link",
        "mnt/state/key",
        "srv/data",
        "usr/bin",
        "usr/sbin",
        "mnt/state",
        "etc",
        "srv",
        "usr",
        "mnt",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(&src.join(p), 1_500_000_000 + i as i64 * 1000, 123_456_789);
    }
}

/// `/api/machines/m1` as JSON (`Null` while it cannot be read).
async fn machine(api: &RpcClient) -> Value {
    let text = api.get_text("/api/machines/m1").await.unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Waits until the machine's report satisfies `done`; returns it.
async fn wait_for(api: &RpcClient, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let m = machine(api).await;
        if done(&m) {
            return m;
        }
        assert!(t0.elapsed() < WAIT, "never {what}; last report: {m:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `dominator plan m1` (retried while the new machine's first scan is not done).
fn plan_until_ready(mdb: &Path, is_addr: &str) -> String {
    let t0 = Instant::now();
    loop {
        let args = [
            "plan",
            "--mdb",
            &s(mdb),
            "--image-server",
            is_addr,
            "--permit-insecure-mode",
            "m1",
        ];
        let out = ok("dominator", &args);
        if !out.contains("cannot plan") {
            return out;
        }
        assert!(t0.elapsed() < WAIT, "never planned: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `DIR/mdb.json` holding the dead host `m1`: its record points at a closed port and
/// requires `app/1`. Returns the path and its string.
fn dead_host_mdb(dir: &Path) -> (std::path::PathBuf, String) {
    let mdb = dir.join("mdb.json");
    let m = s(&mdb);
    let add = [
        "--mdb",
        &m,
        "add",
        "m1",
        "--ip",
        "127.0.0.1:1",
        "--required",
        "app/1",
    ];
    ok("mdb", &add);
    (mdb, m)
}

/// The hook scripts: two pre hooks and a post hook, each appending
/// `PHASE NAME IMAGE|PREVIOUS|REBUILD|app.conf` to `log`.
fn hooks_dir(dir: &Path, log: &Path) {
    for (rel, phase, name) in [
        ("pre/20-b", "pre", "20-b"),
        ("pre/10-a", "pre", "10-a"),
        ("post/p", "post", "p"),
    ] {
        let script = format!(
            "#!/bin/sh\nc=$(cat etc/app.conf 2>/dev/null || echo absent)\n\
             echo \"{phase} {name} $SUBD_IMAGE|$SUBD_PREVIOUS_IMAGE|$SUBD_REBUILD|$c\" >> {}\n",
            log.display()
        );
        write(&dir.join(rel), &script, 0o644);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_host_is_rebuilt_from_an_empty_root_in_one_update() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (root, log) = (t.join("root"), t.join("log"));
    std::fs::create_dir_all(&root).unwrap();
    let service = t.join("service.sh");
    let text = format!("#!/bin/sh\necho \"service $*\" >> {}\n", log.display());
    write(&service, &text, 0o755);

    // The image: the tree, the state line, the trigger, the hooks.
    let is = Daemon::imageserver(&bin("imageserver"), &t.join("imageserver"), &[]);
    let src = t.join("src");
    source_tree(&src);
    let hooks = t.join("hooks");
    hooks_dir(&hooks, &log);
    let (state, triggers) = (t.join("state"), t.join("triggers.json"));
    std::fs::write(&state, "/mnt/state/.*\n").unwrap();
    std::fs::write(
        &triggers,
        r#"[{"MatchLines":["/etc/app.conf"],"Service":"app"}]"#,
    )
    .unwrap();
    let add = [
        "--image-server",
        &is.addr,
        "add",
        "app/1",
        &s(&src),
        "",
        &s(&triggers),
        "--state",
        &s(&state),
        "--hooks",
        &s(&hooks),
    ];
    ok("imagetool", &add);

    // The dead host: its record points at a closed port.
    let (mdb, m) = dead_host_mdb(t);
    let dom = Daemon::dominator(&bin("dominator"), &m, &is.addr, 200);
    let api = dom.dominator_api();
    wait_for(&api, "polled the dead host", |m| {
        m["last_error"].is_string() && m["last_poll"].is_null()
    })
    .await;

    // The replacement: a subd on an empty root.
    let subd = Daemon::subd(
        &bin("subd"),
        &s(&root),
        &[
            "--service-command",
            &s(&service),
            "--scan-speed-percent",
            "100",
            "--cpu-percent",
            "100",
        ],
    );

    // `dominator plan` against it (a copy of the record with the new address): a rebuild.
    let preview = t.join("preview.json");
    std::fs::copy(&mdb, &preview).unwrap();
    let p = s(&preview);
    ok("mdb", &["--mdb", &p, "set", "m1", "--address", &subd.addr]);
    let plan = plan_until_ready(&preview, &is.addr);
    for want in [
        "m1: image app/1 (sparse)\n  rebuild: the machine holds no image (its hooks get SUBD_REBUILD=1)\n",
        "  hook    pre 10-a\n  hook    pre 20-b\n",
        "  seed    /mnt/state/key (state: made only while nothing is there)\n",
        "  hook    post p\n",
    ] {
        assert!(plan.contains(want), "{want:?} missing from:\n{plan}");
    }
    assert!(log.metadata().is_err(), "planning ran nothing");

    // The MDB edit: one update to `synced`.
    ok("mdb", &["--mdb", &m, "set", "m1", "--address", &subd.addr]);
    let report = wait_for(&api, "synced on app/1", |m| {
        m["status_name"] == "synced" && m["last_update"]["image_name"] == "app/1"
    })
    .await;
    let u = &report["last_update"];
    assert_eq!(u["rebuild"], true, "{report:#}");
    assert_eq!(u["errors"], serde_json::json!([]), "{report:#}");
    assert_eq!(u["hooks"].as_array().unwrap().len(), 3, "{report:#}");

    // Hooks in order, around the change and the service, each run once, told "rebuild".
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let hook_lines: Vec<&str> = lines
        .iter()
        .filter(|l| !l.starts_with("service"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        hook_lines,
        [
            "pre 10-a app/1||1|absent",
            "pre 20-b app/1||1|absent",
            "post p app/1||1|v1"
        ],
        "{lines:#?}"
    );
    assert_eq!(
        lines[2..4],
        ["service app stop", "service app start"],
        "the service (re)started between the pre and post hooks: {lines:#?}"
    );

    // Path by path, the root is the image's tree (the seeded state included).
    let (got, want) = (testkit::tree::listing(&root), testkit::tree::listing(&src));
    let differ: Vec<String> = want
        .iter()
        .filter(|(path, line)| got.get(*path) != Some(line))
        .map(|(path, line)| format!("{path}: image {line}, machine {:?}", got.get(path)))
        .collect();
    assert!(differ.is_empty(), "{differ:#?}");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    if is_root() {
        assert!(want["/etc/app.conf"].contains(&format!(" {UID}:{GID} ")));
        assert!(
            want["/dev/null0"].contains("dev 103"),
            "{}",
            want["/dev/null0"]
        );
    }
    assert!(want["/usr/bin/tool"].contains(r#"links ["/usr/bin/tool", "/usr/sbin/tool-too"]"#));

    // The page and the API say it was a rebuild; a later poll keeps it synced, no update.
    let page = api.get_text("/machine/m1").await.unwrap();
    assert!(
        page.contains("rebuild: the machine held no image before"),
        "{page}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = machine(&api).await;
    assert_eq!(again["status_name"], "synced", "{again:#}");
    assert_eq!(again["last_update"]["finished_at"], u["finished_at"]);
    assert!(
        want["/usr/bin/tool"].starts_with("104755 "),
        "{}",
        want["/usr/bin/tool"]
    );
    let hooks_after = std::fs::read_to_string(&log).unwrap();
    assert_eq!(hooks_after.lines().count(), lines.len(), "{hooks_after}");
    drop(subd);
}

/// With a poll interval longer than the whole rebuild, the dominator still goes from the
/// fetch to the update to `synced` without waiting out an interval at each step: it holds a
/// poll open until the scan that settles its last action is done. (Polling only, the two
/// awaited scans would cost two whole intervals.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_does_not_wait_out_the_poll_interval_between_steps() {
    const POLL_MS: u64 = 6000;
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let root = t.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let is = Daemon::imageserver(&bin("imageserver"), &t.join("imageserver"), &[]);
    let src = t.join("src");
    for n in 0..20 {
        write(
            &src.join(format!("etc/f{n}")),
            &format!("file {n}\n"),
            0o644,
        );
    }
    ok(
        "imagetool",
        &["--image-server", &is.addr, "add", "app/1", &s(&src), "", ""],
    );
    let subd = Daemon::subd(&bin("subd"), &s(&root), &["--scan-speed-percent", "100"]);
    let sc =
        wire::client::SubdClient::new(&subd.addr, &wire::client::ClientSecurity::Insecure, None)
            .unwrap();
    testkit::drive::poll_after(&sc, 0).await;
    let (_, m) = dead_host_mdb(t);
    let dom = Daemon::dominator(&bin("dominator"), &m, &is.addr, POLL_MS);
    let api = dom.dominator_api();
    wait_for(&api, "polled the dead host", |m| {
        m["last_error"].is_string()
    })
    .await;
    // Just after a cycle: the next poll is a whole interval away.
    let t0 = Instant::now();
    ok("mdb", &["--mdb", &m, "set", "m1", "--address", &subd.addr]);
    let synced = wait_for(&api, "synced", |m| m["status_name"] == "synced").await;
    let took = t0.elapsed();
    assert_eq!(synced["last_update"]["image_name"], "app/1", "{synced:#}");
    assert!(
        took < Duration::from_millis(POLL_MS - 1000),
        "synced after {took:?}: the steps waited for the {POLL_MS} ms poll interval"
    );
    for n in 0..20 {
        let got = std::fs::read_to_string(root.join(format!("etc/f{n}"))).unwrap();
        assert_eq!(got, format!("file {n}\n"));
    }
}
