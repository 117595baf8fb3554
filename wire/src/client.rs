//! The one place HTTP clients are built: `RpcClient` (TCP_NODELAY, timeouts, optional mutual
//! TLS) and the typed clients `ImageServerClient` and `SubdClient` over it.

use crate::tls::{client_config, TlsFiles};
use model::api::{self, methods, ErrorBody};
use model::hash::ObjectId;
use model::image::Image;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

/// How a client connects.
#[derive(Clone, Debug, Default)]
pub enum ClientSecurity {
    /// Plain HTTP (only for loopback development).
    #[default]
    Insecure,
    /// HTTPS with this client certificate, trusting servers signed by the CA.
    Tls(TlsFiles),
}

/// Why a request got no answer: read once from the error's types where the client makes
/// it (reqwest's flags, the `io::ErrorKind` and rustls error in its sources, our resolver's
/// `DnsFailure`), never from its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Nothing listens on the port (`ECONNREFUSED`).
    Refused,
    /// The host name did not resolve.
    Dns,
    /// No answer in time: the connect timeout, the call's timeout, or `ETIMEDOUT`.
    Timeout,
    /// The TLS handshake failed (a certificate refused either way, a protocol error).
    Tls,
    /// No route to the host or its network.
    Unreachable,
    /// The local system forbade the connection (`EACCES`/`EPERM`, e.g. a firewall rule).
    Denied,
    /// Anything else: reset or closed mid-request, not HTTP, a body that failed.
    Other,
}

impl ConnectFailure {
    /// Classifies a reqwest error by its flags and the types of its sources.
    pub fn of(e: &reqwest::Error) -> ConnectFailure {
        let sources = || std::iter::successors(std::error::Error::source(e), |s| s.source());
        if sources().any(|s| s.is::<DnsFailure>()) {
            return ConnectFailure::Dns;
        }
        if e.is_timeout() {
            return ConnectFailure::Timeout;
        }
        for s in sources() {
            if s.is::<rustls::Error>() {
                return ConnectFailure::Tls;
            }
            // An io::Error's `source()` skips the error it wraps: look inside it too.
            let mut inner: Option<&(dyn std::error::Error + 'static)> = Some(s);
            while let Some(io) = inner.and_then(|i| i.downcast_ref::<std::io::Error>()) {
                if let Some(kind) = Self::of_io(io) {
                    return kind;
                }
                inner = io
                    .get_ref()
                    .map(|i| i as &(dyn std::error::Error + 'static));
                if inner.is_some_and(|i| i.is::<rustls::Error>()) {
                    return ConnectFailure::Tls;
                }
            }
        }
        ConnectFailure::Other
    }

    /// The failure an `io::ErrorKind` names, if it names one.
    fn of_io(io: &std::io::Error) -> Option<ConnectFailure> {
        use std::io::ErrorKind as K;
        match io.kind() {
            K::ConnectionRefused => Some(ConnectFailure::Refused),
            K::TimedOut => Some(ConnectFailure::Timeout),
            K::HostUnreachable | K::NetworkUnreachable => Some(ConnectFailure::Unreachable),
            K::PermissionDenied => Some(ConnectFailure::Denied),
            _ => None,
        }
    }
}

/// A host name that did not resolve: the error our resolver (`SystemResolver`) gives
/// reqwest, so a DNS failure is known by its type.
#[derive(Debug, thiserror::Error)]
#[error("resolving {host}")]
pub struct DnsFailure {
    pub host: String,
    #[source]
    pub source: std::io::Error,
}

/// The system resolver (`getaddrinfo`, off the executor, as reqwest's default), failing
/// with a `DnsFailure`.
#[derive(Debug, Default)]
struct SystemResolver;

impl reqwest::dns::Resolve for SystemResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map(|addrs| addrs.collect::<Vec<_>>());
            match found {
                Ok(addrs) => Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs),
                Err(source) => Err(Box::new(DnsFailure { host, source }) as _),
            }
        })
    }
}

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer from the server: `kind` says why, `message` the innermost cause's text.
    #[error("{addr}: {message}")]
    Connect {
        addr: String,
        kind: ConnectFailure,
        message: String,
    },
    #[error("{method}: {message} (HTTP {status})")]
    Status {
        method: String,
        status: u16,
        message: String,
    },
    #[error("{method}: bad reply: {message}")]
    Decode { method: String, message: String },
    #[error("client setup: {0}")]
    Setup(String),
}

