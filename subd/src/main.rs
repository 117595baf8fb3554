//! The subd binary: parse flags, set up logging, start the scanner, serve until SIGTERM.

use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    disk::report::exit_code("subd", run().await)
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = subd::Args::parse();
    let config = subd::Config::from_args(&args)?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let state = subd::Subd::start(config).context("starting subd")?;
    tracing::info!(
        "subd managing {} on {}",
        args.root.display(),
        listener.local_addr()?
    );
    eprintln!("{}", wire::listening::line("subd", listener.local_addr()?));
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("stopping");
    };
    subd::serve(listener, state, shutdown).await?;
    Ok(())
}
