//! Bounds on what a client connection may hold in `http::serve`: how long a request head
//! may take, how long a transfer may stall, and how many connections one peer address and
//! all peers together may keep open — with the shed connections summarised in the log.
//!
//! Shedding policy: a new connection is always preferred to an idle one. Over a limit, the
//! oldest *idle* connection (no request in progress: a slow or absent request head, or an
//! idle keep-alive) of the same peer (per-peer limit) or of the peer holding the most
//! connections (global limit) is closed to make room; only when every connection counted
//! against the limit has a request in progress is the new one refused. A slowloris thus
//! only ever evicts its own sockets, and a normal request still gets through.

use hyper::body::{Body, Frame, SizeHint};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Sleep;

/// Default for `ConnectionLimits::header_timeout`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for `ConnectionLimits::transfer_timeout` (the clients' read timeout).
pub const DEFAULT_TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for `ConnectionLimits::max_per_peer`.
pub const DEFAULT_MAX_PER_PEER: usize = 128;
/// How often shed connections are summarised in the log (one line per interval at most).
pub const SHED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What one connection may hold.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Time to send a whole request head (also the TLS handshake), counted from the
    /// connection's start or the end of the previous reply: so also how long an idle
    /// keep-alive connection is kept.
    pub header_timeout: Duration,
    /// How long a request body may stop arriving, or a reply stop being read, before the
    /// connection is closed. Transfers of any length go on while bytes move.
    pub transfer_timeout: Duration,
    /// Connections one peer address may hold.
    pub max_per_peer: usize,
    /// Connections all peers together may hold; `None`: three quarters of the descriptor
    /// limit (`RLIMIT_NOFILE`), leaving the rest for files and outgoing connections.
    pub max_total: Option<usize>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            transfer_timeout: DEFAULT_TRANSFER_TIMEOUT,
            max_per_peer: DEFAULT_MAX_PER_PEER,
            max_total: None,
        }
    }
}

impl ConnectionLimits {
    /// The global limit in force: `max_total`, else derived from the descriptor limit.
    pub fn total(&self) -> usize {
        self.max_total.unwrap_or_else(|| {
            let fds = rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(1 << 20)
                .min(1 << 20) as usize;
            fds - (fds / 4).max(32).min(fds / 2)
        })
    }
}

/// Connection flags of a daemon.
#[derive(clap::Args, Clone, Debug)]
pub struct ConnectionArgs {
    /// Seconds a client has to send a request head (and finish the TLS handshake); also
    /// how long an idle keep-alive connection is kept
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_HEADER_TIMEOUT.as_secs())]
    pub header_timeout_secs: u64,
    /// Seconds a request body may stop arriving, or a reply stop being read, before the
    /// connection is closed
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_TRANSFER_TIMEOUT.as_secs())]
    pub transfer_timeout_secs: u64,
    /// Connections one peer address may hold (over it, its oldest idle one is closed)
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_PER_PEER)]
    pub max_connections_per_peer: usize,
    /// Connections all peers may hold (0: three quarters of the descriptor limit)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_connections: usize,
}

impl ConnectionArgs {
    pub fn limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_secs(self.header_timeout_secs.max(1)),
            transfer_timeout: Duration::from_secs(self.transfer_timeout_secs.max(1)),
            max_per_peer: self.max_connections_per_peer.max(1),
            max_total: (self.max_connections > 0).then_some(self.max_connections),
        }
    }
}

struct Entry {
    peer: IpAddr,
    /// Requests in progress (head read, reply not yet fully written).
    busy: usize,
    evict: Arc<Notify>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    /// By id, so oldest first.
    conns: BTreeMap<u64, Entry>,
    per_peer: HashMap<IpAddr, usize>,
}

impl Registry {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.conns.remove(&id)?;
        if let Some(n) = self.per_peer.get_mut(&e.peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&e.peer);
            }
        }
        Some(e)
    }

    fn oldest_idle(&self, peer: Option<IpAddr>) -> Option<u64> {
        self.conns
            .iter()
            .find(|(_, e)| e.busy == 0 && peer.is_none_or(|p| p == e.peer))
            .map(|(id, _)| *id)
    }
}

