//! `dominator local-fleet` as a user runs it: every member started on `127.0.0.1:0`, its
//! port read from the line it prints once bound, the fleet converging, and Ctrl-C's
//! SIGTERM stopping it cleanly.
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
    // Read stdout to its end on a thread: local-fleet keeps printing progress, and a closed
    // pipe would kill it (EPIPE) in the middle of the test.
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
