//! Runs an update's hook programs around `disk::apply`: `ready` (every object the update
//! needs is in the verified cache, each hook copied out of it into
//! `ROOT/.subd/hooks/PHASE/NAME`, re-hashed, mode 0700) → `pre` → apply → `post`.
//! A hook runs directly (no shell), one at a time in byte order of the names, with the
//! root as working directory, stdin closed, stdout and stderr captured, in its own process
//! group killed when `--hook-timeout-secs` expires or subd shuts down (`SIGTERM`, then
//! `SIGKILL` after `STOP_GRACE`), and with `SUBD_IMAGE`,
//! `SUBD_PREVIOUS_IMAGE`, `SUBD_ROOT`, `SUBD_REBUILD` and `SUBD_HOOK_PHASE` set. Its path is
//! never resolved from the managed tree: only from subd's own state directory handle.

use crate::Subd;
use model::api::UpdateResult;
use model::hooks::{to_run, Hook, HookRun, Phase};
use model::{ObjectId, UpdatePlan};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The state directory's subdirectory holding the copies of the hooks being run.
const HOOKS_DIR: &str = "hooks";
/// Lines of output kept per run.
const OUTPUT_LINES: usize = 10;
/// Characters kept per output line.
const LINE_CHARS: usize = 200;
/// How long a hook's process group has between `SIGTERM` and `SIGKILL` when subd stops.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Why an update's hooks could not be made ready (nothing has run, nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum HookSetupError {
    #[error("object {0} is not in the cache (fetch it first)")]
    Missing(ObjectId),
    #[error("{phase} hook {name}: its object does not match its hash {hash}")]
    Corrupt {
        phase: Phase,
        name: String,
        hash: ObjectId,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// What every hook of one update is told.
#[derive(Clone, Debug)]
pub struct HookEnv {
    pub image: String,
    pub previous_image: String,
    pub root: PathBuf,
    pub timeout: Duration,
    /// Set when subd is shutting down: a running hook is stopped, no further one starts.
    pub stop: Arc<AtomicBool>,
}

impl HookEnv {
    /// The environment variables a hook of `phase` gets.
    pub fn vars(&self, phase: Phase) -> Vec<(&'static str, String)> {
        vec![
            ("SUBD_IMAGE", self.image.clone()),
            ("SUBD_PREVIOUS_IMAGE", self.previous_image.clone()),
            ("SUBD_ROOT", self.root.display().to_string()),
            (
                "SUBD_REBUILD",
                if self.previous_image.is_empty() {
                    "1"
                } else {
                    "0"
                }
                .into(),
            ),
            ("SUBD_HOOK_PHASE", phase.name().into()),
        ]
    }
}

/// Runs `plan`'s hooks around `apply`: pre hooks first (a failing one aborts the update
/// before anything on the machine changes), post hooks after a successful apply (a failing
/// one leaves the files in place and is reported as `hook_failure`). A plan that changes
/// nothing runs no hooks.
pub fn update_with_hooks(
    s: &Subd,
    plan: &UpdatePlan,
    apply: impl FnOnce() -> UpdateResult,
) -> UpdateResult {
    let (pre, post) = (to_run(plan, Phase::Pre), to_run(plan, Phase::Post));
    if pre.is_empty() && post.is_empty() {
        return apply();
    }
    let env = HookEnv {
        image: plan.image_name.clone(),
        previous_image: plan.previous_image.clone(),
        root: s.config.root.clone(),
        timeout: s.config.hook_timeout,
        stop: s.stop.clone(),
    };
    let dir = match ready(s, plan) {
        Ok(dir) => dir,
        Err(e) => return refused(plan, format!("update not started: hooks: {e}"), vec![]),
    };
    let (runs, failure) = run_phase(&dir, Phase::Pre, &pre, &env);
    if let Some(line) = failure {
        return refused(plan, line, runs);
    }
    let mut result = apply();
    result.hooks = runs;
    if result.errors.is_empty() {
        let (runs, failure) = run_phase(&dir, Phase::Post, &post, &env);
        result.hooks.extend(runs);
        result.hook_failure = failure;
    }
    result
}

/// The result of an update stopped before apply: `line` is its error (and, for a failed
/// pre hook, its hook failure).
fn refused(plan: &UpdatePlan, line: String, runs: Vec<HookRun>) -> UpdateResult {
    tracing::warn!("update to {}: {line}", plan.image_name);
    UpdateResult {
        image_name: plan.image_name.clone(),
        finished_at: disk::clock::unix_now(),
        errors: vec![line.clone()],
        hook_failure: (!runs.is_empty()).then_some(line),
        hooks: runs,
        ..UpdateResult::default()
    }
}

/// Ready: checks that every object the update makes a file from is in the cache (or comes
/// from a machine file it copies), then copies every hook into a fresh
/// `ROOT/.subd/hooks/PHASE/`, checking its hash. Returns that directory by the real path
/// of the state directory's handle (never a path into the managed tree).
fn ready(s: &Subd, plan: &UpdatePlan) -> Result<PathBuf, HookSetupError> {
    let copied: std::collections::HashSet<ObjectId> =
        plan.files_to_copy_to_cache.iter().map(|c| c.hash).collect();
    for id in plan.inodes_to_make.iter().filter_map(|i| i.inode.hash) {
        if !copied.contains(&id) && !s.store.contains(&id) {
            return Err(HookSetupError::Missing(id));
        }
    }
    let io = |what: String| move |source| HookSetupError::Io { what, source };
    // Made (0700, never a symlink) through the handle, then reached by the anchored path.
    drop(
        s.state_dir
            .subdir(HOOKS_DIR)
            .map_err(io(HOOKS_DIR.into()))?,
    );
    let dir = s.state_dir.anchored().join(HOOKS_DIR);
    for phase in Phase::ALL {
        let sub = dir.join(phase.name());
        match std::fs::remove_dir_all(&sub) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing old {HOOKS_DIR}/{phase}"))(e)),
        }
        std::fs::create_dir(&sub).map_err(io(format!("{HOOKS_DIR}/{phase}")))?;
        for h in plan.hooks.of(phase) {
            copy_hook(s, phase, h, &sub.join(&h.name))?;
        }
    }
    // Run by the state directory's current real path (what its handle resolves to now):
    // a script's interpreter reopens the path it is given, and a `/proc/self/fd/N` path
    // would name nothing in the new process.
    std::fs::read_link(s.state_dir.anchored())
        .map(|real| real.join(HOOKS_DIR))
        .map_err(io("resolving the state directory".into()))
}

