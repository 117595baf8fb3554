//! Image streams and group edits (issue 12 §2, §3) end to end, with the real binaries
//! (imageserver, subd, dominator, imagetool, mdb; insecure on loopback):
//! - a host whose RequiredImage names an image directory converges to a version newly
//!   added there without any MDB edit, within a poll interval or two of the `add`; the
//!   page, `/api/`, `dominator plan` and `mdb show --image-server` say what the name
//!   resolved to; `imagetool find-latest-image` agrees; `mdb rollback` pins the host to
//!   the version before; an already-expired newer version is refused, never followed; deleting the newest
//!   falls back to the previous one;
//! - one `mdb set --where` edit over three tagged hosts converges all three, and its
//!   `mdb rollback --where` returns all three.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins`.

use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::run_bin_ok as ok;
use testkit::{bin, run_bin, Daemon};
use wire::client::{ClientSecurity, RpcClient};

/// Generous: CI is a 2-core machine shared with compilers.
const WAIT: Duration = Duration::from_secs(120);
/// The dominator's poll interval in these tests.
const POLL_MS: u64 = 300;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Adds the sparse image `name` holding `/etc/version` = `version`.
fn add_version(t: &Path, is: &str, name: &str, version: &str) {
    let src = t.join(format!("src-{}", name.replace('/', "-")));
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/version"), format!("{version}\n")).unwrap();
    ok(
        "imagetool",
        &["--image-server", is, "add", name, &s(&src), "", ""],
    );
}

/// A subd on a new empty root `t/NAME`.
fn subd(t: &Path, name: &str) -> (Daemon, std::path::PathBuf) {
    let root = t.join(name);
    std::fs::create_dir_all(&root).unwrap();
    let d = Daemon::subd(
        &bin("subd"),
        &s(&root),
        &["--scan-speed-percent", "100", "--cpu-percent", "100"],
    );
    (d, root)
}

/// A dominator over `mdb` and the imageserver `is`, and a client of its API.
fn dominator(mdb: &Path, is: &str) -> (Daemon, RpcClient) {
    let dom = Daemon::start(
        &bin("dominator"),
        &[
            "--mdb",
            &s(mdb),
            "--image-server",
            is,
            "--listen",
            "127.0.0.1:0",
            "--permit-insecure-mode",
            "--poll-interval-ms",
            &POLL_MS.to_string(),
        ]
        .map(String::from),
    );
    let api = dom.dominator_api();
    (dom, api)
}