impl ClientError {
    /// The HTTP status, if the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Why there was no answer, if there was none.
    pub fn connect_failure(&self) -> Option<ConnectFailure> {
        match self {
            ClientError::Connect { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// A `Connect` error for a request to `addr` that failed with `e`.
    fn connect(addr: &str, e: &reqwest::Error) -> ClientError {
        ClientError::Connect {
            addr: addr.to_string(),
            kind: ConnectFailure::of(e),
            message: connect_message(e),
        }
    }
}

/// An address that must be `HOST[:PORT]` but is a URL, a path or something else.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{} is not HOST[:PORT]: {reason}", model::path::escape(addr.as_bytes()))]
pub struct BadHostPort {
    pub addr: String,
    pub reason: &'static str,
}

/// Checks that `addr` is a bare `HOST`, `HOST:PORT` or `[V6]:PORT`: no scheme, path, query,
/// fragment, user or blank, so a request built on it reaches that server's `/rpc/` only.
pub fn check_host_port(addr: &str) -> Result<(), BadHostPort> {
    let bad = |reason| {
        Err(BadHostPort {
            addr: addr.to_string(),
            reason,
        })
    };
    if addr.is_empty() {
        return bad("empty");
    }
    if addr.contains("://") {
        return bad("a URL");
    }
    if addr.contains(['/', '?', '#', '@', '\\', '%']) {
        return bad("holds a path, query, fragment, user or escape");
    }
    if addr.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("holds a blank or control character");
    }
    Ok(())
}

/// Turns `HOST`, `HOST:PORT`, `[V6]:PORT` or a URL into a base URL.
pub fn base_url(addr: &str, default_port: u16, tls: bool) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        return addr.trim_end_matches('/').to_string();
    }
    let scheme = if tls { "https" } else { "http" };
    let has_port = if addr.starts_with('[') {
        addr.contains("]:")
    } else {
        addr.matches(':').count() == 1
    };
    if has_port {
        format!("{scheme}://{addr}")
    } else if addr.contains(':') {
        format!("{scheme}://[{addr}]:{default_port}")
    } else {
        format!("{scheme}://{addr}:{default_port}")
    }
}

/// An RPC client bound to one server.
#[derive(Clone, Debug)]
pub struct RpcClient {
    http: reqwest::Client,
    base: String,
    reply_limit: usize,
}

/// How long a call waits for the next bytes of a reply before failing.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How long opening a connection (TCP and TLS handshake) may take by default.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a client waits.
#[derive(Clone, Copy, Debug)]
pub struct ClientTimeouts {
    /// Opening a connection, TCP and TLS handshake (`CONNECT_TIMEOUT` by default).
    pub connect: Duration,
    /// A whole call (`None` for long streams).
    pub call: Option<Duration>,
}

/// Default cap on a JSON reply's size: a hostile or broken server cannot exhaust memory.
pub const DEFAULT_REPLY_LIMIT: usize = 256 << 20;

fn connect_message(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = src {
        msg = s.to_string();
        if let Some(reason) = certificate_refusal(s) {
            msg = reason;
            break;
        }
        src = s.source();
    }
    if msg.contains("invalid HTTP version parsed") {
        // A plain-HTTP request answered with a TLS alert, or by something not HTTP at all.
        msg = format!(
            "{msg}: the server speaks TLS (or is not HTTP); to use TLS give a client certificate (--ca-file, --cert-file, --key-file, or a pair in ~/.ssl)"
        );
    }
    msg
}

/// What our certificate verifier said when it refused the server's certificate (e.g.
/// `tls::WrongRole`), rather than rustls's debug rendering of it.
fn certificate_refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut inner = e.downcast_ref::<std::io::Error>()?.get_ref()?;
    // The TLS layer's io::Error may itself be wrapped in another io::Error.
    while let Some(io) = inner.downcast_ref::<std::io::Error>() {
        inner = io.get_ref()?;
    }
    match inner.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
            Some(format!("server certificate refused: {o}"))
        }
        _ => None,
    }
}

