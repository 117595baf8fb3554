//! Headless Chromium for page tests: find the browser, run it on a URL with a fresh
//! profile (bounded to 90 s), and trust one server key for TLS (`spki_pin`: the
//! `--ignore-certificate-errors-spki-list` value of a PEM certificate, never a blanket
//! ignore of certificate errors).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The installed Chromium, if any (`scripts/test.sh` installs it).
pub fn chromium() -> Option<PathBuf> {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// What a headless run printed.
pub struct Run {
    pub stdout: String,
    pub stderr: String,
}

/// Runs headless `browser` with `extra` flags on `url`, killed after 90 s.
pub fn headless(browser: &Path, extra: &[String], url: &str) -> Run {
    let profile = std::env::temp_dir().join(format!(
        "testkit-chromium-{}-{}",
        std::process::id(),
        next_profile()
    ));
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting chromium");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().expect("waiting for chromium").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium timed out on {url}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&profile);
    Run {
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// A number for a fresh profile directory, unique within this process.
fn next_profile() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The base64 SHA-256 of the public key of the certificate in `cert_pem`, as
/// `--ignore-certificate-errors-spki-list` takes it: Chromium then accepts exactly this
/// server key (computed with the `openssl` command).
pub fn spki_pin(cert_pem: &Path) -> String {
    let script = format!(
        "openssl x509 -in '{}' -noout -pubkey | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | openssl base64 -A",
        cert_pem.display()
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("base64")
        .trim()
        .to_string()
}
