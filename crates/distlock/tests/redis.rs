//! The Redis backend against real `redis-server` processes started by the test harness.
//!
//! Two backends opened on one server stand for two processes: separate connections, separate
//! pub/sub subscribers, one queue and one fencing counter in Redis.
#![cfg(feature = "redis")]

mod support;

use std::time::Duration;

use distlock::{AcquireOptions, AcquireRequest, Error, LeaseId, Locker, LossReason};
use support::RedisServer;
use tokio::time::Instant;

async fn locker(server: &RedisServer) -> Locker {
    Locker::open(&format!("{}?prefix=dl-test&timeout=1s", server.url())).await.expect("open redis backend")
}

// Every behaviour a backend promises (crates/distlock-testkit), against its own redis-server.
distlock_testkit::contract_tests!(
    distlock_testkit::Caps { many_holders: true, elections: true, ..Default::default() },
    async {
        let server = RedisServer::start();
        (locker(&server).await, server)
    }
);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// 16 tasks over two "processes" take one key 1,000 times; the counter never loses an update and
/// tokens rise in the order of the critical sections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_16_tasks_1000_grants() {
    let server = RedisServer::start();
    let lockers = [locker(&server).await, locker(&server).await];
    support::hammer(&lockers, "counter", 16, 1000).await;
}

#[tokio::test]
async fn held_reports_holder_and_ownership_is_enforced() {
    let server = RedisServer::start();
    let (a, b) = (locker(&server).await, locker(&server).await);
    let lease = a.acquire("k", &AcquireOptions::new().holder("host-1/pid-42")).await.unwrap();
    assert_eq!(
        b.acquire("k", &AcquireOptions::new()).await.unwrap_err(),
        Error::Held { key: "k".into(), holder: Some("host-1/pid-42".into()) }
    );
    let stranger = LeaseId::generate();
    assert_eq!(
        b.renew_lease("k", &stranger, Some(Duration::from_secs(5))).await.unwrap_err(),
        Error::LeaseLost { key: "k".into(), reason: LossReason::NotOwner }
    );
    assert!(b.release_lease("k", &stranger).await.unwrap_err().is_lease_lost());
    let status = b.status("k").await.unwrap();
    assert!(status.held);
    assert_eq!(status.fencing_token, Some(lease.fencing_token()));
    assert_eq!(status.holder.as_deref(), Some("host-1/pid-42"));
    // The owner's id works from the other process too.
    b.release_lease("k", lease.lease_id()).await.unwrap();
    assert!(!b.status("k").await.unwrap().held);
    assert!(lease.release().await.unwrap_err().is_lease_lost(), "released twice");
}

/// A lock value written before the TTL was stored in it (`"<id> <token> <holder>"`) still works:
/// its holder reads right, a renew without a TTL gives it the default, and the renew stores it.
#[tokio::test]
async fn lock_values_without_a_stored_ttl_still_work() {
    let server = RedisServer::start();
    let locker = locker(&server).await;
    let id = LeaseId::generate();
    let reply = server.raw(&format!("SET dl-test:{{old}}:lock \"{id} 7 host-1 pid 42\" PX 60000"));
    assert!(reply.starts_with("+OK"), "{reply}");
    let status = locker.status("old").await.unwrap();
    assert_eq!((status.holder.as_deref(), status.fencing_token), (Some("host-1 pid 42"), Some(7)));
    let grant = locker.renew_lease("old", &id, None).await.unwrap();
    assert_eq!((grant.ttl, grant.fencing_token), (Duration::from_secs(30), 7));
    let value = server.raw("GET dl-test:{old}:lock");
    assert!(value.contains(&format!("{id} 7 30000 host-1 pid 42")), "{value}");
    assert_eq!(locker.status("old").await.unwrap().holder.as_deref(), Some("host-1 pid 42"));
    locker.release_lease("old", &id).await.unwrap();
}

