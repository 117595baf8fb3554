//! Image expiry (issue 14 §4) end to end, with the real binaries (imageserver, subd,
//! dominator, imagetool, mdb; insecure on loopback). The imageserver's hidden testing knob
//! `--min-expiry-secs` lowers the 15-minute minimum so an image can expire within the
//! test; the clock is real.
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

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A directory holding `/etc/shared` (the same in every image) and `/etc/own` = `own`.
fn source(t: &Path, name: &str, own: &str) -> String {
    let src = t.join(format!("src-{}", name.replace('/', "-")));
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/shared"), "shared by every image\n").unwrap();
    std::fs::write(src.join("etc/own"), own).unwrap();
    s(&src)
}

fn client(addr: &str, port: u16, name: &str) -> RpcClient {
    RpcClient::new(
        addr,
        port,
        &ClientSecurity::Insecure,
        name,
        Some(Duration::from_secs(30)),
    )
    .unwrap()
}

/// Waits until `what` holds, polling every 100 ms.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < WAIT, "never {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_image_disappears_keeps_its_name_and_frees_its_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = t.join("imageserver");
    let mut isd = Daemon::imageserver(&bin("imageserver"), &data, &["--min-expiry-secs", "2"]);
    let is = isd.addr.clone();
    let it = |args: &[&str]| {
        let mut v = vec!["--image-server", is.as_str()];
        v.extend_from_slice(args);
        run_bin("imagetool", &v)
    };

    // Too short for this server: one line, nothing sent.
    let src = source(t, "short/1", "only in short/1\n");
    let err = it(&["add", "--expires-in", "1s", "short/1", &src, "", ""]).unwrap_err();
    assert_eq!(
        err.trim(),
        "imagetool: --expires-in: expiry in 1 s is under the minimum of 2 s"
    );
    let err = it(&["add", "--expires-in", "soon", "short/1", &src, "", ""]).unwrap_err();
    assert!(err.contains("bad duration \"soon\""), "{err}");
    assert_eq!(ok("imagetool", &["--image-server", &is, "list"]), "");

    it(&["add", "keep/1", &source(t, "keep/1", "keep\n"), "", ""]).unwrap();
    it(&["add", "--expires-in", "6s", "short/1", &src, "", ""]).unwrap();
    let long_src = source(t, "long/1", "only in long/1\n");
    it(&["add", "--expires-in", "6s", "long/1", &long_src, "", ""]).unwrap();
    assert_eq!(it(&["list"]).unwrap(), "keep/1\nlong/1\nshort/1\n");
    assert_eq!(it(&["get-image-expiration", "keep/1"]).unwrap(), "never\n");
    let when = it(&["get-image-expiration", "short/1"]).unwrap();
    assert!(when.ends_with(" UTC\n"), "{when}");
    // Never expires after all; and expiry is only ever extended.
    it(&["change-image-expiration", "long/1", "never"]).unwrap();
    assert_eq!(it(&["get-image-expiration", "long/1"]).unwrap(), "never\n");
    let err = it(&["change-image-expiration", "long/1", "1h"]).unwrap_err();
    assert!(err.contains("the image never expires"), "{err}");
    // The status page lists what expires within a day.
    let page = client(&is, 6971, "imageserver")
        .get_text("/")
        .await
        .unwrap();
    assert!(page.contains("Expiring within a day: 1"), "{page}");
    assert!(page.contains("<td>short/1</td>"), "{page}");

    // A machine requiring it, through the real dominator.
    let root = t.join("m1");
    std::fs::create_dir_all(&root).unwrap();
    let subd = Daemon::subd(&bin("subd"), &s(&root), &[]);
    let mdb = t.join("mdb.json");
    ok(
        "mdb",
        &[
            "--mdb",
            &s(&mdb),
            "add",
            "m1",
            "--ip",
            &subd.addr,
            "--required",
            "short/1",
        ],
    );
    let dom = Daemon::dominator(&bin("dominator"), &s(&mdb), &is, 300);
    let api = client(&dom.addr, 6970, "dominator");

    // It expires: gone from the list, its name kept, its own object unreferenced.
    wait_until("short/1 expired", || {
        it(&["list"]).unwrap() == "keep/1\nlong/1\n"
    })
    .await;
    let err = it(&["add", "short/1", &src, "", ""]).unwrap_err();
    assert_eq!(
        err.trim(),
        "imagetool: image short/1 expired; image names are never reused"
    );
    let err = it(&["get-image-expiration", "short/1"]).unwrap_err();
    assert!(err.contains("image short/1 expired (HTTP 410)"), "{err}");
    let own = model::ObjectId::of(b"only in short/1\n").to_hex();
    let shared = model::ObjectId::of(b"shared by every image\n").to_hex();
    wait_until("its object is unreferenced", || {
        it(&["listunrefobj"]).unwrap().contains(&own)
    })
    .await;
    assert!(!it(&["listunrefobj"]).unwrap().contains(&shared));
    let report = loop {
        let text = api.get_text("/api/machines/m1").await.unwrap_or_default();
        let m: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if m["status_name"] == "image not ready"
            && m["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("expired"))
        {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(report["last_error"], "image short/1 expired", "{report:#}");

    // After a restart: still gone, still refused, the others as they were (no pin: a
    // restart pins recently unreferenced objects for the grace period).
    isd.kill9();
    let isd = Daemon::imageserver(
        &bin("imageserver"),
        &data,
        &["--min-expiry-secs", "2", "--object-pin-seconds", "0"],
    );
    let is = isd.addr.as_str();
    let again = |args: &[&str]| {
        let mut v = vec!["--image-server", is];
        v.extend_from_slice(args);
        run_bin("imagetool", &v)
    };
    assert_eq!(again(&["list"]).unwrap(), "keep/1\nlong/1\n");
    assert_eq!(
        again(&["get-image-expiration", "long/1"]).unwrap(),
        "never\n"
    );
    let err = again(&["add", "short/1", &src, "", ""]).unwrap_err();
    assert!(
        err.contains("expired; image names are never reused"),
        "{err}"
    );
    assert!(again(&["listunrefobj"]).unwrap().contains(&own));
    again(&["delunrefobj", "100", "0"]).unwrap();
    assert!(!again(&["listunrefobj"]).unwrap().contains(&own));
    assert!(again(&["show", "long/1"]).unwrap().contains("/etc/own"));
}

#[test]
fn the_default_minimum_is_fifteen_minutes() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let isd = Daemon::imageserver(&bin("imageserver"), &t.join("imageserver"), &[]);
    let src = source(t, "a/1", "a\n");
    let err = run_bin(
        "imagetool",
        &[
            "--image-server",
            &isd.addr,
            "add",
            "--expires-in",
            "14m59s",
            "a/1",
            &src,
            "",
            "",
        ],
    )
    .unwrap_err();
    assert_eq!(
        err.trim(),
        "imagetool: --expires-in: expiry in 899 s is under the minimum of 900 s"
    );
    ok(
        "imagetool",
        &[
            "--image-server",
            &isd.addr,
            "add",
            "--expires-in",
            "15m",
            "a/1",
            &src,
            "",
            "",
        ],
    );
}
