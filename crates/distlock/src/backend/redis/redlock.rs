//! Redlock over several independent Redis masters:
//! `redlock://[user:password@]host1:6379,host2:6379,host3:6379[/db][?prefix=P&timeout=D&drift=F]`
//! (`redlocks://` for TLS to every master; `ca=`, `cert=`, `key=` as for `rediss://`).
//!
//! Acquire sets the lock on every master in parallel and succeeds when a majority granted it
//! within the validity time (TTL − elapsed − drift, drift = TTL × `drift` (default 0.01) + 2 ms);
//! otherwise it undoes everywhere. Renew and release go to every master; renew succeeds with a
//! majority. The lease's TTL as the holder sees it is the validity: TTL − drift, counted from
//! before the first request.
//!
//! Fencing tokens: each master keeps a counter. Having won a majority, the holder takes the
//! highest counter those masters hold, adds one, and writes it back to them (only where it still
//! holds the lock) before the grant counts; it needs a majority of write-backs. Any two
//! majorities share a master, and the earlier holder's write-back on that master happened while
//! it held the lock there, before the later holder could take it — so tokens strictly increase.
//! That argument fails when a master restarts **without persistence**: its counter (and its
//! locks) are gone, so two overlapping grants and a repeated token become possible until that
//! master has been down for longer than the TTL before rejoining (the "delayed restart" rule of
//! the Redlock design). Run masters with `appendonly yes` and `appendfsync always`, or delay
//! their restart by more than the longest TTL.
//!
//! Waiting is woken by releases (pub/sub on every master) and by a timer at the lock's remaining
//! TTL; it is not FIFO across masters. After a split vote (nobody won a majority), contenders
//! back off for a short random delay, as the Redlock design prescribes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::scripts::{RedlockAcquire, RedlockFence, RedlockRelease, ScriptCall};
use super::wakeups::{Registration, Wakeups};
use super::{LockKeys, RedisBackend, RedisConfig, Store};
use crate::backend::params::Params;
use crate::backend::waiting::{Refused, Waiting};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::types::{AcquireRequest, Grant, LeaseId, ListQuery, LockInfo, LockPage};

/// After a majority released, how long release still waits for the other masters.
const RELEASE_GRACE: Duration = Duration::from_millis(50);

/// Settings of a Redlock backend, parsed from its URL.
#[derive(Debug, Clone, PartialEq)]
pub struct RedlockConfig {
    /// One config per master (same prefix and timeout).
    pub nodes: Vec<RedisConfig>,
    /// Clock drift allowance as a fraction of the TTL (`drift` parameter; default 0.01).
    pub drift_factor: f64,
}

impl RedlockConfig {
    /// Parses a `redlock://` URL.
    ///
    /// ```
    /// use distlock::backend::redis::redlock::RedlockConfig;
    /// let c = RedlockConfig::parse("redlock://:pw@a:6379,b:6380,c:6381/1?drift=0.02").unwrap();
    /// assert_eq!(c.nodes.len(), 3);
    /// assert_eq!(c.nodes[1].url, "redis://:pw@b:6380/1");
    /// assert_eq!(c.drift_factor, 0.02);
    /// ```
    pub fn parse(url: &str) -> Result<RedlockConfig> {
        let (scheme, rest) = match (url.strip_prefix("redlock://"), url.strip_prefix("redlocks://")) {
            (Some(rest), _) => ("redis", rest),
            (_, Some(rest)) => ("rediss", rest),
            _ => return Err(Error::InvalidInput(format!("{url:?} is not a redlock:// URL"))),
        };
        let (auth, rest, query) = super::split_url(rest);
        let (hosts, db) = match rest.split_once('/') {
            Some((hosts, db)) => (hosts, format!("/{db}")),
            None => (rest, String::new()),
        };
        let params = Params::parse(query, &[super::PARAMS, &["drift"]].concat())?;
        let drift_factor = params
            .value::<f64>("drift", "a number from 0 to 0.5", |f| (0.0..0.5).contains(f))?
            .unwrap_or(0.01);
        let nodes = hosts
            .split(',')
            .map(|host| {
                if host.is_empty() {
                    return Err(Error::InvalidInput(format!("empty host in {url:?}")));
                }
                RedisConfig::with_params(&format!("{scheme}://{auth}{host}{db}"), &params)
            })
            .collect::<Result<Vec<_>>>()?;
        if nodes.len() < 3 {
            return Err(Error::InvalidInput(format!(
                "redlock needs at least 3 masters (got {}); use redis:// for one",
                nodes.len()
            )));
        }
        Ok(RedlockConfig { nodes, drift_factor })
    }
}

