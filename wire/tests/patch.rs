//! `patch_directory` and `fetch_objects` over real HTTP against a small in-process object
//! server (built on `wire::http::serve`) that can lie: corrupt bytes, cut replies, 500s.

use axum::body::Body;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use disk::objectstore::ObjectStore;
use model::api::{methods, GetObjectsRequest, ImageNameRequest};
use model::image::{FileTree, Image, Inode, Mtime};
use model::{Filter, FsPath, ObjectId, Triggers};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use wire::client::{ClientSecurity, ImageServerClient};
use wire::fetch::{fetch_objects, FetchError, FetchOptions};
use wire::http::{serve, ApiError, Json, Security};
use wire::patch::{patch_directory, PatchError, PatchOptions};

#[derive(Clone, Copy, PartialEq)]
enum Lie {
    None,
    CorruptFirst,
    CutAfter(usize),
    Status500,
}

#[derive(Clone)]
struct Fake {
    images: Arc<HashMap<String, Image>>,
    objects: Arc<HashMap<ObjectId, Vec<u8>>>,
    lie: Arc<Mutex<Lie>>,
    requests: Arc<Mutex<u64>>,
}

async fn get_image(
    State(f): State<Fake>,
    Json(r): Json<ImageNameRequest>,
) -> Result<axum::Json<Image>, ApiError> {
    f.images
        .get(&r.name)
        .cloned()
        .map(axum::Json)
        .ok_or_else(|| ApiError::NotFound(format!("image {} not found", r.name)))
}

async fn get_objects(
    State(f): State<Fake>,
    Json(r): Json<GetObjectsRequest>,
) -> Result<Body, ApiError> {
    *f.requests.lock().unwrap() += 1;
    let lie = *f.lie.lock().unwrap();
    if lie == Lie::Status500 {
        return Err(ApiError::Internal("disk on fire".into()));
    }
    let mut v = Vec::new();
    for (n, h) in r.hashes.iter().enumerate() {
        let mut data = f
            .objects
            .get(h)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("object {h}")))?;
        if n == 0 && lie == Lie::CorruptFirst {
            data[0] ^= 1;
        }
        v.extend_from_slice(&model::frame::header(h, data.len() as u64));
        v.extend_from_slice(&data);
    }
    if let Lie::CutAfter(k) = lie {
        v.truncate(k);
    }
    Ok(Body::from(v))
}

async fn start(
    images: HashMap<String, Image>,
    objects: HashMap<ObjectId, Vec<u8>>,
) -> (Fake, ImageServerClient) {
    let fake = Fake {
        images: Arc::new(images),
        objects: Arc::new(objects),
        lie: Arc::new(Mutex::new(Lie::None)),
        requests: Arc::new(Mutex::new(0)),
    };
    let router = Router::new()
        .route(&format!("/rpc/{}", methods::GET_IMAGE), post(get_image))
        .route(&format!("/rpc/{}", methods::GET_OBJECTS), post(get_objects))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        router,
        Security::Insecure,
        std::future::pending(),
    ));
    let client = ImageServerClient::new(&addr.to_string(), &ClientSecurity::Insecure).unwrap();
    (fake, client)
}

fn p(s: &str) -> FsPath {
    s.parse().unwrap()
}

const M: Mtime = Mtime {
    sec: 1_700_000_000,
    nsec: 42,
};

/// An image of `n` small files in /data plus a setuid file, with its objects.
fn sample(n: usize, filter: Option<&str>) -> (Image, HashMap<ObjectId, Vec<u8>>) {
    let mut t = FileTree::with_root(Inode::dir(0o755, 0, 0));
    let mut objects = HashMap::new();
    t.inodes.insert(1, Inode::dir(0o755, 0, 0));
    t.entries.insert(p("/data"), 1);
    for i in 0..n {
        let data = format!("file number {i}\n").into_bytes();
        let h = ObjectId::of(&data);
        t.inodes.insert(
            10 + i as u64,
            Inode::file(0o644, 0, 0, M, data.len() as u64, Some(h)),
        );
        t.entries
            .insert(p(&format!("/data/f{i:03}")), 10 + i as u64);
        objects.insert(h, data);
    }
    let su = b"setuid".to_vec();
    let h = ObjectId::of(&su);
    t.inodes
        .insert(5, Inode::file(0o4755, 0, 0, M, su.len() as u64, Some(h)));
    t.entries.insert(p("/su"), 5);
    objects.insert(h, su);
    (
        Image::new(
            t,
            filter.map(|f| Filter::parse(f, "f").unwrap()),
            Triggers::default(),
        ),
        objects,
    )
}

