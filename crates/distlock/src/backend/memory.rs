//! The in-process backend: a [`LeaseTable`] behind a mutex, FIFO wait queues, and one expiry task.
//!
//! Like mini-redis's `db.rs`: the critical section is a `std::sync::Mutex` that is never held
//! across an `.await`; one background task sleeps until the earliest deadline and is poked only
//! when a new deadline comes before it. A release or an expiry hands the key directly to the first
//! live waiter inside the critical section, so a newcomer can never jump the queue and no waiter
//! ever polls.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::table::LeaseTable;
use crate::types::{AcquireRequest, Grant, LeaseId, ListQuery, LockInfo, LockPage};

/// Leases kept in this process. Cheap to share behind an `Arc`; see the module docs.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::sync::Arc;
/// use distlock::{AcquireOptions, Locker, MemoryBackend};
///
/// let locker = Locker::with_backend(Arc::new(MemoryBackend::new().unwrap()));
/// let lease = locker.acquire("job", &AcquireOptions::new()).await.unwrap();
/// assert_eq!(lease.fencing_token(), 1);
/// # }
/// ```
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the expiry task when a deadline earlier than its current one appears, or on shutdown.
    expiry_changed: Notify,
}

#[derive(Default)]
struct State {
    table: LeaseTable,
    queues: HashMap<String, VecDeque<Waiter>>,
    shutdown: bool,
    expired_total: u64,
    observer: Option<Observer>,
}

/// Something the table did on its own or that a caller cannot see from its answer.
#[derive(Debug, Clone, Copy)]
pub enum TableEvent<'a> {
    /// A lease ran out its TTL.
    Expired(&'a SavedLease),
    /// A caller joined the queue of a held key.
    Queued {
        /// The key.
        key: &'a str,
        /// The waiter's holder label.
        holder: &'a str,
    },
}

/// Called with every [`TableEvent`], under the table's lock: keep it short (e.g. a channel send).
pub type Observer = Arc<dyn Fn(TableEvent<'_>) + Send + Sync>;

/// A caller waiting for a key, as [`MemoryBackend::waiting_on`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WaiterInfo {
    /// The waiter's holder label.
    pub holder: String,
    /// How long it has waited so far.
    #[serde(rename = "waiting_ms", serialize_with = "as_millis")]
    pub waiting: Duration,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// A lease as saved to disk by a durable store built on this backend.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedLease {
    /// The full key.
    pub key: String,
    /// The lease's secret.
    pub lease_id: LeaseId,
    /// The holder label.
    pub holder: String,
    /// The TTL of the last grant or logged renewal, in ms.
    pub ttl_ms: u64,
    /// The grant's fencing token.
    pub fencing_token: u64,
}

impl SavedLease {
    /// The saved form of the table entry holding `key`.
    fn of(key: &str, e: crate::table::Entry) -> SavedLease {
        SavedLease {
            key: key.to_owned(),
            lease_id: e.lease_id,
            holder: e.holder,
            ttl_ms: e.ttl.as_millis() as u64,
            fencing_token: e.fencing_token,
        }
    }
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// Entries in the table (live, or expired and about to be purged).
    pub leases: u64,
    /// Waiters queued on all keys (including ones that gave up and are not yet swept).
    pub waiters: u64,
    /// Leases expired by their TTL since start.
    pub expired_total: u64,
    /// The highest fencing token issued.
    pub last_token: u64,
}

/// A caller blocked in `acquire`: it gets its grant through `tx`.
struct Waiter {
    lease_id: LeaseId,
    holder: String,
    ttl: Duration,
    since: Instant,
    tx: oneshot::Sender<Grant>,
}

impl MemoryBackend {
    /// A new, empty table with its expiry task. Fails outside a Tokio runtime.
    pub fn new() -> Result<MemoryBackend> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::InvalidInput("the memory backend must be created inside a Tokio runtime".into())
        })?;
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), expiry_changed: Notify::new() });
        handle.spawn(expire_leases(shared.clone()));
        Ok(MemoryBackend { shared })
    }
}

impl MemoryBackend {
    /// A table that continues from a saved state: tokens continue above `last_token`, and every
    /// saved lease is held again for its full TTL counted from now.
    pub fn restore(last_token: u64, leases: Vec<SavedLease>) -> Result<MemoryBackend> {
        let backend = MemoryBackend::new()?;
        let now = Instant::now();
        backend.shared.with_state(now, |s| {
            s.table = LeaseTable::with_last_token(last_token);
            for l in leases {
                let ttl = Duration::from_millis(l.ttl_ms);
                let entry = crate::table::Entry {
                    lease_id: l.lease_id,
                    fencing_token: l.fencing_token,
                    holder: l.holder,
                    ttl,
                    expires_at: now + ttl,
                    granted_at: now,
                };
                s.table.restore(l.key, entry);
            }
        });
        Ok(backend)
    }

