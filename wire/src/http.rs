//! The one place HTTP is served: `serve(listener, router, security, shutdown)` accepts
//! connections (TCP_NODELAY, optional mutual TLS), attaches the caller's identity, refuses
//! RPCs the caller is not granted, and shuts down gracefully. Also `ApiError`, the one
//! mapping from errors to HTTP statuses.

use crate::connection::{
    Admitted, BodyPace, ConnectionLimits, PacedBody, StallIo, Tracker, SHED_LOG_INTERVAL,
};
use crate::tls::{glob_match, identity_of};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use model::api::ErrorBody;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Largest JSON request body accepted by default (an image of about half a million files).
pub const MAX_JSON_BODY: usize = 128 << 20;

/// How a server talks to its clients.
#[derive(Clone)]
pub enum Security {
    /// Plain HTTP; every caller may call every method. Only for development.
    Insecure,
    /// Mutual TLS; callers are identified and authorized by their certificates.
    Tls(Arc<rustls::ServerConfig>),
}

impl Security {
    pub fn is_insecure(&self) -> bool {
        matches!(self, Security::Insecure)
    }
}

/// Who is calling, attached to every request as an extension.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Certificate common name; empty when insecure.
    pub name: String,
    /// Method globs from the certificate; `None` = everything (insecure mode).
    pub grants: Option<Vec<String>>,
    /// The address the connection came from (`None` outside a served connection).
    pub peer: Option<std::net::IpAddr>,
}

impl Caller {
    pub fn insecure() -> Caller {
        Caller {
            name: String::new(),
            grants: None,
            peer: None,
        }
    }

    /// Who this caller is, for per-caller bounds and logs: the certificate name and the
    /// address (machines sharing one certificate are told apart by address).
    pub fn key(&self) -> String {
        match self.peer {
            Some(ip) if self.name.is_empty() => ip.to_string(),
            Some(ip) => format!("{} at {ip}", self.name),
            None => self.name.clone(),
        }
    }

    /// Whether this caller may call `method` (`Service.Method`).
    pub fn may(&self, method: &str) -> bool {
        match &self.grants {
            None => true,
            Some(g) => g.iter().any(|p| glob_match(p, method)),
        }
    }
}

/// The RPC method a request path names (`/rpc/Service.Method`).
pub fn method_of(path: &str) -> Option<&str> {
    path.strip_prefix("/rpc/")
}

/// Whether `method` is exactly `Service.Method`, each part one or more of `[A-Za-z0-9_]`:
/// nothing a glob grant could match beyond the method it names (`/`, `..`, `%`).
pub fn is_method_name(method: &str) -> bool {
    let part = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    matches!(method.split_once('.'), Some((service, name)) if part(service) && part(name))
}

/// A path this server does not serve: says so, and what the caller may have meant, rather
/// than an empty 404 (the usual cause is a client pointed at the wrong daemon).
async fn no_such_route(uri: axum::http::Uri) -> ApiError {
    let path = uri.path();
    ApiError::NotFound(match path.strip_prefix("/rpc/") {
        Some(method) => format!(
            "this server has no method {method} (is it the right kind of server: imageserver, subd or dominator?)"
        ),
        None => format!("no page {path}"),
    })
}

/// Serves `router` on `listener` with the default `ConnectionLimits` until `shutdown`
/// resolves, then waits (up to 10 s) for requests in flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_limits(
        listener,
        router,
        security,
        ConnectionLimits::default(),
        shutdown,
    )
    .await
}

/// Serves `router` on `listener` until `shutdown` resolves, then waits (up to 10 s) for
/// requests in flight. Each connection is bounded by `limits` (see `wire::connection`
/// for the timeouts and which connection is shed over a limit).
pub async fn serve_with_limits(
    listener: TcpListener,
    router: Router,
    security: Security,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = match &security {
        Security::Tls(cfg) => Some(tokio_rustls::TlsAcceptor::from(cfg.clone())),
        Security::Insecure => None,
    };
    // JSON bodies (images, plans) may be large but are bounded; handlers may set a
    // smaller `DefaultBodyLimit` on their own routes. Streamed bodies are not limited.
    let router = router
        .fallback(no_such_route)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY));
    let tracker = Tracker::new(limits);
    tracing::debug!(
        max_connections = tracker.limits().total(),
        "connection limits: {:?}",
        tracker.limits()
    );
    let summaries = tokio::spawn({
        let tracker = tracker.clone();
        async move {
            let mut every = tokio::time::interval(SHED_LOG_INTERVAL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if let Some(line) = tracker.take_summary() {
                    tracing::warn!("{line}");
                }
            }
        }
    });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some(admitted) = tracker.admit(peer.ip()) else {
            continue; // dropped: refused, counted in the next summary
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let acceptor = acceptor.clone();
        let watcher = graceful.watcher();
        let tracker = tracker.clone();
        tokio::spawn(async move {
            let evicted = admitted.evicted.clone();
            tokio::select! {
                _ = evicted.notified() => {}
                _ = connection(stream, peer, acceptor, router, watcher, &tracker, Arc::new(admitted)) => {}
            }
        });
    }
    drop(listener);
    summaries.abort();
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    Ok(())
}

