//! Redis fencing tokens that never go back — across a restart with no persistence and across the
//! expiry of a key's counter — and memory that returns to its baseline after `meta_ttl`.
#![cfg(feature = "redis")]

mod support;

use std::time::{Duration, Instant};

use distlock::{AcquireOptions, Locker};
use futures_util::StreamExt;
use support::RedisServer;

fn dbsize(server: &RedisServer) -> u64 {
    let reply = server.raw("DBSIZE");
    reply.trim().trim_start_matches(':').parse().unwrap_or_else(|_| panic!("DBSIZE: {reply}"))
}

async fn token_of(locker: &Locker, key: &str) -> u64 {
    let lease = locker.acquire(key, &AcquireOptions::new()).await.expect("acquire");
    let token = lease.fencing_token();
    lease.release().await.expect("release");
    token
}

#[tokio::test]
async fn tokens_rise_across_an_empty_restart() {
    let mut redis = RedisServer::start();
    let locker = Locker::open(&format!("{}?timeout=1s", redis.url())).await.unwrap();
    let mut last = 0;
    for _ in 0..3 {
        let t = token_of(&locker, "k").await;
        assert!(t > last, "{t} after {last}");
        last = t;
    }
    // No persistence: the restart forgets every counter. Before, the next token was 1 again.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        match locker.acquire("k", &AcquireOptions::new()).await {
            Ok(lease) => break lease.fencing_token(),
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(after > last, "token {after} after the restart, {last} before");
}

#[tokio::test]
async fn redlock_tokens_rise_when_every_master_restarts_empty() {
    let mut masters = [RedisServer::start(), RedisServer::start(), RedisServer::start()];
    let hosts: Vec<String> = masters.iter().map(|m| format!("127.0.0.1:{}", m.port)).collect();
    let locker = Locker::open(&format!("redlock://{}?timeout=1s", hosts.join(","))).await.unwrap();
    let before = token_of(&locker, "k").await;
    for m in &mut masters {
        m.restart();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        match locker.acquire("k", &AcquireOptions::new()).await {
            Ok(lease) => break lease.fencing_token(),
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(after > before, "token {after} after the restarts, {before} before");
}

#[tokio::test]
async fn tokens_rise_after_the_counter_expires() {
    let redis = RedisServer::start();
    let locker = Locker::open(&format!("{}?meta_ttl=500ms", redis.url())).await.unwrap();
    let first = token_of(&locker, "k").await;
    assert_eq!(redis.raw("EXISTS distlock:{k}:meta").trim(), ":1");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(redis.raw("EXISTS distlock:{k}:meta").trim(), ":0", "the counter expired");
    let second = token_of(&locker, "k").await;
    assert!(second > first, "token {second} after the counter expired, {first} before");
}

/// A service that locks ever new keys (one per job) must not grow Redis forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_to_baseline_after_meta_ttl() {
    let redis = RedisServer::start();
    redis.raw("SET unrelated x");
    let baseline = dbsize(&redis);
    let locker = Locker::open(&format!("{}?meta_ttl=2s&timeout=5s", redis.url())).await.unwrap();
    const KEYS: usize = 100_000;
    let started = Instant::now();
    let done = futures_util::stream::iter(0..KEYS)
        .map(|i| {
            let locker = locker.clone();
            async move { token_of(&locker, &format!("job/{i}")).await }
        })
        .buffer_unordered(64)
        .count()
        .await;
    assert_eq!(done, KEYS);
    let left = dbsize(&redis);
    assert!(left > baseline, "counters exist right after the run ({left})");
    let deadline = Instant::now() + Duration::from_secs(30);
    while dbsize(&redis) > baseline {
        assert!(
            Instant::now() < deadline,
            "{} keys left after meta_ttl, baseline {baseline}",
            dbsize(&redis)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{KEYS} unique keys locked and released in {:?}; back to {baseline} keys", started.elapsed());
}

/// Waiters keep their order when the key's counter expires under a long hold: the arrival
/// order comes from the queue itself, not from the expiring counter (before, a newcomer after
/// the expiry got number 1 again and went ahead of waiters still in line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_order_survives_the_counter_expiring() {
    let redis = RedisServer::start();
    let locker = Locker::open(&format!("{}?meta_ttl=300ms", redis.url())).await.unwrap();
    let holder = locker.acquire("k", &AcquireOptions::new().ttl(Duration::from_secs(10))).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let waiter = |name: &'static str| {
        let (locker, tx) = (locker.clone(), tx.clone());
        tokio::spawn(async move {
            let lease =
                locker.acquire("k", &AcquireOptions::new().wait(Duration::from_secs(20))).await.unwrap();
            tx.send(name).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            lease.release().await.unwrap();
        })
    };
    let a = waiter("a");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let b = waiter("b");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(redis.raw("EXISTS distlock:{k}:meta").trim(), ":0", "the counter expired while they wait");
    let c = waiter("c");
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.release().await.unwrap();
    for t in [a, b, c] {
        t.await.unwrap();
    }
    let order: Vec<&str> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    assert_eq!(order, ["a", "b", "c"]);
}
