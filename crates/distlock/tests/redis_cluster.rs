//! Redis Cluster: three masters (`redis-server --cluster-enabled yes`, joined with
//! `redis-cli --cluster create`) on loopback. Locks on keys spread over every master exclude,
//! queue and wake as on one Redis; `list` sees every master; a held lock's slot migrated to
//! another master mid-lease keeps working (MOVED/ASK followed).
#![cfg(feature = "redis")]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use distlock::{AcquireOptions, Error, ListQuery, Locker};
use support::topologies::{abandoned_place_is_cleaned, raw, until, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_over_three_masters() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let locker = Locker::open(&cluster.url()).await.expect("open the cluster");
    // Keys land on every master: each one excludes, and tokens rise per key.
    let keys: Vec<String> = (0..30).map(|i| format!("job/{i}")).collect();
    let owners: std::collections::HashSet<usize> = keys
        .iter()
        .map(|k| {
            let slot: u16 = raw(cluster.nodes[0].port, &format!("CLUSTER KEYSLOT distlock:{{{k}}}:lock"))
                .trim()
                .trim_start_matches(':')
                .parse()
                .unwrap();
            cluster.owner(slot)
        })
        .collect();
    assert_eq!(owners.len(), 3, "the keys are spread over the three masters");
    let mut held = Vec::new();
    for k in &keys {
        let lease = locker.acquire(k, &AcquireOptions::new().holder("cluster")).await.expect("acquire");
        assert!(matches!(locker.acquire(k, &AcquireOptions::new()).await, Err(Error::Held { .. })));
        held.push(lease);
    }
    let page = locker.list_page(&ListQuery::prefix("job/")).await.expect("list");
    assert_eq!(page.locks.len(), 30, "list sees every master");
    // A waiter is woken by the release (pub/sub across the cluster), well before the TTL.
    let first = held.remove(0);
    let waiter = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire("job/0", &AcquireOptions::new().wait(Duration::from_secs(20))).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    let token = first.fencing_token();
    first.release().await.unwrap();
    let next = waiter.await.unwrap().expect("the waiter gets the lock");
    // The fallback timer would wake it about 1.7 s after the release (queue refresh every 2 s).
    assert!(released.elapsed() < Duration::from_secs(1), "woken by the release, not a timer");
    assert!(next.fencing_token() > token);

    // Concurrent tasks on one key never overlap.
    let inside = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (locker, inside) = (locker.clone(), inside.clone());
            tokio::spawn(async move {
                for _ in 0..20 {
                    let l = locker
                        .acquire("shared", &AcquireOptions::new().wait(Duration::from_secs(30)))
                        .await
                        .unwrap();
                    assert!(!inside.swap(true, std::sync::atomic::Ordering::SeqCst), "two holders at once");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    inside.store(false, std::sync::atomic::Ordering::SeqCst);
                    l.release().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_survives_its_slot_moving() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let locker = Locker::open(&cluster.url()).await.expect("open the cluster");
    let lease = locker.acquire("moving", &AcquireOptions::new().ttl(Duration::from_secs(30))).await.unwrap();
    let slot: u16 = raw(cluster.nodes[0].port, "CLUSTER KEYSLOT distlock:{moving}:lock")
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap();
    let from = cluster.owner(slot);
    let to = (from + 1) % 3;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.migrate(slot, from, to);
        cluster
    })
    .await
    .unwrap();
    assert_eq!(cluster.owner(slot), to);
    // The client still routes to the old owner: MOVED sends it on.
    let info = locker.status("moving").await.expect("status after the move");
    assert_eq!((info.held, info.fencing_token), (true, Some(lease.fencing_token())));
    lease.renew().await.expect("renew after the move");
    assert!(matches!(locker.acquire("moving", &AcquireOptions::new()).await, Err(Error::Held { .. })));
    let token = lease.fencing_token();
    lease.release().await.expect("release after the move");
    let again = locker.acquire("moving", &AcquireOptions::new()).await.unwrap();
    assert!(again.fencing_token() > token, "the counter moved with the slot");
}

/// Wake-ups are not pinned to the first node: with the node they subscribed at gone, a waiter of
/// a key on a live master is still woken by the release (the subscription moves to the next
/// node), not by its fallback timer. `queue_ttl=30s` puts that timer 10 s out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_move_on_when_their_node_is_gone() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    for n in &cluster.nodes {
        // The two live masters keep serving their slots while the third is down.
        assert!(raw(n.port, "CONFIG SET cluster-require-full-coverage no").starts_with("+OK"));
    }
    let locker = Locker::open(&format!("{}&queue_ttl=30s", cluster.url())).await.expect("open");
    // A waiter first, so that the pub/sub connection exists (at the first node of the URL).
    let warm = locker.acquire("warm", &AcquireOptions::new()).await.unwrap();
    let warm_waiter = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire("warm", &AcquireOptions::new().wait(Duration::from_secs(20))).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    warm.release().await.unwrap();
    warm_waiter.await.unwrap().unwrap().release().await.unwrap();

    let key = (0..100)
        .map(|i| format!("job/{i}"))
        .find(|k| {
            let slot: u16 = raw(cluster.nodes[1].port, &format!("CLUSTER KEYSLOT distlock:{{{k}}}:lock"))
                .trim()
                .trim_start_matches(':')
                .parse()
                .unwrap();
            cluster.owner(slot) != 0
        })
        .expect("a key on another master");
    let _ = raw(cluster.nodes[0].port, "SHUTDOWN NOSAVE");

    support::release_wakes_its_waiter(&locker, &key).await;
}

