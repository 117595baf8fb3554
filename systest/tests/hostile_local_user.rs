//! A hostile unprivileged local user against the real subd (run as `nobody` with
//! `setpriv`; the tests need root and say SKIPPING without it): a name flipped between a
//! regular file, a FIFO and a symlink to `/dev/zero` in a 1777 directory cannot stop the
//! scanner, and `ROOT/.subd` swapped for a symlink while subd runs (the root having become
//! writable by others) redirects nothing outside the root, after which subd refuses to
//! start on that root.

mod common;

use common::{add_image, converge, full_poll, imageserver, subd};
use model::api::PollRequest;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use testkit::bin;

/// `nobody`: an unprivileged user.
const NOBODY: u32 = 65534;

/// Why these tests cannot run here, if they cannot.
fn cannot_run() -> Option<&'static str> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root to run a command as nobody");
    }
    let ok = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "true"])
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then_some("setpriv cannot run a command as nobody")
}

/// A shell script run as `nobody` in its own process group, killed (group and all) when
/// dropped.
struct AsNobody(Child);

impl AsNobody {
    fn start(script: &str) -> AsNobody {
        let child = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["sh", "-c", script])
            .process_group(0)
            .spawn()
            .unwrap();
        AsNobody(child)
    }

    /// Runs `script` as nobody to completion; panics if it fails.
    fn run(script: &str) {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["sh", "-c", script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "as nobody: {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for AsNobody {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.0.wait();
    }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A work directory nobody can traverse, holding `root` (0755) with `/etc/app.conf` and
/// a 1777 `/var/crash`, and an image directory.
fn machine() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let work = tempfile::tempdir().unwrap();
    chmod(work.path(), 0o755);
    let root = work.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("var/crash")).unwrap();
    chmod(&root, 0o755);
    chmod(&root.join("var/crash"), 0o1777);
    std::fs::write(root.join("etc/app.conf"), "good\n").unwrap();
    let image = work.path().join("image");
    std::fs::create_dir_all(image.join("etc")).unwrap();
    chmod(&image, 0o755);
    std::fs::write(image.join("etc/app.conf"), "good\n").unwrap();
    (work, root, image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_flipped_by_a_local_user_cannot_freeze_the_scanner() {
    if let Some(why) = cannot_run() {
        eprintln!("SKIPPING: {why}");
        return;
    }
    let (_work, root, image_dir) = machine();
    // Many names listed after /var/crash: the walk takes a while between listing a
    // flipped name and opening it, so the flip lands in that window on most passes.
    std::fs::create_dir(root.join("zzz")).unwrap();
    for i in 0..20_000 {
        std::fs::File::create(root.join(format!("zzz/f{i:05}"))).unwrap();
    }
    let data = tempfile::tempdir().unwrap();
    let is = imageserver(data.path());
    let server = is.addr.clone();
    let image = add_image(&server, "app/1", &image_dir, "").await;
    let (_subd, c) = subd(&root);
    converge(&c, &server, "app/1", &image).await;

    // Two names flipped as fast as a shell can: a file with content (so the scan lists it
    // for hashing), then a FIFO, then a symlink to /dev/zero.
    let crash = root.join("var/crash");
    let flip = |name: &str| {
        format!(
            "cd {} && while :; do rm -f {name}; echo core > {name}; rm -f {name}; \
             mkfifo {name}; rm -f {name}; ln -s /dev/zero {name}; done",
            crash.display()
        )
    };
    let _a = AsNobody::start(&flip("a"));
    let _b = AsNobody::start(&flip("b"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::symlink_metadata(&crash).unwrap().uid(),
        0,
        "the flippers are running in the 1777 directory"
    );

    let short = PollRequest {
        have_generation: 0,
        short_only: true,
        ..Default::default()
    };
    // Scans keep completing while the names flip.
    let first = c.poll(&short).await.unwrap();
    let t0 = Instant::now();
    let mut last = first.scan_count;
    let mut advances = 0;
    while advances < 5 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the scanner stopped: scan_count stuck at {last} (generation {})",
            c.poll(&short).await.unwrap().generation
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let p = c.poll(&short).await.unwrap();
        if p.scan_count > last {
            advances += 1;
            last = p.scan_count;
        }
    }

    // Drift elsewhere is still reported and put back within seconds.
    std::fs::write(root.join("etc/app.conf"), "tampered\n").unwrap();
    let t0 = Instant::now();
    let gen = c.poll(&short).await.unwrap().generation;
    let p = full_poll(&c, gen).await;
    assert!(p.tree.is_some());
    converge(&c, &server, "app/1", &image).await;
    assert_eq!(
        std::fs::read_to_string(root.join("etc/app.conf")).unwrap(),
        "good\n"
    );
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(20), "drift fixed in {took:?}");
    eprintln!(
        "{advances} scans completed while flipping; drift put back in {:.1} s",
        took.as_secs_f64()
    );
    let after = c.poll(&short).await.unwrap();
    assert!(after.scan_count > first.scan_count);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_swapped_for_a_symlink_while_subd_runs_redirects_nothing() {
    if let Some(why) = cannot_run() {
        eprintln!("SKIPPING: {why}");
        return;
    }
    let (work, root, image_dir) = machine();
    let data = tempfile::tempdir().unwrap();
    let is = imageserver(data.path());
    let server = is.addr.clone();
    let image1 = add_image(&server, "app/1", &image_dir, "").await;
    let (subd1, c) = subd(&root);
    converge(&c, &server, "app/1", &image1).await;

    // Image 2 adds a setuid-root tool.
    let tool = b"#!/bin/sh\necho the real tool\n";
    std::fs::create_dir_all(image_dir.join("bin")).unwrap();
    std::fs::write(image_dir.join("bin/tool"), tool).unwrap();
    chmod(&image_dir.join("bin/tool"), 0o4755);
    let image2 = add_image(&server, "app/2", &image_dir, "").await;
    let hex = model::ObjectId::of(tool).to_hex();

    // The root becomes writable by others (an admin's chmod, an image's `/`), and nobody
    // prepares a directory outside the root with files subd would delete, overwrite or
    // install, then swaps `.subd` for a link to it.
    chmod(&root, 0o777);
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::chown(&outside, Some(NOBODY), Some(NOBODY)).unwrap();
    AsNobody::run(&format!(
        "mkdir -p {o}/staging {o}/objects/{h2} && echo victim > {o}/staging/0 && \
         echo planted > {o}/triggers.previous && echo '[[\"evil\",\"start\"]]' > {o}/pending-starts && \
         echo evil > {o}/objects/{h2}/{rest} && echo mine > {o}/last-image && \
         cd {r} && mv .subd moved && ln -s {o} .subd",
        o = outside.display(),
        r = root.display(),
        h2 = &hex[..2],
        rest = &hex[2..],
    ));
    let before = common::files_under(&outside)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect::<Vec<_>>();

    converge(&c, &server, "app/2", &image2).await;
    let installed = root.join("bin/tool");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        tool,
        "the verified object"
    );
    assert_eq!(
        std::fs::metadata(&installed).unwrap().mode() & 0o7777,
        0o4755
    );
    let after = common::files_under(&outside)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect::<Vec<_>>();
    assert_eq!(
        after, before,
        "nothing outside the root was created, deleted or changed"
    );
    assert!(
        root.join("moved/last-update.json").exists(),
        "subd kept using the state directory it opened at start"
    );

    // Restarted on this root, subd refuses, naming the problem in one line (the update
    // put the image's 0755 back on `/`: make it writable by others again).
    drop(subd1);
    chmod(&root, 0o777);
    let out = Command::new(bin("subd"))
        .args(["--root", root.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--permit-insecure-mode"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let err = stderr.lines().last().unwrap_or_default();
    assert!(
        err.starts_with("subd: ") && err.contains("writable by other users (mode 0777)"),
        "{stderr}"
    );
    chmod(&root, 0o755);
    let out = Command::new(bin("subd"))
        .args(["--root", root.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--permit-insecure-mode"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let err = stderr.lines().last().unwrap_or_default();
    assert!(
        err.contains(".subd is a symlink or not a directory"),
        "{stderr}"
    );
    let again = common::files_under(&outside)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect::<Vec<_>>();
    assert_eq!(again, before);
}
