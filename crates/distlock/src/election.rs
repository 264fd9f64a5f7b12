//! Leader election on a lease: the leader of an election key is the holder of its lock, and
//! publishes a **value** (an address, an id) that any process can read or follow.
//!
//! Written once over the [`Backend`] trait, as etcd's `concurrency.Election` is written over
//! its keys: [`Locker::campaign`] is an exclusive acquire that carries the value (so becoming
//! leader waits in the same FIFO queue, gets a fencing token, renews itself and signals its
//! loss like every lease); [`Leadership::proclaim`] replaces the value without giving up the
//! lock; [`Locker::leader`] reads the current leader from status; [`Locker::observe`] follows
//! the key's change feed ([`Backend::watch`]) and reports each new leader once, reconnecting
//! by itself when the store is out of reach.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, StatusWatch};
use crate::error::{Error, LossReason, Result};
use crate::lease::Lease;
use crate::locker::Locker;
use crate::options::AcquireOptions;
use crate::types::LockInfo;
use crate::validate;

/// The leader of an election key, as [`Locker::leader`] and [`Locker::observe`] report it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Leader {
    /// The full key.
    pub key: String,
    /// The value the leader published (empty when it holds the key as a plain lock).
    pub value: String,
    /// The leader's holder label.
    pub holder: String,
    /// The fencing token of its lease: a later leader always has a higher one.
    pub fencing_token: u64,
}

impl Leader {
    /// The leader a status shows: the holder of an exclusive lease (`None` when the key is free
    /// or is being handed over).
    pub fn of(info: &LockInfo) -> Option<Leader> {
        let (true, Some(holder), Some(fencing_token)) = (info.held, &info.holder, info.fencing_token) else {
            return None;
        };
        // A semaphore or a shared lock has several holders and no leader.
        if info.limit.is_some() || info.mode.is_some() {
            return None;
        }
        Some(Leader {
            key: info.key.clone(),
            value: info.value.clone().unwrap_or_default(),
            holder: holder.clone(),
            fencing_token,
        })
    }
}

/// Being the leader: a held lease on the election key that publishes a value. Renewed while
/// held, as every [`Lease`]; dropped without [`Leadership::resign`], it is released in the
/// background.
#[derive(Debug)]
pub struct Leadership {
    lease: Lease,
    value: String,
}

impl Leadership {
    /// The election key as stored.
    pub fn key(&self) -> &str {
        self.lease.key()
    }

    /// The fencing token of this term: pass it to whatever the leader writes to.
    pub fn fencing_token(&self) -> u64 {
        self.lease.fencing_token()
    }

    /// The value this leader publishes now.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The lease behind the leadership (deadline, state, renewal, loss watch).
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Waits until the leadership is lost (the lease could not be renewed in time, or was
    /// freed by an operator) and says why.
    pub async fn lost(&self) -> LossReason {
        self.lease.lost().await
    }

    /// Replaces the published value without giving up the lock (etcd's `Proclaim`): observers
    /// see the new value with the same fencing token. [`Error::LeaseLost`] when no longer
    /// leader.
    pub async fn proclaim(&mut self, value: impl Into<String>) -> Result<()> {
        let value = value.into();
        validate::value(&value)?;
        self.lease.backend().proclaim(self.lease.key(), self.lease.lease_id(), &value).await?;
        self.value = value;
        Ok(())
    }

    /// Steps down: releases the election key, so the next candidate in line becomes leader.
    pub async fn resign(self) -> Result<()> {
        self.lease.release().await
    }
}

/// Longest pause between attempts to reach the store again while observing.
const MAX_RETRY: Duration = Duration::from_secs(5);
/// First pause after the store could not be reached while observing.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// A feed that stayed open this long ends an outage: the next failure starts the back-off afresh
/// (a feed that fails at once, again and again, keeps backing off).
const STEADY: Duration = Duration::from_secs(10);

/// Called with the reason each time [`LeaderWatch`] finds the store out of reach and waits to try
/// again (see [`LeaderWatch::on_outage`]).
pub type OutageReport = Box<dyn Fn(&str, Duration) + Send + Sync>;

/// The leaders of one election key, each reported once, in order (see [`Locker::observe`]).
pub struct LeaderWatch {
    backend: Arc<dyn Backend>,
    key: String,
    /// The open change feed, and when it was opened.
    feed: Option<(Box<dyn StatusWatch>, tokio::time::Instant)>,
    /// The last answer given (`None` before the first).
    last: Option<Option<Leader>>,
    retry: Duration,
    on_outage: Option<OutageReport>,
}

impl std::fmt::Debug for LeaderWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderWatch").field("key", &self.key).field("last", &self.last).finish()
    }
}

