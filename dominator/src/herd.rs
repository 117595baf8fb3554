//! The herd: every machine of the MDB, each driven by its own task.
//!
//! The MDB watcher notices a changed file (device, inode, size or mtime) as soon as its
//! directory reports a change (`mdbwatch`, inotify), or within `mdb_check_interval`, keeps the previous list when the new file does not parse, and
//! starts, updates or stops machine tasks. A machine task loops: take a permit from the
//! fleet-wide `Semaphore`, poll cheaply (`short_only`: status and generation), load the
//! required image from the shared cache, and only when the generation or the wanted
//! images changed take a second, smaller semaphore's permit, poll the whole tree, compute
//! the plan off the executor and drop the tree (memory stays bounded by that semaphore,
//! not by the fleet's size); then ask the pure `decision::next_step` what to do, do it
//! (fetch, update, prefetch, `Subd.Cleanup`), publish the report, and sleep (the poll
//! interval, or a capped exponential back-off after failures) unless the MDB changes.

use crate::decision::{self, Action, Facts, ImageState, PollFailure, Status, Step};
use crate::fleet::{Counters, Fleet, MachineReport};
use crate::images::ImageCache;
use crate::planner;
use crate::streams::{Resolved, Streams};
use disk::clock::unix_now;
use mdb::{Machine, Mdb};
use model::api::{self, methods, PollRequest, PollResponse};
use model::{Image, ObjectId, UpdatePlan};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tracing::Instrument;
use wire::client::{
    ClientError, ClientSecurity, ClientTimeouts, ConnectFailure, RpcClient, SubdClient,
};

/// How the herd runs.
#[derive(Clone, Debug)]
pub struct HerdConfig {
    pub mdb_path: PathBuf,
    /// The imageserver, `HOST:PORT`; also what subds are told to fetch from.
    pub image_server: String,
    /// Port of machines whose MDB address carries none.
    pub subd_port: u16,
    pub security: ClientSecurity,
    /// Common name the imageserver's certificate must carry.
    pub image_server_name: String,
    /// Common name every subd's certificate must carry (one shared subd certificate).
    pub subd_name: String,
    /// Machines worked on at once.
    pub concurrency: usize,
    /// Machines whose tree is fetched, decoded and diffed at once (the memory bound:
    /// every other machine holds only its plan and generation).
    pub full_poll_concurrency: usize,
    /// Pause between two polls of a healthy machine.
    pub poll_interval: Duration,
    /// First retry delay after a failure; doubles up to `backoff_cap`.
    pub backoff_base: Duration,
    /// Longest retry delay (10 s: a machine back up is seen within seconds, and a dead one
    /// costs one connection attempt per 10 s).
    pub backoff_cap: Duration,
    /// How often the MDB file is checked for changes.
    pub mdb_check_interval: Duration,
    /// Timeout of one RPC to a subd.
    pub rpc_timeout: Duration,
    /// How long opening a connection to a subd may take before the machine shows
    /// `connect timeout`.
    pub connect_timeout: Duration,
}

impl HerdConfig {
    pub fn new(mdb_path: PathBuf, image_server: String, security: ClientSecurity) -> Self {
        HerdConfig {
            mdb_path,
            image_server,
            subd_port: wire::client::SUBD_PORT,
            security,
            image_server_name: wire::client::IMAGESERVER_NAME.into(),
            subd_name: wire::client::SUBD_NAME.into(),
            concurrency: 200,
            full_poll_concurrency: 16,
            poll_interval: Duration::from_secs(1),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(10),
            mdb_check_interval: Duration::from_millis(250),
            rpc_timeout: Duration::from_secs(300),
            connect_timeout: wire::client::CONNECT_TIMEOUT,
        }
    }
}

/// What every machine task shares.
struct Ctx {
    cfg: HerdConfig,
    fleet: Arc<Fleet>,
    images: ImageCache,
    /// The one HTTP client (pool, TLS configuration) every machine's subd client shares.
    subd_rpc: RpcClient,
    permits: Semaphore,
    full_permits: Semaphore,
    /// What the MDB's image names stand for (image streams).
    streams: Streams,
    /// The image names the MDB uses (kept in the image cache with the streams' images).
    mdb_images: std::sync::Mutex<HashSet<String>>,
}

/// The address to dial for `m`, always with a port: `HOST:PORT` or `[V6]:PORT`, rebuilt
/// from the parsed MDB address, so an MDB string is never passed on as a URL.
pub fn dial_address(m: &Machine, default_port: u16) -> Result<String, mdb::BadAddress> {
    Ok(mdb::Address::parse(m.address())?.dial(default_port))
}

/// A subd client for `address`, with the herd's TLS settings and timeouts.
pub fn subd_client(address: &str, cfg: &HerdConfig) -> Result<SubdClient, ClientError> {
    Ok(SubdClient {
        rpc: RpcClient::with_timeouts(
            address,
            cfg.subd_port,
            &cfg.security,
            &cfg.subd_name,
            subd_timeouts(cfg),
        )?,
    })
}

/// The timeouts of calls to subds.
fn subd_timeouts(cfg: &HerdConfig) -> ClientTimeouts {
    ClientTimeouts {
        connect: cfg.connect_timeout,
        call: Some(cfg.rpc_timeout),
    }
}

