//! The machine database (MDB): which machine should run which image.
//!
//! Layout:
//! - `machine`: the file format (`Machine`, `Mdb`), parsed and validated with no I/O.
//! - `store`: the file on disk: `load`, locked `edit` (temp + fsync + rename), and the
//!   append-only history that `mdb history` and `mdb rollback` read.
//! - `remote`: what `mdb show`/`rollback --image-server` ask the imageserver (streams).
//! - `cli`: the `mdb` command (the binary's `main` only parses and calls `cli::run`).

pub mod cli;
pub mod keys;
pub mod machine;
pub mod remote;
pub mod store;

pub use machine::{Address, BadAddress, Machine, Mdb, MdbError, TAG_DISABLE_SAFETY_CHECK};
pub use store::{load, StoreError};

/// Where the MDB lives unless told otherwise (the dominator and mdbd use the same path).
pub const DEFAULT_MDB_PATH: &str = "/var/lib/mdbd/mdb.json";
