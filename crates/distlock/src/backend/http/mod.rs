//! The `http://` backend: a client of the `distlock serve` lock server.
//!
//! URL: `http://host:port[?token=T&timeout=D&batch=on|off]`, or `https://host:port` for a server
//! started with `--tls-cert`, which also takes `ca=PATH` (PEM CA certificates to trust instead of
//! the system's roots) and `cert=PATH&key=PATH` (a client certificate, for `--tls-client-ca`),
//! the parameter names `rediss://` and `etcd://` use. A certificate the client does not trust
//! gives `Unavailable` saying so. The bearer token may also come from
//! the `DISTLOCK_TOKEN` environment variable. `timeout` (default 5 s) bounds every call; an acquire
//! that waits gets its wait on top. With `batch=on` (the default), acquires that do not wait,
//! renewals and releases made concurrently by many tasks share `POST /v1/batch` requests (see
//! `batch.rs`; a call made while no other is out goes alone to its single route);
//! `batch=off` sends one request per call. Waiting is done by the server (a long
//! poll, FIFO per key); a wait longer than the server's one-hour cap is split into several long
//! polls. The server
//! chooses the lease id. The bodies are [`crate::wire`]'s; an error's code maps to an [`Error`]
//! by [`ErrorCode::to_error`]: `lock_held` → `Held` / `WaitTimeout`, `lease_lost` → `LeaseLost`,
//! `invalid_request` → `InvalidInput`, `unauthorized`, `forbidden` and `admin_disabled` →
//! `Unauthorized`, `limit_exceeded` → `LimitExceeded`, the rest (`backend_unavailable`,
//! `shutting_down` for a waiting acquire when the server shuts down: retryable, nothing was
//! granted), unknown codes and no answer → `Unavailable`.
//!
//! Several servers in front of one shared store (`serve --store etcd://…` or `redis://…`):
//! `http://a:7878,b:7878[/prefix][?…]`. Calls go to the first named until it cannot be reached or
//! does not answer, then to the next (see `client.rs`): a request that never reached a server goes
//! to the next at once; one that was sent and got no answer is not sent again (the caller gets
//! `Unavailable`, a lease's keeper retries its renewal on the next server). Lease ids belong to
//! the store, so a lease renews and releases through any of them. Not for servers with their own
//! embedded stores: those are separate lock services.

mod batch;
mod client;
mod tls;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::backend::params::Params;
use crate::backend::waiting::{Refused, Waiting};
use crate::backend::{Backend, Offers};
use crate::error::{Error, ErrorCode, Result};
use crate::types::{AcquireRequest, Grant, LeaseId, ListQuery, LockInfo, LockMode, LockPage};
use crate::wire::{
    AcquireBody, BatchOp, ErrorBody, ErrorDetail, ForceReleased, LeaseBody, ProclaimBody, ReleaseBody,
    Released, RenewBody,
};

/// Longest wait one long poll asks for (the server's cap).
const MAX_POLL: Duration = Duration::from_secs(3600);

/// A client of one lock server.
pub struct HttpBackend {
    client: Arc<client::Client>,
    timeout: Duration,
    /// Coalesces concurrent calls; `None` with `batch=off`.
    batcher: Option<batch::Batcher>,
}

