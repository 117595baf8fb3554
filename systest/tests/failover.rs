//! Clients that fail over across imageservers (issue 14 §2), with the real binaries on
//! loopback: subd fetching from `--image-server A,B` converges when A's reply breaks off
//! in the middle of the fetch (a proxy cuts it, as A dying would); imagetool moves past a first server that refuses connections or answers
//! 5xx, but a 4xx from it is the answer. The two imageservers here hold their own copies
//! of the same images (added to both); `s3_cluster.rs` kills one of two imageservers over one
//! Garage bucket mid-fetch and mid-upload.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins`.

use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::run_bin_ok as ok;
use testkit::{bin, run_bin, Daemon, Fault, FaultProxy};
use wire::client::{ClientSecurity, SubdClient};

/// Generous: CI is a 2-core machine shared with compilers.
const WAIT: Duration = Duration::from_secs(120);

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A directory of `files` files of `size` bytes each, all different.
fn tree(t: &Path, name: &str, files: usize, size: usize) -> String {
    let dir = t.join(name);
    std::fs::create_dir_all(dir.join("payload")).unwrap();
    for i in 0..files {
        let bytes = testkit::tree::noise(i as u64 + 1, size);
        std::fs::write(dir.join(format!("payload/f{i}")), bytes).unwrap();
    }
    s(&dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subd_converges_when_its_first_imageserver_breaks_off_mid_fetch() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let a = Daemon::imageserver(&bin("imageserver"), &t.join("a"), &[]);
    let b = Daemon::imageserver(&bin("imageserver"), &t.join("b"), &[]);
    let src = tree(t, "src", 8, 256 * 1024);
    for is in [&a.addr, &b.addr] {
        ok(
            "imagetool",
            &["--image-server", is, "add", "app/1", &src, "", ""],
        );
    }
    // The subd reaches A through a proxy that cuts every reply after 300 kB: the fetch's
    // first batch breaks off there, part-way through its objects.
    let cut = FaultProxy::start(a.addr.parse().unwrap(), Fault::TruncateReply(300_000)).await;
    let root = t.join("m1");
    std::fs::create_dir_all(&root).unwrap();
    let servers = format!("{},{}", cut.addr, b.addr);
    let subd = Daemon::subd(&bin("subd"), &s(&root), &["--image-server", &servers]);
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
            "app/1",
        ],
    );
    let dom_servers = format!("{},{}", a.addr, b.addr);
    let dom = Daemon::dominator(&bin("dominator"), &s(&mdb), &dom_servers, 300);
    let api = dom.dominator_api();
    let t0 = Instant::now();
    loop {
        let text = api.get_text("/api/machines/m1").await.unwrap_or_default();
        let m: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if m["status_name"] == "synced" {
            break;
        }
        assert!(t0.elapsed() < WAIT, "m1 never synced: {m:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cut.connections() > 0, "the fetch went to A first");
    let sc = SubdClient::new(&subd.addr, &ClientSecurity::Insecure, None).unwrap();
    let p = sc.poll(&Default::default()).await.unwrap();
    assert_eq!(p.last_fetch_error, None, "the fetch itself succeeded");
    for i in 0..8 {
        let f = format!("payload/f{i}");
        assert_eq!(
            std::fs::read(root.join(&f)).unwrap(),
            std::fs::read(Path::new(&src).join(&f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn imagetool_moves_past_a_dead_or_failing_first_server_but_not_past_a_4xx() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let a = Daemon::imageserver(&bin("imageserver"), &t.join("a"), &[]);
    let b = Daemon::imageserver(&bin("imageserver"), &t.join("b"), &[]);
    let closed = testkit::net::ClosedPort::new();
    let src = tree(t, "src", 2, 1000);

    // The first refuses connections: the add goes to the second.
    let dead_first = format!("{},{}", closed.addr, b.addr);
    ok(
        "imagetool",
        &["--image-server", &dead_first, "add", "app/1", &src, "", ""],
    );
    assert_eq!(
        ok("imagetool", &["--image-server", &b.addr, "list"]),
        "app/1\n"
    );
    assert_eq!(
        ok("imagetool", &["--image-server", &dead_first, "list"]),
        "app/1\n"
    );

    // The first answers 500: the same.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let failing = rt.block_on(FaultProxy::start(a.addr.parse().unwrap(), Fault::Status500));
    let failing_first = format!("{},{}", failing.addr, b.addr);
    assert_eq!(
        ok("imagetool", &["--image-server", &failing_first, "list"]),
        "app/1\n"
    );
    assert!(failing.connections() > 0, "the first server was tried");

    // The first answers 404 (it lacks the image the second holds): that is the answer.
    let both = format!("{},{}", a.addr, b.addr);
    let err = run_bin("imagetool", &["--image-server", &both, "show", "app/1"]).unwrap_err();
    assert!(
        err.contains("image app/1 does not exist (HTTP 404)"),
        "{err}"
    );
    // …and a 409 likewise: the name is taken on the first, not added on the second.
    ok(
        "imagetool",
        &["--image-server", &a.addr, "add", "app/2", &src, "", ""],
    );
    let err = run_bin(
        "imagetool",
        &["--image-server", &both, "add", "app/2", &src, "", ""],
    )
    .unwrap_err();
    assert!(err.contains("app/2 already exists"), "{err}");
    assert_eq!(
        ok("imagetool", &["--image-server", &b.addr, "list"]),
        "app/1\n"
    );
}
