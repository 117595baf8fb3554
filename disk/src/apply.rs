//! Executing an `UpdatePlan` under a root directory (subd's Update and `patch-directory`).
//!
//! Order (Dominator §3.3, §6.5): copy local files into the object cache and stage every
//! new inode in `STATE/staging` with its final owner, mode and mtime (only `STATE` is
//! touched so far) → stop the services the old trigger set matches → make directories →
//! rename staged inodes into place → hardlinks → deletions → metadata changes (chown before
//! chmod, then mtime) → start or reload the services the new set matches. Content reaches
//! its path only by rename, so every file is at all times wholly old or wholly new.
//!
//! Every path is checked (not under `/.subd`, not excluded) and resolved from a handle on
//! the root one component at a time with `O_NOFOLLOW`, never crossing a mount point; all
//! changes go through `*at` calls on directory handles or through handles on the inode
//! itself, so no write, chown or chmod can follow a symlink out of the root. A failed step
//! is recorded and the rest continues.

use crate::objectstore::ObjectStore;
use crate::statedir::StateDir;
use model::api::UpdateResult;
use model::diff::{is_protected, object_uses};
use model::filter::Filter;
use model::hash::ObjectId;
use model::image::{Inode, Kind};
use model::path::FsPath;
use model::plan::UpdatePlan;
use model::triggers::{Trigger, Triggers};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, CWD};
use rustix::io::Errno;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// File in the state directory holding the triggers of the last applied image.
pub const PREVIOUS_TRIGGERS: &str = "triggers.previous";
/// The `[service, action]` pairs an update owes after its change window, written before
/// its first `stop` and removed once they have run: if subd dies in between, they are
/// run when it starts again (`resume_pending_starts`), so no service stays stopped.
pub const PENDING_STARTS: &str = "pending-starts";
/// Where (relative to the root) the name of the last full image applied is written.
pub const PATCHED_IMAGE: &str = "/var/lib/patched-image";

/// How to apply.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// The machine's scan exclusions: never touched.
    pub exclusions: Option<Filter>,
    /// `CMD NAME stop|start|reload`; `None` logs trigger actions without running them.
    pub service_command: Option<Vec<String>>,
    /// Run when a matched trigger asks for a reboot and every start succeeded; `None`
    /// records the reboot as skipped.
    pub reboot_command: Option<Vec<String>>,
    /// A command running longer is killed (with its process group) and reported.
    pub command_timeout: Duration,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            exclusions: None,
            service_command: None,
            reboot_command: None,
            command_timeout: Duration::from_secs(120),
        }
    }
}

fn errno_msg(e: Errno) -> String {
    io::Error::from(e).to_string()
}

/// Handles on the root and the last directory resolved under it.
struct Root {
    fd: Arc<OwnedFd>,
    dev: u64,
    last: Option<(FsPath, Arc<OwnedFd>)>,
}

impl Root {
    fn open(root: &Path) -> io::Result<Root> {
        let fd = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let dev = rustix::fs::fstat(&fd)?.st_dev;
        Ok(Root {
            fd: Arc::new(fd),
            dev,
            last: None,
        })
    }

    /// A handle on directory `dir`, walked from the root without following symlinks or
    /// crossing mount points.
    fn dir(&mut self, dir: &FsPath) -> Result<Arc<OwnedFd>, String> {
        if dir.is_root() {
            return Ok(self.fd.clone());
        }
        if let Some((p, fd)) = &self.last {
            if p == dir {
                return Ok(fd.clone());
            }
        }
        let mut cur = self.fd.clone();
        for comp in dir.components() {
            let next = rustix::fs::openat(
                cur.as_fd(),
                comp,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| match e {
                Errno::LOOP | Errno::NOTDIR => {
                    format!(
                        "{}: a component is a symlink or not a directory",
                        dir.display()
                    )
                }
                e => format!("{}: {}", dir.display(), errno_msg(e)),
            })?;
            let st = rustix::fs::fstat(&next).map_err(errno_msg)?;
            if st.st_dev != self.dev {
                return Err(format!("{}: crosses a mount point", dir.display()));
            }
            cur = Arc::new(next);
        }
        self.last = Some((dir.clone(), cur.clone()));
        Ok(cur)
    }

