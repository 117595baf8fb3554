//! The herd: every machine of the MDB, each driven by its own task.
//!
//! The MDB watcher notices a changed file (device, inode, size or mtime) within
//! `mdb_check_interval`, keeps the previous list when the new file does not parse, and
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
use wire::client::{ClientError, ClientSecurity, RpcClient, SubdClient};

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
}

/// The address to dial for `m`, always with a port: `HOST:PORT` or `[V6]:PORT`, rebuilt
/// from the parsed MDB address, so an MDB string is never passed on as a URL.
pub fn dial_address(m: &Machine, default_port: u16) -> Result<String, mdb::BadAddress> {
    Ok(mdb::Address::parse(m.address())?.dial(default_port))
}

/// A subd client for `address`.
pub fn subd_client(
    address: &str,
    security: &ClientSecurity,
    subd_name: &str,
    timeout: Duration,
) -> Result<SubdClient, wire::client::ClientError> {
    Ok(SubdClient {
        rpc: RpcClient::new(
            address,
            wire::client::SUBD_PORT,
            security,
            subd_name,
            Some(timeout),
        )?,
    })
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

/// Names why a poll failed, as far as the client error tells: `poll denied` (HTTP 403:
/// the subd does not grant our certificate `Subd.Poll`), `not a subd` (404: the address
/// answers but has no `Subd.Poll`), `subd busy` (503: it is serving as many full polls as
/// it allows; retried), `connection refused`,
/// `DNS error`, `connect timeout`, else `unreachable`.
pub fn classify_poll_error(e: &ClientError) -> PollFailure {
    let message = e.to_string();
    let status = match e {
        ClientError::Status { status: 403, .. } => Status::PollDenied,
        // Reached, but it has no Subd.Poll: the MDB's address is some other server.
        ClientError::Status { status: 404, .. } => Status::NotASubd,
        ClientError::Status { status: 503, .. } => Status::SubdBusy,
        ClientError::Connect { message: m, .. } => {
            let m = m.to_ascii_lowercase();
            if m.contains("connection refused") {
                Status::ConnectionRefused
            } else if m.contains("dns error")
                || m.contains("failed to lookup address")
                || m.contains("name or service not known")
                || m.contains("no address associated")
                || m.contains("temporary failure in name resolution")
            {
                Status::DnsError
            } else if m.contains("timed out") || m.contains("deadline has elapsed") {
                Status::ConnectTimeout
            } else {
                Status::Unreachable
            }
        }
        _ => Status::Unreachable,
    };
    PollFailure { status, message }
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
    let subd_rpc = match RpcClient::new(
        "localhost",
        wire::client::SUBD_PORT,
        &cfg.security,
        &cfg.subd_name,
        Some(cfg.rpc_timeout),
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
    });
    let mut tasks: BTreeMap<String, Task> = BTreeMap::new();
    // The file identity last acted on (`Some(None)`: last seen missing); `None` before the
    // first look. A change (appearing, vanishing, any edit) is loaded once; a failure is
    // logged once and the previous list kept.
    let mut seen: Option<Option<FileStamp>> = None;
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
                    *ctx.fleet.mdb_error.lock().expect("fleet lock") = Some(e);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(ctx.cfg.mdb_check_interval) => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
    }
    for (_, t) in tasks {
        t.handle.abort();
    }
}

async fn load_mdb(path: &std::path::Path) -> Result<Mdb, String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || mdb::load(&path).map_err(|e| e.to_string()))
        .await
        .map_err(|e| e.to_string())?
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
        ctx.fleet.machines.lock().expect("fleet lock").remove(host);
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
                ctx.fleet
                    .machines
                    .lock()
                    .expect("fleet lock")
                    .insert(host.clone(), MachineReport::new(host));
                let handle = tokio::spawn(machine_loop(ctx.clone(), rx));
                tasks.insert(host.clone(), Task { record: tx, handle });
            }
        }
    }
    let images: HashSet<String> = mdb
        .machines()
        .flat_map(|m| [m.required_image.clone(), m.planned_image.clone()])
        .filter(|s| !s.is_empty())
        .collect();
    ctx.images.retain(&images);
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
}