/// `rediss-cluster://`: a cluster that speaks TLS on its bus and to clients and asks for client
/// certificates. Locks on keys over every master exclude with rising tokens and list sees them
/// all (the client follows the TLS ports the nodes name); without a client certificate, or with
/// a CA that did not sign the nodes' certificates, every call is `Unavailable`, and TLS files on
/// a plain `redis-cluster://` URL are bad input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_with_a_ca_and_a_client_certificate() {
    let certs = tempfile::tempdir().expect("dir");
    support::make_certs(certs.path());
    let dir = certs.path().to_owned();
    let cluster = tokio::task::spawn_blocking(move || Cluster::start_tls(&dir)).await.unwrap();
    let path = |f: &str| certs.path().join(f).display().to_string();
    let nodes = format!("127.0.0.1:{},127.0.0.1:{}", cluster.tls_ports[0], cluster.tls_ports[1]);
    let base = format!("rediss-cluster://{nodes}?timeout=2s&ca={}", path("ca.pem"));
    let url = format!("{base}&cert={}&key={}", path("client.pem"), path("client.key"));
    let locker = Locker::open(&url).await.expect("open rediss-cluster://");
    let opts = AcquireOptions::new().ttl(Duration::from_secs(10));
    let mut held = Vec::new();
    for i in 0..12 {
        let key = format!("tls/{i}");
        let lease = locker.acquire(&key, &opts).await.expect("acquire over TLS");
        assert!(matches!(locker.acquire(&key, &opts).await, Err(Error::Held { .. })));
        held.push(lease);
    }
    assert_eq!(locker.list_page(&ListQuery::prefix("tls/")).await.expect("list").locks.len(), 12);
    let first = held.remove(0);
    let token = first.fencing_token();
    first.release().await.expect("release over TLS");
    assert!(locker.acquire("tls/0", &opts).await.expect("again").fencing_token() > token);

    let no_cert = Locker::open(&base).await;
    let refused = match no_cert {
        Ok(l) => l.acquire("tls/x", &opts).await.map(drop),
        Err(e) => Err(e),
    };
    assert!(matches!(refused, Err(Error::Unavailable(_))), "no client certificate: {refused:?}");
    let other = tempfile::tempdir().expect("dir");
    support::make_certs(other.path());
    let wrong = url.replace(&path("ca.pem"), &other.path().join("ca.pem").display().to_string());
    let refused = match Locker::open(&wrong).await {
        Ok(l) => l.acquire("tls/x", &opts).await.map(drop),
        Err(e) => Err(e),
    };
    assert!(matches!(refused, Err(Error::Unavailable(_))), "a CA that signed nothing here: {refused:?}");
    let plain = format!("redis-cluster://{nodes}?ca={}", path("ca.pem"));
    assert!(matches!(Locker::open(&plain).await, Err(Error::InvalidInput(_))), "{plain}");
}