#[tokio::test]
async fn expiry_lets_the_next_waiter_in() {
    let server = RedisServer::start();
    let locker = locker(&server).await;
    let crashed = LeaseId::generate();
    let start = Instant::now();
    let grant = locker
        .backend()
        .acquire(AcquireRequest {
            key: "k".into(),
            lease_id: crashed.clone(),
            holder: "crashed".into(),
            ttl: ms(600),
            wait: distlock::Wait::TryOnce,
            limit: 1,
            mode: Default::default(),
            value: None,
        })
        .await
        .unwrap();
    let lease = locker.acquire("k", &AcquireOptions::new().wait(Duration::from_secs(5))).await.unwrap();
    let waited = start.elapsed();
    assert!(waited >= ms(550) && waited < ms(2000), "got the lock after {waited:?}");
    assert!(lease.fencing_token() > grant.fencing_token);
    assert!(locker.release_lease("k", &crashed).await.unwrap_err().is_lease_lost());
}

/// Automatic renewal keeps a short lease alive far past five TTLs.
#[tokio::test]
async fn auto_renewal_past_five_ttls() {
    let server = RedisServer::start();
    let (a, b) = (locker(&server).await, locker(&server).await);
    let lease = a.acquire("k", &AcquireOptions::new().ttl(ms(400))).await.unwrap();
    for _ in 0..10 {
        tokio::time::sleep(ms(250)).await;
        assert!(matches!(b.acquire("k", &AcquireOptions::new()).await, Err(Error::Held { .. })));
    }
    assert!(lease.is_held());
    lease.release().await.unwrap();
}

