//! `dominator local-fleet` as a user runs it: every member started on `127.0.0.1:0`, its
//! port read from the line it prints once bound, the fleet converging, and Ctrl-C's
//! SIGTERM stopping it cleanly; a closed stdout or a subd killed does not stop it.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_fleet_runs_on_ports_its_members_chose_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(testkit::bin("dominator"))
        .args([
            "local-fleet",
            "--port",
            "0",
            "--permit-insecure-mode",
            "--dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    // "Status page:  http://127.0.0.1:PORT/   (JSON: …)"
    // Read stdout to its end on a thread (local-fleet may keep printing).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in stdout.lines().map_while(Result::ok) {
            if let Some(rest) = l.strip_prefix("Status page:  http://") {
                let _ = tx.send(rest.split('/').next().unwrap_or_default().to_string());
            }
        }
    });
    let dom_addr = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("local-fleet exited before printing its status page");
    assert_ne!(dom_addr, "127.0.0.1:0");

    let http = reqwest::Client::new();
    let t0 = Instant::now();
    let machines = loop {
        let fleet: serde_json::Value = match http
            .get(format!("http://{dom_addr}/api/machines"))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        let all = fleet.as_array().cloned().unwrap_or_default();
        if all.len() == 3 && all.iter().all(|m| m["status_name"] == "synced") {
            break all;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the local fleet never converged: {fleet:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Each subd's address is the one its log says it listens on.
    for (i, m) in machines.iter().enumerate() {
        let log =
            std::fs::read_to_string(dir.path().join(format!("logs/subd-{}.log", i + 1))).unwrap();
        let said = log
            .lines()
            .find_map(|l| wire::listening::parse("subd", l))
            .expect("the subd's listening line is in its log");
        assert_eq!(m["address"], said.to_string(), "{m:#}");
    }

    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "local-fleet did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

/// A running `local-fleet`, stopped by SIGTERM (so it stops its children) when the test
/// ends, a failed assertion included.
struct Fleet(std::process::Child);

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = rustix::process::Pid::from_raw(self.0.id() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let _ = self.0.wait();
        }
    }
}

/// The pid of the child of `parent` whose command line holds `needle`.
fn child_with(parent: u32, needle: &str) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid …
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains(needle) {
            return Some(pid);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_fleet_survives_a_closed_stdout_and_a_killed_subd() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet(
        Command::new(testkit::bin("dominator"))
            .args(["local-fleet", "--port", "0", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = &mut fleet.0;
    // `| head` that has exited: the banner meets a closed pipe (EPIPE).
    drop(child.stdout.take());
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let t0 = Instant::now();
    let subd2 = loop {
        let log =
            std::fs::read_to_string(dir.path().join("logs/dominator.log")).unwrap_or_default();
        if log.contains("listening on") {
            if let Some(pid) = child_with(child.id(), "machine-2") {
                break pid;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "local-fleet exited at start"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "local-fleet never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Past the banner: still running.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        child.try_wait().unwrap().is_none(),
        "local-fleet died writing to a closed stdout"
    );

    let pid = rustix::process::Pid::from_raw(subd2).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let t0 = Instant::now();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("no report of the subd");
        if line.contains("subd-2 exited") {
            assert!(line.contains("goes on without machine-2"), "{line}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        child.try_wait().unwrap().is_none(),
        "local-fleet stopped when one subd exited"
    );
    // The others are still served.
    assert!(child_with(child.id(), "machine-1").is_some());

    // A port probe (connect, close without a byte) is no refused handshake; and no log
    // file holds ANSI colour codes.
    for (log, program) in [
        ("imageserver.log", "imageserver"),
        ("dominator.log", "dominator"),
    ] {
        let text = std::fs::read_to_string(dir.path().join("logs").join(log)).unwrap();
        let addr = text
            .lines()
            .find_map(|l| wire::listening::parse(program, l))
            .unwrap();
        drop(std::net::TcpStream::connect(addr).unwrap());
    }
    std::thread::sleep(Duration::from_millis(500));
    for e in std::fs::read_dir(dir.path().join("logs")).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains('\x1b'),
            "{}: ANSI codes in a log file",
            path.display()
        );
        assert!(
            !text.contains("TLS handshake refused"),
            "{}: {text}",
            path.display()
        );
    }

    let me = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(me, rustix::process::Signal::TERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}
