//! The `dominator` binary's command line: usage errors, refusing to run without
//! certificates, and one-line failures.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dominator"))
        .args(args)
        .env_remove("MDB_FILE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn usage_and_failures() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("none");
    let m = missing.to_str().unwrap();
    let (code, err) = run(&["--mdb", "x.json"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--image-server"), "{err}");
    let (code, err) = run(&[
        "--image-server",
        "localhost:1",
        "--listen",
        "127.0.0.1:0",
        "--ca-file",
        m,
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no TLS key pair") && err.contains("--permit-insecure-mode"),
        "{err}"
    );
    let (code, err) = run(&[
        "plan",
        "--mdb",
        m,
        "--image-server",
        "localhost:1",
        "--permit-insecure-mode",
        "--ca-file",
        m,
    ]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(m), "{err}");
    let (code, err) = run(&["disable-updates"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn make_certs_writes_every_role_and_says_where_each_goes() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("certs");
    let out = Command::new(env!("CARGO_BIN_EXE_dominator"))
        .args(["make-certs", dir.to_str().unwrap(), "--host", "dom.example"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (file, hint) in [
        ("CA.pem", "/etc/ssl/CA.pem"),
        ("CA.key", "OFFLINE"),
        ("subd/cert.pem", "/etc/ssl/subd/cert.pem"),
        ("dominator/key.pem", "/etc/ssl/dominator/key.pem"),
        ("imageserver/cert.pem", "/etc/ssl/imageserver/cert.pem"),
        ("builder.cert", "~/.ssl/builder.cert"),
        ("admin.key", "~/.ssl/admin.key"),
        ("admin.p12", "import into a browser (password \"fleet\")"),
    ] {
        assert!(dir.join(file).exists(), "{file} not written");
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(file))
            .unwrap_or_else(|| panic!("{file} not listed:\n{text}"));
        assert!(line.contains(hint), "{line}");
    }
    // The daemons' certificates carry the extra host name.
    let pem = std::fs::read(dir.join("dominator/cert.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .unwrap()
        .unwrap();
    let (cn, methods) = wire::tls::identity_of(&der);
    assert_eq!(cn, "dominator");
    assert!(methods.iter().any(|m| m == "Subd.*"), "{methods:?}");
    assert!(String::from_utf8_lossy(&der).contains("dom.example"));
    // A second run into the same directory refuses to replace the CA.
    let again = Command::new(env!("CARGO_BIN_EXE_dominator"))
        .args(["make-certs", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a CA.pem"));
}

#[test]
fn disable_and_enable_updates_say_what_happened() {
    let d = tempfile::tempdir().unwrap();
    let mdb = d.path().join("mdb.json");
    std::fs::write(&mdb, "[]").unwrap();
    let dom = testkit::Daemon::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_dominator")),
        &[
            "--mdb".into(),
            mdb.display().to_string(),
            "--image-server".into(),
            "127.0.0.1:1".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--permit-insecure-mode".into(),
        ],
    );
    let control = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_dominator"))
            .args(args)
            .args(["--dominator", &dom.addr])
            .env("HOME", d.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = control(&["disable-updates", "maintenance"]);
    assert!(
        said.starts_with(&format!(
            "updates disabled fleet-wide on {} (\"maintenance\")",
            dom.addr
        )),
        "{said}"
    );
    assert!(std::path::Path::new(&format!("{}.updates-disabled", mdb.display())).exists());
    let said = control(&["enable-updates"]);
    assert_eq!(
        said,
        format!("updates enabled fleet-wide on {}\n", dom.addr)
    );
}

#[test]
fn client_help_names_real_default_paths() {
    for args in [&["plan", "--help"][..], &["--help"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_dominator"))
            .args(args)
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(!help.contains("This daemon"), "{help}");
        assert!(!help.contains("<daemon>"), "{help}");
        assert!(help.contains("/etc/ssl/dominator/cert.pem"), "{help}");
        assert!(help.contains("/etc/ssl/dominator/key.pem"), "{help}");
    }
    for program in ["imageserver", "subd"] {
        let help = testkit::run_bin_ok(program, &["--help"]);
        assert!(
            help.contains(&format!("/etc/ssl/{program}/cert.pem")),
            "{help}"
        );
        let version = testkit::run_bin_ok(program, &["--version"]);
        assert!(version.starts_with(&format!("{program} ")), "{version}");
    }
}