/// One master: its connection and its pub/sub wake-ups.
struct Node {
    store: Store,
    wakeups: Arc<Wakeups>,
}

/// Leases kept by a majority of independent Redis masters. See the module docs.
pub struct RedlockBackend {
    nodes: Vec<Node>,
    quorum: usize,
    drift_factor: f64,
}

/// One round over all masters.
enum Round {
    Granted(Grant),
    Refused { holder: Option<String>, retry_in: Duration },
}

impl RedlockBackend {
    /// Opens every master (lazily: unreachable masters show up as errors on use).
    pub async fn open(config: RedlockConfig) -> Result<RedlockBackend> {
        let mut nodes = Vec::with_capacity(config.nodes.len());
        for node in config.nodes {
            let single = RedisBackend::open(node).await?;
            nodes.push(Node { store: single.store, wakeups: single.wakeups });
        }
        let quorum = nodes.len() / 2 + 1;
        Ok(RedlockBackend { nodes, quorum, drift_factor: config.drift_factor })
    }

    fn keys(&self, key: &str) -> LockKeys {
        self.nodes[0].store.keys(key)
    }

    fn drift(&self, ttl: Duration) -> Duration {
        ttl.mul_f64(self.drift_factor) + Duration::from_millis(2)
    }

    /// Too many masters failed for a majority to be possible: one line naming each failed master
    /// and its cause.
    fn no_majority(&self, errors: Vec<Error>) -> Error {
        let detail: Vec<String> = errors
            .iter()
            .map(|e| match e {
                Error::Unavailable(m) => m.clone(),
                other => other.to_string(),
            })
            .collect();
        Error::Unavailable(format!(
            "redlock: {} of {} masters failed, a majority of {} is impossible: {}",
            errors.len(),
            self.nodes.len(),
            self.quorum,
            detail.join("; ")
        ))
    }

    /// Compare-and-delete on every master. Returns once every master answered, or a majority
    /// released and the others had [`RELEASE_GRACE`] more; calls to dead masters go on in the
    /// background, so they still clean up when the master answers within its timeout.
    async fn release_everywhere(&self, keys: &LockKeys, lease_id: &LeaseId) -> Vec<Result<bool>> {
        let mut pending: FuturesUnordered<_> = self
            .nodes
            .iter()
            .map(|n| {
                let (store, keys, lease_id) = (n.store.clone(), keys.clone(), lease_id.clone());
                tokio::spawn(async move {
                    let call = RedlockRelease { keys: &keys, lease_id: lease_id.as_str() };
                    store.eval::<i64>(call.invocation(&store.scripts)).await.map(|r| r == 1)
                })
            })
            .collect();
        let mut results = Vec::with_capacity(self.nodes.len());
        let joined = |j: std::result::Result<Result<bool>, tokio::task::JoinError>| {
            j.unwrap_or_else(|e| Err(Error::Unavailable(format!("release task failed: {e}"))))
        };
        while let Some(j) = pending.next().await {
            results.push(joined(j));
            if results.iter().filter(|r| matches!(r, Ok(true))).count() >= self.quorum {
                // Live masters answer within a millisecond: wait briefly for them, so that a
                // release is complete everywhere reachable when it returns, but not for dead ones.
                let grace = tokio::time::sleep(RELEASE_GRACE);
                tokio::pin!(grace);
                loop {
                    tokio::select! {
                        next = pending.next() => match next {
                            Some(j) => results.push(joined(j)),
                            None => break,
                        },
                        _ = &mut grace => break,
                    }
                }
                break;
            }
        }
        results
    }

