//! The contract every store implements, and opening a backend from a URL.
//!
//! A backend is a thin adapter: it grants, renews and releases leases atomically in its store and
//! waits fairly for a key. Everything the holder does with a lease afterwards (automatic renewal,
//! the loss signal, the conservative deadline, release on drop) is written once in
//! [`crate::lease`] and works the same on every backend.

#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "http")]
pub mod http;
pub mod memory;
mod params;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "redis", feature = "http"))]
mod waiting;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::engine::WaiterInfo;
use crate::error::{Error, Result};
use crate::types::{AcquireRequest, Grant, LeaseId, ListQuery, LockInfo, LockMode, LockPage};

pub use memory::MemoryBackend;

/// The URL schemes this build can open.
pub const SCHEMES: &str = match (cfg!(feature = "http"), cfg!(feature = "redis"), cfg!(feature = "etcd")) {
    (true, true, true) => {
        "memory://, http://, https://, redis://, redis-sentinel://, redis-cluster://, redlock://, etcd://"
    }
    (true, true, false) => {
        "memory://, http://, https://, redis://, redis-sentinel://, redis-cluster://, redlock://"
    }
    (true, false, _) => "memory://, http://, https://",
    (false, true, _) => "memory://, redis://, redis-sentinel://, redis-cluster://, redlock://",
    (false, false, _) => "memory://",
};

/// A store that keeps leases. Inputs reaching a backend are already validated.
///
/// Rules every implementation keeps:
/// - at most one live lease per key while the store is healthy;
/// - fencing tokens strictly increase with every grant of a key and are never reused;
/// - `renew` and `release` act only when `lease_id` is the live lease on `key`, and otherwise
///   return [`Error::LeaseLost`] without touching the key;
/// - waiters of one key are served first come, first served, woken by the release or expiry
///   itself (no sleep-and-retry polling);
/// - an unreachable store gives [`Error::Unavailable`], never a hang.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// A short name for messages and metrics, e.g. `"memory"`.
    fn name(&self) -> &'static str;

    /// Grants `req.key` to `req.lease_id`, waiting as `req.wait` says while it is held.
    /// Returns [`Error::Held`] when the call does not wait ([`crate::Wait::waits`]) and
    /// [`Error::WaitTimeout`] after a wait.
    async fn acquire(&self, req: AcquireRequest) -> Result<Grant>;

    /// Extends the live lease `lease_id` on `key` to `ttl` from now; with `None`, to the TTL the
    /// lease was granted or last renewed with (the returned [`Grant::ttl`] says which TTL the
    /// store applied).
    async fn renew(&self, key: &str, lease_id: &LeaseId, ttl: Option<Duration>) -> Result<Grant>;

    /// Frees `key` if `lease_id` is its live lease.
    async fn release(&self, key: &str, lease_id: &LeaseId) -> Result<()>;

    /// The state of `key`, held or not.
    async fn status(&self, key: &str) -> Result<LockInfo>;

    /// One page of held locks: keys that start with `query.prefix` and sort strictly after
    /// `query.after` (byte order), at most `query.limit` of them, in key order, with
    /// [`LockPage::next`] set to the last key returned when more follow. `query` is validated.
    async fn list(&self, query: &ListQuery) -> Result<LockPage>;

    /// Frees `key` whoever holds it: an operator's override for a holder that hangs. Returns the
    /// lease that was freed (its holder and fencing token), or `None` when the key was free. The
    /// holder's next renew or release gets [`Error::LeaseLost`].
    ///
    /// Offered where [`Backend::offers`] says so: the lock server (to admin tokens) and etcd;
    /// other backends answer [`Error::InvalidInput`].
    async fn force_release(&self, key: &str) -> Result<Option<LockInfo>> {
        let _ = key;
        Err(Error::InvalidInput(format!(
            "force-release is an operation of the lock server (http://), not of the {} backend",
            self.name()
        )))
    }

    /// The operations beyond the required ones that this backend offers.
    fn offers(&self) -> Offers {
        Offers::default()
    }

    /// The callers waiting for `key`, first in line first (holder labels, and how long each has
    /// waited where the backend knows). Offered where [`Offers::waiters`] says so; other
    /// backends answer [`Error::InvalidInput`].
    async fn waiters(&self, key: &str) -> Result<Vec<WaiterInfo>> {
        let _ = key;
        Err(Error::InvalidInput(format!("the {} backend cannot list the waiters of a lock", self.name())))
    }

    /// Starts calling `observer` with what happens in the store, made by every client of the
    /// store and not only through this backend (see [`StoreEvent`]). Returns `false` (and never
    /// calls it) where [`Offers::events`] is `false`. Call it once.
    fn observe(&self, observer: StoreObserver) -> bool {
        let _ = observer;
        false
    }

    /// Replaces the value the live lease `lease_id` on `key` publishes (a leader's proclamation).
    /// [`Error::LeaseLost`] when `lease_id` does not hold `key`. Offered where
    /// [`Offers::elections`] says so; other backends answer [`Error::InvalidInput`].
    async fn proclaim(&self, key: &str, lease_id: &LeaseId, value: &str) -> Result<()> {
        let _ = (key, lease_id, value);
        Err(elections_refused(self.name()))
    }

    /// The status of `key` now and at every change from then on (see [`StatusWatch`]), without
    /// polling. Offered where [`Offers::elections`] says so; other backends answer
    /// [`Error::InvalidInput`].
    async fn watch(&self, key: &str) -> Result<Box<dyn StatusWatch>> {
        let _ = key;
        Err(elections_refused(self.name()))
    }
}

