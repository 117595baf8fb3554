//! subd: the agent on every managed machine. It scans its root in the background, reports
//! the tree over `Subd.Poll`, fetches the objects it is told to (`Subd.Fetch`, verified)
//! and applies the update plans it is given (`Subd.Update`) with the shared `disk::apply`.
//! It never decides what to change.
//!
//! Layout: `lib.rs` holds the configuration, the shared state and `serve`; `scanner` the
//! background scan loop; `routes` the RPC handlers, status page and metrics; `poll` the
//! full-poll trees shared among concurrent pollers; `snapshot` `Snapshot.GetObjects`.
//! Private state lives in `ROOT/.subd`: `objects/` (the cache), `staging/`,
//! `triggers.previous`, `last-image`, `last-update.json`, `hooks/` (copies of the hooks
//! being run). It is opened once at start-up
//! (`disk::statedir`: refused if others can write it or the root) and reached only
//! through that handle afterwards.

pub mod hooks;
pub mod poll;
pub mod routes;
pub mod scanner;
pub mod snapshot;

use disk::apply::ApplyOptions;
use disk::objectstore::ObjectStore;
use disk::statedir::{StateDir, StateDirError};
use model::api::UpdateResult;
use model::diff::ALWAYS_EXCLUDED;
use model::{FileTree, Filter, ObjectId};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use wire::client::ClientSecurity;
use wire::fetch::FetchStats;
use wire::http::Security;

/// The default scan exclusions (Dominator's list).
pub const DEFAULT_EXCLUSIONS: [&str; 7] = [
    "/tmp/.*",
    "/var/log/.*",
    "/var/mail/.*",
    "/var/spool/.*",
    "/var/tmp/.*",
    "/home/.*",
    "/data/.*",
];

/// Command-line flags.
#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "subd",
    version,
    mut_args = wire::security::daemon_tls_help("subd"),
    about = "Scan this machine, fetch what it lacks, converge it to an image"
)]
pub struct Args {
    /// The root directory to manage
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Address to listen on
    #[arg(long, default_value = "0.0.0.0:6969")]
    pub listen: String,
    /// Runs `CMD NAME stop|start|reload` for triggers (split on blanks)
    #[arg(long, default_value = "service")]
    pub service_command: String,
    /// Runs when a trigger asks for a reboot (split on blanks); none = reboot skipped
    #[arg(long)]
    pub reboot_command: Option<String>,
    /// Seconds after which a trigger or reboot command is killed
    #[arg(long, default_value_t = 120)]
    pub command_timeout_secs: u64,
    /// Seconds after which a pre or post hook is killed (with its process group) and
    /// counted as failed
    #[arg(long, default_value_t = 300)]
    pub hook_timeout_secs: u64,
    /// Scan exclusion regex (repeatable; replaces the defaults /tmp/.*, /var/log/.*,
    /// /var/mail/.*, /var/spool/.*, /var/tmp/.*, /home/.*, /data/.*).
    /// /var/lib/initial-image and /var/lib/patched-image are always excluded
    #[arg(long = "scan-exclude", value_name = "REGEX")]
    pub scan_exclude: Vec<String>,
    /// Share of one CPU the background scan may use after the first scan (1-100)
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub cpu_percent: u32,
    /// Share of time the background scan may spend reading and hashing after the first
    /// scan (1-100; 100 = unthrottled, all CPUs)
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub scan_speed_percent: u32,
    /// Cap on fetch bandwidth in bytes per second (0 = unlimited)
    #[arg(long, default_value_t = 0)]
    pub fetch_bytes_per_second: u64,
    /// Common name the imageserver's certificate must carry (its role) when fetching
    #[arg(long, value_name = "NAME", default_value = wire::client::IMAGESERVER_NAME)]
    pub image_server_name: String,
    /// Fetch from these imageservers (HOST[:PORT], several separated by commas, tried in
    /// order: the next on a connection error or a 5xx) instead of the one the dominator
    /// names in each Fetch (which may be such a list too)
    #[arg(long, value_name = "HOST[:PORT],…")]
    pub image_server: Option<String>,
    #[command(flatten)]
    pub tls: wire::security::DaemonTlsArgs,
    #[command(flatten)]
    pub connections: wire::connection::ConnectionArgs,
}

