//! The HTTP/1.1 client of the `http://` backend: keep-alive connections to a lock server on
//! hyper's connection API, pooled by hand, and failover between several servers in front of one
//! shared store (`http://a:7878,b:7878`).
//!
//! Why not `reqwest`: per request it parses URLs, checks proxies, looks up a keyed pool and wraps
//! the call in layers a lock client never uses; it cost about twice this client's CPU per call,
//! which on a machine shared with the server is the server's throughput (the measurements are in
//! docs/BENCHMARKS.md). What is left is what a request needs: one connection per request in
//! flight, reused while the server keeps it open; a `Host`, a bearer token and a JSON body.
//! `https://` runs the same over rustls (see `tls.rs`).
//!
//! Several servers: calls go to one of them (the first named, to begin with) until it cannot be
//! reached or gives no answer; then calls go to the next. A request that never reached a server
//! (connection refused, connect timed out) is sent to the next one at once, within the call's
//! time; one that was sent is never sent again (it may have been acted on: a grant whose answer
//! was lost), the caller gets `Unavailable` and its next call goes to the next server. Lease ids
//! are the store's, so a lease granted through one server renews and releases through another.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::tls::{self, TlsParams};
use crate::error::{Error, Result};

/// Idle connections kept for reuse; more are closed when they come back.
const MAX_IDLE: usize = 512;
/// An idle connection older than this is closed rather than reused: under the server's default
/// `--idle-timeout` (60 s), so that a request is not sent just as the server closes the
/// connection (proxies drop idle connections too).
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// A non-2xx answer is an answer too: the caller maps status and body to an error.
pub(super) struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// A long-lived GET: the body as it arrives, or the whole answer when it is not a 2xx.
pub(super) enum Streamed {
    /// A 2xx: the body, read as it comes.
    Open(hyper::body::Incoming),
    /// Any other answer, read whole.
    Refused(Answer),
}

/// Connections to the lock servers named in one URL, all fronts of one store.
pub(super) struct Client {
    servers: Vec<Endpoint>,
    /// Index of the server calls go to first; moves on when that one fails.
    current: AtomicUsize,
    /// The servers as the user wrote them, for messages about answers.
    base: String,
}

/// Connections to one server (`http://host:port[/prefix]` or `https://…`).
struct Endpoint {
    /// `host:port`, dialled as written (a name is resolved on each new connection).
    dial: String,
    host: HeaderValue,
    /// Path prefix without a trailing `/` (`""`, or `/locks` behind a reverse proxy).
    prefix: String,
    /// The server as the user wrote it, for messages.
    base: String,
    authorization: Option<HeaderValue>,
    /// Bounds connecting (the whole call has its own bound, given per call).
    connect_timeout: Duration,
    /// For `https://`: the TLS settings and the name the server's certificate must carry.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    idle: Mutex<Vec<(SendRequest<Full<Bytes>>, Instant)>>,
}

/// Why an exchange with one server failed.
enum Failure {
    /// The request never reached the server: another may take it.
    Unsent(Error),
    /// It may have been acted on: not to be sent again.
    Sent(Error),
}