impl RpcClient {
    /// A client for `addr`; over TLS the server's certificate must carry the common name
    /// `server_name` (its role, e.g. `IMAGESERVER_NAME`); `timeout` bounds each whole call
    /// (`None` for long streams).
    pub fn new(
        addr: &str,
        default_port: u16,
        security: &ClientSecurity,
        server_name: &str,
        timeout: Option<Duration>,
    ) -> Result<RpcClient, ClientError> {
        let timeouts = ClientTimeouts {
            connect: CONNECT_TIMEOUT,
            call: timeout,
        };
        Self::with_timeouts(addr, default_port, security, server_name, timeouts)
    }

    /// As `new`, with the connect timeout chosen too.
    pub fn with_timeouts(
        addr: &str,
        default_port: u16,
        security: &ClientSecurity,
        server_name: &str,
        timeouts: ClientTimeouts,
    ) -> Result<RpcClient, ClientError> {
        let mut b = reqwest::Client::builder()
            .tcp_nodelay(true)
            .dns_resolver(std::sync::Arc::new(SystemResolver))
            .connect_timeout(timeouts.connect)
            // Well before servers close an idle keep-alive (their header timeout), so a
            // pooled connection is never reused just as the server closes it.
            .pool_idle_timeout(crate::connection::DEFAULT_HEADER_TIMEOUT / 2)
            // A peer that goes silent mid-reply is given up on, even for long streams.
            .read_timeout(READ_TIMEOUT)
            .no_proxy();
        if let Some(t) = timeouts.call {
            b = b.timeout(t);
        }
        let tls = matches!(security, ClientSecurity::Tls(_));
        if let ClientSecurity::Tls(files) = security {
            let cfg =
                client_config(files, server_name).map_err(|e| ClientError::Setup(e.to_string()))?;
            b = b.use_preconfigured_tls(cfg);
        }
        Ok(RpcClient {
            http: b.build().map_err(|e| ClientError::Setup(e.to_string()))?,
            base: base_url(addr, default_port, tls),
            reply_limit: DEFAULT_REPLY_LIMIT,
        })
    }

    /// A client for another server sharing this one's connection pool, TLS configuration
    /// (so the same expected server name) and timeouts (one `reqwest::Client` for a whole
    /// fleet instead of one per machine).
    pub fn for_address(&self, addr: &str, default_port: u16) -> RpcClient {
        RpcClient {
            http: self.http.clone(),
            base: base_url(addr, default_port, self.base.starts_with("https://")),
            reply_limit: self.reply_limit,
        }
    }

    /// Caps the size of JSON replies (default `DEFAULT_REPLY_LIMIT`).
    pub fn with_reply_limit(mut self, bytes: usize) -> RpcClient {
        self.reply_limit = bytes;
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Calls `method` with a JSON request, expecting a JSON reply.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: &str,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Setup(e.to_string()))?;
        let mut resp = self
            .call_raw(method, reqwest::Body::from(body), "application/json")
            .await?;
        let mut bytes = Vec::new();
        loop {
            let chunk = resp.chunk().await.map_err(|e| ClientError::Decode {
                method: method.to_string(),
                message: connect_message(&e),
            })?;
            let Some(chunk) = chunk else { break };
            if bytes.len() + chunk.len() > self.reply_limit {
                return Err(ClientError::Decode {
                    method: method.to_string(),
                    message: format!("reply larger than {} bytes", self.reply_limit),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            method: method.to_string(),
            message: e.to_string(),
        })
    }

    /// Calls `method` with any body; returns the successful response for streaming.
    pub async fn call_raw(
        &self,
        method: &str,
        body: reqwest::Body,
        content_type: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}/rpc/{method}", self.base);
        let resp = self
            .http
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .map_err(|e| ClientError::connect(&self.base, &e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or_else(|_| text.lines().next().unwrap_or("").to_string());
        Err(ClientError::Status {
            method: method.to_string(),
            status,
            message,
        })
    }

    /// GETs a page (status pages, metrics); returns the body text.
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| ClientError::connect(&self.base, &e))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| ClientError::connect(&self.base, &e))?;
        if !(200..300).contains(&status) {
            return Err(ClientError::Status {
                method: path.to_string(),
                status,
                message: text.lines().next().unwrap_or("").to_string(),
            });
        }
        Ok(text)
    }
}