/// `/api/machines/HOST` as JSON (`Null` while it cannot be read).
async fn machine(api: &RpcClient, host: &str) -> Value {
    let text = api
        .get_text(&format!("/api/machines/{host}"))
        .await
        .unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Waits until `host`'s report satisfies `done`; returns it.
async fn wait_for(api: &RpcClient, host: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let m = machine(api, host).await;
        if done(&m) {
            return m;
        }
        assert!(
            t0.elapsed() < WAIT,
            "{host} never {what}; last report: {m:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `host` is synced on `image` (its root holding `version`).
async fn wait_synced(api: &RpcClient, host: &str, image: &str, root: &Path, version: &str) {
    wait_for(api, host, &format!("synced on {image}"), |m| {
        m["status_name"] == "synced" && m["resolved_required_image"] == image
    })
    .await;
    let got = std::fs::read_to_string(root.join("etc/version")).unwrap();
    assert_eq!(got, format!("{version}\n"), "{host} runs {image}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_following_a_stream_takes_each_new_version_and_falls_back_on_deletion() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let isd = Daemon::imageserver(&bin("imageserver"), &t.join("imageserver"), &[]);
    let is = isd.addr.as_str();
    add_version(t, is, "dhcp/production/1", "1");
    // A sibling directory sharing the prefix, and a sub-directory: neither is followed.
    add_version(t, is, "dhcp/production-old/9", "x");
    add_version(t, is, "dhcp/production/canary/9", "x");
    let (_subd, root) = subd(t, "m1");
    let mdb = t.join("mdb.json");
    let m = s(&mdb);
    ok(
        "mdb",
        &[
            "--mdb",
            &m,
            "add",
            "m1",
            "--ip",
            &_subd.addr,
            "--required",
            "dhcp/production",
        ],
    );
    let mdb_text = std::fs::read_to_string(&mdb).unwrap();
    let (_dom, api) = dominator(&mdb, is);
    wait_synced(&api, "m1", "dhcp/production/1", &root, "1").await;
    let err = run_bin(
        "mdb",
        &["--mdb", &m, "rollback", "m1", "--image-server", is],
    )
    .unwrap_err();
    assert!(
        err.contains(
            "m1 follows image stream dhcp/production and it holds no version before its newest"
        ),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&mdb).unwrap(), mdb_text);

    // A new version: followed with no MDB edit, within a poll interval or two.
    add_version(t, is, "dhcp/production/2", "2");
    let added = Instant::now();
    wait_for(&api, "m1", "resolved the new version", |m| {
        m["resolved_required_image"] == "dhcp/production/2"
    })
    .await;
    let seen = added.elapsed();
    eprintln!("new stream version seen {seen:?} after its add (poll interval {POLL_MS} ms)");
    assert!(seen < Duration::from_millis(3 * POLL_MS + 2000), "{seen:?}");
    wait_synced(&api, "m1", "dhcp/production/2", &root, "2").await;
    assert_eq!(
        std::fs::read_to_string(&mdb).unwrap(),
        mdb_text,
        "no MDB edit"
    );
    let report = machine(&api, "m1").await;
    assert_eq!(report["required_image"], "dhcp/production", "{report:#}");
    assert_eq!(report["last_update"]["image_name"], "dhcp/production/2");

    // What the name resolved to, everywhere.
    let latest = ok(
        "imagetool",
        &["--image-server", is, "find-latest-image", "dhcp/production"],
    );
    assert_eq!(latest, "dhcp/production/2\n");
    let page = api.get_text("/machine/m1").await.unwrap();
    assert!(
        page.contains("dhcp/production \u{2192} dhcp/production/2 (stream)"),
        "{page}"
    );
    let plan = ok(
        "dominator",
        &[
            "plan",
            "--mdb",
            &m,
            "--image-server",
            is,
            "--permit-insecure-mode",
            "m1",
        ],
    );
    assert!(
        plan.starts_with("m1: RequiredImage dhcp/production is an image stream: its newest image is dhcp/production/2\nm1: image dhcp/production/2"),
        "{plan}"
    );

    let shown = ok("mdb", &["--mdb", &m, "show", "m1", "--image-server", is]);
    assert!(
        shown
            .ends_with("\nRequiredImage dhcp/production: image stream, newest dhcp/production/2\n"),
        "{shown}"
    );

    // `mdb rollback` pins the stream follower to the version it ran before...
    let o = ok(
        "mdb",
        &["--mdb", &m, "rollback", "m1", "--image-server", is],
    );
    assert_eq!(
        o,
        "m1: RequiredImage dhcp/production -> dhcp/production/1\n"
    );
    wait_synced(&api, "m1", "dhcp/production/1", &root, "1").await;
    // ... and a second rollback returns it to the stream.
    let o = ok("mdb", &["--mdb", &m, "rollback", "m1"]);
    assert_eq!(
        o,
        "m1: RequiredImage dhcp/production/1 -> dhcp/production\n"
    );
    wait_synced(&api, "m1", "dhcp/production/2", &root, "2").await;

    // A newer version that has already expired is refused by the imageserver (which
    // expires images itself: systest/tests/expiry.rs), so never followed.
    let client = wire::client::ImageServerClient::new(is, &ClientSecurity::Insecure).unwrap();
    let mut expired = client.get_image("dhcp/production/1").await.unwrap();
    expired.expires_at = Some(1);
    let refused = client
        .add_image("dhcp/production/3", &expired)
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(400), "{refused}");
    assert!(
        refused.to_string().contains("under the minimum"),
        "{refused}"
    );
    tokio::time::sleep(Duration::from_millis(5 * POLL_MS)).await;
    wait_synced(&api, "m1", "dhcp/production/2", &root, "2").await;
    let latest = ok(
        "imagetool",
        &["--image-server", is, "find-latest-image", "dhcp/production"],
    );
    assert_eq!(
        latest, "dhcp/production/2\n",
        "an expired version is not the latest"
    );
    let shown = ok("mdb", &["--mdb", &m, "show", "m1", "--image-server", is]);
    assert!(shown.ends_with("newest dhcp/production/2\n"), "{shown}");

    // The newest deleted: back to the previous version, never to nothing.
    ok(
        "imagetool",
        &["--image-server", is, "delete", "dhcp/production/2"],
    );
    wait_synced(&api, "m1", "dhcp/production/1", &root, "1").await;
    let latest = ok(
        "imagetool",
        &["--image-server", is, "find-latest-image", "dhcp/production"],
    );
    assert_eq!(latest, "dhcp/production/1\n");
    let err = run_bin(
        "imagetool",
        &["--image-server", is, "find-latest-image", "nothing/here"],
    )
    .unwrap_err();
    assert!(err.contains("no image in directory nothing/here"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_edit_over_three_hosts_converges_them_and_its_rollback_returns_them() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let isd = Daemon::imageserver(&bin("imageserver"), &t.join("imageserver"), &[]);
    let is = isd.addr.as_str();
    add_version(t, is, "app/1", "1");
    add_version(t, is, "app/2", "2");
    let mdb = t.join("mdb.json");
    let m = s(&mdb);
    let mut hosts = Vec::new();
    for (h, role) in [("w1", "web"), ("w2", "web"), ("w3", "web"), ("d1", "db")] {
        let (d, root) = subd(t, h);
        let tag = format!("role={role}");
        ok(
            "mdb",
            &[
                "--mdb",
                &m,
                "add",
                h,
                "--ip",
                &d.addr,
                "--required",
                "app/1",
                "--tag",
                &tag,
            ],
        );
        hosts.push((h, d, root));
    }
    let (_dom, api) = dominator(&mdb, is);
    for (h, _, root) in &hosts {
        wait_synced(&api, h, "app/1", root, "1").await;
    }

    // One edit for the group: all three move, the db host stays.
    let o = ok(
        "mdb",
        &[
            "--mdb",
            &m,
            "set",
            "--where",
            "role=web",
            "--required",
            "app/2",
        ],
    );
    assert!(o.ends_with("set 3 machines: w1, w2, w3\n"), "{o}");
    let id = o
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_matches(['#', ':'])
        .to_string();
    for (h, _, root) in &hosts[..3] {
        wait_synced(&api, h, "app/2", root, "2").await;
    }
    let d1 = machine(&api, "d1").await;
    assert_eq!(d1["resolved_required_image"], "app/1", "{d1:#}");
    assert_eq!(
        std::fs::read_to_string(hosts[3].2.join("etc/version")).unwrap(),
        "1\n"
    );

    // Its rollback, by edit id, returns all three as one edit.
    let o = ok("mdb", &["--mdb", &m, "rollback", "--entry", &id]);
    assert!(
        o.contains(&format!("undid edit #{id} on 3 machines")),
        "{o}"
    );
    for (h, _, root) in &hosts[..3] {
        wait_synced(&api, h, "app/1", root, "1").await;
    }
    let hist = ok("mdb", &["--mdb", &m, "history", "--where", "role=web"]);
    assert_eq!(hist.matches("rollback").count(), 3, "{hist}");
}