/// `min_replicas` on a cluster, as behind Sentinel: a grant no replica of its master
/// acknowledges is undone (`Unavailable`, the key left free); with `min_replicas=1` every grant
/// is on its master's replica before it is answered, so `kill -9` of a master holding locks loses
/// none: its replica takes over with the same leases and tokens, and tokens keep rising.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_loses_no_acknowledged_lease_with_min_replicas() {
    let mut cluster = tokio::task::spawn_blocking(|| Cluster::start_with_replicas(1)).await.unwrap();
    let two = Locker::open(&format!("{}&min_replicas=2&wait_timeout=200ms", cluster.url())).await.unwrap();
    match two.acquire("undone", &AcquireOptions::new()).await {
        Err(Error::Unavailable(m)) => assert!(m.contains("fewer replicas than min_replicas"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let locker = Locker::open(&format!("{}&min_replicas=1", cluster.url())).await.expect("open");
    assert!(!locker.status("undone").await.unwrap().held, "the unacknowledged grant was taken back");

    let second = cluster.nodes[1].port;
    let slot_of = |k: &str| -> u16 {
        raw(second, &format!("CLUSTER KEYSLOT distlock:{{{k}}}:lock"))
            .trim()
            .trim_start_matches(':')
            .parse()
            .unwrap()
    };
    let opts = AcquireOptions::new().ttl(Duration::from_secs(30)).holder("before-failover");
    let mut leases = Vec::new();
    for i in 0..12 {
        leases.push(locker.acquire(&format!("job/{i}"), &opts).await.expect("acquire, acknowledged"));
    }
    let on_first: Vec<u16> =
        leases.iter().map(|l| slot_of(l.key())).filter(|&s| cluster.owner(s) == 0).collect();
    assert!(!on_first.is_empty(), "some locks live on the master about to be killed");
    let highest = leases.iter().map(|l| l.fencing_token()).max().unwrap_or(0);
    cluster.nodes[0].kill();
    let survivor = cluster.nodes[1].port;
    let slot = on_first[0];
    tokio::task::spawn_blocking(move || {
        until("a replica promoted", Duration::from_secs(30), || {
            raw(survivor, "CLUSTER INFO").contains("cluster_state:ok")
                && raw(survivor, "CLUSTER NODES").lines().any(|l| {
                    l.contains("master") && !l.contains("fail") && support::topologies::serves(l, slot)
                })
        })
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for lease in &leases {
        loop {
            match locker.status(lease.key()).await {
                Ok(info) => {
                    assert!(info.held, "{} lost when its master was killed", lease.key());
                    assert_eq!(info.fencing_token, Some(lease.fencing_token()), "{}", lease.key());
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "status after the failover: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(matches!(locker.acquire("job/0", &AcquireOptions::new()).await, Err(Error::Held { .. })));
    // The promoted master has no replica until the old one rejoins: ask for none here.
    let after = Locker::open(&cluster.url()).await.unwrap();
    // A key of the promoted replica: its fencing counter came over with the failover.
    let promoted = cluster.owner(on_first[0]);
    let key = (100..300)
        .map(|i| format!("job/{i}"))
        .find(|k| cluster.owner(slot_of(k)) == promoted)
        .expect("a key");
    let fresh = after.acquire(&key, &AcquireOptions::new()).await.expect("acquire after the failover");
    assert!(fresh.fencing_token() > highest, "{} after {highest}", fresh.fencing_token());
}

/// A caller that gives up waiting while the replicas lag is taken out of the queue at once,
/// even on masters that have lost their scripts (see [`abandoned_place_is_cleaned`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_place_is_cleaned_while_the_replicas_lag() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start_with_replicas(1)).await.unwrap();
    let slot: u16 = raw(cluster.nodes[0].port, "CLUSTER KEYSLOT distlock:{k}:queue")
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap();
    let queue_port = cluster.nodes[cluster.owner(slot)].port;
    let (masters, replicas) = cluster.nodes.split_at(3);
    abandoned_place_is_cleaned(|params| cluster.url_with(params), replicas, masters, queue_port).await;
}

/// Wake-ups on a cluster use sharded pub/sub: while a waiter waits, its lock's channel has a
/// shard subscriber on the master of the lock's slot and no classic subscriber anywhere, and the
/// release (an `SPUBLISH` that stays on the shard) wakes it at once, not its fallback timer
/// (`queue_ttl=30s` puts that 10 s out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_use_sharded_pub_sub() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let locker = Locker::open(&format!("{}&queue_ttl=30s", cluster.url())).await.expect("open");
    let key = "sharded/job";
    let channel = format!("distlock:{{{key}}}:wake");
    let slot: u16 = raw(cluster.nodes[0].port, &format!("CLUSTER KEYSLOT {channel}"))
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap();
    let owner = cluster.nodes[cluster.owner(slot)].port;
    let held = locker.acquire(key, &AcquireOptions::new()).await.unwrap();
    let waiter = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire(key, &AcquireOptions::new().wait(Duration::from_secs(20))).await }
    });
    let start = Instant::now();
    while !raw(owner, &format!("PUBSUB SHARDNUMSUB {channel}")).contains(":1") {
        assert!(start.elapsed() < Duration::from_secs(5), "no shard subscriber on the slot's master");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in &cluster.nodes {
        let classic = raw(n.port, &format!("PUBSUB NUMSUB {channel}"));
        assert!(classic.contains(":0"), "a classic subscriber on node {}: {classic:?}", n.port);
    }
    let released = Instant::now();
    held.release().await.unwrap();
    let lease = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").unwrap().unwrap();
    assert!(released.elapsed() < Duration::from_secs(2), "woken after {:?}", released.elapsed());
    lease.release().await.unwrap();
}

/// Semaphores, shared locks and leader elections over the cluster: every script stays in its
/// key's slot (keys spread over the three masters), `list` finds holders of several on every
/// master, and a watch learns of a proclamation and of a resignation by the sharded change
/// channel (`SPUBLISH` in the key's slot) — within seconds, where its only timer is the 30 s term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primitives_over_three_masters() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let locker = Locker::open(&cluster.url()).await.expect("open the cluster");
    let permit = AcquireOptions::new().limit(2).ttl(Duration::from_secs(30));
    let mut held = Vec::new();
    for i in 0..12 {
        let key = format!("pool/{i}");
        held.push(locker.acquire(&key, &permit).await.expect("a permit"));
        held.push(locker.acquire(&key, &permit).await.expect("a second permit"));
        let third = locker.acquire(&key, &permit).await;
        assert!(matches!(third, Err(Error::Held { .. })), "{key}: a third holder: {third:?}");
    }
    let page = locker.list_page(&ListQuery::prefix("pool/")).await.expect("list");
    assert_eq!(page.locks.len(), 12, "list sees the semaphores on every master");
    assert!(page.locks.iter().all(|l| l.limit == Some(2) && l.holders.len() == 2));
    let read = AcquireOptions::new().shared();
    let (r1, r2) =
        (locker.acquire("catalog", &read).await.unwrap(), locker.acquire("catalog", &read).await.unwrap());
    assert!(matches!(locker.acquire("catalog", &AcquireOptions::new()).await, Err(Error::Held { .. })));
    r1.release().await.unwrap();
    r2.release().await.unwrap();

    let term = AcquireOptions::new().ttl(Duration::from_secs(30)).wait(Duration::from_secs(20));
    let mut a = locker.campaign("scheduler", "addr-a", &term).await.expect("a leads");
    let mut changes = locker.observe("scheduler");
    let first = changes.next().await.expect("observe").expect("a leader");
    assert_eq!(first.value, "addr-a");
    let b = tokio::spawn({
        let (locker, term) = (locker.clone(), term.clone());
        async move { locker.campaign("scheduler", "addr-b", &term).await }
    });
    a.proclaim("addr-a2").await.expect("proclaim");
    let seen = tokio::time::timeout(Duration::from_secs(5), changes.next()).await.expect("by the message");
    assert_eq!(seen.expect("observe").map(|l| l.value).as_deref(), Some("addr-a2"));
    let a_token = a.fencing_token();
    a.resign().await.expect("resign");
    let b =
        tokio::time::timeout(Duration::from_secs(5), b).await.expect("b, by the release").unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let next =
            tokio::time::timeout_at(deadline.into(), changes.next()).await.expect("b seen by the message");
        if let Some(leader) = next.expect("observe") {
            assert_eq!((leader.value.as_str(), leader.fencing_token), ("addr-b", b.fencing_token()));
            assert!(leader.fencing_token > a_token, "tokens rise");
            break;
        }
    }
}
