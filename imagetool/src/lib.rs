//! imagetool: packages a directory or tarball into an image on an imageserver, and
//! inspects, compares, unpacks and deletes images.
//!
//! Layout:
//! - `args`: the clap command line and the rewrite of Dominator's single-dash flags.
//! - `add`: building a tree from a directory or tarball and sending what the server lacks.
//! - `upload`: batched existence checks and streamed object uploads.
//! - `listing`: `show` lines (Dominator's format) and `diff`.
//! - `get`: unpacking an image into a directory.
//! - `patch-directory` is a thin wrapper over `wire::patch::patch_directory`.

pub mod add;
pub mod args;
pub mod get;
pub mod listing;
pub mod upload;

use anyhow::Context;
use args::{Cli, Command};
use std::io::Write;
use wire::client::ImageServerClient;

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Runs one command; returns the exit code (errors are exit 1, reported by the caller).
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    let security = cli.tls.security()?;
    let client =
        ImageServerClient::with_server_name(&cli.image_server, &security, &cli.image_server_name)?;
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Add {
            name,
            path,
            filter_file,
            triggers_file,
        } => {
            let s = add::add(&client, &name, &path, &filter_file, &triggers_file).await?;
            if cli.json {
                writeln!(out, "{}", serde_json::to_string(&s)?)?;
            } else {
                writeln!(
                    out,
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
        }
        Command::List { prefix } => {
            let names = client.list_images(prefix.as_deref()).await?;
            if cli.json {
                writeln!(out, "{}", serde_json::to_string(&names)?)?;
            } else {
                for n in names {
                    writeln!(out, "{n}")?;
                }
            }
        }
        Command::Show { name } => {
            let image = client.get_image(&name).await?;
            if cli.json {
                serde_json::to_writer(&mut out, &image)?;
                writeln!(out)?;
            } else {
                writeln!(out, "{}", listing::header(&name, &image))?;
                for l in listing::show_lines(&image.tree) {
                    writeln!(out, "{l}")?;
                }
            }
        }
        Command::ShowFilter { name } => {
            let image = client.get_image(&name).await?;
            match &image.filter {
                None if cli.json => writeln!(out, "null")?,
                None => eprintln!("imagetool: {name} is a sparse image: it has no filter"),
                Some(f) if cli.json => writeln!(out, "{}", serde_json::to_string(f.lines())?)?,
                Some(f) => {
                    for l in f.lines() {
                        writeln!(out, "{l}")?;
                    }
                }
            }
        }
        Command::ShowTriggers { name } => {
            let image = client.get_image(&name).await?;
            if cli.json {
                writeln!(out, "{}", serde_json::to_string(&image.triggers)?)?;
            } else {
                writeln!(out, "{}", serde_json::to_string_pretty(&image.triggers)?)?;
            }
        }
        Command::Check { name } => {
            return Ok(if client.check_image(&name).await? {
                0
            } else {
                1
            });
        }
        Command::Mkdir { name } => {
            let dir = model::ImageName::parse(&name)?;
            let state = client
                .check_image_name(dir.as_str())
                .await
                .context("asking the imageserver")?;
            if state.exists || state.deleted {
                anyhow::bail!("{dir} is the name of an image, not a directory");
            }
        }
        Command::Delete { name } => {
            client
                .delete_image(&name)
                .await
                .with_context(|| format!("deleting image {name}"))?;
        }
        Command::Diff { a, b } => {
            let ia = client.get_image(&a).await?;
            let ib = client.get_image(&b).await?;
            let d = listing::ImageDiff::of(&ia, &ib);
            if cli.json {
                writeln!(out, "{}", serde_json::to_string(&d)?)?;
            } else {
                for l in d.lines() {
                    writeln!(out, "{l}")?;
                }
            }
        }
        Command::Get { name, dir } => {
            let image = get::get(&client, &name, &dir).await?;
            if !cli.json {
                writeln!(
                    out,
                    "unpacked {name} into {}: {} paths, {}",
                    dir.display(),
                    image.tree.len(),
                    mib(image.tree.total_bytes())
                )?;
            }
        }
        Command::Listunrefobj => {
            let objs = client.list_unreferenced_objects().await?;
            if cli.json {
                writeln!(out, "{}", serde_json::to_string(&objs)?)?;
            } else {
                for o in objs {
                    writeln!(out, "{} {}", o.hash, o.size)?;
                }
            }
        }
        Command::Delunrefobj { percentage, bytes } => {
            if percentage > 100 {
                anyhow::bail!("percentage {percentage} is over 100");
            }
            let r = client
                .delete_unreferenced_objects(percentage, bytes)
                .await?;
            if cli.json {
                writeln!(out, "{}", serde_json::to_string(&r)?)?;
            } else {
                writeln!(out, "deleted {} objects, {} bytes", r.deleted, r.bytes)?;
            }
        }
        Command::PatchDirectory {
            name,
            dir,
            allow_unsafe,
            service_command,
        } => {
            let options = wire::patch::PatchOptions {
                allow_unsafe,
                apply: disk::apply::ApplyOptions {
                    service_command: service_command
                        .map(|c| c.split_whitespace().map(str::to_string).collect()),
                    ..Default::default()
                },
                ..Default::default()
            };
            let report = wire::patch::patch_directory(&client, &name, &dir, &options)
                .await
                .with_context(|| format!("patching {} to {name}", dir.display()))?;
            if cli.json {
                writeln!(out, "{}", serde_json::to_string(&report.result)?)?;
            } else {
                write!(out, "{}", report.plan)?;
                writeln!(
                    out,
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
            if !report.succeeded() {
                return Ok(1);
            }
        }
    }
    Ok(0)
}
