//! Hostile input to the real binaries: update plans a subd must refuse whole (an owner
//! `chown` cannot set, a directory in `inodes_to_make`), an MDB edited by hand to hold a
//! URL where a host name belongs (the dominator keeps its previous list and names the
//! record), and an image directory on disk whose name holds a bidi override (the
//! imageserver skips it at start-up).

mod common;

use common::{add_image, full_poll, imageserver, subd};
use model::api::UpdateRequest;
use model::image::Inode;
use model::plan::PathInode;
use model::UpdatePlan;
use std::process::Command;
use std::time::{Duration, Instant};
use testkit::{bin, Daemon};
use wire::client::{ClientError, ClientSecurity, RpcClient};

fn at(path: &str, inode: Inode) -> PathInode {
    PathInode {
        path: path.parse().unwrap(),
        inode,
    }
}

#[tokio::test]
async fn subd_refuses_a_plan_with_an_unsettable_owner_or_a_directory_among_inodes() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let (_d, c) = subd(&root);
    full_poll(&c, 0).await; // a scan has finished: the plan itself decides
    let bad: Vec<(UpdatePlan, &str)> = vec![
        (
            UpdatePlan {
                inodes_to_make: vec![at("/newdir", Inode::dir(0o755, 0, 0))],
                ..UpdatePlan::default()
            },
            "refusing invalid plan: /newdir: a directory in inodes_to_make",
        ),
        (
            UpdatePlan {
                dirs_to_make: vec![at("/opt", Inode::dir(0o755, 0, 0))],
                inodes_to_make: vec![at(
                    "/opt/tool",
                    Inode::symlink(u32::MAX, u32::MAX, "/bin/sh"),
                )],
                ..UpdatePlan::default()
            },
            "refusing invalid plan: /opt/tool: uid 4294967295 is (uid_t)-1, which chown reads as \"leave unchanged\"",
        ),
        (
            UpdatePlan {
                dirs_to_make: vec![at("/opt", Inode::dir(0o4755, 0, u32::MAX))],
                ..UpdatePlan::default()
            },
            "refusing invalid plan: /opt: gid 4294967295 is (uid_t)-1",
        ),
        (
            // subd would refuse to start on such a root: the machine would be wedged.
            UpdatePlan {
                inodes_to_change: vec![model::plan::MetadataChange {
                    path: model::FsPath::root(),
                    inode: Inode::dir(0o777, 0, 0),
                    mtime_only: false,
                }],
                ..UpdatePlan::default()
            },
            "refusing invalid plan: /: mode 0777 would let other users write the root",
        ),
    ];
    for (plan, want) in bad {
        let err = c
            .update(&UpdateRequest { plan, wait: true })
            .await
            .expect_err(want);
        match &err {
            ClientError::Status {
                status, message, ..
            } => {
                assert_eq!(*status, 400, "{err}");
                assert!(message.contains(want), "{message:?} lacks {want:?}");
                assert!(!message.contains('\n'), "one line: {message:?}");
            }
            other => panic!("want a 400, got {other}"),
        }
        assert!(!root.join("newdir").exists() && !root.join("opt").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&root).unwrap().permissions().mode();
        assert_eq!(mode & 0o022, 0, "root left writable by others: {mode:o}");
    }
    // A Fetch whose imageserver is a URL or carries a path would send GetObjects to some
    // other method of some other server: refused, and nothing claimed.
    for server in [
        "127.0.0.1:7200/../x",
        "127.0.0.1:7201/rpc/X?",
        "http://127.0.0.1:1",
        "h:1#x",
    ] {
        let err = c
            .fetch(&model::api::FetchRequest {
                server: server.into(),
                hashes: vec![model::ObjectId::of(b"x")],
                wait: true,
                ..Default::default()
            })
            .await
            .expect_err(server);
        assert_eq!(err.status(), Some(400), "{server}: {err}");
        assert!(err.to_string().contains("is not HOST[:PORT]"), "{err}");
    }
    // Nothing was left claimed: a valid plan runs at once.
    let plan = UpdatePlan {
        dirs_to_make: vec![at("/opt", Inode::dir(0o755, 0, 0))],
        inodes_to_make: vec![at("/opt/tool", Inode::symlink(0, 0, "/bin/sh"))],
        ..UpdatePlan::default()
    };
    let r = c
        .update(&UpdateRequest { plan, wait: true })
        .await
        .unwrap()
        .result
        .unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        std::fs::read_link(root.join("opt/tool")).unwrap(),
        std::path::Path::new("/bin/sh")
    );
}