/// Default imageserver port.
pub const IMAGESERVER_PORT: u16 = 6971;
/// Default subd port.
pub const SUBD_PORT: u16 = 6969;
/// Default dominator port.
pub const DOMINATOR_PORT: u16 = 6970;

/// The common name an imageserver's certificate carries (`make-certs` role name).
pub const IMAGESERVER_NAME: &str = "imageserver";
/// The common name every subd's certificate carries (one shared certificate per fleet).
pub const SUBD_NAME: &str = "subd";
/// The common name a dominator's certificate carries.
pub const DOMINATOR_NAME: &str = "dominator";

/// How long a client keeps using the imageserver it failed over to before it tries the
/// first one of its list again.
pub const PREFER_FOR: Duration = Duration::from_secs(60);

/// Whether a failed call should be tried on the next imageserver of a list: no answer at
/// all (a connection error of any kind), or a 5xx. A 4xx is the server's verdict on the
/// request, the same everywhere: never retried elsewhere.
pub fn fails_over(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } => true,
        ClientError::Status { status, .. } => *status >= 500,
        ClientError::Decode { .. } | ClientError::Setup(_) => false,
    }
}

/// Which imageserver of a list is tried first, and since when.
#[derive(Debug)]
struct Preferred {
    index: usize,
    since: std::time::Instant,
}

/// The imageservers of one client, in the order given, and the one in use.
#[derive(Debug)]
struct Servers {
    /// `(address as given, its client)`.
    clients: Vec<(String, RpcClient)>,
    preferred: std::sync::Mutex<Preferred>,
}

impl Servers {
    /// The index to try first: the preferred one, or the first of the list again once
    /// the preferred one has been in use for `PREFER_FOR`.
    fn first(&self) -> usize {
        let mut p = self.preferred.lock().unwrap_or_else(|e| e.into_inner());
        if p.index != 0 && p.since.elapsed() >= PREFER_FOR {
            p.index = 0;
            p.since = std::time::Instant::now();
        }
        p.index
    }

    /// Makes `to` the preferred server after `from` failed with `why`; logged once per
    /// switch (concurrent calls that saw the same failure switch, and log, only once).
    fn switch(&self, from: usize, to: usize, why: &dyn std::fmt::Display) {
        let mut p = self.preferred.lock().unwrap_or_else(|e| e.into_inner());
        if p.index != from || from == to {
            return;
        }
        p.index = to;
        p.since = std::time::Instant::now();
        tracing::warn!(
            "imageserver {} failed ({why}); using {} for the next {} s",
            self.clients[from].0,
            self.clients[to].0,
            PREFER_FOR.as_secs()
        );
    }
}

/// Typed client for the imageserver's `ImageServer.*` and `ObjectServer.*` methods.
///
/// Given several imageservers (`a,b,c`), a call that fails with a connection error or a
/// 5xx is tried on the next, in order, wrapping around once; the first that answers
/// becomes the preferred one (tried first by every later call of this client and its
/// clones) for `PREFER_FOR`, then the first of the list is tried again. A 4xx is returned
/// as it is.
#[derive(Clone, Debug)]
pub struct ImageServerClient {
    /// The first imageserver of the list (status pages and raw calls in tests).
    pub rpc: RpcClient,
    servers: std::sync::Arc<Servers>,
}

/// Splits an imageserver list `a,b,c` into its addresses (blanks around commas allowed).
pub fn split_servers(list: &str) -> Vec<&str> {
    list.split(',').map(str::trim).collect()
}

impl ImageServerClient {
    /// A client for the imageserver(s) at `addr` (`HOST[:PORT]`, or several separated by
    /// commas), whose certificates must name `IMAGESERVER_NAME`.
    pub fn new(addr: &str, security: &ClientSecurity) -> Result<Self, ClientError> {
        Self::with_server_name(addr, security, IMAGESERVER_NAME)
    }