    /// The parent directory handle and file name of `path` (not the root).
    fn parent(&mut self, path: &FsPath) -> Result<(Arc<OwnedFd>, Vec<u8>), String> {
        let parent = path
            .parent()
            .ok_or_else(|| "the root has no parent".to_string())?;
        Ok((self.dir(&parent)?, path.name().to_vec()))
    }

    fn forget(&mut self) {
        self.last = None;
    }
}

fn kind_of(st: &rustix::fs::Stat) -> Option<Kind> {
    Kind::from_mode(st.st_mode)
}

/// Opens the inode `name` in `dir` without following a symlink: a normal handle for
/// directories, files and FIFOs, an `O_PATH` handle for symlinks and devices (opening a
/// device could have side effects). Returns the handle and whether it is `O_PATH`.
fn open_inode(dir: BorrowedFd<'_>, name: &[u8], kind: Kind) -> Result<(OwnedFd, bool), Errno> {
    let base = OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match kind {
        Kind::Dir => rustix::fs::openat(
            dir,
            name,
            base | OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .map(|f| (f, false)),
        Kind::File | Kind::Fifo => rustix::fs::openat(
            dir,
            name,
            base | OFlags::RDONLY | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map(|f| (f, false)),
        Kind::Symlink | Kind::Char | Kind::Block => {
            rustix::fs::openat(dir, name, base | OFlags::PATH, Mode::empty()).map(|f| (f, true))
        }
    }
}

fn proc_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Sets owner, then mode (so setuid survives the chown), then mtime, on an open inode
/// whose kind is first checked against `want`.
fn set_metadata(fd: &OwnedFd, o_path: bool, want: &Inode) -> Result<(), String> {
    let st = rustix::fs::fstat(fd).map_err(errno_msg)?;
    if kind_of(&st) != Some(want.kind) {
        return Err(format!(
            "is a {:?}, expected a {:?}",
            kind_of(&st),
            want.kind
        ));
    }
    let (uid, gid) = (
        rustix::fs::Uid::from_raw(want.uid),
        rustix::fs::Gid::from_raw(want.gid),
    );
    if st.st_uid != want.uid || st.st_gid != want.gid {
        rustix::fs::chownat(fd, "", Some(uid), Some(gid), AtFlags::EMPTY_PATH)
            .map_err(|e| format!("chown: {}", errno_msg(e)))?;
    }
    if want.kind != Kind::Symlink {
        let mode = Mode::from_raw_mode(want.mode & 0o7777);
        if o_path {
            rustix::fs::chmodat(CWD, proc_path(fd), mode, AtFlags::empty())
        } else {
            rustix::fs::fchmod(fd, mode)
        }
        .map_err(|e| format!("chmod: {}", errno_msg(e)))?;
    }
    if want.keeps_mtime() {
        let t = Timespec {
            tv_sec: want.mtime.sec,
            tv_nsec: want.mtime.nsec as _,
        };
        let times = Timestamps {
            last_access: t,
            last_modification: t,
        };
        if o_path {
            rustix::fs::utimensat(CWD, proc_path(fd), &times, AtFlags::empty())
        } else {
            rustix::fs::futimens(fd, &times)
        }
        .map_err(|e| format!("set mtime: {}", errno_msg(e)))?;
    }
    Ok(())
}

/// Removes `name` in `dir` with everything beneath it, never following symlinks, never
/// crossing mount points, leaving protected paths (and so their ancestors) in place.
fn remove_tree(
    dir: BorrowedFd<'_>,
    name: &[u8],
    path: &FsPath,
    dev: u64,
    exclusions: Option<&Filter>,
) -> Result<(), String> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(format!("{}: {}", path.display(), errno_msg(e))),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(dir, name, AtFlags::empty())
            .map_err(|e| format!("{}: {}", path.display(), errno_msg(e)));
    }
    if st.st_dev != dev {
        return Err(format!("{}: a mount point, not removed", path.display()));
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("{}: {}", path.display(), errno_msg(e)))?;
    let mut names: Vec<Vec<u8>> = Vec::new();
    let entries = rustix::fs::Dir::read_from(&fd)
        .map_err(|e| format!("{}: {}", path.display(), errno_msg(e)))?;
    for e in entries {
        let e = e.map_err(|e| format!("{}: {}", path.display(), errno_msg(e)))?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    let mut first_err: Option<String> = None;
    for n in names {
        let Ok(child) = path.join(&n) else { continue };
        if is_protected(&child, exclusions) {
            first_err.get_or_insert(format!(
                "{}: holds protected {}",
                path.display(),
                child.display()
            ));
            continue;
        }
        if let Err(e) = remove_tree(fd.as_fd(), &n, &child, dev, exclusions) {
            first_err.get_or_insert(e);
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
        .map_err(|e| format!("{}: {}", path.display(), errno_msg(e)))
}

/// Runs `argv + args` with stdin detached and stdout/stderr captured (into an unlinked temp
/// file, so a chatty command never blocks on a full pipe), in its own process group,
/// killed (group and all) after `timeout`. The output's last line is logged, and on failure
/// ends the error (`exit status: 1 (app: unrecognized service)`).
pub fn run_command(argv: &[String], args: &[&str], timeout: Duration) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let Some((prog, rest)) = argv.split_first() else {
        return Err("empty command".into());
    };
    let out = tempfile::tempfile().ok();
    let sink = || {
        out.as_ref()
            .and_then(|f| f.try_clone().ok())
            .map_or_else(Stdio::null, Stdio::from)
    };
    let mut child = std::process::Command::new(prog)
        .args(rest)
        .args(args)
        .stdin(Stdio::null())
        .stdout(sink())
        .stderr(sink())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let said = || out.as_ref().map(last_line).unwrap_or_default();
    let with_output = |e: String| match said() {
        l if l.is_empty() => e,
        l => format!("{e} ({l})"),
    };
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => {
                let l = said();
                if !l.is_empty() {
                    tracing::info!("{prog} {}: {l}", args.join(" "));
                }
                return Ok(());
            }
            Ok(Some(status)) => return Err(with_output(status.to_string())),
            Ok(None) if Instant::now() >= deadline => {
                if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(with_output(format!("timed out after {timeout:?}, killed")));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The last non-empty line of what a command wrote (its final 4 KiB), at most 200 chars.
fn last_line(f: &std::fs::File) -> String {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    let len = f.seek(SeekFrom::End(0)).unwrap_or(0);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(4096))).is_err()
        || f.take(4096).read_to_end(&mut buf).is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty());
    line.unwrap_or("").chars().take(200).collect()
}

/// The previously applied image's triggers saved in `state_dir` (none if absent or bad).
pub fn load_previous_triggers(state_dir: &StateDir) -> Triggers {
    state_dir
        .read(PREVIOUS_TRIGGERS)
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<Trigger>>(&b).ok())
        .and_then(|v| Triggers::new(v).ok())
        .unwrap_or_default()
}

