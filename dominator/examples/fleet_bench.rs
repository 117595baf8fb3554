//! Fleet benchmark (dominator side): N in-process *simulated* subds (real HTTP on their own
//! loopback ports, trees held in memory, plans applied to the in-memory tree) and the real
//! `dominator` binary as a separate process. Measures the time from one MDB write that
//! changes every machine's RequiredImage until all are `synced`, the dominator's peak RSS
//! (VmHWM), and the bytes of a compliant machine's poll for small and large trees.
//!
//! Run: `bench/fleet.sh [MACHINES]` (builds in release and runs this example).

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use model::api::{self, PollRequest, PollResponse, UpdateResult};
use model::{FileTree, FsPath, Image, Inode, Mtime, ObjectId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wire::http::{ApiError, Json, Security};

#[derive(Default)]
struct Sim {
    tree: FileTree,
    cache: Vec<ObjectId>,
    generation: u64,
    scans: u64,
    last_update: Option<UpdateResult>,
    next_ino: u64,
}
type Sub = Arc<Mutex<Sim>>;

fn tree(files: usize, salt: &str) -> FileTree {
    let mut t = FileTree::with_root(Inode::dir(0o755, 0, 0));
    t.inodes.insert(1, Inode::dir(0o755, 0, 0));
    t.entries.insert("/data".parse().unwrap(), 1);
    for i in 0..files {
        let c = format!("{salt}{i}");
        t.inodes.insert(
            10 + i as u64,
            Inode::file(
                0o644,
                0,
                0,
                Mtime { sec: 1, nsec: 0 },
                c.len() as u64,
                Some(ObjectId::of(c.as_bytes())),
            ),
        );
        t.entries
            .insert(format!("/data/f{i}").parse().unwrap(), 10 + i as u64);
    }
    t
}

async fn poll(State(s): State<Sub>, Json(req): Json<PollRequest>) -> axum::Json<PollResponse> {
    let mut m = s.lock().unwrap();
    m.scans += 1;
    let send = !req.short_only && req.have_generation != m.generation;
    axum::Json(PollResponse {
        generation: m.generation,
        scan_count: m.scans,
        start_time: 1,
        last_update: m.last_update.clone(),
        tree: send.then(|| m.tree.clone()),
        object_cache: send.then(|| m.cache.clone()),
        ..PollResponse::default()
    })
}

async fn fetch(State(s): State<Sub>, Json(req): Json<api::FetchRequest>) -> axum::Json<api::Empty> {
    let mut m = s.lock().unwrap();
    m.cache.extend(req.hashes);
    m.generation += 1;
    axum::Json(api::Empty {})
}

async fn cleanup(
    State(s): State<Sub>,
    Json(req): Json<api::CleanupRequest>,
) -> axum::Json<api::Empty> {
    let mut m = s.lock().unwrap();
    let gone: std::collections::HashSet<ObjectId> = req.hashes.into_iter().collect();
    m.cache.retain(|h| !gone.contains(h));
    m.generation += 1;
    axum::Json(api::Empty {})
}

async fn update(
    State(s): State<Sub>,
    Json(req): Json<api::UpdateRequest>,
) -> Result<axum::Json<api::UpdateResponse>, ApiError> {
    let mut m = s.lock().unwrap();
    let p = req.plan;
    for pi in p.dirs_to_make.iter().chain(&p.inodes_to_make) {
        // Activation renames the cached object into place, as subd does.
        if let Some(h) = pi.inode.hash {
            if let Some(at) = m.cache.iter().position(|c| *c == h) {
                m.cache.swap_remove(at);
            }
        }
        let n = m.next_ino;
        m.next_ino += 1;
        m.tree.remove_subtree(&pi.path);
        m.tree.inodes.insert(n, pi.inode.clone());
        m.tree.entries.insert(pi.path.clone(), n);
    }
    for d in &p.paths_to_delete {
        m.tree.remove_subtree(d);
    }
    m.generation += 1;
    m.last_update = Some(UpdateResult {
        image_name: p.image_name,
        ..UpdateResult::default()
    });
    Ok(axum::Json(api::UpdateResponse::default()))
}

async fn get_image(
    State(s): State<Arc<HashMap<String, Image>>>,
    Json(req): Json<api::ImageNameRequest>,
) -> Result<axum::Json<Image>, ApiError> {
    s.get(&req.name)
        .cloned()
        .map(axum::Json)
        .ok_or(ApiError::NotFound(req.name))
}

async fn listen(app: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap().to_string();
    tokio::spawn(wire::http::serve(
        l,
        app,
        Security::Insecure,
        std::future::pending(),
    ));
    a
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

async fn counts(http: &reqwest::Client, base: &str) -> serde_json::Value {
    http.get(format!("{base}/api/fleet"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let (small, large) = (10usize, 2000usize);
    let mut images = HashMap::new();
    for v in ["app.1", "app.2"] {
        let mut t = FileTree::with_root(Inode::dir(0o755, 0, 0));
        t.inodes.insert(1, Inode::dir(0o755, 0, 0));
        t.entries.insert("/etc".parse().unwrap(), 1);
        let c = format!("config {v}\n");
        t.inodes.insert(
            2,
            Inode::file(
                0o644,
                0,
                0,
                Mtime { sec: 1, nsec: 0 },
                c.len() as u64,
                Some(ObjectId::of(c.as_bytes())),
            ),
        );
        t.entries.insert("/etc/app.conf".parse().unwrap(), 2);
        images.insert(
            v.to_string(),
            Image::new(t, None, model::Triggers::default()),
        );
    }
    let is = listen(
        Router::new()
            .route("/rpc/ImageServer.GetImage", post(get_image))
            .with_state(Arc::new(images)),
    )
    .await;
    let mut subs = Vec::new();
    for i in 0..n {
        let files = if i % 2 == 0 { small } else { large };
        let sub: Sub = Arc::new(Mutex::new(Sim {
            tree: tree(files, &format!("m{i}-")),
            generation: 1,
            scans: 1,
            next_ino: 1_000_000,
            ..Sim::default()
        }));
        let app = Router::new()
            .route("/rpc/Subd.Poll", post(poll))
            .route("/rpc/Subd.Fetch", post(fetch))
            .route("/rpc/Subd.Update", post(update))
            .route("/rpc/Subd.Cleanup", post(cleanup))
            .with_state(sub.clone());
        subs.push((listen(app).await, sub));
    }
    let dir = tempfile::tempdir().unwrap();
    let mdb_path = dir.path().join("mdb.json");
    let write_mdb = |img: &str| {
        let v: Vec<serde_json::Value> = subs.iter().enumerate()
            .map(|(i, (a, _))| serde_json::json!({"Hostname": format!("m{i:04}"), "IpAddress": a, "RequiredImage": img}))
            .collect();
        disk::fsutil::write_atomic(&mdb_path, serde_json::to_string(&v).unwrap().as_bytes())
            .unwrap();
    };
    write_mdb("app.1");
    let exe = std::env::current_exe().unwrap();
    let dom_bin = exe.parent().unwrap().parent().unwrap().join("dominator");
    let (mut child, addr) = testkit::spawn_listening(
        std::process::Command::new(&dom_bin)
            .args([
                "--mdb",
                mdb_path.to_str().unwrap(),
                "--image-server",
                &is,
                "--listen",
                "127.0.0.1:0",
                "--permit-insecure-mode",
                "--ca-file",
                "/nonexistent",
            ])
            .env("RUST_LOG", "warn"),
    );
    let base = format!("http://{addr}");
    let pid = child.id();
    let http = reqwest::Client::new();
    let wait_synced = |label: &'static str| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Ok(r) = http.get(format!("{base}/api/fleet")).send().await else {
                    continue;
                };
                let v: serde_json::Value = r.json().await.unwrap();
                if v["counts"]["synced"].as_u64() == Some(n as u64) {
                    return t0.elapsed();
                }
                if t0.elapsed() > Duration::from_secs(600) {
                    panic!("{label}: not synced after 600 s: {}", v["counts"]);
                }
            }
        }
    };
    let first = wait_synced("initial").await;
    write_mdb("app.2");
    let t0 = Instant::now();
    // Synced on the new image: wait until every report names app.2 and all are synced.
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let v = counts(&http, &base).await;
        let all_new = v["machines"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["required_image"] == "app.2" && m["status_name"] == "synced");
        if all_new {
            break;
        }
    }
    let rollout = t0.elapsed();
    let want = ObjectId::of(b"config app.2\n");
    let applied = subs
        .iter()
        .filter(|(_, s)| {
            s.lock()
                .unwrap()
                .tree
                .get(&"/etc/app.conf".parse::<FsPath>().unwrap())
                .and_then(|i| i.hash)
                == Some(want)
        })
        .count();
    // Let every machine do a few compliant polls, then read their poll sizes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = counts(&http, &base).await;
    let mut sizes: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    for m in v["machines"].as_array().unwrap() {
        let i: usize = m["host"].as_str().unwrap()[1..].parse().unwrap();
        sizes[i % 2].push(m["last_poll_bytes"].as_u64().unwrap());
    }
    let avg = |v: &Vec<u64>| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    let rss = vm_hwm_kib(pid);
    println!(
        "machines: {n}; initial convergence: {:.1} s",
        first.as_secs_f64()
    );
    println!(
        "rollout (one MDB write -> all synced on the new image): {:.1} s; applied on {applied}/{n}",
        rollout.as_secs_f64()
    );
    println!("dominator peak RSS (VmHWM): {:.1} MiB", rss as f64 / 1024.0);
    println!("compliant poll reply: {:.0} bytes with {small}-file trees, {:.0} bytes with {large}-file trees", avg(&sizes[0]), avg(&sizes[1]));
    let _ = child.kill();
    let _ = child.wait();
}
