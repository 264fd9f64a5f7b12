//! The etcd backend: `etcd://host:2379[,host2:2379,...][?prefix=P&timeout=D&user=U&password=W]`,
//! with TLS when `ca=PATH` (PEM) is given, and a client certificate with `cert=PATH&key=PATH`.
//!
//! The algorithm of etcd's own `concurrency.Mutex`, with its sessions:
//! - **sessions**: one etcd lease per backend (per [`crate::Locker`]) and TTL class, granted on
//!   first use and kept alive by one background task for every lock bound to it (every TTL/16
//!   of the session), as etcd's `concurrency.Session` does. A lock of TTL `L` lives in the session
//!   whose etcd lease has TTL `S` = ⌈1.2 L⌉ s (at least etcd's minimum): the spare fifth covers the
//!   time since the session's last keep-alive, so every grant and renewal can count its full `L`
//!   from the moment the call began without a keep-alive of its own. A session nobody has used
//!   for `max(S, 10 s)` is revoked; one whose lease etcd no longer knows is replaced.
//! - **acquire** is one create-only transaction (create revision == 0; never a blind put) of the
//!   caller's own key `<prefix>/<encoded key>/<lease id>` bound to the session's lease, which also
//!   reads the owner (lowest create revision) under the lock's prefix; a try-once acquire creates
//!   its key only when no key at all exists under the prefix, so a refusal leaves nothing behind.
//!   **release** is one delete of that key; the session lease stays for the other locks.
//! - a waiter watches only the key just ahead of it (no thundering herd): it sets the watch up
//!   from the current revision, then checks that key is still there (so etcd never has to replay
//!   history to it, which its watch machinery does only every 100 ms), and looks again after every
//!   delete. A wait that times out or fails deletes its key before it returns; a cancelled one
//!   deletes it in the background; a waiter whose process dies leaves a key that lapses with the
//!   session lease — no orphan key ever becomes "the holder".
//! - **each lock keeps its own TTL**: the backend keeps the deadline of every lock granted or
//!   renewed through it and deletes the key when the deadline passes unrenewed (a transaction that
//!   also checks the key still has its create revision and session), so a holder that stops
//!   renewing frees the lock after its TTL even while the session lives on. If the process dies,
//!   the session lease lapses and etcd deletes every key bound to it.
//! - **renew** reads the key (gone: [`Error::LeaseLost`]) and moves the lock's deadline; the
//!   session is refreshed only when its last keep-alive is older than the spare fifth allows. A
//!   key bound to another lease (a lock granted through another process, e.g. another lock server
//!   in front of the same cluster, or through a session of another TTL) is moved to this backend's
//!   session in one transaction that keeps its create revision, so its fencing token and its place
//!   in the queue stay.
//! - the fencing token is the create revision of the holder's key (etcd's global revision, so it
//!   strictly increases across all grants).
//!
//! Interoperability: a lock `K` here and `etcdctl lock <prefix>/K` (or Go's `concurrency.Mutex` on
//! `<prefix>/K`) share one queue — they create their keys under the same prefix and the owner is
//! the lowest create revision for all of them — so a mixed fleet of Go and Rust services can share
//! a lock. Keys are percent-encoded (`/` → `%2F`, `%` → `%25`) so one lock's prefix never
//! contains another's. `<prefix>/!expired` and `<prefix>/!forced` are written (bound to the lease
//! of the key they name) when a lock's deadline passes or an operator frees it, so that watchers
//! can tell why a key went; do not use the bare prefix itself as an `etcdctl lock` name.
//!
//! Every call is bounded by `timeout` (default 2 s) and fails with `Unavailable`, whose message is
//! one line naming the endpoint and the cause.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, KvClient, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchFilterType, WatchOptions,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::params::Params;
use crate::backend::{Backend, Offers, StatusWatch, StoreEvent, StoreEventKind, StoreObserver};
use crate::engine::WaiterInfo;
use crate::error::{Error, Result};
use crate::types::{AcquireRequest, Grant, LeaseId, ListQuery, LockInfo, LockPage};

use self::meta::Kind;

/// A client of one etcd cluster. Dropping it revokes its sessions (in the background).
pub struct EtcdBackend {
    inner: Arc<Inner>,
}

/// What the backend's tasks share.
struct Inner {
    /// One client per endpoint; requests go to `current` and move on when it fails.
    clients: Vec<Client>,
    /// The key-value client of each of them.
    kvs: Vec<KvClient>,
    /// The endpoint of each client, for messages.
    endpoints: Vec<String>,
    current: AtomicUsize,
    prefix: String,
    timeout: Duration,
    /// How long one attempt on one member may take before the next member is tried.
    attempt_timeout: Duration,
    /// Attempts per request (two rounds over the endpoints).
    attempts: usize,
    /// The session of each etcd lease TTL (seconds asked for, and seconds granted).
    sessions: Mutex<HashMap<i64, Arc<Session>>>,
    /// One lease grant at a time, so that concurrent first acquires share one session.
    granting: tokio::sync::Mutex<()>,
    /// The locks granted or renewed through this backend, with their deadlines.
    held: Mutex<HeldTable>,
    /// Wakes the expiry task when an earlier deadline appears or the backend goes.
    expiry_wake: Arc<Notify>,
    expiry_task: Mutex<Option<JoinHandle<()>>>,
    /// Our own waiting keys and since when they wait (for `waiters`).
    waiting_since: Mutex<HashMap<String, Instant>>,
    /// The watch behind [`Backend::observe`], once started: its mirror of every queue, the keys
    /// this backend released since the watch last saw them go, and its task.
    mirror: Mutex<Mirror>,
    observing: AtomicBool,
    released: Mutex<HashSet<String>>,
    watch_task: Mutex<Option<JoinHandle<()>>>,
    /// The queue watch of each lock this backend's callers wait for (see [`QueueWatch`]).
    queue_watches: Mutex<HashMap<String, Arc<QueueWatch>>>,
    /// Try-once acquires and releases waiting to be sent together (see [`Inner::coalesced`]).
    coalesce: Mutex<Coalesce>,
    /// Ourselves, for the tasks we spawn (they must not keep the backend alive).
    me: Weak<Inner>,
}

/// Locks a std mutex; a panic elsewhere while it was held does not make the data unusable here.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One etcd lease that many keys are bound to (etcd's `concurrency.Session`).
struct Session {
    id: i64,
    /// The etcd lease's TTL, as granted.
    ttl: Duration,
    /// When the last keep-alive that etcd answered with the lease alive was sent (first: the
    /// grant): the lease lives at least until `fresh + ttl` unless revoked.
    fresh: Mutex<Instant>,
    /// etcd answered that the lease no longer exists: every key bound to it is gone.
    lost: AtomicBool,
    /// Keys bound to it that this backend looks after (held locks and waiters).
    users: AtomicUsize,
    /// Since when `users` is zero.
    idle_since: Mutex<Instant>,
    /// One keep-alive at a time; callers that queue behind one share its answer.
    refreshing: tokio::sync::Mutex<()>,
    /// The key names of this session in use (see [`Slot`]).
    slots: Mutex<Slots>,
}

/// Which key-name slots of a session are free. A key is named `<lock prefix><session>_<slot>`,
/// the smallest free slot, so a busy lock reuses a handful of names as etcd's own `Mutex` reuses
/// `<prefix>/<session>`: every name ever created stays in etcd's key index until a compaction,
/// and each queue read scans the names under the lock's prefix, so fresh names on every acquire
/// would make every acquire slower than the last.
#[derive(Default)]
struct Slots {
    next: u32,
    free: BTreeSet<u32>,
}

/// A key name taken from a session's slots. Given back only once its key is known to be gone
/// ([`Slot::free`]); otherwise it is simply never reused (a name that might still exist in etcd
/// must not be created again).
struct Slot {
    session: Arc<Session>,
    n: u32,
}

impl Slot {
    fn take(session: &Arc<Session>) -> Slot {
        let mut slots = lock(&session.slots);
        let n = match slots.free.pop_first() {
            Some(n) => n,
            None => {
                slots.next += 1;
                slots.next - 1
            }
        };
        Slot { session: session.clone(), n }
    }

    /// The key's name under the lock's prefix.
    fn name(&self) -> String {
        format!("{:x}_{}", self.session.id, self.n)
    }

    /// Its key is gone: the name may be used again.
    fn free(self) {
        lock(&self.session.slots).free.insert(self.n);
    }
}

impl Session {
    fn fresh(&self) -> Instant {
        *lock(&self.fresh)
    }

    fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// The time a lock of TTL `ttl` may count from `at`: true unless the session's last
    /// keep-alive is too old for its spare time to cover `ttl` from `at`.
    fn covers(&self, ttl: Duration, at: Instant) -> bool {
        self.fresh() + self.ttl.saturating_sub(ttl) >= at
    }
}

/// One key bound to a session, for as long as this backend looks after it.
struct SessionUse(Arc<Session>);

impl SessionUse {
    fn new(session: &Arc<Session>) -> SessionUse {
        session.users.fetch_add(1, Ordering::AcqRel);
        SessionUse(session.clone())
    }
}

impl Drop for SessionUse {
    fn drop(&mut self) {
        if self.0.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.0.idle_since) = Instant::now();
        }
    }
}

/// A lock granted or renewed through this backend.
struct HeldLock {
    /// Its fencing token (the key's create revision).
    token: i64,
    /// The secret part of its lease id (see [`LeaseName`]).
    secret: String,
    /// The TTL asked for.
    ttl: Duration,
    deadline: Instant,
    /// The session its key is bound to.
    session: SessionUse,
    /// The name its key occupies, when it is one of this backend's.
    slot: Option<Slot>,
    /// The exact value of a key whose creation could not be confirmed (the answer to its
    /// transaction was lost): deleted at the deadline if it exists, by value rather than by
    /// create revision (then unknown, `token` 0).
    unsure: Option<String>,
}

impl HeldLock {
    /// Its key is gone: give its name back.
    fn gone(self) {
        if let Some(slot) = self.slot {
            slot.free();
        }
    }
}

/// The held locks by etcd key, and their deadlines in order.
#[derive(Default)]
struct HeldTable {
    locks: HashMap<String, HeldLock>,
    deadlines: BTreeSet<(Instant, String)>,
    /// When the expiry task looks next (`None`: not before it is woken).
    wake_at: Option<Instant>,
}

