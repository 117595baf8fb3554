//! A real single-node Garage (an S3-compatible object store) for tests: `Garage::start`
//! writes a `garage.toml` (sqlite metadata, replication factor 1, RPC and S3 API on free
//! loopback ports, everything in a temp directory), starts `garage server`, gives the node
//! a layout, and makes a key and a bucket it may read, write and own. Dropping it kills the
//! server and removes the directory.
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

fn config_text(dir: &Path, rpc: u16, s3: u16) -> String {
    let secret: String = (0..32)
        .map(|i| {
            format!(
                "{:02x}",
                (rpc as usize * 31 + s3 as usize * 17 + i * 7) % 256
            )
        })
        .collect();
    format!(
        "metadata_dir = \"{meta}\"\n\
         data_dir = \"{data}\"\n\
         db_engine = \"sqlite\"\n\
         replication_factor = 1\n\
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
        let binary = binary();
        let dir = std::env::temp_dir().join(format!(
            "garage-test-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("garage temp dir");
        let (rpc, s3) = (free_port(), free_port());
        let config = dir.join("garage.toml");
        std::fs::write(&config, config_text(&dir, rpc, s3)).expect("garage.toml");
        let log = std::fs::File::create(dir.join("garage.log")).expect("garage.log");
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} server: {e}", binary.display()));
        let mut g = Garage {
            child,
            dir,
            config,
            binary,
            endpoint: format!("http://127.0.0.1:{s3}"),
            key_id: String::new(),
            secret: String::new(),
            bucket: "images".to_string(),
        };
        g.set_up();
        g
    }

    /// Layout, key and bucket.
    fn set_up(&mut self) {
        // `node id` reads the node's key from disk: wait for the server itself first.
        self.until_ok(&["status"]);
        let node = self.until_ok(&["node", "id", "-q"]);
        let node = node
            .trim()
            .split('@')
            .next()
            .unwrap_or_default()
            .to_string();
        self.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        self.cli(&["layout", "apply", "--version", "1"]);
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