#[tokio::test]
async fn patch_directory_births_and_converges_a_tree() {
    let (img, objects) = sample(66, Some("/keep(|/.*)$"));
    let (fake, client) = start([("app/1".to_string(), img)].into(), objects).await;
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let opts = PatchOptions {
        allow_unsafe: false,
        ..Default::default()
    };
    let r = patch_directory(&client, "app/1", &root, &opts)
        .await
        .unwrap();
    assert!(r.succeeded(), "{:?}", r.result);
    assert_eq!(r.fetch.objects, 67);
    let requests = *fake.requests.lock().unwrap();
    assert!(
        (1..=5).contains(&requests),
        "{requests} requests for 67 objects"
    );
    assert_eq!(r.fetch.requests, requests);
    assert_eq!(
        std::fs::read(root.join("data/f007")).unwrap(),
        b"file number 7\n"
    );
    assert_eq!(
        std::fs::metadata(root.join("su")).unwrap().mode() & 0o7777,
        0o4755
    );
    // every object fetched went into place from where it was held: none left in the cache
    assert_eq!(files_under(&root.join(".subd/objects")), 0);
    // drift: edit one file, add an extra and a filtered one; patch again
    let untouched = std::fs::metadata(root.join("data/f001")).unwrap().ino();
    std::fs::write(root.join("data/f002"), b"edited").unwrap();
    std::fs::write(root.join("extra"), b"x").unwrap();
    std::fs::create_dir(root.join("keep")).unwrap();
    std::fs::write(root.join("keep/mine"), b"m").unwrap();
    let r = patch_directory(&client, "app/1", &root, &opts)
        .await
        .unwrap();
    assert!(r.succeeded(), "{:?}", r.result);
    assert_eq!(r.plan.objects_to_fetch.len(), 1, "{:#}", r.plan);
    assert_eq!(
        std::fs::read(root.join("data/f002")).unwrap(),
        b"file number 2\n"
    );
    assert!(!root.join("extra").exists());
    assert_eq!(std::fs::read(root.join("keep/mine")).unwrap(), b"m");
    assert_eq!(
        std::fs::metadata(root.join("data/f001")).unwrap().ino(),
        untouched
    );
    // and a third time there is nothing to do
    let r = patch_directory(&client, "app/1", &root, &opts)
        .await
        .unwrap();
    assert!(r.plan.is_empty(), "{:#}", r.plan);
    // unknown image: one clear error
    let e = patch_directory(&client, "nope/1", &root, &opts)
        .await
        .unwrap_err();
    assert!(matches!(e, PatchError::Image { .. }), "{e}");
}

/// Regular files beneath `dir`, temp files included.
fn files_under(dir: &std::path::Path) -> usize {
    testkit::files_under(dir).len()
}

/// Objects are fetched before the update is checked; one the update refuses keeps every
/// fetched object, verified and named in the cache, so the next patch fetches nothing.
#[tokio::test]
async fn a_refused_update_keeps_the_fetched_objects_for_the_next_patch() {
    let (mut img, objects) = sample(20, None);
    let good = img.clone();
    img.tree.inodes.get_mut(&0).unwrap().mode = 0o777; // a root others could write
    let images = [("bad/1".to_string(), img), ("good/1".to_string(), good)];
    let (fake, client) = start(images.into(), objects).await;
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let r = patch_directory(&client, "bad/1", &root, &PatchOptions::default())
        .await
        .unwrap();
    assert!(!r.succeeded());
    assert!(
        r.result.errors[0].contains("would let other users write the root"),
        "{:?}",
        r.result
    );
    assert_eq!(r.fetch.objects, 21);
    let cache = disk::objectstore::ObjectStore::attach(&root.join(".subd/objects")).unwrap();
    assert_eq!(cache.list().unwrap().len(), 21, "every object named");
    assert_eq!(
        files_under(&root.join(".subd/objects")),
        21,
        "no temp files"
    );
    assert!(!root.join("data").exists(), "nothing installed");
    let before = *fake.requests.lock().unwrap();
    let r = patch_directory(&client, "good/1", &root, &PatchOptions::default())
        .await
        .unwrap();
    assert!(r.succeeded(), "{:?}", r.result);
    assert_eq!(r.fetch.objects, 0);
    assert_eq!(
        *fake.requests.lock().unwrap(),
        before,
        "nothing fetched again"
    );
    assert_eq!(
        std::fs::read(root.join("data/f003")).unwrap(),
        b"file number 3\n"
    );
    assert_eq!(files_under(&root.join(".subd/objects")), 0);
}

#[tokio::test]
async fn patch_refuses_mass_deletion_unless_allowed() {
    let (img, objects) = sample(1, Some(""));
    let (_fake, client) = start([("tiny/1".to_string(), img)].into(), objects).await;
    let d = tempfile::tempdir().unwrap();
    for i in 0..20 {
        std::fs::write(d.path().join(format!("precious{i}")), b"p").unwrap();
    }
    let e = patch_directory(&client, "tiny/1", d.path(), &PatchOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("refusing unsafe update"), "{e}");
    assert!(d.path().join("precious3").exists());
    let opts = PatchOptions {
        allow_unsafe: true,
        ..Default::default()
    };
    let r = patch_directory(&client, "tiny/1", d.path(), &opts)
        .await
        .unwrap();
    assert!(r.succeeded());
    assert!(!d.path().join("precious3").exists());
}

