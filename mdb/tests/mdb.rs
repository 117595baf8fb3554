//! The `mdb` command as operators run it: the real binary against real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn mdb(file: &Path, args: &[&str]) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_mdb"))
        .arg("--mdb")
        .arg(file)
        .args(args)
        .env_remove("MDB_FILE")
        .output()
        .expect("running mdb");
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    }
}

fn ok(file: &Path, args: &[&str]) -> String {
    let r = mdb(file, args);
    assert_eq!(r.code, 0, "mdb {args:?}: {}", r.stderr);
    r.stdout
}

fn fails(file: &Path, args: &[&str], code: i32, needle: &str) {
    let r = mdb(file, args);
    assert_eq!(r.code, code, "mdb {args:?}: {} {}", r.stdout, r.stderr);
    assert!(r.stderr.contains(needle), "mdb {args:?}: {}", r.stderr);
    if code == 1 {
        assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
    }
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("mdb.json");
    (d, p)
}

#[test]
fn add_set_show_list_remove() {
    let (_d, p) = scratch();
    ok(
        &p,
        &[
            "add",
            "web1:7001",
            "--required",
            "web/1",
            "--ip",
            "127.0.0.1:7001",
        ],
    );
    ok(
        &p,
        &[
            "add",
            "web2",
            "--required",
            "web/1",
            "--tag",
            "DisableSafetyCheck=true",
        ],
    );
    let shown = ok(
        &p,
        &[
            "set",
            "web2",
            "--required",
            "web/2",
            "--planned",
            "web/3",
            "--disable-updates",
            "true",
        ],
    );
    assert!(shown.contains("\"RequiredImage\": \"web/2\""), "{shown}");
    let list = ok(&p, &["list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["HOST", "REQUIRED", "PLANNED", "FLAGS"]
    );
    assert!(
        lines[1].starts_with("web1:7001")
            && lines[1].contains("web/1")
            && lines[1].contains("ip=127.0.0.1:7001"),
        "{list}"
    );
    assert!(
        lines[2].contains("web/2")
            && lines[2].contains("web/3")
            && lines[2].contains("updates-disabled,DisableSafetyCheck=true"),
        "{list}"
    );
    let show: serde_json::Value = serde_json::from_str(&ok(&p, &["show", "WEB2"])).unwrap();
    assert_eq!(show["DisableUpdates"], true);
    assert_eq!(show["Tags"]["DisableSafetyCheck"], "true");
    // The file is plain Dominator MDB JSON.
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    assert_eq!(file[0]["Hostname"], "web1:7001");
    assert_eq!(file[0]["IpAddress"], "127.0.0.1:7001");
    ok(&p, &["remove", "web1:7001"]);
    assert!(!ok(&p, &["list"]).contains("web1"));
    let json: serde_json::Value = serde_json::from_str(&ok(&p, &["list", "--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
}

#[test]
fn errors_are_one_line_and_change_nothing() {
    let (_d, p) = scratch();
    fails(&p, &["list"], 1, "mdb.json");
    ok(&p, &["add", "a", "--required", "img/1"]);
    let before = std::fs::read(&p).unwrap();
    fails(&p, &["add", "A"], 1, "duplicate Hostname \"A\"");
    fails(
        &p,
        &["set", "nope", "--required", "x"],
        1,
        "no machine \"nope\"",
    );
    fails(
        &p,
        &["set", "a", "--required", "../x"],
        1,
        "invalid image name",
    );
    fails(&p, &["set", "a"], 1, "nothing to change");
    fails(&p, &["add", "b:70000"], 1, "port");
    fails(&p, &["show", "zz"], 1, "no machine \"zz\"");
    fails(
        &p,
        &["set", "a", "--disable-updates", "maybe"],
        2,
        "invalid value",
    );
    fails(&p, &["frobnicate"], 2, "unrecognized subcommand");
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn check_reports_the_problem() {
    let (d, _p) = scratch();
    let f = d.path().join("x.json");
    let cases: &[(&str, Option<&str>)] = &[
        (r#"[{"Hostname":"a"},{"Hostname":"","Junk":1}]"#, None),
        (
            r#"[{"Hostname":"a"},{"Hostname":"a"}]"#,
            Some("duplicate Hostname \"a\": entry 1 (Hostname \"a\") and entry 2 (Hostname \"a\")"),
        ),
        (r#"[{"Hostname":"a"},]"#, Some("not valid JSON")),
        (r#"{"Hostname":"a"}"#, Some("JSON array")),
    ];
    for (text, err) in cases {
        std::fs::write(&f, text).unwrap();
        let r = mdb(&f, &["check", f.to_str().unwrap()]);
        match err {
            None => {
                assert_eq!(r.code, 0, "{text}: {}", r.stderr);
                assert!(
                    r.stdout
                        .contains("ok, 1 machines (1 entries without a Hostname ignored)"),
                    "{}",
                    r.stdout
                );
            }
            Some(e) => {
                assert_eq!(r.code, 1, "{text}");
                assert!(r.stderr.contains(e), "{text}: {}", r.stderr);
            }
        }
    }
}

#[test]
fn hand_edits_keep_working_and_unknown_keys_survive() {
    let (_d, p) = scratch();
    std::fs::write(
        &p,
        r#"[
  {"hostname": "a", "requiredimage": "img/1", "Location": "rack 7", "OwnerGroups": ["ops"]},
  {"Hostname": "b", "RequiredImage": "img/1"}
]"#,
    )
    .unwrap();
    ok(&p, &["set", "b", "--required", "img/2"]);
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains("\"Location\": \"rack 7\""), "{text}");
    assert!(text.contains("\"OwnerGroups\""), "{text}");
    // An operator edits the file by hand; mdb reads it.
    std::fs::write(&p, text.replace("img/2", "img/9")).unwrap();
    assert!(ok(&p, &["show", "b"]).contains("img/9"));
    // Rollback undoes the hand edit to the last recorded value.
    assert_eq!(
        ok(&p, &["rollback", "b"]).trim(),
        "b: RequiredImage img/9 -> img/2"
    );
}

#[test]
fn history_and_rollback() {
    let (_d, p) = scratch();
    ok(&p, &["add", "h", "--required", "app/1"]);
    ok(&p, &["set", "h", "--required", "app/2"]);
    ok(&p, &["set", "h", "--disable-updates", "true"]);
    ok(&p, &["set", "h", "--planned", "app/3"]);
    assert_eq!(
        ok(&p, &["rollback", "h"]).trim(),
        "h: RequiredImage app/2 -> app/1"
    );
    assert!(ok(&p, &["show", "h"]).contains("\"RequiredImage\": \"app/1\""));
    // A second rollback redoes.
    assert_eq!(
        ok(&p, &["rollback", "h"]).trim(),
        "h: RequiredImage app/1 -> app/2"
    );
    let hist = ok(&p, &["history", "h"]);
    let actions: Vec<&str> = hist
        .lines()
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    assert_eq!(
        actions,
        ["add", "set", "set", "set", "rollback", "rollback"],
        "{hist}"
    );
    let line = |n: usize| hist.lines().nth(n).unwrap().to_string();
    assert!(
        line(0).ends_with("(absent) -> RequiredImage app/1"),
        "{hist}"
    );
    assert!(line(1).ends_with("RequiredImage app/1 -> app/2"), "{hist}");
    assert!(line(2).ends_with("DisableUpdates false -> true"), "{hist}");
    assert!(line(3).ends_with("PlannedImage (none) -> app/3"), "{hist}");
    let raw = ok(&p, &["history", "h", "--json"]);
    assert_eq!(raw.lines().count(), 6);
    // Nothing to roll back to.
    ok(&p, &["add", "fresh", "--required", "x/1"]);
    fails(
        &p,
        &["rollback", "fresh"],
        1,
        "no earlier RequiredImage recorded for fresh",
    );
}

#[test]
fn a_bare_relative_file_name_works() {
    let d = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mdb"))
            .args(["--mdb", "m.json"])
            .args(args)
            .current_dir(d.path())
            .env_remove("MDB_FILE")
            .output()
            .unwrap()
    };
    let o = run(&["add", "m1", "--required", "x.0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["set", "m1", "--required", "x.1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["show", "m1"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("x.1"));
}

/// Hostnames and addresses that a client would read as URLs or paths, and control
/// characters an operator's terminal would act on, are refused by every entry point: the
/// edit commands change nothing, and a hand-edited file is refused naming the record.
#[test]
fn urls_paths_and_control_characters_are_refused() {
    let (d, p) = scratch();
    ok(&p, &["add", "web1", "--required", "img/1"]);
    let before = std::fs::read(&p).unwrap();
    for host in [
        "https://h:1/rpc/X?",
        "../etc",
        "a:b:c",
        "h/rpc/Subd.Poll",
        "a\u{1b}[2J",
    ] {
        fails(&p, &["add", host], 1, "Hostname");
        fails(&p, &["set", "web1", "--ip", host], 1, "IpAddress");
    }
    fails(
        &p,
        &["set", "web1", "--required", "img/\u{202e}1"],
        1,
        "contains a control or format character",
    );
    fails(
        &p,
        &["set", "web1", "--planned", "img/\t1"],
        1,
        "contains a control or format character",
    );
    assert_eq!(std::fs::read(&p).unwrap(), before, "nothing written");

    // A hand edit: the whole file is refused, naming the record.
    let f = d.path().join("hand.json");
    for (text, want) in [
        (
            r#"[{"Hostname":"web1"},{"Hostname":"https://h:1/rpc/X?"}]"#,
            r#"entry 2 (Hostname "https://h:1/rpc/X?"): Hostname: "https://h:1/rpc/X?": not a host name or IP address"#,
        ),
        (
            r#"[{"Hostname":"web1","IpAddress":"a:b:c"}]"#,
            r#"entry 1 (Hostname "web1"): IpAddress: "a:b:c": not a host name"#,
        ),
        (
            r#"[{"Hostname":"web1","Tags":{"Rack":"r\u001b]0;owned\u0007"}}]"#,
            r#"entry 1 (Hostname "web1"): tag "Rack" value "r\u{1b}]0;owned\u{7}" contains a control or format character"#,
        ),
    ] {
        std::fs::write(&f, text).unwrap();
        let r = mdb(&f, &["check", f.to_str().unwrap()]);
        assert_eq!(r.code, 1, "{text}: {}", r.stdout);
        assert!(r.stderr.contains(want), "{text}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
        assert!(!r.stderr.contains('\u{1b}'), "escaped: {:?}", r.stderr);
        let r = mdb(&f, &["list"]);
        assert_eq!(r.code, 1, "list refuses it too: {}", r.stdout);
    }
}

/// Issue 11 §3: `mdb set HOST --address ADDR` points a dead host's record at its
/// replacement (the same field as `--ip`).
#[test]
fn set_address_points_a_record_at_a_replacement_machine() {
    let (_d, p) = scratch();
    ok(&p, &["add", "bar", "--required", "web/1"]);
    let shown = ok(&p, &["set", "bar", "--address", "10.0.0.7:6969"]);
    assert!(
        shown.contains("\"IpAddress\": \"10.0.0.7:6969\""),
        "{shown}"
    );
    fails(
        &p,
        &["set", "bar", "--address", "http://x/"],
        1,
        "IpAddress",
    );
}

/// Three web hosts and a db host, each on app/1.
fn fleet_of_four(p: &Path) {
    for (h, role) in [("w1", "web"), ("w2", "web"), ("w3", "web"), ("d1", "db")] {
        let tag = format!("role={role}");
        ok(p, &["add", h, "--required", "app/1", "--tag", &tag]);
    }
}

#[test]
fn group_set_is_one_atomic_edit_and_rolls_back_as_one() {
    let (_d, p) = scratch();
    fleet_of_four(&p);
    let before_lines = std::fs::read_to_string(store_history(&p))
        .unwrap()
        .lines()
        .count();
    let o = ok(
        &p,
        &[
            "set",
            "--where",
            "role=web",
            "--required",
            "app/2",
            "--planned",
            "app/3",
        ],
    );
    assert_eq!(o, "edit #5: set 3 machines: w1, w2, w3\n");
    // One edit: three history lines, one per machine, sharing the edit id.
    let raw = std::fs::read_to_string(store_history(&p)).unwrap();
    let new: Vec<serde_json::Value> = raw
        .lines()
        .skip(before_lines)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(new.len(), 3, "{raw}");
    assert!(
        new.iter().all(|e| e["edit"] == 5 && e["action"] == "set"),
        "{raw}"
    );
    // `list --where` shows the group; the db host is untouched.
    let listed = ok(&p, &["list", "--where", "role=web"]);
    assert_eq!(listed.lines().count(), 4, "{listed}");
    assert!(
        listed
            .lines()
            .skip(1)
            .all(|l| l.split_whitespace().collect::<Vec<_>>()[1..3] == ["app/2", "app/3"]),
        "{listed}"
    );
    assert!(ok(&p, &["show", "d1"]).contains("\"RequiredImage\": \"app/1\""));
    let hist = ok(&p, &["history", "--where", "role=web"]);
    assert_eq!(hist.matches(" #5 ").count(), 3, "{hist}");

    // Undo edit #5 as a whole: every field it changed, on every machine.
    assert_eq!(
        ok(&p, &["rollback", "--entry", "5"]),
        "edit #8: undid edit #5 on 3 machines: w1, w2, w3\n"
    );
    for h in ["w1", "w2", "w3"] {
        let m: serde_json::Value = serde_json::from_str(&ok(&p, &["show", h])).unwrap();
        assert_eq!(m["RequiredImage"], "app/1", "{m}");
        assert!(m.get("PlannedImage").is_none_or(|v| v == ""), "{m}");
    }
    // Undoing it again conflicts (the machines no longer hold its values): nothing written.
    let text = std::fs::read_to_string(&p).unwrap();
    fails(
        &p,
        &["rollback", "--entry", "5"],
        1,
        "cannot undo edit #5: w1: RequiredImage changed since",
    );
    fails(
        &p,
        &["rollback", "--entry", "99"],
        1,
        "no edit #99 in the history",
    );
    assert_eq!(std::fs::read_to_string(&p).unwrap(), text);

    // `rollback --where`: each selected machine to its previous RequiredImage, one edit.
    ok(&p, &["set", "--where", "role=web", "--required", "app/4"]);
    let o = ok(&p, &["rollback", "--where", "role=web"]);
    assert!(o.ends_with("rolled back 3 machines\n"), "{o}");
    assert!(o.contains("w2: RequiredImage app/4 -> app/1\n"), "{o}");
    let ids: Vec<String> = std::fs::read_to_string(store_history(&p))
        .unwrap()
        .lines()
        .rev()
        .take(3)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["edit"].to_string())
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
}

fn store_history(p: &Path) -> PathBuf {
    mdb::store::history_path(p)
}

#[test]
fn a_selection_matching_nothing_is_an_error_and_changes_nothing() {
    let (_d, p) = scratch();
    fleet_of_four(&p);
    let text = std::fs::read_to_string(&p).unwrap();
    let hist = std::fs::read_to_string(store_history(&p)).unwrap();
    for args in [
        &["set", "--where", "role=mail", "--required", "app/9"][..],
        &[
            "set",
            "--where",
            "role=web",
            "--where",
            "site=ams",
            "--required",
            "app/9",
        ],
        &["list", "--where", "role=mail"],
        &["rollback", "--where", "Hostname=x*"],
        &["history", "--where", "role=mail"],
    ] {
        fails(&p, args, 1, "no machine in");
        let r = mdb(&p, args);
        assert!(r.stderr.contains("matches --where"), "{}", r.stderr);
    }
    fails(
        &p,
        &["set", "--where", "=x", "--required", "a/1"],
        1,
        "--where \"=x\": empty tag name",
    );
    fails(
        &p,
        &["set", "--where", "Hostname=", "--required", "a/1"],
        1,
        "empty Hostname pattern",
    );
    // A host and --where at once, or neither: usage errors.
    fails(
        &p,
        &["set", "w1", "--where", "role=web", "--required", "a/1"],
        2,
        "cannot be used",
    );
    fails(&p, &["set", "--required", "a/1"], 2, "required");
    // A bad field fails the whole group: nothing written.
    fails(
        &p,
        &["set", "--where", "role=web", "--required", "../x"],
        1,
        "RequiredImage",
    );
    assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
    assert_eq!(std::fs::read_to_string(store_history(&p)).unwrap(), hist);
}

#[test]
fn where_matches_tags_presence_and_host_globs() {
    let (_d, p) = scratch();
    fleet_of_four(&p);
    ok(&p, &["set", "w2", "--tag", "canary"]);
    let hosts = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["list"];
        a.extend_from_slice(args);
        ok(&p, &a)
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect()
    };
    assert_eq!(hosts(&["--where", "canary"]), ["w2"]);
    assert_eq!(hosts(&["--where", "Hostname=w*"]), ["w1", "w2", "w3"]);
    assert_eq!(hosts(&["--where", "Hostname=?1"]), ["w1", "d1"]);
    assert_eq!(
        hosts(&["--where", "role=web", "--where", "Hostname=*3"]),
        ["w3"]
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&p, &["list", "--json", "--where", "role=db"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
}

#[test]
fn history_written_before_edit_ids_reads_one_edit_per_line() {
    let (_d, p) = scratch();
    ok(&p, &["add", "h", "--required", "app/1"]);
    ok(&p, &["set", "h", "--required", "app/2"]);
    // Strip the edit ids, as an older mdb wrote the history.
    let hp = store_history(&p);
    let old: String = std::fs::read_to_string(&hp)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("edit");
            format!("{v}\n")
        })
        .collect();
    std::fs::write(&hp, old).unwrap();
    let hist = ok(&p, &["history", "h"]);
    assert!(hist.lines().nth(1).unwrap().contains(" #2 "), "{hist}");
    assert_eq!(
        ok(&p, &["rollback", "--entry", "2"]),
        "edit #3: undid edit #2 on 1 machines: h\n"
    );
    assert!(ok(&p, &["show", "h"]).contains("\"RequiredImage\": \"app/1\""));
    // Undoing an add removes the machine.
    ok(&p, &["rollback", "--entry", "1"]);
    fails(&p, &["show", "h"], 1, "no machine \"h\"");
}

#[test]
fn an_unreachable_image_server_is_a_one_line_error() {
    let (_d, p) = scratch();
    ok(&p, &["add", "h", "--required", "app/1"]);
    ok(&p, &["set", "h", "--required", "app/2"]);
    let text = std::fs::read_to_string(&p).unwrap();
    for args in [
        &["show", "h", "--image-server", "127.0.0.1:1"][..],
        &["rollback", "h", "--image-server", "127.0.0.1:1"],
    ] {
        fails(&p, args, 1, "asking the imageserver");
    }
    assert_eq!(
        std::fs::read_to_string(&p).unwrap(),
        text,
        "nothing changed"
    );
}

#[test]
fn check_warns_on_misspelled_keys_and_refuses_a_key_given_twice() {
    let (d, _p) = scratch();
    let f = d.path().join("x.json");
    let check = |text: &str| {
        std::fs::write(&f, text).unwrap();
        mdb(&f, &["check", f.to_str().unwrap()])
    };
    // A typo: accepted (the key is kept) but warned about, naming the record and the key.
    let r = check(r#"[{"Hostname":"m1","RequiredImag":"app.1","Rack":"r7"}]"#);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("ok, 1 machines"), "{}", r.stdout);
    assert_eq!(
        r.stderr.trim(),
        "mdb: warning: entry 1 (Hostname \"m1\"): unknown key \"RequiredImag\" (kept, but not read): did you mean \"RequiredImage\"?"
    );
    // Another case: read as the known key, but said.
    let r = check(r#"[{"hostname":"m1","RequiredImage":"app.1"}]"#);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("key \"hostname\" is read as \"Hostname\""),
        "{}",
        r.stderr
    );
    // Two spellings of one key, or one key twice: refused, one line.
    let r = check(r#"[{"Hostname":"m1","RequiredImage":"a.1","Requiredimage":"a.2"}]"#);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("entry 1: keys \"RequiredImage\" and \"Requiredimage\" are the same key"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    let r =
        check("[{\"Hostname\":\"m1\",\n\"RequiredImage\":\"a.1\",\n\"RequiredImage\":\"a.2\"}]");
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("duplicate key \"RequiredImage\" at line 3"),
        "{}",
        r.stderr
    );
    // A clean file warns about nothing.
    let r = check(r#"[{"Hostname":"m1","RequiredImage":"a.1","Tags":{"Rack":"7"}}]"#);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
}

#[test]
fn set_required_warns_when_the_imageserver_lacks_the_image() {
    let (d, p) = scratch();
    let data = d.path().join("is");
    let is = testkit::Daemon::imageserver(&testkit::bin("imageserver"), &data, &[]);
    let tree = d.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/motd"), "hi\n").unwrap();
    let added = Command::new(testkit::bin("imagetool"))
        .args(["--image-server", &is.addr, "add", "app.1"])
        .arg(&tree)
        .args(["", ""])
        .env("HOME", d.path())
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mdb"))
            .arg("--mdb")
            .arg(&p)
            .args(["--image-server", &is.addr])
            .args(args)
            .env("HOME", d.path())
            .env_remove("MDB_FILE")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    // The image is there: nothing to say.
    assert_eq!(run(&["add", "m1", "--required", "app.1"]), "");
    // A typo: warned, and made all the same.
    let err = run(&["set", "m1", "--required", "app.11"]);
    assert_eq!(
        err.trim(),
        format!(
            "mdb: warning: the imageserver {} has no image \"app.11\": the machine will show `image not ready` until it is added",
            is.addr
        )
    );
    assert!(ok(&p, &["show", "m1"]).contains("app.11"));
    // Without an imageserver configured, nothing is checked.
    let r = mdb(&p, &["set", "m1", "--required", "app.12"]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
}
