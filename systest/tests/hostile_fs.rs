//! Hostile file-systems with the real binaries: a disk that fills during an upload, a fetch
//! and an update (a clear error, nothing half-written, no activation, convergence once
//! space is freed), and symlink games on a machine (a managed directory or file swapped for
//! a symlink pointing outside the root between scan and update: nothing outside is written,
//! chowned or chmodded).

mod common;

use common::{
    add_image, check_objects, converge, fetch_then_replan, full_poll, imageserver, plan_for, subd,
};
use model::api::{FetchRequest, UpdateRequest};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Output};
use testkit::{bin, tree::noise, Tmpfs};

fn imagetool(addr: &str, args: &[&str]) -> Output {
    Command::new(bin("imagetool"))
        .args(["--image-server", addr])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_full_disk_during_an_upload_stores_nothing_partial_and_a_retry_succeeds() {
    let work = tempfile::tempdir().unwrap();
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let Some(_fs) = Tmpfs::mount(&mnt, "4m") else {
        eprintln!("SKIPPING: cannot mount a tmpfs here");
        return;
    };
    std::fs::write(mnt.join("ballast"), vec![0u8; 2 << 20]).unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    for i in 0..6 {
        std::fs::write(tree.join(format!("f{i}")), noise(i, 400 << 10)).unwrap();
    }
    let data = mnt.join("data");
    let server = imageserver(&data);
    let addr = server.addr.clone();
    let out = imagetool(&addr, &["add", "big/1", tree.to_str().unwrap(), "", ""]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.to_lowercase().contains("space"),
        "the error names the full disk: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    check_objects(&data.join("objects"), false);
    assert_eq!(
        imagetool(&addr, &["check", "big/1"]).status.code(),
        Some(1),
        "no image after a failed upload"
    );

    std::fs::remove_file(mnt.join("ballast")).unwrap();
    let again = imagetool(&addr, &["add", "big/1", tree.to_str().unwrap(), "", ""]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    check_objects(&data.join("objects"), false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_during_fetch_and_update_activates_nothing_partial_and_converges_later() {
    let work = tempfile::tempdir().unwrap();
    let server = imageserver(&work.path().join("data"));
    let is_addr = server.addr.clone();
    // A sparse image: five names for one 300 KiB object (the update must copy it four
    // times) and one unique 300 KiB file.
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("srv")).unwrap();
    let shared = noise(1, 300 << 10);
    for i in 0..5 {
        std::fs::write(tree.join(format!("srv/copy{i}")), &shared).unwrap();
    }
    std::fs::write(tree.join("srv/unique"), noise(2, 300 << 10)).unwrap();
    let image = add_image(&is_addr, "app/1", &tree, "").await;

    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let Some(_fs) = Tmpfs::mount(&root, "3m") else {
        eprintln!("SKIPPING: cannot mount a tmpfs here");
        return;
    };
    let ballast = root.join("ballast");
    std::fs::write(&ballast, vec![0u8; (3 << 20) - (200 << 10)]).unwrap();
    let (_d, c) = subd(&root);
    let p = full_poll(&c, 0).await;
    let plan = plan_for("app/1", &image, &p);
    assert_eq!(plan.objects_to_fetch.len(), 2);

    // Fetch with 200 KiB free: a clear error and no partial object.
    let req = FetchRequest {
        server: is_addr.clone(),
        hashes: plan.objects_to_fetch.clone(),
        wait: true,
        ..Default::default()
    };
    let e = c.fetch(&req).await.expect_err("the fetch must fail");
    assert!(e.to_string().to_lowercase().contains("space"), "{e}");
    check_objects(&root.join(".subd/objects"), false);
    assert!(!root.join("srv").exists(), "nothing activated");

    // With ~1 MiB free the fetch fits but the update's four copies do not.
    std::fs::write(&ballast, vec![0u8; 2 << 20]).unwrap();
    let (_, plan) = fetch_then_replan(&c, &is_addr, "app/1", &image, p, plan).await;
    let r = c
        .update(&UpdateRequest { plan, wait: true })
        .await
        .unwrap()
        .result
        .unwrap();
    assert!(!r.errors.is_empty(), "the update must report the full disk");
    assert!(
        r.errors.iter().any(|e| e.to_lowercase().contains("space")),
        "{:?}",
        r.errors
    );
    for i in 0..5 {
        if let Ok(d) = std::fs::read(root.join(format!("srv/copy{i}"))) {
            assert_eq!(d, shared, "copy{i} is half-written");
        }
    }

    // Space freed: the next round converges.
    std::fs::remove_file(&ballast).unwrap();
    converge(&c, &is_addr, "app/1", &image).await;
    for i in 0..5 {
        assert_eq!(
            std::fs::read(root.join(format!("srv/copy{i}"))).unwrap(),
            shared
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_swapped_in_between_scan_and_update_never_lead_outside_the_root() {
    let work = tempfile::tempdir().unwrap();
    let server = imageserver(&work.path().join("data"));
    let is_addr = server.addr.clone();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("etc/app")).unwrap();
    std::fs::write(tree.join("etc/app/config"), "new config\n").unwrap();
    std::fs::write(tree.join("etc/app/secret"), "s3cret\n").unwrap();
    std::fs::write(tree.join("etc/motd"), "same\n").unwrap();
    std::fs::set_permissions(
        tree.join("etc/motd"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(
        tree.join("etc/app/config"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let image = add_image(&is_addr, "app/1", &tree, "").await;

    // The machine: /etc/app with an old config, /etc/motd with the right content but mode 0644.
    let root = work.path().join("root");
    std::fs::create_dir_all(root.join("etc/app")).unwrap();
    std::fs::write(root.join("etc/app/config"), "old config\n").unwrap();
    std::fs::write(root.join("etc/motd"), "same\n").unwrap();
    std::fs::set_permissions(
        root.join("etc/motd"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    // Outside the root: what an attacker wants overwritten or chmodded.
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("config"), "victim\n").unwrap();
    std::fs::write(outside.join("victim"), "victim\n").unwrap();
    for f in ["config", "victim"] {
        std::fs::set_permissions(outside.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let before = outside_state(&outside);

    let (_d, c) = subd(&root);
    let p = full_poll(&c, 0).await;
    let plan = plan_for("app/1", &image, &p);
    let (_, plan) = fetch_then_replan(&c, &is_addr, "app/1", &image, p, plan).await;
    assert!(
        plan.inodes_to_change
            .iter()
            .any(|m| m.path.display() == "/etc/motd"),
        "{plan}"
    );

    // Between scan and update: the managed directory and file become symlinks outward.
    std::fs::rename(root.join("etc/app"), root.join("etc/app.moved")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("etc/app")).unwrap();
    std::fs::remove_file(root.join("etc/motd")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), root.join("etc/motd")).unwrap();
    let _ = c.update(&UpdateRequest { plan, wait: true }).await.unwrap();

    let after = outside_state(&outside);
    assert_eq!(
        before, after,
        "a file outside the root was written, chowned or chmodded"
    );
    assert!(
        !outside.join("secret").exists(),
        "a file was created outside the root"
    );

    // The next round (a fresh scan) converges the machine anyway.
    converge(&c, &is_addr, "app/1", &image).await;
    assert_eq!(
        std::fs::read_to_string(root.join("etc/app/config")).unwrap(),
        "new config\n"
    );
    assert!(root.join("etc/app").symlink_metadata().unwrap().is_dir());
    assert_eq!(
        std::fs::symlink_metadata(root.join("etc/motd"))
            .unwrap()
            .mode()
            & 0o7777,
        0o600
    );
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"victim\n");
}

/// Mode, owner and content of the files outside the root that an attacker targets.
fn outside_state(outside: &std::path::Path) -> Vec<(String, u32, u32, Vec<u8>)> {
    ["config", "victim"]
        .iter()
        .map(|f| {
            let m = std::fs::metadata(outside.join(f)).unwrap();
            (
                f.to_string(),
                m.mode(),
                m.uid(),
                std::fs::read(outside.join(f)).unwrap(),
            )
        })
        .collect()
}