/// Copies hook `h`'s object to `to` (new, mode 0700), checking its bytes hash to its name.
fn copy_hook(s: &Subd, phase: Phase, h: &Hook, to: &Path) -> Result<(), HookSetupError> {
    let io = |what: String| move |source| HookSetupError::Io { what, source };
    let what = format!("{phase} hook {}", h.name);
    let mut data = Vec::new();
    match s.store.open_object(&h.hash) {
        Ok(mut f) => f.read_to_end(&mut data).map_err(io(what.clone()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(HookSetupError::Missing(h.hash))
        }
        Err(e) => return Err(io(what)(e)),
    };
    if ObjectId::of(&data) != h.hash {
        return Err(HookSetupError::Corrupt {
            phase,
            name: h.name.clone(),
            hash: h.hash,
        });
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(to)
        .map_err(io(what.clone()))?;
    f.write_all(&data).map_err(io(what.clone()))?;
    // Closed before any hook runs: an executable still open for writing is `ETXTBSY`.
    f.sync_all().map_err(io(what))?;
    Ok(())
}

/// Runs `hooks` of `phase` from `dir/PHASE/` in order, stopping at the first failure;
/// returns every run and the failure's status line.
fn run_phase(
    dir: &Path,
    phase: Phase,
    hooks: &[&Hook],
    env: &HookEnv,
) -> (Vec<HookRun>, Option<String>) {
    let mut runs = Vec::new();
    for h in hooks {
        let run = run_hook(&dir.join(phase.name()).join(&h.name), phase, &h.name, env);
        tracing::info!(
            "{phase} hook {}: {} in {} ms",
            h.name,
            run.ending(),
            run.duration_ms
        );
        let failed = !run.succeeded();
        runs.push(run);
        if failed {
            let line = runs.last().map(HookRun::failure_line);
            return (runs, line);
        }
    }
    (runs, None)
}

/// Runs one hook program at `path` (no shell) and reports how it ended.
pub fn run_hook(path: &Path, phase: Phase, name: &str, env: &HookEnv) -> HookRun {
    let started = Instant::now();
    let mut run = HookRun {
        phase,
        name: name.to_string(),
        ..HookRun::default()
    };
    let out = match tempfile::tempfile() {
        Ok(f) => f,
        Err(e) => {
            run.spawn_error = Some(format!("output file: {e}"));
            return run;
        }
    };
    if env.stop.load(Ordering::SeqCst) {
        run.interrupted = true;
        return run;
    }
    match spawn(path, env, phase, &out) {
        Ok(child) => wait(child, env.timeout, &env.stop, &mut run),
        Err(e) => run.spawn_error = Some(e.to_string()),
    }
    run.duration_ms = started.elapsed().as_millis() as u64;
    run.output = last_lines(&out);
    run
}

/// Starts the hook in its own process group, retrying briefly on `ETXTBSY` (a concurrent
/// fork elsewhere in subd may still hold the copy's write descriptor).
fn spawn(
    path: &Path,
    env: &HookEnv,
    phase: Phase,
    out: &std::fs::File,
) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let mut tries = 0;
    loop {
        let mut cmd = std::process::Command::new(path);
        cmd.current_dir(&env.root)
            .envs(env.vars(phase))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out.try_clone()?)
            .process_group(0);
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::TXTBSY.raw_os_error()) => {
                tries += 1;
                if tries > 50 {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Waits for `child` up to `timeout`, then kills its process group; when `stop` is set
/// first, sends the group `SIGTERM` and kills it after `STOP_GRACE`. Records how it ended.
fn wait(mut child: std::process::Child, timeout: Duration, stop: &AtomicBool, run: &mut HookRun) {
    use rustix::process::{kill_process_group, Pid, Signal};
    use std::os::unix::process::ExitStatusExt;
    let group = Pid::from_raw(child.id() as i32);
    let signal_group = |sig: Signal| {
        if let Some(pid) = group {
            let _ = kill_process_group(pid, sig);
        }
    };
    let deadline = Instant::now() + timeout;
    let mut kill_at: Option<Instant> = None;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                run.exit_code = status.code();
                run.signal = status.signal();
                if run.interrupted {
                    // Whatever it left in its group goes with it.
                    signal_group(Signal::KILL);
                }
                return;
            }
            Ok(None) if kill_at.is_some_and(|t| Instant::now() >= t) => {
                signal_group(Signal::KILL);
                let _ = child.kill();
                run.signal = child.wait().ok().and_then(|s| s.signal());
                return;
            }
            Ok(None) if kill_at.is_none() && stop.load(Ordering::SeqCst) => {
                run.interrupted = true;
                signal_group(Signal::TERM);
                kill_at = Some(Instant::now() + STOP_GRACE);
            }
            Ok(None) if kill_at.is_none() && Instant::now() >= deadline => {
                signal_group(Signal::KILL);
                let _ = child.kill();
                let status = child.wait().ok();
                run.timed_out = true;
                run.signal = status.and_then(|s| s.signal());
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                run.spawn_error = Some(format!("waiting: {e}"));
                return;
            }
        }
    }
}

