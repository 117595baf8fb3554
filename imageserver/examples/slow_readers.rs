//! How fast a real imageserver answers `GetImage` while many `GetObjects` streams are open
//! whose clients never read, against the same `GetImage` on the idle server, as a ratio.
//!
//! `cargo run --release -p imageserver --example slow_readers -- IMAGESERVER STREAMS [SERVER ARGS...]`

use model::image::{FileTree, Inode, Mtime};
use model::{frame, Image, ObjectId};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use wire::client::{ClientSecurity, ImageServerClient};

/// Median `GetImage` time over `n` calls (a call over 10 s counts as 10 s).
async fn median_get_image(c: &ImageServerClient, n: usize) -> Duration {
    let mut v = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), c.get_image("bench/1")).await;
        if !matches!(r, Ok(Ok(_))) {
            eprintln!("GetImage failed or timed out");
        }
        v.push(t.elapsed());
    }
    v.sort();
    v[n / 2]
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let bin = args.next().expect("IMAGESERVER");
    let streams: usize = args.next().map_or(500, |n| n.parse().unwrap());
    let extra: Vec<String> = args.collect();
    let dir = tempfile::tempdir().unwrap();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let server = testkit::Daemon::imageserver(Path::new(&bin), dir.path(), &extra);
    let addr = server.addr.clone();
    let c = ImageServerClient::new(&addr, &ClientSecurity::Insecure).unwrap();
    let mut x = 0x9e3779b97f4a7c15u64;
    let obj: Vec<u8> = (0..(8usize << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let id = ObjectId::of(&obj);
    let mut body = frame::header(&id, obj.len() as u64).to_vec();
    body.extend_from_slice(&obj);
    c.add_objects(body.into()).await.unwrap();
    let mut t = FileTree::with_root(Inode::dir(0o755, 0, 0));
    for i in 0..2000u64 {
        let m = Mtime { sec: 1, nsec: 0 };
        let size = obj.len() as u64;
        t.inodes
            .insert(i + 1, Inode::file(0o644, 0, 0, m, size, Some(id)));
        t.entries.insert(format!("/f{i}").parse().unwrap(), i + 1);
    }
    c.add_image("bench/1", &Image::new(t, None, Default::default()))
        .await
        .unwrap();
    let idle = median_get_image(&c, 21).await;
    let req = serde_json::to_vec(&model::api::GetObjectsRequest { hashes: vec![id] }).unwrap();
    let mut conns = Vec::new();
    let mut refused = 0;
    for _ in 0..streams {
        let head = format!(
            "POST /rpc/{} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            model::api::methods::GET_OBJECTS,
            req.len()
        );
        // The server may refuse or shed connections beyond its bounds: counted, not fatal.
        let sent = async {
            let mut conn = tokio::net::TcpStream::connect(&addr).await?;
            conn.write_all(head.as_bytes()).await?;
            conn.write_all(&req).await?;
            std::io::Result::Ok(conn)
        };
        match sent.await {
            Ok(conn) => conns.push(conn),
            Err(_) => refused += 1,
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = median_get_image(&c, 21).await;
    println!(
        "GetImage (2,000 files) median of 21: idle {:.2} ms, with {streams} unread GetObjects streams ({refused} refused while sending) {:.2} ms, ratio {:.1}",
        idle.as_secs_f64() * 1e3,
        loaded.as_secs_f64() * 1e3,
        loaded.as_secs_f64() / idle.as_secs_f64()
    );
    drop(conns);
    drop(server);
}
