//! `dominator local-fleet`: a complete fleet on this machine for trying the system out —
//! an imageserver, a dominator and three subds (the sibling binaries of the running
//! `dominator`), each on a loopback port of its own choosing (started on `127.0.0.1:0`,
//! the port read from the line it prints once bound, `wire::listening`), subd roots as
//! folders under a temporary directory, the images of `testdata/fleet` (embedded) added
//! with `imagetool`, and an MDB. Ctrl-C (or SIGTERM) stops the children and removes the
//! directory.
//!
//! The security flags of every child are built in one place, `Security::daemon_flags` and
//! `Security::client_flags`.

use clap::Args;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::oneshot;

/// Flags of `dominator local-fleet`.
#[derive(Args, Debug, Clone)]
pub struct LocalFleetArgs {
    /// Port of the dominator's status page (0 = any free port)
    #[arg(long, default_value_t = 6970)]
    pub port: u16,
    /// Keep the fleet's files here instead of a new temporary directory (kept on exit)
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Run the dominator with updates disabled at startup
    #[arg(long)]
    pub disable_updates_at_startup: bool,
    /// Plain HTTP everywhere instead of mutual TLS (so a browser can open the status
    /// page without a client certificate); development only
    #[arg(long)]
    pub permit_insecure_mode: bool,
}

