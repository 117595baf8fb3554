//! The status pages as an operator sees them, with the real binaries over TLS: the
//! dominator's read-only `--status-listen` listener opened in headless Chromium that
//! trusts exactly the dominator's key (and refuses any RPC), the admin PKCS#12 bundle
//! reaching the admin listener with curl and, imported as README says, in headless Chromium
//! (the mutual-TLS page), and the live page during a rollout (the chart changes, a drift
//! correction shows in the machine's timeline with its path).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use testkit::browser::{
    chromium, headless, headless_managed, nss_import_p12, nss_init, nss_tools, nss_trust_ca,
    spki_pin,
};
use testkit::{bin, spawn_listening_n, Daemon};

fn daemon_flags(certs: &Path, role: &str) -> Vec<String> {
    vec![
        "--ca-file".into(),
        certs.join("CA.pem").display().to_string(),
        "--cert-file".into(),
        certs.join(role).join("cert.pem").display().to_string(),
        "--key-file".into(),
        certs.join(role).join("key.pem").display().to_string(),
    ]
}

/// A TLS fleet: imageserver with `app/1` (and `app/2` when asked), `n` subds whose roots
/// already hold `app/1`'s files, and a dominator with a status listener.
struct Fleet {
    work: tempfile::TempDir,
    certs: PathBuf,
    _is: Daemon,
    is_addr: String,
    /// The imageserver's read-only status listener.
    is_status: String,
    subds: Vec<Daemon>,
    _dom: Daemon,
    /// The dominator's mutual-TLS listener and its read-only status listener.
    main: String,
    status: String,
}

