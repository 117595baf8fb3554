//! The command line: clap definitions, and the rewrite that lets Dominator's single-dash
//! spellings (`-imageServerHostname=HOST`, `-imageServerPortNum N`) work unchanged.

use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;
use wire::security::ClientTlsArgs;

/// Packages directories and tarballs into images on an imageserver, and inspects them.
#[derive(Parser, Debug)]
#[command(name = "imagetool", version)]
pub struct Cli {
    /// The imageserver, HOST[:PORT], or several separated by commas (tried in order: the
    /// next on a connection error or a 5xx, never on a 4xx)
    #[arg(
        long,
        env = "IMAGE_SERVER",
        default_value = "localhost:6971",
        global = true,
        value_name = "HOST[:PORT][,…]"
    )]
    pub image_server: String,
    /// Common name the imageserver's certificate must carry (its role)
    #[arg(long, global = true, value_name = "NAME", default_value = wire::client::IMAGESERVER_NAME)]
    pub image_server_name: String,
    /// Print machine-readable JSON (list, show, diff, listunrefobj, add's summary, …)
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Add an image from a directory, a .tar or a .tar.gz/.tgz
    Add {
        name: String,
        /// Directory or tar archive (gzip detected by content)
        path: PathBuf,
        /// Filter file; "" makes a sparse image (an empty file makes a full one)
        filter_file: String,
        /// Triggers file (JSON); "" means none
        triggers_file: String,
        /// Hook programs: DIR/pre/* run before the update changes anything, DIR/post/*
        /// after it, each in byte order of the names
        #[arg(long, value_name = "DIR")]
        hooks: Option<PathBuf>,
        /// State file: regexes (filter syntax) of paths seeded on a machine only when
        /// nothing is there, and never overwritten, corrected or deleted afterwards
        #[arg(long = "state", value_name = "FILE")]
        state_file: Option<PathBuf>,
        /// The image expires DURATION after the add (e.g. 15m, 2h, 1d, 1h30m; at least
        /// 15 minutes): it then disappears from `list`, its name is never reused and its
        /// unique objects become unreferenced. Default: never
        #[arg(long, value_name = "DURATION", alias = "expiresIn")]
        expires_in: Option<String>,
    },
    /// Add an image made from a live host: the tree its subd last scanned (its scan
    /// exclusions and /.subd left out), with the files the imageserver lacks read from
    /// the host
    Adds {
        /// Image name; with --every, the PREFIX under which PREFIX/1, PREFIX/2, … are added
        name: String,
        /// The host's subd, HOST[:PORT] (port 6969 by default)
        host: String,
        /// Filter file; "" makes a sparse image (an empty file makes a full one)
        filter_file: String,
        /// Triggers file (JSON); "" means none
        triggers_file: String,
        /// Snapshot again every DURATION (e.g. 90s, 5m, 1h, 1d), adding NAME/<n+1> only
        /// when the host changed since the newest image under NAME, until SIGINT/SIGTERM
        #[arg(long, value_name = "DURATION")]
        every: Option<String>,
        /// Fresh scans to wait for and retry from when a file changes while it is read,
        /// before failing with its path
        #[arg(long, value_name = "N", default_value_t = 3)]
        retries: u32,
    },
    /// List image names, version-sorted
    List { prefix: Option<String> },
    /// Print the newest image directly in DIR, in `list`'s version order (what an MDB
    /// image name naming DIR follows; error if DIR holds no image)
    FindLatestImage { dir: String },
    /// Show an image's tree, one line per path, root first
    Show { name: String },
    /// Show an image's filter lines
    ShowFilter { name: String },
    /// Show an image's triggers (JSON)
    ShowTriggers { name: String },
    /// Show an image's hooks in running order: PHASE NAME HASH SIZE
    ShowHooks { name: String },
    /// Show an image's state lines (paths seeded only when absent)
    ShowState { name: String },
    /// Exit 0 if the image exists, 1 if not (prints nothing)
    Check { name: String },
    /// Delete an image (its name is never reused)
    Delete { name: String },
    /// Make an image expire DURATION from now (e.g. 2h, 1d), or never; expiry can only be
    /// extended
    ChangeImageExpiration {
        name: String,
        /// DURATION (e.g. 15m, 2h, 1d) or `never`
        expires_in: String,
    },
    /// Print when an image expires (UTC), or `never`
    GetImageExpiration { name: String },
    /// Accepted so Dominator's scripts run unchanged: image names need no directories
    /// here, so this only checks that NAME is a valid name no image holds
    Mkdir { name: String },
    /// Paths added, removed and changed from image A to image B
    Diff { a: String, b: String },
    /// Unpack an image into a new or empty directory, with owners, modes, mtimes, links
    Get { name: String, dir: PathBuf },
    /// List objects no image refers to, oldest-unreferenced first: HASH SIZE
    Listunrefobj,
    /// Delete unreferenced objects, oldest first, until both PERCENTAGE % of them and
    /// BYTES bytes are gone ("100 0" = all)
    Delunrefobj { percentage: u8, bytes: u64 },
    /// Make a local directory match an image, with the same diff and update code as subd
    /// (fetches what the directory lacks into DIR/.subd/objects, then activates by rename)
    PatchDirectory {
        name: String,
        dir: PathBuf,
        /// Apply even if a full image would delete more than half of the directory
        #[arg(long)]
        allow_unsafe: bool,
        /// Run the image's triggers with this command (`CMD SERVICE stop|start|reload`);
        /// by default triggers are only listed
        #[arg(long, value_name = "CMD", alias = "runTriggers")]
        service_command: Option<String>,
    },
}

