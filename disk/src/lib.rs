//! The fleet's work on a machine's own disk: scanning a tree, importing a tar, the
//! content-addressed object store, applying an update plan under a root, durable writes.
//! Depends on `model` for the vocabulary; knows nothing of the network.
//!
//! Layout:
//! - `scan`: a directory → `FileTree`, hashing in parallel, by directory handle.
//! - `tarball`: a `.tar`/`.tar.gz` → `FileTree` + objects.
//! - `objectstore`: the content-addressed on-disk store (imageserver objects, subd cache).
//! - `apply`: executing an `UpdatePlan` under a root directory, safely.
//! - `lanes`: independent per-item work split over a few threads, results in order.
//! - `known`: hashes an update vouches for, so the scan after it need not re-read its files.
//! - `readback`: sending a scanned file's bytes under its hash, re-hashed as sent.
//! - `statedir`: `ROOT/.subd`, checked once and then reached only through its handle.
//! - `fsutil`: durable writes (temp + fsync + rename), locks.
//! - `report`: an error and its causes as the one line a program prints; logging set-up.
//! - `clock`: the wall clock in Unix seconds.

pub mod apply;
pub mod clock;
pub mod fsutil;
pub mod known;
pub mod lanes;
pub mod objectstore;
pub mod readback;
pub mod report;
pub mod scan;
pub mod statedir;
pub mod tarball;
