//! The behaviours every backend promises, each an async function over a [`Locker`] (see the
//! crate's [`contract_tests!`](crate::contract_tests) macro, which runs them all), and the
//! building blocks other tests share (the mutual-exclusion hammer, the renew and paging checks).
//!
//! Real time, with bounds far from the figures they guard (a wake-up "by the release" must come
//! in under 5 s where the timer it must not be is 10 s or more away), so that two loaded cores
//! do not make them flaky; speed is measured in benchmarks, not here.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock::{AcquireOptions, Error, LeaseId, Locker};

/// What a backend does not promise, so the suite checks the weaker promise instead.
#[derive(Debug, Clone)]
pub struct Caps {
    /// Waiters are served first come, first served (Redlock's race instead: no queue spans
    /// independent masters).
    pub fifo: bool,
    /// What the backend takes off the TTL it reports (Redlock's drift allowance).
    pub renew_slack: Duration,
    /// A renew can change a lease's TTL for later renewals without one (etcd's sessions keep
    /// the TTL class they were granted in).
    pub ttl_follows_renewals: bool,
    /// A try-once refusal (`Error::Held`) means the lock was held at some instant of the call
    /// (Redlock's contenders can split the vote and all be refused while nobody holds it, so
    /// there a refusal says nothing).
    pub exact_refusals: bool,
    /// Semaphores (`limit` above 1) are offered; a backend without them must refuse one with
    /// `InvalidInput`, never grant it.
    pub many_holders: bool,
    /// Leader elections (a value published with a lease, proclaim, watch) are offered; a backend
    /// without them must refuse a campaign and a watch with `InvalidInput`.
    pub elections: bool,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            fifo: true,
            renew_slack: Duration::ZERO,
            ttl_follows_renewals: true,
            exact_refusals: true,
            many_holders: false,
            elections: false,
        }
    }
}

const SECOND: Duration = Duration::from_secs(1);

