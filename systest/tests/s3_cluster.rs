//! Imageservers over Garage when something dies (issue 14 §1, §2), with the real binaries
//! on loopback and a real Garage (`testkit::garage`; a test fails, never skips, without
//! it):
//! - a three-node Garage cluster with three replicas, two imageservers each on its own
//!   node, a dominator and three subds: a Garage node SIGKILLed in the middle of a rollout
//!   (one MDB edit) loses no image and no object, and the fleet converges;
//! - two imageservers over one bucket: the one a subd fetches from is SIGKILLed mid-fetch
//!   and the machine converges from the other; the one `imagetool add` uploads to is
//!   SIGKILLed mid-upload and the add completes on the other.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins`.

use model::{frame, Image, ObjectId};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use testkit::garage::{Garage, GarageCluster};
use testkit::run_bin_ok as ok;
use testkit::{bin, Daemon};
use wire::client::{ClientSecurity, ImageServerClient, RpcClient, SubdClient};

/// Generous: CI is a 2-core machine shared with compilers, and Garage is a debug build.
const WAIT: Duration = Duration::from_secs(180);
const PREFIX: &str = "fleet";

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// An imageserver of `data` over the bucket `images` at the S3 `endpoint`.
fn s3_imageserver(endpoint: &str, env: Vec<(&'static str, String)>, data: &Path) -> Daemon {
    let mut cmd = Command::new(bin("imageserver"));
    cmd.args(["--data-dir", &s(data)])
        .args(["--listen", "127.0.0.1:0", "--permit-insecure-mode"])
        .args(["--object-store", &format!("s3://images/{PREFIX}")])
        .args(["--s3-endpoint", endpoint])
        .args(["--s3-refresh-ms", "200"])
        .envs(env);
    let (child, addr) = testkit::spawn_listening(&mut cmd);
    Daemon {
        child,
        addr: addr.to_string(),
    }
}

fn client(addr: &str) -> ImageServerClient {
    ImageServerClient::new(addr, &ClientSecurity::Insecure).unwrap()
}

/// A counter of an imageserver's `/metrics` (`NAME` or `NAME_total`; 0 while it cannot
/// be read).
async fn metric(addr: &str, name: &str) -> u64 {
    let text = client(addr)
        .rpc
        .get_text("/metrics")
        .await
        .unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = rest.strip_prefix("_total").unwrap_or(rest);
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or(0)
}

/// A directory with `etc/version` and `files` files of `size` bytes each, all different
/// (and different per `version`).
fn tree(t: &Path, version: &str, files: usize, size: usize) -> PathBuf {
    let dir = t.join(format!("src-{version}"));
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::create_dir_all(dir.join("payload")).unwrap();
    std::fs::write(dir.join("etc/version"), format!("{version}\n")).unwrap();
    let seed = version.bytes().fold(7u64, |a, b| a * 131 + b as u64);
    for i in 0..files {
        let bytes = testkit::tree::noise(i as u64 + seed, size);
        std::fs::write(dir.join(format!("payload/f{i}")), bytes).unwrap();
    }
    dir
}

/// `imagetool add NAME DIR` through `servers`; the image as `servers` then serve it.
async fn add(servers: &str, name: &str, dir: &Path) -> Image {
    ok(
        "imagetool",
        &["--image-server", servers, "add", name, &s(dir), "", ""],
    );
    client(servers).get_image(name).await.unwrap()
}

/// Fetches every object of `images` from the imageserver `addr` and checks each against
/// its SHA-512; returns how many.
async fn fetch_all_verified(addr: &str, images: &[&Image]) -> usize {
    let mut ids: Vec<ObjectId> = images
        .iter()
        .flat_map(|i| i.objects().into_keys())
        .collect();
    ids.sort();
    ids.dedup();
    let resp = client(addr).get_objects(&ids).await.unwrap();
    let body = resp.bytes().await.unwrap();
    let mut r = std::io::Cursor::new(body.as_ref());
    for want in &ids {
        let (id, len) = frame::read_header(&mut r)
            .unwrap()
            .expect("a frame per object");
        assert_eq!(id, *want, "{addr}: objects in request order");
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).unwrap();
        assert_eq!(ObjectId::of(&data), id, "{addr}: object {id} verified");
    }
    assert_eq!(
        frame::read_header(&mut r).unwrap(),
        None,
        "{addr}: nothing more"
    );
    ids.len()
}

