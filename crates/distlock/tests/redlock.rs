//! Redlock against three real `redis-server` masters started by the test harness.
#![cfg(feature = "redis")]

mod support;

use std::time::Duration;

use distlock::{AcquireOptions, Error, LeaseId, Locker, LossReason};
use support::RedisServer;
use tokio::time::Instant;

struct Cluster {
    masters: Vec<RedisServer>,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        Cluster { masters: (0..n).map(|_| RedisServer::start()).collect() }
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self.masters.iter().map(|m| format!("127.0.0.1:{}", m.port)).collect();
        format!("redlock://{}?prefix=rl-test&timeout=300ms", hosts.join(","))
    }

    async fn locker(&self) -> Locker {
        Locker::open(&self.url()).await.expect("open redlock backend")
    }
}

// Every behaviour a backend promises (crates/distlock-testkit), against three masters of its
// own. Redlock's waiters race (no queue spans independent masters), the TTL it reports is
// less its drift allowance (1 % + 2 ms of the contract's 10-minute lease), and concurrent
// try-once contenders can split the vote and all be refused while nobody holds the lock.
distlock_testkit::contract_tests!(
    distlock_testkit::Caps {
        fifo: false,
        renew_slack: Duration::from_secs(6) + Duration::from_millis(2),
        exact_refusals: false,
        ..Default::default()
    },
    async {
        let cluster = Cluster::start(3);
        (cluster.locker().await, cluster)
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_16_tasks() {
    let cluster = Cluster::start(3);
    let lockers = [cluster.locker().await, cluster.locker().await];
    support::hammer(&lockers, "counter", 16, 300).await;
}

/// Exhaustive over which masters are already taken by someone else (as redsync's quorum test):
/// the lock is granted exactly when a majority is free.
#[tokio::test]
async fn granted_iff_a_majority_is_free() {
    let cluster = Cluster::start(3);
    let locker = cluster.locker().await;
    for mask in 0u32..8 {
        let key = format!("quorum-{mask}");
        for (i, m) in cluster.masters.iter().enumerate() {
            if mask & (1 << i) != 0 {
                let reply = m.raw(&format!("SET rl-test:{{{key}}}:lock \"other 0 clog\" PX 60000"));
                assert!(reply.starts_with("+OK"), "{reply}");
            }
        }
        let result = locker.acquire(&key, &AcquireOptions::new()).await;
        let free = 3 - mask.count_ones();
        match result {
            Ok(lease) => {
                assert!(free >= 2, "granted with only {free} free masters");
                lease.release().await.unwrap();
            }
            Err(Error::Held { holder, .. }) => {
                assert!(free < 2, "refused with {free} free masters");
                assert_eq!(holder.as_deref(), Some("clog"));
            }
            Err(e) => panic!("mask {mask}: {e}"),
        }
        // A refused attempt leaves nothing behind on the free masters.
        for (i, m) in cluster.masters.iter().enumerate() {
            if mask & (1 << i) == 0 {
                assert!(
                    m.raw(&format!("EXISTS rl-test:{{{key}}}:lock")).starts_with(":0"),
                    "mask {mask} node {i}"
                );
            }
        }
    }
}

/// One master down: locks keep working and tokens keep rising. Two down: `Unavailable`, quickly.
#[tokio::test]
async fn survives_one_master_down_not_two() {
    let mut cluster = Cluster::start(3);
    let locker = cluster.locker().await;
    let first = locker.acquire("k", &AcquireOptions::new()).await.unwrap();
    let t1 = first.fencing_token();
    first.release().await.unwrap();

    cluster.masters[0].kill();
    let second = locker.acquire("k", &AcquireOptions::new().ttl(Duration::from_secs(1))).await.unwrap();
    assert!(second.fencing_token() > t1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(second.is_held(), "renewal works with a majority");
    let t2 = second.fencing_token();
    second.release().await.unwrap();

    cluster.masters[1].kill();
    let start = Instant::now();
    let err = locker.acquire("k", &AcquireOptions::new()).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    // One line naming each failed master and its cause, without nested "backend unavailable".
    let message = err.to_string();
    for port in [cluster.masters[0].port, cluster.masters[1].port] {
        assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    }
    assert_eq!(message.matches("backend unavailable").count(), 1, "{message}");
    assert!(!message.contains('\n'), "{message}");
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());

    // The first master comes back (empty); the one with the counter is still up, so tokens
    // keep rising: the majority {0, 2} meets every earlier majority in master 2.
    cluster.masters[0].restart();
    let third = locker.acquire("k", &AcquireOptions::new().wait(Duration::from_secs(5))).await.unwrap();
    assert!(third.fencing_token() > t2, "{} after {t2}", third.fencing_token());
}

/// A status that reaches only some masters says "free" only when no grant can hold a majority:
/// a grant on masters {0, 2} with master 0 unreachable is held as far as anyone can tell, and
/// was reported free before (seen as a non-linearizable history in the fault suite's bridge cut).
#[tokio::test]
async fn status_with_a_master_unreachable_never_calls_a_possibly_held_lock_free() {
    let mut cluster = Cluster::start(3);
    let locker = cluster.locker().await;
    let lease = locker.acquire("k", &AcquireOptions::new().ttl(Duration::from_secs(60))).await.unwrap();
    let info = locker.status("k").await.unwrap();
    assert!(info.held && info.fencing_token == Some(lease.fencing_token()), "{info:?}");
    // The masters holding the grant (its token written back): a majority, maybe all three.
    let mut fenced = Vec::new();
    for (i, m) in cluster.masters.iter().enumerate() {
        let one = Locker::open(&format!("redis://127.0.0.1:{}?prefix=rl-test", m.port)).await.unwrap();
        if one.status("k").await.unwrap().fencing_token == Some(lease.fencing_token()) {
            fenced.push(i);
        }
    }
    assert!(fenced.len() >= 2, "{fenced:?}");
    let (down, keeps) = (fenced[0], fenced[1]);
    let other = 3 - down - keeps;
    // One holder of the grant unreachable, the other still holding it, the third master without
    // it: the grant may hold a majority (with the unreachable one) — not "free".
    cluster.masters[down].kill();
    cluster.masters[other].raw("DEL rl-test:{k}:lock");
    let err = locker.status("k").await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    // Gone from the remaining holder too: no grant can have a majority now.
    assert!(cluster.masters[keeps].raw("DEL rl-test:{k}:lock").starts_with(":1"));
    assert!(!locker.status("k").await.unwrap().held);
}

/// A release that reaches only a minority of the masters holding the grant is not done: the
/// grant still holds a majority until its TTL runs out. It said "released" before, and a status
/// right after saw the lock held by the lease just released (a non-linearizable history in the
/// one-hour Redlock fault run, its holder cut from a majority of five masters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_reaches_a_minority_is_not_done() {
    let cluster = Cluster::start(3);
    let locker = cluster.locker().await;
    let lease = locker.acquire("k", &AcquireOptions::new().ttl(Duration::from_secs(60))).await.unwrap();
    let token = lease.fencing_token();
    // The grant is fenced on exactly a majority (the first two to agree); written on the third
    // too, so that every master holds it and which ones the release reaches is up to the test.
    let lock = "rl-test:{k}:lock";
    let values: Vec<String> = cluster
        .masters
        .iter()
        .map(|m| m.raw(&format!("GET {lock}")).lines().nth(1).unwrap_or("").to_owned())
        .collect();
    let value = values.iter().find(|v| v.contains(&format!(" {token} "))).expect("a fenced master").clone();
    for (m, v) in cluster.masters.iter().zip(&values) {
        if *v != value {
            assert!(m.raw(&format!("SET {lock} \"{value}\" PX 60000")).starts_with("+OK"));
        }
    }
    // Two masters stop answering for a while (longer than the 300 ms timeout).
    for m in &cluster.masters[..2] {
        assert!(m.raw("CLIENT PAUSE 2000 ALL").starts_with("+OK"));
    }
    let err = lease.release().await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("released on 1 of 3 masters"), "{err}");
    // Once they answer again, the grant still holds them: held, by the lease "released".
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let info = locker.status("k").await.unwrap();
    assert!(info.held && info.fencing_token == Some(token), "{info:?}");
}

