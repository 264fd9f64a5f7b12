//! The etcd backend: `etcd://host:2379[,host2:2379,...][?prefix=P&timeout=D&user=U&password=W]`,
//! with TLS when `ca=PATH` (PEM) is given, and a client certificate with `cert=PATH&key=PATH`.
//!
//! The algorithm of etcd's own `concurrency.Mutex`, as a thin adapter:
//! - each acquire grants an etcd lease (TTL rounded up to whole seconds, and at least etcd's
//!   minimum) and creates its own key `<prefix>/<encoded key>/<lease id>` bound to it, in a
//!   transaction that only creates (create revision == 0) — never a blind put; a try-once acquire
//!   creates it only when no key at all exists under the lock's prefix, so a refusal leaves
//!   nothing behind;
//! - the owner is the key with the lowest create revision under the lock's prefix; a waiter
//!   watches only the key just ahead of it (no thundering herd) and re-checks after every delete;
//!   its etcd lease is kept alive while it waits; a wait that times out or fails revokes that
//!   lease (deleting the key) before it returns, a cancelled one stops the keep-alive and removes
//!   the key in the background, and a waiter whose process dies leaves a key that lapses with its
//!   lease — no orphan key ever becomes "the holder";
//! - the fencing token is the create revision of the holder's key (etcd's global revision, so it
//!   strictly increases across all grants);
//! - renew refreshes the etcd lease once (keep-alive); release deletes the holder's own key and
//!   revokes its lease. The key name carries the secret lease id, so nobody else can address it.
//!
//! Keys are percent-encoded (`/` → `%2F`, `%` → `%25`) so one lock's prefix never contains
//! another's. Every call is bounded by `timeout` (default 2 s) and fails with `Unavailable`, whose
//! message is one line naming the endpoint and the cause. A renew whose etcd lease is gone (a
//! release or expiry raced it) is `LeaseLost`.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::time::Instant;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::types::{AcquireRequest, Grant, LeaseId, ListQuery, LockInfo, LockPage};

/// A client of one etcd cluster.
pub struct EtcdBackend {
    /// One client per endpoint; requests go to `current` and move on when it fails.
    clients: Vec<Client>,
    /// The endpoint of each client, for messages.
    endpoints: Vec<String>,
    current: std::sync::atomic::AtomicUsize,
    prefix: String,
    timeout: Duration,
    /// How long one attempt on one member may take before the next member is tried.
    attempt_timeout: Duration,
    /// Attempts per request (two rounds over the endpoints).
    attempts: usize,
}

/// Errors worth another attempt: the request did not reach a live member (another endpoint of the
/// balanced channel may answer).
fn is_transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        // Cancelled, DeadlineExceeded, Unavailable.
        etcd_client::Error::GRpcStatus(s) => matches!(s.code() as i32, 1 | 4 | 14),
        _ => false,
    }
}

/// Runs one request on a clone of the client, retrying transient failures (a dead member) on
/// the other endpoints, all within the backend's timeout. The request expression is evaluated
/// again for each attempt.
macro_rules! call {
    ($self:expr, |$c:ident| $request:expr) => {{
        let deadline = Instant::now() + $self.timeout;
        let mut attempt = 0;
        loop {
            let (endpoint, mut $c) = $self.client();
            let attempt_end = deadline.min(Instant::now() + $self.attempt_timeout);
            match tokio::time::timeout_at(attempt_end, $request).await {
                Ok(Ok(v)) => break Ok(v),
                Ok(Err(e)) if !is_transient(&e) => break Err(etcd_error($self.endpoint(endpoint), e)),
                outcome => {
                    // Transport failure or no answer from this member: try the next one.
                    $self.rotate(endpoint);
                    attempt += 1;
                    if attempt >= $self.attempts || Instant::now() >= deadline {
                        break Err(match outcome {
                            Ok(Err(e)) => unavailable($self.endpoint(endpoint), &e),
                            _ => Error::Unavailable(format!(
                                "etcd {}: no answer within {:?}",
                                $self.endpoint(endpoint),
                                $self.timeout
                            )),
                        });
                    }
                }
            }
        }
    }};
}

