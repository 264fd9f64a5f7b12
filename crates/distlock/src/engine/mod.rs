//! The lease engine: leases kept in this process, which `memory://` and the lock server's
//! embedded store are built on — the [`LeaseTable`], FIFO wait queues with hand-off, one expiry
//! task, snapshot and restore for a durable store, and an observer of what callers cannot see.
//!
//! Like mini-redis's `db.rs`: the critical section is a `std::sync::Mutex` that is never held
//! across an `.await`; one background task sleeps until the earliest deadline and is poked only
//! when a new deadline comes before it. A release or an expiry hands the key directly to the first
//! live waiter inside the critical section, so a newcomer can never jump the queue and no waiter
//! ever polls.
//!
//! # Files
//! - [`table`]: the pure lease table (time passed in).
//! - `state.rs`: the table, the queues and the counters behind one mutex; what is due expires on
//!   every access.
//! - `queue.rs`: the waiters of a key, first come first served, and the hand-off to the first.
//! - `expiry.rs`: the one expiry task.
//! - `acquire.rs`: the acquire that waits (a grant that races a cancellation is given back).
//! - `saved.rs`: [`SavedLease`], snapshot and restore, for a store that persists the table.
//! - `observer.rs`: [`TableEvent`] and [`Observer`].
//! - `watch.rs`: change feeds of single keys, for leader elections.

mod acquire;
mod expiry;
mod observer;
mod queue;
mod saved;
mod state;
pub mod table;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::types::{Grant, LeaseId, ListQuery, LockInfo, LockPage};

pub use observer::{Observer, TableEvent};
pub use queue::WaiterInfo;
pub use saved::SavedLease;
pub use table::LeaseTable;
pub use watch::KeyWatch;

use state::{Shared, State};

