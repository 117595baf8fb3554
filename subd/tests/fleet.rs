//! A real imageserver and a real subd, both on 127.0.0.1:0, with a temp directory as root:
//! images are built from directories with `disk::scan` and uploaded (objects + image)
//! the way imagetool does; plans come from the shared diff; subd fetches from the
//! imageserver. Faults: imageserver down, answering 500, truncating, serving bad bytes.

use disk::scan::{scan, ScanOptions};
use model::api::{FetchRequest, PollRequest, PollResponse, UpdateRequest};
use model::diff::DiffOptions;
use model::{Filter, Image, ObjectId, Triggers};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use subd::{Config, Subd};
use testkit::{Fault, FaultProxy};
use wire::client::{ClientSecurity, ImageServerClient, SubdClient};

struct Fleet {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    server: String,
    images: ImageServerClient,
    subd: SubdClient,
    state: Arc<Subd>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.state.shutdown();
    }
}

async fn fleet() -> Fleet {
    fleet_with(|_| {}).await
}

async fn fleet_with(configure: impl FnOnce(&mut Config)) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let data = dir.path().join("imageserver");
    std::fs::create_dir_all(&root).unwrap();
    let st = imageserver::State::open(&data, wire::http::Security::Insecure).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = l.local_addr().unwrap().to_string();
    tokio::spawn(imageserver::serve(l, st, std::future::pending()));
    let mut config = Config::new(&root);
    configure(&mut config);
    let state = Subd::start(config).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let subd_addr = l.local_addr().unwrap().to_string();
    tokio::spawn(subd::serve(l, state.clone(), std::future::pending()));
    Fleet {
        images: ImageServerClient::new(&server, &ClientSecurity::Insecure).unwrap(),
        subd: SubdClient::new(
            &subd_addr,
            &ClientSecurity::Insecure,
            Some(Duration::from_secs(60)),
        )
        .unwrap(),
        _dir: dir,
        root,
        data,
        server,
        state,
    }
}

/// Builds an image from `src` and uploads its objects and the image.
async fn add_image(
    f: &Fleet,
    name: &str,
    src: &Path,
    filter: Option<&str>,
    triggers: Triggers,
) -> Image {
    let tree = scan(src, &ScanOptions::default()).unwrap();
    let mut body = Vec::new();
    for (path, ino) in &tree.entries {
        let i = &tree.inodes[ino];
        if let Some(h) = i.hash {
            let data = std::fs::read(src.join(path.relative_os())).unwrap();
            body.extend_from_slice(&model::frame::header(&h, data.len() as u64));
            body.extend_from_slice(&data);
        }
    }
    f.images.add_objects(body.into()).await.unwrap();
    let img = Image::new(
        tree,
        filter.map(|l| Filter::parse(l, "f").unwrap()),
        triggers,
    );
    f.images.add_image(name, &img).await.unwrap();
    f.images.get_image(name).await.unwrap()
}

/// `Subd.Fetch` of `hashes` from the fleet's imageserver, with `final_metadata` hints.
async fn fetch(
    f: &Fleet,
    hashes: Vec<ObjectId>,
    wait: bool,
    final_metadata: Vec<model::plan::FinalMetadata>,
) -> model::api::FetchResponse {
    let req = FetchRequest {
        server: f.server.clone(),
        hashes,
        wait,
        final_metadata,
    };
    f.subd.fetch(&req).await.unwrap()
}

async fn poll_after(f: &Fleet, after: u64) -> PollResponse {
    testkit::drive::poll_after(&f.subd, after).await
}

fn plan(name: &str, img: &Image, p: &PollResponse) -> model::UpdatePlan {
    testkit::drive::plan_for(name, img, p, &DiffOptions::default())
}