impl HeldTable {
    /// Records (or replaces) a lock; `true` when the expiry task must be woken (it would look
    /// only after this deadline).
    fn insert(&mut self, key: String, held: HeldLock) -> bool {
        if let Some(old) = self.locks.remove(&key) {
            self.deadlines.remove(&(old.deadline, key.clone()));
        }
        let wake = self.wake_at.is_none_or(|w| held.deadline < w);
        if wake {
            self.wake_at = Some(held.deadline);
        }
        self.deadlines.insert((held.deadline, key.clone()));
        self.locks.insert(key, held);
        wake
    }

    fn remove(&mut self, key: &str) -> Option<HeldLock> {
        let held = self.locks.remove(key)?;
        self.deadlines.remove(&(held.deadline, key.to_owned()));
        Some(held)
    }

    /// Takes out the locks whose deadline has passed.
    fn pop_due(&mut self, now: Instant) -> Vec<(String, HeldLock)> {
        let mut due = Vec::new();
        while let Some((deadline, _)) = self.deadlines.first() {
            if *deadline > now {
                break;
            }
            let Some((_, key)) = self.deadlines.pop_first() else { break };
            if let Some(held) = self.locks.remove(&key) {
                due.push((key, held));
            }
        }
        due
    }
}

/// The etcd lease TTL (whole seconds) of the session for locks of TTL `ttl`: a fifth more, so the
/// session's spare time (at least a sixth of its TTL) covers the keep-alive interval (TTL/16)
/// with room for a late or failed keep-alive.
fn session_secs(ttl: Duration) -> i64 {
    (ttl.as_millis().saturating_mul(6).div_ceil(5).div_ceil(1000) as i64).max(1)
}

/// The lock TTL a session of `secs` seconds is for (the inverse of [`session_secs`], rounded down).
fn lock_ttl_of_session(secs: i64) -> Duration {
    Duration::from_millis((secs.max(1) as u64) * 1000 * 5 / 6)
}

/// A lease id of this backend: `<session>_<slot>.<secret>`, the name of its key under the lock's
/// prefix and the secret its value carries, which proves the caller is the one the key was granted
/// to (names are reused, so a name alone proves nothing). A lease id without a `.` is the
/// key-per-lease form of earlier versions: the key's name itself, with no secret stored.
struct LeaseName<'a> {
    name: &'a str,
    secret: Option<&'a str>,
}

impl LeaseName<'_> {
    fn of(id: &LeaseId) -> Option<LeaseName<'_>> {
        let (name, secret) = match id.as_str().split_once('.') {
            Some((name, secret)) => (name, Some(secret)),
            None => (id.as_str(), None),
        };
        (!name.is_empty() && !name.contains('/')).then_some(LeaseName { name, secret })
    }

    /// Whether a lock this backend looks after belongs to this lease id.
    fn owns_held(&self, held: &HeldLock) -> bool {
        self.secret.unwrap_or_default() == held.secret
    }

    /// Whether a key's value belongs to this lease id.
    fn owns(&self, value: &[u8]) -> bool {
        self.secret.is_none_or(|secret| secret_of(value) == Some(secret))
    }
}

/// The holder label in a key's value (the whole value when it is not ours; see [`meta`]).
fn holder_of(value: &[u8]) -> String {
    meta::parse(value).holder
}

fn secret_of(value: &[u8]) -> Option<&str> {
    meta::secret(value)
}

/// Where watchers learn why a key went: written in the transaction that deletes it.
const EXPIRED_MARK: &str = "!expired";
const FORCED_MARK: &str = "!forced";

/// Errors worth another attempt: the request did not reach a live member (another endpoint of the
/// balanced channel may answer).
fn is_transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        // Cancelled, DeadlineExceeded, Unavailable; and a connection that broke under the call
        // (a member killed), which tonic reports as Unknown "transport error".
        etcd_client::Error::GRpcStatus(s) => {
            matches!(s.code() as i32, 1 | 4 | 14)
                || (s.code() as i32 == 2 && s.message().contains("transport error"))
        }
        _ => false,
    }
}

