//! Helpers shared by the system tests: starting the real daemons, polling subd, driving it
//! to an image the way the dominator does, and checking an object store.
#![allow(dead_code)]

use disk::fsutil::TEMP_SUFFIX;
use model::api::{FetchRequest, PollResponse, UpdateRequest};
use model::diff::DiffOptions;
use model::{Image, ObjectId};
use std::path::Path;
use std::time::{Duration, Instant};
pub use testkit::files_under;
use testkit::{bin, Daemon};
use wire::client::{ClientSecurity, SubdClient};

/// Every object file's bytes hash to its name; temp files are tolerated only when
/// `allow_temp` (before a restart cleans them). Returns the number of objects.
pub fn check_objects(objects: &Path, allow_temp: bool) -> usize {
    let mut n = 0;
    for f in files_under(objects) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(TEMP_SUFFIX) {
            assert!(allow_temp, "temp file left after restart: {}", f.display());
            continue;
        }
        let rel = f
            .strip_prefix(objects)
            .unwrap()
            .to_string_lossy()
            .replace('/', "");
        let want =
            ObjectId::from_hex(&rel).unwrap_or_else(|_| panic!("stray file {}", f.display()));
        let got = ObjectId::of(&std::fs::read(&f).unwrap());
        assert_eq!(got, want, "partial or corrupt object {}", f.display());
        n += 1;
    }
    n
}

/// An insecure imageserver on a free loopback port (its address in `Daemon::addr`).
pub fn imageserver(data: &Path) -> Daemon {
    imageserver_with(data, &[])
}

/// An insecure imageserver on a free loopback port with `extra` flags.
pub fn imageserver_with(data: &Path, extra: &[&str]) -> Daemon {
    Daemon::imageserver(&bin("imageserver"), data, extra)
}

/// An insecure subd of `root` on a free loopback port, and a client of it.
pub fn subd(root: &Path) -> (Daemon, SubdClient) {
    let args = [
        "--root",
        root.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--permit-insecure-mode",
        "--scan-speed-percent",
        "100",
    ];
    let d = Daemon::start(&bin("subd"), &args.map(String::from));
    let c = SubdClient::new(
        &d.addr,
        &ClientSecurity::Insecure,
        Some(Duration::from_secs(30)),
    )
    .unwrap();
    (d, c)
}

pub async fn full_poll(c: &SubdClient, newer_than: u64) -> PollResponse {
    testkit::drive::poll_after(c, newer_than).await
}

pub fn plan_for(name: &str, image: &Image, p: &PollResponse) -> model::UpdatePlan {
    testkit::drive::plan_for(name, image, p, &DiffOptions { allow_unsafe: true })
}

/// Drives one subd to `image` the way the dominator does: poll, fetch, update, confirm.
pub async fn converge(c: &SubdClient, server: &str, name: &str, image: &Image) {
    for _ in 0..5 {
        let mut p = full_poll(c, 0).await;
        let mut plan = plan_for(name, image, &p);
        if plan.is_empty() {
            return;
        }
        if !plan.objects_to_fetch.is_empty() {
            (p, plan) = fetch_then_replan(c, server, name, image, p, plan).await;
            if plan.is_empty() {
                return;
            }
        }
        let r = c
            .update(&UpdateRequest { plan, wait: true })
            .await
            .expect("update");
        let r = r.result.expect("waited");
        if !r.errors.is_empty() {
            // As the dominator does: report, then re-plan from a scan newer than the update.
            eprintln!(
                "update errors (re-planning after the next scan): {:?}",
                r.errors
            );
        }
        // the next scan must show convergence
        let gen = p.generation;
        let after = full_poll(c, gen).await;
        if plan_for(name, image, &after).is_empty() {
            return;
        }
    }
    panic!("subd did not converge to {name}");
}

/// Adds the directory `dir` as image `name` with the real imagetool (`filter`: "" = sparse)
/// and returns the image as the server stores it.
pub async fn add_image(server: &str, name: &str, dir: &Path, filter: &str) -> Image {
    let out = std::process::Command::new(bin("imagetool"))
        .args([
            "--image-server",
            server,
            "add",
            name,
            dir.to_str().unwrap(),
            filter,
            "",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "imagetool add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wire::client::ImageServerClient::new(server, &ClientSecurity::Insecure)
        .unwrap()
        .get_image(name)
        .await
        .unwrap()
}

/// Fetches what `plan` lacks (waiting for the fetch), then re-polls until a scan shows the
/// objects in the cache; returns that poll and the plan computed from it.
pub async fn fetch_then_replan(
    c: &SubdClient,
    server: &str,
    name: &str,
    image: &Image,
    mut p: PollResponse,
    mut plan: model::UpdatePlan,
) -> (PollResponse, model::UpdatePlan) {
    if !plan.objects_to_fetch.is_empty() {
        let req = FetchRequest {
            server: server.to_string(),
            hashes: plan.objects_to_fetch.clone(),
            wait: true,
            ..Default::default()
        };
        c.fetch(&req).await.expect("fetch");
    }
    let t0 = Instant::now();
    while !plan.objects_to_fetch.is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "fetched objects never showed up"
        );
        p = full_poll(c, p.generation).await;
        plan = plan_for(name, image, &p);
    }
    (p, plan)
}
