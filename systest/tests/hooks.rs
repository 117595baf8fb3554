//! Pre and post hooks end to end, with the real binaries (imageserver, dominator, subd,
//! imagetool, insecure on loopback) and recording `#!/bin/sh` hook scripts that append to a
//! log outside the managed root: order by name, environment, pre hooks before any change
//! and post hooks after the service starts; a failing pre hook leaving the machine
//! byte-identical (owners, modes, mtimes, hashes) while the dominator retries; a timed-out
//! post hook killed and shown on the page and in `/api/`; a later update's hooks clearing
//! it; an update that changes nothing running none; subd stopped (`SIGTERM`) while a pre
//! hook runs: the hook's process group stopped with it, nothing changed; `show-hooks` and
//! `diff`; and bad
//! `--hooks` directories refused with one line and no image.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins`.

use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use testkit::{bin, Daemon};
use wire::client::RpcClient;

/// Generous: CI is a 2-core machine shared with compilers.
const WAIT: Duration = Duration::from_secs(120);

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn write(path: &Path, data: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn imagetool(server: &str, args: &[&str]) -> Output {
    Command::new(bin("imagetool"))
        .args(["--image-server", server])
        .args(args)
        .output()
        .unwrap()
}

fn imagetool_ok(server: &str, args: &[&str]) -> String {
    let out = imagetool(server, args);
    assert!(
        out.status.success(),
        "imagetool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A hook script recording `PHASE NAME IMAGE|PREVIOUS|ROOT|REBUILD|PWD|app.conf` in `log`.
fn recording_hook(log: &Path, phase: &str, name: &str) -> String {
    format!(
        "#!/bin/sh\nc=$(cat etc/app.conf 2>/dev/null || echo absent)\n\
         echo \"{phase} {name} $SUBD_IMAGE|$SUBD_PREVIOUS_IMAGE|$SUBD_ROOT|$SUBD_REBUILD|$(pwd)|$c\" >> {}\n",
        log.display()
    )
}

/// What is under `root` (not subd's own records): per path its kind, mode, owner, group,
/// mtime (seconds and nanoseconds) and content hash or link target.
fn listing(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
            if rel == "/.subd" || model::diff::ALWAYS_EXCLUDED.contains(&rel.as_str()) {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.is_dir() {
                walk(root, &p, out);
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                format!("-> {:?}", std::fs::read_link(&p).unwrap())
            } else {
                format!("{}", model::ObjectId::of(&std::fs::read(&p).unwrap()))
            };
            let line = format!(
                "{:o} {}:{} {}.{} {what}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec()
            );
            out.insert(rel, line);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

struct World {
    dir: PathBuf,
    root: PathBuf,
    log: PathBuf,
    mdb: PathBuf,
    is_addr: String,
    subd_addr: String,
    api: RpcClient,
    _daemons: Vec<Daemon>,
}

impl World {
    fn start(tmp: &Path) -> World {
        let root = tmp.join("root");
        std::fs::create_dir_all(&root).unwrap();
        let log = tmp.join("log");
        let service = tmp.join("service.sh");
        write(
            &service,
            &format!("#!/bin/sh\necho \"service $*\" >> {}\n", log.display()),
            0o755,
        );
        let is = Daemon::imageserver(&bin("imageserver"), &tmp.join("imageserver"), &[]);
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
                "--hook-timeout-secs",
                "2",
            ],
        );
        let mdb = tmp.join("mdb.json");
        std::fs::write(&mdb, "[]").unwrap();
        let dom = Daemon::dominator(&bin("dominator"), &s(&mdb), &is.addr, 200);
        let api = dom.dominator_api();
        World {
            dir: tmp.to_path_buf(),
            root,
            log,
            mdb,
            is_addr: is.addr.clone(),
            subd_addr: subd.addr.clone(),
            api,
            _daemons: vec![is, subd, dom],
        }
    }

    /// Adds image `name`: `/etc/app.conf` holding `conf` (one word; trigger: service
    /// `app`), and the hooks `(phase/name, script)`.
    fn add(&self, name: &str, conf: &str, hooks: &[(&str, String)]) {
        // One source directory per content, kept: images of the same content are the same
        // tree (mtimes included).
        let src = self.dir.join("src").join(conf.trim());
        if !src.exists() {
            write(&src.join("etc/app.conf"), conf, 0o644);
        }
        let hd = self.dir.join("hooks").join(name.replace('/', "_"));
        std::fs::create_dir_all(&hd).unwrap();
        for (rel, script) in hooks {
            write(&hd.join(rel), script, 0o644); // subd makes them executable
        }
        let triggers = self.dir.join("app.triggers");
        std::fs::write(
            &triggers,
            r#"[{"MatchLines":["/etc/app.conf"],"Service":"app"}]"#,
        )
        .unwrap();
        imagetool_ok(
            &self.is_addr,
            &["add", name, &s(&src), "", &s(&triggers), "--hooks", &s(&hd)],
        );
    }

    fn require(&self, image: &str) {
        let (_, port) = self.subd_addr.rsplit_once(':').unwrap();
        std::fs::write(
            &self.mdb,
            format!(
                r#"[{{"Hostname":"m1","IpAddress":"127.0.0.1:{port}","RequiredImage":"{image}"}}]"#
            ),
        )
        .unwrap();
    }

    async fn machine(&self) -> Value {
        let text = self
            .api
            .get_text("/api/machines/m1")
            .await
            .unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Waits until the machine's report satisfies `ok`; returns it.
    async fn wait_for(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let m = self.machine().await;
            if ok(&m) {
                return m;
            }
            assert!(t0.elapsed() < WAIT, "never {what}; last report: {m:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn synced(&self, image: &str) -> Value {
        self.wait_for(&format!("synced on {image}"), |m| {
            m["required_image"] == image
                && m["status_name"] == "synced"
                && m["last_update"]["image_name"] == image
        })
        .await
    }

    fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    async fn page(&self) -> String {
        self.api.get_text("/machine/m1").await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_in_order_around_the_update_and_failures_show() {
    let tmp = tempfile::tempdir().unwrap();
    let w = World::start(tmp.path());

    blank_machine_runs_hooks_in_order(&w).await;
    failing_pre_hook_changes_nothing_and_is_retried(&w).await;
    timed_out_post_hook_is_killed_and_shown(&w).await;
    later_hooks_clear_the_failure(&w).await;
    no_op_update_runs_no_hooks(&w).await;
}

/// A blank machine: pre hooks in byte order of their names ("10-a" < "20-b" <
/// "9-c"), before the file exists; then the service; then the post hook.
async fn blank_machine_runs_hooks_in_order(w: &World) {
    let root = s(&w.root);
    let hooks1 = [
        ("pre/20-b", recording_hook(&w.log, "pre", "20-b")),
        ("pre/9-c", recording_hook(&w.log, "pre", "9-c")),
        ("pre/10-a", recording_hook(&w.log, "pre", "10-a")),
        ("post/p", recording_hook(&w.log, "post", "p")),
    ];
    w.add("img/1", "v1\n", &hooks1);
    let shown = imagetool_ok(&w.is_addr, &["show-hooks", "img/1"]);
    let names: Vec<&str> = shown
        .lines()
        .map(|l| l.split(' ').take(2).last().unwrap())
        .collect();
    assert_eq!(names, ["10-a", "20-b", "9-c", "p"], "{shown}");
    w.require("img/1");
    let m = w.synced("img/1").await;
    let env = format!("img/1||{root}|1|{root}");
    let want_hooks = [
        format!("pre 10-a {env}|absent"),
        format!("pre 20-b {env}|absent"),
        format!("pre 9-c {env}|absent"),
        format!("post p {env}|v1"),
    ];
    let log = w.log_lines();
    let hooks_only: Vec<&String> = log.iter().filter(|l| !l.starts_with("service")).collect();
    assert_eq!(
        hooks_only,
        want_hooks.iter().collect::<Vec<_>>(),
        "{log:#?}"
    );
    let first_service = log.iter().position(|l| l.starts_with("service")).unwrap();
    let last_service = log.iter().rposition(|l| l.starts_with("service")).unwrap();
    assert!(
        first_service == 3 && last_service == log.len() - 2,
        "pre hooks before the services, the post hook after them: {log:#?}"
    );
    let runs = m["last_update"]["hooks"].as_array().unwrap();
    assert_eq!(runs.len(), 4, "{m:#}");
    assert!(runs.iter().all(|r| r["exit_code"] == 0), "{m:#}");
    assert!(m["last_update"]["hook_failure"].is_null(), "{m:#}");
}

/// A failing pre hook: the machine stays byte-identical, the later hook never runs,
/// the dominator shows the failure and retries with back-off.
async fn failing_pre_hook_changes_nothing_and_is_retried(w: &World) {
    let root = s(&w.root);
    let before = listing(&w.root);
    let hooks2 = [
        ("pre/10-a", recording_hook(&w.log, "pre", "10-a")),
        (
            "pre/50-fail",
            "#!/bin/sh\necho checking\necho 'disk too small' >&2\nexit 3\n".to_string(),
        ),
        ("pre/60-never", recording_hook(&w.log, "pre", "60-never")),
        ("post/p", recording_hook(&w.log, "post", "p")),
    ];
    w.add("img/2", "v2\n", &hooks2);
    let diff = imagetool_ok(&w.is_addr, &["diff", "img/1", "img/2"]);
    for l in [
        "# hook - pre 20-b",
        "# hook + pre 50-fail",
        "# hook + pre 60-never",
        "# hook - pre 9-c",
    ] {
        assert!(
            diff.lines().any(|x| x == l),
            "{l:?} missing from diff:\n{diff}"
        );
    }
    let lines_before = w.log_lines().len();
    w.require("img/2");
    let want = "pre-hook failed: 50-fail: disk too small";
    let m = w
        .wait_for("showing the pre-hook failure", |m| {
            m["status_name"] == "update failed" && m["last_error"] == want
        })
        .await;
    let runs = m["last_update"]["hooks"].as_array().unwrap();
    assert_eq!(runs.last().unwrap()["name"], "50-fail", "{m:#}");
    assert_eq!(runs.last().unwrap()["exit_code"], 3, "{m:#}");
    assert_eq!(
        runs.last().unwrap()["output"],
        serde_json::json!(["checking", "disk too small"]),
        "{m:#}"
    );
    assert_eq!(m["last_update"]["hook_failure"], want, "{m:#}");
    assert!(w.page().await.contains(want));
    // Retried: the first pre hook ran again.
    let env2 = format!("img/2|img/1|{root}|0|{root}|v1");
    let t0 = Instant::now();
    loop {
        let log = w.log_lines();
        let ran = log[lines_before..]
            .iter()
            .filter(|l| **l == format!("pre 10-a {env2}"))
            .count();
        if ran >= 2 {
            break;
        }
        assert!(t0.elapsed() < WAIT, "no retry: {log:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = w.log_lines();
    assert!(
        log[lines_before..]
            .iter()
            .all(|l| l.starts_with("pre 10-a ")),
        "nothing but the first pre hook ran (no service, no later hook): {log:#?}"
    );
    assert_eq!(
        listing(&w.root),
        before,
        "a failing pre hook changed the machine"
    );
    let m = w.machine().await;
    assert!(
        m["consecutive_failures"].as_u64().unwrap_or(0) >= 1,
        "{m:#}"
    );
}

/// A post hook that outlives --hook-timeout-secs is killed; the files stay, the
/// machine is synced and shows the failure on its page and in /api/.
async fn timed_out_post_hook_is_killed_and_shown(w: &World) {
    let pidfile = w.dir.join("slow.pid");
    let hooks3 = [(
        "post/slow",
        format!(
            "#!/bin/sh\necho $$ > {}\necho started\nsleep 60\necho never\n",
            pidfile.display()
        ),
    )];
    w.add("img/3", "v3\n", &hooks3);
    w.require("img/3");
    let m = w.synced("img/3").await;
    assert_eq!(
        std::fs::read_to_string(w.root.join("etc/app.conf")).unwrap(),
        "v3\n"
    );
    let want = "post-hook failed: slow: timed out (killed): started";
    assert_eq!(m["last_update"]["hook_failure"], want, "{m:#}");
    let run = &m["last_update"]["hooks"][0];
    assert_eq!(run["timed_out"], true, "{m:#}");
    assert!(run["exit_code"].is_null(), "{m:#}");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the timed-out hook (pid {pid}) is still running"
    );
    let page = w.page().await;
    assert!(page.contains(want), "{page}");
    let overview = w.api.get_text("/").await.unwrap();
    assert!(
        overview.contains(want),
        "the fleet page names it: {overview}"
    );
    let subd_page = reqwest::get(format!("http://{}/", w.subd_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        subd_page.contains(want),
        "subd's page names it: {subd_page}"
    );
}

/// A later update whose hooks succeed clears it.
async fn later_hooks_clear_the_failure(w: &World) {
    let hooks4 = [("post/ok", recording_hook(&w.log, "post", "ok"))];
    w.add("img/4", "v4\n", &hooks4);
    w.require("img/4");
    let m = w.synced("img/4").await;
    assert!(m["last_update"]["hook_failure"].is_null(), "{m:#}");
    // Gone from the machine's current state (its timeline keeps the history).
    let page = w.page().await;
    let current = page.split("<h2>Timeline</h2>").next().unwrap();
    assert!(!current.contains("post-hook failed"), "{current}");
}

/// An update that changes nothing runs no hook: same content, other hooks.
async fn no_op_update_runs_no_hooks(w: &World) {
    let lines = w.log_lines().len();
    let hooks5 = [("pre/x", recording_hook(&w.log, "pre", "x"))];
    w.add("img/5", "v4\n", &hooks5);
    w.require("img/5");
    w.wait_for("synced on img/5", |m| {
        m["required_image"] == "img/5" && m["status_name"] == "synced"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(w.log_lines().len(), lines, "{:#?}", w.log_lines());
}

/// `SIGTERM` to subd while a pre hook runs: the hook's process group (a background child
/// too) is stopped, subd exits within the grace period, the machine is unchanged and subd's
/// record of the update says the hook was interrupted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_subd_stops_a_running_hook_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = World::start(tmp.path());
    let pidfile = w.dir.join("background.pid");
    let hook = format!(
        "#!/bin/sh\nsleep 60 &\necho $! > {}.tmp\nmv {0}.tmp {0}\necho working\nwait\n",
        pidfile.display()
    );
    w.add("img/1", "v1\n", &[("pre/long", hook)]);
    w.require("img/1");
    let t0 = Instant::now();
    while !pidfile.exists() {
        assert!(t0.elapsed() < WAIT, "the pre hook never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let background = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .to_string();
    let subd = &mut w._daemons[1];
    let pid = rustix::process::Pid::from_raw(subd.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = subd.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(30),
            "subd did not exit after SIGTERM while its hook ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "subd's exit: {status:?}");
    let stat = std::fs::read_to_string(format!("/proc/{background}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
    assert!(
        state.is_none() || state == Some("Z"),
        "the hook's background child outlived subd: {stat}"
    );
    assert!(
        !w.root.join("etc/app.conf").exists(),
        "an interrupted pre hook must leave the machine unchanged"
    );
    let record = std::fs::read_to_string(w.root.join(".subd/last-update.json")).unwrap();
    assert!(
        record.contains("pre-hook failed: long: interrupted (subd shutting down): working"),
        "{record}"
    );
}

#[tokio::test]
async fn bad_hooks_directories_are_refused_with_one_line_and_no_image() {
    let tmp = tempfile::tempdir().unwrap();
    let is = Daemon::imageserver(&bin("imageserver"), &tmp.path().join("is"), &[]);
    let src = tmp.path().join("src");
    write(&src.join("etc/x"), "x\n", 0o644);
    let hook = "#!/bin/sh\ntrue\n";
    // (name, entries to make under the hooks dir, what the error names)
    let cases: &[(&str, &[&str], &str)] = &[
        ("other", &["pre/a", "README"], "unexpected entry \"README\""),
        ("subdir", &["pre/a", "post/dir/"], "not a regular file"),
        ("symlink", &["pre/link@"], "not a regular file"),
        ("pre-file", &["pre"], "pre is not a directory"),
        ("missing", &["-"], "No such file"),
    ];
    for (name, entries, want) in cases {
        let hd = tmp.path().join(format!("hooks-{name}"));
        for e in *entries {
            if *e == "-" {
                continue;
            }
            std::fs::create_dir_all(&hd).unwrap();
            let p = hd.join(e.trim_end_matches(['/', '@']));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            if e.ends_with('/') {
                std::fs::create_dir(&p).unwrap();
            } else if e.ends_with('@') {
                std::os::unix::fs::symlink("/bin/sh", &p).unwrap();
            } else {
                write(&p, hook, 0o755);
            }
        }
        let image = format!("bad/{name}");
        let out = imagetool(
            &is.addr,
            &["add", &image, &s(&src), "", "", "--hooks", &s(&hd)],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: accepted");
        assert!(err.contains(want), "{name}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: one line: {err}");
        let check = imagetool(&is.addr, &["check", &image]);
        assert_eq!(check.status.code(), Some(1), "{name}: an image was added");
    }
}
