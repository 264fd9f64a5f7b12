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
    c.env("DISTLOCK_BACKEND", backend)
        .env_remove("DISTLOCK_TOKEN")
        .env_remove("DISTLOCK_LEASE_ID")
        .args(args)
        .stdin(Stdio::null());
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
    assert_eq!(list["locks"].as_array().map(Vec::len), Some(1), "the HTTP shape: {list}");
    assert!(list["next"].is_null());
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
    assert_eq!(code(&o), 64, "usage errors exit 64, not clap's 2: {}", stderr(&o));
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

/// Waits until `path` holds a complete line and returns it trimmed.
fn read_when_written(path: &std::path::Path) -> String {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if s.ends_with('\n') {
                return s.trim().to_owned();
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{} was not written", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` is alive (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            !matches!(stat.rsplit(')').next().map(str::trim_start), Some(s) if s.starts_with('Z') || s.starts_with('X'))
        }
        Err(_) => false,
    }
}

fn dies_within(pid: i32, within: Duration) -> bool {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A lost lease stops every process the command started: its process group, and a daemonised
/// process (own session) re-parented to distlock. The old code signalled only the shell, and
/// both sleeps ran on without the lock.
#[tokio::test]
async fn a_lost_lease_stops_the_whole_command() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (id_file, in_group, daemon) =
        (dir.path().join("lease"), dir.path().join("in-group"), dir.path().join("daemon"));
    let script = "sleep 300 & echo $! > \"$2\"; (setsid sleep 300 & echo $! > \"$3\"); \
                  echo \"$DISTLOCK_LEASE_ID\" > \"$1\"; wait; echo after";
    let mut child = distlock(
        &server.url(),
        &["run", "--ttl", "3s", "--kill-after", "2s", "job", "--", "sh", "-c", script, "sh"],
    )
    .args([&id_file, &in_group, &daemon])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let id = read_when_written(&id_file);
    let pids: Vec<i32> = [&in_group, &daemon].map(|f| read_when_written(f).parse().unwrap()).to_vec();
    assert!(pids.iter().all(|p| alive(*p)));
    let locker = server.locker().await;
    locker.release_lease("job", &LeaseId::parse(&id).unwrap()).await.unwrap();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), 76);
    for pid in pids {
        assert!(dies_within(pid, Duration::from_secs(3)), "process {pid} kept running after the loss");
    }
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(!out.contains("after"), "the script went on after the loss: {out}");
}

/// `kill -9` of distlock: the command gets SIGKILL (PR_SET_PDEATHSIG) instead of running on
/// with nobody renewing its lease.
#[tokio::test]
async fn killing_distlock_kills_the_command() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let mut child =
        distlock(&server.url(), &["run", "k", "--", "sh", "-c", "echo $$ > \"$1\"; exec sleep 300", "sh"])
            .arg(&pid_file)
            .spawn()
            .unwrap();
    let pid: i32 = read_when_written(&pid_file).parse().unwrap();
    assert!(alive(pid));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(dies_within(pid, Duration::from_secs(3)), "the command outlived distlock");
}

/// SIGTERM to distlock reaches every process of the command, not only the shell.
#[tokio::test]
async fn signals_reach_the_whole_group() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let mut child =
        distlock(&server.url(), &["run", "k", "--", "sh", "-c", "sleep 300 & echo $! > \"$1\"; wait", "sh"])
            .arg(&pid_file)
            .spawn()
            .unwrap();
    let pid: i32 = read_when_written(&pid_file).parse().unwrap();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert_eq!(wait_exit(&mut child, Duration::from_secs(5)), 128 + 15);
    assert!(dies_within(pid, Duration::from_secs(3)), "the sleep did not get SIGTERM");
}