/// Percent-encodes a key as one path segment.
fn encode_segment(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl HttpBackend {
    /// Parses the URL; connects on first use.
    ///
    /// ```
    /// let b = distlock::backend::http::HttpBackend::open("http://127.0.0.1:7878?timeout=2s").unwrap();
    /// # drop(b);
    /// assert!(distlock::backend::http::HttpBackend::open("http://h:1?timeout=x").is_err());
    /// assert!(distlock::backend::http::HttpBackend::open("http://h:1?batch=maybe").is_err());
    /// assert!(distlock::backend::http::HttpBackend::open("http://[::1").is_err());
    /// // Behind a reverse proxy, under a path:
    /// assert!(distlock::backend::http::HttpBackend::open("http://proxy:80/locks/").is_ok());
    /// // TLS parameters need https:// (and their files must be readable):
    /// assert!(distlock::backend::http::HttpBackend::open("http://h:1?ca=/etc/ca.pem").is_err());
    /// assert!(distlock::backend::http::HttpBackend::open("https://h:1?ca=/no/such/ca.pem").is_err());
    /// ```
    pub fn open(url: &str) -> Result<HttpBackend> {
        let (base, params) = Params::split(url, &["token", "batch", "ca", "cert", "key", "timeout"])?;
        let base = base.trim_end_matches('/').to_owned();
        if base.split_once("://").is_none_or(|(_, server)| server.is_empty()) {
            return Err(Error::InvalidInput(format!("{url:?} names no server")));
        }
        let tls = tls::TlsParams {
            ca: params.string("ca"),
            cert: params.string("cert"),
            key: params.string("key"),
        };
        let token =
            params.string("token").or_else(|| std::env::var("DISTLOCK_TOKEN").ok().filter(|t| !t.is_empty()));
        let timeout = params.duration("timeout")?.unwrap_or(Duration::from_secs(5));
        let batching = match params.get("batch") {
            None | Some("on") => true,
            Some("off") => false,
            Some(other) => return Err(Error::InvalidInput(format!("batch={other:?} must be on or off"))),
        };
        let client = Arc::new(client::Client::new(&base, token.as_deref(), timeout, &tls)?);
        let batcher = batching.then(|| batch::Batcher::new(client.clone(), timeout));
        Ok(HttpBackend { client, timeout, batcher })
    }

    /// The path of a lock's route below the server's prefix.
    fn path(key: &str, action: &str) -> String {
        format!("/v1/locks/{}{action}", encode_segment(key))
    }

    /// Sends one request; the answer whatever its status, or `Unavailable`.
    async fn send(
        &self,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<client::Answer> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| Error::InvalidInput(format!("request: {e}")))?;
        self.client.call(path, body, timeout).await
    }

    /// Turns a non-2xx answer into the matching error (`lock_held` is [`Error::Held`]; the wait
    /// loop of `acquire` turns it into [`Error::WaitTimeout`] after a wait).
    fn error(&self, key: &str, answer: &client::Answer) -> Error {
        self.error_of(key, answer.status, &answer.body)
    }

    /// The error of a refused proclaim or watch: as [`HttpBackend::error`], except that a server
    /// whose store has no elections (`not_supported`) is [`Error::InvalidInput`], as the other
    /// backends without them answer (asking again would not help).
    fn election_error(&self, key: &str, answer: &client::Answer) -> Error {
        match self.error(key, answer) {
            Error::Unavailable(why) if answer.status == ErrorCode::NotSupported.http_status() => {
                Error::InvalidInput(why)
            }
            e => e,
        }
    }

    /// The error for a non-2xx status and its body (`{"error":{...}}`), by [`ErrorCode`]; a
    /// code this version does not know, or no error body, is the server failing.
    fn error_of(&self, key: &str, status: u16, body: &[u8]) -> Error {
        let detail = serde_json::from_slice::<ErrorBody>(body).map(|b| b.error).unwrap_or_else(|_| {
            ErrorDetail { code: String::new(), message: format!("HTTP {status}"), holder: None, limit: None }
        });
        let code = detail.code.parse().unwrap_or(ErrorCode::Internal);
        match code.to_error(key, detail) {
            Error::Unavailable(why) => self.client.unavailable(why),
            e => e,
        }
    }

    /// Sends `op` with the next batch; the body of a 2xx answer, or the error it maps to.
    async fn batched<T: for<'de> Deserialize<'de>>(
        &self,
        batcher: &batch::Batcher,
        key: &str,
        op: BatchOp,
    ) -> Result<T> {
        let op =
            serde_json::value::to_raw_value(&op).map_err(|e| Error::InvalidInput(format!("request: {e}")))?;
        let (status, body) = batcher.call(op).await?;
        if !(200..300).contains(&status) {
            return Err(self.error_of(key, status, body.get().as_bytes()));
        }
        serde_json::from_str(body.get())
            .map_err(|e| self.client.unavailable(format_args!("unreadable answer: {e}")))
    }

    fn grant(body: LeaseBody, sent: Instant) -> Result<Grant> {
        // The server started the TTL `waited_ms` after it received the request, which was after
        // `sent`; never later than now.
        let counted_from = (sent + Duration::from_millis(body.waited_ms)).min(Instant::now());
        Ok(Grant {
            lease_id: LeaseId::parse(&body.lease_id)?,
            fencing_token: body.fencing_token,
            ttl: Duration::from_millis(body.ttl_ms),
            counted_from,
        })
    }

    /// The body of a 2xx answer, or the error its status maps to.
    fn read<T: for<'de> Deserialize<'de>>(&self, key: &str, answer: client::Answer) -> Result<T> {
        if !(200..300).contains(&answer.status) {
            return Err(self.error(key, &answer));
        }
        serde_json::from_slice(&answer.body)
            .map_err(|e| self.client.unavailable(format_args!("unreadable answer: {e}")))
    }
}