    /// A client for the imageserver(s) at `addr` (one, or several separated by commas),
    /// whose certificates must name `server_name`.
    pub fn with_server_name(
        addr: &str,
        security: &ClientSecurity,
        server_name: &str,
    ) -> Result<Self, ClientError> {
        let mut clients = Vec::new();
        for a in split_servers(addr) {
            if a.is_empty() {
                return Err(ClientError::Setup(format!(
                    "imageserver list {addr:?} has an empty entry"
                )));
            }
            let c = RpcClient::new(a, IMAGESERVER_PORT, security, server_name, None)?;
            clients.push((a.to_string(), c));
        }
        Ok(ImageServerClient {
            rpc: clients[0].1.clone(),
            servers: std::sync::Arc::new(Servers {
                clients,
                preferred: std::sync::Mutex::new(Preferred {
                    index: 0,
                    since: std::time::Instant::now(),
                }),
            }),
        })
    }

    /// How many imageservers this client may use.
    pub fn server_count(&self) -> usize {
        self.servers.clients.len()
    }

    /// Runs `call` on the preferred imageserver, then on each next one while it fails
    /// over (`fails_over`); returns the first answer (with the index of the server that
    /// gave it) or the last error.
    async fn failover<T, F, Fut>(&self, call: F) -> Result<(usize, T), ClientError>
    where
        F: Fn(RpcClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let n = self.servers.clients.len();
        let first = self.servers.first();
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            match call(self.servers.clients[i].1.clone()).await {
                Ok(v) => return Ok((i, v)),
                Err(e) if fails_over(&e) && k + 1 < n => {
                    self.servers.switch(i, (i + 1) % n, &e);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one server"))
    }

    /// JSON call `method` with `req`, failing over.
    async fn json<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: &str,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        self.failover(|rpc| async move { rpc.call(method, req).await })
            .await
            .map(|(_, r)| r)
    }

    /// After a reply from server `index` broke off mid-way (a fetch's batch), moves this
    /// client to the next server, as a failed call would.
    pub fn reply_failed(&self, index: usize, why: &dyn std::fmt::Display) {
        let n = self.servers.clients.len();
        self.servers.switch(index, (index + 1) % n, why);
    }

    pub async fn add_image(&self, name: &str, image: &Image) -> Result<(), ClientError> {
        let req = api::AddImageRequest {
            name: name.to_string(),
            image: image.clone(),
        };
        self.json::<_, api::Empty>(methods::ADD_IMAGE, &req)
            .await
            .map(|_| ())
    }

    pub async fn get_image(&self, name: &str) -> Result<Image, ClientError> {
        self.json(
            methods::GET_IMAGE,
            &api::ImageNameRequest {
                name: name.to_string(),
            },
        )
        .await
    }

    pub async fn check_image(&self, name: &str) -> Result<bool, ClientError> {
        let r: api::CheckImageResponse = self
            .json(
                methods::CHECK_IMAGE,
                &api::ImageNameRequest {
                    name: name.to_string(),
                },
            )
            .await?;
        Ok(r.exists)
    }

    /// Whether `name` is an image, and whether it was deleted (a tombstone).
    pub async fn check_image_name(
        &self,
        name: &str,
    ) -> Result<api::CheckImageResponse, ClientError> {
        self.json(
            methods::CHECK_IMAGE,
            &api::ImageNameRequest {
                name: name.to_string(),
            },
        )
        .await
    }

    pub async fn list_images(&self, prefix: Option<&str>) -> Result<Vec<String>, ClientError> {
        let r: api::ListImagesResponse = self
            .json(
                methods::LIST_IMAGES,
                &api::ListImagesRequest {
                    prefix: prefix.map(str::to_string),
                },
            )
            .await?;
        Ok(r.names)
    }

    /// The newest image directly in `dir` among `names` (`model::stream::images_in`)
    /// whose `expires_at` has not passed (each candidate is fetched to see), or `None`.
    pub async fn newest_live(
        &self,
        dir: &str,
        names: &[String],
        now: u64,
    ) -> Result<Option<String>, ClientError> {
        for name in model::stream::images_in(dir, names).into_iter().rev() {
            let image = match self.get_image(name).await {
                Ok(image) => image,
                // Expired since it was listed.
                Err(e) if e.status() == Some(410) => continue,
                Err(e) => return Err(e),
            };
            if !model::stream::expired(image.expires_at, now) {
                return Ok(Some(name.to_string()));
            }
        }
        Ok(None)
    }

    /// When `name` expires (`None` = never).
    pub async fn get_image_expiration(&self, name: &str) -> Result<Option<u64>, ClientError> {
        let r: api::ImageExpirationResponse = self
            .json(
                methods::GET_IMAGE_EXPIRATION,
                &api::ImageNameRequest {
                    name: name.to_string(),
                },
            )
            .await?;
        Ok(r.expires_at)
    }

    /// Makes `name` expire at `expires_at` (`None` = never); the server only extends.
    pub async fn change_image_expiration(
        &self,
        name: &str,
        expires_at: Option<u64>,
    ) -> Result<(), ClientError> {
        self.json::<_, api::Empty>(
            methods::CHANGE_IMAGE_EXPIRATION,
            &api::ChangeImageExpirationRequest {
                name: name.to_string(),
                expires_at,
            },
        )
        .await
        .map(|_| ())
    }

    pub async fn delete_image(&self, name: &str) -> Result<(), ClientError> {
        self.json::<_, api::Empty>(
            methods::DELETE_IMAGE,
            &api::ImageNameRequest {
                name: name.to_string(),
            },
        )
        .await
        .map(|_| ())
    }

    /// Sizes of the given objects on the server (0 = absent), in order.
    pub async fn check_objects(&self, hashes: &[ObjectId]) -> Result<Vec<u64>, ClientError> {
        let r: api::CheckObjectsResponse = self
            .json(
                methods::CHECK_OBJECTS,
                &api::CheckObjectsRequest {
                    hashes: hashes.to_vec(),
                },
            )
            .await?;
        Ok(r.sizes)
    }

    /// Uploads a `frame` stream of objects in one request, to the preferred imageserver
    /// only: a stream cannot be sent twice (the calls before it, `CheckObjects` among
    /// them, have already moved past a server that is down). A caller that can produce
    /// the stream again uses `add_objects_to`, and on a failure that `fails_over`,
    /// `reply_failed` and the next server.
    pub async fn add_objects(
        &self,
        body: reqwest::Body,
    ) -> Result<api::AddObjectsResponse, ClientError> {
        self.add_objects_to(self.preferred(), body).await
    }

    /// The index of the imageserver calls go to first now (for `add_objects_to`).
    pub fn preferred(&self) -> usize {
        self.servers.first()
    }

    /// `add_objects` to the imageserver at `index` of the list.
    pub async fn add_objects_to(
        &self,
        index: usize,
        body: reqwest::Body,
    ) -> Result<api::AddObjectsResponse, ClientError> {
        let rpc = &self.servers.clients[index % self.servers.clients.len()].1;
        let resp = rpc
            .call_raw(methods::ADD_OBJECTS, body, "application/octet-stream")
            .await?;
        let bytes = resp.bytes().await.map_err(|e| ClientError::Decode {
            method: methods::ADD_OBJECTS.into(),
            message: connect_message(&e),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            method: methods::ADD_OBJECTS.into(),
            message: e.to_string(),
        })
    }

    /// Starts downloading objects; the response body is a `frame` stream in request order.
    pub async fn get_objects(&self, hashes: &[ObjectId]) -> Result<reqwest::Response, ClientError> {
        self.get_objects_from(hashes).await.map(|(_, r)| r)
    }

    /// `get_objects`, with the index of the imageserver answering (for `reply_failed`
    /// when its reply breaks off).
    pub async fn get_objects_from(
        &self,
        hashes: &[ObjectId],
    ) -> Result<(usize, reqwest::Response), ClientError> {
        let body = serde_json::to_vec(&api::GetObjectsRequest {
            hashes: hashes.to_vec(),
        })
        .unwrap();
        let body = &body;
        self.failover(|rpc| async move {
            rpc.call_raw(
                methods::GET_OBJECTS,
                body.clone().into(),
                "application/json",
            )
            .await
        })
        .await
    }

    pub async fn list_unreferenced_objects(&self) -> Result<Vec<api::ObjectInfo>, ClientError> {
        let r: api::ListUnreferencedObjectsResponse = self
            .json(methods::LIST_UNREFERENCED_OBJECTS, &api::Empty {})
            .await?;
        Ok(r.objects)
    }

    pub async fn delete_unreferenced_objects(
        &self,
        percentage: u8,
        bytes: u64,
    ) -> Result<api::DeleteUnreferencedObjectsResponse, ClientError> {
        self.json(
            methods::DELETE_UNREFERENCED_OBJECTS,
            &api::DeleteUnreferencedObjectsRequest { percentage, bytes },
        )
        .await
    }
}

/// Typed client for a subd's `Subd.*` methods.
#[derive(Clone, Debug)]
pub struct SubdClient {
    pub rpc: RpcClient,
}

impl SubdClient {
    /// A client for the subd at `addr`, whose certificate must name `SUBD_NAME`.
    pub fn new(
        addr: &str,
        security: &ClientSecurity,
        timeout: Option<Duration>,
    ) -> Result<Self, ClientError> {
        Ok(SubdClient {
            rpc: RpcClient::new(addr, SUBD_PORT, security, SUBD_NAME, timeout)?,
        })
    }