/// Maps an etcd error from `endpoint`: refused credentials are `Unauthorized`, everything else
/// `Unavailable`.
fn etcd_error(endpoint: &str, e: etcd_client::Error) -> Error {
    if let etcd_client::Error::GRpcStatus(s) = &e {
        // PermissionDenied, Unauthenticated; etcd also says "user name is empty" as InvalidArgument.
        if matches!(s.code() as i32, 7 | 16)
            || s.message().contains("user name")
            || s.message().contains("authentication")
        {
            return Error::Unauthorized(format!("etcd {endpoint}: {}", s.message()));
        }
    }
    unavailable(endpoint, &e)
}

/// `Unavailable`, in one line naming the endpoint and the cause.
fn unavailable(endpoint: &str, e: &etcd_client::Error) -> Error {
    Error::Unavailable(format!("etcd {endpoint}: {}", cause(e)))
}

/// What went wrong, in one line: a gRPC status as its message and code (not the dump of its
/// details and metadata), a transport error as its innermost cause (e.g. "Connection refused").
fn cause(e: &etcd_client::Error) -> String {
    let text = match e {
        etcd_client::Error::GRpcStatus(s) => format!("{} ({:?})", s.message(), s.code()),
        etcd_client::Error::TransportError(t) => {
            let mut root: &dyn std::error::Error = t;
            while let Some(next) = root.source() {
                root = next;
            }
            format!("transport error: {root}")
        }
        other => other.to_string(),
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `true` when etcd says the lease does not exist (expired or revoked).
fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        // etcd-client reports a keep-alive answered with TTL 0 this way.
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => s.code() as i32 == 5 || s.message().contains("lease not found"),
        _ => false,
    }
}

/// Percent-encodes `/` and `%` so lock prefixes never nest.
fn encode(key: &str) -> String {
    key.replace('%', "%25").replace('/', "%2F")
}

