//! Test support shared by integration tests: `FaultProxy`, a loopback TCP proxy that sits
//! between a client and a real server and misbehaves on demand (HTTP 500s, connection
//! resets, truncated or 1-byte-per-second replies, oversized bodies), so tests can show
//! that retries are bounded, memory stays bounded and nothing half-written is stored.
//! Also: the real binaries (`bin`, `spawn_listening`, `Daemon`), a small tmpfs (`Tmpfs`),
//! `files_under`, and `drive`, which polls, plans and updates a subd the way the dominator
//! does; `fake`, an in-memory subd and imageserver over real sockets; `net`, loopback
//! addresses that refuse or never answer; `tree`, directory trees compared path by path;
//! `garage`, a real single-node Garage (S3) with a key and a bucket, or a three-node cluster.

pub mod browser;
pub mod drive;
pub mod fake;
pub mod garage;
pub mod net;
pub mod tree;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the proxy treats each new connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward faithfully.
    Pass,
    /// Answer every request with `500 Internal Server Error` without contacting the server.
    Status500,
    /// Close the connection as soon as the request starts arriving.
    Reset,
    /// Forward the request, then pass only the first `n` bytes of the reply and close.
    TruncateReply(usize),
    /// Forward the request, then dribble the reply at one byte per `interval`.
    SlowReply(Duration),
    /// Answer `200 OK` with a body that never ends (random bytes forever).
    EndlessReply,
}

/// A running proxy; dropping it stops accepting.
pub struct FaultProxy {
    pub addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    connections: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `target` on an ephemeral loopback port.
    pub async fn start(target: SocketAddr, fault: Fault) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let fault = Arc::new(Mutex::new(fault));
        let connections = Arc::new(Mutex::new(0));
        let (f, c) = (fault.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                *c.lock().unwrap() += 1;
                let mode = f.lock().unwrap().clone();
                tokio::spawn(handle(client, target, mode));
            }
        });
        FaultProxy {
            addr,
            fault,
            connections,
            task,
        }
    }

    /// Changes the behaviour for connections accepted from now on.
    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Connections accepted so far (to show retries are bounded).
    pub fn connections(&self) -> u64 {
        *self.connections.lock().unwrap()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(mut client: TcpStream, target: SocketAddr, mode: Fault) {
    match mode {
        Fault::Reset => {
            let mut buf = [0u8; 1];
            let _ = client.read(&mut buf).await;
            drop(client);
        }
        Fault::Status500 => {
            let mut buf = vec![0u8; 65536];
            let _ = tokio::time::timeout(Duration::from_millis(200), client.read(&mut buf)).await;
            let body = "{\"error\":\"injected fault\"}";
            let resp = format!(
                "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.write_all(resp.as_bytes()).await;
            let _ = client.shutdown().await;
        }
        Fault::EndlessReply => {
            let mut buf = vec![0u8; 65536];
            let _ = tokio::time::timeout(Duration::from_millis(200), client.read(&mut buf)).await;
            let _ = client
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            let chunk = vec![0x5au8; 65536];
            loop {
                let head = format!("{:x}\r\n", chunk.len());
                if client.write_all(head.as_bytes()).await.is_err()
                    || client.write_all(&chunk).await.is_err()
                    || client.write_all(b"\r\n").await.is_err()
                {
                    return;
                }
            }
        }
        Fault::Pass | Fault::TruncateReply(_) | Fault::SlowReply(_) => {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = server.set_nodelay(true);
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let up = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
                let _ = sw.shutdown().await;
            });
            let mut buf = vec![0u8; 65536];
            let mut sent = 0usize;
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                match &mode {
                    Fault::TruncateReply(limit) => {
                        let take = n.min(limit.saturating_sub(sent));
                        if cw.write_all(&buf[..take]).await.is_err() {
                            break;
                        }
                        sent += take;
                        if sent >= *limit {
                            break;
                        }
                    }
                    Fault::SlowReply(interval) => {
                        for b in &buf[..n] {
                            if cw.write_all(std::slice::from_ref(b)).await.is_err() {
                                up.abort();
                                return;
                            }
                            tokio::time::sleep(*interval).await;
                        }
                    }
                    _ => {
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            up.abort();
        }
    }
}

/// The path of a workspace binary built beside the running test (`target/<profile>/<name>`).
/// Panics with the command to run when it has not been built.
pub fn bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// How long a server may take to say where it listens.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// Starts `cmd` and waits for the line `PROGRAM: listening on ADDR` that every server prints
/// on stderr once bound (so tests start them on `--listen 127.0.0.1:0` instead of guessing a
/// free port); returns the child and ADDR. A thread copies all of the child's stderr, that
/// line included, to this process's stderr for as long as the child writes, so the pipe
/// never fills. Panics if the child exits or stays silent for 20 s first.
pub fn spawn_listening(cmd: &mut Command) -> (Child, SocketAddr) {
    let (child, mut addrs) = spawn_listening_n(cmd, 1);
    (child, addrs.remove(0))
}

/// `spawn_listening` for a server that prints `n` listening lines (its main listener,
/// then e.g. `--status-listen`'s): their addresses in the order printed.
pub fn spawn_listening_n(cmd: &mut Command, n: usize) -> (Child, Vec<SocketAddr>) {
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || forward_stderr(stderr, tx));
    let mut addrs = Vec::new();
    while addrs.len() < n {
        match rx.recv_timeout(LISTEN_TIMEOUT) {
            Ok(addr) => addrs.push(addr),
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!("{cmd:?} never said where it listens ({e}); it ended: {status:?}")
            }
        }
    }
    (child, addrs)
}

