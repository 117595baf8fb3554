//! Slow and idle clients against the real daemons (issue 9 #6): a slowloris (sockets that
//! send part of a request head and stop), over plain HTTP and over TLS after a completed
//! handshake, is closed after the header timeout while normal requests keep answering; an
//! idle kept-alive connection is closed; an upload that stops mid-body is cut off; and with
//! a 256-descriptor limit, 1,000 slow sockets do not stop normal requests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::{bin, spawn_listening, Daemon};
use wire::tls::TlsFiles;

const HEADER_TIMEOUT_SECS: u64 = 2;
const PARTIAL_HEAD: &[u8] = b"POST /rpc/Subd.Poll HTTP/1.1\r\nHost: x\r\nX-Slow: ";

/// The flags that start `daemon` on a free loopback port, with its data under `work`.
fn daemon_args(daemon: &str, work: &Path, header_timeout: u64) -> Vec<String> {
    let mut a: Vec<String> = match daemon {
        "imageserver" => vec!["--data-dir".into(), work.join("data").display().to_string()],
        "subd" => {
            std::fs::create_dir_all(work.join("root")).unwrap();
            vec!["--root".into(), work.join("root").display().to_string()]
        }
        "dominator" => {
            std::fs::write(work.join("mdb.json"), "[]").unwrap();
            vec![
                "--mdb".into(),
                work.join("mdb.json").display().to_string(),
                "--image-server".into(),
                "127.0.0.1:1".into(), // nothing listens there
            ]
        }
        _ => unreachable!(),
    };
    a.extend([
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--header-timeout-secs".into(),
        header_timeout.to_string(),
        "--transfer-timeout-secs".into(),
        HEADER_TIMEOUT_SECS.to_string(),
    ]);
    a
}

fn tls_flags(certs: &Path, daemon: &str) -> Vec<String> {
    vec![
        "--ca-file".into(),
        certs.join("CA.pem").display().to_string(),
        "--cert-file".into(),
        certs.join(daemon).join("cert.pem").display().to_string(),
        "--key-file".into(),
        certs.join(daemon).join("key.pem").display().to_string(),
    ]
}

fn admin(certs: &Path) -> TlsFiles {
    TlsFiles {
        ca: certs.join("CA.pem"),
        cert: certs.join("admin.cert"),
        key: certs.join("admin.key"),
    }
}

/// A socket of a slowloris: connected (and, over TLS, handshaken), part of a head sent.
enum Slow {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Slow {
    fn open(addr: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> std::io::Result<Slow> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut s = match tls {
            None => Slow::Plain(tcp),
            Some(cfg) => {
                let conn =
                    rustls::ClientConnection::new(cfg.clone(), "localhost".try_into().unwrap())
                        .unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock)?;
                }
                Slow::Tls(Box::new(s))
            }
        };
        s.stream().write_all(PARTIAL_HEAD)?;
        s.stream().flush()?;
        Ok(s)
    }

    fn stream(&mut self) -> &mut dyn ReadWrite {
        match self {
            Slow::Plain(s) => s,
            Slow::Tls(s) => s.as_mut(),
        }
    }

    /// Whether the server has closed this socket (EOF, reset, or a TLS close).
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 512];
        match self.stream().read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false, // an error reply: wait for the close that follows
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Status of `GET /metrics` on a fresh plain connection, and how long the reply took.
fn plain_get(addr: &str) -> (u16, Duration) {
    let t0 = Instant::now();
    let Ok(mut s) = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))
    else {
        return (0, t0.elapsed()); // not even accepted
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let status = String::from_utf8_lossy(&reply)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, t0.elapsed())
}

/// Status of `GET /metrics` over mutual TLS with the admin pair, and how long it took.
async fn tls_get(addr: &str, certs: &Path, role: &str) -> (u16, Duration) {
    let t0 = Instant::now();
    let c = wire::client::RpcClient::new(
        addr,
        0,
        &wire::client::ClientSecurity::Tls(admin(certs)),
        role,
        Some(Duration::from_secs(10)),
    )
    .unwrap();
    let status = match c.get_text("/metrics").await {
        Ok(_) => 200,
        Err(e) => e.status().unwrap_or(0),
    };
    (status, t0.elapsed())
}

/// Sockets of `pid` (the listener, the connections it holds, anything else it opened).
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