/// The operations a backend offers beyond the required ones (see [`Backend::offers`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offers {
    /// [`Backend::waiters`]: the queue of a lock, in order.
    pub waiters: bool,
    /// [`Backend::force_release`]: free a lock whoever holds it.
    pub force_release: bool,
    /// [`Backend::observe`]: grants, releases, expiries, queueing and force-releases made by
    /// every client of the store.
    pub events: bool,
    /// Keys held by several leases: semaphores (an [`AcquireRequest::limit`] above 1) and
    /// shared locks ([`LockMode::Shared`]); see [`check_holders`].
    pub many_holders: bool,
    /// Leader elections: a value published with a lease ([`AcquireRequest::value`]), changed by
    /// [`Backend::proclaim`], and [`Backend::watch`]; see [`check_elections`].
    pub elections: bool,
}

/// The backends that keep the promises of semaphores and shared locks, for the error that
/// refuses them elsewhere.
const MANY_HOLDER_BACKENDS: &str =
    "memory://, Redis (redis://, redis-sentinel://, redis-cluster://), etcd:// and the lock server (http://) over its embedded store, Redis or etcd";

/// Refuses a `limit` out of bounds, a shared lock with a limit, and a semaphore or a shared lock
/// where `backend` does not offer them ([`Error::InvalidInput`] naming the backends that do) —
/// never offered unsafely.
pub fn check_holders(backend: &dyn Backend, limit: u32, mode: LockMode) -> Result<()> {
    crate::validate::limit(limit)?;
    let what = match (limit, mode) {
        (1, LockMode::Exclusive) => return Ok(()),
        (_, LockMode::Exclusive) => format!("limit {limit} asks for a semaphore"),
        (1, LockMode::Shared) => "a shared lock".to_owned(),
        (_, LockMode::Shared) => {
            return Err(Error::InvalidInput(format!(
                "a shared lock takes no limit (limit {limit}): shared holders are not counted"
            )))
        }
    };
    if !backend.offers().many_holders {
        return Err(Error::InvalidInput(format!(
            "{what}, which the {} backend does not offer (only exclusive locks); semaphores and \
             shared locks are offered by {MANY_HOLDER_BACKENDS}",
            backend.name()
        )));
    }
    Ok(())
}

/// The page `query` asks for, from the names of the keys a store found (any order, repeats
/// allowed): each lock's status read in key order, only until the page is full (and one more, so
/// the page knows whether another follows). For stores that list names and read each lock's
/// state apart (etcd, Redlock).
pub(crate) async fn page_of_statuses<B: Backend + ?Sized>(
    backend: &B,
    mut keys: Vec<String>,
    query: &ListQuery,
) -> Result<LockPage> {
    keys.sort();
    keys.dedup();
    let mut held = Vec::new();
    for key in keys.into_iter().filter(|k| query.matches(k)) {
        if query.limit.is_some_and(|n| held.len() > n) {
            break;
        }
        let info = backend.status(&key).await?;
        if info.held {
            held.push(info);
        }
    }
    Ok(query.page(held))
}

/// The backends that offer leader elections, for the error that refuses them elsewhere.
const ELECTION_BACKENDS: &str =
    "memory://, Redis (redis://, redis-sentinel://, redis-cluster://), etcd:// and the lock server (http://) over its embedded store, Redis or etcd";

/// Refuses a published value, a proclamation or a watch where `backend` does not offer
/// elections ([`Error::InvalidInput`] naming the backends that do).
pub fn check_elections(backend: &dyn Backend) -> Result<()> {
    match backend.offers().elections {
        true => Ok(()),
        false => Err(elections_refused(backend.name())),
    }
}

fn elections_refused(backend: &str) -> Error {
    Error::InvalidInput(format!(
        "leader election (a value published with a lease, proclaim, watch) is not offered by the \
         {backend} backend; it is offered by {ELECTION_BACKENDS}"
    ))
}

