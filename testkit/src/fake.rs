//! An in-memory subd and imageserver speaking the real RPCs over real loopback sockets,
//! for driving the dominator without real machines (its herd tests and the fleet
//! benchmark). The fake subd keeps a `FileTree` and an object cache in memory and applies
//! plans to them; it does not scan, fetch from an imageserver, or run triggers. The fake
//! imageserver answers `GetImage` and `CheckImage` from a shared map. `start_subds` serves
//! many fake subds on one listener, each machine on its own loopback address (so 10,000
//! simulated machines need one listening socket, not 10,000).

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::State;
use axum::routing::post;
use axum::serve::IncomingStream;
use axum::Router;
use model::api::{self, PollRequest, PollResponse, UpdateResult};
use model::{FileTree, Image, ObjectId};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use wire::http::{ApiError, Json, Security};

/// What a fake subd holds: its tree, its object cache and its counters.
#[derive(Default)]
pub struct FakeSubd {
    pub tree: FileTree,
    pub cache: Vec<ObjectId>,
    /// Bumped by every change, as subd's scanner would after seeing it.
    pub generation: u64,
    /// Bumped by every poll (each poll stands for a finished scan).
    pub scans: u64,
    pub last_update: Option<UpdateResult>,
    /// Updates applied.
    pub updates: u64,
    /// The inode number the next made inode gets.
    pub next_ino: u64,
    /// Reported by every update, as a subd whose service command fails would.
    pub trigger_failures: Vec<String>,
}

/// A fake subd shared between its server and the test that inspects or changes it.
pub type SharedSubd = Arc<Mutex<FakeSubd>>;

impl FakeSubd {
    /// A subd whose machine holds `tree` (generation 1, one scan done).
    pub fn new(tree: FileTree) -> SharedSubd {
        let next_ino = tree.inodes.keys().max().map_or(1, |n| n + 1);
        Arc::new(Mutex::new(FakeSubd {
            tree,
            generation: 1,
            scans: 1,
            next_ino,
            ..FakeSubd::default()
        }))
    }

    /// The object a path's content is, if it is a file.
    pub fn content(&self, path: &str) -> Option<ObjectId> {
        self.tree.get(&path.parse().ok()?).and_then(|i| i.hash)
    }

    /// Applies `plan` as subd would: every object it makes must be in the cache and is
    /// moved from there into place.
    fn apply(&mut self, p: &model::UpdatePlan) -> Result<(), ApiError> {
        let made = || p.dirs_to_make.iter().chain(&p.inodes_to_make);
        let used: HashSet<ObjectId> = made().filter_map(|pi| pi.inode.hash).collect();
        if let Some(h) = used.iter().find(|h| !self.cache.contains(h)) {
            return Err(ApiError::BadRequest(format!("object {h} not in cache")));
        }
        for pi in made() {
            let n = self.next_ino;
            self.next_ino += 1;
            self.tree.remove_subtree(&pi.path);
            self.tree.inodes.insert(n, pi.inode.clone());
            self.tree.entries.insert(pi.path.clone(), n);
        }
        // Activation renames each cached object into place.
        self.cache.retain(|h| !used.contains(h));
        for d in &p.paths_to_delete {
            self.tree.remove_subtree(d);
        }
        for c in &p.inodes_to_change {
            let n = self.next_ino;
            self.next_ino += 1;
            self.tree.inodes.insert(n, c.inode.clone());
            self.tree.entries.insert(c.path.clone(), n);
        }
        self.tree.gc_inodes();
        Ok(())
    }
}

async fn poll(
    State(s): State<SharedSubd>,
    Json(req): Json<PollRequest>,
) -> axum::Json<PollResponse> {
    let mut m = s.lock().unwrap();
    m.scans += 1;
    let send = !req.short_only && req.have_generation != m.generation;
    axum::Json(PollResponse {
        generation: m.generation,
        scan_count: m.scans,
        start_time: 1,
        last_update: m.last_update.clone(),
        tree: send.then(|| m.tree.clone()),
        object_cache: send.then(|| m.cache.clone()),
        ..PollResponse::default()
    })
}

