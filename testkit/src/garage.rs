//! A real single-node Garage (an S3-compatible object store) for tests: `Garage::start`
//! writes a `garage.toml` (sqlite metadata, replication factor 1, RPC and S3 API on free
//! loopback ports, everything in a temp directory), starts `garage server`, gives the node
//! a layout, and makes a key and a bucket it may read, write and own. Dropping it kills the
//! server and removes the directory. `GarageCluster::start` runs three such nodes joined
//! into one layout with three replicas, for tests that kill one.
//!
//! The `garage` binary is `$GARAGE`, else `garage` on PATH, else `~/.cargo/bin/garage`
//! (where `scripts/install-garage.sh`, run by `scripts/test.sh`, puts it). When there is
//! none, `start` panics saying so: the tests that need Garage fail, they never skip.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Garage version `scripts/install-garage.sh` installs.
pub const VERSION: &str = "2.5.0";
/// The region Garage answers to (`s3_region`).
pub const REGION: &str = "garage";
/// How long Garage may take to answer its first command.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running single-node Garage with one key and one bucket.
pub struct Garage {
    child: Child,
    dir: PathBuf,
    config: PathBuf,
    binary: PathBuf,
    /// `http://127.0.0.1:PORT`, the S3 API.
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
    /// The bucket made at start (`images`).
    pub bucket: String,
}