/// The last non-empty lines of what a hook wrote (its final 16 KiB), each cut to
/// `LINE_CHARS` characters.
fn last_lines(f: &std::fs::File) -> Vec<String> {
    let mut f = f;
    let len = f.seek(SeekFrom::End(0)).unwrap_or(0);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(16384))).is_err()
        || f.take(16384).read_to_end(&mut buf).is_err()
    {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<String> = text
        .lines()
        .rev()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(OUTPUT_LINES)
        .map(|l| {
            l.chars()
                .filter(|c| !c.is_control())
                .take(LINE_CHARS)
                .collect()
        })
        .collect();
    lines.reverse();
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("hook");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        p
    }

    fn env(root: &Path, previous: &str, secs: u64) -> HookEnv {
        HookEnv {
            image: "img/2".into(),
            previous_image: previous.into(),
            root: root.to_path_buf(),
            timeout: Duration::from_secs(secs),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    #[test]
    fn exit_codes_output_and_timeouts() {
        let d = tempfile::tempdir().unwrap();
        // (script, succeeded, exit code, timed out, last line)
        let cases: &[(&str, bool, Option<i32>, bool, &str)] = &[
            ("echo one; echo two >&2", true, Some(0), false, "two"),
            ("echo bad; exit 3", false, Some(3), false, "bad"),
            (
                "echo $SUBD_REBUILD $SUBD_HOOK_PHASE $(pwd)",
                true,
                Some(0),
                false,
                "",
            ),
            ("echo waiting; sleep 30", false, None, true, "waiting"),
            ("kill -TERM $$", false, None, false, ""),
        ];
        for (body, ok, code, timed_out, last) in cases {
            let p = script(d.path(), body);
            let started = Instant::now();
            let r = run_hook(&p, Phase::Pre, "hook", &env(d.path(), "", 1));
            assert_eq!(r.succeeded(), *ok, "{body}: {r:?}");
            assert_eq!(r.exit_code, *code, "{body}");
            assert_eq!(r.timed_out, *timed_out, "{body}");
            assert!(started.elapsed() < Duration::from_secs(10), "{body}");
            if !last.is_empty() {
                assert_eq!(r.output.last().map(String::as_str), Some(*last), "{body}");
            }
        }
        let p = script(d.path(), "echo $SUBD_REBUILD $SUBD_HOOK_PHASE $(pwd)");
        let r = run_hook(&p, Phase::Post, "h", &env(d.path(), "img/1", 5));
        let want = format!("0 post {}", d.path().display());
        assert_eq!(r.output, vec![want]);
    }

    /// subd stopping: the hook's whole process group gets `SIGTERM` (a child it left in the
    /// background too), the run is `interrupted`, and no later hook starts.
    #[test]
    fn stopping_subd_stops_the_running_hook_and_its_group() {
        let d = tempfile::tempdir().unwrap();
        let pids = d.path().join("pids");
        let p = script(
            d.path(),
            &format!(
                "sleep 60 & echo $! >> {0}; echo $$ >> {0}; echo working; wait",
                pids.display()
            ),
        );
        let e = env(d.path(), "img/1", 60);
        let stop = e.stop.clone();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::SeqCst);
        });
        let started = Instant::now();
        let r = run_hook(&p, Phase::Post, "long", &e);
        setter.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(10), "{r:?}");
        assert!(r.interrupted && !r.timed_out && !r.succeeded(), "{r:?}");
        assert_eq!(
            r.failure_line(),
            "post-hook failed: long: interrupted (subd shutting down): working"
        );
        std::thread::sleep(Duration::from_millis(200));
        for pid in std::fs::read_to_string(&pids).unwrap().lines() {
            // Gone, or a zombie its new parent has not reaped yet.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
            assert!(
                state.is_none() || state == Some("Z"),
                "process {pid} of the hook's group survived: {stat}"
            );
        }
        let never = run_hook(&p, Phase::Post, "next", &e);
        assert!(never.interrupted && never.exit_code.is_none(), "{never:?}");
        assert_eq!(std::fs::read_to_string(&pids).unwrap().lines().count(), 2);
    }

    #[test]
    fn a_program_that_cannot_start_is_a_failure() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("not-a-program");
        std::fs::write(&p, "no shebang\0\x01").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        let r = run_hook(&p, Phase::Pre, "x", &env(d.path(), "", 5));
        assert!(!r.succeeded());
        assert!(r.spawn_error.is_some(), "{r:?}");
        assert!(r
            .failure_line()
            .starts_with("pre-hook failed: x: not started: "));
    }
}
