//! The imageserver: stores images (tree + filter + triggers + metadata) and the objects
//! (file contents, by SHA-512) they refer to, and serves them to imagetool, the dominator
//! and subd over the RPCs named in `model::api::methods`.
//!
//! Layout:
//! - `catalogue`: the on-disk layout and the in-memory index (names, objects, references).
//! - `rpc`: the JSON RPC handlers (`ImageServer.*`, `ObjectServer.CheckObjects`), and the
//!   one mapping of the catalogue's errors to HTTP statuses (`ApiError`).
//! - `objects`: the streaming object batches (`ObjectServer.AddObjects` / `GetObjects`).
//! - `pages`: the status page at `/` and `/metrics`.
//! - `storage`: the objects' one storage interface: `DATA/objects` or `s3` (a bucket).
//! - `usage`: each image's size, objects and unique bytes, and its MDB users (`--mdb`).
//! - `replication`: following a master (`--replication-master`), and serving replicas.

pub mod catalogue;
pub mod leases;
pub mod objects;
pub mod pages;
pub mod replication;
pub mod rpc;
pub mod s3;
pub mod storage;
pub mod usage;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use catalogue::Catalogue;
use model::api::methods;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use wire::http::Security;

/// Largest JSON request (an `AddImage` of about half a million files); bounded so a hostile
/// client cannot make the server buffer without limit.
pub const JSON_BODY_LIMIT: usize = wire::http::MAX_JSON_BODY;

/// Stores images and their objects and serves them to imagetool, dominator and subd.
#[derive(clap::Parser, Debug)]
#[command(
    name = "imageserver",
    version,
    mut_args = wire::security::daemon_tls_help("imageserver")
)]
pub struct Args {
    /// Directory holding objects/ and images/ (created if missing)
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Address to listen on
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:6971")]
    pub listen: String,
    /// Also serve the status page and `/metrics` (never an RPC) on ADDR, over TLS with
    /// this server's certificate but asking for no client certificate
    #[arg(long, value_name = "ADDR")]
    pub status_listen: Option<String>,
    /// The machine database (read only, read again when it changes): the status page
    /// names the machines using each image
    #[arg(long, value_name = "PATH")]
    pub mdb: Option<PathBuf>,
    /// Seconds an uploaded object (or one `CheckObjects` reported present) is safe from
    /// unreferenced-object deletion, so the `AddImage` that follows finds it
    #[arg(long, value_name = "SECONDS", default_value_t = catalogue::DEFAULT_PIN_GRACE.as_secs())]
    pub object_pin_seconds: u64,
    /// Most `GetObjects` streams open at once; more get 503
    #[arg(long, value_name = "N", default_value_t = objects::DEFAULT_MAX_STREAMS)]
    pub max_object_streams: usize,
    /// Most `GetObjects` streams one caller (certificate name and address) may have open
    /// at once; more get 503
    #[arg(long, value_name = "N", default_value_t = objects::DEFAULT_MAX_STREAMS_PER_CALLER)]
    pub max_object_streams_per_caller: usize,
    /// Testing knob: the shortest expiry accepted on add or change, in seconds
    /// (Dominator's 15 minutes by default)
    #[arg(long, value_name = "SECONDS", default_value_t = model::expiry::DEFAULT_MIN_EXPIRY_SECS, hide = true)]
    pub min_expiry_secs: u64,
    /// Keep the objects in an S3 bucket (under PREFIX/objects/) instead of DATA/objects
    #[arg(long, value_name = "s3://BUCKET[/PREFIX]")]
    pub object_store: Option<String>,
    /// The S3 endpoint (e.g. http://127.0.0.1:3900 for Garage); AWS when absent
    #[arg(long, value_name = "URL", requires = "object_store")]
    pub s3_endpoint: Option<String>,
    /// Read the S3 access key, secret and region from FILE (`KEY=VALUE` lines, or an AWS
    /// credentials file) instead of AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION
    #[arg(long, value_name = "FILE", requires = "object_store")]
    pub s3_credentials: Option<PathBuf>,
    /// How often to look in the bucket for images other imageservers added (they are
    /// listed here at most this long plus one listing after their add returned)
    #[arg(
        long,
        value_name = "MILLISECONDS",
        default_value_t = 1000,
        requires = "object_store"
    )]
    pub s3_refresh_ms: u64,
    /// Follow the imageserver at HOST:PORT as a replica: copy its images (and only the
    /// objects missing here), follow its deletions and expiries, refuse writes (403
    /// naming it). Over TLS with this server's own certificate unless
    /// `--permit-insecure-mode`
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "object_store")]
    pub replication_master: Option<String>,
    #[command(flatten)]
    pub tls: wire::security::DaemonTlsArgs,
    #[command(flatten)]
    pub connections: wire::connection::ConnectionArgs,
}