/// Waits (up to 20 s) until the store counts `n` waiters on `key`.
pub async fn until_waiters(locker: &Locker, key: &str, n: u64) {
    let deadline = Instant::now() + 20 * SECOND;
    loop {
        let now = locker.status(key).await.map(|s| s.waiters).unwrap_or(u64::MAX);
        if now == n {
            return;
        }
        assert!(Instant::now() < deadline, "{key}: {now} waiters, expected {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Eight tasks never hold one key together, and tokens rise grant by grant.
pub async fn mutual_exclusion_and_rising_tokens(locker: &Locker, _caps: &Caps) {
    hammer(std::slice::from_ref(locker), "contract/mutex", 8, 200).await;
}

/// A try-once acquire of a held key is `Held`, naming the holder; nothing is queued.
pub async fn try_once_names_the_holder(locker: &Locker, _caps: &Caps) {
    let _held =
        locker.acquire("contract/held", &AcquireOptions::new().holder("host-1/pid-42")).await.unwrap();
    let err = locker.acquire("contract/held", &AcquireOptions::new()).await.unwrap_err();
    assert!(
        matches!(&err, Error::Held { key, holder } if key == "contract/held" && holder.as_deref() == Some("host-1/pid-42")),
        "{err:?}"
    );
    assert_eq!(err.code(), distlock::ErrorCode::LockHeld);
    assert_eq!(locker.status("contract/held").await.unwrap().waiters, 0, "a refusal queues nothing");
}

/// Waiters are granted in the order they queued, each with a higher token; where the backend
/// does not queue (`!caps.fifo`), every waiter is still granted exactly once.
pub async fn waiters_are_served_in_order(locker: &Locker, caps: &Caps) {
    let key = "contract/fifo";
    let first = locker.acquire(key, &AcquireOptions::new()).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5u64 {
        let (locker2, order) = (locker.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let lease = locker2.acquire(key, &AcquireOptions::new().wait(60 * SECOND)).await.unwrap();
            order.lock().unwrap().push((i, lease.fencing_token()));
            lease.release().await.unwrap();
        }));
        if caps.fifo {
            until_waiters(locker, key, i + 1).await;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    first.release().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap();
    let tokens: Vec<u64> = order.iter().map(|(_, t)| *t).collect();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "tokens rise in grant order: {tokens:?}");
    let mut served: Vec<u64> = order.iter().map(|(i, _)| *i).collect();
    if caps.fifo {
        assert_eq!(served, (0..5).collect::<Vec<_>>(), "served in arrival order");
    } else {
        served.sort_unstable();
        assert_eq!(served, (0..5).collect::<Vec<_>>(), "every waiter served once");
    }
}

/// A release wakes the waiter itself: granted in well under the holder's 30 s TTL (and under the
/// 10 s fallback a backend's timers could hide behind).
pub async fn release_wakes_the_waiter(locker: &Locker, _caps: &Caps) {
    let key = "contract/release";
    let holder = locker.acquire(key, &AcquireOptions::new().ttl(30 * SECOND)).await.unwrap();
    let waiter = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire(key, &AcquireOptions::new().wait(60 * SECOND)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let token = holder.fencing_token();
    let released = Instant::now();
    holder.release().await.unwrap();
    let next = waiter.await.unwrap().expect("the waiter gets the lock");
    assert!(released.elapsed() < 5 * SECOND, "woken by the release ({:?})", released.elapsed());
    assert!(next.fencing_token() > token);
}

/// A holder that stops renewing (a crashed process) loses the key at its TTL, and the waiter is
/// granted then, with a higher token — not before the TTL, and not long after.
pub async fn expiry_wakes_the_waiter(locker: &Locker, _caps: &Caps) {
    let key = "contract/expiry";
    let ttl = 2 * SECOND;
    let crashed = locker.acquire(key, &AcquireOptions::new().ttl(ttl).auto_renew(false)).await.unwrap();
    let (token, start) = (crashed.fencing_token(), Instant::now());
    std::mem::forget(crashed); // no release, no renewal: as if the process died
    let next = locker.acquire(key, &AcquireOptions::new().wait(60 * SECOND)).await.unwrap();
    let waited = start.elapsed();
    assert!(waited >= ttl - Duration::from_millis(100), "granted {waited:?} into a {ttl:?} lease");
    assert!(waited < ttl + 10 * SECOND, "granted {waited:?} after a {ttl:?} lease expired");
    assert!(next.fencing_token() > token);
}

/// A wait that times out is `WaitTimeout` (naming the holder) and leaves no place in the queue:
/// the next release is not held up by it.
pub async fn a_timed_out_waiter_leaves_the_queue(locker: &Locker, _caps: &Caps) {
    let key = "contract/timeout";
    let held = locker.acquire(key, &AcquireOptions::new().holder("owner")).await.unwrap();
    let wait = Duration::from_millis(300);
    let start = Instant::now();
    let err = locker.acquire(key, &AcquireOptions::new().wait(wait)).await.unwrap_err();
    assert!(start.elapsed() >= wait, "gave up after {:?}", start.elapsed());
    match err {
        Error::WaitTimeout { key: k, holder, .. } => {
            assert_eq!(k, key);
            assert_eq!(holder.as_deref(), Some("owner"));
        }
        other => panic!("expected WaitTimeout, got {other:?}"),
    }
    until_waiters(locker, key, 0).await;
    held.release().await.unwrap();
    locker.acquire(key, &AcquireOptions::new()).await.expect("free for a try-once acquire at once");
}

/// A waiting acquire that is cancelled leaves the queue: after the holder releases, the key is
/// free (no ghost holds it) and a try-once acquire gets it.
pub async fn a_cancelled_waiter_leaves_the_queue(locker: &Locker, caps: &Caps) {
    let key = "contract/cancel";
    let holder = locker.acquire(key, &AcquireOptions::new()).await.unwrap();
    let waiter = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire(key, &AcquireOptions::new().wait(60 * SECOND)).await }
    });
    if caps.fifo {
        until_waiters(locker, key, 1).await;
    } else {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    until_waiters(locker, key, 0).await;
    holder.release().await.unwrap();
    let status = locker.status(key).await.unwrap();
    assert!(!status.held, "a cancelled waiter holds the key: {status:?}");
    locker.acquire(key, &AcquireOptions::new()).await.expect("free");
}

/// Only the owner's lease id renews or releases; a stale or unknown id is `LeaseLost` and the
/// current holder is untouched; a second release of one lease is `LeaseLost`.
pub async fn only_the_owner_renews_or_releases(locker: &Locker, _caps: &Caps) {
    let key = "contract/owner";
    let old = locker.acquire(key, &AcquireOptions::new()).await.unwrap();
    let old_id = old.lease_id().clone();
    old.release().await.unwrap();
    let current = locker.acquire(key, &AcquireOptions::new()).await.unwrap();
    for id in [&old_id, &LeaseId::generate()] {
        let err = locker.renew_lease(key, id, Some(10 * SECOND)).await.unwrap_err();
        assert!(err.is_lease_lost(), "renew by a stranger: {err:?}");
        let err = locker.release_lease(key, id).await.unwrap_err();
        assert!(err.is_lease_lost(), "release by a stranger: {err:?}");
    }
    let status = locker.status(key).await.unwrap();
    assert!(status.held);
    assert_eq!(status.fencing_token, Some(current.fencing_token()));
    let id = current.lease_id().clone();
    current.release().await.unwrap();
    assert!(locker.release_lease(key, &id).await.unwrap_err().is_lease_lost());
}

/// See [`renew_keeps_ttl`].
pub async fn renew_without_ttl_keeps_the_lease_ttl(locker: &Locker, caps: &Caps) {
    renew_keeps_ttl(locker, "contract/keep", caps.renew_slack, caps.ttl_follows_renewals).await;
}

/// Status names the holder, token, TTL left and waiters; a free key is free; list by prefix
/// shows exactly the held keys under it.
pub async fn status_and_list(locker: &Locker, _caps: &Caps) {
    let opts = AcquireOptions::new().holder("me").ttl(30 * SECOND);
    let a = locker.acquire("contract-list/a", &opts).await.unwrap();
    let _b = locker.acquire("contract-list/b", &opts).await.unwrap();
    let _c = locker.acquire("contract-other", &opts).await.unwrap();
    let info = locker.status("contract-list/a").await.unwrap();
    assert!(info.held);
    assert_eq!(info.holder.as_deref(), Some("me"));
    assert_eq!(info.fencing_token, Some(a.fencing_token()));
    let left = info.expires_in.expect("a held key has a TTL left");
    assert!(left <= 30 * SECOND && left > 20 * SECOND, "{left:?} left of 30 s");
    let free = locker.status("contract-nobody").await.unwrap();
    assert!(!free.held && free.holder.is_none() && free.waiters == 0, "{free:?}");
    let keys: Vec<String> = locker.list("contract-list/").await.unwrap().into_iter().map(|i| i.key).collect();
    assert_eq!(keys, ["contract-list/a", "contract-list/b"]);
    a.release().await.unwrap();
    let keys: Vec<String> = locker.list("contract-list/").await.unwrap().into_iter().map(|i| i.key).collect();
    assert_eq!(keys, ["contract-list/b"], "a released key drops out");
}

/// 8 clients over 3 locks for 2 s, with no fault: try-once and waiting acquires, renewals,
/// releases and status reads at random (seeded per client); every key's history must be
/// linearizable against the fenced-lock model of [`crate::linearizable`].
pub async fn histories_are_linearizable(locker: &Locker, caps: &Caps) {
    let keys = [KeyKind::Lock, KeyKind::Lock, KeyKind::Lock];
    check_histories(&run_histories(locker, caps, "contract-lin", &keys).await, &keys);
}

/// The same workload over a semaphore of 2 permits and a lock taken shared or exclusive at
/// random: each key's history must be linearizable against the model of a semaphore and of a
/// shared/exclusive lock. Skipped where the backend offers neither (the semaphore case checks
/// the refusal).
pub async fn primitive_histories_are_linearizable(locker: &Locker, caps: &Caps) {
    if !caps.many_holders {
        return;
    }
    let keys = [KeyKind::Semaphore(2), KeyKind::ReadWrite];
    check_histories(&run_histories(locker, caps, "contract-lin-many", &keys).await, &keys);
}

/// What a key of [`run_histories`] is taken as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A lock.
    Lock,
    /// A semaphore of this many permits.
    Semaphore(u32),
    /// A lock taken shared or exclusive (at random, one in three exclusive).
    ReadWrite,
}

