//! The embedded store: the in-process lease table made durable by the write-ahead log.
//!
//! Every change is applied to the table first and answered only after its record is on disk.
//! If the process dies in between, the caller never saw the answer: an unlogged grant is simply
//! not restored, and its token is never reused (a later logged grant carries a higher one; replay
//! takes the highest token seen). Renewals are logged only when they change the TTL, because after
//! a restart every lease counts its logged TTL afresh from the restart — never earlier than any
//! holder's own deadline. Expiries are logged as releases at the front of the next batch, and a
//! release or force-release queues its record before the table hands the key on: a grant is
//! never durable without the release or expiry that freed its place. A grant given back because
//! its caller went away is logged as a release too, queued behind the grant's own record.
//!
//! A grant is shown by status, lists and watches only once its record is on disk (the engine's
//! `require_confirmation`; status waits for the grants in flight at its call): were a reader
//! shown it earlier, a crash in between would undo the grant and hand its token out again, and
//! the reader would have seen one token for two holders. Releases and renewals are still read
//! from the table before they are durable (see docs/DESIGN.md, "Leader election").

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock::async_trait;
use distlock::engine::{Engine, Observer, SavedLease, TableEvent, WaiterInfo};
use distlock::{AcquireRequest, Backend, Error, Grant, LeaseId, ListQuery, LockInfo, LockPage};

use crate::wal::{self, Disk, RealDisk, Record, Wal, WalError, WalStats};

/// Caps that keep one server within its memory; requests past them get `LimitExceeded` (429).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Leases held at once.
    pub max_leases: u64,
    /// Callers waiting at once, over all keys.
    pub max_waiters: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_leases: 1_000_000, max_waiters: 100_000 }
    }
}

/// The durable store behind `distlock serve`. See the module docs.
pub struct EmbeddedStore {
    memory: Arc<Engine>,
    wal: Wal,
    wal_stats: Arc<WalStats>,
    limits: Limits,
    waiting: AtomicU64,
    /// The observer [`EmbeddedStore::observe`] installed: the engine's own observer is the
    /// store's (it logs expiries) and passes every event on to this one.
    observer: Arc<std::sync::Mutex<Option<Observer>>>,
    /// Renewals under way, per lease (see `renew`).
    renewing: RenewalsUnderWay,
    _dir_lock: Option<wal::DirLock>,
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy)]
pub struct StoreStats {
    /// Leases in the table.
    pub leases: u64,
    /// Callers waiting now.
    pub waiters: u64,
    /// Leases expired by TTL since start.
    pub expired_total: u64,
    /// Group commits (fdatasync calls) since start.
    pub syncs_total: u64,
    /// Records written since start.
    pub records_total: u64,
    /// Changes waiting for the log to answer (queued or being written and synced).
    pub appends_pending: u64,
}

impl EmbeddedStore {
    /// Recovers `dir` (created if missing) and opens it for writing. `compact_bytes` is the
    /// segment size after which the log is compacted into a snapshot.
    pub fn open(dir: &Path, limits: Limits, compact_bytes: u64) -> Result<EmbeddedStore, WalError> {
        let dir_lock = wal::lock_dir(dir)?;
        EmbeddedStore::start(RealDisk, dir, limits, compact_bytes, Some(dir_lock))
    }

    /// [`EmbeddedStore::open`] on another [`Disk`] than the file system, without the
    /// directory's lock: for tests that run the store on a simulated disk
    /// ([`wal::sim::SimDisk`]).
    #[doc(hidden)]
    pub fn open_on<D: Disk>(
        disk: D,
        dir: &Path,
        limits: Limits,
        compact_bytes: u64,
    ) -> Result<EmbeddedStore, WalError> {
        EmbeddedStore::start(disk, dir, limits, compact_bytes, None)
    }

