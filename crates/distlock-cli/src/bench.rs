//! Load generation against any backend: `distlock bench` and the `backends` benchmark.
//!
//! Every cycle goes through the public API (`Locker::acquire`, `Lease::release`), so the figures
//! are what a library user gets. Latencies go into HDR histograms (microsecond resolution, three
//! significant digits). Every run also checks what it measures: per key, no two holders were inside
//! at once (no more than `--limit` for a semaphore; readers never beside a writer with
//! `--shared`) and fencing tokens rose with every grant.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock::{AcquireOptions, AcquireRequest, Backend, LeaseId, Locker};
use hdrhistogram::Histogram;

use crate::cli::Output;
use rand::{Rng, SeedableRng};
use rand_distr::Distribution;
use serde::Serialize;

/// What each task does in a loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Each task on its own key: acquire (try once) + release.
    Uncontended,
    /// All tasks on one key: acquire (waiting) + release; measures handoff.
    Contended,
    /// Tasks pick one of `keys` keys at random (uniform or zipf), wait for it, hold it, release.
    Mixed,
}

/// One benchmark run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The workload.
    pub workload: Workload,
    /// Concurrent tasks.
    pub concurrency: usize,
    /// Independent clients the tasks are spread over, each its own `Locker` (its own connections
    /// and, for `http://`, its own batch queue), as if they were separate processes.
    pub clients: usize,
    /// Keys of the mixed workload (uncontended uses one per task, contended one).
    pub keys: usize,
    /// How long to run.
    pub duration: Duration,
    /// Lease TTL.
    pub ttl: Duration,
    /// How long to wait for a held lock (contended and mixed).
    pub wait: Duration,
    /// Time inside the lock before releasing (mixed; 0 elsewhere unless set).
    pub hold: Duration,
    /// Zipf exponent for the mixed workload's key choice (`None`: uniform).
    pub zipf: Option<f64>,
    /// Prefix of every key the run touches.
    pub key_prefix: String,
    /// Seed of the key choice, for repeatable runs.
    pub seed: u64,
    /// Largest share of failed calls (0..=1) a run may have and still pass.
    pub max_error_rate: f64,
    /// Permits per key: 1 (a lock) or N (a semaphore of N; every task names the same N).
    pub limit: u32,
    /// Tasks take their keys shared (read locks), except the first `writers` tasks.
    pub shared: bool,
    /// With `shared`: how many tasks take their keys exclusively (writers among readers).
    pub writers: usize,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            workload: Workload::Uncontended,
            concurrency: 1,
            clients: 1,
            keys: 100,
            duration: Duration::from_secs(10),
            ttl: Duration::from_secs(10),
            wait: Duration::from_secs(30),
            hold: Duration::ZERO,
            zipf: None,
            key_prefix: "bench/".into(),
            seed: 1,
            max_error_rate: 0.01,
            limit: 1,
            shared: false,
            writers: 0,
        }
    }
}

impl BenchConfig {
    /// Whether keys may have several holders at once (a semaphore, or shared locks).
    pub fn many_holders(&self) -> bool {
        self.limit > 1 || self.shared
    }

    /// Number of distinct keys the run uses.
    pub fn key_count(&self) -> usize {
        match self.workload {
            Workload::Uncontended => self.concurrency,
            Workload::Contended => 1,
            Workload::Mixed => self.keys.max(1),
        }
    }
}

/// Counters a progress line reads while the run goes on.
#[derive(Debug, Default)]
pub struct Progress {
    /// Completed acquire + release cycles.
    pub cycles: AtomicU64,
    /// Failed calls.
    pub errors: AtomicU64,
}

/// Latency histogram in microseconds, from 1 µs to one hour.
pub fn histogram() -> Histogram<u64> {
    // Constant bounds within what hdrhistogram accepts (low >= 1, high >= 2 * low, 3 digits).
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(d.as_micros().clamp(1, u64::MAX as u128) as u64);
}

