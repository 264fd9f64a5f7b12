//! Benchmarks of the in-process backend through the public API: uncontended acquire + release
//! with 1 and 8 tasks (each on its own key), and a contended handoff between 2 tasks on one key.
//!
//! Run: `cargo bench -p distlock --bench memory`. Figures go in docs/BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use distlock::{AcquireOptions, Locker};
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// `tasks` tasks each run `cycles / tasks` acquire + release cycles on their own key.
async fn uncontended(locker: &Locker, tasks: u64, cycles: u64) -> Duration {
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let locker = locker.clone();
        handles.push(tokio::spawn(async move {
            let key = format!("bench-{t}");
            let opts = AcquireOptions::new();
            for _ in 0..cycles / tasks {
                let lease = locker.acquire(&key, &opts).await.expect("uncontended acquire");
                lease.release().await.expect("release");
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    start.elapsed()
}

/// Two tasks pass one key back and forth `cycles` times in all; each cycle is one handoff.
async fn handoff(locker: &Locker, cycles: u64) -> Duration {
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..2 {
        let locker = locker.clone();
        handles.push(tokio::spawn(async move {
            let opts = AcquireOptions::new().wait_forever();
            for _ in 0..cycles / 2 {
                let lease = locker.acquire("hot", &opts).await.expect("contended acquire");
                tokio::task::yield_now().await;
                lease.release().await.expect("release");
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let locker = rt.block_on(Locker::open("memory://")).expect("memory backend");
    let locker = Arc::new(locker);

    let mut group = c.benchmark_group("memory");
    group.throughput(Throughput::Elements(1));
    for tasks in [1u64, 8] {
        group.bench_function(format!("acquire_release/{tasks}_tasks"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let locker = locker.clone();
                // Round up so every task has at least one cycle; report per cycle.
                let cycles = iters.max(tasks).div_ceil(tasks) * tasks;
                async move { uncontended(&locker, tasks, cycles).await.mul_f64(iters as f64 / cycles as f64) }
            })
        });
    }
    group.bench_function("handoff/2_tasks", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let locker = locker.clone();
            let cycles = iters.max(2).div_ceil(2) * 2;
            async move { handoff(&locker, cycles).await.mul_f64(iters as f64 / cycles as f64) }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