/// Polls and also returns the reply's size in bytes (what a poll costs on the wire).
/// A large reply (a tree) is decoded off the executor.
pub async fn poll_counted(
    client: &SubdClient,
    req: &PollRequest,
) -> Result<(PollResponse, u64), PollFailure> {
    let body = serde_json::to_vec(req).map_err(|e| unreachable(e.to_string()))?;
    let resp = client
        .rpc
        .call_raw(methods::SUBD_POLL, body.into(), "application/json")
        .await
        .map_err(|e| classify_poll_error(&e))?;
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| unreachable(format!("reading poll reply: {e}")))?;
    let n = bytes.len() as u64;
    let parsed = if n > 64 * 1024 {
        tokio::task::spawn_blocking(move || serde_json::from_slice::<PollResponse>(&bytes))
            .await
            .map_err(|e| unreachable(e.to_string()))?
    } else {
        serde_json::from_slice(&bytes)
    };
    parsed
        .map(|p| (p, n))
        .map_err(|e| unreachable(format!("bad poll reply: {e}")))
}

fn unreachable(message: String) -> PollFailure {
    PollFailure {
        status: Status::Unreachable,
        message,
    }
}

/// Names why a poll failed, from the client error's type: `poll denied` (HTTP 403: the
/// subd does not grant our certificate `Subd.Poll`), `not a subd` (404: the address
/// answers but has no `Subd.Poll`), `subd busy` (503: it is serving as many full polls as
/// it allows; retried), `connection refused`, `DNS error`, `connect timeout`, else
/// `unreachable`.
pub fn classify_poll_error(e: &ClientError) -> PollFailure {
    let status = match e {
        ClientError::Status { status: 403, .. } => Status::PollDenied,
        // Reached, but it has no Subd.Poll: the MDB's address is some other server.
        ClientError::Status { status: 404, .. } => Status::NotASubd,
        ClientError::Status { status: 503, .. } => Status::SubdBusy,
        ClientError::Connect { kind, .. } => match kind {
            ConnectFailure::Refused => Status::ConnectionRefused,
            ConnectFailure::Dns => Status::DnsError,
            ConnectFailure::Timeout => Status::ConnectTimeout,
            ConnectFailure::Tls
            | ConnectFailure::Unreachable
            | ConnectFailure::Denied
            | ConnectFailure::Other => Status::Unreachable,
        },
        _ => Status::Unreachable,
    };
    PollFailure {
        status,
        message: e.to_string(),
    }
}

/// Why the MDB was not loaded (the previous list is kept).
#[derive(Debug, thiserror::Error)]
pub enum MdbLoadError {
    #[error(transparent)]
    Store(#[from] mdb::StoreError),
    #[error(transparent)]
    Join(#[from] tokio::task::JoinError),
}

/// File identity the watcher compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

fn stamp(path: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
    })
}

struct Task {
    record: watch::Sender<Machine>,
    handle: tokio::task::JoinHandle<()>,
}