/// Milliseconds at quantile `q` (0..=1) of a microsecond histogram; 0 when empty.
pub fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1e3
}

/// Latency summary of one histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Latency {
    /// Summary of a microsecond histogram.
    pub fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            count: h.len(),
            p50_ms: quantile_ms(h, 0.5),
            p90_ms: quantile_ms(h, 0.9),
            p99_ms: quantile_ms(h, 0.99),
            max_ms: if h.is_empty() { 0.0 } else { h.max() as f64 / 1e3 },
        }
    }
}

/// Result of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// What ran.
    pub config: BenchConfig,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Completed acquire + release cycles.
    pub cycles: u64,
    /// Acquire latency (µs): from the call to the grant, waiting included.
    pub acquire: Histogram<u64>,
    /// Release latency (µs).
    pub release: Histogram<u64>,
    /// Time inside the lock as measured (µs), from the grant to the release call: what `hold`
    /// really was.
    pub held: Histogram<u64>,
    /// From a release being acknowledged to the next holder's grant on the same key (µs):
    /// contended runs only.
    pub handoff: Histogram<u64>,
    /// Failed calls by error code (`lock_held`, `backend_unavailable`, ...: [`distlock::ErrorCode`]).
    pub errors: BTreeMap<String, u64>,
    /// Grants that began while another holder of the same key was still inside (must be 0).
    pub overlaps: u64,
    /// Pairs of successive grants of one key whose tokens did not rise (must be 0).
    pub token_regressions: u64,
}