/// `eval "$(distlock acquire KEY)"` sets the variables `run` sets, whatever the key holds, and
/// runs nothing from it. The old output (key=... unquoted) ran the `touch` in the key.
#[tokio::test]
async fn acquire_output_is_safe_for_eval() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let m = marker.display();
    let keys = [
        format!("nightly job;touch {m}"),
        format!("$(touch {m})"),
        format!("`touch {m}`"),
        "it's \"quoted\" ' \\ $HOME".to_owned(),
        "two\nlines".to_owned(),
        "ключ/✓ 日本".to_owned(),
        format!("'; touch {m}; echo '"),
    ];
    for key in keys {
        let script = "eval \"$(\"$1\" acquire --ttl 1m -- \"$2\")\" || exit 9; \
                      printf '%s|%s|%s|%s' \"$DISTLOCK_KEY\" \"$DISTLOCK_FENCING_TOKEN\" \"$DISTLOCK_TTL_MS\" \"${#DISTLOCK_LEASE_ID}\"";
        let o = Command::new("sh")
            .args(["-c", script, "sh", env!("CARGO_BIN_EXE_distlock"), &key])
            .env("DISTLOCK_BACKEND", server.url())
            .output()
            .unwrap();
        assert_eq!(code(&o), 0, "{key:?}: {}", stderr(&o));
        let printed = stdout(&o);
        let (shown_key, rest) =
            printed.rsplit_once("|60000|32").map(|(a, b)| (a.rsplit_once('|'), b)).unwrap_or_default();
        let (shown_key, token) = shown_key.unwrap_or_default();
        assert_eq!((shown_key, rest), (key.as_str(), ""), "{printed:?}");
        assert!(token.parse::<u64>().is_ok(), "{printed:?}");
        assert!(!marker.exists(), "eval ran code from the key {key:?}");
    }
}