/// Why the local fleet could not start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum LocalFleetError {
    #[error("making certificates in {}", dir.display())]
    Certs {
        dir: PathBuf,
        #[source]
        source: wire::certs::CertsError,
    },
    #[error("locating the dominator executable")]
    CurrentExe(#[source] std::io::Error),
    #[error("{} not found beside {} (build the whole workspace: cargo build --workspace --bins)", program.display(), exe.display())]
    NotBuilt { program: PathBuf, exe: PathBuf },
    #[error("creating {}", path.display())]
    CreateLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} exited during start-up ({status}); see its log")]
    ExitedAtStart { what: String, status: ExitStatus },
    #[error("{what} did not say it was listening within {} s", START_TIMEOUT.as_secs())]
    NotListening { what: String },
    #[error("port {port} is not free ({source}): is another local fleet running? Pass --port 0 for any free port")]
    PortTaken { port: u16, source: std::io::Error },
    #[error("running imagetool")]
    RunImagetool(#[source] std::io::Error),
    #[error("imagetool add {name}: {stderr}")]
    ImagetoolAdd { name: String, stderr: String },
    #[error(transparent)]
    Mdb(#[from] mdb::MdbError),
    #[error("{name} exited ({status}); see {}", logs.display())]
    ChildExited {
        name: String,
        status: ExitStatus,
        logs: PathBuf,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

type Result<T, E = LocalFleetError> = std::result::Result<T, E>;

/// How long a child may take to print its listening line.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The embedded `testdata/fleet`: (path, content, mode).
pub const FLEET_FILES: &[(&str, &[u8], u32)] = &[
    (
        "app.0/etc/app/app.conf",
        include_bytes!("../../testdata/fleet/app.0/etc/app/app.conf"),
        0o644,
    ),
    (
        "app.0/usr/local/bin/app",
        include_bytes!("../../testdata/fleet/app.0/usr/local/bin/app"),
        0o755,
    ),
    (
        "app.1/etc/app/app.conf",
        include_bytes!("../../testdata/fleet/app.1/etc/app/app.conf"),
        0o644,
    ),
    (
        "app.1/usr/local/bin/app",
        include_bytes!("../../testdata/fleet/app.1/usr/local/bin/app"),
        0o755,
    ),
    (
        "app.triggers.json",
        include_bytes!("../../testdata/fleet/app.triggers.json"),
        0o644,
    ),
    (
        "base.0/etc/motd",
        include_bytes!("../../testdata/fleet/base.0/etc/motd"),
        0o644,
    ),
    (
        "base.0/etc/hostname",
        include_bytes!("../../testdata/fleet/base.0/etc/hostname"),
        0o644,
    ),
    (
        "base.0/usr/bin/hello",
        include_bytes!("../../testdata/fleet/base.0/usr/bin/hello"),
        0o755,
    ),
    (
        "base.0/var/lib/base/data",
        include_bytes!("../../testdata/fleet/base.0/var/lib/base/data"),
        0o644,
    ),
    (
        "base.filter",
        include_bytes!("../../testdata/fleet/base.filter"),
        0o644,
    ),
];

/// How the children authenticate: the one place their security flags are made.
#[derive(Clone, Debug)]
pub enum Security {
    /// Plain HTTP on loopback (`--permit-insecure-mode`).
    Insecure,
    /// Mutual TLS with the certificates `wire::certs::make_all` wrote into this directory.
    Tls(PathBuf),
}

impl Security {
    /// Makes a CA and every role's key pair in `dir/certs`.
    pub fn make(dir: &Path) -> Result<Security> {
        let certs = dir.join("certs");
        wire::certs::make_all(&certs, &[]).map_err(|source| LocalFleetError::Certs {
            dir: certs.clone(),
            source,
        })?;
        Ok(Security::Tls(certs))
    }

    /// Flags for a daemon (`imageserver`, `subd`, `dominator`): its own pair.
    pub fn daemon_flags(&self, daemon: &str) -> Vec<OsString> {
        match self {
            Security::Insecure => vec!["--permit-insecure-mode".into()],
            Security::Tls(d) => vec![
                "--ca-file".into(),
                d.join("CA.pem").into(),
                "--cert-file".into(),
                d.join(daemon).join("cert.pem").into(),
                "--key-file".into(),
                d.join(daemon).join("key.pem").into(),
            ],
        }
    }

    /// Flags for a user command acting as `user` (`builder` for imagetool, `admin` for
    /// control commands); `mdb` needs none.
    pub fn client_flags(&self, user: &str) -> Vec<OsString> {
        match self {
            Security::Insecure => Vec::new(),
            Security::Tls(d) => vec![
                "--ca-file".into(),
                d.join("CA.pem").into(),
                "--cert-file".into(),
                d.join(format!("{user}.cert")).into(),
                "--key-file".into(),
                d.join(format!("{user}.key")).into(),
            ],
        }
    }

    /// `flags` as one shell-ready string (for the printed commands).
    pub fn shell(flags: &[OsString]) -> String {
        flags
            .iter()
            .map(|f| f.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Writes the embedded fleet images under `dir`.
pub fn write_fleet_files(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (path, data, mode) in FLEET_FILES {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("has parent"))?;
        std::fs::write(&p, data)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
    }
    Ok(())
}

/// A program beside the running executable (`imageserver`, `subd`, `imagetool`, `mdb`).
pub fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(LocalFleetError::CurrentExe)?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        return Err(LocalFleetError::NotBuilt { program: p, exe });
    }
    Ok(p)
}

/// Starts `program` (which prints `wire::listening::line(listens_as, …)` once bound),
/// its stdout and stderr into `log`; returns it and the address it printed. `what` names
/// it in errors.
pub async fn start_daemon(
    program: &Path,
    listens_as: &str,
    args: &[OsString],
    log: &Path,
    what: &str,
) -> Result<(Child, SocketAddr)> {
    let out = std::fs::File::create(log).map_err(|source| LocalFleetError::CreateLog {
        path: log.to_path_buf(),
        source,
    })?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| LocalFleetError::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
    let (tx, rx) = oneshot::channel();
    let stderr = child.stderr.take().expect("stderr piped");
    tokio::spawn(copy_stderr(
        stderr,
        tokio::fs::File::from_std(out),
        listens_as.to_string(),
        tx,
    ));
    let said = tokio::time::timeout(START_TIMEOUT, async {
        tokio::select! {
            addr = rx => addr.ok(),
            _ = child.wait() => None,
        }
    })
    .await;
    match said {
        Ok(Some(addr)) => Ok((child, addr)),
        // Its stderr closed or it exited without saying where it listens.
        Ok(None) => match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
            Ok(status) => Err(LocalFleetError::ExitedAtStart {
                what: what.to_string(),
                status: status?,
            }),
            Err(_) => Err(LocalFleetError::NotListening {
                what: what.to_string(),
            }),
        },
        Err(_) => Err(LocalFleetError::NotListening {
            what: what.to_string(),
        }),
    }
}

/// Copies a child's stderr into its log line by line, and sends the address of its
/// listening line (`wire::listening`) when that appears.
async fn copy_stderr(
    stderr: ChildStderr,
    mut log: tokio::fs::File,
    listens_as: String,
    tx: oneshot::Sender<SocketAddr>,
) {
    let mut reader = tokio::io::BufReader::new(stderr);
    let mut tx = Some(tx);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Some(addr) = wire::listening::parse(&listens_as, &String::from_utf8_lossy(&line)) {
            if let Some(tx) = tx.take() {
                let _ = tx.send(addr);
            }
        }
        // A log that cannot be written must not stop the child: keep draining its stderr.
        let _ = log.write_all(&line).await;
    }
}

/// Runs `imagetool add NAME PATH FILTER TRIGGERS` against `server`.
pub async fn imagetool_add(
    security: &Security,
    server: &str,
    name: &str,
    path: &Path,
    filter: &str,
    triggers: &str,
) -> Result<()> {
    let out = Command::new(sibling("imagetool")?)
        .args(security.client_flags("builder"))
        .arg("--image-server")
        .arg(server)
        .arg("add")
        .arg(name)
        .arg(path)
        .arg(filter)
        .arg(triggers)
        .output()
        .await
        .map_err(LocalFleetError::RunImagetool)?;
    if !out.status.success() {
        return Err(LocalFleetError::ImagetoolAdd {
            name: name.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Arguments that start a subd on `root`, listening on `addr`.
pub fn subd_args(security: &Security, root: &Path, addr: &str) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["--root".into(), root.into(), "--listen".into(), addr.into()];
    // Never the host's real `service`: triggers are echoed into the subd's log.
    a.extend(["--service-command".into(), "echo".into()]);
    a.extend(security.daemon_flags("subd"));
    a
}

/// Where a local fleet keeps its files, and how its members authenticate.
struct Site {
    dir: PathBuf,
    logs: PathBuf,
    images: PathBuf,
    security: Security,
    /// The directory is removed on exit (a temporary one).
    removes_dir: bool,
}

/// A started child, by name, for stopping it.
type Children = Vec<(String, Child)>;

/// Runs the local fleet until Ctrl-C or SIGTERM: prepare → start the imageserver → add
/// the images → start the subds → write the MDB → start the dominator → watch → stop.
pub async fn run(args: LocalFleetArgs) -> Result<()> {
    let (tmp, dir) = fleet_dir(&args)?;
    let site = prepare(&args, dir, tmp.is_some())?;
    check_port_free(args.port)?;
    let mut children = Children::new();
    let result = start_and_watch(&args, &site, &mut children).await;
    stop(&mut children).await;
    match (&result, tmp) {
        // A failed run keeps its directory: the logs are what explains it.
        (Err(_), Some(t)) => say(&format!("logs kept in {}", t.keep().join("logs").display())),
        (_, t) => drop(t),
    }
    result
}

/// The fleet's directory: `--dir` (created, kept) or a new temporary one.
fn fleet_dir(args: &LocalFleetArgs) -> Result<(Option<tempfile::TempDir>, PathBuf)> {
    Ok(match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (None, d.canonicalize()?)
        }
        None => {
            let t = tempfile::Builder::new().prefix("local-fleet.").tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    })
}

/// Prepare: certificates (made once, reused from `DIR/certs`), the log directory and the
/// embedded images.
fn prepare(args: &LocalFleetArgs, dir: PathBuf, removes_dir: bool) -> Result<Site> {
    let security = if args.permit_insecure_mode {
        Security::Insecure
    } else if dir.join("certs/CA.pem").exists() {
        Security::Tls(dir.join("certs"))
    } else {
        Security::make(&dir)?
    };
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let images = dir.join("images");
    write_fleet_files(&images)?;
    Ok(Site {
        dir,
        logs,
        images,
        security,
        removes_dir,
    })
}

/// Fails before starting anything when the dominator's port is taken: a fleet already
/// on it would otherwise be mistaken for ours.
fn check_port_free(port: u16) -> Result<()> {
    if port == 0 {
        return Ok(());
    }
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(source) => Err(LocalFleetError::PortTaken { port, source }),
    }
}

/// Starts every member, prints what to try, and watches until asked to stop or a member
/// dies.
async fn start_and_watch(
    args: &LocalFleetArgs,
    site: &Site,
    children: &mut Children,
) -> Result<()> {
    let is_addr = start_imageserver(site, children).await?;
    add_images(site, &is_addr).await?;
    let machines = start_subds(site, children).await?;
    let mdb_path = write_mdb(site, &machines)?;
    let dom_addr = start_dominator(args, site, &mdb_path, &is_addr, children).await?;
    show(&instructions(&Instructions {
        security: &site.security,
        dir: &site.dir,
        dom_addr: &dom_addr,
        is_addr: &is_addr,
        root1: &machines[0].2,
        logs: &site.logs,
        mdb_bin: &sibling("mdb")?,
        mdb: &mdb_path,
        dominator: &std::env::current_exe()?,
        imagetool: &sibling("imagetool")?,
        images: &site.images,
        removes_dir: site.removes_dir,
    }));
    watch(site, children).await
}

/// Starts the imageserver; returns its address.
async fn start_imageserver(site: &Site, children: &mut Children) -> Result<String> {
    let mut a: Vec<OsString> = vec![
        "--data-dir".into(),
        site.dir.join("imageserver").into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    a.extend(site.security.daemon_flags("imageserver"));
    let log = site.logs.join("imageserver.log");
    let (c, addr) = start_daemon(
        &sibling("imageserver")?,
        "imageserver",
        &a,
        &log,
        "imageserver",
    )
    .await?;
    children.push(("imageserver".into(), c));
    Ok(addr.to_string())
}

/// Adds the embedded images, with the seed's filter and triggers.
async fn add_images(site: &Site, is_addr: &str) -> Result<()> {
    let s = |p: &str| site.images.join(p).display().to_string();
    // (name, filter file, triggers file)
    for (name, filter, triggers) in [
        ("app.0", String::new(), s("app.triggers.json")),
        ("app.1", String::new(), s("app.triggers.json")),
        ("base.0", s("base.filter"), String::new()),
    ] {
        let path = site.images.join(name);
        imagetool_add(&site.security, is_addr, name, &path, &filter, &triggers).await?;
    }
    Ok(())
}

/// Starts three subds, each with a root folder; returns (host name, address, root) of each.
async fn start_subds(
    site: &Site,
    children: &mut Children,
) -> Result<Vec<(String, String, PathBuf)>> {
    let mut machines = Vec::new();
    for i in 1..=3 {
        let root = site.dir.join("roots").join(format!("machine-{i}"));
        std::fs::create_dir_all(root.join("etc"))?;
        // subd refuses a root others can write: 0755 whatever the umask.
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        std::fs::write(root.join("etc/hostname"), format!("machine-{i}\n"))?;
        let args = subd_args(&site.security, &root, "127.0.0.1:0");
        let log = site.logs.join(format!("subd-{i}.log"));
        let (c, addr) = start_daemon(&sibling("subd")?, "subd", &args, &log, "subd").await?;
        children.push((format!("subd-{i}"), c));
        machines.push((format!("machine-{i}"), addr.to_string(), root));
    }
    Ok(machines)
}

/// Writes the MDB: machines 1 and 2 on app.0 (2 planning app.1), machine 3 on base.0.
fn write_mdb(site: &Site, machines: &[(String, String, PathBuf)]) -> Result<PathBuf> {
    let mdb_path = site.dir.join("mdb.json");
    let mut mdb = mdb::Mdb::default();
    for (i, (host, addr, _)) in machines.iter().enumerate() {
        let mut m = mdb::Machine::new(host);
        m.ip_address = Some(addr.clone());
        m.required_image = if i < 2 { "app.0" } else { "base.0" }.to_string();
        if i == 1 {
            m.planned_image = "app.1".into();
        }
        mdb.add(m)?;
    }
    disk::fsutil::write_atomic(&mdb_path, mdb.to_json().as_bytes())?;
    Ok(mdb_path)
}

/// Starts the dominator (this executable) on `--port`; returns its address.
async fn start_dominator(
    args: &LocalFleetArgs,
    site: &Site,
    mdb_path: &Path,
    is_addr: &str,
    children: &mut Children,
) -> Result<String> {
    let mut a: Vec<OsString> = vec![
        "--mdb".into(),
        mdb_path.into(),
        "--image-server".into(),
        is_addr.into(),
        "--listen".into(),
        format!("127.0.0.1:{}", args.port).into(),
    ];
    if args.disable_updates_at_startup {
        a.push("--disable-updates-at-startup".into());
    }
    a.extend(site.security.daemon_flags("dominator"));
    let exe = std::env::current_exe().map_err(LocalFleetError::CurrentExe)?;
    let log = site.logs.join("dominator.log");
    let (c, addr) = start_daemon(&exe, "dominator", &a, &log, "dominator").await?;
    children.push(("dominator".into(), c));
    Ok(addr.to_string())
}

/// Watch: waits for Ctrl-C, SIGTERM, or the imageserver or dominator dying (an error
/// naming it). A subd that exits is reported once and left down: the fleet goes on
/// without that machine (the dominator shows it unreachable), which is part of the demo.
async fn watch(site: &Site, children: &mut Children) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                let mut i = 0;
                while i < children.len() {
                    let (name, c) = &mut children[i];
                    let Some(status) = c.try_wait()? else {
                        i += 1;
                        continue;
                    };
                    if !name.starts_with("subd-") {
                        return Err(LocalFleetError::ChildExited {
                            name: name.clone(),
                            status,
                            logs: site.logs.clone(),
                        });
                    }
                    say(&subd_gone(name, status, &site.logs));
                    children.remove(i);
                }
            }
        }
    }
}

