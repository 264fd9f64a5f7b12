//! The lock server over etcd with nothing missing: `serve --store etcd://…` lists a lock's
//! waiters in queue order (every client's, not only its own), force-releases for an admin, and
//! shows every expiry, grant and release made through any server in front of the same cluster.

mod common;

use std::time::Duration;

use common::support::EtcdCluster;
use common::Server;
use distlock::{AcquireOptions, Locker, LossReason};
use serde_json::Value;
use tokio::time::Instant;

const ADMIN: &str = "etcd-store-admin";

/// A server in front of `etcd` (prefix `front`), with an admin token.
fn front(etcd: &EtcdCluster, dir: &tempfile::TempDir) -> Server {
    let admins = dir.path().join("admins");
    std::fs::write(&admins, format!("{ADMIN}\n")).expect("admin file");
    let store = format!("--store={}?timeout=3s&prefix=front", etcd.url());
    Server::start(&[&store, "--admin-token-file", admins.to_str().expect("path")])
}

async fn call(server: &Server, post: bool, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let client = reqwest::Client::new();
    let url = format!("{}{path}", server.url());
    let mut req = if post { client.post(url).body(body.to_owned()) } else { client.get(url) };
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn until<F: std::future::Future<Output = bool>>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn waiter(locker: &Locker, holder: &str) -> tokio::task::JoinHandle<distlock::Result<distlock::Lease>> {
    let (locker, opts) = (locker.clone(), AcquireOptions::new().holder(holder).wait(Duration::from_secs(30)));
    tokio::spawn(async move { locker.acquire("k", &opts).await })
}

/// Waiters in queue order — through this server, and straight from another etcd client — and an
/// admin's force-release: the holder is freed (its next renewal finds the lease lost), the first
/// waiter is granted at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_and_force_release_over_etcd() {
    let etcd = EtcdCluster::start(1);
    let dir = tempfile::tempdir().expect("dir");
    let server = front(&etcd, &dir);
    let via_server = server.locker().await;
    let direct = Locker::open(&format!("{}?prefix=front", etcd.url())).await.expect("etcd locker");
    let opts = AcquireOptions::new().holder("alpha").ttl(Duration::from_secs(5));
    let alpha = via_server.acquire("k", &opts).await.expect("acquire");
    let mut waiters = Vec::new();
    for (i, (locker, holder)) in
        [(&via_server, "beta"), (&direct, "gamma"), (&via_server, "delta")].into_iter().enumerate()
    {
        waiters.push(waiter(locker, holder));
        distlock_testkit::contract::until_waiters(&via_server, "k", i as u64 + 1).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, body) = call(&server, false, "/v1/locks/k/waiters", None, "").await;
    assert_eq!(s, 200, "{body}");
    let queue: Vec<(&str, u64)> = body["waiters"]
        .as_array()
        .expect("waiters")
        .iter()
        .map(|w| (w["holder"].as_str().unwrap_or(""), w["waiting_ms"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(queue.iter().map(|w| w.0).collect::<Vec<_>>(), ["beta", "gamma", "delta"], "{body}");
    assert!(queue.iter().all(|w| w.1 >= 100), "every waiter's wait is known: {body}");
    let (s, body) = call(&server, false, "/v1/locks/free/waiters", None, "").await;
    assert_eq!((s, &body["waiters"]), (200, &Value::Array(Vec::new())));

    let (s, body) = call(&server, false, "/v1/info", None, "").await;
    assert_eq!((s, &body["force_release"]), (200, &Value::Bool(true)), "{body}");
    let (s, _) = call(&server, true, "/v1/admin/locks/k/release", None, "{}").await;
    assert_eq!(s, 401, "force-release needs the admin token");
    let (s, body) = call(&server, true, "/v1/admin/locks/k/release", Some(ADMIN), "{}").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        (body["holder"].as_str(), body["fencing_token"].as_u64()),
        (Some("alpha"), Some(alpha.fencing_token()))
    );
    let beta = tokio::time::timeout(Duration::from_secs(3), waiters.remove(0))
        .await
        .expect("the first waiter is granted at once")
        .unwrap()
        .expect("beta");
    assert!(beta.fencing_token() > alpha.fencing_token());
    let reason = tokio::time::timeout(Duration::from_secs(5), alpha.lost()).await.expect("alpha learns it");
    assert_eq!(reason, LossReason::NotOwner);
    let (s, _) = call(&server, true, "/v1/admin/locks/none/release", Some(ADMIN), "{}").await;
    assert_eq!(s, 404, "not held");
    beta.release().await.expect("release");
    for w in waiters {
        w.await.unwrap().expect("served in turn").release().await.expect("release");
    }
}

/// The events of server 2 after `since`, as (kind, key, holder).
async fn events(server: &Server, since: u64) -> Vec<(String, String, String)> {
    let (_, page) = call(server, false, &format!("/v1/events?since={since}"), None, "").await;
    page["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .map(|e| {
                    let s = |f: &str| e[f].as_str().unwrap_or("").to_owned();
                    (s("kind"), s("key"), s("holder"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Two servers in front of one cluster: each shows what happened through the other — a grant, a
/// queued caller, a release and the hand-off it caused, a lease that expired unrenewed, and the
/// locks of a server killed with `kill -9` expiring with its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_sees_every_event_over_etcd() {
    let etcd = EtcdCluster::start(1);
    let dir = tempfile::tempdir().expect("dir");
    let mut one = front(&etcd, &dir);
    let two = front(&etcd, &dir);
    let seen = |kind: &'static str, key: &'static str, holder: &'static str| {
        let two = &two;
        move || async move {
            events(two, 0).await.iter().any(|(k, key2, h)| k == kind && key2 == key && h == holder)
        }
    };
    let within = Duration::from_secs(5);

    // A lease nobody renews (acquired by hand, over plain HTTP) expires on server 1's deadline.
    let (s, body) =
        call(&one, true, "/v1/locks/gone/acquire", None, r#"{"ttl_ms":1000,"holder":"crasher"}"#).await;
    assert_eq!(s, 200, "{body}");
    until(within, "server 2 sees the expiry", seen("expiry", "gone", "crasher")).await;

    // A grant, a waiter, a release and the hand-off, all through server 1.
    let locker = one.locker().await;
    let opts = AcquireOptions::new().ttl(Duration::from_secs(2));
    let first = locker.acquire("q", &opts.clone().holder("h1")).await.expect("acquire");
    until(within, "server 2 sees the grant", seen("grant", "q", "h1")).await;
    let second = {
        let (locker, opts) = (locker.clone(), opts.clone().holder("w1").wait(Duration::from_secs(20)));
        tokio::spawn(async move { locker.acquire("q", &opts).await })
    };
    until(within, "server 2 sees the waiter", seen("wait", "q", "w1")).await;
    first.release().await.expect("release");
    until(within, "server 2 sees the release", seen("release", "q", "h1")).await;
    until(within, "server 2 sees the hand-off", seen("grant", "q", "w1")).await;
    let second = second.await.unwrap().expect("granted");

    // Server 1 dies holding w1's lock: its session lapses, and server 2 reports the expiry.
    one.kill9();
    until(Duration::from_secs(10), "server 2 sees the dead server's lock expire", seen("expiry", "q", "w1"))
        .await;
    drop(second);
    let (s, body) = call(&two, false, "/v1/locks/q", None, "").await;
    assert_eq!((s, &body["held"]), (200, &Value::Bool(false)), "{body}");
}

/// A client that names both servers (`http://a,b`: calls go to the first while it answers) goes on
/// through the second when the first is killed with `kill -9`: the lease granted through the first
/// renews through the second (same token: it is the store's lease, and the store is shared), is
/// never reported lost, and is released there; the next grant gets a higher token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_two_servers_goes_on_through_the_other() {
    let etcd = EtcdCluster::start(1);
    let dir = tempfile::tempdir().expect("dir");
    let mut one = front(&etcd, &dir);
    let two = front(&etcd, &dir);
    let url = format!("http://127.0.0.1:{},127.0.0.1:{}?timeout=1s", one.port, two.port);
    let locker = Locker::open(&url).await.expect("a URL naming both servers");
    let ttl = Duration::from_secs(2);
    let lease = locker.acquire("k", &AcquireOptions::new().holder("both").ttl(ttl)).await.expect("acquire");
    one.kill9();
    // Three TTLs: without renewals through the second server the lease would be lost.
    tokio::select! {
        reason = lease.lost() => panic!("the lease was lost after its server died: {reason:?}"),
        _ = tokio::time::sleep(ttl * 3) => {}
    }
    let (s, body) = call(&two, false, "/v1/locks/k", None, "").await;
    assert_eq!(
        (s, &body["holder"], &body["fencing_token"]),
        (200, &"both".into(), &lease.fencing_token().into())
    );
    let token = lease.fencing_token();
    lease.release().await.expect("released through the second server");
    let next = locker.acquire("k", &AcquireOptions::new().ttl(ttl)).await.expect("acquire again");
    assert!(next.fencing_token() > token);
    next.release().await.expect("release");
}
