//! Several imageservers over one S3 bucket (a real single-node Garage, `testkit::garage`),
//! kept safe and coherent (`imageserver::s3`'s module comment): unreferenced-object
//! deletion on one never breaks an add in progress on another, nor an image another added
//! that it has not seen yet; deletions, expiries and expiry changes made through one show
//! on the other within the refresh bound.
//!
//! Needs the workspace binaries (`cargo build --workspace --bins`) and Garage
//! (`scripts/install-garage.sh`).

use model::ObjectId;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use testkit::garage::Garage;
use testkit::{bin, run_bin, Daemon};

const PREFIX: &str = "site/gc";
/// `--s3-refresh-ms` of the servers that follow each other.
const REFRESH_MS: u64 = 200;
/// How long a change may take to show on the other server: the refresh interval plus a
/// listing, with room for a loaded 2-core machine.
const BOUND: Duration = Duration::from_secs(5);

/// The imageserver binary: `$S3GC_IMAGESERVER` when set (to run these tests against
/// another build, e.g. one without the protocol, and see them fail), else the workspace's.
fn imageserver_bin() -> std::path::PathBuf {
    match std::env::var_os("S3GC_IMAGESERVER") {
        Some(p) => p.into(),
        None => bin("imageserver"),
    }
}

/// An imageserver of `data` over Garage's bucket, with `extra` flags.
fn s3_imageserver(g: &Garage, data: &Path, extra: &[&str]) -> Daemon {
    let mut cmd = Command::new(imageserver_bin());
    cmd.args(["--data-dir", data.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--permit-insecure-mode"])
        .args(["--object-store", &format!("s3://{}/{PREFIX}", g.bucket)])
        .args(["--s3-endpoint", &g.endpoint])
        .args(extra)
        .envs(g.env());
    let (child, addr) = testkit::spawn_listening(&mut cmd);
    Daemon {
        child,
        addr: addr.to_string(),
    }
}

/// `imagetool --image-server ADDR ARGS…`: its stdout, or its stderr as the error.
fn it(addr: &str, args: &[&str]) -> Result<String, String> {
    let mut v = vec!["--image-server", addr];
    v.extend_from_slice(args);
    run_bin("imagetool", &v).map_err(|e| e.to_string())
}

/// Polls `done` every 50 ms for at most `BOUND`; returns how long it took.
fn within_bound(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < BOUND, "not {what} within {BOUND:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

/// Files shared by every image of the race, and one of the image's own.
const SHARED: usize = 150;

fn shared_content(j: usize) -> Vec<u8> {
    format!("shared file {j}\n").repeat(j % 5 + 1).into_bytes()
}

/// A tree of the `SHARED` files and one file of its own named after `own`.
fn raced_tree(dir: &Path, own: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for j in 0..SHARED {
        std::fs::write(dir.join(format!("s{j:04}")), shared_content(j)).unwrap();
    }
    std::fs::write(dir.join("own"), format!("only in {own}\n")).unwrap();
}

/// `imagetool get NAME` through `addr` into a fresh directory holds exactly the raced
/// tree's files (each object fetched and verified by imagetool on the way).
fn fetch_whole(addr: &str, name: &str, work: &Path) -> Result<(), String> {
    let dir = work.join(format!(
        "got-{}-{}",
        name.replace('/', "-"),
        addr.replace(':', "-")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    it(addr, &["get", name, dir.to_str().unwrap()]).map_err(|e| format!("get {name}: {e}"))?;
    for j in 0..SHARED {
        let p = dir.join(format!("s{j:04}"));
        if std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))? != shared_content(j) {
            return Err(format!("{}: other bytes", p.display()));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    Ok(())
}

/// Adds `name` of `tree` through `addr`, tried again (up to 5 times) when the deletion
/// took an object between the check and `AddImage` (a clean refusal, never a bad image).
fn add_retrying(addr: &str, name: &str, tree: &Path) -> usize {
    for attempt in 1..=5 {
        match it(addr, &["add", name, tree.to_str().unwrap(), "", ""]) {
            Ok(_) => return attempt,
            Err(e) => assert!(
                e.contains("not available") || e.contains("lapsed"),
                "add {name}: {e}"
            ),
        }
    }
    panic!("add {name}: never succeeded in 5 attempts");
}

/// Stops the collector however the rounds end.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Server A adds trees sharing their objects with an image being deleted through server
/// B, while B runs `delunrefobj 100 0` again and again: every image either server lists
/// is fetched whole through both, round after round.
#[test]
fn deletion_on_one_imageserver_racing_adds_on_another_never_breaks_a_listed_image() {
    const ROUNDS: usize = 4;
    let g = Garage::start();
    let t = tempfile::tempdir().unwrap();
    let flags = ["--s3-refresh-ms", "200", "--object-pin-seconds", "1"];
    let a = s3_imageserver(&g, &t.path().join("a"), &flags);
    let b = s3_imageserver(&g, &t.path().join("b"), &flags);
    let stop = AtomicBool::new(false);
    let collections = AtomicUsize::new(0);
    let collected = AtomicUsize::new(0);
    let mut retries = 0;
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let out = it(&b.addr, &["--json", "delunrefobj", "100", "0"])
                    .unwrap_or_else(|e| panic!("delunrefobj through B: {e}"));
                let v: serde_json::Value = serde_json::from_str(&out).unwrap();
                collected.fetch_add(
                    v["deleted"].as_u64().unwrap_or(0) as usize,
                    Ordering::Relaxed,
                );
                collections.fetch_add(1, Ordering::Relaxed);
            }
        });
        let _stop = StopOnDrop(&stop);
        for r in 0..ROUNDS {
            let base = format!("base/{r}");
            let tree = t.path().join(format!("tree-base-{r}"));
            raced_tree(&tree, &base);
            retries += add_retrying(&b.addr, &base, &tree) - 1;
            // B's own pins from that add run out: the shared objects become collectable
            // on B the moment base/r is deleted.
            std::thread::sleep(Duration::from_millis(1200));
            let name = format!("new/{r}");
            let tree = t.path().join(format!("tree-new-{r}"));
            raced_tree(&tree, &name);
            std::thread::scope(|s2| {
                s2.spawn(|| it(&b.addr, &["delete", &base]).expect("delete through B"));
                retries += add_retrying(&a.addr, &name, &tree) - 1;
            });
            fetch_whole(&a.addr, &name, t.path()).unwrap_or_else(|e| panic!("round {r}, A: {e}"));
            within_bound("listed by B", || {
                it(&b.addr, &["list"]).is_ok_and(|l| l.lines().any(|n| n == name))
            });
            fetch_whole(&b.addr, &name, t.path()).unwrap_or_else(|e| panic!("round {r}, B: {e}"));
            if r + 1 < ROUNDS {
                // Unreferenced again for the next round's race.
                it(&a.addr, &["delete", &name]).unwrap();
            }
        }
    });
    // Once the collector stopped: every image either lists is whole through both.
    for server in [&a.addr, &b.addr] {
        for name in it(server, &["list"]).unwrap().lines() {
            for through in [&a.addr, &b.addr] {
                fetch_whole(through, name, t.path()).unwrap_or_else(|e| {
                    panic!("{name} listed by {server}, through {through}: {e}")
                });
            }
        }
    }
    let (runs, gone) = (collections.into_inner(), collected.into_inner());
    eprintln!("{ROUNDS} rounds; {runs} delunrefobj runs through B deleted {gone} objects; {retries} adds retried");
    assert!(runs >= ROUNDS, "the collector ran {runs} times");
    assert!(
        gone > 0,
        "the collector never deleted anything: no race was run"
    );
}

