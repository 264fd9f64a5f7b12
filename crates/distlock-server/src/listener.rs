//! The accept loop of `distlock serve`: plain HTTP or TLS, the header-read and idle timeouts, the
//! connection cap, and graceful shutdown. Each connection is served by hyper's HTTP/1.1 server
//! with the axum router as its service.
//!
//! Why not `axum::serve`: it cannot speak TLS and sets no timer on reading a request's headers,
//! so a few thousand clients that open a connection and send half a request line hold the
//! server's sockets for ever (slowloris).
//!
//! The timers are kept here rather than by hyper, because hyper's `header_read_timeout` also
//! runs while a kept-alive connection waits for its next request, which would make the idle
//! timeout the header timeout. Per connection:
//! - **header timeout**: from the moment a connection is accepted, or the first byte of a
//!   request arrives on a kept-alive one, until the request's headers are read (and for TLS,
//!   from accept until the handshake is done and the first request's headers are read);
//! - **idle timeout**: from the end of a response until the first byte of the next request;
//! - neither runs while a request is being answered, however long: a waiting long poll, an event
//!   stream or a slow store are not idle. A request's body, though, must arrive within the header
//!   timeout of its headers (a trickled body fails the request with 400 and closes the
//!   connection), so a slow body cannot hold a connection either.
//!
//! Above `--max-connections` open connections a new one is closed at once. Metrics:
//! `distlock_connections_open` (gauge), `distlock_connections_refused_total`,
//! `distlock_connections_closed_total{reason="header_timeout"|"idle_timeout"}` and
//! `distlock_tls_handshake_failures_total`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tower_service::Service;

use crate::ratelimit::{self, Limiter, RateLimit};
use crate::tls::{Tls, TlsFiles};

/// How connections are accepted and bounded (the `serve` flags of the same names).
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Serve HTTPS with these files instead of plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Longest time from accept (or a request's first byte) to the end of its headers.
    pub header_timeout: Duration,
    /// Longest time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Most connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Requests per second per caller on `/v1/*`, if limited.
    pub rate_limit: Option<RateLimit>,
    /// Key the rate limit by bearer token (the server checks tokens) rather than by client IP.
    pub rate_limit_by_token: bool,
}

impl Default for NetConfig {
    fn default() -> NetConfig {
        NetConfig {
            tls: None,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            rate_limit: None,
            rate_limit_by_token: false,
        }
    }
}

/// Connections the kernel may hold completed but not yet accepted (it caps this at
/// `net.core.somaxconn`). The standard library's 128 overflows when a few hundred clients connect
/// at once, and each connection over it waits for a SYN retransmission (a second or more).
const BACKLOG: u32 = 4096;