/// Runs one request on a clone of the client, retrying transient failures (a dead member) on
/// the other endpoints, all within the backend's timeout. The request expression is evaluated
/// again for each attempt.
macro_rules! call {
    ($self:expr, |$c:ident| $request:expr) => {
        call!(@ $self, client, $c, $request)
    };
    (@ $self:expr, $pick:ident, $c:ident, $request:expr) => {{
        let deadline = Instant::now() + $self.timeout;
        let mut attempt = 0;
        loop {
            let (endpoint, mut $c) = $self.$pick();
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

/// [`call!`] for key-value calls, which need only the key-value client (cheaper to clone than
/// the whole client).
macro_rules! call_kv {
    ($self:expr, |$c:ident| $request:expr) => {
        call!(@ $self, kv, $c, $request)
    };
}

// After the macros, which they use.
mod election;
mod many;
mod meta;
mod status;

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
        let (hosts, params) =
            Params::split(rest, &["prefix", "timeout", "user", "password", "ca", "cert", "key"])?;
        let prefix = params.string("prefix").unwrap_or_else(|| "distlock".to_owned());
        let timeout = params.duration("timeout")?.unwrap_or(Duration::from_secs(2));
        let (user, password) = (params.string("user"), params.string("password"));
        let (ca, cert, key) = (params.string("ca"), params.string("cert"), params.string("key"));
        let scheme = if ca.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> =
            hosts.trim_end_matches('/').split(',').map(|h| format!("{scheme}://{h}")).collect();
        if hosts.is_empty() || endpoints.iter().any(|e| e.ends_with("://")) {
            return Err(Error::InvalidInput(format!("{url:?} names no etcd endpoint")));
        }
        // No per-request timeout in tonic: `call!` bounds every attempt (one timer per call, not two).
        let mut options = ConnectOptions::new().with_connect_timeout(timeout);
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
        let kvs = clients.iter().map(Client::kv_client).collect();
        let inner = Arc::new_cyclic(|me| Inner {
            clients,
            kvs,
            endpoints: connected,
            current: AtomicUsize::new(0),
            prefix,
            timeout,
            attempt_timeout: (timeout / n as u32).max(Duration::from_millis(300)),
            attempts: 2 * n,
            sessions: Mutex::new(HashMap::new()),
            granting: tokio::sync::Mutex::new(()),
            held: Mutex::new(HeldTable::default()),
            expiry_wake: Arc::new(Notify::new()),
            expiry_task: Mutex::new(None),
            waiting_since: Mutex::new(HashMap::new()),
            mirror: Mutex::new(Mirror::default()),
            observing: AtomicBool::new(false),
            released: Mutex::new(HashSet::new()),
            watch_task: Mutex::new(None),
            queue_watches: Mutex::new(HashMap::new()),
            coalesce: Mutex::new(Coalesce::default()),
            me: me.clone(),
        });
        Ok(EtcdBackend { inner })
    }

    /// The etcd lease ids of this backend's live sessions (for tests and diagnostics).
    pub fn session_leases(&self) -> Vec<i64> {
        let sessions = lock(&self.inner.sessions);
        let mut ids: Vec<i64> = sessions.values().filter(|s| !s.lost()).map(|s| s.id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

impl Inner {
    /// The member requests go to now, and its index.
    fn client(&self) -> (usize, Client) {
        let i = self.current.load(Ordering::Relaxed) % self.clients.len();
        (i, self.clients[i].clone())
    }

    /// The key-value client of the member requests go to now, and its index.
    fn kv(&self) -> (usize, KvClient) {
        let i = self.current.load(Ordering::Relaxed) % self.kvs.len();
        (i, self.kvs[i].clone())
    }

    /// The endpoint of client `i`, for messages.
    fn endpoint(&self, i: usize) -> &str {
        self.endpoints.get(i).map_or("?", String::as_str)
    }

    /// Moves on from member `failed` (unless another request already did).
    fn rotate(&self, failed: usize) {
        let next = (failed + 1) % self.clients.len();
        let _ = self.current.compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn lock_prefix(&self, key: &str) -> String {
        format!("{}/{}/", self.prefix, encode(key))
    }

    fn mark_key(&self, mark: &str) -> String {
        format!("{}/{mark}", self.prefix)
    }

    /// The owner (lowest create revision) under a lock prefix.
    async fn owner(&self, pfx: &str) -> Result<Option<KeyValue>> {
        let opts =
            GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend).with_limit(1);
        let resp = call_kv!(self, |c| c.get(pfx, Some(opts.clone())))?;
        Ok(resp.kvs().first().cloned())
    }

    /// Refreshes an etcd lease once; returns its TTL (0 when it no longer exists: expired, or
    /// revoked).
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

    /// Makes sure a keep-alive of `session` was sent at or after `after` and answered: returns
    /// when the last one was sent, or `None` when etcd says the lease is gone (with every key
    /// bound to it). Callers that queue behind a keep-alive in flight share its answer.
    async fn refresh(&self, session: &Session, after: Instant) -> Result<Option<Instant>> {
        let _one = session.refreshing.lock().await;
        if session.lost() {
            return Ok(None);
        }
        let fresh = session.fresh();
        if fresh >= after {
            return Ok(Some(fresh));
        }
        let sent = Instant::now();
        match self.keep_alive_once(self.client().0, session.id).await? {
            ttl if ttl > 0 => {
                let mut f = lock(&session.fresh);
                *f = (*f).max(sent);
                Ok(Some(*f))
            }
            _ => {
                session.lost.store(true, Ordering::Release);
                self.forget_session(session);
                Ok(None)
            }
        }
    }

    /// A use of the live session for etcd lease TTL `secs`, granting one if there is none.
    async fn session(&self, secs: i64) -> Result<SessionUse> {
        if let Some(u) = self.existing_session(secs) {
            return Ok(u);
        }
        let _one = self.granting.lock().await;
        if let Some(u) = self.existing_session(secs) {
            return Ok(u);
        }
        let sent = Instant::now();
        let granted = call!(self, |c| c.lease_grant(secs, None))?;
        let granted_secs = granted.ttl().max(1);
        let session = Arc::new(Session {
            id: granted.id(),
            ttl: Duration::from_secs(granted_secs as u64),
            fresh: Mutex::new(sent),
            lost: AtomicBool::new(false),
            users: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            refreshing: tokio::sync::Mutex::new(()),
            slots: Mutex::new(Slots::default()),
        });
        let used = SessionUse::new(&session);
        {
            let mut sessions = lock(&self.sessions);
            sessions.insert(secs, session.clone());
            // etcd may grant more than asked (its minimum TTL): locks asking for that get it too.
            if granted_secs != secs && sessions.get(&granted_secs).is_none_or(|s| s.lost()) {
                sessions.insert(granted_secs, session.clone());
            }
        }
        tokio::spawn(keep_session(self.me.clone(), session));
        Ok(used)
    }

    fn existing_session(&self, secs: i64) -> Option<SessionUse> {
        let sessions = lock(&self.sessions);
        // Counted as used under the map's lock, so the keeper cannot retire it in between.
        sessions.get(&secs).filter(|s| !s.lost()).map(SessionUse::new)
    }

    /// Takes a session out of use (lost, or lapsed while etcd could not be reached).
    fn forget_session(&self, session: &Session) {
        lock(&self.sessions).retain(|_, s| !std::ptr::eq(Arc::as_ptr(s), session));
    }

    /// Takes an idle session out of the map if nobody uses it (checked under the map's lock);
    /// `true` when it was retired and may be revoked.
    fn retire_if_idle(&self, session: &Session) -> bool {
        let mut sessions = lock(&self.sessions);
        if session.users.load(Ordering::Acquire) > 0 {
            return false;
        }
        sessions.retain(|_, s| !std::ptr::eq(Arc::as_ptr(s), session));
        true
    }

    /// Records a lock granted or renewed through this backend until `deadline`.
    fn hold(&self, key: String, held: HeldLock) {
        let wake = lock(&self.held).insert(key, held);
        {
            let mut task = lock(&self.expiry_task);
            if task.as_ref().is_none_or(JoinHandle::is_finished) {
                *task = Some(tokio::spawn(expire_locks(self.me.clone(), self.expiry_wake.clone())));
            }
        }
        if wake {
            self.expiry_wake.notify_one();
        }
    }

    fn unhold(&self, key: &str) -> Option<HeldLock> {
        lock(&self.held).remove(key)
    }

    /// Stops looking after the lock `lease` names; `gone`: its key is known to be deleted, so its
    /// name may be reused.
    fn forget(&self, key: &str, lease: &LeaseName<'_>, gone: bool) {
        let mut held = lock(&self.held);
        if held.locks.get(key).is_some_and(|h| lease.owns_held(h)) {
            if let Some(h) = held.remove(key) {
                drop(held);
                if gone {
                    h.gone();
                }
            }
        }
    }

    /// Deletes the key of a lock whose deadline passed unrenewed — only if it is still the same
    /// key bound to the same session — and marks why, for watchers. `false` when etcd could not be
    /// reached (try again later).
    async fn expire(&self, key: &str, held: HeldLock) -> Option<HeldLock> {
        let lease = held.session.0.id;
        let same = match &held.unsure {
            Some(value) => Compare::value(key, CompareOp::Equal, value.as_str()),
            None => Compare::create_revision(key, CompareOp::Equal, held.token),
        };
        let txn = Txn::new().when([same, Compare::lease(key, CompareOp::Equal, lease)]).and_then([
            TxnOp::delete(key, None),
            TxnOp::put(self.mark_key(EXPIRED_MARK), key, Some(PutOptions::new().with_lease(lease))),
        ]);
        match call_kv!(self, |c| c.txn(txn.clone())) {
            Ok(resp) if resp.succeeded() => {
                tracing::info!(key = %decode_lock(&self.prefix, key), "lock expired: its deadline passed unrenewed");
                if held.unsure.is_none() {
                    held.gone();
                }
                None
            }
            // Gone already, or bound to another lease now (renewed through another process): not
            // ours to delete, and its name not ours to reuse.
            Ok(_) => None,
            // The session lease is gone, and the key with it.
            Err(e) if lease_gone(&e) => {
                held.gone();
                None
            }
            Err(Error::Unavailable(_)) => Some(held),
            Err(_) => None,
        }
    }

    /// Looks after a key whose creating transaction may have been applied although its answer
    /// was lost: unless the process dies first (then it lapses with the session), it is deleted
    /// once any request still in flight has surely been applied or dropped. Its name is never
    /// reused.
    fn unsure(&self, key: String, value: String, used: SessionUse, slot: Slot) {
        let deadline = Instant::now() + self.timeout.max(Duration::from_secs(5));
        let held = HeldLock {
            token: 0,
            secret: String::new(),
            ttl: Duration::ZERO,
            deadline,
            session: used,
            slot: None,
            unsure: Some(value),
        };
        drop(slot);
        self.hold(key, held);
    }

    /// Takes our key out of the queue before returning (a wait that timed out or failed). If
    /// etcd cannot be reached, the clean-up goes on in the background; the key lapses with the
    /// session lease if the process dies first.
    async fn remove(&self, my_key: &str, slot: Slot) {
        lock(&self.waiting_since).remove(my_key);
        match call_kv!(self, |c| c.delete(my_key, None)) {
            Ok(_) => slot.free(),
            Err(_) => self.abandon(my_key.to_owned(), slot),
        }
    }

    /// Deletes our key in the background, retrying for a while: when the caller cannot wait (a
    /// cancelled acquire), or etcd could not be reached just now.
    fn abandon(&self, my_key: String, slot: Slot) {
        lock(&self.waiting_since).remove(&my_key);
        let clients = self.clients.clone();
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        handle.spawn(async move {
            for attempt in 0..clients.len() * 4 {
                let mut c = clients[attempt % clients.len()].clone();
                if c.delete(my_key.as_str(), None).await.is_ok() {
                    slot.free();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }

    /// Reads at revision `rev` — a snapshot that never changes, which the member answers from
    /// its own store without first confirming it is up to date (etcd's serializable read), so no
    /// wait for the log to be applied — or, if the member has not reached `rev` yet or it was
    /// compacted, reads the latest state (linearizable).
    async fn read_at(
        &self,
        ops: Vec<(String, GetOptions)>,
        rev: i64,
    ) -> Result<Vec<etcd_client::GetResponse>> {
        let txn = |at: Option<i64>| {
            Txn::new().and_then(
                ops.iter()
                    .map(|(key, opts)| {
                        let opts = match at {
                            Some(at) => opts.clone().with_revision(at).with_serializable(),
                            None => opts.clone(),
                        };
                        TxnOp::get(key.as_str(), Some(opts))
                    })
                    .collect::<Vec<_>>(),
            )
        };
        let snapshot = txn((rev > 0).then_some(rev));
        let resp = match call_kv!(self, |c| c.txn(snapshot.clone())) {
            Err(Error::Unavailable(m)) if m.contains("future revision") || m.contains("compacted") => {
                let latest = txn(None);
                call_kv!(self, |c| c.txn(latest.clone()))?
            }
            other => other?,
        };
        Ok(resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g),
                _ => None,
            })
            .collect())
    }

    /// Waits until our key is the owner, watching only the key just ahead of it each time. A
    /// broken watch (a member died) is set up again on another endpoint. `Ok(false)` at the
    /// deadline.
    ///
    /// Every read is of a known revision (see [`Inner::read_at`]): the queue as our key was
    /// created, as the key ahead was deleted, as a watch began. A revision's snapshot is enough:
    /// no key can come ahead of ours later (new keys get higher revisions), so "nobody ahead at
    /// R" stays true, and a key still there when its watch began has its delete reported by it.
    async fn wait_turn(
        &self,
        pfx: &str,
        my_key: &str,
        my_rev: i64,
        deadline: Option<Instant>,
    ) -> Result<bool> {
        let ahead_opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_max_create_revision(my_rev - 1)
            .with_limit(1);
        // One read: the key just ahead of ours, and whether ours is still there.
        let look =
            vec![(pfx.to_owned(), ahead_opts), (my_key.to_owned(), GetOptions::new().with_count_only())];
        let until = |d: Option<Instant>| async move {
            match d {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        // The revision to look at next: first the one that created our key.
        let mut at = my_rev;
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            let mut gets = self.read_at(look.clone(), at).await?.into_iter();
            let ahead = gets.next().and_then(|g| g.kvs().first().cloned());
            if gets.next().is_none_or(|g| g.count() == 0) {
                return Err(Error::Unavailable(
                    "etcd: our place in the queue vanished (the session's etcd lease ended)".into(),
                ));
            }
            let Some(ahead) = ahead else { return Ok(true) };
            // Wait for the key ahead to go, woken by this lock's queue watch (shared by this
            // backend's waiters of the lock). The key ahead existed at `at`; deletes after
            // `seen` will be reported: if the watch is ahead of `at`, check the key was still
            // there at `seen` (a delete in between shows there).
            let queue = self.queue_watch(pfx).await?;
            let Some((gone, seen)) = queue.register(text(ahead.key())) else { continue };
            if seen > at {
                let still = self.read_at(vec![(text(ahead.key()), GetOptions::new())], seen).await?;
                let same = |kv: &KeyValue| kv.create_revision() == ahead.create_revision();
                if !still.first().and_then(|g| g.kvs().first()).is_some_and(same) {
                    at = seen;
                    continue;
                }
            }
            let deleted = tokio::select! {
                deleted = gone.wait() => deleted,
                () = until(deadline) => return Ok(false),
            };
            match deleted {
                // Look again as of that delete, even when the key ahead was the only one: our
                // own key may have gone before it (its session's lease ended, or it was deleted),
                // and a place that is gone is no grant.
                Some(rev) => at = rev,
                None => {
                    // The watch broke: look again (at the latest state) after a short pause.
                    at = 0;
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        () = until(deadline) => return Ok(false),
                    }
                }
            }
        }
    }

    /// The queue watch of the lock under `pfx`, set up if there is none (or it broke).
    async fn queue_watch(&self, pfx: &str) -> Result<Arc<QueueWatch>> {
        if let Some(w) = lock(&self.queue_watches).get(pfx).filter(|w| !w.broken.load(Ordering::Acquire)) {
            return Ok(w.clone());
        }
        let opts = WatchOptions::new().with_prefix().with_filters([WatchFilterType::NoPut]);
        let mut stream = call!(self, |c| c.watch(pfx, Some(opts.clone())))?;
        let began = match tokio::time::timeout(self.timeout, stream.message()).await {
            Ok(Ok(Some(m))) if m.created() && !m.canceled() => m.header().map_or(0, |h| h.revision()),
            _ => {
                return Err(Error::Unavailable(
                    "etcd: a watch was refused, broke at once or not confirmed".into(),
                ))
            }
        };
        let watch = Arc::new(QueueWatch {
            state: Mutex::new(QueueState {
                seen: began,
                waiting: HashMap::new(),
                listeners: Vec::new(),
                next_id: 0,
            }),
            broken: AtomicBool::new(false),
        });
        let mut watches = lock(&self.queue_watches);
        if let Some(w) = watches.get(pfx).filter(|w| !w.broken.load(Ordering::Acquire)) {
            // Another waiter set one up meanwhile: use it (ours ends when dropped).
            return Ok(w.clone());
        }
        watches.insert(pfx.to_owned(), watch.clone());
        tokio::spawn(dispatch_deletes(self.me.clone(), pfx.to_owned(), watch.clone(), stream));
        Ok(watch)
    }

    /// A grant to `my_key` (create revision `token`), recorded with its deadline. `counted_from`
    /// is when the call began (the session's spare time covers the TTL from then; see `covers`).
    fn granted(
        &self,
        my_key: String,
        token: i64,
        req: &AcquireRequest,
        secret: &str,
        (used, slot): (SessionUse, Slot),
        counted_from: Instant,
    ) -> Grant {
        let deadline = Instant::now() + req.ttl;
        let lease_id =
            LeaseId::parse(&format!("{}.{secret}", slot.name())).unwrap_or_else(|_| req.lease_id.clone());
        let secret = secret.to_owned();
        let held =
            HeldLock { token, secret, ttl: req.ttl, deadline, session: used, slot: Some(slot), unsure: None };
        self.hold(my_key, held);
        Grant { lease_id, fencing_token: token as u64, ttl: req.ttl, counted_from }
    }

    /// The waiting part of an acquire: waits for our turn (see [`Inner::wait_turn`]) and grants,
    /// or deletes our key before returning a timeout or a failure.
    async fn wait_for_turn(
        &self,
        w: Waiting<'_>,
        pending: Pending<'_>,
        req: &AcquireRequest,
        used: SessionUse,
    ) -> Result<Grant> {
        let Waiting { pfx, my_key, my_rev, secret, start, ahead } = w;
        let inner = self;
        lock(&inner.waiting_since).insert(my_key.to_owned(), start);
        let deadline = req.wait.deadline(start);
        let turn = match ahead {
            // Several may hold: wait until the keys ahead leave room (it gives up on its own).
            Some(ahead) => inner.wait_many(pfx, my_key, my_rev, ahead, deadline).await,
            None => match inner.wait_turn(pfx, my_key, my_rev, deadline).await {
                Ok(false) => inner.give_up_unless_first(pfx, my_key, my_rev).await,
                other => other,
            },
        };
        match turn {
            Ok(true) => {
                // Our key has been bound to the session all along: count from now, once the
                // session's spare time covers the TTL from now.
                let now = Instant::now();
                let covered = used.0.covers(req.ttl, now) || inner.refresh(&used.0, now).await?.is_some();
                if !covered {
                    pending.remove().await;
                    return Err(Error::Unavailable(
                        "etcd: the session's lease ended while waiting (our place went with it)".into(),
                    ));
                }
                lock(&inner.waiting_since).remove(my_key);
                let Some(slot) = pending.disarm() else {
                    return Err(Error::Unavailable("etcd: our key's name was given back".into()));
                };
                Ok(inner.granted(my_key.to_owned(), my_rev, req, secret, (used, slot), now))
            }
            Ok(false) => {
                // Deleted by `give_up_unless_first`: the name is free again.
                lock(&inner.waiting_since).remove(my_key);
                if let Some(slot) = pending.disarm() {
                    slot.free();
                }
                let holder = inner.owner(pfx).await.ok().flatten().map(|o| holder_of(o.value()));
                Err(Error::WaitTimeout { key: req.key.clone(), holder, waited: start.elapsed() })
            }
            Err(e) => {
                pending.remove().await;
                Err(e)
            }
        }
    }

    /// At the end of a wait: in one transaction, keeps our key if it is first in the queue by
    /// now (`Ok(true)`: the lock is ours, granted when the key ahead went) or deletes it
    /// (`Ok(false)`). A plain delete would drop a key that owned the lock unseen: for a moment a
    /// holder nobody knows of refuses try-once acquires (etcd's `Mutex` does that on a cancelled
    /// wait; the linearizability check of the contract suite caught it here).
    async fn give_up_unless_first(&self, pfx: &str, my_key: &str, my_rev: i64) -> Result<bool> {
        // Our key still there (a place that is gone — its session's lease ended, someone deleted
        // it — is no grant, whoever is behind it), and every key of the queue created at our
        // revision or later: none is ahead of ours.
        let mine = Compare::create_revision(my_key, CompareOp::Equal, my_rev);
        let first = Compare::create_revision(pfx, CompareOp::Greater, my_rev - 1).with_prefix();
        let txn = Txn::new().when([mine, first]).or_else([TxnOp::delete(my_key, None)]);
        Ok(call_kv!(self, |c| c.txn(txn.clone()))?.succeeded())
    }

    /// A session for locks of TTL `ttl` whose spare time covers `ttl` from `at` (refreshed if
    /// needed; a lost one replaced once).
    async fn covering_session(&self, ttl: Duration, at: Instant) -> Result<SessionUse> {
        // The usual case without a future of its own: a live session, fresh enough.
        if let Some(used) = self.existing_session(session_secs(ttl)).filter(|u| u.0.covers(ttl, at)) {
            return Ok(used);
        }
        // Granting or refreshing: in a boxed future, so that every call's future stays small.
        Box::pin(self.new_or_refreshed_session(ttl, at)).await
    }

    /// See [`Inner::covering_session`].
    async fn new_or_refreshed_session(&self, ttl: Duration, at: Instant) -> Result<SessionUse> {
        for _ in 0..2 {
            let used = self.session(session_secs(ttl)).await?;
            if used.0.covers(ttl, at) || self.refresh(&used.0, at).await?.is_some() {
                return Ok(used);
            }
        }
        Err(Error::Unavailable("etcd: the session's lease ended twice in a row".into()))
    }
}

/// Keeps one session's etcd lease alive every TTL/16 while the backend lives; retires (revokes)
/// it after it went unused for `max(TTL, 10 s)`; gives up on it when etcd says it is gone or it
/// lapsed while etcd could not be reached.
async fn keep_session(inner: Weak<Inner>, session: Arc<Session>) {
    let every = (session.ttl / 16).max(Duration::from_millis(50));
    let idle_limit = session.ttl.max(Duration::from_secs(10));
    loop {
        let due = session.fresh() + every;
        tokio::time::sleep_until(due).await;
        let Some(inner) = inner.upgrade() else { return };
        if session.lost() {
            inner.forget_session(&session);
            return;
        }
        let idle =
            session.users.load(Ordering::Acquire) == 0 && lock(&session.idle_since).elapsed() >= idle_limit;
        if idle && inner.retire_if_idle(&session) {
            let id = session.id;
            let _ = call!(inner, |c| c.lease_revoke(id));
            return;
        }
        match inner.refresh(&session, due).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::warn!(
                    lease = session.id,
                    "etcd session lease ended: the locks bound to it are lost"
                );
                return;
            }
            Err(e) => {
                if session.fresh() + session.ttl < Instant::now() {
                    // It lapsed while etcd could not be reached: start a new one for new locks;
                    // renewals move any keys that survived (a new leader extends leases).
                    tracing::warn!(lease = session.id, error = %e, "etcd session lease lapsed unrefreshed");
                    inner.forget_session(&session);
                    return;
                }
                drop(inner);
                tokio::time::sleep((every / 4).max(Duration::from_millis(50))).await;
            }
        }
    }
}

/// Deletes the keys of locks whose deadline passed unrenewed (see [`Inner::expire`]).
async fn expire_locks(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(inner) = inner.upgrade() else { return };
            let due = lock(&inner.held).pop_due(Instant::now());
            for (key, held) in due {
                if let Some(held) = inner.expire(&key, held).await {
                    // etcd unreachable: try again in a second (the key also lapses with the
                    // session if nobody keeps it alive).
                    let retry = HeldLock { deadline: Instant::now() + Duration::from_secs(1), ..held };
                    lock(&inner.held).insert(key, retry);
                }
            }
            let mut held = lock(&inner.held);
            held.wake_at = held.deadlines.first().map(|(d, _)| *d);
            held.wake_at
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.expiry_wake.notify_one();
        if let Some(task) = lock(&self.watch_task).take() {
            task.abort();
        }
        // Revoke the sessions: keys still bound to them go at once rather than at their TTL.
        let ids: Vec<i64> = lock(&self.sessions).values().map(|s| s.id).collect();
        let (Some(client), Ok(handle)) =
            (self.clients.first().cloned(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        if ids.is_empty() {
            return;
        }
        handle.spawn(async move {
            let mut c = client;
            let mut ids = ids;
            ids.sort_unstable();
            ids.dedup();
            for id in ids {
                let _ = tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(id)).await;
            }
        });
    }
}

/// A watch of one lock's queue (its deletes only), shared by this backend's waiters of that
/// lock, which wakes exactly the waiter whose predecessor's key went. Why not a watch per waiter
/// of just its predecessor, as etcd's `Mutex` does: etcd 3.4 registers a new watch "from now" at
/// the revision it read just before, so under concurrent writes a fresh watch is often behind
/// already and is then served by its catch-up loop, every 100 ms — the hand-off waits for it. A
/// watch that lives as long as the lock has waiters here is behind at most once. It ends after
/// the lock had no waiters here for a while.
struct QueueWatch {
    state: Mutex<QueueState>,
    /// The stream ended (a member died): its waiters look again; the next sets up a new one.
    broken: AtomicBool,
}

struct QueueState {
    /// Every delete up to this revision has been reported.
    seen: i64,
    /// Who waits for which key to go: (id, where to report the delete's revision).
    waiting: HashMap<String, Vec<(u64, tokio::sync::oneshot::Sender<i64>)>>,
    /// Waiters told of every delete (key, revision): semaphore permits and shared locks, which
    /// wait for room rather than for one key (see [`many`]).
    listeners: Vec<(u64, tokio::sync::mpsc::UnboundedSender<(String, i64)>)>,
    next_id: u64,
}

/// One waiter's interest in a key's delete; dropping it withdraws it.
struct Gone<'a> {
    watch: &'a QueueWatch,
    key: String,
    id: u64,
    rx: Option<tokio::sync::oneshot::Receiver<i64>>,
}

impl QueueWatch {
    /// Asks to be told when `key` goes; returns that, and the revision up to which deletes have
    /// been reported already (a delete after it will be). `None` once the watch has ended.
    fn register(&self, key: String) -> Option<(Gone<'_>, i64)> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut state = lock(&self.state);
        if self.broken.load(Ordering::Acquire) {
            return None;
        }
        let id = state.next_id;
        state.next_id += 1;
        state.waiting.entry(key.clone()).or_default().push((id, tx));
        Some((Gone { watch: self, key, id, rx: Some(rx) }, state.seen))
    }
}

impl Gone<'_> {
    /// The revision of the delete, or `None` when the watch broke.
    async fn wait(mut self) -> Option<i64> {
        match self.rx.take() {
            Some(rx) => rx.await.ok(),
            None => None,
        }
    }
}

impl Drop for Gone<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.watch.state);
        if let Some(list) = state.waiting.get_mut(&self.key) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                state.waiting.remove(&self.key);
            }
        }
    }
}