/// Counters exported on `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub objects_received: AtomicU64,
    pub object_bytes_received: AtomicU64,
    pub objects_served: AtomicU64,
    pub object_bytes_served: AtomicU64,
    pub images_added: AtomicU64,
    pub images_deleted: AtomicU64,
    pub images_expired: AtomicU64,
    pub rejected_uploads: AtomicU64,
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct State {
    pub catalogue: Arc<Catalogue>,
    pub security: Security,
    /// Timeouts and connection limits of the server.
    pub connection_limits: wire::connection::ConnectionLimits,
    pub metrics: Arc<Metrics>,
    /// Bounds on concurrent `GetObjects` streams.
    pub streams: Arc<objects::StreamLimits>,
    /// Slots for large `AddImage` bodies in memory at once.
    pub image_bodies: Arc<tokio::sync::Semaphore>,
    /// How long a large `AddImage` waits for a slot before a 503.
    pub image_body_wait: Duration,
    /// The status page's per-image figures (`usage`).
    pub usage: Arc<std::sync::Mutex<usage::UsageCache>>,
    /// The MDB whose records the status page names per image (`--mdb`), if given.
    pub mdb: Option<Arc<usage::MdbUsers>>,
    /// Set on a replica (`--replication-master`): its master and progress.
    pub replica: Option<Arc<replication::Replica>>,
}

impl Args {
    /// The S3 back-end of `--object-store`, if given (credentials read now, the bucket
    /// reached at the first request). Call on a runtime thread.
    pub fn s3_objects(&self) -> Result<Option<Arc<s3::S3Objects>>, s3::S3Error> {
        let Some(url) = &self.object_store else {
            return Ok(None);
        };
        let (bucket, prefix) = s3::parse_url(url)?;
        let config = s3::S3Config {
            bucket,
            prefix,
            endpoint: self.s3_endpoint.clone(),
            credentials: s3::credentials(self.s3_credentials.as_deref())?,
        };
        Ok(Some(Arc::new(s3::S3Objects::open(&config)?)))
    }
}

impl State {
    /// Opens the data directory (see `catalogue` for its layout), with the default pin
    /// grace period.
    pub fn open(data_dir: &Path, security: Security) -> Result<State, catalogue::OpenError> {
        State::open_with_grace(data_dir, security, catalogue::DEFAULT_PIN_GRACE)
    }

    /// Opens the data directory; uploaded and checked objects stay pinned against
    /// unreferenced-object deletion for `pin_grace`.
    pub fn open_with_grace(
        data_dir: &Path,
        security: Security,
        pin_grace: Duration,
    ) -> Result<State, catalogue::OpenError> {
        State::open_with_objects(data_dir, security, pin_grace, None)
    }

    /// `open_with_grace`, with the objects in S3 when `s3` is given.
    pub fn open_with_objects(
        data_dir: &Path,
        security: Security,
        pin_grace: Duration,
        s3: Option<Arc<s3::S3Objects>>,
    ) -> Result<State, catalogue::OpenError> {
        Ok(State {
            catalogue: Arc::new(Catalogue::open_with_objects(data_dir, pin_grace, s3)?),
            security,
            connection_limits: Default::default(),
            metrics: Arc::new(Metrics::default()),
            streams: Arc::new(objects::StreamLimits::default()),
            image_bodies: Arc::new(tokio::sync::Semaphore::new(rpc::DEFAULT_LARGE_BODIES)),
            image_body_wait: rpc::DEFAULT_LARGE_BODY_WAIT,
            usage: Default::default(),
            mdb: None,
            replica: None,
        })
    }

    /// Names, on the status page, the records of the MDB at `path` using each image.
    pub fn with_mdb(mut self, path: std::path::PathBuf) -> State {
        self.mdb = Some(Arc::new(usage::MdbUsers::new(path)));
        self
    }

    /// Admits at most `max` large `AddImage` bodies at once; others wait up to `wait`.
    pub fn with_large_image_bodies(mut self, max: usize, wait: Duration) -> State {
        self.image_bodies = Arc::new(tokio::sync::Semaphore::new(max));
        self.image_body_wait = wait;
        self
    }