/// Usage errors exit 64 as documented (clap's own code is 2); --help and --version exit 0.
#[test]
fn usage_errors_exit_64() {
    let b = "http://127.0.0.1:1";
    for args in [
        &[][..],
        &["run"],
        &["acquire"],
        &["acquire", "--ttl", "5", "k"],
        &["acquire", "--ttl", "-1s", "k"],
        &["serve", "--listen", ":7878"],
        &["run", "k"],
        &["run", "--wait", "-3", "k", "--", "true"],
        &["list", "--limit", "0"],
        &["bench", "--duration", "0s"],
        &["no-such-command"],
    ] {
        let o = run(b, args);
        assert_eq!(code(&o), 64, "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).is_empty(), "{args:?} says what is wrong");
    }
    for args in [&["--help"][..], &["--version"], &["run", "--help"]] {
        assert_eq!(code(&run(b, args)), 0, "{args:?}");
    }
    let help = stdout(&run(b, &["--help"]));
    for needle in ["64", "69", "75", "76", "77", "--token-file", "--conflict-exit-code"] {
        assert!(help.contains(needle), "--help documents {needle}");
    }
}

/// A closed stdout ends every printing subcommand quietly (no panic, no exit 101).
#[tokio::test]
async fn closed_stdout_is_not_a_panic() {
    let server = Server::start(&[]);
    let locker = server.locker().await;
    let mut held = Vec::new();
    for i in 0..50 {
        held.push(
            locker
                .acquire(&format!("pipe/{i}"), &AcquireOptions::new().ttl(Duration::from_secs(60)))
                .await
                .unwrap(),
        );
    }
    for (args, want) in [
        (&["list"][..], 0),
        (&["list", "--json"], 0),
        (&["status", "pipe/1"], 0),
        (&["--json", "status", "pipe/1"], 0),
        (&["acquire", "pipe/new"], 141),
    ] {
        let mut child =
            distlock(&server.url(), args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        let status = child.wait().unwrap();
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert_eq!(status.code(), Some(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!locker.status("pipe/new").await.unwrap().held, "a lease nobody received is released");
}

/// `bench` fails (exit 1) when it measured nothing; `--duration 0s` is invalid input.
#[test]
fn bench_fails_when_it_measured_nothing() {
    let dead = format!("http://127.0.0.1:{}?timeout=200ms", support::free_port());
    let o = run(&dead, &["bench", "--json", "--duration", "1s"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let report: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!((report["cycles"].as_u64(), report["checks_passed"].as_bool()), (Some(0), Some(false)));
    assert!(stderr(&o).contains("nothing was measured"), "{}", stderr(&o));
    let o = run("memory://", &["bench", "--json", "--duration", "500ms", "--hold", "2ms"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let report: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(report["hold_measured_p50_ms"].as_f64().unwrap() >= 2.0, "held at least as asked: {report}");
}

/// `renew` without --ttl keeps the lease's own TTL (the old default cut a 10-minute lease to 30 s).
#[tokio::test]
async fn renew_keeps_the_lease_ttl() {
    let server = Server::start(&[]);
    let b = server.url();
    let o = run(&b, &["--json", "acquire", "--ttl", "10m", "long"]);
    let lease: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let id = lease["lease_id"].as_str().unwrap();
    let o = run(&b, &["--json", "renew", "long", "--lease", id]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let renewed: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(renewed["ttl_ms"].as_u64(), Some(600_000));
    let left = server.locker().await.status("long").await.unwrap().expires_in.unwrap();
    assert!(left > Duration::from_secs(500), "{left:?}");
    // The lease id may come from the environment, as `run` sets it.
    let o = distlock(&b, &["renew", "long", "--ttl", "5m"]).env("DISTLOCK_LEASE_ID", id).output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// A waiting `run` survives a restart of the server (kill -9 and a graceful one): it retries
/// until its wait ends instead of exiting 69.
#[tokio::test]
async fn a_waiting_run_survives_a_server_restart() {
    let mut server = Server::start(&[]);
    let locker = server.locker().await;
    let held = locker
        .acquire("k", &AcquireOptions::new().ttl(Duration::from_secs(2)).auto_renew(false))
        .await
        .unwrap();
    std::mem::forget(held);
    let mut child = distlock(&server.url(), &["run", "--wait", "60s", "k", "--", "true"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    server.restart_in_place();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), 0);
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("retrying"), "{err}");

    // Graceful: SIGTERM, then a new server on the same port and data.
    let locker = server.locker().await;
    let held = locker
        .acquire("k", &AcquireOptions::new().ttl(Duration::from_secs(2)).auto_renew(false))
        .await
        .unwrap();
    std::mem::forget(held);
    let mut child = distlock(&server.url(), &["run", "--wait", "60s", "k", "--", "true"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = server.pid().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    if let Some(c) = server.child.as_mut() {
        let _ = c.wait();
    }
    server.child = None;
    server.restart_in_place();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), 0);
    // Try once does not retry: 69 at once.
    let dead = format!("http://127.0.0.1:{}?timeout=300ms", support::free_port());
    assert_eq!(code(&run(&dead, &["run", "-n", "k", "--", "true"])), 69);
}

/// Messages say what happened in words: who holds it, for how long we waited, which lease id
/// does not hold what; a URL without scheme gets a suggestion; memory:// is refused.
#[tokio::test]
async fn messages_say_what_happened() {
    let server = Server::start(&[]);
    let b = server.url();
    let locker = server.locker().await;
    let _held = locker
        .acquire("deploy/web", &AcquireOptions::new().holder("ci-7").ttl(Duration::from_secs(60)))
        .await
        .unwrap();
    let o = run(&b, &["run", "-w", "1", "deploy/web", "--", "true"]);
    assert_eq!(code(&o), 75);
    let err = stderr(&o);
    assert!(
        err.contains("timed out after 1.") && err.contains("waiting for deploy/web (held by ci-7)"),
        "{err}"
    );
    assert!(err.contains("waiting for deploy/web, held by ci-7"), "a status line while waiting: {err}");
    let o = run(&b, &["release", "deploy/web", "--lease", &LeaseId::generate().to_string()]);
    assert_eq!(code(&o), 76);
    assert!(
        stderr(&o).contains("this lease id does not hold deploy/web (now held by ci-7)"),
        "{}",
        stderr(&o)
    );
    let o = run(&b, &["--json", "acquire", "deploy/web"]);
    let e: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        (e["error"]["code"].as_str(), e["error"]["holder"].as_str()),
        (Some("lock_held"), Some("ci-7"))
    );
    let o = run(&format!("127.0.0.1:{}", server.port), &["status", "k"]);
    assert_eq!(code(&o), 64);
    assert!(stderr(&o).contains(&format!("http://127.0.0.1:{}", server.port)), "{}", stderr(&o));
    for args in [&["run", "k", "--", "true"][..], &["acquire", "k"], &["hold", "k"]] {
        let o = run("memory://", args);
        assert_eq!(code(&o), 64, "{args:?}");
        assert!(stderr(&o).contains("no other process"), "{}", stderr(&o));
    }
}

/// flock's and consul lock's habits: -n, -w with bare seconds, -E, -c; `hold`; `run --json`.
#[tokio::test]
async fn habits_of_flock_consul_and_etcdctl() {
    let server = Server::start(&[]);
    let b = server.url();
    let locker = server.locker().await;
    let o = run(&b, &["run", "k", "-c", "echo \"in $DISTLOCK_KEY\"; exit 4"]);
    assert_eq!((code(&o), stdout(&o).trim()), (4, "in k"));
    let held = locker
        .acquire("k", &AcquireOptions::new().holder("other").ttl(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(code(&run(&b, &["run", "-n", "k", "--", "true"])), 75);
    assert_eq!(code(&run(&b, &["run", "-n", "-E", "3", "k", "--", "true"])), 3);
    assert_eq!(code(&run(&b, &["acquire", "-w", "0.3", "-E", "9", "k"])), 9);
    let o = run(&b, &["--json", "run", "-n", "k", "--", "true"]);
    let r: Value = serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap();
    assert_eq!((r["outcome"].as_str(), r["exit_code"].as_u64()), (Some("not_acquired"), Some(75)));
    held.release().await.unwrap();
    let o = run(&b, &["--json", "run", "k", "--", "sh", "-c", "echo out; exit 2"]);
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "out");
    let r: Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(
        (r["outcome"].as_str(), r["exit_code"].as_u64(), r["key"].as_str()),
        (Some("ok"), Some(2), Some("k"))
    );
    assert!(
        r["fencing_token"].as_u64().is_some()
            && r["held_ms"].as_u64().is_some()
            && r["waited_ms"].as_u64().is_some()
    );

    // hold: prints the lease, keeps it past its TTL, releases on SIGTERM.
    let mut child = distlock(&b, &["hold", "--ttl", "500ms", "h"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut first = String::new();
    let mut stdout_pipe = child.stdout.take().unwrap();
    let mut buf = [0u8; 1];
    while !first.contains("DISTLOCK_TTL_MS") {
        assert_eq!(stdout_pipe.read(&mut buf).unwrap(), 1);
        first.push(buf[0] as char);
    }
    assert!(first.contains("DISTLOCK_KEY='h'"), "{first}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(locker.status("h").await.unwrap().held, "renewed past its TTL");
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert_eq!(wait_exit(&mut child, Duration::from_secs(5)), 0);
    assert!(!locker.status("h").await.unwrap().held, "released on SIGTERM");
}

/// Tokens: --token-file and DISTLOCK_TOKEN on every client subcommand; a 401 says how to pass
/// one. force-release with an admin token frees a lock and stops the `run` that held it.
#[tokio::test]
async fn tokens_and_force_release() {
    let dir = tempfile::tempdir().unwrap();
    let (tokens, admins) = (dir.path().join("tokens"), dir.path().join("admins"));
    std::fs::write(&tokens, "user-token\nadmin-token\n").unwrap();
    std::fs::write(&admins, "admin-token\n").unwrap();
    let server = Server::start(&[
        "--auth-token-file",
        tokens.to_str().unwrap(),
        "--admin-token-file",
        admins.to_str().unwrap(),
    ]);
    let b = server.url();
    let o = run(&b, &["status", "k"]);
    assert_eq!(code(&o), 77);
    assert!(stderr(&o).contains("--token-file"), "says how to pass a token: {}", stderr(&o));
    let token_file = dir.path().join("my-token");
    std::fs::write(&token_file, "# CI token\nuser-token\n").unwrap();
    let tf = token_file.to_str().unwrap();
    assert_eq!(code(&run(&b, &["--token-file", tf, "status", "k"])), 0);
    let o = distlock(&b, &["status", "k"]).env("DISTLOCK_TOKEN", "user-token").output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    let mut child =
        distlock(&b, &["--token-file", tf, "run", "--ttl", "2s", "k", "--", "sleep", "30"]).spawn().unwrap();
    let locker = Locker::open(&format!("{b}?token=user-token")).await.unwrap();
    let start = Instant::now();
    while !locker.status("k").await.unwrap().held {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let o = run(&b, &["--token-file", tf, "force-release", "k"]);
    assert_eq!(code(&o), 77, "a user token is not an admin token: {}", stderr(&o));
    assert!(stderr(&o).contains("forbidden: this token may not force-release"), "{}", stderr(&o));
    let o = distlock(&b, &["--json", "force-release", "k"])
        .env("DISTLOCK_TOKEN", "admin-token")
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let r: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(r["released"].as_bool(), Some(true));
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), 76, "the run that held it stopped");
}

/// Review findings: a token from --token-file stays out of the command's environment; `hold`
/// ends on SIGTERM while still waiting; a wait too long for the clock is "forever", not a panic.
#[tokio::test]
async fn token_stays_home_hold_stops_while_waiting_and_huge_waits_do_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "user-token\n").unwrap();
    let server = Server::start(&["--auth-token-file", tokens.to_str().unwrap()]);
    let b = server.url();
    let tf = tokens.to_str().unwrap();
    let o = run(&b, &["--token-file", tf, "run", "k", "--", "sh", "-c", "echo \"[$DISTLOCK_TOKEN]\""]);
    assert_eq!((code(&o), stdout(&o).trim()), (0, "[]"), "{}", stderr(&o));

    let locker = Locker::open(&format!("{b}?token=user-token")).await.unwrap();
    let _held = locker.acquire("busy", &AcquireOptions::new().ttl(Duration::from_secs(60))).await.unwrap();
    let mut child =
        distlock(&b, &["--token-file", tf, "hold", "busy"]).stdout(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert_eq!(wait_exit(&mut child, Duration::from_secs(5)), 128 + 15, "ends while waiting");
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(out.is_empty(), "never acquired, nothing printed: {out}");

    let o = run(&b, &["--token-file", tf, "acquire", "-w", "100000000000y", "free-key"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = run(&b, &["--token-file", tf, "run", "--kill-after", "100000000000y", "other", "--", "true"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// `--event-history` must be 1 to 1,000,000.
#[test]
fn event_history_is_bounded() {
    for bad in ["0", "1000001", "many"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_distlock"))
            .args(["serve", "--event-history", bad, "--listen", "127.0.0.1:0"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(64), "--event-history {bad} must be refused (usage)");
    }
}

/// `run --limit N` is a semaphore (consul lock's `-n`): N commands run at once, the next is not
/// acquired (75), another limit is a usage error (64) naming the current one, and `status`
/// shows every holder; `--shared` holders share a key no exclusive holder gets meanwhile.
#[tokio::test]
async fn run_with_a_limit_shares_the_key() {
    let server = Server::start(&[]);
    let b = server.url();
    let dir = tempfile::tempdir().unwrap();
    let mut holders: Vec<Child> = (0..2)
        .map(|i| {
            let ready = dir.path().join(format!("ready-{i}"));
            let script = format!("echo ok > {}; sleep 30", ready.display());
            distlock(
                &b,
                &["run", "--limit", "2", "--holder", &format!("h{i}"), "pool", "--", "sh", "-c", &script],
            )
            .spawn()
            .expect("spawn")
        })
        .collect();
    for i in 0..2 {
        read_when_written(&dir.path().join(format!("ready-{i}")));
    }
    let third = run(&b, &["run", "-n", "--limit", "2", "pool", "--", "true"]);
    assert_eq!(code(&third), 75, "{}", stderr(&third));
    let other = run(&b, &["run", "-n", "--limit", "3", "pool", "--", "true"]);
    assert_eq!(code(&other), 64, "{}", stderr(&other));
    assert!(stderr(&other).contains("--limit 2"), "{}", stderr(&other));
    let status = run(&b, &["--json", "status", "pool"]);
    let info: Value = serde_json::from_str(&stdout(&status)).expect("status --json");
    assert_eq!(info["limit"], 2, "{info}");
    let mut names: Vec<&str> =
        info["holders"].as_array().unwrap().iter().map(|h| h["holder"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["h0", "h1"]);
    let text = stdout(&run(&b, &["status", "pool"]));
    assert!(text.contains("2 / 2 held"), "{text}");
    for h in &mut holders {
        let _ = h.kill();
        let _ = h.wait();
    }

    // --shared (flock's -s): readers together, a writer refused while they hold.
    for holder in ["r1", "r2"] {
        let o = run(&b, &["acquire", "--shared", "--holder", holder, "rw"]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    }
    let writer = run(&b, &["run", "-n", "rw", "--", "true"]);
    assert_eq!(code(&writer), 75, "{}", stderr(&writer));
    let text = stdout(&run(&b, &["status", "rw"]));
    assert!(text.contains("held shared (2)"), "{text}");
}

/// `distlock elect` runs its command only while leading, with the value and token in its
/// environment; `distlock leader` prints the value (exit 1 and nothing on stdout without a
/// leader); `leader --watch --json` prints one line per leader, in order with rising tokens, and
/// exits 0 on SIGTERM; a candidate in line leads once the leader's command ends.
#[tokio::test]
async fn elect_runs_only_while_leading_and_leader_follows() {
    let server = Server::start(&[]);
    let b = server.url();
    let dir = tempfile::tempdir().unwrap();
    let none = run(&b, &["leader", "svc"]);
    assert_eq!((code(&none), stdout(&none).as_str()), (1, ""), "{}", stderr(&none));

    let mut watch =
        distlock(&b, &["--json", "leader", "--watch", "svc"]).stdout(Stdio::piped()).spawn().unwrap();
    let lines = {
        let out = watch.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        rx
    };
    let next_line = || -> Value {
        let line = lines.recv_timeout(Duration::from_secs(10)).expect("a line from leader --watch");
        serde_json::from_str(&line).expect("one JSON object per line")
    };
    assert_eq!(next_line()["value"], Value::Null, "nobody leads yet");

    let candidate = |value: &str, file: &str| {
        let script = format!(
            "echo \"$DISTLOCK_LEADER_VALUE $DISTLOCK_FENCING_TOKEN\" > {}; sleep 30",
            dir.path().join(file).display()
        );
        distlock(&b, &["elect", "--value", value, "--holder", value, "svc", "--", "sh", "-c", &script])
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn elect")
    };
    let mut a = candidate("addr-a", "a");
    let (a_value, a_token) = {
        let line = read_when_written(&dir.path().join("a"));
        let (v, t) = line.split_once(' ').expect("value and token");
        (v.to_owned(), t.parse::<u64>().expect("a token"))
    };
    assert_eq!(a_value, "addr-a");
    let seen = next_line();
    assert_eq!((seen["value"].as_str(), seen["fencing_token"].as_u64()), (Some("addr-a"), Some(a_token)));
    let now = run(&b, &["leader", "svc"]);
    assert_eq!((code(&now), stdout(&now).as_str()), (0, "addr-a\n"));
    assert!(stdout(&run(&b, &["status", "svc"])).contains("value addr-a"));

    let mut c = candidate("addr-b", "b");
    let start = Instant::now();
    let waiters = || -> Value {
        serde_json::from_str::<Value>(&stdout(&run(&b, &["--json", "status", "svc"]))).expect("status")
            ["waiters"]
            .clone()
    };
    while waiters() != 1 {
        assert!(start.elapsed() < Duration::from_secs(10), "b never queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dir.path().join("b").exists(), "b's command ran while a led");
    // a's distlock passes SIGTERM on; its command ends and the lease is released: b leads.
    assert!(Command::new("kill").args(["-TERM", &a.id().to_string()]).status().unwrap().success());
    wait_exit(&mut a, Duration::from_secs(10));
    let b_line = read_when_written(&dir.path().join("b"));
    let seen = next_line();
    assert_eq!(seen["value"].as_str(), Some("addr-b"), "{seen}");
    let b_token = seen["fencing_token"].as_u64().expect("a token");
    assert!(b_token > a_token, "tokens rise");
    assert_eq!(b_line, format!("addr-b {b_token}"));

    assert!(Command::new("kill").args(["-TERM", &watch.id().to_string()]).status().unwrap().success());
    assert_eq!(wait_exit(&mut watch, Duration::from_secs(10)), 0);
    let _ = c.kill();
    let _ = c.wait();
}

/// `leader --watch` against a store it cannot reach says so on stderr (and keeps trying) rather
/// than waiting in silence while the last line it printed looks current.
#[test]
fn leader_watch_says_when_the_store_is_out_of_reach() {
    let port = support::free_port();
    let mut watch = distlock(&format!("http://127.0.0.1:{port}"), &["leader", "--watch", "svc"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let err = watch.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(10)).expect("a line on stderr");
    assert!(line.contains("cannot reach the store") && line.contains("trying again"), "{line}");
    assert!(watch.try_wait().expect("try_wait").is_none(), "it keeps trying");
    let _ = watch.kill();
    let _ = watch.wait();
}
