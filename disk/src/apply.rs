//! Executing an `UpdatePlan` under a root directory (subd's Update and `patch-directory`).
//!
//! Order (Dominator §3.3, §6.5): copy local files into the object cache and stage every
//! new inode with its final owner, mode and mtime in `STATE/staging` (a regular file that
//! is its object's last use stays in the cache, given its metadata there, and is linked
//! from there into place, its cache name then removed; only `STATE` is touched so far) →
//! stop the services the old trigger set matches → make directories → install the staged
//! inodes (over a few lanes) → hardlinks → deletions → metadata changes (chown before
//! chmod, then mtime) → start or reload the services the new set matches. Content reaches
//! its path only whole, by rename or by link, so every file is at all times wholly old or
//! wholly new.
//!
//! Every path is checked (not under `/.subd`, not excluded) and resolved from a handle on
//! the root one component at a time with `O_NOFOLLOW`, never crossing a mount point; all
//! changes go through `*at` calls on directory handles or through handles on the inode
//! itself, so no write, chown or chmod can follow a symlink out of the root. A failed step
//! is recorded (an [`ApplyError`]: step, path, the call and its errno) and the rest
//! continues.

mod error;

pub use error::{ApplyError, Cause, CommandError, Op, Step};

use crate::known::Known;
use crate::objectstore::{HeldNames, ObjectStore};
use crate::statedir::StateDir;
use model::api::UpdateResult;
use model::diff::{is_protected, object_uses};
use model::filter::Filter;
use model::hash::ObjectId;
use model::image::{Inode, Kind};
use model::path::FsPath;
use model::plan::{Hardlink, MetadataChange, PathInode, UpdatePlan};
use model::triggers::{Trigger, Triggers};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, CWD};
use rustix::io::Errno;
use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// File in the state directory holding the triggers of the last applied image.
pub const PREVIOUS_TRIGGERS: &str = "triggers.previous";
/// The state paths this machine seeded (JSON list), in the state directory: state for
/// good, reported by every poll.
pub const SEEDED: &str = "seeded.json";
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
    /// Objects fetched by this process and held under their temp names in the cache
    /// (`objectstore::HeldObjects`): used from there as if named.
    pub held: Option<Arc<HeldNames>>,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            exclusions: None,
            service_command: None,
            reboot_command: None,
            command_timeout: Duration::from_secs(120),
            held: None,
        }
    }
}

