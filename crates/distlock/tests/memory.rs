//! Behaviour of the lease API on the in-process backend: exclusion, FIFO waiting, wake-up on
//! release and expiry, ownership, automatic renewal, the loss signal, cancellation and scale.
//!
//! Time is a source of non-determinism, so most tests run on Tokio's paused clock: the runtime
//! jumps straight to the next timer when every task is idle, and elapsed times are exact.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use distlock::{
    AcquireOptions, AcquireRequest, Backend, Error, Grant, LeaseId, LeaseState, ListQuery, LockInfo,
    LockPage, Locker, LossReason, MemoryBackend,
};
use tokio::time::Instant;

mod support;

// Every behaviour a backend promises (crates/distlock-testkit), in real time.
distlock_testkit::contract_tests!(
    distlock_testkit::Caps { many_holders: true, elections: true, ..Default::default() },
    async { (Locker::open("memory://").await.expect("memory://"), ()) }
);

fn memory() -> Locker {
    Locker::with_backend(Arc::new(MemoryBackend::new().expect("inside a runtime")))
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Yields until `key` has `n` waiters queued, so tests can enqueue waiters in a known order.
async fn until_waiters(locker: &Locker, key: &str, n: u64) {
    for _ in 0..10_000 {
        if locker.status(key).await.unwrap().waiters == n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{key} never had {n} waiters");
}

/// A release wakes the waiter at once: no timer is involved (paused time does not move).
#[tokio::test(start_paused = true)]
async fn release_wakes_waiter_immediately() {
    let locker = memory();
    let holder = locker.acquire("k", &AcquireOptions::new()).await.unwrap();
    let l2 = locker.clone();
    let waiter = tokio::spawn(async move {
        let lease = l2.acquire("k", &AcquireOptions::new().wait(secs(60))).await.unwrap();
        (Instant::now(), lease.fencing_token())
    });
    until_waiters(&locker, "k", 1).await;
    let released_at = Instant::now();
    holder.release().await.unwrap();
    let (granted_at, token) = waiter.await.unwrap();
    assert_eq!(granted_at, released_at);
    assert_eq!(token, 2);
}

/// A holder that stops renewing (crashed) is expired by the store at its TTL, and the waiter is
/// woken by that expiry itself.
#[tokio::test(start_paused = true)]
async fn expiry_wakes_waiter() {
    let backend = Arc::new(MemoryBackend::new().unwrap());
    let locker = Locker::with_backend(backend.clone());
    // Grant directly on the backend: a holder with no keeper task, like a crashed process.
    let start = Instant::now();
    backend
        .acquire(AcquireRequest {
            key: "k".into(),
            lease_id: LeaseId::generate(),
            holder: "crashed".into(),
            ttl: secs(3),
            wait: distlock::Wait::TryOnce,
            limit: 1,
            mode: Default::default(),
            value: None,
        })
        .await
        .unwrap();
    let lease = locker.acquire("k", &AcquireOptions::new().wait(secs(60))).await.unwrap();
    assert_eq!(Instant::now() - start, secs(3));
    assert_eq!(lease.fencing_token(), 2);
}

/// Automatic renewal keeps the lock well past five TTLs; nobody else can take it meanwhile.
#[tokio::test(start_paused = true)]
async fn auto_renewal_keeps_lock_past_five_ttls() {
    let locker = memory();
    let lease = locker.acquire("k", &AcquireOptions::new().ttl(secs(1))).await.unwrap();
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(matches!(locker.acquire("k", &AcquireOptions::new()).await, Err(Error::Held { .. })));
    }
    assert!(lease.is_held());
    assert_eq!(lease.state(), LeaseState::Held);
    let status = locker.status("k").await.unwrap();
    assert_eq!(status.fencing_token, Some(lease.fencing_token()));
    lease.release().await.unwrap();
}

/// With renewal off, the loss signal fires at the deadline less the safety margin.
#[tokio::test(start_paused = true)]
async fn loss_signal_fires_at_deadline_without_renewal() {
    let locker = memory();
    let start = Instant::now();
    let opts = AcquireOptions::new().ttl(secs(10)).auto_renew(false).safety_margin(secs(1));
    let lease = locker.acquire("k", &opts).await.unwrap();
    assert_eq!(lease.safe_until(), start + secs(9));
    assert_eq!(lease.lost().await, LossReason::Expired);
    assert_eq!(Instant::now() - start, secs(9));
    assert!(!lease.is_held());
    // The store still holds it for one more second: the holder gave up first.
    assert!(locker.status("k").await.unwrap().held);
    assert!(lease.renew().await.unwrap_err().is_lease_lost(), "loss is final");
}

/// A backend wrapper that can be cut off, to stand for an unreachable store, or answer renewals
/// late (`slow`: the store renews at once, the answer takes 2 s to arrive).
struct Partitionable {
    inner: MemoryBackend,
    down: AtomicBool,
    slow: AtomicBool,
}

impl Partitionable {
    fn new(slow: bool) -> Arc<Partitionable> {
        Arc::new(Partitionable {
            inner: MemoryBackend::new().unwrap(),
            down: AtomicBool::new(false),
            slow: AtomicBool::new(slow),
        })
    }

    fn check(&self) -> distlock::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(Error::Unavailable("partitioned".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Backend for Partitionable {
    fn name(&self) -> &'static str {
        "partitionable"
    }
    async fn acquire(&self, req: AcquireRequest) -> distlock::Result<Grant> {
        self.check()?;
        self.inner.acquire(req).await
    }
    async fn renew(&self, key: &str, id: &LeaseId, ttl: Option<Duration>) -> distlock::Result<Grant> {
        self.check()?;
        let grant = self.inner.renew(key, id, ttl).await;
        if self.slow.load(Ordering::SeqCst) {
            tokio::time::sleep(secs(2)).await;
        }
        grant
    }
    async fn release(&self, key: &str, id: &LeaseId) -> distlock::Result<()> {
        self.check()?;
        self.inner.release(key, id).await
    }
    async fn status(&self, key: &str) -> distlock::Result<LockInfo> {
        self.inner.status(key).await
    }
    async fn list(&self, query: &ListQuery) -> distlock::Result<LockPage> {
        self.inner.list(query).await
    }
}

/// A renewal counts the holder's deadline from before it sent the request, not from its answer:
/// the store started counting the TTL when it renewed, before the answer arrived (here 2 s
/// before), and frees the key at that TTL's end.
async fn renewal_deadline_counts_from_the_request() {
    let backend = Partitionable::new(true);
    let locker = Locker::with_backend(backend.clone());
    let opts = AcquireOptions::new().ttl(secs(10)).auto_renew(false).safety_margin(Duration::ZERO);
    let lease = locker.acquire("k", &opts).await.unwrap();
    let sent = Instant::now();
    lease.renew().await.unwrap();
    assert_eq!(Instant::now() - sent, secs(2), "the answer took 2 s");
    assert!(
        lease.safe_until() <= sent + secs(10),
        "the holder counts its renewed lease until {:?} after sending; the store frees it 10 s after renewing",
        lease.safe_until() - sent
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_renewal_answer_does_not_extend_the_deadline() {
    renewal_deadline_counts_from_the_request().await;
}

/// Issue 22, section 6: the planted bug "renewal deadline counted from the answer" is caught by
/// the test above (it must fail with the bug planted on its thread).
#[cfg(feature = "planted-bugs")]
#[test]
fn planted_renewal_from_answer_is_caught() {
    use distlock::planted::{self, Bug};
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    planted::plant(Some(Bug::RenewalFromAnswer));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(renewal_deadline_counts_from_the_request())
    }));
    planted::plant(None);
    assert!(caught.is_err(), "the planted bug {} went unnoticed", Bug::RenewalFromAnswer.name());
}

/// When the store cannot be reached, renewals fail and the holder is told the lease is lost
/// before the store could grant the key to anyone else.
#[tokio::test(start_paused = true)]
async fn unreachable_store_fires_loss_before_store_expiry() {
    let backend = Partitionable::new(false);
    let locker = Locker::with_backend(backend.clone());
    let lease = locker.acquire("k", &AcquireOptions::new().ttl(secs(3))).await.unwrap();
    tokio::time::sleep(secs(5)).await; // renewed a few times
    assert!(lease.is_held());
    backend.down.store(true, Ordering::SeqCst);
    let cut = Instant::now();
    let mut watch = lease.watch();
    assert_eq!(watch.lost().await, Some(LossReason::Expired));
    let lost_at = Instant::now();
    assert!(lost_at - cut < secs(3), "lost after {:?}", lost_at - cut);
    // At that moment the store still holds the lease: nobody else can have it yet.
    let status = backend.status("k").await.unwrap();
    assert!(status.held, "store expired the lease before the holder noticed: {status:?}");
    backend.down.store(false, Ordering::SeqCst);
    let next = locker.acquire("k", &AcquireOptions::new().wait(secs(10))).await.unwrap();
    assert!(next.fencing_token() > lease.fencing_token());
}

/// When the store says the lease is gone (revoked by an operator), the next renewal fires the
/// loss signal with `NotOwner`, and `run` cancels the protected work.
#[tokio::test(start_paused = true)]
async fn revoked_lease_cancels_run() {
    let locker = memory();
    let lease = locker.acquire("k", &AcquireOptions::new().ttl(secs(3))).await.unwrap();
    locker.release_lease("k", lease.lease_id()).await.unwrap(); // revoke from outside

    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = Flag(dropped.clone());
    let start = Instant::now();
    let err = lease
        .run(async move {
            let _flag = flag;
            tokio::time::sleep(secs(3600)).await;
        })
        .await
        .unwrap_err();
    assert_eq!(err, Error::LeaseLost { key: "k".into(), reason: LossReason::NotOwner });
    assert_eq!(Instant::now() - start, secs(1), "lost at the first renewal (ttl/3)");
    assert!(dropped.load(Ordering::SeqCst), "the protected work was cancelled");
    assert!(lease.release().await.unwrap_err().is_lease_lost());
}

/// Dropping a lease releases it in the background, and the next waiter gets it.
#[tokio::test(start_paused = true)]
async fn drop_releases_in_background() {
    let locker = memory();
    let lease = locker.acquire("k", &AcquireOptions::new().ttl(secs(60))).await.unwrap();
    let l2 = locker.clone();
    let waiter = tokio::spawn(async move { l2.acquire("k", &AcquireOptions::new().wait(secs(5))).await });
    until_waiters(&locker, "k", 1).await;
    let start = Instant::now();
    drop(lease);
    let next = waiter.await.unwrap().unwrap();
    assert_eq!(Instant::now(), start);
    assert_eq!(next.fencing_token(), 2);
}

#[tokio::test(start_paused = true)]
async fn with_lock_runs_and_releases() {
    let locker = memory();
    let opts = AcquireOptions::new().namespace("billing");
    let fence = locker.with_lock("batch", &opts, |fence| async move { fence }).await.unwrap();
    assert_eq!(fence.key, "billing:batch");
    assert_eq!(fence.fencing_token, 1);
    assert!(!locker.status("billing:batch").await.unwrap().held);
}

#[tokio::test(start_paused = true)]
async fn status_and_list() {
    let locker = memory();
    let opts = AcquireOptions::new().namespace("ns").holder("me");
    let _a = locker.acquire("a", &opts).await.unwrap();
    let _b = locker.acquire("b", &opts).await.unwrap();
    let _c = locker.acquire("other", &AcquireOptions::new()).await.unwrap();
    let list = locker.list("ns:").await.unwrap();
    assert_eq!(list.iter().map(|i| i.key.as_str()).collect::<Vec<_>>(), ["ns:a", "ns:b"]);
    let info = locker.status("ns:a").await.unwrap();
    assert_eq!(info.holder.as_deref(), Some("me"));
    assert_eq!(info.expires_in, Some(secs(30)));
    let free = locker.status("nobody").await.unwrap();
    assert_eq!(free, LockInfo::free("nobody", 0));
    assert_eq!(locker.list("").await.unwrap().len(), 3);
}

#[tokio::test]
async fn invalid_input_is_refused() {
    let locker = memory();
    let cases = [
        ("", AcquireOptions::new()),
        ("a\0b", AcquireOptions::new()),
        (&*"x".repeat(1025), AcquireOptions::new()),
        ("k", AcquireOptions::new().ttl(Duration::from_millis(99))),
        ("k", AcquireOptions::new().ttl(secs(24 * 3600 + 1))),
        ("k", AcquireOptions::new().holder("line\nbreak")),
        ("k", AcquireOptions::new().ttl(secs(1)).renew_every(secs(1))),
        ("k", AcquireOptions::new().ttl(secs(1)).safety_margin(secs(2))),
        (&*"x".repeat(1020), AcquireOptions::new().namespace("long-ns")),
    ];
    for (key, opts) in cases {
        let err = locker.acquire(key, &opts).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{key:?} {opts:?}: {err:?}");
    }
    assert!(locker.list("").await.unwrap().is_empty(), "nothing was changed");
    // The bounds themselves are accepted.
    locker.acquire(&"x".repeat(1024), &AcquireOptions::new().ttl(Duration::from_millis(100))).await.unwrap();
    locker.acquire("k", &AcquireOptions::new().ttl(secs(24 * 3600))).await.unwrap();
    assert!(matches!(Locker::open("nope://x").await, Err(Error::InvalidInput(_))));
    assert!(matches!(Locker::open("localhost:7878").await, Err(Error::InvalidInput(_))));
}

/// 100,000 held leases in one table, all expiring together when their holders go away.
#[tokio::test(start_paused = true)]
async fn hundred_thousand_leases() {
    let backend = Arc::new(MemoryBackend::new().unwrap());
    for i in 0..100_000 {
        backend
            .acquire(AcquireRequest {
                key: format!("lease-{i:06}"),
                lease_id: LeaseId::generate(),
                holder: "bulk".into(),
                ttl: secs(10),
                wait: distlock::Wait::TryOnce,
                limit: 1,
                mode: Default::default(),
                value: None,
            })
            .await
            .unwrap();
    }
    assert_eq!(backend.list(&ListQuery::prefix("lease-")).await.unwrap().locks.len(), 100_000);
    // A page from a cursor deep in the table.
    let page = backend.list(&ListQuery::prefix("lease-").after("lease-099989").limit(5)).await.unwrap();
    assert_eq!((page.locks[0].key.as_str(), page.next.as_deref()), ("lease-099990", Some("lease-099994")));
    assert!(backend.status("lease-099999").await.unwrap().held);
    tokio::time::sleep(secs(11)).await;
    assert!(backend.list(&ListQuery::default()).await.unwrap().locks.is_empty());
}

/// 10,000 waiters on one key are each served once, in turn, with rising tokens.
#[tokio::test(start_paused = true)]
async fn ten_thousand_waiters_on_one_key() {
    let locker = memory();
    let first = locker.acquire("hot", &AcquireOptions::new()).await.unwrap();
    let served = Arc::new(Mutex::new(Vec::with_capacity(10_000)));
    let mut tasks = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        let (locker, served) = (locker.clone(), served.clone());
        tasks.push(tokio::spawn(async move {
            let opts = AcquireOptions::new().wait_forever().auto_renew(false);
            let lease = locker.acquire("hot", &opts).await.unwrap();
            served.lock().unwrap().push(lease.fencing_token());
            lease.release().await.unwrap();
        }));
    }
    until_waiters(&locker, "hot", 10_000).await;
    first.release().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert!(!locker.status("hot").await.unwrap().held);
    let served = served.lock().unwrap();
    assert_eq!(served.len(), 10_000);
    assert!(served.windows(2).all(|w| w[0] < w[1]));
}

/// The observer's expiry event of a semaphore's last lease carries the semaphore's limit (it was
/// read after the purge had dropped the key, and said 1).
#[tokio::test]
async fn an_expired_permit_reports_its_semaphores_limit() {
    use distlock::engine::{Engine, TableEvent};
    let engine = Engine::new().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    engine.observe(Arc::new(move |e: TableEvent<'_>| {
        if let TableEvent::Expired(lease) = e {
            sink.lock().unwrap().push(lease.limit);
        }
    }));
    let req = distlock::AcquireRequest {
        key: "pool".into(),
        lease_id: distlock::LeaseId::generate(),
        holder: "h".into(),
        ttl: Duration::from_millis(100),
        wait: distlock::Wait::TryOnce,
        limit: 3,
        mode: Default::default(),
        value: None,
    };
    engine.acquire(req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = engine.status("pool");
    assert_eq!(*seen.lock().unwrap(), [3]);
}
