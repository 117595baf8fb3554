//! Peak memory (VmHWM) of a real imageserver receiving one large `AddImage`.
//!
//! `cargo run --release -p imageserver --example addimage_rss -- [IMAGESERVER] [FILES]`
//! (defaults: `target/release/imageserver`, 400000 files, about 90 MiB of JSON).

use model::image::{FileTree, Inode, Mtime};
use model::Image;
use std::path::Path;
use std::time::Instant;
use wire::client::{ClientSecurity, ImageServerClient};

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let bin = args
        .next()
        .unwrap_or_else(|| "target/release/imageserver".into());
    let files: u64 = args.next().map_or(400_000, |n| n.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let server = testkit::Daemon::imageserver(Path::new(&bin), dir.path(), &[]);
    let addr = server.addr.clone();
    let mut t = FileTree::with_root(Inode::dir(0o755, 0, 0));
    for i in 0..files {
        let m = Mtime { sec: 1, nsec: 0 };
        t.inodes
            .insert(i + 1, Inode::file(0o644, 1000, 1000, m, 0, None));
        t.entries.insert(
            format!("/usr/share/doc/a-package-with-a-long-name-{i:08}")
                .parse()
                .unwrap(),
            i + 1,
        );
    }
    // the parents the tree needs
    for (k, d) in ["/usr", "/usr/share", "/usr/share/doc"]
        .into_iter()
        .enumerate()
    {
        let ino = files + 1 + k as u64;
        t.inodes.insert(ino, Inode::dir(0o755, 0, 0));
        t.entries.insert(d.parse().unwrap(), ino);
    }
    let image = Image::new(t, None, Default::default());
    let json_len = serde_json::to_vec(&image).unwrap().len();
    let client = ImageServerClient::new(&addr, &ClientSecurity::Insecure).unwrap();
    let idle = vm_hwm_kib(server.child.id());
    let start = Instant::now();
    client.add_image("big/1", &image).await.unwrap();
    let took = start.elapsed();
    let peak = vm_hwm_kib(server.child.id());
    println!(
        "AddImage of {files} files ({:.1} MiB JSON) took {:.2} s; imageserver VmHWM {:.1} MiB idle, {:.1} MiB after (+{:.1} MiB)",
        json_len as f64 / 1048576.0,
        took.as_secs_f64(),
        idle as f64 / 1024.0,
        peak as f64 / 1024.0,
        (peak - idle) as f64 / 1024.0
    );
    drop(server);
}