struct Run<'a> {
    opts: &'a ApplyOptions,
    result: UpdateResult,
}

impl Run<'_> {
    fn error(&mut self, msg: String) {
        tracing::warn!("update: {msg}");
        self.result.errors.push(msg);
    }

    fn service(&mut self, service: &str, action: &str) -> bool {
        let line = format!("{service} {action}");
        let Some(cmd) = &self.opts.service_command else {
            self.result
                .trigger_actions
                .push(format!("{line} (triggers disabled)"));
            return true;
        };
        self.result.trigger_actions.push(line.clone());
        match run_command(cmd, &[service, action], self.opts.command_timeout) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("trigger {line}: {e}");
                self.result.trigger_failures.push(format!("{line}: {e}"));
                false
            }
        }
    }
}

/// Applies `plan` to `root`; `state_dir` (reached only through its handle) holds
/// `objects/` (the cache, same file-system as the root), `staging/` and
/// `triggers.previous`. Never panics on bad input; every failure is a line in
/// `UpdateResult::errors` or `trigger_failures`.
pub fn apply(
    root: &Path,
    state_dir: &StateDir,
    plan: &UpdatePlan,
    opts: &ApplyOptions,
) -> UpdateResult {
    let mut run = Run {
        opts,
        result: UpdateResult {
            image_name: plan.image_name.clone(),
            ..UpdateResult::default()
        },
    };
    // Starts a previous, interrupted update still owes come first.
    let (owed, failed) = resume_pending_starts(state_dir, opts);
    run.result.trigger_actions.extend(owed);
    run.result.trigger_failures.extend(failed);
    if let Some(r) = &plan.unsafe_reason {
        run.error(format!("refused: unsafe update: {r}"));
        return finish(run);
    }
    if let Err(e) = plan
        .validate()
        .and_then(|()| plan.check_root(rustix::process::geteuid().as_raw()))
    {
        run.error(format!("refused: invalid plan: {e}"));
        return finish(run);
    }
    let mut fs = match Root::open(root) {
        Ok(r) => r,
        Err(e) => {
            run.error(format!("{}: {e}", root.display()));
            return finish(run);
        }
    };
    let store = match state_dir.objects() {
        Ok(s) => s,
        Err(e) => {
            run.error(e.to_string());
            return finish(run);
        }
    };
    let excl = opts.exclusions.as_ref();
    let ok = |p: &FsPath| !is_protected(p, excl);
    let mut refused: Vec<String> = Vec::new();
    let mut check = |p: &FsPath, root_ok: bool| -> bool {
        let good = ok(p) && (root_ok || !p.is_root());
        if !good {
            refused.push(format!(
                "refused: {}: the root, under /.subd, or excluded",
                p.display()
            ));
        }
        good
    };
    let dirs: Vec<_> = plan
        .dirs_to_make
        .iter()
        .filter(|d| check(&d.path, true))
        .collect();
    let inodes: Vec<_> = plan
        .inodes_to_make
        .iter()
        .filter(|i| check(&i.path, false) && i.inode.kind != Kind::Dir)
        .collect();
    let links: Vec<_> = plan
        .hardlinks_to_make
        .iter()
        .filter(|h| check(&h.path, false) && check(&h.target, false))
        .collect();
    let deletes: Vec<_> = plan
        .paths_to_delete
        .iter()
        .filter(|p| check(p, false))
        .collect();
    let changes: Vec<_> = plan
        .inodes_to_change
        .iter()
        .filter(|c| check(&c.path, true))
        .collect();
    for r in refused {
        run.error(r);
    }

    // Trigger matching over what will really be touched.
    let mut touched: Vec<&[u8]> = Vec::new();
    touched.extend(dirs.iter().map(|d| d.path.as_bytes()));
    touched.extend(inodes.iter().map(|i| i.path.as_bytes()));
    touched.extend(links.iter().map(|h| h.path.as_bytes()));
    touched.extend(deletes.iter().map(|p| p.as_bytes()));
    touched.extend(
        changes
            .iter()
            .filter(|c| !c.mtime_only)
            .map(|c| c.path.as_bytes()),
    );
    let previous = load_previous_triggers(state_dir);
    let old_set = previous.merged_with(&plan.triggers);
    let matched_old: Vec<Trigger> = old_set.matching(&touched).into_iter().cloned().collect();
    let matched_new: Vec<Trigger> = plan
        .triggers
        .matching(&touched)
        .into_iter()
        .cloned()
        .collect();

    // 1. Copy local files into the cache (verified) and stage every new inode.
    let t_start = Instant::now();
    copy_to_cache(&mut fs, &store, plan, &mut run);
    let staged = match prepare_staging(state_dir) {
        Ok(fd) => Some(fd),
        Err(e) => {
            run.error(format!("{}/staging: {e}", state_dir.shown().display()));
            None
        }
    };
    let mut staged_names: Vec<Option<String>> = vec![None; inodes.len()];
    if let Some(sfd) = &staged {
        let mut uses = object_uses(plan);
        for (n, pi) in inodes.iter().enumerate() {
            let name = format!("{n}");
            match stage(sfd, &name, &pi.inode, &store, &mut uses) {
                Ok(()) => staged_names[n] = Some(name),
                Err(e) => run.error(format!("stage {}: {e}", pi.path.display())),
            }
        }
        // Content durable before any rename makes it visible.
        if let Err(e) = rustix::fs::syncfs(sfd) {
            run.error(format!("sync: {}", errno_msg(e)));
        }
    }

    let t_staged = Instant::now();
    // 2. Stop phase (skipped entirely when a reboot is due), after recording the starts
    // owed, so a crash in between cannot leave a service stopped.
    let reboot = matched_old.iter().chain(&matched_new).any(|t| t.do_reboot);
    let mut stopped: BTreeSet<String> = BTreeSet::new();
    let mut to_stop: Vec<String> = Vec::new();
    if !reboot {
        for t in &matched_old {
            if t.do_reload || t.service == "subd" || stopped.contains(&t.service) {
                continue;
            }
            stopped.insert(t.service.clone());
            to_stop.push(t.service.clone());
        }
    }
    let (starts, restart_subd) = if reboot {
        (Vec::new(), false)
    } else {
        start_actions(&matched_new, &stopped)
    };
    if !starts.is_empty() {
        let json = serde_json::to_vec(&starts).expect("pairs serialize");
        if let Err(e) = state_dir.write_atomic(PENDING_STARTS, &json) {
            run.error(format!("saving {PENDING_STARTS}: {e}"));
        }
    }
    for svc in &to_stop {
        run.service(svc, "stop");
    }

    // 3. The change window, at raised priority so a busy machine does not stretch it.
    let boost = PriorityBoost::raise();
    let mut window: Option<Instant> = None;
    let mut last_change = Instant::now();
    let mut mark = |w: &mut Option<Instant>| {
        let now = Instant::now();
        w.get_or_insert(now);
        last_change = now;
    };
    for d in &dirs {
        match make_dir(&mut fs, &d.path, &d.inode) {
            Ok(()) => {
                mark(&mut window);
            }
            Err(e) => run.error(format!("mkdir {}: {e}", d.path.display())),
        }
    }
    if let Some(sfd) = &staged {
        for (pi, name) in inodes.iter().zip(&staged_names) {
            let Some(name) = name else { continue };
            let r = fs.parent(&pi.path).and_then(|(pfd, leaf)| {
                clear_dir_in_way(&mut fs, pfd.as_fd(), &leaf, &pi.path, excl)?;
                rustix::fs::renameat(sfd, name.as_str(), &*pfd, leaf.as_slice()).map_err(errno_msg)
            });
            match r {
                Ok(()) => {
                    mark(&mut window);
                }
                Err(e) => {
                    run.error(format!("install {}: {e}", pi.path.display()));
                    // Keep the content: a staged object goes back to the cache, so the
                    // next update need not fetch it again.
                    if let (Kind::File, Some(h)) = (pi.inode.kind, pi.inode.hash) {
                        return_to_cache(sfd, name, &store, &h);
                    }
                }
            }
        }
        for (n, h) in links.iter().enumerate() {
            let tmp = format!("link.{n}");
            let r = fs.parent(&h.target).and_then(|(tfd, tleaf)| {
                rustix::fs::linkat(&*tfd, tleaf.as_slice(), sfd, tmp.as_str(), AtFlags::empty())
                    .map_err(|e| format!("link from {}: {}", h.target.display(), errno_msg(e)))?;
                let (pfd, leaf) = fs.parent(&h.path)?;
                clear_dir_in_way(&mut fs, pfd.as_fd(), &leaf, &h.path, excl)?;
                let r = rustix::fs::renameat(sfd, tmp.as_str(), &*pfd, leaf.as_slice())
                    .map_err(errno_msg);
                // Renaming onto another name of the same inode leaves the temp name.
                let _ = rustix::fs::unlinkat(sfd, tmp.as_str(), AtFlags::empty());
                r
            });
            match r {
                Ok(()) => {
                    mark(&mut window);
                }
                Err(e) => run.error(format!("hardlink {}: {e}", h.path.display())),
            }
        }
    }
    for p in &deletes {
        let r = fs.parent(p).and_then(|(pfd, leaf)| {
            fs.forget();
            remove_tree(pfd.as_fd(), &leaf, p, fs.dev, excl)
        });
        match r {
            Ok(()) => {
                mark(&mut window);
            }
            Err(e) => run.error(format!("delete {e}")),
        }
    }
    for c in &changes {
        let r = if c.path.is_root() {
            let fd = fs.fd.clone();
            rustix::fs::fstat(&*fd).map_err(errno_msg).and_then(|_| {
                let dup = rustix::fs::openat(
                    &*fd,
                    ".",
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(errno_msg)?;
                set_metadata(&dup, false, &c.inode)
            })
        } else {
            fs.parent(&c.path).and_then(|(pfd, leaf)| {
                let (fd, o_path) =
                    open_inode(pfd.as_fd(), &leaf, c.inode.kind).map_err(|e| match e {
                        Errno::LOOP => "is a symlink".to_string(),
                        e => errno_msg(e),
                    })?;
                set_metadata(&fd, o_path, &c.inode)
            })
        };
        match r {
            Ok(()) => {
                mark(&mut window);
            }
            Err(e) => run.error(format!("change {}: {e}", c.path.display())),
        }
    }
    if let Some(start) = window {
        run.result.activation_ms = last_change.duration_since(start).as_secs_f64() * 1000.0;
    }
    drop(boost);
    let t_changed = Instant::now();
    // One syncfs: fsyncing each changed directory instead costs a journal commit each here.
    if let Err(e) = rustix::fs::syncfs(&*fs.fd) {
        run.error(format!("sync: {}", errno_msg(e)));
    }
    let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1000.0;
    tracing::info!(
        "update phases: stage+sync {:.1} ms, stop+changes {:.1} ms (window {:.1} ms), final sync {:.1} ms",
        ms(t_start, t_staged),
        ms(t_staged, t_changed),
        run.result.activation_ms,
        ms(t_changed, Instant::now())
    );

    // 4. Start phase.
    if reboot {
        let mut all_ok = true;
        let mut done: BTreeSet<String> = BTreeSet::new();
        for t in matched_new.iter().filter(|t| t.do_reboot) {
            if done.insert(t.service.clone())
                && !run.service(&t.service, "start")
                && t.service != "reboot"
            {
                all_ok = false;
            }
        }
        if all_ok {
            match &opts.reboot_command {
                Some(cmd) => {
                    run.result.trigger_actions.push("reboot".into());
                    if let Err(e) = run_command(cmd, &[], opts.command_timeout) {
                        run.result.trigger_failures.push(format!("reboot: {e}"));
                    }
                }
                None => run
                    .result
                    .trigger_actions
                    .push("reboot (no reboot command configured)".into()),
            }
        } else {
            run.result
                .trigger_actions
                .push("reboot skipped: a start failed".into());
        }
    } else {
        for [svc, action] in &starts {
            run.service(svc, action);
        }
        forget_pending_starts(state_dir);
        if restart_subd {
            run.service("subd", "restart");
        }
    }

    // 5. Remember the triggers, and the image for full updates.
    if !plan.triggers.is_empty() {
        let json = serde_json::to_vec_pretty(&plan.triggers).expect("triggers serialize");
        if let Err(e) = state_dir.write_atomic(PREVIOUS_TRIGGERS, &json) {
            run.error(format!("saving {PREVIOUS_TRIGGERS}: {e}"));
        }
    }
    if !plan.sparse && run.result.errors.is_empty() {
        write_patched_image(&mut fs, &plan.image_name);
    }
    finish(run)
}

/// The `[service, action]` pairs to run after the change window (`start` for a stopped or
/// plain trigger, `reload` for a reload-only one), each service once; and whether subd
/// itself is to be restarted (kept apart: never recorded as owed, or it would loop).
fn start_actions(matched_new: &[Trigger], stopped: &BTreeSet<String>) -> (Vec<[String; 2]>, bool) {
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut out = Vec::new();
    let mut restart_subd = false;
    for t in matched_new {
        if t.service == "subd" {
            restart_subd = true;
            continue;
        }
        if done.contains(t.service.as_str()) {
            continue;
        }
        let action = if t.do_reload {
            let plain = matched_new
                .iter()
                .any(|u| u.service == t.service && !u.do_reload);
            if plain {
                continue; // the stop/start trigger of the same service handles it
            }
            if stopped.contains(&t.service) {
                "start"
            } else {
                "reload"
            }
        } else {
            "start"
        };
        done.insert(&t.service);
        out.push([t.service.clone(), action.to_string()]);
    }
    (out, restart_subd)
}

fn forget_pending_starts(state_dir: &StateDir) {
    if state_dir.remove(PENDING_STARTS).unwrap_or(false) {
        let _ = state_dir.sync();
    }
}

/// Runs the starts an interrupted update recorded but never ran (subd was killed between
/// stopping services and starting them), then forgets them. Returns what was run, as
/// `service action` lines, and the failures.
pub fn resume_pending_starts(
    state_dir: &StateDir,
    opts: &ApplyOptions,
) -> (Vec<String>, Vec<String>) {
    let Ok(bytes) = state_dir.read(PENDING_STARTS) else {
        return (Vec::new(), Vec::new());
    };
    let pairs: Vec<[String; 2]> = serde_json::from_slice(&bytes).unwrap_or_default();
    let mut run = Run {
        opts,
        result: UpdateResult::default(),
    };
    for [svc, action] in &pairs {
        if model::triggers::valid_service_name(svc) && matches!(action.as_str(), "start" | "reload")
        {
            tracing::warn!("an interrupted update left {svc} to {action}: running it now");
            run.service(svc, action);
        }
    }
    forget_pending_starts(state_dir);
    (run.result.trigger_actions, run.result.trigger_failures)
}

fn finish(mut run: Run<'_>) -> UpdateResult {
    run.result.finished_at = crate::clock::unix_now();
    run.result
}

/// Raises the calling thread's priority (nice -20) until dropped, then restores it. Linux
/// applies `setpriority(PRIO_PROCESS, 0)` to the calling thread only. Without the privilege
/// it does nothing.
struct PriorityBoost {
    previous: Option<i32>,
}

impl PriorityBoost {
    fn raise() -> PriorityBoost {
        let previous = rustix::process::getpriority_process(None).ok();
        let raised = previous.is_some() && rustix::process::setpriority_process(None, -20).is_ok();
        PriorityBoost {
            previous: previous.filter(|_| raised),
        }
    }
}

impl Drop for PriorityBoost {
    fn drop(&mut self) {
        if let Some(p) = self.previous {
            let _ = rustix::process::setpriority_process(None, p);
        }
    }
}

/// Records the image name in `/var/lib/patched-image` when `/var/lib` exists.
fn write_patched_image(fs: &mut Root, name: &str) {
    let path: FsPath = PATCHED_IMAGE.parse().expect("valid constant");
    let Ok((dfd, leaf)) = fs.parent(&path) else {
        return;
    };
    let tmp = b"patched-image.tmp~";
    let r = (|| -> Result<(), Errno> {
        let fd = rustix::fs::openat(
            &*dfd,
            tmp.as_slice(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )?;
        let mut f = std::fs::File::from(fd);
        f.write_all(format!("{name}\n").as_bytes())
            .map_err(|_| Errno::IO)?;
        f.sync_all().map_err(|_| Errno::IO)?;
        rustix::fs::renameat(&*dfd, tmp.as_slice(), &*dfd, leaf.as_slice())
    })();
    if let Err(e) = r {
        tracing::warn!("writing {PATCHED_IMAGE}: {}", errno_msg(e));
    }
}

/// Removes a directory standing where a non-directory must go.
fn clear_dir_in_way(
    fs: &mut Root,
    pfd: BorrowedFd<'_>,
    leaf: &[u8],
    path: &FsPath,
    excl: Option<&Filter>,
) -> Result<(), String> {
    match rustix::fs::statat(pfd, leaf, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            fs.forget();
            remove_tree(pfd, leaf, path, fs.dev, excl)
        }
        _ => Ok(()),
    }
}

fn make_dir(fs: &mut Root, path: &FsPath, want: &Inode) -> Result<(), String> {
    if path.is_root() {
        let dup = rustix::fs::openat(
            &*fs.fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno_msg)?;
        return set_metadata(&dup, false, want);
    }
    let (pfd, leaf) = fs.parent(path)?;
    match rustix::fs::statat(&*pfd, leaf.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            if st.st_dev != fs.dev {
                return Ok(()); // a mount point: left alone
            }
        }
        Ok(_) => {
            rustix::fs::unlinkat(&*pfd, leaf.as_slice(), AtFlags::empty()).map_err(errno_msg)?;
            mkdir(&pfd, &leaf)?;
        }
        Err(Errno::NOENT) => mkdir(&pfd, &leaf)?,
        Err(e) => return Err(errno_msg(e)),
    }
    let (fd, _) = open_inode(pfd.as_fd(), &leaf, Kind::Dir).map_err(errno_msg)?;
    set_metadata(&fd, false, want)
}

