//! The server as a process (`distlock serve`), for what a test inside the process cannot do:
//! kill -9 and recovery from the data directory, SIGTERM, exit codes and messages of start-up
//! failures, and metrics counted exactly (the metrics recorder is process-wide).

mod common;

use common::Server;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock::{AcquireOptions, Error, Locker};
use serde_json::Value;

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// A call made while no other is out goes alone to its single route: nothing to coalesce, so no
/// batch envelope (fails if the client sends every call through `/v1/batch`).
#[tokio::test]
async fn lone_calls_use_the_single_routes() {
    let server = Server::start(&[]);
    let locker = server.locker().await;
    for i in 0..10 {
        let lease = locker.acquire(&format!("alone-{i}"), &AcquireOptions::new()).await.unwrap();
        lease.renew().await.unwrap();
        lease.release().await.unwrap();
    }
    let text = http().get(format!("{}/metrics", server.url())).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("distlock_batch_ops_total "), "no call went through a batch");
    for route in ["acquire", "renew", "release"] {
        let label = format!(
            r#"distlock_request_seconds_count{{route="/v1/locks/{{key}}/{route}",method="POST",status="200"}} 10"#
        );
        assert!(
            text.lines().any(|l| l.starts_with(&label)),
            "ten lone {route} calls on their route:\n{text}"
        );
    }
}

/// Many concurrent calls with the longest keys: the client splits them into batches under the
/// server's 64 KiB body limit (a batch over it would fail every call in it with 413).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_batches_stay_under_the_body_limit() {
    let server = Server::start(&[]);
    let locker = server.locker().await;
    let holder = "h".repeat(distlock::validate::MAX_HOLDER_CHARS);
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let (locker, holder) = (locker.clone(), holder.clone());
            tokio::spawn(async move {
                // 1024 bytes, and JSON-escaped ("\u0001") several times longer on the wire.
                let key = format!("{i:04}{}", "\u{1}".repeat(1020));
                let lease = locker.acquire(&key, &AcquireOptions::new().holder(holder)).await?;
                lease.release().await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("every call succeeds");
    }
    let text = http().get(format!("{}/metrics", server.url())).send().await.unwrap().text().await.unwrap();
    let batched: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("distlock_batch_ops_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    // Nearly all: a call that finds the client idle goes alone to its single route.
    assert!(batched >= 550.0, "the calls went through batches: {batched}");
}

/// A server that is down, or up but silent, gives `Unavailable` within the client's timeout in both
/// client modes, and the client works again once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_or_silent_server_is_unavailable() {
    let mut server = Server::start(&[]);
    // A listener that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    for mode in ["", "&batch=off"] {
        let locker = Locker::open(&format!("{}?timeout=300ms{mode}", server.url())).await.unwrap();
        let lease = locker.acquire("k", &AcquireOptions::new().ttl(Duration::from_secs(60))).await.unwrap();
        let id = lease.lease_id().clone();
        server.kill9();
        let err = locker.acquire("other", &AcquireOptions::new()).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{mode}: {err:?}");
        let err = locker.release_lease("k", &id).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{mode}: {err:?}");
        server.restart_in_place();
        // Back: the acknowledged lease survived, and the same client releases it.
        locker.release_lease("k", &id).await.unwrap();
        drop(lease);

        let quiet = Locker::open(&format!("{silent_url}?timeout=300ms{mode}")).await.unwrap();
        let start = Instant::now();
        let err = quiet.acquire("k", &AcquireOptions::new()).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{mode}: {err:?}");
        assert!(start.elapsed() < Duration::from_secs(5), "{mode}: took {:?}", start.elapsed());
    }
}

/// The client keeps connections open between calls; after the server restarts, those are found
/// closed and replaced, so the first calls after the restart succeed (nothing is reported
/// unavailable, nothing is sent twice: the lease is still held by its owner alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_connections_are_replaced_after_a_server_restart() {
    let mut server = Server::start(&[]);
    for mode in ["", "?batch=off"] {
        let locker = Locker::open(&format!("{}{mode}", server.url())).await.unwrap();
        let opts = AcquireOptions::new().ttl(Duration::from_secs(60)).auto_renew(false);
        let round = |round: usize| {
            let tasks: Vec<_> = (0..16)
                .map(|i| {
                    let (locker, opts) = (locker.clone(), opts.clone());
                    tokio::spawn(async move {
                        let key = format!("kept{mode}-{round}-{i}");
                        let lease = locker.acquire(&key, &opts).await?;
                        lease.release().await
                    })
                })
                .collect();
            async move {
                for t in tasks {
                    t.await.unwrap().unwrap();
                }
            }
        };
        round(0).await;
        let held = locker.acquire(&format!("held{mode}"), &opts).await.unwrap();
        server.restart_in_place();
        round(1).await;
        // The lease acknowledged before the restart is still this client's, and only its.
        let err = locker.acquire(&format!("held{mode}"), &opts).await.unwrap_err();
        assert!(matches!(err, Error::Held { .. }), "{mode}: {err:?}");
        held.release().await.unwrap();
    }
}