async fn slowloris_is_closed_and_normal_requests_answer(daemon: &str, tls: bool) {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    wire::certs::make_all(&certs, &[]).unwrap();
    let mut args = daemon_args(daemon, work.path(), HEADER_TIMEOUT_SECS);
    if tls {
        args.extend(tls_flags(&certs, daemon));
    } else {
        args.push("--permit-insecure-mode".into());
    }
    let d = Daemon::start(&bin(daemon), &args);
    let addr = d.addr.clone();
    let cfg = tls.then(|| Arc::new(wire::tls::client_config(&admin(&certs), daemon).unwrap()));
    let t0 = Instant::now();
    let mut slow: Vec<Slow> = (0..100)
        .map(|_| Slow::open(&addr, cfg.as_ref()).unwrap())
        .collect();
    let held = || sockets_of(d.child.id());
    while held() < 50 && t0.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(held() >= 50, "{daemon}: the slow sockets are held at first");
    // normal requests answer while they are open
    for _ in 0..3 {
        let (status, took) = if tls {
            tls_get(&addr, &certs, daemon).await
        } else {
            plain_get(&addr)
        };
        assert_eq!(status, 200, "{daemon} tls={tls}");
        assert!(
            took < Duration::from_secs(1),
            "{daemon} tls={tls}: a normal request took {took:?} under a slowloris"
        );
    }
    // ... and every slow socket is closed soon after the header timeout
    let deadline = Duration::from_secs(HEADER_TIMEOUT_SECS + 3);
    while t0.elapsed() < deadline && !slow.is_empty() {
        slow.retain_mut(|s| !s.closed());
    }
    assert!(
        slow.is_empty(),
        "{daemon} tls={tls}: {} of 100 slow sockets still open after {:?}",
        slow.len(),
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_is_closed_after_the_header_timeout_by_each_daemon_plain_and_tls() {
    for daemon in ["imageserver", "subd", "dominator"] {
        for tls in [false, true] {
            slowloris_is_closed_and_normal_requests_answer(daemon, tls).await;
        }
    }
}

#[test]
fn an_idle_kept_alive_connection_is_closed() {
    let work = tempfile::tempdir().unwrap();
    let mut args = daemon_args("subd", work.path(), HEADER_TIMEOUT_SECS);
    args.push("--permit-insecure-mode".into());
    let d = Daemon::start(&bin("subd"), &args);
    let addr = d.addr.clone();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(HEADER_TIMEOUT_SECS + 5)))
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // read the whole first reply (Content-Length), keeping the connection
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let body_len = loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before replying");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("content-length");
            if got.len() >= end + 4 + len {
                break len;
            }
        }
    };
    assert!(body_len > 0);
    let t0 = Instant::now();
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "nothing more is sent; the connection is closed");
    let idle = t0.elapsed();
    assert!(
        idle >= Duration::from_secs(HEADER_TIMEOUT_SECS - 1)
            && idle < Duration::from_secs(HEADER_TIMEOUT_SECS + 3),
        "closed after {idle:?}"
    );
}

#[test]
fn an_upload_that_stops_mid_body_is_cut_off() {
    let work = tempfile::tempdir().unwrap();
    let mut args = daemon_args("imageserver", work.path(), HEADER_TIMEOUT_SECS);
    args.push("--permit-insecure-mode".into());
    let d = Daemon::start(&bin("imageserver"), &args);
    let addr = d.addr.clone();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"POST /rpc/ObjectServer.AddObjects HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n0123456789")
        .unwrap();
    let t0 = Instant::now();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(4 * HEADER_TIMEOUT_SECS + 2),
        "a stalled upload held its connection for {took:?}"
    );
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 4"),
        "a stalled upload is refused, not accepted: {text}"
    );
}

/// With 256 descriptors, 1,000 slow sockets are attempted; normal requests still answer
/// within a second, and the daemon never holds more sockets than its limit allows.
#[test]
fn with_256_descriptors_1000_slow_sockets_do_not_stop_normal_requests() {
    use std::os::unix::process::CommandExt;
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if lim.current.unwrap_or(0) < 2048 {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
    let work = tempfile::tempdir().unwrap();
    let mut args = daemon_args("imageserver", work.path(), 30);
    args.push("--permit-insecure-mode".into());
    let mut cmd = std::process::Command::new(bin("imageserver"));
    cmd.args(&args);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setrlimit(
                rustix::process::Resource::Nofile,
                rustix::process::Rlimit {
                    current: Some(256),
                    maximum: Some(256),
                },
            )
            .map_err(std::io::Error::from)
        });
    }
    let (child, addr) = spawn_listening(&mut cmd);
    let addr = addr.to_string();
    let d = Daemon {
        child,
        addr: addr.clone(),
    };
    let slow: Vec<Slow> = (0..1000)
        .filter_map(|_| Slow::open(&addr, None).ok())
        .collect();
    eprintln!("{} slow sockets connected", slow.len());
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..5 {
        let (status, took) = plain_get(&addr);
        assert_eq!(status, 200);
        assert!(
            took < Duration::from_secs(1),
            "a normal request took {took:?} under 1,000 slow sockets"
        );
    }
    let held = sockets_of(d.child.id());
    assert!(held <= 256, "{held} sockets held with a limit of 256");
    drop(slow);
}