/// Five masters: with two killed locks keep working (and tokens rising, with contention);
/// with three killed they are refused as unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_masters_work_with_two_killed_refuse_with_three() {
    let mut cluster = Cluster::start(5);
    let lockers = [cluster.locker().await, cluster.locker().await];
    let before = support::hammer(&lockers, "k", 8, 50).await;
    cluster.masters[0].kill();
    cluster.masters[3].kill();
    let after = support::hammer(&lockers, "k", 8, 50).await;
    assert!(after[0] > *before.last().unwrap(), "tokens keep rising across the failures");
    cluster.masters[4].kill();
    let err = lockers[0].acquire("k", &AcquireOptions::new()).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn ownership_waiting_and_status() {
    let cluster = Cluster::start(3);
    let (a, b) = (cluster.locker().await, cluster.locker().await);
    let lease =
        a.acquire("k", &AcquireOptions::new().holder("alpha").ttl(Duration::from_secs(5))).await.unwrap();
    let info = b.status("k").await.unwrap();
    assert!(info.held);
    assert_eq!(info.holder.as_deref(), Some("alpha"));
    assert_eq!(info.fencing_token, Some(lease.fencing_token()));
    assert_eq!(b.list("").await.unwrap().len(), 1);

    let stranger = LeaseId::generate();
    assert_eq!(
        b.release_lease("k", &stranger).await.unwrap_err(),
        Error::LeaseLost { key: "k".into(), reason: LossReason::NotOwner }
    );
    assert!(b.renew_lease("k", &stranger, Some(Duration::from_secs(5))).await.unwrap_err().is_lease_lost());

    // A waiter is woken by the release (well before the 5 s TTL).
    let waiter = tokio::spawn(async move {
        let start = Instant::now();
        let lease = b.acquire("k", &AcquireOptions::new().wait(Duration::from_secs(10))).await.unwrap();
        (start.elapsed(), lease.fencing_token())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t1 = lease.fencing_token();
    lease.release().await.unwrap();
    let (waited, t2) = waiter.await.unwrap();
    assert!(waited < Duration::from_secs(2), "woken after {waited:?}");
    assert!(t2 > t1);
}

#[tokio::test]
async fn expiry_lets_the_waiter_in() {
    let cluster = Cluster::start(3);
    let (a, b) = (cluster.locker().await, cluster.locker().await);
    let lease = a
        .acquire("k", &AcquireOptions::new().ttl(Duration::from_millis(500)).auto_renew(false))
        .await
        .unwrap();
    let start = Instant::now();
    let next = b.acquire("k", &AcquireOptions::new().wait(Duration::from_secs(5))).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(next.fencing_token() > lease.fencing_token());
    assert!(!lease.is_held());
}

#[tokio::test]
async fn bad_urls_are_invalid_input() {
    for url in ["redlock://127.0.0.1:1,127.0.0.1:2", "redlock://a:1,,b:2", "redlock://a:1,b:2,c:3?drift=2"] {
        let err = Locker::open(url).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{url}: {err:?}");
    }
}

/// Automatic renewal keeps the TTL asked for: each Redlock grant subtracts its drift allowance,
/// and renewing with the grant's TTL made the lease 1 % shorter at every renewal.
#[tokio::test]
async fn automatic_renewal_does_not_shrink_the_ttl() {
    let cluster = Cluster::start(3);
    let locker = cluster.locker().await;
    let lease = locker.acquire("k", &AcquireOptions::new().ttl(Duration::from_millis(600))).await.unwrap();
    let first = lease.ttl();
    tokio::time::sleep(Duration::from_millis(2500)).await; // about a dozen renewals
    assert!(lease.is_held());
    assert_eq!(lease.ttl(), first, "renewed TTL after many renewals");
    lease.renew().await.unwrap();
    assert_eq!(lease.ttl(), first, "an explicit renew keeps it too");
}
