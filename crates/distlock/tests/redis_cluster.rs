//! Redis Cluster: three masters (`redis-server --cluster-enabled yes`, joined with
//! `redis-cli --cluster create`) on loopback. Locks on keys spread over every master exclude,
//! queue and wake as on one Redis; `list` sees every master; a held lock's slot migrated to
//! another master mid-lease keeps working (MOVED/ASK followed).
#![cfg(feature = "redis")]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use distlock::{AcquireOptions, Error, ListQuery, Locker};
use support::{free_port, require_binary, wait_for_port};

struct Node {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One raw command (inline protocol); the raw reply.
fn raw(port: u16, command: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    let _ = s.write_all(format!("{command}\r\n").as_bytes());
    std::thread::sleep(Duration::from_millis(20));
    let mut buf = vec![0u8; 1 << 16];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The text of a bulk-string reply (`$n\r\ntext\r\n`).
fn bulk(reply: &str) -> String {
    reply.lines().nth(1).unwrap_or_default().trim().to_owned()
}

struct Cluster {
    nodes: Vec<Node>,
}

impl Cluster {
    fn start() -> Cluster {
        let server = require_binary("redis-server", "redis-server");
        let cli = require_binary("redis-cli", "redis-tools");
        let nodes: Vec<Node> = (0..3)
            .map(|_| {
                let dir = tempfile::tempdir().expect("temp dir");
                let port = free_port();
                let child = Command::new(&server)
                    .args([
                        "--port",
                        &port.to_string(),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ])
                    .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                    .arg("--cluster-config-file")
                    .arg(dir.path().join("nodes.conf"))
                    .arg("--dir")
                    .arg(dir.path())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn redis-server");
                wait_for_port(port, Duration::from_secs(5), "redis-server");
                Node { child, port, _dir: dir }
            })
            .collect();
        let mut create = Command::new(cli);
        create.args(["--cluster", "create"]);
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create.args(["--cluster-replicas", "0", "--cluster-yes"]).output().expect("redis-cli");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let start = Instant::now();
        while !nodes.iter().all(|n| raw(n.port, "CLUSTER INFO").contains("cluster_state:ok")) {
            assert!(start.elapsed() < Duration::from_secs(20), "cluster did not become ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        Cluster { nodes }
    }

    fn url(&self) -> String {
        format!(
            "redis-cluster://127.0.0.1:{},127.0.0.1:{}?timeout=2s",
            self.nodes[0].port, self.nodes[1].port
        )
    }

    /// The node (index) that serves `slot` now.
    fn owner(&self, slot: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| {
                raw(n.port, "CLUSTER NODES").lines().any(|l| l.contains("myself") && serves(l, slot))
            })
            .expect("a node serves the slot")
    }

    /// Moves `slot` with its keys from node `from` to node `to` (as `redis-cli --cluster reshard`
    /// does, step by step).
    fn migrate(&self, slot: u16, from: usize, to: usize) {
        let (src, dst) = (self.nodes[from].port, self.nodes[to].port);
        let (src_id, dst_id) = (bulk(&raw(src, "CLUSTER MYID")), bulk(&raw(dst, "CLUSTER MYID")));
        assert!(raw(dst, &format!("CLUSTER SETSLOT {slot} IMPORTING {src_id}")).starts_with("+OK"));
        assert!(raw(src, &format!("CLUSTER SETSLOT {slot} MIGRATING {dst_id}")).starts_with("+OK"));
        let keys: Vec<String> = raw(src, &format!("CLUSTER GETKEYSINSLOT {slot} 100"))
            .lines()
            .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
            .map(str::to_owned)
            .collect();
        if !keys.is_empty() {
            let reply = raw(src, &format!("MIGRATE 127.0.0.1 {dst} \"\" 0 5000 KEYS {}", keys.join(" ")));
            assert!(reply.starts_with("+OK"), "MIGRATE: {reply}");
        }
        for n in &self.nodes {
            let reply = raw(n.port, &format!("CLUSTER SETSLOT {slot} NODE {dst_id}"));
            assert!(reply.starts_with("+OK"), "SETSLOT NODE: {reply}");
        }
    }
}

/// Whether a `CLUSTER NODES` line lists `slot` among its ranges.
fn serves(line: &str, slot: u16) -> bool {
    line.split_whitespace().skip(8).any(|range| match range.split_once('-') {
        Some((a, b)) => {
            a.parse::<u16>().is_ok_and(|a| a <= slot) && b.parse::<u16>().is_ok_and(|b| slot <= b)
        }
        None => range.parse::<u16>() == Ok(slot),
    })
}

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