impl Report {
    /// Cycles per second.
    pub fn ops_per_s(&self) -> f64 {
        self.cycles as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Whether the run measured something and saw mutual exclusion and rising tokens.
    pub fn checks_passed(&self) -> bool {
        self.failures().is_empty()
    }

    /// Failed calls as a share (0..=1) of all calls that ended, successful cycles included.
    pub fn error_rate(&self) -> f64 {
        let errors = self.error_count();
        errors as f64 / (self.cycles + errors).max(1) as f64
    }

    /// Why the run failed, one reason a line; empty when it passed. A run that completed no cycle
    /// measured nothing, and one with more failed calls than `max_error_rate` measured failures.
    pub fn failures(&self) -> Vec<String> {
        let mut why = Vec::new();
        if self.overlaps > 0 {
            why.push(format!("{} grants overlapped another holder of the same key", self.overlaps));
        }
        if self.token_regressions > 0 {
            why.push(format!("fencing tokens did not rise {} times", self.token_regressions));
        }
        if self.cycles == 0 {
            why.push("no acquire + release cycle completed: nothing was measured".to_owned());
        } else if self.error_rate() > self.config.max_error_rate {
            why.push(format!(
                "{:.2} % of calls failed (more than --max-error-rate {} %)",
                self.error_rate() * 100.0,
                self.config.max_error_rate * 100.0
            ));
        }
        why
    }

    /// Whether hand-offs were measured: a contended run of one lock (a semaphore's or shared
    /// lock's grants are not one holder's hand-off to the next).
    pub fn has_handoff(&self) -> bool {
        self.config.workload == Workload::Contended && !self.config.many_holders()
    }

    /// Total failed calls.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The `--json` form: one flat object.
    pub fn to_json(&self, backend: &str) -> serde_json::Value {
        let (a, r, h) = (Latency::of(&self.acquire), Latency::of(&self.release), Latency::of(&self.handoff));
        serde_json::json!({
            "backend": backend,
            "workload": self.config.workload,
            "concurrency": self.config.concurrency,
            "clients": self.config.clients,
            "keys": self.config.key_count(),
            "duration_s": self.elapsed.as_secs_f64(),
            "ttl_ms": self.config.ttl.as_millis() as u64,
            "hold_ms": self.config.hold.as_secs_f64() * 1e3,
            "hold_measured_p50_ms": quantile_ms(&self.held, 0.5),
            "hold_measured_mean_ms": if self.held.is_empty() { 0.0 } else { self.held.mean() / 1e3 },
            "zipf": self.config.zipf,
            "limit": self.config.limit,
            "shared": self.config.shared,
            "writers": if self.config.shared { self.config.writers } else { 0 },
            "cycles": self.cycles,
            "ops_per_s": self.ops_per_s(),
            "acquire_p50_ms": a.p50_ms,
            "acquire_p90_ms": a.p90_ms,
            "acquire_p99_ms": a.p99_ms,
            "acquire_max_ms": a.max_ms,
            "release_p50_ms": r.p50_ms,
            "release_p90_ms": r.p90_ms,
            "release_p99_ms": r.p99_ms,
            "release_max_ms": r.max_ms,
            "handoff_p50_ms": self.has_handoff().then_some(h.p50_ms),
            "handoff_p99_ms": self.has_handoff().then_some(h.p99_ms),
            "handoff_max_ms": self.has_handoff().then_some(h.max_ms),
            "errors": self.error_count(),
            "errors_by_code": self.errors,
            "error_rate": self.error_rate(),
            "failures": self.failures(),
            "overlaps": self.overlaps,
            "token_regressions": self.token_regressions,
            "checks_passed": self.checks_passed(),
        })
    }

    /// The human summary, several lines.
    pub fn summary(&self, backend: &str) -> String {
        let c = &self.config;
        let line = |name: &str, h: &Histogram<u64>| {
            let l = Latency::of(h);
            format!(
                "  {name:<11} p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}\n",
                l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
            )
        };
        let holders = match (c.shared, c.limit) {
            (true, _) => format!(", shared ({} writer(s))", c.writers),
            (false, 1) => String::new(),
            (false, n) => format!(", limit {n}"),
        };
        let mut s = format!(
            "{:?} on {backend}: {} task(s) over {} client(s), {} key(s){holders}, ttl {}, {:.1} s\n",
            c.workload,
            c.concurrency,
            c.clients,
            c.key_count(),
            humantime::format_duration(c.ttl),
            self.elapsed.as_secs_f64()
        )
        .to_lowercase();
        s.push_str(&format!("  cycles      {} ({:.1}/s)\n", self.cycles, self.ops_per_s()));
        s.push_str("  latency ms\n");
        s.push_str(&line("acquire", &self.acquire));
        s.push_str(&line("release", &self.release));
        if self.has_handoff() {
            s.push_str(&line("handoff", &self.handoff));
        }
        if !c.hold.is_zero() {
            s.push_str(&line("held", &self.held));
        }
        if self.errors.is_empty() {
            s.push_str("  errors      none\n");
        } else {
            let list: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
            s.push_str(&format!("  errors      {}\n", list.join(", ")));
        }
        let failures = self.failures();
        if failures.is_empty() {
            s.push_str(&format!(
                "  checks      no two holders overlapped; fencing tokens rose on all {} grants\n",
                self.acquire.len()
            ));
        }
        for f in failures {
            s.push_str(&format!("  FAILED      {f}\n"));
        }
        s
    }
}

/// One key's state during a run: how many exclusive holders (lock or permits) and shared holders
/// are inside, and every grant.
#[derive(Default)]
struct KeyLog {
    exclusive: AtomicU64,
    shared: AtomicU64,
    grants: Mutex<Vec<GrantLog>>,
}

/// One grant as its holder saw it.
#[derive(Debug, Clone, Copy)]
struct GrantLog {
    token: u64,
    /// When the acquire was sent.
    requested: Instant,
    /// When its answer arrived.
    granted: Instant,
    /// When the release was answered.
    released: Instant,
}

impl KeyLog {
    /// A holder enters; `false` when that breaks the key's rule: more exclusive holders than
    /// `limit`, or shared holders beside an exclusive one. (Counts go up only after a grant and
    /// down before the release, so a correct store never trips this.)
    fn enter(&self, shared: bool, limit: u32) -> bool {
        if shared {
            self.shared.fetch_add(1, Ordering::SeqCst);
            self.exclusive.load(Ordering::SeqCst) == 0
        } else {
            let inside = self.exclusive.fetch_add(1, Ordering::SeqCst) + 1;
            inside <= u64::from(limit) && self.shared.load(Ordering::SeqCst) == 0
        }
    }