async fn fetch(
    State(s): State<SharedSubd>,
    Json(req): Json<api::FetchRequest>,
) -> axum::Json<api::Empty> {
    let mut m = s.lock().unwrap();
    m.cache.extend(req.hashes);
    m.generation += 1;
    axum::Json(api::Empty {})
}

async fn cleanup(
    State(s): State<SharedSubd>,
    Json(req): Json<api::CleanupRequest>,
) -> axum::Json<api::Empty> {
    let mut m = s.lock().unwrap();
    let gone: HashSet<ObjectId> = req.hashes.into_iter().collect();
    m.cache.retain(|h| !gone.contains(h));
    m.generation += 1;
    axum::Json(api::Empty {})
}

async fn update(
    State(s): State<SharedSubd>,
    Json(req): Json<api::UpdateRequest>,
) -> Result<axum::Json<api::UpdateResponse>, ApiError> {
    let mut m = s.lock().unwrap();
    let p = req.plan;
    m.apply(&p)?;
    m.generation += 1;
    m.updates += 1;
    m.last_update = Some(UpdateResult {
        image_name: p.image_name.clone(),
        trigger_failures: m.trigger_failures.clone(),
        ..UpdateResult::default()
    });
    Ok(axum::Json(api::UpdateResponse::default()))
}

/// The fake subd's `Subd.Poll`, `Subd.Fetch`, `Subd.Update` and `Subd.Cleanup`.
pub fn subd_router(sub: SharedSubd) -> Router {
    Router::new()
        .route("/rpc/Subd.Poll", post(poll))
        .route("/rpc/Subd.Fetch", post(fetch))
        .route("/rpc/Subd.Update", post(update))
        .route("/rpc/Subd.Cleanup", post(cleanup))
        .with_state(sub)
}

/// Serves `sub` on a new loopback port (plain HTTP); returns its `HOST:PORT`.
pub async fn start_subd(sub: SharedSubd) -> String {
    start(subd_router(sub)).await
}

/// Many fake subds behind one listener, by the loopback address each machine answers on.
type Machines = Arc<HashMap<IpAddr, SharedSubd>>;

/// The address a connection was dialled to (the accepted socket's local address): which
/// machine of a `start_subds` listener the caller meant.
#[derive(Clone, Copy, Debug)]
struct Dialled(IpAddr);

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Dialled {
    fn connect_info(s: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Dialled(
            s.io()
                .local_addr()
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip()),
        )
    }
}

/// The machine dialled, or a 404 for an address no machine answers on.
fn dialled(m: &Machines, ip: IpAddr) -> Result<SharedSubd, ApiError> {
    m.get(&ip)
        .cloned()
        .ok_or_else(|| ApiError::NotFound(format!("no simulated machine at {ip}")))
}

async fn multi_poll(
    State(m): State<Machines>,
    ConnectInfo(Dialled(ip)): ConnectInfo<Dialled>,
    req: Json<PollRequest>,
) -> Result<axum::Json<PollResponse>, ApiError> {
    Ok(poll(State(dialled(&m, ip)?), req).await)
}

async fn multi_fetch(
    State(m): State<Machines>,
    ConnectInfo(Dialled(ip)): ConnectInfo<Dialled>,
    req: Json<api::FetchRequest>,
) -> Result<axum::Json<api::Empty>, ApiError> {
    Ok(fetch(State(dialled(&m, ip)?), req).await)
}

async fn multi_update(
    State(m): State<Machines>,
    ConnectInfo(Dialled(ip)): ConnectInfo<Dialled>,
    req: Json<api::UpdateRequest>,
) -> Result<axum::Json<api::UpdateResponse>, ApiError> {
    update(State(dialled(&m, ip)?), req).await
}

async fn multi_cleanup(
    State(m): State<Machines>,
    ConnectInfo(Dialled(ip)): ConnectInfo<Dialled>,
    req: Json<api::CleanupRequest>,
) -> Result<axum::Json<api::Empty>, ApiError> {
    Ok(cleanup(State(dialled(&m, ip)?), req).await)
}

