//! `imageserver --data-dir DIR [--listen ADDR] [--object-store s3://BUCKET/PREFIX]`: parses flags, sets up logging and runs
//! the server (see the library for everything else; its flags are `imageserver::Args`).

use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    disk::report::exit_code("imageserver", run().await)
}

async fn run() -> anyhow::Result<()> {
    disk::report::init_logging("info");
    let args = imageserver::Args::parse();
    let security = args.tls.server_security("imageserver")?;
    let data_dir = args.data_dir.clone();
    let grace = std::time::Duration::from_secs(args.object_pin_seconds);
    let s3 = args.s3_objects()?;
    let shared_bucket = s3.is_some();
    let mut state = tokio::task::spawn_blocking(move || {
        imageserver::State::open_with_objects(&data_dir, security, grace, s3)
    })
    .await?
    .with_context(|| format!("opening data directory {}", args.data_dir.display()))?
    .with_stream_limits(args.max_object_streams, args.max_object_streams_per_caller);
    state.connection_limits = args.connections.limits();
    state.catalogue.set_min_expiry_secs(args.min_expiry_secs);
    if let Some(mdb) = &args.mdb {
        state = state.with_mdb(mdb.clone());
    }
    if let Some(master) = &args.replication_master {
        let client = args.tls.client_security("imageserver")?;
        state = imageserver::replication::start(state, master, &client)
            .with_context(|| format!("following the master {master}"))?;
        tracing::info!(%master, "replica: following the master");
    }
    if shared_bucket {
        let interval = std::time::Duration::from_millis(args.s3_refresh_ms.max(100));
        tokio::spawn(imageserver::refresh_from_bucket(
            state.catalogue.clone(),
            interval,
        ));
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
