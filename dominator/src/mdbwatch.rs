//! Wakes the MDB watcher as soon as the MDB's directory sees a file written and closed, a
//! rename into or out of it, or a deletion (Linux inotify). The watcher still compares the
//! file's identity (device, inode, size, mtime) before loading, and still looks every
//! `mdb_check_interval` in case a wake-up is missed (inotify unavailable, the directory
//! itself replaced). An `mdb` edit (temp + fsync + rename) is seen at the rename; a hand
//! edit in place when the editor closes the file.
//!
//! A thread blocks reading the inotify handle and wakes the watcher through a `Notify`; it
//! holds only a weak reference, so it ends at the first event after the watch is dropped
//! (or when the directory goes away).

use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
use std::io;
use std::path::Path;
use std::sync::{Arc, Weak};
use tokio::sync::Notify;

/// An inotify watch on the directory holding one file.
pub struct DirWatch {
    notify: Arc<Notify>,
}

impl DirWatch {
    /// Watches the directory holding `file` (the current directory for a bare name).
    pub fn new(file: &Path) -> io::Result<DirWatch> {
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let fd = inotify::init(CreateFlags::CLOEXEC)?;
        inotify::add_watch(
            &fd,
            dir,
            WatchFlags::CLOSE_WRITE
                | WatchFlags::MOVED_TO
                | WatchFlags::MOVED_FROM
                | WatchFlags::DELETE
                | WatchFlags::MOVE_SELF
                | WatchFlags::DELETE_SELF,
        )?;
        let notify = Arc::new(Notify::new());
        let weak: Weak<Notify> = Arc::downgrade(&notify);
        std::thread::Builder::new()
            .name("mdb-watch".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match rustix::io::read(&fd, &mut buf) {
                        Ok(0) => return,
                        Ok(_) => match weak.upgrade() {
                            // A permit is kept if the watcher is busy: no edit is missed.
                            Some(n) => n.notify_one(),
                            None => return,
                        },
                        Err(rustix::io::Errno::INTR) => {}
                        Err(e) => {
                            tracing::warn!("watching the MDB's directory: {e}");
                            return;
                        }
                    }
                }
            })?;
        Ok(DirWatch { notify })
    }

    /// Waits until the directory has reported a change since the last call.
    pub async fn changed(&self) -> io::Result<()> {
        self.notify.notified().await;
        Ok(())
    }
}