fn mkdir(pfd: &OwnedFd, leaf: &[u8]) -> Result<(), String> {
    match rustix::fs::mkdirat(pfd, leaf, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(errno_msg(e)),
    }
}

/// Moves a staged regular file back into the object cache under its hash (or drops it if
/// the cache already holds that object). Its content was verified when it entered the cache.
fn return_to_cache(sfd: &OwnedFd, name: &str, store: &ObjectStore, h: &ObjectId) {
    let dst = store.path_of(h);
    if dst.exists() {
        let _ = rustix::fs::unlinkat(sfd, name, AtFlags::empty());
        return;
    }
    if let Some(parent) = dst.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    if rustix::fs::renameat(sfd, name, CWD, dst.as_path()).is_err() {
        let _ = rustix::fs::unlinkat(sfd, name, AtFlags::empty());
    }
}

/// Opens (creating) an empty `staging/` in the state directory; leftovers of a crashed
/// update are removed.
fn prepare_staging(state_dir: &StateDir) -> io::Result<OwnedFd> {
    let fd = state_dir.subdir("staging")?;
    empty_dir(fd.as_fd())?;
    Ok(fd)
}

/// Removes everything in directory `dir`, never following a symlink.
fn empty_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    let mut names: Vec<Vec<u8>> = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let n = e?.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            names.push(n);
        }
    }
    for n in names {
        match rustix::fs::unlinkat(dir, n.as_slice(), AtFlags::empty()) {
            Err(Errno::ISDIR) | Err(Errno::PERM) => {
                let sub = rustix::fs::openat(
                    dir,
                    n.as_slice(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                empty_dir(sub.as_fd())?;
                rustix::fs::unlinkat(dir, n.as_slice(), AtFlags::REMOVEDIR)?;
            }
            r => r?,
        }
    }
    Ok(())
}

/// Creates `name` in the staging directory as `want`, with its final metadata. Regular
/// files come from the cache: renamed out of it for an object's last use, copied before.
fn stage(
    sfd: &OwnedFd,
    name: &str,
    want: &Inode,
    store: &ObjectStore,
    uses: &mut BTreeMap<ObjectId, usize>,
) -> Result<(), String> {
    let cache_path = |h: &ObjectId| store.path_of(h);
    match want.kind {
        Kind::File => match want.hash {
            None => {
                let fd = rustix::fs::openat(
                    sfd,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(errno_msg)?;
                drop(fd);
            }
            Some(h) => {
                let src = cache_path(&h);
                let left = uses.get_mut(&h).map(|n| {
                    *n -= 1;
                    *n
                });
                if left.unwrap_or(0) > 0 {
                    copy_object(&src, sfd, name)?;
                } else {
                    rustix::fs::renameat(CWD, src.as_path(), sfd, name).map_err(|e| match e {
                        Errno::NOENT => format!("object {h} is not in the cache"),
                        e => errno_msg(e),
                    })?;
                }
            }
        },
        Kind::Symlink => {
            let target = want.target.as_deref().unwrap_or_default();
            rustix::fs::symlinkat(target, sfd, name).map_err(errno_msg)?;
        }
        Kind::Char | Kind::Block | Kind::Fifo => {
            let ft = match want.kind {
                Kind::Char => FileType::CharacterDevice,
                Kind::Block => FileType::BlockDevice,
                _ => FileType::Fifo,
            };
            rustix::fs::mknodat(sfd, name, ft, Mode::from_raw_mode(0o600), want.rdev)
                .map_err(errno_msg)?;
        }
        Kind::Dir => return Err("a directory is not an inode to make".into()),
    }
    let (fd, o_path) = open_inode(sfd.as_fd(), name.as_bytes(), want.kind).map_err(errno_msg)?;
    set_metadata(&fd, o_path, want)
}

fn copy_object(src: &Path, sfd: &OwnedFd, name: &str) -> Result<(), String> {
    let mut from = std::fs::File::open(src).map_err(|e| format!("{}: {e}", src.display()))?;
    let fd = rustix::fs::openat(
        sfd,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(errno_msg)?;
    let mut to = std::fs::File::from(fd);
    io::copy(&mut from, &mut to).map_err(|e| format!("copy: {e}"))?;
    Ok(())
}

/// Copies files already on the machine into the cache, verifying their content.
/// (Always a copy: linking would let the cache share an inode with a live file.)
fn copy_to_cache(fs: &mut Root, store: &ObjectStore, plan: &UpdatePlan, run: &mut Run<'_>) {
    let mut pending = Vec::new();
    for c in &plan.files_to_copy_to_cache {
        if store.contains(&c.hash) {
            continue;
        }
        let r = fs.parent(&c.path).and_then(|(pfd, leaf)| {
            let fd = rustix::fs::openat(
                &*pfd,
                leaf.as_slice(),
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno_msg)?;
            let st = rustix::fs::fstat(&fd).map_err(errno_msg)?;
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                return Err("not a regular file".into());
            }
            let mut f = std::fs::File::from(fd);
            let mut w = store
                .writer(c.hash, st.st_size as u64)
                .map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = f.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            }
            w.finish().map_err(|e| e.to_string())
        });
        match r {
            Ok(p) => pending.push(p),
            Err(e) => run.error(format!("copy {} to cache: {e}", c.path.display())),
        }
    }
    if let Err(e) = store.commit(pending) {
        run.error(format!("copy to cache: {e}"));
    }
}

#[cfg(test)]
mod tests;