/// What was shed since the last summary.
#[derive(Default)]
struct ShedStats {
    over_peer: u64,
    over_total: u64,
    refused: u64,
    slow_head: u64,
    by_peer: HashMap<IpAddr, u64>,
}

/// Every open connection of one server, and what was shed.
pub struct Tracker {
    limits: ConnectionLimits,
    total: usize,
    registry: Mutex<Registry>,
    shed: Mutex<ShedStats>,
}

/// One admitted connection; dropping it forgets the connection.
pub struct Admitted {
    tracker: Arc<Tracker>,
    id: u64,
    /// Notified when the connection is shed to make room for a newer one.
    pub evicted: Arc<Notify>,
    requests: std::sync::atomic::AtomicU64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.tracker.registry().remove(self.id);
    }
}

/// A request in progress on a connection (not evictable while held).
pub struct Busy {
    tracker: Arc<Tracker>,
    id: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(e) = self.tracker.registry().conns.get_mut(&self.id) {
            e.busy -= 1;
        }
    }
}

impl Admitted {
    /// Requests this connection has started.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Marks a request in progress until the returned guard is dropped.
    pub fn busy(&self) -> Busy {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(e) = self.tracker.registry().conns.get_mut(&self.id) {
            e.busy += 1;
        }
        Busy {
            tracker: self.tracker.clone(),
            id: self.id,
        }
    }
}

impl Tracker {
    pub fn new(limits: ConnectionLimits) -> Arc<Tracker> {
        Arc::new(Tracker {
            total: limits.total().max(1),
            limits,
            registry: Mutex::default(),
            shed: Mutex::default(),
        })
    }

    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    // The registry lock is held for a short scan and never across an await.
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, ShedStats> {
        self.shed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection from `peer`, closing an older idle one if a limit is
    /// reached; `None` when it must be refused (every counted connection is busy).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Admitted> {
        let mut reg = self.registry();
        let over_peer = reg.per_peer.get(&peer).copied().unwrap_or(0) >= self.limits.max_per_peer;
        let over_total = reg.conns.len() >= self.total;
        if over_peer || over_total {
            let victim = if over_peer {
                reg.oldest_idle(Some(peer))
            } else {
                let top = reg
                    .per_peer
                    .iter()
                    .max_by_key(|(_, n)| **n)
                    .map(|(p, _)| *p);
                reg.oldest_idle(top).or_else(|| reg.oldest_idle(None))
            };
            let mut stats = self.stats();
            match victim.and_then(|id| reg.remove(id)) {
                Some(e) => {
                    e.evict.notify_one();
                    *stats.by_peer.entry(e.peer).or_default() += 1;
                    if over_peer {
                        stats.over_peer += 1;
                    } else {
                        stats.over_total += 1;
                    }
                }
                None => {
                    *stats.by_peer.entry(peer).or_default() += 1;
                    stats.refused += 1;
                    return None;
                }
            }
        }
        let id = reg.next_id;
        reg.next_id += 1;
        let evicted = Arc::new(Notify::new());
        reg.conns.insert(
            id,
            Entry {
                peer,
                busy: 0,
                evict: evicted.clone(),
            },
        );
        *reg.per_peer.entry(peer).or_default() += 1;
        Some(Admitted {
            tracker: self.clone(),
            id,
            evicted,
            requests: Default::default(),
        })
    }

    /// Counts a connection closed because its first request head (or TLS handshake) was
    /// not complete in time; an idle keep-alive closed after requests is not counted.
    pub fn slow_head(&self, peer: IpAddr) {
        let mut stats = self.stats();
        stats.slow_head += 1;
        *stats.by_peer.entry(peer).or_default() += 1;
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.registry().conns.len()
    }