#[tokio::test]
async fn patch_refuses_a_symlinked_state_dir_and_a_directory_others_can_write() {
    use std::os::unix::fs::PermissionsExt;
    let (img, objects) = sample(1, None);
    let (_fake, client) = start([("tiny/1".to_string(), img)].into(), objects).await;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("dir");
    let outside = d.path().join("outside");
    std::fs::create_dir_all(outside.join("staging")).unwrap();
    std::fs::write(outside.join("staging/0"), b"victim").unwrap();
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join(".subd")).unwrap();
    let e = patch_directory(&client, "tiny/1", &dir, &PatchOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, PatchError::State(_)), "{e}");
    assert!(e.to_string().contains(".subd is a symlink"), "{e}");
    assert_eq!(std::fs::read(outside.join("staging/0")).unwrap(), b"victim");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    std::fs::remove_file(dir.join(".subd")).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = patch_directory(&client, "tiny/1", &dir, &PatchOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("writable by other users"), "{e}");
    assert!(!dir.join(".subd").exists());
}

#[tokio::test]
async fn fetch_verifies_batches_and_reports_lies() {
    let (_, objects) = sample(66, None);
    let hashes: Vec<ObjectId> = objects.keys().copied().collect();
    let (fake, client) = start(HashMap::new(), objects.clone()).await;
    let d = tempfile::tempdir().unwrap();
    let store = ObjectStore::open(d.path()).unwrap();
    let opts = FetchOptions {
        batch_objects: 16,
        bytes_per_second: None,
        ..Default::default()
    };

    *fake.lie.lock().unwrap() = Lie::CorruptFirst;
    let e = fetch_objects(&client, &store, &hashes, &opts)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Mismatch { count: 5, .. }), "{e}");
    assert_eq!(
        store.list().unwrap().len(),
        62,
        "every good object kept, no bad one"
    );
    for (h, _) in store.list().unwrap() {
        assert_eq!(ObjectId::of(&std::fs::read(store.path_of(&h)).unwrap()), h);
    }

    *fake.lie.lock().unwrap() = Lie::CutAfter(100);
    let e = fetch_objects(&client, &store, &hashes, &opts)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Truncated(_)), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
    assert_eq!(
        store.list().unwrap().len(),
        63,
        "the whole object before the cut is kept"
    );

    *fake.lie.lock().unwrap() = Lie::Status500;
    let e = fetch_objects(&client, &store, &hashes, &opts)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("disk on fire") && e.to_string().contains("500"),
        "{e}"
    );

    *fake.lie.lock().unwrap() = Lie::None;
    *fake.requests.lock().unwrap() = 0;
    let s = fetch_objects(&client, &store, &hashes, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!((s.objects, s.already_present, s.requests), (4, 63, 1));
    assert_eq!(store.list().unwrap().len(), 67);

    // an imageserver that is down
    let dead = ImageServerClient::new("127.0.0.1:1", &ClientSecurity::Insecure).unwrap();
    let e = fetch_objects(&dead, &store, &[ObjectId::of(b"zz")], &opts)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
}

#[tokio::test]
async fn fetch_rate_limit_slows_the_transfer() {
    let data = vec![7u8; 200_000];
    let h = ObjectId::of(&data);
    let (_fake, client) = start(HashMap::new(), [(h, data)].into()).await;
    let d = tempfile::tempdir().unwrap();
    let store = ObjectStore::open(d.path()).unwrap();
    let t0 = std::time::Instant::now();
    let opts = FetchOptions {
        batch_objects: 10,
        bytes_per_second: Some(400_000),
        ..Default::default()
    };
    fetch_objects(&client, &store, &[h], &opts).await.unwrap();
    assert!(
        t0.elapsed() >= std::time::Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
}

use testkit::Tmpfs;

#[tokio::test]
async fn disk_full_during_fetch_is_reported_and_leaves_nothing_half_written() {
    let small = vec![1u8; 10_000];
    let big = vec![2u8; 400_000];
    let (hs, hb) = (ObjectId::of(&small), ObjectId::of(&big));
    let (_fake, client) = start(HashMap::new(), [(hs, small), (hb, big)].into()).await;
    let d = tempfile::tempdir().unwrap();
    let Some(_mnt) = Tmpfs::mount(d.path(), "256k") else {
        eprintln!("skipping: cannot mount a tmpfs here");
        return;
    };
    let store = ObjectStore::open(&d.path().join("objects")).unwrap();
    let e = fetch_objects(&client, &store, &[hs, hb], &FetchOptions::default())
        .await
        .unwrap_err();
    assert!(e.is_disk_full(), "{e}");
    assert!(e.to_string().contains("no space left"), "{e}");
    let names: Vec<ObjectId> = store.list().unwrap().into_iter().map(|(h, _)| h).collect();
    assert_eq!(
        names,
        [hs],
        "the object before the disk filled is kept, the other is not"
    );
    let reopened = ObjectStore::open(&d.path().join("objects")).unwrap();
    assert_eq!(reopened.list().unwrap().len(), 1);
}