/// Leases kept in this process: grants, FIFO waiting, expiry. Cheap to share behind an `Arc`;
/// see the module docs. [`crate::MemoryBackend`] offers it as a [`crate::Backend`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use distlock::engine::Engine;
/// use distlock::{AcquireRequest, LeaseId, Wait};
///
/// let engine = Engine::new().unwrap();
/// let id = LeaseId::generate();
/// let req = AcquireRequest {
///     key: "job".into(),
///     lease_id: id.clone(),
///     holder: "me".into(),
///     ttl: Duration::from_secs(30),
///     wait: Wait::TryOnce,
///     limit: 1,
///     mode: distlock::LockMode::Exclusive,
///     value: None,
/// };
/// assert_eq!(engine.acquire(req).await.unwrap().fencing_token, 1);
/// assert_eq!(engine.status("job").holder.as_deref(), Some("me"));
/// engine.release("job", &id).unwrap();
/// # }
/// ```
pub struct Engine {
    shared: Arc<Shared>,
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineStats {
    /// Entries in the table (live, or expired and about to be purged).
    pub leases: u64,
    /// Waiters queued on all keys (including ones that gave up and are not yet swept).
    pub waiters: u64,
    /// Leases expired by their TTL since start.
    pub expired_total: u64,
    /// The highest fencing token issued.
    pub last_token: u64,
}

impl Engine {
    /// A new, empty table with its expiry task. Fails outside a Tokio runtime.
    pub fn new() -> Result<Engine> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::InvalidInput("the memory backend must be created inside a Tokio runtime".into())
        })?;
        let shared = Arc::new(Shared {
            state: std::sync::Mutex::new(State::default()),
            expiry_changed: Notify::new(),
        });
        handle.spawn(expiry::expire_leases(shared.clone()));
        Ok(Engine { shared })
    }

    /// Extends the live lease `lease_id` on `key` to `ttl` from now; with `None`, by the TTL of
    /// its last grant or renewal. Same rules as [`crate::Backend::renew`].
    pub fn renew(&self, key: &str, lease_id: &LeaseId, ttl: Option<Duration>) -> Result<Grant> {
        let now = Instant::now();
        self.shared.with_state(now, |s| s.table.renew(key, lease_id, ttl, now))
    }

    /// Renews like [`Engine::renew`] and also returns the TTL the lease had before, so a durable
    /// store can log only renewals that change it.
    pub fn renew_reporting(
        &self,
        key: &str,
        lease_id: &LeaseId,
        ttl: Option<Duration>,
    ) -> Result<(Grant, Duration)> {
        let now = Instant::now();
        self.shared.with_state(now, |s| {
            let before = s.table.lease(key, lease_id, now).map(|e| e.ttl);
            let grant = s.table.renew(key, lease_id, ttl, now)?;
            let before = before.unwrap_or(grant.ttl);
            Ok((grant, before))
        })
    }

    /// Frees `key` if `lease_id` is its live lease and hands it to the next waiter, at once
    /// (callable from drop guards). Same rules as [`crate::Backend::release`].
    pub fn release(&self, key: &str, lease_id: &LeaseId) -> Result<()> {
        self.release_reporting(key, lease_id).map(drop)
    }

    /// Releases like [`Engine::release`] and returns the lease it freed (holder, fencing token),
    /// read in the same critical section, for a server that reports who released what.
    pub fn release_reporting(&self, key: &str, lease_id: &LeaseId) -> Result<SavedLease> {
        self.release_logged(key, lease_id, |_| Ok(())).map(|(lease, ())| lease)
    }

    /// Releases like [`Engine::release_reporting`], calling `log` with the freed lease in the
    /// same critical section, before the key is handed to its next waiters: a durable store
    /// queues the release's record there, so it reaches the disk ahead of the grant of the place
    /// it freed (whose record is queued only after the hand-off). When `log` fails the lease is
    /// put back and its error returned: nothing changed.
    pub fn release_logged<T>(
        &self,
        key: &str,
        lease_id: &LeaseId,
        log: impl FnOnce(&SavedLease) -> Result<T>,
    ) -> Result<(SavedLease, T)> {
        let now = Instant::now();
        self.shared.with_state(now, |s| {
            let limit = s.table.limit_of(key);
            let entry = s.table.release(key, lease_id, now)?;
            let lease = SavedLease::of(key, limit, entry.clone());
            match log(&lease) {
                Ok(logged) => {
                    s.hand_off(key, now);
                    Ok((lease, logged))
                }
                Err(e) => {
                    s.table.restore(key.to_owned(), limit, entry);
                    Err(e)
                }
            }
        })
    }

    /// Frees `key` whoever holds it — an operator's override — and hands it to the next
    /// waiters. Returns the leases it removed, oldest first (every holder of a semaphore; none
    /// when the key was not held). The token counter is not touched; an old holder's next renew
    /// or release gets [`Error::LeaseLost`].
    pub fn force_release(&self, key: &str) -> Vec<SavedLease> {
        match self.force_release_logged(key, |_| Ok(())) {
            Ok((freed, ())) => freed,
            Err(_) => Vec::new(), // `log` cannot fail
        }
    }

    /// Force-releases like [`Engine::force_release`], calling `log` with the freed leases
    /// before the hand-off, as [`Engine::release_logged`] does; when `log` fails the leases are
    /// put back and nothing changed.
    pub fn force_release_logged<T>(
        &self,
        key: &str,
        log: impl FnOnce(&[SavedLease]) -> Result<T>,
    ) -> Result<(Vec<SavedLease>, T)> {
        let now = Instant::now();
        self.shared.with_state(now, |s| {
            let limit = s.table.limit_of(key);
            let entries = s.table.force_release(key, now);
            let freed: Vec<SavedLease> =
                entries.iter().map(|e| SavedLease::of(key, limit, e.clone())).collect();
            match log(&freed) {
                Ok(logged) => {
                    s.hand_off(key, now);
                    Ok((freed, logged))
                }
                Err(e) => {
                    for entry in entries {
                        s.table.restore(key.to_owned(), limit, entry);
                    }
                    Err(e)
                }
            }
        })
    }

    /// Replaces the value the live lease `lease_id` on `key` publishes and wakes the key's
    /// watchers. Same rules as [`crate::Backend::proclaim`].
    pub fn proclaim(&self, key: &str, lease_id: &LeaseId, value: &str) -> Result<()> {
        let now = Instant::now();
        self.shared.with_state(now, |s| {
            s.table.proclaim(key, lease_id, value, now)?;
            s.changed(key);
            Ok(())
        })
    }

    /// From now on a grant is left out of status, lists and watches until [`Engine::confirm`]
    /// names it (see [`LeaseTable::require_confirmation`]): for a store that answers a grant only
    /// once it is durable.
    pub fn require_confirmation(&self) {
        self.shared.lock().table.require_confirmation();
    }

    /// Shows the grant with `token` on `key` in status from now on, and wakes the key's watchers
    /// (it is now the key's holder for them). `false` when the lease is no longer held: it was
    /// released, expired or force-released before its confirmation.
    pub fn confirm(&self, key: &str, token: u64) -> bool {
        let now = Instant::now();
        self.shared.with_state(now, |s| match s.table.confirm(key, token) {
            Some(changed) => {
                if changed {
                    s.changed(key);
                }
                true
            }
            None => false,
        })
    }

    /// How many live leases `key` has, confirmed or not: how many releases a force-release of it
    /// would log now.
    pub fn holder_count(&self, key: &str) -> usize {
        let now = Instant::now();
        self.shared.with_state(now, |s| s.table.holders(key).iter().filter(|e| now < e.expires_at).count())
    }

    /// The fencing tokens of every live lease on `key`, confirmed or not, oldest first: what
    /// the table holds, for tests that compare it across a crash.
    #[doc(hidden)]
    pub fn held_tokens(&self, key: &str) -> Vec<u64> {
        let now = Instant::now();
        self.shared.with_state(now, |s| {
            s.table.holders(key).iter().filter(|e| now < e.expires_at).map(|e| e.fencing_token).collect()
        })
    }

    /// The state of `key` (its confirmed leases), with the number of callers waiting for it.
    pub fn status(&self, key: &str) -> LockInfo {
        let now = Instant::now();
        self.shared.with_state(now, |s| LockInfo { waiters: s.waiters(key), ..s.table.info(key, now) })
    }

    /// One page of held locks (see [`crate::Backend::list`]). Ranges over the ordered table from
    /// the cursor: a page costs what it returns.
    pub fn list(&self, query: &ListQuery) -> LockPage {
        let now = Instant::now();
        self.shared.with_state(now, |s| {
            query
                .page(s.table.list(query, now).map(|info| LockInfo { waiters: s.waiters(&info.key), ..info }))
        })
    }

    /// Calls `observer` with every [`TableEvent`] from now on (one observer; a second call
    /// replaces the first).
    pub fn observe(&self, observer: Observer) {
        self.shared.lock().observer = Some(observer);
    }

    /// Entries in the table (cheap; for limits).
    pub fn lease_count(&self) -> u64 {
        self.shared.lock().table.len() as u64
    }

    /// Counts for metrics.
    pub fn stats(&self) -> EngineStats {
        let now = Instant::now();
        self.shared.with_state(now, |s| EngineStats {
            leases: s.table.len() as u64,
            waiters: s.queues.values().map(|q| q.len() as u64).sum(),
            expired_total: s.expired_total,
            last_token: s.table.last_token(),
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.shutdown = true;
        // Watchers of a dropped engine are told so (their `next` fails) instead of waiting on.
        state.watchers.clear();
        drop(state);
        self.shared.expiry_changed.notify_one();
    }
}