/// Waits until `addr` lists every one of `names`.
async fn wait_listed(addr: &str, names: &[&str]) {
    let t0 = Instant::now();
    loop {
        let listed = client(addr).list_images(None).await.unwrap_or_default();
        if names.iter().all(|n| listed.iter().any(|l| l == n)) {
            return;
        }
        assert!(t0.elapsed() < WAIT, "{addr} lists only {listed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/api/machines/HOST` as JSON (`Null` while it cannot be read).
async fn machine(api: &RpcClient, host: &str) -> Value {
    let text = api
        .get_text(&format!("/api/machines/{host}"))
        .await
        .unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Waits until the dominator reports `host` synced on `image`, and checks its root holds
/// `src` path by path.
async fn wait_synced(api: &RpcClient, host: &str, image: &str, root: &Path, src: &Path) {
    let t0 = Instant::now();
    loop {
        let m = machine(api, host).await;
        if m["status_name"] == "synced" && m["resolved_required_image"] == image {
            break;
        }
        assert!(t0.elapsed() < WAIT, "{host} never synced on {image}: {m:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        testkit::tree::listing(root),
        testkit::tree::listing(src),
        "{host}'s root is {image}, path by path"
    );
}

/// Whether `root` holds `src` path by path.
fn holds(root: &Path, src: &Path) -> bool {
    testkit::tree::listing(root) == testkit::tree::listing(src)
}

/// The sum of a counter over several imageservers.
async fn total(addrs: &[&str], name: &str) -> u64 {
    let mut n = 0;
    for a in addrs {
        n += metric(a, name).await;
    }
    n
}

/// A Garage cluster of three nodes and three replicas; imageserver A over node 0, B over
/// node 1; node 2 holds replicas only. Three subds (m1 and m3 try A first, m2 B first)
/// run app/1; one MDB edit rolls them to app/2, and node 2 is SIGKILLed once the rollout's
/// objects are flowing, before any machine holds app/2. Every image stays listed by both
/// imageservers (and by a new one started with an empty data directory), every object of
/// both images is fetched from each and verified, and the fleet converges on app/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garage_node_killed_mid_rollout_loses_nothing_and_the_fleet_converges() {
    let mut cluster = GarageCluster::start();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let a = s3_imageserver(cluster.endpoint(0), cluster.env(), &t.join("a"));
    let b = s3_imageserver(cluster.endpoint(1), cluster.env(), &t.join("b"));
    let (src1, src2) = (tree(t, "1", 4, 4096), tree(t, "2", 16, 1 << 20));
    let v1 = add(&a.addr, "app/1", &src1).await;
    let v2 = add(&a.addr, "app/2", &src2).await;
    wait_listed(&b.addr, &["app/1", "app/2"]).await;

    let mdb = t.join("mdb.json");
    let mut hosts = Vec::new();
    for (h, order) in [("m1", "a,b"), ("m2", "b,a"), ("m3", "a,b")] {
        let root = t.join(h);
        std::fs::create_dir_all(&root).unwrap();
        let servers = order.replace('a', &a.addr).replace('b', &b.addr);
        let d = Daemon::subd(
            &bin("subd"),
            &s(&root),
            &["--image-server", &servers, "--scan-speed-percent", "100"],
        );
        let args = ["--mdb", &s(&mdb), "add", h, "--ip", &d.addr];
        let args = [&args[..], &["--required", "app/1", "--tag", "role=web"]].concat();
        ok("mdb", &args);
        hosts.push((h, d, root));
    }
    let servers = format!("{},{}", a.addr, b.addr);
    let dom = Daemon::dominator(&bin("dominator"), &s(&mdb), &servers, 300);
    let api = dom.dominator_api();
    for (h, _, root) in &hosts {
        wait_synced(&api, h, "app/1", root, &src1).await;
    }

    // The rollout: one MDB edit. Node 2 dies once its objects are flowing.
    let both = [a.addr.as_str(), b.addr.as_str()];
    let before = total(&both, "imageserver_objects_served").await;
    let args = ["--mdb", &s(&mdb), "set", "--where", "role=web"];
    ok("mdb", &[&args[..], &["--required", "app/2"]].concat());
    let t0 = Instant::now();
    while total(&both, "imageserver_objects_served").await == before {
        assert!(t0.elapsed() < WAIT, "the rollout never fetched an object");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.kill9(2);
    let done_at_kill = hosts.iter().filter(|(_, _, r)| holds(r, &src2)).count();
    eprintln!(
        "garage node 2 killed {:?} after the MDB edit, {done_at_kill} of 3 machines on app/2",
        t0.elapsed()
    );
    assert!(
        done_at_kill < hosts.len(),
        "the kill landed after the rollout"
    );

    for (h, _, root) in &hosts {
        wait_synced(&api, h, "app/2", root, &src2).await;
    }
    eprintln!("fleet on app/2 {:?} after the MDB edit", t0.elapsed());
    // Every image listed, every object fetchable and verified, through both imageservers
    // and through one started afresh over the two surviving nodes.
    let c = s3_imageserver(cluster.endpoint(0), cluster.env(), &t.join("c"));
    let want = v1.objects().len() + v2.objects().len();
    for is in [&a.addr, &b.addr, &c.addr] {
        wait_listed(is, &["app/1", "app/2"]).await;
        assert_eq!(client(is).get_image("app/2").await.unwrap(), v2);
        assert_eq!(fetch_all_verified(is, &[&v1, &v2]).await, want);
    }
}

/// Two imageservers over one bucket and a subd of `--image-server A,B`: A is SIGKILLed
/// once it has begun serving the fetch; B serves the rest (its counter proves the fetch
/// was unfinished) and the machine converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imageserver_killed_mid_fetch_over_one_bucket_and_the_machine_converges() {
    let g = Garage::start();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let mut a = s3_imageserver(&g.endpoint, g.env(), &t.join("a"));
    let b = s3_imageserver(&g.endpoint, g.env(), &t.join("b"));
    let src = tree(t, "1", 48, 1 << 20);
    let image = add(&a.addr, "app/1", &src).await;
    wait_listed(&b.addr, &["app/1"]).await;

    let root = t.join("m1");
    std::fs::create_dir_all(&root).unwrap();
    let servers = format!("{},{}", a.addr, b.addr);
    let subd = Daemon::subd(
        &bin("subd"),
        &s(&root),
        &["--image-server", &servers, "--scan-speed-percent", "100"],
    );
    let mdb = t.join("mdb.json");
    let args = ["--mdb", &s(&mdb), "add", "m1", "--ip", &subd.addr];
    ok("mdb", &[&args[..], &["--required", "app/1"]].concat());
    let dom = Daemon::dominator(&bin("dominator"), &s(&mdb), &servers, 300);
    let t0 = Instant::now();
    while metric(&a.addr, "imageserver_objects_served").await == 0 {
        assert!(t0.elapsed() < WAIT, "A never began serving the fetch");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.kill9();
    let objects = image.objects().len() as u64;
    eprintln!("imageserver A killed {:?} into the fetch", t0.elapsed());

    wait_synced(&dom.dominator_api(), "m1", "app/1", &root, &src).await;
    let from_b = metric(&b.addr, "imageserver_objects_served").await;
    eprintln!("B served {from_b} of {objects} objects");
    assert!(from_b > 0, "A was killed before the fetch was done");
    let sc = SubdClient::new(&subd.addr, &ClientSecurity::Insecure, None).unwrap();
    let p = sc.poll(&Default::default()).await.unwrap();
    assert_eq!(p.last_fetch_error, None, "the fetch itself succeeded");
}

/// `imagetool add` through `A,B` over one bucket: A is SIGKILLed once part of the tree is
/// stored; the add moves to B, which is sent only what the bucket lacks, and completes;
/// B serves the image and every object, verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imagetool_add_moves_to_the_next_imageserver_when_the_first_dies_mid_upload() {
    let g = Garage::start();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let mut a = s3_imageserver(&g.endpoint, g.env(), &t.join("a"));
    let b = s3_imageserver(&g.endpoint, g.env(), &t.join("b"));
    // Six 32 MiB batches on two streams: after the first is stored, at least three are
    // still to go, however slow the machine (with two, both could end together).
    let files = 192;
    let src = tree(t, "1", files, 1 << 20);
    let servers = format!("{},{}", a.addr, b.addr);
    let add = Command::new(bin("imagetool"))
        .args(["--image-server", &servers, "add", "app/1", &s(&src), "", ""])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let stored = loop {
        let n = metric(&a.addr, "imageserver_objects_received").await;
        if n > 0 {
            break n;
        }
        assert!(t0.elapsed() < WAIT, "A never stored an object");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    a.kill9();
    eprintln!("imageserver A killed after storing {stored} objects");
    assert!(
        stored < files as u64,
        "the kill landed before the upload ended"
    );
    let out = tokio::task::spawn_blocking(move || add.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "imagetool add failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_b = metric(&b.addr, "imageserver_objects_received").await;
    eprintln!("B stored {from_b} objects");
    assert!(from_b > 0, "B received the rest");
    let image = client(&b.addr).get_image("app/1").await.unwrap();
    assert_eq!(image.objects().len(), files + 1);
    assert_eq!(fetch_all_verified(&b.addr, &[&image]).await, files + 1);
    // A machine born from B holds the tree.
    let root = t.join("m1");
    std::fs::create_dir_all(&root).unwrap();
    let subd = Daemon::subd(
        &bin("subd"),
        &s(&root),
        &["--image-server", &b.addr, "--scan-speed-percent", "100"],
    );
    let mdb = t.join("mdb.json");
    let args = ["--mdb", &s(&mdb), "add", "m1", "--ip", &subd.addr];
    ok("mdb", &[&args[..], &["--required", "app/1"]].concat());
    let dom = Daemon::dominator(&bin("dominator"), &s(&mdb), &b.addr, 300);
    wait_synced(&dom.dominator_api(), "m1", "app/1", &root, &src).await;
}
