//! etcd's own figures, the reference rows beside the etcd rows of docs/BENCHMARKS.md, one JSON
//! line per run:
//!
//! - `put` (the default): `tasks` concurrent loops of `put` on distinct keys (what etcd's
//!   `benchmark put` does): the raw write rate;
//! - `lock`: etcd's own lock service (v3lock, the `Lock` / `Unlock` RPCs that `etcdctl lock` and
//!   `concurrency.Mutex` stand for), through the etcd-client crate: each task grants one etcd
//!   lease first (its session, 60 s, so no keep-alive is needed within a run) and then loops
//!   `lock` + `unlock` on its own name;
//! - `lock-contended`: the same with every task on one name; adds the handoff latency, from an
//!   `unlock` being answered to the next holder's `lock` answer (as `distlock bench` counts it).
//!
//! - `backend`: distlock's etcd backend called directly (`Backend::acquire` try-once +
//!   `Backend::release`, each task its own key), without the `Lease` that `distlock bench` keeps
//!   for every grant: splits distlock's cost between the backend and the lease keeping.
//!
//! `cargo run --release -p distlock-cli --example etcd_put -- http://127.0.0.1:2379 32 3s [put|lock|lock-contended]`

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock_cli::bench::{histogram, quantile_ms};
use hdrhistogram::Histogram;

/// What each task measured: its first and second call's latencies, and its errors.
type Measured = (Histogram<u64>, Histogram<u64>, u64);

/// The tasks' measurements added together.
async fn merge(handles: Vec<tokio::task::JoinHandle<Measured>>) -> anyhow::Result<Measured> {
    let (mut first, mut second, mut errors) = (histogram(), histogram(), 0);
    for h in handles {
        let (a, b, e) = h.await?;
        first.add(&a)?;
        second.add(&b)?;
        errors += e;
    }
    Ok((first, second, errors))
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(d.as_micros().max(1) as u64);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let endpoint = args.next().unwrap_or_else(|| "http://127.0.0.1:2379".into());
    let tasks: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let duration =
        args.next().map(|s| humantime::parse_duration(&s)).transpose()?.unwrap_or(Duration::from_secs(3));
    let mode = args.next().unwrap_or_else(|| "put".into());
    anyhow::ensure!(
        matches!(mode.as_str(), "put" | "lock" | "lock-contended" | "backend"),
        "mode must be put, lock, lock-contended or backend, not {mode:?}"
    );
    if mode == "backend" {
        return backend(&endpoint, tasks, duration).await;
    }
    let client = etcd_client::Client::connect([endpoint.as_str()], None).await?;
    // (granted, unlock answered) of every lock-contended cycle, for the handoff.
    let grants: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let mut c = client.clone();
        let (mode, grants) = (mode.clone(), grants.clone());
        handles.push(tokio::spawn(async move {
            let (mut first, mut second) = (histogram(), histogram());
            let mut errors = 0u64;
            if mode == "put" {
                while start.elapsed() < duration {
                    let t0 = Instant::now();
                    match c.put(format!("bench-put/{t}"), "x", None).await {
                        Ok(_) => record(&mut first, t0.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                return (first, second, errors);
            }
            let Ok(session) = c.lease_grant(60, None).await else { return (first, second, 1) };
            let name = if mode == "lock" { format!("bench-v3lock/{t}") } else { "bench-v3lock/one".into() };
            let opts = etcd_client::LockOptions::new().with_lease(session.id());
            while start.elapsed() < duration {
                let t0 = Instant::now();
                let key = match c.lock(name.as_str(), Some(opts.clone())).await {
                    Ok(r) => r.key().to_vec(),
                    Err(_) => {
                        errors += 1;
                        continue;
                    }
                };
                let granted = Instant::now();
                record(&mut first, granted - t0);
                let t1 = Instant::now();
                match c.unlock(key).await {
                    Ok(_) => record(&mut second, t1.elapsed()),
                    Err(_) => errors += 1,
                }
                if mode == "lock-contended" {
                    if let Ok(mut g) = grants.lock() {
                        g.push((granted, Instant::now()));
                    }
                }
            }
            let _ = c.lease_revoke(session.id()).await;
            (first, second, errors)
        }));
    }
    let (first, second, errors) = merge(handles).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let mut handoff = histogram();
    let mut grants = grants.lock().map(|mut g| std::mem::take(&mut *g)).unwrap_or_default();
    grants.sort_by_key(|g| g.0);
    for w in grants.windows(2) {
        record(&mut handoff, w[1].0.saturating_duration_since(w[0].1));
    }
    let rate = first.len() as f64 / elapsed;
    let json = if mode == "put" {
        serde_json::json!({
            "endpoint": endpoint,
            "mode": mode,
            "concurrency": tasks,
            "duration_s": elapsed,
            "puts_per_s": rate,
            "put_p50_ms": quantile_ms(&first, 0.5),
            "put_p99_ms": quantile_ms(&first, 0.99),
            "errors": errors,
        })
    } else {
        serde_json::json!({
            "endpoint": endpoint,
            "mode": mode,
            "concurrency": tasks,
            "duration_s": elapsed,
            "ops_per_s": rate,
            "acquire_p50_ms": quantile_ms(&first, 0.5),
            "acquire_p99_ms": quantile_ms(&first, 0.99),
            "release_p50_ms": quantile_ms(&second, 0.5),
            "release_p99_ms": quantile_ms(&second, 0.99),
            "handoff_p50_ms": (mode == "lock-contended").then(|| quantile_ms(&handoff, 0.5)),
            "handoff_p99_ms": (mode == "lock-contended").then(|| quantile_ms(&handoff, 0.99)),
            "errors": errors,
        })
    };
    println!("{json}");
    Ok(())
}

/// The `backend` mode: try-once acquire + release cycles straight on distlock's etcd backend.
async fn backend(endpoint: &str, tasks: usize, duration: Duration) -> anyhow::Result<()> {
    let url = endpoint.replacen("http://", "etcd://", 1);
    let backend = distlock::backend::open(&url).await?;
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let backend = backend.clone();
        handles.push(tokio::spawn(async move {
            let (mut first, mut second, mut errors) = (histogram(), histogram(), 0u64);
            while start.elapsed() < duration {
                let req = distlock::AcquireRequest {
                    key: format!("bench-backend/{t}"),
                    lease_id: distlock::LeaseId::generate(),
                    holder: format!("task-{t}"),
                    ttl: Duration::from_secs(10),
                    wait: distlock::Wait::TryOnce,
                    limit: 1,
                    mode: distlock::LockMode::Exclusive,
                    value: None,
                };
                let t0 = Instant::now();
                let grant = match backend.acquire(req).await {
                    Ok(g) => g,
                    Err(_) => {
                        errors += 1;
                        continue;
                    }
                };
                let t1 = Instant::now();
                record(&mut first, t1 - t0);
                match backend.release(&format!("bench-backend/{t}"), &grant.lease_id).await {
                    Ok(()) => record(&mut second, t1.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (first, second, errors)
        }));
    }
    let (first, second, errors) = merge(handles).await?;
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "endpoint": endpoint,
            "mode": "backend",
            "concurrency": tasks,
            "duration_s": elapsed,
            "ops_per_s": first.len() as f64 / elapsed,
            "acquire_p50_ms": quantile_ms(&first, 0.5),
            "acquire_p99_ms": quantile_ms(&first, 0.99),
            "release_p50_ms": quantile_ms(&second, 0.5),
            "release_p99_ms": quantile_ms(&second, 0.99),
            "errors": errors,
        })
    );
    Ok(())
}