/// Reports the deletes of one lock's queue to the waiters registered for them; ends when the
/// stream breaks (waiters then look again) or after the lock had no waiters here for 10 s.
async fn dispatch_deletes(
    inner: Weak<Inner>,
    pfx: String,
    watch: Arc<QueueWatch>,
    mut stream: etcd_client::WatchStream,
) {
    const IDLE: Duration = Duration::from_secs(10);
    let mut idle_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let msg = tokio::select! {
            msg = stream.message() => msg,
            _ = tick.tick() => {
                let Some(me) = inner.upgrade() else { break };
                let mut watches = lock(&me.queue_watches);
                let state = lock(&watch.state);
                match (state.waiting.is_empty() && state.listeners.is_empty(), idle_since) {
                    (false, _) => idle_since = None,
                    (true, None) => idle_since = Some(Instant::now()),
                    (true, Some(since)) if since.elapsed() >= IDLE => {
                        // Retired under both locks: nobody can find it and register any more.
                        watch.broken.store(true, Ordering::Release);
                        if watches.get(&pfx).is_some_and(|w| Arc::ptr_eq(w, &watch)) {
                            watches.remove(&pfx);
                        }
                        break;
                    }
                    (true, Some(_)) => {}
                }
                continue;
            }
        };
        let msg = match msg {
            Ok(Some(msg)) if !msg.canceled() => msg,
            _ => break,
        };
        let mut state = lock(&watch.state);
        for e in msg.events().iter().filter(|e| e.event_type() == EventType::Delete) {
            let Some(kv) = e.kv() else { continue };
            if let Some(list) = state.waiting.remove(&text(kv.key())) {
                for (_, tx) in list {
                    let _ = tx.send(kv.mod_revision());
                }
            }
            for (_, tx) in &state.listeners {
                let _ = tx.send((text(kv.key()), kv.mod_revision()));
            }
            state.seen = state.seen.max(kv.mod_revision());
        }
        if let Some(rev) = msg.header().map(|h| h.revision()) {
            state.seen = state.seen.max(rev);
        }
    }
    // Broken or retired: whoever still waits looks again (marked under the state's lock, so no
    // one registers after the waiters are let go).
    {
        let mut state = lock(&watch.state);
        watch.broken.store(true, Ordering::Release);
        state.waiting.clear();
        state.listeners.clear();
    }
    if let Some(me) = inner.upgrade() {
        let mut watches = lock(&me.queue_watches);
        if watches.get(&pfx).is_some_and(|w| Arc::ptr_eq(w, &watch)) {
            watches.remove(&pfx);
        }
    }
}