/// Copies `stderr` line by line to this process's stderr, sending the address of each
/// listening line to `tx` (while anyone listens).
fn forward_stderr(stderr: ChildStderr, tx: mpsc::Sender<SocketAddr>) {
    for line in BufReader::new(stderr).split(b'\n') {
        let Ok(line) = line else { break };
        if let Some(addr) = listening_addr(&line) {
            let _ = tx.send(addr);
        }
        let mut out = std::io::stderr().lock();
        let _ = out.write_all(&line);
        let _ = out.write_all(b"\n");
    }
}

/// ADDR of a line `PROGRAM: listening on ADDR`.
fn listening_addr(line: &[u8]) -> Option<SocketAddr> {
    wire::listening::parse_any(std::str::from_utf8(line).ok()?)
}

/// A real daemon process; killed (SIGKILL) when dropped.
pub struct Daemon {
    pub child: Child,
    /// Where it listens, as `IP:PORT`.
    pub addr: String,
}

impl Daemon {
    /// Starts `program args…` (whose `--listen` should be `127.0.0.1:0`) and waits until it
    /// says where it listens (`spawn_listening`).
    pub fn start(program: &std::path::Path, args: &[String]) -> Daemon {
        let (child, addr) = spawn_listening(Command::new(program).args(args));
        Daemon {
            child,
            addr: addr.to_string(),
        }
    }

    /// An insecure imageserver (`program`) of `data` on a free loopback port, with `extra`
    /// flags.
    pub fn imageserver(
        program: &std::path::Path,
        data: &std::path::Path,
        extra: &[&str],
    ) -> Daemon {
        let mut args: Vec<String> = ["--data-dir", &data.display().to_string()]
            .into_iter()
            .chain(["--listen", "127.0.0.1:0", "--permit-insecure-mode"])
            .map(String::from)
            .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        Daemon::start(program, &args)
    }

    /// An insecure subd (`program`) managing `root` on a free loopback port, with `extra`
    /// flags.
    pub fn subd(program: &std::path::Path, root: &str, extra: &[&str]) -> Daemon {
        let args: Vec<String> = ["--root", root, "--listen", "127.0.0.1:0"]
            .into_iter()
            .chain(["--permit-insecure-mode"])
            .chain(extra.iter().copied())
            .map(String::from)
            .collect();
        Daemon::start(program, &args)
    }

    /// An insecure dominator (`program`) of the MDB file `mdb`, against `image_server`,
    /// polling every `poll_ms` milliseconds, on a free loopback port.
    pub fn dominator(
        program: &std::path::Path,
        mdb: &str,
        image_server: &str,
        poll_ms: u64,
    ) -> Daemon {
        let poll = poll_ms.to_string();
        let args = [
            "--mdb",
            mdb,
            "--image-server",
            image_server,
            "--listen",
            "127.0.0.1:0",
            "--permit-insecure-mode",
            "--poll-interval-ms",
            &poll,
        ];
        Daemon::start(program, &args.map(String::from))
    }

    /// A client of this (insecure) dominator's pages and API, with a 30 s timeout.
    pub fn dominator_api(&self) -> wire::client::RpcClient {
        wire::client::RpcClient::new(
            &self.addr,
            wire::client::DOMINATOR_PORT,
            &wire::client::ClientSecurity::Insecure,
            wire::client::DOMINATOR_NAME,
            Some(std::time::Duration::from_secs(30)),
        )
        .expect("a client of the dominator")
    }

    /// SIGKILL, as a crash or a power cut would, and reap it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A small tmpfs mounted for a test and unmounted when dropped: a file-system that can
/// really fill up. `None` when mounting is not permitted here (tests then say they skip).
pub struct Tmpfs(pub std::path::PathBuf);

impl Tmpfs {
    pub fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Every regular file below `dir`, recursively (none if `dir` is missing).
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// A workspace binary that exited non-zero: its stderr, then its stdout.
#[derive(Debug, PartialEq, Eq)]
pub struct BinFailed(pub String);

impl std::fmt::Display for BinFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BinFailed {}

impl std::ops::Deref for BinFailed {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Runs the workspace binary `program` with `args` (no `MDB_FILE` from the caller's
/// environment): its stdout, or its stderr and stdout when it fails.
pub fn run_bin(program: &str, args: &[&str]) -> Result<String, BinFailed> {
    let out = Command::new(bin(program))
        .args(args)
        .env_remove("MDB_FILE")
        .output()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(BinFailed(format!(
            "{}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// `run_bin`, panicking on a failure: its stdout.
pub fn run_bin_ok(program: &str, args: &[&str]) -> String {
    run_bin(program, args).unwrap_or_else(|e| panic!("{program} {args:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_the_address_and_other_lines_pass() {
        let (mut child, addr) = spawn_listening(Command::new("sh").args([
            "-c",
            "echo starting >&2; echo 'fake: listening on 127.0.0.1:4567' >&2; echo more >&2",
        ]));
        assert_eq!(addr, "127.0.0.1:4567".parse().unwrap());
        assert!(child.wait().unwrap().success());
        assert_eq!(
            listening_addr(b"subd: listening on [::1]:80"),
            "[::1]:80".parse().ok()
        );
        assert_eq!(listening_addr(b"listening on nothing"), None);
    }

    #[test]
    #[should_panic(expected = "never said where it listens")]
    fn a_child_that_exits_silently_is_a_clear_failure() {
        spawn_listening(Command::new("sh").args(["-c", "echo no >&2; exit 3"]));
    }
}