/// The read-only status listener (`--status-listen`): its own socket, a router of pages
/// and `/api/` reads only (no `/rpc/` route at all), and its own security (server-side
/// TLS without client certificates, `tls::status_server_config`).
pub struct StatusListener {
    pub listener: TcpListener,
    pub router: Router,
    pub security: Security,
}

/// `serve_with_limits` on `listener`, and on `status` when given, both until `shutdown`
/// resolves; returns the first error of either.
pub async fn serve_with_status(
    listener: TcpListener,
    router: Router,
    security: Security,
    limits: ConnectionLimits,
    status: Option<StatusListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let Some(status) = status else {
        return serve_with_limits(listener, router, security, limits, shutdown).await;
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let side = tokio::spawn(serve_with_limits(
        status.listener,
        status.router,
        status.security,
        limits.clone(),
        stopped(stop_rx.clone()),
    ));
    let main = serve_with_limits(listener, router, security, limits, stopped(stop_rx));
    let signal = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let (r, ()) = tokio::join!(main, signal);
    let side = side.await.map_err(std::io::Error::other)?;
    r.and(side)
}

/// Whether the peer closed (or reset) the connection without sending a byte: a port probe or
/// readiness check (`nc -z`, a TCP health check), not a client whose handshake failed, so
/// it is logged at debug rather than as a refused handshake.
async fn closed_before_first_byte(stream: &tokio::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte).await {
        Ok(n) => n == 0,
        Err(_) => true,
    }
}

