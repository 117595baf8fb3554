//! The `dominator` command line: the daemon's flags and the subcommands (`plan`,
//! `disable-updates`, `enable-updates`, `local-fleet`), and the code of the small ones.

use crate::decision::PollFailure;
use crate::herd::{self, HerdConfig};
use crate::images::ImageError;
use crate::{local_fleet, planner, preview, web};
use clap::{Args, Parser, Subcommand};
use model::api::PollRequest;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use wire::client::{BadHostPort, ClientError, RpcClient};
use wire::security::{ClientTlsArgs, DaemonTlsArgs, SecurityError};

/// Why a command (or the daemon's set-up) failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Security(#[from] SecurityError),
    #[error("--image-server is required")]
    NoImageServer,
    #[error("--image-server")]
    ImageServer(#[source] BadHostPort),
    #[error("{} already holds a CA.pem; refusing to replace a CA (use a new directory)", .0.display())]
    CaExists(PathBuf),
    #[error("making certificates in {}", dir.display())]
    Certs {
        dir: PathBuf,
        #[source]
        source: wire::certs::CertsError,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Mdb(#[from] mdb::StoreError),
    #[error("no machine {host:?} in {}", mdb.display())]
    NoMachine { host: String, mdb: PathBuf },
    #[error(transparent)]
    Join(#[from] tokio::task::JoinError),
}

/// Why `dominator plan` has no preview for a machine.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("no RequiredImage in the MDB (image undefined)")]
    NoImage,
    #[error(transparent)]
    Address(#[from] mdb::BadAddress),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{}: {}", .0.status, .0.message)]
    Poll(PollFailure),
    #[error("sub not ready (no scan finished yet)")]
    NotReady,
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Join(#[from] tokio::task::JoinError),
}

/// Drive every machine of the MDB to its required image.
#[derive(Parser, Debug)]
#[command(
    name = "dominator",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    mut_args = wire::security::daemon_tls_help("dominator")
)]
pub struct Cli {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What the daemon and `dominator plan` share: where the fleet is described and reached.
#[derive(Args, Debug, Clone)]
pub struct FleetArgs {
    /// The machine database
    #[arg(long, env = "MDB_FILE", default_value = mdb::DEFAULT_MDB_PATH)]
    pub mdb: PathBuf,
    /// The imageserver (HOST:PORT), or several separated by commas (tried in order: the
    /// next on a connection error or a 5xx); subds are told to fetch from this list too
    #[arg(long, value_name = "HOST:PORT[,…]", required = true)]
    pub image_server: Option<String>,
    /// Port of subds whose MDB Hostname/IpAddress carries none
    #[arg(long, default_value_t = wire::client::SUBD_PORT)]
    pub subd_port: u16,
    /// Milliseconds opening a connection to a subd (TCP and TLS handshake) may take before
    /// the machine shows `connect timeout`
    #[arg(long, value_name = "MS", default_value_t = wire::client::CONNECT_TIMEOUT.as_millis() as u64)]
    pub subd_connect_timeout_ms: u64,
    /// Common name the imageserver's certificate must carry (its role)
    #[arg(long, value_name = "NAME", default_value = wire::client::IMAGESERVER_NAME)]
    pub image_server_name: String,
    /// Common name every subd's certificate must carry (the fleet's shared subd role;
    /// host names are not checked)
    #[arg(long, value_name = "NAME", default_value = wire::client::SUBD_NAME)]
    pub subd_name: String,
    #[command(flatten)]
    pub tls: DaemonTlsArgs,
}

impl FleetArgs {
    /// The herd configuration these flags describe (client side: `client_security`).
    pub fn herd_config(&self) -> Result<HerdConfig, CommandError> {
        let security = self.tls.client_security("dominator")?;
        let image_server = self
            .image_server
            .clone()
            .ok_or(CommandError::NoImageServer)?;
        // Subds are told this list and accept only HOST[:PORT] entries.
        for addr in wire::client::split_servers(&image_server) {
            wire::client::check_host_port(addr).map_err(CommandError::ImageServer)?;
        }
        let mut cfg = HerdConfig::new(self.mdb.clone(), image_server, security);
        cfg.subd_port = self.subd_port;
        cfg.connect_timeout = Duration::from_millis(self.subd_connect_timeout_ms);
        cfg.image_server_name = self.image_server_name.clone();
        cfg.subd_name = self.subd_name.clone();
        Ok(cfg)
    }
}

/// Flags of the daemon.
#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub connections: wire::connection::ConnectionArgs,
    /// Address of the status page and RPCs
    #[arg(long, default_value = "0.0.0.0:6970")]
    pub listen: String,
    /// Also serve the status pages, `/api/` reads and `/metrics` (never an RPC) on ADDR,
    /// over TLS with this daemon's certificate but asking for no client certificate: for
    /// browsers and metrics scrapers without an admin key
    #[arg(long, value_name = "ADDR")]
    pub status_listen: Option<String>,
    /// Start with updates disabled fleet-wide (optionally saying why); re-enable with
    /// `dominator enable-updates`
    #[arg(long, value_name = "REASON", num_args = 0..=1, default_missing_value = "disabled at startup")]
    pub disable_updates_at_startup: Option<String>,
    /// Machines worked on at once
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Machines whose whole tree is fetched and diffed at once (bounds memory)
    #[arg(long, default_value_t = 16)]
    pub full_poll_concurrency: usize,
    /// Milliseconds between two polls of a machine
    #[arg(long, default_value_t = 1000)]
    pub poll_interval_ms: u64,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print what an update would do on one machine (or all) now, without doing it
    #[command(mut_args = wire::security::daemon_tls_help("dominator"))]
    Plan {
        /// The machine (default: every machine of the MDB)
        host: Option<String>,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Stop all updates fleet-wide (fetches continue), with a reason
    DisableUpdates {
        /// Why (shown on the status page)
        reason: String,
        #[command(flatten)]
        target: ControlArgs,
    },
    /// Allow updates again after `disable-updates`
    EnableUpdates {
        #[command(flatten)]
        target: ControlArgs,
    },
    /// Start a complete local fleet (imageserver, dominator, three subds) for trying it out
    LocalFleet(local_fleet::LocalFleetArgs),
    /// Create a CA and one key pair per role (imageserver, subd, dominator, builder, admin)
    MakeCerts {
        /// Directory to write into (created if needed)
        dir: PathBuf,
        /// Extra host name or address the daemons' certificates are valid for (repeatable;
        /// localhost, 127.0.0.1 and ::1 are always included)
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
    },
}

/// Where each file `wire::certs::make_all` writes is to be installed, and what it grants.
pub fn install_hint(rel: &str) -> String {
    let role = rel.split(['/', '.']).next().unwrap_or(rel);
    let grants = wire::certs::ROLES.iter().find(|r| r.name == role).map(|r| {
        if r.methods.is_empty() {
            "serves only; calls nothing".to_string()
        } else {
            format!("may call {}", r.methods.join(", "))
        }
    });
    match (rel, grants) {
        ("CA.pem", _) => "every machine: /etc/ssl/CA.pem (the trust anchor)".into(),
        ("CA.key", _) => "keep OFFLINE: it signs new certificates; no program needs it".into(),
        ("admin.p12", _) => format!(
            "import into a browser (password \"{}\"): the admin pair and the CA, for the status page",
            wire::certs::ADMIN_P12_PASSWORD
        ),
        (r, Some(g)) if r.contains('/') => {
            let file = r.rsplit('/').next().unwrap_or(r);
            format!("/etc/ssl/{role}/{file} on every {role} host ({g})")
        }
        (r, Some(g)) => {
            let file = r.rsplit('/').next().unwrap_or(r);
            format!("~/.ssl/{file} of a {role} user ({g})")
        }
        (_, None) => String::new(),
    }
}

/// `dominator make-certs`: writes the certificates and returns the lines to print.
pub fn make_certs(dir: &std::path::Path, hosts: &[String]) -> Result<Vec<String>, CommandError> {
    if dir.join("CA.pem").exists() {
        return Err(CommandError::CaExists(dir.to_path_buf()));
    }
    let written = wire::certs::make_all(dir, hosts).map_err(|source| CommandError::Certs {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut lines = vec![format!(
        "Wrote {} files into {}:",
        written.len(),
        dir.display()
    )];
    for p in &written {
        let rel = p.strip_prefix(dir).unwrap_or(p).display().to_string();
        lines.push(format!("  {rel:<22} -> {}", install_hint(&rel)));
    }
    lines.push(String::new());
    lines.push(
        "Daemons read /etc/ssl/CA.pem and /etc/ssl/<daemon>/{cert,key}.pem by default \
         (override with --ca-file/--cert-file/--key-file); clients use the first \
         ~/.ssl/*.cert with a matching *.key."
            .into(),
    );
    Ok(lines)
}

/// Where a control command sends its RPC.
#[derive(Args, Debug)]
pub struct ControlArgs {
    /// The dominator to control
    #[arg(long, default_value = "localhost:6970", env = "DOMINATOR")]
    pub dominator: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// Sends `Dominator.DisableUpdates` (with `reason`) or `Dominator.EnableUpdates`; returns
/// the line saying what happened.
pub async fn control(target: &ControlArgs, disable: Option<&str>) -> Result<String, CommandError> {
    let client = RpcClient::new(
        &target.dominator,
        wire::client::DOMINATOR_PORT,
        &target.tls.security()?,
        wire::client::DOMINATOR_NAME,
        Some(Duration::from_secs(30)),
    )?;
    match disable {
        Some(reason) => {
            client
                .call::<_, model::api::Empty>(
                    web::DISABLE_UPDATES,
                    &web::DisableUpdatesRequest {
                        reason: reason.to_string(),
                    },
                )
                .await?;
            Ok(format!(
                "updates disabled fleet-wide on {} ({reason:?}); fetches go on; \
                 `dominator enable-updates` allows them again",
                target.dominator
            ))
        }
        None => {
            client
                .call::<_, model::api::Empty>(web::ENABLE_UPDATES, &model::api::Empty {})
                .await?;
            Ok(format!(
                "updates enabled fleet-wide on {}",
                target.dominator
            ))
        }
    }
}

/// The outcome of `dominator plan` for one machine.
pub struct MachinePlan {
    pub host: String,
    /// The preview text, or why there is none.
    pub result: Result<String, PlanError>,
}

/// Computes what an update would do on `host` (or every machine) now: a full poll of each
/// subd and the same diff the herd uses. Nothing is sent to the machines but the poll.
pub async fn plan(fleet: &FleetArgs, host: Option<&str>) -> Result<Vec<MachinePlan>, CommandError> {
    let cfg = fleet.herd_config()?;
    let mdb = mdb::load(&cfg.mdb_path)?;
    let machines: Vec<mdb::Machine> = match host {
        Some(h) => vec![mdb
            .get(h)
            .ok_or_else(|| CommandError::NoMachine {
                host: h.to_string(),
                mdb: cfg.mdb_path.clone(),
            })?
            .clone()],
        None => mdb.machines().cloned().collect(),
    };
    let images = Arc::new(crate::images::ImageCache::new(
        wire::client::ImageServerClient::with_server_name(
            &cfg.image_server,
            &cfg.security,
            &cfg.image_server_name,
        )?,
        Duration::ZERO,
    ));
    let permits = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency));
    let mut set = tokio::task::JoinSet::new();
    for (i, m) in machines.into_iter().enumerate() {
        let (images, permits, cfg) = (images.clone(), permits.clone(), cfg.clone());
        set.spawn(async move {
            let _p = permits.acquire().await;
            let result = plan_one(&m, &images, &cfg).await;
            (
                i,
                MachinePlan {
                    host: m.hostname.clone(),
                    result,
                },
            )
        });
    }
    let mut out: Vec<(usize, MachinePlan)> = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r?);
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

async fn plan_one(
    m: &mdb::Machine,
    images: &crate::images::ImageCache,
    cfg: &HerdConfig,
) -> Result<String, PlanError> {
    if m.required_image.is_empty() {
        return Err(PlanError::NoImage);
    }
    let address = herd::dial_address(m, cfg.subd_port)?;
    let client = herd::subd_client(&address, cfg)?;
    let (poll, _) = herd::poll_counted(&client, &PollRequest::default())
        .await
        .map_err(PlanError::Poll)?;
    let tree = poll.tree.ok_or(PlanError::NotReady)?;
    let cache = poll.object_cache.unwrap_or_default();
    // A stream name plans against its newest image (an unknown name: the cache says why).
    let resolution = crate::streams::Streams::default()
        .resolve_name(images, &m.required_image)
        .await?;
    let name = resolution
        .image(&m.required_image)
        .unwrap_or(&m.required_image)
        .to_string();
    let image = images.get(&name).await?;
    let (excl, hidden, previous, seeded) = (
        poll.exclusions,
        poll.hidden_parents,
        poll.last_image,
        poll.seeded,
    );
    let plan = tokio::task::spawn_blocking(move || {
        let mut plan = planner::compute(&name, &image, &tree, &cache, &excl, &hidden, &seeded);
        planner::attach_hooks(&mut plan, &image, previous.as_deref(), &cache);
        plan
    })
    .await?;
    let mut text = preview::describe(&m.hostname, &plan);
    if let model::stream::Resolution::Stream { latest } = &resolution {
        text.insert_str(
            0,
            &format!(
                "{}: RequiredImage {} is an image stream: its newest image is {latest}\n",
                m.hostname, m.required_image
            ),
        );
    }
    if !plan.is_empty() {
        if m.disable_updates {
            text.push_str("  (not sent: DisableUpdates is set in the MDB)\n");
        } else if plan.unsafe_reason.is_some() && !m.safety_check_disabled() {
            text.push_str("  (not sent: unsafe; set the MDB tag DisableSafetyCheck to allow it)\n");
        }
    }
    Ok(text)
}