/// Rewrites Dominator's `-imageServerHostname[=| ]HOST` and `-imageServerPortNum[=| ]N`
/// (one or two dashes) into `--image-server HOST:PORT`. Other arguments pass unchanged.
pub fn rewrite_dominator_flags(args: Vec<OsString>) -> Vec<OsString> {
    let mut host: Option<String> = None;
    let mut port: Option<String> = None;
    let mut out = Vec::with_capacity(args.len() + 1);
    let mut it = args.into_iter();
    if let Some(a0) = it.next() {
        out.push(a0);
    }
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().to_string();
        let bare = s.trim_start_matches('-');
        let dashes = s.len() - bare.len();
        let (key, inline) = match bare.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (bare, None),
        };
        if (dashes == 1 || dashes == 2)
            && (key == "imageServerHostname" || key == "imageServerPortNum")
        {
            let value = match inline {
                Some(v) => Some(v),
                None => it.next().map(|v| v.to_string_lossy().to_string()),
            };
            match (key, value) {
                ("imageServerHostname", Some(v)) => host = Some(v),
                ("imageServerPortNum", Some(v)) => port = Some(v),
                // A missing value: let clap report the flag as unknown (exit 2).
                _ => out.push(a),
            }
            continue;
        }
        out.push(a);
    }
    if host.is_some() || port.is_some() {
        let host = host.unwrap_or_else(|| "localhost".into());
        let port = port.unwrap_or_else(|| wire::client::IMAGESERVER_PORT.to_string());
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host
        };
        out.insert(1, OsString::from(format!("--image-server={host}:{port}")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(v: &[&str]) -> Vec<String> {
        rewrite_dominator_flags(v.iter().map(OsString::from).collect())
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn dominator_spellings() {
        assert_eq!(
            rw(&[
                "t",
                "-imageServerHostname=h",
                "-imageServerPortNum",
                "7",
                "list"
            ]),
            ["t", "--image-server=h:7", "list"]
        );
        assert_eq!(
            rw(&["t", "-imageServerHostname", "h", "list"]),
            ["t", "--image-server=h:6971", "list"]
        );
        assert_eq!(
            rw(&["t", "--imageServerPortNum=9", "list"]),
            ["t", "--image-server=localhost:9", "list"]
        );
        assert_eq!(rw(&["t", "list", "x"]), ["t", "list", "x"]);
        let cli = Cli::try_parse_from(rw(&["t", "-imageServerHostname=h", "check", "n"])).unwrap();
        assert_eq!(cli.image_server, "h:6971");
    }
}
