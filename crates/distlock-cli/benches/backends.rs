//! Speed of every networked backend on this machine, with the raw Redis figure beside it.
//!
//! `cargo bench -p distlock-cli --bench backends` starts its own servers on loopback — the
//! `distlock serve` binary (embedded store, in a temp dir), a `redis-server` for `redis://`,
//! three for `redlock://`, and one `etcd` member for `etcd://` — and prints Markdown tables for
//! docs/BENCHMARKS.md. `BENCH_SECS` (default 5) is the time per row; `BENCH_LEASES` (default 1,000,000) the size of the
//! held-leases run; `BENCH_SERVER_ARGS` adds flags to `distlock serve`; `BENCH_ONLY_LEASES=N`
//! runs only the held-leases measurement; `DISTLOCK_LOG=info` shows the store's recovery phases.
//! Under `cargo test` every row runs briefly as a smoke test.

#[path = "../../distlock/tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use distlock::{Backend, Locker};
use distlock_cli::bench::{self, quantile_ms, BenchConfig, Progress, Workload};
use distlock_server::store::{EmbeddedStore, Limits};

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// The value at quantile `q` (0..=1) of sorted samples.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// One `distlock bench`-style run through the library.
fn run(
    rt: &tokio::runtime::Runtime,
    locker: &Locker,
    workload: Workload,
    tasks: usize,
    secs: Duration,
) -> bench::Report {
    let config = BenchConfig { workload, concurrency: tasks, duration: secs, ..BenchConfig::default() };
    rt.block_on(bench::run(std::slice::from_ref(locker), &config, Arc::new(Progress::default())))
}

/// `redis-benchmark -t set` at `clients` concurrency: requests per second.
fn redis_benchmark_set(port: u16, clients: usize, requests: usize) -> f64 {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "set", "--csv"])
        .args(["-c", &clients.to_string(), "-n", &requests.to_string(), "-r", "100000"])
        .output()
        .expect("redis-benchmark (Debian package redis-tools) must be installed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("\"SET\""))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or(0.0)
}

struct DistlockServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl DistlockServer {
    fn start() -> DistlockServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = support::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_distlock"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            // Extra flags for experiments, e.g. BENCH_SERVER_ARGS="--store memory://".
            .args(std::env::var("BENCH_SERVER_ARGS").unwrap_or_default().split_whitespace())
            .env("DISTLOCK_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn distlock serve");
        support::wait_for_port(port, Duration::from_secs(10), "distlock serve");
        DistlockServer { child, port, _dir: dir }
    }
}

impl Drop for DistlockServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Latency of `n` sequential puts straight to etcd: the raw store figure beside the etcd rows.
async fn etcd_put_latency(etcd: &support::EtcdCluster, n: usize) -> Vec<Duration> {
    let port = etcd.client_ports()[0];
    let mut c = etcd_client::Client::connect([format!("http://127.0.0.1:{port}")], None).await.expect("etcd");
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        c.put(format!("bench-put-{}", i % 100), "x", None).await.expect("put");
        out.push(t0.elapsed());
    }
    out.sort();
    out
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

/// Holds `n` leases in an embedded store (in-process, durable), then measures memory per lease,
/// disk, and the time to recover them.
async fn held_leases(n: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let rss_before = rss_bytes();
    let store = Arc::new(
        EmbeddedStore::open(dir.path(), Limits { max_leases: n + 1, max_waiters: 1 }, 64 << 20)
            .expect("open"),
    );
    let start = Instant::now();
    let backend: Arc<dyn Backend> = store.clone();
    let held = bench::hold_background(&backend, "", n, Duration::from_secs(3600), 512).await;
    assert_eq!(held, n, "every acquire was granted");
    let fill = start.elapsed();
    let stats = store.stats();
    let rss_after = rss_bytes();
    drop((backend, store));
    let disk: u64 = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let start = Instant::now();
    let reopened = EmbeddedStore::open(dir.path(), Limits { max_leases: n + 1, max_waiters: 1 }, 64 << 20)
        .expect("reopen");
    let restart = start.elapsed();
    assert_eq!(reopened.stats().leases, n, "every lease came back");
    println!("| leases held | {n} |");
    println!("|---|---|");
    println!(
        "| durable acquires, 512 concurrent (in-process) | {:.0}/s ({} records in {} fsyncs) |",
        n as f64 / fill.as_secs_f64(),
        stats.records_total,
        stats.syncs_total
    );
    println!(
        "| memory per lease (RSS growth / leases) | {} bytes |",
        rss_after.saturating_sub(rss_before) / n.max(1)
    );
    println!("| data directory after the fill | {:.1} MiB |", disk as f64 / (1 << 20) as f64);
    println!(
        "| restart (snapshot + log replay + load), default 64 MiB compaction | {} ms |",
        restart.as_millis()
    );
}