    pub async fn poll(&self, req: &api::PollRequest) -> Result<api::PollResponse, ClientError> {
        self.rpc.call(methods::SUBD_POLL, req).await
    }

    pub async fn fetch(&self, req: &api::FetchRequest) -> Result<api::FetchResponse, ClientError> {
        self.rpc.call(methods::SUBD_FETCH, req).await
    }

    pub async fn update(
        &self,
        req: &api::UpdateRequest,
    ) -> Result<api::UpdateResponse, ClientError> {
        self.rpc.call(methods::SUBD_UPDATE, req).await
    }

    /// The host's tree as its last scan found it (`Snapshot.GetTree`: a full poll for a
    /// snapshot, without the `Subd.Poll` grant).
    pub async fn snapshot_tree(
        &self,
        req: &api::PollRequest,
    ) -> Result<api::PollResponse, ClientError> {
        self.rpc.call(methods::SNAPSHOT_GET_TREE, req).await
    }

    /// Starts reading objects from the host's live files (`Snapshot.GetObjects`); the
    /// response body is a `frame::checked` stream in request order.
    pub async fn snapshot_objects(
        &self,
        hashes: &[ObjectId],
    ) -> Result<reqwest::Response, ClientError> {
        let body = serde_json::to_vec(&api::SnapshotObjectsRequest {
            hashes: hashes.to_vec(),
        })
        .map_err(|e| ClientError::Setup(e.to_string()))?;
        self.rpc
            .call_raw(
                methods::SNAPSHOT_GET_OBJECTS,
                body.into(),
                "application/json",
            )
            .await
    }