    fn start<D: Disk>(
        disk: D,
        dir: &Path,
        limits: Limits,
        compact_bytes: u64,
        dir_lock: Option<wal::DirLock>,
    ) -> Result<EmbeddedStore, WalError> {
        let started = std::time::Instant::now();
        let (recovered, next, replayed_bytes) = wal::recover_on(&disk, dir)?;
        let replayed = started.elapsed();
        let restored = recovered.leases.values().map(Vec::len).sum::<usize>();
        let mut last_token = recovered.last_token;
        if distlock::planted::active(distlock::planted::Bug::CounterNotPersisted) {
            last_token = recovered.leases.values().flatten().map(|l| l.fencing_token).max().unwrap_or(0);
        }
        let memory = Engine::restore(last_token, recovered.leases.into_values().flatten().collect())
            .map_err(|e| WalError::Closed(e.to_string()))?;
        memory.require_confirmation();
        let memory = Arc::new(memory);
        let loaded = started.elapsed();
        let source = memory.clone();
        // Whatever was recovered is written again as a snapshot, synced, before any change is
        // acknowledged: after a failed sync, the page cache this process read from can hold
        // writes the disk never got (a renewal not logged because it keeps the TTL would
        // otherwise rest on one). It also compacts a log that grew past `compact_bytes`.
        let snapshot = replayed_bytes > 0 || last_token > 0 || replayed_bytes >= compact_bytes;
        let (wal, wal_stats) =
            Wal::open_on(disk, dir, next, Arc::new(move || source.snapshot()), compact_bytes, snapshot)?;
        let observer: Arc<std::sync::Mutex<Option<Observer>>> = Arc::default();
        {
            // An expiry is logged (as a release) ahead of whatever is appended next: a grant of
            // the place it freed must never be durable without it.
            let (log, forward) = (wal.ahead(), observer.clone());
            memory.observe(Arc::new(move |event| {
                if let TableEvent::Expired(lease) = event {
                    log.push(Record::Release {
                        key: lease.key.clone(),
                        lease_id: lease.lease_id.clone(),
                        fencing_token: Some(lease.fencing_token),
                    });
                }
                if let Some(observe) = &*forward.lock().unwrap_or_else(|e| e.into_inner()) {
                    observe(event);
                }
            }));
        }
        tracing::info!(
            dir = %dir.display(),
            leases = restored,
            last_token,
            replay_ms = replayed.as_millis() as u64,
            load_ms = (loaded - replayed).as_millis() as u64,
            snapshot_ms = (started.elapsed() - loaded).as_millis() as u64,
            "embedded store recovered"
        );
        Ok(EmbeddedStore {
            memory,
            wal,
            wal_stats,
            limits,
            waiting: AtomicU64::new(0),
            observer,
            renewing: RenewalsUnderWay::default(),
            _dir_lock: dir_lock,
        })
    }

    /// Why the log stopped accepting writes, if it has: the store then grants nothing until the
    /// server is restarted.
    pub fn log_failure(&self) -> Option<&str> {
        self.wal_stats.failed.get().map(String::as_str)
    }

    /// Counts for metrics.
    pub fn stats(&self) -> StoreStats {
        let m = self.memory.stats();
        StoreStats {
            leases: m.leases,
            waiters: self.waiting.load(Ordering::Relaxed),
            expired_total: m.expired_total,
            syncs_total: self.wal_stats.syncs.load(Ordering::Relaxed),
            records_total: self.wal_stats.records.load(Ordering::Relaxed),
            appends_pending: self.wal_stats.pending.load(Ordering::SeqCst),
        }
    }

    /// Frees `key` whoever holds it (the admin force-release; every holder of a semaphore) and
    /// logs it like releases. Returns the newest lease it removed, `None` when the key was not
    /// held.
    pub async fn force_release(&self, key: &str) -> distlock::Result<Option<SavedLease>> {
        self.writable()?;
        // Room for a release of each holder now, taken before the table is touched (more holders
        // by the time it is are queued if the queue has room, else nothing changes).
        let room = self.wal.reserve(self.memory.holder_count(key).max(1)).await.map_err(store_error)?;
        let (freed, written) = self.memory.force_release_logged(key, |freed| {
            let records = freed.iter().map(|l| Record::Release {
                key: key.to_owned(),
                lease_id: l.lease_id.clone(),
                fencing_token: Some(l.fencing_token),
            });
            room.queue(records.collect()).map_err(store_error)
        })?;
        self.on_disk(written).await?;
        Ok(freed.into_iter().last())
    }

    /// Releases like [`Backend::release`] and returns the lease it freed (its holder and fencing
    /// token, for the release event). The release's record is queued before the table hands the
    /// key on, so it reaches the disk ahead of the next holder's grant: in the other order a
    /// crash between the two could restore both holders of a lock.
    pub async fn release_reporting(&self, key: &str, lease_id: &LeaseId) -> distlock::Result<SavedLease> {
        self.writable()?;
        // Room in the log's queue first: a backlog delays the release rather than failing it.
        let room = self.wal.reserve(1).await.map_err(store_error)?;
        let (lease, written) = self.memory.release_logged(key, lease_id, |_| {
            room.queue(vec![Record::Release {
                key: key.to_owned(),
                lease_id: lease_id.clone(),
                fencing_token: None,
            }])
            .map_err(store_error)
        })?;
        self.on_disk(written).await?;
        Ok(lease)
    }

    /// The fencing tokens of every live lease on `key`, including grants not yet on disk (which
    /// status leaves out): for tests that compare the table across a power loss.
    #[doc(hidden)]
    pub fn held_tokens(&self, key: &str) -> Vec<u64> {
        self.memory.held_tokens(key)
    }

