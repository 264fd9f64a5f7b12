//! Process-level tests of the `distlock` client commands against a real server (and Redis):
//! exit codes, the child's environment, signals, renewal while a child runs, a lost lock
//! stopping the child, and mutual exclusion between concurrent `distlock run` processes.

mod common;

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{support, Server};
use distlock::{AcquireOptions, Error, LeaseId, Locker};
use serde_json::Value;

fn distlock(backend: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_distlock"));
    c.env("DISTLOCK_BACKEND", backend).args(args).stdin(Stdio::null());
    c
}

fn run(backend: &str, args: &[&str]) -> Output {
    distlock(backend, args).output().expect("run distlock")
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn wait_exit(child: &mut Child, within: Duration) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s.code().unwrap_or(-1);
        }
        if start.elapsed() > within {
            let _ = child.kill();
            panic!("distlock did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn exit_codes_environment_and_output() {
    let server = Server::start(&[]);
    let b = server.url();
    let o = run(
        &b,
        &[
            "run",
            "k",
            "--",
            "sh",
            "-c",
            "echo \"$DISTLOCK_KEY $DISTLOCK_FENCING_TOKEN ${#DISTLOCK_LEASE_ID}\"",
        ],
    );
    assert_eq!((code(&o), stdout(&o).trim()), (0, "k 1 32"), "{}", stderr(&o));
    assert_eq!(code(&run(&b, &["run", "k", "--", "sh", "-c", "exit 3"])), 3);
    assert_eq!(code(&run(&b, &["run", "k", "--", "sh", "-c", "kill -9 $$"])), 137);
    assert_eq!(code(&run(&b, &["run", "k", "--", "/nonexistent/program"])), 127);

    let locker = server.locker().await;
    let held = locker.acquire("k", &AcquireOptions::new().holder("the-other-one")).await.unwrap();
    let o = run(&b, &["run", "--wait", "300ms", "k", "--", "true"]);
    assert_eq!(code(&o), 75);
    assert!(stderr(&o).contains("the-other-one"), "says who holds it: {}", stderr(&o));
    assert_eq!(code(&run(&b, &["-q", "run", "--wait", "0s", "k", "--", "true"])), 75);
    held.release().await.unwrap();

    let o = run(&b, &["acquire", "--json", "--ttl", "1m", "--holder", "script", "k2"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let lease: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let id = lease["lease_id"].as_str().unwrap().to_owned();
    assert_eq!((lease["key"].as_str(), lease["ttl_ms"].as_u64()), (Some("k2"), Some(60_000)));
    assert_eq!(code(&run(&b, &["acquire", "k2"])), 75);
    let o = run(&b, &["status", "--json", "k2"]);
    let st: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!((st["held"].as_bool(), st["holder"].as_str()), (Some(true), Some("script")));
    assert!(stdout(&run(&b, &["status", "k2"])).contains("held by script"));
    let o = run(&b, &["list", "--json"]);
    let list: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert!(stdout(&run(&b, &["list"])).contains("k2"));
    assert_eq!(code(&run(&b, &["renew", "k2", "--lease", &id, "--ttl", "2m"])), 0);
    assert_eq!(code(&run(&b, &["renew", "k2", "--lease", &LeaseId::generate().to_string()])), 76);
    assert_eq!(code(&run(&b, &["release", "k2", "--lease", &id])), 0);
    assert_eq!(code(&run(&b, &["release", "k2", "--lease", &id])), 76);
    assert!(stdout(&run(&b, &["status", "k2"])).contains("free"));

    assert_eq!(code(&run(&b, &["acquire", "--ttl", "5ms", "k3"])), 64);
    let dead = format!("http://127.0.0.1:{}?timeout=500ms", support::free_port());
    assert_eq!(code(&run(&dead, &["status", "k"])), 69);
    assert_eq!(code(&run(&b, &["--backend", "nope://x", "status", "k"])), 64);
    let o = run(&b, &["acquire", "--ttl", "soon", "k3"]);
    assert_eq!(code(&o), 2, "clap usage error");
}

/// The lease is renewed while the child runs for many TTLs; nobody else gets the lock meanwhile.
#[tokio::test]
async fn renewed_while_the_child_runs() {
    let server = Server::start(&[]);
    let mut child =
        distlock(&server.url(), &["run", "--ttl", "300ms", "k", "--", "sleep", "2"]).spawn().unwrap();
    let locker = server.locker().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..8 {
        assert!(matches!(locker.acquire("k", &AcquireOptions::new()).await, Err(Error::Held { .. })));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), 0);
    assert!(!locker.status("k").await.unwrap().held, "released after the child exited");
}

const TRAP_TERM: &str =
    "trap 'echo got-term; exit 0' TERM; echo \"$DISTLOCK_LEASE_ID\" > \"$1\"; sleep 30 & wait";

/// The lock is revoked while the child runs: the child gets SIGTERM and distlock exits 76.
#[tokio::test]
async fn revoked_lock_stops_the_child() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let id_file = dir.path().join("lease");
    let mut child =
        distlock(&server.url(), &["run", "--ttl", "600ms", "k", "--", "sh", "-c", TRAP_TERM, "sh"])
            .arg(&id_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    let start = Instant::now();
    let id = loop {
        if let Ok(s) = std::fs::read_to_string(&id_file) {
            if s.ends_with('\n') {
                break s.trim().to_owned();
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10), "child did not start");
        std::thread::sleep(Duration::from_millis(10));
    };
    let locker = server.locker().await;
    locker.release_lease("k", &LeaseId::parse(&id).unwrap()).await.unwrap();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(5)), 76);
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(out.contains("got-term"), "child got SIGTERM: {out}");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("lost the lock"), "{err}");
}