/// Most operations in one coalesced transaction (etcd refuses more than `--max-txn-ops`, 128 by
/// default, and counts nested operations).
const MAX_COALESCED: usize = 32;

/// A try-once acquire's transaction or an own release's delete, as [`Inner::coalesced`] sends it.
enum Op {
    /// The try-once transaction of the lock under `prefix`.
    Txn { prefix: String, txn: Txn },
    /// The delete of a key of this backend's.
    Delete { key: String },
}

/// What one coalesced operation got back.
enum Reply {
    /// The transaction's answer and the revision it ran at.
    Txn(etcd_client::TxnResponse, i64),
    /// Whether the delete found the key, and whether the call that carried it was retried (its
    /// first attempt may have deleted it already).
    Delete { deleted: bool, retried: bool },
}

/// Calls out at once before others wait to go together: the fastest of the counts tried (see
/// docs/BENCHMARKS.md, "etcd beside etcd's own lock service").
const MAX_OUT: usize = 4;

/// Operations waiting for the next coalesced transaction, and how many calls are out.
#[derive(Default)]
struct Coalesce {
    out: usize,
    queue: Vec<(Op, tokio::sync::oneshot::Sender<Result<Reply>>)>,
}

/// Ends a lone call: the next batch goes out (or nothing is out any more), even if the caller
/// was cancelled.
struct Out<'a>(&'a Inner);

impl Drop for Out<'_> {
    fn drop(&mut self) {
        self.0.next_batch();
    }
}

impl Inner {
    /// Sends `op` — alone when nothing else is out (so a lone caller waits for no one), or, while
    /// a call is out, together with whatever other tasks queued meanwhile in one etcd
    /// transaction (each acquire a nested transaction of its own): one raft entry and one gRPC
    /// call for many, as the Redis client pipelines and the `http://` client batches. Acquires
    /// of the same lock never share one (etcd checks every comparison of a transaction before
    /// applying any of its operations, so two would both find the lock free), nor do two deletes
    /// of one key.
    async fn coalesced(&self, op: Op) -> Result<Reply> {
        let queued = {
            let mut c = lock(&self.coalesce);
            if c.out >= MAX_OUT {
                let (tx, rx) = tokio::sync::oneshot::channel();
                c.queue.push((op, tx));
                Err(rx)
            } else {
                c.out += 1;
                Ok(op)
            }
        };
        match queued {
            Ok(op) => {
                let _out = Out(self);
                self.send_one(&op).await
            }
            Err(rx) => rx
                .await
                .unwrap_or_else(|_| Err(Error::Unavailable("etcd: a coalesced call was dropped".into()))),
        }
    }

    /// After a call came back: sends what queued meanwhile (one batch, from a task of its own,
    /// which comes back here when done), or counts one call less out.
    fn next_batch(&self) {
        let mut c = lock(&self.coalesce);
        let mut batch = Vec::new();
        let mut rest = Vec::new();
        let mut names = HashSet::new();
        for (op, tx) in c.queue.drain(..) {
            let name = match &op {
                Op::Txn { prefix, .. } => prefix.clone(),
                Op::Delete { key } => key.clone(),
            };
            if batch.len() < MAX_COALESCED && names.insert(name) {
                batch.push((op, tx));
            } else {
                rest.push((op, tx));
            }
        }
        c.queue = rest;
        if batch.is_empty() {
            c.out -= 1;
            return;
        }
        match (self.me.upgrade(), tokio::runtime::Handle::try_current()) {
            (Some(me), Ok(handle)) => {
                drop(c);
                handle.spawn(async move {
                    let _out = Out(&me);
                    me.send_batch(batch).await;
                });
            }
            _ => {
                // No runtime to send them on: their callers get an error.
                c.queue.clear();
                c.out -= 1;
            }
        }
    }

