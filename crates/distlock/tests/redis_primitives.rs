//! Semaphores, shared locks and leader elections on one real `redis-server`, where the contract
//! suite (run in redis.rs) cannot reach: a plain lock in the storage format of older versions
//! against the new primitives, a limit that does not match the holders', a permit whose holder
//! crashed (its permit comes back at its TTL, and nothing stays in Redis), and a watch that
//! learns of an expiry from its own timer (expiry publishes nothing).
#![cfg(feature = "redis")]

mod support;

use std::time::Duration;

use distlock::{AcquireOptions, AcquireRequest, Error, LeaseId, LockMode, Locker};
use support::RedisServer;
use tokio::time::Instant;

async fn locker(server: &RedisServer) -> Locker {
    Locker::open(&format!("{}?prefix=dl-test&timeout=1s", server.url())).await.expect("open redis backend")
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A lease granted through the backend alone: nobody renews or releases it, as if its process
/// had crashed right after the grant.
async fn crashed_grant(locker: &Locker, key: &str, limit: u32, ttl: Duration) -> u64 {
    let req = AcquireRequest {
        key: key.into(),
        lease_id: LeaseId::generate(),
        holder: "crashed".into(),
        ttl,
        wait: distlock::Wait::TryOnce,
        limit,
        mode: LockMode::Exclusive,
        value: None,
    };
    locker.backend().acquire(req).await.expect("a permit").fencing_token
}

/// A plain lock written by an older version (`"<id> <token> <holder>"`, no stored TTL) excludes a
/// shared request and a semaphore, hands the key to a waiting shared request when released, and
/// a new plain lock is still written in the format older versions read.
#[tokio::test]
async fn an_old_format_lock_excludes_the_primitives_and_hands_over_to_them() {
    let server = RedisServer::start();
    let locker = locker(&server).await;
    let id = LeaseId::generate();
    let reply = server.raw(&format!("SET dl-test:{{old}}:lock \"{id} 7 host-1\" PX 60000"));
    assert!(reply.starts_with("+OK"), "{reply}");

    let read = AcquireOptions::new().shared().holder("reader");
    let refused = locker.acquire("old", &read).await;
    assert_eq!(refused.unwrap_err(), Error::Held { key: "old".into(), holder: Some("host-1".into()) });
    let permit = locker.acquire("old", &AcquireOptions::new().limit(3)).await;
    assert_eq!(permit.unwrap_err(), Error::LimitMismatch { key: "old".into(), limit: 1 });

    let waiter = tokio::spawn({
        let (locker, read) = (locker.clone(), read.clone());
        async move { locker.acquire("old", &read.wait(Duration::from_secs(20))).await }
    });
    distlock_testkit::contract::until_waiters(&locker, "old", 1).await;
    locker.release_lease("old", &id).await.expect("the old lock's owner releases it");
    let reader = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the reader, woken by the release")
        .unwrap()
        .expect("granted");
    assert!(reader.fencing_token() > 7, "tokens rise past the old lock's");
    let info = locker.status("old").await.unwrap();
    assert_eq!((info.mode, info.holders.len()), (Some(LockMode::Shared), 1), "{info:?}");
    assert!(server.raw("EXISTS dl-test:{old}:lock").contains(":0"), "a shared lease is no lock string");
    // A plain lock is refused beside the reader, and granted once it leaves.
    assert!(matches!(locker.acquire("old", &AcquireOptions::new()).await, Err(Error::Held { .. })));
    reader.release().await.unwrap();
    let plain = locker.acquire("old", &AcquireOptions::new().ttl(ms(5000)).holder("h 1")).await.unwrap();
    let value = server.raw("GET dl-test:{old}:lock");
    let expected = format!("{} {} 5000 h 1", plain.lease_id(), plain.fencing_token());
    assert!(value.contains(&expected), "the lock string is as before: {value}");
}

/// Another limit than the holders' is refused at once with the current limit, whatever it asks
/// for (a bigger semaphore, a lock, a shared lock), waits for nothing and changes nothing.
#[tokio::test]
async fn another_limit_is_refused_at_once_and_changes_nothing() {
    let server = RedisServer::start();
    let locker = locker(&server).await;
    let three = AcquireOptions::new().limit(3).ttl(Duration::from_secs(30));
    let _a = locker.acquire("pool", &three).await.unwrap();
    let _b = locker.acquire("pool", &three).await.unwrap();
    let before = locker.status("pool").await.unwrap();
    let started = Instant::now();
    for opts in [
        three.clone().limit(5).wait(Duration::from_secs(10)),
        AcquireOptions::new().wait(Duration::from_secs(10)),
        AcquireOptions::new().shared().wait(Duration::from_secs(10)),
    ] {
        let refused = locker.acquire("pool", &opts).await;
        assert_eq!(refused.unwrap_err(), Error::LimitMismatch { key: "pool".into(), limit: 3 });
    }
    assert!(started.elapsed() < Duration::from_secs(5), "a mismatch does not wait");
    let after = locker.status("pool").await.unwrap();
    let tokens = |i: &distlock::LockInfo| i.holders.iter().map(|h| h.fencing_token).collect::<Vec<_>>();
    assert_eq!((tokens(&after), after.waiters, after.limit), (tokens(&before), 0, Some(3)));
    // The same limit still gets the free permit.
    locker.acquire("pool", &three).await.expect("the third permit");
}

/// Two permits of a semaphore of 2 taken by holders that crash: a waiter gets one when their TTL
/// ends (Redis's clock, no release), with a higher token; and once every holder is gone, the
/// key's entries leave Redis by themselves, even with nobody looking at the key.
#[tokio::test]
async fn a_crashed_holders_permit_comes_back_and_nothing_stays() {
    let server = RedisServer::start();
    let locker = locker(&server).await;
    let first = crashed_grant(&locker, "pool", 2, ms(600)).await;
    let second = crashed_grant(&locker, "pool", 2, ms(600)).await;
    let started = Instant::now();
    let opts = AcquireOptions::new().limit(2).wait(Duration::from_secs(10));
    let lease = locker.acquire("pool", &opts).await.expect("a permit, once the crashed ones lapse");
    assert!(started.elapsed() >= ms(500), "granted while both permits were held");
    assert!(lease.fencing_token() > first.max(second), "tokens rise");
    lease.release().await.unwrap();
    let gone = "EXISTS dl-test:{pool}:holders dl-test:{pool}:deadlines";
    assert!(server.raw(gone).contains(":0"), "entries left after the last holder: {}", server.raw(gone));

    // Nobody touches the key again: the entries expire a second after the last deadline.
    crashed_grant(&locker, "lonely", 2, ms(300)).await;
    let leftover = "EXISTS dl-test:{lonely}:holders dl-test:{lonely}:deadlines";
    assert!(server.raw(leftover).contains(":2"), "{}", server.raw(leftover));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.raw(leftover).contains(":0") {
        assert!(Instant::now() < deadline, "a crashed holder's entries stayed in Redis");
        tokio::time::sleep(ms(100)).await;
    }
}

/// A watch learns of a leader whose term ran out although nothing was published (expiry is
/// silent in Redis): it arms a timer at the deadline it saw. A renewal is not a change.
#[tokio::test]
async fn a_watch_sees_an_expiry_and_skips_renewals() {
    let server = RedisServer::start();
    let locker = locker(&server).await;
    let term = locker
        .campaign("leader", "addr-a", &AcquireOptions::new().ttl(ms(1500)).auto_renew(false))
        .await
        .expect("leads");
    let mut feed = locker.backend().watch("leader").await.expect("watch");
    let now = feed.next().await.expect("the status now");
    assert_eq!((now.value.as_deref(), now.fencing_token), (Some("addr-a"), Some(term.fencing_token())));
    term.lease().renew().await.expect("renew");
    let next = tokio::time::timeout(Duration::from_secs(10), feed.next()).await.expect("the expiry is seen");
    let next = next.expect("status");
    assert!(!next.held, "the next change is the expiry, not the renewal: {next:?}");
    assert!(!term.lease().is_held(), "the holder knows too");
}

/// A lease that proclaims a value on a plain lock keeps its token and its deadline, and
/// another lease cannot proclaim on it.
#[tokio::test]
async fn a_plain_lock_can_proclaim_and_a_stranger_cannot() {
    let server = RedisServer::start();
    let locker = locker(&server).await;
    let lease = locker.acquire("k", &AcquireOptions::new().ttl(Duration::from_secs(30))).await.unwrap();
    let stranger = locker.backend().proclaim("k", &LeaseId::generate(), "x").await;
    assert!(stranger.unwrap_err().is_lease_lost());
    locker.backend().proclaim("k", lease.lease_id(), "addr").await.expect("proclaim");
    let info = locker.status("k").await.unwrap();
    assert_eq!((info.value.as_deref(), info.fencing_token), (Some("addr"), Some(lease.fencing_token())));
    assert!(info.expires_in.is_some_and(|left| left > Duration::from_secs(25)), "{info:?}");
    lease.renew().await.expect("renews as before");
    lease.release().await.expect("releases as before");
    assert!(!locker.status("k").await.unwrap().held);
}

/// A semaphore of 3 shared by two "processes" (two backends: two connections, two pub/sub
/// subscribers), 12 tasks: never more than 3 holders, every token once, every waiter woken
/// across processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_across_two_processes_never_exceeds_its_limit() {
    let server = RedisServer::start();
    let lockers = [locker(&server).await, locker(&server).await];
    let opts = AcquireOptions::new().limit(3).ttl(Duration::from_secs(10)).wait(Duration::from_secs(30));
    let most = distlock_testkit::contract::semaphore_hammer(&lockers, "pool", &opts, 12, 8).await;
    assert_eq!(most, 3, "the permits were all used at once");
}

