//! `dominator local-fleet`: a complete fleet on this machine for trying the system out —
//! an imageserver, a dominator and three subds (the sibling binaries of the running
//! `dominator`), each on its own loopback port, subd roots as folders under a temporary
//! directory, the images of `testdata/fleet` (embedded) added with `imagetool`, and an MDB.
//! Ctrl-C (or SIGTERM) stops the children and removes the directory.
//!
//! The security flags of every child are built in one place, `Security::daemon_flags` and
//! `Security::client_flags`.

use anyhow::{bail, Context};
use clap::Args;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

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
    pub fn make(dir: &Path) -> anyhow::Result<Security> {
        let certs = dir.join("certs");
        wire::certs::make_all(&certs, &[])
            .with_context(|| format!("making certificates in {}", certs.display()))?;
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
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the dominator executable")?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found beside {} (build the whole workspace: cargo build --workspace --bins)",
            p.display(),
            exe.display()
        );
    }
    Ok(p)
}

/// A free loopback port (bound then released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something accepts connections on `addr`.
pub async fn wait_listening(addr: &str, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited during start-up ({status}); see its log");
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what} did not start listening on {addr} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn(program: &Path, args: &[OsString], log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// Runs `imagetool add NAME PATH FILTER TRIGGERS` against `server`.
pub async fn imagetool_add(
    security: &Security,
    server: &str,
    name: &str,
    path: &Path,
    filter: &str,
    triggers: &str,
) -> anyhow::Result<()> {
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
        .context("running imagetool")?;
    if !out.status.success() {
        bail!(
            "imagetool add {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
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

/// Runs the local fleet until Ctrl-C or SIGTERM.
pub async fn run(args: LocalFleetArgs) -> anyhow::Result<()> {
    let (tmp, dir) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (None, d.canonicalize()?)
        }
        None => {
            let t = tempfile::Builder::new().prefix("local-fleet.").tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
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
    let mut children: Vec<(String, Child)> = Vec::new();
    if args.port != 0 {
        // Fail before starting anything: a fleet already on this port would otherwise
        // answer our readiness check and be mistaken for ours.
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", args.port)) {
            bail!(
                "port {} is not free ({e}): is another local fleet running? Pass --port 0 for any free port",
                args.port
            );
        }
    }

    let result = async {
        // The imageserver.
        let is_addr = format!("127.0.0.1:{}", free_port()?);
        let mut a: Vec<OsString> = vec![
            "--data-dir".into(),
            dir.join("imageserver").into(),
            "--listen".into(),
            is_addr.clone().into(),
        ];
        a.extend(security.daemon_flags("imageserver"));
        let mut c = spawn(&sibling("imageserver")?, &a, &logs.join("imageserver.log"))?;
        wait_listening(&is_addr, &mut c, "imageserver").await?;
        children.push(("imageserver".into(), c));

        // The images, with the seed's commands: (name, filter file, triggers file).
        let s = |p: &str| images.join(p).display().to_string();
        for (name, filter, triggers) in [
            ("app.0", String::new(), s("app.triggers.json")),
            ("app.1", String::new(), s("app.triggers.json")),
            ("base.0", s("base.filter"), String::new()),
        ] {
            imagetool_add(
                &security,
                &is_addr,
                name,
                &images.join(name),
                &filter,
                &triggers,
            )
            .await?;
        }

        // Three subds, each with a root folder.
        let mut machines = Vec::new();
        for i in 1..=3 {
            let root = dir.join("roots").join(format!("machine-{i}"));
            std::fs::create_dir_all(root.join("etc"))?;
            // subd refuses a root others can write: 0755 whatever the umask.
            std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            std::fs::write(root.join("etc/hostname"), format!("machine-{i}\n"))?;
            let addr = format!("127.0.0.1:{}", free_port()?);
            let mut c = spawn(
                &sibling("subd")?,
                &subd_args(&security, &root, &addr),
                &logs.join(format!("subd-{i}.log")),
            )?;
            wait_listening(&addr, &mut c, "subd").await?;
            children.push((format!("subd-{i}"), c));
            machines.push((format!("machine-{i}"), addr, root));
        }

        // The MDB.
        let mdb_path = dir.join("mdb.json");
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

        // The dominator.
        let port = if args.port == 0 {
            free_port()?
        } else {
            args.port
        };
        let dom_addr = format!("127.0.0.1:{port}");
        let mut a: Vec<OsString> = vec![
            "--mdb".into(),
            mdb_path.clone().into(),
            "--image-server".into(),
            is_addr.clone().into(),
            "--listen".into(),
            dom_addr.clone().into(),
        ];
        if args.disable_updates_at_startup {
            a.push("--disable-updates-at-startup".into());
        }
        a.extend(security.daemon_flags("dominator"));
        let exe = std::env::current_exe()?;
        let mut c = spawn(&exe, &a, &logs.join("dominator.log"))?;
        wait_listening(&dom_addr, &mut c, "dominator").await?;
        children.push(("dominator".into(), c));

        let mdb_bin = sibling("mdb")?;
        let r1 = &machines[0].2;
        println!(
            "{}",
            instructions(&Instructions {
                security: &security,
                dir: &dir,
                dom_addr: &dom_addr,
                is_addr: &is_addr,
                root1: r1,
                logs: &logs,
                mdb_bin: &mdb_bin,
                mdb: &mdb_path,
                dominator: &exe,
                imagetool: &sibling("imagetool")?,
                images: &images,
                removes_dir: tmp.is_some(),
            })
        );

        // Wait for Ctrl-C, SIGTERM, or a child dying.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    for (name, c) in children.iter_mut() {
                        if let Some(status) = c.try_wait()? {
                            bail!("{name} exited ({status}); see {}", logs.display());
                        }
                    }
                }
            }
        }
        Ok(())
    }
    .await;

    eprintln!("stopping the local fleet");
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
            eprintln!("{name} did not stop on SIGTERM; killing it");
            let _ = c.kill().await;
        }
    }
    match (&result, tmp) {
        // A failed run keeps its directory: the logs are what explains it.
        (Err(_), Some(t)) => eprintln!("logs kept in {}", t.keep().join("logs").display()),
        (_, t) => drop(t),
    }
    result
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
            "Security:     mutual TLS; CA and key pairs in {certs} (made with make_all,\n\
             \x20             as `dominator make-certs` does)\n\
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
         - Roll out a new image by editing the MDB:\n\
         \x20   {mdb_bin} --mdb {mdb} set machine-1 --required app.1\n\
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

        let t = text(&Security::Insecure);
        assert!(
            t.contains("http://127.0.0.1:6970/") && t.contains("INSECURE"),
            "{t}"
        );
        let plan = t.lines().find(|l| l.contains("dominator plan")).unwrap();
        assert!(plan.contains("--permit-insecure-mode"), "{plan}");
        assert!(!t.contains("--cert-file"), "{t}");
    }
}