/// A client that asks for a large `GetObjects` reply and never reads it is cut off after
/// the transfer timeout: the imageserver no longer holds the connection.
#[test]
fn a_reply_the_client_stops_reading_is_cut_off() {
    let work = tempfile::tempdir().unwrap();
    let mut args = daemon_args("imageserver", work.path(), HEADER_TIMEOUT_SECS);
    args.push("--permit-insecure-mode".into());
    let d = Daemon::start(&bin("imageserver"), &args);
    let addr = d.addr.clone();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(tree.join("big"), &data).unwrap();
    let out = std::process::Command::new(bin("imagetool"))
        .args([
            "--image-server",
            &addr,
            "add",
            "big.0",
            tree.to_str().unwrap(),
            "",
            "",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = model::ObjectId::of(&data);
    std::thread::sleep(Duration::from_millis(200)); // imagetool's connections are gone
    let before = sockets_of(d.child.id());
    let body = serde_json::to_string(&model::api::GetObjectsRequest {
        hashes: vec![id; 4], // 128 MiB, far more than the socket buffers hold
    })
    .unwrap();
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /rpc/ObjectServer.GetObjects HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        sockets_of(d.child.id()),
        before + 1,
        "the reply is being sent"
    );
    let t0 = Instant::now();
    while sockets_of(d.child.id()) > before && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        sockets_of(d.child.id()),
        before,
        "the server still holds a connection whose reply is not read after {:?}",
        t0.elapsed()
    );
    drop(s);
}

/// Sends `head` and the first body byte on a fresh connection, then one more body byte
/// every second (under the 2 s transfer timeout, so never a stall); returns how long until
/// the server cut the request off, and its reply. Gives up after 12 s.
fn trickle_body(addr: &str, head: &str) -> (Duration, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let t0 = Instant::now();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < Duration::from_secs(12) {
        if s.write_all(b"{").is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    (t0.elapsed(), String::from_utf8_lossy(&reply).into_owned())
}

/// A request body trickled a byte a second (never silent for the transfer timeout) is cut
/// off within one pace window (the 2 s header timeout), whether it is a small JSON body
/// (subd's `Poll`) or declares 100,000 bytes (the imageserver's `AddObjects`).
#[test]
fn a_request_body_trickled_below_the_minimum_pace_is_cut_off_within_one_window() {
    for (daemon, head) in [
        (
            "subd",
            "POST /rpc/Subd.Poll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n",
        ),
        (
            "imageserver",
            "POST /rpc/ObjectServer.AddObjects HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n",
        ),
    ] {
        let work = tempfile::tempdir().unwrap();
        let mut args = daemon_args(daemon, work.path(), HEADER_TIMEOUT_SECS);
        args.push("--permit-insecure-mode".into());
        let d = Daemon::start(&bin(daemon), &args);
        let addr = d.addr.clone();
        let (took, reply) = trickle_body(&addr, head);
        assert!(
            took < Duration::from_secs(HEADER_TIMEOUT_SECS + 3),
            "{daemon}: a trickled body held its connection for {took:?}"
        );
        assert!(
            reply.is_empty() || reply.starts_with("HTTP/1.1 4"),
            "{daemon}: a trickled body is refused: {reply}"
        );
    }
}

/// An upload at a modest pace (40 KiB/s, five times the 8 KiB/s minimum, in 16 KiB bursts
/// 0.4 s apart) is stored whole.
#[test]
fn a_large_upload_at_a_modest_pace_succeeds() {
    let work = tempfile::tempdir().unwrap();
    let mut args = daemon_args("imageserver", work.path(), HEADER_TIMEOUT_SECS);
    args.push("--permit-insecure-mode".into());
    let d = Daemon::start(&bin("imageserver"), &args);
    let addr = d.addr.clone();
    let data: Vec<u8> = (0..192u32 << 10)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let id = model::ObjectId::of(&data);
    let mut body = model::frame::header(&id, data.len() as u64).to_vec();
    body.extend_from_slice(&data);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST /rpc/ObjectServer.AddObjects HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    let t0 = Instant::now();
    for chunk in body.chunks(16 << 10) {
        s.write_all(chunk).expect("the upload is not cut off");
        std::thread::sleep(Duration::from_millis(400));
    }
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.contains("\"added\":1"),
        "an upload taking {:?} was not stored: {reply}",
        t0.elapsed()
    );
}

/// With the connection limit (20) full of requests whose bodies are trickled (each
/// mid-request, so never idle), a normal request is still answered within a second: the
/// body furthest below its pace is closed to make room.
#[test]
fn with_the_connection_limit_full_of_trickled_bodies_a_normal_request_answers() {
    let work = tempfile::tempdir().unwrap();
    // a 10 s pace window: the trickled bodies are not yet cut off while we measure
    let mut args = daemon_args("subd", work.path(), 10);
    args.extend([
        "--permit-insecure-mode".to_string(),
        "--max-connections".into(),
        "20".into(),
    ]);
    let d = Daemon::start(&bin("subd"), &args);
    let addr = d.addr.clone();
    let head = "POST /rpc/Subd.Poll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{";
    let mut slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(head.as_bytes()).unwrap();
            s
        })
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickler = std::thread::spawn({
        let stop = stop.clone();
        move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &mut slow {
                    let _ = s.write_all(b" ");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    });
    let t0 = Instant::now();
    while sockets_of(d.child.id()) < 21 && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        sockets_of(d.child.id()) >= 21,
        "the trickled requests are held"
    );
    for _ in 0..5 {
        let (status, took) = plain_get(&addr);
        assert_eq!(
            status, 200,
            "a normal request with the limit full of trickled bodies"
        );
        assert!(
            took < Duration::from_secs(1),
            "a normal request took {took:?}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trickler.join().unwrap();
}
