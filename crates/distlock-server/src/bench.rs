//! Load generation against any backend: the workloads behind the `backends` benchmark.
//!
//! Every cycle goes through the public API (`Locker::acquire`, `Lease::release`), so the figures
//! are what a library user gets. Contended runs also check what they measure: no two holders
//! overlapped, and fencing tokens rose with every grant.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock::{AcquireOptions, Locker};

/// The value at quantile `q` (0..=1) of sorted samples.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Result of an uncontended run.
#[derive(Debug, Clone)]
pub struct Uncontended {
    /// Acquire + release cycles per second over all tasks.
    pub cycles_per_s: f64,
    /// Acquire latencies, sorted.
    pub acquire: Vec<Duration>,
    /// Release latencies, sorted.
    pub release: Vec<Duration>,
    /// Calls that failed.
    pub errors: u64,
}

/// `tasks` tasks, each on its own key, acquire + release in a loop for `duration`.
pub async fn uncontended(locker: &Locker, tasks: usize, duration: Duration) -> Uncontended {
    let samples = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (locker, samples, errors) = (locker.clone(), samples.clone(), errors.clone());
        handles.push(tokio::spawn(async move {
            let key = format!("bench-{t}");
            let opts = AcquireOptions::new().ttl(Duration::from_secs(10));
            let (mut a, mut r) = (Vec::new(), Vec::new());
            while start.elapsed() < duration {
                let t0 = Instant::now();
                let Ok(lease) = locker.acquire(&key, &opts).await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let t1 = Instant::now();
                if lease.release().await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                a.push(t1 - t0);
                r.push(t1.elapsed());
            }
            if let Ok(mut s) = samples.lock() {
                s.0.extend(a);
                s.1.extend(r);
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (mut acquire, mut release) = samples.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default();
    acquire.sort();
    release.sort();
    Uncontended {
        cycles_per_s: acquire.len() as f64 / elapsed,
        acquire,
        release,
        errors: errors.load(Ordering::Relaxed),
    }
}

/// Result of a contended run.
#[derive(Debug, Clone)]
pub struct Contended {
    /// Grants per second on the one key.
    pub handoffs_per_s: f64,
    /// From a release being acknowledged to the next holder's grant, sorted.
    pub handoff: Vec<Duration>,
    /// Times a holder entered while another was inside (must be 0).
    pub overlaps: u64,
    /// Whether fencing tokens rose with every grant.
    pub tokens_rose: bool,
    /// Calls that failed.
    pub errors: u64,
}

/// `tasks` tasks on one key for `duration`.
pub async fn contended(locker: &Locker, tasks: usize, duration: Duration) -> Contended {
    let events = Arc::new(Mutex::new(Vec::new()));
    let inside = Arc::new(AtomicBool::new(false));
    let overlaps = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (locker, events, inside, overlaps, errors) =
            (locker.clone(), events.clone(), inside.clone(), overlaps.clone(), errors.clone());
        handles.push(tokio::spawn(async move {
            let opts = AcquireOptions::new().ttl(Duration::from_secs(10)).wait(Duration::from_secs(30));
            while start.elapsed() < duration {
                let Ok(lease) = locker.acquire("bench-hot", &opts).await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let granted = Instant::now();
                if inside.swap(true, Ordering::SeqCst) {
                    overlaps.fetch_add(1, Ordering::Relaxed);
                }
                let token = lease.fencing_token();
                inside.store(false, Ordering::SeqCst);
                if lease.release().await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                if let Ok(mut e) = events.lock() {
                    e.push((token, granted, Instant::now()));
                }
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut events = events.lock().map(|mut e| std::mem::take(&mut *e)).unwrap_or_default();
    // Grant order is token order when tokens rise; check that against the time of each grant.
    events.sort_by_key(|e| e.1);
    let tokens_rose = events.windows(2).all(|w| w[0].0 < w[1].0);
    let mut handoff: Vec<Duration> =
        events.windows(2).map(|w| w[1].1.saturating_duration_since(w[0].2)).collect();
    handoff.sort();
    Contended {
        handoffs_per_s: events.len() as f64 / elapsed,
        handoff,
        overlaps: overlaps.load(Ordering::Relaxed),
        tokens_rose,
        errors: errors.load(Ordering::Relaxed),
    }
}