    fn leave(&self, shared: bool) {
        let count = if shared { &self.shared } else { &self.exclusive };
        count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Grants of one key that break fencing. With one holder at a time, tokens must rise in grant
/// order (`grants` is sorted by grant time). With several (a semaphore, shared locks), grants
/// made together may reach their holders in any order, so each grant's token must be above that
/// of every grant released before it was asked for; repeated tokens count too.
fn token_regressions(grants: &[GrantLog], many_holders: bool) -> u64 {
    if !many_holders {
        return grants.windows(2).filter(|w| w[1].token <= w[0].token).count() as u64;
    }
    let mut by_release: Vec<(Instant, u64)> = grants.iter().map(|g| (g.released, g.token)).collect();
    by_release.sort();
    let mut by_request: Vec<GrantLog> = grants.to_vec();
    by_request.sort_by_key(|g| g.requested);
    let (mut next, mut highest_released, mut regressions) = (0, 0, 0);
    let mut seen = std::collections::HashSet::with_capacity(grants.len());
    for g in by_request {
        while next < by_release.len() && by_release[next].0 < g.requested {
            highest_released = highest_released.max(by_release[next].1);
            next += 1;
        }
        if g.token <= highest_released || !seen.insert(g.token) {
            regressions += 1;
        }
    }
    regressions
}

/// What one task measured.
struct TaskResult {
    acquire: Histogram<u64>,
    release: Histogram<u64>,
    held: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    overlaps: u64,
}

/// Picks keys for one task.
enum KeyPicker {
    Fixed(usize),
    Uniform(usize, rand::rngs::StdRng),
    Zipf(rand_distr::Zipf<f64>, rand::rngs::StdRng),
}

impl KeyPicker {
    fn new(config: &BenchConfig, task: usize) -> KeyPicker {
        let rng =
            rand::rngs::StdRng::seed_from_u64(config.seed.wrapping_mul(1_000_003).wrapping_add(task as u64));
        match config.workload {
            Workload::Uncontended => KeyPicker::Fixed(task),
            Workload::Contended => KeyPicker::Fixed(0),
            Workload::Mixed => {
                let n = config.keys.max(1);
                match config.zipf.and_then(|s| rand_distr::Zipf::new(n as f64, s).ok()) {
                    Some(z) => KeyPicker::Zipf(z, rng),
                    None => KeyPicker::Uniform(n, rng),
                }
            }
        }
    }

    fn next(&mut self) -> usize {
        match self {
            KeyPicker::Fixed(k) => *k,
            KeyPicker::Uniform(n, rng) => rng.random_range(0..*n),
            // Zipf gives 1..=n, most often 1.
            KeyPicker::Zipf(z, rng) => (z.sample(rng) as usize).saturating_sub(1),
        }
    }
}

/// Runs `config` with its tasks spread over `lockers` (task `i` uses `lockers[i % len]`), updating
/// `progress` as cycles complete.
pub async fn run(lockers: &[Locker], config: &BenchConfig, progress: Arc<Progress>) -> Report {
    let keys: Arc<Vec<KeyLog>> = Arc::new((0..config.key_count()).map(|_| KeyLog::default()).collect());
    let start = Instant::now();
    let mut handles = Vec::new();
    for task in 0..config.concurrency {
        let locker = lockers[task % lockers.len().max(1)].clone();
        let (keys, progress, config) = (keys.clone(), progress.clone(), config.clone());
        handles
            .push(tokio::spawn(async move { one_task(locker, config, task, keys, progress, start).await }));
    }
    let (mut acquire, mut release, mut held) = (histogram(), histogram(), histogram());
    let mut errors = BTreeMap::new();
    let mut overlaps = 0;
    for h in handles {
        match h.await {
            Ok(r) => {
                let _ = acquire.add(&r.acquire);
                let _ = release.add(&r.release);
                let _ = held.add(&r.held);
                for (k, v) in r.errors {
                    *errors.entry(k).or_insert(0) += v;
                }
                overlaps += r.overlaps;
            }
            Err(e) => *errors.entry(format!("task_failed: {e}")).or_insert(0) += 1,
        }
    }
    let elapsed = start.elapsed();
    let mut handoff = histogram();
    let mut token_regressions = 0;
    for key in keys.iter() {
        let mut grants = key.grants.lock().map(|mut g| std::mem::take(&mut *g)).unwrap_or_default();
        // Grant order is the order the holders saw their grants; tokens must rise along it.
        grants.sort_by_key(|g| g.granted);
        token_regressions += self::token_regressions(&grants, config.many_holders());
        // A hand-off (release to the next grant) is one lock's; a semaphore has none to measure.
        if config.workload == Workload::Contended && !config.many_holders() {
            for w in grants.windows(2) {
                record(&mut handoff, w[1].granted.saturating_duration_since(w[0].released));
            }
        }
    }
    Report {
        config: config.clone(),
        elapsed,
        cycles: acquire.len(),
        acquire,
        release,
        held,
        handoff,
        errors,
        overlaps,
        token_regressions,
    }
}

async fn one_task(
    locker: Locker,
    config: BenchConfig,
    task: usize,
    keys: Arc<Vec<KeyLog>>,
    progress: Arc<Progress>,
    start: Instant,
) -> TaskResult {
    let wait = if config.workload == Workload::Uncontended { Duration::ZERO } else { config.wait };
    let shared = config.shared && task >= config.writers;
    let opts = AcquireOptions::new().ttl(config.ttl).wait(wait).holder(format!("bench/task-{task}"));
    let opts = if shared { opts.shared() } else { opts.limit(config.limit) };
    let mut picker = KeyPicker::new(&config, task);
    let mut result = TaskResult {
        acquire: histogram(),
        release: histogram(),
        held: histogram(),
        errors: BTreeMap::new(),
        overlaps: 0,
    };
    let fail = |result: &mut TaskResult, e: distlock::Error| {
        *result.errors.entry(e.code().as_str().to_owned()).or_insert(0) += 1;
        progress.errors.fetch_add(1, Ordering::Relaxed);
    };
    while start.elapsed() < config.duration {
        let k = picker.next();
        let key = format!("{}{k}", config.key_prefix);
        let t0 = Instant::now();
        let lease = match locker.acquire(&key, &opts).await {
            Ok(l) => l,
            Err(e) => {
                fail(&mut result, e);
                // Do not spin on a dead backend.
                if start.elapsed() < config.duration {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                continue;
            }
        };
        let granted = Instant::now();
        let log = &keys[k];
        if !log.enter(shared, config.limit) {
            result.overlaps += 1;
        }
        if !config.hold.is_zero() {
            hold_for(granted, config.hold).await;
        }
        let token = lease.fencing_token();
        log.leave(shared);
        let t1 = Instant::now();
        record(&mut result.held, t1 - granted);
        let released = lease.release().await;
        let done = Instant::now();
        if let Err(e) = released {
            fail(&mut result, e);
        }
        record(&mut result.acquire, granted - t0);
        record(&mut result.release, done - t1);
        if let Ok(mut g) = log.grants.lock() {
            g.push(GrantLog { token, requested: t0, granted, released: done });
        }
        progress.cycles.fetch_add(1, Ordering::Relaxed);
    }
    result
}

/// Timers fire up to about a millisecond late (tokio's timer wheel has 1 ms slots), so a
/// 1 ms hold slept whole lasts about 2 ms. Sleep all but this much and spin the rest.
const SPIN: Duration = Duration::from_micros(1_500);

/// Returns `hold` after `from`, as close as the scheduler allows: sleeps the bulk, then yields in
/// a loop until the moment (other tasks run meanwhile).
async fn hold_for(from: Instant, hold: Duration) {
    let Some(until) = from.checked_add(hold) else {
        // Longer than the clock can count: hold until the run is stopped.
        return std::future::pending().await;
    };
    if hold > SPIN {
        tokio::time::sleep_until((until - SPIN).into()).await;
    }
    while Instant::now() < until {
        tokio::task::yield_now().await;
    }
}

/// Acquires `count` leases on keys `{prefix}bg/{i}` that stay held for `ttl` (no keeper tasks, no
/// renewal; they expire on their own), with `concurrency` calls in flight. Returns how many were
/// granted. Used to measure how the cost of a cycle grows with the number of held leases.
pub async fn hold_background(
    backend: &Arc<dyn Backend>,
    prefix: &str,
    count: u64,
    ttl: Duration,
    concurrency: u64,
) -> u64 {
    let granted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..concurrency.max(1) {
        let (backend, granted, prefix) = (backend.clone(), granted.clone(), prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < count {
                let req = AcquireRequest {
                    key: format!("{prefix}bg/{i}"),
                    lease_id: LeaseId::generate(),
                    holder: "bench/background".into(),
                    ttl,
                    wait: distlock::Wait::TryOnce,
                    limit: 1,
                    mode: Default::default(),
                    value: None,
                };
                if backend.acquire(req).await.is_ok() {
                    granted.fetch_add(1, Ordering::Relaxed);
                }
                i += concurrency.max(1);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    granted.load(Ordering::Relaxed)
}

/// `distlock bench`: optional background leases, the run with a progress line on a terminal, then
/// the summary (or one JSON object). Exit code 0, or 1 when a check failed (two holders overlapped
/// or tokens did not rise), or the backend's error code when it cannot be opened.
pub async fn command(
    locker: &Locker,
    backend: &str,
    config: &BenchConfig,
    background: u64,
    out: &Output,
) -> u8 {
    use std::io::IsTerminal;
    if background > 0 {
        out.say(format!("holding {background} background leases first..."));
        let ttl =
            config.duration.saturating_add(Duration::from_secs(300)).min(Duration::from_secs(24 * 3600));
        let got = hold_background(locker.backend(), &config.key_prefix, background, ttl, 64).await;
        out.say(format!(
            "{got} background leases held (they expire after {})",
            humantime::format_duration(ttl)
        ));
    }
    let progress = Arc::new(Progress::default());
    let bar = (!out.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}") {
            bar.set_style(style);
        }
        bar
    });
    let ticker = bar.clone().map(|bar| {
        let progress = progress.clone();
        let total = config.duration;
        // Runs until aborted when the run ends.
        tokio::spawn(async move {
            let mut last = (0u64, Instant::now());
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let cycles = progress.cycles.load(Ordering::Relaxed);
                let rate = (cycles - last.0) as f64 / last.1.elapsed().as_secs_f64().max(1e-9);
                last = (cycles, Instant::now());
                bar.set_message(format!(
                    "of {}: {cycles} cycles, {rate:.0}/s, {} errors",
                    humantime::format_duration(total),
                    progress.errors.load(Ordering::Relaxed)
                ));
                bar.tick();
            }
        })
    });
    // The first client is the one already open; the others connect the same way.
    let mut lockers = vec![locker.clone()];
    while lockers.len() < config.clients {
        match Locker::open(backend).await {
            Ok(l) => lockers.push(l),
            Err(e) => return out.fail(&e),
        }
    }
    let report = run(&lockers, config, progress).await;
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // A closed stdout (`| head`) loses the report but must not panic.
    let _ = if out.json {
        out.line(&report.to_json(backend).to_string())
    } else {
        out.line(report.summary(backend).trim_end())
    };
    let failures = report.failures();
    for f in &failures {
        out.say(format!("bench failed: {f}"));
    }
    u8::from(!failures.is_empty())
}