async fn machine_loop(ctx: Arc<Ctx>, mut rx: watch::Receiver<Machine>) {
    let mut st = MachineState::default();
    loop {
        let m = rx.borrow_and_update().clone();
        let delay = {
            let Ok(_permit) = ctx.permits.acquire().await else {
                return;
            };
            let span = tracing::info_span!("machine", host = %m.hostname);
            cycle(&ctx, &m, &mut st).instrument(span).await
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            r = rx.changed() => if r.is_err() { return },
        }
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
    let planned = if !m.planned_image.is_empty() && m.planned_image != m.required_image {
        ctx.images.get(&m.planned_image).await.ok()
    } else {
        None
    };
    let (img, name, c) = (image.clone(), m.required_image.clone(), cache.clone());
    let computed = tokio::task::spawn_blocking(move || {
        let plan = planner::compute(&name, &img, &tree, &c, &excl, &hidden);
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

/// One poll-decide-act round for one machine; returns how long to wait before the next.
async fn cycle(ctx: &Ctx, m: &Machine, st: &mut MachineState) -> Duration {
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
            return cfg.backoff_cap;
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
    let counters = &ctx.fleet.counters;

    // A cheap poll first: status and generation, never the tree.
    Counters::add(&counters.polls, 1);
    let mut poll_bytes = 0;
    let mut poll: Result<PollResponse, PollFailure> = match poll_counted(
        &client,
        &PollRequest {
            have_generation: st.generation,
            short_only: true,
        },
    )
    .await
    {
        Ok((mut p, n)) => {
            Counters::add(&counters.poll_bytes, n);
            poll_bytes += n;
            p.tree = None; // asked short_only; never keep a tree here
            p.object_cache = None;
            if st.start_time != 0 && p.start_time != st.start_time {
                tracing::info!("subd restarted");
                st.last_action = None;
                st.generation = 0;
                st.plan_key = None;
                st.planned_key = None;
            }
            st.start_time = p.start_time;
            Ok(p)
        }
        Err(e) => {
            Counters::add(&counters.poll_failures, 1);
            Err(e)
        }
    };

    // The required image, from the fleet-wide cache.
    let mut image: Option<Arc<Image>> = None;
    let image_state = if m.required_image.is_empty() {
        ImageState::Undefined
    } else if poll.is_err() {
        // Do not hammer the imageserver for machines that are down.
        match ctx.images.cached(&m.required_image) {
            Some(i) => {
                image = Some(i);
                ImageState::Ready
            }
            None => ImageState::NotReady(String::new()),
        }
    } else {
        match ctx.images.get(&m.required_image).await {
            Ok(i) => {
                image = Some(i);
                ImageState::Ready
            }
            Err(e) => ImageState::NotReady(e),
        }
    };

    // A full poll and a new plan only when the tree or the wanted images changed (or the
    // plan was dropped after acting on it), and the decision will look at it.
    if let (Some(img), Ok(p)) = (&image, &poll) {
        let gen = p.generation;
        let stale =
            st.plan.is_none() || st.plan_key.as_ref() != Some(&(m.required_image.clone(), gen));
        let wanted = decision::needs_plan(p, st.last_action.as_ref());
        if wanted && (stale || planned_wanted(m, st, gen)) {
            match refresh_from_tree(ctx, &client, m, img, st).await {
                Ok((full, n)) => {
                    Counters::add(&counters.poll_bytes, n);
                    poll_bytes += n;
                    poll = Ok(full);
                }
                Err(e) => {
                    Counters::add(&counters.poll_failures, 1);
                    poll = Err(e);
                }
            }
        }
    }
    if image.is_none() || st.plan_key.as_ref().map(|k| &k.0) != Some(&m.required_image) {
        st.plan = None;
        st.plan_key = None;
    }
    if m.planned_image.is_empty() || m.planned_image == m.required_image {
        st.planned_missing.clear();
        st.planned_key = None;
    }

    // Cache objects neither wanted image needs (worth knowing only when in sync).
    let synced_now = st.plan.as_ref().is_some_and(|p| p.is_empty());
    if synced_now && !st.cache.is_empty() {
        let key = (
            m.required_image.clone(),
            m.planned_image.clone(),
            st.generation,
        );
        if st.unneeded_key.as_ref() != Some(&key) {
            let planned = if m.planned_image.is_empty() {
                None
            } else {
                // Unknown planned image: keep everything rather than delete its objects.
                ctx.images.cached(&m.planned_image)
            };
            if m.planned_image.is_empty() || planned.is_some() {
                let wanted: Vec<Arc<Image>> = image.iter().cloned().chain(planned).collect();
                let cache = st.cache.clone();
                if let Ok(u) =
                    tokio::task::spawn_blocking(move || planner::unneeded_cache(&cache, &wanted))
                        .await
                {
                    st.unneeded = u;
                    st.unneeded_key = Some(key);
                }
            }
        }
    } else {
        st.unneeded.clear();
        st.unneeded_key = None;
    }

    let global = ctx.fleet.global_disable();
    let disabled_reason = if m.disable_updates {
        Some("DisableUpdates is set in the MDB".to_string())
    } else {
        global.map(|g| format!("updates disabled fleet-wide: {}", g.reason))
    };
    let facts = Facts {
        poll: poll.as_ref(),
        required_image: &m.required_image,
        image: image_state,
        plan: st.plan.as_deref(),
        updates_disabled: disabled_reason.as_deref(),
        safety_check_disabled: m.safety_check_disabled(),
        last_action: st.last_action.as_ref(),
        planned_missing: &st.planned_missing,
        unneeded_cache: &st.unneeded,
    };
    let step = decision::next_step(&facts);
    let scan_count = poll.as_ref().map(|p| p.scan_count).unwrap_or(0);

    let (status, error, synced) = match step {
        Step::Wait {
            status,
            error,
            settled,
        } => {
            if settled {
                st.last_action = None;
            }
            (status, error, false)
        }
        Step::Fetch { hashes } => {
            Counters::add(&counters.fetches, 1);
            let req = api::FetchRequest {
                server: cfg.image_server.clone(),
                hashes,
                wait: false,
            };
            match client.fetch(&req).await {
                Ok(()) => {
                    tracing::info!(objects = req.hashes.len(), "fetch sent");
                    // Acted on: the next plan comes from the tree that shows the fetch.
                    st.plan = None;
                    st.last_action = Some(Action::Fetch {
                        image: m.required_image.clone(),
                        scan_count,
                    });
                    (Status::Fetching, None, false)
                }
                Err(e) => (Status::FetchFailed, Some(e.to_string()), false),
            }
        }
        Step::Update => {
            Counters::add(&counters.updates, 1);
            let mut plan = (**st.plan.as_ref().expect("update needs a plan")).clone();
            if m.safety_check_disabled() {
                // The decision sends an unsafe plan only under the MDB tag
                // DisableSafetyCheck; subd refuses any plan still carrying a reason.
                plan.unsafe_reason = None;
            }
            let req = api::UpdateRequest { plan, wait: false };
            match client.update(&req).await {
                Ok(_) => {
                    tracing::info!(image = %m.required_image, "update sent");
                    // Acted on: the next plan comes from a scan after the update.
                    st.plan = None;
                    st.last_action = Some(Action::Update {
                        image: m.required_image.clone(),
                        scan_count,
                    });
                    (Status::Updating, None, false)
                }
                Err(e) => (Status::UpdateFailed, Some(e.to_string()), false),
            }
        }
        Step::Synced { prefetch, cleanup } => {
            st.last_action = None;
            let key = (m.planned_image.clone(), st.generation);
            if !prefetch.is_empty() && st.prefetched.as_ref() != Some(&key) {
                let req = api::FetchRequest {
                    server: cfg.image_server.clone(),
                    hashes: prefetch,
                    wait: false,
                };
                match client.fetch(&req).await {
                    Ok(()) => {
                        tracing::info!(image = %m.planned_image, objects = req.hashes.len(), "prefetch sent");
                        st.prefetched = Some(key);
                    }
                    Err(e) => tracing::warn!("prefetch of {}: {e}", m.planned_image),
                }
            }
            if !cleanup.is_empty() && st.cleaned != Some(st.generation) {
                // Once per generation, whatever the outcome: a subd that refuses it is
                // not asked again every poll.
                st.cleaned = Some(st.generation);
                Counters::add(&counters.cleanups, 1);
                match client.cleanup(&cleanup).await {
                    Ok(()) => tracing::info!(objects = cleanup.len(), "cleanup sent"),
                    Err(e) => tracing::warn!("cleanup: {e}"),
                }
            }
            (Status::Synced, None, true)
        }
    };
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
    if let Some(e) = &error {
        if status.backs_off() {
            tracing::warn!(status = status.name(), "{e}");
        }
    }

    // Publish.
    let now = unix_now();
    {
        let mut machines = ctx.fleet.machines.lock().expect("fleet lock");
        if let Some(r) = machines.get_mut(&m.hostname) {
            r.address = address;
            r.required_image = m.required_image.clone();
            r.planned_image = m.planned_image.clone();
            r.status = status;
            r.status_name = status.name();
            if error.is_some() || status == Status::Synced {
                r.last_error = error;
            }
            if synced {
                r.last_synced = Some(now);
            }
            r.consecutive_failures = st.failures;
            r.last_plan = st.plan.clone();
            r.last_poll_bytes = poll_bytes;
            if let Ok(p) = &poll {
                r.last_poll = Some(now);
                r.polls += 1;
                r.generation = p.generation;
                r.scan_count = p.scan_count;
                if p.last_update.is_some() {
                    r.last_update = p.last_update.clone();
                }
            }
        }
    }

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
        let connect = |m: &str| ClientError::Connect {
            addr: "https://h:1".into(),
            message: m.into(),
        };
        let cases = [
            (
                connect("Connection refused (os error 111)"),
                Status::ConnectionRefused,
            ),
            (
                connect("failed to lookup address information: Name or service not known"),
                Status::DnsError,
            ),
            (connect("dns error: no record found"), Status::DnsError),
            (connect("operation timed out"), Status::ConnectTimeout),
            (
                connect("Connection timed out (os error 110)"),
                Status::ConnectTimeout,
            ),
            (
                connect("No route to host (os error 113)"),
                Status::Unreachable,
            ),
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
