//! The least-privilege Redis user of docs/DESIGN.md: every operation of the Redis and Redlock
//! backends works as that user, and the user can touch nothing outside the backend's prefix.
#![cfg(feature = "redis")]

mod support;

use std::time::Duration;

use distlock::{AcquireOptions, ListQuery, Locker};
use support::RedisServer;

/// The `ACL SETUSER` line as documented, with the password and prefix given.
fn documented_acl(password: &str, prefix: &str) -> String {
    let design = include_str!("../../../docs/DESIGN.md");
    let line =
        design.lines().find(|l| l.starts_with("ACL SETUSER distlock ")).expect("the ACL line in DESIGN.md");
    line.replace(">CHANGE-ME", &format!(">{password}")).replace("distlock:*", &format!("{prefix}:*"))
}

fn create_user(server: &RedisServer, prefix: &str) {
    let reply = server.raw(&documented_acl("s3cret", prefix));
    assert!(reply.starts_with("+OK"), "ACL SETUSER: {reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_works_as_the_documented_acl_user() {
    let server = RedisServer::start();
    create_user(&server, "distlock");
    let url = format!("redis://distlock:s3cret@127.0.0.1:{}?timeout=1s", server.port);
    let a = Locker::open(&url).await.expect("open as the ACL user");
    let b = Locker::open(&url).await.expect("open as the ACL user");
    let opts = AcquireOptions::new().ttl(Duration::from_secs(5)).holder("acl");
    let lease = a.acquire("deploy/web", &opts).await.expect("acquire");
    lease.renew().await.expect("renew");
    a.renew_lease("deploy/web", lease.lease_id(), None).await.expect("renew keeping the TTL");
    // A waiter: queue, pub/sub wake-up on release.
    let waiter = tokio::spawn(async move {
        b.acquire("deploy/web", &AcquireOptions::new().wait(Duration::from_secs(10))).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let info = a.status("deploy/web").await.expect("status");
    assert_eq!((info.held, info.waiters), (true, 1));
    let page = a
        .list_page(&ListQuery { prefix: "deploy/".into(), after: None, limit: Some(10) })
        .await
        .expect("list");
    assert_eq!(page.locks.len(), 1);
    lease.release().await.expect("release");
    let second = waiter.await.unwrap().expect("the waiter is woken and granted");
    assert!(second.fencing_token() > 1);
    second.release().await.expect("release");
    // Try-once refusal and a wait timeout (queue clean-up) also run as the user.
    let held = a.acquire("k", &opts).await.unwrap();
    assert!(a.acquire("k", &AcquireOptions::new()).await.is_err());
    assert!(a.acquire("k", &AcquireOptions::new().wait(Duration::from_millis(200))).await.is_err());
    held.release().await.unwrap();

    // Semaphores, shared locks and elections: their scripts, a waiter of a full semaphore woken
    // by a release, a timed-out one leaving the queue, a proclamation seen through a watch.
    let permit = opts.clone().limit(2);
    let (p1, p2) =
        (a.acquire("pool", &permit).await.expect("permit"), a.acquire("pool", &permit).await.unwrap());
    p1.renew().await.expect("renew a permit");
    assert!(a.acquire("pool", &permit.clone().wait(Duration::from_millis(200))).await.is_err());
    let waiter = tokio::spawn({
        let (a, permit) = (a.clone(), permit.clone());
        async move { a.acquire("pool", &permit.wait(Duration::from_secs(10))).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    p1.release().await.expect("release a permit");
    waiter.await.unwrap().expect("the waiter gets the permit").release().await.unwrap();
    p2.release().await.unwrap();
    let reader = a.acquire("catalog", &opts.clone().shared()).await.expect("a shared lock");
    assert_eq!(a.list("catalog").await.expect("list").len(), 1);
    reader.release().await.unwrap();
    let mut term = a.campaign("leader", "addr-a", &opts).await.expect("campaign");
    let mut changes = a.observe("leader");
    assert_eq!(changes.next().await.expect("observe").map(|l| l.value).as_deref(), Some("addr-a"));
    term.proclaim("addr-b").await.expect("proclaim");
    let seen = tokio::time::timeout(Duration::from_secs(5), changes.next()).await.expect("a change");
    assert_eq!(seen.expect("observe").map(|l| l.value).as_deref(), Some("addr-b"));
    term.resign().await.expect("resign");

    // Redlock over three masters with the same user.
    let masters = [RedisServer::start(), RedisServer::start(), RedisServer::start()];
    for m in &masters {
        create_user(m, "distlock");
    }
    let hosts: Vec<String> = masters.iter().map(|m| format!("127.0.0.1:{}", m.port)).collect();
    let url = format!("redlock://distlock:s3cret@{}?timeout=1s", hosts.join(","));
    let redlock = Locker::open(&url).await.expect("open redlock");
    let l = redlock.acquire("r", &opts).await.expect("redlock acquire");
    l.renew().await.expect("redlock renew");
    l.release().await.expect("redlock release");
}

#[test]
fn the_user_is_refused_outside_its_prefix() {
    let server = RedisServer::start();
    create_user(&server, "distlock");
    let outside = server.raw("SET other-app:secret x");
    assert!(outside.starts_with("+OK"), "the default user may: {outside}");
    let as_user = |cmd: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(format!("AUTH distlock s3cret\r\n{cmd}\r\n").as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    for cmd in ["GET other-app:secret", "DEL other-app:secret", "FLUSHALL", "CONFIG GET *", "KEYS *"] {
        let reply = as_user(cmd);
        assert!(reply.contains("NOPERM"), "{cmd}: {reply}");
    }
    assert!(as_user("GET distlock:{x}:lock").contains("$-1"), "its own prefix is readable");
}
