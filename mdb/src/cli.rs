//! The `mdb` command: inspect and edit the machine database the way operators expect.
//! Every edit goes through `store::edit` (locked, atomic, recorded in the history).

use crate::machine::{Machine, Mdb};
use crate::store::{self, StoreError};
use clap::{ArgAction, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

/// Why an `mdb` command failed; its text is the one line `mdb` prints.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Reading or editing the MDB failed (an edit's own refusal included).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `show` of a host the MDB does not hold.
    #[error("no machine {host:?} in {}", .path.display())]
    NoMachine { host: String, path: PathBuf },
    /// `set` without a field to change.
    #[error("nothing to change: give --required, --planned, --disable-updates, --ip or --tag")]
    NothingToChange,
    /// Writing the output failed.
    #[error(transparent)]
    Output(#[from] std::io::Error),
    /// Writing a history entry as JSON failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Inspect and edit the machine database (MDB) the dominator enforces.
#[derive(Parser, Debug)]
#[command(name = "mdb", version)]
pub struct Cli {
    /// The MDB file
    #[arg(long, global = true, env = "MDB_FILE", default_value = crate::DEFAULT_MDB_PATH)]
    pub mdb: PathBuf,
    /// The imageserver (HOST[:PORT]): `set` and `add` then warn when it lacks the
    /// `--required` or `--planned` image (the edit is made all the same)
    #[arg(long, global = true, env = "IMAGE_SERVER", value_name = "HOST[:PORT]")]
    pub image_server: Option<String>,
    #[command(flatten)]
    pub tls: wire::security::ClientTlsArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Fields `add` and `set` may change.
#[derive(clap::Args, Debug, Default)]
pub struct Fields {
    /// The image the machine must run
    #[arg(long, value_name = "IMAGE")]
    pub required: Option<String>,
    /// The image to prefetch (empty string clears it)
    #[arg(long, value_name = "IMAGE")]
    pub planned: Option<String>,
    /// Stop (true) or allow (false) updates to this machine
    #[arg(long, value_name = "BOOL", action = ArgAction::Set)]
    pub disable_updates: Option<bool>,
    /// The address to dial instead of the host name (HOST[:PORT]; empty string clears it);
    /// `--address` is the same flag (pointing a dead host's record at its replacement)
    #[arg(long, visible_alias = "address", value_name = "ADDR")]
    pub ip: Option<String>,
    /// Set a tag (repeatable), e.g. `--tag DisableSafetyCheck=true`
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Remove a tag (repeatable)
    #[arg(long = "remove-tag", value_name = "KEY")]
    pub remove_tags: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List the machines (host, required image, planned image, flags)
    List {
        /// Print the MDB as JSON
        #[arg(long)]
        json: bool,
    },
    /// Show one machine's record as JSON
    Show { host: String },
    /// Change a machine's record
    Set {
        host: String,
        #[command(flatten)]
        fields: Fields,
    },
    /// Add a machine (creates the MDB file if needed)
    Add {
        host: String,
        #[command(flatten)]
        fields: Fields,
    },
    /// Remove a machine (nothing is done to the machine itself)
    Remove { host: String },
    /// Validate an MDB file without changing anything
    Check { file: PathBuf },
    /// Show every recorded change to a machine, oldest first
    History {
        host: String,
        /// Print the raw JSON lines
        #[arg(long)]
        json: bool,
    },
    /// Return a machine to its previous RequiredImage (a second rollback redoes)
    Rollback { host: String },
}

/// Asks the imageserver `server` whether it holds the images `fields` name (`--required`,
/// `--planned`); one line per image it lacks, or per image it could not be asked about.
pub fn missing_image_warnings(
    server: &str,
    tls: &wire::security::ClientTlsArgs,
    fields: &Fields,
) -> Vec<String> {
    let names: Vec<&str> = [&fields.required, &fields.planned]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        return Vec::new();
    }
    let checked = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                let security = tls.security().map_err(|e| e.to_string())?;
                let client = wire::client::ImageServerClient::new(server, &security)
                    .map_err(|e| disk::report::error_line(&e))?;
                let mut found = Vec::new();
                for n in &names {
                    found.push(
                        client
                            .check_image(n)
                            .await
                            .map_err(|e| disk::report::error_line(&e))?,
                    );
                }
                Ok::<_, String>(found)
            })
        });
    match checked {
        Ok(found) => names
            .iter()
            .zip(found)
            .filter(|(_, there)| !there)
            .map(|(n, _)| {
                format!(
                    "the imageserver {server} has no image {n:?}: the machine will show \
                     `image not ready` until it is added"
                )
            })
            .collect(),
        Err(e) => vec![format!(
            "could not check the images on the imageserver {server}: {e}"
        )],
    }
}

