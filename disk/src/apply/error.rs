//! The failures of an update, typed: the step of the plan, its path, and the system call
//! and errno (or the rule) that stopped it. Each renders as the one line `UpdateResult`
//! carries on the wire.

use crate::objectstore::StoreError;
use model::hash::ObjectId;
use model::image::Kind;
use model::path::FsPath;
use model::plan::PlanError;
use rustix::io::Errno;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// A file-system call an update makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Open,
    Stat,
    ReadDir,
    Mkdir,
    Create,
    Rename,
    Link,
    Unlink,
    Rmdir,
    Symlink,
    Mknod,
    Chown,
    Chmod,
    Utimes,
    Read,
    Write,
    Copy,
}

impl Op {
    /// The words naming the call in a message; `None` where the step's own name says it.
    fn label(self) -> Option<&'static str> {
        match self {
            Op::Chown => Some("chown"),
            Op::Chmod => Some("chmod"),
            Op::Utimes => Some("set mtime"),
            Op::Link => Some("link from"),
            Op::Copy => Some("copy"),
            _ => None,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Op::Open => "open",
            Op::Stat => "stat",
            Op::ReadDir => "readdir",
            Op::Mkdir => "mkdir",
            Op::Create => "create",
            Op::Rename => "rename",
            Op::Link => "link",
            Op::Unlink => "unlink",
            Op::Rmdir => "rmdir",
            Op::Symlink => "symlink",
            Op::Mknod => "mknod",
            Op::Chown => "chown",
            Op::Chmod => "chmod",
            Op::Utimes => "utimes",
            Op::Read => "read",
            Op::Write => "write",
            Op::Copy => "copy",
        };
        f.write_str(name)
    }
}

/// The step of the plan a failure belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Copying a file already on the machine into the object cache.
    CopyToCache,
    /// Making a new inode in the staging directory.
    Stage,
    Mkdir,
    /// Renaming a staged inode into place.
    Install,
    Hardlink,
    Delete,
    /// A metadata change (owner, mode, mtime).
    Change,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Step::CopyToCache => "copy",
            Step::Stage => "stage",
            Step::Mkdir => "mkdir",
            Step::Install => "install",
            Step::Hardlink => "hardlink",
            Step::Delete => "delete",
            Step::Change => "change",
        };
        f.write_str(name)
    }
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// A call failed; `path` is set when it is not the step's own path (a directory walked
    /// through, a name inside a deleted subtree, a link's target).
    #[error("{}", sys_text(*op, path.as_ref(), source))]
    Sys {
        op: Op,
        path: Option<FsPath>,
        source: io::Error,
    },
    #[error("{}: a component is a symlink or not a directory", .0.display())]
    NotADirectory(FsPath),
    #[error("{}: crosses a mount point", .0.display())]
    CrossesMount(FsPath),
    #[error("{}: a mount point, not removed", .0.display())]
    MountPoint(FsPath),
    #[error("{}: holds protected {}", dir.display(), child.display())]
    HoldsProtected { dir: FsPath, child: FsPath },
    #[error("is a {found:?}, expected a {want:?}")]
    WrongKind { found: Option<Kind>, want: Kind },
    #[error("is a symlink")]
    IsSymlink,
    #[error("not a regular file")]
    NotRegularFile,
    #[error("object {0} is not in the cache")]
    NotInCache(ObjectId),
    #[error("a directory is not an inode to make")]
    DirIsNotAnInode,
    #[error("the root has no parent")]
    RootHasNoParent,
    /// Opening a cached object to copy it.
    #[error("{}: {source}", path.display())]
    CacheObject { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// `[LABEL ][PATH: ]ERROR`: the call is named where the step does not say it.
fn sys_text(op: Op, path: Option<&FsPath>, e: &io::Error) -> String {
    let head: Vec<String> = op
        .label()
        .map(str::to_string)
        .into_iter()
        .chain(path.map(FsPath::display))
        .collect();
    if head.is_empty() {
        e.to_string()
    } else {
        format!("{}: {e}", head.join(" "))
    }
}

impl Cause {
    /// A failed call `op` with `errno`, on the step's own path.
    pub(super) fn sys(op: Op) -> impl FnOnce(Errno) -> Cause {
        move |e| Cause::Sys {
            op,
            path: None,
            source: e.into(),
        }
    }

    /// A failed call `op` with `errno`, on `path`.
    pub(super) fn sys_at(op: Op, path: &FsPath) -> impl FnOnce(Errno) -> Cause + '_ {
        move |e| Cause::Sys {
            op,
            path: Some(path.clone()),
            source: e.into(),
        }
    }

    /// A failed I/O call `op`, on the step's own path.
    pub(super) fn io(op: Op) -> impl FnOnce(io::Error) -> Cause {
        move |source| Cause::Sys {
            op,
            path: None,
            source,
        }
    }

    /// The call that failed, if a call did.
    pub fn op(&self) -> Option<Op> {
        match self {
            Cause::Sys { op, .. } => Some(*op),
            Cause::CacheObject { .. } => Some(Op::Open),
            _ => None,
        }
    }

    /// The errno of the call that failed, if it has one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Cause::Sys { source, .. } | Cause::CacheObject { source, .. } => {
                Errno::from_io_error(source)
            }
            Cause::Store(StoreError::Io { source, .. }) => Errno::from_io_error(source),
            _ => None,
        }
    }

    /// The path the cause itself names (not the step's), if any.
    pub fn path(&self) -> Option<&FsPath> {
        match self {
            Cause::Sys { path, .. } => path.as_ref(),
            Cause::NotADirectory(p) | Cause::CrossesMount(p) | Cause::MountPoint(p) => Some(p),
            Cause::HoldsProtected { dir, .. } => Some(dir),
            _ => None,
        }
    }
}