    /// One line summarising what was shed since the last call, if anything was.
    pub fn take_summary(&self) -> Option<String> {
        let s = std::mem::take(&mut *self.stats());
        let (peer, n) = s.by_peer.iter().max_by_key(|(_, n)| **n)?;
        Some(format!(
            "shed connections: {} closed over the per-peer limit of {}, {} closed over the limit of {} connections, {} refused (all busy), {} closed for a request head slower than {:?}; most from {peer} ({n}); {} open",
            s.over_peer,
            self.limits.max_per_peer,
            s.over_total,
            self.total,
            s.refused,
            s.slow_head,
            self.limits.header_timeout,
            self.open(),
        ))
    }
}

/// A transport whose writes may not stall longer than `timeout`: a peer that stops
/// reading a reply is cut off, while a reply of any length goes on as long as it is read.
pub struct StallIo<T> {
    inner: T,
    timeout: Duration,
    stall: Option<Pin<Box<Sleep>>>,
}

impl<T> StallIo<T> {
    pub fn new(inner: T, timeout: Duration) -> Self {
        StallIo {
            inner,
            timeout,
            stall: None,
        }
    }

    fn check<R>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if r.is_ready() {
            self.stall = None;
            return r;
        }
        let timeout = self.timeout;
        let sleep = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_ready() {
            self.stall = None;
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("peer read nothing for {timeout:?}"),
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, r)
    }
}

/// A request body that stopped arriving for longer than the transfer timeout.
#[derive(Debug, thiserror::Error)]
#[error("request body stalled: nothing received for {0:?}")]
pub struct BodyStalled(pub Duration);

/// A request body that fails with `BodyStalled` when, while it is being read, no bytes
/// arrive for `timeout`. Time the handler spends not reading does not count.
pub struct IdleBody<B> {
    inner: B,
    timeout: Duration,
    idle: Option<Pin<Box<Sleep>>>,
}

impl<B> IdleBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        IdleBody {
            inner,
            timeout,
            idle: None,
        }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                self.idle = None;
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let sleep = self
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if sleep.as_mut().poll(cx).is_ready() {
                    self.idle = None;
                    return Poll::Ready(Some(Err(Box::new(BodyStalled(timeout)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_peer: usize, total: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_per_peer: per_peer,
            max_total: Some(total),
            ..ConnectionLimits::default()
        }
    }

    #[test]
    fn over_the_per_peer_limit_the_peers_oldest_idle_connection_is_shed() {
        let t = Tracker::new(limits(2, 100));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = t.admit(a).unwrap();
        let _busy = first.busy();
        let second = t.admit(a).unwrap();
        let _other = t.admit(b).unwrap();
        let _third = t.admit(a).expect("room is made");
        // the busy first one stays; the idle second one is told to close
        assert!(t.registry().conns.contains_key(&first.id));
        assert!(!t.registry().conns.contains_key(&second.id));
        assert_eq!(t.open(), 3);
        // all of a's remaining connections busy: refused
        let _b3 = _third.busy();
        assert!(t.admit(a).is_none());
        let line = t.take_summary().unwrap();
        assert!(
            line.contains("1 closed over the per-peer limit of 2"),
            "{line}"
        );
        assert!(
            line.contains("1 refused") && line.contains("most from 10.0.0.1"),
            "{line}"
        );
        assert!(t.take_summary().is_none(), "counts reset after a summary");
        drop(second);
        assert_eq!(
            t.open(),
            3,
            "dropping a shed connection does not count twice"
        );
    }

    #[test]
    fn over_the_global_limit_the_top_peers_oldest_idle_connection_is_shed() {
        let t = Tracker::new(limits(100, 3));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let b1 = t.admit(b).unwrap();
        let a1 = t.admit(a).unwrap();
        let a2 = t.admit(a).unwrap();
        let _b2 = t.admit(b).expect("room is made");
        // a holds the most: its oldest idle one goes, not b's older one
        let reg = t.registry();
        assert!(!reg.conns.contains_key(&a1.id));
        assert!(reg.conns.contains_key(&b1.id) && reg.conns.contains_key(&a2.id));
        assert_eq!(reg.conns.len(), 3);
    }
}