    async fn round(&self, req: &AcquireRequest, keys: &LockKeys) -> Result<Round> {
        let sent = Instant::now();
        // Stop as soon as a majority granted (or can no longer): a dead master must not slow
        // every round down to its timeout. Masters that answer later are cleaned by release.
        let mut pending: FuturesUnordered<_> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| async move {
                let call = RedlockAcquire {
                    keys,
                    lease_id: req.lease_id.as_str(),
                    ttl: req.ttl,
                    holder: &req.holder,
                };
                (i, n.store.eval::<(i64, i64, String)>(call.invocation(&n.store.scripts)).await)
            })
            .collect();
        let (mut granted, mut errors, mut holders) = (Vec::new(), Vec::new(), Vec::new());
        let mut max_counter = 0u64;
        let mut min_pttl: Option<i64> = None;
        let mut refused = 0;
        while let Some((i, r)) = pending.next().await {
            match r {
                Ok((1, counter, _)) => {
                    granted.push(i);
                    max_counter = max_counter.max(counter.max(0) as u64);
                }
                Ok((_, pttl, holder)) => {
                    refused += 1;
                    if !holder.is_empty() {
                        holders.push(holder);
                    }
                    if pttl > 0 {
                        min_pttl = Some(min_pttl.map_or(pttl, |m| m.min(pttl)));
                    }
                }
                Err(e) => errors.push(e),
            }
            if granted.len() >= self.quorum || refused + errors.len() > self.nodes.len() - self.quorum {
                break;
            }
        }
        drop(pending);
        let validity_end = (sent + req.ttl).checked_sub(self.drift(req.ttl)).unwrap_or(sent);
        if granted.len() >= self.quorum && Instant::now() < validity_end {
            let token = max_counter + 1;
            let fenced = join_all(granted.iter().map(|&i| async move {
                let n = &self.nodes[i];
                let call = RedlockFence {
                    keys,
                    lease_id: req.lease_id.as_str(),
                    token,
                    holder: &req.holder,
                    ttl: req.ttl,
                    meta_ttl: n.store.config.meta_ttl,
                };
                n.store.eval::<i64>(call.invocation(&n.store.scripts)).await
            }))
            .await;
            let fenced = fenced.into_iter().filter(|r| matches!(r, Ok(1))).count();
            if fenced >= self.quorum && Instant::now() < validity_end {
                return Ok(Round::Granted(Grant {
                    lease_id: req.lease_id.clone(),
                    fencing_token: token,
                    ttl: req.ttl.saturating_sub(self.drift(req.ttl)),
                    counted_from: sent,
                }));
            }
        }
        // No majority in time: undo everywhere, including masters whose answer was lost.
        self.release_everywhere(keys, &req.lease_id).await;
        if errors.len() > self.nodes.len() - self.quorum {
            return Err(self.no_majority(errors));
        }
        // A split vote is broken by a short random back-off; a held lock is waited out by its TTL.
        let retry_in = if granted.is_empty() {
            min_pttl.map_or(Duration::from_millis(100), |p| Duration::from_millis(p as u64 + 1))
        } else {
            Duration::from_millis(20 + u64::from(random_byte()) % 80)
        };
        Ok(Round::Refused { holder: most_common(holders), retry_in })
    }
}

fn random_byte() -> u8 {
    let mut b = [0u8; 1];
    let _ = getrandom::fill(&mut b);
    b[0]
}

fn most_common(mut holders: Vec<String>) -> Option<String> {
    holders.sort();
    let mut best: Option<(usize, &String)> = None;
    for run in holders.chunk_by(|a, b| a == b) {
        if best.is_none_or(|(n, _)| run.len() > n) {
            best = Some((run.len(), &run[0]));
        }
    }
    best.map(|(_, h)| h.clone())
}

#[async_trait]
impl Backend for RedlockBackend {
    fn name(&self) -> &'static str {
        "redlock"
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Grant> {
        let keys = self.keys(&req.key);
        let turns = Waiting::start(req.wait);
        let waiting = turns.waits();
        let notify = Arc::new(Notify::new());
        let mut registrations: Vec<Registration> = Vec::new();
        loop {
            if waiting && (registrations.is_empty() || !registrations.iter().all(Registration::is_current)) {
                let regs =
                    join_all(self.nodes.iter().map(|n| {
                        n.wakeups.register_with(&keys.channel, req.lease_id.as_str(), notify.clone())
                    }))
                    .await;
                registrations = regs.into_iter().filter_map(|r| r.ok()).collect();
            }
            let (holder, retry_in) = match self.round(&req, &keys).await? {
                Round::Granted(grant) => return Ok(grant),
                Round::Refused { holder, retry_in } => (holder, retry_in),
            };
            turns.next_turn(&req.key, Refused { holder, retry_in, wake: Some(&notify) }).await?;
        }
    }