/// poll → diff → Fetch(wait) → Update(wait) → rescan diffs to empty.
async fn converge(f: &Fleet, name: &str, img: &Image) -> model::api::UpdateResult {
    let p = poll_after(f, 0).await;
    let pl = plan(name, img, &p);
    assert!(pl.unsafe_reason.is_none(), "{pl:#}");
    fetch(f, pl.objects_to_fetch.clone(), true, Vec::new()).await;
    let p = poll_after(f, p.generation).await;
    let pl = plan(name, img, &p);
    assert!(
        pl.objects_to_fetch.is_empty(),
        "fetched objects are in the cache: {pl:#}"
    );
    let r = f
        .subd
        .update(&UpdateRequest {
            plan: pl,
            wait: true,
        })
        .await
        .unwrap()
        .result
        .unwrap();
    let after = poll_after(f, p.generation).await;
    let again = plan(name, img, &after);
    assert!(again.is_empty(), "not converged: {again:#}");
    r
}

/// The full poll at the first scan counted after `accepted` (a Fetch's or Update's
/// `scan_count`).
async fn poll_at_scan_after(f: &Fleet, accepted: u64) -> PollResponse {
    let t0 = std::time::Instant::now();
    loop {
        let p = f
            .subd
            .poll(&PollRequest {
                have_generation: 0,
                short_only: false,
                ..Default::default()
            })
            .await
            .unwrap();
        if p.scan_count > accepted && !p.fetch_in_progress && !p.update_in_progress {
            return p;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no scan after {accepted}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The dominator trusts the first scan counted after the `scan_count` a Fetch or Update
/// reply carries: that scan lists every object fetched, and shows the update's tree. Run
/// in a loop with scans back to back, so a pass overlapping the work is likely each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_scan_counted_after_an_accepted_fetch_or_update_shows_it() {
    let f = fleet_with(|c| c.min_scan_interval = Duration::ZERO).await;
    let src = f.root.parent().unwrap().join("src");
    for round in 0..12u32 {
        for i in 0..40 {
            write(
                &src,
                &format!("d/f{i}"),
                format!("round {round} file {i}\n").as_bytes(),
            );
        }
        let name = format!("race/{round}");
        let img = add_image(&f, &name, &src, None, Triggers::default()).await;
        let p = poll_after(&f, 0).await;
        let pl = plan(&name, &img, &p);
        let accepted = fetch(&f, pl.objects_to_fetch.clone(), false, Vec::new())
            .await
            .scan_count
            .expect("subd says its scan count");
        let p = poll_at_scan_after(&f, accepted).await;
        let pl = plan(&name, &img, &p);
        assert!(
            pl.objects_to_fetch.is_empty(),
            "round {round}: the scan after the fetch misses {} objects",
            pl.objects_to_fetch.len()
        );
        let accepted = f
            .subd
            .update(&UpdateRequest {
                plan: pl,
                wait: false,
            })
            .await
            .unwrap()
            .scan_count
            .expect("subd says its scan count");
        let p = poll_at_scan_after(&f, accepted).await;
        assert_eq!(
            p.last_update.as_ref().map(|r| r.image_name.as_str()),
            Some(name.as_str())
        );
        let again = plan(&name, &img, &p);
        assert!(
            again.is_empty(),
            "round {round}: the scan after the update shows the old tree: {again:#}"
        );
    }
}

/// The first scan after an update takes the hashes of the files the update installed
/// from its record instead of reading them (the tree it reports is the same); the scan
/// after that reads every file again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scan_after_an_update_trusts_its_record_once_then_reads_everything() {
    // Passes at least a second apart (the default), so the one after the update is still
    // the last when it is looked at.
    let f = fleet().await;
    let src = f.root.parent().unwrap().join("src");
    for i in 0..30 {
        write(&src, &format!("d/f{i}"), format!("file {i}\n").as_bytes());
    }
    let img = add_image(&f, "known/1", &src, None, Triggers::default()).await;
    let p = poll_after(&f, 0).await;
    let pl = plan("known/1", &img, &p);
    fetch(&f, pl.objects_to_fetch.clone(), true, Vec::new()).await;
    let accepted = f
        .subd
        .update(&UpdateRequest {
            plan: pl,
            wait: true,
        })
        .await
        .unwrap()
        .scan_count
        .expect("subd says its scan count");
    let p = poll_at_scan_after(&f, accepted).await;
    assert!(plan("known/1", &img, &p).is_empty());
    let (count, known) = {
        let st = f.state.status();
        (st.scan_count, st.last_scan_known_files)
    };
    assert_eq!(known, 30, "the first scan after the update");
    let p = poll_at_scan_after(&f, count).await;
    assert!(plan("known/1", &img, &p).is_empty());
    assert_eq!(f.state.status().last_scan_known_files, 0, "a later scan");
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

#[tokio::test]
async fn full_image_with_filter_is_fetched_and_applied() {
    let f = fleet().await;
    let src = f._dir.path().join("src");
    write(&src, "etc/passwd", b"root:x:0:0\n");
    write(&src, "usr/bin/tool", b"#!/bin/sh\n");
    std::fs::set_permissions(
        src.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::hard_link(src.join("usr/bin/tool"), src.join("usr/bin/tool2")).unwrap();
    std::os::unix::fs::symlink("tool", src.join("usr/bin/t")).unwrap();
    std::fs::create_dir_all(src.join("tmp")).unwrap();
    std::fs::create_dir_all(src.join("keep")).unwrap();
    let img = add_image(
        &f,
        "os/1",
        &src,
        Some("/keep(|/.*)$\n"),
        Triggers::default(),
    )
    .await;
    // the machine: drift, extras, filtered and excluded content
    write(&f.root, "etc/passwd", b"hacked\n");
    write(&f.root, "etc/extra", b"x");
    write(&f.root, "opt/junk/file", b"j");
    write(&f.root, "keep/local", b"mine");
    write(&f.root, "tmp/scratch", b"s");
    let r = converge(&f, "os/1", &img).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(
        std::fs::read(f.root.join("etc/passwd")).unwrap(),
        b"root:x:0:0\n"
    );
    assert!(!f.root.join("etc/extra").exists() && !f.root.join("opt").exists());
    assert_eq!(
        std::fs::read(f.root.join("keep/local")).unwrap(),
        b"mine",
        "filtered"
    );
    assert_eq!(
        std::fs::read(f.root.join("tmp/scratch")).unwrap(),
        b"s",
        "excluded"
    );
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (
        std::fs::metadata(f.root.join("usr/bin/tool")).unwrap(),
        std::fs::metadata(f.root.join("usr/bin/tool2")).unwrap(),
    );
    assert_eq!((a.ino(), a.mode() & 0o7777), (b.ino(), 0o4755));
    assert_eq!(
        std::fs::read_link(f.root.join("usr/bin/t"))
            .unwrap()
            .to_str(),
        Some("tool")
    );
    assert_eq!(
        std::fs::read_to_string(f.root.join(".subd/last-image"))
            .unwrap()
            .trim(),
        "os/1"
    );
}

#[tokio::test]
async fn fetch_faults_are_reported_and_nothing_bad_is_kept() {
    let f = fleet().await;
    let src = f._dir.path().join("src");
    write(&src, "a", b"alpha");
    write(&src, "b", &vec![7u8; 300_000]);
    let img = add_image(&f, "app/1", &src, None, Triggers::default()).await;
    let hashes: Vec<ObjectId> = img.tree.objects().into_keys().collect();
    poll_after(&f, 0).await;
    let fetch = |server: String| {
        let hashes = hashes.clone();
        let c = f.subd.clone();
        async move {
            c.fetch(&FetchRequest {
                server,
                hashes,
                wait: true,
                ..Default::default()
            })
            .await
        }
    };
    // down
    let e = fetch("127.0.0.1:1".into()).await.unwrap_err();
    assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
    let s = f
        .subd
        .poll(&PollRequest {
            short_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(s.last_fetch_error.unwrap().contains("127.0.0.1:1"));
    // 500 and truncation through a misbehaving proxy
    let target: std::net::SocketAddr = f.server.parse().unwrap();
    let proxy = FaultProxy::start(target, Fault::Status500).await;
    let e = fetch(proxy.addr.to_string()).await.unwrap_err();
    assert!(e.to_string().contains("500"), "{e}");
    proxy.set(Fault::TruncateReply(2000));
    let e = fetch(proxy.addr.to_string()).await.unwrap_err();
    assert!(
        e.to_string().contains("truncated") || e.to_string().contains("connection"),
        "{e}"
    );
    let store = disk::objectstore::ObjectStore::open(&f.root.join(".subd/objects")).unwrap();
    for (h, _) in store.list().unwrap() {
        assert_eq!(
            ObjectId::of(&std::fs::read(store.path_of(&h)).unwrap()),
            h,
            "only whole, verified objects"
        );
    }
    // bytes that do not match their name on the imageserver's disk
    let big = ObjectId::of(&vec![7u8; 300_000]);
    let on_server = disk::objectstore::ObjectStore::open(&f.data.join("objects"))
        .unwrap()
        .path_of(&big);
    let mut bytes = std::fs::read(&on_server).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&on_server, &bytes).unwrap();
    let e = fetch(f.server.clone()).await.unwrap_err();
    assert!(
        !store.contains(&big),
        "a mismatching object is never installed"
    );
    assert!(e.status().is_some(), "{e}");
    // a good fetch works afterwards
    std::fs::write(&on_server, vec![7u8; 300_000]).unwrap();
    fetch(f.server.clone()).await.unwrap();
    assert!(store.contains(&big));
}

/// A Fetch carrying the plan's last-use metadata stores each object with it (its mode and
/// mtime in the cache before any update), and the update then installs it as the image
/// says; one without leaves the cache's own (0640).
#[tokio::test]
async fn a_fetch_gives_objects_their_last_uses_metadata_as_it_stores_them() {
    use std::os::unix::fs::MetadataExt;
    let f = fleet().await;
    let src = f.root.parent().unwrap().join("src");
    write(&src, "bin/tool", b"#!/bin/sh\n");
    std::fs::set_permissions(src.join("bin/tool"), std::fs::Permissions::from_mode(0o751)).unwrap();
    write(&src, "etc/conf", b"conf\n");
    let img = add_image(&f, "meta/1", &src, None, Triggers::default()).await;
    let p = poll_after(&f, 0).await;
    let pl = plan("meta/1", &img, &p);
    let hints = pl.final_metadata();
    assert_eq!(hints.len(), 2, "{hints:?}");
    let tool = hints
        .iter()
        .find(|m| m.mode & 0o777 == 0o751)
        .expect("the tool's hint");
    let conf = hints.iter().find(|m| m.object != tool.object).unwrap();
    fetch(&f, vec![tool.object], true, vec![*tool]).await;
    let accepted = fetch(&f, vec![conf.object], true, Vec::new())
        .await
        .scan_count
        .expect("subd says its scan count");
    let cached = |id: &ObjectId| {
        let hex = id.to_hex();
        std::fs::metadata(f.root.join(".subd/objects").join(&hex[..2]).join(&hex[2..])).unwrap()
    };
    let m = cached(&tool.object);
    assert_eq!((m.mode() & 0o7777, m.mtime()), (0o751, tool.mtime.sec));
    assert_eq!(cached(&conf.object).mode() & 0o7777, 0o640);
    // Planned from a scan that lists both objects in the cache: nothing left to fetch.
    let pl = plan("meta/1", &img, &poll_at_scan_after(&f, accepted).await);
    assert!(pl.objects_to_fetch.is_empty(), "{pl:#}");
    let update = UpdateRequest {
        plan: pl,
        wait: true,
    };
    let r = f.subd.update(&update).await.unwrap().result.unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let installed = std::fs::metadata(f.root.join("bin/tool")).unwrap();
    assert_eq!(
        (installed.mode() & 0o7777, installed.mtime()),
        (0o751, tool.mtime.sec)
    );
}