    /// The callers waiting for `key`, first in line first.
    pub fn waiting_on(&self, key: &str) -> Vec<WaiterInfo> {
        self.memory.waiting_on(key)
    }

    /// Calls `observer` with every expiry and every caller that joins a queue.
    pub fn observe(&self, observer: Observer) {
        *self.observer.lock().unwrap_or_else(|e| e.into_inner()) = Some(observer);
    }

    /// Fail-stop: once the log has failed, every change (acquire, renewal, release,
    /// force-release, proclamation) is refused before it touches the table — also those that
    /// would not be logged (a renewal that keeps the TTL) — until the server is restarted. Reads
    /// go on.
    fn writable(&self) -> distlock::Result<()> {
        match self.log_failure() {
            Some(why) => Err(Error::Unavailable(format!(
                "embedded store: {}; restart the server once the disk is fixed",
                WalError::Closed(why.to_owned())
            ))),
            None => Ok(()),
        }
    }

    async fn log(&self, record: Record) -> distlock::Result<()> {
        self.wal.append(record).await.map_err(store_error)
    }

    async fn on_disk(&self, written: wal::Written) -> distlock::Result<()> {
        written.on_disk().await.map_err(store_error)
    }
}

/// A log error as callers see it: the store is unavailable.
fn store_error(e: WalError) -> Error {
    Error::Unavailable(format!("embedded store: {e}"))
}

/// Renewals under way, per lease.
type RenewalsUnderWay = std::sync::Mutex<std::collections::HashMap<(String, LeaseId), u32>>;

/// Counts a renewal of one lease for as long as it lives (see [`EmbeddedStore`]'s `renew`).
struct Renewing<'a> {
    map: &'a RenewalsUnderWay,
    lease: (String, LeaseId),
}

impl<'a> Renewing<'a> {
    fn enter(map: &'a RenewalsUnderWay, key: &str, lease_id: &LeaseId) -> Renewing<'a> {
        let lease = (key.to_owned(), lease_id.clone());
        *map.lock().unwrap_or_else(|e| e.into_inner()).entry(lease.clone()).or_default() += 1;
        Renewing { map, lease }
    }

    /// Whether another renewal of the lease is under way.
    fn concurrent(&self) -> bool {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).get(&self.lease).is_some_and(|&n| n > 1)
    }
}

impl Drop for Renewing<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.lease) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.lease);
            }
        }
    }
}

/// Counts a waiting caller for as long as it lives.
struct Waiting<'a>(&'a AtomicU64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A grant applied to the table but not yet on disk: if the request is dropped (client gone)
/// or logging fails, the grant is taken back instead of holding the key until its TTL.
///
/// The give-back is logged too, queued behind the grant's own record (which may already be on
/// its way to the disk) and before the table hands the place on: unlogged, a restart would
/// replay the grant alone and bring the lease back, a holder nobody knows of, beside the waiter
/// the place went to. When the log's queue is full, a task queues the release once it has room
/// and gives the grant back then.
struct Unlogged<'a> {
    store: &'a EmbeddedStore,
    key: &'a str,
    lease_id: &'a LeaseId,
    armed: bool,
}

impl Drop for Unlogged<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let release = Record::Release {
            key: self.key.to_owned(),
            lease_id: self.lease_id.clone(),
            fencing_token: None,
        };
        // After a log failure nothing more reaches the disk, so the table may give back at once.
        if self.store.wal.queue(vec![release.clone()]).is_ok() || self.store.log_failure().is_some() {
            let _ = self.store.memory.release(self.key, self.lease_id);
            return;
        }
        // The queue is full: queue the release once it has room, then give back.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let queued = self.store.wal.queue_when_room(release);
        let (memory, key, lease_id) = (self.store.memory.clone(), self.key.to_owned(), self.lease_id.clone());
        runtime.spawn(async move {
            if queued.await.is_ok() {
                let _ = memory.release(&key, &lease_id);
            }
        });
    }
}

