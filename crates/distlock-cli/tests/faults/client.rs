//! A client process: acquire → write → hold → write → release, in a loop, against one backend
//! URL, recording everything. Settings come from environment variables set by the harness.
//!
//! Most critical sections are short (`FAULTS_HOLD_MS`); one in four lasts 1.2 TTLs, renewed.
//! Each acquire waits `FAULTS_WAIT_MS`.
//! Each write first checks the lease (`Lease::is_held`: held and before its safe deadline) and is
//! sent either way, marked with what the holder believed: a holder woken from SIGSTOP finds its
//! lease lost, and its stale write must then be refused by the fenced resource.
//!
//! Beside the loop, each client reads the key's status every 50–250 ms and records what it
//! named (for the linearizability check: see `check.rs`).
//!
//! With `FAULTS_KEYS` > 1 each cycle (and each status read) picks one of that many keys at random,
//! and what concerns a key is recorded in that key's own history file.
//!
//! `FAULTS_PRIMITIVE` picks what is taken: `lock` (default), `semaphore:N` (a permit of N), or
//! `election` (leadership, campaigning with the client's name as its value; resigned at the end).

use std::time::Duration;

use distlock::{AcquireOptions, Leadership, Lease, LeaseState, Locker};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::history::{history_path, key_name, now_ns, ns_of, Event, Recorder};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("client needs {name}"))
}

fn env_ms(name: &str) -> Duration {
    Duration::from_millis(env(name).parse().unwrap_or_else(|_| panic!("{name} must be milliseconds")))
}

/// The fenced resource, over one TCP connection: `key token client` → `1` accepted / `0` refused.
struct Fence {
    addr: String,
    conn: Option<BufReader<TcpStream>>,
}

impl Fence {
    /// `long`: the writer is starting a long hold (a hint the nemesis uses to strike mid-hold).
    async fn write(&mut self, key: &str, token: u64, client: u32, long: bool) -> Option<bool> {
        for _ in 0..2 {
            if self.conn.is_none() {
                self.conn = TcpStream::connect(&self.addr).await.ok().map(BufReader::new);
            }
            let conn = self.conn.as_mut()?;
            let mut reply = String::new();
            let ok = conn
                .get_mut()
                .write_all(format!("{key} {token} {client} {}\n", u8::from(long)).as_bytes())
                .await
                .is_ok()
                && conn.read_line(&mut reply).await.map(|n| n > 0).unwrap_or(false);
            if ok {
                return Some(reply.trim() == "1");
            }
            self.conn = None;
        }
        None
    }
}

/// What a client holds: a lease, or a leadership (a lease with a value).
enum Held {
    Lease(Lease),
    Term(Leadership),
}

impl Held {
    fn lease(&self) -> &Lease {
        match self {
            Held::Lease(l) => l,
            Held::Term(t) => t.lease(),
        }
    }

    async fn release(self) -> distlock::Result<()> {
        match self {
            Held::Lease(l) => l.release().await,
            Held::Term(t) => t.resign().await,
        }
    }
}

/// Takes `key` as `primitive` says (see the module docs).
async fn take(
    locker: &Locker,
    key: &str,
    opts: &AcquireOptions,
    primitive: &str,
    c: u32,
) -> distlock::Result<Held> {
    match primitive.split_once(':') {
        Some(("semaphore", n)) => {
            let n = n.parse().unwrap_or_else(|_| panic!("FAULTS_PRIMITIVE semaphore:{n}"));
            locker.acquire(key, &opts.clone().limit(n)).await.map(Held::Lease)
        }
        _ if primitive == "election" => {
            locker.campaign(key, format!("client-{c}"), opts).await.map(Held::Term)
        }
        _ => locker.acquire(key, opts).await.map(Held::Lease),
    }
}