impl Fleet {
    fn start(n: usize) -> Fleet {
        let work = tempfile::tempdir().unwrap();
        let certs = work.path().join("certs");
        wire::certs::make_all(&certs, &[]).unwrap();
        let mdb = work.path().join("mdb.json");
        let mut args = vec![
            "--data-dir".to_string(),
            work.path().join("data").display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--status-listen".into(),
            "127.0.0.1:0".into(),
            "--mdb".into(),
            mdb.display().to_string(),
        ];
        args.extend(daemon_flags(&certs, "imageserver"));
        let (child, addrs) = spawn_listening_n(Command::new(bin("imageserver")).args(&args), 2);
        let is = Daemon {
            child,
            addr: addrs[0].to_string(),
        };
        let is_addr = is.addr.clone();
        let addrs_is_status = addrs[1].to_string();
        let tree = work.path().join("tree1");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/motd"), "hello\n").unwrap();
        std::fs::write(tree.join("etc/shared"), "same\n").unwrap();
        add_image(&certs, &is_addr, "app/1", &tree);
        let mut subds = Vec::new();
        let mut machines = Vec::new();
        for i in 0..n {
            let root = work.path().join(format!("root{i}"));
            let cp = Command::new("cp")
                .args(["-a", tree.to_str().unwrap(), root.to_str().unwrap()])
                .status()
                .unwrap();
            assert!(cp.success());
            let mut args = vec![
                "--root".to_string(),
                root.display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--scan-speed-percent".into(),
                "100".into(),
            ];
            args.extend(daemon_flags(&certs, "subd"));
            let d = Daemon::start(&bin("subd"), &args);
            machines.push(serde_json::json!({
                "Hostname": format!("m{i}"), "IpAddress": d.addr, "RequiredImage": "app/1"
            }));
            subds.push(d);
        }
        write_mdb(&mdb, &serde_json::Value::Array(machines));
        let mut dargs = vec![
            "--mdb".to_string(),
            mdb.display().to_string(),
            "--image-server".into(),
            is_addr.clone(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--status-listen".into(),
            "127.0.0.1:0".into(),
            "--poll-interval-ms".into(),
            "200".into(),
        ];
        dargs.extend(daemon_flags(&certs, "dominator"));
        let (child, addrs) = spawn_listening_n(Command::new(bin("dominator")).args(&dargs), 2);
        let dom = Daemon {
            child,
            addr: addrs[0].to_string(),
        };
        Fleet {
            main: addrs[0].to_string(),
            status: addrs[1].to_string(),
            work,
            certs,
            _is: is,
            is_addr,
            is_status: addrs_is_status,
            subds,
            _dom: dom,
        }
    }

    /// Starts subd `i` again on its address after it was stopped.
    fn restart_subd(&mut self, i: usize) {
        let addr = self.subds[i].addr.clone();
        let mut args = vec![
            "--root".to_string(),
            self.root(i).display().to_string(),
            "--listen".into(),
            addr,
            "--scan-speed-percent".into(),
            "100".into(),
        ];
        args.extend(daemon_flags(&self.certs, "subd"));
        self.subds[i] = Daemon::start(&bin("subd"), &args);
    }

    fn root(&self, i: usize) -> PathBuf {
        self.work.path().join(format!("root{i}"))
    }

    /// curl on the status listener, trusting the fleet CA only: (HTTP code, body).
    fn status_get(&self, path: &str) -> (u16, String) {
        curl(&[
            "--cacert",
            self.certs.join("CA.pem").to_str().unwrap(),
            &format!("https://{}{path}", self.status),
        ])
    }

    /// Waits until every machine's status is `want` (read on the status listener).
    fn wait_all(&self, want: &str, image: &str) {
        let t0 = Instant::now();
        loop {
            let (_, body) = self.status_get("/api/machines");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let ok = v.as_array().is_some_and(|ms| {
                !ms.is_empty()
                    && ms
                        .iter()
                        .all(|m| m["status_name"] == want && m["required_image"] == image)
            });
            if ok {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "machines never all {want} on {image}: {body}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn write_mdb(path: &Path, v: &serde_json::Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, v.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn add_image(certs: &Path, server: &str, name: &str, dir: &Path) {
    let out = Command::new(bin("imagetool"))
        .args(["--image-server", server])
        .args([
            "--ca-file",
            certs.join("CA.pem").to_str().unwrap(),
            "--cert-file",
            certs.join("builder.cert").to_str().unwrap(),
            "--key-file",
            certs.join("builder.key").to_str().unwrap(),
        ])
        .args(["add", name, dir.to_str().unwrap(), "", ""])
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "imagetool add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs curl with `args`; returns the HTTP code (0: no HTTP reply) and the body.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn browser_or_skip(test: &str) -> Option<PathBuf> {
    let b = chromium();
    if b.is_none() {
        eprintln!("\n!!!!!!!! SKIPPED {test}: chromium is not installed (apt-get install -y chromium) !!!!!!!!\n");
    }
    b
}

/// The DOM of `url` after load (and `budget_ms` of virtual time for its scripts).
fn dom(browser: &Path, pin: &str, url: &str, budget_ms: u64) -> String {
    let mut flags = vec![
        format!("--ignore-certificate-errors-spki-list={pin}"),
        "--dump-dom".into(),
    ];
    if budget_ms > 0 {
        flags.push(format!("--virtual-time-budget={budget_ms}"));
    }
    let run = headless(browser, &flags, url);
    assert!(!run.stdout.is_empty(), "no DOM of {url}: {}", run.stderr);
    run.stdout
}

#[test]
fn the_status_listener_serves_pages_to_a_browser_and_refuses_every_rpc() {
    let Some(browser) = browser_or_skip("the_status_listener_serves_pages_to_a_browser") else {
        return;
    };
    let f = Fleet::start(1);
    f.wait_all("synced", "app/1");

    // A browser trusting exactly the dominator's key reads the page over TLS.
    let pin = spki_pin(&f.certs.join("dominator/cert.pem"));
    let page = dom(&browser, &pin, &format!("https://{}/", f.status), 0);
    assert!(page.contains("<table id=\"machines\">"), "{page}");
    assert!(
        page.contains(">m0</a></td><td>app/1</td><td>-</td><td class=\"ok\">synced</td>"),
        "{page}"
    );
    assert!(!page.contains("INSECURE MODE"), "{page}");
    let machine = dom(
        &browser,
        &pin,
        &format!("https://{}/machine/m0", f.status),
        0,
    );
    assert!(machine.contains("<table id=\"machine\">"), "{machine}");
    // Pinned to another key, the same browser gets no page: trust is the pin, nothing
    // wider.
    let other = spki_pin(&f.certs.join("subd/cert.pem"));
    let refused = headless(
        &browser,
        &[
            format!("--ignore-certificate-errors-spki-list={other}"),
            "--dump-dom".into(),
        ],
        &format!("https://{}/", f.status),
    );
    assert!(
        !refused.stdout.contains("<table id=\"machines\">"),
        "an untrusted certificate must not show the page"
    );

    // curl with the CA alone (no client certificate): reads work, RPCs never do.
    let (code, metrics) = f.status_get("/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("dominator_machines{status=\"synced\"} 1"),
        "{metrics}"
    );
    assert_eq!(f.status_get("/api/fleet").0, 200);
    assert_eq!(f.status_get("/api/history").0, 200);
    for method in ["Dominator.DisableUpdates", "Dominator.EnableUpdates"] {
        let (code, body) = curl(&[
            "--cacert",
            f.certs.join("CA.pem").to_str().unwrap(),
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            "{\"reason\":\"from the status listener\"}",
            &format!("https://{}/rpc/{method}", f.status),
        ]);
        assert!(
            code == 403 || code == 404,
            "{method} on the status listener: {code} {body}"
        );
    }
    let (code, body) = curl(&[
        "--cacert",
        f.certs.join("CA.pem").to_str().unwrap(),
        "-X",
        "POST",
        "-d",
        "{}",
        &format!("https://{}/rpc/ImageServer.ListImages", f.is_status),
    ]);
    assert!(
        code == 403 || code == 404,
        "an RPC on the imageserver's status listener: {code} {body}"
    );
    let is_page = dom(
        &browser,
        &spki_pin(&f.certs.join("imageserver/cert.pem")),
        &format!("https://{}/", f.is_status),
        0,
    );
    assert!(is_page.contains("<table id=\"images\">"), "{is_page}");
    let (_, fleet) = f.status_get("/api/fleet");
    let v: serde_json::Value = serde_json::from_str(&fleet).unwrap();
    assert!(v["updates_disabled"].is_null(), "{fleet}");
    // The main listener still asks for a client certificate.
    let (code, _) = curl(&[
        "--cacert",
        f.certs.join("CA.pem").to_str().unwrap(),
        &format!("https://{}/api/fleet", f.main),
    ]);
    assert_eq!(
        code, 0,
        "the admin listener answered without a client certificate"
    );
}

#[test]
fn the_admin_bundle_holds_the_admin_pair_and_reaches_the_admin_listener() {
    let f = Fleet::start(1);
    let p12 = f.certs.join("admin.p12");
    let pass = format!("pass:{}", wire::certs::ADMIN_P12_PASSWORD);
    let info = Command::new("openssl")
        .args(["pkcs12", "-info", "-nokeys", "-in"])
        .arg(&p12)
        .args(["-passin", &pass])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.status.success(),
        "openssl pkcs12: {}",
        String::from_utf8_lossy(&info.stderr)
    );
    assert!(text.contains("CN = admin"), "{text}");
    assert!(text.contains("CN = Fleet CA"), "{text}");
    let keys = Command::new("openssl")
        .args(["pkcs12", "-nocerts", "-nodes", "-in"])
        .arg(&p12)
        .args(["-passin", &pass])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&keys.stdout).contains("BEGIN PRIVATE KEY"));

    let url = format!("https://{}/api/fleet", f.main);
    let ca = f.certs.join("CA.pem");
    let bundle = format!("{}:{}", p12.display(), wire::certs::ADMIN_P12_PASSWORD);
    let (code, body) = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "--cert-type",
        "P12",
        "--cert",
        &bundle,
        &url,
    ]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"machines\""), "{body}");
    // The PEM pair works the same way.
    let (code, _) = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "--cert",
        f.certs.join("admin.cert").to_str().unwrap(),
        "--key",
        f.certs.join("admin.key").to_str().unwrap(),
        &url,
    ]);
    assert_eq!(code, 200);
}

