//! What every server's `main` does around `serve`: say where it listens, and turn SIGTERM or
//! SIGINT into the shutdown future.

use std::net::SocketAddr;

/// Prints `PROGRAM: listening on ADDR` on stderr (the line tests and `local-fleet` read to
/// learn the bound address of `--listen 127.0.0.1:0`) and returns the address.
pub fn announce_listening(
    program: &str,
    listener: &tokio::net::TcpListener,
) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    eprintln!("{program}: listening on {addr}");
    Ok(addr)
}

/// Completes on the first SIGTERM or SIGINT (logging "shutting down"): the `shutdown`
/// future of a server's `serve`.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