#[async_trait]
impl Backend for HttpBackend {
    fn name(&self) -> &'static str {
        "http"
    }

    /// Semaphores and shared locks go to the server, which refuses them (`invalid_request`) when its own store
    /// does not offer them.
    fn offers(&self) -> Offers {
        Offers { many_holders: true, elections: true, ..Offers::default() }
    }

    async fn proclaim(&self, key: &str, lease_id: &LeaseId, value: &str) -> Result<()> {
        let body = ProclaimBody { lease_id: lease_id.to_string(), value: value.to_owned() };
        let answer = self.send(&Self::path(key, "/proclaim"), Some(&body), self.timeout).await?;
        if !(200..300).contains(&answer.status) {
            return Err(self.election_error(key, &answer));
        }
        self.read::<LockInfo>(key, answer).map(drop)
    }

    /// `GET /v1/locks/{key}/watch`: the server's stream of the key's status (server-sent
    /// events), on a connection of its own.
    async fn watch(&self, key: &str) -> Result<Box<dyn crate::backend::StatusWatch>> {
        match self.client.stream(&Self::path(key, "/watch"), self.timeout).await? {
            client::Streamed::Open(body) => {
                Ok(Box::new(watch::SseWatch::new(body, key.to_owned(), self.client.base().to_owned())))
            }
            client::Streamed::Refused(answer) => Err(self.election_error(key, &answer)),
        }
    }

    async fn force_release(&self, key: &str) -> Result<Option<LockInfo>> {
        let path = format!("/v1/admin/locks/{}/release", encode_segment(key));
        let answer = self.send(&path, Some(&serde_json::json!({})), self.timeout).await?;
        if answer.status == ErrorCode::NotHeld.http_status() {
            return Ok(None);
        }
        let freed: ForceReleased = self.read(key, answer)?;
        Ok(Some(LockInfo {
            holder: Some(freed.holder),
            fencing_token: Some(freed.fencing_token),
            ..LockInfo::free(key, 0)
        }))
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Grant> {
        let _alone = match &self.batcher {
            Some(batcher) if !req.wait.waits() => match batcher.alone() {
                Some(alone) => Some(alone),
                None => {
                    let op = BatchOp::Acquire {
                        key: req.key.clone(),
                        ttl_ms: Some(req.ttl.as_millis() as u64),
                        wait_ms: None,
                        holder: Some(req.holder.clone()),
                        limit: (req.limit > 1).then_some(req.limit),
                        mode: (req.mode != LockMode::Exclusive).then_some(req.mode),
                        value: req.value.clone(),
                    };
                    let sent = Instant::now();
                    return Self::grant(self.batched(batcher, &req.key, op).await?, sent);
                }
            },
            _ => None,
        };
        let turns = Waiting::start(req.wait);
        loop {
            // The server waits (long-polls) for us, up to MAX_POLL per request.
            let poll = turns.left(MAX_POLL);
            let body = AcquireBody {
                ttl_ms: Some(req.ttl.as_millis() as u64),
                wait_ms: Some(poll.as_millis() as u64),
                holder: Some(req.holder.clone()),
                limit: (req.limit > 1).then_some(req.limit),
                mode: (req.mode != LockMode::Exclusive).then_some(req.mode),
                value: req.value.clone(),
            };
            let sent = Instant::now();
            let answer =
                self.send(&Self::path(&req.key, "/acquire"), Some(&body), poll + self.timeout).await?;
            if (200..300).contains(&answer.status) {
                return Self::grant(self.read(&req.key, answer)?, sent);
            }
            match self.error(&req.key, &answer) {
                // The key is held: try again while the wait lasts (no pause: the server waited).
                Error::Held { holder, .. } => {
                    turns
                        .next_turn(&req.key, Refused { holder, retry_in: Duration::ZERO, wake: None })
                        .await?;
                }
                err => return Err(err),
            }
        }
    }

    async fn renew(&self, key: &str, lease_id: &LeaseId, ttl: Option<Duration>) -> Result<Grant> {
        let ttl_ms = ttl.map(|t| t.as_millis() as u64);
        let alone = self.batcher.as_ref().map(|b| (b, b.alone()));
        if let Some((batcher, None)) = alone {
            let op = BatchOp::Renew { key: key.to_owned(), lease_id: lease_id.to_string(), ttl_ms };
            let sent = Instant::now();
            return Self::grant(self.batched(batcher, key, op).await?, sent);
        }
        // Without `ttl_ms` the server renews for the lease's own TTL.
        let body = RenewBody { lease_id: lease_id.to_string(), ttl_ms };
        let sent = Instant::now();
        let answer = self.send(&Self::path(key, "/renew"), Some(&body), self.timeout).await?;
        Self::grant(self.read(key, answer)?, sent)
    }

    async fn release(&self, key: &str, lease_id: &LeaseId) -> Result<()> {
        let alone = self.batcher.as_ref().map(|b| (b, b.alone()));
        if let Some((batcher, None)) = alone {
            let op = BatchOp::Release { key: key.to_owned(), lease_id: lease_id.to_string() };
            return self.batched::<Released>(batcher, key, op).await.map(drop);
        }
        let body = ReleaseBody { lease_id: lease_id.to_string() };
        let answer = self.send(&Self::path(key, "/release"), Some(&body), self.timeout).await?;
        self.read::<Released>(key, answer).map(drop)
    }

    async fn status(&self, key: &str) -> Result<LockInfo> {
        let answer = self.send(&Self::path(key, ""), None::<&()>, self.timeout).await?;
        self.read(key, answer)
    }

    /// `GET /v1/locks?prefix=…&after=…&limit=…`; without a limit the server answers at most
    /// 10,000 locks per page (follow [`LockPage::next`], as [`crate::Locker::list`] does).
    async fn list(&self, query: &ListQuery) -> Result<LockPage> {
        let mut path = format!("/v1/locks?prefix={}", encode_segment(&query.prefix));
        if let Some(after) = &query.after {
            path.push_str(&format!("&after={}", encode_segment(after)));
        }
        if let Some(limit) = query.limit {
            path.push_str(&format!("&limit={limit}"));
        }
        let answer = self.send(&path, None::<&()>, self.timeout).await?;
        self.read::<LockPage>(&query.prefix, answer)
    }
}