/// An image another server added, which this one has not refreshed yet, keeps its
/// objects: the collector reads the bucket's images after its marker.
#[test]
fn a_collector_keeps_the_objects_of_an_image_it_has_not_seen_yet() {
    let g = Garage::start();
    let t = tempfile::tempdir().unwrap();
    // A pins nothing: its leases go as soon as its add ends.
    let a = s3_imageserver(
        &g,
        &t.path().join("a"),
        &["--s3-refresh-ms", "200", "--object-pin-seconds", "0"],
    );
    // B never refreshes on its own during the test, and pins nothing.
    let b = s3_imageserver(
        &g,
        &t.path().join("b"),
        &["--s3-refresh-ms", "600000", "--object-pin-seconds", "0"],
    );
    let tree = t.path().join("tree");
    raced_tree(&tree, "unseen/1");
    // Every object of the tree is on B, unreferenced there…
    it(&b.addr, &["add", "seed/1", tree.to_str().unwrap(), "", ""]).unwrap();
    it(&b.addr, &["delete", "seed/1"]).unwrap();
    let unref = it(&b.addr, &["listunrefobj"]).unwrap();
    assert_eq!(unref.lines().count(), SHARED + 1, "{unref}");
    // …and an image through A refers to them all; then A's leases are gone.
    it(
        &a.addr,
        &["add", "unseen/1", tree.to_str().unwrap(), "", ""],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(2 * REFRESH_MS));
    assert!(
        !it(&b.addr, &["list"]).unwrap().contains("unseen/1"),
        "B was not to have refreshed yet"
    );
    let out = it(&b.addr, &["--json", "delunrefobj", "100", "0"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["deleted"], 0, "B deleted objects of A's image: {out}");
    fetch_whole(&a.addr, "unseen/1", t.path()).unwrap();
    // The collection took the image in: B lists and serves it.
    fetch_whole(&b.addr, "unseen/1", t.path()).unwrap();
}

/// A deletion and an expiry through A show on B within the refresh bound, with the same
/// statuses; B's reference counts follow (the deleted image's own object is unreferenced
/// Two imageservers over `g`'s bucket that see each other's changes within 200 ms and
/// accept a 2 s expiry.
fn quick_pair(g: &Garage, dir: &Path) -> (Daemon, Daemon) {
    let flags = ["--s3-refresh-ms", "200", "--min-expiry-secs", "2"];
    let a = s3_imageserver(g, &dir.join("a"), &flags);
    let b = s3_imageserver(g, &dir.join("b"), &flags);
    (a, b)
}

/// there) and the names stay never reusable through B.
#[test]
fn deletions_and_expiries_through_one_imageserver_show_on_the_other() {
    let g = Garage::start();
    let t = tempfile::tempdir().unwrap();
    let (a, b) = quick_pair(&g, t.path());
    let tree = t.path().join("tree");
    raced_tree(&tree, "app/1");
    let src = tree.to_str().unwrap();
    it(&a.addr, &["add", "app/1", src, "", ""]).unwrap();
    within_bound("app/1 listed by B", || {
        it(&b.addr, &["list"]).is_ok_and(|l| l == "app/1\n")
    });
    let own = ObjectId::of(b"only in app/1\n").to_hex();
    assert!(!it(&b.addr, &["listunrefobj"]).unwrap().contains(&own));

    it(&a.addr, &["delete", "app/1"]).unwrap();
    let took = within_bound("app/1 gone from B's list", || {
        it(&b.addr, &["list"]).is_ok_and(|l| l.is_empty())
    });
    eprintln!("a deletion through A showed on B after {took:?}");
    let (ea, eb) = (
        it(&a.addr, &["show", "app/1"]).unwrap_err(),
        it(&b.addr, &["show", "app/1"]).unwrap_err(),
    );
    assert!(eb.contains("does not exist") && eb.contains("404"), "{eb}");
    assert_eq!(ea, eb);
    assert!(it(&b.addr, &["listunrefobj"]).unwrap().contains(&own));
    let again = it(&b.addr, &["add", "app/1", src, "", ""]).unwrap_err();
    assert!(again.contains("never reused"), "{again}");

    // An expiry: the image is gone from both with 410, its name kept.
    it(
        &a.addr,
        &["add", "--expires-in", "3s", "short/1", src, "", ""],
    )
    .unwrap();
    within_bound("short/1 listed by B", || {
        it(&b.addr, &["list"]).is_ok_and(|l| l.contains("short/1"))
    });
    std::thread::sleep(Duration::from_secs(3));
    within_bound("short/1 gone from B's list", || {
        it(&b.addr, &["list"]).is_ok_and(|l| l.is_empty())
    });
    let eb = it(&b.addr, &["get-image-expiration", "short/1"]).unwrap_err();
    assert!(eb.contains("image short/1 expired (HTTP 410)"), "{eb}");
    assert_eq!(
        it(&a.addr, &["get-image-expiration", "short/1"]).unwrap_err(),
        eb
    );
}

/// `change-image-expiration` through A shows in B's `get-image-expiration` within the
/// refresh bound, and B still serves the rewritten image (its checksum taken in too).
#[test]
fn an_expiry_change_through_one_imageserver_shows_on_the_other() {
    let g = Garage::start();
    let t = tempfile::tempdir().unwrap();
    let (a, b) = quick_pair(&g, t.path());
    let tree = t.path().join("tree");
    raced_tree(&tree, "app/2");
    let src = tree.to_str().unwrap();
    it(
        &a.addr,
        &["add", "--expires-in", "1h", "app/2", src, "", ""],
    )
    .unwrap();
    let before = it(&a.addr, &["get-image-expiration", "app/2"]).unwrap();
    within_bound("app/2 listed by B with its expiry", || {
        it(&b.addr, &["get-image-expiration", "app/2"]).is_ok_and(|e| e == before)
    });
    it(&a.addr, &["change-image-expiration", "app/2", "2h"]).unwrap();
    let later = it(&a.addr, &["get-image-expiration", "app/2"]).unwrap();
    assert_ne!(later, before);
    let took = within_bound("the new expiry on B", || {
        it(&b.addr, &["get-image-expiration", "app/2"]).is_ok_and(|e| e == later)
    });
    eprintln!("an expiry change through A showed on B after {took:?}");
    it(&a.addr, &["change-image-expiration", "app/2", "never"]).unwrap();
    within_bound("never on B", || {
        it(&b.addr, &["get-image-expiration", "app/2"]).is_ok_and(|e| e == "never\n")
    });
    // B serves the rewritten image, verified against its new checksum.
    fetch_whole(&b.addr, "app/2", t.path()).unwrap();
    let page = it(&b.addr, &["show", "app/2"]).unwrap();
    assert!(!page.contains("corrupt"), "{page}");
}

/// The protocol's cost, by hand (`S3GC_IMAGESERVER=PATH` runs another imageserver binary,
/// e.g. one built without it): times an add of `COST_FILES` new files, an add of the same
/// files again (all present), and the `delunrefobj 100 0` of them all, on one server.
/// `cargo test -p systest --test s3_gc -- --ignored --nocapture cost`
#[test]
#[ignore]
fn cost() {
    const COST_FILES: usize = 2000;
    let g = Garage::start();
    let t = tempfile::tempdir().unwrap();
    let server = imageserver_bin();
    let mut cmd = Command::new(&server);
    cmd.args(["--data-dir", t.path().join("data").to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--permit-insecure-mode"])
        .args(["--object-store", &format!("s3://{}/{PREFIX}", g.bucket)])
        .args(["--s3-endpoint", &g.endpoint, "--object-pin-seconds", "0"])
        .envs(g.env());
    let (child, addr) = testkit::spawn_listening(&mut cmd);
    let _d = Daemon {
        child,
        addr: addr.to_string(),
    };
    let addr = addr.to_string();
    let tree = t.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    for j in 0..COST_FILES {
        std::fs::write(tree.join(format!("f{j:05}")), format!("cost file {j}\n")).unwrap();
    }
    let src = tree.to_str().unwrap();
    let time = |args: &[&str]| {
        let t0 = Instant::now();
        it(&addr, args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        t0.elapsed()
    };
    let fresh = time(&["add", "cost/1", src, "", ""]);
    let again = time(&["add", "cost/2", src, "", ""]);
    it(&addr, &["delete", "cost/1"]).unwrap();
    it(&addr, &["delete", "cost/2"]).unwrap();
    let gc = time(&["delunrefobj", "100", "0"]);
    let empty_gc = time(&["delunrefobj", "100", "0"]);
    eprintln!(
        "{}: add of {COST_FILES} new files {fresh:.2?}, again (all present) {again:.2?}, delunrefobj of them {gc:.2?}, of nothing {empty_gc:.2?}",
        server.display()
    );
}
