//! Fleet benchmark (dominator side): N in-process *simulated* subds (`testkit::fake`: real
//! HTTP, all machines behind ONE listening socket, each on its own loopback address
//! 127.1.x.y, trees held in memory, plans applied to the in-memory tree) and the real
//! `dominator` binary as a separate process. Measures the time from one MDB write that
//! changes every machine's RequiredImage until all are `synced`, the dominator's peak RSS
//! (VmHWM), and the bytes of a compliant machine's poll for small and large trees.
//!
//! Every `LARGE_EVERY`-th machine (default 10) holds a 2,000-file tree, the others 10 files.
//!
//! Run: `bench/fleet.sh [MACHINES] [LARGE_EVERY]` (builds in release and runs this example).

use model::{FileTree, Image, Inode, Mtime, ObjectId};
use std::time::{Duration, Instant};
use testkit::fake::{self, FakeImages, FakeSubd};

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

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The process's user + system CPU time, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

/// How many descriptors the process holds open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The one-minute load average.
fn load1() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
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
    let large_every: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
        .max(1);
    let (small, large) = (10usize, 2000usize);
    let images = FakeImages::default();
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
        images.lock().unwrap().insert(
            v.to_string(),
            Image::new(t, None, model::Triggers::default()),
        );
    }
    let is = fake::start_imageserver(images).await;
    let sims: Vec<_> = (0..n)
        .map(|i| {
            let files = if i.is_multiple_of(large_every) {
                large
            } else {
                small
            };
            FakeSubd::new(tree(files, &format!("m{i}-")))
        })
        .collect();
    let addrs = fake::start_subds(&sims).await.expect("simulator listener");
    let subs: Vec<_> = addrs.into_iter().zip(sims).collect();
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
            .args(
                std::env::var("DOMINATOR_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
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
                tokio::time::sleep(Duration::from_millis(500)).await;
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
    let want = ObjectId::of(b"config app.2\n");
    let applied_count = || {
        subs.iter()
            .filter(|(_, s)| s.lock().unwrap().content("/etc/app.conf") == Some(want))
            .count()
    };
    let cpu0 = cpu_seconds(pid);
    write_mdb("app.2");
    let t0 = Instant::now();
    // Applied everywhere (read from the simulator, cheaply), then synced on the new image:
    // every report names app.2 and all are synced (read from the dominator's API).
    while applied_count() < n {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let rollout_cpu = cpu_seconds(pid) - cpu0;
    let applied = applied_count();
    let load_after_rollout = load1();
    // Let every machine do a few compliant polls, then read their poll sizes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = counts(&http, &base).await;
    let mut sizes: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    for m in v["machines"].as_array().unwrap() {
        let i: usize = m["host"].as_str().unwrap()[1..].parse().unwrap();
        sizes[usize::from(i.is_multiple_of(large_every))]
            .push(m["last_poll_bytes"].as_u64().unwrap());
    }
    let avg = |v: &Vec<u64>| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    let rss = vm_hwm_kib(pid);
    let fds = open_fds(pid);
    println!(
        "machines: {n}; initial convergence: {:.1} s",
        first.as_secs_f64()
    );
    println!(
        "rollout (one MDB write -> all synced on the new image): {:.1} s; applied on {applied}/{n}",
        rollout.as_secs_f64()
    );
    println!("dominator peak RSS (VmHWM): {:.1} MiB", rss as f64 / 1024.0);
    println!("dominator CPU during the rollout: {rollout_cpu:.1} s; open descriptors: {fds}");
    println!("compliant poll reply: {:.0} bytes with {small}-file trees, {:.0} bytes with {large}-file trees", avg(&sizes[0]), avg(&sizes[1]));
    println!(
        "SUMMARY fleet machines={n} rollout_s={:.1} initial_s={:.1} dominator_cpu_s={rollout_cpu:.1} peak_rss_mib={:.1} fds={fds} poll_bytes={:.0}/{:.0} applied={applied} load1={load_after_rollout}",
        rollout.as_secs_f64(),
        first.as_secs_f64(),
        rss as f64 / 1024.0,
        avg(&sizes[0]),
        avg(&sizes[1]),
    );
    let _ = child.kill();
    let _ = child.wait();
}