impl KeyKind {
    /// The model its history is checked against.
    pub fn model(self) -> crate::linearizable::Model {
        match self {
            KeyKind::Semaphore(n) => crate::linearizable::Model::semaphore(n),
            KeyKind::Lock | KeyKind::ReadWrite => crate::linearizable::Model::LOCK,
        }
    }
}

/// 8 clients for 2 s over keys `<prefix>/<i>`, each taken as `kinds[i]` says; returns each key's
/// history.
pub async fn run_histories(
    locker: &Locker,
    caps: &Caps,
    prefix: &str,
    kinds: &[KeyKind],
) -> Vec<Vec<crate::linearizable::Event>> {
    use crate::linearizable::{AcquireOutcome, Event, Op, Outcome};
    use std::sync::atomic::{AtomicU32, Ordering};

    let base = Instant::now();
    let now = move || base.elapsed().as_nanos() as u64;
    let ttl = 30 * SECOND;
    let ttl_ns = ttl.as_nanos() as u64;
    let leases = Arc::new(AtomicU32::new(0));
    let exact_refusals = caps.exact_refusals;
    let history: Arc<Mutex<Vec<(usize, Event)>>> = Arc::default();
    let until = base + 2 * SECOND;
    let kinds: Arc<[KeyKind]> = kinds.into();
    let tasks: Vec<_> = (0..8u32)
        .map(|client| {
            let (locker, leases, history, kinds) =
                (locker.clone(), leases.clone(), history.clone(), kinds.clone());
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                let mut seed = u64::from(client).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut roll = move |n: u64| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed % n
                };
                let mut held: Vec<Option<(distlock::Lease, u32)>> = kinds.iter().map(|_| None).collect();
                let record = |k: usize, call: u64, answer: u64, op: Op| {
                    history.lock().unwrap().push((k, Event { client, call, answer, op }));
                };
                while Instant::now() < until {
                    let k = roll(kinds.len() as u64) as usize;
                    let key = format!("{prefix}/{k}");
                    let call = now();
                    match (held[k].take(), roll(4)) {
                        (Some((lease, idx)), 0 | 1) => {
                            let outcome = match lease.release().await {
                                Ok(()) => Outcome::Ok,
                                Err(e) if e.is_lease_lost() => Outcome::LeaseLost,
                                Err(_) => Outcome::Unknown,
                            };
                            let answer = if outcome == Outcome::Unknown { u64::MAX } else { now() };
                            record(k, call, answer, Op::Release { lease: idx, outcome });
                        }
                        (Some((lease, idx)), 2) => {
                            let outcome = match locker.renew_lease(&key, lease.lease_id(), Some(ttl)).await {
                                Ok(_) => Outcome::Ok,
                                Err(e) if e.is_lease_lost() => Outcome::LeaseLost,
                                Err(_) => Outcome::Unknown,
                            };
                            let answer = if outcome == Outcome::Unknown { u64::MAX } else { now() };
                            record(k, call, answer, Op::Renew { lease: idx, ttl: ttl_ns, outcome });
                            held[k] = Some((lease, idx));
                        }
                        (mine, _) if mine.is_some() || roll(3) == 0 => {
                            let info = locker.status(&key).await.expect("status");
                            let op = match (kinds[k], info.held, info.fencing_token) {
                                (KeyKind::Lock, true, None) => Op::StatusTaken,
                                (KeyKind::Lock, _, token) => Op::Status(token),
                                (_, true, _) if info.holders.is_empty() && info.fencing_token.is_none() => {
                                    Op::StatusTaken
                                }
                                (_, _, token) if info.holders.is_empty() => {
                                    Op::StatusHolders(token.into_iter().collect())
                                }
                                _ => {
                                    Op::StatusHolders(info.holders.iter().map(|h| h.fencing_token).collect())
                                }
                            };
                            record(k, call, now(), op);
                            held[k] = mine;
                        }
                        (_, choice) => {
                            let wait = if choice < 2 { Duration::ZERO } else { Duration::from_millis(50) };
                            let mut opts = AcquireOptions::new().ttl(ttl).wait(wait).auto_renew(false);
                            let shared = match kinds[k] {
                                KeyKind::Lock => false,
                                KeyKind::Semaphore(n) => {
                                    opts = opts.limit(n);
                                    false
                                }
                                KeyKind::ReadWrite => roll(3) != 0,
                            };
                            if shared {
                                opts = opts.shared();
                            }
                            let outcome = match locker.acquire(&key, &opts).await {
                                Ok(lease) => {
                                    let idx = leases.fetch_add(1, Ordering::Relaxed);
                                    let token = lease.fencing_token();
                                    held[k] = Some((lease, idx));
                                    AcquireOutcome::Granted { lease: idx, token, ttl: ttl_ns }
                                }
                                Err(Error::Held { .. }) if exact_refusals => AcquireOutcome::Held,
                                // Only "not granted": the checker lets it happen at any time.
                                Err(Error::Held { .. }) => AcquireOutcome::TimedOut,
                                Err(Error::WaitTimeout { .. }) => AcquireOutcome::TimedOut,
                                Err(_) => AcquireOutcome::Unknown { ttl: ttl_ns },
                            };
                            let answer = if matches!(outcome, AcquireOutcome::Unknown { .. }) {
                                u64::MAX
                            } else {
                                now()
                            };
                            let op = if shared { Op::AcquireShared(outcome) } else { Op::Acquire(outcome) };
                            record(k, call, answer, op);
                        }
                    }
                }
                for (k, slot) in held.into_iter().enumerate() {
                    if let Some((lease, idx)) = slot {
                        let call = now();
                        lease.release().await.expect("release at the end");
                        record(k, call, now(), Op::Release { lease: idx, outcome: Outcome::Ok });
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let history = std::mem::take(&mut *history.lock().unwrap());
    (0..kinds.len())
        .map(|k| history.iter().filter(|(key, _)| *key == k).map(|(_, e)| e.clone()).collect())
        .collect()
}

/// Asserts each key's history exercised the key (3 grants or more) and is linearizable against
/// the model of its kind.
pub fn check_histories(histories: &[Vec<crate::linearizable::Event>], kinds: &[KeyKind]) {
    use crate::linearizable::{check_within, AcquireOutcome, Op, Verdict};
    for (k, (events, kind)) in histories.iter().zip(kinds).enumerate() {
        let grants = events
            .iter()
            .filter(|e| {
                matches!(
                    e.op,
                    Op::Acquire(AcquireOutcome::Granted { .. })
                        | Op::AcquireShared(AcquireOutcome::Granted { .. })
                )
            })
            .count();
        assert!(grants >= 3, "key {k}: only {grants} grants in 2 s: the workload did not exercise it");
        match check_within(events, kind.model(), usize::MAX) {
            Verdict::Linearizable => {}
            Verdict::Violation(v) => {
                panic!("key {k} ({kind:?}, {} operations): {v}{}", events.len(), v.around(events))
            }
            Verdict::Undecided { states } => panic!("key {k}: undecided after {states} states"),
        }
    }
}

/// A semaphore of 3 permits under 16 tasks: never more than 3 holders at once (a shared count of
/// current holders, checked on every entry), every grant a token above all earlier grants of the
/// key, waiters served as permits come back (by release, and by expiry), another limit refused
/// with `LimitMismatch` naming the current one, and status listing every holder. A backend
/// without semaphores must refuse one with `InvalidInput` and grant nothing.
pub async fn semaphore_never_exceeds_its_limit(locker: &Locker, caps: &Caps) {
    const LIMIT: u32 = 3;
    let key = "contract/semaphore";
    let opts = AcquireOptions::new().limit(LIMIT).ttl(10 * SECOND).wait(20 * SECOND).auto_renew(false);
    if !caps.many_holders {
        let refused = locker.acquire(key, &opts).await;
        assert!(matches!(&refused, Err(Error::InvalidInput(m)) if m.contains("semaphore")), "{refused:?}");
        assert!(!locker.status(key).await.expect("status").held, "a refused semaphore granted nothing");
        return;
    }

    // Three permits taken; a fourth try-once is refused, and another limit is refused as such.
    let mut first = Vec::new();
    for i in 0..LIMIT {
        first.push(
            locker
                .acquire(key, &opts.clone().holder(format!("h{i}")).wait(Duration::ZERO))
                .await
                .expect("permit"),
        );
    }
    let full = locker.acquire(key, &opts.clone().wait(Duration::ZERO)).await;
    assert!(matches!(full, Err(Error::Held { .. })), "a fourth holder: {full:?}");
    let other = locker.acquire(key, &opts.clone().limit(LIMIT + 1).wait(Duration::ZERO)).await;
    assert!(matches!(other, Err(Error::LimitMismatch { limit: LIMIT, .. })), "another limit: {other:?}");
    let info = locker.status(key).await.expect("status");
    assert_eq!((info.limit, info.holders.len()), (Some(LIMIT), LIMIT as usize), "{info:?}");
    let tokens: Vec<u64> = info.holders.iter().map(|h| h.fencing_token).collect();
    assert_eq!(tokens, first.iter().map(|l| l.fencing_token()).collect::<Vec<_>>(), "holders in grant order");

    // A permit comes back by expiry too: a short lease lapses and a waiter gets its place.
    let last = first.pop().expect("three");
    last.release().await.expect("release");
    let short = locker
        .acquire(key, &opts.clone().ttl(Duration::from_millis(300)).wait(Duration::ZERO))
        .await
        .expect("the released permit");
    let waiter = locker.acquire(key, &opts.clone().holder("after-expiry")).await.expect("the expired permit");
    assert!(waiter.fencing_token() > short.fencing_token(), "tokens rise");
    drop(short);
    for l in first.into_iter().chain([waiter]) {
        l.release().await.expect("release");
    }

    // 16 tasks, 3 permits: the count of holders never passes 3, tokens never repeat.
    let most = semaphore_hammer(std::slice::from_ref(locker), key, &opts, 16, 6).await;
    assert_eq!(most, LIMIT as usize, "the permits were all used at once");
}

/// `tasks` tasks over `lockers` (in turn) each take a permit of the semaphore `opts` describes on
/// `key` `rounds` times, hold it a few ms and release it: the count of holders (shared, checked on
/// every entry) never passes `opts.limit`, no token is handed out twice, and every permit comes
/// back. Returns the most holders seen at once.
pub async fn semaphore_hammer(
    lockers: &[Locker],
    key: &str,
    opts: &AcquireOptions,
    tasks: usize,
    rounds: usize,
) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let limit = opts.limit as usize;
    let (inside, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (locker, opts) =
                (lockers[t % lockers.len()].clone(), opts.clone().holder(format!("task-{t}")));
            let (inside, most, tokens, key) = (inside.clone(), most.clone(), tokens.clone(), key.to_owned());
            tokio::spawn(async move {
                for _ in 0..rounds {
                    let lease = locker.acquire(&key, &opts).await.expect("a permit within the wait");
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    assert!(now <= limit, "{now} holders of a semaphore of {limit}");
                    tokens.lock().unwrap().push(lease.fencing_token());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    lease.release().await.expect("release");
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let mut tokens = std::mem::take(&mut *tokens.lock().unwrap());
    let n = tokens.len();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!((tokens.len(), n), (tasks * rounds, tasks * rounds), "a fencing token was handed out twice");
    assert!(!lockers[0].status(key).await.expect("status").held, "every permit returned");
    most.load(Ordering::SeqCst)
}

/// Shared (read) and exclusive (write) holders of one key: shared holders together, an exclusive
/// one alone; waiting is FIFO across both modes, so a shared request behind a waiting exclusive
/// one waits (no writer starvation) and consecutive shared waiters are granted together; then 12
/// tasks (a third writers) check on every entry that a writer is alone and readers see no writer.
/// A backend without shared locks must refuse one with `InvalidInput`.
pub async fn shared_and_exclusive_are_fair(locker: &Locker, caps: &Caps) {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let key = "contract/rw";
    let read = AcquireOptions::new().shared().ttl(30 * SECOND).auto_renew(false);
    let write = AcquireOptions::new().ttl(30 * SECOND).auto_renew(false);
    if !caps.many_holders {
        let refused = locker.acquire(key, &read).await;
        assert!(matches!(&refused, Err(Error::InvalidInput(m)) if m.contains("shared")), "{refused:?}");
        assert!(!locker.status(key).await.expect("status").held, "a refused shared lock granted nothing");
        return;
    }
    let r1 = locker.acquire(key, &read.clone().holder("r1")).await.expect("a reader");
    let r2 = locker.acquire(key, &read.clone().holder("r2")).await.expect("a second reader, together");
    let info = locker.status(key).await.expect("status");
    assert_eq!((info.mode, info.holders.len()), (Some(distlock::LockMode::Shared), 2), "{info:?}");
    let busy = locker.acquire(key, &write).await;
    assert!(matches!(busy, Err(Error::Held { .. })), "a writer while readers hold: {busy:?}");

    let wait = |opts: &AcquireOptions, holder: &str| {
        let (locker, opts) = (locker.clone(), opts.clone().holder(holder).wait(20 * SECOND));
        tokio::spawn(async move { locker.acquire(key, &opts).await })
    };
    let writer = wait(&write, "w1");
    until_waiters(locker, key, 1).await;
    let late = locker.acquire(key, &read).await;
    assert!(matches!(late, Err(Error::Held { .. })), "a reader passed a waiting writer: {late:?}");
    let reader3 = wait(&read, "r3");
    until_waiters(locker, key, 2).await;
    r1.release().await.expect("release r1");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!writer.is_finished(), "the writer got in while a reader held");
    r2.release().await.expect("release r2");
    let w1 =
        tokio::time::timeout(5 * SECOND, writer).await.expect("the writer, by the release").unwrap().unwrap();
    let reader4 = wait(&read, "r4");
    until_waiters(locker, key, 2).await;
    assert!(!reader3.is_finished(), "a reader got in beside the writer");
    let w1_token = w1.fencing_token();
    w1.release().await.expect("release w1");
    let r3 = tokio::time::timeout(5 * SECOND, reader3).await.expect("r3").unwrap().unwrap();
    let r4 = tokio::time::timeout(5 * SECOND, reader4).await.expect("r4, with r3").unwrap().unwrap();
    assert!(r3.fencing_token() > w1_token && r4.fencing_token() > r3.fencing_token(), "tokens rise");
    r3.release().await.expect("release r3");
    r4.release().await.expect("release r4");

    let (readers, writers) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let tasks: Vec<_> = (0..12)
        .map(|t| {
            let is_writer = t % 3 == 0;
            let opts = if is_writer { write.clone() } else { read.clone() }.wait(20 * SECOND);
            let (locker, readers, writers) = (locker.clone(), readers.clone(), writers.clone());
            tokio::spawn(async move {
                for _ in 0..5 {
                    let lease = locker.acquire(key, &opts).await.expect("a grant within the wait");
                    if is_writer {
                        let w = writers.fetch_add(1, Ordering::SeqCst) + 1;
                        assert_eq!((w, readers.load(Ordering::SeqCst)), (1, 0), "a writer not alone");
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        writers.fetch_sub(1, Ordering::SeqCst);
                    } else {
                        readers.fetch_add(1, Ordering::SeqCst);
                        assert_eq!(writers.load(Ordering::SeqCst), 0, "a reader beside a writer");
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        readers.fetch_sub(1, Ordering::SeqCst);
                    }
                    lease.release().await.expect("release");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert!(!locker.status(key).await.expect("status").held, "every holder gone");
}

/// The next leader `changes` reports within 10 s, skipping "no leader" (a hand-off may show the
/// key free for an instant on some stores).
async fn next_leader(changes: &mut distlock::LeaderWatch) -> distlock::Leader {
    loop {
        let next = tokio::time::timeout(10 * SECOND, changes.next()).await;
        if let Some(leader) = next.expect("a change within 10 s").expect("observe") {
            return leader;
        }
    }
}

/// Leader election: an observer started before anyone campaigns sees no leader, then every
/// leader once, in order, with its value and a rising fencing token — a proclamation (new value,
/// same token), a resignation (the next candidate in line leads), a leader whose lease ran out
/// (the next one leads; the stale leader can no longer proclaim) — and no leader once the last
/// resigns. A backend without elections refuses a campaign and a watch with `InvalidInput`.
pub async fn leader_changes_are_observed_in_order(locker: &Locker, caps: &Caps) {
    let key = "contract/leader";
    let opts = AcquireOptions::new().ttl(30 * SECOND).wait(20 * SECOND);
    if !caps.elections {
        let refused = locker.campaign(key, "addr-a", &opts).await;
        assert!(matches!(&refused, Err(Error::InvalidInput(m)) if m.contains("election")), "{refused:?}");
        assert!(!locker.status(key).await.expect("status").held, "a refused campaign granted nothing");
        let watched = locker.observe(key).next().await;
        assert!(matches!(&watched, Err(Error::InvalidInput(_))), "{watched:?}");
        return;
    }
    let refused = locker.campaign(key, "x", &opts.clone().limit(2)).await;
    assert!(matches!(refused, Err(Error::InvalidInput(_))), "a campaign with a limit: {refused:?}");
    // A key held by several has no leader, whatever values its holders publish.
    let permit = AcquireOptions::new().limit(2).ttl(30 * SECOND);
    let held = locker.acquire("contract/pool", &permit.clone().value("x")).await.expect("a permit");
    assert_eq!(locker.leader("contract/pool").await.expect("leader"), None, "a semaphore has no leader");
    locker.backend().proclaim("contract/pool", held.lease_id(), "y").await.expect("a permit's value");
    assert_eq!(locker.leader("contract/pool").await.expect("leader"), None, "still no leader");
    held.release().await.expect("release");
    let mut changes = locker.observe(key);
    assert_eq!(changes.next().await.expect("the leader now"), None, "nobody leads yet");
    let mut a = locker.campaign(key, "addr-a", &opts.clone().holder("a")).await.expect("a leads");
    let seen = next_leader(&mut changes).await;
    assert_eq!(
        (seen.value.as_str(), seen.holder.as_str(), seen.fencing_token),
        ("addr-a", "a", a.fencing_token())
    );
    let candidate = |value: &'static str, opts: AcquireOptions| {
        let locker = locker.clone();
        tokio::spawn(async move { locker.campaign(key, value, &opts).await })
    };
    // b will not renew: its term ends a second after it begins.
    let b = candidate("addr-b", opts.clone().holder("b").ttl(SECOND).auto_renew(false));
    until_waiters(locker, key, 1).await;
    let c = candidate("addr-c", opts.clone().holder("c"));
    until_waiters(locker, key, 2).await;

    a.proclaim("addr-a2").await.expect("proclaim");
    let seen = next_leader(&mut changes).await;
    assert_eq!((seen.value.as_str(), seen.fencing_token), ("addr-a2", a.fencing_token()), "same term");
    let now = locker.leader(key).await.expect("leader").expect("a leads");
    assert_eq!(now.value, "addr-a2");
    assert_eq!(locker.status(key).await.expect("status").value.as_deref(), Some("addr-a2"));

    let a_token = a.fencing_token();
    a.resign().await.expect("resign");
    let mut b =
        tokio::time::timeout(5 * SECOND, b).await.expect("b, by a's resignation").unwrap().expect("b");
    let seen = next_leader(&mut changes).await;
    assert_eq!((seen.value.as_str(), seen.fencing_token), ("addr-b", b.fencing_token()));
    assert!(b.fencing_token() > a_token, "tokens rise");

    // b's unrenewed term runs out: c leads, and b can no longer speak for the key.
    let c = tokio::time::timeout(10 * SECOND, c).await.expect("c, by b's expiry").unwrap().expect("c");
    let seen = next_leader(&mut changes).await;
    assert_eq!((seen.value.as_str(), seen.fencing_token), ("addr-c", c.fencing_token()));
    assert!(c.fencing_token() > b.fencing_token(), "tokens rise");
    let stale = b.proclaim("addr-b2").await;
    assert!(matches!(&stale, Err(e) if e.is_lease_lost()), "a stale leader proclaimed: {stale:?}");
    assert_eq!(locker.leader(key).await.expect("leader").map(|l| l.value).as_deref(), Some("addr-c"));

    c.resign().await.expect("resign");
    let last = tokio::time::timeout(10 * SECOND, changes.next()).await.expect("a change").expect("observe");
    assert_eq!(last, None, "nobody leads once the last leader resigned");
}

/// See [`pages_of_ten`].
pub async fn list_pages_follow_the_cursor(locker: &Locker, _caps: &Caps) {
    pages_of_ten(locker, "contract-pages/").await;
}

/// Mutual-exclusion check shared by every backend's tests: `tasks` tasks (spread over `lockers`,
/// which stand for separate processes) take `key` `grants` times in all. Inside the lock each
/// reads a shared counter, yields, and writes it back plus one: a lost update means two holders
/// overlapped. Returns the fencing tokens in the order of the critical sections.
pub async fn hammer(lockers: &[Locker], key: &str, tasks: usize, grants: usize) -> Vec<u64> {
    use std::sync::atomic::{AtomicU64, Ordering};

    let counter = Arc::new(AtomicU64::new(0));
    let tokens = Arc::new(Mutex::new(Vec::with_capacity(grants)));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (locker, counter, tokens) = (lockers[t % lockers.len()].clone(), counter.clone(), tokens.clone());
        let key = key.to_owned();
        handles.push(tokio::spawn(async move {
            let opts = AcquireOptions::new().wait(Duration::from_secs(120)).holder(format!("task-{t}"));
            for _ in 0..(grants / tasks + usize::from(t < grants % tasks)) {
                let lease = locker.acquire(&key, &opts).await.expect("acquire");
                let seen = counter.load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                counter.store(seen + 1, Ordering::SeqCst);
                tokens.lock().expect("tokens").push(lease.fencing_token());
                lease.release().await.expect("release");
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    assert_eq!(counter.load(Ordering::SeqCst), grants as u64, "an update was lost: two holders overlapped");
    let tokens = std::mem::take(&mut *tokens.lock().expect("tokens"));
    assert_eq!(tokens.len(), grants);
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "fencing tokens must rise with each grant");
    tokens
}

/// A renew without a TTL keeps the lease's own TTL, on any backend: acquired for 10 minutes and
/// renewed with `None`, the grant and the store's status both still say about 10 minutes (not the
/// 30 s default). Where the backend can change a lease's TTL (`ttl_follows_renewals`), a renew for
/// one minute makes that the TTL a later renew without one keeps. `slack` is what the backend
/// takes off the TTL it reports (Redlock's drift allowance).
pub async fn renew_keeps_ttl(locker: &Locker, key: &str, slack: Duration, ttl_follows_renewals: bool) {
    let about = |got: Duration, want: Duration| got <= want && got + slack + Duration::from_secs(2) >= want;
    let ten = Duration::from_secs(600);
    let opts = AcquireOptions::new().ttl(ten).auto_renew(false);
    let lease = locker.acquire(key, &opts).await.expect("acquire");
    let grant = locker.renew_lease(key, lease.lease_id(), None).await.expect("renew without a TTL");
    assert!(about(grant.ttl, ten), "renewed for {:?}, not the lease's own 10 minutes", grant.ttl);
    assert_eq!(grant.fencing_token, lease.fencing_token());
    let left = locker.status(key).await.expect("status").expires_in.expect("held");
    assert!(about(left, ten), "the store gives the lease {left:?}, not 10 minutes");
    if ttl_follows_renewals {
        let minute = Duration::from_secs(60);
        locker.renew_lease(key, lease.lease_id(), Some(minute)).await.expect("renew for a minute");
        let grant = locker.renew_lease(key, lease.lease_id(), None).await.expect("renew without a TTL");
        assert!(about(grant.ttl, minute), "renewed for {:?}, not the last TTL renewed with", grant.ttl);
        let left = locker.status(key).await.expect("status").expires_in.expect("held");
        assert!(about(left, minute), "the store gives the lease {left:?}, not 1 minute");
    }
    let stranger = LeaseId::generate();
    let err = locker.renew_lease(key, &stranger, None).await.expect_err("a stranger cannot renew");
    assert!(err.is_lease_lost(), "{err:?}");
    lease.release().await.expect("release");
}

/// Pages through 25 held locks under `prefix` (which must end in `/`) 10 at a time: pages of 10,
/// 10 and 5, each `next` the page's last key and `None` after the last; keys in byte order; keys
/// just outside the prefix never shown; a page that ends exactly at the last lock has no `next`;
/// a released lock drops out; [`Locker::list`] follows the pages; bad queries are
/// `InvalidInput`. Releases everything at the end.
pub async fn pages_of_ten(locker: &Locker, prefix: &str) {
    use distlock::ListQuery;
    assert!(prefix.ends_with('/'));
    let opts = AcquireOptions::new().ttl(Duration::from_secs(60));
    let key = |i: usize| format!("{prefix}{i:02}");
    let mut leases = Vec::new();
    for i in (0..25).rev() {
        leases.push(locker.acquire(&key(i), &opts).await.expect("acquire"));
    }
    // Neighbours on either side of the prefix's range ('0' sorts right after '/').
    let (before, after) =
        (prefix.trim_end_matches('/').to_owned(), format!("{}0", prefix.trim_end_matches('/')));
    for k in [&before, &after] {
        leases.push(locker.acquire(k, &opts).await.expect("acquire a neighbour"));
    }

    let mut query = ListQuery::prefix(prefix).limit(10);
    let (mut sizes, mut keys) = (Vec::new(), Vec::new());
    loop {
        let page = locker.list_page(&query).await.expect("list a page");
        sizes.push(page.locks.len());
        let page_keys: Vec<String> = page.locks.iter().map(|l| l.key.clone()).collect();
        assert!(page.locks.iter().all(|l| l.held && l.fencing_token.is_some()));
        if let Some(next) = &page.next {
            assert_eq!(Some(next), page_keys.last(), "next is the last key returned");
        }
        keys.extend(page_keys);
        match page.next {
            Some(next) => query = query.after(next),
            None => break,
        }
        assert!(sizes.len() < 5, "paging does not end: {sizes:?}");
    }
    assert_eq!(sizes, [10, 10, 5], "pages of 10, 10 and 5");
    assert_eq!(keys, (0..25).map(key).collect::<Vec<_>>(), "every key once, in byte order");

    let last_five = locker.list_page(&ListQuery::prefix(prefix).after(key(19)).limit(5)).await.expect("page");
    assert_eq!((last_five.locks.len(), last_five.next), (5, None), "nothing follows the last lock");
    let first =
        locker.list_page(&ListQuery::prefix(prefix).after(before.clone()).limit(3)).await.expect("page");
    assert_eq!(first.next, Some(key(2)), "a cursor before the prefix starts at its first key");
    let past = locker.list_page(&ListQuery::prefix(prefix).after(after.clone())).await.expect("page");
    assert_eq!((past.locks.len(), past.next), (0, None), "a cursor past the prefix finds nothing");
    let all = locker.list_page(&ListQuery::prefix(prefix)).await.expect("page");
    assert_eq!((all.locks.len(), all.next), (25, None), "no limit: everything in one page");

    let released = leases.remove(24 - 5); // key 05
    assert_eq!(released.key(), key(5));
    released.release().await.expect("release");
    let listed: Vec<String> = locker.list(prefix).await.expect("list").into_iter().map(|l| l.key).collect();
    assert_eq!(listed, (0..25).filter(|&i| i != 5).map(key).collect::<Vec<_>>());
    let page = locker.list_page(&ListQuery::prefix(prefix).after(key(3)).limit(2)).await.expect("page");
    assert_eq!(page.locks.iter().map(|l| l.key.clone()).collect::<Vec<_>>(), [key(4), key(6)]);

    for bad in [
        ListQuery::prefix(prefix).limit(0),
        ListQuery::prefix(prefix).after("a\0b"),
        ListQuery::prefix(prefix).after("k".repeat(distlock::types::MAX_AFTER_CHARS + 1)),
        ListQuery::prefix("p\0"),
    ] {
        let err = locker.list_page(&bad).await.expect_err("a bad query");
        assert!(matches!(err, Error::InvalidInput(_)), "{bad:?}: {err:?}");
    }
    for lease in leases {
        lease.release().await.expect("release");
    }
}