    /// Sends a batch as one transaction (one operation: on its own) and answers each caller.
    async fn send_batch(&self, batch: Vec<(Op, tokio::sync::oneshot::Sender<Result<Reply>>)>) {
        if batch.len() == 1 {
            for (op, tx) in batch {
                let _ = tx.send(self.send_one(&op).await);
            }
            return;
        }
        let ops: Vec<TxnOp> = batch
            .iter()
            .map(|(op, _)| match op {
                Op::Txn { txn, .. } => TxnOp::txn(txn.clone()),
                Op::Delete { key } => TxnOp::delete(key.as_str(), None),
            })
            .collect();
        let all = Txn::new().and_then(ops);
        let tries = std::cell::Cell::new(0);
        let sent = call_kv!(self, |c| {
            tries.set(tries.get() + 1);
            c.txn(all.clone())
        });
        match sent {
            Ok(resp) => {
                let rev = resp.header().map_or(0, |h| h.revision());
                let retried = tries.get() > 1;
                for ((_, tx), answer) in batch.into_iter().zip(resp.op_responses()) {
                    let reply = match answer {
                        TxnOpResponse::Txn(r) => Ok(Reply::Txn(r, rev)),
                        TxnOpResponse::Delete(d) => Ok(Reply::Delete { deleted: d.deleted() > 0, retried }),
                        _ => Err(Error::Unavailable("etcd: unexpected answer in a batch".into())),
                    };
                    let _ = tx.send(reply);
                }
            }
            Err(e) if lease_gone(&e) => {
                // One acquire's session ended: the others must not fail with it.
                for (op, tx) in batch {
                    let _ = tx.send(self.send_one(&op).await);
                }
            }
            Err(e) => {
                for (_, tx) in batch {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }

    /// One operation on its own.
    async fn send_one(&self, op: &Op) -> Result<Reply> {
        match op {
            Op::Txn { txn, .. } => {
                let resp = call_kv!(self, |c| c.txn(txn.clone()))?;
                let rev = resp.header().map_or(0, |h| h.revision());
                Ok(Reply::Txn(resp, rev))
            }
            Op::Delete { key } => {
                let tries = std::cell::Cell::new(0);
                let resp = call_kv!(self, |c| {
                    tries.set(tries.get() + 1);
                    c.delete(key.as_str(), None)
                })?;
                Ok(Reply::Delete { deleted: resp.deleted() > 0, retried: tries.get() > 1 })
            }
        }
    }
}

/// What the watch behind [`Backend::observe`] knows of every queue under the prefix.
#[derive(Default)]
struct Mirror {
    /// Lock prefix (`<prefix>/<encoded key>/`) → create revision → key.
    queues: HashMap<String, BTreeMap<i64, Queued>>,
    /// etcd key → (lock prefix, create revision).
    keys: HashMap<String, (String, i64)>,
    /// How many keys each etcd lease carries.
    per_lease: HashMap<i64, usize>,
}

/// One key of a queue, as the watch saw it.
#[derive(Clone)]
struct Queued {
    key: String,
    holder: String,
    /// How it holds or waits (several keys hold a semaphore or a shared lock).
    kind: Kind,
    lease: i64,
    /// When this process first saw it (for the waiters' `waiting`).
    seen: Instant,
}

impl Mirror {
    /// The keys holding the lock under `pfx`, oldest first (one for a plain lock; see
    /// [`meta::holders`]).
    fn holders(&self, pfx: &str) -> Vec<Head> {
        let Some(queue) = self.queues.get(pfx) else { return Vec::new() };
        let kinds: Vec<Kind> = queue.values().map(|q| q.kind).collect();
        queue.iter().take(meta::holders(&kinds)).map(|(rev, k)| (*rev, k.clone())).collect()
    }

    fn insert(&mut self, pfx: String, rev: i64, mut queued: Queued) {
        if let Some((old_pfx, old_rev)) = self.keys.insert(queued.key.clone(), (pfx.clone(), rev)) {
            // A key put again (moved to another lease): replace its entry, keep when it was seen.
            if let Some(old) = self.queues.get_mut(&old_pfx).and_then(|q| q.remove(&old_rev)) {
                queued.seen = old.seen;
                self.drop_lease(old.lease);
            }
        }
        *self.per_lease.entry(queued.lease).or_insert(0) += 1;
        self.queues.entry(pfx).or_default().insert(rev, queued);
    }

    fn remove(&mut self, key: &str) -> Option<Queued> {
        let (pfx, rev) = self.keys.remove(key)?;
        let queue = self.queues.get_mut(&pfx)?;
        let queued = queue.remove(&rev)?;
        if queue.is_empty() {
            self.queues.remove(&pfx);
        }
        self.drop_lease(queued.lease);
        Some(queued)
    }

    fn lease_of(&self, key: &str) -> Option<i64> {
        let (pfx, rev) = self.keys.get(key)?;
        self.queues.get(pfx)?.get(rev).map(|q| q.lease)
    }

    fn drop_lease(&mut self, lease: i64) {
        if let Some(n) = self.per_lease.get_mut(&lease) {
            *n -= 1;
            if *n == 0 {
                self.per_lease.remove(&lease);
            }
        }
    }
}

/// A holder of a lock: its create revision and key.
type Head = (i64, Queued);

/// Why a holder's key went, as the watch tells.
#[derive(Clone, Copy)]
enum Went {
    Released,
    Expired,
    Forced,
    /// Not known from the events alone: a release if its etcd lease still exists.
    AskLease(i64),
}

/// What one revision meant, in order.
enum Seen {
    Event(StoreEvent),
    /// A holder's key went.
    Gone {
        key: String,
        holder: String,
        fencing_token: u64,
        went: Went,
        local: bool,
    },
}

impl Inner {
    /// The lock prefix and the lock key of an etcd key under our prefix (`None` for the marks).
    fn parse_key(&self, etcd_key: &str) -> Option<(String, String)> {
        let rest = etcd_key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let (lock, _) = rest.rsplit_once('/')?;
        Some((format!("{}/{lock}/", self.prefix), decode(lock)))
    }

    /// Loads every queue under the prefix into the mirror; returns the revision it reflects.
    async fn load_mirror(&self) -> Result<i64> {
        let pfx = format!("{}/", self.prefix);
        let resp = call_kv!(self, |c| c.get(pfx.as_str(), Some(GetOptions::new().with_prefix())))?;
        let now = Instant::now();
        let mut mirror = Mirror::default();
        for kv in resp.kvs() {
            let key = text(kv.key());
            if let Some((lock_pfx, _)) = self.parse_key(&key) {
                let meta = meta::parse(kv.value());
                let (holder, kind) = (meta.holder, meta.kind);
                let queued = Queued { key, holder, kind, lease: kv.lease(), seen: now };
                mirror.insert(lock_pfx, kv.create_revision(), queued);
            }
        }
        *lock(&self.mirror) = mirror;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Applies the events of one revision to the mirror and tells what they mean: a holder's key
    /// gone (released; expired, by a deadline's mark or with its etcd lease; forced), the next
    /// holder granted, callers queued.
    fn apply_revision(&self, events: &[etcd_client::Event]) -> Vec<Seen> {
        let (mut expired, mut forced) = (HashSet::new(), HashSet::new());
        for e in events.iter().filter(|e| e.event_type() == EventType::Put) {
            let Some(kv) = e.kv() else { continue };
            let key = text(kv.key());
            if key == self.mark_key(EXPIRED_MARK) {
                expired.insert(text(kv.value()));
            } else if key == self.mark_key(FORCED_MARK) {
                // One key per line: a force-release frees every holder of a key.
                forced.extend(text(kv.value()).lines().map(str::to_owned));
            }
        }
        let now = Instant::now();
        let ours: HashSet<i64> = lock(&self.sessions).values().map(|s| s.id).collect();
        let mut mirror = lock(&self.mirror);
        let mut released = lock(&self.released);
        // The head of every queue this revision touches, before it.
        let mut before: Vec<(String, String, Vec<Head>)> = Vec::new();
        let mut deleted: HashSet<String> = HashSet::new();
        let mut own_releases: HashSet<String> = HashSet::new();
        let mut deleted_per_lease: HashMap<i64, usize> = HashMap::new();
        let mut lease_keys_before: HashMap<i64, usize> = HashMap::new();
        // (lock prefix, create revision, holder, lease) of the keys this revision created.
        let mut created: Vec<(String, i64, String, i64)> = Vec::new();
        for e in events {
            let Some(kv) = e.kv() else { continue };
            let key = text(kv.key());
            let Some((pfx, lock_key)) = self.parse_key(&key) else { continue };
            if !before.iter().any(|(p, _, _)| *p == pfx) {
                let holders = mirror.holders(&pfx);
                before.push((pfx.clone(), lock_key, holders));
            }
            match e.event_type() {
                EventType::Put => {
                    let meta = meta::parse(kv.value());
                    let (holder, kind) = (meta.holder, meta.kind);
                    if kv.version() == 1 {
                        created.push((pfx.clone(), kv.create_revision(), holder.clone(), kv.lease()));
                    }
                    let queued = Queued { key, holder, kind, lease: kv.lease(), seen: now };
                    mirror.insert(pfx, kv.create_revision(), queued);
                }
                EventType::Delete => {
                    if released.remove(&key) {
                        // Released, or force-released, through this backend.
                        own_releases.insert(key.clone());
                    }
                    let Some(lease) = mirror.lease_of(&key) else { continue };
                    let count = mirror.per_lease.get(&lease).copied().unwrap_or(0);
                    lease_keys_before.entry(lease).or_insert(count);
                    if mirror.remove(&key).is_some() {
                        *deleted_per_lease.entry(lease).or_insert(0) += 1;
                        deleted.insert(key);
                    }
                }
            }
        }
        let mut seen = Vec::new();
        for (pfx, lock_key, old) in before {
            let new = mirror.holders(&pfx);
            let old_revs: HashSet<i64> = old.iter().map(|(rev, _)| *rev).collect();
            for (rev, old) in old.into_iter().filter(|(_, q)| deleted.contains(&q.key)) {
                let local = own_releases.contains(&old.key);
                let went = if forced.contains(&old.key) {
                    Went::Forced
                } else if expired.contains(&old.key) {
                    Went::Expired
                } else if local || old.lease == 0 {
                    Went::Released
                } else if deleted_per_lease.get(&old.lease).copied().unwrap_or(0) >= 2 {
                    // Several keys of one lease in one revision: the lease ended.
                    Went::Expired
                } else if lease_keys_before.get(&old.lease).copied().unwrap_or(0) > 1 {
                    // Its lease still carries other keys: it did not end.
                    Went::Released
                } else {
                    Went::AskLease(old.lease)
                };
                let (key, holder, fencing_token) = (lock_key.clone(), old.holder, rev as u64);
                seen.push(Seen::Gone { key, holder, fencing_token, went, local });
            }
            let new_revs: HashSet<i64> = new.iter().map(|(rev, _)| *rev).collect();
            for (rev, head) in new.into_iter().filter(|(rev, _)| !old_revs.contains(rev)) {
                seen.push(Seen::Event(StoreEvent {
                    kind: StoreEventKind::Granted,
                    key: lock_key.clone(),
                    holder: head.holder,
                    fencing_token: Some(rev as u64),
                    local: ours.contains(&head.lease),
                }));
            }
            for (_, _, holder, lease) in created.iter().filter(|c| c.0 == pfx && !new_revs.contains(&c.1)) {
                seen.push(Seen::Event(StoreEvent {
                    kind: StoreEventKind::Queued,
                    key: lock_key.clone(),
                    holder: holder.clone(),
                    fencing_token: None,
                    local: ours.contains(lease),
                }));
            }
        }
        seen
    }

    /// Reports what one revision meant, asking etcd (once per lease) about the holders' keys
    /// whose going the events alone do not explain.
    async fn report(&self, seen: Vec<Seen>, observer: &StoreObserver) {
        let mut alive: HashMap<i64, bool> = HashMap::new();
        for s in &seen {
            if let Seen::Gone { went: Went::AskLease(lease), .. } = s {
                if !alive.contains_key(lease) {
                    let lease = *lease;
                    let ttl = call!(self, |c| c.lease_time_to_live(lease, None)).map_or(-1, |t| t.ttl());
                    alive.insert(lease, ttl > 0);
                }
            }
        }
        for s in seen {
            let event = match s {
                Seen::Event(e) => e,
                Seen::Gone { key, holder, fencing_token, went, local } => {
                    let kind = match went {
                        Went::Forced => StoreEventKind::ForceReleased,
                        Went::Released => StoreEventKind::Released,
                        Went::AskLease(lease) if alive.get(&lease).copied().unwrap_or(false) => {
                            StoreEventKind::Released
                        }
                        Went::Expired | Went::AskLease(_) => StoreEventKind::Expired,
                    };
                    StoreEvent { kind, key, holder, fencing_token: Some(fencing_token), local }
                }
            };
            observer(event);
        }
    }

    /// How long the caller queued under `etcd_key` has waited, as far as this process knows.
    fn waiting(&self, etcd_key: &str, now: Instant) -> Duration {
        let since = lock(&self.waiting_since).get(etcd_key).copied().or_else(|| {
            let mirror = lock(&self.mirror);
            let (pfx, rev) = mirror.keys.get(etcd_key)?;
            mirror.queues.get(pfx)?.get(rev).map(|q| q.seen)
        });
        since.map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
    }
}

/// The watch behind [`Backend::observe`]: loads every queue under the prefix, then follows one
/// watch from the next revision, reporting each revision's meaning; after a broken watch (a
/// member died, a compaction overtook it) it loads again.
async fn watch_store(inner: Weak<Inner>, observer: StoreObserver) {
    loop {
        let Some(me) = inner.upgrade() else { return };
        let pfx = format!("{}/", me.prefix);
        let stream = match me.load_mirror().await {
            Ok(rev) => {
                let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
                call!(me, |c| c.watch(pfx.as_str(), Some(opts.clone()))).ok()
            }
            Err(_) => None,
        };
        drop(me);
        if let Some(mut stream) = stream {
            while let Ok(Some(msg)) = stream.message().await {
                if msg.canceled() {
                    break;
                }
                let Some(me) = inner.upgrade() else { return };
                let events = msg.events();
                let mut start = 0;
                while start < events.len() {
                    let rev = events[start].kv().map_or(0, |kv| kv.mod_revision());
                    let end = events[start..]
                        .iter()
                        .position(|e| e.kv().map_or(0, |kv| kv.mod_revision()) != rev)
                        .map_or(events.len(), |n| start + n);
                    let seen = me.apply_revision(&events[start..end]);
                    me.report(seen, &observer).await;
                    start = end;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the waiting part of an acquire needs to know of it.
struct Waiting<'a> {
    pfx: &'a str,
    my_key: &'a str,
    my_rev: i64,
    secret: &'a str,
    start: Instant,
    /// For a semaphore permit or a shared lock, the queue ahead of our key as it was created
    /// (see [`many::Ahead`]); `None` for a plain lock, which waits for the key just ahead.
    ahead: Option<many::Ahead>,
}

/// Our queued key, until the acquire returns a grant. Dropped while armed (the acquire was
/// cancelled, or failed on its way) it deletes the key in the background; the key also lapses
/// with the session lease if the process exits first.
struct Pending<'a> {
    inner: &'a Inner,
    key: &'a str,
    /// The key's name, `None` once it was given back.
    slot: Option<Slot>,
}

impl Pending<'_> {
    /// Deletes the key before returning (see [`Inner::remove`]).
    async fn remove(mut self) {
        if let Some(slot) = self.slot.take() {
            self.inner.remove(self.key, slot).await;
        }
    }

    /// The key is ours now: its name goes with the grant.
    fn disarm(mut self) -> Option<Slot> {
        self.slot.take()
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.inner.abandon(self.key.to_owned(), slot);
        }
    }
}

/// `true` when etcd refused a write because the lease it names no longer exists.
fn lease_gone(e: &Error) -> bool {
    matches!(e, Error::Unavailable(m) if m.contains("lease not found"))
}

/// The lock key of an etcd key `<prefix>/<encoded key>/<id>`, for messages.
fn decode_lock(prefix: &str, etcd_key: &str) -> String {
    etcd_key
        .strip_prefix(prefix)
        .and_then(|k| k.strip_prefix('/'))
        .and_then(|k| k.rsplit_once('/'))
        .map_or_else(|| etcd_key.to_owned(), |(lock, _)| decode(lock))
}

/// The longest secret kept from a caller's lease id, so that `<name>.<secret>` stays within
/// [`crate::types::MAX_LEASE_ID_BYTES`].
const MAX_SECRET: usize = 96;

#[async_trait]
impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    /// One transaction creates our key bound to the session's lease (a try-once acquire only
    /// when no key exists under the lock's prefix, so a refusal leaves nothing behind). A waiting
    /// acquire queues its key, and a wait that times out or fails deletes it before returning; a
    /// cancelled one deletes it in the background. The grant's lease id is `<name>.<secret>`
    /// (see [`LeaseName`]), the secret being the caller's lease id.
    async fn acquire(&self, req: AcquireRequest) -> Result<Grant> {
        let inner = &*self.inner;
        let start = Instant::now();
        let pfx = inner.lock_prefix(&req.key);
        let secret = &req.lease_id.as_str()[..req.lease_id.as_str().len().min(MAX_SECRET)];
        let kind = Kind::of(req.mode, req.limit);
        if kind.many() {
            // A semaphore permit or a shared lock: an algorithm of its own (see `many`).
            return Box::pin(inner.acquire_many(&req, kind, start)).await;
        }
        let value = meta::encode_value(&req.holder, secret, kind, req.value.as_deref());
        let try_once = !req.wait.waits();
        let owner_opts =
            GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend).with_limit(1);
        let mut attempt = 0;
        let (used, slot, my_key, resp, revision) = loop {
            attempt += 1;
            let used = inner.covering_session(req.ttl, start).await?;
            let slot = Slot::take(&used.0);
            let my_key = format!("{pfx}{}", slot.name());
            let put =
                TxnOp::put(my_key.as_str(), value.as_str(), Some(PutOptions::new().with_lease(used.0.id)));
            let txn = if try_once {
                // Create our key only when nobody holds or waits (no key under the prefix at all).
                Txn::new()
                    .when([Compare::create_revision(pfx.as_str(), CompareOp::Equal, 0).with_prefix()])
                    .and_then([put])
                    .or_else([TxnOp::get(pfx.as_str(), Some(owner_opts.clone()))])
            } else {
                Txn::new()
                    .when([Compare::create_revision(my_key.as_str(), CompareOp::Equal, 0)])
                    .and_then([put, TxnOp::get(pfx.as_str(), Some(owner_opts.clone()))])
                    .or_else([TxnOp::get(my_key.as_str(), None)])
            };
            let sent = if try_once {
                let op = Op::Txn { prefix: pfx.clone(), txn };
                inner.coalesced(op).await.and_then(|reply| match reply {
                    Reply::Txn(resp, rev) => Ok((resp, rev)),
                    Reply::Delete { .. } => Err(Error::Unavailable("etcd: unexpected answer".into())),
                })
            } else {
                call_kv!(inner, |c| c.txn(txn.clone())).map(|r| {
                    let rev = r.header().map_or(0, |h| h.revision());
                    (r, rev)
                })
            };
            match sent {
                Ok((resp, _)) if !try_once && !resp.succeeded() => {
                    // The name exists: ours from an attempt the call retried, or (never expected)
                    // someone else's; then another name.
                    let mine = resp.op_responses().into_iter().find_map(|r| match r {
                        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                        _ => None,
                    });
                    if mine.is_some_and(|kv| secret_of(kv.value()) == Some(secret)) {
                        break (used, slot, my_key, resp, 0);
                    }
                    if attempt >= 3 {
                        return Err(Error::Unavailable(format!("etcd: key {my_key} exists unexpectedly")));
                    }
                }
                Ok((resp, rev)) => break (used, slot, my_key, resp, rev),
                Err(e) if attempt < 2 && lease_gone(&e) => {
                    // The session's lease ended under us (etcd lost it, or it lapsed): a new one.
                    used.0.lost.store(true, Ordering::Release);
                    inner.forget_session(&used.0);
                }
                Err(e @ Error::Unavailable(_)) => {
                    // The transaction may have been applied with its answer lost: look after the
                    // key as if granted, so that it is deleted soon if it exists.
                    inner.unsure(my_key, value, used, slot);
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        };
        let first_kv = |resp: etcd_client::TxnResponse| {
            resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            })
        };
        // Our key's create revision (0: not created), the owner when known, and whether the
        // call was retried after its first attempt had created our key (owner unknown then).
        let (my_rev, owner, retried) = match (try_once, resp.succeeded()) {
            (true, true) => (revision, None, false),
            (true, false) => match first_kv(resp) {
                Some(kv) if kv.key() == my_key.as_bytes() && secret_of(kv.value()) == Some(secret) => {
                    (kv.create_revision(), None, false)
                }
                owner => (0, owner, false),
            },
            (false, true) => (revision, first_kv(resp), false),
            (false, false) => (first_kv(resp).map_or(0, |kv| kv.create_revision()), None, true),
        };
        // A lock asked for while a semaphore holds the key: every holder must name one limit.
        let mismatch = owner
            .as_ref()
            .filter(|o| o.create_revision() != my_rev)
            .map(|o| meta::parse(o.value()).kind.limit)
            .filter(|limit| *limit != 1)
            .map(|limit| Error::LimitMismatch { key: req.key.clone(), limit });
        if my_rev == 0 {
            if let Some(e) = mismatch {
                slot.free();
                return Err(e);
            }
            let holder = owner.map(|o| holder_of(o.value()));
            if try_once {
                // Nothing was created: the name is free again.
                slot.free();
                return Err(Error::Held { key: req.key, holder });
            }
            return Err(Error::Unavailable("etcd: our key vanished while acquiring".into()));
        }
        // Our key exists. From here until a grant, dropping this (a cancelled acquire, a failure)
        // deletes it.
        let pending = Pending { inner, key: &my_key, slot: Some(slot) };
        if let Some(e) = mismatch {
            // Queued behind holders of another limit: leave the queue again.
            pending.remove().await;
            return Err(e);
        }
        let owner = if retried { inner.owner(&pfx).await? } else { owner };
        if owner.as_ref().is_none_or(|o| o.create_revision() == my_rev) {
            let Some(slot) = pending.disarm() else {
                return Err(Error::Unavailable("etcd: our key's name was given back".into()));
            };
            return Ok(inner.granted(my_key.clone(), my_rev, &req, secret, (used, slot), start));
        }
        // The wait in a future of its own (boxed), so that the try-once path stays small.
        let waiting = Waiting { pfx: &pfx, my_key: &my_key, my_rev, secret, start, ahead: None };
        Box::pin(inner.wait_for_turn(waiting, pending, &req, used)).await
    }

    /// Reads the key (gone, or not this lease's: `LeaseLost`), moves it to this backend's
    /// session for `ttl` if it is bound to another lease (one transaction keeping its create
    /// revision), refreshes the session only if its spare time does not cover `ttl` from now, and
    /// moves the lock's deadline. Without `ttl`, the TTL the lock was granted or last renewed with
    /// through this backend (or, for a lock granted elsewhere, the one its etcd lease is for).
    async fn renew(&self, key: &str, lease_id: &LeaseId, ttl: Option<Duration>) -> Result<Grant> {
        let inner = &*self.inner;
        let Some(lease) = LeaseName::of(lease_id) else { return Err(Error::not_owner(key)) };
        let my_key = format!("{}{}", inner.lock_prefix(key), lease.name);
        let sent = Instant::now();
        let resp = call_kv!(inner, |c| c.get(my_key.as_str(), None))?;
        let Some(kv) = resp.kvs().first().cloned().filter(|kv| lease.owns(kv.value())) else {
            inner.forget(&my_key, &lease, resp.kvs().is_empty());
            return Err(Error::not_owner(key));
        };
        let known = lock(&inner.held).locks.get(&my_key).filter(|h| lease.owns_held(h)).map(|h| h.ttl);
        let ttl = match ttl.or(known) {
            Some(ttl) => ttl,
            None => {
                let bound = kv.lease();
                let granted = call!(inner, |c| c.lease_time_to_live(bound, None))?.granted_ttl();
                if granted <= 0 {
                    return Err(Error::not_owner(key));
                }
                lock_ttl_of_session(granted)
            }
        };
        let used = inner.covering_session(ttl, sent).await?;
        if kv.lease() != used.0.id {
            // Bound to another lease: move it to ours, keeping its create revision (its fencing
            // token and its place in the queue) and its value.
            let txn = Txn::new()
                .when([Compare::create_revision(my_key.as_str(), CompareOp::Equal, kv.create_revision())])
                .and_then([TxnOp::put(
                    my_key.as_str(),
                    "",
                    Some(PutOptions::new().with_lease(used.0.id).with_ignore_value()),
                )]);
            let moved = call_kv!(inner, |c| c.txn(txn.clone()))?;
            if !moved.succeeded() {
                inner.forget(&my_key, &lease, false);
                return Err(Error::not_owner(key));
            }
        }
        let deadline = Instant::now() + ttl;
        let token = kv.create_revision();
        // The name stays with the lock if it is one of ours.
        let slot = inner.unhold(&my_key).and_then(|h| h.slot);
        let secret = lease.secret.unwrap_or_default().to_owned();
        inner.hold(my_key, HeldLock { token, secret, ttl, deadline, session: used, slot, unsure: None });
        Ok(Grant { lease_id: lease_id.clone(), fencing_token: token as u64, ttl, counted_from: sent })
    }

    /// Deletes exactly our key (compare create revision); the session lease stays. One round
    /// trip for a lock granted or renewed through this backend; one more (a read, to check the
    /// secret) for a lock granted elsewhere.
    async fn release(&self, key: &str, lease_id: &LeaseId) -> Result<()> {
        let inner = &*self.inner;
        let Some(lease) = LeaseName::of(lease_id) else { return Err(Error::not_owner(key)) };
        let my_key = format!("{}{}", inner.lock_prefix(key), lease.name);
        let own = lock(&inner.held).locks.get(&my_key).is_some_and(|h| lease.owns_held(h));
        // A lock of this backend's: its name is not reused while the backend holds it, so only
        // this grant's key has it and a plain delete is exact. Otherwise read the key (its value
        // must carry the lease's secret) and delete exactly that one (compare create revision).
        let txn = if own {
            None
        } else {
            let resp = call_kv!(inner, |c| c.get(my_key.as_str(), None))?;
            let token = match resp.kvs().first() {
                Some(kv) if lease.owns(kv.value()) => kv.create_revision(),
                _ => return Err(Error::not_owner(key)),
            };
            Some(
                Txn::new()
                    .when([Compare::create_revision(my_key.as_str(), CompareOp::Equal, token)])
                    .and_then([TxnOp::delete(my_key.as_str(), None)]),
            )
        };
        // Noted before the delete, so that the watch (when one runs) tells it from an ended
        // lease without asking etcd, even if its event arrives before this call's answer.
        let observing = inner.observing.load(Ordering::Relaxed);
        if observing {
            lock(&inner.released).insert(my_key.clone());
        }
        let tries = std::cell::Cell::new(0);
        let done = match &txn {
            // Coalesced with the deletes and try-once acquires other tasks make meanwhile.
            None => inner.coalesced(Op::Delete { key: my_key.clone() }).await.and_then(|reply| match reply {
                Reply::Delete { deleted, retried } => {
                    if retried {
                        tries.set(2);
                    }
                    Ok(deleted)
                }
                Reply::Txn(..) => Err(Error::Unavailable("etcd: unexpected answer".into())),
            }),
            Some(txn) => call_kv!(inner, |c| {
                tries.set(tries.get() + 1);
                c.txn(txn.clone())
            })
            .map(|r| r.succeeded()),
        }
        .inspect_err(|_| {
            if observing {
                lock(&inner.released).remove(&my_key);
            }
        })?;
        // Deleted now, or gone before (its create revision was ours, and names of ours are not
        // reused while we hold them): either way the name is free.
        inner.forget(&my_key, &lease, true);
        if observing && !done {
            lock(&inner.released).remove(&my_key);
        }
        // A retried call whose first attempt reached etcd (its answer lost with a dying member)
        // finds the key gone: that was this release.
        if done || tries.get() > 1 {
            Ok(())
        } else {
            Err(Error::not_owner(key))
        }
    }

    fn offers(&self) -> Offers {
        Offers { waiters: true, force_release: true, events: true, many_holders: true, elections: true }
    }

    /// The keys under the lock's prefix after its holders, in create-revision order: every waiter,
    /// ours and those of other processes, `etcdctl lock` and Go's `Mutex` included (their label is
    /// empty). How long each has waited is known for this process's own waiters and, while
    /// [`Backend::observe`] runs, for every key since the watch first saw it; zero otherwise.
    async fn waiters(&self, key: &str) -> Result<Vec<WaiterInfo>> {
        let inner = &*self.inner;
        let queue = inner.queue(key).await?;
        let now = Instant::now();
        Ok(queue
            .kvs
            .iter()
            .zip(queue.metas)
            .skip(queue.holders)
            .map(|(kv, meta)| WaiterInfo {
                holder: meta.holder,
                waiting: inner.waiting(&text(kv.key()), now),
            })
            .collect())
    }

    /// Deletes the holders' keys (the first keys under the lock's prefix, see [`meta::holders`]:
    /// one for a lock, every permit of a semaphore, every reader), whoever's they are — this
    /// library's, `etcdctl lock`'s, a Go `Mutex`'s — in one transaction that checks they are still
    /// those keys and marks why they went. The next waiters are granted at once; each holder
    /// learns it at its next renewal (a Go `Mutex` does not check: fencing tokens protect the
    /// resource from it). Answers the status as it was: the newest holder, and all of them for a
    /// semaphore or shared lock.
    async fn force_release(&self, key: &str) -> Result<Option<LockInfo>> {
        let inner = &*self.inner;
        for _ in 0..5 {
            let queue = inner.queue(key).await?;
            let Some(newest) = queue.holders.checked_sub(1) else { return Ok(None) };
            let holders = &queue.kvs[..queue.holders];
            let keys: Vec<String> = holders.iter().map(|kv| text(kv.key())).collect();
            // The mark lapses with the first holder's etcd lease (kept for watchers only).
            let mark = match holders[0].lease() {
                0 => PutOptions::new(),
                lease => PutOptions::new().with_lease(lease),
            };
            let still: Vec<Compare> = holders
                .iter()
                .map(|kv| Compare::create_revision(kv.key(), CompareOp::Equal, kv.create_revision()))
                .collect();
            let mut ops: Vec<TxnOp> = holders.iter().map(|kv| TxnOp::delete(kv.key(), None)).collect();
            ops.push(TxnOp::put(inner.mark_key(FORCED_MARK), keys.join("\n"), Some(mark)));
            let txn = Txn::new().when(still).and_then(ops);
            let observing = inner.observing.load(Ordering::Relaxed);
            if observing {
                // The watch reports them as this backend's own (see `release`).
                lock(&inner.released).extend(keys.iter().cloned());
            }
            let outcome = call_kv!(inner, |c| c.txn(txn.clone()));
            if observing && !outcome.as_ref().is_ok_and(|done| done.succeeded()) {
                let mut released = lock(&inner.released);
                for k in &keys {
                    released.remove(k);
                }
            }
            match outcome {
                Ok(done) if done.succeeded() => {
                    let meta = &queue.metas[newest];
                    let token = queue.kvs[newest].create_revision();
                    tracing::warn!(key, holder = %meta.holder, token, holders = keys.len(), "etcd lock force-released");
                    let first = queue.metas[0].kind;
                    let holders = match first.many() {
                        true => holders
                            .iter()
                            .zip(&queue.metas)
                            .map(|(kv, m)| crate::types::HolderInfo {
                                holder: m.holder.clone(),
                                fencing_token: kv.create_revision() as u64,
                                expires_in: Duration::ZERO,
                            })
                            .collect(),
                        false => Vec::new(),
                    };
                    return Ok(Some(LockInfo {
                        holder: Some(meta.holder.clone()),
                        fencing_token: Some(token as u64),
                        limit: (first.limit > 1).then_some(first.limit),
                        mode: first.shared.then_some(crate::types::LockMode::Shared),
                        holders,
                        ..LockInfo::free(key, 0)
                    }));
                }
                // The holders changed meanwhile, or a lease ended (its key with it): look again.
                Ok(_) => {}
                Err(e) if lease_gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable(format!("etcd: the holder of {key:?} kept changing; force-release not done")))
    }

    /// Starts the watch that reports every grant, release, expiry, queueing and force-release of
    /// every client of the cluster under this backend's prefix (see [`StoreEvent`]).
    fn observe(&self, observer: StoreObserver) -> bool {
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return false };
        let inner = &self.inner;
        let mut task = lock(&inner.watch_task);
        if task.is_some() {
            return true;
        }
        inner.observing.store(true, Ordering::Relaxed);
        *task = Some(handle.spawn(watch_store(inner.me.clone(), observer)));
        true
    }

    /// Every holder (see [`meta::holders`]), the newest one's label, token and value, and the
    /// number of keys queued behind them.
    async fn status(&self, key: &str) -> Result<LockInfo> {
        Ok(self.inner.status_rev(key).await?.0)
    }

    /// A transaction that rewrites our key's value if it still has its create revision, keeping
    /// its etcd lease (etcd's `Election.Proclaim`; see [`election`]).
    async fn proclaim(&self, key: &str, lease_id: &LeaseId, value: &str) -> Result<()> {
        self.inner.proclaim(key, lease_id, value).await
    }

    /// The status now, then after every grant, release, expiry, force-release and proclamation,
    /// from an etcd watch of the lock's prefix (etcd's `Election.Observe`; see [`election`]).
    async fn watch(&self, key: &str) -> Result<Box<dyn StatusWatch>> {
        Ok(Box::new(election::KeyWatch::new(self.inner.clone(), key)))
    }

    /// Reads the names of every key under the prefix (keys only: their percent-encoding does not
    /// keep byte order, so the cursor is applied after decoding), then the status of the locks
    /// after the cursor, in order, only until the page is full.
    async fn list(&self, query: &ListQuery) -> Result<LockPage> {
        let inner = &*self.inner;
        let search = format!("{}/{}", inner.prefix, encode(&query.prefix));
        let resp = call_kv!(inner, |c| c
            .get(search.as_str(), Some(GetOptions::new().with_prefix().with_keys_only())))?;
        let keys: Vec<String> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let k = text(kv.key());
                let rest = k.strip_prefix(&format!("{}/", inner.prefix))?.to_owned();
                let (lock, _) = rest.rsplit_once('/')?;
                Some(decode(lock))
            })
            .collect();
        crate::backend::page_of_statuses(self, keys, query).await
    }
}
