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

/// The leaders of one election key, each reported once, in order (see [`Locker::observe`]).
pub struct LeaderWatch {
    backend: Arc<dyn Backend>,
    key: String,
    feed: Option<Box<dyn StatusWatch>>,
    /// The last answer given (`None` before the first).
    last: Option<Option<Leader>>,
    retry: Duration,
}

impl std::fmt::Debug for LeaderWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderWatch").field("key", &self.key).field("last", &self.last).finish()
    }
}

impl LeaderWatch {
    /// The leader now (first call; `None`: no leader), then each change of leader or of its
    /// value: a new leader, a proclamation, or the key becoming free (`None`). Consecutive
    /// changes may be seen as one (the latest), never out of order: fencing tokens of the
    /// leaders answered only rise. While the store cannot be reached it keeps trying (with
    /// back-off up to 5 s) and answers once it can; other errors are returned.
    pub async fn next(&mut self) -> Result<Option<Leader>> {
        loop {
            let feed = match &mut self.feed {
                Some(feed) => feed,
                None => match self.backend.watch(&self.key).await {
                    Ok(feed) => self.feed.insert(feed),
                    Err(Error::Unavailable(why)) => {
                        self.pause(&why).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            match feed.next().await {
                Ok(info) => {
                    self.retry = FIRST_RETRY;
                    let leader = Leader::of(&info);
                    if self.last.as_ref() != Some(&leader) {
                        self.last = Some(leader.clone());
                        return Ok(leader);
                    }
                }
                Err(Error::Unavailable(why)) => {
                    self.feed = None;
                    self.pause(&why).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn pause(&mut self, why: &str) {
        tracing::warn!(key = %self.key, error = %why, retry_in = ?self.retry, "observing a leader: store unreachable");
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
    /// Offered where [`crate::Offers::elections`] says so (`memory://`, the lock server's
    /// embedded store); elsewhere [`Error::InvalidInput`]. A semaphore limit or shared mode in
    /// `opts` is refused: a key has one leader.
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
    /// does not offer elections, is reported there.
    pub fn observe(&self, key: &str) -> LeaderWatch {
        LeaderWatch {
            backend: self.backend().clone(),
            key: key.to_owned(),
            feed: None,
            last: None,
            retry: FIRST_RETRY,
        }
    }
}