    /// The live leases and the token counter, consistent with one instant.
    pub fn snapshot(&self) -> (u64, Vec<SavedLease>) {
        let now = Instant::now();
        self.shared.with_state(now, |s| {
            let leases = s
                .table
                .entries()
                .filter(|(_, e)| now < e.expires_at)
                .map(|(k, e)| SavedLease::of(k, e.clone()))
                .collect();
            (s.table.last_token(), leases)
        })
    }

    /// Releases at once, without awaiting (for drop guards). Same rules as [`Backend::release`].
    pub fn release_now(&self, key: &str, lease_id: &LeaseId) -> Result<()> {
        let now = Instant::now();
        self.shared.with_state(now, |s| {
            s.table.release(key, lease_id, now)?;
            s.hand_off(key, now);
            Ok(())
        })
    }

    /// Releases like [`MemoryBackend::release_now`] and returns the lease it freed (holder, fencing
    /// token), read in the same critical section, for a server that reports who released what.
    pub fn release_reporting(&self, key: &str, lease_id: &LeaseId) -> Result<SavedLease> {
        let now = Instant::now();
        self.shared.with_state(now, |s| {
            let lease = s.table.live(key, now).filter(|e| e.lease_id == *lease_id).cloned();
            s.table.release(key, lease_id, now)?;
            s.hand_off(key, now);
            // `release` succeeded, so the live entry was this lease's.
            lease.map(|e| SavedLease::of(key, e)).ok_or_else(|| Error::not_owner(key))
        })
    }

    /// Frees `key` whoever holds it — an operator's override — and hands it to the next waiter.
    /// Returns the lease it removed (`None` when the key was not held). The token counter is not
    /// touched; the old holder's next renew or release gets [`Error::LeaseLost`].
    pub fn force_release(&self, key: &str) -> Option<SavedLease> {
        let now = Instant::now();
        self.shared.with_state(now, |s| {
            let e = s.table.force_release(key, now)?;
            s.hand_off(key, now);
            Some(SavedLease::of(key, e))
        })
    }