/// For `set` and `add` with an imageserver configured: a warning on stderr per image it
/// lacks (`missing_image_warnings`).
fn warn_of_missing_images(cli: &Cli) {
    if let (Some(server), Command::Set { fields, .. } | Command::Add { fields, .. }) =
        (&cli.image_server, &cli.command)
    {
        for w in missing_image_warnings(server, &cli.tls, fields) {
            eprintln!("mdb: warning: {w}");
        }
    }
}

/// Runs one command, writing human output to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    let path = &cli.mdb;
    warn_of_missing_images(&cli);
    match cli.command {
        Command::List { json } => {
            let mdb = store::load(path)?;
            if json {
                write!(out, "{}", mdb.to_json())?;
            } else {
                list(&mdb, out)?;
            }
        }
        Command::Show { host } => {
            let mdb = store::load(path)?;
            let m = mdb.get(&host).ok_or_else(|| CliError::NoMachine {
                host: host.clone(),
                path: path.clone(),
            })?;
            writeln!(out, "{m}")?;
        }
        Command::Set { host, fields } => {
            if fields.is_empty() {
                return Err(CliError::NothingToChange);
            }
            let m = store::edit(path, false, |mdb| {
                let m = mdb.get_mut(&host).ok_or_else(|| not_found(&host, path))?;
                fields.apply(m)?;
                Ok(("set", m.clone()))
            })?;
            writeln!(out, "{m}")?;
        }
        Command::Add { host, fields } => {
            let m = store::edit(path, true, |mdb| {
                let mut m = Machine::new(&host);
                fields.apply(&mut m)?;
                mdb.add(m.clone())
                    .map_err(|e| StoreError::Edit(e.to_string()))?;
                Ok(("add", m))
            })?;
            writeln!(out, "{m}")?;
        }
        Command::Remove { host } => {
            store::edit(path, false, |mdb| {
                mdb.remove(&host).ok_or_else(|| not_found(&host, path))?;
                Ok(("remove", ()))
            })?;
            writeln!(out, "removed {host}")?;
        }
        Command::Check { file } => {
            let (mdb, warnings) = store::load_with_warnings(&file)?;
            for w in &warnings {
                eprintln!("mdb: warning: {w}");
            }
            let n = mdb.machines().count();
            let ignored = mdb.ignored();
            write!(out, "{}: ok, {n} machines", file.display())?;
            if ignored > 0 {
                write!(out, " ({ignored} entries without a Hostname ignored)")?;
            }
            writeln!(out)?;
        }
        Command::History { host, json } => {
            let entries = store::history(path, &host)?;
            for e in &entries {
                if json {
                    writeln!(out, "{}", serde_json::to_string(e)?)?;
                } else {
                    writeln!(
                        out,
                        "{}  {:<8} by {:<10} {}",
                        format_time(e.time),
                        e.action,
                        e.user,
                        describe_change(e.before.as_ref(), e.after.as_ref())
                    )?;
                }
            }
            if entries.is_empty() && !json {
                writeln!(out, "no recorded changes for {host}")?;
            }
        }
        Command::Rollback { host } => {
            let entries = store::history(path, &host)?;
            let (from, to) = store::edit(path, false, |mdb| {
                let m = mdb.get_mut(&host).ok_or_else(|| not_found(&host, path))?;
                let to = store::previous_image(&entries, &m.required_image).ok_or_else(|| {
                    StoreError::Edit(format!(
                        "no earlier RequiredImage recorded for {host} (see `mdb history {host}`)"
                    ))
                })?;
                let from = std::mem::replace(&mut m.required_image, to.clone());
                Ok(("rollback", (from, to)))
            })?;
            writeln!(out, "{host}: RequiredImage {from} -> {to}")?;
        }
    }
    Ok(())
}

fn not_found(host: &str, path: &std::path::Path) -> StoreError {
    StoreError::Edit(format!("no machine {host:?} in {}", path.display()))
}

