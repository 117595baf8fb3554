//! Bounds on what a client connection may hold in `http::serve`: how long a request head
//! may take, how long a transfer may stall, how slowly a request body may arrive, and how
//! many connections one peer (an IPv4 address, or an IPv6 /64) and all peers together may
//! keep open — with the shed connections summarised in the log.
//!
//! Shedding policy: a new connection is always preferred to an idle one. Over a limit, the
//! oldest *idle* connection (no request in progress: a slow or absent request head, or an
//! idle keep-alive) of the same peer (per-peer limit) or of the peer holding the most
//! connections (global limit) is closed to make room; only when every connection counted
//! against the limit has a request in progress is the new one refused. A slowloris thus
//! only ever evicts its own sockets, and a normal request still gets through.
//!
//! A connection mid-request is not shed, so a request body must keep a minimum pace
//! (`PacedBody`): every window of `header_timeout` spent reading it must either end it or
//! bring at least `min_body_rate × window` bytes. A body trickled to hold a connection is
//! thus cut off within one window, whatever its declared length.

use hyper::body::{Body, Frame, SizeHint};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Sleep;

/// Default for `ConnectionLimits::header_timeout`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for `ConnectionLimits::transfer_timeout` (the clients' read timeout).
pub const DEFAULT_TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for `ConnectionLimits::min_body_rate` (bytes per second): 80 KiB per default
/// 10 s window, so any ordinary JSON request arrives whole within 10 s of its head.
pub const DEFAULT_MIN_BODY_RATE: u64 = 8 << 10;
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
    /// Bytes per second a request body must average over each window of `header_timeout`
    /// spent reading it (a window that ends the body is always enough); 0: no minimum.
    pub min_body_rate: u64,
    /// Connections one peer (`peer_group`) may hold.
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
            min_body_rate: DEFAULT_MIN_BODY_RATE,
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

    /// How a request body is paced under these limits.
    pub fn body_pace(&self) -> BodyPace {
        BodyPace {
            stall: self.transfer_timeout,
            window: self.header_timeout,
            min_per_window: (self.min_body_rate as u128 * self.header_timeout.as_millis() / 1000)
                .min(u64::MAX as u128) as u64,
        }
    }
}

/// The peer a connection counts against for the per-peer limit: an IPv4 address (an
/// IPv4-mapped IPv6 address counts as its IPv4 address), or the /64 an IPv6 address is in,
/// since one machine may use any address of its /64.
pub fn peer_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
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
    /// Bytes per second a request body must average over each header-timeout window (a
    /// window that ends the body is enough); slower, the request is cut off. 0: no minimum
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MIN_BODY_RATE)]
    pub min_body_bytes_per_second: u64,
    /// Connections one peer (IPv4 address or IPv6 /64) may hold (over it, its oldest idle one is closed)
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
            min_body_rate: self.min_body_bytes_per_second,
            max_per_peer: self.max_connections_per_peer.max(1),
            max_total: (self.max_connections > 0).then_some(self.max_connections),
        }
    }
}

struct Entry {
    peer: IpAddr,
    /// Requests in progress (head read, reply not yet fully written).
    busy: usize,
    /// While a request body is read: 1 + milliseconds from the tracker's epoch to the start
    /// of its current pace window; 0 otherwise.
    body_window: Arc<AtomicU64>,
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

    /// The connection (of `peer`, if given) reading a request body that has gone longest
    /// without bringing its window's minimum.
    fn slowest_body(&self, peer: Option<IpAddr>) -> Option<u64> {
        self.conns
            .iter()
            .filter(|(_, e)| peer.is_none_or(|p| p == e.peer))
            .map(|(id, e)| (*id, e.body_window.load(Ordering::Relaxed)))
            .filter(|(_, w)| *w != 0)
            .min_by_key(|(_, w)| *w)
            .map(|(id, _)| id)
    }
}

/// What was shed since the last summary.
#[derive(Default)]
struct ShedStats {
    over_peer: u64,
    over_total: u64,
    refused: u64,
    slow_body_shed: u64,
    slow_head: u64,
    slow_body: u64,
    by_peer: HashMap<IpAddr, u64>,
}

/// Every open connection of one server, and what was shed.
pub struct Tracker {
    limits: ConnectionLimits,
    total: usize,
    registry: Mutex<Registry>,
    shed: Mutex<ShedStats>,
    epoch: Instant,
}

