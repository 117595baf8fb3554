//! Human text for an `UpdatePlan`: what an update would do on a machine (objects to fetch,
//! files to add, change and delete, triggers that would fire, reboots). Used by
//! `dominator plan` and the per-machine status page.
//!
//! Triggers are matched against the image's own triggers (the "new set"); the subd also
//! stops services from its previously applied image's triggers, which the dominator
//! cannot see.

use model::path::FsPath;
use model::{Kind, UpdatePlan};
use std::fmt::Write;

/// Whether the plan changes nothing (and fetches nothing).
pub fn is_noop(plan: &UpdatePlan) -> bool {
    plan.is_empty()
}

fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn describe_inode(i: &model::Inode) -> String {
    let mut s = format!("{} {}:{}", i.mode_string(), i.uid, i.gid);
    match i.kind {
        Kind::File => {
            let _ = write!(s, " {}", human_bytes(i.size));
        }
        Kind::Symlink => {
            let t = i.target.as_deref().unwrap_or_default();
            let _ = write!(s, " -> {}", model::path::escape(t));
        }
        _ => {}
    }
    s
}

/// The lines of a plan, one change per line, in the order subd applies them:
/// `fetch`, `mkdir`, `add` (or `change`, for a path the machine holds: what differs),
/// `seed` (the tops of the state subtrees the mkdirs and adds
/// seed), `link`, `delete`, `chmeta`, then `trigger` and `reboot`.
pub fn plan_lines(plan: &UpdatePlan) -> Vec<String> {
    let mut out = Vec::new();
    if !plan.objects_to_fetch.is_empty() {
        out.push(format!(
            "fetch   {} objects from the imageserver",
            plan.objects_to_fetch.len()
        ));
    }
    for c in &plan.files_to_copy_to_cache {
        out.push(format!(
            "reuse   {} (same content needed elsewhere)",
            c.path.display()
        ));
    }
    out.extend(hook_lines(plan, model::hooks::Phase::Pre));
    for d in &plan.dirs_to_make {
        out.push(format!(
            "mkdir   {} ({})",
            d.path.display(),
            describe_inode(&d.inode)
        ));
    }
    for i in &plan.inodes_to_make {
        out.push(match plan.replaced_at(&i.path) {
            Some(what) => format!(
                "change  {} ({}; now {})",
                i.path.display(),
                model::plan::Aspect::list(what),
                describe_inode(&i.inode)
            ),
            None => format!(
                "add     {} ({})",
                i.path.display(),
                describe_inode(&i.inode)
            ),
        });
    }
    for p in &plan.seeded {
        out.push(format!(
            "seed    {} (state: made only while nothing is there)",
            p.display()
        ));
    }
    for h in &plan.hardlinks_to_make {
        out.push(format!(
            "link    {} => {}",
            h.path.display(),
            h.target.display()
        ));
    }
    for p in &plan.paths_to_delete {
        out.push(format!("delete  {}", p.display()));
    }
    for c in &plan.inodes_to_change {
        let what = if c.mtime_only {
            "mtime only"
        } else {
            "owner/mode/mtime"
        };
        out.push(format!(
            "chmeta  {} ({}: {})",
            c.path.display(),
            what,
            describe_inode(&c.inode)
        ));
    }
    let touched: Vec<FsPath> = plan.touched_paths();
    let touched: Vec<&[u8]> = touched.iter().map(|p| p.as_bytes()).collect();
    let fired = plan.triggers.matching(&touched);
    for t in &fired {
        let action = if t.do_reboot {
            "start, then reboot"
        } else if t.do_reload {
            "reload"
        } else {
            "stop, then start"
        };
        out.push(format!("trigger {} ({action})", t.service));
    }
    if fired.iter().any(|t| t.do_reboot) {
        out.push("reboot  yes".to_string());
    }
    out.extend(hook_lines(plan, model::hooks::Phase::Post));
    out
}

/// `hook    pre NAME` lines: the hooks of `phase` the update runs, in order.
fn hook_lines(plan: &UpdatePlan, phase: model::hooks::Phase) -> Vec<String> {
    model::hooks::to_run(plan, phase)
        .iter()
        .map(|h| format!("hook    {phase} {}", h.name))
        .collect()
}