/// The `garage` binary to run; panics (naming the install script) when there is none.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("GARAGE") {
        return PathBuf::from(p);
    }
    let on_path = Command::new("garage")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path {
        return PathBuf::from("garage");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let cargo = home.join(".cargo/bin/garage");
    assert!(
        cargo.exists(),
        "garage is not installed (no $GARAGE, none on PATH, no {}): run scripts/install-garage.sh (scripts/test.sh does)",
        cargo.display()
    );
    cargo
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A 32-byte RPC secret (hex) derived from two numbers: every node of one cluster shares it.
fn rpc_secret(a: u16, b: u16) -> String {
    (0..32)
        .map(|i| format!("{:02x}", (a as usize * 31 + b as usize * 17 + i * 7) % 256))
        .collect()
}

/// `garage.toml` for a node keeping its metadata and data under `dir`.
fn config_text(dir: &Path, rpc: u16, s3: u16, replication: u8, secret: &str) -> String {
    format!(
        "metadata_dir = \"{meta}\"\n\
         data_dir = \"{data}\"\n\
         db_engine = \"sqlite\"\n\
         replication_factor = {replication}\n\
         rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
         rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
         rpc_secret = \"{secret}\"\n\
         [s3_api]\n\
         s3_region = \"{REGION}\"\n\
         api_bind_addr = \"127.0.0.1:{s3}\"\n\
         root_domain = \".s3.garage.localhost\"\n",
        meta = dir.join("meta").display(),
        data = dir.join("data").display(),
    )
}

impl Garage {
    /// Starts a fresh single-node Garage with bucket `images`.
    pub fn start() -> Garage {
        let mut g = Garage::launch(&binary(), "garage-test", 1, None);
        g.set_up();
        g
    }

    /// Starts `garage server` in a fresh directory on fresh loopback ports (`replication`
    /// copies; the RPC `secret` shared by a cluster, or one of its own) and waits until it
    /// answers. Ports are picked by binding port 0 and letting go, so another process may
    /// take one before Garage binds it (every outgoing connection takes an ephemeral port
    /// from the same range, and the imageservers' S3 clients open one per request): a
    /// server that exits before it answers is started again on other ports, up to three
    /// times.
    fn launch(binary: &Path, name: &str, replication: u8, secret: Option<&str>) -> Garage {
        for attempt in 1..=3 {
            let dir =
                std::env::temp_dir().join(format!("{name}-{}-{}", std::process::id(), free_port()));
            std::fs::create_dir_all(&dir).expect("garage temp dir");
            let rpc = free_port();
            let s3 = std::iter::repeat_with(free_port)
                .find(|p| *p != rpc)
                .expect("a second port");
            let secret = secret.map_or_else(|| rpc_secret(rpc, s3), str::to_string);
            let text = config_text(&dir, rpc, s3, replication, &secret);
            let mut g = Garage {
                child: spawn_server(binary, &dir, &text),
                config: dir.join("garage.toml"),
                dir,
                binary: binary.to_path_buf(),
                endpoint: format!("http://127.0.0.1:{s3}"),
                key_id: String::new(),
                secret: String::new(),
                bucket: "images".to_string(),
            };
            if g.answers() {
                return g;
            }
            eprintln!(
                "garage exited at start (attempt {attempt} of 3), starting it on other ports; its log:\n{}",
                std::fs::read_to_string(g.dir.join("garage.log")).unwrap_or_default()
            );
        }
        panic!("garage exited at start three times (see its logs above)")
    }

    /// Waits until the server answers `status` (true), or exits first (false).
    fn answers(&mut self) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if self.try_cli(&["status"]).is_ok() {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "garage did not answer for {} s; log: {}",
                START_TIMEOUT.as_secs(),
                std::fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILL, as a crash or a power cut would; its directory stays until it is dropped.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Layout, key and bucket.
    fn set_up(&mut self) {
        let node = self.node_id();
        let node = node.split('@').next().unwrap_or_default().to_string();
        self.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        self.cli(&["layout", "apply", "--version", "1"]);
        self.key_and_bucket();
    }

    /// This node's `ID@ADDR`, once its server answers.
    fn node_id(&self) -> String {
        // `node id` reads the node's key from disk: wait for the server itself first.
        self.until_ok(&["status"]);
        self.until_ok(&["node", "id", "-q"]).trim().to_string()
    }

    /// Makes the key `tests` and the bucket `self.bucket` it owns.
    fn key_and_bucket(&mut self) {
        let key = self.until_ok(&["key", "create", "tests"]);
        self.key_id = field(&key, "Key ID").expect("garage key create: no Key ID");
        self.secret = field(&key, "Secret key").expect("garage key create: no Secret key");
        let bucket = self.bucket.clone();
        self.create_bucket(&bucket);
    }

    /// Makes another bucket the test key may read, write and own.
    pub fn create_bucket(&self, name: &str) {
        self.until_ok(&["bucket", "create", name]);
        self.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", name, "--key", "tests",
        ]);
    }

    /// Runs `garage -c CONFIG args…`: its stdout; panics with its output on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("garage {args:?}: {e}"))
    }

    fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "garage=warn")
            .output()
            .map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!("{}{stdout}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// `cli`, retried while the server is starting (up to `START_TIMEOUT`).
    fn until_ok(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.try_cli(args) {
                Ok(out) => return out,
                Err(e) if Instant::now() > deadline => panic!(
                    "garage {args:?} kept failing for {} s: {e}\nlog: {}",
                    START_TIMEOUT.as_secs(),
                    std::fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// The `AWS_*` variables for the test key.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", REGION.to_string()),
        ]
    }
}

/// How many nodes `GarageCluster` runs, and how many copies of each block it keeps.
pub const CLUSTER_NODES: usize = 3;

/// A running Garage cluster of `CLUSTER_NODES` nodes on loopback, replication factor
/// `CLUSTER_NODES` (every node holds every block and every metadata entry) and Garage's
/// default consistency mode (`consistent`: reads and writes need a quorum of two of the
/// three). Each node has its own RPC and S3 ports and its own metadata and data
/// directories; node 0 connected the others and applied one layout with each node in its
/// own zone. All nodes share one key and one bucket (`images`), so any node's `endpoint`
/// serves it. Dropping the cluster kills every node and removes their directories.
pub struct GarageCluster {
    /// The nodes, each a `Garage` with its own `endpoint` and the shared key and bucket.
    pub nodes: Vec<Garage>,
}

impl GarageCluster {
    /// Starts `CLUSTER_NODES` fresh nodes, joins them into one layout, and makes the key
    /// and the bucket; returns once every node knows both.
    pub fn start() -> GarageCluster {
        let binary = binary();
        let secret = rpc_secret(free_port(), free_port());
        let mut nodes: Vec<Garage> = (0..CLUSTER_NODES)
            .map(|i| Garage::spawn_node(&binary, i, &secret))
            .collect();
        let ids: Vec<String> = nodes.iter().map(Garage::node_id).collect();
        for id in &ids[1..] {
            nodes[0].until_ok(&["node", "connect", id]);
        }
        for (i, id) in ids.iter().enumerate() {
            let short = id.split('@').next().unwrap_or_default();
            let zone = format!("dc{}", i + 1);
            nodes[0].cli(&["layout", "assign", "-z", &zone, "-c", "1G", short]);
        }
        nodes[0].cli(&["layout", "apply", "--version", "1"]);
        nodes[0].key_and_bucket();
        let (key_id, key_secret) = (nodes[0].key_id.clone(), nodes[0].secret.clone());
        for n in &mut nodes[1..] {
            n.key_id = key_id.clone();
            n.secret = key_secret.clone();
            n.until_ok(&["key", "info", "tests"]);
            n.until_ok(&["bucket", "info", "images"]);
        }
        GarageCluster { nodes }
    }

    /// Node `i`'s S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self, i: usize) -> &str {
        &self.nodes[i].endpoint
    }

    /// The `AWS_*` variables for the shared key.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.nodes[0].env()
    }

    /// SIGKILLs node `i` (the others keep a quorum).
    pub fn kill9(&mut self, i: usize) {
        self.nodes[i].kill9();
    }
}

impl Garage {
    /// Starts node `i` of a cluster sharing `secret` (replication `CLUSTER_NODES`), with
    /// no layout, key or bucket yet.
    fn spawn_node(binary: &Path, i: usize, secret: &str) -> Garage {
        let name = format!("garage-cluster-n{i}");
        Garage::launch(binary, &name, CLUSTER_NODES as u8, Some(secret))
    }
}

/// Writes `dir/garage.toml` (`text`) and starts `garage server` on it, logging to
/// `dir/garage.log`.
fn spawn_server(binary: &Path, dir: &Path, text: &str) -> Child {
    let config = dir.join("garage.toml");
    std::fs::write(&config, text).expect("garage.toml");
    let log = std::fs::File::create(dir.join("garage.log")).expect("garage.log");
    Command::new(binary)
        .arg("-c")
        .arg(&config)
        .arg("server")
        .env("RUST_LOG", "garage=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {} server: {e}", binary.display()))
}

/// The value after `NAME:` on a line of `text`.
fn field(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim().to_string())
    })
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