/// An operator's browser on the main (mutual-TLS) listener: a fresh `$HOME` whose NSS
/// database holds what README says to import (`admin.p12`, password `fleet`; `CA.pem`
/// trusted to identify websites), and the managed policy `AutoSelectCertificateForUrls`
/// so headless Chromium presents the admin certificate without asking. No certificate
/// error is ignored: the dominator is trusted through the CA in the NSS database alone.
#[test]
fn a_browser_with_the_admin_bundle_imported_opens_the_main_status_page() {
    let Some(browser) = browser_or_skip("a_browser_with_the_admin_bundle_imported") else {
        return;
    };
    if !nss_tools() {
        eprintln!("\n!!!!!!!! SKIPPED a_browser_with_the_admin_bundle_imported: certutil/pk12util are not installed (apt-get install -y libnss3-tools) !!!!!!!!\n");
        return;
    }
    let f = Fleet::start(1);
    f.wait_all("synced", "app/1");
    let url = format!("https://{}/", f.main);
    let origin = url.trim_end_matches('/');
    let rule = serde_json::json!({"pattern": origin, "filter": {"ISSUER": {"CN": "Fleet CA"}}});
    let policy = serde_json::json!({"AutoSelectCertificateForUrls": [rule.to_string()]});
    let policy = policy.to_string();
    let open = |imports: &[&str]| {
        let home = tempfile::tempdir().unwrap();
        nss_init(home.path());
        for what in imports {
            match *what {
                "admin.p12" => nss_import_p12(
                    home.path(),
                    &f.certs.join("admin.p12"),
                    wire::certs::ADMIN_P12_PASSWORD,
                ),
                "CA.pem" => nss_trust_ca(home.path(), &f.certs.join("CA.pem"), "Fleet CA"),
                other => unreachable!("{other}"),
            }
        }
        headless_managed(&browser, home.path(), &policy, &["--dump-dom".into()], &url)
    };

    // Both imported: the fleet page, as the admin.
    let run = open(&["admin.p12", "CA.pem"]);
    assert!(
        run.stdout.contains("<table id=\"machines\">"),
        "no fleet page with admin.p12 and CA.pem imported: {}{}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stdout.contains(">m0</a></td><td>app/1</td>"),
        "{}",
        run.stdout
    );
    // Without the bundle the dominator refuses the handshake: no page.
    let run = open(&["CA.pem"]);
    assert!(
        !run.stdout.contains("<table id=\"machines\">"),
        "{}",
        run.stdout
    );
    // The dominator's refusal reaches Chromium as a bad client certificate or, when TLS
    // 1.3's handshake already looked done to the client, as a dropped socket.
    let refused = [
        "ERR_BAD_SSL_CLIENT_AUTH_CERT",
        "ERR_SOCKET_NOT_CONNECTED",
        "ERR_CONNECTION_CLOSED",
        "ERR_CONNECTION_RESET",
    ];
    assert!(
        refused
            .iter()
            .any(|e| run.stderr.contains(&format!("Page load failed: net::{e}"))),
        "not refused for want of a client certificate: {}",
        run.stderr
    );
    // The bundle alone does not make the browser trust the dominator: CA.pem is its own
    // step (pk12util imports the bundle's CA certificate untrusted).
    let run = open(&["admin.p12"]);
    assert!(
        !run.stdout.contains("<table id=\"machines\">"),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("ERR_CERT_AUTHORITY_INVALID"),
        "the dominator was trusted without CA.pem: {}",
        run.stderr
    );
}

