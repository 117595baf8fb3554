//! `imageserver --data-dir DIR [--listen ADDR]`: parses flags, sets up logging and runs
//! the server (see the library for everything else).

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;

/// Stores images and their objects and serves them to imagetool, dominator and subd.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory holding objects/ and images/ (created if missing)
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Address to listen on
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:6971")]
    listen: String,
    /// Also serve the status page and `/metrics` (never an RPC) on ADDR, over TLS with
    /// this server's certificate but asking for no client certificate
    #[arg(long, value_name = "ADDR")]
    status_listen: Option<String>,
    /// The machine database (read only, read again when it changes): the status page
    /// names the machines using each image
    #[arg(long, value_name = "PATH")]
    mdb: Option<PathBuf>,
    /// Seconds an uploaded object (or one `CheckObjects` reported present) is safe from
    /// unreferenced-object deletion, so the `AddImage` that follows finds it
    #[arg(long, value_name = "SECONDS", default_value_t = imageserver::catalogue::DEFAULT_PIN_GRACE.as_secs())]
    object_pin_seconds: u64,
    /// Most `GetObjects` streams open at once; more get 503
    #[arg(long, value_name = "N", default_value_t = imageserver::objects::DEFAULT_MAX_STREAMS)]
    max_object_streams: usize,
    /// Most `GetObjects` streams one caller (certificate name and address) may have open
    /// at once; more get 503
    #[arg(long, value_name = "N", default_value_t = imageserver::objects::DEFAULT_MAX_STREAMS_PER_CALLER)]
    max_object_streams_per_caller: usize,
    #[command(flatten)]
    tls: wire::security::DaemonTlsArgs,
    #[command(flatten)]
    connections: wire::connection::ConnectionArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    disk::report::exit_code("imageserver", run().await)
}

async fn run() -> anyhow::Result<()> {
    disk::report::init_logging("info");
    let args = Args::parse();
    let security = args.tls.server_security("imageserver")?;
    let data_dir = args.data_dir.clone();
    let grace = std::time::Duration::from_secs(args.object_pin_seconds);
    let mut state = tokio::task::spawn_blocking(move || {
        imageserver::State::open_with_grace(&data_dir, security, grace)
    })
    .await?
    .with_context(|| format!("opening data directory {}", args.data_dir.display()))?
    .with_stream_limits(args.max_object_streams, args.max_object_streams_per_caller);
    state.connection_limits = args.connections.limits();
    if let Some(mdb) = &args.mdb {
        state = state.with_mdb(mdb.clone());
    }
    let shutdown = wire::program::shutdown_signal();
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = wire::program::announce_listening("imageserver", &listener)?;
    let status =
        match wire::program::bind_status("imageserver", args.status_listen.as_deref()).await? {
            Some(l) => Some((l, args.tls.status_security("imageserver")?)),
            None => None,
        };
    tracing::info!(%addr, data_dir = %args.data_dir.display(), "imageserver listening");
    imageserver::serve_with_status(listener, status, state, shutdown).await?;
    Ok(())
}
