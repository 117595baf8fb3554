//! imagetool: packages a directory or tarball into an image on an imageserver, and
//! inspects, compares, unpacks and deletes images.
//!
//! Layout:
//! - `args`: the clap command line and the rewrite of Dominator's single-dash flags.
//! - `add`: building a tree from a directory or tarball and sending what the server lacks.
//! - `upload`: batched existence checks and streamed object uploads.
//! - `snapshot`: `adds` (an image from a live host's subd) and its `--every` loop.
//! - `listing`: `show` lines (Dominator's format) and `diff`.
//! - `get`: unpacking an image into a directory.
//! - `patch-directory` is a thin wrapper over `wire::patch::patch_directory`.
//!
//! `run` hands each command to its own `Session` method; a failure is an `Error` whose
//! text and causes make the one line `imagetool:` prints.

pub mod add;
pub mod args;
pub mod get;
pub mod hooks;
pub mod listing;
pub mod snapshot;
pub mod upload;

use args::{Cli, Command};
use std::io::Write;
use std::path::Path;
use wire::client::{ClientError, ImageServerClient};

/// Why a command failed; its text (with its causes) is the one line imagetool prints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Security(#[from] wire::security::SecurityError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Name(#[from] model::image::BadImageName),
    #[error(transparent)]
    Add(#[from] add::AddError),
    #[error(transparent)]
    Get(#[from] get::GetError),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error(transparent)]
    Interval(#[from] model::snapshot::BadInterval),
    #[error(transparent)]
    Expiry(#[from] model::expiry::ExpiryError),
    /// `change-image-expiration` or `get-image-expiration` failed.
    #[error("image {name} expiry")]
    Expiration { name: String, source: ClientError },
    /// Asking the imageserver about a name failed.
    #[error("asking the imageserver")]
    Ask { source: ClientError },
    /// `mkdir` of a name that holds (or held) an image.
    #[error("{0} is the name of an image, not a directory")]
    NotADirectory(model::ImageName),
    /// `DeleteImage` failed.
    #[error("deleting image {name}")]
    Delete { name: String, source: ClientError },
    /// `find-latest-image` of a directory holding no image.
    #[error("no image in directory {0}")]
    EmptyDirectory(String),
    /// `delunrefobj` with a percentage over 100.
    #[error("percentage {0} is over 100")]
    PercentageOver100(u8),
    /// `patch-directory` failed.
    #[error("patching {} to {name}", .dir.display())]
    Patch {
        dir: std::path::PathBuf,
        name: String,
        source: wire::patch::PatchError,
    },
    /// Writing the output failed.
    #[error(transparent)]
    Output(#[from] std::io::Error),
    /// Writing JSON output failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// What every command works with: the imageserver, standard output and its format.
struct Session<'a> {
    client: ImageServerClient,
    /// `--json`: machine-readable output.
    json: bool,
    out: &'a mut dyn Write,
}

/// Runs one command; returns the exit code (errors are exit 1, reported by the caller).
pub async fn run(cli: Cli) -> Result<u8, Error> {
    let security = cli.tls.security()?;
    let client =
        ImageServerClient::with_server_name(&cli.image_server, &security, &cli.image_server_name)?;
    let mut stdout = std::io::stdout().lock();
    let s = &mut Session {
        client,
        json: cli.json,
        out: &mut stdout,
    };
    match cli.command {
        Command::Add {
            name,
            path,
            filter_file,
            triggers_file,
            state_file,
            hooks,
            expires_in,
        } => {
            let expires_in = match expires_in {
                Some(d) => model::expiry::parse_expires_in(&d)?,
                None => None,
            };
            let files = add::Files {
                filter: &filter_file,
                triggers: &triggers_file,
                state: state_file.as_deref(),
                hooks: hooks.as_deref(),
                expires_in,
            };
            s.add(&name, &path, &files).await
        }
        Command::Adds {
            name,
            host,
            filter_file,
            triggers_file,
            every,
            retries,
        } => {
            let req = snapshot::Request {
                host: &host,
                filter: &filter_file,
                triggers: &triggers_file,
                retries,
            };
            match every {
                None => s.adds(&security, &name, &req).await,
                Some(every) => s.adds_every(&security, &name, &req, &every).await,
            }
        }
        Command::List { prefix } => s.list(prefix.as_deref()).await,
        Command::FindLatestImage { dir } => s.find_latest_image(&dir).await,
        Command::Show { name } => s.show(&name).await,
        Command::ShowFilter { name } => s.show_filter(&name).await,
        Command::ShowTriggers { name } => s.show_triggers(&name).await,
        Command::ShowHooks { name } => s.show_hooks(&name).await,
        Command::ShowState { name } => s.show_state(&name).await,
        Command::Check { name } => s.check(&name).await,
        Command::Mkdir { name } => s.mkdir(&name).await,
        Command::Delete { name } => s.delete(&name).await,
        Command::ChangeImageExpiration { name, expires_in } => {
            s.change_expiration(&name, &expires_in).await
        }
        Command::GetImageExpiration { name } => s.get_expiration(&name).await,
        Command::Diff { a, b } => s.diff(&a, &b).await,
        Command::Get { name, dir } => s.get(&name, &dir).await,
        Command::Listunrefobj => s.list_unreferenced().await,
        Command::Delunrefobj { percentage, bytes } => {
            s.delete_unreferenced(percentage, bytes).await
        }
        Command::PatchDirectory {
            name,
            dir,
            allow_unsafe,
            service_command,
        } => {
            s.patch_directory(&name, &dir, allow_unsafe, service_command)
                .await
        }
    }
}

impl Session<'_> {
    /// `add`: builds the image from a directory or tarball and adds it; prints a summary.
    async fn add(&mut self, name: &str, path: &Path, files: &add::Files<'_>) -> Result<u8, Error> {
        let s = add::add(&self.client, name, path, files).await?;
        if self.json {
            writeln!(self.out, "{}", serde_json::to_string(&s)?)?;
        } else {
            writeln!(
                self.out,
                "added {} image {}: {} files, {}, {} new objects, {} sent in {:.1}s",
                if s.sparse { "sparse" } else { "full" },
                s.name,
                s.files,
                mib(s.bytes),
                s.new_objects,
                mib(s.bytes_sent),
                s.seconds
            )?;
        }
        Ok(0)
    }

    /// `adds`: snapshots a live host into an image; prints a summary.
    async fn adds(
        &mut self,
        security: &wire::client::ClientSecurity,
        name: &str,
        req: &snapshot::Request<'_>,
    ) -> Result<u8, Error> {
        let s = snapshot::adds(&self.client, security, name, req).await?;
        if self.json {
            writeln!(self.out, "{}", serde_json::to_string(&s)?)?;
        } else {
            writeln!(
                self.out,
                "added snapshot {} of {}: {} files, {}, {} new objects, {} sent in {:.1}s",
                s.name,
                s.host,
                s.files,
                mib(s.bytes),
                s.new_objects,
                mib(s.bytes_sent),
                s.seconds
            )?;
        }
        Ok(0)
    }

    /// `adds --every`: a snapshot round every `every` until SIGINT/SIGTERM, one line each.
    async fn adds_every(
        &mut self,
        security: &wire::client::ClientSecurity,
        prefix: &str,
        req: &snapshot::Request<'_>,
        every: &str,
    ) -> Result<u8, Error> {
        let every = model::snapshot::parse_interval(every)?;
        model::ImageName::parse(prefix)?;
        let mut snap = snapshot::Snapshotter::new(&self.client, security, req)?;
        let stop = wire::program::shutdown_signal();
        tokio::pin!(stop);
        for round in 1.. {
            let r = tokio::select! {
                r = snapshot::round(&self.client, &mut snap, prefix) => r,
                () = &mut stop => break,
            };
            self.round_line(round, r)?;
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = &mut stop => break,
            }
        }
        Ok(0)
    }

    /// The line one `--every` round prints (a failed round is reported, not fatal).
    fn round_line(
        &mut self,
        round: u64,
        r: Result<snapshot::Summary, snapshot::SnapshotError>,
    ) -> std::io::Result<()> {
        let now = listing::format_time(disk::clock::unix_now() as i64);
        match r {
            Ok(s) if self.json => writeln!(
                self.out,
                "{}",
                serde_json::to_string(&s).map_err(std::io::Error::other)?
            )?,
            Err(e) if self.json => writeln!(
                self.out,
                "{}",
                serde_json::json!({ "error": disk::report::error_line(&e) })
            )?,
            Ok(s) if s.added => writeln!(
                self.out,
                "{now} round {round}: added {}: {} files, {}, {} new objects, {} sent in {:.1}s",
                s.name,
                s.files,
                mib(s.bytes),
                s.new_objects,
                mib(s.bytes_sent),
                s.seconds
            )?,
            Ok(s) => writeln!(
                self.out,
                "{now} round {round}: unchanged since {}: nothing added, {} new objects",
                s.name, s.new_objects
            )?,
            Err(e) => writeln!(
                self.out,
                "{now} round {round}: failed, nothing added: {}",
                disk::report::error_line(&e)
            )?,
        }
        self.out.flush()?;
        Ok(())
    }

    /// `list`: the image names starting with `prefix`, version-sorted.
    async fn list(&mut self, prefix: Option<&str>) -> Result<u8, Error> {
        let names = self.client.list_images(prefix).await?;
        if self.json {
            writeln!(self.out, "{}", serde_json::to_string(&names)?)?;
        } else {
            for n in names {
                writeln!(self.out, "{n}")?;
            }
        }
        Ok(0)
    }

    /// `find-latest-image`: the newest unexpired image directly in `dir`, the one an MDB
    /// name naming `dir` follows (`model::stream`).
    async fn find_latest_image(&mut self, dir: &str) -> Result<u8, Error> {
        let dir = dir.trim_end_matches('/');
        let names = self.client.list_images(Some(&format!("{dir}/"))).await?;
        let now = disk::clock::unix_now();
        let latest = self
            .client
            .newest_live(dir, &names, now)
            .await?
            .ok_or_else(|| Error::EmptyDirectory(dir.to_string()))?;
        if self.json {
            writeln!(self.out, "{}", serde_json::to_string(&latest)?)?;
        } else {
            writeln!(self.out, "{latest}")?;
        }
        Ok(0)
    }

    /// `show`: an image's header and one line per path (or the image as JSON).
    async fn show(&mut self, name: &str) -> Result<u8, Error> {
        let image = self.client.get_image(name).await?;
        if self.json {
            serde_json::to_writer(&mut self.out, &image)?;
            writeln!(self.out)?;
        } else {
            writeln!(self.out, "{}", listing::header(name, &image))?;
            for l in listing::show_image_lines(&image) {
                writeln!(self.out, "{l}")?;
            }
        }
        Ok(0)
    }

    /// `show-filter`: an image's filter lines (a sparse image has none: said on stderr).
    async fn show_filter(&mut self, name: &str) -> Result<u8, Error> {
        let image = self.client.get_image(name).await?;
        match &image.filter {
            None if self.json => writeln!(self.out, "null")?,
            None => eprintln!("imagetool: {name} is a sparse image: it has no filter"),
            Some(f) if self.json => writeln!(self.out, "{}", serde_json::to_string(f.lines())?)?,
            Some(f) => {
                for l in f.lines() {
                    writeln!(self.out, "{l}")?;
                }
            }
        }
        Ok(0)
    }

    /// `show-triggers`: an image's triggers as JSON (pretty unless `--json`).
    async fn show_triggers(&mut self, name: &str) -> Result<u8, Error> {
        let image = self.client.get_image(name).await?;
        if self.json {
            writeln!(self.out, "{}", serde_json::to_string(&image.triggers)?)?;
        } else {
            writeln!(
                self.out,
                "{}",
                serde_json::to_string_pretty(&image.triggers)?
            )?;
        }
        Ok(0)
    }

    /// `show-hooks`: the image's hooks in running order, `PHASE NAME HASH SIZE`.
    async fn show_hooks(&mut self, name: &str) -> Result<u8, Error> {
        let image = self.client.get_image(name).await?;
        if self.json {
            writeln!(self.out, "{}", serde_json::to_string(&image.hooks)?)?;
        } else {
            write!(self.out, "{}", image.hooks.listing())?;
        }
        Ok(0)
    }

    /// `show-state`: an image's state lines (none: said on stderr).
    async fn show_state(&mut self, name: &str) -> Result<u8, Error> {
        let image = self.client.get_image(name).await?;
        let lines = image.state.as_ref().map_or(&[][..], |s| s.lines());
        if self.json {
            writeln!(self.out, "{}", serde_json::to_string(lines)?)?;
        } else if lines.is_empty() {
            eprintln!("imagetool: {name} has no state lines");
        } else {
            for l in lines {
                writeln!(self.out, "{l}")?;
            }
        }
        Ok(0)
    }

    /// `check`: exit 0 if the image exists, 1 if not.
    async fn check(&mut self, name: &str) -> Result<u8, Error> {
        Ok(if self.client.check_image(name).await? {
            0
        } else {
            1
        })
    }

    /// `mkdir`: accepted for Dominator's scripts; checks that `name` is a valid name no
    /// image holds or held.
    async fn mkdir(&mut self, name: &str) -> Result<u8, Error> {
        let dir = model::ImageName::parse(name)?;
        let state = self
            .client
            .check_image_name(dir.as_str())
            .await
            .map_err(|source| Error::Ask { source })?;
        if state.exists || state.deleted {
            return Err(Error::NotADirectory(dir));
        }
        Ok(0)
    }

    /// `delete`: deletes an image (its name is never reused).
    async fn delete(&mut self, name: &str) -> Result<u8, Error> {
        self.client
            .delete_image(name)
            .await
            .map_err(|source| Error::Delete {
                name: name.to_string(),
                source,
            })?;
        Ok(0)
    }

    /// `change-image-expiration`: the image expires `expires_in` from now, or never.
    async fn change_expiration(&mut self, name: &str, expires_in: &str) -> Result<u8, Error> {
        let at = model::expiry::parse_expires_in(expires_in)?.map(|d| disk::clock::unix_now() + d);
        self.client
            .change_image_expiration(name, at)
            .await
            .map_err(|source| Error::Expiration {
                name: name.to_string(),
                source,
            })?;
        Ok(0)
    }

    /// `get-image-expiration`: when the image expires (UTC), or `never`.
    async fn get_expiration(&mut self, name: &str) -> Result<u8, Error> {
        let at = self
            .client
            .get_image_expiration(name)
            .await
            .map_err(|source| Error::Expiration {
                name: name.to_string(),
                source,
            })?;
        if self.json {
            writeln!(self.out, "{}", serde_json::json!({ "expires_at": at }))?;
        } else {
            match at {
                Some(t) => writeln!(self.out, "{}", listing::format_time(t as i64))?,
                None => writeln!(self.out, "never")?,
            }
        }
        Ok(0)
    }

    /// `diff`: the paths added, removed and changed from image `a` to image `b` (a line
    /// saying so when nothing differs).
    async fn diff(&mut self, a: &str, b: &str) -> Result<u8, Error> {
        let ia = self.client.get_image(a).await?;
        let ib = self.client.get_image(b).await?;
        let d = listing::ImageDiff::of(&ia, &ib);
        if self.json {
            writeln!(self.out, "{}", serde_json::to_string(&d)?)?;
        } else {
            let lines = d.lines();
            if lines.is_empty() {
                writeln!(self.out, "{}", listing::no_difference(a, b))?;
            }
            for l in lines {
                writeln!(self.out, "{l}")?;
            }
        }
        Ok(0)
    }

    /// `get`: unpacks an image into a new or empty directory.
    async fn get(&mut self, name: &str, dir: &Path) -> Result<u8, Error> {
        let image = get::get(&self.client, name, dir).await?;
        if !self.json {
            writeln!(
                self.out,
                "unpacked {name} into {}: {} paths, {}",
                dir.display(),
                image.tree.len(),
                mib(image.tree.total_bytes())
            )?;
        }
        Ok(0)
    }

    /// `listunrefobj`: the objects no image refers to, oldest-unreferenced first.
    async fn list_unreferenced(&mut self) -> Result<u8, Error> {
        let objs = self.client.list_unreferenced_objects().await?;
        if self.json {
            writeln!(self.out, "{}", serde_json::to_string(&objs)?)?;
        } else {
            for o in objs {
                writeln!(self.out, "{} {}", o.hash, o.size)?;
            }
        }
        Ok(0)
    }

    /// `delunrefobj`: deletes unreferenced objects, oldest first, until `percentage` % of
    /// them and `bytes` bytes are gone.
    async fn delete_unreferenced(&mut self, percentage: u8, bytes: u64) -> Result<u8, Error> {
        if percentage > 100 {
            return Err(Error::PercentageOver100(percentage));
        }
        let r = self
            .client
            .delete_unreferenced_objects(percentage, bytes)
            .await?;
        if self.json {
            writeln!(self.out, "{}", serde_json::to_string(&r)?)?;
        } else {
            writeln!(self.out, "deleted {} objects, {} bytes", r.deleted, r.bytes)?;
        }
        Ok(0)
    }

    /// `patch-directory`: makes `dir` match the image; prints the plan and what was done,
    /// each apply error and trigger failure on stderr; exit 1 unless it all succeeded.
    async fn patch_directory(
        &mut self,
        name: &str,
        dir: &Path,
        allow_unsafe: bool,
        service_command: Option<String>,
    ) -> Result<u8, Error> {
        let options = wire::patch::PatchOptions {
            allow_unsafe,
            apply: disk::apply::ApplyOptions {
                service_command: service_command
                    .map(|c| c.split_whitespace().map(str::to_string).collect()),
                ..Default::default()
            },
            ..Default::default()
        };
        let report = wire::patch::patch_directory(&self.client, name, dir, &options)
            .await
            .map_err(|source| Error::Patch {
                dir: dir.to_path_buf(),
                name: name.to_string(),
                source,
            })?;
        if self.json {
            writeln!(self.out, "{}", serde_json::to_string(&report.result)?)?;
        } else {
            write!(self.out, "{}", report.plan)?;
            writeln!(
                self.out,
                "patched {} to {name}: fetched {} objects ({}) in {} requests, activation {:.1} ms",
                dir.display(),
                report.fetch.objects,
                mib(report.fetch.bytes),
                report.fetch.requests,
                report.result.activation_ms
            )?;
        }
        for e in report
            .result
            .errors
            .iter()
            .chain(&report.result.trigger_failures)
        {
            eprintln!("imagetool: {e}");
        }
        Ok(if report.succeeded() { 0 } else { 1 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::report::error_line;

    #[test]
    fn a_failed_command_is_one_line_naming_what_failed_and_why() {
        let name = model::ImageName::parse("a/1").unwrap();
        let e = Error::from(add::AddError::Exists(name));
        assert_eq!(error_line(&e), "image a/1 already exists");
        let e = Error::Delete {
            name: "a/1".into(),
            source: ClientError::Status {
                method: "ImageServer.DeleteImage".into(),
                status: 404,
                message: "image a/1 does not exist".into(),
            },
        };
        assert_eq!(
            error_line(&e),
            "deleting image a/1: ImageServer.DeleteImage: image a/1 does not exist (HTTP 404)"
        );
    }
}