impl Client {
    /// Reads `http://host[:port][/prefix]` or `https://…`, or several servers in front of one
    /// store as `http://host1:port1,host2:port2[/prefix]` (no query: the caller has taken it off
    /// and passes the TLS parameters, which only `https://` takes).
    pub(super) fn new(
        base: &str,
        token: Option<&str>,
        connect_timeout: Duration,
        tls_params: &TlsParams,
    ) -> Result<Client> {
        let bad = || Error::InvalidInput(format!("{base:?} is not a server URL like http://host:7878"));
        let (scheme, rest) = base.split_once("://").ok_or_else(bad)?;
        let (hosts, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        let authorization = token
            .map(|t| {
                HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| Error::InvalidInput("the token has characters a header cannot carry".into()))
            })
            .transpose()?;
        let servers = hosts
            .split(',')
            .map(|host| {
                let one = format!("{scheme}://{host}{path}");
                Endpoint::new(&one, authorization.clone(), connect_timeout, tls_params)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Client { servers, current: AtomicUsize::new(0), base: base.to_owned() })
    }

    /// The servers as the user wrote them (without the query), for messages.
    pub(super) fn base(&self) -> &str {
        &self.base
    }

    /// The error for servers that gave no usable answer.
    pub(super) fn unavailable(&self, why: impl std::fmt::Display) -> Error {
        Error::Unavailable(format!("lock server {}: {why}", self.base))
    }

    /// Sends one request (`path` below the prefix, e.g. `/v1/locks/k/acquire`) and reads the
    /// whole answer, all within `timeout`. A JSON `body` makes it a POST, none a GET. Starts at
    /// the current server; a request none of them took gets the last server's error.
    pub(super) async fn call(&self, path: &str, body: Option<Vec<u8>>, timeout: Duration) -> Result<Answer> {
        let body = body.map(Bytes::from);
        let deadline = tokio::time::Instant::now() + timeout;
        let first = self.current.load(Ordering::Relaxed);
        let mut unsent = None;
        for i in (0..self.servers.len()).map(|k| (first + k) % self.servers.len()) {
            let server = &self.servers[i];
            let failure = match tokio::time::timeout_at(deadline, server.exchange(path, body.clone())).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(failure)) => failure,
                Err(_) => Failure::Sent(server.unavailable("timed out")),
            };
            self.failed_over(i);
            match failure {
                Failure::Unsent(e) => unsent = Some(e),
                Failure::Sent(e) => return Err(e),
            }
        }
        Err(unsent.unwrap_or_else(|| self.unavailable("no server")))
    }

    /// Opens a long-lived GET (`path` below the prefix, e.g. a key's watch) on a connection of
    /// its own, with its answer's headers within `timeout`. Starts at the current server and
    /// moves past servers that fail (a GET changes nothing, so it may be sent again).
    pub(super) async fn stream(&self, path: &str, timeout: Duration) -> Result<Streamed> {
        let first = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in (0..self.servers.len()).map(|k| (first + k) % self.servers.len()) {
            let server = &self.servers[i];
            match tokio::time::timeout(timeout, server.open_stream(path)).await {
                Ok(Ok(streamed)) => return Ok(streamed),
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(server.unavailable("timed out")),
            }
            self.failed_over(i);
        }
        Err(last.unwrap_or_else(|| self.unavailable("no server")))
    }

    /// Server `i` failed: later calls start at the next one, unless another call has moved on
    /// already (two calls failing at once must not skip a good server).
    fn failed_over(&self, i: usize) {
        let next = (i + 1) % self.servers.len();
        let _ = self.current.compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

impl Endpoint {
    /// Reads one server's `http://host[:port][/prefix]` or `https://…`.
    fn new(
        base: &str,
        authorization: Option<HeaderValue>,
        connect_timeout: Duration,
        tls_params: &TlsParams,
    ) -> Result<Endpoint> {
        let bad = || Error::InvalidInput(format!("{base:?} is not a server URL like http://host:7878"));
        let uri: Uri = base.parse().map_err(|_| bad())?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad()),
        };
        if uri.query().is_some() {
            return Err(bad());
        }
        if !https && tls_params.any() {
            return Err(Error::InvalidInput(format!(
                "ca=, cert= and key= need an https:// URL, not {base:?}"
            )));
        }
        let authority = uri.authority().ok_or_else(bad)?;
        if authority.as_str().contains('@') {
            return Err(Error::InvalidInput(format!(
                "{base:?}: credentials in the URL are not supported; give a token with ?token= or DISTLOCK_TOKEN"
            )));
        }
        if authority.host().is_empty() {
            return Err(bad());
        }
        // `host` or `host:port` (the host keeps its brackets if it is an IPv6 literal).
        let port = match authority.as_str()[authority.host().len()..].strip_prefix(':') {
            Some(p) => p.parse::<u16>().map_err(|_| bad())?,
            None if https => 443,
            None => 80,
        };
        let tls = if https {
            let config = tls::client_config(tls_params)?;
            Some((TlsConnector::from(config), tls::server_name(authority.host())?))
        } else {
            None
        };
        let dial = format!("{}:{port}", authority.host());
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| bad())?;
        Ok(Endpoint {
            dial,
            host,
            prefix: uri.path().trim_end_matches('/').to_owned(),
            base: base.to_owned(),
            authorization,
            connect_timeout,
            tls,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// The error for a server that gave no usable answer.
    fn unavailable(&self, why: impl std::fmt::Display) -> Error {
        Error::Unavailable(format!("lock server {}: {why}", self.base))
    }

    /// The error for a failed exchange: what TLS said when TLS was the cause (an untrusted
    /// certificate, a refused client certificate), else the error itself.
    fn failed(&self, e: &(dyn std::error::Error + 'static)) -> Error {
        if let Some(tls) = tls::explain(e) {
            return self.unavailable(tls);
        }
        match e.downcast_ref::<hyper::Error>() {
            Some(h) if h.is_parse() && self.tls.is_none() => self.unavailable(format_args!(
                "the answer is not HTTP ({e}); if the server uses TLS, write https://"
            )),
            _ => self.unavailable(e),
        }
    }

    fn request(&self, path: &str, body: Option<Bytes>) -> Result<Request<Full<Bytes>>> {
        let mut builder = Request::builder()
            .uri(format!("{}{path}", self.prefix))
            .header(HOST, self.host.clone())
            .header(USER_AGENT, concat!("distlock/", env!("CARGO_PKG_VERSION")));
        if let Some(a) = &self.authorization {
            builder = builder.header(AUTHORIZATION, a.clone());
        }
        let builder = match &body {
            Some(_) => builder.method(Method::POST).header(CONTENT_TYPE, "application/json"),
            None => builder.method(Method::GET),
        };
        builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| Error::InvalidInput(format!("request to {}: {e}", self.base)))
    }

    /// One request and its answer on this server; says whether a failed request was sent.
    async fn exchange(&self, path: &str, body: Option<Bytes>) -> std::result::Result<Answer, Failure> {
        let mut request = self.request(path, body).map_err(Failure::Unsent)?;
        loop {
            let (mut sender, pooled) = match self.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await.map_err(Failure::Unsent)?, false),
            };
            if let Err(e) = sender.ready().await {
                if pooled {
                    continue;
                }
                return Err(Failure::Unsent(self.failed(&e)));
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body =
                        response.into_body().collect().await.map_err(|e| Failure::Sent(self.failed(&e)))?;
                    self.checkin(sender);
                    return Ok(Answer { status, body: body.to_bytes() });
                }
                // A kept connection the server closed meanwhile hands the request back unsent:
                // it goes out again on another one. Once sent, it is never sent twice.
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => request = unsent,
                    Some(_) => return Err(Failure::Unsent(self.failed(&e.into_error()))),
                    None => return Err(Failure::Sent(self.failed(&e.into_error()))),
                },
            }
        }
    }

    /// A GET on a new connection, never pooled: the connection closes with the stream.
    async fn open_stream(&self, path: &str) -> Result<Streamed> {
        let request = self.request(path, None)?;
        let mut sender = self.connect().await?;
        sender.ready().await.map_err(|e| self.failed(&e))?;
        let response = sender.send_request(request).await.map_err(|e| self.failed(&e))?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(Streamed::Open(response.into_body()));
        }
        let body = response.into_body().collect().await.map_err(|e| self.failed(&e))?;
        Ok(Streamed::Refused(Answer { status, body: body.to_bytes() }))
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((sender, since)) = idle.pop() {
            if since.elapsed() > IDLE_TIMEOUT {
                // The rest are older still.
                idle.clear();
                return None;
            }
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn checkin(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((sender, Instant::now()));
        }
    }

    /// A new connection; its driver runs as a task on the caller's runtime and ends when the
    /// connection closes or its sender is dropped.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.dial)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(self.unavailable(format_args!("connecting to {}: {e}", self.dial))),
            Err(_) => return Err(self.unavailable(format_args!("connecting to {}: timed out", self.dial))),
        };
        // Requests are small and answered at once: no waiting for more bytes to fill a packet.
        stream.set_nodelay(true).map_err(|e| self.unavailable(e))?;
        let Some((connector, name)) = &self.tls else {
            return self.handshake(stream).await;
        };
        let handshake = connector.connect(name.clone(), stream);
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Ok(Ok(stream)) => self.handshake(stream).await,
            Ok(Err(e)) => Err(match tls::explain(&e) {
                Some(tls) => self.unavailable(format_args!("TLS with {}: {tls}", self.dial)),
                None => self.unavailable(format_args!("TLS with {}: {e}", self.dial)),
            }),
            Err(_) => Err(self.unavailable(format_args!("TLS with {}: the handshake timed out", self.dial))),
        }
    }

    /// HTTP/1.1 on a connected stream; the connection's driver is spawned.
    async fn handshake<S>(&self, stream: S) -> Result<SendRequest<Full<Bytes>>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| self.failed(&e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("lock server connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one server of a URL naming one.
    fn one(url: &str, token: Option<&str>) -> Endpoint {
        let mut c = Client::new(url, token, Duration::from_secs(1), &TlsParams::default()).unwrap();
        assert_eq!(c.servers.len(), 1, "{url}");
        c.servers.remove(0)
    }

    #[test]
    fn reads_server_urls() {
        let c = one("http://127.0.0.1:7878", None);
        assert_eq!((c.dial.as_str(), c.prefix.as_str()), ("127.0.0.1:7878", ""));
        let c = one("http://proxy/locks", Some("t"));
        assert_eq!((c.dial.as_str(), c.prefix.as_str()), ("proxy:80", "/locks"));
        assert_eq!(c.authorization.as_ref().map(|h| h.to_str().unwrap()), Some("Bearer t"));
        let c = one("http://[::1]:9", None);
        assert_eq!(c.dial, "[::1]:9");
        let c = one("https://h", None);
        assert_eq!(c.dial, "h:443");
        assert!(c.tls.is_some());
        let ca = TlsParams { ca: Some("/ca.pem".into()), ..TlsParams::default() };
        assert!(matches!(
            Client::new("http://h:1", None, Duration::from_secs(1), &ca),
            Err(Error::InvalidInput(m)) if m.contains("https://")
        ));
        for bad in [
            "http://[::1",
            "ftp://h",
            "http://",
            "https://",
            "http://u:p@h:1",
            "http://h:x",
            "http://a:1,,b:2",
            "http://a:1,b:x",
            "http://a:1,",
        ] {
            assert!(
                matches!(
                    Client::new(bad, None, Duration::from_secs(1), &TlsParams::default()),
                    Err(Error::InvalidInput(_))
                ),
                "{bad}"
            );
        }
        assert!(
            Client::new("http://h:1", Some("a\nb"), Duration::from_secs(1), &TlsParams::default()).is_err()
        );
    }

    /// Several servers share the scheme, the path prefix and the token; each keeps its own host.
    #[test]
    fn reads_several_servers() {
        let c = Client::new(
            "http://a:1,[::1]:2,c/locks",
            Some("t"),
            Duration::from_secs(1),
            &TlsParams::default(),
        )
        .unwrap();
        let dials: Vec<(&str, &str, &str)> = c
            .servers
            .iter()
            .map(|s| (s.dial.as_str(), s.prefix.as_str(), s.host.to_str().unwrap()))
            .collect();
        assert_eq!(
            dials,
            [("a:1", "/locks", "a:1"), ("[::1]:2", "/locks", "[::1]:2"), ("c:80", "/locks", "c")]
        );
        assert!(c.servers.iter().all(|s| s.authorization.is_some()));
    }

    /// A server that refuses connections is passed over within the call, and later calls start
    /// at the one that answered.
    #[tokio::test]
    async fn fails_over_to_a_server_that_answers() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_port = dead.local_addr().unwrap().port();
        drop(dead);
        let live = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let live_port = live.local_addr().unwrap().port();
        // Answers every request on a connection with 200 and an empty JSON object.
        std::thread::spawn(move || {
            for mut sock in live.incoming().map_while(std::result::Result::ok) {
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut buf = [0u8; 4096];
                    while sock.read(&mut buf).is_ok_and(|n| n > 0) {
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
                        if sock.write_all(reply).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let url = format!("http://127.0.0.1:{dead_port},127.0.0.1:{live_port}");
        let c = Client::new(&url, None, Duration::from_secs(1), &TlsParams::default()).unwrap();
        let answer =
            c.call("/v1/info", None, Duration::from_secs(2)).await.expect("the second server answers");
        assert_eq!(answer.status, 200);
        assert_eq!(c.current.load(Ordering::Relaxed), 1, "later calls start at the live server");
        c.call("/v1/info", None, Duration::from_secs(2)).await.expect("again");
        let alone = format!("http://127.0.0.1:{dead_port}");
        let c = Client::new(&alone, None, Duration::from_secs(1), &TlsParams::default()).unwrap();
        assert!(matches!(c.call("/v1/info", None, Duration::from_secs(2)).await, Err(Error::Unavailable(_))));
    }
}