/// What is printed when one machine's subd exits.
pub fn subd_gone(name: &str, status: ExitStatus, logs: &Path) -> String {
    let machine = name.replacen("subd-", "machine-", 1);
    format!(
        "{name} exited ({status}); the fleet goes on without {machine} (the dominator shows it \
         as unreachable); its log: {}",
        logs.join(format!("{name}.log")).display()
    )
}

/// A line on stderr; a closed stderr (the reader went away) is ignored, never a panic.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Text on stdout; a closed stdout (`| head` that has exited: EPIPE) is ignored, so the
/// fleet keeps running.
fn show(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
}

/// Stop: SIGTERM to every child, newest first; SIGKILL to one still running after 5 s.
async fn stop(children: &mut Children) {
    say("stopping the local fleet");
    for (_, c) in children.iter_mut().rev() {
        if let Some(pid) = c.id() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid as i32).expect("child pid"),
                rustix::process::Signal::TERM,
            );
        }
    }
    for (name, c) in children.iter_mut().rev() {
        if tokio::time::timeout(Duration::from_secs(5), c.wait())
            .await
            .is_err()
        {
            say(&format!("{name} did not stop on SIGTERM; killing it"));
            let _ = c.kill().await;
        }
    }
}

/// What `instructions` prints about.
pub struct Instructions<'a> {
    pub security: &'a Security,
    pub dir: &'a Path,
    pub dom_addr: &'a str,
    pub is_addr: &'a str,
    pub root1: &'a Path,
    pub logs: &'a Path,
    pub mdb_bin: &'a Path,
    pub mdb: &'a Path,
    pub dominator: &'a Path,
    pub imagetool: &'a Path,
    pub images: &'a Path,
    pub removes_dir: bool,
}