/// One admitted connection; dropping it forgets the connection.
pub struct Admitted {
    tracker: Arc<Tracker>,
    id: u64,
    /// Notified when the connection is shed to make room for a newer one.
    pub evicted: Arc<Notify>,
    requests: std::sync::atomic::AtomicU64,
    body_window: Arc<AtomicU64>,
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
    /// The tracker this connection is counted in.
    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// Where a `PacedBody` read on this connection reports its pace, making the connection
    /// sheddable while its body falls behind.
    pub fn pace_report(&self, peer: IpAddr) -> PaceReport {
        PaceReport {
            tracker: self.tracker.clone(),
            peer,
            window: self.body_window.clone(),
        }
    }

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
            epoch: Instant::now(),
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
    /// reached, else the one whose request body has gone longest below its pace; `None`
    /// when it must be refused (every counted connection is busy, none reading a body).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Admitted> {
        let peer = peer_group(peer);
        let mut reg = self.registry();
        let over_peer = reg.per_peer.get(&peer).copied().unwrap_or(0) >= self.limits.max_per_peer;
        let over_total = reg.conns.len() >= self.total;
        if over_peer || over_total {
            let idle = if over_peer {
                reg.oldest_idle(Some(peer))
            } else {
                let top = reg
                    .per_peer
                    .iter()
                    .max_by_key(|(_, n)| **n)
                    .map(|(p, _)| *p);
                reg.oldest_idle(top).or_else(|| reg.oldest_idle(None))
            };
            let slow_body = match idle {
                Some(_) => None,
                None => reg.slowest_body(over_peer.then_some(peer)),
            };
            let mut stats = self.stats();
            match idle.or(slow_body).and_then(|id| reg.remove(id)) {
                Some(e) => {
                    e.evict.notify_one();
                    *stats.by_peer.entry(e.peer).or_default() += 1;
                    if slow_body.is_some() {
                        stats.slow_body_shed += 1;
                    } else if over_peer {
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
        let body_window = Arc::new(AtomicU64::new(0));
        reg.conns.insert(
            id,
            Entry {
                peer,
                busy: 0,
                body_window: body_window.clone(),
                evict: evicted.clone(),
            },
        );
        *reg.per_peer.entry(peer).or_default() += 1;
        Some(Admitted {
            tracker: self.clone(),
            id,
            evicted,
            requests: Default::default(),
            body_window,
        })
    }

    /// Counts a connection closed because its first request head (or TLS handshake) was
    /// not complete in time; an idle keep-alive closed after requests is not counted.
    pub fn slow_head(&self, peer: IpAddr) {
        let mut stats = self.stats();
        stats.slow_head += 1;
        *stats.by_peer.entry(peer_group(peer)).or_default() += 1;
    }

    /// Counts a request cut off because its body arrived slower than the minimum pace.
    pub fn slow_body(&self, peer: IpAddr) {
        let mut stats = self.stats();
        stats.slow_body += 1;
        *stats.by_peer.entry(peer_group(peer)).or_default() += 1;
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
            "shed connections: {} closed over the per-peer limit of {}, {} closed over the limit of {} connections, {} refused (all busy), {} closed to make room mid-way through a slow request body, {} closed for a request head slower than {:?}, {} cut off for a request body slower than {} bytes/s; most from {peer} ({n}); {} open",
            s.over_peer,
            self.limits.max_per_peer,
            s.over_total,
            self.total,
            s.refused,
            s.slow_body_shed,
            s.slow_head,
            self.limits.header_timeout,
            s.slow_body,
            self.limits.min_body_rate,
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

/// How a request body must arrive (`ConnectionLimits::body_pace`).
#[derive(Clone, Copy, Debug)]
pub struct BodyPace {
    /// Longest silence while the body is read.
    pub stall: Duration,
    /// Length of a pace window (time the handler spends not reading does not count).
    pub window: Duration,
    /// Bytes each window must bring unless the body ends in it; 0: no minimum.
    pub min_per_window: u64,
}

/// Why a request body was cut off.
#[derive(Debug, thiserror::Error)]
pub enum BodyTooSlow {
    #[error("request body stalled: nothing received for {0:?}")]
    Stalled(Duration),
    #[error("request body too slow: {got} bytes in {window:?}, at least {min} required")]
    BelowPace {
        got: u64,
        min: u64,
        window: Duration,
    },
}

/// A request body that fails with `BodyTooSlow` when, while it is being read, no bytes
/// arrive for `BodyPace::stall`, or a window of `BodyPace::window` neither ends it nor
/// brings `BodyPace::min_per_window` bytes. Time the handler spends not reading does not
/// count. A cut-off is counted in `tracker` (for the shed summary) if one is given.
pub struct PacedBody<B> {
    inner: B,
    pace: BodyPace,
    idle: Option<Pin<Box<Sleep>>>,
    /// Start of the current window (`None` until first read).
    window_start: Option<Instant>,
    /// Bytes received in the current window.
    got: u64,
    /// When the last frame was handed to the handler (the window pauses until it reads on).
    handed_at: Option<Instant>,
    window_end: Option<Pin<Box<Sleep>>>,
    failed: bool,
    report: Option<PaceReport>,
}

/// Where a `PacedBody` reports: its connection's pace window (for shedding) and a
/// cut-off (for the shed summary).
pub struct PaceReport {
    tracker: Arc<Tracker>,
    peer: IpAddr,
    window: Arc<AtomicU64>,
}

impl PaceReport {
    fn window_started(&self, at: Option<Instant>) {
        let v = at.map_or(0, |t| {
            1 + t.saturating_duration_since(self.tracker.epoch).as_millis() as u64
        });
        self.window.store(v, Ordering::Relaxed);
    }
}

impl<B> Drop for PacedBody<B> {
    fn drop(&mut self) {
        if let Some(r) = &self.report {
            r.window_started(None);
        }
    }
}

impl<B> PacedBody<B> {
    pub fn new(inner: B, pace: BodyPace) -> Self {
        PacedBody {
            inner,
            pace,
            idle: None,
            window_start: None,
            got: 0,
            handed_at: None,
            window_end: None,
            failed: false,
            report: None,
        }
    }

    /// Reports this body's pace and cut-off to its connection's tracker.
    pub fn reporting_to(mut self, report: PaceReport) -> Self {
        self.report = Some(report);
        self
    }

    fn set_window(&mut self, start: Option<Instant>) {
        if self.window_start != start {
            if let Some(r) = &self.report {
                r.window_started(start);
            }
        }
        self.window_start = start;
    }

    fn fail(&mut self, e: BodyTooSlow) -> Box<dyn std::error::Error + Send + Sync> {
        self.failed = true;
        self.idle = None;
        self.window_end = None;
        self.set_window(None);
        if let Some(r) = &self.report {
            tracing::debug!(peer = %r.peer, "request cut off: {e}");
            r.tracker.slow_body(r.peer);
        }
        Box::new(e)
    }
}

impl<B> Body for PacedBody<B>
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
        if self.failed {
            return Poll::Ready(None);
        }
        let now = Instant::now();
        let start = match (self.window_start, self.handed_at.take()) {
            (None, _) => now,
            (Some(s), Some(handed)) => s + now.saturating_duration_since(handed),
            (Some(s), None) => s,
        };
        self.set_window(Some(start));
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.idle = None;
                if let Some(d) = frame.data_ref() {
                    self.got += bytes::Buf::remaining(d) as u64;
                }
                if self.got >= self.pace.min_per_window {
                    self.got = 0;
                    self.set_window(Some(now));
                }
                self.handed_at = Some(now);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(r) => {
                self.idle = None;
                self.set_window(None);
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let stall = self.pace.stall;
                let idle = self
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                if idle.as_mut().poll(cx).is_ready() {
                    let e = self.fail(BodyTooSlow::Stalled(stall));
                    return Poll::Ready(Some(Err(e)));
                }
                if self.pace.min_per_window > 0 {
                    let deadline = tokio::time::Instant::from_std(start + self.pace.window);
                    let end = self
                        .window_end
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if end.deadline() != deadline {
                        end.as_mut().reset(deadline);
                    }
                    if end.as_mut().poll(cx).is_ready() {
                        let e = BodyTooSlow::BelowPace {
                            got: self.got,
                            min: self.pace.min_per_window,
                            window: self.pace.window,
                        };
                        let e = self.fail(e);
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
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

    #[test]
    fn ipv6_peers_are_grouped_by_64_and_mapped_ipv4_counts_as_ipv4() {
        let g = |s: &str| peer_group(s.parse().unwrap()).to_string();
        assert_eq!(g("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(g("2001:db8:1:2:ffff:1:2:3"), "2001:db8:1:2::");
        assert_eq!(g("2001:db8:1:3::1"), "2001:db8:1:3::");
        assert_eq!(g("::ffff:10.1.2.3"), "10.1.2.3");
        assert_eq!(g("10.1.2.3"), "10.1.2.3");
        assert_eq!(g("127.0.0.2"), "127.0.0.2");
        let t = Tracker::new(limits(2, 100));
        let _a = t.admit("2001:db8::1".parse().unwrap()).unwrap();
        let _b = t.admit("2001:db8::2".parse().unwrap()).unwrap();
        let c = t.admit("2001:db8::3".parse().unwrap()).unwrap();
        let _c = c.busy();
        // one /64 is one peer: its oldest idle connection made room
        assert_eq!(t.open(), 2);
        assert!(t.registry().conns.contains_key(&c.id));
    }

    #[test]
    fn with_every_connection_busy_the_body_longest_below_its_pace_is_shed() {
        let t = Tracker::new(limits(100, 3));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let conns: Vec<Admitted> = (0..3).map(|_| t.admit(a).unwrap()).collect();
        let _busy: Vec<Busy> = conns.iter().map(|c| c.busy()).collect();
        // conns[0] is sending a reply (no body); conns[1] and conns[2] read bodies, whose
        // current windows began 5 s and 1 s after the epoch
        let at = |s: u64| Some(t.epoch + Duration::from_secs(s));
        conns[1].pace_report(a).window_started(at(5));
        conns[2].pace_report(a).window_started(at(1));
        let _new = t.admit(a).expect("room is made");
        let reg = t.registry();
        assert!(reg.conns.contains_key(&conns[0].id) && reg.conns.contains_key(&conns[1].id));
        assert!(!reg.conns.contains_key(&conns[2].id));
        drop(reg);
        let line = t.take_summary().unwrap();
        assert!(
            line.contains("1 closed to make room mid-way through a slow request body"),
            "{line}"
        );
    }
}