/// The log segment written last (segments are preallocated full of zeros, so later ones may
/// exist unwritten) and where its records end.
fn segment(dir: &Path) -> (PathBuf, usize) {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.into_iter()
        .rev()
        .find_map(|p| {
            // Records are JSON, so the last byte of the last one is not zero; a segment without
            // records holds only its head.
            let end = std::fs::read(&p).unwrap().iter().rposition(|&b| b != 0)? + 1;
            (end > SEGMENT_HEAD).then_some((p, end))
        })
        .expect("a log segment with records")
}

/// The bytes a segment starts with (docs/SERVER.md: the frame closing an empty batch,
/// `{"batch_start":0}`, 8 bytes of header and 17 of JSON).
const SEGMENT_HEAD: usize = 25;

/// kill -9 in the middle of load: every acknowledged, unreleased lease is still held after the
/// restart with its token, released ones are free, and new tokens are above every token issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_keeps_acknowledged_leases_and_tokens() {
    let mut server = Server::start(&[]);
    let locker = server.locker().await;
    let opts = AcquireOptions::new().ttl(Duration::from_secs(3600)).auto_renew(false);
    let mut kept = Vec::new();
    for i in 0..50 {
        let lease = locker.acquire(&format!("held-{i}"), &opts).await.unwrap();
        kept.push((lease.key().to_owned(), lease.fencing_token(), lease.lease_id().clone()));
        std::mem::forget(lease);
    }
    for i in 0..20 {
        let lease = locker.acquire(&format!("gone-{i}"), &opts).await.unwrap();
        lease.release().await.unwrap();
    }
    // Load while the server dies: every acknowledged token is recorded.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for t in 0..8 {
        let (l, acked) = (server.locker().await, acked.clone());
        load.push(tokio::spawn(async move {
            let opts = AcquireOptions::new().ttl(Duration::from_secs(3600)).auto_renew(false);
            for n in 0.. {
                match l.acquire(&format!("load-{t}-{n}"), &opts).await {
                    Ok(lease) => {
                        acked.lock().unwrap().push(lease.fencing_token());
                        std::mem::forget(lease);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill9();
    for t in load {
        t.await.unwrap();
    }
    server.spawn();
    let locker = server.locker().await;
    for (key, token, id) in &kept {
        let st = locker.status(key).await.unwrap();
        assert!(st.held, "{key} lost across kill -9");
        assert_eq!(st.fencing_token, Some(*token));
        locker.renew_lease(key, id, Some(Duration::from_secs(60))).await.expect("the holder still owns it");
    }
    for i in 0..20 {
        assert!(!locker.status(&format!("gone-{i}")).await.unwrap().held);
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 10, "load made progress before the kill ({})", acked.len());
    let max_acked = acked.iter().copied().max().unwrap();
    let fresh = locker.acquire("after-restart", &AcquireOptions::new()).await.unwrap();
    assert!(
        fresh.fencing_token() > max_acked,
        "token {} reissued or went back (max acked {max_acked})",
        fresh.fencing_token()
    );
}

/// A torn write at the end of the log is cut off with a warning; the rest survives. Damage in
/// the middle refuses to start with a clear message.
#[tokio::test]
async fn torn_tail_recovers_corrupt_middle_refuses() {
    let mut server = Server::start(&["--compact-bytes", "100000000"]);
    let locker = server.locker().await;
    let opts = AcquireOptions::new().ttl(Duration::from_secs(3600)).auto_renew(false);
    for i in 0..5 {
        std::mem::forget(locker.acquire(&format!("k{i}"), &opts).await.unwrap());
    }
    server.kill9();
    // A frame cut short where the next record would have gone.
    let (log, end) = segment(&server.dir);
    let mut bytes = std::fs::read(&log).unwrap();
    let torn = [200, 0, 0, 0, 1, 2, 3, 4, b'{', b'"'];
    bytes.truncate(end);
    bytes.extend_from_slice(&torn);
    bytes.resize(bytes.len().max(std::fs::metadata(&log).unwrap().len() as usize), 0);
    std::fs::write(&log, &bytes).unwrap();
    server.spawn();
    let locker = server.locker().await;
    for i in 0..5 {
        assert!(locker.status(&format!("k{i}")).await.unwrap().held);
    }
    let later = locker.acquire("k-later", &opts).await.unwrap();
    assert_eq!(later.fencing_token(), 6);
    std::mem::forget(later);
    for i in 0..3 {
        std::mem::forget(locker.acquire(&format!("k-more-{i}"), &opts).await.unwrap());
    }
    // Flip a byte inside the first record of the current segment (more records follow it).
    server.kill9();
    let (log, end) = segment(&server.dir);
    let mut bytes = std::fs::read(&log).unwrap();
    assert!(end > SEGMENT_HEAD + 40, "segment has records");
    bytes[SEGMENT_HEAD + 20] ^= 0x55;
    std::fs::write(&log, &bytes).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&server.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("the server started on a log with a corrupt middle");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(stderr.contains("corrupt") && stderr.contains("refusing to start"), "{stderr}");
}

/// Compaction keeps the data directory to the live leases: after many acquire/release cycles the
/// log is small, and a restart restores exactly the live leases.
#[tokio::test]
async fn compaction_follows_live_leases() {
    let mut server = Server::start(&["--compact-bytes", "20000"]);
    let locker = server.locker().await;
    let opts = AcquireOptions::new().ttl(Duration::from_secs(3600)).auto_renew(false);
    let keep = locker.acquire("keep", &opts).await.unwrap();
    let keep_token = keep.fencing_token();
    std::mem::forget(keep);
    for i in 0..400 {
        let l = locker.acquire(&format!("churn-{}", i % 7), &opts).await.unwrap();
        l.release().await.unwrap();
    }
    let total: u64 =
        std::fs::read_dir(&server.dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(total < 60_000, "data dir is {total} bytes after compaction");
    server.restart();
    let locker = server.locker().await;
    let list = locker.list("").await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].fencing_token, Some(keep_token));
    assert!(locker.acquire("new", &opts).await.unwrap().fencing_token() > 401);
}

/// SIGTERM shuts down cleanly (exit 0) and the data survives.
#[tokio::test]
async fn sigterm_is_graceful() {
    let mut server = Server::start(&[]);
    let locker = server.locker().await;
    std::mem::forget(
        locker
            .acquire("k", &AcquireOptions::new().ttl(Duration::from_secs(600)).auto_renew(false))
            .await
            .unwrap(),
    );
    let mut child = server.child.take().unwrap();
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    server.spawn();
    assert!(server.locker().await.status("k").await.unwrap().held);
}

/// On SIGTERM a waiting acquire is answered at once with a retryable 503 `shutting_down`
/// (`Retry-After: 1`) — not held for the whole `--shutdown-grace` — and the library client reports
/// it as `Unavailable`, saying that the server is restarting; the server then exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_waiting_acquires_at_once() {
    let mut server = Server::start(&["--shutdown-grace", "30s"]);
    let locker = server.locker().await;
    let opts = AcquireOptions::new().ttl(Duration::from_secs(600)).auto_renew(false).holder("holder");
    std::mem::forget(locker.acquire("k", &opts).await.unwrap());
    let url = server.url();
    let raw = tokio::spawn(async move {
        let r = http().post(format!("{url}/v1/locks/k/acquire")).body(r#"{"wait_ms":60000}"#).send().await;
        let r = r.expect("an answer, not a dropped connection");
        let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap_or("").to_owned());
        (r.status().as_u16(), retry_after, r.json::<Value>().await.unwrap_or(Value::Null))
    });
    let waiter = server.locker().await;
    let library = tokio::spawn(async move {
        waiter.acquire("k", &AcquireOptions::new().wait(Duration::from_secs(60))).await
    });
    let start = Instant::now();
    while locker.status("k").await.unwrap().waiters != 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "the two waiters did not queue");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut child = server.child.take().unwrap();
    let stopped_at = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let (status, retry_after, body) = tokio::time::timeout(Duration::from_secs(5), raw)
        .await
        .expect("the waiting acquire was held instead of answered at once")
        .unwrap();
    assert_eq!((status, code(&body), retry_after.as_deref()), (503, "shutting_down", Some("1")), "{body}");
    let err = tokio::time::timeout(Duration::from_secs(5), library).await.expect("answered at once").unwrap();
    match err {
        Err(Error::Unavailable(m)) => assert!(m.contains("restarting"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(stopped_at.elapsed() < Duration::from_secs(10), "did not stop well within the 30 s grace");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
    assert!(stopped_at.elapsed() < Duration::from_secs(10));
}

/// A busy `--listen` port fails start-up before the data directory is touched: exit 1, and a data
/// directory that did not exist still does not.
#[tokio::test]
async fn busy_port_fails_before_touching_the_data_dir() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("not-yet").join("data");
    let output = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&port.to_string()), "the message names the address: {stderr}");
    assert!(!tmp.path().join("not-yet").exists(), "the data directory was created: {stderr}");
}

/// Two servers on one data directory would each grant the same locks: the second refuses to
/// start while the first runs, and starts once the first is gone (even after `kill -9`).
#[tokio::test]
async fn one_server_per_data_directory() {
    let mut server = Server::start(&[]);
    let output = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&server.dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use by another distlock server"), "{stderr}");
    assert!(server.locker().await.status("k").await.is_ok(), "the first server keeps serving");
    server.restart_in_place();
    assert!(server.locker().await.status("k").await.is_ok(), "free again after kill -9");
}

/// `--store memory://` is refused by `distlock serve` (the server's own check; see server.rs):
/// nothing is created.
#[tokio::test]
async fn memory_store_is_refused_by_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let output = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["serve", "--store", "memory://", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("memory://"), "{stderr}");
    assert!(!dir.exists(), "nothing was created");
}
