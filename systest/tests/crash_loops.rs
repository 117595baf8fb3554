//! Crash loops over the real binaries: kill -9 the imageserver at random moments during
//! uploads, and subd at random moments during fetch and during activation. After every
//! kill: the store holds no partial object or image, every managed file is wholly old or
//! wholly new, and the next round converges.
//!
//! `CRASH_ITERATIONS` sets the number of rounds (default 8 here; `bench/crash-loops.sh` runs
//! 100 of each). `CRASH_SEED` makes a run reproducible.

mod common;

use common::{
    check_objects, converge, fetch_then_replan, files_under, full_poll, imageserver, plan_for, subd,
};
use disk::fsutil::TEMP_SUFFIX;
use model::api::{FetchRequest, UpdateRequest};
use model::{Image, ObjectId};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use testkit::bin;
use wire::client::{ClientSecurity, ImageServerClient};

fn iterations() -> usize {
    std::env::var("CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

fn rng() -> fastrand::Rng {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("CRASH_SEED={seed}");
    fastrand::Rng::with_seed(seed)
}

/// Every stored image is whole JSON (or a zero-length tombstone) matching its checksum.
fn check_images(images: &Path) {
    for f in files_under(images) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(TEMP_SUFFIX) || name == ".image.sha512" {
            continue;
        }
        let data = std::fs::read(&f).unwrap();
        if !data.is_empty() {
            serde_json::from_slice::<Image>(&data)
                .unwrap_or_else(|e| panic!("partial image {}: {e}", f.display()));
            let sum = std::fs::read_to_string(f.with_file_name(".image.sha512"))
                .unwrap_or_else(|e| panic!("image {} without its checksum: {e}", f.display()));
            assert_eq!(sum.trim(), ObjectId::of(&data).to_hex(), "{}", f.display());
        }
    }
}

/// A tree shared by all rounds (dedup) plus a few files unique to round `i`.
fn make_tree(dir: &Path, i: usize, rng: &mut fastrand::Rng) {
    std::fs::create_dir_all(dir.join("common")).unwrap();
    std::fs::create_dir_all(dir.join("unique")).unwrap();
    for j in 0..30 {
        std::fs::write(
            dir.join(format!("common/f{j}")),
            format!("common {j}\n").repeat(200 * (j + 1)),
        )
        .unwrap();
    }
    for j in 0..12 {
        let len = rng.usize(1..(3 << 20));
        let byte = rng.u8(..);
        let mut data = vec![byte; len];
        data[..8].copy_from_slice(&(i as u64 * 1000 + j as u64).to_le_bytes());
        std::fs::write(dir.join(format!("unique/u{j}")), data).unwrap();
    }
}

#[test]
fn imageserver_killed_at_random_moments_during_uploads_loses_nothing() {
    let mut rng = rng();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let mut killed_mid_upload = 0;
    for i in 0..iterations() {
        let tree = work.path().join(format!("tree{i}"));
        make_tree(&tree, i, &mut rng);
        let name = format!("crash/{i}");
        let mut server = imageserver(&data);
        let addr = server.addr.clone();
        let mut add = Command::new(bin("imagetool"))
            .args([
                "--image-server",
                &addr,
                "add",
                &name,
                tree.to_str().unwrap(),
                "",
                "",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.u64(0..400)));
        server.kill9();
        let status = add.wait().unwrap();
        if !status.success() {
            killed_mid_upload += 1;
        }
        // Offline: only whole objects under their names, only whole images.
        check_objects(&data.join("objects"), true);
        check_images(&data.join("images"));

        // Restart: debris removed, every listed image complete, and the next round converges.
        let server = imageserver(&data);
        let addr = server.addr.clone();
        check_objects(&data.join("objects"), false);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let c = ImageServerClient::new(&addr, &ClientSecurity::Insecure).unwrap();
            for n in c.list_images(None).await.unwrap() {
                let img = c.get_image(&n).await.unwrap();
                let ids: Vec<ObjectId> = img.tree.objects().into_keys().collect();
                let sizes = c.check_objects(&ids).await.unwrap();
                assert!(
                    sizes.iter().all(|&s| s > 0),
                    "image {n} refers to a missing object"
                );
            }
        });
        let again = Command::new(bin("imagetool"))
            .args([
                "--image-server",
                &addr,
                "add",
                &name,
                tree.to_str().unwrap(),
                "",
                "",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&again.stderr);
        assert!(
            again.status.success() || err.contains("exists"),
            "round {i}: re-add failed: {err}"
        );
        let check = Command::new(bin("imagetool"))
            .args(["--image-server", &addr, "check", &name])
            .status()
            .unwrap();
        assert!(
            check.success(),
            "round {i}: image {name} missing after re-add"
        );
        drop(server);
        std::fs::remove_dir_all(&tree).unwrap();
    }
    eprintln!(
        "{} rounds, {killed_mid_upload} killed mid-upload",
        iterations()
    );
    assert!(
        killed_mid_upload > 0 || iterations() < 3,
        "the kills never hit an upload"
    );
}