fn main() {
    if std::env::var_os("DISTLOCK_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("DISTLOCK_LOG"))
            .init();
    }
    if let Some(n) = std::env::var("BENCH_ONLY_LEASES").ok().and_then(|s| s.parse().ok()) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(held_leases(n));
        return;
    }
    let benching = std::env::args().any(|a| a == "--bench");
    let secs = if benching {
        Duration::from_secs(std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5))
    } else {
        Duration::from_millis(200)
    };
    let leases = std::env::var("BENCH_LEASES").ok().and_then(|s| s.parse().ok()).unwrap_or(if benching {
        1_000_000
    } else {
        5_000
    });
    let requests = if benching { 200_000 } else { 2_000 };
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let redis = support::RedisServer::start();
    let masters: Vec<support::RedisServer> = (0..3).map(|_| support::RedisServer::start()).collect();
    let server = DistlockServer::start();
    let etcd = support::EtcdCluster::start(1);
    let etcd_url = format!("{}?timeout=5s", etcd.url());
    let etcd_put = rt.block_on(etcd_put_latency(&etcd, if benching { 2000 } else { 50 }));
    let backends = [
        ("distlock serve (embedded, durable)", format!("http://127.0.0.1:{}", server.port)),
        ("redis", redis.url()),
        (
            "redlock (3 masters)",
            format!(
                "redlock://{}",
                masters.iter().map(|m| format!("127.0.0.1:{}", m.port)).collect::<Vec<_>>().join(",")
            ),
        ),
        ("etcd (1 member)", etcd_url),
    ];

    println!("| backend | tasks | cycles/s | acquire p50 / p99 ms | release p50 / p99 ms | errors | redis-benchmark SET/s |");
    println!("|---|---|---|---|---|---|---|");
    for (name, url) in &backends {
        let locker = rt.block_on(Locker::open(url)).expect("open");
        for tasks in [1usize, 16, 32, 64] {
            let r = run(&rt, &locker, Workload::Uncontended, tasks, secs);
            let set = if *name == "redis" {
                format!("{:.0}", redis_benchmark_set(redis.port, tasks, requests))
            } else {
                String::new()
            };
            println!(
                "| {name} | {tasks} | {:.0} | {:.3} / {:.3} | {:.3} / {:.3} | {} | {set} |",
                r.ops_per_s(),
                quantile_ms(&r.acquire, 0.5),
                quantile_ms(&r.acquire, 0.99),
                quantile_ms(&r.release, 0.5),
                quantile_ms(&r.release, 0.99),
                r.error_count()
            );
        }
    }
    println!();
    println!("| backend | tasks on one key | handoffs/s | handoff p50 / p99 / max ms | overlaps | tokens rose | errors |");
    println!("|---|---|---|---|---|---|---|");
    for (name, url) in &backends {
        let locker = rt.block_on(Locker::open(url)).expect("open");
        let c = run(&rt, &locker, Workload::Contended, 8, secs);
        assert_eq!(c.overlaps, 0, "{name}: two holders overlapped");
        assert_eq!(c.token_regressions, 0, "{name}: fencing tokens did not rise");
        println!(
            "| {name} | 8 | {:.0} | {:.3} / {:.3} / {:.3} | {} | {} | {} |",
            c.ops_per_s(),
            quantile_ms(&c.handoff, 0.5),
            quantile_ms(&c.handoff, 0.99),
            quantile_ms(&c.handoff, 1.0),
            c.overlaps,
            if c.token_regressions == 0 { "yes" } else { "NO" },
            c.error_count()
        );
    }
    println!();
    println!(
        "etcd's own write latency (sequential puts, same member): p50 {} ms, p99 {} ms",
        ms(percentile(&etcd_put, 0.5)),
        ms(percentile(&etcd_put, 0.99))
    );
    println!();
    rt.block_on(held_leases(leases));
}
