//! The imageserver over S3 (`--object-store`), against a real single-node Garage started
//! by each test (`testkit::garage`; installed by `scripts/test.sh`, and a test fails, never
//! skips, without it): imagetool adds into the bucket, a subd is born from it, bad uploads
//! and a killed server leave nothing under an object's name, a server restarted over the
//! same bucket (even with an empty data directory) lists and serves everything, and a
//! second imageserver over the bucket lists an image added through the first.

mod common;

use common::{add_image, converge, subd};
use model::frame;
use model::ObjectId;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::garage::Garage;
use testkit::{bin, Daemon};
use wire::client::{ClientSecurity, ImageServerClient};

const PREFIX: &str = "site/a";

/// An imageserver of `data` whose objects and images live in Garage's bucket.
fn s3_imageserver(g: &Garage, data: &Path) -> Daemon {
    let mut cmd = Command::new(bin("imageserver"));
    cmd.args(["--data-dir", data.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--permit-insecure-mode"])
        .args(["--object-store", &format!("s3://{}/{PREFIX}", g.bucket)])
        .args(["--s3-endpoint", &g.endpoint])
        .args(["--s3-refresh-ms", "200"])
        .envs(g.env());
    let (child, addr) = testkit::spawn_listening(&mut cmd);
    Daemon {
        child,
        addr: addr.to_string(),
    }
}

/// A client of the bucket as the imageserver sees it, to look at what landed there.
fn bucket(g: &Garage) -> Arc<imageserver::s3::S3Objects> {
    let config = imageserver::s3::S3Config {
        bucket: g.bucket.clone(),
        prefix: PREFIX.to_string(),
        endpoint: Some(g.endpoint.clone()),
        credentials: imageserver::s3::Credentials {
            access_key_id: g.key_id.clone(),
            secret_access_key: g.secret.clone(),
            region: testkit::garage::REGION.to_string(),
        },
    };
    Arc::new(imageserver::s3::S3Objects::open(&config).unwrap())
}

async fn bucket_objects(b: &Arc<imageserver::s3::S3Objects>) -> Vec<(ObjectId, u64)> {
    let b = b.clone();
    tokio::task::spawn_blocking(move || {
        let mut v: Vec<_> = b
            .list()
            .unwrap()
            .into_iter()
            .map(|l| (l.id, l.size))
            .collect();
        v.sort();
        v
    })
    .await
    .unwrap()
}

async fn bucket_images(b: &Arc<imageserver::s3::S3Objects>) -> Vec<(String, u64)> {
    let b = b.clone();
    tokio::task::spawn_blocking(move || b.list_images().unwrap())
        .await
        .unwrap()
}

/// A small tree with one file large enough for a multipart upload.
fn source_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("etc/app")).unwrap();
    std::fs::write(dir.join("etc/app/config"), b"port = 80\n").unwrap();
    std::fs::write(dir.join("etc/motd"), b"hello from S3\n").unwrap();
    let big: Vec<u8> = (0..(imageserver::s3::PART + 123_457))
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    std::fs::write(dir.join("big.bin"), big).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn imagetool_adds_into_the_bucket_a_subd_is_born_and_a_restart_serves_it_all() {
    let g = Garage::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    source_tree(&src);
    let mut server = s3_imageserver(&g, &t.path().join("data1"));
    let image = add_image(&server.addr, "app/1", &src, "").await;

    // Every object and the image itself are in the bucket.
    let b = bucket(&g);
    let mut want: Vec<(ObjectId, u64)> = image.objects().into_iter().collect();
    want.sort();
    assert_eq!(bucket_objects(&b).await, want);
    let images = bucket_images(&b).await;
    assert!(
        images.iter().any(|(n, len)| n == "app/1" && *len > 0),
        "{images:?}"
    );

    // A machine born from it.
    let root = t.path().join("root1");
    std::fs::create_dir_all(&root).unwrap();
    let (_subd, c) = subd(&root);
    converge(&c, &server.addr, "app/1", &image).await;
    assert_eq!(
        std::fs::read(root.join("etc/motd")).unwrap(),
        b"hello from S3\n"
    );
    assert_eq!(
        std::fs::read(root.join("big.bin")).unwrap(),
        std::fs::read(src.join("big.bin")).unwrap()
    );

    // Restarted over the same bucket with an empty data directory: all still there.
    server.kill9();
    let server = s3_imageserver(&g, &t.path().join("data2"));
    let client = ImageServerClient::new(&server.addr, &ClientSecurity::Insecure).unwrap();
    assert_eq!(client.list_images(None).await.unwrap(), ["app/1"]);
    assert_eq!(client.get_image("app/1").await.unwrap(), image);
    let root2 = t.path().join("root2");
    std::fs::create_dir_all(&root2).unwrap();
    let (_subd2, c2) = subd(&root2);
    converge(&c2, &server.addr, "app/1", &image).await;
    assert_eq!(
        testkit::tree::listing(&root2),
        testkit::tree::listing(&root)
    );
    // A deletion reaches the bucket as a tombstone; the name stays used after a restart.
    client.delete_image("app/1").await.unwrap();
    let images = bucket_images(&b).await;
    assert!(images.contains(&("app/1".to_string(), 0)), "{images:?}");
    drop(server);
    let server = s3_imageserver(&g, &t.path().join("data3"));
    let client = ImageServerClient::new(&server.addr, &ClientSecurity::Insecure).unwrap();
    assert!(client.list_images(None).await.unwrap().is_empty());
    let again = client.add_image("app/1", &image).await.unwrap_err();
    assert!(again.to_string().contains("never reused"), "{again}");
}

fn frame_of(id: ObjectId, len: u64, body: &[u8]) -> Vec<u8> {
    let mut v = frame::header(&id, len).to_vec();
    v.extend_from_slice(body);
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_uploads_and_a_killed_server_leave_nothing_under_the_name() {
    let g = Garage::start();
    let t = tempfile::tempdir().unwrap();
    let mut server = s3_imageserver(&g, &t.path().join("data"));
    let c = ImageServerClient::new(&server.addr, &ClientSecurity::Insecure).unwrap();
    let b = bucket(&g);

    // A small object whose bytes do not match its name.
    let claimed = ObjectId::of(b"the real bytes");
    let e = c
        .add_objects(frame_of(claimed, 5, b"other").into())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("mismatch"), "{e}");
    // A large (multipart) one, wrong in its last byte.
    let mut big = vec![7u8; imageserver::s3::PART * 2 + 10];
    let big_id = ObjectId::of(&big);
    *big.last_mut().unwrap() = 8;
    let e = c
        .add_objects(frame_of(big_id, big.len() as u64, &big).into())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("mismatch"), "{e}");
    // A truncated one: the frame promises more than the body holds.
    let short_id = ObjectId::of(b"twelve bytes");
    let e = c
        .add_objects(frame_of(short_id, 12, b"twelve").into())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    assert_eq!(bucket_objects(&b).await, []);

    // Killed in the middle of a large upload: nothing under its name, before or after a
    // restart.
    let large: Vec<u8> = (0..(48u32 << 20)).map(|i| (i % 253) as u8).collect();
    let large_id = ObjectId::of(&large);
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(2);
    let upload =
        tokio::spawn({
            let c = c.clone();
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|x| (x, rx))
            });
            async move { c.add_objects(reqwest::Body::wrap_stream(stream)).await }
        });
    tx.send(Ok(frame::header(&large_id, large.len() as u64).to_vec()))
        .await
        .unwrap();
    // Two parts' worth sent (so a multipart upload is under way), then the kill.
    for chunk in large[..imageserver::s3::PART * 2 + 4096].chunks(1 << 20) {
        tx.send(Ok(chunk.to_vec())).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill9();
    drop(tx);
    assert!(upload.await.unwrap().is_err());
    assert_eq!(bucket_objects(&b).await, []);
    let server = s3_imageserver(&g, &t.path().join("data"));
    let c = ImageServerClient::new(&server.addr, &ClientSecurity::Insecure).unwrap();
    assert_eq!(c.check_objects(&[large_id]).await.unwrap(), [0]);
    // The same object sent whole afterwards is stored, verified.
    c.add_objects(frame_of(large_id, large.len() as u64, &large).into())
        .await
        .unwrap();
    assert_eq!(bucket_objects(&b).await, [(large_id, large.len() as u64)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_imageserver_over_the_bucket_lists_and_serves_what_the_first_added() {
    let g = Garage::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    source_tree(&src);
    let one = s3_imageserver(&g, &t.path().join("data1"));
    let two = s3_imageserver(&g, &t.path().join("data2"));
    let image = add_image(&one.addr, "app/7", &src, "").await;
    let added = Instant::now();
    let c2 = ImageServerClient::new(&two.addr, &ClientSecurity::Insecure).unwrap();
    // `--s3-refresh-ms 200`: listed within the interval plus one round of listing.
    while c2.list_images(None).await.unwrap().is_empty() {
        assert!(
            added.elapsed() < Duration::from_secs(3),
            "not listed by the second imageserver after 3 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "listed by the second imageserver after {:?}",
        added.elapsed()
    );
    assert_eq!(c2.get_image("app/7").await.unwrap(), image);
    // A machine born from the second.
    let root = t.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let (_subd, c) = subd(&root);
    converge(&c, &two.addr, "app/7", &image).await;
    assert_eq!(
        std::fs::read(root.join("etc/app/config")).unwrap(),
        b"port = 80\n"
    );
}

/// Sequential 4 KiB GETs per second through `S3Objects` with `client_options(keep_alive)`.
fn small_gets_per_second(g: &Garage, keep_alive: bool, id: ObjectId, n: usize) -> f64 {
    use std::io::Read;
    let config = imageserver::s3::S3Config {
        bucket: g.bucket.clone(),
        prefix: PREFIX.to_string(),
        endpoint: Some(g.endpoint.clone()),
        credentials: imageserver::s3::Credentials {
            access_key_id: g.key_id.clone(),
            secret_access_key: g.secret.clone(),
            region: testkit::garage::REGION.to_string(),
        },
    };
    let s3 =
        imageserver::s3::S3Objects::open_with(&config, imageserver::s3::client_options(keep_alive))
            .unwrap();
    let t0 = Instant::now();
    for _ in 0..n {
        let mut buf = Vec::new();
        s3.open_object(&id).unwrap().read_to_end(&mut buf).unwrap();
        assert_eq!(buf.len(), 4096);
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// Garage sets no TCP_NODELAY, so on a kept-alive connection each small reply stalls on
/// our delayed ACK (about 40 ms); the imageserver's client keeps no idle connection.
#[tokio::test(flavor = "multi_thread")]
async fn small_gets_do_not_stall_on_garage_replies() {
    use std::io::Write;
    let g = Garage::start();
    let b = bucket(&g);
    let data = vec![5u8; 4096];
    let id = ObjectId::of(&data);
    let (kept, fresh) = tokio::task::spawn_blocking(move || {
        let mut w = b.writer(id, 4096);
        w.write_all(&data).unwrap();
        b.commit(vec![w.finish().unwrap()]).unwrap();
        let kept = small_gets_per_second(&g, true, id, 50);
        let fresh = small_gets_per_second(&g, false, id, 50);
        (kept, fresh)
    })
    .await
    .unwrap();
    eprintln!("sequential 4 KiB GETs: {kept:.0}/s over kept-alive connections, {fresh:.0}/s with none kept (the imageserver's setting)");
    assert!(
        fresh > kept * 2.0,
        "no idle connection kept: {fresh:.0}/s, kept alive: {kept:.0}/s"
    );
}

/// An image of one file with these bytes.
fn one_file_image(data: &[u8]) -> model::Image {
    use model::image::{FileTree, Inode, Mtime};
    let mut t = FileTree::with_root(Inode::dir(0o755, 0, 0));
    let file = Inode::file(
        0o644,
        0,
        0,
        Mtime::default(),
        data.len() as u64,
        Some(ObjectId::of(data)),
    );
    t.inodes.insert(1, file);
    t.entries.insert("/f".parse().unwrap(), 1);
    model::Image::new(t, None, Default::default())
}

/// Two imageservers over one bucket adding the same names at the same moment: never both
/// succeed (no conditional create; claims in the bucket), and the winner's image is what
/// both serve.
#[tokio::test(flavor = "multi_thread")]
async fn racing_adds_of_one_name_on_two_imageservers_never_both_win() {
    let g = Garage::start();
    let t = tempfile::tempdir().unwrap();
    let one = s3_imageserver(&g, &t.path().join("data1"));
    let two = s3_imageserver(&g, &t.path().join("data2"));
    let c1 = ImageServerClient::new(&one.addr, &ClientSecurity::Insecure).unwrap();
    let c2 = ImageServerClient::new(&two.addr, &ClientSecurity::Insecure).unwrap();
    let (a, b) = (b"through one".as_slice(), b"through two".as_slice());
    c1.add_objects(frame_of(ObjectId::of(a), a.len() as u64, a).into())
        .await
        .unwrap();
    c2.add_objects(frame_of(ObjectId::of(b), b.len() as u64, b).into())
        .await
        .unwrap();
    let (ia, ib) = (one_file_image(a), one_file_image(b));
    let mut winners = Vec::new();
    for round in 0..8 {
        let name = format!("race/{round}");
        let (r1, r2) = tokio::join!(c1.add_image(&name, &ia), c2.add_image(&name, &ib));
        assert!(
            r1.is_err() || r2.is_err(),
            "{name}: both imageservers added it"
        );
        for e in [r1.as_ref().err(), r2.as_ref().err()].into_iter().flatten() {
            let e = e.to_string();
            assert!(
                e.contains("already exists") || e.contains("at the same time"),
                "{name}: {e}"
            );
        }
        if r1.is_ok() {
            winners.push((name, ia.clone()));
        } else if r2.is_ok() {
            winners.push((name, ib.clone()));
        }
    }
    eprintln!(
        "{} of 8 racing names were won by one imageserver",
        winners.len()
    );
    // Each won name is served as its winner stored it, by both (the loser within the
    // refresh interval).
    for (name, image) in &winners {
        for c in [&c1, &c2] {
            let t0 = Instant::now();
            loop {
                match c.get_image(name).await {
                    Ok(got) => {
                        assert_eq!(got.tree, image.tree, "{name}");
                        break;
                    }
                    Err(e) => assert!(t0.elapsed() < Duration::from_secs(3), "{name}: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