/// The text printed once the fleet runs: where to watch and what to try, with the exact
/// security flags each command needs.
pub fn instructions(i: &Instructions<'_>) -> String {
    let d = |p: &Path| p.display().to_string();
    let sec = i.security;
    let dom_flags = Security::shell(&sec.daemon_flags("dominator"));
    let builder = Security::shell(&sec.client_flags("builder"));
    let admin = Security::shell(&sec.client_flags("admin"));
    let (mdb, mdb_bin, dom, it) = (d(i.mdb), d(i.mdb_bin), d(i.dominator), d(i.imagetool));
    let (dom_addr, is_addr) = (i.dom_addr, i.is_addr);
    let watch = match sec {
        Security::Insecure => format!(
            "Status page:  http://{dom_addr}/   (JSON: http://{dom_addr}/api/machines)\n\
             \x20             INSECURE MODE: plain HTTP, anyone on this machine may call every method.\n"
        ),
        Security::Tls(c) => format!(
            "Security:     mutual TLS; CA and key pairs in {certs}\n\
             \x20             (made as `dominator make-certs` does)\n\
             Status page:  https://{dom_addr}/  needs a client certificate from this CA, e.g.\n\
             \x20   curl -s --cacert {ca} --cert {cert} --key {key} https://{dom_addr}/api/machines\n\
             \x20             A browser needs {cert} + {key} imported as a client certificate\n\
             \x20             (and will warn about the unknown CA); to browse without one, restart\n\
             \x20             with `dominator local-fleet --permit-insecure-mode` (plain HTTP).\n",
            certs = d(c),
            ca = d(&c.join("CA.pem")),
            cert = d(&c.join("admin.cert")),
            key = d(&c.join("admin.key")),
        ),
    };
    format!(
        "Local fleet running in {dir}\n\n\
         {watch}\
         Imageserver:  {is_addr}   images app.0, app.1 (sparse, triggers), base.0 (full, filter)\n\
         Machines:     machine-1, machine-2 (app.0), machine-3 (base.0); roots under {roots}\n\
         Logs:         {logs}\n\n\
         Things to try:\n\
         - Drift: edit a managed file and watch it put back within seconds:\n\
         \x20   echo tampered > {r1}/etc/app/app.conf; sleep 3; cat {r1}/etc/app/app.conf\n\
         - Roll out a new image by editing the MDB (it warns if the imageserver lacks it):\n\
         \x20   {mdb_bin} --mdb {mdb} --image-server {is_addr} {builder} set machine-1 --required app.1\n\
         - Preview exactly what an update would do:\n\
         \x20   {dom} plan --mdb {mdb} --image-server {is_addr} {dom_flags}\n\
         - Add an image (as the image builder):\n\
         \x20   {it} --image-server {is_addr} {builder} add app.2 {app1} \"\" {trig}\n\
         - Return to the previous image:  {mdb_bin} --mdb {mdb} rollback machine-1\n\
         - Stop updates for one machine:  {mdb_bin} --mdb {mdb} set machine-2 --disable-updates true\n\
         - Stop updates fleet-wide (as admin):\n\
         \x20   {dom} disable-updates \"maintenance\" --dominator {dom_addr} {admin}\n\n\
         Press Ctrl-C to stop the fleet{cleanup}.",
        dir = d(i.dir),
        roots = d(&i.dir.join("roots")),
        logs = d(i.logs),
        r1 = d(i.root1),
        app1 = d(&i.images.join("app.1")),
        trig = d(&i.images.join("app.triggers.json")),
        cleanup = if i.removes_dir { " and remove this directory" } else { "" },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(security: &Security) -> String {
        let p = Path::new("/f");
        instructions(&Instructions {
            security,
            dir: p,
            dom_addr: "127.0.0.1:6970",
            is_addr: "127.0.0.1:6971",
            root1: &p.join("roots/machine-1"),
            logs: &p.join("logs"),
            mdb_bin: Path::new("/bin/mdb"),
            mdb: &p.join("mdb.json"),
            dominator: Path::new("/bin/dominator"),
            imagetool: Path::new("/bin/imagetool"),
            images: &p.join("images"),
            removes_dir: true,
        })
    }

    #[test]
    fn subds_never_run_the_hosts_service_command() {
        let a = subd_args(&Security::Insecure, Path::new("/r"), "127.0.0.1:1");
        let i = a.iter().position(|x| x == "--service-command").unwrap();
        assert_eq!(a[i + 1], "echo");
    }

    #[test]
    fn printed_commands_carry_the_flags_each_role_needs() {
        let t = text(&Security::Tls("/f/certs".into()));
        assert!(t.contains("https://127.0.0.1:6970/"), "{t}");
        assert!(
            t.contains("--cert /f/certs/admin.cert --key /f/certs/admin.key"),
            "{t}"
        );
        let imagetool = t.lines().find(|l| l.contains("/bin/imagetool")).unwrap();
        assert!(
            imagetool.contains("--ca-file /f/certs/CA.pem --cert-file /f/certs/builder.cert --key-file /f/certs/builder.key"),
            "{imagetool}"
        );
        let plan = t.lines().find(|l| l.contains("dominator plan")).unwrap();
        assert!(
            plan.contains("--cert-file /f/certs/dominator/cert.pem"),
            "{plan}"
        );
        let disable = t
            .lines()
            .find(|l| l.contains("disable-updates \""))
            .unwrap();
        assert!(
            disable.contains("--cert-file /f/certs/admin.cert"),
            "{disable}"
        );
        assert!(!t.contains("--permit-insecure-mode --"), "{t}");
        let rollout = t.lines().find(|l| l.contains("--required app.1")).unwrap();
        assert!(
            rollout.contains("--image-server 127.0.0.1:6971 --ca-file /f/certs/CA.pem --cert-file /f/certs/builder.cert"),
            "{rollout}"
        );

        let t = text(&Security::Insecure);
        assert!(
            t.contains("http://127.0.0.1:6970/") && t.contains("INSECURE"),
            "{t}"
        );
        let plan = t.lines().find(|l| l.contains("dominator plan")).unwrap();
        assert!(plan.contains("--permit-insecure-mode"), "{plan}");
        assert!(!t.contains("--cert-file"), "{t}");
    }

    #[test]
    fn banner_names_no_internal_function_and_a_gone_subd_is_reported() {
        let t = text(&Security::Tls("/f/certs".into()));
        assert!(!t.contains("make_all"), "{t}");
        assert!(t.contains("as `dominator make-certs` does"), "{t}");
        use std::os::unix::process::ExitStatusExt;
        let line = subd_gone("subd-2", ExitStatus::from_raw(15), Path::new("/f/logs"));
        assert!(line.starts_with("subd-2 exited (signal: 15"), "{line}");
        assert!(line.contains("without machine-2"), "{line}");
        assert!(line.ends_with("/f/logs/subd-2.log"), "{line}");
    }
}