/// Handles on the root and on each directory of the last path resolved under it.
struct Root {
    fd: Arc<OwnedFd>,
    dev: u64,
    /// One handle per component of the last directory resolved (name, handle), so the
    /// next one reuses their longest common prefix: paths come sorted, and walking each
    /// from the root cost two calls per component.
    chain: Vec<(Vec<u8>, Arc<OwnedFd>)>,
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
            chain: Vec::new(),
        })
    }

    /// A handle on directory `dir`, walked from the root (or from the handles of the last
    /// walk, while its components agree) without following symlinks or crossing mount
    /// points.
    fn dir(&mut self, dir: &FsPath) -> Result<Arc<OwnedFd>, Cause> {
        if dir.is_root() {
            return Ok(self.fd.clone());
        }
        let comps: Vec<&[u8]> = dir.components().collect();
        let common = self
            .chain
            .iter()
            .zip(&comps)
            .take_while(|((have, _), want)| have.as_slice() == **want)
            .count();
        self.chain.truncate(common);
        let mut cur = self.chain.last().map_or(&self.fd, |(_, fd)| fd).clone();
        for comp in &comps[common..] {
            let next = rustix::fs::openat(
                cur.as_fd(),
                *comp,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| match e {
                Errno::LOOP | Errno::NOTDIR => Cause::NotADirectory(dir.clone()),
                e => Cause::sys_at(Op::Open, dir)(e),
            })?;
            let st = rustix::fs::fstat(&next).map_err(Cause::sys(Op::Stat))?;
            if st.st_dev != self.dev {
                return Err(Cause::CrossesMount(dir.clone()));
            }
            cur = Arc::new(next);
            self.chain.push((comp.to_vec(), cur.clone()));
        }
        Ok(cur)
    }

    /// The parent directory handle and file name of `path` (not the root).
    fn parent(&mut self, path: &FsPath) -> Result<(Arc<OwnedFd>, Vec<u8>), Cause> {
        let parent = path.parent().ok_or(Cause::RootHasNoParent)?;
        Ok((self.dir(&parent)?, path.name().to_vec()))
    }

    /// Another walker on the same root handle, with no handles of its own yet (one per
    /// lane: each lane walks only the parents of its own items).
    fn sibling(&self) -> Root {
        Root {
            fd: self.fd.clone(),
            dev: self.dev,
            chain: Vec::new(),
        }
    }

    /// Drops the handles kept from the last walk (after removing or replacing directories).
    fn forget(&mut self) {
        self.chain.clear();
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

fn proc_path(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Sets owner, then mode (so setuid survives the chown), then mtime, on an open inode
/// whose kind is first checked against `want`; a call that would change nothing is not
/// made.
fn set_metadata(fd: &OwnedFd, o_path: bool, want: &Inode) -> Result<(), Cause> {
    set_metadata_on(fd.as_fd(), o_path, want)
}

/// Gives a freshly stored object (a regular file open for writing) the owner, mode and
/// mtime of its last use, so the update's stage finds them already set. Only a head
/// start: the stage checks and sets them again.
pub fn give_final_metadata(file: &std::fs::File, want: &Inode) -> Result<(), Cause> {
    set_metadata_on(file.as_fd(), false, want)
}

fn set_metadata_on(fd: BorrowedFd<'_>, o_path: bool, want: &Inode) -> Result<(), Cause> {
    let st = rustix::fs::fstat(fd).map_err(Cause::sys(Op::Stat))?;
    if kind_of(&st) != Some(want.kind) {
        return Err(Cause::WrongKind {
            found: kind_of(&st),
            want: want.kind,
        });
    }
    let (uid, gid) = (
        rustix::fs::Uid::from_raw(want.uid),
        rustix::fs::Gid::from_raw(want.gid),
    );
    // A chown may clear setuid and setgid bits: the mode is then set whatever it was.
    let chowned = st.st_uid != want.uid || st.st_gid != want.gid;
    if chowned {
        rustix::fs::chownat(fd, "", Some(uid), Some(gid), AtFlags::EMPTY_PATH)
            .map_err(Cause::sys(Op::Chown))?;
    }
    let mode_ok = !chowned && st.st_mode & 0o7777 == want.mode & 0o7777;
    if want.kind != Kind::Symlink && !mode_ok {
        let mode = Mode::from_raw_mode(want.mode & 0o7777);
        if o_path {
            rustix::fs::chmodat(CWD, proc_path(fd), mode, AtFlags::empty())
        } else {
            rustix::fs::fchmod(fd, mode)
        }
        .map_err(Cause::sys(Op::Chmod))?;
    }
    if want.keeps_mtime() && !mtime_matches(&st, want) {
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
        .map_err(Cause::sys(Op::Utimes))?;
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
) -> Result<(), Cause> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(Cause::sys_at(Op::Stat, path)(e)),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(dir, name, AtFlags::empty())
            .map_err(Cause::sys_at(Op::Unlink, path));
    }
    if st.st_dev != dev {
        return Err(Cause::MountPoint(path.clone()));
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(Cause::sys_at(Op::Open, path))?;
    let mut names: Vec<Vec<u8>> = Vec::new();
    let entries = rustix::fs::Dir::read_from(&fd).map_err(Cause::sys_at(Op::ReadDir, path))?;
    for e in entries {
        let e = e.map_err(Cause::sys_at(Op::ReadDir, path))?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    let mut first_err: Option<Cause> = None;
    for n in names {
        let Ok(child) = path.join(&n) else { continue };
        if is_protected(&child, exclusions) {
            first_err.get_or_insert(Cause::HoldsProtected {
                dir: path.clone(),
                child,
            });
            continue;
        }
        if let Err(e) = remove_tree(fd.as_fd(), &n, &child, dev, exclusions) {
            first_err.get_or_insert(e);
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(Cause::sys_at(Op::Rmdir, path))
}

/// Runs `argv + args` with stdin detached and stdout/stderr captured (into an unlinked temp
/// file, so a chatty command never blocks on a full pipe), in its own process group,
/// killed (group and all) after `timeout`. The output's last line is logged, and on failure
/// ends the error (`exit status: 1 (app: unrecognized service)`).
pub fn run_command(argv: &[String], args: &[&str], timeout: Duration) -> Result<(), CommandError> {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let Some((prog, rest)) = argv.split_first() else {
        return Err(CommandError::Empty);
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
        .map_err(|source| CommandError::Spawn {
            prog: prog.clone(),
            source,
        })?;
    let deadline = Instant::now() + timeout;
    let said = || out.as_ref().map(last_line).unwrap_or_default();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => {
                let l = said();
                if !l.is_empty() {
                    tracing::info!("{prog} {}: {l}", args.join(" "));
                }
                return Ok(());
            }
            Ok(Some(status)) => {
                return Err(CommandError::Failed {
                    status,
                    output: said(),
                })
            }
            Ok(None) if Instant::now() >= deadline => {
                if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(CommandError::TimedOut {
                    timeout,
                    output: said(),
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(CommandError::Wait(e)),
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

/// What an update has done and what failed, as it goes.
struct Run<'a> {
    opts: &'a ApplyOptions,
    result: UpdateResult,
    /// Every failed step, in order (`result.errors` renders them at the end).
    failures: Vec<ApplyError>,
}

impl<'a> Run<'a> {
    fn new(opts: &'a ApplyOptions, image_name: &str) -> Run<'a> {
        Run {
            opts,
            result: UpdateResult {
                image_name: image_name.to_string(),
                ..UpdateResult::default()
            },
            failures: Vec::new(),
        }
    }

    fn error(&mut self, e: ApplyError) {
        tracing::warn!("update: {e}");
        self.failures.push(e);
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

    /// The result, stamped and with every failure rendered as a line; and the failures.
    fn finish(mut self) -> (UpdateResult, Vec<ApplyError>) {
        self.result.finished_at = crate::clock::unix_now();
        self.result.errors = self.failures.iter().map(ToString::to_string).collect();
        (self.result, self.failures)
    }
}

/// Applies `plan` to `root`; `state_dir` (reached only through its handle) holds
/// `objects/` (the cache, same file-system as the root), `staging/` and
/// `triggers.previous`. Never panics on bad input; every failure is a line in
/// `UpdateResult::errors` (an [`ApplyError`] rendered) or `trigger_failures`.
pub fn apply(
    root: &Path,
    state_dir: &StateDir,
    plan: &UpdatePlan,
    opts: &ApplyOptions,
) -> UpdateResult {
    update(root, state_dir, plan, opts, None).finish().0
}

/// `apply`, also returning what each regular file it renamed into place looks like now
/// (device, inode, size, mtime, ctime) with the hash it was verified to hold: one `stat`
/// per file after the final sync, for the scan that follows (see `crate::known`).
pub fn apply_noting(
    root: &Path,
    state_dir: &StateDir,
    plan: &UpdatePlan,
    opts: &ApplyOptions,
) -> (UpdateResult, Known) {
    let mut known = Known::default();
    let result = update(root, state_dir, plan, opts, Some(&mut known))
        .finish()
        .0;
    (result, known)
}

/// The phases of an update: owed starts, admission, select (present seeds skipped) →
/// stage → stop → activate (the change window) → record the image patched → sync → start
/// → remember.
fn update<'a>(
    root: &Path,
    state_dir: &'a StateDir,
    plan: &UpdatePlan,
    opts: &'a ApplyOptions,
    known: Option<&mut Known>,
) -> Run<'a> {
    let mut run = Run::new(opts, &plan.image_name);
    resume_into(state_dir, &mut run);
    let Some((fs, store)) = admit(root, state_dir, plan, &mut run) else {
        return run;
    };
    let mut u = Update {
        fs,
        store,
        state_dir,
        excl: opts.exclusions.as_ref(),
        run,
        installed: Vec::new(),
        linked: Vec::new(),
    };
    let mut sel = u.select(plan);
    u.skip_present_seeds(plan, &mut sel);
    let matched = u.match_triggers(plan, &sel);
    let t_start = Instant::now();
    let staged = u.stage(plan, &sel);
    let t_staged = Instant::now();
    let owed = u.stop(&matched);
    u.activate(&sel, &staged);
    let t_changed = Instant::now();
    if let (true, Some(sfd)) = (staged.record, &staged.fd) {
        let complete = u.run.failures.is_empty();
        install_patched_image(&mut u.fs, sfd, complete);
    }
    // One syncfs: fsyncing each changed directory instead costs a journal commit each here.
    // Meanwhile the cache names of the files linked into place go: their removal need not
    // be durable (a name a crash leaves is dropped at its next use), and the known inodes
    // are noted after it (it changes their ctime).
    let linked = std::mem::take(&mut u.linked);
    let synced = std::thread::scope(|s| {
        let store_fd = u.store.fd();
        s.spawn(move || drop_cache_names(store_fd, &linked));
        rustix::fs::syncfs(&*u.fs.fd)
    });
    if let Err(e) = synced {
        u.run.error(ApplyError::Sync(e));
    }
    let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1000.0;
    tracing::info!(
        "update phases: stage+sync {:.1} ms, stop+changes {:.1} ms (window {:.1} ms), final sync {:.1} ms",
        ms(t_start, t_staged),
        ms(t_staged, t_changed),
        u.run.result.activation_ms,
        ms(t_changed, Instant::now())
    );
    if let Some(known) = known {
        u.note_installed(&sel, known);
    }
    u.start(&owed, &matched);
    u.remember(plan);
    u.run
}

/// Starts a previous, interrupted update still owes come first.
fn resume_into(state_dir: &StateDir, run: &mut Run<'_>) {
    let (owed, failed) = resume_pending_starts(state_dir, run.opts);
    run.result.trigger_actions.extend(owed);
    run.result.trigger_failures.extend(failed);
}

/// Refuses an unsafe or invalid plan; opens the root and the object cache.
fn admit(
    root: &Path,
    state_dir: &StateDir,
    plan: &UpdatePlan,
    run: &mut Run<'_>,
) -> Option<(Root, ObjectStore)> {
    if let Some(r) = &plan.unsafe_reason {
        run.error(ApplyError::Unsafe(r.clone()));
        return None;
    }
    if let Err(e) = plan
        .validate()
        .and_then(|()| plan.check_root(rustix::process::geteuid().as_raw()))
    {
        run.error(ApplyError::InvalidPlan(e));
        return None;
    }
    let fs = match Root::open(root) {
        Ok(r) => r,
        Err(source) => {
            run.error(ApplyError::Root {
                root: root.to_path_buf(),
                source,
            });
            return None;
        }
    };
    // Attached, not opened: opening sweeps temp files, which may be held objects.
    match state_dir.attach_objects() {
        Ok(store) => Some((fs, store)),
        Err(e) => {
            run.error(ApplyError::ObjectCache(e));
            None
        }
    }
}

/// The plan's entries an update acts on: those on paths it may touch.
struct Selection<'p> {
    dirs: Vec<&'p PathInode>,
    inodes: Vec<&'p PathInode>,
    links: Vec<&'p Hardlink>,
    deletes: Vec<&'p FsPath>,
    changes: Vec<&'p MetadataChange>,
}

impl Selection<'_> {
    /// Every path the update really touches (an mtime-only change does not count).
    fn touched(&self) -> Vec<&[u8]> {
        let mut touched: Vec<&[u8]> = Vec::new();
        touched.extend(self.dirs.iter().map(|d| d.path.as_bytes()));
        touched.extend(self.inodes.iter().map(|i| i.path.as_bytes()));
        touched.extend(self.links.iter().map(|h| h.path.as_bytes()));
        touched.extend(self.deletes.iter().map(|p| p.as_bytes()));
        touched.extend(
            self.changes
                .iter()
                .filter(|c| !c.mtime_only)
                .map(|c| c.path.as_bytes()),
        );
        touched
    }
}

/// The triggers the touched paths match: of the previous and new sets merged (for stops),
/// and of the new set (for starts).
struct Matched {
    old: Vec<Trigger>,
    new: Vec<Trigger>,
}

/// What the start phase owes: a reboot, or the starts and whether subd restarts.
struct Owed {
    reboot: bool,
    starts: Vec<[String; 2]>,
    restart_subd: bool,
}

/// The staging directory (if it could be prepared) and where each selected inode waits.
struct Staged {
    fd: Option<OwnedFd>,
    names: Vec<Option<Place>>,
    /// The record of the image patched is staged (`STAGED_RECORD`).
    record: bool,
}

/// Where a staged inode waits for its rename into place, with its final metadata.
#[derive(Clone, Debug)]
enum Place {
    /// `STATE/staging/NAME`.
    Staging(String),
    /// Its object in the cache (a regular file, the object's last use), named relative to
    /// the cache's handle (`ObjectStore::name_of`).
    Cache(PathBuf),
}

/// Times the change window: from the first change to the last.
struct Window {
    first: Option<Instant>,
    last: Instant,
}

impl Window {
    fn mark(&mut self) {
        self.mark_at(Instant::now());
    }

    /// A change made at `at` (by any lane).
    fn mark_at(&mut self, at: Instant) {
        self.first = Some(self.first.map_or(at, |f| f.min(at)));
        self.last = self.last.max(at);
    }
}

/// An admitted update: the root and cache it works on, and what it has recorded.
struct Update<'a> {
    fs: Root,
    store: ObjectStore,
    state_dir: &'a StateDir,
    excl: Option<&'a Filter>,
    run: Run<'a>,
    /// Indices (in `Selection::inodes`) of the inodes renamed into place.
    installed: Vec<usize>,
    /// Cache names of the objects linked into place, removed after the window.
    linked: Vec<PathBuf>,
}

impl Update<'_> {
    /// Select: the plan's entries on paths the update may touch; the others are refused.
    fn select<'p>(&mut self, plan: &'p UpdatePlan) -> Selection<'p> {
        let excl = self.excl;
        let mut refused: Vec<FsPath> = Vec::new();
        let mut check = |p: &FsPath, root_ok: bool| -> bool {
            let good = !is_protected(p, excl) && (root_ok || !p.is_root());
            if !good {
                refused.push(p.clone());
            }
            good
        };
        let sel = Selection {
            dirs: plan
                .dirs_to_make
                .iter()
                .filter(|d| check(&d.path, true))
                .collect(),
            inodes: plan
                .inodes_to_make
                .iter()
                .filter(|i| check(&i.path, false) && i.inode.kind != Kind::Dir)
                .collect(),
            links: plan
                .hardlinks_to_make
                .iter()
                .filter(|h| check(&h.path, false) && check(&h.target, false))
                .collect(),
            deletes: plan
                .paths_to_delete
                .iter()
                .filter(|p| check(p, false))
                .collect(),
            changes: plan
                .inodes_to_change
                .iter()
                .filter(|c| check(&c.path, true))
                .collect(),
        };
        for p in refused {
            self.run.error(ApplyError::Refused(p));
        }
        sel
    }

    /// Seeds only where nothing is: a seeded root something now occupies (made since the
    /// poll the plan came from; `lstat`, so a dangling symlink counts) is left alone with
    /// its subtree, and fires no trigger.
    fn skip_present_seeds(&mut self, plan: &UpdatePlan, sel: &mut Selection<'_>) {
        let present: Vec<&FsPath> = plan.seeded.iter().filter(|p| self.exists(p)).collect();
        if present.is_empty() {
            return;
        }
        tracing::info!(?present, "state already present: not seeded");
        let free = |p: &FsPath| !present.iter().any(|r| p.starts_with(r));
        sel.dirs.retain(|d| free(&d.path));
        sel.inodes.retain(|i| free(&i.path));
        sel.links.retain(|h| free(&h.path));
        sel.changes.retain(|c| free(&c.path));
    }

    /// Whether anything is at `path` (`lstat`); an unreachable parent means nothing is.
    fn exists(&mut self, path: &FsPath) -> bool {
        match self.fs.parent(path) {
            Ok((pfd, leaf)) => !matches!(
                rustix::fs::statat(&*pfd, leaf.as_slice(), AtFlags::SYMLINK_NOFOLLOW),
                Err(Errno::NOENT)
            ),
            Err(_) => false,
        }
    }

    /// Trigger matching over what will really be touched.
    fn match_triggers(&self, plan: &UpdatePlan, sel: &Selection<'_>) -> Matched {
        let touched = sel.touched();
        let previous = load_previous_triggers(self.state_dir);
        let old_set = previous.merged_with(&plan.triggers);
        Matched {
            old: old_set.matching(&touched).into_iter().cloned().collect(),
            new: plan
                .triggers
                .matching(&touched)
                .into_iter()
                .cloned()
                .collect(),
        }
    }

    /// Stage: copy local files into the cache (verified) and stage every new inode with
    /// its final metadata; then make the staged content durable.
    fn stage(&mut self, plan: &UpdatePlan, sel: &Selection<'_>) -> Staged {
        copy_to_cache(&mut self.fs, &self.store, plan, &mut self.run);
        let fd = match prepare_staging(self.state_dir) {
            Ok(fd) => Some(fd),
            Err(source) => {
                self.run.error(ApplyError::Staging {
                    state: self.state_dir.shown().to_path_buf(),
                    source,
                });
                None
            }
        };
        let mut names: Vec<Option<Place>> = vec![None; sel.inodes.len()];
        let mut record = false;
        if let Some(sfd) = &fd {
            let mut failed: Vec<(usize, Cause)> = Vec::new();
            let (inodes, held) = (&sel.inodes, self.run.opts.held.as_deref());
            let store = CacheNames {
                store: &self.store,
                held,
            };
            let last_use = last_uses(plan, inodes);
            // Copies and other inodes first, then the last uses, each group over the lanes:
            // a last use gives its cache object its final owner and mode, which a copy of
            // the same object must not meet (without CAP_DAC_OVERRIDE it could not read it).
            let (last, others): (Vec<usize>, Vec<usize>) =
                (0..inodes.len()).partition(|&n| last_use[n]);
            let t = Instant::now();
            for group in [others, last] {
                let staged = crate::lanes::run(&group, |chunk, _| {
                    let one =
                        |&n: &usize| (n, stage(sfd, n, &inodes[n].inode, &store, last_use[n]));
                    chunk.iter().map(one).collect::<Vec<_>>()
                });
                for (n, r) in staged.into_iter().flatten() {
                    match r {
                        Ok(place) => names[n] = Some(place),
                        Err(e) => failed.push((n, e)),
                    }
                }
            }
            failed.sort_by_key(|(n, _)| *n);
            for (n, e) in failed {
                self.run
                    .error(ApplyError::step(Step::Stage, &sel.inodes[n].path)(e));
            }
            record = !plan.sparse && stage_patched_image(sfd, &plan.image_name);
            let t_staged = Instant::now();
            // Content durable before any rename makes it visible.
            if let Err(e) = rustix::fs::syncfs(sfd) {
                self.run.error(ApplyError::Sync(e));
            }
            tracing::debug!(
                "stage: {} inodes ({} last uses) {:.1} ms, sync {:.1} ms",
                inodes.len(),
                last_use.iter().filter(|l| **l).count(),
                (t_staged - t).as_secs_f64() * 1000.0,
                t_staged.elapsed().as_secs_f64() * 1000.0
            );
        }
        Staged { fd, names, record }
    }

    /// Stop: skipped entirely when a reboot is due; otherwise the starts owed are recorded
    /// first, so a crash in between cannot leave a service stopped.
    fn stop(&mut self, matched: &Matched) -> Owed {
        let reboot = matched.old.iter().chain(&matched.new).any(|t| t.do_reboot);
        let mut stopped: BTreeSet<String> = BTreeSet::new();
        let mut to_stop: Vec<String> = Vec::new();
        if !reboot {
            for t in &matched.old {
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
            start_actions(&matched.new, &stopped)
        };
        if !starts.is_empty() {
            let json = serde_json::to_vec(&starts).expect("pairs serialize");
            if let Err(source) = self.state_dir.write_atomic(PENDING_STARTS, &json) {
                self.run.error(ApplyError::Save {
                    name: PENDING_STARTS,
                    source,
                });
            }
        }
        for svc in &to_stop {
            self.run.service(svc, "stop");
        }
        Owed {
            reboot,
            starts,
            restart_subd,
        }
    }

    /// Activate: the change window, at raised priority so a busy machine does not stretch
    /// it: directories, staged inodes renamed into place, hardlinks, deletions, metadata.
    fn activate(&mut self, sel: &Selection<'_>, staged: &Staged) {
        let boost = PriorityBoost::raise();
        let mut window = Window {
            first: None,
            last: Instant::now(),
        };
        let t = Instant::now();
        self.make_dirs(&sel.dirs, &mut window);
        let t_dirs = Instant::now();
        if let Some(sfd) = &staged.fd {
            self.install(sfd, &sel.inodes, &staged.names, &mut window);
            self.make_links(sfd, &sel.links, &mut window);
        }
        let t_installed = Instant::now();
        self.delete(&sel.deletes, &mut window);
        self.change(&sel.changes, &mut window);
        tracing::debug!(
            "activate: {} directories {:.1} ms, {} inodes and {} links {:.1} ms, deletions and changes {:.1} ms",
            sel.dirs.len(),
            (t_dirs - t).as_secs_f64() * 1000.0,
            sel.inodes.len(),
            sel.links.len(),
            (t_installed - t_dirs).as_secs_f64() * 1000.0,
            t_installed.elapsed().as_secs_f64() * 1000.0
        );
        if let Some(start) = window.first {
            self.run.result.activation_ms =
                window.last.duration_since(start).as_secs_f64() * 1000.0;
        }
        drop(boost);
    }

    /// Makes (or fixes the metadata of) each directory.
    fn make_dirs(&mut self, dirs: &[&PathInode], window: &mut Window) {
        for d in dirs {
            match make_dir(&mut self.fs, &d.path, &d.inode) {
                Ok(()) => window.mark(),
                Err(e) => self.run.error(ApplyError::step(Step::Mkdir, &d.path)(e)),
            }
        }
    }

    /// Renames each staged inode into place; one that cannot go returns to (or stays in)
    /// the cache.
    fn install(
        &mut self,
        sfd: &OwnedFd,
        inodes: &[&PathInode],
        names: &[Option<Place>],
        window: &mut Window,
    ) {
        let todo: Vec<usize> = (0..inodes.len()).filter(|&n| names[n].is_some()).collect();
        let (root, excl, store_fd) = (&self.fs, self.excl, self.store.fd());
        // Lanes: a last use is linked into place (its cache name removed after the window,
        // `drop_cache_names`), a call that locks only the directories involved; a rename from the state directory into
        // another takes the file-system's rename lock (`s_vfs_rename_mutex`), so those
        // (copies, symlinks, devices, anything in the way) go one at a time whatever the
        // lanes. Every directory was made before; a directory one lane clears out of a
        // file's way holds no path of the image, so no other lane walks into it.
        let done = crate::lanes::run(&todo, |chunk, _| {
            let mut fs = root.sibling();
            let mut out = Vec::with_capacity(chunk.len());
            for &n in chunk {
                let pi = inodes[n];
                let r = fs.parent(&pi.path).and_then(|(pfd, leaf)| match &names[n] {
                    Some(Place::Cache(path)) => {
                        let cache = (store_fd, path.as_path());
                        link_into_place(&mut fs, cache, pfd.as_fd(), &leaf, &pi.path, excl)
                    }
                    Some(Place::Staging(name)) => {
                        let from = (sfd.as_fd(), Path::new(name.as_str()));
                        rename_into_place(&mut fs, from, pfd.as_fd(), &leaf, &pi.path, excl)
                            .map(|()| false)
                    }
                    None => Ok(false),
                });
                out.push((n, r, Instant::now()));
            }
            out
        });
        self.fs.forget();
        for (n, r, at) in done.into_iter().flatten() {
            let (pi, place) = (inodes[n], &names[n]);
            match r {
                Ok(linked) => {
                    window.mark_at(at);
                    self.installed.push(n);
                    if let (true, Some(Place::Cache(name))) = (linked, place) {
                        self.linked.push(name.clone());
                    }
                }
                Err(e) => {
                    self.run.error(ApplyError::step(Step::Install, &pi.path)(e));
                    // Keep the content: a staged object goes back to the cache, so the
                    // next update need not fetch it again.
                    if let (Kind::File, Some(h), Some(Place::Staging(name))) =
                        (pi.inode.kind, pi.inode.hash, place)
                    {
                        return_to_cache(sfd, name, &self.store, &h);
                    }
                }
            }
        }
    }

    /// Note: each regular file this update renamed into place, as it stands now (after
    /// its hardlinks were made and the final sync), with the hash its content was verified
    /// to have; one whose kind, size or mtime is no longer the image's is left out.
    fn note_installed(&mut self, sel: &Selection<'_>, known: &mut Known) {
        for &n in &self.installed {
            let pi = sel.inodes[n];
            let (Kind::File, Some(h)) = (pi.inode.kind, pi.inode.hash) else {
                continue;
            };
            let Ok((pfd, leaf)) = self.fs.parent(&pi.path) else {
                continue;
            };
            let Ok(st) = rustix::fs::statat(&*pfd, leaf.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
            else {
                continue;
            };
            let as_installed = Kind::from_mode(st.st_mode) == Some(Kind::File)
                && st.st_size as u64 == pi.inode.size
                && st.st_mtime == pi.inode.mtime.sec
                && st.st_mtime_nsec as i64 == pi.inode.mtime.nsec as i64;
            if as_installed {
                known.insert(&st, h);
            }
        }
    }

    /// Makes each hardlink: linked under a temporary name in staging, renamed into place.
    fn make_links(&mut self, sfd: &OwnedFd, links: &[&Hardlink], window: &mut Window) {
        let (fs, excl) = (&mut self.fs, self.excl);
        for (n, h) in links.iter().enumerate() {
            let tmp = format!("link.{n}");
            let r = fs.parent(&h.target).and_then(|(tfd, tleaf)| {
                rustix::fs::linkat(&*tfd, tleaf.as_slice(), sfd, tmp.as_str(), AtFlags::empty())
                    .map_err(Cause::sys_at(Op::Link, &h.target))?;
                let (pfd, leaf) = fs.parent(&h.path)?;
                let from = (sfd.as_fd(), Path::new(tmp.as_str()));
                let r = rename_into_place(fs, from, pfd.as_fd(), &leaf, &h.path, excl);
                // Renaming onto another name of the same inode leaves the temp name.
                let _ = rustix::fs::unlinkat(sfd, tmp.as_str(), AtFlags::empty());
                r
            });
            match r {
                Ok(()) => window.mark(),
                Err(e) => self.run.error(ApplyError::step(Step::Hardlink, &h.path)(e)),
            }
        }
    }

    /// Removes each deleted path with its subtree, protected paths excepted.
    fn delete(&mut self, deletes: &[&FsPath], window: &mut Window) {
        let (fs, excl) = (&mut self.fs, self.excl);
        for p in deletes {
            let r = fs.parent(p).and_then(|(pfd, leaf)| {
                fs.forget();
                remove_tree(pfd.as_fd(), &leaf, p, fs.dev, excl)
            });
            match r {
                Ok(()) => window.mark(),
                Err(e) => self.run.error(ApplyError::step(Step::Delete, p)(e)),
            }
        }
    }

    /// Sets owner, mode and mtime of each changed inode.
    fn change(&mut self, changes: &[&MetadataChange], window: &mut Window) {
        for c in changes {
            match change_metadata(&mut self.fs, c) {
                Ok(()) => window.mark(),
                Err(e) => self.run.error(ApplyError::step(Step::Change, &c.path)(e)),
            }
        }
    }

    /// Start: the services the new trigger set matches (or the reboot), then the owed
    /// starts are forgotten.
    fn start(&mut self, owed: &Owed, matched: &Matched) {
        if owed.reboot {
            self.start_and_reboot(&matched.new);
            return;
        }
        for [svc, action] in &owed.starts {
            self.run.service(svc, action);
        }
        forget_pending_starts(self.state_dir);
        if owed.restart_subd {
            self.run.service("subd", "restart");
        }
    }

    /// Starts the services of reboot triggers, then reboots if every start succeeded.
    fn start_and_reboot(&mut self, matched_new: &[Trigger]) {
        let opts = self.run.opts;
        let run = &mut self.run;
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
    }

    /// Remember the triggers, the image for full updates that went without a failure, and
    /// the state paths seeded.
    fn remember(&mut self, plan: &UpdatePlan) {
        if !plan.triggers.is_empty() {
            let json = serde_json::to_vec_pretty(&plan.triggers).expect("triggers serialize");
            if let Err(source) = self.state_dir.write_atomic(PREVIOUS_TRIGGERS, &json) {
                self.run.error(ApplyError::Save {
                    name: PREVIOUS_TRIGGERS,
                    source,
                });
            }
        }
        self.remember_seeded(plan);
    }

    /// Adds the plan's seeded roots now present to the state directory's record.
    fn remember_seeded(&mut self, plan: &UpdatePlan) {
        let mut seeded: BTreeSet<FsPath> = load_seeded(self.state_dir).into_iter().collect();
        let before = seeded.len();
        for p in &plan.seeded {
            if !is_protected(p, self.excl) && self.exists(p) {
                seeded.insert(p.clone());
            }
        }
        if seeded.len() == before {
            return;
        }
        let json = serde_json::to_vec_pretty(&seeded).expect("paths serialize");
        if let Err(source) = self.state_dir.write_atomic(SEEDED, &json) {
            self.run.error(ApplyError::Save {
                name: SEEDED,
                source,
            });
        }
    }
}

/// The state paths recorded as seeded under `state_dir` (none when unreadable).
pub fn load_seeded(state_dir: &StateDir) -> Vec<FsPath> {
    state_dir
        .read(SEEDED)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Sets the metadata of one inode: the root through a fresh handle, others opened without
/// following a symlink.
fn change_metadata(fs: &mut Root, c: &MetadataChange) -> Result<(), Cause> {
    if c.path.is_root() {
        let fd = fs.fd.clone();
        rustix::fs::fstat(&*fd).map_err(Cause::sys(Op::Stat))?;
        let dup = rustix::fs::openat(
            &*fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(Cause::sys(Op::Open))?;
        return set_metadata(&dup, false, &c.inode);
    }
    let (pfd, leaf) = fs.parent(&c.path)?;
    let (fd, o_path) = open_inode(pfd.as_fd(), &leaf, c.inode.kind).map_err(|e| match e {
        Errno::LOOP => Cause::IsSymlink,
        e => Cause::sys(Op::Open)(e),
    })?;
    set_metadata(&fd, o_path, &c.inode)
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
    let mut run = Run::new(opts, "");
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

/// The name in the staging directory of the record of the image patched, waiting to be
/// renamed to `/var/lib/patched-image` (never a staged inode's: those are numbers).
const STAGED_RECORD: &str = "patched-image";

/// Stages the record of the image patched: its bytes made durable by the stage's sync,
/// so its rename needs no sync of its own; true if it was written.
fn stage_patched_image(sfd: &OwnedFd, name: &str) -> bool {
    let r = (|| -> io::Result<()> {
        let fd = rustix::fs::openat(
            sfd,
            STAGED_RECORD,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )?;
        std::fs::File::from(fd).write_all(format!("{name}\n").as_bytes())
    })();
    if let Err(e) = &r {
        tracing::warn!("staging {PATCHED_IMAGE}: {e}");
    }
    r.is_ok()
}

/// Renames the staged record to `/var/lib/patched-image` if the update is `complete`
/// and `/var/lib` exists (the update's final sync makes the rename durable); otherwise
/// it is removed, leaving the staging directory empty.
fn install_patched_image(fs: &mut Root, sfd: &OwnedFd, complete: bool) {
    let path: FsPath = PATCHED_IMAGE.parse().expect("valid constant");
    if let (true, Ok((dfd, leaf))) = (complete, fs.parent(&path)) {
        match rustix::fs::renameat(sfd, STAGED_RECORD, &*dfd, leaf.as_slice()) {
            Ok(()) => return,
            Err(e) => tracing::warn!("writing {PATCHED_IMAGE}: {}", io::Error::from(e)),
        }
    }
    let _ = rustix::fs::unlinkat(sfd, STAGED_RECORD, AtFlags::empty());
}

/// Renames the staged `from` (a directory and a name in it) to `leaf` in `pfd`. A directory standing there is removed
/// first, found by the rename's refusal, so the usual case costs one call.
fn rename_into_place(
    fs: &mut Root,
    (sfd, name): (BorrowedFd<'_>, &Path),
    pfd: BorrowedFd<'_>,
    leaf: &[u8],
    path: &FsPath,
    excl: Option<&Filter>,
) -> Result<(), Cause> {
    match rustix::fs::renameat(sfd, name, pfd, leaf) {
        Err(Errno::ISDIR | Errno::NOTEMPTY | Errno::EXIST) => {
            clear_dir_in_way(fs, pfd, leaf, path, excl)?;
            rustix::fs::renameat(sfd, name, pfd, leaf).map_err(Cause::sys(Op::Rename))
        }
        r => r.map_err(Cause::sys(Op::Rename)),
    }
}

/// Installs a last use: its cache object (given its final metadata in the stage) is
/// linked at `leaf`, so the content appears whole under its path, as a rename would make
/// it; true if so, its cache name then being the caller's to remove (`drop_cache_names`).
/// Where something already stands there (or the link is refused), it is renamed over it
/// instead. A crash before the cache name goes leaves the cache naming a live file;
/// `open_cache_object` drops such a name at its next use.
fn link_into_place(
    fs: &mut Root,
    (store_fd, cache): (BorrowedFd<'_>, &Path),
    pfd: BorrowedFd<'_>,
    leaf: &[u8],
    path: &FsPath,
    excl: Option<&Filter>,
) -> Result<bool, Cause> {
    if rustix::fs::linkat(store_fd, cache, pfd, leaf, AtFlags::empty()).is_err() {
        return rename_into_place(fs, (store_fd, cache), pfd, leaf, path, excl).map(|()| false);
    }
    Ok(true)
}

/// Removes the cache names of the objects linked into place (over the lanes).
fn drop_cache_names(store_fd: BorrowedFd<'_>, names: &[PathBuf]) {
    crate::lanes::run(names, |chunk, _| {
        for name in chunk {
            if let Err(e) = rustix::fs::unlinkat(store_fd, name, AtFlags::empty()) {
                tracing::warn!(
                    "cache object {}: installed, but its cache name stays: {e}",
                    name.display()
                );
            }
        }
    });
}

/// Opens a cached object (without following a symlink) for its content or its last use.
/// One that is also the name of another file (a link into place cut short by a crash:
/// the live file could since have been edited in place) is no object: its cache name is
/// removed and it is reported missing, to be fetched again.
fn open_cache_object(
    (store_fd, src): (BorrowedFd<'_>, &Path),
    h: ObjectId,
) -> Result<(OwnedFd, bool), Cause> {
    let missing = |e| match e {
        Errno::NOENT => Cause::NotInCache(h),
        e => Cause::sys(Op::Open)(e),
    };
    let (fd, o_path) =
        open_inode(store_fd, src.as_os_str().as_bytes(), Kind::File).map_err(missing)?;
    let st = rustix::fs::fstat(&fd).map_err(Cause::sys(Op::Stat))?;
    if st.st_nlink > 1 {
        tracing::warn!("cache object {h} is also another file's name: dropped from the cache");
        let _ = rustix::fs::unlinkat(store_fd, src, AtFlags::empty());
        return Err(Cause::NotInCache(h));
    }
    Ok((fd, o_path))
}

/// Whether the cached object at `src` is a regular file of no other name that already has
/// `want`'s owner, mode and mtime (given as it was fetched): one `lstat`, no handle, as
/// nothing is changed. Anything else goes through `open_cache_object` and `set_metadata`.
fn cache_object_ready((store_fd, src): (BorrowedFd<'_>, &Path), want: &Inode) -> bool {
    rustix::fs::statat(store_fd, src, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| {
        kind_of(&st) == Some(Kind::File) && st.st_nlink == 1 && metadata_matches(&st, want)
    })
}

/// Whether `st` has `want`'s owner, mode and (where the image keeps it) mtime.
fn metadata_matches(st: &rustix::fs::Stat, want: &Inode) -> bool {
    st.st_uid == want.uid
        && st.st_gid == want.gid
        && st.st_mode & 0o7777 == want.mode & 0o7777
        && (!want.keeps_mtime() || mtime_matches(st, want))
}

fn mtime_matches(st: &rustix::fs::Stat, want: &Inode) -> bool {
    st.st_mtime == want.mtime.sec && st.st_mtime_nsec as i64 == want.mtime.nsec as i64
}

/// Removes a directory standing where a non-directory must go.
fn clear_dir_in_way(
    fs: &mut Root,
    pfd: BorrowedFd<'_>,
    leaf: &[u8],
    path: &FsPath,
    excl: Option<&Filter>,
) -> Result<(), Cause> {
    match rustix::fs::statat(pfd, leaf, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            fs.forget();
            remove_tree(pfd, leaf, path, fs.dev, excl)
        }
        _ => Ok(()),
    }
}

fn make_dir(fs: &mut Root, path: &FsPath, want: &Inode) -> Result<(), Cause> {
    if path.is_root() {
        let dup = rustix::fs::openat(
            &*fs.fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(Cause::sys(Op::Open))?;
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
            rustix::fs::unlinkat(&*pfd, leaf.as_slice(), AtFlags::empty())
                .map_err(Cause::sys(Op::Unlink))?;
            mkdir(&pfd, &leaf)?;
        }
        Err(Errno::NOENT) => mkdir(&pfd, &leaf)?,
        Err(e) => return Err(Cause::sys(Op::Stat)(e)),
    }
    let (fd, _) = open_inode(pfd.as_fd(), &leaf, Kind::Dir).map_err(Cause::sys(Op::Open))?;
    set_metadata(&fd, false, want)
}

fn mkdir(pfd: &OwnedFd, leaf: &[u8]) -> Result<(), Cause> {
    match rustix::fs::mkdirat(pfd, leaf, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(Cause::sys(Op::Mkdir)(e)),
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

/// Which of `inodes` (an update's selection) are their object's last use: the last
/// selected regular file of each object no unselected file of the plan also needs.
fn last_uses(plan: &UpdatePlan, inodes: &[&PathInode]) -> Vec<bool> {
    let mut uses = object_uses(plan);
    inodes
        .iter()
        .map(|pi| match (pi.inode.kind, pi.inode.hash) {
            (Kind::File, Some(h)) => uses.get_mut(&h).is_none_or(|n| {
                *n -= 1;
                *n == 0
            }),
            _ => false,
        })
        .collect()
}

/// Stages `want` (the `n`th inode) with its final metadata; returns where it waits.
/// Regular files come from the cache: copied into the staging directory, unless this is
/// the object's `last_use`: then it is the cache's own object, given its metadata where it
/// is (the cache is in the private state directory, as staging is) and later linked from
/// there into place (`link_into_place`).
fn stage(
    sfd: &OwnedFd,
    n: usize,
    want: &Inode,
    store: &CacheNames<'_>,
    last_use: bool,
) -> Result<Place, Cause> {
    let name = format!("{n}");
    match want.kind {
        Kind::File => match want.hash {
            None => {
                let fd = rustix::fs::openat(
                    sfd,
                    name.as_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(Cause::sys(Op::Create))?;
                drop(fd);
            }
            Some(h) => {
                let (src, prepared) = store.name_of(&h);
                let at = (store.store.fd(), src.as_path());
                // The fetch gave it its metadata: known (a held object, in the private
                // state directory since), or checked with one `lstat`.
                if last_use && (prepared || cache_object_ready(at, want)) {
                    return Ok(Place::Cache(src));
                }
                let (fd, o_path) = open_cache_object(at, h)?;
                if !last_use {
                    copy_object(fd, sfd, &name)?;
                } else {
                    set_metadata(&fd, o_path, want)?;
                    return Ok(Place::Cache(src));
                }
            }
        },
        Kind::Symlink => {
            let target = want.target.as_deref().unwrap_or_default();
            rustix::fs::symlinkat(target, sfd, name.as_str()).map_err(Cause::sys(Op::Symlink))?;
        }
        Kind::Char | Kind::Block | Kind::Fifo => {
            let ft = match want.kind {
                Kind::Char => FileType::CharacterDevice,
                Kind::Block => FileType::BlockDevice,
                _ => FileType::Fifo,
            };
            rustix::fs::mknodat(
                sfd,
                name.as_str(),
                ft,
                Mode::from_raw_mode(0o600),
                want.rdev,
            )
            .map_err(Cause::sys(Op::Mknod))?;
        }
        Kind::Dir => return Err(Cause::DirIsNotAnInode),
    }
    let (fd, o_path) =
        open_inode(sfd.as_fd(), name.as_bytes(), want.kind).map_err(Cause::sys(Op::Open))?;
    set_metadata(&fd, o_path, want)?;
    Ok(Place::Staging(name))
}

/// The cache's objects by name, the held ones (`ApplyOptions::held`) by their temp names.
struct CacheNames<'a> {
    store: &'a ObjectStore,
    held: Option<&'a HeldNames>,
}

impl CacheNames<'_> {
    /// `h`'s name relative to the store's handle, and whether it is known to hold its
    /// last use's metadata already (a held object the fetch gave it to).
    fn name_of(&self, h: &ObjectId) -> (PathBuf, bool) {
        match self.held.and_then(|m| m.get(h)) {
            Some(held) => (held.name.clone(), held.prepared),
            None => (self.store.name_of(h), false),
        }
    }
}

/// Copies the open cache object `from` to `name` in the staging directory.
fn copy_object(from: OwnedFd, sfd: &OwnedFd, name: &str) -> Result<(), Cause> {
    let mut from = std::fs::File::from(from);
    let fd = rustix::fs::openat(
        sfd,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(Cause::sys(Op::Create))?;
    let mut to = std::fs::File::from(fd);
    io::copy(&mut from, &mut to).map_err(Cause::io(Op::Copy))?;
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
            .map_err(Cause::sys(Op::Open))?;
            let st = rustix::fs::fstat(&fd).map_err(Cause::sys(Op::Stat))?;
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                return Err(Cause::NotRegularFile);
            }
            let mut f = std::fs::File::from(fd);
            let mut w = store.writer(c.hash, st.st_size as u64)?;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = f.read(&mut buf).map_err(Cause::io(Op::Read))?;
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n]).map_err(Cause::io(Op::Write))?;
            }
            Ok(w.finish()?)
        });
        match r {
            Ok(p) => pending.push(p),
            Err(e) => run.error(ApplyError::step(Step::CopyToCache, &c.path)(e)),
        }
    }
    if let Err(e) = store.commit(pending) {
        run.error(ApplyError::CacheCommit(e));
    }
}

#[cfg(test)]
mod tests;