/// What a subd needs to run.
#[derive(Clone)]
pub struct Config {
    pub root: PathBuf,
    pub exclusions: Vec<String>,
    pub service_command: Vec<String>,
    pub reboot_command: Option<Vec<String>>,
    pub command_timeout: Duration,
    /// A hook running longer is killed and fails.
    pub hook_timeout: Duration,
    pub cpu_percent: u32,
    pub scan_speed_percent: u32,
    pub fetch_bytes_per_second: Option<u64>,
    /// Minimum time between the starts of two scans.
    pub min_scan_interval: Duration,
    pub security: Security,
    /// How the fetcher talks to imageservers.
    pub client_security: ClientSecurity,
    /// Common name the imageserver's certificate must carry.
    pub image_server_name: String,
    /// `--image-server`: the imageservers to fetch from, instead of the Fetch's own.
    pub image_server: Option<String>,
    /// Timeouts and connection limits of the server.
    pub connection_limits: wire::connection::ConnectionLimits,
}

impl Config {
    /// A configuration for tests and development: defaults, plain HTTP, unthrottled.
    pub fn new(root: &Path) -> Config {
        Config {
            root: root.to_path_buf(),
            exclusions: DEFAULT_EXCLUSIONS.iter().map(|s| s.to_string()).collect(),
            service_command: vec!["service".into()],
            reboot_command: None,
            command_timeout: Duration::from_secs(120),
            hook_timeout: Duration::from_secs(300),
            cpu_percent: 100,
            scan_speed_percent: 100,
            fetch_bytes_per_second: None,
            min_scan_interval: Duration::from_secs(1),
            security: Security::Insecure,
            client_security: ClientSecurity::Insecure,
            image_server_name: wire::client::IMAGESERVER_NAME.into(),
            image_server: None,
            connection_limits: Default::default(),
        }
    }

    /// From the command line.
    pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
        let split = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        let service_command = split(&args.service_command);
        if service_command.is_empty() {
            return Err(ConfigError::EmptyServiceCommand);
        }
        Ok(Config {
            root: args.root.clone(),
            exclusions: if args.scan_exclude.is_empty() {
                DEFAULT_EXCLUSIONS.iter().map(|s| s.to_string()).collect()
            } else {
                args.scan_exclude.clone()
            },
            service_command,
            reboot_command: args
                .reboot_command
                .as_deref()
                .map(split)
                .filter(|v| !v.is_empty()),
            command_timeout: Duration::from_secs(args.command_timeout_secs.max(1)),
            hook_timeout: Duration::from_secs(args.hook_timeout_secs.max(1)),
            cpu_percent: args.cpu_percent,
            scan_speed_percent: args.scan_speed_percent,
            fetch_bytes_per_second: (args.fetch_bytes_per_second > 0)
                .then_some(args.fetch_bytes_per_second),
            min_scan_interval: Duration::from_secs(1),
            security: args.tls.server_security("subd").map_err(ConfigError::Tls)?,
            client_security: args.tls.client_security("subd").map_err(ConfigError::Tls)?,
            image_server_name: args.image_server_name.clone(),
            image_server: args.image_server.clone(),
            connection_limits: args.connections.limits(),
        })
    }
}

/// Why the command line does not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--service-command is empty")]
    EmptyServiceCommand,
    /// The TLS flags or files do not make a usable setting.
    #[error("TLS")]
    Tls(#[source] wire::security::SecurityError),
}

