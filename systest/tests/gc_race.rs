//! Unreferenced-object deletion racing uploads of the same objects, over the real
//! binaries: an imageserver with a 2 s pin grace period, `imagetool delunrefobj 100 0` in a
//! loop, and `imagetool add` of one tree again and again (each image deleted after it is
//! checked, so its objects are unreferenced and collectable when the next add sends them).
//! Every image the server accepts must come back whole with `imagetool get`.

mod common;

use common::check_objects;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use testkit::bin;

const FILES: usize = 2000;
const ROUNDS: usize = 8;

fn imagetool(addr: &str, args: &[&str]) -> Output {
    Command::new(bin("imagetool"))
        .args(["--image-server", addr])
        .args(args)
        .output()
        .unwrap()
}

fn content(j: usize) -> Vec<u8> {
    format!("file {j} of the raced tree\n")
        .repeat(j % 7 + 1)
        .into_bytes()
}

/// `got` holds exactly the tree's files with the tree's contents.
fn same_files(got: &Path) -> Result<(), String> {
    for j in 0..FILES {
        let p = got.join(format!("f{j:05}"));
        let d = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        if d != content(j) {
            return Err(format!(
                "{}: {} bytes, not the uploaded ones",
                p.display(),
                d.len()
            ));
        }
    }
    Ok(())
}

#[test]
fn unreferenced_deletion_racing_uploads_never_breaks_an_accepted_image() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    for j in 0..FILES {
        std::fs::write(tree.join(format!("f{j:05}")), content(j)).unwrap();
    }
    let data = work.path().join("data");
    let server = common::imageserver_with(&data, &["--object-pin-seconds", "2"]);
    let addr = server.addr.clone();
    let stop = AtomicBool::new(false);
    let deleted = AtomicUsize::new(0);
    let mut accepted = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let out = imagetool(&addr, &["--json", "delunrefobj", "100", "0"]);
                assert!(
                    out.status.success(),
                    "delunrefobj: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                deleted.fetch_add(1, Ordering::Relaxed);
            }
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for i in 0..ROUNDS {
                let name = format!("gc/{i}");
                // With a short pin grace, the deletion may take objects between the
                // upload and AddImage: the add then fails cleanly and is tried again.
                let mut added = false;
                for _ in 0..5 {
                    let out = imagetool(&addr, &["add", &name, tree.to_str().unwrap(), "", ""]);
                    if out.status.success() {
                        added = true;
                        break;
                    }
                    let err = String::from_utf8_lossy(&out.stderr);
                    assert!(err.contains("not available"), "round {i}: add: {err}");
                }
                assert!(added, "round {i}: add never succeeded");
                let dir = work.path().join(format!("got{i}"));
                let out = imagetool(&addr, &["get", &name, dir.to_str().unwrap()]);
                assert!(
                    out.status.success(),
                    "round {i}: get of an accepted image failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                same_files(&dir).unwrap_or_else(|e| panic!("round {i}: {e}"));
                std::fs::remove_dir_all(&dir).unwrap();
                accepted.push(name.clone());
                // Unreferenced again, for the next round to race.
                if i + 1 < ROUNDS {
                    assert!(imagetool(&addr, &["delete", &name]).status.success());
                }
            }
        }));
        stop.store(true, Ordering::Relaxed);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    });
    // The last image, checked again once the deletions have stopped.
    let last = accepted.last().unwrap();
    let dir = work.path().join("final");
    let out = imagetool(&addr, &["get", last, dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    same_files(&dir).unwrap();
    check_objects(&data.join("objects"), true);
    eprintln!(
        "{ROUNDS} images accepted and fetched whole; {} delunrefobj runs",
        deleted.load(Ordering::Relaxed)
    );
}