/// The loopback address `start_subds` gives machine `i`: 127.1.0.1, 127.1.0.2, … (all of
/// 127.0.0.0/8 reaches this host; about 16 million machines fit).
pub fn machine_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 0)) + 1 + i as u32)
}

/// Serves every subd of `subs` on ONE listening socket: machine `i` answers on
/// `machine_address(i)`, all on the same port, told apart by the address each connection
/// was dialled to. The socket is bound to the wildcard address (one socket cannot be bound
/// to all of 127.0.0.0/8), but a connection to any other address is answered 404.
/// Returns each machine's `HOST:PORT`, in order.
pub async fn start_subds(subs: &[SharedSubd]) -> std::io::Result<Vec<String>> {
    let l = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let port = l.local_addr()?.port();
    let addrs: Vec<SocketAddr> = (0..subs.len())
        .map(|i| SocketAddr::new(IpAddr::V4(machine_address(i)), port))
        .collect();
    let machines: Machines = Arc::new(
        addrs
            .iter()
            .zip(subs)
            .map(|(a, s)| (a.ip(), s.clone()))
            .collect(),
    );
    let app = Router::new()
        .route("/rpc/Subd.Poll", post(multi_poll))
        .route("/rpc/Subd.Fetch", post(multi_fetch))
        .route("/rpc/Subd.Update", post(multi_update))
        .route("/rpc/Subd.Cleanup", post(multi_cleanup))
        .with_state(machines);
    // Accepted sockets inherit TCP_NODELAY from the listener (Linux).
    socket2::SockRef::from(&l).set_tcp_nodelay(true)?;
    tokio::spawn(async move {
        let _ = axum::serve(l, app.into_make_service_with_connect_info::<Dialled>()).await;
    });
    Ok(addrs.iter().map(|a| a.to_string()).collect())
}

/// The images a fake imageserver serves, by name.
pub type FakeImages = Arc<Mutex<HashMap<String, Image>>>;

async fn get_image(
    State(s): State<FakeImages>,
    Json(req): Json<api::ImageNameRequest>,
) -> Result<axum::Json<Image>, ApiError> {
    s.lock()
        .unwrap()
        .get(&req.name)
        .cloned()
        .map(axum::Json)
        .ok_or_else(|| ApiError::NotFound(format!("no image {}", req.name)))
}

async fn check_image(
    State(s): State<FakeImages>,
    Json(req): Json<api::ImageNameRequest>,
) -> axum::Json<api::CheckImageResponse> {
    axum::Json(api::CheckImageResponse {
        exists: s.lock().unwrap().contains_key(&req.name),
        deleted: false,
        expired: false,
        min_expiry_secs: 0,
    })
}

async fn list_images(
    State(s): State<FakeImages>,
    Json(req): Json<api::ListImagesRequest>,
) -> axum::Json<api::ListImagesResponse> {
    let prefix = req.prefix.unwrap_or_default();
    let mut names: Vec<String> = s
        .lock()
        .unwrap()
        .keys()
        .filter(|n| n.starts_with(&prefix))
        .cloned()
        .collect();
    names.sort_by(|a, b| model::image::version_cmp(a, b));
    axum::Json(api::ListImagesResponse { names })
}

/// Serves `images` (`ImageServer.GetImage`, `CheckImage` and `ListImages`) on a new
/// loopback port (plain HTTP); returns its `HOST:PORT`.
pub async fn start_imageserver(images: FakeImages) -> String {
    let app = Router::new()
        .route("/rpc/ImageServer.GetImage", post(get_image))
        .route("/rpc/ImageServer.CheckImage", post(check_image))
        .route("/rpc/ImageServer.ListImages", post(list_images))
        .with_state(images);
    start(app).await
}

/// Serves `app` on a new loopback port (plain HTTP) until the runtime ends; returns its
/// `HOST:PORT`.
pub async fn start(app: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    serve_on(l, app);
    addr
}

/// Serves `app` on `listener` (plain HTTP) until the runtime ends.
pub fn serve_on(listener: tokio::net::TcpListener, app: Router) {
    tokio::spawn(wire::http::serve(
        listener,
        app,
        Security::Insecure,
        std::future::pending(),
    ));
}