/// Serves one accepted connection: the TLS handshake (bounded by the header timeout),
/// then HTTP/1.1 with the header and transfer timeouts.
async fn connection(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    watcher: hyper_util::server::graceful::Watcher,
    tracker: &Tracker,
    admitted: Arc<Admitted>,
) {
    let limits = tracker.limits();
    if acceptor.is_some() {
        match tokio::time::timeout(limits.header_timeout, closed_before_first_byte(&stream)).await {
            Ok(true) => {
                tracing::debug!(%peer, "connection closed before its first byte (a port probe)");
                return;
            }
            Ok(false) => {}
            Err(_) => {
                tracker.slow_head(peer.ip());
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        }
    }
    let stream = StallIo::new(stream, limits.transfer_timeout);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let pace = limits.body_pace();
    let result = match acceptor {
        None => {
            let caller = Caller {
                peer: Some(peer.ip()),
                ..Caller::insecure()
            };
            let svc = service(router, caller, admitted.clone(), pace);
            let conn = http.serve_connection(TokioIo::new(stream), svc);
            watcher.watch(conn).await
        }
        Some(acc) => {
            let tls = match tokio::time::timeout(limits.header_timeout, acc.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, "TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    tracker.slow_head(peer.ip());
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let caller = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                Some(cert) => {
                    let (name, grants) = identity_of(cert);
                    Caller {
                        name,
                        grants: Some(grants),
                        peer: Some(peer.ip()),
                    }
                }
                None => Caller {
                    name: String::new(),
                    grants: Some(Vec::new()),
                    peer: Some(peer.ip()),
                },
            };
            let svc = service(router, caller, admitted.clone(), pace);
            let conn = http.serve_connection(TokioIo::new(tls), svc);
            watcher.watch(conn).await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() && admitted.requests() == 0 {
            tracker.slow_head(peer.ip());
        }
    }
}

/// The service of one connection: refuses a malformed method name or a method the caller
/// is not granted, attaches the caller and paces the request body, and keeps the
/// connection busy (never shed) until the reply is written.
fn service(
    router: Router,
    caller: Caller,
    admitted: Arc<Admitted>,
    pace: BodyPace,
) -> TowerToHyperService<
    impl tower::Service<
            hyper::Request<Incoming>,
            Response = Response,
            Error = std::convert::Infallible,
            Future = impl Send,
        > + Clone,
> {
    let svc = tower::service_fn(move |mut req: hyper::Request<Incoming>| {
        let router = router.clone();
        let caller = caller.clone();
        // Not shed while a request is in progress: until its reply is fully written.
        let busy = admitted.busy();
        let report = caller.peer.map(|p| admitted.pace_report(p));
        async move {
            // A malformed method name is refused before any grant is matched against it.
            if let Some(method) = method_of(req.uri().path()) {
                if !is_method_name(method) {
                    tracing::warn!(caller = %caller.name, method, "malformed method name refused");
                    return Ok(ApiError::BadRequest(format!(
                        "invalid method name {method:?}: must be Service.Method (letters, digits, _)"
                    ))
                    .into_response());
                }
            }
            if let Some(method) = method_of(req.uri().path()) {
                // Any authenticated caller may poll short (Dominator); subd refuses a full
                // poll to a caller without the `Subd.Poll` grant itself.
                if !caller.may(method) && method != model::api::methods::SUBD_POLL {
                    tracing::warn!(caller = %caller.name, method, "access to method denied");
                    return Ok(ApiError::Forbidden(format!(
                        "access to method denied: certificate {:?} is not granted {method}",
                        caller.name
                    ))
                    .into_response());
                }
            }
            req.extensions_mut().insert(caller);
            let req = req.map(|b| {
                let body = PacedBody::new(b, pace);
                axum::body::Body::new(match report {
                    Some(r) => body.reporting_to(r),
                    None => body,
                })
            });
            let resp = router.oneshot(req).await?;
            Ok(resp.map(|b| {
                axum::body::Body::new(b.map_frame(move |f| {
                    let _ = &busy;
                    f
                }))
            }))
        }
    });
    TowerToHyperService::new(svc)
}

/// An error a handler returns; its variant decides the HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// 410: the thing existed and is gone for good (an expired image).
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode as S;
        match self {
            ApiError::BadRequest(_) => S::BAD_REQUEST,
            ApiError::NotFound(_) => S::NOT_FOUND,
            ApiError::Conflict(_) => S::CONFLICT,
            ApiError::Gone(_) => S::GONE,
            ApiError::Forbidden(_) => S::FORBIDDEN,
            ApiError::TooLarge(_) => S::PAYLOAD_TOO_LARGE,
            ApiError::Busy(_) => S::SERVICE_UNAVAILABLE,
            ApiError::InsufficientStorage(_) => S::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) => S::INTERNAL_SERVER_ERROR,
        }
    }

    /// An internal error from anything displayable (logged; detail kept in the body's
    /// one line, since callers are operators of the same fleet).
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::Internal(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!("{self}");
        }
        (
            status,
            axum::Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

/// JSON body extractor whose rejection is a one-line `ApiError::BadRequest`.
pub struct Json<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::TooLarge(format!("request body larger than {MAX_JSON_BODY} bytes"))
                } else {
                    ApiError::BadRequest(format!("reading request body: {e}"))
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(Json)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON request: {e}")))
    }
}

/// Reads a whole body up to `limit` bytes.
pub async fn read_body_limited(
    body: axum::body::Body,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(ApiError::TooLarge(format!("request body: {e}"))),
    }
}

/// The red banner status pages show when serving without TLS.
pub const INSECURE_BANNER: &str = r#"<p style="background:#c00;color:#fff;padding:6px;font-weight:bold">INSECURE MODE: no TLS, every caller may call every method.</p>"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_are_exactly_service_dot_method() {
        for ok in ["Subd.Poll", "ImageServer.GetImage", "A_1.b_2"] {
            assert!(is_method_name(ok), "{ok}");
        }
        for bad in [
            "Subd.Poll/../Subd.Update",
            "Subd.Poll%2F..%2FX",
            "Subd.%2e%2e",
            "Subd.Poll/",
            "Subd.Poll.X",
            ".Poll",
            "Subd.",
            "Subd",
            "",
            "/Subd.Poll",
            "Sübd.Poll",
        ] {
            assert!(!is_method_name(bad), "{bad}");
        }
    }
}