/// One failure of an update; `UpdateResult::errors` holds each rendered as a line.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("refused: unsafe update: {0}")]
    Unsafe(String),
    #[error("refused: invalid plan: {0}")]
    InvalidPlan(PlanError),
    /// A path of the plan that is the root, under `/.subd`, or excluded.
    #[error("refused: {}: the root, under /.subd, or excluded", .0.display())]
    Refused(FsPath),
    #[error("{}: {source}", root.display())]
    Root { root: PathBuf, source: io::Error },
    #[error("{0}")]
    ObjectCache(StoreError),
    #[error("{}/staging: {source}", state.display())]
    Staging { state: PathBuf, source: io::Error },
    #[error("sync: {}", io::Error::from(*.0))]
    Sync(Errno),
    #[error("saving {name}: {source}")]
    Save {
        name: &'static str,
        source: io::Error,
    },
    #[error("copy to cache: {0}")]
    CacheCommit(StoreError),
    /// A step of the plan on `path` failed.
    #[error("{}", step_text(*step, path, cause))]
    Step {
        step: Step,
        path: FsPath,
        cause: Cause,
    },
}

/// `STEP PATH: CAUSE`; a deletion names only the path inside its subtree where it failed.
fn step_text(step: Step, path: &FsPath, cause: &Cause) -> String {
    match step {
        Step::CopyToCache => format!("copy {} to cache: {cause}", path.display()),
        Step::Delete if cause.path().is_some() => format!("delete {cause}"),
        _ => format!("{step} {}: {cause}", path.display()),
    }
}

impl ApplyError {
    /// A failure of `step` on `path`.
    pub(super) fn step(step: Step, path: &FsPath) -> impl FnOnce(Cause) -> ApplyError + '_ {
        move |cause| ApplyError::Step {
            step,
            path: path.clone(),
            cause,
        }
    }

    /// The step of the plan that failed, if one did.
    pub fn step_of(&self) -> Option<Step> {
        match self {
            ApplyError::Step { step, .. } => Some(*step),
            _ => None,
        }
    }

    /// The plan path the failure is about, if any.
    pub fn path(&self) -> Option<&FsPath> {
        match self {
            ApplyError::Step { path, .. } | ApplyError::Refused(path) => Some(path),
            _ => None,
        }
    }

    /// The call that failed, if a call did.
    pub fn op(&self) -> Option<Op> {
        match self {
            ApplyError::Step { cause, .. } => cause.op(),
            _ => None,
        }
    }

    /// The errno of the call that failed, if it has one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            ApplyError::Step { cause, .. } => cause.errno(),
            ApplyError::Sync(e) => Some(*e),
            ApplyError::Root { source, .. }
            | ApplyError::Staging { source, .. }
            | ApplyError::Save { source, .. } => Errno::from_io_error(source),
            _ => None,
        }
    }
}

/// Why a service or reboot command failed; the text ends with the last line it wrote.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("empty command")]
    Empty,
    #[error("cannot run {prog}: {source}")]
    Spawn { prog: String, source: io::Error },
    #[error("{status}{}", said(output))]
    Failed { status: ExitStatus, output: String },
    #[error("timed out after {timeout:?}, killed{}", said(output))]
    TimedOut { timeout: Duration, output: String },
    #[error("{0}")]
    Wait(io::Error),
}

/// ` (LINE)` for the last line a command wrote, nothing if it wrote none.
fn said(line: &str) -> String {
    if line.is_empty() {
        String::new()
    } else {
        format!(" ({line})")
    }
}