impl LeaderWatch {
    /// Calls `report` with the reason and the pause each time the store cannot be reached (or
    /// refuses for load: 429) and the watch waits to try again, e.g. to tell a user who would
    /// otherwise see nothing. Without it, outages are logged (`tracing`, warn) only.
    pub fn on_outage(mut self, report: impl Fn(&str, Duration) + Send + Sync + 'static) -> LeaderWatch {
        self.on_outage = Some(Box::new(report));
        self
    }

    /// The leader now (first call; `None`: no leader), then each change of leader or of its
    /// value: a new leader, a proclamation, or the key becoming free (`None`). Consecutive
    /// changes may be seen as one (the latest), never out of order: fencing tokens of the
    /// leaders answered only rise (see docs/DESIGN.md for the one exception, a crash of the
    /// lock server's store within a grant's logging). While the store cannot be reached, or
    /// refuses for load, it keeps trying (with back-off up to 5 s) and answers once it can; other
    /// errors (a bad key, a backend without elections, a refused token) are returned.
    pub async fn next(&mut self) -> Result<Option<Leader>> {
        crate::validate::key(&self.key)?;
        loop {
            let (feed, opened) = match &mut self.feed {
                Some(open) => open,
                None => match self.backend.watch(&self.key).await {
                    Ok(feed) => self.feed.insert((feed, tokio::time::Instant::now())),
                    Err(Error::Unavailable(why) | Error::LimitExceeded(why)) => {
                        self.pause(&why).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            match feed.next().await {
                Ok(info) => {
                    let leader = Leader::of(&info);
                    if self.last.as_ref() != Some(&leader) {
                        self.last = Some(leader.clone());
                        return Ok(leader);
                    }
                }
                Err(Error::Unavailable(why) | Error::LimitExceeded(why)) => {
                    if opened.elapsed() >= STEADY {
                        self.retry = FIRST_RETRY;
                    }
                    self.feed = None;
                    self.pause(&why).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn pause(&mut self, why: &str) {
        tracing::warn!(key = %self.key, error = %why, retry_in = ?self.retry, "observing a leader: store unreachable");
        if let Some(report) = &self.on_outage {
            report(why, self.retry);
        }
        tokio::time::sleep(self.retry).await;
        self.retry = (self.retry * 2).min(MAX_RETRY);
    }
}

impl Locker {
    /// Campaigns for leadership of `key`, publishing `value` (at most 4 KiB, never secret: any
    /// reader of the key sees it): an exclusive acquire that carries the value, waiting as
    /// `opts.wait` says (usually [`AcquireOptions::wait_forever`]: candidates queue in FIFO
    /// order). The leadership renews itself as every lease does.
    ///
    /// Offered where [`crate::Offers::elections`] says so (`memory://`, Redis, `etcd://`, the
    /// lock server over any store but Redlock); elsewhere [`Error::InvalidInput`]. A semaphore
    /// limit or shared mode in `opts` is refused: a key has one leader.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), distlock::Error> {
    /// use distlock::{AcquireOptions, Locker};
    ///
    /// let locker = Locker::open("memory://").await?;
    /// let mut term = locker.campaign("service/leader", "10.0.0.7:8080", &AcquireOptions::new().wait_forever()).await?;
    /// let mut changes = locker.observe("service/leader");
    /// assert_eq!(changes.next().await?.map(|l| l.value), Some("10.0.0.7:8080".to_owned()));
    /// term.proclaim("10.0.0.7:9090").await?;
    /// assert_eq!(locker.leader("service/leader").await?.map(|l| l.value), Some("10.0.0.7:9090".to_owned()));
    /// term.resign().await?;
    /// assert_eq!(locker.leader("service/leader").await?, None);
    /// # Ok(()) }
    /// ```
    pub async fn campaign(
        &self,
        key: &str,
        value: impl Into<String>,
        opts: &AcquireOptions,
    ) -> Result<Leadership> {
        if opts.limit != 1 || opts.mode != crate::LockMode::Exclusive {
            return Err(Error::InvalidInput(
                "a campaign takes no limit and no shared mode: an election key has one leader".into(),
            ));
        }
        let value = value.into();
        let opts = opts.clone().value(value.clone());
        let lease = self.acquire(key, &opts).await?;
        Ok(Leadership { lease, value })
    }

    /// The leader of `key` now (namespace included), or `None` when nobody leads.
    pub async fn leader(&self, key: &str) -> Result<Option<Leader>> {
        Ok(Leader::of(&self.status(key).await?))
    }

    /// Follows the leaders of `key` (namespace included): see [`LeaderWatch::next`]. Nothing is
    /// asked of the store until the first `next`; a key that is not valid, or a backend that
    /// does not offer elections, is reported there. A key held by a semaphore or shared lock
    /// has no leader (`None`).
    pub fn observe(&self, key: &str) -> LeaderWatch {
        LeaderWatch {
            backend: self.backend().clone(),
            key: key.to_owned(),
            feed: None,
            last: None,
            retry: FIRST_RETRY,
            on_outage: None,
        }
    }
}