// ---- subd ----

const FILES: usize = 60;
const SIZE: usize = 96 * 1024;

/// Content of file `j` in version `v` (0 or 1): distinct per file and version.
fn content(v: usize, j: usize) -> Vec<u8> {
    let mut d = vec![b"AB"[v]; SIZE];
    d[..8].copy_from_slice(&(j as u64).to_le_bytes());
    d
}

fn version_tree(dir: &Path, v: usize) {
    std::fs::create_dir_all(dir.join("srv/app")).unwrap();
    for j in 0..FILES {
        std::fs::write(dir.join(format!("srv/app/f{j:02}")), content(v, j)).unwrap();
    }
}

/// Every managed file is wholly version 0 or wholly version 1 (or not yet born).
fn wholly_old_or_new(root: &Path) -> (usize, usize) {
    let (mut a, mut b) = (0, 0);
    for j in 0..FILES {
        let Ok(d) = std::fs::read(root.join(format!("srv/app/f{j:02}"))) else {
            continue;
        };
        if d == content(0, j) {
            a += 1;
        } else if d == content(1, j) {
            b += 1;
        } else {
            panic!("srv/app/f{j:02} is neither old nor new ({} bytes)", d.len());
        }
    }
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subd_killed_at_random_moments_during_fetch_and_activation_converges() {
    let mut rng = rng();
    let work = tempfile::tempdir().unwrap();
    // Two full images with the same paths and different contents, on a real imageserver.
    let server = imageserver(&work.path().join("data"));
    let is_addr = server.addr.clone();
    let filter = work.path().join("empty.filter");
    std::fs::write(&filter, "").unwrap();
    let client = ImageServerClient::new(&is_addr, &ClientSecurity::Insecure).unwrap();
    let mut images = Vec::new();
    for v in 0..2 {
        let dir = work.path().join(format!("v{v}"));
        version_tree(&dir, v);
        let name = format!("app/{v}");
        let st = Command::new(bin("imagetool"))
            .args([
                "--image-server",
                &is_addr,
                "add",
                &name,
                dir.to_str().unwrap(),
                filter.to_str().unwrap(),
                "",
            ])
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        images.push((name.clone(), client.get_image(&name).await.unwrap()));
    }

    let root = work.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let (mut d, mut c) = subd(&root);
    converge(&c, &is_addr, &images[0].0, &images[0].1).await;
    let (mut fetch_kills, mut update_kills) = (0, 0);
    for i in 0..iterations() {
        let (name, image) = &images[(i + 1) % 2];
        let p = full_poll(&c, 0).await;
        let plan = plan_for(name, image, &p);
        assert!(!plan.objects_to_fetch.is_empty() || !plan.inodes_to_make.is_empty());
        if i % 2 == 0 {
            // Kill during the fetch.
            let req = FetchRequest {
                server: is_addr.clone(),
                hashes: plan.objects_to_fetch.clone(),
                wait: false,
                ..Default::default()
            };
            c.fetch(&req).await.unwrap();
            tokio::time::sleep(Duration::from_millis(rng.u64(0..60))).await;
            fetch_kills += 1;
        } else {
            // Fetch fully, then kill during the update's activation.
            let (_, plan) = fetch_then_replan(&c, &is_addr, name, image, p, plan).await;
            c.update(&UpdateRequest { plan, wait: false })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_micros(rng.u64(0..30_000))).await;
            update_kills += 1;
        }
        d.kill9();
        let (old, new) = wholly_old_or_new(&root);
        check_objects(&root.join(".subd/objects"), true);
        // Restarted on a new port: the next round talks to it through its new client.
        (d, c) = subd(&root);
        full_poll(&c, 0).await; // answering: its state directory is open
        check_objects(&root.join(".subd/objects"), false);
        converge(&c, &is_addr, name, image).await;
        let want_new = (i + 1) % 2;
        let (a, b) = wholly_old_or_new(&root);
        assert_eq!(
            if want_new == 0 { a } else { b },
            FILES,
            "round {i}: not converged ({old} old / {new} new at the kill)"
        );
    }
    drop(c);
    drop(d);
    eprintln!("{fetch_kills} kills during fetch, {update_kills} during update");
}