impl Fields {
    fn is_empty(&self) -> bool {
        self.required.is_none()
            && self.planned.is_none()
            && self.disable_updates.is_none()
            && self.ip.is_none()
            && self.tags.is_empty()
            && self.remove_tags.is_empty()
    }

    fn apply(&self, m: &mut Machine) -> Result<(), StoreError> {
        if let Some(r) = &self.required {
            m.required_image = r.clone();
        }
        if let Some(p) = &self.planned {
            m.planned_image = p.clone();
        }
        if let Some(d) = self.disable_updates {
            m.disable_updates = d;
        }
        if let Some(ip) = &self.ip {
            m.ip_address = (!ip.is_empty()).then(|| ip.clone());
        }
        for t in &self.tags {
            let (k, v) = t.split_once('=').unwrap_or((t.as_str(), ""));
            if k.is_empty() {
                return Err(StoreError::Edit(format!("--tag {t:?}: empty key")));
            }
            m.tags.insert(k.to_string(), v.to_string());
        }
        for k in &self.remove_tags {
            m.tags.remove(k);
        }
        m.validate()
            .map_err(|e| StoreError::Edit(format!("{}: {e}", m.hostname)))
    }
}

fn list(mdb: &Mdb, out: &mut dyn Write) -> std::io::Result<()> {
    let rows: Vec<[String; 4]> = mdb
        .machines()
        .map(|m| {
            let mut flags = Vec::new();
            if m.disable_updates {
                flags.push("updates-disabled".to_string());
            }
            if let Some(ip) = &m.ip_address {
                flags.push(format!("ip={ip}"));
            }
            for (k, v) in &m.tags {
                flags.push(if v.is_empty() {
                    k.clone()
                } else {
                    format!("{k}={v}")
                });
            }
            [
                m.hostname.clone(),
                or_dash(&m.required_image),
                or_dash(&m.planned_image),
                flags.join(","),
            ]
        })
        .collect();
    let header = ["HOST", "REQUIRED", "PLANNED", "FLAGS"].map(String::from);
    let mut widths = [0usize; 3];
    for r in std::iter::once(&header).chain(&rows) {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    for r in std::iter::once(&header).chain(&rows) {
        let line = format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.into()
    }
}

/// Unix seconds as `YYYY-MM-DD hh:mm:ss` UTC.
pub fn format_time(t: u64) -> String {
    let days = (t / 86400) as i64;
    let secs = t % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// What an edit changed on one machine, field by field: `RequiredImage a -> b`,
/// `PlannedImage (none) -> p`, `DisableUpdates false -> true`, `Tags {…} -> {…}`; an added
/// or removed machine shows `(absent)` on its missing side.
pub fn describe_change(before: Option<&Machine>, after: Option<&Machine>) -> String {
    let img = |s: &str| {
        if s.is_empty() {
            "(none)".to_string()
        } else {
            s.to_string()
        }
    };
    let (b, a) = match (before, after) {
        (Some(b), Some(a)) => (b, a),
        (None, Some(a)) => return format!("(absent) -> RequiredImage {}", img(&a.required_image)),
        (Some(b), None) => return format!("RequiredImage {} -> (absent)", img(&b.required_image)),
        (None, None) => return "(absent)".into(),
    };
    let mut parts = Vec::new();
    if b.required_image != a.required_image {
        parts.push(format!(
            "RequiredImage {} -> {}",
            img(&b.required_image),
            img(&a.required_image)
        ));
    }
    if b.planned_image != a.planned_image {
        parts.push(format!(
            "PlannedImage {} -> {}",
            img(&b.planned_image),
            img(&a.planned_image)
        ));
    }
    if b.disable_updates != a.disable_updates {
        parts.push(format!(
            "DisableUpdates {} -> {}",
            b.disable_updates, a.disable_updates
        ));
    }
    if b.ip_address != a.ip_address {
        let ip = |i: &Option<String>| i.clone().unwrap_or_else(|| "(none)".into());
        parts.push(format!(
            "IpAddress {} -> {}",
            ip(&b.ip_address),
            ip(&a.ip_address)
        ));
    }
    if b.tags != a.tags {
        parts.push(format!("Tags {:?} -> {:?}", b.tags, a.tags));
    }
    if parts.is_empty() {
        parts.push("other fields changed".into());
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn times() {
        assert_eq!(super::format_time(0), "1970-01-01 00:00:00");
        assert_eq!(super::format_time(1_709_251_199), "2024-02-29 23:59:59");
    }
}
