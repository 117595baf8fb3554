//! Hashes vouched for by the writer of a file: an update records, for each regular file it
//! renamed into place, the file's identity and timestamps right after the rename and the
//! hash it verified; the scan that follows takes that hash for a file it finds exactly so
//! (same device, inode, size, mtime and ctime) instead of reading it again.
//!
//! Why this is safe. The content was verified (SHA-512 of every byte, as fetched or copied
//! into the cache) before the file was made visible, and nothing else writes into subd's
//! private cache. Any later change to the inode — a write, a truncation, `chmod`, `utimes`,
//! a new link, a rename — sets its ctime to the current time, and user space cannot set a
//! ctime back. A change the record cannot see must therefore land in the same timestamp
//! tick as the rename *and* keep size and mtime. That residue is bounded: a record serves
//! one scan pass only (subd takes it for the first pass after the update and drops it), so
//! the pass after that hashes every byte again, as every pass did before, and any such
//! change is reported then — exactly as a change made just after a full pass would be. The
//! records live in memory only: after a crash or restart there are none and the first pass
//! hashes everything.

use model::hash::ObjectId;
use rustix::fs::Stat;
use std::collections::HashMap;

/// What identifies one state of a regular file: its device and inode, size, mtime and
/// ctime (to the nanosecond).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Stamp {
    /// The stamp of a `stat` result.
    pub fn of(st: &Stat) -> Stamp {
        Stamp {
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec as i64),
            ctime: (st.st_ctime, st.st_ctime_nsec as i64),
        }
    }
}

/// Regular files whose content hash is known without reading them, by (device, inode).
#[derive(Clone, Debug, Default)]
pub struct Known {
    by_inode: HashMap<(u64, u64), (Stamp, ObjectId)>,
}

impl Known {
    /// Records that the regular file `st` describes holds the object `id`.
    pub fn insert(&mut self, st: &Stat, id: ObjectId) {
        self.by_inode
            .insert((st.st_dev, st.st_ino), (Stamp::of(st), id));
    }

    /// The recorded hash of the file `st` describes, if it was recorded in exactly this
    /// state.
    pub fn hash_of(&self, st: &Stat) -> Option<ObjectId> {
        let (stamp, id) = self.by_inode.get(&(st.st_dev, st.st_ino))?;
        (*stamp == Stamp::of(st)).then_some(*id)
    }

    /// How many files are recorded.
    pub fn len(&self) -> usize {
        self.by_inode.len()
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.by_inode.is_empty()
    }
}
