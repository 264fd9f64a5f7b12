//! `distlock bench`: its checks catch a broken backend, and the command's output has the
//! documented fields, against a real server.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use common::Server;
use distlock::{
    async_trait, AcquireRequest, Backend, Grant, LeaseId, ListQuery, LockInfo, LockPage, Locker, Result,
};
use distlock_cli::bench::{self, BenchConfig, Progress, Workload};

/// A "lock" that grants everyone at once and always hands out token 7: what the checks exist for.
struct Broken;

#[async_trait]
impl Backend for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }
    async fn acquire(&self, req: AcquireRequest) -> Result<Grant> {
        Ok(Grant { lease_id: req.lease_id, fencing_token: 7, ttl: req.ttl, counted_from: Instant::now() })
    }
    async fn renew(&self, _: &str, id: &LeaseId, ttl: Option<Duration>) -> Result<Grant> {
        let ttl = ttl.unwrap_or(Duration::from_secs(30));
        Ok(Grant { lease_id: id.clone(), fencing_token: 7, ttl, counted_from: Instant::now() })
    }
    async fn release(&self, _: &str, _: &LeaseId) -> Result<()> {
        Ok(())
    }
    async fn status(&self, key: &str) -> Result<LockInfo> {
        Ok(LockInfo::free(key, 0))
    }
    async fn list(&self, _: &ListQuery) -> Result<LockPage> {
        Ok(LockPage::default())
    }
    /// Claims semaphores and shared locks too, and grants them to everyone.
    fn offers(&self) -> distlock::Offers {
        distlock::Offers { many_holders: true, ..Default::default() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_catch_a_backend_that_grants_twice() {
    let locker = Locker::with_backend(Arc::new(Broken));
    let config = BenchConfig {
        workload: Workload::Contended,
        concurrency: 4,
        duration: Duration::from_millis(300),
        hold: Duration::from_millis(2),
        ..BenchConfig::default()
    };
    let report = bench::run(std::slice::from_ref(&locker), &config, Arc::new(Progress::default())).await;
    assert!(report.overlaps > 0, "overlapping holders went unnoticed");
    assert!(report.token_regressions > 0, "repeated tokens went unnoticed");
    assert!(!report.checks_passed());
    assert!(report.summary("broken://").contains("FAILED"));

    // The same run on a real lock passes.
    let locker = Locker::open("memory://").await.expect("memory");
    let report = bench::run(std::slice::from_ref(&locker), &config, Arc::new(Progress::default())).await;
    assert!(report.cycles > 0);
    assert!(report.checks_passed(), "{}", report.summary("memory://"));
}

/// `--limit` and `--shared` runs check their own rules: a store that lets more than N holders of
/// a semaphore in, or a reader beside a writer, or repeats a token, fails the run; the same runs
/// on a real store pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_catch_too_many_holders_and_readers_beside_a_writer() {
    let semaphore = BenchConfig {
        workload: Workload::Contended,
        concurrency: 6,
        duration: Duration::from_millis(300),
        hold: Duration::from_millis(2),
        limit: 2,
        ..BenchConfig::default()
    };
    let shared = BenchConfig { limit: 1, shared: true, writers: 1, ..semaphore.clone() };
    for config in [&semaphore, &shared] {
        let broken = Locker::with_backend(Arc::new(Broken));
        let report = bench::run(std::slice::from_ref(&broken), config, Arc::new(Progress::default())).await;
        assert!(report.overlaps > 0, "too many holders went unnoticed ({config:?})");
        assert!(report.token_regressions > 0, "repeated tokens went unnoticed ({config:?})");
        assert!(!report.checks_passed());
        let memory = Locker::open("memory://").await.expect("memory");
        let report = bench::run(std::slice::from_ref(&memory), config, Arc::new(Progress::default())).await;
        assert!(report.cycles > 0);
        assert!(report.checks_passed(), "{}", report.summary("memory://"));
        assert!(!report.has_handoff(), "no hand-off is measured with several holders");
    }
}

fn bench_json(backend: &str, args: &[&str], exit: i32) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["--backend", backend, "--json", "bench"])
        .args(args)
        .output()
        .expect("run distlock bench");
    assert_eq!(o.status.code(), Some(exit), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

#[test]
fn bench_command_against_the_server() {
    let server = Server::start(&[]);
    let b = server.url();
    for (workload, extra) in [
        ("uncontended", vec!["--concurrency", "4"]),
        ("contended", vec!["--concurrency", "4", "--clients", "4"]),
        ("mixed", vec!["--concurrency", "4", "--keys", "8", "--zipf", "1.1", "--hold", "1ms"]),
    ] {
        let mut args = vec!["--duration", "700ms", "--workload", workload];
        args.extend(extra);
        let j = bench_json(&b, &args, 0);
        for field in [
            "backend",
            "workload",
            "concurrency",
            "clients",
            "keys",
            "duration_s",
            "ops_per_s",
            "acquire_p50_ms",
            "acquire_p99_ms",
            "release_p50_ms",
            "release_p99_ms",
            "handoff_p50_ms",
            "errors",
        ] {
            assert!(j.get(field).is_some(), "{workload}: no {field} in {j}");
        }
        assert_eq!(j["workload"], workload);
        assert_eq!(j["backend"], b.as_str());
        assert!(j["cycles"].as_u64().unwrap_or(0) > 0, "{workload}: no cycles: {j}");
        assert_eq!(j["checks_passed"], true, "{j}");
        assert_eq!(j["overlaps"], 0);
        if workload == "contended" {
            assert!(j["handoff_p50_ms"].as_f64().is_some(), "{j}");
            assert_eq!(j["keys"], 1);
            assert_eq!(j["clients"], 4, "four independent clients contend for one key");
        } else {
            assert!(j["handoff_p50_ms"].is_null());
        }
    }

    // Bad input: nothing runs, exit 64; a dead backend: errors are counted by code, and a run that
    // measured nothing fails (exit 1).
    let o = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["--backend", &b, "bench", "--ttl", "5ms"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(64));
    let dead = format!("http://127.0.0.1:{}?timeout=200ms", common::support::free_port());
    let j = bench_json(&dead, &["--duration", "300ms"], 1);
    assert_eq!(j["cycles"], 0);
    assert!(j["errors_by_code"]["backend_unavailable"].as_u64().unwrap_or(0) > 0, "{j}");

    // Background leases are held while the run measures.
    let o = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["--backend", &b, "bench", "--duration", "200ms", "--background-leases", "300"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0));
    let listed = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["--backend", &b, "--json", "list", "--prefix", "bench/bg/"])
        .output()
        .expect("list");
    let list: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(list["locks"].as_array().map(Vec::len), Some(300));
}