/// The `points` of the chart's line for `status`, if drawn.
fn chart_line<'a>(dom: &'a str, status: &str) -> Option<&'a str> {
    let at = dom.find(&format!("data-status=\"{status}\""))?;
    let rest = &dom[at..];
    let p = rest.find("points=\"")? + "points=\"".len();
    let end = rest[p..].find('"')?;
    Some(&rest[p..p + end])
}

#[test]
fn the_live_page_shows_a_rollout_in_its_chart_and_a_drift_correction_in_a_timeline() {
    let Some(browser) = browser_or_skip("the_live_page_shows_a_rollout") else {
        return;
    };
    let f = Fleet::start(2);
    let tree2 = f.work.path().join("tree2");
    std::fs::create_dir_all(tree2.join("etc")).unwrap();
    std::fs::write(tree2.join("etc/motd"), "hello again\n").unwrap();
    std::fs::write(tree2.join("etc/app.conf"), "v2\n").unwrap();
    std::fs::write(tree2.join("etc/shared"), "same\n").unwrap();
    add_image(&f.certs, &f.is_addr, "app/2", &tree2);
    f.wait_all("synced", "app/1");
    let pin = spki_pin(&f.certs.join("dominator/cert.pem"));
    let url = format!("https://{}/", f.status);

    // Before: the machines came up holding app/1; nothing was updated.
    let before = dom(&browser, &pin, &url, 0);
    assert!(before.contains("<svg id=\"chart\""), "{before}");
    assert!(chart_line(&before, "synced").is_some(), "{before}");
    assert!(chart_line(&before, "updating").is_none(), "{before}");

    // The imageserver's page: each image's size, objects, unique bytes and users.
    let is_pin = spki_pin(&f.certs.join("imageserver/cert.pem"));
    let is_url = format!("https://{}/", f.is_status);
    let images = dom(&browser, &is_pin, &is_url, 0);
    assert!(
        images.contains("<tr><td>app/1</td><td>11</td><td>2</td><td>6</td><td>m0, m1</td></tr>"),
        "{images}"
    );
    assert!(
        images.contains("<tr><td>app/2</td><td>20</td><td>3</td><td>15</td><td>-</td></tr>"),
        "{images}"
    );

    // The rollout: one MDB edit.
    let mdb = f.work.path().join("mdb.json");
    let text = std::fs::read_to_string(&mdb).unwrap();
    write_mdb(
        &mdb,
        &serde_json::from_str(&text.replace("app/1", "app/2")).unwrap(),
    );
    f.wait_all("synced", "app/2");
    // Loaded once, the page then updates itself without a reload (`data-updates`).
    let after = dom(&browser, &pin, &url, 5000);
    assert!(
        chart_line(&after, "updating").is_some(),
        "the rollout is not in the chart: {after}"
    );
    assert_ne!(chart_line(&before, "synced"), chart_line(&after, "synced"));
    assert!(after.contains("<table id=\"recent\">"), "{after}");
    assert!(after.contains("<td>updating</td><td>"), "{after}");
    assert!(
        after.contains("data-updates=\""),
        "the page did not update itself: {after}"
    );
    // The imageserver read the edited MDB again.
    let images = dom(&browser, &is_pin, &is_url, 0);
    assert!(
        images.contains("<td>app/1</td><td>11</td><td>2</td><td>6</td><td>-</td>"),
        "{images}"
    );
    assert!(
        images.contains("<td>app/2</td><td>20</td><td>3</td><td>15</td><td>m0, m1</td>"),
        "{images}"
    );

    // Drift on m0 is put back; its timeline names the path.
    std::fs::write(f.root(0).join("etc/motd"), "drifted\n").unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(f.root(0).join("etc/motd")).unwrap() != "hello again\n" {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "drift never corrected"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let page = dom(
        &browser,
        &pin,
        &format!("https://{}/machine/m0", f.status),
        0,
    );
    assert!(page.contains("<table id=\"timeline\">"), "{page}");
    let row = page
        .split("<tr class=\"drift-corrected\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no drift correction in the timeline: {page}"));
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(row.contains("put 1 path back to image app/2"), "{row}");
    assert!(row.contains("<code>/etc/motd</code>"), "{row}");
    assert!(page.contains("<tr class=\"update-finished\">"), "{page}");
}

/// Issue 13 §4: after a subd restart the machine's error is the one of its status: the
/// `connection refused` it showed while down is gone as soon as it is fetching, updating
/// or synced again.
#[test]
fn an_error_is_shown_only_while_its_status_lasts() {
    let mut f = Fleet::start(1);
    f.wait_all("synced", "app/1");
    f.subds[0].kill9();
    f.wait_all("connection refused", "app/1");
    let (_, body) = f.status_get("/api/machines/m0");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    // Drift while down, so the machine is updated when it is back.
    std::fs::write(f.root(0).join("etc/motd"), "drifted\n").unwrap();
    f.restart_subd(0);
    let t0 = Instant::now();
    let mut seen = Vec::new();
    loop {
        let (_, body) = f.status_get("/api/machines/m0");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let status = v["status_name"].as_str().unwrap_or("").to_string();
        if status != "connection refused" {
            assert!(
                v["last_error"].is_null(),
                "{status} shown with the old error: {body}"
            );
        }
        seen.push(status.clone());
        if status == "synced" && f.root(0).join("etc/motd").exists() {
            let motd = std::fs::read_to_string(f.root(0).join("etc/motd")).unwrap();
            if motd == "hello\n" {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never back in sync: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
