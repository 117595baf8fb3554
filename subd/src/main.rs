//! The subd binary: parse flags, set up logging, start the scanner, serve until SIGTERM.

use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    disk::report::exit_code("subd", run().await)
}

async fn run() -> anyhow::Result<()> {
    disk::report::init_logging("info");
    let args = subd::Args::parse();
    let config = subd::Config::from_args(&args)?;
    let shutdown = wire::program::shutdown_signal();
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = wire::program::announce_listening("subd", &listener)?;
    let state = subd::Subd::start(config).context("starting subd")?;
    tracing::info!("subd managing {} on {addr}", args.root.display());
    subd::serve(listener, state, shutdown).await?;
    Ok(())
}
