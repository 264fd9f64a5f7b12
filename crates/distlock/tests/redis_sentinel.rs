//! Redis behind Sentinel: a master, a replica and three sentinels started here on loopback
//! (`redis-server --sentinel`, the same binary). The backend finds the master, follows a forced
//! failover while leases are held, and with `min_replicas` never acknowledges a grant that a
//! failover could forget.
#![cfg(feature = "redis")]

mod support;

use std::time::{Duration, Instant};

use distlock::{AcquireOptions, Error, Locker};
use support::free_port;
use support::topologies::{abandoned_place_is_cleaned, online_replica, raw, until, Group, MASTER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_failover_without_losing_acknowledged_leases() {
    let group = tokio::task::spawn_blocking(Group::start).await.unwrap();
    let locker = Locker::open(&group.url("min_replicas=1")).await.expect("open through the sentinels");
    let opts = AcquireOptions::new().ttl(Duration::from_secs(20)).holder("before-failover");
    let mut leases = Vec::new();
    for i in 0..5 {
        leases.push(
            locker.acquire(&format!("job/{i}"), &opts).await.expect("acquire, acknowledged by the replica"),
        );
    }
    // Semaphore permits and a leader with its value, acknowledged the same way.
    let permit = opts.clone().limit(2);
    let permits = [
        locker.acquire("pool", &permit).await.expect("a permit, acknowledged"),
        locker.acquire("pool", &permit).await.expect("a permit, acknowledged"),
    ];
    let leader = locker.campaign("leader", "addr-a", &opts).await.expect("a campaign, acknowledged");
    let highest = leases.iter().map(|l| l.fencing_token()).max().unwrap_or(0);
    assert!(group.master_port().contains(&group.master.port.to_string()));

    let reply = raw(group.sentinels[0].port, &format!("SENTINEL FAILOVER {MASTER}"));
    assert!(reply.starts_with("+OK"), "SENTINEL FAILOVER: {reply}");
    let replica_port = group.replica.port.to_string();
    tokio::task::spawn_blocking({
        let sentinel = group.sentinels[0].port;
        move || {
            until("the replica promoted", Duration::from_secs(20), || {
                raw(sentinel, &format!("SENTINEL get-master-addr-by-name {MASTER}")).contains(&replica_port)
                    && raw(replica_port.parse().unwrap_or(0), "ROLE").contains("master")
            })
        }
    })
    .await
    .unwrap();

    // Every lease acknowledged before the failover is still held, on the new master.
    let deadline = Instant::now() + Duration::from_secs(15);
    for lease in &leases {
        loop {
            match locker.status(lease.key()).await {
                Ok(info) => {
                    assert!(info.held, "{} lost in the failover", lease.key());
                    assert_eq!(info.fencing_token, Some(lease.fencing_token()));
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "status after the failover: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let pool = locker.status("pool").await.expect("status of the semaphore");
    let tokens: Vec<u64> = pool.holders.iter().map(|h| h.fencing_token).collect();
    assert_eq!(tokens, permits.iter().map(|l| l.fencing_token()).collect::<Vec<_>>(), "both permits kept");
    let leads = locker.leader("leader").await.expect("leader").expect("still leads");
    assert_eq!((leads.value.as_str(), leads.fencing_token), ("addr-a", leader.fencing_token()));
    // With min_replicas=1 a renewal counts once a replica holds it: the new master has one when
    // the sentinels have turned the old master into its replica (well within the 20 s TTL).
    let (old, new) = (group.master.port, group.replica.port);
    tokio::task::spawn_blocking(move || {
        until("the old master follows the new one", Duration::from_secs(30), || online_replica(new, old))
    })
    .await
    .unwrap();
    for lease in leases.iter().chain(&permits).chain([leader.lease()]) {
        lease.renew().await.expect("renewed on the new master");
        assert!(lease.is_held());
    }
    assert!(matches!(locker.acquire("job/0", &AcquireOptions::new()).await, Err(Error::Held { .. })));
    // Tokens keep rising on the new master. (min_replicas=1 now has no replica to wait for until
    // the old master rejoins as one; ask for none here.)
    let after = Locker::open(&group.url("min_replicas=0")).await.unwrap();
    let fresh = after.acquire("job/new", &AcquireOptions::new()).await.expect("acquire on the new master");
    assert!(fresh.fencing_token() > highest, "{} after {highest}", fresh.fencing_token());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_without_enough_replicas_is_undone() {
    let group = tokio::task::spawn_blocking(Group::start).await.unwrap();
    let locker = Locker::open(&group.url("min_replicas=2&wait_timeout=200ms")).await.unwrap();
    match locker.acquire("k", &AcquireOptions::new()).await {
        Err(Error::Unavailable(m)) => assert!(m.contains("fewer replicas than min_replicas"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // While a grant waits for replicas, the backend's other calls are not held up behind WAIT.
    let slow = Locker::open(&group.url("min_replicas=2&wait_timeout=2s")).await.unwrap();
    let pending = tokio::spawn({
        let slow = slow.clone();
        async move { slow.acquire("w", &AcquireOptions::new()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    slow.status("other").await.expect("status while a grant waits");
    assert!(asked.elapsed() < Duration::from_millis(1000), "status waited {:?}", asked.elapsed());
    assert!(matches!(pending.await.unwrap(), Err(Error::Unavailable(_))));
    let plain = Locker::open(&group.url("")).await.unwrap();
    assert!(!plain.status("k").await.unwrap().held, "the grant was taken back");
    assert!(plain.acquire("k", &AcquireOptions::new()).await.is_ok());
    assert!(matches!(
        Locker::open(&format!("redis-sentinel://127.0.0.1:{}/{MASTER}?timeout=300ms", free_port())).await,
        Err(Error::Unavailable(_))
    ));
}

/// Wake-ups follow the master: after the master is gone and the sentinels promoted the replica,
/// a waiter is woken by the release through the new master, not by its fallback timer.
/// `queue_ttl=30s` puts that timer 10 s out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_follow_the_master_after_it_is_gone() {
    let group = tokio::task::spawn_blocking(Group::start).await.unwrap();
    let locker = Locker::open(&group.url("min_replicas=0&queue_ttl=30s")).await.expect("open");
    let _ = raw(group.master.port, "SHUTDOWN NOSAVE");
    let replica_port = group.replica.port.to_string();
    tokio::task::spawn_blocking({
        let sentinel = group.sentinels[0].port;
        move || {
            until("the replica promoted", Duration::from_secs(30), || {
                raw(sentinel, &format!("SENTINEL get-master-addr-by-name {MASTER}")).contains(&replica_port)
                    && raw(replica_port.parse().unwrap_or(0), "ROLE").contains("master")
            })
        }
    })
    .await
    .unwrap();

    support::release_wakes_its_waiter(&locker, "job").await;
}

/// With `min_replicas`, a renewal counts only once enough replicas hold it. A renewal the master
/// applied but no replica has is forgotten by a failover: the promoted replica expires the lock
/// at the earlier deadline while the holder counts on the later one (the fault suite saw a
/// lease disowned 561 ms before its holder's deadline after `SENTINEL FAILOVER`). Here the
/// replica is stopped (SIGSTOP): the renewal answers `Unavailable` and the holder keeps its
/// earlier deadline; once the replica is back, a renewal counts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_without_enough_replicas_does_not_count() {
    let group = tokio::task::spawn_blocking(Group::start).await.unwrap();
    let locker = Locker::open(&group.url("min_replicas=1&wait_timeout=300ms")).await.unwrap();
    let opts = AcquireOptions::new().ttl(Duration::from_secs(20)).auto_renew(false);
    let lease = locker.acquire("renewed", &opts).await.expect("acquire, acknowledged by the replica");
    let before = lease.safe_until();
    group.replica.signal("-STOP");
    let renewed = lease.renew().await;
    group.replica.signal("-CONT");
    match renewed {
        Err(Error::Unavailable(m)) => assert!(m.contains("renewal"), "{m}"),
        other => panic!("a renewal no replica acknowledged must not count: {other:?}"),
    }
    assert_eq!(lease.safe_until(), before, "the holder keeps its earlier deadline");
    assert!(lease.is_held());
    lease.renew().await.expect("acknowledged once the replica is back");
    assert!(lease.safe_until() > before);
}

/// A caller that gives up waiting while the replica lags is taken out of the queue at once,
/// even on a master that has lost its scripts (see [`abandoned_place_is_cleaned`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_place_is_cleaned_while_the_replica_lags() {
    let group = tokio::task::spawn_blocking(Group::start).await.unwrap();
    let (replicas, masters) = (std::slice::from_ref(&group.replica), std::slice::from_ref(&group.master));
    abandoned_place_is_cleaned(|params| group.url(params), replicas, masters, group.master.port).await;
}