    /// Bounds `GetObjects` streams to `max` open at once, `per_caller` per certificate name.
    pub fn with_stream_limits(mut self, max: usize, per_caller: usize) -> State {
        self.streams = Arc::new(objects::StreamLimits::new(max, per_caller));
        self
    }
}

fn rpc_path(method: &str) -> String {
    format!("/rpc/{method}")
}

/// Every `interval`, renews this server's leases in the bucket and takes in what other
/// imageservers over the same bucket added, deleted, expired or changed
/// (`Catalogue::refresh_from_bucket`); runs forever (a failed round is logged and retried).
pub async fn refresh_from_bucket(catalogue: Arc<Catalogue>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let cat = catalogue.clone();
        let work = move || {
            cat.renew_leases();
            cat.refresh_from_bucket()
        };
        match tokio::task::spawn_blocking(work).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(
                images = n,
                "took in images added or changed through other imageservers"
            ),
            Ok(Err(e)) => tracing::warn!("looking for new images in the bucket: {e}"),
            Err(e) => tracing::warn!("looking for new images in the bucket: {e}"),
        }
    }
}

/// The routes of every RPC and page.
pub fn router(state: State) -> Router {
    Router::new()
        .route(&rpc_path(methods::ADD_IMAGE), post(rpc::add_image))
        .route(&rpc_path(methods::CHECK_IMAGE), post(rpc::check_image))
        .route(&rpc_path(methods::GET_IMAGE), post(rpc::get_image))
        .route(&rpc_path(methods::LIST_IMAGES), post(rpc::list_images))
        .route(&rpc_path(methods::DELETE_IMAGE), post(rpc::delete_image))
        .route(
            &rpc_path(methods::CHANGE_IMAGE_EXPIRATION),
            post(rpc::change_image_expiration),
        )
        .route(
            &rpc_path(methods::GET_IMAGE_EXPIRATION),
            post(rpc::get_image_expiration),
        )
        .route(
            &rpc_path(methods::LIST_UNREFERENCED_OBJECTS),
            post(rpc::list_unreferenced),
        )
        .route(
            &rpc_path(methods::DELETE_UNREFERENCED_OBJECTS),
            post(rpc::delete_unreferenced),
        )
        .route(&rpc_path(methods::CHECK_OBJECTS), post(rpc::check_objects))
        .route(&rpc_path(methods::ADD_OBJECTS), post(objects::add_objects))
        .route(&rpc_path(methods::GET_OBJECTS), post(objects::get_objects))
        .route(
            &rpc_path(methods::GET_REPLICATION_STATE),
            post(replication::get_replication_state),
        )
        .route("/", get(pages::status))
        .route("/metrics", get(pages::metrics))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            replication::refuse_writes,
        ))
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .with_state(state)
}

/// The read-only routes of `--status-listen`: the status page and `/metrics`, no RPC.
pub fn status_router(state: State) -> Router {
    Router::new()
        .route("/", get(pages::status))
        .route("/metrics", get(pages::metrics))
        .with_state(state)
}

/// Serves `state` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: State,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_status(listener, None, state, shutdown).await
}

/// `serve`, and the read-only status pages on `status` (a listener and its security) when
/// given.
pub async fn serve_with_status(
    listener: TcpListener,
    status: Option<(TcpListener, Security)>,
    state: State,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let security = state.security.clone();
    let limits = state.connection_limits.clone();
    let sweep = tokio::spawn(expiry_sweep(state.clone()));
    let _sweep = AbortOnDrop(sweep);
    let status = status.map(|(listener, security)| wire::http::StatusListener {
        listener,
        router: status_router(state.clone()),
        security,
    });
    wire::http::serve_with_status(listener, router(state), security, limits, status, shutdown).await
}

/// How often the server tombstones images whose expiry has passed (they already vanish
/// from every listing and lookup the moment it passes).
pub const EXPIRY_SWEEP: Duration = Duration::from_secs(1);

/// Tombstones expired images every `EXPIRY_SWEEP` (`Catalogue::expire_due`), forever.
async fn expiry_sweep(state: State) {
    let mut tick = tokio::time::interval(EXPIRY_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let cat = state.catalogue.clone();
        if let Ok(gone) = tokio::task::spawn_blocking(move || cat.expire_due()).await {
            state
                .metrics
                .images_expired
                .fetch_add(gone.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Aborts its task when dropped (the sweep ends with the server).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
