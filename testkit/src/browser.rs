//! Headless Chromium for page tests: find the browser, run it on a URL with a fresh
//! profile (bounded to 90 s), and trust one server key for TLS (`spki_pin`: the
//! `--ignore-certificate-errors-spki-list` value of a PEM certificate, never a blanket
//! ignore of certificate errors), or run it as an operator's browser: a `$HOME` whose NSS
//! database holds what README says to import, and a managed policy for this run only.

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
    run(Command::new(browser), extra, url)
}

/// Runs `cmd` (a browser, perhaps behind a wrapper) headless on `url`, killed after 90 s.
fn run(mut cmd: Command, extra: &[String], url: &str) -> Run {
    let profile = std::env::temp_dir().join(format!(
        "testkit-chromium-{}-{}",
        std::process::id(),
        next_profile()
    ));
    let mut child = cmd
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

/// Whether NSS's `certutil` and `pk12util` are installed (`libnss3-tools`).
pub fn nss_tools() -> bool {
    ["certutil", "pk12util"].iter().all(|t| {
        Command::new(t)
            .arg("-H")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    })
}

/// Runs an NSS tool, panicking with its output if it fails.
fn nss(tool: &str, args: &[&str]) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `sql:` name of the NSS database Chromium on Linux reads under `home`.
fn nssdb(home: &Path) -> String {
    format!("sql:{}", home.join(".pki/nssdb").display())
}

/// Makes an empty NSS database (no password) in `home/.pki/nssdb`, as Chromium would.
pub fn nss_init(home: &Path) {
    std::fs::create_dir_all(home.join(".pki/nssdb")).expect("making .pki/nssdb");
    nss("certutil", &["-N", "--empty-password", "-d", &nssdb(home)]);
}

/// Imports the PKCS#12 bundle `p12` (a client key and its certificates) into `home`'s
/// NSS database: `pk12util -i P12 -d sql:$HOME/.pki/nssdb -W PASSWORD`.
pub fn nss_import_p12(home: &Path, p12: &Path, password: &str) {
    let p12 = p12.display().to_string();
    nss(
        "pk12util",
        &["-i", &p12, "-d", &nssdb(home), "-W", password],
    );
}

/// Trusts the CA certificate `ca_pem` to identify websites in `home`'s NSS database:
/// `certutil -A -n NICK -t C,, -i CA.pem -d sql:$HOME/.pki/nssdb`.
pub fn nss_trust_ca(home: &Path, ca_pem: &Path, nick: &str) {
    let ca = ca_pem.display().to_string();
    nss(
        "certutil",
        &["-A", "-n", nick, "-t", "C,,", "-i", &ca, "-d", &nssdb(home)],
    );
}

/// The directory this browser reads its `policies/managed/*.json` from.
fn policy_root(browser: &Path) -> &'static str {
    match browser.file_name().and_then(|n| n.to_str()) {
        Some("google-chrome") => "/etc/opt/chrome",
        Some("chromium-browser") => "/etc/chromium-browser",
        _ => "/etc/chromium",
    }
}

/// Runs headless `browser` on `url` as an operator's browser: `$HOME` is `home` (Chromium
/// takes client certificates and trusted CAs from `home/.pki/nssdb`) and `policy` (a JSON
/// object of managed policies, e.g. `AutoSelectCertificateForUrls`) is in force for this
/// run only: Chromium runs in a private mount namespace (`unshare`) in which a temporary
/// directory holding `policies/managed/test.json` is bound over the browser's policy root
/// (e.g. `/etc/chromium`), so nothing on the machine changes. Needs root (or unprivileged
/// user namespaces) and an existing policy root.
pub fn headless_managed(
    browser: &Path,
    home: &Path,
    policy: &str,
    extra: &[String],
    url: &str,
) -> Run {
    let root = policy_root(browser);
    assert!(
        Path::new(root).is_dir(),
        "{root} does not exist: nothing to bind the test's policies over"
    );
    let scratch = RemoveOnDrop(std::env::temp_dir().join(format!(
        "testkit-policies-{}-{}",
        std::process::id(),
        next_profile()
    )));
    let etc = &scratch.0;
    std::fs::create_dir_all(etc.join("policies/managed")).expect("making the policy dir");
    std::fs::write(etc.join("policies/managed/test.json"), policy).expect("writing the policy");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private"]);
    if !running_as_root() {
        cmd.arg("--map-root-user");
    }
    cmd.args([
        "sh",
        "-c",
        "mount --bind \"$1\" \"$2\" || exit 125; shift 2; exec \"$@\"",
        "sh",
    ])
    .arg(etc)
    .arg(root)
    .arg(browser)
    .env("HOME", home);
    run(cmd, extra, url)
}

/// A scratch directory removed when dropped, even when a run panics (timed out).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether this process runs as root (it owns `/proc/self`).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