/// Binds `addr` for [`serve`] with a listen backlog of 4,096 (and `SO_REUSEADDR` on Unix,
/// as `TcpListener::bind` sets it). Must be called inside a Tokio runtime.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Reads the TLS files (when TLS is on) so that a bad file stops the server before it binds or
/// opens its store; the result goes to [`serve`].
pub fn prepare(config: &NetConfig) -> crate::Result<Option<Arc<Tls>>> {
    let refuse = |why: &str| Err(crate::Error::Settings(why.to_string()));
    if config.header_timeout.is_zero() {
        return refuse("--header-timeout must be more than 0s");
    }
    if config.idle_timeout.is_zero() {
        return refuse("--idle-timeout must be more than 0s");
    }
    if config.max_connections == 0 {
        return refuse("--max-connections must be at least 1");
    }
    config.tls.clone().map(|files| Tls::load(files).map(Arc::new)).transpose()
}

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting, lets every
/// request in flight finish (connections with none are closed at once) and returns when all
/// connections are closed. The caller bounds that wait (`--shutdown-grace`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: NetConfig,
    tls: Option<Arc<Tls>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let router = match config.rate_limit {
        Some(limit) => ratelimit::layer(router, Arc::new(Limiter::new(limit, config.rate_limit_by_token))),
        None => router,
    };
    if let Some(tls) = &tls {
        tls.clone().reload_on_sighup();
    }
    let timeouts = Timeouts { header: config.header_timeout, idle: config.idle_timeout };
    let (close_tx, close_rx) = watch::channel(false);
    // Every connection task holds a sender; `recv` answers `None` once all have ended.
    let (done_tx, mut done_rx) = mpsc::channel::<Infallible>(1);
    let open = Arc::new(AtomicUsize::new(0));
    metrics::gauge!("distlock_connections_open").set(0.0);
    // Shown at 0 from the start rather than appearing with the first event.
    metrics::counter!("distlock_connections_refused_total").increment(0);
    for why in [Expired::Header, Expired::Idle] {
        metrics::counter!("distlock_connections_closed_total", "reason" => why.label()).increment(0);
    }
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let count = open.fetch_add(1, Ordering::AcqRel) + 1;
        if count > config.max_connections {
            open.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("distlock_connections_refused_total").increment(1);
            tracing::debug!(%peer, limit = config.max_connections, "connection refused: --max-connections reached");
            drop(stream);
            continue;
        }
        metrics::gauge!("distlock_connections_open").set(count as f64);
        let slot = Slot { open: open.clone(), _done: done_tx.clone() };
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        let (router, close_rx) = (router.clone(), close_rx.clone());
        tokio::spawn(async move {
            connection(stream, peer, acceptor, router, timeouts, close_rx).await;
            drop(slot);
        });
    }
    drop(listener);
    let _ = close_tx.send(true);
    drop(done_tx);
    let _ = done_rx.recv().await;
    Ok(())
}

/// Accept errors: a connection that failed before it was accepted is skipped; running out of
/// descriptors or memory waits a moment (the connections being served will free some).
async fn accept_error(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted) {
        return;
    }
    tracing::warn!("accepting a connection: {e}; retrying in 50 ms");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// An open connection's place in the count; freed when its task ends, however it ends.
struct Slot {
    open: Arc<AtomicUsize>,
    _done: mpsc::Sender<Infallible>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let left = self.open.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!("distlock_connections_open").set(left as f64);
    }
}

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header: Duration,
    idle: Duration,
}

/// Why a connection was closed by a timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    Header,
    Idle,
}

impl Expired {
    fn label(self) -> &'static str {
        match self {
            Expired::Header => "header_timeout",
            Expired::Idle => "idle_timeout",
        }
    }
}

/// Milliseconds since the first call (a clock atomics can hold), never 0.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    epoch.elapsed().as_millis() as u64 + 1
}

/// What one connection is doing, shared by its socket, its requests and its timer.
struct ConnState {
    /// Requests received and not yet fully answered (a response body still being sent counts).
    in_flight: AtomicUsize,
    /// When the first byte of a request whose headers are not read yet arrived (0: none).
    head_since: AtomicU64,
    /// When the connection last became quiet (no request in flight).
    quiet_since: AtomicU64,
    /// Woken when a request's first byte arrives, so the header timer starts counting.
    wake: Notify,
}

impl ConnState {
    fn new() -> ConnState {
        let now = now_ms();
        // The header timer runs from accept: a connection must send its first request in time.
        ConnState {
            in_flight: AtomicUsize::new(0),
            head_since: AtomicU64::new(now),
            quiet_since: AtomicU64::new(now),
            wake: Notify::new(),
        }
    }

    /// Bytes came in.
    fn on_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 && self.head_since.load(Ordering::Acquire) == 0 {
            self.head_since.store(now_ms(), Ordering::Release);
            self.wake.notify_one();
        }
    }

    /// A request's headers were read and it goes to the router.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Release);
        InFlight(self.clone())
    }

    /// When the timer should look again, in `now_ms` units.
    fn next_check(&self, t: Timeouts) -> u64 {
        let now = now_ms();
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return now + t.header.min(t.idle).as_millis() as u64;
        }
        match self.head_since.load(Ordering::Acquire) {
            0 => self.quiet_since.load(Ordering::Acquire) + t.idle.as_millis() as u64,
            since => since + t.header.as_millis() as u64,
        }
    }

    /// Which timer, if any, has run out.
    fn expired(&self, t: Timeouts) -> Option<Expired> {
        let now = now_ms();
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        match self.head_since.load(Ordering::Acquire) {
            0 => (now >= self.quiet_since.load(Ordering::Acquire) + t.idle.as_millis() as u64)
                .then_some(Expired::Idle),
            since => (now >= since + t.header.as_millis() as u64).then_some(Expired::Header),
        }
    }
}

