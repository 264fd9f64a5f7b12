//! etcd's own write speed, the raw figure beside the etcd rows of docs/BENCHMARKS.md: `tasks`
//! concurrent loops of `put` on distinct keys (what etcd's `benchmark put` does), one JSON line.
//!
//! `cargo run --release -p distlock-server --example etcd_put -- http://127.0.0.1:2379 32 3s`

use std::time::{Duration, Instant};

use distlock_server::bench::{histogram, quantile_ms};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let endpoint = args.next().unwrap_or_else(|| "http://127.0.0.1:2379".into());
    let tasks: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let duration =
        args.next().map(|s| humantime::parse_duration(&s)).transpose()?.unwrap_or(Duration::from_secs(3));
    let client = etcd_client::Client::connect([endpoint.as_str()], None).await?;
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let mut kv = client.kv_client();
        handles.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut errors = 0u64;
            while start.elapsed() < duration {
                let t0 = Instant::now();
                match kv.put(format!("bench-put/{t}"), "x", None).await {
                    Ok(_) => h.saturating_record(t0.elapsed().as_micros().max(1) as u64),
                    Err(_) => errors += 1,
                }
            }
            (h, errors)
        }));
    }
    let (mut all, mut errors) = (histogram(), 0);
    for h in handles {
        let (h, e) = h.await?;
        all.add(&h)?;
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "endpoint": endpoint,
            "concurrency": tasks,
            "duration_s": elapsed,
            "puts_per_s": all.len() as f64 / elapsed,
            "put_p50_ms": quantile_ms(&all, 0.5),
            "put_p99_ms": quantile_ms(&all, 0.99),
            "errors": errors,
        })
    );
    Ok(())
}
