//! The library every program of the fleet shares.
//!
//! Layout:
//! - `hash`: `ObjectId`, the SHA-512 of an object's bytes.
//! - `path`: `FsPath`, absolute paths as bytes, and their JSON and human encodings.
//! - `image`: `Inode`, `FileTree`, `Image`, `ImageName`.
//! - `filter`, `triggers`: Dominator's filter and trigger files, compiled and matched.
//! - `scan`: a directory → `FileTree`, hashing in parallel.
//! - `tarball`: a `.tar`/`.tar.gz` → `FileTree` + objects.
//! - `objectstore`: the content-addressed on-disk store (imageserver objects, subd cache).
//! - `plan`, `diff`: `UpdatePlan` and the pure function computing it.
//! - `apply`: executing an `UpdatePlan` under a root directory, safely.
//! - `fetch`: objects from an imageserver into a local store, verified, in batches.
//! - `patch`: `patch_directory`, an image applied to a local directory (diff + fetch + apply).
//! - `api`, `frame`: wire types and object batch framing.
//! - `http`, `client`, `tls`, `security`: the one HTTP server, the one HTTP client, mutual
//!   TLS, and the TLS flags every program shares.
//! - `fsutil`: durable writes (temp + fsync + rename).
//! - `statedir`: `ROOT/.subd`, checked once and then reached only through its handle.

pub mod api;
pub mod apply;
pub mod certs;
pub mod client;
pub mod connection;
pub mod diff;
pub mod fetch;
pub mod filter;
pub mod frame;
pub mod fsutil;
pub mod hash;
pub mod http;
pub mod image;
pub mod objectstore;
pub mod patch;
pub mod path;
pub mod plan;
pub mod report;
pub mod scan;
pub mod security;
pub mod statedir;
pub mod tarball;
pub mod tls;
pub mod triggers;

pub use filter::Filter;
pub use hash::ObjectId;
pub use image::{FileTree, Image, ImageName, Inode, Kind, Mtime};
pub use path::FsPath;
pub use plan::UpdatePlan;
pub use triggers::{Trigger, Triggers};