/// Redis killed while a lease is held: the holder's loss signal fires before the TTL could have
/// run out in Redis, and calls fail with `Unavailable` within the timeout instead of hanging.
#[tokio::test]
async fn redis_killed_fires_loss_signal_and_unavailable() {
    let mut server = RedisServer::start();
    let locker = locker(&server).await;
    let lease = locker.acquire("k", &AcquireOptions::new().ttl(Duration::from_secs(2))).await.unwrap();
    tokio::time::sleep(ms(800)).await;
    let killed = Instant::now();
    server.kill();
    let reason = tokio::time::timeout(Duration::from_secs(5), lease.lost()).await.expect("loss signal fired");
    assert_eq!(reason, LossReason::Expired);
    assert!(killed.elapsed() < Duration::from_secs(2), "lost after {:?}", killed.elapsed());
    let start = Instant::now();
    let err = locker.acquire("other", &AcquireOptions::new()).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
    let message = err.to_string();
    assert!(message.contains(&format!("127.0.0.1:{}", server.port)) && !message.contains('\n'), "{message}");
    // After a restart the backend reconnects on its own.
    server.restart();
    let start = Instant::now();
    loop {
        match locker.acquire("k", &AcquireOptions::new()).await {
            Ok(_) => break,
            Err(Error::Unavailable(_)) if start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(ms(100)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn unreachable_redis_is_unavailable_not_a_hang() {
    let port = support::free_port();
    let locker = Locker::open(&format!("redis://127.0.0.1:{port}?timeout=500ms")).await.unwrap();
    let start = Instant::now();
    for result in [
        locker.acquire("k", &AcquireOptions::new()).await.map(drop),
        locker.acquire("k", &AcquireOptions::new().wait(Duration::from_secs(1))).await.map(drop),
        locker.status("k").await.map(drop),
    ] {
        assert!(matches!(result, Err(Error::Unavailable(_))), "{result:?}");
    }
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}

/// Every key the backend writes starts with the prefix and carries the lock's hash tag; the
/// fencing counter outlives release, so tokens keep rising.
#[tokio::test]
async fn keys_are_prefixed_and_tokens_survive_release() {
    let server = RedisServer::start();
    let locker = locker(&server).await;
    let opts = AcquireOptions::new().namespace("billing");
    let mut last = 0;
    for _ in 0..3 {
        let lease = locker.acquire("batch", &opts).await.unwrap();
        assert!(lease.fencing_token() > last);
        last = lease.fencing_token();
        lease.release().await.unwrap();
    }
    let keys = server.raw("KEYS *");
    let names: Vec<&str> = keys.lines().filter(|l| !l.starts_with(['*', '$'])).collect();
    assert!(!names.is_empty(), "{keys}");
    for name in names {
        assert!(name.starts_with("dl-test:{billing:batch}:"), "unexpected key {name}");
    }
}

#[tokio::test]
async fn status_and_list() {
    let server = RedisServer::start();
    let locker = locker(&server).await;
    let opts = AcquireOptions::new().namespace("ns").holder("me").ttl(Duration::from_secs(10));
    let _a = locker.acquire("a", &opts).await.unwrap();
    let _b = locker.acquire("b*", &opts).await.unwrap();
    let _c = locker.acquire("other", &AcquireOptions::new()).await.unwrap();
    let list = locker.list("ns:").await.unwrap();
    assert_eq!(list.iter().map(|i| i.key.as_str()).collect::<Vec<_>>(), ["ns:a", "ns:b*"]);
    assert_eq!(locker.list("ns:b*").await.unwrap().len(), 1, "glob characters are literal");
    let info = locker.status("ns:a").await.unwrap();
    assert_eq!(info.holder.as_deref(), Some("me"));
    assert!(info.expires_in.unwrap() > Duration::from_secs(8));
    assert!(!locker.status("nobody").await.unwrap().held);
    assert_eq!(locker.list("").await.unwrap().len(), 3);
    support::pages_of_ten(&locker, "pages/").await;
}

#[tokio::test]
async fn bad_urls_are_invalid_input() {
    for url in ["redis://127.0.0.1:1?timeout=soon", "redis://127.0.0.1:1?prefix=a{b", "redis://:::::"] {
        let err = Locker::open(url).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{url}: {err:?}");
    }
}

#[tokio::test]
async fn tls_with_a_ca_and_a_client_certificate() {
    use std::process::{Command, Stdio};
    let bin = support::require_binary("redis-server", "redis-server");
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path();
    support::make_certs(d);
    let port = support::free_port();
    let path = |f: &str| d.join(f).display().to_string();
    let mut child = Command::new(bin)
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--tls-cert-file", &path("server.pem"), "--tls-key-file", &path("server.key")])
        .args(["--tls-ca-cert-file", &path("ca.pem"), "--tls-auth-clients", "yes"])
        .args(["--save", "", "--appendonly", "no", "--dir", &path("")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a TLS redis-server");
    support::wait_for_port(port, Duration::from_secs(10), "TLS redis-server");
    let base = format!("rediss://127.0.0.1:{port}?timeout=2s&ca={}", path("ca.pem"));
    let url = format!("{base}&cert={}&key={}", path("client.pem"), path("client.key"));

    let locker = Locker::open(&url).await.expect("open rediss://");
    let opts = AcquireOptions::new().ttl(Duration::from_secs(5));
    let lease = locker.acquire("tls", &opts).await.expect("acquire over TLS");
    assert!(matches!(locker.acquire("tls", &opts).await, Err(Error::Held { .. })));
    let first = lease.fencing_token();
    lease.release().await.expect("release over TLS");
    assert!(locker.acquire("tls", &opts).await.expect("again").fencing_token() > first);

    // Redis asks for a client certificate: without one the connection is refused.
    let no_cert = Locker::open(&base).await.expect("open");
    assert!(matches!(no_cert.acquire("tls", &opts).await, Err(Error::Unavailable(_))));
    // A CA that did not sign the server's certificate: refused too.
    let other = tempfile::tempdir().expect("dir");
    support::make_certs(other.path());
    let wrong = url.replace(&path("ca.pem"), &other.path().join("ca.pem").display().to_string());
    assert!(matches!(
        Locker::open(&wrong).await.expect("open").acquire("x", &opts).await,
        Err(Error::Unavailable(_))
    ));
    // TLS files on a plain URL, half a client certificate, a missing file: bad input, at once.
    for bad in [
        format!("redis://127.0.0.1:{port}?ca={}", path("ca.pem")),
        format!("rediss://127.0.0.1:{port}?cert={}", path("client.pem")),
        format!("rediss://127.0.0.1:{port}?ca={}", path("missing.pem")),
    ] {
        assert!(matches!(Locker::open(&bad).await, Err(Error::InvalidInput(_))), "{bad}");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// While the lock is being handed to the first waiter (free, with a live waiter first in line,
/// before that waiter has run its acquire), status and a try-once acquire must agree: the key is
/// taken. Status said "free" while the acquire was refused — the contract suite's
/// linearizability check caught it under load. The waiter is planted here directly in Redis, so
/// the moment lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_try_once_agree_during_a_hand_off() {
    let server = RedisServer::start();
    let locker = locker(&server).await;
    server.raw("ZADD dl-test:{k}:queue 1 planted-waiter");
    server.raw("ZADD dl-test:{k}:alive 99999999999999 planted-waiter");
    let err = locker.acquire("k", &AcquireOptions::new()).await.unwrap_err();
    assert!(matches!(err, Error::Held { .. }), "a try-once acquire does not jump the queue: {err:?}");
    let info = locker.status("k").await.unwrap();
    assert!(info.held, "status must not say free while acquires are refused: {info:?}");
    assert_eq!((info.holder, info.fencing_token, info.waiters), (None, None, 1));
}

/// Redis paused while a caller joins the queue: its acquire and its first clean-ups time out,
/// and Redis runs them once it resumes. The clean-up keeps trying until Redis answers, so the
/// place the late acquire made is taken out long before `queue_ttl` and the next caller is not
/// held up (found by the fault suite's `redis / pause store`, 2026-11-23).
#[tokio::test]
async fn a_place_queued_while_redis_was_paused_is_taken_out() {
    place_queued_while_paused_is_taken_out().await;
}

async fn place_queued_while_paused_is_taken_out() {
    let server = RedisServer::start();
    let holder = Locker::open(&format!("{}?timeout=1s", server.url())).await.expect("open");
    // Loads the scripts, so the late acquire runs (rather than failing `NOSCRIPT`) on resume.
    let held =
        holder.acquire("k", &AcquireOptions::new().ttl(Duration::from_secs(30))).await.expect("acquire");
    let waiter = Locker::open(&format!("{}?timeout=300ms&queue_ttl=30s", server.url())).await.expect("open");
    assert!(matches!(waiter.status("k").await, Ok(s) if s.held), "the waiter's connection is up");

    server.signal("-STOP");
    let failed = waiter.acquire("k", &AcquireOptions::new().wait(Duration::from_secs(5))).await;
    // The first clean-ups time out as well.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.signal("-CONT");
    assert!(matches!(failed, Err(Error::Unavailable(_))), "acquire while Redis is paused: {failed:?}");

    let port = server.port;
    tokio::task::spawn_blocking(move || {
        support::topologies::until("the abandoned place taken out", Duration::from_secs(5), || {
            support::topologies::raw(port, "ZCARD distlock:{k}:queue").trim() == ":0"
        })
    })
    .await
    .expect("the check");
    let first = held.fencing_token();
    held.release().await.expect("release");
    let next = Locker::open(&format!("{}?timeout=1s", server.url())).await.expect("open");
    let wait = AcquireOptions::new().wait(Duration::from_secs(2));
    let lease = next.acquire("k", &wait).await.expect("the next caller is not held up by a place");
    assert!(lease.fencing_token() > first);
}

/// Issue 22, section 6: the planted bug "abandoned queue place" (the clean-up tried once) is
/// caught by the test above.
#[cfg(feature = "planted-bugs")]
#[test]
fn planted_abandoned_queue_place_is_caught() {
    use distlock::planted::{self, Bug};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    planted::plant(Some(Bug::AbandonedQueuePlace));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(place_queued_while_paused_is_taken_out())
    }));
    planted::plant(None);
    assert!(caught.is_err(), "the planted bug {} went unnoticed", Bug::AbandonedQueuePlace.name());
}
