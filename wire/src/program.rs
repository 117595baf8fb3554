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
    eprintln!("{}", crate::listening::line(program, addr));
    Ok(addr)
}

/// Binds the read-only status listener of `--status-listen ADDR` (if given) and prints
/// `PROGRAM status page: listening on ADDR` (after the main listening line, so a reader
/// of the first line still gets the main address).
pub async fn bind_status(
    program: &str,
    addr: Option<&str>,
) -> std::io::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("status listener on {addr}: {e}")))?;
    announce_listening(&format!("{program} status page"), &listener)?;
    Ok(Some(listener))
}

/// The `shutdown` future of a server's `serve`: completes on the first SIGTERM or SIGINT
/// (logging "shutting down"). The handlers are installed by this call, not when the
/// future is first polled, so call it before announcing the address: a signal sent as soon
/// as the listening line is read then stops the server cleanly instead of killing it.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    }
}