    pub async fn cleanup(&self, hashes: &[ObjectId]) -> Result<(), ClientError> {
        self.rpc
            .call::<_, api::Empty>(
                methods::SUBD_CLEANUP,
                &api::CleanupRequest {
                    hashes: hashes.to_vec(),
                },
            )
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_refuses_urls_paths_and_queries() {
        for ok in [
            "imageserver",
            "is.example:6971",
            "10.0.0.1:6971",
            "[::1]:6971",
            "::1",
        ] {
            check_host_port(ok).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("https://h:1", "a URL"),
            ("127.0.0.1:7200/../x", "holds a path"),
            ("127.0.0.1:7201/rpc/X?", "holds a path"),
            ("h:1#x", "holds a path"),
            ("u@h:1", "holds a path"),
            ("h:1%2F", "holds a path"),
            ("h :1", "blank"),
        ] {
            let e = check_host_port(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    /// The kind of `call`'s failure against `addr` (connect timeout 300 ms).
    async fn failure(addr: &str, security: &ClientSecurity) -> (ConnectFailure, String) {
        let timeouts = ClientTimeouts {
            connect: Duration::from_millis(300),
            call: Some(Duration::from_secs(20)),
        };
        let c = RpcClient::with_timeouts(addr, 1, security, SUBD_NAME, timeouts).unwrap();
        let e = c
            .call::<_, api::Empty>(methods::SUBD_POLL, &api::Empty {})
            .await
            .unwrap_err();
        (
            e.connect_failure().expect("a connect failure"),
            e.to_string(),
        )
    }

    #[tokio::test]
    async fn a_failed_connection_is_classified_by_type_not_text() {
        let closed = testkit::net::ClosedPort::new();
        let (kind, _) = failure(&closed.addr.to_string(), &ClientSecurity::Insecure).await;
        assert_eq!(kind, ConnectFailure::Refused);

        let (kind, msg) = failure("no-such-machine.invalid:1", &ClientSecurity::Insecure).await;
        assert_eq!(kind, ConnectFailure::Dns, "{msg}");
        assert!(
            msg.contains("failed to lookup address information"),
            "the message is the resolver's, as before: {msg}"
        );

        let hole = testkit::net::Blackhole::new();
        let (kind, _) = failure(&hole.addr.to_string(), &ClientSecurity::Insecure).await;
        assert_eq!(kind, ConnectFailure::Timeout);

        // TLS to something that answers in plain text.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain = l.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let certs = tempfile::tempdir().unwrap();
        crate::certs::make_all(certs.path(), &[]).unwrap();
        let tls = ClientSecurity::Tls(TlsFiles {
            ca: certs.path().join("CA.pem"),
            cert: certs.path().join("dominator/cert.pem"),
            key: certs.path().join("dominator/key.pem"),
        });
        let (kind, msg) = failure(&plain.to_string(), &tls).await;
        assert_eq!(kind, ConnectFailure::Tls, "{msg}");
    }

    #[test]
    fn base_urls() {
        assert_eq!(base_url("localhost", 6971, false), "http://localhost:6971");
        assert_eq!(base_url("h:1", 6971, true), "https://h:1");
        assert_eq!(base_url("[::1]:5", 6971, false), "http://[::1]:5");
        assert_eq!(base_url("::1", 6971, false), "http://[::1]:6971");
        assert_eq!(base_url("http://x:1/", 6971, false), "http://x:1");
    }

    #[test]
    fn connection_errors_and_5xx_fail_over_4xx_do_not() {
        let status = |status| ClientError::Status {
            method: "m".into(),
            status,
            message: String::new(),
        };
        let connect = |kind| ClientError::Connect {
            addr: "a".into(),
            kind,
            message: String::new(),
        };
        let cases = [
            (connect(ConnectFailure::Refused), true),
            (connect(ConnectFailure::Timeout), true),
            (connect(ConnectFailure::Other), true),
            (status(500), true),
            (status(503), true),
            (status(507), true),
            (status(400), false),
            (status(404), false),
            (status(409), false),
            (status(410), false),
            (
                ClientError::Decode {
                    method: "m".into(),
                    message: String::new(),
                },
                false,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(fails_over(&e), want, "{e}");
        }
    }

    #[test]
    fn a_list_of_imageservers_keeps_the_one_that_works() {
        let c =
            ImageServerClient::new("127.0.0.1:1, 127.0.0.1:2", &ClientSecurity::Insecure).unwrap();
        assert_eq!(c.server_count(), 2);
        assert_eq!(c.servers.first(), 0);
        c.servers.switch(0, 1, &"refused");
        assert_eq!(c.servers.first(), 1);
        // A second report of the same failure (a concurrent call) changes nothing.
        c.servers.switch(0, 1, &"refused");
        assert_eq!(c.servers.first(), 1);
        // Clones share the preference.
        assert_eq!(c.clone().servers.first(), 1);
        // After PREFER_FOR, the first of the list is tried again.
        let since = c.servers.preferred.lock().unwrap().since;
        c.servers.preferred.lock().unwrap().since =
            since.checked_sub(PREFER_FOR).expect("a clock a minute old");
        assert_eq!(c.servers.first(), 0);
        assert!(ImageServerClient::new("a,,b", &ClientSecurity::Insecure).is_err());
    }
}