    /// The callers waiting for `key`, first in line first.
    pub fn waiting_on(&self, key: &str) -> Vec<WaiterInfo> {
        let now = Instant::now();
        self.shared.with_state(now, |s| {
            s.queues.get(key).map_or_else(Vec::new, |q| {
                q.iter()
                    .filter(|w| !w.tx.is_closed())
                    .map(|w| WaiterInfo { holder: w.holder.clone(), waiting: now - w.since })
                    .collect()
            })
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
    pub fn stats(&self) -> MemoryStats {
        let now = Instant::now();
        self.shared.with_state(now, |s| MemoryStats {
            leases: s.table.len() as u64,
            waiters: s.queues.values().map(|q| q.len() as u64).sum(),
            expired_total: s.expired_total,
            last_token: s.table.last_token(),
        })
    }

    /// Renews like [`Backend::renew`] (`None` keeps the lease's TTL) and also returns the TTL the
    /// lease had before, so a durable store can log only renewals that change it.
    pub fn renew_reporting(
        &self,
        key: &str,
        lease_id: &LeaseId,
        ttl: Option<Duration>,
    ) -> Result<(Grant, Duration)> {
        let now = Instant::now();
        self.shared.with_state(now, |s| {
            let before = s.table.live(key, now).filter(|e| e.lease_id == *lease_id).map(|e| e.ttl);
            let grant = s.table.renew(key, lease_id, ttl, now)?;
            let before = before.unwrap_or(grant.ttl);
            Ok((grant, before))
        })
    }
}

impl Drop for MemoryBackend {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.expiry_changed.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the table half-updated in a way that breaks
        // mutual exclusion (every mutation is a single map operation), so keep serving.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the state after purging what has expired, and wakes the expiry task when `f`
    /// moved the earliest deadline forward in time.
    fn with_state<T>(&self, now: Instant, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.lock();
        state.purge(now);
        let before = state.table.next_expiry();
        let out = f(&mut state);
        let after = state.table.next_expiry();
        drop(state);
        if matches!((before, after), (None, Some(_)))
            || matches!((before, after), (Some(b), Some(a)) if a < b)
        {
            self.expiry_changed.notify_one();
        }
        out
    }
}

impl State {
    /// Expires due leases and hands each freed key to its next waiter.
    fn purge(&mut self, now: Instant) {
        for (key, entry) in self.table.purge_expired(now) {
            tracing::debug!(key = %key, "lease expired");
            self.expired_total += 1;
            if let Some(observe) = &self.observer {
                observe(TableEvent::Expired(&SavedLease::of(&key, entry)));
            }
            self.hand_off(&key, now);
        }
    }

    /// `key` has just been freed: grant it to the first waiter still waiting.
    fn hand_off(&mut self, key: &str, now: Instant) {
        let Some(queue) = self.queues.get_mut(key) else { return };
        while let Some(w) = queue.pop_front() {
            if w.tx.is_closed() {
                continue;
            }
            let Ok(grant) = self.table.try_acquire(key, &w.lease_id, &w.holder, w.ttl, now) else {
                // Cannot happen (the key was just freed); keep the waiter rather than lose it.
                queue.push_front(w);
                break;
            };
            match w.tx.send(grant) {
                Ok(()) => break,
                // The waiter gave up between the check and the send: undo and try the next one.
                Err(grant) => {
                    let _ = self.table.release(key, &grant.lease_id, now);
                }
            }
        }
        if queue.is_empty() {
            self.queues.remove(key);
        }
    }

    fn enqueue(&mut self, key: &str, waiter: Waiter) {
        if let Some(observe) = &self.observer {
            observe(TableEvent::Queued { key, holder: &waiter.holder });
        }
        let queue = self.queues.entry(key.to_owned()).or_default();
        queue.push_back(waiter);
        // Waiters that timed out stay in the queue until skipped; sweep them when the queue
        // doubles, which keeps the cost amortised O(1) per waiter.
        if queue.len().is_power_of_two() && queue.len() >= 64 {
            queue.retain(|w| !w.tx.is_closed());
        }
    }

    fn waiters(&self, key: &str) -> u64 {
        self.queues.get(key).map_or(0, |q| q.iter().filter(|w| !w.tx.is_closed()).count() as u64)
    }
}

/// The expiry task: sleeps until the earliest deadline, purges, repeats; exits on shutdown.
async fn expire_leases(shared: Arc<Shared>) {
    loop {
        let next = {
            let mut state = shared.lock();
            if state.shutdown {
                return;
            }
            state.purge(Instant::now());
            state.table.next_expiry()
        };
        match next {
            Some(when) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(when) => {}
                    _ = shared.expiry_changed.notified() => {}
                }
            }
            None => shared.expiry_changed.notified().await,
        }
    }
}

/// The first, non-waiting step of an acquire.
enum Attempt {
    Granted(Grant),
    Queued,
}

/// A grant in flight to a waiter. If the waiting `acquire` is cancelled (its future dropped or
/// timed out) after the grant was made, dropping this releases the lease at once instead of
/// leaving the key held by nobody until its TTL runs out.
struct PendingGrant {
    rx: oneshot::Receiver<Grant>,
    shared: Arc<Shared>,
    key: String,
}

impl PendingGrant {
    /// Stops waiting and returns a grant that arrived meanwhile, if any.
    fn take_late_grant(&mut self) -> Option<Grant> {
        self.rx.close();
        self.rx.try_recv().ok()
    }
}

impl Drop for PendingGrant {
    fn drop(&mut self) {
        if let Some(grant) = self.take_late_grant() {
            let now = Instant::now();
            self.shared.with_state(now, |s| {
                if s.table.release(&self.key, &grant.lease_id, now).is_ok() {
                    s.hand_off(&self.key, now);
                }
            });
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Grant> {
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let queued = self.shared.with_state(started, |s| {
            match s.table.try_acquire(&req.key, &req.lease_id, &req.holder, req.ttl, started) {
                Ok(grant) => Ok(Attempt::Granted(grant)),
                Err(held) if req.wait == Some(Duration::ZERO) => Err(held),
                Err(_) => {
                    let waiter = Waiter {
                        lease_id: req.lease_id.clone(),
                        holder: req.holder.clone(),
                        ttl: req.ttl,
                        since: started,
                        tx,
                    };
                    s.enqueue(&req.key, waiter);
                    Ok(Attempt::Queued)
                }
            }
        })?;
        if let Attempt::Granted(grant) = queued {
            return Ok(grant);
        }

        let mut pending = PendingGrant { rx, shared: self.shared.clone(), key: req.key.clone() };
        let outcome = match req.wait {
            Some(wait) => tokio::time::timeout(wait, &mut pending.rx).await.ok(),
            None => Some((&mut pending.rx).await),
        };
        match outcome {
            Some(Ok(grant)) => Ok(grant),
            Some(Err(_)) => Err(Error::Unavailable("the memory backend was dropped".into())),
            None => match pending.take_late_grant() {
                Some(grant) => Ok(grant),
                None => {
                    let now = Instant::now();
                    let holder = self
                        .shared
                        .with_state(now, |s| s.table.live(&req.key, now).map(|e| e.holder.clone()));
                    Err(Error::WaitTimeout { key: req.key, holder, waited: now - started })
                }
            },
        }
    }

    async fn renew(&self, key: &str, lease_id: &LeaseId, ttl: Option<Duration>) -> Result<Grant> {
        let now = Instant::now();
        self.shared.with_state(now, |s| s.table.renew(key, lease_id, ttl, now))
    }

    async fn release(&self, key: &str, lease_id: &LeaseId) -> Result<()> {
        self.release_now(key, lease_id)
    }

    async fn status(&self, key: &str) -> Result<LockInfo> {
        let now = Instant::now();
        Ok(self.shared.with_state(now, |s| LockInfo { waiters: s.waiters(key), ..s.table.info(key, now) }))
    }

    /// Ranges over the ordered table from the cursor: a page costs what it returns.
    async fn list(&self, query: &ListQuery) -> Result<LockPage> {
        let now = Instant::now();
        Ok(self.shared.with_state(now, |s| {
            query
                .page(s.table.list(query, now).map(|info| LockInfo { waiters: s.waiters(&info.key), ..info }))
        }))
    }
}