/// A change feed of one key's status (see [`Backend::watch`]).
#[async_trait]
pub trait StatusWatch: Send {
    /// The key's status: the first call answers the status now, each later call waits until
    /// the key changes (a grant, a release, an expiry, a force-release or a proclamation) and
    /// answers the status after it. Changes that come in quick succession may be answered as
    /// one (the latest status); renewals alone are not changes. A durable store shows a grant
    /// only once it is stored (the lock server's embedded store: once its record is on disk).
    async fn next(&mut self) -> Result<LockInfo>;
}

/// What happened to a lock, in a [`StoreEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreEventKind {
    /// A lease was granted (to the head of the queue, or to a caller that found the lock free).
    Granted,
    /// Its holder released a lease.
    Released,
    /// A lease ended without a release: its TTL passed unrenewed, or the process holding it
    /// died or lost the store (its etcd lease ended).
    Expired,
    /// A caller joined the queue of a held lock (`fencing_token` is `None`).
    Queued,
    /// An operator freed the lock (force-release).
    ForceReleased,
}

/// What [`Backend::observe`] reports: something that happened to a lock in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEvent {
    /// What happened.
    pub kind: StoreEventKind,
    /// The lock.
    pub key: String,
    /// The label of the lease's holder (of the waiter, for [`StoreEventKind::Queued`]); empty
    /// for clients that set none (`etcdctl lock`).
    pub holder: String,
    /// The fencing token of the lease it is about (`None` for a waiter).
    pub fencing_token: Option<u64>,
    /// Made through this backend (a call to it that has been or will be answered), rather than
    /// by another client of the store: a server that reports its own calls skips these.
    pub local: bool,
}

/// Called with every [`StoreEvent`] (from the backend's watch task: keep it short).
pub type StoreObserver = Arc<dyn Fn(StoreEvent) + Send + Sync>;

/// What a backend opened from `url` offers (see [`Backend::offers`]), known before it is opened.
pub fn offers_of(url: &str) -> Offers {
    match url.split_once("://").map_or("", |(s, _)| s) {
        "etcd" => {
            Offers { waiters: true, force_release: true, events: true, many_holders: true, elections: true }
        }
        "redis" | "rediss" | "redis-sentinel" | "redis-cluster" | "rediss-cluster" => {
            Offers { many_holders: true, elections: true, ..Offers::default() }
        }
        _ => Offers::default(),
    }
}

/// Opens the backend a URL names.
///
/// Supported: `memory://` (a fresh in-process table), `http://` (a `distlock serve` server, see
/// [`http`]; `https://` with TLS), `redis://` (one Redis; `rediss://` with TLS; see [`redis`]),
/// `redlock://` (a majority of several masters; `redlocks://` with TLS; see [`redis::redlock`]),
/// `etcd://`. Must be called inside a Tokio runtime.
///
/// URL parameters (`?name=value&…`) follow one rule on every backend: a name the backend does
/// not know, a name without a value, and a name given twice are each refused with
/// [`Error::InvalidInput`] naming the parameter (`memory://` takes none).
pub async fn open(url: &str) -> Result<Arc<dyn Backend>> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    match scheme {
        "memory" => {
            // memory:// takes no parameters; the one rule refuses any.
            params::Params::split(url, &[])?;
            Ok(Arc::new(MemoryBackend::new()?))
        }
        #[cfg(feature = "etcd")]
        "etcd" => Ok(Arc::new(etcd::EtcdBackend::open(url).await?)),
        #[cfg(feature = "http")]
        "http" | "https" => Ok(Arc::new(http::HttpBackend::open(url)?)),
        #[cfg(feature = "redis")]
        "redis" | "rediss" => Ok(Arc::new(redis::RedisBackend::open(redis::RedisConfig::parse(url)?).await?)),
        #[cfg(feature = "redis")]
        "redis-sentinel" => Ok(Arc::new(redis::RedisBackend::open_sentinel(url).await?)),
        #[cfg(feature = "redis")]
        "redis-cluster" | "rediss-cluster" => Ok(Arc::new(redis::RedisBackend::open_cluster(url).await?)),
        #[cfg(feature = "redis")]
        "redlock" | "redlocks" => Ok(Arc::new(
            redis::redlock::RedlockBackend::open(redis::redlock::RedlockConfig::parse(url)?).await?,
        )),
        "" => Err(Error::InvalidInput(format!("{url:?} is not a backend URL; expected e.g. memory://"))),
        other => {
            Err(Error::InvalidInput(format!("unsupported backend scheme {other:?}; supported: {SCHEMES}")))
        }
    }
}