/// Reads `/api/fleet` until `done` holds (10 s at most); returns the last view.
async fn fleet_until(
    api: &RpcClient,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let text = api.get_text("/api/fleet").await.unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if done(&v) || t0.elapsed() > Duration::from_secs(10) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hosts(v: &serde_json::Value) -> Vec<String> {
    v["machines"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m["host"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn the_dominator_refuses_a_hand_edited_mdb_naming_the_bad_record() {
    let work = tempfile::tempdir().unwrap();
    let mdb = work.path().join("mdb.json");
    std::fs::write(&mdb, r#"[{"Hostname":"web1","IpAddress":"127.0.0.1:1"}]"#).unwrap();
    let args = [
        "--mdb",
        mdb.to_str().unwrap(),
        "--image-server",
        "127.0.0.1:1", // nothing listens there
        "--listen",
        "127.0.0.1:0",
        "--permit-insecure-mode",
    ];
    let dom = Daemon::start(&bin("dominator"), &args.map(String::from));
    let api = RpcClient::new(
        &dom.addr,
        wire::client::DOMINATOR_PORT,
        &ClientSecurity::Insecure,
        wire::client::DOMINATOR_NAME,
        Some(Duration::from_secs(10)),
    )
    .unwrap();
    let v = fleet_until(&api, |v| hosts(v) == ["web1"]).await;
    assert_eq!(hosts(&v), ["web1"], "{v:#}");

    for (bad, want) in [
        (
            r#"[{"Hostname":"web1","IpAddress":"127.0.0.1:1"},{"Hostname":"https://127.0.0.1:1/rpc/X?"}]"#,
            r#"entry 2 (Hostname "https://127.0.0.1:1/rpc/X?"): Hostname: "https://127.0.0.1:1/rpc/X?": not a host name or IP address"#,
        ),
        (
            r#"[{"Hostname":"web1","IpAddress":"127.0.0.1:1"},{"Hostname":"web2","IpAddress":"a:b:c"}]"#,
            r#"entry 2 (Hostname "web2"): IpAddress: "a:b:c": not a host name"#,
        ),
    ] {
        std::fs::write(&mdb, bad).unwrap();
        let v = fleet_until(&api, |v| {
            v["mdb_error"].as_str().is_some_and(|e| e.contains(want))
        })
        .await;
        let err = v["mdb_error"].as_str().unwrap_or_default();
        assert!(err.contains(want), "{err:?} lacks {want:?}: {v:#}");
        assert!(!err.contains('\n'), "one line: {err:?}");
        assert_eq!(hosts(&v), ["web1"], "the previous list is kept: {v:#}");
    }
    // Fixed by hand: loaded again.
    std::fs::write(
        &mdb,
        r#"[{"Hostname":"web1","IpAddress":"127.0.0.1:1"},{"Hostname":"web2","IpAddress":"127.0.0.1:2"}]"#,
    )
    .unwrap();
    let v = fleet_until(&api, |v| hosts(v).len() == 2 && v["mdb_error"].is_null()).await;
    assert_eq!(hosts(&v), ["web1", "web2"], "{v:#}");
    assert!(v["mdb_error"].is_null(), "{v:#}");
}

#[tokio::test]
async fn the_imageserver_skips_an_image_on_disk_whose_name_has_a_bidi_override() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/motd"), "hi\n").unwrap();
    let mut d = imageserver(&data);
    let server = d.addr.clone();
    add_image(&server, "web/1", &tree, "").await;
    add_image(&server, "web/2", &tree, "").await;
    d.kill9();
    // Someone (or something) renames an image directory on disk.
    let hostile = "2\u{202e}txt.exe";
    std::fs::rename(
        data.join("images/web/2"),
        data.join("images/web").join(hostile),
    )
    .unwrap();
    let d = imageserver(&data);
    let out = Command::new(bin("imagetool"))
        .args(["--image-server", &d.addr, "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "web/1\n");
}