/// Why a subd cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    State(#[from] StateDirError),
    #[error("scan exclusions: {0}")]
    Exclusions(#[from] model::filter::BadRegex),
    #[error("object cache: {0}")]
    Store(#[from] disk::objectstore::StoreError),
    #[error("{0} (another subd, or imagetool patch-directory, on this root?)")]
    Locked(#[from] disk::fsutil::LockError),
}

/// What Poll reports; guarded by `Subd::status` (a std Mutex never held across `.await`).
#[derive(Default)]
pub struct Status {
    pub generation: u64,
    pub scan_count: u64,
    pub last_scan_time: u64,
    pub last_scan_duration_ms: u64,
    /// Passes abandoned because an update began.
    pub scans_aborted: u64,
    pub tree: Option<Arc<FileTree>>,
    pub object_cache: Option<Arc<Vec<ObjectId>>>,
    /// Directories holding entries the last scan left out (see `disk::scan::Scan`).
    pub hidden_parents: Vec<model::FsPath>,
    pub fetch_in_progress: bool,
    pub update_in_progress: bool,
    pub last_fetch_error: Option<String>,
    pub last_fetch: Option<FetchStats>,
    pub last_update: Option<UpdateResult>,
    pub last_image: Option<String>,
    /// State paths this machine seeded (`disk::apply::SEEDED`), sent with every poll.
    pub seeded: Vec<model::FsPath>,
    /// Scan the next pass unthrottled (set after fetch, update, cleanup).
    pub boost: bool,
    /// What the last update's files look like and hold (`disk::known`): taken by the
    /// first scan pass after it, and by that pass only.
    pub known: Option<Arc<disk::known::Known>>,
    /// Files the last finished pass took from `known` instead of reading them.
    pub last_scan_known_files: u64,
}

/// A running subd's shared state.
pub struct Subd {
    pub config: Config,
    /// `ROOT/.subd`, held open: never reached by path after start-up.
    pub state_dir: StateDir,
    pub store: ObjectStore,
    pub exclusions: Filter,
    pub status: Mutex<Status>,
    /// Rises at the start and end of every update: a scan spanning a change is discarded.
    pub epoch: AtomicU64,
    /// Wakes the scanner early.
    pub wake: (Mutex<bool>, Condvar),
    pub stop: Arc<AtomicBool>,
    /// Abandons the scanner's current pass: set by `stop` and when an update begins, so a
    /// pass hashing on every CPU does not compete with the activation (its result would
    /// be discarded anyway).
    pub scan_abort: Arc<AtomicBool>,
    pub start_time: u64,
    /// Full poll replies shared per generation, and the limits on them.
    pub polls: poll::PollShare,
    /// The last scan's paths by object, for `Snapshot.GetObjects`.
    pub snapshot_index: snapshot::IndexCache,
    /// The imageserver client of the last fetch, by its server list: kept so the server
    /// it failed over to stays preferred across fetches.
    pub fetch_client: Mutex<Option<(String, wire::client::ImageServerClient)>>,
    /// The scan count, published by the scanner after each pass it counts (and
    /// `u64::MAX` once shutting down): held polls (`PollRequest::wait_for_scan`) wait on it.
    pub scans: tokio::sync::watch::Sender<u64>,
    /// Held while running: one subd per root.
    _lock: disk::fsutil::DirLock,
}

const LAST_IMAGE: &str = "last-image";
const LAST_UPDATE: &str = "last-update.json";

impl Subd {
    /// The status, locked. A panic elsewhere while it was held (none is expected: its
    /// critical sections only copy fields) must not wedge every later poll, so a poisoned
    /// lock is taken as it stands.
    pub fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens the state directory and starts the background scanner.
    pub fn start(config: Config) -> Result<Arc<Subd>, StartError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StartError::Io { path, source }
        };
        let state_dir = StateDir::open(&config.root)?;
        // Before the object cache and staging are cleaned: they may be another subd's.
        let lock = state_dir.lock("lock")?;
        let mut lines = config.exclusions.clone();
        lines.extend(ALWAYS_EXCLUDED.iter().map(|s| format!("{s}$")));
        let exclusions = Filter::from_lines(lines)?;
        let store = state_dir.objects()?;
        let status = Status {
            last_image: state_dir
                .read(LAST_IMAGE)
                .ok()
                .map(|s| String::from_utf8_lossy(&s).trim().to_string())
                .filter(|s| !s.is_empty()),
            last_update: state_dir
                .read(LAST_UPDATE)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok()),
            seeded: disk::apply::load_seeded(&state_dir),
            ..Status::default()
        };
        let subd = Arc::new(Subd {
            config,
            state_dir,
            store,
            exclusions,
            status: Mutex::new(status),
            epoch: AtomicU64::new(0),
            wake: (Mutex::new(false), Condvar::new()),
            stop: Arc::new(AtomicBool::new(false)),
            scan_abort: Arc::new(AtomicBool::new(false)),
            start_time: disk::clock::unix_now(),
            polls: poll::PollShare::default(),
            snapshot_index: snapshot::IndexCache::default(),
            fetch_client: Mutex::new(None),
            scans: tokio::sync::watch::Sender::new(0),
            _lock: lock,
        });
        // An update killed between stopping services and starting them left them stopped.
        let (owed, failed) =
            disk::apply::resume_pending_starts(&subd.state_dir, &subd.apply_options());
        if !owed.is_empty() {
            tracing::warn!(
                ?owed,
                ?failed,
                "ran the service starts an interrupted update still owed"
            );
        }
        let s = subd.clone();
        std::thread::Builder::new()
            .name("scanner".into())
            .spawn(move || scanner::run(&s))
            .map_err(io(Path::new("scanner thread")))?;
        Ok(subd)
    }

    /// Options for `disk::apply`.
    pub fn apply_options(&self) -> ApplyOptions {
        ApplyOptions {
            exclusions: Some(self.exclusions.clone()),
            service_command: Some(self.config.service_command.clone()),
            reboot_command: self.config.reboot_command.clone(),
            command_timeout: self.config.command_timeout,
            held: None,
        }
    }

    /// Asks the scanner to start its next pass soon, unthrottled.
    pub fn boost_scan(&self) {
        self.status().boost = true;
        let (m, c) = &self.wake;
        *m.lock().unwrap() = true;
        c.notify_all();
    }

    /// Records a finished update durably and lets the scanner resume.
    pub(crate) fn finish_update(&self, result: &UpdateResult, sparse: bool) {
        if let Ok(json) = serde_json::to_vec_pretty(result) {
            if let Err(e) = self.state_dir.write_atomic(LAST_UPDATE, &json) {
                tracing::warn!("saving {LAST_UPDATE}: {e}");
            }
        }
        let ok = result.errors.is_empty();
        if ok {
            if let Err(e) = self
                .state_dir
                .write_atomic(LAST_IMAGE, format!("{}\n", result.image_name).as_bytes())
            {
                tracing::warn!("saving {LAST_IMAGE}: {e}");
            }
        }
        let seeded = disk::apply::load_seeded(&self.state_dir);
        {
            let mut st = self.status();
            st.seeded = seeded;
            st.last_update = Some(result.clone());
            if ok {
                st.last_image = Some(result.image_name.clone());
            }
            st.update_in_progress = false;
        }
        let _ = sparse;
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.boost_scan();
    }

    /// Stops the scanner (it finishes or abandons its pass).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.scan_abort.store(true, Ordering::SeqCst);
        // Held polls answer now: shutdown does not wait out their holds.
        self.scans.send_replace(u64::MAX);
        let (m, c) = &self.wake;
        *m.lock().unwrap() = true;
        c.notify_all();
    }

    /// Free bytes on the root's file-system.
    pub fn free_space(&self) -> u64 {
        rustix::fs::statvfs(&self.config.root)
            .map(|s| s.f_bavail * s.f_frsize)
            .unwrap_or(0)
    }
}

/// Serves the subd API on `listener` until `shutdown` resolves, then stops the scanner.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<Subd>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let security = state.config.security.clone();
    let limits = state.config.connection_limits.clone();
    let r = wire::http::serve_with_limits(
        listener,
        routes::router(state.clone()),
        security,
        limits,
        shutdown,
    )
    .await;
    state.shutdown();
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn an_empty_service_command_is_refused_by_name() {
        let args = Args::parse_from(["subd", "--service-command", " ", "--permit-insecure-mode"]);
        let e = Config::from_args(&args).err().expect("refused");
        assert!(matches!(e, ConfigError::EmptyServiceCommand), "{e:?}");
        assert_eq!(e.to_string(), "--service-command is empty");
    }
}
