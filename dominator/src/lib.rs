//! The dominator: drives every machine of the MDB to its required image.
//!
//! Layout:
//! - `decision`: PURE per-machine `next_step` (and `backoff`), with the status names.
//! - `planner`: the one place a machine's `UpdatePlan` is computed (the shared diff).
//! - `herd`: the MDB watcher and one task per machine (I/O around `decision`).
//! - `images`: the fleet-wide image cache.
//! - `mdbwatch`: inotify on the MDB's directory, so an edit is seen at once.
//! - `streams`: MDB image names that name an image directory, resolved to its newest.
//! - `fleet`: the shared state the herd writes and the web surface reads.
//! - `history`: the bounded memory of the last hour (chart samples, changes, timelines).
//! - `web`: status pages, JSON API, metrics, control RPCs.
//! - `preview`: an `UpdatePlan` as human text (`dominator plan`, machine pages).
//! - `commands`: the `plan`, `disable-updates`/`enable-updates` and `local-fleet` commands.

pub mod commands;
pub mod decision;
pub mod fleet;
pub mod herd;
pub mod history;
pub mod images;
pub mod local_fleet;
pub mod mdbwatch;
pub mod planner;
pub mod preview;
pub mod streams;
pub mod web;

use disk::clock::unix_now;
use fleet::{Fleet, GlobalDisable};
use herd::HerdConfig;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use wire::http::Security;

/// Everything `serve` needs besides the listener.
pub struct Config {
    pub herd: HerdConfig,
    /// How the status page and RPCs are served.
    pub security: Security,
    /// Start with updates disabled fleet-wide, for this reason.
    pub disable_updates_at_startup: Option<String>,
    /// Timeouts and connection limits of the status page and RPCs.
    pub connection_limits: wire::connection::ConnectionLimits,
    /// The read-only status listener (`--status-listen`) and its security.
    pub status: Option<(TcpListener, Security)>,
}

/// Where the fleet-wide brake (`disable-updates`) is kept, beside the MDB, so a restarted
/// dominator keeps it: `<mdb>.updates-disabled`.
pub fn brake_file(mdb: &std::path::Path) -> std::path::PathBuf {
    let mut name = mdb.file_name().unwrap_or_default().to_os_string();
    name.push(".updates-disabled");
    mdb.with_file_name(name)
}

/// Runs the dominator (herd + HTTP surface) on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let fleet = Arc::new(
        Fleet::new(
            &config.herd.mdb_path.display().to_string(),
            &config.herd.image_server,
            config.security.is_insecure(),
        )
        .with_brake_file(brake_file(&config.herd.mdb_path)),
    );
    if let Some(reason) = config.disable_updates_at_startup {
        fleet.set_global_disable(Some(GlobalDisable {
            reason,
            by: "startup".into(),
            since: unix_now(),
        }));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let herd = tokio::spawn(herd::run(config.herd, fleet.clone(), stop_rx));
    let sampler = tokio::spawn(sample_every_bucket(fleet.clone()));
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let status = config
        .status
        .map(|(listener, security)| wire::http::StatusListener {
            listener,
            router: web::status_router(fleet.clone()),
            security,
        });
    let r = wire::http::serve_with_status(
        listener,
        web::router(fleet),
        config.security,
        config.connection_limits,
        status,
        shutdown,
    )
    .await;
    let _ = herd.await;
    sampler.abort();
    r
}

/// Samples machines per status once per chart bucket, so the chart goes on while nothing
/// changes (changes are sampled as they are published, by `herd`).
async fn sample_every_bucket(fleet: Arc<Fleet>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(history::BUCKET_SECS));
    loop {
        every.tick().await;
        fleet.sample(unix_now());
    }
}