    /// Renews on every master; with `ttl` `None` each master keeps the TTL stored with the lease,
    /// and the validity is counted from the shortest TTL a renewing master applied.
    async fn renew(&self, key: &str, lease_id: &LeaseId, ttl: Option<Duration>) -> Result<Grant> {
        let keys = self.keys(key);
        let sent = Instant::now();
        let mut pending: FuturesUnordered<_> =
            self.nodes.iter().map(|n| n.store.renew(&keys, lease_id, ttl)).collect();
        let (mut renewed, mut refused, mut errors, mut token) = (0, 0, Vec::new(), 0);
        let mut applied: Option<Duration> = None;
        while let Some(r) = pending.next().await {
            match r {
                Ok((0, _)) => refused += 1,
                Ok((t, ttl_ms)) => {
                    renewed += 1;
                    token = token.max(t);
                    let here = Duration::from_millis(ttl_ms);
                    applied = Some(applied.map_or(here, |a| a.min(here)));
                }
                Err(e) => errors.push(e),
            }
            if renewed >= self.quorum || refused + errors.len() > self.nodes.len() - self.quorum {
                break;
            }
        }
        drop(pending);
        let ttl = applied.or(ttl).unwrap_or_default();
        let validity_end = (sent + ttl).checked_sub(self.drift(ttl)).unwrap_or(sent);
        if renewed >= self.quorum && Instant::now() < validity_end {
            return Ok(Grant {
                lease_id: lease_id.clone(),
                fencing_token: token,
                ttl: ttl.saturating_sub(self.drift(ttl)),
                counted_from: sent,
            });
        }
        if refused > self.nodes.len() - self.quorum {
            return Err(Error::not_owner(key));
        }
        Err(self.no_majority(errors))
    }

    /// Done only when no majority can still hold the grant: released on some masters and
    /// answered "not ours" by enough others. Released on a few while a majority did not answer
    /// (the holder cut from most masters) is `Unavailable`, not done: the grant may still hold
    /// a majority until its TTL runs out, and a status or an acquire elsewhere would see it held
    /// after a release that had said the lock was free.
    async fn release(&self, key: &str, lease_id: &LeaseId) -> Result<()> {
        let results = self.release_everywhere(&self.keys(key), lease_id).await;
        let released = results.iter().filter(|r| matches!(r, Ok(true))).count();
        let not_ours = results.iter().filter(|r| matches!(r, Ok(false))).count();
        // Masters that may still hold the grant: those that failed or were not waited for.
        let unsure = self.nodes.len() - released - not_ours;
        let errors: Vec<Error> = results.into_iter().filter_map(|r| r.err()).collect();
        if released > 0 && unsure < self.quorum {
            Ok(())
        } else if released > 0 {
            Err(Error::Unavailable(format!(
                "redlock: released on {released} of {} masters; the lease may still hold a majority \
                 until its TTL runs out ({})",
                self.nodes.len(),
                self.no_majority(errors)
            )))
        } else if errors.len() > self.nodes.len() - self.quorum {
            Err(self.no_majority(errors))
        } else {
            Err(Error::not_owner(key))
        }
    }

    /// Held when a majority of masters agree on the same grant (fencing token); free only when
    /// no grant can have a majority, counting the masters that did not answer as possibly
    /// holding it. Otherwise it cannot be told (a grant on a bare majority with one of its
    /// masters cut off): `Unavailable`, not "free".
    async fn status(&self, key: &str) -> Result<LockInfo> {
        let results = join_all(self.nodes.iter().map(|n| n.store.status(key))).await;
        let mut held: Vec<LockInfo> = Vec::new();
        let mut errors = Vec::new();
        for r in results {
            match r {
                Ok(info) if info.held => held.push(info),
                Ok(_) => {}
                Err(e) => errors.push(e),
            }
        }
        if errors.len() > self.nodes.len() - self.quorum {
            return Err(self.no_majority(errors));
        }
        held.sort_by_key(|i| i.fencing_token);
        let mut most = 0;
        for run in held.chunk_by(|a, b| a.fencing_token == b.fencing_token) {
            if run[0].fencing_token == Some(0) {
                continue;
            }
            if run.len() >= self.quorum {
                let expires_in = run.iter().filter_map(|i| i.expires_in).min();
                return Ok(LockInfo { expires_in, waiters: 0, ..run[0].clone() });
            }
            most = most.max(run.len());
        }
        if most + errors.len() >= self.quorum {
            return Err(Error::Unavailable(format!(
                "redlock: {most} of {} masters hold one grant and {} did not answer: whether it \
                 holds a majority cannot be told",
                self.nodes.len(),
                errors.len()
            )));
        }
        Ok(LockInfo::free(key, 0))
    }

    /// SCANs every master for the keys under the prefix (no ordered index), then reads the
    /// majority status of those after the cursor, in order, only until the page is full.
    async fn list(&self, query: &ListQuery) -> Result<LockPage> {
        let mut keys = Vec::new();
        let mut errors = Vec::new();
        for n in &self.nodes {
            match n.store.scan_keys(&query.prefix).await {
                Ok(k) => keys.extend(k),
                Err(e) => errors.push(e),
            }
        }
        if errors.len() > self.nodes.len() - self.quorum {
            return Err(self.no_majority(errors));
        }
        crate::backend::page_of_statuses(self, keys, query).await
    }
}