pub async fn main() {
    let c: u32 = env("FAULTS_CLIENT").parse().expect("client number");
    let backend = env("FAULTS_BACKEND");
    let base = env("FAULTS_KEY");
    let keys: u32 = env("FAULTS_KEYS").parse().expect("FAULTS_KEYS");
    let dir = std::path::PathBuf::from(env("FAULTS_HISTORY_DIR"));
    let ttl = env_ms("FAULTS_TTL_MS");
    let hold = env_ms("FAULTS_HOLD_MS");
    let long_hold = crate::check::long_hold(ttl);
    // As long as the liveness check gives a client after the heal: a shorter wait could run out
    // in the queue and send the client to its back, behind one more long critical section.
    let wait = env_ms("FAULTS_WAIT_MS");
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        env("FAULTS_SEED").parse::<u64>().unwrap_or(1) * 1000 + u64::from(c),
    );
    let until: i64 = env("FAULTS_UNTIL_NS").parse().expect("FAULTS_UNTIL_NS");
    let mut recs: Vec<Recorder> =
        (0..keys).map(|i| Recorder::create(&history_path(&dir, c, i, keys)).expect("history file")).collect();
    let mut fence = Fence { addr: env("FAULTS_FENCE"), conn: None };
    let locker = loop {
        match Locker::open(&backend).await {
            Ok(l) => break l,
            Err(_) if now_ns() < until => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("cannot open {backend}: {e}"),
        }
    };
    let opts = AcquireOptions::new().ttl(ttl).wait(wait).holder(format!("faults/client-{c}"));
    let names: Vec<String> = (0..keys).map(|i| key_name(&base, i, keys)).collect();
    tokio::spawn(read_status(locker.clone(), names.clone(), dir, c, until, rng.random()));
    let primitive = std::env::var("FAULTS_PRIMITIVE").unwrap_or_else(|_| "lock".into());
    while now_ns() < until {
        let i = rng.random_range(0..keys) as usize;
        let (key, rec) = (&names[i], &mut recs[i]);
        let t_req = now_ns();
        let held = match take(&locker, key, &opts, &primitive, c).await {
            Ok(h) => h,
            Err(e) => {
                rec.record(&Event::Fail { c, t_req, t: now_ns(), code: e.code().as_str().to_owned() });
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let lease = held.lease();
        let token = lease.fencing_token();
        rec.record(&Event::Grant { c, t_req, t: now_ns(), token, safe_until: ns_of(lease.safe_until()) });
        let long = rng.random_ratio(1, 4);
        let hold = if long { long_hold } else { hold };
        let mut watch = lease.watch();
        let mut lost_recorded = false;
        for step in 0..2 {
            let t_check = now_ns();
            let believed = lease.is_held();
            let safe_until = ns_of(lease.safe_until());
            let accepted = fence.write(key, token, c, long && step == 0).await;
            if let Some(accepted) = accepted {
                rec.record(&Event::Write {
                    c,
                    token,
                    believed,
                    t_check,
                    t_ack: now_ns(),
                    accepted,
                    safe_until,
                });
            }
            if step == 0 {
                // Hold, but notice a loss the moment the keeper reports it.
                tokio::select! {
                    _ = tokio::time::sleep(hold) => {}
                    reason = watch.lost() => {
                        if let Some(reason) = reason {
                            lost_recorded = true;
                            rec.record(&Event::Lost {
                                c, token, t: now_ns(), reason: format!("{reason:?}"),
                                safe_until: ns_of(lease.safe_until()),
                            });
                        }
                    }
                }
            }
        }
        if let (LeaseState::Lost(reason), false) = (lease.state(), lost_recorded) {
            // A loss noticed after the hold.
            rec.record(&Event::Lost {
                c,
                token,
                t: now_ns(),
                reason: format!("{reason:?}"),
                safe_until: ns_of(lease.safe_until()),
            });
        }
        let t_req = now_ns();
        let released = held.release().await;
        rec.record(&Event::Release {
            c,
            token,
            t_req,
            t: now_ns(),
            code: released.err().map(|e| e.code().as_str().to_owned()),
        });
    }
}

/// Reads the status of one of `keys` (at random) every 50–250 ms until `until`, recording each
/// answer in that key's history (an error says nothing and is not recorded).
async fn read_status(
    locker: Locker,
    keys: Vec<String>,
    dir: std::path::PathBuf,
    c: u32,
    until: i64,
    seed: u64,
) {
    let n = keys.len() as u32;
    let Ok(mut recs) =
        (0..n).map(|i| Recorder::create(&history_path(&dir, c, i, n))).collect::<Result<Vec<_>, _>>()
    else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    while now_ns() < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..250))).await;
        let i = rng.random_range(0..n) as usize;
        let (key, rec) = (&keys[i], &mut recs[i]);
        let t_req = now_ns();
        let Ok(info) = locker.status(key).await else { continue };
        let tokens: Vec<u64> = match info.holders.is_empty() {
            true => info.fencing_token.into_iter().collect(),
            false => info.holders.iter().map(|h| h.fencing_token).collect(),
        };
        let taken = info.held && tokens.is_empty();
        rec.record(&Event::Status { c, t_req, t: now_ns(), tokens, taken });
    }
}