/// A permit freed while a waiter is queued is the waiter's at once, before the waiter has run
/// another call: status lists it, and a try-once caller is refused because the key is full, not
/// because of a free permit it may not take. (Before the hand-off was done in the freeing script,
/// the key showed one holder of two to status while every try-once was refused: a history no
/// order explains.) The waiter runs on a runtime of its own that the test freezes.
#[tokio::test]
async fn a_freed_permit_is_the_first_waiters_before_it_runs_again() {
    let server = RedisServer::start();
    let locker = locker(&server).await;
    let opts = AcquireOptions::new().limit(2).auto_renew(false);
    let a = locker.acquire("sem", &opts.clone().holder("a")).await.unwrap();
    let b = locker.acquire("sem", &opts.clone().holder("b")).await.unwrap();

    let url = format!("{}?prefix=dl-test&timeout=1s", server.url());
    let (freeze, frozen) = tokio::sync::oneshot::channel::<()>();
    let (thaw, thawed) = std::sync::mpsc::channel::<()>();
    let waiter = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let locker = Locker::open(&url).await.expect("open");
            let wait = opts.holder("w").wait(Duration::from_secs(20));
            let w = tokio::spawn(async move {
                let lease = locker.acquire("sem", &wait).await?;
                let token = lease.fencing_token();
                lease.release().await?;
                Ok::<u64, Error>(token)
            });
            let _ = frozen.await;
            // Blocks the runtime's only thread: the waiter cannot run until thawed.
            let _ = thawed.recv();
            w.await.expect("the waiter's task")
        })
    });
    distlock_testkit::contract::until_waiters(&locker, "sem", 1).await;
    freeze.send(()).expect("the waiter's runtime");
    a.release().await.unwrap();

    let info = locker.status("sem").await.unwrap();
    let tokens: Vec<u64> = info.holders.iter().map(|h| h.fencing_token).collect();
    assert_eq!(tokens.len(), 2, "the waiter's permit is granted by the release: {info:?}");
    assert_eq!((tokens[0], info.waiters), (b.fencing_token(), 0), "{info:?}");
    assert!(tokens[1] > b.fencing_token());
    let refused = locker.acquire("sem", &AcquireOptions::new().limit(2).holder("c")).await;
    assert!(matches!(refused, Err(Error::Held { .. })), "{refused:?}");

    thaw.send(()).expect("the waiter's runtime");
    let token = waiter.join().expect("the waiter's thread").expect("the waiter is granted");
    assert_eq!(token, tokens[1], "the waiter learns the permit status showed");
    b.release().await.unwrap();
}
