//! The fleet's pure vocabulary: what an image, a path, a filter and a plan are, and the pure
//! functions over them. No I/O: no file-system, no network, no processes (the crate's
//! dependencies keep it so; the disk work lives in `disk`, the wire in `wire`).
//!
//! Layout:
//! - `hash`: `ObjectId`, the SHA-512 of an object's bytes.
//! - `path`: `FsPath`, absolute paths as bytes, and their JSON and human encodings.
//! - `image`: `Inode`, `FileTree`, `Image`, `ImageName`.
//! - `filter`, `triggers`: Dominator's filter and trigger files, compiled and matched.
//! - `hooks`: an image's pre/post hook programs, which an update runs, and their runs.
//! - `state`: state lines (paths seeded when absent, never managed after).
//! - `stream`: image streams (an image directory standing for its newest image).
//! - `select`: `--where` selections of MDB records (tags, host-name globs).
//! - `snapshot`: what an image made from a live host keeps, and recurring snapshots' names.
//! - `plan`, `diff`: `UpdatePlan` and the pure function computing it.
//! - `api`, `frame`: wire types and object batch framing (encoding only, no sockets).

pub mod api;
pub mod diff;
pub mod expiry;
pub mod filter;
pub mod frame;
pub mod hash;
pub mod hash_lanes;
pub mod hooks;
pub mod image;
pub mod path;
pub mod plan;
pub mod replication;
pub mod select;
pub mod snapshot;
pub mod state;
pub mod stream;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod triggers;

pub use filter::Filter;
pub use hash::ObjectId;
pub use image::{FileTree, Image, ImageName, Inode, Kind, Mtime};
pub use path::FsPath;
pub use plan::UpdatePlan;
pub use state::StateLines;
pub use triggers::{Trigger, Triggers};