/// One request in flight; dropped with its response body, once that is sent (or abandoned).
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.quiet_since.store(now_ms(), Ordering::Release);
        }
    }
}

/// A response body that keeps its request counted as in flight until it is sent.
struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that must arrive by a deadline (the header timeout after its headers). The
/// timer is made only if the body is not all there at once, so most requests never make one.
struct TimedBody {
    body: Incoming,
    deadline: Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for TimedBody {
    type Data = hyper::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = self.deadline;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                metrics::counter!("distlock_connections_closed_total", "reason" => Expired::Header.label())
                    .increment(1);
                Poll::Ready(Some(Err("the request body did not arrive within --header-timeout".into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The socket, telling the connection's state when bytes arrive (below TLS, so handshake and
/// record bytes count as a request starting).
struct Watched<S> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one connection until it closes, a timer runs out, or shutdown.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    timeouts: Timeouts,
    mut close_rx: watch::Receiver<bool>,
) {
    // Requests and answers are small: no waiting for more bytes to fill a packet.
    let _ = stream.set_nodelay(true);
    let state = Arc::new(ConnState::new());
    let io = Watched { inner: stream, state: state.clone() };
    match tls {
        None => http(TokioIo::new(io), peer, router, state, timeouts, close_rx).await,
        Some(acceptor) => {
            let handshake = tokio::time::timeout(timeouts.header, acceptor.accept(io));
            let stream = tokio::select! {
                done = handshake => done,
                _ = close_rx.wait_for(|closing| *closing) => return,
            };
            match stream {
                Ok(Ok(stream)) => http(TokioIo::new(stream), peer, router, state, timeouts, close_rx).await,
                Ok(Err(e)) => {
                    metrics::counter!("distlock_tls_handshake_failures_total").increment(1);
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                }
                Err(_) => {
                    metrics::counter!("distlock_connections_closed_total", "reason" => Expired::Header.label())
                        .increment(1);
                    tracing::debug!(%peer, "TLS handshake not done within --header-timeout; closed");
                }
            }
        }
    }
}

/// HTTP/1.1 on an accepted (and, with TLS, handshaken) connection.
async fn http<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    state: Arc<ConnState>,
    timeouts: Timeouts,
    mut close_rx: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let requests = state.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let in_flight = requests.begin();
        let deadline = Instant::now() + timeouts.header;
        let mut req = req.map(|body| TimedBody { body, deadline, sleep: None });
        req.extensions_mut().insert(ConnectInfo(peer));
        let answer = router.clone().call(req);
        async move {
            let response = match answer.await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(response.map(|body| Tracked { body, _in_flight: in_flight }))
        }
    });
    let mut builder = http1::Builder::new();
    // The header timer is kept by this module (see the module's docs).
    builder.header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let check = state.next_check(timeouts);
        let at = Instant::now() + Duration::from_millis(check.saturating_sub(now_ms()));
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
                return;
            }
            _ = tokio::time::sleep_until(at) => {
                if let Some(why) = state.expired(timeouts) {
                    metrics::counter!("distlock_connections_closed_total", "reason" => why.label()).increment(1);
                    tracing::debug!(%peer, reason = why.label(), "connection closed");
                    return;
                }
            }
            _ = state.wake.notified() => {}
            _ = close_rx.wait_for(|closing| *closing), if !closing => {
                closing = true;
                if state.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                // Finish the requests in flight, then close.
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