fn decode(key: &str) -> String {
    key.replace("%2F", "/").replace("%25", "%")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl EtcdBackend {
    /// Connects to the endpoints of `url`.
    pub async fn open(url: &str) -> Result<EtcdBackend> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| Error::InvalidInput(format!("{url:?} is not etcd://")))?;
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (mut prefix, mut timeout, mut user, mut password) =
            ("distlock".to_owned(), Duration::from_secs(2), None, None);
        let (mut ca, mut cert, mut key): (Option<String>, Option<String>, Option<String>) =
            (None, None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("prefix", v)) if !v.is_empty() => prefix = v.to_owned(),
                Some(("timeout", v)) => {
                    timeout = humantime::parse_duration(v).ok().filter(|d| !d.is_zero()).ok_or_else(|| {
                        Error::InvalidInput(format!("timeout={v:?} is not a duration like 2s"))
                    })?
                }
                Some(("user", v)) => user = Some(v.to_owned()),
                Some(("password", v)) => password = Some(v.to_owned()),
                Some(("ca", v)) => ca = Some(v.to_owned()),
                Some(("cert", v)) => cert = Some(v.to_owned()),
                Some(("key", v)) => key = Some(v.to_owned()),
                _ => return Err(Error::InvalidInput(format!("unknown parameter {pair:?} in {url:?}"))),
            }
        }
        let scheme = if ca.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> =
            hosts.trim_end_matches('/').split(',').map(|h| format!("{scheme}://{h}")).collect();
        if hosts.is_empty() || endpoints.iter().any(|e| e.ends_with("://")) {
            return Err(Error::InvalidInput(format!("{url:?} names no etcd endpoint")));
        }
        let mut options = ConnectOptions::new().with_connect_timeout(timeout).with_timeout(timeout);
        if let (Some(u), Some(p)) = (user, password) {
            options = options.with_user(u, p);
        }
        if let Some(ca) = ca {
            let read = |path: &str| {
                std::fs::read(path).map_err(|e| Error::InvalidInput(format!("reading TLS file {path}: {e}")))
            };
            let mut tls =
                etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(read(&ca)?));
            match (cert, key) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(etcd_client::Identity::from_pem(read(&cert)?, read(&key)?));
                }
                (None, None) => {}
                _ => {
                    return Err(Error::InvalidInput("etcd TLS: give both cert= and key=, or neither".into()))
                }
            }
            options = options.with_tls(tls);
        }
        let mut clients = Vec::with_capacity(endpoints.len());
        let mut connected = Vec::with_capacity(endpoints.len());
        let mut errors = Vec::new();
        for endpoint in &endpoints {
            match tokio::time::timeout(timeout, Client::connect([endpoint.as_str()], Some(options.clone())))
                .await
            {
                Ok(Ok(c)) => {
                    clients.push(c);
                    connected.push(endpoint.clone());
                }
                Ok(Err(e)) => match etcd_error(endpoint, e) {
                    Error::Unauthorized(m) => return Err(Error::Unauthorized(m)),
                    Error::Unavailable(m) => errors.push(m),
                    e => errors.push(e.to_string()),
                },
                Err(_) => errors.push(format!("etcd {endpoint}: no answer within {timeout:?}")),
            }
        }
        if clients.is_empty() {
            return Err(Error::Unavailable(format!("no etcd endpoint usable: {}", errors.join("; "))));
        }
        let n = clients.len();
        Ok(EtcdBackend {
            clients,
            endpoints: connected,
            current: std::sync::atomic::AtomicUsize::new(0),
            prefix,
            timeout,
            attempt_timeout: (timeout / n as u32).max(Duration::from_millis(300)),
            attempts: 2 * n,
        })
    }

    /// The member requests go to now, and its index.
    fn client(&self) -> (usize, Client) {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed) % self.clients.len();
        (i, self.clients[i].clone())
    }

    /// The endpoint of client `i`, for messages.
    fn endpoint(&self, i: usize) -> &str {
        self.endpoints.get(i).map_or("?", String::as_str)
    }

    /// Moves on from member `failed` (unless another request already did).
    fn rotate(&self, failed: usize) {
        let next = (failed + 1) % self.clients.len();
        let _ = self.current.compare_exchange(
            failed,
            next,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn lock_prefix(&self, key: &str) -> String {
        format!("{}/{}/", self.prefix, encode(key))
    }

    /// The owner (lowest create revision) under a lock prefix.
    async fn owner(&self, pfx: &str) -> Result<Option<KeyValue>> {
        let opts =
            GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend).with_limit(1);
        let resp = call!(self, |c| c.get(pfx, Some(opts.clone())))?;
        Ok(resp.kvs().first().cloned())
    }

    /// Refreshes an etcd lease once; returns its TTL (0 when it no longer exists: expired, or
    /// revoked by a release that raced with this renewal).
    async fn keep_alive_once(&self, first: usize, lease: i64) -> Result<i64> {
        let (clients, timeout) = (&self.clients, self.timeout);
        let deadline = Instant::now() + timeout;
        let mut last = None;
        for attempt in 0..clients.len() * 2 {
            let i = (first + attempt) % clients.len();
            let mut c = clients[i].clone();
            let once = async {
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                Ok::<_, etcd_client::Error>(stream.message().await?.map_or(0, |r| r.ttl()))
            };
            let attempt_end = deadline.min(Instant::now() + (timeout / 2).max(Duration::from_millis(300)));
            match tokio::time::timeout_at(attempt_end, once).await {
                Ok(Ok(ttl)) => return Ok(ttl),
                Ok(Err(e)) if lease_not_found(&e) => return Ok(0),
                Ok(Err(e)) if is_transient(&e) => last = Some(unavailable(self.endpoint(i), &e)),
                Ok(Err(e)) => return Err(etcd_error(self.endpoint(i), e)),
                Err(_) if Instant::now() >= deadline => break,
                Err(_) => {
                    last =
                        Some(Error::Unavailable(format!("etcd {}: keep-alive: no answer", self.endpoint(i))))
                }
            }
        }
        Err(last
            .unwrap_or_else(|| Error::Unavailable(format!("etcd keep-alive: no answer within {timeout:?}"))))
    }

    /// Takes our key out of the queue before returning (a refusal, a wait that timed out or
    /// failed): revoking its etcd lease deletes the key with it. Otherwise the key would stay
    /// behind when the process exits right after, and become "the holder" once the keys ahead
    /// of it go. If etcd cannot be reached, the clean-up goes on in the background; nothing keeps
    /// the lease alive any more, so the key lapses with it in any case.
    async fn remove(&self, my_key: &str, lease: i64) {
        let revoked = match call!(self, |c| c.lease_revoke(lease)) {
            Ok(_) => true,
            // Gone already (expired): its key went with it.
            Err(Error::Unavailable(m)) if m.contains("NotFound") || m.contains("lease not found") => true,
            Err(_) => false,
        };
        if !revoked && call!(self, |c| c.delete(my_key, None)).is_err() {
            self.abandon(my_key.to_owned(), lease);
        }
    }

    /// Deletes our key and revokes our lease in the background, retrying for a while: when the
    /// caller cannot wait (a cancelled acquire), or etcd could not be reached just now.
    fn abandon(&self, my_key: String, lease: i64) {
        let clients = self.clients.clone();
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        handle.spawn(async move {
            for attempt in 0..clients.len() * 4 {
                let mut c = clients[attempt % clients.len()].clone();
                if c.delete(my_key.as_str(), None).await.is_ok() {
                    let _ = c.lease_revoke(lease).await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }

    /// Waits until our key is the owner, watching only the key just ahead of it each time. A
    /// broken watch (a member died) is set up again on another endpoint.
    async fn wait_turn(
        &self,
        pfx: &str,
        my_key: &str,
        my_rev: i64,
        deadline: Option<Instant>,
    ) -> Result<bool> {
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            let opts = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_max_create_revision(my_rev - 1)
                .with_limit(1);
            let resp = call!(self, |c| c.get(pfx, Some(opts.clone())))?;
            let Some(ahead) = resp.kvs().first().cloned() else {
                // Nobody ahead: ours, if our key still exists (our lease may have expired).
                let mine = call!(self, |c| c.get(my_key, None))?;
                return if mine.kvs().is_empty() {
                    Err(Error::Unavailable("etcd: our wait key vanished (its lease expired)".into()))
                } else {
                    Ok(true)
                };
            };
            let from = resp.header().map_or(0, |h| h.revision()) + 1;
            let watch_opts = WatchOptions::new().with_start_revision(from);
            let mut stream = call!(self, |c| c.watch(ahead.key(), Some(watch_opts.clone())))?;
            let deleted = async {
                while let Ok(Some(msg)) = stream.message().await {
                    if msg.events().iter().any(|e| e.event_type() == EventType::Delete) {
                        return true;
                    }
                    if msg.canceled() {
                        return false;
                    }
                }
                false
            };
            let deleted = match deadline {
                Some(d) => match tokio::time::timeout_at(d, deleted).await {
                    Ok(deleted) => deleted,
                    Err(_) => return Ok(false),
                },
                None => deleted.await,
            };
            if !deleted {
                // The watch broke: look again after a short pause (bounded by the deadline).
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Our queued key and its etcd lease, until the acquire returns a grant. Dropped while armed (the
/// acquire was cancelled, or failed on its way) it removes the key in the background; the lease is
/// no longer kept alive in any case, so the key also lapses with it if the process exits first.
struct Pending<'a> {
    backend: &'a EtcdBackend,
    key: &'a str,
    lease: i64,
    armed: bool,
}

impl Pending<'_> {
    /// Removes the key before returning (see [`EtcdBackend::remove`]).
    async fn remove(mut self) {
        self.armed = false;
        self.backend.remove(self.key, self.lease).await;
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.backend.abandon(self.key.to_owned(), self.lease);
        }
    }
}

#[async_trait]
impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    /// A try-once acquire creates its key only if no key exists under the lock's prefix (one
    /// transaction), so a refusal leaves nothing behind. A waiting acquire queues its key, and a
    /// wait that times out or fails removes it before returning; a cancelled one stops keeping its
    /// lease alive and removes it in the background.
    async fn acquire(&self, req: AcquireRequest) -> Result<Grant> {
        let start = Instant::now();
        let pfx = self.lock_prefix(&req.key);
        let my_key = format!("{pfx}{}", req.lease_id.as_str());
        let ttl_secs = (req.ttl.as_millis().div_ceil(1000) as i64).max(1);
        let lease = call!(self, |c| c.lease_grant(ttl_secs, None))?;
        let (lease_id, ttl) = (lease.id(), Duration::from_secs(lease.ttl().max(1) as u64));
        // From here until a grant, dropping this (a cancelled acquire, a `?`) removes our key.
        let mut pending = Pending { backend: self, key: &my_key, lease: lease_id, armed: true };
        let try_once = req.wait == Some(Duration::ZERO);
        let owner_opts =
            GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend).with_limit(1);
        let put =
            TxnOp::put(my_key.as_str(), req.holder.as_str(), Some(PutOptions::new().with_lease(lease_id)));
        let txn = if try_once {
            // Create our key only when nobody holds or waits (no key under the prefix at all).
            Txn::new()
                .when([Compare::create_revision(pfx.as_str(), CompareOp::Equal, 0).with_prefix()])
                .and_then([put])
                .or_else([TxnOp::get(pfx.as_str(), Some(owner_opts.clone()))])
        } else {
            Txn::new()
                .when([Compare::create_revision(my_key.as_str(), CompareOp::Equal, 0)])
                .and_then([put, TxnOp::get(pfx.as_str(), Some(owner_opts))])
        };
        let resp = call!(self, |c| c.txn(txn.clone()))?;
        let first_kv = |resp: etcd_client::TxnResponse| {
            resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            })
        };
        let revision = resp.header().map_or(0, |h| h.revision());
        let (my_rev, owner) = match (try_once, resp.succeeded()) {
            (true, true) => (revision, None),
            (true, false) => match first_kv(resp) {
                // A retried transaction whose first attempt had created our key.
                Some(kv) if kv.key() == my_key.as_bytes() => (kv.create_revision(), None),
                owner => (0, owner),
            },
            (false, true) => (revision, first_kv(resp)),
            (false, false) => {
                // A retried transaction whose first attempt had created our key: read it back.
                let mine = call!(self, |c| c.get(my_key.as_str(), None))?;
                let Some(kv) = mine.kvs().first() else {
                    return Err(Error::Unavailable("etcd: our key vanished while acquiring".into()));
                };
                (kv.create_revision(), self.owner(&pfx).await?)
            }
        };
        let grant = |counted_from| Grant {
            lease_id: req.lease_id.clone(),
            fencing_token: my_rev as u64,
            ttl,
            counted_from,
        };
        if my_rev > 0 && owner.as_ref().is_none_or(|o| o.create_revision() == my_rev) {
            pending.armed = false;
            return Ok(grant(start));
        }
        let holder = owner.map(|o| text(o.value()));
        if try_once {
            // Nothing was created; the etcd lease goes at once rather than at its TTL.
            pending.remove().await;
            return Err(Error::Held { key: req.key, holder });
        }
        // Keep our lease alive while we wait (in this future: a cancelled wait stops it too);
        // remember when the last refresh was sent.
        let refreshed = Mutex::new(start);
        let first = self.client().0;
        let keep_alive = async {
            loop {
                tokio::time::sleep(ttl / 3).await;
                let sent = Instant::now();
                if matches!(self.keep_alive_once(first, lease_id).await, Ok(t) if t > 0) {
                    if let Ok(mut r) = refreshed.lock() {
                        *r = sent;
                    }
                }
            }
        };
        let deadline = req.wait.and_then(|w| start.checked_add(w));
        let outcome = tokio::select! {
            outcome = self.wait_turn(&pfx, &my_key, my_rev, deadline) => outcome,
            never = keep_alive => never,
        };
        match outcome {
            Ok(true) => {
                pending.armed = false;
                let counted_from = refreshed.lock().map(|r| *r).unwrap_or(start);
                Ok(grant(counted_from))
            }
            Ok(false) => {
                pending.remove().await;
                let holder = self.owner(&pfx).await.ok().flatten().map(|o| text(o.value()));
                Err(Error::WaitTimeout { key: req.key, holder, waited: start.elapsed() })
            }
            Err(e) => {
                pending.remove().await;
                Err(e)
            }
        }
    }

    /// One keep-alive of the holder's etcd lease: its TTL was fixed when it was granted, so `ttl`
    /// is not used (the returned grant carries the etcd lease's own TTL).
    async fn renew(&self, key: &str, lease_id: &LeaseId, _ttl: Option<Duration>) -> Result<Grant> {
        let my_key = format!("{}{}", self.lock_prefix(key), lease_id.as_str());
        let sent = Instant::now();
        let resp = call!(self, |c| c.get(my_key.as_str(), None))?;
        let Some(kv) = resp.kvs().first() else { return Err(Error::not_owner(key)) };
        // A lease revoked by a release racing this renewal is gone: the lease is lost.
        let ttl = self.keep_alive_once(self.client().0, kv.lease()).await?;
        if ttl <= 0 {
            return Err(Error::not_owner(key));
        }
        Ok(Grant {
            lease_id: lease_id.clone(),
            fencing_token: kv.create_revision() as u64,
            ttl: Duration::from_secs(ttl as u64),
            counted_from: sent,
        })
    }

    async fn release(&self, key: &str, lease_id: &LeaseId) -> Result<()> {
        let my_key = format!("{}{}", self.lock_prefix(key), lease_id.as_str());
        let resp = call!(self, |c| c.get(my_key.as_str(), None))?;
        let Some(kv) = resp.kvs().first().cloned() else { return Err(Error::not_owner(key)) };
        // Delete exactly the key we read (not a later one of the same name), then drop the lease.
        let txn = Txn::new()
            .when([Compare::create_revision(my_key.as_str(), CompareOp::Equal, kv.create_revision())])
            .and_then([TxnOp::delete(my_key.as_str(), None)]);
        let done = call!(self, |c| c.txn(txn.clone()))?;
        let _ = call!(self, |c| c.lease_revoke(kv.lease()));
        if done.succeeded() {
            Ok(())
        } else {
            Err(Error::not_owner(key))
        }
    }

    async fn status(&self, key: &str) -> Result<LockInfo> {
        let pfx = self.lock_prefix(key);
        let opts = GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend);
        let resp = call!(self, |c| c.get(pfx.as_str(), Some(opts.clone())))?;
        let Some(owner) = resp.kvs().first() else { return Ok(LockInfo::free(key, 0)) };
        let left = call!(self, |c| c.lease_time_to_live(owner.lease(), None)).map(|t| t.ttl()).unwrap_or(0);
        Ok(LockInfo {
            key: key.to_owned(),
            held: true,
            holder: Some(text(owner.value())),
            fencing_token: Some(owner.create_revision() as u64),
            expires_in: Some(Duration::from_secs(left.max(0) as u64)),
            waiters: resp.kvs().len() as u64 - 1,
            held_for: None,
            ttl: None,
        })
    }

    /// Reads the names of every key under the prefix (keys only: their percent-encoding does not
    /// keep byte order, so the cursor is applied after decoding), then the status of the locks
    /// after the cursor, in order, only until the page is full.
    async fn list(&self, query: &ListQuery) -> Result<LockPage> {
        let search = format!("{}/{}", self.prefix, encode(&query.prefix));
        let resp =
            call!(self, |c| c.get(search.as_str(), Some(GetOptions::new().with_prefix().with_keys_only())))?;
        let mut keys: Vec<String> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let k = text(kv.key());
                let inner = k.strip_prefix(&format!("{}/", self.prefix))?.to_owned();
                let (lock, _) = inner.rsplit_once('/')?;
                Some(decode(lock))
            })
            .collect();
        keys.sort();
        keys.dedup();
        let mut held = Vec::new();
        for key in keys.into_iter().filter(|k| query.matches(k)) {
            if query.limit.is_some_and(|n| held.len() > n) {
                break;
            }
            let info = self.status(&key).await?;
            if info.held {
                held.push(info);
            }
        }
        Ok(query.page(held))
    }
}
