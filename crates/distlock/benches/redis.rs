//! Speed of the Redis and Redlock backends beside the raw Redis figure, on servers this bench
//! starts itself (loopback, no persistence).
//!
//! `cargo bench -p distlock --bench redis` measures for 5 s per row (`BENCH_SECS` to change) and
//! prints a Markdown table for docs/BENCHMARKS.md. Under `cargo test` it runs each row briefly as
//! a smoke test.
//!
//! Rows: uncontended acquire + release cycles/s with 1 and 32 tasks on distinct keys, beside
//! `redis-benchmark -t set` at the same concurrency (a cycle is two round trips, so the reference
//! is half the SET rate); and contended handoff on one key with 8 tasks: the time from a release
//! being acknowledged to the next holder's grant.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock::{AcquireOptions, Locker};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// `tasks` tasks, each on its own key, acquire + release for `secs`.
async fn uncontended(locker: &Locker, tasks: usize, secs: Duration) -> (f64, Vec<Duration>, Vec<Duration>) {
    let acq = Arc::new(Mutex::new(Vec::new()));
    let rel = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (locker, acq, rel) = (locker.clone(), acq.clone(), rel.clone());
        handles.push(tokio::spawn(async move {
            let key = format!("bench-{t}");
            let opts = AcquireOptions::new().ttl(Duration::from_secs(10));
            let (mut a, mut r) = (Vec::new(), Vec::new());
            while start.elapsed() < secs {
                let t0 = Instant::now();
                let lease = locker.acquire(&key, &opts).await.expect("acquire");
                let t1 = Instant::now();
                lease.release().await.expect("release");
                a.push(t1 - t0);
                r.push(t1.elapsed());
            }
            acq.lock().unwrap().extend(a);
            rel.lock().unwrap().extend(r);
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut a = std::mem::take(&mut *acq.lock().unwrap());
    let mut r = std::mem::take(&mut *rel.lock().unwrap());
    a.sort();
    r.sort();
    (a.len() as f64 / elapsed, a, r)
}

/// `tasks` tasks on one key; returns handoffs/s and the sorted handoff latencies.
async fn contended(locker: &Locker, tasks: usize, secs: Duration) -> (f64, Vec<Duration>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (locker, events) = (locker.clone(), events.clone());
        handles.push(tokio::spawn(async move {
            let opts = AcquireOptions::new().ttl(Duration::from_secs(10)).wait(Duration::from_secs(30));
            while start.elapsed() < secs {
                let lease = locker.acquire("hot", &opts).await.expect("acquire");
                let granted = Instant::now();
                let token = lease.fencing_token();
                lease.release().await.expect("release");
                events.lock().unwrap().push((token, granted, Instant::now()));
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut events = std::mem::take(&mut *events.lock().unwrap());
    events.sort_by_key(|e| e.0);
    assert!(events.windows(2).all(|w| w[0].0 < w[1].0), "tokens must rise");
    let mut handoffs: Vec<Duration> =
        events.windows(2).map(|w| w[1].1.saturating_duration_since(w[0].2)).collect();
    handoffs.sort();
    (handoffs.len() as f64 / elapsed, handoffs)
}

/// `redis-benchmark -t set` at `clients` concurrency: requests per second.
fn redis_benchmark_set(port: u16, clients: usize, requests: usize) -> f64 {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "set", "--csv"])
        .args(["-c", &clients.to_string(), "-n", &requests.to_string(), "-r", "100000"])
        .output()
        .expect("redis-benchmark (Debian package redis-tools) must be installed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("\"SET\""))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or(0.0)
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let secs = if benching {
        Duration::from_secs(std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5))
    } else {
        Duration::from_millis(200)
    };
    let requests = if benching { 200_000 } else { 2_000 };
    // BENCH_WORKERS=0 runs on a current-thread runtime; the default is a multi-thread runtime
    // with 2 workers (the machine's cores, shared with redis-server).
    let workers: usize = std::env::var("BENCH_WORKERS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let rt = if workers == 0 {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .expect("runtime")
    };
    let redis = support::RedisServer::start();
    let masters: Vec<support::RedisServer> = (0..3).map(|_| support::RedisServer::start()).collect();
    let redlock_url = format!(
        "redlock://{}",
        masters.iter().map(|m| format!("127.0.0.1:{}", m.port)).collect::<Vec<_>>().join(",")
    );

    println!(
        "| backend | workload | tasks | cycles/s | acquire p50 / p99 ms | release p50 / p99 ms | reference |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, url) in [("redis", redis.url()), ("redlock (3 masters)", redlock_url)] {
        if name != "redis" && std::env::var_os("BENCH_STATS").is_some() {
            let stats = redis.raw("INFO commandstats");
            for line in stats.lines().filter(|l| l.contains("evalsha") || l.contains("cmdstat_set:")) {
                eprintln!("{line}");
            }
        }
        let locker = rt.block_on(Locker::open(&url)).expect("open");
        for tasks in [1usize, 32] {
            let (rate, a, r) = rt.block_on(uncontended(&locker, tasks, secs));
            let reference = if name == "redis" {
                let set = redis_benchmark_set(redis.port, tasks, requests);
                format!(
                    "SET {set:.0}/s → half {:.0}/s; ours = {:.0} %",
                    set / 2.0,
                    100.0 * rate / (set / 2.0)
                )
            } else {
                String::new()
            };
            println!(
                "| {name} | uncontended | {tasks} | {rate:.0} | {} / {} | {} / {} | {reference} |",
                ms(percentile(&a, 0.5)),
                ms(percentile(&a, 0.99)),
                ms(percentile(&r, 0.5)),
                ms(percentile(&r, 0.99)),
            );
        }
        let (rate, h) = rt.block_on(contended(&locker, 8, secs));
        println!(
            "| {name} | contended handoff | 8 | {rate:.0} handoffs/s | handoff p50 {} / p99 {} / max {} | | |",
            ms(percentile(&h, 0.5)),
            ms(percentile(&h, 0.99)),
            ms(h.last().copied().unwrap_or_default()),
        );
    }
}
