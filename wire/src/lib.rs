//! The fleet's wire: the one HTTP server, the one HTTP client, mutual TLS and certificates,
//! and what moves objects between machines (fetching into a local store, patching a
//! directory from an imageserver). Depends on `model` and `disk`.
//!
//! Layout:
//! - `http`, `connection`: the server (`serve`), its connection limits and timeouts.
//! - `client`: the RPC client every program uses.
//! - `listening`: the line a daemon prints once bound, and its reader.
//! - `tls`, `security`, `certs`: mutual TLS, the TLS flags every program shares, and
//!   `make-certs`.
//! - `fetch`: objects from an imageserver into a local store, verified, in batches.
//! - `patch`: `patch_directory`, an image applied to a local directory (diff + fetch + apply).
//! - `pages`: HTML escaping for status pages, the Prometheus `/metrics` reply.
//! - `program`: a server `main`'s listening line and its SIGTERM/SIGINT shutdown.

pub mod certs;
pub mod client;
pub mod connection;
pub mod fetch;
pub mod http;
pub mod listening;
pub mod pages;
pub mod patch;
pub mod program;
pub mod security;
pub mod tls;
