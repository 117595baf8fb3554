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