/// Runs the herd until `shutdown` becomes true.
pub async fn run(cfg: HerdConfig, fleet: Arc<Fleet>, mut shutdown: watch::Receiver<bool>) {
    let images = match wire::client::ImageServerClient::with_server_name(
        &cfg.image_server,
        &cfg.security,
        &cfg.image_server_name,
    ) {
        Ok(c) => ImageCache::new(c, Duration::from_secs(1)),
        Err(e) => {
            tracing::error!("imageserver client: {e}");
            return;
        }
    };
    let subd_rpc = match RpcClient::with_timeouts(
        "localhost",
        wire::client::SUBD_PORT,
        &cfg.security,
        &cfg.subd_name,
        subd_timeouts(&cfg),
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("subd client: {e}");
            return;
        }
    };
    let ctx = Arc::new(Ctx {
        subd_rpc,
        permits: Semaphore::new(cfg.concurrency.max(1)),
        full_permits: Semaphore::new(cfg.full_poll_concurrency.max(1)),
        cfg,
        fleet,
        images,
        streams: Streams::default(),
        mdb_images: Default::default(),
    });
    let watcher = tokio::spawn(watch_streams(ctx.clone()));
    let mut tasks: BTreeMap<String, Task> = BTreeMap::new();
    // The file identity last acted on (`Some(None)`: last seen missing); `None` before the
    // first look. A change (appearing, vanishing, any edit) is loaded once; a failure is
    // logged once and the previous list kept.
    let mut seen: Option<Option<FileStamp>> = None;
    let dir_watch = match crate::mdbwatch::DirWatch::new(&ctx.cfg.mdb_path) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(
                "cannot watch the MDB's directory ({e}); checking it every {:?}",
                ctx.cfg.mdb_check_interval
            );
            None
        }
    };
    loop {
        let st = stamp(&ctx.cfg.mdb_path);
        if seen != Some(st) {
            seen = Some(st);
            match load_mdb(&ctx.cfg.mdb_path).await {
                Ok(mdb) => {
                    Counters::add(&ctx.fleet.counters.mdb_loads, 1);
                    *ctx.fleet.mdb_error.lock().expect("fleet lock") = None;
                    reconcile(&ctx, &mut tasks, &mdb);
                }
                Err(e) => {
                    tracing::error!("MDB not loaded, keeping the previous list: {e}");
                    Counters::add(&ctx.fleet.counters.mdb_errors, 1);
                    *ctx.fleet.mdb_error.lock().expect("fleet lock") = Some(e.to_string());
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(ctx.cfg.mdb_check_interval) => {}
            Ok(()) = watched(dir_watch.as_ref()) => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
    }
    watcher.abort();
    for (_, t) in tasks {
        t.handle.abort();
    }
}

/// Resolves when the MDB's directory changed; never without a watch.
async fn watched(w: Option<&crate::mdbwatch::DirWatch>) -> std::io::Result<()> {
    match w {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// Re-resolves the MDB's image names once per poll interval (and at once when it names a
/// new one); when a resolution changes, drops the images no name stands for any more.
async fn watch_streams(ctx: Arc<Ctx>) {
    loop {
        if ctx.streams.refresh(&ctx.images).await {
            retain_images(&ctx);
        }
        ctx.streams.wait(ctx.cfg.poll_interval).await;
    }
}

/// Keeps in the image cache only the images the MDB names and the streams stand for.
fn retain_images(ctx: &Ctx) {
    let mut wanted = ctx.mdb_images.lock().expect("herd lock").clone();
    wanted.extend(ctx.streams.images());
    ctx.images.retain(&wanted);
}

async fn load_mdb(path: &std::path::Path) -> Result<Mdb, MdbLoadError> {
    let path = path.to_path_buf();
    Ok(tokio::task::spawn_blocking(move || mdb::load(&path)).await??)
}

/// Starts tasks for new machines, hands changed records to their tasks, stops tasks of
/// machines no longer listed (nothing is done to those machines).
fn reconcile(ctx: &Arc<Ctx>, tasks: &mut BTreeMap<String, Task>, mdb: &Mdb) {
    let wanted: BTreeMap<String, &Machine> =
        mdb.machines().map(|m| (m.hostname.clone(), m)).collect();
    tasks.retain(|host, t| {
        if wanted.contains_key(host) {
            return true;
        }
        tracing::info!(host, "machine left the MDB");
        t.handle.abort();
        let mut machines = ctx.fleet.machines.lock().expect("fleet lock");
        if let Some(r) = machines.remove(host) {
            ctx.fleet.tally_moved(Some(r.status), None);
        }
        false
    });
    for (host, m) in &wanted {
        match tasks.get(host) {
            Some(t) => {
                t.record.send_if_modified(|old| {
                    if old != *m {
                        *old = (*m).clone();
                        true
                    } else {
                        false
                    }
                });
            }
            None => {
                let (tx, rx) = watch::channel((*m).clone());
                let report = MachineReport::new(host);
                let mut machines = ctx.fleet.machines.lock().expect("fleet lock");
                ctx.fleet.tally_moved(None, Some(report.status));
                machines.insert(host.clone(), report);
                drop(machines);
                let handle = tokio::spawn(machine_loop(ctx.clone(), rx));
                tasks.insert(host.clone(), Task { record: tx, handle });
            }
        }
    }
    ctx.fleet
        .history
        .lock()
        .expect("history lock")
        .retain_hosts(|h| wanted.contains_key(h));
    let images: HashSet<String> = mdb
        .machines()
        .flat_map(|m| [m.required_image.clone(), m.planned_image.clone()])
        .filter(|s| !s.is_empty())
        .collect();
    ctx.streams.set_names(images.iter().cloned().collect());
    *ctx.mdb_images.lock().expect("herd lock") = images.clone();
    retain_images(ctx);
    tracing::info!(machines = wanted.len(), images = images.len(), "MDB loaded");
}

/// What a machine task remembers between cycles. No tree is kept: a machine's tree is
/// decoded, diffed and dropped within one cycle (under a `full_permits` permit), and the
/// plan is kept with the generation it was computed from. While the generation and the
/// MDB record stay the same, polls are cheap (`short_only`) and the plan is reused.
#[derive(Default)]
struct MachineState {
    client: Option<(String, SubdClient)>,
    start_time: u64,
    /// Generation of the tree the plans were computed from (0 = none yet).
    generation: u64,
    /// The object cache the subd reported with that tree.
    cache: Arc<Vec<ObjectId>>,
    plan: Option<Arc<UpdatePlan>>,
    /// (required image, generation) of `plan`.
    plan_key: Option<(String, u64)>,
    planned_missing: Vec<ObjectId>,
    /// (planned image, generation) of `planned_missing`.
    planned_key: Option<(String, u64)>,
    prefetched: Option<(String, u64)>,
    /// Cache objects no wanted image needs, for (required, planned, generation).
    unneeded: Vec<ObjectId>,
    unneeded_key: Option<(String, String, u64)>,
    /// The generation at which `Subd.Cleanup` was last sent.
    cleaned: Option<u64>,
    last_action: Option<Action>,
    failures: u32,
    /// The failing status `failures` counts (a new kind of failure starts over).
    failure_status: Option<Status>,
    /// `state_diverged` of the last plan computed.
    state_diverged: u64,
    /// Unix seconds the last update was sent (its duration, once it reports finished).
    update_sent_at: Option<u64>,
    /// The subd's scan count at the last poll.
    scan_count: u64,
}

async fn machine_loop(ctx: Arc<Ctx>, mut rx: watch::Receiver<Machine>) {
    let mut st = MachineState::default();
    let mut streams = ctx.streams.subscribe();
    loop {
        let m = rx.borrow_and_update().clone();
        let resolved = ctx.streams.resolve(&m);
        let delay = {
            let Ok(_permit) = ctx.permits.acquire().await else {
                return;
            };
            let span = tracing::info_span!("machine", host = %m.hostname);
            cycle(&ctx, &m, &resolved, &mut st).instrument(span).await
        };
        // Sleep until the delay ends, the record changes, a stream it follows moves, or
        // the scan the last action awaits is done (a held poll; no permit is taken).
        let until = tokio::time::Instant::now() + delay;
        let confirmed = scan_done(&ctx, &st, until);
        tokio::pin!(confirmed);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                () = &mut confirmed => break,
                r = rx.changed() => if r.is_err() { return } else { break },
                r = streams.changed() => {
                    if r.is_err() || ctx.streams.resolve(&m) != resolved {
                        break;
                    }
                }
            }
        }
    }
}

/// Returns once the subd has done the scan the last action awaits, asked with a poll it
/// holds until then (or until `until`); never returns when no scan is awaited (or the last
/// poll already saw it done), the poll fails, or the subd answered without reaching it (one
/// that predates held polls), so the caller's sleep decides.
async fn scan_done(ctx: &Ctx, st: &MachineState, until: tokio::time::Instant) {
    let target = decision::awaited_scan(st.last_action.as_ref());
    // Only while the last poll had not reached it: then the next cycle settles the action.
    let (Some(target), Some((_, client))) =
        (target.filter(|t| st.scan_count < *t), st.client.as_ref())
    else {
        return std::future::pending().await;
    };
    let wait_ms = until
        .saturating_duration_since(tokio::time::Instant::now())
        .as_millis() as u64;
    let req = PollRequest {
        have_generation: st.generation,
        short_only: true,
        wait_for_scan: target,
        wait_ms,
    };
    Counters::add(&ctx.fleet.counters.polls, 1);
    match poll_counted(client, &req).await {
        Ok((p, n)) if p.scan_count >= target => Counters::add(&ctx.fleet.counters.poll_bytes, n),
        _ => std::future::pending().await,
    }
}

/// Whether the planned image's missing objects must be (re)computed from a tree.
fn planned_wanted(m: &Machine, st: &MachineState, generation: u64) -> bool {
    !m.planned_image.is_empty()
        && m.planned_image != m.required_image
        && st.plan.as_ref().is_some_and(|p| p.is_empty())
        && st.planned_key.as_ref() != Some(&(m.planned_image.clone(), generation))
}

/// Full poll, plan and planned image's missing objects, all from one tree that is dropped
/// before returning. Holds a `full_permits` permit throughout, so only a few trees are
/// in memory at once however large the fleet.
async fn refresh_from_tree(
    ctx: &Ctx,
    client: &SubdClient,
    m: &Machine,
    image: &Arc<Image>,
    st: &mut MachineState,
) -> Result<(PollResponse, u64), PollFailure> {
    let Ok(_full) = ctx.full_permits.acquire().await else {
        return Err(unreachable("shutting down".into()));
    };
    let (mut p, n) = poll_counted(client, &PollRequest::default()).await?;
    Counters::add(&ctx.fleet.counters.full_polls, 1);
    let Some(tree) = p.tree.take() else {
        return Ok((p, n)); // no scan finished yet
    };
    let cache = Arc::new(p.object_cache.take().unwrap_or_default());
    let excl = std::mem::take(&mut p.exclusions);
    let hidden = std::mem::take(&mut p.hidden_parents);
    let seeded = p.seeded.clone();
    let planned = if !m.planned_image.is_empty() && m.planned_image != m.required_image {
        ctx.images.get(&m.planned_image).await.ok()
    } else {
        None
    };
    let (img, name, c) = (image.clone(), m.required_image.clone(), cache.clone());
    let previous = p.last_image.clone();
    let computed = tokio::task::spawn_blocking(move || {
        let mut plan = planner::compute(&name, &img, &tree, &c, &excl, &hidden, &seeded);
        planner::attach_hooks(&mut plan, &img, previous.as_deref(), &c);
        let missing = planned
            .filter(|_| plan.is_empty())
            .map(|pi| planner::missing_objects(&pi, &tree, &c));
        drop(tree);
        (plan, missing, excl)
    })
    .await;
    match computed {
        Ok((plan, missing, excl)) => {
            p.exclusions = excl;
            st.generation = p.generation;
            st.cache = cache;
            st.state_diverged = plan.state_diverged;
            st.plan = Some(Arc::new(plan));
            st.plan_key = Some((m.required_image.clone(), p.generation));
            match missing {
                Some(missing) => {
                    st.planned_missing = missing;
                    st.planned_key = Some((m.planned_image.clone(), p.generation));
                }
                None => {
                    st.planned_missing.clear();
                    st.planned_key = None;
                }
            }
        }
        Err(e) => tracing::error!("computing plan: {e}"),
    }
    Ok((p, n))
}

/// What one cycle observed of a machine.
struct Observation {
    /// The poll: the short one, or the full one when the plan was refreshed.
    poll: Result<PollResponse, PollFailure>,
    /// Bytes the cycle's polls cost on the wire.
    poll_bytes: u64,
    /// The required image, when it is loaded.
    image: Option<Arc<Image>>,
    image_state: ImageState,
}

/// What acting on a step came to.
struct Outcome {
    status: Status,
    error: Option<String>,
    /// In sync now.
    synced: bool,
}

/// One round for one machine, observe → decide → act → publish; returns how long to wait
/// before the next. `record` is the MDB's; the cycle acts on `resolved.machine`, whose
/// image names are the images its streams stand for.
async fn cycle(
    ctx: &Ctx,
    record: &Machine,
    resolved: &Resolved,
    st: &mut MachineState,
) -> Duration {
    let m = &resolved.machine;
    let Some((address, client)) = machine_client(ctx, m, st) else {
        return ctx.cfg.backoff_cap;
    };
    let seen = observe(ctx, m, st, &client).await;
    let step = decide(ctx, m, st, &seen);
    let scan_count = seen.poll.as_ref().map_or(0, |p| p.scan_count);
    let outcome = act(ctx, m, st, &client, step, scan_count).await;
    count_failures(st, &outcome);
    let status = outcome.status;
    publish(ctx, record, resolved, st, address, &seen, outcome);
    next_delay(&ctx.cfg, st, status)
}

/// The machine's address and client (a new address starts over: no tree, no plan);
/// `None`, with the error published, when its MDB address is invalid.
fn machine_client(ctx: &Ctx, m: &Machine, st: &mut MachineState) -> Option<(String, SubdClient)> {
    let cfg = &ctx.cfg;
    let address = match dial_address(m, cfg.subd_port) {
        Ok(a) => a,
        Err(e) => {
            // `mdb::load` refuses such a record; this guards every other way in.
            tracing::error!("not dialling an invalid address: {e}");
            let mut machines = ctx.fleet.machines.lock().expect("fleet lock");
            if let Some(r) = machines.get_mut(&m.hostname) {
                r.last_error = Some(format!("invalid address: {e}"));
            }
            return None;
        }
    };
    if st.client.as_ref().map(|(a, _)| a) != Some(&address) {
        let rpc = ctx.subd_rpc.for_address(&address, cfg.subd_port);
        st.client = Some((address.clone(), SubdClient { rpc }));
        st.generation = 0;
        st.plan = None;
        st.plan_key = None;
    }
    let client = st.client.as_ref().expect("client set").1.clone();
    Some((address, client))
}

/// Observe: a cheap poll, the required image, a full poll and a new plan only when they
/// are stale, then the cache objects no wanted image needs.
async fn observe(
    ctx: &Ctx,
    m: &Machine,
    st: &mut MachineState,
    client: &SubdClient,
) -> Observation {
    let (poll, poll_bytes) = poll_short(ctx, st, client).await;
    let (image, image_state) = required_image(ctx, m).await;
    let mut seen = Observation {
        poll,
        poll_bytes,
        image,
        image_state,
    };
    refresh_stale_plan(ctx, m, st, client, &mut seen).await;
    forget_stale_plans(m, st, seen.image.is_some());
    find_unneeded_cache(ctx, m, st, seen.image.as_ref()).await;
    seen
}

/// The cheap poll (status and generation, never the tree) and its size; a changed start
/// time means the subd restarted, so what was sent to it is forgotten.
async fn poll_short(
    ctx: &Ctx,
    st: &mut MachineState,
    client: &SubdClient,
) -> (Result<PollResponse, PollFailure>, u64) {
    let counters = &ctx.fleet.counters;
    Counters::add(&counters.polls, 1);
    let req = PollRequest {
        have_generation: st.generation,
        short_only: true,
        ..Default::default()
    };
    match poll_counted(client, &req).await {
        Ok((mut p, n)) => {
            Counters::add(&counters.poll_bytes, n);
            p.tree = None; // asked short_only; never keep a tree here
            p.object_cache = None;
            if st.start_time != 0 && p.start_time != st.start_time {
                tracing::info!("subd restarted");
                forget_machine_state(st);
            }
            st.start_time = p.start_time;
            st.scan_count = p.scan_count;
            (Ok(p), n)
        }
        Err(e) => {
            Counters::add(&counters.poll_failures, 1);
            // A machine that could not be polled may come back as a new subd started
            // within the same second (same start time) whose generations count again
            // from 1: its tree is read afresh, never taken for the old one.
            if e.status != Status::SubdBusy {
                forget_machine_state(st);
            }
            (Err(e), 0)
        }
    }
}

/// Forgets what was known of a subd that restarted (or may have): its generation, the
/// plans computed from its tree, and what was sent to it.
fn forget_machine_state(st: &mut MachineState) {
    st.last_action = None;
    st.generation = 0;
    st.plan = None;
    st.plan_key = None;
    st.planned_key = None;
}

/// The required image from the fleet-wide cache, loaded whether or not the machine
/// answered: a machine that comes back, or its replacement pointed at by an MDB edit,
/// finds it ready. Down machines cannot hammer the imageserver with it: the cache loads
/// each image once for the whole fleet and retries a missing one at most once per retry
/// period.
async fn required_image(ctx: &Ctx, m: &Machine) -> (Option<Arc<Image>>, ImageState) {
    if m.required_image.is_empty() {
        return (None, ImageState::Undefined);
    }
    match ctx.images.get(&m.required_image).await {
        Ok(i) => (Some(i), ImageState::Ready),
        Err(e) => (None, ImageState::NotReady(e.to_string())),
    }
}

/// A full poll and a new plan, only when the tree or the wanted images changed (or the
/// plan was dropped after acting on it) and the decision will look at it.
async fn refresh_stale_plan(
    ctx: &Ctx,
    m: &Machine,
    st: &mut MachineState,
    client: &SubdClient,
    seen: &mut Observation,
) {
    let (Some(img), Ok(p)) = (seen.image.clone(), &seen.poll) else {
        return;
    };
    let gen = p.generation;
    let stale = st.plan.is_none() || st.plan_key.as_ref() != Some(&(m.required_image.clone(), gen));
    let wanted = decision::needs_plan(p, st.last_action.as_ref());
    if !(wanted && (stale || planned_wanted(m, st, gen))) {
        return;
    }
    let counters = &ctx.fleet.counters;
    match refresh_from_tree(ctx, client, m, &img, st).await {
        Ok((full, n)) => {
            Counters::add(&counters.poll_bytes, n);
            seen.poll_bytes += n;
            seen.poll = Ok(full);
        }
        Err(e) => {
            Counters::add(&counters.poll_failures, 1);
            seen.poll = Err(e);
        }
    }
}

/// Drops a plan that is not for the required image (or has no image to be for), and the
/// planned image's missing objects when there is no other planned image.
fn forget_stale_plans(m: &Machine, st: &mut MachineState, have_image: bool) {
    if !have_image || st.plan_key.as_ref().map(|k| &k.0) != Some(&m.required_image) {
        st.plan = None;
        st.plan_key = None;
    }
    if m.planned_image.is_empty() || m.planned_image == m.required_image {
        st.planned_missing.clear();
        st.planned_key = None;
    }
}

/// Cache objects neither wanted image needs (worth knowing only when in sync), computed
/// once per (required, planned, generation).
async fn find_unneeded_cache(
    ctx: &Ctx,
    m: &Machine,
    st: &mut MachineState,
    image: Option<&Arc<Image>>,
) {
    let synced_now = st.plan.as_ref().is_some_and(|p| p.is_empty());
    if !synced_now || st.cache.is_empty() {
        st.unneeded.clear();
        st.unneeded_key = None;
        return;
    }
    let key = (
        m.required_image.clone(),
        m.planned_image.clone(),
        st.generation,
    );
    if st.unneeded_key.as_ref() == Some(&key) {
        return;
    }
    let planned = if m.planned_image.is_empty() {
        None
    } else {
        // Unknown planned image: keep everything rather than delete its objects.
        match ctx.images.cached(&m.planned_image) {
            Some(p) => Some(p),
            None => return,
        }
    };
    let wanted: Vec<Arc<Image>> = image.cloned().into_iter().chain(planned).collect();
    let cache = st.cache.clone();
    if let Ok(u) =
        tokio::task::spawn_blocking(move || planner::unneeded_cache(&cache, &wanted)).await
    {
        st.unneeded = u;
        st.unneeded_key = Some(key);
    }
}

/// Decide: the facts of this cycle, handed to the pure `decision::next_step`.
fn decide(ctx: &Ctx, m: &Machine, st: &MachineState, seen: &Observation) -> Step {
    let disabled_reason = if m.disable_updates {
        Some("DisableUpdates is set in the MDB".to_string())
    } else {
        ctx.fleet
            .global_disable()
            .map(|g| format!("updates disabled fleet-wide: {}", g.reason))
    };
    decision::next_step(&Facts {
        poll: seen.poll.as_ref(),
        required_image: &m.required_image,
        image: seen.image_state.clone(),
        plan: st.plan.as_deref(),
        updates_disabled: disabled_reason.as_deref(),
        safety_check_disabled: m.safety_check_disabled(),
        last_action: st.last_action.as_ref(),
        planned_missing: &st.planned_missing,
        unneeded_cache: &st.unneeded,
    })
}

/// Act: carries `step` out (fetch, update, or the synced machine's prefetch and cleanup).
async fn act(
    ctx: &Ctx,
    m: &Machine,
    st: &mut MachineState,
    client: &SubdClient,
    step: Step,
    scan_count: u64,
) -> Outcome {
    match step {
        Step::Wait {
            status,
            error,
            settled,
        } => {
            if settled {
                st.last_action = None;
            }
            Outcome {
                status,
                error,
                synced: false,
            }
        }
        Step::Fetch { hashes } => send_fetch(ctx, m, st, client, hashes, scan_count).await,
        Step::Update => send_update(ctx, m, st, client, scan_count).await,
        Step::Synced { prefetch, cleanup } => {
            st.last_action = None;
            send_prefetch(ctx, m, st, client, prefetch).await;
            send_cleanup(ctx, st, client, cleanup).await;
            Outcome {
                status: Status::Synced,
                error: None,
                synced: true,
            }
        }
    }
}

/// The most objects a Fetch names with their final metadata (about 200 bytes each in
/// JSON beside the hash's 131: far inside subd's 128 MiB request limit).
const FINAL_METADATA_MAX: usize = 100_000;

/// Asks the subd to fetch the required image's missing objects.
async fn send_fetch(
    ctx: &Ctx,
    m: &Machine,
    st: &mut MachineState,
    client: &SubdClient,
    hashes: Vec<ObjectId>,
    scan_count: u64,
) -> Outcome {
    Counters::add(&ctx.fleet.counters.fetches, 1);
    // The last uses' metadata, for subd to give the objects as it stores them: a hint, left
    // out of very large fetches, whose requests it would more than double.
    let final_metadata = match st.plan.as_ref() {
        Some(p) if hashes.len() <= FINAL_METADATA_MAX => p.final_metadata(),
        _ => Vec::new(),
    };
    let req = api::FetchRequest {
        server: ctx.cfg.image_server.clone(),
        hashes,
        wait: false,
        final_metadata,
    };
    let (status, error) = match client.fetch(&req).await {
        Ok(accepted) => {
            tracing::info!(objects = req.hashes.len(), "fetch sent");
            // Acted on: the next plan comes from the tree that shows the fetch.
            st.plan = None;
            st.last_action = Some(Action::Fetch {
                image: m.required_image.clone(),
                // subd's count when it accepted the fetch; from an older subd, the poll's.
                scan_count: accepted.scan_count.unwrap_or(scan_count),
            });
            (Status::Fetching, None)
        }
        Err(e) => (Status::FetchFailed, Some(e.to_string())),
    };
    Outcome {
        status,
        error,
        synced: false,
    }
}

/// Sends the plan (without its unsafe reason when the MDB tag `DisableSafetyCheck` lifts
/// the safety check).
async fn send_update(
    ctx: &Ctx,
    m: &Machine,
    st: &mut MachineState,
    client: &SubdClient,
    scan_count: u64,
) -> Outcome {
    Counters::add(&ctx.fleet.counters.updates, 1);
    let mut plan = (**st.plan.as_ref().expect("update needs a plan")).clone();
    if m.safety_check_disabled() {
        // The decision sends an unsafe plan only under the MDB tag
        // DisableSafetyCheck; subd refuses any plan still carrying a reason.
        plan.unsafe_reason = None;
    }
    let req = api::UpdateRequest { plan, wait: false };
    let (status, error) = match client.update(&req).await {
        Ok(accepted) => {
            tracing::info!(image = %m.required_image, "update sent");
            let now = unix_now();
            st.update_sent_at = Some(now);
            ctx.fleet.history.lock().expect("history lock").update_sent(
                now,
                &m.hostname,
                &req.plan,
            );
            // Acted on: the next plan comes from a scan after the update.
            st.plan = None;
            st.last_action = Some(Action::Update {
                image: m.required_image.clone(),
                // subd's count when it accepted the update (later scans started after it
                // ended); an older subd's poll count, plus one for a pass that may have
                // overlapped the update.
                scan_count: accepted.scan_count.unwrap_or(scan_count + 1),
            });
            (Status::Updating, None)
        }
        Err(e) => (Status::UpdateFailed, Some(e.to_string())),
    };
    Outcome {
        status,
        error,
        synced: false,
    }
}

/// Asks a synced machine to fetch the planned image's objects, once per (planned image,
/// generation).
async fn send_prefetch(
    ctx: &Ctx,
    m: &Machine,
    st: &mut MachineState,
    client: &SubdClient,
    prefetch: Vec<ObjectId>,
) {
    let key = (m.planned_image.clone(), st.generation);
    if prefetch.is_empty() || st.prefetched.as_ref() == Some(&key) {
        return;
    }
    let req = api::FetchRequest {
        server: ctx.cfg.image_server.clone(),
        hashes: prefetch,
        wait: false,
        ..Default::default()
    };
    match client.fetch(&req).await {
        Ok(_) => {
            tracing::info!(image = %m.planned_image, objects = req.hashes.len(), "prefetch sent");
            st.prefetched = Some(key);
        }
        Err(e) => tracing::warn!("prefetch of {}: {e}", m.planned_image),
    }
}

/// Asks a synced machine to remove cache objects no wanted image needs.
async fn send_cleanup(
    ctx: &Ctx,
    st: &mut MachineState,
    client: &SubdClient,
    cleanup: Vec<ObjectId>,
) {
    if cleanup.is_empty() || st.cleaned == Some(st.generation) {
        return;
    }
    // Once per generation, whatever the outcome: a subd that refuses it is not asked
    // again every poll.
    st.cleaned = Some(st.generation);
    Counters::add(&ctx.fleet.counters.cleanups, 1);
    match client.cleanup(&cleanup).await {
        Ok(()) => tracing::info!(objects = cleanup.len(), "cleanup sent"),
        Err(e) => tracing::warn!("cleanup: {e}"),
    }
}

/// Counts consecutive failures of one kind (a new kind starts over; a success that is not
/// work in progress resets the count) and logs a failure's error.
fn count_failures(st: &mut MachineState, outcome: &Outcome) {
    let status = outcome.status;
    if status.backs_off() {
        if st.failure_status != Some(status) {
            st.failures = 0;
            st.failure_status = Some(status);
        }
        st.failures = st.failures.saturating_add(1);
    } else if !status.in_progress() {
        st.failures = 0;
        st.failure_status = None;
    }
    if let Some(e) = &outcome.error {
        if status.backs_off() {
            tracing::warn!(status = status.name(), "{e}");
        }
    }
}

/// Publish: the machine's report, as the status pages and API show it.
fn publish(
    ctx: &Ctx,
    m: &Machine,
    resolved: &Resolved,
    st: &MachineState,
    address: String,
    seen: &Observation,
    outcome: Outcome,
) {
    let now = unix_now();
    let mut machines = ctx.fleet.machines.lock().expect("fleet lock");
    let Some(r) = machines.get_mut(&m.hostname) else {
        return;
    };
    r.address = address;
    r.required_image = m.required_image.clone();
    r.planned_image = m.planned_image.clone();
    r.resolved_required_image = resolved.required.clone();
    r.resolved_planned_image = resolved.planned.clone();
    let previous = r.status;
    r.status = outcome.status;
    if previous != r.status {
        ctx.fleet.tally_moved(Some(previous), Some(r.status));
    }
    r.status_name = outcome.status.name();
    r.last_error =
        decision::shown_error(previous, outcome.status, outcome.error, r.last_error.take());
    if outcome.synced {
        r.last_synced = Some(now);
    }
    r.consecutive_failures = st.failures;
    r.last_plan = st.plan.clone();
    if let Some(p) = &st.plan {
        r.pending_changes = crate::history::plan_size(p);
    } else if outcome.synced {
        r.pending_changes = 0;
    }
    r.state_diverged = st.state_diverged;
    r.last_poll_bytes = seen.poll_bytes;
    let mut finished = None;
    if let Ok(p) = &seen.poll {
        r.last_poll = Some(now);
        r.polls += 1;
        r.generation = p.generation;
        r.scan_count = p.scan_count;
        if let Some(u) = &p.last_update {
            let new = r.last_update.as_ref().is_none_or(|old| {
                (old.finished_at, &old.image_name) != (u.finished_at, &u.image_name)
            });
            // The first poll after a restart of the dominator reports an old update.
            if new && (st.update_sent_at.is_some() || r.polls > 1) {
                finished = Some(u.clone());
            }
            r.last_update = Some(u.clone());
        }
    }
    record_history(ctx, &machines, m, st, previous, finished, now);
}

/// Adds what `publish` saw change to the history: a status change (with a sample of the
/// fleet's counts) and an update the machine reported finished.
fn record_history(
    ctx: &Ctx,
    machines: &BTreeMap<String, MachineReport>,
    m: &Machine,
    st: &MachineState,
    previous: Status,
    finished: Option<api::UpdateResult>,
    now: u64,
) {
    let Some(r) = machines.get(&m.hostname) else {
        return;
    };
    let changed = previous != r.status;
    if !changed && finished.is_none() {
        return;
    }
    // The tally, not a walk over every machine: at 10,000 machines each status change
    // walking the fleet was O(N) under the fleet lock, O(N²) per rollout.
    let counts = changed.then(|| ctx.fleet.tallied());
    // Every test run checks the tally against the walk it replaces.
    debug_assert!(counts
        .as_ref()
        .is_none_or(|c| *c == crate::fleet::status_counts(machines)));
    let mut h = ctx.fleet.history.lock().expect("history lock");
    if let Some(u) = &finished {
        let took = st.update_sent_at.map(|t| u.finished_at.saturating_sub(t));
        h.update_finished(&m.hostname, u, took);
    }
    if let Some(counts) = counts {
        h.status_changed(
            now,
            &m.hostname,
            previous,
            r.status,
            r.last_error.as_deref(),
        );
        h.sample(now, &counts);
    }
}

/// The pause before the next cycle: the back-off after a failure, else the poll interval.
fn next_delay(cfg: &HerdConfig, st: &MachineState, status: Status) -> Duration {
    if status.backs_off() {
        decision::backoff(st.failures, cfg.backoff_base, cfg.backoff_cap)
    } else {
        cfg.poll_interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_address_never_passes_a_url_on() {
        let mut m = Machine::new("web1");
        assert_eq!(dial_address(&m, 6969).unwrap(), "web1:6969");
        m.ip_address = Some("::1".into());
        assert_eq!(dial_address(&m, 6969).unwrap(), "[::1]:6969");
        for bad in ["https://h:1/rpc/X?", "http://h", "../etc", "a:b:c"] {
            m.ip_address = Some(bad.into());
            assert!(dial_address(&m, 6969).is_err(), "{bad}");
            m.ip_address = None;
            m.hostname = bad.into();
            assert!(dial_address(&m, 6969).is_err(), "{bad}");
        }
    }

    #[test]
    fn poll_errors_are_named() {
        let connect = |kind| ClientError::Connect {
            addr: "https://h:1".into(),
            kind,
            message: "why".into(),
        };
        let cases = [
            (connect(ConnectFailure::Refused), Status::ConnectionRefused),
            (connect(ConnectFailure::Dns), Status::DnsError),
            (connect(ConnectFailure::Timeout), Status::ConnectTimeout),
            (connect(ConnectFailure::Unreachable), Status::Unreachable),
            (connect(ConnectFailure::Tls), Status::Unreachable),
            (connect(ConnectFailure::Denied), Status::Unreachable),
            (connect(ConnectFailure::Other), Status::Unreachable),
            (
                ClientError::Status {
                    method: "Subd.Poll".into(),
                    status: 403,
                    message: "access to method denied".into(),
                },
                Status::PollDenied,
            ),
            (
                ClientError::Status {
                    method: "Subd.Poll".into(),
                    status: 503,
                    message: "busy: 3 full-poll trees in memory; retry".into(),
                },
                Status::SubdBusy,
            ),
            (
                ClientError::Status {
                    method: "Subd.Poll".into(),
                    status: 404,
                    message: "this server has no method Subd.Poll".into(),
                },
                Status::NotASubd,
            ),
            (
                ClientError::Status {
                    method: "Subd.Poll".into(),
                    status: 500,
                    message: "boom".into(),
                },
                Status::Unreachable,
            ),
        ];
        for (e, want) in cases {
            let f = classify_poll_error(&e);
            assert_eq!(f.status, want, "{e}");
            assert_eq!(f.message, e.to_string());
        }
    }
}