/// The server dies while the child runs: the lease deadline passes unrenewed, the child gets
/// SIGTERM (SIGKILL if it ignores it) before the lock could go to anyone else.
#[tokio::test]
async fn server_killed_stops_the_child() {
    let mut server = Server::start(&[]);
    let mut child = distlock(
        &format!("{}?timeout=300ms", server.url()),
        &["run", "--ttl", "1s", "--kill-after", "500ms", "k", "--", "sh", "-c", "trap '' TERM; sleep 30"],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    server.kill9();
    let killed = Instant::now();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), 76);
    assert!(killed.elapsed() < Duration::from_secs(3), "took {:?}", killed.elapsed());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("killing it"), "SIGKILL after --kill-after: {err}");
}

/// SIGTERM sent to distlock reaches the child; distlock exits with the child's code and releases.
#[tokio::test]
async fn signals_are_passed_on() {
    let server = Server::start(&[]);
    let mut child =
        distlock(&server.url(), &["run", "k", "--", "sh", "-c", "trap 'exit 42' TERM; sleep 30 & wait"])
            .spawn()
            .unwrap();
    let locker = server.locker().await;
    let start = Instant::now();
    while !locker.status("k").await.unwrap().held {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert_eq!(wait_exit(&mut child, Duration::from_secs(5)), 42);
    assert!(!locker.status("k").await.unwrap().held);
}

/// 8 concurrent `distlock run` processes, 25 times each, append start/end marks to one file:
/// no two critical sections overlap.
fn exclusion(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("marks");
    let script = "echo \"start $DISTLOCK_FENCING_TOKEN\" >> \"$1\"; sleep 0.01; echo \"end $DISTLOCK_FENCING_TOKEN\" >> \"$1\"";
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (backend, file) = (backend.to_owned(), file.clone());
            std::thread::spawn(move || {
                for _ in 0..25 {
                    let o = distlock(
                        &backend,
                        &["run", "--wait", "60s", "shared", "--", "sh", "-c", script, "sh"],
                    )
                    .arg(&file)
                    .output()
                    .unwrap();
                    assert_eq!(code(&o), 0, "{}", stderr(&o));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let marks = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = marks.lines().collect();
    assert_eq!(lines.len(), 400);
    let mut last_token = 0u64;
    for pair in lines.chunks(2) {
        let (start, end) = (pair[0], pair[1]);
        let token: u64 = start.strip_prefix("start ").expect("a start mark").parse().unwrap();
        assert_eq!(end, format!("end {token}"), "critical sections overlapped:\n{start}\n{end}");
        assert!(token > last_token, "tokens rose");
        last_token = token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_processes_exclude_each_other_on_the_server() {
    let server = Server::start(&[]);
    let url = server.url();
    tokio::task::spawn_blocking(move || exclusion(&url)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_processes_exclude_each_other_on_redis() {
    let redis = support::RedisServer::start();
    let url = redis.url();
    tokio::task::spawn_blocking(move || exclusion(&url)).await.unwrap();
    drop(Locker::open(&redis.url()).await.unwrap());
}