#[async_trait]
impl Backend for EmbeddedStore {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn acquire(&self, req: AcquireRequest) -> distlock::Result<Grant> {
        self.writable()?;
        if self.memory.lease_count() >= self.limits.max_leases {
            return Err(Error::LimitExceeded(format!(
                "the server holds its maximum of {} leases",
                self.limits.max_leases
            )));
        }
        let _waiting = if req.wait.waits() {
            if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.limits.max_waiters {
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                return Err(Error::LimitExceeded(format!(
                    "the server has its maximum of {} waiting callers",
                    self.limits.max_waiters
                )));
            }
            Some(Waiting(&self.waiting))
        } else {
            None
        };
        let (key, holder, ttl, limit, value) =
            (req.key.clone(), req.holder.clone(), req.ttl, req.limit, req.value.clone());
        let shared = req.mode == distlock::LockMode::Shared;
        let grant = self.memory.acquire(req).await?;
        let lease_id = grant.lease_id.clone();
        let mut unlogged = Unlogged { store: self, key: &key, lease_id: &lease_id, armed: true };
        self.log(Record::Acquire(SavedLease {
            key: key.clone(),
            lease_id: lease_id.clone(),
            holder,
            ttl_ms: ttl.as_millis() as u64,
            fencing_token: grant.fencing_token,
            limit,
            shared,
            value,
        }))
        .await?;
        unlogged.armed = false;
        if !self.memory.confirm(&key, grant.fencing_token) {
            // Freed before it was confirmed (an operator's force-release, or an expiry while the
            // disk stalled): that release may have reached the log ahead of this grant's record,
            // and replay would then bring the lease back. Logged again, after the grant.
            let token = Some(grant.fencing_token);
            self.log(Record::Release { key: key.clone(), lease_id: lease_id.clone(), fencing_token: token })
                .await?;
        }
        Ok(grant)
    }

    /// A renewal that keeps the TTL is not logged, unless another renewal of the same lease is
    /// under way: that one may have changed the TTL in the table without its record being on
    /// disk yet, and this answer would rest on it (tests/simulation.rs, seed 175: a renewal to
    /// 1000 ms stalled in the log, a second renewal found 1000 ms, was answered at once, and
    /// after a power loss the lease came back with its logged 300 ms, lost before the deadline
    /// its holder had been given). Logging this one too makes the TTL it answers durable.
    async fn renew(&self, key: &str, lease_id: &LeaseId, ttl: Option<Duration>) -> distlock::Result<Grant> {
        self.writable()?;
        // Counted before the table changes, so a concurrent renewal that reads the change also
        // sees the count.
        let renewing = Renewing::enter(&self.renewing, key, lease_id);
        let (grant, before) = self.memory.renew_reporting(key, lease_id, ttl)?;
        if before != grant.ttl || renewing.concurrent() {
            self.log(Record::Renew {
                key: key.to_owned(),
                lease_id: lease_id.clone(),
                ttl_ms: grant.ttl.as_millis() as u64,
            })
            .await?;
        }
        Ok(grant)
    }

    async fn release(&self, key: &str, lease_id: &LeaseId) -> distlock::Result<()> {
        self.writable()?;
        if distlock::planted::active(distlock::planted::Bug::ReleaseWithoutLeaseId) {
            return EmbeddedStore::force_release(self, key).await.map(drop);
        }
        self.release_reporting(key, lease_id).await.map(drop)
    }

    /// Shows grants only once they are on disk, waiting for those in flight at the call (see
    /// [`Engine::settled_status`]).
    async fn status(&self, key: &str) -> distlock::Result<LockInfo> {
        self.memory.settled_status(key).await
    }

    /// Ranges over the ordered table from the cursor (see [`Engine::list`]); each key is shown
    /// up to its oldest grant not yet on disk, without waiting for it.
    async fn list(&self, query: &ListQuery) -> distlock::Result<LockPage> {
        Ok(self.memory.list(query))
    }

    fn offers(&self) -> distlock::Offers {
        distlock::Offers {
            waiters: true,
            force_release: true,
            events: false,
            many_holders: true,
            elections: true,
        }
    }

    /// Replaces the value in the table, then logs it; answered once on disk.
    async fn proclaim(&self, key: &str, lease_id: &LeaseId, value: &str) -> distlock::Result<()> {
        self.writable()?;
        self.memory.proclaim(key, lease_id, value)?;
        self.log(Record::Proclaim {
            key: key.to_owned(),
            lease_id: lease_id.clone(),
            value: value.to_owned(),
        })
        .await
    }

    async fn watch(&self, key: &str) -> distlock::Result<Box<dyn distlock::StatusWatch>> {
        Ok(Box::new(self.memory.watch(key)))
    }

    async fn waiters(&self, key: &str) -> distlock::Result<Vec<WaiterInfo>> {
        Ok(self.waiting_on(key))
    }

    /// As [`EmbeddedStore::force_release`], answering the holder and token it freed.
    async fn force_release(&self, key: &str) -> distlock::Result<Option<LockInfo>> {
        let freed = EmbeddedStore::force_release(self, key).await?;
        Ok(freed.map(|lease| LockInfo {
            holder: Some(lease.holder),
            fencing_token: Some(lease.fencing_token),
            ..LockInfo::free(key, 0)
        }))
    }
}
