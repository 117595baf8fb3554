//! Mutual TLS with the real binaries: each daemon refuses to start without its
//! certificates; an image builder's certificate adds images (recorded as `created_by`) but
//! cannot delete them or update machines; the dominator's certificate is accepted by subd;
//! a client without a certificate, or from another CA, gets nothing; a dominator holding
//! the wrong role's pair shows its machines as `poll denied`, and names every other reason
//! it cannot poll (`DNS error`, `connection refused`, `connect timeout`).

use model::api::{PollRequest, UpdateRequest};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use testkit::{bin, Daemon};
use wire::client::{ClientSecurity, SubdClient};
use wire::tls::TlsFiles;

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

fn user_flags(certs: &Path, user: &str) -> Vec<String> {
    vec![
        "--ca-file".into(),
        certs.join("CA.pem").display().to_string(),
        "--cert-file".into(),
        certs.join(format!("{user}.cert")).display().to_string(),
        "--key-file".into(),
        certs.join(format!("{user}.key")).display().to_string(),
    ]
}

/// A real subd over TLS with the subd role's pair, its root under `work`; and its address.
fn tls_subd(work: &Path, certs: &Path) -> (Daemon, String) {
    let root = work.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let mut args = vec![
        "--root".to_string(),
        root.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(daemon_flags(certs, "subd"));
    let d = Daemon::start(&bin("subd"), &args);
    let addr = d.addr.clone();
    (d, addr)
}

fn imagetool(addr: &str, tls: &[String], args: &[&str]) -> Output {
    Command::new(bin("imagetool"))
        .args(["--image-server", addr])
        .args(tls)
        .args(args)
        .env("HOME", "/nonexistent")
        .output()
        .unwrap()
}

#[test]
fn each_daemon_refuses_to_start_without_certificates() {
    let d = tempfile::tempdir().unwrap();
    let missing = ["--ca-file", "/nonexistent/CA.pem"];
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "imageserver",
            vec![
                "--data-dir".into(),
                d.path().join("data").display().to_string(),
            ],
        ),
        (
            "subd",
            vec!["--root".into(), d.path().display().to_string()],
        ),
        (
            "dominator",
            vec![
                "--mdb".into(),
                d.path().join("mdb.json").display().to_string(),
                "--image-server".into(),
                "127.0.0.1:1".into(),
            ],
        ),
    ];
    for (name, mut args) in cases {
        args.extend(["--listen".to_string(), "127.0.0.1:0".into()]);
        args.extend(missing.iter().map(|s| s.to_string()));
        let out = Command::new(bin(name)).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} started without certificates");
        assert!(
            err.contains("/nonexistent/CA.pem") && err.contains("--permit-insecure-mode"),
            "{name}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_over_mutual_tls_with_the_real_binaries() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    wire::certs::make_all(&certs, &[]).unwrap();
    let other = work.path().join("other-ca");
    wire::certs::make_all(&other, &[]).unwrap();

    // imageserver over TLS
    let mut args = vec![
        "--data-dir".to_string(),
        work.path().join("data").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(daemon_flags(&certs, "imageserver"));
    let is = Daemon::start(&bin("imageserver"), &args);
    let addr = is.addr.clone();

    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/motd"), "hello\n").unwrap();
    let builder = user_flags(&certs, "builder");
    let out = imagetool(
        &addr,
        &builder,
        &["add", "app/1", tree.to_str().unwrap(), "", ""],
    );
    assert!(
        out.status.success(),
        "builder add: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // created_by comes from the certificate
    let admin = user_flags(&certs, "admin");
    let show = imagetool(&addr, &admin, &["--json", "show", "app/1"]);
    let img: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(img["created_by"], "builder");

    // the builder may not delete; the admin may
    let del = imagetool(&addr, &builder, &["delete", "app/1"]);
    assert_eq!(del.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&del.stderr).contains("access to method denied"));
    // plain HTTP and a foreign CA get nothing
    let plain = imagetool(&addr, &[], &["list"]);
    assert_eq!(plain.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("the server speaks TLS"),
        "a plain-HTTP client is told why: {}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let mut foreign = user_flags(&other, "admin");
    foreign[1] = certs.join("CA.pem").display().to_string();
    let f = imagetool(&addr, &foreign, &["list"]);
    assert_eq!(
        f.status.code(),
        Some(1),
        "a certificate from another CA must be refused"
    );
    assert!(imagetool(&addr, &admin, &["delete", "app/1"])
        .status
        .success());

    // subd over TLS: the dominator's certificate may poll and update; a builder's may not
    let (_subd, saddr) = tls_subd(work.path(), &certs);
    let files = |cert: &str, key: &str| TlsFiles {
        ca: certs.join("CA.pem"),
        cert: certs.join(cert),
        key: certs.join(key),
    };
    let dom = SubdClient::new(
        &saddr,
        &ClientSecurity::Tls(files("dominator/cert.pem", "dominator/key.pem")),
        Some(Duration::from_secs(10)),
    )
    .unwrap();
    dom.poll(&PollRequest::default())
        .await
        .expect("the dominator may poll");
    let bld = SubdClient::new(
        &saddr,
        &ClientSecurity::Tls(files("builder.cert", "builder.key")),
        Some(Duration::from_secs(10)),
    )
    .unwrap();
    let req = UpdateRequest {
        plan: model::UpdatePlan::default(),
        wait: true,
    };
    let e = bld.update(&req).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert!(e.to_string().contains("access to method denied"));
}

/// Dominator's rule: any authenticated caller may poll short; the tree needs `Subd.Poll`.
/// A builder's certificate (no `Subd.*` grant) gets a short poll from a real subd and a
/// 403 for a full one, never a short reply in its place.
#[tokio::test]
async fn a_builder_certificate_gets_a_short_poll_and_is_refused_a_full_one() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    wire::certs::make_all(&certs, &[]).unwrap();
    let (_subd, saddr) = tls_subd(work.path(), &certs);
    let client = |cert: &str, key: &str| {
        let files = TlsFiles {
            ca: certs.join("CA.pem"),
            cert: certs.join(cert),
            key: certs.join(key),
        };
        SubdClient::new(
            &saddr,
            &ClientSecurity::Tls(files),
            Some(Duration::from_secs(10)),
        )
        .unwrap()
    };
    let dom = client("dominator/cert.pem", "dominator/key.pem");
    let bld = client("builder.cert", "builder.key");
    // Wait for a first scan, so a full poll would carry a tree.
    let full = testkit::drive::poll_after(&dom, 0).await;
    assert!(full.tree.is_some());
    let short = bld
        .poll(&PollRequest {
            have_generation: 0,
            short_only: true,
            ..Default::default()
        })
        .await
        .expect("any authenticated caller may poll short");
    assert_eq!(short.generation, full.generation);
    assert!(short.tree.is_none() && short.object_cache.is_none());
    for have_generation in [0, full.generation] {
        let e = bld
            .poll(&PollRequest {
                have_generation,
                short_only: false,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(403), "{e}");
        assert!(e.to_string().contains("access to method denied"), "{e}");
    }
}

/// The dominator names why it cannot poll a machine: a real dominator started with the
/// builder's pair (no `Subd.*` grant) is refused a full poll by a real subd (`poll
/// denied`; the short poll is open to any authenticated caller); a machine whose name
/// does not resolve is a `DNS error`, one whose port nothing listens on `connection
/// refused`, and one that never answers (a full accept queue drops its SYNs) a `connect
/// timeout` after `--subd-connect-timeout-ms`; all read over the dominator's own TLS API
/// with the admin's pair.
#[tokio::test]
async fn the_dominator_names_why_it_cannot_poll_a_machine() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    wire::certs::make_all(&certs, &[]).unwrap();
    let (_subd, saddr) = tls_subd(work.path(), &certs);
    // The image exists: the dominator's short poll is allowed, so it is the full poll
    // (taken once it has the image) that is denied.
    let mut iargs = vec![
        "--data-dir".to_string(),
        work.path().join("data").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    iargs.extend(daemon_flags(&certs, "imageserver"));
    let is = Daemon::start(&bin("imageserver"), &iargs);
    let iaddr = is.addr.clone();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/motd"), "hello\n").unwrap();
    let add = imagetool(
        &iaddr,
        &user_flags(&certs, "builder"),
        &["add", "app/1", tree.to_str().unwrap(), "", ""],
    );
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let mdb = work.path().join("mdb.json");
    let closed = testkit::net::ClosedPort::new();
    let blackhole = testkit::net::Blackhole::new();
    let machines = serde_json::json!([
        {"Hostname": "denied", "IpAddress": saddr, "RequiredImage": "app/1"},
        {"Hostname": "no-such-machine.invalid", "RequiredImage": "app/1"},
        {"Hostname": "refused", "IpAddress": closed.addr.to_string(), "RequiredImage": "app/1"},
        {"Hostname": "blackholed", "IpAddress": blackhole.addr.to_string(), "RequiredImage": "app/1"},
    ]);
    std::fs::write(&mdb, machines.to_string()).unwrap();
    let mut dargs = vec![
        "--mdb".to_string(),
        mdb.display().to_string(),
        "--image-server".into(),
        iaddr,
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--poll-interval-ms".into(),
        "100".into(),
        "--subd-connect-timeout-ms".into(),
        "1000".into(),
    ];
    dargs.extend(user_flags(&certs, "builder")); // the wrong role's pair
    let dom = Daemon::start(&bin("dominator"), &dargs);
    let daddr = dom.addr.clone();
    let admin = wire::client::RpcClient::new(
        &daddr,
        wire::client::DOMINATOR_PORT,
        &ClientSecurity::Tls(TlsFiles {
            ca: certs.join("CA.pem"),
            cert: certs.join("admin.cert"),
            key: certs.join("admin.key"),
        }),
        "builder", // the role whose pair this dominator serves with
        Some(Duration::from_secs(10)),
    )
    .unwrap();
    for (host, want) in [
        ("denied", "poll denied"),
        ("no-such-machine.invalid", "DNS error"),
        ("refused", "connection refused"),
        ("blackholed", "connect timeout"),
    ] {
        let t0 = std::time::Instant::now();
        let last = loop {
            let text = admin
                .get_text(&format!("/api/machines/{host}"))
                .await
                .unwrap_or_default();
            let m: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if m["status_name"] == want || t0.elapsed() > Duration::from_secs(30) {
                break m;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(last["status_name"], want, "{host}: {last:#}");
        assert!(
            !last["last_error"].as_str().unwrap_or("").is_empty(),
            "{host}: the error is shown: {last:#}"
        );
    }
}

/// Issue 9 #8: an imageserver started with the subd role's pair (signed by the right CA) is
/// refused by imagetool and by `dominator plan`, each with one line naming the expected
/// and the actual role; `--image-server-name subd` says whom to expect instead.
#[test]
fn an_imageserver_with_another_roles_certificate_is_refused_by_its_clients() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    wire::certs::make_all(&certs, &[]).unwrap();
    let mut args = vec![
        "--data-dir".to_string(),
        work.path().join("data").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(daemon_flags(&certs, "subd")); // the wrong role's pair
    let is = Daemon::start(&bin("imageserver"), &args);
    let addr = is.addr.clone();
    let want = r#"certificate is for "subd", expected "imageserver""#;

    let out = imagetool(&addr, &user_flags(&certs, "admin"), &["list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "imagetool: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(want), "imagetool names both roles: {err}");

    let (_subd, saddr) = tls_subd(work.path(), &certs);
    let mdb = work.path().join("mdb.json");
    let machines = serde_json::json!([
        {"Hostname": "m1", "IpAddress": saddr, "RequiredImage": "app/1"},
    ]);
    std::fs::write(&mdb, machines.to_string()).unwrap();
    let mut plan = vec![
        "plan".to_string(),
        "--mdb".into(),
        mdb.display().to_string(),
        "--image-server".into(),
        addr.clone(),
    ];
    plan.extend(daemon_flags(&certs, "dominator"));
    let out = Command::new(bin("dominator")).args(&plan).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "dominator plan: {text}");
    assert!(
        text.contains(want),
        "dominator plan names both roles: {text}"
    );

    // Told to expect that name, imagetool trusts the server again.
    let mut named = user_flags(&certs, "admin");
    named.extend(["--image-server-name".to_string(), "subd".into()]);
    let out = imagetool(&addr, &named, &["list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
