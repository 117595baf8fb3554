//! The `mdb` command: inspect and edit the machine database the way operators expect.
//! Every edit goes through `store::edit` (locked, atomic, recorded in the history).

use crate::machine::{Machine, Mdb};
use crate::remote::{ImageServerArgs, RemoteError};
use crate::store::{self, HistoryEntry, StoreError};
use clap::{ArgAction, Parser, Subcommand};
use model::select::{BadWhere, Where};
use model::stream::Resolution;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

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
    /// A `--where` term that cannot be used.
    #[error(transparent)]
    Where(#[from] BadWhere),
    /// Asking the imageserver (`--image-server`) failed.
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

/// Inspect and edit the machine database (MDB) the dominator enforces.
#[derive(Parser, Debug)]
#[command(name = "mdb", version)]
pub struct Cli {
    /// The MDB file
    #[arg(long, global = true, env = "MDB_FILE", default_value = crate::DEFAULT_MDB_PATH)]
    pub mdb: PathBuf,
    #[command(flatten)]
    pub image_server: ImageServerArgs,
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

/// A group of machines: `--where TAG=VALUE`, `--where TAG`, `--where Hostname=GLOB`
/// (repeatable; every term must hold).
#[derive(clap::Args, Debug, Default)]
pub struct Selection {
    /// Select machines by tag (`TAG=VALUE`, or `TAG` for any value) or host name
    /// (`Hostname=GLOB`, `*` and `?`); repeatable, every term must hold
    #[arg(long = "where", value_name = "TAG=VALUE")]
    pub wheres: Vec<String>,
}

impl Selection {
    fn parse(&self) -> Result<Option<Where>, BadWhere> {
        if self.wheres.is_empty() {
            return Ok(None);
        }
        Where::parse(&self.wheres).map(Some)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List the machines (host, required image, planned image, flags)
    List {
        /// Print the MDB (or the selected machines) as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        select: Selection,
    },
    /// Show one machine's record as JSON (with --image-server, then what its image names
    /// stand for)
    Show { host: String },
    /// Change a machine's record, or every record `--where` selects in one edit
    Set {
        #[arg(required_unless_present = "wheres", conflicts_with = "wheres")]
        host: Option<String>,
        #[command(flatten)]
        select: Selection,
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
    /// Show every recorded change (to a machine, or to the machines `--where` selects),
    /// oldest first, with its edit id (`#N`)
    History {
        #[arg(conflicts_with = "wheres")]
        host: Option<String>,
        #[command(flatten)]
        select: Selection,
        /// Print the raw JSON lines
        #[arg(long)]
        json: bool,
    },
    /// Return a machine (or every machine `--where` selects, in one edit) to its previous
    /// RequiredImage (a second rollback redoes); a machine following an image stream is
    /// pinned to the version before the stream's newest (needs --image-server). With
    /// `--entry ID`, undo that edit as a whole instead.
    Rollback {
        #[arg(conflicts_with_all = ["wheres", "entry"], required_unless_present_any = ["wheres", "entry"])]
        host: Option<String>,
        #[command(flatten)]
        select: Selection,
        /// Undo edit ID (see `mdb history`): every machine and field it changed
        #[arg(long, value_name = "ID", conflicts_with = "wheres")]
        entry: Option<u64>,
    },
}

/// Asks the imageserver `server` whether it holds the images `fields` name (`--required`,
/// `--planned`); one line per image it lacks, or per image it could not be asked about.
pub fn missing_image_warnings(
    server: &str,
    args: &ImageServerArgs,
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
                let security = args.tls.security().map_err(|e| e.to_string())?;
                let client = wire::client::ImageServerClient::with_server_name(
                    server,
                    &security,
                    &args.image_server_name,
                )
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
        (&cli.image_server.image_server, &cli.command)
    {
        for w in missing_image_warnings(server, &cli.image_server, fields) {
            eprintln!("mdb: warning: {w}");
        }
    }
}

/// Runs one command, writing human output to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    let path = &cli.mdb;
    warn_of_missing_images(&cli);
    match cli.command {
        Command::List { json, select } => {
            let mut mdb = store::load(path)?;
            if let Some(w) = select.parse()? {
                let hosts = selected(&mdb, &w, path)?;
                mdb.entries
                    .retain(|m| hosts.iter().any(|h| h.eq_ignore_ascii_case(&m.hostname)));
            }
            if json {
                write!(out, "{}", mdb.to_json())?;
            } else {
                list(&mdb, out)?;
            }
        }
        Command::Show { host } => show(path, &host, &cli.image_server, out)?,
        Command::Set {
            host,
            select,
            fields,
        } => set(path, host.as_deref(), &select, &fields, out)?,
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
        Command::History { host, select, json } => {
            history(path, host.as_deref(), &select, json, out)?
        }
        Command::Rollback {
            host,
            select,
            entry,
        } => match entry {
            Some(id) => undo_edit(path, id, out)?,
            None => rollback(path, host.as_deref(), &select, &cli.image_server, out)?,
        },
    }
    Ok(())
}

/// The hosts `w` selects; a selection matching nothing is an error naming it.
fn selected(mdb: &Mdb, w: &Where, path: &Path) -> Result<Vec<String>, StoreError> {
    let hosts = mdb.select(w);
    if hosts.is_empty() {
        return Err(StoreError::NoMatch {
            selection: w.to_string(),
            path: path.to_path_buf(),
        });
    }
    Ok(hosts)
}

/// `show`: the record, then (with `--image-server`) what its image names stand for.
fn show(
    path: &Path,
    host: &str,
    remote: &ImageServerArgs,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let mdb = store::load(path)?;
    let m = mdb.get(host).ok_or_else(|| CliError::NoMachine {
        host: host.to_string(),
        path: path.to_path_buf(),
    })?;
    let fields: Vec<(&str, &str)> = [
        ("RequiredImage", m.required_image.as_str()),
        ("PlannedImage", m.planned_image.as_str()),
    ]
    .into_iter()
    .filter(|(_, n)| !n.is_empty())
    .collect();
    let names: Vec<&str> = fields.iter().map(|(_, n)| *n).collect();
    // Asked first, so a failure prints nothing but the error.
    let found = remote.lookup(&names)?;
    writeln!(out, "{m}")?;
    if let Some(found) = found {
        for ((field, name), l) in fields.iter().zip(found) {
            writeln!(
                out,
                "{}",
                crate::remote::describe(field, name, &l.resolution)
            )?;
        }
    }
    Ok(())
}

/// `set`: one machine, or every machine `--where` selects, in one edit.
fn set(
    path: &Path,
    host: Option<&str>,
    select: &Selection,
    fields: &Fields,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    if fields.is_empty() {
        return Err(CliError::NothingToChange);
    }
    if let Some(host) = host {
        let m = store::edit(path, false, |mdb| {
            let m = mdb.get_mut(host).ok_or_else(|| not_found(host, path))?;
            fields.apply(m)?;
            Ok(("set", m.clone()))
        })?;
        writeln!(out, "{m}")?;
        return Ok(());
    }
    let w = select.parse()?.ok_or(BadWhere::Nothing)?;
    let (hosts, id) = store::edit_recorded(path, false, |mdb| {
        let hosts = selected(mdb, &w, path)?;
        for h in &hosts {
            fields.apply(mdb.get_mut(h).expect("selected"))?;
        }
        Ok(("set", hosts))
    })?;
    report_group(out, "set", &hosts, id)
}

/// One line naming the machines a group edit changed and its edit id.
fn report_group(
    out: &mut dyn Write,
    what: &str,
    hosts: &[String],
    id: Option<u64>,
) -> Result<(), CliError> {
    match id {
        Some(id) => writeln!(
            out,
            "edit #{id}: {what} {} machines: {}",
            hosts.len(),
            hosts.join(", ")
        )?,
        None => writeln!(
            out,
            "no change: {} machines already as asked: {}",
            hosts.len(),
            hosts.join(", ")
        )?,
    }
    Ok(())
}

/// `history`: one machine's lines, the selected machines' lines, or all.
fn history(
    path: &Path,
    host: Option<&str>,
    select: &Selection,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let mut entries = store::history_all(path)?;
    if let Some(h) = host {
        entries.retain(|e| e.host.eq_ignore_ascii_case(h));
    } else if let Some(w) = select.parse()? {
        let hosts = selected(&store::load(path)?, &w, path)?;
        entries.retain(|e| hosts.iter().any(|h| h.eq_ignore_ascii_case(&e.host)));
    }
    for e in &entries {
        if json {
            writeln!(out, "{}", serde_json::to_string(e)?)?;
        } else {
            writeln!(
                out,
                "{}  {:<8} by {:<10} #{:<4} {}{}",
                format_time(e.time),
                e.action,
                e.user,
                e.edit_id(),
                if host.is_some() {
                    String::new()
                } else {
                    format!("{}: ", e.host)
                },
                describe_change(e.before.as_ref(), e.after.as_ref())
            )?;
        }
    }
    if entries.is_empty() && !json {
        writeln!(out, "no recorded changes for {}", host.unwrap_or("the MDB"))?;
    }
    Ok(())
}

/// `rollback --entry ID`: undoes that edit as a whole, in one new edit.
fn undo_edit(path: &Path, id: u64, out: &mut dyn Write) -> Result<(), CliError> {
    let entries: Vec<HistoryEntry> = store::history_all(path)?
        .into_iter()
        .filter(|e| e.edit_id() == id)
        .collect();
    if entries.is_empty() {
        return Err(StoreError::NoEdit(id).into());
    }
    let (hosts, new) = store::edit_recorded(path, false, |mdb| {
        Ok(("rollback", store::undo(mdb, &entries)?))
    })?;
    report_group(out, &format!("undid edit #{id} on"), &hosts, new)
}

/// `rollback HOST` or `rollback --where …`: each machine back to its previous
/// RequiredImage (a stream follower: pinned to the stream's version before its newest),
/// all in one edit.
fn rollback(
    path: &Path,
    host: Option<&str>,
    select: &Selection,
    remote: &ImageServerArgs,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let w = select.parse()?;
    let mdb = store::load(path)?;
    let hosts = match (host, &w) {
        (Some(h), _) => vec![mdb
            .get(h)
            .ok_or_else(|| not_found(h, path))?
            .hostname
            .clone()],
        (None, Some(w)) => selected(&mdb, w, path)?,
        (None, None) => return Err(BadWhere::Nothing.into()),
    };
    let streams = stream_targets(&mdb, &hosts, remote)?;
    let all = store::history_all(path)?;
    let (changes, id) = store::edit_recorded(path, false, |mdb| {
        let mut changes = Vec::new();
        for h in &hosts {
            let m = mdb.get_mut(h).ok_or_else(|| not_found(h, path))?;
            let to = rollback_target(m, &all, &streams)?;
            let from = std::mem::replace(&mut m.required_image, to.clone());
            changes.push(format!("{}: RequiredImage {from} -> {to}", m.hostname));
        }
        Ok(("rollback", changes))
    })?;
    for c in &changes {
        writeln!(out, "{c}")?;
    }
    if w.is_some() {
        if let Some(id) = id {
            writeln!(out, "edit #{id}: rolled back {} machines", changes.len())?;
        }
    }
    Ok(())
}

/// For each stream name among `hosts`' RequiredImages (asked of `--image-server`, if
/// given): the version before its newest, or `None` when it has no earlier one.
fn stream_targets(
    mdb: &Mdb,
    hosts: &[String],
    remote: &ImageServerArgs,
) -> Result<BTreeMap<String, Option<String>>, CliError> {
    let mut names: Vec<&str> = hosts
        .iter()
        .filter_map(|h| mdb.get(h))
        .map(|m| m.required_image.as_str())
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names.dedup();
    let mut out = BTreeMap::new();
    for (name, l) in names.iter().zip(remote.lookup(&names)?.unwrap_or_default()) {
        if let Resolution::Stream { latest } = &l.resolution {
            let prev = model::stream::previous_in(name, &l.names, latest).map(str::to_string);
            out.insert(name.to_string(), prev);
        }
    }
    Ok(out)
}

/// Where `rollback` takes `m`: for a stream follower, the stream's version before its
/// newest; else the previous RequiredImage its history records.
fn rollback_target(
    m: &Machine,
    all: &[HistoryEntry],
    streams: &BTreeMap<String, Option<String>>,
) -> Result<String, StoreError> {
    let host = &m.hostname;
    if let Some(prev) = streams.get(&m.required_image) {
        return prev.clone().ok_or_else(|| {
            StoreError::Edit(format!(
                "{host} follows image stream {} and it holds no version before its newest",
                m.required_image
            ))
        });
    }
    let entries: Vec<HistoryEntry> = all
        .iter()
        .filter(|e| e.host.eq_ignore_ascii_case(host))
        .cloned()
        .collect();
    store::previous_image(&entries, &m.required_image).ok_or_else(|| {
        StoreError::Edit(format!(
            "no earlier RequiredImage recorded for {host} (see `mdb history {host}`)"
        ))
    })
}

fn not_found(host: &str, path: &Path) -> StoreError {
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