/// The whole preview for one machine.
pub fn describe(host: &str, plan: &UpdatePlan) -> String {
    let mut s = format!(
        "{host}: image {} ({})\n",
        plan.image_name,
        if plan.sparse { "sparse" } else { "full" }
    );
    if plan.state_diverged > 0 {
        let _ = writeln!(
            s,
            "  state: {} paths differ from the image's seed (kept as they are)",
            plan.state_diverged
        );
    }
    if is_noop(plan) {
        s.push_str("  in sync: nothing to do\n");
        return s;
    }
    if let Some(r) = &plan.unsafe_reason {
        let _ = writeln!(s, "  UNSAFE: {r}");
    }
    if plan.previous_image.is_empty() {
        s.push_str("  rebuild: the machine holds no image (its hooks get SUBD_REBUILD=1)\n");
    }
    for l in plan_lines(plan) {
        let _ = writeln!(s, "  {l}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::plan::PathInode;
    use model::{Inode, Mtime, ObjectId, Triggers};

    #[test]
    fn describes_changes_and_triggers() {
        let triggers = Triggers::parse(
            r#"[{"MatchLines":["/etc/app/.*"],"Service":"app"},{"MatchLines":["/boot/.*"],"Service":"kernel","DoReboot":true}]"#,
            "t",
        )
        .unwrap();
        let plan = UpdatePlan {
            image_name: "app/2".into(),
            sparse: true,
            objects_to_fetch: vec![ObjectId::of(b"x")],
            inodes_to_make: vec![PathInode {
                path: "/etc/app/app.conf".parse().unwrap(),
                inode: Inode::file(
                    0o644,
                    0,
                    0,
                    Mtime::default(),
                    2048,
                    Some(ObjectId::of(b"x")),
                ),
            }],
            paths_to_delete: vec!["/etc/old".parse().unwrap()],
            triggers,
            previous_image: "app/1".into(),
            ..UpdatePlan::default()
        };
        let text = describe("web1", &plan);
        assert_eq!(
            text,
            "web1: image app/2 (sparse)\n  fetch   1 objects from the imageserver\n  add     /etc/app/app.conf (-rw-r--r-- 0:0 2.0 KiB)\n  delete  /etc/old\n  trigger app (stop, then start)\n"
        );
        let mut with_hooks = plan.clone();
        let hook = |n: &str| model::hooks::Hook {
            name: n.into(),
            hash: ObjectId::of(n.as_bytes()),
            size: 1,
        };
        with_hooks.hooks = model::hooks::Hooks {
            pre: vec![hook("b"), hook("a")],
            post: vec![hook("z")],
        };
        let text = describe("web1", &with_hooks);
        assert!(
            text.contains(
                "fetch   1 objects from the imageserver\n  hook    pre a\n  hook    pre b\n  add "
            ) && text.ends_with("trigger app (stop, then start)\n  hook    post z\n"),
            "{text}"
        );
        let empty = UpdatePlan {
            image_name: "app/2".into(),
            ..UpdatePlan::default()
        };
        assert!(describe("w", &empty).contains("in sync: nothing to do"));
    }

    #[test]
    fn says_a_plan_for_a_machine_without_image_is_a_rebuild() {
        let mut plan = UpdatePlan {
            image_name: "app/1".into(),
            objects_to_fetch: vec![ObjectId::of(b"x")],
            ..UpdatePlan::default()
        };
        let line = "  rebuild: the machine holds no image (its hooks get SUBD_REBUILD=1)\n";
        let text = describe("h", &plan);
        assert!(
            text.starts_with(&format!("h: image app/1 (full)\n{line}  fetch")),
            "{text}"
        );
        plan.previous_image = "app/0".into();
        assert!(!describe("h", &plan).contains("rebuild"));
        let noop = UpdatePlan {
            image_name: "app/1".into(),
            ..UpdatePlan::default()
        };
        assert!(!describe("h", &noop).contains("rebuild"));
    }

    #[test]
    fn lists_what_would_be_seeded_and_counts_divergence() {
        let key: FsPath = "/mnt/state/key".parse().unwrap();
        let plan = UpdatePlan {
            image_name: "i".into(),
            inodes_to_make: vec![PathInode {
                path: key.clone(),
                inode: Inode::file(0o600, 0, 0, Mtime::default(), 0, None),
            }],
            seeded: vec![key],
            ..UpdatePlan::default()
        };
        let text = describe("h", &plan);
        assert!(
            text.contains("  seed    /mnt/state/key (state: made only while nothing is there)\n"),
            "{text}"
        );
        let kept = UpdatePlan {
            image_name: "i".into(),
            state_diverged: 2,
            ..UpdatePlan::default()
        };
        let text = describe("h", &kept);
        assert!(
            text.contains(
                "  state: 2 paths differ from the image's seed (kept as they are)\n  in sync"
            ),
            "{text}"
        );
    }
}
